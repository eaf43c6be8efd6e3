//! Shared helpers of the crx integration tests and benchmarks.
