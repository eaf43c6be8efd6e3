//! The pod sandbox (sandbox.proto): one per agent. CreateSandbox checks the request,
//! mounts the pod's storages, makes (or, in a VM, adopts) the pod's namespaces, applies
//! hostname, network and sysctls inside them and writes the files containers
//! bind-mount; DestroySandbox stops and removes the containers and undoes the rest.
//!
//! Namespaces: in a VM (the agent is PID 1) the pod's UTS, IPC and network namespaces
//! are the agent's own; on the host (tests) they are new ones owned by a holder
//! process, so the host's hostname and network are never touched. A shared PID
//! namespace always has a holder as its PID 1 (as Kubernetes' pause process is), so
//! the pod's processes do not see the agent's.

pub mod apply;
pub mod files;
pub mod holder;
pub mod netlink;
pub mod validate;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nix::sched::CloneFlags;
use tokio::time::Instant;

use crate::storage::StorageError;
use files::PodFiles;
use holder::{Holder, HolderError};
use netlink::NetlinkError;
use validate::PodConfig;

/// Why a sandbox request failed; each maps to one ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A field is out of its documented bounds (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// CreateSandbox came a second time.
    #[error("sandbox {0:?} already exists (DestroySandbox first)")]
    AlreadyExists(String),
    /// The agent is shutting down or cannot run the pod.
    #[error("{0}")]
    Unavailable(String),
    /// A storage could not be mounted.
    #[error("storages: cannot mount {mount_point}")]
    Storage {
        mount_point: String,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Holder(#[from] HolderError),
    #[error("cannot enter the pod namespace {}", .path.display())]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network set-up failed")]
    Network(#[from] NetlinkError),
    /// A namespaced sysctl that the kernel refused or does not have.
    #[error("sysctls key {key:?}: cannot be written")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The pod cgroup could not be made or refused `pod_resources`.
    #[cfg(feature = "containers")]
    #[error("pod_resources: cannot set up the pod cgroup")]
    PodCgroup(#[source] crate::containers::cgroups::CgroupError),
}

/// The pod's namespaces as paths a container's OCI spec can join.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNamespaces {
    pub uts: PathBuf,
    pub ipc: PathBuf,
    pub net: PathBuf,
    /// Only with `share_pid_namespace`.
    pub pid: Option<PathBuf>,
}

/// What the rest of the agent may read about the pod.
#[derive(Clone, Debug)]
pub struct SandboxInfo {
    pub sandbox_id: String,
    /// The hostname every container sees.
    pub hostname: String,
    /// Read by the container spec translation (feature `containers`).
    #[cfg_attr(not(feature = "containers"), allow(dead_code))]
    pub namespaces: PodNamespaces,
    pub files: PodFiles,
}

/// What DestroySandbox must undo.
struct Live {
    info: Arc<SandboxInfo>,
    holder: Option<Holder>,
    storages: Vec<String>,
}

/// The pod as every container's spec translation sees it. Process-wide because the
/// translation runs inside the container manager, which has no handle on the agent's
/// state, and an agent holds one pod.
static CURRENT: RwLock<Option<Arc<SandboxInfo>>> = RwLock::new(None);

fn publish(info: Option<Arc<SandboxInfo>>) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = info;
}

/// The pod, once CreateSandbox succeeded and until DestroySandbox.
#[cfg_attr(not(feature = "containers"), allow(dead_code))]
pub fn current() -> Option<Arc<SandboxInfo>> {
    CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The agent's one sandbox slot (held by `AgentState`).
pub struct SandboxSlot {
    /// Where the pod's files go (`<state dir>/sandbox`).
    dir: PathBuf,
    /// In a VM the agent's namespaces are the pod's; on the host they must be new.
    guest: AtomicBool,
    /// Serialises Create and Destroy.
    live: tokio::sync::Mutex<Option<Live>>,
}

impl SandboxSlot {
    /// A slot writing the pod's files under `dir`; `guest` when the agent is the VM's
    /// init.
    pub fn new(dir: PathBuf, guest: bool) -> SandboxSlot {
        SandboxSlot {
            dir,
            guest: AtomicBool::new(guest),
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// The agent serves on the host (even as PID 1 of a PID namespace): the pod's
    /// namespaces must be new ones, never the host's.
    pub fn mark_host_mode(&self) {
        self.guest.store(false, Ordering::Relaxed);
    }

    /// Creates the pod cgroup and applies the pod's limits to it, so every container
    /// (all live in `/crx/<id>`, spec.rs) shares them. In a VM always (the cgroup
    /// also hands its controllers down); on the host only when limits were asked
    /// for, since a host-mode agent may have no cgroup2 to write to.
    #[cfg(feature = "containers")]
    fn apply_pod_cgroup(&self, pod_resources: &[u8]) -> Result<(), SandboxError> {
        if pod_resources.is_empty() && !self.guest.load(Ordering::Relaxed) {
            return Ok(());
        }
        crate::containers::cgroups::apply_pod_resources_json(pod_resources)
            .map_err(SandboxError::PodCgroup)
    }

    /// The namespaces the holder must create.
    fn holder_flags(&self, pod: &PodConfig) -> CloneFlags {
        let mut flags = CloneFlags::empty();
        if !self.guest.load(Ordering::Relaxed) {
            flags |= CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNET;
        }
        if pod.share_pid_namespace {
            flags |= CloneFlags::CLONE_NEWPID;
        }
        flags
    }

    /// CreateSandbox, after validation: everything or nothing (storages and holder are
    /// undone on failure; kernel settings already applied in a VM stay).
    pub async fn create(
        &self,
        state: &crate::services::AgentState,
        pod: PodConfig,
        deadline: Instant,
    ) -> Result<Arc<SandboxInfo>, SandboxError> {
        let mut live = self.live.lock().await;
        if let Some(existing) = live.as_ref() {
            return Err(SandboxError::AlreadyExists(
                existing.info.sandbox_id.clone(),
            ));
        }
        #[cfg(feature = "containers")]
        self.apply_pod_cgroup(&pod.pod_resources)?;
        let storages = mount_storages(state, &pod, deadline).await?;
        let undo_storages = |storages: Vec<String>| async move {
            for mount_point in storages.iter().rev() {
                if let Err(e) = state.storage().unmount(mount_point, true).await {
                    tracing::warn!(%mount_point, error = %crate::server::error_chain(&e), "cannot unmount a sandbox storage");
                }
            }
        };
        let flags = self.holder_flags(&pod);
        let holder = if flags.is_empty() {
            None
        } else {
            match Holder::spawn(flags) {
                Ok(h) => Some(h),
                Err(e) => {
                    undo_storages(storages).await;
                    return Err(e.into());
                }
            }
        };
        let target = holder.as_ref().map(|h| apply::Target {
            holder_pid: h.pid(),
            flags,
        });
        let namespaces = pod_namespaces(holder.as_ref());
        let (sandbox_id, interfaces, dns) = (
            pod.sandbox_id.clone(),
            pod.interfaces.clone(),
            pod.dns.clone(),
        );
        let id_for_log = pod.sandbox_id.clone();
        let result = async {
            let hostname = apply::apply_on_thread(target, pod).await?;
            let files = files::write(&self.dir, &hostname, &interfaces, &dns).map_err(|e| {
                SandboxError::Io {
                    what: format!("write the pod's files in {}", self.dir.display()),
                    source: e,
                }
            })?;
            Ok::<_, SandboxError>((hostname, files))
        }
        .await;
        let (hostname, files) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(h) = &holder {
                    h.kill();
                }
                files::remove(&self.dir);
                undo_storages(storages).await;
                return Err(e);
            }
        };
        let info = Arc::new(SandboxInfo {
            sandbox_id,
            hostname,
            namespaces,
            files,
        });
        publish(Some(info.clone()));
        *live = Some(Live {
            info: info.clone(),
            holder,
            storages,
        });
        tracing::info!(sandbox = %id_for_log, hostname = %info.hostname, "sandbox created");
        Ok(info)
    }

    /// DestroySandbox: containers stopped (SIGTERM, SIGKILL after `grace`) and
    /// removed, storages unmounted, the holder ended. Nothing to do is success.
    pub async fn destroy(&self, state: &crate::services::AgentState, grace: Duration) {
        let mut live = self.live.lock().await;
        let Some(sandbox) = live.take() else {
            return;
        };
        // First: no container created from now on joins the pod's namespaces.
        publish(None);
        #[cfg(feature = "containers")]
        stop_containers(state, grace).await;
        #[cfg(not(feature = "containers"))]
        let _ = grace;
        for mount_point in sandbox.storages.iter().rev() {
            if let Err(e) = state.storage().unmount(mount_point, true).await {
                tracing::warn!(%mount_point, error = %crate::server::error_chain(&e), "cannot unmount a sandbox storage");
            }
        }
        if let Some(holder) = &sandbox.holder {
            holder.kill();
        }
        files::remove(&self.dir);
        tracing::info!(sandbox = %sandbox.info.sandbox_id, "sandbox destroyed");
    }
}

/// The pod's namespaces: the holder's where it made them, else the agent's own.
fn pod_namespaces(holder: Option<&Holder>) -> PodNamespaces {
    let agent = std::process::id();
    let path = |flag: CloneFlags, name: &str| match holder {
        Some(h) if h.owns(flag) => PathBuf::from(format!("/proc/{}/ns/{name}", h.pid())),
        _ => PathBuf::from(format!("/proc/{agent}/ns/{name}")),
    };
    PodNamespaces {
        uts: path(CloneFlags::CLONE_NEWUTS, "uts"),
        ipc: path(CloneFlags::CLONE_NEWIPC, "ipc"),
        net: path(CloneFlags::CLONE_NEWNET, "net"),
        pid: holder
            .filter(|h| h.owns(CloneFlags::CLONE_NEWPID))
            .map(|h| PathBuf::from(format!("/proc/{}/ns/pid", h.pid()))),
    }
}

/// Mounts the pod's storages in order; on a failure unmounts those already mounted.
async fn mount_storages(
    state: &crate::services::AgentState,
    pod: &PodConfig,
    deadline: Instant,
) -> Result<Vec<String>, SandboxError> {
    let mut mounted: Vec<String> = Vec::new();
    for storage in &pod.storages {
        let device_wait = (Instant::now() + crate::storage::DEFAULT_DEVICE_WAIT).min(deadline);
        match state.storage().mount(storage, device_wait, deadline).await {
            Ok(record) => mounted.push(record.storage.mount_point.clone()),
            Err(source) => {
                for mount_point in mounted.iter().rev() {
                    let _ = state.storage().unmount(mount_point, true).await;
                }
                return Err(SandboxError::Storage {
                    mount_point: storage.mount_point.clone(),
                    source,
                });
            }
        }
    }
    Ok(mounted)
}

/// Stops every container (SIGTERM to all their processes, SIGKILL to what is left
/// after `grace`) and removes it with its storages.
#[cfg(feature = "containers")]
async fn stop_containers(state: &crate::services::AgentState, grace: Duration) {
    let Some(manager) = state.containers() else {
        return;
    };
    let ids = manager.ids();
    for id in &ids {
        let _ = manager.signal(id, "", libc::SIGTERM as u32, true).await;
    }
    let deadline = Instant::now() + grace;
    for id in &ids {
        // Errors: never started, or already gone; either way nothing to wait for.
        let _ = manager.wait(id, "", deadline).await;
    }
    for id in &ids {
        let _ = manager.signal(id, "", libc::SIGKILL as u32, true).await;
        if let Err(e) = manager.remove(id, true).await {
            tracing::warn!(container = %id, error = %crate::server::error_chain(&e), "DestroySandbox could not remove a container");
            continue;
        }
        for mount_point in state.take_container_storages(id) {
            let text = mount_point.display().to_string();
            if let Err(e) = state.storage().unmount(&text, true).await {
                tracing::warn!(mount_point = %text, error = %crate::server::error_chain(&e), "cannot unmount a container storage");
            }
        }
    }
}
