//! guestmem's IOTLB through vm-memory's IOMMU traits (feature `vm-memory-iommu`): [`IovaView`],
//! IOVA-addressed memory as vm-memory's permission-aware `GuestMemory` (what virtio-queue takes),
//! and [`IommuFace`], guestmem's [`Iotlb`] as vm-memory's [`Iommu`](vm_memory::Iommu) for
//! vm-memory's own `IommuMemory`.
//!
//! # Which to use
//!
//! [`IovaView`] is the fast one: translation is guestmem's table (one binary search per
//! mapping crossed, no lock), the slices are guestmem's, and a device's writes are logged in
//! guestmem's bitmaps at their **guest-physical** pages, where KVM's and the VMM's writes are
//! logged too, so a migration or a diff snapshot sees them. A miss or a permission fault is
//! vm-memory's `IommuError(CannotResolve)` naming the IOVA range; the device asks its IOMMU model,
//! which updates the [`Iotlb`], and takes a fresh table for the retry.
//!
//! [`IommuFace`] is for code written against `vm_memory::IommuMemory`: the same [`Iotlb`] (the
//! IOMMU model updates guestmem's, the face follows), mirrored into vm-memory's own `Iotlb`
//! under a lock whenever guestmem's has changed, and an optional resolver that the face asks on a
//! miss before it gives up (as vm-memory's `Iommu::translate` expects). `IommuMemory` logs writes
//! in its own bitmap indexed by IOVA, which is vm-memory's choice, not guestmem's.
//!
//! ```
//! use guestmem::bitmap::AtomicBitmap;
//! use guestmem::compat::IovaView;
//! use guestmem::iommu::{Iotlb, Iova, Permissions};
//! use guestmem::{GuestAddress, GuestMemoryMmap};
//! use vm_memory::{Bytes, GuestMemory};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let iotlb = Iotlb::new();
//! iotlb.update(Iova(0x10_0000), 0x1000, GuestAddress(0x7000), Permissions::READ_WRITE).unwrap();
//! iotlb.update(Iova(0x10_1000), 0x1000, GuestAddress(0x3000), Permissions::READ).unwrap();
//!
//! let table = iotlb.snapshot();
//! let view = IovaView::new(&table, &mem);
//! // vm-memory's Bytes, by IOVA:
//! view.write_obj(0x1234u32, vm_memory::GuestAddress(0x10_0ffc)).unwrap();
//! assert_eq!(guestmem::Bytes::read_obj::<u32>(&mem, GuestAddress(0x7ffc)).unwrap(), 0x1234);
//! // A write into the read-only mapping is refused, before a byte moves.
//! assert!(view.write_obj(0u64, vm_memory::GuestAddress(0x10_0ffc)).is_err());
//! assert_eq!(guestmem::Bytes::read_obj::<u32>(&mem, GuestAddress(0x7ffc)).unwrap(), 0x1234);
//! // The write is logged at its guest page.
//! let mut dirty = Vec::new();
//! mem.take_dirty_ranges(|addr, len| dirty.push((addr.0, len))).unwrap();
//! assert_eq!(dirty, [(0x7000, 0x1000)]);
//! ```

use std::fmt;
use std::iter::FusedIterator;
use std::ops::Deref;
use std::sync::{RwLock, RwLockReadGuard};

use vm_memory::bitmap::BS as VmBS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::iommu::{Error as VmIommuError, IotlbIterator, IovaRange};
use vm_memory::{GuestMemoryError as VmMemoryError, Permissions as VmPermissions};

use super::bitmap::BridgeBitmap;
use super::view::Slices;
use super::GuestMemoryMmap;
use crate::iommu::{Access, Iotlb, IotlbTable, Iova, Permissions};

/// Whether a mapping with `perm` allows an access that needs `need` (vm-memory's
/// `Permissions::No` needs only the mapping).
#[inline(always)]
fn allows(perm: Permissions, need: VmPermissions) -> bool {
    match need {
        VmPermissions::No => true,
        VmPermissions::Read => perm.contains(Permissions::READ),
        VmPermissions::Write => perm.contains(Permissions::WRITE),
        VmPermissions::ReadWrite => perm.contains(Permissions::READ_WRITE),
    }
}

/// vm-memory's error for `len` bytes from `iova` that the IOTLB cannot serve.
#[cold]
fn cannot_resolve(iova: u64, len: usize, reason: String) -> VmIommuError {
    VmIommuError::CannotResolve {
        iova_range: IovaRange { base: vm_memory::GuestAddress(iova), length: len },
        reason,
    }
}

/// IOVA-addressed guest memory as vm-memory's permission-aware
/// [`GuestMemory`](vm_memory::GuestMemory): one IOTLB table over the bridge's memory. What
/// virtio-queue and the vm-virtio devices take when their descriptors hold IOVAs.
///
/// Every access is translated piece by piece through the table (an access that crosses
/// mappings is split at their ends, and again where the guest addresses cross regions), and
/// each piece is checked for the access's permission: vm-memory's `Permissions::Read` needs
/// [`Permissions::READ`], `Write` needs [`Permissions::WRITE`], `ReadWrite` both, and `No`
/// only a mapping. A piece that finds no mapping or the wrong permission ends the slices with
/// `GuestMemoryError::IommuError(CannotResolve)`, whose range starts at the first IOVA that
/// failed and runs to the end of the access; vm-memory's `Bytes` then moves nothing (a
/// `write_slice` or `read_obj` is checked whole, [`check_range`](vm_memory::GuestMemory::check_range)
/// answers without moving anything). Read-only guest memory behind a mapping is refused as by
/// [`PermissionView`](super::PermissionView); a range that would wrap past 2^64 is
/// `GuestAddressOverflow`.
///
/// The view borrows one table: take it per request ([`Iotlb::snapshot`] or an
/// [`IotlbCache`](crate::iommu::IotlbCache)), so that an invalidation the IOMMU model made
/// before the request is seen (see the [`iommu`](crate::iommu#concurrency) module).
///
/// Writes through the view are logged in guestmem's bitmaps at the guest-physical pages they
/// reach (`Bitmap` is the region bitmap's face), not in an IOVA-indexed bitmap as vm-memory's
/// `IommuMemory` does.
pub struct IovaView<'a, B = ()> {
    table: &'a IotlbTable,
    mem: &'a crate::GuestMemoryMmap<B>,
}

impl<B> Clone for IovaView<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for IovaView<'_, B> {}

impl<B> fmt::Debug for IovaView<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IovaView").field("table", self.table).finish_non_exhaustive()
    }
}

impl<'a, B> IovaView<'a, B> {
    /// The view of `mem` through `table`.
    #[inline]
    pub fn new(table: &'a IotlbTable, mem: &'a crate::GuestMemoryMmap<B>) -> Self {
        IovaView { table, mem }
    }

    /// The IOTLB table the view translates with (for guestmem's structured answers:
    /// [`IotlbTable::translate`] says whether a failure is a miss or a permission fault).
    #[inline]
    pub fn table(&self) -> &'a IotlbTable {
        self.table
    }

    /// The guest memory behind the IOTLB.
    #[inline]
    pub fn guestmem(&self) -> &'a crate::GuestMemoryMmap<B> {
        self.mem
    }
}

impl<B: BridgeBitmap> vm_memory::GuestMemory for IovaView<'_, B> {
    type PhysicalMemory = GuestMemoryMmap<B>;
    type Bitmap = B::Face;

    /// Whether every byte of the range is mapped with `access` and backed by memory the view
    /// can hand out. An empty range always is, as vm-memory's `GuestMemory` documents (its
    /// `IommuMemory` answers by what its range map happens to hold there: an empty range inside
    /// a mapping without the permission fails, one at the mapping's start or in no mapping
    /// passes).
    fn check_range(&self, addr: vm_memory::GuestAddress, count: usize, access: VmPermissions) -> bool {
        IovaSlices::new(self.table, self.mem, addr.0, count, access).all(|s| s.is_ok())
    }

    #[inline]
    fn get_slices<'b>(
        &'b self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: VmPermissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'b, VmBS<'b, B::Face>>> {
        Ok(IovaSlices::new(self.table, self.mem, addr.0, count, access))
    }

    /// `None`: addresses through the view are IOVAs, not guest addresses.
    fn physical_memory(&self) -> Option<&GuestMemoryMmap<B>> {
        None
    }
}

/// The slices of an IOVA range through an [`IovaView`]: one per mapping and region crossed,
/// adding up to the range, or ending with one error where the range fails.
///
/// [`stop_on_error`](GuestMemorySliceIterator::stop_on_error), through which vm-memory's
/// `Bytes` moves data, walks the whole range before it yields the first slice: an access
/// that fails anywhere is that error and moves nothing (vm-memory's provided method would
/// hand out the slices before the failure, and `write` would write them).
#[derive(Debug)]
pub struct IovaSlices<'a, B> {
    table: &'a IotlbTable,
    mem: &'a crate::GuestMemoryMmap<B>,
    /// The first IOVA not yet translated, and the bytes from there.
    iova: u64,
    left: usize,
    access: VmPermissions,
    /// The guest range of the piece being walked.
    inner: Slices<'a, B>,
}

impl<'a, B: BridgeBitmap> IovaSlices<'a, B> {
    fn new(
        table: &'a IotlbTable,
        mem: &'a crate::GuestMemoryMmap<B>,
        iova: u64,
        left: usize,
        access: VmPermissions,
    ) -> Self {
        let inner = Slices::new(mem, vm_memory::GuestAddress(0), 0);
        IovaSlices { table, mem, iova, left, access, inner }
    }

    /// The guest address and length of the next piece: the part of the rest in one mapping.
    #[inline]
    fn piece(&self) -> Result<(u64, usize), VmMemoryError> {
        // `iova + left` is the same at every step.
        if u128::from(self.iova) + self.left as u128 > 1 << 64 {
            return Err(VmMemoryError::GuestAddressOverflow);
        }
        let Some(e) = self.table.mapping(Iova(self.iova)) else {
            let reason = "IOTLB miss".to_string();
            return Err(VmMemoryError::IommuError(cannot_resolve(self.iova, self.left, reason)));
        };
        if !allows(e.perm, self.access) {
            let reason = format!("the mapping allows {:?}, the access needs {:?}", e.perm, self.access);
            return Err(VmMemoryError::IommuError(cannot_resolve(self.iova, self.left, reason)));
        }
        let offset = self.iova - e.iova.0;
        // `offset < e.size`; at most `left`, so it fits in usize.
        let n = (self.left as u64).min(e.size - offset) as usize;
        Ok((e.guest_addr.0 + offset, n))
    }
}

impl<'a, B: BridgeBitmap> Iterator for IovaSlices<'a, B> {
    type Item = vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.inner.next() {
                // The guest walk ends after its error; so does this one.
                if item.is_err() {
                    self.left = 0;
                }
                return Some(item);
            }
            if self.left == 0 {
                return None;
            }
            match self.piece() {
                Err(e) => {
                    self.left = 0;
                    return Some(Err(e));
                }
                Ok((guest, n)) => {
                    // No wrap past 2^64 (checked in `piece`); the end may be exactly 2^64.
                    self.iova = self.iova.wrapping_add(n as u64);
                    self.left -= n;
                    self.inner = Slices::new(self.mem, vm_memory::GuestAddress(guest), n);
                }
            }
        }
    }
}

impl<B> Clone for IovaSlices<'_, B> {
    fn clone(&self) -> Self {
        IovaSlices { inner: self.inner.clone(), ..*self }
    }
}

impl<B: BridgeBitmap> FusedIterator for IovaSlices<'_, B> {}

impl<'a, B: BridgeBitmap> GuestMemorySliceIterator<'a, VmBS<'a, B::Face>> for IovaSlices<'a, B> {
    /// The slices of the whole range, or the first error on it before any slice.
    #[inline]
    fn stop_on_error(
        mut self,
    ) -> vm_memory::GuestMemoryResult<impl Iterator<Item = vm_memory::VolatileSlice<'a, VmBS<'a, B::Face>>>>
    {
        let first = self.next().transpose()?;
        // The rest is checked before anything is handed out (nothing is left, and this is one
        // branch, when the first slice is the whole range).
        for item in self.clone() {
            item?;
        }
        Ok(first.into_iter().chain(self.map_while(Result::ok)))
    }
}

/// What an [`IommuFace`] asks on a miss or a permission fault: the first IOVA that failed, the
/// bytes of the access from there, and the access. It returns whether it changed the IOTLB
/// (the face then looks again, once).
pub type Resolver = dyn Fn(Iova, u64, Access) -> bool + Send + Sync;

/// guestmem's [`Iotlb`] as vm-memory's [`Iommu`](vm_memory::Iommu), for
/// `vm_memory::IommuMemory` over the bridge's [`GuestMemoryMmap`].
///
/// The face shares the [`Iotlb`] it was made from: the IOMMU model updates and invalidates
/// guestmem's IOTLB, and the face's next translation sees it (vm-memory's `Iotlb` is a mirror,
/// rebuilt under a write lock when guestmem's generation has moved, read under a read lock
/// while an access walks it). A translation that fails asks the [resolver](Self::with_resolver)
/// if there is one and, when it reports a change, looks once more; otherwise it is vm-memory's
/// `CannotResolve` for the first range that failed. An access that would reach 2^64 is refused
/// before vm-memory's arithmetic sees it.
///
/// ```
/// use guestmem::compat::{self, IommuFace};
/// use guestmem::iommu::{Iotlb, Iova, Permissions};
/// use guestmem::GuestAddress;
/// use vm_memory::{Bytes, IommuMemory};
///
/// let mem = compat::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let iotlb = Iotlb::new();
/// // The model maps on demand: a miss at any IOVA maps its page onto the same guest page.
/// let model = iotlb.clone();
/// let face = IommuFace::new(&iotlb).with_resolver(move |iova, _, _| {
///     let page = iova.0 & !0xfff;
///     model.update(Iova(page), 0x1000, GuestAddress(page), Permissions::READ_WRITE).is_ok()
/// });
/// let io = IommuMemory::new(mem, face, true, ());
/// io.write_obj(7u8, vm_memory::GuestAddress(0x4321)).unwrap();
/// assert_eq!(iotlb.snapshot().len(), 1);
/// assert_eq!(io.get_backend().read_obj::<u8>(vm_memory::GuestAddress(0x4321)).unwrap(), 7);
/// ```
pub struct IommuFace {
    iotlb: Iotlb,
    mirror: RwLock<Mirror>,
    resolver: Option<Box<Resolver>>,
}

/// vm-memory's IOTLB as of one generation of guestmem's.
struct Mirror {
    /// The generation of guestmem's IOTLB copied, `u64::MAX` before the first copy (and while
    /// one is being made).
    generation: u64,
    tlb: vm_memory::iommu::Iotlb,
}

impl fmt::Debug for IommuFace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuFace")
            .field("iotlb", &self.iotlb)
            .field("resolver", &self.resolver.is_some())
            .finish_non_exhaustive()
    }
}

/// The read guard of an [`IommuFace`]'s mirror: vm-memory's IOTLB, held while an access walks
/// its mappings.
pub struct MirrorGuard<'a>(RwLockReadGuard<'a, Mirror>);

impl Deref for MirrorGuard<'_> {
    type Target = vm_memory::iommu::Iotlb;

    fn deref(&self) -> &vm_memory::iommu::Iotlb {
        &self.0.tlb
    }
}

impl fmt::Debug for MirrorGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MirrorGuard").field("generation", &self.0.generation).finish()
    }
}

impl IommuFace {
    /// The face of `iotlb` (sharing it), with no resolver.
    pub fn new(iotlb: &Iotlb) -> Self {
        IommuFace {
            iotlb: iotlb.clone(),
            mirror: RwLock::new(Mirror { generation: u64::MAX, tlb: vm_memory::iommu::Iotlb::new() }),
            resolver: None,
        }
    }

    /// Asks `resolver` on a miss or a permission fault (see [`Resolver`]).
    pub fn with_resolver(
        mut self,
        resolver: impl Fn(Iova, u64, Access) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Some(Box::new(resolver));
        self
    }

    /// The IOTLB the face follows.
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// The mirror, brought up to guestmem's IOTLB.
    fn current(&self) -> Result<MirrorGuard<'_>, VmIommuError> {
        loop {
            // The generation is read before the table: a table newer than the generation
            // noted only makes the next call copy again.
            let generation = self.iotlb.generation();
            {
                let guard = self.mirror.read().unwrap_or_else(|e| e.into_inner());
                if guard.generation == generation {
                    return Ok(MirrorGuard(guard));
                }
            }
            let mut mirror = self.mirror.write().unwrap_or_else(|e| e.into_inner());
            if mirror.generation != generation {
                mirror.generation = u64::MAX;
                let mut tlb = vm_memory::iommu::Iotlb::new();
                for e in self.iotlb.snapshot().entries() {
                    // guestmem's entries are validated: in range, non-empty, with permissions.
                    let perm = match (e.perm.contains(Permissions::READ), e.perm.contains(Permissions::WRITE))
                    {
                        (true, true) => VmPermissions::ReadWrite,
                        (true, false) => VmPermissions::Read,
                        (false, _) => VmPermissions::Write,
                    };
                    // vm-memory's ranges end below 2^64: a mapping of the last IOVA page loses
                    // its last byte, which no access through the face reaches anyway (one
                    // ending at 2^64 is refused in `translate`).
                    let size = if e.iova.0.checked_add(e.size).is_none() { e.size - 1 } else { e.size };
                    tlb.set_mapping(
                        vm_memory::GuestAddress(e.iova.0),
                        e.guest_addr.into(),
                        size as usize,
                        perm,
                    )?;
                }
                mirror.tlb = tlb;
                mirror.generation = generation;
            }
        }
    }
}

impl vm_memory::Iommu for IommuFace {
    type IotlbGuard<'a> = MirrorGuard<'a>;

    fn translate(
        &self,
        iova: vm_memory::GuestAddress,
        length: usize,
        access: VmPermissions,
    ) -> Result<IotlbIterator<MirrorGuard<'_>>, VmIommuError> {
        // vm-memory computes `iova + length` in u64.
        if iova.0.checked_add(length as u64).is_none() {
            return Err(cannot_resolve(iova.0, length, "the range reaches 2^64".to_string()));
        }
        let mut asked = false;
        loop {
            let fails = match vm_memory::iommu::Iotlb::lookup(self.current()?, iova, length, access) {
                Ok(found) => return Ok(found),
                Err(fails) => fails,
            };
            let failed = fails.misses.iter().chain(&fails.access_fails).min_by_key(|r| r.base.0);
            let Some(first) = failed else {
                return Err(cannot_resolve(iova.0, length, "IOTLB lookup failed".to_string()));
            };
            let miss = fails.misses.iter().any(|r| r.base == first.base);
            let rest = (iova.0 + length as u64 - first.base.0) as usize;
            let kind = if access.has_write() { Access::Write } else { Access::Read };
            if asked || !self.resolver.as_ref().is_some_and(|ask| ask(Iova(first.base.0), rest as u64, kind))
            {
                let reason = if miss { "IOTLB miss" } else { "the mapping does not allow the access" };
                return Err(cannot_resolve(first.base.0, rest, reason.to_string()));
            }
            asked = true;
        }
    }
}
