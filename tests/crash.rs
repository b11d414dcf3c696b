//! Crash-proofing: a table of hostile calls, each run in a child process (this test binary,
//! re-executed for one case) so that a signal (SIGSEGV, SIGBUS, an abort) is caught and
//! reported as a failure instead of killing the test run. Every case must return its error,
//! and its child must exit normally.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmem::host;
use guestmem::mmap::{
    Backing, FileOffset, HugePageSize, MemfdOptions, MmapError, MmapRegionBuilder, NumaPolicy, Reservation,
};
use guestmem::sys::{MapFlags, MemPolicy, Protection};
use guestmem::volatile::ReadVolatileAt;
use guestmem::{
    Address, AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryError,
    GuestMemoryMmap, GuestRegionMmap, VolatileError, VolatileMemory,
};

const CASE_ENV: &str = "GUESTMEM_CRASH_CASE";
const PAGE: usize = 4096;

type Mem = GuestMemoryMmap<AtomicBitmap>;

fn b(size: usize) -> MmapRegionBuilder<()> {
    MmapRegionBuilder::new(size)
}

fn file(len: u64) -> std::fs::File {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

/// Two adjacent regions, a hole, a read-only region, and one ending at 2^64.
fn memory() -> Mem {
    let regions = vec![
        GuestRegionMmap::build(MmapRegionBuilder::new(0x10000), GuestAddress(0)).unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x10000), GuestAddress(0x10000)).unwrap(),
        GuestRegionMmap::build(
            MmapRegionBuilder::new(0x1000).protection(Protection::READ),
            GuestAddress(0x40000),
        )
        .unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x1000), GuestAddress(u64::MAX - 0xfff)).unwrap(),
    ];
    Mem::from_regions(regions).unwrap()
}

/// A hostile call: true when it returned the error it must return.
type Case = (&'static str, fn() -> bool);

fn cases() -> Vec<Case> {
    vec![
        // MmapRegionBuilder and friends.
        ("size 0", || matches!(b(0).build(), Err(MmapError::ZeroSize))),
        ("size not a page multiple", || matches!(b(PAGE + 1).build(), Err(MmapError::Unaligned { .. }))),
        ("size usize::MAX", || b(usize::MAX).build().is_err()),
        ("size near usize::MAX, page aligned", || b(usize::MAX & !(PAGE - 1)).build().is_err()),
        ("write-only protection", || {
            matches!(b(PAGE).protection(Protection::WRITE).build(), Err(MmapError::InvalidProtection(_)))
        }),
        ("no-access protection", || {
            matches!(b(PAGE).protection(Protection::NONE).build(), Err(MmapError::InvalidProtection(_)))
        }),
        ("alignment 3", || matches!(b(PAGE).align(3).build(), Err(MmapError::InvalidAlignment(3)))),
        ("guard pages overflow", || b(PAGE).guard_pages(usize::MAX).build().is_err()),
        ("alignment 2^63", || b(PAGE).align(1 << 63).build().is_err()),
        ("shared file shorter than the mapping", || {
            let f = FileOffset::new(file(PAGE as u64), 0);
            matches!(
                b(2 * PAGE).backing(Backing::File { file: f, shared: true }).build(),
                Err(MmapError::FileTooShort { .. })
            )
        }),
        ("private file shorter than the mapping", || {
            let f = FileOffset::new(file(PAGE as u64), PAGE as u64);
            matches!(
                b(PAGE).backing(Backing::File { file: f, shared: false }).build(),
                Err(MmapError::FileTooShort { .. })
            )
        }),
        ("empty file", || {
            let f = FileOffset::new(file(0), 0);
            matches!(
                b(PAGE).backing(Backing::File { file: f, shared: true }).build(),
                Err(MmapError::FileTooShort { .. })
            )
        }),
        ("unaligned file offset", || {
            let f = FileOffset::new(file(1 << 20), 7);
            matches!(
                b(PAGE).backing(Backing::File { file: f, shared: true }).build(),
                Err(MmapError::Unaligned { .. })
            )
        }),
        ("file offset + size overflows", || {
            let f = FileOffset::new(file(PAGE as u64), u64::MAX - 4095);
            matches!(
                b(2 * PAGE).backing(Backing::File { file: f, shared: true }).build(),
                Err(MmapError::Overflow { .. })
            )
        }),
        ("explicit huge pages on a regular file", || {
            let f = FileOffset::new(file(4 << 20), 0);
            let r = b(2 << 20)
                .backing(Backing::File { file: f, shared: true })
                .huge_pages(HugePageSize::Size2M)
                .build();
            matches!(r, Err(MmapError::InvalidOption { option: "huge_pages", .. }))
        }),
        ("KSM on shared memory", || {
            matches!(
                b(PAGE).backing(Backing::Anonymous { shared: true }).mergeable(true).build(),
                Err(MmapError::InvalidOption { .. })
            )
        }),
        ("memfd name too long", || {
            matches!(
                b(PAGE).backing(Backing::Memfd(MemfdOptions::new(&"n".repeat(500)))).build(),
                Err(MmapError::Os { .. })
            )
        }),
        ("memfd of a huge page size with a small size", || {
            let r = b(PAGE)
                .backing(Backing::Memfd(MemfdOptions::new("h")))
                .huge_pages(HugePageSize::Size2M)
                .build();
            matches!(r, Err(MmapError::Unaligned { .. }))
        }),
        ("NUMA node that does not exist", || {
            let r = b(PAGE).numa(NumaPolicy { mode: MemPolicy::Bind, nodes: vec![4000] }).build();
            matches!(r, Err(MmapError::OptionRefused { .. }))
        }),
        ("1 GiB huge pages beyond the pool", || {
            let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            free > 0 || b(1 << 30).huge_pages(HugePageSize::Size1G).build().is_err()
        }),
        ("placement overlapping a region in the reservation", || {
            let res = Reservation::new(1 << 20).unwrap();
            let _a = b(PAGE).in_reservation(res.clone(), 0).build().unwrap();
            matches!(b(PAGE).in_reservation(res, 0).build(), Err(MmapError::ReservationOverlap { .. }))
        }),
        ("placement past the reservation", || {
            let res = Reservation::new(1 << 20).unwrap();
            matches!(b(2 << 20).in_reservation(res, 0).build(), Err(MmapError::OutsideReservation { .. }))
        }),
        ("placement at offset usize::MAX", || {
            let res = Reservation::new(1 << 20).unwrap();
            b(PAGE).in_reservation(res, usize::MAX).build().is_err()
        }),
        ("reservation of size 0", || matches!(Reservation::new(0), Err(MmapError::ZeroSize))),
        ("build_raw of size 0", || {
            // SAFETY: a failing call adopts nothing.
            let r = unsafe {
                MmapRegionBuilder::<()>::build_raw(
                    std::ptr::null_mut(),
                    0,
                    Protection::READ,
                    MapFlags::PRIVATE,
                )
            };
            matches!(r, Err(MmapError::ZeroSize))
        }),
        ("build_raw at an unaligned address", || {
            // SAFETY: as above.
            let r = unsafe {
                MmapRegionBuilder::<()>::build_raw(7 as *mut u8, PAGE, Protection::READ, MapFlags::PRIVATE)
            };
            matches!(r, Err(MmapError::Unaligned { .. }))
        }),
        ("discard of a read-only region", || {
            let r = b(PAGE).protection(Protection::READ).build().unwrap();
            matches!(r.discard(0, PAGE), Err(MmapError::ReadOnly { .. }))
        }),
        ("discard past the end", || {
            matches!(b(PAGE).build().unwrap().discard(0, 2 * PAGE), Err(MmapError::OutOfRange { .. }))
        }),
        ("discard wrapping usize", || {
            matches!(b(PAGE).build().unwrap().discard(usize::MAX - 1, 4), Err(MmapError::OutOfRange { .. }))
        }),
        ("discard unaligned", || {
            matches!(b(2 * PAGE).build().unwrap().discard(1, PAGE), Err(MmapError::Unaligned { .. }))
        }),
        ("discard of 0 bytes", || matches!(b(PAGE).build().unwrap().discard(0, 0), Err(MmapError::ZeroSize))),
        ("resident_pages past the end", || b(PAGE).build().unwrap().resident_pages(0, usize::MAX).is_err()),
        // Regions and memory.
        ("region wrapping past 2^64", || {
            matches!(
                GuestRegionMmap::build(b(2 * PAGE), GuestAddress(u64::MAX - 100)),
                Err(GuestMemoryError::RegionOverflow { .. })
            )
        }),
        ("overlapping regions", || {
            matches!(
                GuestMemoryMmap::<()>::from_ranges(&[
                    (GuestAddress(0), 2 * PAGE),
                    (GuestAddress(PAGE as u64), PAGE)
                ]),
                Err(GuestMemoryError::RegionOverlap { .. })
            )
        }),
        ("remove a region that is not there", || {
            matches!(memory().remove_region(GuestAddress(5), 0x1000), Err(GuestMemoryError::NoRegionAt(_)))
        }),
        ("remove a region of another size", || {
            matches!(
                memory().remove_region(GuestAddress(0x10000), u64::MAX),
                Err(GuestMemoryError::RegionSizeMismatch { region_len: 0x10000, .. })
            )
        }),
        ("remove a region still in use by a snapshot", || {
            let atomic = GuestMemoryAtomic::new(memory());
            let held = atomic.memory();
            atomic.update(|m| m.remove_region(GuestAddress(0x10000), 0x10000).map(|(m, _)| m)).unwrap();
            // The old snapshot still reads and writes the removed region safely.
            held.write_obj(5u64, GuestAddress(0x10008)).is_ok()
                && held.read_obj::<u64>(GuestAddress(0x10008)).ok() == Some(5)
                && atomic.memory().read_obj::<u64>(GuestAddress(0x10008)).is_err()
        }),
        // Access by guest address.
        ("write to a read-only region", || {
            matches!(memory().write_obj(1u32, GuestAddress(0x40000)), Err(GuestMemoryError::ReadOnly { .. }))
        }),
        ("write_slice spanning into read-only memory", || {
            memory().write_slice(&[1; 32], GuestAddress(0x3fff0)).is_err()
        }),
        ("write into a hole", || {
            matches!(
                memory().write_obj(1u8, GuestAddress(0x30000)),
                Err(GuestMemoryError::InvalidGuestAddress(_))
            )
        }),
        ("write_slice running into a hole", || {
            matches!(
                memory().write_slice(&[1; 64], GuestAddress(0x1fff0)),
                Err(GuestMemoryError::InvalidRange { .. })
            )
        }),
        ("read past the last region", || memory().read_obj::<u64>(GuestAddress(0x40ffc)).is_err()),
        ("read wrapping past 2^64", || {
            matches!(
                memory().read_obj::<u64>(GuestAddress(u64::MAX - 3)),
                Err(GuestMemoryError::Overflow { .. })
            )
        }),
        ("write_slice wrapping past 2^64", || {
            memory().write_slice(&[0; 16], GuestAddress(u64::MAX - 7)).is_err()
        }),
        ("huge read_slice from address 0", || {
            let mut buf = vec![0u8; 1 << 20];
            memory().read_slice(&mut buf, GuestAddress(0)).is_err()
        }),
        ("misaligned atomic store", || {
            matches!(
                memory().store(1u64, GuestAddress(0x1004), Ordering::SeqCst),
                Err(GuestMemoryError::Access { source: VolatileError::Misaligned { .. }, .. })
            )
        }),
        ("misaligned atomic load", || memory().load::<u32>(GuestAddress(0x1002), Ordering::SeqCst).is_err()),
        ("atomic across two regions", || {
            memory().load::<u64>(GuestAddress(0xfffc), Ordering::SeqCst).is_err()
        }),
        ("atomic store to read-only memory", || {
            memory().store(1u32, GuestAddress(0x40000), Ordering::SeqCst).is_err()
        }),
        ("single slice across two regions", || {
            matches!(
                memory().get_slice(GuestAddress(0xfff0), 32),
                Err(GuestMemoryError::NotContiguous { .. })
            )
        }),
        ("host address in a hole", || memory().get_host_address(GuestAddress(0x30000)).is_err()),
        ("zero-length access in a hole (touches nothing: Ok, as in vm-memory)", || {
            memory().read_slice(&mut [], GuestAddress(0x30000)).is_ok()
                && memory().write(&[1], GuestAddress(0x30000)).is_err()
        }),
        ("read from a file into read-only memory", || {
            let m = memory();
            let f = file(PAGE as u64);
            let s = m.get_slice(GuestAddress(0x40000), 16).unwrap();
            matches!(f.read_volatile_at(&s, 0), Err(VolatileError::ReadOnly { .. }))
                && m.read_exact_volatile_from(GuestAddress(0x40000), &mut &[1u8; 16][..], 16).is_err()
        }),
        ("read_exact from a short source", || {
            matches!(
                memory().read_exact_volatile_from(GuestAddress(0), &mut &[1u8; 3][..], 8),
                Err(GuestMemoryError::PartialBuffer { .. })
            )
        }),
        // Volatile slices and refs.
        ("subslice overflowing usize", || {
            let r = b(PAGE).build().unwrap();
            matches!(r.get_slice(usize::MAX, 2), Err(VolatileError::Overflow { .. }))
        }),
        ("array ref too big", || {
            let r = b(PAGE).build().unwrap();
            matches!(r.get_array_ref::<u64>(0, usize::MAX), Err(VolatileError::TooBig { .. }))
        }),
        ("misaligned atomic ref", || {
            let r = b(PAGE).build().unwrap();
            r.get_atomic_ref::<std::sync::atomic::AtomicU64>(4).is_err()
        }),
        ("atomic ref store on read-only memory", || {
            let r = b(PAGE).protection(Protection::READ).build().unwrap();
            let a = r.get_atomic_ref::<std::sync::atomic::AtomicU32>(0).unwrap();
            matches!(a.store(1, Ordering::SeqCst), Err(VolatileError::ReadOnly { .. }))
        }),
        ("typed copy into read-only memory", || {
            let r = b(PAGE).protection(Protection::READ).build().unwrap();
            r.as_volatile_slice().copy_from(&[1u64; 4]).is_err()
        }),
        ("offset past the end of a slice", || {
            b(PAGE).build().unwrap().as_volatile_slice().offset(PAGE + 1).is_err()
        }),
        // Dirty tracking.
        ("mark dirty outside memory", || memory().mark_dirty(GuestAddress(0x30000), 8).is_err()),
        ("restore dirty ranges outside memory", || {
            memory().restore_dirty_ranges(&[(GuestAddress(0x30000), 8)]).is_err()
        }),
        ("take dirty words into a short buffer", || {
            let m = memory();
            m.regions()[0].bitmap().take_dirty_words(&mut [0u64; 0]).is_err()
        }),
        ("merge more words than the bitmap has", || {
            memory().regions()[0].bitmap().merge_words(&[1; 1000]).is_err()
        }),
        ("bitmap of page size 0", || AtomicBitmap::new(PAGE, 0).is_err()),
        // Addresses and host utilities.
        ("alignment that is not a power of two", || GuestAddress(5).align_up(6).is_err()),
        ("host query of address 0", || host::query(std::ptr::null()).is_err()),
        ("lock guard over unmapped memory", || host::LockGuard::new(std::ptr::null(), PAGE).is_err()),
        ("protect guard at an unaligned address", || {
            // SAFETY: the call fails on the unaligned address before changing anything.
            unsafe { host::ProtectGuard::new(3 as *mut u8, PAGE, Protection::READ) }.is_err()
        }),
        ("hotplug of an overlapping region", || {
            let m = memory();
            let r =
                Arc::new(GuestRegionMmap::build(MmapRegionBuilder::new(PAGE), GuestAddress(0x8000)).unwrap());
            m.insert_region(r).is_err()
        }),
    ]
}

/// The child side: when this binary is started for one case, run it and exit with 0 (the
/// call returned its error), 1 (it returned something else).
#[test]
fn case_runner() {
    let Ok(index) = std::env::var(CASE_ENV) else { return };
    let index: usize = index.parse().unwrap();
    let (_, case) = cases()[index];
    std::process::exit(if case() { 0 } else { 1 });
}

#[test]
fn hostile_calls_return_errors_and_never_crash() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let names: Vec<&str> = cases.iter().map(|(name, _)| *name).collect();
    common::run_cases_in_children(&names, "case_runner", CASE_ENV);
}
