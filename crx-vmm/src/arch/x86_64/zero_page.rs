//! Linux x86 boot protocol "zero page" (`struct boot_params`) for the bzImage 64-bit
//! entry: the setup header from the image, patched with what the loader decided
//! (command line, initramfs, loader id) and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::MemoryMapEntry;

/// `type_of_loader` 0xff: "undefined" boot loader, which is what a VMM is.
const LOADER_UNDEFINED: u8 = 0xff;
/// 0xaa55 at offset 0x1fe.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS" at offset 0x202.
const HEADER_MAGIC: u32 = 0x5372_6448;
/// `loadflags`: the kernel may use the heap up to `heap_end_ptr`.
const CAN_USE_HEAP: u8 = 0x80;
/// Setup code's heap end, relative to the real-mode code start (boot.rst suggests 0xe000
/// - 0x200 for a loader that gives it the whole segment).
const HEAP_END_PTR: u16 = 0xfe00;

/// Why the zero page could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZeroPageError {
    #[error("the memory map has {0} entries; the zero page holds 128")]
    TooManyE820Entries(usize),
    #[error("{what} at {addr:#x} is above 4 GiB, out of reach of the 32-bit boot fields")]
    AddressAbove4G { what: &'static str, addr: u64 },
}

/// Inputs that are not in the kernel's own setup header.
pub struct ZeroPageParams<'a> {
    pub cmdline_addr: u64,
    /// Length of the command line without its terminating NUL.
    pub cmdline_len: usize,
    pub initramfs: Option<(u64, u64)>,
    pub memory_map: &'a [MemoryMapEntry],
}

fn low32(what: &'static str, addr: u64) -> Result<u32, ZeroPageError> {
    u32::try_from(addr).map_err(|_| ZeroPageError::AddressAbove4G { what, addr })
}

/// The zero page for a kernel whose setup header is `hdr`.
pub fn build(hdr: setup_header, p: &ZeroPageParams<'_>) -> Result<boot_params, ZeroPageError> {
    let mut bp = boot_params {
        hdr,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_UNDEFINED;
    bp.hdr.boot_flag = BOOT_FLAG_MAGIC;
    bp.hdr.header = HEADER_MAGIC;
    bp.hdr.loadflags |= CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = HEAP_END_PTR;
    bp.hdr.cmd_line_ptr = low32("command line", p.cmdline_addr)?;
    bp.hdr.cmdline_size = u32::try_from(p.cmdline_len).unwrap_or(u32::MAX);
    if let Some((addr, size)) = p.initramfs {
        bp.hdr.ramdisk_image = low32("initramfs", addr)?;
        bp.hdr.ramdisk_size = low32("initramfs size", size)?;
    }
    if p.memory_map.len() > bp.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(p.memory_map.len()));
    }
    for (slot, e) in bp.e820_table.iter_mut().zip(p.memory_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
        };
    }
    bp.e820_entries = p.memory_map.len() as u8;
    Ok(bp)
}

#[cfg(test)]
mod tests {
    use super::super::layout::memory_map;
    use super::*;
    use vm_memory::ByteValued;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn fields_land_at_boot_protocol_offsets() {
        let hdr = setup_header {
            version: 0x020f,
            loadflags: 1,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let map = memory_map(512);
        let bp = build(
            hdr,
            &ZeroPageParams {
                cmdline_addr: 0x2_0000,
                cmdline_len: 42,
                initramfs: Some((0x1fe0_0000, 0x1_2345)),
                memory_map: &map,
            },
        )
        .unwrap();
        let b = bp.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x1e8], 2, "e820_entries");
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "header");
        assert_eq!(u16_at(b, 0x206), 0x020f, "version kept from the image");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(
            b[0x211], 0x81,
            "loadflags: LOADED_HIGH kept, CAN_USE_HEAP set"
        );
        assert_eq!(u32_at(b, 0x218), 0x1fe0_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x1_2345, "ramdisk_size");
        assert_eq!(u16_at(b, 0x224), 0xfe00, "heap_end_ptr");
        assert_eq!(u32_at(b, 0x228), 0x2_0000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x230), 0x20_0000, "kernel_alignment");
        assert_eq!(u32_at(b, 0x238), 42, "cmdline_size");
        // e820 entries: 20 bytes each from 0x2d0.
        assert_eq!(
            (u64_at(b, 0x2d0), u64_at(b, 0x2d8), u32_at(b, 0x2e0)),
            (0, 0x9_fc00, 1)
        );
        assert_eq!(
            (u64_at(b, 0x2e4), u64_at(b, 0x2ec), u32_at(b, 0x2f4)),
            (0x10_0000, 511 << 20, 1)
        );
        assert_eq!(u64_at(b, 0x2f8), 0, "no third entry");
    }

    #[test]
    fn no_initramfs_leaves_ramdisk_fields_zero() {
        let map = memory_map(64);
        let bp = build(
            setup_header::default(),
            &ZeroPageParams {
                cmdline_addr: 0x2_0000,
                cmdline_len: 1,
                initramfs: None,
                memory_map: &map,
            },
        )
        .unwrap();
        assert_eq!(u32_at(bp.as_slice(), 0x218), 0);
        assert_eq!(u32_at(bp.as_slice(), 0x21c), 0);
    }

    #[test]
    fn addresses_above_4g_are_refused() {
        let err = build(
            setup_header::default(),
            &ZeroPageParams {
                cmdline_addr: 1 << 32,
                cmdline_len: 1,
                initramfs: None,
                memory_map: &[],
            },
        );
        assert!(matches!(err, Err(ZeroPageError::AddressAbove4G { .. })));
    }
}
