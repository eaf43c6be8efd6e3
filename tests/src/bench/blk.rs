//! `crx-bench blk`: crx-vmm's virtio-blk back end driven directly — requests written
//! into plain guest memory as descriptor chains and served by the same worker code the
//! `crx-blk` thread runs ([`crx_vmm::devices::virtio::block::bench::DirectBlock`]) —
//! against the same I/O done straight on the host file with `pread`/`pwrite`, and
//! with fio (Debian's) when it is installed. Same file, same sizes, same cache state
//! (the file's pages are dropped with `posix_fadvise(DONTNEED)` before every read
//! pass), alternating order, median of the rounds.
//!
//! What it measures: the back end's cost per request (chain parsing, bounds checks,
//! positioned I/O into guest memory, used ring) — not a guest's. Under TCG a guest
//! measures the emulator; that half is left to the QEMU/TCG guest benchmarks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use crx_vmm::devices::virtio::block::bench::{DirectBlock, DirectKind, DirectRequest};
use crx_vmm::devices::virtio::block::Backing;
use serde_json::{json, Value};

use super::stats::Summary;

/// Sequential requests are 1 MiB (what Linux's virtio-blk sends with default limits).
const SEQ_BLOCK: usize = 1 << 20;
/// Sequential requests per batch in the direct driver (a queue depth of 8).
const SEQ_BATCH: usize = 8;
const RAND_BLOCK: usize = 4096;
/// Random reads per batch in the direct driver (a queue depth of 32).
const RAND_BATCH: usize = 32;

/// What `crx-bench blk` runs with.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Size of the test file in MiB.
    pub file_mib: u64,
    /// Directory for the test file (a real disk, not tmpfs, to mean anything).
    pub dir: PathBuf,
    /// 4 KiB random reads per pass.
    pub random_reads: usize,
    pub rounds: usize,
}

/// Figures of one side (host or direct) for one round.
#[derive(Default)]
struct Round {
    seq_write_mbps: Vec<f64>,
    seq_read_mbps: Vec<f64>,
    rand_read_iops: Vec<f64>,
}

fn drop_cache(f: &File) -> Result<()> {
    // SAFETY: plain fadvise on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise(DONTNEED): {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Deterministic 4 KiB-aligned offsets (xorshift), the same for both sides.
fn random_blocks(n: usize, blocks: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        })
        .collect()
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn host_pass(path: &Path, size: u64, offsets: &[u64], r: &mut Round) -> Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut buf = vec![0x5au8; SEQ_BLOCK];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        f.write_all_at(&buf, off)?;
        off += SEQ_BLOCK as u64;
    }
    f.sync_data()?;
    r.seq_write_mbps.push(mbps(size, t.elapsed().as_secs_f64()));

    drop_cache(&f)?;
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        f.read_exact_at(&mut buf, off)?;
        off += SEQ_BLOCK as u64;
    }
    r.seq_read_mbps.push(mbps(size, t.elapsed().as_secs_f64()));

    drop_cache(&f)?;
    let mut small = vec![0u8; RAND_BLOCK];
    let t = Instant::now();
    for b in offsets {
        f.read_exact_at(&mut small, b * RAND_BLOCK as u64)?;
    }
    r.rand_read_iops
        .push(offsets.len() as f64 / t.elapsed().as_secs_f64());
    Ok(())
}

fn direct_pass(path: &Path, size: u64, offsets: &[u64], r: &mut Round) -> Result<()> {
    let cache = File::open(path)?;
    let backing = Backing::open(path, false).context("opening the backing")?;
    let mut seq = DirectBlock::new(backing, SEQ_BATCH as u16, SEQ_BLOCK as u32)?;
    seq.fill_slots(SEQ_BATCH, 0xa5)?;
    let sectors_per = (SEQ_BLOCK / 512) as u64;
    let total = size / SEQ_BLOCK as u64;
    let batches = |kind| {
        (0..total)
            .map(move |i| DirectRequest {
                kind,
                sector: i * sectors_per,
                len: SEQ_BLOCK as u32,
            })
            .collect::<Vec<_>>()
    };
    let t = Instant::now();
    for chunk in batches(DirectKind::Write).chunks(SEQ_BATCH) {
        seq.run_batch(chunk)?;
    }
    seq.flush()?;
    r.seq_write_mbps.push(mbps(size, t.elapsed().as_secs_f64()));

    drop_cache(&cache)?;
    let t = Instant::now();
    for chunk in batches(DirectKind::Read).chunks(SEQ_BATCH) {
        seq.run_batch(chunk)?;
    }
    r.seq_read_mbps.push(mbps(size, t.elapsed().as_secs_f64()));
    drop(seq);

    drop_cache(&cache)?;
    let backing = Backing::open(path, false).context("opening the backing")?;
    let mut rand = DirectBlock::new(backing, RAND_BATCH as u16, RAND_BLOCK as u32)?;
    let reqs: Vec<DirectRequest> = offsets
        .iter()
        .map(|b| DirectRequest {
            kind: DirectKind::Read,
            sector: b * (RAND_BLOCK / 512) as u64,
            len: RAND_BLOCK as u32,
        })
        .collect();
    let t = Instant::now();
    for chunk in reqs.chunks(RAND_BATCH) {
        rand.run_batch(chunk)?;
    }
    r.rand_read_iops
        .push(offsets.len() as f64 / t.elapsed().as_secs_f64());
    Ok(())
}

/// fio on the host file, psync engine (what the back end itself does), page cache
/// dropped by fio (`invalidate=1`); None when fio is not installed.
fn fio(path: &Path, size_mib: u64, random_reads: usize) -> Result<Option<Value>> {
    if Command::new("fio").arg("--version").output().is_err() {
        return Ok(None);
    }
    let run = |name: &str, rw: &str, bs: &str, extra: &[String]| -> Result<Value> {
        let out = Command::new("fio")
            .args([
                &format!("--name={name}"),
                &format!("--filename={}", path.display()),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--size={size_mib}M"),
                "--ioengine=psync",
                "--invalidate=1",
                "--output-format=json",
            ])
            .args(extra)
            .output()
            .context("running fio")?;
        if !out.status.success() {
            bail!("fio {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
        Ok(v["jobs"][0].clone())
    };
    let w = run("seqwrite", "write", "1M", &["--end_fsync=1".into()])?;
    let r = run("seqread", "read", "1M", &[])?;
    let rr = run(
        "randread",
        "randread",
        "4k",
        &[format!("--number_ios={random_reads}")],
    )?;
    let bw = |j: &Value, dir: &str| j[dir]["bw_bytes"].as_f64().map(|b| b / (1 << 20) as f64);
    Ok(Some(json!({
        "seq_write_mbps": bw(&w, "write"),
        "seq_read_mbps": bw(&r, "read"),
        "rand_read_iops": rr["read"]["iops"].as_f64(),
    })))
}

fn medians(r: &Round) -> Value {
    let m = |v: &[f64]| Summary::of(v).map(|s| s.median);
    json!({
        "seq_write_mbps": m(&r.seq_write_mbps),
        "seq_read_mbps": m(&r.seq_read_mbps),
        "rand_read_iops": m(&r.rand_read_iops),
    })
}

/// Runs the benchmark; prints the figures and returns the JSON summary.
pub fn run(opts: &BlkOptions) -> Result<Value> {
    if opts.file_mib == 0 || opts.rounds == 0 {
        bail!("--file-mib and --rounds must be at least 1");
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("crx-bench-blk.")
        .tempdir_in(&opts.dir)?;
    let path = dir.path().join("disk.img");
    let size = opts.file_mib << 20;
    // Allocated up front, so every measured write is an overwrite on both sides.
    {
        let f = File::create(&path)?;
        let chunk = vec![0u8; SEQ_BLOCK];
        let mut off = 0;
        while off < size {
            f.write_all_at(&chunk, off)?;
            off += SEQ_BLOCK as u64;
        }
        f.sync_all()?;
    }
    println!(
        "crx-bench blk: {} MiB file in {}, {} rounds; 1 MiB sequential (direct: 8 in flight), \
         {} x 4 KiB random reads (direct: 32 in flight)",
        opts.file_mib,
        opts.dir.display(),
        opts.rounds,
        opts.random_reads
    );
    let blocks = size / RAND_BLOCK as u64;
    let (mut host, mut direct) = (Round::default(), Round::default());
    for round in 0..opts.rounds {
        let offsets = random_blocks(opts.random_reads, blocks, 0x9e37_79b9 + round as u64);
        // Alternate who goes first, so neither always meets a warmer disk.
        if round % 2 == 0 {
            host_pass(&path, size, &offsets, &mut host)?;
            direct_pass(&path, size, &offsets, &mut direct)?;
        } else {
            direct_pass(&path, size, &offsets, &mut direct)?;
            host_pass(&path, size, &offsets, &mut host)?;
        }
        let last = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
        println!(
            "round {round}: write MB/s direct {:.0} host {:.0} | read MB/s direct {:.0} host {:.0} | 4k IOPS direct {:.0} host {:.0}",
            last(&direct.seq_write_mbps),
            last(&host.seq_write_mbps),
            last(&direct.seq_read_mbps),
            last(&host.seq_read_mbps),
            last(&direct.rand_read_iops),
            last(&host.rand_read_iops),
        );
    }
    let fio = fio(&path, opts.file_mib, opts.random_reads)?;
    let (h, d) = (medians(&host), medians(&direct));
    let ratio = |k: &str| Some(d[k].as_f64()? / h[k].as_f64()?);
    println!("level: back end driven directly (no guest) vs the host file; medians");
    for (label, key, unit) in [
        ("sequential write 1 MiB + fdatasync", "seq_write_mbps", "MB/s"),
        ("sequential read 1 MiB (cold cache)", "seq_read_mbps", "MB/s"),
        ("random read 4 KiB (cold cache)", "rand_read_iops", "IOPS"),
    ] {
        println!(
            "{label:<36} direct {:>10.1} {unit:<4} | host pread/pwrite {:>10.1} {unit:<4} | ratio {:.2}{}",
            d[key].as_f64().unwrap_or(f64::NAN),
            h[key].as_f64().unwrap_or(f64::NAN),
            ratio(key).unwrap_or(f64::NAN),
            fio.as_ref()
                .and_then(|f| f[key].as_f64())
                .map_or(String::new(), |v| format!(" | fio {v:.1}")),
        );
    }
    if fio.is_none() {
        println!("fio not installed (apt-get install fio): host side measured with pread/pwrite only");
    }
    Ok(json!({
        "benchmark": "blk",
        "level": "virtio-blk back end driven directly (requests in plain guest memory), no guest",
        "file_mib": opts.file_mib,
        "rounds": opts.rounds,
        "random_reads": opts.random_reads,
        "direct": d,
        "host_pread_pwrite": h,
        "host_fio": fio,
        "ratios_direct_over_host": {
            "seq_write": ratio("seq_write_mbps"),
            "seq_read": ratio("seq_read_mbps"),
            "rand_read": ratio("rand_read_iops"),
        },
        "targets": { "seq_read_ratio_min": 0.8 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_blocks_stay_inside_and_repeat_for_a_seed() {
        let a = random_blocks(1000, 64, 7);
        assert!(a.iter().all(|b| *b < 64));
        assert_eq!(a, random_blocks(1000, 64, 7));
        assert_ne!(a, random_blocks(1000, 64, 8));
    }
}
