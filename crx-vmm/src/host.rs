//! What kind of KVM this host has, and whether a stock Linux guest can run on it.
//!
//! PVM ("Pagetable-based Virtual Machine", module `kvm_pvm`) provides `/dev/kvm` inside
//! cloud VMs without hardware nested virtualization. It runs PVM-aware guests, but a
//! stock guest kernel is emulated and its user space cannot run at all (the first
//! system call faults). crx-vmm detects it by the module's sysfs directory
//! (`/sys/module/kvm_pvm`, present whether built in or loaded), and names hardware KVM
//! by the CPU's `vmx`/`svm` flag or a `kvm_intel`/`kvm_amd` module. A KVM that is
//! neither is refused like PVM: without vmx/svm it cannot be hardware-assisted.

use std::path::Path;

use crate::vstate::kvm::KvmHandle;

/// The kind of KVM behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware-assisted KVM (Intel VT-x or AMD-V).
    Hardware,
    /// PVM: software (shadow-paging) KVM that cannot run a stock guest's user space.
    Pvm,
    /// KVM works, but neither hardware virtualization nor PVM was recognized: treated
    /// like PVM (not usable for Linux), since KVM without vmx/svm is software KVM.
    Unknown,
}

impl KvmFlavor {
    pub fn as_str(self) -> &'static str {
        match self {
            KvmFlavor::Hardware => "hardware",
            KvmFlavor::Pvm => "pvm",
            KvmFlavor::Unknown => "unknown",
        }
    }
}

/// The verdict on this host's KVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostKvm {
    /// `/dev/kvm` opened and has every capability crx-vmm needs.
    pub kvm_usable: bool,
    /// None when KVM is not usable at all.
    pub flavor: Option<KvmFlavor>,
    /// A stock Linux guest (crx's guest) can boot to user space here.
    pub usable_for_linux: bool,
    /// One line: why, in words a user can act on.
    pub reason: String,
}

/// Why a PVM host cannot run crx's guest, without the advice for crx-vmm's own CLI.
pub const PVM_CAUSE: &str = "this host's KVM is PVM (kvm_pvm, pagetable-based virtual machine), which cannot run a stock Linux guest's user space (its first system call faults)";

/// Why a KVM without hardware virtualization cannot run crx's guest.
pub const UNKNOWN_CAUSE: &str = "KVM works but this CPU shows no hardware virtualization (no vmx/svm flag in /proc/cpuinfo, no kvm_intel/kvm_amd module)";

/// The one line printed when crx-vmm refuses to boot on PVM.
pub const PVM_REASON: &str = "this host's KVM is PVM (kvm_pvm, pagetable-based virtual machine), which cannot run a stock Linux guest's user space (its first system call faults): run pods on the QEMU backend (hypervisor = \"qemu\" or \"auto\"), or pass --allow-pvm to boot anyway";

/// Whether the running kernel provides KVM through PVM.
pub fn is_pvm(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// Whether /proc/cpuinfo-style `cpuinfo` lists hardware virtualization.
pub fn has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

/// The one line printed when KVM works but is neither hardware-assisted nor PVM.
pub const UNKNOWN_REASON: &str = "KVM works but this CPU shows no hardware virtualization (no vmx/svm flag in /proc/cpuinfo, no kvm_intel/kvm_amd module): likely a software KVM that cannot run a stock Linux guest; run pods on the QEMU backend, or pass --allow-pvm to boot anyway (is /proc mounted?)";

/// Classifies a KVM that opened fine, from the kernel's module directory
/// (`/sys/module`) and the CPU flags (`/proc/cpuinfo`).
pub fn classify(sys_module: &Path, cpuinfo: &str) -> HostKvm {
    if is_pvm(sys_module) {
        return HostKvm {
            kvm_usable: true,
            flavor: Some(KvmFlavor::Pvm),
            usable_for_linux: false,
            reason: PVM_REASON.to_owned(),
        };
    }
    let hardware_module = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| sys_module.join(m).exists());
    if hardware_module || has_hardware_virtualization(cpuinfo) {
        return HostKvm {
            kvm_usable: true,
            flavor: Some(KvmFlavor::Hardware),
            usable_for_linux: true,
            reason: "hardware-assisted KVM".to_owned(),
        };
    }
    HostKvm {
        kvm_usable: true,
        flavor: Some(KvmFlavor::Unknown),
        usable_for_linux: false,
        reason: UNKNOWN_REASON.to_owned(),
    }
}

/// Probes `kvm_device` (normally `/dev/kvm`) and the running kernel.
pub fn probe_device(kvm_device: &Path) -> HostKvm {
    if let Err(e) = KvmHandle::open(kvm_device) {
        return HostKvm {
            kvm_usable: false,
            flavor: None,
            usable_for_linux: false,
            reason: e.to_string(),
        };
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(Path::new("/sys/module"), &cpuinfo)
}

/// Probes `/dev/kvm`.
pub fn probe() -> HostKvm {
    probe_device(Path::new("/dev/kvm"))
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl HostKvm {
    /// The cause alone (no advice about crx-vmm flags), for callers that choose a
    /// backend themselves, like the shim.
    pub fn cause(&self) -> &str {
        match self.flavor {
            Some(KvmFlavor::Pvm) => PVM_CAUSE,
            Some(KvmFlavor::Unknown) => UNKNOWN_CAUSE,
            _ => &self.reason,
        }
    }

    /// One-line JSON: `{"kvm_usable":..,"flavor":..,"usable_for_linux":..,"reason":..}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"kvm_usable\":{},\"flavor\":{},\"usable_for_linux\":{},\"reason\":{}}}",
            self.kvm_usable,
            self.flavor
                .map_or("null".to_owned(), |f| json_string(f.as_str())),
            self.usable_for_linux,
            json_string(&self.reason)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_wins_over_cpu_flags() {
        let dir = std::env::temp_dir().join(format!("crx-host-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        let v = classify(&dir, "flags\t: fpu svm\n");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(v.flavor, Some(KvmFlavor::Pvm));
        assert!(!v.usable_for_linux);
        assert!(v.reason.contains("QEMU backend"));
        // The reason is the cause plus advice; the cause alone carries no crx-vmm flags.
        assert!(v.reason.starts_with(v.cause()) && !v.cause().contains("--allow-pvm"));
    }

    #[test]
    fn hardware_flags_are_recognized() {
        let none = Path::new("/nonexistent-sys-module");
        assert_eq!(
            classify(none, "flags\t\t: fpu vme svm lm\n").flavor,
            Some(KvmFlavor::Hardware)
        );
        assert_eq!(
            classify(none, "flags\t\t: fpu vmx\n").flavor,
            Some(KvmFlavor::Hardware)
        );
        let dir = std::env::temp_dir().join(format!("crx-host-amd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        let v = classify(&dir, "");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            v.flavor,
            Some(KvmFlavor::Hardware),
            "module alone, /proc not mounted"
        );
        let unknown = classify(none, "flags\t\t: fpu hypervisor\n");
        assert_eq!(unknown.flavor, Some(KvmFlavor::Unknown));
        assert!(
            !unknown.usable_for_linux,
            "software KVM is not trusted with Linux"
        );
        assert!(unknown.reason.contains("QEMU backend"));
    }

    #[test]
    fn json_is_one_escaped_line() {
        let v = HostKvm {
            kvm_usable: false,
            flavor: None,
            usable_for_linux: false,
            reason: "a \"b\"\n".into(),
        };
        assert_eq!(
            v.to_json(),
            r#"{"kvm_usable":false,"flavor":null,"usable_for_linux":false,"reason":"a \"b\"\u000a"}"#
        );
    }

    #[test]
    fn probe_agrees_with_the_running_kernel() {
        // The development and CI machines run KVM through PVM (DESIGN.md): there the
        // verdict must be "pvm, not usable"; on hardware KVM, "hardware, usable".
        let v = probe();
        assert!(v.kvm_usable, "{}", v.reason);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(v.flavor, Some(KvmFlavor::Pvm), "{}", v.reason);
            assert!(!v.usable_for_linux);
        } else {
            assert_eq!(v.flavor, Some(KvmFlavor::Hardware), "{}", v.reason);
            assert!(v.usable_for_linux);
        }
    }
}
