//! Where each L1 run's console is kept while it streams: one file per run, so a run that
//! stalls or dies still leaves its last lines on disk.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use super::L1Error;

/// Console files of the newest runs kept in the console directory; older ones go.
const CONSOLE_FILES_KEPT: usize = 40;

/// Where console files go by default: `$CARGO_TARGET_DIR/tmp/crx-l1` (cargo's
/// `CARGO_TARGET_TMPDIR` for integration tests), else `target/tmp/crx-l1` of this workspace.
pub fn console_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::artifacts::workspace_root().join("target"))
        .join("tmp/crx-l1")
}

/// A fresh console file name for `label` in [`console_dir`], which is created; the
/// oldest files beyond the newest [`CONSOLE_FILES_KEPT`] are removed.
pub(super) fn new_console_file(label: &str) -> PathBuf {
    let dir = console_dir();
    let _ = std::fs::create_dir_all(&dir);
    prune_console_files(&dir);
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Lanes of one test binary may start in the same second.
    static SEQUENCE: AtomicUsize = AtomicUsize::new(0);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        "{label}-{secs}-{}-{seq}.console.log",
        std::process::id()
    ))
}

fn prune_console_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".console.log"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, old) in files.into_iter().skip(CONSOLE_FILES_KEPT) {
        let _ = std::fs::remove_file(old);
    }
}

pub(super) fn create_console_file(path: &Path) -> Result<File, L1Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| L1Error::Spawn {
            what: format!("the console file's directory {}", parent.display()),
            source,
        })?;
    }
    File::create(path).map_err(|source| L1Error::Spawn {
        what: format!("the console file {}", path.display()),
        source,
    })
}
