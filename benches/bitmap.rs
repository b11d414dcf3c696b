//! Dirty bitmap marks and harvests against the raw baseline, in the same run.
//!
//! The raw baseline is a plain `Vec<AtomicU64>` used the way a hand-written VMM would: one
//! `fetch_or` per touched word to mark, and a harvest that loads each word and takes the
//! non-zero ones with `swap(0)` into a buffer. Each group holds `raw` and the guestmem call
//! doing the same work; `scripts/bench-ratios` prints the median ratios. The target: a
//! guestmem harvest within 1.2x of raw.
//!
//! Harvest benches use a 16 GiB guest in 4 KiB pages (4M pages, 64Ki words); the same pages
//! are dirtied again in an untimed setup before each timed harvest.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};

const PAGE: usize = 4096;
const PAGE_SHIFT: u32 = 12;

/// One `fetch_or` per word of pages `first..=last`: the raw mark.
#[inline]
fn raw_mark(words: &[AtomicU64], offset: usize, len: usize) {
    let (first, last) = (offset >> PAGE_SHIFT, (offset + len - 1) >> PAGE_SHIFT);
    let (first_word, last_word) = (first / 64, last / 64);
    let head = u64::MAX << (first % 64);
    let tail = u64::MAX >> (63 - last % 64);
    if first_word == last_word {
        words[first_word].fetch_or(head & tail, Ordering::Release);
    } else {
        words[first_word].fetch_or(head, Ordering::Release);
        for w in &words[first_word + 1..last_word] {
            w.fetch_or(u64::MAX, Ordering::Release);
        }
        words[last_word].fetch_or(tail, Ordering::Release);
    }
}

/// Load each word, take the non-zero ones with `swap(0)`: the raw harvest.
#[inline]
fn raw_harvest(words: &[AtomicU64], out: &mut [u64]) {
    for (w, o) in words.iter().zip(out.iter_mut()) {
        *o = if w.load(Ordering::Relaxed) == 0 { 0 } else { w.swap(0, Ordering::Acquire) };
    }
}

fn raw_words(pages: usize) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn marks(c: &mut Criterion) {
    let region = 1usize << 30;
    let raw = raw_words(region / PAGE);
    let bitmap = AtomicBitmap::new(region, PAGE).unwrap();
    // From page 100 (inside word 1): 1 page is one word, 64 pages two, 256 pages five.
    for pages in [1usize, 64, 256] {
        let (offset, len) = (100 * PAGE + 8, (pages - 1) * PAGE + 8);
        let mut g = c.benchmark_group(format!("mark/{pages}page{}", if pages == 1 { "" } else { "s" }));
        g.bench_function("raw", |b| b.iter(|| raw_mark(black_box(&raw), black_box(offset), black_box(len))));
        g.bench_function("guestmem", |b| {
            b.iter(|| black_box(&bitmap).mark_dirty(black_box(offset), black_box(len)))
        });
        let slice = bitmap.slice_at(64 * PAGE);
        g.bench_function("guestmem-slice", |b| {
            b.iter(|| black_box(&slice).mark_dirty(black_box(offset - 64 * PAGE), black_box(len)))
        });
        g.finish();
    }
}

/// `percent`% of `pages` distinct pages, spread at random (fixed seed).
fn dirty_set(pages: usize, percent: usize) -> Vec<usize> {
    let mut seen = vec![false; pages];
    let mut out = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < pages * percent / 100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % pages as u64) as usize;
        if !seen[p] {
            seen[p] = true;
            out.push(p);
        }
    }
    out
}

fn harvests(c: &mut Criterion) {
    let guest = 16usize << 30;
    let pages = guest / PAGE;
    let raw = raw_words(pages);
    let bitmap = AtomicBitmap::new(guest, PAGE).unwrap();
    let mut out = vec![0u64; bitmap.num_words()];
    for percent in [0, 1] {
        let dirty = dirty_set(pages, percent);
        let redirty_raw = || {
            for &p in &dirty {
                raw[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
            }
        };
        let redirty = || {
            for &p in &dirty {
                bitmap.mark_pages(p, 1);
            }
        };
        let mut g = c.benchmark_group(format!("harvest/16GiB-{percent}pct"));
        g.bench_function("raw", |b| {
            b.iter_batched(redirty_raw, |()| raw_harvest(black_box(&raw), &mut out), BatchSize::PerIteration)
        });
        g.bench_function("guestmem", |b| {
            b.iter_batched(
                redirty,
                |()| black_box(black_box(&bitmap).take_dirty_words(&mut out).unwrap()),
                BatchSize::PerIteration,
            )
        });
        g.finish();

        // Runs cost a little more than words (the run walk and the callback): same raw baseline.
        let mut g = c.benchmark_group(format!("harvest-runs/16GiB-{percent}pct"));
        g.bench_function("raw", |b| {
            b.iter_batched(redirty_raw, |()| raw_harvest(black_box(&raw), &mut out), BatchSize::PerIteration)
        });
        g.bench_function("guestmem", |b| {
            b.iter_batched(
                redirty,
                |()| {
                    let mut sum = 0;
                    black_box(&bitmap).take_dirty_runs(|first, count| sum += first ^ count);
                    black_box(sum)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = marks, harvests }
criterion_main!(benches);
