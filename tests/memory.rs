//! Guest memory: translation, cross-region access, holes, read-only regions, region
//! management, and a proptest of accesses across 2 and 3 regions against a `Vec<u8>` model.

use std::io::{Seek, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmem::mmap::{MmapError, MmapRegionBuilder};
use guestmem::sys::Protection;
use guestmem::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, VolatileError,
};
use proptest::prelude::*;

type Mem = GuestMemoryMmap<()>;

fn region(base: u64, size: usize, prot: Protection) -> GuestRegionMmap<()> {
    GuestRegionMmap::new(MmapRegionBuilder::new(size).protection(prot).build().unwrap(), GuestAddress(base))
        .unwrap()
}

#[test]
fn translation_and_lookup() {
    let mem = Mem::from_ranges(&[
        (GuestAddress(0x10000), 0x1000),
        (GuestAddress(0), 0x2000),
        (GuestAddress(0x3000), 0x1000),
    ])
    .unwrap();
    assert_eq!(mem.num_regions(), 3);
    let starts: Vec<_> = mem.iter().map(|r| r.start_addr().0).collect();
    assert_eq!(starts, vec![0, 0x3000, 0x10000]);
    assert_eq!(mem.last_addr(), GuestAddress(0x10fff));
    for (addr, expect) in [
        (0u64, Some((0u64, 0u64))),
        (0x1fff, Some((0, 0x1fff))),
        (0x2000, None),
        (0x2fff, None),
        (0x3000, Some((0x3000, 0))),
        (0x3fff, Some((0x3000, 0xfff))),
        (0x4000, None),
        (0x10800, Some((0x10000, 0x800))),
        (0x11000, None),
        (u64::MAX, None),
    ] {
        let got = mem.to_region_addr(GuestAddress(addr)).map(|(r, o)| (r.start_addr().0, o.0));
        assert_eq!(got, expect, "{addr:#x}");
        assert_eq!(mem.find_region(GuestAddress(addr)).map(|r| r.start_addr().0), expect.map(|e| e.0));
    }
    let r = mem.find_region(GuestAddress(0x3000)).unwrap();
    assert_eq!(mem.get_host_address(GuestAddress(0x3010)).unwrap(), r.host_ptr().wrapping_add(0x10));
    assert!(matches!(
        mem.get_host_address(GuestAddress(0x2000)),
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));
    assert_eq!(r.get_host_address(MemoryRegionAddress(0xfff)).unwrap(), r.host_ptr().wrapping_add(0xfff));
    assert!(r.get_host_address(MemoryRegionAddress(0x1000)).is_err());
    assert!(mem.check_range(GuestAddress(0), 0x2000));
    assert!(!mem.check_range(GuestAddress(0), 0x2001));
    assert!(mem.check_range(GuestAddress(0x3fff), 0));
    assert!(mem.check_range(GuestAddress(0x2000), 0), "an empty range is backed anywhere");
    assert!(!mem.check_range(GuestAddress(0x10fff), 2));
    let empty = Mem::new();
    assert_eq!((empty.num_regions(), empty.last_addr()), (0, GuestAddress(0)));
    assert!(empty.read_obj::<u8>(GuestAddress(0)).is_err());
}

#[test]
fn overlaps_and_overflow_are_refused() {
    let e = Mem::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 0x1000)]).unwrap_err();
    match e {
        GuestMemoryError::RegionOverlap { first_start, first_len, second_start, second_len } => {
            assert_eq!(
                (first_start, first_len, second_start, second_len),
                (GuestAddress(0), 0x2000, GuestAddress(0x1000), 0x1000)
            );
        }
        e => panic!("{e}"),
    }
    assert!(e_string(Mem::from_ranges(&[(GuestAddress(0x1000), 0x1000), (GuestAddress(0x1000), 0x1000)]))
        .contains("overlaps"));
    let e = Mem::from_ranges(&[(GuestAddress(u64::MAX - 0xffe), 0x1000)]).unwrap_err();
    assert!(matches!(e, GuestMemoryError::RegionOverflow { len: 0x1000, .. }), "{e}");
    let e = GuestRegionMmap::new(
        MmapRegionBuilder::<()>::new(0x2000).build().unwrap(),
        GuestAddress(u64::MAX - 0x1000),
    );
    assert!(matches!(e.unwrap_err(), GuestMemoryError::RegionOverflow { .. }));
    let e = Mem::from_ranges(&[(GuestAddress(0), 0)]).unwrap_err();
    assert!(matches!(e, GuestMemoryError::Mmap { source: MmapError::ZeroSize, .. }), "{e}");
}

fn e_string<T>(r: Result<T, GuestMemoryError>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn a_region_may_end_at_the_top_of_the_address_space() {
    let base = u64::MAX - 0xfff;
    let mem = Mem::from_ranges(&[(GuestAddress(base), 0x1000)]).unwrap();
    assert_eq!(mem.last_addr(), GuestAddress(u64::MAX));
    mem.write_obj(0xabu8, GuestAddress(u64::MAX)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(u64::MAX)).unwrap(), 0xab);
    mem.write_obj(7u64, GuestAddress(u64::MAX - 7)).unwrap();
    // An access that would wrap past 2^64 is refused, never wrapped to address 0.
    let e = mem.read_obj::<u16>(GuestAddress(u64::MAX)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::Overflow { len: 2, .. }), "{e}");
    let e = mem.write_slice(&[1; 4], GuestAddress(u64::MAX - 1)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::Overflow { .. }), "{e}");
    assert_eq!(mem.write(&[1; 4], GuestAddress(u64::MAX - 1)).unwrap(), 2);
    assert!(mem.check_range(GuestAddress(base), 0x1000));
    assert!(!mem.check_range(GuestAddress(base), 0x1001));
    assert_eq!(mem.get_slices(GuestAddress(u64::MAX), 5).count(), 2);
}

#[test]
fn cross_region_access_and_holes() {
    let mem = Mem::from_ranges(&[
        (GuestAddress(0), 0x1000),
        (GuestAddress(0x1000), 0x1000),
        (GuestAddress(0x3000), 0x1000),
    ])
    .unwrap();
    let data: Vec<u8> = (0..64u8).collect();
    mem.write_slice(&data, GuestAddress(0xfe0)).unwrap();
    let mut back = [0u8; 64];
    mem.read_slice(&mut back, GuestAddress(0xfe0)).unwrap();
    assert_eq!(&back[..], &data[..]);
    let slices: Vec<_> = mem.get_slices(GuestAddress(0xfe0), 64).map(|s| s.unwrap().len()).collect();
    assert_eq!(slices, vec![0x20, 0x20]);
    let e = mem.get_slice(GuestAddress(0xfe0), 64).unwrap_err();
    assert!(matches!(e, GuestMemoryError::NotContiguous { len: 64, .. }), "{e}");
    assert_eq!(mem.get_slice(GuestAddress(0xfe0), 0x20).unwrap().len(), 0x20);
    // Into the hole: write_slice refuses and writes nothing at all.
    let before = mem.read_obj::<[u8; 16]>(GuestAddress(0x1ff0)).unwrap();
    let e = mem.write_slice(&[0xff; 32], GuestAddress(0x1ff0)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InvalidRange { addr: GuestAddress(0x1ff0), len: 32 }), "{e}");
    assert_eq!(mem.read_obj::<[u8; 16]>(GuestAddress(0x1ff0)).unwrap(), before);
    let e = mem.write_obj(u64::MAX, GuestAddress(0x1ffc)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InvalidRange { .. }), "{e}");
    assert_eq!(mem.read_obj::<[u8; 16]>(GuestAddress(0x1ff0)).unwrap(), before);
    assert!(matches!(
        mem.read_slice(&mut [0; 32], GuestAddress(0x1ff0)),
        Err(GuestMemoryError::InvalidRange { .. })
    ));
    assert!(matches!(mem.read_obj::<u32>(GuestAddress(0x1ffe)), Err(GuestMemoryError::InvalidRange { .. })));
    // `write`/`read` move what fits before the hole.
    assert_eq!(mem.write(&[0xee; 32], GuestAddress(0x1ff0)).unwrap(), 16);
    assert_eq!(mem.read(&mut [0; 32], GuestAddress(0x1ff0)).unwrap(), 16);
    assert!(matches!(mem.write(&[1], GuestAddress(0x2000)), Err(GuestMemoryError::InvalidGuestAddress(_))));
    assert!(matches!(
        mem.read(&mut [1], GuestAddress(0x2000)),
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));
    assert_eq!(mem.write(&[], GuestAddress(0x10)).unwrap(), 0);
    // Atomics must be in one region and aligned.
    mem.store(5u32, GuestAddress(0x1004), Ordering::SeqCst).unwrap();
    assert_eq!(mem.load::<u32>(GuestAddress(0x1004), Ordering::SeqCst).unwrap(), 5);
    let e = mem.load::<u64>(GuestAddress(0xffc), Ordering::SeqCst).unwrap_err();
    assert!(matches!(e, GuestMemoryError::NotContiguous { .. }), "{e}");
    let e = mem.store(1u32, GuestAddress(0x1002), Ordering::SeqCst).unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::Access { source: VolatileError::Misaligned { align: 4, .. }, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("0x1002"));
}

/// One rule for the ends, at every layer: a non-empty access where nothing fits is an error
/// (so a loop that writes until an error ends), an empty one touches nothing and succeeds (in
/// guest memory at any address; in a region up to its end).
#[test]
fn ends_and_empty_accesses() {
    let mem = Mem::from_regions(vec![
        region(0, 0x1000, Protection::READ_WRITE),
        region(0x4000, 0x1000, Protection::READ),
    ])
    .unwrap();
    // Guest memory: the end of a region is a hole here.
    let end = GuestAddress(0x1000);
    assert!(matches!(mem.write(&[1], end), Err(GuestMemoryError::InvalidGuestAddress(a)) if a == end));
    assert!(matches!(mem.read(&mut [0], end), Err(GuestMemoryError::InvalidGuestAddress(_))));
    assert!(mem.read_volatile_from(end, &mut &[1u8][..], 1).is_err());
    assert!(mem.write_volatile_to(end, &mut Vec::new(), 1).is_err());
    let mut at = GuestAddress(0);
    while let Ok(n) = mem.write(&[7; 0x300], at) {
        at = at.unchecked_add(n as u64);
    }
    assert_eq!(at, end);
    for addr in [GuestAddress(0), end, GuestAddress(0x4000), GuestAddress(0x9_0000), GuestAddress(u64::MAX)] {
        assert_eq!(mem.write(&[], addr).unwrap(), 0);
        assert_eq!(mem.read(&mut [], addr).unwrap(), 0);
        mem.write_slice(&[], addr).unwrap();
        mem.read_slice(&mut [], addr).unwrap();
        mem.write_obj((), addr).unwrap();
        mem.read_obj::<()>(addr).unwrap();
        assert_eq!(mem.read_volatile_from(addr, &mut &[1u8][..], 0).unwrap(), 0);
        mem.read_exact_volatile_from(addr, &mut &[1u8][..], 0).unwrap();
        assert_eq!(mem.write_volatile_to(addr, &mut Vec::new(), 0).unwrap(), 0);
        mem.write_all_volatile_to(addr, &mut Vec::new(), 0).unwrap();
        assert!(mem.check_range(addr, 0));
    }
    // A region: its end is out of bounds for a non-empty access, fine for an empty one.
    let r = &mem.regions()[0];
    let e = r.write(&[1], MemoryRegionAddress(0x1000)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InvalidRegionOffset { len: 1, size: 0x1000, .. }), "{e}");
    assert!(r.read(&mut [0; 4], MemoryRegionAddress(0x1000)).is_err());
    assert!(r.read_volatile_from(MemoryRegionAddress(0x1000), &mut &[1u8][..], 1).is_err());
    assert!(r.write_volatile_to(MemoryRegionAddress(0x1000), &mut Vec::new(), 1).is_err());
    assert_eq!(r.write(&[1; 8], MemoryRegionAddress(0xffc)).unwrap(), 4);
    assert_eq!(r.write(&[], MemoryRegionAddress(0x1000)).unwrap(), 0);
    r.write_slice(&[], MemoryRegionAddress(0x1000)).unwrap();
    r.read_obj::<()>(MemoryRegionAddress(0x1000)).unwrap();
    assert!(r.write(&[], MemoryRegionAddress(0x1001)).is_err(), "past the end: no empty range there");
    // Read-only memory takes an empty write.
    let ro = &mem.regions()[1];
    assert_eq!(ro.write(&[], MemoryRegionAddress(0)).unwrap(), 0);
    assert!(ro.write(&[1], MemoryRegionAddress(0)).is_err());
}

#[test]
fn read_only_regions_refuse_writes_before_touching_anything() {
    let rw = region(0, 0x1000, Protection::READ_WRITE);
    let ro = region(0x1000, 0x1000, Protection::READ);
    let mem = Mem::from_regions(vec![ro, rw]).unwrap();
    let e = mem.write_obj(1u32, GuestAddress(0x1000)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::ReadOnly { addr: GuestAddress(0x1000), len: 4 }), "{e}");
    // A write spanning both is refused whole: the writable part stays untouched.
    let e = mem.write_slice(&[9; 32], GuestAddress(0xff0)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::ReadOnly { .. }), "{e}");
    assert_eq!(mem.read_obj::<u128>(GuestAddress(0xff0)).unwrap(), 0);
    assert!(matches!(mem.write_obj(u64::MAX, GuestAddress(0xffc)), Err(GuestMemoryError::ReadOnly { .. })));
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0xffc)).unwrap(), 0);
    assert!(matches!(
        mem.store(1u8, GuestAddress(0x1000), Ordering::SeqCst),
        Err(GuestMemoryError::ReadOnly { .. })
    ));
    assert!(matches!(mem.write(&[1], GuestAddress(0x1000)), Err(GuestMemoryError::ReadOnly { .. })));
    assert_eq!(mem.write(&[1; 32], GuestAddress(0xff0)).unwrap(), 16);
    let e = mem.read_exact_volatile_from(GuestAddress(0x1000), &mut &[1u8; 8][..], 8).unwrap_err();
    assert!(matches!(e, GuestMemoryError::ReadOnly { .. }), "{e}");
    // Reads are fine.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
    // Region-relative access refuses too.
    let ro = mem.find_region(GuestAddress(0x1000)).unwrap();
    assert!(matches!(ro.write_obj(1u8, MemoryRegionAddress(0)), Err(GuestMemoryError::ReadOnly { .. })));
}

#[test]
fn insert_and_remove_regions() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let extra = Arc::new(region(0x2000, 0x1000, Protection::READ_WRITE));
    let bigger = mem.insert_region(extra.clone()).unwrap();
    assert_eq!((mem.num_regions(), bigger.num_regions()), (1, 2));
    bigger.write_obj(3u16, GuestAddress(0x2002)).unwrap();
    let e = bigger.insert_region(Arc::new(region(0x1000, 0x2000, Protection::READ_WRITE))).unwrap_err();
    assert!(matches!(e, GuestMemoryError::RegionOverlap { .. }), "{e}");
    // The size must be the region's: nothing is removed otherwise.
    let e = bigger.remove_region(GuestAddress(0x2000), 0x2000).unwrap_err();
    assert!(
        matches!(
            e,
            GuestMemoryError::RegionSizeMismatch {
                base: GuestAddress(0x2000),
                size: 0x2000,
                region_len: 0x1000
            }
        ),
        "{e}"
    );
    let (smaller, removed) = bigger.remove_region(GuestAddress(0x2000), 0x1000).unwrap();
    assert!(Arc::ptr_eq(&removed, &extra));
    assert_eq!(smaller.num_regions(), 1);
    assert!(smaller.read_obj::<u8>(GuestAddress(0x2000)).is_err());
    // The removed region is still mapped and readable while anyone holds it.
    assert_eq!(bigger.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 3);
    let e = bigger.remove_region(GuestAddress(0x2001), 0x1000).unwrap_err();
    assert!(matches!(e, GuestMemoryError::NoRegionAt(GuestAddress(0x2001))), "{e}");
    assert_eq!(bigger.regions().len(), 2);
    let clone = bigger.clone();
    assert_eq!(clone.num_regions(), 2);
}

#[test]
fn files_and_streams_across_regions() {
    let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    file.set_len(0x2000).unwrap();
    let mem = Mem::from_ranges_with_files([
        (GuestAddress(0), 0x1000, None),
        (GuestAddress(0x1000), 0x2000, Some(guestmem::mmap::FileOffset::new(file.try_clone().unwrap(), 0))),
    ])
    .unwrap();
    assert!(mem.find_region(GuestAddress(0x1000)).unwrap().file_offset().is_some());
    let data: Vec<u8> = (0..=255u8).cycle().take(0x400).collect();
    assert_eq!(mem.read_volatile_from(GuestAddress(0xe00), &mut &data[..], 0x400).unwrap(), 0x400);
    let mut out = Vec::new();
    mem.write_all_volatile_to(GuestAddress(0xe00), &mut out, 0x400).unwrap();
    assert_eq!(out, data);
    // The second region is the file: the bytes past 0x1000 went into it.
    file.rewind().unwrap();
    let mut head = [0u8; 4];
    std::io::Read::read_exact(&mut file, &mut head).unwrap();
    assert_eq!(head, [0, 1, 2, 3]);
    // A short source: read_exact fails with the count that arrived, read_volatile_from stops.
    let e = mem.read_exact_volatile_from(GuestAddress(0xf00), &mut &data[..0x180], 0x200).unwrap_err();
    assert!(matches!(e, GuestMemoryError::PartialBuffer { expected: 0x200, completed: 0x180, .. }), "{e}");
    assert_eq!(mem.read_volatile_from(GuestAddress(0xf00), &mut &data[..0x180], 0x200).unwrap(), 0x180);
    assert!(mem.read_exact_volatile_from(GuestAddress(0x2f00), &mut &data[..], 0x200).is_err());
    assert_eq!(mem.write_volatile_to(GuestAddress(0x2f00), &mut Vec::new(), 0x200).unwrap(), 0x100);
    assert!(mem.write_volatile_to(GuestAddress(0x5000), &mut Vec::new(), 1).is_err());
    assert!(mem.read_volatile_from(GuestAddress(0x5000), &mut &data[..], 1).is_err());
    let mut full: &mut [u8] = &mut [0u8; 4];
    let e = mem.write_all_volatile_to(GuestAddress(0), &mut full, 8).unwrap_err();
    assert!(matches!(e, GuestMemoryError::PartialBuffer { expected: 8, completed: 4, .. }), "{e}");
    // An I/O error keeps its address.
    let (a, _) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = mem.read_volatile_from(
        GuestAddress(0x10),
        &mut std::fs::File::from(std::os::fd::OwnedFd::from(a)),
        4,
    );
    assert!(e.is_ok() || matches!(e, Err(GuestMemoryError::Access { .. })));
    file.flush().unwrap();
}

#[test]
fn region_relative_bytes() {
    let r = region(0x1000, 0x1000, Protection::READ_WRITE);
    r.write_slice(b"abc", MemoryRegionAddress(0xffd)).unwrap();
    let mut b = [0u8; 3];
    r.read_slice(&mut b, MemoryRegionAddress(0xffd)).unwrap();
    assert_eq!(&b, b"abc");
    assert_eq!(r.write(b"abcd", MemoryRegionAddress(0xffe)).unwrap(), 2);
    assert_eq!(r.read(&mut [0; 4], MemoryRegionAddress(0xffe)).unwrap(), 2);
    let e = r.write_slice(b"abcd", MemoryRegionAddress(0xffe)).unwrap_err();
    // Past the region's end there is no guest address to name: the error names the region.
    assert!(
        matches!(
            e,
            GuestMemoryError::InvalidRegionOffset {
                base: GuestAddress(0x1000),
                offset: MemoryRegionAddress(0xffe),
                len: 4,
                size: 0x1000
            }
        ),
        "{e}"
    );
    let e = r.read_obj::<u32>(MemoryRegionAddress(u64::MAX)).unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::InvalidRegionOffset { offset: MemoryRegionAddress(u64::MAX), .. }),
        "{e}"
    );
    let e = r.get_host_address(MemoryRegionAddress(u64::MAX)).unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::InvalidRegionOffset { offset: MemoryRegionAddress(u64::MAX), .. }),
        "{e}"
    );
    r.store(9u64, MemoryRegionAddress(8), Ordering::SeqCst).unwrap();
    assert_eq!(r.load::<u64>(MemoryRegionAddress(8), Ordering::SeqCst).unwrap(), 9);
    assert_eq!(r.read_obj::<u64>(MemoryRegionAddress(8)).unwrap(), 9);
    r.write_obj(1u8, MemoryRegionAddress(0)).unwrap();
    assert_eq!(r.read_volatile_from(MemoryRegionAddress(0xffe), &mut &[5u8, 6, 7][..], 3).unwrap(), 2);
    r.read_exact_volatile_from(MemoryRegionAddress(0), &mut &[5u8, 6][..], 2).unwrap();
    assert_eq!(r.write_volatile_to(MemoryRegionAddress(0xfff), &mut Vec::new(), 5).unwrap(), 1);
    r.write_all_volatile_to(MemoryRegionAddress(0), &mut Vec::new(), 2).unwrap();
    assert_eq!(r.last_addr(), GuestAddress(0x1fff));
    assert_eq!(r.to_region_addr(GuestAddress(0xfff)), None);
    assert_eq!(r.check_address(MemoryRegionAddress(0x1000)), None);
    assert!(!r.is_empty());
    assert_eq!(r.as_volatile_slice().len(), 0x1000);
    assert_eq!(r.mapping().size(), 0x1000);
    assert_eq!(GuestMemoryRegion::get_slice(&r, MemoryRegionAddress(0), 0x1000).unwrap().len(), 0x1000);
    assert!(r.bitmap() == &());
}

/// A layout of regions (some separated by holes) and a model: one `Vec<u8>` per region.
#[derive(Debug, Clone)]
struct Layout {
    regions: Vec<(u64, usize)>,
}

fn layout() -> impl Strategy<Value = Layout> {
    // 2 or 3 regions of 1 to 3 pages, adjacent or with a 1-page hole, the first at 0 or near
    // the top of the address space.
    (2usize..=3, prop::collection::vec((1usize..=3, any::<bool>()), 3), any::<bool>()).prop_map(
        |(n, shapes, top)| {
            let total: u64 =
                shapes[..n].iter().map(|&(pages, hole)| (pages as u64 + hole as u64) * 4096).sum();
            let mut at = if top { u64::MAX - total + 1 } else { 0 };
            let mut regions = Vec::new();
            for &(pages, hole) in &shapes[..n] {
                regions.push((at, pages * 4096));
                at = at.wrapping_add((pages as u64 + hole as u64) * 4096);
            }
            Layout { regions }
        },
    )
}

struct Model {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, (start, data))| {
            let off = addr.checked_sub(*start)?;
            (off < data.len() as u64).then_some((i, off as usize))
        })
    }

    /// How many bytes from `addr` are contiguous guest memory (capped at `len`).
    fn contiguous(&self, addr: u64, len: usize) -> usize {
        let mut done = 0;
        while done < len {
            let Some(a) = addr.checked_add(done as u64) else { break };
            let Some((i, off)) = self.locate(a) else { break };
            done += (self.regions[i].1.len() - off).min(len - done);
        }
        done
    }

    fn write(&mut self, addr: u64, buf: &[u8]) {
        for (k, b) in buf.iter().enumerate() {
            let (i, off) = self.locate(addr + k as u64).unwrap();
            self.regions[i].1[off] = *b;
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|k| {
                let (i, off) = self.locate(addr + k as u64).unwrap();
                self.regions[i].1[off]
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Op {
    WriteSlice(u64, Vec<u8>),
    ReadSlice(u64, usize),
    Write(u64, Vec<u8>),
    Read(u64, usize),
    WriteObj(u64, u64, u8),
    ReadObj(u64, u8),
}

fn ops(layout: &Layout) -> impl Strategy<Value = Vec<Op>> {
    // Addresses near every region edge.
    let mut edges = Vec::new();
    for &(start, size) in &layout.regions {
        edges.push(start);
        edges.push(start.wrapping_add(size as u64));
    }
    let addr = prop::sample::select(edges)
        .prop_flat_map(|e| (-40i64..40).prop_map(move |d| e.wrapping_add(d as u64)));
    let width = prop::sample::select(vec![1u8, 2, 3, 4, 8, 16]);
    let op = prop_oneof![
        (addr.clone(), prop::collection::vec(any::<u8>(), 0..10000)).prop_map(|(a, d)| Op::WriteSlice(a, d)),
        (addr.clone(), 0usize..10000).prop_map(|(a, n)| Op::ReadSlice(a, n)),
        // Empty accesses, at region edges too (rare above: one length in 10000).
        addr.clone().prop_map(|a| Op::WriteSlice(a, Vec::new())),
        addr.clone().prop_map(|a| Op::ReadSlice(a, 0)),
        (addr.clone(), prop::collection::vec(any::<u8>(), 0..200)).prop_map(|(a, d)| Op::Write(a, d)),
        (addr.clone(), 0usize..200).prop_map(|(a, n)| Op::Read(a, n)),
        (addr.clone(), any::<u64>(), width.clone()).prop_map(|(a, v, w)| Op::WriteObj(a, v, w)),
        (addr, width).prop_map(|(a, w)| Op::ReadObj(a, w)),
    ];
    prop::collection::vec(op, 1..30)
}

fn obj_bytes(val: u64, width: u8) -> Vec<u8> {
    [val.to_le_bytes(), (!val).to_le_bytes()].concat()[..width as usize].to_vec()
}

fn write_obj(mem: &Mem, addr: u64, val: u64, width: u8) -> Result<(), GuestMemoryError> {
    let b = obj_bytes(val, width);
    let a = GuestAddress(addr);
    match width {
        1 => mem.write_obj(b[0], a),
        2 => mem.write_obj(u16::from_le_bytes(b[..2].try_into().unwrap()), a),
        3 => mem.write_obj::<[u8; 3]>(b[..3].try_into().unwrap(), a),
        4 => mem.write_obj(u32::from_le_bytes(b[..4].try_into().unwrap()), a),
        8 => mem.write_obj(u64::from_le_bytes(b[..8].try_into().unwrap()), a),
        _ => mem.write_obj(u128::from_le_bytes(b[..16].try_into().unwrap()), a),
    }
}

fn read_obj(mem: &Mem, addr: u64, width: u8) -> Result<Vec<u8>, GuestMemoryError> {
    let a = GuestAddress(addr);
    Ok(match width {
        1 => vec![mem.read_obj::<u8>(a)?],
        2 => mem.read_obj::<u16>(a)?.to_le_bytes().to_vec(),
        3 => mem.read_obj::<[u8; 3]>(a)?.to_vec(),
        4 => mem.read_obj::<u32>(a)?.to_le_bytes().to_vec(),
        8 => mem.read_obj::<u64>(a)?.to_le_bytes().to_vec(),
        _ => mem.read_obj::<u128>(a)?.to_le_bytes().to_vec(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn cross_region_accesses_match_a_model((layout, ops) in layout().prop_flat_map(|l| { let o = ops(&l); (Just(l), o) })) {
        let ranges: Vec<_> = layout.regions.iter().map(|&(s, n)| (GuestAddress(s), n)).collect();
        let mem = Mem::from_ranges(&ranges).unwrap();
        let mut model = Model { regions: layout.regions.iter().map(|&(s, n)| (s, vec![0u8; n])).collect() };
        for op in &ops {
            match op {
                Op::WriteSlice(a, d) => {
                    // An empty access succeeds at any address (see `Bytes`).
                    let ok = model.contiguous(*a, d.len()) == d.len();
                    let r = mem.write_slice(d, GuestAddress(*a));
                    prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if ok { model.write(*a, d); }
                }
                Op::ReadSlice(a, n) => {
                    let ok = model.contiguous(*a, *n) == *n;
                    let mut buf = vec![0u8; *n];
                    let r = mem.read_slice(&mut buf, GuestAddress(*a));
                    prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if ok { prop_assert_eq!(buf, model.read(*a, *n)); }
                }
                Op::Write(a, d) => {
                    let n = model.contiguous(*a, d.len());
                    match mem.write(d, GuestAddress(*a)) {
                        Ok(w) => { prop_assert_eq!(w, n); model.write(*a, &d[..n]); }
                        Err(_) => prop_assert!(model.locate(*a).is_none()),
                    }
                }
                Op::Read(a, len) => {
                    let n = model.contiguous(*a, *len);
                    let mut buf = vec![0u8; *len];
                    match mem.read(&mut buf, GuestAddress(*a)) {
                        Ok(r) => { prop_assert_eq!(r, n); prop_assert_eq!(&buf[..n], &model.read(*a, n)[..]); }
                        Err(_) => prop_assert!(model.locate(*a).is_none()),
                    }
                }
                Op::WriteObj(a, v, w) => {
                    let ok = model.contiguous(*a, *w as usize) == *w as usize;
                    let r = write_obj(&mem, *a, *v, *w);
                    prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if ok { model.write(*a, &obj_bytes(*v, *w)); }
                }
                Op::ReadObj(a, w) => {
                    let ok = model.contiguous(*a, *w as usize) == *w as usize;
                    let r = read_obj(&mem, *a, *w);
                    prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if let Ok(got) = r { prop_assert_eq!(got, model.read(*a, *w as usize)); }
                }
            }
        }
        // Every byte of every region equals the model.
        for (start, data) in &model.regions {
            let mut all = vec![0u8; data.len()];
            mem.read_slice(&mut all, GuestAddress(*start)).unwrap();
            prop_assert_eq!(&all, data);
        }
    }
}

#[test]
fn address_helpers_work_with_guest_memory() {
    let a = GuestAddress(0x1234);
    assert_eq!(a.align_down(0x1000).unwrap(), GuestAddress(0x1000));
}

/// vm-memory's address helpers on guest memory and regions: at edges, holes and 2^64.
#[test]
fn address_in_range_check_address_checked_offset() {
    let top = u64::MAX - 0xfff;
    let mem = Mem::from_regions(vec![
        region(0x1000, 0x1000, Protection::READ_WRITE),
        region(top, 0x1000, Protection::READ),
    ])
    .unwrap();
    for (addr, inside) in
        [(0xfffu64, false), (0x1000, true), (0x1fff, true), (0x2000, false), (top, true), (u64::MAX, true)]
    {
        assert_eq!(mem.address_in_range(GuestAddress(addr)), inside, "{addr:#x}");
        assert_eq!(mem.check_address(GuestAddress(addr)), inside.then_some(GuestAddress(addr)));
    }
    assert_eq!(
        mem.checked_offset(GuestAddress(0), 0x1000),
        Some(GuestAddress(0x1000)),
        "base need not be in memory"
    );
    assert_eq!(mem.checked_offset(GuestAddress(0x1000), 0x1000), None);
    assert_eq!(mem.checked_offset(GuestAddress(top), 0xfff), Some(GuestAddress(u64::MAX)));
    assert_eq!(mem.checked_offset(GuestAddress(top), 0x1000), None, "wraps");
    let r = &mem.regions()[0];
    assert!(
        r.address_in_range(MemoryRegionAddress(0xfff)) && !r.address_in_range(MemoryRegionAddress(0x1000))
    );
    assert_eq!(r.checked_offset(MemoryRegionAddress(u64::MAX), 1), None);
    assert_eq!(r.checked_offset(MemoryRegionAddress(0x10), 0x10), Some(MemoryRegionAddress(0x20)));
}

#[test]
fn try_access_walks_regions_and_stops_where_told() {
    let top = u64::MAX - 0xfff;
    let mem = Mem::from_regions(vec![
        region(0, 0x1000, Protection::READ_WRITE),
        region(0x1000, 0x1000, Protection::READ_WRITE),
        region(0x4000, 0x1000, Protection::READ_WRITE),
        region(top, 0x1000, Protection::READ_WRITE),
    ])
    .unwrap();
    let walk = |count, addr, step: usize| {
        let mut calls = Vec::new();
        let r = mem.try_access(count, GuestAddress(addr), |done, len, off, reg| {
            calls.push((done, len, reg.start_addr().0 + off.0));
            Ok(len.min(step))
        });
        (r, calls)
    };
    // Across two regions, into a hole: what was handled.
    let (r, calls) = walk(0x2000, 0x800, usize::MAX);
    assert_eq!(r.unwrap(), 0x1800);
    assert_eq!(calls, vec![(0, 0x800, 0x800), (0x800, 0x1000, 0x1000)]);
    // Partial progress goes on right after it, in the same region.
    let (r, calls) = walk(0x300, 0xf00, 0x100);
    assert_eq!(r.unwrap(), 0x300);
    assert_eq!(calls, vec![(0, 0x100, 0xf00), (0x100, 0x200, 0x1000), (0x200, 0x100, 0x1100)]);
    // 0 stops.
    assert_eq!(walk(0x100, 0, 0).0.unwrap(), 0);
    // A hole at the start; nothing to do at all.
    assert!(matches!(walk(1, 0x2000, 1).0, Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(0x2000)))));
    let (r, calls) = walk(0, 0x2000, 1);
    assert_eq!((r.unwrap(), calls.len()), (0, 0));
    // Up to 2^64, not past it.
    assert_eq!(walk(0x1000, top, usize::MAX).0.unwrap(), 0x1000);
    assert!(matches!(walk(0x1001, top, usize::MAX).0, Err(GuestMemoryError::Overflow { .. })));
    // A callback that claims more than it was given, or fails.
    let e = mem.try_access(0x10, GuestAddress(0x4000), |_, len, _, _| Ok(len + 1)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InvalidRegionOffset { len: 0x11, .. }), "{e}");
    let e = mem.try_access(0x10, GuestAddress(0x4000), |_, _, _, _| {
        Err(GuestMemoryError::NoRegionAt(GuestAddress(7)))
    });
    assert!(matches!(e, Err(GuestMemoryError::NoRegionAt(GuestAddress(7)))));
    // It can write, through the region it is given.
    let n = mem
        .try_access(0x20, GuestAddress(0xff0), |done, len, off, reg| {
            reg.write_slice(&[0xab; 0x20][done..done + len], off)?;
            Ok(len)
        })
        .unwrap();
    assert_eq!((n, mem.read_obj::<[u8; 0x20]>(GuestAddress(0xff0)).unwrap()), (0x20, [0xab; 0x20]));
}

#[test]
fn a_mapping_moves_to_another_guest_address_but_is_never_in_one_memory_twice() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0xe000_0000), 0x4000)]).unwrap();
    mem.write_obj(0x5a5au16, GuestAddress(0xe000_0010)).unwrap();
    let mapping = mem.find_region(GuestAddress(0xe000_0000)).unwrap().get_mmap();
    // Twice in one memory (or overlapping host memory): refused.
    let twice = GuestRegionMmap::with_arc(mapping.clone(), GuestAddress(0xf000_0000)).unwrap();
    let e = mem.insert_region(Arc::new(twice)).unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::RegionAlias { first_start, second_start }
            if [first_start, second_start].contains(&GuestAddress(0xe000_0000))
                && [first_start, second_start].contains(&GuestAddress(0xf000_0000))),
        "{e}"
    );
    // Moved: the old region out, the same memory in at the new address.
    let (rest, old) = mem.remove_region(GuestAddress(0xe000_0000), 0x4000).unwrap();
    let moved = GuestRegionMmap::with_arc(old.get_mmap(), GuestAddress(0xf000_0000)).unwrap();
    assert_eq!(moved.host_ptr(), old.host_ptr());
    let next = rest.insert_region(Arc::new(moved)).unwrap();
    assert_eq!(next.read_obj::<u16>(GuestAddress(0xf000_0010)).unwrap(), 0x5a5a);
    next.write_obj(1u8, GuestAddress(0xf000_0000)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0xe000_0000)).unwrap(), 1, "the same memory");
    assert!(next.read_obj::<u8>(GuestAddress(0xe000_0000)).is_err());
    assert_eq!(
        Arc::strong_count(&mapping),
        3,
        "ours, the old region's and the moved one's (`twice` is gone)"
    );
    // The placement rules hold for a re-placed mapping too.
    assert!(matches!(
        GuestRegionMmap::with_arc(mapping, GuestAddress(0xf000_0004)),
        Err(GuestMemoryError::UnalignedRegion { .. })
    ));
}

/// A VMM's own region type (a memslot number and a plug flag beside the guestmem region), in
/// guestmem's table: translation, cross-region access, harvests.
#[derive(Debug)]
struct SlotRegion {
    inner: GuestRegionMmap<guestmem::AtomicBitmap>,
    slot: u32,
    /// A bitmap of its own, to check that the collection refuses a wrapper that hands it out.
    decoy: Option<guestmem::AtomicBitmap>,
}

impl GuestMemoryRegion for SlotRegion {
    type B = guestmem::AtomicBitmap;
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn start_addr(&self) -> GuestAddress {
        self.inner.start_addr()
    }
    fn protection(&self) -> Protection {
        self.inner.protection()
    }
    fn bitmap(&self) -> &guestmem::AtomicBitmap {
        self.decoy.as_ref().unwrap_or(self.inner.bitmap())
    }
    fn file_offset(&self) -> Option<&guestmem::mmap::FileOffset> {
        self.inner.file_offset()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.inner.host_ptr()
    }
    fn get_slice(
        &self,
        at: MemoryRegionAddress,
        n: usize,
    ) -> Result<guestmem::VolatileSlice<'_, guestmem::region::BS<'_, guestmem::AtomicBitmap>>, GuestMemoryError>
    {
        self.inner.get_slice(at, n)
    }
}

impl guestmem::AsGuestRegionMmap for SlotRegion {
    fn guest_region_mmap(&self) -> &GuestRegionMmap<guestmem::AtomicBitmap> {
        &self.inner
    }
}

#[test]
fn a_vmm_region_type_in_the_fast_table() {
    use guestmem::GuestRegionCollection;
    let slot = |slot, base, size: usize| SlotRegion {
        inner: GuestRegionMmap::build(MmapRegionBuilder::new(size), GuestAddress(base)).unwrap(),
        slot,
        decoy: None,
    };
    let mem = GuestRegionCollection::from_regions(vec![slot(1, 0x10_0000, 0x10000), slot(0, 0, 0x10_0000)])
        .unwrap();
    assert_eq!(mem.regions().iter().map(|r| r.slot).collect::<Vec<_>>(), vec![0, 1], "sorted");
    // The table's fast path and the walk across regions.
    mem.write_obj(0x0102_0304_0506_0708u64, GuestAddress(0xffffc)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0xffffc)).unwrap(), 0x0102_0304_0506_0708);
    let (r, off) = mem.to_region_addr(GuestAddress(0x10_0010)).unwrap();
    assert_eq!((r.slot, off), (1, MemoryRegionAddress(0x10)));
    assert_eq!(mem.get_host_address(GuestAddress(0x10_0010)).unwrap(), r.host_ptr().wrapping_add(0x10));
    // Harvests see what the fast path marked, in the VMM's own regions.
    let mut dirty = Vec::new();
    assert_eq!(mem.take_dirty_ranges(|a, l| dirty.push((a.0, l))).unwrap(), 2);
    assert_eq!(dirty, vec![(0xff000, 0x2000)]);
    let (mem, gone) = mem.remove_region(GuestAddress(0x10_0000), 0x10000).unwrap();
    assert_eq!((gone.slot, mem.num_regions()), (1, 1));
    // A wrapper whose bitmap is not its region's would split marks from harvests: refused.
    let mut liar = slot(2, 0x20_0000, 0x1000);
    liar.decoy = Some(guestmem::AtomicBitmap::new(0x1000, 4096).unwrap());
    let e = mem.insert_region(Arc::new(liar)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InconsistentRegion { base: GuestAddress(0x20_0000) }), "{e}");
    // guestmem's own memory is the collection of its own regions.
    let plain: GuestRegionCollection<GuestRegionMmap> =
        Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert_eq!(plain.num_regions(), 1);
}
