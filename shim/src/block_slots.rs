//! The pod VM's empty drive slots, and which container's host block device fills each.
//! A container's `linux.devices` entry of type "b" names a host device by its numbers;
//! the shim opens that device (read-only when the container may not write it), hands
//! the open fd to a free slot through the VMM's API socket, and tells the agent the
//! slot's serial. The slot is emptied when the container is deleted, or at the latest
//! when the pod goes, so no attachment outlives its container.
//!
//! Calls to the API socket block (crx-vmm flushes the old backing on detach): the async
//! helpers at the end run them off the async threads.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crx_shim::vm::DriveSlot;

use crate::translate::BlockRequest;

/// How a slot is filled and emptied: the VMM's API socket (a fake in tests).
pub trait SlotApi: Send + Sync {
    /// Gives `slot` the backing `device`; returns its size in 512-byte sectors.
    fn attach(&self, slot: &DriveSlot, device: &File, read_only: bool) -> Result<u64, String>;
    fn detach(&self, slot: &DriveSlot) -> Result<(), String>;
}

/// crx-vmm's API socket (crx-vmm itself, or a `crx-vmm vhost-user-blk` back end).
pub struct VmmApi;

impl SlotApi for VmmApi {
    fn attach(&self, slot: &DriveSlot, device: &File, read_only: bool) -> Result<u64, String> {
        crx_vmm::api::client::attach_drive(&slot.api_socket, slot.index, device, read_only)
            .map_err(|e| crate::rpc::error_chain(&e))
    }

    fn detach(&self, slot: &DriveSlot) -> Result<(), String> {
        crx_vmm::api::client::detach_drive(&slot.api_socket, slot.index)
            .map_err(|e| crate::rpc::error_chain(&e))
    }
}

/// Opens the host block device a request names.
pub type DeviceOpener = Box<dyn Fn(&BlockRequest) -> std::io::Result<File> + Send + Sync>;

/// Why a container's block devices could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "device {path} (block {major}:{minor} on the host): the pod VM has {slots} drive \
         slot(s) for host block devices and {free} free; a pod gets more with block_slots \
         in the crx config"
    )]
    Exhausted {
        path: String,
        major: u64,
        minor: u64,
        slots: usize,
        free: usize,
    },
    #[error("device {path}: cannot open the host's block device {major}:{minor}")]
    HostDevice {
        path: String,
        major: u64,
        minor: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("device {path}: attaching the host's block device {major}:{minor} to drive slot {serial} failed: {reason}")]
    Attach {
        path: String,
        major: u64,
        minor: u64,
        serial: String,
        reason: String,
    },
}

/// A device the agent must give the container: its path there and its drive's serial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub container_path: String,
    pub serial: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    container_id: String,
    container_path: String,
}

/// The pod's slots and who holds each.
pub struct BlockSlots {
    api: Box<dyn SlotApi>,
    open: DeviceOpener,
    slots: Vec<(DriveSlot, Option<Holder>)>,
}

impl BlockSlots {
    pub fn new(slots: Vec<DriveSlot>, api: Box<dyn SlotApi>, open: DeviceOpener) -> BlockSlots {
        BlockSlots {
            api,
            open,
            slots: slots.into_iter().map(|s| (s, None)).collect(),
        }
    }

    /// The VMM's slots, filled with the host's devices found through sysfs.
    pub fn for_vm(slots: Vec<DriveSlot>) -> BlockSlots {
        BlockSlots::new(
            slots,
            Box::new(VmmApi),
            Box::new(|r| open_host_device(Path::new("/sys/dev/block"), Path::new("/dev"), r)),
        )
    }

    pub fn free(&self) -> usize {
        self.slots.iter().filter(|(_, h)| h.is_none()).count()
    }

    /// Attaches every device of `requests` for `container_id`, or none: on any
    /// failure the slots filled so far are emptied again.
    pub fn attach(
        &mut self,
        container_id: &str,
        requests: &[BlockRequest],
    ) -> Result<Vec<Attached>, SlotError> {
        let free = self.free();
        if let Some(over) = requests.get(free) {
            return Err(SlotError::Exhausted {
                path: over.container_path.clone(),
                major: over.major,
                minor: over.minor,
                slots: self.slots.len(),
                free,
            });
        }
        let mut attached = Vec::with_capacity(requests.len());
        for request in requests {
            match self.attach_one(container_id, request) {
                Ok(a) => attached.push(a),
                Err(e) => {
                    self.detach_container(container_id);
                    return Err(e);
                }
            }
        }
        Ok(attached)
    }

    fn attach_one(
        &mut self,
        container_id: &str,
        request: &BlockRequest,
    ) -> Result<Attached, SlotError> {
        let device = (self.open)(request).map_err(|source| SlotError::HostDevice {
            path: request.container_path.clone(),
            major: request.major,
            minor: request.minor,
            source,
        })?;
        let free = self.slots.iter().position(|(_, h)| h.is_none());
        let Some(index) = free else {
            return Err(SlotError::Exhausted {
                path: request.container_path.clone(),
                major: request.major,
                minor: request.minor,
                slots: self.slots.len(),
                free: 0,
            });
        };
        let (slot, holder) = &mut self.slots[index];
        let sectors = self
            .api
            .attach(slot, &device, request.read_only)
            .map_err(|reason| SlotError::Attach {
                path: request.container_path.clone(),
                major: request.major,
                minor: request.minor,
                serial: slot.serial.clone(),
                reason,
            })?;
        tracing::info!(container = %container_id, path = %request.container_path,
            host = %format!("{}:{}", request.major, request.minor), serial = %slot.serial,
            sectors, read_only = request.read_only, "host block device attached");
        *holder = Some(Holder {
            container_id: container_id.to_owned(),
            container_path: request.container_path.clone(),
        });
        Ok(Attached {
            container_path: request.container_path.clone(),
            serial: slot.serial.clone(),
        })
    }

    /// Empties the slots `container_id` holds. A slot whose detach fails stays held
    /// (it still has the device), so it is never handed out with another's disk in
    /// it; [`BlockSlots::detach_all`] tries it again.
    pub fn detach_container(&mut self, container_id: &str) {
        self.detach_where(|h| h.container_id == container_id);
    }

    /// Empties every slot (the pod is going).
    pub fn detach_all(&mut self) {
        self.detach_where(|_| true);
    }

    fn detach_where(&mut self, matches: impl Fn(&Holder) -> bool) {
        for (slot, holder) in &mut self.slots {
            let Some(h) = holder.as_ref().filter(|h| matches(h)) else {
                continue;
            };
            match self.api.detach(slot) {
                Ok(()) => {
                    tracing::info!(container = %h.container_id, path = %h.container_path,
                        serial = %slot.serial, "host block device detached");
                    *holder = None;
                }
                Err(e) => tracing::warn!(container = %h.container_id, path = %h.container_path,
                    serial = %slot.serial, error = %e, "cannot detach a host block device"),
            }
        }
    }
}

/// Opens host block device `major:minor` by the name sysfs gives it
/// (`<sys_dev_block>/M:m/uevent`'s DEVNAME, under `dev`), and checks the node opened is
/// that device: the container's spec names numbers, not a path.
pub fn open_host_device(
    sys_dev_block: &Path,
    dev: &Path,
    request: &BlockRequest,
) -> std::io::Result<File> {
    let numbers = format!("{}:{}", request.major, request.minor);
    let uevent = std::fs::read_to_string(sys_dev_block.join(&numbers).join("uevent"))
        .map_err(|e| std::io::Error::new(e.kind(), format!("no block device {numbers}: {e}")))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|n| !n.is_empty() && !n.split('/').any(|c| c == ".." || c.is_empty()))
        .ok_or_else(|| std::io::Error::other(format!("sysfs names no node for {numbers}")))?;
    let node: PathBuf = dev.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!request.read_only)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&node)?;
    let meta = file.metadata()?;
    let rdev = meta.rdev();
    let same = nix::sys::stat::major(rdev) == request.major
        && nix::sys::stat::minor(rdev) == request.minor;
    if !meta.file_type().is_block_device() || !same {
        return Err(std::io::Error::other(format!(
            "{} is not block device {numbers}",
            node.display()
        )));
    }
    Ok(file)
}

/// The pod's slots, shared by the task service's requests.
pub type SharedSlots = Arc<Mutex<BlockSlots>>;

fn lock(slots: &SharedSlots) -> MutexGuard<'_, BlockSlots> {
    // A panic mid-call leaves at worst a slot marked held: never one handed out twice.
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`BlockSlots::attach`] off the async threads.
pub async fn attach(
    slots: &SharedSlots,
    container_id: &str,
    requests: Vec<BlockRequest>,
) -> Result<Vec<Attached>, SlotError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let (slots, id) = (slots.clone(), container_id.to_owned());
    tokio::task::spawn_blocking(move || lock(&slots).attach(&id, &requests))
        .await
        .unwrap_or_else(|e| {
            Err(SlotError::Attach {
                path: String::new(),
                major: 0,
                minor: 0,
                serial: String::new(),
                reason: format!("the attach panicked: {e}"),
            })
        })
}

/// [`BlockSlots::detach_container`] off the async threads.
pub async fn detach_container(slots: &SharedSlots, container_id: &str) {
    let (slots, id) = (slots.clone(), container_id.to_owned());
    if let Err(e) = tokio::task::spawn_blocking(move || lock(&slots).detach_container(&id)).await {
        tracing::error!(error = %e, "detaching block devices panicked");
    }
}

/// [`BlockSlots::detach_all`] off the async threads.
pub async fn detach_all(slots: &SharedSlots) {
    let slots = slots.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || lock(&slots).detach_all()).await {
        tracing::error!(error = %e, "detaching block devices panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records calls; attach fails for slots listed in `refuse`.
    #[derive(Default)]
    struct FakeApi {
        calls: Arc<Mutex<Vec<String>>>,
        refuse: Vec<String>,
        refuse_detach: Arc<Mutex<bool>>,
    }

    impl SlotApi for FakeApi {
        fn attach(&self, slot: &DriveSlot, _: &File, read_only: bool) -> Result<u64, String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("attach {} ro={read_only}", slot.serial));
            if self.refuse.contains(&slot.serial) {
                return Err("no".into());
            }
            Ok(2048)
        }

        fn detach(&self, slot: &DriveSlot) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("detach {}", slot.serial));
            if *self.refuse_detach.lock().unwrap() {
                return Err("VM gone".into());
            }
            Ok(())
        }
    }

    fn slots(n: usize) -> Vec<DriveSlot> {
        (0..n)
            .map(|i| DriveSlot {
                api_socket: "/run/x/api.sock".into(),
                index: i,
                serial: format!("crx-slot-{i}"),
            })
            .collect()
    }

    fn request(path: &str, read_only: bool) -> BlockRequest {
        BlockRequest {
            container_path: path.into(),
            major: 7,
            minor: 4,
            read_only,
        }
    }

    fn dev_null() -> DeviceOpener {
        Box::new(|_| File::open("/dev/null"))
    }

    fn with_fake(n: usize, fake: FakeApi) -> (BlockSlots, Arc<Mutex<Vec<String>>>) {
        let calls = fake.calls.clone();
        (BlockSlots::new(slots(n), Box::new(fake), dev_null()), calls)
    }

    #[test]
    fn slots_are_handed_out_and_freed_per_container() {
        let (mut s, calls) = with_fake(2, FakeApi::default());
        let a = s.attach("c1", &[request("/dev/xvdb", false)]).unwrap();
        assert_eq!(
            a,
            [Attached {
                container_path: "/dev/xvdb".into(),
                serial: "crx-slot-0".into()
            }]
        );
        let b = s.attach("c2", &[request("/dev/xvdc", true)]).unwrap();
        assert_eq!(b[0].serial, "crx-slot-1");
        assert_eq!(s.free(), 0);
        s.detach_container("c1");
        assert_eq!(s.free(), 1);
        // The freed slot is the one handed out next.
        let c = s.attach("c3", &[request("/dev/xvdb", false)]).unwrap();
        assert_eq!(c[0].serial, "crx-slot-0");
        s.detach_all();
        assert_eq!(s.free(), 2);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "attach crx-slot-0 ro=false",
                "attach crx-slot-1 ro=true",
                "detach crx-slot-0",
                "attach crx-slot-0 ro=false",
                "detach crx-slot-0",
                "detach crx-slot-1",
            ]
        );
    }

    #[test]
    fn too_many_devices_are_refused_before_anything_is_attached() {
        let (mut s, calls) = with_fake(1, FakeApi::default());
        let err = s
            .attach(
                "c1",
                &[request("/dev/xvdb", false), request("/dev/xvdc", false)],
            )
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SlotError::Exhausted { .. }), "{text}");
        assert!(
            text.contains("/dev/xvdc") && text.contains("1 drive slot(s)"),
            "{text}"
        );
        assert!(calls.lock().unwrap().is_empty());
        assert_eq!(s.free(), 1);
    }

    #[test]
    fn a_failed_attach_leaves_no_slot_of_the_container_filled() {
        let fake = FakeApi {
            refuse: vec!["crx-slot-1".into()],
            ..Default::default()
        };
        let (mut s, calls) = with_fake(2, fake);
        let err = s
            .attach(
                "c1",
                &[request("/dev/xvdb", false), request("/dev/xvdc", false)],
            )
            .unwrap_err();
        assert!(err.to_string().contains("crx-slot-1"), "{err}");
        assert_eq!(s.free(), 2);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "attach crx-slot-0 ro=false",
                "attach crx-slot-1 ro=false",
                "detach crx-slot-0"
            ]
        );
        // A host device that cannot be opened attaches nothing either.
        let mut s = BlockSlots::new(
            slots(1),
            Box::new(FakeApi::default()),
            Box::new(|_| Err(std::io::Error::other("gone"))),
        );
        let err = s.attach("c1", &[request("/dev/xvdb", false)]).unwrap_err();
        assert!(matches!(err, SlotError::HostDevice { .. }), "{err}");
        assert_eq!(s.free(), 1);
    }

    #[test]
    fn a_slot_whose_detach_fails_is_not_handed_out_again() {
        let fake = FakeApi::default();
        let refuse_detach = fake.refuse_detach.clone();
        let (mut s, _) = with_fake(1, fake);
        s.attach("c1", &[request("/dev/xvdb", false)]).unwrap();
        *refuse_detach.lock().unwrap() = true;
        s.detach_container("c1");
        assert_eq!(s.free(), 0);
        assert!(matches!(
            s.attach("c2", &[request("/dev/xvdb", false)]),
            Err(SlotError::Exhausted { .. })
        ));
        *refuse_detach.lock().unwrap() = false;
        s.detach_all();
        assert_eq!(s.free(), 1);
    }

    #[test]
    fn the_host_device_is_found_by_its_numbers_and_checked() {
        let dir = std::env::temp_dir().join(format!("crx-slots-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // /dev/null is 1:3, a char device: sysfs may name it, but it is no block device.
        std::fs::create_dir_all(dir.join("1:3")).unwrap();
        std::fs::write(dir.join("1:3/uevent"), "MAJOR=1\nMINOR=3\nDEVNAME=null\n").unwrap();
        std::fs::create_dir_all(dir.join("7:9")).unwrap();
        std::fs::write(dir.join("7:9/uevent"), "DEVNAME=../etc/passwd\n").unwrap();
        let req = |major, minor| BlockRequest {
            container_path: "/dev/x".into(),
            major,
            minor,
            read_only: true,
        };
        let err = open_host_device(&dir, Path::new("/dev"), &req(1, 3)).unwrap_err();
        assert!(err.to_string().contains("not block device 1:3"), "{err}");
        let err = open_host_device(&dir, Path::new("/dev"), &req(7, 9)).unwrap_err();
        assert!(err.to_string().contains("names no node"), "{err}");
        let err = open_host_device(&dir, Path::new("/dev"), &req(7, 200)).unwrap_err();
        assert!(err.to_string().contains("no block device 7:200"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
