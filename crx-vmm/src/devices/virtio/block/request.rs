//! Parsing one virtio-blk request from a descriptor chain (virtio 1.2 §5.2.6).
//!
//! A request is a device-readable byte stream (16-byte header, then the data of an OUT)
//! followed by a device-writable one (the data of an IN or GET_ID, then the status byte
//! last). How the driver cuts those streams into descriptors is its business (§2.7.4,
//! message framing): Linux uses one descriptor for the header, one per data segment and
//! one for the status, but a header split in two, a header sharing a descriptor with
//! OUT data, or IN data sharing one with the status byte are just as valid, and all are
//! parsed here. Nothing trusts the guest: every descriptor must lie inside guest memory,
//! readable ones must all come before writable ones, and the sector arithmetic is
//! overflow-checked against the capacity later (`byte_range`).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{
    SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Size of the request header the driver puts first.
pub const HEADER_SIZE: u32 = 16;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    #[error("last descriptor is not a device-writable status byte inside guest memory")]
    BadStatus,
    #[error("device-readable part is {0} bytes, shorter than the {HEADER_SIZE}-byte header")]
    BadHeader(u64),
    #[error("a descriptor lies outside guest memory")]
    OutOfMemory,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request carries data in the wrong direction for its type")]
    WrongDirection,
    #[error("cannot read the request header")]
    ReadHeader(#[source] vm_memory::GuestMemoryError),
}

/// The status byte of a chain: the last byte of its last descriptor, which must be
/// device-writable and inside guest memory.
pub fn status_of(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<GuestAddress, RequestError> {
    let last = descs.last().ok_or(RequestError::Empty)?;
    if !last.is_write_only() || last.len() < 1 {
        return Err(RequestError::BadStatus);
    }
    let addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(RequestError::BadStatus)?;
    if !mem.check_range(addr, 1) {
        return Err(RequestError::BadStatus);
    }
    Ok(addr)
}

/// The chain as two checked streams: readable segments, then writable ones with the
/// status byte already cut off the end.
struct Streams {
    readable: Vec<DataBuf>,
    writable: Vec<DataBuf>,
}

fn streams(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Streams, RequestError> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::OutOfMemory);
        }
        let buf = DataBuf {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(buf);
        } else if writable.is_empty() {
            readable.push(buf);
        } else {
            return Err(RequestError::ReadableAfterWritable);
        }
    }
    // `status_of` checked the last descriptor is writable with at least one byte.
    if let Some(last) = writable.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            writable.pop();
        }
    }
    readable.retain(|b| b.len > 0);
    writable.retain(|b| b.len > 0);
    Ok(Streams { readable, writable })
}

fn total(bufs: &[DataBuf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// `bufs` without their first `skip` bytes (which must not exceed their total).
fn skip_bytes(bufs: &[DataBuf], mut skip: u64) -> Vec<DataBuf> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= u32::MAX, so both casts are lossless and the add stays inside
        // the descriptor, which is inside guest memory.
        out.push(DataBuf {
            addr: b.addr.unchecked_add(skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    out
}

/// Gathers the 16 header bytes from the first readable segments.
fn read_header(mem: &GuestMemoryMmap, bufs: &[DataBuf]) -> Result<[u8; 16], RequestError> {
    let mut hdr = [0u8; HEADER_SIZE as usize];
    let mut filled = 0usize;
    for b in bufs {
        if filled == hdr.len() {
            break;
        }
        let n = (hdr.len() - filled).min(b.len as usize);
        mem.read_slice(&mut hdr[filled..filled + n], b.addr)
            .map_err(RequestError::ReadHeader)?;
        filled += n;
    }
    Ok(hdr)
}

/// Parses the descriptors of one chain (as yielded by its iterator, so already
/// bounded to the queue size and to 4 GiB in total).
pub fn parse(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Request, RequestError> {
    status_of(mem, descs)?;
    let Streams { readable, writable } = streams(mem, descs)?;
    let readable_len = total(&readable);
    if readable_len < u64::from(HEADER_SIZE) {
        return Err(RequestError::BadHeader(readable_len));
    }
    let hdr = read_header(mem, &readable)?;
    let mut kind_bytes = [0u8; 4];
    kind_bytes.copy_from_slice(&hdr[0..4]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let kind = RequestType::from(u32::from_le_bytes(kind_bytes));
    let sector = u64::from_le_bytes(sector_bytes);
    let out_data = skip_bytes(&readable, u64::from(HEADER_SIZE));
    let data = match kind {
        RequestType::In | RequestType::GetId => {
            if !out_data.is_empty() {
                return Err(RequestError::WrongDirection);
            }
            writable
        }
        RequestType::Out => {
            if !writable.is_empty() {
                return Err(RequestError::WrongDirection);
            }
            out_data
        }
        // No data expected; any that came along is ignored, not touched.
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    let data_len = total(&data);
    Ok(Request {
        kind,
        sector,
        data,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use virtio_queue::desc::split::Descriptor;

    const W: u16 = 2;

    fn mem_with_header(kind: u32, sector: u64) -> GuestMemoryMmap {
        let mem = guest_memory(0x10000);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x1000)).unwrap();
        mem
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn buf(addr: u64, len: u32) -> DataBuf {
        DataBuf {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn header_split_in_two_then_data_then_status() {
        let mem = mem_with_header(VIRTIO_BLK_T_IN, 7);
        let descs = [
            d(0x1000, 8, 0),
            d(0x1008, 8, 0),
            d(0x2000, 512, W),
            d(0x3000, 1, W),
        ];
        let req = parse(&mem, &descs).unwrap();
        assert_eq!((req.kind, req.sector), (RequestType::In, 7));
        assert_eq!(req.data, vec![buf(0x2000, 512)]);
        assert_eq!(status_of(&mem, &descs).unwrap(), GuestAddress(0x3000));
    }

    #[test]
    fn header_and_out_data_share_a_descriptor() {
        let mem = mem_with_header(VIRTIO_BLK_T_OUT, 3);
        let descs = [d(0x1000, 16 + 1024, 0), d(0x3000, 1, W)];
        let req = parse(&mem, &descs).unwrap();
        assert_eq!(req.kind, RequestType::Out);
        assert_eq!(req.data, vec![buf(0x1010, 1024)]);
        assert_eq!(req.data_len, 1024);
    }

    #[test]
    fn in_data_and_status_share_a_descriptor() {
        let mem = mem_with_header(VIRTIO_BLK_T_IN, 0);
        let descs = [d(0x1000, 16, 0), d(0x2000, 512, W), d(0x4000, 513, W)];
        let req = parse(&mem, &descs).unwrap();
        assert_eq!(req.data, vec![buf(0x2000, 512), buf(0x4000, 512)]);
        assert_eq!(req.data_len, 1024);
        assert_eq!(status_of(&mem, &descs).unwrap(), GuestAddress(0x4200));
    }

    #[test]
    fn everything_readable_in_one_and_status_alone() {
        let mem = mem_with_header(VIRTIO_BLK_T_FLUSH, 0);
        let req = parse(&mem, &[d(0x1000, 16, 0), d(0x3000, 1, W)]).unwrap();
        assert_eq!(req.kind, RequestType::Flush);
        assert!(req.data.is_empty());
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mem = mem_with_header(VIRTIO_BLK_T_IN, 0);
        // Readable after writable.
        let e = parse(
            &mem,
            &[
                d(0x1000, 16, 0),
                d(0x2000, 8, W),
                d(0x1000, 8, 0),
                d(0x3000, 1, W),
            ],
        );
        assert!(matches!(e, Err(RequestError::ReadableAfterWritable)));
        // Header bytes missing (8 readable bytes only).
        let e = parse(&mem, &[d(0x1000, 8, 0), d(0x3000, 1, W)]);
        assert!(matches!(e, Err(RequestError::BadHeader(8))));
        // IN with readable data after the header.
        let e = parse(&mem, &[d(0x1000, 16 + 512, 0), d(0x3000, 1, W)]);
        assert!(matches!(e, Err(RequestError::WrongDirection)));
        // Status descriptor of length 0, or past the end of memory.
        assert!(matches!(
            status_of(&mem, &[d(0x1000, 16, 0), d(0x3000, 0, W)]),
            Err(RequestError::BadStatus)
        ));
        assert!(matches!(
            status_of(&mem, &[d(0xffff, 2, W)]),
            Err(RequestError::BadStatus)
        ));
        // Address arithmetic at the top of the address space.
        assert!(matches!(
            status_of(&mem, &[d(u64::MAX, 2, W)]),
            Err(RequestError::BadStatus)
        ));
        // A data descriptor outside memory.
        let mem = mem_with_header(VIRTIO_BLK_T_OUT, 0);
        let e = parse(
            &mem,
            &[d(0x1000, 16, 0), d(1 << 40, 512, 0), d(0x3000, 1, W)],
        );
        assert!(matches!(e, Err(RequestError::OutOfMemory)));
        // OUT with writable data before the status.
        let e = parse(
            &mem,
            &[d(0x1000, 16, 0), d(0x2000, 512, W), d(0x3000, 1, W)],
        );
        assert!(matches!(e, Err(RequestError::WrongDirection)));
    }
}
