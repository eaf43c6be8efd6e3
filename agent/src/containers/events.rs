//! The pod's event log for GetEvents: process exits of the containers' processes and
//! OOM kills in their cgroups, numbered from 1, the newest [`MAX_HELD`] kept.
//!
//! Exits come from the exit table (this log is its [`ExitObserver`]), so an exit is
//! logged before WaitProcess can report it, and both carry the same `oom_killed`. OOM
//! kills are seen in each container's memory.events: checked at every exit of one of
//! its processes (so the OOM event comes before the exit it caused), and whenever a
//! container's memory.events changes (inotify, `super::oom_watch`) for kills of
//! processes the agent did not start itself; polled every [`OOM_POLL`] instead where
//! inotify is not to be had, and every [`OOM_BACKSTOP`] in any case.
//!
//! Which exit was an OOM kill: the kernel does not say per process, so an exit counts
//! as one when the process died of SIGKILL and the container's oom_kill count grew
//! since the previous exit of one of its processes. A SIGKILL from elsewhere that
//! lands right after an OOM kill in the same container could be counted too.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crx_protocols::v1::container::{event, Event, ProcessExit};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cgroups;
use super::exits::{ExitObserver, ExitRecord};
use super::oom_watch::OomWatch;
use crate::reaper::ChildStatus;

/// Events kept (container.proto).
pub const MAX_HELD: usize = 4096;
/// Most events one GetEvents reply carries (container.proto).
pub const MAX_PER_CALL: u32 = 256;
/// How often the containers' memory.events are polled for OOM kills without inotify.
const OOM_POLL: Duration = Duration::from_millis(500);
/// How often they are read with inotify watching them: a watch that could not be
/// added is a missed wake-up, not a missed event.
const OOM_BACKSTOP: Duration = Duration::from_secs(10);

/// A GetEvents request the log cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// max_events over [`MAX_PER_CALL`].
    #[error("max_events {0} is over {MAX_PER_CALL}")]
    TooMany(u32),
    /// The host claims events the agent never numbered.
    #[error("after_sequence {after} is beyond the newest event ({newest})")]
    Ahead { after: u64, newest: u64 },
}

/// The held events, oldest first, with consecutive sequence numbers.
#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    /// The sequence of the newest event ever logged (0: none yet).
    newest: u64,
}

impl Ring {
    fn push(&mut self, mut event: Event) {
        self.newest += 1;
        event.sequence = self.newest;
        self.events.push_back(event);
        while self.events.len() > MAX_HELD {
            self.events.pop_front();
        }
    }

    /// Up to `max` events after `after`, and how many after it were dropped.
    fn after(&self, after: u64, max: usize) -> Result<(Vec<Event>, u64), EventsError> {
        if after > self.newest {
            return Err(EventsError::Ahead {
                after,
                newest: self.newest,
            });
        }
        let oldest = self.events.front().map_or(self.newest + 1, |e| e.sequence);
        let dropped = oldest.saturating_sub(after + 1);
        let skip = usize::try_from(after.saturating_sub(oldest - 1)).unwrap_or(usize::MAX);
        let events = self.events.iter().skip(skip).take(max).cloned().collect();
        Ok((events, dropped))
    }
}

/// The cgroup of one container and the OOM counts already accounted for.
struct Watched {
    dir: PathBuf,
    /// oom_kill count last logged as an event.
    reported: u64,
    /// oom_kill count at the previous exit of one of its processes.
    at_last_exit: u64,
}

/// Which container process a pid is.
struct Origin {
    container_id: String,
    exec_id: String,
}

#[derive(Default)]
struct Followed {
    containers: HashMap<String, Watched>,
    pids: HashMap<i32, Origin>,
}

/// The pod's events, shared by the manager, the exit table and GetEvents.
pub struct EventLog {
    followed: Mutex<Followed>,
    ring: Mutex<Ring>,
    /// The newest sequence; long polls wait on it.
    newest: watch::Sender<u64>,
    /// Wakes the OOM check when a followed memory.events changes.
    oom_watch: Option<Arc<OomWatch>>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            followed: Mutex::default(),
            ring: Mutex::default(),
            newest: watch::channel(0).0,
            oom_watch: None,
        }
    }
}

impl EventLog {
    /// A log that checks its containers for OOM kills on a task of the current runtime
    /// (the task ends with the log).
    pub fn spawn() -> Arc<EventLog> {
        let oom_watch = match OomWatch::new() {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify for memory.events; polling for OOM kills");
                None
            }
        };
        let log = Arc::new(EventLog {
            oom_watch: oom_watch.clone(),
            ..EventLog::default()
        });
        let weak = Arc::downgrade(&log);
        tokio::spawn(async move {
            loop {
                match &oom_watch {
                    Some(w) => {
                        tokio::select! {
                            woke = w.changed() => if let Err(e) = woke {
                                tracing::warn!(error = %e, "reading memory.events notifications");
                                tokio::time::sleep(OOM_POLL).await;
                            },
                            () = tokio::time::sleep(OOM_BACKSTOP) => {}
                        }
                    }
                    None => tokio::time::sleep(OOM_POLL).await,
                }
                let Some(log) = weak.upgrade() else { return };
                log.poll_ooms();
            }
        });
        log
    }

    fn followed(&self) -> std::sync::MutexGuard<'_, Followed> {
        // Plain map updates: consistent even after a panic elsewhere.
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, event: Event) {
        let newest = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.push(event);
            ring.newest
        };
        self.newest.send_replace(newest);
    }

    /// Follows the OOM kills of container `id`, whose cgroup is `dir`.
    pub fn add_container(&self, id: &str, dir: PathBuf) {
        if let Some(w) = &self.oom_watch {
            // Before the count is read, so a kill between the two still wakes the check.
            match w.follow(&dir) {
                Ok(()) => {}
                // No memory controller in the cgroup: no OOM kills to report either.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!(container = id, "no memory.events to watch");
                }
                Err(e) => tracing::warn!(
                    container = id,
                    error = %e,
                    "cannot watch memory.events; OOM kills of processes the agent did not \
                     start are seen within {OOM_BACKSTOP:?}"
                ),
            }
        }
        let count = cgroups::oom_kill_count(&dir).unwrap_or(0);
        self.followed().containers.insert(
            id.to_owned(),
            Watched {
                dir,
                reported: count,
                at_last_exit: count,
            },
        );
    }

    /// Stops following container `id`'s cgroup (its processes' exits are still logged).
    pub fn remove_container(&self, id: &str) {
        self.followed().containers.remove(id);
    }

    /// Logs the exit of `pid` as that of (`container_id`, `exec_id`). Call
    /// [`super::exits::ExitTable::replay`] afterwards, for a process that already ended.
    pub fn follow_pid(&self, pid: i32, container_id: &str, exec_id: &str) {
        self.followed().pids.insert(
            pid,
            Origin {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
            },
        );
    }

    /// Logs an OOM event for every followed cgroup whose oom_kill count grew.
    pub fn poll_ooms(&self) {
        let mut followed = self.followed();
        for (id, watched) in &mut followed.containers {
            self.check_oom(id, watched);
        }
    }

    /// Logs an OOM event if the count grew; returns the current count.
    fn check_oom(&self, id: &str, watched: &mut Watched) -> u64 {
        let count = cgroups::oom_kill_count(&watched.dir).unwrap_or(watched.reported);
        if count > watched.reported {
            watched.reported = count;
            tracing::warn!(
                container = id,
                oom_kills = count,
                "OOM kill in the container's cgroup"
            );
            let mut event = Event::new();
            event.container_id = id.to_owned();
            event.kind = Some(event::Kind::OomKillCount(count));
            self.push(event);
        }
        count
    }

    /// Up to `max` (0: [`MAX_PER_CALL`]) events after `after`, and how many after it
    /// are gone; waits until `deadline` for one to arrive, then answers empty.
    pub async fn next(
        &self,
        after: u64,
        max: u32,
        deadline: Instant,
    ) -> Result<(Vec<Event>, u64), EventsError> {
        let max = match max {
            0 => MAX_PER_CALL,
            m if m > MAX_PER_CALL => return Err(EventsError::TooMany(m)),
            m => m,
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let mut newest = self.newest.subscribe();
        loop {
            let found = self
                .ring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .after(after, max)?;
            if !found.0.is_empty() || found.1 > 0 {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so only the deadline ends the wait.
                Ok(Err(_)) | Err(_) => return Ok((Vec::new(), 0)),
            }
        }
    }
}

impl ExitObserver for EventLog {
    fn exited(&self, pid: i32, record: &ExitRecord) -> Option<bool> {
        let mut followed = self.followed();
        let origin = followed.pids.remove(&pid)?;
        let mut oom_killed = false;
        if let Some(watched) = followed.containers.get_mut(&origin.container_id) {
            let count = self.check_oom(&origin.container_id, watched);
            oom_killed = record.status == ChildStatus::Signaled(libc::SIGKILL)
                && count > watched.at_last_exit;
            watched.at_last_exit = count;
        }
        drop(followed);
        let mut event = Event::new();
        event.container_id = origin.container_id;
        event.exec_id = origin.exec_id;
        event.kind = Some(event::Kind::Exited(process_exit(pid, record, oom_killed)));
        self.push(event);
        Some(oom_killed)
    }
}

/// The wire form of an exit.
pub fn process_exit(pid: i32, record: &ExitRecord, oom_killed: bool) -> ProcessExit {
    let mut exit = ProcessExit::new();
    exit.pid = u32::try_from(pid).unwrap_or(0);
    exit.exit_status = u32::try_from(record.status.exit_code()).unwrap_or(255);
    exit.signal = match record.status {
        ChildStatus::Signaled(sig) => u32::try_from(sig).unwrap_or(0),
        ChildStatus::Exited(_) => 0,
    };
    exit.oom_killed = oom_killed;
    exit.exited_at_unix_nanos = record.at_unix_nanos;
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_event(id: &str) -> Event {
        let mut e = Event::new();
        e.container_id = id.to_owned();
        e.kind = Some(event::Kind::Exited(ProcessExit::new()));
        e
    }

    #[test]
    fn the_ring_numbers_from_one_and_pages_oldest_first() {
        let mut ring = Ring::default();
        for i in 0..5 {
            ring.push(exit_event(&format!("c{i}")));
        }
        let (events, dropped) = ring.after(0, 2).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!((seqs, dropped), (vec![1, 2], 0));
        let (events, _) = ring.after(3, 256).unwrap();
        assert_eq!(
            events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(ring.after(5, 256).unwrap().0.is_empty());
        assert!(matches!(
            ring.after(6, 256),
            Err(EventsError::Ahead {
                after: 6,
                newest: 5
            })
        ));
    }

    #[test]
    fn the_ring_keeps_the_newest_and_counts_what_a_late_host_missed() {
        let mut ring = Ring::default();
        for _ in 0..MAX_HELD + 10 {
            ring.push(exit_event("c"));
        }
        let (events, dropped) = ring.after(0, 256).unwrap();
        assert_eq!(dropped, 10);
        assert_eq!(events.len(), 256);
        assert_eq!(events[0].sequence, 11);
        let (events, dropped) = ring.after(10, 1).unwrap();
        assert_eq!((events[0].sequence, dropped), (11, 0));
        let newest = (MAX_HELD + 10) as u64;
        let (events, dropped) = ring.after(newest - 1, 256).unwrap();
        assert_eq!((events.len(), events[0].sequence, dropped), (1, newest, 0));
    }

    #[tokio::test]
    async fn a_long_poll_answers_when_an_event_arrives_or_empty_at_the_deadline() {
        let log = Arc::new(EventLog::default());
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(log.next(0, 0, soon).await.unwrap(), (Vec::new(), 0));
        assert!(matches!(
            log.next(0, 257, soon).await,
            Err(EventsError::TooMany(257))
        ));

        log.follow_pid(42, "ctr", "e1");
        let poll = {
            let log = log.clone();
            tokio::spawn(async move {
                log.next(0, 0, Instant::now() + Duration::from_secs(10))
                    .await
            })
        };
        tokio::task::yield_now().await;
        let record = ExitRecord {
            status: ChildStatus::Exited(3),
            at_unix_nanos: 7,
            oom_killed: false,
        };
        assert_eq!(log.exited(42, &record), Some(false));
        assert_eq!(log.exited(42, &record), None, "each exit is logged once");
        assert_eq!(log.exited(43, &record), None, "unknown pids are not logged");
        let (events, dropped) = poll.await.unwrap().unwrap();
        assert_eq!((events.len(), dropped), (1, 0));
        let e = &events[0];
        assert_eq!(
            (e.sequence, e.container_id.as_str(), e.exec_id.as_str()),
            (1, "ctr", "e1")
        );
        let Some(event::Kind::Exited(exit)) = &e.kind else {
            panic!("not an exit: {e:?}");
        };
        assert_eq!(
            (exit.pid, exit.exit_status, exit.exited_at_unix_nanos),
            (42, 3, 7)
        );
    }

    #[test]
    fn an_oom_kill_in_a_followed_cgroup_marks_the_sigkilled_exit() {
        let dir = std::env::temp_dir().join(format!("crx-events-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.events"), "oom 0\noom_kill 0\n").unwrap();
        let log = EventLog::default();
        log.add_container("c", dir.clone());
        log.follow_pid(1, "c", "");
        log.follow_pid(2, "c", "x");
        std::fs::write(dir.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let killed = ExitRecord {
            status: ChildStatus::Signaled(libc::SIGKILL),
            at_unix_nanos: 1,
            oom_killed: false,
        };
        assert_eq!(log.exited(1, &killed), Some(true));
        // A later SIGKILL without a new OOM kill is not one.
        assert_eq!(log.exited(2, &killed), Some(false));
        log.poll_ooms();
        let ring = log.ring.lock().unwrap();
        let kinds: Vec<_> = ring.events.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(kinds.len(), 3, "one OOM event, two exits: {kinds:?}");
        assert_eq!(kinds[0], Some(event::Kind::OomKillCount(1)));
        assert!(matches!(&kinds[1], Some(event::Kind::Exited(e)) if e.oom_killed && e.signal == 9));
        drop(ring);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
