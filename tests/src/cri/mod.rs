//! CRI tests' harness: a private containerd with its CRI plugin enabled and crx's
//! runtime handler installed from the shipped drop-in (`deploy/containerd/crx.toml`),
//! pods on the test bridge network (`deploy/cni/10-crx-test-bridge.conflist`) and a
//! locally built pause image, driven by a CRI v1 client over its socket.

pub mod client;
pub mod config;
pub mod harness;
pub mod images;
pub mod specs;
pub mod streaming;
pub mod suite;

pub use client::{CriClient, CriError};
pub use harness::{CriContainerd, HarnessError};
pub use images::PAUSE_IMAGE;
