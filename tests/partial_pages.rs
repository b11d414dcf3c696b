//! Regions whose length is not a page multiple (vm-memory accepts one of `0x10_0004` bytes):
//! a region of exactly that length over a mapping rounded up to whole pages. Every layer that
//! thinks in pages is checked on real parts: accesses stop at the length, the dirty bitmap has
//! the partial page and harvests clip it, discard, snapshots (dump, diff, verify, restore,
//! mapped restore, rebase), migration, file backings, hugetlb, and KVM (which refuses it).

mod common;

use std::sync::Arc;

use guestmem::bitmap::AtomicBitmap;
use guestmem::migration::{Receiver, Sender};
use guestmem::mmap::{FileOffset, HugePageSize, MmapError, MmapRegionBuilder};
use guestmem::{
    snapshot, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: usize = 4096;
/// virtio-vsock's region size: 256 pages and 4 bytes.
const ODD: usize = 0x10_0004;

fn odd_memory() -> Mem {
    // A partial region, then a whole one right after its rounded-up end, then a partial one
    // at the end of memory.
    Mem::from_ranges(&[
        (GuestAddress(0), ODD),
        (GuestAddress(0x20_0000), 0x1000),
        (GuestAddress(0x30_0000), 3),
    ])
    .unwrap()
}

fn tmp() -> std::fs::File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

#[test]
fn accesses_stop_at_the_length() {
    let mem = odd_memory();
    let r = &mem.regions()[0];
    assert_eq!((r.len(), r.size(), r.last_addr()), (ODD as u64, 0x10_1000, GuestAddress(ODD as u64 - 1)));
    assert_eq!(mem.regions()[2].last_addr(), GuestAddress(0x30_0002));
    assert_eq!(mem.last_addr(), GuestAddress(0x30_0002));
    // The last bytes are there; the rest of the page is not guest memory.
    mem.write_obj(0xdead_beefu32, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(), 0xdead_beef);
    for (addr, len) in [(0x10_0004u64, 1usize), (0x10_0001, 4), (0x10_0fff, 1), (0x30_0000, 4)] {
        assert!(mem.write_slice(&vec![1; len], GuestAddress(addr)).is_err(), "{addr:#x}+{len}");
        assert!(mem.read_slice(&mut vec![0; len], GuestAddress(addr)).is_err(), "{addr:#x}+{len}");
        assert!(!mem.check_range(GuestAddress(addr), len));
    }
    assert!(mem.get_host_address(GuestAddress(0x10_0004)).is_err());
    assert_eq!(mem.write(&[9; 16], GuestAddress(0x10_0000)).unwrap(), 4);
    assert!(mem.write(&[9], GuestAddress(0x10_0004)).is_err());
    assert!(mem.store(1u64, GuestAddress(0x10_0000), std::sync::atomic::Ordering::SeqCst).is_err());
    mem.store(1u32, GuestAddress(0x10_0000), std::sync::atomic::Ordering::SeqCst).unwrap();
    // Region-relative access and slices stop there too.
    assert!(r.write_obj(1u8, MemoryRegionAddress(ODD as u64)).is_err());
    assert_eq!(r.as_volatile_slice().len(), ODD);
    assert!(r.get_slice(MemoryRegionAddress(0x10_0000), 5).is_err());
    let slices: Vec<_> = mem.get_slices(GuestAddress(0xf_fff0), 0x14).map(|s| s.unwrap().len()).collect();
    assert_eq!(slices, vec![0x14]);
    // A region of less than a page.
    let tiny = &mem.regions()[2];
    assert_eq!((tiny.len(), tiny.size()), (3, PAGE));
    mem.write_slice(&[1, 2, 3], GuestAddress(0x30_0000)).unwrap();
}

#[test]
fn dirty_tracking_has_the_partial_page_and_harvests_clip_it() {
    let mem = odd_memory();
    let r = &mem.regions()[0];
    assert_eq!((r.bitmap().num_pages(), r.bitmap().byte_len()), (257, 0x10_1000));
    mem.write_obj(1u8, GuestAddress(0x10_0003)).unwrap();
    mem.write_obj(1u8, GuestAddress(0x30_0002)).unwrap();
    let mut ranges = Vec::new();
    assert_eq!(mem.take_dirty_ranges(|a, l| ranges.push((a.0, l))).unwrap(), 2);
    assert_eq!(ranges, vec![(0x10_0000, 4), (0x30_0000, 3)], "never past a region's end");
    // Marking by hand and putting back are bounded by the length too.
    assert!(mem.mark_dirty(GuestAddress(0x10_0000), 5).is_err());
    mem.mark_dirty(GuestAddress(0x10_0000), 4).unwrap();
    assert!(mem.restore_dirty_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).is_err());
    assert_eq!(mem.dirty_page_count().unwrap(), 1);
}

#[test]
fn discard_frees_the_whole_last_page() {
    let mem = odd_memory();
    let r = &mem.regions()[0];
    mem.write_obj(7u32, GuestAddress(0x10_0000)).unwrap();
    // The mapping is whole pages: discard works on them, the region sees zeros.
    r.discard(0x10_0000, PAGE).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(), 0);
    assert!(matches!(r.discard(0x10_0000, 4), Err(MmapError::Unaligned { .. })));
    let mut ranges = Vec::new();
    mem.take_dirty_ranges(|a, l| ranges.push((a.0, l))).unwrap();
    assert_eq!(ranges, vec![(0x10_0000, 4)]);
}

#[test]
fn snapshots_round_trip_partial_regions() {
    let mem = odd_memory();
    mem.write_slice(&[0xaa; 8], GuestAddress(0xf_fffc)).unwrap();
    mem.write_slice(&[1, 2, 3], GuestAddress(0x30_0000)).unwrap();
    let full = tmp();
    snapshot::dump(&mem, &full).unwrap();
    let info = snapshot::verify(&full).unwrap();
    let lens: Vec<u64> = info.regions.iter().map(|r| r.len).collect();
    assert_eq!(lens, vec![ODD as u64, 0x1000, 3]);
    let last = info.regions.last().unwrap();
    assert_eq!(full.metadata().unwrap().len(), last.data_offset + PAGE as u64, "whole pages of data");
    // Copied into memory of the same layout.
    let dst = odd_memory();
    snapshot::restore_into(&dst, &full).unwrap();
    assert_eq!(common::contents(&dst), common::contents(&mem));
    // Mapped: the file is mapped whole pages at a time.
    let mapped = snapshot::restore_mapped::<AtomicBitmap>(&full).unwrap();
    assert_eq!(mapped.regions().iter().map(|r| r.len()).collect::<Vec<_>>(), lens);
    assert_eq!(common::contents(&mapped), common::contents(&mem));
    assert!(mapped.read_obj::<u8>(GuestAddress(0x30_0003)).is_err());
    // A diff of the partial page, rebased onto the full snapshot.
    mem.take_dirty_ranges(|_, _| {}).unwrap();
    mem.write_obj(0x55u8, GuestAddress(0x10_0003)).unwrap();
    mem.write_obj(0x66u8, GuestAddress(0x30_0002)).unwrap();
    let (diff, rebased, now) = (tmp(), tmp(), tmp());
    assert_eq!(snapshot::dump_dirty(&mem, &diff).unwrap().pages_written, 2);
    snapshot::rebase(&full, &diff, &rebased).unwrap();
    snapshot::dump(&mem, &now).unwrap();
    assert_eq!(snapshot::read_info(&rebased).unwrap(), snapshot::read_info(&now).unwrap());
    snapshot::restore_into(&dst, &diff).unwrap();
    assert_eq!(common::contents(&dst), common::contents(&mem));
    // A snapshot of other lengths does not restore into this layout.
    let other = Mem::from_ranges(&[(GuestAddress(0), ODD + 1)]).unwrap();
    assert!(snapshot::restore_into(&other, &full).is_err());
}

#[test]
fn migration_sends_partial_regions() {
    let src = odd_memory();
    src.write_slice(&[0x11; 16], GuestAddress(0xf_fff4)).unwrap();
    src.write_slice(&[7, 8, 9], GuestAddress(0x30_0000)).unwrap();
    let mut sender = Sender::new(Vec::new()).unwrap();
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    src.take_dirty_ranges(|_, _| {}).unwrap();
    src.write_obj(0x42u8, GuestAddress(0x10_0003)).unwrap();
    assert_eq!(sender.send_dirty(&src).unwrap(), 1);
    sender.end_round().unwrap();
    let stream = sender.finish(&src).unwrap();
    let dst = odd_memory();
    let summary = Receiver::new(&stream[..]).receive(&dst).unwrap();
    assert_eq!(summary.regions_verified, 3);
    assert_eq!(common::contents(&dst), common::contents(&src));
}

#[test]
fn file_backings_must_cover_the_rounded_mapping() {
    let file = tmp();
    file.set_len(ODD as u64).unwrap();
    let e =
        Mem::from_ranges_with_files([(GuestAddress(0), ODD, Some(FileOffset::new(file, 0)))]).unwrap_err();
    assert!(matches!(e, GuestMemoryError::Mmap { source: MmapError::FileTooShort { .. }, .. }), "{e}");
    let file = tmp();
    file.set_len(0x10_1000).unwrap();
    let mem = Mem::from_ranges_with_files([(GuestAddress(0), ODD, Some(FileOffset::new(file, 0)))]).unwrap();
    mem.write_obj(3u32, GuestAddress(0x10_0000)).unwrap();
    assert!(mem.write_obj(3u32, GuestAddress(0x10_0001)).is_err());
}

#[test]
fn hugetlb_and_explicit_lengths_are_checked() {
    // A hugetlb mapping is whole huge pages: a length rounded up to a base page is refused by
    // the builder before anything is mapped.
    let e = GuestRegionMmap::build(
        MmapRegionBuilder::<()>::new((2 << 20) + 4).huge_pages(HugePageSize::Size2M),
        GuestAddress(0),
    )
    .unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::Mmap { source: MmapError::Unaligned { what: "size", .. }, .. }),
        "{e}"
    );
    // An explicit length must be the mapping rounded up to a page, no shorter.
    let mapping = Arc::new(MmapRegionBuilder::<()>::new(2 * PAGE).build().unwrap());
    for len in [PAGE as u64 + 1, 2 * PAGE as u64 - 1, 2 * PAGE as u64] {
        let r = GuestRegionMmap::with_len(mapping.clone(), GuestAddress(0), len).unwrap();
        assert_eq!(r.len(), len);
    }
    for len in [PAGE as u64, 1, 2 * PAGE as u64 + 1] {
        let e = GuestRegionMmap::with_len(mapping.clone(), GuestAddress(0), len).unwrap_err();
        assert!(matches!(e, GuestMemoryError::InvalidRegionLength { mapping_size: 0x2000, .. }), "{e}");
    }
    assert!(matches!(
        GuestRegionMmap::with_len(mapping, GuestAddress(0), 0),
        Err(GuestMemoryError::RegionOverflow { .. })
    ));
    // A region may still end exactly at 2^64, partial or not.
    let top =
        GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0xffe), GuestAddress(u64::MAX - 0xfff)).unwrap();
    assert_eq!(top.last_addr(), GuestAddress(u64::MAX - 2));
}

/// KVM maps whole pages only: registering a partial region is `PartialPage` before any ioctl
/// (no slot of the memory is made, the kernel is never asked), and the memory stays usable.
#[cfg(feature = "kvm")]
#[test]
fn kvm_refuses_a_partial_region() {
    use common::kvm_guest;
    let Some(()) = common::need("kvm", "kvm_refuses_a_partial_region", kvm_guest::kvm_available()) else {
        return;
    };
    let vm = kvm_guest::TestVm::new().unwrap();
    let mut slots = guestmem::kvm::KvmSlots::<AtomicBitmap>::new(vm.vm_fd(), true).unwrap();
    let mem = odd_memory();
    let e = slots.register(&mem).unwrap_err();
    assert!(matches!(&e, guestmem::kvm::KvmError::PartialPage { len, .. } if len % PAGE as u64 != 0), "{e}");
    assert_eq!(slots.slots().count(), 0, "no slot of the refused memory was made");
    let whole = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    slots.register(&whole).unwrap();
    assert_eq!(slots.slots().count(), 1);
}
