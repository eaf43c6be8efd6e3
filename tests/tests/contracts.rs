//! Values the agent and the VMMs must agree on but that live in two crates: the VMM
//! does not depend on the agent protocol, so this crate, which links both, keeps them
//! in step.

#[cfg(test)]
mod tests {
    use crx_protocols::boot_marker;
    use crx_vmm::arch::x86_64::layout::BOOT_MARKER_PORT;
    use crx_vmm::devices::legacy::boot_marker::{MARKER_READY, MARKER_SHUTDOWN};

    #[test]
    fn boot_marker_port_and_values_match_between_agent_and_crx_vmm() {
        assert_eq!(boot_marker::PORT, BOOT_MARKER_PORT);
        assert_eq!(boot_marker::AGENT_READY, MARKER_READY);
        assert_eq!(boot_marker::CLEAN_SHUTDOWN, MARKER_SHUTDOWN);
    }
}
