//! crx's device back ends served over vhost-user, for QEMU (the `qemu` VM backend on
//! hosts where crx-vmm cannot run guests). Same device code as in process: vsock,
//! virtio-fs, and virtio-blk empty slots filled through crx-vmm's API socket.

mod backend_channel;
pub mod blk;
pub mod fs;
pub mod vsock;

pub use blk::{serve_vhost_user_blk, VhostUserBlkBackend, VhostUserBlkError, VhostUserBlkServer};
pub use fs::{serve_vhost_user_fs, VhostUserFsBackend, VhostUserFsError};
pub use vsock::{serve_vhost_user_vsock, VhostUserVsockBackend, VhostUserVsockError};

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::Listener;
use vhost_user_backend::{
    VhostUserBackend, VhostUserBackendMut, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;
type Vring = VringRwLock<Mem>;

/// Most config-space bytes one GET_CONFIG answers: QEMU asks for a device's whole
/// config struct (60 bytes for virtio-blk in QEMU 7.2), never more than this.
const MAX_CONFIG_READ: u32 = 256;

/// Why a back end's vhost-user daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user daemon failed while {step}: {detail}")]
pub struct DaemonError {
    pub step: &'static str,
    pub detail: String,
}

impl DaemonError {
    fn at(step: &'static str) -> impl Fn(vhost_user_backend::Error) -> DaemonError {
        move |e| DaemonError {
            step,
            detail: e.to_string(),
        }
    }
}

/// The event vhost-user-backend's worker threads watch to stop.
struct ExitEvent {
    consumer: EventConsumer,
    notifier: EventNotifier,
}

impl ExitEvent {
    fn new() -> io::Result<Self> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(Self { consumer, notifier })
    }

    /// Copies for one worker thread (`VhostUserBackend::exit_event`).
    fn pair(&self) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.consumer.try_clone().ok()?,
            self.notifier.try_clone().ok()?,
        ))
    }
}

/// `size` bytes of `config` from `offset` for GET_CONFIG (at most
/// [`MAX_CONFIG_READ`]); bytes past its end read as zero.
fn config_bytes(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    (0..size.min(MAX_CONFIG_READ))
        .map(|i| {
            offset
                .checked_add(i)
                .and_then(|o| config.get(o as usize).copied())
                .unwrap_or(0)
        })
        .collect()
}

/// None of crx's back ends offers EVENT_IDX; a front end that enables it anyway is
/// noted and otherwise ignored.
fn note_unoffered_event_idx(device: &str, enabled: bool) {
    if enabled {
        tracing::warn!("{device}: front end enabled EVENT_IDX, which was not offered");
    }
}

/// Serves every chain on `vring` with `serve`, which returns how many bytes it wrote
/// into the chain, then signals the guest once if any chain was used. Without guest
/// memory (before the front end sent its table) there is nothing to serve.
fn drain_vring(
    vring: &Vring,
    mem: Option<&Mem>,
    mut serve: impl FnMut(&MemGuard, DescriptorChain<MemGuard>) -> u32,
) -> io::Result<()> {
    let Some(atomic) = mem else {
        return Ok(());
    };
    let mem = atomic.memory();
    let mut used = false;
    loop {
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone());
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let len = serve(&mem, chain);
        vring.add_used(head, len).map_err(io::Error::other)?;
        used = true;
    }
    if used {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Runs one back end: creates its daemon (`name` names its threads), lets `setup` add
/// to the worker threads' event loops, serves one front end on `socket` until it goes
/// away, then stops the workers and removes the socket.
fn run_daemon<B, E>(
    name: &str,
    backend: Arc<RwLock<B>>,
    socket: &Path,
    setup: impl FnOnce(&[Arc<VringEpollHandler<Arc<RwLock<B>>>>]) -> Result<(), E>,
) -> Result<(), E>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = Vring> + Send + Sync + 'static,
    E: From<DaemonError>,
{
    let mut daemon = VhostUserDaemon::new(
        name.to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(DaemonError::at("creating the daemon"))?;
    let handlers = daemon.get_epoll_handlers();
    setup(&handlers)?;
    let result = serve_one_front_end(&mut daemon, socket).map_err(DaemonError::at("serving QEMU"));
    for h in &handlers {
        h.send_exit_event();
    }
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}

/// Serves one front end (QEMU) on a new listening `socket` until it goes away. Its
/// disconnect is how a back end's life normally ends, so it is not an error.
fn serve_one_front_end<T>(
    daemon: &mut VhostUserDaemon<T>,
    socket: &Path,
) -> Result<(), vhost_user_backend::Error>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    let mut listener =
        Listener::new(socket, true).map_err(vhost_user_backend::Error::CreateVhostUserListener)?;
    daemon.start(&mut listener)?;
    match daemon.wait() {
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        other => other,
    }
}
