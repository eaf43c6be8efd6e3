//! The shim lane: Debian's containerd and `ctr` drive containerd-shim-crx-v2, whose
//! pods run under crx-vmm on real KVM — the nested KVM of an L1 Linux under TCG, since
//! this host's own KVM (PVM) cannot run guest user space. containerd, ctr and the shim
//! are glibc programs, so they go into L1 with their libraries (tests/l1/bundle-bin.sh);
//! the busybox test image is built here and imported there. One L1 boot runs every case
//! (tests/l1/payloads/shim/run.sh); each test below asserts on one case's result line.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use crx_tests::artifacts::workspace_root;
    use crx_tests::containerd::{build_busybox_image, BUSYBOX_IMAGE};
    use crx_tests::l1::{payload_script, run_lane, L1Run, VmmLane};
    use serde_json::Value;

    /// The release shim (`cargo build --release -p containerd-shim-crx-v2`), or the one
    /// in `$CRX_SHIM_DIR`.
    fn shim_binary() -> Result<PathBuf, String> {
        let dir = std::env::var_os("CRX_SHIM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/release"));
        let bin = dir.join("containerd-shim-crx-v2");
        if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "{} not found: cargo build --release -p containerd-shim-crx-v2 (or set CRX_SHIM_DIR)",
                bin.display()
            ))
        }
    }

    /// Debian's containerd and ctr (scripts/lib.sh install_packages).
    fn containerd_binaries() -> Result<[PathBuf; 2], String> {
        let found = ["/usr/bin/containerd", "/usr/bin/ctr"].map(PathBuf::from);
        for b in &found {
            if !b.is_file() {
                return Err(format!(
                    "{} not found: apt-get install containerd",
                    b.display()
                ));
            }
        }
        Ok(found)
    }

    fn lane_run() -> &'static L1Run {
        static RUN: OnceLock<Result<L1Run, String>> = OnceLock::new();
        let run = RUN.get_or_init(|| {
            let lane = VmmLane::from_artifacts().map_err(|e| format!("{e}"))?;
            let shim = shim_binary()?;
            let [containerd, ctr] = containerd_binaries()?;
            let work = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let image = build_busybox_image(&work.path().join("image"))
                .map_err(|e| format!("building the busybox image: {e:#}"))?;
            let script = payload_script("shim").map_err(|e| format!("{e}"))?;
            let mut builder = lane.payload(&script).map_err(|e| format!("{e}"))?;
            let bins: [&Path; 3] = [&containerd, &ctr, &shim];
            builder
                .bundle("host", &bins)
                .and_then(|b| b.copy(&image, "image/busybox-oci.tar"))
                .and_then(|b| b.write("image-ref", BUSYBOX_IMAGE.as_bytes(), 0o644))
                .map_err(|e| format!("assembling the shim payload: {e}"))?;
            let payload = builder
                .build()
                .map_err(|e| format!("assembling the shim payload: {e}"))?;
            run_lane("shim", payload.path(), None)
        });
        run.as_ref().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The named case's result, which must say ok.
    fn check(name: &str) -> &'static Value {
        lane_run().ok_result(name)
    }

    #[test]
    fn containerd_in_l1_imports_the_busybox_image() {
        let r = check("setup");
        assert_eq!(r["imported"], true, "{r}");
    }

    #[test]
    fn ctr_run_rm_prints_the_output_and_returns_the_exit_code() {
        let r = check("run");
        assert_eq!(r["rc"], 3, "{r}");
        assert_eq!(r["stdout"], "hi", "{r}");
    }

    #[test]
    fn ctr_task_exec_in_a_detached_container_returns_output_and_exit_code() {
        let r = check("exec");
        assert_eq!(r["running"], true, "{r}");
        assert_eq!(r["exec_rc"], 5, "{r}");
        assert_eq!(r["stdout"], "from-exec 42", "{r}");
    }

    #[test]
    fn sigterm_ends_the_task_and_delete_removes_task_and_container() {
        let r = check("kill");
        assert_eq!(r["stopped"], true, "{r}");
        assert_eq!(r["delete_rc"], 0, "{r}");
        assert_eq!(r["container_rm_rc"], 0, "{r}");
        assert_eq!(r["tasks_left"], "", "{r}");
    }

    #[test]
    fn no_vmm_shim_run_dir_or_mount_is_left_after_the_containers_are_gone() {
        let r = check("clean");
        assert_eq!(r["crx_vmm"], "", "{r}");
        assert_eq!(r["shims"], "", "{r}");
        assert_eq!(r["run_crx"], "", "{r}");
        assert_eq!(r["mounts"], "", "{r}");
    }
}
