//! The rust-vmm bridge (feature `vm-memory`): views that implement vm-memory 0.18's traits over
//! guestmem memory, so that the crates a VMM is built from — virtio-queue, virtio-vsock, the
//! vm-virtio devices, linux-loader, vfio-ioctls, kernel vhost — run on it unchanged.
//!
//! # The views
//!
//! vm-memory has two memory traits, and the bridge has a view for each. Both are
//! `#[repr(transparent)]` over guestmem's [`GuestMemoryMmap`](crate::GuestMemoryMmap): viewing
//! memory costs nothing, translation is guestmem's flat table, and guestmem's own types keep
//! their own API (no method of guestmem's is shadowed by a vm-memory one of the same name).
//!
//! | view | vm-memory trait | for | read-only regions |
//! | --- | --- | --- | --- |
//! | [`PermissionView`] | `GuestMemory` (`get_slices(addr, len, Permissions)`) | virtio-queue, virtio-vsock, vm-virtio devices | unreachable: any access is an error |
//! | [`GuestMemoryMmap`] | `GuestMemoryBackend` (regions, host addresses) | linux-loader, vfio-ioctls, kernel vhost | the view refuses such memory, or [`writable_part`](GuestMemoryMmap::writable_part) leaves them out |
//! | `IovaView` (feature `vm-memory-iommu`) | `GuestMemory` by IOVA through guestmem's IOTLB | devices behind a virtual IOMMU | as [`PermissionView`] |
//!
//! With the `vm-memory-iommu` feature, `IommuFace` is also guestmem's IOTLB as vm-memory's
//! `Iommu`, for vm-memory's `IommuMemory` (see the `iova` items' docs).
//!
//! [`GuestMemoryMmap`] is also the drop-in for `vm_memory::GuestMemoryMmap<B>`: its
//! constructors take vm-memory's addresses and answer as vm-memory does, so swapping that one
//! import runs a consumer's tests on guestmem memory (`scripts/consumer-tests` does it for
//! virtio-queue, linux-loader and virtio-vsock). [`AtomicView`] is vm-memory's
//! `GuestAddressSpace` over guestmem's hot-pluggable [`GuestMemoryAtomic`](crate::GuestMemoryAtomic).
//! Bitmaps `()`, [`AtomicBitmap`](crate::AtomicBitmap) and `Option<AtomicBitmap>` are carried
//! ([`BridgeBitmap`]): a device's writes through the bridge mark guestmem's bitmap and show up
//! in guestmem's harvests, snapshots and migrations.
//!
//! # No crash through a view
//!
//! vm-memory's `VolatileSlice` has no read-only mode: every slice can be written by safe code,
//! and `GuestMemoryBackend::get_slice` takes no access mode. So the bridge never builds a
//! vm-memory slice of read-only memory: the permission view turns guestmem slices into
//! vm-memory ones through one function that refuses read-only ones, and the backend view's
//! region type exists only for writable regions. The permission view answers an
//! access to a read-only region, for reading too, with vm-memory's `IOError` of kind
//! `PermissionDenied` carrying [`Error::ReadOnlyAccess`]; the backend view cannot hold a
//! read-only region at all ([`Error::ReadOnlyRegion`]).
//!
//! # Regions of any length
//!
//! vm-memory accepts regions of any size (virtio-vsock's tests use one of `0x10_0004` bytes),
//! and so does the bridge: such a region is guestmem's region of exactly that length over a
//! mapping rounded up to whole pages ([`GuestRegionMmap::with_len`](crate::GuestRegionMmap::with_len)),
//! so every access stops where vm-memory's would. Its last page is partial for guestmem's dirty
//! bitmap, snapshots and migration too; it cannot be a KVM memslot (KVM takes whole pages: its
//! registration fails, and vm-memory never registers memory with KVM anyway). A region must
//! still *start* on a page ([`Error::NotPageMultiple`]; vm-memory accepts any start): guest
//! and host addresses then agree on alignment, so an aligned guest access is an aligned,
//! untorn host access. A file given for such a region must cover its rounded-up mapping.
//!
//! # What stays vm-memory's
//!
//! `Bytes<GuestAddress>` is a blanket impl over vm-memory's `GuestMemory`, so small accesses
//! through a view run vm-memory's generic copy path over the view's translation, not
//! guestmem's own (which is faster still: use guestmem's API where you can).
//! vhost-user-backend fixes its memory type to `vm_memory::GuestMemoryAtomic<vm_memory::
//! GuestMemoryMmap<B>>` in its public traits and cannot take foreign memory.
//! [`GuestRegionMmap::file_offset`](vm_memory::GuestMemoryRegion::file_offset) is `None` through
//! the bridge (the trait hands out a reference to vm-memory's own type); the guestmem region
//! has it.
//!
//! ```
//! use guestmem::bitmap::AtomicBitmap;
//! use guestmem::compat::PermissionView;
//! use guestmem::{GuestAddress, GuestMemoryMmap};
//! use vm_memory::{Bytes, GuestMemory, Permissions};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! // A device writes through vm-memory's API...
//! let view = PermissionView::new(&mem);
//! let slice = view.get_slices(vm_memory::GuestAddress(0x5000), 16, Permissions::Write).unwrap().next().unwrap().unwrap();
//! slice.write_slice(&[1; 16], 0).unwrap();
//! view.write_obj(2u64, vm_memory::GuestAddress(0x9000)).unwrap();
//! // ...and guestmem's harvest reports exactly those pages.
//! let mut dirty = Vec::new();
//! mem.take_dirty_ranges(|addr, len| dirty.push((addr.0, len))).unwrap();
//! assert_eq!(dirty, [(0x5000, 0x1000), (0x9000, 0x1000)]);
//! ```

mod atomic;
mod bitmap;
mod convert;
#[cfg(feature = "vm-memory-iommu")]
mod iova;
mod memory;
mod region;
mod view;

pub use atomic::{AtomicView, ViewGuard};
pub use bitmap::{BitmapFace, BridgeBitmap, SliceFace};
#[cfg(feature = "vm-memory-iommu")]
pub use iova::{IommuFace, IovaSlices, IovaView, MirrorGuard, Resolver};
pub use memory::GuestMemoryMmap;
pub use region::GuestRegionMmap;
pub use view::{OkSlices, PermissionView, Slices};

use crate::{GuestAddress, GuestUsize};

/// Errors of the bridge. Each names the guest address it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A region whose guest start is not a multiple of the host page size, which vm-memory
    /// accepts and the bridge refuses (see the [module documentation](self#regions-of-any-length)).
    /// Any size is accepted.
    #[error(
        "region of {size:#x} bytes at {base}: the start must be a multiple of the page size {page_size:#x}"
    )]
    NotPageMultiple {
        /// Where the region was to start.
        base: GuestAddress,
        /// Its size.
        size: usize,
        /// The host page size.
        page_size: usize,
    },
    /// A read-only region given to the backend view, whose vm-memory slices are always
    /// writable.
    #[error("region [{base}, +{len:#x}) is read-only: a vm-memory backend view of it would hand out writable slices")]
    ReadOnlyRegion {
        /// Start of the region.
        base: GuestAddress,
        /// Its length.
        len: GuestUsize,
    },
    /// An access through the [`PermissionView`] that reaches read-only memory (carried in
    /// vm-memory's `IOError` of kind `PermissionDenied`).
    #[error("access of {len:#x} bytes at {addr} reaches read-only memory, which vm-memory's always-writable slices cannot show")]
    ReadOnlyAccess {
        /// Where the part of the access in read-only memory starts.
        addr: GuestAddress,
        /// Its length.
        len: usize,
    },
    /// `from_regions` of no region (vm-memory refuses it too).
    #[error("no memory region was given")]
    NoMemoryRegion,
    /// `from_regions` of regions not sorted by guest address (vm-memory refuses them too).
    #[error("regions are not sorted by guest address: {first} comes before {second}")]
    UnsortedRegions {
        /// The start of the earlier region in the list.
        first: GuestAddress,
        /// The start of the region after it, which is lower.
        second: GuestAddress,
    },
    /// `remove_region` with no region of that size at that address.
    #[error("no region of {size:#x} bytes starts at {base}")]
    NoRegion {
        /// The start asked for.
        base: GuestAddress,
        /// The size asked for.
        size: GuestUsize,
    },
    /// guestmem refused the memory (overlapping regions, a mapping that failed).
    #[error(transparent)]
    Memory(#[from] crate::GuestMemoryError),
    /// A vm-memory memory error, met in guestmem code.
    #[error("vm-memory: {0}")]
    VmMemory(#[from] vm_memory::GuestMemoryError),
    /// A vm-memory volatile-access error, met in guestmem code.
    #[error("vm-memory: {0}")]
    VmVolatile(#[from] vm_memory::VolatileMemoryError),
}

/// Fails with [`Error::NotPageMultiple`] unless `base` is a page multiple.
fn check_placement(base: GuestAddress, size: usize) -> Result<(), Error> {
    let page_size = crate::host::page_size();
    if !base.0.is_multiple_of(page_size as u64) {
        return Err(Error::NotPageMultiple { base, size, page_size });
    }
    Ok(())
}

/// The vm-memory slice over a guestmem slice, or `None` for a slice of read-only memory: how
/// the permission view makes its slices, so none is ever made of read-only memory.
#[inline(always)]
fn vm_slice<'a, B: BridgeBitmap>(
    s: crate::VolatileSlice<'a, crate::region::BS<'a, B>>,
) -> Option<vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, B::Face>>> {
    if !s.is_writable() {
        return None;
    }
    let bitmap = B::slice_face(s.bitmap().clone());
    // SAFETY: `s` covers `s.len()` bytes of a guestmem mapping that stays mapped for 'a (the
    // slice borrows the memory that holds the region) and is writable (checked above), so the
    // vm-memory slice, which allows writes, may be used for all of 'a; guestmem and vm-memory
    // access guest memory only with volatile accesses and raw copies and never make a Rust
    // reference to it. Its bitmap slice marks the same region's guestmem bitmap at the same
    // offset as `s`'s.
    Some(unsafe { vm_memory::VolatileSlice::with_bitmap(s.as_ptr(), s.len(), bitmap, None) })
}
