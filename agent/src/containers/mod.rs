//! Containers through youki's `libcontainer` (cargo feature `containers`; see
//! `agent/CONTAINERS.md`): the manager of the pod's containers, their stdio streams,
//! the exit table, the spec translation, and a start-up self-test that the statically
//! linked libseccomp really enforces a profile, so a broken link shows as a logged
//! failure instead of containers that silently run unfiltered.

pub mod block_devices;
pub mod build_process;
pub mod cgroups;
pub mod events;
pub mod executor;
pub mod exits;
pub mod image_user;
pub mod manager;
pub mod oom_watch;
pub mod spec;
pub mod stdio;
pub mod tty;

use libcontainer::oci_spec::runtime::{
    LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder,
};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// The errno the self-test profile returns for mkdir: one mkdir("/") never gives by
/// itself (it gives EEXIST).
const PROBE_ERRNO: u32 = libc::EOPNOTSUPP as u32;

/// Why the seccomp self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainersError {
    /// The test profile could not be built.
    #[error("cannot build the seccomp test profile: {0}")]
    Profile(String),
    /// fork or waitpid failed.
    #[error("cannot run the seccomp self-test child")]
    Child(#[source] nix::Error),
    /// The child could not install the filter.
    #[error("libseccomp could not load a filter in the self-test child")]
    Load,
    /// The filter loaded but mkdir was not refused.
    #[error("a loaded seccomp filter did not refuse mkdir: seccomp is not enforced")]
    NotEnforced,
    /// The child ended some other way.
    #[error("the seccomp self-test child ended unexpectedly: {0:?}")]
    Unexpected(WaitStatus),
}

/// Checks in a forked child that a profile denying `mkdir` makes `mkdir` fail. Call
/// while the process has one thread (before the async runtime starts): the child runs
/// libseccomp, which allocates.
pub fn seccomp_self_test() -> Result<(), ContainersError> {
    let deny_mkdir = LinuxSyscallBuilder::default()
        .names(vec!["mkdir".to_owned(), "mkdirat".to_owned()])
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(PROBE_ERRNO)
        .build()
        .map_err(|e| ContainersError::Profile(e.to_string()))?;
    let profile = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![deny_mkdir])
        .build()
        .map_err(|e| ContainersError::Profile(e.to_string()))?;

    // SAFETY: the caller guarantees one thread, so the child's copy of the heap and
    // locks is consistent; the child only loads the filter, calls mkdir and _exits.
    match unsafe { fork() }.map_err(ContainersError::Child)? {
        ForkResult::Child => {
            // The filter needs no_new_privs or CAP_SYS_ADMIN; set it so the test does
            // not depend on the agent's capabilities.
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let code = match libcontainer::seccomp::initialize_seccomp(&profile) {
                Err(_) => 2,
                Ok(_) => match nix::unistd::mkdir("/", nix::sys::stat::Mode::empty()) {
                    Err(e) if e as i32 == PROBE_ERRNO as i32 => 0,
                    _ => 1,
                },
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            match waitpid(child, None).map_err(ContainersError::Child)? {
                WaitStatus::Exited(_, 0) => Ok(()),
                WaitStatus::Exited(_, 1) => Err(ContainersError::NotEnforced),
                WaitStatus::Exited(_, 2) => Err(ContainersError::Load),
                other => Err(ContainersError::Unexpected(other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The test binary has the test harness's threads; the child only touches libseccomp
    /// and the heap, which no other thread holds locks in at this point.
    #[test]
    fn the_linked_libseccomp_enforces_a_profile() {
        super::seccomp_self_test().unwrap();
    }
}
