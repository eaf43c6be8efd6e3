//! Reaps every child that exits, so none lingers as a zombie: on SIGCHLD, `waitpid(-1,
//! WNOHANG)` until nothing is left. As PID 1 (or a child subreaper on the host) the
//! agent inherits every orphan in the VM.
//!
//! Exits are published on a broadcast channel. The agent is the only caller of
//! `waitpid`, so whoever starts processes (containers, later) learns their exit
//! statuses here rather than by waiting themselves.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// Exits kept for slow subscribers before the oldest are dropped.
const EXIT_BACKLOG: usize = 256;

/// Why the reaper could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The SIGCHLD handler could not be installed.
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ChildStatus {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn exit_code(self) -> i32 {
        match self {
            ChildStatus::Exited(code) => code,
            ChildStatus::Signaled(sig) => 128 + sig,
        }
    }
}

/// One reaped child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildExit {
    /// Its process id.
    pub pid: i32,
    /// How it ended.
    pub status: ChildStatus,
}

/// A running reaper; drop it to stop it.
pub struct Reaper {
    exits: broadcast::Sender<ChildExit>,
    task: tokio::task::JoinHandle<()>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts reaping on the current runtime.
    pub fn spawn() -> Result<Reaper, ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let (exits, _) = broadcast::channel(EXIT_BACKLOG);
        let tx = exits.clone();
        let task = tokio::spawn(async move {
            loop {
                // Children that exited before the handler existed are collected on the
                // first pass, which runs before the first wait.
                reap_all(&tx);
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(Reaper { exits, task })
    }

    /// Exits from now on.
    // The container manager subscribes; without containers only the tests do.
    #[cfg_attr(not(feature = "containers"), allow(dead_code))]
    pub fn subscribe(&self) -> broadcast::Receiver<ChildExit> {
        self.exits.subscribe()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects every child that has exited; never blocks.
fn reap_all(exits: &broadcast::Sender<ChildExit>) {
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(WaitStatus::Exited(pid, code)) => ChildExit {
                pid: pid.as_raw(),
                status: ChildStatus::Exited(code),
            },
            Ok(WaitStatus::Signaled(pid, sig, _core)) => ChildExit {
                pid: pid.as_raw(),
                status: ChildStatus::Signaled(sig as i32),
            },
            // Stops and continues are not exits; waitpid without WUNTRACED does not
            // report them, but be safe.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return;
            }
        };
        tracing::debug!(
            pid = status.pid,
            exit_code = status.status.exit_code(),
            "reaped child"
        );
        // No subscriber is fine: the zombie is gone either way.
        let _ = exits.send(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    async fn exit_of(rx: &mut broadcast::Receiver<ChildExit>, pid: i32) -> ChildExit {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let exit = rx.recv().await.expect("reaper stopped");
                if exit.pid == pid {
                    return exit;
                }
            }
        })
        .await
        .expect("child was not reaped within 10 s")
    }

    /// One test, so no other test's children race with the reaper's waitpid(-1).
    // The children are never waited on here on purpose: reaping them is the reaper's job.
    #[allow(clippy::zombie_processes)]
    #[test]
    fn reaps_children_and_reports_how_they_ended() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let reaper = Reaper::spawn().unwrap();
            let mut rx = reaper.subscribe();

            let ok = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
            let exit = exit_of(&mut rx, ok.id() as i32).await;
            assert_eq!(exit.status, ChildStatus::Exited(3));
            assert_eq!(exit.status.exit_code(), 3);

            let killed = Command::new("sh")
                .args(["-c", "kill -9 $$"])
                .spawn()
                .unwrap();
            let exit = exit_of(&mut rx, killed.id() as i32).await;
            assert_eq!(exit.status, ChildStatus::Signaled(9));
            assert_eq!(exit.status.exit_code(), 137);

            // The zombie is gone: the pid is no longer our child.
            assert_eq!(
                waitpid(Pid::from_raw(ok.id() as i32), Some(WaitPidFlag::WNOHANG)),
                Err(Errno::ECHILD)
            );
        });
    }
}
