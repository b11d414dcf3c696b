//! [`GuestMemoryMmap`]: the backend view, and the drop-in for vm-memory's `GuestMemoryMmap<B>`.

use std::borrow::Borrow;
use std::ops::Deref;
use std::sync::Arc;

use vm_memory::bitmap::MS;
use vm_memory::{GuestMemoryBackend, GuestMemoryError as VmMemoryError};

use super::bitmap::BridgeBitmap;
use super::region::{check_writable, GuestRegionMmap};
use super::{vm_slice, Error, PermissionView};
use crate::bitmap::{Bitmap, NewBitmap};
use crate::{GuestAddress, GuestMemory as _, GuestMemoryError, GuestMemoryRegion as _};

/// guestmem memory whose regions are all writable, seen as vm-memory's
/// [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend) (and so, by vm-memory's blanket impl,
/// as its `GuestMemory` and `Bytes<GuestAddress>`): what linux-loader, vfio-ioctls and kernel
/// vhost take.
///
/// It is two things at once:
///
/// - the **backend view** of guestmem memory you already have:
///   [`from_guestmem`](Self::from_guestmem) views it in place (`#[repr(transparent)]`, no
///   copy) and refuses memory with a read-only region; [`writable_part`](Self::writable_part)
///   is a new memory that leaves read-only regions out;
/// - the **drop-in** for `vm_memory::GuestMemoryMmap<B>`:
///   [`from_ranges`](Self::from_ranges), [`from_ranges_with_files`](Self::from_ranges_with_files),
///   [`from_regions`](Self::from_regions), [`insert_region`](Self::insert_region) and
///   [`remove_region`](Self::remove_region) take vm-memory's types and answer as vm-memory does,
///   so swapping one import runs a consumer's tests on guestmem memory.
///
/// Why no read-only region: `GuestMemoryBackend::get_slice` takes no access mode and
/// vm-memory's `VolatileSlice` is always writable, so a backend view of read-only memory would
/// let safe code (linux-loader writing a kernel there) fault. Dereferences to the guestmem
/// memory, for guestmem's own API (harvests, snapshots, migration).
///
/// ```
/// use guestmem::compat::GuestMemoryMmap;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)]).unwrap();
/// mem.write_obj(0xfeed_u16, GuestAddress(0x20010)).unwrap();
/// assert_eq!(mem.read_obj::<u16>(GuestAddress(0x20010)).unwrap(), 0xfeed);
/// assert_eq!(mem.last_addr(), GuestAddress(0x2ffff));
/// assert!(mem.find_region(GuestAddress(0x18000)).is_none());
/// // The guestmem memory underneath, for guestmem's API.
/// assert_eq!(mem.guestmem().regions().len(), 2);
/// ```
#[derive(Debug)]
#[repr(transparent)]
pub struct GuestMemoryMmap<B = ()>(crate::GuestMemoryMmap<B>);

impl<B> Clone for GuestMemoryMmap<B> {
    fn clone(&self) -> Self {
        GuestMemoryMmap(self.0.clone())
    }
}

impl<B: Bitmap> Default for GuestMemoryMmap<B> {
    fn default() -> Self {
        GuestMemoryMmap(crate::GuestMemoryMmap::default())
    }
}

/// `Arc<compat region>` from `Arc<guestmem region>`.
///
/// # Safety
/// The region must be writable.
unsafe fn arc_view<B>(r: Arc<crate::GuestRegionMmap<B>>) -> Arc<GuestRegionMmap<B>> {
    // SAFETY: `GuestRegionMmap<B>` is `#[repr(transparent)]` over the guestmem region, so the
    // pointer from `into_raw` is a valid pointer to a value of the same size and alignment,
    // which is what `Arc::from_raw` asks; writability is the caller's promise.
    unsafe { Arc::from_raw(Arc::into_raw(r).cast::<GuestRegionMmap<B>>()) }
}

/// `Arc<guestmem region>` from `Arc<compat region>`.
fn arc_guestmem<B>(r: Arc<GuestRegionMmap<B>>) -> Arc<crate::GuestRegionMmap<B>> {
    // SAFETY: as in `arc_view`, the other way round (a guestmem region has no invariant).
    unsafe { Arc::from_raw(Arc::into_raw(r).cast::<crate::GuestRegionMmap<B>>()) }
}

impl<B: Bitmap> GuestMemoryMmap<B> {
    /// Memory with no regions (as vm-memory's `GuestRegionCollection::new`).
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend view of guestmem memory, in place; memory with a read-only region is
    /// refused ([`Error::ReadOnlyRegion`] naming the first one).
    ///
    /// ```
    /// use guestmem::mmap::MmapRegionBuilder;
    /// use guestmem::sys::Protection;
    /// use guestmem::{compat, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
    ///
    /// let ram = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x10000), GuestAddress(0)).unwrap();
    /// let rom = MmapRegionBuilder::new(0x1000).protection(Protection::READ);
    /// let rom = GuestRegionMmap::build(rom, GuestAddress(0xf0000)).unwrap();
    /// let mem = GuestMemoryMmap::from_regions(vec![ram, rom]).unwrap();
    /// assert!(matches!(compat::GuestMemoryMmap::from_guestmem(&mem), Err(compat::Error::ReadOnlyRegion { .. })));
    /// // Left out instead: a new memory of the writable regions.
    /// assert_eq!(compat::GuestMemoryMmap::writable_part(&mem).guestmem().regions().len(), 1);
    /// ```
    pub fn from_guestmem(mem: &crate::GuestMemoryMmap<B>) -> Result<&Self, Error> {
        for r in mem.regions() {
            check_writable(r)?;
        }
        // SAFETY: `Self` is `#[repr(transparent)]` over guestmem's memory (same layout), and
        // every region is writable (checked), which is this type's only invariant.
        Ok(unsafe { &*(mem as *const crate::GuestMemoryMmap<B>).cast::<Self>() })
    }

    /// A new memory holding the writable regions of `mem` and leaving read-only ones out (the
    /// regions are shared, not copied).
    pub fn writable_part(mem: &crate::GuestMemoryMmap<B>) -> Self {
        let regions = mem.regions().iter().filter(|r| r.protection().is_writable()).cloned().collect();
        // A subset of non-overlapping regions does not overlap.
        GuestMemoryMmap(crate::GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default())
    }

    /// Memory of regions sorted by guest address, as vm-memory's `from_regions`: an empty list
    /// ([`Error::NoMemoryRegion`]), regions out of order ([`Error::UnsortedRegions`]) and
    /// overlapping regions are refused.
    pub fn from_regions(regions: Vec<GuestRegionMmap<B>>) -> Result<Self, Error> {
        Self::from_arc_regions(regions.into_iter().map(Arc::new).collect())
    }

    /// [`from_regions`](Self::from_regions) for shared regions.
    pub fn from_arc_regions(regions: Vec<Arc<GuestRegionMmap<B>>>) -> Result<Self, Error> {
        if regions.is_empty() {
            return Err(Error::NoMemoryRegion);
        }
        for pair in regions.windows(2) {
            let (first, second) = (pair[0].start_addr(), pair[1].start_addr());
            if first > second {
                return Err(Error::UnsortedRegions { first, second });
            }
        }
        let regions = regions.into_iter().map(arc_guestmem).collect();
        Ok(GuestMemoryMmap(crate::GuestMemoryMmap::from_arc_regions(regions)?))
    }

    /// A new memory with `region` added; `self` is unchanged.
    pub fn insert_region(&self, region: Arc<GuestRegionMmap<B>>) -> Result<Self, Error> {
        Ok(GuestMemoryMmap(self.0.insert_region(arc_guestmem(region))?))
    }

    /// A new memory without the region of `size` bytes at `base`, and that region, as
    /// vm-memory's `remove_region`: a region at `base` of another size is not removed
    /// ([`Error::NoRegion`]).
    pub fn remove_region(
        &self,
        base: vm_memory::GuestAddress,
        size: vm_memory::GuestUsize,
    ) -> Result<(Self, Arc<GuestRegionMmap<B>>), Error> {
        let base: GuestAddress = base.into();
        let (mem, removed) = self.0.remove_region(base, size).map_err(|e| match e {
            GuestMemoryError::NoRegionAt(_) | GuestMemoryError::RegionSizeMismatch { .. } => {
                Error::NoRegion { base, size }
            }
            e => e.into(),
        })?;
        // SAFETY: every region of `self` is writable (this type's invariant).
        Ok((GuestMemoryMmap(mem), unsafe { arc_view(removed) }))
    }

    /// The guestmem memory underneath.
    #[inline]
    pub fn guestmem(&self) -> &crate::GuestMemoryMmap<B> {
        &self.0
    }

    /// The guestmem memory, by value.
    pub fn into_guestmem(self) -> crate::GuestMemoryMmap<B> {
        self.0
    }

    /// The same memory through the permission view (which refuses nothing here, as there is no
    /// read-only region).
    #[inline]
    pub fn as_permission_view(&self) -> &PermissionView<B> {
        PermissionView::new(&self.0)
    }
}

impl<B: NewBitmap> GuestMemoryMmap<B> {
    /// Memory of private anonymous regions at the given `(start, size)` ranges, as vm-memory's
    /// `from_ranges`.
    ///
    /// Any size, as vm-memory (a region of `0x10_0004` bytes ends exactly there, over whole
    /// pages); unlike vm-memory, starts must be multiples of the host page size
    /// ([`Error::NotPageMultiple`], before anything is mapped): see the
    /// [module documentation](super#regions-of-any-length).
    ///
    /// ```
    /// use guestmem::compat::{Error, GuestMemoryMmap};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0004)]).unwrap();
    /// assert_eq!(mem.last_addr(), GuestAddress(0x10_0003));
    /// mem.write_obj(1u32, GuestAddress(0x10_0000)).unwrap();
    /// assert!(mem.write_obj(1u32, GuestAddress(0x10_0001)).is_err());
    /// assert!(matches!(
    ///     GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x800), 0x1000)]),
    ///     Err(Error::NotPageMultiple { .. })
    /// ));
    /// ```
    pub fn from_ranges(ranges: &[(vm_memory::GuestAddress, usize)]) -> Result<Self, Error> {
        Self::from_ranges_with_files(ranges.iter().map(|&(start, size)| (start, size, None)))
    }

    /// Memory of regions at the given ranges, each a shared mapping of its file when one is
    /// given, or private anonymous memory otherwise, as vm-memory's `from_ranges_with_files`.
    pub fn from_ranges_with_files<A, T>(ranges: T) -> Result<Self, Error>
    where
        A: Borrow<(vm_memory::GuestAddress, usize, Option<vm_memory::FileOffset>)>,
        T: IntoIterator<Item = A>,
    {
        let regions = ranges
            .into_iter()
            .map(|r| {
                let (start, size, file) = r.borrow();
                GuestRegionMmap::from_range(*start, *size, file.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_regions(regions)
    }
}

/// The backend view of memory you own; memory with a read-only region is refused.
impl<B: Bitmap> TryFrom<crate::GuestMemoryMmap<B>> for GuestMemoryMmap<B> {
    type Error = Error;

    fn try_from(mem: crate::GuestMemoryMmap<B>) -> Result<Self, Error> {
        Self::from_guestmem(&mem)?;
        Ok(GuestMemoryMmap(mem))
    }
}

impl<B> Deref for GuestMemoryMmap<B> {
    type Target = crate::GuestMemoryMmap<B>;

    #[inline]
    fn deref(&self) -> &crate::GuestMemoryMmap<B> {
        &self.0
    }
}

/// vm-memory's backend trait on guestmem's flat translation table. Accesses by guest address
/// (`Bytes`) are vm-memory's generic code over [`get_slices`](GuestMemoryBackend::get_slices),
/// whose translation is this impl's `to_region_addr`.
impl<B: BridgeBitmap> GuestMemoryBackend for GuestMemoryMmap<B> {
    type R = GuestRegionMmap<B>;

    #[inline]
    fn num_regions(&self) -> usize {
        self.0.num_regions()
    }

    #[inline]
    fn find_region(&self, addr: vm_memory::GuestAddress) -> Option<&GuestRegionMmap<B>> {
        self.to_region_addr(addr).map(|(r, _)| r)
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRegionMmap<B>> {
        // SAFETY: every region is writable (this type's invariant).
        self.0.regions().iter().map(|r| unsafe { GuestRegionMmap::from_ref_unchecked(r) })
    }

    #[inline]
    fn last_addr(&self) -> vm_memory::GuestAddress {
        self.0.last_addr().into()
    }

    #[inline(always)]
    fn to_region_addr(
        &self,
        addr: vm_memory::GuestAddress,
    ) -> Option<(&GuestRegionMmap<B>, vm_memory::MemoryRegionAddress)> {
        let (region, offset) = self.0.to_region_addr(addr.into())?;
        // SAFETY: every region is writable (this type's invariant).
        Some((unsafe { GuestRegionMmap::from_ref_unchecked(region) }, offset.into()))
    }

    #[inline]
    fn address_in_range(&self, addr: vm_memory::GuestAddress) -> bool {
        self.0.to_region_addr(addr.into()).is_some()
    }

    #[inline]
    fn check_address(&self, addr: vm_memory::GuestAddress) -> Option<vm_memory::GuestAddress> {
        self.address_in_range(addr).then_some(addr)
    }

    /// vm-memory's answer: every byte is backed, and an empty range always is.
    #[inline]
    fn check_range(&self, base: vm_memory::GuestAddress, len: usize) -> bool {
        len == 0 || self.0.check_range(base.into(), len)
    }

    #[inline]
    fn get_host_address(&self, addr: vm_memory::GuestAddress) -> vm_memory::GuestMemoryResult<*mut u8> {
        self.0.get_host_address(addr.into()).map_err(|_| VmMemoryError::InvalidGuestAddress(addr))
    }

    /// The slice from guestmem's table; a range past its region's end is vm-memory's
    /// `InvalidBackendAddress`, as for its own regions.
    #[inline]
    fn get_slice(
        &self,
        addr: vm_memory::GuestAddress,
        count: usize,
    ) -> vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'_, MS<'_, Self>>> {
        match self.0.get_slice(addr.into(), count) {
            Ok(s) => vm_slice::<B>(s).ok_or(VmMemoryError::InvalidBackendAddress),
            Err(GuestMemoryError::InvalidGuestAddress(_)) => Err(VmMemoryError::InvalidGuestAddress(addr)),
            Err(_) => Err(VmMemoryError::InvalidBackendAddress),
        }
    }
}
