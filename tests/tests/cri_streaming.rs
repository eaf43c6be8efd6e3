//! CRI streaming and logs (cri-tools' "streaming exec/attach with tty and stdin",
//! "multi-container pods" and "container logs" areas), for both runtime handlers,
//! `runc` and `crx` (`crx_tests::cri::suite`): Exec with and without a tty over
//! containerd's streaming server (stdin in; stdout, stderr and the exit status out; a
//! terminal resize), Attach to a container's tty, two containers of one pod sharing
//! its network, IPC and hostname, and the CRI log file (long lines split into partial
//! records, ReopenContainerLog).
//!
//! For crx the streams cross: containerd's FIFOs → the shim's splices → vsock → the
//! agent → the process in the guest.
//!
//! `cargo build --release -p containerd-shim-crx-v2 && CRX_SHIM_DIR=target/release
//! cargo test -p crx-tests --test cri_streaming` (the crx cases also need the guest
//! kernel and initramfs: `scripts/test.sh` builds them).

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::{bail, ensure, Context, Result};
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::streaming::{ExitStatus, RemoteCommand, StreamFlags};
    use crx_tests::cri::suite::{poll, text, Suite, EXEC, EXIT};
    use crx_tests::for_each_handler;
    use k8s_cri::v1 as cri;

    for_each_handler!(
        exec_without_tty,
        exec_with_tty_and_resize,
        attach_to_a_tty_container,
        multi_container_pod_shares_network_ipc_and_hostname,
        container_logs_split_long_lines_and_reopen,
    );

    /// How long one streamed answer (an echo, a `stty size`) may take to come back.
    const ANSWER: Duration = Duration::from_secs(30);

    fn pod(s: &Suite, name: &str) -> Result<(String, cri::PodSandboxConfig)> {
        let config = pod_config(name, &s.node.pod_log_dir(name));
        let id = s.run_pod(&config)?;
        Ok((id, config))
    }

    fn lines(bytes: &[u8]) -> Vec<String> {
        text(bytes)
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect()
    }

    /// Exec without a tty: stdin reaches the process, stdout and stderr come back on
    /// their own channels, and the exit code arrives in the v4 status.
    fn exec_without_tty(s: &Suite) -> Result<()> {
        let config = pod_config("stream-exec", &s.node.pod_log_dir("stream-exec"));
        let (pod_id, cid) = s.pod_with_sleeper(&config)?;
        let url = s.client()?.exec(
            &cid,
            &["/bin/sh", "-c", "read x; echo got:$x; echo err >&2; exit 4"],
            StreamFlags {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false,
            },
        )?;
        let mut session = RemoteCommand::open(&url)?;
        let line = format!("hello from {}", s.handler);
        session.write_stdin(format!("{line}\n").as_bytes())?;
        let ended = session.read_until(EXEC, |r| !r.error.is_empty())?;
        ensure!(
            ended,
            "no status within {EXEC:?}; stdout {:?}, stderr {:?}",
            session.stdout_text(),
            session.stderr_text()
        );
        let status = session.exit_status()?;
        session.wait_closed(ANSWER)?;
        ensure!(
            lines(&session.stdout).contains(&format!("got:{line}")),
            "stdout {:?}",
            session.stdout_text()
        );
        ensure!(
            lines(&session.stderr).iter().any(|l| l == "err"),
            "stderr {:?}",
            session.stderr_text()
        );
        ensure!(
            !session.stdout_text().contains("err"),
            "stderr leaked into stdout: {:?}",
            session.stdout_text()
        );
        ensure!(
            status == Some(ExitStatus::Code(4)),
            "status {status:?} (error channel {:?}), want exit code 4",
            text(&session.error)
        );
        session.close();
        s.remove_pod(&pod_id)
    }

    /// Exec with a tty: the output arrives on stdout, and `stty size` shows the size a
    /// resize message set.
    fn exec_with_tty_and_resize(s: &Suite) -> Result<()> {
        let config = pod_config("stream-tty", &s.node.pod_log_dir("stream-tty"));
        let (pod_id, cid) = s.pod_with_sleeper(&config)?;
        let url = s.client()?.exec(
            &cid,
            &[
                "/bin/sh",
                "-c",
                "while read x; do [ \"$x\" = q ] && exit 3; stty size; done",
            ],
            StreamFlags {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true,
            },
        )?;
        let mut session = RemoteCommand::open(&url)?;
        let (cols, rows) = (123u16, 45u16);
        let want = format!("{rows} {cols}");
        // The resize and stdin travel separately: ask again until the size shows.
        let shown = poll(ANSWER, || {
            session.resize(cols, rows).ok()?;
            session.write_stdin(b"\n").ok()?;
            let seen = session
                .read_until(Duration::from_secs(1), |r| lines(&r.stdout).contains(&want))
                .ok()?;
            seen.then_some(())
        });
        ensure!(
            shown.is_some(),
            "`stty size` never showed {want:?}; stdout {:?}, error {:?}",
            session.stdout_text(),
            text(&session.error)
        );
        session.write_stdin(b"q\n")?;
        let ended = session.read_until(EXEC, |r| !r.error.is_empty())?;
        ensure!(
            ended,
            "no status after `q`; stdout {:?}",
            session.stdout_text()
        );
        let status = session.exit_status()?;
        ensure!(
            status == Some(ExitStatus::Code(3)),
            "status {status:?}, want exit code 3"
        );
        ensure!(
            session.stderr.is_empty(),
            "a tty exec wrote on the stderr channel: {:?}",
            session.stderr_text()
        );
        session.close();
        s.remove_pod(&pod_id)
    }

    /// Attach to a container running `sh` on a tty: a command typed in runs and its
    /// output comes back; `exit 0` ends the container with exit code 0.
    fn attach_to_a_tty_container(s: &Suite) -> Result<()> {
        let (pod_id, config) = pod(s, "stream-attach")?;
        let client = s.client()?;
        let mut c = container_config("shell", s.node.busybox(), &["/bin/sh"], "shell.log");
        c.stdin = true;
        c.tty = true;
        let cid = client
            .create_container(&pod_id, &c, &config)
            .context("CreateContainer")?;
        client.start_container(&cid).context("StartContainer")?;
        let url = client.attach(
            &cid,
            StreamFlags {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true,
            },
        )?;
        let mut session = RemoteCommand::open(&url)?;
        session.write_stdin(b"echo attached\n")?;
        let answered =
            session.read_until(ANSWER, |r| lines(&r.stdout).iter().any(|l| l == "attached"))?;
        ensure!(
            answered,
            "no `attached` line within {ANSWER:?}; stdout {:?}, error {:?}",
            session.stdout_text(),
            text(&session.error)
        );
        session.write_stdin(b"exit 0\n")?;
        let exited = client.wait_exited(&cid, EXIT)?;
        ensure!(
            exited.exit_code == 0,
            "the shell exited {}: {exited:?}",
            exited.exit_code
        );
        ensure!(
            session.wait_closed(ANSWER)?,
            "the attach session stayed open after the container exited"
        );
        s.remove_pod(&pod_id)
    }

    /// Two containers of one pod: the same network (one connects to the other's
    /// listener on 127.0.0.1), IPC namespace and hostname.
    fn multi_container_pod_shares_network_ipc_and_hostname(s: &Suite) -> Result<()> {
        let name = "stream-multi";
        let (pod_id, config) = pod(s, name)?;
        let client = s.client()?;
        let server = container_config(
            "server",
            s.node.busybox(),
            &["/bin/nc", "-l", "-p", "7000", "-e", "echo", "hi"],
            "server.log",
        );
        let server_id = client
            .create_container(&pod_id, &server, &config)
            .context("CreateContainer server")?;
        client
            .start_container(&server_id)
            .context("StartContainer server")?;
        let peer = container_config(
            "peer",
            s.node.busybox(),
            &["/bin/sleep", "3600"],
            "peer.log",
        );
        let peer_id = client
            .create_container(&pod_id, &peer, &config)
            .context("CreateContainer peer")?;
        client
            .start_container(&peer_id)
            .context("StartContainer peer")?;

        // While the server still listens (it serves one connection, then exits).
        let probe = "hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/net; \
                     readlink /proc/self/ns/uts";
        let mut seen = Vec::new();
        for cid in [&server_id, &peer_id] {
            let r = s.exec(cid, &["/bin/sh", "-c", probe])?;
            ensure!(
                r.exit_code == 0,
                "probe exited {}: {}",
                r.exit_code,
                text(&r.stderr)
            );
            seen.push(lines(&r.stdout));
        }
        ensure!(
            seen[0].first().map(String::as_str) == Some(name),
            "server's hostname: {:?}",
            seen[0]
        );
        ensure!(
            seen[0] == seen[1],
            "the containers see different hostname/ipc/net/uts: {:?} vs {:?}",
            seen[0],
            seen[1]
        );

        let reply = poll(EXIT, || {
            let r = s
                .exec(&peer_id, &["/bin/sh", "-c", "nc 127.0.0.1 7000 </dev/null"])
                .ok()?;
            lines(&r.stdout).iter().any(|l| l == "hi").then_some(r)
        });
        ensure!(
            reply.is_some(),
            "the peer never read `hi` from 127.0.0.1:7000 within {EXIT:?}"
        );
        let exited = client.wait_exited(&server_id, EXIT)?;
        ensure!(
            exited.exit_code == 0,
            "the server exited {} after serving",
            exited.exit_code
        );
        s.remove_pod(&pod_id)
    }

    const LOG_LINES: usize = 2000;
    const LONG_LINE: usize = 40_000;
    /// containerd's default max_container_log_line_size.
    const LOG_RECORD: usize = 16 * 1024;

    /// One record of a CRI log file.
    struct Record {
        stream: String,
        partial: bool,
        body: String,
    }

    fn records(path: &Path) -> Result<Vec<Record>> {
        let raw = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        raw.lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let (Some(_time), Some(stream), Some(tag), body) =
                    (f.next(), f.next(), f.next(), f.next().unwrap_or(""))
                else {
                    bail!("malformed CRI log line {l:?}");
                };
                let partial = match tag {
                    "P" => true,
                    "F" => false,
                    other => bail!("tag {other:?} in {l:?}"),
                };
                Ok(Record {
                    stream: stream.to_owned(),
                    partial,
                    body: body.to_owned(),
                })
            })
            .collect()
    }

    /// The stdout lines a log's records make (partials joined to their final), and
    /// how many records each line took.
    fn joined(records: &[Record]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut pending = String::new();
        let mut parts = 0;
        for r in records.iter().filter(|r| r.stream == "stdout") {
            pending.push_str(&r.body);
            parts += 1;
            if !r.partial {
                out.push((std::mem::take(&mut pending), parts));
                parts = 0;
            }
        }
        out
    }

    /// A container writes many lines and one longer than a log record: the CRI log
    /// has them all in order, the long one as partial records ended by a final one.
    /// After the log is rotated away, ReopenContainerLog starts a new file that gets
    /// the next output.
    fn container_logs_split_long_lines_and_reopen(s: &Suite) -> Result<()> {
        let (pod_id, config) = pod(s, "stream-logs")?;
        let client = s.client()?;
        let script = format!(
            "i=0; while [ $i -lt {LOG_LINES} ]; do echo line-$i; i=$((i+1)); done; \
             head -c {LONG_LINE} /dev/zero | tr '\\0' x; echo; echo END; \
             while :; do if [ -e /tmp/reopen ]; then rm /tmp/reopen; echo after-reopen; fi; \
             sleep 0.1; done"
        );
        let c = container_config(
            "writer",
            s.node.busybox(),
            &["/bin/sh", "-c", &script],
            "writer.log",
        );
        let cid = client
            .create_container(&pod_id, &c, &config)
            .context("CreateContainer")?;
        client.start_container(&cid).context("StartContainer")?;
        let log: PathBuf = Path::new(&config.log_directory).join("writer.log");

        let complete = poll(EXIT, || {
            let recs = records(&log).ok()?;
            let lines = joined(&recs);
            lines.iter().any(|(l, _)| l == "END").then_some(lines)
        })
        .with_context(|| format!("no END line in {} within {EXIT:?}", log.display()))?;
        let mut want: Vec<String> = (0..LOG_LINES).map(|i| format!("line-{i}")).collect();
        want.push("x".repeat(LONG_LINE));
        want.push("END".into());
        let got: Vec<&str> = complete.iter().map(|(l, _)| l.as_str()).collect();
        ensure!(
            got.len() == want.len(),
            "{} stdout lines in the log, want {}",
            got.len(),
            want.len()
        );
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            bail!(
                "log line {i} is {:?}… ({} bytes), want {:?}… ({} bytes)",
                got[i].chars().take(40).collect::<String>(),
                got[i].len(),
                want[i].chars().take(40).collect::<String>(),
                want[i].len()
            );
        }
        let long_parts = complete[LOG_LINES].1;
        ensure!(
            long_parts >= LONG_LINE.div_ceil(LOG_RECORD),
            "the {LONG_LINE}-byte line took {long_parts} records, want partials of at most \
             {LOG_RECORD} bytes"
        );
        ensure!(
            complete[..LOG_LINES].iter().all(|(_, parts)| *parts == 1),
            "a short line was split into partial records"
        );

        let rotated = log.with_extension("log.1");
        std::fs::rename(&log, &rotated).context("rotating the log away")?;
        client
            .reopen_container_log(&cid)
            .context("ReopenContainerLog")?;
        let r = s.exec(&cid, &["/bin/touch", "/tmp/reopen"])?;
        ensure!(r.exit_code == 0, "touch: {}", text(&r.stderr));
        let reopened = poll(EXIT, || {
            let lines = joined(&records(&log).ok()?);
            lines
                .iter()
                .any(|(l, _)| l == "after-reopen")
                .then_some(lines)
        })
        .with_context(|| {
            format!(
                "no `after-reopen` in the reopened {} within {EXIT:?}",
                log.display()
            )
        })?;
        ensure!(
            !reopened.iter().any(|(l, _)| l.starts_with("line-")),
            "the reopened log repeats old output"
        );
        let old = joined(&records(&rotated)?);
        ensure!(
            !old.iter().any(|(l, _)| l == "after-reopen"),
            "output after ReopenContainerLog went to the rotated file"
        );
        s.remove_pod(&pod_id)
    }
}
