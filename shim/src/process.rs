//! The shim's view of each task process (a container's init, or an exec): its state,
//! its stdio paths, and its exit, which `Wait` callers await.

use std::time::SystemTime;

use containerd_shim::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

/// Exit status given to processes that die with their VM (128 + SIGKILL).
pub const KILLED_WITH_VM: u32 = 137;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// The stdio containerd asked for (FIFO paths; empty: none).
#[derive(Clone, Debug, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// One process of a task.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub started: bool,
    pub stdio: StdioPaths,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(stdio: StdioPaths) -> Self {
        Process {
            pid: 0,
            started: false,
            stdio,
            exit_tx: watch::channel(None).0,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Records the exit once; returns false if it was already recorded.
    pub fn set_exit(&self, exit: Exit) -> bool {
        self.exit_tx.send_if_modified(|slot| {
            if slot.is_some() {
                false
            } else {
                *slot = Some(exit);
                true
            }
        })
    }

    /// A receiver that sees the exit when it comes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    pub fn status(&self) -> Status {
        match (self.started, self.exit()) {
            (_, Some(_)) => Status::STOPPED,
            (true, None) => Status::RUNNING,
            (false, None) => Status::CREATED,
        }
    }
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    t
}

pub fn now_timestamp() -> Timestamp {
    timestamp(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_recorded_once_and_seen_by_waiters() {
        let p = Process::new(StdioPaths::default());
        assert_eq!(p.status(), Status::CREATED);
        let mut rx = p.subscribe();
        let first = Exit {
            status: 3,
            at: SystemTime::UNIX_EPOCH,
        };
        assert!(p.set_exit(first));
        assert!(!p.set_exit(Exit {
            status: 9,
            at: SystemTime::now()
        }));
        assert_eq!(p.exit(), Some(first));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), Some(first));
        assert_eq!(p.status(), Status::STOPPED);
    }
}
