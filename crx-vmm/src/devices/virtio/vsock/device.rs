//! [`Vsock`]: the virtio-vsock device model. Config space is the guest's CID; the
//! work happens on the `crx-vsock` thread (`event_loop`) that activation starts.

use std::path::PathBuf;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::EventLoop;
use super::{MuxerConfig, VsockError, VsockMuxer, QUEUE_SIZES, VIRTIO_ID_VSOCK};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

struct Worker {
    exit: EventFd,
    handle: JoinHandle<VsockMuxer>,
}

/// A virtio-vsock device backed by the hybrid Unix-socket muxer.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// Held here until activation, and again after the thread stops.
    muxer: Option<VsockMuxer>,
    worker: Option<Worker>,
}

impl Vsock {
    /// Binds the hybrid socket at `uds_path` now, so a bad path fails at VM build time.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        Self::with_config(MuxerConfig::new(guest_cid, uds_path))
    }

    pub fn with_config(cfg: MuxerConfig) -> Result<Self, VsockError> {
        let guest_cid = cfg.guest_cid;
        Ok(Self {
            guest_cid,
            acked_features: 0,
            muxer: Some(VsockMuxer::new(cfg)?),
            worker: None,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Whether the device thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the device thread and takes the muxer back. Host connections stay open.
    pub fn stop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if let Err(e) = worker.exit.write(1) {
            tracing::error!(error = %e, "vsock: cannot signal the device thread to stop");
            return;
        }
        match worker.handle.join() {
            Ok(muxer) => self.muxer = Some(muxer),
            Err(_) => tracing::error!("vsock: device thread panicked"),
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "vsock: guest wrote read-only config space; ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != QUEUE_SIZES.len() || ctx.queue_events.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len().min(ctx.queue_events.len()),
            });
        }
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(muxer) = self.muxer.take() else {
            return Err(ActivateError::AlreadyActive);
        };
        let exit = match EventFd::new(EFD_NONBLOCK).and_then(|e| Ok((e.try_clone()?, e))) {
            Ok(pair) => pair,
            Err(e) => {
                self.muxer = Some(muxer);
                return Err(ActivateError::Thread(e));
            }
        };
        let event_loop = EventLoop {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            muxer,
            exit: exit.0,
            warn: WarnLimiter::new(),
        };
        let handle = std::thread::Builder::new()
            .name("crx-vsock".into())
            .spawn(move || event_loop.run())
            .map_err(ActivateError::Thread)?;
        self.worker = Some(Worker {
            exit: exit.1,
            handle,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        match self.muxer.as_mut() {
            Some(m) => {
                // The guest forgot every connection; the host clients must learn it too.
                m.reset();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
