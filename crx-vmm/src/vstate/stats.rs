//! KVM binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+): the per-vCPU "exits"
//! counter, read without stopping the vCPU.
//!
//! The stats fd starts with a header naming where the descriptors and data live;
//! each descriptor is a fixed 16-byte part followed by a `name_size`-byte name.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;
/// Bounds on what the kernel may describe, so a surprising header cannot make us
/// allocate without limit.
const MAX_DESCRIPTORS: usize = 4096;
const MAX_NAME_SIZE: usize = 256;

/// Why a statistic could not be found.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("KVM_GET_STATS_FD is not available on this KVM")]
    Unsupported(#[source] std::io::Error),
    #[error("cannot read the KVM stats fd")]
    Read(#[source] std::io::Error),
    #[error("the KVM stats header is malformed ({0})")]
    Malformed(&'static str),
    #[error("KVM has no statistic named {0:?}")]
    NotFound(String),
}

/// One u64 statistic of one vCPU.
pub struct Stat {
    file: File,
    data_pos: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Finds `name` in a descriptor block; returns the stat's offset inside the data block.
pub fn find_descriptor(block: &[u8], num_desc: usize, name_size: usize, name: &str) -> Option<u32> {
    let stride = DESC_FIXED_SIZE + name_size;
    (0..num_desc).find_map(|i| {
        let desc = block.get(i * stride..(i + 1) * stride)?;
        let raw_name = &desc[DESC_FIXED_SIZE..];
        let end = raw_name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(raw_name.len());
        (&raw_name[..end] == name.as_bytes()).then(|| u32_at(desc, 8))
    })
}

impl Stat {
    /// Opens the stats fd of the vCPU (or VM) `fd` and locates `name`.
    pub fn open(fd: &impl AsRawFd, name: &str) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if raw < 0 {
            return Err(StatsError::Unsupported(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd returned by the kernel and owned by nobody else.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        if name_size > MAX_NAME_SIZE || num_desc > MAX_DESCRIPTORS {
            return Err(StatsError::Malformed("too many or too long descriptors"));
        }
        let mut block = vec![0u8; num_desc * (DESC_FIXED_SIZE + name_size)];
        file.read_exact_at(&mut block, desc_offset)
            .map_err(StatsError::Read)?;
        let offset = find_descriptor(&block, num_desc, name_size, name)
            .ok_or_else(|| StatsError::NotFound(name.to_owned()))?;
        Ok(Self {
            file,
            data_pos: data_offset + u64::from(offset),
        })
    }

    /// The current value.
    pub fn read(&self) -> std::io::Result<u64> {
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, self.data_pos)?;
        Ok(u64::from_le_bytes(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, offset: u32, name_size: usize) -> Vec<u8> {
        let mut d = vec![0u8; DESC_FIXED_SIZE + name_size];
        d[8..12].copy_from_slice(&offset.to_le_bytes());
        d[DESC_FIXED_SIZE..DESC_FIXED_SIZE + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    #[test]
    fn finds_exits_by_exact_name() {
        let mut block = desc("halt_exits", 8, 48);
        block.extend(desc("exits", 64, 48));
        assert_eq!(find_descriptor(&block, 2, 48, "exits"), Some(64));
        assert_eq!(find_descriptor(&block, 2, 48, "irq_exits"), None);
        // A descriptor count larger than the block never reads out of bounds.
        assert_eq!(find_descriptor(&block, 5, 48, "nope"), None);
    }
}
