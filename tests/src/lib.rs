//! Shared helpers of the crx integration tests and benchmarks.

pub mod artifacts;
pub mod bench;
pub mod containerd;
pub mod cri;
pub mod guest_pod;
pub mod l1;
pub mod test_guest;
pub mod vm_harness;
