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

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::held_inodes::{Fast, HeldInodes};
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
}

impl ConfinedFs {
    /// Wraps a `PassthroughFs` whose root is already imported; `root` is an `O_PATH`
    /// fd of that same root directory.
    pub fn new(inner: PassthroughFs<()>, root: std::fs::File) -> Self {
        Self {
            inner,
            held: HeldInodes::new(root),
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
        self.track(parent, name, self.inner.symlink(ctx, linkname, parent, name))
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
        self.track(parent, name, self.inner.mknod(ctx, parent, name, mode, rdev, umask))
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
        self.track(parent, name, self.inner.mkdir(ctx, parent, name, mode, umask))
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
        self.track(newparent, newname, self.inner.link(ctx, inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
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
        self.held.handed_out(parent, name, created.0.inode, &created.0.attr);
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
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
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
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
