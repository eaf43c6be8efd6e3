//! `crx-bench blk`: crx-vmm's virtio-blk back end driven directly — requests written
//! into plain guest memory as descriptor chains and served by the same worker code the
//! `crx-blk` thread runs ([`crx_vmm::devices::virtio::block::bench::DirectBlock`]) —
//! against the same I/O done straight on the host file with `pread`/`pwrite`, and
//! with fio (Debian's) when it is installed. Same file, same sizes, same cache state
//! (the file's pages are dropped with `posix_fadvise(DONTNEED)` before every read
//! pass), alternating order, median of the rounds.
//!
//! What it measures: the back end's cost per request (chain parsing, bounds checks,
//! positioned I/O into guest memory, used ring) — not a guest's. With `--guest`, the
//! same fio jobs also run inside a busybox guest under QEMU/TCG on QEMU's own
//! virtio-blk over the same file (what the QEMU backend gives pods), beside fio on the
//! host: that figure measures TCG more than any block path, and is reported as such.

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
    /// Also run fio inside a QEMU/TCG guest on the same file (needs fio, QEMU, the
    /// guest kernel).
    pub guest: bool,
}

/// Figures of one side (host or direct) for one round.
#[derive(Default)]
struct Round {
    seq_write_mbps: Vec<f64>,
    seq_read_mbps: Vec<f64>,
    rand_read_iops: Vec<f64>,
    /// The same passes again with the file in the page cache: no disk, so what is
    /// left is the per-request cost of each path.
    seq_read_warm_mbps: Vec<f64>,
    rand_read_warm_iops: Vec<f64>,
}

fn drop_cache(f: &File) -> Result<()> {
    // SAFETY: plain fadvise on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED): {}",
            std::io::Error::from_raw_os_error(rc)
        );
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

    let seq_read = |buf: &mut [u8]| -> Result<f64> {
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            f.read_exact_at(buf, off)?;
            off += SEQ_BLOCK as u64;
        }
        Ok(mbps(size, t.elapsed().as_secs_f64()))
    };
    drop_cache(&f)?;
    r.seq_read_mbps.push(seq_read(&mut buf)?);
    r.seq_read_warm_mbps.push(seq_read(&mut buf)?);

    let rand_read = || -> Result<f64> {
        let mut small = vec![0u8; RAND_BLOCK];
        let t = Instant::now();
        for b in offsets {
            f.read_exact_at(&mut small, b * RAND_BLOCK as u64)?;
        }
        Ok(offsets.len() as f64 / t.elapsed().as_secs_f64())
    };
    drop_cache(&f)?;
    r.rand_read_iops.push(rand_read()?);
    r.rand_read_warm_iops.push(rand_read()?);
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

    let reads = batches(DirectKind::Read);
    let mut seq_read = || -> Result<f64> {
        let t = Instant::now();
        for chunk in reads.chunks(SEQ_BATCH) {
            seq.run_batch(chunk)?;
        }
        Ok(mbps(size, t.elapsed().as_secs_f64()))
    };
    drop_cache(&cache)?;
    r.seq_read_mbps.push(seq_read()?);
    r.seq_read_warm_mbps.push(seq_read()?);
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
    let mut rand_read = || -> Result<f64> {
        let t = Instant::now();
        for chunk in reqs.chunks(RAND_BATCH) {
            rand.run_batch(chunk)?;
        }
        Ok(offsets.len() as f64 / t.elapsed().as_secs_f64())
    };
    r.rand_read_iops.push(rand_read()?);
    r.rand_read_warm_iops.push(rand_read()?);
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
            bail!(
                "fio {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
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
        "seq_read_warm_mbps": m(&r.seq_read_warm_mbps),
        "rand_read_warm_iops": m(&r.rand_read_warm_iops),
    })
}

/// The guest's half: fio on `/dev/vdX` (found by serial), O_DIRECT so the guest's page
/// cache does not answer, one terse line per job.
const GUEST_SCRIPT: &str = r#"
dev=""
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = crx-bench ] && dev=/dev/$(basename "$d")
done
[ -n "$dev" ] || { result error "no drive with serial crx-bench"; reboot -f; }
size=$(sed -n 's/.*crx.size_mib=\([0-9]*\).*/\1/p' /proc/cmdline)
ios=$(sed -n 's/.*crx.random_reads=\([0-9]*\).*/\1/p' /proc/cmdline)
common="--filename=$dev --ioengine=psync --direct=1 --minimal --size=${size}M --runtime=30"
result seq-write "$(fio --name=w --rw=write --bs=1M --end_fsync=1 $common 2>&1 | tail -n 1)"
result seq-read "$(fio --name=r --rw=read --bs=1M $common 2>&1 | tail -n 1)"
result rand-read "$(fio --name=rr --rw=randread --bs=4k --number_ios=$ios $common 2>&1 | tail -n 1)"
reboot -f
"#;

/// Bandwidth (MiB/s) and IOPS of a fio `--minimal` (terse v3) line: read bandwidth is
/// field 7 and IOPS field 8, write 48 and 49 (bandwidth in KiB/s).
fn terse(line: &str, write: bool) -> Option<(f64, f64)> {
    let f: Vec<&str> = line.split(';').collect();
    let (bw, iops) = if write { (47, 48) } else { (6, 7) };
    Some((
        f.get(bw)?.parse::<f64>().ok()? / 1024.0,
        f.get(iops)?.parse::<f64>().ok()?,
    ))
}

/// fio inside a QEMU/TCG guest on QEMU's virtio-blk over `path`.
fn guest_tcg(path: &Path, size_mib: u64, random_reads: usize) -> Result<Value> {
    use crate::test_guest;
    use crx_shim::vm::{Drive, QemuAccel, QemuBackend};
    test_guest::require_qemu_guest_prerequisites()?;
    let image = test_guest::initramfs("blk-bench-fio", GUEST_SCRIPT, &[Path::new("/usr/bin/fio")])?;
    let run_dir = tempfile::Builder::new()
        .prefix("crx-bench-blk-guest.")
        .tempdir()?;
    let mut config = test_guest::guest_config(run_dir.path(), "blk-bench", &image, 512)?;
    config.kernel_cmdline = format!("crx.size_mib={size_mib} crx.random_reads={random_reads}");
    config.devices.drives = vec![Drive {
        path: Some(path.to_path_buf()),
        read_only: false,
        serial: "crx-bench".into(),
    }];
    let run = test_guest::run(
        &QemuBackend::new(QemuAccel::Tcg),
        &config,
        std::time::Duration::from_secs(600),
    )?;
    if let Some(e) = run.result("error") {
        bail!("the fio guest: {e}");
    }
    let get = |key: &str, write: bool| -> Result<(f64, f64)> {
        let line = run.result(key).unwrap_or_default();
        terse(line, write).with_context(|| {
            format!(
                "no fio figures for {key} in the guest's output {line:?}; guest: {:?}",
                run.results()
            )
        })
    };
    let (w, _) = get("seq-write", true)?;
    let (r, _) = get("seq-read", false)?;
    let (_, iops) = get("rand-read", false)?;
    Ok(json!({ "seq_write_mbps": w, "seq_read_mbps": r, "rand_read_iops": iops }))
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
            "round {round}: write MB/s direct {:.0} host {:.0} | read MB/s direct {:.0} host {:.0} \
             | 4k IOPS direct {:.0} host {:.0} | cached read MB/s direct {:.0} host {:.0} \
             | cached 4k IOPS direct {:.0} host {:.0}",
            last(&direct.seq_write_mbps),
            last(&host.seq_write_mbps),
            last(&direct.seq_read_mbps),
            last(&host.seq_read_mbps),
            last(&direct.rand_read_iops),
            last(&host.rand_read_iops),
            last(&direct.seq_read_warm_mbps),
            last(&host.seq_read_warm_mbps),
            last(&direct.rand_read_warm_iops),
            last(&host.rand_read_warm_iops),
        );
    }
    let fio = fio(&path, opts.file_mib, opts.random_reads)?;
    let (h, d) = (medians(&host), medians(&direct));
    let ratio = |k: &str| Some(d[k].as_f64()? / h[k].as_f64()?);
    println!("level: back end driven directly (no guest) vs the host file; medians");
    for (label, key, unit) in [
        (
            "sequential write 1 MiB + fdatasync",
            "seq_write_mbps",
            "MB/s",
        ),
        (
            "sequential read 1 MiB (cold cache)",
            "seq_read_mbps",
            "MB/s",
        ),
        ("random read 4 KiB (cold cache)", "rand_read_iops", "IOPS"),
        (
            "sequential read 1 MiB (page cache)",
            "seq_read_warm_mbps",
            "MB/s",
        ),
        (
            "random read 4 KiB (page cache)",
            "rand_read_warm_iops",
            "IOPS",
        ),
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
        println!(
            "fio not installed (apt-get install fio): host side measured with pread/pwrite only"
        );
    }
    let guest = if opts.guest {
        let g = guest_tcg(&path, opts.file_mib, opts.random_reads)?;
        println!("level: fio in a busybox guest under QEMU/TCG (QEMU's virtio-blk, same file, O_DIRECT in the guest) — emulation time");
        for (label, key, unit) in [
            ("guest sequential write 1 MiB", "seq_write_mbps", "MB/s"),
            ("guest sequential read 1 MiB", "seq_read_mbps", "MB/s"),
            ("guest random read 4 KiB", "rand_read_iops", "IOPS"),
        ] {
            let gv = g[key].as_f64().unwrap_or(f64::NAN);
            let host = fio.as_ref().and_then(|f| f[key].as_f64());
            println!(
                "{label:<36} guest  {gv:>10.1} {unit:<4} | host fio {:>10.1} {unit:<4} | ratio {:.3}",
                host.unwrap_or(f64::NAN),
                host.map_or(f64::NAN, |h| gv / h)
            );
        }
        Some(g)
    } else {
        None
    };
    Ok(json!({
        "benchmark": "blk",
        "level": "virtio-blk back end driven directly (requests in plain guest memory), no guest",
        "file_mib": opts.file_mib,
        "rounds": opts.rounds,
        "random_reads": opts.random_reads,
        "direct": d,
        "host_pread_pwrite": h,
        "host_fio": fio,
        "guest_qemu_tcg_fio": guest,
        "ratios_direct_over_host": {
            "seq_write": ratio("seq_write_mbps"),
            "seq_read": ratio("seq_read_mbps"),
            "rand_read": ratio("rand_read_iops"),
            "seq_read_page_cache": ratio("seq_read_warm_mbps"),
            "rand_read_page_cache": ratio("rand_read_warm_iops"),
        },
        "targets": { "seq_read_ratio_min": 0.8 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_terse_lines_give_bandwidth_and_iops() {
        // A read job: fields 7 (KiB/s) and 8 (IOPS); a write job: 48 and 49.
        let mut f = vec!["0"; 60];
        f[6] = "2048";
        f[7] = "512";
        f[47] = "1024";
        f[48] = "1";
        let line = f.join(";");
        assert_eq!(terse(&line, false), Some((2.0, 512.0)));
        assert_eq!(terse(&line, true), Some((1.0, 1.0)));
        assert_eq!(terse("fio: error", false), None);
    }

    #[test]
    fn random_blocks_stay_inside_and_repeat_for_a_seed() {
        let a = random_blocks(1000, 64, 7);
        assert!(a.iter().all(|b| *b < 64));
        assert_eq!(a, random_blocks(1000, 64, 7));
        assert_ne!(a, random_blocks(1000, 64, 8));
    }
}
