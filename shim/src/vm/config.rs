//! What a pod VM is made of, as the shim derives it from the sandbox spec.

use std::path::{Path, PathBuf};

use super::VmError;

/// Where the guest's serial console goes. Off by default: a console costs boot time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    #[default]
    Off,
    File(PathBuf),
}

/// One pod VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Short name for process titles and logs (the sandbox id).
    pub name: String,
    /// Private directory of this VM's sockets and logs (e.g. `/run/crx/<sandbox>`),
    /// created if missing.
    pub run_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to the backend's own kernel command line (agent options).
    pub kernel_cmdline: String,
    pub serial: SerialOutput,
    /// The `crx-vmm` binary: the VMM itself, and the vhost-user back ends for QEMU.
    pub crx_vmm_binary: PathBuf,
    pub qemu_binary: PathBuf,
    /// The pod's devices besides the agent's vsock.
    pub devices: VmDevices,
}

/// The devices a pod VM gets besides vsock. Both backends give the guest the same
/// devices in the same order, so the guest sees the same VM whichever VMM runs it.
#[derive(Clone, Debug, Default)]
pub struct VmDevices {
    /// virtio-fs shares, served by crx's own back end (in crx-vmm, or as a
    /// vhost-user-fs process for QEMU).
    pub shares: Vec<SharedDir>,
    /// virtio-blk drives, in slot order (the guest sees /dev/vda, /dev/vdb, ...).
    pub drives: Vec<Drive>,
    /// The pod's NIC.
    pub net: Option<NetDevice>,
    /// A virtio-rng device.
    pub rng: bool,
}

/// A host directory the guest mounts with `mount -t virtiofs <tag> <dir>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDir {
    pub tag: String,
    pub host_dir: PathBuf,
}

/// A virtio-blk drive; `path: None` is an empty slot filled after boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    pub path: Option<PathBuf>,
    pub read_only: bool,
    /// Serial number the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    pub serial: String,
}

/// How the host fills one empty drive slot while the VM runs: an API socket speaking
/// crx-vmm's `attach_drive`/`detach_drive` (`crx_vmm::api::client`) and the drive's
/// index behind it. crx-vmm serves every slot on one socket (index = drive index);
/// for QEMU each slot is its own `crx-vmm vhost-user-blk` process (index 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveSlot {
    pub api_socket: PathBuf,
    pub index: usize,
    /// The serial the guest finds the drive by.
    pub serial: String,
}

/// Serial of the pod's `n`-th empty slot (for host block devices of containers).
pub fn slot_serial(n: usize) -> String {
    format!("crx-slot-{n}")
}

/// The pod's NIC: an open tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, created by the
/// caller in the pod's network namespace), and the MAC and MTU the guest NIC gets.
#[derive(Clone, Debug)]
pub struct NetDevice {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// Smallest guest that boots our kernel and agent with room for a container.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The guest CID the agent listens on. Each VM has its own vsock device, so every pod
/// can use the same one.
pub const GUEST_CID: u64 = 3;

impl VmConfig {
    /// The hybrid-vsock socket of this VM.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.vsock")
    }

    /// The vhost-user socket of the back end serving share `index` to QEMU.
    pub fn fs_socket(&self, index: usize) -> PathBuf {
        self.run_dir.join(format!("fs-{index}.sock"))
    }

    /// crx-vmm's API socket (created when the VM has an empty drive slot).
    pub fn api_socket(&self) -> PathBuf {
        self.run_dir.join("api.sock")
    }

    /// The vhost-user socket of the QEMU back end serving drive `index` (an empty
    /// slot), and that back end's API socket.
    pub fn slot_sockets(&self, index: usize) -> (PathBuf, PathBuf) {
        (
            self.run_dir.join(format!("blk-{index}.sock")),
            self.run_dir.join(format!("blk-{index}-api.sock")),
        )
    }

    /// Checks what can be checked before any process starts, so a bad config fails
    /// with its cause rather than as a VMM that died.
    pub fn validate(&self) -> Result<(), VmError> {
        readable_file("guest kernel", &self.kernel)?;
        readable_file("guest initramfs", &self.initramfs)?;
        executable("crx-vmm binary", &self.crx_vmm_binary)?;
        if self.vcpus == 0 {
            return Err(VmError::InvalidConfig("a VM needs at least 1 vCPU".into()));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(VmError::InvalidConfig(format!(
                "{} MiB of guest memory is below the {MIN_MEMORY_MIB} MiB the guest needs",
                self.memory_mib
            )));
        }
        if self.kernel_cmdline.contains('\n') {
            return Err(VmError::InvalidConfig(
                "the kernel command line must be one line".into(),
            ));
        }
        self.devices.validate()
    }

    /// Creates the run directory (mode 0700) and clears sockets a dead VM left there.
    pub fn prepare_run_dir(&self) -> Result<(), VmError> {
        use std::os::unix::fs::DirBuilderExt;
        let err = |source| VmError::RunDir {
            path: self.run_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.run_dir)
            .map_err(err)?;
        let fs_sockets = (0..self.devices.shares.len()).map(|i| self.fs_socket(i));
        let own_sockets = [
            self.agent_socket(),
            self.run_dir.join("vhost-vsock.sock"),
            self.api_socket(),
        ];
        let slot_sockets = (0..self.devices.drives.len()).flat_map(|i| {
            let (vhost, api) = self.slot_sockets(i);
            [vhost, api]
        });
        for stale in own_sockets
            .into_iter()
            .chain(fs_sockets)
            .chain(slot_sockets)
        {
            match std::fs::remove_file(&stale) {
                Ok(()) => {
                    tracing::warn!(path = ?stale, "removed a socket a previous VM left behind")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    }
}

/// Longest virtio-fs tag: the config-space field is 36 bytes.
pub const MAX_FS_TAG_LEN: usize = 36;
/// Longest virtio-blk serial: the ID the guest reads is 20 bytes.
pub const MAX_DRIVE_SERIAL_LEN: usize = 20;

impl VmDevices {
    /// `count` empty drive slots with the serials [`slot_serial`] gives.
    pub fn empty_slots(count: usize) -> Vec<Drive> {
        (0..count)
            .map(|n| Drive {
                path: None,
                read_only: false,
                serial: slot_serial(n),
            })
            .collect()
    }

    /// Whether any drive is an empty slot (then the VMM needs an API socket).
    pub fn has_empty_slots(&self) -> bool {
        self.drives.iter().any(|d| d.path.is_none())
    }

    /// Checks the devices before any process starts. Values end up inside
    /// comma-separated VMM options (`tag=..,dir=..`), so a comma in one is refused
    /// rather than escaped differently for each VMM.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::InvalidConfig(m));
        for (i, share) in self.shares.iter().enumerate() {
            let tag = &share.tag;
            if tag.is_empty() || tag.len() > MAX_FS_TAG_LEN || !option_safe(tag) {
                return bad(format!(
                    "share {i}: tag {tag:?} must be 1 to {MAX_FS_TAG_LEN} bytes without ',', '=' or control characters"
                ));
            }
            if self.shares[..i].iter().any(|s| &s.tag == tag) {
                return bad(format!("share {i}: tag {tag:?} is used twice"));
            }
            path_option_safe("share directory", &share.host_dir)?;
            if !share.host_dir.is_dir() {
                return Err(VmError::BadPath {
                    what: "share directory",
                    path: share.host_dir.clone(),
                    reason: "not a directory".into(),
                });
            }
        }
        for (i, drive) in self.drives.iter().enumerate() {
            if drive.serial.len() > MAX_DRIVE_SERIAL_LEN || !option_safe(&drive.serial) {
                return bad(format!(
                    "drive {i}: serial {:?} must be at most {MAX_DRIVE_SERIAL_LEN} bytes without ',', '=' or control characters",
                    drive.serial
                ));
            }
            if let Some(path) = &drive.path {
                path_option_safe("drive backing", path)?;
                if !is_block_device(path) {
                    readable_file("drive backing (a file or block device)", path)?;
                }
            }
        }
        if let Some(net) = &self.net {
            if net.mac[0] & 1 != 0 || net.mac == [0; 6] {
                return bad(format!(
                    "NIC MAC {} is multicast or zero",
                    format_mac(&net.mac)
                ));
            }
            if !(68..=65521).contains(&net.mtu) {
                return bad(format!("NIC MTU {} is not between 68 and 65521", net.mtu));
            }
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn option_safe(value: &str) -> bool {
    !value.contains([',', '=']) && !value.chars().any(char::is_control)
}

fn path_option_safe(what: &'static str, path: &Path) -> Result<(), VmError> {
    match path.to_str() {
        Some(p) if path.is_absolute() && !p.contains(',') && !p.chars().any(char::is_control) => {
            Ok(())
        }
        _ => Err(VmError::BadPath {
            what,
            path: path.to_path_buf(),
            reason: "must be an absolute UTF-8 path without ',' or control characters".into(),
        }),
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

fn readable_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    let bad = |reason: String| VmError::BadPath {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

pub(super) fn executable(what: &'static str, path: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |reason: String| VmError::BadPath {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not an executable file".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str, dir: &str) -> SharedDir {
        SharedDir {
            tag: tag.into(),
            host_dir: dir.into(),
        }
    }

    fn drive(path: Option<&str>, serial: &str) -> Drive {
        Drive {
            path: path.map(PathBuf::from),
            read_only: false,
            serial: serial.into(),
        }
    }

    fn refused(devices: VmDevices, why: &str) {
        match devices.validate() {
            Err(e) => assert!(e.to_string().contains(why), "{e} (wanted {why:?})"),
            Ok(()) => panic!("accepted a config with {why}"),
        }
    }

    #[test]
    fn devices_that_cannot_work_are_refused_before_any_process_starts() {
        let image =
            std::env::temp_dir().join(format!("crx-config-test-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        let ok = VmDevices {
            shares: vec![share("pod", "/tmp")],
            drives: vec![drive(image.to_str(), "vol-1"), drive(None, "")],
            net: None,
            rng: true,
        };
        ok.validate().unwrap();

        let with = |f: &dyn Fn(&mut VmDevices)| {
            let mut d = ok.clone();
            f(&mut d);
            d
        };
        refused(with(&|d| d.shares[0].tag = "a,b".into()), "tag");
        refused(with(&|d| d.shares[0].tag = "t".repeat(37)), "tag");
        refused(with(&|d| d.shares.push(share("pod", "/tmp"))), "used twice");
        refused(
            with(&|d| d.shares[0].host_dir = "/no/such/dir".into()),
            "not a directory",
        );
        refused(
            with(&|d| d.shares[0].host_dir = "/tmp/a,b".into()),
            "without ','",
        );
        refused(
            with(&|d| d.shares[0].host_dir = "relative".into()),
            "absolute",
        );
        refused(with(&|d| d.drives[0].serial = "s".repeat(21)), "serial");
        refused(with(&|d| d.drives[0].serial = "a=b".into()), "serial");
        refused(
            with(&|d| d.drives[0].path = Some("/no/such.img".into())),
            "drive backing",
        );
        refused(
            with(&|d| d.drives[0].path = Some("/tmp".into())),
            "not a regular file",
        );

        let tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let nic = |mac: [u8; 6], mtu: u16| NetDevice {
            tap: std::sync::Arc::new(tap.try_clone().unwrap()),
            mac,
            mtu,
        };
        with(&|d| d.net = Some(nic([2, 0, 0, 0, 0, 1], 1500)))
            .validate()
            .unwrap();
        refused(
            with(&|d| d.net = Some(nic([1, 0, 0, 0, 0, 1], 1500))),
            "multicast",
        );
        refused(with(&|d| d.net = Some(nic([2, 0, 0, 0, 0, 1], 67))), "MTU");
        let _ = std::fs::remove_file(&image);
    }
}
