//! `crx-vmm`: boot one micro-VM and exit when it ends. Exit codes are listed in
//! `crx_vmm::exit`; every failure before the guest runs is one line on stderr that
//! names the cause and the fix.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use crx_vmm::builder;
use crx_vmm::cleanup::Cleaner;
use crx_vmm::config::{
    host_ram_mib, DriveConfig, NetConfig, SerialMode, ShareConfig, VmConfig, VsockConfig,
};
use crx_vmm::exit::{self, VmEnd};
use crx_vmm::host::{self, KvmFlavor};
use crx_vmm::jail::{self, JailConfig};
use crx_vmm::seccomp::{self, SeccompMode, ThreadRole};
use crx_vmm::vstate::kvm::KvmHandle;

#[derive(Parser, Debug)]
#[command(
    name = "crx-vmm",
    version,
    about = "crx's KVM micro-VM monitor",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Guest kernel: an ELF vmlinux with a PVH entry, or a bzImage.
    #[arg(long, required_unless_present = "probe_host")]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio), loaded at the top of low guest RAM.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Extra kernel arguments, appended to crx-vmm's own; text after ` -- ` goes to init.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    /// Number of vCPUs (1 to min(254, KVM's limit)).
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB (64 to the host's RAM; above 3.25 GiB it continues at 4 GiB).
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Host Unix socket of the hybrid vsock device (created; removed when crx-vmm ends).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device.
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
    /// A virtio-blk drive: path=FILE[,ro][,serial=ID], or empty[,ro][,serial=ID] for a
    /// slot filled after boot. Repeat for several drives.
    #[arg(long = "drive")]
    drives: Vec<DriveConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// A virtio-fs share served in process: tag=TAG,dir=DIR. Repeat for several.
    #[arg(long = "share")]
    shares: Vec<ShareConfig>,
    /// A virtio-net device on an inherited tap fd: fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=M].
    #[arg(long)]
    net: Option<NetConfig>,
    /// Control socket (created) for attaching or replacing drive backings after boot.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serial console: off (no UART, fastest), log (each line to the log), file:PATH.
    #[arg(long, default_value = "off")]
    serial: SerialMode,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    /// Boot even on PVM, which cannot run a stock Linux guest's user space.
    #[arg(long)]
    allow_pvm: bool,
    /// Print a one-line JSON verdict on this host's KVM and exit 0.
    #[arg(long)]
    probe_host: bool,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Seccomp filters per thread: kill (a call outside the filter kills crx-vmm),
    /// log (allowed but written to the kernel log: for finding a missing call), off.
    #[arg(long, default_value = "kill", global = true)]
    seccomp: SeccompMode,
    /// Same as `--seccomp off`.
    #[arg(long, global = true)]
    no_seccomp: bool,
    /// Run in a jail: own mount namespace, root pivoted to a tmpfs on this (existing,
    /// absolute) directory holding only the paths the VM uses, capabilities dropped.
    #[arg(long, global = true)]
    jail: Option<PathBuf>,
    /// User id to switch to inside the jail.
    #[arg(long, requires = "jail", global = true)]
    jail_uid: Option<u32>,
    /// Group id to switch to inside the jail (supplementary groups are dropped).
    #[arg(long, requires = "jail", global = true)]
    jail_gid: Option<u32>,
}

impl Cli {
    fn jail(&self) -> Option<JailConfig> {
        self.jail.clone().map(|dir| JailConfig {
            dir,
            uid: self.jail_uid,
            gid: self.jail_gid,
        })
    }

    fn seccomp_mode(&self) -> SeccompMode {
        if self.no_seccomp {
            SeccompMode::Off
        } else {
            self.seccomp
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve crx's hybrid vsock to QEMU as a vhost-user-vsock back end (one QEMU
    /// connection; exits when QEMU disconnects). Both sockets are removed on exit,
    /// SIGKILL included.
    VhostUserVsock {
        /// vhost-user socket QEMU connects to (created).
        #[arg(long)]
        socket: PathBuf,
        /// Hybrid vsock Unix socket for the host side (created).
        #[arg(long)]
        uds: PathBuf,
        /// Guest CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
    },
    /// Serve a host directory to QEMU as a vhost-user-fs back end (one QEMU
    /// connection; exits when QEMU disconnects), confined to that directory. QEMU
    /// gives the tag: `-device vhost-user-fs-device,chardev=ID,tag=TAG`. The socket is
    /// removed on exit, SIGKILL included.
    VhostUserFs {
        /// vhost-user socket QEMU connects to (created).
        #[arg(long)]
        socket: PathBuf,
        /// The directory to share; nothing outside it is reachable.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve one EMPTY virtio-blk slot to QEMU as a vhost-user-blk back end (one QEMU
    /// connection; exits when QEMU disconnects): capacity 0 until a backing is attached
    /// through API_SOCK, which speaks crx-vmm's --api-socket protocol with drive index
    /// 0 = this slot. QEMU: `-device vhost-user-blk,chardev=ID,num-queues=1`. Both
    /// sockets are removed on exit, SIGKILL included.
    VhostUserBlk {
        /// vhost-user socket QEMU connects to (created).
        #[arg(long)]
        socket: PathBuf,
        /// API socket for attach-drive/detach-drive, index 0 (created).
        #[arg(long)]
        api_socket: PathBuf,
        /// What GET_ID returns (the guest's /sys/block/vdX/serial), at most 20 bytes.
        #[arg(long)]
        serial: String,
    },
    /// Give a running crx-vmm's drive a new backing through its --api-socket: FILE is
    /// opened here and its fd passed, so no path crosses into crx-vmm. Prints the new
    /// capacity in 512-byte sectors.
    AttachDrive {
        /// The running crx-vmm's --api-socket.
        #[arg(long)]
        socket: PathBuf,
        /// Drive index, in --drive order from 0.
        #[arg(long)]
        index: usize,
        /// Raw image or block device to attach.
        #[arg(long)]
        file: PathBuf,
        /// Attach read-only (the file is opened read-only).
        #[arg(long)]
        read_only: bool,
    },
    /// Empty a running crx-vmm's drive through its --api-socket (old backing flushed).
    DetachDrive {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        index: usize,
    },
}

/// `crx-vmm attach-drive` / `detach-drive`: 0 on success, 2 if the file cannot be
/// opened, 1 if crx-vmm refused or could not be reached (the cause on stderr).
fn api_client_command(command: &Command) -> Option<i32> {
    use crx_vmm::api::client;
    match command {
        Command::AttachDrive {
            socket,
            index,
            file,
            read_only,
        } => {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(file);
            let f = match opened {
                Ok(f) => f,
                Err(e) => {
                    return Some(fail(
                        exit::EXIT_BAD_INPUT,
                        &format!("cannot open {}: {e}", file.display()),
                    ))
                }
            };
            Some(match client::attach_drive(socket, *index, &f, *read_only) {
                Ok(sectors) => {
                    println!("{{\"ok\":true,\"capacity_sectors\":{sectors}}}");
                    exit::EXIT_OK
                }
                Err(e) => fail(exit::EXIT_VMM_ERROR, &error_chain(&e)),
            })
        }
        Command::DetachDrive { socket, index } => {
            Some(match client::detach_drive(socket, *index) {
                Ok(()) => {
                    println!("{{\"ok\":true,\"capacity_sectors\":0}}");
                    exit::EXIT_OK
                }
                Err(e) => fail(exit::EXIT_VMM_ERROR, &error_chain(&e)),
            })
        }
        _ => None,
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Some library errors repeat their source in their own message.
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

fn fail(code: i32, message: &str) -> i32 {
    eprintln!("crx-vmm: {message}");
    code
}

fn init_logging(level: &str) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    // A plain level needs no EnvFilter, whose directive parsing costs start-up time.
    match level.parse::<tracing_subscriber::filter::LevelFilter>() {
        Ok(level) => builder.with_max_level(level).init(),
        Err(_) => {
            let filter = tracing_subscriber::EnvFilter::try_new(level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            builder.with_env_filter(filter).init();
        }
    }
}

/// Blocks the stop signals in this thread (and every thread it starts), so that only
/// the signal thread receives them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Hands each SIGTERM/SIGINT/SIGHUP (blocked everywhere else) to `on_signal`, on a
/// thread of its own, confined to `role`'s seccomp filter if given.
fn spawn_signal_thread(
    set: libc::sigset_t,
    role: Option<ThreadRole>,
    on_signal: impl Fn(libc::c_int) + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("crx-signals".into())
        .spawn(move || {
            if let Some(role) = role {
                if let Err(e) = seccomp::install(role) {
                    tracing::error!(error = %e, "the signal thread cannot be confined; crx-vmm exits");
                    std::process::exit(exit::EXIT_VMM_ERROR);
                }
            }
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialized signal set and `sig` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    on_signal(sig);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the signal thread; SIGTERM will end crx-vmm uncleanly");
    }
}

fn run(
    cli: Cli,
    cleaner: Option<&Cleaner>,
    signals: libc::sigset_t,
    seccomp_mode: SeccompMode,
) -> i32 {
    let Some(kernel) = cli.kernel else {
        return fail(exit::EXIT_BAD_INPUT, "--kernel is required");
    };
    let mut config = VmConfig {
        kernel,
        initramfs: cli.initramfs,
        cmdline_extra: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory_mib,
        vsock: cli.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: cli.vsock_cid,
            uds_path,
        }),
        serial: cli.serial,
        drives: cli.drives,
        rng: cli.rng,
        shares: cli.shares,
        net: cli.net,
        api_socket: cli.api_socket,
    };
    let format = match config.validate(host_ram_mib()) {
        Ok(format) => format,
        Err(e) => return fail(exit::EXIT_BAD_INPUT, &error_chain(&e)),
    };
    let jail = cli.jail.map(|dir| JailConfig {
        dir,
        uid: cli.jail_uid,
        gid: cli.jail_gid,
    });
    if let Some(jail) = &jail {
        if let Err(e) = jail.validate() {
            return fail(exit::EXIT_BAD_INPUT, &error_chain(&e));
        }
    }
    crx_vmm::clock::step("config validated");
    let kvm = match KvmHandle::open(&cli.kvm_device) {
        Ok(kvm) => kvm,
        Err(e) => return fail(exit::EXIT_NO_KVM, &error_chain(&e)),
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let verdict = host::classify(Path::new("/sys/module"), &cpuinfo);
    if !verdict.usable_for_linux {
        if !cli.allow_pvm {
            return fail(exit::EXIT_PVM, &verdict.reason);
        }
        tracing::warn!(
            "booting on PVM (--allow-pvm): a stock Linux guest's user space will not run"
        );
    } else if verdict.flavor == Some(KvmFlavor::Unknown) {
        tracing::warn!("{}", verdict.reason);
    }

    crx_vmm::clock::step("host checked");
    // Still one thread here: the jail's namespace, root and capabilities are per
    // thread, and every thread started from now on inherits them.
    if let Some(jail) = &jail {
        if let Err(e) = jail::enter(jail, &mut config) {
            let code = if e.is_bad_input() {
                exit::EXIT_BAD_INPUT
            } else {
                exit::EXIT_VMM_ERROR
            };
            return fail(code, &error_chain(&e));
        }
        crx_vmm::clock::step("jailed");
    }
    // Before any other thread: the device-thread launcher starts here, and inherits
    // the blocked stop signals and the jail.
    if let Err(e) = seccomp::set_mode(seccomp_mode) {
        return fail(exit::EXIT_VMM_ERROR, &error_chain(&e));
    }
    if seccomp_mode == SeccompMode::Log {
        tracing::warn!(
            "--seccomp log: calls outside the filters are only logged (kernel log, type=1326)"
        );
    }
    let vmm = match builder::build(&config, format, &kvm, cleaner) {
        Ok(vmm) => vmm,
        Err(e) => return fail(e.exit_code(), &error_chain(&e)),
    };
    let mut running = match vmm.start() {
        Ok(running) => running,
        Err(e) => return fail(e.exit_code(), &error_chain(&e)),
    };
    // A signal ends the VM as a host stop request.
    let events = running.event_sender();
    spawn_signal_thread(signals, Some(ThreadRole::Signals), move |sig| {
        let _ = events.send(VmEnd::HostSignal(sig));
    });
    // From here the main thread only waits for the end and cleans up.
    if let Err(e) = seccomp::install(ThreadRole::Vmm) {
        return fail(exit::EXIT_VMM_ERROR, &error_chain(&e));
    }

    let end = running.wait();
    let clean = running.boot_marker().shutdown_announced();
    // The process exits right after this and exit_group ends the vCPU threads at once;
    // joining them (what dropping `running` does) could wait on a busy host.
    running.release_host_paths();
    std::mem::forget(running);
    let outcome = exit::outcome(&end, clean);
    if outcome.code == exit::EXIT_OK {
        tracing::info!(exit_code = outcome.code, "{}", outcome.message);
    } else {
        eprintln!("crx-vmm: {}", outcome.message);
    }
    outcome.code
}

/// Jails a vhost-user back end while it still has one thread, with only its sockets'
/// directories and its shares inside. Returns the socket and share paths to use from
/// then on (resolved, the same inside the jail as outside), or the exit code after
/// saying why it could not.
fn jail_back_end(
    jail: Option<&JailConfig>,
    sockets: &[&Path],
    shares: &[&Path],
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), i32> {
    let Some(jail) = jail else {
        let owned = |paths: &[&Path]| paths.iter().map(|p| p.to_path_buf()).collect();
        return Ok((owned(sockets), owned(shares)));
    };
    let entered = jail::JailPlan::for_back_end(sockets, shares).and_then(
        |(plan, socket_paths, share_paths)| {
            jail::enter_plan(jail, &plan).map(|()| (socket_paths, share_paths))
        },
    );
    entered.map_err(|e| {
        let code = if e.is_bad_input() {
            exit::EXIT_BAD_INPUT
        } else {
            exit::EXIT_VMM_ERROR
        };
        fail(code, &error_chain(&e))
    })
}

/// A `crx-vmm vhost-user-*` back end made ready to serve: its socket and share paths
/// as seen inside its jail, and the cleanup process that removes its sockets however
/// the process ends (held for that).
struct BackEnd {
    name: &'static str,
    sockets: Vec<PathBuf>,
    shares: Vec<PathBuf>,
    _cleaner: Cleaner,
}

impl BackEnd {
    /// What every back end does while it has one thread: start the cleanup process,
    /// log, refuse socket paths that exist (a live back end's socket must not be
    /// stolen), enter the jail (sockets' directories, shares still slaves of the
    /// host's mounts), and let SIGTERM/SIGINT/SIGHUP end it with exit 0 (the cleanup
    /// process then removes the sockets). `Err` is the exit code, already reported.
    ///
    /// # Safety
    ///
    /// No other thread may exist (it forks the cleanup process).
    unsafe fn prepare(
        name: &'static str,
        sockets: &[&Path],
        shares: &[&Path],
        log_level: &str,
        jail: Option<&JailConfig>,
    ) -> Result<Self, i32> {
        // SAFETY: the caller guarantees this process has a single thread.
        let cleaner = unsafe { Cleaner::spawn() }.map_err(|e| {
            fail(
                exit::EXIT_VMM_ERROR,
                &format!("cannot start the cleanup process that removes the sockets: {e}"),
            )
        })?;
        init_logging(log_level);
        for path in sockets {
            if path.symlink_metadata().is_ok() {
                return Err(fail(
                    exit::EXIT_BAD_INPUT,
                    &format!(
                        "{} already exists (another VM's, or stale): remove it or choose another path",
                        path.display()
                    ),
                ));
            }
            cleaner.register(path).map_err(|e| {
                fail(
                    exit::EXIT_VMM_ERROR,
                    &format!(
                        "cannot tell the cleanup process about {}: {e}",
                        path.display()
                    ),
                )
            })?;
        }
        let (jailed_sockets, jailed_shares) = jail_back_end(jail, sockets, shares)?;
        if jailed_sockets.len() != sockets.len() || jailed_shares.len() != shares.len() {
            return Err(fail(
                exit::EXIT_VMM_ERROR,
                "jail: socket or share paths lost",
            ));
        }
        spawn_signal_thread(block_stop_signals(), None, move |sig| {
            tracing::info!(signal = sig, "stop requested; {name} back end exits");
            std::process::exit(exit::EXIT_OK);
        });
        Ok(Self {
            name,
            sockets: jailed_sockets,
            shares: jailed_shares,
            _cleaner: cleaner,
        })
    }

    /// One filter for every thread, those vhost-user-backend starts later included,
    /// installed before QEMU (and through it the guest) can send anything.
    fn lock_down(&self, mode: SeccompMode, role: ThreadRole) -> Result<(), i32> {
        seccomp::set_process_mode(mode)
            .and_then(|()| seccomp::install_process_wide(role))
            .map_err(|e| fail(exit::EXIT_VMM_ERROR, &error_chain(&e)))
    }

    /// The exit code for how serving ended: 0 when QEMU disconnected, 2 when the
    /// caller's input was at fault, else 1.
    fn finish<E: std::error::Error>(
        &self,
        result: Result<(), E>,
        bad_input: impl Fn(&E) -> bool,
    ) -> i32 {
        match result {
            Ok(()) => {
                tracing::info!("QEMU disconnected; {} back end done", self.name);
                exit::EXIT_OK
            }
            Err(e) => {
                let code = if bad_input(&e) {
                    exit::EXIT_BAD_INPUT
                } else {
                    exit::EXIT_VMM_ERROR
                };
                fail(code, &error_chain(&e))
            }
        }
    }
}

/// `crx-vmm vhost-user-vsock`: exit 0 when QEMU disconnects, 2 on a bad socket path
/// or CID, 1 on any other failure.
fn vhost_user_vsock(
    socket: PathBuf,
    uds: PathBuf,
    guest_cid: u64,
    log_level: &str,
    seccomp_mode: SeccompMode,
    jail: Option<JailConfig>,
) -> i32 {
    use crx_vmm::devices::virtio::vsock::VsockError;
    use crx_vmm::vhost_user::{serve_vhost_user_vsock, VhostUserVsockError};
    // SAFETY: called first thing in `main`, before any thread exists.
    let back_end = match unsafe {
        BackEnd::prepare(
            "vhost-user-vsock",
            &[&socket, &uds],
            &[],
            log_level,
            jail.as_ref(),
        )
    } {
        Ok(b) => b,
        Err(code) => return code,
    };
    if let Err(code) = back_end.lock_down(seccomp_mode, ThreadRole::VhostUserVsock) {
        return code;
    }
    let [socket, uds] = [&back_end.sockets[0], &back_end.sockets[1]];
    let result = serve_vhost_user_vsock(socket, guest_cid, uds.clone());
    let _ = std::fs::remove_file(uds);
    back_end.finish(result, |e| {
        matches!(
            e,
            VhostUserVsockError::Muxer(
                VsockError::PathExists(_)
                    | VsockError::NoDirectory(_)
                    | VsockError::PathTooLong(_)
                    | VsockError::InvalidCid(_),
            )
        )
    })
}

/// `crx-vmm vhost-user-fs`: exit 0 when QEMU disconnects, 2 on a bad socket path or
/// share directory, 1 on any other failure.
fn vhost_user_fs(
    socket: PathBuf,
    dir: PathBuf,
    log_level: &str,
    seccomp_mode: SeccompMode,
    jail: Option<JailConfig>,
) -> i32 {
    use crx_vmm::vhost_user::{serve_vhost_user_fs, VhostUserFsError};
    // SAFETY: called first thing in `main`, before any thread exists.
    let back_end = match unsafe {
        BackEnd::prepare(
            "vhost-user-fs",
            &[&socket],
            &[&dir],
            log_level,
            jail.as_ref(),
        )
    } {
        Ok(b) => b,
        Err(code) => return code,
    };
    if let Err(code) = back_end.lock_down(seccomp_mode, ThreadRole::VhostUserFs) {
        return code;
    }
    let result = serve_vhost_user_fs(&back_end.sockets[0], &back_end.shares[0]);
    back_end.finish(result, VhostUserFsError::is_bad_input)
}

/// `crx-vmm vhost-user-blk`: exit 0 when QEMU disconnects, 2 on a bad socket path or
/// serial, 1 on any other failure.
fn vhost_user_blk(
    socket: PathBuf,
    api_socket: PathBuf,
    serial: &str,
    log_level: &str,
    seccomp_mode: SeccompMode,
    jail: Option<JailConfig>,
) -> i32 {
    use crx_vmm::vhost_user::{VhostUserBlkError, VhostUserBlkServer};
    // Bad input is refused before the cleanup process learns the socket paths: a
    // back end that never served must leave nothing to clean, not even a later unlink.
    if let Err(e) = crx_vmm::devices::virtio::block::Block::new_empty(serial) {
        return fail(exit::EXIT_BAD_INPUT, &e.to_string());
    }
    // SAFETY: called first thing in `main`, before any thread exists.
    let back_end = match unsafe {
        BackEnd::prepare(
            "vhost-user-blk",
            &[&socket, &api_socket],
            &[],
            log_level,
            jail.as_ref(),
        )
    } {
        Ok(b) => b,
        Err(code) => return code,
    };
    // Checks the serial, then binds the API socket (bind, chmod) before the filter,
    // which need not allow chmod.
    let server = VhostUserBlkServer::bind(&back_end.sockets[0], &back_end.sockets[1], serial);
    let result = match server {
        Ok(server) => match back_end.lock_down(seccomp_mode, ThreadRole::VhostUserBlk) {
            Ok(()) => server.serve(),
            Err(code) => return code,
        },
        Err(e) => Err(e),
    };
    back_end.finish(result, VhostUserBlkError::is_bad_input)
}

fn main() {
    crx_vmm::clock::mark_start();
    let cli = Cli::parse();
    let seccomp_mode = cli.seccomp_mode();
    let jail = cli.jail();
    if let Some(code) = cli.command.as_ref().and_then(api_client_command) {
        std::process::exit(code);
    }
    if let Some(Command::VhostUserBlk {
        socket,
        api_socket,
        serial,
    }) = &cli.command
    {
        std::process::exit(vhost_user_blk(
            socket.clone(),
            api_socket.clone(),
            serial,
            &cli.log_level,
            seccomp_mode,
            jail,
        ));
    }
    if let Some(Command::VhostUserFs { socket, dir }) = &cli.command {
        std::process::exit(vhost_user_fs(
            socket.clone(),
            dir.clone(),
            &cli.log_level,
            seccomp_mode,
            jail,
        ));
    }
    if let Some(Command::VhostUserVsock {
        socket,
        uds,
        guest_cid,
    }) = cli.command
    {
        std::process::exit(vhost_user_vsock(
            socket,
            uds,
            guest_cid,
            &cli.log_level,
            seccomp_mode,
            jail,
        ));
    }
    if cli.probe_host {
        println!("{}", host::probe_device(&cli.kvm_device).to_json());
        std::process::exit(exit::EXIT_OK);
    }
    // The cleaner must be forked while this process has a single thread.
    let cleaner = if cli.vsock_uds.is_some() || cli.api_socket.is_some() {
        // SAFETY: nothing has started a thread yet (argument parsing does not).
        match unsafe { Cleaner::spawn() } {
            Ok(cleaner) => Some(cleaner),
            Err(e) => std::process::exit(fail(
                exit::EXIT_VMM_ERROR,
                &format!(
                    "cannot start the cleanup process that removes the vsock and API sockets: {e}"
                ),
            )),
        }
    } else {
        None
    };
    let signals = block_stop_signals();
    init_logging(&cli.log_level);
    let code = run(cli, cleaner.as_ref(), signals, seccomp_mode);
    std::process::exit(code);
}
