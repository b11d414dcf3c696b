//! guestmem's IOTLB through vm-memory's IOMMU traits (feature `vm-memory-iommu`): virtio-queue
//! chains whose descriptors hold IOVAs, run through `compat::IovaView`; both faces
//! (`IovaView` and vm-memory's `IommuMemory` over `compat::IommuFace`) checked against
//! vm-memory's own `IommuMemory` and `Iotlb` on random tables and accesses; the all-or-nothing
//! rule, the ends of the address space and the resolver.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use guestmem::bitmap::AtomicBitmap;
use guestmem::compat::{self, IommuFace, IovaView};
use guestmem::iommu::{Access, Iotlb, Iova, Permissions as Perm};
use guestmem::mmap::MmapRegionBuilder;
use guestmem::sys::Protection;
use guestmem::GuestRegionMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::{Error as VmIommuError, IotlbIterator};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Iommu as _, IommuMemory, Permissions};

type Mem = guestmem::GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;

fn ga(a: u64) -> guestmem::GuestAddress {
    guestmem::GuestAddress(a)
}

fn harvest(mem: &Mem) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    mem.take_dirty_ranges(|a, l| runs.push((a.0, l))).unwrap();
    runs
}

fn map(iotlb: &Iotlb, iova: u64, size: u64, gpa: u64, perm: Perm) {
    iotlb.update(Iova(iova), size, ga(gpa), perm).unwrap();
}

fn is_iommu_error(e: &GuestMemoryError, base: u64) -> bool {
    matches!(e, GuestMemoryError::IommuError(VmIommuError::CannotResolve { iova_range, .. }) if iova_range.base.0 == base)
}

// ---------------------------------------------------------------------------------------------
// virtio-queue with IOVAs in its rings and descriptors.

const DESC: u64 = 0x100_0000;
const AVAIL: u64 = 0x100_1000;
const USED: u64 = 0x100_2000;
const QSIZE: u16 = 8;

fn offer<M: GuestMemory>(mem: &M, first: u16, nth: u16, bufs: &[(u64, u32, bool)]) {
    common::virtq::Rings { desc: DESC, avail: AVAIL, size: QSIZE }.offer(mem, first, nth, bufs)
}

#[test]
fn virtio_queue_runs_through_the_iotlb_and_logs_guest_pages() {
    let mem = Mem::from_ranges(&[(ga(0), 0x40000)]).unwrap();
    let iotlb = Iotlb::new();
    // The rings on three scattered guest pages, a read-only request page, and a two-page reply
    // buffer whose IOVA pages sit on distant guest pages in reverse order.
    map(&iotlb, DESC, PAGE, 0x9000, Perm::READ_WRITE);
    map(&iotlb, AVAIL, PAGE, 0x4000, Perm::READ_WRITE);
    map(&iotlb, USED, PAGE, 0x22000, Perm::READ_WRITE);
    map(&iotlb, 0x200_0000, PAGE, 0x30000, Perm::READ);
    map(&iotlb, 0x300_0000, PAGE, 0x11000, Perm::READ_WRITE);
    map(&iotlb, 0x300_1000, PAGE, 0x5000, Perm::WRITE);

    let table = iotlb.snapshot();
    let view = IovaView::new(&table, &mem);
    let request = b"a request read by IOVA";
    guestmem::Bytes::write_slice(&mem, request, ga(0x30010)).unwrap();
    offer(&view, 0, 0, &[(0x200_0010, request.len() as u32, false), (0x300_0f00, 0x200, true)]);
    harvest(&mem);

    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some((DESC >> 32) as u32));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(&view));

    let chain = q.pop_descriptor_chain(&view).unwrap();
    let head = chain.head_index();
    let mut got = vec![0u8; request.len()];
    chain.clone().reader(&view).unwrap().read_exact(&mut got).unwrap();
    assert_eq!(&got, request);
    let reply: Vec<u8> = (0..0x200).map(|i| i as u8).collect();
    chain.writer(&view).unwrap().write_all(&reply).unwrap();
    q.add_used(&view, head, 0x200).unwrap();

    // The reply landed on both guest pages, split where the IOVA mappings meet.
    let mut back = vec![0u8; 0x100];
    guestmem::Bytes::read_slice(&mem, &mut back, ga(0x11f00)).unwrap();
    assert_eq!(back, reply[..0x100]);
    guestmem::Bytes::read_slice(&mem, &mut back, ga(0x5000)).unwrap();
    assert_eq!(back, reply[0x100..]);
    // Logged at the guest pages written: the reply's two and the used ring's.
    assert_eq!(harvest(&mem), [(0x5000, PAGE), (0x11000, PAGE), (0x22000, PAGE)]);

    // A device-writable buffer in the read-only mapping, and one running into unmapped IOVA
    // space: the writers are refused, and nothing is written.
    offer(&view, 2, 1, &[(0x200_0000, 0x10, true)]);
    offer(&view, 3, 2, &[(0x300_1f00, 0x200, true)]);
    harvest(&mem);
    let chain = q.pop_descriptor_chain(&view).unwrap();
    // (`chain.writer` would say only `InvalidChain`; the writer itself says why.)
    match virtio_queue::Writer::new(&view, chain) {
        Err(virtio_queue::Error::GuestMemoryError(e)) => assert!(is_iommu_error(&e, 0x200_0000), "{e:?}"),
        other => panic!("{:?}", other.err()),
    }
    let chain = q.pop_descriptor_chain(&view).unwrap();
    match virtio_queue::Writer::new(&view, chain) {
        Err(virtio_queue::Error::GuestMemoryError(e)) => assert!(is_iommu_error(&e, 0x300_2000), "{e:?}"),
        other => panic!("{:?}", other.err()),
    }
    assert_eq!(harvest(&mem), []);

    // After the IOMMU model unmaps the used ring, a fresh table misses it.
    iotlb.invalidate(Iova(USED), PAGE).unwrap();
    let table = iotlb.snapshot();
    let view = IovaView::new(&table, &mem);
    assert!(!q.is_valid(&view));
    match view.read_obj::<u16>(GuestAddress(USED + 2)) {
        Err(e) => assert!(is_iommu_error(&e, USED + 2), "{e:?}"),
        Ok(v) => panic!("read {v} through an invalidated mapping"),
    }
}

// ---------------------------------------------------------------------------------------------
// Both faces against vm-memory's IommuMemory over its own Iotlb.

/// vm-memory's own IOTLB as an IOMMU, the model.
#[derive(Debug, Default)]
struct ModelIommu(RwLock<vm_memory::iommu::Iotlb>);

impl vm_memory::Iommu for ModelIommu {
    type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, vm_memory::iommu::Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, VmIommuError> {
        vm_memory::iommu::Iotlb::lookup(self.0.read().unwrap(), iova, length, access).map_err(|_| {
            VmIommuError::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: "model miss".into(),
            }
        })
    }
}

const GUEST_PAGES: u64 = 64;
const IOVA_PAGES: u64 = 48;
const PERMS: [(Perm, Permissions); 3] = [
    (Perm::READ, Permissions::Read),
    (Perm::WRITE, Permissions::Write),
    (Perm::READ_WRITE, Permissions::ReadWrite),
];

fn vm_contents(mem: &impl vm_memory::GuestMemoryBackend) -> Vec<u8> {
    let mut out = vec![0u8; (GUEST_PAGES * PAGE) as usize];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

#[test]
fn both_faces_answer_as_vm_memory_iommu_memory() {
    for seed in 1..=24u64 {
        let mut rng = common::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let size = (GUEST_PAGES * PAGE) as usize;
        let ours = Mem::from_ranges(&[(ga(0), size)]).unwrap();
        let face_mem = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let model_mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let iotlb = Iotlb::new();
        let model = ModelIommu::default();
        let face = IommuMemory::new(face_mem, IommuFace::new(&iotlb), true, ());
        let model = IommuMemory::new(model_mem, model, true, ());
        let mut written_pages = std::collections::BTreeSet::new();

        for round in 0..40 {
            // The IOMMU model changes the table: maps (replacing what overlapped) or unmaps.
            for _ in 0..rng.below(4) + 1 {
                let iova = rng.below(IOVA_PAGES) * PAGE;
                let pages = rng.below(3) + 1;
                let gpa = rng.below(GUEST_PAGES - pages + 1) * PAGE;
                let mut tlb = model.iommu().0.write().unwrap();
                if rng.below(4) == 0 {
                    iotlb.invalidate(Iova(iova), pages * PAGE).unwrap();
                    tlb.invalidate_mapping(GuestAddress(iova), (pages * PAGE) as usize);
                } else {
                    let (perm, vm_perm) = PERMS[rng.below(3) as usize];
                    map(&iotlb, iova, pages * PAGE, gpa, perm);
                    tlb.set_mapping(GuestAddress(iova), GuestAddress(gpa), (pages * PAGE) as usize, vm_perm)
                        .unwrap();
                }
            }
            let table = iotlb.snapshot();
            let view = IovaView::new(&table, &ours);

            for _ in 0..64 {
                let iova = rng.below((IOVA_PAGES + 2) * PAGE);
                let len = match rng.below(4) {
                    0 => rng.below(9) as usize,
                    1 => rng.below(PAGE) as usize,
                    _ => rng.below(3 * PAGE) as usize + 1,
                };
                let at = GuestAddress(iova);
                let what = format!("seed {seed} round {round}: {len:#x} bytes at iova {iova:#x}");
                let accesses =
                    [Permissions::No, Permissions::Read, Permissions::Write, Permissions::ReadWrite];
                if len == 0 {
                    // Empty accesses always pass through the view, as vm-memory's trait
                    // documents; its IommuMemory answers by accident of its range map, so
                    // neither it nor the face over it is compared here.
                    for access in accesses {
                        assert!(view.check_range(at, 0, access), "{what} {access:?}");
                    }
                    assert!(
                        view.write_slice(&[], at).is_ok() && view.read_slice(&mut [], at).is_ok(),
                        "{what}"
                    );
                    continue;
                }
                for access in accesses {
                    let expected = model.check_range(at, len, access);
                    assert_eq!(view.check_range(at, len, access), expected, "{what} check {access:?}");
                    assert_eq!(face.check_range(at, len, access), expected, "{what} check {access:?} (face)");
                }
                match rng.below(4) {
                    0 => {
                        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        let expected = model.write_slice(&data, at).is_ok();
                        assert_eq!(view.write_slice(&data, at).is_ok(), expected, "{what} write");
                        assert_eq!(face.write_slice(&data, at).is_ok(), expected, "{what} write (face)");
                        if expected {
                            let mut tlb_iova = iova;
                            let mut left = len as u64;
                            // The model's own translation names the guest pages written.
                            for r in model.iommu().translate(at, len, Permissions::Write).unwrap() {
                                for p in r.base.0 / PAGE..=(r.base.0 + r.length as u64 - 1) / PAGE {
                                    written_pages.insert(p);
                                }
                                tlb_iova += r.length as u64;
                                left -= r.length as u64;
                            }
                            assert_eq!((tlb_iova, left), (iova + len as u64, 0));
                        }
                    }
                    1 => {
                        let (mut a, mut b, mut c) = (vec![0u8; len], vec![0u8; len], vec![0u8; len]);
                        let expected = model.read_slice(&mut a, at).is_ok();
                        assert_eq!(view.read_slice(&mut b, at).is_ok(), expected, "{what} read");
                        assert_eq!(face.read_slice(&mut c, at).is_ok(), expected, "{what} read (face)");
                        if expected {
                            assert_eq!(a, b, "{what} read data");
                            assert_eq!(a, c, "{what} read data (face)");
                        }
                    }
                    2 => {
                        let v = rng.next() as u32;
                        let expected = model.store(v, at, Ordering::Relaxed).is_ok();
                        assert_eq!(view.store(v, at, Ordering::Relaxed).is_ok(), expected, "{what} store");
                        assert_eq!(
                            face.store(v, at, Ordering::Relaxed).is_ok(),
                            expected,
                            "{what} store (face)"
                        );
                        if expected {
                            let gpa =
                                model.iommu().translate(at, 4, Permissions::Write).unwrap().next().unwrap();
                            written_pages.insert(gpa.base.0 / PAGE);
                        }
                    }
                    _ => {
                        let expected = model.load::<u16>(at, Ordering::Relaxed).ok();
                        assert_eq!(view.load::<u16>(at, Ordering::Relaxed).ok(), expected, "{what} load");
                        assert_eq!(
                            face.load::<u16>(at, Ordering::Relaxed).ok(),
                            expected,
                            "{what} load (face)"
                        );
                    }
                }
            }
            let mut ours_bytes = vec![0u8; size];
            guestmem::Bytes::read_slice(&ours, &mut ours_bytes, ga(0)).unwrap();
            let model_bytes = vm_contents(model.get_backend());
            assert!(ours_bytes == model_bytes, "seed {seed} round {round}: memory differs from the model");
            assert!(vm_contents(face.get_backend()) == model_bytes, "seed {seed} round {round}: face memory");
        }
        // Every guest page a write reached, and no other, is in guestmem's log.
        let logged: std::collections::BTreeSet<u64> =
            harvest(&ours).into_iter().flat_map(|(a, l)| a / PAGE..(a + l) / PAGE).collect();
        assert_eq!(logged, written_pages, "seed {seed}");
    }
}

// ---------------------------------------------------------------------------------------------
// What the faces refuse, and how.

#[test]
fn a_failing_access_moves_nothing_even_behind_the_iotlb() {
    // Guest memory with a hole at [0x8000, 0x9000) and a read-only page at 0xa000.
    let rw = Protection::READ | Protection::WRITE;
    let mem = Mem::from_regions(vec![
        GuestRegionMmap::build(MmapRegionBuilder::new(0x8000).protection(rw), ga(0)).unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x1000).protection(rw), ga(0x9000)).unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x1000).protection(Protection::READ), ga(0xa000))
            .unwrap(),
    ])
    .unwrap();
    let iotlb = Iotlb::new();
    // Two IOVA pages, mapped onto guest memory that runs into the hole, and one onto ROM.
    map(&iotlb, 0x10_0000, 2 * PAGE, 0x7000, Perm::READ_WRITE);
    map(&iotlb, 0x20_0000, PAGE, 0xa000, Perm::READ_WRITE);
    map(&iotlb, 0x30_0000, PAGE, 0x1000, Perm::READ_WRITE);
    let table = iotlb.snapshot();
    let view = IovaView::new(&table, &mem);

    let data = [0xeeu8; 0x20];
    // Across the end of guest memory: an error, and the bytes before the hole are untouched.
    assert!(view.write_slice(&data, GuestAddress(0x10_0ff0)).is_err());
    assert_eq!(view.write(&data, GuestAddress(0x10_0ff0)).ok(), None);
    // Across from a mapping into unmapped IOVA space: the same.
    assert!(view.write_slice(&data, GuestAddress(0x30_0ff0)).is_err());
    let mut back = [0u8; 0x10];
    guestmem::Bytes::read_slice(&mem, &mut back, ga(0x7ff0)).unwrap();
    assert_eq!(back, [0; 0x10]);
    guestmem::Bytes::read_slice(&mem, &mut back, ga(0x1ff0)).unwrap();
    assert_eq!(back, [0; 0x10]);
    assert_eq!(harvest(&mem), []);

    // ROM behind a read-write mapping: refused for writing and reading (vm-memory slices are
    // always writable), an error and never a fault.
    assert!(view.write_obj(1u32, GuestAddress(0x20_0000)).is_err());
    assert!(view.read_obj::<u32>(GuestAddress(0x20_0000)).is_err());
    assert!(!view.check_range(GuestAddress(0x20_0000), 4, Permissions::Read));
    // A mapping whose guest address lies in the hole.
    map(&iotlb, 0x40_0000, PAGE, 0x8000, Perm::READ_WRITE);
    let table = iotlb.snapshot();
    let view = IovaView::new(&table, &mem);
    assert!(matches!(
        view.read_obj::<u8>(GuestAddress(0x40_0000)),
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));
}

#[test]
fn the_ends_of_the_iova_space_are_errors_not_panics() {
    let mem = Mem::from_ranges(&[(ga(0), 0x10000)]).unwrap();
    let face_mem = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let iotlb = Iotlb::new();
    let top = u64::MAX - 0xfff;
    map(&iotlb, top, PAGE, 0x2000, Perm::READ_WRITE);
    let table = iotlb.snapshot();
    let view = IovaView::new(&table, &mem);
    let face = IommuMemory::new(face_mem, IommuFace::new(&iotlb), true, ());

    // The last page of IOVA space, to its very end, through the view.
    view.write_obj(0x55u8, GuestAddress(u64::MAX)).unwrap();
    assert_eq!(guestmem::Bytes::read_obj::<u8>(&mem, ga(0x2fff)).unwrap(), 0x55);
    assert!(view.check_range(GuestAddress(top), PAGE as usize, Permissions::ReadWrite));
    // Wrapping past 2^64: an error, for every form.
    assert!(matches!(
        view.read_obj::<u64>(GuestAddress(u64::MAX - 3)),
        Err(GuestMemoryError::GuestAddressOverflow)
    ));
    assert!(!view.check_range(GuestAddress(u64::MAX), 2, Permissions::Read));
    assert!(view.store(1u32, GuestAddress(u64::MAX - 1), Ordering::Relaxed).is_err());
    assert!(view
        .get_slices(GuestAddress(u64::MAX), usize::MAX, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .is_err());

    // Through vm-memory's IommuMemory, whose IOTLB cannot hold an end at 2^64: the last page
    // below its last byte works, the rest is refused (never an overflow panic).
    face.write_obj(0x66u8, GuestAddress(top + 0x10)).unwrap();
    assert_eq!(guestmem::Bytes::read_obj::<u8>(&**face.get_backend(), ga(0x2010)).unwrap(), 0x66);
    assert!(face.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
    assert!(face.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
    assert!(!face.check_range(GuestAddress(u64::MAX - 1), usize::MAX, Permissions::Read));
    assert!(face.read_slice(&mut [0u8; 16], GuestAddress(0)).is_err());
}

#[test]
fn the_face_follows_the_iotlb_and_asks_its_resolver_once() {
    let mem = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let iotlb = Iotlb::new();
    let asked = Arc::new(AtomicUsize::new(0));
    let (model, count) = (iotlb.clone(), asked.clone());
    // The model maps a missed page onto guest page 3, read-only; it never grants writes.
    let face = IommuFace::new(&iotlb).with_resolver(move |iova, _len, access| {
        count.fetch_add(1, Ordering::Relaxed);
        access == Access::Read && model.update(Iova(iova.0 & !0xfff), PAGE, ga(0x3000), Perm::READ).is_ok()
    });
    let io = IommuMemory::new(mem, face, true, ());
    guestmem::Bytes::write_obj(&**io.get_backend(), 0xabcdu16, ga(0x3008)).unwrap();

    // A miss, resolved: one question.
    assert_eq!(io.read_obj::<u16>(GuestAddress(0x7_0008)).unwrap(), 0xabcd);
    assert_eq!(asked.load(Ordering::Relaxed), 1);
    // A hit: no question.
    assert_eq!(io.read_obj::<u16>(GuestAddress(0x7_0008)).unwrap(), 0xabcd);
    assert_eq!(asked.load(Ordering::Relaxed), 1);
    // A write to the read-only mapping: asked once, refused, nothing written.
    match io.write_obj(1u16, GuestAddress(0x7_0008)) {
        Err(e) => assert!(is_iommu_error(&e, 0x7_0008), "{e:?}"),
        Ok(()) => panic!("write through a read-only mapping"),
    }
    assert_eq!(asked.load(Ordering::Relaxed), 2);
    assert_eq!(guestmem::Bytes::read_obj::<u16>(&**io.get_backend(), ga(0x3008)).unwrap(), 0xabcd);
    // The model unmaps; the face sees it on the next access (and the resolver maps it again).
    iotlb.invalidate(Iova(0x7_0000), PAGE).unwrap();
    assert!(iotlb.snapshot().is_empty());
    assert!(io.check_range(GuestAddress(0x7_0000), 2, Permissions::Read));
    assert_eq!(asked.load(Ordering::Relaxed), 3);
    // The model changes the mapping behind the face's back: the next translation follows.
    map(&iotlb, 0x7_0000, PAGE, 0x5000, Perm::READ_WRITE);
    io.write_obj(0x1111u16, GuestAddress(0x7_0010)).unwrap();
    assert_eq!(guestmem::Bytes::read_obj::<u16>(&**io.get_backend(), ga(0x5010)).unwrap(), 0x1111);
    assert_eq!(asked.load(Ordering::Relaxed), 3);
}
