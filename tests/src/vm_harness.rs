//! Starting real pod VMs from tests and benchmarks: a config with the built artifacts,
//! a private run directory, the wait for the agent, and the checks that nothing is left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crx_protocols::hybrid_vsock::{self, AgentAddress, ReadyAgent};
use crx_shim::vm::{SerialOutput, Vm, VmBackend, VmConfig};

use crate::artifacts;

/// A run directory under `/run/crx-test/`, removed on drop.
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(name: &str) -> Result<Self> {
        let path = PathBuf::from("/run/crx-test").join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM config from the built artifacts. `CRX_TEST_SERIAL=1` keeps the guest console in
/// `<run dir>/console.log` for debugging.
pub fn vm_config(
    run_dir: &Path,
    name: &str,
    vcpus: u8,
    memory_mib: u32,
    cmdline: &str,
) -> Result<VmConfig> {
    let serial = if std::env::var_os("CRX_TEST_SERIAL").is_some() {
        SerialOutput::File(run_dir.join("console.log"))
    } else {
        SerialOutput::Off
    };
    Ok(VmConfig {
        name: name.to_string(),
        run_dir: run_dir.to_path_buf(),
        kernel: artifacts::guest_kernel()?,
        initramfs: artifacts::guest_initramfs()?,
        vcpus,
        memory_mib,
        kernel_cmdline: cmdline.to_string(),
        serial,
        crx_vmm_binary: artifacts::static_binary("crx-vmm")?,
        qemu_binary: artifacts::qemu_binary()?,
        devices: Default::default(),
    })
}

/// A tokio runtime for the ttrpc client side of a test.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// How long a guest may take to answer under TCG on a busy 2-core machine.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(60);

/// Starts a VM and waits for its agent; returns the VM, the agent, and the time from
/// spawn to the agent's first reply.
pub fn boot(
    rt: &tokio::runtime::Runtime,
    backend: &dyn VmBackend,
    config: &VmConfig,
) -> Result<(Box<dyn Vm>, ReadyAgent, Duration)> {
    let start = Instant::now();
    let mut vm = backend.start(config).context("starting the VM")?;
    let addr = AgentAddress::HybridVsock {
        uds_path: vm.agent_socket().to_path_buf(),
        port: crx_protocols::AGENT_VSOCK_PORT,
    };
    let ready = rt.block_on(hybrid_vsock::wait_for_agent(
        &addr,
        Instant::now() + AGENT_DEADLINE,
    ));
    match ready {
        Ok(agent) => Ok((vm, agent, start.elapsed())),
        Err(e) => {
            let ended = vm.wait_timeout(Duration::ZERO).ok().flatten();
            let console =
                std::fs::read_to_string(config.run_dir.join("console.log")).unwrap_or_default();
            Err(anyhow::anyhow!(
                "agent never answered: {e}; VM state: {}; console tail: {}",
                ended.map_or("still running".to_string(), |x| x.to_string()),
                console
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join(" / ")
            ))
        }
    }
}

/// Asks the agent to power the VM off and waits for the VM to end by itself.
pub fn shutdown(
    rt: &tokio::runtime::Runtime,
    vm: &mut dyn Vm,
    agent: &ReadyAgent,
) -> Result<crx_shim::vm::VmExit> {
    let deadline = Instant::now() + Duration::from_secs(10);
    rt.block_on(agent.clients.agent.shutdown(
        hybrid_vsock::context_until(deadline),
        &crx_protocols::v1::agent::ShutdownRequest::new(),
    ))
    .context("Agent.Shutdown")?;
    vm.wait_timeout(Duration::from_secs(30))?
        .context("the VM did not end within 30 s of a clean shutdown")
}

/// Processes whose command line mentions `needle` (e.g. a test's run directory).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push((pid, cmdline));
            }
        }
    }
    found
}

/// Sockets left in a directory.
pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_socket()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}
