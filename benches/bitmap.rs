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

/// `write_obj::<u64>` at random hot addresses with an `AtomicBitmap`, beside the raw tracked
/// write: binary search over the region starts, `write_volatile`, one `fetch_or` on the word.
/// Target: ≤ 1.2×.
fn tracked_writes(c: &mut Criterion) {
    use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
    let size = 64usize << 20;
    let ranges: Vec<_> = (0..4u64).map(|i| (GuestAddress(i * (size as u64 + (1 << 20))), size)).collect();
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap();
    let starts: Vec<u64> = mem.iter().map(|r| r.start_addr().0).collect();
    let hosts: Vec<*mut u8> = mem.iter().map(|r| r.host_ptr()).collect();
    let raw: Vec<Vec<AtomicU64>> = (0..starts.len()).map(|_| raw_words(size / PAGE)).collect();
    // Addresses within the first 1 MiB of each region: hot in cache, bitmaps included.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let addrs: Vec<u64> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            starts[(x % 4) as usize] + ((x >> 8) % ((1 << 20) / 8)) * 8
        })
        .collect();
    for &a in &addrs {
        mem.write_obj(0u64, GuestAddress(a)).unwrap(); // fault the pages in
    }
    let mut g = c.benchmark_group("write_obj_u64_tracked/hot");
    let mut i = 0usize;
    g.bench_function("raw", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let addr = black_box(addrs[i]);
            let idx = starts.partition_point(|&s| s <= addr) - 1;
            let off = (addr - starts[idx]) as usize;
            assert!(off + 8 <= size);
            // SAFETY: `off + 8 <= size`: inside the region's live, writable mapping.
            unsafe { hosts[idx].add(off).cast::<u64>().write_volatile(i as u64) };
            raw_mark(&raw[idx], off, 8);
        })
    });
    g.bench_function("guestmem", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            mem.write_obj(i as u64, GuestAddress(black_box(addrs[i]))).unwrap();
        })
    });
    g.finish();
}

/// The merge step of `sync_dirty_log` (what it adds to the ioctl): OR a KVM-format log of a
/// 16 GiB slot into the region's bitmap, at 1% dirty, beside a raw loop that ORs each
/// non-zero word with one `fetch_or`.
fn kvm_merge(c: &mut Criterion) {
    let bytes = 16usize << 30;
    let pages = bytes / PAGE;
    let bitmap = AtomicBitmap::new(bytes, PAGE).unwrap();
    let raw = raw_words(pages);
    let mut log = vec![0u64; pages.div_ceil(64)];
    for p in dirty_set(pages, 1) {
        log[p / 64] |= 1 << (p % 64);
    }
    let mut g = c.benchmark_group("kvm_merge/16GiB-1pct");
    g.bench_function("raw", |b| {
        b.iter(|| {
            for (w, &bits) in raw.iter().zip(black_box(&log).iter()) {
                if bits != 0 {
                    w.fetch_or(bits, Ordering::Release);
                }
            }
        })
    });
    g.bench_function("guestmem", |b| b.iter(|| bitmap.merge_words(black_box(&log)).unwrap()));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = marks, harvests, tracked_writes, kvm_merge }
criterion_main!(benches);
