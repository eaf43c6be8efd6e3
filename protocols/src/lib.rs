//! The shim ⇄ agent protocol of crx.
//!
//! The `.proto` files in `proto/crx/agent/v1/` are the protocol's documentation; this
//! crate compiles them (at build time, into `OUT_DIR`) into protobuf messages and async
//! ttrpc clients and servers, and adds the host-side pieces every user of the protocol
//! needs: the hybrid-vsock handshake ([`hybrid_vsock`]) and the boot-marker port values
//! the agent and the VMM agree on ([`boot_marker`]).

pub mod boot_marker;
pub mod hybrid_vsock;
pub mod port_forward;

/// The protocol version this crate implements, reported by `Health.Version`. It grows
/// by one with every additive change to package `crx.agent.v1` (see `health.proto`,
/// which lists what each version added).
pub const PROTOCOL_VERSION: u32 = 4;

/// The vsock port the agent serves ttrpc on inside the VM.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port of the agent's process stdio streams (one connection per stream,
/// see `stdio.proto`; draft for protocol version 3).
pub const STDIO_VSOCK_PORT: u32 = 1026;

/// The vsock port of the agent's forwarded TCP connections (one vsock connection per
/// TCP connection, see `portforward.proto` and [`port_forward`]).
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1027;

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
    /// Messages of `container.proto` (draft for protocol version 3).
    pub use crate::generated::container;
    /// `Containers` service (draft for protocol version 3): containers and processes.
    pub use crate::generated::container_ttrpc;
    /// Messages of `health.proto`.
    pub use crate::generated::health;
    /// `Health` service: async client ([`health_ttrpc::HealthClient`]) and server trait
    /// ([`health_ttrpc::Health`], registered with [`health_ttrpc::create_health`]).
    pub use crate::generated::health_ttrpc;
    /// Messages of `metrics.proto`: cgroup v2 figures, wire-compatible with containerd's
    /// `io.containerd.cgroups.v2.Metrics`.
    pub use crate::generated::metrics;
    /// Messages of `portforward.proto` (draft on top of protocol version 3).
    pub use crate::generated::portforward;
    /// `PortForward` service: the guest's listening TCP ports.
    pub use crate::generated::portforward_ttrpc;
    /// Messages of `sandbox.proto` (draft for protocol version 3).
    pub use crate::generated::sandbox;
    /// `Sandbox` service (draft for protocol version 3): pod set-up and tear-down.
    pub use crate::generated::sandbox_ttrpc;
    /// Messages of `stdio.proto`: the header of a stdio stream connection.
    pub use crate::generated::stdio;
    /// Messages of `storage.proto` (protocol version 2).
    pub use crate::generated::storage;
    /// `Storage` service: async client ([`storage_ttrpc::StorageClient`]) and server trait
    /// ([`storage_ttrpc::Storage`], registered with [`storage_ttrpc::create_storage`]).
    pub use crate::generated::storage_ttrpc;
}

/// ttrpc service names as they appear on the wire (`<package>.<service>`).
pub mod service_names {
    /// The `Health` service.
    pub const HEALTH: &str = "crx.agent.v1.Health";
    /// The `Agent` service.
    pub const AGENT: &str = "crx.agent.v1.Agent";
    /// The `Storage` service (protocol version 2).
    pub const STORAGE: &str = "crx.agent.v1.Storage";
    /// The `Sandbox` service (draft for protocol version 3).
    pub const SANDBOX: &str = "crx.agent.v1.Sandbox";
    /// The `Containers` service (draft for protocol version 3).
    pub const CONTAINERS: &str = "crx.agent.v1.Containers";
    /// The `PortForward` service (draft on top of protocol version 3).
    pub const PORT_FORWARD: &str = "crx.agent.v1.PortForward";
}
