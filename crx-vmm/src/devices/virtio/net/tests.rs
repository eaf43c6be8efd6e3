//! The net device behind the real MMIO transport, with the test as the guest driver
//! (split queues in plain guest memory) and a real tap in a network namespace the
//! test creates; a packet socket on the tap plays the host's network.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::NET_FEATURES;
use super::netns::{in_netns, test_frame, IsolatedTap, PacketSocket, TEST_ETHERTYPE};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{guest_memory, poll_readable, Buf, GuestAlloc, TestQueue};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

const MEM_SIZE: usize = 0x80_0000;
const RX_BASE: u64 = 0x1000;
const TX_BASE: u64 = 0x4000;
const QSIZE: u16 = 64;
const WAIT: Duration = Duration::from_secs(5);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn readable(addr: GuestAddress, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

fn writable(addr: GuestAddress, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Net>>,
    rx: TestQueue,
    tx: TestQueue,
    irq: EventFd,
    alloc: GuestAlloc,
    rx_seen: u16,
    tx_seen: u16,
    /// The host side of the tap (the tap itself went to the device).
    peer: PacketSocket,
    /// Address of each posted rx buffer by head index.
    rx_bufs: HashMap<u32, GuestAddress>,
}

impl Driver {
    /// A device on a fresh tap, brought up accepting `features`.
    fn new(features: u64) -> Self {
        let isolated = IsolatedTap::new("crxt0").expect("tap in a test netns");
        let dev = Arc::new(Mutex::new(Net::new(isolated.tap, GUEST_MAC, 1500)));
        let mem = guest_memory(MEM_SIZE);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
        let rx = TestQueue::new(&mem, GuestAddress(RX_BASE), QSIZE);
        let tx = TestQueue::new(&mem, GuestAddress(TX_BASE), QSIZE);
        let mut d = Self {
            mem,
            t,
            dev,
            rx,
            tx,
            irq,
            alloc: GuestAlloc::new(0x10_0000, MEM_SIZE as u64),
            rx_seen: 0,
            tx_seen: 0,
            peer: isolated.peer,
            rx_bufs: HashMap::new(),
        };
        d.bring_up(features);
        d
    }

    fn bring_up(&mut self, features: u64) {
        let t = &mut self.t;
        assert_eq!(r(t, 0x8), VIRTIO_ID_NET);
        w(t, 0x70, 1);
        w(t, 0x70, 3);
        w(t, 0x24, 0);
        w(t, 0x20, features as u32);
        w(t, 0x24, 1);
        w(t, 0x20, (features >> 32) as u32);
        w(t, 0x70, 0xb);
        assert_eq!(r(t, 0x70), 0xb, "features accepted");
        for (index, q) in [(0u32, &self.rx), (1, &self.tx)] {
            w(t, 0x30, index);
            assert_eq!(r(t, 0x34), 256);
            w(t, 0x38, u32::from(QSIZE));
            w(t, 0x80, q.desc.0 as u32);
            w(t, 0x90, q.avail.0 as u32);
            w(t, 0xa0, q.used.0 as u32);
            w(t, 0x44, 1);
        }
        w(t, 0x70, 0xf);
        assert_eq!(r(t, 0x70), 0xf, "driver ok");
        assert!(self.dev.lock().unwrap().is_active());
    }

    fn notify(&mut self, queue: u32) {
        w(&mut self.t, 0x50, queue);
    }

    /// Puts `frame` (with `hdr`) in guest memory and offers it on the tx queue as the
    /// given split into descriptors of at most `split` bytes.
    fn send(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8], split: usize) -> u16 {
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        let addr = self.alloc.alloc(bytes.len() as u64);
        self.mem.write_slice(&bytes, addr).unwrap();
        let bufs: Vec<Buf> = (0..bytes.len())
            .step_by(split)
            .map(|off| {
                readable(
                    GuestAddress(addr.0 + off as u64),
                    split.min(bytes.len() - off) as u32,
                )
            })
            .collect();
        let head = self.tx.add_chain(&bufs);
        self.notify(TX_QUEUE as u32);
        head
    }

    /// Waits for the next used element of `queue`: (head id, length).
    fn next_used(&mut self, queue: usize) -> (u32, u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (q, seen) = if queue == RX_QUEUE {
                (&self.rx, self.rx_seen)
            } else {
                (&self.tx, self.tx_seen)
            };
            if q.used_idx() != seen {
                let e = q.used_elem(seen);
                if queue == RX_QUEUE {
                    self.rx_seen = seen.wrapping_add(1);
                } else {
                    self.tx_seen = seen.wrapping_add(1);
                }
                return e;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "queue {queue}: no buffer used within {WAIT:?}"
            );
            poll_readable(self.irq.as_raw_fd(), left.as_millis().min(20) as i32);
            let _ = self.irq.read();
        }
    }

    /// Whether `queue` returned nothing new (checked without waiting).
    fn nothing_used(&self, queue: usize) -> bool {
        if queue == RX_QUEUE {
            self.rx.used_idx() == self.rx_seen
        } else {
            self.tx.used_idx() == self.tx_seen
        }
    }

    /// Posts `count` rx buffers of `len` bytes; returns their addresses.
    fn post_rx(&mut self, count: usize, len: u32) -> Vec<GuestAddress> {
        let addrs: Vec<_> = (0..count)
            .map(|_| {
                let a = self.alloc.alloc(u64::from(len));
                let head = self.rx.add_chain(&[writable(a, len)]);
                self.rx_bufs.insert(u32::from(head), a);
                a
            })
            .collect();
        self.notify(RX_QUEUE as u32);
        addrs
    }

    /// The next received frame, put together from its mergeable buffers: (header,
    /// frame).
    fn recv_frame(&mut self) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let (id, len) = self.next_used(RX_QUEUE);
        let mut bytes = self.read(self.rx_bufs[&id], len as usize);
        assert!(
            bytes.len() >= VNET_HDR_LEN,
            "rx buffer shorter than the header"
        );
        let num_buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
        for _ in 1..num_buffers {
            let (id, len) = self.next_used(RX_QUEUE);
            bytes.extend(self.read(self.rx_bufs[&id], len as usize));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(&bytes[..VNET_HDR_LEN]);
        (hdr, bytes.split_off(VNET_HDR_LEN))
    }

    fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).unwrap();
        v
    }

    /// The next test frame the host side of the tap received.
    fn host_receives(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        let n = self
            .peer
            .recv_test_frame(&mut buf, WAIT)
            .expect("packet socket recv")?;
        buf.truncate(n);
        Some(buf)
    }

    fn host_sends(&self, frame: &[u8]) {
        assert_eq!(self.peer.send(frame).unwrap(), frame.len());
    }

    fn counters(&self) -> (u64, u64, u64, u64) {
        self.dev.lock().unwrap().counters().frames()
    }
}

fn plain_hdr() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

const BASIC: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;

#[test]
fn device_id_features_and_config_through_transport() {
    let d = Driver::new(BASIC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF);
    let mut t = d.t;
    assert_eq!(r(&mut t, 0x8), 1, "network device");
    w(&mut t, 0x14, 0);
    let lo = r(&mut t, 0x10);
    w(&mut t, 0x14, 1);
    let offered = u64::from(lo) | (u64::from(r(&mut t, 0x10)) << 32);
    assert_eq!(offered, NET_FEATURES);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_ne!(offered & bit, 0, "feature {bit:#x} offered");
    }
    // Read as a driver does: at most 4 bytes at a time.
    let config = |t: &mut MmioTransport| {
        let mut cfg = [0u8; 12];
        for (i, chunk) in cfg.chunks_mut(4).enumerate() {
            t.read(0x100 + 4 * i as u64, chunk);
        }
        cfg
    };
    let cfg = config(&mut t);
    assert_eq!(&cfg[0..6], &GUEST_MAC, "MAC in config space");
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500, "MTU");
    // The MAC cannot be changed through config space.
    for i in 0..6 {
        t.write(0x100 + i, &[0xff]);
    }
    assert_eq!(&config(&mut t)[0..6], &GUEST_MAC);
    assert_eq!(
        d.dev.lock().unwrap().acked_features(),
        BASIC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF
    );
}

#[test]
fn a_guest_frame_on_the_tx_queue_comes_out_of_the_tap() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    let frame = test_frame(HOST_MAC, GUEST_MAC, 1514, 7);
    // Header and frame spread over several descriptors, as a guest may do.
    let head = d.send(plain_hdr(), &frame, 500);
    assert_eq!(d.next_used(TX_QUEUE), (u32::from(head), 0));
    assert_eq!(d.host_receives().as_deref(), Some(&frame[..]));
    let small = test_frame(HOST_MAC, GUEST_MAC, 60, 8);
    d.send(plain_hdr(), &small, 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.host_receives().as_deref(), Some(&small[..]));
    assert_eq!(d.counters().0, 2, "two frames sent");
}

#[test]
fn a_host_frame_arrives_in_an_rx_buffer_with_its_header() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    let bufs = d.post_rx(4, 2048);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 1000, 9);
    d.host_sends(&frame);
    // Skip anything else the fresh link may have sent; our frame is identified by
    // its ethertype.
    loop {
        let (id, len) = d.next_used(RX_QUEUE);
        let addr = bufs[id as usize % bufs.len()];
        let got = d.read(addr, len as usize);
        if got.len() >= VNET_HDR_LEN + 14
            && got[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == TEST_ETHERTYPE.to_be_bytes()
        {
            assert_eq!(len as usize, VNET_HDR_LEN + frame.len());
            assert_eq!(got[0], 0, "no checksum flags without GUEST_CSUM");
            assert_eq!(got[1], VIRTIO_NET_HDR_GSO_NONE);
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
            assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
            break;
        }
        d.post_rx(1, 2048);
    }
}

#[test]
fn a_big_frame_spans_several_mergeable_buffers() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 1514, 10);
    loop {
        let bufs = d.post_rx(3, 600);
        d.host_sends(&frame);
        let (id, len) = d.next_used(RX_QUEUE);
        let first = d.read(bufs[0], 600);
        let num_buffers = u16::from_le_bytes([first[10], first[11]]);
        if first[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] != TEST_ETHERTYPE.to_be_bytes() {
            // Link-local noise: drain its buffers and try again.
            for _ in 1..num_buffers {
                d.next_used(RX_QUEUE);
            }
            continue;
        }
        assert_eq!(id, 0, "the first posted buffer holds the header");
        assert_eq!(
            num_buffers, 3,
            "12 + 1514 bytes need three 600-byte buffers"
        );
        assert_eq!(len, 600);
        let (_, len2) = d.next_used(RX_QUEUE);
        let (_, len3) = d.next_used(RX_QUEUE);
        assert_eq!((len2, len3), (600, 12 + 1514 - 1200));
        let mut got = first[VNET_HDR_LEN..].to_vec();
        got.extend(d.read(bufs[1], 600));
        got.extend(d.read(bufs[2], len3 as usize));
        assert_eq!(got, frame);
        break;
    }
}

#[test]
fn without_mergeable_buffers_a_too_small_buffer_drops_the_frame_only() {
    let mut d = Driver::new(BASIC);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 1514, 11);
    d.post_rx(1, 100);
    d.host_sends(&frame);
    let (_, len) = d.next_used(RX_QUEUE);
    assert_eq!(len, 0, "the buffer comes back empty");
    assert!(d.counters().3 >= 1, "the drop is counted");
    // A buffer of the right size gets the next frame, num_buffers 1.
    loop {
        let bufs = d.post_rx(1, 1526);
        d.host_sends(&frame);
        let (_, len) = d.next_used(RX_QUEUE);
        let got = d.read(bufs[0], len as usize);
        if len as usize == VNET_HDR_LEN + frame.len() && got[VNET_HDR_LEN..] == frame[..] {
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
            break;
        }
    }
}

/// CPU time (user + system, in clock ticks) of this process's `crx-net` threads.
fn net_thread_ticks() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "crx-net" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are 14, 15.
        let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        total += fields
            .get(11)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        total += fields
            .get(12)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[test]
fn with_no_rx_buffers_frames_wait_in_the_tap_without_spinning() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    let frames: Vec<_> = (0..3)
        .map(|i| test_frame(GUEST_MAC, HOST_MAC, 200, 100 + i))
        .collect();
    for f in &frames {
        d.host_sends(f);
    }
    let before = net_thread_ticks();
    let start = Instant::now();
    // Measured, not hoped: CPU the thread burns while it has frames but no buffers.
    while start.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let spent = net_thread_ticks() - before;
    assert!(
        spent <= 3,
        "crx-net used {spent} ticks in 300 ms without rx buffers"
    );
    assert!(d.nothing_used(RX_QUEUE));
    // Buffers arrive: every frame is delivered, in order.
    let bufs = d.post_rx(16, 2048);
    let mut got = Vec::new();
    while got.len() < frames.len() {
        let (id, len) = d.next_used(RX_QUEUE);
        let b = d.read(bufs[id as usize % 16], len as usize);
        if b.len() > VNET_HDR_LEN + 14
            && b[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == TEST_ETHERTYPE.to_be_bytes()
        {
            got.push(b[VNET_HDR_LEN..].to_vec());
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_device_keeps_working() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    // Shorter than the header.
    let short = d.alloc.alloc(8);
    let h = d.tx.add_chain(&[readable(short, 8)]);
    d.notify(1);
    assert_eq!(d.next_used(TX_QUEUE), (u32::from(h), 0));
    // A device-writable descriptor in a tx chain.
    let bad = test_frame(HOST_MAC, GUEST_MAC, 100, 1);
    let a = d.alloc.alloc(112);
    d.mem.write_slice(&[0u8; 12], a).unwrap();
    d.mem.write_slice(&bad, GuestAddress(a.0 + 12)).unwrap();
    let h =
        d.tx.add_chain(&[readable(a, 12), writable(GuestAddress(a.0 + 12), 100)]);
    d.notify(1);
    assert_eq!(d.next_used(TX_QUEUE), (u32::from(h), 0));
    // Longer than header + 65550.
    let big = d.alloc.alloc(MAX_BUFFER_LEN as u64 + 1);
    let mut hdr_and_frame = vec![0u8; MAX_BUFFER_LEN + 1];
    hdr_and_frame[VNET_HDR_LEN..VNET_HDR_LEN + 14]
        .copy_from_slice(&test_frame(HOST_MAC, GUEST_MAC, 14, 2)[..14]);
    d.mem.write_slice(&hdr_and_frame, big).unwrap();
    let h =
        d.tx.add_chain(&[readable(big, (MAX_BUFFER_LEN + 1) as u32)]);
    d.notify(1);
    assert_eq!(d.next_used(TX_QUEUE), (u32::from(h), 0));
    // Outside guest memory, and an offload the driver did not negotiate.
    let h =
        d.tx.add_chain(&[readable(GuestAddress(u64::MAX - 100), 1000)]);
    d.notify(1);
    assert_eq!(d.next_used(TX_QUEUE), (u32::from(h), 0));
    let mut tso = plain_hdr();
    tso[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    tso[1] = VIRTIO_NET_HDR_GSO_TCPV4;
    d.send(tso, &test_frame(HOST_MAC, GUEST_MAC, 100, 3), 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.counters().1, 5, "five chains dropped");
    // None of them reached the tap: the first frame out is the good one.
    let good = test_frame(HOST_MAC, GUEST_MAC, 300, 4);
    d.send(plain_hdr(), &good, 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.host_receives().as_deref(), Some(&good[..]));
    assert_eq!(d.counters().0, 1);
}

#[test]
fn malformed_rx_chains_do_not_stop_the_device() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    // A read-only rx buffer and one outside memory hold nothing: the frame goes on
    // to the next buffers, and the bad ones come back empty.
    let ro = d.alloc.alloc(2048);
    d.rx.add_chain(&[readable(ro, 2048)]);
    d.rx.add_chain(&[writable(GuestAddress(u64::MAX - 10), 2048)]);
    d.notify(0);
    let good = d.post_rx(1, 2048)[0];
    let frame = test_frame(GUEST_MAC, HOST_MAC, 400, 12);
    d.host_sends(&frame);
    let (_, l1) = d.next_used(RX_QUEUE);
    let (_, l2) = d.next_used(RX_QUEUE);
    let (_, l3) = d.next_used(RX_QUEUE);
    assert_eq!((l1, l2), (0, 0), "unusable buffers hold nothing");
    assert_eq!(d.read(ro, 16), vec![0u8; 16], "read-only buffer untouched");
    let got = d.read(good, l3 as usize);
    assert_eq!(
        u16::from_le_bytes([got[10], got[11]]),
        3,
        "num_buffers counts all three"
    );
    // The device still moves frames both ways.
    let out = test_frame(HOST_MAC, GUEST_MAC, 64, 13);
    d.send(plain_hdr(), &out, 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.host_receives().as_deref(), Some(&out[..]));
}

#[test]
fn a_partial_checksum_frame_passes_once_csum_is_negotiated_and_reset_brings_the_device_back() {
    let features = BASIC
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_HOST_TSO4;
    let mut d = Driver::new(features);
    // A partial-checksum frame is accepted now that CSUM is negotiated.
    let mut hdr = plain_hdr();
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    let ip_like = test_frame(HOST_MAC, GUEST_MAC, 100, 5);
    // Where a UDP checksum sits behind Ethernet + IPv4 headers (the host kernel
    // refuses a checksum start inside the first 20 bytes after the MAC header).
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset
    d.send(hdr, &ip_like, 4096);
    d.next_used(TX_QUEUE);
    let got = d.host_receives();
    assert!(
        got.is_some(),
        "partial-checksum frame passed: {:?} acked {:#x}",
        d.counters(),
        d.dev.lock().unwrap().acked_features()
    );
    assert_eq!(d.counters().1, 0);

    w(&mut d.t, 0x70, 0);
    assert_eq!(r(&mut d.t, 0x70), 0, "reset accepted");
    assert!(!d.dev.lock().unwrap().is_active(), "thread stopped");
    d.rx = TestQueue::new(&d.mem, GuestAddress(RX_BASE), QSIZE);
    d.tx = TestQueue::new(&d.mem, GuestAddress(TX_BASE), QSIZE);
    d.rx_seen = 0;
    d.tx_seen = 0;
    d.bring_up(BASIC);
    let again = test_frame(HOST_MAC, GUEST_MAC, 80, 6);
    d.send(plain_hdr(), &again, 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.host_receives().as_deref(), Some(&again[..]));
}

#[test]
fn the_device_refuses_what_is_not_a_tap_in_the_right_mode() {
    // A pipe.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned by nothing else.
    let (r_end, w_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let err = Tap::from_inherited_fd(r_end.as_raw_fd()).unwrap_err();
    assert!(matches!(err, NetError::NotATap { .. }), "{err}");
    assert!(err.is_bad_input());
    assert!(err.to_string().contains("is not a tap"), "{err}");
    // The refused fd was left open for its owner.
    // SAFETY: F_GETFD only queries the descriptor table.
    assert!(unsafe { libc::fcntl(r_end.as_raw_fd(), libc::F_GETFD) } >= 0);
    // A regular file.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert!(matches!(
        Tap::from_inherited_fd(file.as_raw_fd()),
        Err(NetError::NotATap { .. })
    ));
    // A closed fd.
    let closed = w_end.as_raw_fd();
    drop(w_end);
    let err = Tap::from_inherited_fd(closed).unwrap_err();
    assert!(matches!(err, NetError::FdNotOpen(_)), "{err}");
    // /dev/net/tun opened but not attached, a tun (not tap) and a tap without a
    // vnet header: all tun fds, none usable.
    let unattached = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    assert!(Tap::from_inherited_fd(unattached.as_raw_fd()).is_err());
    let (tun, no_vnet) = in_netns(None, || {
        Ok((
            tap::open_with_flags("crxtun0", 0x0001 | 0x1000 | 0x4000)?,
            tap::open_with_flags("crxtap1", 0x0002 | 0x1000)?,
        ))
    })
    .unwrap();
    for fd in [&tun, &no_vnet] {
        let err = Tap::from_inherited_fd(fd.as_raw_fd()).unwrap_err();
        assert!(matches!(err, NetError::WrongMode { .. }), "{err}");
        assert!(err.is_bad_input());
    }
    // And a real tap in the right mode passes, set non-blocking.
    let ok = IsolatedTap::new("crxok0").unwrap();
    // SAFETY: F_GETFL only queries the fd's flags.
    let flags = unsafe { libc::fcntl(ok.tap.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    assert_eq!(ok.tap.name(), "crxok0");
}

#[test]
fn open_tap_rejects_bad_names() {
    assert!(open_tap("").is_err());
    assert!(open_tap("a-name-longer-than-15").is_err());
}

/// An Ethernet + IPv4 + TCP frame to the guest carrying `payload` bytes, and the
/// 10-byte vnet header that makes it one GSO frame of `mss`-byte segments.
fn tcp_gso_frame(payload: usize, mss: u16) -> ([u8; 10], Vec<u8>) {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    let mut ip = [
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 203, 1, 1, 10, 203, 1, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    // Ports 40000 -> 5201, seq 1, data offset 5 words, ACK|PSH, window 64 KiB.
    f.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend((0..payload).map(|i| (i % 253) as u8));
    let mut vnet = [0u8; 10];
    vnet[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vnet[1] = VIRTIO_NET_HDR_GSO_TCPV4;
    vnet[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    vnet[4..6].copy_from_slice(&mss.to_le_bytes()); // gso_size
    vnet[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
    vnet[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: TCP checksum
    (vnet, f)
}

/// Sends a 4000-byte TCP GSO frame into the tap from the host side.
fn host_sends_gso(d: &Driver) -> Vec<u8> {
    let (vnet, frame) = tcp_gso_frame(4000, 1448);
    d.peer.enable_vnet_hdr().unwrap();
    let mut bytes = vnet.to_vec();
    bytes.extend_from_slice(&frame);
    assert_eq!(d.peer.send_as(&bytes, 0x0800).unwrap(), bytes.len());
    frame
}

fn is_our_tcp(frame: &[u8]) -> bool {
    frame.len() >= 54
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 6
        && frame[36..38] == [0x14, 0x51]
}

#[test]
fn a_guest_that_accepts_tso_gets_a_host_gso_frame_whole() {
    let mut d = Driver::new(
        BASIC
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6,
    );
    d.post_rx(16, 2048);
    let sent = host_sends_gso(&d);
    let (hdr, frame) = loop {
        let (hdr, frame) = d.recv_frame();
        if is_our_tcp(&frame) {
            break (hdr, frame);
        }
        d.post_rx(4, 2048);
    };
    assert_eq!(frame, sent, "one 4054-byte frame, not segmented");
    assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_TCPV4, "gso_type");
    assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]), 1448, "gso_size");
    assert_eq!(
        hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_F_NEEDS_CSUM
    );
    assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 34, "csum_start");
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        2,
        "12 + 4054 bytes in 2 KiB buffers"
    );
}

#[test]
fn a_guest_without_offloads_gets_host_gso_frames_segmented_and_checksummed() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    d.post_rx(16, 2048);
    host_sends_gso(&d);
    let mut payload = 0;
    let mut segments = 0;
    while payload < 4000 {
        let (hdr, frame) = d.recv_frame();
        if !is_our_tcp(&frame) {
            d.post_rx(1, 2048);
            continue;
        }
        assert_eq!(
            hdr[..2],
            [0, VIRTIO_NET_HDR_GSO_NONE],
            "plain frame, checksum done"
        );
        assert!(frame.len() <= 1514, "segment of {} bytes", frame.len());
        payload += frame.len() - 54;
        segments += 1;
    }
    assert_eq!((payload, segments), (4000, 3), "1448 + 1448 + 1104 bytes");
}

#[test]
fn a_gso_frame_queued_before_a_reset_never_reaches_a_driver_without_tso() {
    let mut d = Driver::new(
        BASIC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4,
    );
    // No rx buffers: the device holds at most the first frame; the second stays in
    // the tap's queue as a GSO frame made under this driver's TSO.
    host_sends_gso(&d);
    host_sends_gso(&d);
    w(&mut d.t, 0x70, 0);
    assert!(!d.dev.lock().unwrap().is_active());
    d.rx = TestQueue::new(&d.mem, GuestAddress(RX_BASE), QSIZE);
    d.tx = TestQueue::new(&d.mem, GuestAddress(TX_BASE), QSIZE);
    d.rx_seen = 0;
    d.tx_seen = 0;
    d.rx_bufs.clear();
    d.bring_up(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    d.post_rx(16, 2048);
    let marker = test_frame(GUEST_MAC, HOST_MAC, 100, 77);
    d.peer
        .send_as(&[&[0u8; 10][..], &marker].concat(), TEST_ETHERTYPE)
        .unwrap();
    // Everything before the marker is looked at; no GSO frame may get through.
    loop {
        let (hdr, frame) = d.recv_frame();
        assert_eq!(
            hdr[1], VIRTIO_NET_HDR_GSO_NONE,
            "GSO frame reached a non-TSO driver"
        );
        assert_eq!(hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
        if frame == marker {
            break;
        }
    }
    assert!(
        d.counters().3 >= 1,
        "the stale GSO frame was dropped, and counted"
    );
}

/// The used ring's flags word: bit 0 asks the driver not to notify.
fn no_notify(mem: &GuestMemoryMmap, q: &TestQueue) -> bool {
    mem.read_obj::<u16>(q.used).unwrap() & 1 != 0
}

#[test]
fn the_driver_is_asked_to_notify_rx_only_while_the_device_waits_for_buffers() {
    let mut d = Driver::new(BASIC | VIRTIO_NET_F_MRG_RXBUF);
    let wait_for = |d: &Driver, want: bool, what: &str| {
        let deadline = Instant::now() + WAIT;
        while no_notify(&d.mem, &d.rx) != want {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // Idle with nothing to deliver: buffers can be posted without a notification
    // (they are looked for when a frame comes).
    wait_for(&d, true, "rx notifications never suppressed");
    // A frame and no buffers: now the device needs the next rx notification.
    let first = test_frame(GUEST_MAC, HOST_MAC, 100, 20);
    d.host_sends(&first);
    wait_for(&d, false, "rx notifications never enabled");
    assert!(!no_notify(&d.mem, &d.rx));
    // With buffers posted (and the frame delivered) it needs none.
    d.post_rx(8, 2048);
    loop {
        let (_, frame) = d.recv_frame();
        if frame == first {
            break;
        }
    }
    assert!(
        no_notify(&d.mem, &d.rx),
        "rx notifications suppressed while buffers last"
    );
    // tx: after a batch the device is idle again and wants notifications.
    let out = test_frame(HOST_MAC, GUEST_MAC, 64, 21);
    d.send(plain_hdr(), &out, 4096);
    d.next_used(TX_QUEUE);
    assert_eq!(d.host_receives().as_deref(), Some(&out[..]));
    assert!(!no_notify(&d.mem, &d.tx), "tx notifications on while idle");
}
