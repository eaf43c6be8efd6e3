//! virtio-net (network device, ID 1) on a tap file descriptor the caller opened, with
//! both queues served in userspace (this host has no `/dev/vhost-net`).
//!
//! Split by job:
//! - `tap.rs`: the tap fd: [`open_tap`] for callers, [`Tap::from_inherited_fd`] to
//!   check an inherited fd really is a tap in the mode we need, the vnet-header size,
//!   non-blocking mode and the offload ioctl;
//! - `device.rs`: the [`Net`] [`VirtioDevice`](super::VirtioDevice): features, config
//!   space (MAC, link status, MTU), activation of the `crx-net` thread;
//! - `event_loop.rs`: that thread: tx chains written to the tap, tap frames copied into
//!   rx buffers;
//! - `frame.rs`: the guest-facing parsing (header checks, chain → iovecs, rx buffer
//!   gathering), each bound in one place;
//! - `bench.rs`: the back end driven directly (no guest) for `crx-bench net`;
//! - `netns.rs`: the throwaway network namespaces, taps and packet sockets the tests
//!   and the benchmark use.
//!
//! # Creating the tap
//!
//! `ip tuntap add` is not enough: crx-vmm needs an open file descriptor attached to the
//! tap, with a virtio-net header in front of every frame. The caller (the shim, a test,
//! the L1 lane) opens `/dev/net/tun`, attaches it with `TUNSETIFF` and
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` — [`open_tap`] does exactly that, in the caller's
//! current network namespace — brings the link up (`ip link set NAME up`), clears
//! `FD_CLOEXEC` on the fd and passes it to crx-vmm as `--net fd=N,mac=..[,mtu=M]`.
//! crx-vmm checks the fd with `TUNGETIFF` and refuses (exit code 2) anything that is not
//! a tap in that mode. A non-persistent tap disappears when its last fd closes.
//!
//! # Features and why
//!
//! - `VERSION_1`, `MAC`, `MTU` (the guest uses the MTU it is given), `STATUS` (link up).
//! - Checksum and segmentation offloads in both directions: `CSUM`, `HOST_TSO4/6`,
//!   `HOST_ECN` (the guest may hand us partial-checksum and TSO frames: the tap takes
//!   the header as-is and the host kernel finishes them) and `GUEST_CSUM`,
//!   `GUEST_TSO4/6`, `GUEST_ECN` (the guest accepts them: on activation `TUNSETOFFLOAD`
//!   gets exactly the matching `TUN_F_*` bits, so the host kernel only hands over frames
//!   the guest agreed to). This is where TCP throughput comes from: 64 KiB per frame
//!   instead of 1.5 KiB, and no checksum computed twice.
//! - Not offered: UFO (Linux removed UDP fragmentation offload; guests do not use it),
//!   the control queue (no runtime MAC or filtering changes needed by a pod), multiqueue
//!   and `EVENT_IDX` (one vCPU-side notification per kick is fine at our rates).
//! - `MRG_RXBUF`: the guest posts page-sized rx buffers and a big frame spans several
//!   (`num_buffers` in the header). Without it, a guest that accepts TSO must post
//!   ~64 KiB per rx buffer, which wastes guest memory and caps the rx ring at a few
//!   frames. The header is the 12-byte `virtio_net_hdr_v1` either way (VERSION_1), so
//!   the tap is set to 12 bytes (`TUNSETVNETHDRSZ`) once.
//!
//! # Data path
//!
//! tx: each chain is checked (device-readable only, at least the header, at most
//! header + [`MAX_FRAME_LEN`]; offload bits only if negotiated) and written to the tap
//! with one `writev` straight from guest memory. rx: a frame is read from the tap into
//! one host buffer, then copied into as many rx buffers as it needs; when the guest has
//! too few, the frame waits and the thread stops reading the tap until the rx queue is
//! notified (the tap is edge-triggered in epoll, so nothing spins). Notifications
//! (VM exits) are kept to what is needed without `EVENT_IDX`: the driver is asked not
//! to notify the tx queue while the thread drains it, and the rx queue at all except
//! while a frame waits for buffers (rx buffers are looked for when a frame arrives). A frame whose tap
//! header carries an offload the driver did not accept (queued before a reset) is
//! dropped.
//!
//! # Syscalls (for the seccomp filters)
//!
//! The `crx-net` thread: `ioctl(tap, TUNSETOFFLOAD = 0x400454d0)` (first thing, before
//! any read: activation waits for it), `epoll_create1`, `epoll_ctl`, `epoll_wait` (or
//! `epoll_pwait`), `read` (tap, eventfds), `write` (irqfd), `writev` (tap), `close`
//! (its epoll fd at exit), `futex` (the device mutex, the activation handshake,
//! tracing), `mmap`/`munmap`/`madvise` (allocator), `sigaltstack`, `rt_sigprocmask`,
//! `exit` (thread end). The activating vCPU thread needs nothing net-specific (it
//! waits on a channel: `futex`). Build time only (main thread, before any guest input):
//! `fcntl(F_GETFD, F_GETFL, F_SETFL)`, `ioctl(TUNGETIFF = 0x800454d2,
//! TUNSETVNETHDRSZ = 0x400454d8, TUNSETOFFLOAD)`. `open_tap` (callers, not crx-vmm)
//! uses `openat("/dev/net/tun")` and `ioctl(TUNSETIFF)`.

pub mod bench;
mod device;
mod event_loop;
mod frame;
pub mod netns;
mod tap;

pub use device::Net;
pub use tap::{check_inherited_tap, open_tap, Tap};

/// virtio device ID of the network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// rx and tx queue, in that order, and their maximum sizes.
pub const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Queue index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Queue index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Size of `virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (without the virtio-net header) either way: a 64 KiB GSO frame plus
/// its Ethernet header and VLAN tag, as Linux's virtio-net sizes its big buffers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest chain or tap read: header plus frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Feature bits (virtio 1.2, 5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// `virtio_net_config.status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `virtio_net_hdr.flags`: the checksum is partial (csum_start/csum_offset).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the host already verified the checksum.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr.gso_type` values.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Why the tap could not be used, or one frame could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap fd {0} is not open in crx-vmm: the caller must pass it without FD_CLOEXEC")]
    FdNotOpen(i32),
    #[error("fd {fd} is not a tap (TUNGETIFF failed): open /dev/net/tun with TUNSETIFF and pass that fd")]
    NotATap {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} is a tun/tap device `{name}` but not in the mode crx-vmm needs (flags {flags:#x}): open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    WrongMode { fd: i32, name: String, flags: u16 },
    #[error("tap name `{0}` is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot create tap `{name}` (TUNSETIFF)")]
    CreateTap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot configure the tap fd ({what})")]
    Configure {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    /// Whether the error is the caller's input (a wrong fd), not a host failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetError::FdNotOpen(_) | NetError::NotATap { .. } | NetError::WrongMode { .. }
        )
    }
}

#[cfg(test)]
mod tests;
