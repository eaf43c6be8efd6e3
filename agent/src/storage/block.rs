//! Finds a virtio-blk drive by its serial: `/sys/block/vd*/serial` names the disk, and
//! devtmpfs gives its node in `/dev`. The host names drives by serial so it need not
//! guess the order in which the guest numbers its disks. A drive attached after boot
//! (or a slot whose backing arrives later) may take a moment to show up, so the lookup
//! polls until a deadline.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::StorageError;

/// Where the kernel lists block devices and where their nodes appear.
#[derive(Clone, Debug)]
pub struct BlockPaths {
    /// Normally `/sys/block`.
    pub sys_block: PathBuf,
    /// Normally `/dev`.
    pub dev: PathBuf,
}

impl Default for BlockPaths {
    fn default() -> BlockPaths {
        BlockPaths {
            sys_block: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// A virtio disk as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name, e.g. `vdb`.
    pub name: String,
    /// The drive's serial (empty if it has none).
    pub serial: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

/// Why a lookup has not succeeded (yet).
enum Lookup {
    Missing,
    NoMedium(Disk),
    NoNode(Disk, PathBuf),
}

impl BlockPaths {
    /// The virtio disks present now (`vd*`), sorted by name.
    pub fn disks(&self) -> Vec<Disk> {
        let mut disks: Vec<Disk> = fs::read_dir(&self.sys_block)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                if !name.starts_with("vd") {
                    return None;
                }
                let dir = entry.path();
                let serial = fs::read_to_string(dir.join("serial")).unwrap_or_default();
                let sectors = fs::read_to_string(dir.join("size"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                Some(Disk {
                    name,
                    serial: serial.trim_end_matches(['\n', '\0']).to_owned(),
                    sectors,
                })
            })
            .collect();
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        disks
    }

    fn lookup(&self, serial: &str) -> Result<(Disk, PathBuf), Lookup> {
        let disk = self
            .disks()
            .into_iter()
            .find(|d| d.serial == serial)
            .ok_or(Lookup::Missing)?;
        if disk.sectors == 0 {
            return Err(Lookup::NoMedium(disk));
        }
        let node = self.dev.join(&disk.name);
        match fs::metadata(&node) {
            Ok(m) if m.file_type().is_block_device() => Ok((disk, node)),
            _ => Err(Lookup::NoNode(disk, node)),
        }
    }

    /// Waits until a disk with `serial` exists, has a medium and has its device node;
    /// returns the node. Polls with a growing pause until `deadline`.
    pub async fn wait_for(&self, serial: &str, deadline: Instant) -> Result<PathBuf, StorageError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let why = match self.lookup(serial) {
                Ok((_, node)) => return Ok(node),
                Err(why) => why,
            };
            let now = Instant::now();
            if now >= deadline {
                let waited = now.duration_since(started);
                return Err(match why {
                    Lookup::Missing => StorageError::NotFound(format!(
                        "no virtio-blk device with serial {serial:?} appeared within {} ms (present: {})",
                        waited.as_millis(),
                        self.describe()
                    )),
                    Lookup::NoMedium(disk) => StorageError::NotFound(format!(
                        "virtio-blk device with serial {serial:?} is /dev/{} but has no medium (size 0) after {} ms",
                        disk.name,
                        waited.as_millis()
                    )),
                    Lookup::NoNode(disk, node) => StorageError::NotFound(format!(
                        "virtio-blk device with serial {serial:?} is {} in sysfs but {} is not a block device node after {} ms",
                        disk.name,
                        node.display(),
                        waited.as_millis()
                    )),
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// `vda (serial "x", 2048 sectors), ...`, or `none`, for error messages.
    pub fn describe(&self) -> String {
        let disks = self.disks();
        if disks.is_empty() {
            return "no virtio disks".to_owned();
        }
        disks
            .iter()
            .map(|d| format!("{} (serial {:?}, {} sectors)", d.name, d.serial, d.sectors))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs and /dev in a temp dir.
    struct Fake {
        dir: PathBuf,
        paths: BlockPaths,
    }

    impl Fake {
        fn new(name: &str) -> Fake {
            let dir =
                std::env::temp_dir().join(format!("crx-agent-block-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            let paths = BlockPaths {
                sys_block: dir.join("sys/block"),
                dev: dir.join("dev"),
            };
            fs::create_dir_all(&paths.sys_block).unwrap();
            fs::create_dir_all(&paths.dev).unwrap();
            Fake { dir, paths }
        }

        fn disk(&self, name: &str, serial: &str, sectors: u64) {
            let d = self.paths.sys_block.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
            fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn lists_virtio_disks_with_their_serials() {
        let fake = Fake::new("list");
        fake.disk("vdb", "data", 2048);
        fake.disk("vda", "root", 4096);
        fs::create_dir_all(fake.paths.sys_block.join("loop0")).unwrap();
        let disks = fake.paths.disks();
        assert_eq!(
            disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["vda", "vdb"]
        );
        assert_eq!(disks[1].serial, "data");
        assert!(fake
            .paths
            .describe()
            .contains("vdb (serial \"data\", 2048 sectors)"));
    }

    #[test]
    fn a_missing_serial_times_out_naming_what_is_there() {
        let fake = Fake::new("missing");
        fake.disk("vda", "root", 4096);
        let started = std::time::Instant::now();
        let err = rt()
            .block_on(
                fake.paths
                    .wait_for("nope", Instant::now() + Duration::from_millis(150)),
            )
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains("\"nope\""), "{text}");
        assert!(text.contains("vda (serial \"root\""), "{text}");
    }

    #[test]
    fn an_empty_slot_is_reported_as_having_no_medium() {
        let fake = Fake::new("empty");
        fake.disk("vdc", "slot", 0);
        let err = rt()
            .block_on(
                fake.paths
                    .wait_for("slot", Instant::now() + Duration::from_millis(50)),
            )
            .unwrap_err();
        assert!(err.to_string().contains("no medium"), "{err}");
    }

    /// The wait picks a disk up once sysfs lists it and /dev has its node (a real block
    /// node here: we run as root).
    #[test]
    fn waits_for_a_disk_that_appears_later() {
        let fake = Fake::new("later");
        let paths = fake.paths.clone();
        let sys = fake.paths.sys_block.clone();
        let dev = fake.paths.dev.clone();
        let node = rt().block_on(async move {
            let waiter = tokio::spawn(async move {
                paths
                    .wait_for("late", Instant::now() + Duration::from_secs(5))
                    .await
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let d = sys.join("vdd");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("serial"), "late").unwrap();
            fs::write(d.join("size"), "8\n").unwrap();
            // Same numbers as /dev/loop0; never opened.
            nix::sys::stat::mknod(
                &dev.join("vdd"),
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(7, 0),
            )
            .unwrap();
            waiter.await.unwrap()
        });
        assert_eq!(node.unwrap(), fake.paths.dev.join("vdd"));
    }
}
