//! One process of a pod VM (a VMM or a device back end): spawned so it dies with the
//! shim, watched through a pidfd so several can be waited on at once, and given a log
//! file whose tail explains a failure.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::VmError;

/// How a VM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessExit {
    Code(i32),
    Signal(i32),
}

impl ProcessExit {
    pub fn success(&self) -> bool {
        *self == ProcessExit::Code(0)
    }

    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ProcessExit::Code(code),
            (None, Some(sig)) => ProcessExit::Signal(sig),
            // Neither is only possible for stopped/continued states, which `wait`
            // does not report without WUNTRACED.
            (None, None) => ProcessExit::Code(-1),
        }
    }
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Code(0) => f.write_str("exited cleanly"),
            ProcessExit::Code(c) => write!(f, "exited with code {c}"),
            ProcessExit::Signal(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS, a seccomp violation",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// A child process of the shim that belongs to one pod VM.
pub struct VmProcess {
    pub name: &'static str,
    child: Child,
    pidfd: OwnedFd,
    log_path: PathBuf,
    exit: Option<ProcessExit>,
    /// Wall-clock time just before the fork, for comparing with VMM trace timestamps.
    pub spawned_at: std::time::SystemTime,
}

impl VmProcess {
    /// Spawns `cmd` with stdout/stderr appended to `log_path`. The child gets SIGKILL
    /// if the thread that spawned it dies, so callers spawn from a long-lived thread.
    pub fn spawn(name: &'static str, cmd: &mut Command, log_path: &Path) -> Result<Self, VmError> {
        let binary = PathBuf::from(cmd.get_program());
        let spawn_err = |source| VmError::Spawn {
            process: name,
            binary: binary.clone(),
            source,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(spawn_err)?;
        let log2 = log.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned_at = std::time::SystemTime::now();
        let child = cmd.spawn().map_err(spawn_err)?;
        let pidfd = pidfd_open(child.id()).map_err(spawn_err)?;
        Ok(Self {
            name,
            child,
            pidfd,
            log_path: log_path.to_path_buf(),
            exit: None,
            spawned_at,
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's pidfd: readable once the process has ended.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The exit, if the process has ended (reaps it).
    pub fn try_exit(&mut self) -> Result<Option<ProcessExit>, VmError> {
        if self.exit.is_none() {
            if let Some(status) = self.child.try_wait().map_err(VmError::Wait)? {
                self.exit = Some(ProcessExit::from_status(status));
            }
        }
        Ok(self.exit)
    }

    pub fn signal(&self, sig: i32) {
        if self.exit.is_some() {
            return;
        }
        // SAFETY: pidfd_send_signal on a pidfd we own; a pidfd cannot refer to a
        // recycled pid, so this never signals an unrelated process.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<u8>(),
                0,
            );
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit.
    pub fn terminate(&mut self, grace: Duration) -> Result<ProcessExit, VmError> {
        if let Some(exit) = self.try_exit()? {
            return Ok(exit);
        }
        self.signal(libc::SIGTERM);
        if wait_any(&mut [&mut *self], Some(grace))?.is_none() {
            self.signal(libc::SIGKILL);
            wait_any(&mut [&mut *self], None)?;
        }
        self.try_exit()?.ok_or_else(|| {
            VmError::Wait(std::io::Error::other("process did not end after SIGKILL"))
        })
    }

    /// The last lines of the process's log (at most 2 KiB), for error messages.
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path, 2048)
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if matches!(self.try_exit(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Lets the child started by `cmd` inherit `fd` under the same number (the parent's
/// copy keeps its close-on-exec flag, so other children do not get it). The caller
/// keeps `fd` open until the spawn.
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // fcntl(2), which is async-signal-safe; `fd` is open in the parent at fork time.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until one of `procs` ends or `timeout` passes; returns the index of one that
/// ended (already reaped) or None on timeout.
pub fn wait_any(
    procs: &mut [&mut VmProcess],
    timeout: Option<Duration>,
) -> Result<Option<usize>, VmError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        for (i, p) in procs.iter_mut().enumerate() {
            if p.try_exit()?.is_some() {
                return Ok(Some(i));
            }
        }
        let mut fds: Vec<libc::pollfd> = procs
            .iter()
            .map(|p| libc::pollfd {
                fd: p.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(VmError::Wait(err));
            }
        }
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    // Keep whole lines only, and only the last few: enough to name the cause.
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
