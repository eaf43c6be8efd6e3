//! The net back end driven directly, without a guest, for `crx-bench net`; and the
//! throwaway network namespaces the unit tests and the benchmark put their taps in.
//!
//! A namespace here is made by one short-lived thread (`unshare(CLONE_NEWNET)`, or
//! `setns` into a named one): the tap and packet sockets it opens keep that namespace
//! alive, and closing them ends it, tap included, so nothing is left behind and no
//! frame can leave the machine (the namespace has no route anywhere).
//!
//! The guest is played by [`Ring`]: split virtqueues in plain guest memory, one
//! descriptor per buffer, the way the unit tests drive the device.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{open_tap, Net, Tap, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Ethertype of the frames tests and the benchmark send (IEEE "local experimental"):
/// the host kernel ignores it, so nothing but our sockets reacts to them.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

const ETH_P_ALL: u16 = 0x0003;

/// Runs `f` on a fresh thread inside a new network namespace (`netns: None`) or the
/// named one at `netns` (a `/run/netns/NAME` file). What `f` opens stays in that
/// namespace after the thread ends.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns_file = netns.map(File::open).transpose()?;
    let thread = std::thread::Builder::new()
        .name("crx-netns".into())
        .spawn(move || {
            let rc = match &ns_file {
                // SAFETY: setns on an open netns file; affects only this thread.
                Some(file) => unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                // SAFETY: unshare with CLONE_NEWNET affects only this thread.
                None => unsafe { libc::unshare(libc::CLONE_NEWNET) },
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?;
    thread
        .join()
        .map_err(|_| io::Error::other("the network-namespace thread panicked"))?
}

/// Sets interface `name` up in the calling thread's network namespace.
pub fn link_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one 40-byte `struct ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, req.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = u16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, req.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns IPv6 off for new interfaces in the calling thread's namespace, so a fresh
/// link does not send router solicitations into the tests' traffic. Best effort.
fn quiet_ipv6() {
    for key in ["default", "all"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1");
    }
}

/// A raw AF_PACKET socket bound to one interface: the "other end" of a tap or veth.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it in the calling thread's namespace, bound to interface `name`.
    pub fn bind(name: &str) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: `cname` is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        let ifindex = ifindex as i32;
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let big: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: the option value is a live int of the size passed. Best effort.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&big as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        Ok(Self { fd, ifindex })
    }

    /// From now on every frame sent starts with a 10-byte `virtio_net_hdr` (as a
    /// tap's reader would write it): how tests hand the kernel a GSO frame.
    pub fn enable_vnet_hdr(&self) -> io::Result<()> {
        const SOL_PACKET: libc::c_int = 263;
        const PACKET_VNET_HDR: libc::c_int = 15;
        let on: libc::c_int = 1;
        // SAFETY: the option value is a live int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one frame tagged with `ethertype` as its protocol (the kernel checks it
    /// against a vnet header's GSO type).
    pub fn send_as(&self, frame: &[u8], ethertype: u16) -> io::Result<usize> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        // SAFETY: `frame` is readable for its length and `addr` is a valid
        // sockaddr_ll of the length passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Receives one frame, waiting at most `timeout`; `Ok(None)` on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(None);
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Waits up to `timeout` for a frame of [`TEST_ETHERTYPE`]; other traffic is skipped.
    pub fn recv_test_frame(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(buf, left)? {
                Some(n) if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() => {
                    return Ok(Some(n))
                }
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }
}

/// A tap in a network namespace of its own, up, with a packet socket on it.
pub struct IsolatedTap {
    pub tap: Tap,
    pub peer: PacketSocket,
    pub name: String,
}

impl IsolatedTap {
    /// Creates tap `name` in a new namespace (names only need to be unique within it).
    pub fn new(name: &str) -> io::Result<Self> {
        let owned = name.to_owned();
        let (fd, peer) = in_netns(None, move || {
            quiet_ipv6();
            let fd = open_tap(&owned)?;
            link_up(&owned)?;
            let peer = PacketSocket::bind(&owned)?;
            Ok((fd, peer))
        })?;
        let tap = Tap::from_owned(fd).map_err(io::Error::other)?;
        Ok(Self {
            tap,
            peer,
            name: name.to_owned(),
        })
    }
}

/// An Ethernet frame of `len` bytes (header included) to `dst`, of [`TEST_ETHERTYPE`],
/// payload bytes `seq`-dependent so frames differ.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32).wrapping_add(seq) as u8;
    }
    f
}

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
