//! Why the VM ended, and what crx-vmm's exit code and last line say about it.
//!
//! Exit codes (stable; the shim relies on them):
//!
//! | code | meaning |
//! |---|---|
//! | 0  | the guest shut down cleanly (boot marker "shutdown" then reset), or the host stopped crx-vmm with SIGTERM/SIGINT |
//! | 1  | crx-vmm itself failed while running (a host-side error) |
//! | 2  | bad input: command line, kernel, initramfs, memory or vCPU count, socket path |
//! | 3  | this host's KVM is PVM, which cannot run a stock Linux guest's user space (use `--allow-pvm` to boot anyway) |
//! | 4  | KVM unusable: no `/dev/kvm`, no permission, or a required capability is missing |
//! | 10 | the guest reset without announcing a clean shutdown: kernel panic or unexpected reboot |
//! | 11 | the guest triple-faulted |
//! | 12 | KVM could not run the guest: internal error (e.g. emulation failure), failed entry, unexpected exit |

pub const EXIT_OK: i32 = 0;
pub const EXIT_VMM_ERROR: i32 = 1;
pub const EXIT_BAD_INPUT: i32 = 2;
pub const EXIT_PVM: i32 = 3;
pub const EXIT_NO_KVM: i32 = 4;
pub const EXIT_GUEST_RESET: i32 = 10;
pub const EXIT_TRIPLE_FAULT: i32 = 11;
pub const EXIT_KVM_FAILURE: i32 = 12;

/// `KVM_SYSTEM_EVENT_*` types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// What ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest pulsed the reset line through the i8042 (0xFE to port 0x64).
    I8042Reset,
    /// KVM_EXIT_SHUTDOWN: a triple fault (or a reset that went through one).
    Shutdown { vcpu: u8 },
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent { vcpu: u8, kind: u32 },
    /// KVM_EXIT_HLT: only without an in-kernel irqchip, i.e. never for a crx VM.
    Halt { vcpu: u8 },
    /// KVM_EXIT_INTERNAL_ERROR (`suberror` 1 is an emulation failure).
    InternalError { vcpu: u8, suberror: u32 },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry { vcpu: u8, reason: u64 },
    /// A KVM exit crx-vmm does not handle.
    UnexpectedExit { vcpu: u8, exit: String },
    /// KVM_RUN itself failed.
    RunFailed { vcpu: u8, error: String },
    /// The host asked crx-vmm to stop.
    HostSignal(i32),
}

/// How crx-vmm ends for a given [`VmEnd`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub message: String,
}

const SEE_CONSOLE: &str = "run with --serial log to see the guest console";

/// The exit code and final message for `end`; `clean_shutdown` is whether the guest
/// announced a clean shutdown on the boot-marker port first.
pub fn outcome(end: &VmEnd, clean_shutdown: bool) -> Outcome {
    let guest_reset = |how: &str| {
        if clean_shutdown {
            Outcome {
                code: EXIT_OK,
                message: format!("guest shut down cleanly ({how})"),
            }
        } else {
            Outcome {
                code: EXIT_GUEST_RESET,
                message: format!(
                    "guest reset ({how}) without announcing a clean shutdown: kernel panic or unexpected reboot; {SEE_CONSOLE}"
                ),
            }
        }
    };
    match end {
        VmEnd::I8042Reset => guest_reset("i8042 reset"),
        VmEnd::SystemEvent { kind: SYSTEM_EVENT_RESET, .. } => guest_reset("system reset"),
        VmEnd::SystemEvent { kind: SYSTEM_EVENT_SHUTDOWN, .. } => guest_reset("power off"),
        VmEnd::Shutdown { vcpu } if !clean_shutdown => Outcome {
            code: EXIT_TRIPLE_FAULT,
            message: format!("guest triple-faulted on vCPU {vcpu} (KVM_EXIT_SHUTDOWN); {SEE_CONSOLE}"),
        },
        VmEnd::Shutdown { .. } => guest_reset("shutdown exit"),
        VmEnd::SystemEvent { vcpu, kind: SYSTEM_EVENT_CRASH } => Outcome {
            code: EXIT_GUEST_RESET,
            message: format!("guest reported a crash on vCPU {vcpu}; {SEE_CONSOLE}"),
        },
        VmEnd::SystemEvent { vcpu, kind } => Outcome {
            code: EXIT_KVM_FAILURE,
            message: format!("unknown KVM system event {kind} on vCPU {vcpu}"),
        },
        VmEnd::Halt { vcpu } => Outcome {
            code: EXIT_KVM_FAILURE,
            message: format!("vCPU {vcpu} halted with no in-kernel irqchip to wake it"),
        },
        VmEnd::InternalError { vcpu, suberror } => Outcome {
            code: EXIT_KVM_FAILURE,
            message: format!(
                "KVM internal error on vCPU {vcpu} (suberror {suberror}{}): KVM could not run the guest; {SEE_CONSOLE}",
                if *suberror == 1 { ", emulation failure" } else { "" }
            ),
        },
        VmEnd::FailEntry { vcpu, reason } => Outcome {
            code: EXIT_KVM_FAILURE,
            message: format!("KVM failed to enter the guest on vCPU {vcpu} (hardware reason {reason:#x})"),
        },
        VmEnd::UnexpectedExit { vcpu, exit } => Outcome {
            code: EXIT_KVM_FAILURE,
            message: format!("unexpected KVM exit {exit} on vCPU {vcpu}"),
        },
        VmEnd::RunFailed { vcpu, error } => Outcome {
            code: EXIT_VMM_ERROR,
            message: format!("KVM_RUN failed on vCPU {vcpu}: {error}"),
        },
        VmEnd::HostSignal(sig) => Outcome {
            code: EXIT_OK,
            message: format!("stopped by the host (signal {sig})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_clean_only_after_the_shutdown_marker() {
        assert_eq!(outcome(&VmEnd::I8042Reset, true).code, EXIT_OK);
        let o = outcome(&VmEnd::I8042Reset, false);
        assert_eq!(o.code, EXIT_GUEST_RESET);
        assert!(o.message.contains("kernel panic"), "{}", o.message);
        assert!(o.message.contains("--serial log"), "{}", o.message);
    }

    #[test]
    fn triple_fault_and_kvm_failures_are_distinct_non_zero_codes() {
        assert_eq!(
            outcome(&VmEnd::Shutdown { vcpu: 0 }, false).code,
            EXIT_TRIPLE_FAULT
        );
        assert_eq!(outcome(&VmEnd::Shutdown { vcpu: 0 }, true).code, EXIT_OK);
        let o = outcome(
            &VmEnd::InternalError {
                vcpu: 1,
                suberror: 1,
            },
            true,
        );
        assert_eq!(o.code, EXIT_KVM_FAILURE);
        assert!(o.message.contains("emulation failure"));
        assert_eq!(
            outcome(&VmEnd::FailEntry { vcpu: 0, reason: 7 }, false).code,
            EXIT_KVM_FAILURE
        );
        assert_eq!(outcome(&VmEnd::HostSignal(15), false).code, EXIT_OK);
        assert_eq!(
            outcome(&VmEnd::SystemEvent { vcpu: 0, kind: 2 }, false).code,
            EXIT_GUEST_RESET
        );
    }
}
