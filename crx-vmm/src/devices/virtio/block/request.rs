//! Parsing one virtio-blk request from a descriptor chain (virtio 1.2 §5.2.6).
//!
//! Layout: a device-readable 16-byte header (type, reserved, sector), zero or more
//! data descriptors, and a device-writable status byte last. Nothing here trusts the
//! guest: every descriptor must lie inside guest memory, be of the direction its role
//! needs, and the sector arithmetic is overflow-checked against the capacity later.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{
    SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Size of the request header the driver puts first.
pub const HEADER_SIZE: u32 = 16;

/// The request header as it lies in guest memory (little endian).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: plain old data with no padding (4 + 4 + 8 bytes); any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(v: u32) -> Self {
        match v {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// One guest data buffer: address and length, already checked to be in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct DataBuf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request whose buffers have all been checked (the status byte is located
/// separately, by [`status_of`]).
#[derive(Debug)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<DataBuf>,
    /// Sum of the data buffers' lengths.
    pub data_len: u64,
}

/// Why a chain is not a usable request. Unless the status byte itself is missing
/// (`Empty`, `BadStatus`), the device still answers IOERR through it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("last descriptor is not a device-writable status byte")]
    BadStatus,
    #[error("chain has no data or header before the status byte")]
    TooShort,
    #[error("header descriptor is device-writable or shorter than {HEADER_SIZE} bytes")]
    BadHeader,
    #[error("a descriptor lies outside guest memory")]
    OutOfMemory,
    #[error("a data descriptor has the wrong direction for the request type")]
    WrongDirection,
    #[error("cannot read the request header")]
    ReadHeader(#[source] vm_memory::GuestMemoryError),
}

fn in_memory(mem: &GuestMemoryMmap, d: &Descriptor) -> bool {
    mem.check_range(d.addr(), d.len() as usize)
}

/// The status byte of a chain, if its last descriptor can hold one.
pub fn status_of(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<GuestAddress, RequestError> {
    let last = descs.last().ok_or(RequestError::Empty)?;
    if !last.is_write_only() || last.len() < 1 || !mem.check_range(last.addr(), 1) {
        return Err(RequestError::BadStatus);
    }
    Ok(last.addr())
}

/// Parses the descriptors of one chain (as yielded by its iterator, so already
/// bounded to the queue size and to 4 GiB in total).
pub fn parse(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Request, RequestError> {
    status_of(mem, descs)?;
    let (header, rest) = descs.split_first().ok_or(RequestError::Empty)?;
    let Some((_, data)) = rest.split_last() else {
        return Err(RequestError::TooShort);
    };
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(RequestError::BadHeader);
    }
    if !in_memory(mem, header) {
        return Err(RequestError::OutOfMemory);
    }
    let hdr: RequestHeader = mem
        .read_obj(header.addr())
        .map_err(RequestError::ReadHeader)?;
    let kind = RequestType::from(u32::from_le(hdr.kind));
    let sector = u64::from_le(hdr.sector);
    let device_writes = match kind {
        RequestType::In | RequestType::GetId => true,
        RequestType::Out => false,
        // No data expected; any that came along is ignored, not touched.
        RequestType::Flush | RequestType::Unsupported(_) => {
            return Ok(Request {
                kind,
                sector,
                data: Vec::new(),
                data_len: 0,
            })
        }
    };
    let mut bufs = Vec::with_capacity(data.len());
    let mut data_len = 0u64;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(RequestError::WrongDirection);
        }
        if !in_memory(mem, d) {
            return Err(RequestError::OutOfMemory);
        }
        data_len += u64::from(d.len());
        bufs.push(DataBuf {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok(Request {
        kind,
        sector,
        data: bufs,
        data_len,
    })
}

/// The byte range `[offset, offset + len)` a sector-addressed transfer covers, if it
/// is whole sectors and fits within `capacity` sectors.
pub fn byte_range(sector: u64, len: u64, capacity: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    let end_sector = sector.checked_add(len / SECTOR_SIZE)?;
    if end_sector > capacity {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}
