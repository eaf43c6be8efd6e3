//! The tc mirror between the CNI interface and the tap: an ingress qdisc on each with a
//! match-all u32 filter whose action redirects every frame to the other's egress.

use std::process::Command;

use super::NetworkError;

/// Most bytes of a command's output or error kept.
const MAX_OUTPUT: usize = 1 << 20;

/// Sets the tap's MTU, brings it up and redirects `iface` ↔ `tap` both ways.
pub fn wire(iface: &str, tap: &str, mtu: u16) -> Result<(), NetworkError> {
    let mtu = mtu.to_string();
    output_of("ip", &["link", "set", "dev", tap, "mtu", &mtu, "up"])?;
    for (from, to) in [(iface, tap), (tap, iface)] {
        output_of("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        output_of(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

/// Takes the pod's addresses (and so its routes) off `iface`: the guest holds them.
pub fn flush_addresses(iface: &str) -> Result<(), NetworkError> {
    output_of("ip", &["addr", "flush", "dev", iface]).map(drop)
}

/// Undoes `wire` (best effort: each step may already be gone).
pub fn unwire(iface: &str, tap: &str) {
    for (program, args) in [
        ("tc", vec!["qdisc", "del", "dev", iface, "ingress"]),
        ("ip", vec!["link", "del", "dev", tap]),
    ] {
        if let Err(e) = output_of(program, &args) {
            tracing::debug!(error = %e, "pod network clean-up step");
        }
    }
}

/// Runs `program args` and returns its standard output; non-zero exit is an error
/// carrying its standard error.
pub fn output_of(program: &str, args: &[&str]) -> Result<Vec<u8>, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(binary(program))
        .args(args)
        .output()
        .map_err(|source| NetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(MAX_OUTPUT)]);
        return Err(NetworkError::Command {
            command,
            stderr: stderr.trim().to_owned(),
        });
    }
    let mut stdout = out.stdout;
    stdout.truncate(MAX_OUTPUT);
    Ok(stdout)
}

/// iproute2's binaries live in /usr/sbin (and /sbin) on Debian; the shim's PATH, set by
/// whoever started containerd, may lack them.
fn binary(program: &str) -> std::path::PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| program.into())
}
