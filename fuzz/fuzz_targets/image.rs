//! cargo fuzz target `image`: see [`qvl_fuzz::image`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::image(data));
