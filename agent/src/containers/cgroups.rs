//! The cgroup v2 side of containers: limits (pod and container), freezing, figures and
//! process lists, read from and written to the cgroup files directly.
//!
//! cgroup v2 only: the guest kernel mounts cgroup2 with its controllers enabled. On a
//! host whose `/sys/fs/cgroup` is something else (cgroup v1) every call here says
//! "cgroup v2 not available" rather than reading v1 files that mean something else.
//! Every container's cgroup lives under the pod cgroup ([`POD_CGROUP_NAME`]), which
//! carries the pod's limits.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crx_protocols::v1::metrics::{
    CgroupMetrics, CpuStat, IoEntry, IoStat, MemoryEvents, MemoryStat, PidsStat,
};
use libcontainer::oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};
use tokio::time::Instant;

/// Where the agent mounts cgroup2.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The pod cgroup under [`CGROUP_ROOT`]; `spec.rs` puts every container under it
/// (`/crx/<id>`), whatever cgroupsPath the host's spec names.
pub const POD_CGROUP_NAME: &str = "crx";
/// Largest accepted LinuxResources JSON (container.proto, sandbox.proto).
pub const MAX_RESOURCES_BYTES: usize = 64 << 10;
/// Most pids ListPids returns (container.proto).
pub const MAX_PIDS: usize = 65536;
/// Longest a freeze or thaw may take, whatever the request's deadline.
const FREEZE_WAIT: Duration = Duration::from_secs(10);
/// How often cgroup.events is re-read while waiting for a freeze.
const FREEZE_POLL: Duration = Duration::from_millis(10);
/// Deepest nesting of child cgroups ListPids walks.
const MAX_DEPTH: usize = 16;
/// What a cgroup file's "max" is reported as (metrics.proto).
pub const UNLIMITED: u64 = u64::MAX;
/// Controllers the pod cgroup hands down to its containers.
const POD_CONTROLLERS: &[&str] = &["cpuset", "cpu", "io", "memory", "pids"];

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/sys/fs/cgroup` is not cgroup2 (a cgroup v1 host).
    #[error("cgroup v2 not available: {} is not a cgroup2 file system", .0.display())]
    NotV2(PathBuf),
    /// The resources JSON is over [`MAX_RESOURCES_BYTES`].
    #[error("linux_resources is {0} bytes; the limit is {MAX_RESOURCES_BYTES}")]
    TooLarge(usize),
    /// Not an OCI LinuxResources object.
    #[error("linux_resources is not a valid OCI runtime-spec LinuxResources object")]
    Parse(#[source] serde_json::Error),
    /// A value no cgroup v2 file can take.
    #[error("linux_resources: {0}")]
    Invalid(String),
    /// The kernel refused a value (EINVAL, ERANGE).
    #[error("the kernel refused {value:?} for {}", .path.display())]
    Refused {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    /// A limit needs a controller the cgroup does not have.
    #[error("cgroup {} has no {controller} controller (the kernel or the pod cgroup lacks it)", .path.display())]
    MissingController {
        path: PathBuf,
        controller: &'static str,
    },
    /// The cgroupsPath leaves the cgroup root.
    #[error("cgroups path {0:?} must not contain '..'")]
    BadPath(PathBuf),
    /// Reading or writing a cgroup file failed.
    #[error("cannot {action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cgroup.events did not report the state in time.
    #[error("cgroup {} was not {state} after {waited:?}", .path.display())]
    FreezeTimeout {
        path: PathBuf,
        state: &'static str,
        waited: Duration,
    },
    /// More processes than a reply may carry.
    #[error("cgroup {} holds more than {MAX_PIDS} processes", .0.display())]
    TooManyPids(PathBuf),
}

/// Checks that `root` is a cgroup2 mount.
pub fn check_v2(root: &Path) -> Result<(), CgroupError> {
    match nix::sys::statfs::statfs(root) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Ok(()),
        _ => Err(CgroupError::NotV2(root.to_path_buf())),
    }
}

/// The directory of the cgroup a spec's `cgroupsPath` names (absolute or not, it is
/// taken below `root`, as libcontainer does without systemd).
pub fn cgroup_dir(root: &Path, cgroups_path: &Path) -> Result<PathBuf, CgroupError> {
    let mut dir = root.to_path_buf();
    for part in cgroups_path.components() {
        match part {
            Component::Normal(name) => dir.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CgroupError::BadPath(cgroups_path.to_path_buf()))
            }
        }
    }
    Ok(dir)
}

/// Parses a LinuxResources JSON object (bounded).
pub fn parse_resources(raw: &[u8]) -> Result<LinuxResources, CgroupError> {
    if raw.len() > MAX_RESOURCES_BYTES {
        return Err(CgroupError::TooLarge(raw.len()));
    }
    serde_json::from_slice(raw).map_err(CgroupError::Parse)
}

/// Creates the pod cgroup if needed, hands its controllers down to the containers'
/// cgroups and applies the pod's limits (cpu, memory, pids) to it. Call before the
/// pod's first container is created (CreateSandbox).
pub fn apply_pod_resources(resources: &LinuxResources) -> Result<(), CgroupError> {
    let root = Path::new(CGROUP_ROOT);
    check_v2(root)?;
    set_up_pod_cgroup(&root.join(POD_CGROUP_NAME), resources)
}

/// Creates the pod cgroup `pod` (if missing), enables its controllers for the
/// containers below it and applies `resources`.
fn set_up_pod_cgroup(pod: &Path, resources: &LinuxResources) -> Result<(), CgroupError> {
    match std::fs::create_dir(pod) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(CgroupError::Io {
                action: "create the pod cgroup",
                path: pod.to_path_buf(),
                source,
            })
        }
    }
    let available = controllers(pod)?;
    for controller in POD_CONTROLLERS {
        if available.iter().any(|c| c == controller) {
            // One write per controller, so one refusal does not cost the others.
            if let Err(e) = write(
                &pod.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            ) {
                tracing::warn!(controller, error = %crate::server::error_chain(&e), "cannot hand a controller down to container cgroups");
            }
        }
    }
    apply(pod, resources)
}

/// [`apply_pod_resources`] from LinuxResources JSON (sandbox.proto's `pod_resources`);
/// empty means no limits.
pub fn apply_pod_resources_json(raw: &[u8]) -> Result<(), CgroupError> {
    let resources = if raw.is_empty() {
        LinuxResources::default()
    } else {
        parse_resources(raw)?
    };
    apply_pod_resources(&resources)
}

/// Applies the cpu, memory and pids parts of `resources` to the cgroup at `dir`. Every
/// value is checked before the first write; other parts (devices, block I/O, hugepages)
/// are not changed.
pub fn apply(dir: &Path, resources: &LinuxResources) -> Result<(), CgroupError> {
    let cpu = resources.cpu().as_ref().map(cpu_writes).transpose()?;
    let memory = resources.memory().as_ref().map(memory_writes).transpose()?;
    let pids = resources.pids().as_ref().map(|p| {
        let limit = p.limit();
        if limit > 0 {
            limit.to_string()
        } else {
            "max".to_owned()
        }
    });
    let available = controllers(dir)?;
    let need = |controller: &'static str, wanted: bool| {
        if wanted && !available.iter().any(|c| c == controller) {
            return Err(CgroupError::MissingController {
                path: dir.to_path_buf(),
                controller,
            });
        }
        Ok(())
    };
    need("cpu", cpu.as_ref().is_some_and(|c| !c.is_empty()))?;
    need("memory", memory.as_ref().is_some_and(|m| !m.is_empty()))?;
    need("pids", pids.is_some())?;

    for (file, value) in cpu.into_iter().flatten() {
        let value = match value {
            CpuMax::Set(v) => v,
            // Period only: keep the quota the cgroup has.
            CpuMax::PeriodOnly(period) => {
                let current = read(&dir.join("cpu.max"))?;
                let quota = current
                    .split_whitespace()
                    .next()
                    .unwrap_or("max")
                    .to_owned();
                format!("{quota} {period}")
            }
        };
        write(&dir.join(file), &value)?;
    }
    for (file, value) in memory.into_iter().flatten() {
        let path = dir.join(file);
        // Without swap accounting there is no swap to leave unlimited.
        if file == "memory.swap.max" && value == "max" && !path.exists() {
            continue;
        }
        write(&path, &value)?;
    }
    if let Some(value) = pids {
        write(&dir.join("pids.max"), &value)?;
    }
    Ok(())
}

/// A cpu.max value, or a period whose quota must be read first.
enum CpuMax {
    Set(String),
    PeriodOnly(u64),
}

fn cpu_writes(cpu: &LinuxCpu) -> Result<Vec<(&'static str, CpuMax)>, CgroupError> {
    if cpu.realtime_runtime().is_some_and(|r| r > 0) || cpu.realtime_period().is_some_and(|p| p > 0)
    {
        return Err(CgroupError::Invalid(
            "realtime cpu limits do not exist in cgroup v2".into(),
        ));
    }
    let mut writes = Vec::new();
    if let Some(weight) = cpu.shares().and_then(shares_to_weight) {
        writes.push(("cpu.weight", CpuMax::Set(weight.to_string())));
    }
    let quota = |q: i64| {
        if q > 0 {
            q.to_string()
        } else {
            "max".to_owned()
        }
    };
    match (cpu.quota(), cpu.period()) {
        (Some(q), Some(p)) => writes.push(("cpu.max", CpuMax::Set(format!("{} {p}", quota(q))))),
        (Some(q), None) => writes.push(("cpu.max", CpuMax::Set(quota(q)))),
        (None, Some(p)) => writes.push(("cpu.max", CpuMax::PeriodOnly(p))),
        (None, None) => {}
    }
    Ok(writes)
}

/// cgroup v1 cpu shares (2-262144, default 1024) as a cgroup v2 cpu.weight (1-10000,
/// default 100) on the curve runc and crun use, so 1024 stays 100 and both ends meet;
/// 0 (unset) is `None`. Kept identical to libcontainer's, which applies create-time
/// limits, so a container's weight does not change when an update repeats its shares.
pub fn shares_to_weight(shares: u64) -> Option<u64> {
    const MIN_SHARES: u64 = 2;
    const MAX_SHARES: u64 = 262_144;
    const MAX_WEIGHT: u64 = 10_000;
    match shares {
        0 => None,
        s if s <= MIN_SHARES => Some(1),
        s if s >= MAX_SHARES => Some(MAX_WEIGHT),
        s => {
            let log = (s as f64).log2();
            let exponent = (log * log + 125.0 * log) / 612.0 - 7.0 / 34.0;
            // The float is at most 10000 here, so the cast cannot truncate.
            Some((10f64.powf(exponent).ceil() as u64).clamp(1, MAX_WEIGHT))
        }
    }
}

fn memory_writes(memory: &LinuxMemory) -> Result<Vec<(&'static str, String)>, CgroupError> {
    let value = |what: &str, v: i64| match v {
        -1 => Ok("max".to_owned()),
        v if v < -1 => Err(CgroupError::Invalid(format!(
            "memory.{what} {v} is below -1"
        ))),
        v => Ok(v.to_string()),
    };
    let mut writes = Vec::new();
    // OCI's swap is memory + swap (the v1 meaning); v2's memory.swap.max is swap alone.
    match (memory.limit(), memory.swap()) {
        (None, Some(_)) => {
            return Err(CgroupError::Invalid(
                "memory.swap needs memory.limit in the same request".into(),
            ))
        }
        (Some(0), _) | (None, None) => {}
        (Some(limit), swap) => {
            let max = value("limit", limit)?;
            match swap {
                Some(-1) => writes.push(("memory.swap.max", "max".to_owned())),
                Some(swap) if swap < -1 => {
                    return Err(CgroupError::Invalid(format!(
                        "memory.swap {swap} is below -1"
                    )))
                }
                Some(swap) if limit == -1 => writes.push(("memory.swap.max", swap.to_string())),
                Some(swap) if swap < limit => {
                    return Err(CgroupError::Invalid(format!(
                        "memory.swap {swap} (memory + swap) is below memory.limit {limit}"
                    )))
                }
                Some(swap) => writes.push(("memory.swap.max", (swap - limit).to_string())),
                None if limit == -1 => writes.push(("memory.swap.max", "max".to_owned())),
                None => {}
            }
            writes.push(("memory.max", max));
        }
    }
    if let Some(reservation) = memory.reservation() {
        writes.push(("memory.low", value("reservation", reservation)?));
    }
    Ok(writes)
}

/// Freezes (or thaws) the cgroup and waits until cgroup.events says it is, at most
/// until `deadline` (and never more than [`FREEZE_WAIT`]). A freeze that does not
/// complete in time is undone, so a timed-out pause leaves the container running.
pub async fn set_frozen(dir: &Path, frozen: bool, deadline: Instant) -> Result<(), CgroupError> {
    let started = Instant::now();
    let deadline = deadline.min(started + FREEZE_WAIT);
    let freeze_file = dir.join("cgroup.freeze");
    write(&freeze_file, if frozen { "1" } else { "0" })?;
    let events = dir.join("cgroup.events");
    loop {
        let text = read(&events)?;
        if flat_keyed(&text).any(|(k, v)| k == "frozen" && (v == 1) == frozen) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if frozen {
                let _ = write(&freeze_file, "0");
            }
            return Err(CgroupError::FreezeTimeout {
                path: dir.to_path_buf(),
                state: if frozen { "frozen" } else { "thawed" },
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(FREEZE_POLL).await;
    }
}

/// The cgroup's figures; a file the kernel lacks (or a controller not enabled) leaves
/// its fields 0, a missing cgroup is an error.
pub fn stats(dir: &Path) -> Result<CgroupMetrics, CgroupError> {
    // cgroup.procs exists in every cgroup: its absence means the cgroup is gone.
    read(&dir.join("cgroup.procs"))?;
    let optional = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let single = |name: &str| optional(name).and_then(|t| single_value(&t)).unwrap_or(0);

    let mut metrics = CgroupMetrics::new();
    let mut pids = PidsStat::new();
    pids.current = single("pids.current");
    pids.limit = single("pids.max");
    metrics.pids = Some(pids).into();
    metrics.cpu = Some(cpu_stat(optional("cpu.stat").as_deref().unwrap_or(""))).into();

    let mut memory = memory_stat(optional("memory.stat").as_deref().unwrap_or(""));
    memory.usage = single("memory.current");
    memory.usage_limit = single("memory.max");
    memory.swap_usage = single("memory.swap.current");
    memory.swap_limit = single("memory.swap.max");
    memory.max_usage = single("memory.peak");
    memory.swap_max_usage = single("memory.swap.peak");
    metrics.memory = Some(memory).into();
    metrics.memory_events = Some(memory_events(
        optional("memory.events").as_deref().unwrap_or(""),
    ))
    .into();
    let mut io = IoStat::new();
    io.usage = io_stat(optional("io.stat").as_deref().unwrap_or(""));
    metrics.io = Some(io).into();
    Ok(metrics)
}

/// The oom_kill count of the cgroup's memory.events (`None` without the file).
pub fn oom_kill_count(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("memory.events")).ok()?;
    let count = flat_keyed(&text)
        .find(|(k, _)| *k == "oom_kill")
        .map(|(_, v)| v);
    count
}

/// Every process of the cgroup and its child cgroups (a container may make its own),
/// at most [`MAX_PIDS`].
pub fn procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let mut pids = Vec::new();
    collect_procs(dir, dir, 0, &mut pids)?;
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

fn collect_procs(
    top: &Path,
    dir: &Path,
    depth: usize,
    pids: &mut Vec<i32>,
) -> Result<(), CgroupError> {
    let text = read(&dir.join("cgroup.procs"))?;
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pids.len() >= MAX_PIDS {
            return Err(CgroupError::TooManyPids(top.to_path_buf()));
        }
        pids.push(pid);
    }
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        // Child cgroups are directories; a child removed meanwhile is skipped.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            match collect_procs(top, &entry.path(), depth + 1, pids) {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                }
                other => other?,
            }
        }
    }
    Ok(())
}

/// The controllers enabled for the cgroup (its cgroup.controllers).
fn controllers(dir: &Path) -> Result<Vec<String>, CgroupError> {
    Ok(read(&dir.join("cgroup.controllers"))?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| {
        if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::ERANGE)) {
            CgroupError::Refused {
                path: path.to_path_buf(),
                value: value.to_owned(),
                source,
            }
        } else {
            CgroupError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, cgroup.events); lines
/// that are not a key and a number are skipped.
pub fn flat_keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|line| {
        let mut parts = line.split_whitespace();
        let key = parts.next()?;
        let value = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((key, value))
    })
}

/// A one-value file (memory.current, pids.max, ...): a number, or "max" as
/// [`UNLIMITED`].
pub fn single_value(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(UNLIMITED),
        t => t.parse().ok(),
    }
}

/// cpu.stat (microseconds and counts).
pub fn cpu_stat(text: &str) -> CpuStat {
    let mut cpu = CpuStat::new();
    for (key, value) in flat_keyed(text) {
        match key {
            "usage_usec" => cpu.usage_usec = value,
            "user_usec" => cpu.user_usec = value,
            "system_usec" => cpu.system_usec = value,
            "nr_periods" => cpu.nr_periods = value,
            "nr_throttled" => cpu.nr_throttled = value,
            "throttled_usec" => cpu.throttled_usec = value,
            _ => {}
        }
    }
    cpu
}

/// memory.stat. Kernels from 5.9 split `workingset_*` into `_anon` and `_file`; their
/// sum fills the one field containerd's message has.
pub fn memory_stat(text: &str) -> MemoryStat {
    let mut m = MemoryStat::new();
    for (key, value) in flat_keyed(text) {
        let field = match key {
            "anon" => &mut m.anon,
            "file" => &mut m.file,
            "kernel_stack" => &mut m.kernel_stack,
            "slab" => &mut m.slab,
            "sock" => &mut m.sock,
            "shmem" => &mut m.shmem,
            "file_mapped" => &mut m.file_mapped,
            "file_dirty" => &mut m.file_dirty,
            "file_writeback" => &mut m.file_writeback,
            "anon_thp" => &mut m.anon_thp,
            "inactive_anon" => &mut m.inactive_anon,
            "active_anon" => &mut m.active_anon,
            "inactive_file" => &mut m.inactive_file,
            "active_file" => &mut m.active_file,
            "unevictable" => &mut m.unevictable,
            "slab_reclaimable" => &mut m.slab_reclaimable,
            "slab_unreclaimable" => &mut m.slab_unreclaimable,
            "pgfault" => &mut m.pgfault,
            "pgmajfault" => &mut m.pgmajfault,
            "workingset_refault" | "workingset_refault_anon" | "workingset_refault_file" => {
                &mut m.workingset_refault
            }
            "workingset_activate" | "workingset_activate_anon" | "workingset_activate_file" => {
                &mut m.workingset_activate
            }
            "workingset_nodereclaim" => &mut m.workingset_nodereclaim,
            "pgrefill" => &mut m.pgrefill,
            "pgscan" => &mut m.pgscan,
            "pgsteal" => &mut m.pgsteal,
            "pgactivate" => &mut m.pgactivate,
            "pgdeactivate" => &mut m.pgdeactivate,
            "pglazyfree" => &mut m.pglazyfree,
            "pglazyfreed" => &mut m.pglazyfreed,
            "thp_fault_alloc" => &mut m.thp_fault_alloc,
            "thp_collapse_alloc" => &mut m.thp_collapse_alloc,
            _ => continue,
        };
        *field = field.saturating_add(value);
    }
    m
}

/// memory.events.
pub fn memory_events(text: &str) -> MemoryEvents {
    let mut e = MemoryEvents::new();
    for (key, value) in flat_keyed(text) {
        match key {
            "low" => e.low = value,
            "high" => e.high = value,
            "max" => e.max = value,
            "oom" => e.oom = value,
            "oom_kill" => e.oom_kill = value,
            _ => {}
        }
    }
    e
}

/// io.stat: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...` per device.
pub fn io_stat(text: &str) -> Vec<IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parts.next()?.split_once(':')?;
            let mut entry = IoEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            for pair in parts {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let Ok(value) = value.parse() else { continue };
                match key {
                    "rbytes" => entry.rbytes = value,
                    "wbytes" => entry.wbytes = value,
                    "rios" => entry.rios = value,
                    "wios" => entry.wios = value,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_values_read_max_as_unlimited() {
        assert_eq!(single_value("max\n"), Some(UNLIMITED));
        assert_eq!(single_value("33554432\n"), Some(33_554_432));
        assert_eq!(single_value("garbage"), None);
    }

    #[test]
    fn cpu_stat_fills_every_field_and_ignores_unknown_keys() {
        let cpu = cpu_stat(
            "usage_usec 1200\nuser_usec 700\nsystem_usec 500\ncore_sched.force_idle_usec 0\n\
             nr_periods 10\nnr_throttled 3\nthrottled_usec 42\nnr_bursts 0\n",
        );
        assert_eq!(
            (cpu.usage_usec, cpu.user_usec, cpu.system_usec),
            (1200, 700, 500)
        );
        assert_eq!(
            (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec),
            (10, 3, 42)
        );
    }

    #[test]
    fn memory_stat_sums_split_workingset_counters() {
        let m = memory_stat(
            "anon 4096\nfile 8192\nshmem 100\nworkingset_refault_anon 2\n\
             workingset_refault_file 5\nworkingset_activate_anon 1\npgfault 77\nbogus line here\n",
        );
        assert_eq!((m.anon, m.file, m.shmem, m.pgfault), (4096, 8192, 100, 77));
        assert_eq!((m.workingset_refault, m.workingset_activate), (7, 1));
    }

    #[test]
    fn memory_events_and_io_stat_parse() {
        let e = memory_events("low 0\nhigh 1\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n");
        assert_eq!((e.high, e.max, e.oom, e.oom_kill), (1, 9, 2, 2));
        let io =
            io_stat("254:0 rbytes=4096 wbytes=512 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=1\n");
        assert_eq!(io.len(), 2);
        assert_eq!(
            (
                io[0].major,
                io[0].minor,
                io[0].rbytes,
                io[0].wbytes,
                io[0].rios,
                io[0].wios
            ),
            (254, 0, 4096, 512, 1, 2)
        );
        assert_eq!((io[1].major, io[1].minor, io[1].rbytes), (8, 16, 1));
    }

    #[test]
    fn shares_map_onto_weights_like_the_runtimes_do() {
        assert_eq!(shares_to_weight(0), None);
        assert_eq!(shares_to_weight(2), Some(1));
        assert_eq!(shares_to_weight(1024), Some(100));
        assert_eq!(shares_to_weight(262_144), Some(10_000));
        let w = shares_to_weight(512).unwrap_or(0);
        assert!((2..100).contains(&w), "512 shares gave weight {w}");
    }

    #[test]
    fn cgroups_paths_stay_under_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(root, Path::new("/crx/c1")).unwrap(),
            Path::new("/sys/fs/cgroup/crx/c1")
        );
        assert_eq!(
            cgroup_dir(root, Path::new("pod/c1")).unwrap(),
            Path::new("/sys/fs/cgroup/pod/c1")
        );
        assert!(cgroup_dir(root, Path::new("/crx/../../etc")).is_err());
    }

    #[test]
    fn resources_turn_into_v2_values_and_bad_ones_are_refused_before_writing() {
        let r = parse_resources(
            br#"{"memory":{"limit":33554432,"swap":67108864},"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":0}}"#,
        )
        .unwrap();
        let mem = memory_writes(r.memory().as_ref().unwrap()).unwrap();
        assert_eq!(
            mem,
            vec![
                ("memory.swap.max", "33554432".to_owned()),
                ("memory.max", "33554432".to_owned())
            ]
        );
        let cpu = cpu_writes(r.cpu().as_ref().unwrap()).unwrap();
        let values: Vec<String> = cpu
            .into_iter()
            .map(|(f, v)| match v {
                CpuMax::Set(v) => format!("{f}={v}"),
                CpuMax::PeriodOnly(p) => format!("{f}=?{p}"),
            })
            .collect();
        assert_eq!(values, ["cpu.weight=100", "cpu.max=50000 100000"]);

        let bad = parse_resources(br#"{"memory":{"limit":33554432,"swap":1024}}"#).unwrap();
        assert!(matches!(
            memory_writes(bad.memory().as_ref().unwrap()),
            Err(CgroupError::Invalid(_))
        ));
        assert!(matches!(
            parse_resources(b"{\"memory\":"),
            Err(CgroupError::Parse(_))
        ));
        assert!(matches!(
            parse_resources(&vec![b' '; MAX_RESOURCES_BYTES + 1]),
            Err(CgroupError::TooLarge(_))
        ));
    }

    #[test]
    fn the_pod_cgroup_hands_its_controllers_down_and_carries_the_pod_limits() {
        let pod = std::env::temp_dir().join(format!("crx-pod-cgroup-unit-{}", std::process::id()));
        std::fs::create_dir_all(&pod).unwrap();
        // A real cgroup has these files from mkdir on; the fake gets them up front.
        std::fs::write(pod.join("cgroup.controllers"), "memory pids\n").unwrap();
        let r =
            parse_resources(br#"{"memory":{"limit":268435456},"pids":{"limit":1000}}"#).unwrap();
        set_up_pod_cgroup(&pod, &r).unwrap();
        // Each controller is its own write; the fake file keeps the last.
        assert_eq!(
            std::fs::read_to_string(pod.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        assert_eq!(
            std::fs::read_to_string(pod.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(
            std::fs::read_to_string(pod.join("pids.max")).unwrap(),
            "1000"
        );
        std::fs::remove_dir_all(&pod).unwrap();
        // A directory that is not cgroup2 (as /sys/fs/cgroup on a v1 host) is refused.
        assert!(matches!(
            check_v2(&std::env::temp_dir()),
            Err(CgroupError::NotV2(_))
        ));
    }

    #[test]
    fn apply_writes_limits_into_a_cgroup_directory_that_has_the_controllers() {
        let dir = std::env::temp_dir().join(format!("crx-cgroup-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(dir.join("cpu.max"), "max 100000\n").unwrap();
        let r = parse_resources(br#"{"memory":{"limit":1048576},"cpu":{"period":50000}}"#).unwrap();
        apply(&dir, &r).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "max 50000"
        );
        let pids = parse_resources(br#"{"pids":{"limit":5}}"#).unwrap();
        assert!(matches!(
            apply(&dir, &pids),
            Err(CgroupError::MissingController {
                controller: "pids",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
