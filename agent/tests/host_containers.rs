//! Containers in host mode: the agent binary (built with `--features containers`) on a
//! Unix socket runs busybox containers through libcontainer; stdio arrives on separate
//! stream connections (stdio.proto) on `<socket>_1026`.
//!
//! This host is cgroup v1, and the agent is built for cgroup v2 only, so each agent runs
//! in a private mount namespace with a controller-less cgroup2 mounted on
//! /sys/fs/cgroup (limits and OOM are tested in the VM lane). Needs root and Debian's
//! busybox-static (`/bin/busybox`).
#![cfg(feature = "containers")]

mod common;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use crx_protocols::v1::container::*;
    use crx_protocols::v1::stdio::StreamKind;

    use super::common::{attach, code, secs, spec, unique, Rig};

    #[test]
    fn echo_output_arrives_on_the_stdout_stream_and_exits_zero() {
        let rig = Rig::start();
        let (exit, out, err) = rig.run(&spec(&["echo", "hi"], ""));
        assert_eq!(out, "hi\n");
        assert_eq!(err, "");
        assert_eq!(exit.exit_status, 0);
        assert_eq!(exit.signal, 0);
        assert!(exit.pid > 0);
        assert!(exit.exited_at_unix_nanos > 0);
        // stderr is its own stream.
        let (exit, out, err) = rig.run(&spec(&["sh", "-c", "echo oops >&2; exit 3"], ""));
        assert_eq!(
            (exit.exit_status, out.as_str(), err.as_str()),
            (3, "", "oops\n")
        );
    }

    #[test]
    fn sigkill_gives_137_and_the_container_can_then_be_removed() {
        let rig = Rig::start();
        let id = unique("sleeper");
        rig.create(
            &id,
            spec(&["sleep", "100"], "").as_bytes(),
            (false, false, false),
        )
        .unwrap();
        rig.start_init(&id).unwrap();
        // Still running: a short wait times out and removal without force is refused.
        let (c, _) = code(rig.wait(&id, 1));
        assert_eq!(c, ttrpc::Code::DEADLINE_EXCEEDED);
        let (c, msg) = code(rig.remove(&id, false));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
        rig.signal(&id, 9).unwrap();
        let exit = rig.wait(&id, 30).unwrap();
        assert_eq!((exit.exit_status, exit.signal), (137, 9));
        rig.remove(&id, false).unwrap();
        // Gone, and the id is free again.
        let (c, _) = code(rig.wait(&id, 5));
        assert_eq!(c, ttrpc::Code::NOT_FOUND);
        rig.create(&id, spec(&["true"], "").as_bytes(), (false, false, false))
            .unwrap();
        rig.remove(&id, true).unwrap();
    }

    #[test]
    fn a_seccomp_profile_denying_mkdir_makes_mkdir_fail() {
        let rig = Rig::start();
        let deny = r#","seccomp":{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
        let (exit, _, err) = rig.run(&spec(&["mkdir", "/tmp/x"], deny));
        assert_ne!(
            exit.exit_status, 0,
            "mkdir succeeded under a profile denying it"
        );
        assert!(err.contains("Operation not permitted"), "stderr: {err}");
        // The same program without the profile succeeds: it was the profile.
        let (exit, _, err) = rig.run(&spec(&["mkdir", "/tmp/x"], ""));
        assert_eq!(exit.exit_status, 0, "stderr: {err}");
    }

    #[test]
    fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
        let rig = Rig::start();
        // Unknown container, for every implemented method.
        let (c, msg) = code(rig.start_init("nope"));
        assert_eq!(c, ttrpc::Code::NOT_FOUND);
        assert!(msg.contains("nope"), "{msg}");
        assert_eq!(code(rig.wait("nope", 5)).0, ttrpc::Code::NOT_FOUND);
        assert_eq!(code(rig.signal("nope", 9)).0, ttrpc::Code::NOT_FOUND);
        assert_eq!(code(rig.remove("nope", true)).0, ttrpc::Code::NOT_FOUND);
        assert!(attach(
            &rig.stdio_socket(),
            "nope",
            "",
            StreamKind::STREAM_KIND_STDOUT
        )
        .is_err());

        // Malformed specs and ids.
        let (c, msg) = code(rig.create(&unique("m"), b"{not json", (false, true, false)));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT);
        assert!(msg.contains("oci_spec"), "{msg}");
        let no_process = r#"{"ociVersion":"1.0.2","root":{"path":"r"},"linux":{}}"#;
        assert_eq!(
            code(rig.create(&unique("m"), no_process.as_bytes(), (false, false, false))).0,
            ttrpc::Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(rig.create(
                "../escape",
                spec(&["true"], "").as_bytes(),
                (false, false, false)
            ))
            .0,
            ttrpc::Code::INVALID_ARGUMENT
        );

        // Oversized: over the protocol's 1 MiB bound, and over ttrpc's own frame limit.
        let big = vec![b' '; 2 << 20];
        let (c, msg) = code(rig.create(&unique("big"), &big, (false, false, false)));
        assert_eq!(c, ttrpc::Code::RESOURCE_EXHAUSTED, "{msg}");
        let huge = vec![b' '; 5 << 20];
        assert!(rig
            .create(&unique("huge"), &huge, (false, false, false))
            .is_err());

        // Start before the declared streams are attached: refused, naming them.
        let id = unique("unattached");
        rig.create(&id, spec(&["true"], "").as_bytes(), (false, true, true))
            .unwrap();
        let mut req = StartContainerRequest::new();
        req.container_id = id.clone();
        let (c, msg) = code(rig.rt.block_on(rig.client.start_container(secs(1), &req)));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION);
        assert!(msg.contains("stdout") && msg.contains("stderr"), "{msg}");
        // An undeclared stream, and a second attach of one stream, are refused.
        assert!(attach(&rig.stdio_socket(), &id, "", StreamKind::STREAM_KIND_STDIN).is_err());
        let out = rig.collect(&id, StreamKind::STREAM_KIND_STDOUT);
        assert!(attach(&rig.stdio_socket(), &id, "", StreamKind::STREAM_KIND_STDOUT).is_err());
        let err = rig.collect(&id, StreamKind::STREAM_KIND_STDERR);
        rig.start_init(&id).unwrap();
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 0);
        assert!(out.join().unwrap().is_empty());
        assert!(err.join().unwrap().is_empty());
        rig.remove(&id, false).unwrap();

        // Still serving after all that.
        let (exit, out, _) = rig.run(&spec(&["echo", "still here"], ""));
        assert_eq!((exit.exit_status, out.as_str()), (0, "still here\n"));
    }

    #[test]
    fn exec_runs_in_a_running_container_with_its_own_streams_and_exit() {
        let rig = Rig::start();
        let id = unique("host");
        rig.create(
            &id,
            spec(&["sleep", "100"], "").as_bytes(),
            (false, false, false),
        )
        .unwrap();
        // Not running yet: no exec.
        let (c, msg) = code(rig.exec(&id, "e0", &["true"], false));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
        rig.start_init(&id).unwrap();

        rig.exec(&id, "e1", &["sh", "-c", "echo from exec; hostname"], true)
            .unwrap();
        let (c, _) = code(rig.exec(&id, "e1", &["true"], false));
        assert_eq!(c, ttrpc::Code::ALREADY_EXISTS);
        let (c, _) = code(rig.wait_exec(&id, "e1", 5));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "wait before start");
        let out = rig.collect_exec(&id, "e1", StreamKind::STREAM_KIND_STDOUT);
        let pid = rig.start_process(&id, "e1").unwrap().pid;
        let exit = rig.wait_exec(&id, "e1", 30).unwrap();
        assert_eq!((exit.pid, exit.exit_status), (pid, 0));
        // It ran inside the container: the container's UTS namespace and hostname.
        assert_eq!(
            String::from_utf8(out.join().unwrap()).unwrap(),
            "from exec\ncrx-test\n"
        );

        rig.exec(&id, "e2", &["sh", "-c", "exit 5"], false).unwrap();
        rig.start_process(&id, "e2").unwrap();
        assert_eq!(rig.wait_exec(&id, "e2", 30).unwrap().exit_status, 5);
        let (c, _) = code(rig.wait_exec(&id, "nope", 5));
        assert_eq!(c, ttrpc::Code::NOT_FOUND);
        let (c, _) = code(rig.exec(&id, "bad/id", &["true"], false));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT);

        // The init is still running after its execs ended.
        assert_eq!(code(rig.wait(&id, 1)).0, ttrpc::Code::DEADLINE_EXCEEDED);
        rig.remove(&id, true).unwrap();
    }

    #[test]
    fn stdin_round_trips_and_close_stdin_gives_eof() {
        let rig = Rig::start();
        // The host half-closes its stdin stream: cat sees EOF and exits.
        let id = unique("cat");
        rig.create(&id, spec(&["cat"], "").as_bytes(), (true, true, false))
            .unwrap();
        let mut stdin =
            attach(&rig.stdio_socket(), &id, "", StreamKind::STREAM_KIND_STDIN).unwrap();
        let out = rig.collect(&id, StreamKind::STREAM_KIND_STDOUT);
        rig.start_init(&id).unwrap();
        stdin.write_all(b"ping\n").unwrap();
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 0);
        assert_eq!(out.join().unwrap(), b"ping\n");
        rig.remove(&id, false).unwrap();

        // CloseStdin ends stdin while the host's stream is still open.
        let id = unique("cat");
        rig.create(&id, spec(&["cat"], "").as_bytes(), (true, true, false))
            .unwrap();
        let mut stdin =
            attach(&rig.stdio_socket(), &id, "", StreamKind::STREAM_KIND_STDIN).unwrap();
        let mut out = attach(&rig.stdio_socket(), &id, "", StreamKind::STREAM_KIND_STDOUT).unwrap();
        rig.start_init(&id).unwrap();
        stdin.write_all(b"pong\n").unwrap();
        // Once cat has echoed it, CloseStdin cannot overtake the bytes.
        let mut echoed = [0u8; 5];
        out.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"pong\n");
        let (c, _) = code(rig.wait(&id, 1));
        assert_eq!(
            c,
            ttrpc::Code::DEADLINE_EXCEEDED,
            "cat ended before CloseStdin"
        );
        let mut req = CloseStdinRequest::new();
        req.container_id = id.clone();
        rig.rt
            .block_on(rig.client.close_stdin(secs(5), &req))
            .unwrap();
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 0);
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(stdin);
        rig.remove(&id, false).unwrap();
    }

    #[test]
    fn a_program_named_by_path_runs_without_path_in_its_environment() {
        let rig = Rig::start();
        let spec = spec(&["/bin/cat", "/proc/self/environ"], "")
            .replace(r#""env":["PATH=/bin"]"#, r#""env":["GREETING=hi"]"#);
        assert!(spec.contains("GREETING"), "the spec template changed");
        let (exit, out, err) = rig.run(&spec);
        assert_eq!(exit.exit_status, 0, "stderr: {err}");
        let vars: Vec<&str> = out.split('\0').filter(|v| !v.is_empty()).collect();
        assert!(vars.contains(&"GREETING=hi"), "{vars:?}");
        assert!(!vars.iter().any(|v| v.starts_with("PATH=")), "{vars:?}");
    }

    /// Runs `call` with a ttrpc deadline `window` away; the reply must come before it.
    fn answered_before_the_deadline<T: std::fmt::Debug>(
        window: std::time::Duration,
        call: impl FnOnce(ttrpc::context::Context) -> ttrpc::Result<T>,
    ) -> (ttrpc::Result<T>, std::time::Duration) {
        let start = std::time::Instant::now();
        let deadline = start + window;
        let result = call(crx_protocols::hybrid_vsock::context_until(deadline));
        let answered = std::time::Instant::now();
        assert!(
            answered < deadline,
            "answered {:?} after the deadline: {result:?}",
            answered - deadline
        );
        (result, answered - start)
    }

    #[test]
    fn long_polls_answer_before_the_callers_deadline() {
        let rig = Rig::start();
        let window = std::time::Duration::from_secs(2);

        // Nothing ever happened in this agent: GetEvents answers empty.
        let (events, took) = answered_before_the_deadline(window, |ctx| {
            rig.rt
                .block_on(rig.client.get_events(ctx, &GetEventsRequest::new()))
        });
        let events = events.unwrap();
        assert!(events.events.is_empty(), "{events:?}");
        assert!(took >= window / 2, "answered early, after {took:?}");

        let id = unique("poll");
        rig.create(
            &id,
            spec(&["sleep", "30"], "").as_bytes(),
            (false, false, false),
        )
        .unwrap();
        rig.start_init(&id).unwrap();
        let mut req = WaitProcessRequest::new();
        req.container_id = id.clone();
        let (waited, took) = answered_before_the_deadline(window, |ctx| {
            rig.rt.block_on(rig.client.wait_process(ctx, &req))
        });
        let (code, message) = code(waited);
        assert_eq!(code, ttrpc::Code::DEADLINE_EXCEEDED, "{message}");
        assert!(took >= window / 2, "answered early, after {took:?}");
        rig.signal(&id, 9).unwrap();
        rig.wait(&id, 10).unwrap();
        rig.remove(&id, false).unwrap();
    }

    #[test]
    fn a_uid_gets_its_image_groups_and_home() {
        let rig = Rig::start();
        let etc = rig.rootfs.join("etc");
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            "root:x:0:\nuser:x:1000:\nextra:x:2000:user\n",
        )
        .unwrap();
        let spec = spec(
            &["sh", "-c", "id -u; cat /proc/self/status; echo HOME=$HOME"],
            "",
        )
        .replace(
            r#""user":{"uid":0,"gid":0}"#,
            r#""user":{"uid":1000,"gid":1000}"#,
        );
        assert!(spec.contains("1000"), "the spec template changed");
        let (exit, out, err) = rig.run(&spec);
        assert_eq!(exit.exit_status, 0, "stderr: {err}");
        assert_eq!(out.lines().next(), Some("1000"), "{out}");
        let groups = out
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .unwrap_or_default();
        assert!(groups.split_whitespace().any(|g| g == "2000"), "{groups:?}");
        assert!(out.lines().any(|l| l == "HOME=/home/user"), "{out}");
    }
}
