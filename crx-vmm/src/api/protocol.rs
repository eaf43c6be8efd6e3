//! The API socket's messages: one JSON object per line, in each direction.

use serde::{Deserialize, Serialize};

/// Longest request or reply line, newline included. Requests are a few dozen bytes;
/// anything longer is refused before it is parsed.
pub const MAX_LINE: usize = 4096;

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Give drive `index` (in `--drive` order) the backing whose fd came with the
    /// message. A drive started read-only stays read-only whatever `read_only` says.
    AttachDrive {
        index: usize,
        #[serde(default)]
        read_only: bool,
    },
    /// Empty drive `index` (its old backing is flushed first).
    DetachDrive { index: usize },
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// The drive's capacity in 512-byte sectors after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_sectors: Option<u64>,
    /// Why the request failed, naming the cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn capacity(sectors: u64) -> Self {
        Self {
            ok: true,
            capacity_sectors: Some(sectors),
            error: None,
        }
    }

    pub fn error(why: impl Into<String>) -> Self {
        Self {
            ok: false,
            capacity_sectors: None,
            error: Some(why.into()),
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing this struct of plain fields cannot fail; an empty object would
        // still be a parseable (failed) reply.
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        line
    }
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}
