//! The rust-vmm bridge (`guestmem::compat`, feature `vm-memory`) against real parts:
//! vm-memory's own `GuestMemoryMmap` as the model of the drop-in's answers, virtio-queue
//! chains whose writes must show up in guestmem's harvest, linux-loader loading a real kernel,
//! the crash tests' hostile calls repeated through the views (each in a child process, as in
//! tests/crash.rs), and every `compat::Error` variant from a real call.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guestmem::bitmap::AtomicBitmap;
use guestmem::compat::{self, AtomicView, PermissionView};
use guestmem::mmap::MmapRegionBuilder;
use guestmem::sys::Protection;
use guestmem::{GuestMemoryAtomic, GuestRegionMmap};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, MemoryRegionAddress, Permissions, VolatileMemory,
};

const PAGE: usize = 4096;

type Mem = guestmem::GuestMemoryMmap<AtomicBitmap>;

fn ga(a: u64) -> guestmem::GuestAddress {
    guestmem::GuestAddress(a)
}

fn region(base: u64, size: usize, prot: Protection) -> GuestRegionMmap<AtomicBitmap> {
    GuestRegionMmap::build(MmapRegionBuilder::new(size).protection(prot), ga(base)).unwrap()
}

/// tests/crash.rs's memory: two adjacent regions, a hole, a read-only region, one ending at
/// 2^64; and here also a writable region right below a read-only one.
fn memory() -> Mem {
    let rw = Protection::READ | Protection::WRITE;
    Mem::from_regions(vec![
        region(0, 0x10000, rw),
        region(0x10000, 0x10000, rw),
        region(0x40000, 0x1000, Protection::READ),
        region(0x50000, 0x1000, rw),
        region(0x51000, 0x1000, Protection::READ),
        region(u64::MAX - 0xfff, 0x1000, rw),
    ])
    .unwrap()
}

/// Takes guestmem's harvest as (start, len) runs.
fn harvest(mem: &Mem) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    mem.take_dirty_ranges(|a, l| runs.push((a.0, l))).unwrap();
    runs
}

// ---------------------------------------------------------------------------------------------
// The drop-in answers as vm-memory's own GuestMemoryMmap does.

/// What a backend answers for a table of calls, in a comparable form.
fn trace<M: GuestMemoryBackend>(mem: &M) -> Vec<String> {
    let mut out = vec![format!("regions {} last {:?}", mem.num_regions(), mem.last_addr())];
    let addrs = [
        0u64, 0xfff, 0x1000, 0xfffc, 0xffff, 0x10000, 0x1fff8, 0x1ffff, 0x20000, 0x2fffc, 0x30000, 0x30ffc,
        0x31000,
    ];
    let lens = [0usize, 1, 2, 4, 8, 0x10, 0x1000, 0x10001, 0x20000];
    for &a in &addrs {
        let addr = GuestAddress(a);
        out.push(format!(
            "{a:#x}: find {:?} region_addr {:?} host {} check {:?} offset {:?}",
            mem.find_region(addr).map(|r| r.start_addr()),
            mem.to_region_addr(addr).map(|(_, o)| o),
            mem.get_host_address(addr).is_ok(),
            mem.check_address(addr),
            mem.checked_offset(addr, 0x1000),
        ));
        for &len in &lens {
            let buf = vec![0xa5u8; len];
            let mut back = vec![0u8; len];
            out.push(format!(
                "  {len:#x}: range {} write {:?} read {:?} write_slice {} read_slice {} slice {} slices {:?}",
                mem.check_range(addr, len),
                mem.write(&buf, addr).map_err(|e| e.to_string()),
                mem.read(&mut back, addr).map_err(|e| e.to_string()),
                mem.write_slice(&buf, addr).is_ok(),
                mem.read_slice(&mut back, addr).is_ok(),
                mem.get_slice(addr, len).map(|s| s.len()).map_err(|e| e.to_string()).is_ok(),
                GuestMemoryBackend::get_slices(mem, addr, len)
                    .map(|s| s.map(|s| s.len()).map_err(|e| e.to_string()))
                    .collect::<Vec<_>>(),
            ));
        }
        out.push(format!(
            "  obj {:?} {:?} atomics {:?} {:?} {:?}",
            mem.write_obj(0x1122_3344u32, addr).map_err(|e| e.to_string()),
            mem.read_obj::<u64>(addr).map_err(|e| e.to_string()),
            mem.store(7u16, addr, Ordering::Release).map_err(|e| e.to_string()),
            mem.load::<u16>(addr, Ordering::Acquire).map_err(|e| e.to_string()),
            mem.load::<u64>(addr, Ordering::Acquire).map_err(|e| e.to_string()),
        ));
        let mut src: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut dst = Vec::new();
        out.push(format!(
            "  io {:?} {:?} {:?}",
            mem.read_volatile_from(addr, &mut src, 9).map_err(|e| e.to_string()),
            mem.write_volatile_to(addr, &mut dst, 9).map_err(|e| e.to_string()),
            mem.read_exact_volatile_from(addr, &mut &[0u8; 3][..], 4).map_err(|e| e.to_string()),
        ));
    }
    out
}

#[test]
fn drop_in_answers_as_vm_memory_does() {
    let ranges =
        [(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000), (GuestAddress(0x30000), 0x1000)];
    let theirs = vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    let ours = compat::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    let (theirs, ours) = (trace(&theirs), trace(&ours));
    for (t, o) in theirs.iter().zip(&ours) {
        assert_eq!(t, o);
    }
    assert_eq!(theirs.len(), ours.len());

    // Regions whose sizes are not page multiples (as virtio-vsock's tests make) end where
    // vm-memory's do.
    let ranges =
        [(GuestAddress(0), 0xfffc), (GuestAddress(0x10000), 0x10004), (GuestAddress(0x30000), 0xffd)];
    let theirs = trace(&vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap());
    let ours = trace(&compat::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap());
    for (t, o) in theirs.iter().zip(&ours) {
        assert_eq!(t, o);
    }
    assert_eq!(theirs.len(), ours.len());

    // The permission view of the same guestmem memory answers the same through `Bytes`.
    let mem =
        guestmem::GuestMemoryMmap::<()>::from_ranges(&[(ga(0), 0x10000), (ga(0x10000), 0x10000)]).unwrap();
    let view = PermissionView::new(&mem);
    let theirs = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x10000),
    ])
    .unwrap();
    for a in [0u64, 0xfffc, 0x1fffc, 0x20000] {
        for len in [0usize, 2, 8, 0x10000, 0x30000] {
            let buf = vec![3u8; len];
            let addr = GuestAddress(a);
            let fmt = |r: Result<usize, GuestMemoryError>| r.map_err(|e| e.to_string());
            assert_eq!(fmt(view.write(&buf, addr)), fmt(theirs.write(&buf, addr)), "write {a:#x}+{len:#x}");
            for access in [Permissions::Read, Permissions::Write, Permissions::ReadWrite] {
                assert_eq!(
                    GuestMemory::check_range(view, addr, len, access),
                    GuestMemory::check_range(&theirs, addr, len, access)
                );
            }
        }
    }
}

#[test]
fn drop_in_constructors_and_region_management() {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(0x2000).unwrap();
    let mem = compat::GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files(&[
        (GuestAddress(0), 0x2000, Some(vm_memory::FileOffset::new(f, 0))),
        (GuestAddress(0x4000), 0x1000, None),
    ])
    .unwrap();
    mem.write_obj(0xabu8, GuestAddress(0x1fff)).unwrap();
    let r = mem.find_region(GuestAddress(0)).unwrap();
    assert!(r.guestmem().file_offset().is_some());
    assert!(GuestMemoryRegion::file_offset(r).is_none()); // documented: guestmem's, not vm-memory's
    assert_eq!(r.is_hugetlbfs(), Some(false));
    assert_eq!(r.as_volatile_slice().unwrap().len(), 0x2000);
    assert_eq!(
        r.get_host_address(MemoryRegionAddress(0x1fff)).unwrap(),
        unsafe_free_host(r.as_ptr(), 0x1fff)
    );
    assert!(r.get_host_address(MemoryRegionAddress(0x2000)).is_err());
    assert!(r.bitmap().dirty_at(0x1fff)); // the guestmem bitmap, through vm-memory's face
    assert_eq!(harvest(&mem), [(0x1000, 0x1000)]);

    // Hotplug as vm-memory's collection does it: the old memory is unchanged.
    let extra = Arc::new(compat::GuestRegionMmap::from_range(GuestAddress(0x8000), 0x1000, None).unwrap());
    let grown = mem.insert_region(extra).unwrap();
    assert_eq!((mem.num_regions(), grown.num_regions()), (2, 3));
    assert!(grown
        .insert_region(Arc::new(
            compat::GuestRegionMmap::from_range(GuestAddress(0x8000), 0x1000, None).unwrap()
        ))
        .is_err());
    assert!(matches!(grown.remove_region(GuestAddress(0x8000), 0x2000), Err(compat::Error::NoRegion { .. })));
    let (shrunk, removed) = grown.remove_region(GuestAddress(0x8000), 0x1000).unwrap();
    assert_eq!((shrunk.num_regions(), removed.start_addr()), (2, GuestAddress(0x8000)));
    // A removed region stays usable while held.
    removed.write_obj(1u32, MemoryRegionAddress(0)).unwrap();

    // The views of memory you own.
    let owned = compat::GuestMemoryMmap::try_from(mem.clone().into_guestmem()).unwrap();
    assert_eq!(owned.as_permission_view().read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0xab);
    assert!(compat::GuestMemoryMmap::<()>::new().find_region(GuestAddress(0)).is_none());
    let single = compat::GuestRegionMmap::new(
        GuestRegionMmap::build(MmapRegionBuilder::<()>::new(PAGE), ga(0)).unwrap(),
    )
    .unwrap();
    let one = compat::GuestMemoryMmap::from_regions(vec![single]).unwrap();
    assert_eq!(one.iter().next().unwrap().size(), PAGE);
}

/// `ptr + off` without unsafe pointer arithmetic, to compare host addresses.
fn unsafe_free_host(ptr: *mut u8, off: usize) -> *mut u8 {
    ptr.wrapping_add(off)
}

// ---------------------------------------------------------------------------------------------
// virtio-queue over the views, with guestmem's harvest as the record of what the device wrote.

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;

/// A driver's queue setup: the device's `Queue` with the rings at DESC/AVAIL/USED.
fn queue<M: GuestMemory>(mem: &M) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// The test queue's rings, for the driver's side.
const RINGS: common::virtq::Rings = common::virtq::Rings { desc: DESC, avail: AVAIL, size: QSIZE };

fn offer<M: GuestMemory>(mem: &M, first: u16, nth: u16, bufs: &[(u64, u32, bool)]) {
    RINGS.offer(mem, first, nth, bufs)
}

#[test]
fn virtio_queue_writes_show_up_in_guestmem_harvest() {
    let mem = Mem::from_ranges(&[(ga(0), 0x10000), (ga(0x10000), 0x10000)]).unwrap();
    let view = PermissionView::new(&mem);
    let mut q = queue(view);
    // Chain 0: a device-readable request, then a device-writable reply that crosses from the
    // first region into the second (the iterator's cold path).
    let request = b"ping through the bridge";
    view.write_slice(request, GuestAddress(0x8000)).unwrap();
    offer(view, 0, 0, &[(0x8000, request.len() as u32, false), (0xff00, 0x200, true)]);
    // Chain 1: one writable buffer at 0x12345.
    offer(view, 2, 1, &[(0x12345, 0x10, true)]);
    harvest(&mem); // the driver's writes are the guest's, not the device's

    let chain = q.pop_descriptor_chain(view).unwrap();
    let head = chain.head_index();
    let mut reader = chain.clone().reader(view).unwrap();
    let mut got = vec![0u8; request.len()];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, request);
    let mut writer = chain.writer(view).unwrap();
    let reply = vec![0x5au8; 0x200];
    writer.write_all(&reply).unwrap();
    q.add_used(view, head, 0x200).unwrap();

    let chain = q.pop_descriptor_chain(view).unwrap();
    let head = chain.head_index();
    chain.writer(view).unwrap().write_obj(0xdead_beef_u32).unwrap();
    q.add_used(view, head, 4).unwrap();
    assert!(q.pop_descriptor_chain(view).is_none());

    let mut back = vec![0u8; 0x200];
    mem.read_slice_guestmem(&mut back, 0xff00);
    assert_eq!(back, reply);
    // Exactly the used ring's page, the reply's two pages, and chain 1's page.
    assert_eq!(harvest(&mem), [(USED, 0x1000), (0xf000, 0x2000), (0x12000, 0x1000)]);

    // Tracking off: the device's writes still go through, and harvesting says it cannot.
    let untracked =
        guestmem::GuestMemoryMmap::<Option<AtomicBitmap>>::from_regions(vec![GuestRegionMmap::build(
            MmapRegionBuilder::new(0x10000).dirty_tracking(false),
            ga(0),
        )
        .unwrap()])
        .unwrap();
    let view = PermissionView::new(&untracked);
    let mut q = queue(view);
    offer(view, 0, 0, &[(0x8000, 8, true)]);
    let chain = q.pop_descriptor_chain(view).unwrap();
    chain.writer(view).unwrap().write_obj(1u64).unwrap();
    assert!(untracked.take_dirty_ranges(|_, _| {}).is_err());
}

/// guestmem's own read, to check what the device wrote without going through the bridge.
trait ReadGuestmem {
    fn read_slice_guestmem(&self, buf: &mut [u8], addr: u64);
}

impl ReadGuestmem for Mem {
    fn read_slice_guestmem(&self, buf: &mut [u8], addr: u64) {
        guestmem::Bytes::read_slice(self, buf, ga(addr)).unwrap();
    }
}

#[test]
fn atomic_view_follows_hotplug_and_keeps_snapshots_mapped() {
    let atomic =
        GuestMemoryAtomic::new(Mem::from_ranges(&[(ga(0), 0x10000), (ga(0x10000), 0x10000)]).unwrap());
    let space = AtomicView::new(&atomic);
    let held = space.memory();
    let clone = held.clone();
    atomic.update(|m| m.remove_region(ga(0x10000), 0x10000).map(|(m, _)| m)).unwrap();
    // The old snapshot still reads and writes the removed region; the new one refuses it.
    held.write_obj(5u64, GuestAddress(0x10008)).unwrap();
    assert_eq!(clone.read_obj::<u64>(GuestAddress(0x10008)).unwrap(), 5);
    assert!(space.memory().read_obj::<u64>(GuestAddress(0x10008)).is_err());
    assert_eq!(AtomicView::from(atomic.clone()).clone().memory().regions().len(), 1);
    assert_eq!(space.guestmem().generation(), 1);
    assert_eq!(held.into_inner().regions().len(), 2);
    // The permission view knows its backend only when no region is read-only.
    assert!(space.memory().physical_memory().is_some());
    assert!(PermissionView::new(&memory()).physical_memory().is_none());
}

// ---------------------------------------------------------------------------------------------
// linux-loader loads a real kernel into guestmem memory.

/// A bzImage: GUESTMEM_KERNEL, the cache scripts/debian-kernel fills, or /boot.
fn kernel_image() -> Result<std::path::PathBuf, String> {
    let mut candidates = Vec::new();
    if let Ok(k) = std::env::var("GUESTMEM_KERNEL") {
        candidates.push(std::path::PathBuf::from(k));
    }
    let cache = std::env::var("GUESTMEM_CACHE").map(std::path::PathBuf::from).or_else(|_| {
        std::env::var("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|_| std::env::var("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|c| c.join("guestmem"))
    });
    if let Ok(cache) = cache {
        candidates.push(cache.join("vmlinuz"));
    }
    if let Ok(boot) = std::fs::read_dir("/boot") {
        let mut images: Vec<_> = boot
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("vmlinuz"))
            .collect();
        images.sort();
        candidates.extend(images);
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "no kernel image (set GUESTMEM_KERNEL, or run scripts/debian-kernel to fetch Debian's)".to_string()
    })
}

#[test]
fn linux_loader_loads_a_real_kernel() {
    use linux_loader::loader::{bzimage::BzImage, KernelLoader};
    let Some(path) = common::need("kernel", "linux_loader_loads_a_real_kernel", kernel_image()) else {
        return;
    };
    let image = std::fs::read(&path).unwrap();
    let mem = compat::GuestMemoryMmap::try_from(Mem::from_ranges(&[(ga(0), 32 << 20)]).unwrap()).unwrap();
    let loaded =
        BzImage::load(&mem, None, &mut std::io::Cursor::new(&image), Some(GuestAddress(0x100000))).unwrap();
    let setup = loaded.setup_header.unwrap();
    assert_eq!({ setup.header }, 0x5372_6448, "HdrS");
    let setup_sects = if image[0x1f1] == 0 { 4 } else { usize::from(image[0x1f1]) };
    let payload = &image[(setup_sects + 1) * 512..];
    assert_eq!(loaded.kernel_load, GuestAddress(0x100000));
    assert_eq!(loaded.kernel_end, 0x100000 + payload.len() as u64);
    // The bytes are the kernel's, and the harvest is exactly the pages loaded.
    let mut back = vec![0u8; payload.len()];
    mem.read_slice(&mut back, loaded.kernel_load).unwrap();
    assert!(back == payload, "loaded kernel differs from {}", path.display());
    let end = (loaded.kernel_end + PAGE as u64 - 1) & !(PAGE as u64 - 1);
    assert_eq!(harvest(&mem), [(0x100000, end - 0x100000)]);
    // Past the end of RAM is linux-loader's error, not a crash.
    assert!(BzImage::load(
        &mem,
        Some(GuestAddress((32 << 20) - 0x1000)),
        &mut std::io::Cursor::new(&image),
        None
    )
    .is_err());
}

// ---------------------------------------------------------------------------------------------
// Hostile calls through the views: each must return its error, in a child process.

const CASE_ENV: &str = "GUESTMEM_COMPAT_CASE";

type Case = (&'static str, fn() -> bool);

fn is_permission_denied(e: &GuestMemoryError) -> bool {
    matches!(e, GuestMemoryError::IOError(io) if io.kind() == std::io::ErrorKind::PermissionDenied)
}

fn cases() -> Vec<Case> {
    fn view_of(m: &Mem) -> &PermissionView<AtomicBitmap> {
        PermissionView::new(m)
    }
    vec![
        // The permission view and read-only memory.
        ("write_obj to a read-only region", || {
            let m = memory();
            view_of(&m).write_obj(1u32, GuestAddress(0x40000)).is_err_and(|e| is_permission_denied(&e))
        }),
        ("read_obj from a read-only region", || {
            let m = memory();
            view_of(&m).read_obj::<u32>(GuestAddress(0x40000)).is_err_and(|e| is_permission_denied(&e))
        }),
        ("write slice of a read-only region", || {
            let m = memory();
            let first = view_of(&m).get_slices(GuestAddress(0x40000), 16, Permissions::Write).unwrap().next();
            first.unwrap().is_err()
        }),
        ("read slice of a read-only region, then a write through it", || {
            // No slice is handed out, so there is nothing to write through.
            let m = memory();
            let mut slices = view_of(&m).get_slices(GuestAddress(0x40000), 16, Permissions::Read).unwrap();
            slices.next().unwrap().is_err() && slices.next().is_none()
        }),
        ("write_slice running from RAM into read-only memory", || {
            let m = memory();
            let v = view_of(&m);
            v.write_slice(&[1; 32], GuestAddress(0x50ff0)).is_err()
                && v.get_slices(GuestAddress(0x50ff0), 32, Permissions::Write)
                    .unwrap()
                    .nth(1)
                    .unwrap()
                    .is_err()
        }),
        ("atomic store to read-only memory", || {
            let m = memory();
            view_of(&m).store(1u32, GuestAddress(0x40000), Ordering::SeqCst).is_err()
        }),
        ("read_exact_volatile_from into read-only memory", || {
            let m = memory();
            view_of(&m).read_exact_volatile_from(GuestAddress(0x40000), &mut &[1u8; 16][..], 16).is_err()
        }),
        ("check_range of read-only memory", || {
            let m = memory();
            let v = view_of(&m);
            !v.check_range(GuestAddress(0x40000), 4, Permissions::Read)
                && !v.check_range(GuestAddress(0x50ff0), 0x20, Permissions::Write)
        }),
        ("virtio descriptor pointing into read-only memory", || {
            let m = memory();
            let v = view_of(&m);
            let mut q = queue(v);
            offer(v, 0, 0, &[(0x40000, 0x100, true)]);
            let chain = q.pop_descriptor_chain(v).unwrap();
            match chain.writer(v) {
                Ok(mut w) => w.write_all(&[1; 0x100]).is_err(),
                Err(_) => true,
            }
        }),
        // Holes, ends, wraps, alignment.
        ("write into a hole", || {
            let m = memory();
            matches!(
                view_of(&m).write_obj(1u8, GuestAddress(0x30000)),
                Err(GuestMemoryError::InvalidGuestAddress(_))
            )
        }),
        ("write_slice running into a hole", || {
            let m = memory();
            view_of(&m).write_slice(&[1; 64], GuestAddress(0x1fff0)).is_err()
        }),
        ("read running from a region into a hole", || {
            let m = memory();
            view_of(&m).read_obj::<u64>(GuestAddress(0x1fffc)).is_err()
        }),
        ("read wrapping past 2^64", || {
            // Refused before any slice (vm-memory would yield the part below 2^64, then go on
            // at address 0).
            let m = memory();
            let v = view_of(&m);
            let mut s = v.get_slices(GuestAddress(u64::MAX - 3), 8, Permissions::Read).unwrap();
            v.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err()
                && matches!(s.next(), Some(Err(GuestMemoryError::GuestAddressOverflow)))
                && s.next().is_none()
                && v.get_slices(GuestAddress(u64::MAX - 3), 4, Permissions::Read).unwrap().all(|s| s.is_ok())
        }),
        ("write_slice wrapping past 2^64", || {
            let m = memory();
            view_of(&m).write_slice(&[0; 16], GuestAddress(u64::MAX - 7)).is_err()
        }),
        ("huge read_slice from address 0", || {
            let m = memory();
            let mut buf = vec![0u8; 1 << 20];
            view_of(&m).read_slice(&mut buf, GuestAddress(0)).is_err()
        }),
        ("misaligned atomic store", || {
            let m = memory();
            view_of(&m).store(1u64, GuestAddress(0x1004), Ordering::SeqCst).is_err()
        }),
        ("atomic across two regions", || {
            let m = memory();
            view_of(&m).load::<u64>(GuestAddress(0xfffc), Ordering::SeqCst).is_err()
        }),
        ("zero-length access in a hole (vm-memory's answer: nothing to do)", || {
            let m = memory();
            view_of(&m).read_slice(&mut [], GuestAddress(0x30000)).is_ok()
        }),
        ("vm-memory slice: subslice past its end", || {
            let m = memory();
            let s = view_of(&m)
                .get_slices(GuestAddress(0), 16, Permissions::Write)
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
            s.subslice(8, 16).is_err()
                && s.write_obj(1u64, 12).is_err()
                && s.get_ref::<u64>(usize::MAX).is_err()
        }),
        // The backend view and the drop-in.
        ("backend view of memory with a read-only region", || {
            matches!(
                compat::GuestMemoryMmap::from_guestmem(&memory()),
                Err(compat::Error::ReadOnlyRegion { .. })
            ) && compat::GuestMemoryMmap::try_from(memory()).is_err()
        }),
        ("region view of a read-only region", || {
            let m = memory();
            compat::GuestRegionMmap::from_ref(&m.regions()[2]).is_err()
        }),
        ("writable part: read-only memory left out", || {
            let w = compat::GuestMemoryMmap::writable_part(&memory());
            w.find_region(GuestAddress(0x40000)).is_none()
                && matches!(
                    w.write_obj(1u8, GuestAddress(0x40000)),
                    Err(GuestMemoryError::InvalidGuestAddress(_))
                )
                && w.write_slice(&[1; 32], GuestAddress(0x50ff0)).is_err()
        }),
        ("backend get_slice across two regions", || {
            let w = compat::GuestMemoryMmap::writable_part(&memory());
            matches!(
                GuestMemoryBackend::get_slice(&w, GuestAddress(0xfff0), 32),
                Err(GuestMemoryError::InvalidBackendAddress)
            )
        }),
        ("backend host address in a hole", || {
            compat::GuestMemoryMmap::writable_part(&memory()).get_host_address(GuestAddress(0x30000)).is_err()
        }),
        ("region write past its end", || {
            let w = compat::GuestMemoryMmap::writable_part(&memory());
            let r = w.find_region(GuestAddress(0)).unwrap();
            r.write_obj(1u32, MemoryRegionAddress(0xfffe)).is_err()
                && r.get_slice(MemoryRegionAddress(u64::MAX), 2).is_err()
        }),
        ("drop-in region of 0x10_0004 bytes: accesses past its end", || {
            let m = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0004)]).unwrap();
            m.write_obj(1u64, GuestAddress(0x10_0000)).is_err()
                && m.read_obj::<u8>(GuestAddress(0x10_0004)).is_err()
                && m.get_slice(GuestAddress(0x10_0000), 5).is_err()
                && m.write_obj(1u32, GuestAddress(0x10_0000)).is_ok()
        }),
        ("drop-in region at an unaligned address", || {
            matches!(
                compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x800), 0x1000)]),
                Err(compat::Error::NotPageMultiple { .. })
            )
        }),
        ("drop-in region wrapping past 2^64", || {
            compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(!0xfff), 0x2000)]).is_err()
        }),
        ("drop-in overlapping regions", || {
            compat::GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 0x2000),
                (GuestAddress(0x1000), 0x1000),
            ])
            .is_err()
        }),
        ("drop-in of a file shorter than the region", || {
            let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
            f.set_len(0x1000).unwrap();
            compat::GuestMemoryMmap::<()>::from_ranges_with_files(&[(
                GuestAddress(0),
                0x2000,
                Some(vm_memory::FileOffset::new(f, 0)),
            )])
            .is_err()
        }),
        ("address arithmetic wrapping", || GuestAddress(u64::MAX).checked_add(1).is_none()),
    ]
}

/// The child side: run one case and exit 0 (it returned its error) or 1.
#[test]
fn case_runner() {
    let Ok(index) = std::env::var(CASE_ENV) else { return };
    let (_, case) = cases()[index.parse::<usize>().unwrap()];
    std::process::exit(if case() { 0 } else { 1 });
}

#[test]
fn hostile_calls_through_the_bridge_return_errors_and_never_crash() {
    let cases = cases();
    let names: Vec<&str> = cases.iter().map(|(name, _)| *name).collect();
    common::run_cases_in_children(&names, "case_runner", CASE_ENV);
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_compat_error_variant_from_a_real_call() {
    fn name(e: &compat::Error) -> &'static str {
        match e {
            compat::Error::NotPageMultiple { .. } => "NotPageMultiple",
            compat::Error::ReadOnlyRegion { .. } => "ReadOnlyRegion",
            compat::Error::ReadOnlyAccess { .. } => "ReadOnlyAccess",
            compat::Error::NoMemoryRegion => "NoMemoryRegion",
            compat::Error::UnsortedRegions { .. } => "UnsortedRegions",
            compat::Error::NoRegion { .. } => "NoRegion",
            compat::Error::Memory(_) => "Memory",
            compat::Error::VmMemory(_) => "VmMemory",
            compat::Error::VmVolatile(_) => "VmVolatile",
        }
    }
    let r = |base: u64| compat::GuestRegionMmap::<()>::from_range(GuestAddress(base), PAGE, None).unwrap();
    let m = memory();
    let read_only_access = {
        let GuestMemoryError::IOError(io) =
            PermissionView::new(&m).read_obj::<u8>(GuestAddress(0x40000)).unwrap_err()
        else {
            panic!("not an IOError")
        };
        *io.into_inner().unwrap().downcast::<compat::Error>().unwrap()
    };
    let vm_memory_error = || -> Result<(), compat::Error> {
        compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGE)])?
            .read_obj::<u64>(GuestAddress(PAGE as u64))?;
        Ok(())
    };
    let vm_volatile_error = || -> Result<(), compat::Error> {
        let mut buf = [0u8; 4];
        vm_memory::VolatileSlice::from(&mut buf[..]).get_slice(2, 4)?;
        Ok(())
    };
    let produced = vec![
        compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(4), PAGE)]).unwrap_err(),
        compat::GuestMemoryMmap::from_guestmem(&m).unwrap_err(),
        read_only_access,
        compat::GuestMemoryMmap::<()>::from_regions(vec![]).unwrap_err(),
        compat::GuestMemoryMmap::from_regions(vec![r(0x2000), r(0)]).unwrap_err(),
        compat::GuestMemoryMmap::from_regions(vec![r(0)])
            .unwrap()
            .remove_region(GuestAddress(0x1000), 0x1000)
            .unwrap_err(),
        compat::GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 2 * PAGE),
            (GuestAddress(PAGE as u64), PAGE),
        ])
        .unwrap_err(),
        vm_memory_error().unwrap_err(),
        vm_volatile_error().unwrap_err(),
    ];
    let all = [
        "NotPageMultiple",
        "ReadOnlyRegion",
        "ReadOnlyAccess",
        "NoMemoryRegion",
        "UnsortedRegions",
        "NoRegion",
        "Memory",
        "VmMemory",
        "VmVolatile",
    ];
    common::assert_every_variant(&produced, name, &all, true);
}
