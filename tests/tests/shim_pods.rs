//! crx pods end to end: the jail of a pod VM's crx-vmm processes, and containers run
//! by containerd 1.6 (`ctr`) through containerd-shim-crx-v2 in QEMU/TCG pod VMs with
//! the built guest kernel, initramfs and static crx-vmm.
//!
//! The `ctr` cases need an agent that serves `Sandbox.CreateSandbox` and the
//! container services (protocol version 3); with an older agent they fail at the
//! first `ctr run`, with ctr's message naming both protocol versions.
//!
//! Run one at a time (they share the host's `/run/crx` and `/run/containerd/s`):
//! `cargo build -p containerd-shim-crx-v2 && cargo test -p crx-tests --test shim_pods -- --test-threads=1`.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context, Result};
    use crx_protocols::hybrid_vsock::context_until;
    use crx_protocols::v1::storage::{MountStorageRequest, Storage, StorageDriver};
    use crx_shim::vm::{Confinement, QemuAccel, QemuBackend, SharedDir};
    use crx_tests::containerd::{
        self, pod_leftovers, shim_sockets, wait_until_empty, Containerd, CtrOutput, POD_RELEASE,
    };
    use crx_tests::vm_harness::{self, boot, processes_mentioning, vm_config, RunDir};

    /// The annotation that puts a container into another container's pod.
    const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
    /// Sequential pods in the leak check: the soak (each is a TCG boot; the
    /// whole file took 3 min 39 s here with 50, at load 7 on 2 cores).
    const SEQUENTIAL_RUNS: usize = 50;

    fn run_cmd(cmd: &mut Command) -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn mount_bind(source: &Path, target: &Path) -> Result<()> {
        run_cmd(Command::new("mount").arg("--bind").arg(source).arg(target))
    }

    /// Polls `check` until it returns Ok or `timeout` passes; returns the last error.
    fn eventually(timeout: Duration, mut check: impl FnMut() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match check() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Unmounts on drop (lazily: a test that failed half-way must not leave mounts).
    struct Mounted(std::path::PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    /// The jail of QEMU's crx-vmm back ends: each runs in its own mount namespace whose
    /// root holds only the run directory (and /proc for the file server); the agent
    /// answers through the jailed vsock back end's socket; and a bind mount added to the
    /// shared pod share after boot reaches the jailed virtio-fs server (as a slave of
    /// the host's share) and so the guest, which can bind-mount a directory inside it.
    #[test]
    fn jailed_back_ends_serve_the_agent_socket_and_mounts_added_after_boot() -> Result<()> {
        let dir = RunDir::new("jail-prop")?;
        let share = dir.path().join("share");
        let late = share.join("late");
        std::fs::create_dir_all(&late)?;
        mount_bind(&share, &share)?;
        let _share_mount = Mounted(share.clone());
        run_cmd(Command::new("mount").arg("--make-shared").arg(&share))?;

        let mut config = vm_config(dir.path(), "jail-prop", 1, 128, "")?;
        config.devices.shares = vec![SharedDir {
            tag: "podshare".into(),
            host_dir: share.clone(),
        }];
        let backend = QemuBackend {
            confinement: Confinement {
                jail: true,
                ..Default::default()
            },
            ..QemuBackend::new(QemuAccel::Tcg)
        };
        let rt = vm_harness::runtime()?;
        let (mut vm, agent, took) = boot(&rt, &backend, &config)?;
        eprintln!("jailed back ends: spawn -> agent reply {took:?}");

        let fs_pid = vm
            .pids()
            .into_iter()
            .find(|(name, _)| *name == "vhost-user-fs")
            .map(|(_, pid)| pid)
            .context("no vhost-user-fs process")?;
        for (name, pid) in vm.pids() {
            if name == "qemu" {
                continue;
            }
            let root: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ensure!(
                !root.contains("usr") && !root.contains("etc") && root.contains("run"),
                "{name} ({pid}) is not jailed: its root holds {root:?}"
            );
        }
        let mountinfo = std::fs::read_to_string(format!("/proc/{fs_pid}/mountinfo"))?;
        let share_line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(&*share.to_string_lossy()))
            .with_context(|| format!("the share is not mounted in the jail: {mountinfo}"))?;
        ensure!(
            share_line.contains("master:"),
            "the jail's share is not a slave of the host's: {share_line}"
        );

        let guest_share = "/run/crx/storage/share";
        let mut req = MountStorageRequest::new();
        let mut s = Storage::new();
        s.driver = StorageDriver::STORAGE_DRIVER_VIRTIOFS.into();
        s.source = "podshare".into();
        s.fstype = "virtiofs".into();
        s.mount_point = guest_share.into();
        req.storage = Some(s).into();
        rt.block_on(agent.clients.storage.mount_storage(
            context_until(Instant::now() + Duration::from_secs(60)),
            &req,
        ))
        .context("mounting the share in the guest")?;

        // Added after boot, as a pod's later container rootfs is.
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("inner"))?;
        std::fs::write(src.join("inner/marker"), "late mount")?;
        mount_bind(&src, &late)?;
        let _late_mount = Mounted(late.clone());

        let in_jail = Path::new(&format!("/proc/{fs_pid}/root")).join(
            late.join("inner/marker")
                .strip_prefix("/")
                .context("relative share path")?,
        );
        eventually(Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&in_jail)?;
            ensure!(text == "late mount", "read {text:?}");
            Ok(())
        })
        .with_context(|| format!("{} not visible in the jail", in_jail.display()))?;

        // The guest can only bind-mount a source that exists in its view of the share.
        let mut req = MountStorageRequest::new();
        let mut s = Storage::new();
        s.driver = StorageDriver::STORAGE_DRIVER_BIND.into();
        s.source = format!("{guest_share}/late/inner");
        s.mount_point = "/run/crx/storage/probe".into();
        req.storage = Some(s).into();
        let mounted = rt.block_on(agent.clients.storage.mount_storage(
            context_until(Instant::now() + Duration::from_secs(30)),
            &req,
        ));
        ensure!(
            mounted.is_ok(),
            "the guest does not see the mount added after boot: {mounted:?}"
        );
        let exit = vm_harness::shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(!exit.is_failure(), "{exit}");
        Ok(())
    }

    // ---- containerd ----

    fn names_in(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Network interfaces (a pod's tap would show here).
    fn links() -> BTreeSet<String> {
        names_in(Path::new("/sys/class/net"))
    }

    /// A `ctr` command in the background (for runs that end by a signal).
    fn ctr_background(ctrd: &Containerd, args: &[&str]) -> Result<Child> {
        Command::new("timeout")
            .args(["180", "ctr", "-a"])
            .arg(ctrd.socket())
            .args(["-n", containerd::NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ctr")
    }

    fn task_status(ctrd: &Containerd, id: &str) -> Result<Option<String>> {
        let ls = ctrd.ctr(&["task", "ls"])?;
        Ok(ls
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned))
    }

    fn wait_status(ctrd: &Containerd, id: &str, want: &str, timeout: Duration) -> Result<()> {
        eventually(timeout, || {
            let status = task_status(ctrd, id)?;
            ensure!(
                status.as_deref() == Some(want),
                "task {id} is {status:?}, not {want}"
            );
            Ok(())
        })
    }

    /// Waits until the shim has started exec `exec_id` (its log line in containerd's
    /// log: `ctr task ps` does not name execs).
    fn wait_exec_started(ctrd: &Containerd, exec_id: &str) -> Result<()> {
        let needle = format!("exec_id={exec_id} ");
        eventually(Duration::from_secs(60), || {
            let log = std::fs::read_to_string(ctrd.dir().join("containerd.log"))?;
            ensure!(
                log.lines()
                    .any(|l| l.contains("process started") && l.contains(&needle)),
                "exec {exec_id} not started yet"
            );
            Ok(())
        })
    }

    fn vmm_pids(id: &str) -> Vec<u32> {
        processes_mentioning(&format!("/run/crx/{id}/"))
            .into_iter()
            // QEMU, or crx-vmm as the VMM (its back ends and helpers have subcommands).
            .filter(|(_, cmd)| {
                cmd.contains("qemu-system")
                    || (cmd.contains("crx-vmm --") && !cmd.contains("vhost-user"))
            })
            .map(|(pid, _)| pid)
            .collect()
    }

    fn kill(pid: u32) {
        // SAFETY: kill(2) on a pid the test just found; SIGKILL is the fault injected.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }

    /// One pod, everything a user does with it: `ctr run` passes output and the exit
    /// code through; exec runs in the running container with its own output and exit
    /// code; a signal to an exec (SIGTERM: 143) and to the container (SIGKILL: 137)
    /// ends it with that status; delete removes everything.
    #[test]
    fn run_exec_kill_and_delete_through_ctr() -> Result<()> {
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();

        let started = Instant::now();
        let out = ctrd.crx_run(
            &["--rm"],
            image,
            "pod-run",
            &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
        )?;
        eprintln!("ctr run --rm: {:?}", started.elapsed());
        ensure!(
            out.code == Some(3) && out.stdout == "out\n" && out.stderr.contains("err"),
            "ctr run: {out:?}\n{}",
            ctrd.log_tail(30)
        );
        ctrd.assert_pod_released("pod-run", &sockets)?;

        let id = "pod-life";
        let out = ctrd.crx_run(&["-d"], image, id, &["/bin/sleep", "1000"])?;
        ensure!(out.success(), "ctr run -d: {out:?}\n{}", ctrd.log_tail(30));
        wait_status(&ctrd, id, "RUNNING", Duration::from_secs(60))?;

        let out = ctrd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            id,
            "/bin/sh",
            "-c",
            "echo exec; exit 5",
        ])?;
        ensure!(
            out.code == Some(5) && out.stdout == "exec\n",
            "exec: {out:?}\n{}",
            ctrd.log_tail(30)
        );

        // An exec is not the container's pid 1, so SIGTERM's default action applies.
        let sleeper = ctr_background(
            &ctrd,
            &["task", "exec", "--exec-id", "e2", id, "/bin/sleep", "1000"],
        )?;
        wait_exec_started(&ctrd, "e2")?;
        let out = ctrd.ctr(&["task", "kill", "--exec-id", "e2", "-s", "SIGTERM", id])?;
        ensure!(out.success(), "kill exec: {out:?}");
        let out = CtrOutput::from(sleeper.wait_with_output()?);
        ensure!(out.code == Some(143), "SIGTERM'd exec: {out:?}");

        let out = ctrd.ctr(&["task", "kill", "-s", "SIGKILL", id])?;
        ensure!(out.success(), "kill: {out:?}");
        wait_status(&ctrd, id, "STOPPED", Duration::from_secs(30))?;
        // ctr 1.6's task delete reports the task's exit status as a warning.
        let out = ctrd.ctr(&["task", "delete", id])?;
        ensure!(
            out.success() && out.stderr.contains("exit code 137"),
            "task delete after SIGKILL: {out:?}"
        );
        let out = ctrd.ctr(&["containers", "rm", id])?;
        ensure!(out.success(), "containers rm: {out:?}");
        ctrd.assert_pod_released(id, &sockets)
    }

    /// Two containers in one pod share one VM: the second names the first's pod in the
    /// `io.kubernetes.cri.sandbox-id` annotation, gets the same shim, and runs in the
    /// running VM (its rootfs was bound into the pod share after boot, through the
    /// jail). The pod goes only with its last task.
    #[test]
    fn two_containers_in_one_pod_share_its_vm() -> Result<()> {
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let pod = "pod-two";
        let out = ctrd.crx_run(&["-d"], image, pod, &["/bin/sleep", "1000"])?;
        ensure!(out.success(), "first: {out:?}\n{}", ctrd.log_tail(30));
        wait_status(&ctrd, pod, "RUNNING", Duration::from_secs(60))?;
        let vmm = vmm_pids(pod);
        ensure!(vmm.len() == 1, "one VMM expected for {pod}: {vmm:?}");
        let shims = ctrd.shim_pids();

        let annotation = format!("{SANDBOX_ANNOTATION}={pod}");
        let out = ctrd.crx_run(
            &["--rm", "--annotation", &annotation],
            image,
            "pod-two-c2",
            &[
                "/bin/sh",
                "-c",
                "echo second; cat /proc/1/cmdline | tr '\\0' ' '",
            ],
        )?;
        ensure!(
            out.success() && out.stdout.starts_with("second\n"),
            "second container: {out:?}\n{}",
            ctrd.log_tail(30)
        );
        ensure!(
            ctrd.shim_pids() == shims,
            "the second container got another shim"
        );
        ensure!(vmm_pids(pod) == vmm, "the second container changed the VM");
        ensure!(
            !Path::new("/run/crx/pod-two-c2").exists(),
            "the second container got a pod of its own"
        );
        // The first container's pod is still there after the second's delete.
        ensure!(
            task_status(&ctrd, pod)?.as_deref() == Some("RUNNING"),
            "the pod's first task did not survive the second's delete"
        );
        let _ = ctrd.ctr(&["task", "kill", "-s", "SIGKILL", pod])?;
        wait_status(&ctrd, pod, "STOPPED", Duration::from_secs(30))?;
        let _ = ctrd.ctr(&["task", "delete", pod])?;
        ensure!(ctrd.ctr(&["containers", "rm", pod])?.success());
        ctrd.assert_pod_released(pod, &sockets)
    }

    /// Fault: the VMM dies under a running pod. Every task of the pod (the container
    /// and its exec) exits, the host side of the pod goes before anyone deletes, and
    /// containerd's delete then leaves nothing.
    #[test]
    fn a_killed_vmm_ends_every_task_and_releases_the_pod() -> Result<()> {
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let id = "pod-vmmkill";
        let out = ctrd.crx_run(&["-d"], image, id, &["/bin/sleep", "1000"])?;
        ensure!(out.success(), "ctr run -d: {out:?}\n{}", ctrd.log_tail(30));
        wait_status(&ctrd, id, "RUNNING", Duration::from_secs(60))?;
        let exec = ctr_background(
            &ctrd,
            &["task", "exec", "--exec-id", "x1", id, "/bin/sleep", "1000"],
        )?;
        wait_exec_started(&ctrd, "x1")?;
        containerd::ensure_vm_in_pod_cgroup(id)?;
        let vmm = vmm_pids(id);
        ensure!(vmm.len() == 1, "one VMM expected: {vmm:?}");
        kill(vmm[0]);
        let out = CtrOutput::from(exec.wait_with_output()?);
        ensure!(
            out.code.is_some_and(|c| c != 0),
            "the exec did not fail with its VM: {out:?}"
        );
        wait_status(&ctrd, id, "STOPPED", Duration::from_secs(30))?;
        let left = wait_until_empty(POD_RELEASE, || {
            let mut left = pod_leftovers(id);
            left.extend(containerd::cgroups_named(id));
            left
        });
        ensure!(left.is_empty(), "the dead pod's host side stayed: {left:?}");
        let _ = ctrd.ctr(&["task", "delete", id])?;
        ensure!(ctrd.ctr(&["containers", "rm", id])?.success());
        ctrd.assert_pod_released(id, &sockets)
    }

    /// Fault: the shim dies under a running pod. Its VM dies with it; containerd's
    /// task delete (which runs the shim's `delete`) and container delete leave nothing.
    #[test]
    fn a_killed_shim_leaves_nothing_after_containerd_deletes() -> Result<()> {
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let id = "pod-shimkill";
        let out = ctrd.crx_run(&["-d"], image, id, &["/bin/sleep", "1000"])?;
        ensure!(out.success(), "ctr run -d: {out:?}\n{}", ctrd.log_tail(30));
        wait_status(&ctrd, id, "RUNNING", Duration::from_secs(60))?;
        containerd::ensure_vm_in_pod_cgroup(id)?;
        let shims = ctrd.shim_pids();
        ensure!(shims.len() == 1, "one shim expected: {shims:?}");
        kill(shims[0]);
        let _ = ctrd.ctr(&["task", "delete", "-f", id])?;
        let out = ctrd.ctr(&["containers", "rm", id])?;
        ensure!(out.success(), "containers rm: {out:?}");
        ctrd.assert_pod_released(id, &sockets)?;
        // The shim's `delete` removed the pod cgroup the dead shim made.
        let cgroups = containerd::cgroups_named(id);
        ensure!(
            cgroups.is_empty(),
            "the killed shim's pod cgroups stayed: {cgroups:?}"
        );
        Ok(())
    }

    /// Sequential pods: each `ctr run --rm` boots a VM, runs, and goes; afterwards no
    /// tap or other interface, mount, VM process, shim, socket, `/run/crx` entry or host
    /// cgroup is left. Prints the time per run.
    #[test]
    fn sequential_runs_leave_nothing_behind() -> Result<()> {
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let links_before = links();
        let run_crx_before = names_in(Path::new("/run/crx"));
        let mut times = Vec::new();
        for i in 0..SEQUENTIAL_RUNS {
            let id = format!("pod-seq-{i}");
            let started = Instant::now();
            let out = ctrd.crx_run(&["--rm"], image, &id, &["/bin/echo", &id])?;
            times.push(started.elapsed());
            ensure!(
                out.success() && out.stdout == format!("{id}\n"),
                "{id}: {out:?}\n{}",
                ctrd.log_tail(30)
            );
        }
        for i in 0..SEQUENTIAL_RUNS {
            ctrd.assert_pod_released(&format!("pod-seq-{i}"), &sockets)?;
        }
        let new_links: Vec<String> = links().difference(&links_before).cloned().collect();
        ensure!(new_links.is_empty(), "interfaces left: {new_links:?}");
        let new_entries: Vec<String> = names_in(Path::new("/run/crx"))
            .difference(&run_crx_before)
            .cloned()
            .collect();
        ensure!(
            new_entries.is_empty(),
            "/run/crx entries left: {new_entries:?}"
        );
        // Each pod's VM ran in its host cgroup (the sandbox's cgroupsPath, in every
        // hierarchy); none is left after the runs.
        let cgroups = containerd::cgroups_named("pod-seq-");
        ensure!(
            cgroups.is_empty(),
            "host cgroups of crx pods left: {cgroups:?}"
        );
        let total: Duration = times.iter().sum();
        times.sort();
        eprintln!(
            "{SEQUENTIAL_RUNS} sequential crx `ctr run --rm`: {:?} per run on average, median {:?}, max {:?}",
            total / SEQUENTIAL_RUNS as u32,
            times[times.len() / 2],
            times[times.len() - 1]
        );
        Ok(())
    }
}
