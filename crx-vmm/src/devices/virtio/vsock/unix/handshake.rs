//! A host client that connected to the hybrid socket and has not yet said which guest
//! port it wants. The line is read one byte at a time so that bytes the client sends
//! after it stay in the socket for the guest.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Longest request line accepted, newline included (`CONNECT 4294967295\n` is 19).
pub const MAX_LINE_LEN: usize = 32;

/// What the client has said so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LineState {
    Incomplete,
    /// A well-formed `CONNECT <port>\n`.
    Connect(u32),
    /// Malformed, too long, or the client went away: close it.
    Invalid,
}

pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_LINE_LEN),
            deadline,
        }
    }

    /// Reads what the client has sent (non-blocking socket).
    pub fn poll(&mut self) -> LineState {
        let mut byte = [0u8; 1];
        loop {
            match (&self.stream).read(&mut byte) {
                Ok(0) => return LineState::Invalid,
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() >= MAX_LINE_LEN {
                        return LineState::Invalid;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineState::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return LineState::Invalid,
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline): decimal digits only.
pub fn parse_connect(line: &[u8]) -> LineState {
    let Some(port) = line.strip_prefix(b"CONNECT ") else {
        return LineState::Invalid;
    };
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return LineState::Invalid;
    }
    std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .map_or(LineState::Invalid, LineState::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_well_formed_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), LineState::Connect(1024));
        assert_eq!(
            parse_connect(b"CONNECT 4294967295"),
            LineState::Connect(u32::MAX)
        );
        for bad in [
            &b"CONNECT abc"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT +5",
            b"CONNECT 5 ",
            b"connect 5",
            b"CONNECT 1024\r",
            b"",
        ] {
            assert_eq!(parse_connect(bad), LineState::Invalid, "{bad:?}");
        }
    }
}
