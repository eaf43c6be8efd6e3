//! Assembles a VM: guest memory, the KVM VM and its vCPUs, the legacy devices on the
//! port-I/O bus, virtio-mmio devices (transport, irqfd, ioeventfds, command-line
//! entry), and the boot material; then runs the vCPUs, each on its own thread.
//!
//! [`Vmm::new`] gives a VM with devices but no boot state, which is what tiny test
//! guests need; [`build`] is the whole Linux path driven by a [`VmConfig`].

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::api::{ApiError, ApiServer, DriveHandle};
use crate::arch::x86_64::layout;
use crate::boot::{self, BootError, BootParams};
use crate::cleanup::Cleaner;
use crate::clock;
use crate::config::{check_vcpus, ConfigError, KernelFormat, SerialMode, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::boot_marker::{BootMarker, BootMarkerState, ExitCounters};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{LineLogger, Serial};
use crate::devices::virtio::block::{Backing, Block, BlockError};
use crate::devices::virtio::device_thread::DeviceThread;
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_SLOT_SIZE};
use crate::devices::virtio::net::{Net, NetError, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{self, VmEnd};
use crate::seccomp::{self, ThreadRole};
use crate::vstate::kvm::KvmHandle;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuContext, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Kernel arguments crx-vmm always passes: reset through the i8042 (the only reset we
/// model) and turn a panic into an immediate reset (crx-vmm reports it). Nothing the
/// guest kernel does not know: unknown parameters are handed to init as arguments.
pub const BASE_CMDLINE: &str = "reboot=k panic=-1";

/// Offset of the virtio-mmio QueueNotify register.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Which part of assembling the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM configuration")]
    Config(#[source] ConfigError),
    #[error("cannot set up guest memory")]
    Memory(#[source] MemoryError),
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("cannot load the guest")]
    Boot(#[source] BootError),
    #[error("the kernel command line is too long or malformed: shorten --cmdline")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error(
        "no virtio-mmio slot left (at most {} devices)",
        layout::VIRTIO_MMIO_SLOTS
    )]
    NoVirtioSlot,
    #[error("cannot create a device's eventfd or transport")]
    DeviceSetup(#[source] std::io::Error),
    #[error("cannot open the serial log file {}", .path.display())]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock device")]
    Vsock(#[source] VsockError),
    #[error("cannot set up virtio-blk drive {index}")]
    Block {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("cannot set up the API socket")]
    Api(#[source] ApiError),
    #[error("cannot use the --net tap fd")]
    Net(#[source] NetError),
    #[error("cannot set up virtio-fs share `{tag}`")]
    Share {
        tag: String,
        #[source]
        source: FsError,
    },
    #[error("cannot tell the cleanup process about {}", .path.display())]
    Cleaner {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start vCPU thread {index}")]
    Thread {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    /// The process exit code this failure maps to (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Config(_) | BuildError::Boot(_) | BuildError::Cmdline(_) => {
                exit::EXIT_BAD_INPUT
            }
            BuildError::Vsock(
                VsockError::PathExists(_)
                | VsockError::NoDirectory(_)
                | VsockError::PathTooLong(_)
                | VsockError::InvalidCid(_),
            ) => exit::EXIT_BAD_INPUT,
            BuildError::SerialFile { .. } => exit::EXIT_BAD_INPUT,
            BuildError::Api(ApiError::PathExists(_) | ApiError::Bind { .. }) => {
                exit::EXIT_BAD_INPUT
            }
            BuildError::Block {
                source:
                    BlockError::Open { .. }
                    | BlockError::NotFileOrBlockDevice(_)
                    | BlockError::SerialTooLong(_)
                    | BlockError::Size { .. },
                ..
            } => exit::EXIT_BAD_INPUT,
            BuildError::Net(e) if e.is_bad_input() => exit::EXIT_BAD_INPUT,
            BuildError::Share { source, .. } if source.is_bad_input() => exit::EXIT_BAD_INPUT,
            _ => exit::EXIT_VMM_ERROR,
        }
    }
}

/// A VM with memory, devices and vCPUs, not yet running.
pub struct Vmm {
    vm: Vm,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    events_tx: Sender<VmEnd>,
    events_rx: Receiver<VmEnd>,
    marker: Arc<BootMarkerState>,
    exits: Arc<ExitCounters>,
    virtio_slots_used: u32,
    owned_paths: Vec<PathBuf>,
    /// The bound API socket, served once the VM starts.
    api: Option<ApiServer>,
}

impl Vmm {
    /// Creates memory, the VM, `vcpus` vCPUs (not configured) and the legacy devices:
    /// i8042, boot marker, and the UART if `serial_out` is given.
    pub fn new(
        kvm: &KvmHandle,
        memory_mib: u64,
        vcpus: u8,
        serial_out: Option<Box<dyn Write + Send>>,
    ) -> Result<Self, BuildError> {
        let mem = memory::create(memory_mib).map_err(BuildError::Memory)?;
        let vm = Vm::new(kvm, &mem).map_err(BuildError::Vm)?;
        clock::step("vm and memory");
        let (events_tx, events_rx) = channel();
        let marker = Arc::new(BootMarkerState::default());
        let exits = Arc::new(ExitCounters::default());

        let mut pio = Bus::new();
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            u64::from(layout::I8042_PORT),
            layout::I8042_PORT_LEN,
        )
        .map_err(BuildError::Bus)?;
        pio.insert(
            Arc::new(Mutex::new(BootMarker::new(marker.clone(), exits.clone()))),
            u64::from(layout::BOOT_MARKER_PORT),
            1,
        )
        .map_err(BuildError::Bus)?;
        if let Some(out) = serial_out {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::DeviceSetup)?;
            vm.register_irqfd(&irq, layout::SERIAL_IRQ)
                .map_err(BuildError::Vm)?;
            pio.insert(
                Arc::new(Mutex::new(Serial::new(irq, out))),
                u64::from(layout::SERIAL_PORT),
                layout::SERIAL_PORT_LEN,
            )
            .map_err(BuildError::Bus)?;
        }

        let mut created = Vec::with_capacity(usize::from(vcpus));
        let mut stats_missing = false;
        for index in 0..vcpus {
            let vcpu = Vcpu::new(&vm, index).map_err(BuildError::Vcpu)?;
            match vcpu.exit_stat() {
                Ok(stat) => exits.add(stat),
                Err(e) if !stats_missing => {
                    stats_missing = true;
                    tracing::info!(error = %e, "KVM exit counts unavailable; the ready line will not carry them");
                }
                Err(_) => {}
            }
            created.push(vcpu);
        }

        clock::step("vcpus created");
        Ok(Self {
            vm,
            mem,
            vcpus: created,
            pio,
            mmio: Bus::new(),
            events_tx,
            events_rx,
            marker,
            exits,
            virtio_slots_used: 0,
            owned_paths: Vec::new(),
            api: None,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn boot_marker(&self) -> Arc<BootMarkerState> {
        self.marker.clone()
    }

    /// Total KVM exits so far, when the stats fd is available.
    pub fn exit_counters(&self) -> Arc<ExitCounters> {
        self.exits.clone()
    }

    /// The next free virtio-mmio slot's base address and IRQ (not yet taken).
    pub fn next_virtio_slot(&self) -> Option<(GuestAddress, u32)> {
        layout::virtio_slot(self.virtio_slots_used)
    }

    /// Puts `device` behind a virtio-mmio transport in the next slot: irqfd on the
    /// slot's IRQ, one ioeventfd per queue on QueueNotify. Returns the slot.
    pub fn attach_virtio(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(GuestAddress, u32), BuildError> {
        let (base, irq) = self.next_virtio_slot().ok_or(BuildError::NoVirtioSlot)?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(BuildError::DeviceSetup)?;
        self.vm
            .register_irqfd(&irqfd, irq)
            .map_err(BuildError::Vm)?;
        let transport_irqfd = irqfd.try_clone().map_err(BuildError::DeviceSetup)?;
        let transport = MmioTransport::new(self.mem.clone(), device, transport_irqfd)
            .map_err(BuildError::DeviceSetup)?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base.0 + QUEUE_NOTIFY_OFFSET, queue as u32)
                .map_err(BuildError::Vm)?;
        }
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base.0, MMIO_SLOT_SIZE)
            .map_err(BuildError::Bus)?;
        self.virtio_slots_used += 1;
        Ok((base, irq))
    }

    /// Records a host path crx-vmm created and must remove when the VM ends.
    pub fn own_path(&mut self, path: PathBuf) {
        self.owned_paths.push(path);
    }

    /// Starts one thread per vCPU (`crx-vcpu-<n>`).
    pub fn start(self) -> Result<RunningVm, BuildError> {
        vcpu::install_kick_handler().map_err(BuildError::DeviceSetup)?;
        let api = match self.api {
            Some(server) => Some(server.spawn().map_err(BuildError::Api)?),
            None => None,
        };
        let vcpu_filter = seccomp::compile(ThreadRole::Vcpu, seccomp::mode())
            .map_err(|e| BuildError::DeviceSetup(std::io::Error::other(e)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut running = RunningVm {
            threads: Vec::new(),
            stop: stop.clone(),
            events_rx: self.events_rx,
            events_tx: self.events_tx.clone(),
            marker: self.marker,
            owned_paths: self.owned_paths,
            _vm: self.vm,
            mem: self.mem,
            api,
        };
        for vcpu in self.vcpus {
            let index = vcpu.index();
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                events: self.events_tx.clone(),
                stop: stop.clone(),
            };
            let filter = vcpu_filter.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("crx-vcpu-{index}"))
                .spawn(move || {
                    // Before the first KVM_RUN, i.e. before any guest instruction.
                    if let Err(e) = seccomp::install_program(ThreadRole::Vcpu, &filter) {
                        let _ = ctx.events.send(VmEnd::RunFailed {
                            vcpu: index,
                            error: crate::seccomp::error_chain(&e),
                        });
                        return;
                    }
                    vcpu.run(ctx)
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    running.threads = threads;
                    running.stop();
                    return Err(BuildError::Thread { index, source });
                }
            }
        }
        running.threads = threads;
        Ok(running)
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    events_rx: Receiver<VmEnd>,
    events_tx: Sender<VmEnd>,
    marker: Arc<BootMarkerState>,
    owned_paths: Vec<PathBuf>,
    // Dropped after the vCPU threads are joined (see `Drop`): they use both.
    _vm: Vm,
    mem: GuestMemoryMmap,
    /// The `crx-api` thread, if `--api-socket` was given.
    api: Option<DeviceThread<()>>,
}

/// How long `stop` keeps kicking a vCPU thread before leaving it behind.
const STOP_DEADLINE: Duration = Duration::from_secs(2);

impl RunningVm {
    /// A sender for ending the VM from outside (e.g. a signal thread).
    pub fn event_sender(&self) -> Sender<VmEnd> {
        self.events_tx.clone()
    }

    /// Blocks until something ends the VM.
    pub fn wait(&self) -> VmEnd {
        // We hold a sender ourselves, so the channel never disconnects.
        loop {
            if let Ok(end) = self.events_rx.recv() {
                return end;
            }
        }
    }

    /// Like [`wait`](Self::wait), giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmEnd> {
        self.events_rx.recv_timeout(timeout).ok()
    }

    pub fn boot_marker(&self) -> &BootMarkerState {
        &self.marker
    }

    /// Removes the host paths the VM owned and leaves the vCPUs running: for a
    /// process that exits right after (exit_group ends the vCPU threads at once,
    /// while kicking a spinning vCPU on a loaded host can take many milliseconds).
    pub fn release_host_paths(&mut self) {
        for path in self.owned_paths.drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Stops every vCPU (kicking it out of KVM_RUN), joins the threads and removes
    /// the host paths the VM owned. Dropping a `RunningVm` does the same.
    pub fn stop(self) {
        drop(self);
    }

    /// Kicks and joins the vCPU threads; false if one did not stop in time.
    fn halt_vcpus(&mut self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut all_stopped = true;
        for handle in self.threads.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                let _ = handle.kill(vcpu::kick_signal());
                std::thread::sleep(Duration::from_micros(200));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                all_stopped = false;
                tracing::warn!("a vCPU thread did not stop in time");
            }
        }
        all_stopped
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            let _ = api.stop("api");
        }
        if !self.halt_vcpus() {
            // A vCPU may still run the guest: its memory must stay mapped, or a later
            // mapping at the same address would become guest-writable.
            std::mem::forget(self.mem.clone());
        }
        self.release_host_paths();
    }
}

fn serial_output(mode: &SerialMode) -> Result<Option<Box<dyn Write + Send>>, BuildError> {
    Ok(match mode {
        SerialMode::Off => None,
        SerialMode::Log => Some(Box::new(LineLogger::default())),
        SerialMode::File(path) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        )),
    })
}

/// Splits user arguments into kernel arguments and init arguments (after `--`).
fn split_init_args(extra: &str) -> (&str, Option<&str>) {
    let extra = extra.trim();
    if let Some(init) = extra.strip_prefix("-- ") {
        return ("", Some(init.trim()));
    }
    match extra.split_once(" -- ") {
        Some((kernel, init)) => (kernel.trim(), Some(init.trim())),
        None => (extra, None),
    }
}

/// The guest's command line: ours, the console if any, the user's, one
/// `virtio_mmio.device=` per device, and the user's init arguments last.
pub fn kernel_cmdline(
    serial: bool,
    extra: &str,
    virtio_slots: &[(GuestAddress, u32)],
) -> Result<Cmdline, BuildError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(BuildError::Cmdline)?;
    // Without a serial device the guest still needs a console, or PID 1 starts with no
    // fds 0-2; ttynull is a silent one.
    cmdline
        .insert_str(if serial {
            "console=ttyS0"
        } else {
            "console=ttynull"
        })
        .map_err(BuildError::Cmdline)?;
    let (kernel_args, init_args) = split_init_args(extra);
    if !kernel_args.is_empty() {
        cmdline
            .insert_str(kernel_args)
            .map_err(BuildError::Cmdline)?;
    }
    for (base, irq) in virtio_slots {
        cmdline
            .add_virtio_mmio_device(MMIO_SLOT_SIZE, *base, *irq, None)
            .map_err(BuildError::Cmdline)?;
    }
    if let Some(init) = init_args.filter(|s| !s.is_empty()) {
        cmdline
            .insert_init_args(init)
            .map_err(BuildError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Builds the whole Linux VM of `config`. The kernel format was found by
/// [`VmConfig::validate`]. The vsock socket is created last, after everything that
/// can fail on bad input; `cleaner` learns its path before it exists.
pub fn build(
    config: &VmConfig,
    format: KernelFormat,
    kvm: &KvmHandle,
    cleaner: Option<&Cleaner>,
) -> Result<Vmm, BuildError> {
    let vcpus = check_vcpus(config.vcpus, kvm.max_vcpus()).map_err(BuildError::Config)?;
    // The inherited tap fd is checked before anything is built: a wrong fd is the
    // caller's mistake and should cost nothing.
    let tap = config
        .net
        .as_ref()
        .map(|net| Tap::from_inherited_fd(net.tap_fd))
        .transpose()
        .map_err(BuildError::Net)?;
    // Shares too: a missing directory is the caller's mistake. Each server opens its
    // directory now and needs no path afterwards.
    let shares = config
        .shares
        .iter()
        .map(|share| {
            Fs::new(&share.tag, &share.dir).map_err(|source| BuildError::Share {
                tag: share.tag.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut vmm = Vmm::new(
        kvm,
        config.memory_mib,
        vcpus,
        serial_output(&config.serial)?,
    )?;

    // Devices take slots in attach order (drives, rng, net, shares, vsock); the guest finds each
    // one's type in its slot, so the command line only has to list them all.
    let virtio_count = config.drives.len()
        + usize::from(config.rng)
        + usize::from(config.net.is_some())
        + shares.len()
        + usize::from(config.vsock.is_some());
    let virtio_slots = (0..virtio_count)
        .map(|i| u32::try_from(i).ok().and_then(layout::virtio_slot))
        .collect::<Option<Vec<_>>>()
        .ok_or(BuildError::NoVirtioSlot)?;
    let cmdline = kernel_cmdline(
        config.serial != SerialMode::Off,
        &config.cmdline_extra,
        &virtio_slots,
    )?;
    let entry = boot::load(
        &vmm.mem,
        &BootParams {
            kernel: &config.kernel,
            format,
            initramfs: config.initramfs.as_deref(),
            cmdline: &cmdline,
            memory_mib: config.memory_mib,
            vcpus,
        },
    )
    .map_err(BuildError::Boot)?;
    clock::step("guest loaded");
    vcpu::write_boot_tables(&vmm.mem, entry).map_err(BuildError::Vcpu)?;
    for vcpu in &vmm.vcpus {
        let boot = (vcpu.index() == 0).then_some(entry);
        vcpu.configure(kvm, vcpus, boot).map_err(BuildError::Vcpu)?;
    }
    tracing::debug!(cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(), ?entry, "guest loaded");

    clock::step("vcpus configured");
    let mut drive_handles = Vec::with_capacity(config.drives.len());
    for (index, drive) in config.drives.iter().enumerate() {
        let err = |source| BuildError::Block { index, source };
        let block = match &drive.path {
            Some(path) => Block::new(
                &drive.serial,
                Backing::open(path, drive.read_only).map_err(err)?,
            ),
            None => Block::new_empty(&drive.serial),
        }
        .map_err(err)?;
        let block = if drive.read_only {
            block.read_only()
        } else {
            block
        };
        drive_handles.push(DriveHandle {
            slot: block.slot(),
            read_only: block.is_read_only(),
        });
        vmm.attach_virtio(Arc::new(Mutex::new(block)))?;
    }
    if config.rng {
        vmm.attach_virtio(Arc::new(Mutex::new(Rng::new())))?;
    }
    if let (Some(net), Some(tap)) = (&config.net, tap) {
        vmm.attach_virtio(Arc::new(Mutex::new(Net::new(tap, net.mac, net.mtu))))?;
    }
    for share in shares {
        vmm.attach_virtio(Arc::new(Mutex::new(share)))?;
    }
    // The API socket, like the vsock one, is created only once bad input can no longer
    // fail the build; the cleaner learns its path first.
    if let Some(path) = &config.api_socket {
        if let Some(cleaner) = cleaner {
            cleaner
                .register(path)
                .map_err(|source| BuildError::Cleaner {
                    path: path.clone(),
                    source,
                })?;
        }
        let server = ApiServer::bind(path, drive_handles).map_err(BuildError::Api)?;
        vmm.own_path(path.clone());
        vmm.api = Some(server);
    }
    // The vsock socket comes last: nothing after it may fail and leave it behind.
    if let Some(vsock) = &config.vsock {
        if let Some(cleaner) = cleaner {
            cleaner
                .register(&vsock.uds_path)
                .map_err(|source| BuildError::Cleaner {
                    path: vsock.uds_path.clone(),
                    source,
                })?;
        }
        let device =
            Vsock::new(vsock.guest_cid, vsock.uds_path.clone()).map_err(BuildError::Vsock)?;
        vmm.own_path(vsock.uds_path.clone());
        vmm.attach_virtio(Arc::new(Mutex::new(device)))?;
    }
    clock::step("devices attached");
    Ok(vmm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn cmdline_has_our_args_console_devices_then_init_args() {
        let slots = [
            layout::virtio_slot(0).unwrap(),
            layout::virtio_slot(1).unwrap(),
        ];
        let c = kernel_cmdline(true, "quiet -- --agent-debug", &slots).unwrap();
        assert_eq!(
            text(&c),
            "reboot=k panic=-1 console=ttyS0 quiet \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 -- --agent-debug"
        );
        let plain = kernel_cmdline(false, "", &[]).unwrap();
        assert_eq!(text(&plain), format!("{BASE_CMDLINE} console=ttynull"));
        let init_only = kernel_cmdline(false, "-- x", &[]).unwrap();
        assert_eq!(text(&init_only), "reboot=k panic=-1 console=ttynull -- x");
    }

    #[test]
    fn too_long_cmdline_is_an_input_error() {
        let err = kernel_cmdline(false, &"a".repeat(4000), &[]).unwrap_err();
        assert_eq!(err.exit_code(), exit::EXIT_BAD_INPUT);
    }
}
