//! Where the shim's `tracing` output goes: for the long-running task server, the
//! bundle's `log` FIFO that containerd reads and folds into its own log; for the
//! `delete` action, stderr (containerd logs it); `start` stays silent.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sends logs to the `log` FIFO in the current directory (the bundle), at `level` (a
/// tracing filter). Falls back to stderr when there is no FIFO (run by hand).
pub fn init_server(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Non-blocking open: with no reader (containerd not listening) a blocking open
    // of a FIFO would hang the shim before it serves anything. Writes then block
    // normally again.
    let fifo = open_log_fifo(std::path::Path::new("log"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let result = match fifo {
        Ok(f) => builder.with_writer(Mutex::new(f)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    // A second init (tests) keeps the first subscriber: nothing to report.
    drop(result);
}

/// Opens containerd's log FIFO for writing, or fails at once when nobody reads it.
fn open_log_fifo(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    clear_nonblocking(&f)?;
    Ok(f)
}

fn clear_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Logs of the `delete` action: stderr, which containerd logs as warnings. (`start`
/// logs nothing: containerd 1.6 takes its combined output as the address.)
pub fn init_action(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    drop(
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_log_fifo_without_a_reader_fails_at_once_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_log_fifo(&fifo).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "{err}");
        // With containerd's reader there, lines arrive.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut w = open_log_fifo(&fifo).unwrap();
        w.write_all(b"line\n").unwrap();
        let mut buf = [0u8; 5];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"line\n");
    }
}
