//! The host side of a pod's files: the run directory `/run/crx/<sandbox>/`, the pod
//! share inside it (what the guest mounts over virtio-fs) and each container's rootfs
//! mounted into the share. Nothing here ever deletes through a live mount: a tree is
//! removed only once nothing is mounted under it.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
pub use crx_shim::mounts::{mounts_under, unmount_tree};
use nix::mount::{mount, MsFlags};

/// Where every pod's run directory lives.
pub const RUN_ROOT: &str = "/run/crx";
/// The virtio-fs tag of the pod share.
pub const SHARE_TAG: &str = "crxshare";
/// Where the agent mounts the pod share in the guest (under its storage root).
pub const GUEST_SHARE: &str = "/run/crx/storage/share";

/// Why a host mount step failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot create {path:?}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount {what} on {target:?}: {message}")]
    Mount {
        what: String,
        target: PathBuf,
        message: String,
    },
    #[error("cannot remove {path:?}: {reason}")]
    Remove { path: PathBuf, reason: String },
}

/// The paths of one pod.
#[derive(Clone, Debug)]
pub struct PodPaths {
    pub root: PathBuf,
}

impl PodPaths {
    pub fn new(sandbox_id: &str) -> Self {
        PodPaths {
            root: Path::new(RUN_ROOT).join(sandbox_id),
        }
    }

    pub fn share(&self) -> PathBuf {
        self.root.join("share")
    }

    /// A container's directory in the share; its rootfs is `<dir>/rootfs`.
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.share().join(container_id)
    }

    pub fn container_rootfs(&self, container_id: &str) -> PathBuf {
        self.container_dir(container_id).join("rootfs")
    }

    /// Records the pid of the shim that owns this pod (read by `delete`).
    pub fn shim_pid_file(&self) -> PathBuf {
        self.root.join("shim.pid")
    }
}

/// The guest path of a container's rootfs.
pub fn guest_rootfs(container_id: &str) -> String {
    format!("{GUEST_SHARE}/{container_id}/rootfs")
}

fn mkdir(path: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(|source| RootfsError::Mkdir {
        path: path.to_path_buf(),
        source,
    })
}

fn mount_err(what: &str, target: &Path, e: impl std::fmt::Display) -> RootfsError {
    RootfsError::Mount {
        what: what.to_owned(),
        target: target.to_path_buf(),
        message: e.to_string(),
    }
}

/// Creates the share and makes it a shared mount point of its own, so container
/// rootfs mounted later propagate into a jailed VMM's mount namespace.
pub fn prepare_share(paths: &PodPaths) -> Result<(), RootfsError> {
    let share = paths.share();
    mkdir(&share)?;
    if !mounts_under(&share).iter().any(|m| m == &share) {
        mount(
            Some(&share),
            &share,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| mount_err("the pod share (bind)", &share, e))?;
    }
    mount(
        None::<&str>,
        &share,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| mount_err("the pod share (make shared)", &share, e))
}

/// Mounts containerd's rootfs mounts (in order) on `<share>/<container>/rootfs`; with
/// no mounts, bind-mounts the bundle's own `rootfs` directory.
pub fn mount_container_rootfs(
    paths: &PodPaths,
    container_id: &str,
    mounts: &[Mount],
    bundle: &Path,
) -> Result<PathBuf, RootfsError> {
    let target = paths.container_rootfs(container_id);
    mkdir(&target)?;
    if mounts.is_empty() {
        let source = bundle.join("rootfs");
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| mount_err(&format!("bundle rootfs {source:?}"), &target, e))?;
        return Ok(target);
    }
    for m in mounts {
        let result = containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            &target,
        );
        if let Err(e) = result {
            let err = mount_err(&format!("{} {:?}", m.type_, m.source), &target, e);
            unmount_tree(&target);
            return Err(err);
        }
    }
    Ok(target)
}

/// Binds each host path into `<share>/<container>/mounts/<index>` (a file for a
/// file, a directory otherwise); returns `(index, guest path)` for the spec. On
/// error what was bound stays for the container's clean-up (`remove_tree`).
pub fn bind_into_share(
    paths: &PodPaths,
    container_id: &str,
    binds: &[crate::translate::HostBind],
) -> Result<Vec<(usize, String)>, RootfsError> {
    let dir = paths.container_dir(container_id).join("mounts");
    let mut out = Vec::with_capacity(binds.len());
    for b in binds {
        let target = dir.join(b.index.to_string());
        mkdir(&dir)?;
        if b.source.is_dir() {
            mkdir(&target)?;
        } else {
            std::fs::File::create(&target).map_err(|source| RootfsError::Mkdir {
                path: target.clone(),
                source,
            })?;
        }
        if b.read_only {
            bind_read_only(paths, container_id, b, &target)?;
        } else {
            mount(
                Some(&b.source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| mount_err(&format!("host path {:?}", b.source), &target, e))?;
        }
        out.push((
            b.index,
            format!("{GUEST_SHARE}/{container_id}/mounts/{}", b.index),
        ));
    }
    Ok(out)
}

/// Binds `b.source` on `target` read-only. The bind is made read-only before it
/// enters the share: the share propagates into the VMM's jail when the bind is
/// made, and a later remount would not follow it there, leaving the copy the
/// virtio-fs server uses writable. So: bind into a staging spot outside the share,
/// remount that (and every mount under it) read-only, bind it into the share (a
/// bind copies the read-only flag), drop the staging mount.
fn bind_read_only(
    paths: &PodPaths,
    container_id: &str,
    b: &crate::translate::HostBind,
    target: &Path,
) -> Result<(), RootfsError> {
    let staging_dir = paths.root.join("staging");
    mkdir(&staging_dir)?;
    let staging = staging_dir.join(format!("{container_id}-{}", b.index));
    if b.source.is_dir() {
        mkdir(&staging)?;
    } else {
        std::fs::File::create(&staging).map_err(|source| RootfsError::Mkdir {
            path: staging.clone(),
            source,
        })?;
    }
    let staged = stage_read_only(&b.source, &staging).and_then(|()| {
        mount(
            Some(&staging),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| mount_err(&format!("read-only host path {:?}", b.source), target, e))
    });
    let left = unmount_tree(&staging);
    if left.is_empty() {
        let _ = std::fs::remove_dir(&staging).or_else(|_| std::fs::remove_file(&staging));
    } else {
        tracing::warn!(?left, "staging mounts left (removed with the pod)");
    }
    staged
}

/// Binds `source` on `staging` and makes it and every mount under it read-only.
fn stage_read_only(source: &Path, staging: &Path) -> Result<(), RootfsError> {
    let what = format!("host path {source:?}");
    mount(
        Some(source),
        staging,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| mount_err(&what, staging, e))?;
    for m in mounts_under(staging) {
        mount(
            None::<&str>,
            &m,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(&m),
            None::<&str>,
        )
        .map_err(|e| mount_err(&format!("{what} (read-only remount)"), &m, e))?;
    }
    Ok(())
}

/// The per-mount flags of `m` a bind remount must repeat, or it would clear them
/// (a read-only copy of a `nosuid,nodev,noexec` mount stays so).
fn kept_flags(m: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let Ok(stat) = statvfs(m) else {
        return MsFlags::empty();
    };
    let have = stat.flags();
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| have.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

/// Unmounts everything under `dir`, then removes it; refuses to remove anything while
/// a mount is left (deleting through it would destroy a container's files).
pub fn remove_tree(dir: &Path) -> Result<(), RootfsError> {
    if !dir.exists() {
        return Ok(());
    }
    let left = unmount_tree(dir);
    if !left.is_empty() {
        return Err(RootfsError::Remove {
            path: dir.to_path_buf(),
            reason: format!("still mounted: {left:?}"),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RootfsError::Remove {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_with_a_mount_is_unmounted_before_removal() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let tgt = dir.path().join("tree/mnt");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&tgt).unwrap();
        std::fs::write(src.join("keep"), "precious").unwrap();
        mount(
            Some(&src),
            &tgt,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert_eq!(mounts_under(&dir.path().join("tree")), vec![tgt.clone()]);
        remove_tree(&dir.path().join("tree")).unwrap();
        assert!(!dir.path().join("tree").exists());
        // The bind source kept its file: removal went through no mount.
        assert_eq!(
            std::fs::read_to_string(src.join("keep")).unwrap(),
            "precious"
        );
    }

    #[test]
    fn host_binds_land_in_the_share_and_go_with_it() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("hosts"), "127.0.0.1 pod\n").unwrap();
        std::fs::create_dir(src.path().join("vol")).unwrap();
        std::fs::write(src.path().join("vol/data"), "v").unwrap();
        let paths = PodPaths::new(&format!("crx-unit-bind-{}", std::process::id()));
        let binds = [
            crate::translate::HostBind {
                index: 3,
                source: src.path().join("hosts"),
                read_only: false,
            },
            crate::translate::HostBind {
                index: 5,
                source: src.path().join("vol"),
                read_only: false,
            },
        ];
        let guest = bind_into_share(&paths, "c1", &binds).unwrap();
        assert_eq!(
            guest[0],
            (3, "/run/crx/storage/share/c1/mounts/3".to_string())
        );
        let mounts = paths.container_dir("c1").join("mounts");
        assert_eq!(
            std::fs::read_to_string(mounts.join("3")).unwrap(),
            "127.0.0.1 pod\n"
        );
        assert_eq!(std::fs::read_to_string(mounts.join("5/data")).unwrap(), "v");
        let missing = [crate::translate::HostBind {
            index: 0,
            source: "/nonexistent/x".into(),
            read_only: false,
        }];
        let err = bind_into_share(&paths, "c2", &missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"), "{err}");
        remove_tree(&paths.root).unwrap();
        assert!(!paths.root.exists());
        assert_eq!(
            std::fs::read_to_string(src.path().join("vol/data")).unwrap(),
            "v"
        );
    }

    #[test]
    fn read_only_binds_are_read_only_on_the_host_and_leave_no_staging() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("vol")).unwrap();
        std::fs::write(src.path().join("vol/data"), "v").unwrap();
        std::fs::write(src.path().join("token"), "t").unwrap();
        let paths = PodPaths::new(&format!("crx-unit-robind-{}", std::process::id()));
        let binds = [
            crate::translate::HostBind {
                index: 0,
                source: src.path().join("vol"),
                read_only: true,
            },
            crate::translate::HostBind {
                index: 1,
                source: src.path().join("token"),
                read_only: true,
            },
        ];
        bind_into_share(&paths, "c1", &binds).unwrap();
        let mounts = paths.container_dir("c1").join("mounts");
        assert_eq!(std::fs::read_to_string(mounts.join("0/data")).unwrap(), "v");
        let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
        assert_eq!(
            erofs(std::fs::write(mounts.join("0/new"), "x")),
            Some(libc::EROFS)
        );
        assert_eq!(
            erofs(std::fs::write(mounts.join("1"), "x")),
            Some(libc::EROFS)
        );
        // Only the share's copy is read-only; the host's own path is not.
        std::fs::write(src.path().join("vol/new"), "x").unwrap();
        assert!(mounts_under(&paths.root.join("staging")).is_empty());
        remove_tree(&paths.root).unwrap();
        assert_eq!(
            std::fs::read_to_string(src.path().join("token")).unwrap(),
            "t"
        );
    }

    #[test]
    fn guest_paths_live_under_the_share() {
        assert_eq!(guest_rootfs("c1"), "/run/crx/storage/share/c1/rootfs");
        let p = PodPaths::new("pod1");
        assert_eq!(
            p.container_rootfs("c1"),
            Path::new("/run/crx/pod1/share/c1/rootfs")
        );
    }
}
