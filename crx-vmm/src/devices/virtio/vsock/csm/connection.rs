//! One vsock stream connection between a guest port and a host Unix stream.
//!
//! Guest→host: RW payloads go straight to the host socket when it takes them, and into
//! a bounded [`TxBuf`] when it does not; the buffer's capacity is the `buf_alloc` we
//! advertise, and `fwd_cnt` counts what the host socket accepted, so the guest's
//! credit is exact and a guest that overruns it is reset.
//! Host→guest: bytes are read from the host socket only as far as the guest's credit
//! allows. A connection moving bulk data (a read filled the guest's whole rx buffer)
//! reads ahead into a 64 KiB staging buffer, because a Linux guest posts 4 KiB rx
//! buffers and one `read` per 4 KiB costs far more than the copy; the buffer is freed
//! once the host socket is drained, so idle connections hold none.
//! Control packets the connection owes the guest are kept as `pending` bits and sent
//! when the muxer gets an rx buffer.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::txbuf::TxBuf;
use crate::devices::virtio::vsock::{
    CONN_TX_BUF_SIZE, HOST_CID, MAX_PKT_DATA, VSOCK_FLAGS_SHUTDOWN_RCV, VSOCK_FLAGS_SHUTDOWN_SEND,
    VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE,
    VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_TYPE_STREAM,
};

/// Send a CREDIT_UPDATE once the host has drained this much since the guest last
/// heard our `fwd_cnt`, so a guest blocked on credit always learns it can go on.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;

const P_RST: u8 = 1 << 0;
const P_REQUEST: u8 = 1 << 1;
const P_RESPONSE: u8 = 1 << 2;
/// The host socket may have bytes for the guest.
const P_DATA: u8 = 1 << 3;
const P_CREDIT_UPDATE: u8 = 1 << 4;

/// Read-ahead for a connection in bulk transfer (see the module doc).
const RX_STAGE_SIZE: usize = 64 * 1024;

/// Host bytes read ahead of the guest's rx buffers.
struct RxStage {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The read that filled it came up short: the host socket is drained, so once the
    /// stage is empty the connection waits for epoll again.
    drained: bool,
}

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked for it; REQUEST sent or queued, waiting for RESPONSE.
    LocalInit,
    /// Both sides agreed; data may flow.
    Established,
    /// Finished. Removed by the muxer once nothing is pending (an RST may be).
    Closed,
}

/// What the guest's packet means for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOutcome {
    Ok,
    /// The guest broke the protocol or the host socket failed: reset the connection.
    Reset,
}

/// Whether `fill_rx` produced a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    Filled,
    Empty,
}

/// The fields of a guest packet the state machine looks at, read once (the guest
/// may change its memory underneath us).
#[derive(Clone, Copy, Debug)]
pub struct GuestHeader {
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    state: ConnState,
    pending: u8,
    tx_buf: TxBuf,
    /// Bytes of guest data the host socket has taken.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes of host data sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The host socket reached end of file.
    host_eof: bool,
    /// Read-ahead while host data flows in bulk; `None` otherwise.
    rx_stage: Option<RxStage>,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, state: ConnState, pending: u8) -> Self {
        Self {
            stream,
            key,
            state,
            pending,
            tx_buf: TxBuf::new(CONN_TX_BUF_SIZE as usize),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            peer_shutdown: 0,
            host_eof: false,
            rx_stage: None,
        }
    }

    /// A host client's connection: the guest is sent a REQUEST.
    pub fn new_local(stream: UnixStream, key: ConnKey) -> Self {
        Self::new(stream, key, ConnState::LocalInit, P_REQUEST)
    }

    /// A guest's REQUEST, already connected to the host listener: answer RESPONSE.
    pub fn new_peer(stream: UnixStream, key: ConnKey, hdr: &GuestHeader) -> Self {
        let mut conn = Self::new(stream, key, ConnState::Established, P_RESPONSE);
        conn.update_peer_credit(hdr);
        conn
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &GuestHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Ends the connection with an RST to the guest; the host client sees EOF now.
    pub fn reset(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.state = ConnState::Closed;
        self.pending = P_RST;
    }

    /// Ends the connection without telling the guest (it reset it, or never knew it).
    pub fn close_silently(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.state = ConnState::Closed;
        self.pending = 0;
    }

    /// Finished and owes the guest nothing: the muxer may drop it.
    pub fn is_done(&self) -> bool {
        self.state == ConnState::Closed && self.pending == 0
    }

    /// Handles one packet from the guest addressed to this connection.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &GuestHeader,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> GuestOutcome {
        if self.state == ConnState::Closed {
            return GuestOutcome::Ok;
        }
        if hdr.op == VSOCK_OP_RST {
            self.close_silently();
            return GuestOutcome::Ok;
        }
        self.update_peer_credit(hdr);
        match (hdr.op, self.state) {
            (VSOCK_OP_RESPONSE, ConnState::LocalInit) => self.on_response(),
            (VSOCK_OP_RW, ConnState::Established) => match data {
                Some(d) => self.on_rw(d),
                None => GuestOutcome::Ok,
            },
            (VSOCK_OP_CREDIT_UPDATE, ConnState::Established) => GuestOutcome::Ok,
            (VSOCK_OP_CREDIT_REQUEST, ConnState::Established) => {
                self.pending |= P_CREDIT_UPDATE;
                GuestOutcome::Ok
            }
            (VSOCK_OP_SHUTDOWN, ConnState::Established) => self.on_shutdown(hdr.flags),
            _ => GuestOutcome::Reset,
        }
    }

    fn on_response(&mut self) -> GuestOutcome {
        self.state = ConnState::Established;
        // The client waits for this line before it sends; the socket buffer is empty,
        // so a short write here would mean the client is broken.
        let line = format!("OK {}\n", self.key.local_port);
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => GuestOutcome::Ok,
            _ => GuestOutcome::Reset,
        }
    }

    fn on_rw<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> GuestOutcome {
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            return GuestOutcome::Reset;
        }
        let len = data.len();
        if len > self.tx_buf.free() {
            // Debug, not warn: a guest could repeat this on every connection it opens.
            tracing::debug!(?self.key, len, "vsock: guest overran its credit; resetting");
            return GuestOutcome::Reset;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return GuestOutcome::Reset,
            }
        }
        if written < len {
            let buffered = data
                .offset(written)
                .is_ok_and(|rest| self.tx_buf.push(&rest));
            if !buffered {
                return GuestOutcome::Reset;
            }
        }
        self.account_forwarded(written);
        GuestOutcome::Ok
    }

    fn on_shutdown(&mut self, flags: u32) -> GuestOutcome {
        self.peer_shutdown |= flags & (VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND);
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV != 0 {
            self.pending &= !P_DATA;
        }
        if self.tx_buf.is_empty() {
            self.after_drain();
        }
        GuestOutcome::Ok
    }

    /// Once every guest byte reached the host: pass the guest's half-close on, and
    /// finish a connection the guest closed both ways (Linux waits for our RST).
    fn after_drain(&mut self) {
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        if self.peer_shutdown == VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND {
            self.reset();
        }
    }

    fn account_forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// The host socket became writable: drain the buffer into it.
    pub fn on_writable(&mut self) -> GuestOutcome {
        match self.tx_buf.flush_to(&mut self.stream) {
            Ok(n) => self.account_forwarded(n),
            Err(_) => return GuestOutcome::Reset,
        }
        if self.tx_buf.is_empty() {
            self.after_drain();
        }
        GuestOutcome::Ok
    }

    /// The host socket became readable (or hung up).
    pub fn on_readable(&mut self) {
        if self.state == ConnState::Established && !self.host_eof {
            self.pending |= P_DATA;
        }
    }

    /// The epoll events this connection wants on its host socket.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == ConnState::Closed {
            return ev;
        }
        let reading = self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV == 0
            && self.pending & P_DATA == 0
            && self.peer_credit() > 0;
        if reading {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Whether a packet for the guest could be produced now.
    pub fn has_pending_rx(&self) -> bool {
        let control = self.pending & !P_DATA != 0;
        let data = self.pending & P_DATA != 0 && (self.peer_credit() > 0 || !self.credit_requested);
        control || data
    }

    fn take(&mut self, bit: u8) -> bool {
        let had = self.pending & bit != 0;
        self.pending &= !bit;
        had
    }

    /// Fills `pkt` (an rx buffer from the guest) with the next packet this connection
    /// owes the guest.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
        guest_cid: u64,
    ) -> RxOutcome {
        let (op, flags, len) = if self.take(P_RST) {
            (VSOCK_OP_RST, 0, 0)
        } else if self.take(P_REQUEST) {
            (VSOCK_OP_REQUEST, 0, 0)
        } else if self.take(P_RESPONSE) {
            (VSOCK_OP_RESPONSE, 0, 0)
        } else if let Some(n) = self.try_read_data(pkt) {
            match n {
                DataRead::Bytes(n) => (VSOCK_OP_RW, 0, n),
                DataRead::Eof => (VSOCK_OP_SHUTDOWN, VSOCK_FLAGS_SHUTDOWN_SEND, 0),
                DataRead::NoCredit => (VSOCK_OP_CREDIT_REQUEST, 0, 0),
                DataRead::Failed => {
                    self.reset();
                    self.pending = 0;
                    (VSOCK_OP_RST, 0, 0)
                }
            }
        } else if self.take(P_CREDIT_UPDATE) {
            (VSOCK_OP_CREDIT_UPDATE, 0, 0)
        } else {
            return RxOutcome::Empty;
        };
        if !write_header(pkt, guest_cid, self.key, op, flags, len, self.fwd_cnt.0) {
            // Only a header slice of the wrong size fails; the rx chain parser rules
            // that out, so this is a bug, not guest input. Drop the connection.
            self.close_silently();
            return RxOutcome::Empty;
        }
        // Every packet carries our fwd_cnt, so it doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
        RxOutcome::Filled
    }

    fn try_read_data<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<DataRead> {
        if self.pending & P_DATA == 0 || self.state != ConnState::Established {
            return None;
        }
        let credit = self.peer_credit();
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some(DataRead::NoCredit);
        }
        let room = pkt.data_slice().map_or(0, |s| s.len());
        let max = room.min(credit as usize).min(MAX_PKT_DATA as usize);
        if max == 0 {
            return None;
        }
        let mut dst = pkt.data_slice()?.subslice(0, max).ok()?;
        if self.rx_stage.is_some() {
            return self.read_staged(&mut dst, credit as usize);
        }
        match self.stream.read_volatile(&mut dst) {
            Ok(0) => {
                self.pending &= !P_DATA;
                self.host_eof = true;
                Some(DataRead::Eof)
            }
            Ok(n) => {
                if n < max {
                    // Probably drained; epoll will say if not.
                    self.pending &= !P_DATA;
                } else if max < RX_STAGE_SIZE {
                    // The guest's buffer was the limit: more is likely waiting.
                    self.rx_stage = Some(RxStage {
                        buf: vec![0u8; RX_STAGE_SIZE].into_boxed_slice(),
                        start: 0,
                        end: 0,
                        drained: false,
                    });
                }
                self.rx_cnt += Wrapping(n as u32);
                Some(DataRead::Bytes(n as u32))
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending &= !P_DATA;
                None
            }
            Err(_) => Some(DataRead::Failed),
        }
    }

    /// Serves `dst` from the read-ahead buffer, refilling it (up to the guest's
    /// `credit`) when empty. Frees the buffer once the host socket is drained. `None`
    /// when the socket had nothing after all.
    fn read_staged<B: BitmapSlice>(
        &mut self,
        dst: &mut VolatileSlice<'_, B>,
        credit: usize,
    ) -> Option<DataRead> {
        let stage = self.rx_stage.as_mut()?;
        if stage.start == stage.end {
            let want = RX_STAGE_SIZE.min(credit);
            match self.stream.read(&mut stage.buf[..want]) {
                Ok(0) => {
                    self.rx_stage = None;
                    self.pending &= !P_DATA;
                    self.host_eof = true;
                    return Some(DataRead::Eof);
                }
                Ok(n) => {
                    stage.start = 0;
                    stage.end = n;
                    stage.drained = n < want;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing after all: back to waiting on epoll, without the buffer.
                    self.rx_stage = None;
                    self.pending &= !P_DATA;
                    return None;
                }
                Err(_) => return Some(DataRead::Failed),
            }
        }
        let n = (stage.end - stage.start).min(dst.len());
        dst.copy_from(&stage.buf[stage.start..stage.start + n]);
        stage.start += n;
        if stage.start == stage.end && stage.drained {
            self.rx_stage = None;
            self.pending &= !P_DATA;
        }
        self.rx_cnt += Wrapping(n as u32);
        Some(DataRead::Bytes(n as u32))
    }
}

enum DataRead {
    Bytes(u32),
    Eof,
    NoCredit,
    Failed,
}

/// Writes a host→guest header into `pkt`. Returns false if the header slice is
/// not a whole header.
pub fn write_header<B: BitmapSlice>(
    pkt: &mut VsockPacket<'_, B>,
    guest_cid: u64,
    key: ConnKey,
    op: u16,
    flags: u32,
    len: u32,
    fwd_cnt: u32,
) -> bool {
    if pkt
        .set_header_from_raw(&[0u8; virtio_vsock::packet::PKT_HEADER_SIZE])
        .is_err()
    {
        return false;
    }
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(guest_cid)
        .set_src_port(key.local_port)
        .set_dst_port(key.peer_port)
        .set_type(VSOCK_TYPE_STREAM)
        .set_op(op)
        .set_flags(flags)
        .set_len(len)
        .set_buf_alloc(CONN_TX_BUF_SIZE)
        .set_fwd_cnt(fwd_cnt);
    true
}
