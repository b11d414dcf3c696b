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
use crate::{GuestAddress, GuestMemory as _, GuestMemoryRegion as _};

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
    /// read-only); an empty range always is, as in vm-memory. The access mode does not change
    /// the answer: read-only memory is refused for every access (see the type's docs).
    #[inline]
    fn check_range(&self, addr: vm_memory::GuestAddress, count: usize, _access: Permissions) -> bool {
        Slices::new(&self.0, addr, count).all(|s| s.is_ok())
    }

    #[inline(always)]
    fn get_slices<'a>(
        &'a self,
        addr: vm_memory::GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, VmBS<'a, B::Face>>> {
        Ok(Slices::new(&self.0, addr, count))
    }

    /// The backend view of the same memory when it has no read-only region, else `None`.
    fn physical_memory(&self) -> Option<&GuestMemoryMmap<B>> {
        GuestMemoryMmap::from_guestmem(&self.0).ok()
    }
}

/// The slices of a guest range through a [`PermissionView`], one per region crossed, as
/// vm-memory's `GuestMemory::get_slices` promises: they add up to the range, or the iterator
/// yields one error (where the range leaves memory or reaches read-only memory) and then ends.
/// A range that would wrap past 2^64 is refused before any slice (vm-memory would go on at
/// address 0).
///
/// A range inside one region (every virtqueue access) is one lookup in guestmem's table; the
/// walk across regions is the cold path. Three words, like vm-memory's own iterator, so that
/// copies of it stay cheap in the consumers' loops.
#[derive(Debug)]
pub struct Slices<'a, B> {
    mem: &'a crate::GuestMemoryMmap<B>,
    addr: u64,
    left: usize,
}

impl<B> Clone for Slices<'_, B> {
    fn clone(&self) -> Self {
        Slices { mem: self.mem, addr: self.addr, left: self.left }
    }
}

impl<'a, B: BridgeBitmap> Slices<'a, B> {
    #[inline(always)]
    pub(super) fn new(
        mem: &'a crate::GuestMemoryMmap<B>,
        addr: vm_memory::GuestAddress,
        count: usize,
    ) -> Self {
        Slices { mem, addr: addr.0, left: count }
    }

    /// Everything but a whole in-region range: a wrap past 2^64, a hole, read-only memory, a
    /// range that goes on into the next region. Out of line, so the fast path stays small
    /// enough for vm-memory's generic callers (`stop_on_error`, `Bytes`) to inline it; it takes
    /// and returns the walk's state by value, so the iterator never needs an address and stays
    /// in registers on the fast path. Returns the item, the next address and the bytes left.
    #[cold]
    #[inline(never)]
    fn slow(
        mem: &'a crate::GuestMemoryMmap<B>,
        addr: u64,
        left: usize,
    ) -> (<Self as Iterator>::Item, u64, usize) {
        // An error ends the iteration (0 bytes left). `addr + left` is the same at every step.
        if u128::from(addr) + left as u128 > 1 << 64 {
            return (Err(VmMemoryError::GuestAddressOverflow), addr, 0);
        }
        let at = GuestAddress(addr);
        let Some((region, offset)) = mem.to_region_addr(at) else {
            return (Err(VmMemoryError::InvalidGuestAddress(at.into())), addr, 0);
        };
        let n = (left as u64).min(region.len() - offset.0) as usize;
        let slice = match region.get_slice(offset, n) {
            Ok(s) => s,
            Err(e) => return (Err(e.into()), addr, 0),
        };
        let Some(slice) = vm_slice::<B>(slice) else {
            return (Err(read_only(at, n)), addr, 0);
        };
        // No wrap: checked above (a range may end exactly at 2^64, then nothing is left).
        (Ok(slice), addr.wrapping_add(n as u64), left - n)
    }
}

/// vm-memory's error for an access to read-only memory through the view.
fn read_only(addr: GuestAddress, len: usize) -> VmMemoryError {
    VmMemoryError::IOError(io::Error::new(
        io::ErrorKind::PermissionDenied,
        Error::ReadOnlyAccess { addr, len },
    ))
}

impl<'a, B: BridgeBitmap> Iterator for Slices<'a, B> {
    type Item = vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        // The whole rest in one writable region: one lookup in the table.
        if let Ok(s) = self.mem.get_slice(GuestAddress(self.addr), self.left) {
            if let Some(s) = vm_slice::<B>(s) {
                self.left = 0;
                return Some(Ok(s));
            }
        }
        let (item, addr, left) = Self::slow(self.mem, self.addr, self.left);
        (self.addr, self.left) = (addr, left);
        Some(item)
    }
}

impl<B: BridgeBitmap> FusedIterator for Slices<'_, B> {}

impl<'a, B: BridgeBitmap> GuestMemorySliceIterator<'a, VmBS<'a, B::Face>> for Slices<'a, B> {
    /// vm-memory's meaning (an error first is the error; past the first slice, the slices up to
    /// an error), without the `Peekable` of the provided method: every `Bytes` access through
    /// the view goes through here, and this form inlines into it.
    #[inline(always)]
    fn stop_on_error(
        mut self,
    ) -> vm_memory::GuestMemoryResult<impl Iterator<Item = vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>>
    {
        let first = self.next().transpose()?;
        Ok(OkSlices { first, rest: self })
    }
}

/// What [`Slices::stop_on_error`] yields: the first slice, then the others up to an error.
///
/// A plain `next` (no `Chain`, no `Peekable`), so that vm-memory's generic `Bytes` code that
/// folds over it inlines the whole walk and keeps the slices in registers.
#[derive(Debug)]
pub struct OkSlices<'a, B: BridgeBitmap> {
    first: Option<vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>,
    rest: Slices<'a, B>,
}

impl<'a, B: BridgeBitmap> Iterator for OkSlices<'a, B> {
    type Item = vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        match self.first.take() {
            Some(s) => Some(s),
            // `rest` ends after its error, so this stops where vm-memory's would.
            None => self.rest.next()?.ok(),
        }
    }
}
