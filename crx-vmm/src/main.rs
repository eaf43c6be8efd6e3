//! `crx-vmm` command line (placeholder; see issue 2).
fn main() {}
