//! The kernel command line, as far as the agent cares: `crx.*` keys only.
//!
//! Keys read (everything else is ignored, a bare `--` ends the kernel's part):
//! - `crx.log=<error|warn|info|debug|trace|off>`: the agent's log level (default info).
//! - `crx.log_port=<N>`: stream the agent's log lines to host vsock port N (CID 2)
//!   instead of `/dev/kmsg`.
//!
//! The command line comes from the VMM, so a bad value is reported, never fatal.

use std::fmt;

use tracing::level_filters::LevelFilter;

/// Where the kernel exposes its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// The largest command line read; x86_64 kernels cap theirs at 2048 bytes anyway.
const MAX_CMDLINE_LEN: usize = 64 * 1024;

/// The `crx.*` settings found on the command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgentCmdline {
    /// `crx.log`.
    pub log_level: Option<LevelFilter>,
    /// `crx.log_port`.
    pub log_port: Option<u32>,
    /// Keys that were present but unusable, to be logged once logging is up.
    pub problems: Vec<CmdlineProblem>,
}

/// A `crx.*` key whose value could not be used.
#[derive(Debug, PartialEq, Eq)]
pub struct CmdlineProblem {
    /// The key, e.g. `crx.log_port`.
    pub key: String,
    /// The value as given.
    pub value: String,
    /// What was expected instead.
    pub expected: &'static str,
}

impl fmt::Display for CmdlineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ignoring {}={:?}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

/// Reads and parses `/proc/cmdline`; an unreadable command line yields the defaults.
pub fn read() -> Result<AgentCmdline, std::io::Error> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(PROC_CMDLINE)?
        .take(MAX_CMDLINE_LEN as u64)
        .read_to_string(&mut text)?;
    Ok(parse(&text))
}

/// Parses a kernel command line.
pub fn parse(text: &str) -> AgentCmdline {
    let mut out = AgentCmdline::default();
    for word in split_words(text) {
        if word == "--" {
            break;
        }
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let value = unquote(value);
        match key {
            "crx.log" => match parse_level(value) {
                Some(level) => out.log_level = Some(level),
                None => out.problems.push(problem(
                    key,
                    value,
                    "error, warn, info, debug, trace or off",
                )),
            },
            "crx.log_port" => match value.parse::<u32>() {
                // Port numbers at or above 2^32-1 are VMADDR_PORT_ANY, not a real port.
                Ok(port) if port != u32::MAX => out.log_port = Some(port),
                _ => out
                    .problems
                    .push(problem(key, value, "a vsock port number")),
            },
            _ => {}
        }
    }
    out
}

fn problem(key: &str, value: &str, expected: &'static str) -> CmdlineProblem {
    CmdlineProblem {
        key: key.to_owned(),
        value: value.to_owned(),
        expected,
    }
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// Splits on whitespace the way the kernel does: double quotes group, e.g.
/// `key="a b"` is one word.
fn split_words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            if let Some(s) = start.take() {
                words.push(&text[s..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_crx_keys_among_kernel_ones() {
        let c = parse("console=ttyS0 reboot=k panic=-1 crx.log=debug crx.log_port=1025 quiet\n");
        assert_eq!(c.log_level, Some(LevelFilter::DEBUG));
        assert_eq!(c.log_port, Some(1025));
        assert!(c.problems.is_empty());
    }

    #[test]
    fn defaults_when_absent() {
        assert_eq!(parse("console=ttyS0 reboot=k"), AgentCmdline::default());
        assert_eq!(parse(""), AgentCmdline::default());
    }

    #[test]
    fn bad_values_are_reported_and_ignored() {
        let c = parse("crx.log=loud crx.log_port=-3 crx.log_port=4294967295 crx.log_port=");
        assert_eq!(c.log_level, None);
        assert_eq!(c.log_port, None);
        assert_eq!(c.problems.len(), 4);
        assert_eq!(
            c.problems[0].to_string(),
            "ignoring crx.log=\"loud\": expected error, warn, info, debug, trace or off"
        );
    }

    #[test]
    fn last_value_wins_and_quotes_are_removed() {
        let c = parse("crx.log=info crx.log=\"WARN\" crx.log_port=\"7\"");
        assert_eq!(c.log_level, Some(LevelFilter::WARN));
        assert_eq!(c.log_port, Some(7));
    }

    #[test]
    fn quoted_spaces_stay_in_one_word() {
        let c = parse("x=\"a crx.log=debug b\" crx.log_port=9");
        assert_eq!(c.log_level, None);
        assert_eq!(c.log_port, Some(9));
    }

    #[test]
    fn init_arguments_after_double_dash_are_not_ours() {
        let c = parse("console=ttyS0 -- crx.log=debug");
        assert_eq!(c.log_level, None);
    }

    #[test]
    fn keys_must_match_exactly() {
        let c = parse("xcrx.log=debug crx.logx=debug crx.log_port_=5");
        assert_eq!(c, AgentCmdline::default());
    }
}
