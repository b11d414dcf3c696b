//! The vhost-user shared log and the IOMMU view against the raw baseline and against the plain
//! guest-memory path, in the same run.
//!
//! - `log_mark/*`: a mark of one 8-byte write. raw = one `fetch_or` on a plain
//!   `Vec<AtomicU64>`; `guestmem-atomic-bitmap` = an [`AtomicBitmap`] mark; `guestmem-shared-log`
//!   = a back-end region's [`LogBitmap`] marking an attached shared log (two loads of the log's
//!   state around the OR). Then the same as `write_obj::<u64>` through guest memory.
//!   Target: the shared log within 1.2x of the `AtomicBitmap`.
//! - `iova_read_obj_u64/N-mappings`: `read_obj::<u64>` at random addresses, raw (binary search
//!   over region starts, pointer arithmetic, `read_volatile`), through guest addresses
//!   (`guestmem-gpa`), and through IOVAs with an [`IotlbCache`] hit (`guestmem-iova`: a
//!   generation load, the IOTLB's binary search over N mappings, then the same guest path), and
//!   through a view kept for a batch of accesses (`guestmem-iova-view`: no generation load).
//!   The guest-address path searches N regions, the IOVA path N mappings and one region.
//!   Target: the IOVA path within 1.5x of the guest-address path.
//!
//! `scripts/bench-ratios vhost` / `scripts/bench-ratios iova` print the ratios to raw; the
//! ratio between two guestmem rows is the quotient of theirs.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice, NewBitmap};
use guestmem::iommu::{Iotlb, Iova, Permissions};
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder, Populate};
use guestmem::vhost_user::{BackendMemory, DirtyLog, MemoryRegionDesc};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

const MASK: usize = 4095;
const SIZE: u64 = 64 << 20;

/// `count` random 8-byte-aligned offsets below `span`.
fn offsets(count: usize, span: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 16) % (span / 8) * 8
        })
        .collect()
}

fn log_mark(c: &mut Criterion) {
    // The VMM's memory (one memfd), a back-end mapping the same memfd with the VMM's log.
    let map = MmapRegionBuilder::<AtomicBitmap>::new(SIZE as usize)
        .backing(Backing::Memfd(MemfdOptions::new("bench-ram")))
        .populate(Populate::Now)
        .build()
        .unwrap();
    let vmm =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(map, GuestAddress(0)).unwrap()]).unwrap();
    let (desc, fd) = MemoryRegionDesc::of_region(&vmm.regions()[0]).unwrap();
    let backend = BackendMemory::new().unwrap();
    backend.set_mem_table(&[desc], vec![fd.as_fd().try_clone_to_owned().unwrap()]).unwrap();
    let log = DirtyLog::for_memory(&vmm).unwrap();
    backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    let device = backend.memory();
    let raw_words: Vec<AtomicU64> = (0..SIZE / 4096 / 64).map(|_| AtomicU64::new(0)).collect();
    let bitmap = AtomicBitmap::with_len(SIZE as usize);
    // Hot: 1 MiB of pages, so the words and the data stay in cache.
    let offs = offsets(MASK + 1, 1 << 20, 5);

    let mut g = c.benchmark_group("log_mark/mark_dirty_8");
    let mut i = 0;
    g.bench_function("raw", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            let page = black_box(offs[i]) >> 12;
            raw_words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        })
    });
    g.bench_function("guestmem-atomic-bitmap", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            bitmap.mark_dirty(black_box(offs[i]) as usize, 8)
        })
    });
    let log_bitmap = device.guest().regions()[0].bitmap();
    g.bench_function("guestmem-shared-log", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            log_bitmap.mark_dirty(black_box(offs[i]) as usize, 8)
        })
    });
    // The slice form every write path uses.
    let slice = log_bitmap.slice_at(0);
    g.bench_function("guestmem-shared-log-slice", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            slice.mark_dirty(black_box(offs[i]) as usize, 8)
        })
    });
    g.finish();

    let host = vmm.get_host_address(GuestAddress(0)).unwrap();
    let mut g = c.benchmark_group("log_mark/write_obj_u64");
    g.bench_function("raw", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            let off = black_box(offs[i]);
            // SAFETY: `off` is 8-byte aligned and below the region's size.
            unsafe { host.add(off as usize).cast::<u64>().write_volatile(i as u64) };
            raw_words[(off >> 18) as usize].fetch_or(1 << ((off >> 12) % 64), Ordering::Release);
        })
    });
    g.bench_function("guestmem-atomic-bitmap", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            vmm.write_obj(i as u64, GuestAddress(black_box(offs[i]))).unwrap()
        })
    });
    g.bench_function("guestmem-shared-log", |b| {
        b.iter(|| {
            i = (i + 1) & MASK;
            device.write_obj(i as u64, GuestAddress(black_box(offs[i]))).unwrap()
        })
    });
    g.finish();
}

/// Memory of `n` regions of `SIZE / n` bytes, back to back from guest address 0, prefaulted.
fn regions(n: u64) -> GuestMemoryMmap<()> {
    let chunk = SIZE / n;
    GuestMemoryMmap::from_regions(
        (0..n)
            .map(|k| {
                GuestRegionMmap::build(
                    MmapRegionBuilder::new(chunk as usize).populate(Populate::Now),
                    GuestAddress(k * chunk),
                )
                .unwrap()
            })
            .collect(),
    )
    .unwrap()
}

fn iova(c: &mut Criterion) {
    // One region behind the IOTLB: the IOVA path's search is the IOTLB's alone.
    let one = regions(1);
    for n in [1u64, 64, 512] {
        // The guest-address path searches n regions; the IOVA path n mappings (over the whole
        // memory, in reverse order, IOVAs 1 TiB up), then one region.
        let mem = regions(n);
        let starts: Vec<u64> = mem.iter().map(|r| r.start_addr().0).collect();
        let hosts: Vec<*mut u8> = mem.iter().map(|r| r.host_ptr()).collect();
        let iotlb = Iotlb::with_max_entries(n as usize).unwrap();
        let chunk = SIZE / n;
        for k in 0..n {
            let gpa = (n - 1 - k) * chunk;
            iotlb
                .update(Iova((1 << 40) + k * chunk), chunk, GuestAddress(gpa), Permissions::READ_WRITE)
                .unwrap();
        }
        let mut cache = iotlb.cache();
        // Random hot addresses: the first 4 KiB of a random region/mapping.
        let mut x = 0x5eed_u64 + n;
        let picks: Vec<(u64, u64)> = (0..=MASK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = (x >> 8) % n;
                let off = (x >> 32) % 512 * 8;
                ((n - 1 - k) * chunk + off, (1 << 40) + k * chunk + off)
            })
            .collect();
        let mut g = c.benchmark_group(format!("iova_read_obj_u64/{n}-mappings"));
        let mut i = 0;
        g.bench_function("raw", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                let gpa = black_box(picks[i].0);
                let idx = starts.partition_point(|&s| s <= gpa) - 1;
                // SAFETY: `gpa` is 8-byte aligned inside region `idx`.
                black_box(unsafe {
                    hosts[idx].add((gpa - starts[idx]) as usize).cast::<u64>().read_volatile()
                })
            })
        });
        g.bench_function("guestmem-gpa", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(mem.read_obj::<u64>(GuestAddress(black_box(picks[i].0))).unwrap())
            })
        });
        g.bench_function("guestmem-iova", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(cache.table().view(&one).read_obj::<u64>(Iova(black_box(picks[i].1))).unwrap())
            })
        });
        // A view kept for a batch of accesses (one request): no cache check per access.
        let view = cache.table().view(&one);
        g.bench_function("guestmem-iova-view", |b| {
            b.iter(|| {
                i = (i + 1) & MASK;
                black_box(view.read_obj::<u64>(Iova(black_box(picks[i].1))).unwrap())
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = log_mark, iova
}
criterion_main!(benches);
