//! The real-KVM guest harness (`common::kvm_guest`) checked against reality: KVM's own dirty
//! log (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG` with the exact slot size) says which
//! pages the guest wrote, and the host mapping shows the bytes.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::kvm_guest::{
    self, kvm_available, run_until_exits, GuestError, LoopingWriter, MemorySlot, TestVm, COUNT_OFFSET,
    LOG_DIRTY_PAGES, PAGE_SIZE, SEQ_OFFSET,
};
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::Bytes;

const MIB: u64 = 1 << 20;

/// Where the tests put code: a page no test writes from the guest.
const CODE: u64 = 0x1000;

/// Slot 0 at 0 (below and above 1 MiB), slot 1 at 1 GiB, slot 2 just below 4 GiB.
const SLOTS: [(u32, u64, u64); 3] = [(0, 0, 4 * MIB), (1, 0x4000_0000, 2 * MIB), (2, 0xffe0_0000, 2 * MIB)];

/// A VM with the three logged slots of [`SLOTS`] and one vCPU, or `None` (skip) without KVM.
fn vm_with_slots(test: &str) -> Option<TestVm> {
    common::need("kvm", test, kvm_available())?;
    let mut vm = TestVm::new().unwrap();
    for (slot, gpa, size) in SLOTS {
        vm.add_ram(slot, gpa, size as usize, LOG_DIRTY_PAGES).unwrap();
    }
    vm.add_vcpu().unwrap();
    Some(vm)
}

fn page_of(gpa: u64) -> u64 {
    gpa & !(PAGE_SIZE - 1)
}

/// The pages of `gpas` that fall in `slot`.
fn pages_in_slot(slot: u32, gpas: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    let (_, start, size) = SLOTS[slot as usize];
    gpas.into_iter().filter(|g| (start..start + size).contains(g)).map(page_of).collect()
}

/// Every slot's log (and clears them all).
fn all_dirty(vm: &TestVm) -> BTreeMap<u32, BTreeSet<u64>> {
    SLOTS.iter().map(|&(slot, _, _)| (slot, vm.dirty_pages(slot).unwrap())).collect()
}

/// What every slot's log should hold after guest writes at `gpas`.
fn expected_dirty(gpas: impl IntoIterator<Item = u64>) -> BTreeMap<u32, BTreeSet<u64>> {
    let gpas: Vec<u64> = gpas.into_iter().collect();
    SLOTS.iter().map(|&(slot, _, _)| (slot, pages_in_slot(slot, gpas.iter().copied()))).collect()
}

#[test]
fn guest_writes_show_in_kvm_dirty_log_exactly() {
    let Some(mut vm) = vm_with_slots("guest_writes_show_in_kvm_dirty_log_exactly") else { return };
    let writes: [(u64, u8); 14] = [
        (0x0, 1),
        (0x2345, 2),
        (0x2fff, 3), // same page as the one before
        (0x9_f000, 4),
        (0xf_ffff, 5),  // last byte below 1 MiB
        (0x10_0000, 6), // 1 MiB
        (0x10_ffef, 7), // the last byte `ds = 0xffff` would reach
        (0x11_0000, 8), // beyond any real-mode segment
        (0x3f_ffff, 9), // last byte of slot 0
        (0x4000_0000, 10),
        (0x401f_f123, 11),
        (0xffe0_0000, 12),
        (0xffff_fffe, 13),
        (0xffff_ffff, 14), // last byte below 4 GiB
    ];
    assert_eq!(all_dirty(&vm), expected_dirty([]), "fresh slots log nothing");

    vm.run_writes(0, CODE, &writes).unwrap();

    let dirty = all_dirty(&vm);
    assert_eq!(dirty, expected_dirty(writes.map(|(g, _)| g)));
    // The code was written by the host and only fetched by the guest: not in KVM's log.
    assert!(!dirty[&0].contains(&CODE));
    for (gpa, value) in writes {
        let mut byte = [0u8];
        vm.read_ram(gpa, &mut byte).unwrap();
        assert_eq!(byte[0], value, "byte at GPA {gpa:#x}");
    }
    // A neighbour of a written byte is untouched.
    let mut byte = [0xffu8];
    vm.read_ram(0x2346, &mut byte).unwrap();
    assert_eq!(byte[0], 0);
}

#[test]
fn get_dirty_log_clears_the_log() {
    let Some(mut vm) = vm_with_slots("get_dirty_log_clears_the_log") else { return };
    let first = [(0x5000, 1), (0x20_0000, 2), (0x4000_3000, 3), (0xfff0_0000, 4)];
    vm.run_writes(0, CODE, &first).unwrap();
    assert_eq!(all_dirty(&vm), expected_dirty(first.map(|(g, _)| g)));
    assert_eq!(all_dirty(&vm), expected_dirty([]), "the first GET cleared the log");

    // Rewriting a page logged before shows it again (KVM write-protected it anew), and pages
    // of the first run that are not rewritten stay clean.
    let second = [(0x20_0000, 5), (0x6000, 6)];
    vm.run_writes(0, CODE, &second).unwrap();
    assert_eq!(all_dirty(&vm), expected_dirty(second.map(|(g, _)| g)));

    // The same program again: the same pages again.
    vm.run_writes(0, CODE, &second).unwrap();
    assert_eq!(all_dirty(&vm), expected_dirty(second.map(|(g, _)| g)));
}

/// Reads every page's (stamp, count) of the writer's range.
fn stamps_and_counts(vm: &TestVm, writer: &LoopingWriter) -> BTreeMap<u64, (u32, u32)> {
    (writer.range_start..writer.range_end())
        .step_by(PAGE_SIZE as usize)
        .map(|p| (p, (vm.read_u32(p + SEQ_OFFSET).unwrap(), vm.read_u32(p + COUNT_OFFSET).unwrap())))
        .collect()
}

/// What the writer leaves after `writes` writes: per page, the last write's number and the
/// number of writes (0, 0 for pages never picked).
fn model(writer: &LoopingWriter, writes: usize) -> BTreeMap<u64, (u32, u32)> {
    let mut pages: BTreeMap<u64, (u32, u32)> =
        (writer.range_start..writer.range_end()).step_by(PAGE_SIZE as usize).map(|p| (p, (0, 0))).collect();
    for (gpa, seq, count) in writer.expected(writes as u64) {
        pages.insert(gpa, (seq, count));
    }
    pages
}

/// The harness's migration pieces: a writer paused on one VM, its memory copied and its vCPU
/// state moved (through bytes) to a vCPU of another VM, goes on there exactly where it
/// stopped: the second VM's memory after more writes is what one uninterrupted run leaves.
#[test]
fn a_paused_writer_resumes_on_another_vm() {
    let Some(mut a) = vm_with_slots("a_paused_writer_resumes_on_another_vm") else { return };
    let mut b = vm_with_slots("a_paused_writer_resumes_on_another_vm").unwrap();
    let writer = LoopingWriter { writes_per_exit: 32, ..LoopingWriter::new(0x4000_0000, 128) };
    a.start_looping_writer(0, CODE, &writer).unwrap();
    assert_eq!(run_until_exits(a.vcpu(0).unwrap(), writer.port, 5).unwrap().last(), Some(&160));
    let state = kvm_guest::VcpuState::save(a.vcpu(0).unwrap()).unwrap();
    let bytes = state.to_bytes();
    assert_eq!(bytes.len(), kvm_guest::VcpuState::LEN);
    assert!(kvm_guest::VcpuState::from_bytes(&bytes[1..]).is_none());
    // Memory: the code page and the window, as a migration would carry them.
    for (_, gpa, size) in SLOTS {
        let mut buf = vec![0u8; size as usize];
        a.read_ram(gpa, &mut buf).unwrap();
        b.write_ram(gpa, &buf).unwrap();
    }
    let cpu = b.add_vcpu().unwrap();
    kvm_guest::VcpuState::from_bytes(&bytes).unwrap().restore(b.vcpu(cpu).unwrap()).unwrap();
    assert_eq!(run_until_exits(b.vcpu(cpu).unwrap(), writer.port, 3).unwrap(), [192, 224, 256]);
    assert_eq!(stamps_and_counts(&b, &writer), model(&writer, 256));
}

#[test]
fn looping_writer_dirties_the_pages_it_predicts() {
    let Some(mut vm) = vm_with_slots("looping_writer_dirties_the_pages_it_predicts") else { return };
    let writer = LoopingWriter { writes_per_exit: 64, ..LoopingWriter::new(0x4000_0000, 256) };
    vm.start_looping_writer(0, CODE, &writer).unwrap();

    let counts = run_until_exits(vm.vcpu(0).unwrap(), writer.port, 3).unwrap();
    assert_eq!(counts, [64, 128, 192]);
    let first: BTreeSet<u64> = writer.pages().take(192).collect();
    assert!(first.len() > 64, "the writer spreads its writes: {} pages", first.len());
    assert_eq!(all_dirty(&vm), expected_dirty(first.iter().copied()));
    let before = stamps_and_counts(&vm, &writer);
    assert_eq!(before, model(&writer, 192));

    // Resumed after the pause: it goes on where it stopped.
    let counts = run_until_exits(vm.vcpu(0).unwrap(), writer.port, 2).unwrap();
    assert_eq!(counts, [256, 320]);
    let second: BTreeSet<u64> = writer.pages().skip(192).take(128).collect();
    assert_eq!(
        all_dirty(&vm),
        expected_dirty(second.iter().copied()),
        "only the pages written since the GET"
    );
    let after = stamps_and_counts(&vm, &writer);
    assert_eq!(after, model(&writer, 320));
    for (page, (stamp, count)) in &after {
        let (old_stamp, old_count) = before[page];
        if second.contains(page) {
            assert!(*stamp > 192 && *count > old_count, "page {page:#x} was written again");
        } else {
            assert_eq!((*stamp, *count), (old_stamp, old_count), "page {page:#x} was not written");
        }
    }
    assert_eq!(after.values().map(|&(_, c)| u64::from(c)).sum::<u64>(), 320);
}

#[test]
fn looping_writers_on_two_vcpus_at_once() {
    let Some(mut vm) = vm_with_slots("looping_writers_on_two_vcpus_at_once") else { return };
    vm.add_vcpu().unwrap();
    let a = LoopingWriter { writes_per_exit: 50, ..LoopingWriter::new(0x4000_0000, 128) };
    let b = LoopingWriter { writes_per_exit: 30, port: 0x11, seed: 7, ..LoopingWriter::new(0x4010_0000, 64) };
    vm.start_looping_writer(0, CODE, &a).unwrap();
    vm.start_looping_writer(1, CODE + PAGE_SIZE, &b).unwrap();

    let [cpu_a, cpu_b] = vm.vcpus_mut() else { panic!("two vCPUs") };
    std::thread::scope(|s| {
        let ta = s.spawn(move || run_until_exits(cpu_a, a.port, 4));
        let tb = s.spawn(move || run_until_exits(cpu_b, b.port, 5));
        assert_eq!(ta.join().unwrap().unwrap(), [50, 100, 150, 200]);
        assert_eq!(tb.join().unwrap().unwrap(), [30, 60, 90, 120, 150]);
    });
    let written = a.pages().take(200).chain(b.pages().take(150));
    assert_eq!(all_dirty(&vm), expected_dirty(written));
    assert_eq!(stamps_and_counts(&vm, &a), model(&a, 200));
    assert_eq!(stamps_and_counts(&vm, &b), model(&b, 150));
}

#[test]
fn guest_writes_memory_the_harness_does_not_own() {
    if common::need("kvm", "guest_writes_memory_the_harness_does_not_own", kvm_available()).is_none() {
        return;
    }
    // Declared before the VM, so dropped after it: the slot's memory outlives the slot.
    let region = MmapRegionBuilder::<()>::new(2 * MIB as usize)
        .backing(Backing::Memfd(MemfdOptions::new("kvm-guest-test")))
        .build()
        .unwrap();
    let mut vm = TestVm::new().unwrap();
    let slot = MemorySlot {
        slot: 5,
        guest_phys_addr: 16 * MIB,
        size: 2 * MIB,
        userspace_addr: region.as_ptr() as u64,
        flags: LOG_DIRTY_PAGES,
    };
    // SAFETY: `region` is mapped until after `vm` is dropped.
    unsafe { vm.set_user_memory_region(slot) }.unwrap();
    vm.add_vcpu().unwrap();

    let code_gpa = slot.guest_phys_addr;
    let writes = [(16 * MIB + 0x1_0000, 0xaa), (18 * MIB - 1, 0xbb)];
    let mut load = |gpa: u64, code: &[u8]| {
        let offset = (gpa - slot.guest_phys_addr) as usize;
        region
            .as_volatile_slice()
            .write_slice(code, offset)
            .map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    };
    kvm_guest::run_writes(vm.vcpu(0).unwrap(), code_gpa, &writes, &mut load).unwrap();

    let dirty = kvm_guest::dirty_pages(vm.vm_fd(), &slot).unwrap();
    assert_eq!(dirty, writes.iter().map(|&(g, _)| page_of(g)).collect());
    for (gpa, value) in writes {
        let got: u8 = region.as_volatile_slice().read_obj((gpa - slot.guest_phys_addr) as usize).unwrap();
        assert_eq!(got, value);
    }
    // Deleting the slot forgets it.
    // SAFETY: size 0 deletes the slot; no memory is handed to KVM.
    unsafe { vm.set_user_memory_region(MemorySlot { size: 0, ..slot }) }.unwrap();
    assert!(matches!(vm.dirty_pages(5), Err(GuestError::UnknownSlot(5))));
}

#[test]
fn harness_reports_what_the_guest_cannot_do() {
    // Programs are checked before any KVM call.
    assert!(matches!(
        kvm_guest::write_program(&[(1 << 32, 0)]),
        Err(GuestError::OutOfReach { gpa: 0x1_0000_0000 })
    ));
    // 9 bytes a write and a `hlt`: 7281 writes fit in 64 KiB, 7282 do not.
    assert_eq!(kvm_guest::write_program(&vec![(0, 0); 7281]).unwrap().len(), 65_530);
    let long = kvm_guest::write_program(&vec![(0, 0); 7282]).map(|code| code.len());
    assert!(matches!(long, Err(GuestError::ProgramTooLong { len: 65_539 })), "{long:?}");
    assert_eq!(
        kvm_guest::write_program(&[(0x1234_5678, 0x5a)]).unwrap(),
        [0x64, 0x67, 0xc6, 0x05, 0x78, 0x56, 0x34, 0x12, 0x5a, 0xf4]
    );
    let bad = |w: LoopingWriter| w.program().unwrap_err();
    assert!(matches!(bad(LoopingWriter::new(0x1001, 1)), GuestError::InvalidWriter(_)));
    assert!(matches!(bad(LoopingWriter::new(0, 0)), GuestError::InvalidWriter(_)));
    assert!(matches!(bad(LoopingWriter::new(0, 0x1_0001)), GuestError::InvalidWriter(_)));
    assert!(matches!(bad(LoopingWriter::new(0xffff_f000, 2)), GuestError::OutOfReach { gpa: 0x1_0000_0fff }));
    assert!(matches!(
        bad(LoopingWriter { writes_per_exit: 0, ..LoopingWriter::new(0, 1) }),
        GuestError::InvalidWriter(_)
    ));

    let Some(mut vm) = vm_with_slots("harness_reports_what_the_guest_cannot_do") else { return };
    assert!(matches!(
        vm.run_writes(0, CODE, &[(CODE + 3, 1)]),
        Err(GuestError::WriteHitsCode { gpa: 0x1003, .. })
    ));
    assert!(matches!(vm.run_writes(0, 0x50_0000, &[(0, 1)]), Err(GuestError::NoRam { gpa: 0x50_0000, .. })));
    assert!(matches!(vm.run_writes(3, CODE, &[]), Err(GuestError::NoVcpu(3))));
    let writer = LoopingWriter::new(0, 4);
    assert!(matches!(vm.start_looping_writer(0, CODE, &writer), Err(GuestError::WriteHitsCode { .. })));
    // A program that halts is not a looping writer: its `hlt` is an unexpected exit.
    vm.run_writes(0, CODE, &[]).unwrap();
    kvm_guest::enter_real_mode(vm.vcpu(0).unwrap(), CODE).unwrap();
    match run_until_exits(vm.vcpu(0).unwrap(), 0x10, 1) {
        Err(GuestError::UnexpectedExit { exit, rip: 1 }) => assert_eq!(exit, "Hlt"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(vm.dirty_pages(9), Err(GuestError::UnknownSlot(9))));
    assert!(matches!(vm.add_ram(9, 0x8000_0000, 0, 0), Err(GuestError::Mmap { size: 0, .. })));
    // A slot over another slot's GPAs: KVM refuses it (EEXIST), and the harness forgets it.
    match vm.add_ram(9, 0x20_0000, 2 * MIB as usize, 0) {
        Err(GuestError::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source }) => {
            assert_eq!(source.errno(), libc::EEXIST)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(vm.slot(9), Err(GuestError::UnknownSlot(9))));

    // A write no slot covers leaves the guest as an MMIO exit: an error naming it. KVM has
    // stepped past the write (rip points after it) but completes it only on the next
    // KVM_RUN, so this one gets a vCPU of its own.
    let mmio_cpu = vm.add_vcpu().unwrap();
    match vm.run_writes(mmio_cpu, CODE, &[(0x8000_0000, 1)]) {
        Err(GuestError::UnexpectedExit { exit, rip }) => {
            assert!(exit.starts_with("MmioWrite(2147483648, [1]"), "{exit} at {rip:#x}")
        }
        other => panic!("{other:?}"),
    }
}
