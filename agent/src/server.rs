//! The ttrpc server: where it listens, binding (with retries inside a VM), starting and
//! a graceful stop that still delivers the replies already produced.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::{Server, Service};

/// How long a stop waits for open connections to flush their replies and close.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between bind attempts inside a VM.
const MAX_BIND_RETRY: Duration = Duration::from_secs(5);

/// Server failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `--listen` was not `vsock://<cid>:<port>` or `unix://<path>`.
    #[error("bad listen address {0:?}: expected vsock://-1:<port> or unix:///<path>")]
    BadAddress(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// Another process already serves on that Unix socket.
    #[error("another process is already listening on {0}")]
    InUse(PathBuf),
    /// ttrpc refused to start.
    #[error("the ttrpc server did not start")]
    Start(#[source] ttrpc::Error),
}

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `vsock://<cid>:<port>`, kept verbatim for ttrpc (`-1` is any CID).
    Vsock(String),
    /// `unix://<path>`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The default inside a VM: any CID, the protocol's port.
    pub fn guest_default() -> ListenAddr {
        ListenAddr::Vsock(format!("vsock://-1:{}", crx_protocols::AGENT_VSOCK_PORT))
    }

    /// Parses `vsock://<cid>:<port>` or `unix://<absolute path>`.
    pub fn parse(text: &str) -> Result<ListenAddr, ServerError> {
        let bad = || ServerError::BadAddress(text.to_owned());
        if let Some(rest) = text.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid_ok = cid == "-1" || cid.parse::<u32>().is_ok();
            if !cid_ok || port.parse::<u32>().is_err() {
                return Err(bad());
            }
            return Ok(ListenAddr::Vsock(text.to_owned()));
        }
        if let Some(path) = text.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        Err(bad())
    }

    fn to_ttrpc(&self) -> String {
        match self {
            ListenAddr::Vsock(addr) => addr.clone(),
            ListenAddr::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_ttrpc())
    }
}

/// Binds once. A Unix socket file left behind by a dead agent is replaced; one with a
/// live listener is not.
pub fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
    if let ListenAddr::Unix(path) = addr {
        remove_stale_socket(path)?;
    }
    Listener::bind(addr.to_ttrpc()).map_err(|source| ServerError::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Binds, retrying until it works. Inside a VM there is nothing better to do: the agent
/// must not exit, and a missing vsock device is a VMM configuration problem that the
/// log (kmsg / serial console) should name.
pub async fn bind_with_retry(addr: &ListenAddr) -> Listener {
    let mut delay = Duration::from_millis(100);
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        match bind(addr) {
            Ok(listener) => {
                if attempt > 1 {
                    tracing::info!(%addr, attempt, "listening after retries");
                }
                return listener;
            }
            Err(e) => {
                // Every failure at first, then only at powers of two: the console stays
                // readable if the device never appears.
                if attempt <= 3 || attempt.is_power_of_two() {
                    tracing::error!(
                        error = %error_chain(&e),
                        attempt,
                        "cannot listen for the host; is the VM's virtio-vsock device configured? retrying"
                    );
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_BIND_RETRY);
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ServerError::Bind {
                addr: format!("unix://{}", path.display()),
                source,
            }),
        // Not a socket, or unreadable: let bind report it.
        Err(_) => Ok(()),
    }
}

/// A started server.
pub struct RunningServer {
    server: Server,
    socket_file: Option<PathBuf>,
}

impl RunningServer {
    /// Starts serving `services` on `listener`; requests are handled on the current
    /// runtime. `socket_file` (host mode) is removed when the server stops.
    pub async fn start(
        listener: Listener,
        services: HashMap<String, Service>,
        socket_file: Option<PathBuf>,
    ) -> Result<RunningServer, ServerError> {
        let mut server = Server::new()
            .add_listener(listener)
            .register_service(services);
        server.start().await.map_err(ServerError::Start)?;
        Ok(RunningServer {
            server,
            socket_file,
        })
    }

    /// Stops accepting, lets every connection send the replies already produced (the
    /// Shutdown reply among them), then closes them.
    pub async fn stop(mut self) {
        if tokio::time::timeout(STOP_TIMEOUT, self.server.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections did not close within {STOP_TIMEOUT:?}; stopping anyway");
        }
        if let Some(path) = self.socket_file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `error: cause: cause`, for one-line logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            ListenAddr::parse("vsock://-1:1024").unwrap(),
            ListenAddr::Vsock("vsock://-1:1024".into())
        );
        assert_eq!(
            ListenAddr::parse("vsock://3:99").unwrap(),
            ListenAddr::Vsock("vsock://3:99".into())
        );
        assert_eq!(
            ListenAddr::parse("unix:///run/a.sock").unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        for bad in [
            "",
            "tcp://1.2.3.4:5",
            "vsock://-1",
            "vsock://x:1",
            "vsock://-1:port",
            "unix://",
            "/run/a.sock",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(ListenAddr::guest_default().to_string(), "vsock://-1:1024");
    }
}
