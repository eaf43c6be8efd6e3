//! The virtio-fs server with the test as the guest: FUSE requests as descriptor
//! chains in plain guest memory ([`FuseDriver`]), the host side checked with plain
//! syscalls; and the device behind the real MMIO transport.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, InitOut, OutHeader, SetattrIn};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bench::{FuseDriver, ROOT_ID};
use super::event_loop::serve_queue;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{guest_memory, poll_readable, Buf, TestDir, TestQueue};
use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

/// A share inside a test directory, so escapes land somewhere the test can look:
/// `<test dir>/outside/secret` is what a confined guest must never reach.
struct Share {
    top: TestDir,
    dir: PathBuf,
}

impl Share {
    fn new(tag: &str) -> Self {
        let top = TestDir::new(tag);
        let dir = top.0.join("share");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(top.0.join("outside")).unwrap();
        std::fs::write(top.0.join("outside/secret"), b"host secret").unwrap();
        std::fs::set_permissions(
            top.0.join("outside/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Self { top, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn outside(&self) -> PathBuf {
        self.top.0.join("outside")
    }

    fn driver(&self) -> FuseDriver {
        let mut d = FuseDriver::for_dir(&self.dir).unwrap();
        d.init().unwrap();
        d
    }

    /// The outside directory is untouched: same single file, same bytes and mode.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(self.outside())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"], "nothing new outside the share");
        let secret = self.outside().join("secret");
        assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");
        assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o7777, 0o600);
        let top: Vec<_> = std::fs::read_dir(&self.top.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut top = top;
        top.sort();
        assert_eq!(top, ["outside", "share"], "nothing new beside the share");
    }
}

fn is_symlink_mode(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

#[test]
fn init_offers_big_requests_and_refuses_writeback_caching() {
    let share = Share::new("fs-init");
    let mut d = FuseDriver::for_dir(&share.dir).unwrap();
    let out = d.init().unwrap();
    assert_eq!(out.major, 7);
    const WRITEBACK_CACHE: u32 = 0x1_0000;
    const MAX_PAGES: u32 = 0x40_0000;
    const AUTO_INVAL_DATA: u32 = 0x1000;
    assert_eq!(out.flags & WRITEBACK_CACHE, 0, "writeback caching refused");
    assert_ne!(out.flags & MAX_PAGES, 0);
    assert_ne!(out.flags & AUTO_INVAL_DATA, 0);
    assert_eq!(out.max_write, 1 << 20, "1 MiB writes");
    assert_eq!(out.max_pages, 256);
}

#[test]
fn files_round_trip_between_guest_and_host() {
    let share = Share::new("fs-rt");
    std::fs::write(share.path("from-host"), b"written on the host").unwrap();
    let mut d = share.driver();

    let e = d.lookup(ROOT_ID, "from-host").unwrap();
    assert_eq!(e.attr.size, 19);
    assert_eq!(e.entry_valid, 1, "1 s entry timeout");
    assert_eq!(e.attr_valid, 1, "1 s attribute timeout");
    let attr = d.getattr(e.nodeid).unwrap();
    assert_eq!(
        attr.attr.ino,
        std::fs::metadata(share.path("from-host")).unwrap().ino()
    );
    let fh = d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        d.read(e.nodeid, fh, 0, 4096).unwrap(),
        b"written on the host"
    );
    assert_eq!(d.read(e.nodeid, fh, 11, 4).unwrap(), b"the ");
    d.release(e.nodeid, fh).unwrap();

    // The guest's mode bits arrive exactly (the server thread's umask is 0) while
    // the process umask stays as it was.
    // SAFETY: umask only reads and resets this thread's (process's) mask.
    let process_umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    let (c, fh) = d
        .create(ROOT_ID, "from-guest", 0o666, libc::O_WRONLY)
        .unwrap();
    assert_eq!(
        d.write(c.nodeid, fh, 0, b"written in the guest").unwrap(),
        20
    );
    d.release(c.nodeid, fh).unwrap();
    let meta = std::fs::metadata(share.path("from-guest")).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o777, 0o666);
    assert_eq!(
        std::fs::read(share.path("from-guest")).unwrap(),
        b"written in the guest"
    );
    // SAFETY: as above.
    let after = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    assert_eq!(after, process_umask, "the process umask is untouched");

    let dir = d.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    assert!(share.path("sub").is_dir());
    let (f, fh) = d.create(dir.nodeid, "nested", 0o644, libc::O_RDWR).unwrap();
    d.write(f.nodeid, fh, 0, b"x").unwrap();
    d.release(f.nodeid, fh).unwrap();
    assert_eq!(std::fs::read(share.path("sub/nested")).unwrap(), b"x");
    d.rename(dir.nodeid, "nested", ROOT_ID, "moved").unwrap();
    assert_eq!(std::fs::read(share.path("moved")).unwrap(), b"x");
    d.unlink(ROOT_ID, "moved").unwrap();
    d.rmdir(ROOT_ID, "sub").unwrap();
    assert!(!share.path("moved").exists() && !share.path("sub").exists());

    // A change on the host is what the guest reads next.
    std::fs::write(share.path("from-host"), b"changed").unwrap();
    let e2 = d.lookup(ROOT_ID, "from-host").unwrap();
    assert_eq!(e2.attr.size, 7);
    let fh = d.open(e2.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(e2.nodeid, fh, 0, 4096).unwrap(), b"changed");
    d.release(e2.nodeid, fh).unwrap();
    // A name the host adds is found (no negative entry was cached by the server).
    assert_eq!(d.lookup(ROOT_ID, "later").unwrap_err(), libc::ENOENT);
    std::fs::write(share.path("later"), b"").unwrap();
    assert!(d.lookup(ROOT_ID, "later").is_ok());
    share.assert_outside_untouched();
}

#[test]
fn dotdot_of_the_root_is_the_root_and_refused_elsewhere() {
    let share = Share::new("fs-dotdot");
    std::fs::create_dir(share.path("sub")).unwrap();
    let mut d = share.driver();
    let root_ino = std::fs::metadata(&share.dir).unwrap().ino();

    for name in ["..", "."] {
        let up = d.lookup(ROOT_ID, name).unwrap();
        assert_eq!(up.nodeid, ROOT_ID, "`{name}` of the root is the root");
        assert_eq!(up.attr.ino, root_ino);
    }
    let sub = d.lookup(ROOT_ID, "sub").unwrap();
    assert_eq!(d.lookup(sub.nodeid, "..").unwrap_err(), libc::EPERM);
    assert_eq!(d.lookup(sub.nodeid, ".").unwrap_err(), libc::EPERM);
    // Even after the host moves the directory out of the share, the guest cannot
    // walk up from it into the host's tree.
    std::fs::rename(share.path("sub"), share.top.0.join("moved-out")).unwrap();
    assert_eq!(d.lookup(sub.nodeid, "..").unwrap_err(), libc::EPERM);
    std::fs::rename(share.top.0.join("moved-out"), share.path("sub")).unwrap();

    for name in ["../outside", "../../etc", "/etc", "sub/..", ""] {
        assert_eq!(
            d.lookup(ROOT_ID, name).unwrap_err(),
            libc::EINVAL,
            "lookup of `{name}`"
        );
    }
    share.assert_outside_untouched();
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let share = Share::new("fs-symlink");
    let secret = share.outside().join("secret");
    let links = [
        ("abs-etc", PathBuf::from("/etc")),
        ("rel-up", PathBuf::from("../../..")),
        ("rel-outside", PathBuf::from("../outside")),
        ("abs-secret", secret.clone()),
        ("proc-fd", PathBuf::from("/proc/self/fd")),
        ("proc-root", PathBuf::from("/proc/self/root")),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, share.path(name)).unwrap();
    }
    let mut d = share.driver();
    for (name, target) in &links {
        let e = d.lookup(ROOT_ID, name).unwrap();
        assert!(
            is_symlink_mode(e.attr.mode),
            "{name}: the inode is the link"
        );
        assert_eq!(
            d.readlink(e.nodeid).unwrap(),
            target.as_os_str().as_encoded_bytes(),
            "{name}: readlink gives the text"
        );
        for child in ["passwd", "secret", "0", "etc"] {
            assert_eq!(
                d.lookup(e.nodeid, child).unwrap_err(),
                libc::ENOTDIR,
                "{name}/{child} must not resolve through the link"
            );
        }
        assert!(d.open(e.nodeid, libc::O_RDONLY).is_err(), "{name}: open");
        assert!(d.open(e.nodeid, libc::O_RDWR | libc::O_TRUNC).is_err());
        assert!(d.opendir(e.nodeid).is_err(), "{name}: opendir");
        // Attribute changes land on the link, never on its target.
        let chmod = SetattrIn {
            valid: 0x1, // FATTR_MODE
            mode: 0o777,
            ..Default::default()
        };
        let _ = d.setattr(e.nodeid, chmod);
        let truncate = SetattrIn {
            valid: 0x8, // FATTR_SIZE
            size: 0,
            ..Default::default()
        };
        assert!(d.setattr(e.nodeid, truncate).is_err(), "{name}: truncate");
        let times = SetattrIn {
            valid: 0x10 | 0x20, // FATTR_ATIME | FATTR_MTIME
            atime: 1,
            mtime: 1,
            ..Default::default()
        };
        let _ = d.setattr(e.nodeid, times);
    }
    assert_ne!(
        std::fs::metadata(&secret).unwrap().mtime(),
        1,
        "target's times untouched"
    );
    // A link the guest makes is stored as text, whatever it names.
    let made = d.symlink(ROOT_ID, "guest-link", "/etc/shadow").unwrap();
    assert!(is_symlink_mode(made.attr.mode));
    assert_eq!(
        std::fs::read_link(share.path("guest-link")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert!(d.open(made.nodeid, libc::O_RDONLY).is_err());
    // A hard link of a symlink is another link, not the target.
    let hard = d.link(made.nodeid, ROOT_ID, "hard").unwrap();
    assert!(is_symlink_mode(hard.attr.mode));
    // CREATE over an existing symlink does not open (or create) its target.
    assert!(d
        .create(ROOT_ID, "abs-secret", 0o644, libc::O_RDWR | libc::O_TRUNC)
        .is_err());
    assert!(d
        .create(ROOT_ID, "rel-outside", 0o644, libc::O_RDWR)
        .is_err());
    share.assert_outside_untouched();
}

#[test]
fn a_directory_swapped_for_a_symlink_after_lookup_is_not_followed() {
    let share = Share::new("fs-race");
    std::fs::create_dir(share.path("d")).unwrap();
    std::fs::write(share.path("d/inside"), b"in the share").unwrap();
    std::fs::write(share.path("f"), b"original file").unwrap();
    let mut d = share.driver();
    let dir = d.lookup(ROOT_ID, "d").unwrap();
    let file = d.lookup(ROOT_ID, "f").unwrap();

    // The host (or a racing guest thread) swaps both names for symlinks out.
    std::fs::rename(share.path("d"), share.path("d.old")).unwrap();
    std::os::unix::fs::symlink(share.outside(), share.path("d")).unwrap();
    std::fs::rename(share.path("f"), share.path("f.old")).unwrap();
    std::os::unix::fs::symlink(share.outside().join("secret"), share.path("f")).unwrap();

    let fh = d.opendir(dir.nodeid).unwrap();
    assert_eq!(d.readdir_names(dir.nodeid, fh).unwrap(), ["inside"]);
    d.releasedir(dir.nodeid, fh).unwrap();
    assert_eq!(d.lookup(dir.nodeid, "secret").unwrap_err(), libc::ENOENT);
    let (c, cfh) = d.create(dir.nodeid, "new", 0o644, libc::O_RDWR).unwrap();
    d.release(c.nodeid, cfh).unwrap();
    assert!(
        share.path("d.old/new").exists(),
        "created in the looked-up dir"
    );

    let fh = d.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(file.nodeid, fh, 0, 100).unwrap(), b"original file");
    d.release(file.nodeid, fh).unwrap();

    // A fresh lookup sees the symlinks, which lead nowhere.
    let now = d.lookup(ROOT_ID, "d").unwrap();
    assert!(is_symlink_mode(now.attr.mode));
    assert_eq!(d.lookup(now.nodeid, "secret").unwrap_err(), libc::ENOTDIR);
    let now = d.lookup(ROOT_ID, "f").unwrap();
    assert!(d.open(now.nodeid, libc::O_RDONLY).is_err());
    share.assert_outside_untouched();
}

#[test]
fn racing_a_directory_against_a_symlink_never_reaches_outside() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let share = Share::new("fs-race-loop");
    let elsewhere = share.top.0.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("f"), b"OUTSIDE").unwrap();
    std::fs::create_dir(share.path("d")).unwrap();
    std::fs::write(share.path("d/f"), b"inside").unwrap();
    let mut d = share.driver();

    // The host flips `d` between the directory and a symlink to `elsewhere` as fast
    // as it can while the guest looks up, opens, reads and creates through it.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, dir, elsewhere) = (stop.clone(), share.dir.clone(), elsewhere.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::rename(dir.join("d"), dir.join("d.tmp")).unwrap();
                std::os::unix::fs::symlink(&elsewhere, dir.join("d")).unwrap();
                std::fs::remove_file(dir.join("d")).unwrap();
                std::fs::rename(dir.join("d.tmp"), dir.join("d")).unwrap();
                flips += 1;
            }
            flips
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut through_dir, mut refused) = (0u32, 0u32);
    for i in 0.. {
        if Instant::now() > deadline {
            break;
        }
        let Ok(e) = d.lookup(ROOT_ID, "d") else {
            refused += 1;
            continue;
        };
        if let Ok(f) = d.lookup(e.nodeid, "f") {
            if let Ok(fh) = d.open(f.nodeid, libc::O_RDONLY) {
                let data = d.read(f.nodeid, fh, 0, 64).unwrap();
                assert_eq!(data, b"inside", "read through the symlink");
                d.release(f.nodeid, fh).unwrap();
                through_dir += 1;
            }
        } else {
            refused += 1;
        }
        if let Ok((c, fh)) = d.create(e.nodeid, &format!("new-{i}"), 0o644, libc::O_RDWR) {
            d.release(c.nodeid, fh).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(
        flips > 10 && through_dir > 0,
        "the race ran ({flips} flips, {through_dir} reads)"
    );
    eprintln!("{flips} flips, {through_dir} reads inside, {refused} lookups refused");
    let mut names: Vec<_> = std::fs::read_dir(&elsewhere)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["f"], "nothing was created outside");
    assert_eq!(std::fs::read(elsewhere.join("f")).unwrap(), b"OUTSIDE");
}

#[test]
fn names_that_are_not_one_component_are_refused_everywhere() {
    let share = Share::new("fs-names");
    std::fs::write(share.path("x"), b"x").unwrap();
    let mut d = share.driver();
    let x = d.lookup(ROOT_ID, "x").unwrap();
    for bad in ["..", ".", "../escaped", "a/b", "/tmp/escaped"] {
        assert_eq!(
            d.mkdir(ROOT_ID, bad, 0o755).unwrap_err(),
            libc::EINVAL,
            "mkdir {bad}"
        );
        assert_eq!(
            d.create(ROOT_ID, bad, 0o644, libc::O_RDWR).unwrap_err(),
            libc::EINVAL,
            "create {bad}"
        );
        assert_eq!(
            d.mknod(ROOT_ID, bad, libc::S_IFIFO | 0o644, 0).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(d.symlink(ROOT_ID, bad, "x").unwrap_err(), libc::EINVAL);
        assert_eq!(d.link(x.nodeid, ROOT_ID, bad).unwrap_err(), libc::EINVAL);
        assert_eq!(
            d.rename(ROOT_ID, "x", ROOT_ID, bad).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            d.rename(ROOT_ID, bad, ROOT_ID, "y").unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(d.unlink(ROOT_ID, bad).unwrap_err(), libc::EINVAL);
        assert_eq!(d.rmdir(ROOT_ID, bad).unwrap_err(), libc::EINVAL);
    }
    assert_eq!(std::fs::read(share.path("x")).unwrap(), b"x");
    assert!(!Path::new("/tmp/escaped").exists());
    share.assert_outside_untouched();
}

#[test]
fn device_nodes_cannot_be_made_and_special_files_are_never_opened() {
    let share = Share::new("fs-mknod");
    let mut d = share.driver();
    let null = libc::makedev(1, 3) as u32;
    assert_eq!(
        d.mknod(ROOT_ID, "null", libc::S_IFCHR | 0o666, null)
            .unwrap_err(),
        libc::EPERM
    );
    assert_eq!(
        d.mknod(
            ROOT_ID,
            "sda",
            libc::S_IFBLK | 0o666,
            libc::makedev(8, 0) as u32
        )
        .unwrap_err(),
        libc::EPERM
    );
    assert!(!share.path("null").exists() && !share.path("sda").exists());

    let fifo = d.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    assert!(std::fs::metadata(share.path("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Opening a FIFO would block the server thread; it is refused at once.
    assert!(d.open(fifo.nodeid, libc::O_RDONLY).is_err());

    // A device node the host put in the share is not opened either.
    let path =
        std::ffi::CString::new(share.path("hostnull").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `path` is a valid C string; mknod only creates the node.
    let made = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made == 0 {
        let e = d.lookup(ROOT_ID, "hostnull").unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFCHR);
        assert!(d.open(e.nodeid, libc::O_RDWR).is_err());
    } else {
        eprintln!("skipped the host device node part: mknod needs CAP_MKNOD");
    }
    share.assert_outside_untouched();
}

/// Unmounts on drop, so a failing assertion leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let p = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `p` is a valid C string; umount2 only detaches that mount.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_mount_added_under_the_share_after_start_is_visible() {
    let share = Share::new("fs-mount");
    std::fs::create_dir(share.path("vol")).unwrap();
    let mut d = share.driver();
    let before = d.lookup(ROOT_ID, "vol").unwrap();

    let target = std::ffi::CString::new(share.path("vol").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: all pointers are valid C strings for the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipped: cannot mount tmpfs ({}); needs root",
            std::io::Error::last_os_error()
        );
        return;
    }
    let _mounted = Mounted(share.path("vol"));
    std::fs::write(share.path("vol/from-host-mount"), b"mounted after start").unwrap();

    let after = d.lookup(ROOT_ID, "vol").unwrap();
    assert_ne!(
        after.nodeid, before.nodeid,
        "the mount's root is a new inode"
    );
    let f = d.lookup(after.nodeid, "from-host-mount").unwrap();
    let fh = d.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        d.read(f.nodeid, fh, 0, 100).unwrap(),
        b"mounted after start"
    );
    d.release(f.nodeid, fh).unwrap();
    // The guest can write into the mount too, and its root's `..` is not answered.
    let (c, cfh) = d
        .create(after.nodeid, "from-guest", 0o644, libc::O_RDWR)
        .unwrap();
    d.release(c.nodeid, cfh).unwrap();
    assert!(share.path("vol/from-guest").exists());
    assert_eq!(d.lookup(after.nodeid, "..").unwrap_err(), libc::EPERM);
}

#[test]
fn share_setup_names_the_bad_input() {
    let share = Share::new("fs-bad");
    let missing = share.path("missing");
    let err = Fs::new("t", &missing).err().unwrap();
    assert!(matches!(err, FsError::NoDirectory(ref p) if *p == missing));
    assert!(err.is_bad_input());
    assert!(err.to_string().contains("does not exist"), "{err}");
    std::fs::write(share.path("file"), b"").unwrap();
    let err = Fs::new("t", &share.path("file")).err().unwrap();
    assert!(matches!(err, FsError::NotADirectory(_)));
    assert!(err.to_string().contains("not a directory"), "{err}");
    for tag in ["", &"x".repeat(TAG_LEN + 1)] {
        assert!(matches!(
            Fs::new(tag, &share.dir).err().unwrap(),
            FsError::BadTag(_)
        ));
    }
}

#[test]
fn malformed_requests_come_back_empty_and_the_server_keeps_serving() {
    use crate::devices::virtio::mmio::WarnLimiter;

    let share = Share::new("fs-malformed");
    let server = FsServer::open(&share.dir).unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut tq = TestQueue::new(&mem, GuestAddress(0x1000), 16);
    let mut queue = tq.create_queue();
    let mut warn = WarnLimiter::new();
    let reply = GuestAddress(0x20_0000);
    let writable = Buf {
        addr: reply,
        len: 4096,
        write: true,
    };
    let req = GuestAddress(0x10_0000);
    let init = {
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32,
            opcode: 26,
            unique: 7,
            ..Default::default()
        };
        let mut b = header.as_slice().to_vec();
        b.extend_from_slice(
            InitIn {
                major: 7,
                minor: 31,
                ..Default::default()
            }
            .as_slice(),
        );
        b
    };
    let cases: [(&str, Vec<Buf>, &[u8]); 4] = [
        (
            "request outside guest memory",
            vec![
                Buf {
                    addr: GuestAddress(MEM_SIZE as u64 + 0x1000),
                    len: 64,
                    write: false,
                },
                writable,
            ],
            b"",
        ),
        (
            "header cut short",
            vec![
                Buf {
                    addr: req,
                    len: 8,
                    write: false,
                },
                writable,
            ],
            &[0xff; 8],
        ),
        (
            "no reply space",
            vec![Buf {
                addr: req,
                len: init.len() as u32,
                write: false,
            }],
            &init,
        ),
        (
            "lookup name without its NUL",
            vec![
                Buf {
                    addr: req,
                    len: 44,
                    write: false,
                },
                writable,
            ],
            &{
                let mut b = InHeader {
                    len: 44,
                    opcode: 1,
                    nodeid: 1,
                    ..Default::default()
                }
                .as_slice()
                .to_vec();
                b.extend_from_slice(b"../e");
                b
            },
        ),
    ];
    for (what, bufs, bytes) in cases {
        if !bytes.is_empty() {
            mem.write_slice(bytes, req).unwrap();
        }
        let before = tq.used_idx();
        tq.add_chain(&bufs);
        assert!(serve_queue(&server, &mem, &mut queue, &mut warn), "{what}");
        assert_eq!(tq.used_idx(), before.wrapping_add(1), "{what}: returned");
        let (_, len) = tq.used_elem(before);
        if len > 0 {
            let out: OutHeader = mem.read_obj(reply).unwrap();
            assert!(out.error < 0, "{what}: only an error reply");
        }
    }
    // A good request after all that is served.
    mem.write_slice(&init, req).unwrap();
    let before = tq.used_idx();
    tq.add_chain(&[
        Buf {
            addr: req,
            len: init.len() as u32,
            write: false,
        },
        writable,
    ]);
    serve_queue(&server, &mem, &mut queue, &mut warn);
    let (_, len) = tq.used_elem(before);
    let out: OutHeader = mem.read_obj(reply).unwrap();
    assert_eq!((out.unique, out.error, out.len), (7, 0, len));
    share.assert_outside_untouched();
}

// The device behind the MMIO transport.

const MEM_SIZE: usize = 0x40_0000;
const WAIT: Duration = Duration::from_secs(5);

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn device_config_space_holds_the_tag_and_one_request_queue() {
    let share = Share::new("fs-cfg");
    let dev = Arc::new(Mutex::new(Fs::new("pod-share", &share.dir).unwrap()));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(guest_memory(MEM_SIZE), dev, irq).unwrap();
    assert_eq!(r(&mut t, 0x8), VIRTIO_ID_FS);
    w(&mut t, 0x14, 1);
    assert_eq!(r(&mut t, 0x10), 1, "VIRTIO_F_VERSION_1 only");
    for (q, size) in QUEUE_SIZES.iter().enumerate() {
        w(&mut t, 0x30, q as u32);
        assert_eq!(r(&mut t, 0x34), u32::from(*size));
    }
    w(&mut t, 0x30, 2);
    assert_eq!(r(&mut t, 0x34), 0, "hiprio + one request queue");
    // Drivers read config space 4 bytes at a time.
    let mut cfg = [0xffu8; TAG_LEN + 4];
    for (i, word) in cfg.chunks_mut(4).enumerate() {
        t.read(0x100 + 4 * i as u64, word);
    }
    let mut tag = [0u8; TAG_LEN];
    tag[..9].copy_from_slice(b"pod-share");
    assert_eq!(cfg[..TAG_LEN], tag);
    assert_eq!(cfg[TAG_LEN..], 1u32.to_le_bytes());
}

#[test]
fn device_answers_fuse_init_on_the_request_queue() {
    let share = Share::new("fs-dev");
    let dev = Arc::new(Mutex::new(Fs::new("t", &share.dir).unwrap()));
    let mem = guest_memory(MEM_SIZE);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), dev.clone(), irq.try_clone().unwrap()).unwrap();
    let hiprio = TestQueue::new(&mem, GuestAddress(0x1000), 16);
    let mut requests = TestQueue::new(&mem, GuestAddress(0x4000), 16);
    w(&mut t, 0x70, 1);
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 0xb);
    for (index, q) in [&hiprio, &requests].into_iter().enumerate() {
        w(&mut t, 0x30, index as u32);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, q.desc.0 as u32);
        w(&mut t, 0x90, q.avail.0 as u32);
        w(&mut t, 0xa0, q.used.0 as u32);
        w(&mut t, 0x44, 1);
    }
    w(&mut t, 0x70, 0xf);
    assert_eq!(r(&mut t, 0x70), 0xf);
    assert!(dev.lock().unwrap().is_active());

    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32,
        opcode: 26, // FUSE_INIT
        unique: 42,
        ..Default::default()
    };
    let req = GuestAddress(0x10_0000);
    let reply = GuestAddress(0x20_0000);
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(init.as_slice());
    mem.write_slice(&bytes, req).unwrap();
    let head = requests.add_chain(&[
        Buf {
            addr: req,
            len: bytes.len() as u32,
            write: false,
        },
        Buf {
            addr: reply,
            len: 4096,
            write: true,
        },
    ]);
    w(&mut t, 0x50, 1);
    let deadline = Instant::now() + WAIT;
    while requests.used_idx() == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no reply within {WAIT:?}");
        poll_readable(irq.as_raw_fd(), left.as_millis().min(50) as i32);
    }
    let (id, len) = requests.used_elem(0);
    assert_eq!(id, u32::from(head));
    let out: OutHeader = mem.read_obj(reply).unwrap();
    assert_eq!((out.unique, out.error), (42, 0));
    assert_eq!(out.len, len);
    let init_out: InitOut = mem.read_obj(GuestAddress(reply.0 + 16)).unwrap();
    assert_eq!(init_out.major, 7);
    assert_ne!(
        t.interrupt_status()
            .load(std::sync::atomic::Ordering::SeqCst)
            & VIRTIO_MMIO_INT_VRING,
        0
    );
    // Reset stops the thread; the device can start again.
    w(&mut t, 0x70, 0);
    assert!(!dev.lock().unwrap().is_active());
}

#[test]
fn lookups_of_held_files_share_one_inode_and_forget_counts_every_reference() {
    let share = Share::new("fs-held");
    std::fs::create_dir(share.path("sub")).unwrap();
    std::fs::write(share.path("sub/f"), b"held").unwrap();
    let mut d = share.driver();
    let sub = d.lookup(ROOT_ID, "sub").unwrap();
    let first = d.lookup(sub.nodeid, "f").unwrap();
    // Answered from the held inode: same node, the host's current attributes.
    std::fs::write(share.path("sub/f"), b"held, longer").unwrap();
    let again = d.lookup(sub.nodeid, "f").unwrap();
    assert_eq!(again.nodeid, first.nodeid);
    assert_eq!(again.attr.size, 12);
    assert_eq!((again.entry_valid, again.attr_valid), (1, 1));
    let third = d.lookup(sub.nodeid, "f").unwrap();
    assert_eq!(third.nodeid, first.nodeid);

    // Three references: dropping two keeps the inode usable...
    d.forget(first.nodeid, 2);
    assert_eq!(d.getattr(first.nodeid).unwrap().attr.size, 12);
    // ...dropping the last one ends it in the passthrough file system too.
    d.forget(first.nodeid, 1);
    assert!(d.getattr(first.nodeid).is_err(), "forgotten inode still served");
    // The name is looked up afresh afterwards.
    let fresh = d.lookup(sub.nodeid, "f").unwrap();
    assert_eq!(fresh.attr.size, 12);
    let fh = d.open(fresh.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(fresh.nodeid, fh, 0, 100).unwrap(), b"held, longer");
    d.release(fresh.nodeid, fh).unwrap();

    // Unknown names and missing parents behave as before.
    assert_eq!(d.lookup(sub.nodeid, "nope").unwrap_err(), libc::ENOENT);
    assert_eq!(d.lookup(fresh.nodeid, "x").unwrap_err(), libc::ENOTDIR);
}

#[test]
fn a_held_name_replaced_on_the_host_gives_the_new_file_or_the_link_itself() {
    let share = Share::new("fs-held-swap");
    std::fs::write(share.path("f"), b"old").unwrap();
    std::fs::write(share.path("g"), b"other").unwrap();
    let mut d = share.driver();
    let old = d.lookup(ROOT_ID, "f").unwrap();
    let other = d.lookup(ROOT_ID, "g").unwrap();

    // A new file under the held name: a new inode, not the held one.
    std::fs::rename(share.path("f"), share.path("f.old")).unwrap();
    std::fs::write(share.path("f"), b"new file").unwrap();
    let new = d.lookup(ROOT_ID, "f").unwrap();
    assert_ne!(new.nodeid, old.nodeid);
    assert_eq!(new.attr.size, 8);
    // A hard link to a held file is that file.
    std::fs::hard_link(share.path("g"), share.path("g2")).unwrap();
    assert_eq!(d.lookup(ROOT_ID, "g2").unwrap().nodeid, other.nodeid);
    // A symlink out under a held name is the link itself, never its target.
    std::fs::remove_file(share.path("g")).unwrap();
    std::os::unix::fs::symlink(share.outside().join("secret"), share.path("g")).unwrap();
    let link = d.lookup(ROOT_ID, "g").unwrap();
    assert!(is_symlink_mode(link.attr.mode));
    assert_ne!(link.nodeid, other.nodeid);
    assert!(d.open(link.nodeid, libc::O_RDONLY).is_err());
    share.assert_outside_untouched();
}

#[test]
fn a_held_file_opens_by_its_handle_and_every_handle_op_works_on_it() {
    let share = Share::new("fs-own-open");
    std::fs::write(share.path("f"), b"0123456789").unwrap();
    let mut d = share.driver();
    let e = d.lookup(ROOT_ID, "f").unwrap();
    let fh = d.open(e.nodeid, libc::O_RDWR).unwrap();
    assert!(fh >> 63 == 1, "OPEN of a held file goes by its handle ({fh:#x})");
    assert_eq!(d.read(e.nodeid, fh, 2, 4).unwrap(), b"2345");
    assert_eq!(d.write(e.nodeid, fh, 10, b"AB").unwrap(), 2);
    // Truncate through the open file (FATTR_SIZE | FATTR_FH).
    let truncate = SetattrIn {
        valid: 0x8 | 0x40,
        fh,
        size: 4,
        ..Default::default()
    };
    assert_eq!(d.setattr(e.nodeid, truncate).unwrap().attr.size, 4);
    assert_eq!(std::fs::read(share.path("f")).unwrap(), b"0123");
    d.release(e.nodeid, fh).unwrap();
    // A released or made-up handle of ours is EBADF, not a crash.
    assert_eq!(d.read(e.nodeid, fh, 0, 4).unwrap_err(), libc::EBADF);
    assert_eq!(d.release(e.nodeid, fh | 0x1234).unwrap_err(), libc::EBADF);

    // The handle names the inode, not the name: a file renamed away and replaced by
    // a symlink out is still the file the guest looked up; the link is never opened.
    std::fs::rename(share.path("f"), share.path("f.moved")).unwrap();
    std::os::unix::fs::symlink(share.outside().join("secret"), share.path("f")).unwrap();
    let fh = d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(e.nodeid, fh, 0, 100).unwrap(), b"0123");
    d.release(e.nodeid, fh).unwrap();
    // Once forgotten and deleted, the inode is gone: OPEN fails instead of reaching
    // whatever reuses the inode number.
    d.forget(e.nodeid, 1);
    std::fs::remove_file(share.path("f.moved")).unwrap();
    assert!(d.open(e.nodeid, libc::O_RDONLY).is_err());
    share.assert_outside_untouched();
}

fn mount(source: &Path, target: &Path, fstype: Option<&std::ffi::CStr>, flags: libc::c_ulong) -> Mounted {
    let src = std::ffi::CString::new(source.as_os_str().as_encoded_bytes()).unwrap();
    let dst = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: all pointers are valid C strings (or null) for the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.map_or(std::ptr::null(), |t| t.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {} on {}: {} (this test needs root)",
        source.display(),
        target.display(),
        std::io::Error::last_os_error()
    );
    Mounted(target.to_path_buf())
}

#[test]
fn a_file_bind_mounted_from_another_file_system_opens_through_passthrough() {
    let share = Share::new("fs-own-bind");
    std::fs::write(share.path("target"), b"").unwrap();
    let other = share.top.0.join("other-fs");
    std::fs::create_dir(&other).unwrap();
    let _tmpfs = mount(Path::new("tmpfs"), &other, Some(c"tmpfs"), 0);
    std::fs::write(other.join("file"), b"on tmpfs").unwrap();
    let _bind = mount(&other.join("file"), &share.path("target"), None, libc::MS_BIND);
    let mut d = share.driver();
    let e = d.lookup(ROOT_ID, "target").unwrap();
    let fh = d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert!(fh >> 63 == 0, "another file system: PassthroughFs's own OPEN");
    assert_eq!(d.read(e.nodeid, fh, 0, 100).unwrap(), b"on tmpfs");
    d.release(e.nodeid, fh).unwrap();

    // A read-only bind mount of a file from the share's own file system (a readOnly
    // volume): the handle must not reopen it through the share's writable mount.
    std::fs::write(share.path("src"), b"keep").unwrap();
    std::fs::write(share.path("ro"), b"").unwrap();
    let _ro = mount(&share.path("src"), &share.path("ro"), None, libc::MS_BIND);
    let _remount = mount(
        Path::new("none"),
        &share.path("ro"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
    );
    let ro = d.lookup(ROOT_ID, "ro").unwrap();
    assert_eq!(d.open(ro.nodeid, libc::O_RDWR).unwrap_err(), libc::EROFS);
    assert_eq!(std::fs::read(share.path("src")).unwrap(), b"keep");
}
