//! CRI PortForward (what `kubectl port-forward` ends in) for both runtime handlers,
//! `runc` and `crx`: a pod runs two busybox `nc` servers, one greeting every connection
//! with a known line, one echoing what it reads; PortForward hands back a URL of
//! containerd's streaming server, and the test speaks the Kubernetes port-forward
//! protocol to it (websocket, subprotocol `v4.channel.k8s.io`: every binary message
//! starts with its channel byte, channel 0 carries the port's data and channel 1 its
//! errors, and the server's first message on each channel is the port as 2
//! little-endian bytes). The greeting must arrive, and a line sent to the echo server
//! must come back.
//!
//! For crx this crosses: containerd dialing 127.0.0.1:PORT in the pod's network
//! namespace → the shim's listener there → hybrid vsock → the agent → the server in the
//! guest.
//!
//! `cargo build -p containerd-shim-crx-v2 && cargo test -p crx-tests --test
//! cri_port_forward` (the crx case also needs the guest kernel and initramfs:
//! `scripts/test.sh` builds them).

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_tests::containerd::wait_until_empty;
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::streaming::{ChannelSocket, Received};
    use crx_tests::cri::CriContainerd;
    use k8s_cri::v1 as cri;

    /// One test at a time: every containerd puts its pods on the same test bridge.
    static SERIAL: Mutex<()> = Mutex::new(());
    /// How long a pod may take to be fully released after RemovePodSandbox.
    const RELEASE: Duration = Duration::from_secs(30);
    /// From StartContainer until a forwarded connection must have carried the greeting
    /// (a crx pod: the server starting under TCG, then the shim's next port poll).
    const REACHABLE: Duration = Duration::from_secs(60);
    /// How long one forwarded connection may take to deliver the greeting and close.
    const ONE_TRY: Duration = Duration::from_secs(15);
    /// The port of the server in the pod that greets every connection.
    const GREETER_PORT: u16 = 8080;
    /// The port of the server in the pod that echoes what it reads.
    const ECHO_PORT: u16 = 8081;
    /// What the greeter writes to every connection.
    const GREETING: &str = "hello from the pod";
    const DATA_CHANNEL: u8 = 0;
    const ERROR_CHANNEL: u8 = 1;

    mod port_forward_reaches_a_listening_container {
        #[test]
        fn runc() {
            super::run_case("runc")
        }
        #[test]
        fn crx() {
            super::run_case("crx")
        }
    }

    fn run_case(handler: &str) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let node = match CriContainerd::start(handler == "crx") {
            Ok(node) => node,
            Err(e) => panic!("[{handler}] starting containerd with CRI: {e:#}"),
        };
        let mut crx_pods = Vec::new();
        let outcome = port_forward_case(&node, handler, &mut crx_pods);
        if let Err(e) = outcome {
            panic!(
                "[{handler}] {e:#}\n--- containerd log (tail) ---\n{}",
                node.log_tail(25)
            );
        }
        let pod_refs: Vec<&str> = crx_pods.iter().map(String::as_str).collect();
        let left = wait_until_empty(RELEASE, || node.leftovers(&pod_refs));
        assert!(
            left.is_empty(),
            "[{handler}] the case passed but left: {left:#?}\n--- containerd log (tail) ---\n{}",
            node.log_tail(25)
        );
    }

    /// Runs the pod's two servers, forwards to the greeter until its line arrives (it
    /// may take a few tries while the server starts), then once more to time a warm
    /// connection, sends a line through the echo server and reads it back, and removes
    /// the pod.
    fn port_forward_case(
        node: &CriContainerd,
        handler: &str,
        crx_pods: &mut Vec<String>,
    ) -> Result<()> {
        let client = node.client()?;
        let name = format!("pf-{handler}");
        let pod = pod_config(&name, &node.pod_log_dir(&name));
        let pod_id = client
            .run_pod_sandbox(&pod, handler)
            .with_context(|| format!("RunPodSandbox on handler {handler}"))?;
        if handler == "crx" {
            crx_pods.push(pod_id.clone());
        }
        let outcome = forward_to_servers(node, handler, &pod, &pod_id);
        client.stop_pod_sandbox(&pod_id).context("StopPodSandbox")?;
        client
            .remove_pod_sandbox(&pod_id)
            .context("RemovePodSandbox")?;
        outcome
    }

    fn forward_to_servers(
        node: &CriContainerd,
        handler: &str,
        pod: &cri::PodSandboxConfig,
        pod_id: &str,
    ) -> Result<()> {
        let client = node.client()?;
        let greeting = format!("echo {GREETING}");
        let greeter_port = GREETER_PORT.to_string();
        let echo_port = ECHO_PORT.to_string();
        let servers = [
            (
                "greeter",
                vec![
                    "/bin/nc",
                    "-ll",
                    "-p",
                    &greeter_port,
                    "-e",
                    "/bin/sh",
                    "-c",
                    &greeting,
                ],
            ),
            (
                "echo",
                vec!["/bin/nc", "-ll", "-p", &echo_port, "-e", "/bin/cat"],
            ),
        ];
        let mut started = Instant::now();
        for (name, command) in &servers {
            let config = container_config(name, node.busybox(), command, &format!("{name}.log"));
            let cid = client
                .create_container(pod_id, &config, pod)
                .with_context(|| format!("CreateContainer {name}"))?;
            client
                .start_container(&cid)
                .with_context(|| format!("StartContainer {name}"))?;
            started = Instant::now();
        }
        let deadline = started + REACHABLE;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let failure = match forward_once(client, pod_id, GREETER_PORT, None, GREETING) {
                Ok(f) if f.text.contains(GREETING) => break,
                Ok(f) => format!("the forwarded connection carried {:?}", f.text),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "no greeting through PortForward within {REACHABLE:?} of StartContainer \
                     ({tries} tries); last: {failure}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let first = started.elapsed();
        let warm = forward_once(client, pod_id, GREETER_PORT, None, GREETING)
            .context("a second forwarded connection")?;
        ensure!(
            warm.text.contains(GREETING),
            "second connection carried {:?}",
            warm.text
        );
        // The other direction: what the client sends reaches the server in the pod.
        let line = format!("ping through {handler}\n");
        let echoed = poll_forward(client, pod_id, ECHO_PORT, line.as_bytes(), &line)?;
        eprintln!(
            "[{handler}] greeting through PortForward {first:?} after the last StartContainer \
             ({tries} tries); warm connection, PortForward call to greeting: {:?}; \
             echo round trip: {:?}",
            warm.wanted_after, echoed.wanted_after
        );
        Ok(())
    }

    /// Forwards to `port` sending `send` until `want` comes back, for a bounded time
    /// (the echo server may still be starting).
    fn poll_forward(
        client: &crx_tests::cri::CriClient,
        pod_id: &str,
        port: u16,
        send: &[u8],
        want: &str,
    ) -> Result<Forwarded> {
        let deadline = Instant::now() + REACHABLE;
        loop {
            let failure = match forward_once(client, pod_id, port, Some(send), want) {
                Ok(f) if f.text.contains(want) => return Ok(f),
                Ok(f) => format!("port {port} carried {:?}, want {want:?}", f.text),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("forwarding to port {port}: {failure}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// One PortForward and one websocket session to `port`: sends `send` (if any) on
    /// the data channel and reads until the data channel carried `want` or the session
    /// closed; returns what the data channel carried after the port prefix, or an
    /// error naming the error channel's text when the forward failed (say, nothing
    /// listening yet).
    fn forward_once(
        client: &crx_tests::cri::CriClient,
        pod_id: &str,
        port: u16,
        send: Option<&[u8]>,
        want: &str,
    ) -> Result<Forwarded> {
        let begun = Instant::now();
        let mut wanted_after = None;
        let url = client
            .port_forward(pod_id, &[i32::from(port)])
            .context("PortForward")?;
        let mut socket = ChannelSocket::connect(&url, Some(&format!("port={port}")))
            .context("port-forward websocket")?;
        if let Some(bytes) = send {
            socket
                .send(DATA_CHANNEL, bytes)
                .context("writing to the port-forward websocket")?;
        }
        let deadline = Instant::now() + ONE_TRY;
        let mut data: Vec<u8> = Vec::new();
        let mut errors: Vec<u8> = Vec::new();
        let mut prefixes_seen = [false, false];
        while wanted_after.is_none() {
            if Instant::now() > deadline {
                bail!(
                    "no {want:?} nor a close within {ONE_TRY:?}; data so far {:?}",
                    String::from_utf8_lossy(&data)
                );
            }
            let (channel, payload) = match socket
                .recv()
                .context("reading the port-forward websocket")?
            {
                Received::Frame(channel, payload) => (channel, payload),
                Received::Idle => continue,
                Received::Closed => break,
            };
            let rest = payload.as_slice();
            let (index, sink) = match channel {
                DATA_CHANNEL => (0, &mut data),
                ERROR_CHANNEL => (1, &mut errors),
                other => bail!("message on unknown channel {other}"),
            };
            let mut rest = rest;
            if !prefixes_seen[index] {
                let Some((prefix, tail)) = rest.split_first_chunk::<2>() else {
                    bail!("first message of channel {channel} is shorter than the port prefix");
                };
                let named = u16::from_le_bytes(*prefix);
                ensure!(
                    named == port,
                    "channel {channel} names port {named}, want {port}"
                );
                prefixes_seen[index] = true;
                rest = tail;
            }
            sink.extend_from_slice(rest);
            if String::from_utf8_lossy(&data).contains(want) {
                wanted_after = Some(begun.elapsed());
            }
        }
        socket.close();
        ensure!(
            errors.is_empty(),
            "port-forward error: {}",
            String::from_utf8_lossy(&errors)
        );
        Ok(Forwarded {
            text: String::from_utf8_lossy(&data).into_owned(),
            wanted_after,
        })
    }

    /// What one forwarded connection carried, and when the wanted text had arrived
    /// (from the PortForward call on).
    struct Forwarded {
        text: String,
        wanted_after: Option<Duration>,
    }
}
