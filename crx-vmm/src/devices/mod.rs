//! Device models. Everything here parses guest-controlled data: bound every size,
//! check every index, never panic on what the guest wrote.

pub mod bus;
pub mod legacy;
pub mod virtio;
