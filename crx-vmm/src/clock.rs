//! Time since crx-vmm's process started, for the boot-time markers.
//!
//! The start is taken by an `.init_array` constructor, which the C runtime runs before
//! Rust's own start-up and `main`: the closest a process can get to its `exec`
//! without the kernel's 10 ms-granular start time.

use std::sync::atomic::{AtomicU64, Ordering};

static START_NS: AtomicU64 = AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

extern "C" fn record_start() {
    mark_start();
}

#[used]
#[link_section = ".init_array"]
static RECORD_START: extern "C" fn() = record_start;

/// Records the start if nothing did yet (the constructor normally has).
pub fn mark_start() {
    let _ = START_NS.compare_exchange(0, monotonic_ns(), Ordering::SeqCst, Ordering::SeqCst);
}

/// Microseconds since the process started.
pub fn micros_since_start() -> u64 {
    mark_start();
    monotonic_ns().saturating_sub(START_NS.load(Ordering::SeqCst)) / 1000
}

/// Logs (at debug) that set-up step `step` finished, with µs since process start:
/// `setup step=<name> us=<n>`, for finding where start-up time goes.
pub fn step(step: &'static str) {
    tracing::debug!(step, us = micros_since_start(), "setup");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_was_recorded_before_main_and_time_advances() {
        assert_ne!(START_NS.load(Ordering::SeqCst), 0, "constructor ran");
        let a = micros_since_start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(micros_since_start() >= a + 2000);
    }
}
