//! CRI security context (cri-tools' "security context" area): user and groups, a
//! read-only root, capabilities, privileged, no_new_privs, seccomp (RuntimeDefault,
//! Localhost, Unconfined), namespaced sysctls; and host namespaces, which crx refuses
//! with a CRI error that names the reason. Every case runs for `runc` and `crx`
//! (`crx_tests::cri::suite`); each runs one pod whose containers each print what they
//! see of their own context (`/proc/self/status`, `id`) and exit.

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyhow::{bail, ensure, Context, Result};
    use crx_tests::cri::specs::{container_config, pod_config};
    use crx_tests::cri::suite::{poll, Suite, EXIT};
    use crx_tests::for_each_handler;
    use k8s_cri::v1 as cri;

    for_each_handler!(
        user_groups_and_read_only_root,
        capabilities_privileged_and_no_new_privs,
        seccomp_profiles,
        namespaced_sysctls,
        host_namespaces,
    );

    /// Runs `script` in a new container of pod `pod_id` with `security`, until it
    /// exits; returns its exit code and its stdout lines.
    fn run(
        s: &Suite,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        script: &str,
        security: cri::LinuxContainerSecurityContext,
    ) -> Result<(i32, Vec<String>)> {
        let client = s.client()?;
        let mut c = container_config(
            name,
            s.node.busybox(),
            &["/bin/sh", "-c", script],
            &format!("{name}.log"),
        );
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(security),
            ..Default::default()
        });
        let cid = s.start_container(pod_id, pod, &c)?;
        let exited = client.wait_exited(&cid, EXIT)?;
        let log = Path::new(&pod.log_directory).join(format!("{name}.log"));
        // CRI log lines: "<time> <stream> <F|P> <text>"; the file is complete once the
        // container has exited and the copier flushed, which may trail the exit.
        let lines = poll(std::time::Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log).ok()?;
            let out: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.splitn(4, ' ');
                    let (_, stream, _, body) = (f.next()?, f.next()?, f.next()?, f.next()?);
                    (stream == "stdout").then(|| body.to_owned())
                })
                .collect();
            out.iter().any(|l| l == "END").then_some(out)
        })
        .with_context(|| format!("{name}: no END line in {}", log.display()))?;
        Ok((exited.exit_code, lines))
    }

    /// The value of `key:` among `lines` (as `/proc/self/status` prints it).
    fn status_field<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    }

    fn pod(s: &Suite, name: &str) -> Result<(String, cri::PodSandboxConfig)> {
        let config = pod_config(name, &s.node.pod_log_dir(name));
        let id = s.run_pod(&config)?;
        Ok((id, config))
    }

    const STATUS: &str = "grep -E '^(Cap(Eff|Prm|Bnd)|NoNewPrivs|Seccomp):' /proc/self/status";

    fn int64(v: i64) -> Option<cri::Int64Value> {
        Some(cri::Int64Value { value: v })
    }

    /// runAsUser/runAsGroup/supplementalGroups are what `id` shows; a read-only root
    /// refuses writes but the writable mounts (/tmp is not one; /dev/shm is) still work.
    fn user_groups_and_read_only_root(s: &Suite) -> Result<()> {
        let (pod_id, config) = pod(s, "secctx-user")?;
        let (code, out) = run(
            s,
            &pod_id,
            &config,
            "ids",
            "id -u; id -g; id -G; echo END",
            cri::LinuxContainerSecurityContext {
                run_as_user: int64(1000),
                run_as_group: int64(3000),
                supplemental_groups: vec![4000, 5000],
                ..Default::default()
            },
        )?;
        ensure!(code == 0, "id exited {code}: {out:?}");
        ensure!(
            out.first().map(String::as_str) == Some("1000"),
            "uid: {out:?}"
        );
        ensure!(
            out.get(1).map(String::as_str) == Some("3000"),
            "gid: {out:?}"
        );
        let groups: Vec<&str> = out
            .get(2)
            .map(|g| g.split_whitespace().collect())
            .unwrap_or_default();
        for want in ["3000", "4000", "5000"] {
            ensure!(groups.contains(&want), "groups {groups:?} lack {want}");
        }

        let (code, out) = run(
            s,
            &pod_id,
            &config,
            "rofs",
            "if touch /written 2>/dev/null; then echo root-writable; else echo root-read-only; fi; \
             if echo x > /dev/shm/ok; then echo shm-writable; fi; echo END",
            cri::LinuxContainerSecurityContext {
                readonly_rootfs: true,
                ..Default::default()
            },
        )?;
        ensure!(code == 0, "rofs exited {code}: {out:?}");
        ensure!(out.iter().any(|l| l == "root-read-only"), "{out:?}");
        ensure!(out.iter().any(|l| l == "shm-writable"), "{out:?}");
        s.remove_pod(&pod_id)
    }

    /// CAP_NET_BIND_SERVICE is bit 10, CAP_SYS_ADMIN bit 21.
    const NET_BIND_SERVICE: u64 = 1 << 10;
    const SYS_ADMIN: u64 = 1 << 21;
    const NET_RAW: u64 = 1 << 13;

    fn caps(lines: &[String], key: &str) -> Result<u64> {
        let hex = status_field(lines, key).with_context(|| format!("no {key} in {lines:?}"))?;
        u64::from_str_radix(hex, 16).with_context(|| format!("{key}: {hex:?}"))
    }

    /// Drop ALL + add one leaves exactly that one; the default set has no SYS_ADMIN;
    /// privileged has SYS_ADMIN; no_new_privs shows in the status.
    fn capabilities_privileged_and_no_new_privs(s: &Suite) -> Result<()> {
        // A privileged container needs a privileged pod (CRI refuses it otherwise).
        let mut config = pod_config("secctx-caps", &s.node.pod_log_dir("secctx-caps"));
        if let Some(ctx) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
        {
            ctx.privileged = true;
        }
        let pod_id = s.run_pod(&config)?;
        let script = format!("{STATUS}; echo END");

        let (_, default) = run(s, &pod_id, &config, "default", &script, Default::default())?;
        let eff = caps(&default, "CapEff")?;
        ensure!(eff & SYS_ADMIN == 0, "default set has SYS_ADMIN: {eff:#x}");
        ensure!(
            eff & NET_BIND_SERVICE != 0,
            "default set lacks NET_BIND_SERVICE: {eff:#x}"
        );
        ensure!(
            status_field(&default, "NoNewPrivs") == Some("0"),
            "{default:?}"
        );

        let (_, one) = run(
            s,
            &pod_id,
            &config,
            "dropall",
            &script,
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    drop_capabilities: vec!["ALL".into()],
                    add_capabilities: vec!["NET_BIND_SERVICE".into()],
                    ..Default::default()
                }),
                no_new_privs: true,
                ..Default::default()
            },
        )?;
        ensure!(
            caps(&one, "CapEff")? == NET_BIND_SERVICE,
            "drop ALL + add NET_BIND_SERVICE: CapEff {:#x}",
            caps(&one, "CapEff")?
        );
        ensure!(
            caps(&one, "CapBnd")? == NET_BIND_SERVICE,
            "bounding set {:#x}",
            caps(&one, "CapBnd")?
        );
        ensure!(status_field(&one, "NoNewPrivs") == Some("1"), "{one:?}");

        let (_, dropped) = run(
            s,
            &pod_id,
            &config,
            "dropraw",
            &script,
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    drop_capabilities: vec!["NET_RAW".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )?;
        let eff = caps(&dropped, "CapEff")?;
        ensure!(
            eff & NET_RAW == 0 && eff != 0,
            "drop NET_RAW: CapEff {eff:#x}"
        );

        let (_, privileged) = run(
            s,
            &pod_id,
            &config,
            "privileged",
            &script,
            cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            },
        )?;
        let eff = caps(&privileged, "CapEff")?;
        ensure!(eff & SYS_ADMIN != 0, "privileged lacks SYS_ADMIN: {eff:#x}");
        s.remove_pod(&pod_id)
    }

    fn profile(kind: cri::security_profile::ProfileType, path: &str) -> cri::SecurityProfile {
        cri::SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: path.into(),
        }
    }

    /// RuntimeDefault and Localhost install a filter (Seccomp: 2), Unconfined none; a
    /// Localhost profile that refuses mkdir makes mkdir fail and nothing else.
    fn seccomp_profiles(s: &Suite) -> Result<()> {
        use cri::security_profile::ProfileType;
        let (pod_id, config) = pod(s, "secctx-seccomp")?;
        let script = "grep '^Seccomp:' /proc/self/status; \
                      if mkdir /tmp/d 2>/dev/null; then echo mkdir-ok; else echo mkdir-refused; fi; \
                      echo END";
        let with = |p: cri::SecurityProfile| cri::LinuxContainerSecurityContext {
            seccomp: Some(p),
            ..Default::default()
        };

        let (_, default) = run(
            s,
            &pod_id,
            &config,
            "runtime-default",
            script,
            with(profile(ProfileType::RuntimeDefault, "")),
        )?;
        ensure!(
            status_field(&default, "Seccomp") == Some("2"),
            "RuntimeDefault: {default:?}"
        );
        ensure!(default.iter().any(|l| l == "mkdir-ok"), "{default:?}");

        let (_, unconfined) = run(
            s,
            &pod_id,
            &config,
            "unconfined",
            script,
            with(profile(ProfileType::Unconfined, "")),
        )?;
        ensure!(
            status_field(&unconfined, "Seccomp") == Some("0"),
            "Unconfined: {unconfined:?}"
        );

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("no-mkdir.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )?;
        let (code, local) = run(
            s,
            &pod_id,
            &config,
            "localhost",
            script,
            with(profile(ProfileType::Localhost, &path.display().to_string())),
        )?;
        ensure!(code == 0, "localhost profile: exit {code}: {local:?}");
        ensure!(
            status_field(&local, "Seccomp") == Some("2"),
            "Localhost: {local:?}"
        );
        ensure!(
            local.iter().any(|l| l == "mkdir-refused"),
            "Localhost: {local:?}"
        );
        s.remove_pod(&pod_id)
    }

    /// Namespaced sysctls from the pod config are set in the pod (net.* in its network
    /// namespace, kernel.shm* in its IPC namespace).
    fn namespaced_sysctls(s: &Suite) -> Result<()> {
        let mut config = pod_config("secctx-sysctl", &s.node.pod_log_dir("secctx-sysctl"));
        if let Some(linux) = config.linux.as_mut() {
            linux.sysctls = [
                ("net.ipv4.ip_unprivileged_port_start", "80"),
                ("kernel.shm_rmid_forced", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        }
        let pod_id = s.run_pod(&config)?;
        let (code, out) = run(
            s,
            &pod_id,
            &config,
            "sysctls",
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced; echo END",
            Default::default(),
        )?;
        ensure!(code == 0, "exit {code}: {out:?}");
        ensure!(
            out.first().map(String::as_str) == Some("80"),
            "port start: {out:?}"
        );
        ensure!(
            out.get(1).map(String::as_str) == Some("1"),
            "shm_rmid_forced: {out:?}"
        );
        s.remove_pod(&pod_id)
    }

    /// A pod in the host's network, PID or IPC namespace: runc runs it; crx, whose pod
    /// is a VM, refuses it with an error that names the namespace.
    fn host_namespaces(s: &Suite) -> Result<()> {
        for (what, set) in [
            (
                "network",
                (|n: &mut cri::NamespaceOption| n.network = cri::NamespaceMode::Node as i32)
                    as fn(&mut cri::NamespaceOption),
            ),
            ("pid", |n: &mut cri::NamespaceOption| {
                n.pid = cri::NamespaceMode::Node as i32
            }),
            ("ipc", |n: &mut cri::NamespaceOption| {
                n.ipc = cri::NamespaceMode::Node as i32
            }),
        ] {
            let name = format!("host-{what}");
            let mut config = pod_config(&name, &s.node.pod_log_dir(&name));
            if let Some(ns) = config
                .linux
                .as_mut()
                .and_then(|l| l.security_context.as_mut())
                .and_then(|c| c.namespace_options.as_mut())
            {
                set(ns);
            }
            if what == "network" {
                // The kubelet leaves the hostname out: a host-network pod has the host's.
                config.hostname.clear();
            }
            let client = s.client()?;
            match (
                s.handler.as_str(),
                client.run_pod_sandbox(&config, &s.handler),
            ) {
                ("crx", Ok(id)) => {
                    let _ = s.remove_pod(&id);
                    bail!("crx ran a pod in the host's {what} namespace");
                }
                ("crx", Err(e)) => {
                    let msg = format!("{e:#}").to_lowercase();
                    ensure!(
                        msg.contains("host") && msg.contains(what),
                        "the error does not name the host {what} namespace: {e:#}"
                    );
                }
                (_, Ok(id)) => s.remove_pod(&id)?,
                (_, Err(e)) => bail!("runc refused a host {what} pod: {e:#}"),
            }
        }
        Ok(())
    }
}
