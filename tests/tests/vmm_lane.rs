//! The crx-vmm VM lane: crx-vmm boots the crx guest kernel and agent on real KVM — the
//! nested KVM of an L1 Linux under TCG, since this host's own KVM (PVM) cannot run guest
//! user space — and the agent answers over hybrid vsock. One L1 boot runs four L2 boots
//! (tests/l1/payloads/vmm-lane/run.sh); each test below asserts on one of them.

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use crx_tests::l1::{payload_script, run_lane, L1Run, VmmLane};
    use serde_json::Value;

    fn lane_run() -> &'static L1Run {
        static RUN: OnceLock<Result<L1Run, String>> = OnceLock::new();
        let run = RUN.get_or_init(|| {
            let lane = VmmLane::from_artifacts().map_err(|e| format!("{e}"))?;
            let script = payload_script("vmm-lane").map_err(|e| format!("{e}"))?;
            let payload = lane
                .payload(&script)
                .and_then(|b| b.build())
                .map_err(|e| format!("assembling the vmm-lane payload: {e}"))?;
            run_lane("vmm", payload.path(), None)
        });
        run.as_ref().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The named check's result, which must say ok.
    fn check(name: &str) -> &'static Value {
        lane_run().ok_result(name)
    }

    #[test]
    fn boots_answers_health_over_hybrid_vsock_and_powers_off_cleanly() {
        let r = check("health-1vcpu");
        assert_eq!(r["vmm_rc"], 0, "{r}");
        assert_eq!(
            r["health"]["protocol_version"],
            crx_protocols::PROTOCOL_VERSION,
            "{r}"
        );
        assert_eq!(r["procs_left"], 0, "{r}");
        // The boot marker reached crx-vmm: it logged the agent's ready time and exits.
        assert!(
            r["ready_us"].as_u64().is_some_and(|us| us > 0),
            "crx-vmm logged no ready_us: {r}"
        );
        assert!(
            r["first_insn_us"].as_u64().is_some_and(|us| us > 0),
            "crx-vmm logged no first_insn_us: {r}"
        );
    }

    #[test]
    fn guest_connection_reaches_the_host_port_socket_with_two_vcpus() {
        let r = check("connect-2vcpu");
        assert_eq!(r["online_cpus"], 2, "{r}");
        let first_line = r["listen"]["line"].as_str().unwrap_or_default();
        assert!(
            !first_line.trim().is_empty(),
            "the guest's connection carried no line: {r}"
        );
    }

    #[test]
    fn sigterm_stops_crx_vmm_cleanly_and_leaves_nothing() {
        let r = check("sigterm");
        assert_eq!(r["vmm_rc"], 0, "{r}");
        assert_eq!(r["socket_left"], false, "{r}");
        assert_eq!(r["procs_left"], 0, "{r}");
    }

    #[test]
    fn sigkill_leaves_no_socket_and_no_process() {
        let r = check("sigkill");
        assert_eq!(r["vmm_rc"], 137, "{r}");
        assert_eq!(r["socket_gone"], true, "{r}");
        assert_eq!(r["procs_left"], 0, "{r}");
    }
}
