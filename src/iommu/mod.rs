//! Guest memory seen through an IOMMU: an IOTLB of I/O virtual address (IOVA) ranges mapped to
//! guest-physical addresses with read/write permissions, and [`IovaMemory`], a view that
//! implements [`Bytes<Iova>`](crate::Bytes) over any [`GuestMemory`](crate::GuestMemory).
//!
//! A device behind a virtual IOMMU (virtio-iommu, VT-d, a vhost-user device with
//! `VIRTIO_F_IOMMU_PLATFORM`) addresses memory by IOVA. [`Iotlb`] holds the translations the
//! IOMMU model gave it: [`update`](Iotlb::update) maps a range (replacing whatever overlapped
//! it), [`invalidate`](Iotlb::invalidate) unmaps one. A translation that finds nothing is
//! [`IommuError::Miss`] with the first unmapped IOVA and the bytes still needed from there:
//! the device asks its IOMMU model (a vhost-user back-end sends an IOTLB miss message), which
//! updates the IOTLB, and the device retries. A write through a mapping without
//! [`Permissions::WRITE`] (or a read without `READ`) is [`IommuError::PermissionDenied`],
//! never a write. An access that crosses mappings is split at their ends (and again where the
//! guest addresses cross regions); the whole range is checked before any byte moves.
//!
//! # Concurrency
//!
//! The IOTLB is copy-on-write: a table is immutable once published, an update builds the next
//! table under a writer lock and publishes it with one atomic pointer store (the scheme of
//! [`GuestMemoryAtomic`], which it reuses), so translations never
//! race with updates and never take a lock. A device thread keeps an [`IotlbCache`]: its
//! [`table`](IotlbCache::table) costs one atomic load of the generation while the IOTLB is
//! unchanged, and a translation is a branch-free binary search over a dense array of IOVA
//! starts, the same as guest-address translation. An update costs a copy of the table (its
//! size is bounded, [`Iotlb::with_max_entries`]).
//!
//! What an invalidation guarantees: once [`invalidate`](Iotlb::invalidate) returns, every
//! table taken afterwards (from a cache or [`Iotlb::snapshot`]) misses the range. A view built
//! on a table taken before still translates with it: take the table per request, not once for
//! good (a device whose request completes after the guest's unmap request was acknowledged is
//! the same race a hardware IOMMU's caller must order).
//!
//! ```
//! use guestmem::iommu::{Access, IommuError, Iotlb, Iova, Permissions};
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let iotlb = Iotlb::new();
//! // Two pages of IOVA space, on two distant guest pages; the second read-only.
//! iotlb.update(Iova(0x10_0000), 0x1000, GuestAddress(0x5000), Permissions::READ_WRITE).unwrap();
//! iotlb.update(Iova(0x10_1000), 0x1000, GuestAddress(0x9000), Permissions::READ).unwrap();
//!
//! let mut cache = iotlb.cache();
//! let view = cache.table().view(&mem);
//! view.write_obj(0xabcdu16, Iova(0x10_0010)).unwrap();
//! assert_eq!(mem.read_obj::<u16>(GuestAddress(0x5010)).unwrap(), 0xabcd);
//! // A read across both mappings is split; a write into the read-only one is refused.
//! let mut buf = [0u8; 32];
//! view.read_slice(&mut buf, Iova(0x10_0ff0)).unwrap();
//! assert!(matches!(view.write_slice(&buf, Iova(0x10_0ff0)), Err(IommuError::PermissionDenied { .. })));
//! // A miss names the first IOVA the IOMMU model must map.
//! match view.read_obj::<u64>(Iova(0x20_0000)) {
//!     Err(IommuError::Miss { iova, access: Access::Read, .. }) => assert_eq!(iova, Iova(0x20_0000)),
//!     other => panic!("{other:?}"),
//! }
//! iotlb.invalidate(Iova(0x10_0000), 0x2000).unwrap();
//! assert!(cache.table().view(&mem).read_obj::<u8>(Iova(0x10_0000)).is_err());
//! ```

mod view;

pub use view::IovaMemory;

use std::fmt;

use crate::address::GuestAddress;
use crate::atomic::{GuestMemoryAtomic, GuestMemoryGuard, MemoryCache};
use crate::memory::GuestMemoryError;
use crate::sys::mman::flag_type;

/// The granule of IOTLB mappings: IOVAs, guest addresses and sizes are multiples of 4 KiB (so
/// an aligned access of up to 8 bytes never crosses a mapping, and stays one access).
pub const IOTLB_PAGE_SIZE: u64 = 4096;

/// The mappings an IOTLB holds at most by default.
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 16;

/// The most mappings any IOTLB may be configured for.
pub const MAX_ENTRIES: usize = 1 << 20;

/// An I/O virtual address: what a device behind an IOMMU puts on the bus.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

impl fmt::Debug for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iova({:#x})", self.0)
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iova {:#x}", self.0)
    }
}

flag_type! {
    /// What a mapping allows (the vhost IOTLB's `perm`: 1 read, 2 write, 3 both).
    ///
    /// ```
    /// use guestmem::iommu::Permissions;
    /// assert!(Permissions::READ_WRITE.contains(Permissions::WRITE));
    /// assert_eq!(Permissions::from_bits(3), Some(Permissions::READ_WRITE));
    /// assert_eq!(Permissions::from_bits(4), None);
    /// ```
    Permissions: u8 {
        /// The device may read.
        READ = 1;
        /// The device may write.
        WRITE = 2;
        /// Both.
        READ_WRITE = 3;
    }
}

/// The kind of an access through the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
}

impl Access {
    /// The permission the access needs.
    pub fn needs(self) -> Permissions {
        match self {
            Access::Read => Permissions::READ,
            Access::Write => Permissions::WRITE,
        }
    }
}

/// One IOTLB mapping: `size` bytes of IOVA space from `iova` onto guest memory at
/// `guest_addr`, with permissions `perm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IotlbEntry {
    /// The first IOVA.
    pub iova: Iova,
    /// Bytes mapped.
    pub size: u64,
    /// The guest address of the first byte.
    pub guest_addr: GuestAddress,
    /// What the device may do through it.
    pub perm: Permissions,
}

/// Errors of IOVA translation, IOVA accesses and IOTLB updates.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    /// No mapping holds `iova`: the IOMMU model must map `[iova, iova + len)` (the rest of the
    /// access) for it to go on.
    #[error("IOTLB miss at {iova} ({len:#x} bytes to {access:?})")]
    Miss {
        /// The first IOVA without a mapping.
        iova: Iova,
        /// Bytes of the access from there.
        len: u64,
        /// What the access does.
        access: Access,
    },
    /// A mapping that does not allow the access (a write through a read-only mapping).
    #[error("{access:?} at {iova} denied: the mapping allows {perm:?}")]
    PermissionDenied {
        /// The IOVA of the part of the access that was denied.
        iova: Iova,
        /// What the access does.
        access: Access,
        /// What the mapping allows.
        perm: Permissions,
    },
    /// The translation succeeded, guest memory refused (a hole, read-only memory, a
    /// misaligned atomic, I/O that stopped short).
    #[error("access at {iova} failed in guest memory: {source}")]
    Guest {
        /// The IOVA of the part of the access guest memory refused.
        iova: Iova,
        /// Guest memory's error.
        source: GuestMemoryError,
    },
    /// A range asked for as one slice (or one atomic) that spans more than one mapping.
    #[error("{len:#x} bytes at {iova} span more than one mapping")]
    NotContiguous {
        /// Its IOVA.
        iova: Iova,
        /// Its length.
        len: u64,
    },
    /// An exact transfer with a file or socket that stopped early (end of file, closed peer).
    #[error("transfer at {iova} stopped after {completed:#x} of {expected:#x} bytes")]
    PartialBuffer {
        /// Where the transfer started.
        iova: Iova,
        /// Bytes it had to move.
        expected: usize,
        /// Bytes it moved.
        completed: usize,
    },
    /// A mapping or invalidation of size 0.
    #[error("IOTLB range of size 0 at {iova}")]
    ZeroSize {
        /// Its IOVA.
        iova: Iova,
    },
    /// An IOVA, guest address or size that is not a multiple of [`IOTLB_PAGE_SIZE`].
    #[error("{what} {value:#x} is not a multiple of {granule:#x}")]
    Unaligned {
        /// "iova", "guest address" or "size".
        what: &'static str,
        /// The value.
        value: u64,
        /// The granule.
        granule: u64,
    },
    /// A range that wraps past the top of the address space (or an access that would).
    #[error("{what} {value:#x} + {size:#x} wraps past 2^64")]
    Overflow {
        /// "iova" or "guest address".
        what: &'static str,
        /// The start.
        value: u64,
        /// The size.
        size: u64,
    },
    /// A mapping that allows nothing (permissions 0: an invalidation is what removes one).
    #[error("a mapping at {iova} with no permission")]
    NoPermission {
        /// Its IOVA.
        iova: Iova,
    },
    /// An update that would leave more mappings than the IOTLB holds.
    #[error("{count} IOTLB mappings, at most {max}")]
    TooManyEntries {
        /// Mappings there would be.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// A short transfer of a provided method of [`Bytes<Iova>`](crate::Bytes).
impl From<crate::bytes::PartialBuffer<Iova>> for IommuError {
    fn from(p: crate::bytes::PartialBuffer<Iova>) -> Self {
        IommuError::PartialBuffer { iova: p.addr, expected: p.expected, completed: p.completed }
    }
}

/// One row of a table: what a translation needs beside the IOVA start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    /// Size - 1 (a mapping may end at 2^64).
    last: u64,
    guest: u64,
    perm: Permissions,
}

/// One immutable version of an IOTLB: sorted, non-overlapping mappings in a flat table.
///
/// Taken from an [`IotlbCache`] or [`Iotlb::snapshot`]; translates, and gives
/// [`view`](Self::view)s of guest memory.
#[derive(Clone, Default)]
pub struct IotlbTable {
    starts: Box<[u64]>,
    rows: Box<[Row]>,
}

impl fmt::Debug for IotlbTable {
    /// The size, not the mappings (there may be many).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IotlbTable").field("mappings", &self.len()).finish_non_exhaustive()
    }
}

impl IotlbTable {
    /// The number of mappings.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The mappings, in IOVA order.
    pub fn entries(&self) -> impl Iterator<Item = IotlbEntry> + '_ {
        self.starts.iter().zip(self.rows.iter()).map(|(&s, r)| IotlbEntry {
            iova: Iova(s),
            size: r.last.wrapping_add(1),
            guest_addr: GuestAddress(r.guest),
            perm: r.perm,
        })
    }

    /// A view of `mem` through this table: [`Bytes<Iova>`](crate::Bytes).
    #[inline]
    pub fn view<'a, M: ?Sized>(&'a self, mem: &'a M) -> IovaMemory<'a, M> {
        IovaMemory::new(self, mem)
    }

    /// The index of the mapping holding `iova` and the offset in it: a branch-free binary
    /// search for the last start not above `iova`, then one bounds check.
    #[inline(always)]
    fn lookup(&self, iova: u64) -> Option<(usize, u64)> {
        let starts = &*self.starts;
        let mut size = starts.len();
        if size == 0 {
            return None;
        }
        let mut base = 0usize;
        while size > 1 {
            let half = size / 2;
            let mid = base + half;
            // SAFETY: `mid < base + size <= starts.len()`: the window stays in bounds.
            let start = unsafe { *starts.get_unchecked(mid) };
            base = std::hint::select_unpredictable(start <= iova, mid, base);
            size -= half;
        }
        // SAFETY: `base < starts.len()`, and `rows` has the same length.
        let (start, row) = unsafe { (*starts.get_unchecked(base), self.rows.get_unchecked(base)) };
        let offset = iova.wrapping_sub(start);
        (iova >= start && offset <= row.last).then_some((base, offset))
    }

    /// The mapping that holds `iova`, whatever its permissions, or `None` if no mapping does
    /// (for callers that check permissions their own way, as the vm-memory face does for
    /// `Permissions::ReadWrite` and `Permissions::No`).
    ///
    /// ```
    /// use guestmem::iommu::{Iotlb, IotlbEntry, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let iotlb = Iotlb::new();
    /// iotlb.update(Iova(0x1000), 0x2000, GuestAddress(0x8000), Permissions::WRITE).unwrap();
    /// let table = iotlb.snapshot();
    /// let entry = IotlbEntry { iova: Iova(0x1000), size: 0x2000, guest_addr: GuestAddress(0x8000), perm: Permissions::WRITE };
    /// assert_eq!(table.mapping(Iova(0x2fff)), Some(entry));
    /// assert_eq!(table.mapping(Iova(0x3000)), None);
    /// ```
    #[inline]
    pub fn mapping(&self, iova: Iova) -> Option<IotlbEntry> {
        let (idx, _) = self.lookup(iova.0)?;
        // SAFETY: `lookup` returns an index into the table (`rows` has the length of `starts`).
        let (start, row) = unsafe { (*self.starts.get_unchecked(idx), self.rows.get_unchecked(idx)) };
        // A mapping's size fits in u64: `check_range` refused any range ending past 2^64 - 1.
        Some(IotlbEntry {
            iova: Iova(start),
            size: row.last + 1,
            guest_addr: GuestAddress(row.guest),
            perm: row.perm,
        })
    }

    /// Translates the first bytes of `[iova, iova + len)` for `access`: the guest address of
    /// `iova` and how many bytes from there lie in the same mapping (at most `len`; 0 when
    /// `len` is 0, which still needs `iova` mapped).
    ///
    /// ```
    /// use guestmem::iommu::{Access, IommuError, Iotlb, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let iotlb = Iotlb::new();
    /// iotlb.update(Iova(0x1000), 0x2000, GuestAddress(0x8000), Permissions::READ).unwrap();
    /// let table = iotlb.snapshot();
    /// assert_eq!(table.translate(Iova(0x2ff0), 0x100, Access::Read).unwrap(), (GuestAddress(0x9ff0), 0x10));
    /// assert!(matches!(table.translate(Iova(0x1000), 1, Access::Write), Err(IommuError::PermissionDenied { .. })));
    /// assert!(matches!(table.translate(Iova(0x3000), 1, Access::Read), Err(IommuError::Miss { len: 1, .. })));
    /// ```
    #[inline]
    pub fn translate(&self, iova: Iova, len: u64, access: Access) -> Result<(GuestAddress, u64), IommuError> {
        let Some((idx, offset)) = self.lookup(iova.0) else {
            return Err(IommuError::Miss { iova, len, access });
        };
        // SAFETY: `lookup` returns an index into the table.
        let row = unsafe { self.rows.get_unchecked(idx) };
        if !row.perm.contains(access.needs()) {
            return Err(IommuError::PermissionDenied { iova, access, perm: row.perm });
        }
        // `offset <= last`: the rest of the mapping is `last - offset + 1` bytes (saturating
        // at 2^64 - 1 for a mapping of the whole space).
        let rest = (row.last - offset).saturating_add(1);
        Ok((GuestAddress(row.guest + offset), len.min(rest)))
    }

    /// The rows of this table with `[first, last]` unmapped (partly covered mappings are cut).
    fn without(&self, first: u64, last: u64) -> Vec<(u64, Row)> {
        let mut out = Vec::with_capacity(self.len() + 1);
        for (&s, &r) in self.starts.iter().zip(self.rows.iter()) {
            let e = s + r.last;
            if e < first || s > last {
                out.push((s, r));
                continue;
            }
            if s < first {
                out.push((s, Row { last: first - 1 - s, ..r }));
            }
            if e > last {
                let cut = last + 1 - s;
                out.push((last + 1, Row { last: e - (last + 1), guest: r.guest + cut, perm: r.perm }));
            }
        }
        out
    }

    fn from_rows(rows: Vec<(u64, Row)>) -> Self {
        IotlbTable {
            starts: rows.iter().map(|&(s, _)| s).collect(),
            rows: rows.iter().map(|&(_, r)| r).collect(),
        }
    }
}

/// Checks a range of an update or invalidation: non-empty, granule aligned, not wrapping.
fn check_range(iova: Iova, size: u64) -> Result<u64, IommuError> {
    if size == 0 {
        return Err(IommuError::ZeroSize { iova });
    }
    for (what, value) in [("iova", iova.0), ("size", size)] {
        if !value.is_multiple_of(IOTLB_PAGE_SIZE) {
            return Err(IommuError::Unaligned { what, value, granule: IOTLB_PAGE_SIZE });
        }
    }
    iova.0.checked_add(size - 1).ok_or(IommuError::Overflow { what: "iova", value: iova.0, size })
}

/// An IOTLB: the IOVA mappings a device may use, updated by the IOMMU model while devices
/// translate (see the [module docs](self) for the scheme).
///
/// Cloning gives another handle on the same IOTLB.
#[derive(Clone, Debug)]
pub struct Iotlb {
    table: GuestMemoryAtomic<IotlbTable>,
    max_entries: usize,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// An empty IOTLB (every translation misses) holding up to [`DEFAULT_MAX_ENTRIES`].
    pub fn new() -> Self {
        Iotlb { table: GuestMemoryAtomic::new(IotlbTable::default()), max_entries: DEFAULT_MAX_ENTRIES }
    }

    /// An empty IOTLB holding up to `max_entries` mappings (at most [`MAX_ENTRIES`]).
    ///
    /// ```
    /// use guestmem::iommu::{Iotlb, MAX_ENTRIES};
    /// assert!(Iotlb::with_max_entries(16).is_ok());
    /// assert!(Iotlb::with_max_entries(MAX_ENTRIES + 1).is_err());
    /// ```
    pub fn with_max_entries(max_entries: usize) -> Result<Self, IommuError> {
        if max_entries > MAX_ENTRIES {
            return Err(IommuError::TooManyEntries { count: max_entries, max: MAX_ENTRIES });
        }
        Ok(Iotlb { table: GuestMemoryAtomic::new(IotlbTable::default()), max_entries })
    }

    /// Maps `[iova, iova + size)` onto guest memory at `guest_addr` with `perm`, replacing the
    /// parts of other mappings it overlaps. All three numbers must be multiples of
    /// [`IOTLB_PAGE_SIZE`], the ranges must not wrap, `perm` must allow something, and the
    /// IOTLB must not end up with more than its maximum of mappings; an error changes nothing.
    /// Guest addresses are not checked against memory (a mapping of MMIO space is legal): an
    /// access there fails in guest memory ([`IommuError::Guest`]).
    ///
    /// ```
    /// use guestmem::iommu::{Iotlb, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let iotlb = Iotlb::new();
    /// iotlb.update(Iova(0), 0x4000, GuestAddress(0x10000), Permissions::READ_WRITE).unwrap();
    /// // The middle page moves elsewhere, read-only: the old mapping is cut in two around it.
    /// iotlb.update(Iova(0x1000), 0x1000, GuestAddress(0x90000), Permissions::READ).unwrap();
    /// assert_eq!(iotlb.snapshot().len(), 3);
    /// assert!(iotlb.update(Iova(0x800), 0x1000, GuestAddress(0), Permissions::READ).is_err());
    /// ```
    pub fn update(
        &self,
        iova: Iova,
        size: u64,
        guest_addr: GuestAddress,
        perm: Permissions,
    ) -> Result<(), IommuError> {
        self.update_all(&[IotlbEntry { iova, size, guest_addr, perm }])
    }

    /// Applies several mappings at once, in order (a later one replaces what it overlaps of an
    /// earlier one), and publishes them as one new table: a translation sees all of them or
    /// none. Each is checked as in [`update`](Self::update); an error changes nothing.
    ///
    /// ```
    /// use guestmem::iommu::{Iotlb, IotlbEntry, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let iotlb = Iotlb::new();
    /// let e = |iova, guest| IotlbEntry { iova: Iova(iova), size: 0x1000, guest_addr: GuestAddress(guest), perm: Permissions::READ };
    /// iotlb.update_all(&[e(0, 0x5000), e(0x1000, 0x9000)]).unwrap();
    /// assert_eq!((iotlb.snapshot().len(), iotlb.generation()), (2, 1));
    /// assert!(iotlb.update_all(&[e(0x2000, 0), e(0x3000, 0x10)]).is_err()); // the second is unaligned
    /// assert_eq!(iotlb.snapshot().len(), 2);
    /// ```
    pub fn update_all(&self, entries: &[IotlbEntry]) -> Result<(), IommuError> {
        for e in entries {
            check_range(e.iova, e.size)?;
            if !e.guest_addr.0.is_multiple_of(IOTLB_PAGE_SIZE) {
                return Err(IommuError::Unaligned {
                    what: "guest address",
                    value: e.guest_addr.0,
                    granule: IOTLB_PAGE_SIZE,
                });
            }
            e.guest_addr.0.checked_add(e.size - 1).ok_or(IommuError::Overflow {
                what: "guest address",
                value: e.guest_addr.0,
                size: e.size,
            })?;
            if e.perm.is_empty() {
                return Err(IommuError::NoPermission { iova: e.iova });
            }
        }
        self.table.update(|t| {
            let mut table = t.clone();
            for e in entries {
                let mut rows = table.without(e.iova.0, e.iova.0 + (e.size - 1));
                let at = rows.partition_point(|&(s, _)| s < e.iova.0);
                rows.insert(at, (e.iova.0, Row { last: e.size - 1, guest: e.guest_addr.0, perm: e.perm }));
                if rows.len() > self.max_entries {
                    return Err(IommuError::TooManyEntries { count: rows.len(), max: self.max_entries });
                }
                table = IotlbTable::from_rows(rows);
            }
            Ok(table)
        })
    }

    /// Unmaps `[iova, iova + size)` (granule aligned, not wrapping): mappings inside it go,
    /// mappings it cuts keep their parts outside. Once this returns, every table taken
    /// afterwards misses the range.
    ///
    /// ```
    /// use guestmem::iommu::{Access, Iotlb, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let iotlb = Iotlb::new();
    /// iotlb.update(Iova(0), 0x3000, GuestAddress(0), Permissions::READ).unwrap();
    /// iotlb.invalidate(Iova(0x1000), 0x1000).unwrap();
    /// let t = iotlb.snapshot();
    /// assert!(t.translate(Iova(0x1800), 1, Access::Read).is_err());
    /// assert!(t.translate(Iova(0x2000), 1, Access::Read).is_ok());
    /// ```
    pub fn invalidate(&self, iova: Iova, size: u64) -> Result<(), IommuError> {
        let last = check_range(iova, size)?;
        self.table.update(|t| {
            let rows = t.without(iova.0, last);
            if rows.len() > self.max_entries {
                // Cutting one mapping in two can add one.
                return Err(IommuError::TooManyEntries { count: rows.len(), max: self.max_entries });
            }
            Ok(IotlbTable::from_rows(rows))
        })
    }

    /// Unmaps everything.
    pub fn invalidate_all(&self) {
        self.table.lock().replace(IotlbTable::default());
    }

    /// The current table (arc-swap's lock-free load): for an occasional translation. A device
    /// thread keeps an [`IotlbCache`] instead.
    pub fn snapshot(&self) -> GuestMemoryGuard<IotlbTable> {
        self.table.memory()
    }

    /// A per-thread cache whose [`table`](IotlbCache::table) costs one atomic load while the
    /// IOTLB is unchanged.
    pub fn cache(&self) -> IotlbCache {
        IotlbCache { cache: self.table.cache() }
    }

    /// How many times the IOTLB changed.
    pub fn generation(&self) -> u64 {
        self.table.generation()
    }
}

/// A device thread's view of an [`Iotlb`]: the current table, reloaded only when the IOTLB
/// changed.
#[derive(Debug)]
pub struct IotlbCache {
    cache: MemoryCache<IotlbTable>,
}

impl IotlbCache {
    /// The current table (one atomic load while nothing changed).
    #[inline(always)]
    pub fn table(&mut self) -> &IotlbTable {
        self.cache.memory()
    }
}
