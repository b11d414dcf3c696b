//! Local migration by file descriptors: memfd- and file-backed memory handed to "another
//! process" (the other end of a Unix socket) and rebuilt there without a copy; and the
//! receiver against hostile descriptions: wrong sizes, seals promised but missing, a regular
//! file passed as a memfd, pipes and sockets, overlapping layouts, absurd counts. Every
//! `LocalError` variant is produced.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use guestmem::migration::local::{self, LocalError, ReceiveOptions, LOCAL_ACK, LOCAL_MAGIC};
use guestmem::mmap::{Backing, FileOffset, MemfdOptions, MmapRegionBuilder};
use guestmem::sys::fd::{FileKind, MemfdFlags, Seals};
use guestmem::sys::socket::send_with_fds;
use guestmem::sys::{self, Protection};
use guestmem::{
    AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const MIB: u64 = 1 << 20;

fn tmpfile(len: u64) -> std::fs::File {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

/// A memfd of `len` bytes with `seals` added.
fn memfd(len: u64, seals: Seals) -> std::fs::File {
    let fd = sys::memfd_create(c"test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    sys::fd::ftruncate(fd.as_fd(), len).unwrap();
    if !seals.is_empty() {
        sys::fd::add_seals(fd.as_fd(), seals).unwrap();
    }
    fd.into()
}

/// Source memory: a sealed memfd region, a region of a file at an offset, a read-only memfd.
fn source() -> GuestMemoryMmap<AtomicBitmap> {
    let ram = MmapRegionBuilder::new(8 * MIB as usize).backing(Backing::Memfd(MemfdOptions::new("ram")));
    let file = FileOffset::new(tmpfile(6 * MIB), 2 * MIB);
    let disk = MmapRegionBuilder::new(4 * MIB as usize).backing(Backing::File { file, shared: true });
    let rom = MmapRegionBuilder::new(MIB as usize)
        .backing(Backing::Memfd(MemfdOptions::new("rom")))
        .protection(Protection::READ);
    let rom = GuestRegionMmap::build(rom, GuestAddress(0xfff0_0000)).unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![
        GuestRegionMmap::build(ram, GuestAddress(0)).unwrap(),
        GuestRegionMmap::build(disk, GuestAddress(16 * MIB)).unwrap(),
        rom,
    ])
    .unwrap();
    for (i, r) in mem.iter().enumerate().take(2) {
        for p in (0..r.len()).step_by(4096) {
            mem.write_obj(p ^ (i as u64) << 60 | 1, GuestAddress(r.start_addr().0 + p)).unwrap();
        }
    }
    mem
}

#[test]
fn memfd_and_file_regions_move_without_a_copy() {
    let src = source();
    let (a, b) = UnixStream::pair().unwrap();
    let (report, dst) = std::thread::scope(|s| {
        let dst = s.spawn(|| local::receive::<AtomicBitmap>(&b, &ReceiveOptions::default()));
        (local::send(&a, &src).unwrap(), dst.join().unwrap().unwrap())
    });
    assert_eq!((report.regions, report.bytes), (3, 13 * MIB));
    // The description is all that went over the socket.
    assert_eq!(report.socket_bytes, 32 + 3 * 64);
    assert_eq!(dst.num_regions(), 3);
    assert_eq!(common::contents(&src), common::contents(&dst));
    // The same files at the same offsets: one memory, mapped twice.
    for (s, d) in src.regions().iter().zip(dst.regions()) {
        assert_eq!((s.start_addr(), s.len(), s.protection()), (d.start_addr(), d.len(), d.protection()));
        let (fs, fd) = (s.file_offset().unwrap(), d.file_offset().unwrap());
        assert!(sys::fstat(fs.as_fd()).unwrap().same_inode(&sys::fstat(fd.as_fd()).unwrap()));
        assert_eq!(fs.start(), fd.start());
        assert_ne!(s.as_ptr(), d.as_ptr());
    }
    // Writes on either side show on the other; the read-only region stays read-only.
    src.write_obj(0xfeed_u64, GuestAddress(0x1_2340)).unwrap();
    assert_eq!(dst.read_obj::<u64>(GuestAddress(0x1_2340)).unwrap(), 0xfeed);
    dst.write_obj(0xbeef_u64, GuestAddress(16 * MIB + 8)).unwrap();
    assert_eq!(src.read_obj::<u64>(GuestAddress(16 * MIB + 8)).unwrap(), 0xbeef);
    assert!(matches!(dst.write_obj(1u8, GuestAddress(0xfff0_0000)), Err(GuestMemoryError::ReadOnly { .. })));
    // The destination tracks its own writes, from a clean start.
    assert_eq!(dst.dirty_page_count().unwrap(), 1);
}

#[test]
fn a_region_whose_last_page_is_partial_moves_too() {
    let ram = MmapRegionBuilder::<AtomicBitmap>::new(MIB as usize + 100)
        .backing(Backing::Memfd(MemfdOptions::new("odd")));
    let src =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::build(ram, GuestAddress(0x10_0000)).unwrap()])
            .unwrap();
    src.write_slice(&[0x3c; 100], GuestAddress(0x20_0000)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let dst = std::thread::scope(|s| {
        let dst = s.spawn(|| local::receive::<AtomicBitmap>(&b, &ReceiveOptions::default()));
        local::send(&a, &src).unwrap();
        dst.join().unwrap().unwrap()
    });
    assert_eq!(dst.regions()[0].len(), MIB + 100);
    assert_eq!(common::contents(&src), common::contents(&dst));
    assert!(dst.write_obj(1u8, GuestAddress(0x20_0000 + 100)).is_err());
}

#[test]
fn hugetlb_memfds_keep_their_page_size() {
    if common::need("hugetlb", "hugetlb_memfds_keep_their_page_size", common::huge_pages(2)).is_none() {
        return;
    }
    let huge = MmapRegionBuilder::<()>::new(4 * MIB as usize)
        .backing(Backing::Memfd(MemfdOptions::new("huge")))
        .huge_pages(guestmem::mmap::HugePageSize::Size2M);
    let src =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::build(huge, GuestAddress(0)).unwrap()]).unwrap();
    src.write_obj(42u64, GuestAddress(3 * MIB)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let dst = std::thread::scope(|s| {
        let dst = s.spawn(|| local::receive::<()>(&b, &ReceiveOptions::default()));
        local::send(&a, &src).unwrap();
        dst.join().unwrap().unwrap()
    });
    assert_eq!(dst.regions()[0].page_size(), 2 << 20);
    assert!(dst.regions()[0].is_hugetlbfs());
    assert_eq!(dst.read_obj::<u64>(GuestAddress(3 * MIB)).unwrap(), 42);
}

#[test]
fn the_sender_refuses_memory_that_is_in_no_file() {
    let (a, _b) = UnixStream::pair().unwrap();
    let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
    let e = local::send(&a, &anon).unwrap_err();
    assert!(matches!(e, LocalError::NotShareable { addr: GuestAddress(0), .. }), "{e}");
    let file = FileOffset::new(tmpfile(MIB), 0);
    let private = MmapRegionBuilder::<()>::new(MIB as usize).backing(Backing::File { file, shared: false });
    let private =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::build(private, GuestAddress(0)).unwrap()])
            .unwrap();
    let e = local::send(&a, &private).unwrap_err();
    assert!(matches!(e, LocalError::NotShareable { reason, .. } if reason.contains("private")), "{e}");
}

// ---- Hostile descriptions ----

fn header(count: u32, total: u64) -> Vec<u8> {
    let mut h = LOCAL_MAGIC.to_vec();
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&total.to_le_bytes());
    h
}

/// A region record.
#[derive(Clone, Copy)]
struct Rec {
    addr: u64,
    size: u64,
    offset: u64,
    page: u64,
    kind: u32,
    seals: u32,
    prot: u32,
    flags: u32,
}

impl Rec {
    fn memfd(addr: u64, size: u64) -> Self {
        Rec { addr, size, offset: 0, page: 4096, kind: 1, seals: 0, prot: 3, flags: 0 }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut r = Vec::new();
        for v in [self.addr, self.size, self.offset, self.page] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.kind, self.seals, self.prot, self.flags] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r.extend_from_slice(&[0; 16]);
        r
    }
}

/// Sends `header` and the `records` (each with its descriptors) on one end, receives on the
/// other; returns the receiver's error.
fn hostile_with(
    header: &[u8],
    records: &[(Vec<u8>, Vec<BorrowedFd<'_>>)],
    options: &ReceiveOptions,
) -> LocalError {
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(header).unwrap();
    for (bytes, fds) in records {
        // A failed send can only mean the receiver is gone: it failed already.
        let _ = send_with_fds(a.as_fd(), bytes, fds);
    }
    drop(a);
    local::receive::<()>(&b, options).unwrap_err()
}

fn hostile(header: &[u8], records: &[(Vec<u8>, Vec<BorrowedFd<'_>>)]) -> LocalError {
    hostile_with(header, records, &ReceiveOptions::default())
}

/// One record with one descriptor, under a matching header.
fn one(rec: Rec, fd: BorrowedFd<'_>) -> LocalError {
    hostile(&header(1, rec.size), &[(rec.bytes(), vec![fd])])
}

#[test]
fn hostile_headers() {
    let sealed = memfd(MIB, Seals::SHRINK);
    let rec = (Rec::memfd(0, MIB).bytes(), vec![sealed.as_fd()]);
    let mut bad = header(1, MIB);
    bad[0] ^= 1;
    assert!(matches!(hostile(&bad, &[]), LocalError::BadMagic(_)));
    let mut v2 = header(1, MIB);
    v2[8] = 2;
    assert!(matches!(hostile(&v2, &[]), LocalError::UnsupportedVersion(2)));
    let mut flags = header(1, MIB);
    flags[12] = 1;
    assert!(matches!(hostile(&flags, &[]), LocalError::Invalid { record: None, .. }));
    assert!(
        matches!(hostile(&header(0, 0), &[]), LocalError::Invalid { record: None, what } if what.contains("count"))
    );
    // Absurd counts: refused before anything is allocated for them.
    let e = hostile(&header(u32::MAX, MIB), &[]);
    assert!(matches!(e, LocalError::TooManyRegions { count, max: 256 } if count == u32::MAX as u64), "{e}");
    let few = ReceiveOptions { max_regions: 1, ..Default::default() };
    assert!(matches!(
        hostile_with(&header(2, 2 * MIB), &[], &few),
        LocalError::TooManyRegions { max: 1, .. }
    ));
    // A total that the records do not add up to.
    let e = hostile(&header(1, 2 * MIB), std::slice::from_ref(&rec));
    assert!(matches!(e, LocalError::Invalid { record: None, what } if what.contains("total")), "{e}");
    // Cut short: in the header, in a record, and no record at all.
    assert!(matches!(
        hostile(&header(1, MIB)[..10], &[]),
        LocalError::Truncated { what: "the header", got: 10, .. }
    ));
    let e = hostile(&header(1, MIB), &[(rec.0[..40].to_vec(), rec.1.clone())]);
    assert!(matches!(e, LocalError::Truncated { what: "a region record", got: 40, .. }), "{e}");
    assert!(matches!(hostile(&header(1, MIB), &[]), LocalError::Truncated { got: 0, .. }));
    // A header that carries a descriptor.
    let (a, b) = UnixStream::pair().unwrap();
    send_with_fds(a.as_fd(), &header(1, MIB), &[sealed.as_fd()]).unwrap();
    let e = local::receive::<()>(&b, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, LocalError::Descriptors { record: None, expected: 0, .. }), "{e}");
}

#[test]
fn hostile_records() {
    let sealed = memfd(MIB, Seals::SHRINK | Seals::GROW);
    let fd = sealed.as_fd();
    let good = Rec::memfd(0, MIB);
    // Fields the protocol does not allow.
    let cases: Vec<(Rec, &str)> = vec![
        (Rec { prot: 2, ..good }, "protection"),
        (Rec { prot: 0, ..good }, "protection"),
        (Rec { flags: 2, ..good }, "flags"),
        (Rec { kind: 3, ..good }, "kind"),
        (Rec { seals: 0x100, ..good }, "seals"),
        (Rec { page: 8192, ..good }, "page size"),
        (Rec { page: 2 << 20, ..good }, "page size"), // huge, but not flagged hugetlb
        (Rec { size: 0, ..good }, "size"),
        (Rec { size: u64::MAX, ..good }, "size"),
        // Huge pages are whole (a region of base pages may end with a partial page).
        (Rec { page: 2 << 20, flags: 1, size: (2 << 20) + 4096, ..good }, "size"),
        (Rec { offset: 100, ..good }, "offset"),
        (Rec { offset: u64::MAX - 4095, ..good }, "offset"),
        (Rec { addr: 0x1234, ..good }, "guest address"),
        (Rec { addr: u64::MAX - 4095, ..good }, "guest address"),
    ];
    for (rec, what) in cases {
        let e = one(rec, fd);
        assert!(matches!(e, LocalError::Invalid { record: Some(0), what: w } if w == what), "{what}: {e}");
    }
    let mut reserved = good.bytes();
    reserved[60] = 1;
    let e = hostile(&header(1, MIB), &[(reserved, vec![fd])]);
    assert!(matches!(e, LocalError::Invalid { what: "reserved bytes", .. }), "{e}");
    // No descriptor, two, many.
    for n in [0usize, 2, 3, guestmem::sys::socket::MAX_FDS] {
        let e = hostile(&header(1, MIB), &[(good.bytes(), vec![fd; n])]);
        assert!(matches!(e, LocalError::Descriptors { record: Some(0), expected: 1, .. }), "{n}: {e}");
    }
    // A descriptor in the middle of a record.
    let bytes = good.bytes();
    let e = hostile(&header(1, MIB), &[(bytes[..8].to_vec(), vec![fd]), (bytes[8..].to_vec(), vec![fd])]);
    assert!(matches!(e, LocalError::Descriptors { record: Some(0), truncated: true, .. }), "{e}");
}

#[test]
fn hostile_descriptors() {
    let sealed = memfd(MIB, Seals::SHRINK);
    let good = Rec::memfd(0, MIB);
    // Not regular files: a pipe, a socket, a character device, a directory.
    let (r, _w) = std::io::pipe().unwrap();
    let (s, _t) = UnixStream::pair().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let dir = std::fs::File::open("/").unwrap();
    for (fd, kind) in [
        (r.as_fd(), FileKind::Fifo),
        (s.as_fd(), FileKind::Socket),
        (null.as_fd(), FileKind::CharDevice),
        (dir.as_fd(), FileKind::Directory),
    ] {
        let e = one(Rec { kind: 2, ..good }, fd);
        assert!(matches!(e, LocalError::NotAFile { record: 0, kind: k } if k == kind), "{kind:?}: {e}");
    }
    // Wrong sizes: a memfd shorter than the region, a region past the file's end at an offset.
    let e = one(Rec::memfd(0, 2 * MIB), sealed.as_fd());
    assert!(
        matches!(e, LocalError::FileTooShort { record: 0, file_size, end } if file_size == MIB && end == 2 * MIB),
        "{e}"
    );
    let e = one(Rec { offset: MIB / 2, ..good }, sealed.as_fd());
    assert!(matches!(e, LocalError::FileTooShort { .. }), "{e}");
    // A partial last page is mapped whole: the file must hold all of it.
    let e = one(Rec::memfd(0, MIB - 100 + 4096), sealed.as_fd());
    assert!(
        matches!(e, LocalError::FileTooShort { record: 0, file_size, end } if file_size == MIB && end == MIB + 4096),
        "{e}"
    );
    // A regular file passed as a memfd.
    let file = tmpfile(MIB);
    let e = one(good, file.as_fd());
    assert!(matches!(e, LocalError::NotMemfd { record: 0, .. }), "{e}");
    // Sealing promised, not there.
    let unsealed = memfd(MIB, Seals::empty());
    let e = one(Rec { seals: (Seals::SHRINK | Seals::GROW).bits() as u32, ..good }, unsealed.as_fd());
    assert!(matches!(e, LocalError::SealsBroken { record: 0, actual, .. } if actual.is_empty()), "{e}");
    let e = one(Rec { seals: Seals::GROW.bits() as u32, ..good }, sealed.as_fd());
    assert!(matches!(e, LocalError::SealsBroken { .. }), "{e}");
    // Honestly unsealed: refused all the same (it could be truncated under the mapping),
    // however it is described.
    for kind in [1, 2] {
        let e = one(Rec { kind, ..good }, unsealed.as_fd());
        assert!(matches!(e, LocalError::Unsealed { record: 0, required: Seals::SHRINK, .. }), "{e}");
    }
    // ... unless the receiver requires nothing.
    let lax = ReceiveOptions { require_memfd_seals: Seals::empty(), ..Default::default() };
    let (a, b) = UnixStream::pair().unwrap();
    let mut msg = header(1, MIB);
    msg.extend(good.bytes());
    (&a).write_all(&msg[..32]).unwrap();
    send_with_fds(a.as_fd(), &msg[32..], &[unsealed.as_fd()]).unwrap();
    let mem = local::receive::<()>(&b, &lax).unwrap();
    assert_eq!(mem.num_regions(), 1);
    // A huge page size for a memfd of normal pages.
    let e =
        one(Rec { page: 2 << 20, flags: 1, size: 2 << 20, ..good }, memfd(2 << 20, Seals::SHRINK).as_fd());
    assert!(
        matches!(e, LocalError::PageSize { record: 0, described, actual: 4096 } if described == 2 << 20),
        "{e}"
    );
}

#[test]
fn hostile_layouts() {
    let a = memfd(2 * MIB, Seals::SHRINK);
    let b = memfd(2 * MIB, Seals::SHRINK);
    // Overlapping guest ranges (in either order).
    for (first, second) in [(0, MIB), (MIB, 0), (0, 0)] {
        let e = hostile(
            &header(2, 4 * MIB),
            &[
                (Rec::memfd(first, 2 * MIB).bytes(), vec![a.as_fd()]),
                (Rec::memfd(second, 2 * MIB).bytes(), vec![b.as_fd()]),
            ],
        );
        assert!(matches!(e, LocalError::Overlap { .. }), "{first:#x} {second:#x}: {e}");
    }
    // Two regions mapping the same bytes of one memfd: refused when the memory is built.
    let e = hostile(
        &header(2, 2 * MIB),
        &[
            (Rec::memfd(0, MIB).bytes(), vec![a.as_fd()]),
            (Rec { offset: MIB / 2, ..Rec::memfd(4 * MIB, MIB) }.bytes(), vec![a.as_fd()]),
        ],
    );
    assert!(matches!(e, LocalError::Memory(GuestMemoryError::RegionAlias { .. })), "{e}");
    // A memfd sealed against writes cannot be mapped writable: the mapping fails.
    let ro = memfd(MIB, Seals::SHRINK | Seals::WRITE);
    let e =
        one(Rec { seals: (Seals::SHRINK | Seals::WRITE).bits() as u32, ..Rec::memfd(0, MIB) }, ro.as_fd());
    assert!(matches!(e, LocalError::Memory(GuestMemoryError::Mmap { .. })), "{e}");
}

#[test]
fn a_refused_description_leaks_no_descriptor() {
    // The read end of a pipe, passed where a file is expected: once the receiver refused it
    // and we close our own read end, no read end may be left, so a write fails with EPIPE.
    let (r, mut w) = std::io::pipe().unwrap();
    let e = one(Rec { kind: 2, ..Rec::memfd(0, MIB) }, r.as_fd());
    assert!(matches!(e, LocalError::NotAFile { .. }), "{e}");
    drop(r);
    assert_eq!(w.write(b"x").unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    // The same for a descriptor that came in excess.
    let (r, mut w) = std::io::pipe().unwrap();
    let sealed = memfd(MIB, Seals::SHRINK);
    let e = hostile(&header(1, MIB), &[(Rec::memfd(0, MIB).bytes(), vec![sealed.as_fd(), r.as_fd()])]);
    assert!(matches!(e, LocalError::Descriptors { .. }), "{e}");
    drop(r);
    assert_eq!(w.write(b"x").unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
}

#[test]
fn the_sender_sees_a_refusal_and_a_bad_acknowledgement() {
    let src = source();
    // The receiver reads the description and hangs up.
    let (a, b) = UnixStream::pair().unwrap();
    let e = std::thread::scope(|s| {
        s.spawn(move || {
            let mut buf = [0u8; 32 + 3 * 64];
            let _ = std::io::Read::read_exact(&mut &b, &mut buf);
        });
        local::send(&a, &src).unwrap_err()
    });
    assert!(matches!(e, LocalError::Refused), "{e}");
    // An acknowledgement that is not one, or for another number of regions.
    for ack in [*b"NOTANACK\x03\0\0\0\0\0\0\0", {
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&LOCAL_ACK);
        x[8] = 2;
        x
    }] {
        let (a, b) = UnixStream::pair().unwrap();
        (&b).write_all(&ack).unwrap();
        let e = local::send(&a, &src).unwrap_err();
        assert!(matches!(e, LocalError::BadMagic(_) | LocalError::Invalid { .. }), "{e}");
    }
    // A socket whose peer is gone.
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    assert!(matches!(local::send(&a, &src), Err(LocalError::Io { .. })));
}

#[test]
fn every_local_error_variant_is_produced() {
    let name = |e: &LocalError| match e {
        LocalError::Io { .. } => "Io",
        LocalError::Truncated { .. } => "Truncated",
        LocalError::BadMagic(_) => "BadMagic",
        LocalError::UnsupportedVersion(_) => "UnsupportedVersion",
        LocalError::TooManyRegions { .. } => "TooManyRegions",
        LocalError::Invalid { .. } => "Invalid",
        LocalError::Descriptors { .. } => "Descriptors",
        LocalError::NotAFile { .. } => "NotAFile",
        LocalError::NotMemfd { .. } => "NotMemfd",
        LocalError::SealsBroken { .. } => "SealsBroken",
        LocalError::Unsealed { .. } => "Unsealed",
        LocalError::PageSize { .. } => "PageSize",
        LocalError::FileTooShort { .. } => "FileTooShort",
        LocalError::Overlap { .. } => "Overlap",
        LocalError::NotShareable { .. } => "NotShareable",
        LocalError::Memory(_) => "Memory",
        LocalError::Refused => "Refused",
    };
    let sealed = memfd(MIB, Seals::SHRINK);
    let unsealed = memfd(MIB, Seals::empty());
    let good = Rec::memfd(0, MIB);
    let (pipe, _w) = std::io::pipe().unwrap();
    let file = tmpfile(MIB);
    let mut bad_magic = header(1, MIB);
    bad_magic[0] = 0;
    let mut v2 = header(1, MIB);
    v2[8] = 2;
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    let src = source();
    let refused = {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        (local::send(&a, &src).unwrap_err(), local::send(&a, &anon).unwrap_err())
    };
    let refusal = {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut buf = [0u8; 32 + 3 * 64];
                let _ = std::io::Read::read_exact(&mut &b, &mut buf);
            });
            local::send(&a, &src).unwrap_err()
        })
    };
    drop(a);
    let ro = memfd(MIB, Seals::SHRINK | Seals::WRITE);
    let produced = vec![
        refused.0,
        hostile(&header(1, MIB)[..10], &[]),
        hostile(&bad_magic, &[]),
        hostile(&v2, &[]),
        hostile(&header(u32::MAX, 0), &[]),
        one(Rec { kind: 9, ..good }, sealed.as_fd()),
        hostile(&header(1, MIB), &[(good.bytes(), vec![])]),
        one(Rec { kind: 2, ..good }, pipe.as_fd()),
        one(good, file.as_fd()),
        one(Rec { seals: Seals::SHRINK.bits() as u32, ..good }, unsealed.as_fd()),
        one(good, unsealed.as_fd()),
        one(Rec { page: 2 << 20, flags: 1, size: 2 << 20, ..good }, memfd(2 << 20, Seals::SHRINK).as_fd()),
        one(Rec::memfd(0, 2 * MIB), sealed.as_fd()),
        hostile(
            &header(2, 2 * MIB),
            &[(good.bytes(), vec![sealed.as_fd()]), (Rec::memfd(0, MIB).bytes(), vec![sealed.as_fd()])],
        ),
        refused.1,
        one(Rec { seals: (Seals::SHRINK | Seals::WRITE).bits() as u32, ..good }, ro.as_fd()),
        refusal,
    ];
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Io",
            "Truncated",
            "BadMagic",
            "UnsupportedVersion",
            "TooManyRegions",
            "Invalid",
            "Descriptors",
            "NotAFile",
            "NotMemfd",
            "SealsBroken",
            "Unsealed",
            "PageSize",
            "FileTooShort",
            "Overlap",
            "NotShareable",
            "Memory",
            "Refused",
        ],
        true,
    );
}
