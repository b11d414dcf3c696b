//! Lazy restore (`snapshot::lazy`) against real userfaultfd memory: contents equal to the
//! snapshot whatever touches them and in whatever order; hostile files; discards; stop and
//! resume; many threads at once; real KVM guests running on lazily restored memory.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use guestmem::mmap::{Backing, MemfdOptions};
use guestmem::snapshot::lazy::{self, FailureReason, LazyError, LazyOptions, Stopped, Verify};
use guestmem::snapshot::{self, SnapshotError};
use guestmem::sys::uffd::{self as sys_uffd, OpenVia};
use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};

const MIB: usize = 1 << 20;
const PAGE: u64 = 4096;

fn uffd_ok(test: &str) -> bool {
    common::need(
        "uffd",
        test,
        sys_uffd::available_features(OpenVia::Any).map(drop).map_err(|e| e.to_string()),
    )
    .is_some()
}

fn tmp() -> File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

fn mix(x: u64) -> u64 {
    let mut h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 29)
}

/// Memory of `layout` where about half the pages hold pseudo-random bytes, the rest zeros
/// (so the snapshot has data extents and holes).
fn source(layout: &[(GuestAddress, usize)], seed: u64) -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(layout).unwrap();
    for &(base, len) in layout {
        let mut page = vec![0u8; PAGE as usize];
        for p in 0..len as u64 / PAGE {
            if mix(p ^ seed).is_multiple_of(3) {
                continue;
            }
            for (i, b) in page.iter_mut().enumerate() {
                *b = mix(p * 4096 + i as u64 + seed) as u8;
            }
            mem.write_slice(&page, GuestAddress(base.0 + p * PAGE)).unwrap();
        }
    }
    mem
}

/// A full snapshot of `mem` with a chunk table of `chunk` bytes (none if 0).
fn snapshot_of(mem: &GuestMemoryMmap<()>, chunk: u64) -> File {
    let f = tmp();
    snapshot::dump(mem, &f).unwrap();
    if chunk != 0 {
        lazy::write_chunk_table(&f, chunk).unwrap();
    }
    f
}

#[test]
fn reads_in_any_order_then_complete_equals_the_snapshot() {
    if !uffd_ok("reads_in_any_order_then_complete_equals_the_snapshot") {
        return;
    }
    let layout = [(GuestAddress(0), 4 * MIB), (GuestAddress(1 << 32), 2 * MIB)];
    let src = source(&layout, 1);
    for (chunk, verify) in [
        (lazy::DEFAULT_CHUNK_SIZE, Verify::ChunkTable),
        (4096, Verify::Auto),
        (0, Verify::RegionFirst),
        (0, Verify::Auto),
    ] {
        let file = snapshot_of(&src, chunk);
        let options = LazyOptions::new().verify(verify).prefetch(false);
        let restore = lazy::restore_lazy_with::<AtomicBitmap, _>(&file, options, |_, b| b).unwrap();
        let mem = restore.memory();
        // Random single reads first, on demand only.
        for i in 0..200u64 {
            let (base, len) = layout[(i % 2) as usize];
            let addr = GuestAddress(base.0 + mix(i) % len as u64);
            assert_eq!(mem.read_obj::<u8>(addr).unwrap(), src.read_obj::<u8>(addr).unwrap(), "{addr}");
        }
        assert!(!restore.is_complete());
        assert!(restore.progress().demand_units > 0);
        assert_eq!(common::contents(mem), common::contents(&src), "chunk {chunk} {verify:?}");
        assert!(restore.wait_complete(Some(Duration::from_secs(10))).unwrap());
        // Lazily placed pages are not dirty.
        assert_eq!(mem.dirty_page_count().unwrap(), 0);
        let stats = restore.stop().unwrap_complete().unwrap();
        assert_eq!(stats.pages_total, (6 * MIB) as u64 / PAGE);
    }
}

#[test]
fn memfd_and_shared_anonymous_backings() {
    if !uffd_ok("memfd_and_shared_anonymous_backings") {
        return;
    }
    let layout = [(GuestAddress(0), 2 * MIB), (GuestAddress(2 * MIB as u64), 2 * MIB)];
    let src = source(&layout, 2);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let restore = lazy::restore_lazy_with::<(), _>(&file, LazyOptions::new(), |r, b| {
        if r.guest_addr.0 == 0 {
            b.backing(Backing::Memfd(MemfdOptions::new("lazy").sealed(true)))
        } else {
            b.backing(Backing::Anonymous { shared: true })
        }
    })
    .unwrap();
    let mem = restore.memory();
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x1_2340)).unwrap(),
        src.read_obj::<u64>(GuestAddress(0x1_2340)).unwrap()
    );
    assert!(restore.wait_complete(Some(Duration::from_secs(10))).unwrap());
    assert_eq!(common::contents(mem), common::contents(&src));
    restore.stop().unwrap_complete().unwrap();
}

#[test]
fn hugetlb_backing_places_whole_huge_pages() {
    if !uffd_ok("hugetlb_backing_places_whole_huge_pages") {
        return;
    }
    let Some(()) = common::need("hugetlb", "hugetlb_backing_places_whole_huge_pages", common::huge_pages(4))
    else {
        return;
    };
    let layout = [(GuestAddress(0), 4 * MIB)];
    let src = source(&layout, 3);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    for memfd in [false, true] {
        let options = LazyOptions::new().prefetch(false);
        let restore = lazy::restore_lazy_with::<(), _>(&file, options, |_, b| {
            let b = b.huge_pages(guestmem::mmap::HugePageSize::Size2M);
            if memfd {
                b.backing(Backing::Memfd(MemfdOptions::new("lazy-huge")))
            } else {
                b
            }
        })
        .unwrap();
        let mem = restore.memory();
        assert!(mem.regions()[0].mapping().is_hugetlbfs());
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(),
            src.read_obj::<u8>(GuestAddress(0x1234)).unwrap()
        );
        // One fault placed one whole 2 MiB page.
        assert_eq!((restore.progress().demand_units, restore.progress().pages_resolved), (1, 1));
        assert_eq!(common::contents(mem), common::contents(&src));
        assert!(restore.wait_complete(Some(Duration::from_secs(10))).unwrap());
        restore.stop().unwrap_complete().unwrap();
    }
}

/// Flips a byte of the snapshot's data at guest address `addr` (single region at 0).
fn corrupt(file: &File, addr: u64) {
    let at = snapshot::read_info(file).unwrap().regions[0].data_offset + addr;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn a_chunk_failing_its_checksum_is_never_mapped() {
    if !uffd_ok("a_chunk_failing_its_checksum_is_never_mapped") {
        return;
    }
    let layout = [(GuestAddress(0), 4 * MIB)];
    let src = source(&layout, 4);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    // Mid-file: the prefetch meets it after placing 2 MiB.
    let bad = 2 * MIB as u64 + 0x5008;
    let mut v = [0u8; 8];
    src.read_slice(&mut v, GuestAddress(bad)).unwrap();
    corrupt(&file, bad);
    let restore = lazy::restore_lazy::<()>(&file).unwrap();
    let e = restore.wait_complete(Some(Duration::from_secs(10))).unwrap_err();
    let LazyError::Failed(f) = &e else { panic!("{e}") };
    let chunk = lazy::DEFAULT_CHUNK_SIZE;
    assert_eq!((f.guest_addr, f.len), (GuestAddress(bad & !(chunk - 1)), chunk));
    assert!(matches!(f.reason, FailureReason::ChunkChecksum { .. }), "{e}");
    assert!(e.to_string().contains("chunk checksum mismatch"), "{e}");
    assert_eq!(restore.failures().len(), 1);
    // Everything else was placed and is right.
    let mem = restore.memory().clone();
    let good = mem.read_obj::<u64>(GuestAddress(3 * MIB as u64)).unwrap();
    assert_eq!(good, src.read_obj::<u64>(GuestAddress(3 * MIB as u64)).unwrap());
    assert!(!restore.is_complete());
    // The prefetch goes on past the bad chunk.
    let t = std::time::Instant::now();
    let good_pages = 1024 - chunk / PAGE;
    while restore.progress().pages_resolved < good_pages && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(restore.progress().pages_resolved, good_pages);
    // A thread touching the bad chunk waits: the bytes are never placed.
    let reader = std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(bad)).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reader.is_finished());
    let Stopped::Parked(parked) = restore.stop() else { panic!("stopped complete") };
    assert_eq!(parked.progress().failures, 1);
    // Only closing the userfaultfd ends the wait, with the kernel's zero page, never the
    // corrupt bytes.
    drop(parked);
    assert_eq!(reader.join().unwrap(), 0);
}

#[test]
fn region_first_verification_refuses_a_corrupt_region() {
    if !uffd_ok("region_first_verification_refuses_a_corrupt_region") {
        return;
    }
    let layout = [(GuestAddress(0), MIB), (GuestAddress(MIB as u64), MIB)];
    let src = source(&layout, 5);
    let file = snapshot_of(&src, 0);
    let info = snapshot::read_info(&file).unwrap();
    let at = info.regions[1].data_offset + 0x3000;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[!b[0]], at).unwrap();
    let restore = lazy::restore_lazy::<()>(&file).unwrap();
    let e = restore.wait_complete(Some(Duration::from_secs(10))).unwrap_err();
    let LazyError::Failed(f) = e else { panic!() };
    assert_eq!((f.guest_addr, f.len), (GuestAddress(MIB as u64), MIB as u64));
    assert!(matches!(f.reason, FailureReason::RegionChecksum { .. }));
    assert_eq!(restore.failures().len(), 1);
    // The first region was checked on its own and placed.
    let mut first = vec![0u8; MIB];
    restore.memory().read_slice(&mut first, GuestAddress(0)).unwrap();
    assert_eq!(first, common::contents(&src)[0]);
    let Stopped::Parked(_) = restore.stop() else { panic!() };
}

#[test]
fn hostile_chunk_tables_and_files_are_refused() {
    if !uffd_ok("hostile_chunk_tables_and_files_are_refused") {
        return;
    }
    let layout = [(GuestAddress(0), MIB)];
    let src = source(&layout, 6);
    let plain = snapshot_of(&src, 0);
    let e = lazy::restore_lazy_with::<(), _>(&plain, LazyOptions::new().verify(Verify::ChunkTable), |_, b| b)
        .unwrap_err();
    assert!(matches!(e, LazyError::ChunkTableMissing), "{e}");
    assert!(matches!(
        lazy::write_chunk_table(&plain, 1000),
        Err(LazyError::InvalidChunkSize { chunk_size: 1000, .. })
    ));
    assert!(matches!(lazy::write_chunk_table(&plain, 2 << 30), Err(LazyError::InvalidChunkSize { .. })));

    let with_table = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let info = snapshot::read_info(&with_table).unwrap();
    let table_at = info.file_len;
    let len = with_table.metadata().unwrap().len();
    let mut table = vec![0u8; (len - table_at) as usize];
    with_table.read_exact_at(&mut table, table_at).unwrap();
    let refused = |bytes: &[u8], why: &str| {
        let f = tmp();
        snapshot::dump(&src, &f).unwrap();
        f.write_all_at(bytes, table_at).unwrap();
        let e = lazy::restore_lazy::<()>(&f).unwrap_err();
        assert!(matches!(e, LazyError::InvalidChunkTable { .. }), "{why}: {e}");
        assert!(matches!(lazy::read_chunk_table(&f), Err(LazyError::InvalidChunkTable { .. })), "{why}");
    };
    refused(&table[..40], "truncated header");
    refused(&table[..table.len() - 8], "truncated table");
    let mut t = table.clone();
    t[0] ^= 1;
    refused(&t, "magic");
    let mut t = table.clone();
    t[8] = 2;
    refused(&t, "version");
    let mut t = table.clone();
    t[12] = 1;
    refused(&t, "flags");
    let mut t = table.clone();
    t[16..24].copy_from_slice(&512u64.to_le_bytes());
    refused(&t, "chunk size below the page size");
    let mut t = table.clone();
    t[32] ^= 1;
    refused(&t, "count");
    let mut t = table.clone();
    t[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&t, "length");
    let mut t = table.clone();
    let last = t.len() - 1;
    t[last] ^= 1;
    refused(&t, "a chunk checksum changed (the table's own checksum catches it)");
    // A table that belongs to another snapshot of the same layout.
    let other = source(&layout, 7);
    let other_file = snapshot_of(&other, lazy::DEFAULT_CHUNK_SIZE);
    let mut foreign = vec![0u8; table.len()];
    other_file.read_exact_at(&mut foreign, table_at).unwrap();
    refused(&foreign, "another snapshot's table");
    // Chunk sums that do not match the data (a valid table over data corrupted afterwards) are
    // caught per chunk, not here: see a_chunk_failing_its_checksum_is_never_mapped. A table
    // is never written over corrupt data.
    corrupt(&plain, 0x100);
    let e = lazy::write_chunk_table(&plain, lazy::DEFAULT_CHUNK_SIZE).unwrap_err();
    assert!(matches!(e, LazyError::Snapshot(SnapshotError::DataChecksum { .. })), "{e}");
    // A diff snapshot must be rebased first.
    let tracked = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&layout).unwrap();
    let diff = tmp();
    snapshot::dump_dirty(&tracked, &diff).unwrap();
    let e = lazy::restore_lazy::<()>(&diff).unwrap_err();
    assert!(matches!(e, LazyError::Snapshot(SnapshotError::KindMismatch { .. })), "{e}");
    assert!(matches!(
        lazy::write_chunk_table(&diff, 4096),
        Err(LazyError::Snapshot(SnapshotError::KindMismatch { .. }))
    ));
    // Not a snapshot at all.
    assert!(matches!(
        lazy::restore_lazy::<()>(&tmp()),
        Err(LazyError::Snapshot(SnapshotError::Truncated { .. }))
    ));
}

#[test]
fn discards_read_as_zeros_and_are_not_filled() {
    if !uffd_ok("discards_read_as_zeros_and_are_not_filled") {
        return;
    }
    let layout = [(GuestAddress(0), 2 * MIB), (GuestAddress(2 * MIB as u64), MIB)];
    let src = source(&layout, 8);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let options = LazyOptions::new().prefetch(false);
    let restore = lazy::restore_lazy_with::<(), _>(&file, options, |r, b| {
        if r.guest_addr.0 != 0 {
            b.backing(Backing::Anonymous { shared: true })
        } else {
            b
        }
    })
    .unwrap();
    let mem = restore.memory();
    let mut expect = common::contents(&src);
    // Placed, then discarded (MADV_DONTNEED on private memory).
    let _ = mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap();
    mem.regions()[0].mapping().discard(0x10000, 0x4000).unwrap();
    // Never placed, discarded.
    mem.regions()[0].mapping().discard(0x100000, 0x20000).unwrap();
    // Shared anonymous memory: MADV_REMOVE.
    mem.regions()[1].mapping().discard(0x8000, 0x8000).unwrap();
    for (r, off, len) in [(0, 0x10000, 0x4000), (0, 0x100000, 0x20000), (1, 0x8000, 0x8000)] {
        expect[r][off..off + len].fill(0);
    }
    // The madvise returns once the handler has read the event, maybe before it counted it.
    let t = std::time::Instant::now();
    while restore.progress().pages_discarded < 4 + 32 + 8 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(restore.progress().pages_discarded, 4 + 32 + 8);
    assert_eq!(common::contents(mem), expect);
    assert!(restore.wait_complete(Some(Duration::from_secs(5))).unwrap());
    restore.stop().unwrap_complete().unwrap();
}

#[test]
fn restore_discard_on_memfd_memory_is_seen_by_the_handler() {
    if !uffd_ok("restore_discard_on_memfd_memory_is_seen_by_the_handler") {
        return;
    }
    let layout = [(GuestAddress(0), 2 * MIB)];
    let src = source(&layout, 19);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let options = LazyOptions::new().prefetch(false);
    let restore = lazy::restore_lazy_with::<AtomicBitmap, _>(&file, options, |_, b| {
        b.backing(Backing::Memfd(MemfdOptions::new("lazy-discard")))
    })
    .unwrap();
    let mem = restore.memory();
    let mut expect = common::contents(&src);
    // A placed range and a range never placed, both discarded with MADV_REMOVE.
    let _ = mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap();
    restore.discard(GuestAddress(0x8000), 0x4000).unwrap();
    restore.discard(GuestAddress(0x10_0000), 0x10000).unwrap();
    expect[0][0x8000..0xc000].fill(0);
    expect[0][0x10_0000..0x11_0000].fill(0);
    assert_eq!(mem.dirty_page_count().unwrap(), 4 + 16);
    assert_eq!(common::contents(mem), expect);
    // Refused: outside memory, across the end, misaligned, empty.
    assert!(matches!(restore.discard(GuestAddress(4 * MIB as u64), 4096), Err(LazyError::Memory(_))));
    assert!(matches!(restore.discard(GuestAddress(2 * MIB as u64 - 4096), 8192), Err(LazyError::Memory(_))));
    assert!(matches!(restore.discard(GuestAddress(0x10), 4096), Err(LazyError::Memory(_))));
    assert!(matches!(restore.discard(GuestAddress(0), 0), Err(LazyError::Memory(_))));
    assert!(restore.wait_complete(Some(Duration::from_secs(5))).unwrap());
    restore.stop().unwrap_complete().unwrap();
}

#[test]
fn stop_midway_parks_faults_and_resume_serves_them() {
    if !uffd_ok("stop_midway_parks_faults_and_resume_serves_them") {
        return;
    }
    let layout = [(GuestAddress(0), 2 * MIB)];
    let src = source(&layout, 9);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let restore =
        lazy::restore_lazy_with::<(), _>(&file, LazyOptions::new().prefetch(false), |_, b| b).unwrap();
    let want = src.read_obj::<u64>(GuestAddress(0x18_0000)).unwrap();
    assert_eq!(
        restore.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
        src.read_obj::<u64>(GuestAddress(0x1000)).unwrap()
    );
    let Stopped::Parked(parked) = restore.stop() else { panic!("complete after one fault?") };
    assert_eq!(parked.progress().pages_resolved, lazy::DEFAULT_CHUNK_SIZE / PAGE);
    let mem = parked.memory().clone();
    let reader = std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0x18_0000)).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reader.is_finished(), "a parked restore must not let missing pages read as zeros");
    let restore = parked.resume().unwrap();
    assert_eq!(reader.join().unwrap(), want);
    assert_eq!(common::contents(restore.memory()), common::contents(&src));
    assert!(restore.wait_complete(Some(Duration::from_secs(5))).unwrap());
    let stats = restore.stop().unwrap_complete().unwrap();
    assert!(stats.fill_time.is_some());
}

/// Many threads reading and writing random places of lazily restored memory while the
/// prefetch runs; every byte ends as the snapshot's, or as the last write a thread made there.
#[test]
fn stress_many_threads_on_random_pages() {
    if !uffd_ok("stress_many_threads_on_random_pages") {
        return;
    }
    const THREADS: u64 = 8;
    let layout = [(GuestAddress(0), 24 * MIB), (GuestAddress(1 << 30), 8 * MIB)];
    let src = source(&layout, 10);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let restore = lazy::restore_lazy::<AtomicBitmap>(&file).unwrap();
    let mem = restore.memory();
    let pages: Vec<u64> =
        layout.iter().flat_map(|&(b, l)| (0..l as u64 / PAGE).map(move |p| b.0 + p * PAGE)).collect();
    let writes: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (pages, src, mem) = (&pages, &src, mem);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..3000u64 {
                        let page = pages[(mix(t << 32 | i) % pages.len() as u64) as usize];
                        let off = (mix(i ^ t) % (PAGE / 8)) * 8;
                        let addr = GuestAddress(page + off);
                        if (page / PAGE) % THREADS == t && i % 2 == 0 {
                            // Pages of this thread only: its writes are the last word there.
                            let v = mix(i + 1000 * t);
                            mem.write_obj(v, addr).unwrap();
                            mine.push((addr.0, v));
                        } else if (page / PAGE) % THREADS != t {
                            // Others' pages may have been written: only untouched words are
                            // checkable, so compare a read of a page nobody writes.
                            let _ = mem.read_obj::<u64>(addr).unwrap();
                        } else {
                            let got = mem.read_obj::<u64>(addr).unwrap();
                            let last = mine.iter().rev().find(|w| w.0 == addr.0).map(|w| w.1);
                            assert_eq!(got, last.unwrap_or_else(|| src.read_obj(addr).unwrap()), "{addr}");
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(restore.wait_complete(Some(Duration::from_secs(30))).unwrap());
    for (addr, v) in writes.into_iter().flatten() {
        src.write_obj(v, GuestAddress(addr)).unwrap();
    }
    assert_eq!(common::contents(mem), common::contents(&src));
    assert!(restore.progress().faults > 0);
    restore.stop().unwrap_complete().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Real KVM guests on lazily restored memory.

use common::kvm_guest::{self, LoopingWriter, MemorySlot, TestVm};

const CODE_GPA: u64 = 0x1000;

fn kvm_vm(test: &str) -> Option<TestVm> {
    if !uffd_ok(test) {
        return None;
    }
    common::need("kvm", test, kvm_guest::kvm_available())?;
    Some(TestVm::new().unwrap())
}

/// One slot per region of `mem`, dirty logging on.
///
/// # Safety
/// `mem` must outlive `vm`.
unsafe fn add_slots<B: guestmem::bitmap::Bitmap>(
    vm: &mut TestVm,
    mem: &GuestMemoryMmap<B>,
) -> Vec<MemorySlot> {
    use guestmem::GuestMemoryRegion;
    mem.regions()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let slot = MemorySlot {
                slot: i as u32,
                guest_phys_addr: r.start_addr().0,
                size: r.len(),
                userspace_addr: r.mapping().as_ptr() as u64,
                flags: kvm_guest::LOG_DIRTY_PAGES,
            };
            // SAFETY: the caller keeps the memory mapped longer than the VM.
            unsafe { vm.set_user_memory_region(slot) }.unwrap();
            slot
        })
        .collect()
}

#[test]
fn kvm_guest_runs_at_once_on_lazily_restored_memory() {
    let layout = [(GuestAddress(0), 32 * MIB), (GuestAddress(64 * MIB as u64), 16 * MIB)];
    let src = source(&layout, 11);
    // The guest's program is in the snapshot, as a guest kernel would be.
    let mut writes = Vec::new();
    for i in 0..300u64 {
        let (base, len) = layout[(i % 2) as usize];
        let page = base.0 / PAGE + 4 + mix(i + 77) % (len as u64 / PAGE - 4);
        writes.push((page * PAGE + (i % 500) * 8, (i as u8) | 1));
    }
    let code = kvm_guest::write_program(&writes).unwrap();
    src.write_slice(&code, GuestAddress(CODE_GPA)).unwrap();
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    // The model: the snapshot, then the guest's writes.
    let expect = GuestMemoryMmap::<()>::from_ranges(&layout).unwrap();
    for (r, c) in common::contents(&src).iter().zip(layout) {
        expect.write_slice(r, c.0).unwrap();
    }
    for &(gpa, v) in &writes {
        expect.write_obj(v, GuestAddress(gpa)).unwrap();
    }
    for prefetch in [false, true] {
        let Some(mut vm) = kvm_vm("kvm_guest_runs_at_once_on_lazily_restored_memory") else { return };
        let t = std::time::Instant::now();
        let restore =
            lazy::restore_lazy_with::<(), _>(&file, LazyOptions::new().prefetch(prefetch), |_, b| b).unwrap();
        let restored = t.elapsed();
        // SAFETY: the VM is dropped below, before `restore` and its memory.
        let slots = unsafe { add_slots(&mut vm, restore.memory()) };
        vm.add_vcpu().unwrap();
        kvm_guest::enter_real_mode(vm.vcpu(0).unwrap(), CODE_GPA).unwrap();
        kvm_guest::run_to_hlt(vm.vcpu(0).unwrap()).unwrap();
        let ran = t.elapsed();
        let progress = restore.progress();
        eprintln!("prefetch {prefetch}: restore_lazy returned after {restored:?}, the guest halted after {ran:?}, {progress:?}");
        // KVM logged exactly the guest's writes.
        let mut dirty = std::collections::BTreeSet::new();
        for s in &slots {
            dirty.extend(vm.dirty_pages(s.slot).unwrap());
        }
        let wrote: std::collections::BTreeSet<u64> = writes.iter().map(|w| w.0 & !(PAGE - 1)).collect();
        assert_eq!(dirty, wrote);
        drop(vm);
        assert_eq!(common::contents(restore.memory()), common::contents(&expect), "prefetch {prefetch}");
        assert!(restore.wait_complete(Some(Duration::from_secs(10))).unwrap());
        restore.stop().unwrap_complete().unwrap();
    }
}

#[test]
fn kvm_looping_guest_keeps_running_while_the_prefetch_fills_memory() {
    let Some(mut vm) = kvm_vm("kvm_looping_guest_keeps_running_while_the_prefetch_fills_memory") else {
        return;
    };
    let layout = [(GuestAddress(0), 64 * MIB)];
    let src = source(&layout, 12);
    let writer = LoopingWriter { writes_per_exit: 32, ..LoopingWriter::new(16 * MIB as u64, 8192) };
    src.write_slice(&writer.program().unwrap(), GuestAddress(CODE_GPA)).unwrap();
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let restore = lazy::restore_lazy::<()>(&file).unwrap();
    // SAFETY: the VM is dropped before `restore`.
    unsafe { add_slots(&mut vm, restore.memory()) };
    vm.add_vcpu().unwrap();
    kvm_guest::enter_real_mode(vm.vcpu(0).unwrap(), CODE_GPA).unwrap();
    let mut exits = 0;
    while !restore.is_complete() || exits < 40 {
        exits += kvm_guest::run_until_exits(vm.vcpu(0).unwrap(), writer.port, 10).unwrap().len();
    }
    let progress = restore.progress();
    assert!(progress.faults > 0 && progress.prefetch_units > 0, "{progress:?}");
    drop(vm);
    // The model: the snapshot, then each write (stamp the sequence number, count one more).
    let n = exits as u64 * u64::from(writer.writes_per_exit);
    for (i, page) in writer.pages().take(n as usize).enumerate() {
        let count: u32 = src.read_obj(GuestAddress(page + kvm_guest::COUNT_OFFSET)).unwrap();
        src.write_obj(i as u32 + 1, GuestAddress(page + kvm_guest::SEQ_OFFSET)).unwrap();
        src.write_obj(count.wrapping_add(1), GuestAddress(page + kvm_guest::COUNT_OFFSET)).unwrap();
    }
    assert_eq!(common::contents(restore.memory()), common::contents(&src));
    restore.stop().unwrap_complete().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Handing fault handling to another process.

use std::os::unix::net::{UnixListener, UnixStream};

use guestmem::uffd::{self, HandoverError, HandoverRegion};

#[test]
fn handover_in_process_serves_the_senders_memory() {
    if !uffd_ok("handover_in_process_serves_the_senders_memory") {
        return;
    }
    let layout = [(GuestAddress(0), 2 * MIB), (GuestAddress(1 << 32), MIB)];
    let src = source(&layout, 13);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let (vmm, handler) = UnixStream::pair().unwrap();
    let (mem, fd, regions) = lazy::prepare_handover::<(), _>(&file, |_, b| b).unwrap();
    assert_eq!(regions.len(), 2);
    uffd::send_handover(&vmm, &fd, &regions).unwrap();
    drop(fd);
    let received = uffd::receive_handover(&handler).unwrap();
    assert_eq!(received.regions, regions);
    let server = uffd::serve_handover(received, &file, LazyOptions::new().prefetch(false)).unwrap();
    assert_eq!(server.remote().regions(), &regions[..]);
    assert_eq!(common::contents(&mem), common::contents(&src));
    assert!(server.wait_complete(Some(Duration::from_secs(5))).unwrap());
    server.stop().unwrap_complete().unwrap();
}

#[test]
fn hostile_handovers_are_refused_before_any_fault_is_served() {
    if !uffd_ok("hostile_handovers_are_refused_before_any_fault_is_served") {
        return;
    }
    let layout = [(GuestAddress(0), MIB), (GuestAddress(2 * MIB as u64), MIB)];
    let src = source(&layout, 14);
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let (_mem, fd, regions) = lazy::prepare_handover::<(), _>(&file, |_, b| b).unwrap();
    let features = fd.features();
    let send_raw = |bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
        let (a, b) = UnixStream::pair().unwrap();
        guestmem::sys::socket::send_with_fds(std::os::fd::AsFd::as_fd(&a), bytes, fds).unwrap();
        drop(a);
        uffd::receive_handover(&b)
    };
    let fd_ref = std::os::fd::AsFd::as_fd(&fd);
    let good = uffd::encode_handover(features, &regions);
    assert!(send_raw(&good, &[fd_ref]).is_ok());
    // No fd, two fds, an fd that is not a userfaultfd.
    assert!(matches!(send_raw(&good, &[]), Err(HandoverError::FdCount(0))));
    assert!(matches!(send_raw(&good, &[fd_ref, fd_ref]), Err(HandoverError::FdCount(2))));
    let null = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(send_raw(&good, &[std::os::fd::AsFd::as_fd(&null)]), Err(HandoverError::NotUffd(_))));
    // Damaged messages.
    let invalid = |m: Vec<u8>, why: &str| {
        let r = send_raw(&m, &[fd_ref]);
        assert!(matches!(r, Err(HandoverError::Invalid { .. })), "{why}: {r:?}");
    };
    let mut m = good.clone();
    m[0] ^= 1;
    invalid(m, "magic");
    let mut m = good.clone();
    m[8] = 9;
    invalid(m, "version");
    let mut m = good.clone();
    m[50] ^= 1;
    invalid(m, "checksum");
    invalid(good[..good.len() - 32].to_vec(), "cut short");
    let bad_layouts: [(&str, Vec<HandoverRegion>); 5] = [
        ("misaligned", vec![HandoverRegion { host_addr: regions[0].host_addr + 1, ..regions[0] }]),
        ("empty", vec![HandoverRegion { len: 0, ..regions[0] }]),
        ("out of order", vec![regions[1], regions[0]]),
        ("host overlap", vec![regions[0], HandoverRegion { host_addr: regions[0].host_addr, ..regions[1] }]),
        ("wraps", vec![HandoverRegion { guest_addr: GuestAddress(u64::MAX - 4095), ..regions[0] }]),
    ];
    for (why, layout) in bad_layouts {
        invalid(uffd::encode_handover(features, &layout), why);
    }
    assert!(matches!(
        uffd::send_handover(&UnixStream::pair().unwrap().0, &fd, &[]),
        Err(HandoverError::Invalid { .. })
    ));
    // A valid message whose layout is not the snapshot's: refused by the server.
    let other = snapshot_of(&source(&[(GuestAddress(0), 2 * MIB)], 15), lazy::DEFAULT_CHUNK_SIZE);
    let received = send_raw(&good, &[fd_ref]).unwrap();
    let e = uffd::serve_handover(received, &other, LazyOptions::new()).unwrap_err();
    assert!(matches!(e, LazyError::Handover(HandoverError::LayoutMismatch { .. })), "{e}");
    let shifted = vec![regions[0], HandoverRegion { guest_addr: GuestAddress(3 * MIB as u64), ..regions[1] }];
    let (a, b) = UnixStream::pair().unwrap();
    uffd::send_handover(&a, &fd, &shifted).unwrap();
    let e = uffd::serve_handover(uffd::receive_handover(&b).unwrap(), &file, LazyOptions::new()).unwrap_err();
    assert!(matches!(e, LazyError::Handover(HandoverError::LayoutMismatch { index: 1, .. })), "{e}");
    // The peer hanging up before sending.
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(matches!(uffd::receive_handover(&b), Err(HandoverError::Io { .. })));
}

/// Runs as the handler process of `handover_to_another_process` (when its environment says so).
#[test]
fn handover_child_process() {
    let (Ok(sock), Ok(snap)) =
        (std::env::var("GUESTMEM_HANDOVER_SOCKET"), std::env::var("GUESTMEM_HANDOVER_SNAPSHOT"))
    else {
        return;
    };
    let stream = UnixStream::connect(sock).unwrap();
    let file = File::open(snap).unwrap();
    let received = uffd::receive_handover(&stream).unwrap();
    let server = uffd::serve_handover(received, &file, LazyOptions::new()).unwrap();
    assert!(server.wait_complete(Some(Duration::from_secs(30))).unwrap());
    let stats = server.stop().unwrap_complete().unwrap();
    // Tell the VMM we are done.
    std::io::Write::write_all(&mut &stream, &stats.pages_total.to_le_bytes()).unwrap();
}

#[test]
fn handover_to_another_process() {
    if !uffd_ok("handover_to_another_process") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("guestmem-handover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, snap) = (dir.join("sock"), dir.join("snapshot"));
    let layout = [(GuestAddress(0), 8 * MIB), (GuestAddress(1 << 32), 4 * MIB)];
    let src = source(&layout, 16);
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&snap).unwrap();
    snapshot::dump(&src, &file).unwrap();
    lazy::write_chunk_table(&file, lazy::DEFAULT_CHUNK_SIZE).unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["handover_child_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("GUESTMEM_HANDOVER_SOCKET", &sock)
        .env("GUESTMEM_HANDOVER_SNAPSHOT", &snap)
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    let (mem, fd, regions) = lazy::prepare_handover::<(), _>(&file, |_, b| b).unwrap();
    uffd::send_handover(&stream, &fd, &regions).unwrap();
    drop(fd);
    // The guest's memory, served by the other process.
    assert_eq!(common::contents(&mem), common::contents(&src));
    let mut done = [0u8; 8];
    std::io::Read::read_exact(&mut &stream, &mut done).unwrap();
    assert_eq!(u64::from_le_bytes(done), (12 * MIB) as u64 / PAGE);
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_lazy_and_handover_error_variant_reachable_here_is_produced() {
    if !uffd_ok("every_lazy_and_handover_error_variant_reachable_here_is_produced") {
        return;
    }
    // `Uffd` (opening fails), `Unsupported` (a feature this kernel lacks) and `Thread` (no
    // thread can be spawned) cannot be produced on a machine where lazy restore works; the
    // exhaustive match still names them.
    let name = |e: &LazyError| match e {
        LazyError::Snapshot(_) => "Snapshot",
        LazyError::ChunkTableMissing => "ChunkTableMissing",
        LazyError::InvalidChunkTable { .. } => "InvalidChunkTable",
        LazyError::InvalidChunkSize { .. } => "InvalidChunkSize",
        LazyError::Uffd { .. } => "Uffd",
        LazyError::Unsupported(_) => "Unsupported",
        LazyError::Register { .. } => "Register",
        LazyError::Memory(_) => "Memory",
        LazyError::Failed(_) => "Failed",
        LazyError::Handover(_) => "Handover",
        LazyError::Thread(_) => "Thread",
    };
    let layout = [(GuestAddress(0), MIB)];
    let src = source(&layout, 17);
    let plain = snapshot_of(&src, 0);
    let with_table = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    let mut produced = vec![
        lazy::restore_lazy::<()>(&tmp()).unwrap_err(),
        lazy::restore_lazy_with::<(), _>(&plain, LazyOptions::new().verify(Verify::ChunkTable), |_, b| b)
            .unwrap_err(),
        lazy::write_chunk_table(&plain, 3).unwrap_err(),
    ];
    let damaged = snapshot_of(&src, 0);
    damaged.write_all_at(b"garbage!", snapshot::read_info(&damaged).unwrap().file_len).unwrap();
    produced.push(lazy::restore_lazy::<()>(&damaged).unwrap_err());
    // A shared mapping of a regular file cannot be registered for missing faults.
    let backing = tmp();
    backing.set_len(MIB as u64).unwrap();
    let fo = guestmem::mmap::FileOffset::new(backing, 0);
    produced.push(
        lazy::restore_lazy_with::<(), _>(&with_table, LazyOptions::new(), |_, b| {
            b.backing(Backing::File { file: fo.clone(), shared: true })
        })
        .unwrap_err(),
    );
    produced.push(
        lazy::restore_lazy_with::<(), _>(&with_table, LazyOptions::new(), |_, b| {
            b.protection(guestmem::sys::Protection::NONE)
        })
        .unwrap_err(),
    );
    let bad = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    corrupt(&bad, 0x10);
    produced.push(lazy::restore_lazy::<()>(&bad).unwrap().wait_complete(None).unwrap_err());
    let (_mem, fd, regions) = lazy::prepare_handover::<(), _>(&with_table, |_, b| b).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    uffd::send_handover(&a, &fd, &regions).unwrap();
    let other = snapshot_of(&source(&[(GuestAddress(0), 2 * MIB)], 18), 0);
    produced.push(
        uffd::serve_handover(uffd::receive_handover(&b).unwrap(), &other, LazyOptions::new()).unwrap_err(),
    );
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Snapshot",
            "ChunkTableMissing",
            "InvalidChunkSize",
            "InvalidChunkTable",
            "Register",
            "Memory",
            "Failed",
            "Handover",
        ],
        true,
    );

    // HandoverError: every variant.
    let hname = |e: &HandoverError| match e {
        HandoverError::Io { .. } => "Io",
        HandoverError::FdCount(_) => "FdCount",
        HandoverError::NotUffd(_) => "NotUffd",
        HandoverError::Invalid { .. } => "Invalid",
        HandoverError::LayoutMismatch { .. } => "LayoutMismatch",
    };
    let mut hproduced = Vec::new();
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    hproduced.push(uffd::receive_handover(&b).unwrap_err());
    let msg = uffd::encode_handover(fd.features(), &regions);
    let null = std::fs::File::open("/dev/null").unwrap();
    for fds in [vec![], vec![std::os::fd::AsFd::as_fd(&null)]] {
        let (a, b) = UnixStream::pair().unwrap();
        guestmem::sys::socket::send_with_fds(std::os::fd::AsFd::as_fd(&a), &msg, &fds).unwrap();
        hproduced.push(uffd::receive_handover(&b).unwrap_err());
    }
    hproduced.push(uffd::send_handover(&UnixStream::pair().unwrap().0, &fd, &[]).unwrap_err());
    let (a, b) = UnixStream::pair().unwrap();
    uffd::send_handover(&a, &fd, &regions).unwrap();
    match uffd::serve_handover(uffd::receive_handover(&b).unwrap(), &other, LazyOptions::new()).unwrap_err() {
        LazyError::Handover(e) => hproduced.push(e),
        e => panic!("{e}"),
    }
    common::assert_every_variant(
        &hproduced,
        hname,
        &["Io", "FdCount", "NotUffd", "Invalid", "LayoutMismatch"],
        true,
    );
}

/// Runs as the child of `kvm_guest_access_to_a_poisoned_bad_chunk_exits`: restores a snapshot
/// with a corrupt chunk, bad chunks poisoned, and lets a guest write there.
#[test]
fn poisoned_chunk_child_process() {
    if std::env::var("GUESTMEM_POISON_CHILD").is_err() {
        return;
    }
    let mut vm = TestVm::new().unwrap();
    let layout = [(GuestAddress(0), 4 * MIB)];
    let src = source(&layout, 20);
    let target = 3 * MIB as u64 + 0x100;
    let code = kvm_guest::write_program(&[(target, 0x77)]).unwrap();
    src.write_slice(&code, GuestAddress(CODE_GPA)).unwrap();
    let file = snapshot_of(&src, lazy::DEFAULT_CHUNK_SIZE);
    corrupt(&file, target + 8);
    // SAFETY: this process never touches the bad chunk from the host; only the guest does.
    let options = unsafe { LazyOptions::new().poison_bad_chunks() };
    let restore = lazy::restore_lazy_with::<(), _>(&file, options, |_, b| b).unwrap();
    let e = restore.wait_complete(Some(Duration::from_secs(10))).unwrap_err();
    eprintln!("restore: {e}");
    // SAFETY: the VM is dropped before `restore`.
    unsafe { add_slots(&mut vm, restore.memory()) };
    vm.add_vcpu().unwrap();
    kvm_guest::enter_real_mode(vm.vcpu(0).unwrap(), CODE_GPA).unwrap();
    let r = kvm_guest::run_to_hlt(vm.vcpu(0).unwrap());
    eprintln!("guest write to the poisoned chunk: {r:?}");
    assert!(matches!(r, Err(kvm_guest::GuestError::UnexpectedExit { .. })), "{r:?}");
    drop(vm);
}

#[test]
fn kvm_guest_access_to_a_poisoned_bad_chunk_exits() {
    if kvm_vm("kvm_guest_access_to_a_poisoned_bad_chunk_exits").is_none() {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["poisoned_chunk_child_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("GUESTMEM_POISON_CHILD", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the guest waited on the poisoned chunk instead of exiting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    // Either the vCPU exits to the VMM (an MMIO exit here, on kvm_pvm) or KVM raises a memory
    // error SIGBUS on the vCPU thread (other KVMs): the VMM sees it either way; never a wait,
    // never the corrupt bytes.
    use std::os::unix::process::ExitStatusExt;
    assert!(status.success() || status.signal() == Some(libc::SIGBUS), "{status:?}\n{err}");
    assert!(err.contains("chunk checksum mismatch"), "{err}");
    assert!(
        status.signal().is_some() || err.contains("guest write to the poisoned chunk: Err(UnexpectedExit"),
        "{err}"
    );
}
