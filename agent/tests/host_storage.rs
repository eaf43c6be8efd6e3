//! The Storage service of the agent binary in host mode. The agent runs in a private
//! mount namespace of its own (`unshare --mount --propagation private`), so its mounts
//! never touch this machine's; the test looks at them through `/proc/<pid>/root` and
//! `/proc/<pid>/mountinfo`. Needs root (mounts), like the rest of the suite.

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use crx_protocols::hybrid_vsock::{context_until, wait_for_agent, AgentAddress, ReadyAgent};
    use crx_protocols::v1::agent::ShutdownRequest;
    use crx_protocols::v1::health::CheckRequest;
    use crx_protocols::v1::storage::{
        ListStoragesRequest, MountStorageRequest, MountedStorage, Storage, StorageDriver,
        UnmountStorageRequest,
    };

    const AGENT: &str = env!("CARGO_BIN_EXE_crx-agent");

    /// A temp dir, the agent's state dir inside it, and the agent in its own mount
    /// namespace. Cleaned up on drop.
    struct NsAgent {
        dir: PathBuf,
        socket: PathBuf,
        state: PathBuf,
        child: Child,
        /// The agent's pid (the child itself, or the shell's child when wrapped).
        pid: Option<u32>,
    }

    impl NsAgent {
        fn dir(name: &str) -> PathBuf {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "crx-agent-storage-{name}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            // Canonical, as the agent resolves its state dir.
            std::fs::canonicalize(&dir).unwrap()
        }

        /// The agent itself is the unshare'd process.
        fn start(name: &str) -> Option<NsAgent> {
            if !can_unshare() {
                return None;
            }
            let dir = Self::dir(name);
            let (socket, state) = (dir.join("agent.sock"), dir.join("state"));
            let child = Command::new("unshare")
                .args(["--mount", "--propagation", "private"])
                .arg(AGENT)
                .arg(format!("--listen=unix://{}", socket.display()))
                .arg(format!("--state-dir={}", state.display()))
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let pid = Some(child.id());
            Some(NsAgent {
                dir,
                socket,
                state,
                child,
                pid,
            })
        }

        /// The agent under a shell in the namespace, which prints the namespace's
        /// mount table after the agent has exited.
        fn start_with_epilogue(name: &str) -> Option<NsAgent> {
            if !can_unshare() {
                return None;
            }
            let dir = Self::dir(name);
            let (socket, state) = (dir.join("agent.sock"), dir.join("state"));
            let script = format!(
                "{AGENT} --listen=unix://{} --state-dir={}; echo \"agent exit $?\"; echo ===; cat /proc/self/mountinfo",
                socket.display(),
                state.display()
            );
            let child = Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Some(NsAgent {
                dir,
                socket,
                state,
                child,
                pid: None,
            })
        }

        fn root(&self) -> PathBuf {
            self.state.join("storage")
        }

        /// A path as the agent sees it, inside its mount namespace.
        fn in_ns(&self, path: &Path) -> PathBuf {
            let pid = self.pid.expect("agent pid known");
            PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
        }

        fn ns_mountinfo(&self) -> String {
            let pid = self.pid.expect("agent pid known");
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap()
        }

        async fn ready(&self) -> ReadyAgent {
            wait_for_agent(
                &AgentAddress::Unix(self.socket.clone()),
                Instant::now() + Duration::from_secs(20),
            )
            .await
            .expect("agent did not come up")
        }

        fn wait_exit(&mut self, limit: Duration) {
            let deadline = Instant::now() + limit;
            while self.child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "still running after {limit:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for NsAgent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            // The namespace (and its mounts) died with the process; only plain files
            // and empty mount points are left here.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn can_unshare() -> bool {
        let ok = Command::new("unshare")
            .args(["--mount", "true"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot create a mount namespace (unshare --mount; needs root)");
        }
        ok
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn secs(n: u64) -> ttrpc::context::Context {
        context_until(Instant::now() + Duration::from_secs(n))
    }

    fn storage(driver: StorageDriver, source: &str, fstype: &str, mp: &Path) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = source.to_owned();
        s.fstype = fstype.to_owned();
        s.mount_point = mp.display().to_string();
        s
    }

    fn request(s: Storage) -> MountStorageRequest {
        let mut r = MountStorageRequest::new();
        r.storage = Some(s).into();
        r
    }

    async fn mount(agent: &ReadyAgent, req: MountStorageRequest) -> ttrpc::Result<MountedStorage> {
        let resp = agent.clients.storage.mount_storage(secs(20), &req).await?;
        Ok(resp.mounted.into_option().expect("reply without the mount"))
    }

    async fn unmount(agent: &ReadyAgent, mp: &Path, detach: bool) -> ttrpc::Result<()> {
        let mut req = UnmountStorageRequest::new();
        req.mount_point = mp.display().to_string();
        req.detach = detach;
        agent
            .clients
            .storage
            .unmount_storage(secs(10), &req)
            .await
            .map(drop)
    }

    async fn list(agent: &ReadyAgent) -> Vec<String> {
        agent
            .clients
            .storage
            .list_storages(secs(5), &ListStoragesRequest::new())
            .await
            .unwrap()
            .storages
            .iter()
            .map(|m| m.storage.mount_point.clone())
            .collect()
    }

    /// The error's code and message, failing the test if the call succeeded.
    fn expect_status<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
            other => panic!("expected an RPC error status, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_errors_that_name_the_cause() {
        let Some(agent) = NsAgent::start("bad") else {
            return;
        };
        let root = agent.root();
        runtime().block_on(async {
            let ready = agent.ready().await;
            use ttrpc::Code::*;
            let tmpfs = StorageDriver::STORAGE_DRIVER_TMPFS;
            let block = StorageDriver::STORAGE_DRIVER_BLOCK;

            let cases: Vec<(&str, MountStorageRequest, ttrpc::Code, &str)> = vec![
                (
                    "outside the root",
                    request(storage(tmpfs, "", "", Path::new("/mnt/crx-x"))),
                    INVALID_ARGUMENT,
                    "outside the storage root",
                ),
                (
                    "dot-dot",
                    request(storage(tmpfs, "", "", &root.join("a/../../escape"))),
                    INVALID_ARGUMENT,
                    "\"..\"",
                ),
                (
                    "relative",
                    request(storage(tmpfs, "", "", Path::new("x/y"))),
                    INVALID_ARGUMENT,
                    "not an absolute path",
                ),
                (
                    "no driver",
                    request(storage(
                        StorageDriver::STORAGE_DRIVER_UNSPECIFIED,
                        "",
                        "",
                        &root.join("u"),
                    )),
                    INVALID_ARGUMENT,
                    "driver not set",
                ),
                (
                    "unknown virtio-fs tag",
                    request(storage(
                        StorageDriver::STORAGE_DRIVER_VIRTIOFS,
                        "no-such-tag",
                        "",
                        &root.join("fs"),
                    )),
                    NOT_FOUND,
                    "\"no-such-tag\"",
                ),
                (
                    "unknown fstype",
                    request(storage(block, "vol-1", "nosuchfs", &root.join("b"))),
                    INVALID_ARGUMENT,
                    "fstype \"nosuchfs\" is not supported",
                ),
                (
                    "fstype without a block device",
                    request(storage(block, "vol-1", "tmpfs", &root.join("b"))),
                    INVALID_ARGUMENT,
                    "not a block-device file system",
                ),
                (
                    "bind source missing",
                    request(storage(
                        StorageDriver::STORAGE_DRIVER_BIND,
                        "/nonexistent/crx-source",
                        "",
                        &root.join("bind"),
                    )),
                    NOT_FOUND,
                    "/nonexistent/crx-source does not exist",
                ),
                (
                    "no storage at all",
                    MountStorageRequest::new(),
                    INVALID_ARGUMENT,
                    "needs a storage",
                ),
                (
                    "device wait too long",
                    {
                        let mut r = request(storage(block, "vol-1", "ext4", &root.join("b")));
                        r.device_timeout_ms = 120_000;
                        r
                    },
                    INVALID_ARGUMENT,
                    "device_timeout_ms 120000",
                ),
            ];
            for (what, req, code, needle) in cases {
                let started = Instant::now();
                let (got, message) = expect_status(mount(&ready, req).await);
                assert_eq!(got, code, "{what}: {message}");
                assert!(
                    message.contains(needle),
                    "{what}: {message:?} lacks {needle:?}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{what}: took {:?}",
                    started.elapsed()
                );
            }

            // A serial nobody has: the agent waits the time it was given, then says
            // which serial it looked for and what it found instead.
            let mut req = request(storage(block, "crx-missing", "ext4", &root.join("b")));
            req.device_timeout_ms = 300;
            let started = Instant::now();
            let (code, message) = expect_status(mount(&ready, req).await);
            let took = started.elapsed();
            assert_eq!(code, NOT_FOUND, "{message}");
            assert!(
                message.contains("no virtio-blk device with serial \"crx-missing\""),
                "{message}"
            );
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(3),
                "waited {took:?} for a 300 ms device timeout"
            );

            let (code, message) =
                expect_status(unmount(&ready, &root.join("never-mounted"), false).await);
            assert_eq!(code, NOT_FOUND, "{message}");

            // Nothing was mounted, nothing was left behind, and the agent is fine.
            assert!(list(&ready).await.is_empty());
            assert!(
                !agent.ns_mountinfo().contains(&root.display().to_string()),
                "a refused request left a mount"
            );
            ready
                .clients
                .health
                .check(secs(5), &CheckRequest::new())
                .await
                .unwrap();
        });
    }

    #[test]
    fn tmpfs_and_bind_mounts_are_made_recorded_and_unmounted() {
        let Some(agent) = NsAgent::start("mounts") else {
            return;
        };
        let root = agent.root();
        let source = agent.dir.join("bind-source");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("hello"), "from the host").unwrap();
        runtime().block_on(async {
            let ready = agent.ready().await;

            // tmpfs with data options: the kernel's own view comes back.
            let tmp = root.join("scratch");
            let mut s = storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", &tmp);
            s.options = vec!["size=1m".into(), "nosuid".into()];
            let m = mount(&ready, request(s.clone())).await.unwrap();
            assert_eq!(m.kernel_fstype, "tmpfs");
            assert_eq!(m.device, "tmpfs");
            assert_eq!(m.total_bytes, 1 << 20);
            assert!(m.kernel_options.contains("nosuid"), "{}", m.kernel_options);
            std::fs::write(agent.in_ns(&tmp).join("f"), "x").unwrap();
            assert!(
                !tmp.join("f").exists(),
                "the mount leaked out of the agent's namespace"
            );

            // Twice at the same place: refused, by name.
            let (code, message) = expect_status(mount(&ready, request(s)).await);
            assert_eq!(code, ttrpc::Code::ALREADY_EXISTS, "{message}");
            assert!(message.contains(&tmp.display().to_string()), "{message}");

            // A read-only bind: the host's file is readable, writes are refused.
            let bind = root.join("vol/data");
            let mut s = storage(
                StorageDriver::STORAGE_DRIVER_BIND,
                &source.display().to_string(),
                "",
                &bind,
            );
            s.read_only = true;
            let m = mount(&ready, request(s)).await.unwrap();
            assert!(m.kernel_options.starts_with("ro"), "{}", m.kernel_options);
            let inside = agent.in_ns(&bind);
            assert_eq!(
                std::fs::read_to_string(inside.join("hello")).unwrap(),
                "from the host"
            );
            let err = std::fs::write(inside.join("new"), "x").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

            // A mount that would hide another is refused; so is unmounting a parent.
            let (code, message) = expect_status(
                mount(
                    &ready,
                    request(storage(
                        StorageDriver::STORAGE_DRIVER_TMPFS,
                        "",
                        "",
                        &root.join("vol"),
                    )),
                )
                .await,
            );
            assert_eq!(code, ttrpc::Code::ALREADY_EXISTS, "{message}");
            assert!(message.contains("would hide"), "{message}");
            let inner = tmp.join("inner");
            mount(
                &ready,
                request(storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", &inner)),
            )
            .await
            .unwrap();
            let (code, message) = expect_status(unmount(&ready, &tmp, false).await);
            assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{message}");
            assert!(message.contains("inner"), "{message}");

            assert_eq!(
                list(&ready).await,
                [&tmp, &bind, &inner].map(|p| p.display().to_string())
            );

            // Unmount, innermost first; the mount points the agent made go too.
            unmount(&ready, &inner, false).await.unwrap();
            unmount(&ready, &tmp, false).await.unwrap();
            let mountinfo = agent.ns_mountinfo();
            assert!(
                !mountinfo.contains(&format!(" {} ", tmp.display())),
                "{mountinfo}"
            );
            assert!(!agent.in_ns(&tmp).exists(), "mount point left behind");
            assert_eq!(list(&ready).await, [bind.display().to_string()]);
        });
    }

    #[test]
    fn shutdown_unmounts_everything_the_agent_mounted() {
        let Some(mut agent) = NsAgent::start_with_epilogue("shutdown") else {
            return;
        };
        let root = agent.root();
        runtime().block_on(async {
            let ready = agent.ready().await;
            for name in ["one", "two/deeper"] {
                mount(
                    &ready,
                    request(storage(
                        StorageDriver::STORAGE_DRIVER_TMPFS,
                        "",
                        "",
                        &root.join(name),
                    )),
                )
                .await
                .unwrap();
            }
            assert_eq!(list(&ready).await.len(), 2);
            ready
                .clients
                .agent
                .shutdown(secs(5), &ShutdownRequest::new())
                .await
                .unwrap();
        });
        agent.wait_exit(Duration::from_secs(10));
        let mut out = String::new();
        agent
            .child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let (status, mounts) = out.split_once("===").expect("epilogue output");
        assert!(status.contains("agent exit 0"), "{out}");
        // The namespace's table after the agent exited: none of its mounts remain.
        assert!(
            !mounts.contains(&root.display().to_string()),
            "left mounted after Shutdown:\n{mounts}"
        );
        assert!(
            !root.exists(),
            "storage root (and the mount points in it) left behind"
        );
    }
}
