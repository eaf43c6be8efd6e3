//! A private containerd for tests: Debian's containerd 1.6 (installed by
//! `scripts/lib.sh`, never by the tests) with its own config, root, state and socket,
//! the CRI plugin disabled, and crx's shim first on its `PATH` so that
//! `--runtime io.containerd.crx.v2` finds `containerd-shim-crx-v2`. Dropping it kills
//! what is left of its tasks and shims, stops containerd, unmounts everything under its
//! directory and removes it.
//!
//! Also builds the test image: a single-layer OCI image of Debian's `busybox-static`
//! (`/bin/busybox` plus applet links, `Cmd` `/bin/sh`), imported with `ctr images
//! import` under [`BUSYBOX_IMAGE`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The reference the busybox test image is imported under.
pub const BUSYBOX_IMAGE: &str = "docker.io/crx/busybox-test:latest";
/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "crx-test";
/// How long one `ctr` call may take before the harness gives up on it (a VM boot
/// under TCG on a busy 2-core machine is part of some calls).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// A running private containerd.
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    socket: PathBuf,
    /// Files made for this containerd outside its directory, removed on drop.
    extra_files: Vec<PathBuf>,
    /// containerd's environment, kept so that a restart starts the same daemon.
    env: Vec<(OsString, OsString)>,
}

/// Output of one `ctr` call.
#[derive(Debug)]
pub struct CtrOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtrOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<Output> for CtrOutput {
    fn from(out: Output) -> Self {
        CtrOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// containerd's runtime type for crx.
pub const CRX_RUNTIME: &str = "io.containerd.crx.v2";

/// The directory holding the built `containerd-shim-crx-v2`: `$CRX_SHIM_DIR`, else
/// the workspace's `target/debug`. Build it first: `cargo build -p
/// containerd-shim-crx-v2`.
pub fn shim_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("CRX_SHIM_DIR") {
        Some(d) => PathBuf::from(d),
        None => crate::artifacts::workspace_root().join("target/debug"),
    };
    let bin = dir.join("containerd-shim-crx-v2");
    ensure!(
        bin.is_file(),
        "{} not found: build it with `cargo build -p containerd-shim-crx-v2` (or set CRX_SHIM_DIR)",
        bin.display()
    );
    Ok(dir)
}

impl Containerd {
    /// Starts containerd with `env` added to its environment (and so to the shims it
    /// starts), and waits until it answers `ctr version`.
    pub fn start(env_extra: &[(&str, OsString)]) -> Result<Self> {
        for tool in ["containerd", "ctr", "runc"] {
            ensure!(
                which(tool).is_some(),
                "{tool} is not installed: run scripts/lib.sh's install_packages \
                 (apt-get install containerd runc)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("crx-ctrd-")
            .tempdir_in("/tmp")
            .context("creating containerd's directory")?
            .keep();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, private_config(&dir, &socket, None)).context("writing config.toml")?;

        let mut path = OsString::from(shim_dir()?);
        path.push(":");
        path.push(
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
        let mut env: Vec<(OsString, OsString)> = vec![("PATH".into(), path)];
        env.extend(
            env_extra
                .iter()
                .map(|(k, v)| (OsString::from(k), v.clone())),
        );
        let mut ctrd = Containerd {
            dir,
            child: None,
            socket,
            extra_files: Vec::new(),
            env,
        };
        ctrd.child = Some(ctrd.spawn_daemon()?);
        ctrd.wait_ready(Duration::from_secs(30))?;
        Ok(ctrd)
    }

    /// Starts containerd for crx tests: the shim reads a config (through
    /// `CRX_SHIM_CONFIG`) naming the built guest kernel, initramfs and static crx-vmm,
    /// `hypervisor = "qemu"` (TCG here), a generous agent deadline, plus `extra` lines.
    pub fn start_crx(extra: &str) -> Result<Self> {
        Self::start_crx_on("qemu", extra)
    }

    /// [`Containerd::start_crx`] with the shim's `hypervisor` set to `hypervisor`
    /// (`auto`, `qemu` or `crx-vmm`).
    pub fn start_crx_on(hypervisor: &str, extra: &str) -> Result<Self> {
        let config = write_crx_config_on(hypervisor, extra)?;
        let started = Self::start(&[("CRX_SHIM_CONFIG", config.clone().into_os_string())]);
        match started {
            Ok(mut c) => {
                c.extra_files.push(config);
                Ok(c)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&config);
                Err(e)
            }
        }
    }

    /// Starts containerd itself on this directory's config, appending to its log.
    fn spawn_daemon(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .context("containerd.log")?;
        Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd")
    }

    /// Stops containerd (SIGTERM, as a service manager would) while its shims run on,
    /// then starts it again with the same config, root, state, socket and environment,
    /// and waits until it answers. Running tasks must be found again by containerd
    /// itself (through each shim's address file in the state directory).
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
        self.child = Some(self.spawn_daemon()?);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "containerd exited ({status}) before it was ready: {}",
                        self.log_tail(20)
                    );
                }
            }
            if self.socket.exists() {
                let out = self.ctr_timeout(&["version"], Duration::from_secs(5))?;
                if out.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within {timeout:?}: {}",
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The private directory (config, root, state, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The last `lines` lines of containerd's log (which includes the shims' logs).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Runs `ctr -a SOCK -n crx-test ARGS` with [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> Result<CtrOutput> {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// Runs `ctr` with a deadline (through coreutils' `timeout`: 124 means it fired,
    /// 137 that it also had to SIGKILL ctr — but 137 is also the code of a container
    /// killed with SIGKILL, which `ctr run` passes on, so it counts as the deadline
    /// only once the deadline has passed).
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Result<CtrOutput> {
        let started = Instant::now();
        let out = Command::new("timeout")
            .arg("--kill-after=5")
            .arg(format!("{}", timeout.as_secs().max(1)))
            .arg("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ctr {args:?}"))?;
        let out = CtrOutput::from(out);
        let killed_by_deadline = out.code == Some(137) && started.elapsed() >= timeout;
        ensure!(
            out.code != Some(124) && !killed_by_deadline,
            "ctr {args:?} did not finish within {timeout:?}; stderr: {}",
            out.stderr.trim()
        );
        Ok(out)
    }

    /// `ctr run --runtime io.containerd.crx.v2 FLAGS IMAGE ID CMD...`.
    pub fn crx_run(&self, flags: &[&str], image: &str, id: &str, cmd: &[&str]) -> Result<CtrOutput> {
        let mut args = vec!["run", "--runtime", CRX_RUNTIME];
        args.extend(flags);
        args.extend([image, id]);
        args.extend(cmd);
        self.ctr(&args)
    }

    /// Builds the busybox image and imports it; returns its reference.
    pub fn import_busybox(&self) -> Result<&'static str> {
        let tar = build_busybox_image(&self.dir.join("image"))?;
        let tar = tar.to_string_lossy().into_owned();
        let out = self.ctr(&["images", "import", &tar])?;
        ensure!(
            out.success(),
            "ctr images import failed: {}",
            out.stderr.trim()
        );
        let out = self.ctr(&["images", "check"])?;
        ensure!(
            out.success(),
            "ctr images check failed: {}",
            out.stderr.trim()
        );
        ensure!(
            out.stdout.contains(BUSYBOX_IMAGE),
            "the imported image is not listed as {BUSYBOX_IMAGE}: {}",
            out.stdout
        );
        Ok(BUSYBOX_IMAGE)
    }

    /// Task ids `ctr task ls` lists.
    pub fn task_ids(&self) -> Result<Vec<String>> {
        self.list_ids(&["tasks", "ls", "-q"])
    }

    /// Container ids `ctr containers ls` lists.
    pub fn container_ids(&self) -> Result<Vec<String>> {
        self.list_ids(&["containers", "ls", "-q"])
    }

    fn list_ids(&self, args: &[&str]) -> Result<Vec<String>> {
        let out = self.ctr(args)?;
        ensure!(out.success(), "ctr {args:?}: {}", out.stderr.trim());
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Best effort: kills and deletes every task and container of the test namespace.
    fn remove_everything(&self) {
        let short = Duration::from_secs(60);
        for task in self.task_ids().unwrap_or_default() {
            let _ = self.ctr_timeout(&["tasks", "kill", "-s", "SIGKILL", &task], short);
            let _ = self.ctr_timeout(&["tasks", "delete", "-f", &task], short);
        }
        for c in self.container_ids().unwrap_or_default() {
            let _ = self.ctr_timeout(&["containers", "rm", &c], short);
        }
    }

    /// Shim processes this containerd started (their command line names its socket).
    pub fn shim_pids(&self) -> Vec<u32> {
        let needle = self.socket.to_string_lossy().into_owned();
        crate::vm_harness::processes_mentioning(&needle)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim"))
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_everything();
        let shims = self.shim_pids();
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
        for pid in shims {
            // SAFETY: kill(2) on a pid we just found running a shim of this containerd.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        crx_shim::mounts::unmount_tree(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        for f in &self.extra_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Writes a shim config for the built artifacts (see [`Containerd::start_crx`]);
/// returns its path (under /tmp, unique).
pub fn write_crx_config(extra: &str) -> Result<PathBuf> {
    write_crx_config_on("qemu", extra)
}

/// [`write_crx_config`] with `hypervisor = "<hypervisor>"`.
pub fn write_crx_config_on(hypervisor: &str, extra: &str) -> Result<PathBuf> {
    use crate::artifacts;
    let text = format!(
        "hypervisor = {hypervisor:?}\nkernel = {:?}\ninitramfs = {:?}\ncrx_vmm = {:?}\nqemu = {:?}\n\
         agent_timeout_secs = 120\nlog_level = \"debug\"\n{extra}\n",
        artifacts::guest_kernel()?,
        artifacts::guest_initramfs()?,
        artifacts::static_binary("crx-vmm")?,
        artifacts::qemu_binary()?,
    );
    let file = tempfile::Builder::new()
        .prefix("crx-shim-config-")
        .suffix(".toml")
        .tempfile_in("/tmp")
        .context("creating the shim config")?;
    std::fs::write(file.path(), text)?;
    let (_, path) = file.keep().context("keeping the shim config")?;
    Ok(path)
}

/// What a pod left on the host: VM processes naming its run directory, mounts under
/// it, the directory itself. Empty when the pod is fully gone.
pub fn pod_leftovers(sandbox_id: &str) -> Vec<String> {
    let root = Path::new("/run/crx").join(sandbox_id);
    let needle = format!("{}/", root.display());
    let mut left: Vec<String> = crate::vm_harness::processes_mentioning(&needle)
        .into_iter()
        .map(|(pid, cmd)| format!("process {pid}: {cmd}"))
        .collect();
    left.extend(
        mounts_under(&root)
            .into_iter()
            .map(|m| format!("mount {}", m.display())),
    );
    if root.exists() {
        left.push(format!("directory {}", root.display()));
    }
    left
}

/// Polls until `check` returns an empty list or `timeout` passes; returns the last list.
pub fn wait_until_empty(timeout: Duration, mut check: impl FnMut() -> Vec<String>) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = check();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host cgroup directories (any hierarchy, up to five levels down) whose name
/// starts with `prefix`.
pub fn cgroups_named(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut level = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    for _ in 0..5 {
        let mut next = Vec::new();
        for dir in &level {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir {
                    continue;
                }
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(entry.path().display().to_string());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    found
}

/// SIGTERM to `child`, SIGKILL after `grace`, reaped either way.
pub fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child, which we have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A private containerd's main config: root, state, opt and sockets under `dir` and
/// `socket`, debug logs; the CRI plugin off unless `cri_dropin` names the drop-in file
/// that configures it (imported).
pub fn private_config(dir: &Path, socket: &Path, cri_dropin: Option<&Path>) -> String {
    let d = dir.display();
    let imports = cri_dropin
        .map(|f| format!("imports = [\"{}\"]\n", f.display()))
        .unwrap_or_default();
    let cri = if cri_dropin.is_some() {
        ""
    } else {
        "\"io.containerd.grpc.v1.cri\", "
    };
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
{imports}disabled_plugins = [{cri}"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{s}"

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        s = socket.display()
    )
}

pub use crx_shim::mounts::mounts_under;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the busybox OCI image tarball under `work`; returns its path.
pub fn build_busybox_image(work: &Path) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let _ = std::fs::remove_dir_all(work);
    let layer = work.join("layer");
    let bin = layer.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(layer.join(d))?;
    }
    std::fs::copy(busybox, bin.join("busybox"))?;
    let applets = run(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    std::fs::write(layer.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(layer.join("etc/group"), "root:x:0:\n")?;

    let config = serde_json::json!({
        "Cmd": ["/bin/sh"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/"
    });
    Ok(crate::cri::images::build_oci_image(
        work,
        &layer,
        BUSYBOX_IMAGE,
        config,
    )?)
}

/// How long a pod's host resources may take to go once its last task is gone.
pub const POD_RELEASE: Duration = Duration::from_secs(30);

/// Shim sockets containerd-shim creates (`/run/containerd/s/<hash>`).
pub fn shim_sockets() -> BTreeSet<String> {
    std::fs::read_dir("/run/containerd/s")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

impl Containerd {
    /// Nothing of pod `id` is left (processes, mounts, run dir, shims, shim sockets
    /// beyond `sockets_before`, tasks) within [`POD_RELEASE`].
    pub fn assert_pod_released(&self, id: &str, sockets_before: &BTreeSet<String>) -> Result<()> {
        let left = wait_until_empty(POD_RELEASE, || {
            let mut l = pod_leftovers(id);
            l.extend(
                self.shim_pids()
                    .into_iter()
                    .map(|p| format!("shim process {p}")),
            );
            l.extend(
                shim_sockets()
                    .difference(sockets_before)
                    .map(|s| format!("shim socket /run/containerd/s/{s}")),
            );
            l
        });
        ensure!(
            left.is_empty(),
            "pod {id} left: {left:#?}\n{}",
            self.log_tail(30)
        );
        let tasks = self.task_ids()?;
        ensure!(tasks.is_empty(), "ctr task ls still lists {tasks:?}");
        Ok(())
    }
}

/// One line of `ctr events`: the event's topic, namespace and payload (as JSON).
#[derive(Clone, Debug)]
pub struct CtrEvent {
    pub topic: String,
    pub namespace: String,
    pub payload: serde_json::Value,
}

impl CtrEvent {
    /// Parses ctr 1.6's `TIMESTAMP NAMESPACE TOPIC JSON` (the timestamp itself has
    /// spaces, so the topic is the first word starting with `/`, the namespace the
    /// word before it, and the payload the rest of the line from its first `{`).
    pub fn parse(line: &str) -> Option<Self> {
        let json_at = line.find('{');
        let head = &line[..json_at.unwrap_or(line.len())];
        let words: Vec<&str> = head.split_whitespace().collect();
        let topic_at = words.iter().position(|w| w.starts_with('/'))?;
        let namespace = topic_at
            .checked_sub(1)
            .and_then(|i| words.get(i))
            .map(|w| (*w).to_owned())
            .unwrap_or_default();
        let payload = match json_at {
            Some(at) => serde_json::from_str(&line[at..]).ok()?,
            None => serde_json::Value::Null,
        };
        Some(CtrEvent {
            topic: words[topic_at].to_owned(),
            namespace,
            payload,
        })
    }

    /// A string field of the payload (`""` when absent: Go omits empty fields).
    pub fn str_field(&self, name: &str) -> &str {
        self.payload
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    }

    /// A number field of the payload (0 when absent: Go omits zero fields).
    pub fn u64_field(&self, name: &str) -> u64 {
        self.payload
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    }
}

/// containerd's event stream (`ctr events`, which subscribes to every namespace),
/// read line by line in the background from the moment it is known to be live;
/// stopped on drop.
pub struct EventStream {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Most lines an [`EventStream`] keeps (a test sees far fewer).
const EVENT_LINES_MAX: usize = 100_000;

impl Containerd {
    /// Starts `ctr events` against this containerd and returns once it has seen an
    /// event published after it started (a label set on the test namespace), so no
    /// later event can be missed.
    pub fn event_stream(&self) -> Result<EventStream> {
        use std::io::BufRead;
        // Under `timeout` so that a test killed half-way cannot leave it running;
        // SIGTERM (as on drop) reaches ctr through `timeout`.
        let mut child = Command::new("timeout")
            .args(["1800", "ctr", "-a"])
            .arg(&self.socket)
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning ctr events")?;
        let stdout = child.stdout.take().context("ctr events has no stdout")?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap_or_else(|e| e.into_inner());
                if all.len() < EVENT_LINES_MAX {
                    all.push(line);
                }
            }
        });
        let stream = EventStream {
            child,
            lines,
            reader: Some(reader),
        };
        // Fails harmlessly when the namespace exists already.
        let _ = self.ctr(&["namespaces", "create", NAMESPACE]);
        let deadline = Instant::now() + Duration::from_secs(60);
        for probe in 0u32.. {
            let label = format!("crx-test.events-probe={probe}");
            let out = self.ctr(&["namespaces", "label", NAMESPACE, &label])?;
            ensure!(out.success(), "ctr namespaces label: {}", out.stderr.trim());
            let seen = stream.wait_for(Duration::from_secs(2), |events| {
                events.iter().any(|e| {
                    e.topic == "/namespaces/update"
                        && e.payload.pointer("/labels/crx-test.events-probe")
                            == Some(&serde_json::Value::String(probe.to_string()))
                })
            });
            if seen.is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "ctr events showed no event within 60 s: {:?}",
                stream.lines()
            );
        }
        Ok(stream)
    }
}

impl EventStream {
    /// Every line read so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every event read so far, in containerd's order (lines that do not parse are
    /// left out).
    pub fn events(&self) -> Vec<CtrEvent> {
        self.lines()
            .iter()
            .filter_map(|l| CtrEvent::parse(l))
            .collect()
    }

    /// Polls until `done` holds for the events read so far, or `timeout` passes;
    /// returns those events.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[CtrEvent]) -> bool,
    ) -> Result<Vec<CtrEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) {
                return Ok(events);
            }
            ensure!(
                Instant::now() < deadline,
                "the awaited events did not come within {timeout:?}; ctr events printed: {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// For every host cgroup directory named exactly `id` (the last part of a sandbox's
/// cgroupsPath: crx puts the pod VM's processes there), the names of its processes.
pub fn pod_cgroup_processes(id: &str) -> Vec<(String, Vec<String>)> {
    cgroups_named(id)
        .into_iter()
        .filter(|dir| Path::new(dir).file_name().is_some_and(|n| n == id))
        .map(|dir| {
            let names = cgroup_process_names(Path::new(&dir));
            (dir, names)
        })
        .collect()
}

/// The names (`comm`) of the processes in the host cgroup directory `dir`.
pub fn cgroup_process_names(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
                .map_or_else(|_| format!("{pid} (gone)"), |c| c.trim().to_owned())
        })
        .collect()
}

/// A running crx pod's VM (QEMU or crx-vmm, with its back ends) is in the pod's host
/// cgroup in every mounted hierarchy, and its shim is not.
pub fn ensure_vm_in_pod_cgroup(id: &str) -> Result<()> {
    let placed = pod_cgroup_processes(id);
    // Hierarchies by device number: one mounted twice counts once.
    let hierarchies = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(2).map(str::to_owned))
        .collect::<BTreeSet<String>>()
        .len();
    ensure!(
        !placed.is_empty() && placed.len() >= hierarchies,
        "pod {id}: host cgroups {placed:?}, want one in each of {hierarchies} hierarchies"
    );
    for (dir, names) in &placed {
        ensure!(
            names
                .iter()
                .any(|n| n.starts_with("qemu") || n.starts_with("crx-vmm")),
            "the VM of pod {id} is not in {dir}: {names:?}"
        );
        ensure!(
            !names.iter().any(|n| n.starts_with("containerd-shim")),
            "the shim of pod {id} moved into {dir}: {names:?}"
        );
    }
    Ok(())
}
