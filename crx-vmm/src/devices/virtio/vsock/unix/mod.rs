//! The host side of hybrid vsock: a listening Unix socket for host-initiated
//! connections (`CONNECT <port>\n` → `OK <hostport>\n`) and `<uds_path>_<port>` sockets
//! for guest-initiated ones, multiplexed behind one epoll fd.

mod connect;
mod handshake;
mod muxer;

pub use muxer::{MuxerConfig, VsockMuxer};
