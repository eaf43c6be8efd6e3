//! Architecture-specific guest setup. crx-vmm runs x86_64 guests only.

pub mod x86_64;
