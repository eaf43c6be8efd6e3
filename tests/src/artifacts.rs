//! Where the tests and benchmarks find what they boot: the guest kernel, the guest
//! initramfs, and the static crx binaries. `scripts/test.sh` builds them all and exports
//! their paths; run on their own, the tests look in the usual build locations and, when
//! something is missing, fail with the command that builds it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("CRX_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/crx".into())
}

const BUILD_HINT: &str =
    "build everything with `sudo scripts/test.sh` (or `scripts/build-guest.sh`)";

fn from_env_or(
    var: &str,
    candidates: impl IntoIterator<Item = PathBuf>,
    what: &str,
) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{var}={} does not name a file ({what})", p.display());
        }
        return Ok(p);
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no {what} found (set {var}, or {BUILD_HINT})"))
}

/// The guest kernel (`vmlinux`, PVH entry): `$CRX_KERNEL`, else the newest one in the
/// kernel cache.
pub fn guest_kernel() -> Result<PathBuf> {
    let mut cached: Vec<(std::time::SystemTime, PathBuf)> =
        std::fs::read_dir(cache_dir().join("kernel"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("vmlinux"))
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
    cached.sort();
    from_env_or(
        "CRX_KERNEL",
        cached.into_iter().rev().map(|(_, p)| p),
        "guest kernel (vmlinux)",
    )
}

/// The guest initramfs with `crx-agent` as `/init`.
pub fn guest_initramfs() -> Result<PathBuf> {
    from_env_or(
        "CRX_INITRAMFS",
        [workspace_root().join("target/guest/initramfs.cpio")],
        "guest initramfs (rootfs/build.sh output)",
    )
}

/// A static (musl) release binary of the workspace, e.g. `crx-vmm`, `crx-probe`.
pub fn static_binary(name: &str) -> Result<PathBuf> {
    let var = format!("CRX_BIN_{}", name.to_uppercase().replace('-', "_"));
    from_env_or(
        &var,
        [workspace_root()
            .join("target/x86_64-unknown-linux-musl/release")
            .join(name)],
        &format!("static {name} binary"),
    )
}

/// `qemu-system-x86_64` from Debian's `qemu-system-x86`.
pub fn qemu_binary() -> Result<PathBuf> {
    from_env_or(
        "CRX_QEMU",
        [PathBuf::from("/usr/bin/qemu-system-x86_64")],
        "qemu-system-x86_64 (apt-get install qemu-system-x86)",
    )
}
