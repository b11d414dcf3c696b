//! The IOMMU view over real guest memory: accesses split across mappings and regions, the
//! permissions enforced before any byte moves, misses that an IOMMU model resolves, cutting
//! invalidations, hostile updates refused whole, I/O through IOVAs, translations that never
//! tear while the IOTLB changes under them, a model check, and every error variant.

mod common;

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guestmem::bitmap::AtomicBitmap;
use guestmem::iommu::{
    Access, IommuError, Iotlb, IotlbEntry, Iova, Permissions, IOTLB_PAGE_SIZE, MAX_ENTRIES,
};
use guestmem::mmap::MmapRegionBuilder;
use guestmem::sys::Protection;
use guestmem::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, GuestRegionMmap};
use proptest::prelude::*;

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = IOTLB_PAGE_SIZE;
const RO_BASE: u64 = 4 << 20;

/// Two adjacent regions [0, 1 MiB) and [1 MiB, 2 MiB), and a read-only one at 4 MiB.
fn memory() -> Mem {
    let ro = MmapRegionBuilder::<AtomicBitmap>::new(64 << 10).protection(Protection::READ).build().unwrap();
    let mut regions = vec![
        GuestRegionMmap::build(MmapRegionBuilder::new(1 << 20), GuestAddress(0)).unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(1 << 20), GuestAddress(1 << 20)).unwrap(),
    ];
    regions.push(GuestRegionMmap::new(ro, GuestAddress(RO_BASE)).unwrap());
    Mem::from_regions(regions).unwrap()
}

fn dirty_pages(mem: &Mem) -> Vec<u64> {
    let mut pages = Vec::new();
    mem.take_dirty_ranges(|a, l| pages.extend((a.0..a.0 + l).step_by(PAGE as usize))).unwrap();
    pages
}

#[test]
fn accesses_split_across_mappings_and_regions() {
    let mem = memory();
    let iotlb = Iotlb::new();
    let rw = Permissions::READ_WRITE;
    // Four IOVA pages onto three places; the middle mapping crosses from region 0 into 1.
    iotlb.update(Iova(0x10_000), PAGE, GuestAddress(0x8000), rw).unwrap();
    iotlb.update(Iova(0x11_000), 2 * PAGE, GuestAddress(0xf_f000), rw).unwrap();
    iotlb.update(Iova(0x13_000), PAGE, GuestAddress(0x5_0000), rw).unwrap();
    let mut cache = iotlb.cache();
    let view = cache.table().view(&mem);
    let data: Vec<u8> = (0..4 * PAGE as usize).map(|i| (i * 7 + 3) as u8).collect();
    view.write_slice(&data, Iova(0x10_000)).unwrap();
    for (i, gpa) in [0x8000u64, 0xf_f000, 0x10_0000, 0x5_0000].into_iter().enumerate() {
        let mut page = vec![0u8; PAGE as usize];
        mem.read_slice(&mut page, GuestAddress(gpa)).unwrap();
        assert_eq!(page, data[i * PAGE as usize..(i + 1) * PAGE as usize], "page {i}");
    }
    let mut back = vec![0u8; data.len()];
    view.read_slice(&mut back, Iova(0x10_000)).unwrap();
    assert_eq!(back, data);
    // A value straddling two mappings is assembled from both.
    let v: u64 = view.read_obj(Iova(0x10_ffc)).unwrap();
    assert_eq!(v.to_le_bytes(), data[0xffc..0x1004]);
    view.write_obj(0x1122_3344_5566_7788u64, Iova(0x12_ffc)).unwrap();
    assert_eq!(view.read_obj::<u64>(Iova(0x12_ffc)).unwrap(), 0x1122_3344_5566_7788);
    // Writes mark the guest pages they reached.
    assert_eq!(dirty_pages(&mem), [0x8000, 0x5_0000, 0xf_f000, 0x10_0000]);
    // Aligned atomics, and slices within one mapping.
    view.store(5u32, Iova(0x11_ff8), Ordering::Release).unwrap();
    assert_eq!(mem.load::<u32>(GuestAddress(0xf_fff8), Ordering::Acquire).unwrap(), 5);
    assert_eq!(view.load::<u32>(Iova(0x11_ff8), Ordering::Acquire).unwrap(), 5);
    let s = view.get_slice(Iova(0x13_010), 16, Access::Read).unwrap();
    assert_eq!(s.read_obj::<u8>(0).unwrap(), data[3 * PAGE as usize + 0x10]);
    assert!(matches!(
        view.get_slice(Iova(0x10_ff0), 32, Access::Read),
        Err(IommuError::NotContiguous { .. })
    ));
    // `get_slice` of a mapping crossing guest regions: guest memory says so.
    assert!(matches!(view.get_slice(Iova(0x11_ff0), 32, Access::Read), Err(IommuError::Guest { .. })));
    // Partial transfers stop at the first miss.
    assert_eq!(view.write(&[9u8; 0x3000], Iova(0x13_000)).unwrap(), 0x1000);
    assert_eq!(view.read(&mut [0u8; 0x3000], Iova(0x12_800)).unwrap(), 0x1800);
    assert_eq!(view.read(&mut [], Iova(0x12_800)).unwrap(), 0);
    assert!(view.read(&mut [0u8; 1], Iova(0x14_000)).is_err());
}

#[test]
fn permissions_are_enforced_before_any_byte_moves() {
    let mem = memory();
    let iotlb = Iotlb::new();
    iotlb.update(Iova(0), PAGE, GuestAddress(0x1000), Permissions::READ_WRITE).unwrap();
    iotlb.update(Iova(PAGE), PAGE, GuestAddress(0x2000), Permissions::READ).unwrap();
    iotlb.update(Iova(2 * PAGE), PAGE, GuestAddress(0x3000), Permissions::WRITE).unwrap();
    // A device-writable mapping of read-only guest memory, and one of a hole.
    iotlb.update(Iova(3 * PAGE), PAGE, GuestAddress(RO_BASE), Permissions::READ_WRITE).unwrap();
    iotlb.update(Iova(4 * PAGE), PAGE, GuestAddress(3 << 20), Permissions::READ_WRITE).unwrap();
    let snapshot = iotlb.snapshot();
    let view = snapshot.view(&mem);
    // A write whose second half is read-only: refused, and not one byte of the first half moved.
    match view.write_slice(&[0xaa; 0x2000], Iova(0)) {
        Err(IommuError::PermissionDenied { iova, access: Access::Write, perm }) => {
            assert_eq!((iova, perm), (Iova(PAGE), Permissions::READ));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
    assert!(dirty_pages(&mem).is_empty());
    assert!(matches!(view.write_obj(1u8, Iova(PAGE)), Err(IommuError::PermissionDenied { .. })));
    assert!(matches!(
        view.store(1u64, Iova(PAGE), Ordering::SeqCst),
        Err(IommuError::PermissionDenied { .. })
    ));
    assert!(matches!(
        view.read_obj::<u8>(Iova(2 * PAGE)),
        Err(IommuError::PermissionDenied { access: Access::Read, .. })
    ));
    assert!(matches!(
        view.load::<u8>(Iova(2 * PAGE), Ordering::SeqCst),
        Err(IommuError::PermissionDenied { .. })
    ));
    view.write_obj(2u8, Iova(2 * PAGE)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 2);
    // `write` moves what it may, then stops.
    assert_eq!(view.write(&[0xbb; 0x2000], Iova(0)).unwrap(), 0x1000);
    assert!(view.write(&[0xbb; 1], Iova(PAGE)).is_err());
    // Guest memory's own refusals: read-only memory, a hole.
    assert!(matches!(
        view.write_obj(1u8, Iova(3 * PAGE)),
        Err(IommuError::Guest { source: GuestMemoryError::ReadOnly { .. }, .. })
    ));
    assert!(view.read_obj::<u8>(Iova(3 * PAGE)).is_ok());
    assert!(matches!(
        view.read_obj::<u8>(Iova(4 * PAGE)),
        Err(IommuError::Guest { source: GuestMemoryError::InvalidGuestAddress(_), .. })
    ));
    assert!(matches!(view.get_slice(Iova(3 * PAGE), 8, Access::Write), Err(IommuError::Guest { .. })));
    assert!(view.check(Iova(0), 0, Access::Write).is_ok());
    assert!(view.check(Iova(PAGE), 0, Access::Write).is_err());
}

/// A device behind an IOMMU model: every miss is resolved by the model (its "page tables")
/// and the access retried, as a vhost-user back-end does with IOTLB miss messages.
#[test]
fn misses_are_resolved_by_the_iommu_model() {
    let mem = memory();
    let iotlb = Iotlb::new();
    // The model maps IOVA page p to guest page 200 - p, read-write, for p in 16..48.
    let model: BTreeMap<u64, u64> = (16..48).map(|p| (p, 200 - p)).collect();
    let mut cache = iotlb.cache();
    let data: Vec<u8> = (0..20 * PAGE as usize).map(|i| (i % 251) as u8).collect();
    let mut misses = Vec::new();
    let write_at = Iova(20 * PAGE + 0x10);
    loop {
        match cache.table().view(&mem).write_slice(&data, write_at) {
            Ok(()) => break,
            Err(IommuError::Miss { iova, len, access }) => {
                assert_eq!(access, Access::Write);
                misses.push((iova, len));
                // The model maps the pages the miss names that it has.
                let first = iova.0 / PAGE;
                let last = (iova.0 + len - 1) / PAGE;
                let mut mapped = false;
                for p in first..=last {
                    if let Some(&g) = model.get(&p) {
                        iotlb
                            .update(Iova(p * PAGE), PAGE, GuestAddress(g * PAGE), Permissions::READ_WRITE)
                            .unwrap();
                        mapped = true;
                    }
                }
                assert!(mapped, "the model has nothing for {iova:?}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    // One miss: it named the whole rest of the access.
    assert_eq!(misses, [(write_at, data.len() as u64)]);
    // Each IOVA page landed on its guest page.
    for (i, chunk) in data.chunks(PAGE as usize).enumerate() {
        let iova = write_at.0 + (i as u64) * PAGE;
        let mut got = vec![0u8; chunk.len()];
        let gpa = model[&(iova / PAGE)] * PAGE + iova % PAGE;
        mem.read_slice(&mut got[..(PAGE - iova % PAGE) as usize], GuestAddress(gpa)).unwrap();
        assert_eq!(got[..(PAGE - iova % PAGE) as usize], chunk[..(PAGE - iova % PAGE) as usize]);
    }
    // A hole in the middle: the miss names the first missing IOVA and what is left from there.
    iotlb.invalidate(Iova(30 * PAGE), PAGE).unwrap();
    match cache.table().view(&mem).read_slice(&mut [0u8; 0x3000], Iova(29 * PAGE + 0x800)) {
        Err(IommuError::Miss { iova, len, access: Access::Read }) => {
            assert_eq!((iova, len), (Iova(30 * PAGE), 0x2800))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn updates_replace_and_invalidations_cut() {
    let iotlb = Iotlb::new();
    let entry =
        |iova, size, gpa, perm| IotlbEntry { iova: Iova(iova), size, guest_addr: GuestAddress(gpa), perm };
    let (r, rw) = (Permissions::READ, Permissions::READ_WRITE);
    iotlb.update(Iova(0), 8 * PAGE, GuestAddress(0x10_0000), rw).unwrap();
    let before = iotlb.snapshot();
    let mut cache = iotlb.cache();
    let _ = cache.table();
    iotlb.update(Iova(2 * PAGE), 2 * PAGE, GuestAddress(0x80_0000), r).unwrap();
    iotlb.invalidate(Iova(6 * PAGE), PAGE).unwrap();
    let t = iotlb.snapshot();
    assert_eq!(
        t.entries().collect::<Vec<_>>(),
        [
            entry(0, 2 * PAGE, 0x10_0000, rw),
            entry(2 * PAGE, 2 * PAGE, 0x80_0000, r),
            entry(4 * PAGE, 2 * PAGE, 0x10_4000, rw),
            entry(7 * PAGE, PAGE, 0x10_7000, rw),
        ]
    );
    // A table taken before still translates as it did; tables taken after see the changes.
    assert_eq!(before.translate(Iova(6 * PAGE), 1, Access::Read).unwrap().0, GuestAddress(0x10_6000));
    assert!(cache.table().translate(Iova(6 * PAGE), 1, Access::Read).is_err());
    assert_eq!(
        cache.table().translate(Iova(2 * PAGE + 1), 1, Access::Read).unwrap().0,
        GuestAddress(0x80_0001)
    );
    assert_eq!(iotlb.generation(), 3);
    // An update over several mappings replaces all of them.
    iotlb.update(Iova(PAGE), 6 * PAGE, GuestAddress(0x20_0000), r).unwrap();
    assert_eq!(
        iotlb.snapshot().entries().collect::<Vec<_>>(),
        [
            entry(0, PAGE, 0x10_0000, rw),
            entry(PAGE, 6 * PAGE, 0x20_0000, r),
            entry(7 * PAGE, PAGE, 0x10_7000, rw),
        ]
    );
    // Invalidating what is not mapped is harmless; all of it, empty.
    iotlb.invalidate(Iova(1 << 40), PAGE).unwrap();
    iotlb.invalidate_all();
    assert!(cache.table().is_empty());
    // A mapping that ends at the top of the IOVA space.
    iotlb.update(Iova(u64::MAX - PAGE + 1), PAGE, GuestAddress(0), r).unwrap();
    assert_eq!(
        cache.table().translate(Iova(u64::MAX), 8, Access::Read).unwrap(),
        (GuestAddress(PAGE - 1), 1)
    );
    let mem = memory();
    let mut buf = [0u8; 2];
    assert!(matches!(
        cache.table().view(&mem).read_slice(&mut buf, Iova(u64::MAX)),
        Err(IommuError::Overflow { .. })
    ));
}

/// Every hostile update is refused and changes nothing.
#[test]
fn hostile_updates_change_nothing() {
    let iotlb = Iotlb::with_max_entries(3).unwrap();
    let rw = Permissions::READ_WRITE;
    iotlb.update(Iova(0), 8 * PAGE, GuestAddress(0), rw).unwrap();
    iotlb.update(Iova(PAGE), PAGE, GuestAddress(0x10_0000), rw).unwrap(); // now 3 pieces
    let generation = iotlb.generation();
    let entries: Vec<_> = iotlb.snapshot().entries().collect();
    assert_eq!(entries.len(), 3);
    let refused = [
        iotlb.update(Iova(0), 0, GuestAddress(0), rw).unwrap_err(),
        iotlb.update(Iova(0x800), PAGE, GuestAddress(0), rw).unwrap_err(),
        iotlb.update(Iova(0), PAGE, GuestAddress(0x800), rw).unwrap_err(),
        iotlb.update(Iova(0), 0x1800, GuestAddress(0), rw).unwrap_err(),
        iotlb.update(Iova(u64::MAX - PAGE + 1), 2 * PAGE, GuestAddress(0), rw).unwrap_err(),
        iotlb.update(Iova(0), 2 * PAGE, GuestAddress(u64::MAX - PAGE + 1), rw).unwrap_err(),
        iotlb.update(Iova(0), PAGE, GuestAddress(0), Permissions::empty()).unwrap_err(),
        // Cutting the last piece around a new page: five pieces, over the three allowed.
        iotlb.update(Iova(4 * PAGE), PAGE, GuestAddress(0), rw).unwrap_err(),
        // An invalidation that cuts a piece in two: four.
        iotlb.invalidate(Iova(4 * PAGE), PAGE).unwrap_err(),
        iotlb.invalidate(Iova(1), PAGE).unwrap_err(),
        iotlb.invalidate(Iova(0), 0).unwrap_err(),
    ];
    assert!(matches!(refused[0], IommuError::ZeroSize { .. }));
    assert!(matches!(refused[1], IommuError::Unaligned { what: "iova", .. }));
    assert!(matches!(refused[2], IommuError::Unaligned { what: "guest address", .. }));
    assert!(matches!(refused[3], IommuError::Unaligned { what: "size", .. }));
    assert!(matches!(refused[4], IommuError::Overflow { what: "iova", .. }));
    assert!(matches!(refused[5], IommuError::Overflow { what: "guest address", .. }));
    assert!(matches!(refused[6], IommuError::NoPermission { .. }));
    assert!(matches!(refused[7], IommuError::TooManyEntries { count: 5, max: 3 }));
    assert!(matches!(refused[8], IommuError::TooManyEntries { count: 4, max: 3 }));
    assert!(matches!(refused[9], IommuError::Unaligned { .. }));
    assert!(matches!(refused[10], IommuError::ZeroSize { .. }));
    assert_eq!(iotlb.generation(), generation);
    assert_eq!(iotlb.snapshot().entries().collect::<Vec<_>>(), entries);
    assert!(Iotlb::with_max_entries(MAX_ENTRIES + 1).is_err());
}

#[test]
fn io_through_iovas_crosses_mappings() {
    let mem = memory();
    let iotlb = Iotlb::new();
    for (i, gpa) in [0x9000u64, 0x2000, 0x7000].into_iter().enumerate() {
        iotlb.update(Iova((i as u64 + 1) * PAGE), PAGE, GuestAddress(gpa), Permissions::READ_WRITE).unwrap();
    }
    let snapshot = iotlb.snapshot();
    let view = snapshot.view(&mem);
    let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    let data: Vec<u8> = (0..0x2800).map(|i| (i % 253) as u8).collect();
    file.write_all(&data).unwrap();
    file.rewind().unwrap();
    view.read_exact_volatile_from(Iova(PAGE + 0x400), &mut file, 0x2800).unwrap();
    let mut out = Vec::new();
    view.write_all_volatile_to(Iova(PAGE + 0x400), &mut out, 0x2800).unwrap();
    assert_eq!(out, data);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), data[0xc00]);
    // Short of data: the count so far, or PartialBuffer for the exact form.
    file.rewind().unwrap();
    assert_eq!(view.read_volatile_from(Iova(PAGE), &mut file, 0x3000).unwrap(), 0x2800);
    file.rewind().unwrap();
    match view.read_exact_volatile_from(Iova(PAGE), &mut &data[..0x1800], 0x2000) {
        Err(IommuError::PartialBuffer { expected: 0x2000, completed: 0x1800, .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut sink = Vec::new();
    assert_eq!(view.write_volatile_to(Iova(3 * PAGE), &mut sink, 0x4000).unwrap(), 0x1000);
    // Past the mappings: nothing moves.
    assert!(view.read_exact_volatile_from(Iova(3 * PAGE), &mut &data[..], 0x2000).is_err());
    assert!(view.write_volatile_to(Iova(0), &mut sink, 8).is_err());
}

/// Translations while the IOTLB changes: every IOVA page is always mapped, to one of two guest
/// pages whose contents say which; readers through per-thread caches must always find one of
/// them, never a miss or a mix, while an updater flips pages and another maps and unmaps a
/// range of its own.
#[test]
fn translations_never_tear_while_the_iotlb_changes() {
    const PAGES: u64 = 64;
    let mem = memory();
    // Guest page 2i holds the tag 2i in every u64, page 2i + 1 the tag 2i + 1.
    for page in 0..2 * PAGES {
        for off in (0..PAGE).step_by(8) {
            mem.write_obj(page, GuestAddress(page * PAGE + off)).unwrap();
        }
    }
    let iotlb = Iotlb::new();
    for i in 0..PAGES {
        iotlb.update(Iova(i * PAGE), PAGE, GuestAddress(2 * i * PAGE), Permissions::READ).unwrap();
    }
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let flips = AtomicU64::new(0);
    std::thread::scope(|s| {
        for id in 0..2u64 {
            let (iotlb, mem, stop, reads) = (&iotlb, &mem, &stop, &reads);
            s.spawn(move || {
                let mut cache = iotlb.cache();
                let mut x = id + 1;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = x % PAGES;
                    let view = cache.table().view(mem);
                    let v: u64 = view.read_obj(Iova(i * PAGE + (x >> 32) % (PAGE / 8) * 8)).unwrap();
                    assert!(v == 2 * i || v == 2 * i + 1, "page {i} read {v}");
                    // A read across two IOVA pages: each half from one of its page's two places.
                    if i + 1 < PAGES {
                        let mut two = [0u64; 2];
                        view.read_slice(
                            zerocopy::IntoBytes::as_mut_bytes(&mut two[..]),
                            Iova(i * PAGE + PAGE - 8),
                        )
                        .unwrap();
                        assert!(two[0] / 2 == i && two[1] / 2 == i + 1, "{two:?}");
                    }
                    // The churned range: a hit is the right page, a miss is a miss.
                    match view.read_obj::<u64>(Iova((1 << 30) + i * PAGE)) {
                        Ok(v) => assert!(v / 2 == i, "churn page {i} read {v}"),
                        Err(IommuError::Miss { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    n += 1;
                }
                reads.fetch_add(n, Ordering::Relaxed);
            });
        }
        let deadline = Instant::now() + Duration::from_millis(800);
        let mut x = 99u64;
        while Instant::now() < deadline {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = x % PAGES;
            iotlb
                .update(Iova(i * PAGE), PAGE, GuestAddress((2 * i + (x >> 40) % 2) * PAGE), Permissions::READ)
                .unwrap();
            let j = (x >> 20) % PAGES;
            if x & 1 == 0 {
                iotlb
                    .update(Iova((1 << 30) + j * PAGE), PAGE, GuestAddress(2 * j * PAGE), Permissions::READ)
                    .unwrap();
            } else {
                iotlb.invalidate(Iova((1 << 30) + j * PAGE), PAGE).unwrap();
            }
            flips.fetch_add(1, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (reads, flips) = (reads.into_inner(), flips.into_inner());
    assert!(reads > 1000 && flips > 100, "{reads} reads, {flips} updates");
    let _ = writeln!(std::io::stderr(), "iotlb churn: {reads} reads by two threads during {flips} updates");
}

#[derive(Clone, Debug)]
enum Op {
    Update { page: u64, pages: u64, gpa_page: u64, perm: u8 },
    Invalidate { page: u64, pages: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..64u64, 1..9u64, 0..64u64, 1..4u8).prop_map(|(page, pages, gpa_page, perm)| Op::Update {
            page,
            pages,
            gpa_page,
            perm
        }),
        (0..64u64, 1..9u64).prop_map(|(page, pages)| Op::Invalidate { page, pages }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// After any sequence of updates and invalidations, every IOVA translates as a page map
    /// says, and the table is sorted, without overlap.
    #[test]
    fn iotlb_matches_a_page_map(ops in prop::collection::vec(op(), 1..40)) {
        let iotlb = Iotlb::new();
        let mut model: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
        for op in &ops {
            match *op {
                Op::Update { page, pages, gpa_page, perm } => {
                    let perm_flags = Permissions::from_bits(perm).unwrap();
                    iotlb.update(Iova(page * PAGE), pages * PAGE, GuestAddress(gpa_page * PAGE), perm_flags).unwrap();
                    for k in 0..pages {
                        model.insert(page + k, (gpa_page + k, perm));
                    }
                }
                Op::Invalidate { page, pages } => {
                    iotlb.invalidate(Iova(page * PAGE), pages * PAGE).unwrap();
                    for k in 0..pages {
                        model.remove(&(page + k));
                    }
                }
            }
            let t = iotlb.snapshot();
            let entries: Vec<_> = t.entries().collect();
            for pair in entries.windows(2) {
                prop_assert!(pair[0].iova.0 + pair[0].size <= pair[1].iova.0);
            }
            for page in 0..74u64 {
                for access in [Access::Read, Access::Write] {
                    let got = t.translate(Iova(page * PAGE + 0x123), 3 * PAGE, access);
                    match (model.get(&page), got) {
                        (None, Err(IommuError::Miss { .. })) => {}
                        (Some(&(g, p)), Ok((gpa, n))) => {
                            prop_assert!(Permissions::from_bits(p).unwrap().contains(access.needs()));
                            prop_assert_eq!(gpa, GuestAddress(g * PAGE + 0x123));
                            // The contiguous run is mapped linearly in the model too.
                            for k in 1..(0x123 + n).div_ceil(PAGE) {
                                prop_assert_eq!(model.get(&(page + k)).map(|&(g2, _)| g2), Some(g + k));
                            }
                        }
                        (Some(&(_, p)), Err(IommuError::PermissionDenied { .. })) => {
                            prop_assert!(!Permissions::from_bits(p).unwrap().contains(access.needs()));
                        }
                        (m, r) => prop_assert!(false, "page {page} {access:?}: model {m:?}, table {r:?}"),
                    }
                }
            }
        }
    }
}

#[test]
fn iommu_error_every_variant() {
    let name = |e: &IommuError| match e {
        IommuError::Miss { .. } => "Miss",
        IommuError::PermissionDenied { .. } => "PermissionDenied",
        IommuError::Guest { .. } => "Guest",
        IommuError::NotContiguous { .. } => "NotContiguous",
        IommuError::PartialBuffer { .. } => "PartialBuffer",
        IommuError::ZeroSize { .. } => "ZeroSize",
        IommuError::Unaligned { .. } => "Unaligned",
        IommuError::Overflow { .. } => "Overflow",
        IommuError::NoPermission { .. } => "NoPermission",
        IommuError::TooManyEntries { .. } => "TooManyEntries",
    };
    let mem = memory();
    let iotlb = Iotlb::new();
    iotlb.update(Iova(0), PAGE, GuestAddress(0), Permissions::READ).unwrap();
    iotlb.update(Iova(PAGE), PAGE, GuestAddress(RO_BASE), Permissions::READ_WRITE).unwrap();
    iotlb.update(Iova(2 * PAGE), PAGE, GuestAddress(0x5000), Permissions::READ_WRITE).unwrap();
    let t = iotlb.snapshot();
    let v = t.view(&mem);
    let produced = [
        v.read_obj::<u8>(Iova(1 << 40)).unwrap_err(),
        v.write_obj(1u8, Iova(0)).unwrap_err(),
        v.write_obj(1u8, Iova(PAGE)).unwrap_err(),
        v.get_slice(Iova(PAGE + 0xff0), 0x20, Access::Read).unwrap_err(),
        v.read_exact_volatile_from(Iova(2 * PAGE), &mut &[1u8; 4][..], 8).unwrap_err(),
        iotlb.invalidate(Iova(0), 0).unwrap_err(),
        iotlb.invalidate(Iova(7), PAGE).unwrap_err(),
        iotlb.invalidate(Iova(u64::MAX - PAGE + 1), 2 * PAGE).unwrap_err(),
        iotlb.update(Iova(0), PAGE, GuestAddress(0), Permissions::empty()).unwrap_err(),
        Iotlb::with_max_entries(usize::MAX).unwrap_err(),
    ];
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Miss",
            "PermissionDenied",
            "Guest",
            "NotContiguous",
            "PartialBuffer",
            "ZeroSize",
            "Unaligned",
            "Overflow",
            "NoPermission",
            "TooManyEntries",
        ],
        true,
    );
}
