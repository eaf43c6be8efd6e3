//! [`Backing`]: the host side of a block device, a raw image file or a host block
//! device. Positioned I/O only (`pread`/`pwrite`), so several users never fight over a
//! file offset; data moves straight between the file and guest memory, without a
//! bounce buffer; FLUSH maps to `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::{BlockError, SECTOR_SHIFT};

/// An open backing store and its size in 512-byte sectors.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    read_only: bool,
    sectors: u64,
    /// Successful `fdatasync` calls; lets tests (and metrics) see that FLUSH reached
    /// the host.
    flushes: AtomicU64,
}

impl Backing {
    /// Opens `path` (a regular file or a block device) read-write, or read-only.
    /// A trailing partial sector is not exposed to the guest.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// Wraps a file someone else opened (e.g. an fd received over the API socket, from
    /// outside crx-vmm's jail); `label` names it in logs and errors. A writable backing
    /// needs a file open for writing: checked here, not at the guest's first write.
    pub fn from_file(mut file: File, label: &Path, read_only: bool) -> Result<Self, BlockError> {
        let path = label.to_path_buf();
        let size_err = |source| BlockError::Size {
            path: path.clone(),
            source,
        };
        let kind = file.metadata().map_err(size_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotFileOrBlockDevice(path));
        }
        if !read_only {
            // SAFETY: F_GETFL on an fd `file` owns; no memory is passed.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 {
                return Err(size_err(std::io::Error::last_os_error()));
            }
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(BlockError::NotWritable(path));
            }
        }
        // A block device's metadata length is 0; seeking to its end gives its size.
        let bytes = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        Ok(Self {
            file,
            path,
            read_only,
            sectors: bytes >> SECTOR_SHIFT,
            flushes: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Size in 512-byte sectors, as of opening.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Fills `buf` from byte `offset`; a short file is an error, never zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at byte `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    /// Fills `len` bytes of guest memory at `addr` from byte `offset` of the backing.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        let mut at = FileAt {
            file: &self.file,
            offset,
        };
        mem.read_exact_volatile_from(addr, &mut at, len)
            .map_err(std::io::Error::other)
    }

    /// Writes `len` bytes of guest memory at `addr` to byte `offset` of the backing.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        let mut at = FileAt {
            file: &self.file,
            offset,
        };
        mem.write_all_volatile_to(addr, &mut at, len)
            .map_err(std::io::Error::other)
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // `sync_data` is fdatasync(2): data and the metadata needed to read it back.
        self.file.sync_data()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// How many `fdatasync` calls have succeeded on this backing.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

/// A file seen from a byte offset that advances with each transfer, so vm-memory's
/// volatile copy helpers can drive `pread`/`pwrite` directly on guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    /// Runs `op(done)` until `len` bytes moved, EOF (0) or an error; retries EINTR.
    fn transfer(
        &mut self,
        len: usize,
        mut op: impl FnMut(usize, libc::off_t) -> isize,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        while done < len {
            let pos = self
                .offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| {
                    VolatileMemoryError::IOError(std::io::Error::from(
                        std::io::ErrorKind::InvalidInput,
                    ))
                })?;
            let n = op(done, pos);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        self.offset += done as u64;
        Ok(done)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let fd = self.file.as_raw_fd();
        let len = buf.len();
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let res = self.transfer(len, |done, pos| {
            // SAFETY: `base` points to `len` bytes of mapped guest memory that stay valid
            // while `guard` lives; `done < len`, so pread writes inside that range. The fd
            // is owned by `self.file`, borrowed for the call.
            unsafe { libc::pread(fd, base.add(done).cast(), len - done, pos) }
        });
        // On error we cannot know how much was written: mark everything.
        let dirty = res.as_ref().map_or(len, |n| *n);
        buf.bitmap().mark_dirty(0, dirty);
        res
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let fd = self.file.as_raw_fd();
        let len = buf.len();
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        self.transfer(len, |done, pos| {
            // SAFETY: `base` points to `len` bytes of mapped guest memory that stay valid
            // while `guard` lives; `done < len`, so pwrite reads inside that range. The fd
            // is owned by `self.file`, borrowed for the call.
            unsafe { libc::pwrite(fd, base.add(done).cast(), len - done, pos) }
        })
    }
}
