//! CPUID for each vCPU: KVM's supported set (already limited to what the host and KVM
//! can run), with the topology made to match the VM (APIC id per vCPU, CPU count),
//! the hypervisor bit set, and features a micro-VM must not advertise removed
//! (thermal and power management, MONITOR/MWAIT, debug stores, VMX/SMX, the PMU).

use kvm_bindings::kvm_cpuid_entry2;

/// What varies per vCPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuidParams {
    pub apic_id: u8,
    pub cpu_count: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC supports TSC-deadline mode.
    pub tsc_deadline: bool,
}

mod leaf1 {
    pub const ECX_DTES64: u32 = 1 << 2;
    pub const ECX_MONITOR: u32 = 1 << 3;
    pub const ECX_DS_CPL: u32 = 1 << 4;
    pub const ECX_VMX: u32 = 1 << 5;
    pub const ECX_SMX: u32 = 1 << 6;
    pub const ECX_EST: u32 = 1 << 7;
    pub const ECX_TM2: u32 = 1 << 8;
    pub const ECX_CNXT_ID: u32 = 1 << 10;
    pub const ECX_SDBG: u32 = 1 << 11;
    pub const ECX_XTPR: u32 = 1 << 14;
    pub const ECX_PDCM: u32 = 1 << 15;
    pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const ECX_HYPERVISOR: u32 = 1 << 31;
    pub const EDX_DS: u32 = 1 << 21;
    pub const EDX_ACPI: u32 = 1 << 22;
    pub const EDX_HTT: u32 = 1 << 28;
    pub const EDX_TM: u32 = 1 << 29;
    pub const EDX_PBE: u32 = 1 << 31;

    pub const ECX_HIDDEN: u32 = ECX_DTES64
        | ECX_MONITOR
        | ECX_DS_CPL
        | ECX_VMX
        | ECX_SMX
        | ECX_EST
        | ECX_TM2
        | ECX_CNXT_ID
        | ECX_SDBG
        | ECX_XTPR
        | ECX_PDCM;
    pub const EDX_HIDDEN: u32 = EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE;
}

/// Leaf 0xb / 0x1f level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` items (x2APIC id shift of a topology level).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` (KVM's supported CPUID) for one vCPU.
pub fn filter(entries: &mut [kvm_cpuid_entry2], p: CpuidParams) {
    let cpus = u32::from(p.cpu_count.max(1));
    let apic_id = u32::from(p.apic_id);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
                e.ecx &= !leaf1::ECX_HIDDEN;
                e.ecx |= leaf1::ECX_HYPERVISOR;
                if p.tsc_deadline {
                    e.ecx |= leaf1::ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !leaf1::ECX_TSC_DEADLINE;
                }
                e.edx &= !leaf1::EDX_HIDDEN;
                if cpus > 1 {
                    e.edx |= leaf1::EDX_HTT;
                } else {
                    e.edx &= !leaf1::EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: one core per vCPU, L3 shared by all.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((cpus - 1) & 0x3f) << 26);
            }
            0x6 | 0xa => {
                // Thermal/power management and the PMU describe host hardware.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // One thread per core, all cores in one package.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_SMT << 8;
                    }
                    1 => {
                        e.eax = id_bits(p.cpu_count);
                        e.ebx = cpus;
                        e.ecx = (LEVEL_CORE << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores in the package, minus one.
                e.ecx = (e.ecx & !0xff) | ((cpus - 1) & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC id, one core per compute unit, node 0.
                e.eax = apic_id;
                e.ebx = 0;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_gets_apic_id_count_hypervisor_and_loses_host_only_features() {
        // A host-like leaf 1: MONITOR, VMX, PDCM, TM, PBE, ACPI set; CLFLUSH size 8.
        let mut e = [entry(
            1,
            0,
            [0x806f0, 0xff00_0800, 0x7ffa_b22b, 0xf7fb_ffff],
        )];
        filter(
            &mut e,
            CpuidParams {
                apic_id: 3,
                cpu_count: 4,
                tsc_deadline: true,
            },
        );
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_eq!(e[0].ecx & (1 << 31), 1 << 31, "hypervisor");
        assert_eq!(e[0].ecx & (1 << 24), 1 << 24, "tsc deadline");
        assert_eq!(
            e[0].ecx & ((1 << 3) | (1 << 5) | (1 << 15)),
            0,
            "monitor, vmx, pdcm hidden"
        );
        assert_eq!(
            e[0].edx & ((1 << 22) | (1 << 29) | (1 << 31)),
            0,
            "acpi, tm, pbe hidden"
        );
        assert_eq!(e[0].edx & (1 << 28), 1 << 28, "htt with several CPUs");
        assert_eq!(e[0].eax, 0x806f0, "signature untouched");

        let mut single = [entry(1, 0, [0, 0, 1 << 24, 1 << 28])];
        filter(
            &mut single,
            CpuidParams {
                apic_id: 0,
                cpu_count: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(single[0].edx & (1 << 28), 0);
        assert_eq!(single[0].ecx, 1 << 31);
        assert_eq!(single[0].ebx >> 16, 0x0001);
    }

    #[test]
    fn topology_leaves_describe_n_single_thread_cores() {
        let mut e = [
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0xb, 1, [4, 16, 0x201, 9]),
            entry(0xb, 2, [0, 0, 2, 9]),
            entry(4, 0, [0x1c00_4121, 0, 0, 0]), // L1d
            entry(4, 3, [0x1c03_c163, 0, 0, 0]), // L3
        ];
        filter(
            &mut e,
            CpuidParams {
                apic_id: 2,
                cpu_count: 3,
                tsc_deadline: false,
            },
        );
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 1, 0x100, 2));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (2, 3, 0x201, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 0, 2, 2));
        assert_eq!(e[3].eax, 0x0800_0121, "L1: 3 cores, not shared");
        assert_eq!(e[4].eax, 0x0800_8163, "L3: shared by the 3 cores");
    }

    #[test]
    fn power_management_and_pmu_are_hidden_other_leaves_kept() {
        let mut e = [
            entry(6, 0, [0x77, 2, 9, 0]),
            entry(0xa, 0, [0x0804_3004, 0, 0, 0]),
            entry(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
        ];
        filter(
            &mut e,
            CpuidParams {
                apic_id: 0,
                cpu_count: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx), (0, 0, 0));
        assert_eq!(e[1].eax, 0);
        assert_eq!(e[2].eax, 0x0100_7afb, "KVM paravirt features pass through");
    }
}
