//! [`Net`]: the virtio-net device model. Config space is the MAC, the link status and
//! the MTU; the work happens on the `crx-net` thread (`event_loop`) that activation
//! starts, which owns the tap until the device is stopped.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use super::event_loop::{EventLoop, EventLoopParts, NetCounters};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use super::*;
use crate::devices::virtio::device_thread::{exit_events, stop_in_place, DeviceThread};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Everything the device offers (see the module doc for why each is there).
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS;

/// Bytes of `virtio_net_config` we serve: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// A virtio-net device on a tap.
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    acked_features: u64,
    /// Held here until activation, and again after the thread stops.
    tap: Option<Tap>,
    worker: Option<DeviceThread<Tap>>,
    counters: Arc<NetCounters>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16) -> Self {
        Self {
            mac,
            mtu,
            acked_features: 0,
            tap: Some(tap),
            worker: None,
            counters: Arc::default(),
        }
    }

    /// Whether the device thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// The feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Frame counts since the device was created.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Stops the device thread and takes the tap back. Frames still in the tap stay
    /// there for the next activation.
    pub fn stop(&mut self) {
        // A thread that panicked took the tap with it: the device cannot start again
        // (activation says so).
        if let Some(tap) = stop_in_place(&mut self.worker, "net") {
            self.tap = Some(tap);
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// The `TUN_F_*` bits matching what the driver accepted to receive.
    fn tap_offload(&self) -> u32 {
        let acked = self.acked_features;
        let mut flags = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            // Segmentation offloads need the checksum one (the tap refuses otherwise).
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
            if acked & VIRTIO_NET_F_GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
        flags
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        NET_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & NET_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR / legacy, the MAC is read-only.
        tracing::debug!(
            offset,
            "net: guest wrote the read-only config space; ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.check_queue_count(QUEUE_SIZES.len())?;
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(tap) = self.tap.take() else {
            return Err(ActivateError::Backend(std::io::Error::other(
                "the tap was lost when the previous device thread failed",
            )));
        };
        let tap_offload = self.tap_offload();
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
        } = ctx;
        let mut queues = queues.into_iter();
        let mut events = queue_events.into_iter();
        let (Some(rx_queue), Some(tx_queue), Some(rx_event), Some(tx_event)) =
            (queues.next(), queues.next(), events.next(), events.next())
        else {
            // Unreachable after the count check; kept as an error rather than a panic.
            self.tap = Some(tap);
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: 0,
            });
        };
        let (exit, thread_exit) = match exit_events() {
            Ok(pair) => pair,
            Err(e) => {
                self.tap = Some(tap);
                return Err(ActivateError::Thread(e));
            }
        };
        let (ready_tx, ready_rx) = sync_channel(1);
        let event_loop = EventLoop::new(EventLoopParts {
            mem,
            rx_queue,
            tx_queue,
            rx_event,
            tx_event,
            interrupt,
            tap,
            exit: thread_exit,
            tap_offload,
            ready: ready_tx,
            mergeable_rx: self.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
            acked_features: self.acked_features,
            counters: self.counters.clone(),
        });
        // If the spawn fails the closure (and the tap in it) is dropped: the device
        // cannot start again, which the error already says.
        let worker = DeviceThread::spawn("crx-net", exit, move || event_loop.run())
            .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        // The thread sets the tap's offloads before it reads a frame: once DRIVER_OK
        // is accepted, the host kernel hands over only what this driver agreed to.
        let failure = match ready_rx.recv() {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::other("the net thread ended before it started"),
        };
        self.stop();
        Err(ActivateError::Backend(failure))
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        !self.is_active()
    }
}
