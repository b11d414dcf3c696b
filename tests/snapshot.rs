//! Snapshots against real files: full dump and both restores on anonymous, memfd and hugetlb
//! memory; sparseness seen in `st_blocks`; diff + rebase equal to a full dump byte for byte;
//! private mappings that never write the file; every corrupt file refused before memory
//! changes; a failed diff write that puts its dirty bits back; and a property test against a
//! `Vec<u8>` model.

mod common;

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapError, BitmapSlice};
use guestmem::checksum::Checksum;
use guestmem::mmap::{Backing, HugePageSize, MemfdOptions, MmapRegionBuilder};
use guestmem::snapshot::{self, SnapshotError, SnapshotKind, SnapshotWriter, MAGIC};
use guestmem::sys::Protection;
use guestmem::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    VolatileSlice,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;
/// Two adjacent regions, then one after a hole.
const LAYOUT: [(u64, usize); 3] = [(0, 0x40000), (0x40000, 0x20000), (0x100000, 0x40000)];

fn tmp() -> File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

fn anon<B: guestmem::bitmap::NewBitmap>(layout: &[(u64, usize)]) -> GuestMemoryMmap<B> {
    GuestMemoryMmap::from_ranges(&layout.iter().map(|&(a, l)| (GuestAddress(a), l)).collect::<Vec<_>>())
        .unwrap()
}

fn memfd<B: guestmem::bitmap::NewBitmap>(layout: &[(u64, usize)]) -> GuestMemoryMmap<B> {
    let regions = layout
        .iter()
        .map(|&(a, l)| {
            let b = MmapRegionBuilder::<B>::new(l).backing(Backing::Memfd(MemfdOptions::new("snap")));
            GuestRegionMmap::build(b, GuestAddress(a)).unwrap()
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).unwrap()
}

/// A recognisable pattern: some pages non-zero, some zero, some with a single byte set.
fn fill_pattern<M: GuestMemory>(mem: &M, seed: u8) {
    for r in mem.iter() {
        let pages = r.len() / PAGE;
        for p in 0..pages {
            let addr = GuestAddress(r.start_addr().0 + p * PAGE);
            match (p + u64::from(seed)) % 4 {
                0 => {}
                1 => mem.write_obj(seed.wrapping_add(p as u8) | 1, GuestAddress(addr.0 + PAGE - 1)).unwrap(),
                _ => {
                    let bytes: Vec<u8> =
                        (0..PAGE).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(p as u8)).collect();
                    mem.write_slice(&bytes, addr).unwrap();
                }
            }
        }
    }
}

fn file_bytes(f: &File) -> Vec<u8> {
    let len = f.metadata().unwrap().len();
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

fn allocated(f: &File) -> u64 {
    guestmem::sys::fstat(f.as_fd()).unwrap().blocks_512 * 512
}

/// Dump `mem`, check the file, and restore it both ways into memory of the same layout.
fn check_round_trip<B: Bitmap>(mem: &GuestMemoryMmap<B>, fresh: impl Fn() -> GuestMemoryMmap<B>) {
    fill_pattern(mem, 3);
    let want = common::contents(mem);
    let f = tmp();
    let stats = snapshot::dump(mem, &f).unwrap();
    let info = snapshot::verify(&f).unwrap();
    assert_eq!(info.kind, SnapshotKind::Full);
    assert_eq!(info.file_len, stats.file_len);
    assert_eq!(f.metadata().unwrap().len(), stats.file_len);
    assert_eq!(stats.pages_written + stats.zero_pages, stats.pages_held);
    for (r, m) in info.regions.iter().zip(mem.iter()) {
        assert_eq!((r.guest_addr, r.len, r.page_size), (m.start_addr(), m.len(), m.page_size() as u64));
        assert_eq!(r.data_offset % r.page_size.max(PAGE), 0);
    }

    let dst = fresh();
    fill_pattern(&dst, 200); // stale contents that the restore must replace
    let rs = snapshot::restore_into(&dst, &f).unwrap();
    assert_eq!(common::contents(&dst), want);
    assert!(rs.bytes_read >= stats.bytes_written && rs.bytes_zeroed > 0, "{rs:?}");

    let mapped = snapshot::restore_mapped::<()>(&f).unwrap();
    assert_eq!(common::contents(&mapped), want);
}

#[test]
fn full_round_trip_anonymous() {
    let mem = anon::<AtomicBitmap>(&LAYOUT);
    check_round_trip(&mem, || anon(&LAYOUT));
    let mem = anon::<()>(&LAYOUT);
    check_round_trip(&mem, || anon(&LAYOUT));
}

#[test]
fn full_round_trip_memfd() {
    let mem = memfd::<AtomicBitmap>(&LAYOUT);
    check_round_trip(&mem, || memfd(&LAYOUT));
}

#[test]
fn full_round_trip_hugetlb() {
    let Some(()) = common::need("hugetlb", "full_round_trip_hugetlb", common::huge_pages(8)) else { return };
    let build = || {
        let regions = [(0u64, 4usize << 20), (1 << 30, 2 << 20)]
            .iter()
            .map(|&(a, l)| {
                let b = MmapRegionBuilder::<AtomicBitmap>::new(l).huge_pages(HugePageSize::Size2M);
                GuestRegionMmap::build(b, GuestAddress(a)).unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    };
    let mem = build();
    assert_eq!(mem.regions()[0].page_size(), 2 << 20);
    check_round_trip(&mem, build);
}

#[test]
fn dump_of_mostly_zero_memory_is_sparse() {
    let mem = anon::<()>(&[(0, 64 << 20)]);
    for i in 0..16u64 {
        mem.write_obj(i + 1, GuestAddress(i * (4 << 20) + 8)).unwrap();
    }
    let f = tmp();
    let stats = snapshot::dump(&mem, &f).unwrap();
    assert_eq!((stats.pages_written, stats.bytes_written), (16, 16 * PAGE));
    let len = f.metadata().unwrap().len();
    assert!(len > 64 << 20);
    // 16 data pages and the header: a tiny fraction of the apparent size.
    assert!(allocated(&f) < len / 64, "{} of {len} bytes allocated", allocated(&f));

    // Restoring reads only the data extents where the filesystem reports holes.
    let dst = anon::<()>(&[(0, 64 << 20)]);
    let rs = snapshot::restore_into(&dst, &f).unwrap();
    assert_eq!(common::contents(&dst), common::contents(&mem));
    let data_offset = snapshot::read_info(&f).unwrap().regions[0].data_offset;
    let hole =
        guestmem::sys::fd::lseek_data(f.as_fd(), data_offset, guestmem::sys::fd::SeekData::Hole).unwrap();
    if hole.is_some_and(|h| h < len) {
        assert!(rs.bytes_read < 1 << 20, "read {} bytes of a 64 MiB sparse snapshot", rs.bytes_read);
    } else {
        eprintln!("the temp filesystem reports no holes: restore read {} bytes", rs.bytes_read);
    }
}

#[test]
fn restore_into_marks_the_destination_dirty() {
    let src = anon::<()>(&LAYOUT);
    src.write_obj(1u8, GuestAddress(0x3000)).unwrap();
    src.write_obj(2u8, GuestAddress(0x100000)).unwrap();
    let f = tmp();
    snapshot::dump(&src, &f).unwrap();
    let dst = anon::<AtomicBitmap>(&LAYOUT);
    dst.write_obj(9u8, GuestAddress(0x41000)).unwrap(); // zeroed by the restore: dirty
    dst.take_dirty_ranges(|_, _| {}).unwrap();
    snapshot::restore_into(&dst, &f).unwrap();
    let mut ranges = Vec::new();
    dst.take_dirty_ranges(|a, l| ranges.push((a.0, l))).unwrap();
    // Data extents are at least the written pages; filesystems may report bigger extents.
    for page in [0x3000, 0x41000, 0x100000] {
        assert!(ranges.iter().any(|&(a, l)| a <= page && page < a + l), "{page:#x} not in {ranges:x?}");
    }
}

#[test]
fn diff_then_rebase_equals_full_dump() {
    let mem = anon::<AtomicBitmap>(&LAYOUT);
    fill_pattern(&mem, 5);
    let base = tmp();
    snapshot::dump(&mem, &base).unwrap();
    mem.take_dirty_ranges(|_, _| {}).unwrap();

    // A page rewritten, a page zeroed (held but a hole), a write across two regions.
    mem.write_slice(&[0xaa; 100], GuestAddress(0x2000)).unwrap();
    mem.write_slice(&[0; PAGE as usize], GuestAddress(0x6000)).unwrap();
    mem.write_slice(&[0x55; 16], GuestAddress(0x3fff8)).unwrap();
    let diff = tmp();
    let ds = snapshot::dump_dirty(&mem, &diff).unwrap();
    assert_eq!((ds.pages_held, ds.zero_pages), (4, 1));
    assert_eq!(mem.dirty_page_count().unwrap(), 0);
    let info = snapshot::verify(&diff).unwrap();
    assert_eq!(info.kind, SnapshotKind::Diff);
    assert!(info.regions[0].holds_page(6) && !info.regions[0].holds_page(5));
    assert_eq!(info.regions[0].held_runs(PAGE).collect::<Vec<_>>(), vec![(2, 1), (6, 1), (63, 1)]);

    let rebased = tmp();
    let now = tmp();
    snapshot::rebase(&base, &diff, &rebased).unwrap();
    snapshot::dump(&mem, &now).unwrap();
    assert_eq!(file_bytes(&rebased), file_bytes(&now));
    assert_eq!(snapshot::read_info(&rebased).unwrap(), snapshot::read_info(&now).unwrap());

    // The diff also applies on top of a restored base.
    let dst = anon::<()>(&LAYOUT);
    snapshot::restore_into(&dst, &base).unwrap();
    snapshot::restore_into(&dst, &diff).unwrap();
    assert_eq!(common::contents(&dst), common::contents(&mem));

    // A given list of ranges works the same way.
    let ranged = tmp();
    snapshot::dump_ranges(
        &mem,
        &[(GuestAddress(0x2000), 1), (GuestAddress(0x6000), PAGE), (GuestAddress(0x3fff8), 16)],
        &ranged,
    )
    .unwrap();
    assert_eq!(file_bytes(&ranged), file_bytes(&diff));
}

#[test]
fn mapped_restore_never_writes_the_file() {
    let mem = anon::<()>(&LAYOUT);
    fill_pattern(&mem, 7);
    let f = tmp();
    snapshot::dump(&mem, &f).unwrap();
    let before = file_bytes(&f);
    let restored = snapshot::restore_mapped::<AtomicBitmap>(&f).unwrap();
    assert_eq!(common::contents(&restored), common::contents(&mem));
    restored.write_slice(&[0xee; 0x3000], GuestAddress(0x3f000)).unwrap();
    restored.write_obj(1u64, GuestAddress(0x100000)).unwrap();
    // Discard of a private file mapping must not bring the file's bytes back either.
    restored.regions()[2].discard(0x10000, 0x1000).unwrap();
    assert_eq!(restored.read_obj::<u64>(GuestAddress(0x110000)).unwrap(), 0);
    assert_eq!(restored.dirty_page_count().unwrap(), 5);
    assert_eq!(file_bytes(&f), before);
    snapshot::verify(&f).unwrap();
    drop(restored);
    assert_eq!(file_bytes(&f), before);
}

#[test]
fn mapped_restore_with_policies() {
    let mem = anon::<()>(&LAYOUT);
    fill_pattern(&mem, 4);
    let f = tmp();
    snapshot::dump(&mem, &f).unwrap();
    let mut seen = Vec::new();
    let restored = snapshot::restore_mapped_with::<AtomicBitmap, _>(&f, |r, b| {
        seen.push(r.guest_addr.0);
        // The backing cannot be replaced: it is set after `configure`.
        b.guard_pages(1).dont_fork(true).backing(Backing::Anonymous { shared: true })
    })
    .unwrap();
    assert_eq!(seen, vec![0, 0x40000, 0x100000]);
    assert_eq!(common::contents(&restored), common::contents(&mem));
    assert!(restored.regions().iter().all(|r| r.file_offset().is_some()));
    // Options a private file mapping cannot have are refused, naming the region.
    let e =
        snapshot::restore_mapped_with::<(), _>(&f, |_, b| b.huge_pages(HugePageSize::Size2M)).unwrap_err();
    assert!(matches!(e, SnapshotError::Memory(GuestMemoryError::Mmap { base: GuestAddress(0), .. })), "{e}");
}

/// Runs `op` on a target memory holding a pattern and checks it failed with `check` and left
/// the memory as it was.
fn refused(target: &GuestMemoryMmap<AtomicBitmap>, f: &File, check: impl Fn(&SnapshotError) -> bool) {
    let before = common::contents(target);
    let dirty_before = target.dirty_page_count().unwrap();
    let e = snapshot::restore_into(target, f).unwrap_err();
    assert!(check(&e), "unexpected error: {e}");
    assert!(!e.to_string().is_empty());
    assert_eq!(common::contents(target), before, "memory changed after {e}");
    assert_eq!(target.dirty_page_count().unwrap(), dirty_before);
}

fn write_copy(bytes: &[u8]) -> File {
    let f = tmp();
    f.write_all_at(bytes, 0).unwrap();
    f
}

/// Rewrites the header checksum of a header area in `bytes` (for crafted layouts).
fn reseal(bytes: &mut [u8]) {
    let header_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let mut c = Checksum::new();
    c.update(&bytes[..40]);
    c.zeros(8);
    c.update(&bytes[48..header_len]);
    bytes[40..48].copy_from_slice(&c.finish().to_le_bytes());
}

#[test]
fn corrupt_files_are_refused_before_memory_changes() {
    let src = anon::<AtomicBitmap>(&LAYOUT);
    fill_pattern(&src, 9);
    let f = tmp();
    snapshot::dump(&src, &f).unwrap();
    let good = file_bytes(&f);
    let info = snapshot::read_info(&f).unwrap();
    let target = anon::<AtomicBitmap>(&LAYOUT);
    fill_pattern(&target, 1);

    // Truncated inside every header field, the table, and the data.
    let mut cuts = vec![0, 4, 8, 10, 12, 16, 20, 24, 32, 40, 48, 63];
    cuts.extend([64, 64 + 8, 64 + 47, info.header_len - 1, info.header_len, info.file_len - 1]);
    for cut in cuts {
        let t = write_copy(&good[..cut as usize]);
        refused(&target, &t, |e| matches!(e, SnapshotError::Truncated { file_len, .. } if *file_len == cut));
        assert!(snapshot::restore_mapped::<()>(&t).is_err());
    }
    let mut bad = good.clone();
    bad[0] ^= 1;
    refused(
        &target,
        &write_copy(&bad),
        |e| matches!(e, SnapshotError::BadMagic { found } if found[1..] == MAGIC[1..]),
    );
    let mut bad = good.clone();
    bad[8] = 2;
    refused(&target, &write_copy(&bad), |e| {
        matches!(e, SnapshotError::UnsupportedVersion { found: 2, supported: 1 })
    });
    // A flipped bit in a field the layout does not depend on (a region's checksum, the header
    // checksum itself): the header checksum finds it.
    for at in [64 + 32, 64 + 48 + 32, 41] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        let t = write_copy(&bad);
        refused(&target, &t, |e| matches!(e, SnapshotError::HeaderChecksum { .. }));
        assert!(matches!(snapshot::restore_mapped::<()>(&t), Err(SnapshotError::HeaderChecksum { .. })));
    }
    // In a field the layout is computed from (the region count, a region's length): the layout
    // no longer adds up, which is checked before the rest of the header area is even read.
    for at in [16usize, 64 + 8] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        let t = write_copy(&bad);
        refused(&target, &t, |e| {
            matches!(e, SnapshotError::InvalidLayout { .. } | SnapshotError::HeaderChecksum { .. })
        });
        assert!(snapshot::restore_mapped::<()>(&t).is_err());
    }
    // A flipped bit in the data of the last region: the first pass finds it, and nothing of
    // the regions before it was copied.
    let mut bad = good.clone();
    let at = (info.regions[2].data_offset + 0x2005) as usize;
    bad[at] ^= 4;
    let t = write_copy(&bad);
    refused(&target, &t, |e| matches!(e, SnapshotError::DataChecksum { index: 2, .. }));
    assert!(matches!(
        snapshot::verify(&t),
        Err(SnapshotError::DataChecksum { index: 2, guest_addr: GuestAddress(0x100000), .. })
    ));
    // Data appearing where the dump left a hole is corruption too.
    let mut bad = good.clone();
    let zero_page = (info.regions[0].data_offset + 3 * PAGE) as usize; // page 3 of seed 9 is zero
    assert!(bad[zero_page..zero_page + PAGE as usize].iter().all(|&b| b == 0));
    bad[zero_page + 17] = 1;
    refused(&target, &write_copy(&bad), |e| matches!(e, SnapshotError::DataChecksum { index: 0, .. }));
    // Crafted layouts with a valid checksum.
    let crafted = |at: usize, value: &[u8]| {
        let mut bad = good.clone();
        bad[at..at + value.len()].copy_from_slice(value);
        reseal(&mut bad);
        write_copy(&bad)
    };
    let e0 = 64usize; // first table entry
    let u64le = |v: u64| v.to_le_bytes().to_vec();
    for (at, value) in [
        (12, 0x100u32.to_le_bytes().to_vec()),              // unknown flag
        (16, (1u32 << 20).to_le_bytes().to_vec()),          // too many regions
        (20, 3000u32.to_le_bytes().to_vec()),               // page size not a power of two
        (e0 + 24, u64le(info.regions[0].data_offset + 1)),  // misaligned data
        (e0 + 48 + 24, u64le(info.regions[0].data_offset)), // region 1 data over region 0's
        (e0 + 48, u64le(0x1000)),                           // region 1 overlaps region 0
        (e0 + 8, u64le(0)),                                 // empty region
        (e0 + 40, u64le(64)),                               // a bitmap in a full snapshot
        (32, u64le(info.file_len - 1)),                     // data past the file length
    ] {
        refused(&target, &crafted(at, &value), |e| matches!(e, SnapshotError::InvalidLayout { .. }));
    }
    // A header length beyond any sane size is refused before it is read.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    refused(&target, &write_copy(&bad), |e| matches!(e, SnapshotError::InvalidLayout { .. }));

    // Regions that do not match the target.
    let other = anon::<AtomicBitmap>(&LAYOUT[..2]);
    fill_pattern(&other, 1);
    refused(&other, &f, |e| matches!(e, SnapshotError::RegionCount { snapshot: 3, target: 2 }));
    let moved = anon::<AtomicBitmap>(&[(0, 0x40000), (0x40000, 0x20000), (0x200000, 0x40000)]);
    refused(&moved, &f, |e| {
        matches!(e, SnapshotError::RegionMismatch { index: 2, target_addr: GuestAddress(0x200000), .. })
    });
    // A read-only target region.
    let ro_regions = LAYOUT
        .iter()
        .map(|&(a, l)| {
            let prot = if a == 0x100000 { Protection::READ } else { Protection::READ_WRITE };
            GuestRegionMmap::build(
                MmapRegionBuilder::<AtomicBitmap>::new(l).protection(prot),
                GuestAddress(a),
            )
            .unwrap()
        })
        .collect();
    let ro = GuestMemoryMmap::from_regions(ro_regions).unwrap();
    ro.write_obj(3u8, GuestAddress(0x1000)).unwrap();
    refused(&ro, &f, |e| matches!(e, SnapshotError::Memory(GuestMemoryError::ReadOnly { .. })));

    // After all that, the good file still restores.
    snapshot::restore_into(&target, &write_copy(&good)).unwrap();
    assert_eq!(common::contents(&target), common::contents(&src));
}

#[test]
fn kinds_are_checked() {
    let mem = anon::<AtomicBitmap>(&LAYOUT);
    let (full, diff, out) = (tmp(), tmp(), tmp());
    snapshot::dump(&mem, &full).unwrap();
    snapshot::dump_dirty(&mem, &diff).unwrap();
    let e = snapshot::restore_mapped::<()>(&diff).unwrap_err();
    assert!(
        matches!(e, SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: SnapshotKind::Diff }),
        "{e}"
    );
    let e = snapshot::rebase(&diff, &diff, &out).unwrap_err();
    assert!(
        matches!(e, SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: SnapshotKind::Diff }),
        "{e}"
    );
    let e = snapshot::rebase(&full, &full, &out).unwrap_err();
    assert!(
        matches!(e, SnapshotError::KindMismatch { expected: SnapshotKind::Diff, found: SnapshotKind::Full }),
        "{e}"
    );
    // A diff of other memory does not rebase onto this base.
    let other = anon::<AtomicBitmap>(&LAYOUT[1..]);
    let other_diff = tmp();
    snapshot::dump_dirty(&other, &other_diff).unwrap();
    let e = snapshot::rebase(&full, &other_diff, &out).unwrap_err();
    assert!(matches!(e, SnapshotError::RegionCount { snapshot: 2, target: 3 }), "{e}");
}

#[test]
fn dump_errors() {
    let mem = anon::<()>(&LAYOUT);
    let f = tmp();
    let e = snapshot::dump_ranges(&mem, &[(GuestAddress(0x60000), 1)], &f).unwrap_err();
    assert!(
        matches!(e, SnapshotError::Memory(GuestMemoryError::InvalidGuestAddress(GuestAddress(0x60000)))),
        "{e}"
    );
    let e = snapshot::dump_ranges(&mem, &[(GuestAddress(0x5f000), 0x2000)], &f).unwrap_err();
    assert!(matches!(e, SnapshotError::Memory(GuestMemoryError::InvalidRange { .. })), "{e}");
    // Nothing was written: the file is still empty.
    assert_eq!(f.metadata().unwrap().len(), 0);

    // A region without dirty tracking: refused before any other region's bits are taken.
    let regions = LAYOUT
        .iter()
        .map(|&(a, l)| {
            let b = MmapRegionBuilder::<Option<AtomicBitmap>>::new(l).dirty_tracking(a != 0x40000);
            GuestRegionMmap::build(b, GuestAddress(a)).unwrap()
        })
        .collect();
    let mem = GuestMemoryMmap::from_regions(regions).unwrap();
    mem.write_obj(1u8, GuestAddress(0)).unwrap();
    let e = snapshot::dump_dirty(&mem, &f).unwrap_err();
    assert!(matches!(e, SnapshotError::Dirty(BitmapError::NotTracking)), "{e}");
    assert_eq!(mem.regions()[0].bitmap().as_ref().unwrap().dirty_page_count(), 1);

    // A file opened read-only cannot take a dump.
    let ro = File::open("/proc/self/exe").unwrap();
    let mem = anon::<()>(&LAYOUT);
    assert!(matches!(snapshot::dump(&mem, &ro), Err(SnapshotError::Io { .. })));
}

/// A writer that fails once it has written `budget` data bytes.
struct FailAfter {
    file: File,
    budget: Cell<u64>,
}

impl SnapshotWriter for FailAfter {
    fn write_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> io::Result<usize> {
        let left = self.budget.get();
        if left == 0 {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "injected: disk full"));
        }
        let part = buf.subslice(0, buf.len().min(left as usize)).unwrap();
        let n = SnapshotWriter::write_at(&self.file, &part, offset)?;
        self.budget.set(left - n as u64);
        Ok(n)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

#[test]
fn failed_diff_write_puts_the_dirty_bits_back() {
    let mem = anon::<AtomicBitmap>(&LAYOUT);
    mem.take_dirty_ranges(|_, _| {}).unwrap();
    // Dirty, non-zero pages in every region, written in several pwrite calls.
    for addr in [0x1000u64, 0x9000, 0x3f000, 0x40000, 0x41000, 0x100000, 0x13f000] {
        mem.write_slice(&[0x77; PAGE as usize], GuestAddress(addr)).unwrap();
    }
    let mut want = Vec::new();
    mem.take_dirty_ranges(|a, l| want.push((a, l))).unwrap();
    mem.restore_dirty_ranges(&want).unwrap();

    for budget in [0, 100, PAGE, 3 * PAGE + 5, 7 * PAGE] {
        let w = FailAfter { file: tmp(), budget: Cell::new(budget) };
        let e = snapshot::dump_dirty(&mem, &w).unwrap_err();
        assert!(
            matches!(&e, SnapshotError::Io { op: "write", source, .. } if source.kind() == io::ErrorKind::StorageFull),
            "{e}"
        );
        let mut again = Vec::new();
        mem.take_dirty_ranges(|a, l| again.push((a, l))).unwrap();
        assert_eq!(again, want, "budget {budget}");
        mem.restore_dirty_ranges(&again).unwrap();
        // What was written is not a valid snapshot (the header comes last).
        assert!(snapshot::read_info(&w.file).is_err());
    }
    // With room enough, the same diff succeeds and takes the bits.
    let w = FailAfter { file: tmp(), budget: Cell::new(u64::MAX) };
    assert_eq!(snapshot::dump_dirty(&mem, &w).unwrap().pages_written, 7);
    assert_eq!(mem.dirty_page_count().unwrap(), 0);
    snapshot::verify(&w.file).unwrap();
}

/// A model step: pages to set to a byte value (0 makes a zero page).
fn apply(mem: &GuestMemoryMmap<AtomicBitmap>, model: &mut [Vec<u8>], writes: &[(usize, u64, u8)]) {
    for &(region, page, value) in writes {
        let r = &mem.regions()[region % model.len()];
        let pages = r.len() / PAGE;
        let p = page % pages;
        let data = vec![value; PAGE as usize];
        mem.write_slice(&data, GuestAddress(r.start_addr().0 + p * PAGE)).unwrap();
        model[region % model.len()][(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dump_diff_rebase_restore_match_the_model(
        first in prop::collection::vec((0usize..3, 0u64..64, prop_oneof![Just(0u8), any::<u8>()]), 0..40),
        rounds in prop::collection::vec(prop::collection::vec((0usize..3, 0u64..64, prop_oneof![Just(0u8), any::<u8>()]), 0..12), 1..4),
    ) {
        let mem = anon::<AtomicBitmap>(&LAYOUT);
        let mut model = common::contents(&mem);
        apply(&mem, &mut model, &first);
        let mut base = tmp();
        snapshot::dump(&mem, &base).unwrap();
        mem.take_dirty_ranges(|_, _| {}).unwrap();
        let restored = anon::<()>(&LAYOUT);
        snapshot::restore_into(&restored, &base).unwrap();
        for writes in &rounds {
            apply(&mem, &mut model, writes);
            let diff = tmp();
            snapshot::dump_dirty(&mem, &diff).unwrap();
            snapshot::restore_into(&restored, &diff).unwrap();
            prop_assert_eq!(&common::contents(&restored), &model);
            let next = tmp();
            snapshot::rebase(&base, &diff, &next).unwrap();
            let full = tmp();
            snapshot::dump(&mem, &full).unwrap();
            prop_assert_eq!(file_bytes(&next), file_bytes(&full));
            base = next;
        }
        let mapped = snapshot::restore_mapped::<()>(&base).unwrap();
        prop_assert_eq!(&common::contents(&mapped), &model);
    }
}

#[test]
fn every_snapshot_error_variant_is_produced() {
    // An exhaustive match: a new variant does not compile until it is listed here.
    let name = |e: &SnapshotError| match e {
        SnapshotError::Io { .. } => "Io",
        SnapshotError::Truncated { .. } => "Truncated",
        SnapshotError::BadMagic { .. } => "BadMagic",
        SnapshotError::UnsupportedVersion { .. } => "UnsupportedVersion",
        SnapshotError::HeaderChecksum { .. } => "HeaderChecksum",
        SnapshotError::InvalidLayout { .. } => "InvalidLayout",
        SnapshotError::DataChecksum { .. } => "DataChecksum",
        SnapshotError::RegionCount { .. } => "RegionCount",
        SnapshotError::RegionMismatch { .. } => "RegionMismatch",
        SnapshotError::KindMismatch { .. } => "KindMismatch",
        SnapshotError::Memory(_) => "Memory",
        SnapshotError::OutputIsInput { .. } => "OutputIsInput",
        SnapshotError::BackingLost { .. } => "BackingLost",
        SnapshotError::Dirty(_) => "Dirty",
    };
    let mut produced = Vec::new();
    let src = anon::<AtomicBitmap>(&LAYOUT);
    fill_pattern(&src, 9);
    let full = tmp();
    snapshot::dump(&src, &full).unwrap();
    let good = file_bytes(&full);
    let info = snapshot::read_info(&full).unwrap();
    let corrupt = |at: usize, value: &[u8], seal: bool| {
        let mut bad = good.clone();
        bad[at..at + value.len()].copy_from_slice(value);
        if seal {
            reseal(&mut bad);
        }
        write_copy(&bad)
    };

    // A file opened read-only cannot take a dump.
    produced.push(snapshot::dump(&anon::<()>(&LAYOUT), &File::open("/proc/self/exe").unwrap()).unwrap_err());
    // Files that are not (or no longer) good snapshots.
    produced.push(snapshot::read_info(&tmp()).unwrap_err());
    produced.push(snapshot::read_info(&corrupt(0, &[good[0] ^ 1], false)).unwrap_err());
    produced.push(snapshot::read_info(&corrupt(8, &2u32.to_le_bytes(), false)).unwrap_err());
    produced.push(snapshot::read_info(&corrupt(64 + 32, &[good[64 + 32] ^ 0x10], false)).unwrap_err());
    produced.push(snapshot::read_info(&corrupt(12, &0x100u32.to_le_bytes(), true)).unwrap_err());
    let at = (info.regions[2].data_offset + 0x2005) as usize;
    produced.push(snapshot::verify(&corrupt(at, &[good[at] ^ 4], false)).unwrap_err());
    // Targets that do not match the snapshot.
    produced.push(snapshot::restore_into(&anon::<()>(&LAYOUT[..2]), &full).unwrap_err());
    let moved = anon::<()>(&[(0, 0x40000), (0x40000, 0x20000), (0x200000, 0x40000)]);
    produced.push(snapshot::restore_into(&moved, &full).unwrap_err());
    // A diff where a full snapshot is needed.
    let diff = tmp();
    snapshot::dump_dirty(&src, &diff).unwrap();
    produced.push(snapshot::restore_mapped::<()>(&diff).unwrap_err());
    // A range outside guest memory.
    produced.push(snapshot::dump_ranges(&src, &[(GuestAddress(0x60000), 1)], &tmp()).unwrap_err());
    // A region without dirty tracking.
    let untracked = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(0x10000).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let untracked = GuestMemoryMmap::from_regions(vec![untracked]).unwrap();
    produced.push(snapshot::dump_dirty(&untracked, &tmp()).unwrap_err());
    // A rebase into its own base.
    produced.push(snapshot::rebase(&full, &diff, &full).unwrap_err());
    // Memory whose (unsealed) memfd was truncated under it: the fault was recovered, and the
    // memory no longer holds what was written (see tests/safety.rs for the fault itself).
    let shrunk = GuestRegionMmap::build(
        MmapRegionBuilder::<()>::new(0x4000)
            .backing(Backing::Memfd(MemfdOptions::new("shrunk").sealed(false))),
        GuestAddress(0),
    )
    .unwrap();
    let fd = shrunk.file_offset().unwrap().as_fd().try_clone_to_owned().unwrap();
    File::from(fd).set_len(0).unwrap();
    let shrunk = GuestMemoryMmap::from_regions(vec![shrunk]).unwrap();
    assert_eq!(shrunk.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
    produced.push(snapshot::dump(&shrunk, &tmp()).unwrap_err());

    common::assert_every_variant(
        &produced,
        name,
        &[
            "Io",
            "Truncated",
            "BadMagic",
            "UnsupportedVersion",
            "HeaderChecksum",
            "InvalidLayout",
            "DataChecksum",
            "RegionCount",
            "RegionMismatch",
            "KindMismatch",
            "Memory",
            "OutputIsInput",
            "BackingLost",
            "Dirty",
        ],
        true,
    );
}
