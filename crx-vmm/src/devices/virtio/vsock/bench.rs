//! Throughput of the hybrid-vsock muxer without a guest, against a plain Unix socket
//! pair on the same machine. `crx-bench` calls [`run`]; it is a library function (not
//! a timed test) so the figures come from the same code path crx-vmm and the
//! vhost-user back end use.
//!
//! The guest is played in process: [`OwnedPacket`] gives the muxer packets in plain
//! heap memory, with the buffer sizes a Linux guest uses (64 KiB tx packets, 4 KiB rx
//! buffers by default). What is measured is the muxer and the host sockets, not
//! virtqueues or a guest kernel.

use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use super::{
    MuxerConfig, VsockMuxer, HOST_CID, MAX_PKT_DATA, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST,
    VSOCK_OP_RESPONSE, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_TYPE_STREAM,
};

/// A vsock packet in ordinary memory, standing in for a guest's buffer.
pub struct OwnedPacket {
    hdr: [u8; PKT_HEADER_SIZE],
    data: Vec<u8>,
}

/// Header fields of a guest→host packet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A stream packet from `guest_cid:src_port` to the host's `dst_port`.
    pub fn guest(guest_cid: u64, src_port: u32, dst_port: u32, op: u16) -> Self {
        Self {
            src_cid: guest_cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: VSOCK_TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    pub fn to_bytes(self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

impl OwnedPacket {
    /// An empty rx buffer with room for `cap` payload bytes.
    pub fn rx(cap: usize) -> Self {
        Self {
            hdr: [0; PKT_HEADER_SIZE],
            data: vec![0; cap],
        }
    }

    /// A guest→host packet; `hdr.len` is set from `data` unless already non-zero
    /// (tests forge lengths that way).
    pub fn tx(mut hdr: Hdr, data: &[u8]) -> Self {
        if hdr.len == 0 {
            hdr.len = data.len() as u32;
        }
        Self {
            hdr: hdr.to_bytes(),
            data: data.to_vec(),
        }
    }

    /// Views the buffer as a `VsockPacket` with its header parsed.
    pub fn packet(&mut self) -> VsockPacket<'_, ()> {
        let raw = self.hdr;
        let data = if self.data.is_empty() {
            None
        } else {
            Some(&mut self.data[..])
        };
        // SAFETY: both slices are borrowed mutably from `self` for the packet's whole
        // lifetime, so the memory stays valid and nothing else touches it meanwhile.
        let made = unsafe { VsockPacket::new(&mut self.hdr, data) };
        let mut pkt = match made {
            Ok(p) => p,
            // The header array has exactly PKT_HEADER_SIZE bytes.
            Err(_) => unreachable!("header buffer has the header size"),
        };
        // `new` starts from a zero header; give it the bytes this buffer holds.
        let _ = pkt.set_header_from_raw(&raw);
        pkt
    }

    /// Rewrites the header (`len` must fit the data buffer to be meaningful).
    pub fn set_hdr(&mut self, hdr: Hdr) {
        self.hdr = hdr.to_bytes();
    }

    pub fn hdr(&self) -> Hdr {
        Hdr::from_bytes(&self.hdr)
    }

    /// The payload the header's `len` covers.
    pub fn payload(&self) -> &[u8] {
        let len = (self.hdr().len as usize).min(self.data.len());
        &self.data[..len]
    }
}

/// Figures from one [`run`], in MB/s (10^6 bytes per second).
#[derive(Clone, Debug)]
pub struct BenchFigures {
    pub bytes: u64,
    pub rx_buf_size: usize,
    /// Host client → muxer → guest packets.
    pub host_to_guest_mbps: f64,
    /// Guest packets → muxer → host client.
    pub guest_to_host_mbps: f64,
    /// The same bytes through `UnixStream::pair`, one thread each side.
    pub unix_pair_mbps: f64,
}

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// Plays the guest's side of one connection against a muxer.
struct BenchGuest {
    muxer: VsockMuxer,
    rx: OwnedPacket,
    host_port: u32,
    consumed: u32,
    sent: u32,
    host_buf_alloc: u32,
    host_fwd_cnt: u32,
}

impl BenchGuest {
    fn send(&mut self, op: u16, data: &[u8]) {
        let mut p = OwnedPacket::tx(self.header(op, data.len() as u32), data);
        self.muxer.send_pkt(&p.packet());
    }

    fn header(&self, op: u16, len: u32) -> Hdr {
        let mut h = Hdr::guest(GUEST_CID, GUEST_PORT, self.host_port, op);
        h.buf_alloc = GUEST_BUF_ALLOC;
        h.fwd_cnt = self.consumed;
        h.len = len;
        h
    }

    /// Waits for the muxer and returns the next packet for the guest.
    fn next(&mut self, deadline: Instant) -> io::Result<Hdr> {
        loop {
            if self.muxer.has_pending_rx() && self.muxer.recv_pkt(&mut self.rx.packet()) {
                let h = self.rx.hdr();
                self.host_buf_alloc = h.buf_alloc;
                self.host_fwd_cnt = h.fwd_cnt;
                return Ok(h);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "muxer went quiet"));
            }
            wait_readable(self.muxer.as_raw_fd(), Duration::from_millis(100));
            self.muxer.process_events();
        }
    }
}

/// Moves `bytes` bytes each way through a muxer bound in `dir`, and through a plain
/// socket pair, with guest rx buffers of `rx_buf_size` bytes.
pub fn run(dir: &Path, bytes: u64, rx_buf_size: usize) -> io::Result<BenchFigures> {
    let path = dir.join(format!("bench-{}.sock", std::process::id()));
    let muxer = VsockMuxer::new(MuxerConfig::new(GUEST_CID, path.clone()))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut g = BenchGuest {
        muxer,
        rx: OwnedPacket::rx(rx_buf_size.clamp(1, MAX_PKT_DATA as usize)),
        host_port: 0,
        consumed: 0,
        sent: 0,
        host_buf_alloc: 0,
        host_fwd_cnt: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(120);

    let client = std::thread::spawn(move || -> io::Result<(Duration, Duration)> {
        let mut s = UnixStream::connect(&path)?;
        s.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            s.read_exact(&mut b)?;
            line.push(b[0]);
        }
        let chunk = vec![0x5au8; 64 * 1024];
        let t0 = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        let up = t0.elapsed();
        let t1 = Instant::now();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while got < bytes {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n as u64;
        }
        Ok((up, t1.elapsed()))
    });

    // Handshake: the host client's CONNECT becomes a REQUEST to the guest.
    let req = g.next(deadline)?;
    if req.op != VSOCK_OP_REQUEST {
        return Err(io::Error::other(format!(
            "expected REQUEST, got op {}",
            req.op
        )));
    }
    g.host_port = req.src_port;
    g.send(VSOCK_OP_RESPONSE, &[]);

    // Host → guest.
    let t0 = Instant::now();
    let mut received = 0u64;
    let mut since_update = 0u32;
    while received < bytes {
        let h = g.next(deadline)?;
        if h.op == VSOCK_OP_RW {
            received += u64::from(h.len);
            g.consumed = g.consumed.wrapping_add(h.len);
            since_update += h.len;
            // A Linux guest tells the host about freed buffer space as it reads.
            if since_update >= GUEST_BUF_ALLOC / 4 {
                since_update = 0;
                g.send(VSOCK_OP_CREDIT_UPDATE, &[]);
            }
        }
    }
    let h2g = t0.elapsed();

    // Guest → host, 64 KiB packets within the host's advertised credit. The packet
    // buffer is reused, as a guest reuses its tx buffers.
    let t1 = Instant::now();
    let mut tx = OwnedPacket::tx(
        g.header(VSOCK_OP_RW, MAX_PKT_DATA),
        &[0xa5u8; MAX_PKT_DATA as usize],
    );
    let mut left = bytes;
    while left > 0 {
        let credit = g
            .host_buf_alloc
            .saturating_sub(g.sent.wrapping_sub(g.host_fwd_cnt));
        if credit == 0 {
            let h = g.next(deadline)?;
            if h.op == VSOCK_OP_SHUTDOWN {
                return Err(io::Error::other("host closed during the bench"));
            }
            continue;
        }
        let n = (left.min(u64::from(credit))).min(u64::from(MAX_PKT_DATA)) as usize;
        tx.set_hdr(g.header(VSOCK_OP_RW, n as u32));
        g.muxer.send_pkt(&tx.packet());
        g.sent = g.sent.wrapping_add(n as u32);
        left -= n as u64;
        // Let the muxer flush buffered bytes and produce credit updates.
        g.muxer.process_events();
        while g.muxer.has_pending_rx() && g.muxer.recv_pkt(&mut g.rx.packet()) {
            let h = g.rx.hdr();
            g.host_buf_alloc = h.buf_alloc;
            g.host_fwd_cnt = h.fwd_cnt;
        }
    }
    // The client's reads finish the transfer; keep the muxer flushing until then.
    while !client.is_finished() {
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "host client stuck"));
        }
        wait_readable(g.muxer.as_raw_fd(), Duration::from_millis(10));
        g.muxer.process_events();
        while g.muxer.has_pending_rx() && g.muxer.recv_pkt(&mut g.rx.packet()) {}
    }
    let g2h = t1.elapsed();
    let (_, client_read) = client
        .join()
        .map_err(|_| io::Error::other("bench client panicked"))??;
    let g2h = g2h.max(client_read);

    Ok(BenchFigures {
        bytes,
        rx_buf_size,
        host_to_guest_mbps: mbps(bytes, h2g),
        guest_to_host_mbps: mbps(bytes, g2h),
        unix_pair_mbps: unix_pair(bytes)?,
    })
}

fn unix_pair(bytes: u64) -> io::Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            a.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = b.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let d = t0.elapsed();
    writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    Ok(mbps(bytes, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::TestDir;

    #[test]
    fn bench_moves_every_byte_both_ways() {
        let dir = TestDir::new("bench");
        let f = run(&dir.0, 4 << 20, 4096).unwrap();
        assert_eq!(f.bytes, 4 << 20);
        assert!(f.host_to_guest_mbps > 0.0 && f.guest_to_host_mbps > 0.0 && f.unix_pair_mbps > 0.0);
    }

    /// Prints the figures; run with
    /// `cargo test --release -p crx-vmm vsock_throughput_figures -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints throughput figures; not a correctness test"]
    fn vsock_throughput_figures() {
        let dir = TestDir::new("benchfig");
        for rx in [4096, 65536] {
            let f = run(&dir.0, 512 << 20, rx).unwrap();
            println!("{f:?}");
        }
    }
}
