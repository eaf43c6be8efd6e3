//! The `crx-vsock` thread: moves packets between the guest's queues and the muxer.
//!
//! It sleeps in one epoll on the three queue eventfds, the muxer's fd and an exit
//! eventfd. tx chains are parsed and handed to the muxer; rx buffers are filled while
//! the muxer has packets. When the guest has no rx buffers left the thread simply
//! waits for the rx queue's notification: the muxer stops reading host sockets that
//! already have data queued, so nothing spins.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{VsockMuxer, MAX_PKT_DATA};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::Interrupt;

const RX: usize = 0;
const TX: usize = 1;
const TOKEN_MUXER: u64 = 3;
const TOKEN_EXIT: u64 = 4;

pub struct EventLoop {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub muxer: VsockMuxer,
    pub exit: EventFd,
    pub warn: WarnLimiter,
}

impl EventLoop {
    /// Runs until the exit eventfd fires; hands the muxer back for a later activation.
    pub fn run(mut self) -> VsockMuxer {
        let epoll = match self.setup_epoll() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "vsock: cannot set up the device thread's epoll");
                return self.muxer;
            }
        };
        // Packets the guest queued before its notification could reach us.
        self.process_tx();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: device thread epoll_wait failed; stopping");
                    return self.muxer;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return self.muxer,
                    TOKEN_MUXER => self.muxer.process_events(),
                    q => {
                        // Draining the counter; a failed read only means it was zero.
                        let _ = self.queue_events[q as usize].read();
                        if q as usize == TX {
                            self.process_tx();
                        }
                    }
                }
            }
            self.process_rx();
        }
    }

    fn setup_epoll(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        // rx, tx and event queue; the event queue's buffers are kept for transport
        // resets, which crx never sends, so its notifications are only drained.
        for (i, evt) in self.queue_events.iter().enumerate().take(3) {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.muxer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_MUXER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_EXIT),
        )?;
        Ok(epoll)
    }

    /// Hands every packet on the tx queue to the muxer.
    pub fn process_tx(&mut self) {
        let mem = &self.mem;
        let mut used = false;
        while let Some(mut chain) = self.queues[TX].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.send_pkt(&pkt),
                Err(e) => self
                    .warn
                    .warn(format_args!("vsock: dropped malformed tx packet: {e}")),
            }
            if let Err(e) = self.queues[TX].add_used(mem, head, 0) {
                tracing::error!(error = %e, "vsock: cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            self.signal();
        }
        // tx packets often owe the guest an answer (RESPONSE, RST, credit).
        self.process_rx();
    }

    /// Fills rx buffers while the muxer has packets and the guest has buffers.
    pub fn process_rx(&mut self) {
        let mem = &self.mem;
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(mut chain) = self.queues[RX].pop_descriptor_chain(mem) else {
                // No buffers: wait for the guest's rx notification.
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    if !self.muxer.recv_pkt(&mut pkt) {
                        self.queues[RX].go_to_previous_position();
                        break;
                    }
                    PKT_HEADER_SIZE as u32 + pkt.len()
                }
                Err(e) => {
                    self.warn
                        .warn(format_args!("vsock: dropped malformed rx buffer: {e}"));
                    0
                }
            };
            if let Err(e) = self.queues[RX].add_used(mem, head, len) {
                tracing::error!(error = %e, "vsock: cannot return an rx buffer");
            }
            used = true;
        }
        if used {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            tracing::error!(error = %e, "vsock: cannot interrupt the guest");
        }
    }
}
