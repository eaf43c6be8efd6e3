//! Checks a `Storage` request and turns it into a [`MountPlan`]: what to mount, where,
//! with which flags and data. Pure (no system calls) so every rule is unit-tested;
//! questions only the running kernel can answer (is the fstype known? is the tag there?)
//! are left to the caller.

use std::path::{Path, PathBuf};

use crx_protocols::v1::storage::{Storage, StorageDriver};
use nix::mount::MsFlags;

use super::StorageError;

/// Longest source or mount point accepted (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest fstype name accepted.
pub const MAX_FSTYPE: usize = 32;
/// Most options in one request.
pub const MAX_OPTIONS: usize = 32;
/// Longest single option.
pub const MAX_OPTION: usize = 256;
/// Longest joined file-system data (the kernel copies at most one page).
pub const MAX_DATA: usize = 4000;
/// virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_BLOCK_SERIAL: usize = 20;
/// virtio-fs tags are at most 36 bytes (virtio spec, 5.11.4).
pub const MAX_FS_TAG: usize = 36;

/// What a validated request mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanSource {
    /// A virtio-fs device by tag.
    VirtioFs { tag: String },
    /// A virtio-blk drive by serial, with the file system on it.
    Block { serial: String, fstype: String },
    /// A bind mount of a guest path.
    Bind { path: PathBuf },
    /// A fresh tmpfs.
    Tmpfs,
}

/// A validated mount request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountPlan {
    pub source: PlanSource,
    /// Normalised absolute mount point, strictly under the storage root.
    pub mount_point: PathBuf,
    /// Mount flags from the options and `read_only`.
    pub flags: MsFlags,
    /// File-system data (the options that are not flags), comma-joined; empty if none.
    pub data: String,
}

/// Option names that are mount flags: (name, flag, whether it sets or clears the flag).
const FLAG_OPTIONS: &[(&str, MsFlags, bool)] = &[
    ("ro", MsFlags::MS_RDONLY, true),
    ("rw", MsFlags::MS_RDONLY, false),
    ("nosuid", MsFlags::MS_NOSUID, true),
    ("suid", MsFlags::MS_NOSUID, false),
    ("nodev", MsFlags::MS_NODEV, true),
    ("dev", MsFlags::MS_NODEV, false),
    ("noexec", MsFlags::MS_NOEXEC, true),
    ("exec", MsFlags::MS_NOEXEC, false),
    ("noatime", MsFlags::MS_NOATIME, true),
    ("atime", MsFlags::MS_NOATIME, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, true),
    ("diratime", MsFlags::MS_NODIRATIME, false),
    ("relatime", MsFlags::MS_RELATIME, true),
    ("norelatime", MsFlags::MS_RELATIME, false),
    ("strictatime", MsFlags::MS_STRICTATIME, true),
    ("sync", MsFlags::MS_SYNCHRONOUS, true),
    ("async", MsFlags::MS_SYNCHRONOUS, false),
    ("dirsync", MsFlags::MS_DIRSYNC, true),
];

fn invalid(what: String) -> StorageError {
    StorageError::Invalid(what)
}

/// Validates `storage` against the storage root `root` (absolute, normalised).
pub fn plan(storage: &Storage, root: &Path) -> Result<MountPlan, StorageError> {
    let driver = storage.driver.enum_value().map_err(|n| {
        invalid(format!(
            "unknown storage driver {n} (this agent knows virtiofs=1, block=2, bind=3, tmpfs=4)"
        ))
    })?;
    let mount_point = mount_point(&storage.mount_point, root)?;
    let (flags, data) = options(&storage.options, storage.read_only)?;
    let source = match driver {
        StorageDriver::STORAGE_DRIVER_UNSPECIFIED => {
            return Err(invalid("storage driver not set".to_owned()))
        }
        StorageDriver::STORAGE_DRIVER_VIRTIOFS => {
            let tag = &storage.source;
            if tag.is_empty() || tag.len() > MAX_FS_TAG || tag.contains('\0') {
                return Err(invalid(format!(
                    "virtio-fs tag {tag:?} must be 1-{MAX_FS_TAG} bytes without NUL"
                )));
            }
            fstype_must_be(&storage.fstype, "virtiofs", "a virtio-fs storage")?;
            PlanSource::VirtioFs { tag: tag.clone() }
        }
        StorageDriver::STORAGE_DRIVER_BLOCK => {
            let serial = &storage.source;
            if serial.is_empty()
                || serial.len() > MAX_BLOCK_SERIAL
                || !serial.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "block serial {serial:?} must be 1-{MAX_BLOCK_SERIAL} printable ASCII bytes"
                )));
            }
            let fstype = &storage.fstype;
            if fstype.is_empty() {
                return Err(invalid(format!(
                    "block storage {serial:?} needs an fstype (e.g. ext4)"
                )));
            }
            fstype_syntax(fstype)?;
            PlanSource::Block {
                serial: serial.clone(),
                fstype: fstype.clone(),
            }
        }
        StorageDriver::STORAGE_DRIVER_BIND => {
            if !storage.fstype.is_empty() {
                return Err(invalid(format!(
                    "a bind storage takes no fstype (got {:?})",
                    storage.fstype
                )));
            }
            if !data.is_empty() {
                return Err(invalid(format!(
                    "a bind mount takes mount flags only, not file-system data {data:?}"
                )));
            }
            let path = absolute_clean(&storage.source, "bind source")?;
            PlanSource::Bind { path }
        }
        StorageDriver::STORAGE_DRIVER_TMPFS => {
            if !(storage.source.is_empty() || storage.source == "tmpfs") {
                return Err(invalid(format!(
                    "a tmpfs storage takes no source (got {:?})",
                    storage.source
                )));
            }
            fstype_must_be(&storage.fstype, "tmpfs", "a tmpfs storage")?;
            PlanSource::Tmpfs
        }
    };
    Ok(MountPlan {
        source,
        mount_point,
        flags,
        data,
    })
}

fn fstype_must_be(fstype: &str, want: &str, what: &str) -> Result<(), StorageError> {
    if fstype.is_empty() || fstype == want {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} takes fstype {want:?} or none (got {fstype:?})"
        )))
    }
}

/// A plausible file-system type name; whether the kernel knows it is checked later.
fn fstype_syntax(fstype: &str) -> Result<(), StorageError> {
    let ok = fstype.len() <= MAX_FSTYPE
        && fstype
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "fstype {fstype:?} is not a file-system type name (1-{MAX_FSTYPE} of [A-Za-z0-9_.-])"
        )))
    }
}

/// An absolute path with no empty, `.` or `..` components, returned as given.
fn absolute_clean(text: &str, what: &str) -> Result<PathBuf, StorageError> {
    if text.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if text.len() > MAX_PATH || text.contains('\0') {
        return Err(invalid(format!(
            "{what} {text:?} is longer than {MAX_PATH} bytes or contains NUL"
        )));
    }
    let Some(rest) = text.strip_prefix('/') else {
        return Err(invalid(format!("{what} {text:?} is not an absolute path")));
    };
    if rest.is_empty() {
        return Ok(PathBuf::from("/"));
    }
    for part in rest.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(invalid(format!(
                "{what} {text:?} has an empty, \".\" or \"..\" component"
            )));
        }
    }
    Ok(PathBuf::from(text))
}

/// The mount point, checked to lie strictly under `root`.
fn mount_point(text: &str, root: &Path) -> Result<PathBuf, StorageError> {
    let path = absolute_clean(text, "mount point")?;
    match path.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => Ok(path),
        _ => Err(invalid(format!(
            "mount point {text:?} is outside the storage root {} (mount points must lie under it)",
            root.display()
        ))),
    }
}

/// Splits options into flags and comma-joined file-system data.
fn options(list: &[String], read_only: bool) -> Result<(MsFlags, String), StorageError> {
    if list.len() > MAX_OPTIONS {
        return Err(invalid(format!(
            "{} mount options given; at most {MAX_OPTIONS} are accepted",
            list.len()
        )));
    }
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for option in list {
        if option.is_empty()
            || option.len() > MAX_OPTION
            || option.contains(',')
            || option.contains('\0')
        {
            return Err(invalid(format!(
                "mount option {:?} must be 1-{MAX_OPTION} bytes without ',' or NUL",
                truncate(option, 64)
            )));
        }
        match FLAG_OPTIONS.iter().find(|(name, _, _)| *name == option) {
            Some((_, flag, true)) => flags.insert(*flag),
            Some((_, flag, false)) => flags.remove(*flag),
            None => data.push(option),
        }
    }
    if read_only {
        flags.insert(MsFlags::MS_RDONLY);
    }
    let data = data.join(",");
    if data.len() > MAX_DATA {
        return Err(invalid(format!(
            "file-system data is {} bytes; at most {MAX_DATA} are accepted",
            data.len()
        )));
    }
    Ok((flags, data))
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/run/crx/storage";

    fn storage(driver: StorageDriver, source: &str, fstype: &str, mp: &str) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = source.to_owned();
        s.fstype = fstype.to_owned();
        s.mount_point = mp.to_owned();
        s
    }

    fn err(s: &Storage) -> String {
        match plan(s, Path::new(ROOT)) {
            Err(StorageError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn plans_each_driver() {
        let p = plan(
            &storage(
                StorageDriver::STORAGE_DRIVER_VIRTIOFS,
                "pod",
                "",
                "/run/crx/storage/pod",
            ),
            Path::new(ROOT),
        )
        .unwrap();
        assert_eq!(p.source, PlanSource::VirtioFs { tag: "pod".into() });
        assert_eq!(p.mount_point, PathBuf::from("/run/crx/storage/pod"));

        let mut s = storage(
            StorageDriver::STORAGE_DRIVER_BLOCK,
            "vol-1",
            "ext4",
            "/run/crx/storage/v/1",
        );
        s.options = vec!["noatime".into(), "errors=remount-ro".into(), "nodev".into()];
        s.read_only = true;
        let p = plan(&s, Path::new(ROOT)).unwrap();
        assert_eq!(
            p.source,
            PlanSource::Block {
                serial: "vol-1".into(),
                fstype: "ext4".into()
            }
        );
        assert_eq!(
            p.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(p.data, "errors=remount-ro");

        let mut s = storage(
            StorageDriver::STORAGE_DRIVER_TMPFS,
            "",
            "tmpfs",
            "/run/crx/storage/t",
        );
        s.options = vec![
            "size=1m".into(),
            "mode=700".into(),
            "ro".into(),
            "rw".into(),
        ];
        let p = plan(&s, Path::new(ROOT)).unwrap();
        assert_eq!(p.source, PlanSource::Tmpfs);
        assert_eq!(p.flags, MsFlags::empty(), "rw after ro clears it");
        assert_eq!(p.data, "size=1m,mode=700");

        let p = plan(
            &storage(
                StorageDriver::STORAGE_DRIVER_BIND,
                "/run/crx/storage/pod/c1",
                "",
                "/run/crx/storage/c1",
            ),
            Path::new(ROOT),
        )
        .unwrap();
        assert_eq!(
            p.source,
            PlanSource::Bind {
                path: "/run/crx/storage/pod/c1".into()
            }
        );
    }

    #[test]
    fn mount_points_must_be_clean_and_under_the_root() {
        for bad in [
            "",
            "relative/x",
            "/run/crx/storage",
            "/run/crx/storage/",
            "/run/crx/storage/../etc",
            "/run/crx/storage/./x",
            "/run/crx/storage//x",
            "/run/crx/storagex",
            "/etc",
            "/",
        ] {
            let m = err(&storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", bad));
            assert!(m.contains("mount point"), "{bad:?}: {m}");
        }
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_TMPFS,
            "",
            "",
            "/mnt/x",
        ));
        assert!(m.contains("outside the storage root"), "{m}");
        let long = format!("{ROOT}/{}", "a".repeat(MAX_PATH));
        err(&storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", &long));
    }

    #[test]
    fn sources_and_fstypes_are_checked_per_driver() {
        let mp = "/run/crx/storage/x";
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_UNSPECIFIED,
            "",
            "",
            mp,
        ));
        assert!(m.contains("driver not set"), "{m}");
        let mut s = storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", mp);
        s.driver = protobuf::EnumOrUnknown::from_i32(99);
        assert!(err(&s).contains("unknown storage driver 99"));

        assert!(err(&storage(StorageDriver::STORAGE_DRIVER_VIRTIOFS, "", "", mp)).contains("tag"));
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_VIRTIOFS,
            "pod",
            "ext4",
            mp,
        ));
        assert!(m.contains("\"ext4\""), "{m}");

        let m = err(&storage(StorageDriver::STORAGE_DRIVER_BLOCK, "vol", "", mp));
        assert!(m.contains("needs an fstype"), "{m}");
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_BLOCK,
            "vol",
            "ext4 -o x",
            mp,
        ));
        assert!(m.contains("\"ext4 -o x\""), "{m}");
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_BLOCK,
            "a-serial-that-is-far-too-long",
            "ext4",
            mp,
        ));
        assert!(m.contains("serial"), "{m}");

        let m = err(&storage(StorageDriver::STORAGE_DRIVER_BIND, "rel", "", mp));
        assert!(m.contains("bind source"), "{m}");
        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_BIND,
            "/a/../b",
            "",
            mp,
        ));
        assert!(m.contains("\"..\""), "{m}");
        let mut s = storage(StorageDriver::STORAGE_DRIVER_BIND, "/a", "", mp);
        s.options = vec!["size=1m".into()];
        assert!(err(&s).contains("flags only"));

        let m = err(&storage(
            StorageDriver::STORAGE_DRIVER_TMPFS,
            "/dev/vda",
            "",
            mp,
        ));
        assert!(m.contains("no source"), "{m}");
    }

    #[test]
    fn options_are_bounded() {
        let mp = "/run/crx/storage/x";
        let mut s = storage(StorageDriver::STORAGE_DRIVER_TMPFS, "", "", mp);
        s.options = vec!["size=1m,mode=0".into()];
        assert!(err(&s).contains("without ','"));
        s.options = vec![String::new()];
        err(&s);
        s.options = vec!["x".repeat(MAX_OPTION + 1)];
        err(&s);
        s.options = vec!["a".into(); MAX_OPTIONS + 1];
        assert!(err(&s).contains("at most"));
        s.options = vec!["y".repeat(200); MAX_OPTIONS];
        assert!(err(&s).contains("file-system data"));
    }
}
