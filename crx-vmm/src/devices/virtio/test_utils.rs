//! Test-only helpers that play the virtio driver against plain guest memory: lay a
//! split virtqueue into a `GuestMemoryMmap`, offer descriptor chains, read the used
//! ring back. No guest, no KVM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Interrupt;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest memory of `size` bytes starting at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory")
}

/// An `Interrupt` whose irqfd the test can read.
pub fn test_interrupt() -> (Arc<Interrupt>, EventFd, Arc<AtomicU32>) {
    let irqfd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let status = Arc::new(AtomicU32::new(0));
    let intr = Interrupt::new(status.clone(), irqfd.try_clone().expect("clone"));
    (Arc::new(intr), irqfd, status)
}

/// Reads the interrupt status bits without clearing them.
pub fn interrupt_bits(status: &AtomicU32) -> u32 {
    status.load(Ordering::SeqCst)
}

/// Hands out guest addresses for data buffers, bump style.
pub struct GuestAlloc {
    next: u64,
    end: u64,
}

impl GuestAlloc {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let addr = (self.next + 15) & !15;
        assert!(addr + len <= self.end, "test guest memory exhausted");
        self.next = addr + len;
        GuestAddress(addr)
    }
}

/// One buffer of a descriptor chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

/// A split virtqueue laid out in guest memory, driven by the test as the driver.
pub struct TestQueue {
    mem: GuestMemoryMmap,
    size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Bytes of guest memory a queue of `size` entries occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail_end = 16 * n + 6 + 2 * n;
        let used = (avail_end + 3) & !3;
        used + 6 + 8 * n
    }

    /// Lays out an empty queue of `size` entries at `base` (16-byte aligned).
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc.unchecked_add(16 * n);
        let used_off = (16 * n + 6 + 2 * n + 3) & !3;
        let used = base.unchecked_add(used_off);
        let zeros = vec![0u8; Self::footprint(size) as usize];
        mem.write_slice(&zeros, base).expect("queue inside memory");
        Self {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A ready `Queue` pointing at this layout, as a transport would hand a device.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.try_set_desc_table_address(self.desc).expect("desc");
        q.try_set_avail_ring_address(self.avail).expect("avail");
        q.try_set_used_ring_address(self.used).expect("used");
        q.set_ready(true);
        q
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor write");
    }

    /// Writes a chain of descriptors without offering it; returns its head index.
    pub fn write_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let mut flags = if b.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(index, b.addr.raw_value(), b.len, flags, next);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        head
    }

    /// Puts a head index on the available ring and publishes it.
    pub fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .expect("avail idx");
    }

    /// Writes and offers a chain; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.write_chain(bufs);
        self.offer(head);
        head
    }

    /// Overwrites the available index directly (to fake a broken driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .expect("avail idx");
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.used.unchecked_add(2))
            .expect("used idx")
    }

    /// The `i`-th used element: (descriptor head id, bytes written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = self.mem.read_obj(at).expect("used id");
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
        (id, len)
    }
}

/// A private directory for one test's sockets, removed afterwards.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "crx-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("test dir");
        Self(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits up to `ms` for `fd` to become readable.
pub fn poll_readable(fd: std::os::unix::io::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}
