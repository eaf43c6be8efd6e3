//! The `crx-rng` thread: answers entropy requests from the guest's one queue.
//!
//! It sleeps in one epoll on the queue's eventfd and an exit eventfd. On each
//! notification it serves every chain on the available ring, then raises the used-ring
//! interrupt once for the whole batch.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{RngError, MAX_REQUEST_BYTES};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::queue_thread::serve_until_exit;
use crate::devices::virtio::Interrupt;

pub struct EventLoop {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_event: EventFd,
    interrupt: Arc<Interrupt>,
    exit: EventFd,
    warn: WarnLimiter,
    scratch: Scratch,
}

/// Per-request working memory, reused so serving a request allocates nothing.
struct Scratch {
    /// Host randomness for one request.
    buf: Vec<u8>,
    /// The guest buffers of the request being served: (address, bytes to write).
    segments: Vec<(GuestAddress, usize)>,
}

impl EventLoop {
    pub fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        queue_event: EventFd,
        interrupt: Arc<Interrupt>,
        exit: EventFd,
        warn: WarnLimiter,
    ) -> Self {
        Self {
            mem,
            queue,
            queue_event,
            interrupt,
            exit,
            warn,
            scratch: Scratch {
                buf: vec![0; MAX_REQUEST_BYTES],
                segments: Vec::new(),
            },
        }
    }

    /// Runs until the exit eventfd fires.
    pub fn run(mut self) {
        let (Ok(queue_event), Ok(exit)) = (self.queue_event.try_clone(), self.exit.try_clone())
        else {
            tracing::error!("rng: cannot duplicate the device thread's eventfds");
            return;
        };
        serve_until_exit("rng", &queue_event, &exit, || self.process_queue());
    }

    /// Serves every request on the available ring; one interrupt for the batch.
    pub fn process_queue(&mut self) {
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let len = match self.scratch.serve(&self.mem, chain) {
                Ok(len) => len,
                Err(e) => {
                    self.warn
                        .warn(format_args!("rng: request returned with 0 bytes: {e}"));
                    0
                }
            };
            if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                tracing::error!(error = %e, "rng: cannot return a buffer to the guest");
            }
            used = true;
        }
        if used {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::error!(error = %e, "rng: cannot interrupt the guest");
            }
        }
    }
}

impl Scratch {
    /// Fills the chain's buffers, up to [`MAX_REQUEST_BYTES`] in all; returns the bytes
    /// written. Every buffer that would receive bytes is checked before any byte is
    /// written, so a refused request leaves guest memory untouched.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, RngError> {
        self.segments.clear();
        let mut total = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(RngError::ReadOnlyDescriptor);
            }
            let len = (desc.len() as usize).min(MAX_REQUEST_BYTES - total);
            if len == 0 {
                continue;
            }
            if !mem.check_range(desc.addr(), len) {
                return Err(RngError::OutOfMemory {
                    addr: desc.addr().0,
                    len,
                });
            }
            self.segments.push((desc.addr(), len));
            total += len;
            if total == MAX_REQUEST_BYTES {
                // The rest of the chain gets nothing, so it needs no checking either.
                break;
            }
        }
        let random = &mut self.buf[..total];
        fill_random(random).map_err(RngError::GetRandom)?;
        let mut offset = 0;
        for &(addr, len) in &self.segments {
            mem.write_slice(&random[offset..offset + len], addr)
                .map_err(RngError::GuestWrite)?;
            offset += len;
        }
        // `total` is at most MAX_REQUEST_BYTES (64 KiB), so it fits.
        Ok(total as u32)
    }
}

/// Fills `buf` from the host's CSPRNG, retrying short reads and signal interruptions.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, memory this function borrows
        // mutably for the call; getrandom writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // Cannot happen for a non-empty buffer; refuse rather than loop forever.
            return Err(std::io::Error::other("getrandom returned no bytes"));
        }
        done += n as usize;
    }
    Ok(())
}
