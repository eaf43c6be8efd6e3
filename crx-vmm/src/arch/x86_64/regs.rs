//! Initial vCPU state for the two boot protocols, computed as plain values (the vCPU
//! module applies them): general registers, segment/control registers, the identity
//! page tables the bzImage 64-bit entry needs, boot MSRs, FPU, and LAPIC LINT0/LINT1.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};

use super::gdt::{segment, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info` address.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// EFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// General-purpose registers at the entry point.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        BootEntry::Linux64 { entry, zero_page } => kvm_regs {
            rip: entry,
            rsi: zero_page,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// Segment and control registers at the entry point, starting from the vCPU's
/// current `sregs` (which carry KVM's APIC base and other state we keep).
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (super::gdt::BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cs = segment(CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cs = segment(CODE64_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// Identity map of the first 1 GiB with 2 MiB pages: (guest address, bytes) to write.
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let pml4 = (PDPTE_ADDR | PRESENT_RW).to_le_bytes().to_vec();
    let pdpte = (PDE_ADDR | PRESENT_RW).to_le_bytes().to_vec();
    let pde = (0..512u64)
        .flat_map(|i| ((i << 21) | PAGE_SIZE_2M | PRESENT_RW).to_le_bytes())
        .collect();
    vec![(PML4_ADDR, pml4), (PDPTE_ADDR, pdpte), (PDE_ADDR, pde)]
}

mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// MSRs a firmware would have set: syscall MSRs cleared, fast strings on, MTRRs
/// enabled with write-back as the default type (else the guest maps RAM uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WB: u64 = 6;
    [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (msr::MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// x87 and SSE control words as after FNINIT, with all SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers the PIC's ExtINT, LINT1 the NMI, as the MP table says.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode_without_paging() {
        let e = BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        let r = boot_regs(e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, 0x6000, 2));
        let s = boot_sregs(kvm_sregs::default(), e);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.limit),
            (0x08, 1, 0, 0xffff_ffff)
        );
        assert_eq!(s.ss.selector, 0x18);
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 39));
    }

    #[test]
    fn linux64_entry_is_long_mode_with_identity_tables() {
        let e = BootEntry::Linux64 {
            entry: 0x100_0200,
            zero_page: 0x7000,
        };
        let r = boot_regs(e);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x100_0200, 0x7000, 0x8ff0));
        let s = boot_sregs(kvm_sregs::default(), e);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l), (0x10, 1));
        let tables = identity_page_tables();
        assert_eq!(tables[0], (0x9000, 0xa003u64.to_le_bytes().to_vec()));
        assert_eq!(tables[1], (0xa000, 0xb003u64.to_le_bytes().to_vec()));
        let pde = &tables[2].1;
        assert_eq!(pde.len(), 4096);
        assert_eq!(&pde[8..16], &0x20_0083u64.to_le_bytes());
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        configure_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x400);
        let msrs = boot_msrs();
        assert!(msrs.iter().any(|m| m.index == 0x2ff && m.data == 0x806));
    }
}
