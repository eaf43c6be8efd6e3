//! The frame of the CRI suites (tests/tests/cri_*.rs): every case runs once per runtime
//! handler, `runc` and `crx`, on a fresh private containerd, one case at a time (all of
//! them put pods on the same test bridge and subnet), and must leave nothing behind.
//! [`for_each_handler!`](crate::for_each_handler) declares `<case>::runc` and
//! `<case>::crx` tests.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1 as cri;

use super::specs::container_config;
use super::{CriClient, CriContainerd};
use crate::containerd::wait_until_empty;

/// One case at a time in a test binary: every containerd puts its pods on the same
/// host bridge and subnet.
static SERIAL: Mutex<()> = Mutex::new(());
/// How long a pod may take to be fully released after RemovePodSandbox.
pub const RELEASE: Duration = Duration::from_secs(30);
/// How long a short-lived container may take to run and exit (a crx pod's first
/// container under TCG included).
pub const EXIT: Duration = Duration::from_secs(120);
pub const EXEC: Duration = Duration::from_secs(60);

/// Declares `<case>::runc` and `<case>::crx` tests, each running the function `case`
/// (`fn(&Suite) -> anyhow::Result<()>`, in scope where the macro is used) through
/// [`run_case`](crate::cri::suite::run_case).
#[macro_export]
macro_rules! for_each_handler {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn runc() {
                $crate::cri::suite::run_case("runc", super::$case)
            }
            #[test]
            fn crx() {
                $crate::cri::suite::run_case("crx", super::$case)
            }
        }
    )*};
}

/// Runs `case` for `handler` on a fresh containerd; panics with the case's error,
/// the list of leftovers and the tail of containerd's log.
pub fn run_case(handler: &str, case: fn(&Suite) -> Result<()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let node = match CriContainerd::start(handler == "crx") {
        Ok(node) => node,
        Err(e) => panic!("[{handler}] starting containerd with CRI: {e:#}"),
    };
    let suite = Suite {
        node,
        handler: handler.to_owned(),
        crx_pods: Mutex::new(Vec::new()),
    };
    let outcome = case(&suite);
    let pods = suite.crx_pods.lock().map(|p| p.clone()).unwrap_or_default();
    let pod_refs: Vec<&str> = pods.iter().map(String::as_str).collect();
    let left = if outcome.is_ok() {
        wait_until_empty(RELEASE, || suite.node.leftovers(&pod_refs))
    } else {
        Vec::new()
    };
    if let Err(e) = outcome {
        panic!(
            "[{handler}] {e:#}\n--- containerd log (tail) ---\n{}",
            suite.node.log_tail(25)
        );
    }
    assert!(
        left.is_empty(),
        "[{handler}] the case passed but left: {left:#?}\n--- containerd log (tail) ---\n{}",
        suite.node.log_tail(25)
    );
}

/// One case's view: the containerd, the handler under test, the pods it ran.
pub struct Suite {
    pub node: CriContainerd,
    pub handler: String,
    crx_pods: Mutex<Vec<String>>,
}

impl Suite {
    pub fn client(&self) -> Result<&CriClient> {
        Ok(self.node.client()?)
    }

    /// RunPodSandbox with the handler under test; checks it is READY on it.
    pub fn run_pod(&self, config: &cri::PodSandboxConfig) -> Result<String> {
        let id = self
            .client()?
            .run_pod_sandbox(config, &self.handler)
            .with_context(|| format!("RunPodSandbox on handler {}", self.handler))?;
        if self.handler == "crx" {
            if let Ok(mut pods) = self.crx_pods.lock() {
                pods.push(id.clone());
            }
        }
        Ok(id)
    }

    /// Stops and removes pod `id`; the pod is gone from CRI afterwards.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let client = self.client()?;
        client.stop_pod_sandbox(id).context("StopPodSandbox")?;
        client.remove_pod_sandbox(id).context("RemovePodSandbox")?;
        Ok(())
    }

    /// A pod with one running container (`sleep`), for cases that exec into it.
    pub fn pod_with_sleeper(&self, pod: &cri::PodSandboxConfig) -> Result<(String, String)> {
        let pod_id = self.run_pod(pod)?;
        let client = self.client()?;
        let c = container_config(
            "sleeper",
            self.node.busybox(),
            &["/bin/sleep", "3600"],
            "sleeper.log",
        );
        let cid = self.start_container(&pod_id, pod, &c)?;
        let status = client.container_status(&cid)?;
        ensure!(
            status.state == cri::ContainerState::ContainerRunning as i32,
            "the sleeper is not running after StartContainer: {status:?}"
        );
        Ok((pod_id, cid))
    }

    /// CreateContainer of `config` in pod `pod_id` (made from `pod`), then
    /// StartContainer; returns the container id. Errors name the container.
    pub fn start_container(
        &self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: &cri::ContainerConfig,
    ) -> Result<String> {
        let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
        self.client()?
            .run_container(pod_id, config, pod)
            .with_context(|| format!("running container {name}"))
    }

    pub fn exec(&self, cid: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse> {
        self.client()?
            .exec_sync(cid, cmd, EXEC)
            .with_context(|| format!("ExecSync {cmd:?}"))
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
