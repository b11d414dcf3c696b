//! Fuzz target: the `bitmap` model of `tests/models/bitmap.rs` (also run as a proptest by
//! `cargo test`, in `tests/models.rs`).

#![no_main]

#[path = "../../tests/models/input.rs"]
mod input;
#[path = "../../tests/models/bitmap.rs"]
mod model;

libfuzzer_sys::fuzz_target!(|data: &[u8]| model::check(data));
