//! Guest RAM: anonymous private mappings laid out by `arch::x86_64::layout`.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `mem_mib` MiB of guest RAM (pages are only touched when the guest uses them).
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_mib)
        .into_iter()
        .map(|(addr, size)| (addr, size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mib: mem_mib,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn memory_covers_the_layout() {
        let mem = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
        mem.write_obj(0xabu8, GuestAddress((64 << 20) - 1)).unwrap();
        assert!(mem.write_obj(0u8, GuestAddress(64 << 20)).is_err());
    }
}
