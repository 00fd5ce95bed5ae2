//! cargo fuzz target `trace_jsonl`: see [`qvl_fuzz::trace_jsonl`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qvl_fuzz::trace_jsonl(data));
