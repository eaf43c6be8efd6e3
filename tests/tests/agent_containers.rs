//! Containers in a real guest on the QEMU/TCG backend: the container's busybox rootfs
//! lives in the pod share (virtio-fs, crx's vhost-user-fs back end), the agent mounts it
//! as the container's storage, builds the container with libcontainer inside the VM
//! (cgroup v2 with controllers, as in production), and its output comes back on a
//! separate stdio stream through the VMM's hybrid vsock (port 1026, stdio.proto).
//!
//! Needs the artifacts `scripts/test.sh` builds, with the agent built with its
//! `containers` feature, and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_protocols::hybrid_vsock::{self, context_until};
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::container_ttrpc::ContainersClient;
    use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
    use crx_protocols::v1::storage::{Storage, StorageDriver};
    use crx_shim::vm::{QemuAccel, QemuBackend, SharedDir};
    use crx_tests::vm_harness::{self, boot, shutdown, vm_config, RunDir};
    use protobuf::Message as _;

    /// The agent's storage root inside a VM.
    const STORAGE_ROOT: &str = "/run/crx/storage";

    fn secs(n: u64) -> ttrpc::context::Context {
        context_until(Instant::now() + Duration::from_secs(n))
    }

    fn busybox_rootfs(root: &Path) -> Result<()> {
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin)?;
        for dir in ["proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .context("copying /bin/busybox (apt-get install busybox-static)")?;
        for applet in ["sh", "echo", "sleep", "mkdir"] {
            symlink("busybox", bin.join(applet))?;
        }
        Ok(())
    }

    fn spec(args: &[&str], seccomp: &str) -> Vec<u8> {
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"hostname":"crx-vm-test",
              "process":{{"args":[{}],"cwd":"/","env":["PATH=/bin"],
                          "user":{{"uid":0,"gid":0}},"noNewPrivileges":true}},
              "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                        {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}},
                        {{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}}],
              "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]{seccomp}}}}}"#,
            args.join(",")
        )
        .into_bytes()
    }

    /// Opens one stdio stream through the VMM's hybrid vsock and collects it to EOF.
    fn collect(
        uds: &Path,
        id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<JoinHandle<Vec<u8>>> {
        let mut conn: UnixStream = hybrid_vsock::connect(
            uds,
            crx_protocols::STDIO_VSOCK_PORT,
            Duration::from_secs(20),
        )
        .context("connecting to the agent's stdio port")?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut header = StreamHeader::new();
        header.container_id = id.to_owned();
        header.exec_id = exec_id.to_owned();
        header.stream = kind.into();
        let body = header.write_to_bytes()?;
        let mut frame = b"CRXS".to_vec();
        frame.extend_from_slice(&u16::try_from(body.len())?.to_be_bytes());
        frame.extend_from_slice(&body);
        conn.write_all(&frame)?;
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).context("no StreamAccept")?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut body)?;
        let accept = StreamAccept::parse_from_bytes(&body)?;
        ensure!(accept.accepted, "stream refused: {}", accept.error);
        Ok(std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = conn.read_to_end(&mut out);
            out
        }))
    }

    struct Ctx<'a> {
        rt: &'a tokio::runtime::Runtime,
        client: ContainersClient,
        uds: &'a Path,
        share: Storage,
        next: u32,
    }

    impl Ctx<'_> {
        /// Runs one container to its end: (exit status, stdout, stderr).
        fn run(&mut self, args: &[&str], seccomp: &str) -> Result<(u32, String, String)> {
            self.next += 1;
            let id = format!("vm-c{}", self.next);
            let mut req = CreateContainerRequest::new();
            req.container_id = id.clone();
            req.oci_spec = spec(args, seccomp);
            // Each container mounts the pod share at its own mount point (as a storage
            // of its own: RemoveContainer unmounts it again).
            let mount_point = format!("{STORAGE_ROOT}/{id}");
            let mut share = self.share.clone();
            share.mount_point = mount_point.clone();
            req.storages.push(share);
            req.rootfs = format!("{mount_point}/rootfs");
            let mut stdio = StdioSpec::new();
            stdio.stdout = true;
            stdio.stderr = true;
            req.stdio = Some(stdio).into();
            match self
                .rt
                .block_on(self.client.create_container(secs(120), &req))
            {
                Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::UNIMPLEMENTED => bail!(
                    "the initramfs agent was built without its `containers` feature: {}",
                    s.message()
                ),
                r => r.with_context(|| format!("CreateContainer {args:?}"))?,
            };
            let out = collect(self.uds, &id, "", StreamKind::STREAM_KIND_STDOUT)?;
            let err = collect(self.uds, &id, "", StreamKind::STREAM_KIND_STDERR)?;
            let mut start = StartContainerRequest::new();
            start.container_id = id.clone();
            self.rt
                .block_on(self.client.start_container(secs(60), &start))
                .context("StartContainer")?;
            let mut wait = WaitProcessRequest::new();
            wait.container_id = id.clone();
            let exit = self
                .rt
                .block_on(self.client.wait_process(secs(120), &wait))
                .context("WaitProcess")?
                .exit
                .into_option()
                .context("no exit in WaitProcess")?;
            let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            let mut remove = RemoveContainerRequest::new();
            remove.container_id = id;
            self.rt
                .block_on(self.client.remove_container(secs(60), &remove))
                .context("RemoveContainer")?;
            Ok((exit.exit_status, out, err))
        }
    }

    #[test]
    fn containers_run_in_the_guest_from_a_virtio_fs_rootfs() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("agent-containers")?;
        let share = dir.path().join("share");
        busybox_rootfs(&share.join("rootfs"))?;
        let mut config = vm_config(dir.path(), "agent-containers", 1, 256, "")?;
        config.devices.shares = vec![SharedDir {
            tag: "pod".into(),
            host_dir: share.clone(),
        }];
        let (mut vm, agent, _) = boot(&rt, &QemuBackend::new(QemuAccel::Tcg), &config)?;
        let uds = vm.agent_socket().to_path_buf();
        let stream = hybrid_vsock::connect(
            &uds,
            crx_protocols::AGENT_VSOCK_PORT,
            Duration::from_secs(20),
        )?;
        let client = {
            let _in_runtime = rt.enter();
            ContainersClient::new(hybrid_vsock::ttrpc_client(stream)?)
        };
        let mut share_storage = Storage::new();
        share_storage.driver = StorageDriver::STORAGE_DRIVER_VIRTIOFS.into();
        share_storage.source = "pod".into();
        let mut ctx = Ctx {
            rt: &rt,
            client,
            uds: &uds,
            share: share_storage,
            next: 0,
        };

        let (code, out, err) = ctx.run(&["echo", "hi"], "")?;
        ensure!(
            (code, out.as_str()) == (0, "hi\n"),
            "echo: {code} {out:?} {err:?}"
        );
        let (code, _, err) = ctx.run(&["sh", "-c", "exit 3"], "")?;
        ensure!(code == 3, "exit 3 gave {code}: {err:?}");
        let deny = r#","seccomp":{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
        let (code, _, err) = ctx.run(&["mkdir", "/tmp/x"], deny)?;
        ensure!(
            code != 0 && err.contains("Operation not permitted"),
            "mkdir under a profile denying it: {code} {err:?}"
        );

        // A long-running container: exec into it, then SIGKILL gives 137.
        let id = "vm-sleeper";
        let mut req = CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec = spec(&["sleep", "100"], "");
        let mut share = ctx.share.clone();
        share.mount_point = format!("{STORAGE_ROOT}/{id}");
        req.rootfs = format!("{}/rootfs", share.mount_point);
        req.storages.push(share);
        rt.block_on(ctx.client.create_container(secs(120), &req))
            .context("create sleeper")?;
        let mut start = StartContainerRequest::new();
        start.container_id = id.into();
        rt.block_on(ctx.client.start_container(secs(60), &start))
            .context("start sleeper")?;
        let mut exec = ExecProcessRequest::new();
        exec.container_id = id.into();
        exec.exec_id = "e1".into();
        exec.process = br#"{"args":["echo","from exec"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
        let mut stdio = StdioSpec::new();
        stdio.stdout = true;
        exec.stdio = Some(stdio).into();
        rt.block_on(ctx.client.exec_process(secs(30), &exec))
            .context("ExecProcess")?;
        let out = collect(&uds, id, "e1", StreamKind::STREAM_KIND_STDOUT)?;
        let mut start_exec = StartContainerRequest::new();
        start_exec.container_id = id.into();
        start_exec.exec_id = "e1".into();
        rt.block_on(ctx.client.start_container(secs(60), &start_exec))
            .context("start exec")?;
        let mut wait_exec = WaitProcessRequest::new();
        wait_exec.container_id = id.into();
        wait_exec.exec_id = "e1".into();
        let exit = rt
            .block_on(ctx.client.wait_process(secs(120), &wait_exec))?
            .exit
            .into_option()
            .context("no exit")?;
        let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        ensure!(
            (exit.exit_status, out.as_str()) == (0, "from exec\n"),
            "exec: {} {out:?}",
            exit.exit_status
        );
        let mut kill = SignalProcessRequest::new();
        kill.container_id = id.into();
        kill.signal = 9;
        rt.block_on(ctx.client.signal_process(secs(30), &kill))
            .context("SIGKILL")?;
        let mut wait = WaitProcessRequest::new();
        wait.container_id = id.into();
        let exit = rt
            .block_on(ctx.client.wait_process(secs(120), &wait))?
            .exit
            .into_option()
            .context("no exit")?;
        ensure!(
            (exit.exit_status, exit.signal) == (137, 9),
            "SIGKILL gave {exit:?}"
        );
        let mut remove = RemoveContainerRequest::new();
        remove.container_id = id.into();
        rt.block_on(ctx.client.remove_container(secs(60), &remove))
            .context("remove sleeper")?;

        let exit = shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(!exit.is_failure(), "{exit}");
        Ok(())
    }
}
