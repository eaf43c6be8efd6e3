//! The QEMU backend: QEMU's `microvm` machine, launched directly, booting our kernel and
//! initramfs, with guest RAM in a shared memfd so that crx's own vsock back end
//! (`crx-vmm vhost-user-vsock`, a separate small process per pod) can serve the guest
//! over vhost-user. The host side is the same hybrid-vsock socket crx-vmm gives.
//!
//! The back end is a process, not a thread of the shim: it parses guest-written queues,
//! so it lives apart from the shim's containerd credentials and can be jailed on its own;
//! if it dies, the shim sees it through its pidfd and ends the VM.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::child::{inherit_fd, wait_any, VmProcess};
use super::config::{executable, DriveSlot, SerialOutput, GUEST_CID};
use super::qemu_devices::device_args;
use super::{BackendKind, Confinement, Vm, VmBackend, VmConfig, VmError, VmExit, VmResources};

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuAccel {
    Kvm,
    Tcg,
}

/// Starts pod VMs under QEMU.
#[derive(Clone, Debug)]
pub struct QemuBackend {
    pub accel: QemuAccel,
    /// TCG translation-cache size. QEMU's default (1 GiB) is sized for desktops; a pod
    /// guest runs little code and the cache is host memory. Measured with
    /// `crx-bench boot --tcg-tb-size-mib`: 16, 32 and 128 MiB boot within noise of each
    /// other (2.07-2.16 s); 32 MiB leaves room for container workloads.
    pub tcg_tb_size_mib: u32,
    /// How long the vhost-user back end may take to create its socket.
    pub backend_ready_timeout: Duration,
    /// Extra QEMU arguments (benchmarks add trace events).
    pub extra_args: Vec<String>,
    /// Jail and seccomp of each VM's vhost-user back ends (crx-vmm processes).
    pub confinement: Confinement,
}

impl QemuBackend {
    pub fn new(accel: QemuAccel) -> Self {
        Self {
            accel,
            tcg_tb_size_mib: 32,
            backend_ready_timeout: Duration::from_secs(5),
            extra_args: Vec::new(),
            confinement: Confinement::default(),
        }
    }

    /// The QEMU command line for `config` (without the program name).
    pub fn qemu_args(
        &self,
        config: &VmConfig,
        vhost_socket: &Path,
    ) -> Result<Vec<String>, VmError> {
        let mem = config.memory_mib;
        let serial_on = config.serial != SerialOutput::Off;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("crx-{},debug-threads=on", config.name),
            "-M".into(),
            format!(
                "microvm,acpi=off,x-option-roms=off,{},isa-serial={},memory-backend=mem",
                legacy_timers(self.accel),
                if serial_on { "on" } else { "off" }
            ),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-m".into(),
            format!("{mem}M"),
            "-smp".into(),
            config.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            // microvm has no keyboard controller; the guest's `reboot=k` reset (clean
            // power-off and panic alike) needs one to reach QEMU, which -no-reboot ends.
            "-device".into(),
            "i8042".into(),
        ];
        match self.accel {
            QemuAccel::Kvm => {
                // MSR_IA32_ARCH_CAPABILITIES cannot be set on some nested hosts (PVM).
                args.extend([
                    "-accel".into(),
                    "kvm".into(),
                    "-cpu".into(),
                    "host,-arch-capabilities".into(),
                ]);
            }
            QemuAccel::Tcg => {
                let thread = if config.vcpus > 1 { "multi" } else { "single" };
                args.extend([
                    "-accel".into(),
                    format!("tcg,thread={thread},tb-size={}", self.tcg_tb_size_mib),
                    "-cpu".into(),
                    "max".into(),
                ]);
            }
        }
        match &config.serial {
            SerialOutput::Off => args.extend(["-serial".into(), "none".into()]),
            SerialOutput::File(path) => {
                args.extend(["-serial".into(), format!("file:{}", path.display())])
            }
        }
        let fs_sockets: Vec<PathBuf> = (0..config.devices.shares.len())
            .map(|i| config.fs_socket(i))
            .collect();
        args.extend(device_args(&config.devices, &fs_sockets, |i| {
            config.slot_sockets(i).0
        })?);
        args.extend([
            "-chardev".into(),
            format!("socket,id=vsock,path={}", vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
            "-kernel".into(),
            config.kernel.display().to_string(),
            "-initrd".into(),
            config.initramfs.display().to_string(),
            "-append".into(),
            kernel_cmdline(config)?,
        ]);
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }
}

/// Under KVM the guest gets its clock from kvm-clock and needs no legacy timer. Under
/// TCG there is no kvm-clock: without the PIT the kernel cannot calibrate the TSC and
/// hangs after "Marking TSC unstable", and without the RTC it spends about a second
/// trying to read the time. So TCG keeps PIT, PIC and RTC.
fn legacy_timers(accel: QemuAccel) -> &'static str {
    match accel {
        QemuAccel::Kvm => "pit=off,pic=off,rtc=off",
        QemuAccel::Tcg => "pit=on,pic=on,rtc=on",
    }
}

/// The guest kernel command line, built by crx-vmm's own builder so both backends give
/// the guest the same contract (reset on reboot and panic, a console only when asked),
/// plus `quiet` and the agent's options. QEMU adds the virtio-mmio devices itself.
pub(super) fn kernel_cmdline(config: &VmConfig) -> Result<String, VmError> {
    let extra = format!("quiet {}", config.kernel_cmdline);
    crx_vmm::builder::kernel_cmdline(config.serial != SerialOutput::Off, extra.trim(), &[])
        .ok()
        .and_then(|line| line.as_cstring().ok())
        .map(|line| line.to_string_lossy().into_owned())
        .ok_or_else(|| {
            VmError::InvalidConfig(format!(
                "the kernel command line {:?} is too long or malformed",
                config.kernel_cmdline
            ))
        })
}

impl VmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu(self.accel)
    }

    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>, VmError> {
        config.validate()?;
        executable(
            "QEMU binary (qemu-system-x86_64, Debian package qemu-system-x86)",
            &config.qemu_binary,
        )?;
        config.prepare_run_dir()?;
        let agent_socket = config.agent_socket();
        let vhost_socket = config.run_dir.join("vhost-vsock.sock");

        // Built first: a command line QEMU would refuse fails before anything starts.
        let qemu_args = self.qemu_args(config, &vhost_socket)?;
        let confinement = self.confinement.prepare(&config.run_dir)?;
        let mut backend_cmd = Command::new(&config.crx_vmm_binary);
        backend_cmd
            .arg("vhost-user-vsock")
            .arg("--socket")
            .arg(&vhost_socket)
            .arg("--uds")
            .arg(&agent_socket)
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .args(&confinement);
        let mut backends = vec![VmProcess::spawn(
            "vhost-user-vsock",
            &mut backend_cmd,
            &config.run_dir.join("vhost-user-vsock.log"),
        )?];
        let mut sockets = vec![config.agent_socket(), vhost_socket.clone()];
        let mut ready = vec![vhost_socket];
        // One back end per share, each confined to its own directory.
        for (i, share) in config.devices.shares.iter().enumerate() {
            let socket = config.fs_socket(i);
            let mut cmd = Command::new(&config.crx_vmm_binary);
            cmd.arg("vhost-user-fs")
                .arg("--socket")
                .arg(&socket)
                .arg("--dir")
                .arg(&share.host_dir)
                .args(&confinement);
            backends.push(VmProcess::spawn(
                "vhost-user-fs",
                &mut cmd,
                &config.run_dir.join(format!("vhost-user-fs-{i}.log")),
            )?);
            sockets.push(socket.clone());
            ready.push(socket);
        }
        // One back end per empty drive slot: crx's virtio-blk, whose API socket
        // attaches a host block device while the VM runs.
        let mut drive_slots = Vec::new();
        for (i, drive) in config.devices.drives.iter().enumerate() {
            if drive.path.is_some() {
                continue;
            }
            let (socket, api_socket) = config.slot_sockets(i);
            let mut cmd = Command::new(&config.crx_vmm_binary);
            cmd.arg("vhost-user-blk")
                .arg("--socket")
                .arg(&socket)
                .arg("--api-socket")
                .arg(&api_socket)
                .arg("--serial")
                .arg(&drive.serial)
                .args(&confinement);
            backends.push(VmProcess::spawn(
                "vhost-user-blk",
                &mut cmd,
                &config.run_dir.join(format!("vhost-user-blk-{i}.log")),
            )?);
            sockets.extend([socket.clone(), api_socket.clone()]);
            ready.push(socket);
            drive_slots.push(DriveSlot {
                api_socket,
                index: 0,
                serial: drive.serial.clone(),
            });
        }
        // Started together, waited for together: their start-up overlaps.
        for (backend, socket) in backends.iter_mut().zip(&ready) {
            wait_for_socket(backend, socket, self.backend_ready_timeout)?;
        }

        let mut qemu_cmd = Command::new(&config.qemu_binary);
        qemu_cmd.args(qemu_args);
        if let Some(net) = &config.devices.net {
            inherit_fd(&mut qemu_cmd, net.tap.as_raw_fd());
        }
        let qemu = VmProcess::spawn("qemu", &mut qemu_cmd, &config.run_dir.join("qemu.log"))?;
        tracing::info!(vm = %config.name, backend = %self.kind(), qemu_pid = qemu.pid(),
            backend_pids = ?backends.iter().map(VmProcess::pid).collect::<Vec<_>>(),
            "VM started");
        Ok(Box::new(QemuVm {
            kind: self.kind(),
            qemu,
            backends,
            agent_socket,
            sockets,
            drive_slots,
            guest_ram_kib: u64::from(config.memory_mib) * 1024,
            exit: None,
        }))
    }
}

/// Waits for a back end to bind its socket, or to die trying.
fn wait_for_socket(
    process: &mut VmProcess,
    socket: &Path,
    timeout: Duration,
) -> Result<(), VmError> {
    let deadline = Instant::now() + timeout;
    while !socket.exists() {
        if wait_any(&mut [&mut *process], Some(Duration::from_millis(2)))?.is_some() {
            let status = process.try_exit()?.unwrap_or(super::ProcessExit::Code(-1));
            return Err(VmError::EndedEarly {
                exit: VmExit {
                    process: process.name,
                    status,
                    requested: false,
                    log_tail: process.log_tail(),
                },
            });
        }
        if Instant::now() >= deadline {
            return Err(VmError::NotReady {
                process: process.name,
                timeout,
                detail: format!(
                    "socket {socket:?} never appeared; log: {}",
                    process.log_tail()
                ),
            });
        }
    }
    Ok(())
}

struct QemuVm {
    kind: BackendKind,
    qemu: VmProcess,
    /// The vhost-user back ends: vsock first, then one per share, then one per empty
    /// drive slot.
    backends: Vec<VmProcess>,
    agent_socket: PathBuf,
    sockets: Vec<PathBuf>,
    drive_slots: Vec<DriveSlot>,
    guest_ram_kib: u64,
    exit: Option<VmExit>,
}

impl QemuVm {
    /// Ends whatever still runs once one process ended (or a stop was requested), and
    /// remembers how the VM ended. QEMU and its back ends end together more often than
    /// not: QEMU's exit closes the vhost-user sockets and the back ends then exit
    /// cleanly, so any of them may be reaped first. The report names a back end that
    /// ended by itself while QEMU still ran, or failed while QEMU ended cleanly;
    /// otherwise QEMU's end is the VM's.
    /// `first_backend`: the back end whose end woke the waiter, if one did.
    fn finish(
        &mut self,
        requested: bool,
        grace: Duration,
        first_backend: Option<usize>,
    ) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        if requested {
            // QEMU first: with the guest gone, the back ends have nothing left to serve.
            self.qemu.terminate(grace)?;
        } else {
            // Give the partners of the process that ended a moment to end by themselves.
            let deadline = Instant::now() + PARTNER_EXIT_WINDOW;
            wait_any(&mut [&mut self.qemu], Some(PARTNER_EXIT_WINDOW))?;
            for backend in &mut self.backends {
                let left = deadline.saturating_duration_since(Instant::now());
                wait_any(&mut [backend], Some(left))?;
            }
        }
        // Who had ended before the host stepped in, taken before anything is
        // signalled: a back end that exits because we stopped QEMU is not a culprit.
        let qemu_ended_by_itself = self.qemu.try_exit()?.is_some();
        let mut ended_by_itself = Vec::with_capacity(self.backends.len());
        for backend in &mut self.backends {
            ended_by_itself.push(backend.try_exit()?.is_some());
        }
        let qemu_status = self.qemu.terminate(grace)?;
        let mut statuses = Vec::with_capacity(self.backends.len());
        for backend in &mut self.backends {
            statuses.push(backend.terminate(grace)?);
        }
        let blamed = |i: usize| {
            !requested
                && ended_by_itself[i]
                && (!qemu_ended_by_itself || (!statuses[i].success() && qemu_status.success()))
        };
        // A back end that failed first is the cause even if QEMU then failed because
        // of it; otherwise a failed back end explains more than one that ended cleanly.
        let failed_first = first_backend.filter(|&i| !requested && !statuses[i].success());
        let culprit = failed_first
            .or_else(|| {
                (0..self.backends.len())
                    .filter(|&i| blamed(i))
                    .min_by_key(|&i| statuses[i].success())
            })
            .map(|i| (i, statuses[i]));
        let (process, status) = match culprit {
            Some((i, status)) => (&self.backends[i], status),
            None => (&self.qemu, qemu_status),
        };
        let exit = VmExit {
            process: process.name,
            status,
            requested,
            log_tail: process.log_tail(),
        };
        if exit.is_failure() {
            tracing::error!(%exit, "VM ended unexpectedly");
        } else {
            tracing::info!(%exit, "VM ended");
        }
        remove_sockets(&self.sockets);
        self.exit = Some(exit.clone());
        Ok(exit)
    }
}

/// How long the partner of a process that ended may take to notice and end too.
const PARTNER_EXIT_WINDOW: Duration = Duration::from_millis(500);

pub(super) fn remove_sockets(sockets: &[PathBuf]) {
    for s in sockets {
        if let Err(e) = std::fs::remove_file(s) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = ?s, error = %e, "could not remove a VM socket");
            }
        }
    }
}

impl Vm for QemuVm {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        std::iter::once(&self.qemu)
            .chain(&self.backends)
            .map(|p| (p.name, p.pid()))
            .collect()
    }

    fn exit_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        std::iter::once(&self.qemu)
            .chain(&self.backends)
            .map(VmProcess::exit_fd)
            .collect()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(Some(exit.clone()));
        }
        let mut all: Vec<&mut VmProcess> = std::iter::once(&mut self.qemu)
            .chain(self.backends.iter_mut())
            .collect();
        match wait_any(&mut all, Some(timeout))? {
            None => Ok(None),
            // Index 0 is QEMU; the back ends follow.
            Some(i) => self
                .finish(false, Duration::from_secs(2), i.checked_sub(1))
                .map(Some),
        }
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        self.finish(true, grace, None)
    }

    fn resources(&self) -> VmResources {
        VmResources::measure(&self.pids(), self.guest_ram_kib)
    }

    fn vmm_spawn(&self) -> (std::time::SystemTime, &Path) {
        (self.qemu.spawned_at, self.qemu.log_path())
    }

    fn drive_slots(&self) -> Vec<DriveSlot> {
        self.drive_slots.clone()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.finish(true, Duration::from_millis(500), None);
        }
        remove_sockets(&self.sockets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(serial: SerialOutput, kernel_cmdline: &str) -> VmConfig {
        VmConfig {
            name: "t".into(),
            run_dir: "/tmp/x".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel_cmdline: kernel_cmdline.into(),
            serial,
            crx_vmm_binary: "/bin/true".into(),
            qemu_binary: "/bin/true".into(),
            devices: Default::default(),
        }
    }

    #[test]
    fn guest_cmdline_is_crx_vmm_s_with_quiet_and_the_agent_options() {
        let serial = config(SerialOutput::File("/tmp/s".into()), "crx.log=debug");
        assert_eq!(
            kernel_cmdline(&serial).unwrap(),
            "reboot=k panic=-1 console=ttyS0 quiet crx.log=debug"
        );
        let silent = config(SerialOutput::Off, "crx.log=debug");
        assert_eq!(
            kernel_cmdline(&silent).unwrap(),
            "reboot=k panic=-1 console=ttynull quiet crx.log=debug"
        );
        let too_long = config(SerialOutput::Off, &"a".repeat(4096));
        assert!(matches!(
            kernel_cmdline(&too_long),
            Err(VmError::InvalidConfig(_))
        ));
    }
}
