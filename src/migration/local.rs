//! Local migration: hand guest memory to another process on the same host (a VMM upgrade, a
//! live update) by passing its file descriptors over a Unix socket (`SCM_RIGHTS`) with a
//! description of the layout, instead of copying its contents. The other side maps the same
//! memfds and files and rebuilds the same [`GuestMemoryMmap`]: not a byte of guest memory
//! moves, and both processes see the same memory from then on.
//!
//! Only regions that are shared mappings of a memfd or a file can go this way ([`send`]
//! refuses the others: their pages are in no file). The receiver ([`receive`]) takes the
//! description and the descriptors as hostile input and checks everything before it maps
//! anything:
//!
//! - counts are bounded ([`ReceiveOptions::max_regions`]), and nothing is allocated before the
//!   count is checked;
//! - every record has exactly one descriptor, and only known kinds, flags and protections;
//!   offsets and guest addresses are multiples of the page size, sizes too on hugetlbfs (a
//!   region of base pages may end with a partial page), and nothing overflows;
//! - the descriptor is a regular file (`fstat`), long enough for the region's whole pages, on
//!   a filesystem
//!   whose page size is the one described (hugetlbfs is detected with `fstatfs`);
//! - a region described as a memfd is one (its `/proc/self/fd` link), its seals include every
//!   seal the description promises, and any memfd at all, however described, must carry the
//!   seals the receiver requires ([`ReceiveOptions::require_memfd_seals`]: `F_SEAL_SHRINK` by
//!   default, so that no process holding it can truncate it under the mapping);
//! - regions do not overlap in guest addresses, and no two map the same bytes of a file.
//!
//! # The protocol (version 1, little-endian)
//!
//! Messages on a `SOCK_STREAM` Unix socket, each sent with one `sendmsg(2)`:
//!
//! 1. the header, 32 bytes, no descriptor: [`LOCAL_MAGIC`], version (`u32`, 1), flags (`u32`,
//!    0), the number of regions (`u32`), 0 (`u32`), the total bytes of the regions (`u64`);
//! 2. per region, a 64-byte record with exactly one descriptor: guest address, size, offset in
//!    the file, page size (`u64` each), kind (`u32`: 1 memfd, 2 file), seals promised (`u32`,
//!    `F_SEAL_*` bits), protection (`u32`: 1 read, 3 read and write), flags (`u32`: bit 0
//!    hugetlb), then 16 zero bytes;
//! 3. from the receiver, once the memory is built: 16 bytes, [`LOCAL_ACK`] and the number of
//!    regions (`u32`) and 0 (`u32`). A receiver that refuses closes the socket instead.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use guestmem::migration::local::{self, ReceiveOptions};
//! use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
//!
//! let ram = MmapRegionBuilder::<()>::new(2 << 20).backing(Backing::Memfd(MemfdOptions::new("ram")));
//! let src = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::build(ram, GuestAddress(0)).unwrap()]).unwrap();
//! src.write_obj(0x1234_u32, GuestAddress(0x1000)).unwrap();
//!
//! let (a, b) = UnixStream::pair().unwrap();
//! let dst = std::thread::spawn(move || local::receive::<()>(&b, &ReceiveOptions::default()));
//! let report = local::send(&a, &src).unwrap();
//! assert_eq!((report.regions, report.bytes), (1, 2 << 20));
//! let dst = dst.join().unwrap().unwrap();
//! assert_eq!(dst.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234);
//! // The same memory, not a copy: a write on one side shows on the other.
//! src.write_obj(0x5678_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(dst.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x5678);
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, NewBitmap};
use crate::bytes::{le_u32, le_u64, put_le_u32, put_le_u64};
use crate::memory::{GuestMemory, GuestMemoryError, GuestMemoryMmap};
use crate::mmap::{Backing, FileOffset, MmapRegionBuilder};
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::fd::FileKind;
use crate::sys::socket::{recv_with_at_most_fds, send_with_fds};
use crate::sys::{self, MapFlags, Protection, Seals};

/// The first 8 bytes of a local migration's header.
pub const LOCAL_MAGIC: [u8; 8] = *b"GMEMLOC\0";

/// The first 8 bytes of the receiver's acknowledgement.
pub const LOCAL_ACK: [u8; 8] = *b"GMEMLACK";

/// The protocol version this build speaks.
pub const LOCAL_VERSION: u32 = 1;

/// The most regions a receiver accepts, whatever its options say.
pub const MAX_LOCAL_REGIONS: usize = 4096;

const HEADER_LEN: usize = 32;
const RECORD_LEN: usize = 64;
const ACK_LEN: usize = 16;

/// Region kinds.
const KIND_MEMFD: u32 = 1;
const KIND_FILE: u32 = 2;

/// Protections.
const PROT_READ: u32 = 1;
const PROT_READ_WRITE: u32 = 3;

/// Record flags.
const FLAG_HUGETLB: u32 = 1;

/// Errors of local migration: the socket, the protocol, and every check of what the peer sent.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The socket failed.
    #[error("local migration socket I/O failed while {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The peer closed the socket in the middle of a message.
    #[error("the socket closed inside {what} ({got} of {expected} bytes)")]
    Truncated {
        /// The message.
        what: &'static str,
        /// Its length.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The header or the acknowledgement does not start with its magic.
    #[error("not a guestmem local migration (magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// A protocol version this build does not speak.
    #[error("local migration version {0} is not supported (this build speaks version {LOCAL_VERSION})")]
    UnsupportedVersion(u32),
    /// More regions than the receiver accepts.
    #[error("{count} regions, more than the {max} accepted")]
    TooManyRegions {
        /// The count the header gives.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A header or record field the protocol does not allow (a reserved field not zero, an
    /// unknown kind, flag or protection, an offset or address not a multiple of the page size,
    /// a hugetlb size not one either, a sum that overflows, a total that disagrees with the
    /// records).
    #[error("{}: invalid {what}", describe(*record))]
    Invalid {
        /// The record (`None`: the header).
        record: Option<usize>,
        /// What is wrong.
        what: &'static str,
    },
    /// A message with another number of file descriptors than it must have (all of them
    /// closed).
    #[error("{} came with {}{got} file descriptors ({expected} expected)", describe(*record), if *truncated { "at least " } else { "" })]
    Descriptors {
        /// The record (`None`: the header).
        record: Option<usize>,
        /// Descriptors received (at least that many, when `truncated`).
        got: usize,
        /// Descriptors it must have.
        expected: usize,
        /// More came than could be taken, or some came in the middle of the message.
        truncated: bool,
    },
    /// A descriptor that is not a regular file (memfds are regular files).
    #[error("region record {record}: the descriptor is a {kind:?}, not a regular file")]
    NotAFile {
        /// The record.
        record: usize,
        /// What it is.
        kind: FileKind,
    },
    /// A region described as a memfd whose descriptor is another file.
    #[error("region record {record}: described as a memfd, the descriptor is another file ({link})")]
    NotMemfd {
        /// The record.
        record: usize,
        /// What `/proc/self/fd` says it is.
        link: String,
    },
    /// A memfd without a seal its description promised.
    #[error("region record {record}: seals {promised:?} promised, the memfd has {actual:?}")]
    SealsBroken {
        /// The record.
        record: usize,
        /// Seals the description promised.
        promised: Seals,
        /// Seals the memfd has.
        actual: Seals,
    },
    /// A memfd without a seal the receiver requires.
    #[error("region record {record}: the memfd has seals {actual:?}, {required:?} are required")]
    Unsealed {
        /// The record.
        record: usize,
        /// Seals the receiver requires.
        required: Seals,
        /// Seals the memfd has.
        actual: Seals,
    },
    /// A page size that is not the file's (its filesystem's, for hugetlbfs).
    #[error("region record {record}: page size {described:#x} described, the file's is {actual:#x}")]
    PageSize {
        /// The record.
        record: usize,
        /// The page size described.
        described: u64,
        /// The file's.
        actual: u64,
    },
    /// A file shorter than the region's end in it: mapping it would fault past its end.
    #[error("region record {record}: the file has {file_size:#x} bytes, the region ends at {end:#x}")]
    FileTooShort {
        /// The record.
        record: usize,
        /// The file's size.
        file_size: u64,
        /// The region's end in the file.
        end: u64,
    },
    /// Two regions that overlap in guest addresses.
    #[error("regions at {first} and {second} overlap")]
    Overlap {
        /// The start of the first.
        first: GuestAddress,
        /// The start of the second, which begins inside the first.
        second: GuestAddress,
    },
    /// A region that cannot be passed by descriptor: anonymous memory, or a private mapping
    /// (whose written pages are in no file).
    #[error("region at {addr} cannot be passed by file descriptor: {reason}")]
    NotShareable {
        /// The region's start.
        addr: GuestAddress,
        /// Why.
        reason: &'static str,
    },
    /// Mapping a received region or building the memory failed (the mapping refused an
    /// option, the regions alias each other in a file, ...).
    #[error("rebuilding the guest memory failed: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The receiver closed the socket without acknowledging: it refused the memory.
    #[error("the receiver closed the socket without taking the memory")]
    Refused,
}

fn describe(record: Option<usize>) -> String {
    match record {
        Some(i) => format!("region record {i}"),
        None => "the header".to_string(),
    }
}

/// A result of local migration.
pub type Result<T> = std::result::Result<T, LocalError>;

fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> LocalError {
    move |source| LocalError::Io { op, source }
}

/// What [`send`] handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendReport {
    /// Regions handed over.
    pub regions: usize,
    /// Guest bytes they hold (none of them copied).
    pub bytes: u64,
    /// Bytes written to the socket (the description).
    pub socket_bytes: u64,
}

/// What the receiver requires of what it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// The most regions to accept (at most [`MAX_LOCAL_REGIONS`]).
    pub max_regions: usize,
    /// Seals every memfd must have, however it is described. `SHRINK` (the default) means no
    /// process holding the memfd can truncate it under the mapping.
    pub require_memfd_seals: Seals,
}

impl Default for ReceiveOptions {
    /// 256 regions at most; memfds sealed against shrinking.
    fn default() -> Self {
        ReceiveOptions { max_regions: 256, require_memfd_seals: Seals::SHRINK }
    }
}

/// The descriptor of a region's file. (One place to change if `FileOffset` hands it out
/// otherwise.)
fn region_fd(file: &FileOffset) -> BorrowedFd<'_> {
    file.as_fd()
}

/// What `/proc/self/fd` says `fd` is (a memfd shows as `/memfd:NAME (deleted)`).
fn fd_link(fd: BorrowedFd<'_>) -> String {
    sys::fd::fd_link(fd).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    fd_link(fd).starts_with("/memfd:")
}

/// The seals of `fd` (none for a file that cannot be sealed).
fn seals_of(fd: BorrowedFd<'_>) -> io::Result<Seals> {
    match sys::fd::get_seals(fd) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Seals::empty()),
        other => other,
    }
}

/// Hands `mem` to the process at the other end of `socket`: its layout and the descriptors
/// of its memfds and files (see the [module docs](self)), then waits for the receiver to
/// acknowledge. Every region must be a shared mapping of a memfd or a file; checked before
/// anything is sent.
pub fn send<B: Bitmap>(socket: &UnixStream, mem: &GuestMemoryMmap<B>) -> Result<SendReport> {
    let mut records = Vec::with_capacity(mem.num_regions());
    for region in mem.iter() {
        let addr = region.start_addr();
        let Some(file) = region.file_offset() else {
            return Err(LocalError::NotShareable { addr, reason: "anonymous memory is in no file" });
        };
        if !region.flags().contains(MapFlags::SHARED) {
            return Err(LocalError::NotShareable {
                addr,
                reason: "a private mapping's written pages are in no file",
            });
        }
        let fd = region_fd(file);
        let kind = if is_memfd(fd) { KIND_MEMFD } else { KIND_FILE };
        let seals = seals_of(fd).map_err(io_error("reading a memfd's seals"))?;
        let mut r = [0u8; RECORD_LEN];
        put_le_u64(&mut r, 0, addr.0);
        put_le_u64(&mut r, 8, region.len());
        put_le_u64(&mut r, 16, file.start());
        put_le_u64(&mut r, 24, region.page_size() as u64);
        put_le_u32(&mut r, 32, kind);
        put_le_u32(&mut r, 36, seals.bits() as u32);
        put_le_u32(&mut r, 40, if region.protection().is_writable() { PROT_READ_WRITE } else { PROT_READ });
        put_le_u32(&mut r, 44, if region.is_hugetlbfs() { FLAG_HUGETLB } else { 0 });
        records.push((r, fd));
    }
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&LOCAL_MAGIC);
    put_le_u32(&mut header, 8, LOCAL_VERSION);
    put_le_u32(&mut header, 16, records.len() as u32);
    put_le_u64(&mut header, 24, total);
    send_all(socket, &header, &[], "sending the header")?;
    for (record, fd) in &records {
        send_all(socket, record, &[*fd], "sending a region")?;
    }
    let mut ack = [0u8; ACK_LEN];
    match recv_exact(socket, &mut ack, 0, "the acknowledgement") {
        Err(LocalError::Truncated { got: 0, .. }) => return Err(LocalError::Refused),
        other => {
            other?;
        }
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&ack[..8]);
    if magic != LOCAL_ACK {
        return Err(LocalError::BadMagic(magic));
    }
    if le_u32(&ack, 8) as usize != records.len() || le_u32(&ack, 12) != 0 {
        return Err(LocalError::Invalid { record: None, what: "acknowledgement" });
    }
    Ok(SendReport {
        regions: records.len(),
        bytes: total,
        socket_bytes: (HEADER_LEN + records.len() * RECORD_LEN) as u64,
    })
}

/// Sends all of `data` with `fds` attached to its first byte.
fn send_all(socket: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>], op: &'static str) -> Result<()> {
    let mut done = send_with_fds(socket.as_fd(), data, fds).map_err(io_error(op))?;
    while done < data.len() {
        let n = send_with_fds(socket.as_fd(), &data[done..], &[]).map_err(io_error(op))?;
        if n == 0 {
            return Err(LocalError::Io { op, source: io::ErrorKind::WriteZero.into() });
        }
        done += n;
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes and the descriptors that come with the first of them
/// (at most `max_fds`; more, or any coming later in the message, is an error, and every
/// descriptor that came is closed). Returns them.
fn recv_exact(
    socket: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
    what: &'static str,
) -> Result<Vec<OwnedFd>> {
    let mut got = 0;
    let mut fds = Vec::new();
    while got < buf.len() {
        let (n, more) = match recv_with_at_most_fds(socket.as_fd(), &mut buf[got..], max_fds) {
            Ok(r) => r,
            // More descriptors than the message may carry: the call closed them.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                return Err(LocalError::Descriptors {
                    record: None,
                    got: max_fds + 1,
                    expected: max_fds,
                    truncated: true,
                })
            }
            Err(source) => return Err(LocalError::Io { op: "receiving", source }),
        };
        if n == 0 {
            return Err(LocalError::Truncated { what, expected: buf.len(), got });
        }
        if got > 0 && !more.is_empty() {
            // Descriptors in the middle of a message: not where the protocol puts them.
            let got = fds.len() + more.len();
            return Err(LocalError::Descriptors { record: None, got, expected: max_fds, truncated: true });
        }
        fds.extend(more);
        got += n;
    }
    Ok(fds)
}

/// A record, checked on its own (not yet against its descriptor).
struct Record {
    addr: GuestAddress,
    size: u64,
    offset: u64,
    page_size: u64,
    kind: u32,
    seals: Seals,
    protection: Protection,
    hugetlb: bool,
}

fn parse_record(r: &[u8; RECORD_LEN], index: usize) -> Result<Record> {
    let invalid = |what| LocalError::Invalid { record: Some(index), what };
    let record = Record {
        addr: GuestAddress(le_u64(r, 0)),
        size: le_u64(r, 8),
        offset: le_u64(r, 16),
        page_size: le_u64(r, 24),
        kind: le_u32(r, 32),
        seals: Seals::from_bits(le_u32(r, 36) as i32).ok_or(invalid("seals"))?,
        protection: match le_u32(r, 40) {
            PROT_READ => Protection::READ,
            PROT_READ_WRITE => Protection::READ_WRITE,
            _ => return Err(invalid("protection")),
        },
        hugetlb: match le_u32(r, 44) {
            0 => false,
            FLAG_HUGETLB => true,
            _ => return Err(invalid("flags")),
        },
    };
    if r[48..].iter().any(|&b| b != 0) {
        return Err(invalid("reserved bytes"));
    }
    if record.kind != KIND_MEMFD && record.kind != KIND_FILE {
        return Err(invalid("kind"));
    }
    let base = sys::page_size() as u64;
    if ![base, 2 << 20, 1 << 30].contains(&record.page_size) || record.hugetlb != (record.page_size != base) {
        return Err(invalid("page size"));
    }
    // A region of base pages may end with a partial page; a hugetlb region is whole pages.
    let whole = record.size.checked_next_multiple_of(record.page_size);
    if record.size == 0 || whole.is_none() || record.hugetlb && !record.size.is_multiple_of(record.page_size)
    {
        return Err(invalid("size"));
    }
    if !record.offset.is_multiple_of(record.page_size)
        || whole.and_then(|w| record.offset.checked_add(w)).is_none()
    {
        return Err(invalid("offset"));
    }
    if !record.addr.0.is_multiple_of(record.page_size) || record.addr.0.checked_add(record.size - 1).is_none()
    {
        return Err(invalid("guest address"));
    }
    if usize::try_from(record.size).is_err() {
        return Err(invalid("size"));
    }
    Ok(record)
}

/// Checks a record against its descriptor: the file's kind, size, page size and seals.
fn check_descriptor(r: &Record, fd: BorrowedFd<'_>, index: usize, options: &ReceiveOptions) -> Result<()> {
    let st = sys::fstat(fd).map_err(io_error("fstat of a received descriptor"))?;
    if st.kind != FileKind::Regular {
        return Err(LocalError::NotAFile { record: index, kind: st.kind });
    }
    let fs = sys::fstatfs(fd).map_err(io_error("fstatfs of a received descriptor"))?;
    let actual_page = if fs.is_hugetlbfs() { fs.block_size } else { sys::page_size() as u64 };
    if actual_page != r.page_size {
        return Err(LocalError::PageSize { record: index, described: r.page_size, actual: actual_page });
    }
    // The mapping covers the last page whole (checked not to overflow).
    let end = r.offset + r.size.next_multiple_of(r.page_size);
    if st.size < end {
        return Err(LocalError::FileTooShort { record: index, file_size: st.size, end });
    }
    let memfd = is_memfd(fd);
    if r.kind == KIND_MEMFD && !memfd {
        return Err(LocalError::NotMemfd { record: index, link: fd_link(fd) });
    }
    let actual = seals_of(fd).map_err(io_error("reading a received memfd's seals"))?;
    if !actual.contains(r.seals) {
        return Err(LocalError::SealsBroken { record: index, promised: r.seals, actual });
    }
    if memfd && !actual.contains(options.require_memfd_seals) {
        return Err(LocalError::Unsealed { record: index, required: options.require_memfd_seals, actual });
    }
    Ok(())
}

/// Receives guest memory from the process at the other end of `socket` (see the [module
/// docs](self)): checks the description and every descriptor, maps each region (shared, with a
/// new bitmap `B`), builds the memory, and acknowledges. Nothing is mapped before every record
/// passed its checks; on any error the received descriptors are closed and the socket is left
/// for the caller to close (the sender then sees [`LocalError::Refused`]).
pub fn receive<B: NewBitmap>(socket: &UnixStream, options: &ReceiveOptions) -> Result<GuestMemoryMmap<B>> {
    let mut header = [0u8; HEADER_LEN];
    let fds = recv_exact(socket, &mut header, 0, "the header").map_err(|e| match e {
        LocalError::Descriptors { got, truncated, .. } => {
            LocalError::Descriptors { record: None, got, expected: 0, truncated }
        }
        e => e,
    })?;
    debug_assert!(fds.is_empty());
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&header[..8]);
    if magic != LOCAL_MAGIC {
        return Err(LocalError::BadMagic(magic));
    }
    let version = le_u32(&header, 8);
    if version != LOCAL_VERSION {
        return Err(LocalError::UnsupportedVersion(version));
    }
    if le_u32(&header, 12) != 0 || le_u32(&header, 20) != 0 {
        return Err(LocalError::Invalid { record: None, what: "reserved fields" });
    }
    let count = u64::from(le_u32(&header, 16));
    let max = options.max_regions.min(MAX_LOCAL_REGIONS);
    if count == 0 {
        return Err(LocalError::Invalid { record: None, what: "region count (0)" });
    }
    if count > max as u64 {
        return Err(LocalError::TooManyRegions { count, max });
    }
    let count = count as usize;
    let mut received = Vec::with_capacity(count);
    let mut total = 0u64;
    for index in 0..count {
        let mut raw = [0u8; RECORD_LEN];
        let mut fds = recv_exact(socket, &mut raw, 1, "a region record").map_err(|e| match e {
            LocalError::Descriptors { got, truncated, .. } => {
                LocalError::Descriptors { record: Some(index), got, expected: 1, truncated }
            }
            e => e,
        })?;
        if fds.len() != 1 {
            return Err(LocalError::Descriptors {
                record: Some(index),
                got: fds.len(),
                expected: 1,
                truncated: false,
            });
        }
        let record = parse_record(&raw, index)?;
        let fd = fds.remove(0);
        check_descriptor(&record, fd.as_fd(), index, options)?;
        total = total
            .checked_add(record.size)
            .ok_or(LocalError::Invalid { record: Some(index), what: "size" })?;
        received.push((record, fd));
    }
    if total != le_u64(&header, 24) {
        return Err(LocalError::Invalid { record: None, what: "total size (the records disagree)" });
    }
    // No overlap in guest addresses (aliases within a file are the memory's own check).
    let mut starts: Vec<(u64, u64)> = received.iter().map(|(r, _)| (r.addr.0, r.size)).collect();
    starts.sort_unstable();
    for pair in starts.windows(2) {
        if pair[1].0 <= pair[0].0 + (pair[0].1 - 1) {
            return Err(LocalError::Overlap {
                first: GuestAddress(pair[0].0),
                second: GuestAddress(pair[1].0),
            });
        }
    }
    let regions = received
        .into_iter()
        .map(|(r, fd)| {
            let file = FileOffset::new(File::from(fd), r.offset);
            let builder = MmapRegionBuilder::<B>::new(r.size as usize)
                .backing(Backing::File { file, shared: true })
                .protection(r.protection);
            GuestRegionMmap::build(builder, r.addr)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mem = GuestMemoryMmap::from_regions(regions)?;
    let mut ack = [0u8; ACK_LEN];
    ack[..8].copy_from_slice(&LOCAL_ACK);
    put_le_u32(&mut ack, 8, count as u32);
    send_all(socket, &ack, &[], "sending the acknowledgement")?;
    Ok(mem)
}
