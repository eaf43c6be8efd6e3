//! Puts the guest kernel's loadable segments and the initramfs into guest RAM by mapping
//! their files copy-on-write (`MAP_PRIVATE | MAP_FIXED` over the guest-RAM range) instead
//! of copying them.
//!
//! Why: copying ~10 MiB of kernel faults in every destination page before the first
//! guest instruction; that copy was most of crx-vmm's setup time. Mapped, the guest
//! faults in only the pages it touches, straight from the host page cache, and every pod
//! booting the same kernel shares those pages until its guest writes one.
//!
//! The files must not change in place while a VM runs (the kernel cache publishes new
//! builds by rename, never by rewriting a file). A layout the mapping cannot express
//! (segments whose file offset and address disagree within a page, pages shared by two
//! segments) returns `None`, and the caller copies as before.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const PAGE: u64 = 4096;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// More program headers than any vmlinux has; bounds what we read from the file.
const MAX_PHDRS: u16 = 64;

/// Why mapping failed after it had started (guest RAM may be half-written: the caller
/// must not boot).
#[derive(Debug, thiserror::Error)]
pub enum KernelMapError {
    #[error("cannot read the kernel's ELF headers")]
    Read(#[source] std::io::Error),
    #[error("cannot map {len:#x} bytes of the file at guest address {addr:#x}")]
    Map {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot clear the end of a mapped segment")]
    Clear(#[source] vm_memory::GuestMemoryError),
}

/// A kernel placed by mapping.
#[derive(Debug, PartialEq, Eq)]
pub struct MappedElf {
    /// First byte after the highest segment (memsz included).
    pub kernel_end: u64,
    /// The PVH entry, if the kernel has the note.
    pub pvh_entry: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Maps an x86_64 ELF kernel's PT_LOAD segments into `mem`. `Ok(None)`: not mappable
/// (not ELF64 x86_64, or a layout mapping cannot express); nothing was changed.
pub fn map_elf(
    mem: &GuestMemoryMmap,
    file: &File,
    min_addr: u64,
) -> Result<Option<MappedElf>, KernelMapError> {
    let file_len = file.metadata().map_err(KernelMapError::Read)?.len();
    let mut ehdr = [0u8; 64];
    read_at(file, 0, &mut ehdr)?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || u16le(&ehdr, 18) != 62 {
        return Ok(None);
    }
    let phoff = u64le(&ehdr, 32);
    let phentsize = u16le(&ehdr, 54);
    let phnum = u16le(&ehdr, 56);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Ok(None);
    }
    let mut phdrs = vec![0u8; usize::from(phnum) * 56];
    read_at(file, phoff, &mut phdrs)?;

    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for ph in phdrs.chunks_exact(56) {
        let (p_type, offset, paddr, filesz, memsz) = (
            u32le(ph, 0),
            u64le(ph, 8),
            u64le(ph, 24),
            u64le(ph, 32),
            u64le(ph, 40),
        );
        match p_type {
            PT_LOAD if memsz > 0 => segments.push(Segment {
                offset,
                paddr,
                filesz,
                memsz,
            }),
            PT_NOTE
                if filesz <= 64 * 1024
                    && offset.checked_add(filesz).is_some_and(|e| e <= file_len) =>
            {
                let mut notes = vec![0u8; filesz as usize];
                read_at(file, offset, &mut notes)?;
                pvh_entry = pvh_entry.or_else(|| find_pvh_entry(&notes));
            }
            _ => {}
        }
    }
    if !mappable(&segments, file_len, min_addr, mem) {
        return Ok(None);
    }
    for s in &segments {
        if s.filesz == 0 {
            continue;
        }
        let head = s.paddr % PAGE;
        let len = round_up(head + s.filesz);
        map_file_range(mem, s.paddr - head, file, s.offset - head, len)?;
        // The rest of the last mapped page holds whatever follows the segment in the
        // file; the guest must see zeros there (it is bss or padding).
        let tail_start = s.paddr + s.filesz;
        let tail_len = round_up(tail_start) - tail_start;
        if tail_len > 0 {
            mem.write_slice(&vec![0u8; tail_len as usize], GuestAddress(tail_start))
                .map_err(KernelMapError::Clear)?;
        }
    }
    let kernel_end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(min_addr);
    Ok(Some(MappedElf {
        kernel_end,
        pvh_entry,
    }))
}

/// Every segment inside one guest-RAM region, above `min_addr`, within the file, with
/// offset and address agreeing within a page, and no page shared by two segments.
fn mappable(segments: &[Segment], file_len: u64, min_addr: u64, mem: &GuestMemoryMmap) -> bool {
    let mut pages: Vec<(u64, u64)> = Vec::new();
    for s in segments {
        let Some(mem_end) = s.paddr.checked_add(s.memsz) else {
            return false;
        };
        let file_ok = s
            .offset
            .checked_add(s.filesz)
            .is_some_and(|e| e <= file_len);
        if !file_ok || s.filesz > s.memsz || s.paddr < min_addr || s.paddr % PAGE != s.offset % PAGE
        {
            return false;
        }
        if mem
            .get_slice(GuestAddress(s.paddr), s.memsz as usize)
            .is_err()
        {
            return false;
        }
        pages.push((s.paddr / PAGE, mem_end.div_ceil(PAGE)));
    }
    pages.sort_unstable();
    pages.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// Maps `len` bytes of `file` at `file_offset` (both page-aligned) over guest RAM at
/// `addr`, copy-on-write.
pub fn map_file_range(
    mem: &GuestMemoryMmap,
    addr: u64,
    file: &File,
    file_offset: u64,
    len: u64,
) -> Result<(), KernelMapError> {
    let map_err = |source| KernelMapError::Map { addr, len, source };
    if addr % PAGE != 0 || file_offset % PAGE != 0 {
        return Err(map_err(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    }
    let len_usize = usize::try_from(len)
        .map_err(|_| map_err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // The whole range must lie in one region so that it is one contiguous host range.
    let host = mem
        .get_slice(GuestAddress(addr), len_usize)
        .map_err(|e| map_err(std::io::Error::other(e)))?
        .ptr_guard_mut()
        .as_ptr();
    let offset = libc::off_t::try_from(file_offset)
        .map_err(|_| map_err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: `host..host+len` is part of guest RAM, a mapping this process owns and
    // that no Rust reference covers (guest memory is only reached through volatile
    // accessors). MAP_FIXED replaces those pages with a private, copy-on-write view of
    // the file; no vCPU runs yet, and KVM resolves guest pages at fault time, so it
    // sees the new pages. The file is not written (MAP_PRIVATE).
    let ret = unsafe {
        libc::mmap(
            host.cast(),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            offset,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The PVH entry from an ELF note section: name "Xen", type 18, a 32- or 64-bit address.
fn find_pvh_entry(mut notes: &[u8]) -> Option<u64> {
    while notes.len() >= 12 {
        let (namesz, descsz, ntype) = (
            u32le(notes, 0) as usize,
            u32le(notes, 4) as usize,
            u32le(notes, 8),
        );
        let name_end = 12usize.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let desc_end = name_end.checked_add(descsz.checked_next_multiple_of(4)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && notes[12..12 + namesz].starts_with(b"Xen") {
            let desc = &notes[name_end..name_end + descsz];
            return match descsz {
                4 => Some(u64::from(u32le(desc, 0))),
                8 => Some(u64le(desc, 0)),
                _ => None,
            };
        }
        notes = &notes[desc_end..];
    }
    None
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> Result<(), KernelMapError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
        .map_err(KernelMapError::Read)
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_note_is_found_among_others() {
        let mut notes = Vec::new();
        // A GNU note first, then Xen's PHYS32_ENTRY with a 4-byte address.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1, 2, 3, 4]);
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&0x0100_0abcu32.to_le_bytes());
        assert_eq!(find_pvh_entry(&notes), Some(0x0100_0abc));
        assert_eq!(find_pvh_entry(&notes[..20]), None);
        // A truncated or lying note never reads out of bounds.
        let mut lying = notes.clone();
        lying[4] = 0xff;
        assert_eq!(find_pvh_entry(&lying), None);
    }

    #[test]
    fn mapped_file_pages_read_back_and_writes_stay_private() {
        let dir = std::env::temp_dir().join(format!("crx-kmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        let data: Vec<u8> = (0..3 * PAGE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        map_file_range(&mem, 0x10000, &file, 0, round_up(data.len() as u64)).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x10000)).unwrap();
        assert_eq!(back, data);
        // Past EOF within the last page reads as zero; a guest write never reaches the file.
        let mut tail = [0xffu8; 16];
        mem.read_slice(&mut tail, GuestAddress(0x10000 + data.len() as u64))
            .unwrap();
        assert_eq!(tail, [0u8; 16]);
        mem.write_slice(&[0xaa; 8], GuestAddress(0x10000)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(map_file_range(&mem, 0x10001, &file, 0, PAGE).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
