//! The shim's configuration, `/etc/crx/config.toml`: which VMM runs pods, the guest
//! kernel and initramfs, the default VM size, the log level, the jail switch.
//!
//! Every key is optional: the defaults name the install locations (`/usr/share/crx/`,
//! `/usr/libexec/crx/`), so a host where crx is installed needs no file at all. Which
//! file is read: containerd's runtime option `ConfigPath` if set, else
//! `$CRX_SHIM_CONFIG` (for tests), else `/etc/crx/config.toml` (skipped when absent).
//! Unknown keys and bad values are errors that name the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::vm::{Hypervisor, Seccomp};

/// The system-wide configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/crx/config.toml";
/// Environment variable naming another configuration file (tests, experiments).
pub const CONFIG_ENV: &str = "CRX_SHIM_CONFIG";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read crx config {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("crx config {path:?} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The parsed configuration, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimConfig {
    /// The file it came from (`None`: built-in defaults).
    pub source: Option<PathBuf>,
    pub hypervisor: Hypervisor,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub crx_vmm: PathBuf,
    pub qemu: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// A `tracing` filter (`info`, `debug`, `containerd_shim_crx_v2=debug`, ...).
    pub log_level: String,
    /// Run the pod's crx-vmm processes (crx-vmm itself, or QEMU's vhost-user back
    /// ends) in crx-vmm's jail: own mount namespace and root, capabilities dropped.
    /// Off only for debugging.
    pub jail: bool,
    /// crx-vmm's seccomp filters: kill (default), log (debugging), off.
    pub seccomp: Seccomp,
    /// How long a VM may take from spawn to the agent's first answer.
    pub agent_timeout: Duration,
    /// Keep the guest console in `<run dir>/console.log` (debugging; costs boot time).
    pub guest_console: bool,
    /// Extra guest kernel command line.
    pub kernel_params: String,
    /// Empty drive slots each pod VM gets for containers' host block devices (CRI
    /// `devices`, `volumeDevices`). Each costs a pod a virtio-blk device, and on QEMU
    /// one `crx-vmm vhost-user-blk` process.
    pub block_slots: u8,
}

/// Most drive slots a pod may be configured with.
pub const MAX_BLOCK_SLOTS: u8 = 8;

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            source: None,
            hypervisor: Hypervisor::Auto,
            kernel: "/usr/share/crx/vmlinux".into(),
            initramfs: "/usr/share/crx/initramfs.cpio".into(),
            crx_vmm: "/usr/libexec/crx/crx-vmm".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            vcpus: 1,
            memory_mib: 256,
            log_level: "info".into(),
            jail: true,
            seccomp: Seccomp::Kill,
            agent_timeout: Duration::from_secs(60),
            guest_console: false,
            kernel_params: String::new(),
            block_slots: 2,
        }
    }
}

/// The file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hypervisor: Option<String>,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    crx_vmm: Option<PathBuf>,
    qemu: Option<PathBuf>,
    vcpus: Option<u8>,
    memory_mib: Option<u32>,
    log_level: Option<String>,
    jail: Option<bool>,
    seccomp: Option<String>,
    agent_timeout_secs: Option<u64>,
    guest_console: Option<bool>,
    kernel_params: Option<String>,
    block_slots: Option<u8>,
}

impl ShimConfig {
    /// Parses the text of a config file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut c = ShimConfig {
            source: Some(path.to_path_buf()),
            ..ShimConfig::default()
        };
        if let Some(h) = raw.hypervisor {
            c.hypervisor = h
                .parse()
                .map_err(|e: String| bad(format!("hypervisor: {e}")))?;
        }
        for (slot, value, key) in [
            (&mut c.kernel, raw.kernel, "kernel"),
            (&mut c.initramfs, raw.initramfs, "initramfs"),
            (&mut c.crx_vmm, raw.crx_vmm, "crx_vmm"),
            (&mut c.qemu, raw.qemu, "qemu"),
        ] {
            if let Some(v) = value {
                if !v.is_absolute() {
                    return Err(bad(format!("{key}: {v:?} is not an absolute path")));
                }
                *slot = v;
            }
        }
        if let Some(v) = raw.vcpus {
            if v == 0 {
                return Err(bad("vcpus: must be at least 1".into()));
            }
            c.vcpus = v;
        }
        if let Some(m) = raw.memory_mib {
            if m < crate::vm::MIN_MEMORY_MIB {
                return Err(bad(format!(
                    "memory_mib: {m} is below the {} MiB a guest needs",
                    crate::vm::MIN_MEMORY_MIB
                )));
            }
            c.memory_mib = m;
        }
        if let Some(l) = raw.log_level {
            c.log_level = l;
        }
        if let Some(j) = raw.jail {
            c.jail = j;
        }
        if let Some(m) = raw.seccomp {
            c.seccomp = m
                .parse()
                .map_err(|e: String| bad(format!("seccomp: {e}")))?;
        }
        if let Some(t) = raw.agent_timeout_secs {
            if t == 0 || t > 3600 {
                return Err(bad(format!(
                    "agent_timeout_secs: {t} is not between 1 and 3600"
                )));
            }
            c.agent_timeout = Duration::from_secs(t);
        }
        if let Some(g) = raw.guest_console {
            c.guest_console = g;
        }
        if let Some(k) = raw.kernel_params {
            if k.contains('\n') {
                return Err(bad("kernel_params: must be one line".into()));
            }
            c.kernel_params = k;
        }
        if let Some(n) = raw.block_slots {
            if n > MAX_BLOCK_SLOTS {
                return Err(bad(format!(
                    "block_slots: {n} is more than {MAX_BLOCK_SLOTS}"
                )));
            }
            c.block_slots = n;
        }
        Ok(c)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The configuration for a pod: `explicit` (containerd's `ConfigPath`) if given,
    /// else `$CRX_SHIM_CONFIG`, else `/etc/crx/config.toml` if it exists, else the
    /// defaults. A file that is named explicitly must exist.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(p) = explicit {
            return Self::load(p);
        }
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Self::load(Path::new(&p));
        }
        let default = Path::new(DEFAULT_CONFIG_PATH);
        match Self::load(default) {
            Err(ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(ShimConfig::default())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ShimConfig, ConfigError> {
        ShimConfig::parse(text, Path::new("/etc/crx/config.toml"))
    }

    #[test]
    fn an_empty_file_gives_the_install_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.hypervisor, Hypervisor::Auto);
        assert_eq!(c.kernel, Path::new("/usr/share/crx/vmlinux"));
        assert_eq!(c.initramfs, Path::new("/usr/share/crx/initramfs.cpio"));
        assert!(c.jail);
        assert_eq!(c.source.as_deref(), Some(Path::new("/etc/crx/config.toml")));
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
            hypervisor = "qemu"
            kernel = "/k/vmlinux"
            initramfs = "/k/initrd"
            crx_vmm = "/b/crx-vmm"
            qemu = "/b/qemu"
            vcpus = 2
            memory_mib = 512
            log_level = "debug"
            jail = false
            seccomp = "log"
            agent_timeout_secs = 90
            guest_console = true
            kernel_params = "loglevel=7"
            block_slots = 0
            "#,
        )
        .unwrap();
        assert_eq!(c.hypervisor, Hypervisor::Qemu);
        assert_eq!(c.kernel, Path::new("/k/vmlinux"));
        assert_eq!(c.initramfs, Path::new("/k/initrd"));
        assert_eq!(c.crx_vmm, Path::new("/b/crx-vmm"));
        assert_eq!(c.qemu, Path::new("/b/qemu"));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.log_level, "debug");
        assert!(!c.jail && c.guest_console);
        assert_eq!(c.seccomp, Seccomp::Log);
        assert_eq!(c.agent_timeout, Duration::from_secs(90));
        assert_eq!(c.kernel_params, "loglevel=7");
        assert_eq!(c.block_slots, 0);
    }

    #[test]
    fn bad_values_name_the_file_and_the_key() {
        for (text, needle) in [
            ("hypervisor = \"kvm\"", "hypervisor"),
            ("vcpus = 0", "vcpus"),
            ("memory_mib = 8", "memory_mib"),
            ("kernel = \"relative/vmlinux\"", "kernel"),
            ("colour = \"blue\"", "colour"),
            ("vcpus = \"two\"", "vcpus"),
            ("agent_timeout_secs = 0", "agent_timeout_secs"),
            ("seccomp = \"strict\"", "seccomp"),
            ("block_slots = 9", "block_slots"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(
                e.contains("/etc/crx/config.toml") && e.contains(needle),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn the_shipped_example_states_the_defaults() {
        let example = include_str!("../config.toml.example");
        let c = parse(example).unwrap();
        let defaults = ShimConfig {
            source: c.source.clone(),
            ..ShimConfig::default()
        };
        assert_eq!(c, defaults);
    }

    #[test]
    fn an_explicit_file_must_exist() {
        let e = ShimConfig::resolve(Some(Path::new("/nonexistent/crx.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
