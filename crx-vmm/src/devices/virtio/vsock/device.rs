//! [`Vsock`]: the virtio-vsock device model. Config space is the guest's CID; the
//! work happens on the `crx-vsock` thread (`event_loop`) that activation starts.

use std::path::PathBuf;

use super::event_loop::EventLoop;
use super::{MuxerConfig, VsockError, VsockMuxer, QUEUE_SIZES, VIRTIO_ID_VSOCK};
use crate::devices::virtio::device_thread::{exit_events, stop_in_place, DeviceThread};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// A virtio-vsock device backed by the hybrid Unix-socket muxer.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// Held here until activation, and again after the thread stops.
    muxer: Option<VsockMuxer>,
    worker: Option<DeviceThread<VsockMuxer>>,
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
    /// A thread that cannot be told to stop stays in its slot (the device stays
    /// active and refuses a reset), as for the other devices.
    pub fn stop(&mut self) {
        if let Some(muxer) = stop_in_place(&mut self.worker, "vsock") {
            self.muxer = Some(muxer);
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
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "vsock: guest wrote read-only config space; ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(QUEUE_SIZES.len())?;
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // Before the muxer is taken: a failure here leaves the device as it was.
        let (exit, thread_exit) = exit_events().map_err(ActivateError::Thread)?;
        let Some(muxer) = self.muxer.take() else {
            return Err(ActivateError::AlreadyActive);
        };
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
        } = ctx;
        let worker = DeviceThread::spawn("crx-vsock", exit, move || {
            EventLoop {
                mem,
                queues,
                queue_events,
                interrupt,
                muxer,
                exit: thread_exit,
                warn: WarnLimiter::new(),
            }
            .run()
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        if self.worker.is_some() {
            // The thread still owns the muxer and the queues: no reset under it.
            return false;
        }
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
