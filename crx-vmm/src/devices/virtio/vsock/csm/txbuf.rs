//! The bounded buffer of guest→host bytes a host socket has not accepted yet.
//!
//! Its capacity is the credit the connection advertises to the guest, so a guest that
//! respects flow control can never overflow it; one that does not is reset. It is a
//! ring allocated on first use: most connections never back up and never pay for it,
//! and one that does keeps it rather than reallocating on every burst.

use std::io::{self, Write};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub struct TxBuf {
    buf: Vec<u8>,
    capacity: usize,
    head: usize,
    len: usize,
}

impl TxBuf {
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            capacity,
            head: 0,
            len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn free(&self) -> usize {
        self.capacity - self.len
    }

    /// Appends `src`; false (and nothing appended) if it does not fit.
    pub fn push<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) -> bool {
        let n = src.len();
        if n > self.free() {
            return false;
        }
        if self.buf.is_empty() {
            self.buf = vec![0; self.capacity];
        }
        let tail = (self.head + self.len) % self.capacity;
        let first = n.min(self.capacity - tail);
        let copied = match (src.subslice(0, first), src.subslice(first, n - first)) {
            (Ok(a), Ok(b)) => {
                a.copy_to(&mut self.buf[tail..tail + first]) + b.copy_to(&mut self.buf[..n - first])
            }
            _ => return false,
        };
        self.len += copied;
        copied == n
    }

    /// Writes as much as `sink` takes; returns the bytes written. `WouldBlock` is not
    /// an error here: it just means the sink is full for now.
    pub fn flush_to<W: Write>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            let end = (self.head + self.len).min(self.capacity);
            match sink.write(&self.buf[self.head..end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.head = (self.head + n) % self.capacity;
                    self.len -= n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.len == 0 {
            self.head = 0;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(data: &mut [u8]) -> VolatileSlice<'_, ()> {
        VolatileSlice::from(data)
    }

    /// A sink that takes at most `room` bytes per call.
    struct Trickle {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn wraps_around_and_keeps_order_and_bound() {
        let mut t = TxBuf::new(10);
        let mut sink = Trickle {
            got: Vec::new(),
            room: 0,
        };
        assert!(t.push(&vs(&mut [1, 2, 3, 4, 5, 6, 7])));
        assert!(!t.push(&vs(&mut [0; 4])), "over capacity refused");
        sink.room = 5;
        assert_eq!(t.flush_to(&mut sink).unwrap(), 5);
        assert!(t.push(&vs(&mut [8, 9, 10, 11, 12, 13, 14, 15])));
        assert_eq!(t.free(), 0);
        sink.room = 100;
        assert_eq!(t.flush_to(&mut sink).unwrap(), 10);
        assert!(t.is_empty());
        assert_eq!(sink.got, (1..=15).collect::<Vec<u8>>());
    }
}
