//! The pod's namespace holder: a child created straight into new namespaces (UTS, IPC,
//! network, PID as asked) that only waits, so `/proc/<pid>/ns/*` name the pod's
//! namespaces for as long as it lives. As PID 1 of a new PID namespace it also reaps
//! the orphans of the pod's containers. SIGKILL ends it (and, with a PID namespace,
//! every process left in it).

use nix::sched::CloneFlags;

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
        // only async-signal-safe system calls (prctl, sigprocmask, waitpid, sigwaitinfo) and never
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

/// The holder's whole life: die with the agent, reap orphans, never return. It sleeps
/// in sigwaitinfo until a child ends, so an idle pod's guest has no timer to serve for
/// it (each wake-up costs the host CPU under TCG).
fn hold() -> ! {
    // SAFETY: prctl with integer arguments only; async-signal-safe.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initialises
    // it; sigaddset and sigprocmask only read and write that local set. After the
    // clone this process has one thread, so sigprocmask is its thread's mask. Blocked,
    // SIGCHLD stays pending until sigwaitinfo takes it: a child ending between the
    // reaping loop and the wait is not missed.
    let child_ended = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    loop {
        // SAFETY: waitpid with a null status pointer is async-signal-safe.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        // SAFETY: sigwaitinfo reads the local set; a null siginfo pointer is allowed.
        // An error (EINTR) only means looking again.
        unsafe { libc::sigwaitinfo(&child_ended, std::ptr::null_mut()) };
    }
}
