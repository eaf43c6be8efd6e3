//! crx-bench: benchmark programs (placeholder).
fn main() {}
