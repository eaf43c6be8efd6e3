//! Thin wrappers over the KVM ioctls crx-vmm uses: the system fd, the VM, its memory,
//! its vCPUs and their binary statistics.

pub mod kvm;
pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vm;
