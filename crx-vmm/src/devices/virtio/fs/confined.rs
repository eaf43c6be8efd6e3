//! [`ConfinedFs`]: fuse-backend-rs's `PassthroughFs` behind the checks that keep a
//! guest inside the share, and the FUSE options crx negotiates.
//!
//! `PassthroughFs` already resolves every name relative to an `O_PATH` fd of its
//! parent with `O_NOFOLLOW`, maps `..` of the root to the root, reopens inodes only
//! through `/proc/self/fd` and only for regular files and directories, and never
//! follows a symlink's target. It checks names for `/`, `.` and `..` only when it
//! imports its root itself at FUSE INIT, which needs the share's host path then.
//! crx imports the root once at start instead (so nothing after start needs a host
//! path, see `mod.rs`), which turns that check off; this wrapper does it for every
//! request that carries a name, and adds:
//! - `.` and `..` are answered for the root only (both are the root); elsewhere they
//!   are refused: the guest's dcache resolves them, and a `..` the server answered
//!   would walk up the host's tree from a directory the host may have moved out of
//!   the share;
//! - no block or character device nodes (`MKNOD`): a guest must not plant device
//!   nodes in a host directory; FIFOs and sockets are allowed (the server never
//!   opens them);
//! - INIT never enables writeback caching, zero-message open/opendir, killpriv_v2
//!   or DAX, whatever the guest offers; it adds the options Linux guests need for
//!   big requests and for seeing host-side changes (`AUTO_INVAL_DATA`).

use crate::syscall::cvt;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::held_inodes::{Fast, HeldInodes};
use super::own_files::{is_own, OwnFiles};
use super::{ATTR_TIMEOUT, ENTRY_TIMEOUT};

type Inode = u64;
type Handle = u64;

/// Options crx never lets INIT enable (see the module doc).
const REFUSED_OPTIONS: FsOptions = FsOptions::WRITEBACK_CACHE
    .union(FsOptions::ZERO_MESSAGE_OPEN)
    .union(FsOptions::ZERO_MESSAGE_OPENDIR)
    .union(FsOptions::HANDLE_KILLPRIV_V2)
    .union(FsOptions::PERFILE_DAX);

/// Options crx asks for on top of PassthroughFs's own (if the guest offers them):
/// parallel reads and directory operations, 1 MiB requests, `O_TRUNC` in OPEN, and
/// dropping cached pages when a file's size or mtime changed on the host.
const WANTED_OPTIONS: FsOptions = FsOptions::ASYNC_READ
    .union(FsOptions::PARALLEL_DIROPS)
    .union(FsOptions::BIG_WRITES)
    .union(FsOptions::MAX_PAGES)
    .union(FsOptions::ATOMIC_O_TRUNC)
    .union(FsOptions::AUTO_INVAL_DATA);

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A name that must be one path component of a new or existing entry.
fn plain_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// The passthrough file system of one share, confined to it.
pub struct ConfinedFs {
    inner: PassthroughFs<()>,
    /// Inodes the guest holds, for LOOKUPs that need no new inode.
    held: HeldInodes,
    /// Files opened by handle (OPEN without the procfs path walk).
    own: OwnFiles,
    /// Cleared once `open_by_handle_at` is refused (no CAP_DAC_READ_SEARCH).
    handles_usable: AtomicBool,
}

impl ConfinedFs {
    /// Wraps a `PassthroughFs` whose root is already imported; `root` is an `O_PATH`
    /// fd of that same root directory.
    pub fn new(inner: PassthroughFs<()>, root: std::fs::File) -> Self {
        Self {
            inner,
            held: HeldInodes::new(root),
            own: OwnFiles::default(),
            handles_usable: AtomicBool::new(true),
        }
    }

    /// Opens a held regular file by its handle, if that works; `None` sends the OPEN
    /// to PassthroughFs.
    fn open_own(&self, inode: Inode, flags: u32) -> Option<Handle> {
        if !self.handles_usable.load(Ordering::Relaxed) {
            return None;
        }
        let reopen = self.held.reopen(inode)?;
        // OPEN carries open(2) flags only; O_CREAT and O_DIRECTORY have no business
        // here and O_NOCTTY is moot for a regular file.
        let flags = (flags as i32) & !(libc::O_CREAT | libc::O_EXCL | libc::O_DIRECTORY);
        match reopen.open(flags) {
            Ok(file) => Some(self.own.insert(file)),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::info!(
                    "virtio-fs: open_by_handle_at refused (no CAP_DAC_READ_SEARCH); OPEN reopens through /proc/self/fd"
                );
                self.handles_usable.store(false, Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }

    /// Counts the reference `entry` carries, if PassthroughFs handed it out.
    fn track(&self, parent: Inode, name: &CStr, entry: io::Result<Entry>) -> io::Result<Entry> {
        if let Ok(e) = &entry {
            self.held.handed_out(parent, name, e.inode, &e.attr);
        }
        entry
    }
}

/// Borrows an owned file as a `File` for a call that wants `&mut File`.
fn borrowed(file: &File) -> ManuallyDrop<File> {
    // SAFETY: the fd stays open for as long as `file` lives, which outlives the
    // borrow; ManuallyDrop keeps this second `File` from closing it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(file.as_raw_fd()) })
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = self.inner.init(capable - REFUSED_OPTIONS)?;
        Ok((wanted | WANTED_OPTIONS) - REFUSED_OPTIONS)
    }

    fn destroy(&self) {
        // PassthroughFs's destroy re-imports the root through its host path, which a
        // jailed crx-vmm no longer has: keep the tree (a remount reuses it).
        tracing::debug!("virtio-fs: guest sent DESTROY; inodes kept for a later INIT");
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let bytes = name.to_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') {
            return Err(errno(libc::EINVAL));
        }
        if bytes == b"." || bytes == b".." {
            if parent != ROOT_ID {
                return Err(errno(libc::EPERM));
            }
            // PassthroughFs answers both with the root itself.
            return self.inner.lookup(ctx, parent, c".");
        }
        match self.held.lookup(parent, name) {
            Fast::Hit(inode, attr) => Ok(Entry {
                inode,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: ATTR_TIMEOUT,
                entry_timeout: ENTRY_TIMEOUT,
            }),
            Fast::Error(e) => Err(e),
            Fast::Miss => self.track(parent, name, self.inner.lookup(ctx, parent, name)),
        }
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        let rest = self.held.forget(inode, count);
        if rest > 0 {
            self.inner.forget(ctx, inode, rest)
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        let rest: Vec<(Inode, u64)> = requests
            .into_iter()
            .map(|(inode, count)| (inode, self.held.forget(inode, count)))
            .filter(|&(_, count)| count > 0)
            .collect();
        if !rest.is_empty() {
            self.inner.batch_forget(ctx, rest)
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        // Our handles are files of this inode; PassthroughFs stats the inode itself.
        let handle = handle.filter(|&h| !is_own(h));
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let mut valid = valid;
        let handle = match handle {
            Some(h) if is_own(h) => {
                if valid.contains(SetattrValid::SIZE) {
                    // Truncate through the guest's own open file, as PassthroughFs
                    // does with its handles.
                    let file = self.own.get(h)?;
                    // SAFETY: ftruncate on an open fd with a size from the request.
                    cvt(unsafe { libc::ftruncate64(file.as_raw_fd(), attr.st_size) })?;
                    valid.remove(SetattrValid::SIZE);
                }
                None
            }
            other => other,
        };
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        // The target is only text stored in the link: the server never follows it.
        plain_name(name)?;
        self.track(
            parent,
            name,
            self.inner.symlink(ctx, linkname, parent, name),
        )
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        plain_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFCHR | libc::S_IFBLK => return Err(errno(libc::EPERM)),
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(errno(libc::EINVAL)),
        }
        self.track(
            parent,
            name,
            self.inner.mknod(ctx, parent, name, mode, rdev, umask),
        )
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        plain_name(name)?;
        self.track(
            parent,
            name,
            self.inner.mkdir(ctx, parent, name, mode, umask),
        )
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        plain_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        plain_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        plain_name(oldname)?;
        plain_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        plain_name(newname)?;
        self.track(
            newparent,
            newname,
            self.inner.link(ctx, inode, newparent, newname),
        )
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        // What PassthroughFs answers for a file under CachePolicy::Auto: no options.
        if let Some(handle) = self.open_own(inode, flags) {
            return Ok((Some(handle), OpenOptions::empty(), None));
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        plain_name(name)?;
        let created = self.inner.create(ctx, parent, name, args)?;
        self.held
            .handed_out(parent, name, created.0.inode, &created.0.attr);
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        if is_own(handle) {
            let file = self.own.get(handle)?;
            return w.write_from(&mut *borrowed(&file), size as usize, offset);
        }
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        if is_own(handle) {
            let file = self.own.get(handle)?;
            return r.read_to(&mut *borrowed(&file), size as usize, offset);
        }
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        if is_own(handle) {
            // A guest close(): closing a duplicate gives the host file what a close of
            // the guest's fd would (lock release, NFS flush), as PassthroughFs does.
            let file = self.own.get(handle)?;
            // SAFETY: dup of an open fd; the copy is closed at once.
            let copy = unsafe { libc::dup(file.as_raw_fd()) };
            cvt(copy)?;
            // SAFETY: `copy` was just created and nothing else owns it.
            return cvt(unsafe { libc::close(copy) }).map(drop);
        }
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        if is_own(handle) {
            let file = self.own.get(handle)?;
            return if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            };
        }
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        if is_own(handle) {
            let file = self.own.get(handle)?;
            let (offset, length) = (
                i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?,
                i64::try_from(length).map_err(|_| errno(libc::EINVAL))?,
            );
            // SAFETY: fallocate on an open fd with values from the request; the kernel
            // checks them.
            return cvt(unsafe {
                libc::fallocate64(file.as_raw_fd(), mode as libc::c_int, offset, length)
            })
            .map(drop);
        }
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if is_own(handle) {
            return self.own.remove(handle);
        }
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        if is_own(handle) {
            let file = self.own.get(handle)?;
            let offset = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
            // SAFETY: lseek on an open fd; the kernel checks offset and whence.
            let at = unsafe { libc::lseek64(file.as_raw_fd(), offset, whence as libc::c_int) };
            return u64::try_from(at).map_err(|_| io::Error::last_os_error());
        }
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
