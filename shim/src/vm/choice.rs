//! `hypervisor = "auto" | "crx-vmm" | "qemu"`: which VMM runs the pods of this host,
//! and why. The answer depends on whether this host's KVM can run a stock guest's user
//! space: hardware KVM can; PVM (KVM on shadow paging inside cloud VMs) cannot.

use super::{BackendKind, Confinement, QemuAccel};

/// The operator's choice, from the crx configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hypervisor {
    #[default]
    Auto,
    CrxVmm,
    Qemu,
}

impl std::str::FromStr for Hypervisor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Hypervisor::Auto),
            "crx-vmm" => Ok(Hypervisor::CrxVmm),
            "qemu" => Ok(Hypervisor::Qemu),
            other => Err(format!(
                "unknown hypervisor {other:?}: expected \"auto\", \"crx-vmm\" or \"qemu\""
            )),
        }
    }
}

/// What KVM on this host can do for a Linux guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmVerdict {
    /// Hardware-assisted KVM: guest kernel and user space run natively.
    Usable,
    /// `/dev/kvm` exists but cannot run a stock guest's user space (e.g. PVM).
    Unusable(String),
    /// No `/dev/kvm`, or no access to it.
    Missing(String),
}

/// Asks crx-vmm's host probe what this host's KVM can do for a Linux guest.
pub fn probe_kvm() -> KvmVerdict {
    let host = crx_vmm::host::probe();
    if host.usable_for_linux {
        KvmVerdict::Usable
    } else if host.kvm_usable {
        KvmVerdict::Unusable(host.cause().to_owned())
    } else {
        KvmVerdict::Missing(host.cause().to_owned())
    }
}

/// The backend picked, with the reason to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: BackendKind,
    pub reason: String,
}

/// What TCG costs, said plainly in the log whenever it is picked.
pub const TCG_COST: &str = "QEMU TCG emulates the CPU in software: guest code runs several \
times slower and a pod takes seconds, not milliseconds, to start; use a host with hardware \
KVM for production speed";

/// Picks the backend for `wanted` given what KVM can do here.
pub fn choose_backend(wanted: Hypervisor, kvm: &KvmVerdict) -> Result<BackendChoice, String> {
    let tcg = |why: &str| BackendChoice {
        kind: BackendKind::Qemu(QemuAccel::Tcg),
        reason: format!("{why}; using QEMU with TCG. {TCG_COST}"),
    };
    match (wanted, kvm) {
        (Hypervisor::Auto, KvmVerdict::Usable) => Ok(BackendChoice {
            kind: BackendKind::CrxVmm,
            reason: "hardware KVM is usable: using crx-vmm".into(),
        }),
        (Hypervisor::Auto | Hypervisor::Qemu, KvmVerdict::Unusable(why) | KvmVerdict::Missing(why)) => {
            Ok(tcg(why))
        }
        (Hypervisor::Qemu, KvmVerdict::Usable) => Ok(BackendChoice {
            kind: BackendKind::Qemu(QemuAccel::Kvm),
            reason: "hypervisor = \"qemu\" and KVM is usable: using QEMU with KVM".into(),
        }),
        (Hypervisor::CrxVmm, KvmVerdict::Usable) => Ok(BackendChoice {
            kind: BackendKind::CrxVmm,
            reason: "hypervisor = \"crx-vmm\"".into(),
        }),
        (Hypervisor::CrxVmm, KvmVerdict::Unusable(why) | KvmVerdict::Missing(why)) => Err(format!(
            "hypervisor = \"crx-vmm\" but {why}; set hypervisor = \"auto\" or \"qemu\" to run pods on QEMU"
        )),
    }
}

/// Probes this host, picks the backend for `wanted` and logs the choice with its reason
/// (a warning when it is TCG, whose cost the operator should see).
pub fn select_backend(
    wanted: Hypervisor,
) -> Result<(Box<dyn super::VmBackend>, BackendChoice), String> {
    select_confined_backend(wanted, Confinement::default())
}

/// [`select_backend`], with the backend confining its crx-vmm processes.
pub fn select_confined_backend(
    wanted: Hypervisor,
    confinement: Confinement,
) -> Result<(Box<dyn super::VmBackend>, BackendChoice), String> {
    let choice = choose_backend(wanted, &probe_kvm())?;
    if choice.kind == BackendKind::Qemu(QemuAccel::Tcg) {
        tracing::warn!(backend = %choice.kind, ?wanted, "{}", choice.reason);
    } else {
        tracing::info!(backend = %choice.kind, ?wanted, "{}", choice.reason);
    }
    Ok((backend_for(choice.kind, confinement), choice))
}

/// The backend of `kind`, confining its crx-vmm processes as `confinement` says.
pub fn backend_for(kind: BackendKind, confinement: Confinement) -> Box<dyn super::VmBackend> {
    match kind {
        BackendKind::CrxVmm => Box::new(super::CrxVmmBackend {
            confinement,
            ..Default::default()
        }),
        BackendKind::Qemu(accel) => Box::new(super::QemuBackend {
            confinement,
            ..super::QemuBackend::new(accel)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_crx_vmm_and_falls_back_to_tcg_with_the_reason() {
        let c = choose_backend(Hypervisor::Auto, &KvmVerdict::Usable).unwrap();
        assert_eq!(c.kind, BackendKind::CrxVmm);
        let c = choose_backend(
            Hypervisor::Auto,
            &KvmVerdict::Unusable("this KVM is PVM".into()),
        )
        .unwrap();
        assert_eq!(c.kind, BackendKind::Qemu(QemuAccel::Tcg));
        assert!(
            c.reason.contains("this KVM is PVM") && c.reason.contains("TCG"),
            "{}",
            c.reason
        );
        let c = choose_backend(Hypervisor::Qemu, &KvmVerdict::Usable).unwrap();
        assert_eq!(c.kind, BackendKind::Qemu(QemuAccel::Kvm));
    }

    #[test]
    fn crx_vmm_without_kvm_is_an_error_naming_the_fix() {
        let e = choose_backend(
            Hypervisor::CrxVmm,
            &KvmVerdict::Missing("/dev/kvm does not exist".into()),
        )
        .unwrap_err();
        assert!(
            e.contains("/dev/kvm does not exist") && e.contains("\"qemu\""),
            "{e}"
        );
        assert!("kvm".parse::<Hypervisor>().is_err());
        assert_eq!("qemu".parse::<Hypervisor>(), Ok(Hypervisor::Qemu));
    }
}
