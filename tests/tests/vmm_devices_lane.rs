//! The crx-vmm devices lane: crx-vmm on real KVM (the nested KVM of an L1 Linux under
//! TCG; this host's own KVM, PVM, cannot run guest user space) boots the crx guest
//! kernel with a busybox test guest and the pod devices — three virtio-blk drives
//! (read-write, read-only, an empty slot), a virtio-fs share and virtio-net on a tap in
//! a network namespace of L1 — and checks each from the guest's side, with crx-vmm's
//! seccomp filters on. One L1 boot, one L2 boot (tests/l1/payloads/devices/run.sh drives
//! it); each test below asserts on one check's result line.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    use crx_tests::artifacts::workspace_root;
    use crx_tests::l1::{payload_script, run_lane, L1Run, VmmLane};
    use serde_json::Value;

    fn payload_dir() -> PathBuf {
        workspace_root().join("tests/l1/payloads/devices")
    }

    /// `gcc -static` of the payload's tap helper (busybox cannot create a tap with a
    /// vnet header), into `out`.
    fn build_tap_exec(out: &Path) -> Result<PathBuf, String> {
        let bin = out.join("tap-exec");
        let status = Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&bin)
            .arg(payload_dir().join("tap-exec.c"))
            .status()
            .map_err(|e| format!("gcc (apt-get install gcc libc6-dev): {e}"))?;
        if !status.success() {
            return Err(format!("gcc -static tap-exec.c failed: {status}"));
        }
        Ok(bin)
    }

    fn lane_run() -> &'static L1Run {
        static RUN: OnceLock<Result<L1Run, String>> = OnceLock::new();
        let run = RUN.get_or_init(|| {
            let lane = VmmLane::from_artifacts().map_err(|e| format!("{e}"))?;
            let guest_script = std::fs::read_to_string(payload_dir().join("guest-init.sh"))
                .map_err(|e| format!("reading guest-init.sh: {e}"))?;
            let guest = crx_tests::test_guest::initramfs("devices-lane", &guest_script, &[])
                .map_err(|e| format!("building the test guest: {e:#}"))?;
            let tools = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let tap_exec = build_tap_exec(tools.path())?;
            let script = payload_script("devices").map_err(|e| format!("{e}"))?;
            let mut builder = lane.payload(&script).map_err(|e| format!("{e}"))?;
            builder
                .copy(&guest, "guest/devices.cpio")
                .and_then(|b| b.copy(&tap_exec, "bin/tap-exec"))
                .and_then(|b| b.extra_modules())
                .map_err(|e| format!("assembling the devices payload: {e}"))?;
            let payload = builder
                .build()
                .map_err(|e| format!("assembling the devices payload: {e}"))?;
            run_lane("devices", payload.path(), Some("audit=1"))
        });
        run.as_ref().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The named check's result, which must say ok.
    fn check(name: &str) -> &'static Value {
        lane_run().ok_result(name)
    }

    #[test]
    fn crx_vmm_boots_the_guest_with_every_pod_device() {
        let r = check("boot");
        assert_eq!(r["share"], 1, "crx-vmm refused --share: {r}");
        assert_eq!(r["net"], 1, "crx-vmm refused --net: {r}");
    }

    #[test]
    fn flushed_block_writes_survive_kill_9_of_crx_vmm() {
        let r = check("blk-flush-kill");
        assert_eq!(r["killed"], true, "{r}");
        assert_eq!(r["vmm_rc"], 137, "{r}");
        assert_eq!(
            r["api_socket_gone"], true,
            "the cleaner removes the API socket: {r}"
        );
        assert_eq!(r["procs_left"], 0, "{r}");
    }

    #[test]
    fn read_only_drive_refuses_guest_writes() {
        let r = check("blk-ro");
        assert_eq!(r["ro_flag"], "1", "the guest saw VIRTIO_BLK_F_RO: {r}");
        assert_eq!(r["host_content"], "CRX-READ-ONLY-OK", "{r}");
    }

    #[test]
    fn empty_slot_attached_through_the_api_socket_is_usable_in_the_guest() {
        let r = check("blk-attach");
        assert_eq!(r["attach_rc"], 0, "{r}");
        assert_eq!(r["size_after"], "4096", "capacity change seen: {r}");
        assert_eq!(r["data"], "CRX-ATTACHED-VOL", "{r}");
    }

    #[test]
    fn virtio_fs_files_written_on_either_side_are_seen_by_the_other() {
        let r = check("fs");
        assert_eq!(r["offered"], 1, "crx-vmm refused --share: {r}");
    }

    #[test]
    fn every_device_ran_inside_its_threads_seccomp_filter() {
        let r = check("seccomp");
        assert_eq!(r["outside_filters"], "", "{r}");
    }

    #[test]
    fn virtio_net_carries_tcp_between_guest_and_l1_both_ways() {
        let r = check("net");
        assert_eq!(r["offered"], 1, "crx-vmm refused --net: {r}");
        assert_eq!(r["mtu"], "1500", "{r}");
        assert_eq!(r["mac"], "52:54:00:12:34:56", "{r}");
    }
}
