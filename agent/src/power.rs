//! Ending the VM from inside: flush, mark the reset as clean, reset.
//!
//! The guest kernel runs with `reboot=k`, so `reboot(RB_AUTOBOOT)` resets through the
//! keyboard controller, which the VMM treats as "VM over". The boot-marker byte written
//! just before tells it the reset was requested rather than a panic.

use crx_protocols::boot_marker::CLEAN_SHUTDOWN;
use nix::sys::reboot::{reboot, RebootMode};

use crate::boot_marker::BootMarker;

/// Time given to the kernel to pass the last socket writes to the vsock device.
const TX_DRAIN: std::time::Duration = std::time::Duration::from_millis(10);

/// Powers the VM off; never returns. PID 1 must not exit (the kernel would panic), so
/// if the kernel refuses every way down, the agent logs it and waits forever.
pub fn power_off(marker: Option<&BootMarker>) -> ! {
    tracing::info!("powering off");
    crate::logging::flush();
    // A 6.1 guest's virtio-vsock hands written bytes (the Shutdown reply among them) to
    // the device from a kworker queued during write(); nothing in reboot(2) runs it.
    // Sleeping lets the runnable kworker put them on the virtqueue and kick the VMM.
    std::thread::sleep(TX_DRAIN);
    nix::unistd::sync();
    if let Some(marker) = marker {
        marker.write(CLEAN_SHUTDOWN);
    }
    let reset = reboot(RebootMode::RB_AUTOBOOT);
    let poweroff = reboot(RebootMode::RB_POWER_OFF);
    tracing::error!(reset = ?reset.err(), poweroff = ?poweroff.err(), "the kernel refused to reset or power off; waiting forever");
    crate::logging::flush();
    loop {
        nix::unistd::pause();
    }
}
