//! The per-connection state machine of a vsock stream (virtio 1.2 §5.10.6): REQUEST /
//! RESPONSE, RW with credit-based flow control both ways, SHUTDOWN half-closes,
//! CREDIT_UPDATE / CREDIT_REQUEST, and RST on any protocol error.

mod connection;
mod txbuf;

pub(crate) use connection::write_header;
pub use connection::{ConnKey, ConnState, Connection, GuestHeader, GuestOutcome, RxOutcome};
