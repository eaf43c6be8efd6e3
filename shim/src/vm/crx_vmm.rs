//! The crx-vmm backend: our own VMM as one child process per pod, with the vsock muxer
//! in process. It is the default wherever hardware KVM runs guest user space.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::child::{inherit_fd, wait_any, VmProcess};
use super::config::{format_mac, DriveSlot, SerialOutput, VmDevices, GUEST_CID};
use super::qemu::remove_sockets;
use super::{BackendKind, Confinement, Vm, VmBackend, VmConfig, VmError, VmExit, VmResources};

/// Starts pod VMs with `crx-vmm`.
#[derive(Clone, Debug, Default)]
pub struct CrxVmmBackend {
    /// Extra flags for crx-vmm (tests use `--allow-pvm` for tiny guests).
    pub extra_args: Vec<String>,
    /// Jail and seccomp of each VM's crx-vmm.
    pub confinement: Confinement,
}

impl CrxVmmBackend {
    /// The crx-vmm command line for `config` (without the program name). crx-vmm puts
    /// the guest's own kernel arguments (reset, panic, console) on the command line
    /// itself, so it gets only the agent's part.
    pub fn vmm_args(&self, config: &VmConfig) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            config.kernel.display().to_string(),
            "--initramfs".into(),
            config.initramfs.display().to_string(),
            "--vcpus".into(),
            config.vcpus.to_string(),
            "--memory-mib".into(),
            config.memory_mib.to_string(),
            "--vsock-uds".into(),
            config.agent_socket().display().to_string(),
            "--vsock-cid".into(),
            GUEST_CID.to_string(),
            "--cmdline".into(),
            config.kernel_cmdline.trim().to_string(),
        ];
        if let SerialOutput::File(path) = &config.serial {
            args.extend(["--serial".into(), format!("file:{}", path.display())]);
        }
        args.extend(device_args(&config.devices));
        if config.devices.has_empty_slots() {
            args.extend([
                "--api-socket".into(),
                config.api_socket().display().to_string(),
            ]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// crx-vmm's flags for the pod devices. The values were checked by
/// [`VmDevices::validate`] (no commas), so they need no quoting. The tap fd is passed
/// by its number in the shim, which crx-vmm inherits.
fn device_args(devices: &VmDevices) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    for drive in &devices.drives {
        let mut value = match &drive.path {
            Some(path) => format!("path={}", path.display()),
            None => "empty".to_string(),
        };
        if drive.read_only {
            value.push_str(",ro");
        }
        if !drive.serial.is_empty() {
            value.push_str(&format!(",serial={}", drive.serial));
        }
        args.extend(["--drive".into(), value]);
    }
    if devices.rng {
        args.push("--rng".into());
    }
    for share in &devices.shares {
        args.extend([
            "--share".into(),
            format!("tag={},dir={}", share.tag, share.host_dir.display()),
        ]);
    }
    if let Some(net) = &devices.net {
        args.extend([
            "--net".into(),
            format!(
                "fd={},mac={},mtu={}",
                net.tap.as_raw_fd(),
                format_mac(&net.mac),
                net.mtu
            ),
        ]);
    }
    args
}

impl VmBackend for CrxVmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CrxVmm
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>, VmError> {
        config.validate()?;
        config.prepare_run_dir()?;
        let agent_socket = config.agent_socket();
        let confinement = self.confinement.prepare(&config.run_dir)?;
        let mut cmd = Command::new(&config.crx_vmm_binary);
        cmd.args(self.vmm_args(config)).args(confinement);
        if let Some(net) = &config.devices.net {
            inherit_fd(&mut cmd, net.tap.as_raw_fd());
        }
        let vmm = VmProcess::spawn("crx-vmm", &mut cmd, &config.run_dir.join("crx-vmm.log"))?;
        tracing::info!(vm = %config.name, pid = vmm.pid(), "VM started with crx-vmm");
        let api_socket = config.api_socket();
        let drive_slots = empty_slots(&config.devices, &api_socket);
        let mut sockets = vec![agent_socket.clone()];
        if !drive_slots.is_empty() {
            sockets.push(api_socket);
        }
        Ok(Box::new(CrxVm {
            vmm,
            agent_socket,
            sockets,
            drive_slots,
            guest_ram_kib: u64::from(config.memory_mib) * 1024,
            exit: None,
        }))
    }
}

/// crx-vmm serves every empty drive on its one API socket, by drive index.
fn empty_slots(devices: &VmDevices, api_socket: &Path) -> Vec<DriveSlot> {
    devices
        .drives
        .iter()
        .enumerate()
        .filter(|(_, d)| d.path.is_none())
        .map(|(index, d)| DriveSlot {
            api_socket: api_socket.to_path_buf(),
            index,
            serial: d.serial.clone(),
        })
        .collect()
}

struct CrxVm {
    vmm: VmProcess,
    agent_socket: PathBuf,
    sockets: Vec<PathBuf>,
    drive_slots: Vec<DriveSlot>,
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

    fn exit_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        vec![self.vmm.exit_fd()]
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

    fn drive_slots(&self) -> Vec<DriveSlot> {
        self.drive_slots.clone()
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
            devices: Default::default(),
        };
        let args = CrxVmmBackend::default().vmm_args(&config);
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].as_str())
        };
        assert_eq!(after("--cmdline"), Some("crx.log=debug"));
        assert_eq!(after("--vsock-uds"), Some("/tmp/x/agent.vsock"));
        assert_eq!(after("--serial"), Some("file:/tmp/s"));
        assert_eq!(after("--api-socket"), None);
        let with_slots = VmConfig {
            devices: VmDevices {
                drives: VmDevices::empty_slots(2),
                ..Default::default()
            },
            ..config
        };
        let args = CrxVmmBackend::default().vmm_args(&with_slots);
        let at = args.iter().position(|a| a == "--api-socket").unwrap();
        assert_eq!(args[at + 1], "/tmp/x/api.sock");
        let drives: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(a, _)| *a == "--drive")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            drives,
            ["empty,serial=crx-slot-0", "empty,serial=crx-slot-1"]
        );
    }

    #[test]
    fn pod_devices_become_crx_vmm_flags_that_crx_vmm_parses() {
        use crate::vm::{Drive, NetDevice, SharedDir};
        use crx_vmm::config::{DriveConfig, NetConfig, ShareConfig};
        use std::os::fd::OwnedFd;
        use std::str::FromStr;

        let tap: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        let devices = VmDevices {
            shares: vec![SharedDir {
                tag: "pod".into(),
                host_dir: "/srv/pod".into(),
            }],
            drives: vec![
                Drive {
                    path: Some("/a.img".into()),
                    read_only: true,
                    serial: "vol-1".into(),
                },
                Drive {
                    path: None,
                    read_only: false,
                    serial: String::new(),
                },
            ],
            net: Some(NetDevice {
                tap: std::sync::Arc::new(tap),
                mac: [0x02, 0xab, 0, 0, 0, 1],
                mtu: 1450,
            }),
            rng: true,
        };
        let args = device_args(&devices);
        let values = |flag: &str| -> Vec<&str> {
            args.iter()
                .enumerate()
                .filter(|(_, a)| *a == flag)
                .map(|(i, _)| args[i + 1].as_str())
                .collect()
        };
        assert_eq!(values("--drive"), ["path=/a.img,ro,serial=vol-1", "empty"]);
        let slots = empty_slots(&devices, Path::new("/run/x/api.sock"));
        assert_eq!(
            slots,
            [DriveSlot {
                api_socket: "/run/x/api.sock".into(),
                index: 1,
                serial: String::new(),
            }]
        );
        assert!(args.iter().any(|a| a == "--rng"));
        assert_eq!(values("--share"), ["tag=pod,dir=/srv/pod"]);
        assert_eq!(
            values("--net"),
            [format!("fd={fd},mac=02:ab:00:00:00:01,mtu=1450")]
        );

        // What we write is what crx-vmm reads back.
        let drive = DriveConfig::from_str(values("--drive")[0]).unwrap();
        assert_eq!(
            (
                drive.path.as_deref(),
                drive.read_only,
                drive.serial.as_str()
            ),
            (Some(std::path::Path::new("/a.img")), true, "vol-1")
        );
        assert_eq!(DriveConfig::from_str("empty").unwrap().path, None);
        let slot = DriveConfig::from_str("empty,serial=crx-slot-0").unwrap();
        assert_eq!((slot.path, slot.serial.as_str()), (None, "crx-slot-0"));
        let share = ShareConfig::from_str(values("--share")[0]).unwrap();
        assert_eq!(
            (share.tag.as_str(), share.dir.as_path()),
            ("pod", std::path::Path::new("/srv/pod"))
        );
        let net = NetConfig::from_str(values("--net")[0]).unwrap();
        assert_eq!(
            (net.tap_fd, net.mac, net.mtu),
            (fd, [0x02, 0xab, 0, 0, 0, 1], 1450)
        );
    }
}
