//! Wake-ups for the OOM check. cgroup v2 reports every change of a cgroup's
//! `memory.events` (an `oom_kill` count growing among them) as an inotify IN_MODIFY on
//! that file, so the agent learns of an OOM kill when it happens instead of reading
//! every container's file on a timer: an idle guest under TCG pays for each timer wake.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The inotify instance, as tokio's reactor needs it (a raw descriptor).
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One inotify instance watching the `memory.events` of every followed cgroup. A watch
/// goes away by itself when its cgroup is removed.
pub struct OomWatch {
    fd: AsyncFd<InotifyFd>,
}

impl OomWatch {
    /// Must be called inside a tokio runtime.
    pub fn new() -> io::Result<OomWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `InotifyFd` owns the descriptor it returns and always returns that one;
        // it is closed only when the `AsyncFd` (its sole owner) is dropped.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(io::Error::from)?;
        Ok(OomWatch { fd })
    }

    /// Watches the `memory.events` of the cgroup at `dir`.
    pub fn follow(&self, dir: &Path) -> io::Result<()> {
        self.fd
            .get_ref()
            .0
            .add_watch(&dir.join("memory.events"), AddWatchFlags::IN_MODIFY)?;
        Ok(())
    }

    /// Resolves once some watched file changed (or a watch ended), with every pending
    /// notification consumed.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_to_a_followed_file_wakes_the_watch() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("memory.events"), "oom_kill 0\n").unwrap();
        let watch = OomWatch::new().unwrap();
        watch.follow(&dir).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        assert!(quiet.is_err(), "woke with nothing changed");
        std::fs::write(dir.join("memory.events"), "oom_kill 1\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("no wake-up after the file changed")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn following_a_cgroup_without_memory_events_fails() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dir = tempfile_dir();
        let watch = OomWatch::new().unwrap();
        assert!(watch.follow(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("crx-oom-watch-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
