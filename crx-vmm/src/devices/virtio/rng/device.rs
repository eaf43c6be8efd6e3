//! [`Rng`]: the virtio-rng device model. It has no config space; the work happens on
//! the `crx-rng` thread (`event_loop`) that activation starts.

use super::event_loop::EventLoop;
use super::{QUEUE_SIZES, VIRTIO_ID_RNG};
use crate::devices::virtio::device_thread::{exit_events, stop_in_place, DeviceThread};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// A virtio entropy device fed by the host's `getrandom(2)`.
#[derive(Default)]
pub struct Rng {
    acked_features: u64,
    worker: Option<DeviceThread<()>>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the device thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Stops the device thread and waits for it. Requests still on the queue stay
    /// there; a later activation gets fresh queues from the transport.
    pub fn stop(&mut self) {
        stop_in_place(&mut self.worker, "rng");
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no device-specific configuration.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "rng: guest wrote the (empty) config space; ignored");
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
        let (Some(queue), Some(queue_event)) =
            (queues.into_iter().next(), queue_events.into_iter().next())
        else {
            // Unreachable after the count check; kept as an error rather than a panic.
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: 0,
            });
        };
        let event_loop = EventLoop::new(
            mem,
            queue,
            queue_event,
            interrupt,
            thread_exit,
            WarnLimiter::new(),
        );
        let worker = DeviceThread::spawn("crx-rng", exit, move || event_loop.run())
            .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Nothing survives a reset but the device itself: stopping the thread drops
        // the old queues, and the transport hands new ones at the next DRIVER_OK.
        self.stop();
        self.acked_features = 0;
        !self.is_active()
    }
}
