//! A private containerd with the CRI plugin enabled: Debian's containerd 1.6 with its
//! own config, root, state and socket (`/tmp/crx-cri-*`), the CRI drop-in rendered
//! from the shipped one ([`super::config`]), CNI from `/usr/lib/cni` with the test
//! bridge list, the local pause and busybox images imported, and — for crx pods — crx's
//! shim first on its `PATH` with a shim config naming the built guest artifacts.
//!
//! Dropping it stops and removes every pod through CRI, stops containerd, kills what is
//! left of its shims, unmounts everything under its directory, removes it and the test
//! bridge (when no pod is attached to it any more).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::client::{CriClient, CriError};
use super::config::{self, ConfigError, Layout};
use super::images::{self, ImageError, CRI_NAMESPACE, PAUSE_IMAGE};

/// How long containerd may take to answer CRI after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The host bridge the test CNI list creates.
pub const TEST_BRIDGE: &str = "crx-test0";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{tool} is not installed: {hint}")]
    Missing {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing crx's shim (built shim, guest kernel and initramfs)")]
    Shim(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("rendering containerd's config")]
    Config(#[from] ConfigError),
    #[error("building or importing the test images")]
    Images(#[from] ImageError),
    #[error("talking CRI to the private containerd")]
    Cri(#[from] CriError),
    #[error("containerd exited ({status}) before it was ready; its log ends with:\n{log}")]
    Exited { status: String, log: String },
    #[error("{what} within {after:?}; containerd's log ends with:\n{log}")]
    NotReady {
        what: String,
        after: Duration,
        log: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io { what, path, source }
}

/// A running private containerd with CRI.
pub struct CriContainerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    client: Option<CriClient>,
    busybox: &'static str,
    shim_config: Option<PathBuf>,
}

impl CriContainerd {
    /// Starts containerd with CRI. With `with_crx`, the crx handler's `ConfigPath`
    /// names a shim config for the built guest artifacts (QEMU backend: TCG here) and
    /// the built shim is on containerd's `PATH`; without it the handler is installed
    /// as shipped but cannot run pods on this host.
    pub fn start(with_crx: bool) -> Result<Self, HarnessError> {
        // Tests pin the backend: on this kind of host `auto` means QEMU anyway, and a
        // test must not change what it runs on when the host changes.
        Self::start_on(with_crx.then_some("qemu"))
    }

    /// Like [`Self::start`], with crx's handler on the shim's `hypervisor` setting
    /// `hypervisor` (`auto`, `qemu`, `crx-vmm`), or without crx for None.
    pub fn start_on(hypervisor: Option<&str>) -> Result<Self, HarnessError> {
        check_tools()?;
        let dir = tempfile::Builder::new()
            .prefix("crx-cri-")
            .tempdir_in("/tmp")
            .map_err(io_err("creating containerd's directory", Path::new("/tmp")))?
            .keep();
        let mut node = CriContainerd {
            socket: dir.join("containerd.sock"),
            dir,
            child: None,
            client: None,
            busybox: "",
            shim_config: None,
        };
        node.spawn(hypervisor)?;
        Ok(node)
    }

    fn spawn(&mut self, hypervisor: Option<&str>) -> Result<(), HarnessError> {
        let mut path = OsString::new();
        if let Some(hypervisor) = hypervisor {
            let shim_dir =
                crate::containerd::shim_dir().map_err(|e| HarnessError::Shim(e.into()))?;
            let shim_config = crate::containerd::write_crx_config_on(hypervisor, "")
                .map_err(|e| HarnessError::Shim(e.into()))?;
            self.shim_config = Some(shim_config);
            path.push(shim_dir);
            path.push(":");
        }
        path.push(
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );

        let cni_conf_dir = self.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf_dir).map_err(io_err("creating", &cni_conf_dir))?;
        let conflist = cni_conf_dir.join("10-crx-test-bridge.conflist");
        let ipam_dir = self.ipam_dir();
        std::fs::write(&conflist, config::render_conflist(&ipam_dir)?)
            .map_err(io_err("writing", &conflist))?;
        let dropin = self.dir.join("crx-cri.toml");
        let dropin_text =
            config::render_dropin(PAUSE_IMAGE, &cni_conf_dir, self.shim_config.as_deref())?;
        std::fs::write(&dropin, dropin_text).map_err(io_err("writing", &dropin))?;
        let main = self.dir.join("config.toml");
        let main_text = config::main_config(&Layout {
            dir: &self.dir,
            socket: &self.socket,
            dropin: &dropin,
        });
        std::fs::write(&main, main_text).map_err(io_err("writing", &main))?;

        let log_path = self.dir.join("containerd.log");
        let log = std::fs::File::create(&log_path).map_err(io_err("creating", &log_path))?;
        let log_err = log.try_clone().map_err(io_err("duplicating", &log_path))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&main)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_err("spawning containerd with", &main))?;
        self.child = Some(child);
        self.wait_ready()?;
        let work = self.dir.join("images");
        self.busybox = images::import_test_images(&self.socket, &work)?;
        self.wait_images()
    }

    /// Waits until the socket answers CRI Version and the runtime and network are
    /// ready (the CNI list is loaded).
    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(HarnessError::Exited {
                        status: status.to_string(),
                        log: self.log_tail(30),
                    });
                }
            }
            if self.client.is_none() && self.socket.exists() {
                self.client = CriClient::connect(&self.socket).ok();
            }
            if let Some(client) = &self.client {
                let ready = client.status(false).ok().and_then(|s| s.status).map(|s| {
                    let up = |t: &str| s.conditions.iter().any(|c| c.r#type == t && c.status);
                    up("RuntimeReady") && up("NetworkReady")
                });
                if ready == Some(true) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: "containerd's CRI did not report RuntimeReady and NetworkReady".into(),
                    after: READY_TIMEOUT,
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the CRI image service lists the imported images (it learns of
    /// them from containerd's image events).
    fn wait_images(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let refs = self.client()?.image_refs()?;
            if [PAUSE_IMAGE, self.busybox]
                .iter()
                .all(|want| refs.iter().any(|r| r == want))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!(
                        "CRI did not list {PAUSE_IMAGE} and {} (it lists {refs:?})",
                        self.busybox
                    ),
                    after: READY_TIMEOUT,
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The CRI client.
    pub fn client(&self) -> Result<&CriClient, HarnessError> {
        self.client.as_ref().ok_or_else(|| HarnessError::NotReady {
            what: "no CRI connection".into(),
            after: Duration::ZERO,
            log: String::new(),
        })
    }

    /// The busybox image's reference.
    pub fn busybox(&self) -> &str {
        self.busybox
    }

    /// The private directory (configs, root, state, socket, log, pod logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The shim config the crx handler's `ConfigPath` names (None without crx).
    pub fn shim_config(&self) -> Option<&Path> {
        self.shim_config.as_deref()
    }

    /// Where host-local keeps this containerd's address leases (one file per IP).
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("cni/ipam")
    }

    /// A fresh log directory for the pod `name`.
    pub fn pod_log_dir(&self, name: &str) -> PathBuf {
        self.dir.join("pod-logs").join(name)
    }

    /// The last `lines` lines of containerd's log (which includes the shims' logs).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
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

    /// Ids `ctr -n k8s.io KIND ls -q` lists (`tasks`, `containers`).
    pub fn ctr_ids(&self, kind: &str) -> Vec<String> {
        let out = Command::new("timeout")
            .args(["30", "ctr", "-a"])
            .arg(&self.socket)
            .args(["-n", CRI_NAMESPACE, kind, "ls", "-q"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
            Ok(out) => vec![format!(
                "(ctr {kind} ls failed: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            )],
            Err(e) => vec![format!("(ctr {kind} ls did not run: {e})")],
        }
    }

    /// What is left of every pod this containerd ran: CRI pods and containers,
    /// containerd tasks and containers, shims, IP leases, crx's per-pod run
    /// directories, mounts and VM processes for `crx_pods`.
    pub fn leftovers(&self, crx_pods: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        match self.client() {
            Ok(client) => {
                match client.list_pod_sandboxes() {
                    Ok(pods) => left.extend(pods.iter().map(|p| format!("CRI pod {}", p.id))),
                    Err(e) => left.push(format!("ListPodSandbox: {e}")),
                }
                match client.list_containers() {
                    Ok(cs) => left.extend(cs.iter().map(|c| format!("CRI container {}", c.id))),
                    Err(e) => left.push(format!("ListContainers: {e}")),
                }
            }
            Err(e) => left.push(e.to_string()),
        }
        for kind in ["tasks", "containers"] {
            left.extend(
                self.ctr_ids(kind)
                    .into_iter()
                    .map(|id| format!("containerd {kind}: {id}")),
            );
        }
        left.extend(
            self.shim_pids()
                .into_iter()
                .map(|pid| format!("shim process {pid}")),
        );
        left.extend(
            self.ip_leases()
                .into_iter()
                .map(|ip| format!("IP lease {ip}")),
        );
        for pod in crx_pods {
            left.extend(crate::containerd::pod_leftovers(pod));
        }
        left
    }

    /// Pod addresses host-local has handed out and not yet released.
    pub fn ip_leases(&self) -> Vec<String> {
        let net = self.ipam_dir().join("crx-test");
        std::fs::read_dir(net)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Best effort: stops and removes every pod (and so its containers) through CRI.
    fn remove_every_pod(&self) {
        let Some(client) = &self.client else { return };
        for pod in client.list_pod_sandboxes().unwrap_or_default() {
            let _ = client.stop_pod_sandbox(&pod.id);
            let _ = client.remove_pod_sandbox(&pod.id);
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        self.remove_every_pod();
        let shims = self.shim_pids();
        self.client = None;
        if let Some(mut child) = self.child.take() {
            crate::containerd::terminate(&mut child, Duration::from_secs(10));
        }
        for pid in shims {
            // SAFETY: kill(2) on a pid we just found running a shim of this containerd.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        crx_shim::mounts::unmount_tree(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(config) = &self.shim_config {
            let _ = std::fs::remove_file(config);
        }
        remove_idle_bridge();
    }
}

/// Deletes the test bridge when no interface is attached to it any more (another
/// harness may still use it).
fn remove_idle_bridge() {
    let ports = Path::new("/sys/class/net").join(TEST_BRIDGE).join("brif");
    let idle = std::fs::read_dir(&ports).map(|mut d| d.next().is_none());
    if matches!(idle, Ok(true)) {
        let _ = Command::new("ip")
            .args(["link", "del", TEST_BRIDGE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn check_tools() -> Result<(), HarnessError> {
    for (tool, hint) in [
        (
            "/usr/bin/containerd",
            "apt-get install containerd (scripts/lib.sh)",
        ),
        (
            "/usr/bin/ctr",
            "apt-get install containerd (scripts/lib.sh)",
        ),
        ("/usr/sbin/runc", "apt-get install runc (scripts/lib.sh)"),
        (
            "/usr/lib/cni/bridge",
            "apt-get install containernetworking-plugins (scripts/lib.sh)",
        ),
        (
            "/usr/lib/cni/host-local",
            "apt-get install containernetworking-plugins (scripts/lib.sh)",
        ),
        (
            "/usr/lib/cni/loopback",
            "apt-get install containernetworking-plugins (scripts/lib.sh)",
        ),
    ] {
        if !Path::new(tool).is_file() {
            return Err(HarnessError::Missing { tool, hint });
        }
    }
    Ok(())
}
