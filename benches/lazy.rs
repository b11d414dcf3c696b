//! Lazy restore (`snapshot::lazy`) beside the eager paths, in the same run on the same 1 GiB
//! snapshot (half of its 64 KiB blocks non-zero, with a chunk table of `DEFAULT_CHUNK_SIZE`):
//!
//! - `lazy_return/1GiB`: `restore_lazy` returning (header, chunk table, mappings, userfaultfd
//!   registration, handler thread started), against `restore_mapped` (the O(1) mapping restore).
//! - `lazy_first_access/host`: a host read of a page not yet placed (one fault, one chunk read,
//!   checked and placed), against the first touch of fresh anonymous memory.
//! - `lazy_first_access/guest` (needs /dev/kvm): a KVM guest's first write to a page not yet
//!   placed, against its first write to fresh anonymous memory (each: the run's time minus
//!   the same run on pages already there).
//! - `lazy_fill/1GiB`: `restore_lazy` until `wait_complete` (the background prefetch alone),
//!   against `restore_into` of the same file into fresh memory (checksum pass + copy pass).
//!
//! `scripts/bench-ratios lazy` prints the median ratios (`raw` = the eager or plain path).
//! `GUESTMEM_LAZY_CHUNK=16384 cargo bench --bench lazy -- first_access` measures another chunk
//! size.

use guestmem_kvm_guest as kvm_guest;

use std::fs::File;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use guestmem::snapshot::{self, lazy};
use guestmem::sys::{self, MapFlags, Protection};
use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: usize = 1 << 30;
const PAGE: usize = 4096;
const BLOCK: usize = 16 * PAGE;

fn mix(x: u64) -> u64 {
    let mut h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 29)
}

/// A full snapshot of 1 GiB, half of its 64 KiB blocks non-zero, with a chunk table.
fn snapshot_file() -> File {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    let mut block = vec![0u8; BLOCK];
    for b in 0..SIZE / BLOCK {
        if mix(b as u64) & 1 == 0 {
            continue;
        }
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(b as u8) | 1;
        }
        mem.write_slice(&block, GuestAddress((b * BLOCK) as u64)).unwrap();
    }
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    snapshot::dump(&mem, &file).unwrap();
    // GUESTMEM_LAZY_CHUNK (bytes) picks another chunk size: smaller chunks cost less per fault.
    let chunk = std::env::var("GUESTMEM_LAZY_CHUNK")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(lazy::DEFAULT_CHUNK_SIZE);
    lazy::write_chunk_table(&file, chunk).unwrap();
    file
}

fn demand_only() -> lazy::LazyOptions {
    let spin = std::env::var("GUESTMEM_LAZY_SPIN_US").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    lazy::LazyOptions::new().prefetch(false).spin(Duration::from_micros(spin))
}

fn lazy_return(c: &mut Criterion, file: &File) {
    let mut g = c.benchmark_group("lazy_return/1GiB");
    g.sample_size(30);
    g.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mem = snapshot::restore_mapped::<()>(file).unwrap();
                t += start.elapsed();
                drop(mem);
            }
            t
        })
    });
    g.bench_function("guestmem_lazy", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let r = lazy::restore_lazy_with::<(), _>(file, demand_only(), |_, b| b).unwrap();
                t += start.elapsed();
                drop(r);
            }
            t
        })
    });
    g.finish();
}

fn first_access(c: &mut Criterion, file: &File) {
    let mut g = c.benchmark_group("lazy_first_access");
    g.sample_size(50);
    // Pages far apart, so each access is its own fault and its own unit.
    let stride = 16 * BLOCK;
    let per_restore = SIZE / stride;
    g.bench_function("host/raw", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                // SAFETY: a new private anonymous mapping, unmapped below.
                let p = unsafe {
                    sys::mmap(
                        std::ptr::null_mut(),
                        SIZE,
                        Protection::READ_WRITE,
                        MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE,
                        None,
                        0,
                    )
                }
                .unwrap();
                for i in 0..per_restore.min((iters - done) as usize) {
                    let start = Instant::now();
                    // SAFETY: inside our mapping.
                    unsafe { p.add(i * stride).read_volatile() };
                    t += start.elapsed();
                    done += 1;
                }
                // SAFETY: unused from now on.
                unsafe { sys::munmap(p, SIZE) }.unwrap();
            }
            t
        })
    });
    g.bench_function("host/guestmem_lazy", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let r = lazy::restore_lazy_with::<(), _>(file, demand_only(), |_, b| b).unwrap();
                let mem = r.memory();
                for i in 0..per_restore.min((iters - done) as usize) {
                    let start = Instant::now();
                    std::hint::black_box(mem.read_obj::<u8>(GuestAddress((i * stride) as u64)).unwrap());
                    t += start.elapsed();
                    done += 1;
                }
            }
            t
        })
    });
    if kvm_guest::kvm_available().is_ok() {
        for lazy in [false, true] {
            let name = if lazy { "guest/guestmem_lazy" } else { "guest/raw" };
            g.bench_function(name, |b| b.iter_custom(|iters| guest_first_writes(file, lazy, iters)));
        }
    } else {
        eprintln!("lazy_first_access/guest: skipped (no usable /dev/kvm)");
    }
    g.finish();
}

/// The time of `iters` guest first writes to pages not there yet (lazily restored memory, or
/// fresh anonymous memory), each batch of 256 pages measured as one run minus the same run
/// again on the pages now there.
fn guest_first_writes(file: &File, lazy_memory: bool, iters: u64) -> Duration {
    const CODE_GPA: u64 = 0x1000;
    const BATCH: usize = 256;
    let stride = 16 * BLOCK;
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    while done < iters {
        let mut vm = kvm_guest::TestVm::new().unwrap();
        vm.add_ram(0, 0, 1 << 20, 0).unwrap();
        let restore;
        let plain;
        let host = if lazy_memory {
            restore = lazy::restore_lazy_with::<(), _>(file, demand_only(), |_, b| b).unwrap();
            restore.memory().regions()[0].mapping().as_ptr()
        } else {
            plain = guestmem::mmap::MmapRegionBuilder::<()>::new(SIZE).build().unwrap();
            plain.as_ptr()
        };
        let slot = kvm_guest::MemorySlot {
            slot: 1,
            guest_phys_addr: 1 << 30,
            size: SIZE as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the memory (`restore` or `plain`) outlives `vm`, dropped at the end of this
        // iteration before them (declared after them).
        unsafe { vm.set_user_memory_region(slot) }.unwrap();
        vm.add_vcpu().unwrap();
        let pages = SIZE / stride;
        let mut first = 0;
        while first + BATCH <= pages && done < iters {
            let writes: Vec<(u64, u8)> =
                (first..first + BATCH).map(|i| ((1 << 30) + (i * stride) as u64, 1)).collect();
            let lazy_run = vm.run_writes(0, CODE_GPA, &writes).unwrap();
            let warm_run = vm.run_writes(0, CODE_GPA, &writes).unwrap();
            let per = lazy_run.saturating_sub(warm_run);
            let n = (BATCH as u64).min(iters - done);
            total += per * n as u32 / BATCH as u32;
            done += n;
            first += BATCH;
        }
        drop(vm);
    }
    total
}

fn fill(c: &mut Criterion, file: &File) {
    let mut g = c.benchmark_group("lazy_fill/1GiB");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
                let start = Instant::now();
                snapshot::restore_into(&dst, file).unwrap();
                t += start.elapsed();
                drop(dst);
            }
            t
        })
    });
    g.bench_function("guestmem_lazy", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let r = lazy::restore_lazy::<()>(file).unwrap();
                assert!(r.wait_complete(None).unwrap());
                t += start.elapsed();
                drop(r);
            }
            t
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let file = snapshot_file();
    lazy_return(c, &file);
    first_access(c, &file);
    fill(c, &file);
}

criterion_group!(lazy_benches, benches);
criterion_main!(lazy_benches);
