//! crx-agent: PID 1 of a crx pod VM, and the ttrpc service the shim talks to.
//!
//! Two modes, chosen by the process id:
//! - **Guest** (PID 1): mount the basics, reap orphans, log to /dev/kmsg or the host,
//!   serve on `vsock://-1:1024`, mark "ready" on the boot-marker port, power the VM off
//!   on request. Never exits: an init that exits panics the kernel.
//! - **Host** (any other PID): serve on `--listen` (normally `unix:///path`) with none
//!   of the PID 1 duties or port writes, so the service can be tested as an ordinary
//!   process; Shutdown (or SIGTERM/SIGINT) just ends the process.
//!
//! Usage: `crx-agent [--listen ADDR] [--log LEVEL] [--state-dir DIR]`
//!
//! The state directory holds what the agent makes at run time; storages are mounted
//! under `<state dir>/storage`. Inside a VM it is `/run/crx`; in host mode a private
//! directory (`--state-dir`, else `$TMPDIR/crx-agent-<pid>`).

mod boot_marker;
mod cmdline;
#[cfg(feature = "containers")]
mod containers;
/// The fuzz targets' per-input checks (agent/fuzz compiles it itself; here for its tests).
#[cfg(test)]
mod fuzzing;
mod init;
mod logging;
mod port_forward;
mod power;
mod reaper;
mod sandbox;
mod server;
mod services;
mod storage;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tracing::level_filters::LevelFilter;

use crate::boot_marker::BootMarker;
use crate::server::{ListenAddr, RunningServer};
use crate::services::AgentState;
use crate::storage::StorageManager;

/// The state directory inside a VM.
const GUEST_STATE_DIR: &str = "/run/crx";

const USAGE: &str =
    "usage: crx-agent [--listen vsock://-1:PORT | unix:///PATH] [--log LEVEL] [--state-dir DIR]\n\
    As PID 1 (inside a VM) it listens on vsock://-1:1024 unless told otherwise;\n\
    elsewhere (host mode) --listen is required.\n\
    Storages are mounted under <state dir>/storage (default state dir: /run/crx in a VM,\n\
    $TMPDIR/crx-agent-<pid> in host mode).";

/// Command-line options.
#[derive(Debug, Default, PartialEq)]
struct Args {
    listen: Option<String>,
    log: Option<String>,
    state_dir: Option<String>,
    version: bool,
    help: bool,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<Args> {
    let mut out = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| anyhow::anyhow!("argument {a:?} is not UTF-8"))?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .with_context(|| format!("{name} needs a value")),
            }
        };
        match name.as_str() {
            "--listen" => out.listen = Some(value("--listen")?),
            "--log" => out.log = Some(value("--log")?),
            "--state-dir" => out.state_dir = Some(value("--state-dir")?),
            "--version" | "-V" => out.version = true,
            "--help" | "-h" => out.help = true,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    Ok(out)
}

fn parse_level(text: &str) -> anyhow::Result<LevelFilter> {
    text.parse::<LevelFilter>().map_err(|_| {
        anyhow::anyhow!("bad log level {text:?}: expected error, warn, info, debug, trace or off")
    })
}

fn main() -> ExitCode {
    // A builder process (containers::build_process) must stay single-threaded: it is
    // told apart before anything else runs.
    #[cfg(feature = "containers")]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == containers::build_process::BUILD_ARG)
    {
        return containers::build_process::main();
    }
    let args = parse_args(std::env::args_os().skip(1));
    // `--listen unix://` means host mode even as PID 1 (say, of a PID namespace on the
    // host): no mounts, no port writes there.
    let wants_host =
        matches!(&args, Ok(a) if a.listen.as_deref().is_some_and(|l| l.starts_with("unix://")));
    if std::process::id() == 1 && !wants_host {
        guest_main(args)
    }
    match host_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging may not be up yet; stderr always is in host mode.
            eprintln!("crx-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1 inside a VM.
fn guest_main(args: anyhow::Result<Args>) -> ! {
    // First, while single-threaded: it rewrites the environment.
    let report = init::setup();
    let marker = BootMarker::claim();
    let (cmdline, cmdline_error) = match cmdline::read() {
        Ok(c) => (c, None),
        Err(e) => (cmdline::AgentCmdline::default(), Some(e)),
    };
    let level = cmdline.log_level.unwrap_or(LevelFilter::INFO);
    match logging::init_guest(level, cmdline.log_port) {
        Ok((target, stream_error)) => {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), log = %target, "crx-agent starting as PID 1");
            if let Some(e) = stream_error {
                tracing::warn!(error = %server::error_chain(&e), "log stream to the host unavailable; logging to /dev/kmsg");
            }
        }
        // Nowhere to log: carry on, the service matters more than its log.
        Err(e) => eprintln!(
            "crx-agent: logging unavailable: {}",
            server::error_chain(&e)
        ),
    }
    install_panic_hook();
    log_init_report(&report);
    log_seccomp_self_test();
    if let Some(e) = cmdline_error {
        tracing::warn!(error = %e, "cannot read {}; using defaults", cmdline::PROC_CMDLINE);
    }
    for problem in &cmdline.problems {
        tracing::warn!("kernel command line: {problem}");
    }
    let marker = match marker {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %server::error_chain(&e), "boot markers disabled");
            None
        }
    };
    // The kernel passes command-line words it does not know to init as arguments; they
    // are not ours to reject.
    let args = args.unwrap_or_else(|e| {
        tracing::warn!("ignoring init arguments: {e:#}");
        Args::default()
    });
    let listen = args
        .listen
        .as_deref()
        .and_then(|a| match ListenAddr::parse(a) {
            Ok(addr) => Some(addr),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring --listen");
                None
            }
        })
        .unwrap_or_else(ListenAddr::guest_default);
    let state_dir = args
        .state_dir
        .as_deref()
        .map_or_else(|| PathBuf::from(GUEST_STATE_DIR), PathBuf::from);

    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(serve_guest(listen, marker.as_ref(), &state_dir)),
        Err(e) => tracing::error!(error = %e, "cannot start the async runtime"),
    }
    power::power_off(marker.as_ref())
}

/// Serves until a shutdown is requested (or serving is impossible).
async fn serve_guest(listen: ListenAddr, marker: Option<&BootMarker>, state_dir: &Path) {
    let _reaper = match reaper::Reaper::spawn() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %server::error_chain(&e), "zombies will not be reaped");
            None
        }
    };
    let state = AgentState::new(StorageManager::new(state_dir.join("storage")));
    #[cfg(feature = "containers")]
    start_containers(
        &state,
        _reaper.as_ref(),
        state_dir,
        containers::stdio::StdioAddr::Vsock(crx_protocols::STDIO_VSOCK_PORT),
    );
    start_port_forward(port_forward::ForwardAddr(
        crx_protocols::PORT_FORWARD_VSOCK_PORT,
    ));
    let listener = server::bind_with_retry(&listen).await;
    if let Some(marker) = marker {
        marker.write(crx_protocols::boot_marker::AGENT_READY);
    }
    let server = match RunningServer::start(listener, services::all(&state), None).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %server::error_chain(&e), "cannot serve; powering off");
            return;
        }
    };
    tracing::info!(%listen, "serving");
    state.shutdown_requested().await;
    server.stop().await;
    state.storage().unmount_all().await;
}

fn log_init_report(report: &init::InitReport) {
    tracing::info!(
        mounted = ?report.mounted,
        already_mounted = ?report.already_mounted,
        cgroup_controllers = ?report.cgroup_controllers,
        "PID 1 set-up done"
    );
    for failure in &report.failures {
        tracing::error!(error = %server::error_chain(failure), "PID 1 set-up step failed");
    }
}

/// With containers built in, checks (while still single-threaded) that seccomp
/// profiles are enforced, and says so.
fn log_seccomp_self_test() {
    #[cfg(feature = "containers")]
    match containers::seccomp_self_test() {
        Ok(()) => tracing::info!("seccomp self-test passed: container profiles are enforced"),
        Err(e) => tracing::error!(error = %server::error_chain(&e), "seccomp self-test failed"),
    }
}

/// Starts the container manager and its stdio listener and hands them to the services;
/// on failure the Containers service answers UNAVAILABLE and the log says why.
#[cfg(feature = "containers")]
fn start_containers(
    state: &Arc<AgentState>,
    reaper: Option<&reaper::Reaper>,
    state_dir: &Path,
    stdio: containers::stdio::StdioAddr,
) {
    let Some(reaper) = reaper else {
        tracing::error!("no reaper: containers disabled (their exits could not be reported)");
        return;
    };
    let exits = containers::exits::ExitTable::spawn(reaper.subscribe());
    let manager = Arc::new(containers::manager::ContainerManager::new(state_dir, exits));
    if let Err(e) = containers::stdio::spawn_listener(&stdio, manager.clone()) {
        tracing::error!(error = %server::error_chain(&e), "containers disabled");
        return;
    }
    state.set_containers(manager);
}

/// Starts the listener of forwarded TCP connections; without it the pod has no port
/// forwarding (the log says why), everything else still works.
fn start_port_forward(addr: port_forward::ForwardAddr) {
    if let Err(e) = port_forward::spawn_listener(&addr) {
        tracing::error!(error = %server::error_chain(&e), "port forwarding disabled");
    }
}

fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Into the agent's log (kmsg or host), then the default report on stderr.
        tracing::error!("crx-agent panicked: {info}");
        logging::flush();
        default(info);
    }));
}

/// Any other process: an ordinary service on the host.
fn host_main(args: anyhow::Result<Args>) -> anyhow::Result<()> {
    let args = args.context(USAGE)?;
    if args.help {
        println!("{USAGE}");
        return Ok(());
    }
    if args.version {
        println!(
            "crx-agent {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            crx_protocols::PROTOCOL_VERSION
        );
        return Ok(());
    }
    let listen = args
        .listen
        .as_deref()
        .context("host mode (not PID 1) needs --listen unix:///PATH")?;
    let listen = ListenAddr::parse(listen)?;
    let level = args
        .log
        .as_deref()
        .map(parse_level)
        .transpose()?
        .unwrap_or(LevelFilter::INFO);
    let state_dir = HostStateDir::new(args.state_dir.as_deref())?;
    logging::init_host(level)?;
    log_seccomp_self_test();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve_host(listen, &state_dir.path))
}

/// Host mode's private state directory: the one given (created if missing), or one
/// of our own under `$TMPDIR`. What the agent created in it is removed at exit; what
/// still holds files (or a mount) is left, never deleted recursively.
struct HostStateDir {
    path: PathBuf,
    ours: bool,
}

impl HostStateDir {
    fn new(given: Option<&str>) -> anyhow::Result<HostStateDir> {
        // Canonical, so mount points under it can be checked for symlinks.
        let Some(dir) = given else {
            // Created only when something is mounted, so an agent that is killed
            // without mounting anything leaves nothing behind.
            let tmp = std::env::temp_dir();
            let tmp = std::fs::canonicalize(&tmp)
                .with_context(|| format!("cannot resolve {}", tmp.display()))?;
            return Ok(HostStateDir {
                path: tmp.join(format!("crx-agent-{}", std::process::id())),
                ours: true,
            });
        };
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {dir}"))?;
        let path = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve state directory {dir}"))?;
        Ok(HostStateDir { path, ours: false })
    }
}

impl Drop for HostStateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.path.join("storage"));
        if self.ours {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

async fn serve_host(listen: ListenAddr, state_dir: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    // Orphans of the processes we start come back to us, as they would to PID 1.
    // Without that a container's init (whose parent, the builder, is gone) would be
    // reaped by someone else and its exit never reported: refuse to serve.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag, no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER); without it \
             container exits would be lost, so the agent does not start",
        );
    }
    let _reaper = reaper::Reaper::spawn()?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    let state: Arc<AgentState> = AgentState::new(StorageManager::new(state_dir.join("storage")));
    // Even as PID 1 (of a PID namespace on the host): the pod gets new namespaces.
    state.sandbox().mark_host_mode();
    let listener = server::bind(&listen)?;
    // Streams come to `<ttrpc socket>_1026`, as a VMM's hybrid vsock names host ports.
    #[cfg(feature = "containers")]
    let stdio_socket = match &listen {
        ListenAddr::Unix(path) => {
            let mut name = path.clone().into_os_string();
            name.push(format!("_{}", crx_protocols::STDIO_VSOCK_PORT));
            let name = PathBuf::from(name);
            start_containers(
                &state,
                Some(&_reaper),
                state_dir,
                containers::stdio::StdioAddr::Unix(name.clone()),
            );
            Some(name)
        }
        ListenAddr::Vsock(_) => {
            start_containers(
                &state,
                Some(&_reaper),
                state_dir,
                containers::stdio::StdioAddr::Vsock(crx_protocols::STDIO_VSOCK_PORT),
            );
            None
        }
    };
    let socket_file = match &listen {
        ListenAddr::Unix(path) => Some(path.clone()),
        ListenAddr::Vsock(_) => None,
    };
    let server = RunningServer::start(listener, services::all(&state), socket_file).await?;
    tracing::info!(%listen, "serving (host mode)");
    tokio::select! {
        () = state.shutdown_requested() => {}
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    server.stop().await;
    state.storage().unmount_all().await;
    #[cfg(feature = "containers")]
    if let Some(path) = stdio_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> anyhow::Result<Args> {
        parse_args(list.iter().map(OsString::from))
    }

    #[test]
    fn parses_arguments() {
        let a = args(&[
            "--listen",
            "unix:///tmp/a.sock",
            "--log=debug",
            "--state-dir",
            "/s",
        ])
        .unwrap();
        assert_eq!(a.listen.as_deref(), Some("unix:///tmp/a.sock"));
        assert_eq!(a.state_dir.as_deref(), Some("/s"));
        assert_eq!(a.log.as_deref(), Some("debug"));
        assert!(args(&["--version"]).unwrap().version);
        assert!(args(&["--listen"]).is_err());
        assert!(args(&["single"]).is_err());
    }

    #[test]
    fn parses_levels() {
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::DEBUG);
        assert!(parse_level("loud").is_err());
    }
}
