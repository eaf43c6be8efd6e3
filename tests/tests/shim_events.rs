//! containerd-shim-crx-v2's task events as containerd's own event stream (`ctr
//! events`) shows them, against a private containerd 1.6 running crx pods in
//! QEMU/TCG VMs: the lifecycle topics of a container and of an exec, in order and
//! with their exit statuses, and the TaskOOM of a container killed by its memory
//! limit in the guest.
//!
//! The cases run one at a time (they share the host's `/run/crx` and
//! `/run/containerd/s`): `cargo build -p containerd-shim-crx-v2 && cargo test -p
//! crx-tests --test shim_events`.

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use anyhow::{ensure, Result};
    use crx_tests::containerd::{shim_sockets, Containerd, CtrEvent, EventStream};

    /// How long an awaited event may take (it may follow a VM boot under TCG).
    const EVENT_WAIT: Duration = Duration::from_secs(120);
    /// The memory limit of the OOM case; the guest sizes its cgroup from it.
    const MEMORY_LIMIT: u64 = 16 * 1024 * 1024;

    /// One case at a time: pods leave host state that another case's leak check
    /// would count.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// A task event of `container_id` in short form: its topic's last part, then
    /// the process (for exec events, and exits: the exec id or the container id) and
    /// the exit status where the topic has one.
    fn summary(e: &CtrEvent) -> String {
        let kind = e.topic.trim_start_matches("/tasks/");
        match kind {
            "exec-added" | "exec-started" => format!("{kind} {}", e.str_field("exec_id")),
            "exit" => format!("exit {} {}", e.str_field("id"), e.u64_field("exit_status")),
            "delete" => format!("delete {}", e.u64_field("exit_status")),
            _ => kind.to_owned(),
        }
    }

    /// The `/tasks/...` events of `container_id`, in containerd's order, in short
    /// form.
    fn task_events(events: &[CtrEvent], container_id: &str) -> Vec<String> {
        events
            .iter()
            .filter(|e| {
                e.topic.starts_with("/tasks/")
                    && e.namespace == crx_tests::containerd::NAMESPACE
                    && e.str_field("container_id") == container_id
            })
            .map(summary)
            .collect()
    }

    /// Waits until `container_id`'s task events include `event` (in short form).
    fn wait_event(stream: &EventStream, container_id: &str, event: &str) -> Result<Vec<String>> {
        let events = stream.wait_for(EVENT_WAIT, |events| {
            task_events(events, container_id).iter().any(|e| e == event)
        })?;
        Ok(task_events(&events, container_id))
    }

    /// `ctr run` of a container that prints and exits with 3: containerd sees its
    /// task created, started, exited with status 3 and deleted, each once, in that
    /// order.
    #[test]
    fn a_containers_lifecycle_events_reach_containerd_in_order() -> Result<()> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let stream = ctrd.event_stream()?;
        let id = "ev-exit";
        let out = ctrd.crx_run(&["--rm"], image, id, &["/bin/sh", "-c", "echo out; exit 3"])?;
        ensure!(
            out.code == Some(3) && out.stdout == "out\n",
            "ctr run: {out:?}\n{}",
            ctrd.log_tail(30)
        );
        let seen = wait_event(&stream, id, "delete 3")?;
        eprintln!("{id}: {seen:?}");
        ensure!(
            seen == ["create", "start", &format!("exit {id} 3"), "delete 3"],
            "containerd saw {id}'s task events as {seen:?}"
        );
        ctrd.assert_pod_released(id, &sockets)
    }

    /// An exec in a running container: containerd sees it added, started and exited
    /// with its status, in that order, all before the container's own exit.
    #[test]
    fn an_execs_events_reach_containerd_in_order_before_the_containers_exit() -> Result<()> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let stream = ctrd.event_stream()?;
        let id = "ev-exec";
        let out = ctrd.crx_run(&["-d"], image, id, &["/bin/sleep", "1000"])?;
        ensure!(out.success(), "ctr run -d: {out:?}\n{}", ctrd.log_tail(30));
        wait_event(&stream, id, "start")?;

        let out = ctrd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "x1",
            id,
            "/bin/sh",
            "-c",
            "echo exec; exit 7",
        ])?;
        ensure!(
            out.code == Some(7) && out.stdout == "exec\n",
            "exec: {out:?}\n{}",
            ctrd.log_tail(30)
        );
        wait_event(&stream, id, "exit x1 7")?;

        let out = ctrd.ctr(&["task", "kill", "-s", "SIGKILL", id])?;
        ensure!(out.success(), "kill: {out:?}");
        wait_event(&stream, id, &format!("exit {id} 137"))?;
        let out = ctrd.ctr(&["task", "delete", id])?;
        ensure!(out.success(), "task delete: {out:?}");
        let out = ctrd.ctr(&["containers", "rm", id])?;
        ensure!(out.success(), "containers rm: {out:?}");
        let seen = wait_event(&stream, id, "delete 137")?;
        eprintln!("{id}: {seen:?}");
        ensure!(
            seen == [
                "create",
                "start",
                "exec-added x1",
                "exec-started x1",
                "exit x1 7",
                &format!("exit {id} 137"),
                "delete 137",
            ],
            "containerd saw {id}'s task events as {seen:?}"
        );
        ctrd.assert_pod_released(id, &sockets)
    }

    /// A container that allocates past its memory limit is killed in the guest by
    /// its cgroup's OOM killer: containerd sees a TaskOOM for it, once, before its
    /// task exits with SIGKILL's status, 137.
    #[test]
    fn an_oom_kill_in_the_guest_reaches_containerd_as_task_oom() -> Result<()> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let ctrd = Containerd::start_crx("")?;
        let image = ctrd.import_busybox()?;
        let sockets = shim_sockets();
        let stream = ctrd.event_stream()?;
        let id = "ev-oom";
        let limit = MEMORY_LIMIT.to_string();
        // dd's one 64 MiB buffer, filled from /dev/zero, fits the VM (which has
        // the shim's 256 MiB plus the limit) several times over: only the limit on
        // the container's own cgroup in the guest can kill it.
        let out = ctrd.crx_run(
            &["--rm", "--memory-limit", &limit],
            image,
            id,
            &["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        )?;
        ensure!(
            out.code == Some(137),
            "the container over its memory limit did not die of SIGKILL: {out:?}\n{}",
            ctrd.log_tail(30)
        );
        let events = stream.wait_for(EVENT_WAIT, |events| {
            let seen = task_events(events, id);
            seen.iter().any(|e| e == "oom") && seen.iter().any(|e| e.starts_with("delete"))
        });
        let seen = task_events(&stream.events(), id);
        eprintln!("{id}: {seen:?}");
        events.map_err(|e| {
            e.context(format!(
                "no TaskOOM for {id}: containerd saw {seen:?}\n{}",
                ctrd.log_tail(30)
            ))
        })?;
        // TaskOOM before TaskExit: CRI calls the exit OOMKilled only if it knows.
        ensure!(
            seen == [
                "create",
                "start",
                "oom",
                &format!("exit {id} 137"),
                "delete 137"
            ],
            "containerd saw {id}'s task events as {seen:?}"
        );
        ctrd.assert_pod_released(id, &sockets)
    }
}
