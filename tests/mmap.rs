//! `MmapRegion` backings and options, each checked where the kernel shows it: smaps VmFlags
//! and counters, /proc/self/maps, memfd seals, mincore, the file's bytes and blocks.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;

use guestmem::host::{self, smaps};
use guestmem::mmap::{
    Backing, FileOffset, HugePageSize, Lock, MemfdOptions, MmapError, MmapRegion, MmapRegionBuilder,
    NumaPolicy, Populate, Reservation,
};
use guestmem::sys::{self, MapFlags, MemPolicy, Protection, Seals};
use guestmem::{Bytes, VolatileError, VolatileMemory};

const MIB: usize = 1 << 20;

type Region = MmapRegion<()>;

fn builder(size: usize) -> MmapRegionBuilder<()> {
    MmapRegionBuilder::new(size)
}

fn tempfile(len: u64) -> std::fs::File {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

fn flags_of(r: &Region) -> Vec<String> {
    smaps(r.as_ptr()).unwrap().vm_flags
}

fn has_flag(r: &Region, flag: &str) -> bool {
    smaps(r.as_ptr()).unwrap().has_flag(flag)
}

/// Allocated bytes of a file (st_blocks * 512).
fn allocated(f: &std::fs::File) -> u64 {
    sys::fstat(f.as_fd()).unwrap().blocks_512 * 512
}

#[test]
fn anonymous_private_defaults() {
    let r = builder(4 * MIB).build().unwrap();
    assert_eq!(r.size(), 4 * MIB);
    assert_eq!(r.protection(), Protection::READ_WRITE);
    assert!(r.flags().contains(MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE));
    assert!(r.owned() && !r.is_hugetlbfs() && r.file_offset().is_none());
    assert_eq!(r.page_size(), host::page_size());
    let s = smaps(r.as_ptr()).unwrap();
    // The kernel may merge our area with an identical neighbour: it contains the region.
    let start = r.as_ptr() as usize;
    assert!(s.area.range.start <= start && s.area.range.end >= start + 4 * MIB, "{:?}", s.area.range);
    assert!(s.has_flag("rd") && s.has_flag("wr") && !s.has_flag("sh"), "{:?}", s.vm_flags);
    assert!(s.has_flag("nr"), "MAP_NORESERVE shows as nr: {:?}", s.vm_flags);
    r.as_volatile_slice().write_obj(7u64, 8).unwrap();
    assert_eq!(r.as_volatile_slice().read_obj::<u64>(8).unwrap(), 7);
    assert_eq!(r.resident_pages(0, 4 * MIB).unwrap(), 1);
    let addr = r.as_ptr();
    drop(r);
    assert!(matches!(host::query(addr), Err(host::HostError::Unmapped { .. })));
}

#[test]
fn discard_private_anonymous_frees_and_zeroes() {
    let r = builder(MIB).populate(Populate::Now).build().unwrap();
    let pages = MIB / host::page_size();
    assert_eq!(r.resident_pages(0, MIB).unwrap(), pages);
    r.as_volatile_slice().fill(0xab).unwrap();
    r.discard(0, MIB / 2).unwrap();
    assert_eq!(r.resident_pages(0, MIB).unwrap(), pages / 2);
    let s = r.as_volatile_slice();
    assert_eq!(s.read_obj::<u64>(0).unwrap(), 0);
    assert_eq!(s.read_obj::<u8>(MIB / 2).unwrap(), 0xab);
}

#[test]
fn shared_anonymous_discard_removes() {
    let r = builder(MIB).backing(Backing::Anonymous { shared: true }).build().unwrap();
    assert!(has_flag(&r, "sh"));
    let s = r.as_volatile_slice();
    s.fill(1).unwrap();
    assert_eq!(r.resident_pages(0, MIB).unwrap(), MIB / host::page_size());
    r.discard(4096, 8192).unwrap();
    // Checked before reading: shmem allocates a page even on a read fault.
    assert_eq!(r.resident_pages(4096, 8192).unwrap(), 0);
    assert_eq!(s.read_obj::<u8>(4096).unwrap(), 0);
    assert_eq!(s.read_obj::<u8>(4096 * 3).unwrap(), 1);
}

#[test]
fn shared_file_writes_through_and_discard_punches_holes() {
    let mut f = tempfile(0);
    f.write_all(&vec![0x11u8; 3 * MIB]).unwrap();
    f.sync_all().unwrap();
    let before = allocated(&f);
    let fo = FileOffset::new(f.try_clone().unwrap(), MIB as u64);
    let r = builder(2 * MIB).backing(Backing::File { file: fo, shared: true }).build().unwrap();
    assert_eq!(r.file_offset().unwrap().start(), MIB as u64);
    let s = r.as_volatile_slice();
    assert_eq!(s.read_obj::<u8>(0).unwrap(), 0x11);
    s.write_slice(b"through", 0x10).unwrap();
    let mut got = [0u8; 7];
    f.seek(SeekFrom::Start(MIB as u64 + 0x10)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"through");
    r.discard(0, MIB).unwrap();
    assert_eq!(s.read_obj::<u64>(0x10).unwrap(), 0);
    assert!(allocated(&f) <= before - MIB as u64, "{} -> {}", before, allocated(&f));
    f.seek(SeekFrom::Start(MIB as u64)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(got, [0; 7]);
}

#[test]
fn private_file_never_changes_the_file_and_discard_does_not_bring_it_back() {
    let mut f = tempfile(0);
    f.write_all(&vec![0x22u8; MIB]).unwrap();
    let fo = FileOffset::new(f.try_clone().unwrap(), 0);
    let r = builder(MIB).backing(Backing::File { file: fo, shared: false }).build().unwrap();
    let s = r.as_volatile_slice();
    s.write_obj(0x33u8, 0).unwrap();
    assert_eq!(s.read_obj::<u8>(1).unwrap(), 0x22);
    r.discard(0, 2 * host::page_size()).unwrap();
    // Zeros, not the file's 0x22 (what MADV_DONTNEED would give back).
    assert_eq!(s.read_obj::<u16>(0).unwrap(), 0);
    assert_eq!(s.read_obj::<u8>(2 * host::page_size()).unwrap(), 0x22);
    let mut first = [0u8; 2];
    f.rewind().unwrap();
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, [0x22, 0x22]);
}

#[test]
fn memfd_sealed_and_shared_fd() {
    let r = builder(2 * MIB)
        .backing(Backing::Memfd(MemfdOptions::new("guestmem-test").sealed(true)))
        .build()
        .unwrap();
    let fo = r.file_offset().unwrap();
    let seals = sys::fd::get_seals(fo.as_fd()).unwrap();
    assert!(seals.contains(Seals::SHRINK | Seals::GROW), "{seals:?}");
    assert_eq!(fo.seals().unwrap(), seals);
    // Even a duplicate of the descriptor cannot shrink it.
    let dup = std::fs::File::from(fo.as_fd().try_clone_to_owned().unwrap());
    assert_eq!(dup.set_len(MIB as u64).unwrap_err().raw_os_error(), Some(libc::EPERM));
    let area = host::query(r.as_ptr()).unwrap();
    assert!(area.shared);
    assert!(area.path.unwrap().to_string_lossy().starts_with("/memfd:guestmem-test"));
    // Another mapping of the same memfd sees our writes: the fd works for vhost-user.
    r.as_volatile_slice().write_obj(0x5566u16, 100).unwrap();
    let peer = builder(MIB).backing(Backing::File { file: fo.with_start(0), shared: true }).build().unwrap();
    assert_eq!(peer.as_volatile_slice().read_obj::<u16>(100).unwrap(), 0x5566);
    assert!(r.fds_overlap(&peer));
    let far = builder(MIB)
        .backing(Backing::File { file: fo.with_start(MIB as u64), shared: true })
        .build()
        .unwrap();
    assert!(!peer.fds_overlap(&far));
    assert!(r.fds_overlap(&far));
    let other =
        builder(MIB).backing(Backing::Memfd(MemfdOptions::new("other").sealed(false))).build().unwrap();
    assert!(!r.fds_overlap(&other));
    assert!(!r.fds_overlap(&builder(MIB).build().unwrap()));
    // An unsealed memfd (the explicit opt-out) cannot be sealed later either: F_SEAL_SEAL.
    assert!(sys::fd::get_seals(other.file_offset().unwrap().as_fd()).unwrap().contains(Seals::SEAL));
    // Discard punches a hole in the memfd.
    r.as_volatile_slice().fill(9).unwrap();
    r.discard(0, MIB).unwrap();
    assert_eq!(r.resident_pages(0, MIB).unwrap(), 0);
    assert_eq!(peer.as_volatile_slice().read_obj::<u16>(100).unwrap(), 0);
}

#[test]
fn guard_pages_surround_the_region() {
    let page = host::page_size();
    let r = builder(8 * page).guard_pages(2).build().unwrap();
    let start = r.as_ptr() as usize;
    let before = host::query((start - 2 * page) as *const u8).unwrap();
    let after = host::query((start + 8 * page) as *const u8).unwrap();
    assert_eq!(before.protection, Protection::NONE);
    assert_eq!(after.protection, Protection::NONE);
    assert_eq!(before.range.end, start);
    assert!(before.range.start <= start - 2 * page);
    assert_eq!(after.range.start, start + 8 * page);
    assert!(after.range.end >= start + 10 * page);
    assert_eq!(host::query(r.as_ptr()).unwrap().protection, Protection::READ_WRITE);
    drop(r);
    // The guards went with the region.
    assert!(
        host::query((start - 2 * page) as *const u8).is_err_and(|_| true) || {
            // Another mapping may have taken the address in between; then it is not our guard.
            host::query((start - 2 * page) as *const u8).unwrap().range.end != start
        }
    );
}

#[test]
fn alignment_and_transparent_huge_pages() {
    let r = builder(4 * MIB).align(2 * MIB).huge_pages(HugePageSize::Transparent).build().unwrap();
    assert_eq!(r.as_ptr() as usize % (2 * MIB), 0);
    assert!(has_flag(&r, "hg"), "{:?}", flags_of(&r));
    r.as_volatile_slice().fill(1).unwrap();
    let thp = smaps(r.as_ptr()).unwrap().anon_huge_pages_kb;
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[never]") {
        eprintln!("THP is off on this kernel; AnonHugePages not checked");
    } else {
        assert!(thp >= 2048, "AnonHugePages {thp} kB");
    }
}

#[test]
fn dump_fork_ksm_and_lock_flags() {
    let r = builder(MIB).dont_dump(true).dont_fork(true).mergeable(true).build().unwrap();
    let flags = flags_of(&r);
    for f in ["dd", "dc", "mg"] {
        assert!(flags.iter().any(|x| x == f), "{f} missing from {flags:?}");
    }
    assert!(!flags.iter().any(|x| x == "lo"));

    let locked = builder(MIB).lock(Lock::Now).build().unwrap();
    let s = smaps(locked.as_ptr()).unwrap();
    assert!(s.has_flag("lo"));
    assert_eq!(s.locked_kb as usize, MIB / 1024);

    let on_fault = builder(MIB).lock(Lock::OnFault).build().unwrap();
    let s = smaps(on_fault.as_ptr()).unwrap();
    assert!(s.has_flag("lo"));
    assert_eq!(s.locked_kb, 0);
    on_fault.as_volatile_slice().write_obj(1u8, 0).unwrap();
    assert_eq!(smaps(on_fault.as_ptr()).unwrap().locked_kb as usize, host::page_size() / 1024);
}

#[test]
fn populate_now_and_in_parallel() {
    let pages = 8 * MIB / host::page_size();
    let lazy = builder(8 * MIB).build().unwrap();
    assert_eq!(lazy.resident_pages(0, 8 * MIB).unwrap(), 0);
    let now = builder(8 * MIB).populate(Populate::Now).build().unwrap();
    assert_eq!(now.resident_pages(0, 8 * MIB).unwrap(), pages);
    for threads in [1, 3, 4, 64] {
        let par = builder(8 * MIB)
            .populate(Populate::Parallel(NonZeroUsize::new(threads).unwrap()))
            .build()
            .unwrap();
        assert_eq!(par.resident_pages(0, 8 * MIB).unwrap(), pages, "{threads} threads");
    }
    // Read-only memory is populated readable (POPULATE_WRITE would fail).
    let ro = builder(MIB).protection(Protection::READ).populate(Populate::Now).build().unwrap();
    assert!(ro.resident_pages(0, MIB).unwrap() > 0);
}

#[test]
fn numa_binding_is_applied() {
    let r = builder(MIB).numa(NumaPolicy { mode: MemPolicy::Bind, nodes: vec![0] }).build().unwrap();
    assert_eq!(sys::get_mempolicy(r.as_ptr()).unwrap(), (MemPolicy::Bind, vec![0]));
    let r = builder(MIB).numa(NumaPolicy { mode: MemPolicy::Interleave, nodes: vec![0] }).build().unwrap();
    assert_eq!(sys::get_mempolicy(r.as_ptr()).unwrap().0, MemPolicy::Interleave);
}

#[test]
fn read_only_region_refuses_writes_instead_of_faulting() {
    let r = builder(MIB).protection(Protection::READ).build().unwrap();
    let s = r.as_volatile_slice();
    assert!(matches!(s.write_obj(1u32, 0), Err(VolatileError::ReadOnly { offset: 0, len: 4 })));
    assert!(matches!(
        r.get_slice(64, 8).unwrap().write_slice(&[1; 8], 0),
        Err(VolatileError::ReadOnly { .. })
    ));
    assert_eq!(s.read_obj::<u32>(0).unwrap(), 0);
    assert!(matches!(r.discard(0, 4096), Err(MmapError::ReadOnly { offset: 0, len: 4096 })));
}

#[test]
fn build_raw_adopts_without_unmapping() {
    let len = 4 * host::page_size();
    // SAFETY: a new anonymous mapping.
    let p = unsafe {
        sys::mmap(
            std::ptr::null_mut(),
            len,
            Protection::READ_WRITE,
            MapFlags::PRIVATE | MapFlags::ANONYMOUS,
            None,
            0,
        )
    }
    .unwrap();
    // SAFETY: the mapping is valid until the munmap below, after the region is gone.
    let r = unsafe { MmapRegionBuilder::<()>::build_raw(p, len, Protection::READ_WRITE, MapFlags::PRIVATE) }
        .unwrap();
    assert!(!r.owned());
    r.as_volatile_slice().write_obj(5u8, 3).unwrap();
    drop(r);
    assert_eq!(host::query(p).unwrap().protection, Protection::READ_WRITE);
    // SAFETY: as above.
    let e = unsafe {
        MmapRegionBuilder::<()>::build_raw(p.wrapping_add(1), len, Protection::READ, MapFlags::PRIVATE)
    };
    assert!(matches!(e, Err(MmapError::Unaligned { what: "address", .. })));
    // SAFETY: a failing call adopts nothing.
    let e = unsafe { MmapRegionBuilder::<()>::build_raw(p, 0, Protection::READ, MapFlags::PRIVATE) };
    assert!(matches!(e, Err(MmapError::ZeroSize)));
    // SAFETY: as above.
    let e = unsafe { MmapRegionBuilder::<()>::build_raw(p, len, Protection::WRITE, MapFlags::PRIVATE) };
    assert!(matches!(e, Err(MmapError::InvalidProtection(_))));
    // SAFETY: as above.
    let e = unsafe {
        MmapRegionBuilder::<()>::build_raw(p, usize::MAX - 4095, Protection::READ, MapFlags::PRIVATE)
    };
    assert!(matches!(e, Err(MmapError::Overflow { .. })));
    // SAFETY: the region is gone.
    unsafe { sys::munmap(p, len).unwrap() };
}

#[test]
fn reservation_placement_and_release() {
    let res = Reservation::with_alignment(64 * MIB, 2 * MIB).unwrap();
    assert_eq!(res.as_ptr() as usize % (2 * MIB), 0);
    assert_eq!((res.len(), res.free_len(), res.is_empty()), (64 * MIB, 64 * MIB, false));
    let a = builder(4 * MIB).in_reservation(res.clone(), 0).build().unwrap();
    let b = builder(4 * MIB).guard_pages(1).in_reservation(res.clone(), 8 * MIB).build().unwrap();
    assert_eq!(a.as_ptr(), res.as_ptr());
    assert_eq!(b.as_ptr() as usize, res.as_ptr() as usize + 8 * MIB);
    assert_eq!(res.free_len(), 56 * MIB - 2 * host::page_size());
    // Between and around them the reservation is still PROT_NONE.
    assert_eq!(host::query(res.as_ptr().wrapping_add(6 * MIB)).unwrap().protection, Protection::NONE);
    // Overlaps (including b's guard page) and overruns are refused.
    let e = builder(MIB).in_reservation(res.clone(), 3 * MIB).build().unwrap_err();
    assert!(matches!(e, MmapError::ReservationOverlap { used_offset: 0, .. }), "{e}");
    let e = builder(MIB).in_reservation(res.clone(), 12 * MIB).build().unwrap_err();
    assert!(matches!(e, MmapError::ReservationOverlap { .. }), "{e}");
    let e = builder(MIB).in_reservation(res.clone(), 64 * MIB).build().unwrap_err();
    assert!(matches!(e, MmapError::OutsideReservation { .. }), "{e}");
    let e = builder(MIB).guard_pages(1).in_reservation(res.clone(), 0).build().unwrap_err();
    assert!(matches!(e, MmapError::OutsideReservation { .. }), "{e}");
    let e = builder(MIB).in_reservation(res.clone(), usize::MAX - 4095).build().unwrap_err();
    assert!(matches!(e, MmapError::Overflow { .. }), "{e}");
    let e = builder(MIB).in_reservation(res.clone(), 20 * MIB + 1).build().unwrap_err();
    assert!(matches!(e, MmapError::Unaligned { what: "address", .. }), "{e}");
    // Dropping gives the space back as PROT_NONE; it can be used again.
    let a_ptr = a.as_ptr();
    drop(a);
    assert_eq!(host::query(a_ptr).unwrap().protection, Protection::NONE);
    let again = builder(4 * MIB).in_reservation(res.clone(), 0).build().unwrap();
    again.as_volatile_slice().write_obj(1u8, 0).unwrap();
    // The reservation outlives every region placed in it.
    let res_ptr = res.as_ptr();
    drop(res);
    drop(b);
    assert_eq!(again.as_volatile_slice().read_obj::<u8>(0).unwrap(), 1);
    drop(again);
    assert!(host::query(res_ptr).map_or(true, |a| a.range.start != res_ptr as usize));
}

#[test]
fn validation_errors_name_their_numbers() {
    let page = host::page_size();
    let e = builder(0).build().unwrap_err();
    assert!(matches!(e, MmapError::ZeroSize), "{e}");
    let e = builder(page).protection(Protection::WRITE).build().unwrap_err();
    assert!(matches!(e, MmapError::InvalidProtection(_)), "{e}");
    let e = builder(page).align(3 * page).build().unwrap_err();
    assert!(matches!(e, MmapError::InvalidAlignment(a) if a == 3 * page), "{e}");
    let e = builder(page + 1).build().unwrap_err();
    assert!(matches!(e, MmapError::Unaligned { what: "size", value, .. } if value == page as u64 + 1), "{e}");
    assert!(e.to_string().contains("not a multiple of the page size"));

    // A file shorter than offset + size: the vm-memory SIGBUS case.
    let f = tempfile(MIB as u64);
    let e = builder(MIB)
        .backing(Backing::File { file: FileOffset::new(f.try_clone().unwrap(), page as u64), shared: true })
        .build()
        .unwrap_err();
    assert!(
        matches!(e, MmapError::FileTooShort { file_size, offset, size } if file_size == MIB as u64 && offset == page as u64 && size == MIB),
        "{e}"
    );
    let e = builder(MIB)
        .backing(Backing::File { file: FileOffset::new(f.try_clone().unwrap(), 100), shared: true })
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::Unaligned { what: "file offset", value: 100, .. }), "{e}");
    let e = builder(MIB)
        .backing(Backing::File {
            file: FileOffset::new(f.try_clone().unwrap(), u64::MAX - 4095),
            shared: false,
        })
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::Overflow { .. }), "{e}");
    let e = builder(MIB)
        .backing(Backing::File { file: FileOffset::new(f.try_clone().unwrap(), 0), shared: true })
        .huge_pages(HugePageSize::Size2M)
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "huge_pages", .. }), "{e}");
    let e = builder(MIB).backing(Backing::Anonymous { shared: true }).mergeable(true).build().unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "mergeable", .. }), "{e}");

    // A file opened write-only cannot be mapped: the kernel's refusal comes back as Mmap.
    let path = std::env::temp_dir().join(format!("guestmem-wo-{}", std::process::id()));
    let wo = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
    wo.set_len(MIB as u64).unwrap();
    std::fs::remove_file(&path).unwrap();
    let e = builder(MIB)
        .backing(Backing::File { file: FileOffset::new(wo, 0), shared: true })
        .build()
        .unwrap_err();
    assert!(
        matches!(e, MmapError::Mmap { size, ref source } if size == MIB && source.raw_os_error() == Some(libc::EACCES)),
        "{e}"
    );

    // A failing system call of the backing: a memfd name longer than the kernel allows.
    let e = builder(MIB).backing(Backing::Memfd(MemfdOptions::new(&"x".repeat(300)))).build().unwrap_err();
    assert!(matches!(e, MmapError::Os { op: "memfd_create", .. }), "{e}");

    // An option the kernel refuses: a NUMA node that does not exist.
    let e = builder(MIB).numa(NumaPolicy { mode: MemPolicy::Bind, nodes: vec![1000] }).build().unwrap_err();
    assert!(matches!(e, MmapError::OptionRefused { option: "numa", .. }), "{e}");

    // A character device that publishes no size (here /dev/zero) cannot be checked, so it is
    // refused rather than mapped at any length.
    let zero = std::fs::OpenOptions::new().read(true).write(true).open("/dev/zero").unwrap();
    let e = builder(MIB)
        .backing(Backing::File { file: FileOffset::new(zero, 0), shared: false })
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::UnsizedFile { kind: sys::fd::FileKind::CharDevice }), "{e}");
}

#[test]
fn range_checks_of_discard_and_residency() {
    let page = host::page_size();
    let r = builder(4 * page).build().unwrap();
    let e = r.discard(2 * page, 4 * page).unwrap_err();
    assert!(
        matches!(e, MmapError::OutOfRange { offset, len, size } if offset == 2 * page && len == 4 * page && size == 4 * page),
        "{e}"
    );
    assert!(matches!(r.discard(usize::MAX, 2), Err(MmapError::OutOfRange { .. })));
    assert!(matches!(r.discard(0, 0), Err(MmapError::ZeroSize)));
    assert!(matches!(r.discard(1, page), Err(MmapError::Unaligned { what: "offset", .. })));
    assert!(matches!(r.discard(0, 10), Err(MmapError::Unaligned { what: "length", .. })));
    assert!(matches!(r.resident_pages(page, 4 * page), Err(MmapError::OutOfRange { .. })));
    assert_eq!(r.resident_pages(10, 10).unwrap(), 0);

    // A memfd sealed against writes after it was mapped: the kernel refuses the hole punch,
    // and discard reports it.
    let fd = sys::memfd_create(c"sealed-later", sys::MemfdFlags::CLOEXEC | sys::MemfdFlags::ALLOW_SEALING)
        .unwrap();
    sys::fd::ftruncate(fd.as_fd(), 4 * page as u64).unwrap();
    let sealed = builder(4 * page)
        .backing(Backing::File { file: FileOffset::new(fd.into(), 0), shared: true })
        .build()
        .unwrap();
    sys::fd::add_seals(sealed.file_offset().unwrap().as_fd(), Seals::FUTURE_WRITE).unwrap();
    let e = sealed.discard(0, page).unwrap_err();
    assert!(matches!(e, MmapError::Discard { offset: 0, .. }), "{e}");
}

#[test]
fn anonymous_hugetlb_2m() {
    let Some(()) = common::need("hugetlb", "anonymous_hugetlb_2m", common::huge_pages(2)) else { return };
    let r = builder(4 * MIB).huge_pages(HugePageSize::Size2M).build().unwrap();
    assert!(r.is_hugetlbfs());
    assert_eq!(r.page_size(), 2 * MIB);
    assert!(r.flags().contains(MapFlags::HUGETLB) && !r.flags().contains(MapFlags::NORESERVE));
    assert_eq!(r.as_ptr() as usize % (2 * MIB), 0);
    r.as_volatile_slice().fill(3).unwrap();
    let s = smaps(r.as_ptr()).unwrap();
    assert_eq!(s.kernel_page_size_kb, 2048);
    assert_eq!(s.private_hugetlb_kb as usize, 4 * MIB / 1024);
    assert!(s.has_flag("ht"), "{:?}", s.vm_flags);
    // Sizes must be whole huge pages; THP and on-fault locking do not apply.
    let e = builder(3 * MIB).huge_pages(HugePageSize::Size2M).build().unwrap_err();
    assert!(
        matches!(e, MmapError::Unaligned { what: "size", page_size, .. } if page_size == 2 * MIB as u64),
        "{e}"
    );
    let e = builder(2 * MIB).huge_pages(HugePageSize::Size2M).lock(Lock::OnFault).build().unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "lock", .. }), "{e}");
    // Guard pages and alignment with huge pages.
    let g = builder(2 * MIB).huge_pages(HugePageSize::Size2M).guard_pages(1).build().unwrap();
    assert_eq!(g.as_ptr() as usize % (2 * MIB), 0);
    assert_eq!(host::query(g.as_ptr().wrapping_sub(4096)).unwrap().protection, Protection::NONE);
    g.as_volatile_slice().write_obj(1u64, 2 * MIB - 8).unwrap();
    // Discard of hugetlb memory is refused (it would give up the pool reservation); the memory
    // is untouched.
    let e = r.discard(0, 2 * MIB).unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "discard", .. }), "{e}");
    assert_eq!(r.as_volatile_slice().read_obj::<u8>(0).unwrap(), 3);
    assert!(matches!(r.discard(0, 4096), Err(MmapError::Unaligned { what: "length", .. })));
}

#[test]
fn huge_pages_beyond_the_pool_are_refused_not_faked() {
    // No 1 GiB pages are reserved here (CI reserves only 2 MiB ones): the kernel refuses and
    // the builder says which option, instead of falling back to small pages.
    let free_1g = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if free_1g > 0 {
        eprintln!("1 GiB huge pages are reserved on this machine; refusal not checked");
        return;
    }
    let e = builder(1 << 30).huge_pages(HugePageSize::Size1G).build().unwrap_err();
    assert!(matches!(e, MmapError::OptionRefused { option: "huge_pages", .. }), "{e}");
    let e = builder(1 << 30)
        .backing(Backing::Memfd(MemfdOptions::new("g")))
        .huge_pages(HugePageSize::Size1G)
        .build();
    assert!(matches!(e.unwrap_err(), MmapError::OptionRefused { option: "huge_pages", .. }));
}

#[test]
fn memfd_hugetlb() {
    let Some(()) = common::need("hugetlb", "memfd_hugetlb", common::huge_pages(2)) else { return };
    let r = builder(4 * MIB)
        .backing(Backing::Memfd(MemfdOptions::new("huge").sealed(true)))
        .huge_pages(HugePageSize::Size2M)
        .build()
        .unwrap();
    assert!(r.is_hugetlbfs());
    assert_eq!(r.page_size(), 2 * MIB);
    let fd = r.file_offset().unwrap().as_fd();
    assert!(sys::fstatfs(fd).unwrap().is_hugetlbfs());
    assert!(sys::fd::get_seals(fd).unwrap().contains(Seals::SHRINK | Seals::GROW));
    r.as_volatile_slice().fill(7).unwrap();
    // smaps counts a hugetlb page as shared only when several processes map it.
    let s = smaps(r.as_ptr()).unwrap();
    assert_eq!((s.shared_hugetlb_kb + s.private_hugetlb_kb) as usize, 4 * MIB / 1024);
    assert!(s.has_flag("sh") && s.has_flag("ht"), "{:?}", s.vm_flags);
    let e = r.discard(2 * MIB, 2 * MIB).unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "discard", .. }), "{e}");
    assert_eq!(r.as_volatile_slice().read_obj::<u8>(2 * MIB).unwrap(), 7);
    let e =
        builder(MIB).backing(Backing::Memfd(MemfdOptions::new("h"))).huge_pages(HugePageSize::Size2M).build();
    assert!(matches!(e.unwrap_err(), MmapError::Unaligned { what: "size", .. }));
}

#[test]
fn hugetlbfs_file_is_detected() {
    let Some(()) = common::need("hugetlb", "hugetlbfs_file_is_detected", common::huge_pages(2)) else {
        return;
    };
    let Some(dir) = common::need("hugetlb", "hugetlbfs_file_is_detected", common::hugetlbfs_dir()) else {
        return;
    };
    let hf = common::HugetlbfsFile::new(&dir, 4 * MIB as u64).unwrap();
    let fo = FileOffset::new(hf.file.try_clone().unwrap(), 2 * MIB as u64);
    // Nobody told the builder about huge pages: it reads the page size from the filesystem.
    let r = builder(2 * MIB).backing(Backing::File { file: fo.clone(), shared: true }).build().unwrap();
    assert!(r.is_hugetlbfs());
    assert_eq!(r.page_size(), 2 * MIB);
    r.as_volatile_slice().fill(5).unwrap();
    assert_eq!(smaps(r.as_ptr()).unwrap().kernel_page_size_kb, 2048);
    assert!(matches!(r.discard(0, 2 * MIB), Err(MmapError::InvalidOption { option: "discard", .. })));
    assert_eq!(r.as_volatile_slice().read_obj::<u8>(0).unwrap(), 5);
    // Offsets and sizes must be whole huge pages of that filesystem.
    let bad = FileOffset::new(hf.file.try_clone().unwrap(), 4096);
    let e = builder(2 * MIB).backing(Backing::File { file: bad, shared: true }).build().unwrap_err();
    assert!(matches!(e, MmapError::Unaligned { what: "file offset", .. }), "{e}");
    let e = builder(MIB).backing(Backing::File { file: fo.clone(), shared: true }).build().unwrap_err();
    assert!(matches!(e, MmapError::Unaligned { what: "size", .. }), "{e}");
    let e = builder(2 * MIB)
        .backing(Backing::File { file: fo.clone(), shared: true })
        .huge_pages(HugePageSize::Size1G)
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "huge_pages", .. }), "{e}");
    let e = builder(2 * MIB)
        .backing(Backing::File { file: fo, shared: true })
        .huge_pages(HugePageSize::Transparent)
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "huge_pages", .. }), "{e}");
    let e = builder(4 * MIB)
        .backing(Backing::File {
            file: FileOffset::new(hf.file.try_clone().unwrap(), 2 * MIB as u64),
            shared: true,
        })
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::FileTooShort { .. }), "{e}");
}

/// Persistent-memory flush (issue 13, part 5) on a regular file: the written pages are dirty in
/// the page tables until `flush` (an `msync(MS_SYNC)` here) writes them back and cleans them
/// (smaps' dirty counts drop to 0); a separate read of the file sees the data. Misaligned,
/// out-of-region and fileless flushes are errors; `MAP_SYNC` is refused on a file that is not
/// DAX, and for mappings it does not apply to.
#[test]
fn flush_writes_back_and_cleans_the_pages() {
    use guestmem::mmap::FlushMethod;
    let path = std::env::temp_dir().join(format!("guestmem-flush-{}", std::process::id()));
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(16 * 4096).unwrap();
    let r = builder(16 * 4096)
        .backing(Backing::File { file: FileOffset::new(file.try_clone().unwrap(), 0), shared: true })
        .build()
        .unwrap();
    r.as_volatile_slice().write_slice(&[0x5a; 8 * 4096], 4 * 4096).unwrap();
    // Pages only this process maps count as private, shared mapping or not.
    let dirty = |r: &guestmem::mmap::MmapRegion<()>| {
        let s = smaps(r.as_ptr()).unwrap();
        s.shared_dirty_kb + s.private_dirty_kb
    };
    assert_eq!(dirty(&r), 32);
    assert_eq!(r.flush_granule(), 4096);
    assert_eq!(r.flush(4 * 4096, 8 * 4096).unwrap(), FlushMethod::Msync);
    assert_eq!(dirty(&r), 0, "msync left dirty pages");
    let mut back = vec![0u8; 8 * 4096];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 4 * 4096).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    // Errors: misaligned, outside the region, empty, no file behind.
    assert!(matches!(r.flush(1, 4096), Err(MmapError::Unaligned { what: "offset", .. })));
    assert!(matches!(r.flush(0, 100), Err(MmapError::Unaligned { what: "length", .. })));
    assert!(matches!(r.flush(8 * 4096, 16 * 4096), Err(MmapError::OutOfRange { .. })));
    assert!(matches!(r.flush(0, 0), Err(MmapError::ZeroSize)));
    let anon = builder(4096).build().unwrap();
    assert!(matches!(anon.flush(0, 4096), Err(MmapError::InvalidOption { option: "flush", .. })));
    // MAP_SYNC: refused by the kernel on a file that is not DAX, and by guestmem where it
    // does not apply.
    let e = builder(4096)
        .backing(Backing::File { file: FileOffset::new(file.try_clone().unwrap(), 0), shared: true })
        .dax_sync(true)
        .build()
        .unwrap_err();
    assert!(matches!(e, MmapError::OptionRefused { option: "dax_sync", .. }), "{e}");
    let e = builder(4096).dax_sync(true).build().unwrap_err();
    assert!(matches!(e, MmapError::InvalidOption { option: "dax_sync", .. }), "{e}");
}
