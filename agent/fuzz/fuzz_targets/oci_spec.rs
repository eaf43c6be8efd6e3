//! Bytes → OCI spec (and exec process) preparation, written into a scratch bundle.
#![no_main]

use std::sync::OnceLock;

use crx_agent_fuzz::fuzzing::{oci_spec, SpecScratch};

/// One scratch directory per fuzzing process, under $TMPDIR (left for inspection).
fn scratch() -> &'static SpecScratch {
    static SCRATCH: OnceLock<SpecScratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("crx-fuzz-oci-spec-{}", std::process::id()));
        SpecScratch::new(&dir).unwrap_or_else(|e| panic!("scratch {}: {e}", dir.display()))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    oci_spec(scratch(), data);
});
