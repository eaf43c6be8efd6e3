//! crx-vmm's lock-down, seen from outside: a thread that makes a call outside its
//! role's real filter kills its whole process with SIGSYS (the shim sees the VMM die),
//! the calls a role needs still work, a device thread started from a confined vCPU
//! thread gets its own role; a booted VM has every thread filtered; `--jail` confines
//! the VMM to its own mount namespace and root, with no capabilities, and leaves
//! nothing mounted on the host.
//!
//! The filter tests run in a child process: this test binary re-executed on one
//! ignored helper test, told what to do through the environment.
//! Needs root and /dev/kvm (the VM tests): without them they fail, they do not skip.

mod common;

#[cfg(test)]
mod tests {
    use super::common;

    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use crx_vmm::devices::virtio::device_thread::{exit_events, DeviceThread};
    use crx_vmm::seccomp::{self, SeccompMode, ThreadRole};

    const BIN: &str = env!("CARGO_BIN_EXE_crx-vmm");
    const DEADLINE: Duration = Duration::from_secs(10);
    const SCENARIO: &str = "CRX_SECCOMP_SCENARIO";

    /// Runs `scenario` in a child process (see `child_scenario`).
    fn run_child(scenario: &str) -> Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "tests::child_scenario",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SCENARIO, scenario)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn assert_killed_by_sigsys(scenario: &str) {
        let out = run_child(scenario);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{scenario}: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(
            stderr.contains("CONFINED"),
            "{scenario}: the filter was installed before the call: {stderr}"
        );
        assert!(
            !stderr.contains("SURVIVED"),
            "{scenario}: the forbidden call returned: {stderr}"
        );
    }

    fn assert_ran_to_the_end(scenario: &str) {
        let out = run_child(scenario);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{scenario}: {:?}: {stderr}",
            out.status
        );
        assert!(stderr.contains("ALLOWED-OK"), "{scenario}: {stderr}");
    }

    fn say(text: &str) {
        // A raw write: the filters allow write(2) on any fd, and nothing is buffered.
        let line = format!("{text}\n");
        // SAFETY: writes our own buffer to stderr.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }

    fn confine(role: ThreadRole) {
        let program = seccomp::compile(role, SeccompMode::Kill).unwrap();
        seccomp::install_program(role, &program).unwrap();
        say("CONFINED");
    }

    /// The calls a vCPU thread makes outside KVM_RUN: eventfds (device activation,
    /// irqfd), futexes, memory, logging.
    fn vcpu_allowed_calls() {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        evt.write(1).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        let copy = evt.try_clone().unwrap();
        drop(copy);
        let big = vec![7u8; 8 << 20];
        assert_eq!(big[big.len() - 1], 7);
        drop(big);
        let m = std::sync::Mutex::new(1);
        *m.lock().unwrap() += 1;
    }

    /// The helper: does what `CRX_SECCOMP_SCENARIO` says, in this (child) process.
    #[test]
    #[ignore = "helper: run in a child process by the other tests"]
    fn child_scenario() {
        let Ok(scenario) = std::env::var(SCENARIO) else {
            return;
        };
        match scenario.as_str() {
            "vcpu-socket" => {
                confine(ThreadRole::Vcpu);
                // SAFETY: a plain socket call; the filter should kill us in it.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                say("SURVIVED");
            }
            "vcpu-open" => {
                confine(ThreadRole::Vcpu);
                let _ = std::fs::File::open("/etc/hostname");
                say("SURVIVED");
            }
            "rng-execve" => {
                confine(ThreadRole::Rng);
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                // SAFETY: NUL-terminated path and argument/environment arrays; the
                // filter should kill us in the call.
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                say("SURVIVED");
            }
            "vsock-inet-socket" => {
                // The vsock thread may make Unix sockets, and only those.
                confine(ThreadRole::Vsock);
                let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
                drop(a);
                say("unix ok");
                // SAFETY: as above.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                say("SURVIVED");
            }
            "vcpu-exec-mapping" => {
                confine(ThreadRole::Vcpu);
                // SAFETY: an anonymous mapping of our own; the filter should refuse
                // PROT_EXEC by killing us.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                say("SURVIVED");
            }
            "vcpu-allowed" => {
                confine(ThreadRole::Vcpu);
                vcpu_allowed_calls();
                say("ALLOWED-OK");
                // Leave without the harness's own calls after the test.
                std::process::exit(0);
            }
            "device-from-vcpu" | "device-from-vcpu-forbidden" => {
                // What crx-vmm does: filters on for the process, a vCPU thread
                // activates a device, whose thread then runs under its own role.
                seccomp::set_mode(SeccompMode::Kill).unwrap();
                let forbidden = scenario.ends_with("forbidden");
                let vcpu = std::thread::spawn(move || {
                    seccomp::install(ThreadRole::Vcpu).unwrap();
                    say("CONFINED");
                    let (exit, thread_exit) = exit_events().unwrap();
                    let thread = DeviceThread::spawn("crx-rng", exit, move || {
                        let mut buf = [0u8; 16];
                        // SAFETY: fills our own buffer.
                        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 16, 0) };
                        if forbidden {
                            // SAFETY: as above; the rng role has no sockets.
                            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                            say("SURVIVED");
                        }
                        while thread_exit.read().is_err() {
                            std::thread::yield_now();
                        }
                        n
                    })
                    .unwrap();
                    match thread.stop("rng") {
                        Ok(Some(16)) => say("ALLOWED-OK"),
                        _ => say("device thread failed"),
                    }
                });
                vcpu.join().unwrap();
                std::process::exit(0);
            }
            other => panic!("unknown scenario {other}"),
        }
    }

    #[test]
    fn a_call_outside_a_role_kills_the_process_with_sigsys() {
        for scenario in [
            "vcpu-socket",
            "vcpu-open",
            "rng-execve",
            "vsock-inet-socket",
            "vcpu-exec-mapping",
            "device-from-vcpu-forbidden",
        ] {
            assert_killed_by_sigsys(scenario);
        }
    }

    #[test]
    fn the_calls_a_role_needs_still_work() {
        assert_ran_to_the_end("vcpu-allowed");
        // A vCPU thread's filter allows no clone: the device thread it starts comes
        // from the launcher and runs under the rng role.
        assert_ran_to_the_end("device-from-vcpu");
    }

    // ---- the binary ----

    fn status_field(pid: u32, task: Option<&str>, key: &str) -> Option<String> {
        let path = match task {
            Some(t) => format!("/proc/{pid}/task/{t}/status"),
            None => format!("/proc/{pid}/status"),
        };
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_string())
    }

    fn stop(mut child: Child) -> std::process::ExitStatus {
        // SAFETY: signals the child we started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "crx-vmm did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn thread_filters(pid: u32) -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| {
                let tid = t.file_name().into_string().unwrap();
                let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let mode = status_field(pid, Some(&tid), "Seccomp").unwrap_or_default();
                (name.trim().to_string(), mode)
            })
            .collect()
    }

    /// The threads once every one is filtered (the main thread confines itself just
    /// after the vCPUs start, so it may trail the guest's ready line).
    fn wait_all_filtered(pid: u32) -> Vec<(String, String)> {
        let start = Instant::now();
        loop {
            let threads = thread_filters(pid);
            if threads.iter().all(|(_, mode)| mode == "2") || start.elapsed() > DEADLINE {
                return threads;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_booted_vm_has_every_thread_filtered_unless_told_otherwise() {
        common::require_kvm();
        let dir = common::test_dir("seccomp-boot");
        let child = common::start_spinning(&dir, &[]);
        let threads = wait_all_filtered(child.id());
        assert!(
            threads.iter().any(|(n, _)| n == "crx-vcpu-0"),
            "{threads:?}"
        );
        for (name, mode) in &threads {
            assert_eq!(mode, "2", "thread {name} runs under a seccomp filter");
        }
        assert!(stop(child).success(), "SIGTERM still ends the VM cleanly");

        let child = common::start_spinning(&dir, &["--no-seccomp"]);
        let threads = thread_filters(child.id());
        assert!(threads.iter().all(|(_, m)| m == "0"), "{threads:?}");
        assert!(stop(child).success());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn host_mounts_under(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| Path::new(m).starts_with(path))
            })
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_jail_shows_only_what_the_vm_uses_and_holds_no_capability() {
        common::require_kvm();
        let dir = common::test_dir("jail");
        let jail = dir.join("root");
        let run = dir.join("run");
        std::fs::create_dir_all(&jail).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(dir.join("secret"), b"host only").unwrap();
        let sock = run.join("vsock.sock");
        let child = common::start_spinning(
            &dir,
            &[
                "--vsock-uds",
                sock.to_str().unwrap(),
                "--jail",
                jail.to_str().unwrap(),
            ],
        );
        let pid = child.id();
        wait_all_filtered(pid);
        assert_eq!(
            status_field(pid, None, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(
            status_field(pid, None, "CapBnd").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(status_field(pid, None, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(status_field(pid, None, "Seccomp").as_deref(), Some("2"));
        // Its root: the kernel and the socket's directory, at their host paths.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
        assert!(inside(&dir.join("vmlinux-Spin")).is_file());
        assert!(inside(&run).is_dir());
        assert!(!inside(&dir.join("secret")).exists(), "no other host file");
        assert!(!root.join("etc").exists() && !root.join("dev").exists());
        // The socket crx-vmm made in the jail is the host's.
        assert!(
            sock.symlink_metadata().is_ok(),
            "socket visible on the host"
        );
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .collect();
        assert_eq!(mounts.len(), 3, "root, kernel, socket dir: {mountinfo}");
        assert_eq!(mounts[0], "/");
        assert!(
            mountinfo.contains(" / / ro,"),
            "read-only tmpfs root: {mountinfo}"
        );
        // Nothing of the jail reached the host's mount table.
        assert!(
            host_mounts_under(&dir).is_empty(),
            "{:?}",
            host_mounts_under(&dir)
        );
        assert!(stop(child).success());
        assert!(sock.symlink_metadata().is_err(), "socket removed");
        assert!(host_mounts_under(&dir).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mounts_the_host_adds_under_a_share_after_start_appear_in_the_jail() {
        common::require_kvm();
        let dir = common::test_dir("jail-share");
        let jail = dir.join("root");
        let share = dir.join("share");
        let extra = dir.join("extra");
        for d in [&jail, &share, &extra] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(extra.join("file"), b"added after start").unwrap();
        let mount = |args: &[&str]| {
            let ok = Command::new("mount").args(args).status().unwrap().success();
            assert!(ok, "mount {args:?}");
        };
        // What the shim does to a pod share: a shared mount of its own.
        let share_s = share.to_str().unwrap();
        mount(&["--bind", share_s, share_s]);
        mount(&["--make-shared", share_s]);
        let child = common::start_spinning(
            &dir,
            &[
                "--share",
                &format!("tag=pod,dir={share_s}"),
                "--jail",
                jail.to_str().unwrap(),
            ],
        );
        let pid = child.id();
        // virtio-fs keeps the file-system capabilities, and only those.
        assert_eq!(
            status_field(pid, None, "CapEff").as_deref(),
            Some("00000000000000df")
        );
        let sub = share.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        mount(&["--bind", extra.to_str().unwrap(), sub.to_str().unwrap()]);
        let seen = PathBuf::from(format!("/proc/{pid}/root"))
            .join(sub.strip_prefix("/").unwrap())
            .join("file");
        assert_eq!(std::fs::read(&seen).unwrap(), b"added after start");
        assert!(stop(child).success());
        let _ = Command::new("umount").args(["-R", share_s]).status();
        assert!(
            host_mounts_under(&dir).is_empty(),
            "{:?}",
            host_mounts_under(&dir)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn jail_uid_and_gid_are_taken_with_no_capability_left() {
        common::require_kvm();
        let dir = common::test_dir("jail-uid");
        let jail = dir.join("root");
        std::fs::create_dir_all(&jail).unwrap();
        let child = common::start_spinning(
            &dir,
            &[
                "--jail",
                jail.to_str().unwrap(),
                "--jail-uid",
                "65534",
                "--jail-gid",
                "65533",
            ],
        );
        let pid = child.id();
        assert_eq!(
            status_field(pid, None, "Uid").as_deref(),
            Some("65534\t65534\t65534\t65534")
        );
        assert_eq!(
            status_field(pid, None, "Gid").as_deref(),
            Some("65533\t65533\t65533\t65533")
        );
        assert_eq!(status_field(pid, None, "Groups").as_deref(), Some(""));
        assert_eq!(
            status_field(pid, None, "CapPrm").as_deref(),
            Some("0000000000000000")
        );
        assert!(stop(child).success());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Starts `crx-vmm <args> --jail <jail>` and waits for its vhost-user `socket`.
    fn start_jailed_back_end(args: &[&std::ffi::OsStr], jail: &Path, socket: &Path) -> Child {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--jail")
            .arg(jail)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while socket.symlink_metadata().is_err() {
            assert!(child.try_wait().unwrap().is_none(), "back end ended early");
            assert!(start.elapsed() < DEADLINE, "no vhost-user socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Mount points in `pid`'s mount namespace, as it sees them.
    fn mount_points(pid: u32) -> Vec<String> {
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_vhost_user_vsock_back_end_jails_itself_around_its_sockets() {
        let dir = common::test_dir("jail-vhu");
        let jail = dir.join("root");
        let run = dir.join("run");
        std::fs::create_dir_all(&jail).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let (socket, uds) = (run.join("vhu.sock"), run.join("vsock.sock"));
        let args = [
            "vhost-user-vsock".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ];
        let args = [&args[..], &["--uds".as_ref(), uds.as_os_str()]].concat();
        let child = start_jailed_back_end(&args, &jail, &socket);
        let pid = child.id();
        assert_eq!(
            status_field(pid, None, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(status_field(pid, None, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(status_field(pid, None, "Seccomp").as_deref(), Some("2"));
        assert_eq!(mount_points(pid), ["/", run.to_str().unwrap()]);
        assert!(
            uds.symlink_metadata().is_ok(),
            "hybrid socket made on the host"
        );
        assert!(stop(child).success());
        assert!(socket.symlink_metadata().is_err() && uds.symlink_metadata().is_err());
        assert!(host_mounts_under(&dir).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_vhost_user_fs_back_end_jails_itself_around_its_socket_and_share() {
        let dir = common::test_dir("jail-vhu-fs");
        let (jail, run, share) = (dir.join("root"), dir.join("run"), dir.join("share"));
        for d in [&jail, &run, &share] {
            std::fs::create_dir_all(d).unwrap();
        }
        let socket = run.join("fs.sock");
        let args = [
            "vhost-user-fs".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--dir".as_ref(),
            share.as_os_str(),
        ];
        let child = start_jailed_back_end(&args, &jail, &socket);
        let pid = child.id();
        let mut mounts = mount_points(pid);
        mounts.sort();
        let mut want = ["/", "/proc", run.to_str().unwrap(), share.to_str().unwrap()];
        want.sort();
        assert_eq!(mounts, want, "only the socket dir, the share and /proc");
        // The file capabilities the passthrough server needs, and nothing like
        // CAP_SYS_ADMIN (21) that would let it leave the jail.
        let cap_eff = status_field(pid, None, "CapEff").unwrap();
        let cap_eff = u64::from_str_radix(&cap_eff, 16).unwrap();
        assert_ne!(cap_eff, 0, "the fs server keeps its file capabilities");
        assert_eq!(cap_eff & (1 << 21), 0, "no CAP_SYS_ADMIN: {cap_eff:#x}");
        assert_eq!(status_field(pid, None, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(status_field(pid, None, "Seccomp").as_deref(), Some("2"));
        assert!(stop(child).success());
        assert!(socket.symlink_metadata().is_err());
        assert!(host_mounts_under(&dir).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_jail_directory_is_an_input_error_that_names_it() {
        let dir = common::test_dir("jail-bad");
        let kernel = common::write_pvh_kernel(&dir, common::Tail::Spin);
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        for (jail, says) in [
            (dir.join("missing"), "not an existing directory"),
            (file.clone(), "not an existing directory"),
            (PathBuf::from("relative/dir"), "not an absolute path"),
            (PathBuf::from("/"), "cannot be the host's root"),
        ] {
            let out = Command::new(BIN)
                .arg("--kernel")
                .arg(&kernel)
                .arg("--allow-pvm")
                .arg("--jail")
                .arg(&jail)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{jail:?}: {stderr}");
            assert!(
                stderr.contains(says) && stderr.contains(jail.to_str().unwrap()),
                "{jail:?}: {stderr}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
