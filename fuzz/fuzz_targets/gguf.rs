//! cargo fuzz target `gguf`: see [`qvl_fuzz::gguf`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::gguf(data));
