//! Guest memory against the raw baseline, in the same run on the same memory.
//!
//! raw = the physical limit: a dense array of region starts searched with `partition_point`,
//! the host address by pointer arithmetic, `read_volatile`/`write_volatile`, `memcpy`.
//! Targets (median ratio guestmem/raw): translation ≤ 1.15×, hot read_obj/write_obj ≤ 1.3×,
//! cold ≤ 1.15×, bulk ≥ 0.95× of memcpy's throughput, snapshot + read ≤ 1.5×.
//! `scripts/bench-ratios` prints them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use guestmem::mmap::{MmapRegionBuilder, Populate};
use guestmem::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

type Mem = GuestMemoryMmap<()>;

/// The raw baseline's view of the same memory.
struct Raw {
    starts: Vec<u64>,
    lens: Vec<u64>,
    hosts: Vec<*mut u8>,
}

impl Raw {
    fn of(mem: &Mem) -> Raw {
        Raw {
            starts: mem.iter().map(|r| r.start_addr().0).collect(),
            lens: mem.iter().map(|r| r.len()).collect(),
            hosts: mem.iter().map(|r| r.host_ptr()).collect(),
        }
    }

    #[inline(always)]
    fn translate(&self, addr: u64) -> Option<*mut u8> {
        let idx = self.starts.partition_point(|&s| s <= addr).checked_sub(1)?;
        let off = addr - self.starts[idx];
        (off < self.lens[idx]).then(|| self.hosts[idx].wrapping_add(off as usize))
    }
}

/// `n` regions of `size` bytes, 1 MiB apart in guest space, prefaulted.
fn memory(n: usize, size: usize) -> Mem {
    let regions = (0..n)
        .map(|i| {
            let mapping = MmapRegionBuilder::<()>::new(size).populate(Populate::Now).build().unwrap();
            GuestRegionMmap::new(mapping, GuestAddress((i as u64) * (size as u64 + (1 << 20)))).unwrap()
        })
        .collect();
    Mem::from_regions(regions).unwrap()
}

/// `count` random 8-byte-aligned addresses inside the regions, each within `span` bytes of
/// its region's start (a small span keeps them cache-hot).
fn addresses(mem: &Mem, count: usize, span: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len().min(span))).collect();
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (start, len) = regions[(x % regions.len() as u64) as usize];
            start + ((x >> 16) % (len / 8)) * 8
        })
        .collect()
}

const MASK: usize = 4095;

fn translation(c: &mut Criterion) {
    for n in [1usize, 8, 64, 512] {
        let mem = memory(n, 64 << 10);
        let raw = Raw::of(&mem);
        let addrs = addresses(&mem, MASK + 1, u64::MAX, 7);
        let mut g = c.benchmark_group(format!("translate/{n}-regions"));
        let mut i = 0;
        g.bench_function("raw", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(raw.translate(black_box(addrs[i])))
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(mem.get_host_address(GuestAddress(black_box(addrs[i]))).ok())
            })
        });
        g.finish();
    }
}

fn objects(c: &mut Criterion) {
    let mem = memory(8, 128 << 20);
    let raw = Raw::of(&mem);
    for (temp, span) in [("hot", 4096u64), ("cold", u64::MAX)] {
        let addrs = addresses(&mem, MASK + 1, span, 11);
        let mut g = c.benchmark_group(format!("read_obj_u64/{temp}"));
        let mut i = 0;
        g.bench_function("raw", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                let p = raw.translate(black_box(addrs[i])).unwrap();
                // SAFETY: `p` is an 8-byte aligned address inside a live mapping.
                black_box(unsafe { p.cast::<u64>().read_volatile() })
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(mem.read_obj::<u64>(GuestAddress(black_box(addrs[i]))).unwrap())
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("write_obj_u64/{temp}"));
        g.bench_function("raw", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                let p = raw.translate(black_box(addrs[i])).unwrap();
                // SAFETY: as above, and the mapping is writable.
                unsafe { p.cast::<u64>().write_volatile(i as u64) }
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                mem.write_obj(i as u64, GuestAddress(black_box(addrs[i]))).unwrap()
            })
        });
        g.finish();
    }
}

fn bulk(c: &mut Criterion) {
    let mem = memory(2, 64 << 20);
    let raw = Raw::of(&mem);
    for (size, name) in [(4usize << 10, "4KiB"), (64 << 10, "64KiB"), (2 << 20, "2MiB")] {
        let mut buf = vec![0x5au8; size];
        let addr = 0x10_0000u64;
        // The raw side translates too (binary search + pointer arithmetic), like every raw
        // baseline here, then copies with memcpy.
        let mut g = c.benchmark_group(format!("guest_read_slice/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw", |b| {
            b.iter(|| {
                let host = raw.translate(black_box(addr)).unwrap();
                // SAFETY: `size` bytes at `host` lie in the first region; `buf` holds `size`.
                unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), size) };
                black_box(&buf);
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| {
                mem.read_slice(&mut buf, GuestAddress(black_box(addr))).unwrap();
                black_box(&buf);
            })
        });
        g.finish();
        let mut g = c.benchmark_group(format!("guest_write_slice/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("raw", |b| {
            b.iter(|| {
                let host = raw.translate(black_box(addr)).unwrap();
                // SAFETY: as above, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), host, size) };
            })
        });
        g.bench_function("guestmem", |b| {
            b.iter(|| mem.write_slice(&buf, GuestAddress(black_box(addr))).unwrap())
        });
        g.finish();
    }
}

fn snapshot(c: &mut Criterion) {
    let mem = memory(8, 16 << 20);
    let raw = Raw::of(&mem);
    let addrs = addresses(&mem, MASK + 1, 4096, 13);
    let atomic = GuestMemoryAtomic::new(mem);
    let mut cache = atomic.cache();
    let mut g = c.benchmark_group("snapshot_read_obj_u64");
    let mut i = 0;
    g.bench_function("raw", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            let p = raw.translate(black_box(addrs[i])).unwrap();
            // SAFETY: `p` is an 8-byte aligned address inside a live mapping.
            black_box(unsafe { p.cast::<u64>().read_volatile() })
        })
    });
    g.bench_function("guestmem-memory", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            black_box(atomic.memory().read_obj::<u64>(GuestAddress(black_box(addrs[i]))).unwrap())
        })
    });
    g.bench_function("guestmem-cache", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            black_box(cache.memory().read_obj::<u64>(GuestAddress(black_box(addrs[i]))).unwrap())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = translation, objects, bulk, snapshot
}
criterion_main!(benches);
