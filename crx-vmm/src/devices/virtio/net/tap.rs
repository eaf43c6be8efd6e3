//! The tap file descriptor: opening one ([`open_tap`]), checking an inherited one
//! ([`Tap::from_inherited_fd`]), and the ioctls that set it up for virtio-net.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{NetError, VNET_HDR_LEN};

// <linux/if_tun.h>: _IOW('T', 202, int) and friends.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TUN: u16 = 0x0001;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
/// The mode crx-vmm needs: Ethernet frames, no packet-info prefix, a vnet header.
pub const TAP_FLAGS: u16 = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

/// `TUNSETOFFLOAD` bits: what the host kernel may hand us without finishing it.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Longest interface name (IFNAMSIZ less the NUL).
const MAX_IFNAME: usize = 15;

/// `struct ifreq` as the tun ioctls use it: a name and the flags word of the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _pad: [u8; 22],
}

impl IfReq {
    fn zeroed() -> Self {
        Self {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Opens `/dev/net/tun` and creates (or attaches to) tap `name` in the calling
/// thread's network namespace, in the mode crx-vmm needs
/// (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`). The fd is close-on-exec; a caller handing it
/// to crx-vmm clears that flag in the child. The link is left down.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    open_with_flags(name, TAP_FLAGS)
}

/// [`open_tap`] with other `IFF_*` flags (tests open the wrong kinds on purpose).
pub(crate) fn open_with_flags(name: &str, flags: u16) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            NetError::BadName(name.to_owned()),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), NetError::OpenTun(e)))?;
    let mut req = IfReq::zeroed();
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = flags;
    // SAFETY: TUNSETIFF reads (and may update) one `struct ifreq`, which `req` is
    // (IfReq has its size and layout for the name and flags fields).
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            NetError::CreateTap {
                name: name.to_owned(),
                source: e,
            },
        ));
    }
    Ok(OwnedFd::from(tun))
}

/// A tap fd checked and set up for virtio-net: 12-byte vnet header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Takes ownership of `fd`, an fd crx-vmm inherited, after checking it is open and
    /// is a tap in `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` mode. An fd that fails the
    /// checks is left open (it may be something else the process owns).
    pub fn from_inherited_fd(fd: RawFd) -> Result<Self, NetError> {
        let name = check_inherited_tap(fd)?;
        // SAFETY: the fd is open, it is a tap (no other part of crx-vmm opens taps),
        // and the caller handed it over on the command line, so nothing else in this
        // process owns it; from here `Tap` closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::set_up(fd, name)
    }

    /// Like [`from_inherited_fd`](Self::from_inherited_fd) for an fd already owned
    /// (tests, the benchmark, or a caller that opened the tap in process).
    pub fn from_owned(fd: OwnedFd) -> Result<Self, NetError> {
        let name = check_tap(fd.as_fd())?;
        Self::set_up(fd, name)
    }

    fn set_up(fd: OwnedFd, name: String) -> Result<Self, NetError> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, a live local.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
            return Err(configure("TUNSETVNETHDRSZ"));
        }
        // SAFETY: F_GETFL takes and returns plain ints.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(configure("O_NONBLOCK"));
        }
        // SAFETY: F_SETFL takes and returns plain ints.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(configure("O_NONBLOCK"));
        }
        let tap = Self { fd, name };
        // Nothing offloaded until a driver accepts offloads.
        tap.set_offload(0).map_err(|source| NetError::Configure {
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface name the kernel reported for the tap.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which unfinished frames (`TUN_F_*`) it may hand us on read.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes the flags as the ioctl argument itself, not a pointer.
        // SAFETY: no memory is passed; the fd is a tap we own.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (with its vnet header) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its whole length for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (with its vnet header) gathered from `iovs`.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the whole call.
    pub unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = iovs.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the caller guarantees the iovecs; `iovs` itself is a live slice.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Gives the fd back (for a caller that wants to pass it on).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn configure(what: &'static str) -> NetError {
    NetError::Configure {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Checks, without taking it, that inherited fd `fd` is open and a tap in
/// [`TAP_FLAGS`] mode; returns the tap's name. Configuration validation calls this so a
/// wrong `--net fd=` fails before anything is built.
pub fn check_inherited_tap(fd: RawFd) -> Result<String, NetError> {
    // SAFETY: F_GETFD only queries the descriptor table; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(NetError::FdNotOpen(fd));
    }
    // SAFETY: the fd is open (checked above) and only borrowed for the checks.
    check_tap(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Returns the tap's name if `fd` is a tap in [`TAP_FLAGS`] mode.
fn check_tap(fd: BorrowedFd<'_>) -> Result<String, NetError> {
    let raw = fd.as_raw_fd();
    let mut req = IfReq::zeroed();
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which has its layout.
    if unsafe { libc::ioctl(raw, TUNGETIFF as _, &mut req) } < 0 {
        return Err(NetError::NotATap {
            fd: raw,
            source: io::Error::last_os_error(),
        });
    }
    // TUNGETIFF reports IFF_TUN/IFF_TAP and the attach-time flags.
    let mode = req.flags & (IFF_TUN | IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    if mode != TAP_FLAGS {
        return Err(NetError::WrongMode {
            fd: raw,
            name: req.name(),
            flags: req.flags,
        });
    }
    Ok(req.name())
}
