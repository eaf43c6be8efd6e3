//! `crx.agent.v1.PortForward`: which TCP ports listen in the pod (the forwarded
//! connections themselves come on their own vsock port, see `crate::port_forward`).

use std::time::Duration;

use async_trait::async_trait;
use crx_protocols::port_forward::MAX_LIST_WAIT_MS;
use crx_protocols::v1::portforward::{ListListeningPortsRequest, ListListeningPortsResponse};
use crx_protocols::v1::portforward_ttrpc::PortForward;
use ttrpc::r#async::TtrpcContext;

use crate::port_forward::listening::{self, ListeningPorts};

/// How often a long poll re-reads the guest's socket tables: a new listener reaches the
/// host's forwarder within this (plus the reply's trip).
const LOOK_INTERVAL: Duration = Duration::from_millis(500);

/// The PortForward service.
pub struct PortForwardService;

#[async_trait]
impl PortForward for PortForwardService {
    async fn list_listening_ports(
        &self,
        ctx: &TtrpcContext,
        req: ListListeningPortsRequest,
    ) -> ttrpc::Result<ListListeningPortsResponse> {
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_LIST_WAIT_MS)));
        let until =
            (tokio::time::Instant::now() + wait).min(super::reply_deadline(ctx.timeout_nano));
        let listed = listed_once_changed(&req.known, until).await?;
        let mut resp = ListListeningPortsResponse::new();
        resp.ports = listed.ports.into_iter().map(u32::from).collect();
        resp.truncated = listed.truncated;
        Ok(resp)
    }
}

/// The listening ports as soon as they differ from `known` (or more listen than are
/// listed), or as they are at `until`.
async fn listed_once_changed(
    known: &[u32],
    until: tokio::time::Instant,
) -> ttrpc::Result<ListeningPorts> {
    let mut listed = read().await?;
    // The caller's list is only compared with, so anything in it is harmless.
    while listed
        .ports
        .iter()
        .copied()
        .map(u32::from)
        .eq(known.iter().copied())
        && !listed.truncated
        && tokio::time::Instant::now() + LOOK_INTERVAL < until
    {
        tokio::time::sleep(LOOK_INTERVAL).await;
        listed = read().await?;
    }
    Ok(listed)
}

async fn read() -> ttrpc::Result<ListeningPorts> {
    tokio::task::spawn_blocking(listening::read)
        .await
        .map_err(|e| internal(format!("port table reader panicked: {e}")))?
        .map_err(|e| internal(format!("cannot read the TCP socket tables: {e}")))
}

fn internal(message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn ports(listed: &ListeningPorts) -> Vec<u32> {
        listed.ports.iter().copied().map(u32::from).collect()
    }

    #[tokio::test]
    async fn a_known_list_that_differs_is_answered_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = u32::from(listener.local_addr().unwrap().port());
        let started = Instant::now();
        let listed = listed_once_changed(&[], started + Duration::from_secs(30))
            .await
            .unwrap();
        assert!(ports(&listed).contains(&port));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_new_listener_ends_the_wait() {
        let known = ports(&read().await.unwrap());
        let started = Instant::now();
        let opener = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            std::net::TcpListener::bind("127.0.0.1:0").unwrap()
        });
        let listed = listed_once_changed(&known, started + Duration::from_secs(30))
            .await
            .unwrap();
        // Other listeners on this host may come or go too; either way the change ends
        // the wait long before its 30 s.
        assert_ne!(ports(&listed), known);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        drop(opener.await.unwrap());
    }

    #[tokio::test]
    async fn an_unchanged_list_waits_until_the_deadline() {
        // The wait is what is asserted, so this host's other listeners must stay put for
        // it: the smallest wait that still needs a second look.
        let known = ports(&read().await.unwrap());
        let started = Instant::now();
        let listed = listed_once_changed(&known, started + LOOK_INTERVAL * 3)
            .await
            .unwrap();
        if ports(&listed) == known {
            assert!(
                started.elapsed() >= LOOK_INTERVAL * 2,
                "{:?}",
                started.elapsed()
            );
        }
    }
}
