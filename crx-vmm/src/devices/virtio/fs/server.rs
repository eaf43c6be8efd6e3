//! [`FsServer`]: one share's FUSE server. It opens the share once, imports it as
//! the root of a [`ConfinedFs`], and answers one virtqueue request (a descriptor
//! chain: FUSE request readable, reply space writable) at a time. crx-vmm's device
//! thread, the vhost-user-fs back end and the benchmark all call
//! [`FsServer::handle_chain`], so they run the same code.

use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::confined::ConfinedFs;
use super::{FsError, ATTR_TIMEOUT, ENTRY_TIMEOUT};

/// The FUSE server of one share.
pub struct FsServer {
    server: Server<ConfinedFs>,
}

impl FsServer {
    /// Opens `dir` and makes it the root. Every host path is used here and only here:
    /// `/proc/self/fd` and `/proc/self/mountinfo` (opened and kept by
    /// `PassthroughFs`) and the share itself, whose root fd is kept open.
    pub fn open(dir: &Path) -> Result<Self, FsError> {
        let meta = std::fs::metadata(dir).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => FsError::NoDirectory(dir.to_path_buf()),
            _ => FsError::OpenDir {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(dir.to_path_buf()));
        }
        let share = open_dir(dir).map_err(|source| FsError::OpenDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let config = Config {
            // Exactly the directory opened above, even if `dir` changes meanwhile.
            root_dir: format!("/proc/self/fd/{}/.", share.as_raw_fd()),
            // Import now, not at FUSE INIT: after start there is no host path.
            do_import: false,
            cache_policy: CachePolicy::Auto,
            entry_timeout: ENTRY_TIMEOUT,
            attr_timeout: ATTR_TIMEOUT,
            writeback: false,
            xattr: false,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            inode_file_handles: false,
            ..Config::default()
        };
        let fs = PassthroughFs::<()>::new(config).map_err(FsError::Passthrough)?;
        // import() clears the process umask so the guest's mode bits survive; only
        // the server threads may run that way (see `private_umask`).
        // SAFETY: umask only swaps the calling process's file-creation mask.
        let previous = unsafe { libc::umask(0o022) };
        let imported = fs.import();
        // SAFETY: as above; restores the mask the process had.
        unsafe { libc::umask(previous) };
        imported.map_err(|source| FsError::Import {
            dir: dir.to_path_buf(),
            source,
        })?;
        // PassthroughFs holds its own O_PATH fd of the root now; ConfinedFs keeps this
        // one as the first parent of its fast lookups.
        Ok(Self {
            server: Server::new(ConfinedFs::new(fs, share)),
        })
    }

    /// Serves the FUSE request in `chain` and writes the reply into its writable
    /// part; returns the reply's length for the used ring (0 for requests without a
    /// reply, such as FORGET).
    pub fn handle_chain<M>(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
    ) -> Result<u32, FsError>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        private_umask();
        let reader = Reader::from_descriptor_chain(mem, chain.clone()).map_err(FsError::Chain)?;
        let writer = VirtioFsWriter::new(mem, chain).map_err(FsError::Chain)?;
        let written = self
            .server
            .handle_message(reader, writer.into(), None, None)
            .map_err(FsError::Fuse)?;
        // A reply is bounded by the chain's writable bytes, which fit a u32.
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }
}

fn open_dir(dir: &Path) -> io::Result<File> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `path` is a valid NUL-terminated string for the call; the result is
    // checked before it becomes an owned File.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

thread_local! {
    static UMASK_DONE: Cell<bool> = const { Cell::new(false) };
}

/// Gives the calling thread its own umask of 0, once: files and directories the
/// guest creates get exactly the mode it asked for, while the rest of crx-vmm (its
/// sockets) keeps the process umask. `unshare(CLONE_FS)` makes the umask (with the
/// cwd and root) private to this thread. If that fails, requests are still served,
/// with the process umask applied to new files.
fn private_umask() {
    if UMASK_DONE.with(Cell::get) {
        return;
    }
    UMASK_DONE.with(|done| done.set(true));
    // SAFETY: unshare(CLONE_FS) only detaches this thread's fs attributes.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        tracing::warn!(
            error = %io::Error::last_os_error(),
            "virtio-fs: cannot give the server thread its own umask; new files get the process umask"
        );
        return;
    }
    // SAFETY: umask only sets this thread's (now private) file-creation mask.
    unsafe { libc::umask(0) };
}
