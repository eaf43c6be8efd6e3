//! The thread that starts device threads when filters are on.
//!
//! A new thread inherits its creator's seccomp filter, and a device is activated on
//! a vCPU thread, whose filter allows neither `clone` nor a device's calls. So
//! device threads are started here instead: this thread's filter allows thread
//! creation and everything any device thread does, and each device thread narrows
//! it to its own role first thing. Without [`start`] (filters off) threads are
//! started directly by the caller.

use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

use super::ThreadRole;

type Job = Box<dyn FnOnce() + Send>;

static LAUNCHER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the launcher thread under `program` (the launcher role's filter).
pub fn start(program: BpfProgram) -> std::io::Result<()> {
    let (tx, rx) = channel::<Job>();
    let (ready_tx, ready_rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("crx-launcher".into())
        .spawn(move || {
            let installed = super::install_program(ThreadRole::Launcher, &program);
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if !ok {
                return;
            }
            // Ends when every sender is gone, i.e. never while the process runs.
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(std::io::Error::other(e)),
        Err(_) => return Err(std::io::Error::other("the launcher thread died at start")),
    }
    LAUNCHER
        .set(Mutex::new(tx))
        .map_err(|_| std::io::Error::other("the launcher was already started"))
}

/// Starts thread `name` running `run`: through the launcher if it runs, else here.
pub fn spawn<T: Send + 'static>(
    name: &str,
    run: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let builder = std::thread::Builder::new().name(name.into());
    let Some(launcher) = LAUNCHER.get() else {
        return builder.spawn(run);
    };
    let (reply_tx, reply_rx) = sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(builder.spawn(run));
    });
    let sent = match launcher.lock() {
        Ok(sender) => sender.send(job).is_ok(),
        Err(_) => false,
    };
    if !sent {
        return Err(std::io::Error::other("the device-thread launcher is gone"));
    }
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the device-thread launcher did not answer"))?
}
