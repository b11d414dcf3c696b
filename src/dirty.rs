//! Dirty pages of a whole guest memory, in guest addresses: harvest (take and clear) as
//! coalesced ranges, count, mark by hand, put back; and [`DirtyRate`], the pages dirtied per
//! second over the last harvests, for migration convergence decisions.
//!
//! ```
//! use guestmem::bitmap::AtomicBitmap;
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)]).unwrap();
//! mem.write_obj(1u32, GuestAddress(0xfffe)).unwrap(); // dirties the last page of region 0 and the first of region 1
//! mem.write_obj(1u8, GuestAddress(0x8000)).unwrap();
//! let mut ranges = Vec::new();
//! let pages = mem.take_dirty_ranges(|addr, len| ranges.push((addr, len))).unwrap();
//! assert_eq!(pages, 3);
//! assert_eq!(ranges, vec![(GuestAddress(0x8000), 0x1000), (GuestAddress(0xf000), 0x2000)]);
//! assert_eq!(mem.dirty_page_count().unwrap(), 0); // taken
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::address::GuestAddress;
use crate::bitmap::{BitmapError, BitmapSlice, DirtyHarvest};
use crate::memory::{AsGuestRegionMmap, GuestMemory, GuestMemoryError, GuestRegionCollection};

/// For every region collection ([`GuestMemoryMmap`](crate::GuestMemoryMmap), or one of a VMM's
/// own region type) whose bitmaps can be harvested.
impl<R: AsGuestRegionMmap> GuestRegionCollection<R>
where
    R::B: DirtyHarvest,
{
    /// Takes and clears every region's dirty bits (each 64-page word atomically), calling
    /// `f(start, len)` once per maximal run of dirty guest memory, in address order; runs that
    /// continue into the next region are one call. Allocates nothing. Returns the number of
    /// dirty pages taken.
    ///
    /// If any region's tracking is off ([`BitmapError::NotTracking`]), fails before taking
    /// anything from any region: a harvest is all of memory or nothing.
    pub fn take_dirty_ranges(&self, mut f: impl FnMut(GuestAddress, u64)) -> Result<usize, BitmapError> {
        for region in self.iter() {
            region.bitmap().page_size()?;
        }
        let mut pending: Option<(u64, u64)> = None;
        let mut total = 0;
        for region in self.iter() {
            let base = region.start_addr().0;
            let page_size = region.bitmap().page_size()? as u64;
            total += region.bitmap().take_dirty_runs(|first, n| {
                let start = base + first as u64 * page_size;
                // The last page may be partial: never report past the region's end.
                let len = (n as u64 * page_size).min(region.len() - first as u64 * page_size);
                match &mut pending {
                    Some((s, l)) if s.checked_add(*l) == Some(start) => *l += len,
                    _ => {
                        if let Some((s, l)) = pending.replace((start, len)) {
                            f(GuestAddress(s), l);
                        }
                    }
                }
            })?;
        }
        if let Some((s, l)) = pending {
            f(GuestAddress(s), l);
        }
        Ok(total)
    }

    /// The number of dirty pages now, without clearing them.
    pub fn dirty_page_count(&self) -> Result<usize, BitmapError> {
        self.iter().map(|r| r.bitmap().dirty_page_count()).sum()
    }

    /// Marks `[addr, addr + len)` dirty by hand: for writes made through raw pointers
    /// ([`get_host_address`](GuestMemory::get_host_address)) or by another process. Fails if
    /// the range is not entirely guest memory (nothing is marked then).
    pub fn mark_dirty(&self, addr: GuestAddress, len: usize) -> Result<(), GuestMemoryError> {
        self.check_access(addr, len, false)?;
        self.mark_checked(addr, len)
    }

    /// Puts back ranges a consumer took but could not use (a failed snapshot write, a dropped
    /// connection), so the next harvest has them again. Ranges outside guest memory fail
    /// before anything is marked.
    pub fn restore_dirty_ranges(&self, ranges: &[(GuestAddress, u64)]) -> Result<(), GuestMemoryError> {
        let len = |addr, len: u64| {
            usize::try_from(len).map_err(|_| GuestMemoryError::Overflow { addr, len: usize::MAX })
        };
        for &(addr, n) in ranges {
            self.check_access(addr, len(addr, n)?, false)?;
        }
        for &(addr, n) in ranges {
            self.mark_checked(addr, len(addr, n)?)?;
        }
        Ok(())
    }

    /// Marks a range already checked to be guest memory, region by region.
    fn mark_checked(&self, addr: GuestAddress, len: usize) -> Result<(), GuestMemoryError> {
        for s in self.get_slices(addr, len) {
            let s = s?;
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }
}

/// Pages dirtied per second, over a sliding window of the last harvests.
///
/// Feed it each harvest's page count with [`record`](Self::record);
/// [`pages_per_sec`](Self::pages_per_sec) is the sum of the pages over the time the window
/// spans.
///
/// ```
/// use std::time::{Duration, Instant};
/// use guestmem::DirtyRate;
/// let t0 = Instant::now();
/// let mut rate = DirtyRate::new(4);
/// rate.record_at(t0, 0);
/// rate.record_at(t0 + Duration::from_millis(500), 1000);
/// rate.record_at(t0 + Duration::from_secs(1), 1000);
/// assert_eq!(rate.pages_per_sec(), Some(2000.0));
/// ```
#[derive(Debug, Clone)]
pub struct DirtyRate {
    window: usize,
    samples: VecDeque<(Instant, usize)>,
}

impl DirtyRate {
    /// A rate over the last `window` harvests (at least 2).
    pub fn new(window: usize) -> Self {
        DirtyRate { window: window.max(2), samples: VecDeque::new() }
    }

    /// Records a harvest of `pages` dirty pages, now.
    pub fn record(&mut self, pages: usize) {
        self.record_at(Instant::now(), pages);
    }

    /// Records a harvest of `pages` dirty pages at `when`.
    pub fn record_at(&mut self, when: Instant, pages: usize) {
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back((when, pages));
    }

    /// Pages dirtied per second over the window: the pages of every harvest but the first,
    /// divided by the time from the first to the last. `None` until two harvests, or if they
    /// were at the same instant.
    pub fn pages_per_sec(&self) -> Option<f64> {
        let (first, _) = *self.samples.front()?;
        let (last, _) = *self.samples.back()?;
        let span = last.checked_duration_since(first).filter(|d| *d > Duration::ZERO)?;
        let pages: usize = self.samples.iter().skip(1).map(|&(_, p)| p).sum();
        Some(pages as f64 / span.as_secs_f64())
    }

    /// Bytes dirtied per second for pages of `page_size` bytes.
    pub fn bytes_per_sec(&self, page_size: usize) -> Option<f64> {
        self.pages_per_sec().map(|p| p * page_size as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_needs_two_samples_and_a_span() {
        let mut r = DirtyRate::new(0);
        assert_eq!(r.pages_per_sec(), None);
        let t = Instant::now();
        r.record_at(t, 5);
        assert_eq!(r.pages_per_sec(), None);
        r.record_at(t, 5);
        assert_eq!(r.pages_per_sec(), None);
        r.record_at(t + Duration::from_secs(2), 10);
        // Window of 2: the samples at t and t+2s; 10 pages over 2 s.
        assert_eq!(r.pages_per_sec(), Some(5.0));
        assert_eq!(r.bytes_per_sec(4096), Some(5.0 * 4096.0));
        // `record` stamps now: the window slides to (t+2s, now), and the rate covers it.
        r.record(3);
        assert_eq!(r.samples.len(), 2);
        assert!(r.pages_per_sec().is_none_or(|p| p >= 0.0));
    }
}
