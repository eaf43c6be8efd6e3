//! Containers in a real guest on the QEMU/TCG backend: the container's busybox rootfs
//! lives in the pod share (virtio-fs, crx's vhost-user-fs back end), the agent mounts it
//! as the container's storage, builds the container with libcontainer inside the VM
//! (cgroup v2 with controllers, as in production), and its output comes back on a
//! separate stdio stream through the VMM's hybrid vsock (port 1026, stdio.proto).
//!
//! Needs the artifacts `scripts/test.sh` builds, with the agent built with its
//! `containers` feature, and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use anyhow::{ensure, Context, Result};
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::stdio::StreamKind;
    use crx_tests::guest_pod::{collect, oci_spec, secs, GuestPod};

    #[test]
    fn containers_run_in_the_guest_from_a_virtio_fs_rootfs() -> Result<()> {
        let mut pod = GuestPod::boot("agent-containers", 256, |_, _| Ok(()))?;

        let r = pod.run(oci_spec(&["echo", "hi"], "", ""))?;
        ensure!(
            (r.exit.exit_status, r.stdout.as_str()) == (0, "hi\n"),
            "echo: {r:?}"
        );
        let r = pod.run(oci_spec(&["sh", "-c", "exit 3"], "", ""))?;
        ensure!(r.exit.exit_status == 3, "exit 3 gave {r:?}");
        let deny = r#","seccomp":{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
        let r = pod.run(oci_spec(&["mkdir", "/tmp/x"], "", deny))?;
        ensure!(
            r.exit.exit_status != 0 && r.stderr.contains("Operation not permitted"),
            "mkdir under a profile denying it: {r:?}"
        );

        // A long-running container: exec into it, then SIGKILL gives 137.
        let id = "vm-sleeper";
        pod.create(id, oci_spec(&["sleep", "100"], "", ""), StdioSpec::new())?;
        pod.start(id, "")?;
        let mut exec = ExecProcessRequest::new();
        exec.container_id = id.into();
        exec.exec_id = "e1".into();
        exec.process = br#"{"args":["echo","from exec"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
        let mut stdio = StdioSpec::new();
        stdio.stdout = true;
        exec.stdio = Some(stdio).into();
        pod.rt
            .block_on(pod.containers.exec_process(secs(30), &exec))
            .context("ExecProcess")?;
        let out = collect(&pod.uds, id, "e1", StreamKind::STREAM_KIND_STDOUT)?;
        pod.start(id, "e1")?;
        let exit = pod.wait(id, "e1")?;
        let out = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        ensure!(
            (exit.exit_status, out.as_str()) == (0, "from exec\n"),
            "exec: {} {out:?}",
            exit.exit_status
        );
        let mut kill = SignalProcessRequest::new();
        kill.container_id = id.into();
        kill.signal = 9;
        pod.rt
            .block_on(pod.containers.signal_process(secs(30), &kill))
            .context("SIGKILL")?;
        let exit = pod.wait(id, "")?;
        ensure!(
            (exit.exit_status, exit.signal) == (137, 9),
            "SIGKILL gave {exit:?}"
        );
        pod.remove(id, false)?;
        pod.shut_down()
    }
}
