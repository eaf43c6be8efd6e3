//! The QEMU backend on real VMs: QEMU microvm (TCG on this host) boots the crx guest
//! kernel and initramfs, and crx's own vsock back end (`crx-vmm vhost-user-vsock`)
//! carries the agent's ttrpc over the hybrid-vsock socket.
//!
//! These tests boot real guests; they need the artifacts `scripts/test.sh` builds.

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context, Result};
    use crx_shim::vm::{ProcessExit, QemuAccel, QemuBackend, VmExit};
    use crx_tests::vm_harness::{
        self, boot, processes_mentioning, shutdown, sockets_in, vm_config, RunDir,
    };

    fn tcg() -> QemuBackend {
        QemuBackend::new(QemuAccel::Tcg)
    }

    #[test]
    fn boots_answers_health_and_powers_off_cleanly() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("qemu-health")?;
        let config = vm_config(dir.path(), "qemu-health", 1, 128, "")?;
        let (mut vm, agent, took) = boot(&rt, &tcg(), &config)?;
        eprintln!("spawn -> agent health reply: {took:?}");
        ensure!(
            agent.version.protocol_version == crx_protocols::PROTOCOL_VERSION,
            "agent speaks protocol {}",
            agent.version.protocol_version
        );
        ensure!(
            !agent.version.kernel_release.is_empty(),
            "agent reported no kernel release"
        );

        let exit = shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(
            exit.process == "qemu" && exit.status == ProcessExit::Code(0),
            "VM did not power off cleanly: {exit}"
        );
        ensure!(
            sockets_in(dir.path()).is_empty(),
            "sockets left: {:?}",
            sockets_in(dir.path())
        );
        Ok(())
    }

    #[test]
    fn guest_initiated_connection_reaches_the_host_port_socket_and_two_vcpus_boot() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("qemu-guestconn")?;
        // The agent streams its log to host port 1025 when told to: a connection the guest
        // opens, which the muxer must deliver to `<agent socket>_1025`.
        let config = vm_config(dir.path(), "qemu-guestconn", 2, 128, "crx.log_port=1025")?;
        let listener = UnixListener::bind(format!("{}_1025", config.agent_socket().display()))?;
        let (mut vm, agent, _) = boot(&rt, &tcg(), &config)?;

        listener.set_nonblocking(false)?;
        let (stream, _) = accept_within(&listener, Duration::from_secs(20))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut first_line = String::new();
        BufReader::new(stream)
            .read_line(&mut first_line)
            .context("reading the agent's log stream")?;
        ensure!(
            !first_line.trim().is_empty(),
            "the guest connection carried no data"
        );
        eprintln!(
            "first line from the guest on port 1025: {}",
            first_line.trim()
        );

        ensure!(
            agent.version.online_cpus == 2,
            "guest sees {} CPUs, wanted 2",
            agent.version.online_cpus
        );
        let exit = shutdown(&rt, vm.as_mut(), &agent)?;
        ensure!(!exit.is_failure(), "{exit}");
        Ok(())
    }

    fn accept_within(
        listener: &UnixListener,
        timeout: Duration,
    ) -> Result<(
        std::os::unix::net::UnixStream,
        std::os::unix::net::SocketAddr,
    )> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        loop {
            match listener.accept() {
                Ok(pair) => {
                    pair.0.set_nonblocking(false)?;
                    return Ok(pair);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    // Polling a listener with a deadline: the guest connects when it is ready.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).context("no guest connection arrived on the host port socket")
                }
            }
        }
    }

    #[test]
    fn ten_boot_stop_cycles_leave_no_process_socket_or_memfd() -> Result<()> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new("qemu-cycles")?;
        let needle = dir.path().display().to_string();
        let mut times = Vec::new();
        for i in 0..10 {
            let config = vm_config(dir.path(), &format!("cycle{i}"), 1, 128, "")?;
            let (mut vm, agent, took) = boot(&rt, &tcg(), &config)?;
            times.push(took);
            let pids = vm.pids();
            // Alternate the two ways a VM ends: the guest powers off, or the host stops it.
            let exit = if i % 2 == 0 {
                shutdown(&rt, vm.as_mut(), &agent)?
            } else {
                vm.stop(Duration::from_secs(5))?
            };
            ensure!(!exit.is_failure(), "cycle {i}: {exit}");
            drop(vm);
            for (name, pid) in pids {
                ensure!(
                    !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    "cycle {i}: {name} (pid {pid}) is still there"
                );
            }
            ensure!(
                sockets_in(dir.path()).is_empty(),
                "cycle {i}: sockets left: {:?}",
                sockets_in(dir.path())
            );
        }
        // memfds live only as long as a process holds them; no process of ours is left.
        let left = processes_mentioning(&needle);
        ensure!(left.is_empty(), "processes left behind: {left:?}");
        eprintln!("spawn -> agent ready over 10 cycles: {times:?}");
        Ok(())
    }

    /// Boots a VM, sends `signal` to its process `victim`, and checks that the VM's end
    /// is reported within 5 s naming `victim`, with nothing of the VM left behind.
    fn signal_and_expect_report(victim: &'static str, signal: i32) -> Result<VmExit> {
        let rt = vm_harness::runtime()?;
        let dir = RunDir::new(&format!("qemu-signal-{victim}-{signal}"))?;
        let config = vm_config(dir.path(), victim, 1, 128, "")?;
        let (mut vm, _agent, _) = boot(&rt, &tcg(), &config)?;
        let pids = vm.pids();
        let pid = pids
            .iter()
            .find(|(n, _)| *n == victim)
            .map(|(_, p)| *p)
            .context("victim pid")?;
        // SAFETY: kill(2) on a pid this test's VM owns and that is still running.
        unsafe { libc::kill(pid as i32, signal) };
        let signalled_at = Instant::now();
        let exit = vm
            .wait_timeout(Duration::from_secs(5))?
            .with_context(|| format!("signal {signal} to {victim} was not noticed within 5 s"))?;
        eprintln!(
            "{victim} signal {signal} noticed after {:?}: {exit}",
            signalled_at.elapsed()
        );
        ensure!(
            exit.process == victim,
            "the report names {} instead of {victim}: {exit}",
            exit.process
        );
        for (name, pid) in pids {
            ensure!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "{name} survived signal {signal} to {victim}"
            );
        }
        ensure!(
            sockets_in(dir.path()).is_empty(),
            "sockets left: {:?}",
            sockets_in(dir.path())
        );
        Ok(exit)
    }

    fn kill_and_expect_report(victim: &'static str) -> Result<()> {
        let exit = signal_and_expect_report(victim, libc::SIGKILL)?;
        ensure!(
            exit.status == ProcessExit::Signal(libc::SIGKILL) && exit.is_failure(),
            "{exit}"
        );
        ensure!(
            exit.to_string().contains("signal 9"),
            "report does not say how it died: {exit}"
        );
        Ok(())
    }

    #[test]
    fn kill_9_of_qemu_is_reported_within_seconds() -> Result<()> {
        kill_and_expect_report("qemu")
    }

    #[test]
    fn kill_9_of_the_vhost_user_back_end_is_reported_within_seconds() -> Result<()> {
        kill_and_expect_report("vhost-user-vsock")
    }

    #[test]
    fn sigterm_to_the_back_end_stops_the_vm_cleanly() -> Result<()> {
        let exit = signal_and_expect_report("vhost-user-vsock", libc::SIGTERM)?;
        ensure!(exit.status == ProcessExit::Code(0), "{exit}");
        ensure!(
            !exit.is_failure(),
            "a requested back-end stop reads as a failure: {exit}"
        );
        Ok(())
    }

    #[test]
    fn missing_kernel_is_named_before_anything_starts() -> Result<()> {
        let dir = RunDir::new("qemu-nokernel")?;
        let mut config = vm_config(dir.path(), "nokernel", 1, 128, "")?;
        config.kernel = "/nonexistent/vmlinux".into();
        let err = crx_shim::vm::VmBackend::start(&tcg(), &config)
            .err()
            .context("start succeeded without a kernel")?;
        let msg = err.to_string();
        ensure!(
            msg.contains("guest kernel") && msg.contains("/nonexistent/vmlinux"),
            "{msg}"
        );
        ensure!(
            processes_mentioning(&dir.path().display().to_string()).is_empty(),
            "a process was started"
        );
        Ok(())
    }

    #[test]
    fn auto_picks_qemu_tcg_on_this_pvm_host_and_says_why() -> Result<()> {
        use crx_shim::vm::{choose_backend, probe_kvm, BackendKind, Hypervisor, KvmVerdict};
        let verdict = probe_kvm();
        // This suite runs on PVM hosts (CI) and on hardware KVM; each must pick its backend.
        let choice = choose_backend(Hypervisor::Auto, &verdict).map_err(anyhow::Error::msg)?;
        eprintln!("auto: {} — {}", choice.kind, choice.reason);
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            ensure!(
                matches!(verdict, KvmVerdict::Unusable(_)),
                "PVM host probed as {verdict:?}"
            );
            ensure!(
                choice.kind == BackendKind::Qemu(QemuAccel::Tcg),
                "auto picked {} on PVM",
                choice.kind
            );
            ensure!(
                choice.reason.contains("PVM") && choice.reason.contains("TCG"),
                "reason does not say why: {}",
                choice.reason
            );
        } else if verdict == KvmVerdict::Usable {
            ensure!(
                choice.kind == BackendKind::CrxVmm,
                "auto picked {} on hardware KVM",
                choice.kind
            );
        }
        Ok(())
    }
}
