//! Address-space dispatch for port I/O and MMIO exits: a vCPU exit names an address,
//! the bus finds the device whose range holds it and hands it the offset.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a range of port I/O or MMIO addresses.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(_, (r, _))| r.base + r.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (_, (range, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - range.base;
        (offset < range.len).then_some((offset, dev))
    }

    /// Dispatches a read; returns false when no device holds `addr`
    /// (the caller then leaves `data` as all ones, like an open bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                // A poisoned lock means a device thread panicked; the device state is
                // still the best we have, and the VMM's exit path reports the panic.
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10ff, 0x10),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xfff, 2),
            Err(BusError::Overlap {
                base: 0xfff,
                len: 2
            })
        );
        bus.insert(dev.clone(), 0x1100, 0x10).unwrap();

        let mut buf = [0u8; 2];
        assert!(bus.read(0x1004, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(bus.write(0x1105, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((5, vec![9])));
        assert!(!bus.read(0x1110, &mut buf));
        assert!(!bus.read(0xfff, &mut buf));
        assert!(matches!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
