//! Splices containerd's stdio FIFOs to the agent's per-stream vsock connections (see
//! the protocol's `stdio.proto`): each declared stream is one connection to guest port
//! `STDIO_VSOCK_PORT` that starts with a `CRXS` header naming the process and stream.
//! Streams are attached after the agent created the process and before it starts it,
//! so no output is lost. A stream's copier ends when either side closes; closing the
//! FIFO then lets containerd's log copier (and `ctr`) see EOF.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crx_protocols::hybrid_vsock;
use crx_protocols::v1::container::StdioSpec;
use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
use protobuf::Message;
use tokio::task::JoinHandle;

use crate::process::StdioPaths;

const MAGIC: &[u8; 4] = b"CRXS";
/// Largest header or accept message (stdio.proto).
const MAX_FRAME: usize = 512;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a stream could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("connecting the {stream:?} stream to the agent")]
    Connect {
        stream: StreamKind,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent refused the {stream:?} stream: {reason}")]
    Refused { stream: StreamKind, reason: String },
    #[error("opening containerd's FIFO {path:?}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Join(String),
}

/// The streams a process declares to the agent, from containerd's FIFO paths.
pub fn spec_of(paths: &StdioPaths) -> StdioSpec {
    let mut s = StdioSpec::new();
    s.terminal = paths.terminal;
    s.stdin = !paths.stdin.is_empty();
    s.stdout = !paths.terminal && !paths.stdout.is_empty();
    s.stderr = !paths.terminal && !paths.stderr.is_empty();
    s
}

/// The copiers of one process's streams.
#[derive(Debug, Default)]
pub struct Streams {
    copiers: Vec<JoinHandle<()>>,
    /// How many output copiers are still writing to containerd's FIFOs.
    output_left: OutputLeft,
    stdin: Option<JoinHandle<()>>,
    /// Tells the stdin copier to stop: it waits on a FIFO whose writer may never come,
    /// and a blocking thread that never ends would keep the shim from exiting.
    stdin_stop: Arc<AtomicBool>,
}

impl Streams {
    /// Stops feeding stdin (CloseIO): the agent's CloseStdin gives the program EOF.
    pub fn close_stdin(&mut self) {
        self.stdin_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }

    /// A handle to wait on until every output copier has written all it got and
    /// closed its FIFO. Every reporter of the exit waits on it (outside the state
    /// lock): whichever reporter records the exit first, containerd must not learn of
    /// it before the output, since `ctr run` closes its FIFOs once the task is deleted.
    pub fn output_drained(&self) -> OutputDrained {
        OutputDrained(self.output_left.0.subscribe())
    }
}

/// The number of output copiers still running, shared with the copiers.
#[derive(Debug, Clone)]
struct OutputLeft(Arc<tokio::sync::watch::Sender<usize>>);

impl Default for OutputLeft {
    fn default() -> Self {
        OutputLeft(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl OutputLeft {
    /// Counts one more running copier; the guard counts it out when dropped, however
    /// the copier ends.
    fn enter(&self) -> OutputCopierGuard {
        self.0.send_modify(|n| *n += 1);
        OutputCopierGuard(self.clone())
    }
}

struct OutputCopierGuard(OutputLeft);

impl Drop for OutputCopierGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// See [`Streams::output_drained`].
#[derive(Debug, Clone)]
pub struct OutputDrained(tokio::sync::watch::Receiver<usize>);

impl OutputDrained {
    /// Waits, at most `timeout`, until no output copier is left; true if none is.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, self.0.wait_for(|left| *left == 0)).await {
            // A dropped sender means the streams and every copier are gone.
            Ok(_) => true,
            Err(_) => {
                tracing::warn!("an output stream did not reach EOF in time");
                false
            }
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stdin_stop.store(true, Ordering::SeqCst);
        for h in self.copiers.iter().chain(self.stdin.iter()) {
            h.abort();
        }
    }
}

/// Connects every declared stream of (container, exec) and starts its copier.
pub async fn attach(
    agent_socket: &Path,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> Result<Streams, StdioError> {
    let mut streams = Streams::default();
    let wanted: Vec<(StreamKind, &str)> = if paths.terminal {
        vec![(StreamKind::STREAM_KIND_TTY, "")]
    } else {
        [
            (StreamKind::STREAM_KIND_STDIN, paths.stdin.as_str()),
            (StreamKind::STREAM_KIND_STDOUT, paths.stdout.as_str()),
            (StreamKind::STREAM_KIND_STDERR, paths.stderr.as_str()),
        ]
        .into_iter()
        .filter(|(_, p)| !p.is_empty())
        .collect()
    };
    for (kind, _) in wanted {
        let conn = connect(agent_socket, container_id, exec_id, kind).await?;
        match kind {
            StreamKind::STREAM_KIND_STDIN => {
                let fifo = open_fifo(&paths.stdin, false).await?;
                let fifo = StdinFifo::new(fifo, streams.stdin_stop.clone());
                streams.stdin = Some(spawn_copy(fifo, conn, true, None));
            }
            StreamKind::STREAM_KIND_STDOUT => {
                let fifo = open_fifo(&paths.stdout, true).await?;
                streams.spawn_output(conn, fifo);
            }
            StreamKind::STREAM_KIND_STDERR => {
                let fifo = open_fifo(&paths.stderr, true).await?;
                streams.spawn_output(conn, fifo);
            }
            _ => {
                let out = conn.try_clone().map_err(|source| StdioError::Connect {
                    stream: kind,
                    source,
                })?;
                if !paths.stdin.is_empty() {
                    let fifo = open_fifo(&paths.stdin, false).await?;
                    let fifo = StdinFifo::new(fifo, streams.stdin_stop.clone());
                    streams.stdin = Some(spawn_copy(fifo, conn, true, None));
                }
                if !paths.stdout.is_empty() {
                    let fifo = open_fifo(&paths.stdout, true).await?;
                    streams.spawn_output(out, fifo);
                }
            }
        }
    }
    Ok(streams)
}

impl Streams {
    /// Starts copying one guest output stream into containerd's FIFO.
    fn spawn_output(&mut self, from: UnixStream, to: std::fs::File) {
        let running = self.output_left.enter();
        self.copiers
            .push(spawn_copy(from, to, false, Some(running)));
    }
}

/// Opens a FIFO containerd created. An output FIFO is opened blocking (containerd
/// holds its read end before Create). The stdin FIFO is opened without blocking and
/// read through [`StdinFifo`]: its writer (ctr, containerd's CRI) may have come and
/// gone already, or come later, and a blocking open would wait for one forever,
/// holding Create.
async fn open_fifo(path: &str, write: bool) -> Result<std::fs::File, StdioError> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = PathBuf::from(path);
    tokio::task::spawn_blocking(move || {
        let mut options = std::fs::OpenOptions::new();
        options.read(!write).write(write);
        if !write {
            options.custom_flags(libc::O_NONBLOCK);
        }
        options
            .open(&p)
            .map_err(|source| StdioError::Fifo { path: p, source })
    })
    .await
    .map_err(|e| StdioError::Join(e.to_string()))?
}

/// The read end of the stdin FIFO, opened non-blocking. A read waits in poll(2)
/// first: Linux reports a FIFO reader neither readable nor hung up until a writer
/// that opened after it has written or closed, so a read never mistakes "no writer
/// yet" for EOF. The wait is sliced so that a stop request ends it (as EOF).
struct StdinFifo {
    fifo: std::fs::File,
    stop: Arc<AtomicBool>,
}

/// How often a waiting stdin copier looks at its stop flag.
const STDIN_STOP_CHECK_MS: i32 = 200;

impl StdinFifo {
    fn new(fifo: std::fs::File, stop: Arc<AtomicBool>) -> Self {
        StdinFifo { fifo, stop }
    }
}

impl Read for StdinFifo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(0);
            }
            let mut pfd = libc::pollfd {
                fd: self.fifo.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, STDIN_STOP_CHECK_MS) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                continue;
            }
            match self.fifo.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Copies `from` to `to` on a blocking thread until EOF or an error; with
/// `shutdown_write`, half-closes the socket afterwards so the guest reads EOF. An
/// output copier's `running` guard is dropped only after `to` is closed, so a waiter
/// on [`Streams::output_drained`] knows containerd's reader can see EOF.
fn spawn_copy<R, W>(
    mut from: R,
    mut to: W,
    shutdown_write: bool,
    running: Option<OutputCopierGuard>,
) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write + Send + AsHalfClose + 'static,
{
    tokio::task::spawn_blocking(move || {
        if let Err(e) = copy_through_buffer(&mut from, &mut to) {
            tracing::debug!(error = %e, "stdio copy ended");
        }
        let _ = to.flush();
        if shutdown_write {
            to.half_close();
        }
        drop(to);
        drop(running);
    })
}

/// Copies until EOF through a buffer of our own. `std::io::copy` would splice(2)
/// from the socket into the FIFO, and splice holds the FIFO's pipe lock while it
/// waits for the socket: a reader closing its end (ctr detaching, containerd's log
/// copier) would then hang in close until the container printed something.
fn copy_through_buffer(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Writers that can signal EOF without closing the read side.
trait AsHalfClose {
    fn half_close(&mut self) {}
}
impl AsHalfClose for UnixStream {
    fn half_close(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}
impl AsHalfClose for std::fs::File {}

/// One stream connection with its accepted handshake.
async fn connect(
    agent_socket: &Path,
    container_id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<UnixStream, StdioError> {
    let mut header = StreamHeader::new();
    header.container_id = container_id.to_owned();
    header.exec_id = exec_id.to_owned();
    header.stream = kind.into();
    let socket = agent_socket.to_path_buf();
    tokio::task::spawn_blocking(move || handshake(&socket, &header, kind))
        .await
        .map_err(|e| StdioError::Join(e.to_string()))?
}

fn handshake(
    socket: &Path,
    header: &StreamHeader,
    kind: StreamKind,
) -> Result<UnixStream, StdioError> {
    let io = |source| StdioError::Connect {
        stream: kind,
        source,
    };
    let mut conn =
        hybrid_vsock::connect(socket, crx_protocols::STDIO_VSOCK_PORT, HANDSHAKE_TIMEOUT)
            .map_err(io)?;
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    conn.write_all(&frame_header(header).map_err(io)?)
        .map_err(io)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).map_err(io)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MAX_FRAME {
        return Err(StdioError::Refused {
            stream: kind,
            reason: format!("accept message of {len} bytes is out of bounds"),
        });
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).map_err(io)?;
    let accept = StreamAccept::parse_from_bytes(&body).map_err(|e| StdioError::Refused {
        stream: kind,
        reason: format!("malformed accept message: {e}"),
    })?;
    if !accept.accepted {
        return Err(StdioError::Refused {
            stream: kind,
            reason: accept.error.chars().take(MAX_FRAME).collect(),
        });
    }
    conn.set_read_timeout(None).map_err(io)?;
    Ok(conn)
}

/// `CRXS`, the header's length (u16 big-endian), the header.
fn frame_header(header: &StreamHeader) -> std::io::Result<Vec<u8>> {
    let body = header.write_to_bytes().map_err(std::io::Error::other)?;
    if body.is_empty() || body.len() > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "stream header of {} bytes is out of bounds",
            body.len()
        )));
    }
    let len = u16::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_frame_is_magic_length_body() {
        let mut h = StreamHeader::new();
        h.container_id = "c1".into();
        h.stream = StreamKind::STREAM_KIND_STDOUT.into();
        let f = frame_header(&h).unwrap();
        assert_eq!(&f[..4], b"CRXS");
        let len = usize::from(u16::from_be_bytes([f[4], f[5]]));
        assert_eq!(len, f.len() - 6);
        let back = StreamHeader::parse_from_bytes(&f[6..]).unwrap();
        assert_eq!(back.container_id, "c1");
    }

    /// A stdin FIFO whose writer already came and went (ctr with stdin at EOF) is
    /// opened at once instead of holding Create; a later writer's bytes and its close
    /// arrive as data and EOF, and no read mistakes "no writer yet" for EOF.
    #[test]
    fn the_stdin_fifo_opens_without_a_writer_and_reads_to_the_real_eof() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let path = fifo.to_string_lossy().into_owned();
        let opened = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), open_fifo(&path, false)).await
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = StdinFifo::new(opened.expect("open blocked").unwrap(), stop.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(b"late input").unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, b"late input");

        // A writer that never comes: the stop request ends the wait as EOF.
        let path = dir.path().join("stdin2");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let path = path.to_string_lossy().into_owned();
        let file = rt.block_on(open_fifo(&path, false)).unwrap();
        let mut reader = StdinFifo::new(file, stop.clone());
        stop.store(true, Ordering::SeqCst);
        assert_eq!(reader.read(&mut [0u8; 8]).unwrap(), 0);
    }

    /// A stand-in for the VMM and the agent's stdio port: accepts one connection,
    /// checks the CONNECT line and the CRXS header, answers `accept`, then writes
    /// `output` and closes. Returns the header it got.
    fn fake_agent(
        listener: std::os::unix::net::UnixListener,
        accept: StreamAccept,
        output: &'static [u8],
    ) -> std::thread::JoinHandle<StreamHeader> {
        fake_agent_gated(listener, accept, output, None)
    }

    /// [`fake_agent`] that writes `output` only once `gate` fires (or is dropped).
    fn fake_agent_gated(
        listener: std::os::unix::net::UnixListener,
        accept: StreamAccept,
        output: &'static [u8],
        gate: Option<std::sync::mpsc::Receiver<()>>,
    ) -> std::thread::JoinHandle<StreamHeader> {
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1026");
            conn.write_all(b"OK 5000\n").unwrap();
            let mut magic = [0u8; 6];
            conn.read_exact(&mut magic).unwrap();
            assert_eq!(&magic[..4], b"CRXS");
            let mut body = vec![0u8; usize::from(u16::from_be_bytes([magic[4], magic[5]]))];
            conn.read_exact(&mut body).unwrap();
            let header = StreamHeader::parse_from_bytes(&body).unwrap();
            let reply = accept.write_to_bytes().unwrap();
            conn.write_all(&u16::try_from(reply.len()).unwrap().to_be_bytes())
                .unwrap();
            conn.write_all(&reply).unwrap();
            if let Some(gate) = gate {
                let _ = gate.recv();
            }
            conn.write_all(output).unwrap();
            header
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn stdout_reaches_containerds_fifo_and_ends_with_eof() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.vsock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut ok = StreamAccept::new();
        ok.accepted = true;
        let agent = fake_agent(listener, ok, b"hello from the guest");
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // containerd holds the read end: a reader thread stands in for it.
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
        let paths = StdioPaths {
            stdout: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let rt = runtime();
        rt.block_on(async {
            let streams = attach(&socket, "c1", "e1", &paths).await.unwrap();
            assert!(streams.output_drained().wait(Duration::from_secs(10)).await);
        });
        let header = agent.join().unwrap();
        assert_eq!(header.container_id, "c1");
        assert_eq!(header.exec_id, "e1");
        assert_eq!(
            header.stream.enum_value(),
            Ok(StreamKind::STREAM_KIND_STDOUT)
        );
        assert_eq!(reader.join().unwrap(), b"hello from the guest");
    }

    /// A process's exit has two reporters (WaitProcess and the event stream). Each
    /// must wait until the output is in containerd's FIFO and the FIFO closed, not
    /// only the first: the other publishing the exit early let `ctr run --rm` close
    /// its FIFO before the output came, which was lost with EPIPE.
    #[test]
    fn every_waiter_sees_the_output_drained_only_after_it_reached_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.vsock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut ok = StreamAccept::new();
        ok.accepted = true;
        let (release, gate) = std::sync::mpsc::channel();
        let agent = fake_agent_gated(listener, ok, b"late output\n", Some(gate));
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::read(reader_path).unwrap());
        let paths = StdioPaths {
            stdout: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let rt = runtime();
        rt.block_on(async {
            let streams = attach(&socket, "c1", "", &paths).await.unwrap();
            let first = streams.output_drained();
            let second = streams.output_drained();
            // The guest has not sent its output yet: no waiter may call it drained.
            assert!(!first.clone().wait(Duration::from_millis(200)).await);
            assert!(!second.clone().wait(Duration::from_millis(200)).await);
            release.send(()).unwrap();
            let (a, b) = tokio::join!(
                first.wait(Duration::from_secs(10)),
                second.wait(Duration::from_secs(10))
            );
            assert!(a && b, "a waiter timed out: {a} {b}");
            // Drained means the FIFO's write end is closed, with the streams still
            // held: containerd's reader reaches EOF.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !reader.is_finished() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(reader.is_finished(), "the FIFO reader saw no EOF");
            drop(streams);
        });
        agent.join().unwrap();
        assert_eq!(reader.join().unwrap(), b"late output\n");
    }

    #[test]
    fn a_refused_stream_is_an_error_with_the_agents_reason() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.vsock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut no = StreamAccept::new();
        no.error = "stream stdout was not declared".into();
        let agent = fake_agent(listener, no, b"");
        let paths = StdioPaths {
            stdout: dir.path().join("unused").to_string_lossy().into_owned(),
            ..Default::default()
        };
        let err = runtime()
            .block_on(attach(&socket, "c1", "", &paths))
            .expect_err("refused stream accepted");
        agent.join().unwrap();
        assert!(err.to_string().contains("was not declared"), "{err}");
    }

    #[test]
    fn a_terminal_process_declares_one_tty_stream() {
        let tty = spec_of(&StdioPaths {
            stdin: "/in".into(),
            stdout: "/out".into(),
            stderr: String::new(),
            terminal: true,
        });
        assert!(tty.terminal && tty.stdin && !tty.stdout && !tty.stderr);
        let plain = spec_of(&StdioPaths {
            stdin: String::new(),
            stdout: "/out".into(),
            stderr: "/err".into(),
            terminal: false,
        });
        assert!(!plain.terminal && !plain.stdin && plain.stdout && plain.stderr);
    }
}
