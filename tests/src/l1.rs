//! The nested-KVM rig ("L1"): runs a payload inside a Linux that has a working `/dev/kvm`.
//!
//! This host's `/dev/kvm` is PVM, which cannot run a stock guest's user space. QEMU TCG
//! emulates AMD SVM with nested paging, so Debian's own kernel started under TCG (the L1)
//! loads `kvm-amd` and offers a real KVM, on which crx-vmm or QEMU run our guest (L2). The
//! shell side lives in `tests/l1/` (see its README); this module drives it for integration
//! tests and `crx-bench`: [`L1Rig::prepare`] caches the L1 kernel, [`L1Rig::run`] boots L1
//! with a payload directory and hands back its exit code, its `CRX-L1-RESULT` JSON lines
//! and its console. [`PayloadBuilder`] assembles payload directories.
//!
//! Every figure measured inside L1 is TCG time: comparable with other figures from the
//! same rig, never with hardware KVM.

mod console;
mod console_file;
mod payload;

use std::io::{self, BufRead, BufReader, LineWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use console::{Console, L1Ready, Stall};
pub use console_file::console_dir;
use console_file::{create_console_file, new_console_file};
pub use payload::{
    kvm_smoke_payload, payload_script, Payload, PayloadBuilder, PayloadError, VmmLane,
    GUEST_INITRAMFS, GUEST_KERNEL, PROBE_BIN, VMM_BIN,
};

/// run.sh's exit codes when the payload did not report one (tests/l1/run.sh documents them).
const RC_USAGE: i32 = 2;
const RC_NO_KVM: i32 = 120;
const RC_TIMEOUT: i32 = 124;
const RC_HOST: i32 = 125;

/// How long past the payload timeout we wait for run.sh itself: it builds the initramfs
/// before the timeout starts and gives QEMU 5 s to die after it.
const RUNNER_SLACK: Duration = Duration::from_secs(90);

/// Console lines kept in an error message.
const ERROR_TAIL_LINES: usize = 60;
/// Lines of L1's watchdog report (tasks, stacks, SysRq) kept in a `Stalled` message.
const STALL_REPORT_LINES: usize = 400;

/// L1's watchdog prints `CRX-L1-ALIVE` every 30 s of L1 time, so a console silent this
/// long means L1's kernel no longer runs user space. The quietest legitimate stretch is
/// run.sh building the initramfs plus L1's boot to `/init` (under 30 s loaded).
pub const DEFAULT_SILENCE_LIMIT: Duration = Duration::from_secs(150);

/// What a lane allows one payload step (`CRX-L1-STEP`) before L1's watchdog reports the
/// stall and powers off. The slowest normal step is the shim lane's `ctr run` (up to
/// ~70 s of L1 time on a loaded host); tests/l1/README.md has the measured gaps.
pub const LANE_STALL_LIMIT: Duration = Duration::from_secs(240);

/// How long a silent L1 gets to answer run.sh's SysRq request (SIGUSR1: serial break +
/// `l`, `w`, QEMU's `info cpus`; ~9 s of sending) before QEMU is killed.
const SYSRQ_GRACE: Duration = Duration::from_secs(15);

/// What went wrong with the rig, one variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for {what}")]
    Wait {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("tests/l1/prepare.sh failed ({status}); its last output:\n{stderr_tail}")]
    Prepare {
        status: ExitStatus,
        stderr_tail: String,
    },
    #[error("tests/l1/prepare.sh printed no cache directory")]
    PrepareOutput,
    #[error("no cached L1 kernel in {dir}: run tests/l1/prepare.sh (L1Rig::prepare)")]
    NoKernel { dir: PathBuf },
    #[error("the host cannot run the L1 rig: {detail}")]
    HostNotReady { detail: String },
    #[error("L1 booted but could not offer /dev/kvm: {reason}\nL1 console (last lines):\n{console_tail}")]
    KvmUnavailable {
        reason: String,
        console_tail: String,
    },
    #[error(
        "L1 timed out after {secs} s and was killed\nL1 console (last lines):\n{console_tail}"
    )]
    TimedOut { secs: u64, console_tail: String },
    #[error("L1's watchdog found the payload stuck in step {step:?} for {idle_s} s and powered L1 off\nL1 console (the lines before the watchdog's report, then the report):\n{console_tail}")]
    Stalled {
        step: String,
        idle_s: u64,
        console_tail: String,
    },
    #[error("L1 silent for {secs} s: L1 kernel hung (no watchdog output); QEMU killed\nL1 console (last lines):\n{console_tail}")]
    Silent { secs: u64, console_tail: String },
    #[error("L1 ended without reporting the payload's exit ({detail})\nL1 console (last lines):\n{console_tail}")]
    NoExit {
        detail: String,
        console_tail: String,
    },
    #[error("the payload exited {rc} in L1\nL1 console (last lines):\n{console_tail}")]
    PayloadFailed { rc: i32, console_tail: String },
}

/// How to boot L1 for one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Wall time for the whole L1 run (boot + payload); QEMU is killed after it.
    pub timeout: Duration,
    pub smp: u32,
    pub mem_mib: u32,
    /// Keep the console here as well (it is always returned in [`L1Run::console`]).
    pub log: Option<PathBuf>,
    /// Extra L1 kernel command line.
    pub append: Option<String>,
    /// Use this QEMU binary instead of `qemu-system-x86_64` from PATH.
    pub qemu: Option<PathBuf>,
    /// Copy every console line to stderr as it arrives (default: `CRX_L1_ECHO=1`).
    pub echo: bool,
    /// Where the console streams as it arrives, each line stamped with host seconds
    /// since the start; default a fresh file in `<target>/tmp/crx-l1/` (see
    /// [`console_dir`]). Its path is printed at the start and named in every error.
    pub console_file: Option<PathBuf>,
    /// Names the default console file (`<label>-<unix time>-<pid>-<n>.console.log`).
    pub label: String,
    /// L1's watchdog powers L1 off with a report when the payload marks no step
    /// (`CRX-L1-STEP`) for this long; `None`: never (payloads without steps).
    pub stall_limit: Option<Duration>,
    /// The rig kills QEMU when the console is silent this long (no watchdog line either).
    pub silence_limit: Option<Duration>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(300),
            smp: 2,
            mem_mib: 2048,
            log: None,
            append: None,
            qemu: None,
            echo: std::env::var_os("CRX_L1_ECHO").is_some_and(|v| v == "1"),
            console_file: None,
            label: "l1".into(),
            stall_limit: None,
            silence_limit: Some(DEFAULT_SILENCE_LIMIT),
        }
    }
}

/// One finished L1 run whose payload reported its exit code.
#[derive(Debug)]
pub struct L1Run {
    /// The payload's exit code (`CRX-L1-EXIT <rc>`).
    pub rc: i32,
    /// Every `CRX-L1-RESULT <json>` line the payload printed, in order.
    pub results: Vec<serde_json::Value>,
    /// `CRX-L1-RESULT` lines that were not JSON (e.g. cut by a kernel message).
    pub malformed_results: Vec<String>,
    /// L1's own timings: uptime at `/init` and when `/dev/kvm` was ready.
    pub ready: Option<L1Ready>,
    /// The L1 console, carriage returns removed (the oldest lines dropped past 16 MiB).
    pub console: String,
    /// Host wall time of the whole run, initramfs build included.
    pub wall: Duration,
    /// The whole console, host-timestamped ([`RunOptions::console_file`]).
    pub console_file: PathBuf,
}

impl L1Run {
    /// The first result whose `"check"` field is `check`.
    pub fn result(&self, check: &str) -> Option<&serde_json::Value> {
        self.results
            .iter()
            .find(|r| r.get("check").and_then(|c| c.as_str()) == Some(check))
    }

    /// The result of `check`, which must exist and say `"ok": true`; otherwise a panic
    /// that shows the result and the end of the console (for lane tests).
    pub fn ok_result(&self, check: &str) -> &serde_json::Value {
        const TAIL: usize = 80;
        let result = self.result(check).unwrap_or_else(|| {
            panic!(
                "the L1 payload reported no {check:?} result; console:\n{}\n(whole console: {})",
                self.console_tail(TAIL),
                self.console_file.display()
            )
        });
        assert_eq!(
            result["ok"],
            serde_json::Value::Bool(true),
            "{check} failed: {result}\nconsole:\n{}\n(whole console: {})",
            self.console_tail(TAIL),
            self.console_file.display()
        );
        result
    }

    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }

    /// `Err(PayloadFailed)` unless the payload exited 0.
    pub fn ensure_success(&self) -> Result<(), L1Error> {
        if self.rc == 0 {
            Ok(())
        } else {
            Err(L1Error::PayloadFailed {
                rc: self.rc,
                console_tail: with_file(self.console_tail(ERROR_TAIL_LINES), &self.console_file),
            })
        }
    }
}

/// The prepared rig: scripts in `tests/l1/`, the L1 kernel and modules in the cache.
#[derive(Debug, Clone)]
pub struct L1Rig {
    scripts: PathBuf,
    kernel_dir: PathBuf,
}

impl L1Rig {
    /// Runs `tests/l1/prepare.sh` (idempotent: downloads and unpacks Debian's kernel
    /// package only when its version is not cached yet; installs qemu, busybox-static,
    /// cpio when missing) and returns the rig it prepared.
    pub fn prepare() -> Result<L1Rig, L1Error> {
        let scripts = scripts_dir();
        let out = Command::new("bash")
            .arg(scripts.join("prepare.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|source| L1Error::Spawn {
                what: "tests/l1/prepare.sh".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(L1Error::Prepare {
                status: out.status,
                stderr_tail: tail(&String::from_utf8_lossy(&out.stderr), 15),
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or(L1Error::PrepareOutput)?;
        Self::with_kernel_dir(scripts, PathBuf::from(dir.trim()))
    }

    /// The rig as prepare.sh last left it, without running it (no apt look-ups).
    pub fn cached() -> Result<L1Rig, L1Error> {
        let cache = std::env::var_os("CRX_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/cache/crx".into());
        Self::with_kernel_dir(scripts_dir(), cache.join("l1/current"))
    }

    fn with_kernel_dir(scripts: PathBuf, kernel_dir: PathBuf) -> Result<L1Rig, L1Error> {
        if !kernel_dir.join("vmlinuz").is_file() || !kernel_dir.join("load-order").is_file() {
            return Err(L1Error::NoKernel { dir: kernel_dir });
        }
        Ok(L1Rig {
            scripts,
            kernel_dir,
        })
    }

    /// The cache directory holding L1's kernel (`vmlinux`, `vmlinuz`, `config`) and modules.
    pub fn kernel_dir(&self) -> &Path {
        &self.kernel_dir
    }

    /// A Linux kernel that boots as an L2 guest: L1's own Debian kernel (PVH ELF if
    /// prepare.sh could extract it, else the bzImage).
    pub fn debian_kernel(&self) -> PathBuf {
        let pvh = self.kernel_dir.join("vmlinux");
        if pvh.is_file() {
            pvh
        } else {
            self.kernel_dir.join("vmlinuz")
        }
    }

    /// Boots L1 with `payload` (a directory with an executable `run.sh`) and waits for it.
    /// `Ok` whenever the payload reported an exit code, whatever it was (see
    /// [`L1Run::ensure_success`], [`L1Rig::run_ok`]); `Err` names the step that failed.
    pub fn run(&self, payload: &Path, opts: &RunOptions) -> Result<L1Run, L1Error> {
        let started = Instant::now();
        let console_path = match &opts.console_file {
            Some(path) => path.clone(),
            None => new_console_file(&opts.label),
        };
        let console_file = create_console_file(&console_path)?;
        eprintln!(
            "crx-l1: the L1 console streams to {}",
            console_path.display()
        );
        let mut append = opts.append.clone().unwrap_or_default();
        if let Some(limit) = opts.stall_limit {
            append.push_str(&format!(" crx.l1stall={}", limit.as_secs().max(1)));
        }
        let mut cmd = Command::new("bash");
        cmd.arg(self.scripts.join("run.sh"))
            .arg("--payload")
            .arg(payload)
            .arg("--timeout")
            .arg(opts.timeout.as_secs().max(1).to_string())
            .arg("--smp")
            .arg(opts.smp.to_string())
            .arg("--mem")
            .arg(opts.mem_mib.to_string())
            .env("CRX_L1_KERNEL_DIR", &self.kernel_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so one signal reaches run.sh, timeout and QEMU alike.
            .process_group(0);
        if let Some(log) = &opts.log {
            cmd.arg("--log").arg(log);
        }
        if !append.trim().is_empty() {
            cmd.arg("--append").arg(append.trim());
        }
        if let Some(qemu) = &opts.qemu {
            cmd.env("CRX_L1_QEMU", qemu);
        }
        let child = cmd.spawn().map_err(|source| L1Error::Spawn {
            what: "tests/l1/run.sh".into(),
            source,
        })?;
        let mut child = GroupGuard(Some(child));

        let stdout = child.take_stdout();
        let stderr = child.take_stderr();
        let echo = opts.echo;
        // Milliseconds after `started` of the latest console line, for the silence check.
        let last_line_ms = Arc::new(AtomicU64::new(0));
        let last_line = Arc::clone(&last_line_ms);
        let console_reader = thread::spawn(move || {
            let mut console = Console::default();
            let mut file = Some(LineWriter::new(console_file));
            if let Some(out) = stdout {
                read_lines(out, |line| {
                    let at = started.elapsed();
                    last_line.store(
                        u64::try_from(at.as_millis()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                    if echo {
                        eprintln!("l1| {line}");
                    }
                    // A full disk must not end the run; the in-memory copy still has it.
                    if let Some(f) = file.as_mut() {
                        if writeln!(f, "{:9.3}| {line}", at.as_secs_f64()).is_err() {
                            file = None;
                        }
                    }
                    console.push(line);
                });
            }
            console
        });
        let stderr_reader = thread::spawn(move || {
            let mut text = String::new();
            if let Some(err) = stderr {
                read_lines(err, |line| {
                    if echo {
                        eprintln!("{line}");
                    }
                    text.push_str(line);
                    text.push('\n');
                });
            }
            text
        });

        let deadline = started + opts.timeout + RUNNER_SLACK;
        let silent = |now: Instant| {
            let limit = opts.silence_limit?;
            let last = started + Duration::from_millis(last_line_ms.load(Ordering::Relaxed));
            (now.saturating_duration_since(last) >= limit).then_some(limit)
        };
        // (limit, when run.sh was asked for the kernel's SysRq dumps)
        let mut silent_for: Option<(Duration, Instant)> = None;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => {
                    let now = Instant::now();
                    match silent_for {
                        None => {
                            if let Some(limit) = silent(now) {
                                child.signal_leader(libc::SIGUSR1);
                                silent_for = Some((limit, now));
                            }
                        }
                        Some((_, asked)) if now >= asked + SYSRQ_GRACE => break None,
                        Some(_) => {}
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(L1Error::Wait {
                        what: "tests/l1/run.sh".into(),
                        source,
                    })
                }
            }
        };
        if status.is_none() {
            child.kill_group();
        }
        // Both readers end at EOF, which comes once run.sh and QEMU are gone.
        let console = console_reader.join().unwrap_or_default();
        let stderr = stderr_reader.join().unwrap_or_default();
        let wall = started.elapsed();

        let console_tail = with_file(console.tail(ERROR_TAIL_LINES), &console_path);
        if let Some((limit, _)) = silent_for {
            return Err(L1Error::Silent {
                secs: limit.as_secs(),
                console_tail,
            });
        }
        let Some(status) = status else {
            return Err(L1Error::TimedOut {
                secs: opts.timeout.as_secs(),
                console_tail,
            });
        };
        interpret(console, status, &stderr, opts, wall, console_path)
    }

    /// [`L1Rig::run`], and `Err(PayloadFailed)` when the payload exited non-zero.
    pub fn run_ok(&self, payload: &Path, opts: &RunOptions) -> Result<L1Run, L1Error> {
        let run = self.run(payload, opts)?;
        run.ensure_success()?;
        Ok(run)
    }
}

/// What every lane test does once for all of its tests: prepares the rig, runs the
/// assembled `payload` in L1 (900 s at most, `append` added to L1's command line) and
/// prints the lane's results; errors are strings for a `OnceLock` to keep.
///
/// An L1 whose kernel hangs ([`L1Error::Silent`]: not even its watchdog runs) gets one
/// more run. That hang is the emulation's (QEMU's TCG running L1's KVM; kvm-hold.c
/// removes the one cause found), not the payload's: a payload that hangs leaves L1's
/// watchdog running and ends as [`L1Error::Stalled`], which is not retried. The first
/// run's error is printed whole, so the hang is still seen and counted.
pub fn run_lane(lane: &str, payload: &Path, append: Option<&str>) -> Result<L1Run, String> {
    let rig = L1Rig::prepare().map_err(|e| format!("preparing the L1 rig: {e}"))?;
    let opts = RunOptions {
        timeout: Duration::from_secs(900),
        append: append.map(str::to_owned),
        label: format!("{lane}-lane"),
        stall_limit: Some(LANE_STALL_LIMIT),
        ..RunOptions::default()
    };
    let run = match rig.run(payload, &opts) {
        Err(e @ L1Error::Silent { .. }) => {
            eprintln!("{lane} lane: L1 HUNG, running the lane once more. The hang:\n{e}");
            rig.run(payload, &opts)
        }
        other => other,
    }
    .map_err(|e| format!("{e}"))?;
    eprintln!(
        "{lane} lane: rc {} in {:.1} s; results {}",
        run.rc,
        run.wall.as_secs_f64(),
        serde_json::Value::from(run.results.clone())
    );
    Ok(run)
}

/// Turns what run.sh printed and its exit status into the caller's answer.
fn interpret(
    console: Console,
    status: ExitStatus,
    stderr: &str,
    opts: &RunOptions,
    wall: Duration,
    console_file: PathBuf,
) -> Result<L1Run, L1Error> {
    let runner_said = || {
        stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("crx-l1:"))
            .map(|l| l.trim_start_matches("crx-l1:").trim().to_string())
            .unwrap_or_else(|| format!("run.sh {status}"))
    };
    if let Some(rc) = console.exit {
        let text = console.text();
        return Ok(L1Run {
            rc,
            results: console.results,
            malformed_results: console.malformed_results,
            ready: console.ready,
            console: text,
            wall,
            console_file,
        });
    }
    if let Some(stall) = &console.stall {
        let report = console
            .stall_report(ERROR_TAIL_LINES, STALL_REPORT_LINES)
            .unwrap_or_else(|| console.tail(ERROR_TAIL_LINES));
        return Err(L1Error::Stalled {
            step: stall.step.clone(),
            idle_s: stall.idle_s,
            console_tail: with_file(report, &console_file),
        });
    }
    let console_tail = with_file(console.tail(ERROR_TAIL_LINES), &console_file);
    match status.code() {
        Some(RC_NO_KVM) => Err(L1Error::KvmUnavailable {
            reason: console.failure.clone().unwrap_or_else(runner_said),
            console_tail,
        }),
        Some(RC_TIMEOUT) => Err(L1Error::TimedOut {
            secs: opts.timeout.as_secs(),
            console_tail,
        }),
        Some(RC_HOST) | Some(RC_USAGE) => Err(L1Error::HostNotReady {
            detail: runner_said(),
        }),
        _ => Err(L1Error::NoExit {
            detail: runner_said(),
            console_tail,
        }),
    }
}

/// A console tail for an error message, naming the file that holds all of it.
fn with_file(tail: String, console_file: &Path) -> String {
    format!(
        "{tail}\n(whole console, host-timestamped: {})",
        console_file.display()
    )
}

/// `tests/l1/` of this workspace.
pub(crate) fn scripts_dir() -> PathBuf {
    crate::artifacts::workspace_root().join("tests/l1")
}

/// Calls `f` with each line of `r` (lossy UTF-8, `\r` dropped, each line cut at 64 KiB so
/// a console that never prints a newline cannot grow one without bound).
fn read_lines(r: impl Read, mut f: impl FnMut(&str)) {
    const MAX_LINE: u64 = 64 * 1024;
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                f(line.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Owns run.sh's process; if we return early (or panic), its whole group is killed so no
/// QEMU outlives the test.
struct GroupGuard(Option<Child>);

impl GroupGuard {
    fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.0.as_mut().and_then(|c| c.stdout.take())
    }

    fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.0.as_mut().and_then(|c| c.stderr.take())
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.0.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            // Reaped: its pid (and group id) may be reused, so never signal it again.
            self.0 = None;
        }
        Ok(status)
    }

    /// `signal` to run.sh alone (not its group), while it is unreaped.
    fn signal_leader(&self, signal: i32) {
        let Some(pid) = self.0.as_ref().and_then(|c| i32::try_from(c.id()).ok()) else {
            return;
        };
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still its.
        unsafe { libc::kill(pid, signal) };
    }

    /// SIGTERM to the group (run.sh's trap kills QEMU and removes its files), then SIGKILL.
    fn kill_group(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let Ok(pgid) = i32::try_from(child.id()) else {
            return;
        };
        // SAFETY: kill(2) with a negative pid signals the process group we created with
        // process_group(0) for this child, which we have not reaped yet.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                // run.sh is gone; kill whatever of its group might still linger.
                // SAFETY: as above; the group id stays valid while any member lives.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; the child is still unreaped, so the group id is still ours.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill_group();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_lines_drops_carriage_returns_and_cuts_endless_lines() {
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 70 * 1024));
        let mut lines = Vec::new();
        read_lines(&input[..], |l| lines.push(l.to_string()));
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), 64 * 1024);
        assert_eq!(lines[3].len(), 6 * 1024);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    /// A payload directory whose run.sh is `body` after the payloads' `step` helper.
    fn script_payload(body: &str) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("run.sh");
        let text = format!(
            "#!/bin/sh\n\
             step() {{ read -r at _ </proc/uptime; echo \"CRX-L1-STEP $1 $at\"; echo \"$1 $at\" >\"$CRX_L1_STEP_FILE\"; }}\n\
             {body}\n"
        );
        std::fs::write(&script, text).expect("run.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    fn rig() -> L1Rig {
        L1Rig::cached()
            .or_else(|_| L1Rig::prepare())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    #[ignore = "boots L1 under TCG (~1 min): cargo test -p crx-tests --lib -- --ignored l1::"]
    fn a_stalled_payload_ends_with_the_watchdogs_report() {
        let payload = script_payload(
            "echo /tmp/payload.log >>\"$CRX_L1_LOGS\"; echo 'last payload words' >/tmp/payload.log\n\
             step start\nstep stuck-here\nsleep 1000",
        );
        let opts = RunOptions {
            timeout: Duration::from_secs(300),
            stall_limit: Some(Duration::from_secs(20)),
            append: Some("crx.l1alive=5".into()),
            label: "watchdog-check".into(),
            ..RunOptions::default()
        };
        let started = Instant::now();
        match rig().run(payload.path(), &opts) {
            Err(L1Error::Stalled {
                step,
                idle_s,
                console_tail,
            }) => {
                assert_eq!(step, "stuck-here", "{console_tail}");
                assert!(idle_s >= 20, "reported after {idle_s} s: {console_tail}");
                for wanted in [
                    "CRX-L1-TASK",
                    "cmd=sleep 1000",
                    "last payload words",
                    "sysrq: Show Blocked State",
                    "CRX-L1-STALL-END",
                    "whole console, host-timestamped: ",
                ] {
                    assert!(
                        console_tail.contains(wanted),
                        "no {wanted:?} in:\n{console_tail}"
                    );
                }
            }
            other => panic!("expected Stalled, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(200));
    }

    #[test]
    #[ignore = "boots L1 under TCG (~1 min): cargo test -p crx-tests --lib -- --ignored l1::"]
    fn a_silent_l1_is_killed_and_named_a_kernel_hang() {
        // Ends L1's watchdog (a forked /init, so its comm is "init"), as a hung kernel
        // would: nothing reaches the console any more.
        let payload = script_payload(
            "for d in /proc/[0-9]*; do\n\
               [ \"${d#/proc/}\" != 1 ] && [ \"$(cat $d/comm 2>/dev/null)\" = init ] && kill -9 \"${d#/proc/}\"\n\
             done\n\
             sleep 1000",
        );
        let opts = RunOptions {
            timeout: Duration::from_secs(300),
            silence_limit: Some(Duration::from_secs(20)),
            append: Some("crx.l1alive=5".into()),
            label: "silence-check".into(),
            ..RunOptions::default()
        };
        let started = Instant::now();
        match rig().run(payload.path(), &opts) {
            Err(e @ L1Error::Silent { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("L1 silent for 20 s: L1 kernel hung (no watchdog output)"),
                    "{msg}"
                );
                assert!(msg.contains("CRX-L1-READY"), "{msg}");
                // This kernel is fine, so it answers run.sh's SysRq request.
                assert!(
                    msg.contains("sysrq: Show backtrace of all active CPUs"),
                    "{msg}"
                );
            }
            other => panic!("expected Silent, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(140));
    }
}
