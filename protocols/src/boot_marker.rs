//! Values of the boot-marker port: the agent writes one byte to an x86 I/O port so the
//! VMM can time the boot and tell a clean power-off from a crash without any device.
//!
//! The agent writes [`AGENT_READY`] right after its ttrpc listener is bound, and
//! [`CLEAN_SHUTDOWN`] just before it resets the VM on request (the kernel runs with
//! `reboot=k`, so the VMM sees a keyboard-controller reset either way; the marker says
//! whether that reset was asked for or was a panic).

/// The I/O port the agent writes to. Nothing else on the crx machine uses it (it is the
/// legacy secondary floppy controller's base, absent on every VM crx boots).
pub const PORT: u16 = 0x03f0;

/// "The agent's listener is bound: it can take connections now."
pub const AGENT_READY: u8 = 1;

/// "The next reset is a requested, clean power-off."
pub const CLEAN_SHUTDOWN: u8 = 2;
