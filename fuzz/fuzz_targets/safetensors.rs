//! cargo fuzz target `safetensors`: see [`qvl_fuzz::safetensors`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::safetensors(data));
