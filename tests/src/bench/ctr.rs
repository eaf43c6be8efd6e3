//! `crx-bench ctr`: what a containerd user sees. `ctr run --rm` of a trivial container
//! (`/bin/true` from the busybox test image) until ctr exits, through one private
//! containerd 1.6, for crx (`io.containerd.crx.v2`, a pod VM per run) and runc,
//! alternated in the same run so both see the same host load. Then the host memory of
//! an idle pod (`sleep` as its only container): PSS (`/proc/<pid>/smaps_rollup`) of the
//! shim and of every VM process (VMM, back ends, their clean-up helpers), the guest
//! memory the guest touched, and runc's shim and container for scale.
//!
//! With a guest agent older than protocol version 3 the first crx run fails; the
//! bench then fails with ctr's error, which names both protocol versions.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use crx_shim::vm::VmResources;
use serde_json::json;

use super::stats::Summary;
use crate::containerd::{self, Containerd, CtrOutput};
use crate::vm_harness::processes_mentioning;

const CRX: &str = "io.containerd.crx.v2";
/// How long the idle pod's task may take to be listed as RUNNING.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(120);
/// Quiet time before the idle pod is measured: its boot-time allocations settle and
/// the guest's page cache stops growing.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// `crx-bench ctr` options.
pub struct CtrOptions {
    /// Timed runs per runtime.
    pub runs: usize,
    /// The shim's `hypervisor` setting (`auto`, `qemu`, `crx-vmm`).
    pub hypervisor: String,
}

pub fn run(opts: &CtrOptions) -> Result<serde_json::Value> {
    ensure!(opts.runs > 0, "--runs must be at least 1");
    let shim = containerd::shim_dir()?.join("containerd-shim-crx-v2");
    println!(
        "crx-bench ctr: {} runs each of `ctr run --rm IMAGE ID /bin/true`, crx (hypervisor = {:?}) and runc alternated; shim {}",
        opts.runs,
        opts.hypervisor,
        shim.display()
    );
    let ctrd = Containerd::start_crx_on(&opts.hypervisor, "")?;
    let image = ctrd.import_busybox()?;

    // Untimed first runs: image unpacking and page cache, and the crx error early.
    timed_run(&ctrd, image, "warm-runc", None)?;
    timed_run(&ctrd, image, "warm-crx", Some(CRX))?;
    let backend = backend_of(&ctrd).unwrap_or_else(|| "unknown".into());

    let (mut crx, mut runc) = (Vec::new(), Vec::new());
    for i in 0..opts.runs {
        let c = timed_run(&ctrd, image, &format!("bench-crx-{i}"), Some(CRX))?;
        let r = timed_run(&ctrd, image, &format!("bench-runc-{i}"), None)?;
        eprintln!(
            "  run {}/{}: crx {:.0} ms, runc {:.0} ms",
            i + 1,
            opts.runs,
            ms(c),
            ms(r)
        );
        crx.push(c);
        runc.push(r);
    }
    let crx_ms = Summary::of_durations_ms(&crx).context("no crx samples")?;
    let runc_ms = Summary::of_durations_ms(&runc).context("no runc samples")?;
    println!(
        "ctr run -> exit, crx ({backend}): median {:.0} ms, p90 {:.0} ms",
        crx_ms.median, crx_ms.p90
    );
    println!(
        "ctr run -> exit, runc:         median {:.0} ms, p90 {:.0} ms",
        runc_ms.median, runc_ms.p90
    );

    let crx_idle = idle_crx_pod(&ctrd, image)?;
    let runc_idle = idle_runc(&ctrd, image)?;
    println!(
        "idle pod, host PSS: shim {} KiB + VM processes {} KiB = {} KiB; guest touched {} KiB of {} MiB",
        crx_idle["shim_pss_kib"],
        crx_idle["vm_pss_kib"],
        crx_idle["total_pss_kib"],
        crx_idle["guest_touched_kib"],
        crx_idle["guest_memory_mib"]
    );
    println!(
        "idle runc container, host PSS: shim {} KiB + container {} KiB",
        runc_idle["shim_pss_kib"], runc_idle["container_pss_kib"]
    );
    Ok(json!({
        "bench": "ctr",
        "runs": opts.runs,
        "hypervisor": opts.hypervisor,
        "backend": backend,
        "shim": shim.display().to_string(),
        "crx_ctr_run_ms": crx_ms,
        "runc_ctr_run_ms": runc_ms,
        "crx_over_runc_median": crx_ms.median / runc_ms.median,
        "crx_idle_pod": crx_idle,
        "runc_idle_container": runc_idle,
    }))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One `ctr run --rm` of `/bin/true`, timed until ctr exits; fails with ctr's error.
fn timed_run(ctrd: &Containerd, image: &str, id: &str, runtime: Option<&str>) -> Result<Duration> {
    let mut args = vec!["run", "--rm"];
    if let Some(rt) = runtime {
        args.extend(["--runtime", rt]);
    }
    args.extend([image, id, "/bin/true"]);
    let started = Instant::now();
    let out = ctrd.ctr(&args)?;
    let took = started.elapsed();
    if !out.success() {
        bail!(
            "{} `ctr run` of {id} failed (exit {:?}): {}",
            runtime.unwrap_or("runc"),
            out.code,
            out.stderr.trim()
        );
    }
    Ok(took)
}

/// The backend the shim logged for its last pod (`pod VM ready backend=...`).
fn backend_of(ctrd: &Containerd) -> Option<String> {
    backend_in_log(&ctrd.dir().join("containerd.log"))
}

/// The backend named by the last `pod VM ready backend=...` line of a containerd log
/// (the shim logs through containerd).
pub fn backend_in_log(log: &std::path::Path) -> Option<String> {
    let log = std::fs::read_to_string(log).ok()?;
    log.lines()
        .rev()
        .find(|l| l.contains("pod VM ready"))?
        .split("backend=")
        .nth(1)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// The `ready_ms` (VM spawn → agent answering) of every `pod VM ready` line of a
/// containerd log, in order.
pub fn vm_ready_ms_in_log(log: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("pod VM ready"))
        .filter_map(|l| {
            l.split("ready_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `ctr run -d` of `sleep`, until `ctr task ls` lists it RUNNING.
fn start_idle(ctrd: &Containerd, image: &str, id: &str, runtime: Option<&str>) -> Result<()> {
    let mut args = vec!["run", "-d"];
    if let Some(rt) = runtime {
        args.extend(["--runtime", rt]);
    }
    args.extend([image, id, "/bin/sleep", "3600"]);
    let out = ctrd.ctr(&args)?;
    ensure!(
        out.success(),
        "`ctr run -d` of {id} failed: {}",
        out.stderr.trim()
    );
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    loop {
        let ls = ctrd.ctr(&["task", "ls"])?;
        if ls
            .stdout
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{id} not RUNNING within {RUNNING_TIMEOUT:?}: {}",
            ls.stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_idle(ctrd: &Containerd, id: &str) -> Result<CtrOutput> {
    let _ = ctrd.ctr(&["task", "kill", "-s", "SIGKILL", id])?;
    let deadline = Instant::now() + RUNNING_TIMEOUT;
    loop {
        let out = ctrd.ctr(&["task", "delete", id])?;
        if out.success() || !ctrd.task_ids()?.iter().any(|t| t == id) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "task {id} could not be deleted: {}",
            out.stderr.trim()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctrd.ctr(&["containers", "rm", id])
}

/// The idle crx pod's figures (KiB).
fn idle_crx_pod(ctrd: &Containerd, image: &str) -> Result<serde_json::Value> {
    let id = "bench-crx-idle";
    start_idle(ctrd, image, id, Some(CRX))?;
    std::thread::sleep(IDLE_SETTLE);
    let shim = shim_of(ctrd, id)?;
    let vm = processes_mentioning(&format!("/run/crx/{id}/"));
    ensure!(!vm.is_empty(), "no VM process of {id} found");
    let shim_pss = pss_kib(shim)?;
    let mut vm_pss = 0;
    let mut processes = Vec::new();
    for (pid, cmd) in &vm {
        let pss = pss_kib(*pid)?;
        vm_pss += pss;
        processes.push(json!({"pid": pid, "process": process_name(cmd), "pss_kib": pss}));
    }
    let memory_mib = crx_shim::config::ShimConfig::default().memory_mib;
    let pids: Vec<(&'static str, u32)> = vm.iter().map(|(pid, _)| ("vm", *pid)).collect();
    let guest_touched = VmResources::measure(&pids, u64::from(memory_mib) * 1024).guest_touched_kib;
    remove_idle(ctrd, id)?;
    Ok(json!({
        "shim_pss_kib": shim_pss,
        "vm_pss_kib": vm_pss,
        "total_pss_kib": shim_pss + vm_pss,
        "guest_touched_kib": guest_touched,
        "guest_memory_mib": memory_mib,
        "vm_processes": processes,
    }))
}

/// The idle runc container's figures (KiB), for scale.
fn idle_runc(ctrd: &Containerd, image: &str) -> Result<serde_json::Value> {
    let id = "bench-runc-idle";
    start_idle(ctrd, image, id, None)?;
    std::thread::sleep(IDLE_SETTLE);
    let shim = shim_of(ctrd, id)?;
    let task = ctrd.ctr(&["task", "ls"])?;
    let pid: u32 = task
        .stdout
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no pid for {id} in {:?}", task.stdout))?;
    let figures = json!({
        "shim_pss_kib": pss_kib(shim)?,
        "container_pss_kib": pss_kib(pid)?,
    });
    remove_idle(ctrd, id)?;
    Ok(figures)
}

/// The shim serving container `id` (its command line names the id).
fn shim_of(ctrd: &Containerd, id: &str) -> Result<u32> {
    let shims = ctrd.shim_pids();
    let needle = format!("-id {id} ");
    processes_mentioning(&needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| shims.contains(pid))
        .with_context(|| format!("no shim process for {id} among {shims:?}"))
}

fn process_name(cmdline: &str) -> String {
    let mut words = cmdline.split_whitespace();
    let program = words.next().unwrap_or_default();
    let base = program.rsplit('/').next().unwrap_or(program);
    match words.next() {
        Some(sub) if base == "crx-vmm" && !sub.starts_with('-') => format!("{base} {sub}"),
        _ => base.to_owned(),
    }
}

/// `Pss:` of `/proc/<pid>/smaps_rollup`, in KiB.
pub fn pss_kib(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no Pss line in /proc/{pid}/smaps_rollup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ready_figures_and_the_backend_are_read_from_the_shim_log_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("containerd.log");
        std::fs::write(
            &log,
            "x INFO pod VM ready backend=qemu/tcg ready_ms=1292 vm=[]\nother\n\
             y INFO pod VM ready backend=crx-vmm ready_ms=87 vm=[]\n",
        )
        .unwrap();
        assert_eq!(vm_ready_ms_in_log(&log), vec![1292.0, 87.0]);
        assert_eq!(backend_in_log(&log).as_deref(), Some("crx-vmm"));
        assert!(vm_ready_ms_in_log(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn own_pss_is_read_and_process_names_are_short() {
        assert!(pss_kib(std::process::id()).unwrap() > 0);
        assert!(pss_kib(u32::MAX / 2).is_err());
        assert_eq!(
            process_name("/x/crx-vmm vhost-user-fs --socket /run/crx/p/fs-0.sock"),
            "crx-vmm vhost-user-fs"
        );
        assert_eq!(
            process_name("/usr/bin/qemu-system-x86_64 -name crx-p"),
            "qemu-system-x86_64"
        );
    }
}
