//! [`Reservation`]: a range of address space held `PROT_NONE`, into which regions are mapped
//! with `MAP_FIXED`.
//!
//! VMMs reserve one large range for all of guest RAM so that regions sit at fixed distances and
//! an overrun of one lands in `PROT_NONE` space instead of a neighbour. `MAP_FIXED` replaces
//! whatever is mapped at the address, so the reservation keeps track of which parts it lent
//! out: a placement outside it or over a part already in use is an error, never a silent
//! clobber.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::MmapError;
use crate::sys::{self, MapFlags, Protection};

/// A `PROT_NONE`, `MAP_NORESERVE` range of address space that regions are placed into.
///
/// It costs no memory, only address space (64 TiB reservations work). It is unmapped when the
/// last region placed in it and the last `Arc` to it are gone.
///
/// ```
/// use guestmem::mmap::{MmapRegionBuilder, Reservation};
/// let res = Reservation::new(16 << 20).unwrap();
/// let a = MmapRegionBuilder::<()>::new(1 << 20).in_reservation(res.clone(), 0).build().unwrap();
/// let b = MmapRegionBuilder::<()>::new(1 << 20).in_reservation(res.clone(), 4 << 20).build().unwrap();
/// assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 4 << 20);
/// // The same place twice is refused.
/// assert!(MmapRegionBuilder::<()>::new(1 << 20).in_reservation(res, 0).build().is_err());
/// ```
#[derive(Debug)]
pub struct Reservation {
    addr: *mut u8,
    len: usize,
    /// Claimed ranges: start offset -> length.
    used: Mutex<BTreeMap<usize, usize>>,
}

// SAFETY: the reservation owns its address range; the pointer is never dereferenced here, and
// the claim table is behind a mutex.
unsafe impl Send for Reservation {}
// SAFETY: as above.
unsafe impl Sync for Reservation {}

impl Reservation {
    /// Reserves `len` bytes (rounded up to whole pages) of address space.
    pub fn new(len: usize) -> Result<Arc<Self>, MmapError> {
        Self::with_alignment(len, sys::page_size())
    }

    /// Reserves `len` bytes whose start is a multiple of `align` (a power of two), e.g. 1 GiB
    /// so that regions placed at 1 GiB offsets can use 1 GiB pages.
    pub fn with_alignment(len: usize, align: usize) -> Result<Arc<Self>, MmapError> {
        if len == 0 {
            return Err(MmapError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(MmapError::InvalidAlignment(align));
        }
        let page = sys::page_size();
        let align = align.max(page);
        let len = len.checked_next_multiple_of(page).ok_or(MmapError::Overflow { offset: 0, size: len })?;
        let (addr, _) = reserve_aligned(len, align)?;
        Ok(Arc::new(Reservation { addr, len, used: Mutex::new(BTreeMap::new()) }))
    }

    /// The first byte of the reservation.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is 0 (never: a reservation is at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length not yet claimed by regions.
    pub fn free_len(&self) -> usize {
        self.len - self.lock_used().values().sum::<usize>()
    }

    fn lock_used(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        // A panic while holding the lock cannot leave the map inconsistent (each change is
        // one insert or remove), so a poisoned lock is still usable.
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `[offset, offset + size)` for a region, or says why not.
    pub(crate) fn claim(&self, offset: usize, size: usize) -> Result<(), MmapError> {
        let end = offset.checked_add(size).ok_or(MmapError::Overflow { offset: offset as u64, size })?;
        if end > self.len {
            return Err(MmapError::OutsideReservation { offset, size, reservation_len: self.len });
        }
        let mut used = self.lock_used();
        // The nearest claim at or before `end` is the only one that can overlap.
        if let Some((&o, &l)) = used.range(..end).next_back() {
            if o + l > offset {
                return Err(MmapError::ReservationOverlap { offset, size, used_offset: o, used_size: l });
            }
        }
        used.insert(offset, size);
        Ok(())
    }

    /// Returns `[offset, ...)` to the reservation: maps `PROT_NONE` over it again first.
    pub(crate) fn release(&self, offset: usize) {
        let mut used = self.lock_used();
        if let Some(size) = used.remove(&offset) {
            // SAFETY: `[offset, offset + size)` was claimed by the region being dropped, which
            // no longer uses it; it lies inside our reservation, so MAP_FIXED replaces only
            // memory we own.
            let r = unsafe {
                sys::mmap(
                    self.addr.add(offset),
                    size,
                    Protection::NONE,
                    MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE | MapFlags::FIXED,
                    None,
                    0,
                )
            };
            // If re-reserving fails (ENOMEM from a full VMA table), the range stays as the
            // region left it; keep it claimed so nothing is placed over it.
            if r.is_err() {
                used.insert(offset, size);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: every region placed in the reservation holds an `Arc` to it, so none is left;
        // the whole range is ours.
        let _ = unsafe { sys::munmap(self.addr, self.len) };
    }
}

/// Reserves `len` bytes of `PROT_NONE` address space at a multiple of `align`, trimming the
/// slack. Returns the start and the length reserved.
pub(crate) fn reserve_aligned(len: usize, align: usize) -> Result<(*mut u8, usize), MmapError> {
    let page = sys::page_size();
    let slack = align.saturating_sub(page);
    let total = len.checked_add(slack).ok_or(MmapError::Overflow { offset: 0, size: len })?;
    // SAFETY: a new PROT_NONE mapping; no MAP_FIXED.
    let raw = unsafe {
        sys::mmap(
            std::ptr::null_mut(),
            total,
            Protection::NONE,
            MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE,
            None,
            0,
        )
    }
    .map_err(|source| MmapError::Mmap { size: total, source })?;
    let start = (raw as usize).next_multiple_of(align);
    let head = start - raw as usize;
    let tail = total - head - len;
    // SAFETY: head and tail are the parts of our new reservation outside [start, start + len);
    // nothing uses them.
    unsafe {
        if head > 0 {
            let _ = sys::munmap(raw, head);
        }
        if tail > 0 {
            let _ = sys::munmap(raw.add(head + len), tail);
        }
    }
    Ok((start as *mut u8, len))
}
