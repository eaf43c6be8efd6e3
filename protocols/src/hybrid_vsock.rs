//! The host side of the VMM's hybrid vsock: how a host process reaches a guest port.
//!
//! The VMM exposes the VM's vsock as one Unix socket. A host process connects to it,
//! writes `CONNECT <port>\n`, and the VMM answers `OK <hostport>\n` once the guest has
//! accepted the connection on `<port>`; from then on the stream carries the guest's
//! bytes. If nothing listens on the guest port, the VMM closes the stream instead.
//!
//! The reply line is read one byte at a time: the guest may speak right after the
//! handshake, and a buffered reader would swallow those bytes. Everything the VMM sends
//! is treated as untrusted: the line is bounded and must parse exactly.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::v1::agent_ttrpc::AgentClient;
use crate::v1::health::{CheckRequest, VersionRequest, VersionResponse};
use crate::v1::health_ttrpc::HealthClient;
use crate::v1::storage_ttrpc::StorageClient;

/// The longest reply line accepted, newline included: `OK 4294967295\n` is 14 bytes.
const MAX_REPLY_LEN: usize = 32;

/// Connects to guest vsock `port` through the VMM's hybrid-vsock socket at `uds_path`.
///
/// `timeout` bounds the whole handshake. Errors: whatever `connect(2)` says (the socket
/// does not exist yet, nobody listens), `TimedOut` when the VMM does not answer in time,
/// `ConnectionAborted` when the VMM closes the stream (usually: nothing listens on that
/// guest port yet), `InvalidData` for any reply other than `OK <number>\n`.
///
/// The returned stream is blocking and has no timeouts set.
pub fn connect(uds_path: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(uds_path)?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(timeout_kind)?;
    read_ok_reply(&mut stream, deadline)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Reads the VMM's reply line and returns the host port it names.
fn read_ok_reply(stream: &mut UnixStream, deadline: Instant) -> io::Result<u32> {
    let mut line = Vec::with_capacity(MAX_REPLY_LEN);
    let mut byte = [0u8; 1];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the VMM closed the hybrid-vsock connection before answering \
                     (is anything listening on that guest port yet?)",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timeout_kind(e)),
        }
        if byte[0] == b'\n' {
            return parse_ok_reply(&line);
        }
        line.push(byte[0]);
        if line.len() >= MAX_REPLY_LEN {
            return Err(bad_reply(&line, "reply line too long"));
        }
    }
}

/// Parses `OK <hostport>` (the line without its newline).
fn parse_ok_reply(line: &[u8]) -> io::Result<u32> {
    let text = std::str::from_utf8(line).map_err(|_| bad_reply(line, "not UTF-8"))?;
    let port = text
        .strip_prefix("OK ")
        .ok_or_else(|| bad_reply(line, "expected `OK <port>`"))?;
    // `u32::from_str` would accept a leading `+`; the protocol has digits only.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_reply(line, "port is not a decimal number"));
    }
    port.parse()
        .map_err(|_| bad_reply(line, "port out of range"))
}

fn bad_reply(line: &[u8], why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "unexpected hybrid-vsock reply {:?}: {why}",
            String::from_utf8_lossy(line)
        ),
    )
}

/// Time left until `deadline`, or `TimedOut` if none is left (a zero socket timeout
/// would mean "wait forever").
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "hybrid-vsock handshake timed out",
        ));
    }
    Ok(left)
}

/// Socket timeouts surface as `WouldBlock`; callers should see `TimedOut`.
fn timeout_kind(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "hybrid-vsock handshake timed out")
    } else {
        e
    }
}

/// Turns a connected stream (after the handshake, or a plain Unix connection to a
/// host-mode agent) into a ttrpc client. Must be called inside a tokio runtime: the
/// client spawns its connection task there.
pub fn ttrpc_client(stream: UnixStream) -> io::Result<ttrpc::r#async::Client> {
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    Ok(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(stream),
    ))
}

/// How a host reaches an agent.
#[derive(Clone, Debug)]
pub enum AgentAddress {
    /// Through a VMM's hybrid-vsock socket, to this guest port.
    HybridVsock {
        /// The VMM's Unix socket.
        uds_path: std::path::PathBuf,
        /// The agent's vsock port (normally [`crate::AGENT_VSOCK_PORT`]).
        port: u32,
    },
    /// A host-mode agent's own Unix socket.
    Unix(std::path::PathBuf),
}

impl AgentAddress {
    /// One connection attempt, bounded by `timeout`.
    pub fn connect(&self, timeout: Duration) -> io::Result<UnixStream> {
        match self {
            AgentAddress::HybridVsock { uds_path, port } => connect(uds_path, *port, timeout),
            AgentAddress::Unix(path) => UnixStream::connect(path),
        }
    }
}

/// Clients of every agent service, sharing one connection.
#[derive(Clone)]
pub struct AgentClients {
    /// `crx.agent.v1.Health`.
    pub health: HealthClient,
    /// `crx.agent.v1.Agent`.
    pub agent: AgentClient,
    /// `crx.agent.v1.Storage` (protocol version 2).
    pub storage: StorageClient,
    /// The connection itself, for clients of further services (Sandbox, Containers)
    /// without a second handshake through the VMM.
    pub client: ttrpc::r#async::Client,
}

impl AgentClients {
    /// Wraps one ttrpc connection.
    pub fn new(client: ttrpc::r#async::Client) -> Self {
        AgentClients {
            health: HealthClient::new(client.clone()),
            agent: AgentClient::new(client.clone()),
            storage: StorageClient::new(client.clone()),
            client,
        }
    }
}

/// Connects once (off the async threads: the handshake blocks) and wraps the stream.
pub async fn connect_clients(addr: &AgentAddress, timeout: Duration) -> io::Result<AgentClients> {
    let addr = addr.clone();
    let stream = tokio::task::spawn_blocking(move || addr.connect(timeout))
        .await
        .map_err(io::Error::other)??;
    Ok(AgentClients::new(ttrpc_client(stream)?))
}

/// A ttrpc context whose deadline is `deadline` (at least one millisecond away, so an
/// almost-expired deadline still yields a bounded call rather than an unbounded one:
/// ttrpc treats a zero timeout as "none").
pub fn context_until(deadline: Instant) -> ttrpc::context::Context {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    ttrpc::context::with_timeout(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX))
}

/// What [`wait_for_agent`] found.
pub struct ReadyAgent {
    /// Clients on the connection that answered.
    pub clients: AgentClients,
    /// The agent's `Health.Version` reply.
    pub version: VersionResponse,
    /// Connection attempts made (1 if the agent answered at once).
    pub attempts: u32,
}

/// Waits for an agent to answer: connects, calls `Health.Check` (which must say
/// SERVING) and `Health.Version`, and retries the whole sequence with a short backoff
/// until `deadline`. This is the "wait for the VM to boot" step; the backoff starts
/// small so the measured time to ready stays close to the real one.
///
/// On timeout the error is `TimedOut` and names the last failure.
pub async fn wait_for_agent(addr: &AgentAddress, deadline: Instant) -> io::Result<ReadyAgent> {
    let mut delay = Duration::from_millis(2);
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let left = deadline.saturating_duration_since(Instant::now());
        let last_error = match try_agent(addr, left, deadline).await {
            Ok((clients, version)) => {
                return Ok(ReadyAgent {
                    clients,
                    version,
                    attempts,
                })
            }
            Err(e) => e,
        };
        let now = Instant::now();
        if now + delay >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("agent did not answer within the deadline ({attempts} attempts; last error: {last_error})"),
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 3 / 2).min(Duration::from_millis(50));
    }
}

async fn try_agent(
    addr: &AgentAddress,
    left: Duration,
    deadline: Instant,
) -> io::Result<(AgentClients, VersionResponse)> {
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    let clients = connect_clients(addr, left).await?;
    let check = clients
        .health
        .check(context_until(deadline), &CheckRequest::new())
        .await
        .map_err(io::Error::other)?;
    let serving = crate::v1::health::check_response::ServingStatus::SERVING;
    if check.status.enum_value() != Ok(serving) {
        return Err(io::Error::other(format!(
            "agent is up but not serving (status {:?})",
            check.status
        )));
    }
    let version = clients
        .health
        .version(context_until(deadline), &VersionRequest::new())
        .await
        .map_err(io::Error::other)?;
    Ok((clients, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A stand-in VMM: accepts one connection, checks the CONNECT line, then writes
    /// `reply` in a single write.
    fn fake_vmm(reply: &'static [u8]) -> (tempdir::Dir, std::thread::JoinHandle<String>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("vsock.sock")).unwrap();
        let handle = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                got.push(byte[0]);
            }
            conn.write_all(reply).unwrap();
            // Hold the stream open until the client is done with it.
            let _ = conn.read(&mut byte);
            String::from_utf8(got).unwrap()
        });
        (dir, handle)
    }

    #[test]
    fn handshake_keeps_the_bytes_after_the_ok_line() {
        let (dir, vmm) = fake_vmm(b"OK 3074\nagent says hi");
        let mut stream = connect(&dir.path().join("vsock.sock"), 1024, Duration::from_secs(5))
            .expect("handshake");
        let mut buf = [0u8; 13];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"agent says hi");
        drop(stream);
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024");
    }

    #[test]
    fn handshake_rejects_other_replies() {
        for reply in [
            &b"NO 1024\n"[..],
            b"OK\n",
            b"OK +12\n",
            b"OK 99999999999\n",
            b"OK 12 extra\n",
            b"OKOKOKOKOKOKOKOKOKOKOKOKOKOKOKOKOKOKOKOK\n",
        ] {
            let reply: &'static [u8] = reply;
            let (dir, vmm) = fake_vmm(reply);
            let err = connect(&dir.path().join("vsock.sock"), 1024, Duration::from_secs(5))
                .expect_err("bad reply accepted");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{reply:?}: {err}");
            vmm.join().unwrap();
        }
    }

    #[test]
    fn handshake_times_out_when_the_vmm_is_silent() {
        let dir = tempdir::Dir::new();
        let _listener = UnixListener::bind(dir.path().join("vsock.sock")).unwrap();
        let started = Instant::now();
        let err = connect(
            &dir.path().join("vsock.sock"),
            1024,
            Duration::from_millis(100),
        )
        .expect_err("silence accepted");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn handshake_reports_a_closed_connection() {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("vsock.sock")).unwrap();
        let vmm = thread::spawn(move || drop(listener.accept().unwrap()));
        let err = connect(&dir.path().join("vsock.sock"), 1024, Duration::from_secs(5))
            .expect_err("closed stream accepted");
        vmm.join().unwrap();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ),
            "{err}"
        );
    }

    #[test]
    fn wait_for_agent_gives_up_at_the_deadline() {
        let dir = tempdir::Dir::new();
        let addr = AgentAddress::HybridVsock {
            uds_path: dir.path().join("missing.sock"),
            port: 1024,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let result = rt.block_on(wait_for_agent(
            &addr,
            Instant::now() + Duration::from_millis(200),
        ));
        let err = result.err().expect("no agent, yet it answered");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("No such file"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// A throwaway directory under the system temp dir, removed on drop.
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "crx-hvsock-test-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
