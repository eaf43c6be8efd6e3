//! The backend channel a vhost-user front end hands over (SET_BACKEND_REQ_FD), used
//! here for one message: CONFIG_CHANGE_MSG, which makes QEMU read the device's config
//! space again and, if the capacity changed, interrupt the guest.
//!
//! vhost 0.16's [`vhost::vhost_user::Backend`] wraps that channel but cannot send this
//! message (its `handle_config_change` is the trait's ENOSYS default) and does not
//! expose its socket. So when the channel arrives, [`BackendChannel::attach`] finds the
//! same socket among the process's fds and keeps a duplicate. It is recognised
//! without guessing: the front end creates it with `socketpair`, so it is an unnamed
//! Unix stream socket whose peer credentials are the front end's, and the front end is
//! the peer of the connection accepted on our vhost-user socket.
//!
//! The message is the vhost-user header plus a zero u64, without NEED_REPLY
//! (REPLY_ACK is not offered), so nothing is read back: QEMU's handler asks us for
//! the config on the main channel while we would be waiting.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Mutex;

use vhost::vhost_user::message::{BackendReq, VhostUserU64};
use vm_memory::ByteValued;

use crate::devices::virtio::block::ConfigChangeNotifier;

/// Highest fd number looked at when searching for the channel.
const MAX_FD_SCANNED: u64 = 1 << 16;

/// Where a capacity change is announced to the front end, once it gave a channel.
pub struct BackendChannel {
    /// The path our vhost-user listener is bound to (as passed to it).
    vhost_socket: PathBuf,
    channel: Mutex<Option<OwnedFd>>,
}

impl BackendChannel {
    pub fn new(vhost_socket: PathBuf) -> Self {
        Self {
            vhost_socket,
            channel: Mutex::new(None),
        }
    }

    /// Finds the channel the front end just handed over and keeps a duplicate of it.
    /// Call from `set_backend_req_fd`, while the crate's copy is still open.
    pub fn attach(&self) -> io::Result<()> {
        let fd = find_channel(self.vhost_socket.as_os_str().as_bytes())?;
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
        Ok(())
    }

    /// Whether a channel was found.
    #[cfg(test)]
    pub fn is_attached(&self) -> bool {
        self.channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl ConfigChangeNotifier for BackendChannel {
    fn notify_config_change(&self) -> io::Result<()> {
        let channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = channel.as_ref() else {
            // No front end yet: it reads the new capacity when it connects.
            tracing::debug!("vhost-user-blk: no backend channel; config change not announced");
            return Ok(());
        };
        send_all(fd.as_raw_fd(), &config_change_message())?;
        tracing::debug!("vhost-user-blk: config change announced to the front end");
        Ok(())
    }
}

/// Header flags: protocol version 1, no NEED_REPLY.
const VHOST_USER_VERSION_1: u32 = 0x1;

/// CONFIG_CHANGE_MSG: the vhost-user header (request, flags, body size, each a u32 in
/// little endian) and a zero u64, as the crate would frame it (its header type is
/// private).
pub(crate) fn config_change_message() -> Vec<u8> {
    let body = VhostUserU64::new(0);
    let request: u32 = BackendReq::CONFIG_CHANGE_MSG.into();
    let mut msg = Vec::with_capacity(12 + body.as_slice().len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&VHOST_USER_VERSION_1.to_le_bytes());
    msg.extend_from_slice(&(body.as_slice().len() as u32).to_le_bytes());
    msg.extend_from_slice(body.as_slice());
    msg
}

fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid slice for the call; `fd` is an open socket we own.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The backend channel among our fds, duplicated (see the module comment).
fn find_channel(vhost_socket: &[u8]) -> io::Result<OwnedFd> {
    let mut front_end = None;
    let mut unnamed = Vec::new();
    for fd in 0..fd_limit() {
        let Some(name) = unix_stream_name(fd) else {
            continue;
        };
        if name.is_empty() {
            if let Some(pid) = peer_pid(fd) {
                unnamed.push((fd, pid));
            }
        } else if name == vhost_socket && int_option(fd, libc::SO_ACCEPTCONN) == Some(0) {
            front_end = peer_pid(fd);
        }
    }
    let front_end = front_end.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no connection on the vhost-user socket",
        )
    })?;
    // The newest (highest) fd if a front end somehow gave more than one.
    let fd = unnamed
        .into_iter()
        .filter(|(_, pid)| *pid == front_end)
        .map(|(fd, _)| fd)
        .max()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no socket shared with the front end (pid {front_end})"),
            )
        })?;
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd nobody else owns.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` was just created for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

fn fd_limit() -> RawFd {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let cur = if ok { lim.rlim_cur } else { 1024 };
    RawFd::try_from(cur.min(MAX_FD_SCANNED)).unwrap_or(1024)
}

/// The local path of `fd` if it is a Unix stream socket (empty when unnamed).
fn unix_stream_name(fd: RawFd) -> Option<Vec<u8>> {
    if int_option(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return None;
    }
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for getsockname to fill, `len` its size.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path_len = (len as usize)
        .saturating_sub(std::mem::size_of::<libc::sa_family_t>())
        .min(addr.sun_path.len());
    let mut name: Vec<u8> = addr.sun_path[..path_len].iter().map(|c| *c as u8).collect();
    while name.last() == Some(&0) {
        name.pop();
    }
    Some(name)
}

fn int_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for getsockopt to fill, `len` its size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(value)
}

fn peer_pid(fd: RawFd) -> Option<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for getsockopt to fill, `len` its size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    use crate::devices::virtio::test_utils::TestDir;

    #[test]
    fn the_message_is_a_version_1_config_change_with_a_u64_body() {
        let m = config_change_message();
        assert_eq!(m.len(), 12 + 8);
        assert_eq!(
            &m[0..4],
            &2u32.to_le_bytes(),
            "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG"
        );
        assert_eq!(&m[4..8], &1u32.to_le_bytes(), "version 1, no NEED_REPLY");
        assert_eq!(&m[8..12], &8u32.to_le_bytes());
        assert_eq!(&m[12..], &[0u8; 8]);
    }

    /// Our own process plays the front end, so the connection's peer and the
    /// socketpair's peer are both this pid. (Other tests may make socket pairs at the
    /// same time, so which end is kept is not asserted here, and nothing is sent on
    /// it; the QEMU test checks that the message arrives.)
    #[test]
    fn finds_a_channel_once_the_front_end_is_connected() {
        let dir = TestDir::new("vhu-chan");
        let sock = dir.0.join("vhu.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (_front_end_side, _ours) = UnixStream::pair().unwrap();

        let channel = BackendChannel::new(sock.clone());
        channel.notify_config_change().unwrap();
        assert_eq!(
            channel.attach().unwrap_err().kind(),
            io::ErrorKind::NotFound,
            "no front end connected yet"
        );
        let _front = UnixStream::connect(&sock).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        channel.attach().unwrap();
        assert!(channel.is_attached());
    }

    #[test]
    fn without_a_connection_on_the_socket_nothing_is_found() {
        let dir = TestDir::new("vhu-chan-none");
        let channel = BackendChannel::new(dir.0.join("never-bound.sock"));
        assert_eq!(
            channel.attach().unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
