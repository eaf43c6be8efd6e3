//! The KVM system fd: opening `/dev/kvm` with errors a user can act on, and checking
//! that this KVM has everything crx-vmm relies on.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every supported kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{} does not exist: this host has no KVM; enable hardware virtualization and load kvm_intel or kvm_amd, or use the QEMU backend", .0.display())]
    NotFound(PathBuf),
    #[error("no permission to open {}: run crx-vmm as root or as a member of the group that owns it (usually `kvm`)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot open {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM API version is {0}, crx-vmm needs {KVM_API_VERSION}: this host kernel's KVM is not supported")]
    ApiVersion(i32),
    #[error(
        "this KVM lacks {0}, which crx-vmm needs: use a newer host kernel or the QEMU backend"
    )]
    MissingCapability(&'static str),
    #[error("cannot read the CPUID features KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// Capabilities crx-vmm cannot run without, with the names users search for.
pub const REQUIRED_CAPABILITIES: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
];

/// The first required capability `has` says is missing.
pub fn first_missing_capability(has: impl Fn(Cap) -> bool) -> Option<&'static str> {
    REQUIRED_CAPABILITIES
        .iter()
        .find(|(cap, _)| !has(*cap))
        .map(|(_, name)| *name)
}

/// An open, checked KVM system fd.
pub struct KvmHandle {
    kvm: Kvm,
    /// KVM_GET_SUPPORTED_CPUID does not change while we run; every vCPU needs it.
    supported_cpuid: std::sync::OnceLock<CpuId>,
}

impl KvmHandle {
    /// Opens `path` (normally `/dev/kvm`) and checks the API version and capabilities.
    pub fn open(path: &Path) -> Result<Self, KvmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => KvmError::NotFound(path.to_owned()),
                ErrorKind::PermissionDenied => KvmError::PermissionDenied(path.to_owned()),
                _ => KvmError::Open {
                    path: path.to_owned(),
                    source: e,
                },
            })?;
        // SAFETY: the fd was just opened by us and ownership moves into `Kvm`.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(KvmError::ApiVersion(version));
        }
        if let Some(name) = first_missing_capability(|cap| kvm.check_extension(cap)) {
            return Err(KvmError::MissingCapability(name));
        }
        Ok(Self {
            kvm,
            supported_cpuid: std::sync::OnceLock::new(),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// CPUID entries KVM can present to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid.clone());
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid).clone())
    }

    /// Whether the in-kernel LAPIC offers the TSC-deadline timer.
    pub fn has_tsc_deadline(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_first_missing_capability_by_name() {
        assert_eq!(first_missing_capability(|_| true), None);
        assert_eq!(
            first_missing_capability(|cap| !matches!(cap, Cap::Irqfd | Cap::Pit2)),
            Some("KVM_CAP_IRQFD")
        );
    }

    #[test]
    fn missing_device_and_missing_permission_are_told_apart() {
        let err = KvmHandle::open(Path::new("/nonexistent/kvm"))
            .err()
            .unwrap();
        assert!(matches!(err, KvmError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/kvm does not exist"));
    }
}
