//! `crx-bench vmm`: crx-vmm against QEMU microvm with KVM, booting the same guest kernel
//! and initramfs in the same nested-KVM L1 (this host's own KVM, PVM, cannot run guest
//! user space). Inside L1, `crx-probe vm-bench` drives both through the shim's own VM
//! backends; this side boots the L1 and compares.
//!
//! Timings inside a TCG-emulated L1 are only comparable with each other: every figure
//! here is "crx-vmm vs QEMU, same L1, same run".

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use crx_shim::vm::{
    BackendKind, CrxVmmBackend, QemuAccel, QemuBackend, SerialOutput, Vm, VmBackend, VmConfig,
};
use serde_json::{json, Value};

use super::stats::Summary;
use crate::vm_harness::{self, boot, shutdown};

/// What the guest runs with in both VMMs.
pub const GUEST_MEMORY_MIB: u32 = 256;

/// Paths inside the L1 payload.
pub struct InL1Paths {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub crx_vmm: PathBuf,
    pub qemu: PathBuf,
}

/// Runs inside L1: `iterations` boots of one backend; returns its figures as JSON.
pub fn measure_in_l1(backend_name: &str, iterations: usize, paths: &InL1Paths) -> Result<Value> {
    let kind = match backend_name {
        "crx-vmm" => BackendKind::CrxVmm,
        "qemu" => BackendKind::Qemu(QemuAccel::Kvm),
        other => bail!("unknown backend {other:?} (crx-vmm or qemu)"),
    };
    let rt = vm_harness::runtime()?;
    let (mut ready, mut first, mut rss, mut touched, mut exits) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..iterations {
        let run_dir = PathBuf::from(format!("/run/vm-bench/{backend_name}-{i}"));
        let config = VmConfig {
            name: format!("{backend_name}{i}"),
            run_dir: run_dir.clone(),
            kernel: paths.kernel.clone(),
            initramfs: paths.initramfs.clone(),
            vcpus: 1,
            memory_mib: GUEST_MEMORY_MIB,
            kernel_cmdline: String::new(),
            serial: SerialOutput::Off,
            crx_vmm_binary: paths.crx_vmm.clone(),
            qemu_binary: paths.qemu.clone(),
            devices: Default::default(),
        };
        let backend: Box<dyn VmBackend> = match kind {
            BackendKind::CrxVmm => Box::new(CrxVmmBackend::default()),
            BackendKind::Qemu(accel) => {
                let mut q = QemuBackend::new(accel);
                // The first KVM_RUN, with a wall-clock stamp: QEMU's first guest
                // instruction. Only that event is traced, so the cost is a few lines.
                q.extra_args = ["-msg", "timestamp=on", "-trace", "kvm_vcpu_ioctl"]
                    .map(String::from)
                    .to_vec();
                Box::new(q)
            }
        };
        let (mut vm, agent, took) = boot(&rt, backend.as_ref(), &config)?;
        let figures = vm.resources();
        let vmm_pid = vm.pids()[0].1;
        let kvm_exits = debugfs_exits(vmm_pid);
        let first_insn = first_guest_instruction(vm.as_ref(), kind);
        ready.push(took.as_secs_f64() * 1000.0);
        rss.push(figures.vmm_own_rss_kib as f64);
        touched.push(figures.guest_touched_kib as f64);
        if let Some(e) = kvm_exits {
            exits.push(e as f64);
        }
        if let Some(f) = first_insn {
            first.push(f.as_secs_f64() * 1000.0);
        }
        eprintln!(
            "{backend_name} #{i}: ready {:.0} ms, first guest instruction {:?}, RSS without guest RAM {} KiB ({:?}), guest touched {} KiB, KVM exits {:?}",
            took.as_secs_f64() * 1000.0,
            first_insn,
            figures.vmm_own_rss_kib,
            figures.processes.iter().map(|p| (p.name, p.own_rss_kib())).collect::<Vec<_>>(),
            figures.guest_touched_kib,
            kvm_exits
        );
        if shutdown(&rt, vm.as_mut(), &agent).is_err() {
            vm.stop(Duration::from_secs(2))?;
        }
        drop(vm);
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(json!({
        "backend": backend_name,
        "iterations": iterations,
        "ready_ms": Summary::of(&ready),
        "first_insn_ms": Summary::of(&first),
        "vmm_rss_kib": Summary::of(&rss),
        "guest_touched_kib": Summary::of(&touched),
        "kvm_exits_at_ready": Summary::of(&exits),
    }))
}

/// Exit count of the VM owned by `pid`, from KVM's debugfs (`<pid>-<fd>/exits`): the
/// same counter for both VMMs (crx-vmm also logs its own, from the stats fd).
fn debugfs_exits(pid: u32) -> Option<u64> {
    let prefix = format!("{pid}-");
    std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .find_map(|e| {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                return None;
            }
            std::fs::read_to_string(e.path().join("exits"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

/// Time from the VMM's spawn to its first guest instruction: crx-vmm logs
/// `first_insn_us` (from its own exec); for QEMU, the first KVM_RUN trace stamp minus the
/// spawn time.
fn first_guest_instruction(vm: &dyn Vm, kind: BackendKind) -> Option<Duration> {
    let (spawned_at, log) = vm.vmm_spawn();
    let text = std::fs::read_to_string(log).ok()?;
    match kind {
        BackendKind::CrxVmm => {
            let us = text
                .split("first_insn_us=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?;
            Some(Duration::from_micros(us.parse().ok()?))
        }
        BackendKind::Qemu(_) => {
            // "<pid>@<secs>.<micros>:kvm_vcpu_ioctl cpu_index 0, type 0xae80, arg (nil)"
            let line = text
                .lines()
                .find(|l| l.contains("kvm_vcpu_ioctl") && l.contains("type 0xae80,"))?;
            let stamp = line.split('@').nth(1)?.split(':').next()?;
            let (secs, micros) = stamp.split_once('.')?;
            let at = SystemTime::UNIX_EPOCH
                + Duration::from_secs(secs.parse().ok()?)
                + Duration::from_micros(micros.parse().ok()?);
            at.duration_since(spawned_at).ok()
        }
    }
}

/// Runs on the host: boots one L1 that measures both VMMs, prints the comparison.
pub fn run(iterations: usize) -> Result<Value> {
    use crate::l1::{L1Rig, RunOptions, VmmLane};
    let rig = L1Rig::prepare().context("preparing the nested-KVM L1 rig")?;
    let lane = VmmLane::from_artifacts()?;
    // One VMM that hangs must not cost the other's figures.
    let per_backend_s = 120 + 60 * iterations;
    let script = format!(
        "#!/bin/sh\n\
         # crx-bench vmm: both VMMs, same guest, same L1.\n\
         mount -t debugfs none /sys/kernel/debug 2>/dev/null\n\
         rc=0\n\
         for b in crx-vmm qemu; do\n\
           out=$(timeout {per_backend_s} ./bin/crx-probe vm-bench --backend $b --iterations {iterations} \
--kernel guest/vmlinux --initramfs guest/initramfs.cpio --crx-vmm ./bin/crx-vmm \
--qemu ./qemu/qemu-system-x86_64) || rc=1\n\
           [ -n \"$out\" ] || out=\"{{\\\"backend\\\":\\\"$b\\\",\\\"error\\\":\\\"no result within {per_backend_s} s\\\"}}\"\n\
           echo \"CRX-L1-RESULT $out\"\n\
         done\n\
         exit $rc\n"
    );
    let mut builder = lane.payload(&script)?;
    builder.qemu("qemu")?;
    let payload = builder.build()?;
    println!("crx-bench vmm: {iterations} boots of each VMM inside one nested-KVM L1 (TCG-emulated AMD SVM)");
    let opts = RunOptions {
        timeout: Duration::from_secs(120 + 2 * per_backend_s as u64),
        ..RunOptions::default()
    };
    let l1 = rig
        .run(payload.path(), &opts)
        .context("the L1 benchmark run")?;
    let find = |name: &str| -> Result<&Value> {
        let r = l1
            .results
            .iter()
            .find(|r| r["backend"] == name)
            .with_context(|| {
                format!(
                    "no {name} figures from L1; console:\n{}",
                    l1.console_tail(40)
                )
            })?;
        if let Some(err) = r.get("error") {
            bail!(
                "{name} could not be measured in L1: {err}; console:\n{}",
                l1.console_tail(40)
            );
        }
        Ok(r)
    };
    let (crx, qemu) = (find("crx-vmm")?, find("qemu")?);
    let median = |v: &Value, key: &str| v[key]["median"].as_f64();
    let ratio = |key: &str| Some(median(crx, key)? / median(qemu, key)?);
    println!(
        "level: L2 guest on KVM inside an L1 under QEMU TCG — compare these only with each other"
    );
    for (label, key, unit) in [
        (
            "setup: exec -> first guest instruction",
            "first_insn_ms",
            "ms",
        ),
        ("spawn -> agent health reply", "ready_ms", "ms"),
        ("VMM RSS without guest RAM", "vmm_rss_kib", "KiB"),
        ("guest memory touched at ready", "guest_touched_kib", "KiB"),
        ("KVM exits to ready", "kvm_exits_at_ready", ""),
    ] {
        println!(
            "{label:<42} crx-vmm {:>10.1} {unit:<3} | qemu {:>10.1} {unit:<3} | ratio {:.2}",
            median(crx, key).unwrap_or(f64::NAN),
            median(qemu, key).unwrap_or(f64::NAN),
            ratio(key).unwrap_or(f64::NAN)
        );
    }
    Ok(json!({
        "benchmark": "vmm",
        "level": "L2 on nested KVM inside a TCG-emulated L1",
        "iterations": iterations,
        "guest_memory_mib": GUEST_MEMORY_MIB,
        "crx_vmm": crx,
        "qemu_kvm": qemu,
        "ratios_crx_vmm_over_qemu": {
            "first_insn": ratio("first_insn_ms"),
            "ready": ratio("ready_ms"),
            "vmm_rss": ratio("vmm_rss_kib"),
            "kvm_exits": ratio("kvm_exits_at_ready"),
        },
        "targets": {
            "first_insn_ratio_max": 0.2,
            "ready_ratio_max": 0.7,
            "crx_vmm_rss_mib_max": 5.0,
        },
        "l1_wall_s": l1.wall.as_secs_f64(),
    }))
}

/// For `crx-probe vm-bench`: the in-L1 paths from its arguments.
pub fn paths(kernel: &Path, initramfs: &Path, crx_vmm: &Path, qemu: &Path) -> InL1Paths {
    InL1Paths {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        crx_vmm: crx_vmm.to_path_buf(),
        qemu: qemu.to_path_buf(),
    }
}
