//! `crx-bench pod`, `crx-bench exec` and `crx-bench density`: what a kubelet sees,
//! through containerd's CRI (one private CRI-enabled containerd, `crate::cri`), for the
//! runtime handlers `runc` and `crx` in the same run so both see the same host load.
//!
//! - pod: RunPodSandbox latency, and pod ready (RunPodSandbox + CreateContainer +
//!   StartContainer of a `sleep` container), runc and crx alternated; then the host
//!   memory of an idle pod of each handler (PSS of its shim and of its VM processes or
//!   pause process).
//! - exec: ExecSync of `/bin/true` in one running container per handler, alternated.
//! - density: N pods started at once per handler (one CRI client per thread), pods/s
//!   until all are READY with their container running, the host memory they hold
//!   (PSS, and the fall of MemAvailable), and from it how many idle pods fit in a
//!   memory budget.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use super::ctr::{backend_in_log, pss_kib, vm_ready_ms_in_log};
use super::stats::Summary;
use crate::cri::specs::{container_config, pod_config};
use crate::cri::{CriClient, CriContainerd};
use crate::vm_harness::processes_mentioning;

pub const HANDLERS: [&str; 2] = ["runc", "crx"];
/// Quiet time before idle pods are measured: boot-time allocations settle.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// A pod with one `sleep` container, as the benchmarks start it.
struct BenchPod {
    pod: String,
    container: String,
}

/// Runs pod `name` on `handler` with a `sleep` container; returns it with the time to
/// RunPodSandbox's reply and to the container's start.
fn start_pod(
    client: &CriClient,
    node: &CriContainerd,
    name: &str,
    handler: &str,
) -> Result<(BenchPod, Duration, Duration)> {
    let config = pod_config(name, &node.pod_log_dir(name));
    let started = Instant::now();
    let pod = client
        .run_pod_sandbox(&config, handler)
        .with_context(|| format!("RunPodSandbox {name} on {handler}"))?;
    let sandbox_ready = started.elapsed();
    let spec = container_config("idle", node.busybox(), &["/bin/sleep", "3600"], "idle.log");
    let container = client
        .run_container(&pod, &spec, &config)
        .with_context(|| format!("running the container of {name} on {handler}"))?;
    Ok((
        BenchPod { pod, container },
        sandbox_ready,
        started.elapsed(),
    ))
}

fn remove_pod(client: &CriClient, pod: &BenchPod) -> Result<()> {
    client
        .stop_pod_sandbox(&pod.pod)
        .with_context(|| format!("StopPodSandbox {}", pod.pod))?;
    client
        .remove_pod_sandbox(&pod.pod)
        .with_context(|| format!("RemovePodSandbox {}", pod.pod))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(samples: &[Duration], what: &str) -> Result<Summary> {
    Summary::of_durations_ms(samples).with_context(|| format!("no {what} samples"))
}

/// `crx-bench pod`.
pub fn run_pod(runs: usize) -> Result<serde_json::Value> {
    ensure!(runs > 0, "--runs must be at least 1");
    println!("crx-bench pod: {runs} pods per handler through CRI, runc and crx alternated");
    let node = CriContainerd::start(true).context("starting containerd with CRI")?;
    let client = node.client()?;
    // Untimed first pods: image unpacking, page cache, CNI's first run.
    for handler in HANDLERS {
        let (pod, _, _) = start_pod(client, &node, &format!("warm-{handler}"), handler)?;
        remove_pod(client, &pod)?;
    }
    let mut sandbox = [Vec::new(), Vec::new()];
    let mut ready = [Vec::new(), Vec::new()];
    for i in 0..runs {
        let mut line = format!("  run {}/{runs}:", i + 1);
        for (h, handler) in HANDLERS.iter().enumerate() {
            let (pod, s, r) = start_pod(client, &node, &format!("bench-{handler}-{i}"), handler)?;
            remove_pod(client, &pod)?;
            line += &format!(" {handler} sandbox {:.0} ms ready {:.0} ms;", ms(s), ms(r));
            sandbox[h].push(s);
            ready[h].push(r);
        }
        eprintln!("{line}");
    }
    let mut figures = serde_json::Map::new();
    for (h, handler) in HANDLERS.iter().enumerate() {
        let s = summary(&sandbox[h], "RunPodSandbox")?;
        let r = summary(&ready[h], "pod ready")?;
        println!(
            "{handler:>4}: RunPodSandbox median {:.0} ms p90 {:.0} ms; pod ready median {:.0} ms p90 {:.0} ms",
            s.median, s.p90, r.median, r.p90
        );
        figures.insert(format!("{handler}_run_pod_sandbox_ms"), json!(s));
        figures.insert(format!("{handler}_pod_ready_ms"), json!(r));
    }
    let ratio = |key: &str| -> f64 {
        let m = |h: &str| {
            figures[&format!("{h}_{key}")]["median"]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        m("crx") / m("runc")
    };
    // The timed crx pods are the last `runs` VM boots before the idle pods: how much
    // of RunPodSandbox was the VM booting its guest (emulated under TCG).
    let boots = vm_ready_ms_in_log(&node.dir().join("containerd.log"));
    let vm_ready = Summary::of(&boots[boots.len().saturating_sub(runs)..]);
    let crx_sandbox_median = figures["crx_run_pod_sandbox_ms"]["median"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let vm_share = vm_ready.map(|v| v.median / crx_sandbox_median);
    if let (Some(v), Some(share)) = (vm_ready, vm_share) {
        println!(
            "crx: VM spawn -> agent ready median {:.0} ms = {:.0}% of RunPodSandbox (guest boot time; emulated on QEMU/TCG)",
            v.median,
            share * 100.0
        );
    }
    let sandbox_ratio = ratio("run_pod_sandbox_ms");
    let ready_ratio = ratio("pod_ready_ms");
    println!("crx / runc (median): RunPodSandbox {sandbox_ratio:.2}x, pod ready {ready_ratio:.2}x");

    let mut memory = serde_json::Map::new();
    for handler in HANDLERS {
        let (pod, _, _) = start_pod(client, &node, &format!("idle-{handler}"), handler)?;
        std::thread::sleep(IDLE_SETTLE);
        let m = pod_memory(&node, &pod.pod)?;
        println!(
            "idle {handler} pod, host PSS: {} KiB ({})",
            m.total_kib,
            m.describe()
        );
        memory.insert(handler.to_owned(), m.to_json());
        remove_pod(client, &pod)?;
    }
    Ok(json!({
        "bench": "pod",
        "runs": runs,
        "backend": backend_of(&node),
        "figures": figures,
        "crx_over_runc_run_pod_sandbox_median": sandbox_ratio,
        "crx_over_runc_pod_ready_median": ready_ratio,
        "idle_pod_pss": memory,
        "crx_vm_ready_ms": vm_ready,
        "crx_vm_ready_share_of_run_pod_sandbox": vm_share,
    }))
}

/// `crx-bench exec`.
pub fn run_exec(runs: usize) -> Result<serde_json::Value> {
    ensure!(runs > 0, "--runs must be at least 1");
    println!("crx-bench exec: {runs} ExecSync of /bin/true per handler, runc and crx alternated");
    let node = CriContainerd::start(true).context("starting containerd with CRI")?;
    let client = node.client()?;
    let mut pods = Vec::new();
    for handler in HANDLERS {
        pods.push(start_pod(client, &node, &format!("exec-{handler}"), handler)?.0);
    }
    let exec = |pod: &BenchPod| -> Result<Duration> {
        let started = Instant::now();
        let reply = client.exec_sync(&pod.container, &["/bin/true"], EXEC_TIMEOUT)?;
        let took = started.elapsed();
        ensure!(
            reply.exit_code == 0,
            "ExecSync /bin/true exited {}",
            reply.exit_code
        );
        Ok(took)
    };
    for pod in &pods {
        exec(pod).context("untimed first ExecSync")?;
    }
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..runs {
        for (h, pod) in pods.iter().enumerate() {
            samples[h].push(exec(pod)?);
        }
    }
    let mut figures = serde_json::Map::new();
    for (h, handler) in HANDLERS.iter().enumerate() {
        let s = summary(&samples[h], "ExecSync")?;
        println!(
            "{handler:>4}: ExecSync /bin/true median {:.1} ms p90 {:.1} ms",
            s.median, s.p90
        );
        figures.insert(format!("{handler}_exec_sync_ms"), json!(s));
    }
    for pod in &pods {
        remove_pod(client, pod)?;
    }
    let median = |h: &str| {
        figures[&format!("{h}_exec_sync_ms")]["median"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let ratio = median("crx") / median("runc");
    println!("crx / runc (median): {ratio:.2}x");
    Ok(json!({
        "bench": "exec",
        "runs": runs,
        "backend": backend_of(&node),
        "figures": figures,
        "crx_over_runc_median": ratio,
    }))
}

/// `crx-bench density`.
pub fn run_density(
    pods: usize,
    budget_mib: u64,
    settle: Duration,
    idle_window: Duration,
) -> Result<serde_json::Value> {
    ensure!(pods > 0, "--pods must be at least 1");
    ensure!(!idle_window.is_zero(), "--idle-window-s must be at least 1");
    println!(
        "crx-bench density: {pods} pods started at once per handler; memory budget {budget_mib} MiB; \
         idle measured {} s after the last pod is ready, over {} s",
        settle.as_secs(),
        idle_window.as_secs()
    );
    let node = CriContainerd::start(true).context("starting containerd with CRI")?;
    {
        let client = node.client()?;
        for handler in HANDLERS {
            let (pod, _, _) = start_pod(client, &node, &format!("warm-{handler}"), handler)?;
            remove_pod(client, &pod)?;
        }
    }
    let mut results = serde_json::Map::new();
    for handler in HANDLERS {
        let available_before = mem_available_kib()?;
        let started = Instant::now();
        let outcomes: Vec<Result<BenchPod>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..pods)
                .map(|i| {
                    let node = &node;
                    scope.spawn(move || -> Result<BenchPod> {
                        let client = CriClient::connect(node.socket())?;
                        Ok(start_pod(&client, node, &format!("dense-{handler}-{i}"), handler)?.0)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("pod thread panicked")))
                })
                .collect()
        });
        let wall = started.elapsed();
        let (running, failed): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
        let running: Vec<BenchPod> = running.into_iter().filter_map(Result::ok).collect();
        std::thread::sleep(settle);
        let available_after = mem_available_kib()?;
        let mut pss = 0;
        let mut pids = Vec::new();
        for pod in &running {
            pss += pod_memory(&node, &pod.pod)?.total_kib;
            let (shim, others) = pod_processes(&node, &pod.pod)?;
            pids.push(shim);
            pids.extend(others);
        }
        let idle = IdleCpu::measure(&pids, idle_window, pods);
        let client = node.client()?;
        for pod in &running {
            remove_pod(client, pod)?;
        }
        if let Some(Err(e)) = failed.into_iter().next() {
            return Err(e.context(format!("{handler}: a pod of {pods} did not start")));
        }
        let per_pod_kib = pss / pods as u64;
        let fall_per_pod_kib = available_before.saturating_sub(available_after) / pods as u64;
        // The larger of the two: PSS misses kernel memory (page tables, KVM state),
        // MemAvailable's fall is noisy but counts it.
        let cost_kib = per_pod_kib.max(fall_per_pod_kib).max(1);
        let fit = budget_mib * 1024 / cost_kib;
        let rate = pods as f64 / wall.as_secs_f64();
        println!(
            "{handler:>4}: {pods} pods in {:.1} s = {rate:.2} pods/s; per pod PSS {per_pod_kib} KiB, MemAvailable fall {fall_per_pod_kib} KiB, idle CPU {:.1} millicores ({}); {fit} idle pods fit in {budget_mib} MiB",
            wall.as_secs_f64(),
            idle.per_pod,
            idle.by_process_text(),
        );
        results.insert(
            handler.to_owned(),
            json!({
                "wall_s": wall.as_secs_f64(),
                "pods_per_s": rate,
                "pss_per_pod_kib": per_pod_kib,
                "mem_available_fall_per_pod_kib": fall_per_pod_kib,
                "idle_pods_in_budget": fit,
                "idle_cpu_millicores_per_pod": idle.per_pod,
                "idle_cpu_millicores_per_pod_by_process": idle.by_process,
            }),
        );
    }
    Ok(json!({
        "bench": "density",
        "pods": pods,
        "budget_mib": budget_mib,
        "backend": backend_of(&node),
        "handlers": results,
    }))
}

/// CPU that idle pods burn on the host: ticks of all their processes over a window,
/// per pod, in total and by process name (which part of a pod keeps waking up).
struct IdleCpu {
    per_pod: f64,
    by_process: BTreeMap<String, f64>,
}

impl IdleCpu {
    fn measure(pids: &[u32], window: Duration, pods: usize) -> IdleCpu {
        let before: Vec<(String, u64)> = pids.iter().map(|&p| (comm(p), cpu_ticks(p))).collect();
        let started = Instant::now();
        std::thread::sleep(window);
        let scale = 1000.0 / (clock_ticks_per_s() * started.elapsed().as_secs_f64()) / pods as f64;
        let mut by_process = BTreeMap::new();
        let mut total = 0;
        for (&pid, (name, ticks_before)) in pids.iter().zip(before) {
            let ticks = cpu_ticks(pid).saturating_sub(ticks_before);
            total += ticks;
            *by_process.entry(name).or_insert(0.0) += ticks as f64 * scale;
        }
        IdleCpu {
            per_pod: total as f64 * scale,
            by_process,
        }
    }

    fn by_process_text(&self) -> String {
        named_figures(
            self.by_process
                .iter()
                .map(|(name, mc)| (name, format!("{mc:.1}"))),
        )
    }
}

/// "name figure, name figure, ..." for a printed line.
fn named_figures<'a>(figures: impl Iterator<Item = (&'a String, String)>) -> String {
    figures
        .map(|(name, figure)| format!("{name} {figure}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Host memory (PSS, KiB) of one pod: its shim and its VM processes (crx) or the
/// shim's children (runc: pause and the container).
struct PodMemory {
    shim_kib: u64,
    rest_kib: u64,
    total_kib: u64,
    processes: Vec<(String, u64)>,
}

impl PodMemory {
    fn describe(&self) -> String {
        named_figures(
            self.processes
                .iter()
                .map(|(name, kib)| (name, kib.to_string())),
        )
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "shim_pss_kib": self.shim_kib,
            "other_pss_kib": self.rest_kib,
            "total_pss_kib": self.total_kib,
            "processes": self.processes.iter().map(|(n, k)| json!({"process": n, "pss_kib": k})).collect::<Vec<_>>(),
        })
    }
}

/// The shim of `pod` and every other host process of it: its VM processes (crx) or
/// the shim's children (runc: pause and the containers).
fn pod_processes(node: &CriContainerd, pod: &str) -> Result<(u32, BTreeSet<u32>)> {
    let shims = node.shim_pids();
    let shim = processes_mentioning(&format!("-id {pod} "))
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| shims.contains(pid))
        .with_context(|| format!("no shim process for pod {pod}"))?;
    let mut members: BTreeSet<u32> = descendants(shim);
    members.extend(
        processes_mentioning(&format!("/run/crx/{pod}/"))
            .into_iter()
            .map(|(pid, _)| pid),
    );
    members.remove(&shim);
    Ok((shim, members))
}

fn pod_memory(node: &CriContainerd, pod: &str) -> Result<PodMemory> {
    let (shim, members) = pod_processes(node, pod)?;
    let shim_kib = pss_kib(shim)?;
    let mut processes = vec![("shim".to_owned(), shim_kib)];
    let mut rest_kib = 0;
    for pid in members {
        // A process may end between listing and reading (a clean-up helper).
        let Ok(kib) = pss_kib(pid) else { continue };
        rest_kib += kib;
        processes.push((comm(pid), kib));
    }
    Ok(PodMemory {
        shim_kib,
        rest_kib,
        total_kib: shim_kib + rest_kib,
        processes,
    })
}

/// Every process below `root` in the process tree.
fn descendants(root: u32) -> BTreeSet<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            parents.push((pid, ppid));
        }
    }
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && found.insert(child) {
                frontier.push(child);
            }
        }
    }
    found
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `pid` in clock ticks; 0 for a process that is gone.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat[stat.rfind(')')? + 1..].to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the name: state(0) ppid(1) ... utime(11) stime(12).
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| pid.to_string())
}

fn mem_available_kib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

/// The VM backend the crx shim logged for its last pod, if any.
fn backend_of(node: &CriContainerd) -> String {
    backend_in_log(&node.dir().join("containerd.log")).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_tree_and_meminfo_are_read() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(descendants(me).contains(&child.id()));
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        assert!(mem_available_kib().unwrap() > 0);
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_millis(300) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_ticks(me) > 0, "300 ms of spinning shows in utime");
    }
}
