//! Where the shim's `tracing` output goes: for the long-running task server, the
//! bundle's `log` FIFO that containerd reads and folds into its own log; for the
//! `delete` action, stderr (containerd logs it); `start` stays silent.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sends logs to the `log` FIFO in the current directory (the bundle), at `level` (a
/// tracing filter). Falls back to stderr when there is no FIFO (run by hand).
pub fn init_server(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fifo = OpenOptions::new().write(true).open("log");
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
