//! [`FuseDriver`]: plays a guest's virtio-fs driver against an [`FsServer`] without
//! a guest. FUSE requests are written into plain guest memory as descriptor chains
//! on a split virtqueue, and served by the same `serve_queue` the `crx-fs` thread
//! runs (pop chain → [`FsServer::handle_chain`] → used ring). Unit tests use it to
//! check behaviour and `crx-bench fs` to measure the server against the host's own
//! syscalls.
//!
//! One request is in flight at a time, laid out as a Linux guest lays it out: the
//! request header and arguments (readable), for a prepared WRITE its payload in
//! page-aligned memory (readable), then the reply header and the reply body
//! (writable, the body page-aligned, large enough for a 1 MiB READ).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, ForgetIn, GetattrIn, InHeader, InitIn, InitOut, LinkIn, MkdirIn,
    MknodIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, WriteIn,
    WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::event_loop::serve_queue;
use super::{FsError, FsServer, QUEUE_SIZES};
use crate::devices::virtio::mmio::WarnLimiter;

pub use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

/// Largest READ or WRITE payload the driver sends (what a Linux guest sends with
/// `max_pages` = 256).
pub const MAX_IO: usize = 1 << 20;
/// Room for a request's or reply's header and arguments besides the payload.
const HEADER_ROOM: usize = 4096;
const BUF_LEN: usize = MAX_IO + HEADER_ROOM;
const QUEUE_SIZE: u16 = 16;
const QUEUE_BASE: u64 = 0x1000;
const REQ_BASE: u64 = 0x10_0000;
/// Page-aligned payload of a prepared WRITE.
const REQ_DATA: u64 = REQ_BASE + 2 * HEADER_ROOM as u64;
const REPLY_HDR: u64 = REQ_DATA + BUF_LEN as u64 + 0x1000;
/// Page-aligned reply body (READ data lands here).
const REPLY_BODY: u64 = REPLY_HDR + HEADER_ROOM as u64;
const MEM_SIZE: usize = (REPLY_BODY as usize + BUF_LEN + 0xfff) & !0xfff;
const OUT_HEADER_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

/// Linux's `FUSE_INIT` flags a guest typically offers (the server picks from them).
pub const GUEST_INIT_FLAGS: u32 = 0x1 // ASYNC_READ
    | 0x8 // ATOMIC_O_TRUNC
    | 0x20 // BIG_WRITES
    | 0x1000 // AUTO_INVAL_DATA
    | 0x2000 // DO_READDIRPLUS
    | 0x4000 // READDIRPLUS_AUTO
    | 0x1_0000 // WRITEBACK_CACHE (crx must refuse it)
    | 0x4_0000 // PARALLEL_DIROPS
    | 0x40_0000; // MAX_PAGES

/// Why a driver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot serve the share")]
    Server(#[source] FsError),
    #[error("cannot map the driver's guest memory")]
    Memory(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot set up the driver's queue")]
    Queue(#[source] virtio_queue::Error),
}

/// A failed request: the errno the server answered (positive), or -1 if the server
/// could not serve the chain at all.
pub type Errno = i32;

/// A guest-side FUSE driver on one virtqueue in its own guest memory.
pub struct FuseDriver {
    server: Arc<FsServer>,
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
    unique: u64,
    scratch: Vec<u8>,
    /// Open flags per handle: a Linux guest repeats them in every READ and WRITE.
    open_flags: HashMap<u64, u32>,
    warn: WarnLimiter,
}

impl FuseDriver {
    /// A driver for a server of `dir`.
    pub fn for_dir(dir: &Path) -> Result<Self, DriverError> {
        Self::new(Arc::new(FsServer::open(dir).map_err(DriverError::Server)?))
    }

    /// A driver for `server` (FUSE INIT not yet sent).
    pub fn new(server: Arc<FsServer>) -> Result<Self, DriverError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| DriverError::Memory(Box::new(e)))?;
        let size = u64::from(QUEUE_SIZE);
        let desc = GuestAddress(QUEUE_BASE);
        let avail = desc.unchecked_add(16 * size);
        let used = GuestAddress((avail.0 + 6 + 2 * size + 3) & !3);
        let mut queue = Queue::new(QUEUE_SIZE.min(QUEUE_SIZES[1])).map_err(DriverError::Queue)?;
        queue
            .try_set_desc_table_address(desc)
            .map_err(DriverError::Queue)?;
        queue
            .try_set_avail_ring_address(avail)
            .map_err(DriverError::Queue)?;
        queue
            .try_set_used_ring_address(used)
            .map_err(DriverError::Queue)?;
        queue.set_ready(true);
        Ok(Self {
            server,
            mem,
            queue,
            avail_idx: 0,
            unique: 0,
            scratch: Vec::with_capacity(BUF_LEN),
            open_flags: HashMap::new(),
            warn: WarnLimiter::new(),
        })
    }

    /// The guest memory the requests and replies live in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Sends one request: `args` after the header; the reply is read back with
    /// [`reply`](Self::reply) or [`reply_bytes`](Self::reply_bytes).
    /// Returns the reply body's length on success.
    pub fn request(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> Result<usize, Errno> {
        self.request_as(opcode, nodeid, 0, 0, args)
    }

    /// [`request`](Self::request) as guest user `uid`/`gid`.
    pub fn request_as(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        uid: u32,
        gid: u32,
        args: &[&[u8]],
    ) -> Result<usize, Errno> {
        self.unique += 1;
        let is_forget = matches!(opcode, Opcode::Forget | Opcode::BatchForget);
        let body: usize = args.iter().map(|a| a.len()).sum();
        let len = std::mem::size_of::<InHeader>() + body;
        if len > BUF_LEN {
            return Err(libc::E2BIG);
        }
        let header = InHeader {
            len: len as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            padding: 0,
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(header.as_slice());
        for a in args {
            self.scratch.extend_from_slice(a);
        }
        self.mem
            .write_slice(&self.scratch, GuestAddress(REQ_BASE))
            .map_err(|_| -1)?;
        self.submit(len, 0, is_forget)
    }

    /// Offers the request of `len` bytes at the request buffer with the reply
    /// space, has it served, and checks the reply header; returns the body length.
    fn submit(&mut self, len: usize, data_len: u32, is_forget: bool) -> Result<usize, Errno> {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let mut index = 0;
        self.write_desc(index, REQ_BASE, len as u32, NEXT, index + 1);
        if data_len > 0 {
            index += 1;
            self.write_desc(index, REQ_DATA, data_len, NEXT, index + 1);
        }
        index += 1;
        self.write_desc(index, REPLY_HDR, OUT_HEADER_LEN, NEXT | WRITE, index + 1);
        index += 1;
        self.write_desc(index, REPLY_BODY, BUF_LEN as u32, WRITE, 0);
        self.offer(0)?;
        let used_before = self.used_idx()?;
        serve_queue(&self.server, &self.mem, &mut self.queue, &mut self.warn);
        if self.used_idx()? == used_before {
            return Err(-1);
        }
        let slot = u64::from(used_before % QUEUE_SIZE);
        let used_len: u32 = self
            .mem
            .read_obj(self.used_addr().unchecked_add(4 + 8 * slot + 4))
            .map_err(|_| -1)?;
        if is_forget {
            return Ok(0);
        }
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY_HDR)).map_err(|_| -1)?;
        if out.unique != self.unique || out.len != used_len {
            return Err(-1);
        }
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(out.len as usize - std::mem::size_of::<OutHeader>())
    }

    /// The reply body of the last request as a `T`.
    pub fn reply<T: ByteValued>(&self) -> Result<T, Errno> {
        self.mem.read_obj(GuestAddress(REPLY_BODY)).map_err(|_| -1)
    }

    /// The first `len` bytes of the last reply's body.
    pub fn reply_bytes(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let at = GuestAddress(REPLY_BODY);
        if self.mem.read_slice(&mut v, at).is_err() {
            v.clear();
        }
        v
    }

    /// FUSE INIT as a Linux guest sends it.
    pub fn init(&mut self) -> Result<InitOut, Errno> {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 * 1024,
            flags: GUEST_INIT_FLAGS,
        };
        self.request(Opcode::Init, 0, &[init.as_slice()])?;
        self.reply()
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, Errno> {
        self.request(Opcode::Lookup, parent, &[name.as_bytes(), b"\0"])?;
        self.reply()
    }

    pub fn forget(&mut self, inode: u64, nlookup: u64) {
        let _ = self.request(Opcode::Forget, inode, &[ForgetIn { nlookup }.as_slice()]);
    }

    pub fn getattr(&mut self, inode: u64) -> Result<AttrOut, Errno> {
        self.request(Opcode::Getattr, inode, &[GetattrIn::default().as_slice()])?;
        self.reply()
    }

    pub fn setattr(&mut self, inode: u64, setattr: SetattrIn) -> Result<AttrOut, Errno> {
        self.request(Opcode::Setattr, inode, &[setattr.as_slice()])?;
        self.reply()
    }

    pub fn readlink(&mut self, inode: u64) -> Result<Vec<u8>, Errno> {
        let len = self.request(Opcode::Readlink, inode, &[])?;
        Ok(self.reply_bytes(len))
    }

    pub fn open(&mut self, inode: u64, flags: i32) -> Result<u64, Errno> {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.request(Opcode::Open, inode, &[open.as_slice()])?;
        let fh = self.reply::<OpenOut>()?.fh;
        self.open_flags.insert(fh, flags as u32);
        Ok(fh)
    }

    pub fn opendir(&mut self, inode: u64) -> Result<u64, Errno> {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.request(Opcode::Opendir, inode, &[open.as_slice()])?;
        Ok(self.reply::<OpenOut>()?.fh)
    }

    /// Names in a directory opened with [`opendir`](Self::opendir) (one READDIR of
    /// up to 64 KiB; enough for the small directories tests list).
    pub fn readdir_names(&mut self, inode: u64, fh: u64) -> Result<Vec<String>, Errno> {
        let read = ReadIn {
            fh,
            size: 64 * 1024,
            ..Default::default()
        };
        let len = self.request(Opcode::Readdir, inode, &[read.as_slice()])?;
        let bytes = self.reply_bytes(len);
        let mut names = Vec::new();
        let mut at = 0;
        // fuse_dirent: ino u64, off u64, namelen u32, type u32, name, padded to 8.
        while at + 24 <= bytes.len() {
            let namelen = u32::from_le_bytes([
                bytes[at + 16],
                bytes[at + 17],
                bytes[at + 18],
                bytes[at + 19],
            ]) as usize;
            let Some(name) = bytes.get(at + 24..at + 24 + namelen) else {
                break;
            };
            names.push(String::from_utf8_lossy(name).into_owned());
            at += (24 + namelen + 7) & !7;
        }
        Ok(names)
    }

    pub fn release(&mut self, inode: u64, fh: u64) -> Result<(), Errno> {
        self.open_flags.remove(&fh);
        let rel = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Release, inode, &[rel.as_slice()])
            .map(drop)
    }

    pub fn releasedir(&mut self, inode: u64, fh: u64) -> Result<(), Errno> {
        let rel = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Releasedir, inode, &[rel.as_slice()])
            .map(drop)
    }

    /// CREATE: the new entry and its open handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, u64), Errno> {
        let create = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        self.request(
            Opcode::Create,
            parent,
            &[create.as_slice(), name.as_bytes(), b"\0"],
        )?;
        let entry: EntryOut = self.reply()?;
        let open: OpenOut = self
            .mem
            .read_obj(GuestAddress(
                REPLY_BODY + std::mem::size_of::<EntryOut>() as u64,
            ))
            .map_err(|_| -1)?;
        self.open_flags.insert(open.fh, flags as u32);
        Ok((entry, open.fh))
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, Errno> {
        let mkdir = MkdirIn { mode, umask: 0 };
        self.request(
            Opcode::Mkdir,
            parent,
            &[mkdir.as_slice(), name.as_bytes(), b"\0"],
        )?;
        self.reply()
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, Errno> {
        let mknod = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        self.request(
            Opcode::Mknod,
            parent,
            &[mknod.as_slice(), name.as_bytes(), b"\0"],
        )?;
        self.reply()
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<EntryOut, Errno> {
        self.request(
            Opcode::Symlink,
            parent,
            &[name.as_bytes(), b"\0", target.as_bytes(), b"\0"],
        )?;
        self.reply()
    }

    pub fn link(&mut self, inode: u64, newparent: u64, newname: &str) -> Result<EntryOut, Errno> {
        let link = LinkIn { oldnodeid: inode };
        self.request(
            Opcode::Link,
            newparent,
            &[link.as_slice(), newname.as_bytes(), b"\0"],
        )?;
        self.reply()
    }

    pub fn rename(
        &mut self,
        olddir: u64,
        oldname: &str,
        newdir: u64,
        newname: &str,
    ) -> Result<(), Errno> {
        let rename = RenameIn { newdir };
        self.request(
            Opcode::Rename,
            olddir,
            &[
                rename.as_slice(),
                oldname.as_bytes(),
                b"\0",
                newname.as_bytes(),
                b"\0",
            ],
        )
        .map(drop)
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), Errno> {
        self.request(Opcode::Unlink, parent, &[name.as_bytes(), b"\0"])
            .map(drop)
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), Errno> {
        self.request(Opcode::Rmdir, parent, &[name.as_bytes(), b"\0"])
            .map(drop)
    }

    /// READ of up to `size` bytes; returns how many the server put in the reply
    /// (they stay in guest memory: see [`reply_bytes`](Self::reply_bytes)).
    pub fn read_len(
        &mut self,
        inode: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<usize, Errno> {
        let read = ReadIn {
            fh,
            offset,
            size,
            flags: self.open_flags.get(&fh).copied().unwrap_or(0),
            ..Default::default()
        };
        self.request(Opcode::Read, inode, &[read.as_slice()])
    }

    /// READ, copied out of guest memory.
    pub fn read(&mut self, inode: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let len = self.read_len(inode, fh, offset, size)?;
        Ok(self.reply_bytes(len))
    }

    pub fn write(&mut self, inode: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let write = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            flags: self.open_flags.get(&fh).copied().unwrap_or(0),
            ..Default::default()
        };
        self.request(Opcode::Write, inode, &[write.as_slice(), data])?;
        Ok(self.reply::<WriteOut>()?.size)
    }

    /// Puts `data` where the payload of a WRITE goes, for
    /// [`write_prepared`](Self::write_prepared): a guest's data is already in guest
    /// memory, so a benchmark should not copy it there for every request.
    pub fn prepare_write_payload(&mut self, data: &[u8]) -> Result<(), Errno> {
        if data.len() > MAX_IO {
            return Err(libc::E2BIG);
        }
        self.mem
            .write_slice(data, GuestAddress(REQ_DATA))
            .map_err(|_| -1)
    }

    /// WRITE of the first `len` bytes put in place by
    /// [`prepare_write_payload`](Self::prepare_write_payload).
    pub fn write_prepared(
        &mut self,
        inode: u64,
        fh: u64,
        offset: u64,
        len: u32,
    ) -> Result<u32, Errno> {
        if len as usize > MAX_IO {
            return Err(libc::E2BIG);
        }
        self.unique += 1;
        let total = std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>() + len as usize;
        let header = InHeader {
            len: total as u32,
            opcode: Opcode::Write as u32,
            unique: self.unique,
            nodeid: inode,
            pid: 1,
            ..Default::default()
        };
        let write = WriteIn {
            fh,
            offset,
            size: len,
            flags: self.open_flags.get(&fh).copied().unwrap_or(0),
            ..Default::default()
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(header.as_slice());
        self.scratch.extend_from_slice(write.as_slice());
        self.mem
            .write_slice(&self.scratch, GuestAddress(REQ_BASE))
            .map_err(|_| -1)?;
        let args = std::mem::size_of::<InHeader>() + std::mem::size_of::<WriteIn>();
        self.submit(args, len, false)?;
        Ok(self.reply::<WriteOut>()?.size)
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = GuestAddress(QUEUE_BASE + 16 * u64::from(index));
        // Inside the fixed layout, so it cannot fail; a failure shows up as a
        // malformed chain the server refuses.
        let _ = self.mem.write_slice(&raw, at);
    }

    fn avail_addr(&self) -> GuestAddress {
        GuestAddress(QUEUE_BASE + 16 * u64::from(QUEUE_SIZE))
    }

    fn used_addr(&self) -> GuestAddress {
        GuestAddress((self.avail_addr().0 + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3)
    }

    fn offer(&mut self, head: u16) -> Result<(), Errno> {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        let avail = self.avail_addr();
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .map_err(|_| -1)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, avail.unchecked_add(2))
            .map_err(|_| -1)
    }

    fn used_idx(&self) -> Result<u16, Errno> {
        self.mem
            .read_obj(self.used_addr().unchecked_add(2))
            .map_err(|_| -1)
    }
}
