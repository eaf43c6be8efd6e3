//! Register semantics, status state machine, feature negotiation and queue
//! validation of the virtio-mmio transport, driven the way a guest driver would.

use std::sync::atomic::Ordering;

use super::*;
use crate::devices::virtio::test_utils::{guest_memory, TestQueue};
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};

const FEATURE_A: u64 = 1 << 3;

#[derive(Default)]
struct FakeDevice {
    acked: Option<u64>,
    activations: usize,
    resets: usize,
    fail_activate: bool,
    can_reset: bool,
    config: [u8; 8],
    queue_events: Vec<EventFd>,
    interrupt: Option<Arc<Interrupt>>,
    queue_sizes: Vec<u16>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 64]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_A
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activations += 1;
        if self.fail_activate {
            return Err(ActivateError::Backend(std::io::Error::other("test")));
        }
        self.queue_sizes = ctx.queues.iter().map(|q| q.size()).collect();
        self.queue_events = ctx.queue_events;
        self.interrupt = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.can_reset
    }
}

struct Rig {
    t: MmioTransport,
    dev: Arc<Mutex<FakeDevice>>,
    irq: EventFd,
    mem: GuestMemoryMmap,
}

fn rig() -> Rig {
    let mem = guest_memory(0x10_0000);
    let dev = Arc::new(Mutex::new(FakeDevice {
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        can_reset: true,
        ..Default::default()
    }));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
    Rig { t, dev, irq, mem }
}

impl Rig {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn negotiate(&mut self, features: u64) -> u32 {
        self.w(REG_STATUS, ACKNOWLEDGE);
        self.w(REG_STATUS, ACKNOWLEDGE | DRIVER);
        self.w(REG_DRIVER_FEATURES_SEL, 0);
        self.w(REG_DRIVER_FEATURES, features as u32);
        self.w(REG_DRIVER_FEATURES_SEL, 1);
        self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.r(REG_STATUS)
    }
    /// Lays out queue `index` at `base` with `size` entries and marks it ready.
    fn setup_queue(&mut self, index: u32, base: u64, size: u16) {
        let q = TestQueue::new(&self.mem, GuestAddress(base), size);
        self.w(REG_QUEUE_SEL, index);
        self.w(REG_QUEUE_NUM, u32::from(size));
        self.w(REG_QUEUE_DESC_LOW, q.desc.0 as u32);
        self.w(REG_QUEUE_DESC_HIGH, (q.desc.0 >> 32) as u32);
        self.w(REG_QUEUE_DRIVER_LOW, q.avail.0 as u32);
        self.w(REG_QUEUE_DRIVER_HIGH, 0);
        self.w(REG_QUEUE_DEVICE_LOW, q.used.0 as u32);
        self.w(REG_QUEUE_DEVICE_HIGH, 0);
        self.w(REG_QUEUE_READY, 1);
    }
    fn bring_up(&mut self) -> u32 {
        assert_eq!(self.negotiate(VIRTIO_F_VERSION_1), 0xb);
        self.setup_queue(0, 0x1000, 256);
        self.setup_queue(1, 0x8000, 64);
        self.w(REG_STATUS, 0xf);
        self.r(REG_STATUS)
    }
}

#[test]
fn identity_registers() {
    let mut r = rig();
    assert_eq!(r.r(REG_MAGIC), 0x7472_6976);
    assert_eq!(r.r(REG_VERSION), 2);
    assert_eq!(r.r(REG_DEVICE_ID), 19);
    assert_eq!(r.r(REG_VENDOR_ID), VENDOR_ID);
    r.w(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r(REG_DEVICE_FEATURES), FEATURE_A as u32);
    r.w(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 1);
    r.w(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
    r.w(REG_QUEUE_SEL, 1);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 64);
    r.w(REG_QUEUE_SEL, 2);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 0, "absent queue reads max 0");
    assert_eq!(r.r(REG_CONFIG_GENERATION), 0);
}

#[test]
fn config_space_reads_any_width_and_bad_widths_are_ignored() {
    let mut r = rig();
    let mut b = [0u8; 2];
    r.t.read(CONFIG_SPACE + 2, &mut b);
    assert_eq!(b, [3, 4]);
    let mut b8 = [0u8; 8];
    r.t.read(CONFIG_SPACE, &mut b8);
    assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b3 = [0xffu8; 3];
    r.t.read(CONFIG_SPACE, &mut b3);
    assert_eq!(b3, [0, 0, 0]);
    // Registers need aligned 32-bit accesses; anything else reads 0 and writes nothing.
    let mut b2 = [0xffu8; 2];
    r.t.read(REG_MAGIC, &mut b2);
    assert_eq!(b2, [0, 0]);
    r.t.write(REG_STATUS, &[1]);
    assert_eq!(r.r(REG_STATUS), 0);
    r.t.write(REG_STATUS + 1, &1u32.to_le_bytes());
    assert_eq!(r.r(REG_STATUS), 0);
    let mut b4 = [0xffu8; 4];
    r.t.read(REG_MAGIC + 2, &mut b4);
    assert_eq!(b4, [0; 4]);
}

#[test]
fn full_bring_up_activates_once_with_validated_queues() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0xf);
    {
        let dev = r.dev.lock().unwrap();
        assert_eq!(dev.activations, 1);
        assert_eq!(dev.acked, Some(VIRTIO_F_VERSION_1));
        assert_eq!(dev.queue_sizes, vec![256, 64]);
    }
    // Rewriting DRIVER_OK does not activate again.
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.dev.lock().unwrap().activations, 1);
    // Queue registers are frozen while the device runs.
    r.w(REG_QUEUE_SEL, 0);
    r.w(REG_QUEUE_READY, 0);
    assert_eq!(r.r(REG_QUEUE_READY), 1);
}

#[test]
fn device_interrupt_reaches_status_register_and_ack_clears_it() {
    let mut r = rig();
    r.bring_up();
    let intr = r.dev.lock().unwrap().interrupt.clone().unwrap();
    intr.signal_used_queue().unwrap();
    assert_eq!(r.irq.read().unwrap(), 1);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    r.w(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_write_signals_the_queue_eventfd() {
    let mut r = rig();
    r.bring_up();
    r.w(REG_QUEUE_NOTIFY, 1);
    assert_eq!(r.t.queue_events()[1].read().unwrap(), 1);
    assert!(
        r.t.queue_events()[0].read().is_err(),
        "queue 0 not signalled"
    );
    // The device got clones of the same eventfds.
    r.w(REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.dev.lock().unwrap().queue_events[0].read().unwrap(), 1);
    // Out-of-range notify is ignored.
    r.w(REG_QUEUE_NOTIFY, 9);
}

#[test]
fn features_not_offered_or_missing_version_1_are_refused() {
    let mut r = rig();
    assert_eq!(r.negotiate(VIRTIO_F_VERSION_1 | (1 << 5)), 0x3);
    assert_eq!(r.dev.lock().unwrap().acked, None);
    r.w(REG_STATUS, 0);
    assert_eq!(r.negotiate(FEATURE_A), 0x3, "legacy driver refused");
    r.w(REG_STATUS, 0);
    // A bit in a feature word past the offered ones.
    r.w(REG_STATUS, ACKNOWLEDGE);
    r.w(REG_STATUS, ACKNOWLEDGE | DRIVER);
    r.w(REG_DRIVER_FEATURES_SEL, 2);
    r.w(REG_DRIVER_FEATURES, 1);
    r.w(REG_DRIVER_FEATURES_SEL, 1);
    r.w(REG_DRIVER_FEATURES, 1);
    r.w(REG_STATUS, 0xb);
    assert_eq!(r.r(REG_STATUS), 0x3);
    r.w(REG_STATUS, 0);
    assert_eq!(r.negotiate(VIRTIO_F_VERSION_1 | FEATURE_A), 0xb);
    assert_eq!(
        r.dev.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_A)
    );
}

#[test]
fn features_written_outside_negotiation_are_ignored() {
    let mut r = rig();
    r.w(REG_DRIVER_FEATURES_SEL, 1);
    r.w(REG_DRIVER_FEATURES, 1); // before DRIVER: ignored
    r.w(REG_STATUS, ACKNOWLEDGE);
    r.w(REG_STATUS, ACKNOWLEDGE | DRIVER);
    r.w(REG_STATUS, 0xb);
    assert_eq!(r.r(REG_STATUS), 0x3, "VERSION_1 never acked");
}

#[test]
fn illegal_status_sequences_are_refused() {
    let mut r = rig();
    r.w(REG_STATUS, DRIVER_OK);
    assert_eq!(r.r(REG_STATUS), 0);
    r.w(REG_STATUS, ACKNOWLEDGE);
    r.w(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r.r(REG_STATUS), ACKNOWLEDGE);
    r.w(REG_STATUS, ACKNOWLEDGE | DRIVER);
    r.w(REG_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(r.r(REG_STATUS), 0x3, "DRIVER_OK before FEATURES_OK");
    r.w(REG_STATUS, 0x83);
    assert_eq!(r.r(REG_STATUS), 0x83);
    r.w(REG_STATUS, 0x8b);
    assert_eq!(r.r(REG_STATUS), 0x83, "nothing after FAILED but reset");
    assert_eq!(r.dev.lock().unwrap().activations, 0);
    r.w(REG_STATUS, 0);
    assert_eq!(r.r(REG_STATUS), 0);
}

#[test]
fn queues_are_validated_before_activation() {
    // Size not a power of two.
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 0x1000, 256);
    r.setup_queue(1, 0x8000, 64);
    r.w(REG_QUEUE_SEL, 1);
    r.w(REG_QUEUE_NUM, 48);
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.r(REG_STATUS), 0xb | DEVICE_NEEDS_RESET);
    assert_eq!(r.dev.lock().unwrap().activations, 0);

    // Larger than the maximum.
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 0x1000, 256);
    r.setup_queue(1, 0x8000, 64);
    r.w(REG_QUEUE_SEL, 1);
    r.w(REG_QUEUE_NUM, 128);
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.r(REG_STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);

    // Rings outside guest memory.
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 0x1000, 256);
    r.setup_queue(1, 0x8000, 64);
    r.w(REG_QUEUE_SEL, 1);
    r.w(REG_QUEUE_DEVICE_LOW, 0x000f_fff0);
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.r(REG_STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);

    // Misaligned descriptor table.
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 0x1000, 256);
    r.setup_queue(1, 0x8000, 64);
    r.w(REG_QUEUE_DESC_LOW, 0x8008);
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.r(REG_STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);

    // A queue never made ready.
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 0x1000, 256);
    r.w(REG_STATUS, 0xf);
    assert_eq!(r.r(REG_STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    assert_eq!(r.dev.lock().unwrap().activations, 0);
    // The driver can recover by resetting.
    r.w(REG_STATUS, 0);
    assert_eq!(r.bring_up(), 0xf);
}

#[test]
fn queue_registers_before_features_ok_are_ignored() {
    let mut r = rig();
    r.w(REG_STATUS, ACKNOWLEDGE);
    r.w(REG_QUEUE_SEL, 0);
    r.w(REG_QUEUE_READY, 1);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
}

#[test]
fn activation_failure_sets_needs_reset() {
    let mut r = rig();
    r.dev.lock().unwrap().fail_activate = true;
    assert_eq!(r.bring_up(), 0xb | DEVICE_NEEDS_RESET);
    r.w(REG_STATUS, 0xf);
    assert_eq!(
        r.dev.lock().unwrap().activations,
        1,
        "no retry without reset"
    );
}

#[test]
fn reset_clears_transport_and_resets_the_device() {
    let mut r = rig();
    r.bring_up();
    r.t.interrupt_status().store(3, Ordering::SeqCst);
    r.w(REG_QUEUE_NOTIFY, 0);
    r.w(REG_STATUS, 0);
    assert_eq!(r.r(REG_STATUS), 0);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
    r.w(REG_QUEUE_SEL, 0);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    assert!(
        r.t.queue_events()[0].read().is_err(),
        "stale notify dropped"
    );
    assert_eq!(r.dev.lock().unwrap().resets, 1);
    // And the device can be brought up again.
    assert_eq!(r.bring_up(), 0xf);
    assert_eq!(r.dev.lock().unwrap().activations, 2);

    // A device that cannot reset leaves the transport asking for one.
    r.dev.lock().unwrap().can_reset = false;
    r.w(REG_STATUS, 0);
    assert_eq!(r.r(REG_STATUS), DEVICE_NEEDS_RESET);
    r.w(REG_STATUS, ACKNOWLEDGE);
    assert_eq!(r.r(REG_STATUS), DEVICE_NEEDS_RESET);
}

#[test]
fn garbage_register_traffic_never_panics() {
    let mut r = rig();
    let mut seed = 0x1234_5678_u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let off = seed % 0x200;
        let len = [1usize, 2, 3, 4, 8][(seed >> 20) as usize % 5];
        let val = (seed >> 32).to_le_bytes();
        if seed & 1 == 0 {
            r.t.write(off, &val[..len]);
        } else {
            let mut b = vec![0u8; len];
            r.t.read(off, &mut b);
        }
    }
}
