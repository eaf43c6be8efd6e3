//! The ttrpc services the agent serves, and the state they share.

#[cfg(feature = "containers")]
pub mod containers;
#[cfg(not(feature = "containers"))]
pub mod drafts;
pub mod health;
pub mod lifecycle;
pub mod port_forward;
pub mod sandbox;
pub mod storage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crx_protocols::v1::{
    agent_ttrpc, container_ttrpc, health_ttrpc, portforward_ttrpc, sandbox_ttrpc, storage_ttrpc,
};
use tokio::sync::watch;

use crate::storage::StorageManager;

/// The least time kept back from a request's deadline for the reply to reach the
/// host: a shim measured replies ~270 ms late with 100 ms kept back (vsock and an
/// emulated guest are slow), so this covers that with room to spare.
const REPLY_MARGIN: Duration = Duration::from_millis(300);
/// The share of a request's window kept back when that is more than [`REPLY_MARGIN`].
const REPLY_MARGIN_DIVISOR: u32 = 20;
/// The deadline used when a request carries none (the protocol asks for one).
const NO_DEADLINE: Duration = Duration::from_secs(60);

/// When a handler must have its answer ready for a request whose ttrpc timeout is
/// `timeout_nano` (0 or less: none): the larger of [`REPLY_MARGIN`] and 5 % of the
/// window is kept back, but never more than half of it, so a long poll (WaitProcess,
/// GetEvents) reaches the caller before the caller's own deadline.
pub fn reply_deadline(timeout_nano: i64) -> tokio::time::Instant {
    let window = u64::try_from(timeout_nano)
        .ok()
        .filter(|n| *n > 0)
        .map_or(NO_DEADLINE, Duration::from_nanos);
    let margin = REPLY_MARGIN
        .max(window / REPLY_MARGIN_DIVISOR)
        .min(window / 2);
    tokio::time::Instant::now() + (window - margin)
}

/// State shared by the services and the main loop.
pub struct AgentState {
    /// Set once a shutdown was requested; the main loop waits on it.
    shutdown: watch::Sender<bool>,
    /// The storages the agent mounted.
    storage: StorageManager,
    /// The pod's containers, once the manager is up.
    #[cfg(feature = "containers")]
    containers: std::sync::OnceLock<Arc<crate::containers::manager::ContainerManager>>,
    /// Mount points of each container's storages, unmounted when it is removed.
    #[cfg(feature = "containers")]
    container_storages: std::sync::Mutex<HashMap<String, Vec<std::path::PathBuf>>>,
    /// The pod sandbox (its namespaces, hostname, files, pod resources).
    sandbox: crate::sandbox::SandboxSlot,
}

impl AgentState {
    /// A fresh agent: serving, no shutdown requested, nothing mounted.
    pub fn new(storage: StorageManager) -> Arc<AgentState> {
        // The pod's files live beside the storage root, in the agent's state directory.
        let sandbox_dir = storage
            .root()
            .parent()
            .map_or_else(|| storage.root().join("sandbox"), |p| p.join("sandbox"));
        // main marks host mode, which may also run as PID 1.
        let guest = std::process::id() == 1;
        Arc::new(AgentState {
            sandbox: crate::sandbox::SandboxSlot::new(sandbox_dir, guest),
            shutdown: watch::channel(false).0,
            storage,
            #[cfg(feature = "containers")]
            containers: std::sync::OnceLock::new(),
            #[cfg(feature = "containers")]
            container_storages: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Hands the container manager to the services (once).
    #[cfg(feature = "containers")]
    pub fn set_containers(&self, manager: Arc<crate::containers::manager::ContainerManager>) {
        let _ = self.containers.set(manager);
    }

    /// The container manager, if it started.
    #[cfg(feature = "containers")]
    pub fn containers(&self) -> Option<&Arc<crate::containers::manager::ContainerManager>> {
        self.containers.get()
    }

    /// Remembers the storages mounted for container `id`.
    #[cfg(feature = "containers")]
    pub fn set_container_storages(&self, id: &str, mount_points: Vec<std::path::PathBuf>) {
        self.container_storages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), mount_points);
    }

    /// Forgets and returns the storages mounted for container `id`.
    #[cfg(feature = "containers")]
    pub fn take_container_storages(&self, id: &str) -> Vec<std::path::PathBuf> {
        self.container_storages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default()
    }

    /// The pod sandbox.
    pub fn sandbox(&self) -> &crate::sandbox::SandboxSlot {
        &self.sandbox
    }

    /// The agent's mounts.
    pub fn storage(&self) -> &StorageManager {
        &self.storage
    }

    /// Asks the main loop to shut down (idempotent).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether a shutdown was requested.
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once a shutdown is requested.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        // Err means the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|requested| *requested).await;
    }
}

/// Every service, ready for `ttrpc::r#async::Server::register_service`.
pub fn all(state: &Arc<AgentState>) -> HashMap<String, ttrpc::r#async::Service> {
    let mut services =
        health_ttrpc::create_health(Arc::new(health::HealthService::new(state.clone())));
    services.extend(agent_ttrpc::create_agent(Arc::new(
        lifecycle::LifecycleService::new(state.clone()),
    )));
    services.extend(storage_ttrpc::create_storage(Arc::new(
        storage::StorageService::new(state.clone()),
    )));
    services.extend(portforward_ttrpc::create_port_forward(Arc::new(
        port_forward::PortForwardService,
    )));
    services.extend(sandbox_ttrpc::create_sandbox(Arc::new(
        sandbox::SandboxService::new(state.clone()),
    )));
    #[cfg(feature = "containers")]
    services.extend(container_ttrpc::create_containers(Arc::new(
        containers::ContainersService::new(state.clone()),
    )));
    #[cfg(not(feature = "containers"))]
    services.extend(container_ttrpc::create_containers(Arc::new(
        drafts::DraftServices,
    )));
    services
}
