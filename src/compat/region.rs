//! [`GuestRegionMmap`]: a writable guestmem region as a vm-memory
//! [`GuestMemoryRegion`](vm_memory::GuestMemoryRegion).

use std::ops::Deref;

use vm_memory::bitmap::BS as VmBS;
use vm_memory::{GuestMemoryError as VmMemoryError, GuestMemoryRegionBytes};

use super::bitmap::BridgeBitmap;
use super::{check_placement, Error};
use crate::bitmap::{Bitmap, NewBitmap};
use crate::mmap::{Backing, MmapRegionBuilder};
use crate::GuestMemoryRegion as _;

/// A guestmem [`GuestRegionMmap`](crate::GuestRegionMmap) that is writable, seen as a vm-memory
/// region: the region type of the backend view [`compat::GuestMemoryMmap`](super::GuestMemoryMmap).
///
/// `#[repr(transparent)]` over the guestmem region. It exists only for writable regions,
/// because vm-memory's `GuestMemoryRegion::get_slice` takes no access mode and its slices are
/// always writable: a vm-memory region over read-only memory would let safe code fault.
/// Dereferences to the guestmem region for guestmem's own API (`discard`, `file_offset`, ...).
///
/// ```
/// use guestmem::compat::GuestRegionMmap;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion, MemoryRegionAddress};
///
/// let r = GuestRegionMmap::<()>::from_range(GuestAddress(0x10000), 0x4000, None).unwrap();
/// assert_eq!(r.last_addr(), GuestAddress(0x13fff));
/// r.write_obj(7u16, MemoryRegionAddress(0x3ffe)).unwrap();
/// assert!(r.write_obj(7u32, MemoryRegionAddress(0x3ffe)).is_err());
/// assert!(r.get_slice(MemoryRegionAddress(0x3000), 0x1001).is_err());
/// ```
#[derive(Debug)]
#[repr(transparent)]
pub struct GuestRegionMmap<B = ()>(crate::GuestRegionMmap<B>);

impl<B: Bitmap> GuestRegionMmap<B> {
    /// A vm-memory view of `region`; a read-only region is refused
    /// ([`Error::ReadOnlyRegion`]).
    pub fn new(region: crate::GuestRegionMmap<B>) -> Result<Self, Error> {
        check_writable(&region)?;
        Ok(GuestRegionMmap(region))
    }

    /// The vm-memory view of a region in place; a read-only region is refused.
    ///
    /// ```
    /// use guestmem::mmap::MmapRegionBuilder;
    /// use guestmem::sys::Protection;
    /// use guestmem::{compat, GuestAddress, GuestRegionMmap};
    ///
    /// let rom = MmapRegionBuilder::<()>::new(0x1000).protection(Protection::READ).build().unwrap();
    /// let rom = GuestRegionMmap::new(rom, GuestAddress(0xf0000)).unwrap();
    /// assert!(matches!(compat::GuestRegionMmap::from_ref(&rom), Err(compat::Error::ReadOnlyRegion { .. })));
    /// ```
    pub fn from_ref(region: &crate::GuestRegionMmap<B>) -> Result<&Self, Error> {
        check_writable(region)?;
        // SAFETY: the region is writable (checked), which is this type's only invariant.
        Ok(unsafe { Self::from_ref_unchecked(region) })
    }

    /// The view of a region in place, unchecked.
    ///
    /// # Safety
    /// `region` must be writable: the view hands out vm-memory slices that safe code writes.
    #[inline(always)]
    pub(crate) unsafe fn from_ref_unchecked(region: &crate::GuestRegionMmap<B>) -> &Self {
        // SAFETY: `Self` is `#[repr(transparent)]` over `crate::GuestRegionMmap<B>`: same layout;
        // the reference keeps the borrow of `region`; writability is the caller's promise.
        unsafe { &*(region as *const crate::GuestRegionMmap<B>).cast::<Self>() }
    }

    /// The guestmem region.
    #[inline]
    pub fn guestmem(&self) -> &crate::GuestRegionMmap<B> {
        &self.0
    }

    /// The guestmem region, by value.
    pub fn into_guestmem(self) -> crate::GuestRegionMmap<B> {
        self.0
    }
}

impl<B: NewBitmap> GuestRegionMmap<B> {
    /// A private anonymous region (or a shared mapping of `file`) of `size` bytes at
    /// `addr`, like vm-memory's `GuestRegionMmap::from_range`.
    ///
    /// Any `size`, as vm-memory (the region ends exactly there, over whole pages); unlike
    /// vm-memory, `addr` must be a multiple of the host page size ([`Error::NotPageMultiple`]):
    /// see the module documentation.
    pub fn from_range(
        addr: vm_memory::GuestAddress,
        size: usize,
        file: Option<vm_memory::FileOffset>,
    ) -> Result<Self, Error> {
        let base = addr.into();
        check_placement(base, size)?;
        let backing = match file {
            Some(f) => Backing::File { file: f.into(), shared: true },
            None => Backing::Anonymous { shared: false },
        };
        let region = crate::GuestRegionMmap::build(MmapRegionBuilder::<B>::new(size).backing(backing), base)?;
        Ok(GuestRegionMmap(region))
    }
}

/// Fails with [`Error::ReadOnlyRegion`] unless `region` is writable.
pub(super) fn check_writable<B: Bitmap>(region: &crate::GuestRegionMmap<B>) -> Result<(), Error> {
    if region.protection().is_writable() {
        Ok(())
    } else {
        Err(Error::ReadOnlyRegion { base: region.start_addr(), len: region.len() })
    }
}

impl<B> Deref for GuestRegionMmap<B> {
    type Target = crate::GuestRegionMmap<B>;

    #[inline]
    fn deref(&self) -> &crate::GuestRegionMmap<B> {
        &self.0
    }
}

impl<B: BridgeBitmap> vm_memory::GuestMemoryRegion for GuestRegionMmap<B> {
    type B = B::Face;

    #[inline]
    fn len(&self) -> vm_memory::GuestUsize {
        self.0.len()
    }

    #[inline]
    fn start_addr(&self) -> vm_memory::GuestAddress {
        self.0.start_addr().into()
    }

    #[inline]
    fn bitmap(&self) -> VmBS<'_, B::Face> {
        B::slice_face(self.0.bitmap().slice_at(0))
    }

    #[inline]
    fn get_host_address(
        &self,
        addr: vm_memory::MemoryRegionAddress,
    ) -> vm_memory::GuestMemoryResult<*mut u8> {
        self.0.get_host_address(addr.into()).map_err(|_| VmMemoryError::InvalidBackendAddress)
    }

    /// Always `None`: guestmem's `FileOffset` is not vm-memory's, and this trait hands out a
    /// reference. The file is on the guestmem region: `region.guestmem().file_offset()`.
    fn file_offset(&self) -> Option<&vm_memory::FileOffset> {
        None
    }

    /// Out of the region is vm-memory's `InvalidBackendAddress`, as for its own regions.
    #[inline]
    fn get_slice(
        &self,
        offset: vm_memory::MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'_, VmBS<'_, B::Face>>> {
        // Checked here rather than through guestmem's slice: the fewer instructions, the more
        // of vm-memory's generic access path the compiler inlines around this call.
        match offset.0.checked_add(count as u64) {
            Some(end) if end <= self.0.len() => {}
            _ => return Err(VmMemoryError::InvalidBackendAddress),
        }
        let at = offset.0 as usize;
        let bitmap = B::slice_face(self.0.bitmap().slice_at(at));
        // SAFETY: `[at, at + count)` lies inside the region (checked above), whose mapping lives
        // as long as the borrow of `self`; the region is writable (this type's invariant), so a
        // vm-memory slice, which allows writes, is sound; guestmem and vm-memory access guest
        // memory only with volatile accesses and raw copies, never through Rust references. The
        // bitmap slice marks the region's guestmem bitmap at the slice's offset.
        Ok(unsafe { vm_memory::VolatileSlice::with_bitmap(self.0.host_ptr().add(at), count, bitmap, None) })
    }

    fn is_hugetlbfs(&self) -> Option<bool> {
        Some(self.0.is_hugetlbfs())
    }
}

/// Region-relative `Bytes` is vm-memory's generic one over [`get_slice`](vm_memory::GuestMemoryRegion::get_slice).
impl<B: BridgeBitmap> GuestMemoryRegionBytes for GuestRegionMmap<B> {}
