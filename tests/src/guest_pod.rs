//! One pod VM for the agent's container tests: a QEMU/TCG guest whose pod share (virtio-fs,
//! crx's vhost-user-fs back end) holds busybox root file systems, with ttrpc clients for
//! every agent service and the stdio-stream handshake of `stdio.proto`.
//!
//! Tests that need containers in a real guest boot one [`GuestPod`] and run every case in
//! it (a TCG boot costs seconds; a container costs a fraction of one).

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use crx_protocols::hybrid_vsock::{self, context_until, ReadyAgent};
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::ContainersClient;
use crx_protocols::v1::sandbox_ttrpc::SandboxClient;
use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
use crx_protocols::v1::storage::{Storage, StorageDriver};
use crx_shim::vm::{QemuAccel, QemuBackend, SharedDir, Vm, VmConfig};

use crate::vm_harness::{self, boot, shutdown, vm_config, RunDir};

/// The agent's storage root inside a VM.
pub const STORAGE_ROOT: &str = "/run/crx/storage";
/// The virtio-fs tag of the pod share.
pub const SHARE_TAG: &str = "pod";

/// A ttrpc deadline `n` seconds from now.
pub fn secs(n: u64) -> ttrpc::context::Context {
    context_until(Instant::now() + Duration::from_secs(n))
}

/// Busybox applets every test rootfs gets (symlinks to `/bin/busybox`).
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "mkdir", "touch", "id", "ls", "head", "dd", "true", "false",
    "hostname", "stty", "wc", "env", "kill", "ps",
];

/// Builds a busybox root file system at `root` from Debian's busybox-static, with an
/// `/etc/passwd` and `/etc/group` that know `root` (0) and `user` (1000, groups 1000
/// and 2000).
pub fn busybox_rootfs(root: &Path) -> Result<()> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    for dir in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (apt-get install busybox-static)")?;
    for applet in APPLETS {
        let link = bin.join(applet);
        if !link.exists() {
            symlink("busybox", link)?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )?;
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nextra:x:2000:user\n",
    )?;
    Ok(())
}

/// A minimal OCI spec (JSON) running `args` as root with `/proc`, `/dev` and `/tmp`,
/// its own PID, mount, IPC and UTS namespaces. `linux_extra` is spliced into the
/// `linux` object (start it with a comma: `,"seccomp":{...}`), `process_extra` into the
/// `process` object (`,"terminal":true`).
pub fn oci_spec(args: &[&str], process_extra: &str, linux_extra: &str) -> Vec<u8> {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"hostname":"crx-vm-test",
          "process":{{"args":[{}],"cwd":"/","env":["PATH=/bin"],
                      "user":{{"uid":0,"gid":0}},"noNewPrivileges":true{process_extra}}},
          "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                    {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}},
                    {{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}}],
          "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]{linux_extra}}}}}"#,
        args.join(",")
    )
    .into_bytes()
}

/// Opens one stdio stream to the agent through the VMM's hybrid vsock (`uds`) and
/// completes the `CRXS` handshake; the stream's raw bytes follow on the returned socket.
pub fn attach_stream(uds: &Path, id: &str, exec_id: &str, kind: StreamKind) -> Result<UnixStream> {
    let mut conn: UnixStream =
        hybrid_vsock::connect(uds, crx_protocols::STDIO_VSOCK_PORT, Duration::from_secs(20))
            .context("connecting to the agent's stdio port")?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream_handshake(&mut conn, id, exec_id, kind)?;
    Ok(conn)
}

/// The `CRXS` handshake of stdio.proto on a fresh connection to the agent's stdio port
/// (through the VMM, or a host-mode agent's `<socket>_1026`).
pub fn stream_handshake(
    conn: &mut UnixStream,
    id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<()> {
    let mut header = StreamHeader::new();
    header.container_id = id.to_owned();
    header.exec_id = exec_id.to_owned();
    header.stream = kind.into();
    let body = protobuf::Message::write_to_bytes(&header)?;
    let mut frame = b"CRXS".to_vec();
    frame.extend_from_slice(&u16::try_from(body.len())?.to_be_bytes());
    frame.extend_from_slice(&body);
    conn.write_all(&frame)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).context("no StreamAccept")?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut body)?;
    let accept: StreamAccept = protobuf::Message::parse_from_bytes(&body)?;
    ensure!(accept.accepted, "stream refused: {}", accept.error);
    Ok(())
}

/// Attaches a guest → host stream and collects it to EOF on a thread.
pub fn collect(
    uds: &Path,
    id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<JoinHandle<Vec<u8>>> {
    let mut conn = attach_stream(uds, id, exec_id, kind)?;
    Ok(std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out);
        out
    }))
}

/// How one container run ended.
#[derive(Debug)]
pub struct RunResult {
    pub exit: ProcessExit,
    pub stdout: String,
    pub stderr: String,
}

/// A booted pod VM with its share and agent clients.
pub struct GuestPod {
    pub rt: tokio::runtime::Runtime,
    pub vm: Box<dyn Vm>,
    pub agent: ReadyAgent,
    pub containers: ContainersClient,
    pub sandbox: SandboxClient,
    /// The VMM's hybrid-vsock socket (ttrpc and stdio streams go through it).
    pub uds: PathBuf,
    /// The host side of the pod share; `share/rootfs` is a busybox rootfs.
    pub share: PathBuf,
    next: u32,
    // Last: removed after the VM is gone.
    _dir: RunDir,
}

impl GuestPod {
    /// Boots a pod VM named `name` (QEMU/TCG, 1 vCPU, `memory_mib`) with a busybox
    /// rootfs in its share; `adjust` may change the VM config (devices, cmdline) first.
    pub fn boot(
        name: &str,
        memory_mib: u32,
        adjust: impl FnOnce(&Path, &mut VmConfig) -> Result<()>,
    ) -> Result<GuestPod> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new(name)?;
        let share = dir.path().join("share");
        busybox_rootfs(&share.join("rootfs"))?;
        let mut config = vm_config(dir.path(), name, 1, memory_mib, "")?;
        config.devices.shares = vec![SharedDir {
            tag: SHARE_TAG.into(),
            host_dir: share.clone(),
        }];
        adjust(dir.path(), &mut config)?;
        let (vm, agent, _) = boot(&rt, &QemuBackend::new(QemuAccel::Tcg), &config)?;
        let uds = vm.agent_socket().to_path_buf();
        let (containers, sandbox) = {
            let connect = || {
                hybrid_vsock::connect(&uds, crx_protocols::AGENT_VSOCK_PORT, Duration::from_secs(20))
            };
            let _in_runtime = rt.enter();
            (
                ContainersClient::new(hybrid_vsock::ttrpc_client(connect()?)?),
                SandboxClient::new(hybrid_vsock::ttrpc_client(connect()?)?),
            )
        };
        Ok(GuestPod {
            rt,
            vm,
            agent,
            containers,
            sandbox,
            uds,
            share,
            next: 0,
            _dir: dir,
        })
    }

    /// A fresh container id.
    pub fn next_id(&mut self) -> String {
        self.next += 1;
        format!("c{}", self.next)
    }

    /// The pod share as a storage of container `id` (its own mount point, so
    /// RemoveContainer unmounts it again) and the guest rootfs path inside it.
    pub fn share_storage(&self, id: &str) -> (Storage, String) {
        let mut share = Storage::new();
        share.driver = StorageDriver::STORAGE_DRIVER_VIRTIOFS.into();
        share.source = SHARE_TAG.into();
        share.mount_point = format!("{STORAGE_ROOT}/{id}");
        let rootfs = format!("{}/rootfs", share.mount_point);
        (share, rootfs)
    }

    /// CreateContainer for `id` with `spec` on the share's busybox rootfs.
    pub fn create(&self, id: &str, spec: Vec<u8>, stdio: StdioSpec) -> Result<CreateContainerResponse> {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.to_owned();
        req.oci_spec = spec;
        let (share, rootfs) = self.share_storage(id);
        req.storages.push(share);
        req.rootfs = rootfs;
        req.stdio = Some(stdio).into();
        match self.rt.block_on(self.containers.create_container(secs(120), &req)) {
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::UNIMPLEMENTED => bail!(
                "the initramfs agent was built without its `containers` feature: {}",
                s.message()
            ),
            r => r.with_context(|| format!("CreateContainer {id}")),
        }
    }

    /// StartContainer for (`id`, `exec_id`).
    pub fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let mut req = StartContainerRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        Ok(self
            .rt
            .block_on(self.containers.start_container(secs(60), &req))
            .with_context(|| format!("StartContainer {id}/{exec_id}"))?
            .pid)
    }

    /// WaitProcess for (`id`, `exec_id`).
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<ProcessExit> {
        let mut req = WaitProcessRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.rt
            .block_on(self.containers.wait_process(secs(120), &req))
            .with_context(|| format!("WaitProcess {id}/{exec_id}"))?
            .exit
            .into_option()
            .context("WaitProcess answered without an exit")
    }

    /// RemoveContainer for `id`.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.to_owned();
        req.force = force;
        self.rt
            .block_on(self.containers.remove_container(secs(60), &req))
            .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    /// Runs one container with `spec` to its end (stdout and stderr collected) and
    /// removes it.
    pub fn run(&mut self, spec: Vec<u8>) -> Result<RunResult> {
        let id = self.next_id();
        let mut stdio = StdioSpec::new();
        stdio.stdout = true;
        stdio.stderr = true;
        self.create(&id, spec, stdio)?;
        let out = collect(&self.uds, &id, "", StreamKind::STREAM_KIND_STDOUT)?;
        let err = collect(&self.uds, &id, "", StreamKind::STREAM_KIND_STDERR)?;
        self.start(&id, "")?;
        let exit = self.wait(&id, "")?;
        let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        self.remove(&id, false)?;
        Ok(RunResult {
            exit,
            stdout,
            stderr,
        })
    }

    /// Asks the agent to power off and checks the VM ended cleanly.
    pub fn shut_down(mut self) -> Result<()> {
        let exit = shutdown(&self.rt, self.vm.as_mut(), &self.agent)?;
        ensure!(!exit.is_failure(), "{exit}");
        Ok(())
    }
}
