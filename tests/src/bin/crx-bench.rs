//! crx-bench: crx's benchmark programs. Each subcommand measures side by side in one
//! run, prints its figures, and prints one JSON object as its last line.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use crx_tests::bench;

#[derive(Parser)]
#[command(about = "crx benchmarks: figures side by side, one JSON object as the last line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Spawn -> agent health reply for each VM backend this host can run, with RSS and
    /// guest memory touched at ready.
    Boot {
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        /// TCG translation-cache size for the QEMU/TCG backend (MiB); default: the backend's.
        #[arg(long)]
        tcg_tb_size_mib: Option<u32>,
    },
    /// crx-vmm vs QEMU microvm/KVM booting the same guest in the same nested-KVM L1:
    /// setup to first guest instruction, spawn -> agent reply, VMM RSS, KVM exits.
    Vmm {
        #[arg(long, default_value_t = 10)]
        iterations: usize,
    },
    /// virtio-fs back end direct (FUSE requests in plain guest memory, no guest):
    /// small-file create/stat/read/unlink ops/s and 1 MiB read/write MB/s through
    /// crx's server vs the same syscalls on the host directory.
    Fs {
        /// Small files per round.
        #[arg(long, default_value_t = 2000)]
        files: usize,
        /// Size of the big file for the MB/s figures.
        #[arg(long, default_value_t = 64)]
        big_file_mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Directory to measure in (a fresh subdirectory is made); default: $TMPDIR.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// virtio-net back end direct (frames in plain guest memory, no guest) to and from
    /// a tap, vs a veth pair between two namespaces (frames, and TCP with iperf3).
    Net {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3)]
        secs: u64,
        /// Skip the in-guest TCP figures (two QEMU/TCG guest boots).
        #[arg(long)]
        no_guest: bool,
    },
    /// The hybrid-vsock muxer direct (guest packets in plain memory, no guest) vs a
    /// plain Unix socket pair moving the same bytes.
    Vsock {
        /// MiB moved each way per round.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Guest rx buffer size in bytes (Linux posts 4 KiB buffers by default).
        #[arg(long, default_value_t = 4096)]
        rx_buf: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// virtio-blk back end direct (requests in plain guest memory, no guest):
    /// sequential 1 MiB write/read MB/s and 4 KiB random read IOPS vs pread/pwrite
    /// (and fio, if installed) on the same host file.
    Blk {
        /// Size of the test file.
        #[arg(long, default_value_t = 256)]
        file_mib: u64,
        /// 4 KiB random reads per pass.
        #[arg(long, default_value_t = 20000)]
        random_reads: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Directory for the test file (on a real disk, not tmpfs).
        #[arg(long, default_value = "/var/tmp")]
        dir: std::path::PathBuf,
        /// Also run the fio jobs inside a QEMU/TCG guest on the same file.
        #[arg(long)]
        guest: bool,
    },
    /// Container create+start -> first output byte and exec -> exit: runc on the host
    /// vs crx-agent in host mode vs crx-agent in a QEMU/TCG pod VM.
    Container {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Guest memory of the pod VM.
        #[arg(long, default_value_t = 512)]
        memory_mib: u32,
        /// Leave out the pod VM.
        #[arg(long)]
        no_vm: bool,
    },
    /// `ctr run --rm` -> exit of a trivial container through a private containerd,
    /// crx vs runc alternated (median, p90); host PSS of an idle crx pod's shim and
    /// VM processes and the guest memory it touched.
    Ctr {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The shim's hypervisor setting: auto, qemu or crx-vmm.
        #[arg(long, default_value = "auto")]
        hypervisor: String,
    },
    /// Through containerd's CRI, runc and crx alternated: RunPodSandbox and pod-ready
    /// latency (median, p90), host PSS of an idle pod of each.
    Pod {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Through containerd's CRI: ExecSync of /bin/true in a running container, runc
    /// and crx alternated (median, p90).
    Exec {
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Through containerd's CRI: N pods started at once per handler (pods/s), the host
    /// memory they hold, and how many idle pods fit in a memory budget.
    Density {
        #[arg(long, default_value_t = 20)]
        pods: usize,
        /// The host memory set aside for pods (MiB).
        #[arg(long, default_value_t = 16384)]
        budget_mib: u64,
        /// Quiet time after the last pod is ready, before memory and CPU are measured (s).
        #[arg(long, default_value_t = 10)]
        settle_s: u64,
        /// How long the idle pods' CPU use is measured (s).
        #[arg(long, default_value_t = 20)]
        idle_window_s: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot {
            iterations,
            memory_mib,
            tcg_tb_size_mib,
        } => {
            let kvm_usable = crx_shim::vm::probe_kvm() == crx_shim::vm::KvmVerdict::Usable;
            let backends = bench::boot::available_backends(kvm_usable);
            println!(
                "crx-bench boot: {iterations} starts per backend, guest memory {memory_mib} MiB"
            );
            bench::boot::run(iterations, &backends, memory_mib, tcg_tb_size_mib)?
        }
        Command::Vmm { iterations } => bench::vmm::run(iterations)?,
        Command::Fs {
            files,
            big_file_mib,
            rounds,
            dir,
        } => bench::fs::run(
            &bench::fs::FsBenchConfig {
                files,
                big_file_mib,
                rounds,
            },
            dir.as_deref(),
        )?,
        Command::Net { secs, no_guest } => bench::net::run(secs, !no_guest)?,
        Command::Vsock {
            mib,
            rx_buf,
            rounds,
        } => bench::vsock::run(mib, rx_buf, rounds)?,
        Command::Blk {
            file_mib,
            random_reads,
            rounds,
            dir,
            guest,
        } => bench::blk::run(&bench::blk::BlkOptions {
            file_mib,
            dir,
            random_reads,
            rounds,
            guest,
        })?,
        Command::Container {
            runs,
            memory_mib,
            no_vm,
        } => bench::container::run(&bench::container::ContainerOptions {
            runs,
            memory_mib,
            no_vm,
        })?,
        Command::Ctr { runs, hypervisor } => {
            bench::ctr::run(&bench::ctr::CtrOptions { runs, hypervisor })?
        }
        Command::Pod { runs } => bench::pod::run_pod(runs)?,
        Command::Exec { runs } => bench::pod::run_exec(runs)?,
        Command::Density {
            pods,
            budget_mib,
            settle_s,
            idle_window_s,
        } => bench::pod::run_density(
            pods,
            budget_mib,
            Duration::from_secs(settle_s),
            Duration::from_secs(idle_window_s),
        )?,
    };
    println!("{result}");
    Ok(())
}
