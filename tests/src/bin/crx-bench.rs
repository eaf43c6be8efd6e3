//! crx-bench: crx's benchmark programs. Each subcommand measures side by side in one
//! run, prints its figures, and prints one JSON object as its last line.

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
    };
    println!("{result}");
    Ok(())
}
