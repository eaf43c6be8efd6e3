//! The bounded buffer of guest→host bytes a host socket has not accepted yet.
//!
//! Its capacity is the credit the connection advertises to the guest, so a guest that
//! respects flow control can never overflow it; one that does not is reset.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub struct TxBuf {
    data: VecDeque<u8>,
    capacity: usize,
}

impl TxBuf {
    pub fn new(capacity: usize) -> Self {
        Self {
            data: VecDeque::new(),
            capacity,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn free(&self) -> usize {
        self.capacity - self.data.len()
    }

    /// Appends `src`; the caller has checked it fits.
    pub fn push<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) {
        let mut tmp = vec![0u8; src.len()];
        let n = src.copy_to(&mut tmp[..]);
        self.data.extend(&tmp[..n]);
    }

    /// Writes as much as `sink` takes; returns the bytes written. `WouldBlock` is not
    /// an error here: it just means the sink is full for now.
    pub fn flush_to<W: Write>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while !self.data.is_empty() {
            let (front, _) = self.data.as_slices();
            match sink.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.data.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.data.is_empty() {
            // A burst can leave a large allocation behind; idle connections should not
            // keep it.
            self.data.shrink_to(4096);
        }
        Ok(total)
    }
}
