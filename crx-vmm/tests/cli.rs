//! The `crx-vmm` binary end to end: each bad input gets one clear line, its exit code,
//! and leaves no socket and no process behind; the PVM refusal on this host; tiny PVH
//! guests booted through the real CLI (`--allow-pvm`) for the exit codes and log
//! lines; SIGTERM and SIGKILL of a running VM leave nothing behind.
//! Needs root and /dev/kvm: without them the guest tests fail, they do not skip.

mod common;

// Integration tests are a crate of their own; the module keeps the workspace's
// `tests_outside_test_module` lint meaningful.
#[cfg(test)]
mod tests {
    use super::common;

    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use common::Tail;

    const BIN: &str = env!("CARGO_BIN_EXE_crx-vmm");
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A unique tag in the environment of each crx-vmm we start (and of anything it
    /// forks), so a test can find leftover processes of its own run only.
    fn new_tag() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )
    }

    fn command(tag: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("CRX_VMM_TEST_TAG", tag)
            .stdin(Stdio::null());
        cmd
    }

    /// Pids of live processes whose environment carries `tag`.
    fn processes_with_tag(tag: &str) -> Vec<u32> {
        let needle = format!("CRX_VMM_TEST_TAG={tag}\0");
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let state =
                    std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = state
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'));
                let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                !zombie && env.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
            .collect()
    }

    fn assert_nothing_left(tag: &str, socket: &Path) {
        let start = Instant::now();
        loop {
            let procs = processes_with_tag(tag);
            let socket_left = socket.symlink_metadata().is_ok();
            if procs.is_empty() && !socket_left {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "left behind: processes {procs:?}, socket {} exists: {socket_left}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr_of(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs crx-vmm with `args` plus a vsock socket in `dir`; checks the exit code, that
    /// stderr has a `crx-vmm:` line containing `needle`, and that nothing is left.
    fn expect_failure(dir: &Path, args: &[&str], code: i32, needle: &str) {
        expect_failure_as(dir, args, code, needle, None)
    }

    fn expect_failure_as(dir: &Path, args: &[&str], code: i32, needle: &str, uid: Option<u32>) {
        let socket = dir.join(format!("v-{}.sock", new_tag()));
        let tag = new_tag();
        let mut all: Vec<&str> = args.to_vec();
        let socket_str = socket.to_str().unwrap().to_owned();
        all.extend(["--vsock-uds", &socket_str]);
        let mut cmd = command(&tag, &all);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().expect("run crx-vmm");
        let err = stderr_of(&out);
        assert_eq!(
            out.status.code(),
            Some(code),
            "args {args:?}: stderr: {err}"
        );
        let line = err
            .lines()
            .find(|l| l.starts_with("crx-vmm: "))
            .unwrap_or_else(|| panic!("no error line in {err:?}"));
        assert!(
            line.contains(needle),
            "args {args:?}: expected {needle:?} in {line:?}"
        );
        assert_nothing_left(&tag, &socket);
    }

    /// A directory only root can enter: files inside are unreadable for other users.
    fn private_dir(parent: &Path) -> PathBuf {
        let dir = parent.join("private");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    const NOBODY: u32 = 65534;

    #[test]
    fn bad_input_gets_one_line_a_code_and_leaves_nothing() {
        let dir = common::test_dir("bad-input");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let kernel = common::write_pvh_kernel(&dir, Tail::Spin);
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
        let k = kernel.to_str().unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"not a kernel at all").unwrap();
        let big = dir.join("big.cpio");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        let private = private_dir(&dir);
        let hidden_kernel = private.join("vmlinux");
        std::fs::copy(&kernel, &hidden_kernel).unwrap();
        let hidden_initrd = private.join("initrd");
        std::fs::write(&hidden_initrd, b"070701").unwrap();

        expect_failure(
            &dir,
            &["--kernel", "/nonexistent/vmlinux"],
            2,
            "kernel /nonexistent/vmlinux does not exist",
        );
        expect_failure(
            &dir,
            &["--kernel", junk.to_str().unwrap()],
            2,
            "neither an ELF vmlinux nor a bzImage",
        );
        expect_failure(
            &dir,
            &["--kernel", dir.to_str().unwrap()],
            2,
            "neither an ELF vmlinux nor a bzImage",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--initramfs", "/nonexistent/initrd"],
            2,
            "initramfs /nonexistent/initrd does not exist",
        );
        expect_failure(
            &dir,
            &[
                "--kernel",
                k,
                "--initramfs",
                big.to_str().unwrap(),
                "--memory-mib",
                "64",
            ],
            2,
            "raise --memory-mib",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--memory-mib", "32"],
            2,
            "at least 64 MiB",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--memory-mib", "99999999"],
            2,
            "more than this host's",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--vcpus", "0"],
            2,
            "--vcpus must be at least 1",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--vcpus", "300"],
            2,
            "--vcpus 300 is more than",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--vsock-cid", "2"],
            2,
            "--vsock-cid 2 is reserved",
        );
        expect_failure(
            &dir,
            &[
                "--kernel",
                k,
                "--serial",
                "file:/nonexistent/dir/console.log",
            ],
            2,
            "does not exist",
        );
        expect_failure(
            &dir,
            &["--kernel", k, "--kvm-device", "/nonexistent/kvm"],
            4,
            "/nonexistent/kvm does not exist",
        );
        // Unreadable files and /dev/kvm without permission, as an unprivileged user.
        expect_failure_as(
            &dir,
            &["--kernel", hidden_kernel.to_str().unwrap()],
            2,
            "cannot read kernel",
            Some(NOBODY),
        );
        expect_failure_as(
            &dir,
            &[
                "--kernel",
                k,
                "--initramfs",
                hidden_initrd.to_str().unwrap(),
            ],
            2,
            "cannot read initramfs",
            Some(NOBODY),
        );
        common::require_kvm();
        expect_failure_as(
            &dir,
            &["--kernel", k],
            4,
            "no permission to open /dev/kvm",
            Some(NOBODY),
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn elf_without_pvh_note_is_refused_with_its_fix() {
        common::require_kvm();
        let dir = common::test_dir("no-pvh-cli");
        let mut elf = common::pvh_elf(&common::pvh_code(Tail::Spin));
        elf[64 + 56..64 + 60].copy_from_slice(&0u32.to_le_bytes()); // PT_NOTE -> PT_NULL
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, elf).unwrap();
        expect_failure(
            &dir,
            &["--kernel", kernel.to_str().unwrap(), "--allow-pvm"],
            2,
            "CONFIG_PVH=y",
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pvm_host_is_refused_without_booting() {
        common::require_kvm();
        let dir = common::test_dir("pvm");
        let kernel = common::write_pvh_kernel(&dir, Tail::CleanShutdown);
        if !Path::new("/sys/module/kvm_pvm").exists() {
            // Hardware KVM: the same command boots (and the guest shuts down cleanly).
            let out = command(&new_tag(), &["--kernel", kernel.to_str().unwrap()])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
            std::fs::remove_dir_all(dir).unwrap();
            return;
        }
        expect_failure(
            &dir,
            &["--kernel", kernel.to_str().unwrap()],
            3,
            "cannot run a stock Linux guest's user space",
        );
        let out = command(&new_tag(), &["--kernel", kernel.to_str().unwrap()])
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(err.lines().count(), 1, "exactly one line: {err:?}");
        assert!(
            err.contains("QEMU backend") && err.contains("--allow-pvm"),
            "{err}"
        );
        assert!(
            !err.contains("first guest instruction"),
            "did not boot: {err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn probe_host_prints_one_json_line() {
        common::require_kvm();
        let out = command(&new_tag(), &["--probe-host"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1);
        let expected = if Path::new("/sys/module/kvm_pvm").exists() {
            "{\"kvm_usable\":true,\"flavor\":\"pvm\",\"usable_for_linux\":false,"
        } else {
            "{\"kvm_usable\":true,\"flavor\":\"hardware\",\"usable_for_linux\":true,"
        };
        assert!(stdout.starts_with(expected), "{stdout}");
        let out = command(
            &new_tag(),
            &["--probe-host", "--kvm-device", "/nonexistent/kvm"],
        )
        .output()
        .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            stdout.starts_with("{\"kvm_usable\":false,\"flavor\":null,\"usable_for_linux\":false,"),
            "{stdout}"
        );
    }

    fn field(stderr: &str, name: &str) -> Option<u64> {
        let key = format!("{name}=");
        stderr.lines().find_map(|l| {
            let at = l.find(&key)? + key.len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
    }

    #[test]
    fn guest_endings_map_to_exit_codes_and_log_lines() {
        common::require_kvm();
        let dir = common::test_dir("endings");
        for (tail, code, needle) in [
            (Tail::CleanShutdown, 0, "guest shut down cleanly"),
            (Tail::Reset, 10, "without announcing a clean shutdown: kernel panic or unexpected reboot; run with --serial log"),
            (Tail::TripleFault, 11, "triple-faulted"),
        ] {
            let kernel = common::write_pvh_kernel(&dir, tail);
            let socket = dir.join("v.sock");
            let tag = new_tag();
            let out = command(
                &tag,
                &["--kernel", kernel.to_str().unwrap(), "--allow-pvm", "--vcpus", "2", "--vsock-uds", socket.to_str().unwrap()],
            )
            .output()
            .unwrap();
            let err = stderr_of(&out);
            assert_eq!(out.status.code(), Some(code), "{tail:?}: {err}");
            assert!(err.contains(needle), "{tail:?}: {err}");
            let first = field(&err, "first_insn_us").unwrap_or_else(|| panic!("no first_insn_us in {err}"));
            let ready = field(&err, "ready_us").unwrap_or_else(|| panic!("no ready_us in {err}"));
            assert!(err.contains("guest agent ready"), "{err}");
            assert!(first > 0 && ready >= first, "first {first} ready {ready}");
            assert!(field(&err, "exits").is_some_and(|n| n > 0), "exit count in {err}");
            assert_nothing_left(&tag, &socket);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Starts a spinning guest with a vsock socket; returns once the agent marker is
    /// logged and the socket exists.
    fn start_spinning(dir: &Path, tag: &str) -> (Child, PathBuf, mpsc::Receiver<String>) {
        let kernel = common::write_pvh_kernel(dir, Tail::Spin);
        let socket = dir.join("v.sock");
        let mut child = command(
            tag,
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--allow-pvm",
                "--vsock-uds",
                socket.to_str().unwrap(),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let start = Instant::now();
        let mut seen = String::new();
        while !seen.contains("guest agent ready") {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => panic!("guest never became ready; stderr: {seen}"),
            }
        }
        assert!(
            socket.symlink_metadata().is_ok(),
            "socket exists while running"
        );
        (child, socket, rx)
    }

    fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "crx-vmm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn sigterm_stops_cleanly_and_removes_the_socket() {
        common::require_kvm();
        let dir = common::test_dir("sigterm");
        let tag = new_tag();
        let (mut child, socket, rx) = start_spinning(&dir, &tag);
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = wait_exit(&mut child);
        assert_eq!(status.code(), Some(0), "a host stop is not a failure");
        let rest: Vec<String> = rx.try_iter().collect();
        assert!(
            rest.iter().any(|l| l.contains("stopped by the host")),
            "{rest:?}"
        );
        assert_nothing_left(&tag, &socket);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sigkill_leaves_no_socket_and_no_process() {
        common::require_kvm();
        let dir = common::test_dir("sigkill");
        let tag = new_tag();
        let (mut child, socket, _rx) = start_spinning(&dir, &tag);
        assert!(
            processes_with_tag(&tag).len() >= 2,
            "crx-vmm and its cleanup process run"
        );
        child.kill().unwrap();
        let status = wait_exit(&mut child);
        assert_eq!(status.code(), None, "killed by a signal");
        assert_nothing_left(&tag, &socket);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn virtio_slot_is_visible_to_the_guest_and_serial_modes_work() {
        common::require_kvm();
        let dir = common::test_dir("virtio-serial");
        let kernel = dir.join("vmlinux-virtio");
        std::fs::write(
            &kernel,
            common::pvh_elf(&common::pvh_code_checking_virtio(Tail::CleanShutdown, true)),
        )
        .unwrap();
        let socket = dir.join("v.sock");
        let console = dir.join("console.log");
        let serial_file = format!("file:{}", console.display());
        for serial in ["log", serial_file.as_str(), "off"] {
            let tag = new_tag();
            let out = command(
                &tag,
                &[
                    "--kernel",
                    kernel.to_str().unwrap(),
                    "--allow-pvm",
                    "--vsock-uds",
                    socket.to_str().unwrap(),
                    "--serial",
                    serial,
                ],
            )
            .output()
            .unwrap();
            let err = stderr_of(&out);
            assert_eq!(
                out.status.code(),
                Some(0),
                "serial {serial}: guest checks passed: {err}"
            );
            assert_eq!(
                err.contains("guest: ready"),
                serial == "log",
                "serial {serial}: {err}"
            );
            assert_nothing_left(&tag, &socket);
        }
        assert_eq!(std::fs::read_to_string(&console).unwrap(), "ready\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn drives_and_rng_attach_and_a_bad_drive_is_named() {
        common::require_kvm();
        let dir = common::test_dir("drives");
        let kernel = common::write_pvh_kernel(&dir, Tail::CleanShutdown);
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let socket = dir.join("d.sock");
        let drive = format!("path={},serial=vol0", disk.display());
        let tag = new_tag();
        let out = command(
            &tag,
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--allow-pvm",
                "--drive",
                &drive,
                "--drive",
                "empty,ro",
                "--rng",
                "--vsock-uds",
                socket.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        assert_nothing_left(&tag, &socket);

        let missing = format!("path={}", dir.join("nope.img").display());
        expect_failure(
            &dir,
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--allow-pvm",
                "--drive",
                &missing,
            ],
            2,
            "nope.img",
        );
        // A malformed spec is refused by argument parsing, before anything starts.
        let out = command(
            &new_tag(),
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--allow-pvm",
                "--drive",
                "ro",
            ],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr_of(&out).contains("needs exactly one of path=FILE or empty"),
            "{}",
            stderr_of(&out)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn vhost_user_vsock_back_end_removes_its_sockets_when_killed() {
        let dir = common::test_dir("vhost-user");
        let socket = dir.join("vhost.sock");
        let uds = dir.join("agent.sock");
        let tag = new_tag();
        let mut child = command(
            &tag,
            &[
                "vhost-user-vsock",
                "--socket",
                socket.to_str().unwrap(),
                "--uds",
                uds.to_str().unwrap(),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let start = Instant::now();
        while socket.symlink_metadata().is_err() || uds.symlink_metadata().is_err() {
            assert!(start.elapsed() < DEADLINE, "sockets never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        wait_exit(&mut child);
        assert_nothing_left(&tag, &socket);
        assert_nothing_left(&tag, &uds);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
