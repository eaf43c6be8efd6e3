//! [`OwnFiles`]: files [`ConfinedFs`] opened itself (through a [`Reopen`] handle) rather
//! than through PassthroughFs, under FUSE handles of their own: the top bit set, which
//! PassthroughFs's counter (from 1, one per open) never reaches.
//!
//! [`ConfinedFs`]: super::confined::ConfinedFs
//! [`Reopen`]: super::held_inodes::Reopen

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The bit that marks a handle as one of ours.
const OWN_BIT: u64 = 1 << 63;

/// Whether a FUSE handle belongs to [`OwnFiles`].
pub fn is_own(handle: u64) -> bool {
    handle & OWN_BIT != 0
}

/// Open files under our own handles.
#[derive(Default)]
pub struct OwnFiles {
    next: AtomicU64,
    files: Mutex<HashMap<u64, Arc<File>>>,
}

impl OwnFiles {
    fn files(&self) -> MutexGuard<'_, HashMap<u64, Arc<File>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `file` and returns its handle.
    pub fn insert(&self, file: File) -> u64 {
        let handle = (self.next.fetch_add(1, Ordering::Relaxed) & !OWN_BIT) | OWN_BIT;
        self.files().insert(handle, Arc::new(file));
        handle
    }

    /// The file behind `handle` (EBADF for one the guest made up or released).
    pub fn get(&self, handle: u64) -> std::io::Result<Arc<File>> {
        self.files()
            .get(&handle)
            .cloned()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))
    }

    /// Closes `handle` (once the last request using it is done).
    pub fn remove(&self, handle: u64) -> std::io::Result<()> {
        self.files()
            .remove(&handle)
            .map(drop)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))
    }
}
