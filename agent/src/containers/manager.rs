//! The agent's containers: create (not start) through libcontainer with the process's
//! stdio pipes in place, start once the declared streams are attached, wait, signal,
//! remove. Every blocking libcontainer call runs off the async runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use libcontainer::container::{Container, ContainerStatus};

use super::build_process;
use super::cgroups;
use super::events::EventLog;
use super::exits::{ExitRecord, ExitTable};
use super::spec::{self, SpecError};
use super::stdio::{ChildStdio, Declared, ProcessStdio, StdioError, StdioRegistry};
use super::tty::{ConsoleSocket, Terminal, WindowSize};

/// Most containers one agent holds (container.proto).
pub const MAX_CONTAINERS: usize = 128;
/// Most exec processes one container holds (container.proto).
pub const MAX_EXECS: usize = 256;

/// Why a container request failed; each maps to one ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The spec or an id is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    /// The request does not fit the container's state.
    #[error("{0}")]
    Precondition(String),
    /// A bound was reached.
    #[error("{0}")]
    Exhausted(String),
    /// The request's deadline came first.
    #[error("{0}")]
    Deadline(String),
    /// Bad field other than the spec.
    #[error("{0}")]
    Invalid(String),
    /// Pipes for the stdio.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// libcontainer refused or failed.
    #[error("{what}: {cause}")]
    Runtime { what: String, cause: String },
}

/// One process of a container.
struct Proc {
    /// Guest pid; 0 for an exec until it is started.
    pid: AtomicI32,
    stdio: Arc<ProcessStdio>,
    started: AtomicBool,
    /// An exec's process.json and its ends of the stdio, until it is started.
    exec: Option<(PathBuf, Mutex<Option<ChildStdio>>)>,
}

impl Proc {
    fn pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }
}

struct Entry {
    container: Arc<Mutex<Container>>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    bundle: PathBuf,
    /// The container's root (its image's /etc/passwd and /etc/group serve execs).
    rootfs: PathBuf,
    /// The container's cgroup directory (from its spec's cgroupsPath).
    cgroup: PathBuf,
}

impl Entry {
    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a process ended, for replies.
#[derive(Clone, Copy, Debug)]
pub struct ProcessEnd {
    pub pid: i32,
    pub exit: ExitRecord,
}

/// Every container of the pod.
pub struct ContainerManager {
    /// libcontainer's state root.
    root: PathBuf,
    /// Where each container's config.json is written.
    bundles: PathBuf,
    exits: Arc<ExitTable>,
    /// Exits and OOM kills for GetEvents; the exit table's observer.
    events: Arc<EventLog>,
    /// Enter rootfs with MS_MOVE + chroot instead of pivot_root (see [`root_is_initramfs`]).
    no_pivot: bool,
    /// `None` while the id is being created.
    containers: Mutex<HashMap<String, Option<Arc<Entry>>>>,
}

fn runtime_err(what: impl Into<String>, cause: impl std::fmt::Display) -> ManagerError {
    ManagerError::Runtime {
        what: what.into(),
        cause: cause.to_string(),
    }
}

/// Runs blocking libcontainer work off the runtime.
async fn blocking<T: Send + 'static>(
    what: &str,
    job: impl FnOnce() -> Result<T, ManagerError> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| runtime_err(what, e))?
}

impl ContainerManager {
    /// Containers kept under `state_dir` (`containers/` for libcontainer, `bundles/`).
    pub fn new(state_dir: &std::path::Path, exits: Arc<ExitTable>) -> ContainerManager {
        let events = EventLog::spawn();
        exits.set_observer(events.clone());
        ContainerManager {
            events,
            root: state_dir.join("containers"),
            bundles: state_dir.join("bundles"),
            exits,
            no_pivot: root_is_initramfs(),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Arc<Entry>>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, ManagerError> {
        match self.map().get(id) {
            Some(Some(e)) => Ok(e.clone()),
            Some(None) => Err(ManagerError::Precondition(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(ManagerError::NotFound(format!("no container {id:?}"))),
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Entry>, Arc<Proc>), ManagerError> {
        let entry = self.entry(id)?;
        if exec_id.is_empty() {
            let init = entry.init.clone();
            return Ok((entry, init));
        }
        let exec = entry.execs().get(exec_id).cloned();
        match exec {
            Some(p) => Ok((entry, p)),
            None => Err(ManagerError::NotFound(format!(
                "no exec {exec_id:?} in container {id:?}"
            ))),
        }
    }

    /// Reserves `id`, then builds the container; the id is free again on failure.
    pub async fn create(
        &self,
        id: &str,
        raw_spec: &[u8],
        rootfs: &str,
        declared: Declared,
    ) -> Result<i32, ManagerError> {
        spec::check_id("container id", id)?;
        if raw_spec.len() > spec::MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge(raw_spec.len()).into());
        }
        {
            let mut map = self.map();
            if map.contains_key(id) {
                return Err(ManagerError::AlreadyExists(id.to_owned()));
            }
            if map.len() >= MAX_CONTAINERS {
                return Err(ManagerError::Exhausted(format!(
                    "the agent already holds {MAX_CONTAINERS} containers"
                )));
            }
            map.insert(id.to_owned(), None);
        }
        let result = self.build(id, raw_spec, rootfs, declared).await;
        let mut map = self.map();
        match result {
            Ok(entry) => {
                let pid = entry.init.pid();
                self.events.add_container(id, entry.cgroup.clone());
                self.events.follow_pid(pid, id, "");
                self.exits.replay(pid);
                map.insert(id.to_owned(), Some(Arc::new(entry)));
                Ok(pid)
            }
            Err(e) => {
                map.remove(id);
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        id: &str,
        raw_spec: &[u8],
        rootfs: &str,
        declared: Declared,
    ) -> Result<Entry, ManagerError> {
        let spec = spec::prepare(id, raw_spec, rootfs)?;
        check_terminal(spec.process().as_ref().and_then(|p| p.terminal()), declared)?;
        let cgroup = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| cgroups::cgroup_dir(std::path::Path::new(cgroups::CGROUP_ROOT), &p))
            .transpose()
            .map_err(|e| ManagerError::Invalid(e.to_string()))?
            // spec::prepare always sets one; this is where it puts it.
            .unwrap_or_else(|| {
                std::path::Path::new(cgroups::CGROUP_ROOT)
                    .join(cgroups::POD_CGROUP_NAME)
                    .join(id)
            });
        let bundle = self.bundles.join(id);
        spec::write_bundle(&bundle, &spec)?;
        let (stdio, child) = match ProcessStdio::new(declared) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e.into());
            }
        };
        let console = match open_console(&child, &self.consoles()) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let root = self.root.clone();
        let no_pivot = self.no_pivot;
        let (job_id, job_bundle, job_stdio) = (id.to_owned(), bundle.clone(), stdio.clone());
        let exits = self.exits.clone();
        let built = blocking("create the container", move || {
            // In a single-threaded builder process (build_process.rs), then loaded here.
            let request = build_process::InitRequest {
                id: &job_id,
                root: &root,
                bundle: &job_bundle,
                no_pivot,
                console: console.as_ref().map(ConsoleSocket::path),
            };
            let container = build_process::build_init(&request, child)
                .map_err(|e| build_err("libcontainer could not create the container", e))
                .inspect(|built| forget_builder(&exits, built))
                .and_then(|_| {
                    Container::load(root.join(&job_id))
                        .map_err(|e| runtime_err("load the created container", error_chain(&e)))
                });
            // The init made its pty before it reported ready: the master is waiting.
            match container.and_then(|c| take_master(console.as_ref(), &job_stdio).map(|()| c)) {
                Ok(c) => Ok(c),
                Err(e) => {
                    // Whatever state libcontainer left for the id would block a retry.
                    let state = root.join(&job_id);
                    if let Ok(mut c) = Container::load(state.clone()) {
                        let _ = c.delete(true);
                    }
                    let _ = std::fs::remove_dir_all(&state);
                    Err(e)
                }
            }
        })
        .await;
        let container = match built {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        tracing::info!(container = id, pid, "container created");
        Ok(Entry {
            container: Arc::new(Mutex::new(container)),
            init: Arc::new(Proc {
                pid: AtomicI32::new(pid),
                stdio,
                started: AtomicBool::new(false),
                exec: None,
            }),
            execs: Mutex::new(HashMap::new()),
            bundle,
            rootfs: PathBuf::from(rootfs),
            cgroup,
        })
    }

    /// Starts the process once its declared streams are attached (by `deadline`).
    pub async fn start(
        &self,
        id: &str,
        exec_id: &str,
        deadline: Instant,
    ) -> Result<i32, ManagerError> {
        let (entry, proc) = self.process(id, exec_id)?;
        if proc.started.swap(true, Ordering::AcqRel) {
            return Err(ManagerError::Precondition(format!(
                "process ({id:?}, {exec_id:?}) was already started"
            )));
        }
        if let Err(missing) = proc.stdio.wait_attached(deadline).await {
            proc.started.store(false, Ordering::Release);
            return Err(ManagerError::Precondition(format!(
                "stdio streams not attached before the deadline: {missing}"
            )));
        }
        if let Some((process_json, child)) = &proc.exec {
            let child = child.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(child) = child else {
                return Err(ManagerError::Precondition(format!(
                    "exec {exec_id:?} cannot be started again"
                )));
            };
            let (root, cid, json) = (self.root.clone(), id.to_owned(), process_json.clone());
            let console =
                open_console(&child, &self.consoles()).inspect_err(|_| proc.stdio.abandon())?;
            let size = proc.stdio.terminal().and_then(Terminal::size);
            let job_stdio = proc.stdio.clone();
            // The tenant builder joins the init's namespaces and cgroup and runs the
            // program at once: created-but-not-started lives here, in the agent.
            let exits = self.exits.clone();
            let pid = blocking("start the exec process", move || {
                // In a single-threaded builder process (build_process.rs).
                let request = build_process::ExecRequest {
                    id: &cid,
                    root: &root,
                    process_json: &json,
                    console: console.as_ref().map(ConsoleSocket::path),
                    size,
                };
                let built = build_process::build_exec(&request, child)
                    .map_err(|e| build_err("libcontainer could not start the exec process", e))?;
                forget_builder(&exits, &built);
                let pid = nix::unistd::Pid::from_raw(built.pid);
                if let Err(e) = take_master(console.as_ref(), &job_stdio) {
                    // Nobody could see or feed it: it must not run on unattended.
                    // SAFETY: kill takes plain integers; the pid was started just now
                    // and is the agent's (re-parented) child.
                    unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) };
                    return Err(e);
                }
                Ok(pid)
            })
            .await
            .inspect_err(|_| proc.stdio.abandon())?;
            self.events.follow_pid(pid.as_raw(), id, exec_id);
            self.exits.replay(pid.as_raw());
            proc.pid.store(pid.as_raw(), Ordering::Release);
            tracing::info!(
                container = id,
                exec = exec_id,
                pid = pid.as_raw(),
                "exec started"
            );
            return Ok(pid.as_raw());
        }
        let container = entry.container.clone();
        let (root, cid, exits) = (self.root.clone(), id.to_owned(), self.exits.clone());
        blocking("start the container", move || {
            let mut c = container.lock().unwrap_or_else(|p| p.into_inner());
            // In a builder process (build_process.rs), then reloaded: it is Running now.
            let request = build_process::StartRequest {
                id: &cid,
                root: &root,
            };
            let built = build_process::start_init(&request)
                .map_err(|e| build_err("libcontainer could not start the container", e))?;
            forget_builder(&exits, &built);
            *c = load_started(&root.join(&cid))?;
            Ok(())
        })
        .await
        .inspect_err(|_| proc.started.store(false, Ordering::Release))?;
        tracing::info!(container = id, pid = proc.pid(), "container started");
        Ok(proc.pid())
    }

    /// Prepares an exec process in a running container; StartContainer runs it.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        raw_process: &[u8],
        declared: Declared,
    ) -> Result<(), ManagerError> {
        spec::check_id("exec id", exec_id)?;
        let entry = self.entry(id)?;
        let process = spec::prepare_process(raw_process, &entry.rootfs)?;
        check_terminal(process.terminal(), declared)?;
        let init = &entry.init;
        if !init.started.load(Ordering::Acquire) || self.exits.get(init.pid()).is_some() {
            return Err(ManagerError::Precondition(format!(
                "container {id:?} is not running"
            )));
        }
        let mut execs = entry.execs();
        if execs.contains_key(exec_id) {
            return Err(ManagerError::AlreadyExists(format!("{id}/{exec_id}")));
        }
        let live = execs
            .values()
            .filter(|p| p.pid() == 0 || self.exits.get(p.pid()).is_none())
            .count();
        if live >= MAX_EXECS {
            return Err(ManagerError::Exhausted(format!(
                "container {id:?} already has {MAX_EXECS} live exec processes"
            )));
        }
        let json = entry.bundle.join(format!("exec-{exec_id}.json"));
        spec::write_process(&json, &process)?;
        let (stdio, child) = ProcessStdio::new(declared)?;
        execs.insert(
            exec_id.to_owned(),
            Arc::new(Proc {
                pid: AtomicI32::new(0),
                stdio,
                started: AtomicBool::new(false),
                exec: Some((json, Mutex::new(Some(child)))),
            }),
        );
        Ok(())
    }

    /// Waits (until `deadline`) for the process to end.
    pub async fn wait(
        &self,
        id: &str,
        exec_id: &str,
        deadline: Instant,
    ) -> Result<ProcessEnd, ManagerError> {
        let (_entry, proc) = self.process(id, exec_id)?;
        let pid = proc.pid();
        if pid <= 0 {
            return Err(ManagerError::Precondition(format!(
                "process ({id:?}, {exec_id:?}) was not started"
            )));
        }
        match tokio::time::timeout_at(deadline, self.exits.wait(pid)).await {
            Ok(exit) => Ok(ProcessEnd { pid, exit }),
            Err(_) => Err(ManagerError::Deadline(format!(
                "process ({id:?}, {exec_id:?}) still running at the request's deadline; ask again"
            ))),
        }
    }

    /// Sends `signal` to the process, or to every process of the container.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ManagerError> {
        let Some(sig) = i32::try_from(signal).ok().filter(|s| (1..=64).contains(s)) else {
            return Err(ManagerError::Invalid(format!(
                "signal {signal} is not 1-64"
            )));
        };
        let (entry, proc) = self.process(id, exec_id)?;
        let pid = proc.pid();
        if pid > 0 && self.exits.get(pid).is_some() {
            return Err(ManagerError::NotFound(format!(
                "process ({id:?}, {exec_id:?}) has already exited"
            )));
        }
        if all {
            let container = entry.container.clone();
            return blocking("signal the container", move || {
                let signal = libcontainer::signal::Signal::try_from(sig)
                    .map_err(|e| ManagerError::Invalid(format!("signal {sig}: {e}")))?;
                let mut c = container.lock().unwrap_or_else(|p| p.into_inner());
                c.kill(signal, true).map_err(|e| {
                    runtime_err(
                        "libcontainer could not signal the container",
                        error_chain(&e),
                    )
                })
            })
            .await;
        }
        if pid <= 0 {
            return Err(ManagerError::Precondition(format!(
                "process ({id:?}, {exec_id:?}) was not started"
            )));
        }
        // SAFETY: kill takes plain integers; the pid is a child the reaper has not
        // reported, so it has not been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(runtime_err("kill", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ManagerError> {
        let (_entry, proc) = self.process(id, exec_id)?;
        proc.stdio.close_stdin();
        Ok(())
    }

    /// Deletes the container (killing its processes first with `force`, or when it was
    /// never started). The id is free afterwards.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), ManagerError> {
        let entry = self.entry(id)?;
        let init = entry.init.clone();
        let exited = self.exits.get(init.pid()).is_some();
        if !exited && !force && init.started.load(Ordering::Acquire) {
            return Err(ManagerError::Precondition(format!(
                "container {id:?} is running; stop it first or remove with force"
            )));
        }
        {
            // Remove it from view first: no new attach or start can slip in.
            let mut map = self.map();
            if !matches!(map.get(id), Some(Some(e)) if Arc::ptr_eq(e, &entry)) {
                return Err(ManagerError::NotFound(format!("no container {id:?}")));
            }
            map.insert(id.to_owned(), None);
        }
        let container = entry.container.clone();
        let result = blocking("delete the container", move || {
            let mut c = container.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.refresh_status();
            if c.status() == ContainerStatus::Stopped {
                c.delete(false)
            } else {
                c.delete(true)
            }
            .map_err(|e| {
                runtime_err(
                    "libcontainer could not delete the container",
                    error_chain(&e),
                )
            })
        })
        .await;
        let mut map = self.map();
        match result {
            Ok(()) => {
                map.remove(id);
                drop(map);
                self.events.remove_container(id);
                let _ = std::fs::remove_dir_all(&entry.bundle);
                self.exits.forget(init.pid());
                for exec in entry.execs().values() {
                    self.exits.forget(exec.pid());
                }
                tracing::info!(container = id, "container removed");
                Ok(())
            }
            Err(e) => {
                map.insert(id.to_owned(), Some(entry));
                Err(e)
            }
        }
    }
}

impl ContainerManager {
    /// Ids of every container held (DestroySandbox stops and removes them all).
    pub fn ids(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }
}

/// cgroup hooks (cgroups.rs, events.rs): where a container's cgroup is, whose pids are
/// whose, and the event log.
impl ContainerManager {
    /// The cgroup directory of container `id`.
    pub fn cgroup_dir(&self, id: &str) -> Result<PathBuf, ManagerError> {
        Ok(self.entry(id)?.cgroup.clone())
    }

    /// The started processes of container `id`: (pid, exec id), "" for the init.
    pub fn process_pids(&self, id: &str) -> Result<Vec<(i32, String)>, ManagerError> {
        let entry = self.entry(id)?;
        let mut pids = vec![(entry.init.pid(), String::new())];
        pids.extend(
            entry
                .execs()
                .iter()
                .map(|(exec_id, p)| (p.pid(), exec_id.clone()))
                .filter(|(pid, _)| *pid > 0),
        );
        Ok(pids)
    }

    /// Exits and OOM kills of the pod's containers.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }
}

/// Terminals (tty.rs): the console sockets and ResizeTty.
impl ContainerManager {
    /// Where console sockets are made (short paths: a socket path has 108 bytes).
    fn consoles(&self) -> PathBuf {
        self.root.with_file_name("consoles")
    }

    /// Sets the window size of a process's terminal (before or after it started).
    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ManagerError> {
        let size = WindowSize::new(rows, cols).map_err(|e| ManagerError::Invalid(e.to_string()))?;
        let (_entry, proc) = self.process(id, exec_id)?;
        let Some(terminal) = proc.stdio.terminal() else {
            return Err(ManagerError::Precondition(format!(
                "process ({id:?}, {exec_id:?}) has no terminal"
            )));
        };
        terminal
            .resize(size)
            .map_err(|e| runtime_err("ResizeTty", error_chain(&e)))
    }
}

/// How long a process has to hand over its pty master once it was built.
const MASTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The declared streams must agree with each other and with the spec's
/// `process.terminal` (the shim derives both from one containerd request).
fn check_terminal(spec_terminal: Option<bool>, declared: Declared) -> Result<(), ManagerError> {
    declared
        .check()
        .map_err(|e| ManagerError::Invalid(e.to_string()))?;
    let spec_terminal = spec_terminal.unwrap_or(false);
    if spec_terminal != declared.terminal {
        return Err(ManagerError::Invalid(format!(
            "process.terminal is {spec_terminal} but StdioSpec.terminal is {}",
            declared.terminal
        )));
    }
    Ok(())
}

/// A console socket for a process with a terminal.
fn open_console(
    child: &ChildStdio,
    dir: &std::path::Path,
) -> Result<Option<ConsoleSocket>, ManagerError> {
    match child {
        ChildStdio::Terminal => ConsoleSocket::bind(dir)
            .map(Some)
            .map_err(|e| runtime_err("the process's terminal", error_chain(&e))),
        ChildStdio::Pipes { .. } => Ok(None),
    }
}

/// A failed build: libcontainer's own error chain, or why the builder process failed.
/// Reloads a container libcontainer just started. Loading reads the init's
/// `/proc/<pid>/stat`; an init that exits at once can vanish between libcontainer's
/// existence check and that read ("File not found"), so a failed load is retried: the
/// next one sees the process gone and reports the container stopped.
fn load_started(dir: &std::path::Path) -> Result<Container, ManagerError> {
    const ATTEMPTS: usize = 3;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match Container::load(dir.to_path_buf()) {
            Ok(container) => return Ok(container),
            Err(e) => last = Some(error_chain(&e)),
        }
    }
    Err(runtime_err(
        "load the started container",
        last.unwrap_or_default(),
    ))
}

fn build_err(what: &str, e: build_process::BuildError) -> ManagerError {
    match e {
        build_process::BuildError::Failed(chain) => runtime_err(what, chain),
        other => runtime_err(what, error_chain(&other)),
    }
}

/// The builder process's exit is the reaper's to collect; its record would only
/// shadow a later process that reuses the pid.
fn forget_builder(exits: &Arc<ExitTable>, built: &build_process::Built) {
    let (exits, pid) = (exits.clone(), built.builder_pid);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let reaped = tokio::time::timeout(BUILDER_EXIT_TIMEOUT, exits.wait(pid)).await;
        if reaped.is_ok() {
            exits.forget(pid);
        }
    });
}

/// How long the builder process may take to exit once it replied.
const BUILDER_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Receives the built process's pty master into its stdio.
fn take_master(console: Option<&ConsoleSocket>, stdio: &ProcessStdio) -> Result<(), ManagerError> {
    let Some(console) = console else {
        return Ok(());
    };
    let master = console
        .receive_master(MASTER_TIMEOUT)
        .map_err(|e| runtime_err("the process's terminal", error_chain(&e)))?;
    stdio.set_master(master)?;
    Ok(())
}

impl StdioRegistry for ContainerManager {
    fn find(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessStdio>> {
        self.process(container_id, exec_id)
            .ok()
            .map(|(_, p)| p.stdio.clone())
    }
}

/// Whether `/` is the kernel's initial rootfs (the agent runs from an initramfs):
/// pivot_root(2) refuses to move that mount, so containers must enter their root by
/// MS_MOVE + chroot, as runc's `--no-pivot` does.
fn root_is_initramfs() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let answer = info
        .lines()
        .find(|line| line.split(' ').nth(4) == Some("/"))
        .and_then(|line| line.split_once(" - "))
        .is_some_and(|(_, rest)| rest.split(' ').next() == Some("rootfs"));
    if answer {
        tracing::info!(
            "the agent runs from an initramfs: containers enter their root without pivot_root"
        );
    }
    answer
}

fn error_chain(e: &dyn std::error::Error) -> String {
    crate::server::error_chain(e)
}
