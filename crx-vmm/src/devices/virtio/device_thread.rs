//! The thread a virtio device runs on once activated, and the eventfd that asks it to
//! stop. Every device with an event loop (vsock, rng, block) starts and stops it the
//! same way.

use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{self, ThreadRole};

/// A running device thread that returns `T` when it stops.
pub struct DeviceThread<T> {
    exit: EventFd,
    handle: JoinHandle<T>,
}

/// The pair of eventfds that stops a device thread: the device keeps the first, the
/// thread watches the second.
pub fn exit_events() -> std::io::Result<(EventFd, EventFd)> {
    let exit = EventFd::new(EFD_NONBLOCK)?;
    let thread_exit = exit.try_clone()?;
    Ok((exit, thread_exit))
}

impl<T: Send + 'static> DeviceThread<T> {
    /// Starts thread `name` running `run`, which must return once the thread's end of
    /// `exit`'s pair (see [`exit_events`]) becomes readable.
    /// The thread confines itself to the seccomp role its name stands for
    /// ([`ThreadRole::for_device_thread`]) before `run` starts.
    pub fn spawn(
        name: &str,
        exit: EventFd,
        run: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_as(ThreadRole::for_device_thread(name), name, exit, run)
    }

    /// Like [`spawn`](Self::spawn), with the seccomp role given. When filters are on
    /// the thread is started by the seccomp launcher (a vCPU thread's filter would
    /// otherwise be inherited), and a thread that cannot install its filter ends the
    /// process rather than run unconfined.
    pub fn spawn_as(
        role: ThreadRole,
        name: &str,
        exit: EventFd,
        run: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        let program = seccomp::compile(role, seccomp::mode()).map_err(std::io::Error::other)?;
        let handle = seccomp::launcher::spawn(name, move || {
            if let Err(e) = seccomp::install_program(role, &program) {
                tracing::error!(error = %e, "device thread cannot be confined; crx-vmm exits");
                std::process::exit(crate::exit::EXIT_VMM_ERROR);
            }
            run()
        })?;
        Ok(Self { exit, handle })
    }

    /// Asks the thread to stop and waits for it. `Ok(None)` if it panicked (logged);
    /// `Err(self)` if it could not be told to stop, so it still runs.
    pub fn stop(self, device: &str) -> Result<Option<T>, Self> {
        if let Err(e) = self.exit.write(1) {
            tracing::error!(error = %e, "{device}: cannot signal the device thread to stop");
            return Err(self);
        }
        match self.handle.join() {
            Ok(value) => Ok(Some(value)),
            Err(_) => {
                tracing::error!("{device}: device thread panicked");
                Ok(None)
            }
        }
    }
}

/// Stops the thread held in `slot`, if any, and returns its value (`None` if there was
/// none or it panicked). A thread that could not be told to stop still runs, so it goes
/// back into `slot`: the device then keeps saying it is active and cannot be reset.
pub fn stop_in_place<T: Send + 'static>(
    slot: &mut Option<DeviceThread<T>>,
    device: &str,
) -> Option<T> {
    let worker = slot.take()?;
    match worker.stop(device) {
        Ok(value) => value,
        Err(still_running) => {
            *slot = Some(still_running);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_runs_until_told_to_stop_and_hands_back_its_value() {
        let (exit, thread_exit) = exit_events().unwrap();
        let thread = DeviceThread::spawn("crx-test-dev", exit, move || {
            // Polls until stop() writes the eventfd (it is non-blocking).
            while thread_exit.read().is_err() {
                std::thread::yield_now();
            }
            42
        })
        .unwrap();
        assert!(matches!(thread.stop("test"), Ok(Some(42))));
        let (exit, _thread_exit) = exit_events().unwrap();
        let panicking =
            DeviceThread::spawn("crx-test-panic", exit, || -> u8 { panic!("device bug") }).unwrap();
        assert!(matches!(panicking.stop("test"), Ok(None)));
    }
}
