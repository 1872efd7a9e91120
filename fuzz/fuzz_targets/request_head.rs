#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ociedge::fuzzing::request_head(data));
