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
    pub requests: RequestServer,
}

/// Serves single requests against a slot's current backing, whatever carries the
/// queue: crx-vmm's `crx-blk` thread or the vhost-user back end.
pub(crate) struct RequestServer {
    pub(super) shared: Arc<Shared>,
    pub(super) serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The drive was advertised read-only: writes fail whatever the backing allows.
    pub(super) read_only: bool,
    /// The driver did not accept VIRTIO_BLK_F_FLUSH, so it takes a completed write as
    /// durable: every OUT is followed by `fdatasync` before it completes.
    pub(super) writethrough: bool,
    pub(super) warn: WarnLimiter,
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
            let len = self.requests.handle(&self.mem, &descs);
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
}

impl RequestServer {
    /// Follows the driver's answer to VIRTIO_BLK_F_FLUSH (`false` if it accepted it).
    pub fn set_writethrough(&mut self, writethrough: bool) {
        self.writethrough = writethrough;
    }

    /// Runs one chain; returns the used length (bytes written into the chain).
    pub fn handle(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let status_addr = match request::status_of(mem, descs) {
            Ok(a) => a,
            Err(e) => {
                // Nowhere to report the failure: the chain comes back with nothing written.
                self.warn
                    .warn(format_args!("virtio-blk: dropped malformed request: {e}"));
                return 0;
            }
        };
        let done = match request::parse(mem, descs) {
            Ok(req) => self.execute(mem, &req),
            Err(e) => {
                self.warn
                    .warn(format_args!("virtio-blk: malformed request: {e}"));
                Done::status(VIRTIO_BLK_S_IOERR)
            }
        };
        if let Err(e) = mem.write_obj(done.status, status_addr) {
            self.warn
                .warn(format_args!("virtio-blk: cannot write a status byte: {e}"));
            return done.written;
        }
        done.written.saturating_add(1)
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Done {
        match req.kind {
            RequestType::In => self.transfer(mem, req, true),
            RequestType::Out => self.transfer(mem, req, false),
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
            RequestType::GetId => self.get_id(mem, &req.data),
            RequestType::Unsupported(t) => {
                self.warn
                    .warn(format_args!("virtio-blk: unsupported request type {t}"));
                Done::status(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    fn get_id(&self, mem: &GuestMemoryMmap, bufs: &[DataBuf]) -> Done {
        let mut left: &[u8] = &self.serial;
        let mut written = 0u32;
        for b in bufs {
            let n = left.len().min(b.len as usize);
            if mem.write_slice(&left[..n], b.addr).is_err() {
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
    fn transfer(&mut self, mem: &GuestMemoryMmap, req: &Request, to_guest: bool) -> Done {
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
            match Self::copy_buf(mem, &backing, buf, offset, to_guest) {
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
        mem: &GuestMemoryMmap,
        backing: &Backing,
        buf: &DataBuf,
        offset: u64,
        to_guest: bool,
    ) -> std::io::Result<()> {
        let len = buf.len as usize;
        if to_guest {
            backing.read_to_guest(mem, buf.addr, len, offset)
        } else {
            backing.write_from_guest(mem, buf.addr, len, offset)
        }
    }
}
