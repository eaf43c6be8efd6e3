//! containerd-shim-crx-v2: containerd's task API v2 for crx pods. One shim process and
//! one VM per pod: the sandbox's first task boots the VM, later tasks of the same pod
//! join it (grouping by `io.kubernetes.cri.sandbox-id`), the last task's delete stops it.
//!
//! Built on `containerd-shim` 0.11 (its async flavour: the agent's ttrpc clients are
//! async, so the task service calls them directly without a bridge to blocking code).

mod block_slots;
mod bundle;
mod cleanup;
mod host_cgroup;
mod lifecycle;
mod logging;
mod pod;
mod pod_spec;
mod process;
mod rootfs;
mod rpc;
mod stdio;
mod task;
mod translate;
mod vm_watch;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.crx.v2";

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // Logs go through `tracing` to the bundle's `log` FIFO (see `logging`).
        no_setup_logger: true,
        // The VM backends wait for their own children; containerd-shim's reaper would
        // take their exit statuses first.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<lifecycle::CrxShim>(RUNTIME_ID, Some(config)).await;
}
