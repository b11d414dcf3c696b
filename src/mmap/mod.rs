//! Mapped memory: [`MmapRegion`], built by [`MmapRegionBuilder`].
//!
//! An `MmapRegion<B>` is one contiguous mapping (anonymous, a file at an offset, a new memfd,
//! or a file on hugetlbfs) with a dirty bitmap `B` sized for it. The builder checks everything
//! the kernel would otherwise turn into a crash later (a file shorter than the mapping, sizes
//! that are not multiples of the page size, `MAP_FIXED` outside our own reservation), applies
//! the policies a VMM wants (guard pages, alignment, huge pages, prefault, mlock, core-dump and
//! fork exclusion, KSM, NUMA), and reports every option the kernel refuses as an error naming
//! that option, never as a silent fallback.
//!
//! ```
//! use guestmem::mmap::{Backing, HugePageSize, MemfdOptions, MmapRegionBuilder};
//! use guestmem::{Bytes, VolatileMemory};
//!
//! let region = MmapRegionBuilder::<()>::new(4 << 20)
//!     .backing(Backing::Memfd(MemfdOptions::new("guest-ram").sealed(true)))
//!     .guard_pages(1)
//!     .align(2 << 20)
//!     .dont_dump(true)
//!     .build()
//!     .unwrap();
//! assert_eq!(region.as_ptr() as usize % (2 << 20), 0);
//! region.as_volatile_slice().write_obj(42u64, 0x1000).unwrap();
//! assert!(region.file_offset().is_some()); // the memfd, for vhost-user
//! ```

mod options;
mod reservation;

pub use options::{Backing, FileOffset, HugePageSize, Lock, MemfdOptions, NumaPolicy, Populate};
pub use reservation::Reservation;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use crate::bitmap::{Bitmap, BitmapError, NewBitmap};
use crate::sys::{
    self, Advice, FallocateMode, MapFlags, MbindFlags, MemfdFlags, Mlock2Flags, Protection, Seals,
};
use crate::volatile::{self, VolatileMemory, VolatileSlice};

/// Errors of building or managing an [`MmapRegion`].
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    /// A region or reservation of size 0.
    #[error("a mapping of size 0 was asked for")]
    ZeroSize,
    /// A protection guest memory cannot have (it must at least be readable).
    #[error("protection {0:?} is not usable for guest memory: it must include READ")]
    InvalidProtection(Protection),
    /// An alignment that is not a power of two.
    #[error("alignment {0:#x} is not a power of two")]
    InvalidAlignment(usize),
    /// A size, offset or address that is not a multiple of the backing's page size.
    #[error("{what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// Which number: "size", "file offset", "address", "discard offset", ...
        what: &'static str,
        /// The number.
        value: u64,
        /// The page size it must be a multiple of.
        page_size: u64,
    },
    /// `offset + size` does not fit in 64 bits (or the address space).
    #[error("offset {offset:#x} + size {size:#x} overflows")]
    Overflow {
        /// The offset.
        offset: u64,
        /// The size.
        size: usize,
    },
    /// A regular file (or memfd) that ends before `offset + size`: mapping it would raise
    /// SIGBUS on the first touch past its end.
    #[error("file of {file_size:#x} bytes is shorter than offset {offset:#x} + size {size:#x}")]
    FileTooShort {
        /// The file's size.
        file_size: u64,
        /// The offset of the mapping in the file.
        offset: u64,
        /// The size of the mapping.
        size: usize,
    },
    /// A file whose size cannot be known (a character device that publishes none, a pipe, a
    /// socket, a directory): a mapping of it could run past its end, so it is refused.
    #[error("a {kind:?} has no size a mapping can be checked against")]
    UnsizedFile {
        /// What the file is.
        kind: sys::fd::FileKind,
    },
    /// Options that cannot go together, or an option the backing cannot honour.
    #[error("option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A placement that does not fit in the reservation.
    #[error("placement of {size:#x} bytes at offset {offset:#x} is outside the reservation of {reservation_len:#x} bytes")]
    OutsideReservation {
        /// Offset in the reservation.
        offset: usize,
        /// Bytes to place (guard pages included).
        size: usize,
        /// Length of the reservation.
        reservation_len: usize,
    },
    /// A placement over part of the reservation another region uses.
    #[error("placement of {size:#x} bytes at offset {offset:#x} overlaps the region at {used_offset:#x} ({used_size:#x} bytes)")]
    ReservationOverlap {
        /// Offset asked for.
        offset: usize,
        /// Bytes asked for.
        size: usize,
        /// Offset of the region in the way.
        used_offset: usize,
        /// Bytes of the region in the way.
        used_size: usize,
    },
    /// `mmap(2)` failed.
    #[error("mmap of {size:#x} bytes failed: {source}")]
    Mmap {
        /// Bytes asked for.
        size: usize,
        /// The error.
        source: io::Error,
    },
    /// A system call the backing needs (`fstat`, `memfd_create`, `ftruncate`, seals, `mincore`)
    /// failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The kernel refused an option.
    #[error("option {option} was refused by the kernel: {source}")]
    OptionRefused {
        /// The option.
        option: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A range that is not inside the region.
    #[error("range of {len:#x} bytes at offset {offset:#x} is outside the region of {size:#x} bytes")]
    OutOfRange {
        /// Offset of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A discard of read-only memory.
    #[error("cannot discard {len:#x} bytes at offset {offset:#x} of read-only memory")]
    ReadOnly {
        /// Offset of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
    },
    /// The region's dirty bitmap could not be allocated.
    #[error("dirty bitmap: {0}")]
    Bitmap(#[source] BitmapError),
    /// The kernel refused to discard.
    #[error("discard of {len:#x} bytes at offset {offset:#x} failed: {source}")]
    Discard {
        /// Offset of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// The error.
        source: io::Error,
    },
}

/// How [`MmapRegion::flush`] made writes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushMethod {
    /// `msync(MS_SYNC)` of the range.
    Msync,
    /// A write-back of every CPU cache line of the range with this instruction, then `SFENCE`
    /// (a `MAP_SYNC` mapping of persistent memory).
    CacheLines(sys::cpu::CacheWriteback),
}

/// What backs the memory, as discard needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AnonPrivate,
    AnonShared,
    /// A shared mapping of a file or memfd: freeing means punching a hole in the file.
    FileShared,
    /// A private (copy-on-write) mapping of a file: freeing means mapping anonymous memory
    /// over the range, or the file's bytes come back.
    FilePrivate,
    /// Adopted with `build_raw`: we do not know.
    Unknown,
}

/// How the mapping goes away.
#[derive(Debug)]
enum Ownership {
    /// `munmap(start, len)` on drop (guard pages included).
    Owned { start: *mut u8, len: usize },
    /// Give `[offset, ...)` back to the reservation on drop.
    InReservation { reservation: Arc<Reservation>, offset: usize },
    /// Adopted with `build_raw`: not ours to unmap.
    Borrowed,
    /// A view of part of a larger mapping someone else owns (a plug-state device): told when
    /// the view goes, never unmapped by it.
    View(Arc<dyn ViewOwner>),
}

/// The owner of a mapping that regions are views of: told when a view is dropped, so it can
/// fence or free the memory no view covers any more.
pub(crate) trait ViewOwner: Send + Sync + std::fmt::Debug {
    /// The view of `[addr, addr + len)` is gone: nothing accesses the range through it.
    fn released(&self, addr: *mut u8, len: usize);
}

/// One contiguous mapping of guest memory, with a dirty bitmap `B` sized for it.
///
/// Unmapped when dropped (unless adopted with [`MmapRegionBuilder::build_raw`]). Implements
/// [`VolatileMemory`]: slices of it carry its protection (writes to a read-only region are
/// refused) and its bitmap (writes are marked).
#[derive(Debug)]
pub struct MmapRegion<B = ()> {
    addr: *mut u8,
    size: usize,
    bitmap: B,
    file_offset: Option<FileOffset>,
    prot: Protection,
    flags: MapFlags,
    page_size: usize,
    hugetlbfs: bool,
    kind: Kind,
    ownership: Ownership,
    /// The policies of the builder, applied again to a range that `discard` maps anew.
    policies: Policies,
    /// The (device, inode) of the file behind the mapping, from `fstat` at build time.
    file_id: Option<(u64, u64)>,
    /// The region's entry in the SIGBUS recovery table (file-backed and hugetlb memory).
    sigbus: Option<crate::host::sigbus::Registration>,
    /// Mapped with `MAP_SYNC` (a DAX file): writing cache lines back makes writes durable.
    sync_faults: bool,
    /// Discard shared file memory with `MADV_REMOVE` rather than a hole punched in the file, so
    /// that a userfaultfd registered on it sees the discard (`EVENT_REMOVE`).
    discard_remove: bool,
}

/// The per-range policies a region was built with.
#[derive(Clone, Debug, Default)]
struct Policies {
    numa: Option<NumaPolicy>,
    thp: bool,
    dont_dump: bool,
    dont_fork: bool,
    mergeable: bool,
    lock: Lock,
}

// SAFETY: the region owns its mapping (or, for build_raw, the caller promised it is valid for
// the region's life); all access to it is volatile or raw copies, so it can move between and be
// shared by threads as far as its bitmap can.
unsafe impl<B: Send> Send for MmapRegion<B> {}
// SAFETY: as above.
unsafe impl<B: Sync> Sync for MmapRegion<B> {}

impl<B> MmapRegion<B> {
    /// The host address of the first byte. Writes through it are not tracked: mark them with
    /// [`Bitmap::mark_dirty`] on [`bitmap`](Self::bitmap).
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// The size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The file and offset behind the mapping (the memfd for a memfd backing).
    pub fn file_offset(&self) -> Option<&FileOffset> {
        self.file_offset.as_ref()
    }

    /// The protection.
    pub fn protection(&self) -> Protection {
        self.prot
    }

    /// The `mmap` flags used.
    pub fn flags(&self) -> MapFlags {
        self.flags
    }

    /// Whether the region unmaps its memory when dropped (false for `build_raw`, and for the
    /// views a plug-state device makes of its memory).
    pub fn owned(&self) -> bool {
        !matches!(self.ownership, Ownership::Borrowed | Ownership::View(_))
    }

    /// The backing's real page size: the huge page size for hugetlb memory, otherwise the base
    /// page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Whether the memory is hugetlb memory (a hugetlbfs file, `MFD_HUGETLB` or `MAP_HUGETLB`),
    /// as detected from the kernel.
    pub fn is_hugetlbfs(&self) -> bool {
        self.hugetlbfs
    }

    /// The dirty bitmap.
    pub fn bitmap(&self) -> &B {
        &self.bitmap
    }

    /// Whether both regions map overlapping parts of the same file (compared by device and
    /// inode as `fstat` gave them when the regions were built, not by fd number).
    ///
    /// ```
    /// use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
    /// let a = MmapRegionBuilder::<()>::new(2 << 20).backing(Backing::Memfd(MemfdOptions::new("a"))).build().unwrap();
    /// let file = a.file_offset().unwrap().with_start(1 << 20);
    /// let b = MmapRegionBuilder::<()>::new(1 << 20).backing(Backing::File { file, shared: true }).build().unwrap();
    /// assert!(a.fds_overlap(&b));
    /// ```
    pub fn fds_overlap<T>(&self, other: &MmapRegion<T>) -> bool {
        let (Some(a), Some(b)) = (&self.file_offset, &other.file_offset) else { return false };
        if self.file_id.is_none() || self.file_id != other.file_id {
            return false;
        }
        let (a0, b0) = (a.start() as u128, b.start() as u128);
        a0 < b0 + other.size as u128 && b0 < a0 + self.size as u128
    }

    /// The (device, inode) of the file behind the region, if any.
    pub(crate) fn file_id(&self) -> Option<(u64, u64)> {
        self.file_id
    }

    /// Whether part of the region lost its backing: its file was truncated under the mapping
    /// (by another holder of an unsealed file) or its hugetlb pool could not supply a page, and
    /// the SIGBUS that followed was recovered by mapping zero pages there
    /// ([`host::sigbus`](crate::host::sigbus)). Such memory no longer holds what was written to
    /// it, and no longer writes through to its file: dumps of it fail.
    pub fn backing_lost(&self) -> bool {
        self.sigbus.as_ref().is_some_and(|r| r.lost())
    }

    /// Checks that `[offset, offset + len)` is a non-empty range inside the region, aligned to
    /// `align`.
    fn check_subrange(&self, offset: usize, len: usize, align: usize) -> Result<(), MmapError> {
        volatile::check_range(offset, len, self.size).map_err(|_| MmapError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        if len == 0 {
            return Err(MmapError::ZeroSize);
        }
        for (what, value) in [("offset", offset), ("length", len)] {
            if !value.is_multiple_of(align) {
                return Err(MmapError::Unaligned { what, value: value as u64, page_size: align as u64 });
            }
        }
        Ok(())
    }

    /// Makes the writes to `[offset, offset + len)` durable in the region's file (persistent
    /// memory, or any file), returning how it did:
    ///
    /// - a region mapped with [`dax_sync`](MmapRegionBuilder::dax_sync) (`MAP_SYNC` on DAX):
    ///   each CPU cache line of the range is written back (`CLWB`, else `CLFLUSHOPT`, else
    ///   `CLFLUSH`, whichever the CPU has) and fenced: nothing else is needed there;
    /// - any other shared file mapping (DAX without `MAP_SYNC`, a regular file, a memfd):
    ///   `msync(MS_SYNC)` of the range, which writes the pages back (and, on DAX, the metadata).
    ///
    /// `offset` and `len` must be multiples of [`flush_granule`](Self::flush_granule) (the page
    /// size for `msync`, the cache line for a write-back), inside the region
    /// ([`MmapError::Unaligned`], [`MmapError::OutOfRange`]); anonymous and private mappings reach
    /// no file ([`MmapError::InvalidOption`]).
    ///
    /// ```
    /// use guestmem::mmap::{Backing, FileOffset, FlushMethod, MmapRegionBuilder};
    /// use guestmem::{Bytes, VolatileMemory};
    /// let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    /// f.set_len(1 << 20).unwrap();
    /// let r = MmapRegionBuilder::<()>::new(1 << 20)
    ///     .backing(Backing::File { file: FileOffset::new(f, 0), shared: true })
    ///     .build()
    ///     .unwrap();
    /// r.as_volatile_slice().write_obj(7u64, 0x1000).unwrap();
    /// assert_eq!(r.flush(0x1000, 0x1000).unwrap(), FlushMethod::Msync);
    /// assert!(r.flush(1, 0x1000).is_err());
    /// ```
    pub fn flush(&self, offset: usize, len: usize) -> Result<FlushMethod, MmapError> {
        if self.kind != Kind::FileShared {
            return Err(MmapError::InvalidOption {
                option: "flush",
                reason: "only a shared file mapping writes through to a file",
            });
        }
        self.check_subrange(offset, len, self.flush_granule())?;
        // SAFETY: offset < size (checked), so the pointer stays in the region.
        let addr = unsafe { self.addr.add(offset) };
        if self.sync_faults {
            if let Some((how, line)) = sys::cpu::cache_writeback() {
                // SAFETY: the CPU has `how` (CPUID); the range lies in our mapping (checked).
                unsafe { sys::cpu::write_back(addr, len, how, line) };
                return Ok(FlushMethod::CacheLines(how));
            }
        }
        sys::msync(addr, len, sys::MsyncFlags::SYNC)
            .map_err(|source| MmapError::Os { op: "msync", source })?;
        Ok(FlushMethod::Msync)
    }

    /// The alignment [`flush`](Self::flush) needs: the cache line size for a region mapped
    /// with `MAP_SYNC` (when the CPU can write lines back), the page size otherwise.
    pub fn flush_granule(&self) -> usize {
        match sys::cpu::cache_writeback() {
            Some((_, line)) if self.sync_faults => line,
            _ => sys::page_size(),
        }
    }

    /// How many base pages of `[offset, offset + len)` are resident in RAM (`mincore(2)`;
    /// swapped-out pages count as not resident). `offset` is rounded down to a page.
    pub fn resident_pages(&self, offset: usize, len: usize) -> Result<usize, MmapError> {
        volatile::check_range(offset, len, self.size).map_err(|_| MmapError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        let page = sys::page_size();
        let start = offset - offset % page;
        let end = offset + len;
        // A fixed vector, one mincore call per 64 Ki pages: nothing sized from `len`.
        let mut vec = [0u8; 64 << 10];
        let mut resident = 0;
        let mut at = start;
        while at < end {
            let n = (end - at).min(vec.len() * page);
            // SAFETY: `at` is inside the region (start <= at < end <= size), so the pointer
            // stays in it.
            let addr = unsafe { self.addr.add(at) };
            sys::mincore(addr, n, &mut vec).map_err(|source| MmapError::Os { op: "mincore", source })?;
            resident += vec[..n.div_ceil(page)].iter().filter(|&&b| b & 1 != 0).count();
            at += n;
        }
        Ok(resident)
    }
}

impl<B: Bitmap> MmapRegion<B> {
    /// Frees the memory of `[offset, offset + len)` (both multiples of
    /// [`page_size`](Self::page_size)): afterwards it reads as zeros and no longer uses RAM (or
    /// file blocks). The method fits the backing:
    ///
    /// - private anonymous: `MADV_DONTNEED`;
    /// - shared anonymous: `MADV_REMOVE`;
    /// - memfd, shared file: `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the file (`MADV_REMOVE` if
    ///   the filesystem cannot punch holes);
    /// - private file (a restored snapshot): anonymous memory mapped over the range, because
    ///   `MADV_DONTNEED` would bring the file's bytes back; the region's policies (NUMA
    ///   placement, transparent huge pages, `dont_dump`, `dont_fork`, lock) are applied to the
    ///   new range again. Should the kernel refuse the new mapping, the file is mapped back
    ///   over the range before the error returns, so no hole is ever left behind.
    ///
    /// Refused:
    /// - hugetlb memory ([`MmapError::InvalidOption`]): freeing a huge page gives its
    ///   reservation back to the pool, and a later touch when the pool is empty would raise
    ///   SIGBUS instead of failing;
    /// - read-only regions ([`MmapError::ReadOnly`]).
    ///
    /// The range is marked dirty: its contents changed (to zeros), which a migration must send.
    ///
    /// ```
    /// use guestmem::mmap::MmapRegionBuilder;
    /// use guestmem::{Bytes, VolatileMemory};
    /// let r = MmapRegionBuilder::<()>::new(1 << 20).build().unwrap();
    /// r.as_volatile_slice().write_obj(7u8, 0x2000).unwrap();
    /// r.discard(0x2000, 0x1000).unwrap();
    /// assert_eq!(r.as_volatile_slice().read_obj::<u8>(0x2000).unwrap(), 0);
    /// assert!(r.discard(0x2001, 0x1000).is_err());
    /// ```
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), MmapError> {
        self.check_subrange(offset, len, self.page_size)?;
        if !self.prot.is_writable() {
            return Err(MmapError::ReadOnly { offset, len });
        }
        if self.hugetlbfs {
            return Err(MmapError::InvalidOption {
                option: "discard",
                reason: "freeing hugetlb pages gives up their pool reservation; a later touch with an empty pool raises SIGBUS",
            });
        }
        // SAFETY: offset < size (checked), so the pointer stays in the region.
        let addr = unsafe { self.addr.add(offset) };
        let fail = |source| MmapError::Discard { offset, len, source };
        let advise = |advice: Advice| {
            // SAFETY: the range lies inside our own mapping (checked above). Guest memory is
            // only ever accessed through volatile accesses and raw copies, never references,
            // so dropping its contents (to zeros) under concurrent users is the same as a
            // concurrent write.
            unsafe { sys::madvise(addr, len, advice) }.map_err(fail)
        };
        match self.kind {
            Kind::AnonPrivate => advise(Advice::DontNeed)?,
            Kind::AnonShared | Kind::Unknown => advise(Advice::Remove)?,
            Kind::FileShared if self.discard_remove => advise(Advice::Remove)?,
            Kind::FileShared => {
                let punched = self.file_offset.as_ref().map(|fo| {
                    sys::fallocate(
                        fo.as_fd(),
                        FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE,
                        fo.start() + offset as u64,
                        len as u64,
                    )
                });
                match punched {
                    Some(Ok(())) => {}
                    Some(Err(e)) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(fail(e)),
                    // No file to punch, or a filesystem that cannot: remove through the mapping.
                    _ => advise(Advice::Remove)?,
                }
            }
            Kind::FilePrivate => self.remap_anonymous(addr, offset, len).map_err(fail)?,
        }
        self.bitmap.mark_dirty(offset, len);
        Ok(())
    }

    /// Maps zero-filled anonymous memory over `[addr, addr + len)` (the range at `offset` of a
    /// private file mapping) and applies the region's policies to it. If the kernel refuses,
    /// maps the file back first, so the range never stays unmapped.
    fn remap_anonymous(&self, addr: *mut u8, offset: usize, len: usize) -> io::Result<()> {
        let flags = MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED | MapFlags::NORESERVE;
        // SAFETY: MAP_FIXED replaces a range of our own mapping (the caller checked it) with
        // zero-filled memory of the same protection; as with `madvise`, concurrent users see it
        // as a concurrent write of zeros.
        if let Err(e) = unsafe { sys::mmap(addr, len, self.prot, flags, None, 0) } {
            // Kernels before 6.12 may unmap the old range before failing: map the file back.
            if let Some(fo) = &self.file_offset {
                // SAFETY: as above; the range is ours, and the file mapping is what it held.
                let _ = unsafe {
                    sys::mmap(
                        addr,
                        len,
                        self.prot,
                        MapFlags::PRIVATE | MapFlags::FIXED,
                        Some(fo.as_fd()),
                        fo.start() + offset as u64,
                    )
                };
            }
            return Err(e);
        }
        let policy_error = |e: MmapError| match e {
            MmapError::OptionRefused { source, .. } => source,
            e => io::Error::other(e.to_string()),
        };
        self.apply_placement_and_advice(addr, len).map_err(policy_error)?;
        self.apply_lock(addr, len).map_err(policy_error)
    }
}

/// The `MAP_HUGETLB | MAP_HUGE_*` flags for hugetlb memory of `page_size`, or `None` when the
/// memory is not hugetlb.
fn hugetlb_map_flags(hugetlb: bool, page_size: usize) -> Option<MapFlags> {
    if !hugetlb {
        return None;
    }
    Some(match page_size {
        s if s == 1 << 30 => MapFlags::HUGETLB | MapFlags::HUGE_1GB,
        s if s == 2 << 20 => MapFlags::HUGETLB | MapFlags::HUGE_2MB,
        _ => MapFlags::HUGETLB,
    })
}

impl<B> Drop for MmapRegion<B> {
    fn drop(&mut self) {
        // Out of the SIGBUS table before the range can be reused by anyone.
        self.sigbus = None;
        match &self.ownership {
            Ownership::Owned { start, len } => {
                // SAFETY: we own the mapping (guard pages included); everything borrowing it
                // (slices, refs) borrows `self`, so nothing uses it any more.
                let _ = unsafe { sys::munmap(*start, *len) };
            }
            Ownership::InReservation { reservation, offset } => reservation.release(*offset),
            Ownership::View(owner) => owner.released(self.addr, self.size),
            Ownership::Borrowed => {}
        }
    }
}

impl<B: Bitmap> VolatileMemory for MmapRegion<B> {
    type Slice<'a>
        = B::Slice<'a>
    where
        Self: 'a;

    #[inline]
    fn len(&self) -> usize {
        self.size
    }

    #[inline]
    fn get_slice(&self, offset: usize, count: usize) -> volatile::Result<VolatileSlice<'_, B::Slice<'_>>> {
        volatile::check_range(offset, count, self.size)?;
        // SAFETY: `[offset, offset + count)` lies in the mapping (checked), which lives as long
        // as `&self`; it is readable (guest memory always is) and writable exactly when the
        // protection says so, which the slice is told. No reference to it is ever made.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                self.addr.add(offset),
                count,
                self.bitmap.slice_at(offset),
                self.prot.is_writable(),
            )
        })
    }
}

impl<B: Bitmap> MmapRegion<B> {
    /// The whole region as one slice.
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_, B::Slice<'_>> {
        // SAFETY: the whole mapping, as in `get_slice`.
        unsafe {
            VolatileSlice::with_bitmap(self.addr, self.size, self.bitmap.slice_at(0), self.prot.is_writable())
        }
    }
}

/// Builds an [`MmapRegion`]: choose the backing and the policies, then [`build`](Self::build).
///
/// Defaults: private anonymous memory, `READ | WRITE`, `MAP_NORESERVE` (not for hugetlb, where
/// it would turn an empty pool into SIGBUS at fault time), no guard pages, page alignment, no
/// huge pages, no prefault, not locked.
#[derive(Debug)]
#[must_use]
pub struct MmapRegionBuilder<B = ()> {
    size: usize,
    backing: Backing,
    prot: Protection,
    guard_pages: usize,
    align: usize,
    huge_pages: Option<HugePageSize>,
    populate: Populate,
    lock: Lock,
    dont_dump: bool,
    dont_fork: bool,
    mergeable: bool,
    numa: Option<NumaPolicy>,
    reservation: Option<(Arc<Reservation>, usize)>,
    dirty_tracking: bool,
    sigbus_recovery: bool,
    dax_sync: bool,
    discard_remove: bool,
    phantom: std::marker::PhantomData<B>,
}

impl<B: NewBitmap> MmapRegionBuilder<B> {
    /// A builder for a region of `size` bytes.
    pub fn new(size: usize) -> Self {
        MmapRegionBuilder {
            size,
            backing: Backing::default(),
            prot: Protection::READ_WRITE,
            guard_pages: 0,
            align: 0,
            huge_pages: None,
            populate: Populate::No,
            lock: Lock::No,
            dont_dump: false,
            dont_fork: false,
            mergeable: false,
            numa: None,
            reservation: None,
            dirty_tracking: true,
            sigbus_recovery: true,
            dax_sync: false,
            discard_remove: false,
            phantom: std::marker::PhantomData,
        }
    }

    /// The size the region will have.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The same builder for a region of `size` bytes (a guest region rounds a length that is
    /// not a page multiple up to whole pages).
    pub(crate) fn with_size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }

    /// What backs the memory (default: private anonymous).
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// The protection (default `READ | WRITE`; must include `READ`).
    pub fn protection(mut self, prot: Protection) -> Self {
        self.prot = prot;
        self
    }

    /// `n` `PROT_NONE` base pages before and after the region, from one reservation, so an
    /// overrun faults instead of touching a neighbour.
    pub fn guard_pages(mut self, n: usize) -> Self {
        self.guard_pages = n;
        self
    }

    /// Start the region at a multiple of `align` (a power of two), e.g. 2 MiB so that THP
    /// and huge-page EPT mappings can be used.
    pub fn align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }

    /// Huge pages: transparent (`MADV_HUGEPAGE`) or explicit hugetlb pages of a size. For a
    /// file backing, only `Transparent` or the size of the hugetlbfs the file is on.
    pub fn huge_pages(mut self, size: HugePageSize) -> Self {
        self.huge_pages = Some(size);
        self
    }

    /// Prefault the region when it is built.
    pub fn populate(mut self, populate: Populate) -> Self {
        self.populate = populate;
        self
    }

    /// Lock the region in RAM.
    pub fn lock(mut self, lock: Lock) -> Self {
        self.lock = lock;
        self
    }

    /// Leave the region out of core dumps (`MADV_DONTDUMP`).
    pub fn dont_dump(mut self, yes: bool) -> Self {
        self.dont_dump = yes;
        self
    }

    /// Do not map the region into children of `fork(2)` (`MADV_DONTFORK`).
    pub fn dont_fork(mut self, yes: bool) -> Self {
        self.dont_fork = yes;
        self
    }

    /// Let KSM merge identical pages (`MADV_MERGEABLE`; private anonymous memory only, the only
    /// kind KSM merges).
    pub fn mergeable(mut self, yes: bool) -> Self {
        self.mergeable = yes;
        self
    }

    /// Place the region's pages on NUMA nodes (`mbind(2)`, before any page is faulted in).
    pub fn numa(mut self, policy: NumaPolicy) -> Self {
        self.numa = Some(policy);
        self
    }

    /// Whether writes are tracked (default: yes). Off makes the bitmap `B::untracked`: for
    /// `Option<B>` that is `None`, which costs nothing per write and makes harvests of the
    /// region fail with [`NotTracking`](crate::bitmap::BitmapError::NotTracking) rather than
    /// report it clean; types that cannot be off ignore it.
    pub fn dirty_tracking(mut self, on: bool) -> Self {
        self.dirty_tracking = on;
        self
    }

    /// Whether a SIGBUS in the region (its file truncated under it by another holder, its
    /// hugetlb pool run dry) is recovered by mapping zero pages there (default: yes, for file,
    /// memfd and hugetlb memory; anonymous memory cannot fault so). See
    /// [`host::sigbus`](crate::host::sigbus): the first such region installs a process-wide
    /// handler that chains to the previous one. `false` leaves the region's faults to the
    /// process's own SIGBUS disposition.
    pub fn sigbus_recovery(mut self, on: bool) -> Self {
        self.sigbus_recovery = on;
        self
    }

    /// Map a shared file backing with `MAP_SHARED_VALIDATE | MAP_SYNC` (default: no): allowed
    /// only for files on a DAX filesystem or device (persistent memory), where it makes
    /// [`MmapRegion::flush`] a write-back of CPU cache lines instead of an `msync(2)`. The
    /// kernel refuses it for any other file ([`MmapError::OptionRefused`] naming `dax_sync`).
    pub fn dax_sync(mut self, on: bool) -> Self {
        self.dax_sync = on;
        self
    }

    /// Discard shared file memory through the mapping (`MADV_REMOVE`, which a userfaultfd sees
    /// as `EVENT_REMOVE`) rather than by punching a hole in the file (which it does not see): for
    /// memory a lazy restore fills.
    pub(crate) fn discard_by_remove(mut self, yes: bool) -> Self {
        self.discard_remove = yes;
        self
    }

    /// Map the region with `MAP_FIXED` at `offset` in `reservation` instead of where the kernel
    /// chooses. Guard pages, if asked for, are claimed from the reservation around it.
    pub fn in_reservation(mut self, reservation: Arc<Reservation>, offset: usize) -> Self {
        self.reservation = Some((reservation, offset));
        self
    }

    /// Maps the region, applies every option, and returns it; on any error nothing stays
    /// mapped and nothing stays claimed.
    pub fn build(self) -> Result<MmapRegion<B>, MmapError> {
        let base_page = sys::page_size();
        if self.size == 0 {
            return Err(MmapError::ZeroSize);
        }
        if !self.prot.is_readable() {
            return Err(MmapError::InvalidProtection(self.prot));
        }
        if self.align != 0 && !self.align.is_power_of_two() {
            return Err(MmapError::InvalidAlignment(self.align));
        }
        let explicit_huge = self.huge_pages.and_then(HugePageSize::bytes);

        // The backing: its fd, page size, kind and mmap flags.
        let mut flags;
        let mut file_id = None;
        let (file_offset, page_size, hugetlb, kind) = match &self.backing {
            Backing::Anonymous { shared } => {
                flags = MapFlags::ANONYMOUS | if *shared { MapFlags::SHARED } else { MapFlags::PRIVATE };
                let kind = if *shared { Kind::AnonShared } else { Kind::AnonPrivate };
                match explicit_huge {
                    Some(size) => {
                        flags |= hugetlb_map_flags(true, size).unwrap_or(MapFlags::HUGETLB);
                        (None, size, true, kind)
                    }
                    None => {
                        flags |= MapFlags::NORESERVE;
                        (None, base_page, false, kind)
                    }
                }
            }
            Backing::Memfd(opts) => {
                flags = MapFlags::SHARED;
                let mut mflags = MemfdFlags::CLOEXEC;
                if opts.seal {
                    mflags |= MemfdFlags::ALLOW_SEALING;
                }
                match explicit_huge {
                    Some(s) if s == 1 << 30 => mflags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB,
                    Some(_) => mflags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
                    None => {}
                }
                let page_size = explicit_huge.unwrap_or(base_page);
                check_multiple("size", self.size as u64, page_size)?;
                let fd = sys::memfd_create(&opts.name, mflags).map_err(|source| {
                    if explicit_huge.is_some() {
                        MmapError::OptionRefused { option: "huge_pages", source }
                    } else {
                        MmapError::Os { op: "memfd_create", source }
                    }
                })?;
                sys::fd::ftruncate(fd.as_fd(), self.size as u64)
                    .map_err(|source| MmapError::Os { op: "ftruncate", source })?;
                if opts.seal {
                    sys::fd::add_seals(fd.as_fd(), Seals::SHRINK | Seals::GROW)
                        .map_err(|source| MmapError::Os { op: "F_ADD_SEALS", source })?;
                }
                let st = sys::fstat(fd.as_fd()).map_err(|source| MmapError::Os { op: "fstat", source })?;
                file_id = Some((st.dev, st.ino));
                (Some(FileOffset::new(fd.into(), 0)), page_size, explicit_huge.is_some(), Kind::FileShared)
            }
            Backing::File { file, shared } => {
                flags = if *shared { MapFlags::SHARED } else { MapFlags::PRIVATE };
                let fd = file.file().as_fd();
                let st = sys::fstat(fd).map_err(|source| MmapError::Os { op: "fstat", source })?;
                let fs = sys::fstatfs(fd).map_err(|source| MmapError::Os { op: "fstatfs", source })?;
                let page_size = if fs.is_hugetlbfs() { fs.block_size as usize } else { base_page };
                match explicit_huge {
                    Some(_) if !fs.is_hugetlbfs() => {
                        return Err(MmapError::InvalidOption {
                            option: "huge_pages",
                            reason: "explicit huge pages need a file on hugetlbfs (or use Transparent)",
                        })
                    }
                    Some(s) if s != page_size => {
                        return Err(MmapError::InvalidOption {
                            option: "huge_pages",
                            reason: "the size differs from the page size of the file's hugetlbfs",
                        })
                    }
                    _ => {}
                }
                let end = file
                    .start()
                    .checked_add(self.size as u64)
                    .ok_or_else(|| MmapError::Overflow { offset: file.start(), size: self.size })?;
                check_multiple("file offset", file.start(), page_size)?;
                // Regular files, block devices and sized character devices (device DAX) are
                // checked against their size; anything else cannot be mapped safely, since a
                // touch past its end would raise SIGBUS.
                let file_size = sys::fd::mappable_size(fd)
                    .map_err(|source| MmapError::Os { op: "sizing the file", source })?
                    .ok_or(MmapError::UnsizedFile { kind: st.kind })?;
                if file_size < end {
                    return Err(MmapError::FileTooShort { file_size, offset: file.start(), size: self.size });
                }
                let kind = if *shared { Kind::FileShared } else { Kind::FilePrivate };
                file_id = Some((st.dev, st.ino));
                (Some(file.clone()), page_size, fs.is_hugetlbfs(), kind)
            }
        };
        check_multiple("size", self.size as u64, page_size)?;
        if self.dax_sync {
            if kind != Kind::FileShared || hugetlb {
                return Err(MmapError::InvalidOption {
                    option: "dax_sync",
                    reason: "MAP_SYNC applies to shared mappings of a DAX file only",
                });
            }
            flags = flags.difference(MapFlags::SHARED) | MapFlags::SHARED_VALIDATE | MapFlags::SYNC;
        }
        if self.mergeable && kind != Kind::AnonPrivate {
            return Err(MmapError::InvalidOption {
                option: "mergeable",
                reason: "KSM merges only private anonymous memory",
            });
        }
        if hugetlb && self.huge_pages == Some(HugePageSize::Transparent) {
            return Err(MmapError::InvalidOption {
                option: "huge_pages",
                reason: "transparent huge pages do not apply to hugetlb memory",
            });
        }
        if hugetlb && self.lock == Lock::OnFault {
            return Err(MmapError::InvalidOption {
                option: "lock",
                reason: "hugetlb pages are never swapped; lock on fault does not apply",
            });
        }

        // Fallibly (a size from a file or a peer must not abort the process), and before
        // anything is mapped or claimed; large bitmaps use no memory until marked.
        let bitmap =
            if self.dirty_tracking { B::try_with_len(self.size) } else { Ok(B::untracked(self.size)) }
                .map_err(MmapError::Bitmap)?;
        // Where it goes: the kernel's choice, our own aligned reservation with guard pages, or
        // a caller's reservation.
        let guard = self
            .guard_pages
            .checked_mul(base_page)
            .ok_or(MmapError::Overflow { offset: 0, size: self.size })?;
        let align = self.align.max(page_size);
        let with_guards = guard
            .checked_mul(2)
            .and_then(|g| g.checked_add(self.size))
            .ok_or(MmapError::Overflow { offset: guard as u64, size: self.size })?;
        let (fixed_at, ownership) = if let Some((res, offset)) = &self.reservation {
            let start = offset.checked_sub(guard).ok_or_else(|| MmapError::OutsideReservation {
                offset: *offset,
                size: with_guards,
                reservation_len: res.len(),
            })?;
            // SAFETY-free arithmetic: the claim below checks start + with_guards <= len.
            let addr = (res.as_ptr() as usize).wrapping_add(*offset);
            check_multiple("address", addr as u64, align)?;
            res.claim(start, with_guards)?;
            (Some(addr as *mut u8), Ownership::InReservation { reservation: res.clone(), offset: start })
        } else if guard > 0 || align > page_size {
            let total = with_guards
                .checked_add(align - base_page.min(align))
                .ok_or(MmapError::Overflow { offset: align as u64, size: self.size })?;
            let (start, len) = reservation::reserve_aligned(total, base_page)?;
            // The data must be `align`-aligned with at least `guard` bytes before it.
            let data = (start as usize + guard).next_multiple_of(align);
            (Some(data as *mut u8), Ownership::Owned { start, len })
        } else {
            (None, Ownership::Borrowed)
        };
        // From here on `region` owns what was mapped or claimed: an early return unmaps it.
        let mut region = MmapRegion {
            addr: fixed_at.unwrap_or(std::ptr::null_mut()),
            size: self.size,
            bitmap,
            file_offset,
            prot: self.prot,
            flags,
            page_size,
            hugetlbfs: hugetlb,
            kind,
            ownership,
            policies: Policies {
                numa: self.numa.clone(),
                thp: self.huge_pages == Some(HugePageSize::Transparent),
                dont_dump: self.dont_dump,
                dont_fork: self.dont_fork,
                mergeable: self.mergeable,
                lock: self.lock,
            },
            file_id,
            sigbus: None,
            sync_faults: self.dax_sync,
            discard_remove: self.discard_remove,
        };
        let fd: Option<BorrowedFd<'_>> = region.file_offset.as_ref().map(|f| f.file().as_fd());
        let file_start = region.file_offset.as_ref().map_or(0, FileOffset::start);
        let map_flags = if fixed_at.is_some() { flags | MapFlags::FIXED } else { flags };
        // SAFETY: with MAP_FIXED the target is inside a reservation we own (just made, or
        // claimed from the caller's reservation), so nothing else is replaced; without it the
        // kernel picks a new place.
        let mapped = unsafe { sys::mmap(region.addr, self.size, self.prot, map_flags, fd, file_start) };
        let addr = match mapped {
            Ok(addr) => addr,
            Err(source) => {
                // The hugetlb pool is the usual reason: name the option.
                return Err(if hugetlb && source.raw_os_error() == Some(libc::ENOMEM) {
                    MmapError::OptionRefused { option: "huge_pages", source }
                } else if self.dax_sync && source.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    MmapError::OptionRefused { option: "dax_sync", source }
                } else {
                    MmapError::Mmap { size: self.size, source }
                });
            }
        };
        region.addr = addr;
        if fixed_at.is_none() {
            region.ownership = Ownership::Owned { start: addr, len: self.size };
        }
        // Memory that faults with SIGBUS when its file shrinks (or its pool runs dry) takes
        // part in the recovery of `host::sigbus`.
        if self.sigbus_recovery && (region.file_offset.is_some() || hugetlb) {
            let os = |op| move |source| MmapError::Os { op, source };
            crate::host::sigbus::install().map_err(os("installing the SIGBUS handler"))?;
            let (fd, file_start) = match &region.file_offset {
                Some(fo) => (Some(fo.as_raw_fd()), fo.start()),
                None => (None, 0),
            };
            region.sigbus = Some(
                crate::host::sigbus::Registration::new(addr, self.size, fd, file_start, page_size, self.prot)
                    .map_err(os("registering the region for SIGBUS recovery"))?,
            );
        }
        region.apply_policies(self.populate)?;
        Ok(region)
    }

    /// Adopts an existing mapping without owning it: it is not unmapped when the region drops.
    ///
    /// # Safety
    /// `[addr, addr + size)` must be a mapping valid for reads (and writes, if `prot` has
    /// `WRITE`) for the whole life of the region, used by nothing that makes Rust references to
    /// it, and `prot` must not claim more access than the mapping has.
    pub unsafe fn build_raw(
        addr: *mut u8,
        size: usize,
        prot: Protection,
        flags: MapFlags,
    ) -> Result<MmapRegion<B>, MmapError> {
        let page = sys::page_size();
        if size == 0 {
            return Err(MmapError::ZeroSize);
        }
        if !prot.is_readable() {
            return Err(MmapError::InvalidProtection(prot));
        }
        check_multiple("address", addr as u64, page)?;
        if (addr as usize).checked_add(size).is_none() {
            return Err(MmapError::Overflow { offset: addr as u64, size });
        }
        Ok(MmapRegion {
            addr,
            size,
            bitmap: B::try_with_len(size).map_err(MmapError::Bitmap)?,
            file_offset: None,
            prot,
            flags,
            page_size: page,
            hugetlbfs: flags.contains(MapFlags::HUGETLB),
            kind: Kind::Unknown,
            ownership: Ownership::Borrowed,
            policies: Policies::default(),
            file_id: None,
            sigbus: None,
            sync_faults: false,
            discard_remove: false,
        })
    }
}

/// Fails with [`MmapError::Unaligned`] unless `value` is a multiple of `page_size`.
fn check_multiple(what: &'static str, value: u64, page_size: usize) -> Result<(), MmapError> {
    if !value.is_multiple_of(page_size as u64) {
        return Err(MmapError::Unaligned { what, value, page_size: page_size as u64 });
    }
    Ok(())
}

impl<B> MmapRegion<B> {
    /// Applies the builder's policies to the freshly mapped region, in the order the kernel
    /// needs: placement before any fault, advice, then prefault, then lock.
    fn apply_policies(&self, populate: Populate) -> Result<(), MmapError> {
        self.apply_placement_and_advice(self.addr, self.size)?;
        let populate_advice = if self.prot.is_writable() && self.kind != Kind::FilePrivate {
            Advice::PopulateWrite
        } else {
            Advice::PopulateRead
        };
        match populate {
            Populate::No => {}
            // SAFETY: non-destructive advice on our own new mapping.
            Populate::Now => unsafe { sys::madvise(self.addr, self.size, populate_advice) }
                .map_err(|source| MmapError::OptionRefused { option: "populate", source })?,
            Populate::Parallel(threads) => self.populate_parallel(threads.get(), populate_advice)?,
        }
        self.apply_lock(self.addr, self.size)
    }

    /// The NUMA placement and the advice of the region's policies, on `[addr, addr + len)`
    /// (all of a new mapping, or a range mapped anew by `discard`).
    fn apply_placement_and_advice(&self, addr: *mut u8, len: usize) -> Result<(), MmapError> {
        let p = &self.policies;
        let refused = |option: &'static str| move |source| MmapError::OptionRefused { option, source };
        if let Some(numa) = &p.numa {
            sys::mbind(addr, len, numa.mode, &numa.nodes, MbindFlags::empty()).map_err(refused("numa"))?;
        }
        for (yes, advice, option) in [
            (p.thp, Advice::HugePage, "huge_pages"),
            (p.dont_dump, Advice::DontDump, "dont_dump"),
            (p.dont_fork, Advice::DontFork, "dont_fork"),
            (p.mergeable, Advice::Mergeable, "mergeable"),
        ] {
            if yes {
                // SAFETY: non-destructive advice on a range of our own mapping.
                unsafe { sys::madvise(addr, len, advice) }.map_err(refused(option))?;
            }
        }
        Ok(())
    }

    /// The lock policy on `[addr, addr + len)`.
    fn apply_lock(&self, addr: *mut u8, len: usize) -> Result<(), MmapError> {
        let refused = |source| MmapError::OptionRefused { option: "lock", source };
        match self.policies.lock {
            Lock::No => Ok(()),
            Lock::Now => sys::mlock(addr, len).map_err(refused),
            Lock::OnFault => sys::mlock2(addr, len, Mlock2Flags::ONFAULT).map_err(refused),
        }
    }

    /// Prefaults the region on `threads` threads, each taking a page-aligned chunk.
    fn populate_parallel(&self, threads: usize, advice: Advice) -> Result<(), MmapError> {
        let pages = self.size / self.page_size;
        let per_thread = pages.div_ceil(threads.min(pages).max(1)) * self.page_size;
        let base = self.addr as usize;
        let size = self.size;
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..size)
                .step_by(per_thread)
                .map(|off| {
                    let len = per_thread.min(size - off);
                    scope.spawn(move || {
                        // SAFETY: non-destructive advice on a page-aligned chunk of our own
                        // mapping.
                        unsafe { sys::madvise((base + off) as *mut u8, len, advice) }
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| match h.join() {
                Ok(r) => r.map_err(|source| MmapError::OptionRefused { option: "populate", source }),
                Err(_) => Err(MmapError::OptionRefused {
                    option: "populate",
                    source: io::Error::other("thread panicked"),
                }),
            })
        })
    }
}

/// How a view of a device mapping is backed.
#[derive(Clone, Debug)]
pub(crate) enum ViewBacking {
    /// Private anonymous memory.
    Anonymous,
    /// A shared mapping of this file, from this offset.
    File(FileOffset),
}

impl<B> MmapRegion<B> {
    /// A region over `[addr, addr + size)`, part of a mapping that `owner` owns and keeps
    /// mapped, read-write, with `bitmap` (sized for `size`).
    ///
    /// # Safety
    /// `[addr, addr + size)` must be mapped read-write, backed as `backing` says, for as long as
    /// the region lives (the owner may change it only after `released` was called for it), and
    /// nothing may make Rust references to it.
    pub(crate) unsafe fn view(
        addr: *mut u8,
        size: usize,
        bitmap: B,
        backing: ViewBacking,
        owner: Arc<dyn ViewOwner>,
    ) -> MmapRegion<B> {
        let (file_offset, flags, kind) = match backing {
            ViewBacking::Anonymous => {
                (None, MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE, Kind::AnonPrivate)
            }
            ViewBacking::File(fo) => (Some(fo), MapFlags::SHARED, Kind::FileShared),
        };
        let file_id =
            file_offset.as_ref().and_then(|fo| sys::fstat(fo.as_fd()).ok()).map(|st| (st.dev, st.ino));
        MmapRegion {
            addr,
            size,
            bitmap,
            file_offset,
            prot: Protection::READ_WRITE,
            flags,
            page_size: sys::page_size(),
            hugetlbfs: false,
            kind,
            ownership: Ownership::View(owner),
            policies: Policies::default(),
            file_id,
            sigbus: None,
            sync_faults: false,
            discard_remove: false,
        }
    }
}
