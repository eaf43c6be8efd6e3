//! The crx-vmm backend: our own VMM as one child process per pod, with the vsock muxer
//! in process. It is the default wherever hardware KVM runs guest user space.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::child::{wait_any, VmProcess};
use super::config::{SerialOutput, GUEST_CID};
use super::qemu::remove_sockets;
use super::{BackendKind, Vm, VmBackend, VmConfig, VmError, VmExit, VmResources};

/// Starts pod VMs with `crx-vmm`.
#[derive(Clone, Debug, Default)]
pub struct CrxVmmBackend {
    /// Extra flags for crx-vmm (tests use `--allow-pvm` for tiny guests).
    pub extra_args: Vec<String>,
}

impl VmBackend for CrxVmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CrxVmm
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>, VmError> {
        config.validate()?;
        config.prepare_run_dir()?;
        let agent_socket = config.agent_socket();
        let mut cmd = Command::new(&config.crx_vmm_binary);
        cmd.arg("--kernel")
            .arg(&config.kernel)
            .arg("--initramfs")
            .arg(&config.initramfs)
            .arg("--vcpus")
            .arg(config.vcpus.to_string())
            .arg("--memory-mib")
            .arg(config.memory_mib.to_string())
            .arg("--vsock-uds")
            .arg(&agent_socket)
            .arg("--vsock-cid")
            .arg(GUEST_CID.to_string())
            .arg("--cmdline")
            .arg(cmdline_without_defaults(config));
        if let SerialOutput::File(path) = &config.serial {
            cmd.arg("--serial").arg(format!("file:{}", path.display()));
        }
        cmd.args(&self.extra_args);
        let vmm = VmProcess::spawn("crx-vmm", &mut cmd, &config.run_dir.join("crx-vmm.log"))?;
        tracing::info!(vm = %config.name, pid = vmm.pid(), "VM started with crx-vmm");
        Ok(Box::new(CrxVm {
            vmm,
            agent_socket: agent_socket.clone(),
            sockets: vec![agent_socket],
            guest_ram_kib: u64::from(config.memory_mib) * 1024,
            exit: None,
        }))
    }
}

/// crx-vmm puts its own defaults (reboot, panic, console) on the command line; pass it
/// only the agent's part.
fn cmdline_without_defaults(config: &VmConfig) -> String {
    config.kernel_cmdline.trim().to_string()
}

struct CrxVm {
    vmm: VmProcess,
    agent_socket: PathBuf,
    sockets: Vec<PathBuf>,
    guest_ram_kib: u64,
    exit: Option<VmExit>,
}

impl CrxVm {
    fn finish(&mut self, requested: bool, grace: Duration) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let status = self.vmm.terminate(grace)?;
        let exit = VmExit {
            process: self.vmm.name,
            status,
            requested,
            log_tail: self.vmm.log_tail(),
        };
        remove_sockets(&self.sockets);
        self.exit = Some(exit.clone());
        Ok(exit)
    }
}

impl Vm for CrxVm {
    fn kind(&self) -> BackendKind {
        BackendKind::CrxVmm
    }

    fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![(self.vmm.name, self.vmm.pid())]
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(Some(exit.clone()));
        }
        match wait_any(&mut [&mut self.vmm], Some(timeout))? {
            None => Ok(None),
            Some(_) => self.finish(false, Duration::ZERO).map(Some),
        }
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        self.finish(true, grace)
    }

    fn resources(&self) -> VmResources {
        VmResources::measure(&self.pids(), self.guest_ram_kib)
    }

    fn vmm_spawn(&self) -> (std::time::SystemTime, &Path) {
        (self.vmm.spawned_at, self.vmm.log_path())
    }
}

impl Drop for CrxVm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.finish(true, Duration::from_millis(500));
        }
        remove_sockets(&self.sockets);
    }
}

#[cfg(test)]
mod tests {
    use super::super::qemu::kernel_cmdline;
    use super::*;

    #[test]
    fn crx_vmm_gets_only_the_agent_part_of_the_cmdline() {
        let config = VmConfig {
            name: "t".into(),
            run_dir: "/tmp/x".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel_cmdline: "crx.log=debug".into(),
            serial: SerialOutput::File("/tmp/s".into()),
            crx_vmm_binary: "/bin/true".into(),
            qemu_binary: "/bin/true".into(),
        };
        assert_eq!(cmdline_without_defaults(&config), "crx.log=debug");
        assert_eq!(
            kernel_cmdline(&config),
            "reboot=k panic=-1 quiet console=ttyS0 crx.log=debug"
        );
        let silent = VmConfig {
            serial: SerialOutput::Off,
            ..config
        };
        assert_eq!(
            kernel_cmdline(&silent),
            "reboot=k panic=-1 quiet console=ttynull crx.log=debug"
        );
        let _ = GUEST_CID;
    }
}
