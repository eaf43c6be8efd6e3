//! The muxer driven as the device thread drives it, with the test playing the guest
//! (packets in plain memory) and real host Unix sockets on the other side.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use super::*;
use crate::devices::virtio::test_utils::TestDir;
use crate::devices::virtio::vsock::bench::{Hdr, OwnedPacket};
use crate::devices::virtio::vsock::{
    CONN_TX_BUF_SIZE, VSOCK_FLAGS_SHUTDOWN_RCV, VSOCK_FLAGS_SHUTDOWN_SEND, VSOCK_OP_CREDIT_REQUEST,
    VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_RESPONSE, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN,
};

const CID: u64 = 3;
const WAIT: Duration = Duration::from_secs(5);

struct Rig {
    m: VsockMuxer,
    path: PathBuf,
    _dir: TestDir,
}

fn rig_with(f: impl FnOnce(&mut MuxerConfig)) -> Rig {
    let dir = TestDir::new("mux");
    let path = dir.0.join("v.sock");
    let mut cfg = MuxerConfig::new(CID, path.clone());
    cfg.handshake_timeout = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_millis(300);
    f(&mut cfg);
    Rig {
        m: VsockMuxer::new(cfg).unwrap(),
        path,
        _dir: dir,
    }
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn poll_fd(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: valid pollfd for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

impl Rig {
    fn send(&mut self, h: Hdr, data: &[u8]) {
        let mut p = OwnedPacket::tx(h, data);
        self.m.send_pkt(&p.packet());
    }

    /// The next packet for the guest, waiting on the muxer's fd up to `within`.
    fn recv_within(&mut self, within: Duration, cap: usize) -> Option<OwnedPacket> {
        let deadline = Instant::now() + within;
        loop {
            let mut rx = OwnedPacket::rx(cap);
            if self.m.has_pending_rx() && self.m.recv_pkt(&mut rx.packet()) {
                return Some(rx);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            poll_fd(self.m.as_raw_fd(), left.as_millis().min(50) as i32);
            self.m.process_events();
        }
    }

    fn recv(&mut self) -> Hdr {
        self.recv_within(WAIT, 4096)
            .expect("a packet for the guest")
            .hdr()
    }

    fn recv_pkt(&mut self) -> OwnedPacket {
        self.recv_within(WAIT, 4096)
            .expect("a packet for the guest")
    }

    fn client(&self, line: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(&self.path).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.write_all(line).unwrap();
        c
    }

    /// Full host-initiated handshake; returns (client, host port).
    fn connect(&mut self, guest_port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let mut c = self.client(format!("CONNECT {guest_port}\n").as_bytes());
        let req = self.recv();
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        let mut resp = Hdr::guest(CID, guest_port, req.src_port, VSOCK_OP_RESPONSE);
        resp.buf_alloc = guest_buf_alloc;
        self.send(resp, &[]);
        assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
        (c, req.src_port)
    }
}

fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(_) => line.push(b[0]),
            Err(e) => panic!("reading the OK line: {e}"),
        }
    }
    String::from_utf8(line).unwrap()
}

/// True once the peer closed: read returns 0 (or a reset) before `WAIT`.
fn sees_eof(c: &mut UnixStream) -> bool {
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == io::ErrorKind::ConnectionReset,
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}

fn rw(port: u32, host_port: u32, fwd_cnt: u32) -> Hdr {
    let mut h = Hdr::guest(CID, port, host_port, VSOCK_OP_RW);
    h.buf_alloc = 64 * 1024;
    h.fwd_cnt = fwd_cnt;
    h
}

#[test]
fn new_refuses_existing_path_missing_dir_and_bad_cid() {
    let dir = TestDir::new("new");
    let path = dir.0.join("s");
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        VsockMuxer::new(MuxerConfig::new(CID, path.clone())),
        Err(VsockError::PathExists(_))
    ));
    assert!(matches!(
        VsockMuxer::new(MuxerConfig::new(CID, dir.0.join("nope/s"))),
        Err(VsockError::NoDirectory(_))
    ));
    assert!(matches!(
        VsockMuxer::new(MuxerConfig::new(2, dir.0.join("t"))),
        Err(VsockError::InvalidCid(2))
    ));
    let long = dir.0.join("x".repeat(120));
    assert!(matches!(
        VsockMuxer::new(MuxerConfig::new(CID, long)),
        Err(VsockError::PathTooLong(_))
    ));
    // The socket file lives as long as the muxer.
    let sock = dir.0.join("ok");
    let m = VsockMuxer::new(MuxerConfig::new(CID, sock.clone())).unwrap();
    assert!(sock.exists());
    drop(m);
    assert!(!sock.exists());
}

#[test]
fn host_connect_data_both_ways_and_clean_shutdown() {
    let mut r = rig();
    let mut c = r.client(b"CONNECT 1024\n");
    let req = r.recv();
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
        (VSOCK_OP_REQUEST, HOST_CID, CID, 1024, VSOCK_TYPE_STREAM)
    );
    assert!(req.src_port >= EPHEMERAL_PORT_FIRST);
    assert_eq!(req.buf_alloc, CONN_TX_BUF_SIZE);
    let hp = req.src_port;
    let mut resp = Hdr::guest(CID, 1024, hp, VSOCK_OP_RESPONSE);
    resp.buf_alloc = 64 * 1024;
    r.send(resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {hp}\n"));

    c.write_all(b"hello guest").unwrap();
    let p = r.recv_pkt();
    assert_eq!(p.hdr().op, VSOCK_OP_RW);
    assert_eq!((p.hdr().src_port, p.hdr().dst_port), (hp, 1024));
    assert_eq!(p.payload(), b"hello guest");

    r.send(rw(1024, hp, 11), b"hello host");
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // Host half-closes: the guest learns it will get no more data.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let sh = r.recv();
    assert_eq!(
        (sh.op, sh.flags),
        (VSOCK_OP_SHUTDOWN, VSOCK_FLAGS_SHUTDOWN_SEND)
    );
    // The other direction still works after the half-close.
    r.send(rw(1024, hp, 11), b"still here");
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    // Guest closes both ways: host answers RST, the client sees EOF.
    let mut sd = Hdr::guest(CID, 1024, hp, VSOCK_OP_SHUTDOWN);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
    r.send(sd, &[]);
    let rst = r.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (VSOCK_OP_RST, hp, 1024)
    );
    assert!(sees_eof(&mut c));
    assert_eq!(r.m.connection_count(), 0);
}

#[test]
fn guest_half_close_reaches_host_as_eof() {
    let mut r = rig();
    let (mut c, hp) = r.connect(1024, 64 * 1024);
    r.send(rw(1024, hp, 0), b"last words");
    let mut sd = Hdr::guest(CID, 1024, hp, VSOCK_OP_SHUTDOWN);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    sd.buf_alloc = 64 * 1024;
    r.send(sd, &[]);
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    // The host can still answer.
    c.write_all(b"reply").unwrap();
    let p = r.recv_pkt();
    assert_eq!(p.payload(), b"reply");
}

#[test]
fn host_to_guest_bulk_respects_guest_credit() {
    let mut r = rig();
    let guest_buf = 64 * 1024u32;
    let (c, hp) = r.connect(1024, guest_buf);
    let data = pattern(1 << 20, 7);
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        let mut c = c;
        c.write_all(&to_send).unwrap();
        c
    });
    let mut got = Vec::new();
    let mut fwd = 0u32;
    let mut stalls = 0;
    while got.len() < data.len() {
        match r.recv_within(Duration::from_millis(300), 4096) {
            Some(p) => {
                let h = p.hdr();
                match h.op {
                    VSOCK_OP_RW => got.extend_from_slice(p.payload()),
                    VSOCK_OP_CREDIT_REQUEST | VSOCK_OP_CREDIT_UPDATE => {}
                    op => panic!("unexpected op {op}"),
                }
                // Never more in flight than the guest's buffer.
                assert!(got.len() as u32 - fwd <= guest_buf, "credit overrun");
            }
            None => {
                // The muxer stopped: exactly a full guest buffer is outstanding.
                assert_eq!(got.len() as u32 - fwd, guest_buf);
                stalls += 1;
                fwd = got.len() as u32;
                let mut cu = Hdr::guest(CID, 1024, hp, VSOCK_OP_CREDIT_UPDATE);
                cu.buf_alloc = guest_buf;
                cu.fwd_cnt = fwd;
                r.send(cu, &[]);
            }
        }
    }
    assert_eq!(got, data, "byte-exact");
    assert!(
        stalls >= 15,
        "credit limited the transfer ({stalls} stalls)"
    );
    drop(writer.join().unwrap());
}

#[test]
fn host_bulk_then_close_reaches_the_guest_whole_then_as_shutdown() {
    // Bulk host data goes through the connection's read-ahead buffer; every byte must
    // still arrive, in order, before the SHUTDOWN that the host's close becomes.
    let mut r = rig();
    let (c, _hp) = r.connect(1024, 1 << 20);
    let data = pattern(300 * 1024 + 123, 3);
    // More than a socket buffer holds: the writer blocks until the muxer reads.
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        let mut c = c;
        c.write_all(&to_send).unwrap();
    });
    let mut got = Vec::new();
    loop {
        let p = r.recv_pkt();
        match p.hdr().op {
            VSOCK_OP_RW => got.extend_from_slice(p.payload()),
            VSOCK_OP_SHUTDOWN => break,
            VSOCK_OP_CREDIT_UPDATE => {}
            op => panic!("unexpected op {op}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes reordered or changed");
}

#[test]
fn guest_to_host_bulk_with_credit_updates() {
    let mut r = rig();
    let (c, hp) = r.connect(1024, 64 * 1024);
    let data = pattern(3 << 20, 3);
    let len = data.len();
    let reader = std::thread::spawn(move || {
        let mut c = c;
        let mut got = vec![0u8; len];
        c.read_exact(&mut got).unwrap();
        got
    });
    let (mut buf_alloc, mut fwd_cnt) = (CONN_TX_BUF_SIZE, 0u32);
    let mut sent = 0usize;
    let mut updates = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent < len {
        assert!(Instant::now() < deadline, "transfer stalled");
        let credit = buf_alloc.saturating_sub((sent as u32).wrapping_sub(fwd_cnt)) as usize;
        let n = credit.min(64 * 1024).min(len - sent);
        if n > 0 {
            r.send(rw(1024, hp, 0), &data[sent..sent + n]);
            sent += n;
        }
        if n == 0 || r.m.has_pending_rx() {
            let p = r
                .recv_within(Duration::from_secs(2), 4096)
                .expect("a credit update once the host reads");
            let h = p.hdr();
            assert_ne!(h.op, VSOCK_OP_RST, "muxer reset a well-behaved guest");
            if h.op == VSOCK_OP_CREDIT_UPDATE {
                updates += 1;
            }
            buf_alloc = h.buf_alloc;
            fwd_cnt = h.fwd_cnt;
        }
    }
    // The last bytes may still sit in the connection's buffer.
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "final flush stalled");
        let _ = r.recv_within(Duration::from_millis(20), 4096);
    }
    assert_eq!(reader.join().unwrap(), data, "byte-exact");
    assert!(updates > 0);
}

#[test]
fn guest_connect_reaches_host_listener_on_port_socket() {
    let mut r = rig();
    let mut lpath = r.path.clone().into_os_string();
    lpath.push("_1025");
    let listener = UnixListener::bind(&lpath).unwrap();
    let mut req = Hdr::guest(CID, 5000, 1025, VSOCK_OP_REQUEST);
    req.buf_alloc = 64 * 1024;
    r.send(req, &[]);
    let resp = r.recv();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
        (VSOCK_OP_RESPONSE, 1025, 5000, CID)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    r.send(rw(5000, 1025, 0), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let p = r.recv_pkt();
    assert_eq!((p.hdr().op, p.payload()), (VSOCK_OP_RW, &b"pong"[..]));
    // Host closes: guest is told, then closes too and gets the final RST.
    drop(s);
    assert_eq!(r.recv().op, VSOCK_OP_SHUTDOWN);
    let mut sd = Hdr::guest(CID, 5000, 1025, VSOCK_OP_SHUTDOWN);
    sd.flags = 3;
    r.send(sd, &[]);
    assert_eq!(r.recv().op, VSOCK_OP_RST);
    assert_eq!(r.m.connection_count(), 0);
}

#[test]
fn guest_connect_to_port_nobody_listens_on_gets_rst() {
    let mut r = rig();
    r.send(Hdr::guest(CID, 5001, 1026, VSOCK_OP_REQUEST), &[]);
    let rst = r.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (VSOCK_OP_RST, 1026, 5001)
    );
    assert_eq!(r.m.connection_count(), 0);
}

#[test]
fn malformed_host_lines_close_only_that_client() {
    let mut r = rig();
    let (mut good, hp) = r.connect(1024, 64 * 1024);

    let mut bad = r.client(b"CONNECT abc\n");
    let mut no_newline = r.client(&[b'7'; 40]);
    let mut huge = UnixStream::connect(&r.path).unwrap();
    huge.set_read_timeout(Some(WAIT)).unwrap();
    let _ = huge.write_all(&vec![b'C'; 4096]);
    let mut silent = UnixStream::connect(&r.path).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();

    // Keep the muxer turning while the clients wait.
    let pump = |r: &mut Rig| {
        let _ = r.recv_within(Duration::from_millis(50), 4096);
    };
    for c in [&mut bad, &mut no_newline, &mut huge] {
        pump(&mut r);
        assert!(sees_eof(c));
    }
    // The silent client is closed after the handshake timeout.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        pump(&mut r);
        if !poll_fd(silent.as_raw_fd(), 0) {
            continue;
        }
        break;
    }
    assert!(sees_eof(&mut silent));
    // Nothing reached the guest, and the good connection still works.
    assert!(r.recv_within(Duration::from_millis(100), 4096).is_none());
    good.write_all(b"ok?").unwrap();
    assert_eq!(r.recv_pkt().payload(), b"ok?");
    r.send(rw(1024, hp, 3), b"ok!");
    let mut b = [0u8; 3];
    good.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok!");
}

#[test]
fn guest_that_never_answers_request_is_timed_out() {
    let mut r = rig();
    let mut c = r.client(b"CONNECT 1024\n");
    let req = r.recv();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    let rst = r.recv();
    assert_eq!((rst.op, rst.src_port), (VSOCK_OP_RST, req.src_port));
    assert!(sees_eof(&mut c));
    assert_eq!(r.m.connection_count(), 0);
}

#[test]
fn guest_rst_to_request_closes_the_client() {
    let mut r = rig();
    let mut c = r.client(b"CONNECT 99\n");
    let req = r.recv();
    r.send(Hdr::guest(CID, 99, req.src_port, VSOCK_OP_RST), &[]);
    assert!(sees_eof(&mut c));
    assert!(
        r.recv_within(Duration::from_millis(100), 4096).is_none(),
        "no RST answers an RST"
    );
}

#[test]
fn malformed_guest_packets_never_panic_and_get_rst() {
    let mut r = rig();
    // Wrong addresses: dropped without a word.
    let mut h = Hdr::guest(CID + 1, 1, 2, VSOCK_OP_REQUEST);
    r.send(h, &[]);
    h = Hdr::guest(CID, 1, 2, VSOCK_OP_REQUEST);
    h.dst_cid = 7;
    r.send(h, &[]);
    assert!(r.recv_within(Duration::from_millis(50), 4096).is_none());

    // Unknown op, wrong type, RW to nowhere, length beyond the limit, data shorter
    // than its length: each gets an RST.
    r.send(Hdr::guest(CID, 10, 20, 99), &[]);
    let mut t = Hdr::guest(CID, 11, 20, VSOCK_OP_REQUEST);
    t.type_ = 2;
    r.send(t, &[]);
    r.send(Hdr::guest(CID, 12, 20, VSOCK_OP_RW), b"x");
    let mut big = Hdr::guest(CID, 13, 20, VSOCK_OP_RW);
    big.len = MAX_PKT_DATA + 1;
    r.send(big, &[0u8; 16]);
    let mut short = Hdr::guest(CID, 14, 20, VSOCK_OP_RW);
    short.len = 100;
    r.send(short, &[0u8; 10]);
    let mut ports = Vec::new();
    for _ in 0..5 {
        let h = r.recv();
        assert_eq!(h.op, VSOCK_OP_RST);
        ports.push(h.dst_port);
    }
    assert_eq!(ports, vec![10, 11, 12, 13, 14]);

    // An unknown op on a live connection resets it.
    let (mut c, hp) = r.connect(1024, 4096);
    r.send(Hdr::guest(CID, 1024, hp, 42), &[]);
    assert_eq!(r.recv().op, VSOCK_OP_RST);
    assert!(sees_eof(&mut c));
    assert_eq!(r.m.connection_count(), 0);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut r = rig();
    let (mut c, hp) = r.connect(1024, 4096);
    // The client never reads; the guest ignores buf_alloc.
    let chunk = vec![1u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        r.send(rw(1024, hp, 0), &chunk);
        if let Some(p) = r.recv_within(Duration::ZERO, 4096) {
            if p.hdr().op == VSOCK_OP_RST {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "4 MiB into a 256 KiB window without an RST");
    assert!(sees_eof(&mut c));
}

#[test]
fn full_guest_rx_does_not_keep_the_muxer_fd_busy() {
    let mut r = rig();
    let (mut c, _hp) = r.connect(1024, 64 * 1024);
    c.write_all(&[9u8; 1000]).unwrap();
    assert!(poll_fd(r.m.as_raw_fd(), 5000));
    r.m.process_events();
    assert!(r.m.has_pending_rx());
    // The guest has no rx buffers: nobody calls recv_pkt. More host data must not
    // wake the muxer's fd again for this connection.
    c.write_all(&[9u8; 1000]).unwrap();
    assert!(
        !poll_fd(r.m.as_raw_fd(), 100),
        "muxer fd readable while rx is stalled"
    );
    // Once the guest gives a buffer, data flows again.
    let p = r.recv_pkt();
    assert_eq!(p.hdr().op, VSOCK_OP_RW);
    assert_eq!(p.payload().len(), 2000);
}

#[test]
fn connection_limit_refuses_extra_guest_connections() {
    let mut r = rig_with(|c| c.max_connections = 2);
    let mut lpath = r.path.clone().into_os_string();
    lpath.push("_1025");
    let _listener = UnixListener::bind(&lpath).unwrap();
    for port in [1, 2, 3] {
        r.send(Hdr::guest(CID, port, 1025, VSOCK_OP_REQUEST), &[]);
    }
    let mut answers: Vec<(u32, u16)> = (0..3)
        .map(|_| {
            let h = r.recv();
            (h.dst_port, h.op)
        })
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        vec![
            (1, VSOCK_OP_RESPONSE),
            (2, VSOCK_OP_RESPONSE),
            (3, VSOCK_OP_RST)
        ]
    );
    assert_eq!(r.m.connection_count(), 2);
}

#[test]
fn random_guest_packets_never_panic() {
    let mut r = rig();
    let (_c, hp) = r.connect(1024, 4096);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..5000 {
        let v = next();
        let mut h = Hdr::guest(
            CID,
            [1024, 5, (v >> 8) as u32][v as usize % 3],
            hp,
            (v >> 16) as u16 % 9,
        );
        h.flags = (v >> 24) as u32 % 5;
        h.buf_alloc = (v >> 32) as u32;
        h.fwd_cnt = (v >> 40) as u32;
        let len = (v >> 48) as usize % 300;
        r.send(h, &vec![0u8; len]);
        let _ = r.recv_within(Duration::ZERO, 64);
    }
}
