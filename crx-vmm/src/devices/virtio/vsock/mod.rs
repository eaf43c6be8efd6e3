//! virtio-vsock (device ID 19) with crx's hybrid Unix-socket back end.
//!
//! Split by job:
//! - `csm/`: one connection's state machine (handshake ops, credit flow control both
//!   ways, half-close, RST), independent of where the packets come from;
//! - `unix/`: the host side, [`VsockMuxer`]: the listening Unix socket with its
//!   `CONNECT <port>\n` / `OK <hostport>\n` handshake, guest connections to
//!   `<uds_path>_<port>`, and one epoll fd for all of it. It never touches a virtqueue,
//!   so the same code serves crx-vmm in process and the vhost-user back end for QEMU;
//! - `device.rs` + `event_loop.rs`: the [`VirtioDevice`](super::VirtioDevice) and the
//!   `crx-vsock` thread that moves packets between the queues and the muxer.
//!
//! Everything the guest writes is untrusted: packets are bounded
//! ([`MAX_PKT_DATA`]), addressed packets are checked against the guest's CID, and
//! every connection's buffer is bounded by the credit it advertises.
//!
//! Behaviour a host user sees:
//! - Host-initiated: connect to `uds_path`, write `CONNECT <port>\n` (decimal, at most
//!   32 bytes with the newline, within 5 s, else the stream is closed). The guest gets
//!   a REQUEST from an ephemeral host port (≥ 2^30); on its RESPONSE the client reads
//!   `OK <hostport>\n` and the stream carries the guest's bytes. If the guest answers
//!   RST, or nothing within 5 s, the stream is closed without a line.
//! - Guest-initiated to host port P: connected (non-blocking) to `<uds_path>_P`; RST to
//!   the guest if nothing listens there or its backlog is full.
//! - Half-close works both ways: the host's `shutdown(SHUT_WR)` (or close) becomes a
//!   SHUTDOWN(SEND) to the guest; the guest's SHUTDOWN(SEND) becomes `shutdown(SHUT_WR)`
//!   on the host stream once its buffered bytes are written. A guest closing both ways
//!   gets the RST Linux waits for; any protocol error resets the connection.
//! - Limits ([`MuxerConfig`]): 1024 connections, 64 pending handshakes, 256 KiB of
//!   guest→host buffer per connection ([`CONN_TX_BUF_SIZE`], the advertised credit);
//!   host→guest bytes are read only into rx buffers the guest gave, within its credit.

use std::path::PathBuf;

mod csm;
mod device;
mod event_loop;
mod unix;

#[doc(hidden)]
pub mod bench;

pub use device::Vsock;
pub use unix::{MuxerConfig, VsockMuxer};

/// virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID, the only destination the guest may address.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet, in either direction.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Per-connection buffer for guest→host bytes the host socket has not taken yet; also
/// the credit (`buf_alloc`) advertised to the guest.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Queue sizes: rx, tx, event.
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 16];

// virtio 1.2 §5.10.6: packet types, operations and shutdown flags.
pub const VSOCK_TYPE_STREAM: u16 = 1;
pub const VSOCK_OP_REQUEST: u16 = 1;
pub const VSOCK_OP_RESPONSE: u16 = 2;
pub const VSOCK_OP_RST: u16 = 3;
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VSOCK_OP_RW: u16 = 5;
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;
/// The sender will receive no more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// Why the vsock device or its muxer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {0} already exists (another VM, or a stale socket to remove)")]
    PathExists(PathBuf),
    #[error("directory for vsock socket {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("vsock socket path {0} is too long for a Unix socket (max 107 bytes, incl. `_<port>` suffixes)")]
    PathTooLong(PathBuf),
    #[error("cannot bind vsock socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest CID {0} is reserved (must be 3..=0xffff_fffe)")]
    InvalidCid(u64),
    #[error("cannot set up the muxer's event plumbing")]
    Events(#[source] std::io::Error),
}
