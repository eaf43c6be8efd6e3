//! Legacy port-I/O devices: the 8250 console, the i8042 reset line, and crx's
//! boot-marker port.

pub mod boot_marker;
pub mod i8042;
pub mod serial;
