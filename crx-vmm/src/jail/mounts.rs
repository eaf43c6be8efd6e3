//! The jail's file system: a new mount namespace in which the host's mounts are
//! slaves (host changes propagate in, nothing propagates out), a read-only tmpfs
//! root holding the binds of the plan, then `pivot_root` into it and the old root
//! detached.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, chroot, pivot_root};

use super::{JailError, JailPlan};

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Mount { step, source }
}

/// Where `host_path` appears under `root` before the pivot.
fn inside(root: &Path, host_path: &Path) -> PathBuf {
    root.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

const TMPFS_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Builds the root on `root` (an existing absolute directory) from `plan` and makes
/// it the calling thread's root.
pub fn build_and_pivot(root: &Path, plan: &JailPlan) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(step("make / a recursive slave"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        TMPFS_FLAGS,
        Some("mode=0755,size=1m"),
    )
    .map_err(step(format!("mount a tmpfs on {}", root.display())))?;

    for bind in plan.binds() {
        let target = inside(root, &bind.path);
        if bind.is_dir {
            fs::create_dir_all(&target).map_err(|e| JailError::MountPoint(target.clone(), e))?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| JailError::MountPoint(target.clone(), e))?;
            }
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&target)
                .map_err(|e| JailError::MountPoint(target.clone(), e))?;
        }
        // Recursive for directories: mounts under a share come along, and stay
        // slaves of the host's, so later host mounts there propagate in.
        let flags = if bind.is_dir {
            MsFlags::MS_BIND | MsFlags::MS_REC
        } else {
            MsFlags::MS_BIND
        };
        mount(Some(&bind.path), &target, None::<&str>, flags, None::<&str>)
            .map_err(step(format!("bind {}", bind.path.display())))?;
        if bind.read_only {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(step(format!("make {} read-only", bind.path.display())))?;
        }
    }
    if plan.needs_fs_caps() {
        let proc_dir = root.join("proc");
        fs::create_dir_all(&proc_dir).map_err(|e| JailError::MountPoint(proc_dir.clone(), e))?;
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            TMPFS_FLAGS,
            None::<&str>,
        )
        .map_err(step("mount /proc"))?;
    }
    // Nothing is created in the root itself from now on.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | TMPFS_FLAGS,
        None::<&str>,
    )
    .map_err(step("make the jail's root read-only"))?;

    chdir(root).map_err(step(format!("enter {}", root.display())))?;
    match pivot_root(".", ".") {
        // pivot_root(".", ".") stacks the old root on the new one; detaching it
        // leaves the new root alone, with no path back to the host's.
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?,
        // The host's root is the initramfs (rootfs), which has no parent mount and
        // cannot be pivoted away from (e.g. a minimal node or the nested-KVM rig's
        // L1): move the jail's root over it and chroot. The host's root stays under
        // it in this namespace, unreachable without CAP_SYS_CHROOT/CAP_SYS_ADMIN,
        // which are dropped next.
        Err(Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("move the jail's root over the initramfs"))?;
            chroot(".").map_err(step("chroot into the jail"))?;
            tracing::info!("host root is the initramfs: jail entered with a move and chroot");
        }
        Err(e) => return Err(step("pivot_root into the jail")(e)),
    }
    chdir("/").map_err(step("chdir to the jail's root"))?;
    Ok(())
}
