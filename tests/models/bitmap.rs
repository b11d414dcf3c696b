//! The dirty bitmap against a `BTreeSet` of dirty pages: sequences of marks (through the bitmap
//! and through slices at offsets), takes (as words and as runs), merges, restores and resets.

use std::collections::BTreeSet;

use super::input::Input;
use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};

/// Runs the model on one input; panics on any disagreement.
pub fn check(data: &[u8]) {
    let mut input = Input(data);
    let page_size = [512usize, 4096, 65536][input.u8() as usize % 3];
    let len = input.u16() as usize * 64 + input.u8() as usize;
    let Ok(bm) = AtomicBitmap::new(len, page_size) else { return };
    let pages = len.div_ceil(page_size);
    assert_eq!(bm.num_pages(), pages);
    let mut model = BTreeSet::new();
    let mut words = vec![0u64; bm.num_words()];
    while !input.is_empty() {
        match input.u8() % 7 {
            0 | 1 => {
                // A mark of a byte range, possibly through a slice at an offset; clipped at the
                // end of the bitmap, never a panic.
                let offset = input.u16() as usize * 37 % (len + 100);
                let n = input.u16() as usize;
                if input.bool() {
                    Bitmap::mark_dirty(&bm, offset, n);
                } else {
                    let base = offset / 2;
                    bm.slice_at(base).mark_dirty(offset - base, n);
                }
                if n > 0 && offset < len {
                    let end = (offset + n).min(len);
                    model.extend(offset / page_size..=(end - 1) / page_size);
                }
            }
            2 => {
                let mut runs = BTreeSet::new();
                let mut last_end = None;
                let taken = bm.take_dirty_runs(|first, n| {
                    assert!(n > 0);
                    // Maximal runs: never adjacent to the previous one.
                    assert!(last_end.is_none_or(|e| first > e));
                    last_end = Some(first + n);
                    runs.extend(first..first + n);
                });
                assert_eq!(taken, runs.len());
                assert_eq!(runs, model);
                model.clear();
            }
            3 => {
                let taken = bm.take_dirty_words(&mut words).unwrap();
                let got: BTreeSet<usize> =
                    (0..pages).filter(|p| words[p / 64] & (1 << (p % 64)) != 0).collect();
                assert_eq!(taken, got.len());
                assert_eq!(got, model);
                model.clear();
            }
            4 => {
                // Merge (or restore) random words: bits past the last page are ignored.
                let n = (input.u8() as usize).min(bm.num_words());
                let mut add = vec![0u64; n];
                for w in add.iter_mut() {
                    *w = input.u64();
                }
                if input.bool() { bm.merge_words(&add) } else { bm.restore(&add) }.unwrap();
                for (i, w) in add.iter().enumerate() {
                    model.extend(
                        (0..64).filter(|b| w & (1 << b) != 0).map(|b| i * 64 + b).filter(|&p| p < pages),
                    );
                }
                let too_many = vec![0u64; bm.num_words() + 1];
                assert!(bm.merge_words(&too_many).is_err());
            }
            5 => {
                assert_eq!(bm.dirty_page_count(), model.len());
                let p = input.u16() as usize;
                assert_eq!(bm.is_page_dirty(p), model.contains(&p));
                let o = input.u16() as usize * 13;
                assert_eq!(Bitmap::dirty_at(&bm, o), o < len && model.contains(&(o / page_size)));
            }
            _ => {
                bm.reset();
                model.clear();
            }
        }
    }
    assert_eq!(bm.dirty_page_count(), model.len());
}
