//! Opening a tap device in the calling thread's network namespace.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use super::NetworkError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, and the union's rest.
#[repr(C)]
struct TunRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Creates tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) and returns its queue. The
/// device is not persistent: it goes away when the last descriptor closes.
pub fn create(name: &str) -> Result<OwnedFd, NetworkError> {
    let err = |source| NetworkError::Tap {
        name: name.to_owned(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(err)?;
    let mut req = TunRequest {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open tun descriptor and `req` a properly sized ifreq that
    // outlives the call; the kernel writes only within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file.into())
}
