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
