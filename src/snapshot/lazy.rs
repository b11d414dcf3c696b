//! Lazy restore: guest memory that is usable at once and filled from a snapshot on demand,
//! through userfaultfd ([`sys::uffd`](crate::sys::uffd)).
//!
//! # The model
//!
//! [`restore_lazy`] maps new, empty memory for every region of a full (or rebased) snapshot,
//! registers it with a userfaultfd and returns: nothing is read but the header. A handler
//! thread then owns the memory's missing pages:
//!
//! - **Demand faults first.** A vCPU or host thread touching a missing page waits while the
//!   handler reads the *unit* holding it (a chunk of the checksum table, at least a page of
//!   the region) from the file into a private buffer, checks it, and places it with one
//!   `UFFDIO_COPY` (holes of the file with `UFFDIO_ZEROPAGE`), which wakes the thread.
//! - **Background prefetch.** Between faults the handler fills the rest in address order, one
//!   unit at a time, looking for pending faults before each unit.
//! - **Verified before placed.** A unit is checked against the snapshot's optional chunk
//!   table ([`write_chunk_table`]) before any byte of it is placed; what is checked is the
//!   private buffer that is then copied, so the file changing afterwards cannot slip in
//!   unchecked bytes. A unit that fails is never mapped: the restore records a [`Failure`]
//!   (address, reason) that [`LazyRestore::wait_complete`] returns, and by default faults on it
//!   stay pending (see [`LazyOptions::poison_bad_chunks`] for the alternative). Without a
//!   chunk table ([`Verify::RegionFirst`]) each region's whole checksum is checked before the
//!   first page of that region is placed: the first fault in a region waits for a read of the
//!   region.
//! - **Discards.** A `MADV_DONTNEED`/`MADV_REMOVE` of restored memory (a balloon) is an
//!   `EVENT_REMOVE`: the pages are not filled from the snapshot afterwards and read as zeros.
//!   A page that faults again after it was placed (a hole punched in a memfd, which sends no
//!   event) is given a zero page.
//! - **Completion.** [`LazyRestore::is_complete`] / [`wait_complete`](LazyRestore::wait_complete)
//!   say when every page was placed (or discarded); [`stop`](LazyRestore::stop) then ends the
//!   handler and unregisters the memory. Stopping earlier parks the userfaultfd instead
//!   ([`Stopped::Parked`]): faults on pages not yet there wait until it is resumed.
//!
//! Pages placed by the handler are not marked in the memory's dirty bitmap: they hold the
//! snapshot's contents, as after [`restore_mapped`](super::restore_mapped). Later writes are.
//!
//! # The chunk table
//!
//! The snapshot format's checksums cover whole regions, which cannot be checked before placing
//! one page without reading the whole region. [`write_chunk_table`] appends a table of one
//! [`Checksum`] per chunk (16 KiB by default) to a full snapshot, after the region data, where
//! readers of the format do not look (the header's file length ends before it, so every other
//! reader ignores it). It is written only from data that matched the region checksums, is
//! bound to the snapshot by its header checksum, and has a checksum of its own. Layout
//! (little-endian, at the snapshot's file length):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `GMEMCSUM` |
//! | 8..12 | version (1) |
//! | 12..16 | flags (0) |
//! | 16..24 | chunk size (a power of two, at least the snapshot page size, at most 1 GiB) |
//! | 24..32 | the snapshot's header checksum |
//! | 32..40 | number of chunk checksums (each region's length in chunks, rounded up, summed) |
//! | 40..48 | length of the table (64 + 8 × count; the file ends there) |
//! | 48..56 | checksum of the table, taken with this field zero |
//! | 56..64 | zero |
//! | 64.. | one checksum per chunk, regions in order, chunks in order (the last chunk of a region may be short) |
//!
//! # Measured on the project's machine (kernel 6.18, `kvm_pvm`)
//!
//! `cargo run --release --all-features --example uffd_facts`:
//!
//! - A KVM guest's reads and writes of registered memory reach the handler as page faults
//!   (write faults flagged as writes) while `KVM_RUN` waits; the guest resumes when the page is
//!   placed. KVM's dirty log and dirty ring then show the pages the guest *wrote* and not the
//!   pages placed for its reads (`UFFDIO_COPY` is not a guest write). Neither the dirty log
//!   nor the ring touches guest memory, so they never fault.
//! - A vCPU whose page is never placed cannot be interrupted: after a signal it spins in the
//!   kernel re-faulting (state R) until the page is placed, then `KVM_RUN` returns `EINTR`.
//! - A guest access to a page poisoned with `UFFDIO_POISON` is an MMIO exit at that GPA here
//!   (no `SIGBUS` reaches the vCPU thread); a host access raises `SIGBUS`.
//! - Costs: a host access round trip through a handler thread ≈ 7.5 µs (a plain first-touch
//!   fault ≈ 1.4 µs); a guest first access 17–77 µs over three runs (a plain guest first write
//!   ≈ 2 µs), of which the handler is 3–12 µs and the rest waking the vCPU thread and
//!   re-entering the guest, which on the 2 shared cores depends on their load;
//!   `UFFDIO_COPY` 2.3–4.4 GiB/s (4 KiB to 2 MiB per call), `UFFDIO_ZEROPAGE` ≈ 25 GiB/s.
//!
//! ```
//! use guestmem::snapshot::{self, lazy};
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
//! # if guestmem::sys::uffd::available_features(guestmem::sys::uffd::OpenVia::Any).is_err() { return; }
//! let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! src.write_obj(0xfeed_u64, GuestAddress(0x4_0000)).unwrap();
//! let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! snapshot::dump(&src, &file).unwrap();
//! lazy::write_chunk_table(&file, lazy::DEFAULT_CHUNK_SIZE).unwrap();
//!
//! let restore = lazy::restore_lazy::<()>(&file).unwrap(); // returns before any data is read
//! let mem = restore.memory();
//! assert_eq!(mem.read_obj::<u64>(GuestAddress(0x4_0000)).unwrap(), 0xfeed); // served on demand
//! assert!(restore.wait_complete(None).unwrap());
//! let stats = restore.stop().unwrap_complete().unwrap();
//! assert_eq!(stats.pages_total, 256);
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::format::HEADER_CHECKSUM_OFFSET;
use super::{checksum_area, io_err, SnapshotError, SnapshotInfo, SnapshotKind, SnapshotRegion};
use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, NewBitmap};
use crate::bytes::{le_u32, le_u64, put_le_u32, put_le_u64};
use crate::checksum::Checksum;
use crate::memory::GuestMemory;
use crate::memory::{GuestMemoryError, GuestMemoryMmap};
use crate::mmap::{MmapError, MmapRegionBuilder};
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::fd::{lseek_data, SeekData};
use crate::sys::uffd::{self, Features, Ioctls, OpenVia, RegisterMode, Uffd, UffdEvent};
use crate::sys::{Advice, MapFlags};
use crate::uffd::{Handover, HandoverError, HandoverRegion};

/// The magic of a chunk table.
pub const CHUNK_TABLE_MAGIC: [u8; 8] = *b"GMEMCSUM";
/// The chunk table version this crate writes and reads.
pub const CHUNK_TABLE_VERSION: u32 = 1;
/// The chunk size [`write_chunk_table`] is usually given: 16 KiB, 4 pages placed per fault.
/// Smaller chunks serve a fault sooner, larger ones fill memory with fewer calls and a smaller
/// table (measured on 1 GiB, in separate runs: 16 KiB gives a first guest access of 40 µs and a fill at 0.95× of
/// `restore_into`; 64 KiB 81 µs and 0.67×).
pub const DEFAULT_CHUNK_SIZE: u64 = 16 << 10;
/// Bytes of the chunk table's header.
const TABLE_HEADER_LEN: u64 = 64;
/// Bytes the prefetch reads and places at once (in whole units): one read and few copies for
/// many chunks, short enough that a demand fault waits little behind it.
const PREFETCH_BATCH: u64 = 256 << 10;
/// The largest chunk size.
const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// The most bytes of chunk table read (1 GiB of checksums covers 2 PiB in 16 KiB chunks).
const MAX_TABLE_LEN: u64 = 1 << 30;

/// Errors of lazy restore.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The snapshot file was refused (header, layout, kind) or could not be read.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// [`Verify::ChunkTable`] was asked for and the snapshot has no chunk table.
    #[error(
        "the snapshot has no chunk table (write one with write_chunk_table), and Verify::ChunkTable needs it"
    )]
    ChunkTableMissing,
    /// The bytes after the snapshot's data are not a chunk table of this snapshot.
    #[error("invalid chunk table: {reason}")]
    InvalidChunkTable {
        /// What is wrong.
        reason: &'static str,
    },
    /// A chunk size that is not a power of two between the snapshot page size and 1 GiB.
    #[error("chunk size {chunk_size:#x} is not a power of two from the page size {page_size:#x} to 1 GiB")]
    InvalidChunkSize {
        /// The size asked for.
        chunk_size: u64,
        /// The snapshot's page size.
        page_size: u64,
    },
    /// Opening the userfaultfd or its handshake failed.
    #[error("userfaultfd {op} failed: {source}")]
    Uffd {
        /// The step.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The kernel lacks a userfaultfd feature the restore needs.
    #[error("the kernel's userfaultfd lacks {0:?}")]
    Unsupported(Features),
    /// A region could not be registered, or its memory cannot be served (hugetlb memory whose
    /// range does not support `UFFDIO_COPY`, a file mapping).
    #[error("region at {guest_addr} ({len:#x} bytes) cannot be served lazily: {source}")]
    Register {
        /// The region's guest address.
        guest_addr: GuestAddress,
        /// Its length.
        len: u64,
        /// Why.
        source: io::Error,
    },
    /// Building the destination memory failed.
    #[error("destination memory: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The handler could not place part of memory (see [`Failure`]).
    #[error("lazy restore failed: {0}")]
    Failed(Failure),
    /// A handover was refused (see [`HandoverError`]).
    #[error("handover: {0}")]
    Handover(#[from] HandoverError),
    /// The handler thread could not be started.
    #[error("starting the fault handler thread failed: {0}")]
    Thread(io::Error),
}

/// A result of lazy restore.
pub type Result<T> = std::result::Result<T, LazyError>;

/// Part of memory the handler could not place, and why. The pages were not mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Guest address of the first byte not placed.
    pub guest_addr: GuestAddress,
    /// Bytes not placed.
    pub len: u64,
    /// Why.
    pub reason: FailureReason,
}

/// Why a [`Failure`] happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// A chunk's bytes do not match the chunk table.
    ChunkChecksum {
        /// The checksum in the table.
        stored: u64,
        /// The checksum of the bytes read.
        computed: u64,
    },
    /// A region's data does not match its checksum ([`Verify::RegionFirst`]).
    RegionChecksum {
        /// The checksum in the snapshot's table.
        stored: u64,
        /// The checksum of the region's data.
        computed: u64,
    },
    /// Reading the snapshot file failed (`errno`, if any).
    Read {
        /// The file offset.
        offset: u64,
        /// The OS error number.
        errno: Option<i32>,
    },
    /// A page of the destination was already there: the memory was populated behind the
    /// handler's back, so its contents are not the snapshot's.
    AlreadyPresent,
    /// A userfaultfd call failed.
    Uffd {
        /// The ioctl or read.
        op: &'static str,
        /// The OS error number.
        errno: Option<i32>,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x} bytes at {} were not placed: ", self.len, self.guest_addr)?;
        match &self.reason {
            FailureReason::ChunkChecksum { stored, computed } => {
                write!(f, "chunk checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")
            }
            FailureReason::RegionChecksum { stored, computed } => {
                write!(f, "region checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")
            }
            FailureReason::Read { offset, errno } => {
                write!(f, "reading the snapshot at offset {offset:#x} failed (errno {errno:?})")
            }
            FailureReason::AlreadyPresent => f.write_str("a page of the destination was already populated"),
            FailureReason::Uffd { op, errno } => write!(f, "{op} failed (errno {errno:?})"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The chunk table.

/// One checksum per chunk of every region of a snapshot.
///
/// ```
/// use guestmem::snapshot::{self, lazy};
/// use guestmem::{GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x30000)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap();
/// assert!(lazy::read_chunk_table(&file).unwrap().is_none());
/// lazy::write_chunk_table(&file, 0x10000).unwrap();
/// let table = lazy::read_chunk_table(&file).unwrap().unwrap();
/// assert_eq!((table.chunk_size(), table.region_chunks(0).len()), (0x10000, 3));
/// snapshot::verify(&file).unwrap(); // other readers ignore the table
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    chunk_size: u64,
    /// Per region, one checksum per chunk.
    sums: Vec<Vec<u64>>,
}

impl ChunkTable {
    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The checksums of region `index`'s chunks (empty for a region the snapshot lacks).
    pub fn region_chunks(&self, index: usize) -> &[u64] {
        self.sums.get(index).map_or(&[], Vec::as_slice)
    }
}

/// The snapshot's header checksum, as stored.
fn stored_header_checksum(file: &File) -> std::result::Result<u64, SnapshotError> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, HEADER_CHECKSUM_OFFSET as u64)
        .map_err(|e| io_err("read header", HEADER_CHECKSUM_OFFSET as u64, e))?;
    Ok(u64::from_le_bytes(b))
}

/// The number of chunks of each region.
fn chunk_counts(info: &SnapshotInfo, chunk: u64) -> Vec<u64> {
    info.regions.iter().map(|r| r.len.div_ceil(chunk)).collect()
}

/// The checksum of a table area, with its checksum field read as zero.
fn table_checksum(area: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(&area[..48]);
    c.zeros(8);
    c.update(&area[56..]);
    c.finish()
}

/// What [`write_chunk_table`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkTableStats {
    /// Chunks in the table.
    pub chunks: u64,
    /// Bytes of the table appended to the file.
    pub table_len: u64,
    /// Bytes of region data read (holes are not read).
    pub bytes_read: u64,
}

/// Appends (or replaces) a chunk table to the full snapshot `file` so that [`restore_lazy`]
/// can check each chunk before it places it. Reads every data extent of the file once: each
/// region's data is checked against the region's checksum in the same pass, and nothing is
/// written if one does not match ([`SnapshotError::DataChecksum`]). The file's data and header
/// are not changed.
///
/// ```
/// use guestmem::snapshot::{self, lazy};
/// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap();
/// let stats = lazy::write_chunk_table(&file, lazy::DEFAULT_CHUNK_SIZE).unwrap();
/// assert_eq!(stats.chunks, 64);
/// ```
pub fn write_chunk_table(file: &File, chunk_size: u64) -> Result<ChunkTableStats> {
    let info = SnapshotInfo::read(file)?;
    if info.kind != SnapshotKind::Full {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: info.kind }.into());
    }
    if !chunk_size.is_power_of_two() || chunk_size < info.page_size || chunk_size > MAX_CHUNK_SIZE {
        return Err(LazyError::InvalidChunkSize { chunk_size, page_size: info.page_size });
    }
    let mut stats = ChunkTableStats::default();
    let mut sums = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    for (index, r) in info.regions.iter().enumerate() {
        let mut region_sum = Checksum::new();
        let mut holes = HoleCache::default();
        let mut off = 0;
        while off < r.len {
            let n = chunk_size.min(r.len - off);
            let at = r.data_offset + off;
            let sum = if holes.is_hole(file, at, at + n) {
                region_sum.zeros(n);
                zero_checksum(n)
            } else {
                let b = &mut buf[..n as usize];
                file.read_exact_at(b, at).map_err(|e| io_err("read", at, e))?;
                stats.bytes_read += n;
                region_sum.update(b);
                Checksum::of(b)
            };
            sums.push(sum);
            off += n;
        }
        let computed = region_sum.finish();
        if computed != r.checksum {
            return Err(SnapshotError::DataChecksum {
                index,
                guest_addr: r.guest_addr,
                stored: r.checksum,
                computed,
            }
            .into());
        }
    }
    let count = sums.len() as u64;
    let table_len = TABLE_HEADER_LEN + 8 * count;
    let mut area = vec![0u8; table_len as usize];
    area[..8].copy_from_slice(&CHUNK_TABLE_MAGIC);
    put_le_u32(&mut area, 8, CHUNK_TABLE_VERSION);
    put_le_u64(&mut area, 16, chunk_size);
    put_le_u64(&mut area, 24, stored_header_checksum(file)?);
    put_le_u64(&mut area, 32, count);
    put_le_u64(&mut area, 40, table_len);
    for (i, s) in sums.iter().enumerate() {
        put_le_u64(&mut area, TABLE_HEADER_LEN as usize + 8 * i, *s);
    }
    let sum = table_checksum(&area);
    put_le_u64(&mut area, 48, sum);
    file.set_len(info.file_len).map_err(|e| io_err("truncate", info.file_len, e))?;
    file.write_all_at(&area, info.file_len).map_err(|e| io_err("write chunk table", info.file_len, e))?;
    stats.chunks = count;
    stats.table_len = table_len;
    Ok(stats)
}

/// Reads the chunk table after a full snapshot's data, if there is one: `Ok(None)` when the
/// file ends with its data; an error when the bytes there are not a valid table of this
/// snapshot (wrong magic, version, chunk size, count, length, header binding or checksum).
pub fn read_chunk_table(file: &File) -> Result<Option<ChunkTable>> {
    let info = SnapshotInfo::read(file)?;
    read_chunk_table_of(file, &info)
}

fn read_chunk_table_of(file: &File, info: &SnapshotInfo) -> Result<Option<ChunkTable>> {
    let bad = |reason| Err(LazyError::InvalidChunkTable { reason });
    let file_len = file.metadata().map_err(|e| io_err("fstat", 0, e))?.len();
    if file_len <= info.file_len {
        return Ok(None);
    }
    let avail = file_len - info.file_len;
    if avail < TABLE_HEADER_LEN {
        return bad("shorter than its header");
    }
    let mut head = [0u8; TABLE_HEADER_LEN as usize];
    file.read_exact_at(&mut head, info.file_len).map_err(|e| io_err("read chunk table", info.file_len, e))?;
    if head[..8] != CHUNK_TABLE_MAGIC {
        return bad("bad magic");
    }
    if le_u32(&head, 8) != CHUNK_TABLE_VERSION {
        return bad("unsupported version");
    }
    if le_u32(&head, 12) != 0 || le_u64(&head, 56) != 0 {
        return bad("unknown flags");
    }
    let chunk = le_u64(&head, 16);
    if !chunk.is_power_of_two() || chunk < info.page_size || chunk > MAX_CHUNK_SIZE {
        return bad("chunk size out of range");
    }
    if le_u64(&head, 24) != stored_header_checksum(file)? {
        return bad("it belongs to another snapshot (header checksum differs)");
    }
    let counts = chunk_counts(info, chunk);
    let count: u64 = counts.iter().sum();
    if le_u64(&head, 32) != count {
        return bad("chunk count does not match the regions");
    }
    let table_len = le_u64(&head, 40);
    if count.checked_mul(8).and_then(|b| b.checked_add(TABLE_HEADER_LEN)) != Some(table_len) {
        return bad("table length does not match the chunk count");
    }
    if table_len != avail || table_len > MAX_TABLE_LEN {
        return bad("table length does not match the file");
    }
    // Sized by bytes that are really in the file, and capped.
    let mut area = vec![0u8; table_len as usize];
    file.read_exact_at(&mut area, info.file_len).map_err(|e| io_err("read chunk table", info.file_len, e))?;
    if table_checksum(&area) != le_u64(&area, 48) {
        return bad("checksum mismatch");
    }
    let mut at = TABLE_HEADER_LEN as usize;
    let sums = counts
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    let s = le_u64(&area, at);
                    at += 8;
                    s
                })
                .collect()
        })
        .collect();
    Ok(Some(ChunkTable { chunk_size: chunk, sums }))
}

/// The checksum of `n` zero bytes.
fn zero_checksum(n: u64) -> u64 {
    let mut c = Checksum::new();
    c.zeros(n);
    c.finish()
}

/// Remembers the last `SEEK_DATA`/`SEEK_HOLE` answers: `[from, next_data)` is a hole and
/// `[next_data, next_hole)` data, so that consecutive units cost no call.
#[derive(Debug, Default)]
struct HoleCache {
    from: u64,
    next_data: u64,
    next_hole: u64,
    unsupported: bool,
}

impl HoleCache {
    /// Whether `[start, end)` of `file` is all hole (a failed or unsupported lookup says no,
    /// so the range is read).
    fn is_hole(&mut self, file: &File, start: u64, end: u64) -> bool {
        if self.unsupported {
            return false;
        }
        if start >= self.from && end <= self.next_data {
            return true;
        }
        if start >= self.next_data && start < self.next_hole {
            return false;
        }
        match lseek_data(file.as_fd(), start, SeekData::Data) {
            Ok(Some(d)) => {
                self.from = start;
                self.next_data = d;
                self.next_hole = match lseek_data(file.as_fd(), d, SeekData::Hole) {
                    Ok(Some(h)) => h,
                    _ => d,
                };
                end <= d
            }
            Ok(None) => {
                self.from = start;
                self.next_data = u64::MAX;
                self.next_hole = u64::MAX;
                true
            }
            Err(_) => {
                self.unsupported = true;
                false
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options and the restore.

/// How pages are checked before they are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Verify {
    /// The chunk table if the snapshot has one, else [`RegionFirst`](Self::RegionFirst).
    #[default]
    Auto,
    /// Each unit against the chunk table; a snapshot without one is refused
    /// ([`LazyError::ChunkTableMissing`]).
    ChunkTable,
    /// A region's whole checksum before its first page is placed (the first fault in a region
    /// waits for a read of the whole region).
    RegionFirst,
}

/// Options of [`restore_lazy_with`].
#[derive(Clone, Debug)]
pub struct LazyOptions {
    verify: Verify,
    prefetch: bool,
    poison: bool,
    via: OpenVia,
    spin: Duration,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            verify: Verify::Auto,
            prefetch: true,
            poison: false,
            via: OpenVia::Any,
            spin: Duration::from_micros(200),
        }
    }
}

impl LazyOptions {
    /// The defaults: [`Verify::Auto`], prefetch on, bad chunks held, userfaultfd through
    /// `/dev/userfaultfd` or the syscall.
    pub fn new() -> Self {
        Self::default()
    }

    /// How pages are checked.
    #[must_use]
    pub fn verify(mut self, verify: Verify) -> Self {
        self.verify = verify;
        self
    }

    /// Whether the handler fills the memory in the background (default yes). Without it only
    /// pages that are touched are placed and the restore never completes by itself.
    #[must_use]
    pub fn prefetch(mut self, on: bool) -> Self {
        self.prefetch = on;
        self
    }

    /// How long the handler keeps polling after an event before it sleeps (default 200 µs):
    /// the next fault of a burst is then served without waking the handler thread first.
    /// Zero sleeps at once (no CPU spent between faults).
    #[must_use]
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// How the userfaultfd is opened.
    #[must_use]
    pub fn open_via(mut self, via: OpenVia) -> Self {
        self.via = via;
        self
    }

    /// Poison (`UFFDIO_POISON`) the pages of a unit that fails verification, instead of
    /// holding its faults. A guest access then exits to the VMM (an MMIO exit at the address on
    /// the measured `kvm_pvm`; a memory-error `SIGBUS` on the vCPU thread elsewhere) instead of
    /// waiting forever; a host access raises `SIGBUS`.
    ///
    /// # Safety
    /// No thread of this process may access the restored memory (through guestmem or
    /// otherwise) unless a `SIGBUS` from a poisoned page is handled: an unhandled one kills the
    /// process.
    #[must_use]
    pub unsafe fn poison_bad_chunks(mut self) -> Self {
        self.poison = true;
        self
    }
}

/// How far a lazy restore is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyProgress {
    /// Pages of the regions' page sizes in all.
    pub pages_total: u64,
    /// Pages placed or discarded.
    pub pages_resolved: u64,
    /// Page faults read from the userfaultfd.
    pub faults: u64,
    /// Units placed because of a fault.
    pub demand_units: u64,
    /// Units placed by the prefetch.
    pub prefetch_units: u64,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Pages discarded (`EVENT_REMOVE`).
    pub pages_discarded: u64,
    /// Failures recorded.
    pub failures: u64,
}

/// What a finished lazy restore did (see [`LazyProgress`]), and how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LazyStats {
    /// Pages in all.
    pub pages_total: u64,
    /// The counters at the end.
    pub progress: LazyProgress,
    /// From the restore's start to its completion (`None` if it never completed).
    pub fill_time: Option<Duration>,
}

/// The state the handler and the VMM's handle share.
#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    changed: Condvar,
    faults: AtomicU64,
    demand_units: AtomicU64,
    prefetch_units: AtomicU64,
    bytes_read: AtomicU64,
    discarded: AtomicU64,
}

#[derive(Debug, Default)]
struct Status {
    resolved: u64,
    total: u64,
    failures: Vec<Failure>,
    completed_at: Option<Instant>,
}

impl Shared {
    fn progress(&self) -> LazyProgress {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        LazyProgress {
            pages_total: s.total,
            pages_resolved: s.resolved,
            faults: self.faults.load(Ordering::Relaxed),
            demand_units: self.demand_units.load(Ordering::Relaxed),
            prefetch_units: self.prefetch_units.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            pages_discarded: self.discarded.load(Ordering::Relaxed),
            failures: s.failures.len() as u64,
        }
    }
}

/// A region as the handler sees it. Host addresses are only ever passed to the kernel (the
/// userfaultfd ioctls check them), never dereferenced.
#[derive(Debug)]
struct RegionState {
    host: u64,
    len: u64,
    guest: GuestAddress,
    /// The region's page size (the huge page size for hugetlb memory).
    page: u64,
    /// Bytes placed per fault: a multiple of `page` and of the chunk size.
    unit: u64,
    hugetlb: bool,
    data_offset: u64,
    checksum: u64,
    chunk_sums: Option<Vec<u64>>,
    /// RegionFirst: whether the region's checksum was checked.
    verified: bool,
    /// Per page: placed by the handler.
    placed: Vec<u64>,
    /// Per page: discarded and not placed since (serve zeros).
    discarded: Vec<u64>,
    /// Per unit: failed verification or placement.
    failed: Vec<u64>,
}

fn bit(words: &[u64], i: u64) -> bool {
    words[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn set_bit(words: &mut [u64], i: u64, on: bool) {
    let w = &mut words[(i / 64) as usize];
    if on {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

impl RegionState {
    fn units(&self) -> u64 {
        self.len.div_ceil(self.unit)
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.len
    }
}

/// The fault handler: owned by its thread while it runs, by a [`ParkedRestore`] when parked.
#[derive(Debug)]
struct Handler {
    uffd: Arc<Uffd>,
    file: File,
    regions: Vec<RegionState>,
    /// Region indices in host address order.
    by_host: Vec<usize>,
    chunk: Option<u64>,
    prefetch: bool,
    poison: bool,
    spin: Duration,
    /// The prefetch's next (region, unit).
    cursor: (usize, u64),
    shared: Arc<Shared>,
    started: Instant,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    holes: Vec<HoleCache>,
    /// What each unit of the batch being placed holds (`None`: it failed).
    kinds: Vec<Option<UnitData>>,
    /// Faults held on failed units (address), woken never: kept for the record.
    held: u64,
}

/// What a unit's data turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnitData {
    Zero,
    Bytes,
}

impl Handler {
    fn record(&self, failure: Failure) {
        let mut s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        s.failures.push(failure);
        drop(s);
        self.shared.changed.notify_all();
    }

    fn resolve(&self, pages: u64) {
        if pages == 0 {
            return;
        }
        let mut s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        s.resolved += pages;
        if s.resolved == s.total && s.completed_at.is_none() {
            s.completed_at = Some(Instant::now());
        }
        drop(s);
        self.shared.changed.notify_all();
    }

    /// Runs until `stop` is readable (or the userfaultfd fails).
    fn run(&mut self, stop: &UnixStream) {
        let mut events = Vec::with_capacity(64);
        let mut last_event: Option<Instant> = None;
        loop {
            let prefetching = self.prefetch && self.cursor.0 < self.regions.len();
            // Faults come in bursts: stay awake a little after one instead of sleeping, since
            // waking a sleeping thread costs tens of microseconds on an idle (virtual) CPU.
            let spinning = last_event.is_some_and(|t| t.elapsed() < self.spin);
            let timeout = if prefetching || spinning { 0 } else { -1 };
            let ready = match uffd::poll_readable(&[self.uffd.as_fd(), stop.as_fd()], timeout) {
                Ok(r) => r,
                Err(e) => {
                    self.handler_failure("poll", &e);
                    return;
                }
            };
            if ready[1] {
                return;
            }
            if ready[0] {
                match self.uffd.read_events(&mut events) {
                    Ok(_) => {
                        last_event = Some(Instant::now());
                        for &e in &events {
                            self.event(e);
                        }
                    }
                    Err(e) => {
                        self.handler_failure("read", &e);
                        return;
                    }
                }
            } else if prefetching {
                self.prefetch_one();
            }
        }
    }

    fn handler_failure(&self, op: &'static str, e: &io::Error) {
        let guest = self.regions.first().map_or(GuestAddress(0), |r| r.guest);
        let len = self.regions.iter().map(|r| r.len).sum();
        self.record(Failure {
            guest_addr: guest,
            len,
            reason: FailureReason::Uffd { op, errno: e.raw_os_error() },
        });
    }

    /// The region holding host address `addr` (regions are in guest order; their host
    /// addresses may be in any order).
    fn region_of(&self, addr: u64) -> Option<usize> {
        let i = self.by_host.partition_point(|&i| self.regions[i].host + self.regions[i].len <= addr);
        let ri = *self.by_host.get(i)?;
        self.regions[ri].contains(addr).then_some(ri)
    }

    fn event(&mut self, e: UffdEvent) {
        match e {
            UffdEvent::PageFault { address, .. } => {
                self.shared.faults.fetch_add(1, Ordering::Relaxed);
                self.fault(address);
            }
            UffdEvent::Remove { start, end } => self.remove(start, end),
            _ => {}
        }
    }

    fn fault(&mut self, address: u64) {
        let Some(ri) = self.region_of(address) else {
            // Not ours (cannot happen for ranges we registered): let it retry.
            let _ = self.uffd.wake((address & !0xfff) as *mut u8, 4096);
            return;
        };
        let r = &self.regions[ri];
        let page = (address - r.host) / r.page;
        let unit = page * r.page / r.unit;
        if bit(&r.failed, unit) {
            // Never mapped: the fault waits (or the pages were poisoned).
            self.held += 1;
            return;
        }
        if bit(&r.placed, page) || bit(&r.discarded, page) {
            // Placed before and gone since (a discard, a punched hole), or a duplicate fault:
            // the page reads as zeros now; if it is there after all, just wake.
            self.zero_page(ri, page);
            return;
        }
        // A page the unit did not place (it failed) stays pending.
        self.place_units(ri, unit, 1, true);
    }

    /// Places zeros at page `page` of region `ri` (a fault on a page that was discarded or
    /// already placed), or wakes its waiters if it is there.
    fn zero_page(&mut self, ri: usize, page: u64) {
        let r = &self.regions[ri];
        let at = (r.host + page * r.page) as *mut u8;
        let res = if r.hugetlb {
            if self.zeros.len() < r.page as usize {
                self.zeros = vec![0; r.page as usize];
            }
            self.uffd.copy(at, &self.zeros[..r.page as usize], true)
        } else {
            self.uffd.zeropage(at, r.page as usize, true)
        };
        match res {
            Ok(_) => {}
            Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = self.uffd.wake(at, r.page as usize);
            }
            Err((_, e)) => {
                let failure = Failure {
                    guest_addr: GuestAddress(r.guest.0 + page * r.page),
                    len: r.page,
                    reason: FailureReason::Uffd { op: "UFFDIO_ZEROPAGE", errno: e.raw_os_error() },
                };
                self.record(failure);
                return;
            }
        }
        let r = &mut self.regions[ri];
        set_bit(&mut r.placed, page, true);
        set_bit(&mut r.discarded, page, false);
    }

    fn remove(&mut self, start: u64, end: u64) {
        let mut newly = 0;
        let mut discarded = 0;
        for r in &mut self.regions {
            let (s, e) = (start.max(r.host), end.min(r.host + r.len));
            if s >= e {
                continue;
            }
            // Pages wholly inside the range (DONTNEED and REMOVE work on whole pages).
            let first = (s - r.host).div_ceil(r.page);
            let last = (e - r.host) / r.page;
            for p in first..last {
                if bit(&r.discarded, p) {
                    continue;
                }
                if !bit(&r.placed, p) {
                    newly += 1;
                }
                set_bit(&mut r.placed, p, false);
                set_bit(&mut r.discarded, p, true);
                discarded += 1;
            }
        }
        self.shared.discarded.fetch_add(discarded, Ordering::Relaxed);
        self.resolve(newly);
    }

    fn prefetch_one(&mut self) {
        while self.cursor.0 < self.regions.len() {
            let (ri, unit) = self.cursor;
            let r = &self.regions[ri];
            let units = r.units();
            if unit >= units {
                self.cursor = (ri + 1, 0);
                continue;
            }
            if bit(&r.failed, unit) || self.unit_resolved(ri, unit) {
                self.cursor.1 += 1;
                continue;
            }
            // A batch of consecutive units still to do, read at once.
            let most = (PREFETCH_BATCH / r.unit).max(1);
            let mut count = 1;
            while count < most
                && unit + count < units
                && !bit(&self.regions[ri].failed, unit + count)
                && !self.unit_resolved(ri, unit + count)
            {
                count += 1;
            }
            self.cursor.1 += count;
            self.place_units(ri, unit, count, false);
            return;
        }
    }

    fn unit_pages(&self, ri: usize, unit: u64) -> std::ops::Range<u64> {
        let r = &self.regions[ri];
        let first = unit * r.unit / r.page;
        let last = ((unit + 1) * r.unit).min(r.len) / r.page;
        first..last
    }

    fn unit_resolved(&self, ri: usize, unit: u64) -> bool {
        let r = &self.regions[ri];
        self.unit_pages(ri, unit).all(|p| bit(&r.placed, p) || bit(&r.discarded, p))
    }

    fn fail_unit(&mut self, ri: usize, unit: u64, reason: FailureReason) {
        let r = &mut self.regions[ri];
        set_bit(&mut r.failed, unit, true);
        let start = unit * r.unit;
        let len = r.unit.min(r.len - start);
        let failure = Failure { guest_addr: GuestAddress(r.guest.0 + start), len, reason };
        if self.poison {
            let pages = self.unit_pages(ri, unit);
            let r = &self.regions[ri];
            for p in pages {
                if !bit(&r.placed, p) && !bit(&r.discarded, p) {
                    // SAFETY: the caller of `poison_bad_chunks` promised that nothing in this
                    // process trips over a poisoned page without handling SIGBUS.
                    let _ =
                        unsafe { self.uffd.poison((r.host + p * r.page) as *mut u8, r.page as usize, true) };
                }
            }
        }
        self.record(failure);
    }

    /// Checks region `ri`'s whole checksum (RegionFirst), once; false (and a failure recorded
    /// for every unit) if it does not match.
    fn verify_region(&mut self, ri: usize) -> bool {
        if self.regions[ri].verified {
            return true;
        }
        let r = &self.regions[ri];
        let mut buf = vec![0u8; 1 << 20];
        let computed = checksum_area(&self.file, r.data_offset, r.len, true, &mut buf);
        let reason = match computed {
            Ok(c) if c == r.checksum => {
                self.regions[ri].verified = true;
                self.shared.bytes_read.fetch_add(self.regions[ri].len, Ordering::Relaxed);
                return true;
            }
            Ok(computed) => FailureReason::RegionChecksum { stored: r.checksum, computed },
            Err(SnapshotError::Io { offset, source, .. }) => {
                FailureReason::Read { offset, errno: source.raw_os_error() }
            }
            Err(_) => FailureReason::Read { offset: r.data_offset, errno: None },
        };
        // One failure for the region; every unit of it is failed (and poisoned if asked).
        let r = &mut self.regions[ri];
        let failure = Failure { guest_addr: r.guest, len: r.len, reason };
        r.failed.fill(u64::MAX);
        if self.poison {
            for p in 0..r.len / r.page {
                if !bit(&r.placed, p) && !bit(&r.discarded, p) {
                    // SAFETY: the caller of `poison_bad_chunks` promised that nothing in this
                    // process trips over a poisoned page without handling SIGBUS.
                    let _ =
                        unsafe { self.uffd.poison((r.host + p * r.page) as *mut u8, r.page as usize, true) };
                }
            }
        }
        self.record(failure);
        false
    }

    /// Checks unit `unit` of region `ri`, whose bytes are at `self.buf[off..off + len]` (zeros
    /// for a hole): its chunks against the table. Returns what the unit holds.
    fn check_unit(
        &mut self,
        ri: usize,
        unit: u64,
        off: u64,
        len: u64,
    ) -> std::result::Result<UnitData, FailureReason> {
        let r = &self.regions[ri];
        let at = r.data_offset + unit * r.unit;
        let hole = self.holes[ri].is_hole(&self.file, at, at + len);
        let Some(chunk) = self.chunk else {
            return Ok(if hole { UnitData::Zero } else { UnitData::Bytes });
        };
        let sums = r.chunk_sums.as_deref().unwrap_or(&[]);
        let mut done = 0;
        let mut i = unit * r.unit / chunk;
        while done < len {
            let n = chunk.min(len - done);
            let computed = if hole {
                zero_checksum(n)
            } else {
                Checksum::of(&self.buf[(off + done) as usize..(off + done + n) as usize])
            };
            let stored = sums.get(i as usize).copied().unwrap_or(!computed);
            if computed != stored {
                return Err(FailureReason::ChunkChecksum { stored, computed });
            }
            done += n;
            i += 1;
        }
        Ok(if hole { UnitData::Zero } else { UnitData::Bytes })
    }

    /// Loads, checks and places the missing pages of units `[first, first + count)` of region
    /// `ri` (one read for all of them, each checked on its own); returns how many were placed.
    /// A unit that fails is never placed. The pages are placed without waking, and the waiters
    /// woken once the counters say so, so that a thread that resumes sees the progress that let
    /// it.
    fn place_units(&mut self, ri: usize, first: u64, count: u64, demand: bool) -> u64 {
        if self.chunk.is_none() && !self.verify_region(ri) {
            return 0;
        }
        let (unit_len, region_len, data_offset, page, hugetlb, host) = {
            let r = &self.regions[ri];
            (r.unit, r.len, r.data_offset, r.page, r.hugetlb, r.host)
        };
        let start = first * unit_len;
        let end = ((first + count) * unit_len).min(region_len);
        let at = data_offset + start;
        if !self.holes[ri].is_hole(&self.file, at, data_offset + end) {
            let buf = &mut self.buf[..(end - start) as usize];
            if let Err(e) = self.file.read_exact_at(buf, at) {
                for u in first..first + count {
                    self.fail_unit(ri, u, FailureReason::Read { offset: at, errno: e.raw_os_error() });
                }
                return 0;
            }
            self.shared.bytes_read.fetch_add(end - start, Ordering::Relaxed);
        }
        let mut kinds = std::mem::take(&mut self.kinds);
        kinds.clear();
        for u in first..first + count {
            let off = u * unit_len - start;
            let len = unit_len.min(end - u * unit_len);
            match self.check_unit(ri, u, off, len) {
                Ok(kind) => kinds.push(Some(kind)),
                Err(reason) => {
                    self.fail_unit(ri, u, reason);
                    kinds.push(None);
                }
            }
        }
        if hugetlb && self.zeros.len() < page as usize {
            self.zeros = vec![0; page as usize];
        }
        let kind_of = |kinds: &[Option<UnitData>], p: u64| kinds[(p * page / unit_len - first) as usize];
        let missing = |r: &RegionState, p: u64| !bit(&r.placed, p) && !bit(&r.discarded, p);
        let (first_page, end_page) = (start / page, end / page);
        let mut newly = 0;
        let mut placed_units = kinds.iter().filter(|k| k.is_some()).count() as u64;
        let mut p = first_page;
        while p < end_page {
            let r = &self.regions[ri];
            let Some(kind) = kind_of(&kinds, p).filter(|_| missing(r, p)) else {
                p += 1;
                continue;
            };
            let mut q = p + 1;
            while q < end_page && missing(r, q) && kind_of(&kinds, q) == Some(kind) {
                q += 1;
            }
            let dst = (host + p * page) as *mut u8;
            let len = ((q - p) * page) as usize;
            let res = match kind {
                UnitData::Bytes => {
                    let off = (p * page - start) as usize;
                    self.uffd.copy(dst, &self.buf[off..off + len], false)
                }
                UnitData::Zero if hugetlb => {
                    // No UFFDIO_ZEROPAGE on hugetlb memory: copy zeros, a page at a time.
                    let mut done = 0;
                    let mut r = Ok(0);
                    while done < len {
                        let at = (dst as usize + done) as *mut u8;
                        match self.uffd.copy(at, &self.zeros[..page as usize], false) {
                            Ok(n) => done += n,
                            Err((n, e)) => {
                                r = Err((done + n, e));
                                break;
                            }
                        }
                    }
                    r.map(|_| len)
                }
                UnitData::Zero => self.uffd.zeropage(dst, len, false),
            };
            let (done, err) = match res {
                Ok(_) => (len as u64, None),
                Err((n, e)) => (n as u64, Some(e)),
            };
            let r = &mut self.regions[ri];
            for k in p..p + done / page {
                set_bit(&mut r.placed, k, true);
            }
            newly += done / page;
            p += done / page;
            if let Some(e) = err {
                // The unit of the page that could not be placed fails; the others go on.
                let reason = if e.raw_os_error() == Some(libc::EEXIST) {
                    FailureReason::AlreadyPresent
                } else {
                    FailureReason::Uffd { op: "UFFDIO_COPY", errno: e.raw_os_error() }
                };
                let u = p * page / unit_len;
                self.fail_unit(ri, u, reason);
                kinds[(u - first) as usize] = None;
                placed_units -= 1;
                p = ((u + 1) * unit_len / page).max(p + 1);
            }
        }
        self.kinds = kinds;
        let counter = if demand { &self.shared.demand_units } else { &self.shared.prefetch_units };
        counter.fetch_add(placed_units, Ordering::Relaxed);
        self.resolve(newly);
        // Wake the waiters of the span: those of pages that were not placed fault again and are
        // held.
        let _ = self.uffd.wake((host + start) as *mut u8, (end - start) as usize);
        placed_units
    }
}

/// Guest memory restored lazily from a snapshot, and the handler thread filling it.
pub type LazyRestore<B> = Lazy<GuestMemoryMmap<B>>;

/// A handler serving faults of another process's memory ([`crate::uffd::serve_handover`]).
pub type LazyServer = Lazy<RemoteMemory>;

/// Memory of another process, known by its layout only (a handover's regions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteMemory {
    regions: Vec<HandoverRegion>,
}

impl RemoteMemory {
    /// The regions handed over.
    pub fn regions(&self) -> &[HandoverRegion] {
        &self.regions
    }
}

/// A lazy restore's handler thread and the memory it fills: [`LazyRestore`] for memory of
/// this process, [`LazyServer`] for another process's.
///
/// Dropping it stops the handler and closes the userfaultfd: pages not placed by then become
/// ordinary zero-fill memory. Use [`stop`](Self::stop) (after [`wait_complete`](Self::wait_complete))
/// to end it deliberately.
#[derive(Debug)]
pub struct Lazy<M> {
    memory: M,
    shared: Arc<Shared>,
    stop_tx: Option<UnixStream>,
    thread: Option<std::thread::JoinHandle<Handler>>,
}

/// A lazy restore stopped before it completed: the userfaultfd stays open and registered, so
/// a thread touching a page that was not placed waits (it is never given a zero page in its
/// place). Resume it, or drop it together with the memory.
///
/// Dropping it closes the userfaultfd: missing pages then read as zeros, which is wrong for
/// memory still in use.
#[derive(Debug)]
pub struct ParkedRestore<M> {
    memory: M,
    handler: Handler,
}

/// The outcome of [`Lazy::stop`].
#[derive(Debug)]
pub enum Stopped<M> {
    /// Every page was placed (or discarded); the memory is unregistered and ordinary.
    Complete(LazyStats),
    /// Stopped early: the handler's state, with the userfaultfd still registered.
    Parked(ParkedRestore<M>),
}

impl<M> Stopped<M> {
    /// The statistics of a complete restore, or [`LazyError::Failed`] (the first failure, or an
    /// incomplete one) for a parked one.
    pub fn unwrap_complete(self) -> Result<LazyStats> {
        match self {
            Stopped::Complete(s) => Ok(s),
            Stopped::Parked(p) => {
                let s = p.handler.shared.status.lock().unwrap_or_else(|e| e.into_inner());
                let f = s.failures.first().cloned().unwrap_or(Failure {
                    guest_addr: p.handler.regions.first().map_or(GuestAddress(0), |r| r.guest),
                    len: 0,
                    reason: FailureReason::Uffd { op: "stop before completion", errno: None },
                });
                drop(s);
                Err(LazyError::Failed(f))
            }
        }
    }
}

fn stats_of(shared: &Shared, started: Instant) -> LazyStats {
    let progress = shared.progress();
    let done = shared.status.lock().unwrap_or_else(|e| e.into_inner()).completed_at;
    LazyStats { pages_total: progress.pages_total, progress, fill_time: done.map(|d| d - started) }
}

fn spawn<M>(memory: M, mut handler: Handler) -> Result<Lazy<M>> {
    let (stop_tx, stop_rx) = UnixStream::pair().map_err(LazyError::Thread)?;
    let shared = handler.shared.clone();
    let thread = std::thread::Builder::new()
        .name("guestmem-uffd".into())
        .spawn(move || {
            handler.run(&stop_rx);
            handler
        })
        .map_err(LazyError::Thread)?;
    Ok(Lazy { memory, shared, stop_tx: Some(stop_tx), thread: Some(thread) })
}

impl<B> Lazy<GuestMemoryMmap<B>> {
    /// The restored memory (cheap to clone). Register it with KVM, start the vCPUs.
    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        &self.memory
    }
}

impl<B: Bitmap> Lazy<GuestMemoryMmap<B>> {
    /// Frees `[addr, addr + len)` of the restored memory (one region; multiples of its page
    /// size) the way the handler sees: `MADV_DONTNEED` for private memory, `MADV_REMOVE` for
    /// shared memory (memfd, shared anonymous), each of which is an `EVENT_REMOVE`, so the
    /// range reads as zeros afterwards and is never filled from the snapshot. Use it rather
    /// than [`MmapRegion::discard`](crate::mmap::MmapRegion::discard) while the restore runs:
    /// that one punches holes in a memfd, which sends no event, so a page the handler had not
    /// placed yet would still be filled. The range is marked dirty.
    ///
    /// ```
    /// use guestmem::mmap::{Backing, MemfdOptions};
    /// use guestmem::snapshot::{self, lazy};
    /// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
    /// # if guestmem::sys::uffd::available_features(guestmem::sys::uffd::OpenVia::Any).is_err() { return; }
    /// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// src.write_obj(1u8, GuestAddress(0x5000)).unwrap();
    /// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    /// snapshot::dump(&src, &file).unwrap();
    /// let options = lazy::LazyOptions::new().prefetch(false);
    /// let restore = lazy::restore_lazy_with::<(), _>(&file, options, |_, b| b.backing(Backing::Memfd(MemfdOptions::new("ram")))).unwrap();
    /// restore.discard(GuestAddress(0x4000), 0x4000).unwrap(); // a balloon took these pages
    /// assert_eq!(restore.memory().read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0);
    /// assert!(restore.discard(GuestAddress(0x4001), 0x1000).is_err());
    /// ```
    pub fn discard(&self, addr: GuestAddress, len: usize) -> Result<()> {
        let (region, offset) =
            self.memory.to_region_addr(addr).ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
        let offset = offset.0 as usize;
        let m = region.mapping();
        let base = region.start_addr();
        let mmap_err = |source| LazyError::Memory(GuestMemoryError::Mmap { base, source });
        if offset.checked_add(len).is_none_or(|end| end > m.size()) {
            return Err(GuestMemoryError::NotContiguous { addr, len }.into());
        }
        let page = m.page_size();
        if len == 0 {
            return Err(mmap_err(MmapError::ZeroSize));
        }
        for (what, value) in [("discard offset", offset), ("discard length", len)] {
            if !value.is_multiple_of(page) {
                return Err(mmap_err(MmapError::Unaligned {
                    what,
                    value: value as u64,
                    page_size: page as u64,
                }));
            }
        }
        if !m.protection().is_writable() {
            return Err(mmap_err(MmapError::ReadOnly { offset, len }));
        }
        let advice = if m.flags().contains(MapFlags::SHARED) { Advice::Remove } else { Advice::DontNeed };
        // SAFETY: the range lies inside one of our own mappings (checked above). Guest memory
        // is only accessed through volatile accesses and raw copies, never references, so
        // dropping its contents under concurrent users is a concurrent write of zeros.
        unsafe { crate::sys::madvise(m.as_ptr().add(offset), len, advice) }
            .map_err(|source| mmap_err(MmapError::Discard { offset, len, source }))?;
        m.bitmap().mark_dirty(offset, len);
        Ok(())
    }
}

impl Lazy<RemoteMemory> {
    /// The other process's memory, as handed over.
    pub fn remote(&self) -> &RemoteMemory {
        &self.memory
    }
}

impl<M> Lazy<M> {
    /// How far the restore is.
    pub fn progress(&self) -> LazyProgress {
        self.shared.progress()
    }

    /// Whether every page was placed or discarded.
    pub fn is_complete(&self) -> bool {
        let s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        s.resolved == s.total
    }

    /// The failures recorded so far (each names memory that was not placed, and why).
    pub fn failures(&self) -> Vec<Failure> {
        self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).failures.clone()
    }

    /// Waits until the restore is complete (`Ok(true)`), `timeout` passes (`Ok(false)`), or a
    /// failure is recorded ([`LazyError::Failed`] with the first one).
    pub fn wait_complete(&self, timeout: Option<Duration>) -> Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = s.failures.first() {
                return Err(LazyError::Failed(f.clone()));
            }
            if s.resolved == s.total {
                return Ok(true);
            }
            match deadline {
                None => s = self.shared.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    s = self.shared.changed.wait_timeout(s, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }

    fn join(&mut self) -> Option<Handler> {
        drop(self.stop_tx.take());
        self.thread.take().and_then(|t| t.join().ok())
    }

    /// Stops the handler thread. A complete restore is unregistered and its memory is
    /// ordinary from then on ([`Stopped::Complete`]); an incomplete one is parked
    /// ([`Stopped::Parked`]), its userfaultfd kept so that missing pages are never read as
    /// zeros.
    pub fn stop(mut self) -> Stopped<M>
    where
        M: Clone,
    {
        let handler = self.join();
        let memory = self.memory.clone();
        let Some(handler) = handler else {
            // The thread panicked: nothing serves faults; its userfaultfd is gone with it.
            return Stopped::Complete(stats_of(&self.shared, Instant::now()));
        };
        let complete = {
            let s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            s.resolved == s.total
        };
        if !complete {
            return Stopped::Parked(ParkedRestore { memory, handler });
        }
        for r in &handler.regions {
            let _ = handler.uffd.unregister(r.host as *mut u8, r.len as usize);
        }
        Stopped::Complete(stats_of(&handler.shared, handler.started))
    }
}

impl<M> Drop for Lazy<M> {
    fn drop(&mut self) {
        self.join();
    }
}

impl<B> ParkedRestore<GuestMemoryMmap<B>> {
    /// The memory.
    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        &self.memory
    }
}

impl<M> ParkedRestore<M> {
    /// How far the restore got.
    pub fn progress(&self) -> LazyProgress {
        self.handler.shared.progress()
    }

    /// Starts a handler thread again, from where the last one stopped.
    pub fn resume(self) -> Result<Lazy<M>> {
        spawn(self.memory, self.handler)
    }
}

/// [`restore_lazy_with`] with the default options and each region anonymous private memory of
/// base pages.
pub fn restore_lazy<B: NewBitmap>(file: &File) -> Result<LazyRestore<B>> {
    restore_lazy_with(file, LazyOptions::default(), |_, b| b)
}

/// The snapshot's header and, as `verify` asks, its chunk table.
fn open_snapshot(file: &File, verify: Verify) -> Result<(SnapshotInfo, Option<ChunkTable>)> {
    let info = SnapshotInfo::read(file)?;
    if info.kind != SnapshotKind::Full {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: info.kind }.into());
    }
    let table = match verify {
        Verify::RegionFirst => None,
        Verify::Auto => read_chunk_table_of(file, &info)?,
        Verify::ChunkTable => Some(read_chunk_table_of(file, &info)?.ok_or(LazyError::ChunkTableMissing)?),
    };
    Ok((info, table))
}

/// New memory in the snapshot's layout (through `configure`), registered with a new
/// userfaultfd for missing faults.
fn map_and_register<B, F>(
    info: &SnapshotInfo,
    via: OpenVia,
    mut configure: F,
) -> Result<(GuestMemoryMmap<B>, Uffd, Vec<HandoverRegion>)>
where
    B: NewBitmap,
    F: FnMut(&SnapshotRegion, MmapRegionBuilder<B>) -> MmapRegionBuilder<B>,
{
    let regions = info
        .regions
        .iter()
        .map(|r| {
            let size = usize::try_from(r.len)
                .map_err(|_| GuestMemoryError::Overflow { addr: r.guest_addr, len: usize::MAX })?;
            // A discard must reach the handler (EVENT_REMOVE), never be a silent hole punch.
            let builder = configure(r, MmapRegionBuilder::<B>::new(size)).discard_by_remove(true);
            Ok(GuestRegionMmap::build(builder, r.guest_addr)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let memory = GuestMemoryMmap::from_regions(regions)?;
    let hugetlb = memory.regions().iter().any(|r| r.mapping().is_hugetlbfs());
    let mut features = Features::EVENT_REMOVE;
    if hugetlb {
        features |= Features::MISSING_HUGETLBFS;
    }
    let uffd = match Uffd::open(via, features) {
        Ok(u) => u,
        Err(source) => {
            return Err(match uffd::available_features(via) {
                Ok(offered) if !offered.contains(features) => {
                    LazyError::Unsupported(features.difference(offered))
                }
                _ => LazyError::Uffd { op: "open", source },
            })
        }
    };
    let mut layout = Vec::with_capacity(memory.regions().len());
    for (region, meta) in memory.regions().iter().zip(&info.regions) {
        let m = region.mapping();
        let register_err =
            |source| LazyError::Register { guest_addr: meta.guest_addr, len: meta.len, source };
        // SAFETY: the region was just mapped by us and nothing has touched it; its missing
        // pages are exactly what the handler is for. It stays mapped while `memory` lives, and
        // the handler only passes its addresses to the kernel.
        let ioctls =
            unsafe { uffd.register(m.as_ptr(), m.size(), RegisterMode::MISSING) }.map_err(register_err)?;
        let need = if m.is_hugetlbfs() { Ioctls::COPY } else { Ioctls::COPY | Ioctls::ZEROPAGE };
        if !ioctls.contains(need) {
            return Err(register_err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel cannot place pages in this memory with UFFDIO_COPY/UFFDIO_ZEROPAGE",
            )));
        }
        layout.push(HandoverRegion {
            host_addr: m.as_ptr() as u64,
            len: meta.len,
            guest_addr: meta.guest_addr,
            page_size: m.page_size() as u64,
        });
    }
    Ok((memory, uffd, layout))
}

/// The handler for `layout` (registered on `uffd`), serving from `file`.
fn handler_for(
    file: &File,
    (info, table): (&SnapshotInfo, Option<ChunkTable>),
    uffd: Uffd,
    layout: &[HandoverRegion],
    base_page: u64,
    options: &LazyOptions,
    started: Instant,
) -> Result<Handler> {
    let chunk = table.as_ref().map(ChunkTable::chunk_size);
    let mut states = Vec::with_capacity(layout.len());
    let mut max_unit = 0;
    let mut total = 0;
    for (i, (r, meta)) in layout.iter().zip(&info.regions).enumerate() {
        let page = r.page_size;
        let unit = chunk.unwrap_or(DEFAULT_CHUNK_SIZE).max(page);
        let pages = meta.len / page;
        total += pages;
        max_unit = max_unit.max(unit);
        let words = |n: u64| vec![0u64; n.div_ceil(64) as usize];
        states.push(RegionState {
            host: r.host_addr,
            len: meta.len,
            guest: meta.guest_addr,
            page,
            unit,
            hugetlb: page > base_page,
            data_offset: meta.data_offset,
            checksum: meta.checksum,
            chunk_sums: table.as_ref().map(|t| t.region_chunks(i).to_vec()),
            verified: false,
            placed: words(pages),
            discarded: words(pages),
            failed: words(meta.len.div_ceil(unit)),
        });
    }
    let shared = Arc::new(Shared {
        status: Mutex::new(Status { total, ..Status::default() }),
        changed: Condvar::new(),
        faults: AtomicU64::new(0),
        demand_units: AtomicU64::new(0),
        prefetch_units: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        discarded: AtomicU64::new(0),
    });
    let file = file.try_clone().map_err(|e| io_err("dup", 0, e))?;
    let holes = states.iter().map(|_| HoleCache::default()).collect();
    let mut by_host: Vec<usize> = (0..states.len()).collect();
    by_host.sort_by_key(|&i| states[i].host);
    Ok(Handler {
        uffd: Arc::new(uffd),
        file,
        regions: states,
        by_host,
        chunk,
        prefetch: options.prefetch,
        poison: options.poison,
        spin: options.spin,
        cursor: (0, 0),
        shared,
        started,
        buf: vec![0; max_unit.max(PREFETCH_BATCH) as usize],
        zeros: Vec::new(),
        holes,
        kinds: Vec::new(),
        held: 0,
    })
}

/// Restores the full snapshot `file` lazily: maps each region (through `configure`, which may
/// choose anonymous, shared anonymous, memfd or hugetlb memory, guard pages, alignment, ...;
/// the memory must start empty, so no prefault or lock), registers it with a new userfaultfd,
/// starts the handler thread and returns. Only the header and the chunk table are read here.
///
/// Refused: a diff snapshot (rebase it first); a file whose header or chunk table is invalid;
/// memory userfaultfd cannot serve (a file mapping; hugetlb memory on a kernel without hugetlb
/// support). A fault places a whole unit: the chunk size, rounded up to the region's page size
/// (2 MiB for hugetlb memory).
///
/// ```
/// use guestmem::mmap::{Backing, MemfdOptions};
/// use guestmem::snapshot::{self, lazy};
/// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
/// # if guestmem::sys::uffd::available_features(guestmem::sys::uffd::OpenVia::Any).is_err() { return; }
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// src.write_obj(7u32, GuestAddress(0x8000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&src, &file).unwrap();
/// lazy::write_chunk_table(&file, 0x4000).unwrap();
/// let options = lazy::LazyOptions::new().verify(lazy::Verify::ChunkTable).prefetch(false);
/// let restore = lazy::restore_lazy_with::<(), _>(&file, options, |_, b| {
///     b.backing(Backing::Memfd(MemfdOptions::new("restored")))
/// })
/// .unwrap();
/// assert_eq!(restore.memory().read_obj::<u32>(GuestAddress(0x8000)).unwrap(), 7);
/// assert_eq!(restore.progress().demand_units, 1); // only the 16 KiB touched were read
/// ```
pub fn restore_lazy_with<B, F>(file: &File, options: LazyOptions, configure: F) -> Result<LazyRestore<B>>
where
    B: NewBitmap,
    F: FnMut(&SnapshotRegion, MmapRegionBuilder<B>) -> MmapRegionBuilder<B>,
{
    let started = Instant::now();
    let (info, table) = open_snapshot(file, options.verify)?;
    let (memory, uffd, layout) = map_and_register(&info, options.via, configure)?;
    let base = crate::sys::page_size() as u64;
    let handler = handler_for(file, (&info, table), uffd, &layout, base, &options, started)?;
    spawn(memory, handler)
}

/// The sending side of a handover: new, empty memory in the snapshot's layout (through
/// `configure`, as for [`restore_lazy_with`]) registered with a new userfaultfd, and the layout
/// to send with it ([`crate::uffd::send_handover`]). Until a handler serves it, a thread
/// touching the memory waits. Reads only the snapshot's header.
pub fn prepare_handover<B, F>(
    file: &File,
    configure: F,
) -> Result<(GuestMemoryMmap<B>, Uffd, Vec<HandoverRegion>)>
where
    B: NewBitmap,
    F: FnMut(&SnapshotRegion, MmapRegionBuilder<B>) -> MmapRegionBuilder<B>,
{
    let info = SnapshotInfo::read(file)?;
    if info.kind != SnapshotKind::Full {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: info.kind }.into());
    }
    map_and_register(&info, OpenVia::Any, configure)
}

/// The receiving side's server (see [`crate::uffd::serve_handover`]).
pub(crate) fn serve_regions(handover: Handover, file: &File, options: LazyOptions) -> Result<LazyServer> {
    let started = Instant::now();
    let (info, table) = open_snapshot(file, options.verify)?;
    let regions = &handover.regions;
    if regions.len() != info.regions.len() {
        let (h, s) = (regions.last(), info.regions.last());
        return Err(HandoverError::LayoutMismatch {
            index: regions.len().min(info.regions.len()),
            handover_addr: h.map_or(GuestAddress(0), |r| r.guest_addr),
            handover_len: h.map_or(0, |r| r.len),
            snapshot_addr: s.map_or(GuestAddress(0), |r| r.guest_addr),
            snapshot_len: s.map_or(0, |r| r.len),
        }
        .into());
    }
    for (index, (h, s)) in regions.iter().zip(&info.regions).enumerate() {
        if h.guest_addr != s.guest_addr || h.len != s.len {
            return Err(HandoverError::LayoutMismatch {
                index,
                handover_addr: h.guest_addr,
                handover_len: h.len,
                snapshot_addr: s.guest_addr,
                snapshot_len: s.len,
            }
            .into());
        }
    }
    if !handover.uffd.features().contains(Features::EVENT_REMOVE) {
        return Err(LazyError::Unsupported(Features::EVENT_REMOVE));
    }
    let memory = RemoteMemory { regions: handover.regions.clone() };
    let base = handover.base_page_size;
    let handler = handler_for(file, (&info, table), handover.uffd, &memory.regions, base, &options, started)?;
    spawn(memory, handler)
}
