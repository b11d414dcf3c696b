//! Dirty bitmaps: a generic checker every bitmap type must pass, untracked bitmaps that must
//! record nothing, a proptest of `AtomicBitmap` against a `BTreeSet` of dirty pages, and
//! writers racing a harvester without losing a mark.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapError, BitmapSlice, DirtyHarvest, NewBitmap};
use guestmem::{Bytes, VolatileSlice};
use proptest::prelude::*;

/// Asserts that exactly the pages in `model` read dirty, probing the first and last byte of
/// every page of a `len`-byte region.
fn assert_dirty<B: Bitmap>(b: &B, model: &BTreeSet<usize>, len: usize, page_size: usize) {
    for page in 0..len.div_ceil(page_size) {
        let first = page * page_size;
        let last = (first + page_size - 1).min(len - 1);
        let want = model.contains(&page);
        assert_eq!(b.dirty_at(first), want, "first byte of page {page}");
        assert_eq!(b.dirty_at(last), want, "last byte of page {page}");
    }
    assert!(!b.dirty_at(len) && !b.dirty_at(usize::MAX), "past the end reads clean");
}

/// The contract every tracking bitmap must keep, for a bitmap of `page_size`-byte pages made by
/// `make(len)`: marks set exactly the pages they touch, at word boundaries and across many
/// words; zero-length marks mark nothing; marks past the end are clipped; slices mark at their
/// offsets; writes through a `VolatileSlice` mark; threads mark concurrently.
fn check_bitmap<B: Bitmap + Sync>(make: impl Fn(usize) -> B, page_size: usize) {
    let len = 300 * page_size + page_size / 2; // a partial last page (whole if page_size is 1)
    let b = make(len);
    let mut model = BTreeSet::new();
    assert_dirty(&b, &model, len, page_size);

    b.mark_dirty(5 * page_size + page_size / 2, 1);
    model.insert(5);
    assert_dirty(&b, &model, len, page_size);

    b.mark_dirty(64 * page_size - 1, 2); // pages 63 and 64: a word boundary
    model.extend([63, 64]);
    b.mark_dirty(100 * page_size, 151 * page_size); // pages 100..=250: several words
    model.extend(100..=250);
    assert_dirty(&b, &model, len, page_size);

    b.mark_dirty(20 * page_size, 0);
    b.slice_at(21 * page_size).mark_dirty(0, 0);
    assert_dirty(&b, &model, len, page_size);

    b.mark_dirty(len, 10);
    b.mark_dirty(usize::MAX, usize::MAX);
    b.slice_at(usize::MAX).mark_dirty(usize::MAX, 1);
    b.slice_at(len).mark_dirty(0, 1);
    assert_dirty(&b, &model, len, page_size);
    b.mark_dirty(len - 1, usize::MAX); // the last byte
    model.insert((len - 1) / page_size);
    assert_dirty(&b, &model, len, page_size);

    let s = b.slice_at(30 * page_size + page_size / 2);
    s.mark_dirty(page_size, 1); // page 31
    let s2 = s.slice_at(2 * page_size); // page 32 and a half
    s2.mark_dirty(0, 1); // page 32
    model.extend([31, 32]);
    assert_dirty(&b, &model, len, page_size);
    assert!(
        s.dirty_at(page_size) && s2.dirty_at(0) && s2.slice_at(page_size).dirty_at(0) == model.contains(&33)
    );
    assert!(!s.dirty_at(usize::MAX) && !s2.dirty_at(len));

    let mut ram = vec![0u8; 42 * page_size];
    // SAFETY: `ram` is borrowed mutably for as long as `mem` lives and not used otherwise.
    let mem = unsafe { VolatileSlice::with_bitmap(ram.as_mut_ptr(), ram.len(), b.slice_at(0), true) };
    mem.write_obj(0x1234u16, 40 * page_size).unwrap();
    mem.subslice(41 * page_size, page_size).unwrap().fill(7).unwrap();
    model.extend([40, 41]);
    assert_dirty(&b, &model, len, page_size);

    std::thread::scope(|scope| {
        for t in 0..4 {
            let b = &b;
            scope.spawn(move || {
                for page in (260 + t..290).step_by(4) {
                    b.slice_at(page * page_size).mark_dirty(0, 1);
                }
            });
        }
    });
    model.extend(260..290);
    assert_dirty(&b, &model, len, page_size);
}

/// [`check_bitmap`] for a bitmap made by [`NewBitmap::with_len`] (4 KiB pages).
fn check_new_bitmap<B: NewBitmap + Sync>() {
    check_bitmap(B::with_len, AtomicBitmap::DEFAULT_PAGE_SIZE);
}

#[test]
fn atomic_bitmap_passes_the_checker() {
    check_new_bitmap::<AtomicBitmap>();
    for page_size in [1, 2, 64, 512, 4096, 2 << 20] {
        check_bitmap(|len| AtomicBitmap::new(len, page_size).unwrap(), page_size);
    }
}

#[test]
fn option_atomic_bitmap_passes_the_checker() {
    check_new_bitmap::<Option<AtomicBitmap>>();
    check_bitmap(|len| Some(AtomicBitmap::new(len, 512).unwrap()), 512);
}

/// Marks `b` in every way there is and asserts that nothing reads dirty.
fn check_untracked<B: Bitmap>(b: &B) {
    b.mark_dirty(0, usize::MAX);
    b.mark_dirty(4096, 1);
    b.slice_at(4096).mark_dirty(0, 4096);
    b.slice_at(4096).slice_at(8).mark_dirty(0, 1);
    let mut ram = vec![0u8; 8192];
    // SAFETY: `ram` is borrowed mutably for as long as `mem` lives and not used otherwise.
    let mem = unsafe { VolatileSlice::with_bitmap(ram.as_mut_ptr(), ram.len(), b.slice_at(0), true) };
    mem.write_slice(&[1; 8192], 0).unwrap();
    for offset in [0, 1, 4095, 4096, 4104, 8191, usize::MAX] {
        assert!(!b.dirty_at(offset) && !b.slice_at(0).dirty_at(offset), "offset {offset}");
    }
}

#[test]
fn unit_and_none_record_nothing() {
    check_untracked(&());
    check_untracked(&<()>::with_len(8192));
    check_untracked(&None::<AtomicBitmap>);
    // And `None` has nothing to harvest: it says so rather than report a clean region.
    let none: Option<AtomicBitmap> = None;
    assert_eq!(none.take_dirty_runs(|_, _| {}), Err(BitmapError::NotTracking));
    assert_eq!(none.take_dirty_words(&mut [0; 4]), Err(BitmapError::NotTracking));
}

#[derive(Debug, Clone)]
enum Op {
    /// Marks bytes `[page * ps + sub % ps, +len)`, through a slice at `slice_base` bytes when set.
    Mark {
        page: usize,
        sub: usize,
        len_pages: usize,
        len_sub: usize,
        huge: bool,
        slice_base: Option<usize>,
    },
    MarkPages {
        first: usize,
        count: usize,
    },
    TakeRuns,
    /// Takes into a buffer `extra` words longer than needed, or one word short.
    TakeWords {
        extra: usize,
        short: bool,
    },
    Merge(Vec<u64>),
    /// Puts back what the last take took.
    RestoreLastTake,
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let word = prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), any::<u64>().prop_map(|w| w & (w >> 7))];
    prop_oneof![
        4 => (0..3200usize, any::<usize>(), prop_oneof![3 => 0..4usize, 1 => 0..400usize], any::<usize>(),
              prop::bool::weighted(0.05), prop::option::weighted(0.3, 0..200_000usize))
            .prop_map(|(page, sub, len_pages, len_sub, huge, slice_base)| Op::Mark {
                page, sub, len_pages, len_sub, huge, slice_base
            }),
        2 => (0..3200usize, prop_oneof![0..3usize, 0..300usize, Just(usize::MAX)])
            .prop_map(|(first, count)| Op::MarkPages { first, count }),
        2 => Just(Op::TakeRuns),
        2 => (0..3usize, prop::bool::weighted(0.1)).prop_map(|(extra, short)| Op::TakeWords { extra, short }),
        1 => prop::collection::vec(word, 0..30).prop_map(Op::Merge),
        1 => Just(Op::RestoreLastTake),
        1 => Just(Op::Reset),
    ]
}

/// The model's dirty pages as KVM-format words.
fn model_words(model: &BTreeSet<usize>, num_words: usize) -> Vec<u64> {
    let mut words = vec![0u64; num_words];
    for &p in model {
        words[p / 64] |= 1 << (p % 64);
    }
    words
}

/// Pages set in `words`, below `num_pages`.
fn word_pages(words: &[u64], num_pages: usize) -> impl Iterator<Item = usize> + '_ {
    (0..num_pages.min(words.len() * 64)).filter(move |p| words[p / 64] & (1 << (p % 64)) != 0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn atomic_bitmap_matches_a_set_of_dirty_pages(
        shift in prop::sample::select(vec![0u32, 3, 6, 9, 12]),
        whole_pages in 0..3000usize,
        partial in any::<usize>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let ps = 1usize << shift;
        let len = whole_pages * ps + partial % ps;
        let b = AtomicBitmap::new(len, ps).unwrap();
        let (num_pages, num_words) = (b.num_pages(), b.num_words());
        prop_assert_eq!(num_pages, len.div_ceil(ps));
        let mut model = BTreeSet::new();
        let mut last_take = Vec::new();
        for op in ops {
            match op {
                Op::Mark { page, sub, len_pages, len_sub, huge, slice_base } => {
                    let offset = page * ps + sub % ps;
                    let count = if huge { usize::MAX } else { len_pages * ps + len_sub % ps };
                    match slice_base {
                        Some(base) => b.slice_at(base.min(offset)).mark_dirty(offset - base.min(offset), count),
                        None => b.mark_dirty(offset, count),
                    }
                    if count > 0 && offset < len {
                        let last = offset.saturating_add(count - 1).min(len - 1);
                        model.extend(offset / ps..=last / ps);
                    }
                }
                Op::MarkPages { first, count } => {
                    b.mark_pages(first, count);
                    if count > 0 {
                        model.extend(first..first.saturating_add(count).min(num_pages));
                    }
                }
                Op::TakeRuns => {
                    let mut runs: Vec<(usize, usize)> = Vec::new();
                    let taken = b.take_dirty_runs(|first, count| runs.push((first, count)));
                    for pair in runs.windows(2) {
                        prop_assert!(pair[0].0 + pair[0].1 < pair[1].0, "runs are maximal and ascending: {:?}", pair);
                    }
                    prop_assert!(runs.iter().all(|&(_, count)| count > 0));
                    let pages: BTreeSet<usize> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
                    prop_assert_eq!(taken, pages.len());
                    prop_assert_eq!(&pages, &model);
                    last_take = model_words(&model, num_words);
                    model.clear();
                }
                Op::TakeWords { extra, short } => {
                    if short && num_words > 0 {
                        let mut out = vec![0; num_words - 1];
                        prop_assert_eq!(
                            b.take_dirty_words(&mut out),
                            Err(BitmapError::BufferTooShort { len: num_words - 1, num_words })
                        );
                    } else {
                        let mut out = vec![0xdead_beef; num_words + extra];
                        prop_assert_eq!(b.take_dirty_words(&mut out), Ok(model.len()));
                        prop_assert_eq!(&out[..num_words], &model_words(&model, num_words)[..]);
                        prop_assert!(out[num_words..].iter().all(|&w| w == 0xdead_beef));
                        out.truncate(num_words);
                        last_take = out;
                        model.clear();
                    }
                }
                Op::Merge(words) => {
                    if words.len() > num_words {
                        prop_assert_eq!(
                            b.merge_words(&words),
                            Err(BitmapError::TooManyWords { len: words.len(), num_words })
                        );
                    } else {
                        b.merge_words(&words).unwrap();
                        model.extend(word_pages(&words, num_pages));
                    }
                }
                Op::RestoreLastTake => {
                    b.restore(&last_take).unwrap();
                    model.extend(word_pages(&last_take, num_pages));
                }
                Op::Reset => {
                    b.reset();
                    model.clear();
                }
            }
            prop_assert_eq!(b.dirty_page_count(), model.len());
            for &p in model.iter().take(8).chain(model.iter().rev().take(8)) {
                prop_assert!(b.is_page_dirty(p));
            }
        }
        let mut out = vec![0; num_words];
        prop_assert_eq!(b.take_dirty_words(&mut out), Ok(model.len()));
        prop_assert_eq!(out, model_words(&model, num_words));
    }
}

#[test]
fn racing_writers_and_harvester_lose_no_mark() {
    const PAGE: usize = 4096;
    const PAGES: usize = 1 << 14; // a 64 MiB region: 256 words
    const WRITERS: usize = 4;
    const MARKS_PER_WRITER: usize = 100_000;
    let start = Instant::now();
    let bitmap = AtomicBitmap::new(PAGES * PAGE, PAGE).unwrap();
    let stop = AtomicBool::new(false);

    let (marked, harvested, harvests) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let bitmap = &bitmap;
                scope.spawn(move || {
                    let mut rng = common::Rng(
                        0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1),
                    );
                    let mut marked = vec![false; PAGES];
                    for i in 0..MARKS_PER_WRITER {
                        // Mostly single pages, some runs across word boundaries, some via slices.
                        let first = rng.below(PAGES as u64) as usize;
                        let count = if i % 16 == 0 { 1 + rng.below(200) as usize } else { 1 };
                        let count = count.min(PAGES - first);
                        let offset = first * PAGE + rng.below(PAGE as u64) as usize;
                        let len = (count - 1) * PAGE + 1;
                        if i % 2 == 0 {
                            bitmap.mark_dirty(offset, len);
                        } else {
                            bitmap.slice_at(first * PAGE).mark_dirty(offset - first * PAGE, len);
                        }
                        marked[first..first + count].iter_mut().for_each(|m| *m = true);
                    }
                    marked
                })
            })
            .collect();
        let harvester = scope.spawn(|| {
            let mut harvested = vec![false; PAGES];
            let mut words = vec![0u64; bitmap.num_words()];
            let mut harvests = 0usize;
            while !stop.load(Ordering::Acquire) {
                if harvests.is_multiple_of(2) {
                    bitmap.take_dirty_runs(|first, count| {
                        harvested[first..first + count].iter_mut().for_each(|h| *h = true);
                    });
                } else {
                    bitmap.take_dirty_words(&mut words).unwrap();
                    for (j, &w) in words.iter().enumerate() {
                        (0..64).filter(|i| w & (1 << i) != 0).for_each(|i| harvested[j * 64 + i] = true);
                    }
                }
                harvests += 1;
            }
            (harvested, harvests)
        });
        let mut marked = vec![false; PAGES];
        for w in writers {
            for (m, w) in marked.iter_mut().zip(w.join().unwrap()) {
                *m |= w;
            }
        }
        stop.store(true, Ordering::Release);
        let (harvested, harvests) = harvester.join().unwrap();
        (marked, harvested, harvests)
    });

    // The final take, after every writer is done.
    let mut harvested = harvested;
    bitmap.take_dirty_runs(|first, count| harvested[first..first + count].iter_mut().for_each(|h| *h = true));
    assert_eq!(bitmap.dirty_page_count(), 0);
    assert!(harvests > 0);
    let missing: Vec<usize> = (0..PAGES).filter(|&p| marked[p] && !harvested[p]).take(10).collect();
    let spurious: Vec<usize> = (0..PAGES).filter(|&p| !marked[p] && harvested[p]).take(10).collect();
    assert!(missing.is_empty(), "marked but never harvested: {missing:?}");
    assert!(spurious.is_empty(), "harvested but never marked: {spurious:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}
