//! Just enough of the i8042 keyboard controller for a guest to reset the machine:
//! `reboot=k` makes Linux wait for an empty input buffer (status port reads 0), then
//! write command 0xFE (pulse the reset line) to port 0x64. That ends the VM.

use std::sync::mpsc::Sender;

use crate::devices::bus::BusDevice;
use crate::exit::VmEnd;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: Sender<VmEnd>,
    reset_sent: bool,
}

impl I8042 {
    /// `events` receives [`VmEnd::I8042Reset`] when the guest resets.
    pub fn new(events: Sender<VmEnd>) -> Self {
        Self {
            events,
            reset_sent: false,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Data and status read as 0: no key waiting, input buffer empty.
        let value = if offset == 0 || offset == COMMAND_OFFSET {
            0
        } else {
            0xff
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) && !self.reset_sent {
            self.reset_sent = true;
            let _ = self.events.send(VmEnd::I8042Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_on_port_64_ends_the_vm_once() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = I8042::new(tx);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        assert!(rx.try_recv().is_err());
        dev.write(4, &[0xfe]);
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(VmEnd::I8042Reset));
        assert!(rx.try_recv().is_err());
    }
}
