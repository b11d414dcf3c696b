//! A region of guest memory placed at a guest-physical address: the [`GuestMemoryRegion`]
//! trait and its mmap implementation, [`GuestRegionMmap`].
//!
//! ```
//! use guestmem::{Bytes, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};
//! use guestmem::mmap::MmapRegionBuilder;
//!
//! let mapping = MmapRegionBuilder::<()>::new(0x10000).build().unwrap();
//! let region = GuestRegionMmap::new(mapping, GuestAddress(0x1_0000_0000)).unwrap();
//! assert_eq!(region.last_addr(), GuestAddress(0x1_0000_ffff));
//! assert_eq!(region.to_region_addr(GuestAddress(0x1_0000_0010)), Some(MemoryRegionAddress(0x10)));
//! region.write_obj(3u32, MemoryRegionAddress(0x10)).unwrap();
//! ```

use std::mem::size_of;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::address::{Address, GuestAddress, GuestUsize, MemoryRegionAddress};
use crate::bitmap::Bitmap;
use crate::bitmap::NewBitmap;
use crate::bytes::{AtomicAccess, ByteValued, Bytes};
use crate::mmap::{FileOffset, MmapError, MmapRegion, MmapRegionBuilder};
use crate::sys::Protection;
use crate::volatile::{ReadVolatile, VolatileError, VolatileMemory, VolatileSlice, WriteVolatile};

/// Errors of guest memory: translation, access and region management. Each names the guest
/// address it is about.
///
/// Defined with the regions (the lower layer) and re-exported by [`memory`](crate::memory), so
/// that the layers depend on each other in one direction only.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    /// No region holds the address.
    #[error("guest address {0} is not in any region")]
    InvalidGuestAddress(GuestAddress),
    /// The range starts in guest memory but runs into a hole or past the last region.
    #[error("guest range of {len:#x} bytes at {addr} is not entirely backed by memory")]
    InvalidRange {
        /// Start of the range.
        addr: GuestAddress,
        /// Length of the range.
        len: usize,
    },
    /// The range wraps past the top of the 64-bit guest address space.
    #[error("guest range of {len:#x} bytes at {addr} wraps past the end of the address space")]
    Overflow {
        /// Start of the range.
        addr: GuestAddress,
        /// Length of the range.
        len: usize,
    },
    /// A single-region slice was asked for a range that spans several regions.
    #[error("guest range of {len:#x} bytes at {addr} spans more than one region")]
    NotContiguous {
        /// Start of the range.
        addr: GuestAddress,
        /// Length of the range.
        len: usize,
    },
    /// A write to a region without write access.
    #[error("write of {len:#x} bytes at {addr} hits read-only memory")]
    ReadOnly {
        /// Start of the write.
        addr: GuestAddress,
        /// Length of the write.
        len: usize,
    },
    /// A transfer with a file or socket stopped early (end of file, closed peer).
    #[error("transfer at {addr} stopped after {completed:#x} of {expected:#x} bytes")]
    PartialBuffer {
        /// Where the transfer started.
        addr: GuestAddress,
        /// Bytes it had to move.
        expected: usize,
        /// Bytes it moved.
        completed: usize,
    },
    /// An access within a region failed (a misaligned atomic, an I/O error).
    #[error("access at {addr} failed: {source}")]
    Access {
        /// Guest address of the access.
        addr: GuestAddress,
        /// What failed.
        source: VolatileError,
    },
    /// A region placement that wraps past the top of the 64-bit guest address space (or a
    /// region of length 0).
    #[error("region of {len:#x} bytes at {base} does not fit in the guest address space")]
    RegionOverflow {
        /// Where the region was to start.
        base: GuestAddress,
        /// Its length.
        len: GuestUsize,
    },
    /// Two regions overlap.
    #[error("region [{first_start}, +{first_len:#x}) overlaps region [{second_start}, +{second_len:#x})")]
    RegionOverlap {
        /// Start of the first region.
        first_start: GuestAddress,
        /// Length of the first region.
        first_len: GuestUsize,
        /// Start of the second region.
        second_start: GuestAddress,
        /// Length of the second region.
        second_len: GuestUsize,
    },
    /// A region placed at a guest address that is not a multiple of the host page size: its
    /// guest addresses and host addresses would then disagree on alignment, and an aligned
    /// guest access (an atomic, a virtio ring index) would be misaligned on the host, or torn.
    #[error("region at {base} is not aligned to the page size {align:#x}")]
    UnalignedRegion {
        /// Where the region was to start.
        base: GuestAddress,
        /// The alignment a region's guest address needs.
        align: u64,
    },
    /// An access at an offset inside one region that runs past the region's end.
    #[error("access of {len:#x} bytes at offset {offset} of the region at {base} runs past its end ({size:#x} bytes)")]
    InvalidRegionOffset {
        /// The region's first guest address.
        base: GuestAddress,
        /// The offset in the region.
        offset: MemoryRegionAddress,
        /// Bytes accessed.
        len: usize,
        /// The region's size.
        size: GuestUsize,
    },
    /// Two regions that map the same bytes of the same file (or memfd), or share host memory
    /// (the same mapping twice, `GuestRegionMmap::with_arc`): a write through one would be
    /// harvested, snapshotted and migrated at the other's guest addresses never, or only once.
    #[error("regions at {first_start} and {second_start} map the same memory")]
    RegionAlias {
        /// Start of the first region.
        first_start: GuestAddress,
        /// Start of the second region.
        second_start: GuestAddress,
    },
    /// No region starts at the address given to `remove_region`.
    #[error("no region starts at {0}")]
    NoRegionAt(GuestAddress),
    /// `remove_region` of a size that is not the size of the region at that address (as
    /// vm-memory's `remove_region`, which takes the size too, nothing is removed).
    #[error("the region at {base} has {region_len:#x} bytes, not {size:#x}")]
    RegionSizeMismatch {
        /// The region's start.
        base: GuestAddress,
        /// The size given.
        size: GuestUsize,
        /// The region's size.
        region_len: GuestUsize,
    },
    /// A region length that is not the first bytes of its mapping with only the last page
    /// partial (`GuestRegionMmap::with_len`).
    #[error("a region of {len:#x} bytes at {base} does not fit a mapping of {mapping_size:#x} bytes (its length rounded up to the page size)")]
    InvalidRegionLength {
        /// Where the region was to start.
        base: GuestAddress,
        /// Its length.
        len: GuestUsize,
        /// The mapping's size.
        mapping_size: GuestUsize,
    },
    /// A region type of a VMM's own (in a `GuestRegionCollection`) whose start, length or
    /// bitmap differ from those of the `GuestRegionMmap` it gives: the collection would
    /// translate with one and harvest the other.
    #[error("the region at {base} answers differently from the GuestRegionMmap it holds")]
    InconsistentRegion {
        /// The region's start, as it gives it.
        base: GuestAddress,
    },
    /// Building a region's mapping failed.
    #[error("mapping a region at {base} failed: {source}")]
    Mmap {
        /// Where the region was to be placed.
        base: GuestAddress,
        /// Why.
        source: MmapError,
    },
    /// A region-relative transfer that stopped early, from a provided method of
    /// [`Bytes<MemoryRegionAddress>`](crate::Bytes) (a region type that implements only the
    /// primitives; guestmem's regions name the guest address instead, as `PartialBuffer`).
    #[error("transfer at region offset {offset} stopped after {completed:#x} of {expected:#x} bytes")]
    PartialRegionBuffer {
        /// Where the transfer started, in the region.
        offset: MemoryRegionAddress,
        /// Bytes it had to move.
        expected: usize,
        /// Bytes it moved.
        completed: usize,
    },
}

/// A short transfer by guest address.
impl From<crate::bytes::PartialBuffer<GuestAddress>> for GuestMemoryError {
    fn from(p: crate::bytes::PartialBuffer<GuestAddress>) -> Self {
        GuestMemoryError::PartialBuffer { addr: p.addr, expected: p.expected, completed: p.completed }
    }
}

/// A short transfer by region offset.
impl From<crate::bytes::PartialBuffer<MemoryRegionAddress>> for GuestMemoryError {
    fn from(p: crate::bytes::PartialBuffer<MemoryRegionAddress>) -> Self {
        GuestMemoryError::PartialRegionBuffer { offset: p.addr, expected: p.expected, completed: p.completed }
    }
}

impl GuestMemoryError {
    /// The guest-memory form of a volatile error at `addr`.
    pub(crate) fn from_volatile(addr: GuestAddress, source: VolatileError) -> Self {
        match source {
            VolatileError::ReadOnly { len, .. } => GuestMemoryError::ReadOnly { addr, len },
            VolatileError::OutOfBounds { len, .. } => GuestMemoryError::InvalidRange { addr, len },
            VolatileError::Overflow { len, .. } => GuestMemoryError::Overflow { addr, len },
            VolatileError::PartialBuffer { expected, completed } => {
                GuestMemoryError::PartialBuffer { addr, expected, completed }
            }
            source => GuestMemoryError::Access { addr, source },
        }
    }
}

/// The bitmap slice type of a bitmap `B`.
pub type BS<'a, B> = <B as Bitmap>::Slice<'a>;

/// A contiguous piece of guest memory at a guest-physical address.
pub trait GuestMemoryRegion {
    /// The dirty bitmap of the region.
    type B: Bitmap;

    /// The size in bytes.
    fn len(&self) -> GuestUsize;

    /// The guest address of the first byte.
    fn start_addr(&self) -> GuestAddress;

    /// The protection (a write to a region without `WRITE` is refused).
    fn protection(&self) -> Protection;

    /// The dirty bitmap.
    fn bitmap(&self) -> &Self::B;

    /// The file behind the region, if any.
    fn file_offset(&self) -> Option<&FileOffset>;

    /// The host address of the region's first byte. Writes through it are not tracked.
    fn host_ptr(&self) -> *mut u8;

    /// The `count` bytes at `offset` as one slice.
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, Self::B>>, GuestMemoryError>;

    /// Whether the size is 0 (never, for regions guestmem builds).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The guest address of the last byte.
    fn last_addr(&self) -> GuestAddress {
        // A region is never empty, and its placement was checked not to wrap.
        GuestAddress(self.start_addr().0.wrapping_add(self.len().saturating_sub(1)))
    }

    /// `addr` if it lies inside the region.
    fn check_address(&self, addr: MemoryRegionAddress) -> Option<MemoryRegionAddress> {
        self.address_in_range(addr).then_some(addr)
    }

    /// Whether `addr` lies inside the region.
    ///
    /// ```
    /// use guestmem::{GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};
    /// let r = GuestRegionMmap::build(guestmem::mmap::MmapRegionBuilder::<()>::new(0x1000), GuestAddress(0)).unwrap();
    /// assert!(r.address_in_range(MemoryRegionAddress(0xfff)) && !r.address_in_range(MemoryRegionAddress(0x1000)));
    /// assert_eq!(r.checked_offset(MemoryRegionAddress(0xff0), 0xf), Some(MemoryRegionAddress(0xfff)));
    /// assert_eq!(r.checked_offset(MemoryRegionAddress(0xff0), 0x10), None);
    /// ```
    fn address_in_range(&self, addr: MemoryRegionAddress) -> bool {
        addr.0 < self.len()
    }

    /// `base + offset` if that lies inside the region (`None` past it, or if it wraps).
    fn checked_offset(&self, base: MemoryRegionAddress, offset: usize) -> Option<MemoryRegionAddress> {
        base.checked_add(offset as u64).and_then(|a| self.check_address(a))
    }

    /// The offset of guest address `addr` in the region, if it lies inside.
    fn to_region_addr(&self, addr: GuestAddress) -> Option<MemoryRegionAddress> {
        addr.checked_offset_from(self.start_addr()).and_then(|o| self.check_address(MemoryRegionAddress(o)))
    }

    /// The host address of `offset` in the region. Writes through it are not tracked: mark
    /// them with [`Bitmap::mark_dirty`].
    fn get_host_address(&self, offset: MemoryRegionAddress) -> Result<*mut u8, GuestMemoryError> {
        let off = self.check_address(offset).ok_or_else(|| GuestMemoryError::InvalidRegionOffset {
            base: self.start_addr(),
            offset,
            len: 1,
            size: self.len(),
        })?;
        // `off < len`, and the region's host mapping spans `len` bytes.
        Ok(self.host_ptr().wrapping_add(off.0 as usize))
    }
}

/// A guest memory region backed by an [`MmapRegion`].
///
/// The mapping is shared (`Arc`): [`with_arc`](Self::with_arc) places a mapping another region
/// has at a new guest address ([`get_mmap`](Self::get_mmap)), as vm-memory's do, for a VMM that
/// moves memory in the guest's address space (a remapped BAR, a resized window) without
/// copying it. The region is the mapping's first [`len`](GuestMemoryRegion::len) bytes: the
/// mapping's size rounded up to the page size (a region need not be a page multiple: see
/// [`with_len`](Self::with_len)).
///
/// Dereferences to the mapping for its accessors (`discard`, `resident_pages`, `size`, ...),
/// which work on the whole mapping.
#[derive(Debug)]
pub struct GuestRegionMmap<B = ()> {
    mapping: Arc<MmapRegion<B>>,
    guest_base: GuestAddress,
    /// The region's length: the mapping's size, or less within its last page.
    len: GuestUsize,
    /// The region KVM maps in this one's place (a block group of a plug-state device).
    kvm_group: Option<Arc<GuestRegionMmap<B>>>,
}

impl<B: Bitmap> GuestRegionMmap<B> {
    /// Places `mapping` at `guest_base`, which must be a multiple of the host page size
    /// ([`GuestMemoryError::UnalignedRegion`] otherwise: guest and host addresses then agree on
    /// every alignment up to a page, so an 8-byte-aligned guest address is an 8-byte-aligned
    /// host address and its accesses cannot tear). The region may end exactly at the top of the
    /// 64-bit guest address space, but not wrap past it.
    ///
    /// ```
    /// use guestmem::{GuestAddress, GuestMemoryError, GuestRegionMmap};
    /// use guestmem::mmap::MmapRegionBuilder;
    /// let map = || MmapRegionBuilder::<()>::new(0x1000).build().unwrap();
    /// assert!(GuestRegionMmap::new(map(), GuestAddress(0x1_0000_0000)).is_ok());
    /// let e = GuestRegionMmap::new(map(), GuestAddress(0x1_0000_0004)).unwrap_err();
    /// assert!(matches!(e, GuestMemoryError::UnalignedRegion { .. }));
    /// ```
    pub fn new(mapping: MmapRegion<B>, guest_base: GuestAddress) -> Result<Self, GuestMemoryError> {
        Self::with_arc(Arc::new(mapping), guest_base)
    }

    /// [`new`](Self::new) for a shared mapping (vm-memory's name): the same memory, placed at
    /// `guest_base`. With [`get_mmap`](Self::get_mmap), it re-places a region's memory at
    /// another guest address.
    ///
    /// Two regions of one guest memory may not share memory
    /// ([`GuestMemoryError::RegionAlias`]; vm-memory allows it): a dirty page would be
    /// harvested once, at one of its guest addresses, and a snapshot or migration would
    /// restore the other address from stale data. Re-place a mapping in the *next* memory,
    /// without the old region.
    ///
    /// ```
    /// use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap};
    /// use std::sync::Arc;
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0xe000_0000), 0x10000)]).unwrap();
    /// mem.write_obj(7u32, GuestAddress(0xe000_0010)).unwrap();
    /// // The guest moved the window: the same memory at a new address, nothing copied.
    /// let (rest, old) = mem.remove_region(GuestAddress(0xe000_0000), 0x10000).unwrap();
    /// let moved = GuestRegionMmap::with_arc(old.get_mmap(), GuestAddress(0xf000_0000)).unwrap();
    /// let mem = rest.insert_region(Arc::new(moved)).unwrap();
    /// assert_eq!(mem.read_obj::<u32>(GuestAddress(0xf000_0010)).unwrap(), 7);
    /// ```
    pub fn with_arc(mapping: Arc<MmapRegion<B>>, guest_base: GuestAddress) -> Result<Self, GuestMemoryError> {
        let len = mapping.size() as u64;
        Self::with_len(mapping, guest_base, len)
    }

    /// A region of the first `len` bytes of a shared mapping, at `guest_base`: for a region
    /// whose length is not a page multiple (vm-memory accepts one of `0x10_0004` bytes; its
    /// mmap rounds up to the page too). The mapping must be `len` rounded up to the host page
    /// size ([`GuestMemoryError::InvalidRegionLength`] otherwise), so the region has the
    /// mapping's pages: its dirty bitmap, snapshots and migration see whole pages whose last
    /// one is partial, every access stops at `len`, and the bytes of the last page past `len`
    /// are not guest memory. [`build`](Self::build) and `from_ranges` make such regions from
    /// a length that is not a page multiple.
    ///
    /// Such a region cannot be a KVM memslot: KVM takes whole pages only, and
    /// `KvmSlots::register` fails for it (the kernel refuses the slot).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use guestmem::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};
    /// use guestmem::mmap::MmapRegionBuilder;
    /// let mapping = Arc::new(MmapRegionBuilder::<()>::new(0x10_1000).build().unwrap());
    /// let r = GuestRegionMmap::with_len(mapping.clone(), GuestAddress(0), 0x10_0004).unwrap();
    /// assert_eq!((r.len(), r.size()), (0x10_0004, 0x10_1000));
    /// r.write_obj(1u32, MemoryRegionAddress(0x10_0000)).unwrap();
    /// assert!(r.write_obj(1u32, MemoryRegionAddress(0x10_0002)).is_err());
    /// let e = GuestRegionMmap::with_len(mapping, GuestAddress(0), 0x10_0000).unwrap_err();
    /// assert!(matches!(e, GuestMemoryError::InvalidRegionLength { .. }));
    /// ```
    pub fn with_len(
        mapping: Arc<MmapRegion<B>>,
        guest_base: GuestAddress,
        len: GuestUsize,
    ) -> Result<Self, GuestMemoryError> {
        check_placement(guest_base, len)?;
        check_len(guest_base, len, &mapping)?;
        Ok(GuestRegionMmap { mapping, guest_base, len, kvm_group: None })
    }

    /// The shared mapping behind the region (vm-memory's name), to place it elsewhere with
    /// [`with_arc`](Self::with_arc).
    pub fn get_mmap(&self) -> Arc<MmapRegion<B>> {
        self.mapping.clone()
    }

    /// A region that KVM maps as part of `group` (a larger region holding it, at the same
    /// host and guest offsets), not on its own.
    pub(crate) fn in_kvm_group(
        mapping: MmapRegion<B>,
        guest_base: GuestAddress,
        group: Arc<GuestRegionMmap<B>>,
    ) -> Result<Self, GuestMemoryError> {
        let len = mapping.size() as u64;
        check_placement(guest_base, len)?;
        Ok(GuestRegionMmap { mapping: Arc::new(mapping), guest_base, len, kvm_group: Some(group) })
    }

    /// The region KVM should map in this one's place, if any: the block group of a plug-state
    /// device ([`plug`](crate::plug)) that this region (a run of plugged blocks) is part of.
    /// A memslot per group, not per run, keeps the slots still while blocks are plugged and
    /// unplugged inside it; `KvmSlots` follows it.
    pub fn kvm_group(&self) -> Option<&Arc<GuestRegionMmap<B>>> {
        self.kvm_group.as_ref()
    }

    /// The mapping behind the region.
    pub fn mapping(&self) -> &MmapRegion<B> {
        &self.mapping
    }

    /// The region as one slice (its `len` bytes: not the rest of a partial last page).
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_, BS<'_, B>> {
        // SAFETY: `len <= mapping.size()` (checked when the region was made), so this is the
        // start of the mapping, which lives while `self` holds its `Arc`; it is writable
        // exactly when the protection says so, which the slice is told, as in
        // `MmapRegion::as_volatile_slice`. No reference to it is made.
        unsafe {
            VolatileSlice::with_bitmap(
                self.mapping.as_ptr(),
                self.len as usize,
                self.mapping.bitmap().slice_at(0),
                self.mapping.protection().is_writable(),
            )
        }
    }

    /// The slice `[offset, offset + count)`, or an error naming the guest address.
    #[inline]
    fn slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, B>>, GuestMemoryError> {
        let at = usize::try_from(offset.0).unwrap_or(usize::MAX);
        crate::volatile::check_range(at, count, self.len as usize)
            .and_then(|_| self.mapping.get_slice(at, count))
            .map_err(|e| self.error(offset, e))
    }

    /// The error of an access at `offset` of the region: an offset or length past the region's
    /// end is [`GuestMemoryError::InvalidRegionOffset`] (there is no guest address to name);
    /// anything else names the guest address, which then lies in the region.
    fn error(&self, offset: MemoryRegionAddress, source: VolatileError) -> GuestMemoryError {
        match source {
            VolatileError::OutOfBounds { len, .. } | VolatileError::Overflow { len, .. } => {
                GuestMemoryError::InvalidRegionOffset { base: self.guest_base, offset, len, size: self.len() }
            }
            source => match self.guest_base.0.checked_add(offset.0) {
                Some(addr) if offset.0 < self.len() => {
                    GuestMemoryError::from_volatile(GuestAddress(addr), source)
                }
                _ => GuestMemoryError::InvalidRegionOffset {
                    base: self.guest_base,
                    offset,
                    len: 0,
                    size: self.len(),
                },
            },
        }
    }
}

/// Checks that a region of `len` bytes is the first bytes of `mapping`, whose size is `len`
/// rounded up to the host page size.
fn check_len<B>(
    base: GuestAddress,
    len: GuestUsize,
    mapping: &MmapRegion<B>,
) -> Result<(), GuestMemoryError> {
    let mapping_size = mapping.size() as u64;
    let page = crate::sys::page_size() as u64;
    if len > mapping_size || len.checked_next_multiple_of(page) != Some(mapping_size) {
        return Err(GuestMemoryError::InvalidRegionLength { base, len, mapping_size });
    }
    Ok(())
}

/// Checks that a region of `len` bytes can start at `base`: not empty, page aligned, not
/// wrapping past the top of the guest address space.
fn check_placement(base: GuestAddress, len: GuestUsize) -> Result<(), GuestMemoryError> {
    if len == 0 || base.0.checked_add(len - 1).is_none() {
        return Err(GuestMemoryError::RegionOverflow { base, len });
    }
    let align = crate::sys::page_size() as u64;
    if !base.0.is_multiple_of(align) {
        return Err(GuestMemoryError::UnalignedRegion { base, align });
    }
    Ok(())
}

impl<B: NewBitmap> GuestRegionMmap<B> {
    /// Builds the mapping described by `builder` and places it at `guest_base`, checking the
    /// placement before anything is mapped.
    ///
    /// A size that is not a multiple of the host page size makes a region of exactly that
    /// length over a mapping rounded up to the page ([`with_len`](Self::with_len)); a file
    /// backing must then cover the rounded-up mapping. (The builder alone refuses such a size:
    /// a mapping is whole pages.)
    ///
    /// ```
    /// use guestmem::{GuestAddress, GuestMemoryRegion, GuestRegionMmap};
    /// use guestmem::mmap::MmapRegionBuilder;
    /// let r = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x1000), GuestAddress(0x4000)).unwrap();
    /// assert_eq!(r.last_addr(), GuestAddress(0x4fff));
    /// assert!(GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x2000), GuestAddress(u64::MAX)).is_err());
    /// let odd = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x1004), GuestAddress(0)).unwrap();
    /// assert_eq!((odd.len(), odd.size()), (0x1004, 0x2000));
    /// ```
    pub fn build(builder: MmapRegionBuilder<B>, guest_base: GuestAddress) -> Result<Self, GuestMemoryError> {
        let size = builder.size();
        let len = size as u64;
        if len != 0 {
            check_placement(guest_base, len)?;
        }
        // A partial last page is mapped whole (a size too close to usize::MAX to round is left
        // for the builder to refuse).
        let builder = match size.checked_next_multiple_of(crate::sys::page_size()) {
            Some(rounded) if rounded != size => builder.with_size(rounded),
            _ => builder,
        };
        let mapping =
            builder.build().map_err(|source| GuestMemoryError::Mmap { base: guest_base, source })?;
        Self::with_len(Arc::new(mapping), guest_base, len)
    }
}

impl<B> Deref for GuestRegionMmap<B> {
    type Target = MmapRegion<B>;

    fn deref(&self) -> &MmapRegion<B> {
        &self.mapping
    }
}

impl<B: Bitmap> GuestMemoryRegion for GuestRegionMmap<B> {
    type B = B;

    #[inline]
    fn len(&self) -> GuestUsize {
        self.len
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        self.guest_base
    }

    fn protection(&self) -> Protection {
        self.mapping.protection()
    }

    fn bitmap(&self) -> &B {
        self.mapping.bitmap()
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.mapping.file_offset()
    }

    fn host_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, B>>, GuestMemoryError> {
        self.slice(offset, count)
    }
}

/// Region-relative access: every call is one region, bounds checked against it.
impl<B: Bitmap> Bytes<MemoryRegionAddress> for GuestRegionMmap<B> {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize, GuestMemoryError> {
        let at = usize::try_from(addr.0).unwrap_or(usize::MAX);
        self.as_volatile_slice().write(buf, at).map_err(|e| self.error(addr, e))
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize, GuestMemoryError> {
        let at = usize::try_from(addr.0).unwrap_or(usize::MAX);
        self.as_volatile_slice().read(buf, at).map_err(|e| self.error(addr, e))
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<(), GuestMemoryError> {
        self.slice(addr, buf.len())?.write_slice(buf, 0).map_err(|e| self.error(addr, e))
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<(), GuestMemoryError> {
        self.slice(addr, buf.len())?.read_slice(buf, 0).map_err(|e| self.error(addr, e))
    }

    fn write_obj<T: ByteValued>(&self, val: T, addr: MemoryRegionAddress) -> Result<(), GuestMemoryError> {
        self.slice(addr, size_of::<T>())?.write_obj(val, 0).map_err(|e| self.error(addr, e))
    }

    fn read_obj<T: ByteValued>(&self, addr: MemoryRegionAddress) -> Result<T, GuestMemoryError> {
        self.slice(addr, size_of::<T>())?.read_obj(0).map_err(|e| self.error(addr, e))
    }

    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, GuestMemoryError> {
        let at = usize::try_from(addr.0).unwrap_or(usize::MAX);
        self.as_volatile_slice().read_volatile_from(at, src, count).map_err(|e| self.error(addr, e))
    }

    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), GuestMemoryError> {
        src.read_exact_volatile(&self.slice(addr, count)?).map_err(|e| self.error(addr, e))
    }

    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, GuestMemoryError> {
        let at = usize::try_from(addr.0).unwrap_or(usize::MAX);
        self.as_volatile_slice().write_volatile_to(at, dst, count).map_err(|e| self.error(addr, e))
    }

    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), GuestMemoryError> {
        dst.write_all_volatile(&self.slice(addr, count)?).map_err(|e| self.error(addr, e))
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<(), GuestMemoryError> {
        self.slice(addr, size_of::<T>())?.store(val, 0, order).map_err(|e| self.error(addr, e))
    }

    fn load<T: AtomicAccess>(
        &self,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<T, GuestMemoryError> {
        self.slice(addr, size_of::<T>())?.load(0, order).map_err(|e| self.error(addr, e))
    }
}
