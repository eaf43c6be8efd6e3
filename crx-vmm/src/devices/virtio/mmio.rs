//! virtio-mmio transport, version 2 ("modern"), per virtio 1.2 §4.2.2.
//!
//! The transport owns the register file of one MMIO slot: feature negotiation, the
//! device-status state machine (`status`), queue configuration, interrupt status and
//! the window onto the device's configuration space at 0x100. It knows the device only
//! through [`VirtioDevice`]. Every register value comes from the guest: accesses of
//! the wrong width or alignment are dropped, illegal status transitions refused, and
//! queues are validated against guest memory before the device sees them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

mod status;
#[cfg(test)]
mod tests;

use status::StatusStep;
pub use status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};

/// Size of one virtio-mmio slot in guest physical address space.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("CRX\0"); drivers do not interpret it.
const VENDOR_ID: u32 = 0x0058_5243;
/// `VIRTIO_RING_F_EVENT_IDX`: the queues must use used/avail event suppression.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of QueueNotify, where the builder places each queue's ioeventfd.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// One queue's configuration as the driver wrote it; turned into a
/// [`Queue`] only once, at DRIVER_OK, after validation.
#[derive(Clone, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

/// Why the transport refused to start the device at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("queue {index} is not ready")]
    NotReady { index: usize },
    #[error("queue {index} has invalid size {size} (max {max})")]
    Size { index: usize, size: u16, max: u16 },
    #[error("queue {index} rings are misaligned")]
    Alignment {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {index} rings lie outside guest memory")]
    OutOfMemory { index: usize },
    #[error("device declares an invalid maximum size for queue {index}")]
    MaxSize {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
}

/// Logs at most one warning per second, so a guest hammering bad registers (or
/// sending bad packets) cannot flood the log.
pub(crate) struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    const PERIOD: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    pub(crate) fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::PERIOD)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The register file of one virtio-mmio slot.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    avail_features: u64,
    irqfd: EventFd,
    interrupt_status: Arc<AtomicU32>,
    queue_events: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver acked a bit in a feature word past the second (none are offered).
    driver_features_out_of_range: bool,
    queue_sel: u32,
    status: u32,
    activated: bool,
    warn: WarnLimiter,
}

impl MmioTransport {
    /// Wraps `device` in a fresh register file.
    ///
    /// `irqfd` is a clone of the EventFd the builder registered with KVM for this slot's IRQ.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let (device_type, avail_features, max_sizes) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let queue_events = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            mem,
            device,
            device_type,
            avail_features,
            irqfd,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            queue_events,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_out_of_range: false,
            queue_sel: 0,
            status: 0,
            activated: false,
            warn: WarnLimiter::new(),
        })
    }

    /// One EventFd per queue; the builder registers each as a KVM ioeventfd on
    /// base+0x50 with datamatch = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register as the driver last saw it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus word shared with the device's [`Interrupt`].
    pub fn interrupt_status(&self) -> &Arc<AtomicU32> {
        &self.interrupt_status
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A poisoned lock means the device thread panicked; its state is still the best
        // we have and the VMM's exit path reports the panic.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            // No shared memory regions: length reads as "all ones" (virtio 1.2 §4.2.2).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.lock_device().config_generation(),
            _ => {
                self.warn.warn(format_args!(
                    "virtio-mmio: read of unknown or write-only register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => self.notify_queue(value),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            _ => self.warn.warn(format_args!(
                "virtio-mmio: write of unknown or read-only register {offset:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != ACKNOWLEDGE | DRIVER {
            self.warn.warn(format_args!(
                "driver features written in status {:#x}, ignored",
                self.status
            ));
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => self.driver_features_out_of_range |= value != 0,
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues are configured after FEATURES_OK and frozen once the device runs.
        if self.status != ACKNOWLEDGE | DRIVER | FEATURES_OK {
            self.warn.warn(format_args!(
                "queue register {offset:#x} written in status {:#x}, ignored",
                self.status
            ));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.warn.warn(format_args!(
                "virtio-mmio: queue register {offset:#x} for absent queue {sel}"
            ));
            return;
        };
        let set_low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let set_high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            // Out-of-range sizes are kept as written and refused at DRIVER_OK, so the
            // driver and the device never disagree silently about a queue's size.
            REG_QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
            REG_QUEUE_READY => q.ready = value == 1,
            REG_QUEUE_DESC_LOW => set_low(&mut q.desc),
            REG_QUEUE_DESC_HIGH => set_high(&mut q.desc),
            REG_QUEUE_DRIVER_LOW => set_low(&mut q.driver),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut q.driver),
            REG_QUEUE_DEVICE_LOW => set_low(&mut q.device),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut q.device),
            _ => {}
        }
    }

    fn notify_queue(&mut self, value: u32) {
        // Normally KVM's ioeventfd swallows this write; when it reaches us (before
        // registration, or in tests), deliver it the same way.
        match self.queue_events.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!(queue = value, error = %e, "virtio-mmio: cannot signal queue event");
                }
            }
            None => self
                .warn
                .warn(format_args!("virtio-mmio: notify for absent queue {value}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        match status::next_step(self.status, value) {
            StatusStep::Reset => self.reset(),
            StatusStep::Set(s) | StatusStep::Failed(s) => self.status = s,
            StatusStep::FeaturesOk(s) => {
                if self.features_acceptable() {
                    self.lock_device().set_acked_features(self.driver_features);
                    self.status = s;
                } else {
                    // Leaving FEATURES_OK clear is how the device says no (§3.1.1).
                    self.warn.warn(format_args!(
                        "driver features {:#x} refused (offered {:#x})",
                        self.driver_features, self.avail_features
                    ));
                }
            }
            StatusStep::DriverOk(s) => self.driver_ok(s),
            StatusStep::Invalid => self.warn.warn(format_args!(
                "illegal status transition {:#x} -> {value:#x}",
                self.status
            )),
        }
    }

    fn features_acceptable(&self) -> bool {
        !self.driver_features_out_of_range
            && self.driver_features & !self.avail_features == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn driver_ok(&mut self, new_status: u32) {
        if self.activated {
            self.status = new_status;
            return;
        }
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, device = self.device_type, "virtio-mmio: queue setup refused");
                self.status |= DEVICE_NEEDS_RESET;
                return;
            }
        };
        let activated = self.activate(queues);
        match activated {
            Ok(()) => {
                self.activated = true;
                self.status = new_status;
            }
            Err(e) => {
                tracing::error!(error = %e, device = self.device_type, "virtio-mmio: device activation failed");
                self.status |= DEVICE_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self, queues: Vec<Queue>) -> Result<(), ActivateFailure> {
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(ActivateFailure::Clone)?;
        let irqfd = self.irqfd.try_clone().map_err(ActivateFailure::Clone)?;
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: Arc::new(Interrupt::new(self.interrupt_status.clone(), irqfd)),
        };
        self.lock_device()
            .activate(ctx)
            .map_err(ActivateFailure::Device)
    }

    fn build_queues(&self) -> Result<Vec<Queue>, QueueSetupError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.queues
            .iter()
            .enumerate()
            .map(|(index, cfg)| {
                if !cfg.ready {
                    return Err(QueueSetupError::NotReady { index });
                }
                let mut q = Queue::new(cfg.max_size)
                    .map_err(|source| QueueSetupError::MaxSize { index, source })?;
                q.try_set_size(cfg.size)
                    .map_err(|_| QueueSetupError::Size {
                        index,
                        size: cfg.size,
                        max: cfg.max_size,
                    })?;
                let align = |source| QueueSetupError::Alignment { index, source };
                q.try_set_desc_table_address(GuestAddress(cfg.desc))
                    .map_err(align)?;
                q.try_set_avail_ring_address(GuestAddress(cfg.driver))
                    .map_err(align)?;
                q.try_set_used_ring_address(GuestAddress(cfg.device))
                    .map_err(align)?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(QueueSetupError::OutOfMemory { index });
                }
                Ok(q)
            })
            .collect()
    }

    fn reset(&mut self) {
        if self.activated && !self.lock_device().reset() {
            // The device keeps running on the old queues; it must not be driven again
            // until the VMM restarts, so say so rather than pretend a clean slate.
            tracing::error!(
                device = self.device_type,
                "virtio-mmio: device cannot be reset"
            );
            self.status = DEVICE_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_out_of_range = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.interrupt_status.store(0, Ordering::SeqCst);
        // Stale notifications from before the reset must not reach the next activation.
        for evt in &self.queue_events {
            let _ = evt.read();
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ActivateFailure {
    #[error("cannot duplicate an eventfd for the device")]
    Clone(#[source] std::io::Error),
    #[error("device refused to start")]
    Device(#[source] super::ActivateError),
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device().read_config(offset - CONFIG_SPACE, data);
            } else {
                data.fill(0);
                self.warn.warn(format_args!(
                    "virtio-mmio: config read of {} bytes at {offset:#x}",
                    data.len()
                ));
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            self.warn.warn(format_args!(
                "register read of {} bytes at {offset:#x} ignored",
                data.len()
            ));
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device().write_config(offset - CONFIG_SPACE, data);
            } else {
                self.warn.warn(format_args!(
                    "virtio-mmio: config write of {} bytes at {offset:#x}",
                    data.len()
                ));
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn.warn(format_args!(
                "register write of {} bytes at {offset:#x} ignored",
                data.len()
            ));
            return;
        };
        if offset % 4 != 0 {
            self.warn.warn(format_args!(
                "virtio-mmio: unaligned register write at {offset:#x} ignored"
            ));
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
