//! The event loop of a device with one queue (rng, block): serve what the guest queued
//! before its first notification, then serve again on every notification, until the
//! device is stopped.

use std::os::unix::io::AsRawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_EXIT: u64 = 1;

/// Calls `serve` once, then each time `queue_event` fires, until `exit` fires. `device`
/// names the device in the log if the loop itself fails (then the device stops serving).
pub fn serve_until_exit(
    device: &str,
    queue_event: &EventFd,
    exit: &EventFd,
    mut serve: impl FnMut(),
) {
    let epoll = match watch(queue_event, exit) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "{device}: cannot set up the device thread's epoll");
            return;
        }
    };
    serve();
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "{device}: device thread epoll_wait failed; stopping");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == TOKEN_EXIT {
                return;
            }
            // Draining the counter; a failed read only means it was zero.
            let _ = queue_event.read();
            serve();
        }
    }
}

fn watch(queue_event: &EventFd, exit: &EventFd) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (queue_event.as_raw_fd(), TOKEN_QUEUE),
        (exit.as_raw_fd(), TOKEN_EXIT),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}
