//! The `qvl` binary.
fn main() {}
