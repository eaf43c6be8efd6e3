//! The in-guest halves of the device benchmarks (`crx-bench blk|fs|net`): fio on a
//! virtio-blk drive or in a virtio-fs share, and an iperf3 client towards a server in
//! the tap's network namespace, each in a test guest on the backend the caller picks;
//! plus the same fio jobs straight on the host, for the side-by-side figure.
//!
//! Debian's fio links every I/O engine it knows (ceph, gluster, rdma...): its libraries
//! make an ~80 MiB initramfs, so these guests get [`BENCH_GUEST_MEMORY_MIB`]. Figures
//! from a TCG guest measure TCG more than the device; the callers say so.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use crx_shim::vm::{Drive, NetDevice, SharedDir, VmBackend};
use serde::Serialize;

use super::netns::NetNs;
use super::{guest_config, initramfs, run, GuestRun};

pub const FIO: &str = "/usr/bin/fio";
pub const IPERF3: &str = "/usr/bin/iperf3";
/// Room for the fio initramfs (unpacked) and its page cache.
pub const BENCH_GUEST_MEMORY_MIB: u32 = 512;

/// One fio run: a name ([A-Za-z0-9_-]) and the options besides the target and the
/// output format (`--rw=read`, `--bs=1M`, ...).
#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    pub args: Vec<String>,
}

impl FioJob {
    pub fn new(name: &str, args: &[&str]) -> Self {
        Self {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// What fio measured for one job.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FioFigures {
    pub name: String,
    pub read_bytes_per_s: f64,
    pub read_iops: f64,
    pub write_bytes_per_s: f64,
    pub write_iops: f64,
    pub runtime_ms: u64,
}

impl FioFigures {
    /// Operations per second whichever direction fio booked them in (its file
    /// engines book creates, stats and deletes as reads).
    pub fn ops_per_s(&self) -> f64 {
        self.read_iops + self.write_iops
    }

    pub fn bytes_per_s(&self) -> f64 {
        self.read_bytes_per_s + self.write_bytes_per_s
    }
}

/// virtio-blk jobs: sequential read and write in 1 MiB blocks and 4 KiB random reads,
/// O_DIRECT, each for `seconds` over `size_mib` MiB of the target.
pub fn blk_jobs(size_mib: u32, seconds: u32) -> Vec<FioJob> {
    let size = format!("--size={size_mib}M");
    let time = format!("--runtime={seconds}");
    let common = [
        "--ioengine=psync",
        "--direct=1",
        "--time_based",
        size.as_str(),
        time.as_str(),
    ];
    let job = |name: &str, rw: &str, bs: &str| {
        let mut args = vec![rw, bs];
        args.extend(common);
        FioJob::new(name, &args)
    };
    vec![
        job("seq-read", "--rw=read", "--bs=1M"),
        job("seq-write", "--rw=write", "--bs=1M"),
        job("rand-read-4k", "--rw=randread", "--bs=4k"),
    ]
}

/// Small-file jobs on a directory, in order: create `files` empty files, stat them,
/// read 4 KiB from each, delete them (fio's filecreate / filestat / psync / filedelete
/// engines, one file open at a time).
pub fn small_file_jobs(files: u32) -> Vec<FioJob> {
    let n = format!("--nrfiles={files}");
    let common = [
        n.as_str(),
        "--filesize=4k",
        "--bs=4k",
        "--openfiles=1",
        "--filename_format=f.$filenum",
    ];
    let job = |name: &str, engine: &str, extra: &[&str]| {
        let mut args = vec![engine];
        args.extend(extra);
        args.extend(common);
        FioJob::new(name, &args)
    };
    vec![
        job("create", "--ioengine=filecreate", &[]),
        job("stat", "--ioengine=filestat", &[]),
        job("read-4k", "--ioengine=psync", &["--rw=read"]),
        job("unlink", "--ioengine=filedelete", &[]),
    ]
}

/// Where fio works: a file or block device, or a directory (small-file jobs).
#[derive(Clone, Copy, Debug)]
pub enum FioTarget<'a> {
    File(&'a Path),
    Dir(&'a Path),
}

impl FioTarget<'_> {
    fn arg(&self) -> String {
        match self {
            FioTarget::File(p) => format!("--filename={}", p.display()),
            FioTarget::Dir(p) => format!("--directory={}", p.display()),
        }
    }
}

/// Runs `jobs` on the host, one fio process each, in order.
pub fn fio_on_host(target: FioTarget<'_>, jobs: &[FioJob]) -> Result<Vec<FioFigures>> {
    jobs.iter()
        .map(|job| {
            let out = Command::new(FIO)
                .arg(format!("--name={}", job.name))
                .arg(target.arg())
                .args(&job.args)
                .arg("--output-format=json")
                .output()
                .context("running fio (apt-get install fio)")?;
            ensure!(
                out.status.success(),
                "fio job {} failed: {}",
                job.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            parse_fio_json(&job.name, &String::from_utf8_lossy(&out.stdout))
        })
        .collect()
}

/// Boots a guest whose /dev/vda is `backing` (read-write) and runs `jobs` on it.
pub fn fio_blk_in_guest(
    backend: &dyn VmBackend,
    run_dir: &Path,
    backing: &Path,
    jobs: &[FioJob],
    timeout: Duration,
) -> Result<Vec<FioFigures>> {
    let mut config = bench_config(
        run_dir,
        "bench-blk",
        &fio_script("", "--filename=/dev/vda", jobs)?,
    )?;
    config.devices.drives = vec![Drive {
        path: Some(backing.to_path_buf()),
        read_only: false,
        serial: "crx-bench".into(),
    }];
    fio_results(&run(backend, &config, timeout)?, jobs)
}

/// Boots a guest that mounts `share_dir` over virtio-fs (tag `bench`) and runs `jobs`
/// in it.
pub fn fio_fs_in_guest(
    backend: &dyn VmBackend,
    run_dir: &Path,
    share_dir: &Path,
    jobs: &[FioJob],
    timeout: Duration,
) -> Result<Vec<FioFigures>> {
    let mount = "mkdir -p /mnt/share && mount -t virtiofs bench /mnt/share || { result fio-error mount; reboot -f; }\n";
    let mut config = bench_config(
        run_dir,
        "bench-fs",
        &fio_script(mount, "--directory=/mnt/share", jobs)?,
    )?;
    config.devices.shares = vec![SharedDir {
        tag: "bench".into(),
        host_dir: share_dir.to_path_buf(),
    }];
    fio_results(&run(backend, &config, timeout)?, jobs)
}

fn bench_config(run_dir: &Path, name: &str, script: &str) -> Result<crx_shim::vm::VmConfig> {
    let image = initramfs(name, script, &[Path::new(FIO), Path::new(IPERF3)])?;
    guest_config(run_dir, name, &image, BENCH_GUEST_MEMORY_MIB)
}

/// Each job's JSON report becomes one `CRX-GUEST fio-<name> {...}` line.
fn fio_script(setup: &str, target: &str, jobs: &[FioJob]) -> Result<String> {
    let mut script = setup.to_string();
    for job in jobs {
        ensure!(
            !job.name.is_empty()
                && job
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "fio job name {:?} must be [A-Za-z0-9_-]",
            job.name
        );
        let args: Vec<String> = job.args.iter().map(|a| shell_quote(a)).collect();
        script.push_str(&format!(
            "if fio --name={name} {target} {args} --output-format=json --output=/tmp/fio.json >/tmp/fio.err 2>&1; then\n\
             \tresult fio-{name} \"$(tr -d '\\n' </tmp/fio.json)\"\n\
             else\n\
             \tresult fio-error \"{name}: $(tr '\\n' ' ' </tmp/fio.err | head -c 500)\"\n\
             fi\n",
            name = job.name,
            args = args.join(" "),
        ));
    }
    script.push_str("reboot -f\n");
    Ok(script)
}

fn fio_results(run: &GuestRun, jobs: &[FioJob]) -> Result<Vec<FioFigures>> {
    if let Some(error) = run.result("fio-error") {
        bail!("fio failed in the guest: {error}; VM: {}", run.exit);
    }
    jobs.iter()
        .map(|job| {
            let json = run.result(&format!("fio-{}", job.name)).with_context(|| {
                format!(
                    "the guest reported nothing for fio job {}; VM: {}; console tail:\n{}",
                    job.name,
                    run.exit,
                    super::tail(&run.console, 15)
                )
            })?;
            parse_fio_json(&job.name, json)
        })
        .collect()
}

fn parse_fio_json(name: &str, json: &str) -> Result<FioFigures> {
    // fio may print notes before the JSON object.
    let start = json.find('{').context("no JSON in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_str(&json[start..]).with_context(|| format!("fio {name} JSON"))?;
    let job = &v["jobs"][0];
    ensure!(
        job["error"].as_i64() == Some(0),
        "fio job {name} reported error {}",
        job["error"]
    );
    let f = |dir: &str, key: &str| job[dir][key].as_f64().unwrap_or(0.0);
    Ok(FioFigures {
        name: name.into(),
        read_bytes_per_s: f("read", "bw_bytes"),
        read_iops: f("read", "iops"),
        write_bytes_per_s: f("write", "bw_bytes"),
        write_iops: f("write", "iops"),
        runtime_ms: job["job_runtime"].as_u64().unwrap_or(0),
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What iperf3 measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IperfFigures {
    pub sent_bits_per_s: f64,
    pub received_bits_per_s: f64,
    pub retransmits: u64,
}

/// The guest end of the TCP benchmark: `net` (a tap in `netns` whose host end has
/// `server_ip`) becomes the guest's eth0 with `guest_cidr`; an iperf3 server started
/// here in `netns` serves one test, and the guest's client runs for `seconds`
/// (`reverse`: the host sends).
#[allow(clippy::too_many_arguments)]
pub fn iperf3_in_guest(
    backend: &dyn VmBackend,
    run_dir: &Path,
    net: NetDevice,
    netns: &NetNs,
    guest_cidr: &str,
    server_ip: &str,
    seconds: u32,
    reverse: bool,
    timeout: Duration,
) -> Result<IperfFigures> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns.name(),
            IPERF3,
            "-s",
            "-1",
            "-B",
            server_ip,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s in the network namespace (apt-get install iperf3)")?;
    let script = format!(
        "ip link set lo up\nip link set eth0 up\nip addr add {guest_cidr} dev eth0\n\
         ok=no\n\
         for i in $(seq 1 50); do\n\
         \tif iperf3 -c {server_ip} -t {seconds} {rev} -J >/tmp/ip.json 2>/tmp/ip.err; then ok=yes; break; fi\n\
         \tsleep 0.2\n\
         done\n\
         if [ $ok = yes ]; then result iperf3 \"$(tr -d '\\n' </tmp/ip.json)\"; \
         else result iperf3-error \"$(tr '\\n' ' ' </tmp/ip.json /tmp/ip.err | head -c 500)\"; fi\n\
         reboot -f\n",
        rev = if reverse { "-R" } else { "" },
    );
    let outcome = (|| -> Result<IperfFigures> {
        let mut config = bench_config(run_dir, "bench-net", &script)?;
        config.devices.net = Some(NetDevice {
            tap: Arc::clone(&net.tap),
            ..net
        });
        let run = run(backend, &config, timeout)?;
        if let Some(error) = run.result("iperf3-error") {
            bail!("iperf3 failed in the guest: {error}");
        }
        let json = run.result("iperf3").with_context(|| {
            format!(
                "the guest reported no iperf3 result; VM: {}; console tail:\n{}",
                run.exit,
                super::tail(&run.console, 15)
            )
        })?;
        parse_iperf3_json(json)
    })();
    // A one-off server ends after its test; one whose client never came is stopped.
    // SAFETY: kill(2) on the pid of the child spawned above, not yet reaped.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    let _ = server.wait();
    outcome
}

fn parse_iperf3_json(json: &str) -> Result<IperfFigures> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 JSON")?;
    let end = &v["end"];
    ensure!(
        end["sum_received"]["bits_per_second"].is_number(),
        "iperf3 JSON without end.sum_received: {}",
        v["error"]
    );
    Ok(IperfFigures {
        sent_bits_per_s: end["sum_sent"]["bits_per_second"].as_f64().unwrap_or(0.0),
        received_bits_per_s: end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_figures_are_read_per_direction() {
        let json = r#"fio: note
{"jobs":[{"jobname":"x","error":0,"job_runtime":1000,
"read":{"bw_bytes":1048576,"iops":256.5},"write":{"bw_bytes":0,"iops":0.0}}]}"#;
        let f = parse_fio_json("x", json).unwrap();
        assert_eq!(f.read_bytes_per_s, 1048576.0);
        assert_eq!(f.ops_per_s(), 256.5);
        assert_eq!(f.runtime_ms, 1000);
        let failed = r#"{"jobs":[{"error":5,"read":{},"write":{}}]}"#;
        assert!(parse_fio_json("x", failed).is_err());
    }

    #[test]
    fn small_file_jobs_run_on_the_host() {
        if !Path::new(FIO).exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let figures = fio_on_host(FioTarget::Dir(dir.path()), &small_file_jobs(50)).unwrap();
        let names: Vec<&str> = figures.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["create", "stat", "read-4k", "unlink"]);
        assert!(figures.iter().all(|f| f.ops_per_s() > 0.0), "{figures:?}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlink left files"
        );
    }

    #[test]
    fn iperf3_json_figures() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":2e9,"retransmits":3},"sum_received":{"bits_per_second":1.9e9}}}"#;
        let f = parse_iperf3_json(json).unwrap();
        assert_eq!(
            (f.sent_bits_per_s, f.received_bits_per_s, f.retransmits),
            (2e9, 1.9e9, 3)
        );
        assert!(parse_iperf3_json(r#"{"error":"unable to connect"}"#).is_err());
    }
}
