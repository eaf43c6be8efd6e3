//! A client of containerd's CRI streaming server (what Exec, Attach and PortForward
//! return a URL of), websocket variant: subprotocol `v4.channel.k8s.io`, where every
//! binary message starts with its channel byte. [`ChannelSocket`] is that framing;
//! [`RemoteCommand`] is the exec/attach protocol on top of it (stdin, stdout, stderr,
//! the v4 status on the error channel, terminal resizes).

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The websocket subprotocol: binary channels, v4 status on the error channel.
pub const SUBPROTOCOL: &str = "v4.channel.k8s.io";
/// How long one blocking read waits before the caller's deadline is checked again.
const READ_SLICE: Duration = Duration::from_millis(200);
/// Bound on what one session buffers per channel: a test reads short outputs.
const MAX_BUFFERED: usize = 4 << 20;

/// Channels of exec and attach (remotecommand).
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("unexpected streaming URL {0:?} (expected http://)")]
    Url(String),
    #[error("websocket request for {url}")]
    Request {
        url: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
    #[error("websocket handshake with {url}")]
    Connect {
        url: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
    #[error("the streaming server chose subprotocol {0:?}, want {SUBPROTOCOL}")]
    Subprotocol(Option<String>),
    #[error("setting the websocket's read timeout")]
    Timeout(#[source] std::io::Error),
    #[error("writing to the websocket")]
    Write(#[source] Box<tungstenite::Error>),
    #[error("reading the websocket")]
    Read(#[source] Box<tungstenite::Error>),
    #[error("channel {channel} buffered more than {MAX_BUFFERED} bytes")]
    TooMuch { channel: u8 },
    #[error("message on channel {0}, which this protocol does not have")]
    UnknownChannel(u8),
    #[error("the status on the error channel is not v4 status JSON: {0:?}")]
    Status(String),
}

/// Which streams an Exec or Attach asks for (with a tty, stderr is merged into stdout,
/// so CRI wants `stderr: false`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamFlags {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// What one read of a [`ChannelSocket`] gave.
#[derive(Debug)]
pub enum Received {
    /// A binary message: its channel and payload.
    Frame(u8, Vec<u8>),
    /// Nothing within the read slice.
    Idle,
    /// The server closed the session (or dropped the connection).
    Closed,
}

/// A websocket to the streaming server speaking the channel framing.
pub struct ChannelSocket {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl ChannelSocket {
    /// Opens the websocket at the streaming `url` (`http://…/TOKEN`, as a CRI call
    /// returned it), with `query` appended when given (port-forward names its ports
    /// there).
    pub fn connect(url: &str, query: Option<&str>) -> Result<Self, StreamError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| StreamError::Url(url.to_owned()))?;
        let ws_url = match query {
            Some(q) => format!("ws://{rest}?{q}"),
            None => format!("ws://{rest}"),
        };
        let mut request =
            ws_url
                .as_str()
                .into_client_request()
                .map_err(|source| StreamError::Request {
                    url: ws_url.clone(),
                    source: Box::new(source),
                })?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (socket, response) =
            tungstenite::connect(request).map_err(|source| StreamError::Connect {
                url: ws_url.clone(),
                source: Box::new(source),
            })?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if chosen != Some(SUBPROTOCOL) {
            return Err(StreamError::Subprotocol(chosen.map(str::to_owned)));
        }
        if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(READ_SLICE))
                .map_err(StreamError::Timeout)?;
        }
        Ok(ChannelSocket { socket })
    }

    /// Sends `bytes` on `channel` as one message.
    pub fn send(&mut self, channel: u8, bytes: &[u8]) -> Result<(), StreamError> {
        let mut frame = Vec::with_capacity(bytes.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(bytes);
        self.socket
            .send(Message::binary(frame))
            .map_err(|e| StreamError::Write(Box::new(e)))
    }

    /// Reads one message, waiting at most a short slice.
    pub fn recv(&mut self) -> Result<Received, StreamError> {
        let message = match self.socket.read() {
            Ok(m) => m,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(Received::Closed)
            }
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Ok(Received::Idle)
            }
            // containerd may drop the TCP connection without a close frame.
            Err(tungstenite::Error::Protocol(_)) => return Ok(Received::Closed),
            Err(e) => return Err(StreamError::Read(Box::new(e))),
        };
        Ok(match message {
            Message::Binary(b) => match b.split_first() {
                Some((&channel, rest)) => Received::Frame(channel, rest.to_vec()),
                None => Received::Idle,
            },
            Message::Close(_) => Received::Closed,
            _ => Received::Idle,
        })
    }

    /// Closes the session; best effort, the server may have closed it already.
    pub fn close(mut self) {
        let _ = self.socket.close(None);
        let _ = self.socket.flush();
    }
}

/// How an exec ended, from the v4 status on the error channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// `"status":"Success"`: exit code 0.
    Success,
    /// A non-zero exit code (`reason: NonZeroExitCode`, cause `ExitCode`).
    Code(i32),
    /// Another failure: its message.
    Failure(String),
}

/// One exec or attach session: what arrived on each output channel so far, and
/// whether the server has closed the session.
pub struct RemoteCommand {
    socket: Option<ChannelSocket>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub error: Vec<u8>,
}

impl RemoteCommand {
    /// Opens the session at the URL an Exec or Attach returned.
    pub fn open(url: &str) -> Result<Self, StreamError> {
        Ok(RemoteCommand {
            socket: Some(ChannelSocket::connect(url, None)?),
            stdout: Vec::new(),
            stderr: Vec::new(),
            error: Vec::new(),
        })
    }

    pub fn closed(&self) -> bool {
        self.socket.is_none()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Writes `bytes` to the process's stdin (a no-op once the session closed).
    pub fn write_stdin(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        match self.socket.as_mut() {
            Some(s) => s.send(STDIN, bytes),
            None => Ok(()),
        }
    }

    /// Sends a terminal resize (the tty's columns and rows).
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), StreamError> {
        let body = format!(r#"{{"Width":{width},"Height":{height}}}"#);
        match self.socket.as_mut() {
            Some(s) => s.send(RESIZE, body.as_bytes()),
            None => Ok(()),
        }
    }

    /// Reads until `done(self)` holds (true), the session closed or `within` passed
    /// (false).
    pub fn read_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<bool, StreamError> {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            let Some(socket) = self.socket.as_mut() else {
                return Ok(false);
            };
            match socket.recv()? {
                Received::Frame(channel, bytes) => {
                    let sink = match channel {
                        STDOUT => &mut self.stdout,
                        STDERR => &mut self.stderr,
                        ERROR => &mut self.error,
                        other => return Err(StreamError::UnknownChannel(other)),
                    };
                    if sink.len() + bytes.len() > MAX_BUFFERED {
                        return Err(StreamError::TooMuch { channel });
                    }
                    sink.extend_from_slice(&bytes);
                }
                Received::Idle => {}
                Received::Closed => {
                    if let Some(s) = self.socket.take() {
                        s.close();
                    }
                }
            }
        }
    }

    /// Reads until the server closes the session or `within` passed; true if closed.
    pub fn wait_closed(&mut self, within: Duration) -> Result<bool, StreamError> {
        self.read_until(within, |_| false)?;
        Ok(self.closed())
    }

    /// The exit status on the error channel, once the server has written it.
    pub fn exit_status(&self) -> Result<Option<ExitStatus>, StreamError> {
        if self.error.is_empty() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&self.error).into_owned();
        let status: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| StreamError::Status(text.clone()))?;
        match status.get("status").and_then(|s| s.as_str()) {
            Some("Success") => return Ok(Some(ExitStatus::Success)),
            Some("Failure") => {}
            _ => return Err(StreamError::Status(text)),
        }
        let exit_code = (status.get("reason").and_then(|r| r.as_str()) == Some("NonZeroExitCode"))
            .then(|| {
                status
                    .pointer("/details/causes")?
                    .as_array()?
                    .iter()
                    .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
                    .get("message")?
                    .as_str()?
                    .parse::<i32>()
                    .ok()
            })
            .flatten();
        Ok(Some(match exit_code {
            Some(code) => ExitStatus::Code(code),
            None => ExitStatus::Failure(
                status
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or(&text)
                    .to_owned(),
            ),
        }))
    }

    /// Closes the session from this end.
    pub fn close(mut self) {
        if let Some(s) = self.socket.take() {
            s.close();
        }
    }
}
