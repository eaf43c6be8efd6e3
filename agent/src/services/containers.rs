//! The `Containers` service (container.proto) over the container manager. Methods not
//! built yet answer UNIMPLEMENTED with their name.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use async_trait::async_trait;
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::Containers;
use ttrpc::r#async::TtrpcContext;

use super::drafts::unimplemented;
use super::AgentState;
use crate::containers::manager::{ContainerManager, ManagerError};
use crate::containers::spec::SpecError;
use crate::containers::stdio::Declared;
use crate::reaper::ChildStatus;
use crate::server::error_chain;

/// Time kept back from a request's deadline so the reply still reaches the host.
const REPLY_MARGIN: Duration = Duration::from_millis(100);
/// The deadline used when a request carries none (the protocol asks for one).
const NO_DEADLINE: Duration = Duration::from_secs(60);
/// Most storages per container (container.proto).
const MAX_STORAGES: usize = 32;

/// The Containers service.
pub struct ContainersService {
    state: Arc<AgentState>,
}

impl ContainersService {
    /// Serves requests against `state`.
    pub fn new(state: Arc<AgentState>) -> ContainersService {
        ContainersService { state }
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
    let budget = u64::try_from(ctx.timeout_nano)
        .ok()
        .filter(|n| *n > 0)
        .map_or(NO_DEADLINE, Duration::from_nanos);
    Instant::now() + budget.saturating_sub(REPLY_MARGIN)
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
    if s.terminal {
        return Err(status_of(
            ttrpc::Code::UNIMPLEMENTED,
            "StdioSpec.terminal: terminals are not implemented by this agent yet",
        ));
    }
    Ok(Declared {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
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
            .create(&req.container_id, &req.oci_spec, &req.rootfs, declared)
            .await
        {
            Ok(pid) => {
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
        let mut resp = WaitProcessResponse::new();
        resp.exit = Some(exit).into();
        Ok(resp)
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        _req: ResizeTtyRequest,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        unimplemented("Containers.ResizeTty")
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
        Ok(RemoveContainerResponse::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        _req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        unimplemented("Containers.UpdateContainer")
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        _req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        unimplemented("Containers.PauseContainer")
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        _req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        unimplemented("Containers.ResumeContainer")
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        _req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        unimplemented("Containers.StatsContainer")
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        _req: ListPidsRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        unimplemented("Containers.ListPids")
    }

    async fn get_events(
        &self,
        _ctx: &TtrpcContext,
        _req: GetEventsRequest,
    ) -> ttrpc::Result<GetEventsResponse> {
        unimplemented("Containers.GetEvents")
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
