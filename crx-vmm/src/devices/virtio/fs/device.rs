//! [`Fs`]: the virtio-fs device model. Config space is the tag and the number of
//! request queues; requests are served on the `crx-fs` thread (`event_loop`) that
//! activation starts, by the share's [`FsServer`], which outlives resets (a driver
//! that resets and sends FUSE INIT again finds the same tree).

use std::path::Path;
use std::sync::Arc;

use super::event_loop::EventLoop;
use super::{FsError, FsServer, NUM_REQUEST_QUEUES, QUEUE_SIZES, TAG_LEN, VIRTIO_ID_FS};
use crate::devices::virtio::device_thread::{exit_events, stop_in_place, DeviceThread};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Config space: tag[36], num_request_queues le32.
const CONFIG_LEN: usize = TAG_LEN + 4;

/// A virtio-fs device serving one host directory.
pub struct Fs {
    config: [u8; CONFIG_LEN],
    server: Arc<FsServer>,
    acked_features: u64,
    worker: Option<DeviceThread<()>>,
}

impl Fs {
    /// A device with tag `tag` (1 to 36 bytes) serving `dir`, which must be a directory.
    pub fn new(tag: &str, dir: &Path) -> Result<Self, FsError> {
        let server = FsServer::open(dir)?;
        Self::with_server(tag, Arc::new(server))
    }

    /// A device with tag `tag` served by an already opened `server`.
    pub fn with_server(tag: &str, server: Arc<FsServer>) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::BadTag(tag.to_string()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Self {
            config,
            server,
            acked_features: 0,
            worker: None,
        })
    }

    /// Whether the device thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the device thread and waits for it (a request being served finishes
    /// first).
    pub fn stop(&mut self) {
        stop_in_place(&mut self.worker, "fs");
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
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
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            "fs: guest wrote the read-only config space; ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(QUEUE_SIZES.len())?;
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (exit, thread_exit) = exit_events().map_err(ActivateError::Thread)?;
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
        } = ctx;
        let event_loop = EventLoop {
            mem,
            queues,
            queue_events,
            interrupt,
            exit: thread_exit,
            server: self.server.clone(),
            warn: WarnLimiter::new(),
        };
        let worker = DeviceThread::spawn("crx-fs", exit, move || event_loop.run())
            .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        !self.is_active()
    }
}
