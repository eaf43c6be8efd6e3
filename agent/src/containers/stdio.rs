//! Process stdio as separate connections (stdio.proto): the listener on the stdio port
//! (vsock 1026 in a VM, a Unix socket in host mode), the "CRXS" handshake, and the
//! pipes (or the pty) between a process and its attached streams. Each attached stream
//! is copied by its own thread with blocking I/O and one fixed buffer, so the process is
//! slowed to the host's pace and nothing is buffered without bound.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
use nix::fcntl::OFlag;
use protobuf::Message as _;
use tokio::sync::watch;

use super::tty::{self, Terminal};

/// The handshake's magic.
const MAGIC: &[u8; 4] = b"CRXS";
/// Longest header or reply.
const MAX_FRAME: usize = 512;
/// Time the host has to send its header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections being handshaken or copied at once; more are closed at once.
const MAX_CONNECTIONS: usize = 4096;
/// Buffer of one stream copier: the most the agent holds of a stream at a time.
const COPY_BUFFER: usize = 64 << 10;

/// Where the stdio listener listens.
#[derive(Clone, Debug)]
pub enum StdioAddr {
    /// A guest vsock port (any CID).
    Vsock(u32),
    /// A Unix socket (host mode).
    Unix(PathBuf),
}

impl std::fmt::Display for StdioAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StdioAddr::Vsock(port) => write!(f, "vsock://-1:{port}"),
            StdioAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Stdio failures.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The listener could not be bound.
    #[error("cannot listen for stdio streams on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// Pipes or /dev/null for a process could not be made.
    #[error("cannot make the process's stdio pipes")]
    Pipes(#[source] io::Error),
    /// The declared streams contradict each other.
    #[error("{0}")]
    Declared(String),
    /// The process's pty master could not be kept.
    #[error("cannot keep the pty master")]
    Master(#[source] io::Error),
}

/// One accepted stream connection.
enum Conn {
    Unix(UnixStream),
    Vsock(vsock::VsockStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Vsock(s) => Conn::Vsock(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Vsock(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Vsock(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Vsock(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Vsock(s) => s.flush(),
        }
    }
}

/// Finds the process a stream header names.
pub trait StdioRegistry: Send + Sync + 'static {
    /// The stdio of (container_id, exec_id), if that process exists.
    fn find(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessStdio>>;
}

/// Which streams a process declared. With `terminal` the process has a pty and one
/// TTY stream; `stdin` then says whether the host's input on it reaches the pty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

const STDIN_BIT: u8 = 1;
const STDOUT_BIT: u8 = 2;
const STDERR_BIT: u8 = 4;
const TTY_BIT: u8 = 8;

impl Declared {
    /// A terminal's output is the TTY stream: stdout and stderr cannot be declared too.
    pub fn check(self) -> Result<(), StdioError> {
        if self.terminal && (self.stdout || self.stderr) {
            return Err(StdioError::Declared(
                "a process with a terminal has one TTY stream: stdout and stderr must not be declared".into(),
            ));
        }
        Ok(())
    }

    fn mask(self) -> u8 {
        if self.terminal {
            return TTY_BIT;
        }
        (if self.stdin { STDIN_BIT } else { 0 })
            | (if self.stdout { STDOUT_BIT } else { 0 })
            | (if self.stderr { STDERR_BIT } else { 0 })
    }
}

/// The process's side of its stdio, handed to libcontainer.
pub enum ChildStdio {
    /// Pipes (/dev/null for undeclared streams) for fds 0-2.
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// libcontainer makes a pty and passes its master back (see `tty`).
    Terminal,
}

#[derive(Default)]
struct Ends {
    /// Write end of the stdin pipe, until attached (or closed).
    stdin: Option<OwnedFd>,
    /// Read ends of the output pipes, until attached.
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// The connection carrying stdin (the STDIN or TTY stream), kept to end it on
    /// CloseStdin.
    stdin_conn: Option<Conn>,
    /// CloseStdin came.
    stdin_closed: bool,
    /// The attached TTY stream, until the pty master arrives (an exec's pty exists only
    /// once it is started).
    tty_conn: Option<Conn>,
}

/// The agent's side of one process's stdio.
pub struct ProcessStdio {
    declared: Declared,
    ends: Mutex<Ends>,
    /// Bit mask of the attached streams (and of a stdin closed before it was attached).
    attached: watch::Sender<u8>,
    /// With a declared terminal: its master and window size.
    terminal: Option<Terminal>,
}

impl ProcessStdio {
    /// Pipes for the declared streams (/dev/null for the others): the agent's ends stay
    /// here until attached, the process's ends are returned. A terminal needs none: its
    /// master comes later ([`ProcessStdio::set_master`]).
    pub fn new(declared: Declared) -> Result<(Arc<ProcessStdio>, ChildStdio), StdioError> {
        declared.check()?;
        if declared.terminal {
            let me = Arc::new(ProcessStdio {
                declared,
                ends: Mutex::new(Ends::default()),
                attached: watch::channel(0).0,
                terminal: Some(Terminal::default()),
            });
            return Ok((me, ChildStdio::Terminal));
        }
        let null_in = || File::open("/dev/null").map(OwnedFd::from);
        let null_out = || {
            File::options()
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
        };
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from);
        let mut ends = Ends::default();
        let stdin = if declared.stdin {
            let (r, w) = pipe().map_err(StdioError::Pipes)?;
            ends.stdin = Some(w);
            r
        } else {
            null_in().map_err(StdioError::Pipes)?
        };
        let output = |wanted: bool, slot: &mut Option<OwnedFd>| -> Result<OwnedFd, StdioError> {
            if wanted {
                let (r, w) = pipe().map_err(StdioError::Pipes)?;
                *slot = Some(r);
                Ok(w)
            } else {
                null_out().map_err(StdioError::Pipes)
            }
        };
        let stdout = output(declared.stdout, &mut ends.stdout)?;
        let stderr = output(declared.stderr, &mut ends.stderr)?;
        let me = Arc::new(ProcessStdio {
            declared,
            ends: Mutex::new(ends),
            attached: watch::channel(0).0,
            terminal: None,
        });
        Ok((
            me,
            ChildStdio::Pipes {
                stdin,
                stdout,
                stderr,
            },
        ))
    }

    /// The process's terminal, if it declared one.
    pub fn terminal(&self) -> Option<&Terminal> {
        self.terminal.as_ref()
    }

    /// Takes the pty master libcontainer passed back; starts copying if the TTY stream
    /// is already attached.
    pub fn set_master(&self, master: OwnedFd) -> Result<(), StdioError> {
        let Some(terminal) = &self.terminal else {
            return Err(StdioError::Master(io::Error::other(
                "the process declared no terminal",
            )));
        };
        let copy = terminal.set_master(master).map_err(StdioError::Master)?;
        let mut ends = self.lock();
        if let Some(conn) = ends.tty_conn.take() {
            let input = self.declared.stdin && !ends.stdin_closed;
            drop(ends);
            spawn_tty_copiers(conn, copy, input);
        }
        Ok(())
    }

    /// The process could not be started: an attached TTY stream waiting for its master
    /// gets EOF instead of waiting for ever.
    pub fn abandon(&self) {
        let mut ends = self.lock();
        if let Some(conn) = ends.tty_conn.take() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        ends.stdin_conn = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ends> {
        self.ends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every declared stream is attached; on `deadline` names the missing.
    pub async fn wait_attached(&self, deadline: Instant) -> Result<(), String> {
        let want = self.declared.mask();
        let mut rx = self.attached.subscribe();
        let attached = tokio::time::timeout_at(deadline, async {
            rx.wait_for(|got| got & want == want).await.is_ok()
        })
        .await;
        match attached {
            Ok(true) => Ok(()),
            _ => {
                let got = *self.attached.borrow();
                let missing: Vec<&str> = [
                    (STDIN_BIT, "stdin"),
                    (STDOUT_BIT, "stdout"),
                    (STDERR_BIT, "stderr"),
                    (TTY_BIT, "tty"),
                ]
                .into_iter()
                .filter(|(bit, _)| want & bit != 0 && got & bit == 0)
                .map(|(_, name)| name)
                .collect();
                Err(missing.join(", "))
            }
        }
    }

    /// Gives the program EOF on stdin, attached or not. A stdin never attached no longer
    /// holds up the start. On a terminal the host's input stops and the terminal's EOF
    /// character is sent (see [`tty::send_eof`]).
    pub fn close_stdin(&self) {
        let mut ends = self.lock();
        ends.stdin_closed = true;
        ends.stdin = None;
        if let Some(conn) = ends.stdin_conn.take() {
            // Wakes the copier's read with EOF; it then closes the pipe (or sends the
            // terminal's EOF).
            let _ = conn.shutdown(Shutdown::Read);
        }
        drop(ends);
        if !self.declared.terminal && self.declared.stdin {
            self.attached.send_modify(|m| *m |= STDIN_BIT);
        }
    }

    /// Takes the agent's end of stream `kind` for a new connection.
    fn claim(&self, kind: StreamKind) -> Result<(Option<OwnedFd>, u8), String> {
        let (declared, bit) = match kind {
            StreamKind::STREAM_KIND_STDIN => (self.declared.stdin, STDIN_BIT),
            StreamKind::STREAM_KIND_STDOUT => (self.declared.stdout, STDOUT_BIT),
            StreamKind::STREAM_KIND_STDERR => (self.declared.stderr, STDERR_BIT),
            StreamKind::STREAM_KIND_TTY => (self.declared.terminal, TTY_BIT),
            StreamKind::STREAM_KIND_UNSPECIFIED => return Err("stream kind unspecified".into()),
        };
        if self.declared.terminal && bit != TTY_BIT {
            return Err(format!(
                "the process has a terminal: its one stream is STREAM_KIND_TTY, not {kind:?}"
            ));
        }
        if !declared {
            return Err(format!("the process did not declare {kind:?}"));
        }
        let mut ends = self.lock();
        if bit == STDIN_BIT && ends.stdin_closed {
            return Err("stdin was closed (CloseStdin)".into());
        }
        if *self.attached.borrow() & bit != 0 {
            return Err(format!("{kind:?} is already attached"));
        }
        if bit == TTY_BIT {
            // The bit is set under this lock by the claimer: a second claim sees it.
            self.attached.send_modify(|m| *m |= TTY_BIT);
            return Ok((None, bit));
        }
        let slot = match bit {
            STDIN_BIT => &mut ends.stdin,
            STDOUT_BIT => &mut ends.stdout,
            _ => &mut ends.stderr,
        };
        slot.take()
            .map(|fd| (Some(fd), bit))
            .ok_or_else(|| format!("{kind:?} is already attached"))
    }

    /// Serves an accepted TTY stream: copies at once if the master is here, else keeps
    /// the connection for [`ProcessStdio::set_master`].
    fn attach_tty(&self, conn: Conn) {
        let mut ends = self.lock();
        let input = self.declared.stdin && !ends.stdin_closed;
        if input {
            match conn.try_clone() {
                Ok(clone) => ends.stdin_conn = Some(clone),
                Err(e) => tracing::warn!(error = %e, "CloseStdin will not interrupt this stream"),
            }
        }
        let master = self.terminal.as_ref().map(Terminal::master);
        match master {
            Some(Ok(Some(master))) => {
                drop(ends);
                spawn_tty_copiers(conn, master, input);
            }
            Some(Ok(None)) => ends.tty_conn = Some(conn),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot copy the pty master; closing the TTY stream");
                let _ = conn.shutdown(Shutdown::Both);
            }
            None => {}
        }
    }
}

/// Starts the listener thread. Connections are served until the process ends.
pub fn spawn_listener(
    addr: &StdioAddr,
    registry: Arc<dyn StdioRegistry>,
) -> Result<(), StdioError> {
    let bind_err = |source| StdioError::Bind {
        addr: addr.to_string(),
        source,
    };
    let accept: Box<dyn FnMut() -> io::Result<Conn> + Send> = match addr {
        StdioAddr::Unix(path) => {
            // A socket file left by a dead agent; a live one would have made the ttrpc
            // bind fail first.
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(bind_err)?;
            Box::new(move || listener.accept().map(|(s, _)| Conn::Unix(s)))
        }
        StdioAddr::Vsock(port) => {
            let listener = vsock::VsockListener::bind_with_cid_port(libc::VMADDR_CID_ANY, *port)
                .map_err(bind_err)?;
            Box::new(move || listener.accept().map(|(s, _)| Conn::Vsock(s)))
        }
    };
    let addr = addr.clone();
    std::thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || accept_loop(accept, registry, &addr))
        .map_err(|source| StdioError::Bind {
            addr: "thread".into(),
            source,
        })?;
    Ok(())
}

fn accept_loop(
    mut accept: Box<dyn FnMut() -> io::Result<Conn> + Send>,
    registry: Arc<dyn StdioRegistry>,
    addr: &StdioAddr,
) {
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    tracing::info!(%addr, "listening for stdio streams");
    loop {
        let conn = match accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "stdio accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if ACTIVE.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("too many stdio connections; closing a new one");
            continue;
        }
        let registry = registry.clone();
        let spawned = std::thread::Builder::new()
            .name("stdio".into())
            .spawn(move || {
                serve(conn, registry.as_ref());
                ACTIVE.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot start a stdio thread");
        }
    }
}

/// Reads and checks the header of a new connection.
pub(crate) fn read_header(conn: &mut impl Read) -> Result<StreamHeader, String> {
    let mut magic = [0u8; 4];
    conn.read_exact(&mut magic)
        .map_err(|e| format!("no header: {e}"))?;
    if &magic != MAGIC {
        return Err("bad magic (expected \"CRXS\")".into());
    }
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)
        .map_err(|e| format!("no header length: {e}"))?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MAX_FRAME {
        return Err(format!("header length {len} is not 1-{MAX_FRAME}"));
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)
        .map_err(|e| format!("short header: {e}"))?;
    StreamHeader::parse_from_bytes(&body).map_err(|e| format!("malformed header: {e}"))
}

pub(crate) fn reply(conn: &mut impl Write, error: Option<&str>) -> io::Result<()> {
    let mut accept = StreamAccept::new();
    accept.accepted = error.is_none();
    if let Some(e) = error {
        // Keep the reply within the frame limit whatever the cause's length: 400 bytes
        // (not characters: multi-byte ones made 400 of them overflow the frame), cut
        // at a character boundary.
        let mut end = e.len().min(400);
        while !e.is_char_boundary(end) {
            end -= 1;
        }
        accept.error = e[..end].to_owned();
    }
    let body = accept.write_to_bytes().map_err(io::Error::other)?;
    let len = u16::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(body.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    conn.write_all(&frame)
}

fn serve(mut conn: Conn, registry: &dyn StdioRegistry) {
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let header = match read_header(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "stdio handshake refused");
            let _ = reply(&mut conn, Some(&e));
            return;
        }
    };
    let kind = header.stream.enum_value_or_default();
    let claimed = registry
        .find(&header.container_id, &header.exec_id)
        .ok_or_else(|| {
            format!(
                "no process ({:?}, {:?})",
                header.container_id, header.exec_id
            )
        })
        .and_then(|stdio| stdio.claim(kind).map(|(fd, bit)| (stdio, fd, bit)));
    let (stdio, fd, bit) = match claimed {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "stdio attach refused");
            let _ = reply(&mut conn, Some(&e));
            return;
        }
    };
    if let Err(e) = reply(&mut conn, None).and_then(|()| conn.set_read_timeout(None)) {
        tracing::warn!(error = %e, "stdio accept reply failed");
        return;
    }
    tracing::debug!(container = %header.container_id, exec = %header.exec_id, ?kind, "stream attached");
    let Some(fd) = fd else {
        stdio.attach_tty(conn);
        return;
    };
    if bit == STDIN_BIT {
        match conn.try_clone() {
            Ok(clone) => {
                let mut ends = stdio.lock();
                if ends.stdin_closed {
                    return;
                }
                ends.stdin_conn = Some(clone);
            }
            Err(e) => tracing::warn!(error = %e, "CloseStdin will not interrupt this stream"),
        }
    }
    stdio.attached.send_modify(|m| *m |= bit);
    drop(stdio);
    let mut pipe = File::from(fd);
    if bit == STDIN_BIT {
        // Ends when the host closes its side (or CloseStdin shuts ours); dropping the
        // pipe then gives the program EOF.
        if let Err(e) = pump(&mut conn, &mut pipe) {
            tracing::debug!(error = %e, "stdin stream ended");
        }
    } else {
        // EOF on the pipe means every writer closed it: all output is through.
        if let Err(e) = pump(&mut pipe, &mut conn) {
            tracing::debug!(error = %e, "output stream ended early");
        }
        let _ = conn.shutdown(Shutdown::Write);
    }
}

/// Copies until EOF through one fixed buffer: a slow reader stalls the writer instead
/// of growing a queue.
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Reads a pty master, ending cleanly where the process's side is gone: Linux answers
/// EIO once no slave descriptor is open.
struct MasterReader(File);

impl Read for MasterReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            other => other,
        }
    }
}

/// Copies a TTY stream both ways on two threads: the pty's output to the host until
/// the process's side is gone (then EOF to the host), and, with `input`, the host's
/// bytes into the pty until the host stops sending (or CloseStdin), then the
/// terminal's EOF character.
fn spawn_tty_copiers(conn: Conn, master: OwnedFd, input: bool) {
    let to_process = if input {
        match (conn.try_clone(), master.try_clone()) {
            (Ok(c), Ok(m)) => Some((c, m)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot copy the TTY stream's input");
                None
            }
        }
    } else {
        None
    };
    if let Some((mut from_host, master_in)) = to_process {
        let spawned = std::thread::Builder::new()
            .name("stdio-tty-in".into())
            .spawn(move || {
                let mut pty = File::from(master_in);
                if let Err(e) = pump(&mut from_host, &mut pty) {
                    tracing::debug!(error = %e, "tty input ended");
                }
                tty::send_eof(&OwnedFd::from(pty));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the tty input thread");
        }
    }
    let spawned = std::thread::Builder::new()
        .name("stdio-tty-out".into())
        .spawn(move || {
            let mut conn = conn;
            let mut pty = MasterReader(File::from(master));
            if let Err(e) = pump(&mut pty, &mut conn) {
                tracing::debug!(error = %e, "tty output ended early");
            }
            let _ = conn.shutdown(Shutdown::Write);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the tty output thread");
    }
}
