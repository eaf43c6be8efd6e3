//! The `delete` action: containerd runs `containerd-shim-crx-v2 delete` in a bundle
//! after the shim is gone (or when it never answered) and expects every host resource
//! of that task to be released. Idempotent: a second run finds nothing and succeeds.
//!
//! If the pod's shim still runs (other containers of the pod live on), only this
//! container's rootfs is unmounted from the share. If it does not, the whole pod is
//! released: any VM process still mentioning the pod's run directory is killed, the
//! pod's host cgroup (recorded in the run directory) is removed, and every mount and
//! file under `/run/crx/<sandbox>` is removed.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::bundle;
use crate::host_cgroup;
use crate::rootfs::{self, PodPaths};

/// Releases what the task `id` of `bundle` held. Errors name what is left.
pub fn delete_action(bundle_dir: &Path, id: &str) -> Result<(), String> {
    bundle::check_id("container id", id).map_err(|e| e.to_string())?;
    let sandbox = match bundle::read_spec(bundle_dir) {
        Ok(spec) => bundle::sandbox_id(&spec, id).map_err(|e| e.to_string())?,
        // The bundle may already be half gone: fall back to the container's own pod.
        Err(e) => {
            tracing::warn!(error = %e, "no readable spec in the bundle; assuming a pod of its own");
            id.to_owned()
        }
    };
    let paths = PodPaths::new(&sandbox);
    if shim_alive(&paths) {
        tracing::info!(%sandbox, container = id, "pod shim still running: releasing only this container");
        return rootfs::remove_tree(&paths.container_dir(id)).map_err(|e| e.to_string());
    }
    let released = release_pod(&paths);
    // After the VM processes are gone: none of them may still hold the socket.
    remove_stale_shim_socket(bundle_dir);
    released
}

/// Kills what is left of a pod whose shim is gone and removes its run directory.
pub fn release_pod(paths: &PodPaths) -> Result<(), String> {
    // With the trailing slash, pod "a" does not match pod "ab".
    let needle = format!("{}/", paths.root.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("VM processes of {needle} would not die: {left:?}"));
        }
        for pid in left {
            tracing::warn!(pid, "killing a VM process the dead shim left");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // After the VM's processes: a cgroup holding one cannot be removed. Read from the
    // run directory, so before it goes.
    host_cgroup::remove_recorded(&paths.root).map_err(|e| e.to_string())?;
    rootfs::remove_tree(&paths.root).map_err(|e| e.to_string())
}

/// A killed shim leaves its ttrpc socket (named in the bundle's `address` file) behind;
/// it goes once nothing answers on it. A live one (a grouped pod's shim) stays.
fn remove_stale_shim_socket(bundle_dir: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle_dir.join("address")) else {
        return;
    };
    let Some(path) = address.trim().strip_prefix("unix://").map(Path::new) else {
        return;
    };
    if !path.starts_with(containerd_shim::SOCKET_ROOT) {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => tracing::info!(?path, "shim socket still served: kept"),
        Err(_) => {
            tracing::info!(?path, "removing the dead shim's socket");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// True when the pid in the pod's `shim.pid` is a live crx shim other than us.
fn shim_alive(paths: &PodPaths) -> bool {
    let Ok(text) = std::fs::read_to_string(paths.shim_pid_file()) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("containerd-shim-crx-v2"))
}

/// Pids (other than ours) whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            if let Ok(pid) = i32::try_from(pid) {
                found.push(pid);
            }
        }
    }
    found
}
