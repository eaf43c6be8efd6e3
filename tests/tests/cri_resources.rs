//! CRI resources (cri-tools' "resources" and "stats" areas): a container's CPU quota and
//! memory limit from LinuxContainerResources are the limits of its cgroup as the
//! container itself reads them; UpdateContainerResources changes them while it runs;
//! ContainerStats, ListContainerStats and PodSandboxStats report the CPU time and
//! memory it uses (PodSandboxStats: the containers' use and the use of the pod's host
//! cgroup, which holds runc's pause process and a crx pod's VM processes); a crx pod
//! under a host memory limit gets a guest that fits in it with the VMM, and one too
//! small for a guest is refused naming podFixed; a container that outgrows its memory
//! limit ends `OOMKilled` with exit code 137. Every case runs for `runc` and `crx`
//! (`crx_tests::cri::suite`).
//!
//! The container reads its limits from `/sys/fs/cgroup`: cgroup v2 files (`cpu.max`,
//! `memory.max`) where the node is cgroup v2 — always in a crx pod VM — and the v1
//! files (`cpu/cpu.cfs_quota_us`, `memory/memory.limit_in_bytes`) on a cgroup v1 host.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use anyhow::{bail, ensure, Context, Result};
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::suite::{poll, text, Suite, EXIT, RELEASE};
    use crx_tests::for_each_handler;
    use k8s_cri::v1 as cri;

    for_each_handler!(limits_update_and_stats, memory_hog_is_oom_killed);

    const MIB: i64 = 1 << 20;
    const PERIOD: i64 = 100_000;
    /// How long the runtime may take to report a running container's usage.
    const STATS: Duration = Duration::from_secs(60);

    /// Prints `<cgroup version>`, `<quota> <period>` and `<memory limit>`, whichever
    /// cgroup version is mounted at /sys/fs/cgroup.
    const READ_LIMITS: &str = "if [ -f /sys/fs/cgroup/memory.max ]; then \
           echo v2; cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max; \
         elif [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then \
           echo v1; echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); \
           cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
         else echo none; ls -la /sys/fs/cgroup; fi";

    /// The pod cgroup limit of `limits_update_and_stats`: a crx guest asked at 256 MiB
    /// must shrink to fit it with the VMM.
    const POD_LIMIT: i64 = 288 * MIB;
    /// What the shim keeps free for the VMM under a pod limit (shim `host_cgroup`'s
    /// `VMM_RESERVE_MIB`).
    const VMM_RESERVE: i64 = 96 * MIB;
    /// A pod limit too small for any crx guest (under the reserve + a 128 MiB guest).
    const TINY_POD_LIMIT: i64 = 160 * MIB;

    /// A few hundred milliseconds of CPU in the container (even throttled and on TCG).
    const BURN_CPU: &str = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo burnt";

    fn resources(quota: i64, memory: i64) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            cpu_period: PERIOD,
            cpu_quota: quota,
            cpu_shares: 512,
            memory_limit_in_bytes: memory,
            memory_swap_limit_in_bytes: memory,
            ..Default::default()
        }
    }

    /// The limits a container sees: (cgroup version, cpu quota, cpu period, memory limit).
    #[derive(Debug, PartialEq)]
    struct Seen {
        version: String,
        quota: i64,
        period: i64,
        memory: i64,
    }

    fn read_limits(s: &Suite, cid: &str) -> Result<Seen> {
        let reply = s.exec(cid, &["/bin/sh", "-c", READ_LIMITS])?;
        let out = text(&reply.stdout);
        ensure!(
            reply.exit_code == 0,
            "reading the limits exited {}: {out} {}",
            reply.exit_code,
            text(&reply.stderr)
        );
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let parse = || -> Option<Seen> {
            let version = (*lines.first()?).to_owned();
            let mut cpu = lines.get(1)?.split_whitespace();
            let quota = match cpu.next()? {
                "max" => -1,
                q => q.parse().ok()?,
            };
            let period = cpu.next()?.parse().ok()?;
            let memory = lines.get(2)?.parse().ok()?;
            Some(Seen {
                version,
                quota,
                period,
                memory,
            })
        };
        parse().with_context(|| format!("the container's cgroup files: {out:?}"))
    }

    fn want_limits(s: &Suite, seen: &Seen, quota: i64, memory: i64) -> Result<()> {
        if s.handler == "crx" {
            ensure!(
                seen.version == "v2",
                "a crx container's /sys/fs/cgroup is not its cgroup2: {seen:?}"
            );
        }
        let want = (quota, PERIOD, memory);
        ensure!(
            (seen.quota, seen.period, seen.memory) == want,
            "the container sees {seen:?}, want quota/period/memory {want:?}"
        );
        Ok(())
    }

    /// A pod config named `name` with a host cgroup parent of its own, as the kubelet
    /// gives every pod (containerd's PodSandboxStats reads that cgroup).
    fn pod_with_cgroup(s: &Suite, name: &str) -> (cri::PodSandboxConfig, PodCgroup) {
        let mut pod = pod_config(name, &s.node.pod_log_dir(name));
        let cgroup = PodCgroup(format!("crx-cri-test-{name}-{}", s.handler));
        if let Some(linux) = pod.linux.as_mut() {
            linux.cgroup_parent = format!("/{}", cgroup.0);
        }
        (pod, cgroup)
    }

    /// The hierarchies of the host's cgroups: /sys/fs/cgroup itself when it is cgroup
    /// v2, else each v1 hierarchy mounted in it (their aliases are symlinks).
    fn hierarchies() -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.procs").exists() {
            return vec![root.to_path_buf()];
        }
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// The pod's host cgroup parent (in every hierarchy). The kubelet makes and removes
    /// it; here the test does, after the pod is gone.
    struct PodCgroup(String);

    impl PodCgroup {
        fn dirs(&self) -> Vec<PathBuf> {
            hierarchies()
                .into_iter()
                .map(|h| h.join(&self.0))
                .filter(|d| d.exists())
                .collect()
        }

        /// Makes the parent in every hierarchy, as the kubelet does before it runs the
        /// pod (runc would make it itself; nothing does for crx).
        fn create(&self) -> Result<()> {
            for hierarchy in hierarchies() {
                let dir = hierarchy.join(&self.0);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating the pod cgroup {}", dir.display()))?;
            }
            Ok(())
        }

        /// Limits the parent's memory, as the kubelet limits a pod with limits.
        fn limit_memory(&self, bytes: i64) -> Result<()> {
            let mut limited = 0;
            for dir in self.dirs() {
                for file in ["memory.limit_in_bytes", "memory.max"] {
                    let path = dir.join(file);
                    if path.exists() {
                        std::fs::write(&path, bytes.to_string())
                            .with_context(|| format!("limiting {}", path.display()))?;
                        limited += 1;
                    }
                }
            }
            ensure!(limited > 0, "no memory controller in {:?}", self.dirs());
            Ok(())
        }

        /// Names of the processes in the sandbox's own cgroup (`<parent>/<pod id>`, as
        /// containerd makes the sandbox's cgroupsPath) per hierarchy.
        fn sandbox_processes(&self, pod_id: &str) -> Vec<(PathBuf, Vec<String>)> {
            self.dirs()
                .into_iter()
                .map(|d| {
                    let leaf = d.join(pod_id);
                    let names = crx_tests::containerd::cgroup_process_names(&leaf);
                    (leaf, names)
                })
                .collect()
        }

        /// Removes the parent in every hierarchy; fails if the runtime left a cgroup
        /// under it.
        fn remove(&self) -> Result<()> {
            let left = poll(RELEASE, || {
                let left: Vec<PathBuf> = self
                    .dirs()
                    .into_iter()
                    .filter(|d| std::fs::remove_dir(d).is_err())
                    .collect();
                left.is_empty().then_some(())
            });
            left.with_context(|| {
                format!(
                    "the pod's host cgroups still hold cgroups after {RELEASE:?}: {:?}",
                    self.dirs()
                        .iter()
                        .map(|d| (d, std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0)))
                        .collect::<Vec<_>>()
                )
            })
        }
    }

    impl Drop for PodCgroup {
        fn drop(&mut self) {
            for dir in self.dirs() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }

    fn value(v: &Option<cri::UInt64Value>) -> u64 {
        v.as_ref().map_or(0, |v| v.value)
    }

    /// (cpu ns, working set bytes, usage bytes) of `stats`.
    fn usage(stats: &cri::ContainerStats) -> (u64, u64, u64) {
        let cpu = stats
            .cpu
            .as_ref()
            .map_or(0, |c| value(&c.usage_core_nano_seconds));
        let (working, used) = stats.memory.as_ref().map_or((0, 0), |m| {
            (value(&m.working_set_bytes), value(&m.usage_bytes))
        });
        (cpu, working, used)
    }

    /// Limits from CreateContainer are what the container reads, and so are new ones
    /// from UpdateContainerResources; the container's CPU time and memory show in
    /// ContainerStats, ListContainerStats and (where containerd has it) PodSandboxStats.
    fn limits_update_and_stats(s: &Suite) -> Result<()> {
        let (pod, pod_cgroup) = pod_with_cgroup(s, "res-limits");
        pod_cgroup.create()?;
        pod_cgroup.limit_memory(POD_LIMIT)?;
        let pod_id = s.run_pod(&pod)?;
        sandbox_is_in_pod_cgroup(s, &pod_cgroup, &pod_id)?;
        let client = s.client()?;
        let mut c = container_config(
            "limited",
            s.node.busybox(),
            &["/bin/sleep", "3600"],
            "limited.log",
        );
        c.linux = Some(cri::LinuxContainerConfig {
            resources: Some(resources(50_000, 64 * MIB)),
            ..Default::default()
        });
        let cid = client
            .create_container(&pod_id, &c, &pod)
            .context("CreateContainer")?;
        client.start_container(&cid).context("StartContainer")?;

        let seen = read_limits(s, &cid)?;
        want_limits(s, &seen, 50_000, 64 * MIB).context("limits from CreateContainer")?;
        eprintln!("[{}] created with: {seen:?}", s.handler);
        if s.handler == "crx" {
            guest_fits_pod_limit(s, &cid)?;
        }

        let burnt = s.exec(&cid, &["/bin/sh", "-c", BURN_CPU])?;
        ensure!(
            text(&burnt.stdout).trim() == "burnt",
            "the CPU burner: {burnt:?}"
        );
        let stats = poll(STATS, || {
            let stats = client.container_stats(&cid).ok()?;
            let (cpu, working, _) = usage(&stats);
            (cpu > 0 && working > 0).then_some(stats)
        });
        let Some(stats) = stats else {
            bail!(
                "ContainerStats reports no CPU or memory use within {STATS:?}: {:?}",
                client.container_stats(&cid)
            );
        };
        let (cpu, working, used) = usage(&stats);
        eprintln!(
            "[{}] ContainerStats: cpu {cpu} ns, working set {working} B, usage {used} B",
            s.handler
        );
        ensure!(
            stats.attributes.as_ref().map(|a| a.id.as_str()) == Some(cid.as_str()),
            "ContainerStats names another container: {:?}",
            stats.attributes
        );
        ensure!(
            working <= 64 * MIB as u64,
            "working set {working} B over the 64 MiB limit"
        );

        let listed = client.list_container_stats(&pod_id)?;
        let mine = listed
            .iter()
            .find(|st| st.attributes.as_ref().is_some_and(|a| a.id == cid))
            .with_context(|| format!("ListContainerStats of the pod lacks {cid}: {listed:?}"))?;
        let (cpu, working, _) = usage(mine);
        ensure!(
            cpu > 0 && working > 0,
            "ListContainerStats reports no use: {mine:?}"
        );

        // containerd 1.6 answers PodSandboxStats from the pod's host cgroup (the cgroup
        // parent) and from the containers' own stats.
        let linux = client
            .pod_sandbox_stats(&pod_id)
            .context("PodSandboxStats")?
            .linux
            .context("PodSandboxStats without linux")?;
        let pod_cpu = linux
            .cpu
            .as_ref()
            .map_or(0, |c| value(&c.usage_core_nano_seconds));
        let pod_working = linux
            .memory
            .as_ref()
            .map_or(0, |m| value(&m.working_set_bytes));
        eprintln!(
            "[{}] PodSandboxStats: pod cgroup cpu {pod_cpu} ns, working set {pod_working} B; {} containers",
            s.handler,
            linux.containers.len()
        );
        let listed = linux
            .containers
            .iter()
            .find(|c| c.attributes.as_ref().is_some_and(|a| a.id == cid))
            .with_context(|| format!("PodSandboxStats lacks the container: {linux:?}"))?;
        let (cpu, working, _) = usage(listed);
        ensure!(
            cpu > 0 && working > 0,
            "PodSandboxStats reports no use of the container: {listed:?}"
        );
        // runc's pause process and a crx pod's VM processes are in the pod cgroup.
        ensure!(
            pod_cpu > 0 && pod_working > 0,
            "PodSandboxStats reports no use of the pod cgroup: cpu {pod_cpu} ns, working set {pod_working} B"
        );
        ensure!(
            pod_working <= POD_LIMIT as u64,
            "the pod cgroup's working set {pod_working} B is over its {POD_LIMIT} B limit"
        );

        client
            .update_container_resources(&cid, &resources(20_000, 96 * MIB))
            .context("UpdateContainerResources")?;
        let seen = read_limits(s, &cid)?;
        want_limits(s, &seen, 20_000, 96 * MIB).context("limits after UpdateContainerResources")?;
        eprintln!("[{}] updated to: {seen:?}", s.handler);
        s.remove_pod(&pod_id)?;
        // Fails if the runtime left the sandbox's cgroup under the parent.
        pod_cgroup.remove()?;
        too_small_limit(s)
    }

    /// The sandbox's own cgroup holds its host processes: runc's pause, a crx pod's VMM
    /// (never its shim), in every hierarchy.
    fn sandbox_is_in_pod_cgroup(s: &Suite, pod_cgroup: &PodCgroup, pod_id: &str) -> Result<()> {
        let ours = |n: &String| match s.handler.as_str() {
            "crx" => n.starts_with("qemu") || n.starts_with("crx-vmm"),
            _ => n == "pause",
        };
        // runc's init may not have exec'd pause yet when RunPodSandbox returns (its
        // comm is still `runc:[2:INIT]`).
        let settled = poll(EXIT, || {
            let placed = pod_cgroup.sandbox_processes(pod_id);
            let all = !placed.is_empty() && placed.iter().all(|(_, n)| n.iter().any(ours));
            all.then_some(placed)
        });
        let placed = settled.unwrap_or_else(|| pod_cgroup.sandbox_processes(pod_id));
        eprintln!("[{}] sandbox cgroup: {placed:?}", s.handler);
        ensure!(!placed.is_empty(), "no pod cgroup to look in");
        for (leaf, names) in &placed {
            ensure!(
                names.iter().any(ours),
                "the sandbox's processes are not in {}: {names:?}",
                leaf.display()
            );
            ensure!(
                !names.iter().any(|n| n.starts_with("containerd-shim")),
                "the shim moved into {}: {names:?}",
                leaf.display()
            );
        }
        Ok(())
    }

    /// The guest's RAM (MemTotal, a little under what the VM was given) leaves the
    /// VMM's reserve free under the pod limit, and is still a usable guest.
    fn guest_fits_pod_limit(s: &Suite, cid: &str) -> Result<()> {
        let reply = s.exec(cid, &["/bin/sh", "-c", "grep MemTotal /proc/meminfo"])?;
        let out = text(&reply.stdout);
        let total_kib: i64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("MemTotal from {out:?} {}", text(&reply.stderr)))?;
        let total = total_kib * 1024;
        eprintln!(
            "[crx] guest MemTotal {} MiB under a {} MiB pod limit",
            total / MIB,
            POD_LIMIT / MIB
        );
        ensure!(
            total + VMM_RESERVE <= POD_LIMIT,
            "guest MemTotal {total} B + the VMM's {VMM_RESERVE} B is over the {POD_LIMIT} B pod limit"
        );
        ensure!(
            total >= 96 * MIB,
            "guest MemTotal {total} B: shrunk below a usable guest"
        );
        Ok(())
    }

    /// A pod limit below the VMM's reserve plus the smallest guest: crx refuses the pod
    /// naming the limit and podFixed; runc runs it.
    fn too_small_limit(s: &Suite) -> Result<()> {
        let (pod, pod_cgroup) = pod_with_cgroup(s, "res-tiny");
        pod_cgroup.create()?;
        pod_cgroup.limit_memory(TINY_POD_LIMIT)?;
        let ran = s.client()?.run_pod_sandbox(&pod, &s.handler);
        match (s.handler.as_str(), ran) {
            ("crx", Ok(id)) => {
                let _ = s.remove_pod(&id);
                bail!("crx ran a pod under a {TINY_POD_LIMIT} B limit")
            }
            ("crx", Err(e)) => {
                let message = format!("{e:#}");
                eprintln!("[crx] refused: {message}");
                ensure!(
                    message.contains(&format!("{} MiB", TINY_POD_LIMIT / MIB))
                        && message.contains("podFixed"),
                    "the refusal names neither the limit nor podFixed: {message}"
                );
            }
            (_, ran) => {
                let id = ran.context("RunPodSandbox under a small limit")?;
                s.remove_pod(&id)?;
            }
        }
        pod_cgroup.remove()
    }

    /// A container that touches more memory than its limit is killed by the kernel and
    /// ends `OOMKilled` with 137; its pod runs on.
    fn memory_hog_is_oom_killed(s: &Suite) -> Result<()> {
        let name = "res-oom";
        let pod = pod_config(name, &s.node.pod_log_dir(name));
        let pod_id = s.run_pod(&pod)?;
        let client = s.client()?;
        // dd's one 64 MiB block is written by the kernel as it reads /dev/zero.
        let mut c = container_config(
            "hog",
            s.node.busybox(),
            &[
                "/bin/dd",
                "if=/dev/zero",
                "of=/dev/null",
                "bs=64M",
                "count=4",
            ],
            "hog.log",
        );
        c.linux = Some(cri::LinuxContainerConfig {
            resources: Some(resources(0, 24 * MIB)),
            ..Default::default()
        });
        let cid = client
            .create_container(&pod_id, &c, &pod)
            .context("CreateContainer")?;
        client.start_container(&cid).context("StartContainer")?;
        let exited = client.wait_exited(&cid, EXIT)?;
        ensure!(
            exited.exit_code == 137 && exited.reason == "OOMKilled",
            "the hog ended with exit code {} reason {:?} (message {:?}), want 137 OOMKilled",
            exited.exit_code,
            exited.reason,
            exited.message
        );

        // The pod is unharmed: another container in it runs to completion.
        let c = container_config("after", s.node.busybox(), &["/bin/true"], "after.log");
        let after = client
            .create_container(&pod_id, &c, &pod)
            .context("CreateContainer after the OOM kill")?;
        client.start_container(&after)?;
        let done = client.wait_exited(&after, EXIT)?;
        ensure!(
            done.exit_code == 0 && done.reason == "Completed",
            "the container after the OOM kill: {} {:?}",
            done.exit_code,
            done.reason
        );
        s.remove_pod(&pod_id)
    }
}
