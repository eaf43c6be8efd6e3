//! `crx.agent.v1.Health`: is the agent up, and which agent is it.

use std::sync::Arc;

use async_trait::async_trait;
use crx_protocols::v1::health::check_response::ServingStatus;
use crx_protocols::v1::health::{CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use crx_protocols::v1::health_ttrpc::Health;
use ttrpc::r#async::TtrpcContext;

use super::AgentState;

/// The Health service.
pub struct HealthService {
    state: Arc<AgentState>,
    kernel_release: String,
}

impl HealthService {
    /// Reads the kernel release once; it cannot change while the agent runs.
    pub fn new(state: Arc<AgentState>) -> HealthService {
        let kernel_release = match nix::sys::utsname::uname() {
            Ok(uts) => uts.release().to_string_lossy().into_owned(),
            Err(e) => {
                tracing::warn!(error = %e, "uname failed; Version will report an empty kernel release");
                String::new()
            }
        };
        HealthService {
            state,
            kernel_release,
        }
    }
}

#[async_trait]
impl Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let status = if self.state.shutting_down() {
            ServingStatus::NOT_SERVING
        } else {
            ServingStatus::SERVING
        };
        let mut resp = CheckResponse::new();
        resp.status = status.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.protocol_version = crx_protocols::PROTOCOL_VERSION;
        resp.kernel_release = self.kernel_release.clone();
        Ok(resp)
    }
}
