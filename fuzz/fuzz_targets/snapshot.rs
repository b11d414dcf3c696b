//! Fuzz target: the `snapshot` model of `tests/models/snapshot.rs` (also run as a proptest by
//! `cargo test`, in `tests/models.rs`).

#![no_main]

#[path = "../../tests/models/input.rs"]
mod input;
#[path = "../../tests/models/snapshot.rs"]
mod model;

libfuzzer_sys::fuzz_target!(|data: &[u8]| model::check(data));
