//! Boot GDT: the segment descriptors both boot protocols expect, and the matching
//! `kvm_segment` values (KVM loads the hidden segment state from these, the guest
//! sees the same descriptors in memory if it reloads a selector).

use kvm_bindings::kvm_segment;

/// Selector of the 32-bit flat code segment (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment; Linux's `__BOOT_CS`.
pub const CODE64_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment; Linux's `__BOOT_DS`.
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the task state segment (VT-x refuses to enter without a usable TR).
pub const TSS_SELECTOR: u16 = 0x20;

/// Builds a descriptor from its access/flags word (`0xF0FF` layout: flags in the top
/// nibble, access byte in the low byte), base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT, indexed by selector / 8.
pub const BOOT_GDT: [u64; 5] = [
    0,
    descriptor(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB, granularity 4 KiB
    descriptor(0xa09b, 0, 0xfffff), // 64-bit code
    descriptor(0xc093, 0, 0xfffff), // data, 4 GiB
    descriptor(0x008b, 0, 0x67),    // busy 32-bit TSS
];

/// The hidden segment state KVM needs for the descriptor at `selector`.
pub fn segment(selector: u16) -> kvm_segment {
    let entry = BOOT_GDT[usize::from(selector >> 3) % BOOT_GDT.len()];
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// The GDT as the bytes written to guest memory.
pub fn gdt_bytes() -> Vec<u8> {
    BOOT_GDT.iter().flat_map(|d| d.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_encodings() {
        assert_eq!(BOOT_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[4], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode_flat_code_and_data() {
        let cs32 = segment(CODE32_SELECTOR);
        assert_eq!(
            (cs32.base, cs32.limit, cs32.type_, cs32.db, cs32.l, cs32.g),
            (0, 0xffff_ffff, 0xb, 1, 0, 1)
        );
        let cs64 = segment(CODE64_SELECTOR);
        assert_eq!((cs64.l, cs64.db, cs64.present, cs64.s), (1, 0, 1, 1));
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.type_, ds.limit, ds.unusable), (3, 0xffff_ffff, 0));
        let tr = segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.limit, tr.s, tr.g), (0xb, 0x67, 0, 0));
        assert_eq!(gdt_bytes().len(), 40);
    }
}
