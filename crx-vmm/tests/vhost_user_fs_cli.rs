//! `crx-vmm vhost-user-fs` end to end: a bad share directory or socket path gets one
//! clear line and exit code 2 before any socket exists; a running back end serves
//! its socket and leaves nothing behind when stopped or killed. `--share` of
//! crx-vmm's own VM path refuses a missing directory the same way.

mod common;

// Integration tests are a crate of their own; the module keeps the workspace's
// `tests_outside_test_module` lint meaningful.
#[cfg(test)]
mod tests {
    use super::common;

    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    const BIN: &str = env!("CARGO_BIN_EXE_crx-vmm");
    const DEADLINE: Duration = Duration::from_secs(10);

    fn test_dir(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crx-vufs-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn vhost_user_fs(socket: &Path, dir: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["vhost-user-fs", "--socket"])
            .arg(socket)
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null());
        cmd
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

    fn wait_gone(path: &Path) {
        let start = Instant::now();
        while path.symlink_metadata().is_ok() {
            assert!(start.elapsed() < DEADLINE, "{} left behind", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_missing_or_non_directory_share_is_refused_with_exit_2() {
        let dir = test_dir("bad");
        let socket = dir.join("fs.sock");
        let missing = dir.join("no-such-dir");
        let out = vhost_user_fs(&socket, &missing).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not exist") && err.contains("no-such-dir"),
            "stderr: {err}"
        );
        assert!(
            !socket.exists(),
            "no socket for a back end that cannot serve"
        );

        let file = dir.join("a-file");
        std::fs::write(&file, b"").unwrap();
        let out = vhost_user_fs(&socket, &file).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a directory"), "stderr: {err}");
        assert!(!socket.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_existing_socket_path_is_refused_and_left_alone() {
        let dir = test_dir("exists");
        let socket = dir.join("fs.sock");
        std::fs::write(&socket, b"someone else's").unwrap();
        let out = vhost_user_fs(&socket, &dir).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
        assert_eq!(std::fs::read(&socket).unwrap(), b"someone else's");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_back_end_listens_and_leaves_nothing_when_stopped_or_killed() {
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            let dir = test_dir("run");
            let share = dir.join("share");
            std::fs::create_dir(&share).unwrap();
            let socket = dir.join("fs.sock");
            let mut child = vhost_user_fs(&socket, &share)
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let start = Instant::now();
            while socket.symlink_metadata().is_err() {
                assert!(start.elapsed() < DEADLINE, "socket never appeared");
                assert!(child.try_wait().unwrap().is_none(), "back end exited early");
                std::thread::sleep(Duration::from_millis(5));
            }
            // SAFETY: kill only signals the child we started.
            unsafe { libc::kill(child.id() as i32, signal) };
            let status = wait_exit(&mut child);
            if signal == libc::SIGTERM {
                assert_eq!(status.code(), Some(0), "a stop request is a clean exit");
            }
            wait_gone(&socket);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn vm_share_with_a_missing_dir_is_refused_with_exit_2() {
        let dir = test_dir("vm-share");
        common::require_kvm();
        // A tiny PVH guest: the share is checked before the VM is built.
        let kernel = common::write_pvh_kernel(&dir, common::Tail::Spin);
        let out = Command::new(BIN)
            .arg("--kernel")
            .arg(&kernel)
            .arg("--share")
            .arg(format!("tag=pod,dir={}", dir.join("gone").display()))
            .arg("--allow-pvm")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("share `pod`") && err.contains("does not exist"),
            "stderr: {err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_vm_with_a_share_starts_with_and_without_the_jail() {
        common::require_kvm();
        let dir = test_dir("vm-share-ok");
        let share = dir.join("share");
        std::fs::create_dir(&share).unwrap();
        let share_arg = format!("tag=pod,dir={}", share.display());
        let jail = dir.join("jail");
        std::fs::create_dir(&jail).unwrap();
        for extra in [
            vec!["--share", share_arg.as_str()],
            vec![
                "--share",
                share_arg.as_str(),
                "--jail",
                jail.to_str().unwrap(),
            ],
        ] {
            let mut child = common::start_spinning(&dir, &extra);
            let root = PathBuf::from(format!("/proc/{}/root", child.id()));
            assert!(
                root.join(share.strip_prefix("/").unwrap()).is_dir(),
                "the share is visible to crx-vmm ({extra:?})"
            );
            // SAFETY: signals the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = wait_exit(&mut child);
            assert!(status.success(), "{extra:?}: {status}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
