//! `crx-vmm`: boot one micro-VM and exit when it ends. Exit codes are listed in
//! `crx_vmm::exit`; every failure before the guest runs is one line on stderr that
//! names the cause and the fix.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Parser;
use crx_vmm::builder;
use crx_vmm::cleanup::Cleaner;
use crx_vmm::config::{host_ram_mib, SerialMode, VmConfig, VsockConfig};
use crx_vmm::exit::{self, VmEnd};
use crx_vmm::host::{self, KvmFlavor};
use crx_vmm::vstate::kvm::KvmHandle;

#[derive(Parser, Debug)]
#[command(name = "crx-vmm", version, about = "crx's KVM micro-VM monitor")]
struct Cli {
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
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Serial console: off (no UART, fastest), log (each line to the log), file:PATH.
    #[arg(long, default_value = "off")]
    serial: SerialMode,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info")]
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

/// Forwards SIGTERM/SIGINT/SIGHUP to the VM as a host stop request.
fn spawn_signal_thread(set: libc::sigset_t, events: std::sync::mpsc::Sender<VmEnd>) {
    let spawned = std::thread::Builder::new()
        .name("crx-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialized signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = events.send(VmEnd::HostSignal(sig));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the signal thread; SIGTERM will kill crx-vmm uncleanly");
    }
}

fn run(cli: Cli, cleaner: Option<&Cleaner>, signals: libc::sigset_t) -> i32 {
    let Some(kernel) = cli.kernel else {
        return fail(exit::EXIT_BAD_INPUT, "--kernel is required");
    };
    let config = VmConfig {
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
    };
    let format = match config.validate(host_ram_mib()) {
        Ok(format) => format,
        Err(e) => return fail(exit::EXIT_BAD_INPUT, &error_chain(&e)),
    };
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

    let vmm = match builder::build(&config, format, &kvm, cleaner) {
        Ok(vmm) => vmm,
        Err(e) => return fail(e.exit_code(), &error_chain(&e)),
    };
    let mut running = match vmm.start() {
        Ok(running) => running,
        Err(e) => return fail(e.exit_code(), &error_chain(&e)),
    };
    spawn_signal_thread(signals, running.event_sender());

    let end = running.wait();
    let clean = running.boot_marker().shutdown_announced();
    // The process exits right after this: no need to join the vCPU threads.
    running.release_host_paths();
    let outcome = exit::outcome(&end, clean);
    if outcome.code == exit::EXIT_OK {
        tracing::info!(exit_code = outcome.code, "{}", outcome.message);
    } else {
        eprintln!("crx-vmm: {}", outcome.message);
    }
    outcome.code
}

fn main() {
    crx_vmm::clock::mark_start();
    let cli = Cli::parse();
    if cli.probe_host {
        println!("{}", host::probe_device(&cli.kvm_device).to_json());
        std::process::exit(exit::EXIT_OK);
    }
    // The cleaner must be forked while this process has a single thread.
    let cleaner = if cli.vsock_uds.is_some() {
        // SAFETY: nothing has started a thread yet (argument parsing does not).
        match unsafe { Cleaner::spawn() } {
            Ok(cleaner) => Some(cleaner),
            Err(e) => std::process::exit(fail(
                exit::EXIT_VMM_ERROR,
                &format!("cannot start the cleanup process that removes the vsock socket: {e}"),
            )),
        }
    } else {
        None
    };
    let signals = block_stop_signals();
    init_logging(&cli.log_level);
    let code = run(cli, cleaner.as_ref(), signals);
    std::process::exit(code);
}
