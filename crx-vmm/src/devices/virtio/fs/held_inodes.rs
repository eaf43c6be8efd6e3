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
//! - The parent of a fast lookup must be a directory whose own `O_PATH` fd this table
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

#[derive(Default)]
struct Node {
    /// References the guest holds (as counted here).
    refs: u64,
    /// Of those, the ones answered here that PassthroughFs never saw.
    shadow: u64,
    key: Option<FileKey>,
    /// This directory's own `O_PATH` fd, when it can be a fast-lookup parent.
    dir: Option<Arc<File>>,
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
        table.nodes.insert(
            ROOT_ID,
            Node {
                // The root is never forgotten.
                refs: u64::MAX,
                dir: Some(Arc::new(root)),
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
        let needs_dir_fd = is_dir(attr) && {
            let table = self.table();
            table.nodes.get(&inode).is_none_or(|n| n.dir.is_none())
        };
        let dir_fd = if needs_dir_fd {
            let parent_fd = self.table().nodes.get(&parent).and_then(|n| n.dir.clone());
            parent_fd.and_then(|p| open_same_dir(&p, name, attr).map(Arc::new))
        } else {
            None
        };
        let mut table = self.table();
        let key = key_of(attr);
        let node = table.nodes.entry(inode).or_default();
        node.refs = node.refs.saturating_add(1);
        if node.dir.is_none() {
            node.dir = dir_fd;
        }
        if !is_dir(attr) && node.key.is_none() {
            node.key = Some(key);
            table.files.entry(key).or_insert(inode);
        }
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

/// Opens `name` under `parent` as an `O_PATH` directory fd if it is still the
/// directory `attr` describes (a rename race gives `None`: the directory just stays
/// off the fast path).
fn open_same_dir(parent: &File, name: &CStr, attr: &stat64) -> Option<File> {
    // SAFETY: `parent` is an open fd and `name` a NUL-terminated plain component; the
    // result is checked before it becomes an owned File.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: an all-zero stat64 is a valid value of a plain C struct.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open fd and `st` a valid out buffer; the result is checked.
    let rc = unsafe { libc::fstat64(file.as_raw_fd(), &mut st) };
    (rc == 0 && key_of(&st) == key_of(attr)).then_some(file)
}
