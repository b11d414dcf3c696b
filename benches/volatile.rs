//! Volatile copies against the raw baseline, in the same run on the same memory.
//!
//! Each group holds a `raw` bench (`ptr::copy_nonoverlapping` between the mapping and a host
//! buffer) and the guestmem call that does the same copy through a `VolatileSlice`. The issue's
//! target: guestmem within 5% of raw at 4 KiB and above. `scripts/bench-ratios` prints the
//! median ratios from criterion's output.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guestmem::mmap::{MmapRegion, MmapRegionBuilder, Populate};
use guestmem::Bytes;

/// A prefaulted anonymous mapping of `len` bytes.
fn mapping(len: usize) -> MmapRegion {
    MmapRegionBuilder::new(len).populate(Populate::Now).build().unwrap()
}

const SIZES: [(usize, &str); 4] = [(8, "8B"), (4 << 10, "4KiB"), (64 << 10, "64KiB"), (2 << 20, "2MiB")];

fn byte_copies(c: &mut Criterion) {
    let mem = mapping(4 << 20);
    let slice = mem.as_volatile_slice();
    for (size, name) in SIZES {
        let mut buf = vec![0x5au8; size];
        let mut g = c.benchmark_group(format!("read_slice/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw", |b| {
            b.iter(|| {
                // SAFETY: `size` bytes at offset 64 lie in the mapping; `buf` holds `size` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(black_box(mem.as_ptr().add(64)), buf.as_mut_ptr(), size)
                };
                black_box(&buf);
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| {
                black_box(&slice).read_slice(&mut buf, black_box(64)).unwrap();
                black_box(&buf);
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("write_slice/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw", |b| {
            b.iter(|| {
                // SAFETY: as above, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), black_box(mem.as_ptr().add(64)), size) };
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| black_box(&slice).write_slice(&buf, black_box(64)).unwrap())
        });
        g.finish();
    }
}

fn typed_copies(c: &mut Criterion) {
    let mem = mapping(4 << 20);
    let slice = mem.as_volatile_slice();
    for (size, name) in &SIZES[1..] {
        let size = *size;
        let mut g = c.benchmark_group(format!("copy_to_u16/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        let mut out16 = vec![0u16; size / 2];
        g.bench_function("raw", |b| {
            b.iter(|| {
                // SAFETY: `size` bytes in the mapping and in `out16`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        black_box(mem.as_ptr()),
                        out16.as_mut_ptr().cast::<u8>(),
                        size,
                    )
                };
                black_box(&out16);
            })
        });
        g.bench_with_input(BenchmarkId::new("guestmem", name), &size, |b, &size| {
            b.iter(|| black_box(black_box(&slice).subslice(0, size).unwrap().copy_to(&mut out16)))
        });
        g.finish();

        let mut g = c.benchmark_group(format!("copy_from_u64/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        let in64 = vec![7u64; size / 8];
        g.bench_function("raw", |b| {
            b.iter(|| {
                // SAFETY: `size` bytes in the mapping and in `in64`.
                unsafe {
                    std::ptr::copy_nonoverlapping(in64.as_ptr().cast::<u8>(), black_box(mem.as_ptr()), size)
                };
            })
        });
        g.bench_with_input(BenchmarkId::new("guestmem", name), &size, |b, &size| {
            b.iter(|| black_box(black_box(&slice).subslice(0, size).unwrap().copy_from(&in64).unwrap()))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = byte_copies, typed_copies
}
criterion_main!(benches);
