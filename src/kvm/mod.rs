//! KVM integration (feature `kvm`): memslots for every region of a [`GuestMemoryMmap`], and
//! the guest's writes (KVM's dirty log or dirty ring) merged into the regions' own bitmaps, so
//! that one harvest of guestmem's bitmaps gives the union of VMM and guest writes.
//!
//! [`KvmSlots`] works on any VM fd (`AsRawFd`: kvm-ioctls' `VmFd`, a raw `File`, ...); it
//! issues the ioctls itself, through [`sys::kvm`](mod@crate::sys::kvm).
//!
//! - Memslots: [`register`](KvmSlots::register) gives each region a slot (read-only regions
//!   get `KVM_MEM_READONLY`, and dirty logging is on when asked for) and, called again after
//!   hotplug, removes the slots of regions that left and adds the new ones. Each slot keeps its
//!   region alive: KVM never points at unmapped memory.
//! - Dirty log: [`sync_dirty_log`](KvmSlots::sync_dirty_log) fetches each slot's log into a
//!   buffer of exactly the slot's size and ORs it into the region's bitmap; with manual protect
//!   on, it then clears in KVM only the bits it merged, in chunks.
//! - Dirty ring: [`enable_dirty_ring`](KvmSlots::enable_dirty_ring) before any vCPU exists,
//!   [`add_vcpu`](KvmSlots::add_vcpu) for each vCPU, and
//!   [`reap_dirty_rings`](KvmSlots::reap_dirty_rings) to collect.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::bitmap::{Bitmap, BitmapError, DirtyHarvest};
use crate::memory::GuestMemoryMmap;
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::kvm::{self as ioctls, DirtyGfn, UserspaceMemoryRegion};
use crate::sys::{self, MapFlags, Protection};
use crate::GuestAddress;

/// The page size of KVM's dirty log and dirty ring.
pub const KVM_PAGE_SIZE: usize = 4096;

/// How many pages one `KVM_CLEAR_DIRTY_LOG` clears at most, so that a large VM does not stall
/// its vCPUs on one long clear (256 Ki pages = 1 GiB).
pub const CLEAR_CHUNK_PAGES: u32 = 256 * 1024;

/// Errors of the KVM integration.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl failed.
    #[error("{op} failed{}: {source}", slot.map(|s| format!(" on slot {s}")).unwrap_or_default())]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The slot it was about, if any.
        slot: Option<u32>,
        /// The error.
        source: io::Error,
    },
    /// The kernel lacks a capability.
    #[error("KVM lacks {0}")]
    Unsupported(&'static str),
    /// The dirty ring was enabled after a vCPU was created (KVM allows it only before).
    #[error("the dirty ring must be enabled before any vCPU exists: {0}")]
    RingAfterVcpu(io::Error),
    /// A ring size that is not a power of two, not a multiple of the page size, or larger than
    /// KVM's maximum.
    #[error("dirty ring size {size} is invalid (power of two, page multiple, at most {max})")]
    InvalidRingSize {
        /// The size asked for.
        size: u32,
        /// KVM's maximum.
        max: u32,
    },
    /// `KVM_DIRTY_LOG_INITIALLY_SET` and the dirty ring cannot be combined.
    #[error("KVM_DIRTY_LOG_INITIALLY_SET cannot be combined with the dirty ring")]
    InitiallySetWithRing,
    /// `KVM_GET_DIRTY_LOG` while the dirty ring is on (KVM answers `ENXIO`): reap the rings.
    #[error("the dirty ring is on: use reap_dirty_rings, not the dirty log")]
    RingEnabled,
    /// A ring operation while the ring is off.
    #[error("the dirty ring is not enabled")]
    RingNotEnabled,
    /// More regions than slot numbers to give them.
    #[error("no free memslot number ({0} available)")]
    NoFreeSlot(u32),
    /// A region's bitmap cannot take KVM's bits (tracking switched off, say).
    #[error("the bitmap of the region at {addr} cannot take KVM's dirty bits: {source}")]
    Bitmap {
        /// The region's guest address.
        addr: GuestAddress,
        /// Why.
        source: BitmapError,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("mapping the dirty ring of a vCPU failed: {0}")]
    RingMap(io::Error),
}

/// A result of the KVM integration.
pub type Result<T> = std::result::Result<T, KvmError>;

fn ioctl_error(op: &'static str, slot: Option<u32>) -> impl FnOnce(io::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, slot, source }
}

/// What a slot maps, and the buffer its dirty log is fetched into.
#[derive(Debug)]
struct Slot<B> {
    id: u32,
    region: Arc<GuestRegionMmap<B>>,
    flags: u32,
    /// One bit per page of the slot: always the exact size KVM writes.
    log: Vec<u64>,
}

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
struct VcpuRing {
    entries: *mut DirtyGfn,
    count: u32,
    fetch: u32,
    map_len: usize,
}

// SAFETY: the ring mapping belongs to this struct; entries are accessed with atomics on the
// flags as KVM's protocol requires.
unsafe impl Send for VcpuRing {}

impl Drop for VcpuRing {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing else refers to it.
        let _ = unsafe { sys::munmap(self.entries.cast(), self.map_len) };
    }
}

/// The memslots of one VM and the merge of its dirty pages into guestmem's bitmaps.
#[derive(Debug)]
pub struct KvmSlots<V, B> {
    vm: V,
    log_dirty: bool,
    slots: Vec<Slot<B>>,
    manual_protect: bool,
    initially_set: bool,
    ring_bytes: Option<u32>,
    rings: Vec<VcpuRing>,
    /// Slot numbers this instance may use.
    slot_range: std::ops::Range<u32>,
}

impl<V: AsRawFd, B: Bitmap + DirtyHarvest> KvmSlots<V, B> {
    /// Slots on the VM `vm`, with dirty logging on each slot when `log_dirty`.
    pub fn new(vm: V, log_dirty: bool) -> Self {
        // KVM_CAP_NR_MEMSLOTS (10); 32 is the oldest kernels' count, should the query fail.
        let max_slots = ioctls::check_extension(&vm, 10).ok().filter(|&n| n > 0).map_or(32, |n| n as u32);
        let slot_range = 0..max_slots;
        KvmSlots {
            vm,
            log_dirty,
            slots: Vec::new(),
            manual_protect: false,
            initially_set: false,
            ring_bytes: None,
            rings: Vec::new(),
            slot_range,
        }
    }

    /// Uses only slot numbers in `range` (within KVM's limit), leaving the others to the VMM's
    /// own devices (ROMs, shared memory windows).
    #[must_use]
    pub fn with_slot_range(mut self, range: std::ops::Range<u32>) -> Self {
        let end = range.end.min(self.slot_range.end);
        self.slot_range = range.start.min(end)..end;
        self
    }

    /// The VM fd.
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// Turns on `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_GET_DIRTY_LOG` no longer clears, and
    /// [`sync_dirty_log`](Self::sync_dirty_log) clears only what it merged. With
    /// `initially_set`, every page starts dirty (the first sync reports all of memory), which
    /// avoids write-protecting all of it up front.
    pub fn enable_manual_protect(&mut self, initially_set: bool) -> Result<()> {
        if initially_set && self.ring_bytes.is_some() {
            return Err(KvmError::InitiallySetWithRing);
        }
        let caps = ioctls::check_extension(&self.vm, ioctls::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            .map_err(ioctl_error("KVM_CHECK_EXTENSION", None))? as u64;
        let mut flags = ioctls::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if initially_set {
            flags |= ioctls::KVM_DIRTY_LOG_INITIALLY_SET;
        }
        if caps & flags != flags {
            return Err(KvmError::Unsupported("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"));
        }
        ioctls::enable_cap(&self.vm, ioctls::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [flags, 0, 0, 0])
            .map_err(ioctl_error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", None))?;
        self.manual_protect = true;
        self.initially_set = initially_set;
        Ok(())
    }

    /// Turns on the dirty ring with `bytes` per vCPU (a power of two, a multiple of the page
    /// size, at most KVM's maximum). Must come before any vCPU is created. Slots still need
    /// dirty logging (`log_dirty` in [`new`](Self::new)).
    pub fn enable_dirty_ring(&mut self, bytes: u32) -> Result<()> {
        if self.initially_set {
            return Err(KvmError::InitiallySetWithRing);
        }
        let acq_rel = ioctls::check_extension(&self.vm, ioctls::KVM_CAP_DIRTY_LOG_RING_ACQ_REL).unwrap_or(0);
        let plain = ioctls::check_extension(&self.vm, ioctls::KVM_CAP_DIRTY_LOG_RING).unwrap_or(0);
        let (cap, max) = if acq_rel > 0 {
            (ioctls::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel as u32)
        } else if plain > 0 {
            (ioctls::KVM_CAP_DIRTY_LOG_RING, plain as u32)
        } else {
            return Err(KvmError::Unsupported("KVM_CAP_DIRTY_LOG_RING"));
        };
        let page = sys::page_size() as u32;
        if !bytes.is_power_of_two() || !bytes.is_multiple_of(page) || bytes > max {
            return Err(KvmError::InvalidRingSize { size: bytes, max });
        }
        ioctls::enable_cap(&self.vm, cap, [u64::from(bytes), 0, 0, 0]).map_err(|e| {
            match e.raw_os_error() {
                // KVM refuses the ring once a vCPU exists.
                Some(libc::EINVAL) | Some(libc::EBUSY) => KvmError::RingAfterVcpu(e),
                _ => KvmError::Ioctl { op: "KVM_ENABLE_CAP(DIRTY_LOG_RING)", slot: None, source: e },
            }
        })?;
        self.ring_bytes = Some(bytes);
        Ok(())
    }

    /// Maps vCPU `vcpu`'s dirty ring (after [`enable_dirty_ring`](Self::enable_dirty_ring)).
    pub fn add_vcpu(&mut self, vcpu: &impl AsRawFd) -> Result<()> {
        let bytes = self.ring_bytes.ok_or(KvmError::RingNotEnabled)? as usize;
        let offset = ioctls::KVM_DIRTY_LOG_PAGE_OFFSET * sys::page_size() as u64;
        // SAFETY: `vcpu` is borrowed for this call, so its fd stays open while we use it; the
        // mapping keeps its own reference to the file afterwards.
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        // SAFETY: a new shared mapping of the vCPU fd's ring pages; no MAP_FIXED.
        let ptr = unsafe {
            sys::mmap(std::ptr::null_mut(), bytes, Protection::READ_WRITE, MapFlags::SHARED, Some(fd), offset)
        }
        .map_err(KvmError::RingMap)?;
        let count = (bytes / std::mem::size_of::<DirtyGfn>()) as u32;
        self.rings.push(VcpuRing { entries: ptr.cast(), count, fetch: 0, map_len: bytes });
        Ok(())
    }

    /// Makes KVM's slots match `mem`: regions that left lose their slot, new regions get one.
    /// Slots hold their region, so KVM never points at unmapped memory.
    pub fn register(&mut self, mem: &GuestMemoryMmap<B>) -> Result<()> {
        // Remove the slots of regions no longer in `mem`.
        let mut i = 0;
        while i < self.slots.len() {
            if mem.regions().iter().any(|r| Arc::ptr_eq(r, &self.slots[i].region)) {
                i += 1;
                continue;
            }
            let slot = &self.slots[i];
            let gone = UserspaceMemoryRegion {
                slot: slot.id,
                flags: slot.flags,
                guest_phys_addr: slot.region.start_addr().0,
                memory_size: 0,
                userspace_addr: slot.region.host_ptr() as u64,
            };
            // SAFETY: deleting a slot stops KVM's use of its memory.
            unsafe { ioctls::set_user_memory_region(&self.vm, &gone) }
                .map_err(ioctl_error("KVM_SET_USER_MEMORY_REGION(delete)", Some(slot.id)))?;
            self.slots.swap_remove(i);
        }
        // Add the new ones.
        for region in mem.regions() {
            if self.slots.iter().any(|s| Arc::ptr_eq(&s.region, region)) {
                continue;
            }
            let id = self
                .slot_range
                .clone()
                .find(|id| !self.slots.iter().any(|s| s.id == *id))
                .ok_or_else(|| KvmError::NoFreeSlot(self.slot_range.len() as u32))?;
            let mut flags = 0;
            if self.log_dirty {
                flags |= ioctls::KVM_MEM_LOG_DIRTY_PAGES;
            }
            if !region.protection().is_writable() {
                flags |= ioctls::KVM_MEM_READONLY;
            }
            let pages = (region.len() as usize).div_ceil(KVM_PAGE_SIZE);
            let desc = UserspaceMemoryRegion {
                slot: id,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.host_ptr() as u64,
            };
            // SAFETY: the region's mapping covers the slot and stays mapped while the slot
            // exists, because the slot holds an `Arc` to the region until it deletes the slot.
            // Guest writes to it are what guest memory is for (read-only regions get
            // KVM_MEM_READONLY).
            unsafe { ioctls::set_user_memory_region(&self.vm, &desc) }
                .map_err(ioctl_error("KVM_SET_USER_MEMORY_REGION", Some(id)))?;
            self.slots.push(Slot { id, region: region.clone(), flags, log: vec![0; pages.div_ceil(64)] });
        }
        self.slots.sort_by_key(|s| s.id);
        Ok(())
    }

    /// The slot numbers and the guest ranges they map, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = (u32, GuestAddress, u64)> + '_ {
        self.slots.iter().map(|s| (s.id, s.region.start_addr(), s.region.len()))
    }

    /// Fetches every logged slot's dirty log and ORs it into its region's bitmap; with manual
    /// protect, then clears in KVM exactly the bits merged, in chunks of at most
    /// [`CLEAR_CHUNK_PAGES`]. Returns the number of dirty pages KVM reported.
    pub fn sync_dirty_log(&mut self) -> Result<usize> {
        if self.ring_bytes.is_some() {
            return Err(KvmError::RingEnabled);
        }
        let mut total = 0;
        for slot in &mut self.slots {
            if slot.flags & ioctls::KVM_MEM_LOG_DIRTY_PAGES == 0 {
                continue;
            }
            // SAFETY: `slot.log` has one bit per 4 KiB page of the slot, as registered.
            unsafe { ioctls::get_dirty_log(&self.vm, slot.id, &mut slot.log) }
                .map_err(ioctl_error("KVM_GET_DIRTY_LOG", Some(slot.id)))?;
            total += merge_into(&slot.region, &slot.log)?;
            if self.manual_protect {
                clear_merged(&self.vm, slot)?;
            }
        }
        Ok(total)
    }

    /// Collects every mapped vCPU ring: each dirty entry marks its page in its region's
    /// bitmap and is handed back to KVM; then `KVM_RESET_DIRTY_RINGS`. Returns the number of
    /// entries collected.
    pub fn reap_dirty_rings(&mut self) -> Result<usize> {
        if self.ring_bytes.is_none() {
            return Err(KvmError::RingNotEnabled);
        }
        let mut total = 0;
        for ring in &mut self.rings {
            loop {
                let index = (ring.fetch % ring.count) as usize;
                // SAFETY: `index < count`, the number of entries in the ring mapping.
                let entry = unsafe { ring.entries.add(index) };
                // SAFETY: `flags` is the first, 4-byte aligned field of a live entry that KVM
                // shares with us; KVM's protocol accesses it atomically.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
                if flags.load(Ordering::Acquire) & ioctls::KVM_DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is DIRTY, so KVM finished writing slot and offset (the
                // acquire load above orders these reads after its release store).
                let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
                // `slots` is sorted by id (`register` keeps it so): one search per entry.
                let found = self.slots.binary_search_by_key(&(slot & 0xffff), |s| s.id);
                if let Some(s) = found.ok().map(|i| &self.slots[i]) {
                    let byte = (offset as usize).saturating_mul(KVM_PAGE_SIZE);
                    if byte < s.region.len() as usize {
                        s.region.bitmap().mark_dirty(byte, KVM_PAGE_SIZE);
                    }
                }
                flags.store(ioctls::KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                ring.fetch = ring.fetch.wrapping_add(1);
                total += 1;
            }
        }
        ioctls::reset_dirty_rings(&self.vm).map_err(ioctl_error("KVM_RESET_DIRTY_RINGS", None))?;
        Ok(total)
    }
}

/// ORs a slot's log (4 KiB pages) into its region's bitmap; returns the dirty page count.
fn merge_into<B: Bitmap + DirtyHarvest>(region: &GuestRegionMmap<B>, log: &[u64]) -> Result<usize> {
    let addr = region.start_addr();
    let page_size = region.bitmap().page_size().map_err(|source| KvmError::Bitmap { addr, source })?;
    let dirty = log.iter().map(|w| w.count_ones() as usize).sum();
    if dirty == 0 {
        return Ok(0);
    }
    if page_size == KVM_PAGE_SIZE {
        region.bitmap().merge_words(log).map_err(|source| KvmError::Bitmap { addr, source })?;
    } else {
        // A bitmap with another page size: mark each dirty 4 KiB page's bytes.
        for (w, &word) in log.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w * 64 + bits.trailing_zeros() as usize;
                region.bitmap().mark_dirty(page * KVM_PAGE_SIZE, KVM_PAGE_SIZE);
                bits &= bits - 1;
            }
        }
    }
    Ok(dirty)
}

/// Clears in KVM the bits of `slot.log` (already merged), run of non-zero words by run, each
/// ioctl at most [`CLEAR_CHUNK_PAGES`] pages, starting at multiples of 64 pages as KVM needs.
fn clear_merged<B: Bitmap>(vm: &impl AsRawFd, slot: &Slot<B>) -> Result<()> {
    let pages = (slot.region.len() as usize).div_ceil(KVM_PAGE_SIZE);
    let chunk_words = (CLEAR_CHUNK_PAGES / 64) as usize;
    let mut w = 0;
    while w < slot.log.len() {
        if slot.log[w] == 0 {
            w += 1;
            continue;
        }
        let start = w;
        while w < slot.log.len() && slot.log[w] != 0 && w - start < chunk_words {
            w += 1;
        }
        let first_page = start * 64;
        let num_pages = (w * 64).min(pages) - first_page;
        ioctls::clear_dirty_log(vm, slot.id, first_page as u64, num_pages as u32, &slot.log[start..w])
            .map_err(ioctl_error("KVM_CLEAR_DIRTY_LOG", Some(slot.id)))?;
    }
    Ok(())
}
