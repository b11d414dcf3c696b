//! Real KVM guests: a real-mode guest writes a chosen set of pages while the host writes
//! another set through the API; after `sync_dirty_log` (or reaping the dirty ring) and a
//! harvest, the reported set is exactly the union, round after round, on anonymous, memfd and
//! hugetlb memory, with and without manual clear, and with the dirty ring on two vCPUs.

#![cfg(feature = "kvm")]

mod common;

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use common::kvm_guest::{self, GuestError, TestVm};
use guestmem::kvm::{KvmError, KvmSlots};
use guestmem::mmap::{Backing, HugePageSize, MemfdOptions, MmapRegionBuilder};
use guestmem::sys::Protection;
use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;
type Slots = KvmSlots<OwnedFd, AtomicBitmap>;

const PAGE: u64 = 4096;
const CODE_GPA: u64 = 0x1000;
const GIB: u64 = 1 << 30;

fn vm(test: &str) -> Option<TestVm> {
    common::need("kvm", test, kvm_guest::kvm_available())?;
    Some(TestVm::new().unwrap())
}

/// Our own handle on the VM fd, so `KvmSlots` and the harness can both use it.
fn vm_fd(vm: &TestVm) -> OwnedFd {
    // SAFETY: the VM fd is open while `vm` lives; we only borrow it to duplicate it.
    unsafe { BorrowedFd::borrow_raw(vm.vm_fd().as_raw_fd()) }.try_clone_to_owned().unwrap()
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
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let mut slots = Slots::new(vm_fd(&vm), true);
    slots.register(&mem).unwrap();
    // KVM logs hugetlb memory at 4 KiB granularity once dirty logging is on.
    rounds(&mut vm, &mut slots, &mem, &[(0, 4 << 20), (GIB, 4 << 20)], |s| s.sync_dirty_log().unwrap());
}

#[test]
fn dirty_log_with_manual_clear() {
    let Some(mut vm) = vm("dirty_log_with_manual_clear") else { return };
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let mut slots = Slots::new(vm_fd(&vm), true);
    assert!(matches!(slots.reap_dirty_rings(), Err(KvmError::RingNotEnabled)));
    assert!(matches!(slots.add_vcpu(&vm_fd(&vm)), Err(KvmError::RingNotEnabled)));
    slots.enable_manual_protect(true).unwrap();
    assert!(matches!(slots.enable_dirty_ring(1 << 16), Err(KvmError::InitiallySetWithRing)));
    // A ring after a vCPU exists is refused by KVM, and said so.
    let Some(mut late_vm) = self::vm("ring_rules_are_errors") else { return };
    late_vm.add_vcpu().unwrap();
    let mut late = Slots::new(vm_fd(&late_vm), true);
    let e = late.enable_dirty_ring(1 << 16).unwrap_err();
    assert!(matches!(e, KvmError::RingAfterVcpu(_)), "{e}");
    assert!(e.to_string().contains("before any vCPU"));
    // Mapping a ring from something that is not a vCPU fails cleanly.
    let ring_vm = TestVm::new().unwrap();
    let mut ring = Slots::new(vm_fd(&ring_vm), true);
    ring.enable_dirty_ring(1 << 16).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(ring.add_vcpu(&null), Err(KvmError::RingMap(_))));
    drop(vm);
}

#[test]
fn hotplug_and_read_only_slots() {
    let Some(mut vm) = vm("hotplug_and_read_only_slots") else { return };
    vm.add_vcpu().unwrap();
    let mem = Mem::from_regions(vec![anon(0, 4 << 20)]).unwrap();
    let mut slots = Slots::new(vm_fd(&vm), true);
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
    let (unplugged, _) = plugged.remove_region(GuestAddress(GIB)).unwrap();
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
    let mut slots2 = Slots::new(vm_fd(&vm2), true).with_slot_range(10..20);
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
    let Some(vm) = vm("slot_exhaustion_ioctl_and_bitmap_errors") else { return };
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), anon(GIB, 1 << 20)]).unwrap();
    let mut few = Slots::new(vm_fd(&vm), true).with_slot_range(5..6);
    let e = few.register(&mem).unwrap_err();
    assert!(matches!(e, KvmError::NoFreeSlot(1)), "{e}");
    // The same guest range in two slots: KVM refuses (EEXIST), and the error names the slot.
    let mut second = Slots::new(vm_fd(&vm), true).with_slot_range(100..200);
    let e = second.register(&mem).unwrap_err();
    assert!(matches!(e, KvmError::Ioctl { op: "KVM_SET_USER_MEMORY_REGION", slot: Some(_), .. }), "{e}");
    // Not a VM at all: capabilities are missing.
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut nothing = KvmSlots::<_, AtomicBitmap>::new(null, true);
    assert!(matches!(nothing.enable_dirty_ring(1 << 16), Err(KvmError::Unsupported(_))));
    assert!(matches!(nothing.enable_manual_protect(false), Err(KvmError::Ioctl { .. })));
    // A region with tracking off cannot take KVM's bits: the sync says so.
    let Some(mut vm3) = self::vm("slot_exhaustion_ioctl_and_bitmap_errors") else { return };
    vm3.add_vcpu().unwrap();
    let off = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(1 << 20).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let mem3 = GuestMemoryMmap::from_regions(vec![off]).unwrap();
    let mut slots3 = KvmSlots::new(vm_fd(&vm3), true);
    slots3.register(&mem3).unwrap();
    kvm_guest::run_writes(vm3.vcpu(0).unwrap(), CODE_GPA, &[(0x8000, 1)], &mut |gpa, c| {
        mem3.write_slice(c, GuestAddress(gpa)).map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    })
    .unwrap();
    let e = slots3.sync_dirty_log().unwrap_err();
    assert!(matches!(e, KvmError::Bitmap { addr: GuestAddress(0), .. }), "{e}");
}

#[test]
fn every_kvm_error_variant_is_produced() {
    let Some(mut vm) = vm("every_kvm_error_variant_is_produced") else { return };
    let name = |e: &KvmError| match e {
        KvmError::Ioctl { .. } => "Ioctl",
        KvmError::Unsupported(_) => "Unsupported",
        KvmError::RingAfterVcpu(_) => "RingAfterVcpu",
        KvmError::InvalidRingSize { .. } => "InvalidRingSize",
        KvmError::InitiallySetWithRing => "InitiallySetWithRing",
        KvmError::RingEnabled => "RingEnabled",
        KvmError::RingNotEnabled => "RingNotEnabled",
        KvmError::NoFreeSlot(_) => "NoFreeSlot",
        KvmError::Bitmap { .. } => "Bitmap",
        KvmError::RingMap(_) => "RingMap",
    };
    let mut produced = Vec::new();
    let null = || std::fs::File::open("/dev/null").unwrap();
    // Not a VM: the ioctl fails, and the ring capability is missing.
    let mut nothing = KvmSlots::<_, AtomicBitmap>::new(null(), true);
    produced.push(nothing.enable_manual_protect(false).unwrap_err());
    produced.push(nothing.enable_dirty_ring(1 << 16).unwrap_err());
    // Ring rules on a VM without vCPUs.
    let mut slots = Slots::new(vm_fd(&vm), true);
    produced.push(slots.reap_dirty_rings().unwrap_err());
    produced.push(slots.enable_dirty_ring(12345).unwrap_err());
    slots.enable_dirty_ring(1 << 16).unwrap();
    produced.push(slots.enable_manual_protect(true).unwrap_err());
    produced.push(slots.sync_dirty_log().unwrap_err());
    produced.push(slots.add_vcpu(&null()).unwrap_err());
    // A ring after a vCPU exists.
    let mut late_vm = TestVm::new().unwrap();
    late_vm.add_vcpu().unwrap();
    produced.push(Slots::new(vm_fd(&late_vm), true).enable_dirty_ring(1 << 16).unwrap_err());
    // No slot number left.
    let mem = Mem::from_regions(vec![anon(0, 1 << 20), anon(GIB, 1 << 20)]).unwrap();
    produced.push(Slots::new(vm_fd(&late_vm), true).with_slot_range(0..1).register(&mem).unwrap_err());
    // A region with tracking off cannot take KVM's bits.
    vm.add_vcpu().unwrap();
    let off = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(1 << 20).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let untracked = GuestMemoryMmap::from_regions(vec![off]).unwrap();
    let fresh = TestVm::new().unwrap();
    let mut logged = KvmSlots::new(vm_fd(&fresh), true);
    logged.register(&untracked).unwrap();
    let mut fresh = fresh;
    fresh.add_vcpu().unwrap();
    kvm_guest::run_writes(fresh.vcpu(0).unwrap(), CODE_GPA, &[(0x8000, 1)], &mut |gpa, c| {
        untracked
            .write_slice(c, GuestAddress(gpa))
            .map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    })
    .unwrap();
    produced.push(logged.sync_dirty_log().unwrap_err());
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Ioctl",
            "Unsupported",
            "RingAfterVcpu",
            "InvalidRingSize",
            "InitiallySetWithRing",
            "RingEnabled",
            "RingNotEnabled",
            "NoFreeSlot",
            "Bitmap",
            "RingMap",
        ],
        false,
    );
}
