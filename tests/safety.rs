//! Regression tests for the safety promises, one per hazard found by hostile programs that use
//! only the safe API (issue 9). Each reproduces the original defect's mechanism — in a child
//! process where the old outcome was a signal or an abort, with the peak RSS measured where it
//! was an outsized allocation — and checks that the outcome is now an error or the safe result.
//!
//! Where the other items are tested:
//! - KVM slot lifetimes, ownership, log buffers, rings (items 1, 2, 6, 9, 10, 14, 19, 20):
//!   `tests/kvm.rs` (`dropping_kvm_slots_deletes_every_slot`,
//!   `slot_ownership_is_exclusive_and_log_buffers_cannot_overflow`,
//!   `add_vcpu_maps_only_real_rings`, `ring_bookkeeping_survives_failures_and_hotplug`,
//!   `slot_exhaustion_ioctl_and_bitmap_errors`, `ring_rules_are_errors`);
//! - typed KVM descriptors (item 4): `sys::kvm` unit tests;
//! - sealed atomic traits (item 3) and `HostBuffer` slices that cannot cross threads (item 8):
//!   `compile_fail` doctests on `AtomicInteger`, `AtomicAccess` and the `volatile` module;
//! - file aliases and region-offset errors (item 20): `tests/errors.rs`, `tests/memory.rs`.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use guestmem::bitmap::DirtyHarvest;
use guestmem::checksum::Checksum;
use guestmem::mmap::{Backing, FileOffset, HugePageSize, Lock, MemfdOptions, MmapError, MmapRegionBuilder};
use guestmem::snapshot::{self, SnapshotError};
use guestmem::sys::{self, Protection};
use guestmem::{
    AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, VolatileError, VolatileSlice,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// Held by the tests that use the hugetlb pool: one of them drains it.
static HUGETLB_POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn hugetlb_pool() -> std::sync::MutexGuard<'static, ()> {
    HUGETLB_POOL.lock().unwrap_or_else(|p| p.into_inner())
}

fn tmp() -> std::fs::File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

/// Item 3: atomics on read-only memory. Loads of every ordering work (a `Relaxed` load and a
/// fence: never a write to read-only memory), and every read-modify-write is refused before it
/// touches the memory; in a child, since a stray write would be a SIGSEGV.
#[test]
fn atomics_on_read_only_memory_never_write() {
    common::in_child("atomics_on_read_only_memory_never_write", || {
        let rom = MmapRegionBuilder::<()>::new(PAGE).protection(Protection::READ).build().unwrap();
        let s = rom.as_volatile_slice();
        let a = s.get_atomic_ref::<AtomicU64>(8).unwrap();
        assert!(!a.is_writable());
        for order in [Ordering::Relaxed, Ordering::Acquire, Ordering::SeqCst] {
            assert_eq!(a.load(order), 0);
        }
        assert!(matches!(a.store(1, Ordering::SeqCst), Err(VolatileError::ReadOnly { .. })));
        assert!(matches!(a.swap(1, Ordering::SeqCst), Err(VolatileError::ReadOnly { .. })));
        assert!(matches!(a.fetch_add(1, Ordering::SeqCst), Err(VolatileError::ReadOnly { .. })));
        assert!(matches!(
            a.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst),
            Err(VolatileError::ReadOnly { .. })
        ));
        assert_eq!(s.load::<u64>(8, Ordering::Acquire).unwrap(), 0);
        assert!(s.store(1u64, 8, Ordering::Release).is_err());
    });
}

/// Item 5: no `&File` comes out of a region (a `compile_fail` doctest on `FileOffset`), so our
/// own API offers no way to shrink a mapped file; a memfd is sealed against shrinking by
/// default, so even a duplicate of its fd cannot.
#[test]
fn mapped_files_cannot_be_shrunk_through_the_api() {
    common::in_child("mapped_files_cannot_be_shrunk_through_the_api", || {
        let r = MmapRegionBuilder::<()>::new(MIB)
            .backing(Backing::Memfd(MemfdOptions::new("ram")))
            .build()
            .unwrap();
        let fo = r.file_offset().unwrap();
        let dup = std::fs::File::from(fo.as_fd().try_clone_to_owned().unwrap());
        assert_eq!(dup.set_len(0).unwrap_err().raw_os_error(), Some(libc::EPERM));
        r.as_volatile_slice().write_obj(1u64, MIB - 8).unwrap();
        assert_eq!(r.as_volatile_slice().read_obj::<u64>(MIB - 8).unwrap(), 1);
    });
}

/// A loop device over a new temporary file of `len` bytes, detached when dropped.
struct LoopDevice {
    dev: std::fs::File,
}

impl LoopDevice {
    fn new(len: u64) -> Result<LoopDevice, String> {
        const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
        const LOOP_SET_FD: libc::c_ulong = 0x4C00;
        let control =
            std::fs::File::open("/dev/loop-control").map_err(|e| format!("/dev/loop-control: {e}"))?;
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&control), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(format!("LOOP_CTL_GET_FREE: {}", std::io::Error::last_os_error()));
        }
        let backing = tmp();
        backing.set_len(len).map_err(|e| e.to_string())?;
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/loop{n}"))
            .map_err(|e| format!("/dev/loop{n}: {e}"))?;
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor by value.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dev),
                LOOP_SET_FD as _,
                std::os::fd::AsRawFd::as_raw_fd(&backing),
            )
        };
        if r < 0 {
            return Err(format!("LOOP_SET_FD: {}", std::io::Error::last_os_error()));
        }
        Ok(LoopDevice { dev })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
        // SAFETY: LOOP_CLR_FD takes no argument; it detaches the device once it is closed.
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&self.dev), LOOP_CLR_FD as _) };
    }
}

/// Item 5: a block device is mapped no further than its size (it used to skip the size check
/// and map past the device's end, where a touch raises SIGBUS): a loop device of 1 MiB maps up
/// to its end, and one page more is refused.
#[test]
fn block_devices_are_sized() {
    let Some(lo) = common::need("blockdev", "block_devices_are_sized", LoopDevice::new(MIB as u64)) else {
        return;
    };
    common::in_child("block_devices_are_sized", || {
        assert_eq!(sys::fd::mappable_size(lo.dev.as_fd()).unwrap(), Some(MIB as u64));
        let dev = std::sync::Arc::new(lo.dev.try_clone().unwrap());
        let map = |offset: u64, len: usize| {
            MmapRegionBuilder::<()>::new(len)
                .backing(Backing::File { file: FileOffset::from_arc(dev.clone(), offset), shared: true })
                .build()
        };
        let r = map(MIB as u64 - PAGE as u64, PAGE).unwrap();
        r.as_volatile_slice().write_obj(5u8, PAGE - 1).unwrap();
        assert_eq!(r.as_volatile_slice().read_obj::<u8>(PAGE - 1).unwrap(), 5);
        let e = map(MIB as u64 - PAGE as u64, 2 * PAGE).unwrap_err();
        assert!(matches!(e, MmapError::FileTooShort { file_size, .. } if file_size == MIB as u64), "{e}");
    });
}

/// The 64-byte header of a snapshot file claiming `count` regions, a header area of
/// `header_len` bytes and a file of `file_len`, with `table` after it and a valid checksum.
fn forged_header(flags: u32, count: u32, header_len: u64, file_len: u64, table: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..8].copy_from_slice(&snapshot::MAGIC);
    h[8..12].copy_from_slice(&snapshot::VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..20].copy_from_slice(&count.to_le_bytes());
    h[20..24].copy_from_slice(&4096u32.to_le_bytes());
    h[24..32].copy_from_slice(&header_len.to_le_bytes());
    h[32..40].copy_from_slice(&file_len.to_le_bytes());
    h.extend_from_slice(table);
    let mut area = h.clone();
    area.resize(header_len.min(1 << 20) as usize, 0);
    let mut c = Checksum::new();
    c.update(&area[..40]);
    c.zeros(8);
    c.update(&area[48..]);
    // The rest of a huge claimed area is a hole: zeros.
    c.zeros(header_len.saturating_sub(area.len() as u64));
    h[40..48].copy_from_slice(&c.finish().to_le_bytes());
    h
}

/// Items 7 and 16: a forged header (valid checksum) claiming a 1 GiB header area for no
/// region is refused from the fixed header and table alone: the area is not read, and the peak
/// RSS stays small (it used to read and allocate the whole gigabyte first).
#[test]
fn forged_header_area_is_refused_before_it_is_read() {
    common::in_child("forged_header_area_is_refused_before_it_is_read", || {
        let f = tmp();
        f.set_len(2 << 30).unwrap();
        f.write_all_at(&forged_header(0, 0, 1 << 30, 2 << 30, &[]), 0).unwrap();
        let before = common::peak_rss();
        let e = snapshot::read_info(&f).unwrap_err();
        assert!(matches!(e, SnapshotError::InvalidLayout { .. }), "{e}");
        assert!(snapshot::verify(&f).is_err());
        assert!(snapshot::restore_mapped::<AtomicBitmap>(&f).is_err());
        let grown = common::peak_rss().saturating_sub(before);
        assert!(grown < 16 << 20, "reading a forged header grew the peak RSS by {grown} bytes");
    });
}

/// Item 7: a mapped restore of a (sparse) snapshot describing 15 TiB of guest memory: the
/// bitmap for it (480 MiB) is allocated lazily and fallibly, so the peak RSS stays small
/// whether the mapping succeeds or the kernel refuses it (it used to allocate and zero the
/// bitmap before mapping anything, and abort under a memory limit).
#[test]
fn mapped_restore_of_a_huge_sparse_snapshot_allocates_nothing_up_front() {
    common::in_child("mapped_restore_of_a_huge_sparse_snapshot_allocates_nothing_up_front", || {
        let fd = sys::memfd_create(c"huge-snapshot", sys::MemfdFlags::CLOEXEC).unwrap();
        let f = std::fs::File::from(fd);
        let len: u64 = 15 << 40;
        let mut entry = Vec::new();
        for v in [0u64, len, 4096, 4096, 0, 0] {
            entry.extend_from_slice(&v.to_le_bytes());
        }
        f.set_len(4096 + len).unwrap();
        f.write_all_at(&forged_header(0, 1, 64 + 48, 4096 + len, &entry), 0).unwrap();
        let info = snapshot::read_info(&f).unwrap();
        assert_eq!(info.regions[0].len, len);
        let before = common::peak_rss();
        let restored = snapshot::restore_mapped::<AtomicBitmap>(&f);
        let grown = common::peak_rss().saturating_sub(before);
        assert!(grown < 64 << 20, "the restore grew the peak RSS by {grown} bytes");
        if let Ok(mem) = restored {
            assert_eq!(mem.read_obj::<u64>(GuestAddress(len - 8)).unwrap(), 0);
        }
    });
}

/// Item 11: discarding part of a private file mapping (a restored snapshot) maps anonymous
/// memory over it; the new range keeps the region's policies (dump and fork exclusion, lock),
/// which a fresh mapping would otherwise lose.
#[test]
fn private_file_discard_keeps_the_policies() {
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * PAGE)]).unwrap();
    src.write_slice(&[7; 4 * PAGE], GuestAddress(0)).unwrap();
    let file = tmp();
    snapshot::dump(&src, &file).unwrap();
    let mem = snapshot::restore_mapped_with::<(), _>(&file, |_, b| {
        b.dont_dump(true).dont_fork(true).lock(Lock::Now)
    })
    .unwrap();
    let region = &mem.regions()[0];
    region.discard(PAGE, PAGE).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE as u64)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
    let page = region.as_ptr().wrapping_add(PAGE);
    let smaps = guestmem::host::smaps(page).unwrap();
    for flag in ["dd", "dc", "lo"] {
        assert!(smaps.has_flag(flag), "the discarded range lost {flag}: {:?}", smaps.vm_flags);
    }
    assert_eq!(smaps.area.range.start, page as usize, "the range is its own anonymous mapping");
    assert!(smaps.area.path.is_none());
}

/// Item 12: arithmetic that overflowed (a panic in debug builds, which these tests are) is an
/// error, and a region implementation that reports length 0 makes lookups fail, not panic.
#[test]
fn edge_arithmetic_is_an_error_not_a_panic() {
    let e = MmapRegionBuilder::<()>::new(usize::MAX & !(PAGE - 1)).align(1 << 63).build().unwrap_err();
    assert!(matches!(e, MmapError::Overflow { .. } | MmapError::Mmap { .. }), "{e}");
    let r = MmapRegionBuilder::<()>::new(PAGE).build().unwrap();
    assert_eq!(r.resident_pages(0, PAGE).unwrap(), 0);

    /// A region of length 0 (an implementation guestmem does not control).
    struct Empty;
    impl GuestMemoryRegion for Empty {
        type B = ();
        fn len(&self) -> u64 {
            0
        }
        fn start_addr(&self) -> GuestAddress {
            GuestAddress(0x1000)
        }
        fn protection(&self) -> Protection {
            Protection::READ_WRITE
        }
        fn bitmap(&self) -> &() {
            &()
        }
        fn file_offset(&self) -> Option<&FileOffset> {
            None
        }
        fn host_ptr(&self) -> *mut u8 {
            std::ptr::null_mut()
        }
        fn get_slice(
            &self,
            offset: MemoryRegionAddress,
            count: usize,
        ) -> Result<VolatileSlice<'_, ()>, GuestMemoryError> {
            Err(GuestMemoryError::InvalidRegionOffset {
                base: self.start_addr(),
                offset,
                len: count,
                size: 0,
            })
        }
    }
    /// Memory whose translation hands back the empty region.
    struct Broken(Empty);
    impl GuestMemory for Broken {
        type R = Empty;
        fn num_regions(&self) -> usize {
            1
        }
        fn iter(&self) -> impl Iterator<Item = &Empty> {
            std::iter::once(&self.0)
        }
        fn to_region_addr(&self, _addr: GuestAddress) -> Option<(&Empty, MemoryRegionAddress)> {
            Some((&self.0, MemoryRegionAddress(0)))
        }
    }
    let m = Broken(Empty);
    assert!(m.get_slice(GuestAddress(0x1000), 8).is_err());
    assert!(m.get_slices(GuestAddress(0x1000), 8).all(|s| s.is_err()));
    assert!(m.read_obj::<u64>(GuestAddress(0x1000)).is_err());
    assert!(m.write_slice(&[1; 16], GuestAddress(0x1000)).is_err());
    assert!(!m.check_range(GuestAddress(0x1000), 8));
}

/// Item 13: a region at a guest address not aligned like its host mapping (which a hostile
/// vhost-user frontend could choose) is refused: 8-byte-aligned guest accesses would otherwise
/// be misaligned on the host, fail as atomics and tear as plain reads.
#[test]
fn misaligned_placement_is_refused() {
    for base in [0x1_0000_0004u64, 0x1001, 0x800] {
        let map = MmapRegionBuilder::<()>::new(PAGE).build().unwrap();
        let e = GuestRegionMmap::new(map, GuestAddress(base)).unwrap_err();
        assert!(
            matches!(e, GuestMemoryError::UnalignedRegion { base: b, align: 4096 } if b == GuestAddress(base)),
            "{e}"
        );
    }
}

/// Item 14: a harvest of memory where one region is untracked fails before it takes anything:
/// the tracked regions keep their dirty bits (they used to be cleared and half reported).
#[test]
fn a_harvest_is_all_or_nothing() {
    let tracked =
        GuestRegionMmap::build(MmapRegionBuilder::<Option<AtomicBitmap>>::new(16 * PAGE), GuestAddress(0))
            .unwrap();
    let untracked = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(16 * PAGE).dirty_tracking(false),
        GuestAddress(1 << 20),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![tracked, untracked]).unwrap();
    mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
    mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
    let mut reported = Vec::new();
    assert!(mem.take_dirty_ranges(|a, l| reported.push((a, l))).is_err());
    assert!(reported.is_empty());
    assert_eq!(mem.regions()[0].bitmap().dirty_page_count().unwrap(), 2, "the tracked bits were taken");
    assert!(snapshot::dump_dirty(&mem, &tmp()).is_err());
    assert_eq!(mem.regions()[0].bitmap().dirty_page_count().unwrap(), 2);
}

/// Item 15: a read from a socket into memory whose next region is read-only stops before the
/// read-only region and returns the count: the bytes it could not store are still in the socket
/// (they used to be read, and the count lost in a ReadOnly error).
#[test]
fn reads_stop_before_read_only_memory() {
    let rw = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(PAGE), GuestAddress(0)).unwrap();
    let ro = GuestRegionMmap::build(
        MmapRegionBuilder::<()>::new(PAGE).protection(Protection::READ),
        GuestAddress(PAGE as u64),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![rw, ro]).unwrap();
    let (mut a, mut b) = UnixStream::pair().unwrap();
    a.write_all(&[9u8; 16]).unwrap();
    let n = mem.read_volatile_from(GuestAddress(PAGE as u64 - 8), &mut b, 16).unwrap();
    assert_eq!(n, 8);
    b.set_nonblocking(true).unwrap();
    let mut rest = [0u8; 16];
    assert_eq!(b.read(&mut rest).unwrap(), 8, "the other 8 bytes stay in the socket");
    let e = mem.read_volatile_from(GuestAddress(PAGE as u64), &mut b, 16).unwrap_err();
    assert!(matches!(e, GuestMemoryError::ReadOnly { .. }), "{e}");
}

/// Item 17: a region of an absurd size (a 2^56-byte sparse memfd, as a hostile vhost-user
/// frontend could hand over) with an `AtomicBitmap` is an error; the bitmap allocation used to
/// abort the process ("memory allocation of 2199023255552 bytes failed").
#[test]
fn absurd_sizes_are_errors_not_aborts() {
    common::in_child("absurd_sizes_are_errors_not_aborts", || {
        let fd = sys::memfd_create(c"absurd", sys::MemfdFlags::CLOEXEC).unwrap();
        let len = 1u64 << 56;
        sys::fd::ftruncate(fd.as_fd(), len).unwrap();
        let e = MmapRegionBuilder::<AtomicBitmap>::new(len as usize)
            .backing(Backing::File { file: FileOffset::new(fd.into(), 0), shared: true })
            .build()
            .unwrap_err();
        assert!(matches!(e, MmapError::Bitmap(_) | MmapError::Mmap { .. }), "{e}");
    });
}

/// Item 18 (and 11): discarding hugetlb memory is refused, so the page keeps its pool
/// reservation: after the pool is drained, writing to the page still works (it used to be
/// punched out, and the next write with an empty pool raised SIGBUS).
#[test]
fn hugetlb_memory_survives_a_drained_pool() {
    let Some(()) = common::need("hugetlb", "hugetlb_memory_survives_a_drained_pool", common::huge_pages(2))
    else {
        return;
    };
    let _pool = hugetlb_pool();
    common::in_child("hugetlb_memory_survives_a_drained_pool", || {
        let r = MmapRegionBuilder::<()>::new(2 * MIB)
            .backing(Backing::Memfd(MemfdOptions::new("huge")))
            .huge_pages(HugePageSize::Size2M)
            .build()
            .unwrap();
        r.as_volatile_slice().fill(1).unwrap();
        assert!(matches!(r.discard(0, 2 * MIB), Err(MmapError::InvalidOption { option: "discard", .. })));
        // Drain the pool: map and fault in every free huge page.
        let free = common::free_huge_pages_2m();
        let drain = (free > 0).then(|| {
            MmapRegionBuilder::<()>::new(free * 2 * MIB)
                .huge_pages(HugePageSize::Size2M)
                .populate(guestmem::mmap::Populate::Now)
                .build()
                .unwrap()
        });
        assert_eq!(common::free_huge_pages_2m(), 0);
        r.as_volatile_slice().fill(2).unwrap();
        assert_eq!(r.as_volatile_slice().read_obj::<u8>(MIB).unwrap(), 2);
        drop(drain);
    });
}

/// Item 20: a dump into the very file that backs the memory (re-snapshotting a memory restored
/// by mapping into its own snapshot) is refused before anything is written: it would truncate
/// the file under the mapping first.
#[test]
fn a_dump_never_overwrites_its_own_memory() {
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
    src.write_obj(0xfeedu64, GuestAddress(0x3000)).unwrap();
    let file = tmp();
    snapshot::dump(&src, &file).unwrap();
    let before = std::fs::read(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file))).unwrap();
    let mem = snapshot::restore_mapped::<()>(&file).unwrap();
    let e = snapshot::dump(&mem, &file).unwrap_err();
    assert!(matches!(e, SnapshotError::OutputIsInput { .. }), "{e}");
    // A second descriptor of the same file is the same file.
    let again = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))
        .unwrap();
    assert!(matches!(snapshot::dump(&mem, &again), Err(SnapshotError::OutputIsInput { .. })));
    let after = std::fs::read(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file))).unwrap();
    assert_eq!(before, after);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0xfeed);
}

/// Item 5, what the library cannot prevent: another holder of an unsealed memfd (here a
/// duplicate of its descriptor; another process would do the same) truncates it under the
/// mapping. The next access used to be a SIGBUS that killed the process; now the fault is
/// recovered: the lost pages read as zeros, writes land in memory no file holds any more, the
/// region says so, and a dump of it is refused.
#[test]
fn a_file_truncated_under_the_mapping_is_recovered() {
    common::in_child("a_file_truncated_under_the_mapping_is_recovered", || {
        let region = GuestRegionMmap::build(
            MmapRegionBuilder::<AtomicBitmap>::new(16 * PAGE)
                .backing(Backing::Memfd(MemfdOptions::new("shrinkable").sealed(false))),
            GuestAddress(0),
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        mem.write_slice(&[3; 16 * PAGE], GuestAddress(0)).unwrap();
        let fo = mem.regions()[0].file_offset().unwrap();
        let other = std::fs::File::from(fo.as_fd().try_clone_to_owned().unwrap());
        other.set_len(4 * PAGE as u64).unwrap();
        let before = guestmem::host::sigbus::recovered_faults();
        // Below the new end: intact. Past it: zeros, not a crash.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE as u64)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(8 * PAGE as u64)).unwrap(), 0);
        mem.write_obj(7u64, GuestAddress(12 * PAGE as u64)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(12 * PAGE as u64)).unwrap(), 7);
        assert!(mem.regions()[0].backing_lost());
        assert!(guestmem::host::sigbus::recovered_faults() > before);
        let e = snapshot::dump(&mem, &tmp()).unwrap_err();
        assert!(matches!(e, SnapshotError::BackingLost { guest_addr: GuestAddress(0) }), "{e}");
        // The recovered range is one anonymous mapping, from the file's new end to the region's.
        let area = guestmem::host::query(mem.regions()[0].as_ptr().wrapping_add(4 * PAGE)).unwrap();
        assert_eq!(area.range.len(), 12 * PAGE);
        assert!(area.path.is_none());
    });
}

/// The same for a memory restored by mapping a snapshot, whose file is truncated after: the
/// memory reads zeros past the new end instead of crashing the process.
#[test]
fn a_snapshot_truncated_under_a_mapped_restore_is_recovered() {
    common::in_child("a_snapshot_truncated_under_a_mapped_restore_is_recovered", || {
        let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE)]).unwrap();
        src.write_slice(&[5; 64 * PAGE], GuestAddress(0)).unwrap();
        let file = tmp();
        snapshot::dump(&src, &file).unwrap();
        let mem = snapshot::restore_mapped::<()>(&file).unwrap();
        file.set_len(16 * PAGE as u64).unwrap();
        let mut buf = vec![0u8; 64 * PAGE];
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf[..8 * PAGE].iter().all(|&b| b == 5));
        assert!(buf[32 * PAGE..].iter().all(|&b| b == 0));
        assert!(mem.regions()[0].backing_lost());
    });
}

/// A SIGBUS that is not guestmem's (a file mapped by other code, truncated) still takes the
/// process's own disposition: guestmem's handler, installed by a file-backed region, hands it on
/// and the default action kills the process, as if guestmem were not there.
#[test]
fn other_sigbus_faults_are_not_swallowed() {
    common::in_child_killed_by("other_sigbus_faults_are_not_swallowed", libc::SIGBUS, || {
        let _ours = MmapRegionBuilder::<()>::new(PAGE)
            .backing(Backing::Memfd(MemfdOptions::new("ours")))
            .build()
            .unwrap();
        assert!(guestmem::host::sigbus::is_installed());
        let f = tmp();
        f.set_len(2 * PAGE as u64).unwrap();
        // SAFETY: a new shared mapping of our own file, no MAP_FIXED.
        let p = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                Protection::READ,
                sys::MapFlags::SHARED,
                Some(f.as_fd()),
                0,
            )
        }
        .unwrap();
        f.set_len(0).unwrap();
        // SAFETY: deliberately touching the mapping past the file's new end: the SIGBUS must kill us.
        let _ = unsafe { p.add(PAGE).read_volatile() };
        unreachable!("the access past the end of a file not guestmem's did not fault");
    });
}

/// A region built without SIGBUS recovery keeps the process's own disposition for its faults.
#[test]
fn sigbus_recovery_can_be_declined() {
    common::in_child_killed_by("sigbus_recovery_can_be_declined", libc::SIGBUS, || {
        let r = MmapRegionBuilder::<()>::new(4 * PAGE)
            .backing(Backing::Memfd(MemfdOptions::new("plain").sealed(false)))
            .sigbus_recovery(false)
            .build()
            .unwrap();
        let other = std::fs::File::from(r.file_offset().unwrap().as_fd().try_clone_to_owned().unwrap());
        other.set_len(0).unwrap();
        let _ = r.as_volatile_slice().read_obj::<u8>(3 * PAGE);
        unreachable!("a region that declined recovery recovered");
    });
}

/// Hugetlb memory truncated under the mapping is recovered the same way, in huge pages.
#[test]
fn hugetlb_memory_truncated_under_the_mapping_is_recovered() {
    let Some(()) = common::need(
        "hugetlb",
        "hugetlb_memory_truncated_under_the_mapping_is_recovered",
        common::huge_pages(2),
    ) else {
        return;
    };
    let _pool = hugetlb_pool();
    common::in_child("hugetlb_memory_truncated_under_the_mapping_is_recovered", || {
        let r = MmapRegionBuilder::<()>::new(4 * MIB)
            .backing(Backing::Memfd(MemfdOptions::new("huge-shrinkable").sealed(false)))
            .huge_pages(HugePageSize::Size2M)
            .build()
            .unwrap();
        r.as_volatile_slice().fill(1).unwrap();
        let other = std::fs::File::from(r.file_offset().unwrap().as_fd().try_clone_to_owned().unwrap());
        other.set_len(2 * MIB as u64).unwrap();
        assert_eq!(r.as_volatile_slice().read_obj::<u8>(MIB).unwrap(), 1);
        assert_eq!(r.as_volatile_slice().read_obj::<u8>(3 * MIB).unwrap(), 0);
        assert!(r.backing_lost());
    });
}
