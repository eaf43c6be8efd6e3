//! The pod devices on real guests under QEMU/TCG: virtio-fs served by crx's own
//! vhost-user-fs back end, and QEMU's virtio-blk, virtio-net (on a tap in a network
//! namespace the test creates) and virtio-rng, all configured through the shim's
//! `VmDevices`. Each test boots one small busybox guest (`crx_tests::test_guest`) that
//! runs its checks and prints `CRX-GUEST` result lines; the host acts mid-run where the
//! check needs it.
//!
//! These tests boot real guests; they need QEMU, the guest kernel and the static
//! crx-vmm binary (`scripts/test.sh` builds them). TCG needs no /dev/kvm.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_shim::vm::{Drive, NetDevice, ProcessExit, QemuAccel, QemuBackend, SharedDir};
    use crx_tests::test_guest::netns::NetNs;
    use crx_tests::test_guest::{self, guest_config, initramfs, wait_for_line};
    use crx_tests::vm_harness::RunDir;

    /// A TCG guest boots in ~2-3 s; the rest is the checks on a busy 2-core machine.
    const GUEST_TIMEOUT: Duration = Duration::from_secs(90);

    fn tcg() -> QemuBackend {
        QemuBackend::new(QemuAccel::Tcg)
    }

    /// A marker no file on this machine holds by chance.
    fn marker(what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("CRX-{what}-{}-{nanos:x}", std::process::id())
    }

    fn run_cmd(cmd: &mut Command) -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    // ---------------------------------------------------------------- virtio-blk, rng

    const BLK_SCRIPT: &str = r#"
result vda-serial "$(cat /sys/block/vda/serial)"
result vdb-serial "$(cat /sys/block/vdb/serial)"
result vdb-ro "$(blockdev --getro /dev/vdb)"
result vdb-content "$(head -c 32 /dev/vdb | tr -d '\0')"
# Make the guest kernel let the write through, so the refusal must come from the device.
blockdev --setrw /dev/vdb
if echo overwritten | dd of=/dev/vdb conv=fsync 2>/dev/null; then
    result vdb-write accepted
else
    result vdb-write refused
fi
result rng-current "$(cat /sys/class/misc/hw_random/rng_current)"
result rng-bytes "$(head -c 64 /dev/hwrng | wc -c)"
# 1 MiB into the writable drive, flushed (fsync is a FLUSH to the device); then the
# host kills QEMU and reads the backing file.
m=$(sed -n 's/.*crx.marker=\([^ ]*\).*/\1/p' /proc/cmdline)
if printf '%s' "$m" | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null; then
    result vda-flushed yes
else
    result vda-flushed no
fi
# Wait for the SIGKILL; the epilogue's reboot would end the VM too early.
sleep 600
"#;

    #[test]
    fn blk_drives_keep_flushed_data_across_a_kill_refuse_writes_when_read_only_and_rng_works(
    ) -> Result<()> {
        test_guest::require_qemu_guest_prerequisites()?;
        let dir = RunDir::new("dq-blk")?;
        let rw = dir.path().join("rw.img");
        let ro = dir.path().join("ro.img");
        let ro_content = "CRX-READ-ONLY-DISK-CONTENT";
        std::fs::write(&rw, vec![0u8; 4 << 20])?;
        let mut ro_bytes = ro_content.as_bytes().to_vec();
        ro_bytes.resize(1 << 20, 0);
        std::fs::write(&ro, &ro_bytes)?;

        let flushed = marker("FLUSHED");
        let image = initramfs("devices-blk", BLK_SCRIPT, &[])?;
        let mut config = guest_config(dir.path(), "dq-blk", &image, 128)?;
        config.kernel_cmdline = format!("crx.marker={flushed}");
        config.devices.drives = vec![
            Drive {
                path: Some(rw.clone()),
                read_only: false,
                serial: "crx-rw".into(),
            },
            Drive {
                path: Some(ro.clone()),
                read_only: true,
                serial: "crx-ro".into(),
            },
        ];
        config.devices.rng = true;

        let start = Instant::now();
        let guest = test_guest::start(&tcg(), &config)?;
        wait_for_line(guest.console_path(), "CRX-GUEST vda-flushed", GUEST_TIMEOUT)?;
        let checks_done = start.elapsed();
        let qemu = guest
            .pids()
            .into_iter()
            .find(|(name, _)| *name == "qemu")
            .context("no qemu process in the VM")?
            .1;
        // SAFETY: kill(2) on the pid of the QEMU this test started and has not reaped
        // (the VM's pidfd-watched child), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(qemu as libc::pid_t, libc::SIGKILL) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        let run = guest.wait(GUEST_TIMEOUT)?;
        eprintln!(
            "blk guest: spawn -> checks done {checks_done:?}; VM end: {}",
            run.exit
        );
        ensure!(
            run.exit.status == ProcessExit::Signal(libc::SIGKILL),
            "QEMU should have died of the SIGKILL: {}",
            run.exit
        );

        // Slot order: the first drive is vda on the guest, as on crx-vmm.
        run.expect("vda-serial", "crx-rw")?;
        run.expect("vdb-serial", "crx-ro")?;
        run.expect("vdb-ro", "1")?;
        run.expect("vdb-content", ro_content)?;
        run.expect("vdb-write", "refused")?;
        ensure!(
            std::fs::read(&ro)? == ro_bytes,
            "the read-only drive's backing file changed"
        );
        ensure!(
            run.result("rng-current")
                .is_some_and(|r| r.contains("virtio")),
            "the guest's hwrng is not virtio-rng: {:?}",
            run.results()
        );
        run.expect("rng-bytes", "64")?;

        run.expect("vda-flushed", "yes")?;
        let data = std::fs::read(&rw)?;
        let at = 2048 * 512;
        ensure!(
            data.get(at..at + flushed.len()) == Some(flushed.as_bytes()),
            "the flushed write is not in the backing file after QEMU's SIGKILL: found {:?}",
            String::from_utf8_lossy(&data[at..at + flushed.len()])
        );
        Ok(())
    }

    // ---------------------------------------------------------------- virtio-net

    const HOST_IP: &str = "10.77.0.1";
    const GUEST_IP: &str = "10.77.0.2";
    const GUEST_TO_HOST_PORT: u16 = 5001;
    const HOST_TO_GUEST_PORT: u16 = 5002;
    const PAYLOAD: usize = 1 << 20;

    const NET_SCRIPT: &str = r#"
result mac "$(cat /sys/class/net/eth0/address)"
result mtu "$(cat /sys/class/net/eth0/mtu)"
ip link set lo up
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
# Guest -> host: 1 MiB of random bytes; the host checks their digest.
dd if=/dev/urandom of=/tmp/out bs=64k count=16 2>/dev/null
result sent-md5 "$(md5sum </tmp/out | cut -d' ' -f1)"
ok=no
for i in $(seq 1 100); do
    if nc 10.77.0.1 5001 </tmp/out; then ok=yes; break; fi
    sleep 0.1
done
result sent "$ok"
# Host -> guest: the host connects once we listen, sends 1 MiB and closes.
nc -l -p 5002 >/tmp/in &
sleep 0.2
result listening 5002
wait
result received-bytes "$(wc -c </tmp/in)"
result received-md5 "$(md5sum </tmp/in | cut -d' ' -f1)"
reboot -f
"#;

    fn md5_of(data: &[u8]) -> Result<String> {
        let mut child = Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running md5sum")?;
        child
            .stdin
            .take()
            .context("md5sum stdin")?
            .write_all(data)?;
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    #[test]
    fn guest_and_host_talk_tcp_over_a_tap_in_a_test_network_namespace() -> Result<()> {
        test_guest::require_qemu_guest_prerequisites()?;
        let dir = RunDir::new("dq-net")?;
        let ns = NetNs::new(&format!("crx-dq-{}", std::process::id()))?;
        let tap = ns.tap("crxtap0", &format!("{HOST_IP}/24"), 1400)?;
        let listener: TcpListener = ns.enter(|| {
            TcpListener::bind((HOST_IP, GUEST_TO_HOST_PORT)).context("binding in the netns")
        })?;

        let image = initramfs("devices-net", NET_SCRIPT, &[])?;
        let mut config = guest_config(dir.path(), "dq-net", &image, 128)?;
        config.devices.net = Some(NetDevice {
            tap: Arc::new(tap),
            mac: [0x02, 0xc5, 0x00, 0x00, 0x00, 0x01],
            mtu: 1400,
        });
        let start = Instant::now();
        let guest = test_guest::start(&tcg(), &config)?;

        // Guest -> host.
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + GUEST_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!(
                            "the guest never connected to {HOST_IP}:{GUEST_TO_HOST_PORT}; console:\n{}",
                            test_guest::tail(
                                &std::fs::read_to_string(guest.console_path())?,
                                20
                            )
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(GUEST_TIMEOUT))?;
        let mut received = vec![0u8; PAYLOAD];
        stream
            .read_exact(&mut received)
            .context("reading the guest's 1 MiB")?;
        drop(stream);
        let guest_to_host = start.elapsed();

        // Host -> guest.
        wait_for_line(guest.console_path(), "CRX-GUEST listening", GUEST_TIMEOUT)?;
        let sent: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut to_guest: TcpStream = ns.enter(|| {
            TcpStream::connect_timeout(
                &format!("{GUEST_IP}:{HOST_TO_GUEST_PORT}").parse()?,
                Duration::from_secs(20),
            )
            .context("connecting to the guest")
        })?;
        to_guest.write_all(&sent)?;
        drop(to_guest);

        let run = guest.wait(GUEST_TIMEOUT)?;
        eprintln!(
            "net guest: guest->host 1 MiB done at {guest_to_host:?}, VM ended at {:?}: {}",
            start.elapsed(),
            run.exit
        );
        ensure!(!run.exit.is_failure(), "VM failed: {}", run.exit);
        run.expect("mac", "02:c5:00:00:00:01")?;
        run.expect("mtu", "1400")?;
        run.expect("sent", "yes")?;
        run.expect("sent-md5", &md5_of(&received)?)?;
        run.expect("received-bytes", &PAYLOAD.to_string())?;
        run.expect("received-md5", &md5_of(&sent)?)?;
        Ok(())
    }

    // ---------------------------------------------------------------- virtio-fs

    const FS_SCRIPT: &str = r#"
mkdir -p /mnt/share /etc
echo guest-etc-hostname >/etc/hostname
if mount -t virtiofs pod /mnt/share; then result mounted yes; else result mounted no; reboot -f; fi
result host-file "$(cat /mnt/share/host-file.txt)"
echo from-guest >/mnt/share/guest-file.txt
mkdir /mnt/share/guest-dir && echo nested >/mnt/share/guest-dir/nested.txt
result guest-wrote yes

# Escape attempts. The host's world directory (which holds the secret beside the share)
# is on the command line so the guest can name host paths.
w=$(sed -n 's/.*crx.world=\([^ ]*\).*/\1/p' /proc/cmdline)
escape=$(sed -n 's/.*crx.escape=\([^ ]*\).*/\1/p' /proc/cmdline)
probe() { if out=$(cat "$2" 2>/dev/null); then result "$1" "read:$out"; else result "$1" denied; fi; }
probe dotdot /mnt/share/../secret.txt
probe dotdot-host-path "/mnt/share/../../../..$w/secret.txt"
probe abs-link /mnt/share/abs-secret
probe rel-link /mnt/share/rel-secret
probe root-link "/mnt/share/root-link$w/secret.txt"
probe etc-link /mnt/share/etc-link/hostname
probe passwd-link /mnt/share/passwd-link
ln /mnt/share/rel-secret /mnt/share/hard-link 2>/dev/null
probe hard-link /mnt/share/hard-link
ln -s "$w/secret.txt" /mnt/share/guest-abs-link 2>/dev/null
probe guest-abs-link /mnt/share/guest-abs-link
# Writes that try to land outside: through a host-planted link to the root, and a rename
# up and out of the share.
mkdir "/mnt/share/root-link/$escape" 2>/dev/null
echo out >/mnt/share/rel-out 2>/dev/null; mv /mnt/share/rel-out /mnt/share/../"$escape" 2>/dev/null
result escapes-tried yes

# The host now checks what we wrote, writes a file, and bind-mounts a directory under the
# share; it creates bind-done last.
result ready-for-host yes
n=0
while [ ! -e /mnt/share/bind-done ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
result bind-done-seen "$([ -e /mnt/share/bind-done ] && echo yes || echo no)"
result host-late "$(cat /mnt/share/host-late.txt)"
result late-bind "$(cat /mnt/share/late/late.txt)"
umount /mnt/share && result unmounted yes
reboot -f
"#;

    /// The share as a shared mount (so a bind mount the host adds under it later also
    /// reaches a back end in another mount namespace), and the bind mounts under it;
    /// unmounted on drop, before the directories are removed.
    struct SharedMount {
        mounts: Vec<PathBuf>,
    }

    impl SharedMount {
        fn new(share: &Path) -> Result<Self> {
            run_cmd(Command::new("mount").arg("--bind").arg(share).arg(share))?;
            let guard = Self {
                mounts: vec![share.to_path_buf()],
            };
            run_cmd(Command::new("mount").arg("--make-shared").arg(share))?;
            Ok(guard)
        }

        fn bind(&mut self, source: &Path, target: &Path) -> Result<()> {
            run_cmd(Command::new("mount").arg("--bind").arg(source).arg(target))?;
            self.mounts.push(target.to_path_buf());
            Ok(())
        }
    }

    impl Drop for SharedMount {
        fn drop(&mut self) {
            for m in self.mounts.iter().rev() {
                let _ = Command::new("umount").arg(m).output();
            }
        }
    }

    fn names_in(dir: &Path) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    }

    #[test]
    fn share_is_read_write_both_ways_confined_and_sees_bind_mounts_added_after_boot() -> Result<()>
    {
        test_guest::require_qemu_guest_prerequisites()?;
        let dir = RunDir::new("dq-fs")?;
        // world/ holds the secret beside the share; nothing the guest does may read it
        // or create anything in world/ (or at the host's root).
        let world = dir.path().join("world");
        let share = world.join("share");
        let bind_src = world.join("bindsrc");
        std::fs::create_dir_all(&share)?;
        std::fs::create_dir_all(&bind_src)?;
        let secret = marker("SECRET");
        std::fs::write(world.join("secret.txt"), &secret)?;
        std::fs::write(share.join("host-file.txt"), "from-host")?;
        std::fs::write(bind_src.join("late.txt"), "bound-after-boot")?;
        let link = |target: &str, name: &str| std::os::unix::fs::symlink(target, share.join(name));
        link(
            &world.join("secret.txt").display().to_string(),
            "abs-secret",
        )?;
        link("../secret.txt", "rel-secret")?;
        link("../../../../../../../../..", "root-link")?;
        link("/etc", "etc-link")?;
        link("/etc/passwd", "passwd-link")?;
        let mut mounts = SharedMount::new(&share)?;
        let escape = marker("escaped");

        let image = initramfs("devices-fs", FS_SCRIPT, &[])?;
        let mut config = guest_config(dir.path(), "dq-fs", &image, 128)?;
        config.kernel_cmdline = format!("crx.world={} crx.escape={escape}", world.display());
        config.devices.shares = vec![SharedDir {
            tag: "pod".into(),
            host_dir: share.clone(),
        }];
        let start = Instant::now();
        let guest = test_guest::start(&tcg(), &config)?;
        ensure!(
            guest
                .pids()
                .iter()
                .any(|(name, _)| *name == "vhost-user-fs"),
            "no vhost-user-fs back end among the VM's processes: {:?}",
            guest.pids()
        );

        wait_for_line(
            guest.console_path(),
            "CRX-GUEST ready-for-host",
            GUEST_TIMEOUT,
        )?;
        let mid_run = start.elapsed();
        // The guest closed its files: their content is on the host now.
        let guest_file = std::fs::read_to_string(share.join("guest-file.txt"));
        let nested = std::fs::read_to_string(share.join("guest-dir/nested.txt"));
        std::fs::write(share.join("host-late.txt"), "written-mid-run")?;
        std::fs::create_dir(share.join("late"))?;
        mounts.bind(&bind_src, &share.join("late"))?;
        std::fs::write(share.join("bind-done"), "")?;

        let run = guest.wait(GUEST_TIMEOUT)?;
        eprintln!(
            "fs guest: ready for the host at {mid_run:?}, VM ended at {:?}: {}",
            start.elapsed(),
            run.exit
        );
        ensure!(!run.exit.is_failure(), "VM failed: {}", run.exit);
        run.expect("mounted", "yes")?;
        run.expect("host-file", "from-host")?;
        run.expect("guest-wrote", "yes")?;
        ensure!(
            guest_file.as_deref().ok() == Some("from-guest\n"),
            "the guest's file on the host mid-run: {guest_file:?}"
        );
        ensure!(
            nested.as_deref().ok() == Some("nested\n"),
            "the guest's nested file on the host mid-run: {nested:?}"
        );

        // Every path the guest names resolves inside the guest: none reaches the secret.
        ensure!(
            !run.console.contains(&secret),
            "the host's secret outside the share reached the guest: {:#?}",
            run.results()
        );
        for probe in [
            "dotdot",
            "dotdot-host-path",
            "abs-link",
            "rel-link",
            "root-link",
            "passwd-link",
            "hard-link",
            "guest-abs-link",
        ] {
            run.expect(probe, "denied")?;
        }
        // A host link to /etc leads to the guest's own /etc.
        run.expect("etc-link", "read:guest-etc-hostname")?;
        run.expect("escapes-tried", "yes")?;
        ensure!(
            names_in(&world)? == ["bindsrc", "secret.txt", "share"],
            "the guest created something outside the share: {:?}",
            names_in(&world)?
        );
        ensure!(
            !Path::new("/").join(&escape).exists(),
            "the guest created /{escape} on the host"
        );
        ensure!(
            std::fs::read_to_string(world.join("secret.txt"))? == secret,
            "the secret changed"
        );

        run.expect("bind-done-seen", "yes")?;
        run.expect("host-late", "written-mid-run")?;
        run.expect("late-bind", "bound-after-boot")?;
        run.expect("unmounted", "yes")?;
        Ok(())
    }

    /// A vhost-user-fs back end is one of the VM's processes: its death ends the VM,
    /// is reported under its name, and leaves no process or socket behind.
    #[test]
    fn kill_9_of_the_fs_back_end_ends_the_vm_and_names_it() -> Result<()> {
        test_guest::require_qemu_guest_prerequisites()?;
        let dir = RunDir::new("dq-fskill")?;
        let share = dir.path().join("share");
        std::fs::create_dir(&share)?;
        let script =
            "mkdir -p /mnt/s && mount -t virtiofs s /mnt/s && result mounted yes\nsleep 600\n";
        let image = initramfs("devices-fs-kill", script, &[])?;
        let mut config = guest_config(dir.path(), "dq-fskill", &image, 128)?;
        config.devices.shares = vec![SharedDir {
            tag: "s".into(),
            host_dir: share,
        }];
        let guest = test_guest::start(&tcg(), &config)?;
        wait_for_line(guest.console_path(), "CRX-GUEST mounted", GUEST_TIMEOUT)?;
        let fs_pid = guest
            .pids()
            .into_iter()
            .find(|(name, _)| *name == "vhost-user-fs")
            .context("no vhost-user-fs process")?
            .1;
        let killed = Instant::now();
        // SAFETY: kill(2) on the pid of a back end this test's VM started and has not
        // reaped (watched through its pidfd), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(fs_pid as libc::pid_t, libc::SIGKILL) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        let run = guest.wait(Duration::from_secs(20))?;
        eprintln!(
            "fs back end SIGKILL -> VM ended in {:?}: {}",
            killed.elapsed(),
            run.exit
        );
        ensure!(
            run.exit.process == "vhost-user-fs"
                && run.exit.status == ProcessExit::Signal(libc::SIGKILL)
                && run.exit.is_failure(),
            "the VM's end should name the killed fs back end: {}",
            run.exit
        );
        let dir_name = dir.path().display().to_string();
        let left = crx_tests::vm_harness::processes_mentioning(&dir_name);
        ensure!(left.is_empty(), "processes left: {left:?}");
        let sockets = crx_tests::vm_harness::sockets_in(dir.path());
        ensure!(sockets.is_empty(), "sockets left: {sockets:?}");
        Ok(())
    }

    // ---------------------------------------------------------------- benchmark halves

    /// The in-guest benchmark halves the `crx-bench blk|fs|net` subcommands call: each
    /// boots its guest, runs fio or iperf3 there and returns figures. Kept short here;
    /// the benchmarks choose their own sizes.
    #[test]
    fn benchmark_guest_halves_return_figures() -> Result<()> {
        use crx_tests::test_guest::bench::{
            blk_jobs, fio_blk_in_guest, fio_fs_in_guest, fio_on_host, iperf3_in_guest,
            small_file_jobs, FioTarget,
        };
        test_guest::require_qemu_guest_prerequisites()?;
        let dir = RunDir::new("dq-bench")?;
        let timeout = Duration::from_secs(180);

        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 32 << 20])?;
        let t = Instant::now();
        let blk = fio_blk_in_guest(&tcg(), dir.path(), &disk, &blk_jobs(16, 1), timeout)?;
        eprintln!("fio blk in guest ({:?}): {blk:?}", t.elapsed());
        ensure!(
            blk.len() == 3 && blk.iter().all(|f| f.bytes_per_s() > 0.0),
            "blk figures: {blk:?}"
        );

        let share = dir.path().join("share");
        std::fs::create_dir(&share)?;
        let t = Instant::now();
        let fs = fio_fs_in_guest(&tcg(), dir.path(), &share, &small_file_jobs(200), timeout)?;
        eprintln!("fio small files in guest ({:?}): {fs:?}", t.elapsed());
        ensure!(
            fs.len() == 4 && fs.iter().all(|f| f.ops_per_s() > 0.0),
            "fs figures: {fs:?}"
        );
        let host = fio_on_host(FioTarget::Dir(&share), &small_file_jobs(200))?;
        eprintln!("fio small files on the host: {host:?}");

        let ns = NetNs::new(&format!("crx-dqb-{}", std::process::id()))?;
        let tap = ns.tap("crxtap1", "10.78.0.1/24", 1500)?;
        let net = NetDevice {
            tap: Arc::new(tap),
            mac: [0x02, 0xc5, 0, 0, 0, 2],
            mtu: 1500,
        };
        let t = Instant::now();
        let tcp = iperf3_in_guest(
            &tcg(),
            dir.path(),
            net,
            &ns,
            "10.78.0.2/24",
            "10.78.0.1",
            2,
            false,
            timeout,
        )?;
        eprintln!("iperf3 guest -> host ({:?}): {tcp:?}", t.elapsed());
        ensure!(tcp.received_bits_per_s > 0.0, "iperf3 figures: {tcp:?}");
        Ok(())
    }
}
