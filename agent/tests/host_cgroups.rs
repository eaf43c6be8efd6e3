//! The cgroup calls' error paths in host mode (limits, OOM and freezing are tested in
//! the VM lane, `tests/tests/agent_cgroups.rs`, where cgroup2 has its controllers).
//!
//! Two agents, each in a private mount namespace: one whose /sys/fs/cgroup is a plain
//! tmpfs (as on a cgroup v1 host) must refuse every cgroup call with
//! FAILED_PRECONDITION "cgroup v2 not available"; one with a controller-less cgroup2
//! runs a busybox container and must answer bad requests with the right codes. Needs
//! root and Debian's busybox-static (`/bin/busybox`).
#![cfg(feature = "containers")]

mod common;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Child;
    use std::time::{Duration, Instant};

    use crx_protocols::hybrid_vsock::context_until;
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::container_ttrpc::ContainersClient;

    use crate::common::{code, launch, secs, unique};

    /// A host-mode agent whose /sys/fs/cgroup is what `cgroup_mount` mounts there.
    struct Rig {
        dir: PathBuf,
        rootfs: PathBuf,
        child: Child,
        client: ContainersClient,
        rt: tokio::runtime::Runtime,
    }

    impl Rig {
        fn start(cgroup_mount: &str) -> Rig {
            let l = launch("crx-agent-cg", cgroup_mount);
            let client = {
                let _in_runtime = l.rt.enter();
                ContainersClient::new(l.client)
            };
            Rig {
                dir: l.dir,
                rootfs: l.rootfs,
                child: l.child,
                client,
                rt: l.rt,
            }
        }

        fn create_sleeper(&self, id: &str) {
            let spec = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
              "process":{"args":["sleep","100"],"cwd":"/","env":["PATH=/bin"],
                         "user":{"uid":0,"gid":0},"noNewPrivileges":true},
              "mounts":[{"destination":"/proc","type":"proc","source":"proc"}],
              "linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#;
            let mut req = CreateContainerRequest::new();
            req.container_id = id.to_owned();
            req.oci_spec = spec.as_bytes().to_vec();
            req.rootfs = self.rootfs.display().to_string();
            self.rt
                .block_on(self.client.create_container(secs(30), &req))
                .unwrap();
            let mut req = StartContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.client.start_container(secs(30), &req))
                .unwrap();
        }

        fn update(&self, id: &str, resources: &[u8]) -> ttrpc::Result<UpdateContainerResponse> {
            let mut req = UpdateContainerRequest::new();
            req.container_id = id.to_owned();
            req.linux_resources = resources.to_vec();
            self.rt
                .block_on(self.client.update_container(secs(10), &req))
        }

        fn stats(&self, id: &str) -> ttrpc::Result<StatsContainerResponse> {
            let mut req = StatsContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.client.stats_container(secs(10), &req))
        }

        fn pause(&self, id: &str) -> ttrpc::Result<PauseContainerResponse> {
            let mut req = PauseContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.client.pause_container(secs(10), &req))
        }

        fn resume(&self, id: &str) -> ttrpc::Result<ResumeContainerResponse> {
            let mut req = ResumeContainerRequest::new();
            req.container_id = id.to_owned();
            self.rt
                .block_on(self.client.resume_container(secs(10), &req))
        }

        fn list_pids(&self, id: &str) -> ttrpc::Result<ListPidsResponse> {
            let mut req = ListPidsRequest::new();
            req.container_id = id.to_owned();
            self.rt.block_on(self.client.list_pids(secs(10), &req))
        }

        fn events(
            &self,
            after: u64,
            max: u32,
            limit: Duration,
        ) -> ttrpc::Result<GetEventsResponse> {
            let mut req = GetEventsRequest::new();
            req.after_sequence = after;
            req.max_events = max;
            self.rt.block_on(
                self.client
                    .get_events(context_until(Instant::now() + limit), &req),
            )
        }

        fn remove(&self, id: &str) {
            let mut req = RemoveContainerRequest::new();
            req.container_id = id.to_owned();
            req.force = true;
            self.rt
                .block_on(self.client.remove_container(secs(30), &req))
                .unwrap();
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn without_cgroup2_every_cgroup_call_says_so_and_events_still_long_poll() {
        let rig = Rig::start("mount -t tmpfs none /sys/fs/cgroup");
        let calls = [
            ("UpdateContainer", code(rig.update("any", b"{}"))),
            ("StatsContainer", code(rig.stats("any"))),
            ("PauseContainer", code(rig.pause("any"))),
            ("ResumeContainer", code(rig.resume("any"))),
            ("ListPids", code(rig.list_pids("any"))),
        ];
        for (what, (c, message)) in calls {
            assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "{what}: {message}");
            assert!(
                message.contains("cgroup v2 not available"),
                "{what}: {message}"
            );
        }

        // Nothing happened: the long poll answers empty, shortly before the deadline.
        let asked = Instant::now();
        let resp = rig.events(0, 0, Duration::from_millis(800)).unwrap();
        let took = asked.elapsed();
        assert!(resp.events.is_empty() && resp.dropped == 0, "{resp:?}");
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(800),
            "an empty long poll took {took:?} of its 800 ms"
        );
        let (c, message) = code(rig.events(0, 257, Duration::from_secs(2)));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        let (c, message) = code(rig.events(9, 0, Duration::from_secs(2)));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
    }

    #[test]
    fn bad_cgroup_requests_get_clear_errors_and_exits_become_events() {
        let rig = Rig::start("mount -t cgroup2 none /sys/fs/cgroup");
        let id = unique("s");
        rig.create_sleeper(&id);

        let (c, message) = code(rig.update(&id, b"{\"memory\":"));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        let (c, message) = code(rig.update(&id, br#"{"memory":{"limit":-7}}"#));
        assert_eq!(c, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        let mut huge = b"{\"memory\":{}".to_vec();
        huge.resize(64 * 1024 + 1, b' ');
        let (c, message) = code(rig.update(&id, &huge));
        assert_eq!(c, ttrpc::Code::RESOURCE_EXHAUSTED, "{message}");
        // This host's cgroup2 has no controllers: a limit cannot be set, and says why.
        let (c, message) = code(rig.update(&id, br#"{"memory":{"limit":33554432}}"#));
        assert_eq!(c, ttrpc::Code::FAILED_PRECONDITION, "{message}");
        assert!(message.contains("memory"), "{message}");

        for (what, (c, message)) in [
            ("UpdateContainer", code(rig.update("nope", b"{}"))),
            ("StatsContainer", code(rig.stats("nope"))),
            ("PauseContainer", code(rig.pause("nope"))),
            ("ListPids", code(rig.list_pids("nope"))),
        ] {
            assert_eq!(c, ttrpc::Code::NOT_FOUND, "{what}: {message}");
        }

        // ListPids needs no controller: the init is there, as the container's own.
        let pids = rig.list_pids(&id).unwrap().pids;
        assert!(
            pids.len() == 1 && pids[0].exec_id.is_empty() && pids[0].pid > 0,
            "{pids:?}"
        );

        rig.remove(&id);
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut after = 0;
        loop {
            let resp = rig.events(after, 0, Duration::from_secs(2)).unwrap();
            assert_eq!(resp.dropped, 0);
            if let Some(e) = resp.events.iter().find(|e| e.container_id == id) {
                let Some(event::Kind::Exited(exit)) = &e.kind else {
                    panic!("not an exit: {e:?}");
                };
                assert_eq!(
                    (exit.pid, exit.signal, exit.oom_killed),
                    (pids[0].pid, 9, false)
                );
                assert_eq!(e.exec_id, "");
                break;
            }
            after = resp.events.last().map_or(after, |e| e.sequence);
            assert!(Instant::now() < give_up, "no exit event for {id}");
        }
    }
}
