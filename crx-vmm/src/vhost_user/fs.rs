//! crx's virtio-fs server as a vhost-user-fs back end, so QEMU's
//! `vhost-user-fs-device` (with `tag=TAG` on QEMU's side, which owns the config
//! space) gives the guest the same confined share crx-vmm serves in process: no
//! virtiofsd per pod.
//!
//! The vhost-user-backend crate owns the protocol and the vrings; this module pops
//! each request off the hiprio and request vrings and hands it to the same
//! [`FsServer::handle_chain`] crx-vmm's `crx-fs` thread calls. The share is opened
//! before the socket exists, so a bad directory fails before QEMU can connect, and
//! no host path is used after that (see `devices::virtio::fs`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackendMut;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{
    drain_vring, note_unoffered_event_idx, run_daemon, DaemonError, ExitEvent, Mem, Vring,
};

use crate::devices::virtio::fs::{FsError, FsServer, QUEUE_SIZES};
use crate::devices::virtio::mmio::WarnLimiter;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// hiprio + one request queue.
const NUM_QUEUES: usize = QUEUE_SIZES.len();
/// QEMU sizes the queues itself (its `queue-size` property, 128 by default, at most
/// 1024) and refuses to start if the back end's maximum is smaller.
const MAX_QUEUE_SIZE: usize = 1024;

/// Why the vhost-user-fs back end stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error(
        "vhost-user socket {0} already exists (another back end, or a stale socket to remove)"
    )]
    SocketExists(PathBuf),
    #[error("cannot serve the share")]
    Share(#[source] FsError),
    #[error("cannot create the back end's exit event")]
    ExitEvent(#[source] io::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl VhostUserFsError {
    /// Whether the caller's input (socket path or directory) is at fault.
    pub fn is_bad_input(&self) -> bool {
        match self {
            VhostUserFsError::SocketExists(_) => true,
            VhostUserFsError::Share(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// The vhost-user-fs device state: the share's server plus the memory QEMU shared.
pub struct VhostUserFsBackend {
    server: Arc<FsServer>,
    mem: Option<Mem>,
    exit: ExitEvent,
    warn: WarnLimiter,
}

impl VhostUserFsBackend {
    pub fn new(server: Arc<FsServer>) -> Result<Self, VhostUserFsError> {
        let exit = ExitEvent::new().map_err(VhostUserFsError::ExitEvent)?;
        Ok(Self {
            server,
            mem: None,
            exit,
            warn: WarnLimiter::new(),
        })
    }

    /// Serves every request on `vring`, then signals the guest once.
    fn process(&mut self, vring: &Vring) -> io::Result<()> {
        let (server, warn) = (&self.server, &mut self.warn);
        drain_vring(vring, self.mem.as_ref(), |mem, chain| {
            server.handle_chain(mem, chain).unwrap_or_else(|e| {
                warn.warn(format_args!(
                    "vhost-user-fs: request returned with 0 bytes: {e}"
                ));
                0
            })
        })
    }
}

impl VhostUserBackendMut for VhostUserFsBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // MQ lets QEMU ask how many queues we serve; the config space (tag) is QEMU's.
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        note_unoffered_event_idx("vhost-user-fs", enabled);
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
                "vhost-user-fs: event {device_event} for {} vrings",
                vrings.len()
            ))),
        }
    }
}

/// Serves `dir` to one QEMU connection on the vhost-user socket `socket`; returns
/// when QEMU disconnects. The socket file is removed on return.
pub fn serve_vhost_user_fs(socket: &Path, dir: &Path) -> Result<(), VhostUserFsError> {
    // vhost's listener would silently replace whatever is there; a live back end's
    // socket must not be stolen.
    if socket.symlink_metadata().is_ok() {
        return Err(VhostUserFsError::SocketExists(socket.to_path_buf()));
    }
    let server = Arc::new(FsServer::open(dir).map_err(VhostUserFsError::Share)?);
    let backend = Arc::new(RwLock::new(VhostUserFsBackend::new(server)?));
    run_daemon("crx-vhost-fs", backend, socket, |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::TestDir;

    #[test]
    fn advertises_two_queues_version_1_and_protocol_features() {
        let dir = TestDir::new("vhu-fs");
        let server = Arc::new(FsServer::open(&dir.0).unwrap());
        let b = VhostUserFsBackend::new(server).unwrap();
        assert_eq!(b.num_queues(), 2, "hiprio + one request queue");
        assert!(b.max_queue_size() >= 1024);
        assert_ne!(b.features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(
            b.features() & (1 << 30),
            0,
            "VHOST_USER_F_PROTOCOL_FEATURES"
        );
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::MQ));
    }

    #[test]
    fn refuses_a_missing_dir_before_creating_the_socket() {
        let dir = TestDir::new("vhu-fs-missing");
        let sock = dir.0.join("fs.sock");
        let err = serve_vhost_user_fs(&sock, &dir.0.join("nope")).unwrap_err();
        assert!(matches!(
            err,
            VhostUserFsError::Share(FsError::NoDirectory(_))
        ));
        assert!(err.is_bad_input());
        assert!(!sock.exists(), "no socket for a back end that cannot serve");
    }

    #[test]
    fn refuses_an_existing_socket_path_and_leaves_it_alone() {
        let dir = TestDir::new("vhu-fs-exists");
        let sock = dir.0.join("fs.sock");
        std::fs::write(&sock, b"someone else's").unwrap();
        let err = serve_vhost_user_fs(&sock, &dir.0).unwrap_err();
        assert!(matches!(err, VhostUserFsError::SocketExists(_)));
        assert_eq!(std::fs::read(&sock).unwrap(), b"someone else's");
    }
}
