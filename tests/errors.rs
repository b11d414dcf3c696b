//! Every variant of every public error enum is produced by a real call through the public API:
//! for each enum, an exhaustive `match` names the variants (a new variant does not compile until
//! it is listed here), and the test makes the library produce each one. (`HostError` is covered
//! by a unit test in `src/host`, which needs its private parsers; `KvmError`, `SnapshotError`,
//! `MigrationError` and `LocalError` in `tests/kvm.rs`, `tests/snapshot.rs`,
//! `tests/migration.rs` and `tests/local_migration.rs`.)

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use guestmem::bitmap::{AtomicBitmap, BitmapError, DirtyHarvest};
use guestmem::host;
use guestmem::mmap::{
    Backing, FileOffset, MemfdOptions, MmapError, MmapRegionBuilder, NumaPolicy, Reservation,
};
use guestmem::sys::{MapFlags, MemPolicy, Protection};
use guestmem::volatile::{ReadVolatile, ReadVolatileAt};
use guestmem::{
    Address, AddressError, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, VolatileError, VolatileSlice,
};

fn file(len: u64) -> std::fs::File {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

/// Asserts that `produced` names exactly the variants in `all`.
fn covers(what: &str, all: &[&'static str], produced: impl IntoIterator<Item = &'static str>) {
    let produced: BTreeSet<_> = produced.into_iter().collect();
    let all: BTreeSet<_> = all.iter().copied().collect();
    let missing: Vec<_> = all.difference(&produced).collect();
    assert!(missing.is_empty(), "{what}: no test produced {missing:?}");
}

#[test]
fn address_error() {
    let name = |e: &AddressError| match e {
        AddressError::NotPowerOfTwo(_) => "NotPowerOfTwo",
    };
    covers("AddressError", &["NotPowerOfTwo"], [GuestAddress(1).align_up(3).unwrap_err()].iter().map(name));
}

#[test]
fn volatile_error() {
    let name = |e: &VolatileError| match e {
        VolatileError::OutOfBounds { .. } => "OutOfBounds",
        VolatileError::Overflow { .. } => "Overflow",
        VolatileError::TooBig { .. } => "TooBig",
        VolatileError::Misaligned { .. } => "Misaligned",
        VolatileError::ReadOnly { .. } => "ReadOnly",
        VolatileError::PartialBuffer { .. } => "PartialBuffer",
        VolatileError::Io(_) => "Io",
    };
    let mut words = [0u64; 4];
    let s = VolatileSlice::from(zerocopy::IntoBytes::as_mut_bytes(&mut words[..]));
    // SAFETY: `words` outlives `ro`, and `ro` never writes (it is read-only).
    let ro = unsafe { VolatileSlice::with_bitmap(s.as_ptr(), 32, (), false) };
    let produced = [
        s.subslice(30, 4).unwrap_err(),
        s.subslice(usize::MAX, 4).unwrap_err(),
        s.get_array_ref::<u64>(0, usize::MAX).unwrap_err(),
        s.get_atomic_ref::<AtomicU32>(2).unwrap_err(),
        ro.write_obj(1u8, 0).unwrap_err(),
        (&[1u8][..]).read_exact_volatile(&s).unwrap_err(),
        file(8).read_volatile_at(&s, u64::MAX).unwrap_err(),
    ];
    covers(
        "VolatileError",
        &["OutOfBounds", "Overflow", "TooBig", "Misaligned", "ReadOnly", "PartialBuffer", "Io"],
        produced.iter().map(name),
    );
}

#[test]
fn mmap_error() {
    let name = |e: &MmapError| match e {
        MmapError::ZeroSize => "ZeroSize",
        MmapError::InvalidProtection(_) => "InvalidProtection",
        MmapError::InvalidAlignment(_) => "InvalidAlignment",
        MmapError::Unaligned { .. } => "Unaligned",
        MmapError::Overflow { .. } => "Overflow",
        MmapError::FileTooShort { .. } => "FileTooShort",
        MmapError::UnsizedFile { .. } => "UnsizedFile",
        MmapError::InvalidOption { .. } => "InvalidOption",
        MmapError::OutsideReservation { .. } => "OutsideReservation",
        MmapError::ReservationOverlap { .. } => "ReservationOverlap",
        MmapError::Mmap { .. } => "Mmap",
        MmapError::Os { .. } => "Os",
        MmapError::OptionRefused { .. } => "OptionRefused",
        MmapError::OutOfRange { .. } => "OutOfRange",
        MmapError::ReadOnly { .. } => "ReadOnly",
        MmapError::Bitmap(_) => "Bitmap",
        MmapError::Discard { .. } => "Discard",
    };
    let b = |size| MmapRegionBuilder::<()>::new(size);
    let page = host::page_size();
    let res = Reservation::new(4 * page).unwrap();
    let _first = b(page).in_reservation(res.clone(), 0).build().unwrap();
    let wo = {
        let path = std::env::temp_dir().join(format!("guestmem-cov-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(page as u64).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    };
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
    // A memfd sealed against future writes after it was mapped: punching a hole is refused.
    let sealed_later = {
        let fd = guestmem::sys::memfd_create(
            c"sealed-later",
            guestmem::sys::MemfdFlags::CLOEXEC | guestmem::sys::MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        guestmem::sys::fd::ftruncate(std::os::fd::AsFd::as_fd(&fd), page as u64).unwrap();
        let r = b(page)
            .backing(Backing::File { file: FileOffset::new(fd.into(), 0), shared: true })
            .build()
            .unwrap();
        let fo = r.file_offset().unwrap();
        guestmem::sys::fd::add_seals(std::os::fd::AsFd::as_fd(fo), guestmem::sys::Seals::FUTURE_WRITE)
            .unwrap();
        r
    };
    let region = b(page).build().unwrap();
    let ro = b(page).protection(Protection::READ).build().unwrap();
    let produced = [
        b(0).build().unwrap_err(),
        b(page).protection(Protection::WRITE).build().unwrap_err(),
        b(page).align(3).build().unwrap_err(),
        b(page + 1).build().unwrap_err(),
        b(page)
            .backing(Backing::File { file: FileOffset::new(file(0), u64::MAX - 4095), shared: true })
            .build()
            .unwrap_err(),
        b(2 * page)
            .backing(Backing::File { file: FileOffset::new(file(page as u64), 0), shared: true })
            .build()
            .unwrap_err(),
        b(page).backing(Backing::Anonymous { shared: true }).mergeable(true).build().unwrap_err(),
        b(page).in_reservation(res.clone(), 4 * page).build().unwrap_err(),
        b(page).in_reservation(res, 0).build().unwrap_err(),
        b(page).backing(Backing::File { file: FileOffset::new(wo, 0), shared: true }).build().unwrap_err(),
        b(page).backing(Backing::Memfd(MemfdOptions::new(&"x".repeat(300)))).build().unwrap_err(),
        b(page).numa(NumaPolicy { mode: MemPolicy::Bind, nodes: vec![1000] }).build().unwrap_err(),
        region.discard(0, 2 * page).unwrap_err(),
        ro.discard(0, page).unwrap_err(),
        sealed_later.discard(0, page).unwrap_err(),
        b(page).backing(Backing::File { file: FileOffset::new(null, 0), shared: true }).build().unwrap_err(),
        // 512 TiB of guest memory needs 16 TiB of bitmap: refused, not an abort.
        MmapRegionBuilder::<AtomicBitmap>::new(usize::MAX & !(page - 1)).build().unwrap_err(),
    ];
    covers(
        "MmapError",
        &[
            "ZeroSize",
            "InvalidProtection",
            "InvalidAlignment",
            "Unaligned",
            "Overflow",
            "FileTooShort",
            "UnsizedFile",
            "InvalidOption",
            "OutsideReservation",
            "ReservationOverlap",
            "Mmap",
            "Os",
            "OptionRefused",
            "OutOfRange",
            "ReadOnly",
            "Bitmap",
            "Discard",
        ],
        produced.iter().map(name),
    );
    // SAFETY: a failing call adopts nothing.
    let raw = unsafe {
        MmapRegionBuilder::<()>::build_raw(std::ptr::null_mut(), 0, Protection::READ, MapFlags::PRIVATE)
    };
    assert!(matches!(raw, Err(MmapError::ZeroSize)));
}

/// A window on a region that implements only the primitives of `Bytes`.
struct Window<'a>(&'a GuestRegionMmap);

impl Bytes<MemoryRegionAddress> for Window<'_> {
    type E = GuestMemoryError;
    fn write(&self, buf: &[u8], at: MemoryRegionAddress) -> Result<usize, GuestMemoryError> {
        self.0.write(buf, at)
    }
    fn read(&self, buf: &mut [u8], at: MemoryRegionAddress) -> Result<usize, GuestMemoryError> {
        self.0.read(buf, at)
    }
    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        at: MemoryRegionAddress,
        src: &mut F,
        n: usize,
    ) -> Result<usize, GuestMemoryError> {
        self.0.read_volatile_from(at, src, n)
    }
    fn write_volatile_to<F: guestmem::WriteVolatile + ?Sized>(
        &self,
        at: MemoryRegionAddress,
        dst: &mut F,
        n: usize,
    ) -> Result<usize, GuestMemoryError> {
        self.0.write_volatile_to(at, dst, n)
    }
    fn store<T: guestmem::AtomicAccess>(
        &self,
        v: T,
        at: MemoryRegionAddress,
        o: Ordering,
    ) -> Result<(), GuestMemoryError> {
        self.0.store(v, at, o)
    }
    fn load<T: guestmem::AtomicAccess>(
        &self,
        at: MemoryRegionAddress,
        o: Ordering,
    ) -> Result<T, GuestMemoryError> {
        self.0.load(at, o)
    }
}

/// A region type that claims another start than the region it holds.
#[derive(Debug)]
struct Liar(GuestRegionMmap);

impl GuestMemoryRegion for Liar {
    type B = ();
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.0.start_addr().0 + 0x1000)
    }
    fn protection(&self) -> Protection {
        self.0.protection()
    }
    fn bitmap(&self) -> &() {
        self.0.bitmap()
    }
    fn file_offset(&self) -> Option<&FileOffset> {
        self.0.file_offset()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.0.host_ptr()
    }
    fn get_slice(
        &self,
        at: MemoryRegionAddress,
        n: usize,
    ) -> Result<VolatileSlice<'_, guestmem::region::BS<'_, ()>>, GuestMemoryError> {
        self.0.get_slice(at, n)
    }
}

impl guestmem::memory::AsGuestRegionMmap for Liar {
    fn guest_region_mmap(&self) -> &GuestRegionMmap {
        &self.0
    }
}

#[test]
fn guest_memory_error() {
    let name = |e: &GuestMemoryError| match e {
        GuestMemoryError::InvalidGuestAddress(_) => "InvalidGuestAddress",
        GuestMemoryError::InvalidRange { .. } => "InvalidRange",
        GuestMemoryError::Overflow { .. } => "Overflow",
        GuestMemoryError::NotContiguous { .. } => "NotContiguous",
        GuestMemoryError::ReadOnly { .. } => "ReadOnly",
        GuestMemoryError::PartialBuffer { .. } => "PartialBuffer",
        GuestMemoryError::Access { .. } => "Access",
        GuestMemoryError::RegionOverflow { .. } => "RegionOverflow",
        GuestMemoryError::RegionOverlap { .. } => "RegionOverlap",
        GuestMemoryError::UnalignedRegion { .. } => "UnalignedRegion",
        GuestMemoryError::InvalidRegionOffset { .. } => "InvalidRegionOffset",
        GuestMemoryError::RegionAlias { .. } => "RegionAlias",
        GuestMemoryError::NoRegionAt(_) => "NoRegionAt",
        GuestMemoryError::Mmap { .. } => "Mmap",
        GuestMemoryError::PartialRegionBuffer { .. } => "PartialRegionBuffer",
        GuestMemoryError::RegionSizeMismatch { .. } => "RegionSizeMismatch",
        GuestMemoryError::InvalidRegionLength { .. } => "InvalidRegionLength",
        GuestMemoryError::InconsistentRegion { .. } => "InconsistentRegion",
    };
    let top = u64::MAX - 0xfff;
    let mem = GuestMemoryMmap::<()>::from_regions(vec![
        GuestRegionMmap::build(MmapRegionBuilder::new(0x2000), GuestAddress(0)).unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x1000), GuestAddress(0x2000)).unwrap(),
        GuestRegionMmap::build(
            MmapRegionBuilder::new(0x1000).protection(Protection::READ),
            GuestAddress(0x8000),
        )
        .unwrap(),
        GuestRegionMmap::build(MmapRegionBuilder::new(0x1000), GuestAddress(top)).unwrap(),
    ])
    .unwrap();
    let produced = [
        mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap_err(),
        mem.read_obj::<u64>(GuestAddress(0x2ffc)).unwrap_err(),
        mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).unwrap_err(),
        mem.get_slice(GuestAddress(0x1ff0), 32).unwrap_err(),
        mem.write_obj(1u8, GuestAddress(0x8000)).unwrap_err(),
        mem.read_exact_volatile_from(GuestAddress(0), &mut &[1u8][..], 4).unwrap_err(),
        mem.store(1u32, GuestAddress(2), Ordering::SeqCst).unwrap_err(),
        GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x2000), GuestAddress(top)).unwrap_err(),
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 0x1000)])
            .unwrap_err(),
        mem.remove_region(GuestAddress(0x1000), 0x1000).unwrap_err(),
        mem.remove_region(GuestAddress(0), 0x1000).unwrap_err(),
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0)]).unwrap_err(),
        GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x1000), GuestAddress(0x1004)).unwrap_err(),
        mem.regions()[0].read_obj::<u32>(MemoryRegionAddress(0x1ffe)).unwrap_err(),
        {
            let memfd =
                MmapRegionBuilder::<()>::new(0x2000).backing(Backing::Memfd(MemfdOptions::new("alias")));
            let a = GuestRegionMmap::build(memfd, GuestAddress(0)).unwrap();
            let file = a.file_offset().unwrap().with_start(0x1000);
            let b = MmapRegionBuilder::<()>::new(0x1000).backing(Backing::File { file, shared: true });
            let b = GuestRegionMmap::build(b, GuestAddress(0x10000)).unwrap();
            GuestMemoryMmap::from_regions(vec![a, b]).unwrap_err()
        },
        // A region type of a VMM's own that writes only the primitives of `Bytes`: the
        // provided `write_slice` reports a short write by region offset.
        Window(&mem.regions()[1]).write_slice(&[1; 8], MemoryRegionAddress(0xffc)).unwrap_err(),
        GuestRegionMmap::with_len(mem.regions()[0].get_mmap(), GuestAddress(0x10000), 0x1000).unwrap_err(),
        {
            let r = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x1000), GuestAddress(0)).unwrap();
            guestmem::memory::GuestRegionCollection::from_regions(vec![Liar(r)]).unwrap_err()
        },
        // The same mapping at two guest addresses of one memory.
        {
            let again =
                GuestRegionMmap::with_arc(mem.regions()[1].get_mmap(), GuestAddress(0x20000)).unwrap();
            mem.insert_region(std::sync::Arc::new(again)).unwrap_err()
        },
    ];
    covers(
        "GuestMemoryError",
        &[
            "InvalidGuestAddress",
            "InvalidRange",
            "Overflow",
            "NotContiguous",
            "ReadOnly",
            "PartialBuffer",
            "Access",
            "RegionOverflow",
            "RegionOverlap",
            "UnalignedRegion",
            "InvalidRegionOffset",
            "RegionAlias",
            "NoRegionAt",
            "Mmap",
            "PartialRegionBuffer",
            "RegionSizeMismatch",
            "InvalidRegionLength",
            "InconsistentRegion",
        ],
        produced.iter().map(name),
    );
}

#[test]
fn bitmap_error() {
    let name = |e: &BitmapError| match e {
        BitmapError::InvalidPageSize { .. } => "InvalidPageSize",
        BitmapError::OutOfMemory { .. } => "OutOfMemory",
        BitmapError::BufferTooShort { .. } => "BufferTooShort",
        BitmapError::TooManyWords { .. } => "TooManyWords",
        BitmapError::InvalidWindow { .. } => "InvalidWindow",
        BitmapError::SharedWords { .. } => "SharedWords",
        BitmapError::NotTracking => "NotTracking",
    };
    let bm = AtomicBitmap::new(1 << 20, 4096).unwrap();
    let mut shared = AtomicBitmap::new(1 << 20, 4096).unwrap();
    let window = shared.window(0, 1 << 19).unwrap();
    let none: Option<AtomicBitmap> = None;
    let produced = [
        AtomicBitmap::new(4096, 3).unwrap_err(),
        AtomicBitmap::new(usize::MAX, 1).unwrap_err(),
        bm.take_dirty_words(&mut [0u64; 1]).unwrap_err(),
        bm.merge_words(&[0u64; 100]).unwrap_err(),
        bm.window(4096, 64 * 4096).unwrap_err(),
        shared.enlarge(4096).unwrap_err(),
        none.dirty_page_count().unwrap_err(),
    ];
    drop(window);
    covers(
        "BitmapError",
        &[
            "InvalidPageSize",
            "OutOfMemory",
            "BufferTooShort",
            "TooManyWords",
            "InvalidWindow",
            "SharedWords",
            "NotTracking",
        ],
        produced.iter().map(name),
    );
}
