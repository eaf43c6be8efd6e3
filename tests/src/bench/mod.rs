//! The benchmark programs behind `crx-bench`: each measures side by side in one run,
//! prints its figures for people, and ends with one JSON object for machines.

pub mod blk;
pub mod boot;
pub mod container;
pub mod ctr;
pub mod fs;
pub mod net;
pub mod pod;
pub mod stats;
pub mod vmm;
pub mod vsock;
