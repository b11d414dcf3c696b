//! Real KVM guests: a real-mode guest writes a chosen set of pages while the host writes
//! another set through the API; after `sync_dirty_log` (or reaping the dirty ring) and a
//! harvest, the reported set is exactly the union, round after round, on anonymous, memfd and
//! hugetlb memory, with and without manual clear, and with the dirty ring on two vCPUs.

#![cfg(feature = "kvm")]

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::kvm_guest::{self, GuestError, TestVm};
use guestmem::kvm::{KvmError, KvmSlots};
use guestmem::mmap::{Backing, HugePageSize, MemfdOptions, MmapRegionBuilder};
use guestmem::sys::Protection;

use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;
type Slots = KvmSlots<AtomicBitmap>;

const PAGE: u64 = 4096;
const CODE_GPA: u64 = 0x1000;
const GIB: u64 = 1 << 30;

fn vm(test: &str) -> Option<TestVm> {
    common::need("kvm", test, kvm_guest::kvm_available())?;
    Some(TestVm::new().unwrap())
}

/// `KvmSlots` on the test VM (it keeps its own duplicate of the VM descriptor).
fn slots_on(vm: &TestVm, log_dirty: bool) -> Slots {
    Slots::new(vm.vm_fd(), log_dirty).unwrap()
}

fn harvest(mem: &Mem) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    mem.take_dirty_ranges(|a, l| set.extend(a.0 / PAGE..(a.0 + l).div_ceil(PAGE))).unwrap();
    set
}

/// `n` distinct pages in `[start, start + len)`, never the code page, chosen by `seed`.
fn pick(seed: u64, n: usize, start: u64, len: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut set = BTreeSet::new();
    while set.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (start + (x % len)) / PAGE;
        if page != CODE_GPA / PAGE {
            set.insert(page);
        }
    }
    set.into_iter().collect()
}

/// The guest's program, loaded through the API (a host write, so its pages are host-dirty),
/// run on vCPU `vcpu`; returns the pages the code occupies.
fn guest_writes(
    vm: &mut TestVm,
    vcpu: usize,
    mem: &Mem,
    code_gpa: u64,
    pages: &[u64],
    value: u8,
) -> BTreeSet<u64> {
    let writes: Vec<(u64, u8)> = pages.iter().map(|p| (p * PAGE + (p % 61) * 8, value)).collect();
    let mut code_pages = BTreeSet::new();
    let vcpu = vm.vcpu(vcpu).unwrap();
    kvm_guest::run_writes(vcpu, code_gpa, &writes, &mut |gpa, code| {
        code_pages.extend(gpa / PAGE..(gpa + code.len() as u64).div_ceil(PAGE));
        mem.write_slice(code, GuestAddress(gpa)).map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    })
    .unwrap();
    for &(gpa, v) in &writes {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(), v, "guest write at {gpa:#x}");
    }
    code_pages
}

/// Rounds of host + guest writes; after each, the collected set is exactly their union.
fn rounds(
    vm: &mut TestVm,
    slots: &mut Slots,
    mem: &Mem,
    areas: &[(u64, u64)],
    collect: impl Fn(&mut Slots) -> usize,
) {
    for round in 0..4u64 {
        let mut expect = BTreeSet::new();
        for (i, &(start, len)) in areas.iter().enumerate() {
            for p in pick(round * 100 + i as u64, 5, start, len) {
                mem.write_obj(round, GuestAddress(p * PAGE + 16)).unwrap();
                expect.insert(p);
            }
        }
        let guest: Vec<u64> = areas
            .iter()
            .enumerate()
            .flat_map(|(i, &(s, l))| pick(round * 100 + 50 + i as u64, 7, s, l))
            .collect();
        expect.extend(guest_writes(vm, 0, mem, CODE_GPA, &guest, round as u8 + 1));
        expect.extend(guest.iter().copied());
        let reported = collect(slots);
        assert!(
            reported >= guest.len(),
            "round {round}: KVM reported {reported} pages for {} guest pages",
            guest.len()
        );
        assert_eq!(harvest(mem), expect, "round {round}");
    }
    // A round with no writes at all reports nothing.
    collect(slots);
    assert_eq!(harvest(mem), BTreeSet::new());
}

fn anon(base: u64, size: usize) -> GuestRegionMmap<AtomicBitmap> {
    GuestRegionMmap::build(MmapRegionBuilder::new(size), GuestAddress(base)).unwrap()
}

#[test]
fn dirty_log_union_on_anonymous_memory() {
    let Some(mut vm) = vm("dirty_log_union_on_anonymous_memory") else { return };
    vm.add_vcpu().unwrap();
    let mem = Mem::from_regions(vec![anon(0, 8 << 20), anon(GIB, 4 << 20)]).unwrap();
    let mut slots = slots_on(&vm, true);
    slots.register(&mem).unwrap();
    assert_eq!(slots.slots().count(), 2);
    rounds(&mut vm, &mut slots, &mem, &[(0, 8 << 20), (GIB, 4 << 20)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn dirty_log_union_on_memfd_memory() {
    let Some(mut vm) = vm("dirty_log_union_on_memfd_memory") else { return };
    vm.add_vcpu().unwrap();
    let memfd = GuestRegionMmap::build(
        MmapRegionBuilder::new(8 << 20).backing(Backing::Memfd(MemfdOptions::new("kvm-test").sealed(true))),
        GuestAddress(0),
    )
    .unwrap();
    let mem = Mem::from_regions(vec![memfd, anon(3 * GIB, 2 << 20)]).unwrap();
    let mut slots = slots_on(&vm, true);
    slots.register(&mem).unwrap();
    rounds(&mut vm, &mut slots, &mem, &[(0, 8 << 20), (3 * GIB, 2 << 20)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn dirty_log_union_on_hugetlb_memory() {
    let Some(mut vm) = vm("dirty_log_union_on_hugetlb_memory") else { return };
    let Some(()) = common::need("hugetlb", "dirty_log_union_on_hugetlb_memory", common::huge_pages(4)) else {
        return;
    };
    vm.add_vcpu().unwrap();
    let memfd = GuestRegionMmap::build(
        MmapRegionBuilder::new(4 << 20)
            .backing(Backing::Memfd(MemfdOptions::new("kvm-huge")))
            .huge_pages(HugePageSize::Size2M),
        GuestAddress(0),
    )
    .unwrap();
    let anon_huge = GuestRegionMmap::build(
        MmapRegionBuilder::new(4 << 20).huge_pages(HugePageSize::Size2M),
        GuestAddress(GIB),
    )
    .unwrap();
    let mem = Mem::from_regions(vec![memfd, anon_huge]).unwrap();
    let mut slots = slots_on(&vm, true);
    slots.register(&mem).unwrap();
    // KVM logs hugetlb memory at 4 KiB granularity once dirty logging is on.
    rounds(&mut vm, &mut slots, &mem, &[(0, 4 << 20), (GIB, 4 << 20)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn dirty_log_with_manual_clear() {
    let Some(mut vm) = vm("dirty_log_with_manual_clear") else { return };
    let mut slots = slots_on(&vm, true);
    slots.enable_manual_protect(false).unwrap();
    vm.add_vcpu().unwrap();
    let mem = Mem::from_regions(vec![anon(0, 8 << 20), anon(GIB, 4 << 20)]).unwrap();
    slots.register(&mem).unwrap();
    // Without the clears, each round would also report the previous rounds' guest pages.
    rounds(&mut vm, &mut slots, &mem, &[(0, 8 << 20), (GIB, 4 << 20)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn manual_clear_initially_set_reports_everything_once() {
    let Some(mut vm) = vm("manual_clear_initially_set_reports_everything_once") else { return };
    let mut slots = slots_on(&vm, true);
    slots.enable_manual_protect(true).unwrap();
    vm.add_vcpu().unwrap();
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), anon(GIB, 256 << 10)]).unwrap();
    slots.register(&mem).unwrap();
    assert_eq!(slots.sync_dirty_log().unwrap(), (1280 << 10) / 4096);
    let all: BTreeSet<u64> = (0..256).chain(GIB / PAGE..GIB / PAGE + 64).collect();
    assert_eq!(harvest(&mem), all);
    // Then the usual rounds: the initial bits were cleared after they were merged.
    rounds(&mut vm, &mut slots, &mem, &[(0, 1 << 20), (GIB, 256 << 10)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn dirty_ring_union_on_two_vcpus() {
    let Some(mut vm) = vm("dirty_ring_union_on_two_vcpus") else { return };
    let mut slots = slots_on(&vm, true);
    assert!(matches!(slots.enable_dirty_ring(3000), Err(KvmError::InvalidRingSize { size: 3000, .. })));
    slots.enable_dirty_ring(1 << 16).unwrap();
    assert!(matches!(slots.enable_manual_protect(true), Err(KvmError::InitiallySetWithRing)));
    for i in 0..2 {
        let idx = vm.add_vcpu().unwrap();
        slots.add_vcpu(&vm.vcpus()[idx]).unwrap();
        assert_eq!(idx, i);
    }
    let mem = Mem::from_regions(vec![anon(0, 8 << 20), anon(2 * GIB, 4 << 20)]).unwrap();
    slots.register(&mem).unwrap();
    assert!(matches!(slots.sync_dirty_log(), Err(KvmError::RingEnabled)));
    for round in 0..4u64 {
        let mut expect = BTreeSet::new();
        for p in pick(round, 6, 2 * GIB, 4 << 20) {
            mem.write_obj(round, GuestAddress(p * PAGE)).unwrap();
            expect.insert(p);
        }
        // Two vCPUs writing different pages at the same time, each from its own code page.
        let a = pick(round + 10, 9, 0x10_0000, 7 << 20);
        let b = pick(round + 20, 9, 2 * GIB, 4 << 20);
        let (v0, v1) = vm.vcpus_mut().split_at_mut(1);
        let code_pages = std::sync::Mutex::new(BTreeSet::new());
        std::thread::scope(|s| {
            for (vcpu, pages, code) in [(&mut v0[0], &a, 0x2000u64), (&mut v1[0], &b, 0x4000u64)] {
                let (mem, code_pages) = (&mem, &code_pages);
                s.spawn(move || {
                    let writes: Vec<(u64, u8)> = pages.iter().map(|p| (p * PAGE + 8, 0xa5)).collect();
                    kvm_guest::run_writes(vcpu, code, &writes, &mut |gpa, c| {
                        code_pages.lock().unwrap().extend(gpa / PAGE..(gpa + c.len() as u64).div_ceil(PAGE));
                        mem.write_slice(c, GuestAddress(gpa))
                            .map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
                    })
                    .unwrap();
                });
            }
        });
        expect.extend(code_pages.into_inner().unwrap());
        expect.extend(a.iter().chain(&b).copied());
        let reaped = slots.reap_dirty_rings().unwrap();
        assert!(reaped >= a.len() + b.len(), "round {round}: {reaped} ring entries");
        assert_eq!(harvest(&mem), expect, "round {round}");
    }
    slots.reap_dirty_rings().unwrap();
    assert_eq!(harvest(&mem), BTreeSet::new());
}

#[test]
fn ring_rules_are_errors() {
    let Some(vm) = vm("ring_rules_are_errors") else { return };
    let mut slots = slots_on(&vm, true);
    assert!(matches!(slots.reap_dirty_rings(), Err(KvmError::RingNotEnabled)));
    assert!(matches!(slots.add_vcpu(vm.vm_fd()), Err(KvmError::RingNotEnabled)));
    slots.enable_manual_protect(true).unwrap();
    assert!(matches!(slots.enable_dirty_ring(1 << 16), Err(KvmError::InitiallySetWithRing)));
    // A ring after a vCPU exists is refused by KVM, and the error says what KVM refuses.
    let Some(mut late_vm) = self::vm("ring_rules_are_errors") else { return };
    late_vm.add_vcpu().unwrap();
    let mut late = slots_on(&late_vm, true);
    let e = late.enable_dirty_ring(1 << 16).unwrap_err();
    assert!(matches!(e, KvmError::RingRefused { size: 65536, .. }), "{e}");
    assert!(e.to_string().contains("a vCPU exists already"), "{e}");
    // A second enable is "already enabled", not "after a vCPU" (issue 9, item 19).
    let ring_vm = TestVm::new().unwrap();
    let mut ring = slots_on(&ring_vm, true);
    ring.enable_dirty_ring(1 << 16).unwrap();
    assert!(matches!(ring.enable_dirty_ring(1 << 16), Err(KvmError::RingAlreadyEnabled)));
    // Mapping a ring from something that is not a vCPU is refused before any mapping.
    let null = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(ring.add_vcpu(&null), Err(KvmError::NotAVcpu(_))));
    assert!(matches!(ring.add_vcpu(ring_vm.vm_fd()), Err(KvmError::NotAVcpu(_))));
    // Without dirty logging there is nothing for a ring to report.
    let quiet_vm = TestVm::new().unwrap();
    assert!(matches!(slots_on(&quiet_vm, false).enable_dirty_ring(1 << 16), Err(KvmError::NotLogging)));
    drop(vm);
}

#[test]
fn hotplug_and_read_only_slots() {
    let Some(mut vm) = vm("hotplug_and_read_only_slots") else { return };
    vm.add_vcpu().unwrap();
    let mem = Mem::from_regions(vec![anon(0, 4 << 20)]).unwrap();
    let mut slots = slots_on(&vm, true);
    slots.register(&mem).unwrap();
    // Plug in a region: it gets a slot and the guest's writes to it are tracked.
    let plugged = mem.insert_region(std::sync::Arc::new(anon(GIB, 1 << 20))).unwrap();
    slots.register(&plugged).unwrap();
    assert_eq!(slots.slots().map(|s| s.1).collect::<Vec<_>>(), vec![GuestAddress(0), GuestAddress(GIB)]);
    let code = guest_writes(&mut vm, 0, &plugged, CODE_GPA, &[GIB / PAGE + 3], 9);
    slots.sync_dirty_log().unwrap();
    let mut expect: BTreeSet<u64> = code;
    expect.insert(GIB / PAGE + 3);
    assert_eq!(harvest(&plugged), expect);
    // Unplug it: its slot goes, and a guest write there no longer reaches memory.
    let (unplugged, _) = plugged.remove_region(GuestAddress(GIB), 1 << 20).unwrap();
    slots.register(&unplugged).unwrap();
    assert_eq!(slots.slots().count(), 1);
    let r = kvm_guest::run_writes(vm.vcpu(0).unwrap(), CODE_GPA, &[(GIB + 8, 1)], &mut |gpa, c| {
        unplugged
            .write_slice(c, GuestAddress(gpa))
            .map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    });
    assert!(matches!(r, Err(GuestError::UnexpectedExit { .. })), "{r:?}");

    // A read-only region is a read-only slot: a guest write exits to the VMM instead.
    let Some(mut vm2) = self::vm("hotplug_and_read_only_slots") else { return };
    vm2.add_vcpu().unwrap();
    let rom = GuestRegionMmap::build(
        MmapRegionBuilder::new(1 << 20).protection(Protection::READ),
        GuestAddress(GIB),
    )
    .unwrap();
    let mem2 = Mem::from_regions(vec![anon(0, 1 << 20), rom]).unwrap();
    let mut slots2 = slots_on(&vm2, true).with_slot_range(10..20);
    slots2.register(&mem2).unwrap();
    assert_eq!(slots2.slots().map(|s| s.0).collect::<Vec<_>>(), vec![10, 11]);
    let r = kvm_guest::run_writes(vm2.vcpu(0).unwrap(), CODE_GPA, &[(GIB + 8, 1)], &mut |gpa, c| {
        mem2.write_slice(c, GuestAddress(gpa)).map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    });
    assert!(matches!(r, Err(GuestError::UnexpectedExit { .. })), "{r:?}");
    assert_eq!(mem2.read_obj::<u8>(GuestAddress(GIB + 8)).unwrap(), 0);
}

#[test]
fn slot_exhaustion_ioctl_and_bitmap_errors() {
    let Some(mut vm) = vm("slot_exhaustion_ioctl_and_bitmap_errors") else { return };
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), anon(GIB, 1 << 20)]).unwrap();
    let mut few = slots_on(&vm, true).with_slot_range(5..6);
    let e = few.register(&mem).unwrap_err();
    assert!(matches!(e, KvmError::NoFreeSlot(1)), "{e}");
    assert_eq!(few.slots().count(), 0, "nothing registered when a number is missing");
    drop(few);
    // A guest range the VMM registered itself: KVM refuses the overlap (EEXIST), the error
    // names the slot.
    vm.add_ram(200, GIB, 1 << 20, 0).unwrap();
    let mut slots = slots_on(&vm, true).with_slot_range(0..100);
    let e = slots.register(&mem).unwrap_err();
    assert!(matches!(e, KvmError::Ioctl { op: "KVM_SET_USER_MEMORY_REGION", slot: Some(_), .. }), "{e}");
    // Not a VM at all.
    let null = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(KvmSlots::<AtomicBitmap>::new(&null, true), Err(KvmError::NotAVm(_))));
    // A region with tracking off cannot take KVM's bits: refused when it is registered, before
    // any slot exists (issue 9, item 10: never a log fetched, and cleared, that cannot merge).
    let Some(vm3) = self::vm("slot_exhaustion_ioctl_and_bitmap_errors") else { return };
    let off = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(1 << 20).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let mem3 = GuestMemoryMmap::from_regions(vec![off]).unwrap();
    let mut slots3 = KvmSlots::new(vm3.vm_fd(), true).unwrap();
    let e = slots3.register(&mem3).unwrap_err();
    assert!(matches!(e, KvmError::Bitmap { addr: GuestAddress(0), .. }), "{e}");
    assert_eq!(slots3.slots().count(), 0);
    // Without logging, the same memory registers, and a sync says there is no log.
    let mut unlogged = KvmSlots::new(TestVm::new().unwrap().vm_fd(), false).unwrap();
    unlogged.register(&mem3).unwrap();
    assert!(matches!(unlogged.sync_dirty_log(), Err(KvmError::NotLogging)));
}

/// Issue 9, item 1: after a region is hot-removed and the `KvmSlots` dropped while a vCPU keeps
/// the VM alive, the region's old host address is mapped again with other data; a guest write
/// to its old guest address must not reach that new mapping (the slot was deleted on drop).
#[test]
fn dropping_kvm_slots_deletes_every_slot() {
    let Some(mut vm) = vm("dropping_kvm_slots_deletes_every_slot") else { return };
    common::in_child("dropping_kvm_slots_deletes_every_slot", || {
        vm.add_vcpu().unwrap();
        // The code lives in RAM the harness registers itself, in a slot KvmSlots leaves alone.
        vm.add_ram(100, 0, 1 << 20, 0).unwrap();
        let target =
            GuestRegionMmap::build(MmapRegionBuilder::<AtomicBitmap>::new(1 << 20), GuestAddress(GIB))
                .unwrap();
        let host = target.as_ptr();
        let mem = Mem::from_regions(vec![target]).unwrap();
        let mut slots = slots_on(&vm, true).with_slot_range(0..10);
        slots.register(&mem).unwrap();
        drop(slots);
        drop(mem); // the region is unmapped now: nothing holds it
                   // The host maps something else at the very same address.
                   // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the address was just freed.
        let fresh = unsafe {
            guestmem::sys::mmap(
                host,
                1 << 20,
                Protection::READ_WRITE,
                guestmem::sys::MapFlags::PRIVATE
                    | guestmem::sys::MapFlags::ANONYMOUS
                    | guestmem::sys::MapFlags::FIXED_NOREPLACE,
                None,
                0,
            )
        }
        .unwrap();
        assert_eq!(fresh, host, "the old address was not free to reuse");
        // SAFETY: our fresh mapping.
        unsafe { fresh.write_bytes(0x5a, 1 << 20) };
        let r = vm.run_writes(0, CODE_GPA, &[(GIB + 8, 0x11)]);
        assert!(
            matches!(r, Err(GuestError::UnexpectedExit { .. })),
            "the guest write still had memory: {r:?}"
        );
        // SAFETY: our fresh mapping.
        assert_eq!(
            unsafe { fresh.add(8).read_volatile() },
            0x5a,
            "the guest wrote into unrelated host memory"
        );
    });
}

/// Issue 9, item 2: two `KvmSlots` on one VM (through two different descriptors of it) cannot
/// both own its slots; and a slot changed behind our back (unsafe code calling the raw ioctl
/// with a larger region) makes the sync fail with `SlotChanged`, not overflow a heap buffer.
#[test]
fn slot_ownership_is_exclusive_and_log_buffers_cannot_overflow() {
    let Some(vm) = vm("slot_ownership_is_exclusive_and_log_buffers_cannot_overflow") else { return };
    common::in_child("slot_ownership_is_exclusive_and_log_buffers_cannot_overflow", || {
        let mem = Mem::from_regions(vec![anon(0, 64 << 10)]).unwrap();
        let mut first = slots_on(&vm, true);
        first.register(&mem).unwrap();
        let dup = guestmem::sys::fd::dup_raw(vm.vm_fd().as_raw_fd()).unwrap();
        assert!(matches!(Slots::new(&dup, true), Err(KvmError::VmAlreadyOwned)));
        assert!(matches!(Slots::new(vm.vm_fd(), true), Err(KvmError::VmAlreadyOwned)));
        // Hostile unsafe code re-registers slot 0 with 1 GiB: its log is 32 KiB, our buffer is
        // sized for 16 pages.
        let big = guestmem_kvm_guest::Ram::new(1 << 30).unwrap();
        let slot = kvm_guest::MemorySlot {
            slot: 0,
            guest_phys_addr: 0,
            size: 1 << 30,
            userspace_addr: big.as_ptr() as u64,
            flags: kvm_guest::LOG_DIRTY_PAGES,
        };
        // SAFETY: `big` outlives the VM's use of it: the slot is deleted below before `big`
        // drops. KVM changes a slot's size only by deleting and creating it again.
        unsafe {
            kvm_guest::set_user_memory_region(vm.vm_fd(), &kvm_guest::MemorySlot { size: 0, ..slot })
                .unwrap();
            kvm_guest::set_user_memory_region(vm.vm_fd(), &slot).unwrap();
        }
        let e = first.sync_dirty_log().unwrap_err();
        assert!(matches!(e, KvmError::SlotChanged { slot: 0 }), "{e}");
        drop(first); // deletes slot 0, whatever it maps now
        drop(big);
        // With the first owner gone, another may take over.
        let mut second = slots_on(&vm, true);
        second.register(&mem).unwrap();
    });
}

/// Issue 9, item 6: `add_vcpu` maps only what is a vCPU whose ring is as large as the VM's:
/// a file, or a vCPU of a VM without a ring, is an error, never a SIGBUS when reaping; and the
/// same vCPU twice is refused (issue 9, item 20).
#[test]
fn add_vcpu_maps_only_real_rings() {
    let Some(mut vm) = vm("add_vcpu_maps_only_real_rings") else { return };
    common::in_child("add_vcpu_maps_only_real_rings", || {
        let mut slots = slots_on(&vm, true);
        slots.enable_dirty_ring(1 << 16).unwrap();
        let empty = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        assert!(matches!(slots.add_vcpu(&empty), Err(KvmError::NotAVcpu(_))));
        let mut other = TestVm::new().unwrap();
        let i = other.add_vcpu().unwrap();
        let e = slots.add_vcpu(&other.vcpus()[i]).unwrap_err();
        assert!(matches!(e, KvmError::RingMap(_)), "{e}");
        let i = vm.add_vcpu().unwrap();
        slots.add_vcpu(&vm.vcpus()[i]).unwrap();
        assert!(matches!(slots.add_vcpu(&vm.vcpus()[i]), Err(KvmError::DuplicateVcpu)));
        assert_eq!(slots.reap_dirty_rings().unwrap(), 0);
    });
}

/// Issue 9, items 9 and 20: with the ring on, a register that fails half-way leaves the slot
/// list sorted (so no reaped entry is missed), and a deleted slot's number is not reused until
/// the rings were reaped, so the old slot's queued entries never land in a new region.
#[test]
fn ring_bookkeeping_survives_failures_and_hotplug() {
    let Some(mut vm) = vm("ring_bookkeeping_survives_failures_and_hotplug") else { return };
    let mut slots = slots_on(&vm, true).with_slot_range(0..50);
    slots.enable_dirty_ring(1 << 16).unwrap();
    let i = vm.add_vcpu().unwrap();
    slots.add_vcpu(&vm.vcpus()[i]).unwrap();
    // Every region below 4 GiB, where the real-mode guest reaches.
    const B: u64 = 0x4000_0000;
    const C: u64 = 0x8000_0000;
    const D: u64 = 0xC000_0000;
    const CLASH: u64 = 0xD000_0000;
    const E: u64 = 0xE000_0000;
    const F: u64 = 0xF000_0000;
    let r = |base| Arc::new(anon(base, 1 << 20));
    // `a` holds the code and stays; the others come and go.
    let (a, b, c, d) = (r(0), r(B), r(C), r(D));
    let mem = Mem::from_arc_regions(vec![a.clone(), b.clone(), c.clone(), d.clone()]).unwrap();
    slots.register(&mem).unwrap();
    assert_eq!(slots.slots().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    // The guest writes into `d` (slot 3); its entry waits in the ring.
    kvm_guest::run_writes(vm.vcpu(0).unwrap(), CODE_GPA, &[(D + 0x5000, 1)], &mut common::loader(&mem))
        .unwrap();
    // Remove `b` (slot 1) and add a region at a range the VMM took itself: the add fails after
    // the delete.
    vm.add_ram(60, CLASH, 1 << 20, 0).unwrap();
    let clash = Mem::from_arc_regions(vec![a.clone(), c.clone(), d.clone(), r(CLASH)]).unwrap();
    assert!(matches!(slots.register(&clash), Err(KvmError::Ioctl { .. })));
    let ids: Vec<u32> = slots.slots().map(|s| s.0).collect();
    assert_eq!(ids, [0, 2, 3], "the list matches KVM, in order");
    // Remove `d` too and add `e`: `e` must not get slot 3 (nor 1) before a reap.
    let e_region = r(E);
    let next = Mem::from_arc_regions(vec![a.clone(), c.clone(), e_region.clone()]).unwrap();
    slots.register(&next).unwrap();
    let e_slot = slots.slots().find(|s| s.1 == GuestAddress(E)).unwrap().0;
    assert!(e_slot != 3 && e_slot != 1, "slot {e_slot} reused before the ring was reaped");
    next.take_dirty_ranges(|_, _| {}).unwrap();
    assert!(slots.reap_dirty_rings().unwrap() >= 1);
    assert_eq!(harvest(&next), BTreeSet::new(), "an entry of the deleted slot landed elsewhere");
    // Guest writes into every region are reaped (the search finds every slot).
    kvm_guest::run_writes(
        vm.vcpu(0).unwrap(),
        CODE_GPA,
        &[(0x10_0000 - 0x1000, 1), (C + 0x2000, 1), (E + 0x3000, 1)],
        &mut common::loader(&next),
    )
    .unwrap();
    slots.reap_dirty_rings().unwrap();
    let got = harvest(&next);
    for page in [(0x10_0000 - 0x1000) / PAGE, (C + 0x2000) / PAGE, (E + 0x3000) / PAGE] {
        assert!(got.contains(&page), "page {page:#x} missing from {got:?}");
    }
    // After the reap, freed numbers are given out again.
    let again = Mem::from_arc_regions(vec![a, c, e_region, r(F)]).unwrap();
    slots.register(&again).unwrap();
    assert!(slots.slots().any(|s| s.0 == 1));
}

/// The two variants no ordinary call produces on this machine: `LogBuffer` (the kernel refuses
/// the buffer's mapping: here an address-space limit, in a child process) and `Unsupported`
/// (this machine's KVM has every capability guestmem asks for; older kernels lack some).
#[test]
fn log_buffer_allocation_failure_is_an_error() {
    let Some(vm) = vm("log_buffer_allocation_failure_is_an_error") else { return };
    common::in_child("log_buffer_allocation_failure_is_an_error", || {
        let mem = Mem::from_regions(vec![anon(0, 1 << 20)]).unwrap();
        let mut slots = slots_on(&vm, true);
        // No new mapping may be made from here on.
        let vm_size: u64 = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let limit = libc::rlimit { rlim_cur: vm_size * 1024, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: setrlimit reads the struct; lowering our own limit touches no memory.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
        let e = slots.register(&mem).unwrap_err();
        assert!(matches!(e, KvmError::LogBuffer { pages: 256, .. }), "{e}");
        assert_eq!(slots.slots().count(), 0);
    });
}

#[test]
fn every_kvm_error_variant_is_produced() {
    let Some(mut vm) = vm("every_kvm_error_variant_is_produced") else { return };
    let name = |e: &KvmError| match e {
        KvmError::Ioctl { .. } => "Ioctl",
        KvmError::NotAVm(_) => "NotAVm",
        KvmError::NotAVcpu(_) => "NotAVcpu",
        KvmError::VmAlreadyOwned => "VmAlreadyOwned",
        KvmError::DuplicateVcpu => "DuplicateVcpu",
        KvmError::Unsupported(_) => "Unsupported",
        KvmError::RingAlreadyEnabled => "RingAlreadyEnabled",
        KvmError::RingRefused { .. } => "RingRefused",
        KvmError::InvalidRingSize { .. } => "InvalidRingSize",
        KvmError::InitiallySetWithRing => "InitiallySetWithRing",
        KvmError::RingEnabled => "RingEnabled",
        KvmError::RingNotEnabled => "RingNotEnabled",
        KvmError::NotLogging => "NotLogging",
        KvmError::NoFreeSlot(_) => "NoFreeSlot",
        KvmError::PartialPage { .. } => "PartialPage",
        KvmError::Bitmap { .. } => "Bitmap",
        KvmError::SlotChanged { .. } => "SlotChanged",
        KvmError::RingMap(_) => "RingMap",
        KvmError::GuestMemfd { .. } => "GuestMemfd",
        KvmError::LogBuffer { .. } => "LogBuffer",
    };
    let mut produced = Vec::new();
    let null = || std::fs::File::open("/dev/null").unwrap();
    produced.push(KvmSlots::<AtomicBitmap>::new(&null(), true).unwrap_err());
    // Ring rules on a VM without vCPUs.
    let mut slots = slots_on(&vm, true);
    produced.push(Slots::new(vm.vm_fd(), true).unwrap_err());
    produced.push(slots.reap_dirty_rings().unwrap_err());
    produced.push(slots.enable_dirty_ring(12345).unwrap_err());
    slots.enable_dirty_ring(1 << 16).unwrap();
    produced.push(slots.enable_dirty_ring(1 << 16).unwrap_err());
    produced.push(slots.enable_manual_protect(true).unwrap_err());
    produced.push(slots.sync_dirty_log().unwrap_err());
    produced.push(slots.add_vcpu(&null()).unwrap_err());
    let i = vm.add_vcpu().unwrap();
    slots.add_vcpu(&vm.vcpus()[i]).unwrap();
    produced.push(slots.add_vcpu(&vm.vcpus()[i]).unwrap_err());
    let mut ringless = TestVm::new().unwrap();
    let j = ringless.add_vcpu().unwrap();
    produced.push(slots.add_vcpu(&ringless.vcpus()[j]).unwrap_err());
    // A ring after a vCPU exists; no log without logging; no slot number left.
    let mut late_vm = TestVm::new().unwrap();
    late_vm.add_vcpu().unwrap();
    produced.push(slots_on(&late_vm, true).enable_dirty_ring(1 << 16).unwrap_err());
    produced.push(slots_on(&late_vm, false).sync_dirty_log().unwrap_err());
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), anon(GIB, 1 << 20)]).unwrap();
    produced.push(slots_on(&late_vm, true).with_slot_range(0..1).register(&mem).unwrap_err());
    // A range the VM already maps: KVM refuses.
    late_vm.add_ram(300, 0, 1 << 20, 0).unwrap();
    produced.push(slots_on(&late_vm, true).register(&mem).unwrap_err());
    // A region with tracking off cannot take KVM's bits.
    let off = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(1 << 20).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let untracked = GuestMemoryMmap::from_regions(vec![off]).unwrap();
    produced
        .push(KvmSlots::new(TestVm::new().unwrap().vm_fd(), true).unwrap().register(&untracked).unwrap_err());
    // A slot changed behind our back (see slot_ownership_is_exclusive_and_log_buffers_cannot_overflow).
    let changed_vm = TestVm::new().unwrap();
    let small = Mem::from_regions(vec![anon(0, 64 << 10)]).unwrap();
    let mut changed = slots_on(&changed_vm, true);
    changed.register(&small).unwrap();
    // 256 MiB: an 8 KiB log, past the page our 16-page slot's buffer has.
    let big = guestmem_kvm_guest::Ram::new(256 << 20).unwrap();
    let slot = kvm_guest::MemorySlot {
        slot: 0,
        guest_phys_addr: 0,
        size: 256 << 20,
        userspace_addr: big.as_ptr() as u64,
        flags: kvm_guest::LOG_DIRTY_PAGES,
    };
    // SAFETY: `big` outlives the slot: `changed` deletes it on drop, before `big` drops.
    unsafe {
        kvm_guest::set_user_memory_region(changed_vm.vm_fd(), &kvm_guest::MemorySlot { size: 0, ..slot })
            .unwrap();
        kvm_guest::set_user_memory_region(changed_vm.vm_fd(), &slot).unwrap();
    }
    produced.push(changed.sync_dirty_log().unwrap_err());
    drop(changed);
    drop(big);
    // A region of a page and a half.
    let odd = Mem::from_ranges(&[(GuestAddress(0), 0x1800)]).unwrap();
    produced.push(slots_on(&TestVm::new().unwrap(), true).register(&odd).unwrap_err());
    // `LogBuffer`: log_buffer_allocation_failure_is_an_error; `GuestMemfd`:
    // guest_memfd_regions_are_guest_ram; `Unsupported`: not on this kernel.
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Ioctl",
            "NotAVm",
            "NotAVcpu",
            "VmAlreadyOwned",
            "DuplicateVcpu",
            "RingAlreadyEnabled",
            "RingRefused",
            "InvalidRingSize",
            "InitiallySetWithRing",
            "RingEnabled",
            "RingNotEnabled",
            "NotLogging",
            "NoFreeSlot",
            "PartialPage",
            "Bitmap",
            "SlotChanged",
            "RingMap",
        ],
        false,
    );
}

/// guest_memfd as guest RAM (issue 13, part 3): a region mapped from a guest_memfd made with
/// `KvmSlots::create_guest_memfd` gets a `KVM_MEM_GUEST_MEMFD` slot; a real guest's writes land
/// in it and the host sees them through the region; a discard punches a hole the guest then
/// reads as zeros; KVM cannot log the slot, so every sync reports it whole; what KVM refuses
/// is an error.
#[test]
fn guest_memfd_regions_are_guest_ram() {
    let Some(mut vm) = vm("guest_memfd_regions_are_guest_ram") else { return };
    let mut slots = slots_on(&vm, true);
    let gmem = slots.create_guest_memfd(1 << 20).unwrap();
    assert!(guestmem::sys::kvm::is_guest_memfd(std::os::fd::AsFd::as_fd(&gmem)).unwrap());
    // Its size is fixed: no truncation can make its mapping fault.
    assert!(gmem.set_len(0).is_err());
    let private = GuestRegionMmap::build(
        MmapRegionBuilder::<AtomicBitmap>::new(1 << 20)
            .backing(Backing::File { file: guestmem::mmap::FileOffset::new(gmem, 0), shared: true }),
        GuestAddress(GIB),
    )
    .unwrap();
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), private]).unwrap();
    slots.register(&mem).unwrap();
    vm.add_vcpu().unwrap();
    mem.take_dirty_ranges(|_, _| {}).unwrap();
    kvm_guest::run_writes(
        vm.vcpu(0).unwrap(),
        CODE_GPA,
        &[(GIB + 0x1234, 0xab), (GIB + 0x8000, 0xcd)],
        &mut common::loader(&mem),
    )
    .unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(GIB + 0x1234)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(GIB + 0x8000)).unwrap(), 0xcd);
    // Not loggable: reported dirty as a whole (256 pages) beside the logged code page.
    let reported = slots.sync_dirty_log().unwrap();
    assert!(reported >= 256, "{reported}");
    let dirty = harvest(&mem);
    assert!((GIB / PAGE..GIB / PAGE + 256).all(|p| dirty.contains(&p)));
    // A punched hole reads zero for the guest too.
    mem.regions()[1].discard(0x8000, 0x1000).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(GIB + 0x8000)).unwrap(), 0);
    // What KVM refuses: a read-only guest_memfd slot, and another VM's guest_memfd.
    let other_vm = TestVm::new().unwrap();
    let mut other = slots_on(&other_vm, false);
    let ro_gmem = other.create_guest_memfd(1 << 20).unwrap();
    let ro = GuestRegionMmap::build(
        MmapRegionBuilder::<AtomicBitmap>::new(1 << 20)
            .protection(Protection::READ)
            .backing(Backing::File { file: guestmem::mmap::FileOffset::new(ro_gmem, 0), shared: true }),
        GuestAddress(0),
    )
    .unwrap();
    let e = other.register(&Mem::from_regions(vec![ro]).unwrap()).unwrap_err();
    assert!(matches!(e, KvmError::GuestMemfd { .. }), "{e}");
    let foreign = slots.create_guest_memfd(1 << 20).unwrap();
    let foreign = GuestRegionMmap::build(
        MmapRegionBuilder::<AtomicBitmap>::new(1 << 20)
            .backing(Backing::File { file: guestmem::mmap::FileOffset::new(foreign, 0), shared: true }),
        GuestAddress(0),
    )
    .unwrap();
    let e = other.register(&Mem::from_regions(vec![foreign]).unwrap()).unwrap_err();
    assert!(matches!(e, KvmError::Ioctl { op: "KVM_SET_USER_MEMORY_REGION", .. }), "{e}");
}

/// virtio-mem plug state with real KVM (issue 13, part 4): one memslot per block group with a
/// plugged block; a guest's writes into plugged blocks reach the device's memory and its dirty
/// bits; a block unplugged inside a live group is fenced (the guest touching it makes `KVM_RUN`
/// fail, never reaches other memory); a group whose last block goes loses its slot first, and
/// only then its fence goes up; plugging brings slot and zero memory back.
#[test]
fn plug_state_follows_block_groups_in_kvm() {
    use guestmem::plug::{PlugBacking, PlugConfig, PlugDevice};
    let Some(mut vm) = vm("plug_state_follows_block_groups_in_kvm") else { return };
    const DEV: u64 = 0x8000_0000;
    const BLOCK: u64 = 2 << 20;
    let dev = PlugDevice::<AtomicBitmap>::new(PlugConfig {
        guest_base: GuestAddress(DEV),
        size: 64 << 20,
        block_size: BLOCK,
        group_size: 16 << 20,
        backing: PlugBacking::Anonymous,
    })
    .unwrap();
    let ram = Mem::from_regions(vec![anon(0, 1 << 20)]).unwrap();
    let mut slots = slots_on(&vm, true);
    vm.add_vcpu().unwrap();
    let at = |b: u64, off: u64| DEV + b * BLOCK + off;
    let mem = {
        let m = dev.plug(&ram, 0, 3).unwrap();
        dev.plug(&m, 8, 1).unwrap()
    };
    slots.register(&mem).unwrap();
    let groups = |s: &Slots| s.slots().filter(|x| x.1 .0 >= DEV).map(|x| (x.1, x.2)).collect::<Vec<_>>();
    assert_eq!(groups(&slots), [(GuestAddress(DEV), 16 << 20), (GuestAddress(DEV + (16 << 20)), 16 << 20)]);
    mem.take_dirty_ranges(|_, _| {}).unwrap();
    kvm_guest::run_writes(
        vm.vcpu(0).unwrap(),
        CODE_GPA,
        &[(at(0, 8), 1), (at(2, 0x3000), 2), (at(8, 16), 3)],
        &mut common::loader(&mem),
    )
    .unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(at(2, 0x3000))).unwrap(), 2);
    slots.sync_dirty_log().unwrap();
    let dirty = harvest(&mem);
    for gpa in [at(0, 8), at(2, 0x3000), at(8, 16)] {
        assert!(dirty.contains(&(gpa / PAGE)), "{gpa:#x} not in the harvest");
    }
    // Unplug block 1 inside group 0: the group keeps its slot, the block is fenced once the old
    // memory goes, and a guest write there fails instead of landing anywhere.
    let next = dev.unplug(&mem, 1, 1).unwrap();
    slots.register(&next).unwrap();
    assert_eq!(groups(&slots).len(), 2);
    drop(mem);
    assert!(dev.is_fenced(1));
    let r =
        kvm_guest::run_writes(vm.vcpu(0).unwrap(), CODE_GPA, &[(at(1, 8), 9)], &mut common::loader(&next));
    assert!(r.is_err(), "a guest write to an unplugged, fenced block succeeded");
    assert_eq!(next.read_obj::<u8>(GuestAddress(at(0, 8))).unwrap(), 1);
    // Group 0 empties: its slot goes before its fence is up.
    let empty0 = dev.unplug(&next, 0, 1).unwrap();
    let empty0 = {
        let m = dev.unplug(&empty0, 2, 1).unwrap();
        drop(empty0);
        m
    };
    drop(next);
    assert!(!dev.is_fenced(0), "fenced while KVM still has the group's slot");
    slots.register(&empty0).unwrap();
    assert_eq!(groups(&slots), [(GuestAddress(DEV + (16 << 20)), 16 << 20)]);
    assert!(dev.is_fenced(0) && dev.is_fenced(2));
    // Plug again: the slot comes back, the memory is zeros, and the guest can write it.
    let back = dev.plug(&empty0, 2, 1).unwrap();
    drop(empty0);
    slots.register(&back).unwrap();
    assert_eq!(groups(&slots).len(), 2);
    assert_eq!(back.read_obj::<u8>(GuestAddress(at(2, 0x3000))).unwrap(), 0);
    kvm_guest::run_writes(vm.vcpu(0).unwrap(), CODE_GPA, &[(at(2, 0x3000), 7)], &mut common::loader(&back))
        .unwrap();
    assert_eq!(back.read_obj::<u8>(GuestAddress(at(2, 0x3000))).unwrap(), 7);
}
