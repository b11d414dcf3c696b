//! Snapshots against the raw system calls, in the same run on the same memory and filesystem.
//!
//! - `dump/1GiB`: a full dump of 1 GiB with half of it zero pages (in 64 KiB blocks chosen
//!   pseudo-randomly) against one `write(2)` stream of the same 1 GiB into a truncated file;
//!   `dump_scattered/1GiB` the same with zero pages chosen page by page (the worst case: one
//!   `pwrite(2)` per run of about two pages).
//! - `restore_copy/1GiB`: `restore_into` of that dump (checksum pass + copy pass) against
//!   `read(2)` of the whole file into memory.
//! - `diff/1GiB`: a diff dump of 1% dirty pages (harvest, bitmap, header, `pwrite`s) against
//!   `pwrite(2)` of the same pages at their places in a truncated sparse file.
//! - `restore_mapped/1GiB`: `restore_mapped` (header checks + one private file mapping)
//!   against a bare `mmap(2)` + `munmap(2)` of the file.
//!
//! The files live in `std::env::temp_dir()` (put it on a real filesystem: tmpfs has no page
//! cache cost and skews the ratios) and are unlinked from the start. `scripts/bench-ratios`
//! prints the median ratios.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use guestmem::bitmap::AtomicBitmap;
use guestmem::snapshot;
use guestmem::sys::{self, MapFlags, Protection};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const SIZE: usize = 1 << 30;
const PAGE: usize = 4096;
const BLOCK: usize = 16 * PAGE;

fn tmp() -> File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

/// A cheap deterministic hash for choosing blocks and pages.
fn mix(x: u64) -> u64 {
    let mut h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 29)
}

/// 1 GiB of guest memory, half of its 64 KiB blocks non-zero.
fn memory() -> GuestMemoryMmap<AtomicBitmap> {
    memory_in_blocks(BLOCK)
}

/// 1 GiB of guest memory, half of its blocks of `block` bytes non-zero.
fn memory_in_blocks(block_size: usize) -> GuestMemoryMmap<AtomicBitmap> {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    let mut block = vec![0u8; block_size];
    for b in 0..SIZE / block_size {
        if mix(b as u64) & 1 == 0 {
            continue;
        }
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(b as u8) | 1;
        }
        mem.write_slice(&block, GuestAddress((b * block_size) as u64)).unwrap();
    }
    mem.take_dirty_ranges(|_, _| {}).unwrap();
    mem
}

/// `write(2)` of `len` bytes at `ptr` to the file's position, in full.
fn raw_write_all(f: &File, ptr: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: `[ptr, ptr + len)` is our readable guest mapping.
        done += unsafe { sys::fd::write(f.as_fd(), ptr.add(done), len - done) }.unwrap();
    }
}

fn dump(c: &mut Criterion) {
    dump_group(c, "dump/1GiB", BLOCK);
    // The worst case for holes: zero and non-zero pages mixed page by page, so runs of
    // non-zero pages average two pages and each needs its own `pwrite(2)`.
    dump_group(c, "dump_scattered/1GiB", PAGE);
}

fn dump_group(c: &mut Criterion, name: &str, block: usize) {
    let mem = memory_in_blocks(block);
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(SIZE as u64));
    let raw_file = tmp();
    g.bench_function("raw", |b| {
        b.iter(|| {
            raw_file.set_len(0).unwrap();
            std::io::Seek::rewind(&mut &raw_file).unwrap();
            raw_write_all(&raw_file, host, SIZE);
        })
    });
    drop(raw_file);
    let file = tmp();
    g.bench_function("guestmem", |b| b.iter(|| snapshot::dump(&mem, &file).unwrap()));
    g.finish();
}

fn restore_copy(c: &mut Criterion) {
    let mem = memory();
    let file = tmp();
    snapshot::dump(&mem, &file).unwrap();
    drop(mem);
    let dst = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    let host = dst.get_host_address(GuestAddress(0)).unwrap();
    let data = snapshot::read_info(&file).unwrap().regions[0].data_offset;
    let mut g = c.benchmark_group("restore_copy/1GiB");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("raw", |b| {
        b.iter(|| {
            let mut done = 0;
            while done < SIZE {
                // SAFETY: the destination is our writable guest mapping.
                let n =
                    unsafe { sys::fd::pread(file.as_fd(), host.add(done), SIZE - done, data + done as u64) }
                        .unwrap();
                assert!(n > 0);
                done += n;
            }
        })
    });
    g.bench_function("guestmem", |b| b.iter(|| snapshot::restore_into(&dst, &file).unwrap()));
    g.finish();
}

fn diff(c: &mut Criterion) {
    let mem = memory();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let pages: Vec<u64> =
        (0..(SIZE / PAGE) as u64).filter(|&p| mix(p ^ 0x5555).is_multiple_of(100)).collect();
    let data = {
        let f = tmp();
        snapshot::dump_ranges(&mem, &[], &f).unwrap();
        snapshot::read_info(&f).unwrap().regions[0].data_offset
    };
    let mut g = c.benchmark_group("diff/1GiB");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes((pages.len() * PAGE) as u64));
    let file = tmp();
    g.bench_function("raw", |b| {
        b.iter(|| {
            file.set_len(0).unwrap();
            file.set_len(data + SIZE as u64).unwrap();
            for &p in &pages {
                let off = p as usize * PAGE;
                // SAFETY: one page of our readable guest mapping.
                let n = unsafe { sys::fd::pwrite(file.as_fd(), host.add(off), PAGE, data + off as u64) };
                assert_eq!(n.unwrap(), PAGE);
            }
        })
    });
    g.bench_function("guestmem", |b| {
        b.iter_batched(
            || {
                for &p in &pages {
                    mem.mark_dirty(GuestAddress(p * PAGE as u64), PAGE).unwrap();
                }
            },
            |()| snapshot::dump_dirty(&mem, &file).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn restore_mapped(c: &mut Criterion) {
    let mem = memory();
    let file = tmp();
    snapshot::dump(&mem, &file).unwrap();
    drop(mem);
    let data = snapshot::read_info(&file).unwrap().regions[0].data_offset;
    let mut g = c.benchmark_group("restore_mapped/1GiB");
    g.bench_function("raw", |b| {
        b.iter(|| {
            // SAFETY: a new private mapping of the file, unmapped right away.
            unsafe {
                let p = sys::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    Protection::READ_WRITE,
                    MapFlags::PRIVATE | MapFlags::NORESERVE,
                    Some(file.as_fd()),
                    data,
                )
                .unwrap();
                sys::munmap(p, SIZE).unwrap();
            }
        })
    });
    g.bench_function("guestmem", |b| b.iter(|| drop(snapshot::restore_mapped::<()>(&file).unwrap())));
    g.bench_function("guestmem_atomic_bitmap", |b| {
        b.iter(|| drop(snapshot::restore_mapped::<AtomicBitmap>(&file).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, dump, restore_copy, diff, restore_mapped);
criterion_main!(benches);
