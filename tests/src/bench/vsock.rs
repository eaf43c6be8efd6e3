//! `crx-bench vsock`: the hybrid-vsock muxer driven directly (guest packets in plain
//! memory, no guest, the same muxer code crx-vmm and `crx-vmm vhost-user-vsock` run)
//! against a plain Unix socket pair moving the same bytes, side by side, several rounds.
//! Under TCG a guest would measure the emulator; this isolates our back end.

use anyhow::{Context, Result};
use crx_vmm::devices::virtio::vsock::bench;
use serde_json::{json, Value};

use super::stats::Summary;

/// The target: the muxer moves at least half what a Unix socket pair does.
const TARGET_RATIO: f64 = 0.5;

/// Runs `rounds` rounds of `mib` MiB each way, with guest rx buffers of `rx_buf` bytes
/// (4 KiB is what a Linux guest posts by default).
pub fn run(mib: u64, rx_buf: usize, rounds: usize) -> Result<Value> {
    let dir = tempdir()?;
    let bytes = mib << 20;
    let (mut to_guest, mut to_host, mut pair) = (Vec::new(), Vec::new(), Vec::new());
    println!(
        "crx-bench vsock: {rounds} rounds of {mib} MiB each way, guest rx buffers of {rx_buf} B"
    );
    for round in 1..=rounds.max(1) {
        let f = bench::run(&dir, bytes, rx_buf).context("vsock muxer round")?;
        println!(
            "  round {round}: host→guest {:.0} MB/s, guest→host {:.0} MB/s, unix pair {:.0} MB/s",
            f.host_to_guest_mbps, f.guest_to_host_mbps, f.unix_pair_mbps
        );
        to_guest.push(f.host_to_guest_mbps);
        to_host.push(f.guest_to_host_mbps);
        pair.push(f.unix_pair_mbps);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let summary = |v: &[f64]| Summary::of(v).context("no rounds ran");
    let (g, h, p) = (summary(&to_guest)?, summary(&to_host)?, summary(&pair)?);
    let ratio_to_guest = g.median / p.median.max(1e-9);
    let ratio_to_host = h.median / p.median.max(1e-9);
    let min_ratio = ratio_to_guest.min(ratio_to_host);
    println!(
        "medians: host→guest {:.0} MB/s ({ratio_to_guest:.2}× the pair), guest→host {:.0} MB/s \
         ({ratio_to_host:.2}×), unix pair {:.0} MB/s; target ≥ {TARGET_RATIO}×: {}",
        g.median,
        h.median,
        p.median,
        if min_ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(json!({
        "benchmark": "vsock",
        "mib_each_way": mib,
        "rx_buf_bytes": rx_buf,
        "host_to_guest_mbps": g,
        "guest_to_host_mbps": h,
        "unix_pair_mbps": p,
        "ratio_host_to_guest": ratio_to_guest,
        "ratio_guest_to_host": ratio_to_host,
        "target_ratio": TARGET_RATIO,
        "target_met": min_ratio >= TARGET_RATIO,
    }))
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("crx-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
