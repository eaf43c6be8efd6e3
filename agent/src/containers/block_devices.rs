//! Host block devices given to a container (CRI `devices`, Kubernetes `volumeDevices`)
//! through the pod VM's drive slots. The host attaches its device to an empty slot and
//! names the slot's serial; the container's spec still carries the host's major:minor,
//! which mean another device (or none) in this kernel. Here the drive is waited for and
//! the spec's `linux.devices` entry and its cgroup rules are rewritten to the drive's
//! guest numbers, so libcontainer makes the container's node for the right disk.
//!
//! The guest's page cache of a slot outlives an attachment: [`flush_and_forget`] writes
//! back what the container left dirty and drops the cache before the host detaches the
//! slot, and again before a new attachment is handed out, so no container reads or
//! writes through pages of another's disk.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crx_protocols::v1::container::ContainerBlockDevice;
use serde_json::Value;
use tokio::time::Instant;

use crate::storage::block::BlockPaths;
use crate::storage::StorageError;

/// Most block devices per container (container.proto).
pub const MAX_BLOCK_DEVICES: usize = 16;
/// Longest drive serial (the virtio-blk ID is 20 bytes).
const MAX_SERIAL_LEN: usize = 20;
/// Longest container path accepted.
const MAX_PATH_LEN: usize = 4096;

/// Why a container's block devices cannot be given to it.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("{0} block devices; the limit is {MAX_BLOCK_DEVICES}")]
    TooMany(usize),
    #[error("block device {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("block device {path}: drive {serial:?}")]
    Drive {
        path: String,
        serial: String,
        #[source]
        source: StorageError,
    },
    #[error("block device {path}: cannot inspect its drive {}", .node.display())]
    Inspect {
        path: String,
        node: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the OCI spec is not valid JSON")]
    Spec(#[source] serde_json::Error),
}

/// A drive found for one container device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestDisk {
    pub container_path: String,
    /// The drive's node in the guest's /dev.
    pub node: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// Checks the request's list before anything waits: bounded, absolute paths, serials
/// a drive can have, no path twice.
pub fn validate(wanted: &[ContainerBlockDevice]) -> Result<(), BlockDeviceError> {
    if wanted.len() > MAX_BLOCK_DEVICES {
        return Err(BlockDeviceError::TooMany(wanted.len()));
    }
    let mut seen = HashSet::new();
    for w in wanted {
        let invalid = |reason: &str| BlockDeviceError::Invalid {
            path: w.container_path.chars().take(256).collect(),
            reason: reason.to_owned(),
        };
        if !w.container_path.starts_with('/') || w.container_path.len() > MAX_PATH_LEN {
            return Err(invalid("the container path must be absolute"));
        }
        if w.serial.is_empty()
            || w.serial.len() > MAX_SERIAL_LEN
            || w.serial.chars().any(char::is_control)
        {
            return Err(invalid("the drive serial must be 1 to 20 printable bytes"));
        }
        if !seen.insert(w.container_path.as_str()) {
            return Err(invalid("named twice"));
        }
    }
    Ok(())
}

/// Waits (until `deadline`) for each device's drive to have a medium and returns its
/// guest numbers. Each drive's cache is dropped first: the slot may have served
/// another disk before.
pub async fn find(
    paths: &BlockPaths,
    wanted: &[ContainerBlockDevice],
    deadline: Instant,
) -> Result<Vec<GuestDisk>, BlockDeviceError> {
    validate(wanted)?;
    let mut disks = Vec::with_capacity(wanted.len());
    for w in wanted {
        let node = paths
            .wait_for(&w.serial, deadline)
            .await
            .map_err(|source| BlockDeviceError::Drive {
                path: w.container_path.clone(),
                serial: w.serial.clone(),
                source,
            })?;
        let inspect = |source| BlockDeviceError::Inspect {
            path: w.container_path.clone(),
            node: node.clone(),
            source,
        };
        let meta = std::fs::metadata(&node).map_err(inspect)?;
        if !meta.file_type().is_block_device() {
            return Err(inspect(std::io::Error::other("not a block device")));
        }
        let rdev = meta.rdev();
        if let Err(e) = flush_and_forget(&node) {
            tracing::warn!(node = %node.display(), error = %e, "cannot drop a reused drive's cache");
        }
        disks.push(GuestDisk {
            container_path: w.container_path.clone(),
            node,
            major: nix::sys::stat::major(rdev),
            minor: nix::sys::stat::minor(rdev),
        });
    }
    Ok(disks)
}

/// Writes back the drive's dirty pages and drops its cache (BLKFLSBUF).
pub fn flush_and_forget(node: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(node)?;
    // _IO(0x12, 97): sync the block device, then invalidate its cached pages.
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument; the fd is open and owned by `file` for the
    // whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF as _, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `raw` with each disk's `linux.devices` entry (type "b", same path) and every
/// `linux.resources.devices` rule for that entry's host numbers moved to the guest
/// numbers. A rule shared by two disks (one host device at two paths) is kept once per
/// disk.
pub fn rewrite_spec(raw: &[u8], disks: &[GuestDisk]) -> Result<Vec<u8>, BlockDeviceError> {
    if disks.is_empty() {
        return Ok(raw.to_vec());
    }
    let mut spec: Value = serde_json::from_slice(raw).map_err(BlockDeviceError::Spec)?;
    let mut moves: Vec<((u64, u64), (u64, u64))> = Vec::with_capacity(disks.len());
    {
        let mut devices: Vec<&mut Value> = spec
            .pointer_mut("/linux/devices")
            .and_then(Value::as_array_mut)
            .map(|d| d.iter_mut().collect())
            .unwrap_or_default();
        for disk in disks {
            let entry = devices.iter_mut().find(|d| {
                d.get("path").and_then(Value::as_str) == Some(disk.container_path.as_str())
                    && d.get("type").and_then(Value::as_str) == Some("b")
            });
            let Some(entry) = entry else {
                return Err(BlockDeviceError::Invalid {
                    path: disk.container_path.clone(),
                    reason: "the spec has no linux.devices entry of type \"b\" with this path"
                        .into(),
                });
            };
            let number = |k: &str| entry.get(k).and_then(Value::as_u64).unwrap_or(0);
            moves.push(((number("major"), number("minor")), (disk.major, disk.minor)));
            entry["major"] = Value::from(disk.major);
            entry["minor"] = Value::from(disk.minor);
        }
    }
    if let Some(rules) = spec
        .pointer_mut("/linux/resources/devices")
        .and_then(Value::as_array_mut)
    {
        let mut rewritten = Vec::with_capacity(rules.len());
        for rule in rules.drain(..) {
            let numbers = (
                rule.get("major").and_then(Value::as_u64),
                rule.get("minor").and_then(Value::as_u64),
            );
            let is_block = rule.get("type").and_then(Value::as_str) == Some("b");
            let targets: Vec<(u64, u64)> = moves
                .iter()
                .filter(|(host, _)| is_block && numbers == (Some(host.0), Some(host.1)))
                .map(|(_, guest)| *guest)
                .collect();
            if targets.is_empty() {
                rewritten.push(rule);
                continue;
            }
            for (major, minor) in targets {
                let mut r = rule.clone();
                r["major"] = Value::from(major);
                r["minor"] = Value::from(minor);
                rewritten.push(r);
            }
        }
        *rules = rewritten;
    }
    serde_json::to_vec(&spec).map_err(BlockDeviceError::Spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(path: &str, serial: &str) -> ContainerBlockDevice {
        let mut w = ContainerBlockDevice::new();
        w.container_path = path.into();
        w.serial = serial.into();
        w
    }

    fn disk(path: &str, major: u64, minor: u64) -> GuestDisk {
        GuestDisk {
            container_path: path.into(),
            node: "/dev/vdb".into(),
            major,
            minor,
        }
    }

    #[test]
    fn the_device_and_its_cgroup_rule_get_the_guest_numbers() {
        let spec = serde_json::json!({"linux": {
            "devices": [
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 4, "fileMode": 432, "uid": 0, "gid": 6}
            ],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 7, "minor": 4, "access": "rwm"},
                {"allow": true, "type": "b", "major": 7, "minor": 4, "access": "rw"}
            ]}
        }});
        let raw = serde_json::to_vec(&spec).unwrap();
        let out = rewrite_spec(&raw, &[disk("/dev/xvdb", 254, 16)]).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out["linux"]["devices"][1],
            serde_json::json!({"path": "/dev/xvdb", "type": "b", "major": 254, "minor": 16, "fileMode": 432, "uid": 0, "gid": 6})
        );
        assert_eq!(out["linux"]["devices"][0], spec["linux"]["devices"][0]);
        let rules = out["linux"]["resources"]["devices"].as_array().unwrap();
        // Only the block rule for the host numbers moves; a char rule with the same
        // numbers names another device.
        assert_eq!(rules[1], spec["linux"]["resources"]["devices"][1]);
        assert_eq!(
            rules[2],
            serde_json::json!({"allow": true, "type": "b", "major": 254, "minor": 16, "access": "rw"})
        );
    }

    #[test]
    fn one_host_device_at_two_paths_keeps_a_rule_for_each_drive() {
        let spec = serde_json::json!({"linux": {
            "devices": [
                {"path": "/dev/a", "type": "b", "major": 7, "minor": 4},
                {"path": "/dev/b", "type": "b", "major": 7, "minor": 4}
            ],
            "resources": {"devices": [{"allow": true, "type": "b", "major": 7, "minor": 4, "access": "r"}]}
        }});
        let raw = serde_json::to_vec(&spec).unwrap();
        let out = rewrite_spec(&raw, &[disk("/dev/a", 254, 0), disk("/dev/b", 254, 16)]).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        let minors: Vec<u64> = out["linux"]["resources"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["minor"].as_u64().unwrap())
            .collect();
        assert_eq!(minors, [0, 16]);
    }

    #[test]
    fn a_device_missing_from_the_spec_is_refused_by_path() {
        let raw = br#"{"linux": {"devices": [{"path": "/dev/xvdb", "type": "c", "major": 7, "minor": 4}]}}"#;
        let err = rewrite_spec(raw, &[disk("/dev/xvdb", 254, 0)]).unwrap_err();
        assert!(err.to_string().contains("/dev/xvdb"), "{err}");
        assert!(rewrite_spec(b"not json", &[disk("/dev/x", 1, 1)]).is_err());
        assert_eq!(rewrite_spec(b"anything", &[]).unwrap(), b"anything");
    }

    #[test]
    fn bad_requests_are_refused_before_any_wait() {
        validate(&[wanted("/dev/xvdb", "crx-slot-0")]).unwrap();
        let err = |w: Vec<ContainerBlockDevice>| validate(&w).unwrap_err().to_string();
        assert!(err(vec![wanted("dev/x", "s")]).contains("absolute"));
        assert!(err(vec![wanted("/dev/x", "")]).contains("serial"));
        assert!(err(vec![wanted("/dev/x", &"s".repeat(21))]).contains("serial"));
        assert!(err(vec![wanted("/dev/x", "a"), wanted("/dev/x", "b")]).contains("twice"));
        let many = (0..=MAX_BLOCK_DEVICES)
            .map(|i| wanted(&format!("/dev/d{i}"), "s"))
            .collect();
        assert!(err(many).contains("limit"));
    }

    #[test]
    fn a_drive_that_never_comes_names_the_device_and_serial() {
        let dir = std::env::temp_dir().join(format!("crx-blockdev-{}", std::process::id()));
        let paths = BlockPaths {
            sys_block: dir.join("sys"),
            dev: dir.join("dev"),
        };
        std::fs::create_dir_all(&paths.sys_block).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(find(
                &paths,
                &[wanted("/dev/xvdb", "crx-slot-1")],
                Instant::now() + std::time::Duration::from_millis(30),
            ))
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!("{err}: {}", err_source(&err));
        assert!(
            text.contains("/dev/xvdb") && text.contains("crx-slot-1"),
            "{text}"
        );
    }

    fn err_source(e: &BlockDeviceError) -> String {
        std::error::Error::source(e).map_or(String::new(), |s| s.to_string())
    }
}
