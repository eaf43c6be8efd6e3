//! The TCP ports in LISTEN state in the agent's network namespace (the pod's, in a VM),
//! read from `/proc/net/tcp` and `/proc/net/tcp6`. Only sockets a loopback connect
//! reaches count (bound to the wildcard or to loopback): the forwarder connects to
//! 127.0.0.1 or [::1], as containerd does for runc pods, so a server bound only to the
//! pod IP is refused in both.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr};

use crx_protocols::port_forward::MAX_LISTED_PORTS;

/// The kernel's tables of TCP sockets, IPv4 then IPv6.
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];
/// `st` of a listening socket (TCP_LISTEN).
const LISTEN_STATE: &str = "0A";
/// The most of one table read: a guest with that many sockets has more than 256
/// listeners among them anyway, and a line is ~150 bytes (about 100 000 sockets).
const MAX_TABLE_BYTES: u64 = 16 << 20;

/// The listening ports, sorted, at most [`MAX_LISTED_PORTS`], and whether more listen.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListeningPorts {
    pub ports: Vec<u16>,
    pub truncated: bool,
}

/// Reads both tables. A missing table (no IPv6 in the kernel) counts as empty.
pub fn read() -> io::Result<ListeningPorts> {
    let mut all = BTreeSet::new();
    for table in TABLES {
        let file = match std::fs::File::open(table) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        file.take(MAX_TABLE_BYTES).read_to_string(&mut text)?;
        all.extend(parse_table(&text));
    }
    Ok(bounded(all))
}

fn bounded(all: BTreeSet<u16>) -> ListeningPorts {
    let truncated = all.len() > MAX_LISTED_PORTS;
    ListeningPorts {
        ports: all.into_iter().take(MAX_LISTED_PORTS).collect(),
        truncated,
    }
}

/// The local ports of the LISTEN lines of one table (its header line and malformed
/// lines are skipped).
fn parse_table(text: &str) -> impl Iterator<Item = u16> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let local = fields.next()?;
        let _remote = fields.next()?;
        let state = fields.next()?;
        if state != LISTEN_STATE {
            return None;
        }
        let (addr, port) = local.rsplit_once(':')?;
        if !reachable_from_loopback(addr)? {
            return None;
        }
        u16::from_str_radix(port, 16).ok().filter(|p| *p != 0)
    })
}

/// Whether a table's local address (hex, in 32-bit words of host byte order) is the
/// wildcard or loopback, IPv4-mapped forms included; None if malformed.
fn reachable_from_loopback(hex: &str) -> Option<bool> {
    let mut octets = Vec::with_capacity(16);
    if hex.len() % 8 != 0 || !hex.is_ascii() {
        return None;
    }
    for word in hex.as_bytes().chunks(8) {
        let word = std::str::from_utf8(word).ok()?;
        octets.extend_from_slice(&u32::from_str_radix(word, 16).ok()?.to_ne_bytes());
    }
    let v4 = |a: Ipv4Addr| a.is_unspecified() || a.is_loopback();
    match octets.len() {
        4 => Some(v4(Ipv4Addr::new(
            octets[0], octets[1], octets[2], octets[3],
        ))),
        16 => {
            let bytes: [u8; 16] = octets.try_into().ok()?;
            let a = Ipv6Addr::from(bytes);
            Some(a.is_unspecified() || a.is_loopback() || a.to_ipv4_mapped().is_some_and(v4))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0000000000000000 20 4 30 10 -1
   3: 0500000A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1237 1 0000000000000000 100 0 0 10 0
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 98 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 97 1 0000000000000000 100 0 0 10 0
   3: 000080FE00000000FF605402FE2A8B0F:1F94 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 96 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listening_sockets_of_both_families_are_found() {
        let mut ports: Vec<u16> = parse_table(TCP).chain(parse_table(TCP6)).collect();
        ports.sort_unstable();
        // 10.0.0.5:80 and fe80::…:0x1F94 are not reachable from loopback.
        assert_eq!(ports, vec![0x35, 0x1F90, 0x1F91, 0x1F92, 0x1F93]);
    }

    #[test]
    fn malformed_addresses_are_skipped() {
        assert_eq!(reachable_from_loopback("0100007"), None);
        assert_eq!(reachable_from_loopback("0100007G"), None);
        assert_eq!(reachable_from_loopback("0100007F0100007F"), None);
        assert_eq!(reachable_from_loopback("0100007F"), Some(true));
    }

    #[test]
    fn more_than_the_bound_is_truncated_to_the_lowest() {
        let all: BTreeSet<u16> = (1..=300).collect();
        let listed = bounded(all);
        assert!(listed.truncated);
        assert_eq!(listed.ports.len(), MAX_LISTED_PORTS);
        assert_eq!(listed.ports.first(), Some(&1));
        let few = bounded([80, 443].into_iter().collect());
        assert_eq!(
            few,
            ListeningPorts {
                ports: vec![80, 443],
                truncated: false
            }
        );
    }
}
