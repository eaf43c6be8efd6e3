//! `crx.agent.v1.Agent`: the agent's own lifecycle (for now, Shutdown).

use std::sync::Arc;

use async_trait::async_trait;
use crx_protocols::v1::agent::{ShutdownRequest, ShutdownResponse};
use crx_protocols::v1::agent_ttrpc::Agent;
use ttrpc::r#async::TtrpcContext;

use super::AgentState;

/// The Agent service.
pub struct LifecycleService {
    state: Arc<AgentState>,
}

impl LifecycleService {
    /// Serves requests against `state`.
    pub fn new(state: Arc<AgentState>) -> LifecycleService {
        LifecycleService { state }
    }
}

#[async_trait]
impl Agent for LifecycleService {
    /// Only flags the request: the main loop stops the server (which sends this reply
    /// first) and then powers off or exits.
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        tracing::info!("shutdown requested");
        self.state.request_shutdown();
        Ok(ShutdownResponse::new())
    }
}
