//! libcontainer's builders, run in a fresh single-threaded process.
//!
//! libcontainer creates a container's processes with a raw `clone3`: the child starts
//! with a copy of every lock the parent's other threads held at that instant (musl's
//! malloc lock, tracing's writer, ...) and can block on one forever. The agent is a
//! multi-threaded tokio process, so it never calls the builders itself: it re-executes
//! its own binary with the hidden first argument [`BUILD_ARG`]; that process has one
//! thread, no runtime, and no logging, receives one request (and the process's stdio
//! fds) over a `SOCK_SEQPACKET` socket on its fd 0, runs the builder, replies with the
//! pid or the error chain, and exits.
//!
//! The container's processes are the builder process's children (libcontainer clones
//! the init as a sibling of its intermediate process); when it exits they are
//! re-parented to the agent (PID 1, or a child subreaper on the host), whose reaper
//! reports their exits as before.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recv, recvmsg, send, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};
use serde_json::{json, Value};

use super::executor::AgentExecutor;
use super::stdio::ChildStdio;
use super::tty::WindowSize;

/// The hidden first argument that makes `crx-agent` a builder process.
pub const BUILD_ARG: &str = "__build";

/// Largest request or reply message.
const MAX_MESSAGE: usize = 64 * 1024;
/// Longest error text a reply carries (the rest is cut).
const MAX_ERROR_TEXT: usize = 16 * 1024;
/// How long a build may take before the builder process is killed.
const BUILD_TIMEOUT: Duration = Duration::from_secs(60);
/// The stdio fds a request carries: stdin, stdout, stderr.
const STDIO_FDS: usize = 3;

/// Why a build in the builder process failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The socket to the builder process could not be made or used.
    #[error("cannot talk to the builder process")]
    Channel(#[source] Errno),
    /// The builder process could not be started.
    #[error("cannot start the builder process")]
    Spawn(#[source] std::io::Error),
    /// No reply within [`BUILD_TIMEOUT`]; the builder process was killed.
    #[error("the builder process did not answer within {0:?}")]
    Timeout(Duration),
    /// The builder process ended without a reply.
    #[error("the builder process ended without an answer")]
    NoReply,
    /// The reply was not one the builder process sends.
    #[error("malformed reply from the builder process")]
    BadReply,
    /// libcontainer failed; its error chain.
    #[error("{0}")]
    Failed(String),
}

/// Creates (not starts) a container from its bundle.
pub struct InitRequest<'a> {
    pub id: &'a str,
    /// libcontainer's state root.
    pub root: &'a Path,
    pub bundle: &'a Path,
    pub no_pivot: bool,
    /// Where the init sends its pty master, for a terminal.
    pub console: Option<&'a Path>,
}

/// Runs an exec process (a process.json) in a created container.
pub struct ExecRequest<'a> {
    pub id: &'a str,
    pub root: &'a Path,
    pub process_json: &'a Path,
    pub console: Option<&'a Path>,
    /// Applied to the terminal before the program runs.
    pub size: Option<WindowSize>,
}

/// Starts a created container (its init runs the program).
pub struct StartRequest<'a> {
    pub id: &'a str,
    pub root: &'a Path,
}

/// A built process.
#[derive(Clone, Copy, Debug)]
pub struct Built {
    /// The container's (or exec's) process.
    pub pid: i32,
    /// The builder process, which the reaper collects (its exit record is noise).
    pub builder_pid: i32,
}

/// Creates the container in a builder process. Blocking.
pub fn build_init(request: &InitRequest<'_>, stdio: ChildStdio) -> Result<Built, BuildError> {
    let message = json!({
        "kind": "init",
        "id": request.id,
        "root": path_text(request.root),
        "bundle": path_text(request.bundle),
        "no_pivot": request.no_pivot,
        "console": request.console.map(path_text),
    });
    run(&message, Some(stdio))
}

/// Starts the created container in a builder process: libcontainer changes the
/// process-wide working directory to reach the init's notify socket, which would race
/// with anything else the agent does at the time. Blocking.
pub fn start_init(request: &StartRequest<'_>) -> Result<Built, BuildError> {
    let message = json!({
        "kind": "start",
        "id": request.id,
        "root": path_text(request.root),
    });
    run(&message, None)
}

/// Runs the exec process in a builder process. Blocking.
pub fn build_exec(request: &ExecRequest<'_>, stdio: ChildStdio) -> Result<Built, BuildError> {
    let message = json!({
        "kind": "exec",
        "id": request.id,
        "root": path_text(request.root),
        "process": path_text(request.process_json),
        "console": request.console.map(path_text),
        "rows": request.size.map(|s| s.rows),
        "cols": request.size.map(|s| s.cols),
    });
    run(&message, Some(stdio))
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Starts a builder process, sends it `message` and the stdio fds, and waits for its
/// reply.
fn run(message: &Value, stdio: Option<ChildStdio>) -> Result<Built, BuildError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(BuildError::Channel)?;
    // No pre_exec hook: std spawns without running any of our code in the child, so
    // spawning from a multi-threaded process is safe here.
    let child = Command::new("/proc/self/exe")
        .arg(BUILD_ARG)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BuildError::Spawn)?;
    let builder_pid = i32::try_from(child.id()).unwrap_or(0);
    // Never waited on here: the agent's reaper collects every child.
    drop(child);
    let text = message.to_string();
    let fds: Vec<RawFd> = match &stdio {
        Some(ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        }) => vec![stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
        Some(ChildStdio::Terminal) | None => Vec::new(),
    };
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        ours.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &cmsgs,
        MsgFlags::empty(),
        None,
    );
    // The builder process holds its own copies now.
    drop(stdio);
    if let Err(e) = sent {
        kill(builder_pid);
        return Err(BuildError::Channel(e));
    }
    let reply = match receive_reply(&ours) {
        Ok(reply) => reply,
        Err(e) => {
            if matches!(e, BuildError::Timeout(_)) {
                kill(builder_pid);
            }
            return Err(e);
        }
    };
    let reply: Value = serde_json::from_slice(&reply).map_err(|_| BuildError::BadReply)?;
    if let Some(error) = reply.get("error").and_then(Value::as_str) {
        return Err(BuildError::Failed(error.to_owned()));
    }
    let pid = reply
        .get("pid")
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or(BuildError::BadReply)?;
    Ok(Built { pid, builder_pid })
}

/// Kills a builder process that did not answer. It has not been reaped: it never
/// closed its socket, so it has not exited.
fn kill(pid: i32) {
    if pid > 0 {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn receive_reply(socket: &OwnedFd) -> Result<Vec<u8>, BuildError> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BuildError::Timeout(BUILD_TIMEOUT));
        }
        let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(BuildError::Channel(e)),
        }
    }
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        match recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
            Ok(0) => return Err(BuildError::NoReply),
            Ok(n) => {
                buffer.truncate(n);
                return Ok(buffer);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(BuildError::Channel(e)),
        }
    }
}

/// The builder process: `crx-agent __build`. Called first thing in `main`, while the
/// process has one thread.
pub fn main() -> ExitCode {
    // The agent's working directory may be anywhere (even deleted); every path in a
    // request is absolute.
    let _ = nix::unistd::chdir("/");
    let socket = match take_socket() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crx-agent {BUILD_ARG}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reply = match receive_request(&socket).and_then(|(request, fds)| build(&request, fds)) {
        Ok(pid) => json!({ "pid": pid }),
        Err(mut text) => {
            if text.len() > MAX_ERROR_TEXT {
                let mut cut = MAX_ERROR_TEXT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            json!({ "error": text })
        }
    };
    loop {
        match send(
            socket.as_raw_fd(),
            reply.to_string().as_bytes(),
            MsgFlags::empty(),
        ) {
            Err(Errno::EINTR) => continue,
            Ok(_) => return ExitCode::SUCCESS,
            Err(_) => return ExitCode::FAILURE,
        }
    }
}

/// Moves the request socket off fd 0 (which the container's processes must not
/// inherit) and puts /dev/null there.
fn take_socket() -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::fcntl(0, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl just returned this new fd; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open just returned this new fd; nothing else owns it.
    let null = unsafe { OwnedFd::from_raw_fd(null) };
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    Ok(socket)
}

fn receive_request(socket: &OwnedFd) -> Result<(Value, Vec<OwnedFd>), String> {
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; STDIO_FDS]);
    let (length, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("cannot receive the request: {e}")),
        };
        let mut fds = Vec::new();
        for cmsg in message
            .cmsgs()
            .map_err(|e| format!("cannot read the request's fds: {e}"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed this fd for us; nothing else
                    // owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Err("the request was truncated".to_owned());
        }
        break (message.bytes, fds);
    };
    if length == 0 {
        return Err("the agent sent no request".to_owned());
    }
    let request: Value =
        serde_json::from_slice(&buffer[..length]).map_err(|e| format!("malformed request: {e}"))?;
    Ok((request, fds))
}

fn text_field<'a>(request: &'a Value, name: &str) -> Result<&'a str, String> {
    request
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("request without {name:?}"))
}

/// Runs the builder the request names; the pid, or libcontainer's error chain.
fn build(request: &Value, fds: Vec<OwnedFd>) -> Result<i32, String> {
    let id = text_field(request, "id")?.to_owned();
    let root = PathBuf::from(text_field(request, "root")?);
    let console = request
        .get("console")
        .and_then(Value::as_str)
        .map(PathBuf::from);
    if text_field(request, "kind")? == "start" {
        if !fds.is_empty() {
            return Err("a start request carries no fds".to_owned());
        }
        let mut container = Container::load(root.join(&id)).map_err(|e| error_chain(&e))?;
        container.start().map_err(|e| error_chain(&e))?;
        return container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| "libcontainer reported no pid for the container".to_owned());
    }
    let stdio = match <[OwnedFd; STDIO_FDS]>::try_from(fds) {
        Ok(fds) => Some(fds),
        Err(fds) if fds.is_empty() => None,
        Err(fds) => return Err(format!("request with {} stdio fds", fds.len())),
    };
    if stdio.is_none() == console.is_none() {
        return Err("a request needs either stdio fds or a console socket".to_owned());
    }
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_executor(AgentExecutor::default())
        .with_root_path(&root)
        .map_err(|e| format!("libcontainer state root: {}", error_chain(&e)))?;
    let builder = match stdio {
        Some([stdin, stdout, stderr]) => builder
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr),
        None => builder.with_console_socket(console.as_deref()),
    };
    match text_field(request, "kind")? {
        "init" => {
            std::fs::create_dir_all(&root)
                .map_err(|e| format!("cannot create the state root: {e}"))?;
            let bundle = PathBuf::from(text_field(request, "bundle")?);
            let no_pivot = request
                .get("no_pivot")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let container = builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(no_pivot)
                .build()
                .map_err(|e| error_chain(&e))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer reported no pid for the container".to_owned())
        }
        "exec" => {
            let process = PathBuf::from(text_field(request, "process")?);
            let dimension = |name: &str| {
                request
                    .get(name)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            let size = match (dimension("rows"), dimension("cols")) {
                (Some(rows), Some(cols)) => WindowSize::new(rows, cols).ok(),
                _ => None,
            };
            let size = if console.is_some() { size } else { None };
            let builder = builder.with_executor(AgentExecutor { size });
            let pid = builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            Ok(pid.as_raw())
        }
        other => Err(format!("unknown request kind {other:?}")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    crate::server::error_chain(e)
}
