//! [`VsockMuxer`]: every host socket of one VM's hybrid vsock behind one epoll fd.
//!
//! The muxer knows packets, not virtqueues: the caller hands it each guest packet
//! ([`VsockMuxer::send_pkt`]), asks it to fill rx buffers
//! ([`VsockMuxer::recv_pkt`]) while [`VsockMuxer::has_pending_rx`] says it has
//! something, and calls [`VsockMuxer::process_events`] when its fd
//! ([`AsRawFd::as_raw_fd`]) is readable. crx-vmm's device thread and the vhost-user
//! back end drive it the same way.
//!
//! A connection whose host socket has data waits in the rx queue with its read
//! interest dropped, so when the guest gives no rx buffers the fd goes quiet instead of
//! spinning; reading resumes once the guest takes the data.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connect::connect_nonblocking;
use super::handshake::{Handshake, LineState};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::vsock::csm::{
    write_header, ConnKey, ConnState, Connection, GuestHeader, GuestOutcome, RxOutcome,
};
use crate::devices::virtio::vsock::{
    VsockError, HOST_CID, MAX_PKT_DATA, VSOCK_OP_REQUEST, VSOCK_OP_RST, VSOCK_TYPE_STREAM,
};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;
/// Host ports handed to host-initiated connections: the upper quarter of the port
/// space, well away from the ports services listen on.
const EPHEMERAL_PORT_FIRST: u32 = 1 << 30;
/// Standalone RSTs waiting for an rx buffer; more are dropped (the guest's own
/// timeouts cover those connections).
const MAX_RST_QUEUE: usize = 1024;
/// Clients accepted per `process_events` call, so one flood cannot starve the rest.
const ACCEPT_BATCH: usize = 32;
/// Longest `<uds_path>_<port>` suffix.
const PORT_SUFFIX_MAX: usize = "_4294967295".len();
/// `sizeof(sockaddr_un.sun_path)` on Linux, NUL included.
const SUN_PATH_LEN: usize = 108;

/// Limits and timeouts of one muxer.
#[derive(Clone, Debug)]
pub struct MuxerConfig {
    pub guest_cid: u64,
    /// The hybrid socket; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Connections (host- and guest-initiated, handshakes included) at once.
    pub max_connections: usize,
    /// Clients that have not sent their `CONNECT` line yet.
    pub max_handshakes: usize,
    /// How long a client may take to send `CONNECT <port>\n`.
    pub handshake_timeout: Duration,
    /// How long the guest may take to answer a REQUEST.
    pub connect_timeout: Duration,
}

impl MuxerConfig {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        Self {
            guest_cid,
            uds_path,
            max_connections: 1024,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

struct Entry {
    conn: Connection,
    token: u64,
    /// Events currently registered with epoll (empty: not registered).
    registered: EventSet,
    /// In `rxq`.
    queued: bool,
    /// Host-initiated and not yet answered: reset at this time.
    deadline: Option<Instant>,
}

/// The host side of one VM's hybrid vsock.
pub struct VsockMuxer {
    cfg: MuxerConfig,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<ConnKey, Entry>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    rxq: VecDeque<ConnKey>,
    rst_queue: VecDeque<ConnKey>,
    next_local_port: u32,
    warn: WarnLimiter,
}

impl VsockMuxer {
    /// Binds the hybrid socket at `cfg.uds_path` (which must not exist yet).
    pub fn new(cfg: MuxerConfig) -> Result<Self, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let path = cfg.uds_path.clone();
        if path.as_os_str().len() + PORT_SUFFIX_MAX >= SUN_PATH_LEN {
            return Err(VsockError::PathTooLong(path));
        }
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(path));
        }
        let dir = match path.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        if !dir.is_dir() {
            return Err(VsockError::NoDirectory(path));
        }
        let listener = UnixListener::bind(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        // From here on the socket file is ours; `Drop` removes it, on errors too.
        let mut guard = SocketFileGuard(Some(path));
        listener.set_nonblocking(true).map_err(VsockError::Events)?;
        let epoll = Epoll::new().map_err(VsockError::Events)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Events(io::Error::from(e)))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(VsockError::Events)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(VsockError::Events)?;
        guard.0 = None;
        Ok(Self {
            cfg,
            listener,
            epoll,
            timer,
            timer_deadline: None,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: EPHEMERAL_PORT_FIRST,
            warn: WarnLimiter::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.cfg.uds_path
    }

    /// Open connections (not counting clients still in the handshake).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether [`recv_pkt`](Self::recv_pkt) may have a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    /// Drops every connection (the guest's driver reset): host clients see EOF.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        for (_, hs) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.rxq.clear();
        self.rst_queue.clear();
    }

    /// Handles whatever made the muxer's fd readable. Never blocks.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                tracing::error!(error = %e, "vsock: muxer epoll_wait failed");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept_clients(),
                TOKEN_TIMER => self.on_timer(),
                token => {
                    if self.handshakes.contains_key(&token) {
                        self.on_handshake_readable(token);
                    } else if let Some(&key) = self.tokens.get(&token) {
                        self.on_conn_event(key, ev.event_set());
                    }
                }
            }
        }
    }

    /// Takes one packet from the guest.
    pub fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        if pkt.src_cid() != self.cfg.guest_cid || pkt.dst_cid() != HOST_CID {
            self.warn.warn(format_args!(
                "vsock: dropped packet {}:{} -> {}:{} (guest CID is {})",
                pkt.src_cid(),
                pkt.src_port(),
                pkt.dst_cid(),
                pkt.dst_port(),
                self.cfg.guest_cid
            ));
            return;
        }
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        let hdr = GuestHeader {
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        if pkt.type_() != VSOCK_TYPE_STREAM || pkt.len() > MAX_PKT_DATA {
            self.warn.warn(format_args!(
                "vsock: bad packet type {} / len {} on {key:?}",
                pkt.type_(),
                pkt.len()
            ));
            self.reject(key, hdr.op);
            return;
        }
        let data = if pkt.is_empty() {
            None
        } else {
            match pkt
                .data_slice()
                .and_then(|s| s.subslice(0, pkt.len() as usize).ok())
            {
                Some(d) => Some(d),
                None => {
                    self.reject(key, hdr.op);
                    return;
                }
            }
        };
        match self.conns.get_mut(&key) {
            Some(entry) => {
                if entry.conn.on_guest_packet(&hdr, data.as_ref()) == GuestOutcome::Reset {
                    entry.conn.reset();
                }
                self.refresh(key);
            }
            None if hdr.op == VSOCK_OP_REQUEST => self.guest_connect(key, &hdr),
            None => self.reject(key, hdr.op),
        }
    }

    /// Fills `pkt` (an rx buffer) with the next packet for the guest; false if there
    /// is none.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> bool {
        if let Some(key) = self.rst_queue.pop_front() {
            return write_header(pkt, self.cfg.guest_cid, key, VSOCK_OP_RST, 0, 0, 0);
        }
        // Connections that turn out to have nothing are looked at again only after the
        // next event, never twice in one call.
        let mut idle = Vec::new();
        let mut filled = false;
        while let Some(key) = self.rxq.pop_front() {
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            let outcome = entry.conn.fill_rx(pkt, self.cfg.guest_cid);
            if outcome == RxOutcome::Filled {
                self.refresh(key);
                filled = true;
                break;
            }
            idle.push(key);
        }
        for key in idle {
            self.refresh(key);
        }
        filled
    }

    /// Refuses a packet that belongs to no connection (never answering an RST).
    fn reject(&mut self, key: ConnKey, op: u16) {
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.reset();
            self.refresh(key);
        } else if op != VSOCK_OP_RST {
            self.queue_rst(key);
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < MAX_RST_QUEUE {
            self.rst_queue.push_back(key);
        }
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= self.cfg.max_connections
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &GuestHeader) {
        if self.at_capacity() {
            self.warn.warn(format_args!(
                "vsock: connection limit reached; refusing {key:?}"
            ));
            self.queue_rst(key);
            return;
        }
        let mut path = OsString::from(self.cfg.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = Connection::new_peer(stream, key, hdr);
                self.insert(conn, None);
            }
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "vsock: guest connection refused");
                self.queue_rst(key);
            }
        }
    }

    fn insert(&mut self, conn: Connection, deadline: Option<Instant>) {
        let key = conn.key();
        let token = self.alloc_token();
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                token,
                registered: EventSet::empty(),
                queued: false,
                deadline,
            },
        );
        if let Some(d) = deadline {
            self.arm_timer_for(d);
        }
        self.refresh(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(entry) = self.conns.remove(&key) {
            self.tokens.remove(&entry.token);
            if !entry.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    entry.conn.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// Brings a connection's epoll registration and rx-queue membership in line with
    /// its state, and drops it once it is finished.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.is_done() {
            self.remove(key);
            return;
        }
        let want = entry.conn.interest();
        if want != entry.registered {
            let op = if entry.registered.is_empty() {
                ControlOperation::Add
            } else if want.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            let fd = entry.conn.stream().as_raw_fd();
            match self.epoll.ctl(op, fd, EpollEvent::new(want, entry.token)) {
                Ok(()) => entry.registered = want,
                Err(e) => {
                    tracing::error!(error = %e, ?key, "vsock: epoll_ctl failed; resetting connection");
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    entry.registered = EventSet::empty();
                    entry.conn.reset();
                }
            }
        }
        if entry.conn.state() != ConnState::LocalInit {
            entry.deadline = None;
        }
        if !entry.queued && entry.conn.has_pending_rx() {
            entry.queued = true;
            self.rxq.push_back(key);
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn
                        .warn(format_args!("vsock: accept on hybrid socket failed: {e}"));
                    return;
                }
            };
            if self.handshakes.len() >= self.cfg.max_handshakes || self.at_capacity() {
                self.warn.warn(format_args!(
                    "vsock: too many host connections; closing a new one"
                ));
                continue;
            }
            if let Err(e) = self.start_handshake(stream) {
                self.warn
                    .warn(format_args!("vsock: cannot watch a new host client: {e}"));
            }
        }
    }

    fn start_handshake(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let token = self.alloc_token();
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        self.handshakes
            .insert(token, Handshake::new(stream, deadline));
        self.arm_timer_for(deadline);
        Ok(())
    }

    fn end_handshake(&mut self, token: u64) -> Option<Handshake> {
        let hs = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(hs)
    }

    fn on_handshake_readable(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        match hs.poll() {
            LineState::Incomplete => {}
            LineState::Invalid => {
                tracing::debug!("vsock: host client sent a bad CONNECT line; closing it");
                self.end_handshake(token);
            }
            LineState::Connect(port) => {
                if let Some(hs) = self.end_handshake(token) {
                    self.start_local(hs.stream, port);
                }
            }
        }
    }

    fn start_local(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            self.warn.warn(format_args!(
                "vsock: no free host port; closing a host client"
            ));
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let deadline = Instant::now() + self.cfg.connect_timeout;
        self.insert(Connection::new_local(stream, key), Some(deadline));
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.cfg.max_connections {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) if p < u32::MAX => p,
                _ => EPHEMERAL_PORT_FIRST,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn on_conn_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let trouble = EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP;
        if events.intersects(EventSet::IN | trouble) && entry.registered.contains(EventSet::IN) {
            entry.conn.on_readable();
        }
        if events.intersects(EventSet::OUT | trouble)
            && entry.registered.contains(EventSet::OUT)
            && entry.conn.on_writable() == GuestOutcome::Reset
        {
            entry.conn.reset();
        }
        self.refresh(key);
    }

    fn arm_timer_for(&mut self, deadline: Instant) {
        if self.timer_deadline.is_some_and(|t| t <= deadline) {
            return;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => tracing::error!(error = %e, "vsock: cannot arm the muxer timer"),
        }
    }

    fn on_timer(&mut self) {
        // The timer fired (the fd is readable), so this read does not block.
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let now = Instant::now();
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            tracing::debug!("vsock: host client sent no CONNECT line in time; closing it");
            self.end_handshake(token);
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            if let Some(entry) = self.conns.get_mut(&key) {
                tracing::debug!(
                    ?key,
                    "vsock: guest did not answer a connection request in time"
                );
                entry.deadline = None;
                entry.conn.reset();
                self.refresh(key);
            }
        }
        let next = self
            .handshakes
            .values()
            .map(|hs| hs.deadline)
            .chain(self.conns.values().filter_map(|e| e.deadline))
            .min();
        if let Some(d) = next {
            self.arm_timer_for(d);
        }
    }
}

impl AsRawFd for VsockMuxer {
    /// Readable when any host socket of this muxer needs [`VsockMuxer::process_events`].
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cfg.uds_path);
    }
}

/// Removes the socket file if `new` fails after binding it.
struct SocketFileGuard(Option<PathBuf>);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests;
