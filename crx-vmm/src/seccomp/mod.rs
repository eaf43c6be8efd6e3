//! Seccomp filters, one per thread role, so that a guest that takes over a thread
//! which parses its input can only make the system calls that thread needs.
//!
//! The binary chooses the [`SeccompMode`] once ([`set_mode`], before any thread
//! exists besides the cleaner process); the library then confines each thread as it
//! starts: vCPU threads before their first `KVM_RUN`, device threads first thing in
//! [`DeviceThread::spawn`](crate::devices::virtio::device_thread::DeviceThread::spawn),
//! the main and signal threads once the VM runs, and the vhost-user back ends with one
//! process-wide filter (TSYNC) before they serve QEMU. Without [`set_mode`] (library
//! users, unit tests) nothing is filtered.
//!
//! A filter is inherited by the threads its thread starts, and stacked filters only
//! narrow. Device threads are activated from a vCPU thread (the driver's MMIO write),
//! so they are started by the [`launcher`] thread instead, whose own filter is the
//! union of every device role's.
//!
//! A call outside the filter kills the whole process (SECCOMP_RET_KILL_PROCESS): the
//! shim sees crx-vmm die of SIGSYS and the kernel log names the call (see the README).

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub mod launcher;
pub mod rules;

/// What a call outside the filter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the process (SECCOMP_RET_KILL_PROCESS). The default.
    Kill,
    /// Allow the call and write it to the kernel log (SECCOMP_RET_LOG): for finding
    /// a missing call, never for production.
    Log,
    /// No filters at all.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown seccomp mode {other:?}: expected kill, log or off"
            )),
        }
    }
}

/// The job of a thread, which decides its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// crx-vmm's main thread once the VM runs: waits for its end, cleans up.
    Vmm,
    /// A vCPU thread: KVM_RUN and the MMIO/port handlers.
    Vcpu,
    /// The thread that receives SIGTERM/SIGINT/SIGHUP.
    Signals,
    /// The vsock device thread (muxer over Unix sockets).
    Vsock,
    /// A virtio-blk device thread.
    Block,
    /// The virtio-rng device thread.
    Rng,
    /// A virtio-net device thread (tap read/write).
    Net,
    /// A virtio-fs device thread (FUSE passthrough).
    Fs,
    /// The control socket thread (drive attach over `--api-socket`).
    Api,
    /// A device thread of unknown kind: the union of every device role.
    Device,
    /// The thread that starts device threads (see [`launcher`]).
    Launcher,
    /// The whole `crx-vmm vhost-user-vsock` process.
    VhostUserVsock,
    /// The whole `crx-vmm vhost-user-fs` process.
    VhostUserFs,
    /// The whole `crx-vmm vhost-user-blk` process (its API thread narrows to `Api`).
    VhostUserBlk,
}

impl ThreadRole {
    /// The roles of device threads.
    pub const DEVICES: [ThreadRole; 6] = [
        ThreadRole::Vsock,
        ThreadRole::Block,
        ThreadRole::Rng,
        ThreadRole::Net,
        ThreadRole::Fs,
        ThreadRole::Api,
    ];

    pub const ALL: [ThreadRole; 14] = [
        ThreadRole::Vmm,
        ThreadRole::Vcpu,
        ThreadRole::Signals,
        ThreadRole::Vsock,
        ThreadRole::Block,
        ThreadRole::Rng,
        ThreadRole::Net,
        ThreadRole::Fs,
        ThreadRole::Api,
        ThreadRole::Device,
        ThreadRole::Launcher,
        ThreadRole::VhostUserVsock,
        ThreadRole::VhostUserFs,
        ThreadRole::VhostUserBlk,
    ];

    /// The role of a device thread from the name it is started under
    /// (`crx-vsock`, `crx-blk`, `crx-rng`, `crx-net`, `crx-fs…`, `crx-api`); any
    /// other name gets the union of the device roles.
    pub fn for_device_thread(name: &str) -> Self {
        let kind = name.strip_prefix("crx-").unwrap_or(name);
        let kind = kind.split(['-', '_']).next().unwrap_or(kind);
        match kind {
            "vsock" => ThreadRole::Vsock,
            "blk" | "block" => ThreadRole::Block,
            "rng" => ThreadRole::Rng,
            "net" => ThreadRole::Net,
            "fs" | "virtiofs" => ThreadRole::Fs,
            "api" => ThreadRole::Api,
            _ => ThreadRole::Device,
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build a seccomp rule")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter of the {0:?} thread")]
    Compile(ThreadRole, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0:?} thread")]
    Install(ThreadRole, #[source] seccompiler::Error),
    #[error("cannot start the device-thread launcher")]
    Launcher(#[source] std::io::Error),
    #[error("the seccomp mode was already chosen")]
    ModeAlreadySet,
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Chooses the mode for the whole process; without a call filters are off. With
/// filters on it checks that every role's filter compiles and starts the launcher,
/// so call it while the process has one thread, before any other filter.
pub fn set_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode != SeccompMode::Off {
        for role in ThreadRole::ALL {
            compile(role, mode)?;
        }
    }
    MODE.set(mode).map_err(|_| SeccompError::ModeAlreadySet)?;
    if mode != SeccompMode::Off {
        launcher::start(compile(ThreadRole::Launcher, mode)?).map_err(SeccompError::Launcher)?;
    }
    Ok(())
}

/// Chooses the mode for a process confined by one process-wide filter
/// ([`install_process_wide`]): no launcher, no per-thread filters.
pub fn set_process_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    MODE.set(mode).map_err(|_| SeccompError::ModeAlreadySet)
}

/// The process's mode ([`SeccompMode::Off`] until [`set_mode`]).
pub fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

/// The BPF program of `role` under `mode` (an empty program when `mode` is off).
pub fn compile(role: ThreadRole, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(
        rules::for_role(role)?.into_map(),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Compile(role, e))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(role, e))
}

/// Confines the calling thread to `role` under the process's mode; does nothing
/// when filters are off. Sets no_new_privs, which the kernel requires.
pub fn install(role: ThreadRole) -> Result<(), SeccompError> {
    install_program(role, &compile(role, mode())?)
}

/// Installs an already compiled `program` of `role` on the calling thread (nothing
/// if it is empty, i.e. filters are off).
pub fn install_program(role: ThreadRole, program: &BpfProgram) -> Result<(), SeccompError> {
    if program.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(role, e))?;
    tracing::debug!(?role, "seccomp filter installed");
    Ok(())
}

/// Confines every thread of the process (TSYNC) to `role`: for the vhost-user back
/// ends, whose worker threads the vhost-user-backend crate starts itself. Threads
/// started afterwards inherit the filter. Call it before serving QEMU, with no other
/// filter installed on any thread.
pub fn install_process_wide(role: ThreadRole) -> Result<(), SeccompError> {
    let program = compile(role, mode())?;
    if program.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter_all_threads(&program).map_err(|e| SeccompError::Install(role, e))?;
    tracing::debug!(?role, "process-wide seccomp filter installed");
    Ok(())
}

/// `err` and its causes on one line, for reports that carry a string.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_every_mode() {
        for role in ThreadRole::ALL {
            assert!(!compile(role, SeccompMode::Kill).unwrap().is_empty());
            assert!(!compile(role, SeccompMode::Log).unwrap().is_empty());
            assert!(compile(role, SeccompMode::Off).unwrap().is_empty());
        }
    }

    #[test]
    fn device_thread_names_map_to_their_roles() {
        assert_eq!(
            ThreadRole::for_device_thread("crx-vsock"),
            ThreadRole::Vsock
        );
        assert_eq!(ThreadRole::for_device_thread("crx-blk"), ThreadRole::Block);
        assert_eq!(ThreadRole::for_device_thread("crx-rng"), ThreadRole::Rng);
        assert_eq!(ThreadRole::for_device_thread("crx-net"), ThreadRole::Net);
        assert_eq!(ThreadRole::for_device_thread("crx-fs-0"), ThreadRole::Fs);
        assert_eq!(ThreadRole::for_device_thread("crx-api"), ThreadRole::Api);
        assert_eq!(
            ThreadRole::for_device_thread("crx-test-dev"),
            ThreadRole::Device
        );
    }

    #[test]
    fn modes_parse_from_the_command_line_words() {
        assert_eq!("kill".parse::<SeccompMode>(), Ok(SeccompMode::Kill));
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        assert_eq!("off".parse::<SeccompMode>(), Ok(SeccompMode::Off));
        assert!("allow".parse::<SeccompMode>().is_err());
    }
}
