//! The watcher of a running pod VM: a thread that sleeps in poll(2) on the VM's process
//! descriptors (pidfds) and on a stop signal, and reports the VM's end when nobody
//! asked for it. It holds the VM's lock only to collect an exit that has happened, so
//! an idle pod costs no wake-ups and a stop request never waits for the watcher.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crx_shim::vm::{Vm, VmExit};

use crate::pod::{lock, DeathHandler};

/// Pause after a process descriptor was readable yet the VM reported no exit: never
/// expected, and a pause keeps it from becoming a busy loop.
const UNEXPLAINED_WAKE_PAUSE: Duration = Duration::from_millis(50);

/// A stop request the watcher sees at once: the flag says it, the eventfd wakes it.
pub struct StopSignal {
    requested: AtomicBool,
    wake: OwnedFd,
}

impl StopSignal {
    pub fn new() -> std::io::Result<StopSignal> {
        // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Asks the watcher to end without reporting (idempotent).
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter
        // (EAGAIN) already wakes the watcher, so the result does not matter.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// Starts the watcher of `vm`; `on_death` runs (once) if the VM ends unasked.
pub fn spawn(vm: Arc<Mutex<Box<dyn Vm>>>, stop: Arc<StopSignal>, on_death: DeathHandler) {
    let spawned = std::thread::Builder::new()
        .name("crx-vm-watch".into())
        .spawn(move || {
            let Some(reason) = watch(&vm, &stop) else {
                return;
            };
            if !stop.is_requested() {
                tracing::error!(%reason, "the pod VM ended");
                on_death(reason);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the VM watcher thread");
    }
}

/// Waits for the VM's end (`Some(why)`) or a stop request (`None`).
fn watch(vm: &Mutex<Box<dyn Vm>>, stop: &StopSignal) -> Option<String> {
    // Copies, so the wait needs no lock; the VM's processes outlive the watch (the
    // VM is stopped only after a stop request).
    let exit_fds: Vec<OwnedFd> = match lock(vm)
        .exit_fds()
        .into_iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect()
    {
        Ok(fds) => fds,
        Err(e) => return Some(format!("cannot watch the pod VM's processes: {e}")),
    };
    loop {
        if stop.is_requested() {
            return None;
        }
        let mut fds: Vec<libc::pollfd> = std::iter::once(stop.wake.as_fd())
            .chain(exit_fds.iter().map(AsFd::as_fd))
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid pollfd array for the call; its descriptors are open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Some(format!("waiting for the pod VM failed: {err}"));
        }
        if stop.is_requested() {
            return None;
        }
        if fds[1..].iter().all(|p| p.revents == 0) {
            continue;
        }
        match lock(vm).wait_timeout(Duration::ZERO) {
            Ok(Some(exit)) => return Some(describe(&exit)),
            Ok(None) => {
                tracing::debug!("a VM process descriptor woke the watcher without an exit");
                std::thread::sleep(UNEXPLAINED_WAKE_PAUSE);
            }
            Err(e) => return Some(format!("waiting for the pod VM failed: {e}")),
        }
    }
}

fn describe(exit: &VmExit) -> String {
    format!("the pod VM ended: {exit}")
}
