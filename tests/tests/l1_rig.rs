//! The nested-KVM rig works: an L1 Linux under QEMU TCG offers a working `/dev/kvm`
//! (the static kvm-check runs a guest on it), QEMU microvm on that KVM boots a Linux L2
//! to user space, and an L1 that cannot load kvm-amd says so. Two L1 boots in all, one at
//! a time (each is a TCG-emulated machine on a 2-core host): the two smoke tests share
//! one. Nothing is skipped: a host without qemu, without the L1 kernel or whose L1 cannot
//! offer /dev/kvm fails with the step that failed.

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use crx_tests::l1::{kvm_smoke_payload, L1Error, L1Rig, L1Run, RunOptions};

    /// One L1 at a time: two TCG machines on a 2-core host would distort each other's
    /// timings and double the wall time of both.
    static L1_BOOT: Mutex<()> = Mutex::new(());

    fn smoke_run() -> &'static L1Run {
        static RUN: OnceLock<Result<L1Run, String>> = OnceLock::new();
        let run = RUN.get_or_init(|| {
            let rig = L1Rig::prepare().map_err(|e| format!("preparing the L1 rig: {e}"))?;
            let payload = kvm_smoke_payload(&rig.debian_kernel())
                .map_err(|e| format!("assembling the smoke payload: {e}"))?;
            let _one_l1 = L1_BOOT
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let opts = RunOptions {
                timeout: Duration::from_secs(400),
                ..RunOptions::default()
            };
            let run = rig.run(payload.path(), &opts).map_err(|e| format!("{e}"))?;
            eprintln!(
                "L1 rig: rc {} in {:.1} s wall; L1 ready {:?}; results {}",
                run.rc,
                run.wall.as_secs_f64(),
                run.ready,
                serde_json::Value::from(run.results.clone())
            );
            Ok(run)
        });
        match run {
            Ok(run) => run,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn l1_offers_a_dev_kvm_that_runs_a_guest() {
        let run = smoke_run();
        let ready = run.ready.unwrap_or_else(|| {
            panic!(
                "L1 never reported /dev/kvm ready:\n{}",
                run.console_tail(30)
            )
        });
        assert!(
            ready.kvm_s >= ready.init_s,
            "kvm ready before /init? {ready:?}"
        );
        let kvm = run
            .result("kvm")
            .unwrap_or_else(|| panic!("kvm-check printed no result:\n{}", run.console_tail(30)));
        assert_eq!(kvm["api_version"], 12, "KVM_GET_API_VERSION in L1: {kvm}");
        assert_eq!(
            kvm["io_exits"], kvm["expected_io_exits"],
            "the test guest's port writes did not all exit to us: {kvm}"
        );
        assert_eq!(kvm["ok"], true, "{kvm}");
        // The idle vCPU that keeps L2 boots from patching L1's KVM text (kvm-hold.c).
        assert!(
            run.console.lines().any(|l| l.trim() == "CRX-L1-KVM-HOLD ok"),
            "kvm-hold did not report ok:\n{}",
            run.console_tail(30)
        );
    }

    #[test]
    fn l1_kvm_boots_a_linux_l2_to_user_space() {
        let run = smoke_run();
        let l2 = run
            .result("l2")
            .unwrap_or_else(|| panic!("the L2 check printed no result:\n{}", run.console_tail(30)));
        assert_eq!(
            l2["ok"],
            true,
            "L2 did not reach user space on L1's KVM: {l2}\n{}",
            run.console_tail(30)
        );
        assert!(
            l2["l2_to_userspace_s"].as_f64().is_some_and(|s| s > 0.0),
            "{l2}"
        );
        assert_eq!(
            run.rc,
            0,
            "the smoke payload failed:\n{}",
            run.console_tail(30)
        );
    }

    #[test]
    fn a_missing_qemu_is_named_without_booting() {
        let rig = L1Rig::cached()
            .or_else(|_| L1Rig::prepare())
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("run.sh");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let opts = RunOptions {
            qemu: Some("/nonexistent/qemu-system-x86_64".into()),
            ..RunOptions::default()
        };
        let err = rig.run(dir.path(), &opts).expect_err("ran without qemu");
        let msg = err.to_string();
        assert!(
            msg.contains("qemu-system-x86_64 not found"),
            "unclear error: {msg}"
        );
    }

    #[test]
    fn an_l1_without_kvm_says_which_module_failed() {
        let rig = L1Rig::cached()
            .or_else(|_| L1Rig::prepare())
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\necho payload ran\nexit 0\n").expect("run.sh");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        // The kernel refuses a blacklisted module, as it would one built for another kernel.
        let opts = RunOptions {
            append: Some("module_blacklist=kvm_amd".into()),
            timeout: Duration::from_secs(120),
            ..RunOptions::default()
        };
        let _one_l1 = L1_BOOT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match rig.run(dir.path(), &opts) {
            Err(L1Error::KvmUnavailable {
                reason,
                console_tail,
            }) => {
                assert!(
                    reason.contains("kvm-amd.ko"),
                    "reason does not name the module: {reason}"
                );
                assert!(
                    !console_tail.contains("payload ran"),
                    "the payload ran without /dev/kvm"
                );
            }
            other => panic!("expected KvmUnavailable, got {other:?}"),
        }
    }
}
