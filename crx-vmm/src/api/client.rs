//! The client side of the API socket, for the shim and the tests: one connection per
//! call, the request line sent with the fd in the same `sendmsg`, one reply line read
//! back within a deadline.

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::protocol::{Reply, Request, MAX_LINE};

/// How long a call waits for crx-vmm's answer (a replace flushes the old backing).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("cannot connect to the API socket {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the request")]
    Send(#[source] std::io::Error),
    #[error("no reply from crx-vmm")]
    Receive(#[source] std::io::Error),
    #[error("crx-vmm closed the connection without a complete reply")]
    NoReply,
    #[error("crx-vmm's reply is not valid: {0}")]
    BadReply(String),
    #[error("crx-vmm refused the request: {0}")]
    Refused(String),
}

/// Gives drive `index` (in `--drive` order) the backing `file`, read-only or not.
/// Returns the drive's new capacity in 512-byte sectors.
pub fn attach_drive(
    socket: &Path,
    index: usize,
    file: &impl AsFd,
    read_only: bool,
) -> Result<u64, ApiClientError> {
    let reply = call(
        socket,
        &Request::AttachDrive { index, read_only },
        Some(file.as_fd().as_raw_fd()),
    )?;
    reply
        .capacity_sectors
        .ok_or_else(|| ApiClientError::BadReply("no capacity_sectors in a success".into()))
}

/// Empties drive `index`; its old backing is flushed first.
pub fn detach_drive(socket: &Path, index: usize) -> Result<(), ApiClientError> {
    call(socket, &Request::DetachDrive { index }, None).map(|_| ())
}

/// Sends one request (with at most one fd) and returns the successful reply.
pub fn call(
    socket: &Path,
    request: &Request,
    fd: Option<std::os::fd::RawFd>,
) -> Result<Reply, ApiClientError> {
    let mut conn = UnixStream::connect(socket).map_err(|source| ApiClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(ApiClientError::Send)?;
    let line = request.to_line();
    let fds: Vec<std::os::fd::RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    // The fd rides with the first byte; the rest of the line (if the kernel took only
    // part) follows without it.
    let mut sent = 0;
    while sent < line.len() {
        let cm: &[ControlMessage<'_>] = if sent == 0 { &cmsgs } else { &[] };
        match sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&line[sent..])],
            cm,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(ApiClientError::Send(e.into())),
        }
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.contains(&b'\n') {
        if reply.len() > MAX_LINE {
            return Err(ApiClientError::BadReply(format!(
                "longer than {MAX_LINE} bytes"
            )));
        }
        match conn.read(&mut buf) {
            Ok(0) => return Err(ApiClientError::NoReply),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ApiClientError::Receive(e)),
        }
    }
    let end = reply
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(reply.len());
    let reply: Reply = serde_json::from_slice(&reply[..end])
        .map_err(|e| ApiClientError::BadReply(e.to_string()))?;
    if !reply.ok {
        return Err(ApiClientError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(reply)
}
