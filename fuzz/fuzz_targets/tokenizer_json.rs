//! cargo fuzz target `tokenizer_json`: see [`qvl_fuzz::tokenizer_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::tokenizer_json(data));
