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
mod payload;

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use console::{Console, L1Ready};
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
const ERROR_TAIL_LINES: usize = 25;

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
                "the L1 payload reported no {check:?} result; console:\n{}",
                self.console_tail(TAIL)
            )
        });
        assert_eq!(
            result["ok"],
            serde_json::Value::Bool(true),
            "{check} failed: {result}\nconsole:\n{}",
            self.console_tail(TAIL)
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
                console_tail: self.console_tail(ERROR_TAIL_LINES),
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
        if let Some(append) = &opts.append {
            cmd.arg("--append").arg(append);
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
        let console_reader = thread::spawn(move || {
            let mut console = Console::default();
            if let Some(out) = stdout {
                read_lines(out, |line| {
                    if echo {
                        eprintln!("l1| {line}");
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
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => thread::sleep(Duration::from_millis(100)),
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

        let Some(status) = status else {
            return Err(L1Error::TimedOut {
                secs: opts.timeout.as_secs(),
                console_tail: console.tail(ERROR_TAIL_LINES),
            });
        };
        interpret(console, status, &stderr, opts, wall)
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
pub fn run_lane(lane: &str, payload: &Path, append: Option<&str>) -> Result<L1Run, String> {
    let rig = L1Rig::prepare().map_err(|e| format!("preparing the L1 rig: {e}"))?;
    let opts = RunOptions {
        timeout: Duration::from_secs(900),
        append: append.map(str::to_owned),
        ..RunOptions::default()
    };
    let run = rig.run(payload, &opts).map_err(|e| format!("{e}"))?;
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
        });
    }
    let console_tail = console.tail(ERROR_TAIL_LINES);
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
}
