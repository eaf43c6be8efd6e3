//! Reading the CNI interface: MAC, MTU, addresses and routes (`ip -j`), and turning
//! them into what CreateSandbox gives the guest.

use crx_protocols::v1::sandbox::{Interface, IpAddress, Route};
use serde_json::Value;

use super::mirror::output_of;
use super::NetworkError;

/// Most addresses and routes taken from the interface (the agent's own limits).
const MAX_ADDRESSES: usize = 16;
const MAX_ROUTES: usize = 256;

/// What the pod's interface carries.
#[derive(Clone, Debug)]
pub struct LinkInfo {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// (address, prefix length); global scope only.
    pub addresses: Vec<(String, u32)>,
    /// Routes through the interface, as `ip -j route` prints them, minus those the
    /// kernel made from an address (the guest's kernel makes them again).
    routes: Vec<Value>,
}

/// Reads `name` in the calling thread's namespace.
pub fn read_link(name: &str) -> Result<LinkInfo, NetworkError> {
    let link = json_of(&["-j", "link", "show", "dev", name])?;
    let link = link.get(0).cloned().unwrap_or(Value::Null);
    let mac_text = link.get("address").and_then(Value::as_str).unwrap_or("");
    let mac = parse_mac(mac_text).ok_or_else(|| parse_error("ip link", mac_text))?;
    let mtu = link
        .get("mtu")
        .and_then(Value::as_u64)
        .and_then(|m| u16::try_from(m).ok())
        .ok_or_else(|| parse_error("ip link", "no mtu"))?;
    let addr = json_of(&["-j", "addr", "show", "dev", name])?;
    let addresses = addr
        .get(0)
        .and_then(|l| l.get("addr_info"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("scope").and_then(Value::as_str) == Some("global"))
        .filter_map(|a| {
            let ip = a.get("local")?.as_str()?.parse::<std::net::IpAddr>().ok()?;
            let prefix = u32::try_from(a.get("prefixlen")?.as_u64()?).ok()?;
            Some((ip.to_string(), prefix))
        })
        .take(MAX_ADDRESSES)
        .collect();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let listed = json_of(&["-j", family, "route", "show", "dev", name])?;
        routes.extend(
            listed
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r.get("protocol").and_then(Value::as_str) != Some("kernel"))
                .filter(|r| {
                    r.get("type")
                        .and_then(Value::as_str)
                        .is_none_or(|t| t == "unicast")
                })
                .cloned(),
        );
    }
    routes.truncate(MAX_ROUTES);
    Ok(LinkInfo {
        mac,
        mtu,
        addresses,
        routes,
    })
}

impl LinkInfo {
    /// The guest NIC: found by MAC, named `name`, with the MTU and addresses.
    pub fn interface(&self, name: &str) -> Interface {
        let mut iface = Interface::new();
        iface.name = name.to_owned();
        iface.mac = format_mac(&self.mac);
        iface.mtu = u32::from(self.mtu);
        iface.addresses = self
            .addresses
            .iter()
            .map(|(address, prefix_len)| {
                let mut a = IpAddress::new();
                a.address = address.clone();
                a.prefix_len = *prefix_len;
                a
            })
            .collect();
        iface
    }

    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// The routes for the guest, through its NIC `device`.
    pub fn guest_routes(&self, device: &str) -> Vec<Route> {
        let text = |r: &Value, key: &str| {
            r.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        self.routes
            .iter()
            .map(|r| {
                let mut route = Route::new();
                route.destination = text(r, "dst");
                route.gateway = text(r, "gateway");
                route.source = text(r, "prefsrc");
                route.device = device.to_owned();
                route.metric = r
                    .get("metric")
                    .and_then(Value::as_u64)
                    .and_then(|m| u32::try_from(m).ok())
                    .unwrap_or(0);
                route
            })
            .collect()
    }
}

fn json_of(args: &[&str]) -> Result<Value, NetworkError> {
    let out = output_of("ip", args)?;
    serde_json::from_slice(&out)
        .map_err(|e| parse_error(&format!("ip {}", args.join(" ")), &e.to_string()))
}

fn parse_error(command: &str, detail: &str) -> NetworkError {
    NetworkError::Parse {
        command: command.to_owned(),
        detail: detail.to_owned(),
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print_back() {
        let mac = parse_mac("0a:58:0a:58:00:05");
        assert_eq!(mac, Some([0x0a, 0x58, 0x0a, 0x58, 0, 5]));
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0a, 0x58, 0, 5]),
            "0a:58:0a:58:00:05"
        );
        assert_eq!(parse_mac("0a:58:0a:58:00"), None);
        assert_eq!(parse_mac("0a:58:0a:58:00:05:01"), None);
    }

    #[test]
    fn routes_keep_gateway_destination_and_source() {
        let link = LinkInfo {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: vec![("10.1.2.3".into(), 24)],
            routes: vec![serde_json::json!({"dst": "default", "gateway": "10.1.2.1", "flags": []})],
        };
        let routes = link.guest_routes("eth0");
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].destination, "default");
        assert_eq!(routes[0].gateway, "10.1.2.1");
        assert_eq!(routes[0].device, "eth0");
        let iface = link.interface("eth0");
        assert_eq!(iface.addresses[0].address, "10.1.2.3");
        assert_eq!(iface.addresses[0].prefix_len, 24);
    }
}
