//! crx-agent's modules, compiled as a library for the fuzz targets: the agent is a
//! binary only. Module declarations come from agent/src/main.rs (build.rs); `fuzzing`
//! holds what each target does with one input.

// The targets use a few entry points of a whole agent.
#![allow(dead_code, unused_imports, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/agent_modules.rs"));

#[path = "../../src/fuzzing.rs"]
pub mod fuzzing;
