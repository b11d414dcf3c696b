//! Plug state for virtio-mem: a device's memory in fixed-size blocks, each plugged or not.
//!
//! # The model
//!
//! A [`PlugDevice`] owns one mapping for its whole guest range, `PROT_NONE` at first. Its
//! blocks are plugged and unplugged in ranges; guest memory sees the plugged ones:
//!
//! - **Regions are runs of plugged blocks.** [`plug`](PlugDevice::plug) and
//!   [`unplug`](PlugDevice::unplug) take a [`GuestMemoryMmap`] and return the next one, whose
//!   regions for the device are the maximal runs of plugged blocks inside each *block group*
//!   (see below). An unplugged block is in no region, so every API access to it is an error
//!   (`InvalidGuestAddress`, `InvalidRange`), never a fault; dirty harvests and snapshots see
//!   plugged blocks only. Publish the memory with
//!   [`GuestMemoryAtomic::update`](crate::GuestMemoryAtomic::update) like any hotplug.
//! - **Unplugged blocks are fenced and freed,** `PROT_NONE` and discarded (`MADV_DONTNEED`,
//!   or a punched hole in the device's memfd), as soon as no region covers them any more: old
//!   memory snapshots that still hold a region over a block keep it mapped until they go, so a
//!   reader that raced the unplug never faults.
//! - **Plugging takes the fence down** (the block becomes read-write zero memory again) before
//!   any region covers it, and marks the block dirty: its contents changed (to zeros), which a
//!   migration must send.
//! - **KVM follows block groups.** The device's range is cut into groups (a multiple of the
//!   block size, the VMM's choice: say 128 MiB); every region of a group names the group's
//!   region as its [`kvm_group`](crate::GuestRegionMmap::kvm_group), and
//!   [`KvmSlots::register`](crate::kvm::KvmSlots::register) gives a group one memslot while
//!   any block in it is plugged. Unplugging part of a group leaves its slot alone (the
//!   unplugged block is fenced underneath: a guest that touches what it unplugged makes
//!   `KVM_RUN` fail, a fail-stop, never an access of other memory); when the last block of a
//!   group is unplugged, the group's fence goes up only once its slot was deleted (the group
//!   region is released by `KvmSlots` when it deletes the slot); plugging a block of an empty
//!   group takes the fence down before the slot is made.
//! - **Dirty bits are the device's.** One bitmap covers the whole device, and every region is a
//!   window of it ([`AtomicBitmap::window`](crate::bitmap::AtomicBitmap::window)): regions are
//!   rebuilt as blocks come and go without a dirty bit ever moving or being lost, and KVM's log
//!   of a group slot merges into the same bits.
//!
//! Blocks are at least 256 KiB (64 pages: a bitmap word, so windows never share one) and a
//! power of two; groups are a multiple of blocks; the device a multiple of groups.
//!
//! ```
//! use guestmem::plug::{PlugBacking, PlugConfig, PlugDevice};
//! use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
//!
//! let dev = PlugDevice::<AtomicBitmap>::new(PlugConfig {
//!     guest_base: GuestAddress(1 << 32),
//!     size: 64 << 20,
//!     block_size: 2 << 20,
//!     group_size: 16 << 20,
//!     backing: PlugBacking::Anonymous,
//! })
//! .unwrap();
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let mem = dev.plug(&mem, 0, 3).unwrap(); // blocks 0..3: one run
//! mem.write_obj(7u64, GuestAddress((1 << 32) + (4 << 20))).unwrap();
//! let mem = dev.unplug(&mem, 1, 1).unwrap(); // block 1 goes: two runs
//! assert!(mem.read_obj::<u8>(GuestAddress((1 << 32) + (2 << 20))).is_err());
//! assert_eq!(mem.read_obj::<u64>(GuestAddress((1 << 32) + (4 << 20))).unwrap(), 7);
//! assert_eq!(mem.num_regions(), 3);
//! assert_eq!(dev.plugged_blocks(), 2);
//! ```

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, BitmapError, NewBitmap, WindowBitmap};
use crate::memory::{GuestMemoryError, GuestMemoryMmap};
use crate::mmap::{FileOffset, MmapError, MmapRegion, ViewBacking, ViewOwner};
use crate::region::GuestRegionMmap;
use crate::sys::{self, Advice, FallocateMode, MapFlags, MemfdFlags, Protection, Seals};

/// The smallest block: 64 pages, one word of a dirty bitmap.
const MIN_BLOCK: u64 = 64 * 4096;

/// Errors of a plug-state device.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    /// A configuration the device cannot take.
    #[error("invalid plug device configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// Blocks outside the device.
    #[error("blocks {first}..{first}+{count} are outside the device's {blocks} blocks")]
    OutOfRange {
        /// The first block asked for.
        first: u64,
        /// How many.
        count: u64,
        /// The device's blocks.
        blocks: u64,
    },
    /// A block to plug that is plugged already.
    #[error("block {0} is plugged already")]
    AlreadyPlugged(u64),
    /// A block to unplug that is not plugged.
    #[error("block {0} is not plugged")]
    NotPlugged(u64),
    /// A system call on the device's memory failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The device's dirty bitmap could not be made or windowed.
    #[error("dirty bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    /// The new guest memory could not be built (the device's range overlaps another region).
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// A result of a plug-state device.
pub type Result<T> = std::result::Result<T, PlugError>;

/// What backs a device's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlugBacking {
    /// Private anonymous memory; unplugged blocks are freed with `MADV_DONTNEED`.
    Anonymous,
    /// A memfd (sealed against shrinking and growing), shared, so a vhost-user backend can map
    /// it; unplugged blocks are freed by punching holes in it.
    Memfd {
        /// The memfd's name.
        name: String,
    },
}

/// The shape of a plug-state device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlugConfig {
    /// The guest address of the device's first block (page aligned).
    pub guest_base: GuestAddress,
    /// The device's size in bytes (a multiple of `group_size`).
    pub size: u64,
    /// The block size: a power of two, at least 256 KiB.
    pub block_size: u64,
    /// The block group size, the unit of KVM memslots: a multiple of `block_size`.
    pub group_size: u64,
    /// What backs the memory.
    pub backing: PlugBacking,
}

/// The plug state, under the device's lock.
struct State<B> {
    plugged: Vec<bool>,
    /// Live regions (not group regions) covering each block.
    views: Vec<u32>,
    fenced: Vec<bool>,
    /// Plugged blocks per group.
    group_plugged: Vec<u32>,
    /// The group regions that exist (KVM may map them).
    groups: Vec<Weak<GuestRegionMmap<B>>>,
    group_live: Vec<bool>,
}

/// The device: its mapping, bitmap and state, shared with the regions that are views of it.
struct Inner<B> {
    config: PlugConfig,
    base: *mut u8,
    size: usize,
    memfd: Option<FileOffset>,
    bitmap: B,
    state: Mutex<State<B>>,
    /// Serializes plug and unplug (each builds the next memory from the state).
    ops: Mutex<()>,
}

// SAFETY: the mapping belongs to the device; all access to it goes through regions (volatile
// accesses) or system calls under the state lock; B is Send + Sync where the device is used.
unsafe impl<B: Send + Sync> Send for Inner<B> {}
// SAFETY: as above.
unsafe impl<B: Send + Sync> Sync for Inner<B> {}

impl<B> fmt::Debug for Inner<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlugDevice").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A virtio-mem device's memory and plug state: see the [module docs](self).
pub struct PlugDevice<B> {
    inner: Arc<Inner<B>>,
}

impl<B> fmt::Debug for PlugDevice<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl<B> Clone for PlugDevice<B> {
    fn clone(&self) -> Self {
        PlugDevice { inner: self.inner.clone() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change under these locks is a few stores that leave the state consistent; a
    // poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B> Inner<B> {
    fn blocks(&self) -> usize {
        (self.config.size / self.config.block_size) as usize
    }

    fn block_len(&self) -> usize {
        self.config.block_size as usize
    }

    fn blocks_per_group(&self) -> usize {
        (self.config.group_size / self.config.block_size) as usize
    }

    fn group_of(&self, block: usize) -> usize {
        block / self.blocks_per_group()
    }

    fn block_ptr(&self, block: usize) -> *mut u8 {
        self.base.wrapping_add(block * self.block_len())
    }

    /// `PROT_NONE` over a block, then its memory freed.
    fn fence(&self, state: &mut State<B>, block: usize) {
        let ptr = self.block_ptr(block);
        let len = self.block_len();
        // SAFETY: the block lies in our mapping and no region covers it any more (views 0), so
        // nothing accesses it through the API; removing access and dropping its contents is
        // ours to do.
        let protected = unsafe { sys::mprotect(ptr, len, Protection::NONE) }.is_ok();
        match &self.memfd {
            Some(fo) => {
                let _ = sys::fallocate(
                    std::os::fd::AsFd::as_fd(fo),
                    FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE,
                    (block * len) as u64,
                    len as u64,
                );
            }
            None => {
                // SAFETY: as above: no region covers the block, its contents are ours to drop.
                let _ = unsafe { sys::madvise(ptr, len, Advice::DontNeed) };
            }
        }
        // Should mprotect fail (a full VMA table), the block stays mapped, read-write: no
        // region covers it, so nothing reaches it through the API; it is fenced next time.
        state.fenced[block] = protected;
    }

    /// Fences every block of `blocks` that may be fenced now.
    fn fence_eligible(&self, state: &mut State<B>, blocks: std::ops::Range<usize>) {
        for b in blocks {
            let g = self.group_of(b);
            let group_may = state.group_plugged[g] > 0 || !state.group_live[g];
            if !state.plugged[b] && state.views[b] == 0 && !state.fenced[b] && group_may {
                self.fence(state, b);
            }
        }
    }

    /// The blocks `[addr, addr + len)` of the device covers.
    fn blocks_of(&self, addr: *mut u8, len: usize) -> std::ops::Range<usize> {
        let first = (addr as usize - self.base as usize) / self.block_len();
        first..first + len / self.block_len()
    }
}

impl<B> Drop for Inner<B> {
    fn drop(&mut self) {
        // SAFETY: every region over the mapping holds an `Arc` to us: none is left.
        let _ = unsafe { sys::munmap(self.base, self.size) };
    }
}

/// A run of plugged blocks: its release may fence them.
struct RunOwner<B>(Arc<Inner<B>>);

impl<B> fmt::Debug for RunOwner<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunOwner")
    }
}

impl<B: Send + Sync> ViewOwner for RunOwner<B> {
    fn released(&self, addr: *mut u8, len: usize) {
        let inner = &self.0;
        let blocks = inner.blocks_of(addr, len);
        let mut state = lock(&inner.state);
        for b in blocks.clone() {
            state.views[b] = state.views[b].saturating_sub(1);
        }
        inner.fence_eligible(&mut state, blocks);
    }
}

/// A block group's region (KVM's view of the group): its release lets an empty group fence.
struct GroupOwner<B>(Arc<Inner<B>>);

impl<B> fmt::Debug for GroupOwner<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupOwner")
    }
}

impl<B: Send + Sync> ViewOwner for GroupOwner<B> {
    fn released(&self, addr: *mut u8, len: usize) {
        let inner = &self.0;
        let blocks = inner.blocks_of(addr, len);
        let mut state = lock(&inner.state);
        let g = inner.group_of(blocks.start);
        state.group_live[g] = false;
        inner.fence_eligible(&mut state, blocks);
    }
}

impl<B> PlugDevice<B>
where
    B: Bitmap + NewBitmap + WindowBitmap + Send + Sync + 'static,
{
    /// A device of `config.size` bytes, every block unplugged (fenced, using no memory).
    pub fn new(config: PlugConfig) -> Result<Self> {
        let bad = |reason| Err(PlugError::InvalidConfig { reason });
        let page = sys::page_size() as u64;
        if !config.block_size.is_power_of_two() || config.block_size < MIN_BLOCK {
            return bad("the block size must be a power of two of at least 256 KiB");
        }
        if config.group_size == 0 || !config.group_size.is_multiple_of(config.block_size) {
            return bad("the group size must be a non-zero multiple of the block size");
        }
        if config.size == 0 || !config.size.is_multiple_of(config.group_size) {
            return bad("the size must be a non-zero multiple of the group size");
        }
        if !config.guest_base.0.is_multiple_of(page)
            || config.guest_base.0.checked_add(config.size - 1).is_none()
        {
            return bad("the guest range must be page aligned and fit in the guest address space");
        }
        let size = usize::try_from(config.size)
            .map_err(|_| PlugError::InvalidConfig { reason: "the size does not fit in the address space" })?;
        let blocks = size / config.block_size as usize;
        let groups = size / config.group_size as usize;
        let os = |op| move |source| PlugError::Os { op, source };
        let bitmap = B::try_with_len(size)?;
        let memfd = match &config.backing {
            PlugBacking::Anonymous => None,
            PlugBacking::Memfd { name } => {
                let name = std::ffi::CString::new(name.replace('\0', "")).unwrap_or_default();
                let fd = sys::memfd_create(&name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                    .map_err(os("memfd_create"))?;
                let fd_b = std::os::fd::AsFd::as_fd(&fd);
                sys::fd::ftruncate(fd_b, config.size).map_err(os("ftruncate"))?;
                sys::fd::add_seals(fd_b, Seals::SHRINK | Seals::GROW).map_err(os("F_ADD_SEALS"))?;
                Some(FileOffset::new(fd.into(), 0))
            }
        };
        let (flags, fd) = match &memfd {
            None => (MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE, None),
            Some(fo) => (MapFlags::SHARED, Some(std::os::fd::AsFd::as_fd(fo))),
        };
        // SAFETY: a new mapping, no MAP_FIXED; PROT_NONE until blocks are plugged.
        let base = unsafe { sys::mmap(std::ptr::null_mut(), size, Protection::NONE, flags, fd, 0) }
            .map_err(os("mmap of the device"))?;
        let state = State {
            plugged: vec![false; blocks],
            views: vec![0; blocks],
            fenced: vec![true; blocks],
            group_plugged: vec![0; groups],
            groups: (0..groups).map(|_| Weak::new()).collect(),
            group_live: vec![false; groups],
        };
        Ok(PlugDevice {
            inner: Arc::new(Inner {
                config,
                base,
                size,
                memfd,
                bitmap,
                state: Mutex::new(state),
                ops: Mutex::new(()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PlugConfig {
        &self.inner.config
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        self.inner.blocks() as u64
    }

    /// Whether block `block` is plugged (`false` past the end).
    pub fn is_plugged(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|b| lock(&self.inner.state).plugged.get(b).copied())
            .unwrap_or(false)
    }

    /// Whether block `block` is fenced: `PROT_NONE`, its memory freed (`false` past the end).
    /// An unplugged block is fenced once no region covers it any more.
    pub fn is_fenced(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|b| lock(&self.inner.state).fenced.get(b).copied())
            .unwrap_or(false)
    }

    /// How many blocks are plugged.
    pub fn plugged_blocks(&self) -> u64 {
        lock(&self.inner.state).plugged.iter().filter(|&&p| p).count() as u64
    }

    /// The device's dirty bitmap (every region of the device is a window of it).
    pub fn bitmap(&self) -> &B {
        &self.inner.bitmap
    }

    /// The memfd behind the device (for a vhost-user backend), with the `Memfd` backing.
    pub fn memfd(&self) -> Option<&FileOffset> {
        self.inner.memfd.as_ref()
    }

    fn check_range(&self, first: u64, count: u64) -> Result<std::ops::Range<usize>> {
        let blocks = self.blocks();
        match first.checked_add(count) {
            Some(end) if count > 0 && end <= blocks => Ok(first as usize..end as usize),
            _ => Err(PlugError::OutOfRange { first, count, blocks }),
        }
    }

    /// Plugs blocks `first..first + count` (all of them unplugged, else
    /// [`PlugError::AlreadyPlugged`] and nothing changes) and returns `mem` with the device's
    /// regions rebuilt; `mem` itself is unchanged. The blocks are zero memory, marked dirty.
    pub fn plug(&self, mem: &GuestMemoryMmap<B>, first: u64, count: u64) -> Result<GuestMemoryMmap<B>> {
        let range = self.check_range(first, count)?;
        let inner = &self.inner;
        let _op = lock(&inner.ops);
        let plugged = {
            let mut state = lock(&inner.state);
            if let Some(b) = range.clone().find(|&b| state.plugged[b]) {
                return Err(PlugError::AlreadyPlugged(b as u64));
            }
            // Plugged from now on (so that no region released meanwhile fences them again),
            // and the fence comes down before any region covers the blocks.
            for b in range.clone() {
                state.plugged[b] = true;
                state.group_plugged[inner.group_of(b)] += 1;
            }
            for b in range.clone() {
                if state.fenced[b] {
                    // SAFETY: the block lies in our mapping and no region covers it.
                    if let Err(source) = unsafe {
                        sys::mprotect(inner.block_ptr(b), inner.block_len(), Protection::READ_WRITE)
                    } {
                        Self::revert_plug(inner, &mut state, &range);
                        return Err(PlugError::Os { op: "mprotect (plug)", source });
                    }
                    state.fenced[b] = false;
                }
            }
            state.plugged.clone()
        };
        let next = match self.rebuild(mem, &plugged, &range) {
            Ok(next) => next,
            Err(e) => {
                // The half-built regions are gone (their release took the state lock); the
                // blocks go back to unplugged, and fenced.
                Self::revert_plug(inner, &mut lock(&inner.state), &range);
                return Err(e);
            }
        };
        // Zeros now, whatever a destination holds: a migration must send them.
        inner.bitmap.mark_dirty(range.start * inner.block_len(), range.len() * inner.block_len());
        Ok(next)
    }

    /// Undoes the state changes of a plug that failed.
    fn revert_plug(inner: &Inner<B>, state: &mut State<B>, range: &std::ops::Range<usize>) {
        for b in range.clone() {
            state.plugged[b] = false;
            state.group_plugged[inner.group_of(b)] -= 1;
        }
        inner.fence_eligible(state, range.clone());
    }

    /// Unplugs blocks `first..first + count` (all of them plugged, else
    /// [`PlugError::NotPlugged`] and nothing changes) and returns `mem` without them; `mem`
    /// itself is unchanged. Each block is fenced and freed once no region covers it (the
    /// regions of `mem` and of older snapshots still do until they are dropped).
    pub fn unplug(&self, mem: &GuestMemoryMmap<B>, first: u64, count: u64) -> Result<GuestMemoryMmap<B>> {
        let range = self.check_range(first, count)?;
        let inner = &self.inner;
        let _op = lock(&inner.ops);
        let mut plugged = {
            let state = lock(&inner.state);
            if let Some(b) = range.clone().find(|&b| !state.plugged[b]) {
                return Err(PlugError::NotPlugged(b as u64));
            }
            state.plugged.clone()
        };
        for b in range.clone() {
            plugged[b] = false;
        }
        let next = self.rebuild(mem, &plugged, &range)?;
        let mut state = lock(&inner.state);
        for b in range.clone() {
            state.plugged[b] = false;
            state.group_plugged[inner.group_of(b)] -= 1;
        }
        // Blocks no region covers any more (none, usually: `mem` still holds them).
        inner.fence_eligible(&mut state, range);
        Ok(next)
    }

    /// `mem` with the device's regions of the groups `changed` touches replaced by the runs of
    /// `plugged` blocks in them.
    fn rebuild(
        &self,
        mem: &GuestMemoryMmap<B>,
        plugged: &[bool],
        changed: &std::ops::Range<usize>,
    ) -> Result<GuestMemoryMmap<B>> {
        let inner = &self.inner;
        let bpg = inner.blocks_per_group();
        let groups = inner.group_of(changed.start)..=inner.group_of(changed.end - 1);
        // The regions that stay: all but the device's own in the changed groups (those whose
        // KVM group is the group's region).
        let group_regions: Vec<Arc<GuestRegionMmap<B>>> = {
            let state = lock(&inner.state);
            groups.clone().filter_map(|g| state.groups[g].upgrade()).collect()
        };
        let mut regions: Vec<Arc<GuestRegionMmap<B>>> = mem
            .regions()
            .iter()
            .filter(|r| !r.kvm_group().is_some_and(|kg| group_regions.iter().any(|g| Arc::ptr_eq(g, kg))))
            .cloned()
            .collect();
        drop(group_regions);
        for g in groups {
            let blocks = g * bpg..(g + 1) * bpg;
            let mut b = blocks.start;
            while b < blocks.end {
                if !plugged[b] {
                    b += 1;
                    continue;
                }
                let run = b;
                while b < blocks.end && plugged[b] {
                    b += 1;
                }
                regions.push(Arc::new(self.run_region(g, run..b)?));
            }
        }
        Ok(GuestMemoryMmap::from_arc_regions(regions)?)
    }

    /// The region of plugged blocks `run` (inside group `g`), counted as a view of them.
    fn run_region(&self, g: usize, run: std::ops::Range<usize>) -> Result<GuestRegionMmap<B>> {
        let inner = &self.inner;
        let group = self.group_region(g)?;
        let offset = run.start * inner.block_len();
        let len = run.len() * inner.block_len();
        let bitmap = inner.bitmap.window(offset, len)?;
        {
            let mut state = lock(&inner.state);
            for b in run.clone() {
                state.views[b] += 1;
            }
        }
        // From here the region's drop undoes the count above.
        // SAFETY: the blocks of `run` are read-write (plug took their fence down, and a block
        // is fenced only once no region covers it: this one counts now); the device keeps the
        // mapping while the region holds its `Arc`; guest memory is never referenced.
        let mapping = unsafe {
            MmapRegion::view(
                inner.base.wrapping_add(offset),
                len,
                bitmap,
                self.backing(offset),
                Arc::new(RunOwner(inner.clone())),
            )
        };
        let guest = GuestAddress(inner.config.guest_base.0 + offset as u64);
        Ok(GuestRegionMmap::in_kvm_group(mapping, guest, group)?)
    }

    /// Group `g`'s region (what KVM maps), made when its first run is.
    fn group_region(&self, g: usize) -> Result<Arc<GuestRegionMmap<B>>> {
        let inner = &self.inner;
        // Not under the state lock while the region is made: should making it fail, its
        // drop takes the lock. (Plug and unplug are serialized, so no one else makes it.)
        if let Some(r) = lock(&inner.state).groups[g].upgrade() {
            return Ok(r);
        }
        let offset = g * inner.config.group_size as usize;
        let len = inner.config.group_size as usize;
        let bitmap = inner.bitmap.window(offset, len)?;
        // SAFETY: the group's range lies in our mapping, which the device keeps while the
        // region holds its `Arc`. The region is never used for access by guestmem (it is not
        // in any memory; KvmSlots only names its range to KVM and merges into its bitmap), so
        // fenced blocks inside it are never touched through it.
        let mapping = unsafe {
            MmapRegion::view(
                inner.base.wrapping_add(offset),
                len,
                bitmap,
                self.backing(offset),
                Arc::new(GroupOwner(inner.clone())),
            )
        };
        let region =
            Arc::new(GuestRegionMmap::new(mapping, GuestAddress(inner.config.guest_base.0 + offset as u64))?);
        let mut state = lock(&inner.state);
        state.groups[g] = Arc::downgrade(&region);
        state.group_live[g] = true;
        Ok(region)
    }

    fn backing(&self, offset: usize) -> ViewBacking {
        match &self.inner.memfd {
            Some(fo) => ViewBacking::File(fo.with_start(offset as u64)),
            None => ViewBacking::Anonymous,
        }
    }
}

impl From<MmapError> for PlugError {
    fn from(e: MmapError) -> Self {
        PlugError::Memory(GuestMemoryError::Mmap { base: GuestAddress(0), source: e })
    }
}
