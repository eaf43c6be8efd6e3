//! The agent's containers: create (not start) through libcontainer with the process's
//! stdio pipes in place, start once the declared streams are attached, wait, signal,
//! remove. Every blocking libcontainer call runs off the async runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;

use super::exits::{ExitRecord, ExitTable};
use super::spec::{self, SpecError};
use super::stdio::{Declared, ProcessStdio, StdioError, StdioRegistry};

/// Most containers one agent holds (container.proto).
pub const MAX_CONTAINERS: usize = 128;

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
    pid: i32,
    stdio: Arc<ProcessStdio>,
    started: AtomicBool,
}

struct Entry {
    container: Arc<Mutex<Container>>,
    init: Arc<Proc>,
    bundle: PathBuf,
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
        ContainerManager {
            root: state_dir.join("containers"),
            bundles: state_dir.join("bundles"),
            exits,
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
        if !exec_id.is_empty() {
            return Err(ManagerError::NotFound(format!(
                "no exec {exec_id:?} in container {id:?}"
            )));
        }
        let init = entry.init.clone();
        Ok((entry, init))
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
                let pid = entry.init.pid;
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
        let bundle = self.bundles.join(id);
        spec::write_bundle(&bundle, &spec)?;
        let (stdio, child) = match ProcessStdio::new(declared) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e.into());
            }
        };
        let root = self.root.clone();
        let (job_id, job_bundle) = (id.to_owned(), bundle.clone());
        let built = blocking("create the container", move || {
            std::fs::create_dir_all(&root).map_err(|e| runtime_err("create the state root", e))?;
            let container = ContainerBuilder::new(job_id.clone(), SyscallType::default())
                .with_root_path(&root)
                .map_err(|e| runtime_err("libcontainer state root", e))?
                .with_stdin(child.stdin)
                .with_stdout(child.stdout)
                .with_stderr(child.stderr)
                .as_init(&job_bundle)
                .with_systemd(false)
                .with_detach(true)
                .build();
            match container {
                Ok(c) => Ok(c),
                Err(e) => {
                    // Whatever state libcontainer left for the id would block a retry.
                    let state = root.join(&job_id);
                    if let Ok(mut c) = Container::load(state.clone()) {
                        let _ = c.delete(true);
                    }
                    let _ = std::fs::remove_dir_all(&state);
                    Err(runtime_err("libcontainer could not create the container", error_chain(&e)))
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
                pid,
                stdio,
                started: AtomicBool::new(false),
            }),
            bundle,
        })
    }

    /// Starts the process once its declared streams are attached (by `deadline`).
    pub async fn start(&self, id: &str, exec_id: &str, deadline: Instant) -> Result<i32, ManagerError> {
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
        let container = entry.container.clone();
        blocking("start the container", move || {
            let mut c = container.lock().unwrap_or_else(|p| p.into_inner());
            c.start()
                .map_err(|e| runtime_err("libcontainer could not start the container", error_chain(&e)))
        })
        .await
        .inspect_err(|_| proc.started.store(false, Ordering::Release))?;
        tracing::info!(container = id, pid = proc.pid, "container started");
        Ok(proc.pid)
    }

    /// Waits (until `deadline`) for the process to end.
    pub async fn wait(&self, id: &str, exec_id: &str, deadline: Instant) -> Result<ProcessEnd, ManagerError> {
        let (_entry, proc) = self.process(id, exec_id)?;
        let pid = proc.pid;
        match tokio::time::timeout_at(deadline.into(), self.exits.wait(pid)).await {
            Ok(exit) => Ok(ProcessEnd { pid, exit }),
            Err(_) => Err(ManagerError::Deadline(format!(
                "process ({id:?}, {exec_id:?}) still running at the request's deadline; ask again"
            ))),
        }
    }

    /// Sends `signal` to the process, or to every process of the container.
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), ManagerError> {
        let Some(sig) = i32::try_from(signal).ok().filter(|s| (1..=64).contains(s)) else {
            return Err(ManagerError::Invalid(format!("signal {signal} is not 1-64")));
        };
        let (entry, proc) = self.process(id, exec_id)?;
        if self.exits.get(proc.pid).is_some() {
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
                c.kill(signal, true)
                    .map_err(|e| runtime_err("libcontainer could not signal the container", error_chain(&e)))
            })
            .await;
        }
        if proc.pid <= 0 {
            return Err(ManagerError::Precondition("the process has no pid".into()));
        }
        // SAFETY: kill takes plain integers; the pid is a child the reaper has not
        // reported, so it has not been reused.
        if unsafe { libc::kill(proc.pid, sig) } != 0 {
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
        let exited = self.exits.get(init.pid).is_some();
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
            .map_err(|e| runtime_err("libcontainer could not delete the container", error_chain(&e)))
        })
        .await;
        let mut map = self.map();
        match result {
            Ok(()) => {
                map.remove(id);
                drop(map);
                let _ = std::fs::remove_dir_all(&entry.bundle);
                self.exits.forget(init.pid);
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

impl StdioRegistry for ContainerManager {
    fn find(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessStdio>> {
        self.process(container_id, exec_id)
            .ok()
            .map(|(_, p)| p.stdio.clone())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    crate::server::error_chain(e)
}
