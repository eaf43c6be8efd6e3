//! One pod's VM, as the task service sees it: booted through the configured backend
//! with the pod share as its virtio-fs device, the agent awaited (with a deadline),
//! clients for the agent's services, and a watcher thread that reports the VM's end
//! when nobody asked for it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crx_protocols::hybrid_vsock::{self, AgentAddress};
use crx_protocols::v1::container_ttrpc::ContainersClient;
use crx_protocols::v1::portforward_ttrpc::PortForwardClient;
use crx_protocols::v1::sandbox_ttrpc::SandboxClient;
use crx_shim::config::ShimConfig;
use crx_shim::network::port_forward::PortForwarder;
use crx_shim::network::PodNetwork;
use crx_shim::vm::{
    select_confined_backend, BackendKind, Confinement, SerialOutput, SharedDir, Vm, VmConfig,
    VmDevices, VmError,
};

use crate::block_slots::{BlockSlots, SharedSlots};
use crate::host_cgroup::{CgroupError, HostCgroup};
use crate::rootfs::{PodPaths, SHARE_TAG};
use crate::vm_watch::{self, StopSignal};

/// How long a stopping VM gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why a pod VM could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no VMM for this pod: {0}")]
    Backend(String),
    #[error("could not start the pod VM")]
    Vm(#[source] VmError),
    #[error("the crx agent in the pod VM ({backend}) did not answer within {timeout:?}: {cause}{vm_state}")]
    AgentTimeout {
        backend: BackendKind,
        timeout: Duration,
        cause: std::io::Error,
        vm_state: String,
    },
    #[error("the pod VM ended before its agent answered: {0}")]
    DiedBooting(String),
    #[error("the crx agent in the pod VM speaks protocol version {agent}, this shim needs version {needed} or newer: rebuild the guest initramfs{vm_state}")]
    AgentTooOld {
        agent: u32,
        needed: u32,
        vm_state: String,
    },
    #[error("internal error: {0}")]
    Join(String),
    #[error("could not give the pod VM its network")]
    Network(#[source] crx_shim::network::NetworkError),
    #[error("could not place the pod VM in the pod's host cgroup")]
    HostCgroup(#[source] CgroupError),
}

/// Whether an agent speaking `agent` can serve this shim: older agents lack
/// requests the shim sends, so they are refused at connect, not mid-pod.
pub fn protocol_supported(agent: u32) -> Result<(), (u32, u32)> {
    let needed = crx_protocols::PROTOCOL_VERSION;
    if agent < needed {
        Err((agent, needed))
    } else {
        Ok(())
    }
}

/// A running pod VM and its agent.
pub struct Pod {
    pub backend: BackendKind,
    pub sandbox: SandboxClient,
    pub containers: ContainersClient,
    /// The agent's protocol version (`Health.Version`).
    pub protocol_version: u32,
    /// From spawn to the agent's first answer.
    pub ready_after: Duration,
    /// The VM's hybrid-vsock socket (stdio streams connect through it).
    pub agent_socket: std::path::PathBuf,
    /// The VM's processes (names and pids), fixed for the VM's life.
    pids: Vec<(&'static str, u32)>,
    vm: Arc<Mutex<Box<dyn Vm>>>,
    /// Tells the VM's watcher that its end is asked for.
    stopping: Arc<StopSignal>,
    /// The pod's network, if its spec named a network namespace.
    pub network: Option<PodNetwork>,
    /// CRI port forwarding into the VM (pods with a network namespace only).
    port_forward: Option<PortForwarder>,
    /// The VM's empty drive slots, for containers' host block devices.
    pub block_slots: SharedSlots,
    /// The sandbox's host cgroup, which holds the VM's processes; removed after them.
    host_cgroup: Arc<Mutex<HostCgroup>>,
    /// Keeps the VM's processes alive for as long as the pod (see [`VmOwnerThread`]).
    _vm_owner: VmOwnerThread,
}

/// The thread that spawns the VM's processes and then waits for the pod to let go.
/// Each VM process is spawned with PR_SET_PDEATHSIG = SIGKILL so it cannot outlive the
/// shim, and the kernel sends that signal when the *thread* that forked it ends. A
/// tokio blocking-pool thread ends after 10 s idle, which killed running pods.
struct VmOwnerThread {
    /// Dropped with the pod: the thread's wait ends and the thread exits.
    _release: std::sync::mpsc::Sender<()>,
}

impl VmOwnerThread {
    /// Runs `start` on a new owner thread; the VM it returns lives while the
    /// returned owner does.
    async fn start(
        start: impl FnOnce() -> Result<Box<dyn Vm>, PodError> + Send + 'static,
    ) -> Result<(Box<dyn Vm>, VmOwnerThread), PodError> {
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("crx-vm-owner".into())
            .spawn(move || {
                let started = start();
                let spawned = started.is_ok();
                if result_tx.send(started).is_ok() && spawned {
                    // Returns when the sender goes with the pod.
                    let _ = released.recv();
                }
            })
            .map_err(|e| PodError::Join(format!("cannot start the VM owner thread: {e}")))?;
        let vm = result_rx.await.map_err(|_| {
            PodError::Join("the VM owner thread ended before the VM started".into())
        })??;
        Ok((vm, VmOwnerThread { _release: release }))
    }
}

/// Called (once, on the watcher thread) when the VM ends without a stop request.
pub type DeathHandler = Box<dyn FnOnce(String) + Send>;

impl Pod {
    /// Boots the pod's VM with `paths.share()` as its share and waits for the agent.
    /// The share (and the first container's rootfs in it) must be ready.
    pub async fn boot(
        sandbox_id: &str,
        paths: &PodPaths,
        config: &ShimConfig,
        (vcpus, memory_mib): (u8, u32),
        host_cgroup: HostCgroup,
        netns: Option<std::path::PathBuf>,
        on_death: DeathHandler,
    ) -> Result<Pod, PodError> {
        // The pod's CNI network, mirrored onto a tap for the VM's NIC (dropped, and so
        // undone, on any early return below).
        let forward_netns = netns.clone();
        let network = match netns {
            Some(ns) => Some(
                tokio::task::spawn_blocking(move || PodNetwork::attach(&ns))
                    .await
                    .map_err(|e| PodError::Join(e.to_string()))?
                    .map_err(PodError::Network)?,
            ),
            None => None,
        };
        let vm_config = VmConfig {
            name: sandbox_id.to_owned(),
            run_dir: paths.root.clone(),
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            vcpus,
            memory_mib,
            kernel_cmdline: config.kernel_params.clone(),
            serial: if config.guest_console {
                SerialOutput::File(paths.root.join("console.log"))
            } else {
                SerialOutput::Off
            },
            crx_vmm_binary: config.crx_vmm.clone(),
            qemu_binary: config.qemu.clone(),
            devices: VmDevices {
                shares: vec![SharedDir {
                    tag: SHARE_TAG.into(),
                    host_dir: paths.share(),
                }],
                net: network.as_ref().map(|n| n.nic.clone()),
                drives: VmDevices::empty_slots(usize::from(config.block_slots)),
                ..Default::default()
            },
        };
        let host_cgroup = make_host_cgroup(host_cgroup, &paths.root).await?;
        close_on_exec_inherited();
        let wanted = config.hypervisor;
        let confinement = Confinement {
            jail: config.jail,
            jail_ids: None,
            seccomp: config.seccomp,
        };
        let started = Instant::now();
        let (vm, vm_owner) = VmOwnerThread::start(move || {
            let (backend, choice) =
                select_confined_backend(wanted, confinement).map_err(PodError::Backend)?;
            tracing::info!(backend = %choice.kind, "starting the pod VM");
            backend.start(&vm_config).map_err(PodError::Vm)
        })
        .await?;
        let backend = vm.kind();
        let agent_socket = vm.agent_socket().to_path_buf();
        let vm = Arc::new(Mutex::new(vm));
        // Right after the spawn, before the guest has touched much of its memory.
        let vm_pids = lock(&vm).pids();
        let adopted = host_cgroup_lock(&host_cgroup).adopt(&vm_pids);
        if let Err(e) = adopted {
            stop_vm(vm.clone()).await;
            return Err(PodError::HostCgroup(e));
        }
        let addr = AgentAddress::HybridVsock {
            uds_path: agent_socket.clone(),
            port: crx_protocols::AGENT_VSOCK_PORT,
        };
        // A VM that dies while booting fails the wait at once, not at the deadline.
        let ready = tokio::select! {
            r = hybrid_vsock::wait_for_agent(&addr, Instant::now() + config.agent_timeout) => r,
            exit = watch_boot(vm.clone()) => {
                stop_vm(vm.clone()).await;
                return Err(PodError::DiedBooting(exit));
            }
        };
        let ready = match ready {
            Ok(r) => r,
            Err(cause) => {
                let vm_state = stop_vm(vm.clone()).await;
                return Err(PodError::AgentTimeout {
                    backend,
                    timeout: config.agent_timeout,
                    cause,
                    vm_state,
                });
            }
        };
        let ready_after = started.elapsed();
        if let Err((agent, needed)) = protocol_supported(ready.version.protocol_version) {
            let vm_state = stop_vm(vm.clone()).await;
            return Err(PodError::AgentTooOld {
                agent,
                needed,
                vm_state,
            });
        }
        tracing::info!(
            ?ready_after,
            attempts = ready.attempts,
            protocol = ready.version.protocol_version,
            agent = %ready.version.agent_version,
            "agent ready"
        );
        // Sandbox and Containers ride on the connection the readiness wait opened: a
        // second handshake through the VMM's vsock muxer would add a round trip into
        // the guest before CreateSandbox.
        let client = ready.clients.client.clone();
        let pids = lock(&vm).pids();
        let block_slots = Arc::new(Mutex::new(BlockSlots::for_vm(lock(&vm).drive_slots())));
        let stopping = Arc::new(StopSignal::new().map_err(|e| PodError::Vm(VmError::Wait(e)))?);
        vm_watch::spawn(vm.clone(), stopping.clone(), on_death);
        let port_forward = forward_netns.map(|ns| {
            PortForwarder::start(
                ns,
                agent_socket.clone(),
                PortForwardClient::new(client.clone()),
            )
        });
        Ok(Pod {
            backend,
            sandbox: SandboxClient::new(client.clone()),
            containers: ContainersClient::new(client),
            protocol_version: ready.version.protocol_version,
            ready_after,
            agent_socket,
            pids,
            vm,
            stopping,
            network,
            port_forward,
            block_slots,
            host_cgroup,
            _vm_owner: vm_owner,
        })
    }

    /// Stops the VM (idempotent); the watcher reports nothing for a requested stop.
    pub async fn stop(&self) -> String {
        self.stopping.request();
        if let Some(forwarder) = &self.port_forward {
            forwarder.stop();
        }
        // Emptied while the VM still runs, so each detach flushes its device.
        crate::block_slots::detach_all(&self.block_slots).await;
        let ended = stop_vm(self.vm.clone()).await;
        remove_host_cgroup(self.host_cgroup.clone()).await;
        if let Some(network) = &self.network {
            network.detach();
        }
        ended
    }

    /// Process names and pids of the VM.
    pub fn vm_pids(&self) -> Vec<(&'static str, u32)> {
        self.pids.clone()
    }
}

/// Marks every open descriptor above stderr close-on-exec, so VM processes inherit
/// none of the shim's (its ttrpc listener above all: a VMM holding it would keep a
/// dead shim's socket answering). Descriptors a backend passes on purpose are opened
/// later, by the backend.
fn close_on_exec_inherited() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // A descriptor closed since the listing fails with EBADF: nothing to do.
        if let Ok(bits) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(bits) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
        }
    }
}

/// Records and makes the pod's host cgroup (off the async threads).
async fn make_host_cgroup(
    mut host_cgroup: HostCgroup,
    run_dir: &std::path::Path,
) -> Result<Arc<Mutex<HostCgroup>>, PodError> {
    let run_dir = run_dir.to_owned();
    let made =
        tokio::task::spawn_blocking(move || host_cgroup.create(&run_dir).map(|()| host_cgroup))
            .await
            .map_err(|e| PodError::Join(e.to_string()))?
            .map_err(PodError::HostCgroup)?;
    Ok(Arc::new(Mutex::new(made)))
}

/// Removes the pod's host cgroup once the VM's processes are gone (off the async
/// threads: the kernel may take a moment to empty it).
async fn remove_host_cgroup(host_cgroup: Arc<Mutex<HostCgroup>>) {
    let removed =
        tokio::task::spawn_blocking(move || host_cgroup_lock(&host_cgroup).remove()).await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "pod host cgroup left behind"),
        Err(e) => tracing::error!(error = %e, "removing the pod host cgroup panicked"),
    }
}

fn host_cgroup_lock(cgroup: &Mutex<HostCgroup>) -> std::sync::MutexGuard<'_, HostCgroup> {
    // A panic while holding it leaves at worst a leaf that removal retries.
    cgroup.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn lock(vm: &Mutex<Box<dyn Vm>>) -> std::sync::MutexGuard<'_, Box<dyn Vm>> {
    // A panic while holding the VM cannot leave it in a state worse than a dead VM.
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops the VM off the async threads; returns how it ended, for messages.
async fn stop_vm(vm: Arc<Mutex<Box<dyn Vm>>>) -> String {
    let ended = tokio::task::spawn_blocking(move || lock(&vm).stop(STOP_GRACE)).await;
    match ended {
        Ok(Ok(exit)) => format!("; VM ended: {exit}"),
        Ok(Err(e)) => format!("; stopping the VM failed: {e}"),
        Err(e) => format!("; stopping the VM panicked: {e}"),
    }
}

/// Resolves when the VM ends (polled, off the async threads), with how it ended.
async fn watch_boot(vm: Arc<Mutex<Box<dyn Vm>>>) -> String {
    loop {
        let v = vm.clone();
        let polled =
            tokio::task::spawn_blocking(move || lock(&v).wait_timeout(Duration::ZERO)).await;
        match polled {
            Ok(Ok(None)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Ok(Some(exit))) => return exit.to_string(),
            Ok(Err(e)) => return format!("waiting for the VM failed: {e}"),
            Err(e) => return format!("waiting for the VM panicked: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_older_than_the_protocol_are_refused_with_both_versions() {
        let current = crx_protocols::PROTOCOL_VERSION;
        assert_eq!(protocol_supported(current), Ok(()));
        assert_eq!(protocol_supported(current + 1), Ok(()));
        let (agent, needed) = protocol_supported(current - 1).unwrap_err();
        assert_eq!((agent, needed), (current - 1, current));
        let message = PodError::AgentTooOld {
            agent,
            needed,
            vm_state: String::new(),
        }
        .to_string();
        assert!(
            message.contains(&format!("version {}", current - 1))
                && message.contains(&format!("version {current}")),
            "{message}"
        );
    }
}
