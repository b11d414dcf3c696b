//! The fuzz targets' models (`tests/models/*.rs`) inside `cargo test`, so a developer without
//! cargo-fuzz still runs them: each model on random inputs (proptest), and on every input of
//! the seed corpus kept in `fuzz/corpus/` (what the fuzzers found interesting, replayed as a
//! regression suite).

#[path = "models/bitmap.rs"]
mod bitmap;
#[path = "models/guest_memory.rs"]
mod guest_memory;
#[path = "models/input.rs"]
mod input;
#[path = "models/regions.rs"]
mod regions;
#[path = "models/snapshot.rs"]
mod snapshot;

use proptest::prelude::*;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        check(&data);
        n += 1;
    }
    n
}

#[test]
fn seed_corpus_replays() {
    for (target, check) in [
        ("guest_memory", guest_memory::check as fn(&[u8])),
        ("bitmap", bitmap::check),
        ("regions", regions::check),
        ("snapshot", snapshot::check),
    ] {
        let n = replay(target, check);
        assert!(n > 0, "no seed corpus for {target} in fuzz/corpus");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn guest_memory_model(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        guest_memory::check(&data);
    }

    #[test]
    fn bitmap_model(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        bitmap::check(&data);
    }

    #[test]
    fn regions_model(data in prop::collection::vec(any::<u8>(), 0..3000)) {
        regions::check(&data);
    }

    #[test]
    fn snapshot_model(data in prop::collection::vec(any::<u8>(), 0..600)) {
        snapshot::check(&data);
    }
}
