//! Every write path dirties exactly the pages it wrote: no more, no less, on `AtomicBitmap`
//! (and `Some(AtomicBitmap)`); nothing on `()`; and `None` refuses to report "clean".

use std::collections::BTreeSet;
use std::io::{Seek, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use guestmem::bitmap::{Bitmap, BitmapError, DirtyHarvest, NewBitmap};
use guestmem::mmap::{Backing, MmapRegionBuilder};
use guestmem::volatile::{ReadVolatile, ReadVolatileAt};
use guestmem::{
    AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

const PAGE: u64 = 4096;
/// Two adjacent regions of 16 pages, then a third after a hole.
const LAYOUT: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x10000), (0x30000, 0x10000)];

fn pages(addr: u64, len: u64) -> BTreeSet<u64> {
    if len == 0 {
        return BTreeSet::new();
    }
    (addr / PAGE..(addr + len).div_ceil(PAGE)).collect()
}

fn file_with(bytes: &[u8]) -> std::fs::File {
    let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

/// Runs every write path on `mem`; after each, `dirty()` must return exactly the pages the
/// write touched when `tracking`, and nothing otherwise.
fn check_write_paths<B: Bitmap + NewBitmap>(
    tracking: bool,
    dirty: impl Fn(&GuestMemoryMmap<B>) -> BTreeSet<u64>,
) {
    let ranges: Vec<_> = LAYOUT.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    let mem = GuestMemoryMmap::<B>::from_ranges(&ranges).unwrap();
    let check = |what: &str, expect: BTreeSet<u64>| {
        let got = dirty(&mem);
        let expect = if tracking { expect } else { BTreeSet::new() };
        assert_eq!(got, expect, "{what}");
    };
    check("fresh memory", BTreeSet::new());

    // Bytes<GuestAddress>, one region and across regions.
    mem.write(&[1; 100], GuestAddress(0x1ff0)).unwrap();
    check("write", pages(0x1ff0, 100));
    mem.write_slice(&[1; 0x2000], GuestAddress(0xf800)).unwrap();
    check("write_slice across regions", pages(0xf800, 0x2000));
    mem.write_obj(7u64, GuestAddress(0x3008)).unwrap();
    check("write_obj", pages(0x3008, 8));
    mem.write_obj(7u64, GuestAddress(0xfffc)).unwrap();
    check("write_obj across regions", pages(0xfffc, 8));
    mem.write_obj([1u8; 3], GuestAddress(0x30ffe)).unwrap();
    check("write_obj of an odd size", pages(0x30ffe, 3));
    mem.store(9u32, GuestAddress(0x5000), Ordering::SeqCst).unwrap();
    check("store", pages(0x5000, 4));
    let _ = mem.write(&[1; 64], GuestAddress(0x1ffe0)).unwrap(); // stops at the hole
    check("write up to a hole", pages(0x1ffe0, 32));
    assert!(mem.write_slice(&[1; 64], GuestAddress(0x1ffe0)).is_err());
    check("refused write_slice", BTreeSet::new());

    // I/O into guest memory: plain, exact, positional, vectored.
    mem.read_volatile_from(GuestAddress(0x7000), &mut &[5u8; 300][..], 300).unwrap();
    check("read_volatile_from", pages(0x7000, 300));
    mem.read_exact_volatile_from(GuestAddress(0xff00), &mut file_with(&[6; 0x200]), 0x200).unwrap();
    check("read_exact_volatile_from across regions", pages(0xff00, 0x200));
    assert_eq!(mem.read_volatile_from(GuestAddress(0x8000), &mut &[5u8; 10][..], 300).unwrap(), 10);
    check("short read_volatile_from marks what arrived", pages(0x8000, 10));
    let f = file_with(&[7; 0x3000]);
    let s = mem.get_slice(GuestAddress(0x9000), 0x1800).unwrap();
    f.read_exact_volatile_at(&s, 0x100).unwrap();
    check("pread into a slice", pages(0x9000, 0x1800));
    let a = mem.get_slice(GuestAddress(0x2_0000 - 0x100), 0x100).unwrap();
    let b = mem.get_slice(GuestAddress(0x3_4000), 0x1000).unwrap();
    let mut file = file_with(&[8; 0x800]);
    assert_eq!(file.read_vectored_volatile(&[a, b]).unwrap(), 0x800);
    let mut expect = pages(0x2_0000 - 0x100, 0x100);
    expect.extend(pages(0x3_4000, 0x700));
    check("readv into two regions marks what arrived", expect);
    let s = mem.get_slice(GuestAddress(0xa000), 0x10).unwrap();
    assert_eq!(f.read_vectored_volatile_at(&[s], 0x2ff8).unwrap(), 8);
    check("preadv", pages(0xa000, 8));

    // Slices, refs and atomics handed out by the memory.
    let s = mem.get_slice(GuestAddress(0xb000), 0x2000).unwrap();
    s.write_obj(1u16, 0x1fff - 1).unwrap();
    check("slice write_obj", pages(0xb000 + 0x1ffe, 2));
    s.copy_from(&[1u32; 3]).unwrap();
    check("slice copy_from", pages(0xb000, 12));
    s.subslice(0x100, 0x1000).unwrap().fill(3).unwrap();
    check("slice fill", pages(0xb100, 0x1000));
    let src = mem.get_slice(GuestAddress(0x3_0000), 0x1000).unwrap();
    s.copy_from_volatile_slice(&src).unwrap();
    check("copy into a slice", pages(0xb000, 0x1000));
    s.get_ref::<u64>(0x800).unwrap().store(4).unwrap();
    check("VolatileRef::store", pages(0xb800, 8));
    let arr = s.get_array_ref::<u32>(0x1000, 0x400).unwrap();
    arr.store(0x3ff, 1).unwrap();
    check("VolatileArrayRef::store", pages(0xb000 + 0x1ffc, 4));
    arr.copy_from(&[2; 0x10]).unwrap();
    check("VolatileArrayRef::copy_from", pages(0xc000, 0x40));
    let at = s.get_atomic_ref::<AtomicU64>(0x10).unwrap();
    at.fetch_add(1, Ordering::SeqCst).unwrap();
    check("AtomicRef::fetch_add", pages(0xb010, 8));
    assert!(at.compare_exchange(77, 1, Ordering::SeqCst, Ordering::SeqCst).unwrap().is_err());
    check("failed compare_exchange writes nothing", BTreeSet::new());
    let at32 = mem.get_slice(GuestAddress(0x3_8000), 4).unwrap().get_atomic_ref::<AtomicU32>(0).unwrap();
    at32.swap(5, Ordering::SeqCst).unwrap();
    check("AtomicRef::swap", pages(0x3_8000, 4));

    // Region-relative writes.
    let r = mem.find_region(GuestAddress(0x1_0000)).unwrap();
    r.write_obj(1u8, MemoryRegionAddress(0x2345)).unwrap();
    check("region write_obj", pages(0x1_2345, 1));

    // Discard changes the contents to zeros: marked.
    r.discard(0x4000, 0x2000).unwrap();
    check("discard", pages(0x1_4000, 0x2000));

    // Reads mark nothing.
    let mut buf = vec![0u8; 0x3000];
    mem.read_slice(&mut buf, GuestAddress(0xf000)).unwrap();
    let _: u64 = mem.read_obj(GuestAddress(0x100)).unwrap();
    let _: u32 = mem.load(GuestAddress(0x5000), Ordering::SeqCst).unwrap();
    mem.write_all_volatile_to(GuestAddress(0), &mut Vec::new(), 0x2000).unwrap();
    check("reads", BTreeSet::new());
}

fn harvest<B: Bitmap + DirtyHarvest>(mem: &GuestMemoryMmap<B>) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    let n = mem
        .take_dirty_ranges(|addr, len| {
            assert_eq!(addr.0 % PAGE, 0);
            set.extend(pages(addr.0, len));
        })
        .unwrap();
    assert_eq!(n, set.len(), "page count and ranges disagree");
    set
}

#[test]
fn atomic_bitmap_tracks_every_write_path_exactly() {
    check_write_paths::<AtomicBitmap>(true, harvest);
}

#[test]
fn optional_bitmap_when_on_tracks_the_same() {
    check_write_paths::<Option<AtomicBitmap>>(true, harvest);
}

#[test]
fn unit_bitmap_records_nothing() {
    check_write_paths::<()>(false, |mem| {
        mem.iter()
            .flat_map(|r| (0..r.len()).step_by(PAGE as usize).map(move |o| (r, o)))
            .filter(|(r, o)| r.bitmap().dirty_at(*o as usize))
            .map(|(r, o)| (r.start_addr().0 + o) / PAGE)
            .collect()
    });
}

#[test]
fn tracking_switched_off_refuses_to_report_clean() {
    // Tracking chosen at run time: one region on, one off (None). Writes to the untracked one
    // cost nothing, and the harvest fails rather than report that region clean.
    let on = GuestRegionMmap::build(MmapRegionBuilder::<Option<AtomicBitmap>>::new(0x1000), GuestAddress(0))
        .unwrap();
    let off = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(0x1000).dirty_tracking(false),
        GuestAddress(0x1000),
    )
    .unwrap();
    assert!(on.bitmap().is_some() && off.bitmap().is_none());
    let mem = GuestMemoryMmap::from_regions(vec![on, off]).unwrap();
    mem.write_obj(1u16, GuestAddress(0xfff)).unwrap();
    assert!(matches!(mem.take_dirty_ranges(|_, _| ()), Err(BitmapError::NotTracking)));
    assert!(matches!(mem.dirty_page_count(), Err(BitmapError::NotTracking)));
    // Types that always track ignore the request.
    let always = MmapRegionBuilder::<AtomicBitmap>::new(0x1000).dirty_tracking(false).build().unwrap();
    assert_eq!(always.bitmap().byte_len(), 0x1000);
    always.as_volatile_slice().write_obj(1u8, 0).unwrap();
    assert_eq!(always.bitmap().dirty_page_count(), 1);
}

#[test]
fn mark_and_restore_by_hand() {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x10000),
    ])
    .unwrap();
    // A raw-pointer write is untracked until marked by hand.
    let p = mem.get_host_address(GuestAddress(0x3000)).unwrap();
    // SAFETY: `p` points into a live, writable region of guest memory.
    unsafe { p.write_volatile(1) };
    assert!(harvest(&mem).is_empty());
    mem.mark_dirty(GuestAddress(0xf000), 0x2000).unwrap();
    assert_eq!(harvest(&mem), pages(0xf000, 0x2000));
    assert!(mem.mark_dirty(GuestAddress(0x1f000), 0x2000).is_err());
    assert!(harvest(&mem).is_empty(), "a refused mark marks nothing");
    // A consumer that failed puts its ranges back.
    mem.write_slice(&[1; 0x3000], GuestAddress(0x5000)).unwrap();
    let mut taken = Vec::new();
    mem.take_dirty_ranges(|a, l| taken.push((a, l))).unwrap();
    assert_eq!(taken, vec![(GuestAddress(0x5000), 0x3000)]);
    assert!(harvest(&mem).is_empty());
    mem.restore_dirty_ranges(&taken).unwrap();
    assert_eq!(mem.dirty_page_count().unwrap(), 3);
    assert!(mem.restore_dirty_ranges(&[(GuestAddress(0x4000), 1), (GuestAddress(0x30000), 1)]).is_err());
    assert_eq!(harvest(&mem), pages(0x5000, 0x3000), "a refused restore restores nothing");
}

#[test]
fn shared_memfd_writes_are_tracked_too() {
    let r = GuestRegionMmap::build(
        MmapRegionBuilder::<AtomicBitmap>::new(0x4000)
            .backing(Backing::Memfd(guestmem::mmap::MemfdOptions::new("d"))),
        GuestAddress(0x1_0000_0000),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![r]).unwrap();
    mem.write_obj(1u64, GuestAddress(0x1_0000_2ffc)).unwrap();
    assert_eq!(harvest(&mem), pages(0x1_0000_2ffc, 8));
}

#[test]
fn concurrent_writers_and_harvester_lose_no_write() {
    use std::sync::atomic::AtomicBool;
    let mem = Arc::new(
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(4 << 20), 4 << 20),
        ])
        .unwrap(),
    );
    let total_pages = (8u64 << 20) / PAGE;
    let done = Arc::new(AtomicBool::new(false));
    let harvester = {
        let (mem, done) = (mem.clone(), done.clone());
        std::thread::spawn(move || {
            let mut union = BTreeSet::new();
            let mut harvests = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                mem.take_dirty_ranges(|a, l| union.extend(pages(a.0, l))).unwrap();
                harvests += 1;
                if finished {
                    return (union, harvests);
                }
            }
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut written = BTreeSet::new();
                let mut x = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                for i in 0..100_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Sparse on purpose: most pages are never written, so a stray mark shows.
                    let page = (x % (total_pages / 4)) * 4;
                    // Every fourth write straddles into the next page.
                    let off = if i % 4 == 0 { PAGE - 4 } else { 8 };
                    mem.write_obj(i, GuestAddress(page * PAGE + off)).unwrap();
                    written.extend(pages(page * PAGE + off, 8));
                }
                written
            })
        })
        .collect();
    let mut written = BTreeSet::new();
    for w in writers {
        written.extend(w.join().unwrap());
    }
    done.store(true, Ordering::Release);
    let (union, harvests) = harvester.join().unwrap();
    assert!(harvests > 1, "the harvester ran only {harvests} time(s)");
    assert_eq!(union.len(), written.len());
    assert_eq!(union, written, "harvested pages differ from written pages");
}

#[test]
fn the_bitmap_always_covers_the_whole_region() {
    // vm-memory can end up with a zero-length bitmap that silently drops marks. Here every way
    // of building a region sizes the bitmap for it: marks on the very last page are kept.
    let size = 0x10_1000usize; // 257 pages: the last page is alone in its 64-page word
    let built = MmapRegionBuilder::<AtomicBitmap>::new(size).build().unwrap();
    let mapping = MmapRegionBuilder::<()>::new(size).build().unwrap();
    // SAFETY: `mapping` outlives `adopted` (dropped after it, at the end of the test).
    let adopted = unsafe {
        MmapRegionBuilder::<AtomicBitmap>::build_raw(
            mapping.as_ptr(),
            size,
            guestmem::sys::Protection::READ_WRITE,
            mapping.flags(),
        )
    }
    .unwrap();
    let from_ranges = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let memfd = MmapRegionBuilder::<AtomicBitmap>::new(size)
        .backing(Backing::Memfd(guestmem::mmap::MemfdOptions::new("b")))
        .build()
        .unwrap();
    for (what, region) in [("build", &built), ("build_raw", &adopted), ("memfd", &memfd)] {
        assert_eq!(region.bitmap().byte_len(), size, "{what}");
        assert_eq!(region.bitmap().num_pages(), 257, "{what}");
        region.as_volatile_slice().write_obj(1u8, size - 1).unwrap();
        assert!(region.bitmap().is_page_dirty(256), "{what}: the last page's mark was dropped");
    }
    from_ranges.write_obj(1u8, GuestAddress(size as u64 - 1)).unwrap();
    assert_eq!(harvest(&from_ranges), pages(size as u64 - 1, 1));
    drop(adopted);
    drop(mapping);
}
