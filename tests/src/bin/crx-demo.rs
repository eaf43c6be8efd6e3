//! crx-demo: the README's main job. It starts a private containerd (Debian's, CRI
//! enabled, its own root, state and socket) with crx installed the way an operator
//! installs it (the shipped drop-in, runtime handler `crx`), runs a pod with that
//! handler the way a kubelet does — RunPodSandbox, a container that prints where it
//! runs, ExecSync into a second one — prints what happened and how long each step took,
//! then removes the pod and checks that nothing of it is left.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use crx_shim::vm::{select_backend, Hypervisor};
use crx_tests::containerd::wait_until_empty;
use crx_tests::cri::specs::{container_config, pod_config};
use crx_tests::cri::CriContainerd;

const HANDLER: &str = "crx";
const EXIT: Duration = Duration::from_secs(120);
const EXEC: Duration = Duration::from_secs(60);

/// What the first container prints: where it runs, seen from inside.
const HELLO: &str = "echo \"hello from a crx pod\"; \
    echo \"kernel:   $(uname -r) (the pod VM's own, not the host's)\"; \
    echo \"hostname: $(hostname)\"; \
    echo \"address:  $(ip -4 -o addr show eth0 | awk '{print $4}')\"; \
    echo \"memory:   $(awk '/MemTotal/ {print $2 \" kB\"}' /proc/meminfo) in the guest\"";

fn main() -> Result<()> {
    let (_, choice) = select_backend(Hypervisor::Auto).map_err(anyhow::Error::msg)?;
    println!("VM backend: {} — {}", choice.kind, choice.reason);
    println!(
        "host:       Linux {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );

    let t = Instant::now();
    let node = CriContainerd::start_on(Some("auto")).context("starting containerd with CRI")?;
    println!(
        "containerd: private instance at {} ready in {} ms (CRI, handler `{HANDLER}` from deploy/containerd/crx.toml)",
        node.socket().display(),
        t.elapsed().as_millis()
    );
    let client = node.client()?;

    let log_dir = node.pod_log_dir("crx-demo");
    let pod = pod_config("crx-demo", &log_dir);
    let t = Instant::now();
    let pod_id = client
        .run_pod_sandbox(&pod, HANDLER)
        .context("RunPodSandbox with runtime handler crx")?;
    let status = client.pod_sandbox_status(&pod_id, false)?;
    let ip = status
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    println!(
        "pod:        {} READY in {} ms, IP {ip} (its own micro-VM)",
        &pod_id[..12.min(pod_id.len())],
        t.elapsed().as_millis()
    );

    let outcome = run_containers(&node, &pod_id, &pod, &log_dir);

    let t = Instant::now();
    client.stop_pod_sandbox(&pod_id).context("StopPodSandbox")?;
    client
        .remove_pod_sandbox(&pod_id)
        .context("RemovePodSandbox")?;
    let left = wait_until_empty(Duration::from_secs(30), || node.leftovers(&[&pod_id]));
    println!(
        "removed:    pod stopped and removed in {} ms; left behind: {}",
        t.elapsed().as_millis(),
        if left.is_empty() {
            "nothing".to_owned()
        } else {
            format!("{left:?}")
        }
    );
    outcome?;
    ensure!(left.is_empty(), "the pod left {left:?}");
    Ok(())
}

fn run_containers(
    node: &CriContainerd,
    pod_id: &str,
    pod: &k8s_cri::v1::PodSandboxConfig,
    log_dir: &Path,
) -> Result<()> {
    let client = node.client()?;
    let t = Instant::now();
    let hello = container_config(
        "hello",
        node.busybox(),
        &["/bin/sh", "-c", HELLO],
        "hello.log",
    );
    let id = client.run_container(pod_id, &hello, pod)?;
    let exited = client.wait_exited(&id, EXIT)?;
    println!(
        "container:  `hello` ran and exited {} after {} ms; its log:",
        exited.exit_code,
        t.elapsed().as_millis()
    );
    for line in cri_log_text(&log_dir.join("hello.log"))? {
        println!("            | {line}");
    }
    ensure!(exited.exit_code == 0, "hello exited {}", exited.exit_code);

    let sleeper = container_config(
        "sleeper",
        node.busybox(),
        &["/bin/sleep", "3600"],
        "sleeper.log",
    );
    let id = client.run_container(pod_id, &sleeper, pod)?;
    let t = Instant::now();
    let reply = client.exec_sync(&id, &["/bin/sh", "-c", "echo exec in $(hostname): $(cat /proc/1/comm) is PID 1 of this container; ls /proc | grep -c '^[0-9]' | xargs echo processes visible:"], EXEC)?;
    println!(
        "exec:       ExecSync in `sleeper` exited {} after {} ms:",
        reply.exit_code,
        t.elapsed().as_millis()
    );
    for line in String::from_utf8_lossy(&reply.stdout).lines() {
        println!("            | {line}");
    }
    ensure!(reply.exit_code == 0, "ExecSync exited {}", reply.exit_code);
    Ok(())
}

/// The text of a CRI container log ("<time> <stream> <F|P> <text>" lines).
fn cri_log_text(path: &Path) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = log
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
            .collect();
        if !lines.is_empty() || Instant::now() > deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
