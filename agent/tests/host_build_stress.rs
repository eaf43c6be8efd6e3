//! Many container builds at once: 200 create+start+wait+remove cycles from 8 concurrent
//! clients while another client runs exec processes in a long-lived container. Before
//! the builders ran in their own single-threaded process, about 1 in 30 creates hung
//! (a cloned child blocked on a lock another agent thread held); here every call has a
//! deadline, so a hang fails the test instead of stalling it. Needs root and Debian's
//! busybox-static, like host_containers.
#![cfg(feature = "containers")]

mod common;

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crx_protocols::hybrid_vsock::ttrpc_client;
    use crx_protocols::v1::container::*;
    use crx_protocols::v1::container_ttrpc::ContainersClient;

    use super::common::{process_json, secs, spec, unique, Rig};

    const CLIENTS: usize = 8;
    const CYCLES: usize = 200;
    /// Generous for 200 cycles on a loaded 2-core machine; a hang shows long before.
    const WHOLE_RUN: Duration = Duration::from_secs(600);

    /// A client of its own: its own connection and runtime, so calls really overlap.
    struct Client {
        rt: tokio::runtime::Runtime,
        api: ContainersClient,
        rootfs: String,
    }

    impl Client {
        fn connect(socket: &Path, rootfs: &Path) -> Client {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let api = rt.block_on(async {
                let stream = UnixStream::connect(socket).unwrap();
                ContainersClient::new(ttrpc_client(stream).unwrap())
            });
            Client {
                rt,
                api,
                rootfs: rootfs.display().to_string(),
            }
        }

        fn create(&self, id: &str, spec: &str) -> ttrpc::Result<CreateContainerResponse> {
            let mut req = CreateContainerRequest::new();
            req.container_id = id.to_owned();
            req.oci_spec = spec.as_bytes().to_vec();
            req.rootfs = self.rootfs.clone();
            req.stdio = Some(StdioSpec::new()).into();
            self.rt.block_on(self.api.create_container(secs(30), &req))
        }

        fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<StartContainerResponse> {
            let mut req = StartContainerRequest::new();
            req.container_id = id.to_owned();
            req.exec_id = exec_id.to_owned();
            self.rt.block_on(self.api.start_container(secs(30), &req))
        }

        fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> ttrpc::Result<()> {
            let mut req = ExecProcessRequest::new();
            req.container_id = id.to_owned();
            req.exec_id = exec_id.to_owned();
            req.process = process_json(args, "").into_bytes();
            req.stdio = Some(StdioSpec::new()).into();
            self.rt
                .block_on(self.api.exec_process(secs(10), &req))
                .map(|_| ())
        }

        fn wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<ProcessExit> {
            let mut req = WaitProcessRequest::new();
            req.container_id = id.to_owned();
            req.exec_id = exec_id.to_owned();
            let resp = self.rt.block_on(self.api.wait_process(secs(30), &req))?;
            Ok(resp.exit.into_option().unwrap_or_default())
        }

        fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
            let mut req = RemoveContainerRequest::new();
            req.container_id = id.to_owned();
            req.force = force;
            self.rt
                .block_on(self.api.remove_container(secs(30), &req))
                .map(|_| ())
        }
    }

    /// One create+start+wait+remove cycle whose process exits with `code`.
    fn cycle(client: &Client, code: u32) -> Result<(), String> {
        let id = unique("stress");
        let script = format!("exit {code}");
        let spec = spec(&["sh", "-c", &script], "");
        client
            .create(&id, &spec)
            .map_err(|e| format!("create {id}: {e:?}"))?;
        client
            .start(&id, "")
            .map_err(|e| format!("start {id}: {e:?}"))?;
        let exit = client
            .wait(&id, "")
            .map_err(|e| format!("wait {id}: {e:?}"))?;
        if exit.exit_status != code {
            return Err(format!(
                "{id} exited {} instead of {code}",
                exit.exit_status
            ));
        }
        client
            .remove(&id, false)
            .map_err(|e| format!("remove {id}: {e:?}"))
    }

    /// Exec processes in a running container until told to stop: the other RPCs (and
    /// builds of the other kind) that run alongside the creates.
    fn exec_loop(client: &Client, id: &str, stop: &AtomicBool) -> Result<u32, String> {
        let mut done = 0;
        while !stop.load(Ordering::Acquire) {
            let exec_id = format!("e{done}");
            let code = done % 5;
            let script = format!("exit {code}");
            client
                .exec(id, &exec_id, &["sh", "-c", &script])
                .map_err(|e| format!("exec {exec_id}: {e:?}"))?;
            client
                .start(id, &exec_id)
                .map_err(|e| format!("start {exec_id}: {e:?}"))?;
            let exit = client
                .wait(id, &exec_id)
                .map_err(|e| format!("wait {exec_id}: {e:?}"))?;
            if exit.exit_status != code {
                return Err(format!(
                    "exec {exec_id} exited {} instead of {code}",
                    exit.exit_status
                ));
            }
            done += 1;
        }
        Ok(done)
    }

    #[test]
    fn two_hundred_concurrent_create_cycles_finish_with_the_right_exits() {
        let rig = Rig::start();
        let began = Instant::now();
        let next = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));

        let sleeper = unique("sleeper");
        let side = Client::connect(&rig.socket, &rig.rootfs);
        side.create(&sleeper, &spec(&["sleep", "1000"], ""))
            .unwrap();
        side.start(&sleeper, "").unwrap();
        let side_thread = {
            let (stop, sleeper) = (stop.clone(), sleeper.clone());
            std::thread::spawn(move || {
                let result = exec_loop(&side, &sleeper, &stop);
                (side, result)
            })
        };

        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let client = Client::connect(&rig.socket, &rig.rootfs);
                let next = next.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    loop {
                        let n = next.fetch_add(1, Ordering::AcqRel) as usize;
                        if n >= CYCLES {
                            return Ok(());
                        }
                        cycle(&client, (n % 7) as u32)?;
                    }
                })
            })
            .collect();
        let mut failures = Vec::new();
        for worker in workers {
            if let Err(e) = worker.join().unwrap() {
                failures.push(e);
            }
        }
        let elapsed = began.elapsed();
        stop.store(true, Ordering::Release);
        let (side, execs) = side_thread.join().unwrap();
        side.remove(&sleeper, true).unwrap();
        eprintln!(
            "{CYCLES} create cycles from {CLIENTS} clients in {elapsed:.1?} \
             ({:.0} ms/cycle), {execs:?} exec processes alongside",
            elapsed.as_secs_f64() * 1000.0 / CYCLES as f64
        );
        assert!(failures.is_empty(), "failed cycles: {failures:#?}");
        let execs = execs.unwrap();
        assert!(execs > 0, "no exec process ran alongside the creates");
        assert!(
            elapsed < WHOLE_RUN,
            "{CYCLES} cycles took {elapsed:?}, more than {WHOLE_RUN:?}"
        );
    }
}
