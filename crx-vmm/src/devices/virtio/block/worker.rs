//! The `crx-blk` thread: serves the request queue until told to exit.
//!
//! It sleeps in one epoll on the queue's eventfd and an exit eventfd. Each chain is
//! parsed (`request`), executed against the backing current at that moment, and
//! returned with its status byte written. FLUSH completes only after `fdatasync`
//! returned, so an acknowledged flush is on the host's stable storage. Data moves
//! between the backing and guest memory directly, with no buffer sized by the guest.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::Shared;
use super::request::{self, DataBuf, Request, RequestType};
use super::{
    Backing, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::queue_thread::serve_until_exit;
use crate::devices::virtio::Interrupt;

pub(super) struct Worker {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub queue_event: EventFd,
    pub interrupt: Arc<Interrupt>,
    pub exit: EventFd,
    pub shared: Arc<Shared>,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The drive was advertised read-only: writes fail whatever the backing allows.
    pub read_only: bool,
    /// The driver did not accept VIRTIO_BLK_F_FLUSH, so it takes a completed write as
    /// durable: every OUT is followed by `fdatasync` before it completes.
    pub writethrough: bool,
    pub warn: WarnLimiter,
}

/// Outcome of one request: status byte and bytes written into guest buffers.
struct Done {
    status: u8,
    written: u32,
}

impl Done {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

impl Worker {
    pub fn run(mut self) {
        let (Ok(queue_event), Ok(exit)) = (self.queue_event.try_clone(), self.exit.try_clone())
        else {
            tracing::error!("virtio-blk: cannot duplicate the device thread's eventfds");
            return;
        };
        serve_until_exit("virtio-blk", &queue_event, &exit, || self.process_queue());
    }

    /// Serves every chain on the queue, then interrupts the guest once.
    pub fn process_queue(&mut self) {
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            // The chain iterator stops after the queue size and at 4 GiB in total.
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.handle(&descs);
            if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                tracing::error!(error = %e, "virtio-blk: cannot return a request");
            }
            used = true;
        }
        if used {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::error!(error = %e, "virtio-blk: cannot interrupt the guest");
            }
        }
    }

    /// Runs one chain; returns the used length (bytes written into the chain).
    fn handle(&mut self, descs: &[Descriptor]) -> u32 {
        let status_addr = match request::status_of(&self.mem, descs) {
            Ok(a) => a,
            Err(e) => {
                // Nowhere to report the failure: the chain comes back with nothing written.
                self.warn
                    .warn(format_args!("virtio-blk: dropped malformed request: {e}"));
                return 0;
            }
        };
        let done = match request::parse(&self.mem, descs) {
            Ok(req) => self.execute(&req),
            Err(e) => {
                self.warn
                    .warn(format_args!("virtio-blk: malformed request: {e}"));
                Done::status(VIRTIO_BLK_S_IOERR)
            }
        };
        if let Err(e) = self.mem.write_obj(done.status, status_addr) {
            self.warn
                .warn(format_args!("virtio-blk: cannot write a status byte: {e}"));
            return done.written;
        }
        done.written.saturating_add(1)
    }

    fn execute(&mut self, req: &Request) -> Done {
        match req.kind {
            RequestType::In => self.transfer(req, true),
            RequestType::Out => self.transfer(req, false),
            RequestType::Flush => match self.shared.current() {
                // Nothing was ever written to a missing backing; nothing to lose.
                None => Done::status(VIRTIO_BLK_S_OK),
                Some(b) => match b.flush() {
                    Ok(()) => Done::status(VIRTIO_BLK_S_OK),
                    Err(e) => {
                        self.warn.warn(format_args!(
                            "virtio-blk: fdatasync on {} failed: {e}",
                            b.path().display()
                        ));
                        Done::status(VIRTIO_BLK_S_IOERR)
                    }
                },
            },
            RequestType::GetId => self.get_id(&req.data),
            RequestType::Unsupported(t) => {
                self.warn
                    .warn(format_args!("virtio-blk: unsupported request type {t}"));
                Done::status(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    fn get_id(&self, bufs: &[DataBuf]) -> Done {
        let mut left: &[u8] = &self.serial;
        let mut written = 0u32;
        for b in bufs {
            let n = left.len().min(b.len as usize);
            if self.mem.write_slice(&left[..n], b.addr).is_err() {
                return Done {
                    status: VIRTIO_BLK_S_IOERR,
                    written,
                };
            }
            written += n as u32;
            left = &left[n..];
            if left.is_empty() {
                break;
            }
        }
        Done {
            status: VIRTIO_BLK_S_OK,
            written,
        }
    }

    /// IN (`to_guest`) or OUT: whole sectors within capacity, else IOERR.
    fn transfer(&mut self, req: &Request, to_guest: bool) -> Done {
        let Some(backing) = self.shared.current() else {
            return Done::status(VIRTIO_BLK_S_IOERR);
        };
        if !to_guest && (self.read_only || backing.is_read_only()) {
            self.warn.warn(format_args!(
                "virtio-blk: write to a read-only drive refused"
            ));
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        let Some(mut offset) = request::byte_range(req.sector, req.data_len, backing.sectors())
        else {
            self.warn.warn(format_args!(
                "virtio-blk: request of {} bytes at sector {} outside capacity {} or not whole sectors",
                req.data_len,
                req.sector,
                backing.sectors()
            ));
            return Done::status(VIRTIO_BLK_S_IOERR);
        };
        let mut written = 0u32;
        for buf in &req.data {
            match self.copy_buf(&backing, buf, offset, to_guest) {
                Ok(()) => {
                    if to_guest {
                        written = written.saturating_add(buf.len);
                    }
                    offset += u64::from(buf.len);
                }
                Err(e) => {
                    self.warn.warn(format_args!(
                        "virtio-blk: I/O on {} at byte {offset} failed: {e}",
                        backing.path().display()
                    ));
                    return Done {
                        status: VIRTIO_BLK_S_IOERR,
                        written,
                    };
                }
            }
        }
        if !to_guest && self.writethrough {
            if let Err(e) = backing.flush() {
                self.warn.warn(format_args!(
                    "virtio-blk: write-through fdatasync on {} failed: {e}",
                    backing.path().display()
                ));
                return Done::status(VIRTIO_BLK_S_IOERR);
            }
        }
        Done {
            status: VIRTIO_BLK_S_OK,
            written,
        }
    }

    /// Moves one guest buffer to or from the backing at byte `offset`.
    fn copy_buf(
        &self,
        backing: &Backing,
        buf: &DataBuf,
        offset: u64,
        to_guest: bool,
    ) -> std::io::Result<()> {
        let len = buf.len as usize;
        if to_guest {
            backing.read_to_guest(&self.mem, buf.addr, len, offset)
        } else {
            backing.write_from_guest(&self.mem, buf.addr, len, offset)
        }
    }
}
