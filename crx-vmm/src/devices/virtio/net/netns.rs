//! Throwaway network namespaces for the unit tests and `crx-bench net`: a tap in a
//! namespace of its own with a packet socket on it ([`IsolatedTap`]), packet sockets
//! on other interfaces ([`PacketSocket`]), and test frames.
//!
//! A namespace here is made by one short-lived thread (`unshare(CLONE_NEWNET)`, or
//! `setns` into a named one): the tap and packet sockets it opens keep that namespace
//! alive, and closing them ends it, tap included, so nothing is left behind and no
//! frame can leave the machine (the namespace has no route anywhere). These threads
//! are not device threads: crx-vmm itself never calls this module.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{open_tap, Tap};

/// Ethertype of the frames tests and the benchmark send (IEEE "local experimental"):
/// the host kernel ignores it, so nothing but our sockets reacts to them.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

const ETH_P_ALL: u16 = 0x0003;

/// Runs `f` on a fresh thread inside a new network namespace (`netns: None`) or the
/// named one at `netns` (a `/run/netns/NAME` file). What `f` opens stays in that
/// namespace after the thread ends.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns_file = netns.map(File::open).transpose()?;
    let thread = std::thread::Builder::new()
        .name("crx-netns".into())
        .spawn(move || {
            let rc = match &ns_file {
                // SAFETY: setns on an open netns file; affects only this thread.
                Some(file) => unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                // SAFETY: unshare with CLONE_NEWNET affects only this thread.
                None => unsafe { libc::unshare(libc::CLONE_NEWNET) },
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?;
    thread
        .join()
        .map_err(|_| io::Error::other("the network-namespace thread panicked"))?
}

/// Sets interface `name` up in the calling thread's network namespace.
pub fn link_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one 40-byte `struct ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, req.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = u16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, req.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns IPv6 off for new interfaces in the calling thread's namespace, so a fresh
/// link does not send router solicitations into the tests' traffic. Best effort.
fn quiet_ipv6() {
    for key in ["default", "all"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1");
    }
}

/// A raw AF_PACKET socket bound to one interface: the "other end" of a tap or veth.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it in the calling thread's namespace, bound to interface `name`.
    pub fn bind(name: &str) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: `cname` is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        let ifindex = ifindex as i32;
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let big: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: the option value is a live int of the size passed. Best effort.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&big as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        Ok(Self { fd, ifindex })
    }

    /// From now on every frame sent starts with a 10-byte `virtio_net_hdr` (as a
    /// tap's reader would write it): how tests hand the kernel a GSO frame.
    pub fn enable_vnet_hdr(&self) -> io::Result<()> {
        const SOL_PACKET: libc::c_int = 263;
        const PACKET_VNET_HDR: libc::c_int = 15;
        let on: libc::c_int = 1;
        // SAFETY: the option value is a live int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one frame tagged with `ethertype` as its protocol (the kernel checks it
    /// against a vnet header's GSO type).
    pub fn send_as(&self, frame: &[u8], ethertype: u16) -> io::Result<usize> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        // SAFETY: `frame` is readable for its length and `addr` is a valid
        // sockaddr_ll of the length passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Receives one frame, waiting at most `timeout`; `Ok(None)` on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(None);
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Waits up to `timeout` for a frame of [`TEST_ETHERTYPE`]; other traffic is skipped.
    pub fn recv_test_frame(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(buf, left)? {
                Some(n) if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() => {
                    return Ok(Some(n))
                }
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }
}

/// A tap in a network namespace of its own, up, with a packet socket on it.
pub struct IsolatedTap {
    pub tap: Tap,
    pub peer: PacketSocket,
    pub name: String,
}

impl IsolatedTap {
    /// Creates tap `name` in a new namespace (names only need to be unique within it).
    pub fn new(name: &str) -> io::Result<Self> {
        let owned = name.to_owned();
        let (fd, peer) = in_netns(None, move || {
            quiet_ipv6();
            let fd = open_tap(&owned)?;
            link_up(&owned)?;
            let peer = PacketSocket::bind(&owned)?;
            Ok((fd, peer))
        })?;
        let tap = Tap::from_owned(fd).map_err(io::Error::other)?;
        Ok(Self {
            tap,
            peer,
            name: name.to_owned(),
        })
    }
}

/// An Ethernet frame of `len` bytes (header included) to `dst`, of [`TEST_ETHERTYPE`],
/// payload bytes `seq`-dependent so frames differ.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32).wrapping_add(seq) as u8;
    }
    f
}
