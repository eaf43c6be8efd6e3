//! Bytes → the stdio handshake's header reader and the agent's reply frame.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    crx_agent_fuzz::fuzzing::stream_header(data);
});
