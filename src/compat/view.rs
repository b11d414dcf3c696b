//! [`PermissionView`]: any guestmem memory as vm-memory's permission-aware
//! [`GuestMemory`](vm_memory::GuestMemory), and its slice iterator [`Slices`].

use std::io;
use std::iter::FusedIterator;
use std::ops::Deref;

use vm_memory::bitmap::BS as VmBS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestMemoryError as VmMemoryError, Permissions};

use super::bitmap::BridgeBitmap;
use super::{vm_slice, Error, GuestMemoryMmap};
use crate::{GuestAddress, GuestMemory as _, GuestMemoryError, GuestMemoryRegion as _, GuestSlice};

/// Any guestmem memory, read-only regions included, seen as vm-memory's permission-aware
/// [`GuestMemory`](vm_memory::GuestMemory) (and so, by vm-memory's blanket impl, as its
/// `Bytes<GuestAddress>`): what virtio-queue, virtio-vsock and the vm-virtio devices take.
///
/// `#[repr(transparent)]` over [`crate::GuestMemoryMmap`]: [`PermissionView::new`] views
/// memory in place, no copy. Translation is guestmem's flat table; the slices are vm-memory
/// `VolatileSlice`s over guestmem's mappings that carry guestmem's bitmap
/// ([`SliceFace`](super::SliceFace)), so a device's writes show up in guestmem's harvests.
///
/// Read-only regions are not reachable through the view, for any access: vm-memory's
/// `VolatileSlice` has no read-only mode, so a slice handed out even for
/// `Permissions::Read` could be written by safe code and fault. Such an access fails with
/// vm-memory's `IOError` of kind `PermissionDenied`, which carries
/// [`Error::ReadOnlyAccess`] naming the address (a device given a descriptor into ROM errors
/// out instead of crashing). Read ROM through guestmem's own API.
///
/// ```
/// use guestmem::compat::PermissionView;
/// use guestmem::mmap::MmapRegionBuilder;
/// use guestmem::sys::Protection;
/// use guestmem::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
/// use vm_memory::{Bytes, GuestMemory, Permissions};
///
/// let ram = GuestRegionMmap::build(MmapRegionBuilder::<()>::new(0x10000), GuestAddress(0)).unwrap();
/// let rom = MmapRegionBuilder::new(0x1000).protection(Protection::READ);
/// let rom = GuestRegionMmap::build(rom, GuestAddress(0xf0000)).unwrap();
/// let mem = GuestMemoryMmap::from_regions(vec![ram, rom]).unwrap();
///
/// let view = PermissionView::new(&mem);
/// view.store(3u16, vm_memory::GuestAddress(0x100), std::sync::atomic::Ordering::Release).unwrap();
/// assert!(view.check_range(vm_memory::GuestAddress(0), 0x10000, Permissions::ReadWrite));
/// assert!(!view.check_range(vm_memory::GuestAddress(0xf0000), 4, Permissions::Write));
/// assert!(view.write_obj(1u32, vm_memory::GuestAddress(0xf0000)).is_err()); // an error, not SIGSEGV
/// ```
#[derive(Debug)]
#[repr(transparent)]
pub struct PermissionView<B = ()>(crate::GuestMemoryMmap<B>);

impl<B> Clone for PermissionView<B> {
    fn clone(&self) -> Self {
        PermissionView(self.0.clone())
    }
}

impl<B> PermissionView<B> {
    /// The view of `mem`, in place.
    #[inline(always)]
    pub fn new(mem: &crate::GuestMemoryMmap<B>) -> &Self {
        // SAFETY: `Self` is `#[repr(transparent)]` over guestmem's memory (same layout) and has
        // no invariant of its own; the reference keeps the borrow of `mem`.
        unsafe { &*(mem as *const crate::GuestMemoryMmap<B>).cast::<Self>() }
    }

    /// The view of memory you own (to hold in a device or send to another thread).
    pub fn from_guestmem(mem: crate::GuestMemoryMmap<B>) -> Self {
        PermissionView(mem)
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
}

impl<B> Deref for PermissionView<B> {
    type Target = crate::GuestMemoryMmap<B>;

    #[inline]
    fn deref(&self) -> &crate::GuestMemoryMmap<B> {
        &self.0
    }
}

impl<B: BridgeBitmap> vm_memory::GuestMemory for PermissionView<B> {
    type PhysicalMemory = GuestMemoryMmap<B>;
    type Bitmap = B::Face;

    /// Whether every byte of the range is backed by memory that the view can hand out (not
    /// read-only); an empty range always is, as in vm-memory.
    #[inline]
    fn check_range(&self, addr: vm_memory::GuestAddress, count: usize, access: Permissions) -> bool {
        Slices::new(&self.0, addr, count, access).all(|s| s.is_ok())
    }

    #[inline(always)]
    fn get_slices<'a>(
        &'a self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, VmBS<'a, B::Face>>> {
        Ok(Slices::new(&self.0, addr, count, access))
    }

    /// The backend view of the same memory when it has no read-only region, else `None`.
    fn physical_memory(&self) -> Option<&GuestMemoryMmap<B>> {
        GuestMemoryMmap::from_guestmem(&self.0).ok()
    }
}

/// The slices of a guest range through a [`PermissionView`], one per region crossed, as
/// vm-memory's `GuestMemory::get_slices` promises: they add up to the range, or the iterator
/// yields one error (where the range leaves memory, reaches read-only memory, or would wrap
/// past 2^64) and then ends.
///
/// A range inside one region (every virtqueue access) is one lookup in guestmem's table; the
/// walk across regions is the cold path.
#[derive(Debug)]
pub struct Slices<'a, B> {
    mem: &'a crate::GuestMemoryMmap<B>,
    addr: u64,
    left: usize,
    access: Permissions,
    /// The last slice ended at 2^64 with bytes left.
    wrapped: bool,
}

impl<'a, B: BridgeBitmap> Slices<'a, B> {
    #[inline(always)]
    fn new(
        mem: &'a crate::GuestMemoryMmap<B>,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Self {
        Slices { mem, addr: addr.0, left: count, access, wrapped: false }
    }

    /// The vm-memory slice of `s`, or (ending the iteration) the error for read-only memory.
    #[inline(always)]
    fn convert(&mut self, s: GuestSlice<'a, crate::GuestMemoryMmap<B>>) -> <Self as Iterator>::Item {
        let len = s.len();
        match vm_slice::<B>(s) {
            Some(s) => Ok(s),
            None => {
                self.left = 0;
                Err(read_only(GuestAddress(self.addr), len, self.access))
            }
        }
    }

    /// The part of the range in the region holding `addr`, when the range goes on past it.
    #[cold]
    #[inline(never)]
    fn next_across(&mut self) -> Option<<Self as Iterator>::Item> {
        let addr = GuestAddress(self.addr);
        let Some((region, offset)) = self.mem.to_region_addr(addr) else {
            self.left = 0;
            return Some(Err(VmMemoryError::InvalidGuestAddress(addr.into())));
        };
        let n = (self.left as u64).min(region.len() - offset.0) as usize;
        let slice = match region.get_slice(offset, n) {
            Ok(s) => self.convert(s),
            Err(e) => {
                self.left = 0;
                Err(e.into())
            }
        };
        if slice.is_ok() {
            self.left -= n;
            match self.addr.checked_add(n as u64) {
                Some(next) => self.addr = next,
                None => self.wrapped = self.left > 0,
            }
        }
        Some(slice)
    }
}

/// vm-memory's error for an access to read-only memory through the view.
fn read_only(addr: GuestAddress, len: usize, access: Permissions) -> VmMemoryError {
    let access = if access.has_write() { "write" } else { "read" };
    VmMemoryError::IOError(io::Error::new(
        io::ErrorKind::PermissionDenied,
        Error::ReadOnlyAccess { addr, len, access },
    ))
}

impl<'a, B: BridgeBitmap> Iterator for Slices<'a, B> {
    type Item = vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        if self.wrapped {
            // vm-memory would go on at address 0; the bridge stops, as guestmem does.
            self.left = 0;
            return Some(Err(VmMemoryError::GuestAddressOverflow));
        }
        // The whole rest in one region: one lookup in the table.
        match self.mem.get_slice(GuestAddress(self.addr), self.left) {
            Ok(s) => {
                let slice = self.convert(s);
                self.left = 0;
                Some(slice)
            }
            Err(GuestMemoryError::NotContiguous { .. }) => self.next_across(),
            Err(_) => {
                self.left = 0;
                Some(Err(VmMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(self.addr))))
            }
        }
    }
}

impl<B: BridgeBitmap> FusedIterator for Slices<'_, B> {}

impl<'a, B: BridgeBitmap> GuestMemorySliceIterator<'a, VmBS<'a, B::Face>> for Slices<'a, B> {}
