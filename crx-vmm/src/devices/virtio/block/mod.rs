//! virtio-blk (device ID 2): one request queue over a raw file or host block device.
//!
//! Split by job:
//! - `request.rs`: turns a guest descriptor chain into a checked [`request::Request`]
//!   (header, data buffers, status byte); every length and address is verified;
//! - `backing.rs`: [`Backing`], the host file or block device, with positioned I/O and
//!   `fdatasync` for FLUSH;
//! - `device.rs`: [`Block`], the [`VirtioDevice`](super::VirtioDevice) with its config
//!   space, and [`BlockSlot`], the handle that swaps the backing at run time;
//! - `worker.rs`: [`RequestServer`], which runs one request against the current
//!   backing, and the `crx-blk` thread that serves the queue with it (the vhost-user
//!   back end in `crate::vhost_user::blk` uses the same server);
//! - `bench.rs`: [`bench::DirectBlock`], a guest-less driver for `crx-bench blk`.
//!
//! Behaviour the guest sees:
//! - Requests in any descriptor layout (§2.7.4): header, data and status split or
//!   combined however the driver likes.
//! - IN/OUT of whole 512-byte sectors within capacity; anything else (partial sectors,
//!   past the end, sector arithmetic that overflows, writes to a read-only drive, an
//!   empty slot) completes with IOERR; unknown request types with UNSUPP. Malformed
//!   chains are returned, with IOERR in the status byte if one could be located.
//! - FLUSH completes only after `fdatasync` on the backing returned. If the driver
//!   declines VIRTIO_BLK_F_FLUSH, every write is synced before it completes.
//! - GET_ID returns the serial given at construction (up to 20 bytes, zero-padded).
//! - A slot may be empty (capacity 0) and get its backing later through
//!   [`BlockSlot::replace_backing`]: this is how a CSI block volume reaches a running
//!   pod. The guest learns the new capacity from a configuration-change interrupt.

mod backing;
pub mod bench;
mod device;
mod request;
mod worker;

pub use backing::Backing;
pub use device::{Block, BlockSlot, ConfigChangeNotifier};
pub(crate) use device::{CONFIG_LEN, SEG_MAX_OFFSET};
pub(crate) use worker::RequestServer;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The one request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
pub(crate) const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

/// Bytes per virtio-blk sector, whatever the backing's own block size.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;

/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Feature: `seg_max` in config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: `blk_size` in config space is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// Feature: the device accepts FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types (virtio 1.2 §5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status values written into the status byte.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Why a block device could not be set up or its backing changed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open block backing {}", .path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot determine the size of block backing {}", .path.display())]
    Size {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("block backing {} is neither a regular file nor a block device", .0.display())]
    NotFileOrBlockDevice(std::path::PathBuf),
    #[error("block backing {} is open read-only but was attached writable", .0.display())]
    NotWritable(std::path::PathBuf),
    #[error("block device serial is {0} bytes; at most 20 are allowed")]
    SerialTooLong(usize),
    #[error("cannot flush the previous backing before replacing it")]
    FlushOld(#[source] std::io::Error),
    #[error("cannot raise the configuration-change interrupt")]
    Interrupt(#[source] std::io::Error),
}

#[cfg(test)]
mod tests;
