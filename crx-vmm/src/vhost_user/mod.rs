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

use std::path::Path;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};

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
