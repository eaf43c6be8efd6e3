//! A container's security settings in a real guest (QEMU/TCG): the user (uid, the
//! image's supplementary groups and HOME), a read-only root, masked and read-only
//! paths, a /dev/shm tmpfs, capabilities, rlimits and noNewPrivileges. One VM boot
//! runs every case.
//!
//! Needs the artifacts `scripts/test.sh` builds (the agent with its `containers`
//! feature) and Debian's busybox-static.

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use anyhow::{ensure, Result};
    use crx_tests::guest_pod::{oci_spec, GuestPod, RunResult};

    /// `oci_spec`'s root user, replaced to run as someone else.
    const ROOT_USER: &str = r#""user":{"uid":0,"gid":0}"#;
    const ROOT_PATH: &str = r#""root":{"path":"rootfs"}"#;
    const TMP_MOUNT: &str = r#"{"destination":"/tmp","type":"tmpfs","source":"tmpfs"}"#;

    fn edit(spec: Vec<u8>, from: &str, to: &str) -> Result<Vec<u8>> {
        let text = String::from_utf8(spec)?;
        ensure!(text.contains(from), "oci_spec no longer contains {from}");
        Ok(text.replace(from, to).into_bytes())
    }

    fn line<'a>(r: &'a RunResult, prefix: &str) -> Option<&'a str> {
        r.stdout.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn user_root_paths_capabilities_rlimits_and_no_new_privileges() -> Result<()> {
        let mut pod = GuestPod::boot("agent-security", 256, |_, _| Ok(()))?;
        let bin = pod.share.join("rootfs/bin");
        for applet in ["grep", "wc"] {
            if !bin.join(applet).exists() {
                symlink("busybox", bin.join(applet))?;
            }
        }

        // uid 1000 from the spec; groups and HOME from the image's /etc/group and
        // /etc/passwd (the spec sets neither).
        let spec = oci_spec(
            &[
                "sh",
                "-c",
                "id -u; id -g; grep Groups: /proc/self/status; echo HOME=$HOME",
            ],
            "",
            "",
        );
        let r = pod.run(edit(spec, ROOT_USER, r#""user":{"uid":1000,"gid":1000}"#)?)?;
        ensure!(r.exit.exit_status == 0, "user: {r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        ensure!(
            lines.first() == Some(&"1000") && lines.get(1) == Some(&"1000"),
            "not uid/gid 1000: {r:?}"
        );
        let groups: Vec<&str> = line(&r, "Groups:")
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .collect();
        ensure!(
            groups.contains(&"2000"),
            "supplementary group 2000 missing: {r:?}"
        );
        ensure!(
            line(&r, "HOME=") == Some("HOME=/home/user"),
            "HOME not from /etc/passwd: {r:?}"
        );

        // A read-only root refuses writes; /tmp (its own tmpfs) still takes them.
        let spec = oci_spec(
            &["sh", "-c", "touch /x; echo tmp > /tmp/ok && cat /tmp/ok"],
            "",
            "",
        );
        let r = pod.run(edit(
            spec,
            ROOT_PATH,
            r#""root":{"path":"rootfs","readonly":true}"#,
        )?)?;
        ensure!(
            r.stderr.contains("Read-only file system") && r.stdout == "tmp\n",
            "read-only root: {r:?}"
        );

        // Masked and read-only paths, /dev/shm, capabilities, rlimits, NoNewPrivs.
        let probe = "echo cpuinfo=$(wc -c < /proc/cpuinfo); \
                     [ -e /proc/kcore ] && echo kcore=$(wc -c < /proc/kcore); \
                     echo 12345 > /proc/sys/kernel/msgmax && echo sys-written; \
                     echo shm > /dev/shm/f && echo shm=$(cat /dev/shm/f); \
                     grep ' /dev/shm ' /proc/mounts; \
                     grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; \
                     echo nofile=$(ulimit -n); \
                     hostname forbidden && echo hostname-set";
        let caps = r#","capabilities":{"bounding":["CAP_CHOWN"],"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]},"rlimits":[{"type":"RLIMIT_NOFILE","soft":100,"hard":200}]"#;
        let paths =
            r#","maskedPaths":["/proc/kcore","/proc/cpuinfo"],"readonlyPaths":["/proc/sys"]"#;
        let shm = format!(
            r#"{TMP_MOUNT},{{"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=1024k"]}}"#
        );
        let spec = edit(oci_spec(&["sh", "-c", probe], caps, paths), TMP_MOUNT, &shm)?;
        let r = pod.run(spec)?;
        // The guest kernel may have no /proc/kcore; /proc/cpuinfo always exists.
        ensure!(
            line(&r, "cpuinfo=") == Some("cpuinfo=0"),
            "/proc/cpuinfo not masked: {r:?}"
        );
        ensure!(
            line(&r, "kcore=").is_none_or(|l| l == "kcore=0"),
            "/proc/kcore not masked: {r:?}"
        );
        ensure!(
            !r.stdout.contains("sys-written") && r.stderr.contains("Read-only file system"),
            "/proc/sys writable: {r:?}"
        );
        ensure!(
            line(&r, "shm=") == Some("shm=shm"),
            "/dev/shm not writable: {r:?}"
        );
        ensure!(
            r.stdout.lines().any(|l| l.contains(" /dev/shm tmpfs ")),
            "/dev/shm is not a tmpfs: {r:?}"
        );
        ensure!(
            line(&r, "CapEff:").map(|l| l.split_whitespace().nth(1))
                == Some(Some("0000000000000001")),
            "CapEff is not CAP_CHOWN alone: {r:?}"
        );
        ensure!(
            !r.stdout.contains("hostname-set") && r.stderr.contains("not permitted"),
            "sethostname worked without CAP_SYS_ADMIN: {r:?}"
        );
        ensure!(
            line(&r, "nofile=") == Some("nofile=100"),
            "RLIMIT_NOFILE: {r:?}"
        );
        ensure!(
            line(&r, "NoNewPrivs:").map(|l| l.split_whitespace().nth(1)) == Some(Some("1")),
            "NoNewPrivs: {r:?}"
        );
        pod.shut_down()
    }
}
