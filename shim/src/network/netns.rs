//! Running work inside another network namespace: on a thread of its own that joins
//! the namespace (namespaces are per thread), so the shim's other threads stay where
//! they are. Processes that thread starts inherit the namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::NetworkError;

/// Runs `work` on a new thread inside the network namespace at `path`.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetworkError> + Send + 'static,
{
    let ns = File::open(path).map_err(|source| NetworkError::Enter {
        path: path.to_owned(),
        source,
    })?;
    let owned_path = path.to_owned();
    let joined = std::thread::Builder::new()
        .name("crx-netns".into())
        .spawn(move || {
            // SAFETY: `ns` is an open namespace file for the call's duration; setns
            // changes only this thread, which ends when `work` returns.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetworkError::Enter {
                    path: owned_path,
                    source: std::io::Error::last_os_error(),
                });
            }
            work()
        })
        .map_err(|source| NetworkError::Enter {
            path: path.to_owned(),
            source,
        })?;
    joined.join().map_err(|_| NetworkError::Thread)?
}
