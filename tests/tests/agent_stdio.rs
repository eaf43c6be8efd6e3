//! Process stdio in a real guest (QEMU/TCG, one VM for every case), every stream through
//! the VMM's hybrid vsock (port 1026, stdio.proto): a shell on a pty with its window
//! size set before and after start, stdin round-tripping through `cat` (EOF by
//! half-close and by CloseStdin), and 100 MB of stdout arriving whole (the MB/s is
//! printed).
//!
//! Needs the artifacts `scripts/test.sh` builds (the agent with its `containers`
//! feature), QEMU and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::stdio::StreamKind;
    use crx_tests::guest_pod::{attach_stream, collect, oci_spec, secs, GuestPod};

    /// A spec with the container's own devpts, where libcontainer makes the pty.
    fn tty_spec(args: &[&str]) -> Vec<u8> {
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"hostname":"crx-vm-test",
              "process":{{"terminal":true,"args":[{}],"cwd":"/","env":["PATH=/bin","TERM=dumb"],
                          "user":{{"uid":0,"gid":0}},"noNewPrivileges":true}},
              "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                        {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}},
                        {{"destination":"/dev/pts","type":"devpts","source":"devpts",
                          "options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]}},
                        {{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}}],
              "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}}}}"#,
            args.join(",")
        )
        .into_bytes()
    }

    fn resize(pod: &GuestPod, id: &str, rows: u32, cols: u32) -> Result<()> {
        let mut req = ResizeTtyRequest::new();
        req.container_id = id.into();
        req.rows = rows;
        req.cols = cols;
        pod.rt
            .block_on(pod.containers.resize_tty(secs(30), &req))
            .with_context(|| format!("ResizeTty {id} {rows}x{cols}"))?;
        Ok(())
    }

    /// Reads into `seen` until it holds `needle`, within `limit`.
    fn read_until(
        conn: &mut UnixStream,
        seen: &mut Vec<u8>,
        needle: &str,
        limit: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {needle:?} within {limit:?}; got {:?}",
                    String::from_utf8_lossy(seen)
                );
            }
            conn.set_read_timeout(Some(left))?;
            match conn.read(&mut buf) {
                Ok(0) => bail!(
                    "EOF before {needle:?}; got {:?}",
                    String::from_utf8_lossy(seen)
                ),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => bail!(
                    "reading the tty: {e}; got {:?}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
        Ok(())
    }

    fn tty_shell(pod: &mut GuestPod) -> Result<()> {
        let id = pod.next_id();
        let mut stdio = StdioSpec::new();
        stdio.terminal = true;
        stdio.stdin = true;
        pod.create(&id, tty_spec(&["sh"]), stdio)?;
        resize(pod, &id, 33, 101)?;
        let mut tty = attach_stream(&pod.uds, &id, "", StreamKind::STREAM_KIND_TTY)?;
        pod.start(&id, "")?;
        let mut seen = Vec::new();
        tty.write_all(b"tty; stty size\n")?;
        read_until(&mut tty, &mut seen, "33 101", Duration::from_secs(60))?;
        ensure!(
            String::from_utf8_lossy(&seen).contains("/dev/pts/"),
            "the shell's stdin is not its pty: {:?}",
            String::from_utf8_lossy(&seen)
        );
        resize(pod, &id, 44, 120)?;
        tty.write_all(b"echo hi; stty size; exit 3\n")?;
        tty.set_read_timeout(Some(Duration::from_secs(60)))?;
        tty.read_to_end(&mut seen)
            .context("the TTY stream did not reach EOF after the shell exited")?;
        let text = String::from_utf8_lossy(&seen);
        ensure!(
            text.contains("\nhi\r\n") && text.contains("44 120\r\n"),
            "tty output: {text:?}"
        );
        let exit = pod.wait(&id, "")?;
        ensure!(exit.exit_status == 3, "the shell exited with {exit:?}");
        // A process without a terminal cannot be resized.
        let plain = pod.next_id();
        pod.create(&plain, oci_spec(&["true"], "", ""), StdioSpec::new())?;
        let mut req = ResizeTtyRequest::new();
        req.container_id = plain.clone();
        req.rows = 24;
        req.cols = 80;
        match pod.rt.block_on(pod.containers.resize_tty(secs(30), &req)) {
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::FAILED_PRECONDITION => {}
            other => bail!("ResizeTty without a terminal gave {other:?}"),
        }
        pod.remove(&plain, true)?;
        pod.remove(&id, false)
    }

    fn stdin_round_trip(pod: &mut GuestPod) -> Result<()> {
        let id = pod.next_id();
        let mut stdio = StdioSpec::new();
        stdio.stdin = true;
        stdio.stdout = true;
        pod.create(&id, oci_spec(&["cat"], "", ""), stdio.clone())?;
        let mut stdin = attach_stream(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDIN)?;
        let out = collect(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDOUT)?;
        pod.start(&id, "")?;
        let sent: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || -> std::io::Result<UnixStream> {
                stdin.write_all(&sent)?;
                stdin.shutdown(std::net::Shutdown::Write)?;
                Ok(stdin)
            })
        };
        let exit = pod.wait(&id, "")?;
        let got = out.join().unwrap_or_default();
        let _stdin = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the stdin writer panicked"))??;
        ensure!(exit.exit_status == 0, "cat exited with {exit:?}");
        ensure!(
            got == sent,
            "cat echoed {} bytes of {} (or different ones)",
            got.len(),
            sent.len()
        );
        pod.remove(&id, false)?;

        // CloseStdin while the host's stream stays open.
        let id = pod.next_id();
        pod.create(&id, oci_spec(&["cat"], "", ""), stdio)?;
        let mut stdin = attach_stream(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDIN)?;
        let mut out = attach_stream(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDOUT)?;
        pod.start(&id, "")?;
        stdin.write_all(b"pong\n")?;
        let mut echoed = [0u8; 5];
        out.read_exact(&mut echoed)?;
        ensure!(&echoed == b"pong\n", "cat echoed {echoed:?}");
        let mut req = CloseStdinRequest::new();
        req.container_id = id.clone();
        pod.rt
            .block_on(pod.containers.close_stdin(secs(30), &req))
            .context("CloseStdin")?;
        let exit = pod.wait(&id, "")?;
        ensure!(exit.exit_status == 0, "cat after CloseStdin: {exit:?}");
        let mut rest = Vec::new();
        out.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "more output after CloseStdin: {rest:?}");
        drop(stdin);
        pod.remove(&id, false)
    }

    fn hundred_megabytes(pod: &mut GuestPod) -> Result<f64> {
        const TOTAL: u64 = 100 << 20;
        let id = pod.next_id();
        let mut stdio = StdioSpec::new();
        stdio.stdout = true;
        stdio.stderr = true;
        pod.create(
            &id,
            oci_spec(&["dd", "if=/dev/zero", "bs=1M", "count=100"], "", ""),
            stdio,
        )?;
        let mut out = attach_stream(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDOUT)?;
        let err = collect(&pod.uds, &id, "", StreamKind::STREAM_KIND_STDERR)?;
        pod.start(&id, "")?;
        let started = Instant::now();
        let mut buf = vec![0u8; 256 << 10];
        let (mut received, mut non_zero) = (0u64, 0u64);
        loop {
            let n = out.read(&mut buf).context("reading stdout")?;
            if n == 0 {
                break;
            }
            received += n as u64;
            non_zero += buf[..n].iter().filter(|b| **b != 0).count() as u64;
        }
        let elapsed = started.elapsed();
        let exit = pod.wait(&id, "")?;
        let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        ensure!(exit.exit_status == 0, "dd exited with {exit:?}: {err}");
        ensure!(
            received == TOTAL && non_zero == 0,
            "received {received} bytes ({non_zero} not zero) of {TOTAL}"
        );
        pod.remove(&id, false)?;
        Ok(TOTAL as f64 / 1e6 / elapsed.as_secs_f64())
    }

    #[test]
    fn tty_stdin_and_bulk_stdout_through_the_vmm_vsock() -> Result<()> {
        let mut pod = GuestPod::boot("agent-stdio", 256, |_, _| Ok(()))?;
        tty_shell(&mut pod).context("tty")?;
        stdin_round_trip(&mut pod).context("stdin")?;
        let mb_per_s = hundred_megabytes(&mut pod).context("100 MB of stdout")?;
        eprintln!("100 MB of stdout through the VMM's vsock: {mb_per_s:.1} MB/s");
        pod.shut_down()
    }
}
