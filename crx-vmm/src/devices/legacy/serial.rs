//! 8250 UART at COM1 (vm-superio's model), wired to IRQ 4 through an irqfd. Output
//! goes to a file or, line by line, to the log; input is not connected.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Raises the UART's IRQ by writing the irqfd KVM routes to it.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART as a port-I/O device.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    write_errors: u64,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
            write_errors: 0,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if off < 8 {
                if let Err(e) = self.uart.write(off, *value) {
                    self.write_errors += 1;
                    if self.write_errors == 1 {
                        tracing::warn!(error = ?e, "serial console output failed; further errors not logged");
                    }
                }
            }
        }
    }
}

/// Longest console line logged as one record; longer lines are split.
const MAX_LINE: usize = 1024;

/// The guest is untrusted: its console line reaches the host's log (and maybe a
/// terminal) with control characters, escape sequences included, made visible.
fn printable(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches('\r')
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Sends guest console output to the log, one record per line.
#[derive(Default)]
pub struct LineLogger {
    line: Vec<u8>,
}

impl LineLogger {
    fn emit(&mut self) {
        tracing::info!("guest: {}", printable(&self.line));
        self.line.clear();
    }
}

impl Write for LineLogger {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    self.emit();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_lines_lose_control_characters() {
        assert_eq!(printable(b"ok\x1b[31mred\r"), "ok\u{fffd}[31mred");
        assert_eq!(printable(b"a\tb\xff"), "a\tb\u{fffd}");
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output_and_raise_the_irq_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut dev = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter empty");
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
