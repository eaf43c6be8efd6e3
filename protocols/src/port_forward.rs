//! The handshake of a forwarded TCP connection (`portforward.proto`): the host names the
//! guest TCP port in a fixed 6-byte header, the agent answers one status byte. Both
//! sides share these encoders and decoders so the format lives in one place.

/// The header's magic.
pub const MAGIC: &[u8; 4] = b"CRXP";
/// Length of the header: magic and a big-endian u16 port.
pub const HEADER_LEN: usize = 6;
/// Most ports `ListListeningPorts` reports (and a shim forwards) per pod.
pub const MAX_LISTED_PORTS: usize = 256;
/// Longest `ListListeningPorts` long poll an agent honours (`wait_ms`).
pub const MAX_LIST_WAIT_MS: u32 = 60_000;

/// The agent's answer to a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected to the guest port; the stream's bytes follow.
    Connected = 0,
    /// Nothing accepted a connection at that port on 127.0.0.1 or [::1].
    Refused = 1,
    /// The header was not "CRXP" and a port from 1 to 65535.
    BadHeader = 2,
    /// The agent forwards too many connections already.
    Busy = 3,
}

impl Status {
    /// The status a byte from the agent names; `None` for anything else (untrusted).
    pub fn from_byte(byte: u8) -> Option<Status> {
        match byte {
            0 => Some(Status::Connected),
            1 => Some(Status::Refused),
            2 => Some(Status::BadHeader),
            3 => Some(Status::Busy),
            _ => None,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Connected => "connected",
            Status::Refused => "connection refused in the guest",
            Status::BadHeader => "malformed port-forward header",
            Status::Busy => "the agent forwards too many connections",
        })
    }
}

/// The header naming guest TCP port `port`.
pub fn encode_header(port: u16) -> [u8; HEADER_LEN] {
    let [hi, lo] = port.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], hi, lo]
}

/// The port a header names, if the header is well formed (right magic, port not 0).
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Option<u16> {
    if &header[..4] != MAGIC {
        return None;
    }
    let port = u16::from_be_bytes([header[4], header[5]]);
    (port != 0).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_bad_input() {
        for port in [1u16, 80, 8080, 65535] {
            assert_eq!(decode_header(&encode_header(port)), Some(port));
        }
        assert_eq!(decode_header(&encode_header(0)), None);
        let mut bad = encode_header(80);
        bad[0] = b'X';
        assert_eq!(decode_header(&bad), None);
    }

    #[test]
    fn status_bytes_map_both_ways() {
        for status in [
            Status::Connected,
            Status::Refused,
            Status::BadHeader,
            Status::Busy,
        ] {
            assert_eq!(Status::from_byte(status as u8), Some(status));
        }
        assert_eq!(Status::from_byte(4), None);
        assert_eq!(Status::from_byte(255), None);
    }
}
