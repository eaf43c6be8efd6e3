//! Port forwarding into the pod (portforward.proto): the listening-port table the shim
//! polls ([`listening`]), and the listener on the port-forward port (vsock 1027 in a VM,
//! a Unix socket in host mode) whose every connection names a guest TCP port, gets one
//! status byte, and is then spliced to a TCP connection to that port on loopback.
//! Each forwarded connection is copied by two threads with blocking I/O and a fixed
//! buffer each, so nothing is buffered without bound.

pub mod listening;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crx_protocols::port_forward::{decode_header, Status, HEADER_LEN};

/// Time the host has to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a loopback connect may take (it is local: this only guards a full backlog).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Forwarded connections at once; more are answered [`Status::Busy`].
const MAX_CONNECTIONS: usize = 1024;
/// Buffer of one copy direction.
const COPY_BUFFER: usize = 32 << 10;

/// Where the port-forward listener listens: a guest vsock port (any CID). Only in a VM:
/// a host-mode agent's pod has a network namespace of its own that this thread is not
/// in, so loopback here would be the wrong one.
#[derive(Clone, Copy, Debug)]
pub struct ForwardAddr(pub u32);

impl std::fmt::Display for ForwardAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vsock://-1:{}", self.0)
    }
}

/// Port-forward failures.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The listener (or its thread) could not be started.
    #[error("cannot listen for forwarded connections on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// A stream from the host: the parts of vsock and Unix streams the splice needs.
trait HostStream: Read + Write + Send + 'static {
    fn try_clone_stream(&self) -> io::Result<Box<dyn HostStream>>;
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()>;
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// Vsock and Unix streams have the same inherent methods under the same names but no
/// common trait, so one body serves both.
macro_rules! impl_host_stream {
    ($($stream:ty),+) => {$(
        impl HostStream for $stream {
            fn try_clone_stream(&self) -> io::Result<Box<dyn HostStream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
                self.shutdown(how)
            }
            fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(timeout)
            }
        }
    )+};
}

impl_host_stream!(UnixStream, vsock::VsockStream);

type Accept = Box<dyn FnMut() -> io::Result<Box<dyn HostStream>> + Send>;

/// Binds the listener and serves it on a thread of its own for the agent's life.
pub fn spawn_listener(addr: &ForwardAddr) -> Result<(), ForwardError> {
    let listen_err = |source| ForwardError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = vsock::VsockListener::bind_with_cid_port(libc::VMADDR_CID_ANY, addr.0)
        .map_err(listen_err)?;
    let accept: Accept = Box::new(move || {
        listener
            .accept()
            .map(|(s, _)| Box::new(s) as Box<dyn HostStream>)
    });
    let shown = addr.to_string();
    std::thread::Builder::new()
        .name("portfwd-accept".into())
        .spawn(move || accept_loop(accept, &shown))
        .map_err(listen_err)?;
    Ok(())
}

fn accept_loop(mut accept: Accept, addr: &str) {
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    tracing::info!(%addr, "listening for forwarded connections");
    loop {
        let mut conn = match accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "port-forward accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if ACTIVE.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("too many forwarded connections; refusing a new one");
            let _ = conn.write_all(&[Status::Busy as u8]);
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("portfwd".into())
            .spawn(move || {
                serve(conn);
                ACTIVE.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot start a port-forward thread");
        }
    }
}

/// Handshakes one connection and, once connected, splices it until both sides are done.
fn serve(mut conn: Box<dyn HostStream>) {
    let port = match read_port(conn.as_mut()) {
        Ok(port) => port,
        Err(status) => {
            let _ = conn.write_all(&[status as u8]);
            return;
        }
    };
    let Some(tcp) = connect_loopback(port) else {
        tracing::debug!(port, "forwarded connection refused in the guest");
        let _ = conn.write_all(&[Status::Refused as u8]);
        return;
    };
    if conn.write_all(&[Status::Connected as u8]).is_err() {
        return;
    }
    if let Err(e) = splice(conn, tcp) {
        tracing::debug!(port, error = %e, "forwarded connection ended with an error");
    }
}

/// Reads the header within [`HEADER_TIMEOUT`]; the port it names, or the status to
/// answer.
fn read_port(conn: &mut dyn HostStream) -> Result<u16, Status> {
    conn.set_read_timeout_stream(Some(HEADER_TIMEOUT))
        .map_err(|_| Status::BadHeader)?;
    let mut header = [0u8; HEADER_LEN];
    conn.read_exact(&mut header)
        .map_err(|_| Status::BadHeader)?;
    conn.set_read_timeout_stream(None)
        .map_err(|_| Status::BadHeader)?;
    decode_header(&header).ok_or(Status::BadHeader)
}

/// Connects to `port` on 127.0.0.1, then on [::1] (a server may listen on one family
/// only).
fn connect_loopback(port: u16) -> Option<TcpStream> {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
    .iter()
    .find_map(|addr| TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).ok())
}

/// Copies both ways; each direction's EOF becomes a write shutdown of the other side,
/// so half-closes pass through. Returns when both directions are done.
fn splice(conn: Box<dyn HostStream>, tcp: TcpStream) -> io::Result<()> {
    let mut conn_reader = conn.try_clone_stream()?;
    let mut tcp_writer = tcp.try_clone()?;
    let upstream = std::thread::Builder::new()
        .name("portfwd-up".into())
        .spawn(move || {
            let copied = copy(&mut conn_reader, &mut tcp_writer);
            // Host EOF (or error): the guest server sees EOF; an error ends it all.
            let _ = tcp_writer.shutdown(if copied.is_ok() {
                Shutdown::Write
            } else {
                Shutdown::Both
            });
            copied
        })?;
    let mut conn_writer = conn;
    let mut tcp_reader = tcp;
    let downstream = copy(&mut tcp_reader, &mut conn_writer);
    let _ = conn_writer.shutdown_stream(if downstream.is_ok() {
        Shutdown::Write
    } else {
        Shutdown::Both
    });
    if downstream.is_err() {
        // Unblocks the upstream copy: the server is gone.
        let _ = tcp_reader.shutdown(Shutdown::Both);
    }
    let upstream = upstream
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")));
    downstream.and(upstream)
}

/// Copies until EOF through one fixed buffer (never `std::io::copy`, which may splice
/// and hold pipe locks; see the shim's stdio notes).
fn copy(from: &mut dyn Read, to: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(buf.get(..n).unwrap_or_default())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crx_protocols::port_forward::encode_header;
    use std::net::TcpListener;

    /// A host-mode round trip over a Unix socket: header, status, bytes both ways and
    /// half-close in each direction.
    #[test]
    fn forwards_bytes_both_ways_with_half_close() {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            s.write_all(b"hello\n").unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got).unwrap();
        });
        let (mut host, agent_side) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || serve(Box::new(agent_side)));
        host.write_all(&encode_header(port)).unwrap();
        let mut status = [0u8; 1];
        host.read_exact(&mut status).unwrap();
        assert_eq!(Status::from_byte(status[0]), Some(Status::Connected));
        let mut greeting = [0u8; 6];
        host.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"hello\n");
        host.write_all(b"ping").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"ping");
        echo.join().unwrap();
        served.join().unwrap();
    }

    #[test]
    fn closed_port_and_bad_header_get_their_status() {
        let closed = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        for (header, want) in [
            (encode_header(closed), Status::Refused),
            (*b"NOPE\x00\x50", Status::BadHeader),
            (encode_header(0), Status::BadHeader),
        ] {
            let (mut host, agent_side) = UnixStream::pair().unwrap();
            let served = std::thread::spawn(move || serve(Box::new(agent_side)));
            host.write_all(&header).unwrap();
            let mut status = [0u8; 1];
            host.read_exact(&mut status).unwrap();
            assert_eq!(Status::from_byte(status[0]), Some(want));
            served.join().unwrap();
        }
    }
}
