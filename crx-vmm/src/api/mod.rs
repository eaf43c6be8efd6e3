//! The control socket (`--api-socket PATH`): attaching, replacing or removing a
//! virtio-blk drive's backing while the VM runs. This is how a CSI block volume
//! reaches a running pod.
//!
//! Wire format (`protocol`): a Unix stream socket; each request is one line of JSON,
//! at most [`protocol::MAX_LINE`] bytes, and gets one line back:
//! - `{"attach_drive":{"index":1,"read_only":false}}` with the new backing's open fd
//!   passed as SCM_RIGHTS ancillary data on the same message. No host path crosses the
//!   socket, so it works from outside crx-vmm's jail. Reply `{"ok":true,
//!   "capacity_sectors":N}`; the guest gets a configuration-change interrupt.
//! - `{"detach_drive":{"index":1}}`: the slot becomes empty (capacity 0) after its old
//!   backing is flushed.
//! - Any failure: `{"ok":false,"error":"<cause>"}`, and the drive is left as it was.
//!
//! `server` runs the `crx-api` thread (started through
//! [`DeviceThread`](crate::devices::virtio::device_thread::DeviceThread), so it gets
//! the same seccomp treatment as device threads); `client` is what the shim and the
//! tests call.

pub mod client;
pub mod protocol;
mod server;

pub use server::{ApiError, ApiServer, DriveHandle};

#[cfg(test)]
mod tests;
