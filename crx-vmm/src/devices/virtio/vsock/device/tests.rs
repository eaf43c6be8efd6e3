//! The vsock device behind the real MMIO transport, with the test as the guest
//! driver: split queues in plain guest memory, packets in descriptor chains, the
//! `crx-vsock` thread doing the work.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{
    guest_memory, poll_readable, Buf, GuestAlloc, TestDir, TestQueue,
};
use crate::devices::virtio::vsock::bench::Hdr;
use crate::devices::virtio::vsock::{
    VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE, VSOCK_OP_RST, VSOCK_OP_RW,
};

const CID: u64 = 42;
const RX_BASE: u64 = 0x1000;
const TX_BASE: u64 = 0x4000;
const EV_BASE: u64 = 0x7000;
const RX_DATA: u32 = 4096;

struct Driver {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Vsock>>,
    rxq: TestQueue,
    txq: TestQueue,
    irq: EventFd,
    alloc: GuestAlloc,
    /// rx chain head → (header address, data address).
    rx_bufs: HashMap<u16, (GuestAddress, GuestAddress)>,
    rx_seen: u16,
    path: std::path::PathBuf,
    _dir: TestDir,
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    fn new() -> Self {
        let dir = TestDir::new("vsockdev");
        let path = dir.0.join("v.sock");
        let mut cfg = MuxerConfig::new(CID, path.clone());
        cfg.connect_timeout = Duration::from_secs(5);
        let dev = Arc::new(Mutex::new(Vsock::with_config(cfg).unwrap()));
        let mem = guest_memory(0x40_0000);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
        let rxq = TestQueue::new(&mem, GuestAddress(RX_BASE), 16);
        let txq = TestQueue::new(&mem, GuestAddress(TX_BASE), 16);
        let mut d = Self {
            mem,
            t,
            dev,
            rxq,
            txq,
            irq,
            alloc: GuestAlloc::new(0x10_0000, 0x40_0000),
            rx_bufs: HashMap::new(),
            rx_seen: 0,
            path,
            _dir: dir,
        };
        d.bring_up();
        d
    }

    fn bring_up(&mut self) {
        let t = &mut self.t;
        assert_eq!(r(t, 0x8), 19);
        let mut cid = [0u8; 8];
        t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
        w(t, 0x70, 1);
        w(t, 0x70, 3);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VIRTIO_F_VERSION_1
        w(t, 0x70, 0xb);
        assert_eq!(r(t, 0x70), 0xb);
        let ev = TestQueue::new(&self.mem, GuestAddress(EV_BASE), 16);
        for (i, q) in [&self.rxq, &self.txq, &ev].into_iter().enumerate() {
            w(t, 0x30, i as u32);
            w(t, 0x38, 16);
            w(t, 0x80, q.desc.0 as u32);
            w(t, 0x90, q.avail.0 as u32);
            w(t, 0xa0, q.used.0 as u32);
            w(t, 0x44, 1);
        }
        w(t, 0x70, 0xf);
        assert_eq!(r(t, 0x70), 0xf);
        assert!(self.dev.lock().unwrap().is_active());
    }

    fn add_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let h = self.alloc.alloc(PKT_HEADER_SIZE as u64);
            let d = self.alloc.alloc(u64::from(RX_DATA));
            let head = self.rxq.add_chain(&[
                Buf {
                    addr: h,
                    len: PKT_HEADER_SIZE as u32,
                    write: true,
                },
                Buf {
                    addr: d,
                    len: RX_DATA,
                    write: true,
                },
            ]);
            self.rx_bufs.insert(head, (h, d));
        }
        w(&mut self.t, 0x50, 0);
    }

    /// Puts raw chain `bufs` on the tx queue and notifies.
    fn send_chain(&mut self, bufs: &[Buf]) {
        self.txq.add_chain(bufs);
        w(&mut self.t, 0x50, 1);
    }

    fn send(&mut self, h: Hdr, data: &[u8]) {
        let mut h = h;
        h.len = data.len() as u32;
        let ha = self.alloc.alloc(PKT_HEADER_SIZE as u64);
        self.mem.write_slice(&h.to_bytes(), ha).unwrap();
        if data.is_empty() {
            self.send_chain(&[Buf {
                addr: ha,
                len: PKT_HEADER_SIZE as u32,
                write: false,
            }]);
        } else {
            let da = self.alloc.alloc(data.len() as u64);
            self.mem.write_slice(data, da).unwrap();
            self.send_chain(&[
                Buf {
                    addr: ha,
                    len: PKT_HEADER_SIZE as u32,
                    write: false,
                },
                Buf {
                    addr: da,
                    len: data.len() as u32,
                    write: false,
                },
            ]);
        }
    }

    /// Waits for the next used rx buffer; returns its header and payload.
    fn recv(&mut self, within: Duration) -> Option<(Hdr, Vec<u8>)> {
        let deadline = Instant::now() + within;
        while self.rxq.used_idx() == self.rx_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            poll_readable(self.irq.as_raw_fd(), left.as_millis().min(50) as i32);
            let _ = self.irq.read();
        }
        let (id, len) = self.rxq.used_elem(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let (ha, da) = self.rx_bufs.remove(&(id as u16)).expect("known rx head");
        let mut hb = [0u8; PKT_HEADER_SIZE];
        self.mem.read_slice(&mut hb, ha).unwrap();
        let h = Hdr::from_bytes(&hb);
        assert_eq!(
            len,
            PKT_HEADER_SIZE as u32 + h.len,
            "used length covers the packet"
        );
        let mut data = vec![0u8; h.len as usize];
        self.mem.read_slice(&mut data, da).unwrap();
        Some((h, data))
    }

    fn client_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(&self.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.recv(Duration::from_secs(5)).expect("REQUEST");
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid),
            (VSOCK_OP_REQUEST, port, CID)
        );
        let mut resp = Hdr::guest(CID, port, req.src_port, VSOCK_OP_RESPONSE);
        resp.buf_alloc = 64 * 1024;
        self.send(resp, &[]);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            c.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
        (c, req.src_port)
    }
}

/// CPU time (user + system, in clock ticks) of this process's `crx-vsock` threads.
fn vsock_thread_ticks() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "crx-vsock" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        if let Some(rest) = stat.rsplit(')').next() {
            let f: Vec<&str> = rest.split_whitespace().collect();
            total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

#[test]
fn host_connect_and_data_through_queues() {
    let mut d = Driver::new();
    d.add_rx_buffers(8);
    let (mut c, hp) = d.client_connect(1024);
    // The guest was interrupted for the used buffers.
    assert_ne!(
        d.t.interrupt_status()
            .load(std::sync::atomic::Ordering::SeqCst)
            & 1,
        0
    );

    c.write_all(b"from host").unwrap();
    let (h, data) = d.recv(Duration::from_secs(5)).expect("RW");
    assert_eq!((h.op, h.src_port, h.dst_port), (VSOCK_OP_RW, hp, 1024));
    assert_eq!(data, b"from host");

    let mut rw = Hdr::guest(CID, 1024, hp, VSOCK_OP_RW);
    rw.buf_alloc = 64 * 1024;
    d.send(rw, b"from guest");
    let mut b = [0u8; 10];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"from guest");
}

#[test]
fn guest_connect_to_nobody_gets_rst_through_queues() {
    let mut d = Driver::new();
    d.add_rx_buffers(2);
    d.send(Hdr::guest(CID, 7000, 1025, VSOCK_OP_REQUEST), &[]);
    let (h, _) = d.recv(Duration::from_secs(5)).expect("RST");
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (VSOCK_OP_RST, 1025, 7000, CID)
    );
}

#[test]
fn malformed_tx_chains_are_consumed_without_harm() {
    let mut d = Driver::new();
    d.add_rx_buffers(4);
    let small = d.alloc.alloc(64);
    // Header descriptor shorter than a header.
    d.send_chain(&[Buf {
        addr: small,
        len: 10,
        write: false,
    }]);
    // Device-writable tx descriptor.
    d.send_chain(&[Buf {
        addr: small,
        len: 64,
        write: true,
    }]);
    // A header claiming data, with no data descriptor.
    let mut h = Hdr::guest(CID, 1, 2, VSOCK_OP_RW);
    h.len = 100;
    d.mem.write_slice(&h.to_bytes(), small).unwrap();
    d.send_chain(&[Buf {
        addr: small,
        len: PKT_HEADER_SIZE as u32,
        write: false,
    }]);
    // A huge length.
    h.len = 1 << 30;
    let big = d.alloc.alloc(64);
    d.mem.write_slice(&h.to_bytes(), big).unwrap();
    d.send_chain(&[
        Buf {
            addr: big,
            len: PKT_HEADER_SIZE as u32,
            write: false,
        },
        Buf {
            addr: small,
            len: 64,
            write: false,
        },
    ]);
    // A descriptor pointing outside guest memory.
    d.send_chain(&[Buf {
        addr: GuestAddress(0x1_0000_0000),
        len: 44,
        write: false,
    }]);
    // All five come back used; the device still answers a good packet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.txq.used_idx() < 5 {
        assert!(Instant::now() < deadline, "tx chains not returned");
        poll_readable(d.irq.as_raw_fd(), 50);
    }
    d.send(Hdr::guest(CID, 7001, 1999, VSOCK_OP_REQUEST), &[]);
    let (h, _) = d.recv(Duration::from_secs(5)).expect("RST");
    assert_eq!((h.op, h.dst_port), (VSOCK_OP_RST, 7001));
}

#[test]
fn full_rx_queue_waits_without_spinning_then_resumes() {
    let mut d = Driver::new();
    d.add_rx_buffers(1);
    let (mut c, _hp) = d.client_connect(1024);
    // No rx buffers left; the host keeps writing.
    c.write_all(&[7u8; 3000]).unwrap();
    let before = vsock_thread_ticks();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        poll_readable(d.irq.as_raw_fd(), 50);
    }
    let spent = vsock_thread_ticks() - before;
    assert!(
        spent <= 5,
        "device thread burned {spent} ticks while rx was full"
    );
    assert_eq!(
        d.rxq.used_idx(),
        d.rx_seen,
        "nothing delivered without buffers"
    );
    d.add_rx_buffers(2);
    let (h, data) = d
        .recv(Duration::from_secs(5))
        .expect("data after buffers arrive");
    assert_eq!((h.op, data.len()), (VSOCK_OP_RW, 3000));
}

#[test]
fn driver_reset_drops_host_connections_and_device_comes_back() {
    let mut d = Driver::new();
    d.add_rx_buffers(4);
    let (mut c, _) = d.client_connect(1024);
    w(&mut d.t, 0x70, 0);
    assert_eq!(r(&mut d.t, 0x70), 0);
    assert!(!d.dev.lock().unwrap().is_active());
    let mut b = [0u8; 1];
    assert_eq!(
        c.read(&mut b).unwrap(),
        0,
        "host client sees EOF after the reset"
    );
    // A fresh driver can bring the device up again on the same socket.
    d.rxq = TestQueue::new(&d.mem, GuestAddress(RX_BASE), 16);
    d.txq = TestQueue::new(&d.mem, GuestAddress(TX_BASE), 16);
    d.rx_bufs.clear();
    d.rx_seen = 0;
    d.bring_up();
    d.add_rx_buffers(4);
    let _ = d.client_connect(1024);
}

#[test]
fn activate_rejects_wrong_queue_count() {
    let dir = TestDir::new("vsockq");
    let mut v = Vsock::new(CID, dir.0.join("s")).unwrap();
    let (interrupt, _, _) = crate::devices::virtio::test_utils::test_interrupt();
    let ctx = ActivateContext {
        mem: guest_memory(0x1000),
        queues: vec![],
        queue_events: vec![],
        interrupt,
    };
    assert!(matches!(
        v.activate(ctx),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 0
        })
    ));
    assert!(!v.is_active());
}
