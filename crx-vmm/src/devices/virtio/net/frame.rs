//! Everything the `crx-net` thread reads from the guest, checked in one place: a tx
//! chain becomes iovecs over guest memory (bounded, device-readable only, header
//! offload bits only as negotiated); an rx chain becomes the guest ranges a frame may
//! be copied into (device-writable only, inside guest memory).

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{
    MAX_BUFFER_LEN, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN,
};

/// Why a tx chain was dropped (it is still returned to the guest).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("tx chain has a device-writable descriptor")]
    WriteOnly,
    #[error("tx chain of {0} bytes is shorter than the virtio-net header")]
    TooShort(usize),
    #[error("tx chain is longer than {MAX_BUFFER_LEN} bytes")]
    TooLong,
    #[error("tx descriptor [{addr:#x}, +{len:#x}) lies outside guest memory")]
    OutOfMemory { addr: u64, len: usize },
    #[error("tx header asks for a checksum offload the driver did not negotiate")]
    CsumNotNegotiated,
    #[error("tx header has GSO type {0:#x}, which the driver did not negotiate")]
    GsoNotNegotiated(u8),
    #[error("rx frame needs an offload ({what}) the driver did not accept")]
    RxOffload { what: &'static str },
}

/// Scratch space for one tx chain, reused across chains so tx allocates nothing.
#[derive(Default)]
pub struct TxScratch {
    pub iovs: Vec<libc::iovec>,
    ranges: Vec<(GuestAddress, usize)>,
}

// SAFETY: the iovecs point into guest memory the event loop's `GuestMemoryMmap`
// keeps mapped; they are only used on the thread that owns the scratch space and are
// rebuilt for every chain.
unsafe impl Send for TxScratch {}

impl TxScratch {
    /// Checks a tx chain and fills `iovs` with it (header included, as the tap wants
    /// it). Returns the chain's length.
    pub fn gather(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        acked: u64,
    ) -> Result<usize, FrameError> {
        self.iovs.clear();
        self.ranges.clear();
        let mut total = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                return Err(FrameError::WriteOnly);
            }
            let len = desc.len() as usize;
            total += len;
            if total > MAX_BUFFER_LEN {
                return Err(FrameError::TooLong);
            }
            let out_of_memory = || FrameError::OutOfMemory {
                addr: desc.addr().0,
                len,
            };
            for slice in mem.get_slices(desc.addr(), len) {
                let slice = slice.map_err(|_| out_of_memory())?;
                self.iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: slice.len(),
                });
            }
            if len > 0 {
                self.ranges.push((desc.addr(), len));
            }
        }
        if total < VNET_HDR_LEN {
            return Err(FrameError::TooShort(total));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        self.read_prefix(mem, &mut hdr)
            .map_err(|_| FrameError::TooShort(total))?;
        check_tx_header(&hdr, acked)?;
        Ok(total)
    }

    fn read_prefix(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), ()> {
        let mut done = 0;
        for &(addr, len) in &self.ranges {
            if done == out.len() {
                break;
            }
            let n = len.min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
        }
        if done == out.len() {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// Refuses offload requests the driver did not negotiate: the tap would honour them,
/// but a driver that sends them is broken and the frame is not what it agreed to.
pub fn check_tx_header(hdr: &[u8; VNET_HDR_LEN], acked: u64) -> Result<(), FrameError> {
    let (flags, gso) = (hdr[0], hdr[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && acked & VIRTIO_NET_F_CSUM == 0 {
        return Err(FrameError::CsumNotNegotiated);
    }
    let needed = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE if gso == VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => return Err(FrameError::GsoNotNegotiated(gso)),
    };
    let ecn = if gso & VIRTIO_NET_HDR_GSO_ECN != 0 {
        VIRTIO_NET_F_HOST_ECN
    } else {
        0
    };
    if acked & (needed | ecn) != needed | ecn {
        return Err(FrameError::GsoNotNegotiated(gso));
    }
    Ok(())
}

/// Checks the header the tap put in front of an rx frame against what the driver
/// accepted. The tap only produces what `TUNSETOFFLOAD` allows, but frames queued
/// before a reset were made under the previous driver's offloads. A "checksum
/// verified" flag the driver cannot use is cleared; anything else unaccepted is an
/// error (the frame is dropped).
pub fn check_rx_header(hdr: &mut [u8], acked: u64) -> Result<(), FrameError> {
    let (Some(&flags), Some(&gso)) = (hdr.first(), hdr.get(1)) else {
        return Err(FrameError::RxOffload { what: "header" });
    };
    let csum = acked & VIRTIO_NET_F_GUEST_CSUM != 0;
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !csum {
        return Err(FrameError::RxOffload {
            what: "partial checksum",
        });
    }
    if flags & VIRTIO_NET_HDR_F_DATA_VALID != 0 && !csum {
        hdr[0] &= !VIRTIO_NET_HDR_F_DATA_VALID;
    }
    let needed = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE if gso == VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
        _ => return Err(FrameError::RxOffload { what: "GSO type" }),
    };
    let ecn = if gso & VIRTIO_NET_HDR_GSO_ECN != 0 {
        VIRTIO_NET_F_GUEST_ECN
    } else {
        0
    };
    if acked & (needed | ecn) != needed | ecn {
        return Err(FrameError::RxOffload {
            what: "segmentation",
        });
    }
    Ok(())
}

/// What was wrong with an rx chain's descriptors (the chain is still used, with what
/// it could hold).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxChainFaults {
    pub read_only: bool,
    pub out_of_memory: bool,
}

impl RxChainFaults {
    pub fn any(&self) -> bool {
        self.read_only || self.out_of_memory
    }
}

/// Appends the device-writable ranges of an rx chain inside guest memory to `ranges`;
/// returns their total (capped at [`MAX_BUFFER_LEN`], more is never written) and what
/// was skipped.
pub fn rx_ranges(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    ranges: &mut Vec<(GuestAddress, usize)>,
) -> (usize, RxChainFaults) {
    let mut faults = RxChainFaults::default();
    let mut capacity = 0usize;
    for desc in chain {
        if capacity == MAX_BUFFER_LEN {
            break;
        }
        if !desc.is_write_only() {
            faults.read_only = true;
            continue;
        }
        let len = (desc.len() as usize).min(MAX_BUFFER_LEN - capacity);
        if len == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), len) {
            faults.out_of_memory = true;
            continue;
        }
        ranges.push((desc.addr(), len));
        capacity += len;
    }
    (capacity, faults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::{VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV6};

    fn hdr(flags: u8, gso: u8) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = flags;
        h[1] = gso;
        h
    }

    #[test]
    fn rx_headers_pass_only_with_the_offloads_the_driver_accepted() {
        let tso4 = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
        let mut gso = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        assert!(check_rx_header(&mut gso, tso4).is_ok());
        assert!(check_rx_header(&mut gso, VIRTIO_NET_F_GUEST_CSUM).is_err());
        assert!(check_rx_header(&mut hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), 0).is_err());
        let mut ecn = hdr(0, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN);
        assert!(check_rx_header(&mut ecn, tso4).is_err());
        assert!(check_rx_header(&mut ecn, tso4 | VIRTIO_NET_F_GUEST_ECN).is_ok());
        assert!(
            check_rx_header(&mut hdr(0, 3), u64::MAX).is_err(),
            "UDP fragmentation"
        );
        let mut valid = hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0);
        assert!(check_rx_header(&mut valid, 0).is_ok());
        assert_eq!(valid[0], 0, "flag the driver cannot use is cleared");
        let mut valid = hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0);
        assert!(check_rx_header(&mut valid, VIRTIO_NET_F_GUEST_CSUM).is_ok());
        assert_eq!(valid[0], VIRTIO_NET_HDR_F_DATA_VALID);
    }

    #[test]
    fn offload_bits_pass_only_when_negotiated() {
        assert_eq!(check_tx_header(&hdr(0, 0), 0), Ok(()));
        assert_eq!(
            check_tx_header(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), 0),
            Err(FrameError::CsumNotNegotiated)
        );
        assert_eq!(
            check_tx_header(&hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), VIRTIO_NET_F_CSUM),
            Ok(())
        );
        let tso4 = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        assert!(check_tx_header(&tso4, VIRTIO_NET_F_CSUM).is_err());
        assert_eq!(
            check_tx_header(&tso4, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4),
            Ok(())
        );
        let tso6_ecn = hdr(0, VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN);
        assert!(check_tx_header(&tso6_ecn, VIRTIO_NET_F_HOST_TSO6).is_err());
        assert_eq!(
            check_tx_header(&tso6_ecn, VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN),
            Ok(())
        );
        // UDP (3), unknown types and a bare ECN bit are never accepted.
        for gso in [3u8, 5, 0x7f, VIRTIO_NET_HDR_GSO_ECN] {
            assert_eq!(
                check_tx_header(&hdr(0, gso), u64::MAX),
                Err(FrameError::GsoNotNegotiated(gso)),
                "gso {gso:#x}"
            );
        }
    }
}
