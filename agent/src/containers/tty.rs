//! Terminals for container processes. libcontainer makes the pty inside the container
//! (from the container's own devpts, with the slave as the process's controlling
//! terminal and fds 0-2) and hands the master back over a "console socket"; this
//! module is the agent's side of that: the socket, the master it receives and the
//! window size (ResizeTty; `executor.rs` applies a size asked for before an exec
//! started).
//!
//! Why libcontainer's console socket and not a pty the agent opens itself: a pty from
//! the agent's devpts could only be passed as plain fds 0-2; the process would have no
//! controlling terminal (no ^C, no job control) and its `/dev/pts` would not know the
//! slave.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// Rows and columns are 1-65535 each (container.proto).
const MAX_DIMENSION: u32 = 65535;
/// Longest name libcontainer sends with the master ("/dev/ptmx"); more is cut off.
const NAME_BUF: usize = 256;

/// Terminal failures.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    /// A window size outside 1-65535.
    #[error("window size {rows}x{cols}: rows and cols must each be 1-{MAX_DIMENSION}")]
    BadSize { rows: u32, cols: u32 },
    /// The console socket could not be made.
    #[error("cannot listen on the console socket {}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The process did not connect and send its master in time.
    #[error("the process did not hand over its pty master within {0:?}")]
    NoMaster(Duration),
    /// Accepting or reading the console socket failed.
    #[error("cannot receive the pty master")]
    Receive(#[source] io::Error),
    /// What came over the socket is not a pty master.
    #[error("the console socket passed a descriptor that is not a pty master")]
    NotAMaster,
    /// TIOCSWINSZ failed.
    #[error("cannot set the terminal's window size")]
    Resize(#[source] io::Error),
}

/// A terminal window size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl WindowSize {
    /// Checks the protocol's bounds.
    pub fn new(rows: u32, cols: u32) -> Result<WindowSize, TtyError> {
        let dimension = |n: u32| u16::try_from(n).ok().filter(|n| *n >= 1);
        match (dimension(rows), dimension(cols)) {
            (Some(rows), Some(cols)) => Ok(WindowSize { rows, cols }),
            _ => Err(TtyError::BadSize { rows, cols }),
        }
    }

    pub fn apply(self, fd: RawFd) -> io::Result<()> {
        let size = libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The listening socket libcontainer's process connects to, to send its pty master.
/// The socket file is removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens on a fresh socket in `dir` (kept short: a Unix socket path has 108 bytes).
    pub fn bind(dir: &Path) -> Result<ConsoleSocket, TtyError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let listen_err = |source| TtyError::Listen {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(listen_err)?;
        // Left by an agent that died: the name is ours now.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(ConsoleSocket { listener, path })
    }

    /// What libcontainer's `with_console_socket` takes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master the process sent, waiting at most `timeout`. Call once the
    /// process was built: it connects and sends before it reports ready.
    pub fn receive_master(&self, timeout: Duration) -> Result<OwnedFd, TtyError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(self.listener.as_fd(), deadline, timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TtyError::Receive(e)),
            }
        };
        stream.set_nonblocking(true).map_err(TtyError::Receive)?;
        loop {
            match receive_fd(stream.as_raw_fd()) {
                Ok(Some(fd)) => {
                    check_master(&fd)?;
                    return Ok(fd);
                }
                Ok(None) => return Err(TtyError::NotAMaster),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(stream.as_fd(), deadline, timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TtyError::Receive(e)),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), TtyError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TtyError::NoMaster(timeout));
    }
    let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(TtyError::Receive(e.into())),
    }
}

/// One message from the socket: the first descriptor it carried (others are closed),
/// or `None` if it carried none (the sender went away).
fn receive_fd(socket: RawFd) -> io::Result<Option<OwnedFd>> {
    let mut name = [0u8; NAME_BUF];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    // CLOEXEC: the agent forks container processes, which must not inherit the master.
    let msg = recvmsg::<UnixAddr>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
            // nothing else owns them.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(received.into_iter().next())
}

/// Only a pty master answers TIOCGPTN.
fn check_master(fd: &OwnedFd) -> Result<(), TtyError> {
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to the pointer, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGPTN, &mut number) } != 0 {
        return Err(TtyError::NotAMaster);
    }
    Ok(())
}

#[derive(Default)]
struct TerminalState {
    master: Option<OwnedFd>,
    /// The last size asked for; applied when the master arrives.
    size: Option<WindowSize>,
}

/// A process's terminal, as the agent holds it: the pty master (once libcontainer has
/// handed it over) and the window size.
#[derive(Default)]
pub struct Terminal {
    state: Mutex<TerminalState>,
}

impl Terminal {
    fn lock(&self) -> MutexGuard<'_, TerminalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the window size now, or when the master arrives.
    pub fn resize(&self, size: WindowSize) -> Result<(), TtyError> {
        let mut state = self.lock();
        state.size = Some(size);
        match &state.master {
            Some(master) => size.apply(master.as_raw_fd()).map_err(TtyError::Resize),
            None => Ok(()),
        }
    }

    /// The size asked for so far, if any.
    pub fn size(&self) -> Option<WindowSize> {
        self.lock().size
    }

    /// Keeps the master and applies the size asked for before it came. Returns a
    /// duplicate for the stream copiers.
    pub fn set_master(&self, master: OwnedFd) -> io::Result<OwnedFd> {
        let mut state = self.lock();
        if let Some(size) = state.size {
            if let Err(e) = size.apply(master.as_raw_fd()) {
                tracing::warn!(error = %e, "cannot apply the requested window size");
            }
        }
        let copy = master.try_clone()?;
        state.master = Some(master);
        Ok(copy)
    }

    /// A duplicate of the master, once there is one.
    pub fn master(&self) -> io::Result<Option<OwnedFd>> {
        self.lock()
            .master
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()
    }
}

/// Writes the terminal's end-of-file character if the line discipline is canonical, so
/// a program reading lines sees end of input as if ^D was typed; programs in raw mode
/// get nothing (a pty has no other way to say "no more input").
pub fn send_eof(master: &OwnedFd) {
    let Ok(attrs) = nix::sys::termios::tcgetattr(master.as_fd()) else {
        return;
    };
    if !attrs
        .local_flags
        .contains(nix::sys::termios::LocalFlags::ICANON)
    {
        return;
    }
    let eof = attrs.control_chars[libc::VEOF];
    if let Err(e) = nix::unistd::write(master.as_fd(), &[eof]) {
        tracing::debug!(error = %e, "cannot write end-of-file to the terminal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_are_bounded() {
        assert_eq!(
            WindowSize::new(24, 80).unwrap(),
            WindowSize { rows: 24, cols: 80 }
        );
        WindowSize::new(65535, 1).unwrap();
        for (rows, cols) in [(0, 80), (24, 0), (65536, 80), (24, u32::MAX)] {
            assert!(WindowSize::new(rows, cols).is_err(), "{rows}x{cols}");
        }
    }

    #[test]
    fn a_master_sent_over_the_console_socket_is_received_and_resized() {
        let dir = std::env::temp_dir().join(format!("crx-tty-unit-{}", std::process::id()));
        let socket = ConsoleSocket::bind(&dir).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let sender = std::os::unix::net::UnixStream::connect(socket.path()).unwrap();
        let fds = [pty.master.as_raw_fd()];
        nix::sys::socket::sendmsg::<UnixAddr>(
            sender.as_raw_fd(),
            &[io::IoSlice::new(b"/dev/ptmx")],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let master = socket.receive_master(Duration::from_secs(5)).unwrap();
        let terminal = Terminal::default();
        terminal.resize(WindowSize { rows: 7, cols: 9 }).unwrap();
        terminal.set_master(master).unwrap();
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which outlives the call.
        let answer = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(answer, 0);
        assert_eq!((size.ws_row, size.ws_col), (7, 9));
        // A slave is not a master; nothing sent in time is an error.
        assert!(check_master(&pty.slave).is_err());
        assert!(matches!(
            socket.receive_master(Duration::from_millis(50)),
            Err(TtyError::NoMaster(_))
        ));
        drop(socket);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
