//! virtio devices over the MMIO transport (virtio 1.x, "modern" only).
//!
//! A device model implements [`VirtioDevice`]; the transport (`mmio`) owns the
//! register file, feature negotiation and queue setup, and calls `activate` once the
//! driver sets DRIVER_OK. From then on the device runs its own event loop thread and
//! signals the guest through [`Interrupt`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod device_thread;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue_thread;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

/// `VIRTIO_F_VERSION_1`: every crx device is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// How a device raises its interrupt line: set a bit in the transport's
/// InterruptStatus register, then kick the irqfd KVM routes to the device's GSI.
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self { status, irqfd }
    }

    /// Signals a used-ring update.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Signals a configuration change (e.g. a block slot got new backing).
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The status word shared with the transport (tests read it).
    pub fn status(&self) -> &Arc<AtomicU32> {
        &self.status
    }
}

/// Everything a device needs once the driver is ready.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// Queues in index order, already validated by the transport.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written (through a KVM ioeventfd) when the driver
    /// notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
}

impl ActivateContext {
    /// Checks that the driver set up exactly the `expected` queues.
    pub fn check_queue_count(&self, expected: usize) -> Result<(), ActivateError> {
        if self.queues.len() != expected || self.queue_events.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: self.queues.len().min(self.queue_events.len()),
            });
        }
        Ok(())
    }
}

/// Serves a config-space read from the device's config bytes; bytes past their end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expected {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device is already active")]
    AlreadyActive,
    #[error("could not start the device's event thread")]
    Thread(#[source] std::io::Error),
    #[error("device back end failed to start")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device's work with the queues the driver set up.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset; returns false if it cannot be reset
    /// (the transport then marks the device as needing a reset).
    fn reset(&mut self) -> bool {
        false
    }
    /// The ConfigGeneration the transport reports: a device whose config space can
    /// change while the driver runs (a block slot getting a new backing) returns a
    /// value it bumps on each change, so a driver reading several fields can tell it
    /// raced with a change and read again (virtio 1.2 §2.5.1).
    fn config_generation(&self) -> u32 {
        0
    }
}
