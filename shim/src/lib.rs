//! Library side of `containerd-shim-crx-v2`: what the shim binary, the integration
//! tests and `crx-bench` share.

pub mod config;
pub mod mounts;
pub mod network;
pub mod vm;
