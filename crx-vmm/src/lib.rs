//! crx-vmm: a KVM micro-VM monitor built on rust-vmm crates.
//!
//! It boots a Linux guest directly (PVH `vmlinux`, bzImage as fallback), gives it
//! virtio-mmio devices, and knows nothing about containers: the shim drives it, the
//! guest's agent speaks to the host over the hybrid vsock socket.
//!
//! Map: `config` (what to run) → `host` (can this KVM run it) → `builder` (memory,
//! VM, devices, `boot` material, vCPUs from `vstate`, x86 details in `arch`) →
//! vCPU threads → `exit` (why it ended, which exit code). `cleanup` removes the
//! host files crx-vmm created even if it is killed.

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod cleanup;
pub mod clock;
pub mod config;
pub mod devices;
pub mod exit;
pub mod host;
pub mod jail;
pub mod kernel_map;
pub mod seccomp;
pub mod syscall;
pub mod vhost_user;
pub mod vstate;
