//! The pod's namespace holder: a child created straight into new namespaces (UTS, IPC,
//! network, PID as asked) that only waits, so `/proc/<pid>/ns/*` name the pod's
//! namespaces for as long as it lives. As PID 1 of a new PID namespace it also reaps
//! the orphans of the pod's containers. SIGKILL ends it (and, with a PID namespace,
//! every process left in it).

use nix::sched::CloneFlags;

/// How often the holder looks for orphans to reap when it has no child.
const IDLE_POLL: libc::timespec = libc::timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

/// Why the holder could not be created.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("cannot create the pod's namespace holder (clone with {flags:?})")]
    Clone {
        flags: CloneFlags,
        #[source]
        source: std::io::Error,
    },
}

/// A running holder; [`Holder::kill`] ends it. Dropping it does not: the sandbox
/// decides when the pod's namespaces go.
#[derive(Debug)]
pub struct Holder {
    pid: i32,
    flags: CloneFlags,
}

impl Holder {
    /// Creates the holder in new namespaces of `flags`. Call on a thread that lives as
    /// long as the agent (the async runtime's): the holder's parent-death signal fires
    /// when the thread that created it ends.
    pub fn spawn(flags: CloneFlags) -> Result<Holder, HolderError> {
        let raw = flags.bits() | libc::SIGCHLD;
        // SAFETY: a clone without CLONE_VM and with a null stack behaves as fork: the
        // child gets a copy of the address space and continues here. The child runs
        // only async-signal-safe system calls (prctl, waitpid, nanosleep) and never
        // returns, so the copied state of other threads (locks, allocator) is never
        // touched.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::c_long::from(raw),
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_int>(),
                std::ptr::null_mut::<libc::c_int>(),
                0 as libc::c_long,
            )
        };
        if pid < 0 {
            return Err(HolderError::Clone {
                flags,
                source: std::io::Error::last_os_error(),
            });
        }
        if pid == 0 {
            hold();
        }
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        tracing::info!(pid, ?flags, "pod namespace holder started");
        Ok(Holder { pid, flags })
    }

    /// The holder's pid in the agent's PID namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the holder owns a new namespace of `flag`.
    pub fn owns(&self, flag: CloneFlags) -> bool {
        self.flags.contains(flag)
    }

    /// Ends the holder (the reaper collects it).
    pub fn kill(&self) {
        // SAFETY: kill takes plain integers; the holder is our child and only the
        // reaper waits for it, so until this SIGKILL it cannot have been reaped and
        // its pid cannot have been reused.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            tracing::warn!(pid = self.pid, error = %std::io::Error::last_os_error(), "cannot kill the pod namespace holder");
        }
    }
}

/// The holder's whole life: die with the agent, reap orphans, never return.
fn hold() -> ! {
    // SAFETY: prctl with integer arguments only; async-signal-safe.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    loop {
        // SAFETY: waitpid with a null status pointer is async-signal-safe.
        let reaped = unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
        if reaped < 0 {
            // No child now (ECHILD): orphans may be handed to us later.
            // SAFETY: nanosleep reads the constant and writes nothing (null remainder).
            unsafe { libc::nanosleep(&IDLE_POLL, std::ptr::null_mut()) };
        }
    }
}
