//! The rng device behind the real MMIO transport, with the test as the guest driver:
//! a split queue in plain guest memory, requests as descriptor chains, the `crx-rng`
//! thread doing the work.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{guest_memory, poll_readable, Buf, GuestAlloc, TestQueue};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};

const MEM_SIZE: usize = 0x40_0000;
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;
const WAIT: Duration = Duration::from_secs(5);

struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Rng>>,
    q: TestQueue,
    irq: EventFd,
    alloc: GuestAlloc,
    used_seen: u16,
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn writable(addr: GuestAddress, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

impl Driver {
    /// A transport and device with the queue configured but DRIVER_OK not yet set.
    fn configured() -> Self {
        let dev = Arc::new(Mutex::new(Rng::new()));
        let mem = guest_memory(MEM_SIZE);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
        let q = TestQueue::new(&mem, GuestAddress(QUEUE_BASE), QUEUE_SIZE);
        let mut d = Self {
            mem,
            t,
            dev,
            q,
            irq,
            alloc: GuestAlloc::new(0x10_0000, MEM_SIZE as u64),
            used_seen: 0,
        };
        d.configure();
        d
    }

    fn new() -> Self {
        let mut d = Self::configured();
        d.driver_ok();
        d
    }

    fn configure(&mut self) {
        let t = &mut self.t;
        w(t, 0x70, 1);
        w(t, 0x70, 3);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VIRTIO_F_VERSION_1
        w(t, 0x70, 0xb);
        assert_eq!(r(t, 0x70), 0xb, "features accepted");
        w(t, 0x30, 0);
        w(t, 0x38, u32::from(QUEUE_SIZE));
        w(t, 0x80, self.q.desc.0 as u32);
        w(t, 0x90, self.q.avail.0 as u32);
        w(t, 0xa0, self.q.used.0 as u32);
        w(t, 0x44, 1);
    }

    fn driver_ok(&mut self) {
        w(&mut self.t, 0x70, 0xf);
        assert_eq!(r(&mut self.t, 0x70), 0xf);
        assert!(self.dev.lock().unwrap().is_active());
    }

    /// Resets the device, lays a fresh queue and brings the device up again.
    fn reset_and_restart(&mut self) {
        w(&mut self.t, 0x70, 0);
        assert_eq!(r(&mut self.t, 0x70), 0, "reset accepted");
        assert!(!self.dev.lock().unwrap().is_active(), "thread stopped");
        self.q = TestQueue::new(&self.mem, GuestAddress(QUEUE_BASE), QUEUE_SIZE);
        self.used_seen = 0;
        self.configure();
        self.driver_ok();
    }

    fn notify(&mut self) {
        w(&mut self.t, 0x50, 0);
    }

    /// Posts one chain and notifies; returns the head index.
    fn request(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.q.add_chain(bufs);
        self.notify();
        head
    }

    /// Waits for the next used element: (head id, bytes written).
    fn next_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + WAIT;
        while self.q.used_idx() == self.used_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "device returned no buffer within {WAIT:?}");
            poll_readable(self.irq.as_raw_fd(), left.as_millis().min(50) as i32);
        }
        let e = self.q.used_elem(self.used_seen);
        self.used_seen = self.used_seen.wrapping_add(1);
        e
    }

    /// Posts a single writable buffer of `len` bytes; returns (its address, used length).
    fn fill(&mut self, len: u32) -> (GuestAddress, u32) {
        let addr = self.alloc.alloc(u64::from(len));
        let head = self.request(&[writable(addr, len)]);
        let (id, used) = self.next_used();
        assert_eq!(id, u32::from(head));
        (addr, used)
    }

    fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).unwrap();
        v
    }
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

#[test]
fn device_id_features_and_queue_through_transport() {
    let dev = Arc::new(Mutex::new(Rng::new()));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(guest_memory(MEM_SIZE), dev, irq).unwrap();
    assert_eq!(r(&mut t, 0x8), VIRTIO_ID_RNG);
    assert_eq!(r(&mut t, 0x8), 4);
    w(&mut t, 0x14, 0);
    assert_eq!(r(&mut t, 0x10), 0, "no low feature bits");
    w(&mut t, 0x14, 1);
    assert_eq!(r(&mut t, 0x10), 1, "VIRTIO_F_VERSION_1 only");
    w(&mut t, 0x30, 0);
    assert_eq!(r(&mut t, 0x34), 256);
    w(&mut t, 0x30, 1);
    assert_eq!(r(&mut t, 0x34), 0, "one queue only");
    let mut cfg = [0xffu8; 8];
    t.read(0x100, &mut cfg);
    assert_eq!(cfg, [0; 8], "no config space");
}

#[test]
fn acked_features_reach_the_device() {
    let d = Driver::new();
    assert_eq!(d.dev.lock().unwrap().acked_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn fills_a_4k_buffer_with_fresh_random_bytes() {
    let mut d = Driver::new();
    let (a, used_a) = d.fill(4096);
    assert_eq!(used_a, 4096);
    let bytes_a = d.read(a, 4096);
    assert!(!all_zero(&bytes_a), "buffer was filled");
    assert_ne!(
        d.t.interrupt_status()
            .load(std::sync::atomic::Ordering::SeqCst)
            & VIRTIO_MMIO_INT_VRING,
        0,
        "used-ring interrupt raised"
    );
    let (b, used_b) = d.fill(4096);
    assert_eq!(used_b, 4096);
    let bytes_b = d.read(b, 4096);
    assert_ne!(bytes_a, bytes_b, "two requests get different bytes");
}

#[test]
fn a_1mib_request_gets_exactly_64kib() {
    let mut d = Driver::new();
    let (addr, used) = d.fill(1 << 20);
    assert_eq!(used as usize, MAX_REQUEST_BYTES);
    let bytes = d.read(addr, 1 << 20);
    assert!(!all_zero(
        &bytes[MAX_REQUEST_BYTES - 4096..MAX_REQUEST_BYTES]
    ));
    assert!(
        all_zero(&bytes[MAX_REQUEST_BYTES..]),
        "nothing written past the 64 KiB bound"
    );
}

#[test]
fn the_bound_spans_a_multi_descriptor_chain() {
    let mut d = Driver::new();
    let a = d.alloc.alloc(48 * 1024);
    let b = d.alloc.alloc(48 * 1024);
    d.request(&[writable(a, 48 * 1024), writable(b, 48 * 1024)]);
    let (_, used) = d.next_used();
    assert_eq!(used as usize, MAX_REQUEST_BYTES);
    let second = d.read(b, 48 * 1024);
    assert!(!all_zero(&second[15 * 1024..16 * 1024]));
    assert!(
        all_zero(&second[16 * 1024..]),
        "second buffer filled only to the bound"
    );
}

#[test]
fn a_read_only_descriptor_gets_nothing() {
    let mut d = Driver::new();
    let ro = d.alloc.alloc(4096);
    let head = d.request(&[Buf {
        addr: ro,
        len: 4096,
        write: false,
    }]);
    assert_eq!(d.next_used(), (u32::from(head), 0));
    assert!(all_zero(&d.read(ro, 4096)));

    // Mixed chain: refused as a whole, its writable part untouched too.
    let wr = d.alloc.alloc(4096);
    let ro = d.alloc.alloc(16);
    let head = d.request(&[
        writable(wr, 4096),
        Buf {
            addr: ro,
            len: 16,
            write: false,
        },
    ]);
    assert_eq!(d.next_used(), (u32::from(head), 0));
    assert!(all_zero(&d.read(wr, 4096)));
}

#[test]
fn an_address_outside_memory_gets_nothing_and_the_device_keeps_working() {
    let mut d = Driver::new();
    for addr in [MEM_SIZE as u64 - 100, 0x1_0000_0000, u64::MAX - 10] {
        let head = d.request(&[writable(GuestAddress(addr), 4096)]);
        assert_eq!(d.next_used(), (u32::from(head), 0), "address {addr:#x}");
    }
    let (addr, used) = d.fill(4096);
    assert_eq!(used, 4096);
    assert!(!all_zero(&d.read(addr, 4096)));
}

#[test]
fn requests_queued_before_driver_ok_are_served_with_one_interrupt() {
    let mut d = Driver::configured();
    let bufs: Vec<_> = (0..3).map(|_| d.alloc.alloc(256)).collect();
    for &a in &bufs {
        d.q.add_chain(&[writable(a, 256)]);
    }
    d.driver_ok();
    for _ in 0..3 {
        assert_eq!(d.next_used().1, 256);
    }
    assert!(poll_readable(d.irq.as_raw_fd(), 5000), "interrupt raised");
    assert_eq!(d.irq.read().unwrap(), 1, "one interrupt for the batch");
    for a in bufs {
        assert!(!all_zero(&d.read(a, 256)));
    }
}

#[test]
fn reset_stops_the_thread_and_the_device_comes_back() {
    let mut d = Driver::new();
    assert_eq!(d.fill(512).1, 512);
    d.reset_and_restart();
    let (addr, used) = d.fill(512);
    assert_eq!(used, 512);
    assert!(!all_zero(&d.read(addr, 512)));
}

#[test]
fn stop_is_idempotent_and_reset_reports_success() {
    let d = Driver::new();
    let mut dev = d.dev.lock().unwrap();
    dev.stop();
    assert!(!dev.is_active());
    dev.stop();
    assert!(dev.reset());
    assert!(!dev.is_active());
}
