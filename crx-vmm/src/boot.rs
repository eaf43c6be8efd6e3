//! Puts the guest's boot material into guest memory: the kernel (ELF `vmlinux` through
//! its PVH entry, or a bzImage through the 64-bit boot protocol), the initramfs at
//! the top of low RAM, the command line, the MP table, and the PVH start info or the
//! zero page. Returns where the boot vCPU starts.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::arch::x86_64::layout::{
    self, CMDLINE_ADDR, EBDA_START, HIMEM_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::pvh;
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::zero_page::{self, ZeroPageError, ZeroPageParams};
use crate::config::KernelFormat;
use crate::kernel_map;

/// The 64-bit entry of a bzImage's protected-mode kernel is 0x200 past its start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Which boot step failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {}", .path.display())]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {} (is it an x86_64 vmlinux or bzImage that fits in guest memory?)", .path.display())]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot map the kernel into guest memory")]
    MapKernel(#[source] crate::kernel_map::KernelMapError),
    #[error("kernel {} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y, or pass its bzImage", .0.display())]
    NoPvhEntry(PathBuf),
    #[error("cannot open initramfs {}", .path.display())]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {} ({size} bytes) does not fit between the kernel (ending at {kernel_end:#x}) and the end of low RAM at {ram_end:#x}: raise --memory-mib or shrink the initramfs", .path.display())]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("cannot copy initramfs {} into guest memory", .path.display())]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the kernel command line")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("cannot build the MP table")]
    MpTable(#[source] MpTableError),
    #[error("cannot build the zero page")]
    ZeroPage(#[source] ZeroPageError),
    #[error("cannot write boot structures into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What to boot.
pub struct BootParams<'a> {
    pub kernel: &'a Path,
    pub format: KernelFormat,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a Cmdline,
    pub memory_mib: u64,
    pub vcpus: u8,
}

/// Where the initramfs goes: page-aligned, as high as low RAM (and the kernel's
/// `initrd_addr_max`) allows, above the kernel.
pub fn place_initramfs(
    size: u64,
    kernel_end: u64,
    ram_end: u64,
    addr_max: Option<u64>,
) -> Option<u64> {
    let limit = addr_max.map_or(ram_end, |max| ram_end.min(max.saturating_add(1)));
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end = kernel_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Loads everything and returns the boot vCPU's entry.
pub fn load(mem: &GuestMemoryMmap, p: &BootParams<'_>) -> Result<BootEntry, BootError> {
    let mut kernel = File::open(p.kernel).map_err(|source| BootError::OpenKernel {
        path: p.kernel.to_owned(),
        source,
    })?;
    let load_err = |source| BootError::LoadKernel {
        path: p.kernel.to_owned(),
        source,
    };
    let (loaded, setup) = match p.format {
        KernelFormat::Elf => {
            match kernel_map::map_elf(mem, &kernel, HIMEM_START).map_err(BootError::MapKernel)? {
                Some(mapped) => (
                    Loaded {
                        kernel_load: HIMEM_START,
                        kernel_end: mapped.kernel_end,
                        pvh_entry: mapped.pvh_entry,
                    },
                    None,
                ),
                None => {
                    let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                        .map_err(load_err)?;
                    (Loaded::from(&r), None)
                }
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            (Loaded::from(&r), r.setup_header)
        }
    };

    let ram_end = layout::low_ram_end(p.memory_mib);
    let initramfs = match p.initramfs {
        Some(path) => Some(load_initramfs(
            mem,
            path,
            loaded.kernel_end,
            ram_end,
            setup.as_ref(),
        )?),
        None => None,
    };

    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), p.cmdline)
        .map_err(BootError::Cmdline)?;
    let mp = mptable::build(EBDA_START, p.vcpus).map_err(BootError::MpTable)?;
    mem.write_slice(&mp, GuestAddress(EBDA_START))
        .map_err(BootError::Write)?;
    let memory_map = layout::memory_map(p.memory_mib);

    match (p.format, loaded.pvh_entry, setup) {
        (KernelFormat::Elf, Some(entry), _) => {
            let module = initramfs.map(|(addr, size)| pvh::Module { addr, size });
            let info = pvh::build(PVH_INFO_ADDR, CMDLINE_ADDR, module, &memory_map);
            mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))
                .map_err(BootError::Write)?;
            Ok(BootEntry::Pvh {
                entry,
                start_info: PVH_INFO_ADDR,
            })
        }
        (KernelFormat::Elf, _, _) => Err(BootError::NoPvhEntry(p.kernel.to_owned())),
        (KernelFormat::BzImage, _, hdr) => {
            let cmdline_len = p
                .cmdline
                .as_cstring()
                .map(|c| c.as_bytes().len())
                .unwrap_or(0);
            let bp = zero_page::build(
                hdr.unwrap_or_default(),
                &ZeroPageParams {
                    cmdline_addr: CMDLINE_ADDR,
                    cmdline_len,
                    initramfs,
                    memory_map: &memory_map,
                },
            )
            .map_err(BootError::ZeroPage)?;
            mem.write_obj(bp, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(BootError::Write)?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load + BZIMAGE_64BIT_ENTRY_OFFSET,
                zero_page: ZERO_PAGE_ADDR,
            })
        }
    }
}

/// Where the kernel went, however it was loaded.
struct Loaded {
    kernel_load: u64,
    kernel_end: u64,
    pvh_entry: Option<u64>,
}

impl From<&linux_loader::loader::KernelLoaderResult> for Loaded {
    fn from(r: &linux_loader::loader::KernelLoaderResult) -> Self {
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Some(entry.0),
            _ => None,
        };
        Loaded {
            kernel_load: r.kernel_load.0,
            kernel_end: r.kernel_end,
            pvh_entry,
        }
    }
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    ram_end: u64,
    setup: Option<&setup_header>,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitramfs {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitramfs {
            path: path.to_owned(),
            source,
        })?
        .len();
    let addr_max = setup
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0);
    let addr = place_initramfs(size, kernel_end, ram_end, addr_max).ok_or_else(|| {
        BootError::InitramfsTooBig {
            path: path.to_owned(),
            size,
            kernel_end,
            ram_end,
        }
    })?;
    // Mapped like the kernel (the guest frees it after unpacking, so most pages are
    // read once and never copied); copied if the mapping is refused.
    let mapped =
        kernel_map::map_file_range(mem, addr, &file, 0, size.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    if let Err(e) = mapped {
        tracing::debug!(error = %e, "initramfs not mapped; copying it");
        read_into(mem, GuestAddress(addr), &mut file, size as usize).map_err(|source| {
            BootError::ReadInitramfs {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    Ok((addr, size))
}

fn read_into<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    len: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.read_exact_volatile_from(addr, src, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_goes_high_page_aligned_and_above_the_kernel() {
        let mib = 1u64 << 20;
        assert_eq!(
            place_initramfs(0x1234, 0x200_0000, 128 * mib, None),
            Some(128 * mib - 0x2000)
        );
        assert_eq!(
            place_initramfs(mib, 0x200_0000, 4096 * mib, Some(0x7fff_ffff)),
            Some(0x8000_0000 - mib)
        );
        assert_eq!(
            place_initramfs(90 * mib, 0x200_0000, 128 * mib, None),
            Some(38 * mib)
        );
        assert_eq!(
            place_initramfs(100 * mib, 0x200_0000, 128 * mib, None),
            None,
            "would overlap the kernel"
        );
        assert_eq!(
            place_initramfs(127 * mib, 0x200_0000, 128 * mib, None),
            None
        );
        assert_eq!(place_initramfs(u64::MAX, 0, 128 * mib, None), None);
    }
}
