//! Exit statuses of the processes the agent started, from the reaper's broadcast. The
//! reaper is the only caller of `waitpid`, so an exit may be reaped before anyone asks
//! about the pid (or even before its creator learned the pid): every exit is recorded,
//! the newest [`MAX_RECORDS`] are kept, and waiters look them up by pid. An
//! [`ExitObserver`] (the event log) hears of each exit before any waiter sees it, and
//! decides whether it was an OOM kill.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, watch};

use crate::reaper::{ChildExit, ChildStatus};

/// Exits remembered (containers' processes and the helpers libcontainer forks).
const MAX_RECORDS: usize = 4096;

/// One recorded exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitRecord {
    /// How it ended.
    pub status: ChildStatus,
    /// When the reaper saw it, nanoseconds since the Unix epoch.
    pub at_unix_nanos: u64,
    /// Killed by the OOM killer of its container's cgroup (the observer's verdict).
    pub oom_killed: bool,
}

/// Hears of every exit while the table is locked, before waiters can see it. It must
/// not call back into the table.
pub trait ExitObserver: Send + Sync {
    /// `None` for a pid the observer does not follow (it is told of each pid once at
    /// most); else whether the process was OOM-killed.
    fn exited(&self, pid: i32, record: &ExitRecord) -> Option<bool>;
}

#[derive(Default)]
struct Records {
    by_pid: HashMap<i32, ExitRecord>,
    order: VecDeque<i32>,
}

/// Recorded exits, shared by the services.
pub struct ExitTable {
    records: Mutex<Records>,
    /// Bumped on every new record; waiters re-check on change.
    generation: watch::Sender<u64>,
    observer: OnceLock<Arc<dyn ExitObserver>>,
}

impl ExitTable {
    /// Records every exit `exits` delivers, on a task of the current runtime.
    pub fn spawn(mut exits: broadcast::Receiver<ChildExit>) -> Arc<ExitTable> {
        let table = Arc::new(ExitTable {
            records: Mutex::new(Records::default()),
            generation: watch::channel(0).0,
            observer: OnceLock::new(),
        });
        let weak = Arc::downgrade(&table);
        tokio::spawn(async move {
            loop {
                let exit = match exits.recv().await {
                    Ok(exit) => exit,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::error!(
                            lost = n,
                            "exit statuses lost: the exit table fell behind the reaper"
                        );
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(table) = weak.upgrade() else { return };
                table.record(exit);
            }
        });
        table
    }

    fn record(&self, exit: ChildExit) {
        let at_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut record = ExitRecord {
            status: exit.status,
            at_unix_nanos,
            oom_killed: false,
        };
        let mut records = self.lock();
        if let Some(oom) = self
            .observer
            .get()
            .and_then(|o| o.exited(exit.pid, &record))
        {
            record.oom_killed = oom;
        }
        if records.by_pid.insert(exit.pid, record).is_none() {
            records.order.push_back(exit.pid);
        }
        while records.order.len() > MAX_RECORDS {
            if let Some(old) = records.order.pop_front() {
                records.by_pid.remove(&old);
            }
        }
        drop(records);
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        // A panic while holding the lock leaves the map consistent (single inserts).
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit of `pid`, if it has been reaped.
    pub fn get(&self, pid: i32) -> Option<ExitRecord> {
        self.lock().by_pid.get(&pid).copied()
    }

    /// Waits for the exit of `pid`.
    pub async fn wait(&self, pid: i32) -> ExitRecord {
        let mut rx = self.generation.subscribe();
        loop {
            if let Some(record) = self.get(pid) {
                return record;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: cannot happen while we are borrowed.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sets the observer (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn ExitObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Tells the observer of `pid`'s exit if it was recorded before the observer
    /// followed the pid (a process that ended before its creator learned its pid).
    pub fn replay(&self, pid: i32) {
        let mut records = self.lock();
        let Some(record) = records.by_pid.get_mut(&pid) else {
            return;
        };
        if let Some(oom) = self.observer.get().and_then(|o| o.exited(pid, record)) {
            record.oom_killed = oom;
            drop(records);
            self.generation.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Forgets `pid` (its container is gone; the pid may be reused).
    pub fn forget(&self, pid: i32) {
        let mut records = self.lock();
        if records.by_pid.remove(&pid).is_some() {
            records.order.retain(|p| *p != pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_see_exits_recorded_before_and_after_they_ask() {
        let (tx, rx) = broadcast::channel(16);
        let table = ExitTable::spawn(rx);
        tx.send(ChildExit {
            pid: 10,
            status: ChildStatus::Exited(3),
        })
        .unwrap();
        let early = tokio::time::timeout(Duration::from_secs(5), table.wait(10))
            .await
            .unwrap();
        assert_eq!(early.status, ChildStatus::Exited(3));

        let waiter = {
            let table = table.clone();
            tokio::spawn(async move { table.wait(11).await })
        };
        tokio::task::yield_now().await;
        tx.send(ChildExit {
            pid: 11,
            status: ChildStatus::Signaled(9),
        })
        .unwrap();
        let late = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(late.status.exit_code(), 137);

        table.forget(10);
        assert_eq!(table.get(10), None);
    }
}
