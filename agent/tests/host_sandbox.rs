//! The pod sandbox in host mode: the agent binary on a Unix socket, in a private mount
//! namespace with a controller-less cgroup2 (as in host_containers.rs), runs busybox
//! containers inside the pod's own new UTS/IPC/network (and, when shared, PID)
//! namespaces. The host's hostname and network must never change. Needs root and
//! Debian's busybox-static (`/bin/busybox`).
#![cfg(feature = "containers")]

mod common;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::Child;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use crx_protocols::v1::container::*;
    use crx_protocols::v1::container_ttrpc::ContainersClient;
    use crx_protocols::v1::sandbox::*;
    use crx_protocols::v1::sandbox_ttrpc::SandboxClient;
    use crx_protocols::v1::stdio::{StreamAccept, StreamHeader, StreamKind};
    use protobuf::Message as _;

    use crate::common::{code, launch, secs, unique, CGROUP2_SETUP};

    /// A host-mode agent in its own mount namespace, with a busybox rootfs beside it.
    struct Rig {
        dir: PathBuf,
        socket: PathBuf,
        rootfs: PathBuf,
        child: Child,
        containers: ContainersClient,
        sandbox: SandboxClient,
        rt: tokio::runtime::Runtime,
    }

    impl Rig {
        fn start() -> Rig {
            let l = launch("crx-agent-sbx", CGROUP2_SETUP);
            let (containers, sandbox) = {
                let _in_runtime = l.rt.enter();
                (
                    ContainersClient::new(l.client.clone()),
                    SandboxClient::new(l.client),
                )
            };
            Rig {
                dir: l.dir,
                socket: l.socket,
                rootfs: l.rootfs,
                child: l.child,
                containers,
                sandbox,
                rt: l.rt,
            }
        }

        fn create_sandbox(
            &self,
            req: &CreateSandboxRequest,
        ) -> ttrpc::Result<CreateSandboxResponse> {
            self.rt.block_on(self.sandbox.create_sandbox(secs(30), req))
        }

        fn destroy_sandbox(&self, grace_ms: u32) -> ttrpc::Result<DestroySandboxResponse> {
            let mut req = DestroySandboxRequest::new();
            req.grace_period_ms = grace_ms;
            self.rt
                .block_on(self.sandbox.destroy_sandbox(secs(90), &req))
        }

        /// The agent's mount table (its mount namespace is private).
        fn agent_mounts(&self) -> String {
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id())).unwrap()
        }

        fn stdio_socket(&self) -> PathBuf {
            let mut name = self.socket.clone().into_os_string();
            name.push("_1026");
            PathBuf::from(name)
        }

        fn create(
            &self,
            id: &str,
            spec: &str,
            stdout: bool,
        ) -> ttrpc::Result<CreateContainerResponse> {
            let mut req = CreateContainerRequest::new();
            req.container_id = id.to_owned();
            req.oci_spec = spec.as_bytes().to_vec();
            req.rootfs = self.rootfs.display().to_string();
            let mut s = StdioSpec::new();
            s.stdout = stdout;
            req.stdio = Some(s).into();
            self.rt
                .block_on(self.containers.create_container(secs(30), &req))
        }

        fn start_container(&self, id: &str) -> ttrpc::Result<StartContainerResponse> {
            let mut req = StartContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.containers.start_container(secs(30), &req))
        }

        fn wait(&self, id: &str, limit: u64) -> ttrpc::Result<WaitProcessResponse> {
            let mut req = WaitProcessRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.containers.wait_process(secs(limit), &req))
        }

        fn remove(&self, id: &str) -> ttrpc::Result<RemoveContainerResponse> {
            let mut req = RemoveContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.containers.remove_container(secs(30), &req))
        }

        /// Runs `sh -c script` in a new container to its end: (exit status, stdout).
        fn run(&self, script: &str) -> (u32, String) {
            let id = unique("c");
            self.create(&id, &spec(&["sh", "-c", script]), true)
                .unwrap();
            let out = collect(&self.stdio_socket(), &id);
            self.start_container(&id).unwrap();
            let exit = self.wait(&id, 30).unwrap().exit.unwrap();
            let out = String::from_utf8(out.join().unwrap()).unwrap();
            self.remove(&id).unwrap();
            (exit.exit_status, out)
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A minimal spec running `args` with its own PID, mount, IPC and UTS namespaces
    /// and a hostname of its own (which the pod's must override).
    fn spec(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        format!(
            r#"{{"ociVersion":"1.0.2",
              "root":{{"path":"rootfs"}},
              "hostname":"container-own-name",
              "process":{{"args":[{}],"cwd":"/","env":["PATH=/bin"],
                          "user":{{"uid":0,"gid":0}},"noNewPrivileges":true}},
              "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                        {{"destination":"/dev","type":"tmpfs","source":"tmpfs",
                          "options":["nosuid","mode=755","size=1024k"]}}],
              "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"network"}}]}}}}"#,
            args.join(",")
        )
    }

    /// Attaches the container's stdout and reads it to EOF on a thread.
    fn collect(stdio_socket: &Path, id: &str) -> JoinHandle<Vec<u8>> {
        let mut conn = attach_stdout(stdio_socket, id);
        std::thread::spawn(move || {
            let mut out = Vec::new();
            conn.read_to_end(&mut out).unwrap();
            out
        })
    }

    /// Attaches the container's stdout stream.
    fn attach_stdout(stdio_socket: &Path, id: &str) -> UnixStream {
        let mut conn = UnixStream::connect(stdio_socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut header = StreamHeader::new();
        header.container_id = id.to_owned();
        header.stream = StreamKind::STREAM_KIND_STDOUT.into();
        let body = header.write_to_bytes().unwrap();
        let mut frame = b"CRXS".to_vec();
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        conn.write_all(&frame).unwrap();
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut body).unwrap();
        let accept = StreamAccept::parse_from_bytes(&body).unwrap();
        assert!(accept.accepted, "stdout stream refused: {}", accept.error);
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        conn
    }

    fn host_hostname() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
    }

    fn request(id: &str) -> CreateSandboxRequest {
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = id.to_owned();
        req
    }

    fn interface(name: &str, mac: &str) -> Interface {
        let mut i = Interface::new();
        i.name = name.to_owned();
        i.mac = mac.to_owned();
        i
    }

    #[test]
    fn every_bad_field_is_invalid_argument_naming_it() {
        let rig = Rig::start();
        type Mutation = Box<dyn Fn(&mut CreateSandboxRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("sandbox_id", Box::new(|r| r.sandbox_id = "a..b".into())),
            ("sandbox_id", Box::new(|r| r.sandbox_id = "x".repeat(77))),
            ("hostname", Box::new(|r| r.hostname = "h".repeat(65))),
            ("hostname", Box::new(|r| r.hostname = "bad_name".into())),
            (
                "dns.servers",
                Box::new(|r| r.dns.mut_or_insert_default().servers = vec!["10.0.0.1".into(); 4]),
            ),
            (
                "dns.servers",
                Box::new(|r| r.dns.mut_or_insert_default().servers = vec!["not-an-ip".into()]),
            ),
            (
                "dns.searches",
                Box::new(|r| r.dns.mut_or_insert_default().searches = vec!["a".repeat(254)]),
            ),
            (
                "dns.searches",
                Box::new(|r| r.dns.mut_or_insert_default().searches = vec!["x".into(); 33]),
            ),
            (
                "dns.options",
                Box::new(|r| {
                    r.dns.mut_or_insert_default().options =
                        vec!["ndots:5\nnameserver 1.2.3.4".into()]
                }),
            ),
            (
                "interfaces",
                Box::new(|r| {
                    r.interfaces = (0..9)
                        .map(|i| interface(&format!("eth{i}"), &format!("02:00:00:00:00:{i:02x}")))
                        .collect()
                }),
            ),
            (
                "interfaces.name",
                Box::new(|r| r.interfaces = vec![interface("a/b", "02:00:00:00:00:01")]),
            ),
            (
                "interfaces.name",
                Box::new(|r| r.interfaces = vec![interface(&"e".repeat(16), "02:00:00:00:00:01")]),
            ),
            (
                "interfaces.mac",
                Box::new(|r| r.interfaces = vec![interface("eth0", "02:00:00:00:00:zz")]),
            ),
            (
                "interfaces.mtu",
                Box::new(|r| {
                    let mut i = interface("eth0", "02:00:00:00:00:01");
                    i.mtu = 65536;
                    r.interfaces = vec![i];
                }),
            ),
            (
                "interfaces.addresses",
                Box::new(|r| {
                    let mut i = interface("eth0", "02:00:00:00:00:01");
                    let mut a = IpAddress::new();
                    a.address = "10.0.0.2".into();
                    a.prefix_len = 24;
                    i.addresses = vec![a; 17];
                    r.interfaces = vec![i];
                }),
            ),
            (
                "interfaces.addresses.prefix_len",
                Box::new(|r| {
                    let mut i = interface("eth0", "02:00:00:00:00:01");
                    let mut a = IpAddress::new();
                    a.address = "fd00::2".into();
                    a.prefix_len = 129;
                    i.addresses = vec![a];
                    r.interfaces = vec![i];
                }),
            ),
            (
                "routes",
                Box::new(|r| {
                    let mut route = Route::new();
                    route.gateway = "10.0.0.1".into();
                    r.routes = vec![route; 257];
                }),
            ),
            (
                "routes.destination",
                Box::new(|r| {
                    let mut route = Route::new();
                    route.destination = "10.0.0.0/33".into();
                    route.gateway = "10.0.0.1".into();
                    r.routes = vec![route];
                }),
            ),
            (
                "routes.gateway",
                Box::new(|r| {
                    let mut route = Route::new();
                    route.destination = "10.0.0.0/8".into();
                    route.gateway = "fd00::1".into();
                    r.routes = vec![route];
                }),
            ),
            (
                "routes.device",
                Box::new(|r| {
                    let mut route = Route::new();
                    route.destination = "10.0.0.0/8".into();
                    route.device = "eth7".into();
                    r.routes = vec![route];
                }),
            ),
            (
                "sysctls key \"kernel.hostname\"",
                Box::new(|r| {
                    r.sysctls.insert("kernel.hostname".into(), "evil".into());
                }),
            ),
            (
                "sysctls key \"vm.swappiness\"",
                Box::new(|r| {
                    r.sysctls.insert("vm.swappiness".into(), "1".into());
                }),
            ),
            (
                "sysctls[net.ipv4.ip_forward]",
                Box::new(|r| {
                    r.sysctls
                        .insert("net.ipv4.ip_forward".into(), "1".repeat(257));
                }),
            ),
            (
                "sysctls",
                Box::new(|r| {
                    for i in 0..129 {
                        r.sysctls.insert(format!("net.x{i}"), "1".into());
                    }
                }),
            ),
            (
                "storages",
                Box::new(|r| {
                    r.storages = vec![Default::default(); 33];
                }),
            ),
            (
                "pod_resources",
                Box::new(|r| r.pod_resources = b"[1,2]".to_vec()),
            ),
            (
                "pod_resources",
                Box::new(|r| r.pod_resources = vec![b' '; (64 << 10) + 1]),
            ),
        ];
        for (field, mutate) in &cases {
            let mut req = request("pod-1");
            mutate(&mut req);
            let (c, message) = code(rig.create_sandbox(&req));
            assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{field}: {message}");
            assert!(message.starts_with(field), "{field}: {message}");
        }
        let (c, message) = code(rig.destroy_sandbox(60_001));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        assert!(message.starts_with("grace_period_ms"), "{message}");

        // A MAC no NIC has: refused, and everything undone, so a good request works.
        let mut req = request("pod-1");
        req.interfaces = vec![interface("eth0", "02:de:ad:be:ef:01")];
        let (c, message) = code(rig.create_sandbox(&req));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        assert!(message.contains("02:de:ad:be:ef:01"), "{message}");

        // Destroy before create is a no-op; create; create again; destroy twice.
        rig.destroy_sandbox(0).unwrap();
        rig.create_sandbox(&request("pod-1")).unwrap();
        let (c, message) = code(rig.create_sandbox(&request("pod-2")));
        assert_eq!(c, ttrpc::Code::ALREADY_EXISTS, "{message}");
        rig.destroy_sandbox(0).unwrap();
        rig.destroy_sandbox(0).unwrap();
        rig.create_sandbox(&request("pod-2")).unwrap();
    }

    #[test]
    fn containers_share_the_pods_hostname_ipc_and_sysctls_and_the_host_is_untouched() {
        let rig = Rig::start();
        let host_name = host_hostname();
        let host_msgmax = std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap();
        let mut req = request("pod-a");
        req.hostname = "crx-pod-a".into();
        let dns = req.dns.mut_or_insert_default();
        dns.servers = vec!["10.96.0.10".into(), "fd00::10".into()];
        dns.searches = vec!["default.svc.cluster.local".into(), "cluster.local".into()];
        dns.options = vec!["ndots:5".into()];
        req.sysctls.insert("kernel.msgmax".into(), "12345".into());
        // A pod storage; the agent's mounts live in its private mount namespace.
        let pod_tmp = rig.dir.join("state/storage/pod-tmp");
        let mut tmpfs = crx_protocols::v1::storage::Storage::new();
        tmpfs.driver = crx_protocols::v1::storage::StorageDriver::STORAGE_DRIVER_TMPFS.into();
        tmpfs.mount_point = pod_tmp.display().to_string();
        req.storages = vec![tmpfs];
        req.sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
        let resp = rig.create_sandbox(&req).unwrap();
        let mounted = |rig: &Rig| {
            rig.agent_mounts()
                .contains(&format!(" {} ", pod_tmp.display()))
        };
        assert!(mounted(&rig), "pod storage not mounted");

        assert_eq!(
            std::fs::read_to_string(&resp.resolv_conf_path).unwrap(),
            "nameserver 10.96.0.10\nnameserver fd00::10\n\
             search default.svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        assert_eq!(
            std::fs::read_to_string(&resp.hostname_path).unwrap(),
            "crx-pod-a\n"
        );
        assert!(std::fs::read_to_string(&resp.hosts_path)
            .unwrap()
            .contains("127.0.0.1\tlocalhost"));

        // The pod's hostname, not the spec's; one UTS and one IPC namespace for both
        // containers, neither the host's; the pod's sysctls; loopback up.
        let probe = "hostname; for ns in uts ipc net; do readlink /proc/self/ns/$ns; done; \
                     cat /proc/sys/kernel/msgmax /proc/sys/net/ipv4/ip_unprivileged_port_start; \
                     ip link show lo";
        let (status1, first) = rig.run(probe);
        let (status2, second) = rig.run(probe);
        assert_eq!((status1, status2), (0, 0), "{first}\n{second}");
        let lines: Vec<&str> = first.lines().collect();
        assert!(lines.len() >= 7, "{first}");
        assert_eq!(lines[0], "crx-pod-a", "{first}");
        let own_ns = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert_ne!(Path::new(lines[1]), own_ns("uts"), "{first}");
        assert_ne!(Path::new(lines[2]), own_ns("ipc"), "{first}");
        assert_ne!(Path::new(lines[3]), own_ns("net"), "{first}");
        assert_eq!(&lines[4..6], &["12345", "80"], "{first}");
        assert!(
            lines[6].contains("lo:") && lines[6].contains("UP"),
            "{first}"
        );
        let second_lines: Vec<&str> = second.lines().collect();
        assert_eq!(
            &second_lines[..4],
            &lines[..4],
            "both containers share the pod's namespaces"
        );

        assert_eq!(host_hostname(), host_name, "the host's hostname changed");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/msgmax").unwrap(),
            host_msgmax,
            "the host's kernel.msgmax changed"
        );

        rig.destroy_sandbox(0).unwrap();
        assert!(
            !Path::new(&resp.hostname_path).exists(),
            "pod files left behind"
        );
        assert!(
            !mounted(&rig),
            "pod storage still mounted after DestroySandbox"
        );
        // Without a sandbox a container is on its own again: its spec's hostname.
        let (_, out) = rig.run("hostname");
        assert_eq!(out, "container-own-name\n");
    }

    #[test]
    fn a_shared_pid_namespace_and_destroy_stops_what_still_runs() {
        let rig = Rig::start();
        let mut req = request("pod-pid");
        req.share_pid_namespace = true;
        rig.create_sandbox(&req).unwrap();
        let sleeper = unique("sleeper");
        rig.create(&sleeper, &spec(&["sleep", "1000"]), false)
            .unwrap();
        rig.start_container(&sleeper).unwrap();
        // Another container of the pod sees the sleeper's process.
        let (status, out) = rig.run("pidof sleep");
        assert_eq!(
            status, 0,
            "pidof found no sleep in the shared PID namespace: {out}"
        );
        assert!(!out.trim().is_empty());

        // An orphan is the pod's (its PID 1 is the namespace holder), which reaps it as
        // it ends: no zombie is left once the orphan's sleep is long over.
        let (status, out) = rig.run("sleep 0.2 & exit 0");
        assert_eq!(status, 0, "{out}");
        let (_, zombies) = rig.run("sleep 0.5; grep -l 'State:.*Z' /proc/[0-9]*/status");
        assert_eq!(zombies, "", "zombies left in the pod's PID namespace");

        // A container that ignores SIGTERM needs the SIGKILL after the grace period.
        let stubborn = unique("stubborn");
        rig.create(
            &stubborn,
            &spec(&[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while true; do sleep 1; done",
            ]),
            true,
        )
        .unwrap();
        let mut out = attach_stdout(&rig.stdio_socket(), &stubborn);
        rig.start_container(&stubborn).unwrap();
        // Only once the trap is in place does SIGTERM leave it running.
        let mut ready = [0u8; 6];
        out.read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        let begun = Instant::now();
        rig.destroy_sandbox(500).unwrap();
        let took = begun.elapsed();
        assert!(
            took >= Duration::from_millis(500),
            "destroy did not wait the grace period: {took:?}"
        );
        assert!(took < Duration::from_secs(20), "destroy took {took:?}");
        for id in [&sleeper, &stubborn] {
            let (c, message) = code(rig.wait(id, 5));
            assert_eq!(c, ttrpc::Code::NOT_FOUND, "{id} still there: {message}");
        }
        // The ids are free again.
        rig.create(&sleeper, &spec(&["true"]), false).unwrap();
        rig.remove(&sleeper).unwrap();
    }
}
