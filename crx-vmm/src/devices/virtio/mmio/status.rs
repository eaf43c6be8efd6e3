//! The virtio device-status state machine (virtio 1.2 §2.1, §3.1.1): which Status
//! writes a driver may make, in which order.
//!
//! The driver sets bits one step at a time (ACKNOWLEDGE → DRIVER → FEATURES_OK →
//! DRIVER_OK); FAILED may be set at any time; writing 0 resets. Anything else is a
//! driver bug and is refused, so the device never acts on a half-negotiated state.

pub const ACKNOWLEDGE: u32 = 0x01;
pub const DRIVER: u32 = 0x02;
pub const DRIVER_OK: u32 = 0x04;
pub const FEATURES_OK: u32 = 0x08;
pub const DEVICE_NEEDS_RESET: u32 = 0x40;
pub const FAILED: u32 = 0x80;

/// What the transport must do for a Status write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusStep {
    /// Writing 0: reset the transport and the device.
    Reset,
    /// A plain step (ACKNOWLEDGE, DRIVER): store the new value.
    Set(u32),
    /// The driver asks for FEATURES_OK: check the features it acked first.
    FeaturesOk(u32),
    /// The driver asks for DRIVER_OK: validate the queues and activate the device.
    DriverOk(u32),
    /// The driver gave up on the device.
    Failed(u32),
    /// Not a legal transition from the current status.
    Invalid,
}

/// Classifies a Status write of `new` when the register holds `current`.
pub fn next_step(current: u32, new: u32) -> StatusStep {
    if new == 0 {
        return StatusStep::Reset;
    }
    // A driver may only add bits; clearing one without a reset is not a transition
    // the spec knows. DEVICE_NEEDS_RESET is the device's bit: the driver echoing it
    // back is harmless, so it is carried over rather than judged.
    let new_bits = new & !current & !DEVICE_NEEDS_RESET;
    if new & current != current & !DEVICE_NEEDS_RESET {
        return StatusStep::Invalid;
    }
    if new_bits == 0 {
        return StatusStep::Set(current);
    }
    if new_bits & FAILED != 0 {
        return StatusStep::Failed(current | FAILED);
    }
    if current & (FAILED | DEVICE_NEEDS_RESET) != 0 {
        return StatusStep::Invalid;
    }
    let base = current & !DEVICE_NEEDS_RESET;
    match (base, new_bits) {
        (0, ACKNOWLEDGE) => StatusStep::Set(ACKNOWLEDGE),
        (ACKNOWLEDGE, DRIVER) => StatusStep::Set(ACKNOWLEDGE | DRIVER),
        (b, FEATURES_OK) if b == ACKNOWLEDGE | DRIVER => {
            StatusStep::FeaturesOk(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        }
        (b, DRIVER_OK) if b == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
            StatusStep::DriverOk(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        }
        _ => StatusStep::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_sequence_and_illegal_jumps() {
        assert_eq!(next_step(0, ACKNOWLEDGE), StatusStep::Set(1));
        assert_eq!(next_step(1, 3), StatusStep::Set(3));
        assert_eq!(next_step(3, 0xb), StatusStep::FeaturesOk(0xb));
        assert_eq!(next_step(0xb, 0xf), StatusStep::DriverOk(0xf));
        // Skipping a step, or setting two at once.
        assert_eq!(next_step(0, DRIVER), StatusStep::Invalid);
        assert_eq!(next_step(0, 3), StatusStep::Invalid);
        assert_eq!(next_step(1, 0xb), StatusStep::Invalid);
        assert_eq!(next_step(3, 0x7), StatusStep::Invalid);
        // Clearing a bit without a reset.
        assert_eq!(next_step(0xf, 0xb), StatusStep::Invalid);
        // FAILED any time; nothing but reset afterwards.
        assert_eq!(next_step(3, 0x83), StatusStep::Failed(0x83));
        assert_eq!(next_step(0x83, 0x8b), StatusStep::Invalid);
        assert_eq!(next_step(0x83, 0), StatusStep::Reset);
        // Rewriting the same value is a no-op.
        assert_eq!(next_step(0xb, 0xb), StatusStep::Set(0xb));
        // A device that needs a reset accepts nothing new but FAILED or 0.
        assert_eq!(
            next_step(0xb | DEVICE_NEEDS_RESET, 0xf),
            StatusStep::Invalid
        );
        assert_eq!(
            next_step(0xb | DEVICE_NEEDS_RESET, 0x8b),
            StatusStep::Failed(0x8b | DEVICE_NEEDS_RESET)
        );
    }
}
