//! The pod VM, behind one interface with two implementations: `crx-vmm` (ours, the
//! default on hardware KVM) and QEMU's `microvm` machine (KVM or TCG) driving crx's own
//! vhost-user device back ends. The shim does not care which one runs a pod: both give
//! the agent's hybrid-vsock Unix socket, a way to stop, a way to wait, and figures.

mod child;
mod choice;
mod config;
mod confine;
mod crx_vmm;
mod qemu;
mod qemu_devices;
mod resources;

use std::path::Path;
use std::time::Duration;

pub use choice::{
    backend_for, choose_backend, probe_kvm, select_backend, select_confined_backend, BackendChoice,
    Hypervisor, KvmVerdict, TCG_COST,
};
pub use config::{
    slot_serial, Drive, DriveSlot, NetDevice, SerialOutput, SharedDir, VmConfig, VmDevices,
    MIN_MEMORY_MIB,
};
pub use confine::{jail_dir, Confinement, Seccomp};
pub use crx_vmm::CrxVmmBackend;
pub use qemu::{QemuAccel, QemuBackend};
pub use resources::{ProcessFigures, VmResources};

pub use child::ProcessExit;

/// Which VMM runs a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    CrxVmm,
    Qemu(QemuAccel),
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendKind::CrxVmm => f.write_str("crx-vmm"),
            BackendKind::Qemu(QemuAccel::Kvm) => f.write_str("qemu/kvm"),
            BackendKind::Qemu(QemuAccel::Tcg) => f.write_str("qemu/tcg"),
        }
    }
}

/// Why a VM could not be started or handled.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} {path:?} is not usable: {reason}")]
    BadPath {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("could not prepare the run directory {path:?}")]
    RunDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start {process} ({binary:?})")]
    Spawn {
        process: &'static str,
        binary: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{process} did not become ready within {timeout:?}: {detail}")]
    NotReady {
        process: &'static str,
        timeout: Duration,
        detail: String,
    },
    #[error("{exit}")]
    EndedEarly { exit: VmExit },
    #[error("waiting for the VM's processes failed")]
    Wait(#[source] std::io::Error),
}

/// How a pod VM ended: which of its processes ended first, and how.
#[derive(Clone, Debug)]
pub struct VmExit {
    /// The process whose end ended the VM (`crx-vmm`, `qemu`, `vhost-user-vsock`).
    pub process: &'static str,
    pub status: ProcessExit,
    /// True when the host asked for the stop (so a non-zero status is not a failure).
    pub requested: bool,
    /// The last lines that process wrote to its log, to explain a failure.
    pub log_tail: String,
}

impl VmExit {
    /// A VM that ended without the host asking, or not cleanly.
    pub fn is_failure(&self) -> bool {
        !self.requested && !self.status.success()
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.process, self.status)?;
        if self.requested {
            write!(f, " (stop requested)")?;
        }
        if !self.log_tail.is_empty() {
            write!(f, ": {}", self.log_tail.trim_end())?;
        }
        Ok(())
    }
}

/// A VMM implementation that can start pod VMs.
pub trait VmBackend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Starts the VM; returns once its processes run and the agent socket exists
    /// (the agent itself answers later: see `crate::vm` users' health wait).
    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>, VmError>;
}

/// A running pod VM. Dropping it stops every process it started and removes its
/// sockets.
pub trait Vm: Send {
    fn kind(&self) -> BackendKind;
    /// The hybrid-vsock Unix socket that reaches the guest (`CONNECT <port>\n`).
    fn agent_socket(&self) -> &Path;
    /// Process names and ids, for logs and figures.
    fn pids(&self) -> Vec<(&'static str, u32)>;
    /// Waits up to `timeout` for the VM to end by itself. When one of its processes
    /// ends, the others are stopped too, and the first one's end is returned.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError>;
    /// A descriptor per process whose end [`Vm::wait_timeout`] reports, each readable
    /// once its process has ended: a watcher polls them without holding the VM.
    fn exit_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>>;
    /// Stops the VM: SIGTERM to each process, SIGKILL to those still there after
    /// `grace`. Idempotent; returns how the VM ended.
    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError>;
    /// Host memory of the VM's processes right now.
    fn resources(&self) -> VmResources;
    /// When the VMM process itself (crx-vmm or QEMU) was spawned, and its log file:
    /// benchmarks read the time of the first guest instruction from that log.
    fn vmm_spawn(&self) -> (std::time::SystemTime, &Path);
    /// The VM's empty drive slots and how to fill them, in drive order.
    fn drive_slots(&self) -> Vec<DriveSlot> {
        Vec::new()
    }
}
