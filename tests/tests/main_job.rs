//! The README's main job (`scripts/demo.sh` runs `crx-demo` after building everything):
//! a pod through CRI with the `crx` handler prints where it runs, and nothing is left
//! after it. Runs the very binary the README's command runs, on this host's backend.

#[cfg(test)]
mod tests {
    use std::process::Command;

    #[test]
    fn crx_demo_runs_a_pod_through_cri_and_leaves_nothing() {
        let out = Command::new(env!("CARGO_BIN_EXE_crx-demo"))
            .output()
            .expect("spawning crx-demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "crx-demo failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        for wanted in [
            "| hello from a crx pod",
            "| hostname: crx-demo",
            "(the pod VM's own, not the host's)",
            "ExecSync in `sleeper` exited 0",
            "left behind: nothing",
        ] {
            assert!(stdout.contains(wanted), "no {wanted:?} in:\n{stdout}");
        }
        // The guest runs its own kernel: the release it prints is not the host's.
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let guest = stdout
            .lines()
            .find_map(|l| l.split("kernel:").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or_default();
        assert!(
            !guest.is_empty() && guest != host.trim(),
            "guest kernel {guest:?} vs host {:?}",
            host.trim()
        );
    }
}
