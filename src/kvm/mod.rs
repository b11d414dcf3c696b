//! KVM integration (feature `kvm`): memslots for every region of a [`GuestMemoryMmap`], and
//! the guest's writes (KVM's dirty log or dirty ring) merged into the regions' own bitmaps, so
//! that one harvest of guestmem's bitmaps gives the union of VMM and guest writes.
//!
//! [`KvmSlots`] is made from any VM descriptor (kvm-ioctls' `VmFd`, a `File`, an `OwnedFd`):
//! it keeps its own duplicate, checked to be a KVM VM, and issues the ioctls itself through
//! [`sys::kvm`](mod@crate::sys::kvm).
//!
//! # What it promises
//!
//! - **A memslot never outlives the memory it names.** Each slot holds an `Arc` to its region,
//!   so the mapping stays while KVM can reach it; a slot is deleted before its region is let go
//!   ([`register`](KvmSlots::register) after hotplug removal, and dropping the `KvmSlots`, which
//!   deletes every slot). The duplicate VM descriptor keeps the VM reachable for that even if
//!   the caller closed its own. If KVM refuses to delete a slot (it never does for a slot that
//!   exists), the region is leaked instead of unmapped: memory stays mapped rather than a slot
//!   pointing at whatever the host puts there next.
//! - **Ownership is exclusive and checked.** One `KvmSlots` per VM: a second one on the same VM
//!   (the same open file, compared with `kcmp(2)`, whichever descriptor it came through) is
//!   [`KvmError::VmAlreadyOwned`]. Slot numbers outside [`with_slot_range`](KvmSlots::with_slot_range)
//!   are left to the VMM. A vCPU's ring is mapped once ([`KvmError::DuplicateVcpu`]).
//! - **Dirty-log buffers cannot overflow.** Each slot's log buffer is a mapping of its own,
//!   sized for the slot as registered, followed by a `PROT_NONE` guard page: should the slot
//!   have been changed behind our back (by unsafe code calling the raw ioctl), KVM's copy stops
//!   at the guard with `EFAULT` ([`KvmError::SlotChanged`]) instead of writing past the buffer.
//! - **Nothing is lost or misfiled.** Misuse is refused before any ioctl: syncing a log that
//!   was never on ([`KvmError::NotLogging`]), logging a writable region whose tracking is off
//!   ([`KvmError::Bitmap`] at registration). KVM's bits are cleared only after they were merged.
//!   With the dirty ring, a deleted slot's number is not given to a new region until the rings
//!   were reaped once more, so an entry KVM queued for the old slot is never credited to the
//!   new one. Every early return leaves the slot list exactly as KVM has it, sorted.
//!
//! # guest_memfd
//!
//! [`KvmSlots::create_guest_memfd`] makes a guest_memfd the host can map, for a region to be
//! built on; `register` gives such a region a `KVM_SET_USER_MEMORY_REGION2` slot with
//! `KVM_MEM_GUEST_MEMFD`, and the guest's accesses then go to the guest_memfd (the region keeps
//! it open). What was measured on this project's machines (Linux 6.18, the default VM type):
//!
//! - `KVM_CAP_GUEST_MEMFD` and `KVM_CAP_USER_MEMORY2` are present; `KVM_CAP_GUEST_MEMFD_FLAGS`
//!   offers `MMAP | INIT_SHARED`. Without `MMAP` the fd cannot be mapped (`ENODEV`); with
//!   `MMAP` but without `INIT_SHARED` a host access to the mapping raises SIGBUS (the memory
//!   is private), so guestmem always asks for both.
//! - A guest_memfd has a fixed size (`ftruncate` is `EINVAL`): its mapping cannot fault by
//!   truncation. Holes can be punched (`fallocate(PUNCH_HOLE)`, what `discard` does), and the
//!   guest then reads zeros; plain allocation needs `FALLOC_FL_KEEP_SIZE`.
//! - KVM refuses `KVM_MEM_LOG_DIRTY_PAGES` and `KVM_MEM_READONLY` on a guest_memfd slot
//!   (`EINVAL`): a read-only guest_memfd region is [`KvmError::GuestMemfd`], and in a logged
//!   `KvmSlots` every sync reports a guest_memfd region dirty as a whole (a migration stays
//!   correct, and sends it each round).
//! - `KVM_CAP_MEMORY_ATTRIBUTES` is 0: this VM type has no private/shared conversion
//!   (`KVM_SET_MEMORY_ATTRIBUTES`), so guestmem offers none.
//! - A guest_memfd made on one VM cannot back another VM's slot (`EINVAL`).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use guestmem::kvm::KvmSlots;
//! use guestmem::{AtomicBitmap, GuestAddress, GuestMemoryMmap};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! let mut slots = KvmSlots::new(&vm, true)?;
//! slots.register(&mem)?;
//! // ... run vCPUs ...
//! slots.sync_dirty_log()?; // guest writes now in mem's bitmaps, beside the VMM's own
//! let dirty = mem.take_dirty_ranges(|_addr, _len| {})?;
//! # let _ = dirty;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::bitmap::{Bitmap, BitmapError, DirtyHarvest};
use crate::memory::GuestMemoryMmap;
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::kvm::{
    self as ioctls, DirtyRing, KvmVcpuFd, KvmVmFd, UserspaceMemoryRegion, UserspaceMemoryRegion2,
};
use crate::sys::{self, MapFlags, Protection};
use crate::GuestAddress;

/// The page size of KVM's dirty log and dirty ring.
pub const KVM_PAGE_SIZE: usize = 4096;

/// How many pages one `KVM_CLEAR_DIRTY_LOG` clears at most, so that a large VM does not stall
/// its vCPUs on one long clear (256 Ki pages = 1 GiB).
pub const CLEAR_CHUNK_PAGES: u32 = 256 * 1024;

/// `KVM_CAP_NR_MEMSLOTS`.
const KVM_CAP_NR_MEMSLOTS: u32 = 10;

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
    /// The descriptor given as the VM is not a KVM VM (or is not open).
    #[error("not a KVM VM: {0}")]
    NotAVm(#[source] io::Error),
    /// The descriptor given as a vCPU is not a KVM vCPU (or is not open).
    #[error("not a KVM vCPU: {0}")]
    NotAVcpu(#[source] io::Error),
    /// Another `KvmSlots` already owns this VM's memslots.
    #[error("another KvmSlots already manages this VM's memslots")]
    VmAlreadyOwned,
    /// The vCPU's dirty ring is already mapped.
    #[error("this vCPU's dirty ring is already mapped")]
    DuplicateVcpu,
    /// The kernel lacks a capability.
    #[error("KVM lacks {0}")]
    Unsupported(&'static str),
    /// The dirty ring is on already (enabled through this `KvmSlots`, or by someone else).
    #[error("the dirty ring is already enabled on this VM")]
    RingAlreadyEnabled,
    /// KVM refused the dirty ring: it does once a vCPU exists, and for a size below its
    /// minimum (KVM keeps some entries in reserve, more on hosts with PML).
    #[error("KVM refused a dirty ring of {size} bytes (a vCPU exists already, or the size is below KVM's minimum): {source}")]
    RingRefused {
        /// The size asked for.
        size: u32,
        /// KVM's answer.
        source: io::Error,
    },
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
    /// A dirty-log operation on slots registered without dirty logging: it could only ever
    /// report nothing.
    #[error(
        "the slots were registered without dirty logging (KvmSlots::new(_, false)): there is no log to read"
    )]
    NotLogging,
    /// More regions than slot numbers to give them.
    #[error("no free memslot number ({0} available)")]
    NoFreeSlot(u32),
    /// A region whose length is not a multiple of the 4 KiB page (a region made with
    /// `GuestRegionMmap::with_len`): KVM maps whole pages only, and a slot over the rounded
    /// mapping would let the guest write bytes past the region's end.
    #[error("region at {addr} is {len:#x} bytes, not a whole number of pages: KVM cannot map it")]
    PartialPage {
        /// Start of the region.
        addr: GuestAddress,
        /// Its length.
        len: u64,
    },
    /// A region's bitmap cannot take KVM's bits (tracking switched off, say).
    #[error("the bitmap of the region at {addr} cannot take KVM's dirty bits: {source}")]
    Bitmap {
        /// The region's guest address.
        addr: GuestAddress,
        /// Why.
        source: BitmapError,
    },
    /// A slot's dirty log did not fit the buffer sized for the slot as registered: the slot
    /// was changed behind this `KvmSlots`'s back (the raw ioctl, from unsafe code).
    #[error("slot {slot} no longer has the size it was registered with: its dirty log does not fit")]
    SlotChanged {
        /// The slot number.
        slot: u32,
    },
    /// Mapping a vCPU's dirty ring failed (or the ring is smaller than this VM's ring size).
    #[error("mapping the dirty ring of a vCPU failed: {0}")]
    RingMap(io::Error),
    /// A guest_memfd region KVM cannot take as asked.
    #[error("the guest_memfd region at {addr} cannot be registered: {reason}")]
    GuestMemfd {
        /// The region's guest address.
        addr: GuestAddress,
        /// Why.
        reason: &'static str,
    },
    /// Allocating a slot's dirty-log buffer failed.
    #[error("allocating the dirty-log buffer of a slot of {pages} pages failed: {source}")]
    LogBuffer {
        /// Pages of the slot.
        pages: usize,
        /// The error.
        source: io::Error,
    },
}

/// A result of the KVM integration.
pub type Result<T> = std::result::Result<T, KvmError>;

fn ioctl_error(op: &'static str, slot: Option<u32>) -> impl FnOnce(io::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, slot, source }
}

/// A slot's dirty-log buffer: its own mapping, one bit per 4 KiB page of the slot, followed by
/// a `PROT_NONE` guard page, so a log larger than the slot registered stops at the guard.
#[derive(Debug)]
struct LogBuffer {
    words: *mut u64,
    num_words: usize,
    map_len: usize,
}

// SAFETY: the buffer is a private mapping owned by this value; KVM writes it only during our
// own `KVM_GET_DIRTY_LOG` calls, which borrow it mutably.
unsafe impl Send for LogBuffer {}
// SAFETY: as above; shared access only reads it.
unsafe impl Sync for LogBuffer {}

impl LogBuffer {
    fn new(pages: usize) -> Result<Self> {
        let page = sys::page_size();
        let num_words = pages.div_ceil(64).max(1);
        let fail = |source| KvmError::LogBuffer { pages, source };
        let data_len = num_words
            .checked_mul(8)
            .and_then(|b| b.checked_next_multiple_of(page))
            .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        let map_len = data_len + page;
        // SAFETY: a new private anonymous mapping; no MAP_FIXED.
        let ptr = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                map_len,
                Protection::READ_WRITE,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE,
                None,
                0,
            )
        }
        .map_err(fail)?;
        // SAFETY: the last page of our own new mapping, used by nobody.
        if let Err(e) = unsafe { sys::mprotect(ptr.add(data_len), page, Protection::NONE) } {
            // SAFETY: our own mapping, unused.
            let _ = unsafe { sys::munmap(ptr, map_len) };
            return Err(fail(e));
        }
        Ok(LogBuffer { words: ptr.cast(), num_words, map_len })
    }

    fn words(&self) -> &[u64] {
        // SAFETY: the mapping holds `num_words` zero-initialized words, written only by KVM
        // during `fetch`, which borrows `self` mutably.
        unsafe { std::slice::from_raw_parts(self.words, self.num_words) }
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` into the buffer.
    fn fetch(&mut self, vm: &KvmVmFd, slot: u32) -> Result<()> {
        // SAFETY: the buffer has one bit per page of the slot as we registered it; if the slot
        // now has more pages, the copy runs into the guard page and fails with EFAULT.
        match unsafe { ioctls::get_dirty_log(vm, slot, self.words) } {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Err(KvmError::SlotChanged { slot }),
            Err(e) => Err(KvmError::Ioctl { op: "KVM_GET_DIRTY_LOG", slot: Some(slot), source: e }),
        }
    }
}

impl Drop for LogBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; `words()` borrows end with `self`.
        let _ = unsafe { sys::munmap(self.words.cast(), self.map_len) };
    }
}

/// What a slot maps, and the buffer its dirty log is fetched into.
#[derive(Debug)]
struct Slot<B> {
    /// The slot as registered with KVM (`memory_size` is the region's length).
    desc: UserspaceMemoryRegion2,
    /// Registered with `KVM_SET_USER_MEMORY_REGION2` (a guest_memfd slot), and so deleted
    /// with it too.
    v2: bool,
    /// Holds the mapping while KVM may use it.
    region: Arc<GuestRegionMmap<B>>,
    /// The dirty-log buffer (slots with `KVM_MEM_LOG_DIRTY_PAGES` only).
    log: Option<LogBuffer>,
    /// A writable slot whose guest writes KVM cannot log (a guest_memfd slot in a logged
    /// `KvmSlots`): every sync reports it dirty as a whole.
    unlogged: bool,
}

impl<B> Slot<B> {
    fn id(&self) -> u32 {
        self.desc.slot
    }

    /// Creates (or, with size 0, deletes) the slot in KVM.
    ///
    /// # Safety
    /// As `KVM_SET_USER_MEMORY_REGION`: while the slot exists its memory stays mapped (the
    /// slot holds its region).
    unsafe fn set(&self, vm: &KvmVmFd, memory_size: u64) -> io::Result<()> {
        let d = UserspaceMemoryRegion2 { memory_size, ..self.desc };
        if self.v2 {
            // SAFETY: the caller's contract.
            unsafe { ioctls::set_user_memory_region2(vm, &d) }
        } else {
            let v1 = UserspaceMemoryRegion {
                slot: d.slot,
                flags: d.flags,
                guest_phys_addr: d.guest_phys_addr,
                memory_size: d.memory_size,
                userspace_addr: d.userspace_addr,
            };
            // SAFETY: the caller's contract.
            unsafe { ioctls::set_user_memory_region(vm, &v1) }
        }
    }
}

/// One vCPU's dirty ring.
#[derive(Debug)]
struct VcpuRing {
    /// Our own descriptor of the vCPU, to recognise it if it is added again.
    vcpu: KvmVcpuFd,
    ring: DirtyRing,
    fetch: u32,
}

/// The VM descriptors of every live `KvmSlots`, to refuse a second owner of one VM.
static OWNERS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn owners() -> std::sync::MutexGuard<'static, Vec<RawFd>> {
    // The list is changed by single pushes and removals: a panic cannot leave it inconsistent.
    OWNERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The memslots of one VM and the merge of its dirty pages into guestmem's bitmaps.
///
/// See the [module docs](self) for what it promises.
#[derive(Debug)]
pub struct KvmSlots<B> {
    vm: KvmVmFd,
    log_dirty: bool,
    /// Sorted by slot number, always: the ring reaper binary-searches it.
    slots: Vec<Slot<B>>,
    manual_protect: bool,
    initially_set: bool,
    ring_bytes: Option<u32>,
    rings: Vec<VcpuRing>,
    /// Slot numbers deleted since the rings were last reaped: not given out again until then.
    retired: Vec<u32>,
    /// Slot numbers this instance may use.
    slot_range: std::ops::Range<u32>,
}

impl<B: Bitmap + DirtyHarvest> KvmSlots<B> {
    /// Slots on the VM `vm`, with dirty logging on each writable slot when `log_dirty`.
    ///
    /// Keeps a duplicate of `vm`'s descriptor, checked to be a KVM VM ([`KvmError::NotAVm`]
    /// otherwise). A VM has at most one `KvmSlots` at a time ([`KvmError::VmAlreadyOwned`]).
    pub fn new(vm: &impl AsRawFd, log_dirty: bool) -> Result<Self> {
        let vm = KvmVmFd::duplicate(vm).map_err(KvmError::NotAVm)?;
        let mut owners = owners();
        for &fd in owners.iter() {
            // SAFETY: `fd` is the VM descriptor of a live `KvmSlots`, which removes it from the
            // list (under this lock) before closing it.
            let other = unsafe { BorrowedFd::borrow_raw(fd) };
            match sys::fd::same_file(vm.as_fd(), other) {
                Ok(false) => {}
                Ok(true) => return Err(KvmError::VmAlreadyOwned),
                // Without kcmp (CONFIG_KCMP off) VMs cannot be told apart: one owner at a time.
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Err(KvmError::VmAlreadyOwned),
                Err(e) => return Err(KvmError::Ioctl { op: "kcmp", slot: None, source: e }),
            }
        }
        owners.push(vm.as_raw_fd());
        drop(owners);
        // 32 is the oldest kernels' count, should the query fail.
        let max_slots = ioctls::check_extension(&vm, KVM_CAP_NR_MEMSLOTS)
            .ok()
            .filter(|&n| n > 0)
            .map_or(32, |n| n as u32);
        Ok(KvmSlots {
            vm,
            log_dirty,
            slots: Vec::new(),
            manual_protect: false,
            initially_set: false,
            ring_bytes: None,
            rings: Vec::new(),
            retired: Vec::new(),
            slot_range: 0..max_slots,
        })
    }

    /// Uses only slot numbers in `range` (within KVM's limit), leaving the others to the VMM's
    /// own devices (ROMs, shared memory windows). Slots already registered keep their numbers.
    #[must_use]
    pub fn with_slot_range(mut self, range: std::ops::Range<u32>) -> Self {
        let end = range.end.min(self.slot_range.end);
        self.slot_range = range.start.min(end)..end;
        self
    }

    /// Our duplicate of the VM descriptor.
    pub fn vm(&self) -> &KvmVmFd {
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
        ioctls::enable_manual_dirty_log_protect(&self.vm, flags)
            .map_err(ioctl_error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", None))?;
        self.manual_protect = true;
        self.initially_set = initially_set;
        Ok(())
    }

    /// Turns on the dirty ring with `bytes` per vCPU (a power of two, a multiple of the page
    /// size, at most KVM's maximum). Must come before any vCPU is created, and needs dirty
    /// logging (`log_dirty` in [`new`](Self::new)): the ring reports only logged slots.
    pub fn enable_dirty_ring(&mut self, bytes: u32) -> Result<()> {
        if self.initially_set {
            return Err(KvmError::InitiallySetWithRing);
        }
        if !self.log_dirty {
            return Err(KvmError::NotLogging);
        }
        if self.ring_bytes.is_some() {
            return Err(KvmError::RingAlreadyEnabled);
        }
        let acq_rel = ioctls::check_extension(&self.vm, ioctls::KVM_CAP_DIRTY_LOG_RING_ACQ_REL).unwrap_or(0);
        let plain = ioctls::check_extension(&self.vm, ioctls::KVM_CAP_DIRTY_LOG_RING).unwrap_or(0);
        let (use_acq_rel, max) = if acq_rel > 0 {
            (true, acq_rel as u32)
        } else if plain > 0 {
            (false, plain as u32)
        } else {
            return Err(KvmError::Unsupported("KVM_CAP_DIRTY_LOG_RING"));
        };
        let page = sys::page_size() as u32;
        if !bytes.is_power_of_two() || !bytes.is_multiple_of(page) || bytes > max {
            return Err(KvmError::InvalidRingSize { size: bytes, max });
        }
        ioctls::enable_dirty_log_ring(&self.vm, use_acq_rel, bytes).map_err(|e| {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return KvmError::Ioctl { op: "KVM_ENABLE_CAP(DIRTY_LOG_RING)", slot: None, source: e };
            }
            // EINVAL: on already (someone else enabled it), a vCPU exists, or below KVM's
            // minimum; the first can be told from the others.
            match ioctls::dirty_ring_is_on(&self.vm) {
                Ok(true) => KvmError::RingAlreadyEnabled,
                _ => KvmError::RingRefused { size: bytes, source: e },
            }
        })?;
        self.ring_bytes = Some(bytes);
        Ok(())
    }

    /// Maps vCPU `vcpu`'s dirty ring (after [`enable_dirty_ring`](Self::enable_dirty_ring)).
    ///
    /// `vcpu` must be a KVM vCPU descriptor ([`KvmError::NotAVcpu`]); each vCPU is added once
    /// ([`KvmError::DuplicateVcpu`]); its ring must be this VM's size (the whole ring is
    /// faulted in here, so a smaller one is [`KvmError::RingMap`], not a SIGBUS later).
    pub fn add_vcpu(&mut self, vcpu: &impl AsRawFd) -> Result<()> {
        let bytes = self.ring_bytes.ok_or(KvmError::RingNotEnabled)? as usize;
        let vcpu = KvmVcpuFd::duplicate(vcpu).map_err(KvmError::NotAVcpu)?;
        for r in &self.rings {
            if r.vcpu.same_vcpu(&vcpu).map_err(ioctl_error("kcmp", None))? {
                return Err(KvmError::DuplicateVcpu);
            }
        }
        self.rings.try_reserve(1).map_err(|_| KvmError::RingMap(io::ErrorKind::OutOfMemory.into()))?;
        let ring = DirtyRing::map(&vcpu, bytes).map_err(KvmError::RingMap)?;
        self.rings.push(VcpuRing { vcpu, ring, fetch: 0 });
        Ok(())
    }

    /// Makes KVM's slots match `mem`: regions that left lose their slot, new regions get one.
    /// A region that is part of a block group ([`GuestRegionMmap::kvm_group`], a plug-state
    /// device) is mapped through its group: one slot per group.
    ///
    /// Everything that can be checked is checked before the first ioctl (slot numbers, bitmaps
    /// that can take KVM's bits, buffers); slots are deleted before new ones are created, so a
    /// guest range a removed region left can be reused at once. If an ioctl fails part-way, the
    /// slots already changed stay changed and the list matches KVM exactly.
    pub fn register(&mut self, mem: &GuestMemoryMmap<B>) -> Result<()> {
        // What KVM maps: each region, or the block group it belongs to (one slot for a group of
        // a plug-state device, however its plugged blocks split into regions).
        let mut wanted: Vec<&Arc<GuestRegionMmap<B>>> = Vec::with_capacity(mem.regions().len());
        for r in mem.regions() {
            let r = r.kvm_group().unwrap_or(r);
            if !wanted.iter().any(|w| Arc::ptr_eq(w, r)) {
                wanted.push(r);
            }
        }
        let leaving: Vec<u32> = self
            .slots
            .iter()
            .filter(|s| !wanted.iter().any(|r| Arc::ptr_eq(r, &s.region)))
            .map(|s| s.id())
            .collect();
        let arriving: Vec<&Arc<GuestRegionMmap<B>>> =
            wanted.into_iter().filter(|r| !self.slots.iter().any(|s| Arc::ptr_eq(&s.region, r))).collect();
        // Numbers for the new slots: free, not retired, in range (the leaving ones are free
        // once deleted, unless the ring is on, when they are retired until the next reap).
        let ring = self.ring_bytes.is_some();
        let mut ids = Vec::with_capacity(arriving.len());
        let mut candidates = self.slot_range.clone().filter(|id| {
            // A leaving slot's number is free once it is deleted, unless the ring is on.
            let freed = leaving.contains(id) && !ring;
            let taken = !freed && self.slots.iter().any(|s| s.id() == *id);
            !taken && !self.retired.contains(id)
        });
        for _ in &arriving {
            ids.push(candidates.next().ok_or(KvmError::NoFreeSlot(self.slot_range.len() as u32))?);
        }
        // Each new slot, ready but not yet registered: flags, and a log buffer when logged.
        let mut new_slots = Vec::with_capacity(arriving.len());
        for (&id, region) in ids.iter().zip(&arriving) {
            if !region.len().is_multiple_of(KVM_PAGE_SIZE as u64) {
                return Err(KvmError::PartialPage { addr: region.start_addr(), len: region.len() });
            }
            let writable = region.protection().is_writable();
            let gmem = self.guest_memfd_of(region)?;
            let mut flags = 0;
            // Read-only slots are never written by the guest: nothing to log. KVM cannot log a
            // guest_memfd slot (EINVAL): it is reported dirty whole, at every sync.
            if self.log_dirty && writable && gmem.is_none() {
                flags |= ioctls::KVM_MEM_LOG_DIRTY_PAGES;
                region
                    .bitmap()
                    .page_size()
                    .map_err(|source| KvmError::Bitmap { addr: region.start_addr(), source })?;
            }
            if !writable {
                if gmem.is_some() {
                    return Err(KvmError::GuestMemfd {
                        addr: region.start_addr(),
                        reason: "KVM cannot make a guest_memfd slot read-only",
                    });
                }
                flags |= ioctls::KVM_MEM_READONLY;
            }
            if gmem.is_some() && self.log_dirty {
                region
                    .bitmap()
                    .page_size()
                    .map_err(|source| KvmError::Bitmap { addr: region.start_addr(), source })?;
            }
            let log = if flags & ioctls::KVM_MEM_LOG_DIRTY_PAGES != 0 {
                Some(LogBuffer::new((region.len() as usize).div_ceil(KVM_PAGE_SIZE))?)
            } else {
                None
            };
            let mut desc = UserspaceMemoryRegion2 {
                slot: id,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.host_ptr() as u64,
                ..UserspaceMemoryRegion2::default()
            };
            let mut unlogged = false;
            if let Some((fd, offset)) = gmem {
                desc.flags |= ioctls::KVM_MEM_GUEST_MEMFD;
                desc.guest_memfd = fd as u32;
                desc.guest_memfd_offset = offset;
                unlogged = self.log_dirty;
            }
            new_slots.push(Slot { desc, v2: gmem.is_some(), region: (*region).clone(), log, unlogged });
        }
        self.slots
            .try_reserve(new_slots.len())
            .map_err(|_| KvmError::LogBuffer { pages: 0, source: io::ErrorKind::OutOfMemory.into() })?;
        self.retired
            .try_reserve(leaving.len())
            .map_err(|_| KvmError::LogBuffer { pages: 0, source: io::ErrorKind::OutOfMemory.into() })?;

        for id in leaving {
            let at = self.slot_index(id).expect("a leaving slot is in the list");
            // SAFETY: deleting a slot stops KVM's use of its memory; the region stays mapped
            // (we hold its Arc) until the ioctl has returned.
            unsafe { self.slots[at].set(&self.vm, 0) }
                .map_err(ioctl_error("KVM_SET_USER_MEMORY_REGION(delete)", Some(id)))?;
            // `remove`, not `swap_remove`: the list stays sorted.
            self.slots.remove(at);
            if ring {
                self.retired.push(id);
            }
        }
        for slot in new_slots {
            let desc = slot.desc;
            // SAFETY: the region's mapping covers the slot and stays mapped while the slot
            // exists, because the slot holds an `Arc` to the region until it deletes the slot.
            // Guest writes to it are what guest memory is for (read-only regions get
            // KVM_MEM_READONLY). A guest_memfd slot names the region's own guest_memfd, made on
            // this VM (KVM refuses another), which the region keeps open.
            unsafe { slot.set(&self.vm, desc.memory_size) }
                .map_err(ioctl_error("KVM_SET_USER_MEMORY_REGION", Some(desc.slot)))?;
            let at = self.slots.partition_point(|s| s.id() < desc.slot);
            // Cannot allocate: capacity was reserved above.
            self.slots.insert(at, slot);
        }
        Ok(())
    }

    /// The guest_memfd behind `region` and the region's offset in it, when its backing file
    /// is one (checked by what the kernel names the descriptor), after checking that KVM has
    /// `KVM_SET_USER_MEMORY_REGION2` and guest_memfd.
    fn guest_memfd_of(&self, region: &GuestRegionMmap<B>) -> Result<Option<(RawFd, u64)>> {
        let Some(fo) = region.file_offset() else { return Ok(None) };
        if !ioctls::is_guest_memfd(fo.as_fd()).map_err(ioctl_error("readlink /proc/self/fd", None))? {
            return Ok(None);
        }
        for (cap, name) in [
            (ioctls::KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2"),
            (ioctls::KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"),
        ] {
            if ioctls::check_extension(&self.vm, cap).unwrap_or(0) <= 0 {
                return Err(KvmError::Unsupported(name));
            }
        }
        Ok(Some((fo.as_raw_fd(), fo.start())))
    }

    /// A new guest_memfd of `size` bytes for this VM that the host can map and whose memory
    /// starts shared with it (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`), as a
    /// `File` to build a region on ([`Backing::File`](crate::mmap::Backing::File) with
    /// `shared: true`): the region keeps the guest_memfd, and
    /// [`register`](Self::register) gives its slot `KVM_MEM_GUEST_MEMFD`, so the guest's
    /// memory is the guest_memfd's.
    ///
    /// What this kernel allows, measured (see the module docs): a guest_memfd's size is fixed
    /// (it cannot be truncated, so its mapping cannot fault with SIGBUS that way); holes can be
    /// punched ([`discard`](crate::mmap::MmapRegion::discard)); KVM cannot log a guest_memfd
    /// slot's dirty pages nor make it read-only (so with dirty logging on, every sync reports
    /// such a region dirty as a whole); private/shared conversion (`KVM_SET_MEMORY_ATTRIBUTES`)
    /// is not offered to this VM type.
    pub fn create_guest_memfd(&self, size: u64) -> Result<std::fs::File> {
        for (cap, name) in [
            (ioctls::KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2"),
            (ioctls::KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"),
        ] {
            if ioctls::check_extension(&self.vm, cap).unwrap_or(0) <= 0 {
                return Err(KvmError::Unsupported(name));
            }
        }
        let flags = ioctls::GUEST_MEMFD_FLAG_MMAP | ioctls::GUEST_MEMFD_FLAG_INIT_SHARED;
        let offered =
            ioctls::check_extension(&self.vm, ioctls::KVM_CAP_GUEST_MEMFD_FLAGS).unwrap_or(0) as u64;
        if offered & flags != flags {
            return Err(KvmError::Unsupported("KVM_CAP_GUEST_MEMFD_FLAGS (mmap, init shared)"));
        }
        ioctls::create_guest_memfd(&self.vm, size, flags)
            .map(std::fs::File::from)
            .map_err(ioctl_error("KVM_CREATE_GUEST_MEMFD", None))
    }

    fn slot_index(&self, id: u32) -> Option<usize> {
        self.slots.binary_search_by_key(&id, |s| s.id()).ok()
    }

    /// The slot numbers and the guest ranges they map, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = (u32, GuestAddress, u64)> + '_ {
        self.slots.iter().map(|s| (s.id(), s.region.start_addr(), s.region.len()))
    }

    /// Fetches every logged slot's dirty log and ORs it into its region's bitmap; with manual
    /// protect, then clears in KVM exactly the bits merged, in chunks of at most
    /// [`CLEAR_CHUNK_PAGES`]. Returns the number of dirty pages KVM reported.
    ///
    /// Fails before any ioctl if the ring is on ([`KvmError::RingEnabled`]) or logging is off
    /// ([`KvmError::NotLogging`]).
    pub fn sync_dirty_log(&mut self) -> Result<usize> {
        if self.ring_bytes.is_some() {
            return Err(KvmError::RingEnabled);
        }
        if !self.log_dirty {
            return Err(KvmError::NotLogging);
        }
        let mut total = 0;
        for slot in &mut self.slots {
            if slot.unlogged {
                total += mark_whole(&slot.region);
                continue;
            }
            let Some(log) = slot.log.as_mut() else { continue };
            log.fetch(&self.vm, slot.desc.slot)?;
            total += merge_into(&slot.region, log.words())?;
            if self.manual_protect {
                clear_merged(&self.vm, slot.desc.slot, slot.desc.memory_size, log.words())?;
            }
        }
        Ok(total)
    }

    /// Collects every mapped vCPU ring: each dirty entry marks its page in its region's
    /// bitmap and is handed back to KVM; then `KVM_RESET_DIRTY_RINGS`. Returns the number of
    /// entries collected (entries of slots deleted since the last reap, or of slots this
    /// `KvmSlots` does not own, are collected and dropped: their memory left the guest).
    pub fn reap_dirty_rings(&mut self) -> Result<usize> {
        if self.ring_bytes.is_none() {
            return Err(KvmError::RingNotEnabled);
        }
        let mut total = 0;
        for ring in &mut self.rings {
            let count = ring.ring.len() as u32;
            loop {
                let index = (ring.fetch % count) as usize;
                // SAFETY: `index < count`, the number of entries in the ring mapping.
                let entry = unsafe { ring.ring.entries().add(index) };
                // SAFETY: `flags` is the first, 4-byte aligned field of a live, faulted-in
                // entry that KVM shares with us; KVM's protocol accesses it atomically.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
                if flags.load(Ordering::Acquire) & ioctls::KVM_DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is DIRTY, so KVM finished writing slot and offset (the
                // acquire load above orders these reads after its release store).
                let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
                // Address space 0 only; `slots` is sorted by id: one search per entry.
                let found = (slot >> 16 == 0)
                    .then(|| self.slots.binary_search_by_key(&slot, |s| s.id()).ok())
                    .flatten();
                if let Some(s) = found.map(|i| &self.slots[i]) {
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
        for slot in self.slots.iter().filter(|s| s.unlogged) {
            total += mark_whole(&slot.region);
        }
        ioctls::reset_dirty_rings(&self.vm).map_err(ioctl_error("KVM_RESET_DIRTY_RINGS", None))?;
        // Every entry queued for a deleted slot was in a ring (KVM publishes them before the
        // deletion returns) and is collected now: its number may be given out again.
        self.retired.clear();
        Ok(total)
    }
}

impl<B> Drop for KvmSlots<B> {
    /// Deletes every slot, then lets the regions go; a slot KVM would not delete keeps its
    /// region mapped forever (leaked) rather than point at memory the host reuses.
    fn drop(&mut self) {
        for slot in self.slots.drain(..) {
            // SAFETY: deleting a slot stops KVM's use of its memory.
            if unsafe { slot.set(&self.vm, 0) }.is_err() {
                std::mem::forget(slot.region);
            }
        }
        let fd = self.vm.as_raw_fd();
        owners().retain(|&o| o != fd);
    }
}

/// Marks a whole region dirty (a slot KVM cannot log); returns its 4 KiB pages.
fn mark_whole<B: Bitmap>(region: &GuestRegionMmap<B>) -> usize {
    region.bitmap().mark_dirty(0, region.len() as usize);
    (region.len() as usize).div_ceil(KVM_PAGE_SIZE)
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

/// Clears in KVM the bits of `log` (already merged) of slot `id` of `len` bytes, run of
/// non-zero words by run, each ioctl at most [`CLEAR_CHUNK_PAGES`] pages, starting at
/// multiples of 64 pages as KVM needs.
fn clear_merged(vm: &KvmVmFd, id: u32, len: u64, log: &[u64]) -> Result<()> {
    let pages = (len as usize).div_ceil(KVM_PAGE_SIZE);
    let chunk_words = (CLEAR_CHUNK_PAGES / 64) as usize;
    let mut w = 0;
    while w < log.len() {
        if log[w] == 0 {
            w += 1;
            continue;
        }
        let start = w;
        while w < log.len() && log[w] != 0 && w - start < chunk_words {
            w += 1;
        }
        let first_page = start * 64;
        let num_pages = (w * 64).min(pages) - first_page;
        ioctls::clear_dirty_log(vm, id, first_page as u64, num_pages as u32, &log[start..w])
            .map_err(ioctl_error("KVM_CLEAR_DIRTY_LOG", Some(id)))?;
    }
    Ok(())
}
