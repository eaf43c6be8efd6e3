//! What the jail exposes: every host path the VM opens or creates after the jail is
//! entered, resolved to an absolute path without symlinks (bound at that same path
//! inside), and the VM config rewritten to use those paths.

use std::path::{Path, PathBuf};

use super::JailError;
use crate::config::{SerialMode, VmConfig};

/// One bind mount of a host path at the same path inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    /// A directory (bound recursively, so mounts under it come along) or a file.
    pub is_dir: bool,
    pub read_only: bool,
}

/// The binds and the rewritten paths of one VM config.
#[derive(Clone, Debug, Default)]
pub struct JailPlan {
    binds: Vec<Bind>,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    drives: Vec<Option<PathBuf>>,
    serial_file: Option<PathBuf>,
    vsock: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    shares: Vec<PathBuf>,
}

fn resolve(what: &'static str, path: &Path) -> Result<PathBuf, JailError> {
    path.canonicalize().map_err(|source| JailError::Resolve {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A file crx-vmm creates: its directory resolved, its own name kept.
fn resolve_new_file(what: &'static str, path: &Path) -> Result<(PathBuf, PathBuf), JailError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = resolve(what, dir)?;
    let name = path.file_name().ok_or_else(|| JailError::Resolve {
        what,
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let file = dir.join(name);
    Ok((dir, file))
}

impl JailPlan {
    /// Resolves every path of `config` the VM will use inside the jail.
    pub fn for_config(config: &VmConfig) -> Result<Self, JailError> {
        let mut wanted = Vec::new();
        let mut plan = JailPlan {
            kernel: resolve("kernel", &config.kernel)?,
            ..Default::default()
        };
        wanted.push(Bind {
            path: plan.kernel.clone(),
            is_dir: false,
            read_only: true,
        });
        if let Some(initramfs) = &config.initramfs {
            let path = resolve("initramfs", initramfs)?;
            wanted.push(Bind {
                path: path.clone(),
                is_dir: false,
                read_only: true,
            });
            plan.initramfs = Some(path);
        }
        for drive in &config.drives {
            let resolved = match &drive.path {
                Some(p) => {
                    let path = resolve("drive", p)?;
                    wanted.push(Bind {
                        path: path.clone(),
                        is_dir: false,
                        read_only: drive.read_only,
                    });
                    Some(path)
                }
                None => None,
            };
            plan.drives.push(resolved);
        }
        if let SerialMode::File(path) = &config.serial {
            let (dir, file) = resolve_new_file("serial log", path)?;
            wanted.push(Bind {
                path: dir,
                is_dir: true,
                read_only: false,
            });
            plan.serial_file = Some(file);
        }
        if let Some(vsock) = &config.vsock {
            let (dir, file) = resolve_new_file("vsock socket", &vsock.uds_path)?;
            wanted.push(Bind {
                path: dir,
                is_dir: true,
                read_only: false,
            });
            plan.vsock = Some(file);
        }
        if let Some(api) = &config.api_socket {
            let (dir, file) = resolve_new_file("API socket", api)?;
            wanted.push(Bind {
                path: dir,
                is_dir: true,
                read_only: false,
            });
            plan.api_socket = Some(file);
        }
        for share in &config.shares {
            let dir = resolve("share", &share.dir)?;
            wanted.push(Bind {
                path: dir.clone(),
                is_dir: true,
                read_only: false,
            });
            plan.shares.push(dir);
        }
        plan.binds = dedup(wanted);
        Ok(plan)
    }

    /// The plan of a vhost-user back end: the directories of the `sockets` it
    /// creates and the `shares` it serves. Returns the resolved paths in the same
    /// order, for the back end to use inside the jail.
    pub fn for_back_end(
        sockets: &[&Path],
        shares: &[&Path],
    ) -> Result<(Self, Vec<PathBuf>, Vec<PathBuf>), JailError> {
        let mut plan = JailPlan::default();
        let mut wanted = Vec::new();
        let mut socket_paths = Vec::new();
        for socket in sockets {
            let (dir, file) = resolve_new_file("socket", socket)?;
            wanted.push(Bind {
                path: dir,
                is_dir: true,
                read_only: false,
            });
            socket_paths.push(file);
        }
        for share in shares {
            let dir = resolve("share", share)?;
            wanted.push(Bind {
                path: dir.clone(),
                is_dir: true,
                read_only: false,
            });
            plan.shares.push(dir);
        }
        plan.binds = dedup(wanted);
        let share_paths = plan.shares.clone();
        Ok((plan, socket_paths, share_paths))
    }

    /// The binds, parents before anything inside them; none lies inside another
    /// directory bind (that one already shows it).
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// Whether a FUSE server runs in the jail (virtio-fs shares): it needs `/proc`
    /// and the file-system capabilities.
    pub fn needs_fs_caps(&self) -> bool {
        !self.shares.is_empty()
    }

    /// Points `config` at the resolved paths, which are the ones bound in the jail.
    pub fn apply_to(&self, config: &mut VmConfig) {
        config.kernel = self.kernel.clone();
        if let Some(p) = &self.initramfs {
            config.initramfs = Some(p.clone());
        }
        for (drive, path) in config.drives.iter_mut().zip(&self.drives) {
            if let Some(p) = path {
                drive.path = Some(p.clone());
            }
        }
        if let Some(p) = &self.serial_file {
            config.serial = SerialMode::File(p.clone());
        }
        if let (Some(v), Some(p)) = (config.vsock.as_mut(), &self.vsock) {
            v.uds_path = p.clone();
        }
        if let Some(p) = &self.api_socket {
            config.api_socket = Some(p.clone());
        }
        for (share, dir) in config.shares.iter_mut().zip(&self.shares) {
            share.dir = dir.clone();
        }
    }
}

/// Directories first, shallow before deep; drops whatever an earlier directory bind
/// already contains, and repeats.
fn dedup(mut wanted: Vec<Bind>) -> Vec<Bind> {
    wanted.sort_by_key(|b| (!b.is_dir, b.path.components().count()));
    let mut kept: Vec<Bind> = Vec::new();
    for bind in wanted {
        let covered = kept
            .iter()
            .any(|k| bind.path == k.path || (k.is_dir && bind.path.starts_with(&k.path)));
        if !covered {
            kept.push(bind);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriveConfig, ShareConfig, VsockConfig};

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let drive = dir.join("sub/disk.img");
        std::fs::create_dir_all(drive.parent().unwrap()).unwrap();
        std::fs::write(&drive, b"d").unwrap();
        let share = dir.join("share");
        std::fs::create_dir_all(&share).unwrap();
        VmConfig {
            kernel,
            initramfs: None,
            cmdline_extra: String::new(),
            vcpus: 1,
            memory_mib: 128,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("run/../v.sock"),
            }),
            serial: SerialMode::Off,
            drives: vec![
                DriveConfig {
                    path: Some(drive),
                    read_only: true,
                    serial: String::new(),
                },
                DriveConfig {
                    path: None,
                    read_only: false,
                    serial: String::new(),
                },
            ],
            rng: false,
            shares: vec![ShareConfig {
                tag: "pod".into(),
                dir: share,
            }],
            net: None,
            api_socket: None,
        }
    }

    #[test]
    fn binds_cover_each_path_once_and_the_config_gets_resolved_paths() {
        let dir = std::env::temp_dir().join(format!("crx-jail-plan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let dir = dir.canonicalize().unwrap();
        let mut cfg = config(&dir);
        let plan = JailPlan::for_config(&cfg).unwrap();
        // The vsock socket's directory is `dir` itself, which contains every other
        // path: one recursive bind of it is all it takes.
        assert_eq!(
            plan.binds(),
            &[Bind {
                path: dir.clone(),
                is_dir: true,
                read_only: false
            }]
        );
        assert!(plan.needs_fs_caps());
        plan.apply_to(&mut cfg);
        assert_eq!(cfg.vsock.as_ref().unwrap().uds_path, dir.join("v.sock"));
        assert_eq!(cfg.drives[1].path, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dedup_keeps_files_outside_bound_directories() {
        let binds = dedup(vec![
            Bind {
                path: "/b/kernel".into(),
                is_dir: false,
                read_only: true,
            },
            Bind {
                path: "/a/x".into(),
                is_dir: true,
                read_only: false,
            },
            Bind {
                path: "/a".into(),
                is_dir: true,
                read_only: false,
            },
            Bind {
                path: "/a/disk".into(),
                is_dir: false,
                read_only: true,
            },
        ]);
        let paths: Vec<_> = binds.iter().map(|b| b.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["/a", "/b/kernel"]);
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let dir = std::env::temp_dir().join(format!("crx-jail-plan-k-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = config(&dir);
        cfg.kernel = "/nonexistent/vmlinux".into();
        let err = JailPlan::for_config(&cfg).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        assert!(err.is_bad_input());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
