//! What a pod VM is made of, as the shim derives it from the sandbox spec.

use std::path::{Path, PathBuf};

use super::VmError;

/// Where the guest's serial console goes. Off by default: a console costs boot time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    #[default]
    Off,
    File(PathBuf),
}

/// One pod VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Short name for process titles and logs (the sandbox id).
    pub name: String,
    /// Private directory of this VM's sockets and logs (e.g. `/run/crx/<sandbox>`),
    /// created if missing.
    pub run_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to the backend's own kernel command line (agent options).
    pub kernel_cmdline: String,
    pub serial: SerialOutput,
    /// The `crx-vmm` binary: the VMM itself, and the vhost-user back ends for QEMU.
    pub crx_vmm_binary: PathBuf,
    pub qemu_binary: PathBuf,
    /// The pod's devices besides the agent's vsock.
    pub devices: VmDevices,
}

/// The devices a pod VM gets besides vsock. Both backends give the guest the same
/// devices in the same order, so the guest sees the same VM whichever VMM runs it.
#[derive(Clone, Debug, Default)]
pub struct VmDevices {
    /// virtio-fs shares, served by crx's own back end (in crx-vmm, or as a
    /// vhost-user-fs process for QEMU).
    pub shares: Vec<SharedDir>,
    /// virtio-blk drives, in slot order (the guest sees /dev/vda, /dev/vdb, ...).
    pub drives: Vec<Drive>,
    /// The pod's NIC.
    pub net: Option<NetDevice>,
    /// A virtio-rng device.
    pub rng: bool,
}

/// A host directory the guest mounts with `mount -t virtiofs <tag> <dir>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDir {
    pub tag: String,
    pub host_dir: PathBuf,
}

/// A virtio-blk drive; `path: None` is an empty slot filled after boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    pub path: Option<PathBuf>,
    pub read_only: bool,
    /// Serial number the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    pub serial: String,
}

/// The pod's NIC: an open tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, created by the
/// caller in the pod's network namespace), and the MAC and MTU the guest NIC gets.
#[derive(Clone, Debug)]
pub struct NetDevice {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// Smallest guest that boots our kernel and agent with room for a container.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The guest CID the agent listens on. Each VM has its own vsock device, so every pod
/// can use the same one.
pub const GUEST_CID: u64 = 3;

impl VmConfig {
    /// The hybrid-vsock socket of this VM.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.vsock")
    }

    /// Checks what can be checked before any process starts, so a bad config fails
    /// with its cause rather than as a VMM that died.
    pub fn validate(&self) -> Result<(), VmError> {
        readable_file("guest kernel", &self.kernel)?;
        readable_file("guest initramfs", &self.initramfs)?;
        executable("crx-vmm binary", &self.crx_vmm_binary)?;
        if self.vcpus == 0 {
            return Err(VmError::InvalidConfig("a VM needs at least 1 vCPU".into()));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(VmError::InvalidConfig(format!(
                "{} MiB of guest memory is below the {MIN_MEMORY_MIB} MiB the guest needs",
                self.memory_mib
            )));
        }
        if self.kernel_cmdline.contains('\n') {
            return Err(VmError::InvalidConfig(
                "the kernel command line must be one line".into(),
            ));
        }
        Ok(())
    }

    /// Creates the run directory (mode 0700) and clears sockets a dead VM left there.
    pub fn prepare_run_dir(&self) -> Result<(), VmError> {
        use std::os::unix::fs::DirBuilderExt;
        let err = |source| VmError::RunDir {
            path: self.run_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir)
            .map_err(err)?;
        for stale in [self.agent_socket(), self.run_dir.join("vhost-vsock.sock")] {
            match std::fs::remove_file(&stale) {
                Ok(()) => {
                    tracing::warn!(path = ?stale, "removed a socket a previous VM left behind")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    }
}

fn readable_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    let bad = |reason: String| VmError::BadPath {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

pub(super) fn executable(what: &'static str, path: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |reason: String| VmError::BadPath {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not an executable file".into()));
    }
    Ok(())
}
