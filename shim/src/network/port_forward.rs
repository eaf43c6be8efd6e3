//! CRI port forwarding into a pod VM. containerd's PortForward enters the pod's network
//! namespace on the host and dials `localhost:PORT` there; in a crx pod that namespace
//! holds only the mirrored veth, the pod's sockets live in the guest. So while the pod
//! runs, the shim long-polls the agent for the TCP ports that listen in the guest (the
//! agent answers when they change, or after [`LIST_WAIT`]), keeps a listener on
//! `127.0.0.1:PORT` in the pod's namespace for
//! each, and forwards every accepted connection to the agent's port-forward vsock port
//! (`portforward.proto`), splicing both ways with half-closes passed on.
//!
//! Everything runs as tokio tasks that end when the forwarder is stopped or dropped
//! (listeners and connections included); the guest is untrusted, so its port list and
//! status bytes are checked and bounded.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crx_protocols::port_forward::{encode_header, Status, MAX_LISTED_PORTS, MAX_LIST_WAIT_MS};
use crx_protocols::v1::portforward::ListListeningPortsRequest;
use crx_protocols::v1::portforward_ttrpc::PortForwardClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::netns;

/// Least time between two ListListeningPorts calls: the pace for an agent that answers
/// at once (one from before the long poll, or one with more ports than it lists).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the agent may hold a ListListeningPorts call waiting for a change.
const LIST_WAIT: Duration = Duration::from_millis(MAX_LIST_WAIT_MS as u64 / 2);
/// Deadline of one ListListeningPorts call beyond its wait.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of the hybrid-vsock connect and of the agent's status byte.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarded connections at once per pod; more are closed as they come.
const MAX_CONNECTIONS: usize = 256;

/// Why a port could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("listening on 127.0.0.1:{port} in the pod's network namespace: {source}")]
    Listen { port: u16, source: io::Error },
    #[error("entering the pod's network namespace: {0}")]
    Netns(#[from] super::NetworkError),
    #[error("connecting to the agent's port-forward port: {0}")]
    Connect(io::Error),
    #[error("the agent did not answer the port-forward header: {0}")]
    Handshake(io::Error),
    #[error("forwarding the connection's bytes: {0}")]
    Splice(io::Error),
    #[error("the agent answered the port-forward header with the unknown status {0}")]
    BadStatus(u8),
    #[error("the agent refused port {port}: {status}")]
    Refused { port: u16, status: Status },
}

/// A running forwarder; stopping or dropping it ends every task it started.
pub struct PortForwarder {
    stop: watch::Sender<bool>,
}

impl PortForwarder {
    /// Starts polling the agent through `client` and forwarding into the VM whose
    /// hybrid-vsock socket is `agent_socket`. Must be called inside a tokio runtime.
    pub fn start(netns: PathBuf, agent_socket: PathBuf, client: PortForwardClient) -> Self {
        let (stop, stopped) = watch::channel(false);
        let pod = Arc::new(PodTarget {
            netns,
            agent_socket,
            connections: Semaphore::new(MAX_CONNECTIONS),
            stopped,
        });
        tokio::spawn(async move {
            let mut stopped = pod.stopped.clone();
            tokio::select! {
                () = poll_loop(pod, client) => {}
                () = wait_stopped(&mut stopped) => {}
            }
        });
        PortForwarder { stop }
    }

    /// Closes every listener and forwarded connection (idempotent).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every task of one pod's forwarder shares.
struct PodTarget {
    netns: PathBuf,
    agent_socket: PathBuf,
    connections: Semaphore,
    stopped: watch::Receiver<bool>,
}

/// Resolves once the forwarder is stopped (or dropped).
async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    // Err: the sender is gone, which is a stop too.
    let _ = stopped.wait_for(|s| *s).await;
}

/// Polls the agent and keeps one listener task per listening guest port.
async fn poll_loop(pod: Arc<PodTarget>, client: PortForwardClient) {
    // Dropping a `ListenerTask` aborts it, so a port gone from the guest (or the loop
    // ending) closes its listener.
    let mut listeners: HashMap<u16, ListenerTask> = HashMap::new();
    // Ports whose listener failed, not retried until the guest's list changes.
    let mut failed: BTreeSet<u16> = BTreeSet::new();
    let mut last: BTreeSet<u16> = BTreeSet::new();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let ctx = ttrpc::context::with_timeout(
            i64::try_from((LIST_WAIT + LIST_TIMEOUT).as_nanos()).unwrap_or(i64::MAX),
        );
        let mut req = ListListeningPortsRequest::new();
        req.known = last.iter().copied().map(u32::from).collect();
        req.wait_ms = u32::try_from(LIST_WAIT.as_millis()).unwrap_or(MAX_LIST_WAIT_MS);
        let reply = match client.list_listening_ports(ctx, &req).await {
            Ok(r) => r,
            Err(ttrpc::Error::RpcStatus(s))
                if matches!(
                    s.code(),
                    ttrpc::Code::NOT_FOUND | ttrpc::Code::UNIMPLEMENTED
                ) =>
            {
                tracing::info!("the agent has no port forwarding (older guest); CRI PortForward will reach nothing");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "listing the guest's listening ports failed");
                continue;
            }
        };
        let wanted = checked_ports(&reply.ports);
        if wanted != last {
            failed.clear();
            tracing::debug!(ports = ?wanted, "guest listening ports changed");
            last.clone_from(&wanted);
        }
        listeners.retain(|port, _| wanted.contains(port));
        for port in wanted.iter().copied() {
            if listeners.contains_key(&port) || failed.contains(&port) {
                continue;
            }
            match listen_in_pod(&pod.netns, port).await {
                Ok(listener) => {
                    let task = tokio::spawn(accept_loop(pod.clone(), listener, port));
                    listeners.insert(port, ListenerTask(task));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot forward guest port {port}");
                    failed.insert(port);
                }
            }
        }
    }
}

/// The guest's list, untrusted: ports 1-65535 only, deduplicated, at most
/// [`MAX_LISTED_PORTS`].
fn checked_ports(listed: &[u32]) -> BTreeSet<u16> {
    listed
        .iter()
        .filter_map(|p| u16::try_from(*p).ok())
        .filter(|p| *p != 0)
        .take(MAX_LISTED_PORTS)
        .collect()
}

/// A listener's task, aborted when dropped.
struct ListenerTask(tokio::task::JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `127.0.0.1:port` from a thread inside the pod's namespace; the socket stays in
/// that namespace wherever it is used afterwards.
async fn listen_in_pod(ns: &Path, port: u16) -> Result<TcpListener, PortForwardError> {
    let ns = ns.to_owned();
    let bound = tokio::task::spawn_blocking(move || {
        netns::run_in(&ns, move || {
            Ok(std::net::TcpListener::bind(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                port,
            ))))
        })
    })
    .await
    .map_err(|_| PortForwardError::Netns(super::NetworkError::Thread))??;
    let listen_err = |source| PortForwardError::Listen { port, source };
    let listener = bound.map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    TcpListener::from_std(listener).map_err(listen_err)
}

/// Accepts connections on one port until aborted; each is forwarded by a task of its
/// own that ends with the forwarder.
async fn accept_loop(pod: Arc<PodTarget>, listener: TcpListener, port: u16) {
    tracing::info!(
        port,
        "forwarding 127.0.0.1:{port} in the pod's namespace into the VM"
    );
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(port, error = %e, "port-forward accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            let Ok(_slot) = pod.connections.try_acquire() else {
                tracing::warn!(port, "too many forwarded connections; closing a new one");
                return;
            };
            let mut stopped = pod.stopped.clone();
            tokio::select! {
                r = forward(&pod.agent_socket, tcp, port) => {
                    if let Err(e) = r {
                        tracing::debug!(port, error = %e, "forwarded connection failed");
                    }
                }
                () = wait_stopped(&mut stopped) => {}
            }
        });
    }
}

/// Connects to the agent for `port` and splices `tcp` with it until both sides closed.
async fn forward(
    agent_socket: &Path,
    mut tcp: TcpStream,
    port: u16,
) -> Result<(), PortForwardError> {
    let mut guest = connect_agent(agent_socket, port).await?;
    tokio::io::copy_bidirectional(&mut tcp, &mut guest)
        .await
        .map(|_| ())
        .map_err(PortForwardError::Splice)
}

/// Opens a port-forward stream to the agent: hybrid-vsock connect, header, status byte.
async fn connect_agent(agent_socket: &Path, port: u16) -> Result<UnixStream, PortForwardError> {
    let socket = agent_socket.to_owned();
    let std_stream = tokio::task::spawn_blocking(move || {
        crx_protocols::hybrid_vsock::connect(
            &socket,
            crx_protocols::PORT_FORWARD_VSOCK_PORT,
            HANDSHAKE_TIMEOUT,
        )
        .and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(|e| PortForwardError::Connect(io::Error::other(e.to_string())))?
    .map_err(PortForwardError::Connect)?;
    let mut stream = UnixStream::from_std(std_stream).map_err(PortForwardError::Connect)?;
    let handshake = async {
        stream.write_all(&encode_header(port)).await?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).await?;
        Ok::<u8, io::Error>(status[0])
    };
    let byte = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| PortForwardError::Handshake(io::ErrorKind::TimedOut.into()))?
        .map_err(PortForwardError::Handshake)?;
    match Status::from_byte(byte) {
        Some(Status::Connected) => Ok(stream),
        Some(status) => Err(PortForwardError::Refused { port, status }),
        None => Err(PortForwardError::BadStatus(byte)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// A stand-in for the VMM's hybrid-vsock socket and the agent behind it: takes
    /// one connection, checks the CONNECT line and the header for `port`, and answers
    /// `status`.
    fn fake_agent(dir: &Path, port: u16, status: u8) -> std::thread::JoinHandle<()> {
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(
                line,
                format!("CONNECT {}\n", crx_protocols::PORT_FORWARD_VSOCK_PORT)
            );
            let mut writer = stream;
            writer.write_all(b"OK 1\n").unwrap();
            let mut header = [0u8; 6];
            reader.read_exact(&mut header).unwrap();
            assert_eq!(header, encode_header(port));
            writer.write_all(&[status]).unwrap();
        })
    }

    #[tokio::test]
    async fn the_agents_status_byte_is_checked() {
        for byte in [0u8, 1, 3, 200] {
            let dir = tempfile::tempdir().unwrap();
            let agent = fake_agent(dir.path(), 8080, byte);
            let result = connect_agent(&dir.path().join("vsock.sock"), 8080).await;
            agent.join().unwrap();
            match (byte, result) {
                (0, Ok(_)) => {}
                (
                    1,
                    Err(PortForwardError::Refused {
                        port: 8080,
                        status: Status::Refused,
                    }),
                ) => {}
                (
                    3,
                    Err(PortForwardError::Refused {
                        status: Status::Busy,
                        ..
                    }),
                ) => {}
                (200, Err(PortForwardError::BadStatus(200))) => {}
                (byte, other) => panic!("status {byte} gave {other:?}"),
            }
        }
    }

    #[test]
    fn guest_port_lists_are_checked_and_bounded() {
        let listed = [0, 80, 80, 65535, 65536, u32::MAX, 443];
        let ports: Vec<u16> = checked_ports(&listed).into_iter().collect();
        assert_eq!(ports, vec![80, 443, 65535]);
        let many: Vec<u32> = (1..=1000).collect();
        assert_eq!(checked_ports(&many).len(), MAX_LISTED_PORTS);
    }
}
