//! The agent binary in host mode (an ordinary process on a Unix socket), driven through
//! the generated ttrpc clients exactly as the shim will drive it inside a VM.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use crx_protocols::hybrid_vsock::{context_until, wait_for_agent, AgentAddress, ReadyAgent};
    use crx_protocols::v1::agent::ShutdownRequest;
    use crx_protocols::v1::health::check_response::ServingStatus;
    use crx_protocols::v1::health::CheckRequest;

    const AGENT: &str = env!("CARGO_BIN_EXE_crx-agent");

    /// A temp dir and the agent process serving in it; both cleaned up on drop.
    struct HostAgent {
        dir: PathBuf,
        socket: PathBuf,
        child: Option<Child>,
    }

    impl HostAgent {
        fn start() -> HostAgent {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "crx-agent-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let socket = dir.join("agent.sock");
            let mut agent = HostAgent {
                dir,
                socket,
                child: None,
            };
            agent.child = Some(spawn_agent(&agent.socket));
            agent
        }

        fn addr(&self) -> AgentAddress {
            AgentAddress::Unix(self.socket.clone())
        }

        fn child(&mut self) -> &mut Child {
            self.child.as_mut().unwrap()
        }

        /// Waits for the agent process to end, failing after `limit`.
        fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.child().try_wait().unwrap() {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "agent still running after {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl Drop for HostAgent {
        fn drop(&mut self) {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn spawn_agent(socket: &Path) -> Child {
        Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn ready(addr: &AgentAddress) -> ReadyAgent {
        wait_for_agent(addr, Instant::now() + Duration::from_secs(20))
            .await
            .expect("agent did not come up")
    }

    fn secs(n: u64) -> ttrpc::context::Context {
        context_until(Instant::now() + Duration::from_secs(n))
    }

    #[test]
    fn check_and_version_describe_the_running_agent() {
        let agent = HostAgent::start();
        runtime().block_on(async {
            let ready = ready(&agent.addr()).await;
            let check = ready
                .clients
                .health
                .check(secs(5), &CheckRequest::new())
                .await
                .unwrap();
            assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));

            let v = ready.version;
            assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
            assert_eq!(v.protocol_version, crx_protocols::PROTOCOL_VERSION);
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            assert_eq!(v.kernel_release, release.trim());
            let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
            let expected = online
                .trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b.parse::<u32>().unwrap() - a.parse::<u32>().unwrap() + 1,
                    None => 1,
                })
                .sum::<u32>();
            assert_eq!(v.online_cpus, expected);
        });
    }

    #[test]
    fn shutdown_replies_then_the_process_exits_cleanly() {
        let mut agent = HostAgent::start();
        runtime().block_on(async {
            let ready = ready(&agent.addr()).await;
            ready
                .clients
                .agent
                .shutdown(secs(5), &ShutdownRequest::new())
                .await
                .expect("Shutdown must be answered before the agent goes away");
        });
        let status = agent.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "agent exited with {status}");
        assert!(!agent.socket.exists(), "socket file left behind");
    }

    #[test]
    fn sigterm_stops_the_agent_and_removes_its_socket() {
        let mut agent = HostAgent::start();
        runtime().block_on(async {
            ready(&agent.addr()).await;
        });
        let pid = agent.child().id() as libc::pid_t;
        // SAFETY: kill with a pid we spawned and still own (not yet waited for).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = agent.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "agent exited with {status}");
        assert!(!agent.socket.exists(), "socket file left behind");
    }

    #[test]
    fn unknown_methods_and_services_get_errors_not_hangs() {
        let agent = HostAgent::start();
        runtime().block_on(async {
            let ready = ready(&agent.addr()).await;
            // The generated clients cannot name a method that does not exist; speak
            // ttrpc by hand on a fresh connection.
            let stream = UnixStream::connect(&agent.socket).unwrap();
            let client = crx_protocols::hybrid_vsock::ttrpc_client(stream).unwrap();
            for (service, method, code) in [
                (
                    crx_protocols::service_names::HEALTH,
                    "NoSuchMethod",
                    ttrpc::Code::UNIMPLEMENTED,
                ),
                (
                    "crx.agent.v1.NoSuchService",
                    "Check",
                    ttrpc::Code::INVALID_ARGUMENT,
                ),
            ] {
                let mut req = ttrpc::Request::new();
                req.service = service.to_owned();
                req.method = method.to_owned();
                req.timeout_nano = Duration::from_secs(5).as_nanos() as i64;
                let started = Instant::now();
                let err = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                    .await
                    .expect("no answer: the request hung")
                    .expect_err("unknown method answered OK");
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "answered only at the deadline"
                );
                match err {
                    ttrpc::Error::RpcStatus(status) => {
                        assert_eq!(status.code(), code, "{service}/{method}: {status:?}")
                    }
                    other => panic!("{service}/{method}: expected an RPC status, got {other:?}"),
                }
            }
            // The agent is still fine.
            ready
                .clients
                .health
                .check(secs(5), &CheckRequest::new())
                .await
                .unwrap();
        });
    }

    /// Every Containers method of protocol version 3 answers an empty request with an
    /// error that names its cause (or, built without the `containers` feature, with
    /// UNIMPLEMENTED naming the method): never OK for nothing, never the generated
    /// NOT_FOUND default, never a hang. GetEvents is a long poll: with nothing to report
    /// it answers an empty list just before the request's deadline.
    #[test]
    fn container_methods_answer_empty_requests_with_a_named_error() {
        let agent = HostAgent::start();
        runtime().block_on(async {
            ready(&agent.addr()).await;
            let stream = UnixStream::connect(&agent.socket).unwrap();
            let client = crx_protocols::hybrid_vsock::ttrpc_client(stream).unwrap();
            let methods = [
                "CreateContainer",
                "StartContainer",
                "ExecProcess",
                "SignalProcess",
                "WaitProcess",
                "ResizeTty",
                "CloseStdin",
                "RemoveContainer",
                "UpdateContainer",
                "PauseContainer",
                "ResumeContainer",
                "StatsContainer",
                "ListPids",
                "GetEvents",
            ];
            for method in methods {
                let mut req = ttrpc::Request::new();
                req.service = crx_protocols::service_names::CONTAINERS.to_owned();
                req.method = method.to_owned();
                req.timeout_nano = Duration::from_secs(2).as_nanos() as i64;
                let started = std::time::Instant::now();
                let answer = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                    .await
                    .expect("no answer: the request hung");
                let implemented = cfg!(feature = "containers");
                match answer {
                    Ok(_) if implemented && method == "GetEvents" => {
                        assert!(
                            started.elapsed() < Duration::from_secs(2),
                            "GetEvents answered after the request's deadline"
                        );
                    }
                    Ok(_) => panic!("{method}: an empty request answered OK"),
                    Err(ttrpc::Error::RpcStatus(status)) if implemented => {
                        assert!(
                            matches!(
                                status.code(),
                                ttrpc::Code::INVALID_ARGUMENT
                                    | ttrpc::Code::NOT_FOUND
                                    | ttrpc::Code::FAILED_PRECONDITION
                            ),
                            "{method}: {status:?}"
                        );
                        assert!(!status.message().is_empty(), "{method}");
                    }
                    Err(ttrpc::Error::RpcStatus(status)) => {
                        assert_eq!(
                            status.code(),
                            ttrpc::Code::UNIMPLEMENTED,
                            "{method}: {status:?}"
                        );
                        assert!(status.message().contains(method), "{method}: {status:?}");
                    }
                    Err(other) => panic!("{method}: expected an RPC status, got {other:?}"),
                }
            }
        });
    }

    #[test]
    fn garbage_on_a_connection_does_not_hurt_the_agent() {
        let mut agent = HostAgent::start();
        runtime().block_on(async {
            let ready = ready(&agent.addr()).await;
            let mut junk = UnixStream::connect(&agent.socket).unwrap();
            // A ttrpc header claiming a 4 GiB payload, then noise.
            junk.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0])
                .unwrap();
            junk.write_all(&[0x5a; 4096]).unwrap();
            drop(junk);
            ready
                .clients
                .health
                .check(secs(5), &CheckRequest::new())
                .await
                .unwrap();
        });
        assert!(agent.child().try_wait().unwrap().is_none(), "agent died");
    }

    #[test]
    fn a_stale_socket_file_is_replaced_but_a_live_one_is_not() {
        let mut first = HostAgent::start();
        runtime().block_on(async {
            ready(&first.addr()).await;
        });
        // A second agent on the same live socket refuses, with a reason.
        let second = Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix://{}", first.socket.display()))
            .output()
            .unwrap();
        assert!(!second.status.success());
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(stderr.contains("already listening"), "{stderr}");

        // Kill the first one hard: its socket file stays behind, stale.
        first.child().kill().unwrap();
        first.wait_exit(Duration::from_secs(10));
        assert!(first.socket.exists());
        first.child = Some(spawn_agent(&first.socket));
        runtime().block_on(async {
            ready(&first.addr()).await;
        });
    }

    #[test]
    fn host_mode_without_listen_explains_itself() {
        let out = Command::new(AGENT).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--listen"), "{stderr}");
    }

    /// As PID 1 of a PID namespace on the host, `--listen unix://` still means host
    /// mode: no mounts over the host's, no port writes. (Own mount namespace too, so a
    /// regression cannot touch this machine's /proc.)
    #[test]
    fn pid1_with_a_unix_listen_address_stays_in_host_mode() {
        if Command::new("unshare").arg("--version").output().is_err() {
            eprintln!("skipped: unshare(1) not installed");
            return;
        }
        let mut agent = HostAgent::start();
        agent.child().kill().unwrap();
        agent.wait_exit(Duration::from_secs(10));
        agent.child = Some(
            Command::new("unshare")
                .args(["--pid", "--fork", "--mount", "--kill-child"])
                .arg(AGENT)
                .arg("--listen")
                .arg(format!("unix://{}", agent.socket.display()))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        runtime().block_on(async {
            let ready = ready(&agent.addr()).await;
            ready
                .clients
                .agent
                .shutdown(secs(5), &ShutdownRequest::new())
                .await
                .unwrap();
        });
        let status = agent.wait_exit(Duration::from_secs(10));
        let mut stderr = String::new();
        agent
            .child()
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "{status}: {stderr}");
        assert!(stderr.contains("serving (host mode)"), "{stderr}");
    }

    /// The full host path of a VM: hybrid-vsock handshake in front of the agent. The
    /// stand-in VMM answers CONNECT for port 1024 by splicing to the host-mode agent.
    #[test]
    fn reachable_through_a_hybrid_vsock_handshake() {
        let agent = HostAgent::start();
        let vmm_socket = agent.dir.join("vm.vsock");
        let listener = UnixListener::bind(&vmm_socket).unwrap();
        let agent_socket = agent.socket.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut host) = conn else { return };
                let agent_socket = agent_socket.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while host.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    if line != b"CONNECT 1024" {
                        return; // Nothing listens there: close, as a VMM would.
                    }
                    let Ok(guest) = UnixStream::connect(&agent_socket) else {
                        return;
                    };
                    host.write_all(b"OK 49152\n").unwrap();
                    let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
                    std::thread::spawn(move || std::io::copy(&mut g2, &mut h2));
                    let (mut host, mut guest) = (host, guest);
                    let _ = std::io::copy(&mut host, &mut guest);
                });
            }
        });
        runtime().block_on(async {
            let ready = ready(&AgentAddress::HybridVsock {
                uds_path: vmm_socket.clone(),
                port: 1024,
            })
            .await;
            assert_eq!(
                ready.version.protocol_version,
                crx_protocols::PROTOCOL_VERSION
            );

            // A port nobody listens on is an error, not a hang.
            let err = wait_for_agent(
                &AgentAddress::HybridVsock {
                    uds_path: vmm_socket.clone(),
                    port: 1025,
                },
                Instant::now() + Duration::from_millis(300),
            )
            .await
            .err()
            .expect("port 1025 answered");
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
            assert!(
                err.to_string()
                    .contains("closed the hybrid-vsock connection"),
                "{err}"
            );
        });
    }

    /// Installs (in the child about to exec the agent) a seccomp filter that makes
    /// `prctl(PR_SET_CHILD_SUBREAPER, ..)` fail with EPERM and allows everything else.
    fn deny_subreaper() -> std::io::Result<()> {
        #[cfg(target_arch = "x86_64")]
        const AUDIT_ARCH: u32 = 0xC000_003E;
        #[cfg(target_arch = "aarch64")]
        const AUDIT_ARCH: u32 = 0xC000_00B7;
        const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
        const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
        const RET_K: u16 = 0x06; // BPF_RET | BPF_K
        const RET_ALLOW: u32 = 0x7fff_0000;
        const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
        let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
        let filter = [
            op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
            op(JEQ_K, 0, 5, AUDIT_ARCH),
            op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
            op(JEQ_K, 0, 3, libc::SYS_prctl as u32),
            op(LD_W_ABS, 0, 0, 16), // low half of seccomp_data.args[0]
            op(JEQ_K, 0, 1, libc::PR_SET_CHILD_SUBREAPER as u32),
            op(RET_K, 0, 0, RET_EPERM),
            op(RET_K, 0, 0, RET_ALLOW),
        ];
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: plain prctl calls; `program` points at `filter`, alive for the call.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    #[test]
    fn an_agent_that_cannot_become_a_subreaper_refuses_to_start() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("crx-agent-nosub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new(AGENT);
        command
            .arg("--listen")
            .arg(format!("unix://{}", dir.join("agent.sock").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes async-signal-safe prctl calls.
        unsafe { command.pre_exec(deny_subreaper) };
        let child = command.spawn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent kept running without being a subreaper")
            .unwrap();
        let never_listened = !dir.join("agent.sock").exists();
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "exit {:?}", output.status);
        assert!(
            stderr.contains("subreaper") && stderr.contains("Operation not permitted"),
            "{stderr}"
        );
        assert!(never_listened, "the agent bound its socket before refusing");
    }
}
