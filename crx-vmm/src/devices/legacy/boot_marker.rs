//! crx boot-marker port (0x3f0): the guest agent writes one byte — 1 when it is
//! ready to serve, 2 right before it calls reboot(2) for a clean shutdown.
//!
//! "ready" is logged as `guest agent ready ready_us=<µs since crx-vmm started>
//! exits=<KVM exits so far, all vCPUs>`; "shutdown" is remembered so that the reset
//! that follows ends crx-vmm with code 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock;
use crate::devices::bus::BusDevice;
use crate::vstate::stats::Stat;

/// Value written when the agent is ready.
pub const MARKER_READY: u8 = 1;
/// Value written right before a clean shutdown.
pub const MARKER_SHUTDOWN: u8 = 2;

/// What the guest has announced so far.
#[derive(Default)]
pub struct BootMarkerState {
    /// Microseconds since process start when the agent said ready (0: not yet).
    ready_us: AtomicU64,
    shutdown_announced: AtomicBool,
}

impl BootMarkerState {
    pub fn ready_us(&self) -> Option<u64> {
        Some(self.ready_us.load(Ordering::SeqCst)).filter(|v| *v != 0)
    }

    pub fn shutdown_announced(&self) -> bool {
        self.shutdown_announced.load(Ordering::SeqCst)
    }
}

/// The per-vCPU "exits" counters, summed on demand.
#[derive(Default)]
pub struct ExitCounters {
    stats: Mutex<Vec<Stat>>,
}

impl ExitCounters {
    pub fn add(&self, stat: Stat) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stat);
    }

    /// Total exits over all vCPUs, or None when no counter is available.
    pub fn total(&self) -> Option<u64> {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if stats.is_empty() {
            return None;
        }
        stats.iter().map(|s| s.read().ok()).sum()
    }
}

pub struct BootMarker {
    state: Arc<BootMarkerState>,
    exits: Arc<ExitCounters>,
    other_writes: u64,
}

impl BootMarker {
    pub fn new(state: Arc<BootMarkerState>, exits: Arc<ExitCounters>) -> Self {
        Self {
            state,
            exits,
            other_writes: 0,
        }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [MARKER_READY]) => {
                let ready_us = clock::micros_since_start().max(1);
                // Only the first "ready" counts: a restarted agent is not a new boot.
                if self
                    .state
                    .ready_us
                    .compare_exchange(0, ready_us, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    match self.exits.total() {
                        Some(exits) => tracing::info!(ready_us, exits, "guest agent ready"),
                        None => tracing::info!(ready_us, "guest agent ready"),
                    }
                }
            }
            (0, [MARKER_SHUTDOWN]) => {
                self.state.shutdown_announced.store(true, Ordering::SeqCst);
                tracing::info!(
                    shutdown_us = clock::micros_since_start(),
                    "guest announced a clean shutdown"
                );
            }
            _ => {
                self.other_writes += 1;
                if self.other_writes <= 4 {
                    tracing::debug!(?data, "ignored boot-marker write");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_recorded_once_and_shutdown_is_remembered() {
        let state = Arc::new(BootMarkerState::default());
        let mut dev = BootMarker::new(state.clone(), Arc::new(ExitCounters::default()));
        assert_eq!(state.ready_us(), None);
        dev.write(0, &[7]);
        dev.write(0, &[1, 0]);
        assert_eq!(
            state.ready_us(),
            None,
            "only a 1-byte write of 1 means ready"
        );
        dev.write(0, &[MARKER_READY]);
        let first = state.ready_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
        dev.write(0, &[MARKER_READY]);
        assert_eq!(state.ready_us(), Some(first));
        assert!(!state.shutdown_announced());
        dev.write(0, &[MARKER_SHUTDOWN]);
        assert!(state.shutdown_announced());
    }
}
