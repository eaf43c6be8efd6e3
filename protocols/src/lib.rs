//! The shim ⇄ agent protocol of crx.
//!
//! The `.proto` files in `proto/crx/agent/v1/` are the protocol's documentation; this
//! crate compiles them (at build time, into `OUT_DIR`) into protobuf messages and async
//! ttrpc clients and servers, and adds the host-side pieces every user of the protocol
//! needs: the hybrid-vsock handshake ([`hybrid_vsock`]) and the boot-marker port values
//! the agent and the VMM agree on ([`boot_marker`]).

pub mod boot_marker;
pub mod hybrid_vsock;

/// The protocol version this crate implements, reported by `Health.Version`. It grows
/// by one with every additive change to package `crx.agent.v1` (see `health.proto`).
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent serves ttrpc on inside the VM.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Code generated from the `.proto` files by ttrpc-codegen and protobuf-codegen. The
/// lint exceptions stay on this module: the generated code is not ours to restyle.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    unused_qualifications,
    unsafe_op_in_unsafe_fn
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated/mod.rs"));
}

/// Package `crx.agent.v1`: messages and ttrpc services.
pub mod v1 {
    /// Messages of `agent.proto`.
    pub use crate::generated::agent;
    /// `Agent` service: async client ([`agent_ttrpc::AgentClient`]) and server trait
    /// ([`agent_ttrpc::Agent`], registered with [`agent_ttrpc::create_agent`]).
    pub use crate::generated::agent_ttrpc;
    /// Messages of `health.proto`.
    pub use crate::generated::health;
    /// `Health` service: async client ([`health_ttrpc::HealthClient`]) and server trait
    /// ([`health_ttrpc::Health`], registered with [`health_ttrpc::create_health`]).
    pub use crate::generated::health_ttrpc;
}

/// ttrpc service names as they appear on the wire (`<package>.<service>`).
pub mod service_names {
    /// The `Health` service.
    pub const HEALTH: &str = "crx.agent.v1.Health";
    /// The `Agent` service.
    pub const AGENT: &str = "crx.agent.v1.Agent";
}
