//! The `crx-net` thread: moves frames between the guest's two queues and the tap.
//!
//! One epoll holds the rx and tx queue eventfds (level-triggered), the tap (edge-
//! triggered: a wake-up means "new frames arrived", so the thread may stop reading
//! when the guest has no rx buffers and nothing spins) and the exit eventfd. Each
//! round does at most a budget of work per direction and comes back with a zero
//! timeout if more is left, so one busy direction cannot starve the other.

use std::io::ErrorKind;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::frame::{check_rx_header, rx_ranges, TxScratch};
use super::tap::Tap;
use super::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::Interrupt;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_EXIT: u64 = 3;

/// Frames moved per direction before the thread looks at its other events again.
const BUDGET: usize = 256;

/// Frame and byte counts of one device, readable from any thread.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
}

impl NetCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot: (tx frames, tx dropped, rx frames, rx dropped).
    pub fn frames(&self) -> (u64, u64, u64, u64) {
        (
            self.tx_frames.load(Ordering::Relaxed),
            self.tx_dropped.load(Ordering::Relaxed),
            self.rx_frames.load(Ordering::Relaxed),
            self.rx_dropped.load(Ordering::Relaxed),
        )
    }
}

/// What the thread needs, handed over at activation.
pub struct EventLoopParts {
    pub mem: GuestMemoryMmap,
    pub rx_queue: Queue,
    pub tx_queue: Queue,
    pub rx_event: EventFd,
    pub tx_event: EventFd,
    pub interrupt: Arc<Interrupt>,
    pub tap: Tap,
    pub exit: EventFd,
    /// `TUN_F_*` bits matching the guest's accepted offloads, set before any read.
    pub tap_offload: u32,
    /// Told whether the offloads could be set (activation waits for it).
    pub ready: SyncSender<std::io::Result<()>>,
    pub mergeable_rx: bool,
    pub acked_features: u64,
    pub counters: Arc<NetCounters>,
}

pub struct EventLoop {
    p: EventLoopParts,
    warn: WarnLimiter,
    tx: TxScratch,
    /// One frame read from the tap: header + frame.
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` still waiting for rx buffers.
    pending: Option<usize>,
    /// Guest ranges of the rx chains being filled, and per chain (head, first range,
    /// end of its ranges).
    rx_ranges: Vec<(GuestAddress, usize)>,
    rx_chains: Vec<(u16, usize, usize)>,
    rx_more: bool,
    tx_more: bool,
    /// The rx ring's available index when buffers last ran out.
    rx_avail_seen: u16,
}

/// How one attempt to hand the pending frame to the guest ended.
enum Delivery {
    /// Copied into rx buffers (or dropped and its buffer returned): read the next.
    Done,
    /// The guest has too few rx buffers: keep the frame, stop reading the tap.
    NoBuffers,
}

impl EventLoop {
    pub fn new(parts: EventLoopParts) -> Self {
        Self {
            p: parts,
            warn: WarnLimiter::new(),
            tx: TxScratch::default(),
            rx_buf: vec![0; MAX_BUFFER_LEN],
            pending: None,
            rx_ranges: Vec::new(),
            rx_chains: Vec::new(),
            rx_more: false,
            tx_more: false,
            rx_avail_seen: 0,
        }
    }

    /// Runs until the exit eventfd fires; hands the tap back for a later activation.
    pub fn run(mut self) -> Tap {
        // On this thread, so the ioctl is in the net thread's seccomp filter and not
        // the vCPU's; activation waits for the answer, so no frame is read before.
        let offload = self.p.tap.set_offload(self.p.tap_offload);
        let failed = offload.is_err();
        // A closed channel only means activation gave up waiting.
        let _ = self.p.ready.send(offload);
        if failed {
            return self.p.tap;
        }
        let epoll = match self.setup_epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "net: cannot set up the device thread's epoll");
                return self.p.tap;
            }
        };
        // Frames the guest queued before its notification could reach us, and frames
        // the tap holds from before activation.
        self.process_tx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let timeout = if self.rx_more || self.tx_more { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "net: device thread epoll_wait failed; stopping");
                    return self.p.tap;
                }
            };
            let (mut rx, mut tx) = (self.rx_more, self.tx_more);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return self.p.tap,
                    TOKEN_RX => {
                        // Draining the counter; a failed read only means it was zero.
                        let _ = self.p.rx_event.read();
                        rx = true;
                    }
                    TOKEN_TX => {
                        let _ = self.p.tx_event.read();
                        tx = true;
                    }
                    _ => rx = true,
                }
            }
            if tx {
                self.process_tx();
            }
            if rx {
                self.process_rx();
            }
        }
    }

    fn setup_epoll(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (fd, token, events) in [
            (self.p.rx_event.as_raw_fd(), TOKEN_RX, EventSet::IN),
            (self.p.tx_event.as_raw_fd(), TOKEN_TX, EventSet::IN),
            (
                self.p.tap.as_raw_fd(),
                TOKEN_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.p.exit.as_raw_fd(), TOKEN_EXIT, EventSet::IN),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        Ok(epoll)
    }

    /// Writes up to [`BUDGET`] tx chains to the tap; one interrupt for the batch.
    /// The driver is asked not to notify while the thread is at it (each notification
    /// is a VM exit); a failure to write that hint only costs exits.
    pub fn process_tx(&mut self) {
        let mut used = 0;
        self.tx_more = false;
        let _ = self.p.tx_queue.disable_notification(&self.p.mem);
        while let Some(chain) = self.p.tx_queue.pop_descriptor_chain(&self.p.mem) {
            let head = chain.head_index();
            match self.tx.gather(&self.p.mem, chain, self.p.acked_features) {
                Ok(len) => {
                    // SAFETY: `gather` built the iovecs from guest memory that
                    // `self.p.mem` keeps mapped for the whole call.
                    match unsafe { self.p.tap.writev(&self.tx.iovs) } {
                        Ok(_) => {
                            NetCounters::add(&self.p.counters.tx_frames, 1);
                            NetCounters::add(
                                &self.p.counters.tx_bytes,
                                (len - VNET_HDR_LEN) as u64,
                            );
                        }
                        Err(e) => {
                            NetCounters::add(&self.p.counters.tx_dropped, 1);
                            self.warn
                                .warn(format_args!("net: tap refused a tx frame: {e}"));
                        }
                    }
                }
                Err(e) => {
                    NetCounters::add(&self.p.counters.tx_dropped, 1);
                    self.warn.warn(format_args!("net: tx frame dropped: {e}"));
                }
            }
            if let Err(e) = self.p.tx_queue.add_used(&self.p.mem, head, 0) {
                tracing::error!(error = %e, "net: cannot return a tx buffer to the guest");
            }
            used += 1;
            if used == BUDGET {
                self.tx_more = true;
                break;
            }
        }
        // Notifications back on; chains that came in meanwhile are served next round
        // (an unreadable ring also gets another round rather than a missed chain).
        if !self.tx_more {
            self.tx_more = self
                .p
                .tx_queue
                .enable_notification(&self.p.mem)
                .unwrap_or(true);
        }
        if used > 0 {
            self.signal_used(false);
        }
    }

    /// Moves up to [`BUDGET`] frames from the tap into rx buffers. The driver is asked
    /// to notify the rx queue only while the thread waits for buffers.
    pub fn process_rx(&mut self) {
        let mut delivered = 0;
        self.rx_more = false;
        let _ = self.p.rx_queue.disable_notification(&self.p.mem);
        loop {
            if delivered == BUDGET {
                self.rx_more = true;
                break;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.p.tap.read(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetCounters::add(&self.p.counters.rx_dropped, 1);
                        self.warn
                            .warn(format_args!("net: tap gave a {n}-byte read; dropped"));
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The tap went away (or its link is down): the next frame
                        // wakes the thread again.
                        self.warn.warn(format_args!("net: tap read failed: {e}"));
                        break;
                    }
                },
            };
            self.pending = Some(len);
            match self.deliver(len) {
                Delivery::Done => {
                    self.pending = None;
                    delivered += 1;
                }
                Delivery::NoBuffers => {
                    if self.rx_buffers_arrived() {
                        let _ = self.p.rx_queue.disable_notification(&self.p.mem);
                        continue;
                    }
                    break;
                }
            }
        }
        if delivered > 0 {
            self.signal_used(true);
        }
    }

    /// Turns rx notifications on and tells whether the driver added buffers before it
    /// could see that (then the thread retries instead of waiting for a notification
    /// that will not come). Each retry needs new buffers, so this cannot spin.
    fn rx_buffers_arrived(&mut self) -> bool {
        let seen = self.rx_avail_seen;
        let q = &mut self.p.rx_queue;
        if q.enable_notification(&self.p.mem).is_err() {
            return false;
        }
        q.avail_idx(&self.p.mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != seen)
    }

    /// Copies the frame in `rx_buf[..len]` into as many rx chains as it needs (one
    /// without mergeable buffers), with `num_buffers` set in its header.
    fn deliver(&mut self, len: usize) -> Delivery {
        if let Err(e) = check_rx_header(&mut self.rx_buf[..VNET_HDR_LEN], self.p.acked_features) {
            // Queued in the tap under an earlier driver's offloads (before a reset).
            NetCounters::add(&self.p.counters.rx_dropped, 1);
            self.warn.warn(format_args!("net: rx frame dropped: {e}"));
            return Delivery::Done;
        }
        let mergeable = self.p.mergeable_rx;
        let start_avail = self.p.rx_queue.next_avail();
        self.rx_ranges.clear();
        self.rx_chains.clear();
        let mut capacity = 0usize;
        while capacity < len && (mergeable || self.rx_chains.is_empty()) {
            let Some(chain) = self.p.rx_queue.pop_descriptor_chain(&self.p.mem) else {
                // Put back what was taken: those buffers wait for the next frame.
                self.rx_avail_seen = self.p.rx_queue.next_avail();
                self.p.rx_queue.set_next_avail(start_avail);
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let first = self.rx_ranges.len();
            let (cap, faults) = rx_ranges(&self.p.mem, chain, &mut self.rx_ranges);
            if faults.any() {
                self.warn.warn(format_args!(
                    "net: rx chain {head} has descriptors the device cannot write ({faults:?}); skipped them"
                ));
            }
            self.rx_chains.push((head, first, self.rx_ranges.len()));
            capacity += cap;
        }
        if capacity < len {
            // Only without mergeable buffers: one chain too small for the frame.
            NetCounters::add(&self.p.counters.rx_dropped, 1);
            self.warn.warn(format_args!(
                "net: rx buffer of {capacity} bytes cannot hold a {len}-byte frame; dropped"
            ));
            for i in 0..self.rx_chains.len() {
                let head = self.rx_chains[i].0;
                self.add_rx_used(head, 0);
            }
            return Delivery::Done;
        }
        // At most one chain per queue entry (256), so the count fits in the field.
        let num_buffers = self.rx_chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0usize;
        for i in 0..self.rx_chains.len() {
            let (head, first, end) = self.rx_chains[i];
            let mut written = 0usize;
            for &(addr, range_len) in &self.rx_ranges[first..end] {
                let n = range_len.min(len - offset);
                if n == 0 {
                    break;
                }
                if let Err(e) = self
                    .p
                    .mem
                    .write_slice(&self.rx_buf[offset..offset + n], addr)
                {
                    // The range was checked; only a guest memory change could fail
                    // it. The byte count stays as if written: the frame is garbage
                    // to the guest either way.
                    self.warn
                        .warn(format_args!("net: cannot write an rx frame: {e}"));
                }
                offset += n;
                written += n;
            }
            // `written` is at most MAX_BUFFER_LEN, so it fits.
            self.add_rx_used(head, written as u32);
        }
        NetCounters::add(&self.p.counters.rx_frames, 1);
        NetCounters::add(&self.p.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Delivery::Done
    }

    fn add_rx_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.p.rx_queue.add_used(&self.p.mem, head, len) {
            tracing::error!(error = %e, "net: cannot return an rx buffer to the guest");
        }
    }

    /// Raises the used-ring interrupt, unless the queue says the driver does not need
    /// one (virtio-queue decides from EVENT_IDX, which crx does not offer yet, so for
    /// now every batch interrupts).
    fn signal_used(&mut self, rx: bool) {
        let queue = if rx {
            &mut self.p.rx_queue
        } else {
            &mut self.p.tx_queue
        };
        // A ring we cannot read gets the interrupt: better one too many than a hang.
        if !queue.needs_notification(&self.p.mem).unwrap_or(true) {
            return;
        }
        if let Err(e) = self.p.interrupt.signal_used_queue() {
            tracing::error!(error = %e, "net: cannot interrupt the guest");
        }
    }
}
