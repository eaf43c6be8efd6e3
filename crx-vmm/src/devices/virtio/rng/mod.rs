//! virtio-rng (entropy device, ID 4): the guest posts device-writable buffers and the
//! host fills them from its own CSPRNG (`getrandom(2)`, the same pool `/dev/urandom`
//! reads).
//!
//! Split by job:
//! - `device.rs`: the [`Rng`] [`VirtioDevice`](super::VirtioDevice): one queue, no
//!   config space, `VIRTIO_F_VERSION_1` only; activation starts the `crx-rng` thread;
//! - `event_loop.rs`: that thread, which waits on the queue's eventfd and an exit
//!   eventfd and answers every request it finds.
//!
//! Everything the guest posts is untrusted: one request is served at most
//! [`MAX_REQUEST_BYTES`] (a bigger buffer gets that many bytes, which the spec allows,
//! since the used length says how much was written), and a chain with a device-readable
//! descriptor or an address outside guest memory is returned with 0 bytes written.

mod device;
mod event_loop;

pub use device::Rng;

/// virtio device ID of the entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// The one queue (requestq) and its maximum size.
pub const QUEUE_SIZES: [u16; 1] = [256];
/// Most bytes written for one request, so a guest cannot make the device thread
/// produce (and hold) an unbounded amount of host randomness per descriptor chain.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why one request could not be served; the chain goes back with 0 bytes written.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("descriptor chain holds a device-readable descriptor")]
    ReadOnlyDescriptor,
    #[error("descriptor [{addr:#x}, +{len:#x}) lies outside guest memory")]
    OutOfMemory { addr: u64, len: usize },
    #[error("host getrandom(2) failed")]
    GetRandom(#[source] std::io::Error),
    #[error("cannot write random bytes into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

#[cfg(test)]
mod tests;
