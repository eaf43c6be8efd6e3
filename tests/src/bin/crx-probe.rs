//! crx-probe: a small static tool for test rigs and benchmarks that talks to a crx agent
//! and prints one JSON line per run (`"ok": true|false`; exit status 0 or 1).
//!
//! - `health --uds PATH [--port 1024] [--timeout-ms N]`: through a VMM's hybrid-vsock
//!   socket, retry until the agent answers Health.Check + Health.Version or the deadline
//!   passes; prints agent version, protocol version, kernel, elapsed_us.
//! - `shutdown --uds PATH [--port 1024] | --socket PATH`: Agent.Shutdown.
//! - `listen --uds-port-path PATH_PORT [--timeout-ms N]`: bind the Unix socket a VMM
//!   forwards guest-initiated connections to (`<vsock socket>_<port>`), accept one,
//!   print the first line received, remove the socket.
//! - `unix-health --socket PATH`: like `health`, against a host-mode agent.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use crx_protocols::hybrid_vsock::{context_until, wait_for_agent, AgentAddress};
use crx_protocols::v1::agent::ShutdownRequest;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

/// The longest first line `listen` accepts.
const MAX_LINE: usize = 64 * 1024;

#[derive(Parser)]
#[command(name = "crx-probe", about = "Talk to a crx agent; print one JSON line")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for the agent behind a hybrid-vsock socket to answer Health.
    Health {
        /// The VMM's hybrid-vsock Unix socket.
        #[arg(long)]
        uds: PathBuf,
        /// The agent's vsock port.
        #[arg(long, default_value_t = crx_protocols::AGENT_VSOCK_PORT)]
        port: u32,
        /// Give up after this long.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Ask the agent to power the VM off (or a host-mode agent to exit).
    Shutdown {
        /// The VMM's hybrid-vsock Unix socket.
        #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
        uds: Option<PathBuf>,
        /// A host-mode agent's Unix socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The agent's vsock port (with --uds).
        #[arg(long, default_value_t = crx_protocols::AGENT_VSOCK_PORT)]
        port: u32,
        /// Give up after this long.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Accept one guest-initiated connection and print its first line.
    Listen {
        /// The socket the VMM forwards guest connections to host port P to
        /// (`<vsock socket>_<P>`).
        #[arg(long)]
        uds_port_path: PathBuf,
        /// Give up after this long.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Inside the nested-KVM L1 of `crx-bench vmm`: boot one VMM repeatedly through the
    /// shim's backend and print its figures.
    VmBench {
        /// `crx-vmm` or `qemu` (QEMU microvm with KVM).
        #[arg(long)]
        backend: String,
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initramfs: PathBuf,
        #[arg(long)]
        crx_vmm: PathBuf,
        #[arg(long)]
        qemu: PathBuf,
    },
    /// Wait for a host-mode agent (Unix socket) to answer Health.
    UnixHealth {
        /// The agent's `--listen unix://` socket.
        #[arg(long)]
        socket: PathBuf,
        /// Give up after this long.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    // vm-bench runs its own runtime per boot, so it is dispatched outside the async one.
    if let Cmd::VmBench {
        backend,
        iterations,
        kernel,
        initramfs,
        crx_vmm,
        qemu,
    } = &cli.command
    {
        let paths = crx_tests::bench::vmm::paths(kernel, initramfs, crx_vmm, qemu);
        return match crx_tests::bench::vmm::measure_in_l1(backend, *iterations, &paths) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!(
                    "{}",
                    json!({ "ok": false, "backend": backend, "error": format!("{e:#}") })
                );
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(cli.command, started)),
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    let (line, code) = match result {
        Ok(value) => (value, ExitCode::SUCCESS),
        Err(e) => (
            json!({
                "ok": false,
                "error": format!("{e:#}"),
                "elapsed_us": elapsed_us(started),
            }),
            ExitCode::FAILURE,
        ),
    };
    println!("{line}");
    code
}

async fn run(cmd: Cmd, started: Instant) -> anyhow::Result<Value> {
    match cmd {
        Cmd::Health {
            uds,
            port,
            timeout_ms,
        } => {
            health(
                AgentAddress::HybridVsock {
                    uds_path: uds,
                    port,
                },
                started,
                timeout_ms,
            )
            .await
        }
        Cmd::UnixHealth { socket, timeout_ms } => {
            health(AgentAddress::Unix(socket), started, timeout_ms).await
        }
        Cmd::Shutdown {
            uds,
            socket,
            port,
            timeout_ms,
        } => {
            let addr = match (uds, socket) {
                (Some(uds_path), _) => AgentAddress::HybridVsock { uds_path, port },
                (None, Some(socket)) => AgentAddress::Unix(socket),
                (None, None) => anyhow::bail!("shutdown needs --uds or --socket"),
            };
            shutdown(addr, started, timeout_ms).await
        }
        Cmd::Listen {
            uds_port_path,
            timeout_ms,
        } => {
            let deadline = started + Duration::from_millis(timeout_ms);
            listen_once(&uds_port_path, deadline, started).await
        }
        Cmd::VmBench { .. } => anyhow::bail!("vm-bench is dispatched before the async runtime"),
    }
}

async fn health(addr: AgentAddress, started: Instant, timeout_ms: u64) -> anyhow::Result<Value> {
    let deadline = started + Duration::from_millis(timeout_ms);
    let ready = wait_for_agent(&addr, deadline).await?;
    Ok(json!({
        "ok": true,
        "agent_version": ready.version.agent_version,
        "protocol_version": ready.version.protocol_version,
        "kernel": ready.version.kernel_release,
        "online_cpus": ready.version.online_cpus,
        "attempts": ready.attempts,
        "elapsed_us": elapsed_us(started),
    }))
}

async fn shutdown(addr: AgentAddress, started: Instant, timeout_ms: u64) -> anyhow::Result<Value> {
    let deadline = started + Duration::from_millis(timeout_ms);
    let left = deadline.saturating_duration_since(Instant::now());
    let clients = crx_protocols::hybrid_vsock::connect_clients(&addr, left).await?;
    clients
        .agent
        .shutdown(context_until(deadline), &ShutdownRequest::new())
        .await?;
    Ok(json!({ "ok": true, "elapsed_us": elapsed_us(started) }))
}

async fn listen_once(path: &Path, deadline: Instant, started: Instant) -> anyhow::Result<Value> {
    remove_stale_socket(path)?;
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot listen on {}", path.display()))
    })?;
    let _remove = RemoveOnDrop(path);
    let (mut conn, _) = tokio::time::timeout_at(deadline.into(), listener.accept())
        .await
        .map_err(|_| {
            anyhow::anyhow!("no connection to {} before the deadline", path.display())
        })??;
    let accepted_us = elapsed_us(started);

    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = loop {
        let n = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("connected, but no full line before the deadline"))??;
        if n == 0 {
            break false;
        }
        let chunk = &buf[..n];
        if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            break true;
        }
        line.extend_from_slice(chunk);
        if line.len() > MAX_LINE {
            anyhow::bail!("first line longer than {MAX_LINE} bytes");
        }
    };
    if line.is_empty() && !complete {
        anyhow::bail!("the guest closed the connection without sending anything");
    }
    line.truncate(MAX_LINE);
    Ok(json!({
        "ok": true,
        "line": String::from_utf8_lossy(&line),
        "complete": complete,
        "accepted_us": accepted_us,
        "elapsed_us": elapsed_us(started),
    }))
}

/// A socket file nobody listens on (left by an earlier run) is removed; anything else
/// at that path is left for bind to report.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!("something already listens on {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)?;
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Removes the socket this run bound, however the run ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crx-probe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn listen_prints_the_first_line_and_removes_its_socket() {
        let dir = temp_dir("listen");
        let path = dir.join("vm.vsock_1025");
        let guest_path = path.clone();
        let guest = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut conn = loop {
                match std::os::unix::net::UnixStream::connect(&guest_path) {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("probe never listened: {e}"),
                }
            };
            conn.write_all(b"first \"line\"\nsecond line\n").unwrap();
        });
        let started = Instant::now();
        let value = runtime()
            .block_on(listen_once(
                &path,
                started + Duration::from_secs(10),
                started,
            ))
            .unwrap();
        guest.join().unwrap();
        assert_eq!(value["ok"], true);
        assert_eq!(value["line"], "first \"line\"");
        assert_eq!(value["complete"], true);
        assert!(!path.exists(), "socket left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listen_gives_up_at_the_deadline_and_cleans_up() {
        let dir = temp_dir("listen-timeout");
        let path = dir.join("vm.vsock_1025");
        let started = Instant::now();
        let err = runtime()
            .block_on(listen_once(
                &path,
                started + Duration::from_millis(100),
                started,
            ))
            .expect_err("nobody connected, yet it succeeded");
        assert!(err.to_string().contains("before the deadline"), "{err}");
        assert!(!path.exists(), "socket left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listen_leaves_a_live_socket_alone() {
        let dir = temp_dir("listen-live");
        let path = dir.join("vm.vsock_1025");
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let err = runtime()
            .block_on(listen_once(
                &path,
                started + Duration::from_millis(100),
                started,
            ))
            .expect_err("took over a live socket");
        assert!(err.to_string().contains("already listens"), "{err}");
        assert!(path.exists(), "removed someone else's socket");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
