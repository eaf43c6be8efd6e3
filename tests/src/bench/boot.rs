//! `crx-bench boot`: spawn → agent health reply for each VM backend this host can run,
//! with the host memory of the VM's processes at ready and the guest memory touched.

use std::time::Duration;

use anyhow::Result;
use crx_shim::vm::{BackendKind, CrxVmmBackend, QemuAccel, QemuBackend, VmBackend};
use serde_json::json;

use super::stats::Summary;
use crate::vm_harness::{self, boot, shutdown, vm_config, RunDir};

/// One backend's figures.
#[derive(Debug, serde::Serialize)]
pub struct BackendFigures {
    pub backend: String,
    pub ready_ms: Summary,
    /// RSS of the VMM and back-end processes at ready, without guest RAM (KiB).
    pub vmm_rss_kib: Summary,
    /// Guest memory backed by host pages at ready (KiB).
    pub guest_touched_kib: Summary,
    /// PSS of all the VM's processes at ready (KiB).
    pub total_pss_kib: Summary,
}

pub fn run(
    iterations: usize,
    backends: &[BackendKind],
    memory_mib: u32,
    tcg_tb_size_mib: Option<u32>,
) -> Result<serde_json::Value> {
    let rt = vm_harness::runtime()?;
    let mut results = Vec::new();
    for &kind in backends {
        let backend: Box<dyn VmBackend> = match kind {
            BackendKind::CrxVmm => Box::new(CrxVmmBackend::default()),
            BackendKind::Qemu(accel) => {
                let mut q = QemuBackend::new(accel);
                if let Some(mib) = tcg_tb_size_mib {
                    q.tcg_tb_size_mib = mib;
                }
                Box::new(q)
            }
        };
        let dir = RunDir::new("bench-boot")?;
        let (mut ready, mut rss, mut touched, mut pss) = (vec![], vec![], vec![], vec![]);
        for i in 0..iterations {
            let config = vm_config(dir.path(), &format!("bench{i}"), 1, memory_mib, "")?;
            let (mut vm, agent, took) = boot(&rt, backend.as_ref(), &config)?;
            let figures = vm.resources();
            ready.push(took);
            rss.push(figures.vmm_own_rss_kib as f64);
            touched.push(figures.guest_touched_kib as f64);
            pss.push(figures.total_pss_kib as f64);
            eprintln!(
                "  {kind} run {}/{iterations}: ready {:.0} ms, VMM+back end RSS {} KiB, guest touched {} KiB",
                i + 1,
                took.as_secs_f64() * 1000.0,
                figures.vmm_own_rss_kib,
                figures.guest_touched_kib
            );
            if shutdown(&rt, vm.as_mut(), &agent).is_err() {
                vm.stop(Duration::from_secs(2))?;
            }
        }
        let empty = Summary {
            n: 0,
            median: 0.0,
            p90: 0.0,
            min: 0.0,
            max: 0.0,
        };
        let f = BackendFigures {
            backend: kind.to_string(),
            ready_ms: Summary::of_durations_ms(&ready).unwrap_or(empty),
            vmm_rss_kib: Summary::of(&rss).unwrap_or(empty),
            guest_touched_kib: Summary::of(&touched).unwrap_or(empty),
            total_pss_kib: Summary::of(&pss).unwrap_or(empty),
        };
        println!(
            "{:<10} spawn -> agent ready: median {:.0} ms, p90 {:.0} ms | VMM+back end RSS (no guest RAM) median {:.1} MiB | guest memory touched median {:.1} MiB | PSS total median {:.1} MiB",
            f.backend,
            f.ready_ms.median,
            f.ready_ms.p90,
            f.vmm_rss_kib.median / 1024.0,
            f.guest_touched_kib.median / 1024.0,
            f.total_pss_kib.median / 1024.0
        );
        results.push(f);
    }
    Ok(json!({
        "benchmark": "boot",
        "iterations": iterations,
        "guest_memory_mib": memory_mib,
        "tcg_tb_size_mib": tcg_tb_size_mib.unwrap_or(QemuBackend::new(QemuAccel::Tcg).tcg_tb_size_mib),
        "backends": results,
    }))
}

/// The backends this host can run, best first, with the reason for the others.
pub fn available_backends(kvm_usable: bool) -> Vec<BackendKind> {
    if kvm_usable {
        vec![BackendKind::CrxVmm, BackendKind::Qemu(QemuAccel::Kvm)]
    } else {
        vec![BackendKind::Qemu(QemuAccel::Tcg)]
    }
}
