//! crx-vmm: a KVM micro-VM monitor built on rust-vmm crates.
//!
//! It boots a Linux guest directly (PVH `vmlinux`, bzImage as fallback), gives it
//! virtio-mmio devices, and knows nothing about containers: the shim drives it, the
//! guest's agent speaks to the host over the hybrid vsock socket.

pub mod devices;
