//! Snapshots of guest memory in sparse files: full and diff dumps, restore by copy or by
//! mapping, rebase of a diff onto a full snapshot, and verification.
//!
//! # The model
//!
//! A snapshot file is a small self-describing header area followed by each region's data at a
//! page-aligned file offset, at the same offset inside its region as in guest memory:
//!
//! - **Header** (64 bytes, little-endian): magic `GMEMSNAP`, version, flags (bit 0: diff),
//!   region count, the snapshot page size (the host base page size, the granule of holes and
//!   bitmaps), the header area length, the file length, and a [`Checksum`] of the whole header
//!   area (taken with the checksum field as zero).
//! - **Region table** (48 bytes per region): guest address, length, the page size of the
//!   memory it came from (the huge page size for hugetlb memory; the data offset is a multiple
//!   of it), the data's file offset, the checksum of the region's data area (holes read as
//!   zeros), and for a diff the offset of its page bitmap.
//! - **Page bitmaps** (diff only): one bit per snapshot page, set for the pages the diff holds.
//!   A held page that is all zeros is a hole in the file, like every page a diff does not
//!   hold; only the bitmap tells them apart.
//! - **Data**: pages that are all zeros are never written, so the file stays sparse (its
//!   allocated blocks are about its non-zero pages). A region whose length is not a page
//!   multiple has a partial last page: its data is its length, and the file holds whole
//!   pages (the tail of the last one a hole), so [`restore_mapped`] can map it.
//!
//! The header area is written last, so a dump that fails midway leaves a file that every
//! reader refuses.
//!
//! # The operations
//!
//! - [`dump`]: every page of a [`GuestMemoryMmap`], written with `pwrite(2)` straight from
//!   guest memory (no bounce copy), skipping zero pages (detected with word loads).
//! - [`dump_dirty`]: only the pages harvested as dirty (needs a [`DirtyHarvest`] bitmap);
//!   on failure the harvested ranges are put back, so the next diff still has them.
//!   [`dump_ranges`] does the same for a caller's list of ranges.
//! - [`restore_into`]: copies a full or diff snapshot into existing memory through the
//!   [`GuestMemory`] API (destination dirty tracking sees every write). It reads only data
//!   extents (`SEEK_DATA`/`SEEK_HOLE`, or everything where the filesystem cannot tell), and
//!   it reads the file **twice**: a first pass checks every data checksum, so a corrupt file
//!   is refused before any byte of guest memory changes.
//! - [`restore_mapped`]: new memory that maps a full snapshot `MAP_PRIVATE`, region by region:
//!   no copy, and guest writes never reach the file ([`restore_mapped_with`] sets the
//!   regions' policies). To stay O(regions) it checks the header,
//!   the table and the file length, not the data; call [`verify`] first when the file may be
//!   corrupt.
//! - [`rebase`]: applies a diff onto a full snapshot, giving the full snapshot a dump at the
//!   diff's time would have given (byte for byte, checksums included).
//! - [`verify`]: checks every region's data against its checksum.
//!
//! Snapshots describe memory that does not change while they are taken: pause the vCPUs (and
//! the device threads) around a dump. A page written during the dump is read twice (once for
//! the checksum, once by the kernel for the file) and may differ between the two reads; the
//! file is then refused by [`verify`], [`restore_into`] and [`rebase`], never restored wrong.
//!
//! ```
//! use guestmem::bitmap::AtomicBitmap;
//! use guestmem::snapshot;
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! mem.write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();
//! let full = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! snapshot::dump(&mem, &full).unwrap();
//! mem.take_dirty_ranges(|_, _| {}).unwrap(); // the full snapshot has everything so far
//!
//! mem.write_obj(0xbeef_u64, GuestAddress(0x8000)).unwrap();
//! let diff = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! let stats = snapshot::dump_dirty(&mem, &diff).unwrap();
//! assert_eq!(stats.pages_written, 1);
//!
//! let rebased = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! snapshot::rebase(&full, &diff, &rebased).unwrap();
//! let restored = snapshot::restore_mapped::<()>(&rebased).unwrap();
//! assert_eq!(restored.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
//! assert_eq!(restored.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0xbeef);
//! ```

mod format;
pub mod lazy;

pub use format::{HeldRuns, SnapshotInfo, SnapshotKind, SnapshotRegion, MAGIC, VERSION};

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, BitmapError, BitmapSlice, DirtyHarvest, NewBitmap};
use crate::checksum::Checksum;
use crate::memory::{GuestMemory, GuestMemoryError, GuestMemoryMmap};
use crate::mmap::{Backing, FileOffset, MmapRegionBuilder};
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::fd::{lseek_data, SeekData};
use crate::volatile::{ReadVolatileAt, VolatileError, VolatileSlice, WriteVolatileAt};

/// Errors of taking, checking and restoring snapshots. Every refusal of a file happens before
/// guest memory is changed.
///
/// ```
/// use guestmem::snapshot::{self, SnapshotError};
/// let empty = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// let e = snapshot::read_info(&empty).unwrap_err();
/// assert!(matches!(e, SnapshotError::Truncated { part: "header", file_len: 0, .. }));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A read, write or other call on the snapshot file failed.
    #[error("{op} at file offset {offset:#x} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where in the file.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// The file ends before a part the header says it has.
    #[error("snapshot file of {file_len:#x} bytes is truncated: its {part} needs {needed:#x} bytes")]
    Truncated {
        /// The part cut off: "header", "region table" or "region data".
        part: &'static str,
        /// The file length the part needs.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a guestmem snapshot: magic {found:02x?}")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A format version this crate does not read.
    #[error("snapshot format version {found} is not supported (this crate reads version {supported})")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this crate reads.
        supported: u32,
    },
    /// The header area does not match its checksum.
    #[error("snapshot header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    HeaderChecksum {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of what the file holds.
        computed: u64,
    },
    /// A header whose checksum is right but which describes an impossible layout (unknown
    /// flags, overlapping or misaligned regions, data past the file length, ...).
    #[error("snapshot header describes an invalid layout: {reason}")]
    InvalidLayout {
        /// What is wrong.
        reason: &'static str,
    },
    /// A region's data does not match its checksum.
    #[error("data of snapshot region {index} (guest {guest_addr}) does not match its checksum: stored {stored:#018x}, computed {computed:#018x}")]
    DataChecksum {
        /// Index of the region in the table.
        index: usize,
        /// Its guest address.
        guest_addr: GuestAddress,
        /// The checksum in the table.
        stored: u64,
        /// The checksum of the data in the file.
        computed: u64,
    },
    /// The snapshot and the memory (or the other snapshot) have different numbers of regions.
    #[error("the snapshot has {snapshot} regions, the target has {target}")]
    RegionCount {
        /// Regions in the snapshot.
        snapshot: usize,
        /// Regions in the memory or the other snapshot.
        target: usize,
    },
    /// A region of the snapshot differs in place or size from the target's region.
    #[error("snapshot region {index} is [{snapshot_addr}, +{snapshot_len:#x}), the target's is [{target_addr}, +{target_len:#x})")]
    RegionMismatch {
        /// Index of the region.
        index: usize,
        /// Its guest address in the snapshot.
        snapshot_addr: GuestAddress,
        /// Its length in the snapshot.
        snapshot_len: u64,
        /// The target region's guest address.
        target_addr: GuestAddress,
        /// The target region's length.
        target_len: u64,
    },
    /// A full snapshot where a diff was needed, or the other way round.
    #[error("a {expected} snapshot is needed, this one is a {found} snapshot")]
    KindMismatch {
        /// The kind the operation needs.
        expected: SnapshotKind,
        /// The file's kind.
        found: SnapshotKind,
    },
    /// Guest memory refused an access or a mapping (a read-only target, a range outside guest
    /// memory, a region that could not be mapped).
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The output of a dump or rebase is the very file it reads (a file backing the memory,
    /// e.g. the snapshot a `restore_mapped` memory maps; or an input of the rebase): writing
    /// it truncates it first and would destroy the data. Nothing was written.
    #[error("the output is {input}: writing it would destroy what is read")]
    OutputIsInput {
        /// What the output is.
        input: &'static str,
    },
    /// A region whose file was truncated under its mapping (see
    /// [`MmapRegion::backing_lost`](crate::mmap::MmapRegion::backing_lost)): its memory no
    /// longer holds what the guest wrote, so no snapshot of it is taken.
    #[error("the region at {guest_addr} lost its backing file's pages (truncated under the mapping): its contents are gone")]
    BackingLost {
        /// The region's guest address.
        guest_addr: GuestAddress,
    },
    /// The dirty bitmap could not be harvested (a region without dirty tracking).
    #[error("dirty bitmap: {0}")]
    Dirty(#[from] BitmapError),
}

/// A result of a snapshot operation.
pub type Result<T> = std::result::Result<T, SnapshotError>;

pub(crate) fn io_err(op: &'static str, offset: u64, source: io::Error) -> SnapshotError {
    SnapshotError::Io { op, offset, source }
}

fn volatile_io(e: VolatileError) -> io::Error {
    match e {
        VolatileError::Io(e) => e,
        VolatileError::PartialBuffer { .. } => io::Error::from(io::ErrorKind::UnexpectedEof),
        e => io::Error::other(e.to_string()),
    }
}

/// Where a dump writes: positional writes from guest memory and a way to set the length.
///
/// Implemented by [`File`] (with `pwrite(2)`, straight from guest memory) and by references to
/// writers; implement it to send a dump somewhere else, or to inject failures in tests.
///
/// ```
/// use std::io;
/// use guestmem::bitmap::BitmapSlice;
/// use guestmem::snapshot::SnapshotWriter;
/// use guestmem::VolatileSlice;
///
/// /// Counts the bytes a dump writes, and writes nothing.
/// #[derive(Default)]
/// struct Counter(std::cell::Cell<u64>);
/// impl SnapshotWriter for Counter {
///     fn write_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, _offset: u64) -> io::Result<usize> {
///         self.0.set(self.0.get() + buf.len() as u64);
///         Ok(buf.len())
///     }
///     fn set_len(&self, _len: u64) -> io::Result<()> {
///         Ok(())
///     }
/// }
/// ```
pub trait SnapshotWriter {
    /// Writes up to `buf.len()` bytes of `buf` at file offset `offset`; returns the count.
    fn write_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> io::Result<usize>;

    /// Sets the length of the output; bytes not written afterwards read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// The (device, inode) of the file written, if it is one: a dump refuses to write into a
    /// file that backs the memory it dumps, and a rebase into one of its inputs (both truncate
    /// the output first, which would destroy what they read). The default, `None`, is for
    /// outputs that are no file.
    fn file_identity(&self) -> Option<(u64, u64)> {
        None
    }
}

impl SnapshotWriter for File {
    fn write_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> io::Result<usize> {
        self.write_volatile_at(buf, offset).map_err(volatile_io)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn file_identity(&self) -> Option<(u64, u64)> {
        file_identity(self)
    }
}

impl<W: SnapshotWriter + ?Sized> SnapshotWriter for &W {
    fn write_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> io::Result<usize> {
        (**self).write_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }

    fn file_identity(&self) -> Option<(u64, u64)> {
        (**self).file_identity()
    }
}

/// The (device, inode) of `file`, if `fstat` answers.
fn file_identity(file: &File) -> Option<(u64, u64)> {
    crate::sys::fstat(file.as_fd()).ok().map(|st| (st.dev, st.ino))
}

/// Refuses an output that is the same file as one of `inputs`.
fn same_file_refused<W: SnapshotWriter + ?Sized>(out: &W, inputs: &[&File]) -> Result<()> {
    let Some(id) = out.file_identity() else { return Ok(()) };
    if inputs.iter().any(|f| file_identity(f) == Some(id)) {
        return Err(SnapshotError::OutputIsInput { input: "a snapshot the rebase reads" });
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
fn write_all_at<W: SnapshotWriter + ?Sized, S: BitmapSlice>(
    out: &W,
    buf: &VolatileSlice<'_, S>,
    offset: u64,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let part = buf.offset(done).map_err(|e| io_err("write", at, volatile_io(e)))?;
        match out.write_at(&part, at) {
            Ok(0) => return Err(io_err("write", at, io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("write", at, e)),
        }
    }
    Ok(())
}

/// What a dump or rebase wrote.
///
/// ```
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
/// mem.write_obj(1u8, GuestAddress(0)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// let s = snapshot::dump(&mem, &file).unwrap();
/// assert_eq!((s.pages_held, s.pages_written, s.zero_pages, s.bytes_written), (4, 1, 3, 4096));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// The snapshot's length (its apparent size; holes included).
    pub file_len: u64,
    /// Bytes of page data written (zero pages excluded).
    pub bytes_written: u64,
    /// Pages the snapshot holds (all pages for a full snapshot).
    pub pages_held: u64,
    /// Held pages written as data.
    pub pages_written: u64,
    /// Held pages that were all zeros, left as holes.
    pub zero_pages: u64,
}

/// What a restore copied.
///
/// ```
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap(); // all zeros: no data at all
/// mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
/// let s = snapshot::restore_into(&mem, &file).unwrap();
/// assert_eq!((s.bytes_read, s.bytes_zeroed), (0, 4096));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Bytes read from the file into guest memory (data extents only).
    pub bytes_read: u64,
    /// Bytes of guest memory set to zero because the snapshot has a hole there and the
    /// memory was not already zero.
    pub bytes_zeroed: u64,
}

/// The snapshot page size: the host base page size.
fn snapshot_page_size() -> u64 {
    crate::sys::page_size() as u64
}

/// Bytes of consecutive non-zero pages gathered into one `pwrite(2)`: small enough that the
/// pages are still in cache from the zero check and checksum when the kernel copies them.
const WRITE_CHUNK: u64 = 256 << 10;

/// Whether the bytes of `slice` are all zero, by word loads that stop at the first non-zero
/// word.
fn is_zero<S: BitmapSlice>(slice: &VolatileSlice<'_, S>) -> bool {
    let base = slice.as_ptr();
    let len = slice.len();
    if !(base as usize).is_multiple_of(8) || !len.is_multiple_of(64) {
        return (0..len).all(|i| {
            // SAFETY: `i < len`: the byte lies in the slice, valid for reads while it lives.
            unsafe { base.add(i).read_volatile() == 0 }
        });
    }
    let words = base.cast::<u64>();
    let mut i = 0;
    while i < len / 8 {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: `i + k < len / 8` (len is a multiple of 64 bytes, i a multiple of 8
            // words): the word lies in the slice, 8-byte aligned (checked above).
            acc |= unsafe { words.add(i + k).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

/// Writes one region's held runs: non-zero pages as data, zero pages and pages not held as
/// holes; returns the checksum of the region's data area.
fn write_region<S: BitmapSlice, W: SnapshotWriter + ?Sized>(
    slice: &VolatileSlice<'_, S>,
    runs: impl IntoIterator<Item = (u64, u64)>,
    page_size: u64,
    data_offset: u64,
    out: &W,
    stats: &mut DumpStats,
) -> Result<u64> {
    let len = slice.len() as u64;
    let mut cs = Checksum::new();
    let mut pos = 0u64;
    // Start of the pending run of non-zero pages to write, relative to the region.
    let mut pending: Option<u64> = None;
    let flush = |pending: &mut Option<u64>, end: u64, stats: &mut DumpStats| -> Result<()> {
        if let Some(start) = pending.take() {
            let part = slice
                .subslice(start as usize, (end - start) as usize)
                .map_err(|e| io_err("write", data_offset + start, volatile_io(e)))?;
            write_all_at(out, &part, data_offset + start)?;
            stats.bytes_written += end - start;
        }
        Ok(())
    };
    for (first, count) in runs {
        let start = (first * page_size).min(len);
        let end = ((first + count) * page_size).min(len);
        cs.zeros(start - pos);
        let mut off = start;
        while off < end {
            let plen = page_size.min(end - off);
            let page = slice
                .subslice(off as usize, plen as usize)
                .map_err(|e| io_err("write", data_offset + off, volatile_io(e)))?;
            stats.pages_held += 1;
            if is_zero(&page) {
                flush(&mut pending, off, stats)?;
                cs.zeros(plen);
                stats.zero_pages += 1;
            } else {
                cs.update_volatile(&page);
                stats.pages_written += 1;
                let run_start = *pending.get_or_insert(off);
                if off + plen - run_start >= WRITE_CHUNK {
                    flush(&mut pending, off + plen, stats)?;
                }
            }
            off += plen;
        }
        flush(&mut pending, end, stats)?;
        pos = end;
    }
    cs.zeros(len - pos);
    Ok(cs.finish())
}

/// The layout of a dump of `mem`.
fn plan_for<B: Bitmap>(mem: &GuestMemoryMmap<B>, kind: SnapshotKind) -> Result<SnapshotInfo> {
    let regions: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len(), r.page_size() as u64)).collect();
    SnapshotInfo::plan(kind, snapshot_page_size(), &regions)
        .ok_or(SnapshotError::InvalidLayout { reason: "the memory's layout does not fit in a file" })
}

/// Writes a snapshot of `mem` laid out as `info` (whose page bitmaps say what a diff holds):
/// length first, then the data, then the header area.
fn write_snapshot<B: Bitmap, W: SnapshotWriter + ?Sized>(
    mem: &GuestMemoryMmap<B>,
    mut info: SnapshotInfo,
    out: &W,
) -> Result<DumpStats> {
    if let Some(id) = out.file_identity() {
        if mem.iter().any(|r| r.mapping().file_id() == Some(id)) {
            return Err(SnapshotError::OutputIsInput { input: "the file backing the guest memory" });
        }
    }
    if let Some(r) = mem.iter().find(|r| r.backing_lost()) {
        return Err(SnapshotError::BackingLost { guest_addr: r.start_addr() });
    }
    let mut stats = DumpStats { file_len: info.file_len, ..DumpStats::default() };
    // Truncate first: pages we skip must read as zeros, not as an older file's bytes.
    out.set_len(0).map_err(|e| io_err("truncate", 0, e))?;
    out.set_len(info.file_len).map_err(|e| io_err("set length", info.file_len, e))?;
    for (region, meta) in mem.iter().zip(info.regions.iter_mut()) {
        meta.checksum = write_region(
            &region.as_volatile_slice(),
            meta.held_runs(info.page_size),
            info.page_size,
            meta.data_offset,
            out,
            &mut stats,
        )?;
    }
    let mut header = info.encode();
    write_all_at(out, &VolatileSlice::from(&mut header[..]), 0)?;
    Ok(stats)
}

/// Writes a full snapshot of `mem` to `out`: every region, zero pages as holes.
///
/// The data goes straight from guest memory to the file (`pwrite(2)`); zero pages are found
/// with word loads and skipped, so the file's allocated size is about that of the non-zero
/// pages. The file is truncated first; the header is written last. Call
/// [`File::sync_all`] afterwards if the snapshot must survive a power loss.
///
/// ```
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
/// mem.write_slice(&[7; 4096], GuestAddress(0x10000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// let stats = snapshot::dump(&mem, &file).unwrap();
/// assert_eq!((stats.pages_written, stats.zero_pages), (1, 1023));
/// assert_eq!(snapshot::verify(&file).unwrap().regions[0].len, 4 << 20);
/// ```
pub fn dump<B: Bitmap, W: SnapshotWriter + ?Sized>(mem: &GuestMemoryMmap<B>, out: &W) -> Result<DumpStats> {
    let info = plan_for(mem, SnapshotKind::Full)?;
    write_snapshot(mem, info, out)
}

/// Writes a diff snapshot of the pages in `ranges` (guest address, length; rounded out to
/// whole pages), in the layout of a full snapshot of `mem`, everything else a hole. Ranges
/// outside guest memory are refused before anything is written.
///
/// ```
/// use guestmem::{snapshot, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// // Two pages, both zero: held (in the bitmap) but holes in the file.
/// let stats = snapshot::dump_ranges(&mem, &[(GuestAddress(0x1800), 0x1000)], &file).unwrap();
/// assert_eq!((stats.pages_held, stats.zero_pages), (2, 2));
/// assert!(snapshot::dump_ranges(&mem, &[(GuestAddress(1 << 20), 1)], &file).is_err());
/// ```
pub fn dump_ranges<B: Bitmap, W: SnapshotWriter + ?Sized>(
    mem: &GuestMemoryMmap<B>,
    ranges: &[(GuestAddress, u64)],
    out: &W,
) -> Result<DumpStats> {
    let mut info = plan_for(mem, SnapshotKind::Diff)?;
    let page = info.page_size;
    for &(addr, len) in ranges {
        if len == 0 {
            continue;
        }
        let n = usize::try_from(len).map_err(|_| GuestMemoryError::Overflow { addr, len: usize::MAX })?;
        mem.check_access(addr, n, false)?;
        // Mark the pages of each region the range crosses.
        let mut at = addr.0;
        let end = addr.0 + (len - 1); // checked above: inside guest memory, no wrap
        for (region, meta) in mem.iter().zip(info.regions.iter_mut()) {
            let (rs, rl) = (region.start_addr().0, region.len());
            let re = rs + (rl - 1);
            if at < rs || at > re {
                continue;
            }
            let last = end.min(re);
            let (first_page, last_page) = ((at - rs) / page, (last - rs) / page);
            if let Some(words) = meta.pages.as_mut() {
                for p in first_page..=last_page {
                    words[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            if last == end {
                break;
            }
            at = re + 1;
        }
    }
    write_snapshot(mem, info, out)
}

/// Writes a diff snapshot of the pages harvested as dirty from `mem` (taken and cleared, as
/// [`take_dirty_ranges`](GuestMemoryMmap::take_dirty_ranges) does). If anything fails after
/// the harvest, the ranges are put back into the bitmaps, so the next diff still holds them.
///
/// ```
/// use guestmem::bitmap::AtomicBitmap;
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// assert_eq!(snapshot::dump_dirty(&mem, &file).unwrap().pages_written, 1);
/// assert_eq!(mem.dirty_page_count().unwrap(), 0);
/// ```
pub fn dump_dirty<B: Bitmap + DirtyHarvest, W: SnapshotWriter + ?Sized>(
    mem: &GuestMemoryMmap<B>,
    out: &W,
) -> Result<DumpStats> {
    // Refuse untracked regions before taking anything from the others.
    for region in mem.iter() {
        region.bitmap().page_size()?;
    }
    let mut ranges = Vec::new();
    let taken = mem.take_dirty_ranges(|addr, len| ranges.push((addr, len)));
    let result = match taken {
        Ok(_) => dump_ranges(mem, &ranges, out),
        Err(e) => Err(e.into()),
    };
    if result.is_err() {
        // The ranges came from `mem`, so putting them back cannot fail on their account.
        let _ = mem.restore_dirty_ranges(&ranges);
    }
    result
}

/// Reads and validates the header area of a snapshot (length, magic, version, header
/// checksum, layout), without reading region data.
///
/// ```
/// use guestmem::{snapshot, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap();
/// let info = snapshot::read_info(&file).unwrap();
/// assert_eq!((info.kind, info.regions[0].guest_addr), (snapshot::SnapshotKind::Full, GuestAddress(0x1000)));
/// ```
pub fn read_info(file: &File) -> Result<SnapshotInfo> {
    SnapshotInfo::read(file)
}

/// Calls `f(offset, len, is_data)` for consecutive extents covering `[start, end)` of `file`:
/// data and holes as `SEEK_DATA`/`SEEK_HOLE` report them, or one data extent when the
/// filesystem (or `use_seek == false`) cannot tell.
fn for_each_extent(
    file: &File,
    start: u64,
    end: u64,
    use_seek: bool,
    mut f: impl FnMut(u64, u64, bool) -> Result<()>,
) -> Result<()> {
    let unsupported = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP));
    let fd = file.as_fd();
    let mut pos = start;
    while pos < end {
        let data = if use_seek {
            match lseek_data(fd, pos, SeekData::Data) {
                Ok(Some(d)) => d.clamp(pos, end),
                Ok(None) => end,
                Err(e) if unsupported(&e) => pos,
                Err(e) => return Err(io_err("lseek(SEEK_DATA)", pos, e)),
            }
        } else {
            pos
        };
        if data > pos {
            f(pos, data - pos, false)?;
        }
        if data >= end {
            break;
        }
        let hole = if use_seek {
            match lseek_data(fd, data, SeekData::Hole) {
                Ok(Some(h)) => h.clamp(data + 1, end),
                Ok(None) => end,
                Err(e) if unsupported(&e) => end,
                Err(e) => return Err(io_err("lseek(SEEK_HOLE)", data, e)),
            }
        } else {
            end
        };
        f(data, hole - data, true)?;
        pos = hole;
    }
    Ok(())
}

/// Bytes of the buffer the verification pass reads the file through.
const VERIFY_CHUNK: usize = 1 << 20;

/// The checksum of `[offset, offset + len)` of `file`, holes folded as zeros.
fn checksum_area(file: &File, offset: u64, len: u64, use_seek: bool, buf: &mut [u8]) -> Result<u64> {
    let mut cs = Checksum::new();
    for_each_extent(file, offset, offset + len, use_seek, |at, n, data| {
        if !data {
            cs.zeros(n);
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            let k = (n - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..k], at + done).map_err(|e| io_err("read", at + done, e))?;
            cs.update(&buf[..k]);
            done += k as u64;
        }
        Ok(())
    })?;
    Ok(cs.finish())
}

fn verify_with(file: &File, use_seek: bool) -> Result<SnapshotInfo> {
    let info = SnapshotInfo::read(file)?;
    verify_data(file, &info, use_seek)?;
    Ok(info)
}

/// Checks every region's data of a snapshot whose header `info` describes.
fn verify_data(file: &File, info: &SnapshotInfo, use_seek: bool) -> Result<()> {
    let mut buf = vec![0u8; VERIFY_CHUNK];
    for (index, r) in info.regions.iter().enumerate() {
        let computed = checksum_area(file, r.data_offset, r.len, use_seek, &mut buf)?;
        if computed != r.checksum {
            return Err(SnapshotError::DataChecksum {
                index,
                guest_addr: r.guest_addr,
                stored: r.checksum,
                computed,
            });
        }
    }
    Ok(())
}

/// Checks the header area and every region's data against its checksum; returns what the
/// header says. Reads all data extents of the file once (holes are folded in O(1)).
///
/// ```
/// use std::os::unix::fs::FileExt;
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_obj(5u32, GuestAddress(0x2000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap();
/// assert!(snapshot::verify(&file).is_ok());
/// let at = snapshot::read_info(&file).unwrap().regions[0].data_offset + 0x2000;
/// file.write_all_at(&[6], at).unwrap();
/// assert!(matches!(snapshot::verify(&file), Err(snapshot::SnapshotError::DataChecksum { .. })));
/// ```
pub fn verify(file: &File) -> Result<SnapshotInfo> {
    verify_with(file, true)
}

/// Checks that the snapshot's regions are exactly `target`'s `(guest address, length)`.
fn match_regions(info: &SnapshotInfo, target: &[(GuestAddress, u64)]) -> Result<()> {
    if info.regions.len() != target.len() {
        return Err(SnapshotError::RegionCount { snapshot: info.regions.len(), target: target.len() });
    }
    for (index, (r, &(addr, len))) in info.regions.iter().zip(target).enumerate() {
        if r.guest_addr != addr || r.len != len {
            return Err(SnapshotError::RegionMismatch {
                index,
                snapshot_addr: r.guest_addr,
                snapshot_len: r.len,
                target_addr: addr,
                target_len: len,
            });
        }
    }
    Ok(())
}

/// Copies a snapshot (full or diff) into `mem`, whose regions must be exactly the snapshot's
/// (same guest addresses and lengths) and writable.
///
/// **The file is read twice.** The first pass validates everything (header, table, regions
/// against `mem`, writability, and every region's data checksum) so that a bad file is refused
/// before guest memory changes at all. The second pass copies: data extents
/// (`SEEK_DATA`/`SEEK_HOLE`) are read with `pread(2)` straight into guest memory; pages the
/// snapshot holds as holes are set to zero where memory is not already zero; pages a diff
/// does not hold are left alone. Every write goes through the [`GuestMemory`] slices, so the
/// destination's dirty bitmap marks it. The file must not change between the passes.
///
/// ```
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// src.write_obj(0xabcd_u16, GuestAddress(0x4000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&src, &file).unwrap();
/// let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// dst.write_obj(1u8, GuestAddress(0x8000)).unwrap(); // a hole in the snapshot: zeroed
/// snapshot::restore_into(&dst, &file).unwrap();
/// assert_eq!(dst.read_obj::<u16>(GuestAddress(0x4000)).unwrap(), 0xabcd);
/// assert_eq!(dst.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
/// ```
pub fn restore_into<M: GuestMemory>(mem: &M, file: &File) -> Result<RestoreStats> {
    restore_into_with(mem, file, true)
}

fn restore_into_with<M: GuestMemory>(mem: &M, file: &File, use_seek: bool) -> Result<RestoreStats> {
    // The layout first, matched against the destination; only then are the diff bitmaps
    // (sized by the file) allocated.
    let mut info = SnapshotInfo::read_layout(file)?;
    let target: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    match_regions(&info, &target)?;
    for r in &info.regions {
        let len = usize::try_from(r.len)
            .map_err(|_| GuestMemoryError::Overflow { addr: r.guest_addr, len: usize::MAX })?;
        mem.check_access(r.guest_addr, len, true)?;
    }
    info.load_bitmaps(file)?;
    verify_data(file, &info, use_seek)?;

    let mut stats = RestoreStats::default();
    let page = info.page_size;
    for r in &info.regions {
        for (first, count) in r.held_runs(page) {
            let start = (first * page).min(r.len);
            let end = ((first + count) * page).min(r.len);
            for_each_extent(file, r.data_offset + start, r.data_offset + end, use_seek, |at, n, data| {
                let addr = GuestAddress(r.guest_addr.0 + (at - r.data_offset));
                let n_usize = n as usize; // n <= r.len, which fits in usize (checked above)
                let mut done = 0u64;
                for s in mem.get_slices(addr, n_usize) {
                    let s = s?;
                    if data {
                        file.read_exact_volatile_at(&s, at + done)
                            .map_err(|e| io_err("read", at + done, volatile_io(e)))?;
                        stats.bytes_read += s.len() as u64;
                    } else {
                        let at = GuestAddress(addr.0 + done);
                        stats.bytes_zeroed += zero_nonzero_pages(&s, at, page as usize)?;
                    }
                    done += s.len() as u64;
                }
                Ok(())
            })?;
        }
    }
    Ok(stats)
}

/// Sets to zero every page of `s` that is not all zeros already (so untouched memory stays
/// unpopulated); returns the bytes written.
fn zero_nonzero_pages<S: BitmapSlice>(
    s: &VolatileSlice<'_, S>,
    addr: GuestAddress,
    page: usize,
) -> Result<u64> {
    let mut zeroed = 0;
    let mut off = 0;
    while off < s.len() {
        let n = page.min(s.len() - off);
        let p = s
            .subslice(off, n)
            .map_err(|e| GuestMemoryError::from_volatile(GuestAddress(addr.0 + off as u64), e))?;
        if !is_zero(&p) {
            p.fill(0).map_err(|e| GuestMemoryError::from_volatile(GuestAddress(addr.0 + off as u64), e))?;
            zeroed += n as u64;
        }
        off += n;
    }
    Ok(zeroed)
}

/// New guest memory that maps a full snapshot `MAP_PRIVATE`, one region per table entry
/// ([`Backing::File`] with `shared: false`): nothing is copied, pages are read from the file
/// on first touch, and guest writes go to private copies, never to the file. The memory keeps
/// the file open; do not truncate or rewrite the file while it is mapped (a shorter file makes
/// access past its new end fault, as for any file mapping; rewritten pages show through where
/// the guest has not written).
///
/// To stay independent of the memory size this checks only the header area (magic, version,
/// header checksum, layout) and the file length, so the mapping can never run past the end of
/// the file; it does not read the data. Call [`verify`] first when the file may be corrupt.
/// Diff snapshots are refused ([`SnapshotError::KindMismatch`]): apply them with [`rebase`]
/// first. The regions use base pages whatever memory the snapshot came from.
///
/// ```
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// src.write_obj(9u64, GuestAddress(0x100)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&src, &file).unwrap();
/// let mem = snapshot::restore_mapped::<()>(&file).unwrap();
/// assert_eq!(mem.read_obj::<u64>(GuestAddress(0x100)).unwrap(), 9);
/// mem.write_obj(10u64, GuestAddress(0x100)).unwrap(); // private: the file keeps 9
/// assert_eq!(snapshot::restore_mapped::<()>(&file).unwrap().read_obj::<u64>(GuestAddress(0x100)).unwrap(), 9);
/// ```
pub fn restore_mapped<B: NewBitmap>(file: &File) -> Result<GuestMemoryMmap<B>> {
    restore_mapped_with(file, |_, builder| builder)
}

/// [`restore_mapped`], with each region's builder passed through `configure` first, for the
/// policies a VMM wants on guest memory (guard pages, alignment, `dont_dump`, `dont_fork`,
/// NUMA placement, prefault, mlock). The backing is set after `configure` and cannot be
/// changed; an option the builder refuses for a private file mapping fails the restore
/// ([`SnapshotError::Memory`]) and nothing stays mapped.
///
/// ```
/// use guestmem::{snapshot, GuestAddress, GuestMemoryMmap};
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&src, &file).unwrap();
/// let mem = snapshot::restore_mapped_with::<(), _>(&file, |_region, b| b.guard_pages(1).dont_dump(true)).unwrap();
/// assert_eq!(mem.regions()[0].size(), 0x10000);
/// ```
pub fn restore_mapped_with<B, F>(file: &File, mut configure: F) -> Result<GuestMemoryMmap<B>>
where
    B: NewBitmap,
    F: FnMut(&SnapshotRegion, MmapRegionBuilder<B>) -> MmapRegionBuilder<B>,
{
    let info = SnapshotInfo::read(file)?;
    if info.kind != SnapshotKind::Full {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: info.kind });
    }
    let shared = Arc::new(file.try_clone().map_err(|e| io_err("dup", 0, e))?);
    let regions = info
        .regions
        .iter()
        .map(|r| {
            let size = usize::try_from(r.len)
                .map_err(|_| GuestMemoryError::Overflow { addr: r.guest_addr, len: usize::MAX })?;
            let backing =
                Backing::File { file: FileOffset::from_arc(shared.clone(), r.data_offset), shared: false };
            let builder = configure(r, MmapRegionBuilder::<B>::new(size)).backing(backing);
            Ok(GuestRegionMmap::build(builder, r.guest_addr)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Applies the diff snapshot `diff` onto the full snapshot `base` and writes the result to
/// `out`: a full snapshot equal, byte for byte and checksum for checksum, to the one a dump of
/// the memory at the diff's time would have written. Both inputs are verified first
/// (checksums included) and must describe the same regions; `out` must be another file.
///
/// ```
/// use guestmem::bitmap::AtomicBitmap;
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let tmp = || vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// let (base, diff, rebased, now) = (tmp(), tmp(), tmp(), tmp());
/// mem.write_obj(1u8, GuestAddress(0)).unwrap();
/// snapshot::dump(&mem, &base).unwrap();
/// mem.take_dirty_ranges(|_, _| {}).unwrap();
/// mem.write_obj(2u8, GuestAddress(0x5000)).unwrap();
/// snapshot::dump_dirty(&mem, &diff).unwrap();
/// snapshot::rebase(&base, &diff, &rebased).unwrap();
/// snapshot::dump(&mem, &now).unwrap();
/// assert_eq!(snapshot::read_info(&rebased).unwrap(), snapshot::read_info(&now).unwrap());
/// ```
pub fn rebase<W: SnapshotWriter + ?Sized>(base: &File, diff: &File, out: &W) -> Result<DumpStats> {
    same_file_refused(out, &[base, diff])?;
    let base_info = verify(base)?;
    if base_info.kind != SnapshotKind::Full {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Full, found: base_info.kind });
    }
    let diff_info = verify(diff)?;
    if diff_info.kind != SnapshotKind::Diff {
        return Err(SnapshotError::KindMismatch { expected: SnapshotKind::Diff, found: diff_info.kind });
    }
    let target: Vec<_> = base_info.regions.iter().map(|r| (r.guest_addr, r.len)).collect();
    match_regions(&diff_info, &target)?;
    if diff_info.page_size != base_info.page_size {
        return Err(SnapshotError::InvalidLayout { reason: "the snapshots have different page sizes" });
    }
    let page = base_info.page_size;
    let layout: Vec<_> = base_info.regions.iter().map(|r| (r.guest_addr, r.len, r.page_size)).collect();
    let mut info = SnapshotInfo::plan(SnapshotKind::Full, page, &layout)
        .ok_or(SnapshotError::InvalidLayout { reason: "the layout does not fit in a file" })?;

    let mut stats = DumpStats { file_len: info.file_len, ..DumpStats::default() };
    out.set_len(0).map_err(|e| io_err("truncate", 0, e))?;
    out.set_len(info.file_len).map_err(|e| io_err("set length", info.file_len, e))?;
    let chunk_pages = (VERIFY_CHUNK as u64 / page).max(1);
    let mut buf = vec![0u8; (chunk_pages * page) as usize];
    for ((b, d), o) in base_info.regions.iter().zip(&diff_info.regions).zip(info.regions.iter_mut()) {
        let mut cs = Checksum::new();
        let mut off = 0u64;
        while off < b.len {
            let n = (chunk_pages * page).min(b.len - off);
            let buf = &mut buf[..n as usize];
            b_read(base, buf, b.data_offset + off)?;
            // Overlay the pages the diff holds, run by run.
            let mut p = off / page;
            while p * page < off + n {
                if d.holds_page(p) {
                    let s = p * page - off;
                    let k = page.min(n - s);
                    b_read(diff, &mut buf[s as usize..(s + k) as usize], d.data_offset + p * page)?;
                }
                p += 1;
            }
            let view = VolatileSlice::from(&mut buf[..]);
            let runs = [(0, n.div_ceil(page))];
            let mut part = DumpStats::default();
            // Written as a region of its own (zero pages as holes); its finished checksum is
            // of no use, the region's running checksum takes the chunk below.
            let _ = write_region(&view, runs, page, o.data_offset + off, out, &mut part)?;
            stats.bytes_written += part.bytes_written;
            stats.pages_held += part.pages_held;
            stats.pages_written += part.pages_written;
            stats.zero_pages += part.zero_pages;
            cs.update(buf);
            off += n;
        }
        o.checksum = cs.finish();
    }
    let mut header = info.encode();
    write_all_at(out, &VolatileSlice::from(&mut header[..]), 0)?;
    Ok(stats)
}

/// Reads exactly `buf.len()` bytes at `offset` (holes read as zeros).
fn b_read(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| io_err("read", offset, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::Bytes;

    fn tmp() -> File {
        vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
    }

    #[test]
    fn extents_without_seek_data_cover_everything_as_data() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        mem.write_obj(7u32, GuestAddress(0x20000)).unwrap();
        let f = tmp();
        dump(&mem, &f).unwrap();
        let info = read_info(&f).unwrap();
        let r = &info.regions[0];
        let mut seen = Vec::new();
        for_each_extent(&f, r.data_offset, r.data_offset + r.len, false, |at, n, data| {
            seen.push((at, n, data));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(r.data_offset, r.len, true)]);
        let mut seen = Vec::new();
        for_each_extent(&f, r.data_offset, r.data_offset + r.len, true, |at, n, data| {
            seen.push((at, n, data));
            Ok(())
        })
        .unwrap();
        // Contiguous and complete whatever the filesystem reports.
        assert_eq!(seen.first().unwrap().0, r.data_offset);
        assert_eq!(seen.iter().map(|e| e.1).sum::<u64>(), r.len);
        verify_with(&f, false).unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        dst.write_obj(1u8, GuestAddress(0x100)).unwrap();
        let stats = restore_into_with(&dst, &f, false).unwrap();
        assert_eq!(stats.bytes_read, 0x40000);
        assert_eq!(dst.read_obj::<u32>(GuestAddress(0x20000)).unwrap(), 7);
        assert_eq!(dst.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 0);
    }

    #[test]
    fn zero_detection_at_any_alignment() {
        let mut buf = vec![0u8; 4096 + 16];
        for (off, len) in [(0, 4096), (1, 4095), (8, 64), (3, 5), (0, 0)] {
            let s = VolatileSlice::from(&mut buf[off..off + len]);
            assert!(is_zero(&s));
        }
        for i in [0, 7, 63, 64, 4095] {
            buf[i] = 1;
            assert!(!is_zero(&VolatileSlice::from(&mut buf[..4096])), "{i}");
            assert!(!is_zero(&VolatileSlice::from(&mut buf[..i + 1])), "{i}");
            buf[i] = 0;
        }
    }
}
