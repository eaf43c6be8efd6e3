//! PVH boot: the `hvm_start_info` block a PVH kernel finds through EBX, with its module
//! list (the initramfs) and memory map laid out right after it.
//!
//! Layout from Xen's `public/arch-x86/hvm/start_info.h` (version 1, which adds the
//! memory map); fields are little-endian, written byte by byte.

use super::layout::MemoryMapEntry;

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1: the memmap fields are valid.
const START_INFO_VERSION: u32 = 1;
/// Size of `hvm_start_info` (version 1).
pub const START_INFO_SIZE: usize = 56;
/// Size of `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: usize = 32;
/// Size of `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;

/// A blob handed to the kernel (the initramfs is the only one crx uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub addr: u64,
    pub size: u64,
}

/// The start info, module list and memory map, as bytes to write at `base`.
pub fn build(
    base: u64,
    cmdline_addr: u64,
    module: Option<Module>,
    memmap: &[MemoryMapEntry],
) -> Vec<u8> {
    let nr_modules = u32::from(module.is_some());
    let modlist_addr = base + START_INFO_SIZE as u64;
    let memmap_addr = modlist_addr + u64::from(nr_modules) * MODLIST_ENTRY_SIZE as u64;

    let mut out =
        Vec::with_capacity(START_INFO_SIZE + MODLIST_ENTRY_SIZE + memmap.len() * MEMMAP_ENTRY_SIZE);
    out.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    out.extend_from_slice(&START_INFO_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&nr_modules.to_le_bytes());
    out.extend_from_slice(&(if nr_modules > 0 { modlist_addr } else { 0 }).to_le_bytes());
    out.extend_from_slice(&cmdline_addr.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    out.extend_from_slice(&memmap_addr.to_le_bytes());
    out.extend_from_slice(&(memmap.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    if let Some(m) = module {
        out.extend_from_slice(&m.addr.to_le_bytes());
        out.extend_from_slice(&m.size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // module command line
        out.extend_from_slice(&0u64.to_le_bytes());
    }
    for e in memmap {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.kind as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::layout::{memory_map, MemoryKind};
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_with_initramfs_module_and_memmap() {
        let map = memory_map(256);
        let module = Module {
            addr: 0x0fe0_0000,
            size: 0x12_3456,
        };
        let b = build(0x6000, 0x2_0000, Some(module), &map);
        assert_eq!(b.len(), 56 + 32 + 2 * 24);
        assert_eq!(u32_at(&b, 0), 0x336e_c578);
        assert_eq!(u32_at(&b, 4), 1, "version");
        assert_eq!(u32_at(&b, 8), 0, "flags");
        assert_eq!(u32_at(&b, 12), 1, "nr_modules");
        assert_eq!(u64_at(&b, 16), 0x6038, "modlist_paddr");
        assert_eq!(u64_at(&b, 24), 0x2_0000, "cmdline_paddr");
        assert_eq!(u64_at(&b, 32), 0, "rsdp_paddr");
        assert_eq!(u64_at(&b, 40), 0x6058, "memmap_paddr");
        assert_eq!(u32_at(&b, 48), 2, "memmap_entries");
        assert_eq!(u64_at(&b, 56), 0x0fe0_0000);
        assert_eq!(u64_at(&b, 64), 0x12_3456);
        assert_eq!(u64_at(&b, 72), 0);
        let e0 = &b[88..112];
        assert_eq!(
            (u64_at(e0, 0), u64_at(e0, 8), u32_at(e0, 16)),
            (0, 0x9_fc00, 1)
        );
        let e1 = &b[112..136];
        assert_eq!(
            (u64_at(e1, 0), u64_at(e1, 8), u32_at(e1, 16)),
            (0x10_0000, 255 << 20, 1)
        );
    }

    #[test]
    fn without_initramfs_the_memmap_follows_the_start_info() {
        let map = [MemoryMapEntry {
            addr: 0,
            size: 0x1000,
            kind: MemoryKind::Reserved,
        }];
        let b = build(0x6000, 0x2_0000, None, &map);
        assert_eq!(b.len(), 56 + 24);
        assert_eq!(u32_at(&b, 12), 0);
        assert_eq!(u64_at(&b, 16), 0);
        assert_eq!(u64_at(&b, 40), 0x6038);
        assert_eq!(u32_at(&b, 56 + 16), 2);
    }
}
