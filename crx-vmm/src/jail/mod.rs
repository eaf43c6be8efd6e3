//! `--jail DIR`: crx-vmm runs in a mount namespace of its own whose root is a tmpfs
//! on DIR holding only what the VM needs, with the capabilities it does not need
//! dropped, no_new_privs set and optionally another uid/gid.
//!
//! Entered in `main` after the configuration is validated, `/dev/kvm` is opened and
//! the host is classified, and before any thread starts (mount namespace, root and
//! capabilities are per thread; every later thread inherits them). The cleanup
//! process was forked earlier and stays outside, so it still removes the sockets on
//! the host. The jail's mounts die with the namespace, i.e. with the process.
//!
//! Inside, at the same absolute paths as on the host: the kernel and initramfs
//! (read-only), each drive's backing (read-only if the drive is), the directories of
//! the vsock socket, the API socket and the serial log file (so the host sees the
//! files crx-vmm creates there), and each virtio-fs share (recursively, and as a
//! slave mount: bind mounts the host adds under a share after boot appear inside when
//! the host's share is itself a shared mount, e.g. `mount --bind S S && mount
//! --make-shared S`), plus a fresh `/proc` when there are shares (the FUSE server
//! reopens its files through `/proc/self/fd`). The tap fd is inherited and the KVM
//! fd already open.
//!
//! `crx-vmm vhost-user-vsock --jail DIR` uses the same jail with only its sockets'
//! directories bound ([`JailPlan::for_back_end`], [`enter_plan`]).
//!
//! Split by job: `plan.rs` decides what is bound where (and makes every path in the
//! VM config absolute), `mounts.rs` builds the root and switches to it, `privs.rs`
//! drops capabilities, switches ids and sets no_new_privs.

use std::path::PathBuf;

use crate::config::VmConfig;

pub mod mounts;
pub mod plan;
pub mod privs;

pub use plan::{Bind, JailPlan};

/// The jail asked for on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// An existing, absolute directory (not `/`); a tmpfs is mounted on it inside
    /// the jail's namespace only, so the host never sees its contents change.
    pub dir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Why the jail could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail {0}: not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("--jail {0}: the jail cannot be the host's root")]
    IsRoot(PathBuf),
    #[error("--jail {}: not an existing directory", .0.display())]
    NotDirectory(PathBuf, #[source] Option<std::io::Error>),
    #[error("{what} {}: cannot be resolved for the jail", .path.display())]
    Resolve {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: cannot {step}")]
    Mount {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("jail: cannot create the mount point {}", .0.display())]
    MountPoint(PathBuf, #[source] std::io::Error),
    #[error("jail: cannot {step}")]
    Privileges {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// Whether the user's input is at fault (exit code 2) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            JailError::NotAbsolute(_)
                | JailError::IsRoot(_)
                | JailError::NotDirectory(..)
                | JailError::Resolve { .. }
        )
    }
}

impl JailConfig {
    /// Checks DIR before anything is changed.
    pub fn validate(&self) -> Result<(), JailError> {
        if !self.dir.is_absolute() {
            return Err(JailError::NotAbsolute(self.dir.clone()));
        }
        match std::fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(JailError::NotDirectory(self.dir.clone(), None)),
            Err(e) => return Err(JailError::NotDirectory(self.dir.clone(), Some(e))),
        }
        let canonical = self
            .dir
            .canonicalize()
            .map_err(|e| JailError::NotDirectory(self.dir.clone(), Some(e)))?;
        if canonical == std::path::Path::new("/") {
            return Err(JailError::IsRoot(self.dir.clone()));
        }
        Ok(())
    }
}

/// Builds the jail for `config` and moves the calling (only) thread into it; rewrites
/// `config`'s paths to the absolute ones bound inside. The process must have a single
/// thread: namespace, root and capabilities are per thread.
pub fn enter(jail: &JailConfig, config: &mut VmConfig) -> Result<(), JailError> {
    jail.validate()?;
    let plan = JailPlan::for_config(config)?;
    plan.apply_to(config);
    enter_plan(jail, &plan)
}

/// Builds the jail of `plan` and moves the calling (only) thread into it: for the
/// vhost-user back ends ([`JailPlan::for_back_end`]) and [`enter`].
pub fn enter_plan(jail: &JailConfig, plan: &JailPlan) -> Result<(), JailError> {
    jail.validate()?;
    let root = jail
        .dir
        .canonicalize()
        .map_err(|e| JailError::NotDirectory(jail.dir.clone(), Some(e)))?;
    mounts::build_and_pivot(&root, plan)?;
    privs::drop_privileges(jail.uid, jail.gid, plan.needs_fs_caps())?;
    tracing::info!(
        dir = %root.display(),
        binds = plan.binds().len(),
        "jailed: own mount namespace and root, capabilities dropped"
    );
    Ok(())
}
