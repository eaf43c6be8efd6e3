//! `crx.agent.v1.Sandbox`: CreateSandbox and DestroySandbox over the agent's
//! [`SandboxSlot`](crate::sandbox::SandboxSlot), with sandbox errors mapped to ttrpc
//! codes in one place.

use std::sync::Arc;

use async_trait::async_trait;
use crx_protocols::v1::sandbox::{
    CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest, DestroySandboxResponse,
};
use crx_protocols::v1::sandbox_ttrpc::Sandbox;
use tokio::time::Instant;
use ttrpc::r#async::TtrpcContext;

use super::AgentState;
use crate::sandbox::{validate, SandboxError};
use crate::server::error_chain;

/// The Sandbox service.
pub struct SandboxService {
    state: Arc<AgentState>,
}

impl SandboxService {
    /// Serves requests against `state`.
    pub fn new(state: Arc<AgentState>) -> SandboxService {
        SandboxService { state }
    }
}

fn request_deadline(ctx: &TtrpcContext) -> Instant {
    super::reply_deadline(ctx.timeout_nano)
}

fn status(e: &SandboxError) -> ttrpc::Error {
    let code = match e {
        SandboxError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
        SandboxError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        SandboxError::Unavailable(_) => ttrpc::Code::UNAVAILABLE,
        SandboxError::Storage { source, .. } => super::storage::storage_code(source),
        // A MAC no NIC has is the request's mistake, not the agent's.
        SandboxError::Network(crate::sandbox::netlink::NetlinkError::NoSuchMac(_)) => {
            ttrpc::Code::INVALID_ARGUMENT
        }
        // A namespaced key this kernel lacks, or a value it rejects.
        SandboxError::Sysctl { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::EINVAL) =>
        {
            ttrpc::Code::INVALID_ARGUMENT
        }
        #[cfg(feature = "containers")]
        SandboxError::PodCgroup(source) => super::containers::cgroup_code(source),
        SandboxError::Holder(_)
        | SandboxError::Namespace { .. }
        | SandboxError::Network(_)
        | SandboxError::Sysctl { .. }
        | SandboxError::Io { .. } => ttrpc::Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, error_chain(e)))
}

#[async_trait]
impl Sandbox for SandboxService {
    async fn create_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        let deadline = request_deadline(ctx);
        let refused = |e: SandboxError| {
            tracing::warn!(sandbox = %req.sandbox_id.chars().take(80).collect::<String>(), error = %error_chain(&e), "CreateSandbox refused");
            status(&e)
        };
        let pod = validate::check_request(&req).map_err(refused)?;
        if self.state.shutting_down() {
            return Err(refused(SandboxError::Unavailable(
                "the agent is shutting down".into(),
            )));
        }
        let info = self
            .state
            .sandbox()
            .create(&self.state, pod, deadline)
            .await
            .map_err(refused)?;
        let mut resp = CreateSandboxResponse::new();
        resp.hostname_path = info.files.hostname.display().to_string();
        resp.hosts_path = info.files.hosts.display().to_string();
        resp.resolv_conf_path = info
            .files
            .resolv_conf
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(resp)
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<DestroySandboxResponse> {
        let grace = validate::check_grace(req.grace_period_ms).map_err(|e| status(&e))?;
        self.state.sandbox().destroy(&self.state, grace).await;
        Ok(DestroySandboxResponse::new())
    }
}
