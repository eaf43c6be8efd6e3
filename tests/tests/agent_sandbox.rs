//! The pod sandbox in a real guest (QEMU/TCG): CreateSandbox finds the virtio-net NIC
//! by its MAC, renames it, sets MTU and address, adds a route through the host end;
//! containers then see the pod's hostname, its namespaced sysctls and its network, and
//! talk TCP to the host side. The host side is a tap in a test network namespace, so
//! every address stays inside it.
//!
//! Needs root, QEMU, the guest kernel and the artifacts `scripts/test.sh` builds (the
//! agent with its `containers` feature), and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::os::unix::fs::symlink;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_protocols::v1::sandbox::*;
    use crx_shim::vm::NetDevice;
    use crx_tests::guest_pod::{oci_spec, secs, GuestPod};
    use crx_tests::test_guest::netns::NetNs;

    const MAC: [u8; 6] = [0x02, 0xc5, 0x5b, 0x00, 0x00, 0x01];
    const MAC_TEXT: &str = "02:c5:5b:00:00:01";
    /// The tap's end in the test namespace, and the guest's address beside it.
    const HOST_IP: &str = "10.79.0.1";
    const GUEST_IP: &str = "10.79.0.2";
    /// Reachable from the guest only through the route CreateSandbox adds.
    const ROUTED_IP: &str = "10.80.0.1";
    const PORT: u16 = 7707;
    const HOSTNAME: &str = "crx-sandbox-pod";
    /// The pod cgroup's pids limit (`pod_resources`).
    const POD_PIDS: u32 = 24;

    fn status_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> Result<(ttrpc::Code, String)> {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => Ok((s.code(), s.message().to_owned())),
            other => bail!("expected an RPC status, got {other:?}"),
        }
    }

    fn sandbox_request() -> CreateSandboxRequest {
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = "vm-pod".into();
        req.hostname = HOSTNAME.into();
        let mut iface = Interface::new();
        iface.name = "pod0".into();
        iface.mac = MAC_TEXT.into();
        iface.mtu = 1400;
        let mut addr = IpAddress::new();
        addr.address = GUEST_IP.into();
        addr.prefix_len = 24;
        iface.addresses = vec![addr];
        req.interfaces = vec![iface];
        let mut route = Route::new();
        route.destination = "10.80.0.0/16".into();
        route.gateway = HOST_IP.into();
        route.device = "pod0".into();
        req.routes = vec![route];
        req.dns.mut_or_insert_default().servers = vec![HOST_IP.into()];
        req.sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "123".into());
        req.sysctls.insert("kernel.msgmax".into(), "23456".into());
        req.pod_resources = format!(r#"{{"pids":{{"limit":{POD_PIDS}}}}}"#).into_bytes();
        req
    }

    /// Accepts one connection on `listener` (by `deadline`), reads a line, answers and
    /// closes: what the pod sent.
    fn serve_once(listener: TcpListener, deadline: Instant) -> Result<String> {
        listener.set_nonblocking(true)?;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "the pod never connected");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(b"hello-from-host\n")?;
        Ok(line)
    }

    #[test]
    fn the_sandbox_sets_up_hostname_network_and_sysctls_in_the_guest() -> Result<()> {
        let ns = NetNs::new(&format!("crx-sbx-{}", std::process::id()))?;
        let tap = ns.tap("crxsbx0", &format!("{HOST_IP}/24"), 1400)?;
        ns.ip(&["addr", "add", &format!("{ROUTED_IP}/32"), "dev", "lo"])?;
        let listener: TcpListener =
            ns.enter(|| TcpListener::bind((ROUTED_IP, PORT)).context("binding in the test netns"))?;
        let mut pod = GuestPod::boot("agent-sandbox", 256, |_, config| {
            config.devices.net = Some(NetDevice {
                tap: Arc::new(tap),
                mac: MAC,
                mtu: 1400,
            });
            Ok(())
        })?;
        let bin = pod.share.join("rootfs/bin");
        for applet in ["nc", "ip"] {
            if !bin.join(applet).exists() {
                symlink("busybox", bin.join(applet))?;
            }
        }

        // A sysctl outside the pod's namespaces is refused by name; nothing is set up.
        let mut bad = sandbox_request();
        bad.sysctls.insert("kernel.panic".into(), "1".into());
        let (code, message) =
            status_of(pod.rt.block_on(pod.sandbox.create_sandbox(secs(60), &bad)))?;
        ensure!(
            code == ttrpc::Code::INVALID_ARGUMENT && message.contains("kernel.panic"),
            "non-namespaced sysctl: {code:?} {message}"
        );

        let created = pod
            .rt
            .block_on(pod.sandbox.create_sandbox(secs(120), &sandbox_request()))
            .context("CreateSandbox")?;
        ensure!(
            !created.resolv_conf_path.is_empty() && !created.hostname_path.is_empty(),
            "CreateSandbox named no pod files: {created:?}"
        );
        let (code, message) = status_of(
            pod.rt
                .block_on(pod.sandbox.create_sandbox(secs(60), &sandbox_request())),
        )?;
        ensure!(
            code == ttrpc::Code::ALREADY_EXISTS,
            "second CreateSandbox: {code:?} {message}"
        );

        // What a container sees: hostname, sysctls, the renamed NIC, the route.
        let probe =
            "hostname; cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/msgmax; \
                     ip addr show pod0; ip route";
        let r = pod.run(oci_spec(&["sh", "-c", probe], "", ""))?;
        ensure!(r.exit.exit_status == 0, "probe: {r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        ensure!(
            lines.len() > 3 && lines[0] == HOSTNAME && lines[1] == "123" && lines[2] == "23456",
            "hostname and sysctls: {r:?}"
        );
        ensure!(
            r.stdout.contains("mtu 1400")
                && r.stdout.contains(&format!("inet {GUEST_IP}/24"))
                && r.stdout.contains(MAC_TEXT)
                && r.stdout.contains("UP"),
            "pod0 not configured: {r:?}"
        );
        ensure!(
            r.stdout
                .contains(&format!("10.80.0.0/16 via {HOST_IP} dev pod0")),
            "route missing: {r:?}"
        );

        // Whatever cgroupsPath the host's spec names, the container lives in /crx/<id>,
        // under the pod cgroup, whose pids limit stops it forking past POD_PIDS. It has
        // its own cgroup namespace rooted there, so it sees its cgroup as "/", never the
        // host's path.
        let forks = format!(
            "cat /proc/self/cgroup; i=0; while [ $i -lt {} ]; do sleep 5 & i=$((i+1)); done; echo forked $i",
            POD_PIDS + 8
        );
        let r = pod.run(oci_spec(
            &["sh", "-c", &forks],
            "",
            r#","cgroupsPath":"/kubepods/besteffort/pod-x/ctr""#,
        ))?;
        ensure!(
            r.stdout.starts_with("0::/\n") && !r.stdout.contains("kubepods"),
            "the container is not at the root of its own cgroup namespace: {r:?}"
        );
        ensure!(
            r.stderr.contains("fork"),
            "{} forks succeeded under a pod pids limit of {POD_PIDS}: {r:?}",
            POD_PIDS + 8
        );

        // TCP both ways over the routed address.
        let server = std::thread::spawn(move || {
            serve_once(listener, Instant::now() + Duration::from_secs(120))
        });
        let script = format!("echo hello-from-pod | nc {ROUTED_IP} {PORT}");
        let r = pod.run(oci_spec(&["sh", "-c", &script], "", ""))?;
        let got = server
            .join()
            .map_err(|_| anyhow::anyhow!("the host-side server panicked"))??;
        ensure!(
            got == "hello-from-pod\n",
            "host received {got:?}; pod: {r:?}"
        );
        ensure!(
            r.stdout == "hello-from-host\n",
            "the pod did not get the host's answer: {r:?}"
        );

        let mut destroy = DestroySandboxRequest::new();
        destroy.grace_period_ms = 1000;
        for _ in 0..2 {
            pod.rt
                .block_on(pod.sandbox.destroy_sandbox(secs(60), &destroy))
                .context("DestroySandbox")?;
        }
        pod.shut_down()
    }
}
