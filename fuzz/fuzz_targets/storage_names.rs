#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ociedge::fuzzing::storage_names(data));
