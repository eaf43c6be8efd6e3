//! virtio-mmio transport (placeholder; see issue 2).
