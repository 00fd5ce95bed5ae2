//! cargo fuzz target `swap_record`: see [`qvl_fuzz::swap_record`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::swap_record(data));
