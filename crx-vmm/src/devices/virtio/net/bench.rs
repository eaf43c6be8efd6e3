//! The net back end driven directly, without a guest, for `crx-bench net`, with taps
//! and veths in throwaway namespaces (`netns`).
//!
//! The guest is played by [`Ring`]: split virtqueues in plain guest memory, one
//! descriptor per buffer, the way the unit tests drive the device.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::netns::{in_netns, test_frame, IsolatedTap, PacketSocket, TEST_ETHERTYPE};
use super::{Net, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// A split virtqueue in guest memory as the driver sees it: one descriptor per
/// buffer, descriptor `i` always describing buffer `i`.
pub struct Ring {
    mem: GuestMemoryMmap,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// Bytes a ring of `size` entries takes from its base.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        ((16 * n + 6 + 2 * n + 3) & !3) + 6 + 8 * n
    }

    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> io::Result<Self> {
        let n = u64::from(size);
        let zeros = vec![0u8; Self::footprint(size) as usize];
        mem.write_slice(&zeros, base).map_err(io::Error::other)?;
        Ok(Self {
            mem: mem.clone(),
            size,
            desc: base,
            avail: GuestAddress(base.0 + 16 * n),
            used: GuestAddress(base.0 + ((16 * n + 6 + 2 * n + 3) & !3)),
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// The device's view of this ring, ready.
    pub fn queue(&self) -> io::Result<Queue> {
        let mut q = Queue::new(self.size).map_err(io::Error::other)?;
        q.try_set_desc_table_address(self.desc)
            .map_err(io::Error::other)?;
        q.try_set_avail_ring_address(self.avail)
            .map_err(io::Error::other)?;
        q.try_set_used_ring_address(self.used)
            .map_err(io::Error::other)?;
        q.set_ready(true);
        Ok(q)
    }

    /// Writes descriptor `index` as one buffer (device-writable if `write`).
    pub fn set_desc(
        &self,
        index: u16,
        addr: GuestAddress,
        len: u32,
        write: bool,
    ) -> io::Result<()> {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(if write { 2u16 } else { 0 }).to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(self.desc.0 + 16 * u64::from(index)))
            .map_err(io::Error::other)
    }

    /// Offers descriptor `index` (not yet visible: see [`publish`](Self::publish)).
    pub fn push(&mut self, index: u16) -> io::Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(index, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .map_err(io::Error::other)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every pushed entry visible to the device.
    pub fn publish(&self) -> io::Result<()> {
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .map_err(io::Error::other)
    }

    /// The next used element not yet seen: (descriptor id, length).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used.0 + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.used_seen % self.size));
        let id: u32 = self.mem.read_obj(at).ok()?;
        let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }
}

/// Figures of one direction through the device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Throughput {
    pub frames: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl Throughput {
    pub fn frames_per_sec(&self) -> f64 {
        self.frames as f64 / self.secs.max(1e-9)
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xc0, 0xff, 0xee];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x10000;
const BUFFERS: u64 = 0x10_0000;
/// Room for one buffer: a whole 64 KiB frame and its header.
const SLOT: u64 = 0x1_1000;

/// A [`Net`] device activated on an isolated tap, with both rings in plain memory.
struct Rig {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: EventFd,
    peer: PacketSocket,
    net: Net,
}

impl Rig {
    fn new(name: &str) -> io::Result<Self> {
        let isolated = IsolatedTap::new(name)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(io::Error::other)?;
        let rx = Ring::new(&mem, GuestAddress(RX_RING), QSIZE)?;
        let tx = Ring::new(&mem, GuestAddress(TX_RING), QSIZE)?;
        let mut net = Net::new(isolated.tap, MAC, 1500);
        net.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        let rx_kick = EventFd::new(EFD_NONBLOCK)?;
        let tx_kick = EventFd::new(EFD_NONBLOCK)?;
        let irq = EventFd::new(EFD_NONBLOCK)?;
        let interrupt = Arc::new(Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            irq.try_clone()?,
        ));
        net.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx.queue()?, tx.queue()?],
            queue_events: vec![rx_kick.try_clone()?, tx_kick.try_clone()?],
            interrupt,
        })
        .map_err(io::Error::other)?;
        Ok(Self {
            mem,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq,
            peer: isolated.peer,
            net,
        })
    }

    fn slot(i: u16) -> GuestAddress {
        GuestAddress(BUFFERS + SLOT * u64::from(i))
    }
}

/// Waits up to `ms` for the irqfd, then clears it.
fn wait_irq(irq: &EventFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    let _ = irq.read();
}

/// Guest → tap: the "guest" keeps the tx ring full of `frame_len`-byte frames for
/// `duration`; returns what the device wrote to the tap and what the packet socket on
/// the other side received.
pub fn tx_through_device(
    frame_len: usize,
    duration: Duration,
) -> io::Result<(Throughput, Throughput)> {
    let rig = Rig::new("crxbtx0")?;
    let Rig {
        mem,
        mut tx,
        tx_kick,
        irq,
        peer,
        net,
        ..
    } = rig;
    let frame = test_frame(PEER_MAC, MAC, frame_len, 0);
    let mut buf = vec![0u8; VNET_HDR_LEN + frame.len()];
    buf[VNET_HDR_LEN..].copy_from_slice(&frame);
    for i in 0..QSIZE {
        mem.write_slice(&buf, Rig::slot(i))
            .map_err(io::Error::other)?;
        tx.set_desc(i, Rig::slot(i), buf.len() as u32, false)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sink = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("crx-bench-sink".into())
            .spawn(move || {
                let mut got = Throughput::default();
                let mut b = vec![0u8; 70_000];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Some(n)) = peer.recv(&mut b, Duration::from_millis(20)) {
                        got.frames += 1;
                        got.bytes += n as u64;
                    }
                }
                got
            })?
    };
    let counters = net.counters();
    let start = Instant::now();
    let (frames0, bytes0) = (
        counters.tx_frames.load(Ordering::Relaxed),
        counters.tx_bytes.load(Ordering::Relaxed),
    );
    for i in 0..QSIZE {
        tx.push(i)?;
    }
    tx.publish()?;
    tx_kick.write(1)?;
    while start.elapsed() < duration {
        wait_irq(&irq, 10);
        let mut refilled = false;
        while let Some((id, _)) = tx.pop_used() {
            tx.push(id)?;
            refilled = true;
        }
        if refilled {
            tx.publish()?;
            tx_kick.write(1)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let sent = Throughput {
        frames: counters.tx_frames.load(Ordering::Relaxed) - frames0,
        bytes: counters.tx_bytes.load(Ordering::Relaxed) - bytes0,
        secs,
    };
    stop.store(true, Ordering::Relaxed);
    let mut received = sink
        .join()
        .map_err(|_| io::Error::other("sink thread panicked"))?;
    received.secs = secs;
    drop(net);
    Ok((sent, received))
}

/// Tap → guest: a sender thread puts `frame_len`-byte frames on the tap's wire as
/// fast as it can for `duration`; the "guest" keeps 256 rx buffers of 2 KiB posted
/// (mergeable, as Linux does). Returns what the guest received and what was sent.
pub fn rx_through_device(
    frame_len: usize,
    duration: Duration,
) -> io::Result<(Throughput, Throughput)> {
    let rig = Rig::new("crxbrx0")?;
    let Rig {
        mut rx,
        rx_kick,
        irq,
        peer,
        net,
        ..
    } = rig;
    const RX_BUF: u32 = 2048;
    for i in 0..QSIZE {
        rx.set_desc(i, Rig::slot(i), RX_BUF, true)?;
        rx.push(i)?;
    }
    rx.publish()?;
    rx_kick.write(1)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let frame = test_frame(MAC, PEER_MAC, frame_len, 1);
        std::thread::Builder::new()
            .name("crx-bench-send".into())
            .spawn(move || {
                let mut sent = Throughput::default();
                while !stop.load(Ordering::Relaxed) {
                    if peer.send(&frame).is_ok() {
                        sent.frames += 1;
                        sent.bytes += frame.len() as u64;
                    }
                }
                sent
            })?
    };
    let counters = net.counters();
    let start = Instant::now();
    let (frames0, bytes0) = (
        counters.rx_frames.load(Ordering::Relaxed),
        counters.rx_bytes.load(Ordering::Relaxed),
    );
    while start.elapsed() < duration {
        wait_irq(&irq, 10);
        let mut refilled = false;
        while let Some((id, _)) = rx.pop_used() {
            rx.push(id)?;
            refilled = true;
        }
        if refilled {
            rx.publish()?;
            rx_kick.write(1)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let received = Throughput {
        frames: counters.rx_frames.load(Ordering::Relaxed) - frames0,
        bytes: counters.rx_bytes.load(Ordering::Relaxed) - bytes0,
        secs,
    };
    stop.store(true, Ordering::Relaxed);
    let mut sent = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    sent.secs = secs;
    drop(net);
    Ok((received, sent))
}

/// The same frames between two packet sockets on a veth pair whose ends are in the
/// named namespaces `a` and `b` (`/run/netns/..` files), as the baseline: returns
/// (received at b, sent from a).
pub fn frames_over_veth(
    a: (&Path, &str),
    b: (&Path, &str),
    frame_len: usize,
    duration: Duration,
) -> io::Result<(Throughput, Throughput)> {
    let (a_name, b_name) = (a.1.to_owned(), b.1.to_owned());
    let sender = in_netns(Some(a.0), move || PacketSocket::bind(&a_name))?;
    let receiver = in_netns(Some(b.0), move || PacketSocket::bind(&b_name))?;
    let stop = Arc::new(AtomicBool::new(false));
    let send_thread = {
        let stop = stop.clone();
        let frame = test_frame(PEER_MAC, MAC, frame_len, 2);
        std::thread::Builder::new()
            .name("crx-bench-send".into())
            .spawn(move || {
                let mut sent = Throughput::default();
                while !stop.load(Ordering::Relaxed) {
                    if sender.send(&frame).is_ok() {
                        sent.frames += 1;
                        sent.bytes += frame.len() as u64;
                    }
                }
                sent
            })?
    };
    let start = Instant::now();
    let mut got = Throughput::default();
    let mut buf = vec![0u8; 70_000];
    while start.elapsed() < duration {
        if let Some(n) = receiver.recv(&mut buf, Duration::from_millis(20))? {
            if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() {
                got.frames += 1;
                got.bytes += n as u64;
            }
        }
    }
    got.secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut sent = send_thread
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    sent.secs = got.secs;
    Ok((got, sent))
}
