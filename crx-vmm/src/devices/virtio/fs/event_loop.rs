//! The `crx-fs` thread: serves the hiprio queue and the request queue of one share.
//!
//! It sleeps in one epoll on both queues' eventfds and an exit eventfd. On each
//! notification it serves every chain on that queue's available ring, one FUSE
//! request at a time, then raises the used-ring interrupt once for the batch.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::FsServer;
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::Interrupt;

/// Epoll token of the exit eventfd; queue `i` uses token `i`.
const TOKEN_EXIT: u64 = u64::MAX;

pub struct EventLoop {
    pub mem: GuestMemoryMmap,
    /// hiprio, then the request queue (checked by `activate`).
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub exit: EventFd,
    pub server: Arc<FsServer>,
    pub warn: WarnLimiter,
}

impl EventLoop {
    /// Runs until the exit eventfd fires.
    pub fn run(mut self) {
        let epoll = match self.watch() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "fs: cannot set up the device thread's epoll");
                return;
            }
        };
        // Requests queued before the first notification.
        for index in 0..self.queues.len() {
            self.process_queue(index);
        }
        let mut events = [EpollEvent::default(); 3];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "fs: device thread epoll_wait failed; stopping");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_EXIT {
                    return;
                }
                let Ok(index) = usize::try_from(token) else {
                    continue;
                };
                if let Some(evt) = self.queue_events.get(index) {
                    // Draining the counter; a failed read only means it was zero.
                    let _ = evt.read();
                }
                self.process_queue(index);
            }
        }
    }

    fn watch(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (index, evt) in self.queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_EXIT),
        )?;
        Ok(epoll)
    }

    /// Serves every request on queue `index`; one interrupt for the batch.
    pub fn process_queue(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let used = serve_queue(&self.server, &self.mem, queue, &mut self.warn);
        if used {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::error!(error = %e, "fs: cannot interrupt the guest");
            }
        }
    }
}

/// Pops every chain on `queue`, serves it and puts it on the used ring; true if any
/// chain was used. A request that cannot be served goes back with 0 bytes written.
pub fn serve_queue(
    server: &FsServer,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    warn: &mut WarnLimiter,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = match server.handle_chain(mem, chain) {
            Ok(len) => len,
            Err(e) => {
                warn.warn(format_args!("fs: request returned with 0 bytes: {e}"));
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::error!(error = %e, "fs: cannot return a buffer to the guest");
        }
        used = true;
    }
    used
}
