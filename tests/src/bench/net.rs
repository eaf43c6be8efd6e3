//! `crx-bench net`: crx-vmm's virtio-net back end driven directly (frames in plain
//! guest memory, no guest) to and from a tap, against a plain veth pair between two
//! network namespaces, side by side in one run.
//!
//! - device tx: the "guest" keeps the tx ring full; frames/s and MB/s the device
//!   wrote into the tap (and what a packet socket on the tap's other side received);
//! - device rx: a packet socket floods the tap; frames/s and MB/s the device copied
//!   into 2 KiB mergeable rx buffers;
//! - veth: the same frames between packet sockets on a veth pair (the frame-level
//!   baseline), and TCP throughput over it with iperf3;
//! - guest: iperf3 TCP both ways between a QEMU/TCG guest (QEMU's own virtio-net on a
//!   tap in a test namespace: crx-vmm cannot run guest user space on this host's PVM)
//!   and the host side of its tap, beside the veth figure. Under TCG this measures
//!   the emulator, not the device; crx-vmm's in-guest figure needs hardware KVM.
//!
//! Every tap, veth and namespace is created here and removed at the end; addresses
//! are 10.203.0.0/30 inside the two namespaces, which have no other route.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crx_shim::vm::{NetDevice, QemuAccel, QemuBackend};
use crx_vmm::devices::virtio::net::bench::{
    frames_over_veth, rx_through_device, tx_through_device, Throughput,
};
use serde_json::{json, Value};

use crate::test_guest::{self, bench::iperf3_in_guest, netns::NetNs};

/// Ethernet frame of a full 1500-byte MTU packet.
const MTU_FRAME: usize = 1514;
/// The biggest frame the device takes: what a TSO guest hands it.
const GSO_FRAME: usize = 65_550;

/// Two named namespaces joined by a veth pair; removed on drop.
struct VethPair {
    a: String,
    b: String,
    server: Option<Child>,
}

const VETH_A: &str = "crxva";
const VETH_B: &str = "crxvb";
const ADDR_A: &str = "10.203.0.1";
const ADDR_B: &str = "10.203.0.2";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl VethPair {
    fn new() -> Result<Self> {
        let pid = std::process::id();
        let pair = Self {
            a: format!("crx-bench-net-{pid}-a"),
            b: format!("crx-bench-net-{pid}-b"),
            server: None,
        };
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "-n", &pair.a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B, "netns",
            &pair.b,
        ])?;
        for (ns, dev, addr) in [(&pair.a, VETH_A, ADDR_A), (&pair.b, VETH_B, ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    fn netns_file(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    /// iperf3 TCP from a to b for `secs`; `None` if iperf3 is not installed.
    fn iperf3_gbps(&mut self, secs: u64) -> Result<Option<f64>> {
        if Command::new("iperf3").arg("--version").output().is_err() {
            return Ok(None);
        }
        let server = Command::new("ip")
            .args(["netns", "exec", &self.b, "iperf3", "-s", "-B", ADDR_B])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?;
        self.server = Some(server);
        // The server needs a moment to listen: retry the client until a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.a, "iperf3", "-c", ADDR_B, "-J", "-t"])
                .arg(secs.to_string())
                .output()
                .context("running the iperf3 client")?;
            // A client that came before the server listened fails (or reports an
            // error in its JSON): try again until the deadline.
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                if out.status.success() {
                    return Ok(Some(bps / 1e9));
                }
            }
            if Instant::now() > deadline {
                bail!("iperf3 client failed: {}", v["error"]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        // Deleting a namespace deletes the veth end inside it, and with it the pair.
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn figures(t: &Throughput) -> Value {
    json!({
        "frames": t.frames,
        "frames_per_sec": t.frames_per_sec().round(),
        "mb_per_sec": (t.mb_per_sec() * 10.0).round() / 10.0,
    })
}

fn line(what: &str, t: &Throughput) {
    println!(
        "  {what:<44} {:>10.0} frames/s {:>9.1} MB/s",
        t.frames_per_sec(),
        t.mb_per_sec()
    );
}

/// TCP over QEMU/TCG's virtio-net: (guest -> host, host -> guest) in Gbit/s.
fn guest_tcp(secs: u64) -> Result<(f64, f64)> {
    test_guest::require_qemu_guest_prerequisites()?;
    let dir = tempfile::tempdir().context("run directory")?;
    let ns = NetNs::new(&format!("crx-bench-net-{}-g", std::process::id()))?;
    let tap = std::sync::Arc::new(ns.tap("crxgtap0", "10.203.1.1/24", 1500)?);
    let backend = QemuBackend::new(QemuAccel::Tcg);
    let mut gbps = [0.0; 2];
    for (i, reverse) in [false, true].into_iter().enumerate() {
        let net = NetDevice {
            tap: tap.clone(),
            mac: [0x02, 0xc5, 0, 0, 0, 9],
            mtu: 1500,
        };
        let figures = iperf3_in_guest(
            &backend,
            dir.path(),
            net,
            &ns,
            "10.203.1.2/24",
            "10.203.1.1",
            secs as u32,
            reverse,
            Duration::from_secs(240),
        )?;
        gbps[i] = figures.received_bits_per_s / 1e9;
    }
    Ok((gbps[0], gbps[1]))
}

/// Runs every measurement for `secs` seconds each; `guest` adds the in-guest TCP
/// figures (two QEMU/TCG boots).
pub fn run(secs: u64, guest: bool) -> Result<Value> {
    let d = Duration::from_secs(secs);
    println!("crx-bench net: {secs} s per measurement, frames in plain guest memory, tap and veth in private namespaces");

    let (tx_mtu, tx_mtu_seen) =
        tx_through_device(MTU_FRAME, d).context("device tx, 1514-byte frames")?;
    let (tx_gso, tx_gso_seen) =
        tx_through_device(GSO_FRAME, d).context("device tx, 64 KiB frames")?;
    let (rx_mtu, rx_mtu_sent) =
        rx_through_device(MTU_FRAME, d).context("device rx, 1514-byte frames")?;
    println!("virtio-net back end (crx-net thread):");
    line("tx 1514-byte frames, guest -> tap", &tx_mtu);
    line("   ... seen by a packet socket on the tap", &tx_mtu_seen);
    line("tx 65550-byte frames, guest -> tap", &tx_gso);
    line("   ... seen by a packet socket on the tap", &tx_gso_seen);
    line("rx 1514-byte frames, tap -> guest buffers", &rx_mtu);
    line("   ... offered by the packet socket", &rx_mtu_sent);

    let mut veth = VethPair::new().context("creating the veth baseline namespaces")?;
    let (veth_mtu, veth_mtu_sent) = frames_over_veth(
        (&VethPair::netns_file(&veth.a), VETH_A),
        (&VethPair::netns_file(&veth.b), VETH_B),
        MTU_FRAME,
        d,
    )
    .context("veth baseline, 1514-byte frames")?;
    let tcp = veth.iperf3_gbps(secs)?;
    drop(veth);
    println!("veth pair between two namespaces (baseline):");
    line(
        "1514-byte frames, packet socket -> packet socket",
        &veth_mtu,
    );
    line("   ... offered", &veth_mtu_sent);
    match tcp {
        Some(g) => println!("  TCP (iperf3, one stream)                     {g:>10.2} Gbit/s"),
        None => println!("  TCP: iperf3 not installed (apt-get install iperf3); skipped"),
    }
    let guest_tcp = if guest {
        match guest_tcp(secs) {
            Ok(t) => Some(t),
            Err(e) => {
                println!("  guest TCP skipped: {e:#}");
                None
            }
        }
    } else {
        None
    };
    if let Some((out, back)) = guest_tcp {
        println!("QEMU/TCG guest, QEMU's virtio-net on a tap (emulation-bound):");
        println!("  TCP guest -> host (iperf3)                   {out:>10.2} Gbit/s");
        println!("  TCP host -> guest (iperf3 -R)                {back:>10.2} Gbit/s");
    }
    let ratio = |a: f64, b: f64| ((a / b.max(1e-9)) * 100.0).round() / 100.0;
    // Both sides of each ratio count frames that reached the receiving socket.
    let tx_ratio = ratio(tx_mtu_seen.frames_per_sec(), veth_mtu.frames_per_sec());
    let rx_ratio = ratio(rx_mtu.frames_per_sec(), veth_mtu.frames_per_sec());
    println!(
        "ratios: device tx (as received behind the tap) {tx_ratio}x and rx {rx_ratio}x the veth frame rate (1514-byte frames)"
    );
    if let Some(g) = tcp {
        println!(
            "64 KiB tx frames carry {:.2} Gbit/s through the device vs {g:.2} Gbit/s TCP over veth",
            tx_gso.mb_per_sec() * 8.0 / 1000.0
        );
    }
    Ok(json!({
        "bench": "net",
        "seconds_each": secs,
        "device": {
            "tx_1514": figures(&tx_mtu),
            "tx_1514_seen_on_tap": figures(&tx_mtu_seen),
            "tx_65550": figures(&tx_gso),
            "tx_65550_seen_on_tap": figures(&tx_gso_seen),
            "rx_1514": figures(&rx_mtu),
            "rx_1514_offered": figures(&rx_mtu_sent),
        },
        "veth": {
            "frames_1514": figures(&veth_mtu),
            "frames_1514_offered": figures(&veth_mtu_sent),
            "tcp_gbit_per_sec": tcp.map(|g| (g * 100.0).round() / 100.0),
        },
        "guest_qemu_tcg": guest_tcp.map(|(out, back)| json!({
            "tcp_guest_to_host_gbit_per_sec": (out * 100.0).round() / 100.0,
            "tcp_host_to_guest_gbit_per_sec": (back * 100.0).round() / 100.0,
        })),
        "ratio_vs_veth": { "tx_1514": tx_ratio, "rx_1514": rx_ratio },
    }))
}
