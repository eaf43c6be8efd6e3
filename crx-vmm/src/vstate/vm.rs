//! The KVM VM: in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, the TSS and identity
//! map pages, guest memory slots, irqfds and ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmHandle;
use crate::arch::x86_64::layout;

/// Which VM setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    TssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    IdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD failed for IRQ {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD failed at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A VM with its interrupt controllers and memory in place.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and gives it `mem`. The TSS and irqchip must exist before any
    /// vCPU is created, which is why they are set up here.
    pub fn new(kvm: &KvmHandle, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.kvm().create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        // The PIT serves Linux's timer calibration; its speaker port needs no model.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let entry = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`,
            // which the caller keeps alive as long as the VM (the builder stores both).
            unsafe { fd.set_user_memory_region(entry) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(Self { fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Routes writes to `evt` into IRQ line `gsi` of the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `datamatch` to MMIO `addr` signal `evt` inside
    /// KVM, without an exit to user space.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }
}
