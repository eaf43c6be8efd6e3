//! virtio-fs (device ID 26): a host directory (the pod share) served to the guest
//! by fuse-backend-rs's passthrough file system, confined to that directory. The
//! guest mounts it with `mount -t virtiofs TAG /mnt`.
//!
//! Split by job:
//! - `server.rs`: [`FsServer`], one share's FUSE server, which answers one
//!   descriptor chain at a time; crx-vmm's device thread, the vhost-user-fs back end
//!   (`crate::vhost_user::fs`) and the benchmark all go through it;
//! - `held_inodes.rs`: the inodes the guest holds, so a LOOKUP of a file it already
//!   holds costs one `fstatat`, and an OPEN of a held regular file reopens it by its
//!   kernel file handle (see its doc for why both are safe);
//! - `own_files.rs`: files opened through those handles, under FUSE handles of our own;
//! - `confined.rs`: [`ConfinedFs`](confined::ConfinedFs), the checks that keep the
//!   guest inside the share, on top of what `PassthroughFs` guarantees;
//! - `device.rs` + `event_loop.rs`: the [`Fs`] [`VirtioDevice`](super::VirtioDevice)
//!   (config space: tag + number of request queues; one hiprio queue and one request
//!   queue) and its `crx-fs` thread;
//! - `bench.rs`: a FUSE driver in plain guest memory, for tests and `crx-bench fs`.
//!
//! # Confinement
//! The guest names files only relative to inodes the server handed out, and every
//! inode is an `O_PATH` fd opened with `O_NOFOLLOW` relative to its parent's fd,
//! starting from the share's root fd. So:
//! - `..` of the root is the root; `.`/`..` anywhere else are refused, as are names
//!   with `/` (every request that carries a name is checked);
//! - symlinks are never followed on the host: a LOOKUP of a symlink gives the link's
//!   own inode, READLINK returns its text for the guest to resolve inside its own
//!   mount, OPEN of anything but a regular file or directory is refused, and
//!   attribute changes through `/proc/self/fd/N` land on the link itself;
//! - `/proc/self/fd` is used only with the numbers of the server's own fds, never
//!   with a name from the guest;
//! - a rename race (a directory swapped for a symlink after the guest looked it up)
//!   cannot redirect the server: the inode is the fd of the directory that was
//!   looked up, wherever it now is; a new lookup of the name gives the symlink;
//! - no device nodes can be created (MKNOD of a block or character device is
//!   refused), and device nodes the host put in the share are never opened.
//!
//! # Cache mode: `CachePolicy::Auto`, 1 s entry and attribute timeouts
//! The host changes the share behind the guest's back: the shim bind-mounts
//! container root filesystems and volumes into it after boot, and kubelet updates
//! configmaps and secrets (a symlink swap) while containers run. `Always` would keep
//! stale names and pages in the guest indefinitely; `Never` would send every read
//! and every `stat` to the host. `Auto` keeps close-to-open consistency (the guest's
//! page cache of a file is dropped when it is opened again after a change, and
//! `AUTO_INVAL_DATA` drops it when a refreshed attribute shows a new mtime or size),
//! and 1 s timeouts bound how long a name or attribute the host changed can stay
//! stale. Writeback caching is off: it assumes the guest is the only writer.
//! Negative lookups are not cached (the server answers ENOENT, not a zero inode), so
//! a file the host adds is found at the next lookup.
//!
//! # Host mounts under the share
//! Lookups cross mount points: `openat` of a mount point gives the mounted root, and
//! the server neither compares `st_dev` nor hides other mounts. Which mounts it sees
//! is decided by the mount namespace the share's root fd was opened in: lookups walk
//! that fd's mount tree. Opened on the host (before any `unshare(CLONE_NEWNS)`), it
//! sees every bind mount the shim adds under the share after boot, with no
//! propagation set up (checked: a private mount namespace still sees such mounts
//! through an fd opened before the unshare). Opened inside crx-vmm's jail (`--jail`,
//! which enters before the devices are built), it sees the jail's slave bind mount of
//! the share, so the host's share must be a shared mount for later host mounts to
//! propagate in (`mount --bind S S && mount --make-shared S`, see `crate::jail`).
//!
//! # What the server needs once started (for the jail and seccomp filters)
//! Files: the share's root `O_PATH` fd, `/proc/self/fd` (an `O_PATH` directory fd)
//! and `/proc/self/mountinfo` (kept open, unused without `inode_file_handles`), all
//! opened by [`FsServer::open`] (which needs `/proc` mounted then); no path afterwards.
//! Syscalls on the server thread: `openat` (`O_PATH|O_NOFOLLOW` lookups; reopening
//! inodes as `/proc/self/fd/N` relative to the kept fd), `statx`, `newfstatat`
//! (`fstatat64`), `fstatfs` (`fstatvfs`), `readlinkat`, `mkdirat`, `mknodat`,
//! `symlinkat`, `linkat` (with `AT_EMPTY_PATH`), `unlinkat`, `renameat2`,
//! `fchmod`, `fchmodat`, `fchownat`, `ftruncate`, `utimensat`, `futimens` (via
//! `utimensat`), `fallocate`, `lseek`, `getdents64`, `read`/`pread64`/`readv`/
//! `preadv`, `write`/`pwrite64`/`writev`/`pwritev`, `fsync`, `fdatasync`, `fcntl`
//! (`F_SETFL`), `dup`, `close`, `setresuid`/`setresgid` (per-thread, to create files
//! as the guest's uid/gid), `capget`/`capset` (only with killpriv_v2, which crx
//! keeps off), `unshare(CLONE_FS)` and `umask` (once per server thread, for a private
//! umask of 0), plus the device loop's `epoll_wait`, `read`/`write` on eventfds.
//! Capabilities: `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` (`linkat` with
//! `AT_EMPTY_PATH`), `CAP_FOWNER`, `CAP_CHOWN`, `CAP_FSETID`, `CAP_SETUID` and
//! `CAP_SETGID` (acting as the guest's uid/gid). `CAP_MKNOD` only for a guest's
//! `rename(RENAME_WHITEOUT)` (overlayfs in the guest); device nodes are refused and
//! FIFOs and sockets need none. Without the first five, the guest's root acts as
//! crx-vmm's uid on the host; without `CAP_SETUID/SETGID`, creating a file as a
//! non-root guest user fails with EPERM.

use std::path::PathBuf;
use std::time::Duration;

pub mod bench;
mod confined;
mod held_inodes;
mod own_files;
mod device;
mod event_loop;
mod server;

pub use device::Fs;
pub use server::FsServer;

/// virtio device ID of the file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue 0 is hiprio (FORGET, INTERRUPT), queue 1 the one request queue.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Maximum sizes of the hiprio queue and of the request queue.
pub const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// Bytes of the tag field in the config space (not NUL-terminated when full).
pub const TAG_LEN: usize = 36;
/// How long the guest may keep a name (dentry) before asking again.
pub const ENTRY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the guest may keep a file's attributes before asking again.
pub const ATTR_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a share could not be set up, or one request not be served.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("share directory {} does not exist", .0.display())]
    NoDirectory(PathBuf),
    #[error("share path {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot open share directory {}", .dir.display())]
    OpenDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share tag `{0}` must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    #[error("cannot set up the passthrough file system (it needs /proc/self/fd and /proc/self/mountinfo)")]
    Passthrough(#[source] std::io::Error),
    #[error("cannot import share directory {} as the file system root", .dir.display())]
    Import {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed descriptor chain")]
    Chain(#[source] fuse_backend_rs::transport::Error),
    #[error("cannot serve the FUSE request")]
    Fuse(#[source] fuse_backend_rs::Error),
}

impl FsError {
    /// Whether the caller's input (tag or directory) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            FsError::NoDirectory(_) | FsError::NotADirectory(_) | FsError::BadTag(_)
        )
    }
}

#[cfg(test)]
mod tests;
