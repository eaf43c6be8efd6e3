//! Writes the boot-marker byte the VMM watches for (values in
//! `crx_protocols::boot_marker`): "agent ready" once the listener is bound, "clean
//! shutdown" right before a requested reset.
//!
//! Only ever used when the agent is PID 1 inside a VM: on a host, port I/O would reach
//! real hardware. A [`BootMarker`] therefore exists only in guest mode.

use crx_protocols::boot_marker::PORT;

/// Why a marker could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootMarkerError {
    /// `ioperm(2)` refused access to the port.
    #[error("ioperm for port {PORT:#x} failed")]
    Ioperm(#[source] std::io::Error),
    /// The guest kernel has no ioperm(2).
    #[error("the guest kernel lacks ioperm(2): build it with CONFIG_X86_IOPL_IOPERM=y")]
    NoIoperm,
    /// Port I/O does not exist on this architecture.
    #[cfg(not(target_arch = "x86_64"))]
    #[error("boot markers need x86 port I/O, which this architecture lacks")]
    Unsupported,
}

/// The right to write boot markers; created once, in guest mode.
pub struct BootMarker(());

impl BootMarker {
    /// Claims the port. Call only when running as PID 1 of a VM.
    pub fn claim() -> Result<BootMarker, BootMarkerError> {
        ioperm()?;
        Ok(BootMarker(()))
    }

    /// Writes `value` to the marker port.
    pub fn write(&self, value: u8) {
        outb(value);
    }
}

#[cfg(target_arch = "x86_64")]
fn ioperm() -> Result<(), BootMarkerError> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap; it takes plain
    // integers and touches no memory of ours. Permissions are inherited by threads
    // created later, and the marker is written from the thread that claimed it or one
    // created after it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioperm,
            libc::c_ulong::from(PORT),
            1 as libc::c_ulong,
            1 as libc::c_int,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Err(BootMarkerError::NoIoperm);
        }
        return Err(BootMarkerError::Ioperm(e));
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn ioperm() -> Result<(), BootMarkerError> {
    Err(BootMarkerError::Unsupported)
}

#[cfg(target_arch = "x86_64")]
fn outb(value: u8) {
    // SAFETY: `out` to PORT touches no memory and no stack. It is only reachable through
    // a BootMarker, which exists only after ioperm granted this port (without it the
    // instruction would fault). In a crx VM nothing but the VMM's marker sits at PORT;
    // elsewhere (QEMU) the write is dropped.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PORT, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn outb(_value: u8) {}
