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
        // Read per call: CPUs can be hot-plugged.
        resp.online_cpus = online_cpus().unwrap_or(0);
        Ok(resp)
    }
}

/// Where the kernel lists the online CPUs, e.g. `0-3,6`.
const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

fn online_cpus() -> Option<u32> {
    let text = std::fs::read_to_string(CPU_ONLINE).ok()?;
    count_cpu_list(&text)
}

/// Counts the CPUs in a kernel CPU list (`0-3,6` is 5). None if malformed.
fn count_cpu_list(text: &str) -> Option<u32> {
    let mut count: u32 = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let n = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        count = count.checked_add(n)?;
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::count_cpu_list;

    #[test]
    fn counts_kernel_cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("0-"), None);
    }
}
