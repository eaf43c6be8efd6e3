//! What the host-mode container tests share: an agent in its own mount namespace with
//! a busybox rootfs beside it (`Rig`), its ttrpc client, the stdio-stream handshake of
//! stdio.proto, and minimal OCI specs.
//!
//! This host is cgroup v1, and the agent is built for cgroup v2 only, so each agent runs
//! in a private mount namespace with a controller-less cgroup2 mounted on
//! /sys/fs/cgroup. Needs root and Debian's busybox-static (`/bin/busybox`).
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crx_protocols::hybrid_vsock::{context_until, ttrpc_client, wait_for_agent, AgentAddress};
use crx_protocols::v1::container::*;
use crx_protocols::v1::container_ttrpc::ContainersClient;
use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
use protobuf::Message as _;

pub const AGENT: &str = env!("CARGO_BIN_EXE_crx-agent");
pub const BUSYBOX: &str = "/bin/busybox";
static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A host-mode agent in its own mount namespace, with a busybox rootfs beside it.
pub struct Rig {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub rootfs: PathBuf,
    pub child: Child,
    pub client: ContainersClient,
    pub rt: tokio::runtime::Runtime,
}

/// A host-mode agent process, before any client is made.
pub struct Launched {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub rootfs: PathBuf,
    pub child: Child,
    pub rt: tokio::runtime::Runtime,
    /// One ttrpc connection to the agent, up and answering.
    pub client: ttrpc::r#async::Client,
}

/// Starts an agent in a private mount namespace after the shell command `setup` (e.g.
/// mounting a cgroup2), with a busybox rootfs in a fresh directory named after
/// `prefix`, and waits until it answers.
pub fn launch(prefix: &str, setup: &str) -> Launched {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing (Debian's busybox-static)"
    );
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let socket = dir.join("agent.sock");
    let script = format!(
        "{setup} && exec {AGENT} --listen unix://{} --state-dir {} --log warn",
        socket.display(),
        dir.join("state").display()
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = AgentAddress::Unix(socket.clone());
    let client = rt.block_on(async {
        wait_for_agent(&addr, Instant::now() + Duration::from_secs(20))
            .await
            .expect("agent did not come up");
        ttrpc_client(UnixStream::connect(&socket).unwrap()).unwrap()
    });
    Launched {
        dir,
        socket,
        rootfs,
        child,
        rt,
        client,
    }
}

/// Mounts a controller-less cgroup2 for the agent (the host is cgroup v1).
pub const CGROUP2_SETUP: &str = "mount -t cgroup2 none /sys/fs/cgroup";

impl Rig {
    pub fn start() -> Rig {
        let l = launch("crx-agent-ctr", CGROUP2_SETUP);
        let client = {
            let _in_runtime = l.rt.enter();
            ContainersClient::new(l.client)
        };
        Rig {
            dir: l.dir,
            socket: l.socket,
            rootfs: l.rootfs,
            child: l.child,
            client,
            rt: l.rt,
        }
    }

    pub fn stdio_socket(&self) -> PathBuf {
        let mut name = self.socket.clone().into_os_string();
        name.push("_1026");
        PathBuf::from(name)
    }

    pub fn create(
        &self,
        id: &str,
        spec: &[u8],
        stdio: (bool, bool, bool),
    ) -> ttrpc::Result<CreateContainerResponse> {
        let mut s = StdioSpec::new();
        (s.stdin, s.stdout, s.stderr) = stdio;
        self.create_with(id, spec, s)
    }

    pub fn create_with(
        &self,
        id: &str,
        spec: &[u8],
        stdio: StdioSpec,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.to_owned();
        req.oci_spec = spec.to_vec();
        req.rootfs = self.rootfs.display().to_string();
        req.stdio = Some(stdio).into();
        self.rt
            .block_on(self.client.create_container(secs(30), &req))
    }

    pub fn start_init(&self, id: &str) -> ttrpc::Result<StartContainerResponse> {
        self.start_process(id, "")
    }

    pub fn start_process(&self, id: &str, exec_id: &str) -> ttrpc::Result<StartContainerResponse> {
        let mut req = StartContainerRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.rt
            .block_on(self.client.start_container(secs(30), &req))
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        stdout: bool,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let mut s = StdioSpec::new();
        s.stdout = stdout;
        self.exec_with(id, exec_id, &process_json(args, ""), s)
    }

    pub fn exec_with(
        &self,
        id: &str,
        exec_id: &str,
        process: &str,
        stdio: StdioSpec,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.process = process.as_bytes().to_vec();
        req.stdio = Some(stdio).into();
        self.rt.block_on(self.client.exec_process(secs(10), &req))
    }

    pub fn wait(&self, id: &str, limit: u64) -> ttrpc::Result<ProcessExit> {
        self.wait_exec(id, "", limit)
    }

    pub fn wait_exec(&self, id: &str, exec_id: &str, limit: u64) -> ttrpc::Result<ProcessExit> {
        let mut req = WaitProcessRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        let resp = self
            .rt
            .block_on(self.client.wait_process(secs(limit), &req))?;
        Ok(resp
            .exit
            .into_option()
            .expect("WaitProcess answered without an exit"))
    }

    pub fn signal(&self, id: &str, signal: u32) -> ttrpc::Result<SignalProcessResponse> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.to_owned();
        req.signal = signal;
        self.rt.block_on(self.client.signal_process(secs(10), &req))
    }

    pub fn remove(&self, id: &str, force: bool) -> ttrpc::Result<RemoveContainerResponse> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.to_owned();
        req.force = force;
        self.rt
            .block_on(self.client.remove_container(secs(30), &req))
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        let mut req = ResizeTtyRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.rows = rows;
        req.cols = cols;
        self.rt.block_on(self.client.resize_tty(secs(10), &req))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> ttrpc::Result<CloseStdinResponse> {
        let mut req = CloseStdinRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.rt.block_on(self.client.close_stdin(secs(10), &req))
    }

    /// Attaches one stream of (`id`, `exec_id`).
    pub fn attach(&self, id: &str, exec_id: &str, kind: StreamKind) -> Result<UnixStream, String> {
        attach(&self.stdio_socket(), id, exec_id, kind)
    }

    /// Attaches an output stream and collects it to EOF on a thread.
    pub fn collect(&self, id: &str, kind: StreamKind) -> JoinHandle<Vec<u8>> {
        self.collect_exec(id, "", kind)
    }

    pub fn collect_exec(&self, id: &str, exec_id: &str, kind: StreamKind) -> JoinHandle<Vec<u8>> {
        let mut conn = attach(&self.stdio_socket(), id, exec_id, kind).expect("stream refused");
        std::thread::spawn(move || {
            let mut out = Vec::new();
            conn.read_to_end(&mut out).unwrap();
            out
        })
    }

    /// Creates, attaches stdout+stderr, starts and waits: (exit, stdout, stderr).
    pub fn run(&self, spec: &str) -> (ProcessExit, String, String) {
        let id = unique("c");
        self.create(&id, spec.as_bytes(), (false, true, true))
            .unwrap();
        let out = self.collect(&id, StreamKind::STREAM_KIND_STDOUT);
        let err = self.collect(&id, StreamKind::STREAM_KIND_STDERR);
        self.start_init(&id).unwrap();
        let exit = self.wait(&id, 30).unwrap();
        let out = String::from_utf8(out.join().unwrap()).unwrap();
        let err = String::from_utf8(err.join().unwrap()).unwrap();
        self.remove(&id, false).unwrap();
        (exit, out, err)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn secs(n: u64) -> ttrpc::context::Context {
    context_until(Instant::now() + Duration::from_secs(n))
}

pub fn busybox_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for dir in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, bin.join("busybox")).unwrap();
    for applet in [
        "sh", "echo", "sleep", "mkdir", "ls", "cat", "true", "id", "stty", "head", "tee", "dd",
        "crc32", "tty", "hostname", "readlink", "ip", "pidof",
    ] {
        symlink("busybox", bin.join(applet)).unwrap();
    }
}

/// A minimal spec running `args`, optionally with a seccomp section.
pub fn spec(args: &[&str], seccomp: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2",
          "root":{{"path":"rootfs"}},
          "hostname":"crx-test",
          "process":{{"args":[{}],"cwd":"/","env":["PATH=/bin"],
                      "user":{{"uid":0,"gid":0}},"noNewPrivileges":true}},
          "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                    {{"destination":"/dev","type":"tmpfs","source":"tmpfs",
                      "options":["nosuid","mode=755","size=1024k"]}},
                    {{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["size=1024k"]}}],
          "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]
                    {seccomp}}}}}"#,
        args.join(",")
    )
}

/// A spec with the container's own devpts (as runtimes give every container), where
/// libcontainer makes the ptys of the init (with `terminal`) and of its execs.
pub fn devpts_spec(args: &[&str], terminal: bool) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2",
          "root":{{"path":"rootfs"}},
          "hostname":"crx-test",
          "process":{{"terminal":{terminal},"args":[{}],"cwd":"/","env":["PATH=/bin","TERM=dumb"],
                      "user":{{"uid":0,"gid":0}},"noNewPrivileges":true}},
          "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                    {{"destination":"/dev","type":"tmpfs","source":"tmpfs",
                      "options":["nosuid","mode=755","size=1024k"]}},
                    {{"destination":"/dev/pts","type":"devpts","source":"devpts",
                      "options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]}},
                    {{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["size=1024k"]}}],
          "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}}}}"#,
        args.join(",")
    )
}

/// An exec's OCI Process object; `extra` is spliced in (`,"terminal":true`).
pub fn process_json(args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"args":[{}],"cwd":"/","env":["PATH=/bin"],"user":{{"uid":0,"gid":0}}{extra}}}"#,
        args.join(",")
    )
}

pub fn attach(
    stdio_socket: &Path,
    id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<UnixStream, String> {
    let mut conn = UnixStream::connect(stdio_socket).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut header = StreamHeader::new();
    header.container_id = id.to_owned();
    header.exec_id = exec_id.to_owned();
    header.stream = kind.into();
    let body = header.write_to_bytes().unwrap();
    let mut frame = b"CRXS".to_vec();
    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
    frame.extend_from_slice(&body);
    conn.write_all(&frame).unwrap();
    let accept = read_accept(&mut conn)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    if accept.accepted {
        Ok(conn)
    } else {
        Err(accept.error)
    }
}

pub fn read_accept(conn: &mut UnixStream) -> Result<StreamAccept, String> {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)
        .map_err(|e| format!("no accept frame: {e}"))?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut body).map_err(|e| e.to_string())?;
    StreamAccept::parse_from_bytes(&body).map_err(|e| e.to_string())
}

pub fn code(result: ttrpc::Result<impl std::fmt::Debug>) -> (ttrpc::Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
