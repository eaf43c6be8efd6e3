//! Finds virtio-fs devices in sysfs, so an unknown tag is reported as such. Kernels from
//! 6.9 on publish each device's tag (`/sys/bus/virtio/devices/virtioN/tag`); older ones
//! (ours is 6.1) only say that a virtio-fs device exists, and the tag is then checked
//! by the mount itself (the kernel answers EINVAL for an unknown tag).

use std::path::{Path, PathBuf};

use super::StorageError;

/// virtio device id of a file-system device (virtio spec 5.11).
const VIRTIO_ID_FS: &str = "0x001a";

/// What sysfs could tell about a tag.
#[derive(Debug, PartialEq, Eq)]
pub enum TagCheck {
    /// A device with this tag exists.
    Present,
    /// Devices exist but this kernel does not publish tags: let mount decide.
    Unknown { devices: usize },
}

/// Looks for `tag` under `devices_dir` (normally `/sys/bus/virtio/devices`).
pub fn check_tag(devices_dir: &Path, tag: &str) -> Result<TagCheck, StorageError> {
    let mut devices: Vec<PathBuf> = std::fs::read_dir(devices_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("device")).is_ok_and(|id| id.trim() == VIRTIO_ID_FS)
        })
        .collect();
    devices.sort();
    if devices.is_empty() {
        return Err(StorageError::NotFound(format!(
            "no virtio-fs device with tag {tag:?}: this VM has no virtio-fs device at all"
        )));
    }
    let tags: Vec<String> = devices
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.join("tag")).ok())
        .map(|t| t.trim_end_matches(['\n', '\0']).to_owned())
        .collect();
    if tags.is_empty() {
        return Ok(TagCheck::Unknown {
            devices: devices.len(),
        });
    }
    if tags.iter().any(|t| t == tag) {
        Ok(TagCheck::Present)
    } else {
        Err(StorageError::NotFound(format!(
            "no virtio-fs device with tag {tag:?} (tags present: {})",
            tags.iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/bus/virtio/devices`, removed on drop.
    struct Fake(PathBuf);

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake(name: &str, devices: &[(&str, Option<&str>)]) -> Fake {
        let dir =
            std::env::temp_dir().join(format!("crx-agent-virtiofs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (i, (id, tag)) in devices.iter().enumerate() {
            let d = dir.join(format!("virtio{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("device"), format!("{id}\n")).unwrap();
            if let Some(tag) = tag {
                std::fs::write(d.join("tag"), format!("{tag}\n")).unwrap();
            }
        }
        std::fs::create_dir_all(&dir).unwrap();
        Fake(dir)
    }

    #[test]
    fn reports_missing_devices_and_tags_by_name() {
        let none = fake("none", &[("0x0002", None)]);
        let e = check_tag(&none.0, "pod").unwrap_err().to_string();
        assert!(
            e.contains("\"pod\"") && e.contains("no virtio-fs device at all"),
            "{e}"
        );

        let old = fake("old", &[("0x001a", None), ("0x0013", None)]);
        assert_eq!(
            check_tag(&old.0, "pod").unwrap(),
            TagCheck::Unknown { devices: 1 }
        );

        let new = fake("new", &[("0x001a", Some("pod")), ("0x001a", Some("vol"))]);
        assert_eq!(check_tag(&new.0, "vol").unwrap(), TagCheck::Present);
        let e = check_tag(&new.0, "nope").unwrap_err().to_string();
        assert!(
            e.contains("\"nope\"") && e.contains("\"pod\", \"vol\""),
            "{e}"
        );
    }
}
