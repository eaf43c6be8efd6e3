//! The files every container of the pod bind-mounts: `hostname`, `hosts` and (with
//! DNS settings) `resolv.conf`, written into the sandbox directory under the agent's
//! state directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::validate::{DnsSettings, InterfaceConfig};

/// Where the files went (guest paths).
#[derive(Clone, Debug, Default)]
pub struct PodFiles {
    pub hostname: PathBuf,
    pub hosts: PathBuf,
    /// `None` without DNS settings.
    pub resolv_conf: Option<PathBuf>,
}

/// `hostname` followed by a newline.
pub fn hostname_text(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// localhost entries, then the pod's addresses under its hostname.
pub fn hosts_text(hostname: &str, interfaces: &[InterfaceConfig]) -> String {
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for iface in interfaces {
        for (ip, _) in &iface.addresses {
            let _ = writeln!(text, "{ip}\t{hostname}");
        }
    }
    text
}

/// resolv.conf as the C library reads it.
pub fn resolv_conf_text(dns: &DnsSettings) -> String {
    let mut text = String::new();
    for server in &dns.servers {
        let _ = writeln!(text, "nameserver {server}");
    }
    if !dns.searches.is_empty() {
        let _ = writeln!(text, "search {}", dns.searches.join(" "));
    }
    if !dns.options.is_empty() {
        let _ = writeln!(text, "options {}", dns.options.join(" "));
    }
    text
}

/// Writes the files into `dir` (created, mode 0755; files 0644).
pub fn write(
    dir: &Path,
    hostname: &str,
    interfaces: &[InterfaceConfig],
    dns: &DnsSettings,
) -> std::io::Result<PodFiles> {
    std::fs::create_dir_all(dir)?;
    let files = PodFiles {
        hostname: dir.join("hostname"),
        hosts: dir.join("hosts"),
        resolv_conf: (!dns.is_empty()).then(|| dir.join("resolv.conf")),
    };
    std::fs::write(&files.hostname, hostname_text(hostname))?;
    std::fs::write(&files.hosts, hosts_text(hostname, interfaces))?;
    if let Some(path) = &files.resolv_conf {
        std::fs::write(path, resolv_conf_text(dns))?;
    }
    Ok(files)
}

/// Removes what [`write`] made; what is missing is fine.
pub fn remove(dir: &Path) {
    for name in ["hostname", "hosts", "resolv.conf"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_searches_and_options() {
        let dns = DnsSettings {
            servers: vec!["10.0.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            searches: vec!["ns.svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf_text(&dns),
            "nameserver 10.0.0.10\nnameserver fd00::a\nsearch ns.svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_name_every_pod_address() {
        let iface = InterfaceConfig {
            name: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: None,
            addresses: vec![("10.1.0.5".parse().unwrap(), 24)],
        };
        let text = hosts_text("web-0", &[iface]);
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(text.ends_with("10.1.0.5\tweb-0\n"));
    }
}
