//! The VM's configuration and its validation: everything checked here is checked
//! before crx-vmm touches KVM or creates a socket, and each failure is one line that
//! names the cause and the fix.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::arch::x86_64::layout::{self, MIN_MEMORY_MIB};
use crate::arch::x86_64::mptable;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// No UART at all, and no `console=` on the command line (fastest boot).
    Off,
    /// Raw console bytes appended to a file.
    File(PathBuf),
    /// Each console line as a log record.
    Log,
}

impl FromStr for SerialMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(SerialMode::Off),
            "log" => Ok(SerialMode::Log),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialMode::File(PathBuf::from(path))),
                _ => Err(format!(
                    "`{s}` is not a serial mode: use off, log or file:PATH"
                )),
            },
        }
    }
}

/// The hybrid vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Everything that describes one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Appended to crx-vmm's own kernel arguments.
    pub cmdline_extra: String,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub vsock: Option<VsockConfig>,
    pub serial: SerialMode,
    /// virtio-blk drives, in slot order.
    pub drives: Vec<DriveConfig>,
    /// A virtio-rng device (entropy from the host's getrandom).
    pub rng: bool,
    /// virtio-fs shares served in process, in slot order.
    pub shares: Vec<ShareConfig>,
    /// A virtio-net device on a tap fd the caller opened.
    pub net: Option<NetConfig>,
    /// Control socket (created) through which the host attaches or replaces drive
    /// backings after boot (file descriptors passed with SCM_RIGHTS).
    pub api_socket: Option<PathBuf>,
}

/// One virtio-fs share: `tag=TAG,dir=DIR`. The guest mounts it with
/// `mount -t virtiofs TAG /somewhere`; nothing outside DIR is reachable through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    pub tag: String,
    pub dir: PathBuf,
}

/// Longest virtio-fs tag (the config-space field is 36 bytes, not NUL-terminated).
pub const MAX_FS_TAG_LEN: usize = 36;

impl FromStr for ShareConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut dir) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tag", t)) if !t.is_empty() => tag = Some(t.to_string()),
                Some(("dir", d)) if !d.is_empty() => dir = Some(PathBuf::from(d)),
                _ => return Err(format!("`{part}` in share `{s}`: use tag=TAG,dir=DIR")),
            }
        }
        match (tag, dir) {
            (Some(tag), Some(dir)) if tag.len() <= MAX_FS_TAG_LEN => Ok(ShareConfig { tag, dir }),
            (Some(tag), Some(_)) => Err(format!(
                "share tag `{tag}` is longer than {MAX_FS_TAG_LEN} bytes"
            )),
            _ => Err(format!("share `{s}` needs both tag=TAG and dir=DIR")),
        }
    }
}

/// The virtio-net device: `fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=M]`. The fd is an open tap
/// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) the caller passes to crx-vmm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap_fd: i32,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// MTU when none is given: Ethernet's.
pub const DEFAULT_MTU: u16 = 1500;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=M]";
        let (mut fd, mut mac, mut mtu) = (None, None, DEFAULT_MTU);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("fd", n)) => {
                    fd = Some(
                        n.parse::<i32>()
                            .ok()
                            .filter(|n| *n > 2)
                            .ok_or_else(|| format!("tap fd `{n}` is not a descriptor above 2"))?,
                    )
                }
                Some(("mac", m)) => {
                    let parsed =
                        parse_mac(m).ok_or_else(|| format!("`{m}` is not a MAC address"))?;
                    if parsed[0] & 1 != 0 {
                        return Err(format!("MAC `{m}` is a multicast address"));
                    }
                    mac = Some(parsed);
                }
                Some(("mtu", m)) => {
                    mtu = m
                        .parse::<u16>()
                        .ok()
                        .filter(|m| (68..=65535 - 14).contains(m))
                        .ok_or_else(|| format!("MTU `{m}` is not between 68 and 65521"))?
                }
                _ => return Err(format!("`{part}` in net `{s}`: {usage}")),
            }
        }
        match (fd, mac) {
            (Some(tap_fd), Some(mac)) => Ok(NetConfig { tap_fd, mac, mtu }),
            _ => Err(format!("net `{s}` needs fd= and mac=: {usage}")),
        }
    }
}

/// One virtio-blk drive: `path=FILE[,ro][,serial=ID]`, or `empty[,ro][,serial=ID]` for a
/// slot whose backing is attached after boot (a CSI block volume).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub serial: String,
}

impl FromStr for DriveConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut drive = DriveConfig {
            path: None,
            read_only: false,
            serial: String::new(),
        };
        let mut empty = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => drive.path = Some(PathBuf::from(p)),
                Some(("serial", id)) => drive.serial = id.to_string(),
                None if part == "ro" => drive.read_only = true,
                None if part == "empty" => empty = true,
                _ => {
                    return Err(format!(
                        "`{part}` in drive `{s}`: use path=FILE[,ro][,serial=ID] or empty[,ro][,serial=ID]"
                    ))
                }
            }
        }
        if empty == drive.path.is_some() {
            return Err(format!(
                "drive `{s}` needs exactly one of path=FILE or empty"
            ));
        }
        Ok(drive)
    }
}

/// How a kernel image announces itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF file (a `vmlinux`); it still needs a PVH note to boot.
    Elf,
    /// A bzImage ("HdrS" at offset 0x202).
    BzImage,
}

/// Longest Unix socket path (`sun_path` less its NUL), leaving room for `_<port>`.
const MAX_SOCKET_PATH: usize = 107 - 11;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel {} does not exist: pass --kernel with the vmlinux (or bzImage) the kernel build produced", .0.display())]
    KernelMissing(PathBuf),
    #[error("cannot read kernel {}: check its permissions", .path.display())]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {} is neither an ELF vmlinux nor a bzImage: pass the vmlinux (PVH) or bzImage the kernel build produced", .0.display())]
    KernelFormat(PathBuf),
    #[error("initramfs {} does not exist: pass --initramfs with the cpio the rootfs build produced", .0.display())]
    InitramfsMissing(PathBuf),
    #[error("cannot read initramfs {}: check its permissions", .path.display())]
    InitramfsUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {} ({size_mib} MiB) does not fit in {memory_mib} MiB of guest memory with the kernel: raise --memory-mib or shrink the initramfs", .path.display())]
    InitramfsTooBig {
        path: PathBuf,
        size_mib: u64,
        memory_mib: u64,
    },
    #[error("--memory-mib {0} is too small: crx-vmm needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("--memory-mib {requested} is more than this host's {host} MiB of RAM: ask for less")]
    MemoryAboveHost { requested: u64, host: u64 },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than the {max} this host's KVM and the MP table allow: ask for fewer")]
    TooManyVcpus { requested: u64, max: u64 },
    #[error("--vsock-cid {0} is reserved: use a CID from 3 to 4294967294")]
    VsockCid(u64),
    #[error("vsock socket {} already exists (another VM's, or stale): remove it or choose another path", .0.display())]
    VsockPathExists(PathBuf),
    #[error("the directory of vsock socket {} does not exist: create it first", .0.display())]
    VsockNoDirectory(PathBuf),
    #[error("vsock socket path {} is longer than {MAX_SOCKET_PATH} bytes (Unix socket limit, with room for `_<port>`): use a shorter path", .0.display())]
    VsockPathTooLong(PathBuf),
    #[error("the serial log file's directory {} does not exist: create it first", .0.display())]
    SerialNoDirectory(PathBuf),
    #[error("the kernel command line is {len} bytes; the guest kernel takes at most {max}: shorten --cmdline")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--net: the tap fd is unusable")]
    NetTap(#[source] crate::devices::virtio::net::NetError),
}

/// Reads the first bytes of the kernel to tell an ELF from a bzImage.
pub fn sniff_kernel(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |source: std::io::Error| match source.kind() {
        ErrorKind::NotFound => ConfigError::KernelMissing(path.to_owned()),
        _ => ConfigError::KernelUnreadable {
            path: path.to_owned(),
            source,
        },
    };
    let mut file = File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(ConfigError::KernelFormat(path.to_owned()));
    }
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut hdrs = [0u8; 4];
    let is_bzimage = file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut hdrs).is_ok()
        && hdrs == *b"HdrS";
    if is_bzimage {
        Ok(KernelFormat::BzImage)
    } else {
        Err(ConfigError::KernelFormat(path.to_owned()))
    }
}

/// Host RAM in MiB, from /proc/meminfo.
pub fn host_ram_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Room the kernel, its early allocations and the boot structures need below the
/// initramfs; an initramfs bigger than low RAM minus this cannot boot.
const KERNEL_RESERVE_MIB: u64 = 32;

impl VmConfig {
    /// Checks the configuration against the files it names and the host's RAM.
    /// KVM-dependent limits (vCPU count) are checked by [`check_vcpus`].
    pub fn validate(&self, host_ram_mib: Option<u64>) -> Result<KernelFormat, ConfigError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(host) = host_ram_mib {
            if self.memory_mib > host {
                return Err(ConfigError::MemoryAboveHost {
                    requested: self.memory_mib,
                    host,
                });
            }
        }
        check_vcpus(self.vcpus, usize::MAX)?;
        let format = sniff_kernel(&self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            let meta = File::open(initramfs)
                .and_then(|f| f.metadata())
                .map_err(|source| match source.kind() {
                    ErrorKind::NotFound => ConfigError::InitramfsMissing(initramfs.clone()),
                    _ => ConfigError::InitramfsUnreadable {
                        path: initramfs.clone(),
                        source,
                    },
                })?;
            let size_mib = meta.len().div_ceil(1 << 20);
            let room_mib =
                (layout::low_ram_end(self.memory_mib) >> 20).saturating_sub(KERNEL_RESERVE_MIB);
            if size_mib > room_mib {
                return Err(ConfigError::InitramfsTooBig {
                    path: initramfs.clone(),
                    size_mib,
                    memory_mib: self.memory_mib,
                });
            }
        }
        if let Some(net) = &self.net {
            crate::devices::virtio::net::check_inherited_tap(net.tap_fd)
                .map_err(ConfigError::NetTap)?;
        }
        if let Some(vsock) = &self.vsock {
            validate_vsock(vsock)?;
        }
        if let SerialMode::File(path) = &self.serial {
            let dir = parent_dir(path);
            if !dir.is_dir() {
                return Err(ConfigError::SerialNoDirectory(dir.to_owned()));
            }
        }
        Ok(format)
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn validate_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    if !(3..=0xffff_fffe).contains(&v.guest_cid) {
        return Err(ConfigError::VsockCid(v.guest_cid));
    }
    if v.uds_path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ConfigError::VsockPathTooLong(v.uds_path.clone()));
    }
    if v.uds_path.symlink_metadata().is_ok() {
        return Err(ConfigError::VsockPathExists(v.uds_path.clone()));
    }
    if !parent_dir(&v.uds_path).is_dir() {
        return Err(ConfigError::VsockNoDirectory(v.uds_path.clone()));
    }
    Ok(())
}

/// Checks the vCPU count against KVM's limit and the MP table's.
pub fn check_vcpus(vcpus: u64, kvm_max: usize) -> Result<u8, ConfigError> {
    let max = (kvm_max as u64).min(u64::from(mptable::MAX_CPUS));
    match vcpus {
        0 => Err(ConfigError::NoVcpus),
        n if n > max => Err(ConfigError::TooManyVcpus { requested: n, max }),
        n => Ok(n as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crx-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline_extra: String::new(),
            vcpus: 1,
            memory_mib: 128,
            vsock: None,
            serial: SerialMode::Off,
            drives: Vec::new(),
            rng: false,
            shares: Vec::new(),
            net: None,
            api_socket: None,
        }
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!("off".parse(), Ok(SerialMode::Off));
        assert_eq!("log".parse(), Ok(SerialMode::Log));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialMode::File("/tmp/x".into())));
        assert!("file:".parse::<SerialMode>().is_err());
        assert!("tty".parse::<SerialMode>().is_err());
    }

    #[test]
    fn kernel_sniffing_tells_elf_bzimage_and_junk_apart() {
        let dir = tmp("sniff");
        let elf = dir.join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = dir.join("bzImage");
        std::fs::write(&bzimage, &bz).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert_eq!(sniff_kernel(&elf).unwrap(), KernelFormat::Elf);
        assert_eq!(sniff_kernel(&bzimage).unwrap(), KernelFormat::BzImage);
        assert!(matches!(
            sniff_kernel(&junk),
            Err(ConfigError::KernelFormat(_))
        ));
        assert!(matches!(
            sniff_kernel(&dir),
            Err(ConfigError::KernelFormat(_))
        ));
        assert!(matches!(
            sniff_kernel(&dir.join("none")),
            Err(ConfigError::KernelMissing(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_vcpus_initramfs_and_vsock_are_bounded() {
        let dir = tmp("bounds");
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let mut c = config(kernel);
        c.memory_mib = 63;
        assert!(matches!(
            c.validate(Some(1024)),
            Err(ConfigError::MemoryTooSmall(63))
        ));
        c.memory_mib = 2048;
        assert!(matches!(
            c.validate(Some(1024)),
            Err(ConfigError::MemoryAboveHost { .. })
        ));
        c.memory_mib = 64;
        c.vcpus = 0;
        assert!(matches!(c.validate(Some(1024)), Err(ConfigError::NoVcpus)));
        c.vcpus = 1;
        let big = dir.join("initrd");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        c.initramfs = Some(big);
        let err = c.validate(Some(1024)).unwrap_err();
        assert!(err.to_string().contains("raise --memory-mib"), "{err}");
        c.memory_mib = 128;
        assert_eq!(c.validate(Some(1024)).unwrap(), KernelFormat::Elf);

        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: dir.join("v.sock"),
        });
        assert!(matches!(c.validate(None), Err(ConfigError::VsockCid(2))));
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vmlinux"),
        });
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::VsockPathExists(_))
        ));
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("nodir/v.sock"),
        });
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::VsockNoDirectory(_))
        ));
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        });
        assert!(c.validate(None).is_ok());

        assert!(matches!(check_vcpus(0, 288), Err(ConfigError::NoVcpus)));
        assert_eq!(check_vcpus(254, 288).unwrap(), 254);
        assert!(matches!(
            check_vcpus(255, 288),
            Err(ConfigError::TooManyVcpus { max: 254, .. })
        ));
        assert!(matches!(
            check_vcpus(9, 8),
            Err(ConfigError::TooManyVcpus { max: 8, .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn drive_specs_parse_and_bad_ones_say_how_to_fix_them() {
        let d: DriveConfig = "path=/var/lib/vol.img,ro,serial=vol0".parse().unwrap();
        assert_eq!(
            d,
            DriveConfig {
                path: Some("/var/lib/vol.img".into()),
                read_only: true,
                serial: "vol0".into()
            }
        );
        let e: DriveConfig = "empty".parse().unwrap();
        assert_eq!((e.path, e.read_only), (None, false));
        for bad in ["", "ro", "path=", "empty,path=/x", "path=/x,rw", "size=3"] {
            let err = bad.parse::<DriveConfig>().unwrap_err();
            assert!(err.contains("path=FILE"), "{bad}: {err}");
        }
    }
}
