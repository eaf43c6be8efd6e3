//! virtio-vsock device and hybrid Unix-socket muxer (placeholder; see issue 2).
