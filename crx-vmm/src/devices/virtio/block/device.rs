//! [`Block`]: the virtio-blk device model. Config space carries the capacity (and
//! seg_max, blk_size); requests are served on the `crx-blk` thread (`worker`) that
//! activation starts. The backing lives in [`Shared`] so a [`BlockSlot`] handle can swap
//! it while the device runs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::worker::{RequestServer, Worker};
use super::{
    Backing, BlockError, QUEUE_SIZE, QUEUE_SIZES, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_ID_BLOCK,
};
use crate::devices::virtio::device_thread::{exit_events, DeviceThread};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Who tells the guest that the config space changed: the transport's interrupt in
/// process, the vhost-user front end's backend channel for the vhost-user back end.
pub trait ConfigChangeNotifier: Send + Sync {
    fn notify_config_change(&self) -> std::io::Result<()>;
}

impl ConfigChangeNotifier for Interrupt {
    fn notify_config_change(&self) -> std::io::Result<()> {
        self.signal_config_change()
    }
}

/// Largest number of data segments per request we tell the driver to use: the queue
/// size minus the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Config space: capacity u64, size_max u32, seg_max u32, geometry (4 bytes), blk_size u32.
pub(crate) const CONFIG_LEN: usize = 24;
/// Where `seg_max` sits in config space.
pub(crate) const SEG_MAX_OFFSET: usize = 12;

/// State shared by the device, its thread and every [`BlockSlot`].
pub(super) struct Shared {
    backing: Mutex<Option<Arc<Backing>>>,
    /// Capacity in sectors, kept apart from the backing lock so a vCPU reading config
    /// space never waits behind a slow I/O.
    capacity: AtomicU64,
    /// Bumped on every capacity change; the transport's ConfigGeneration should follow it.
    generation: AtomicU32,
    /// Set while the device is active (for the vhost-user back end: from the start),
    /// so a swap can tell the guest.
    interrupt: Mutex<Option<Arc<dyn ConfigChangeNotifier>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a holder panicked mid-update of a plain value; the value is
    // still a consistent Option and the panic is reported elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The backing in use right now; I/O runs on this reference without the lock held.
    pub(super) fn current(&self) -> Option<Arc<Backing>> {
        lock(&self.backing).clone()
    }
}

/// A handle on a block slot's backing, usable from any thread while the VM runs.
#[derive(Clone)]
pub struct BlockSlot {
    shared: Arc<Shared>,
}

impl BlockSlot {
    /// Attaches, replaces (`Some`) or removes (`None`) the slot's backing, then tells
    /// a running guest through a configuration-change interrupt. The old backing is
    /// flushed first; if that fails nothing changes. Returns the new capacity in sectors.
    pub fn replace_backing(&self, new: Option<Backing>) -> Result<u64, BlockError> {
        let capacity = new.as_ref().map_or(0, Backing::sectors);
        {
            let mut slot = lock(&self.shared.backing);
            if let Some(old) = slot.as_ref() {
                old.flush().map_err(BlockError::FlushOld)?;
            }
            *slot = new.map(Arc::new);
            self.shared.capacity.store(capacity, Ordering::SeqCst);
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
        }
        tracing::info!(capacity, "virtio-blk: backing replaced");
        if let Some(intr) = lock(&self.shared.interrupt).as_ref() {
            intr.notify_config_change().map_err(BlockError::Interrupt)?;
        }
        Ok(capacity)
    }

    /// Capacity in 512-byte sectors (0 for an empty slot).
    pub fn capacity(&self) -> u64 {
        self.shared.capacity.load(Ordering::SeqCst)
    }

    /// The backing in use right now (e.g. to read its flush count).
    pub fn backing(&self) -> Option<Arc<Backing>> {
        self.shared.current()
    }

    /// Counts capacity changes since creation.
    pub fn config_generation(&self) -> u32 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Sets (or clears) who tells the guest about a new capacity, for a device whose
    /// queue is served outside crx-vmm's transport (the vhost-user back end).
    pub(crate) fn set_config_notifier(&self, notifier: Option<Arc<dyn ConfigChangeNotifier>>) {
        *lock(&self.shared.interrupt) = notifier;
    }
}

/// A virtio-blk device: one queue, a backing file or block device, or an empty slot.
pub struct Block {
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    read_only: bool,
    acked_features: u64,
    shared: Arc<Shared>,
    running: Option<DeviceThread<()>>,
}

impl Block {
    /// A drive on `backing`; read-only if the backing was opened read-only. `serial`
    /// (at most 20 bytes) is what GET_ID returns, i.e. `/dev/disk/by-id/virtio-<serial>`.
    pub fn new(serial: &str, backing: Backing) -> Result<Self, BlockError> {
        let read_only = backing.is_read_only();
        let mut dev = Self::new_empty(serial)?;
        let capacity = backing.sectors();
        *lock(&dev.shared.backing) = Some(Arc::new(backing));
        dev.shared.capacity.store(capacity, Ordering::SeqCst);
        dev.read_only = read_only;
        Ok(dev)
    }

    /// An empty slot: capacity 0 until [`Block::replace_backing`] attaches something.
    pub fn new_empty(serial: &str) -> Result<Self, BlockError> {
        let bytes = serial.as_bytes();
        if bytes.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockError::SerialTooLong(bytes.len()));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id[..bytes.len()].copy_from_slice(bytes);
        Ok(Self {
            serial: id,
            read_only: false,
            acked_features: 0,
            shared: Arc::new(Shared {
                backing: Mutex::new(None),
                capacity: AtomicU64::new(0),
                generation: AtomicU32::new(0),
                interrupt: Mutex::new(None),
            }),
            running: None,
        })
    }

    /// Makes the drive read-only whatever backing it gets (advertises VIRTIO_BLK_F_RO).
    /// Call before attaching: feature bits cannot change once the driver has read them.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// A handle to swap the backing later without locking the device.
    pub fn slot(&self) -> BlockSlot {
        BlockSlot {
            shared: self.shared.clone(),
        }
    }

    /// See [`BlockSlot::replace_backing`].
    pub fn replace_backing(&self, new: Option<Backing>) -> Result<u64, BlockError> {
        self.slot().replace_backing(new)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity.load(Ordering::SeqCst)
    }

    /// Whether the `crx-blk` thread is running.
    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }

    /// Stops the device thread; requests in flight finish first.
    pub fn stop(&mut self) {
        *lock(&self.shared.interrupt) = None;
        if let Some(running) = self.running.take() {
            // Failures are logged; a thread that could not be told to stop is let go.
            let _ = running.stop("virtio-blk");
        }
    }

    /// What serves this drive's requests when its queue is driven from elsewhere (the
    /// bench, the vhost-user back end); `writethrough` if the driver declined FLUSH.
    pub(crate) fn request_server(&self, writethrough: bool) -> RequestServer {
        RequestServer {
            shared: self.shared.clone(),
            serial: self.serial,
            read_only: self.read_only,
            writethrough,
            warn: WarnLimiter::new(),
        }
    }

    /// The config space as the driver reads it now.
    pub(crate) fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        c[SEG_MAX_OFFSET..SEG_MAX_OFFSET + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        tracing::debug!(
            offset,
            "virtio-blk: guest wrote read-only config space; ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(1)?;
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (exit, thread_exit) = exit_events().map_err(ActivateError::Thread)?;
        let (Some(queue), Some(queue_event)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_events.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        let worker = Worker {
            mem: ctx.mem,
            queue,
            queue_event,
            interrupt: ctx.interrupt.clone(),
            exit: thread_exit,
            requests: self.request_server(self.acked_features & VIRTIO_BLK_F_FLUSH == 0),
        };
        let running = DeviceThread::spawn("crx-blk", exit, move || worker.run())
            .map_err(ActivateError::Thread)?;
        *lock(&self.shared.interrupt) = Some(ctx.interrupt as Arc<dyn ConfigChangeNotifier>);
        self.running = Some(running);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        true
    }

    fn config_generation(&self) -> u32 {
        self.shared.generation.load(Ordering::SeqCst)
    }
}
