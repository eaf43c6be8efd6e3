//! Where the agent's log lines go.
//!
//! - Guest, default: `/dev/kmsg`, one record per event with the matching kernel log
//!   level, so the lines show on the serial console when the VMM enables one.
//! - Guest with `crx.log_port=N`: a vsock connection the agent opens to the host (CID 2,
//!   port N; the VMM hands it to `<vsock socket>_N`). Lines go through a bounded queue
//!   to a writer thread, so a slow host never stalls the agent; if the queue is full the
//!   line is dropped, and if the connection breaks the writer falls back to /dev/kmsg.
//! - Host mode: stderr.
//!
//! `log` records (ttrpc logs through `log`) are forwarded to the same place.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The host's CID: vsock connections from the guest to the host go here.
const HOST_CID: u32 = 2;
/// Lines queued for the log connection before new ones are dropped.
const STREAM_QUEUE: usize = 1024;
/// A kmsg record longer than this is cut by the kernel anyway.
const KMSG_MAX: usize = 1000;
/// How long [`flush`] waits for the host connection to take the queued lines.
const FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// The log stream's queue, for [`flush`]; unset unless logs go to the host.
static STREAM_QUEUE_HANDLE: OnceLock<SyncSender<Item>> = OnceLock::new();

/// What the log writer thread receives.
enum Item {
    Line(Level, Vec<u8>),
    /// Answer once every earlier line is written.
    Flush(SyncSender<()>),
}

/// Waits (boundedly) until the lines logged so far have left the agent. Call before
/// powering off, or the last lines (the interesting ones) would be lost. A no-op for
/// kmsg and stderr, which are written synchronously.
pub fn flush() {
    let Some(queue) = STREAM_QUEUE_HANDLE.get() else {
        return;
    };
    let (ack, done) = sync_channel(1);
    if queue.try_send(Item::Flush(ack)).is_ok() {
        let _ = done.recv_timeout(FLUSH_TIMEOUT);
    }
}

/// Why logging could not be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// /dev/kmsg could not be opened.
    #[error("cannot open /dev/kmsg")]
    Kmsg(#[source] io::Error),
    /// The log connection to the host could not be made.
    #[error("cannot connect to host vsock port {port} for logs")]
    Connect {
        port: u32,
        #[source]
        source: io::Error,
    },
    /// The log writer thread could not start.
    #[error("cannot start the log writer thread")]
    Thread(#[source] io::Error),
    /// A global subscriber was already installed.
    #[error("a log subscriber is already installed")]
    AlreadyInstalled,
    /// stderr could not be duplicated for the host-mode log.
    #[error("cannot duplicate stderr for the log")]
    Stderr(#[source] io::Error),
}

/// Where logs went, for the first log line.
#[derive(Debug)]
pub enum LogTarget {
    Kmsg,
    HostVsock(u32),
    Stderr,
}

impl std::fmt::Display for LogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogTarget::Kmsg => f.write_str("/dev/kmsg"),
            LogTarget::HostVsock(port) => write!(f, "host vsock port {port}"),
            LogTarget::Stderr => f.write_str("stderr"),
        }
    }
}

/// Guest mode: stream to `log_port` if given, else (or if that fails) /dev/kmsg.
/// Returns where logs go, and the reason the stream could not be used, if any.
pub fn init_guest(
    level: LevelFilter,
    log_port: Option<u32>,
) -> Result<(LogTarget, Option<LoggingError>), LoggingError> {
    let mut stream_error = None;
    if let Some(port) = log_port {
        match StreamSink::connect(port) {
            Ok(sink) => {
                install(Sink::Stream(sink), level)?;
                return Ok((LogTarget::HostVsock(port), None));
            }
            Err(e) => stream_error = Some(e),
        }
    }
    install(Sink::Kmsg(Kmsg::open()?), level)?;
    Ok((LogTarget::Kmsg, stream_error))
}

/// Host mode: stderr.
pub fn init_host(level: LevelFilter) -> Result<LogTarget, LoggingError> {
    // A private copy of stderr: a container process the agent starts keeps logging
    // through the agent's subscriber until it execs, after its own stdio is already on
    // fds 0-2, and those lines belong in the agent's log, not in the container's stderr.
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(LoggingError::Stderr)?;
    install(Sink::Stderr(File::from(stderr)), level)?;
    Ok(LogTarget::Stderr)
}

fn install(sink: Sink, level: LevelFilter) -> Result<(), LoggingError> {
    use tracing_subscriber::util::SubscriberInitExt;
    let kernel_stamps_time = matches!(sink, Sink::Kmsg(_));
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(SinkWriter(Arc::new(sink)));
    // The kernel stamps kmsg records itself; elsewhere, time since the agent started is
    // what matters (the guest has no wall clock worth trusting this early).
    let result = if kernel_stamps_time {
        builder.without_time().finish().try_init()
    } else {
        builder
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .finish()
            .try_init()
    };
    result.map_err(|_| LoggingError::AlreadyInstalled)
}

enum Sink {
    Kmsg(Kmsg),
    Stream(StreamSink),
    Stderr(File),
}

/// Hands tracing one writer per event.
struct SinkWriter(Arc<Sink>);

impl<'a> MakeWriter<'a> for SinkWriter {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            sink: &self.0,
            level: Level::INFO,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EventWriter {
            sink: &self.0,
            level: *meta.level(),
        }
    }
}

/// Receives one formatted event (tracing's fmt layer writes each event with a single
/// `write_all`), and passes it on whole.
struct EventWriter<'a> {
    sink: &'a Sink,
    level: Level,
}

impl Write for EventWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.sink {
            Sink::Kmsg(kmsg) => kmsg.write_record(self.level, buf),
            Sink::Stream(stream) => stream.queue(self.level, buf),
            Sink::Stderr(file) => {
                let _ = (&*file).write_all(buf);
            }
        }
        // A log line that cannot be written is dropped, never an error for the caller.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `/dev/kmsg`, opened once.
struct Kmsg(File);

impl Kmsg {
    fn open() -> Result<Kmsg, LoggingError> {
        OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .map(Kmsg)
            .map_err(LoggingError::Kmsg)
    }

    /// One write is one kernel log record; `<N>` sets its priority.
    fn write_record(&self, level: Level, line: &[u8]) {
        let priority = match level {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = &line[..line.len().min(KMSG_MAX)];
        let mut record = Vec::with_capacity(line.len() + 16);
        record.extend_from_slice(format!("<{priority}>crx-agent: ").as_bytes());
        record.extend_from_slice(line);
        record.push(b'\n');
        let _ = (&self.0).write(&record);
    }
}

/// The log connection to the host, fed through a bounded queue.
struct StreamSink {
    queue: SyncSender<Item>,
    dropped: Arc<AtomicU64>,
}

impl StreamSink {
    fn connect(port: u32) -> Result<StreamSink, LoggingError> {
        let stream = vsock::VsockStream::connect_with_cid_port(HOST_CID, port)
            .map_err(|source| LoggingError::Connect { port, source })?;
        // A host that stops reading must not wedge the writer thread forever either.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let (queue, lines) = sync_channel::<Item>(STREAM_QUEUE);
        let _ = STREAM_QUEUE_HANDLE.set(queue.clone());
        let dropped = Arc::new(AtomicU64::new(0));
        let dropped_in_thread = dropped.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                write_stream(stream, lines, port, dropped_in_thread, || Kmsg::open().ok())
            })
            .map_err(LoggingError::Thread)?;
        Ok(StreamSink { queue, dropped })
    }

    fn queue(&self, level: Level, line: &[u8]) {
        match self.queue.try_send(Item::Line(level, line.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The writer thread: host connection while it works, /dev/kmsg after it breaks.
fn write_stream<W: Write>(
    mut stream: W,
    items: std::sync::mpsc::Receiver<Item>,
    port: u32,
    dropped: Arc<AtomicU64>,
    open_fallback: impl FnOnce() -> Option<Kmsg>,
) {
    enum Out {
        Host,
        Kmsg(Kmsg),
        Nowhere,
    }
    let mut out = Out::Host;
    let mut open_fallback = Some(open_fallback);
    let mut reported_drops = 0;
    for item in items {
        let (level, line) = match item {
            Item::Line(level, line) => (level, line),
            Item::Flush(ack) => {
                let _ = ack.try_send(());
                continue;
            }
        };
        let drops = dropped.load(Ordering::Relaxed);
        let note = (drops != reported_drops).then(|| {
            let n = drops - reported_drops;
            reported_drops = drops;
            format!("crx-agent: {n} log lines dropped (log queue full)\n").into_bytes()
        });
        if let Out::Host = out {
            let sent = note
                .as_deref()
                .map_or(Ok(()), |n| stream.write_all(n))
                .and_then(|()| stream.write_all(&line));
            let Err(e) = sent else { continue };
            out = match open_fallback.take().and_then(|open| open()) {
                Some(kmsg) => {
                    let msg = format!(
                        "log stream to host vsock port {port} broke ({e}); logging to /dev/kmsg from now on"
                    );
                    kmsg.write_record(Level::WARN, msg.as_bytes());
                    Out::Kmsg(kmsg)
                }
                None => Out::Nowhere,
            };
        }
        if let Out::Kmsg(kmsg) = &out {
            kmsg.write_record(level, &line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;

    fn start(
        host: UnixStream,
        fallback_file: Option<File>,
    ) -> (
        SyncSender<Item>,
        Arc<AtomicU64>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = sync_channel(16);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let thread = std::thread::spawn(move || {
            write_stream(host, rx, 1025, d, move || fallback_file.map(Kmsg))
        });
        (tx, dropped, thread)
    }

    fn flush(tx: &SyncSender<Item>) {
        let (ack, done) = sync_channel(1);
        tx.send(Item::Flush(ack)).unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("flush not acknowledged");
    }

    #[test]
    fn lines_reach_the_host_in_order_and_flush_waits_for_them() {
        let (agent_end, host_end) = UnixStream::pair().unwrap();
        let (tx, dropped, thread) = start(agent_end, None);
        tx.send(Item::Line(Level::INFO, b"one\n".to_vec())).unwrap();
        flush(&tx);
        // Two lines lost to a full queue: the next line that goes out says so first.
        dropped.fetch_add(2, Ordering::Relaxed);
        tx.send(Item::Line(Level::WARN, b"two\n".to_vec())).unwrap();
        flush(&tx);
        drop(tx);
        thread.join().unwrap();
        let mut got = String::new();
        BufReader::new(host_end).read_to_string(&mut got).unwrap();
        assert_eq!(
            got,
            "one\ncrx-agent: 2 log lines dropped (log queue full)\ntwo\n"
        );
    }

    #[test]
    fn a_broken_stream_falls_back_to_kmsg_with_levels() {
        let (agent_end, host_end) = UnixStream::pair().unwrap();
        let kmsg_path = std::env::temp_dir().join(format!("crx-fake-kmsg-{}", std::process::id()));
        let kmsg = File::create(&kmsg_path).unwrap();
        let (tx, _dropped, thread) = start(agent_end, Some(kmsg));
        tx.send(Item::Line(Level::INFO, b"to host\n".to_vec()))
            .unwrap();
        flush(&tx);
        let mut first = String::new();
        BufReader::new(&host_end).read_line(&mut first).unwrap();
        assert_eq!(first, "to host\n");
        drop(host_end);
        tx.send(Item::Line(Level::ERROR, b"after the break\n".to_vec()))
            .unwrap();
        flush(&tx);
        drop(tx);
        thread.join().unwrap();
        let records = std::fs::read_to_string(&kmsg_path).unwrap();
        let _ = std::fs::remove_file(&kmsg_path);
        let lines: Vec<&str> = records.lines().collect();
        assert_eq!(lines.len(), 2, "{records}");
        assert!(
            lines[0].starts_with("<4>crx-agent: log stream to host vsock port 1025 broke"),
            "{records}"
        );
        assert_eq!(lines[1], "<3>crx-agent: after the break");
    }
}
