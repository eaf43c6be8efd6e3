//! Bytes → one ttrpc request type's protobuf decoding and the agent's checks of it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    crx_agent_fuzz::fuzzing::request_decode(data);
});
