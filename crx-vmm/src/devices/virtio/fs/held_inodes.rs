//! [`HeldInodes`]: the inodes the guest holds, as far as [`ConfinedFs`] saw them handed
//! out, so that a LOOKUP of a name whose file the guest already holds costs one
//! `fstatat` instead of PassthroughFs's `openat(O_PATH)` + `statx` + `close`.
//!
//! Why it is safe:
//! - A held inode's host file is pinned by PassthroughFs's own `O_PATH` fd, so its
//!   `(st_dev, st_ino)` cannot be reused by another file while the guest holds it:
//!   a name that `fstatat`s to that pair *is* that file (possibly through another
//!   hard link or bind mount of it, which is the same file to the guest too).
//! - Lookups answered here take a reference PassthroughFs never saw ("shadow"
//!   references). FORGET pays shadow references first and forwards only the rest, so
//!   PassthroughFs's count never reaches zero while the guest holds a reference, and
//!   reaches it exactly when the guest drops the last one.
//! - Only non-directories are answered here. A directory's lookup always goes to
//!   PassthroughFs (it may be a mount point added after boot, and its inode is a
//!   parent for later lookups).
//! - The parent of a fast lookup must be a directory whose own fd this table
//!   holds: the share's root, or a directory opened from a held parent with a plain
//!   name, `O_NOFOLLOW`, and checked to be the very inode PassthroughFs handed out.
//!
//! Missing a reference PassthroughFs took (READDIRPLUS entries are not counted) only
//! makes the table forget an inode early, which sends later lookups down the slow path;
//! it never makes it answer with an inode PassthroughFs has dropped.
//!
//! [`ConfinedFs`]: super::confined::ConfinedFs

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::abi::fuse_abi::{stat64, ROOT_ID};

type Inode = u64;

/// A host file's identity while it is pinned.
type FileKey = (u64, u64);

fn key_of(st: &stat64) -> FileKey {
    (st.st_dev, st.st_ino)
}

fn is_dir(st: &stat64) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_regular(st: &stat64) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

#[derive(Default)]
struct Node {
    /// How to reopen this regular file without a path walk (see [`Reopen`]).
    reopen: Option<Arc<Reopen>>,
    /// References the guest holds (as counted here).
    refs: u64,
    /// Of those, the ones answered here that PassthroughFs never saw.
    shadow: u64,
    key: Option<FileKey>,
    /// This directory's own fd (opened `O_RDONLY`: `open_by_handle_at` takes no
    /// `O_PATH` fd), when it can be a fast-lookup parent.
    dir: Option<Arc<File>>,
    /// The id of the mount that fd is on.
    dir_mount: Option<u64>,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<Inode, Node>,
    /// Held non-directories by host identity.
    files: HashMap<FileKey, Inode>,
}

/// What a fast lookup found.
pub enum Fast {
    /// A held file: answer with this inode and these attributes.
    Hit(Inode, stat64),
    /// The name does not resolve (`fstatat`'s error), answer with it.
    Error(io::Error),
    /// Ask PassthroughFs.
    Miss,
}

/// The table of held inodes of one share.
pub struct HeldInodes {
    table: Mutex<Table>,
}

impl HeldInodes {
    /// A table whose only parent is the share's root, `root` (an `O_PATH` directory fd
    /// of the very directory PassthroughFs imported).
    pub fn new(root: File) -> Self {
        let mut table = Table::default();
        // SAFETY: openat of "." relative to an open directory fd; checked below.
        let fd = unsafe {
            libc::openat(
                root.as_raw_fd(),
                c".".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        let root = if fd >= 0 {
            // SAFETY: `fd` was just opened and nothing else owns it.
            unsafe { File::from_raw_fd(fd) }
        } else {
            root
        };
        let dir_mount = mount_id(&root);
        table.nodes.insert(
            ROOT_ID,
            Node {
                // The root is never forgotten.
                refs: u64::MAX,
                dir: Some(Arc::new(root)),
                dir_mount,
                ..Node::default()
            },
        );
        Self {
            table: Mutex::new(table),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tries to answer LOOKUP(`parent`, `name`) from held inodes. `name` must already
    /// be checked to be one plain component.
    pub fn lookup(&self, parent: Inode, name: &CStr) -> Fast {
        let Some(dir) = self.table().nodes.get(&parent).and_then(|n| n.dir.clone()) else {
            return Fast::Miss;
        };
        let st = match fstatat(&dir, name) {
            Ok(st) => st,
            Err(e) => return Fast::Error(e),
        };
        if is_dir(&st) {
            return Fast::Miss;
        }
        let mut table = self.table();
        let Some(&inode) = table.files.get(&key_of(&st)) else {
            return Fast::Miss;
        };
        match table.nodes.get_mut(&inode) {
            Some(node) if node.refs > 0 => {
                node.refs = node.refs.saturating_add(1);
                node.shadow = node.shadow.saturating_add(1);
                Fast::Hit(inode, st)
            }
            _ => Fast::Miss,
        }
    }

    /// Counts a reference PassthroughFs handed out for `inode` (from LOOKUP, CREATE,
    /// MKDIR, MKNOD, SYMLINK or LINK of `name` under `parent`). A directory gets its
    /// own fd if its parent has one, so it can be a fast-lookup parent in turn.
    pub fn handed_out(&self, parent: Inode, name: &CStr, inode: Inode, attr: &stat64) {
        if inode == ROOT_ID || inode == 0 {
            return;
        }
        let (needs_dir_fd, needs_reopen) = {
            let table = self.table();
            let node = table.nodes.get(&inode);
            (
                is_dir(attr) && node.is_none_or(|n| n.dir.is_none()),
                is_regular(attr) && node.is_none_or(|n| n.reopen.is_none()),
            )
        };
        let parent_dir = if needs_dir_fd || needs_reopen {
            self.table()
                .nodes
                .get(&parent)
                .and_then(|n| n.dir.clone().map(|d| (d, n.dir_mount)))
        } else {
            None
        };
        let dir_fd = match (&parent_dir, needs_dir_fd) {
            (Some((p, _)), true) => open_same_dir(p, name, attr).map(Arc::new),
            _ => None,
        };
        // The reopened file lands on the mount of the fd the handle is used with, so
        // only a file on its parent's own mount gets one (a file bind-mounted over
        // the name, perhaps read-only, keeps PassthroughFs's reopen).
        let reopen = match parent_dir {
            Some((p, Some(mount))) if needs_reopen => {
                Reopen::of(&p, mount, name, attr).map(Arc::new)
            }
            _ => None,
        };
        let mut table = self.table();
        let key = key_of(attr);
        let node = table.nodes.entry(inode).or_default();
        node.refs = node.refs.saturating_add(1);
        if node.dir.is_none() {
            if let Some(d) = dir_fd {
                node.dir_mount = mount_id(&d);
                node.dir = Some(d);
            }
        }
        if node.reopen.is_none() {
            node.reopen = reopen;
        }
        if !is_dir(attr) && node.key.is_none() {
            node.key = Some(key);
            table.files.entry(key).or_insert(inode);
        }
    }

    /// How to reopen `inode` without a path walk, if it is a held regular file whose
    /// handle is known.
    pub fn reopen(&self, inode: Inode) -> Option<Arc<Reopen>> {
        self.table().nodes.get(&inode).and_then(|n| n.reopen.clone())
    }

    /// The guest dropped `count` references to `inode`; returns how many of them
    /// PassthroughFs must forget.
    pub fn forget(&self, inode: Inode, count: u64) -> u64 {
        if inode == ROOT_ID {
            return count;
        }
        let mut table = self.table();
        let Some(node) = table.nodes.get_mut(&inode) else {
            return count;
        };
        let paid = count.min(node.shadow);
        node.shadow -= paid;
        node.refs = node.refs.saturating_sub(count);
        if node.refs == 0 {
            if let Some(node) = table.nodes.remove(&inode) {
                if let Some(key) = node.key {
                    if table.files.get(&key) == Some(&inode) {
                        table.files.remove(&key);
                    }
                }
            }
        }
        count - paid
    }

}

fn fstatat(dir: &File, name: &CStr) -> io::Result<stat64> {
    // SAFETY: an all-zero stat64 is a valid value of a plain C struct.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is an open fd, `name` a NUL-terminated string and `st` a valid
    // out buffer; the result is checked.
    let rc = unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Opens `name` under `parent` as a directory fd if it is still the
/// directory `attr` describes (a rename race gives `None`: the directory just stays
/// off the fast path).
fn open_same_dir(parent: &File, name: &CStr, attr: &stat64) -> Option<File> {
    // SAFETY: `parent` is an open fd and `name` a NUL-terminated plain component; the
    // result is checked before it becomes an owned File.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    fstat(&file)
        .is_ok_and(|st| key_of(&st) == key_of(attr))
        .then_some(file)
}

fn fstat(file: &File) -> io::Result<stat64> {
    // SAFETY: an all-zero stat64 is a valid value of a plain C struct.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open fd and `st` a valid out buffer; the result is checked.
    if unsafe { libc::fstat64(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Longest file handle kept (`MAX_HANDLE_SZ` in Linux).
const MAX_HANDLE_BYTES: usize = 128;

/// A regular file's kernel file handle and a directory fd on its file system:
/// `open_by_handle_at` opens it again without the `/proc/self/fd/N` path walk
/// PassthroughFs uses (which instantiates a procfs inode on every OPEN).
///
/// Why it is safe: the handle was taken from an `O_PATH` fd opened with `O_NOFOLLOW`
/// and checked to be the very regular file PassthroughFs handed out, so it can only
/// ever open that file (a handle carries the inode's generation: once the inode is
/// freed and reused, it fails with `ESTALE`). It never opens a device node or follows
/// a name. It needs `CAP_DAC_READ_SEARCH`, which the server keeps anyway (see
/// `crate::jail::privs::FS_CAPS`); without it the caller falls back to PassthroughFs.
pub struct Reopen {
    /// `struct file_handle`: `handle_bytes`, `handle_type`, then the bytes.
    handle: Vec<u8>,
    mount: Arc<File>,
}

impl Reopen {
    /// The handle of `name` under `parent` (on mount `parent_mount`) if it still is
    /// the regular file `attr` and on that same mount.
    fn of(parent: &Arc<File>, parent_mount: u64, name: &CStr, attr: &stat64) -> Option<Reopen> {
        // SAFETY: `parent` is an open fd and `name` a NUL-terminated plain component;
        // the result is checked before it becomes an owned File.
        let fd = unsafe {
            libc::openat(
                parent.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let st = fstat(&file).ok()?;
        if key_of(&st) != key_of(attr) || !is_regular(&st) {
            return None;
        }
        let mut handle = vec![0u8; 8 + MAX_HANDLE_BYTES];
        handle[..4].copy_from_slice(&(MAX_HANDLE_BYTES as u32).to_ne_bytes());
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `handle` is a `struct file_handle` with room for MAX_HANDLE_BYTES
        // (its `handle_bytes` says so), `mount_id` a valid out int, the path empty
        // with AT_EMPTY_PATH so the call names `file` itself; the result is checked.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                file.as_raw_fd(),
                c"".as_ptr(),
                handle.as_mut_ptr(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc != 0 || u64::try_from(mount_id).ok() != Some(parent_mount) {
            return None;
        }
        let used = u32::from_ne_bytes([handle[0], handle[1], handle[2], handle[3]]) as usize;
        handle.truncate(8 + used.min(MAX_HANDLE_BYTES));
        Some(Reopen {
            handle,
            mount: parent.clone(),
        })
    }

    /// Opens the file with `flags` (`O_CLOEXEC` added).
    pub fn open(&self, flags: i32) -> io::Result<File> {
        // SAFETY: `handle` is a complete `struct file_handle` from name_to_handle_at,
        // `mount` an open fd on the same file system; the result is checked before it
        // becomes an owned File.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.mount.as_raw_fd(),
                self.handle.as_ptr(),
                flags | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
    }
}

/// The id of the mount `file` is on (statx `STATX_MNT_ID`, Linux 5.8).
fn mount_id(file: &File) -> Option<u64> {
    // SAFETY: an all-zero statx is a valid value of a plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open fd, the path empty with AT_EMPTY_PATH, `stx` a valid
    // out buffer; the result is checked.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}
