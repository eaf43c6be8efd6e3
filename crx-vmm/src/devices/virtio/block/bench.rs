//! [`DirectBlock`]: plays a guest's virtio-blk driver against the block back end
//! without a guest, for `crx-bench blk`. Requests are written into plain guest memory
//! as descriptor chains on a split virtqueue, laid out the way Linux does (header,
//! data, status in three descriptors), and served by the same `Worker::process_queue`
//! the `crx-blk` thread runs: chain parsing, positioned I/O straight between the
//! backing and guest memory, status byte, used ring, interrupt eventfd. What it leaves
//! out is the thread wake-up on the queue's eventfd.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::HEADER_SIZE;
use super::worker::Worker;
use super::{
    Backing, Block, BlockError, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::devices::virtio::Interrupt;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const QUEUE_BASE: u64 = 0x1000;
const HEADERS_BASE: u64 = 0x2_0000;
const STATUS_BASE: u64 = 0x3_0000;
const DATA_BASE: u64 = 0x10_0000;

/// Why the bench driver could not be set up or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectBlockError {
    #[error("cannot set up the bench driver's guest memory or queue: {0}")]
    Setup(String),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot create the block device")]
    Block(#[source] BlockError),
    #[error("batch of {got} requests exceeds the {max} slots")]
    TooMany { got: usize, max: usize },
    #[error("request {index} completed with status {status}")]
    Status { index: usize, status: u8 },
    #[error("only {done} of {want} requests completed")]
    Incomplete { done: usize, want: usize },
}

/// What one request of a batch does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectKind {
    Read,
    Write,
    Flush,
}

/// One request of a batch: read or write `len` bytes at `sector` into or from the
/// batch position's data slot, or flush (`sector` and `len` unused).
#[derive(Clone, Copy, Debug)]
pub struct DirectRequest {
    pub kind: DirectKind,
    pub sector: u64,
    pub len: u32,
}

/// A virtio-blk driver on one queue in its own guest memory, with `slots` data
/// buffers of `slot_len` bytes each (one per request in flight).
pub struct DirectBlock {
    mem: GuestMemoryMmap,
    worker: Worker,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    used: GuestAddress,
    slot_len: u32,
}

impl DirectBlock {
    /// A driver over `backing` with at most `slots` requests per batch (each takes
    /// three of the queue's 256 descriptors), each with a `slot_len`-byte data buffer.
    pub fn new(backing: Backing, slots: u16, slot_len: u32) -> Result<Self, DirectBlockError> {
        let size: u16 = 256;
        if slots == 0 || u32::from(slots) * 3 > u32::from(size) {
            return Err(DirectBlockError::Setup(format!(
                "{slots} slots do not fit a queue of {size} (3 descriptors each)"
            )));
        }
        let mem_len = DATA_BASE as usize + slots as usize * slot_len as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_len)])
            .map_err(|e| DirectBlockError::Setup(e.to_string()))?;
        let n = u64::from(size);
        let desc = GuestAddress(QUEUE_BASE);
        let avail = desc.unchecked_add(16 * n);
        let used = GuestAddress((avail.raw_value() + 6 + 2 * n + 3) & !3);
        let mut queue = Queue::new(size).map_err(|e| DirectBlockError::Setup(e.to_string()))?;
        let setup = |r: Result<(), virtio_queue::Error>| {
            r.map_err(|e| DirectBlockError::Setup(e.to_string()))
        };
        setup(queue.try_set_desc_table_address(desc))?;
        setup(queue.try_set_avail_ring_address(avail))?;
        setup(queue.try_set_used_ring_address(used))?;
        queue.set_ready(true);
        let block = Block::new("bench", backing).map_err(DirectBlockError::Block)?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DirectBlockError::EventFd)?;
        let worker = Worker {
            mem: mem.clone(),
            queue,
            queue_event: EventFd::new(EFD_NONBLOCK).map_err(DirectBlockError::EventFd)?,
            interrupt: Arc::new(Interrupt::new(Arc::new(AtomicU32::new(0)), irqfd)),
            exit: EventFd::new(EFD_NONBLOCK).map_err(DirectBlockError::EventFd)?,
            requests: block.request_server(false),
        };
        Ok(Self {
            mem,
            worker,
            size,
            avail_idx: 0,
            used_seen: 0,
            used,
            slot_len,
        })
    }

    /// Guest address of data slot `i`.
    fn slot(&self, i: usize) -> GuestAddress {
        GuestAddress(DATA_BASE + i as u64 * u64::from(self.slot_len))
    }

    /// Fills every data slot with `byte` (what writes will carry).
    pub fn fill_slots(&self, slots: usize, byte: u8) -> Result<(), DirectBlockError> {
        let data = vec![byte; self.slot_len as usize];
        for i in 0..slots {
            self.mem
                .write_slice(&data, self.slot(i))
                .map_err(|e| DirectBlockError::Setup(e.to_string()))?;
        }
        Ok(())
    }

    /// Reads back data slot `i` (e.g. to check what a read brought in).
    pub fn slot_data(&self, i: usize) -> Result<Vec<u8>, DirectBlockError> {
        let mut out = vec![0u8; self.slot_len as usize];
        self.mem
            .read_slice(&mut out, self.slot(i))
            .map_err(|e| DirectBlockError::Setup(e.to_string()))?;
        Ok(out)
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        // Inside the queue area laid out in `new`.
        let _ = self
            .mem
            .write_slice(&raw, GuestAddress(QUEUE_BASE + 16 * u64::from(index)));
    }

    /// Submits `reqs` as one batch (request i uses data slot i), lets the back end
    /// serve the queue once, and checks every status byte.
    pub fn run_batch(&mut self, reqs: &[DirectRequest]) -> Result<(), DirectBlockError> {
        let max = usize::from(self.size / 3);
        if reqs.len() > max {
            return Err(DirectBlockError::TooMany {
                got: reqs.len(),
                max,
            });
        }
        let avail = GuestAddress(QUEUE_BASE + 16 * u64::from(self.size));
        let setup = |e: vm_memory::GuestMemoryError| DirectBlockError::Setup(e.to_string());
        for (i, r) in reqs.iter().enumerate() {
            let head = (i * 3) as u16;
            let header = HEADERS_BASE + 16 * i as u64;
            let status = STATUS_BASE + i as u64;
            let mut h = [0u8; HEADER_SIZE as usize];
            let kind: u32 = match r.kind {
                DirectKind::Read => VIRTIO_BLK_T_IN,
                DirectKind::Write => VIRTIO_BLK_T_OUT,
                DirectKind::Flush => VIRTIO_BLK_T_FLUSH,
            };
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&r.sector.to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(header))
                .map_err(setup)?;
            self.mem
                .write_obj(0xffu8, GuestAddress(status))
                .map_err(setup)?;
            if r.kind == DirectKind::Flush {
                self.write_desc(head, header, HEADER_SIZE, VIRTQ_DESC_F_NEXT, head + 2);
            } else {
                let data_flags = if r.kind == DirectKind::Write {
                    0
                } else {
                    VIRTQ_DESC_F_WRITE
                };
                self.write_desc(head, header, HEADER_SIZE, VIRTQ_DESC_F_NEXT, head + 1);
                self.write_desc(
                    head + 1,
                    self.slot(i).raw_value(),
                    r.len.min(self.slot_len),
                    data_flags | VIRTQ_DESC_F_NEXT,
                    head + 2,
                );
            }
            self.write_desc(head + 2, status, 1, VIRTQ_DESC_F_WRITE, 0);
            let ring_slot = u64::from(self.avail_idx % self.size);
            self.mem
                .write_obj(head, avail.unchecked_add(4 + 2 * ring_slot))
                .map_err(setup)?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(Ordering::Release);
        self.mem
            .write_obj(self.avail_idx, avail.unchecked_add(2))
            .map_err(setup)?;
        self.worker.process_queue();
        let used_idx: u16 = self
            .mem
            .read_obj(self.used.unchecked_add(2))
            .map_err(setup)?;
        let done = usize::from(used_idx.wrapping_sub(self.used_seen));
        self.used_seen = used_idx;
        if done != reqs.len() {
            return Err(DirectBlockError::Incomplete {
                done,
                want: reqs.len(),
            });
        }
        for i in 0..reqs.len() {
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS_BASE + i as u64))
                .map_err(setup)?;
            if status != VIRTIO_BLK_S_OK {
                return Err(DirectBlockError::Status { index: i, status });
            }
        }
        Ok(())
    }

    /// A FLUSH request through the queue; returns once `fdatasync` returned.
    pub fn flush(&mut self) -> Result<(), DirectBlockError> {
        self.run_batch(&[DirectRequest {
            kind: DirectKind::Flush,
            sector: 0,
            len: 0,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_write_read_and_flush_through_the_worker() {
        let dir = crate::devices::virtio::test_utils::TestDir::new("blk-bench");
        let path = dir.0.join("b.img");
        std::fs::write(&path, vec![0u8; 64 * 4096]).unwrap();
        let mut d = DirectBlock::new(Backing::open(&path, false).unwrap(), 8, 4096).unwrap();
        d.fill_slots(8, 0x5a).unwrap();
        let writes: Vec<_> = (0..8)
            .map(|i| DirectRequest {
                kind: DirectKind::Write,
                sector: i * 8,
                len: 4096,
            })
            .collect();
        d.run_batch(&writes).unwrap();
        d.flush().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap()[..8 * 4096],
            vec![0x5a; 8 * 4096][..]
        );
        d.fill_slots(8, 0).unwrap();
        let reads: Vec<_> = writes
            .iter()
            .map(|w| DirectRequest {
                kind: DirectKind::Read,
                ..*w
            })
            .collect();
        d.run_batch(&reads).unwrap();
        assert_eq!(d.slot_data(7).unwrap(), vec![0x5a; 4096]);
        // Past the end: the status says so and the batch reports it.
        let bad = DirectRequest {
            kind: DirectKind::Read,
            sector: 64 * 8,
            len: 4096,
        };
        assert!(matches!(
            d.run_batch(&[bad]),
            Err(DirectBlockError::Status { index: 0, .. })
        ));
        assert!(matches!(
            d.run_batch(&vec![bad; 90]),
            Err(DirectBlockError::TooMany { .. })
        ));
    }
}
