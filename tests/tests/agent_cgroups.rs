//! Container cgroups in a real guest (QEMU/TCG, cgroup v2 with controllers, as in
//! production): limits set at create and by UpdateContainer, OOM kills reported by
//! WaitProcess and GetEvents, Pause/Resume, StatsContainer and ListPids. One VM boot
//! runs every case.
//!
//! Needs the artifacts `scripts/test.sh` builds (the agent with its `containers`
//! feature) and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::metrics::CgroupMetrics;
    use crx_tests::guest_pod::{oci_spec, secs, GuestPod};

    const MIB: u64 = 1 << 20;

    fn code<T>(result: ttrpc::Result<T>) -> Option<(ttrpc::Code, String)> {
        match result {
            Err(ttrpc::Error::RpcStatus(s)) => Some((s.code(), s.message().to_owned())),
            _ => None,
        }
    }

    fn stats(pod: &GuestPod, id: &str) -> Result<CgroupMetrics> {
        let mut req = StatsContainerRequest::new();
        req.container_id = id.into();
        pod.rt
            .block_on(pod.containers.stats_container(secs(30), &req))
            .with_context(|| format!("StatsContainer {id}"))?
            .metrics
            .into_option()
            .context("StatsContainer answered without metrics")
    }

    fn update(pod: &GuestPod, id: &str, resources: &str) -> ttrpc::Result<UpdateContainerResponse> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = id.into();
        req.linux_resources = resources.as_bytes().to_vec();
        pod.rt
            .block_on(pod.containers.update_container(secs(30), &req))
    }

    fn pause(pod: &GuestPod, id: &str, frozen: bool) -> ttrpc::Result<()> {
        if frozen {
            let mut req = PauseContainerRequest::new();
            req.container_id = id.into();
            pod.rt
                .block_on(pod.containers.pause_container(secs(30), &req))
                .map(|_| ())
        } else {
            let mut req = ResumeContainerRequest::new();
            req.container_id = id.into();
            pod.rt
                .block_on(pod.containers.resume_container(secs(30), &req))
                .map(|_| ())
        }
    }

    fn list_pids(pod: &GuestPod, id: &str) -> Result<Vec<(u32, String)>> {
        let mut req = ListPidsRequest::new();
        req.container_id = id.into();
        Ok(pod
            .rt
            .block_on(pod.containers.list_pids(secs(30), &req))
            .with_context(|| format!("ListPids {id}"))?
            .pids
            .into_iter()
            .map(|p| (p.pid, p.exec_id))
            .collect())
    }

    /// Long-polls GetEvents (from `after`, moved on) until `done` holds for the
    /// events seen so far, or 90 s pass.
    fn events_until(
        pod: &GuestPod,
        after: &mut u64,
        seen: &mut Vec<Event>,
        done: impl Fn(&[Event]) -> bool,
    ) -> Result<()> {
        let give_up = Instant::now() + Duration::from_secs(90);
        while !done(seen) {
            ensure!(Instant::now() < give_up, "events so far: {seen:#?}");
            let mut req = GetEventsRequest::new();
            req.after_sequence = *after;
            let resp = pod
                .rt
                .block_on(pod.containers.get_events(secs(5), &req))
                .context("GetEvents")?;
            ensure!(resp.dropped == 0, "{} events dropped", resp.dropped);
            for event in resp.events {
                ensure!(
                    event.sequence == *after + 1,
                    "sequence {} after {after}",
                    event.sequence
                );
                *after = event.sequence;
                seen.push(event);
            }
        }
        Ok(())
    }

    /// The counter a container writes into the pod share, once it parses.
    fn counter(path: &Path) -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Polls until the counter passes `above` (the loop runs), or fails after 60 s.
    fn counter_passes(path: &Path, above: u64) -> Result<u64> {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(n) = counter(path).filter(|n| *n > above) {
                return Ok(n);
            }
            ensure!(
                Instant::now() < give_up,
                "counter {} stuck at {:?} (wanted > {above})",
                path.display(),
                counter(path)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn limits_oom_kills_pause_stats_and_pids_in_the_guest() -> Result<()> {
        let mut pod = GuestPod::boot("agent-cgroups", 512, |_, _| Ok(()))?;
        let rootfs = pod.share.join("rootfs");
        let mut after = 0u64;
        let mut seen = Vec::new();

        // OOM: dd's 64 MiB buffer in a 32 MiB cgroup. The limit comes from the spec, so
        // this also shows libcontainer applied it at create.
        let oom_id = pod.next_id();
        let spec = oci_spec(
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            "",
            r#","resources":{"memory":{"limit":33554432}}"#,
        );
        pod.create(&oom_id, spec, StdioSpec::new())?;
        let created = stats(&pod, &oom_id)?;
        ensure!(
            created.memory.usage_limit == 32 * MIB,
            "memory.max at create: {}",
            created.memory.usage_limit
        );
        pod.start(&oom_id, "")?;
        let exit = pod.wait(&oom_id, "")?;
        ensure!(
            (exit.exit_status, exit.signal, exit.oom_killed) == (137, 9, true),
            "dd past the memory limit: {exit:?}"
        );
        let after_oom = stats(&pod, &oom_id)?;
        ensure!(
            after_oom.memory_events.oom_kill >= 1,
            "memory.events after the OOM kill: {:?}",
            after_oom.memory_events
        );
        events_until(&pod, &mut after, &mut seen, |events| {
            events.iter().any(|e| {
                e.container_id == oom_id
                    && matches!(&e.kind, Some(event::Kind::Exited(x)) if x.oom_killed && x.signal == 9)
            })
        })?;
        ensure!(
            seen.iter().any(|e| e.container_id == oom_id
                && matches!(e.kind, Some(event::Kind::OomKillCount(n)) if n >= 1)),
            "no OOM event for {oom_id}: {seen:#?}"
        );
        pod.remove(&oom_id, false)?;

        // A process that merely exits is not OOM-killed, and GetEvents says so too.
        let r = pod.run(oci_spec(&["sh", "-c", "exit 4"], "", ""))?;
        ensure!(
            (r.exit.exit_status, r.exit.oom_killed) == (4, false),
            "exit 4: {r:?}"
        );
        let plain_id = format!("c{}", oom_id[1..].parse::<u32>()? + 1);
        events_until(&pod, &mut after, &mut seen, |events| {
            events.iter().any(|e| {
                e.container_id == plain_id
                    && matches!(&e.kind, Some(event::Kind::Exited(x)) if x.exit_status == 4 && !x.oom_killed)
            })
        })?;

        // pids.max: the fifth process cannot be forked.
        let r = pod.run(oci_spec(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 10 ]; do sleep 60 & i=$((i+1)); done; echo all forked",
            ],
            "",
            r#","resources":{"pids":{"limit":5}}"#,
        ))?;
        ensure!(
            !r.stdout.contains("all forked") && r.stderr.contains("fork"),
            "ten forks under pids.max 5: {r:?}"
        );

        // An exec that outgrows the limit is the one OOM-killed; the init lives on, and
        // its later SIGKILL (no new OOM kill) is not reported as one.
        let host_id = pod.next_id();
        pod.create(
            &host_id,
            oci_spec(
                &["sleep", "100"],
                "",
                r#","resources":{"memory":{"limit":33554432}}"#,
            ),
            StdioSpec::new(),
        )?;
        pod.start(&host_id, "")?;
        let mut hog = ExecProcessRequest::new();
        hog.container_id = host_id.clone();
        hog.exec_id = "hog".into();
        hog.process = br#"{"args":["dd","if=/dev/zero","of=/dev/null","bs=64M","count=1"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
        pod.rt
            .block_on(pod.containers.exec_process(secs(30), &hog))
            .context("ExecProcess hog")?;
        pod.start(&host_id, "hog")?;
        let exit = pod.wait(&host_id, "hog")?;
        ensure!(
            (exit.exit_status, exit.oom_killed) == (137, true),
            "exec past the limit: {exit:?}"
        );
        pod.remove(&host_id, true)?;
        events_until(&pod, &mut after, &mut seen, |events| {
            let exit_of = |exec_id: &str| {
                events.iter().find_map(|e| match &e.kind {
                    Some(event::Kind::Exited(x))
                        if e.container_id == host_id && e.exec_id == exec_id =>
                    {
                        Some(x.oom_killed)
                    }
                    _ => None,
                })
            };
            exit_of("hog") == Some(true) && exit_of("") == Some(false)
        })?;

        // A long-running container: a counter in the pod share, an exec beside it.
        let id = pod.next_id();
        let counter_file = rootfs.join(format!("counter-{id}"));
        let _ = std::fs::remove_file(&counter_file);
        let script =
            format!("i=0; while :; do i=$((i+1)); echo $i > /counter-{id}; sleep 0.1; done");
        pod.create(
            &id,
            oci_spec(
                &["sh", "-c", &script],
                "",
                r#","resources":{"memory":{"limit":67108864},"pids":{"limit":64}}"#,
            ),
            StdioSpec::new(),
        )?;
        let init_pid = pod.start(&id, "")?;
        counter_passes(&counter_file, 2)?;

        let mut exec = ExecProcessRequest::new();
        exec.container_id = id.clone();
        exec.exec_id = "e1".into();
        exec.process =
            br#"{"args":["sleep","100"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#
                .to_vec();
        pod.rt
            .block_on(pod.containers.exec_process(secs(30), &exec))
            .context("ExecProcess")?;
        let exec_pid = pod.start(&id, "e1")?;
        let pids = list_pids(&pod, &id)?;
        ensure!(
            pids.contains(&(init_pid, String::new())) && pids.contains(&(exec_pid, "e1".into())),
            "ListPids {pids:?}: init {init_pid}, exec e1 {exec_pid}"
        );
        ensure!(
            pids.iter().all(|(p, e)| *p == exec_pid || e.is_empty()),
            "only the exec's own pid carries its id: {pids:?}"
        );

        // Figures of a running container.
        let s = stats(&pod, &id)?;
        eprintln!(
            "running container: cpu {:?} memory usage {} anon {} file {} pids {:?}",
            s.cpu, s.memory.usage, s.memory.anon, s.memory.file, s.pids
        );
        ensure!(s.cpu.usage_usec > 0, "cpu: {:?}", s.cpu);
        ensure!(
            s.memory.usage > 0 && s.memory.usage < 64 * MIB && s.memory.usage_limit == 64 * MIB,
            "memory usage {} limit {}",
            s.memory.usage,
            s.memory.usage_limit
        );
        ensure!(
            s.pids.current >= 2 && s.pids.limit == 64,
            "pids: {:?}",
            s.pids
        );

        // UpdateContainer: new limits read back through StatsContainer.
        update(
            &pod,
            &id,
            r#"{"memory":{"limit":100663296},"pids":{"limit":32},"cpu":{"shares":512,"quota":50000,"period":100000}}"#,
        )
        .context("UpdateContainer")?;
        let s = stats(&pod, &id)?;
        ensure!(
            (s.memory.usage_limit, s.pids.limit) == (96 * MIB, 32),
            "after UpdateContainer: memory.max {} pids.max {}",
            s.memory.usage_limit,
            s.pids.limit
        );
        update(&pod, &id, r#"{"memory":{"limit":-1}}"#).context("UpdateContainer to max")?;
        ensure!(
            stats(&pod, &id)?.memory.usage_limit == u64::MAX,
            "memory.limit -1 should read back as max"
        );
        for (bad, want) in [
            ("{\"memory\":", ttrpc::Code::INVALID_ARGUMENT),
            (r#"{"memory":{"limit":-5}}"#, ttrpc::Code::INVALID_ARGUMENT),
            (
                r#"{"cpu":{"quota":5,"period":100000}}"#,
                ttrpc::Code::INVALID_ARGUMENT,
            ),
        ] {
            let got = code(update(&pod, &id, bad));
            ensure!(
                got.as_ref().is_some_and(|(c, _)| *c == want),
                "UpdateContainer {bad}: {got:?}"
            );
        }

        // Pause freezes the loop; Resume lets it go on.
        let asked = Instant::now();
        pause(&pod, &id, true).context("PauseContainer")?;
        eprintln!("PauseContainer answered in {:?}", asked.elapsed());
        // Frozen mid-`echo`, the file may be empty: compare whatever it holds.
        let frozen_at = std::fs::read_to_string(&counter_file)?;
        let cpu_frozen = stats(&pod, &id)?.cpu.usage_usec;
        std::thread::sleep(Duration::from_secs(2));
        let still = std::fs::read_to_string(&counter_file)?;
        let cpu_still = stats(&pod, &id)?.cpu.usage_usec;
        ensure!(
            still == frozen_at && cpu_still == cpu_frozen,
            "paused container moved on: counter {frozen_at:?} -> {still:?}, cpu {cpu_frozen} -> {cpu_still}"
        );
        ensure!(
            list_pids(&pod, &id)?.contains(&(init_pid, String::new())),
            "ListPids of a paused container"
        );
        pause(&pod, &id, false).context("ResumeContainer")?;
        counter_passes(&counter_file, frozen_at.trim().parse().unwrap_or(0))?;

        // Unknown containers.
        for (what, got) in [
            ("StatsContainer", code(stats_raw(&pod, "no-such"))),
            ("PauseContainer", code(pause(&pod, "no-such", true))),
            ("UpdateContainer", code(update(&pod, "no-such", "{}"))),
        ] {
            ensure!(
                got.as_ref()
                    .is_some_and(|(c, _)| *c == ttrpc::Code::NOT_FOUND),
                "{what} of an unknown container: {got:?}"
            );
        }

        // Removing with force kills the init and the exec; both exits are events.
        pod.remove(&id, true)?;
        events_until(&pod, &mut after, &mut seen, |events| {
            ["", "e1"].iter().all(|exec_id| {
                events.iter().any(|e| {
                    e.container_id == id
                        && e.exec_id == *exec_id
                        && matches!(&e.kind, Some(event::Kind::Exited(x)) if x.signal == 9 && !x.oom_killed)
                })
            })
        })?;
        if seen.windows(2).any(|w| w[1].sequence != w[0].sequence + 1) {
            bail!("event sequence has gaps: {seen:#?}");
        }
        let _ = std::fs::remove_file(&counter_file);
        pod.shut_down()
    }

    fn stats_raw(pod: &GuestPod, id: &str) -> ttrpc::Result<StatsContainerResponse> {
        let mut req = StatsContainerRequest::new();
        req.container_id = id.into();
        pod.rt
            .block_on(pod.containers.stats_container(secs(30), &req))
    }
}
