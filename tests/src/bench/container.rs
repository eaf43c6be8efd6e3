//! `crx-bench container`: container create+start → first output byte, and exec → exit,
//! for Debian's runc on the host, crx-agent in host mode, and crx-agent in a QEMU/TCG
//! pod VM, side by side on the same busybox root file system.
//!
//! What each figure spans:
//! - runc: `runc create` + `runc start` until the first byte of the container's stdout;
//!   `runc exec <ctr> true` until it exits.
//! - the agent: CreateContainer + the stdout stream's handshake + StartContainer until
//!   the first byte on the stream; ExecProcess + StartContainer + WaitProcess. The
//!   client (this program) is on the host in both modes, so the VM figures include the
//!   hybrid-vsock round trips a shim pays.
//!
//! In the VM the rootfs sits on the pod share (virtio-fs), mounted once by a long-lived
//! container's storage; the per-run figures do not include that mount, as runc's do not
//! include making the bundle.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use crx_protocols::hybrid_vsock::{self, context_until, wait_for_agent, AgentAddress};
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::ContainersClient;
use crx_protocols::v1::stdio::StreamKind;
use serde_json::json;

use super::stats::Summary;
use crate::artifacts;
use crate::guest_pod::{busybox_rootfs, oci_spec, GuestPod};
use crate::vm_harness::RunDir;

/// What the container under test prints (its first byte is the measured event).
const GREETING: &str = "ready";
/// Longest wait for one step of one run.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// `crx-bench container` options.
pub struct ContainerOptions {
    /// Measurements per figure and runtime.
    pub runs: usize,
    /// Guest memory of the pod VM.
    pub memory_mib: u32,
    /// Leave out the QEMU/TCG pod VM.
    pub no_vm: bool,
}

/// One runtime's figures.
#[derive(Debug, serde::Serialize)]
struct RuntimeFigures {
    runtime: &'static str,
    first_output_ms: Summary,
    exec_exit_ms: Summary,
}

/// A runtime measured: one fresh container to first output, one exec in a running one.
trait Subject {
    fn first_output(&mut self, run: usize) -> Result<Duration>;
    fn exec_exit(&mut self, run: usize) -> Result<Duration>;
}

pub fn run(options: &ContainerOptions) -> Result<serde_json::Value> {
    ensure!(options.runs > 0, "--runs must be at least 1");
    println!(
        "crx-bench container: {} runs per figure; create+start -> first output byte, exec -> exit",
        options.runs
    );
    let mut results = Vec::new();
    {
        let mut runc = Runc::new().context("runc on the host")?;
        results.push(measure("runc", &mut runc, options.runs)?);
    }
    {
        let host = HostAgent::start().context("crx-agent in host mode")?;
        let figures = host.subject().and_then(|mut subject| {
            let figures = measure("agent-host", &mut subject, options.runs);
            subject.remove_sleeper();
            figures
        });
        host.stop();
        results.push(figures?);
    }
    if options.no_vm {
        println!("agent-vm: skipped (--no-vm)");
    } else {
        let mut pod = GuestPod::boot("bench-container", options.memory_mib, |_, _| Ok(()))
            .context("booting the QEMU/TCG pod VM")?;
        let figures = vm_subject(&mut pod).and_then(|mut subject| {
            let figures = measure("agent-vm", &mut subject, options.runs);
            subject.remove_sleeper();
            figures
        });
        if let Err(e) = pod.shut_down() {
            eprintln!("  pod VM shutdown: {e:#}");
        }
        results.push(figures?);
    }
    print_ratios(&results);
    let ratio = |f: &RuntimeFigures, pick: fn(&RuntimeFigures) -> &Summary| {
        results
            .first()
            .map(|runc| pick(f).median / pick(runc).median)
    };
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|f| {
            json!({
                "runtime": f.runtime,
                "first_output_ms": f.first_output_ms,
                "exec_exit_ms": f.exec_exit_ms,
                "first_output_median_vs_runc": ratio(f, |f| &f.first_output_ms),
                "exec_exit_median_vs_runc": ratio(f, |f| &f.exec_exit_ms),
            })
        })
        .collect();
    Ok(json!({
        "benchmark": "container",
        "runs": options.runs,
        "guest_memory_mib": options.memory_mib,
        "runtimes": rows,
    }))
}

fn measure(name: &'static str, subject: &mut dyn Subject, runs: usize) -> Result<RuntimeFigures> {
    let (mut first, mut exec) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for run in 0..runs {
        let f = subject
            .first_output(run)
            .with_context(|| format!("{name}: create+start run {run}"))?;
        let e = subject
            .exec_exit(run)
            .with_context(|| format!("{name}: exec run {run}"))?;
        eprintln!(
            "  {name} run {}/{runs}: first output {:.1} ms, exec {:.1} ms",
            run + 1,
            ms(f),
            ms(e)
        );
        first.push(f);
        exec.push(e);
    }
    let summary = |s: &[Duration]| Summary::of_durations_ms(s).context("no samples");
    let figures = RuntimeFigures {
        runtime: name,
        first_output_ms: summary(&first)?,
        exec_exit_ms: summary(&exec)?,
    };
    println!(
        "{:<11} create+start -> first output: median {:.1} ms, p90 {:.1} ms | exec -> exit: median {:.1} ms, p90 {:.1} ms",
        name,
        figures.first_output_ms.median,
        figures.first_output_ms.p90,
        figures.exec_exit_ms.median,
        figures.exec_exit_ms.p90
    );
    Ok(figures)
}

fn print_ratios(results: &[RuntimeFigures]) {
    let Some(runc) = results.first() else {
        return;
    };
    for f in &results[1..] {
        println!(
            "{:<11} vs runc (median): create+start x{:.2}, exec x{:.2}",
            f.runtime,
            f.first_output_ms.median / runc.first_output_ms.median,
            f.exec_exit_ms.median / runc.exec_exit_ms.median
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads until the first byte arrives on `source`, or fails at `deadline`.
fn first_byte(source: &mut (impl Read + AsRawFd), deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no output within {STEP_TIMEOUT:?}");
        let mut poll = libc::pollfd {
            fd: source.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, its count, and a timeout; the fd outlives the call.
        let ready = unsafe { libc::poll(&mut poll, 1, wait_ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if ready == 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        return match source.read(&mut byte)? {
            0 => bail!("the output ended before any byte"),
            _ => Ok(()),
        };
    }
}

/// Debian's runc with its own state root and two bundles on one busybox rootfs each.
struct Runc {
    dir: RunDir,
    /// The long-lived container execs run in.
    sleeper: String,
}

impl Runc {
    fn new() -> Result<Runc> {
        let dir = RunDir::new("bench-runc")?;
        for (bundle, args) in [
            ("echo", &["echo", GREETING][..]),
            ("sleep", &["sleep", "3600"][..]),
        ] {
            let path = dir.path().join(bundle);
            busybox_rootfs(&path.join("rootfs"))?;
            std::fs::write(path.join("config.json"), oci_spec(args, "", ""))?;
        }
        let runc = Runc {
            dir,
            sleeper: "bench-sleeper".into(),
        };
        runc.command(&["delete", "-f", &runc.sleeper]).output().ok();
        let status = runc
            .command(&["run", "-d", "--bundle"])
            .arg(runc.dir.path().join("sleep"))
            .arg(&runc.sleeper)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .context("running runc (apt-get install runc)")?;
        ensure!(status.success(), "runc run -d {}: {status}", runc.sleeper);
        Ok(runc)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(self.dir.path().join("state"))
            .args(args);
        c
    }

    fn check(&self, args: &[&str]) -> Result<()> {
        let out = self.command(args).stdin(Stdio::null()).output()?;
        ensure!(
            out.status.success(),
            "runc {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Subject for Runc {
    fn first_output(&mut self, run: usize) -> Result<Duration> {
        let id = format!("bench-echo-{run}");
        let began = Instant::now();
        // Pass-through stdio: the container's stdout is this pipe.
        let mut create = self
            .command(&["create", "--bundle"])
            .arg(self.dir.path().join("echo"))
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut stdout = create.stdout.take().context("runc create's stdout")?;
        let status = create.wait()?;
        ensure!(status.success(), "runc create {id}: {status}");
        self.check(&["start", &id])?;
        first_byte(&mut stdout, began + STEP_TIMEOUT)?;
        let took = began.elapsed();
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest)?;
        self.check(&["delete", "-f", &id])?;
        Ok(took)
    }

    fn exec_exit(&mut self, _run: usize) -> Result<Duration> {
        let began = Instant::now();
        self.check(&["exec", &self.sleeper, "true"])?;
        Ok(began.elapsed())
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = self.command(&["delete", "-f", &self.sleeper]).output();
    }
}

/// A client of an agent's Containers service and its stdio streams.
struct AgentSubject<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a ContainersClient,
    /// Opens a connection to the agent's stdio port.
    connect_stdio: Box<dyn Fn() -> Result<UnixStream> + 'a>,
    /// The busybox rootfs as the agent sees it.
    rootfs: String,
    /// The long-lived container execs run in.
    sleeper: String,
}

fn deadline_context() -> ttrpc::context::Context {
    context_until(Instant::now() + STEP_TIMEOUT)
}

impl AgentSubject<'_> {
    fn create(&self, id: &str, args: &[&str], stdout: bool) -> Result<()> {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.to_owned();
        req.oci_spec = oci_spec(args, "", "");
        req.rootfs = self.rootfs.clone();
        let mut stdio = StdioSpec::new();
        stdio.stdout = stdout;
        req.stdio = Some(stdio).into();
        self.rt
            .block_on(self.client.create_container(deadline_context(), &req))
            .with_context(|| format!("CreateContainer {id}"))?;
        Ok(())
    }

    fn start(&self, id: &str, exec_id: &str) -> Result<()> {
        let mut req = StartContainerRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.rt
            .block_on(self.client.start_container(deadline_context(), &req))
            .with_context(|| format!("StartContainer {id}/{exec_id}"))?;
        Ok(())
    }

    fn wait(&self, id: &str, exec_id: &str) -> Result<ProcessExit> {
        let mut req = WaitProcessRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.rt
            .block_on(self.client.wait_process(deadline_context(), &req))
            .with_context(|| format!("WaitProcess {id}/{exec_id}"))?
            .exit
            .into_option()
            .context("WaitProcess answered without an exit")
    }

    fn remove(&self, id: &str) -> Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.to_owned();
        req.force = true;
        self.rt
            .block_on(self.client.remove_container(deadline_context(), &req))
            .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    /// The `CRXS` handshake of stdio.proto on a fresh stdio connection.
    fn attach(&self, id: &str, kind: StreamKind) -> Result<UnixStream> {
        let mut conn = (self.connect_stdio)()?;
        conn.set_read_timeout(Some(STEP_TIMEOUT))?;
        crate::guest_pod::stream_handshake(&mut conn, id, "", kind)?;
        Ok(conn)
    }

    /// Starts the container execs run in.
    fn start_sleeper(&self) -> Result<()> {
        self.create(&self.sleeper, &["sleep", "3600"], false)?;
        self.start(&self.sleeper, "")
    }

    /// Ends the container execs ran in (the agent leaves running containers behind).
    fn remove_sleeper(&self) {
        if let Err(e) = self.remove(&self.sleeper) {
            eprintln!("  {e:#}");
        }
    }
}

impl Subject for AgentSubject<'_> {
    fn first_output(&mut self, run: usize) -> Result<Duration> {
        let id = format!("bench-echo-{run}");
        let began = Instant::now();
        self.create(&id, &["echo", GREETING], true)?;
        let mut stdout = self.attach(&id, StreamKind::STREAM_KIND_STDOUT)?;
        self.start(&id, "")?;
        first_byte(&mut stdout, began + STEP_TIMEOUT)?;
        let took = began.elapsed();
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest)?;
        let exit = self.wait(&id, "")?;
        ensure!(
            exit.exit_status == 0,
            "{id} exited with {}",
            exit.exit_status
        );
        self.remove(&id)?;
        Ok(took)
    }

    fn exec_exit(&mut self, run: usize) -> Result<Duration> {
        let exec_id = format!("exec-{run}");
        let mut req = ExecProcessRequest::new();
        req.container_id = self.sleeper.clone();
        req.exec_id = exec_id.clone();
        req.process =
            br#"{"args":["true"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
        req.stdio = Some(StdioSpec::new()).into();
        let began = Instant::now();
        self.rt
            .block_on(self.client.exec_process(deadline_context(), &req))
            .with_context(|| format!("ExecProcess {exec_id}"))?;
        self.start(&self.sleeper, &exec_id)?;
        let exit = self.wait(&self.sleeper, &exec_id)?;
        let took = began.elapsed();
        ensure!(
            exit.exit_status == 0,
            "exec {exec_id} exited with {}",
            exit.exit_status
        );
        Ok(took)
    }
}

/// The static agent in host mode, in a private mount namespace with a controller-less
/// cgroup2 on /sys/fs/cgroup (the agent drives cgroup v2 only; this host may be v1).
struct HostAgent {
    dir: RunDir,
    socket: PathBuf,
    child: Child,
    rt: tokio::runtime::Runtime,
    client: ContainersClient,
}

impl HostAgent {
    fn start() -> Result<HostAgent> {
        let agent = artifacts::static_binary("crx-agent")?;
        let dir = RunDir::new("bench-agent-host")?;
        busybox_rootfs(&dir.path().join("rootfs"))?;
        let socket = dir.path().join("agent.sock");
        let script = format!(
            "mount -t cgroup2 none /sys/fs/cgroup && exec {} --listen unix://{} --state-dir {} --log error",
            agent.display(),
            socket.display(),
            dir.path().join("state").display()
        );
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("unshare (util-linux)")?;
        let rt = crate::vm_harness::runtime()?;
        let addr = AgentAddress::Unix(socket.clone());
        let ready = rt.block_on(wait_for_agent(
            &addr,
            Instant::now() + Duration::from_secs(20),
        ));
        let mut host = HostAgent {
            client: ContainersClient::new(
                ready
                    .context("the host-mode agent did not answer (needs root)")?
                    .clients
                    .client,
            ),
            dir,
            socket,
            child,
            rt,
        };
        if let Ok(Some(status)) = host.child.try_wait() {
            bail!("the host-mode agent ended: {status}");
        }
        Ok(host)
    }

    fn subject(&self) -> Result<AgentSubject<'_>> {
        let mut stdio = self.socket.clone().into_os_string();
        stdio.push(format!("_{}", crx_protocols::STDIO_VSOCK_PORT));
        let stdio = PathBuf::from(stdio);
        let subject = AgentSubject {
            rt: &self.rt,
            client: &self.client,
            connect_stdio: Box::new(move || Ok(UnixStream::connect(&stdio)?)),
            rootfs: path_text(&self.dir.path().join("rootfs"))?,
            sleeper: "bench-sleeper".into(),
        };
        subject.start_sleeper()?;
        Ok(subject)
    }

    /// SIGTERM (the agent removes nothing it did not make), then waits.
    fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill with a pid we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_text(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The pod VM's agent: a long-lived container mounts the share (its rootfs is the
/// share's busybox rootfs); the measured containers use that mounted rootfs.
fn vm_subject(pod: &mut GuestPod) -> Result<AgentSubject<'_>> {
    let sleeper = pod.next_id();
    pod.create(
        &sleeper,
        oci_spec(&["sleep", "3600"], "", ""),
        StdioSpec::new(),
    )?;
    pod.start(&sleeper, "")?;
    let (_, rootfs) = pod.share_storage(&sleeper);
    let uds = pod.uds.clone();
    Ok(AgentSubject {
        rt: &pod.rt,
        client: &pod.containers,
        connect_stdio: Box::new(move || {
            Ok(hybrid_vsock::connect(
                &uds,
                crx_protocols::STDIO_VSOCK_PORT,
                Duration::from_secs(20),
            )?)
        }),
        rootfs,
        sleeper,
    })
}
