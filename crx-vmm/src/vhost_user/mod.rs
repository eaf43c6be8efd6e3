//! crx's device back ends served over vhost-user, for QEMU (the `qemu` VM backend on
//! hosts where crx-vmm cannot run guests). Same device code as in process.

pub mod fs;
pub mod vsock;

pub use fs::{serve_vhost_user_fs, VhostUserFsBackend, VhostUserFsError};
pub use vsock::{serve_vhost_user_vsock, VhostUserVsockBackend, VhostUserVsockError};
