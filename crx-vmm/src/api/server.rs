//! The `crx-api` thread: accepts connections on the API socket and serves their
//! requests one at a time. Everything a client sends is bounded: a line of at most
//! [`MAX_LINE`] bytes, at most one fd per request (extra fds are closed), and a
//! connection that sends nothing for [`IDLE_TIMEOUT`] is dropped, so one stuck client
//! cannot keep the socket from others for long.

use std::fs::File;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{Reply, Request, MAX_LINE};
use crate::devices::virtio::block::{Backing, BlockSlot};
use crate::devices::virtio::device_thread::{exit_events, DeviceThread};

/// A connection that sends no complete request within this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most fds accepted with one message; more are closed unread by the kernel.
const MAX_FDS: usize = 4;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {} already exists (another VM's, or stale): remove it or choose another path", .0.display())]
    PathExists(PathBuf),
    #[error("cannot create the API socket {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// One drive as the API sees it: the slot to swap, and whether the drive was started
/// read-only (then every backing is attached read-only).
#[derive(Clone)]
pub struct DriveHandle {
    pub slot: BlockSlot,
    pub read_only: bool,
}

/// A bound API socket and the drives it may change.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    drives: Vec<DriveHandle>,
}

impl ApiServer {
    /// Creates the socket at `path` (which must not exist), readable by its owner only.
    pub fn bind(path: &Path, drives: Vec<DriveHandle>) -> Result<Self, ApiError> {
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::PathExists(path.to_path_buf()));
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        // Accept only after poll said so, and never block there if the client is gone.
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            drives,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the `crx-api` thread; it serves until the returned handle is stopped.
    pub fn spawn(self) -> Result<DeviceThread<()>, ApiError> {
        let (exit, thread_exit) = exit_events().map_err(ApiError::Thread)?;
        DeviceThread::spawn("crx-api", exit, move || self.run(&thread_exit))
            .map_err(ApiError::Thread)
    }

    fn run(self, exit: &EventFd) {
        tracing::info!(socket = %self.path.display(), "API socket ready");
        loop {
            match wait_readable(self.listener.as_raw_fd(), exit, None) {
                Wait::Ready => {}
                Wait::Exit => return,
                Wait::TimedOut => continue,
                Wait::Failed(e) => {
                    tracing::error!(error = %e, "API socket: poll failed; API thread stops");
                    return;
                }
            }
            match self.listener.accept() {
                Ok((conn, _)) => {
                    if self.serve(conn, exit) == Served::Exit {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(error = %e, "API socket: accept failed"),
            }
        }
    }

    /// Serves one connection until it closes, misbehaves or goes idle.
    fn serve(&self, mut conn: UnixStream, exit: &EventFd) -> Served {
        let mut pending: Vec<u8> = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        loop {
            // Complete lines already received are answered first.
            if let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let reply = self.handle_line(&line[..line.len() - 1], std::mem::take(&mut fds));
                if let Err(e) = conn.write_all(&reply.to_line()) {
                    tracing::warn!(error = %e, "API socket: cannot send a reply");
                    return Served::Closed;
                }
                continue;
            }
            if pending.len() >= MAX_LINE {
                let _ = conn.write_all(
                    &Reply::error(format!("request longer than {MAX_LINE} bytes")).to_line(),
                );
                return Served::Closed;
            }
            let deadline = Instant::now() + IDLE_TIMEOUT;
            match wait_readable(conn.as_raw_fd(), exit, Some(deadline)) {
                Wait::Ready => {}
                Wait::Exit => return Served::Exit,
                Wait::TimedOut => {
                    let _ =
                        conn.write_all(&Reply::error("timed out waiting for a request").to_line());
                    return Served::Closed;
                }
                Wait::Failed(e) => {
                    tracing::warn!(error = %e, "API socket: poll on a connection failed");
                    return Served::Closed;
                }
            }
            let mut buf = [0u8; MAX_LINE];
            match receive(conn.as_raw_fd(), &mut buf, &mut fds) {
                Ok(0) => return Served::Closed,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) => {
                    tracing::warn!(error = %e, "API socket: receive failed");
                    return Served::Closed;
                }
            }
            if fds.len() > MAX_FDS {
                let _ = conn.write_all(
                    &Reply::error(format!("more than {MAX_FDS} fds before a complete request"))
                        .to_line(),
                );
                return Served::Closed;
            }
        }
    }

    /// Parses and runs one request line; `fds` are those that came with it.
    fn handle_line(&self, line: &[u8], mut fds: Vec<OwnedFd>) -> Reply {
        let request: Request = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => return Reply::error(format!("malformed request: {e}")),
        };
        if fds.len() > 1 {
            return Reply::error(format!(
                "{} fds came with one request; at most 1",
                fds.len()
            ));
        }
        self.handle(request, fds.pop())
    }

    /// Runs one parsed request (the socket-free core the unit tests drive).
    pub fn handle(&self, request: Request, fd: Option<OwnedFd>) -> Reply {
        let index = match &request {
            Request::AttachDrive { index, .. } | Request::DetachDrive { index } => *index,
        };
        let Some(drive) = self.drives.get(index) else {
            return Reply::error(format!(
                "no drive {index}: this VM has {} (--drive, counted from 0)",
                self.drives.len()
            ));
        };
        let backing = match (request, fd) {
            (Request::AttachDrive { read_only, .. }, Some(fd)) => {
                let label = PathBuf::from(format!("<fd attached to drive {index}>"));
                match Backing::from_file(File::from(fd), &label, read_only || drive.read_only) {
                    Ok(b) => Some(b),
                    Err(e) => return Reply::error(error_chain(&e)),
                }
            }
            (Request::AttachDrive { .. }, None) => return Reply::error(
                "attach_drive needs the backing's open fd as SCM_RIGHTS data on the same message",
            ),
            (Request::DetachDrive { .. }, None) => None,
            (Request::DetachDrive { .. }, Some(_)) => {
                return Reply::error("detach_drive takes no fd")
            }
        };
        let attaching = backing.is_some();
        match drive.slot.replace_backing(backing) {
            Ok(sectors) => {
                tracing::info!(
                    drive = index,
                    sectors,
                    attaching,
                    "API: drive backing changed"
                );
                Reply::capacity(sectors)
            }
            Err(e) => Reply::error(error_chain(&e)),
        }
    }
}

#[derive(PartialEq, Eq)]
enum Served {
    Closed,
    Exit,
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

enum Wait {
    Ready,
    Exit,
    TimedOut,
    Failed(std::io::Error),
}

/// Waits until `fd` is readable (or hung up), the exit eventfd fires, or `deadline`.
fn wait_readable(fd: RawFd, exit: &EventFd, deadline: Option<Instant>) -> Wait {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wait::TimedOut;
                }
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: exit.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Wait::Failed(e);
        }
        if fds[1].revents != 0 {
            return Wait::Exit;
        }
        if fds[0].revents != 0 {
            return Wait::Ready;
        }
        if n == 0 && deadline.is_some() {
            return Wait::TimedOut;
        }
    }
}

/// One `recvmsg`: data into `buf`, any passed fds appended to `fds` (owned at once,
/// so none leaks whatever happens next).
fn receive(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(std::io::Error::from)?,
        }
    };
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in our fd table for us alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(msg.bytes)
}
