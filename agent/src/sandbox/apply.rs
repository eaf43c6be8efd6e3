//! Applies the pod's kernel settings — hostname, loopback, NICs, routes, sysctls —
//! inside the pod's namespaces. Runs on a thread of its own: setns(2) moves only the
//! calling thread, and a thread that entered the pod's namespaces must never go back
//! to serving the agent, so it ends when the work is done.

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::PathBuf;

use nix::sched::CloneFlags;

use super::netlink::{describe_route, format_mac, Netlink};
use super::validate::PodConfig;
use super::SandboxError;

/// The namespaces the work must enter (`None`: the agent's own are the pod's).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub holder_pid: i32,
    pub flags: CloneFlags,
}

/// Runs [`apply`] on a fresh thread and waits for it; returns the pod's hostname.
pub async fn apply_on_thread(
    target: Option<Target>,
    pod: PodConfig,
) -> Result<String, SandboxError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("crx-pod-setup".into())
        .spawn(move || {
            let _ = tx.send(apply(target, &pod));
        })
        .map_err(|e| SandboxError::Io {
            what: "start the pod set-up thread".into(),
            source: e,
        })?;
    rx.await.map_err(|_| SandboxError::Io {
        what: "the pod set-up thread ended without an answer".into(),
        source: std::io::Error::other("thread panicked"),
    })?
}

fn enter(target: Target) -> Result<(), SandboxError> {
    for (flag, name) in [
        (CloneFlags::CLONE_NEWUTS, "uts"),
        (CloneFlags::CLONE_NEWIPC, "ipc"),
        (CloneFlags::CLONE_NEWNET, "net"),
    ] {
        if !target.flags.contains(flag) {
            continue;
        }
        let path = PathBuf::from(format!("/proc/{}/ns/{name}", target.holder_pid));
        let ns_err = |source: std::io::Error| SandboxError::Namespace {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(ns_err)?;
        nix::sched::setns(file.as_fd(), flag).map_err(|e| ns_err(e.into()))?;
    }
    Ok(())
}

/// The work itself, on the calling thread.
fn apply(target: Option<Target>, pod: &PodConfig) -> Result<String, SandboxError> {
    if let Some(target) = target {
        enter(target)?;
    }
    if let Some(name) = &pod.hostname {
        nix::unistd::sethostname(name).map_err(|e| SandboxError::Io {
            what: format!("set the hostname to {name:?}"),
            source: e.into(),
        })?;
    }
    let hostname = nix::unistd::gethostname()
        .map_err(|e| SandboxError::Io {
            what: "read the hostname".into(),
            source: e.into(),
        })?
        .to_string_lossy()
        .into_owned();
    configure_network(pod)?;
    for (path, value) in &pod.sysctls {
        write_sysctl(path, value)?;
    }
    Ok(hostname)
}

fn configure_network(pod: &PodConfig) -> Result<(), SandboxError> {
    let mut nl = Netlink::open()?;
    if let Some(lo) = nl.index_of("lo")? {
        nl.set_up(lo, "lo")?;
    }
    for iface in &pod.interfaces {
        let link = nl.find_by_mac(&iface.mac)?;
        tracing::info!(mac = %format_mac(&iface.mac), from = %link.name, to = %iface.name, "configuring pod interface");
        nl.rename(link.index, &link.name, &iface.name)?;
        if let Some(mtu) = iface.mtu {
            nl.set_mtu(link.index, &iface.name, mtu)?;
        }
        for (ip, prefix) in &iface.addresses {
            nl.add_address(link.index, &iface.name, *ip, *prefix)?;
        }
        nl.set_up(link.index, &iface.name)?;
    }
    for route in &pod.routes {
        let oif = match &route.device {
            None => None,
            Some(dev) => Some(nl.index_of(dev)?.ok_or_else(|| {
                SandboxError::Invalid(format!(
                    "routes.device {dev:?}: no such interface (route {})",
                    describe_route(route)
                ))
            })?),
        };
        nl.add_route(route, oif)?;
    }
    Ok(())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), SandboxError> {
    let full = PathBuf::from("/proc/sys").join(path);
    let key = path.replace('/', ".");
    let err = |source| SandboxError::Sysctl {
        key: key.clone(),
        source,
    };
    // No create, no truncate: only an existing /proc/sys entry can be written.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&full)
        .map_err(err)?;
    file.write_all(value.as_bytes()).map_err(err)?;
    tracing::info!(%key, %value, "sysctl set");
    Ok(())
}
