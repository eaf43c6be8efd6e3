//! crx's virtio-blk device as a vhost-user-blk back end: one EMPTY slot that QEMU's
//! `vhost-user-blk` device exposes as `/dev/vdX` with capacity 0, filled and emptied
//! after boot through crx-vmm's own API socket (`attach_drive` / `detach_drive`,
//! index 0), so a CSI block volume reaches a QEMU pod the way it reaches a crx-vmm one.
//!
//! The vhost-user-backend crate owns the protocol and the vrings; every request is
//! served by the same [`RequestServer`] crx-vmm's `crx-blk` thread uses (parsing,
//! bounds, read-only refusal, FLUSH as `fdatasync`, GET_ID), against the backing that
//! [`BlockSlot::replace_backing`] swaps. The config space is the in-process device's,
//! handed to QEMU through GET_CONFIG.
//!
//! A new capacity reaches the guest through QEMU: the back end sends CONFIG_CHANGE_MSG
//! on the backend channel (`backend_channel`), QEMU reads the config again and, if the
//! capacity changed, raises the guest's configuration interrupt.
//!
//! Features are fixed when the driver negotiates them, at boot, while the slot is
//! still empty: VIRTIO_BLK_F_RO is never offered, so the guest sees a read-only
//! attach as writable and its writes fail with IOERR (the guest should mount it `ro`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::VhostUserBackendMut;
use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::backend_channel::BackendChannel;
use super::{
    config_bytes, drain_vring, note_unoffered_event_idx, run_daemon, DaemonError, ExitEvent, Mem,
    Vring,
};
use crate::api::{ApiError, ApiServer, DriveHandle};
use crate::devices::virtio::block::{
    Block, BlockError, BlockSlot, ConfigChangeNotifier, RequestServer, CONFIG_LEN, SEG_MAX_OFFSET,
    VIRTIO_BLK_F_FLUSH,
};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::VirtioDevice;

/// One request queue (QEMU's `num-queues=1`).
const NUM_QUEUES: usize = 1;
/// QEMU sizes the queue itself (`queue-size`, 128 by default, at most 1024) and
/// refuses to start if the back end's maximum is smaller.
const MAX_QUEUE_SIZE: usize = 1024;
/// The smallest queue QEMU should be given (its default). `seg_max` is derived from
/// it because QEMU reads the config space once, before the queue size is known here,
/// and a driver without indirect descriptors needs every request to fit the ring.
pub const MIN_FRONT_END_QUEUE_SIZE: u32 = 128;
/// Data segments per request: the smallest queue minus the header and status.
const SEG_MAX: u32 = MIN_FRONT_END_QUEUE_SIZE - 2;

/// Why the vhost-user-blk back end stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    #[error(
        "vhost-user socket {0} already exists (another back end, or a stale socket to remove)"
    )]
    SocketExists(PathBuf),
    #[error("cannot set up the drive slot")]
    Slot(#[source] BlockError),
    #[error("cannot serve the API socket")]
    Api(#[source] ApiError),
    #[error("cannot create the back end's exit event")]
    ExitEvent(#[source] io::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl VhostUserBlkError {
    /// Whether the caller's input (a socket path, the serial) is at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            VhostUserBlkError::SocketExists(_)
                | VhostUserBlkError::Slot(BlockError::SerialTooLong(_))
                | VhostUserBlkError::Api(ApiError::PathExists(_))
        )
    }
}

/// The vhost-user-blk device state: the slot, its request server, the memory QEMU
/// shared and the channel that tells QEMU about a new capacity.
pub struct VhostUserBlkBackend {
    block: Block,
    requests: RequestServer,
    channel: Arc<BackendChannel>,
    /// The front end's handle on the backend channel; kept so the channel stays open
    /// for as long as the connection.
    backend_req: Option<Backend>,
    mem: Option<Mem>,
    exit: ExitEvent,
    warn: WarnLimiter,
}

impl VhostUserBlkBackend {
    /// An empty slot whose GET_ID answer is `serial` (at most 20 bytes), served on the
    /// vhost-user socket `socket` (used to recognise the front end's connection).
    pub fn new(serial: &str, socket: &Path) -> Result<Self, VhostUserBlkError> {
        let block = Block::new_empty(serial).map_err(VhostUserBlkError::Slot)?;
        let exit = ExitEvent::new().map_err(VhostUserBlkError::ExitEvent)?;
        let channel = Arc::new(BackendChannel::new(socket.to_path_buf()));
        block
            .slot()
            .set_config_notifier(Some(channel.clone() as Arc<dyn ConfigChangeNotifier>));
        // Until the driver acks its features, assume it did not take FLUSH.
        let requests = block.request_server(true);
        Ok(Self {
            block,
            requests,
            channel,
            backend_req: None,
            mem: None,
            exit,
            warn: WarnLimiter::new(),
        })
    }

    /// The handle the API server swaps backings through.
    pub fn slot(&self) -> BlockSlot {
        self.block.slot()
    }

    /// The config space QEMU reads: the in-process device's, with `seg_max` fitted to
    /// QEMU's queue (see [`MIN_FRONT_END_QUEUE_SIZE`]).
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = self.block.config();
        c[SEG_MAX_OFFSET..SEG_MAX_OFFSET + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Serves every request on `vring`, then signals the guest once.
    fn process(&mut self, vring: &Vring) -> io::Result<()> {
        let requests = &mut self.requests;
        drain_vring(vring, self.mem.as_ref(), |mem, chain| {
            // The chain iterator stops after the queue size and at 4 GiB in total.
            let descs: Vec<Descriptor> = chain.collect();
            requests.handle(mem, &descs)
        })
    }
}

impl VhostUserBackendMut for VhostUserBlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.block.avail_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.requests
            .set_writethrough(features & VIRTIO_BLK_F_FLUSH == 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU's vhost-user-blk reads capacity etc. from us and cannot start
        // without it. BACKEND_REQ: the channel a capacity change is announced on. MQ:
        // lets QEMU check how many queues we serve.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        note_unoffered_event_idx("vhost-user-blk", enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // QEMU asks for the whole `struct virtio_blk_config`; past crx's config space
        // it reads zeros, and QEMU fills `num_queues` itself.
        config_bytes(&self.config(), offset, size)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        self.warn.warn(format_args!(
            "vhost-user-blk: front end wrote {} bytes of read-only config space at {offset}; ignored",
            buf.len()
        ));
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        match self.channel.attach() {
            Ok(()) => tracing::info!("vhost-user-blk: backend channel ready"),
            Err(e) => tracing::error!(
                error = %e,
                "vhost-user-blk: cannot find the backend channel; the guest will not see capacity changes until it re-reads its config"
            ),
        }
        self.backend_req = Some(backend);
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(vring) if vrings.len() == NUM_QUEUES => self.process(vring),
            _ => Err(io::Error::other(format!(
                "vhost-user-blk: event {device_event} for {} vrings",
                vrings.len()
            ))),
        }
    }
}

/// Serves one empty slot with GET_ID `serial` to one QEMU connection on the
/// vhost-user socket `socket`, with crx-vmm's API socket at `api_socket` (drive index
/// 0 is the slot); returns when QEMU disconnects. Both sockets are removed on return.
///
/// Everything the caller gave is checked before either socket exists.
pub fn serve_vhost_user_blk(
    socket: &Path,
    api_socket: &Path,
    serial: &str,
) -> Result<(), VhostUserBlkError> {
    VhostUserBlkServer::bind(socket, api_socket, serial)?.serve()
}

/// A back end whose API socket is bound but which has not started serving: lets the
/// binary create the socket (bind, chmod) before its seccomp filter is on.
pub struct VhostUserBlkServer {
    backend: VhostUserBlkBackend,
    api: ApiServer,
    socket: PathBuf,
}

impl VhostUserBlkServer {
    /// Checks `serial` and both paths (neither may exist), then binds the API socket.
    pub fn bind(socket: &Path, api_socket: &Path, serial: &str) -> Result<Self, VhostUserBlkError> {
        // vhost's listener would silently replace whatever is there; a live back end's
        // socket must not be stolen.
        if socket.symlink_metadata().is_ok() {
            return Err(VhostUserBlkError::SocketExists(socket.to_path_buf()));
        }
        let backend = VhostUserBlkBackend::new(serial, socket)?;
        let drives = vec![DriveHandle {
            slot: backend.slot(),
            read_only: false,
        }];
        let api = ApiServer::bind(api_socket, drives).map_err(VhostUserBlkError::Api)?;
        Ok(Self {
            backend,
            api,
            socket: socket.to_path_buf(),
        })
    }

    /// Starts the API thread, then serves QEMU until it disconnects. Both sockets are
    /// removed on return.
    pub fn serve(self) -> Result<(), VhostUserBlkError> {
        let api_socket = self.api.path().to_path_buf();
        let api_thread = match self.api.spawn() {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&api_socket);
                return Err(VhostUserBlkError::Api(e));
            }
        };
        let result = serve(self.backend, &self.socket);
        if api_thread.stop("vhost-user-blk API").is_err() {
            tracing::warn!("vhost-user-blk: the API thread could not be stopped");
        }
        let _ = std::fs::remove_file(&api_socket);
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

fn serve(backend: VhostUserBlkBackend, socket: &Path) -> Result<(), VhostUserBlkError> {
    let slot = backend.slot();
    let result = run_daemon(
        "crx-vhost-blk",
        Arc::new(RwLock::new(backend)),
        socket,
        |_| Ok::<(), VhostUserBlkError>(()),
    );
    // QEMU is gone: a backing still attached gets its writes flushed.
    if let Some(b) = slot.backing() {
        if let Err(e) = b.flush() {
            tracing::warn!(error = %e, "vhost-user-blk: final fdatasync of the backing failed");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{
        Backing, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    };
    use crate::devices::virtio::test_utils::TestDir;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    fn backend(dir: &TestDir, serial: &str) -> VhostUserBlkBackend {
        VhostUserBlkBackend::new(serial, &dir.0.join("blk.sock")).unwrap()
    }

    fn u32_at(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn get_config_reports_capacity_seg_max_and_blk_size_of_the_slot() {
        let dir = TestDir::new("vhu-blk-config");
        let b = backend(&dir, "vol-1");
        // QEMU 7.2 reads the whole struct virtio_blk_config (60 bytes).
        let empty = b.get_config(0, 60);
        assert_eq!(empty.len(), 60);
        assert_eq!(
            &empty[0..8],
            &0u64.to_le_bytes(),
            "an empty slot has capacity 0"
        );
        assert_eq!(
            u32_at(&empty, 12),
            SEG_MAX,
            "seg_max fits QEMU's default queue"
        );
        assert_eq!(u32_at(&empty, 20), 512, "blk_size");
        assert!(
            empty[24..].iter().all(|b| *b == 0),
            "fields past crx's config read 0"
        );

        let image = dir.0.join("disk.img");
        std::fs::write(&image, vec![7u8; 3 * 4096]).unwrap();
        let sectors = b
            .slot()
            .replace_backing(Some(Backing::open(&image, false).unwrap()))
            .unwrap();
        assert_eq!(sectors, 24);
        assert_eq!(&b.get_config(0, 8)[..], &24u64.to_le_bytes());
        // Partial and out-of-range reads.
        assert_eq!(b.get_config(4, 4), vec![0; 4]);
        assert_eq!(b.get_config(20, 8), vec![0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(u32::MAX, 2), vec![0, 0]);
        assert_eq!(
            b.get_config(0, u32::MAX).len(),
            super::super::MAX_CONFIG_READ as usize
        );

        b.slot().replace_backing(None).unwrap();
        assert_eq!(&b.get_config(0, 8)[..], &0u64.to_le_bytes());
    }

    #[test]
    fn advertises_blk_features_and_the_protocol_features_qemu_needs() {
        let dir = TestDir::new("vhu-blk-features");
        let b = backend(&dir, "s");
        assert_eq!(b.num_queues(), 1);
        assert!(b.max_queue_size() >= 1024);
        let f = b.features();
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VERSION_1"),
            (VIRTIO_BLK_F_FLUSH, "FLUSH"),
            (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
            (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
            (1 << 30, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            assert_ne!(f & bit, 0, "{name} not offered");
        }
        assert_eq!(
            f & VIRTIO_BLK_F_RO,
            0,
            "an empty slot is never advertised RO"
        );
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::BACKEND_REQ));
        assert!(
            !p.contains(VhostUserProtocolFeatures::REPLY_ACK),
            "a config change must not wait for QEMU, which reads the config back from us"
        );
    }

    #[test]
    fn a_long_serial_and_an_existing_socket_fail_before_any_socket_exists() {
        let dir = TestDir::new("vhu-blk-input");
        let (sock, api) = (dir.0.join("blk.sock"), dir.0.join("api.sock"));
        let err = serve_vhost_user_blk(&sock, &api, "123456789012345678901").unwrap_err();
        assert!(matches!(
            err,
            VhostUserBlkError::Slot(BlockError::SerialTooLong(21))
        ));
        assert!(err.is_bad_input());
        assert!(!sock.exists() && !api.exists());

        std::fs::write(&sock, b"someone else's").unwrap();
        let err = serve_vhost_user_blk(&sock, &api, "ok").unwrap_err();
        assert!(matches!(err, VhostUserBlkError::SocketExists(_)));
        assert!(err.is_bad_input());
        assert_eq!(std::fs::read(&sock).unwrap(), b"someone else's");
        assert!(!api.exists());

        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&api, b"another api").unwrap();
        let err = serve_vhost_user_blk(&sock, &api, "ok").unwrap_err();
        assert!(matches!(
            err,
            VhostUserBlkError::Api(ApiError::PathExists(_))
        ));
        assert!(err.is_bad_input());
        assert_eq!(std::fs::read(&api).unwrap(), b"another api");
        assert!(!sock.exists());
    }
}
