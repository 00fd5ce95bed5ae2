//! cargo fuzz target `config_toml`: see [`qvl_fuzz::config_toml`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::config_toml(data));
