//! The `Containers` service (container.proto) over the container manager. Methods not
//! built yet answer UNIMPLEMENTED with their name.

use std::sync::Arc;
use tokio::time::Instant;

use async_trait::async_trait;
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::Containers;
use ttrpc::r#async::TtrpcContext;

use super::AgentState;
use crate::containers::block_devices;
use crate::containers::cgroups::{self, CgroupError};
use crate::containers::manager::{ContainerManager, ManagerError};
use crate::containers::spec::SpecError;
use crate::containers::stdio::Declared;
use crate::reaper::ChildStatus;
use crate::server::error_chain;

/// Most storages per container (container.proto).
const MAX_STORAGES: usize = 32;

/// The Containers service.
pub struct ContainersService {
    state: Arc<AgentState>,
    /// The guest nodes of each container's host block devices, flushed at removal
    /// before the host detaches their slots.
    block_nodes: std::sync::Mutex<std::collections::HashMap<String, Vec<std::path::PathBuf>>>,
}

impl ContainersService {
    /// Serves requests against `state`.
    pub fn new(state: Arc<AgentState>) -> ContainersService {
        ContainersService {
            state,
            block_nodes: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn block_nodes(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<std::path::PathBuf>>> {
        // The map stays consistent whatever panicked while it was held.
        self.block_nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn manager(&self) -> ttrpc::Result<&Arc<ContainerManager>> {
        self.state.containers().ok_or_else(|| {
            status_of(
                ttrpc::Code::UNAVAILABLE,
                "the container manager did not start (see the agent log)",
            )
        })
    }
}

fn request_deadline(ctx: &TtrpcContext) -> Instant {
    super::reply_deadline(ctx.timeout_nano)
}

fn status_of(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn status(e: &ManagerError) -> ttrpc::Error {
    let code = match e {
        ManagerError::Spec(SpecError::TooLarge(_) | SpecError::ProcessTooLarge(_))
        | ManagerError::Exhausted(_) => ttrpc::Code::RESOURCE_EXHAUSTED,
        ManagerError::Spec(SpecError::Write { .. }) => ttrpc::Code::INTERNAL,
        ManagerError::Spec(_) | ManagerError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
        ManagerError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        ManagerError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        ManagerError::Precondition(_) => ttrpc::Code::FAILED_PRECONDITION,
        ManagerError::Deadline(_) => ttrpc::Code::DEADLINE_EXCEEDED,
        ManagerError::Stdio(_) | ManagerError::Runtime { .. } => ttrpc::Code::INTERNAL,
    };
    status_of(code, error_chain(e))
}

fn declared(stdio: Option<&StdioSpec>) -> ttrpc::Result<Declared> {
    let Some(s) = stdio else {
        return Ok(Declared::default());
    };
    Ok(Declared {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
    })
}

#[async_trait]
impl Containers for ContainersService {
    async fn create_container(
        &self,
        ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let deadline = request_deadline(ctx);
        let manager = self.manager()?;
        let declared = declared(req.stdio.as_ref())?;
        if req.storages.len() > MAX_STORAGES {
            return Err(status_of(
                ttrpc::Code::RESOURCE_EXHAUSTED,
                format!(
                    "{} storages; the limit is {MAX_STORAGES}",
                    req.storages.len()
                ),
            ));
        }
        // The host's block devices: their drives are waited for, and the spec moved
        // to the drives' guest numbers, before anything is mounted.
        let disks = block_devices::find(
            &crate::storage::block::BlockPaths::default(),
            &req.block_devices,
            deadline,
        )
        .await
        .map_err(|e| {
            let code = match e {
                block_devices::BlockDeviceError::TooMany(_) => ttrpc::Code::RESOURCE_EXHAUSTED,
                block_devices::BlockDeviceError::Drive { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
                _ => ttrpc::Code::INVALID_ARGUMENT,
            };
            status_of(code, error_chain(&e))
        })?;
        let oci_spec = block_devices::rewrite_spec(&req.oci_spec, &disks)
            .map_err(|e| status_of(ttrpc::Code::INVALID_ARGUMENT, error_chain(&e)))?;
        // Storages first: the rootfs may live on one of them.
        let mut mounted = Vec::new();
        for storage in &req.storages {
            match self
                .state
                .storage()
                .mount(storage, deadline, deadline)
                .await
            {
                Ok(record) => mounted.push(record.mount_point),
                Err(e) => {
                    self.unmount(&mounted).await;
                    let code = ttrpc::Code::INVALID_ARGUMENT;
                    return Err(status_of(code, format!("storage: {}", error_chain(&e))));
                }
            }
        }
        match manager
            .create(&req.container_id, &oci_spec, &req.rootfs, declared)
            .await
        {
            Ok(pid) => {
                if !disks.is_empty() {
                    let nodes = disks.into_iter().map(|d| d.node).collect();
                    self.block_nodes().insert(req.container_id.clone(), nodes);
                }
                self.state
                    .set_container_storages(&req.container_id, mounted);
                let mut resp = CreateContainerResponse::new();
                resp.pid = u32::try_from(pid).unwrap_or(0);
                Ok(resp)
            }
            Err(e) => {
                self.unmount(&mounted).await;
                tracing::warn!(container = %req.container_id, error = %error_chain(&e), "CreateContainer failed");
                Err(status(&e))
            }
        }
    }

    async fn start_container(
        &self,
        ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let pid = self
            .manager()?
            .start(&req.container_id, &req.exec_id, request_deadline(ctx))
            .await
            .map_err(|e| status(&e))?;
        let mut resp = StartContainerResponse::new();
        resp.pid = u32::try_from(pid).unwrap_or(0);
        Ok(resp)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let declared = declared(req.stdio.as_ref())?;
        self.manager()?
            .exec(&req.container_id, &req.exec_id, &req.process, declared)
            .map_err(|e| status(&e))?;
        Ok(ExecProcessResponse::new())
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        self.manager()?
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(|e| status(&e))?;
        Ok(SignalProcessResponse::new())
    }

    async fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let end = self
            .manager()?
            .wait(&req.container_id, &req.exec_id, request_deadline(ctx))
            .await
            .map_err(|e| status(&e))?;
        let mut exit = ProcessExit::new();
        exit.pid = u32::try_from(end.pid).unwrap_or(0);
        exit.exit_status = u32::try_from(end.exit.status.exit_code()).unwrap_or(255);
        exit.signal = match end.exit.status {
            ChildStatus::Signaled(sig) => u32::try_from(sig).unwrap_or(0),
            ChildStatus::Exited(_) => 0,
        };
        exit.exited_at_unix_nanos = end.exit.at_unix_nanos;
        exit.oom_killed = end.exit.oom_killed;
        let mut resp = WaitProcessResponse::new();
        resp.exit = Some(exit).into();
        Ok(resp)
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: ResizeTtyRequest,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        self.manager()?
            .resize_tty(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map_err(|e| status(&e))?;
        Ok(ResizeTtyResponse::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        self.manager()?
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(|e| status(&e))?;
        Ok(CloseStdinResponse::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        self.manager()?
            .remove(&req.container_id, req.force)
            .await
            .map_err(|e| status(&e))?;
        let storages = self.state.take_container_storages(&req.container_id);
        self.unmount(&storages).await;
        // What the container left in the guest's cache reaches its disk now, before
        // the host detaches the slot and perhaps gives it another disk.
        let nodes = self.block_nodes().remove(&req.container_id);
        for node in nodes.unwrap_or_default() {
            let flushed =
                tokio::task::spawn_blocking(move || (block_devices::flush_and_forget(&node), node))
                    .await;
            if let Ok((Err(e), node)) = flushed {
                tracing::warn!(node = %node.display(), error = %e, "cannot flush a container's block device");
            }
        }
        Ok(RemoveContainerResponse::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        let dir = self.cgroup_of(&req.container_id)?;
        let resources =
            cgroups::parse_resources(&req.linux_resources).map_err(|e| cgroup_status(&e))?;
        let container = req.container_id.clone();
        tokio::task::spawn_blocking(move || cgroups::apply(&dir, &resources))
            .await
            .map_err(|e| status_of(ttrpc::Code::INTERNAL, e.to_string()))?
            .map_err(|e| {
                tracing::warn!(%container, error = %error_chain(&e), "UpdateContainer failed");
                cgroup_status(&e)
            })?;
        Ok(UpdateContainerResponse::new())
    }

    async fn pause_container(
        &self,
        ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        let dir = self.cgroup_of(&req.container_id)?;
        cgroups::set_frozen(&dir, true, request_deadline(ctx))
            .await
            .map_err(|e| cgroup_status(&e))?;
        Ok(PauseContainerResponse::new())
    }

    async fn resume_container(
        &self,
        ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        let dir = self.cgroup_of(&req.container_id)?;
        cgroups::set_frozen(&dir, false, request_deadline(ctx))
            .await
            .map_err(|e| cgroup_status(&e))?;
        Ok(ResumeContainerResponse::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let dir = self.cgroup_of(&req.container_id)?;
        let metrics = cgroups::stats(&dir).map_err(|e| cgroup_status(&e))?;
        let mut resp = StatsContainerResponse::new();
        resp.metrics = Some(metrics).into();
        Ok(resp)
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ListPidsRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        let dir = self.cgroup_of(&req.container_id)?;
        let owners = self
            .manager()?
            .process_pids(&req.container_id)
            .map_err(|e| status(&e))?;
        let pids = cgroups::procs(&dir).map_err(|e| cgroup_status(&e))?;
        let mut resp = ListPidsResponse::new();
        resp.pids = pids
            .into_iter()
            .map(|pid| {
                let mut entry = ProcessPid::new();
                entry.pid = u32::try_from(pid).unwrap_or(0);
                entry.exec_id = owners
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .map(|(_, exec_id)| exec_id.clone())
                    .unwrap_or_default();
                entry
            })
            .collect();
        Ok(resp)
    }

    async fn get_events(
        &self,
        ctx: &TtrpcContext,
        req: GetEventsRequest,
    ) -> ttrpc::Result<GetEventsResponse> {
        let (events, dropped) = self
            .manager()?
            .events()
            .next(req.after_sequence, req.max_events, request_deadline(ctx))
            .await
            .map_err(|e| status_of(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let mut resp = GetEventsResponse::new();
        resp.events = events;
        resp.dropped = dropped;
        Ok(resp)
    }
}

/// cgroup calls (UpdateContainer, Pause/Resume, Stats, ListPids).
impl ContainersService {
    /// The cgroup of container `id`, once cgroup v2 is known to be there.
    fn cgroup_of(&self, id: &str) -> ttrpc::Result<std::path::PathBuf> {
        let manager = self.manager()?;
        cgroups::check_v2(std::path::Path::new(cgroups::CGROUP_ROOT))
            .map_err(|e| cgroup_status(&e))?;
        manager.cgroup_dir(id).map_err(|e| status(&e))
    }
}

fn cgroup_status(e: &CgroupError) -> ttrpc::Error {
    status_of(cgroup_code(e), error_chain(e))
}

/// The ttrpc code of a cgroup failure (also CreateSandbox's, for `pod_resources`).
pub(super) fn cgroup_code(e: &CgroupError) -> ttrpc::Code {
    match e {
        CgroupError::NotV2(_) | CgroupError::MissingController { .. } => {
            ttrpc::Code::FAILED_PRECONDITION
        }
        CgroupError::TooLarge(_) | CgroupError::TooManyPids(_) => ttrpc::Code::RESOURCE_EXHAUSTED,
        CgroupError::Parse(_)
        | CgroupError::Invalid(_)
        | CgroupError::Refused { .. }
        | CgroupError::BadPath(_) => ttrpc::Code::INVALID_ARGUMENT,
        CgroupError::FreezeTimeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        CgroupError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ttrpc::Code::NOT_FOUND
        }
        CgroupError::Io { .. } => ttrpc::Code::INTERNAL,
    }
}

impl ContainersService {
    /// Unmounts a container's storages, newest first; failures are logged.
    async fn unmount(&self, mount_points: &[std::path::PathBuf]) {
        for point in mount_points.iter().rev() {
            let text = point.to_string_lossy();
            if let Err(e) = self.state.storage().unmount(&text, true).await {
                tracing::warn!(mount_point = %text, error = %error_chain(&e), "cannot unmount a container storage");
            }
        }
    }
}
