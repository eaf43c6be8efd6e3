//! The one conversion of a raw libc return value into an `io::Result`.

use std::io;

/// `Err(errno)` when a libc call signalled failure with a negative return, else the
/// value itself (a count, an fd, or 0).
pub fn cvt<T: Copy + Default + PartialOrd>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
