//! One vCPU: its initial state (CPUID, MSRs, FPU, LAPIC, boot registers) and the run
//! loop that turns KVM exits into bus accesses or the end of the VM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};

use kvm_bindings::Msrs;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kvm::{KvmError, KvmHandle};
use super::stats::{Stat, StatsError};
use super::vm::Vm;
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{cpuid, gdt, layout};
use crate::clock;
use crate::devices::bus::Bus;
use crate::exit::VmEnd;

/// Which vCPU setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU failed for vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot get KVM's supported CPUID")]
    SupportedCpuid(#[source] KvmError),
    #[error("KVM rejected the CPUID for vCPU {index}")]
    SetCpuid {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set the boot MSRs of vCPU {index}")]
    SetMsrs {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {index}")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {index}: KVM rejected register state ({what})")]
    Registers {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the boot GDT and page tables into guest memory")]
    BootTables(#[source] vm_memory::GuestMemoryError),
}

/// A created vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// What a running vCPU needs from the rest of the VMM.
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    /// Where the vCPU reports an exit that ends the VM.
    pub events: Sender<VmEnd>,
    /// Set when the VM is being torn down; the vCPU leaves its loop at the next exit
    /// (a kick signal forces one).
    pub stop: Arc<AtomicBool>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only effect is that a
/// blocked KVM_RUN returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Unhandled port/MMIO accesses are common (the kernel probes legacy hardware);
/// log only the first few so a guest cannot flood the log.
fn note_unhandled(kind: &str, addr: u64, len: usize) {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    const LOGGED: u64 = 16;
    let n = SEEN.fetch_add(1, Ordering::Relaxed);
    if n < LOGGED {
        tracing::debug!(
            kind,
            addr = format_args!("{addr:#x}"),
            len,
            "access to no device"
        );
    } else if n == LOGGED {
        tracing::debug!("further accesses to no device are not logged");
    }
}

enum Step {
    Continue,
    End(VmEnd),
    InternalError,
    Interrupted,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { index, fd })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// The raw vCPU, for callers that set up state of their own (test guests).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Opens this vCPU's "exits" counter.
    pub fn exit_stat(&self) -> Result<Stat, StatsError> {
        Stat::open(&self.fd, "exits")
    }

    /// Sets CPUID, MSRs, FPU and LAPIC LINT pins; on the boot vCPU (`entry` given)
    /// also the registers for the boot protocol. Other vCPUs wait for the guest's
    /// INIT/SIPI in the in-kernel LAPIC.
    pub fn configure(
        &self,
        kvm: &KvmHandle,
        cpu_count: u8,
        entry: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let reg_err = |what| {
            move |source| VcpuError::Registers {
                index,
                what,
                source,
            }
        };

        let mut cpuid_entries = kvm.supported_cpuid().map_err(VcpuError::SupportedCpuid)?;
        cpuid::filter(
            cpuid_entries.as_mut_slice(),
            cpuid::CpuidParams {
                apic_id: index,
                cpu_count,
                tsc_deadline: kvm.has_tsc_deadline(),
            },
        );
        self.fd
            .set_cpuid2(&cpuid_entries)
            .map_err(|source| VcpuError::SetCpuid { index, source })?;

        let wanted = regs::boot_msrs();
        let msrs = Msrs::from_entries(&wanted).map_err(|_| VcpuError::PartialMsrs {
            index,
            set: 0,
            wanted: wanted.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|source| VcpuError::SetMsrs { index, source })?;
        if set != wanted.len() {
            return Err(VcpuError::PartialMsrs {
                index,
                set,
                wanted: wanted.len(),
            });
        }

        self.fd.set_fpu(&regs::boot_fpu()).map_err(reg_err("FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(reg_err("get LAPIC"))?;
        regs::configure_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(reg_err("set LAPIC"))?;

        if let Some(entry) = entry {
            let sregs = self.fd.get_sregs().map_err(reg_err("get sregs"))?;
            self.fd
                .set_sregs(&regs::boot_sregs(sregs, entry))
                .map_err(reg_err("sregs"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(reg_err("regs"))?;
        }
        Ok(())
    }

    /// Runs the guest until the VM ends or `ctx.stop` is set. The end reason, if this
    /// vCPU saw it, goes to `ctx.events`.
    pub fn run(mut self, ctx: VcpuContext) {
        if self.index == 0 {
            tracing::info!(
                first_insn_us = clock::micros_since_start(),
                "first guest instruction"
            );
        }
        loop {
            if ctx.stop.load(Ordering::SeqCst) {
                return;
            }
            let step = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, exit, &ctx),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Step::Interrupted
                }
                Err(e) => Step::End(VmEnd::RunFailed {
                    vcpu: self.index,
                    error: e.to_string(),
                }),
            };
            match step {
                Step::Continue | Step::Interrupted => {}
                Step::InternalError => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
                    // kvm_run exit union is the one KVM filled in.
                    let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let suberror = internal.suberror;
                    let ndata = (internal.ndata as usize).min(internal.data.len());
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    tracing::error!(
                        vcpu = self.index,
                        suberror,
                        rip = format_args!("{rip:#x}"),
                        data = ?&internal.data[..ndata],
                        "KVM internal error"
                    );
                    let _ = ctx.events.send(VmEnd::InternalError {
                        vcpu: self.index,
                        suberror,
                    });
                    return;
                }
                Step::End(end) => {
                    if let VmEnd::Shutdown { .. } = end {
                        self.log_fault_state();
                    }
                    let _ = ctx.events.send(end);
                    return;
                }
            }
        }
    }

    /// Logs where the guest was at KVM_EXIT_SHUTDOWN (a triple fault, unless the guest
    /// announced its shutdown first): without a console, the instruction pointer and the
    /// paging/interrupt state are all there is to go on.
    fn log_fault_state(&self) {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => tracing::warn!(
                vcpu = self.index,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                cr0 = format_args!("{:#x}", s.cr0),
                cr2 = format_args!("{:#x}", s.cr2),
                cr3 = format_args!("{:#x}", s.cr3),
                cr4 = format_args!("{:#x}", s.cr4),
                efer = format_args!("{:#x}", s.efer),
                idt = format_args!("{:#x}/{:#x}", s.idt.base, s.idt.limit),
                cs = format_args!("{:#x}", s.cs.selector),
                "guest state at KVM_EXIT_SHUTDOWN"
            ),
            (r, s) => tracing::warn!(
                vcpu = self.index,
                regs = ?r.err(),
                sregs = ?s.err(),
                "could not read the guest state at KVM_EXIT_SHUTDOWN"
            ),
        }
    }
}

/// Turns one KVM exit into a bus access or the end of the VM.
fn handle_exit(vcpu: u8, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                note_unhandled("pio read", u64::from(port), data.len());
            }
            Step::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                note_unhandled("pio write", u64::from(port), data.len());
            }
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
                note_unhandled("mmio read", addr, data.len());
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                note_unhandled("mmio write", addr, data.len());
            }
            Step::Continue
        }
        VcpuExit::Shutdown => Step::End(VmEnd::Shutdown { vcpu }),
        VcpuExit::SystemEvent(kind, _) => Step::End(VmEnd::SystemEvent { vcpu, kind }),
        VcpuExit::Hlt => Step::End(VmEnd::Halt { vcpu }),
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, _) => Step::End(VmEnd::FailEntry { vcpu, reason }),
        VcpuExit::Intr => Step::Interrupted,
        VcpuExit::IrqWindowOpen => Step::Continue,
        other => Step::End(VmEnd::UnexpectedExit {
            vcpu,
            exit: format!("{other:?}"),
        }),
    }
}

/// Writes the boot GDT, an empty IDT and (for the 64-bit entry) the identity page
/// tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), VcpuError> {
    mem.write_slice(&gdt::gdt_bytes(), GuestAddress(layout::GDT_ADDR))
        .map_err(VcpuError::BootTables)?;
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(VcpuError::BootTables)?;
    if let BootEntry::Linux64 { .. } = entry {
        for (addr, bytes) in regs::identity_page_tables() {
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(VcpuError::BootTables)?;
        }
    }
    Ok(())
}
