//! crx-demo: the README's main job at this stage of crx. It picks the VM backend the
//! way the shim's `hypervisor = "auto"` does, boots a pod VM with the crx guest kernel
//! and agent, talks to the agent over hybrid vsock, and powers the VM off, printing
//! what happened and how long each step took.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crx_shim::vm::{select_backend, Hypervisor};
use crx_tests::vm_harness::{self, boot, shutdown, vm_config, RunDir};

fn main() -> Result<()> {
    let (backend, choice) = select_backend(Hypervisor::Auto).map_err(anyhow::Error::msg)?;
    println!("backend: {} — {}", choice.kind, choice.reason);

    let rt = vm_harness::runtime()?;
    let dir = RunDir::new("demo")?;
    let config = vm_config(dir.path(), "demo", 1, 128, "")?;
    println!("kernel:    {}", config.kernel.display());
    println!("initramfs: {}", config.initramfs.display());
    let (mut vm, agent, took) =
        boot(&rt, backend.as_ref(), &config).context("booting the pod VM")?;
    println!(
        "pod VM up: {:?}, agent answered Health.Check after {:.0} ms",
        vm.pids(),
        took.as_secs_f64() * 1000.0
    );
    let v = &agent.version;
    println!(
        "agent:     crx-agent {} (protocol {}) on Linux {}",
        v.agent_version, v.protocol_version, v.kernel_release
    );
    let figures = vm.resources();
    println!(
        "memory:    VMM + back end {:.1} MiB (without guest RAM), guest RAM touched {:.1} MiB",
        figures.vmm_own_rss_kib as f64 / 1024.0,
        figures.guest_touched_kib as f64 / 1024.0
    );
    let t = Instant::now();
    let exit = shutdown(&rt, vm.as_mut(), &agent).or_else(|e| {
        eprintln!("clean shutdown failed ({e:#}); stopping the VM");
        vm.stop(Duration::from_secs(2)).map_err(anyhow::Error::from)
    })?;
    println!(
        "shutdown:  {exit} after {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    anyhow::ensure!(!exit.is_failure(), "the VM did not end cleanly: {exit}");
    Ok(())
}
