//! [`AtomicView`]: guestmem's hot-pluggable [`GuestMemoryAtomic`](crate::GuestMemoryAtomic) as
//! vm-memory's [`GuestAddressSpace`](vm_memory::GuestAddressSpace), for devices that hold an
//! address space and take a snapshot per request.

use std::ops::Deref;
use std::sync::Arc;

use vm_memory::GuestAddressSpace;

use super::bitmap::BridgeBitmap;
use super::PermissionView;
use crate::{GuestMemoryAtomic, GuestMemoryGuard, GuestMemoryMmap};

/// A handle on guestmem's [`GuestMemoryAtomic`] that is vm-memory's
/// [`GuestAddressSpace`](vm_memory::GuestAddressSpace): `memory()` is a [`ViewGuard`], a
/// snapshot that dereferences to a [`PermissionView`] of the memory current at that time.
///
/// A snapshot keeps every region it holds mapped, as guestmem's own do, so a hot-unplug under a
/// device that still holds one cannot leave it pointing at unmapped memory. Its cost is
/// guestmem's [`memory()`](GuestMemoryAtomic::memory) (arc-swap's lock-free load); cloning it,
/// as vm-memory's trait allows, costs one `Arc` increment ([`GuestMemoryGuard`]'s `Clone`).
/// guestmem's own [`GuestAddressSpace`](crate::GuestAddressSpace) is implemented by
/// [`GuestMemoryAtomic`] itself.
///
/// guestmem's [`MemoryCache`](crate::MemoryCache) does not fit the trait
/// (`GuestAddressSpace::memory` takes `&self`, the cache's `memory` needs `&mut self` to
/// reload): a device thread that keeps a cache wraps each snapshot itself, with
/// `PermissionView::new(cache.memory())`.
///
/// ```
/// use guestmem::compat::AtomicView;
/// use guestmem::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
/// use vm_memory::{Bytes, GuestAddressSpace};
///
/// fn device_step<A: GuestAddressSpace>(space: &A) {
///     space.memory().write_obj(1u8, vm_memory::GuestAddress(0x10)).unwrap();
/// }
///
/// let atomic = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
/// let space = AtomicView::new(&atomic);
/// device_step(&space);
/// assert_eq!(space.memory().read_obj::<u8>(vm_memory::GuestAddress(0x10)).unwrap(), 1);
/// ```
#[derive(Debug)]
pub struct AtomicView<B = ()>(GuestMemoryAtomic<GuestMemoryMmap<B>>);

impl<B> Clone for AtomicView<B> {
    fn clone(&self) -> Self {
        AtomicView(self.0.clone())
    }
}

impl<B> AtomicView<B> {
    /// A handle on the same memory as `atomic` (hotplug through either is seen by both).
    pub fn new(atomic: &GuestMemoryAtomic<GuestMemoryMmap<B>>) -> Self {
        AtomicView(atomic.clone())
    }

    /// guestmem's handle, for its writer API (`lock`, `update`) and cheaper snapshots.
    pub fn guestmem(&self) -> &GuestMemoryAtomic<GuestMemoryMmap<B>> {
        &self.0
    }
}

impl<B> From<GuestMemoryAtomic<GuestMemoryMmap<B>>> for AtomicView<B> {
    fn from(atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>) -> Self {
        AtomicView(atomic)
    }
}

impl<B: BridgeBitmap> GuestAddressSpace for AtomicView<B> {
    type M = PermissionView<B>;
    type T = ViewGuard<B>;

    #[inline]
    fn memory(&self) -> ViewGuard<B> {
        ViewGuard(self.0.memory())
    }
}

/// A snapshot of an [`AtomicView`]'s memory: dereferences to its [`PermissionView`]; cloning
/// shares the snapshot.
#[derive(Debug)]
pub struct ViewGuard<B = ()>(GuestMemoryGuard<GuestMemoryMmap<B>>);

impl<B> Clone for ViewGuard<B> {
    fn clone(&self) -> Self {
        ViewGuard(self.0.clone())
    }
}

impl<B> ViewGuard<B> {
    /// The snapshot as guestmem memory.
    pub fn into_inner(self) -> Arc<GuestMemoryMmap<B>> {
        self.0.into_arc()
    }
}

impl<B> Deref for ViewGuard<B> {
    type Target = PermissionView<B>;

    #[inline(always)]
    fn deref(&self) -> &PermissionView<B> {
        PermissionView::new(&self.0)
    }
}
