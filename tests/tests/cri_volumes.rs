//! CRI volumes: what a kubelet hands containerd's CRI plugin for a pod's volumes, once
//! it has resolved them to host paths — hostPath directories and files, configMap and
//! secret files (a host file bound in), `readOnly`, `subPath` (a subdirectory or file
//! of a volume, bound on its own) and emptyDir (one fresh host directory bound into
//! several containers of a pod). Each case runs once per runtime handler, `runc` and
//! `crx` (QEMU/TCG here), as `<case>::runc` and `<case>::crx`; a crx pod sees these
//! host paths through its pod's virtio-fs share, so every check is also a check that
//! the share carries changes both ways.
//!
//! Checks of one case share one pod (one VM boot for crx) and are all run even when
//! one fails, so a failing case lists every broken behaviour at once.
//!
//! `cargo build -p containerd-shim-crx-v2 && cargo test -p crx-tests --test cri_volumes`
//! (the crx cases also need the guest kernel and initramfs: `scripts/test.sh` builds
//! them).

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::{ensure, Context, Result};
    use crx_tests::containerd::wait_until_empty;
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::suite::{poll, text, Suite, EXEC, RELEASE};
    use crx_tests::for_each_handler;
    use k8s_cri::v1 as cri;

    /// How long a change on one side may take to show on the other: virtio-fs lets
    /// the guest keep names and attributes for 1 s; the rest is TCG being slow.
    const PROPAGATE: Duration = Duration::from_secs(30);

    for_each_handler!(
        host_paths_files_readonly_and_subpaths,
        empty_dir_shared_by_two_containers,
        raw_block_device,
        host_to_container_propagation,
    );

    /// Creates and starts a `sleep` container `name` with `mounts` in the pod.
    fn start_sleeper(
        s: &Suite,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        mounts: Vec<cri::Mount>,
        run_as_user: Option<i64>,
    ) -> Result<String> {
        start_sleeper_with(s, pod_id, pod, name, mounts, run_as_user, Vec::new())
    }

    /// [`Suite::start_sleeper`] with CRI `devices`.
    fn start_sleeper_with(
        s: &Suite,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        mounts: Vec<cri::Mount>,
        run_as_user: Option<i64>,
        devices: Vec<cri::Device>,
    ) -> Result<String> {
        let client = s.client()?;
        let mut c = container_config(
            name,
            s.node.busybox(),
            &["/bin/sleep", "3600"],
            &format!("{name}.log"),
        );
        c.mounts = mounts;
        c.devices = devices;
        if let Some(uid) = run_as_user {
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: uid }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let cid = s.start_container(pod_id, pod, &c)?;
        let status = client.container_status(&cid)?;
        ensure!(
            status.state == cri::ContainerState::ContainerRunning as i32,
            "{name} is not running after StartContainer: {status:?}"
        );
        Ok(cid)
    }

    /// Checks the container runs where its handler says: on the host's kernel
    /// for runc, on its pod VM's own for crx (so a crx pass is not runc's).
    fn check_handler(s: &Suite, cid: &str) -> Result<()> {
        let r = sh(s, cid, "cat /proc/version")?;
        let host = std::fs::read_to_string("/proc/version").context("host /proc/version")?;
        ensure!(
            r.exit_code == 0 && (text(&r.stdout) == host) == (s.handler == "runc"),
            "handler {} but the container's kernel is {:?} (host: {host:?})",
            s.handler,
            text(&r.stdout)
        );
        Ok(())
    }

    /// `sh -c script` in container `cid`.
    fn sh(s: &Suite, cid: &str, script: &str) -> Result<cri::ExecSyncResponse> {
        s.client()?
            .exec_sync(cid, &["/bin/sh", "-c", script], EXEC)
            .with_context(|| format!("ExecSync sh -c {script:?}"))
    }

    /// Polls `cat path` in `cid` until it prints exactly `want`.
    fn await_content(s: &Suite, cid: &str, path: &str, want: &str) -> Result<()> {
        let mut last = String::from("no attempt");
        let seen = poll(PROPAGATE, || match sh(s, cid, &format!("cat {path}")) {
            Ok(r) if r.exit_code == 0 && r.stdout == want.as_bytes() => Some(()),
            Ok(r) => {
                last = show(&r);
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        });
        seen.with_context(|| {
            format!("{path} in the container never read {want:?} within {PROPAGATE:?}: {last}")
        })
    }

    /// Polls until `path` is gone in `cid`.
    fn await_gone(s: &Suite, cid: &str, path: &str) -> Result<()> {
        let gone = poll(PROPAGATE, || {
            let r = sh(s, cid, &format!("test -e {path}")).ok()?;
            (r.exit_code == 1).then_some(())
        });
        gone.with_context(|| format!("{path} is still there in the container after {PROPAGATE:?}"))
    }

    /// An ExecSync answer as a person reads it.
    fn show(r: &cri::ExecSyncResponse) -> String {
        format!(
            "exit {}, stdout {:?}, stderr {:?}",
            r.exit_code,
            text(&r.stdout),
            text(&r.stderr)
        )
    }

    /// Polls until the host file `path` holds exactly `want`.
    fn await_host_content(path: &Path, want: &str) -> Result<()> {
        let seen = poll(PROPAGATE, || {
            (std::fs::read_to_string(path).ok()? == want).then_some(())
        });
        seen.with_context(|| {
            format!(
                "the host's {} never read {want:?} within {PROPAGATE:?} (it reads {:?})",
                path.display(),
                std::fs::read_to_string(path)
            )
        })
    }

    fn bind(host: &Path, container: &str, readonly: bool) -> cri::Mount {
        cri::Mount {
            container_path: container.into(),
            host_path: host.display().to_string(),
            readonly,
            ..Default::default()
        }
    }

    /// A fresh host directory for a case's volumes (under containerd's private
    /// directory, which the harness removes).
    fn volume_dir(s: &Suite, name: &str) -> Result<PathBuf> {
        let dir = s.node.dir().join("volumes").join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    fn write(path: &Path, content: &str) -> Result<()> {
        std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
    }

    fn symlink(target: &str, link: &Path) -> Result<()> {
        std::os::unix::fs::symlink(target, link)
            .with_context(|| format!("linking {} -> {target}", link.display()))
    }

    fn set_mode(path: &Path, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))
    }

    /// Updates a configMap volume the kubelet's way: a new timestamped directory,
    /// a new `..data` link renamed over the old one.
    fn swap_configmap(cm: &Path) -> Result<()> {
        std::fs::create_dir_all(cm.join("..v2")).context("creating configmap/..v2")?;
        write(&cm.join("..v2/greeting"), "hello v2\n")?;
        symlink("..v2", &cm.join("..data_tmp"))?;
        std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).context("swapping ..data")?;
        std::fs::remove_dir_all(cm.join("..v1")).context("removing configmap/..v1")
    }

    /// A tmpfs on the host for as long as it lives (the kubelet keeps secret
    /// volumes on one).
    struct HostTmpfs(PathBuf);

    impl HostTmpfs {
        fn mount(dir: &Path) -> Result<HostTmpfs> {
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs"])
                .arg(dir)
                .output()
                .context("running mount")?;
            ensure!(
                out.status.success(),
                "mount -t tmpfs on {}: {}",
                dir.display(),
                text(&out.stderr)
            );
            Ok(HostTmpfs(dir.to_owned()))
        }
    }

    impl HostTmpfs {
        /// Detaches it now (`umount --lazy`), failing with umount's answer. Lazily:
        /// under a crx pod's HostToContainer volume a plain umount is refused as busy
        /// while the pod's virtio-fs server holds the mount's files the guest has
        /// looked up (the server's copy of the mount is a slave of the host's).
        fn detach(self) -> Result<()> {
            let out = std::process::Command::new("umount")
                .arg("--lazy")
                .arg(&self.0)
                .output()
                .context("running umount")?;
            ensure!(
                out.status.success(),
                "umount {}: {}",
                self.0.display(),
                text(&out.stderr)
            );
            Ok(())
        }
    }

    impl Drop for HostTmpfs {
        fn drop(&mut self) {
            // The harness unmounts what is left under its directory anyway.
            let _ = std::process::Command::new("umount").arg(&self.0).output();
        }
    }

    /// Runs every check, then fails with all that failed.
    fn all_of(checks: Vec<(&str, Result<()>)>) -> Result<()> {
        let failed: Vec<String> = checks
            .into_iter()
            .filter_map(|(what, r)| r.err().map(|e| format!("- {what}: {e:#}")))
            .collect();
        ensure!(
            failed.is_empty(),
            "{} check(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        Ok(())
    }

    // --- host paths ----------------------------------------------------------------

    /// One container with a rw host directory (changes go both ways, also after
    /// start), a configMap-style single file (an in-place host update shows), a
    /// read-only directory (writes fail with EROFS, reads work) and subPaths of a
    /// volume (a subdirectory and a file, nothing of the rest of the volume). The
    /// host's files are all still there once the pod is gone.
    fn host_paths_files_readonly_and_subpaths(s: &Suite) -> Result<()> {
        let data = volume_dir(s, "data")?;
        write(&data.join("seeded"), "seeded by the host\n")?;
        let config = volume_dir(s, "config")?;
        let config_file = config.join("app.conf");
        write(&config_file, "version=1\n")?;
        let ro = volume_dir(s, "ro")?;
        write(&ro.join("fixed"), "not for writing\n")?;
        let vol = volume_dir(s, "vol")?;
        std::fs::create_dir_all(vol.join("sub/deeper")).context("creating vol/sub")?;
        write(&vol.join("outside"), "the rest of the volume\n")?;
        write(&vol.join("sub/inside"), "in the subpath\n")?;
        write(&vol.join("sub/deeper/settings"), "mode=sub\n")?;

        // A configMap volume as the kubelet writes it: keys are symlinks through
        // `..data`, itself a symlink to a timestamped directory swapped atomically.
        let cm = volume_dir(s, "configmap")?;
        std::fs::create_dir_all(cm.join("..v1")).context("creating configmap/..v1")?;
        write(&cm.join("..v1/greeting"), "hello v1\n")?;
        symlink("..v1", &cm.join("..data"))?;
        symlink("..data/greeting", &cm.join("greeting"))?;
        // A secret volume: its own tmpfs on the host, a 0400 file.
        let secret = volume_dir(s, "secret")?;
        let _secret_fs = HostTmpfs::mount(&secret)?;
        write(&secret.join("token"), "s3cr3t\n")?;
        set_mode(&secret.join("token"), 0o400)?;

        let pod = pod_config("volumes", &s.node.pod_log_dir("volumes"));
        let pod_id = s.run_pod(&pod)?;
        let cid = start_sleeper(
            s,
            &pod_id,
            &pod,
            "app",
            vec![
                bind(&data, "/data", false),
                bind(&config_file, "/etc/app/app.conf", false),
                bind(&ro, "/ro", true),
                bind(&vol.join("sub"), "/sub", false),
                bind(&vol.join("sub/deeper/settings"), "/etc/settings", false),
                bind(&cm, "/etc/cm", true),
                bind(&secret, "/var/run/secrets/app", true),
                // A volume mounted inside another one.
                bind(&vol.join("sub/deeper"), "/data/nested", false),
            ],
            None,
        )?;
        check_handler(s, &cid)?;

        let checks =
            vec![
                (
                    "rw dir: the host's file is there at start",
                    await_content(s, &cid, "/data/seeded", "seeded by the host\n"),
                ),
                ("rw dir: a container write reaches the host", {
                    sh(s, &cid, "echo from the pod > /data/from-pod")
                        .and_then(|r| {
                            ensure!(r.exit_code == 0, "the write failed: {}", show(&r));
                            Ok(())
                        })
                        .and_then(|()| await_host_content(&data.join("from-pod"), "from the pod\n"))
                }),
                ("rw dir: a file the host adds after start shows", {
                    write(&data.join("from-host"), "added later\n")
                        .and_then(|()| await_content(s, &cid, "/data/from-host", "added later\n"))
                }),
                ("rw dir: a host rewrite of a file the pod read shows", {
                    write(&data.join("seeded"), "rewritten by the host, longer\n").and_then(|()| {
                        await_content(s, &cid, "/data/seeded", "rewritten by the host, longer\n")
                    })
                }),
                ("rw dir: a file the host removes goes", {
                    std::fs::remove_file(data.join("from-host"))
                        .context("removing data/from-host")
                        .and_then(|()| await_gone(s, &cid, "/data/from-host"))
                }),
                (
                    "single file: the host's content is there",
                    await_content(s, &cid, "/etc/app/app.conf", "version=1\n"),
                ),
                ("single file: an in-place host update shows", {
                    write(&config_file, "version=2 (updated)\n").and_then(|()| {
                        await_content(s, &cid, "/etc/app/app.conf", "version=2 (updated)\n")
                    })
                }),
                ("single file: it is a regular file", {
                    sh(s, &cid, "test -f /etc/app/app.conf").and_then(|r| {
                        ensure!(r.exit_code == 0, "not a regular file: {}", show(&r));
                        Ok(())
                    })
                }),
                (
                    "readonly: reads work",
                    await_content(s, &cid, "/ro/fixed", "not for writing\n"),
                ),
                ("readonly: a new file fails with EROFS", {
                    sh(s, &cid, "echo x > /ro/new").and_then(|r| {
                        ensure!(
                            r.exit_code != 0 && text(&r.stderr).contains("Read-only file system"),
                            "creating /ro/new answered {}",
                            show(&r)
                        );
                        ensure!(!ro.join("new").exists(), "ro/new appeared on the host");
                        Ok(())
                    })
                }),
                ("readonly: overwriting fails with EROFS", {
                    sh(s, &cid, "echo x > /ro/fixed").and_then(|r| {
                        ensure!(
                            r.exit_code != 0 && text(&r.stderr).contains("Read-only file system"),
                            "overwriting /ro/fixed answered {}",
                            show(&r)
                        );
                        let host = std::fs::read_to_string(ro.join("fixed"))?;
                        ensure!(host == "not for writing\n", "the host file became {host:?}");
                        Ok(())
                    })
                }),
                (
                    "readonly: the pod's virtio-fs server has it read-only too (crx)",
                    server_sees_read_only(s, &pod_id, &ro),
                ),
                (
                    "readonly: the mount is ro in the container's mount table",
                    {
                        sh(s, &cid, "grep ' /ro ' /proc/mounts").and_then(|r| {
                            let line = text(&r.stdout);
                            let opts = line.split(' ').nth(3).unwrap_or("");
                            ensure!(
                                opts.split(',').any(|o| o == "ro"),
                                "/ro is mounted {line:?}"
                            );
                            Ok(())
                        })
                    },
                ),
                (
                    "subPath dir: its files are there",
                    await_content(s, &cid, "/sub/inside", "in the subpath\n"),
                ),
                ("subPath dir: nothing of the rest of the volume", {
                    sh(s, &cid, "ls -A /sub").and_then(|r| {
                        let mut names: Vec<String> = text(&r.stdout)
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect();
                        names.sort();
                        ensure!(
                            r.exit_code == 0 && names == ["deeper", "inside"],
                            "/sub lists {}",
                            show(&r)
                        );
                        Ok(())
                    })
                }),
                (
                    "subPath dir: a container write lands in the subdirectory",
                    {
                        sh(s, &cid, "echo via subpath > /sub/written")
                            .and_then(|r| {
                                ensure!(r.exit_code == 0, "the write failed: {}", show(&r));
                                Ok(())
                            })
                            .and_then(|()| {
                                await_host_content(&vol.join("sub/written"), "via subpath\n")
                            })
                    },
                ),
                (
                    "subPath file: its content is there",
                    await_content(s, &cid, "/etc/settings", "mode=sub\n"),
                ),
                ("nested volume: it shadows the outer one at its path", {
                    await_content(s, &cid, "/data/nested/settings", "mode=sub\n").and_then(|()| {
                        ensure!(
                            !data.join("nested/settings").exists(),
                            "the nested volume's file appeared in the outer volume on the host"
                        );
                        Ok(())
                    })
                }),
                (
                    "rw dir: a write-then-rename (atomic save) shows as the final file",
                    {
                        sh(
                            s,
                            &cid,
                            "echo saved > /data/.tmp-save && mv /data/.tmp-save /data/saved",
                        )
                        .and_then(|r| {
                            ensure!(r.exit_code == 0, "save failed: {}", show(&r));
                            Ok(())
                        })
                        .and_then(|()| await_host_content(&data.join("saved"), "saved\n"))
                        .and_then(|()| {
                            ensure!(
                                !data.join(".tmp-save").exists(),
                                "the temporary file is left"
                            );
                            Ok(())
                        })
                    },
                ),
                ("rw dir: chown and chmod by the container reach the host", {
                    sh(s, &cid,
                    "mkdir /data/owned && chown 1000:2000 /data/owned && chmod 0700 /data/owned",
                )
                .and_then(|r| {
                    ensure!(r.exit_code == 0, "chown/chmod failed: {}", show(&r));
                    Ok(())
                })
                .and_then(|()| {
                    use std::os::unix::fs::MetadataExt;
                    let m = std::fs::metadata(data.join("owned"))?;
                    ensure!(
                        (m.uid(), m.gid(), m.mode() & 0o7777) == (1000, 2000, 0o700),
                        "the host sees uid {} gid {} mode {:o}",
                        m.uid(),
                        m.gid(),
                        m.mode() & 0o7777
                    );
                    Ok(())
                })
                }),
                (
                    "rw dir: a symlink made in the container is one on the host",
                    {
                        sh(s, &cid, "ln -s seeded /data/link").and_then(|r| {
                            ensure!(r.exit_code == 0, "ln -s failed: {}", show(&r));
                            let target = std::fs::read_link(data.join("link"))?;
                            ensure!(target == Path::new("seeded"), "it points at {target:?}");
                            Ok(())
                        })
                    },
                ),
                ("rw dir: 4 MiB written by the container arrive whole", {
                    sh(s, &cid, "yes 0123456789abcde | head -c 4194304 > /data/big")
                        .and_then(|r| {
                            ensure!(r.exit_code == 0, "the write failed: {}", show(&r));
                            Ok(())
                        })
                        .and_then(|()| {
                            let big = std::fs::read(data.join("big"))?;
                            let want: Vec<u8> = b"0123456789abcde\n"
                                .iter()
                                .copied()
                                .cycle()
                                .take(4 << 20)
                                .collect();
                            ensure!(big == want, "the host reads {} other bytes", big.len());
                            Ok(())
                        })
                }),
                (
                    "configMap dir: keys read through ..data",
                    await_content(s, &cid, "/etc/cm/greeting", "hello v1\n"),
                ),
                ("configMap dir: an atomic ..data swap shows", {
                    swap_configmap(&cm)
                        .and_then(|()| await_content(s, &cid, "/etc/cm/greeting", "hello v2\n"))
                }),
                (
                    "secret on a host tmpfs: its content is there",
                    await_content(s, &cid, "/var/run/secrets/app/token", "s3cr3t\n"),
                ),
                ("secret on a host tmpfs: its mode is kept", {
                    sh(s, &cid, "stat -c %a /var/run/secrets/app/token").and_then(|r| {
                        ensure!(
                            text(&r.stdout).trim() == "400",
                            "stat answered {}",
                            show(&r)
                        );
                        Ok(())
                    })
                }),
            ];
        let outcome = all_of(checks);
        let removed = s.remove_pod(&pod_id);
        outcome?;
        removed?;
        // Removing the pod unbinds the volumes; it must not delete through them.
        for (path, want) in [
            (data.join("seeded"), "rewritten by the host, longer\n"),
            (data.join("from-pod"), "from the pod\n"),
            (config_file.clone(), "version=2 (updated)\n"),
            (ro.join("fixed"), "not for writing\n"),
            (vol.join("outside"), "the rest of the volume\n"),
            (vol.join("sub/written"), "via subpath\n"),
            (vol.join("sub/deeper/settings"), "mode=sub\n"),
            (cm.join("greeting"), "hello v2\n"),
            (secret.join("token"), "s3cr3t\n"),
        ] {
            let got = std::fs::read_to_string(&path).ok();
            ensure!(
                got.as_deref() == Some(want),
                "after the pod was removed the host's {} reads {got:?}, want {want:?}",
                path.display()
            );
        }
        Ok(())
    }

    /// For crx: every copy of host directory `dir` the pod's VMM processes (crx-vmm,
    /// or its vhost-user-fs back end) have in their mount namespace is read-only,
    /// so a guest that ignores the container's `ro` still cannot write it.
    fn server_sees_read_only(s: &Suite, pod_id: &str, dir: &Path) -> Result<()> {
        if s.handler != "crx" {
            return Ok(());
        }
        let servers: Vec<u32> =
            crx_tests::vm_harness::processes_mentioning(&format!("/run/crx/{pod_id}/"))
                .into_iter()
                .filter(|(_, cmd)| cmd.contains("crx-vmm"))
                .map(|(pid, _)| pid)
                .collect();
        ensure!(!servers.is_empty(), "no crx-vmm process of pod {pod_id}");
        let suffix = dir
            .strip_prefix(s.node.dir())
            .context("the volume is not under containerd's directory")?
            .display()
            .to_string();
        let mut copies = Vec::new();
        for pid in servers {
            let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .with_context(|| format!("reading /proc/{pid}/mountinfo"))?;
            for line in info.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                let (Some(root), Some(point), Some(opts)) =
                    (fields.get(3), fields.get(4), fields.get(5))
                else {
                    continue;
                };
                if root.ends_with(&format!("/{suffix}")) && point.contains("/share/") {
                    copies.push((pid, point.to_string(), opts.to_string()));
                }
            }
        }
        ensure!(
            !copies.is_empty(),
            "no VMM process has {} in its mount namespace",
            dir.display()
        );
        let writable: Vec<_> = copies
            .iter()
            .filter(|(_, _, opts)| !opts.split(',').any(|o| o == "ro"))
            .collect();
        ensure!(
            writable.is_empty(),
            "writable copies (pid, mount point, options): {writable:?}"
        );
        Ok(())
    }

    // --- emptyDir ------------------------------------------------------------------

    /// One fresh host directory bound into two containers of a pod (how the kubelet
    /// gives an emptyDir, mode 0777): each sees what the other writes, including an
    /// overwrite and a removal, whether it runs as root or not; removing one
    /// container leaves the directory to the other.
    fn empty_dir_shared_by_two_containers(s: &Suite) -> Result<()> {
        let scratch = volume_dir(s, "scratch")?;
        set_mode(&scratch, 0o777)?;
        let pod = pod_config("emptydir", &s.node.pod_log_dir("emptydir"));
        let pod_id = s.run_pod(&pod)?;
        let writer = start_sleeper(
            s,
            &pod_id,
            &pod,
            "writer",
            vec![bind(&scratch, "/cache", false)],
            None,
        )?;
        check_handler(s, &writer)?;
        let reader = start_sleeper(
            s,
            &pod_id,
            &pod,
            "reader",
            vec![bind(&scratch, "/shared/cache", false)],
            Some(NON_ROOT_UID),
        )?;
        let write_in = |cid: &str, script: &str| -> Result<()> {
            let r = sh(s, cid, script)?;
            ensure!(r.exit_code == 0, "{script:?} failed: {}", show(&r));
            Ok(())
        };
        let checks = vec![
            ("the directory starts empty", {
                sh(s, &reader, "ls -A /shared/cache").and_then(|r| {
                    ensure!(
                        r.exit_code == 0 && r.stdout.is_empty(),
                        "it lists {}",
                        show(&r)
                    );
                    Ok(())
                })
            }),
            ("one container writes, the other reads", {
                write_in(&writer, "echo note one > /cache/note")
                    .and_then(|()| await_content(s, &reader, "/shared/cache/note", "note one\n"))
            }),
            ("and back", {
                write_in(
                    &reader,
                    "mkdir /shared/cache/dir && echo reply > /shared/cache/dir/r",
                )
                .and_then(|()| await_content(s, &writer, "/cache/dir/r", "reply\n"))
            }),
            ("an overwrite shows in the other container", {
                write_in(&writer, "echo note two, longer > /cache/note").and_then(|()| {
                    await_content(s, &reader, "/shared/cache/note", "note two, longer\n")
                })
            }),
            ("an append to the non-root container's file shows in it", {
                write_in(&writer, "echo appended >> /cache/dir/r").and_then(|()| {
                    await_content(s, &reader, "/shared/cache/dir/r", "reply\nappended\n")
                })
            }),
            (
                "the non-root container cannot write the root container's file",
                {
                    sh(s, &reader, "echo x >> /shared/cache/note").and_then(|r| {
                        ensure!(
                            r.exit_code != 0 && text(&r.stderr).contains("Permission denied"),
                            "appending as uid {NON_ROOT_UID} answered {}",
                            show(&r)
                        );
                        Ok(())
                    })
                },
            ),
            ("a removal shows in the other container", {
                write_in(&writer, "rm /cache/note")
                    .and_then(|()| await_gone(s, &reader, "/shared/cache/note"))
            }),
            (
                "the host holds what the containers wrote, owned by who wrote it",
                {
                    await_host_content(&scratch.join("dir/r"), "reply\nappended\n").and_then(|()| {
                        use std::os::unix::fs::MetadataExt;
                        let uid = std::fs::metadata(scratch.join("dir/r"))?.uid();
                        ensure!(
                            i64::from(uid) == NON_ROOT_UID,
                            "dir/r is owned by uid {uid}, the reader runs as {NON_ROOT_UID}"
                        );
                        Ok(())
                    })
                },
            ),
            ("the volume outlives a container removed from the pod", {
                remove_container(s, &pod_id, &writer).and_then(|()| {
                    await_content(s, &reader, "/shared/cache/dir/r", "reply\nappended\n")?;
                    write_in(&reader, "echo after > /shared/cache/after")?;
                    await_host_content(&scratch.join("after"), "after\n")
                })
            }),
        ];
        let outcome = all_of(checks);
        let removed = s.remove_pod(&pod_id);
        outcome?;
        removed
    }

    /// The uid a non-root container runs as.
    const NON_ROOT_UID: i64 = 1000;

    /// Stops and removes container `cid` of pod `pod_id`; for crx, nothing of it is
    /// left mounted in the pod's share.
    fn remove_container(s: &Suite, pod_id: &str, cid: &str) -> Result<()> {
        let client = s.client()?;
        client.stop_container(cid, 2).context("StopContainer")?;
        client.remove_container(cid).context("RemoveContainer")?;
        if s.handler == "crx" {
            let dir = Path::new("/run/crx").join(pod_id).join("share").join(cid);
            let left = wait_until_empty(RELEASE, || {
                crx_tests::containerd::mounts_under(&dir)
                    .into_iter()
                    .map(|m| m.display().to_string())
                    .collect()
            });
            ensure!(
                left.is_empty(),
                "the removed container left mounts: {left:?}"
            );
        }
        Ok(())
    }

    // --- raw block devices ---------------------------------------------------------

    /// What the disk's first bytes hold.
    const DISK_HEADER: &[u8] = b"crx raw block device header\n";
    /// Where the container writes on the disk, and what.
    const DISK_WRITE_OFFSET: u64 = 65536;
    const DISK_WRITTEN: &[u8] = b"written by the pod";
    /// Where a container allowed only to read the disk tries to write.
    const READ_ONLY_OFFSET: u64 = 131072;

    /// A CRI device (a `volumeDevices` block volume): a host loop device, which the
    /// container sees as a block device at /dev/xvdb, reads and writes through to the
    /// host (a crx pod gets it through one of its VM's drive slots). Once the
    /// container is removed nothing on the host holds the device any more, and its
    /// place is free again: two more containers at once each get a device (a crx pod
    /// has two slots), and see what the first one wrote; the one given it with
    /// permissions "r" cannot write it.
    fn raw_block_device(s: &Suite) -> Result<()> {
        let dir = volume_dir(s, "block")?;
        let image = dir.join("disk.img");
        let mut content = DISK_HEADER.to_vec();
        content.resize(1 << 20, 0);
        std::fs::write(&image, &content).context("writing the disk image")?;
        let disk = LoopDevice::attach(&image)?;
        let pod = pod_config("block", &s.node.pod_log_dir("block"));
        let pod_id = s.run_pod(&pod)?;
        let outcome = disk_round_trip(s, &pod_id, &pod, &disk);
        let removed = s.remove_pod(&pod_id);
        outcome?;
        removed?;
        await_unheld(&disk)
    }

    fn disk_round_trip(
        s: &Suite,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        disk: &LoopDevice,
    ) -> Result<()> {
        let device = cri::Device {
            container_path: "/dev/xvdb".into(),
            host_path: disk.0.clone(),
            permissions: "rw".into(),
        };
        let with_disk = |name: &str, permissions: &str| {
            let device = cri::Device {
                permissions: permissions.into(),
                ..device.clone()
            };
            start_sleeper_with(s, pod_id, pod, name, vec![], None, vec![device])
        };
        let cid = with_disk("disk-user", "rw")?;
        check_handler(s, &cid)?;
        use_the_disk(s, &cid, disk)?;
        let client = s.client()?;
        client
            .stop_container(&cid, 0)
            .context("StopContainer disk-user")?;
        client
            .remove_container(&cid)
            .context("RemoveContainer disk-user")?;
        await_unheld(disk)?;
        let mut readers = Vec::new();
        for (name, permissions) in [("disk-reader-1", "rw"), ("disk-reader-2", "r")] {
            let cid = with_disk(name, permissions)?;
            let r = sh(
                s,
                &cid,
                &format!(
                    "dd if=/dev/xvdb bs=1 skip={DISK_WRITE_OFFSET} count={} 2>/dev/null",
                    DISK_WRITTEN.len()
                ),
            )?;
            ensure!(
                r.exit_code == 0 && r.stdout == DISK_WRITTEN,
                "{name} reads {} where disk-user wrote",
                show(&r)
            );
            readers.push(cid);
        }
        let write = format!(
            "printf 'nope' | dd of=/dev/xvdb bs=1 seek={READ_ONLY_OFFSET} conv=notrunc,fsync"
        );
        let r = sh(s, &readers[1], &write)?;
        let on_host = disk.read_at(READ_ONLY_OFFSET, 4)?;
        ensure!(
            r.exit_code != 0 && on_host == [0; 4],
            "a container given /dev/xvdb with permissions \"r\" wrote it ({}); the host reads {on_host:?}",
            show(&r)
        );
        Ok(())
    }

    /// The container sees a block device, reads the disk's header and writes at an
    /// offset the host reads.
    fn use_the_disk(s: &Suite, cid: &str, disk: &LoopDevice) -> Result<()> {
        let r = sh(s, cid, "test -b /dev/xvdb && echo block")?;
        ensure!(
            r.exit_code == 0 && r.stdout == b"block\n",
            "/dev/xvdb is not a block device in the container: {}",
            show(&r)
        );
        let r = sh(s, cid, &format!("head -c {} /dev/xvdb", DISK_HEADER.len()))?;
        ensure!(
            r.exit_code == 0 && r.stdout == DISK_HEADER,
            "reading /dev/xvdb: {}",
            show(&r)
        );
        let write = format!(
            "printf '{}' | dd of=/dev/xvdb bs=1 seek={DISK_WRITE_OFFSET} conv=notrunc,fsync",
            text(DISK_WRITTEN)
        );
        let r = sh(s, cid, &write)?;
        ensure!(r.exit_code == 0, "writing /dev/xvdb: {}", show(&r));
        let on_host = disk.read_at(DISK_WRITE_OFFSET, DISK_WRITTEN.len())?;
        ensure!(
            on_host == DISK_WRITTEN,
            "the host reads {:?} where the pod wrote",
            text(&on_host)
        );
        Ok(())
    }

    /// Waits until no host process has `disk` open (a crx pod's VMM held it while a
    /// container had it; runc's container held it while it ran).
    fn await_unheld(disk: &LoopDevice) -> Result<()> {
        let mut holders = Vec::new();
        let gone = poll(RELEASE, || {
            holders = disk.holders();
            holders.is_empty().then_some(())
        });
        ensure!(
            gone.is_some(),
            "{} is still held open by {holders:?} after its containers were removed",
            disk.0
        );
        Ok(())
    }

    /// A host loop device over a file, detached when dropped.
    struct LoopDevice(String);

    impl LoopDevice {
        fn attach(image: &Path) -> Result<LoopDevice> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image)
                .output()
                .context("running losetup (util-linux)")?;
            ensure!(
                out.status.success(),
                "losetup --find --show {}: {}",
                image.display(),
                text(&out.stderr)
            );
            Ok(LoopDevice(text(&out.stdout).trim().to_owned()))
        }

        /// The host processes (`pid comm`) with the device open.
        fn holders(&self) -> Vec<String> {
            let device = Path::new(&self.0);
            let mut found = Vec::new();
            let Ok(procs) = std::fs::read_dir("/proc") else {
                return found;
            };
            for entry in procs.flatten() {
                let pid = entry.file_name().to_string_lossy().into_owned();
                if !pid.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                    continue;
                };
                let open = fds
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == device));
                if open {
                    let comm =
                        std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    found.push(format!("{pid} {}", comm.trim()));
                }
            }
            found
        }

        /// `len` bytes at `offset`, read through the device (its page cache is the
        /// one the container wrote through).
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
            use std::os::unix::fs::FileExt;
            let file =
                std::fs::File::open(&self.0).with_context(|| format!("opening {}", self.0))?;
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)
                .with_context(|| format!("reading {}", self.0))?;
            Ok(buf)
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .output();
        }
    }

    // --- mount propagation ---------------------------------------------------------

    /// A hostPath with `mountPropagation: HostToContainer` (a directory a node agent
    /// mounts into later): a mount the host makes under it after the container
    /// started shows in the container, and detaching it shows too.
    fn host_to_container_propagation(s: &Suite) -> Result<()> {
        let dir = volume_dir(s, "propagating")?;
        // HostToContainer needs the host side to be a shared mount (containerd checks).
        let shared = SharedMount::make(&dir)?;
        std::fs::create_dir_all(dir.join("late")).context("creating propagating/late")?;
        write(&dir.join("late/under"), "under the later mount\n")?;
        let pod = pod_config("propagation", &s.node.pod_log_dir("propagation"));
        let pod_id = s.run_pod(&pod)?;
        let mut volume = bind(&dir, "/prop", false);
        volume.propagation = cri::MountPropagation::PropagationHostToContainer as i32;
        let outcome =
            start_sleeper(s, &pod_id, &pod, "watcher", vec![volume], None).and_then(|cid| {
                check_handler(s, &cid)?;
                await_content(s, &cid, "/prop/late/under", "under the later mount\n")?;
                let late = HostTmpfs::mount(&dir.join("late"))?;
                write(&dir.join("late/on-top"), "on the later mount\n")?;
                await_content(s, &cid, "/prop/late/on-top", "on the later mount\n")?;
                await_gone(s, &cid, "/prop/late/under")?;
                late.detach()?;
                await_content(s, &cid, "/prop/late/under", "under the later mount\n")
            });
        let removed = s.remove_pod(&pod_id);
        drop(shared);
        outcome?;
        removed
    }

    /// `dir` bound onto itself and made a shared mount, for as long as it lives.
    struct SharedMount(PathBuf);

    impl SharedMount {
        fn make(dir: &Path) -> Result<SharedMount> {
            let held = SharedMount(dir.to_owned());
            for args in [&["--bind"][..], &["--make-shared"][..]] {
                let mut cmd = std::process::Command::new("mount");
                cmd.args(args);
                if args[0] == "--bind" {
                    cmd.arg(dir);
                }
                let out = cmd.arg(dir).output().context("running mount")?;
                ensure!(
                    out.status.success(),
                    "mount {args:?} {}: {}",
                    dir.display(),
                    text(&out.stderr)
                );
            }
            Ok(held)
        }
    }

    impl Drop for SharedMount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["--recursive", "--lazy"])
                .arg(&self.0)
                .output();
        }
    }
}
