//! `crx-bench fs`, back end direct: crx's virtio-fs server against the same
//! syscalls straight on the host directory, side by side in one run, no guest.
//!
//! The guest side is played by crx-vmm's [`FuseDriver`]: each FUSE request is
//! written into plain guest memory as a descriptor chain and served by the same
//! queue code the `crx-fs` device thread runs. Each operation is what a Linux guest
//! sends for the syscalls on a cold cache, against what those syscalls cost on the
//! host (relative to a directory fd, as the server works):
//!
//! | op | through crx (FUSE requests) | host |
//! |---|---|---|
//! | create | CREATE + WRITE 4 KiB + RELEASE | openat(O_CREAT) + write + close |
//! | stat | LOOKUP (name not cached in the guest) | fstatat |
//! | stat_warm | GETATTR (name cached, attributes expired) | fstatat |
//! | read | OPEN + READ 4 KiB + RELEASE | openat + read + close |
//! | unlink | UNLINK + FORGET | unlinkat |
//! | big read | READ 1 MiB requests of a cached file | pread 1 MiB |
//! | big write | WRITE 1 MiB requests | pwrite 1 MiB |
//!
//! Each round runs every phase on both sides (host first, then crx, on fresh
//! subdirectories); the rates are the medians over the rounds and each ratio is the
//! median of the rounds' crx/host ratios.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use crx_vmm::devices::virtio::fs::bench::{FuseDriver, MAX_IO, ROOT_ID};
use serde_json::{json, Value};

use super::stats::Summary;

/// Small files per round and their size.
pub const SMALL_FILE_BYTES: usize = 4096;
/// The back-end-direct target: crx's ops/s and MB/s at least this share of the host's.
pub const TARGET_RATIO: f64 = 0.5;

/// What to measure.
#[derive(Clone, Debug)]
pub struct FsBenchConfig {
    pub files: usize,
    pub big_file_mib: usize,
    pub rounds: usize,
}

impl Default for FsBenchConfig {
    fn default() -> Self {
        Self {
            files: 2000,
            big_file_mib: 64,
            rounds: 5,
        }
    }
}

/// The small-file operations, in the order each round runs them.
const SMALL_OPS: [&str; 5] = ["create", "stat", "stat_warm", "read", "unlink"];
const BIG_OPS: [&str; 2] = ["big_read", "big_write"];

/// One round's rates: small ops in ops/s, big ops in MB/s (10^6 bytes).
#[derive(Default)]
struct Rates {
    crx: Vec<(&'static str, f64)>,
    host: Vec<(&'static str, f64)>,
}

fn cstr(name: &str) -> Result<CString> {
    CString::new(name).map_err(|e| anyhow!("file name {name:?}: {e}"))
}

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn open_dir(path: &Path) -> Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid C string; the fd is checked and then owned by the File.
    let fd = check(
        unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        },
        "open the bench directory",
    )?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn rate(count: usize, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

/// The host's own syscalls, relative to the directory fd `dir`.
fn host_small(dir: RawFd, names: &[CString], out: &mut Vec<(&'static str, f64)>) -> Result<()> {
    let data = vec![0x5au8; SMALL_FILE_BYTES];
    let mut buf = vec![0u8; SMALL_FILE_BYTES];
    let t = Instant::now();
    for name in names {
        // SAFETY: `name` is a valid C string and `data` a live buffer; every result is
        // checked and each fd closed once.
        unsafe {
            let fd = check(
                libc::openat(
                    dir,
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o644,
                ),
                "host create",
            )?;
            let n = libc::write(fd, data.as_ptr().cast(), data.len());
            libc::close(fd);
            if n != data.len() as isize {
                bail!("host write: short or failed ({n})");
            }
        }
    }
    out.push(("create", rate(names.len(), t)));
    let t = Instant::now();
    for name in names {
        // SAFETY: `st` is a valid out buffer for fstatat.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            check(
                libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW),
                "host stat",
            )?;
        }
    }
    out.push(("stat", rate(names.len(), t)));
    let t = Instant::now();
    for name in names {
        // SAFETY: `st` is a valid out buffer for fstatat.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            check(
                libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW),
                "host stat",
            )?;
        }
    }
    out.push(("stat_warm", rate(names.len(), t)));
    let t = Instant::now();
    for name in names {
        // SAFETY: as for create; `buf` is a live buffer of its length.
        unsafe {
            let fd = check(
                libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
                "host open",
            )?;
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            if n != SMALL_FILE_BYTES as isize {
                bail!("host read: short or failed ({n})");
            }
        }
    }
    out.push(("read", rate(names.len(), t)));
    let t = Instant::now();
    for name in names {
        // SAFETY: `name` is a valid C string.
        let rc = unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
        check(rc, "host unlink")?;
    }
    out.push(("unlink", rate(names.len(), t)));
    Ok(())
}

fn fuse_err(what: &str) -> impl Fn(i32) -> anyhow::Error + '_ {
    move |errno| {
        anyhow!(
            "{what} through crx's server: {}",
            std::io::Error::from_raw_os_error(errno.max(0))
        )
    }
}

/// The same operations as FUSE requests through crx's server; `parent` is the
/// node id of the round's subdirectory.
fn crx_small(
    d: &mut FuseDriver,
    parent: u64,
    names: &[String],
    out: &mut Vec<(&'static str, f64)>,
) -> Result<()> {
    let data = vec![0x5au8; SMALL_FILE_BYTES];
    let mut nodes = Vec::with_capacity(names.len());
    let t = Instant::now();
    for name in names {
        let (entry, fh) = d
            .create(parent, name, 0o644, libc::O_WRONLY | libc::O_TRUNC)
            .map_err(fuse_err("create"))?;
        let n = d
            .write(entry.nodeid, fh, 0, &data)
            .map_err(fuse_err("write"))?;
        d.release(entry.nodeid, fh).map_err(fuse_err("release"))?;
        if n as usize != data.len() {
            bail!("crx write: short ({n})");
        }
        nodes.push(entry.nodeid);
    }
    out.push(("create", rate(names.len(), t)));
    let t = Instant::now();
    for name in names {
        d.lookup(parent, name).map_err(fuse_err("lookup"))?;
    }
    out.push(("stat", rate(names.len(), t)));
    let t = Instant::now();
    for &node in &nodes {
        d.getattr(node).map_err(fuse_err("getattr"))?;
    }
    out.push(("stat_warm", rate(names.len(), t)));
    let t = Instant::now();
    for &node in &nodes {
        let fh = d.open(node, libc::O_RDONLY).map_err(fuse_err("open"))?;
        let n = d
            .read_len(node, fh, 0, SMALL_FILE_BYTES as u32)
            .map_err(fuse_err("read"))?;
        d.release(node, fh).map_err(fuse_err("release"))?;
        if n != SMALL_FILE_BYTES {
            bail!("crx read: short ({n})");
        }
    }
    out.push(("read", rate(names.len(), t)));
    let t = Instant::now();
    for (name, &node) in names.iter().zip(&nodes) {
        d.unlink(parent, name).map_err(fuse_err("unlink"))?;
        // CREATE and LOOKUP each took a reference the guest now drops.
        d.forget(node, 2);
    }
    out.push(("unlink", rate(names.len(), t)));
    Ok(())
}

fn mb_s(bytes: usize, started: Instant) -> f64 {
    bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9)
}

fn host_big(path: &Path, mib: usize, out: &mut Vec<(&'static str, f64)>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0xa5u8; MAX_IO];
    let t = Instant::now();
    for i in 0..mib {
        file.write_all_at(&chunk, (i * MAX_IO) as u64)?;
    }
    out.push(("big_write", mb_s(mib * MAX_IO, t)));
    let mut buf = vec![0u8; MAX_IO];
    let t = Instant::now();
    for i in 0..mib {
        file.read_exact_at(&mut buf, (i * MAX_IO) as u64)?;
    }
    out.push(("big_read", mb_s(mib * MAX_IO, t)));
    drop(file);
    std::fs::remove_file(path)?;
    Ok(())
}

fn crx_big(
    d: &mut FuseDriver,
    parent: u64,
    mib: usize,
    out: &mut Vec<(&'static str, f64)>,
) -> Result<()> {
    let (entry, fh) = d
        .create(parent, "big", 0o644, libc::O_RDWR | libc::O_TRUNC)
        .map_err(fuse_err("create"))?;
    let node = entry.nodeid;
    d.prepare_write_payload(&vec![0xa5u8; MAX_IO])
        .map_err(fuse_err("prepare"))?;
    let t = Instant::now();
    for i in 0..mib {
        let n = d
            .write_prepared(node, fh, (i * MAX_IO) as u64, MAX_IO as u32)
            .map_err(fuse_err("write"))?;
        if n as usize != MAX_IO {
            bail!("crx big write: short ({n})");
        }
    }
    out.push(("big_write", mb_s(mib * MAX_IO, t)));
    let t = Instant::now();
    for i in 0..mib {
        let n = d
            .read_len(node, fh, (i * MAX_IO) as u64, MAX_IO as u32)
            .map_err(fuse_err("read"))?;
        if n != MAX_IO {
            bail!("crx big read: short ({n})");
        }
    }
    out.push(("big_read", mb_s(mib * MAX_IO, t)));
    d.release(node, fh).map_err(fuse_err("release"))?;
    d.unlink(parent, "big").map_err(fuse_err("unlink"))?;
    d.forget(node, 1);
    Ok(())
}

fn one_round(
    d: &mut FuseDriver,
    share: &Path,
    round: usize,
    config: &FsBenchConfig,
) -> Result<Rates> {
    let mut rates = Rates::default();
    let host_dir = share.join(format!("host-{round}"));
    std::fs::create_dir(&host_dir)?;
    let names: Vec<String> = (0..config.files).map(|i| format!("f{i:06}")).collect();
    let cnames = names.iter().map(|n| cstr(n)).collect::<Result<Vec<_>>>()?;
    let dir = open_dir(&host_dir)?;
    host_small(dir.as_raw_fd(), &cnames, &mut rates.host)?;
    host_big(&host_dir.join("big"), config.big_file_mib, &mut rates.host)?;
    drop(dir);
    std::fs::remove_dir(&host_dir)?;

    let sub = format!("crx-{round}");
    let entry = d.mkdir(ROOT_ID, &sub, 0o755).map_err(fuse_err("mkdir"))?;
    crx_small(d, entry.nodeid, &names, &mut rates.crx)?;
    crx_big(d, entry.nodeid, config.big_file_mib, &mut rates.crx)?;
    d.rmdir(ROOT_ID, &sub).map_err(fuse_err("rmdir"))?;
    d.forget(entry.nodeid, 1);
    Ok(rates)
}

/// Figures of one side for one op over the rounds.
fn summary(rounds: &[Rates], op: &str, crx: bool) -> Option<Summary> {
    let samples: Vec<f64> = rounds
        .iter()
        .flat_map(|r| if crx { &r.crx } else { &r.host })
        .filter(|(name, _)| *name == op)
        .map(|(_, v)| *v)
        .collect();
    Summary::of(&samples)
}

/// Runs the back-end-direct benchmark in a fresh directory under `parent` (the
/// system temp dir if None); prints the figures and returns the JSON object.
pub fn run(config: &FsBenchConfig, parent: Option<&Path>) -> Result<Value> {
    let tmp = match parent {
        Some(p) => tempfile::Builder::new()
            .prefix("crx-bench-fs-")
            .tempdir_in(p)?,
        None => tempfile::Builder::new().prefix("crx-bench-fs-").tempdir()?,
    };
    let share = tmp.path().join("share");
    std::fs::create_dir(&share)?;
    let mut driver = FuseDriver::for_dir(&share).context("start crx's virtio-fs server")?;
    driver.init().map_err(fuse_err("FUSE INIT"))?;
    println!(
        "crx-bench fs: back end direct (no guest), {} rounds of {} files x {} KiB and a {} MiB file, in {}",
        config.rounds,
        config.files,
        SMALL_FILE_BYTES / 1024,
        config.big_file_mib,
        share.display()
    );
    let mut rounds = Vec::with_capacity(config.rounds);
    for round in 0..config.rounds {
        rounds.push(one_round(&mut driver, &share, round, config)?);
    }
    let mut ops = serde_json::Map::new();
    let mut min_ratio = f64::INFINITY;
    for (op, unit) in SMALL_OPS
        .iter()
        .map(|op| (*op, "ops/s"))
        .chain(BIG_OPS.iter().map(|op| (*op, "MB/s")))
    {
        let (Some(crx), Some(host)) = (summary(&rounds, op, true), summary(&rounds, op, false))
        else {
            bail!("no samples for {op}");
        };
        // Host and crx of one round ran back to back: their ratio is steadier on a
        // busy machine than the ratio of the two medians.
        let per_round: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                let get = |v: &[(&str, f64)]| v.iter().find(|(n, _)| *n == op).map(|(_, x)| *x);
                Some(get(&r.crx)? / get(&r.host)?)
            })
            .collect();
        let Some(ratios) = Summary::of(&per_round) else {
            bail!("no ratio for {op}");
        };
        let ratio = ratios.median;
        min_ratio = min_ratio.min(ratio);
        println!(
            "{op:<10} crx {:>12.0} {unit:<5} | host {:>12.0} {unit:<5} | ratio {ratio:.2}",
            crx.median, host.median
        );
        ops.insert(
            op.to_string(),
            json!({ "unit": unit, "crx": crx, "host": host, "ratio": ratio, "ratio_per_round": ratios }),
        );
    }
    println!(
        "lowest ratio {min_ratio:.2} (target >= {TARGET_RATIO}): {}",
        if min_ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(json!({
        "benchmark": "fs",
        "level": "back end direct (FUSE requests in plain guest memory, no guest)",
        "files": config.files,
        "file_bytes": SMALL_FILE_BYTES,
        "big_file_mib": config.big_file_mib,
        "rounds": config.rounds,
        "ops": Value::Object(ops),
        "min_ratio": min_ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": min_ratio >= TARGET_RATIO,
    }))
}
