//! `crx.agent.v1.PortForward`: which TCP ports listen in the pod (the forwarded
//! connections themselves come on their own vsock port, see `crate::port_forward`).

use async_trait::async_trait;
use crx_protocols::v1::portforward::{ListListeningPortsRequest, ListListeningPortsResponse};
use crx_protocols::v1::portforward_ttrpc::PortForward;
use ttrpc::r#async::TtrpcContext;

use crate::port_forward::listening;

/// The PortForward service.
pub struct PortForwardService;

#[async_trait]
impl PortForward for PortForwardService {
    async fn list_listening_ports(
        &self,
        _ctx: &TtrpcContext,
        _req: ListListeningPortsRequest,
    ) -> ttrpc::Result<ListListeningPortsResponse> {
        let listed = tokio::task::spawn_blocking(listening::read)
            .await
            .map_err(|e| internal(format!("port table reader panicked: {e}")))?
            .map_err(|e| internal(format!("cannot read the TCP socket tables: {e}")))?;
        let mut resp = ListListeningPortsResponse::new();
        resp.ports = listed.ports.into_iter().map(u32::from).collect();
        resp.truncated = listed.truncated;
        Ok(resp)
    }
}

fn internal(message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, message))
}
