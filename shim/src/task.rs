//! containerd's task API v2, served for one pod. Every RPC is implemented or answers
//! UNIMPLEMENTED with the reason (never the generated NOT_FOUND default). Agent calls
//! carry deadlines; an agent call the agent does not implement yet comes back to
//! containerd as UNIMPLEMENTED naming the call.
//!
//! Events go out in containerd's order: create → start → exit → delete for a task,
//! exec-added → exec-started → exit for an exec.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::{publisher::RemotePublisher, ExitSignal};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim::shim::CheckpointTaskRequest;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext};
use crx_protocols::hybrid_vsock::context_until;
use crx_protocols::v1::container as agent_api;
use crx_protocols::v1::sandbox::{CreateSandboxRequest, DestroySandboxRequest};
use crx_protocols::v1::storage::{Storage, StorageDriver};
use crx_shim::config::ShimConfig;
use protobuf::Message;
use tokio::sync::Mutex;
use ttrpc::Code;

use crate::bundle;
use crate::host_cgroup::HostCgroup;
use crate::pod::Pod;
use crate::pod_spec;
use crate::process::{self, Exit, Process, StdioPaths, KILLED_WITH_VM};
use crate::rootfs::{self, PodPaths, GUEST_SHARE, SHARE_TAG};
use crate::rpc::{self, agent_error};
use crate::stdio::{self, Streams};
use crate::translate;

/// Deadline of an ordinary agent call.
const AGENT_CALL: Duration = Duration::from_secs(30);
/// Deadline of a clean-up call (RemoveContainer, DestroySandbox): the host side goes
/// regardless, so a hung guest must not hold Delete for long.
const CLEANUP_CALL: Duration = Duration::from_secs(5);
/// Deadline of one WaitProcess long poll (asked again on DEADLINE_EXCEEDED).
const WAIT_POLL: Duration = Duration::from_secs(60);
/// How long output may take to drain after a process exits, before the exit is
/// published anyway.
const DRAIN: Duration = Duration::from_secs(5);
/// How long an OOM-killed process's exit waits for the event watcher to publish
/// TaskOOM and the exit (whose output may take [`DRAIN`]) before it is published
/// anyway (an agent without an event stream, or one that dropped the event).
const OOM_EVENT_GRACE: Duration = Duration::from_secs(7);

/// The task service of one pod's shim.
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The pod this shim serves (set by the first Create).
    sandbox_id: Option<String>,
    pod: Option<Arc<Pod>>,
    /// Why the pod's VM is gone, once it is.
    pod_gone: Option<String>,
    containers: HashMap<String, Container>,
}

struct Container {
    bundle: String,
    init: Proc,
    execs: HashMap<String, Proc>,
}

/// A process and the copiers of its stdio.
struct Proc {
    process: Process,
    streams: Option<Streams>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<&Proc, ttrpc::Error> {
        if exec_id.is_empty() {
            Ok(&self.init)
        } else {
            self.execs
                .get(exec_id)
                .ok_or_else(|| rpc::not_found(format!("exec {exec_id:?}")))
        }
    }

    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Proc, ttrpc::Error> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| rpc::not_found(format!("exec {exec_id:?}")))
        }
    }
}

impl State {
    fn container(&self, id: &str) -> Result<&Container, ttrpc::Error> {
        self.containers
            .get(id)
            .ok_or_else(|| rpc::not_found(format!("container {id:?}")))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container, ttrpc::Error> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| rpc::not_found(format!("container {id:?}")))
    }

    /// The live pod, or why there is none.
    fn live_pod(&self) -> Result<Arc<Pod>, ttrpc::Error> {
        match (&self.pod, &self.pod_gone) {
            (Some(p), None) => Ok(p.clone()),
            (_, Some(why)) => Err(rpc::precondition(format!("the pod VM is gone: {why}"))),
            (None, None) => Err(rpc::precondition("the pod has no VM")),
        }
    }

    fn paths(&self) -> Option<PodPaths> {
        self.sandbox_id.as_deref().map(PodPaths::new)
    }
}

impl TaskService {
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                namespace,
                publisher,
                exit,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    context_until(Instant::now() + AGENT_CALL)
}

impl Inner {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await
        {
            tracing::warn!(topic, error = %e, "publishing an event failed");
        }
    }

    /// Records a process's exit (once) and publishes TaskExit.
    async fn process_exited(&self, container_id: &str, exec_id: &str, exit: Exit) {
        // Output first (outside the lock: draining may take a moment), so containerd
        // has all of it before it learns of the exit. The exit has two reporters
        // (WaitProcess and the event stream) that race: each waits for the drain, since
        // whichever records the exit publishes it, and `ctr run --rm` closes its FIFOs
        // once it sees the exit (output written after that is lost with EPIPE).
        let drained = {
            let state = self.state.lock().await;
            let Ok(p) = state
                .container(container_id)
                .and_then(|c| c.process(exec_id))
            else {
                return;
            };
            p.streams.as_ref().map(Streams::output_drained)
        };
        if let Some(drained) = drained {
            drained.wait(DRAIN).await;
        }
        let (pid, streams) = {
            let mut state = self.state.lock().await;
            let Ok(c) = state.container_mut(container_id) else {
                return;
            };
            let Ok(p) = c.process_mut(exec_id) else {
                return;
            };
            if !p.process.set_exit(exit) {
                tracing::debug!(container_id, exec_id, "exit already recorded");
                return;
            }
            (p.process.pid, p.streams.take())
        };
        // Stops the stdin copier of the exited process.
        drop(streams);
        tracing::info!(
            container_id,
            exec_id,
            status = exit.status,
            "process exited"
        );
        let id = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container_id.to_owned(),
                id: id.to_owned(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(process::timestamp(exit.at)),
                ..Default::default()
            }),
        )
        .await;
    }

    /// The VM ended by itself: every process of the pod has exited, and the pod's
    /// host resources go now (containerd's Delete calls then find nothing to undo).
    async fn vm_died(self: Arc<Self>, reason: String) {
        let (pod, paths, running) = {
            let mut state = self.state.lock().await;
            state.pod_gone = Some(reason.clone());
            let mut running = Vec::new();
            for (cid, c) in &state.containers {
                if c.init.process.exit().is_none() {
                    running.push((cid.clone(), String::new()));
                }
                for (eid, e) in &c.execs {
                    if e.process.exit().is_none() {
                        running.push((cid.clone(), eid.clone()));
                    }
                }
            }
            (state.pod.take(), state.paths(), running)
        };
        let at = SystemTime::now();
        for (cid, eid) in running {
            self.process_exited(
                &cid,
                &eid,
                Exit {
                    status: KILLED_WITH_VM,
                    at,
                },
            )
            .await;
        }
        release_pod(pod, paths).await;
    }

    /// Polls the agent until the process exits (or the VM dies, which `vm_died`
    /// reports).
    async fn watch_process(self: Arc<Self>, pod: Arc<Pod>, container_id: String, exec_id: String) {
        let mut req = agent_api::WaitProcessRequest::new();
        req.container_id = container_id.clone();
        req.exec_id = exec_id.clone();
        loop {
            let deadline = Instant::now() + WAIT_POLL;
            match pod
                .containers
                .wait_process(context_until(deadline), &req)
                .await
            {
                Ok(resp) => {
                    let exit = resp.exit.into_option().unwrap_or_default();
                    if exit.oom_killed {
                        // The agent logs the OOM kill before this exit on its event
                        // stream: the event watcher publishes TaskOOM, then the exit.
                        // Reporting the exit from here first would let containerd (and
                        // CRI's OOMKilled reason) learn of the OOM only after the exit.
                        self.wait_exit_recorded(&container_id, &exec_id, OOM_EVENT_GRACE)
                            .await;
                    }
                    // The host's clock, not the guest's: a TCG guest's clock drifts,
                    // and nothing the guest says is trusted further than needed.
                    let at = SystemTime::now();
                    // OOM kills arrive as events (`watch_events`), once each.
                    self.process_exited(
                        &container_id,
                        &exec_id,
                        Exit {
                            status: exit.exit_status.min(255),
                            at,
                        },
                    )
                    .await;
                    return;
                }
                // The long poll's own deadline: the agent's DEADLINE_EXCEEDED, or the
                // ttrpc client giving up first ("Receive packet timeout").
                Err(e) if poll_expired(&e, deadline) => continue,
                Err(e) => {
                    if !self.is_current(&pod).await {
                        return;
                    }
                    tracing::warn!(%container_id, %exec_id, error = %e, "WaitProcess failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

impl Inner {
    /// Waits until the process's exit is recorded (or the process is gone), at most
    /// `grace`.
    async fn wait_exit_recorded(&self, container_id: &str, exec_id: &str, grace: Duration) {
        let mut exit = {
            let state = self.state.lock().await;
            match state.container(container_id).and_then(|c| c.process(exec_id)) {
                Ok(p) => p.process.subscribe(),
                Err(_) => return,
            }
        };
        // A closed channel means the process record is gone, which ends the wait too.
        let _ = tokio::time::timeout(grace, exit.wait_for(Option::is_some)).await;
    }

    /// True while `pod` is this shim's live pod (a watcher of a released pod stops).
    async fn is_current(&self, pod: &Arc<Pod>) -> bool {
        let state = self.state.lock().await;
        state.pod_gone.is_none() && state.pod.as_ref().is_some_and(|p| Arc::ptr_eq(p, pod))
    }

    /// Long-polls the agent's event stream: OOM kills become TaskOOM, exits are
    /// recorded (WaitProcess reports them too; the first report wins). Everything in
    /// an event is checked against what the shim knows before it is used.
    async fn watch_events(self: Arc<Self>, pod: Arc<Pod>) {
        let mut after = 0u64;
        loop {
            let mut req = agent_api::GetEventsRequest::new();
            req.after_sequence = after;
            req.max_events = 256;
            let poll_deadline = Instant::now() + WAIT_POLL;
            let deadline = context_until(poll_deadline);
            match pod.containers.get_events(deadline, &req).await {
                Ok(resp) => {
                    if resp.dropped > 0 {
                        tracing::warn!(
                            dropped = resp.dropped,
                            "the agent dropped events; exits still come from WaitProcess"
                        );
                    }
                    for ev in resp.events.iter().take(256) {
                        // Sequence numbers must grow; anything else is replayed or bogus.
                        if ev.sequence <= after {
                            continue;
                        }
                        after = ev.sequence;
                        self.handle_event(ev).await;
                    }
                }
                Err(e) if poll_expired(&e, poll_deadline) => {}
                Err(e) if rpc::code_of(&e) == Code::UNIMPLEMENTED => {
                    tracing::info!("the agent has no event stream: no OOM events for this pod");
                    return;
                }
                Err(e) => {
                    if !self.is_current(&pod).await {
                        return;
                    }
                    tracing::warn!(error = %e, "GetEvents failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if !self.is_current(&pod).await {
                return;
            }
        }
    }

    async fn handle_event(&self, ev: &agent_api::Event) {
        use agent_api::event::Kind;
        let known = {
            let state = self.state.lock().await;
            state
                .containers
                .get(&ev.container_id)
                .is_some_and(|c| c.process(&ev.exec_id).is_ok())
        };
        if !known {
            tracing::debug!(container = %ev.container_id, exec = %ev.exec_id, "event for an unknown process ignored");
            return;
        }
        match &ev.kind {
            Some(Kind::OomKillCount(count)) => {
                tracing::warn!(container = %ev.container_id, count, "OOM kill in the container");
                self.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: ev.container_id.clone(),
                        ..Default::default()
                    }),
                )
                .await;
            }
            Some(Kind::Exited(exit)) => {
                let started = {
                    let state = self.state.lock().await;
                    state
                        .container(&ev.container_id)
                        .and_then(|c| c.process(&ev.exec_id))
                        .is_ok_and(|p| p.process.started)
                };
                // An exit before Start went out would overtake TaskStart; the
                // WaitProcess watcher started after it reports that exit instead.
                if started {
                    let exit = Exit {
                        status: exit.exit_status.min(255),
                        at: SystemTime::now(),
                    };
                    self.process_exited(&ev.container_id, &ev.exec_id, exit)
                        .await;
                }
            }
            // None, or a kind newer than this shim: nothing to do.
            _ => {}
        }
    }
}

/// Whether a long poll ended only because its deadline passed.
fn poll_expired(e: &ttrpc::Error, deadline: Instant) -> bool {
    rpc::code_of(e) == Code::DEADLINE_EXCEEDED
        || (Instant::now() >= deadline && !matches!(e, ttrpc::Error::RpcStatus(_)))
}

/// Stops the VM (if any) and removes the pod's run directory and mounts.
async fn release_pod(pod: Option<Arc<Pod>>, paths: Option<PodPaths>) {
    if let Some(pod) = pod {
        let ended = pod.stop().await;
        tracing::info!(ended = %ended.trim_start_matches("; "), "pod VM stopped");
    }
    if let Some(paths) = paths {
        let result = tokio::task::spawn_blocking(move || rootfs::remove_tree(&paths.root)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "pod clean-up incomplete"),
            Err(e) => tracing::error!(error = %e, "pod clean-up panicked"),
        }
    }
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

fn internal<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ttrpc::Error + '_ {
    move |e| rpc::internal(format!("{what}: {e}"))
}

impl TaskService {
    /// Everything Create does once the pod is known; on error the caller undoes it.
    async fn create_in_pod(
        &self,
        state: &mut State,
        req: &CreateTaskRequest,
        spec: &serde_json::Value,
        sandbox_id: &str,
    ) -> Result<(u32, Option<Streams>), ttrpc::Error> {
        let paths = PodPaths::new(sandbox_id);
        // Before anything is set up: a device the pod VM cannot give is refused.
        translate::check_devices(spec)
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        pod_spec::refuse_host_namespaces(spec)
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let first = state.pod.is_none() && state.pod_gone.is_none();
        let bundle_dir = PathBuf::from(&req.bundle);
        let mounts = req.rootfs.clone();
        let (p, cid) = (paths.clone(), req.id.clone());
        if first {
            let config_path = translate::config_path(req.options.as_ref());
            let config = ShimConfig::resolve(config_path.as_deref().map(std::path::Path::new))
                .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
            let pid = std::process::id().to_string();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                std::fs::create_dir_all(&p.root).map_err(|e| format!("{:?}: {e}", p.root))?;
                std::fs::write(p.shim_pid_file(), pid).map_err(|e| e.to_string())?;
                rootfs::prepare_share(&p).map_err(|e| e.to_string())?;
                rootfs::mount_container_rootfs(&p, &cid, &mounts, &bundle_dir)
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
            .await
            .map_err(internal("pod set-up"))?
            .map_err(rpc::internal)?;
            let weak = Arc::downgrade(&self.inner);
            let handle = tokio::runtime::Handle::current();
            let on_death = Box::new(move |reason: String| {
                if let Some(inner) = weak.upgrade() {
                    handle.spawn(inner.vm_died(reason));
                }
            });
            let host_cgroup = HostCgroup::for_sandbox(spec)
                .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, rpc::error_chain(&e)))?;
            let memory_cap = host_cgroup.memory_limit();
            let size =
                translate::vm_size(spec, config.vcpus, config.memory_mib, memory_cap.as_ref())
                    .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
            let netns = crx_shim::network::netns_of(spec);
            let pod = Pod::boot(
                sandbox_id,
                &paths,
                &config,
                size,
                host_cgroup,
                netns,
                on_death,
            )
            .await
            .map_err(|e| rpc::status(Code::UNAVAILABLE, rpc::error_chain(&e)))?;
            tracing::info!(
                backend = %pod.backend,
                ready_ms = pod.ready_after.as_millis() as u64,
                vm = ?pod.vm_pids(),
                "pod VM ready"
            );
            let pod = Arc::new(pod);
            state.pod = Some(pod.clone());
            let mut sreq = CreateSandboxRequest::new();
            sreq.sandbox_id = sandbox_id.to_owned();
            sreq.hostname = spec
                .get("hostname")
                .and_then(|h| h.as_str())
                .unwrap_or_default()
                .to_owned();
            let mut share = Storage::new();
            share.driver = StorageDriver::STORAGE_DRIVER_VIRTIOFS.into();
            share.source = SHARE_TAG.into();
            share.fstype = "virtiofs".into();
            share.mount_point = GUEST_SHARE.into();
            sreq.storages.push(share);
            sreq.sysctls = pod_spec::pod_sysctls(spec);
            if let Some(network) = &pod.network {
                sreq.interfaces = network.interfaces.clone();
                sreq.routes = network.routes.clone();
            }
            pod.sandbox
                .create_sandbox(ctx(), &sreq)
                .await
                .map_err(|e| {
                    let call = format!(
                        "Sandbox.CreateSandbox (agent protocol version {})",
                        pod.protocol_version
                    );
                    agent_error(&call, e)
                })?;
            tokio::spawn(self.inner.clone().watch_events(pod.clone()));
        } else {
            let _ = state.live_pod()?;
            tokio::task::spawn_blocking(move || {
                rootfs::mount_container_rootfs(&p, &cid, &mounts, &bundle_dir)
            })
            .await
            .map_err(internal("rootfs mount"))?
            .map_err(|e| rpc::internal(e.to_string()))?;
        }
        let pod = state.live_pod()?;
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let (p, cid, wanted) = (paths.clone(), req.id.clone(), translate::host_binds(spec));
        let binds = tokio::task::spawn_blocking(move || rootfs::bind_into_share(&p, &cid, &wanted))
            .await
            .map_err(internal("bind mounts"))?
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let guest_spec = translate::guest_spec(spec, &rootfs::guest_rootfs(&req.id), &binds);
        let mut creq = agent_api::CreateContainerRequest::new();
        creq.container_id = req.id.clone();
        creq.oci_spec = serde_json::to_vec(&guest_spec).map_err(internal("spec"))?;
        creq.rootfs = rootfs::guest_rootfs(&req.id);
        creq.stdio = MessageField::some(stdio::spec_of(&stdio));
        creq.block_devices = attach_block_devices(&pod, &req.id, spec).await?;
        let resp = pod
            .containers
            .create_container(ctx(), &creq)
            .await
            .map_err(|e| agent_error("Containers.CreateContainer", e))?;
        let streams = stdio::attach(&pod.agent_socket, &req.id, "", &stdio)
            .await
            .map_err(|e| rpc::status(Code::UNAVAILABLE, rpc::error_chain(&e)))?;
        Ok((resp.pid, Some(streams)))
    }

    /// Undoes a failed Create: the container's mount, and the whole pod if it was
    /// the pod's first container.
    async fn undo_create(&self, state: &mut State, container_id: &str) {
        if state.containers.is_empty() {
            let pod = state.pod.take();
            state.pod_gone = Some("the pod's first container could not be created".into());
            release_pod(pod, state.paths()).await;
            state.sandbox_id = None;
            state.pod_gone = None;
        } else if let Some(paths) = state.paths() {
            if let Some(pod) = &state.pod {
                crate::block_slots::detach_container(&pod.block_slots, container_id).await;
            }
            let dir = paths.container_dir(container_id);
            if let Err(e) = tokio::task::spawn_blocking(move || rootfs::remove_tree(&dir)).await {
                tracing::error!(error = %e, "container clean-up panicked");
            }
        }
    }
}

/// Attaches the spec's host block devices to free drive slots of the pod VM, and
/// says which drive is which for the agent. Undone by `undo_create` on a later error.
async fn attach_block_devices(
    pod: &Pod,
    container_id: &str,
    spec: &serde_json::Value,
) -> Result<Vec<agent_api::ContainerBlockDevice>, ttrpc::Error> {
    let requests = translate::block_devices(spec)
        .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
    let attached = crate::block_slots::attach(&pod.block_slots, container_id, requests)
        .await
        .map_err(|e| {
            let code = match &e {
                crate::block_slots::SlotError::Exhausted { .. } => Code::RESOURCE_EXHAUSTED,
                crate::block_slots::SlotError::HostDevice { .. } => Code::INVALID_ARGUMENT,
                crate::block_slots::SlotError::Attach { .. } => Code::INTERNAL,
            };
            rpc::status(code, rpc::error_chain(&e))
        })?;
    Ok(attached
        .into_iter()
        .map(|a| {
            let mut d = agent_api::ContainerBlockDevice::new();
            d.container_path = a.container_path;
            d.serial = a.serial;
            d
        })
        .collect())
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        bundle::check_id("container id", &req.id)
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(rpc::unimplemented(
                "Create from a checkpoint",
                "crx does not restore checkpoints",
            ));
        }
        let spec = bundle::read_spec(std::path::Path::new(&req.bundle))
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, rpc::error_chain(&e)))?;
        let sandbox_id = bundle::sandbox_id(&spec, &req.id)
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let mut state = self.inner.state.lock().await;
        if state.containers.contains_key(&req.id) {
            return Err(rpc::status(
                Code::ALREADY_EXISTS,
                format!("container {:?} already exists", req.id),
            ));
        }
        match &state.sandbox_id {
            Some(s) if s != &sandbox_id => {
                return Err(rpc::precondition(format!(
                    "this shim serves pod {s:?}, not {sandbox_id:?}"
                )))
            }
            Some(_) => {}
            None => state.sandbox_id = Some(sandbox_id.clone()),
        }
        tracing::info!(id = %req.id, sandbox = %sandbox_id, "create");
        let (pid, streams) = match self
            .create_in_pod(&mut state, &req, &spec, &sandbox_id)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(id = %req.id, error = %e, "create failed");
                self.undo_create(&mut state, &req.id).await;
                return Err(e);
            }
        };
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut init = Process::new(stdio);
        init.pid = pid;
        state.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                init: Proc {
                    process: init,
                    streams,
                },
                execs: HashMap::new(),
            },
        );
        drop(state);
        self.inner
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pod = {
            let state = self.inner.state.lock().await;
            let p = state.container(&req.id)?.process(&req.exec_id)?;
            if p.process.started {
                return Err(rpc::precondition(format!("{} already started", req.id)));
            }
            state.live_pod()?
        };
        let mut sreq = agent_api::StartContainerRequest::new();
        sreq.container_id = req.id.clone();
        sreq.exec_id = req.exec_id.clone();
        let resp = pod
            .containers
            .start_container(ctx(), &sreq)
            .await
            .map_err(|e| agent_error("Containers.StartContainer", e))?;
        {
            let mut state = self.inner.state.lock().await;
            let p = state.container_mut(&req.id)?.process_mut(&req.exec_id)?;
            p.process.started = true;
            if resp.pid != 0 {
                p.process.pid = resp.pid;
            }
        }
        if req.exec_id.is_empty() {
            self.inner
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid: resp.pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            self.inner
                .publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid: resp.pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        tracing::info!(id = %req.id, exec_id = %req.exec_id, pid = resp.pid, "process started");
        // The exit is watched only after the start event went out, so TaskExit can
        // never overtake it.
        tokio::spawn(
            self.inner
                .clone()
                .watch_process(pod, req.id.clone(), req.exec_id.clone()),
        );
        Ok(StartResponse {
            pid: resp.pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let mut state = self.inner.state.lock().await;
        let c = state.container(&req.id)?;
        let p = &c.process(&req.exec_id)?.process;
        if p.started && p.exit().is_none() {
            return Err(rpc::precondition(format!(
                "{} {:?} is still running",
                if req.exec_id.is_empty() {
                    "container"
                } else {
                    "exec"
                },
                if req.exec_id.is_empty() {
                    &req.id
                } else {
                    &req.exec_id
                }
            )));
        }
        let exit = p.exit().unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let pid = p.pid;
        let response = DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(process::timestamp(exit.at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            state.container_mut(&req.id)?.execs.remove(&req.exec_id);
            return Ok(response);
        }
        if let Ok(pod) = state.live_pod() {
            let mut rreq = agent_api::RemoveContainerRequest::new();
            rreq.container_id = req.id.clone();
            rreq.force = true;
            let deadline = context_until(Instant::now() + CLEANUP_CALL);
            if let Err(e) = pod.containers.remove_container(deadline, &rreq).await {
                // The host side goes regardless; the VM goes with the last task.
                tracing::warn!(id = %req.id, error = %agent_error("Containers.RemoveContainer", e), "agent remove");
            }
            crate::block_slots::detach_container(&pod.block_slots, &req.id).await;
        }
        state.containers.remove(&req.id);
        if let Some(paths) = state.paths() {
            let dir = paths.container_dir(&req.id);
            let removed = tokio::task::spawn_blocking(move || rootfs::remove_tree(&dir)).await;
            if let Ok(Err(e)) = removed {
                tracing::error!(id = %req.id, error = %e, "container clean-up incomplete");
            }
        }
        if state.containers.is_empty() {
            // The pod's last task: the VM and every host resource of the pod go.
            if let Ok(pod) = state.live_pod() {
                let mut dreq = DestroySandboxRequest::new();
                dreq.grace_period_ms = 1000;
                let deadline = context_until(Instant::now() + CLEANUP_CALL);
                if let Err(e) = pod.sandbox.destroy_sandbox(deadline, &dreq).await {
                    tracing::debug!(error = %e, "DestroySandbox");
                }
            }
            let pod = state.pod.take();
            state.pod_gone = Some("the pod's last task was deleted".into());
            release_pod(pod, state.paths()).await;
        }
        drop(state);
        self.inner
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(process::timestamp(exit.at)),
                    ..Default::default()
                }),
            )
            .await;
        Ok(response)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let state = self.inner.state.lock().await;
        let c = state.container(&req.id)?;
        let p = &c.process(&req.exec_id)?.process;
        let exit = p.exit();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: p.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map_or(MessageField::none(), |e| {
                MessageField::some(process::timestamp(e.at))
            }),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pod = {
            let state = self.inner.state.lock().await;
            state.container(&req.id)?;
            state.live_pod()?
        };
        let mut lreq = agent_api::ListPidsRequest::new();
        lreq.container_id = req.id.clone();
        let resp = pod
            .containers
            .list_pids(ctx(), &lreq)
            .await
            .map_err(|e| agent_error("Containers.ListPids", e))?;
        Ok(PidsResponse {
            processes: resp
                .pids
                .iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod_for(&req.id).await?;
        let mut preq = agent_api::PauseContainerRequest::new();
        preq.container_id = req.id.clone();
        pod.containers
            .pause_container(ctx(), &preq)
            .await
            .map_err(|e| agent_error("Containers.PauseContainer", e))?;
        self.inner
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod_for(&req.id).await?;
        let mut rreq = agent_api::ResumeContainerRequest::new();
        rreq.container_id = req.id.clone();
        pod.containers
            .resume_container(ctx(), &rreq)
            .await
            .map_err(|e| agent_error("Containers.ResumeContainer", e))?;
        self.inner
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(rpc::unimplemented(
            "Checkpoint",
            "a crx container lives in a VM; checkpoint/restore is not offered",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let pod = {
            let state = self.inner.state.lock().await;
            let p = &state.container(&req.id)?.process(&req.exec_id)?.process;
            if p.exit().is_some() {
                return Err(rpc::not_found(format!(
                    "process {:?} (already finished)",
                    if req.exec_id.is_empty() {
                        &req.id
                    } else {
                        &req.exec_id
                    }
                )));
            }
            state.live_pod()?
        };
        if req.signal == 0 || req.signal > 64 {
            return Err(rpc::status(
                Code::INVALID_ARGUMENT,
                format!("signal {} is not between 1 and 64", req.signal),
            ));
        }
        let mut sreq = agent_api::SignalProcessRequest::new();
        sreq.container_id = req.id.clone();
        sreq.exec_id = req.exec_id.clone();
        sreq.signal = req.signal;
        sreq.all = req.all;
        pod.containers
            .signal_process(ctx(), &sreq)
            .await
            .map_err(|e| agent_error("Containers.SignalProcess", e))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        bundle::check_id("exec id", &req.exec_id)
            .map_err(|e| rpc::status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let pod = {
            let state = self.inner.state.lock().await;
            let c = state.container(&req.id)?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(rpc::status(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} already exists", req.exec_id),
                ));
            }
            if c.init.process.exit().is_some() {
                return Err(rpc::precondition(format!(
                    "container {:?} has exited",
                    req.id
                )));
            }
            state.live_pod()?
        };
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut ereq = agent_api::ExecProcessRequest::new();
        ereq.container_id = req.id.clone();
        ereq.exec_id = req.exec_id.clone();
        ereq.process = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        ereq.stdio = MessageField::some(stdio::spec_of(&stdio));
        pod.containers
            .exec_process(ctx(), &ereq)
            .await
            .map_err(|e| agent_error("Containers.ExecProcess", e))?;
        let streams = stdio::attach(&pod.agent_socket, &req.id, &req.exec_id, &stdio)
            .await
            .map_err(|e| rpc::status(Code::UNAVAILABLE, rpc::error_chain(&e)))?;
        {
            let mut state = self.inner.state.lock().await;
            let c = state.container_mut(&req.id)?;
            c.execs.insert(
                req.exec_id.clone(),
                Proc {
                    process: Process::new(stdio),
                    streams: Some(streams),
                },
            );
        }
        self.inner
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let pod = {
            let state = self.inner.state.lock().await;
            state.container(&req.id)?.process(&req.exec_id)?;
            state.live_pod()?
        };
        let mut rreq = agent_api::ResizeTtyRequest::new();
        rreq.container_id = req.id.clone();
        rreq.exec_id = req.exec_id.clone();
        rreq.rows = req.height.clamp(1, 65535);
        rreq.cols = req.width.clamp(1, 65535);
        pod.containers
            .resize_tty(ctx(), &rreq)
            .await
            .map_err(|e| agent_error("Containers.ResizeTty", e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let pod = {
            let mut state = self.inner.state.lock().await;
            let p = state.container_mut(&req.id)?.process_mut(&req.exec_id)?;
            if let Some(s) = p.streams.as_mut() {
                s.close_stdin();
            }
            state.live_pod()?
        };
        let mut creq = agent_api::CloseStdinRequest::new();
        creq.container_id = req.id.clone();
        creq.exec_id = req.exec_id.clone();
        pod.containers
            .close_stdin(ctx(), &creq)
            .await
            .map_err(|e| agent_error("Containers.CloseStdin", e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let pod = self.pod_for(&req.id).await?;
        let mut ureq = agent_api::UpdateContainerRequest::new();
        ureq.container_id = req.id.clone();
        // containerd sends the OCI LinuxResources as JSON inside the Any.
        ureq.linux_resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        pod.containers
            .update_container(ctx(), &ureq)
            .await
            .map_err(|e| agent_error("Containers.UpdateContainer", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut rx = {
            let state = self.inner.state.lock().await;
            state
                .container(&req.id)?
                .process(&req.exec_id)?
                .process
                .subscribe()
        };
        let exit = loop {
            if let Some(exit) = *rx.borrow_and_update() {
                break exit;
            }
            if rx.changed().await.is_err() {
                // The process was deleted while we waited.
                return Err(rpc::not_found(format!("process of {:?}", req.id)));
            }
        };
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(process::timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let pod = self.pod_for(&req.id).await?;
        let mut sreq = agent_api::StatsContainerRequest::new();
        sreq.container_id = req.id.clone();
        let resp = pod
            .containers
            .stats_container(ctx(), &sreq)
            .await
            .map_err(|e| agent_error("Containers.StatsContainer", e))?;
        // The agent's CgroupMetrics is wire-compatible with containerd's
        // io.containerd.cgroups.v2.Metrics: the bytes pass through unchanged.
        let value = resp
            .metrics
            .as_ref()
            .map(|m| m.write_to_bytes())
            .transpose()
            .map_err(internal("encoding metrics"))?
            .unwrap_or_default();
        Ok(StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let state = self.inner.state.lock().await;
        let task_pid = state
            .containers
            .get(&req.id)
            .map_or(0, |c| c.init.process.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("crx {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let mut state = self.inner.state.lock().await;
        if !state.containers.is_empty() {
            // Other tasks of the pod still run in this shim.
            return Ok(Empty::new());
        }
        let pod = state.pod.take();
        release_pod(pod, state.paths()).await;
        tracing::info!("shutdown: no task left");
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

impl TaskService {
    /// The live pod, after checking the container exists.
    async fn pod_for(&self, id: &str) -> Result<Arc<Pod>, ttrpc::Error> {
        let state = self.inner.state.lock().await;
        state.container(id)?;
        state.live_pod()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::api::{CreateTaskRequest, ExecProcessRequest};

    /// The generated Task trait answers NOT_FOUND "... is not supported" for every
    /// method not overridden; containerd would read that as "no such task".
    const GENERATED_DEFAULT: &str = "is not supported";

    fn ctx() -> TtrpcContext {
        TtrpcContext {
            mh: ttrpc::MessageHeader {
                length: 0,
                stream_id: 1,
                type_: 1,
                flags: 0,
            },
            metadata: Default::default(),
            timeout_nano: 0,
        }
    }

    fn check<T: std::fmt::Debug>(call: &str, r: ttrpc::Result<T>, want: Option<Code>) {
        match (r, want) {
            (Ok(_), None) => {}
            (Ok(v), Some(code)) => panic!("{call}: expected {code:?}, got {v:?}"),
            (Err(e), want) => {
                let ttrpc::Error::RpcStatus(s) = &e else {
                    panic!("{call}: not a status: {e:?}")
                };
                assert!(
                    !s.message().contains(GENERATED_DEFAULT),
                    "{call}: generated default: {s:?}"
                );
                assert_eq!(Some(s.code()), want, "{call}: {s:?}");
            }
        }
    }

    /// Every task RPC of task API v2 is answered by crx (a real answer, or an
    /// explicit UNIMPLEMENTED), never by the generated NOT_FOUND default.
    #[test]
    fn every_task_rpc_is_implemented_or_explicitly_unimplemented() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("containerd.sock.ttrpc");
        let _listener = std::os::unix::net::UnixListener::bind(&events).unwrap();
        rt.block_on(async {
            let publisher = RemotePublisher::new(events.to_string_lossy())
                .await
                .unwrap();
            let svc = TaskService::new("test".into(), publisher, Arc::new(ExitSignal::default()));
            let c = &ctx();
            let nf = Some(Code::NOT_FOUND);
            let id = || "nope".to_string();
            check(
                "State",
                svc.state(
                    c,
                    StateRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            let bundle = dir.path().join("no-bundle").to_string_lossy().into_owned();
            let create = CreateTaskRequest {
                id: id(),
                bundle,
                ..Default::default()
            };
            check(
                "Create",
                svc.create(c, create).await,
                Some(Code::INVALID_ARGUMENT),
            );
            check(
                "Start",
                svc.start(
                    c,
                    StartRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Delete",
                svc.delete(
                    c,
                    DeleteRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Pids",
                svc.pids(
                    c,
                    PidsRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Pause",
                svc.pause(
                    c,
                    PauseRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Resume",
                svc.resume(
                    c,
                    ResumeRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Checkpoint",
                svc.checkpoint(c, CheckpointTaskRequest::default()).await,
                Some(Code::UNIMPLEMENTED),
            );
            check(
                "Kill",
                svc.kill(
                    c,
                    KillRequest {
                        id: id(),
                        signal: 9,
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            let exec = ExecProcessRequest {
                id: id(),
                exec_id: "e1".into(),
                ..Default::default()
            };
            check("Exec", svc.exec(c, exec).await, nf);
            check(
                "ResizePty",
                svc.resize_pty(
                    c,
                    ResizePtyRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            let close = CloseIORequest {
                id: id(),
                stdin: true,
                ..Default::default()
            };
            check("CloseIO", svc.close_io(c, close).await, nf);
            check(
                "Update",
                svc.update(
                    c,
                    UpdateTaskRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Wait",
                svc.wait(
                    c,
                    WaitRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Stats",
                svc.stats(
                    c,
                    StatsRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                nf,
            );
            check(
                "Connect",
                svc.connect(
                    c,
                    ConnectRequest {
                        id: id(),
                        ..Default::default()
                    },
                )
                .await,
                None,
            );
            check(
                "Shutdown",
                svc.shutdown(c, ShutdownRequest::default()).await,
                None,
            );
        });
    }
}
