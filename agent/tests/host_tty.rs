//! Terminals, stdin and bulk output in host mode: a process with `terminal` gets a pty
//! whose one TTY stream carries both directions and whose window size ResizeTty sets
//! (before and after start, for the init and for an exec); stdin round-trips through
//! `cat`; 100 MB of stdout arrive intact while the agent's memory stays flat.
//!
//! Needs root and Debian's busybox-static, like host_containers.rs (see common/).
#![cfg(feature = "containers")]

mod common;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use crx_protocols::v1::container::StdioSpec;
    use crx_protocols::v1::stdio::StreamKind;

    use super::common::{code, devpts_spec, process_json, spec, unique, Rig};

    const TTY: StreamKind = StreamKind::STREAM_KIND_TTY;

    fn tty_stdio() -> StdioSpec {
        let mut s = StdioSpec::new();
        s.terminal = true;
        s.stdin = true;
        s
    }

    /// Reads from `conn` into `seen` until it contains `needle` (or fails naming what
    /// came, after `limit`).
    fn read_until(conn: &mut UnixStream, seen: &mut Vec<u8>, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} within {limit:?}; got {:?}",
                String::from_utf8_lossy(seen)
            );
            conn.set_read_timeout(Some(left)).unwrap();
            match conn.read(&mut buf) {
                Ok(0) => panic!(
                    "EOF before {needle:?}; got {:?}",
                    String::from_utf8_lossy(seen)
                ),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => panic!(
                    "reading the tty: {e}; got {:?}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    }

    /// Reads the rest to EOF: the agent ends the stream once the process's side of the
    /// pty is gone.
    fn read_to_eof(conn: &mut UnixStream, seen: &mut Vec<u8>) {
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.read_to_end(seen)
            .expect("the TTY stream did not reach EOF after the process ended");
    }

    #[test]
    fn a_shell_on_a_tty_echoes_sees_its_size_before_and_after_start_and_exits_3() {
        let rig = Rig::start();
        let id = unique("tty");
        rig.create_with(&id, devpts_spec(&["sh"], true).as_bytes(), tty_stdio())
            .unwrap();
        // Before start: the init's pty exists already.
        rig.resize(&id, "", 33, 101).unwrap();
        let mut tty = rig.attach(&id, "", TTY).unwrap();
        rig.start_init(&id).unwrap();
        let mut seen = Vec::new();
        tty.write_all(b"tty; stty size\n").unwrap();
        read_until(&mut tty, &mut seen, "33 101", Duration::from_secs(20));
        assert!(
            String::from_utf8_lossy(&seen).contains("/dev/pts/"),
            "the shell's stdin is not the container's pty: {:?}",
            String::from_utf8_lossy(&seen)
        );

        // After start.
        rig.resize(&id, "", 44, 120).unwrap();
        tty.write_all(b"echo hi; stty size; exit 3\n").unwrap();
        read_to_eof(&mut tty, &mut seen);
        let text = String::from_utf8_lossy(&seen);
        // The pty echoes the typed line and turns "\n" into "\r\n" on output.
        assert!(text.contains("echo hi; stty size; exit 3"), "{text:?}");
        assert!(text.contains("\nhi\r\n"), "{text:?}");
        assert!(text.contains("44 120\r\n"), "{text:?}");
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 3);
        // Resizing the exited process's terminal is harmless; removal works.
        rig.resize(&id, "", 10, 10).unwrap();
        rig.remove(&id, false).unwrap();
    }

    #[test]
    fn an_exec_with_a_tty_gets_the_size_asked_for_before_it_started() {
        let rig = Rig::start();
        let id = unique("host");
        rig.create(
            &id,
            devpts_spec(&["sleep", "100"], false).as_bytes(),
            (false, false, false),
        )
        .unwrap();
        rig.start_init(&id).unwrap();
        // The init has no terminal.
        let (c, msg) = code(rig.resize(&id, "", 24, 80));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "{msg}");

        let tty_process = process_json(&["sh"], r#","terminal":true"#);
        rig.exec_with(&id, "t1", &tty_process, tty_stdio()).unwrap();
        // The exec's pty does not exist yet: the size waits for it.
        rig.resize(&id, "t1", 12, 34).unwrap();
        let mut tty = rig.attach(&id, "t1", TTY).unwrap();
        rig.start_process(&id, "t1").unwrap();
        tty.write_all(b"stty size; exit 4\n").unwrap();
        let mut seen = Vec::new();
        read_to_eof(&mut tty, &mut seen);
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("12 34\r\n"), "{text:?}");
        assert_eq!(rig.wait_exec(&id, "t1", 30).unwrap().exit_status, 4);

        // A program that asks for the size as it starts: the size is there already.
        let stty = process_json(&["stty", "size"], r#","terminal":true"#);
        rig.exec_with(&id, "s1", &stty, tty_stdio()).unwrap();
        rig.resize(&id, "s1", 21, 43).unwrap();
        let mut tty = rig.attach(&id, "s1", TTY).unwrap();
        rig.start_process(&id, "s1").unwrap();
        let mut seen = Vec::new();
        read_to_eof(&mut tty, &mut seen);
        assert_eq!(String::from_utf8_lossy(&seen), "21 43\r\n");
        assert_eq!(rig.wait_exec(&id, "s1", 30).unwrap().exit_status, 0);

        // And one resized while it runs.
        rig.exec_with(&id, "t2", &tty_process, tty_stdio()).unwrap();
        let mut tty = rig.attach(&id, "t2", TTY).unwrap();
        rig.start_process(&id, "t2").unwrap();
        rig.resize(&id, "t2", 50, 60).unwrap();
        tty.write_all(b"stty size; exit 0\n").unwrap();
        let mut seen = Vec::new();
        read_to_eof(&mut tty, &mut seen);
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("50 60\r\n"), "{text:?}");
        assert_eq!(rig.wait_exec(&id, "t2", 30).unwrap().exit_status, 0);
        rig.remove(&id, true).unwrap();
    }

    #[test]
    fn terminal_requests_that_cannot_work_are_refused() {
        let rig = Rig::start();
        // stdout or stderr beside a terminal.
        let mut both = tty_stdio();
        both.stdout = true;
        let (c, msg) =
            code(rig.create_with(&unique("t"), devpts_spec(&["sh"], true).as_bytes(), both));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("stdout"), "{msg}");
        // The spec and the declared streams disagree about the terminal.
        let (c, msg) = code(rig.create(
            &unique("t"),
            devpts_spec(&["sh"], true).as_bytes(),
            (true, true, false),
        ));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("terminal"), "{msg}");

        let id = unique("t");
        rig.create_with(
            &id,
            devpts_spec(&["sh", "-c", "exit 7"], true).as_bytes(),
            tty_stdio(),
        )
        .unwrap();
        // Sizes outside 1-65535.
        for (rows, cols) in [(0, 80), (24, 0), (65536, 80), (24, 70000)] {
            let (c, msg) = code(rig.resize(&id, "", rows, cols));
            assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{rows}x{cols}: {msg}");
        }
        assert_eq!(
            code(rig.resize("nope", "", 24, 80)).0,
            ttrpc::Code::NOT_FOUND
        );
        // Its one stream is TTY: stdout is refused, and TTY attaches once.
        let refused = rig
            .attach(&id, "", StreamKind::STREAM_KIND_STDOUT)
            .unwrap_err();
        assert!(refused.contains("TTY"), "{refused}");
        let mut tty = rig.attach(&id, "", TTY).unwrap();
        assert!(rig.attach(&id, "", TTY).is_err());
        rig.start_init(&id).unwrap();
        let mut seen = Vec::new();
        read_to_eof(&mut tty, &mut seen);
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 7);
        rig.remove(&id, false).unwrap();
    }

    #[test]
    fn a_tty_reads_end_of_input_when_the_host_stops_sending_or_closes_stdin() {
        let rig = Rig::start();
        for close_stdin in [false, true] {
            let id = unique("ttycat");
            rig.create_with(&id, devpts_spec(&["cat"], true).as_bytes(), tty_stdio())
                .unwrap();
            let mut tty = rig.attach(&id, "", TTY).unwrap();
            rig.start_init(&id).unwrap();
            tty.write_all(b"abc\n").unwrap();
            // The pty's echo, then cat's copy.
            let mut seen = Vec::new();
            read_until(
                &mut tty,
                &mut seen,
                "abc\r\nabc\r\n",
                Duration::from_secs(20),
            );
            if close_stdin {
                rig.close_stdin(&id, "").unwrap();
            } else {
                tty.shutdown(std::net::Shutdown::Write).unwrap();
            }
            // cat reads end of input (the terminal's EOF character) and exits.
            read_to_eof(&mut tty, &mut seen);
            let exit = rig.wait(&id, 30).unwrap();
            assert_eq!(exit.exit_status, 0, "close_stdin={close_stdin}");
            rig.remove(&id, false).unwrap();
        }
    }

    #[test]
    fn stdin_round_trips_through_cat_and_closing_it_gives_eof() {
        let rig = Rig::start();
        // A megabyte both ways at once: the host writes while it reads.
        let id = unique("cat");
        rig.create(&id, spec(&["cat"], "").as_bytes(), (true, true, false))
            .unwrap();
        let mut stdin = rig.attach(&id, "", StreamKind::STREAM_KIND_STDIN).unwrap();
        let out = rig.collect(&id, StreamKind::STREAM_KIND_STDOUT);
        rig.start_init(&id).unwrap();
        let sent: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                stdin.write_all(&sent).unwrap();
                // The host closing its write side is cat's EOF.
                stdin.shutdown(std::net::Shutdown::Write).unwrap();
                stdin
            })
        };
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 0);
        let got = out.join().unwrap();
        drop(writer.join().unwrap());
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "cat's output differs from its input");
        rig.remove(&id, false).unwrap();

        // CloseStdin before stdin was attached: the start does not wait for it, and cat
        // reads EOF at once.
        let id = unique("cat");
        rig.create(&id, spec(&["cat"], "").as_bytes(), (true, true, false))
            .unwrap();
        let out = rig.collect(&id, StreamKind::STREAM_KIND_STDOUT);
        rig.close_stdin(&id, "").unwrap();
        rig.start_init(&id).unwrap();
        assert_eq!(rig.wait(&id, 30).unwrap().exit_status, 0);
        assert!(out.join().unwrap().is_empty());
        assert!(rig.attach(&id, "", StreamKind::STREAM_KIND_STDIN).is_err());
        rig.remove(&id, false).unwrap();
    }

    #[test]
    fn a_hundred_megabytes_of_stdout_arrive_intact_while_the_agent_stays_small() {
        const TOTAL: u64 = 100 << 20;
        let rig = Rig::start();
        let id = unique("bulk");
        // Random bytes to stdout; their CRC-32 to stderr.
        let script = format!("exec 3>&1; head -c {TOTAL} /dev/urandom | tee /dev/fd/3 | crc32 >&2");
        rig.create(
            &id,
            spec(&["sh", "-c", &script], "").as_bytes(),
            (false, true, true),
        )
        .unwrap();
        let mut out = rig.attach(&id, "", StreamKind::STREAM_KIND_STDOUT).unwrap();
        let err = rig.collect(&id, StreamKind::STREAM_KIND_STDERR);
        let agent_pid = rig.child.id();
        let rss_before = rss_kib(agent_pid);
        rig.start_init(&id).unwrap();

        let started = Instant::now();
        let mut crc = Crc32::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut peak_rss = rss_before;
        let mut paused = false;
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            if !paused && crc.len >= 10 << 20 {
                // A host that stops reading: the program must stall, not the agent
                // fill up.
                paused = true;
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    peak_rss = peak_rss.max(rss_kib(agent_pid));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if crc.len % (8 << 20) < n as u64 {
                peak_rss = peak_rss.max(rss_kib(agent_pid));
            }
        }
        let elapsed = started.elapsed();
        assert_eq!(rig.wait(&id, 60).unwrap().exit_status, 0);
        let err = String::from_utf8(err.join().unwrap()).unwrap();
        assert_eq!(crc.len, TOTAL, "bytes received");
        assert_eq!(
            err.trim(),
            format!("{:08x}", crc.finish()),
            "CRC-32 in the container vs of what arrived"
        );
        let growth = peak_rss.saturating_sub(rss_before);
        assert!(
            growth < 16 << 10,
            "the agent grew by {growth} KiB while 100 MB went through"
        );
        eprintln!(
            "100 MiB of stdout in {elapsed:?} ({:.0} MiB/s); agent RSS growth {growth} KiB",
            100.0 / elapsed.as_secs_f64()
        );
        rig.remove(&id, false).unwrap();
    }

    fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("no VmRSS for the agent")
    }

    /// CRC-32 as zlib and busybox `crc32` compute it (reflected, 0xEDB88320), and a
    /// byte count.
    struct Crc32 {
        table: [u32; 256],
        crc: u32,
        len: u64,
    }

    impl Crc32 {
        fn new() -> Crc32 {
            let mut table = [0u32; 256];
            for (i, slot) in table.iter_mut().enumerate() {
                let mut c = i as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
                *slot = c;
            }
            Crc32 {
                table,
                crc: !0,
                len: 0,
            }
        }

        fn update(&mut self, data: &[u8]) {
            for &b in data {
                self.crc = (self.crc >> 8) ^ self.table[((self.crc as u8) ^ b) as usize];
            }
            self.len += data.len() as u64;
        }

        fn finish(&self) -> u32 {
            !self.crc
        }
    }
}
