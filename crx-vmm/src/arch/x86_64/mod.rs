//! x86_64 guest setup: memory layout, boot protocols (PVH and the Linux zero page),
//! the MP table, CPUID and the initial vCPU state.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod pvh;
pub mod regs;
pub mod zero_page;
