//! The pod's host cgroup: the VM's host processes (the VMM and its vhost-user back
//! ends) go into the cgroup the sandbox spec names (`linux.cgroupsPath`), where runc
//! puts the pause process. The kubelet's pod cgroup (its parent) then accounts and
//! limits the pod's whole cost, which is what `overhead.podFixed` assumes, and
//! containerd's PodSandboxStats, which reads that parent, sees the VM's CPU and memory.
//!
//! Only the leaf is ours: it is made (with any missing ancestors, as runc does) in
//! every mounted hierarchy, and removed once the VM's processes are gone. Existing
//! ancestors are never written: the kubelet owns them. The shim itself stays in the
//! cgroup containerd started it in. The leaves are recorded in the pod's run directory
//! so that `delete` after a killed shim removes them too.
//!
//! cgroupfs paths only: a systemd path (`slice:prefix:name`) would need the unit made
//! through systemd's D-Bus API, so such pods run with their VM outside the pod cgroup
//! and a warning saying so.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the leaves of a pod are recorded, in its run directory.
const RECORD_FILE: &str = "host-cgroup";
/// Where the host's cgroup hierarchies are mounted.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// This process's cgroups, the base of a relative `cgroupsPath`.
const OWN_CGROUPS: &str = "/proc/self/cgroup";
/// How long removal waits for the kernel to empty a leaf whose processes were killed.
const REMOVE_WAIT: Duration = Duration::from_secs(5);
/// How long `Drop` waits (it may run on an async thread).
const DROP_WAIT: Duration = Duration::from_millis(500);
/// Memory limits at or above this are "no limit" (cgroup v1 writes 2^63 rounded down
/// to a page for unlimited).
const UNLIMITED: u64 = 1 << 62;

/// What went wrong with the pod's host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?} cannot be used: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("could not read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy is mounted (see {MOUNTINFO})")]
    NoHierarchy,
    #[error("this process has no cgroup in the hierarchy at {mount:?}, so the relative cgroupsPath {path:?} has no base")]
    NoBase { mount: PathBuf, path: String },
    #[error("could not create the pod cgroup {dir:?}")]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not give the empty cpuset cgroup {dir:?} its parent's {file}")]
    Cpuset {
        dir: PathBuf,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not move {process} (pid {pid}) into the pod cgroup {dir:?}")]
    Move {
        process: &'static str,
        pid: u32,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not record the pod cgroup in {path:?}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the recorded pod cgroup {0:?} is not a cgroup below a mounted hierarchy")]
    BadRecord(PathBuf),
    #[error(
        "the pod's memory limit of {limit_mib} MiB (set on the host cgroup {cgroup:?}) is too \
         small for a crx pod: minus the {reserve_mib} MiB the VMM needs on the host it leaves \
         a {guest_mib} MiB guest, under the {floor_mib} MiB floor a guest needs; raise the \
         containers' memory limits or the RuntimeClass's overhead.podFixed.memory (to at \
         least {reserve_mib} MiB + {floor_mib} MiB)"
    )]
    TooSmall {
        limit_mib: u64,
        cgroup: PathBuf,
        reserve_mib: u64,
        guest_mib: u64,
        floor_mib: u64,
    },
    #[error("could not remove the pod cgroup {dir:?} within {waited:?}")]
    Remove {
        dir: PathBuf,
        waited: Duration,
        #[source]
        source: std::io::Error,
    },
}

/// What `linux.cgroupsPath` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    /// No path: nothing to place (a runtime picks its own; the VM stays with the shim).
    Nothing,
    /// A cgroupfs path: absolute (from each hierarchy's root) or relative (to this
    /// process's cgroup in each hierarchy), free of `.` and `..`.
    Cgroupfs { absolute: bool, path: PathBuf },
    /// systemd's `slice:prefix:name`.
    Systemd(String),
}

/// Parses a `linux.cgroupsPath`.
pub fn parse_cgroups_path(raw: &str) -> Result<Requested, CgroupError> {
    let bad = |reason| CgroupError::BadPath {
        path: raw.to_owned(),
        reason,
    };
    if raw.is_empty() {
        return Ok(Requested::Nothing);
    }
    if !raw.starts_with('/') && raw.split(':').count() == 3 {
        return Ok(Requested::Systemd(raw.to_owned()));
    }
    if raw.contains('\0') || raw.contains('\n') {
        return Err(bad("it holds a NUL or newline"));
    }
    let mut path = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => path.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("it climbs out with `..`"))
            }
        }
    }
    if path.as_os_str().is_empty() {
        return Err(bad("it names the root cgroup, which a pod must not take"));
    }
    Ok(Requested::Cgroupfs {
        absolute: raw.starts_with('/'),
        path,
    })
}

/// One mounted cgroup hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// cgroup2 (unified) rather than a v1 hierarchy.
    pub unified: bool,
    /// The v1 mount's options: its controllers (and `name=...`) among them.
    pub options: Vec<String>,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.options.iter().any(|o| o == controller)
    }

    /// This hierarchy's line of `/proc/<pid>/cgroup` (`id:controllers:path`), if any.
    fn own_cgroup(&self, proc_cgroup: &str) -> Option<PathBuf> {
        proc_cgroup.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let mine = if self.unified {
                id == "0" && controllers.is_empty()
            } else {
                !controllers.is_empty() && controllers.split(',').all(|c| self.has(c))
            };
            mine.then(|| PathBuf::from(path))
        })
    }
}

/// The cgroup hierarchies in a `mountinfo` text: one per hierarchy (a hierarchy mounted
/// twice is listed once), only mounts of a hierarchy's root (a sub-tree mount, as in a
/// container, would put the path elsewhere than the kubelet meant).
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for line in text.lines() {
        let Some((mount_fields, fs_fields)) = line.split_once(" - ") else {
            continue;
        };
        let mount: Vec<&str> = mount_fields.split(' ').collect();
        let fs: Vec<&str> = fs_fields.split(' ').collect();
        let (Some(device), Some(root), Some(point)) = (mount.get(2), mount.get(3), mount.get(4))
        else {
            continue;
        };
        let unified = match fs.first() {
            Some(&"cgroup2") => true,
            Some(&"cgroup") => false,
            _ => continue,
        };
        // Mount points with escaped characters (`\040`) are not where cgroups live.
        if *root != "/" || point.contains('\\') || !seen.insert(*device) {
            continue;
        }
        let options = fs
            .get(2)
            .map(|o| o.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        found.push(Hierarchy {
            mount: PathBuf::from(point),
            unified,
            options,
        });
    }
    found
}

/// The pod's cgroup in one hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Leaf {
    hierarchy: Hierarchy,
    dir: PathBuf,
}

impl Leaf {
    /// The limit file of this hierarchy, if it limits memory.
    fn memory_limit_file(&self) -> Option<&'static str> {
        if self.hierarchy.unified {
            Some("memory.max")
        } else if self.hierarchy.has("memory") {
            Some("memory.limit_in_bytes")
        } else {
            None
        }
    }

    /// Makes the leaf and any missing ancestor, top down. In a v1 cpuset hierarchy an
    /// empty cpuset (what v1 gives a new cgroup) takes no process, so each empty one on
    /// the way down gets its parent's CPUs and memory nodes, as runc does; ones that
    /// are set (the kubelet's) are left as they are.
    fn create(&self) -> Result<(), CgroupError> {
        let missing: Vec<&Path> = self
            .dir
            .ancestors()
            .take_while(|d| *d != self.hierarchy.mount && !d.exists())
            .collect();
        for dir in missing.into_iter().rev() {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(CgroupError::Create {
                        dir: dir.to_owned(),
                        source,
                    })
                }
            }
        }
        if !self.hierarchy.unified && self.hierarchy.has("memory") {
            // v1 can bring along what the VM's processes touched before they moved
            // (anonymous and file pages: 1 | 2); v2 never moves charges, and kernels
            // that dropped this file leave those pages charged where they started.
            let file = self.dir.join("memory.move_charge_at_immigrate");
            if let Err(e) = std::fs::write(&file, "3") {
                tracing::debug!(?file, error = %e, "charges stay where the VM started");
            }
        }
        if !self.hierarchy.unified && self.hierarchy.has("cpuset") {
            let path: Vec<&Path> = self
                .dir
                .ancestors()
                .take_while(|d| *d != self.hierarchy.mount)
                .collect();
            for dir in path.into_iter().rev() {
                fill_empty_cpuset(dir)?;
            }
        }
        Ok(())
    }

    fn adopt(&self, process: &'static str, pid: u32) -> Result<(), CgroupError> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).map_err(|source| {
            CgroupError::Move {
                process,
                pid,
                dir: self.dir.clone(),
                source,
            }
        })
    }
}

fn fill_empty_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let fill = || -> std::io::Result<()> {
            if !std::fs::read_to_string(dir.join(file))?.trim().is_empty() {
                return Ok(());
            }
            let inherited = std::fs::read_to_string(parent.join(file))?;
            std::fs::write(dir.join(file), inherited.trim())
        };
        fill().map_err(|source| CgroupError::Cpuset {
            dir: dir.to_owned(),
            file,
            source,
        })?;
    }
    Ok(())
}

/// Removes `dir` (an empty cgroup: rmdir, never recursive), waiting up to `wait` for
/// the kernel to let its last processes go. Gone already is done.
fn remove_leaf(dir: &Path, wait: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + wait;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(CgroupError::Remove {
                    dir: dir.to_owned(),
                    waited: wait,
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The smallest memory limit on `leaf`'s ancestors (its parent up to, not including,
/// the hierarchy's root), in bytes, with the cgroup that sets it.
fn ancestors_memory_limit(leaf: &Leaf) -> Option<(u64, PathBuf)> {
    let file = leaf.memory_limit_file()?;
    leaf.dir
        .ancestors()
        .skip(1)
        .take_while(|d| *d != leaf.hierarchy.mount && d.starts_with(&leaf.hierarchy.mount))
        .filter_map(|d| {
            let text = std::fs::read_to_string(d.join(file)).ok()?;
            parse_memory_limit(&text).map(|limit| (limit, d.to_owned()))
        })
        .min_by_key(|(limit, _)| *limit)
}

/// A memory limit file's value: None for `max` or a v1 "unlimited".
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|&bytes| bytes < UNLIMITED)
}

/// Host memory the VM's processes take beyond guest RAM, kept free under the pod
/// cgroup's limit. Measured for QEMU/TCG here (QEMU + vhost-user back ends RSS without
/// guest RAM: ~75 MiB with the 32 MiB translation cache full, see the README's
/// figures) plus room for the guest RAM's page tables and the back ends' buffers;
/// crx-vmm (1.5 MiB) and QEMU/KVM (~47 MiB) need less, so on them it is generous.
pub const VMM_RESERVE_MIB: u64 = 96;
/// The smallest guest a limit may squeeze a pod VM to: the kernel and the agent take
/// ~30 MiB of it, which leaves a small container room (runtimeclass.yaml's podFixed is
/// this reserve plus 64 MiB, so any pod whose containers' limits sum to 32 MiB fits).
pub const GUEST_FLOOR_MIB: u64 = 96;

/// The guest's memory when the pod's host cgroup is limited to `cap` (bytes, and the
/// cgroup setting it): all of guest RAM can end up touched (the guest's page cache
/// fills it under file I/O), so guest RAM plus the VMM's reserve must fit under the
/// limit, or the host OOM-kills the VM. Unlimited: `wanted_mib`, as without a cgroup.
pub fn fit_guest_memory(wanted_mib: u32, cap: Option<&(u64, PathBuf)>) -> Result<u32, CgroupError> {
    let Some((limit, cgroup)) = cap else {
        tracing::info!(
            guest_mib = wanted_mib,
            "no memory limit above the pod's host cgroup: guest sized as asked"
        );
        return Ok(wanted_mib);
    };
    let limit_mib = limit / (1 << 20);
    let room_mib = limit_mib.saturating_sub(VMM_RESERVE_MIB);
    if room_mib >= u64::from(wanted_mib) {
        tracing::info!(
            guest_mib = wanted_mib,
            limit_mib,
            reserve_mib = VMM_RESERVE_MIB,
            ?cgroup,
            "the guest fits under the pod's memory limit"
        );
        return Ok(wanted_mib);
    }
    if room_mib < GUEST_FLOOR_MIB {
        return Err(CgroupError::TooSmall {
            limit_mib,
            cgroup: cgroup.clone(),
            reserve_mib: VMM_RESERVE_MIB,
            guest_mib: room_mib,
            floor_mib: GUEST_FLOOR_MIB,
        });
    }
    tracing::info!(
        asked_mib = wanted_mib,
        guest_mib = room_mib,
        limit_mib,
        reserve_mib = VMM_RESERVE_MIB,
        ?cgroup,
        "guest shrunk to fit under the pod's memory limit with the VMM's reserve"
    );
    Ok(u32::try_from(room_mib).unwrap_or(wanted_mib))
}

/// A pod's host cgroup, from planned through created to removed (also on drop).
#[derive(Debug, Default)]
pub struct HostCgroup {
    leaves: Vec<Leaf>,
    /// Where the leaves are recorded once made (in the pod's run directory).
    record: Option<PathBuf>,
}

impl HostCgroup {
    /// Plans the sandbox's cgroup from its spec (nothing is made yet). A spec without
    /// `linux.cgroupsPath`, or with a systemd one, gives a cgroup that places nothing.
    pub fn for_sandbox(spec: &Value) -> Result<HostCgroup, CgroupError> {
        let raw = spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .unwrap_or("");
        match parse_cgroups_path(raw)? {
            Requested::Nothing => {
                tracing::info!(
                    "the sandbox spec names no cgroupsPath: the VM stays in the shim's host cgroup"
                );
                Ok(HostCgroup::default())
            }
            Requested::Systemd(path) => {
                tracing::warn!(
                    cgroups_path = %path,
                    "systemd cgroupsPath: crx places pod VMs in cgroupfs paths only, so this \
                     pod's VM is NOT in the pod's host cgroup (its cost is outside the pod's \
                     limits and PodSandboxStats); use the cgroupfs driver for crx nodes"
                );
                Ok(HostCgroup::default())
            }
            Requested::Cgroupfs { absolute, path } => {
                let mountinfo =
                    std::fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
                        path: MOUNTINFO,
                        source,
                    })?;
                let own = if absolute {
                    String::new()
                } else {
                    std::fs::read_to_string(OWN_CGROUPS).map_err(|source| CgroupError::Read {
                        path: OWN_CGROUPS,
                        source,
                    })?
                };
                let leaves = leaves_for(&parse_mountinfo(&mountinfo), absolute, &path, &own)?;
                Ok(HostCgroup {
                    leaves,
                    record: None,
                })
            }
        }
    }

    /// The leaf directories (one per hierarchy).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.leaves.iter().map(|l| l.dir.clone()).collect()
    }

    /// The tightest memory limit above the pod's cgroup (bytes, and the cgroup setting
    /// it), None when nothing limits it.
    pub fn memory_limit(&self) -> Option<(u64, PathBuf)> {
        self.leaves
            .iter()
            .filter_map(ancestors_memory_limit)
            .min_by_key(|(limit, _)| *limit)
    }

    /// Records the leaves in `run_dir` and makes them. Recording first: a shim killed
    /// in between leaves nothing `delete` does not know of.
    pub fn create(&mut self, run_dir: &Path) -> Result<(), CgroupError> {
        if self.leaves.is_empty() {
            return Ok(());
        }
        let record = run_dir.join(RECORD_FILE);
        let text: String = self
            .leaves
            .iter()
            .map(|l| format!("{}\n", l.dir.display()))
            .collect();
        std::fs::write(&record, text).map_err(|source| CgroupError::Record {
            path: record.clone(),
            source,
        })?;
        self.record = Some(record);
        for leaf in &self.leaves {
            leaf.create()?;
        }
        tracing::info!(cgroups = ?self.dirs(), "pod host cgroup made");
        Ok(())
    }

    /// Moves each process (with all its threads) into the leaf of every hierarchy.
    pub fn adopt(&self, pids: &[(&'static str, u32)]) -> Result<(), CgroupError> {
        for leaf in &self.leaves {
            for &(process, pid) in pids {
                leaf.adopt(process, pid)?;
            }
        }
        if !self.leaves.is_empty() {
            tracing::info!(vm = ?pids, "VM processes placed in the pod host cgroup");
        }
        Ok(())
    }

    /// Removes the leaves (the VM's processes must be gone) and the record. Idempotent.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        self.remove_within(REMOVE_WAIT)
    }

    fn remove_within(&mut self, wait: Duration) -> Result<(), CgroupError> {
        let mut first_error = None;
        self.leaves
            .retain(|leaf| match remove_leaf(&leaf.dir, wait) {
                Ok(()) => false,
                Err(e) => {
                    first_error.get_or_insert(e);
                    true
                }
            });
        if let Some(e) = first_error {
            return Err(e);
        }
        if let Some(record) = self.record.take() {
            let _ = std::fs::remove_file(record);
        }
        Ok(())
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if self.record.is_none() {
            return;
        }
        if let Err(e) = self.remove_within(DROP_WAIT) {
            tracing::error!(error = %e, "pod host cgroup left behind");
        }
    }
}

/// The pod's leaf in every hierarchy.
fn leaves_for(
    hierarchies: &[Hierarchy],
    absolute: bool,
    path: &Path,
    proc_cgroup: &str,
) -> Result<Vec<Leaf>, CgroupError> {
    if hierarchies.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    hierarchies
        .iter()
        .map(|h| {
            let base = if absolute {
                PathBuf::new()
            } else {
                h.own_cgroup(proc_cgroup)
                    .ok_or_else(|| CgroupError::NoBase {
                        mount: h.mount.clone(),
                        path: path.display().to_string(),
                    })?
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect()
            };
            Ok(Leaf {
                hierarchy: h.clone(),
                dir: h.mount.join(base).join(path),
            })
        })
        .collect()
}

/// Removes the leaves a pod's run directory records (`delete` after a killed shim, once
/// the VM's processes are killed), then the record. Only directories strictly below a
/// mounted cgroup hierarchy are touched, and only by rmdir.
pub fn remove_recorded(run_dir: &Path) -> Result<(), CgroupError> {
    let record = run_dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Record {
                path: record,
                source,
            })
        }
    };
    let mountinfo = std::fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Read {
        path: MOUNTINFO,
        source,
    })?;
    let hierarchies = parse_mountinfo(&mountinfo);
    for line in text.lines().filter(|l| !l.is_empty()).take(64) {
        let dir = PathBuf::from(line);
        if !recorded_dir_is_safe(&hierarchies, &dir) {
            return Err(CgroupError::BadRecord(dir));
        }
        remove_leaf(&dir, REMOVE_WAIT)?;
        tracing::info!(?dir, "removed the dead shim's pod cgroup");
    }
    let _ = std::fs::remove_file(record);
    Ok(())
}

/// True when `dir` lies strictly below one of `hierarchies`, without `.` or `..`.
fn recorded_dir_is_safe(hierarchies: &[Hierarchy], dir: &Path) -> bool {
    let plain = dir
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    plain
        && hierarchies
            .iter()
            .any(|h| dir.starts_with(&h.mount) && dir != h.mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 20 0:32 / /mnt/again rw,relatime - cgroup cgroup rw,memory
91 20 0:40 /sub /mnt/sub rw,relatime - cgroup cgroup rw,pids
";
    const V1_SELF: &str = "9:name=systemd:/user.slice\n4:memory:/shims\n3:cpuset:/\n\
                           1:cpu:/x/y\n0::/init.scope\n";

    #[test]
    fn cgroups_paths_are_parsed_and_checked() {
        assert_eq!(parse_cgroups_path("").unwrap(), Requested::Nothing);
        assert_eq!(
            parse_cgroups_path("/kubepods/pod123/sandboxid").unwrap(),
            Requested::Cgroupfs {
                absolute: true,
                path: "kubepods/pod123/sandboxid".into()
            }
        );
        assert_eq!(
            parse_cgroups_path("pods//./abc/").unwrap(),
            Requested::Cgroupfs {
                absolute: false,
                path: "pods/abc".into()
            }
        );
        assert_eq!(
            parse_cgroups_path("kubepods-pod1.slice:cri-containerd:abc").unwrap(),
            Requested::Systemd("kubepods-pod1.slice:cri-containerd:abc".into())
        );
        for bad in ["/", "/kubepods/../etc", "..", "a\nb", "./"] {
            let err = parse_cgroups_path(bad).unwrap_err();
            assert!(matches!(err, CgroupError::BadPath { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn hierarchies_are_read_once_each_and_from_their_root() {
        let found = parse_mountinfo(V1_MOUNTINFO);
        let mounts: Vec<&str> = found.iter().map(|h| h.mount.to_str().unwrap()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/unified"
            ]
        );
        assert!(found[4].unified && !found[2].unified && found[2].has("memory"));
        let v2 = "25 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(v2),
            [Hierarchy {
                mount: "/sys/fs/cgroup".into(),
                unified: true,
                options: vec!["rw".into(), "nsdelegate".into()]
            }]
        );
    }

    #[test]
    fn leaves_are_under_each_root_or_under_our_own_cgroup() {
        let hierarchies = parse_mountinfo(V1_MOUNTINFO);
        let path = Path::new("kubepods/pod1/sb");
        let absolute = leaves_for(&hierarchies, true, path, "").unwrap();
        assert_eq!(
            absolute[2].dir,
            Path::new("/sys/fs/cgroup/memory/kubepods/pod1/sb")
        );
        assert_eq!(
            absolute[2].memory_limit_file(),
            Some("memory.limit_in_bytes")
        );
        assert_eq!(absolute[0].memory_limit_file(), None);
        assert_eq!(absolute[4].memory_limit_file(), Some("memory.max"));
        let relative = leaves_for(&hierarchies, false, path, V1_SELF).unwrap();
        let dirs: Vec<&str> = relative.iter().map(|l| l.dir.to_str().unwrap()).collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/cpu/x/y/kubepods/pod1/sb",
                "/sys/fs/cgroup/cpuset/kubepods/pod1/sb",
                "/sys/fs/cgroup/memory/shims/kubepods/pod1/sb",
                "/sys/fs/cgroup/systemd/user.slice/kubepods/pod1/sb",
                "/sys/fs/cgroup/unified/init.scope/kubepods/pod1/sb"
            ]
        );
        let missing = leaves_for(&hierarchies, false, path, "4:memory:/\n").unwrap_err();
        assert!(matches!(missing, CgroupError::NoBase { .. }), "{missing}");
        assert!(matches!(
            leaves_for(&[], true, path, ""),
            Err(CgroupError::NoHierarchy)
        ));
    }

    #[test]
    fn memory_limits_of_max_or_v1_unlimited_are_none() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("335544320\n"), Some(335_544_320));
        assert_eq!(parse_memory_limit("garbage"), None);
    }

    #[test]
    fn limits_come_from_the_tightest_existing_ancestor() {
        let root = std::env::temp_dir().join(format!("crx-cg-test-{}", std::process::id()));
        let leaf_dir = root.join("kubepods/pod1/sb");
        std::fs::create_dir_all(&leaf_dir).unwrap();
        std::fs::write(root.join("kubepods/memory.max"), "1073741824\n").unwrap();
        std::fs::write(root.join("kubepods/pod1/memory.max"), "max\n").unwrap();
        // The leaf's own limit is not the pod's: it is ours, not the kubelet's.
        std::fs::write(leaf_dir.join("memory.max"), "1\n").unwrap();
        let leaf = Leaf {
            hierarchy: Hierarchy {
                mount: root.clone(),
                unified: true,
                options: Vec::new(),
            },
            dir: leaf_dir.clone(),
        };
        assert_eq!(
            ancestors_memory_limit(&leaf),
            Some((1 << 30, root.join("kubepods")))
        );
        std::fs::write(root.join("kubepods/pod1/memory.max"), "335544320").unwrap();
        assert_eq!(
            ancestors_memory_limit(&leaf),
            Some((335_544_320, root.join("kubepods/pod1")))
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn guests_fit_under_the_limit_with_the_reserve_or_are_refused() {
        const MIB: u64 = 1 << 20;
        let cap = |mib: u64| Some((mib * MIB, PathBuf::from("/sys/fs/cgroup/kubepods/pod1")));
        assert_eq!(fit_guest_memory(320, None).unwrap(), 320);
        assert_eq!(fit_guest_memory(320, cap(1024).as_ref()).unwrap(), 320);
        assert_eq!(fit_guest_memory(320, cap(416).as_ref()).unwrap(), 320);
        assert_eq!(fit_guest_memory(320, cap(320).as_ref()).unwrap(), 224);
        assert_eq!(
            fit_guest_memory(320, cap(VMM_RESERVE_MIB + GUEST_FLOOR_MIB).as_ref()).unwrap(),
            96
        );
        // A guest asked smaller than the floor that fits is left alone.
        assert_eq!(fit_guest_memory(64, cap(200).as_ref()).unwrap(), 64);
        let err = fit_guest_memory(320, cap(180).as_ref()).unwrap_err();
        let text = err.to_string();
        for part in [
            "180 MiB",
            "/sys/fs/cgroup/kubepods/pod1",
            "96 MiB",
            "84 MiB guest",
            "96 MiB floor",
            "podFixed",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
    }

    #[test]
    fn recorded_dirs_must_lie_below_a_hierarchy() {
        let hierarchies = parse_mountinfo(V1_MOUNTINFO);
        let ok = Path::new("/sys/fs/cgroup/memory/default/pod");
        assert!(recorded_dir_is_safe(&hierarchies, ok));
        for bad in [
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/memory/../../../etc",
            "/etc/passwd",
        ] {
            assert!(!recorded_dir_is_safe(&hierarchies, Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn a_plan_without_a_path_places_nothing() {
        let mut none = HostCgroup::for_sandbox(&serde_json::json!({})).unwrap();
        assert!(none.dirs().is_empty() && none.memory_limit().is_none());
        let dir = std::env::temp_dir();
        none.create(&dir).unwrap();
        none.adopt(&[("qemu", 1)]).unwrap();
        none.remove().unwrap();
        let systemd = serde_json::json!({"linux": {"cgroupsPath": "a.slice:crx:b"}});
        assert!(HostCgroup::for_sandbox(&systemd).unwrap().dirs().is_empty());
    }
}
