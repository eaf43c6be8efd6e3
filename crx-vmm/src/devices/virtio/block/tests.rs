//! The block device behind the real MMIO transport, with the test as the guest
//! driver: a split queue in plain guest memory, requests in descriptor chains, temp
//! files as backing, the `crx-blk` thread doing the work.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{
    guest_memory, poll_readable, Buf, GuestAlloc, TestDir, TestQueue,
};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};

const MEM_SIZE: u64 = 0x40_0000;
const QUEUE_BASE: u64 = 0x1000;
const QSIZE: u16 = 16;

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A temp file of `len` bytes, each byte `i % 251` (so sectors differ).
fn image(dir: &TestDir, name: &str, len: usize) -> PathBuf {
    let p = dir.0.join(name);
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, data).unwrap();
    p
}

struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Block>>,
    q: TestQueue,
    irq: EventFd,
    alloc: GuestAlloc,
    seen: u16,
}

impl Driver {
    fn new(block: Block) -> Self {
        let mut d = Self::unstarted(block);
        d.bring_up();
        d
    }

    fn unstarted(block: Block) -> Self {
        let dev = Arc::new(Mutex::new(block));
        let mem = guest_memory(MEM_SIZE as usize);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
        let q = TestQueue::new(&mem, GuestAddress(QUEUE_BASE), QSIZE);
        Self {
            mem,
            t,
            dev,
            q,
            irq,
            alloc: GuestAlloc::new(0x10_0000, MEM_SIZE),
            seen: 0,
        }
    }

    fn features(&mut self) -> u64 {
        w(&mut self.t, 0x14, 0);
        let lo = u64::from(r(&mut self.t, 0x10));
        w(&mut self.t, 0x14, 1);
        lo | (u64::from(r(&mut self.t, 0x10)) << 32)
    }

    fn bring_up(&mut self) {
        let offered = self.features();
        self.bring_up_with(offered);
    }

    /// Brings the device up accepting `offered` (a subset of the device's features).
    fn bring_up_with(&mut self, offered: u64) {
        assert_eq!(r(&mut self.t, 0x8), VIRTIO_ID_BLOCK);
        let t = &mut self.t;
        w(t, 0x70, 1);
        w(t, 0x70, 3);
        w(t, 0x24, 0);
        w(t, 0x20, offered as u32);
        w(t, 0x24, 1);
        w(t, 0x20, (offered >> 32) as u32);
        w(t, 0x70, 0xb);
        assert_eq!(r(t, 0x70), 0xb, "features accepted");
        w(t, 0x30, 0);
        assert_eq!(r(t, 0x34), u32::from(QUEUE_SIZE));
        w(t, 0x38, u32::from(QSIZE));
        w(t, 0x80, self.q.desc.0 as u32);
        w(t, 0x90, self.q.avail.0 as u32);
        w(t, 0xa0, self.q.used.0 as u32);
        w(t, 0x44, 1);
        w(t, 0x70, 0xf);
        assert_eq!(r(t, 0x70), 0xf, "driver ok");
        assert!(self.dev.lock().unwrap().is_active());
    }

    fn config_u64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.t.read(0x100 + off, &mut b);
        u64::from_le_bytes(b)
    }

    fn config_u32(&mut self, off: u64) -> u32 {
        r(&mut self.t, 0x100 + off)
    }

    /// Offers a raw chain, notifies, waits for it to be used; returns the used length.
    fn submit(&mut self, bufs: &[Buf]) -> u32 {
        self.q.add_chain(bufs);
        w(&mut self.t, 0x50, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.q.used_idx() == self.seen {
            assert!(Instant::now() < deadline, "request not completed");
            poll_readable(self.irq.as_raw_fd(), 50);
            let _ = self.irq.read();
        }
        let (_, len) = self.q.used_elem(self.seen);
        self.seen = self.seen.wrapping_add(1);
        len
    }

    fn header(&mut self, kind: u32, sector: u64) -> Buf {
        let addr = self.alloc.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, addr).unwrap();
        Buf {
            addr,
            len: 16,
            write: false,
        }
    }

    fn status_buf(&mut self) -> Buf {
        let addr = self.alloc.alloc(1);
        self.mem.write_obj(0xffu8, addr).unwrap();
        Buf {
            addr,
            len: 1,
            write: true,
        }
    }

    fn status_of(&self, b: Buf) -> u8 {
        self.mem.read_obj(b.addr).unwrap()
    }

    /// A well-formed request; returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> (u8, u32) {
        let h = self.header(kind, sector);
        let s = self.status_buf();
        let mut chain = vec![h];
        chain.extend(data);
        chain.push(s);
        let len = self.submit(&chain);
        (self.status_of(s), len)
    }

    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> u8 {
        let addr = self.alloc.alloc(data.len() as u64);
        self.mem.write_slice(data, addr).unwrap();
        let buf = Buf {
            addr,
            len: data.len() as u32,
            write: false,
        };
        let (status, len) = self.request(VIRTIO_BLK_T_OUT, sector, Some(buf));
        assert_eq!(len, 1, "an OUT request writes only its status byte");
        status
    }

    /// Returns the status and, if OK, the bytes read.
    fn read_sectors(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let addr = self.alloc.alloc(u64::from(len));
        let buf = Buf {
            addr,
            len,
            write: true,
        };
        let (status, used) = self.request(VIRTIO_BLK_T_IN, sector, Some(buf));
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, addr).unwrap();
        if status == VIRTIO_BLK_S_OK {
            assert_eq!(used, len + 1, "used length covers data and status");
        }
        (status, out)
    }
}

fn rw_drive(dir: &TestDir, sectors: usize) -> (Block, PathBuf) {
    let p = image(dir, "disk.img", sectors * 512);
    let b = Block::new("crx-test", Backing::open(&p, false).unwrap()).unwrap();
    (b, p)
}

#[test]
fn write_three_sectors_then_read_them_back() {
    let dir = TestDir::new("blk-rw");
    let (b, path) = rw_drive(&dir, 16);
    let mut d = Driver::new(b);
    let data: Vec<u8> = (0..1536u32).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(d.write_sectors(2, &data), VIRTIO_BLK_S_OK);
    let (status, back) = d.read_sectors(2, 1536);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(back, data);
    // The host file holds the bytes at the right offset, neighbours untouched.
    let f = std::fs::File::open(&path).unwrap();
    let mut host = vec![0u8; 1536];
    f.read_exact_at(&mut host, 1024).unwrap();
    assert_eq!(host, data);
    let mut before = [0u8; 512];
    f.read_exact_at(&mut before, 512).unwrap();
    assert_eq!(before[0], (512 % 251) as u8);
    // Used interrupt reached the transport.
    assert_ne!(r(&mut d.t, 0x60) & 1, 0);
}

#[test]
fn read_spanning_several_data_descriptors() {
    let dir = TestDir::new("blk-multi");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);
    let a1 = d.alloc.alloc(512);
    let a2 = d.alloc.alloc(1024);
    let h = d.header(VIRTIO_BLK_T_IN, 1);
    let s = d.status_buf();
    let b1 = Buf {
        addr: a1,
        len: 512,
        write: true,
    };
    let b2 = Buf {
        addr: a2,
        len: 1024,
        write: true,
    };
    assert_eq!(d.submit(&[h, b1, b2, s]), 1537);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, a2).unwrap();
    let want: Vec<u8> = (1024..2048usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, want);
}

#[test]
fn config_space_and_features() {
    let dir = TestDir::new("blk-cfg");
    // A trailing partial sector is not exposed.
    let p = image(&dir, "odd.img", 16 * 512 + 100);
    let b = Block::new("x", Backing::open(&p, false).unwrap()).unwrap();
    let mut d = Driver::new(b);
    assert_eq!(d.config_u64(0), 16);
    assert_eq!(d.config_u32(12), 254, "seg_max");
    assert_eq!(d.config_u32(20), 512, "blk_size");
    let f = d.features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    // Guest writes to config space change nothing.
    d.t.write(0x100, &[0xffu8; 8]);
    assert_eq!(d.config_u64(0), 16);
}

#[test]
fn flush_returns_ok_after_fdatasync() {
    let dir = TestDir::new("blk-flush");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);
    let backing = d.dev.lock().unwrap().slot().backing().unwrap();
    assert_eq!(backing.flush_count(), 0);
    assert_eq!(d.write_sectors(0, &[9u8; 512]), VIRTIO_BLK_S_OK);
    let (status, len) = d.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    // The status was written after the fdatasync: the count is already up when we see it.
    assert_eq!(backing.flush_count(), 1);
}

#[test]
fn without_negotiated_flush_every_write_is_synced() {
    let dir = TestDir::new("blk-wt");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::unstarted(b);
    let offered = d.features();
    d.bring_up_with(offered & !VIRTIO_BLK_F_FLUSH);
    let backing = d.dev.lock().unwrap().slot().backing().unwrap();
    assert_eq!(d.write_sectors(0, &[9u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(backing.flush_count(), 1);
    assert_eq!(d.read_sectors(0, 512).0, VIRTIO_BLK_S_OK);
    assert_eq!(backing.flush_count(), 1, "reads are not synced");
}

#[test]
fn read_only_drive_refuses_writes() {
    let dir = TestDir::new("blk-ro");
    let p = image(&dir, "ro.img", 8 * 512);
    let b = Block::new("ro", Backing::open(&p, true).unwrap()).unwrap();
    let mut d = Driver::new(b);
    assert_ne!(d.features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(d.write_sectors(0, &[0xaa; 512]), VIRTIO_BLK_S_IOERR);
    let (status, data) = d.read_sectors(0, 512);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data[1], 1, "file unchanged");
    assert_eq!(std::fs::read(&p).unwrap()[0..4], [0, 1, 2, 3]);
    // FLUSH on a read-only drive is harmless.
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
}

#[test]
fn forced_read_only_on_writable_backing() {
    let dir = TestDir::new("blk-ro2");
    let (b, p) = rw_drive(&dir, 8);
    let mut d = Driver::new(b.read_only());
    assert_ne!(d.features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(d.write_sectors(0, &[0xaa; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(&p).unwrap()[0..4], [0, 1, 2, 3]);
}

#[test]
fn requests_past_capacity_fail() {
    let dir = TestDir::new("blk-end");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);
    // Starts inside, ends one sector past the end.
    assert_eq!(d.read_sectors(7, 1024).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read_sectors(8, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write_sectors(8, &[1u8; 512]), VIRTIO_BLK_S_IOERR);
    // Sector arithmetic that would overflow.
    assert_eq!(d.read_sectors(u64::MAX, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        d.read_sectors(u64::MAX / 512 + 1, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    // Not a whole number of sectors.
    assert_eq!(d.read_sectors(0, 100).0, VIRTIO_BLK_S_IOERR);
    // The last sector itself is fine.
    assert_eq!(d.read_sectors(7, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let dir = TestDir::new("blk-unsupp");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);
    // 11 is WRITE_ZEROES, not offered.
    assert_eq!(d.request(11, 0, None).0, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn get_id_returns_the_serial() {
    let dir = TestDir::new("blk-id");
    let p = image(&dir, "id.img", 512);
    let b = Block::new("csi-vol-0042", Backing::open(&p, false).unwrap()).unwrap();
    let mut d = Driver::new(b);
    let addr = d.alloc.alloc(20);
    d.mem.write_slice(&[0xee; 20], addr).unwrap();
    let buf = Buf {
        addr,
        len: 20,
        write: true,
    };
    let (status, len) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some(buf));
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, addr).unwrap();
    let mut want = [0u8; 20];
    want[..12].copy_from_slice(b"csi-vol-0042");
    assert_eq!(id, want);
    assert!(matches!(
        Block::new_empty("this-serial-is-too-long"),
        Err(BlockError::SerialTooLong(23))
    ));
}

#[test]
fn malformed_chains_are_answered_without_harm() {
    let dir = TestDir::new("blk-bad");
    let (b, path) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);

    // Header only, nothing writable: no status to report, chain returned empty.
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(d.submit(&[h]), 0);

    // Header in a device-writable descriptor.
    let mut h = d.header(VIRTIO_BLK_T_IN, 0);
    h.write = true;
    let s = d.status_buf();
    assert_eq!(d.submit(&[h, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // Header shorter than 16 bytes.
    let mut h = d.header(VIRTIO_BLK_T_IN, 0);
    h.len = 8;
    let s = d.status_buf();
    assert_eq!(d.submit(&[h, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // Status descriptor not writable: nothing may be written, not even data.
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    let data = d.alloc.alloc(512);
    d.mem.write_slice(&[0x55; 512], data).unwrap();
    let mut s = d.status_buf();
    s.write = false;
    assert_eq!(
        d.submit(&[
            h,
            Buf {
                addr: data,
                len: 512,
                write: true
            },
            s
        ]),
        0
    );
    assert_eq!(d.status_of(s), 0xff);
    let mut got = [0u8; 512];
    d.mem.read_slice(&mut got, data).unwrap();
    assert_eq!(got, [0x55; 512]);

    // A data buffer in the wrong direction (device-readable for IN).
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_buf();
    assert_eq!(
        d.submit(&[
            h,
            Buf {
                addr: data,
                len: 512,
                write: false
            },
            s
        ]),
        1
    );
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // A huge length running past the end of guest memory.
    let h = d.header(VIRTIO_BLK_T_IN, 0);
    let s = d.status_buf();
    let huge = Buf {
        addr: GuestAddress(0x20_0000),
        len: 0xffff_fe00,
        write: true,
    };
    assert_eq!(d.submit(&[h, huge, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // A huge OUT whose buffer lies inside memory but far exceeds the capacity.
    let h = d.header(VIRTIO_BLK_T_OUT, 0);
    let s = d.status_buf();
    let big = Buf {
        addr: GuestAddress(0x10_0000),
        len: 0x20_0000,
        write: false,
    };
    assert_eq!(d.submit(&[h, big, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // A descriptor outside guest memory altogether.
    let h = d.header(VIRTIO_BLK_T_OUT, 0);
    let s = d.status_buf();
    let far = Buf {
        addr: GuestAddress(1 << 40),
        len: 512,
        write: false,
    };
    assert_eq!(d.submit(&[h, far, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_IOERR);

    // Status byte outside guest memory: chain returned, nothing written.
    let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
    let s = Buf {
        addr: GuestAddress(1 << 40),
        len: 1,
        write: true,
    };
    assert_eq!(d.submit(&[h, s]), 0);

    // The file is untouched and the device still works.
    assert_eq!(std::fs::read(&path).unwrap()[0..4], [0, 1, 2, 3]);
    assert_eq!(d.write_sectors(1, &[3u8; 512]), VIRTIO_BLK_S_OK);
    assert_eq!(d.read_sectors(1, 512), (VIRTIO_BLK_S_OK, vec![3u8; 512]));
}

#[test]
fn empty_slot_gets_backing_after_activation() {
    let dir = TestDir::new("blk-hot");
    let b = Block::new_empty("slot0").unwrap();
    let slot = b.slot();
    let mut d = Driver::new(b);
    assert_eq!(d.config_u64(0), 0);
    assert_eq!(d.read_sectors(0, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write_sectors(0, &[1u8; 512]), VIRTIO_BLK_S_IOERR);
    // Ack what is pending so the config bit is seen fresh.
    let pending = r(&mut d.t, 0x60);
    w(&mut d.t, 0x64, pending);
    assert_eq!(r(&mut d.t, 0x60), 0);
    let _ = d.irq.read();

    let p = image(&dir, "vol.img", 32 * 512);
    let gen_before = slot.config_generation();
    assert_eq!(
        slot.replace_backing(Some(Backing::open(&p, false).unwrap()))
            .unwrap(),
        32
    );
    assert_eq!(d.config_u64(0), 32);
    assert_eq!(
        r(&mut d.t, 0x60) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    assert!(poll_readable(d.irq.as_raw_fd(), 0), "irqfd kicked");
    assert_eq!(slot.config_generation(), gen_before + 1);

    let (status, data) = d.read_sectors(31, 512);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let want: Vec<u8> = (31 * 512..32 * 512usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(data, want);
    assert_eq!(d.write_sectors(5, &[7u8; 512]), VIRTIO_BLK_S_OK);

    // Detaching flushes the old backing and empties the slot again.
    let old = slot.backing().unwrap();
    assert_eq!(slot.replace_backing(None).unwrap(), 0);
    assert_eq!(old.flush_count(), 1);
    assert_eq!(d.config_u64(0), 0);
    assert_eq!(d.read_sectors(0, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(&p).unwrap()[5 * 512], 7);
}

#[test]
fn driver_reset_then_device_comes_back() {
    let dir = TestDir::new("blk-reset");
    let (b, _) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);
    assert_eq!(d.write_sectors(0, &[4u8; 512]), VIRTIO_BLK_S_OK);
    w(&mut d.t, 0x70, 0);
    assert_eq!(r(&mut d.t, 0x70), 0);
    assert!(!d.dev.lock().unwrap().is_active());
    d.q = TestQueue::new(&d.mem, GuestAddress(QUEUE_BASE), QSIZE);
    d.seen = 0;
    d.bring_up();
    assert_eq!(d.read_sectors(0, 512), (VIRTIO_BLK_S_OK, vec![4u8; 512]));
}

#[test]
fn opening_a_directory_is_refused() {
    let dir = TestDir::new("blk-dir");
    assert!(matches!(
        Backing::open(&dir.0, true),
        Err(BlockError::NotFileOrBlockDevice(_))
    ));
    assert!(matches!(
        Backing::open(&dir.0.join("missing"), false),
        Err(BlockError::Open { .. })
    ));
}

#[test]
fn activate_rejects_wrong_queue_count() {
    let mut b = Block::new_empty("q").unwrap();
    let (interrupt, _, _) = crate::devices::virtio::test_utils::test_interrupt();
    let ctx = crate::devices::virtio::ActivateContext {
        mem: guest_memory(0x1000),
        queues: vec![],
        queue_events: vec![],
        interrupt,
    };
    assert!(b.activate(ctx).is_err());
    assert!(!b.is_active());
}

#[test]
fn byte_range_checks_whole_sectors_capacity_and_overflow() {
    use super::request::byte_range;
    assert_eq!(byte_range(0, 512, 1), Some(0));
    assert_eq!(byte_range(3, 1024, 5), Some(1536));
    assert_eq!(byte_range(4, 1024, 5), None, "ends past capacity");
    assert_eq!(byte_range(0, 511, 1), None, "not whole sectors");
    assert_eq!(byte_range(5, 0, 5), Some(2560), "empty transfer at the end");
    assert_eq!(byte_range(u64::MAX, 512, u64::MAX), None);
    assert_eq!(
        byte_range(u64::MAX / 512 + 1, 0, u64::MAX),
        None,
        "byte offset overflows"
    );
}

#[test]
fn swapping_backing_while_requests_run() {
    let dir = TestDir::new("blk-swap");
    let a = image(&dir, "a.img", 64 * 512);
    let small = image(&dir, "b.img", 4 * 512);
    let b = Block::new_empty("swap").unwrap();
    let slot = b.slot();
    let mut d = Driver::new(b);
    let swapper = {
        let slot = slot.clone();
        std::thread::spawn(move || {
            for i in 0..50 {
                let next = match i % 3 {
                    0 => Some(Backing::open(&a, false).unwrap()),
                    1 => Some(Backing::open(&small, true).unwrap()),
                    _ => None,
                };
                slot.replace_backing(next).unwrap();
            }
        })
    };
    // Every request completes with a definite status whatever backing it meets.
    for i in 0..100u64 {
        let (status, _) = d.read_sectors(i % 8, 512);
        assert!(status == VIRTIO_BLK_S_OK || status == VIRTIO_BLK_S_IOERR);
    }
    swapper.join().unwrap();
    // 50 swaps ended on i = 49 (49 % 3 == 1): the 4-sector read-only image.
    assert_eq!(slot.config_generation(), 50);
    assert_eq!(d.config_u64(0), 4);
    assert_eq!(d.read_sectors(3, 512).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read_sectors(4, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write_sectors(0, &[1u8; 512]), VIRTIO_BLK_S_IOERR);
}

#[test]
fn any_descriptor_layout_is_served() {
    let dir = TestDir::new("blk-layout");
    let (b, path) = rw_drive(&dir, 8);
    let mut d = Driver::new(b);

    // OUT: header and data in one device-readable descriptor, status alone.
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 199) as u8).collect();
    let at = d.alloc.alloc(16 + 1024);
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
    d.mem.write_slice(&hdr, at).unwrap();
    d.mem.write_slice(&data, at.unchecked_add(16)).unwrap();
    let s = d.status_buf();
    let out = Buf {
        addr: at,
        len: 16 + 1024,
        write: false,
    };
    assert_eq!(d.submit(&[out, s]), 1);
    assert_eq!(d.status_of(s), VIRTIO_BLK_S_OK);
    assert_eq!(std::fs::read(&path).unwrap()[1024..2048], data[..]);

    // IN: header split 8 + 8, data and status sharing one device-writable descriptor.
    let h = d.header(VIRTIO_BLK_T_IN, 2);
    let h1 = Buf { len: 8, ..h };
    let h2 = Buf {
        addr: h.addr.unchecked_add(8),
        len: 8,
        write: false,
    };
    let tail = d.alloc.alloc(1025);
    let both = Buf {
        addr: tail,
        len: 1025,
        write: true,
    };
    assert_eq!(d.submit(&[h1, h2, both]), 1025);
    let mut got = vec![0u8; 1025];
    d.mem.read_slice(&mut got, tail).unwrap();
    assert_eq!(got[..1024], data[..]);
    assert_eq!(got[1024], VIRTIO_BLK_S_OK, "status is the last byte");

    // FLUSH as one readable and one writable descriptor still reaches fdatasync.
    let backing = d.dev.lock().unwrap().slot().backing().unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
    assert_eq!(backing.flush_count(), 1);
}

#[test]
fn config_generation_register_follows_backing_changes() {
    let dir = TestDir::new("blk-gen");
    let b = Block::new_empty("gen").unwrap();
    let slot = b.slot();
    let mut d = Driver::new(b);
    let before = r(&mut d.t, 0xfc);
    let p = image(&dir, "g.img", 4 * 512);
    slot.replace_backing(Some(Backing::open(&p, false).unwrap()))
        .unwrap();
    let after = r(&mut d.t, 0xfc);
    assert_ne!(
        before, after,
        "a driver re-reading config must see the change"
    );
    assert_eq!(d.config_u64(0), 4);
    slot.replace_backing(None).unwrap();
    assert_ne!(r(&mut d.t, 0xfc), after);
}
