//! Storage: mounts the file systems the host hands the guest (virtio-fs shares,
//! virtio-blk drives by serial, bind mounts, tmpfs) under the agent's storage root,
//! keeps a table of them, and unmounts them all, newest first, at shutdown.
//!
//! Requests come from the host, which the agent trusts, but a wrong request still gets
//! an error naming the cause (never a panic): validation lives in [`spec`], device
//! lookups in [`block`] and [`virtiofs`], and the kernel's view in [`mountinfo`].

pub mod block;
pub mod filesystems;
pub mod mountinfo;
pub mod spec;
pub mod virtiofs;

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crx_protocols::v1::storage::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::sync::Mutex;
use tokio::time::Instant;

use self::block::BlockPaths;
use self::spec::{MountPlan, PlanSource};

/// Storage failures, each naming its cause; the service maps them to ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The request is malformed or asks for something this guest cannot do.
    #[error("{0}")]
    Invalid(String),
    /// A device, tag, path or mount named by the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something is already mounted there.
    #[error("{0}")]
    AlreadyExists(String),
    /// The mount is busy or has mounts inside it.
    #[error("{0}")]
    Busy(String),
    /// The kernel refused for another reason.
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: nix::Error,
    },
    /// A file operation (mount point creation) failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The mount call did not return before the request's deadline.
    #[error("{0}")]
    TimedOut(String),
}

/// A mount the agent made.
#[derive(Clone, Debug)]
pub struct MountRecord {
    /// The request, as received.
    pub storage: Storage,
    /// Normalised mount point.
    pub mount_point: PathBuf,
    /// What was mounted: tag, device node, bind source or "tmpfs".
    pub device: String,
    /// Directories the agent created for the mount point, deepest first (removed again,
    /// if empty, on unmount).
    created_dirs: Vec<PathBuf>,
}

/// The kernel's view of a mount, for replies.
#[derive(Clone, Debug, Default)]
pub struct MountStatus {
    pub fstype: String,
    pub options: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The agent's mounts and where it may make them.
pub struct StorageManager {
    root: PathBuf,
    block: BlockPaths,
    virtio_devices: PathBuf,
    mounts: Mutex<Vec<MountRecord>>,
}

impl StorageManager {
    /// Mount points must lie under `root` (absolute; created at the first mount).
    pub fn new(root: PathBuf) -> StorageManager {
        StorageManager {
            root,
            block: BlockPaths::default(),
            virtio_devices: PathBuf::from("/sys/bus/virtio/devices"),
            mounts: Mutex::new(Vec::new()),
        }
    }

    /// The directory every mount point lies under (the sandbox puts its files beside it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Validates and mounts `storage`. A block device is waited for until
    /// `device_deadline`; the whole call gives up at `deadline`.
    pub async fn mount(
        &self,
        storage: &Storage,
        device_deadline: Instant,
        deadline: Instant,
    ) -> Result<MountRecord, StorageError> {
        let plan = spec::plan(storage, &self.root)?;
        // Held across the mount: two requests for one mount point must not race.
        let mut mounts = self.mounts.lock().await;
        self.check_free(&mounts, &plan.mount_point)?;
        let device = self.resolve(&plan, device_deadline.min(deadline)).await?;
        let created_dirs = self.make_mount_point(&plan.mount_point)?;

        let job = MountJob {
            plan: plan.clone(),
            device: device.clone(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let mut handle = tokio::task::spawn_blocking(move || job.run());
        let result = match tokio::time::timeout(left, &mut handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(StorageError::Io {
                what: format!(
                    "the mount of {} did not complete",
                    plan.mount_point.display()
                ),
                source: io::Error::other(join),
            }),
            Err(_) => {
                // The syscall cannot be interrupted; if it still succeeds, undo it, so
                // no mount exists that the table (and shutdown) does not know about.
                let mount_point = plan.mount_point.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(())) = handle.await {
                        tracing::warn!(mount_point = %mount_point.display(), "mount finished after its request's deadline; undoing it");
                        let _ = umount2(&mount_point, MntFlags::MNT_DETACH);
                    }
                    remove_empty_dirs(&created_dirs);
                });
                return Err(StorageError::TimedOut(format!(
                    "mounting {device} on {} did not finish within {} ms",
                    plan.mount_point.display(),
                    left.as_millis()
                )));
            }
        };
        if let Err(e) = result {
            remove_empty_dirs(&created_dirs);
            return Err(e);
        }
        let record = MountRecord {
            storage: storage.clone(),
            mount_point: plan.mount_point,
            device,
            created_dirs,
        };
        tracing::info!(mount_point = %record.mount_point.display(), device = %record.device, "storage mounted");
        mounts.push(record.clone());
        Ok(record)
    }

    /// Unmounts a mount point this agent mounted.
    pub async fn unmount(&self, mount_point: &str, detach: bool) -> Result<(), StorageError> {
        let mut mounts = self.mounts.lock().await;
        let target = Path::new(mount_point);
        let index = mounts
            .iter()
            .position(|r| r.mount_point == target)
            .ok_or_else(|| {
                StorageError::NotFound(format!(
                    "no storage mounted by this agent at {mount_point:?}"
                ))
            })?;
        if let Some(inner) = mounts
            .iter()
            .find(|r| r.mount_point != target && r.mount_point.starts_with(target))
        {
            return Err(StorageError::Busy(format!(
                "cannot unmount {mount_point:?}: storage {} is mounted inside it; unmount that first",
                inner.mount_point.display()
            )));
        }
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        match umount2(target, flags) {
            Ok(()) => {}
            Err(nix::Error::EBUSY) => {
                return Err(StorageError::Busy(format!(
                    "{mount_point:?} is busy (open files or processes inside); ask again with detach to unmount lazily"
                )))
            }
            // Someone else unmounted it already: the table was stale, now it is not.
            Err(nix::Error::EINVAL) if mountinfo::find(target).is_none() => {
                tracing::warn!(mount_point, "storage was already unmounted");
            }
            Err(source) => {
                return Err(StorageError::Kernel {
                    what: format!("cannot unmount {mount_point:?}"),
                    source,
                })
            }
        }
        let record = mounts.remove(index);
        remove_empty_dirs(&record.created_dirs);
        tracing::info!(mount_point, "storage unmounted");
        Ok(())
    }

    /// The agent's mounts, oldest first.
    pub async fn list(&self) -> Vec<MountRecord> {
        self.mounts.lock().await.clone()
    }

    /// Unmounts everything, newest first; a busy mount is detached lazily. For shutdown:
    /// failures are logged, not returned.
    pub async fn unmount_all(&self) {
        let mut mounts = self.mounts.lock().await;
        while let Some(record) = mounts.pop() {
            let path = &record.mount_point;
            let result = match umount2(path, MntFlags::empty()) {
                Err(nix::Error::EBUSY) => {
                    tracing::warn!(mount_point = %path.display(), "busy at shutdown; detaching");
                    umount2(path, MntFlags::MNT_DETACH)
                }
                other => other,
            };
            match result {
                Ok(()) => {
                    tracing::info!(mount_point = %path.display(), "storage unmounted at shutdown");
                    remove_empty_dirs(&record.created_dirs);
                }
                Err(e) => {
                    tracing::error!(mount_point = %path.display(), error = %e, "cannot unmount at shutdown")
                }
            }
        }
    }

    /// The kernel's current view of a recorded mount.
    pub fn status(record: &MountRecord) -> MountStatus {
        let mut status = MountStatus::default();
        if let Some(entry) = mountinfo::find(&record.mount_point) {
            status.fstype = entry.fstype;
            status.options = entry.options;
        }
        if let Ok(st) = nix::sys::statvfs::statvfs(&record.mount_point) {
            let frag = st.fragment_size();
            status.total_bytes = st.blocks().saturating_mul(frag);
            status.free_bytes = st.blocks_available().saturating_mul(frag);
        }
        status
    }

    /// Refuses a mount point already in use, or one that would hide an earlier mount.
    fn check_free(&self, mounts: &[MountRecord], mount_point: &Path) -> Result<(), StorageError> {
        if let Some(r) = mounts.iter().find(|r| r.mount_point == mount_point) {
            return Err(StorageError::AlreadyExists(format!(
                "storage {:?} is already mounted at {} by this agent",
                r.device,
                mount_point.display()
            )));
        }
        if let Some(r) = mounts
            .iter()
            .find(|r| r.mount_point.starts_with(mount_point))
        {
            return Err(StorageError::AlreadyExists(format!(
                "mounting at {} would hide storage mounted at {}",
                mount_point.display(),
                r.mount_point.display()
            )));
        }
        if let Some(e) = mountinfo::find(mount_point) {
            return Err(StorageError::AlreadyExists(format!(
                "{} ({} {}) is already mounted at {}",
                e.source,
                e.fstype,
                e.options,
                mount_point.display()
            )));
        }
        Ok(())
    }

    /// Checks the source against the running kernel and returns what to mount.
    async fn resolve(
        &self,
        plan: &MountPlan,
        device_deadline: Instant,
    ) -> Result<String, StorageError> {
        match &plan.source {
            PlanSource::VirtioFs { tag } => {
                virtiofs::check_tag(&self.virtio_devices, tag)?;
                Ok(tag.clone())
            }
            PlanSource::Block { serial, fstype } => {
                // The fstype first: a typo should not cost the device wait.
                let known = filesystems::known();
                match known.iter().find(|f| &f.name == fstype) {
                    None => {
                        return Err(StorageError::Invalid(format!(
                            "fstype {fstype:?} is not supported by the guest kernel (block file systems it knows: {})",
                            filesystems::block_names(&known)
                        )))
                    }
                    Some(f) if f.nodev => {
                        return Err(StorageError::Invalid(format!(
                            "fstype {fstype:?} is not a block-device file system (block file systems the guest knows: {})",
                            filesystems::block_names(&known)
                        )))
                    }
                    Some(_) => {}
                }
                let node = self.block.wait_for(serial, device_deadline).await?;
                Ok(node.display().to_string())
            }
            PlanSource::Bind { path } => match std::fs::symlink_metadata(path) {
                Ok(_) => Ok(path.display().to_string()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound(
                    format!("bind source {} does not exist", path.display()),
                )),
                Err(source) => Err(StorageError::Io {
                    what: format!("cannot inspect bind source {}", path.display()),
                    source,
                }),
            },
            PlanSource::Tmpfs => Ok("tmpfs".to_owned()),
        }
    }

    /// Creates the mount point (and the root) as needed, then checks that no symlink
    /// led it elsewhere. Returns the directories created now, deepest first.
    fn make_mount_point(&self, mount_point: &Path) -> Result<Vec<PathBuf>, StorageError> {
        let created: Vec<PathBuf> = mount_point
            .ancestors()
            .take_while(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(mount_point)
            .map_err(|source| StorageError::Io {
                what: format!("cannot create mount point {}", mount_point.display()),
                source,
            })?;
        let real = std::fs::canonicalize(mount_point).map_err(|source| StorageError::Io {
            what: format!("cannot resolve mount point {}", mount_point.display()),
            source,
        })?;
        if real != mount_point {
            remove_empty_dirs(&created);
            return Err(StorageError::Invalid(format!(
                "mount point {} resolves to {} through a symlink; mount points must be real directories under {}",
                mount_point.display(),
                real.display(),
                self.root.display()
            )));
        }
        if !real.is_dir() {
            return Err(StorageError::Invalid(format!(
                "mount point {} is not a directory",
                mount_point.display()
            )));
        }
        Ok(created)
    }
}

/// Removes directories the agent created, deepest first; one that is not empty (or
/// still a mount point) stays, and so do its parents.
fn remove_empty_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        if std::fs::remove_dir(dir).is_err() {
            return;
        }
    }
}

/// The blocking part of a mount, run off the async runtime (a virtio-fs mount waits
/// for the host's FUSE server).
struct MountJob {
    plan: MountPlan,
    device: String,
}

impl MountJob {
    fn run(&self) -> Result<(), StorageError> {
        let plan = &self.plan;
        let mp = plan.mount_point.as_path();
        let data = (!plan.data.is_empty()).then_some(plan.data.as_str());
        match &plan.source {
            PlanSource::VirtioFs { tag } => {
                mount(Some(tag.as_str()), mp, Some("virtiofs"), plan.flags, data).map_err(|e| {
                    match e {
                        nix::Error::EINVAL => StorageError::NotFound(format!(
                            "no virtio-fs device with tag {tag:?}{} (the guest kernel refused the mount with EINVAL)",
                            if plan.data.is_empty() {
                                String::new()
                            } else {
                                format!(", or it refused the options {:?}", plan.data)
                            }
                        )),
                        nix::Error::ENODEV => StorageError::Invalid(
                            "the guest kernel has no virtio-fs support (CONFIG_VIRTIO_FS)".to_owned(),
                        ),
                        source => StorageError::Kernel {
                            what: format!("cannot mount virtio-fs tag {tag:?} on {}", mp.display()),
                            source,
                        },
                    }
                })
            }
            PlanSource::Block { serial, fstype } => {
                mount(Some(self.device.as_str()), mp, Some(fstype.as_str()), plan.flags, data)
                    .map_err(|source| match source {
                        nix::Error::EINVAL => StorageError::Invalid(format!(
                            "{} (serial {serial:?}) does not hold a valid {fstype} file system{}",
                            self.device,
                            if plan.data.is_empty() {
                                String::new()
                            } else {
                                format!(", or {fstype} refused the options {:?}", plan.data)
                            }
                        )),
                        nix::Error::EROFS | nix::Error::EACCES => StorageError::Invalid(format!(
                            "{} (serial {serial:?}) is read-only; mount it with read_only",
                            self.device
                        )),
                        source => StorageError::Kernel {
                            what: format!(
                                "cannot mount {} (serial {serial:?}) as {fstype} on {}",
                                self.device,
                                mp.display()
                            ),
                            source,
                        },
                    })
            }
            PlanSource::Bind { path } => self.bind(path, mp),
            PlanSource::Tmpfs => mount(Some("tmpfs"), mp, Some("tmpfs"), plan.flags, data)
                .map_err(|source| match source {
                    nix::Error::EINVAL => StorageError::Invalid(format!(
                        "tmpfs refused the options {:?}",
                        plan.data
                    )),
                    source => StorageError::Kernel {
                        what: format!("cannot mount tmpfs on {}", mp.display()),
                        source,
                    },
                }),
        }
    }

    /// A recursive bind; flags need a second, remounting call (the kernel ignores
    /// them on the first), which keeps the flags the source mount already had.
    fn bind(&self, source: &Path, mp: &Path) -> Result<(), StorageError> {
        let flags = self.plan.flags;
        mount(
            Some(source),
            mp,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| StorageError::Kernel {
            what: format!("cannot bind {} on {}", source.display(), mp.display()),
            source: e,
        })?;
        if flags.is_empty() {
            return Ok(());
        }
        let inherited = nix::sys::statvfs::statvfs(mp)
            .map(|st| locked_flags(st.flags()))
            .unwrap_or(MsFlags::empty());
        let remount = mount(
            None::<&str>,
            mp,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | inherited | flags,
            None::<&str>,
        );
        if let Err(e) = remount {
            let _ = umount2(mp, MntFlags::MNT_DETACH);
            return Err(StorageError::Kernel {
                what: format!(
                    "cannot apply mount flags to the bind mount on {}",
                    mp.display()
                ),
                source: e,
            });
        }
        Ok(())
    }
}

/// The restrictive flags of an existing mount, which a bind remount must not drop.
fn locked_flags(flags: nix::sys::statvfs::FsFlags) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if flags.contains(fs) {
            out.insert(ms);
        }
    }
    out
}

/// How long MountStorage waits for a block device unless told otherwise.
pub const DEFAULT_DEVICE_WAIT: Duration = Duration::from_secs(5);
/// The longest device wait a request may ask for.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(60);
