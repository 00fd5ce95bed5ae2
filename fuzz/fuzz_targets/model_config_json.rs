//! cargo fuzz target `model_config_json`: see [`qvl_fuzz::model_config_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::model_config_json(data));
