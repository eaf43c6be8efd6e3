//! Guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_6000  PVH start info, modules, memmap
//! 0x0000_7000  zero page (bzImage)       0x0000_8ff0  boot stack (bzImage)
//! 0x0000_9000  page tables (bzImage)     0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (top KiB of base memory, where Linux scans for it)
//! 0x0010_0000  kernel (at its own load address), RAM up to the MMIO gap,
//!              initramfs at the top of that RAM
//! 0xd000_0000  virtio-mmio slots, 4 KiB each    0xfec0_0000 IOAPIC   0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, when the guest has more than fits below the gap
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table for the boot segments.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// `hvm_start_info`, then the module list, then the memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Linux `boot_params` for the bzImage 64-bit entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack pointer for the bzImage entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the bzImage 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86 `COMMAND_LINE_SIZE` in Linux 6.x, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the last KiB of base memory: the MP table goes here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of memory above the legacy 1 MiB area.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM below 4 GiB ends here.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// IRQ of the first virtio-mmio slot; later slots take the next lines.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Number of IOAPIC input pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;
/// Default IOAPIC and local APIC MMIO bases.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) and identity-map page (Intel real-mode emulation), at the top
/// of the gap where nothing else lives.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// 8250 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller: data port 0x60, command/status port 0x64.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// crx boot-marker port (the ISA floppy controller's first port, unused here).
pub const BOOT_MARKER_PORT: u16 = 0x3f0;

/// Number of virtio-mmio slots: one IOAPIC pin each, from [`VIRTIO_FIRST_IRQ`] up.
pub const VIRTIO_MMIO_SLOTS: u32 = IOAPIC_PINS - VIRTIO_FIRST_IRQ;

const MIB: u64 = 1 << 20;

/// Smallest guest memory crx-vmm accepts.
pub const MIN_MEMORY_MIB: u64 = 64;

/// The guest RAM regions for `mem_mib` MiB: everything up to the MMIO gap, then the
/// rest above 4 GiB.
pub fn ram_regions(mem_mib: u64) -> Vec<(GuestAddress, u64)> {
    let total = mem_mib.saturating_mul(MIB);
    let low = total.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if total > low {
        regions.push((GuestAddress(MMIO_GAP_END), total - low));
    }
    regions
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(mem_mib: u64) -> u64 {
    mem_mib.saturating_mul(MIB).min(MMIO_GAP_START)
}

/// Base address and IRQ of virtio-mmio slot `index`, if that slot exists.
pub fn virtio_slot(index: u32) -> Option<(GuestAddress, u32)> {
    (index < VIRTIO_MMIO_SLOTS).then(|| {
        (
            GuestAddress(VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE),
            VIRTIO_FIRST_IRQ + index,
        )
    })
}

/// Kind of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The memory map handed to the guest (e820 or PVH memmap): base memory below the
/// MP table, RAM from 1 MiB to the gap, RAM above 4 GiB, and the IOAPIC/LAPIC page
/// range reserved so the kernel never puts anything there.
pub fn memory_map(mem_mib: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![MemoryMapEntry {
        addr: 0,
        size: EBDA_START,
        kind: MemoryKind::Ram,
    }];
    let low_end = low_ram_end(mem_mib);
    if low_end > HIMEM_START {
        map.push(MemoryMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: MemoryKind::Ram,
        });
    }
    for (addr, size) in ram_regions(mem_mib).into_iter().skip(1) {
        map.push(MemoryMapEntry {
            addr: addr.0,
            size,
            kind: MemoryKind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_two_map_entries() {
        assert_eq!(ram_regions(128), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(
            memory_map(128),
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: MemoryKind::Ram
                },
                MemoryMapEntry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: MemoryKind::Ram
                },
            ]
        );
    }

    #[test]
    fn large_guest_splits_around_the_mmio_gap() {
        let regions = ram_regions(4096);
        assert_eq!(regions[0], (GuestAddress(0), 0xd000_0000));
        assert_eq!(
            regions[1],
            (GuestAddress(0x1_0000_0000), 4096 * MIB - 0xd000_0000)
        );
        let map = memory_map(4096);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, 0x1_0000_0000);
        assert_eq!(map[2].size, 0x3000_0000);
        assert_eq!(low_ram_end(4096), MMIO_GAP_START);
    }

    #[test]
    fn virtio_slots_are_4k_apart_with_irqs_from_5_and_bounded() {
        assert_eq!(virtio_slot(0), Some((GuestAddress(0xd000_0000), 5)));
        assert_eq!(virtio_slot(2), Some((GuestAddress(0xd000_2000), 7)));
        assert_eq!(virtio_slot(18), Some((GuestAddress(0xd001_2000), 23)));
        assert_eq!(virtio_slot(19), None);
    }
}
