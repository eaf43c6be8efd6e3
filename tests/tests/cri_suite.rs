//! CRI suite: containerd's CRI plugin (Debian's containerd 1.6, private config, root,
//! state and socket; see `crx_tests::cri`) driven over its socket like a kubelet would,
//! organised like cri-tools' critest areas. Every case runs once per runtime handler,
//! `runc` and `crx` (QEMU/TCG here), as `<case>::runc` and `<case>::crx`, so any
//! difference between the two shows as one failing test that names its cause.
//!
//! Each test starts its own containerd (with the crx drop-in rendered from
//! `deploy/containerd/crx.toml`, the CNI list `deploy/cni/10-crx-test-bridge.conflist`
//! and the local pause image) and checks at its end that nothing of its pods is left.
//! Tests of this file run one after another (they share the test bridge).
//!
//! `cargo build -p containerd-shim-crx-v2 && cargo test -p crx-tests --test cri_suite`
//! (the crx cases also need the guest kernel and initramfs: `scripts/test.sh` builds
//! them).

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::suite::{poll, text, Suite, EXEC, EXIT, RELEASE};
    use crx_tests::cri::{config, PAUSE_IMAGE};
    use crx_tests::for_each_handler;
    use k8s_cri::v1 as cri;

    for_each_handler!(
        runtime_status_and_version,
        pod_sandbox_lifecycle,
        container_lifecycle_exit_code_and_logs,
        exec_sync_output_and_exit_code,
        pod_hostname_and_dns,
        pod_network_reaches_the_pod_ip,
        pods_of_both_handlers_reach_each_other,
        two_pods_of_the_handler_reach_each_other,
        host_port_reaches_the_container,
    );

    /// Looks a key up in a JSON object under either of two spellings (containerd's
    /// config JSON mixes Go field names and json tags).
    fn field<'a>(v: &'a serde_json::Value, a: &str, b: &str) -> Option<&'a serde_json::Value> {
        v.get(a).or_else(|| v.get(b))
    }

    // --- runtime info --------------------------------------------------------------

    /// Version and Status answer as the kubelet expects, and the runtime's config names
    /// the handler with its runtime type (and, for crx, the drop-in's settings).
    fn runtime_status_and_version(s: &Suite) -> Result<()> {
        let client = s.client()?;
        let version = client.version()?;
        ensure!(
            version.runtime_api_version == "v1",
            "runtime API {version:?}"
        );
        ensure!(version.runtime_name == "containerd", "{version:?}");
        ensure!(
            version.runtime_version.starts_with("1.6")
                || version.runtime_version.starts_with("v1.6"),
            "expected containerd 1.6: {version:?}"
        );
        let status = client.status(true)?;
        let conditions = status.status.context("Status without a status")?.conditions;
        for want in ["RuntimeReady", "NetworkReady"] {
            ensure!(
                conditions.iter().any(|c| c.r#type == want && c.status),
                "{want} is not true: {conditions:?}"
            );
        }
        let config: serde_json::Value = serde_json::from_str(
            status
                .info
                .get("config")
                .context("verbose Status has no config")?,
        )
        .context("Status config is not JSON")?;
        let sandbox_image = field(&config, "sandboxImage", "SandboxImage");
        ensure!(
            sandbox_image.and_then(|v| v.as_str()) == Some(PAUSE_IMAGE),
            "sandbox image {sandbox_image:?}"
        );
        let runtime = config
            .pointer("/containerd/runtimes")
            .and_then(|r| r.get(&s.handler))
            .with_context(|| format!("handler {} not configured: {config}", s.handler))?;
        let runtime_type = field(runtime, "runtimeType", "Type").and_then(|v| v.as_str());
        let want = if s.handler == "crx" {
            "io.containerd.crx.v2"
        } else {
            "io.containerd.runc.v2"
        };
        ensure!(runtime_type == Some(want), "runtime type {runtime:?}");
        if s.handler == "crx" {
            let annotations = field(runtime, "PodAnnotations", "podAnnotations")
                .and_then(|v| v.as_array())
                .with_context(|| format!("crx has no pod annotations: {runtime}"))?;
            ensure!(
                annotations.iter().any(|a| a == "io.kubernetes.cri.*"),
                "pod annotations {annotations:?}"
            );
            let config_path = runtime
                .pointer("/options/ConfigPath")
                .and_then(|v| v.as_str());
            let want = s.node.shim_config().map(|p| p.display().to_string());
            ensure!(
                config_path.map(str::to_owned) == want,
                "ConfigPath {config_path:?}, want {want:?}"
            );
        }
        let images = client.image_refs()?;
        for want in [PAUSE_IMAGE, s.node.busybox()] {
            ensure!(images.iter().any(|i| i == want), "{want} not in {images:?}");
        }
        Ok(())
    }

    // --- pod sandbox ---------------------------------------------------------------

    /// RunPodSandbox → READY with an address from the test network; Stop → NOTREADY with
    /// the address released; Stop and Remove are idempotent; the pod is gone after.
    fn pod_sandbox_lifecycle(s: &Suite) -> Result<()> {
        let client = s.client()?;
        let pod = pod_config("lifecycle", &s.node.pod_log_dir("lifecycle"));
        let id = s.run_pod(&pod)?;

        let reply = client.pod_sandbox_status(&id, true)?;
        let status = reply.status.context("PodSandboxStatus without a status")?;
        ensure!(
            status.state == cri::PodSandboxState::SandboxReady as i32,
            "not ready: {status:?}"
        );
        ensure!(status.runtime_handler == s.handler, "handler {status:?}");
        ensure!(
            status.metadata.as_ref().map(|m| m.name.as_str()) == Some("lifecycle"),
            "metadata {status:?}"
        );
        let ip = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let subnet = config::conflist_subnet()?;
        let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or(&subnet);
        ensure!(
            ip.starts_with(&format!("{prefix}.")),
            "pod IP {ip:?} is not from the test network {subnet}"
        );
        ensure!(
            s.node.ip_leases().contains(&ip),
            "host-local has no lease for {ip}: {:?}",
            s.node.ip_leases()
        );
        let listed = client.list_pod_sandboxes()?;
        ensure!(
            listed
                .iter()
                .any(|p| p.id == id && p.state == cri::PodSandboxState::SandboxReady as i32),
            "ListPodSandbox does not list {id} as ready: {listed:?}"
        );
        let netns = reply
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|i| {
                i.pointer("/runtimeSpec/linux/namespaces")?
                    .as_array()?
                    .iter()
                    .find(|n| n["type"] == "network")?["path"]
                    .as_str()
                    .map(str::to_owned)
            })
            .context("verbose PodSandboxStatus names no network namespace")?;
        ensure!(Path::new(&netns).exists(), "pod netns {netns} missing");

        client.stop_pod_sandbox(&id).context("StopPodSandbox")?;
        let status = client
            .pod_sandbox_status(&id, false)?
            .status
            .context("no status")?;
        ensure!(
            status.state == cri::PodSandboxState::SandboxNotready as i32,
            "still ready after StopPodSandbox: {status:?}"
        );
        ensure!(
            !s.node.ip_leases().contains(&ip),
            "{ip} still leased after StopPodSandbox"
        );
        ensure!(
            !Path::new(&netns).exists(),
            "netns {netns} still there after StopPodSandbox"
        );
        client
            .stop_pod_sandbox(&id)
            .context("a second StopPodSandbox")?;

        client.remove_pod_sandbox(&id).context("RemovePodSandbox")?;
        match client.pod_sandbox_status(&id, false) {
            Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
            other => bail!("PodSandboxStatus after removal answered {other:?}"),
        }
        client
            .remove_pod_sandbox(&id)
            .context("a second RemovePodSandbox")?;
        ensure!(
            client.list_pod_sandboxes()?.is_empty(),
            "ListPodSandbox still lists pods"
        );
        Ok(())
    }

    // --- containers ----------------------------------------------------------------

    /// A container that writes to both streams and exits 3: CREATED → RUNNING →
    /// EXITED with code 3, its lines in the CRI log file by stream; a running container
    /// stops on StopContainer; removed containers are gone.
    fn container_lifecycle_exit_code_and_logs(s: &Suite) -> Result<()> {
        let client = s.client()?;
        let log_dir = s.node.pod_log_dir("containers");
        let pod = pod_config("containers", &log_dir);
        let pod_id = s.run_pod(&pod)?;

        let c = container_config(
            "exits",
            s.node.busybox(),
            &[
                "/bin/sh",
                "-c",
                "echo to-stdout; echo to-stderr >&2; exit 3",
            ],
            "exits.log",
        );
        let cid = client
            .create_container(&pod_id, &c, &pod)
            .context("CreateContainer")?;
        let created = client.container_status(&cid)?;
        ensure!(
            created.state == cri::ContainerState::ContainerCreated as i32,
            "not CREATED after CreateContainer: {created:?}"
        );
        client.start_container(&cid).context("StartContainer")?;
        let exited = client.wait_exited(&cid, EXIT)?;
        ensure!(
            exited.exit_code == 3,
            "exit code {}: {exited:?}",
            exited.exit_code
        );
        // containerd stamps started_at when Start returns, which a process this quick
        // may outlive by less than its whole run: compare both with created_at only.
        ensure!(
            exited.started_at >= exited.created_at
                && exited.finished_at >= exited.created_at
                && exited.created_at > 0,
            "times {exited:?}"
        );
        let log_path = log_dir.join("exits.log");
        ensure!(
            exited.log_path == log_path.display().to_string(),
            "log path {:?}, want {}",
            exited.log_path,
            log_path.display()
        );
        // CRI log lines: "<RFC3339Nano time> <stream> <F|P> <text>".
        let wanted = [("stdout", "to-stdout"), ("stderr", "to-stderr")];
        let lines = poll(Duration::from_secs(10), || {
            let log = std::fs::read_to_string(&log_path).ok()?;
            let parsed: Vec<(String, String)> = log
                .lines()
                .filter_map(|l| {
                    let mut f = l.splitn(4, ' ');
                    let (_time, stream, tag, text) = (f.next()?, f.next()?, f.next()?, f.next()?);
                    (tag == "F").then(|| (stream.to_owned(), text.to_owned()))
                })
                .collect();
            wanted
                .iter()
                .all(|(st, tx)| parsed.iter().any(|(a, b)| a == st && b == tx))
                .then_some(parsed)
        });
        ensure!(
            lines.is_some(),
            "log {} lacks the container's lines: {:?}",
            log_path.display(),
            std::fs::read_to_string(&log_path)
        );

        let sleeper = container_config(
            "sleeper",
            s.node.busybox(),
            &["/bin/sleep", "3600"],
            "sleeper.log",
        );
        let sid = client
            .create_container(&pod_id, &sleeper, &pod)
            .context("CreateContainer (sleeper)")?;
        client
            .start_container(&sid)
            .context("StartContainer (sleeper)")?;
        let running = client.container_status(&sid)?;
        ensure!(
            running.state == cri::ContainerState::ContainerRunning as i32,
            "sleeper not RUNNING: {running:?}"
        );
        client.stop_container(&sid, 2).context("StopContainer")?;
        let stopped = client.wait_exited(&sid, EXIT)?;
        ensure!(
            stopped.exit_code == 137 || stopped.exit_code == 143,
            "a stopped container exits by SIGKILL or SIGTERM: {stopped:?}"
        );

        for id in [&cid, &sid] {
            client.remove_container(id).context("RemoveContainer")?;
            match client.container_status(id) {
                Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
                other => bail!("ContainerStatus after removal answered {other:?}"),
            }
        }
        s.remove_pod(&pod_id)
    }

    // --- exec ----------------------------------------------------------------------

    /// ExecSync returns the command's stdout, stderr and exit code apart; a missing
    /// binary is not reported as success.
    fn exec_sync_output_and_exit_code(s: &Suite) -> Result<()> {
        let pod = pod_config("exec", &s.node.pod_log_dir("exec"));
        let (pod_id, cid) = s.pod_with_sleeper(&pod)?;
        let r = s.exec(
            &cid,
            &["/bin/sh", "-c", "echo out-text; echo err-text >&2; exit 7"],
        )?;
        ensure!(
            (
                text(&r.stdout).as_str(),
                text(&r.stderr).as_str(),
                r.exit_code
            ) == ("out-text\n", "err-text\n", 7),
            "ExecSync answered {r:?}"
        );
        let r = s.exec(&cid, &["/bin/true"])?;
        ensure!(
            r.exit_code == 0 && r.stdout.is_empty() && r.stderr.is_empty(),
            "true answered {r:?}"
        );
        // The handler shows: a runc container shares the host's kernel, a crx
        // container runs on its pod VM's own.
        let r = s.exec(&cid, &["/bin/cat", "/proc/version"])?;
        let host = std::fs::read_to_string("/proc/version").context("host /proc/version")?;
        let same_kernel = text(&r.stdout) == host;
        ensure!(
            r.exit_code == 0 && same_kernel == (s.handler == "runc"),
            "handler {} but the container's kernel is {:?} (host: {host:?})",
            s.handler,
            text(&r.stdout)
        );
        match s.client()?.exec_sync(&cid, &["/no/such/binary"], EXEC) {
            Ok(r) if r.exit_code == 0 => bail!("a missing binary exec'd with exit 0: {r:?}"),
            _ => {}
        }
        s.remove_pod(&pod_id)
    }

    // --- DNS and hostname ----------------------------------------------------------

    /// The container sees the hostname and resolv.conf the pod asked for.
    fn pod_hostname_and_dns(s: &Suite) -> Result<()> {
        let mut pod = pod_config("dns", &s.node.pod_log_dir("dns"));
        pod.hostname = "crx-cri-dns".into();
        pod.dns_config = Some(cri::DnsConfig {
            // TEST-NET-1 (RFC 5737): written to resolv.conf only, never queried.
            servers: vec!["192.0.2.53".into()],
            searches: vec!["crx.test".into(), "svc.crx.test".into()],
            options: vec!["ndots:2".into(), "timeout:1".into()],
        });
        let (pod_id, cid) = s.pod_with_sleeper(&pod)?;
        let r = s.exec(&cid, &["/bin/hostname"])?;
        ensure!(
            r.exit_code == 0 && text(&r.stdout).trim() == "crx-cri-dns",
            "hostname answered {r:?}"
        );
        let r = s.exec(&cid, &["/bin/cat", "/etc/hostname"])?;
        ensure!(
            text(&r.stdout).trim() == "crx-cri-dns",
            "/etc/hostname: {r:?}"
        );
        let r = s.exec(&cid, &["/bin/cat", "/etc/resolv.conf"])?;
        let resolv = text(&r.stdout);
        let lines: Vec<&str> = resolv.lines().map(str::trim).collect();
        for want in [
            "nameserver 192.0.2.53",
            "search crx.test svc.crx.test",
            "options ndots:2 timeout:1",
        ] {
            ensure!(
                lines.contains(&want),
                "resolv.conf lacks {want:?}:\n{resolv}"
            );
        }
        s.remove_pod(&pod_id)
    }

    /// What the pod's web server serves.
    const GREETING: &str = "crx-pod-net says hello";
    const LISTEN_PORT: u16 = 8080;

    /// A TCP listener in a pod answers the host (root namespace, through the CNI test
    /// bridge) on the pod IP PodSandboxStatus reports.
    fn pod_network_reaches_the_pod_ip(s: &Suite) -> Result<()> {
        let pod = pod_config("net", &s.node.pod_log_dir("net"));
        let pod_id = s.run_pod(&pod)?;
        let (_, ip) = web_server(s, &pod_id, &pod)?;
        let subnet = config::conflist_subnet()?;
        let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or(&subnet);
        ensure!(
            ip.to_string().starts_with(&format!("{prefix}.")),
            "pod IP {ip} is not from the test network {subnet}"
        );
        let _host_on_bridge = HostAddress::add(&format!("{prefix}.{HOST_OCTET}/24"))?;
        let target = std::net::SocketAddr::new(ip, LISTEN_PORT);
        let started = Instant::now();
        let mut last_error = String::from("no attempt");
        let first = poll(EXIT, || match fetch(target) {
            Ok(got) => Some(got),
            Err(e) => {
                last_error = format!("{e:#}");
                None
            }
        });
        let (greeting, _) = first
            .with_context(|| format!("no greeting from {target} within {EXIT:?}: {last_error}"))?;
        ensure!(
            greeting.contains(GREETING),
            "{target} answered {greeting:?}, wanted {GREETING:?}"
        );
        let reachable_after = started.elapsed();
        // A second connection, once the listener is known to be up, times the path.
        let again = poll(Duration::from_secs(10), || fetch(target).ok());
        let (greeting, connect) = again.with_context(|| format!("{target} stopped answering"))?;
        ensure!(greeting.contains(GREETING), "second answer {greeting:?}");
        eprintln!(
            "[{}] pod {ip}: first answer {reachable_after:?} after StartContainer, \
             TCP connect {connect:?}",
            s.handler
        );
        s.remove_pod(&pod_id)
    }

    /// A pod of the handler under test and a runc pod, each serving `/` over HTTP,
    /// fetch each other's page through the test bridge.
    fn pods_of_both_handlers_reach_each_other(s: &Suite) -> Result<()> {
        two_pods_reach_each_other(s, "runc")
    }

    /// Two pods of the handler under test (two crx VMs, or two runc pods) fetch each
    /// other's page through the test bridge.
    fn two_pods_of_the_handler_reach_each_other(s: &Suite) -> Result<()> {
        two_pods_reach_each_other(s, &s.handler)
    }

    fn two_pods_reach_each_other(s: &Suite, peer_handler: &str) -> Result<()> {
        let mine = pod_config("web-a", &s.node.pod_log_dir("web-a"));
        let mine_id = s.run_pod(&mine)?;
        let peer = pod_config("web-b", &s.node.pod_log_dir("web-b"));
        let peer_id = if peer_handler == s.handler {
            s.run_pod(&peer)?
        } else {
            s.client()?
                .run_pod_sandbox(&peer, peer_handler)
                .with_context(|| format!("RunPodSandbox on handler {peer_handler}"))?
        };
        let (mine_cid, mine_ip) = web_server(s, &mine_id, &mine)?;
        let (peer_cid, peer_ip) = web_server(s, &peer_id, &peer)?;
        for (from, to, what) in [
            (
                &peer_cid,
                mine_ip,
                format!("{peer_handler} pod -> {} pod", s.handler),
            ),
            (
                &mine_cid,
                peer_ip,
                format!("{} pod -> {peer_handler} pod", s.handler),
            ),
        ] {
            let url = format!("http://{to}:{LISTEN_PORT}/");
            // busybox's wget crashes in this image; its nc speaks the request instead.
            let fetch = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {to} {LISTEN_PORT}");
            let started = Instant::now();
            let mut last = String::from("no attempt");
            let got = poll(EXIT, || match s.exec(from, &["/bin/sh", "-c", &fetch]) {
                Ok(r) if r.exit_code == 0 && text(&r.stdout).contains(GREETING) => Some(()),
                Ok(r) => {
                    last = format!("exit {}: {}", r.exit_code, text(&r.stderr));
                    None
                }
                Err(e) => {
                    last = format!("{e:#}");
                    None
                }
            });
            got.with_context(|| format!("{what}: no page from {url} within {EXIT:?}: {last}"))?;
            eprintln!("[{}] {what}: page after {:?}", s.handler, started.elapsed());
        }
        s.remove_pod(&peer_id)?;
        s.remove_pod(&mine_id)
    }

    /// A pod's `hostPort` (CRI PortMapping, through CNI portmap) reaches its web server
    /// from the host; after RemovePodSandbox the host port's NAT rules are gone and the
    /// port no longer answers.
    ///
    /// The host dials its own address on the test bridge: portmap DNATs local
    /// destinations in `OUTPUT`, and the pod (no default route, no SNAT) can answer only
    /// a source on its subnet. 127.0.0.1 would need `route_localnet` and SNAT, which the
    /// test network does not enable.
    fn host_port_reaches_the_container(s: &Suite) -> Result<()> {
        let host_port = free_host_port()?;
        let mut pod = pod_config("hostport", &s.node.pod_log_dir("hostport"));
        pod.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: i32::from(LISTEN_PORT),
            host_port: i32::from(host_port),
            host_ip: String::new(),
        }];
        let pod_id = s.run_pod(&pod)?;
        let rules = nat_rules_for_port(host_port)?;
        ensure!(
            !rules.is_empty(),
            "no NAT rule for host port {host_port} after RunPodSandbox (is portmap in the \
             CNI list?)"
        );
        web_server(s, &pod_id, &pod)?;
        let subnet = config::conflist_subnet()?;
        let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or(&subnet);
        let host_ip: std::net::IpAddr = format!("{prefix}.{HOST_OCTET}")
            .parse()
            .with_context(|| format!("host address on {subnet}"))?;
        let _host_on_bridge = HostAddress::add(&format!("{host_ip}/24"))?;
        let target = std::net::SocketAddr::new(host_ip, host_port);
        let started = Instant::now();
        let mut last_error = String::from("no attempt");
        let answer = poll(EXIT, || match fetch(target) {
            Ok((got, _)) => Some(got),
            Err(e) => {
                last_error = format!("{e:#}");
                None
            }
        });
        let greeting = answer.with_context(|| {
            format!(
                "host port {target} gave no page within {EXIT:?}: {last_error}; NAT rules: \
                 {rules:#?}"
            )
        })?;
        ensure!(
            greeting.contains(GREETING),
            "{target} answered {greeting:?}, wanted {GREETING:?}"
        );
        eprintln!(
            "[{}] host port {target} -> pod :{LISTEN_PORT}: first answer {:?} after \
             StartContainer",
            s.handler,
            started.elapsed()
        );

        s.remove_pod(&pod_id)?;
        let mut last = String::from("no check");
        let released = poll(RELEASE, || {
            let left = match nat_rules_for_port(host_port) {
                Ok(left) => left,
                Err(e) => {
                    last = format!("{e:#}");
                    return None;
                }
            };
            if !left.is_empty() {
                last = format!("NAT rules left: {left:#?}");
                return None;
            }
            // Refused (not timed out): the address is still there, only the mapping is gone.
            match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(_) => {
                    last = format!("{target} still accepts connections");
                    None
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                Err(e) => {
                    last = format!("connect {target}: {e}");
                    None
                }
            }
        });
        released.with_context(|| {
            format!(
                "host port {host_port} not released within {RELEASE:?} after \
                 RemovePodSandbox: {last}"
            )
        })
    }

    /// A TCP port no socket on the host holds right now (the kernel's pick for `:0`).
    fn free_host_port() -> Result<u16> {
        let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).context("binding :0")?;
        Ok(listener.local_addr().context("bound address")?.port())
    }

    /// The rules of iptables' nat table that match destination port `port` (portmap's
    /// `--dport`/`--dports`; iptables as on `PATH`, the same binary portmap runs).
    fn nat_rules_for_port(port: u16) -> Result<Vec<String>> {
        let out = std::process::Command::new("iptables")
            .args(["-w", "-t", "nat", "-S"])
            .output()
            .context("running iptables -t nat -S (apt-get install iptables)")?;
        ensure!(
            out.status.success(),
            "iptables -t nat -S: {}",
            text(&out.stderr)
        );
        let port = port.to_string();
        let names_port = |words: &[&str]| {
            words.windows(2).any(|w| {
                matches!(w[0], "--dport" | "--dports" | "--destination-ports")
                    && w[1].split([',', ':']).any(|p| p == port)
            })
        };
        Ok(text(&out.stdout)
            .lines()
            .filter(|line| names_port(&line.split_whitespace().collect::<Vec<_>>()))
            .map(str::to_owned)
            .collect())
    }

    /// Starts a busybox httpd serving [`GREETING`] in pod `pod_id`; returns the
    /// container and the pod's IP.
    fn web_server(
        s: &Suite,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
    ) -> Result<(String, std::net::IpAddr)> {
        let client = s.client()?;
        let serve = format!(
            "mkdir -p /www && echo '{GREETING}' > /www/index.html && \
             exec httpd -f -p {LISTEN_PORT} -h /www"
        );
        let c = container_config(
            "web",
            s.node.busybox(),
            &["/bin/sh", "-c", &serve],
            "web.log",
        );
        let cid = s.start_container(pod_id, pod, &c)?;
        let status = client
            .pod_sandbox_status(pod_id, false)?
            .status
            .context("PodSandboxStatus without a status")?;
        let ip = status
            .network
            .as_ref()
            .map(|n| n.ip.as_str())
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("pod IP in {status:?}"))?;
        Ok((cid, ip))
    }

    /// The host's address on the test bridge (below host-local's range): the shipped
    /// CNI list gives the bridge none (`isGateway: false`), and without one the host
    /// would send the pod's subnet down its default route, off the machine.
    const HOST_OCTET: u8 = 5;

    /// An address on the test bridge for the length of a case.
    struct HostAddress(String);

    impl HostAddress {
        fn add(cidr: &str) -> Result<HostAddress> {
            let bridge = crx_tests::cri::harness::TEST_BRIDGE;
            let out = std::process::Command::new("ip")
                .args(["addr", "add", cidr, "dev", bridge])
                .output()
                .context("running ip addr add")?;
            ensure!(
                out.status.success(),
                "ip addr add {cidr} dev {bridge}: {}",
                text(&out.stderr)
            );
            Ok(HostAddress(cidr.to_owned()))
        }
    }

    impl Drop for HostAddress {
        fn drop(&mut self) {
            // The harness may already have removed the bridge: nothing left then.
            let _ = std::process::Command::new("ip")
                .args([
                    "addr",
                    "del",
                    &self.0,
                    "dev",
                    crx_tests::cri::harness::TEST_BRIDGE,
                ])
                .output();
        }
    }

    /// GETs `/` from the HTTP server at `target`; returns the whole answer and how long
    /// the TCP connect took.
    fn fetch(target: std::net::SocketAddr) -> Result<(String, Duration)> {
        use std::io::{Read, Write};
        let connecting = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connect {target}"))?;
        let connect = connecting.elapsed();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .context("send the request")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < 4096 {
            match stream.read(&mut buf).context("read")? {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        ensure!(!got.is_empty(), "{target} closed without a word");
        Ok((text(&got), connect))
    }
}
