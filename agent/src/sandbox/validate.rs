//! Checks a CreateSandbox request against sandbox.proto's bounds and turns it into a
//! typed [`PodConfig`]: everything here came from the host, so nothing is used before
//! it passed. Every error names the field it is about.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use crx_protocols::v1::sandbox::{CreateSandboxRequest, DnsConfig};
use crx_protocols::v1::storage::Storage;

use super::SandboxError;

/// Longest sandbox id (containerd's rule, sandbox.proto).
pub const MAX_ID_LEN: usize = 76;
/// Longest hostname (the kernel's HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;
pub const MAX_DNS_SERVERS: usize = 3;
pub const MAX_DNS_SEARCHES: usize = 32;
pub const MAX_DNS_SEARCH_LEN: usize = 253;
pub const MAX_DNS_OPTIONS: usize = 16;
pub const MAX_DNS_OPTION_LEN: usize = 64;
pub const MAX_INTERFACES: usize = 8;
/// IFNAMSIZ - 1.
pub const MAX_IFNAME_LEN: usize = 15;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ROUTES: usize = 256;
pub const MAX_SYSCTLS: usize = 128;
pub const MAX_SYSCTL_KEY_LEN: usize = 128;
pub const MAX_SYSCTL_VALUE_LEN: usize = 256;
pub const MAX_STORAGES: usize = 32;
pub const MAX_POD_RESOURCES: usize = 64 << 10;
/// Longest DestroySandbox grace period.
pub const MAX_GRACE_MS: u32 = 60_000;

/// One NIC to configure.
#[derive(Clone, Debug, PartialEq)]
pub struct InterfaceConfig {
    pub name: String,
    pub mac: [u8; 6],
    /// `None`: leave as is.
    pub mtu: Option<u32>,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// Whether a route is IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// One route to add.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    pub family: Family,
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

/// The resolver configuration, already checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsSettings {
    pub servers: Vec<IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl DnsSettings {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.searches.is_empty() && self.options.is_empty()
    }
}

/// A CreateSandbox request that passed every check.
#[derive(Clone, Debug)]
pub struct PodConfig {
    pub sandbox_id: String,
    /// `None`: leave the hostname as it is.
    pub hostname: Option<String>,
    pub dns: DnsSettings,
    pub interfaces: Vec<InterfaceConfig>,
    pub routes: Vec<RouteConfig>,
    /// `/proc/sys` relative path → value, in key order.
    pub sysctls: BTreeMap<String, String>,
    pub storages: Vec<Storage>,
    /// Applied to the pod cgroup (feature `containers`).
    #[cfg_attr(not(feature = "containers"), allow(dead_code))]
    pub pod_resources: Vec<u8>,
    pub share_pid_namespace: bool,
}

fn invalid(message: String) -> SandboxError {
    SandboxError::Invalid(message)
}

/// Shortened for error messages: the host may send megabytes.
fn shown(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// containerd's identifier rule: 1-76 bytes of `[A-Za-z0-9]+` joined by single `.`,
/// `_` or `-`.
pub fn check_sandbox_id(id: &str) -> Result<(), SandboxError> {
    let separators_ok = id
        .split(['.', '_', '-'])
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    if id.is_empty() || id.len() > MAX_ID_LEN || !separators_ok {
        return Err(invalid(format!(
            "sandbox_id {}: must be 1-{MAX_ID_LEN} bytes of [A-Za-z0-9] separated by single '.', '_' or '-'",
            shown(id)
        )));
    }
    Ok(())
}

fn check_hostname(name: &str) -> Result<Option<String>, SandboxError> {
    if name.is_empty() {
        return Ok(None);
    }
    let ok = name.len() <= MAX_HOSTNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if !ok {
        return Err(invalid(format!(
            "hostname {}: must be ≤ {MAX_HOSTNAME_LEN} bytes of [A-Za-z0-9.-], not starting or ending with '.' or '-'",
            shown(name)
        )));
    }
    Ok(Some(name.to_owned()))
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, SandboxError> {
    text.parse::<IpAddr>().map_err(|_| {
        invalid(format!(
            "{field} {}: not an IPv4 or IPv6 address",
            shown(text)
        ))
    })
}

fn check_prefix(field: &str, ip: &IpAddr, prefix: u32) -> Result<u8, SandboxError> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(prefix)
        .ok()
        .filter(|p| u32::from(*p) <= max)
        .ok_or_else(|| invalid(format!("{field} {prefix}: must be 0-{max} for {ip}")))
}

/// A resolv.conf word: no whitespace or control characters (they would split or end
/// the line), bounded.
fn check_word(field: &str, text: &str, max: usize) -> Result<String, SandboxError> {
    if text.is_empty()
        || text.len() > max
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "{field} {}: must be 1-{max} bytes without whitespace or control characters",
            shown(text)
        )));
    }
    Ok(text.to_owned())
}

fn check_dns(dns: Option<&DnsConfig>) -> Result<DnsSettings, SandboxError> {
    let Some(dns) = dns else {
        return Ok(DnsSettings::default());
    };
    if dns.servers.len() > MAX_DNS_SERVERS {
        return Err(invalid(format!(
            "dns.servers: {} given; at most {MAX_DNS_SERVERS}",
            dns.servers.len()
        )));
    }
    if dns.searches.len() > MAX_DNS_SEARCHES {
        return Err(invalid(format!(
            "dns.searches: {} given; at most {MAX_DNS_SEARCHES}",
            dns.searches.len()
        )));
    }
    if dns.options.len() > MAX_DNS_OPTIONS {
        return Err(invalid(format!(
            "dns.options: {} given; at most {MAX_DNS_OPTIONS}",
            dns.options.len()
        )));
    }
    Ok(DnsSettings {
        servers: dns
            .servers
            .iter()
            .map(|s| parse_ip("dns.servers", s))
            .collect::<Result<_, _>>()?,
        searches: dns
            .searches
            .iter()
            .map(|s| check_word("dns.searches", s, MAX_DNS_SEARCH_LEN))
            .collect::<Result<_, _>>()?,
        options: dns
            .options
            .iter()
            .map(|s| check_word("dns.options", s, MAX_DNS_OPTION_LEN))
            .collect::<Result<_, _>>()?,
    })
}

/// An interface name the kernel accepts (dev_valid_name) and that is safe in paths.
pub fn check_ifname(field: &str, name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(invalid(format!(
            "{field} {}: must be 1-{MAX_IFNAME_LEN} bytes of [A-Za-z0-9_.-], not \".\" or \"..\"",
            shown(name)
        )));
    }
    Ok(())
}

fn parse_mac(text: &str) -> Result<[u8; 6], SandboxError> {
    let err = || {
        invalid(format!(
            "interfaces.mac {}: expected six hex bytes like \"aa:bb:cc:dd:ee:ff\"",
            shown(text)
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(err)?;
        if part.len() != 2 {
            return Err(err());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() {
        return Err(err());
    }
    Ok(mac)
}

fn check_interfaces(req: &CreateSandboxRequest) -> Result<Vec<InterfaceConfig>, SandboxError> {
    if req.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(format!(
            "interfaces: {} given; at most {MAX_INTERFACES}",
            req.interfaces.len()
        )));
    }
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    let mut out = Vec::new();
    for iface in &req.interfaces {
        check_ifname("interfaces.name", &iface.name)?;
        if iface.name == "lo" {
            return Err(invalid(
                "interfaces.name \"lo\": the loopback is brought up by the agent itself".into(),
            ));
        }
        let mac = parse_mac(&iface.mac)?;
        if !names.insert(iface.name.clone()) {
            return Err(invalid(format!(
                "interfaces.name {}: given twice",
                shown(&iface.name)
            )));
        }
        if !macs.insert(mac) {
            return Err(invalid(format!(
                "interfaces.mac {}: given twice",
                shown(&iface.mac)
            )));
        }
        let mtu = match iface.mtu {
            0 => None,
            m @ 68..=65535 => Some(m),
            m => {
                return Err(invalid(format!(
                    "interfaces.mtu {m} (interface {}): must be 0 or 68-65535",
                    shown(&iface.name)
                )))
            }
        };
        if iface.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!(
                "interfaces.addresses: {} given for {}; at most {MAX_ADDRESSES}",
                iface.addresses.len(),
                shown(&iface.name)
            )));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| {
                let ip = parse_ip("interfaces.addresses.address", &a.address)?;
                let prefix = check_prefix("interfaces.addresses.prefix_len", &ip, a.prefix_len)?;
                Ok((ip, prefix))
            })
            .collect::<Result<_, SandboxError>>()?;
        out.push(InterfaceConfig {
            name: iface.name.clone(),
            mac,
            mtu,
            addresses,
        });
    }
    Ok(out)
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), SandboxError> {
    let Some((addr, prefix)) = text.split_once('/') else {
        return Err(invalid(format!(
            "routes.destination {}: expected a CIDR like \"10.0.0.0/8\", or \"default\"",
            shown(text)
        )));
    };
    let ip = parse_ip("routes.destination", addr)?;
    let prefix: u32 = prefix.parse().map_err(|_| {
        invalid(format!(
            "routes.destination {}: bad prefix length",
            shown(text)
        ))
    })?;
    Ok((ip, check_prefix("routes.destination prefix", &ip, prefix)?))
}

fn check_route(
    route: &crx_protocols::v1::sandbox::Route,
    interfaces: &[InterfaceConfig],
) -> Result<RouteConfig, SandboxError> {
    let destination = match route.destination.as_str() {
        "" | "default" => None,
        cidr => Some(parse_cidr(cidr)?),
    };
    let optional_ip = |field: &str, text: &str| -> Result<Option<IpAddr>, SandboxError> {
        if text.is_empty() {
            Ok(None)
        } else {
            parse_ip(field, text).map(Some)
        }
    };
    let gateway = optional_ip("routes.gateway", &route.gateway)?;
    let source = optional_ip("routes.source", &route.source)?;
    let family = destination
        .map(|(ip, _)| Family::of(&ip))
        .or(gateway.as_ref().map(Family::of))
        .or(source.as_ref().map(Family::of))
        .unwrap_or(Family::V4);
    for (field, ip) in [("routes.gateway", gateway), ("routes.source", source)] {
        if let Some(ip) = ip {
            if Family::of(&ip) != family {
                return Err(invalid(format!(
                    "{field} {ip}: not of the route's address family ({family:?})"
                )));
            }
        }
    }
    let device = if route.device.is_empty() {
        None
    } else {
        check_ifname("routes.device", &route.device)?;
        if route.device != "lo" && !interfaces.iter().any(|i| i.name == route.device) {
            return Err(invalid(format!(
                "routes.device {}: not one of the request's interfaces (nor \"lo\")",
                shown(&route.device)
            )));
        }
        Some(route.device.clone())
    };
    if gateway.is_none() && device.is_none() {
        return Err(invalid(format!(
            "routes (destination {}): a route needs a gateway or a device",
            shown(&route.destination)
        )));
    }
    Ok(RouteConfig {
        family,
        destination,
        gateway,
        device,
        source,
        metric: route.metric,
    })
}

/// Whether `key` (dotted) is one the kernel keeps per network, IPC or mount-queue
/// namespace, so writing it cannot change the rest of the guest.
pub fn is_namespaced_sysctl(key: &str) -> bool {
    key.starts_with("net.")
        || key.starts_with("kernel.shm")
        || key.starts_with("kernel.msg")
        || key == "kernel.sem"
        || key.starts_with("fs.mqueue.")
}

fn check_sysctl(key: &str, value: &str) -> Result<(String, String), SandboxError> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_SYSCTL_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && key.split('.').all(|part| !part.is_empty());
    if !key_ok {
        return Err(invalid(format!(
            "sysctls key {}: must be ≤ {MAX_SYSCTL_KEY_LEN} bytes of [A-Za-z0-9_.-] in dotted form",
            shown(key)
        )));
    }
    if !is_namespaced_sysctl(key) {
        return Err(invalid(format!(
            "sysctls key {}: not a namespaced sysctl (allowed: net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*)",
            shown(key)
        )));
    }
    if value.len() > MAX_SYSCTL_VALUE_LEN || value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(format!(
            "sysctls[{key}] value {}: must be ≤ {MAX_SYSCTL_VALUE_LEN} bytes without control characters",
            shown(value)
        )));
    }
    Ok((key.replace('.', "/"), value.to_owned()))
}

/// Checks every field of `req` against sandbox.proto.
pub fn check_request(req: &CreateSandboxRequest) -> Result<PodConfig, SandboxError> {
    check_sandbox_id(&req.sandbox_id)?;
    let hostname = check_hostname(&req.hostname)?;
    let dns = check_dns(req.dns.as_ref())?;
    let interfaces = check_interfaces(req)?;
    if req.routes.len() > MAX_ROUTES {
        return Err(invalid(format!(
            "routes: {} given; at most {MAX_ROUTES}",
            req.routes.len()
        )));
    }
    let routes = req
        .routes
        .iter()
        .map(|r| check_route(r, &interfaces))
        .collect::<Result<_, _>>()?;
    if req.sysctls.len() > MAX_SYSCTLS {
        return Err(invalid(format!(
            "sysctls: {} given; at most {MAX_SYSCTLS}",
            req.sysctls.len()
        )));
    }
    let sysctls = req
        .sysctls
        .iter()
        .map(|(k, v)| check_sysctl(k, v))
        .collect::<Result<_, _>>()?;
    if req.storages.len() > MAX_STORAGES {
        return Err(invalid(format!(
            "storages: {} given; at most {MAX_STORAGES}",
            req.storages.len()
        )));
    }
    check_pod_resources(&req.pod_resources)?;
    Ok(PodConfig {
        sandbox_id: req.sandbox_id.clone(),
        hostname,
        dns,
        interfaces,
        routes,
        sysctls,
        storages: req.storages.clone(),
        pod_resources: req.pod_resources.clone(),
        share_pid_namespace: req.share_pid_namespace,
    })
}

fn check_pod_resources(raw: &[u8]) -> Result<(), SandboxError> {
    if raw.len() > MAX_POD_RESOURCES {
        return Err(invalid(format!(
            "pod_resources: {} bytes; at most {MAX_POD_RESOURCES}",
            raw.len()
        )));
    }
    #[cfg(feature = "containers")]
    if !raw.is_empty() {
        serde_json::from_slice::<libcontainer::oci_spec::runtime::LinuxResources>(raw).map_err(
            |e| {
                invalid(format!(
                    "pod_resources: not an OCI runtime-spec LinuxResources JSON object: {e}"
                ))
            },
        )?;
    }
    Ok(())
}

/// Checks DestroySandbox's grace period.
pub fn check_grace(ms: u32) -> Result<std::time::Duration, SandboxError> {
    if ms > MAX_GRACE_MS {
        return Err(invalid(format!(
            "grace_period_ms {ms}: at most {MAX_GRACE_MS}"
        )));
    }
    Ok(std::time::Duration::from_millis(u64::from(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crx_protocols::v1::sandbox::{Interface, IpAddress, Route};

    fn base() -> CreateSandboxRequest {
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = "pod-1".into();
        req
    }

    fn message(req: &CreateSandboxRequest) -> String {
        match check_request(req) {
            Err(SandboxError::Invalid(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn sandbox_ids_follow_containerds_rule() {
        for good in ["a", "pod-1", "a.b_c-d", &"a".repeat(MAX_ID_LEN)] {
            check_sandbox_id(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "a b",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(check_sandbox_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_their_field() {
        let mut r = base();
        r.hostname = "bad_host".into();
        assert!(message(&r).starts_with("hostname"));

        let mut r = base();
        r.dns.mut_or_insert_default().servers = vec!["1.1.1.1".into(); 4];
        assert!(message(&r).starts_with("dns.servers"));
        r.dns.mut_or_insert_default().servers = vec!["nope".into()];
        assert!(message(&r).starts_with("dns.servers"));

        let mut r = base();
        r.dns.mut_or_insert_default().options = vec!["nd ots".into()];
        assert!(message(&r).starts_with("dns.options"));

        let mut iface = Interface::new();
        iface.name = "eth0".into();
        iface.mac = "02:00:00:00:00:01".into();
        let mut r = base();
        let mut bad = iface.clone();
        bad.mac = "02:00:00:00:00".into();
        r.interfaces = vec![bad];
        assert!(message(&r).starts_with("interfaces.mac"));
        let mut bad = iface.clone();
        bad.mtu = 67;
        r.interfaces = vec![bad];
        assert!(message(&r).starts_with("interfaces.mtu"));
        let mut bad = iface.clone();
        bad.name = "x".repeat(16);
        r.interfaces = vec![bad];
        assert!(message(&r).starts_with("interfaces.name"));
        let mut bad = iface.clone();
        let mut addr = IpAddress::new();
        addr.address = "10.0.0.1".into();
        addr.prefix_len = 33;
        bad.addresses = vec![addr];
        r.interfaces = vec![bad];
        assert!(message(&r).starts_with("interfaces.addresses.prefix_len"));

        let mut r = base();
        r.interfaces = vec![iface.clone()];
        let mut route = Route::new();
        route.destination = "10.0.0.0/8".into();
        route.gateway = "fe80::1".into();
        r.routes = vec![route.clone()];
        assert!(message(&r).starts_with("routes.gateway"));
        route.gateway = String::new();
        route.device = "eth9".into();
        r.routes = vec![route];
        assert!(message(&r).starts_with("routes.device"));

        let mut r = base();
        r.sysctls.insert("kernel.hostname".into(), "x".into());
        let m = message(&r);
        assert!(
            m.contains("kernel.hostname") && m.contains("not a namespaced"),
            "{m}"
        );
        let mut r = base();
        r.sysctls
            .insert("net.ipv4.ip_forward".into(), "1\n2".into());
        assert!(message(&r).starts_with("sysctls[net.ipv4.ip_forward]"));

        let mut r = base();
        r.pod_resources = vec![b' '; MAX_POD_RESOURCES + 1];
        assert!(message(&r).starts_with("pod_resources"));
    }

    #[test]
    fn a_full_request_passes() {
        let mut r = base();
        r.hostname = "web-0.example".into();
        let mut iface = Interface::new();
        iface.name = "eth0".into();
        iface.mac = "02:AB:00:00:00:01".into();
        iface.mtu = 1500;
        let mut addr = IpAddress::new();
        addr.address = "10.1.2.3".into();
        addr.prefix_len = 24;
        iface.addresses = vec![addr];
        r.interfaces = vec![iface];
        let mut route = Route::new();
        route.gateway = "10.1.2.1".into();
        r.routes = vec![route];
        r.sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
        r.sysctls
            .insert("kernel.sem".into(), "250\t32000 32 128".into());
        let pod = check_request(&r).unwrap();
        assert_eq!(pod.interfaces[0].mac, [2, 0xab, 0, 0, 0, 1]);
        assert_eq!(pod.routes[0].family, Family::V4);
        assert_eq!(pod.routes[0].destination, None);
        assert!(pod
            .sysctls
            .contains_key("net/ipv4/ip_unprivileged_port_start"));
        assert!(check_grace(MAX_GRACE_MS + 1).is_err());
    }
}
