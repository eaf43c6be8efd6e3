//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs, its IOAPIC and how ISA IRQs reach it.
//!
//! Written as bytes (not `repr(C)` structs) so the layout is explicit and the tests
//! can check it byte for byte.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// MP table versions we claim (spec 1.4, LAPIC 0x14, IOAPIC 0x11 as KVM models them).
const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// Largest CPU count: APIC ids 0..n-1, the IOAPIC takes id n, 0xff is broadcast.
pub const MAX_CPUS: u8 = 254;

/// Why an MP table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("an MP table describes 1 to {MAX_CPUS} CPUs, not {0}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer followed by the configuration table, for `cpus` CPUs,
/// to be written at guest address `addr`.
pub fn build(addr: u64, cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let table_addr = addr + FLOATING_POINTER_LEN as u64;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informational only.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entry_count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        // Flags 0: polarity and trigger conform to the (ISA) bus: active high, edge.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        entry_count += 1;
    }
    // LINT0 carries the PIC's ExtINT, LINT1 the NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let table_len = u16::try_from(HEADER_LEN + entries.len()).unwrap_or(u16::MAX);
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"CRX     ");
    table.extend_from_slice(b"CRXVMM      ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte paragraphs
    fp.push(SPEC_REV);
    fp.push(0); // checksum, patched below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table follows
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Size in bytes of the table for `cpus` CPUs.
pub fn size(cpus: u8) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + usize::from(cpus) * PROCESSOR_ENTRY_LEN
        + (2 + IOAPIC_PINS as usize + 2) * SHORT_ENTRY_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn floating_pointer_points_at_a_checksummed_table() {
        let t = build(0x9fc00, 2).unwrap();
        assert_eq!(t.len(), size(2));
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32_at(&t, 4), 0x9fc10);
        assert_eq!((t[8], t[9]), (1, 4));
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(usize::from(u16_at(table, 4)), table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u32_at(table, 36), 0xfee0_0000);
        // 2 CPUs + bus + IOAPIC + 24 pins + 2 local interrupts.
        assert_eq!(u16_at(table, 34), 2 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn processor_entries_mark_only_cpu0_as_bootstrap() {
        let t = build(0x9fc00, 3).unwrap();
        let entries = &t[16 + 44..];
        for cpu in 0..3u8 {
            let e = &entries[usize::from(cpu) * 20..][..20];
            assert_eq!(e[0], 0, "processor entry type");
            assert_eq!(e[1], cpu, "APIC id");
            assert_eq!(e[3], if cpu == 0 { 3 } else { 1 });
        }
        let rest = &entries[60..];
        assert_eq!(&rest[0..8], &[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
        // IOAPIC id follows the CPUs' APIC ids.
        assert_eq!(&rest[8..16], &[2, 3, 0x11, 1, 0, 0, 0xc0, 0xfe]);
        // IRQ 5 (first virtio-mmio slot) is routed to IOAPIC pin 5.
        let irq5 = &rest[16 + 5 * 8..][..8];
        assert_eq!(irq5, &[3, 0, 0, 0, 0, 5, 3, 5]);
        let lint = &rest[16 + 24 * 8..];
        assert_eq!(
            lint,
            &[4, 3, 0, 0, 0, 0, 0xff, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]
        );
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::CpuCount(255)));
        let t = build(0x9fc00, 254).unwrap();
        assert_eq!(sum(&t[16..]), 0);
    }
}
