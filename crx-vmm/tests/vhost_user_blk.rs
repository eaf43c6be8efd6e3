//! `crx-vmm vhost-user-blk` end to end under a real guest: QEMU (TCG, microvm, the
//! way the `qemu` VM backend runs pods) boots the crx guest kernel with one empty
//! `vhost-user-blk` slot served by the back end (seccomp on, as in production). The
//! guest (a busybox script as /init) reports on the serial console; the host fills and
//! empties the slot through the API socket with `crx_vmm::api::client`, as the shim
//! does:
//! - the slot starts with size 0 and the serial given on the command line;
//! - an attach shows up in the guest as the file's size, and the guest reads its data;
//! - a guest write lands in the file;
//! - a detach brings the size back to 0;
//! - a read-only attach refuses the guest's write (I/O error) and leaves the file alone;
//! - when QEMU goes away, the back end exits 0 and removes both sockets.
//!
//! Needs qemu-system-x86_64, cpio, a static /usr/bin/busybox and the crx guest kernel
//! (`/var/cache/crx/kernel/*/vmlinux`, or `CRX_VHU_KERNEL`); without them it fails
//! saying which is missing. Bad command-line input is checked without a guest.

// Integration tests are a crate of their own; the module keeps the workspace's
// `tests_outside_test_module` lint meaningful.
#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use crx_vmm::api::client;

    const BIN: &str = env!("CARGO_BIN_EXE_crx-vmm");
    const SERIAL: &str = "crx-vol-0123456789ab";
    /// Boot under TCG plus the guest's polling: generous, but bounded.
    const GUEST_DEADLINE: Duration = Duration::from_secs(180);
    const DEADLINE: Duration = Duration::from_secs(10);
    const DATA: &[u8] = b"crx-vhost-user-blk-data!";
    const GUEST_WROTE: &[u8] = b"guest-wrote-this";

    fn test_dir(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crx-vublk-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn vhost_user_blk(socket: &Path, api: &Path, serial: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["vhost-user-blk", "--socket"])
            .arg(socket)
            .arg("--api-socket")
            .arg(api)
            .args(["--serial", serial])
            .stdin(Stdio::null());
        cmd
    }

    fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                panic!("process did not exit within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn bad_input_fails_with_exit_2_before_any_socket_exists() {
        let dir = test_dir("input");
        let (sock, api) = (dir.join("blk.sock"), dir.join("api.sock"));
        let (status, err) = refused(vhost_user_blk(&sock, &api, "123456789012345678901"));
        assert_eq!(status.code(), Some(2), "{status:?}: {err}");
        assert!(err.contains("serial is 21 bytes"), "stderr: {err}");
        assert!(!sock.exists() && !api.exists());

        std::fs::write(&api, b"x").unwrap();
        let (status, err) = refused(vhost_user_blk(&sock, &api, "ok"));
        assert_eq!(status.code(), Some(2), "{status:?}: {err}");
        assert!(err.contains("already exists"), "stderr: {err}");
        assert!(
            !sock.exists(),
            "no vhost-user socket for a back end that cannot serve"
        );
        assert_eq!(
            std::fs::read(&api).unwrap(),
            b"x",
            "someone else's file kept"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs a back end that must refuse to start: its exit and standard error, with a
    /// bounded wait (one that serves instead is killed and fails the test).
    fn refused(mut cmd: Command) -> (std::process::ExitStatus, String) {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(20));
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        (status, err)
    }

    fn require(what: &str, ok: bool) {
        assert!(ok, "this test needs {what}");
    }

    fn guest_kernel() -> PathBuf {
        if let Ok(k) = std::env::var("CRX_VHU_KERNEL") {
            return PathBuf::from(k);
        }
        let mut found: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir("/var/cache/crx/kernel")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("vmlinux"))
                .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
                .collect();
        found.sort();
        found.pop().map(|(_, p)| p).unwrap_or_else(|| {
            panic!(
                "this test needs the crx guest kernel: /var/cache/crx/kernel/*/vmlinux \
                 (scripts/lib.sh build_kernel) or CRX_VHU_KERNEL"
            )
        })
    }

    /// The guest's /init: reports the slot on the console and reacts to the host's
    /// attach and detach by polling /sys/block/vda/size (bounded).
    const GUEST_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
size() { $B cat /sys/block/vda/size; }
wait_size() {
  i=0
  while :; do
    s=$(size)
    if [ "$1" = zero ] && [ "$s" = 0 ]; then return 0; fi
    if [ "$1" = nonzero ] && [ "$s" != 0 ]; then return 0; fi
    i=$((i+1))
    if [ $i -gt 1500 ]; then echo "BLK timeout waiting for $1"; return 1; fi
    $B usleep 100000
  done
}
echo "BLK empty serial=$($B cat /sys/block/vda/serial) size=$(size) ;"
wait_size nonzero
echo "BLK attached size=$(size) ;"
echo "BLK data=$($B dd if=/dev/vda bs=512 count=1 2>/dev/null | $B head -c 24) ;"
echo -n "guest-wrote-this" | $B dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
echo "BLK wrote rc=$? ;"
wait_size zero
echo "BLK detached size=$(size) ;"
wait_size nonzero
echo "BLK ro-attached size=$(size) ;"
echo -n "must-not-land" | $B dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
echo "BLK ro-write rc=$? ;"
wait_size zero
echo "BLK done ;"
$B reboot -f
"#;

    fn build_initrd(dir: &Path) -> PathBuf {
        require(
            "cpio",
            Command::new("cpio").arg("--version").output().is_ok(),
        );
        let root = dir.join("root");
        for d in ["bin", "proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))
            .expect("this test needs a static /usr/bin/busybox (Debian busybox-static)");
        std::fs::write(root.join("init"), GUEST_INIT).unwrap();
        std::fs::set_permissions(
            root.join("init"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let initrd = dir.join("initrd.cpio");
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && find . | cpio -o -H newc 2>/dev/null > '{}'",
                root.display(),
                initrd.display()
            ))
            .status()
            .is_ok_and(|s| s.success());
        require("cpio to build the initramfs", ok);
        initrd
    }

    /// The guest's console and the processes, for failure messages.
    struct Rig {
        console: PathBuf,
        backend_log: PathBuf,
        qemu: Child,
        backend: Child,
    }

    impl Rig {
        fn console(&self) -> String {
            String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
        }

        fn report(&self) -> String {
            let log = std::fs::read_to_string(&self.backend_log).unwrap_or_default();
            format!("console:\n{}\nback end log:\n{log}", self.console())
        }

        /// Waits for the guest line starting with `BLK <marker>` and returns it
        /// (without the `;` that ends every line).
        fn wait_line(&mut self, marker: &str) -> String {
            let prefix = format!("BLK {marker}");
            let start = Instant::now();
            loop {
                let console = self.console();
                if let Some(line) = console
                    .lines()
                    .find(|l| l.starts_with(&prefix) && l.contains(" ;"))
                {
                    return line.trim_end_matches(" ;").to_string();
                }
                if console.contains("BLK timeout") {
                    panic!("guest gave up; {}", self.report());
                }
                if let Some(st) = self.qemu.try_wait().unwrap() {
                    panic!("qemu exited ({st}) before {prefix:?}; {}", self.report());
                }
                if let Some(st) = self.backend.try_wait().unwrap() {
                    panic!(
                        "back end exited ({st}) before {prefix:?}; {}",
                        self.report()
                    );
                }
                if start.elapsed() > GUEST_DEADLINE {
                    panic!("no {prefix:?} within {GUEST_DEADLINE:?}; {}", self.report());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = self.qemu.kill();
            let _ = self.backend.kill();
            let _ = self.qemu.wait();
            let _ = self.backend.wait();
        }
    }

    #[test]
    fn a_qemu_guest_sees_drives_attached_and_detached_through_the_api() {
        guest_scenario(false);
    }

    /// As the QEMU backend runs it: jailed (own mount namespace, only the sockets'
    /// directory inside, no capabilities) as well as filtered.
    #[test]
    fn the_same_through_a_jailed_back_end() {
        guest_scenario(true);
    }

    fn guest_scenario(jailed: bool) {
        require(
            "qemu-system-x86_64",
            Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .is_ok(),
        );
        let kernel = guest_kernel();
        let dir = test_dir(if jailed { "qemu-jail" } else { "qemu" });
        let initrd = build_initrd(&dir);
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let (sock, api) = (run.join("blk.sock"), run.join("api.sock"));
        let backend_log = dir.join("backend.log");
        let mut cmd = vhost_user_blk(&sock, &api, SERIAL);
        if jailed {
            let jail = dir.join("jail");
            std::fs::create_dir_all(&jail).unwrap();
            cmd.arg("--jail").arg(jail);
        }
        let backend = cmd
            .stderr(std::fs::File::create(&backend_log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !(sock.exists() && api.exists()) {
            assert!(
                start.elapsed() < DEADLINE,
                "back end sockets never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let console = dir.join("console.log");
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "microvm,acpi=off", "-m", "256"])
            .args(["-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-machine", "memory-backend=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=blk0,path={}", sock.display()))
            .args(["-device", "vhost-user-blk,chardev=blk0,num-queues=1"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 acpi=off panic=-1 quiet"])
            .args(["-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .unwrap();
        let mut rig = Rig {
            console,
            backend_log,
            qemu,
            backend,
        };

        let t0 = Instant::now();
        let line = rig.wait_line("empty");
        let booted = t0.elapsed();
        assert_eq!(line, format!("BLK empty serial={SERIAL} size=0"));

        // Attach 1 MiB whose first sector starts with DATA.
        let image = dir.join("disk.img");
        let mut content = vec![0u8; 1 << 20];
        content[..DATA.len()].copy_from_slice(DATA);
        std::fs::write(&image, &content).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let t1 = Instant::now();
        let sectors = client::attach_drive(&api, 0, &file, false).unwrap();
        assert_eq!(sectors, 2048);
        assert_eq!(rig.wait_line("attached"), "BLK attached size=2048");
        let seen_after = t1.elapsed();
        assert_eq!(
            rig.wait_line("data="),
            format!("BLK data={}", String::from_utf8_lossy(DATA))
        );
        assert_eq!(rig.wait_line("wrote"), "BLK wrote rc=0");
        let on_disk = std::fs::read(&image).unwrap();
        assert_eq!(&on_disk[512..512 + GUEST_WROTE.len()], GUEST_WROTE);
        assert!(on_disk[512 + GUEST_WROTE.len()..1024]
            .iter()
            .all(|b| *b == 0));

        client::detach_drive(&api, 0).unwrap();
        assert_eq!(rig.wait_line("detached"), "BLK detached size=0");

        // Read-only: the guest's write fails and the file keeps its bytes.
        let ro_image = dir.join("ro.img");
        std::fs::write(&ro_image, vec![0x5au8; 64 * 1024]).unwrap();
        let ro_file = std::fs::File::open(&ro_image).unwrap();
        assert_eq!(client::attach_drive(&api, 0, &ro_file, true).unwrap(), 128);
        assert_eq!(rig.wait_line("ro-attached"), "BLK ro-attached size=128");
        let line = rig.wait_line("ro-write");
        assert_ne!(
            line, "BLK ro-write rc=0",
            "a write to a read-only drive succeeded"
        );
        assert!(
            std::fs::read(&ro_image).unwrap().iter().all(|b| *b == 0x5a),
            "read-only backing changed"
        );
        client::detach_drive(&api, 0).unwrap();
        rig.wait_line("done");

        let qemu_status = wait_exit(&mut rig.qemu, Duration::from_secs(60));
        let status = wait_exit(&mut rig.backend, DEADLINE);
        assert_eq!(status.code(), Some(0), "back end exit; {}", rig.report());
        let start = Instant::now();
        while sock.exists() || api.exists() {
            assert!(start.elapsed() < DEADLINE, "sockets left behind");
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "guest up after {booted:?}; attach seen by the guest after {seen_after:?}; qemu {qemu_status}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
