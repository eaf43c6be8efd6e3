//! The pod's network: CNI put a veth `eth0` (with the pod's addresses and routes) in
//! the pod's network namespace; the VM gets a tap next to it, mirrored to and from
//! `eth0` by tc redirects, and the guest NIC takes over `eth0`'s MAC, MTU, addresses
//! and routes.
//!
//! `eth0`'s addresses are flushed once read: the ingress redirect already keeps
//! `eth0`'s traffic from the namespace's own stack, but a namespace still holding the
//! pod IP could originate packets with it (or answer ARP for it through a path that
//! bypasses the filter), so the guest is the only holder of the pod IP. CNI DEL works
//! by interface name and does not need the addresses back.
//!
//! The links are read and changed with iproute2's `ip` and `tc` (JSON output for
//! reading), run inside the namespace from a thread that joined it. iproute2 is
//! Priority: important on Debian (in every standard install, though not in minimal
//! container images); containerd's CNI plugins need a full host anyway.

mod inspect;
mod mirror;
mod netns;
pub mod port_forward;
mod tap;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crx_protocols::v1::sandbox::{Interface, Route};

use crate::vm::NetDevice;

pub use inspect::LinkInfo;

/// The CNI interface the pod's network arrives on (CRI always names it so).
pub const POD_IFACE: &str = "eth0";
/// The tap the VM's NIC sits on, in the pod's namespace.
pub const TAP_NAME: &str = "tap0";

/// Why the pod's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("entering the network namespace {path:?}: {source}")]
    Enter {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("unexpected output of {command}: {detail}")]
    Parse { command: String, detail: String },
    #[error("creating the tap {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("the network namespace thread panicked")]
    Thread,
}

/// The network namespace path of a sandbox's OCI spec (`linux.namespaces[type=network]`).
pub fn netns_of(spec: &serde_json::Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The pod's network as wired: the VM's NIC, and what CreateSandbox gives the guest.
pub struct PodNetwork {
    netns: PathBuf,
    detached: AtomicBool,
    pub nic: NetDevice,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

impl PodNetwork {
    /// Reads `eth0` in `netns`, creates the tap, mirrors the two and flushes `eth0`'s
    /// addresses. On error whatever was set up is undone.
    pub fn attach(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let (link, tap) = netns::run_in(netns, || {
            let link = inspect::read_link(POD_IFACE)?;
            let tap = tap::create(TAP_NAME)?;
            let wired = mirror::wire(POD_IFACE, TAP_NAME, link.mtu)
                .and_then(|()| mirror::flush_addresses(POD_IFACE));
            if let Err(e) = wired {
                mirror::unwire(POD_IFACE, TAP_NAME);
                return Err(e);
            }
            Ok((link, tap))
        })?;
        tracing::info!(
            mac = %inspect::format_mac(&link.mac),
            mtu = link.mtu,
            addresses = ?link.addresses,
            routes = link.route_count(),
            "pod network mirrored onto {TAP_NAME}"
        );
        Ok(PodNetwork {
            netns: netns.to_owned(),
            detached: AtomicBool::new(false),
            nic: NetDevice {
                tap: Arc::new(tap),
                mac: link.mac,
                mtu: link.mtu,
            },
            interfaces: vec![link.interface(POD_IFACE)],
            routes: link.guest_routes(POD_IFACE),
        })
    }

    /// Removes the redirects and the tap (the namespace itself is CRI's). Best effort:
    /// a namespace CRI already removed has nothing left to clean. Idempotent; also run
    /// on drop, so a pod that failed to boot leaves nothing behind.
    pub fn detach(&self) {
        if self.detached.swap(true, Ordering::SeqCst) || !self.netns.exists() {
            return;
        }
        let done = netns::run_in(&self.netns, || {
            mirror::unwire(POD_IFACE, TAP_NAME);
            Ok(())
        });
        if let Err(e) = done {
            tracing::warn!(error = %e, "pod network clean-up incomplete");
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path_comes_from_the_network_namespace_entry() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
        ]}});
        assert_eq!(netns_of(&spec), Some(PathBuf::from("/var/run/netns/cni-1")));
        let own = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_of(&own), None);
        assert_eq!(netns_of(&serde_json::json!({})), None);
    }
}
