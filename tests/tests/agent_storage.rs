//! The agent's Storage service (protocol v2) in a real guest on the QEMU/TCG backend:
//! block drives are found by their serial (not by the order the guest numbers them) and
//! mounted; a virtio-fs share served by crx's vhost-user-fs back end is mounted by its
//! tag; wrong requests (unknown tag or serial, a bad fstype, a device without that file
//! system) get errors that name the cause; Shutdown unmounts what the agent mounted.
//!
//! These tests boot real guests; they need the artifacts `scripts/test.sh` builds (the
//! guest kernel, the initramfs with the agent, the static crx-vmm) and e2fsprogs.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_protocols::hybrid_vsock::{context_until, ReadyAgent};
    use crx_protocols::v1::storage::{
        ListStoragesRequest, MountStorageRequest, MountedStorage, Storage, StorageDriver,
        UnmountStorageRequest,
    };
    use crx_shim::vm::{Drive, ProcessExit, QemuAccel, QemuBackend, SharedDir};
    use crx_tests::vm_harness::{self, boot, shutdown, vm_config, RunDir};

    /// The agent's storage root inside a VM.
    const ROOT: &str = "/run/crx/storage";

    fn tcg() -> QemuBackend {
        QemuBackend::new(QemuAccel::Tcg)
    }

    fn run_cmd(cmd: &mut Command) -> Result<String> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A raw file of `mib` MiB, with an ext4 file system holding `files` if asked.
    fn image(path: &Path, mib: u64, ext4_with: Option<&[(&str, &str)]>) -> Result<()> {
        std::fs::File::create(path)?.set_len(mib << 20)?;
        let Some(files) = ext4_with else {
            return Ok(());
        };
        let content = path.with_extension("content");
        std::fs::create_dir_all(&content)?;
        for (name, text) in files {
            std::fs::write(content.join(name), text)?;
        }
        run_cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "crxvol", "-d"])
                .arg(&content)
                .arg(path),
        )?;
        Ok(())
    }

    fn storage(driver: StorageDriver, source: &str, fstype: &str, mp: &str) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = source.to_owned();
        s.fstype = fstype.to_owned();
        s.mount_point = mp.to_owned();
        s
    }

    fn mount(
        rt: &tokio::runtime::Runtime,
        agent: &ReadyAgent,
        s: Storage,
        device_timeout_ms: u32,
    ) -> ttrpc::Result<MountedStorage> {
        let mut req = MountStorageRequest::new();
        req.storage = Some(s).into();
        req.device_timeout_ms = device_timeout_ms;
        let resp = rt.block_on(agent.clients.storage.mount_storage(
            context_until(Instant::now() + Duration::from_secs(60)),
            &req,
        ))?;
        Ok(resp.mounted.into_option().unwrap_or_default())
    }

    /// The code and message of a refused request.
    fn refused(r: ttrpc::Result<MountedStorage>, what: &str) -> Result<(ttrpc::Code, String)> {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => Ok((s.code(), s.message().to_owned())),
            Err(other) => bail!("{what}: expected an error status, got {other:?}"),
            Ok(m) => bail!("{what}: mounted when it should have been refused: {m:?}"),
        }
    }

    fn list(rt: &tokio::runtime::Runtime, agent: &ReadyAgent) -> Result<Vec<String>> {
        Ok(rt
            .block_on(agent.clients.storage.list_storages(
                context_until(Instant::now() + Duration::from_secs(20)),
                &ListStoragesRequest::new(),
            ))?
            .storages
            .iter()
            .map(|m| m.storage.mount_point.clone())
            .collect())
    }

    /// Two drives, so the one asked for is not simply the first disk: serial lookup,
    /// ext4 mount, bad fstype, wrong file system, missing serial; then Shutdown, after
    /// which the ext4 image must show a clean unmount (no `needs_recovery`).
    #[test]
    fn block_drives_are_mounted_by_serial_and_unmounted_at_shutdown() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("agent-storage-blk")?;
        let blank = dir.path().join("blank.img");
        let vol = dir.path().join("vol.img");
        image(&blank, 4, None)?;
        image(&vol, 32, Some(&[("hello.txt", "hello from the host\n")]))?;

        let mut config = vm_config(dir.path(), "agent-storage-blk", 1, 192, "")?;
        config.devices.drives = vec![
            Drive {
                path: Some(blank.clone()),
                read_only: false,
                serial: "crx-blank".into(),
            },
            Drive {
                path: Some(vol.clone()),
                read_only: false,
                serial: "crx-vol-1".into(),
            },
        ];
        let (mut vm, agent, took) = boot(&rt, &tcg(), &config)?;
        eprintln!("spawn -> agent: {took:?}");
        ensure!(
            agent.version.protocol_version >= 2,
            "agent speaks protocol {}, Storage needs 2",
            agent.version.protocol_version
        );

        let block = StorageDriver::STORAGE_DRIVER_BLOCK;
        let mp = format!("{ROOT}/vol");
        let m = mount(&rt, &agent, storage(block, "crx-vol-1", "ext4", &mp), 0)
            .context("mounting the ext4 drive by serial")?;
        eprintln!("mounted: {m:?}");
        ensure!(
            m.device == "/dev/vdb",
            "serial crx-vol-1 is the second drive, got {}",
            m.device
        );
        ensure!(m.kernel_fstype == "ext4", "kernel says {}", m.kernel_fstype);
        // ext4 keeps some of the 32 MiB for itself (journal, tables); the rest is there.
        ensure!(
            m.total_bytes > (16 << 20) && m.total_bytes <= (32 << 20),
            "ext4 reports {} bytes on a 32 MiB drive",
            m.total_bytes
        );

        let cases = [
            (
                "unknown fstype",
                storage(block, "crx-vol-1", "nosuchfs", &format!("{ROOT}/x")),
                ttrpc::Code::INVALID_ARGUMENT,
                "\"nosuchfs\"",
            ),
            (
                "a drive without that file system",
                storage(block, "crx-blank", "ext4", &format!("{ROOT}/blank")),
                ttrpc::Code::INVALID_ARGUMENT,
                "/dev/vda (serial \"crx-blank\") does not hold a valid ext4 file system",
            ),
            (
                "missing serial",
                storage(block, "crx-nope", "ext4", &format!("{ROOT}/nope")),
                ttrpc::Code::NOT_FOUND,
                "vdb (serial \"crx-vol-1\"",
            ),
            (
                "same mount point twice",
                storage(block, "crx-vol-1", "ext4", &mp),
                ttrpc::Code::ALREADY_EXISTS,
                "already mounted",
            ),
        ];
        for (what, s, code, needle) in cases {
            let (got, message) = refused(mount(&rt, &agent, s, 500), what)?;
            eprintln!("{what}: {got:?}: {message}");
            ensure!(got == code, "{what}: {got:?} {message}");
            ensure!(
                message.contains(needle),
                "{what}: {message:?} lacks {needle:?}"
            );
        }
        ensure!(list(&rt, &agent)? == [mp.clone()], "ListStorages disagrees");

        let exit = shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(
            exit.status == ProcessExit::Code(0),
            "VM did not power off cleanly: {exit}"
        );
        // Unmounted before power-off: ext4 clears needs_recovery on a clean unmount.
        let header = run_cmd(Command::new("dumpe2fs").arg("-h").arg(&vol))?;
        let features = header
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or_default();
        ensure!(
            !features.contains("needs_recovery"),
            "the ext4 drive was not unmounted before power-off: {features}"
        );
        Ok(())
    }

    /// The pod share over virtio-fs (crx's vhost-user-fs back end): mounted by tag,
    /// its size is the host directory's file system; an unknown tag is refused by name.
    #[test]
    fn a_virtio_fs_share_is_mounted_by_tag() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("agent-storage-fs")?;
        let share = dir.path().join("share");
        std::fs::create_dir_all(&share)?;
        std::fs::write(share.join("hello.txt"), "hello from the host\n")?;

        let mut config = vm_config(dir.path(), "agent-storage-fs", 1, 192, "")?;
        config.devices.shares = vec![SharedDir {
            tag: "pod".into(),
            host_dir: share.clone(),
        }];
        let (mut vm, agent, _) = boot(&rt, &tcg(), &config)?;

        let virtiofs = StorageDriver::STORAGE_DRIVER_VIRTIOFS;
        let mp = format!("{ROOT}/pod");
        let m = mount(&rt, &agent, storage(virtiofs, "pod", "", &mp), 0)
            .context("mounting the virtio-fs share by tag")?;
        eprintln!("mounted: {m:?}");
        ensure!(
            m.kernel_fstype == "virtiofs",
            "kernel says {}",
            m.kernel_fstype
        );
        ensure!(m.device == "pod", "device {}", m.device);
        // statfs goes to the host through the back end: the same file system's size.
        // stat(1): %b total blocks, %S their size (statvfs f_blocks, f_frsize).
        let host = run_cmd(Command::new("stat").args(["-f", "-c", "%b %S"]).arg(&share))?;
        let host_total = host
            .split_whitespace()
            .map(|n| n.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .product::<u64>();
        ensure!(
            m.total_bytes == host_total,
            "guest sees {} bytes, the host directory's file system has {host_total}",
            m.total_bytes
        );

        let (code, message) = refused(
            mount(
                &rt,
                &agent,
                storage(virtiofs, "no-such-tag", "", &format!("{ROOT}/other")),
                0,
            ),
            "unknown tag",
        )?;
        eprintln!("unknown tag: {code:?}: {message}");
        ensure!(code == ttrpc::Code::NOT_FOUND, "{code:?} {message}");
        ensure!(message.contains("\"no-such-tag\""), "{message}");

        let mut req = UnmountStorageRequest::new();
        req.mount_point = mp.clone();
        rt.block_on(agent.clients.storage.unmount_storage(
            context_until(Instant::now() + Duration::from_secs(20)),
            &req,
        ))
        .context("UnmountStorage")?;
        ensure!(list(&rt, &agent)?.is_empty(), "still listed after unmount");

        let exit = shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(!exit.is_failure(), "{exit}");
        Ok(())
    }
}
