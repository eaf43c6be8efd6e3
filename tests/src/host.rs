//! What this host's KVM can do, as the tests and benchmarks need to know it.

/// True when `/dev/kvm` is hardware-assisted KVM that runs a stock Linux guest's user
/// space (not PVM, which cannot).
pub fn kvm_runs_linux_guests() -> bool {
    std::path::Path::new("/dev/kvm").exists() && !std::path::Path::new("/sys/module/kvm_pvm").exists()
}
