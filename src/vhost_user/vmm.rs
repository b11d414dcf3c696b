//! The VMM's side of the shared dirty log: [`DirtyLog`].

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bitmap::{BitmapError, DirtyHarvest};
use crate::memory::GuestMemory;
use crate::region::GuestMemoryRegion;
use crate::sys::{self, MapFlags, MemfdFlags, Protection, Seals};

use super::log::{LogError, LOG_PAGE_SIZE, MAX_LOG_BYTES};
use super::LogDesc;

/// A dirty log the VMM shares with a vhost-user back-end (`VHOST_USER_SET_LOG_BASE`).
///
/// A memfd of one bit per 4 KiB page of guest-physical address space from 0 up, sealed against
/// shrinking, growing and further seals (so the back-end can never make the VMM's mapping of
/// it fault), mapped here and handed over as [`fd`](Self::fd) with [`desc`](Self::desc). The
/// back-end ORs its bits in; [`harvest_into`](Self::harvest_into) takes them out word by word
/// (one atomic swap per dirty word, an atomic AND for the words two regions share) and merges
/// them into the bitmaps of the VMM's own guest memory, whose harvests then report the union
/// of the VMM's writes and the back-end's. [`swap`](Self::swap) replaces the log (a larger one
/// after hotplug, a new one per round) without losing a bit.
///
/// The back-end is trusted with nothing that could hurt the VMM: it can set any bit (pages
/// outside guest memory are never taken, and cost nothing), but not shrink the file. Whether
/// it logs every write is its part of the protocol, which no one can check.
pub struct DirtyLog {
    fd: OwnedFd,
    map: *mut u8,
    map_len: usize,
    words: usize,
    /// Region-relative words of one region, for the merge (as many as the log has, plus one:
    /// a region never needs more), allocated with the log.
    scratch: Vec<u64>,
}

// SAFETY: the mapping is owned by the log and only accessed atomically.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; `&self` methods only load and read-modify-write words atomically.
unsafe impl Sync for DirtyLog {}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog").field("covers", &self.covers()).field("bytes", &self.map_len).finish()
    }
}

impl DirtyLog {
    /// A clean log covering guest addresses below `covers` (rounded up to whole pages of the
    /// log file), at most [`MAX_LOG_BYTES`] of log.
    ///
    /// ```
    /// use guestmem::vhost_user::DirtyLog;
    /// let log = DirtyLog::new(1 << 30).unwrap(); // 1 GiB of guest: 32 KiB of log
    /// assert_eq!((log.covers(), log.desc().size, log.desc().offset), (1 << 30, 32 << 10, 0));
    /// assert!(DirtyLog::new(u64::MAX).is_err());
    /// ```
    pub fn new(covers: u64) -> Result<Self, LogError> {
        let page = sys::page_size() as u64;
        let pages = covers.div_ceil(LOG_PAGE_SIZE);
        let bytes = pages.div_ceil(64).saturating_mul(8).max(8).next_multiple_of(page);
        if bytes > MAX_LOG_BYTES {
            return Err(LogError::TooLarge { size: bytes, max: MAX_LOG_BYTES });
        }
        let words = (bytes / 8) as usize;
        let os = |op| move |source| LogError::Os { op, source };
        let mut scratch = Vec::new();
        scratch.try_reserve_exact(words + 1).map_err(|_| LogError::Os {
            op: "allocating the harvest buffer",
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        scratch.resize(words + 1, 0);
        let fd = sys::memfd_create(c"guestmem-vhost-log", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(os("memfd_create"))?;
        sys::fd::ftruncate(fd.as_fd(), bytes).map_err(os("ftruncate"))?;
        sys::fd::add_seals(fd.as_fd(), Seals::SHRINK | Seals::GROW | Seals::SEAL)
            .map_err(os("F_ADD_SEALS"))?;
        // SAFETY: a new shared mapping of our own memfd, where the kernel chooses.
        let map = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                Protection::READ_WRITE,
                MapFlags::SHARED,
                Some(fd.as_fd()),
                0,
            )
        }
        .map_err(os("mmap"))?;
        Ok(DirtyLog { fd, map, map_len: bytes as usize, words, scratch })
    }

    /// A clean log covering all of `mem` (guest addresses up to its last one).
    pub fn for_memory<M: GuestMemory>(mem: &M) -> Result<Self, LogError> {
        let end = if mem.num_regions() == 0 { 0 } else { mem.last_addr().0.saturating_add(1) };
        Self::new(end)
    }

    /// The log's memfd, to send with `VHOST_USER_SET_LOG_BASE`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The log's size and offset, the payload of `VHOST_USER_SET_LOG_BASE`.
    pub fn desc(&self) -> LogDesc {
        LogDesc { size: self.map_len as u64, offset: 0 }
    }

    /// The first guest address the log does not cover.
    pub fn covers(&self) -> u64 {
        self.words as u64 * 64 * LOG_PAGE_SIZE
    }

    /// The number of dirty pages in the log now (a popcount; nothing is taken).
    pub fn dirty_page_count(&self) -> usize {
        (0..self.words).map(|w| self.word(w).load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Whether guest page `page` (4 KiB) is dirty in the log now.
    pub fn is_page_dirty(&self, page: u64) -> bool {
        let w = page / 64;
        w < self.words as u64 && self.word(w as usize).load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    #[inline(always)]
    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.words);
        // SAFETY: `index < words`, and the mapping holds `words` u64s from its page-aligned
        // start for as long as `self` lives; it is only accessed atomically (by us and the
        // back-end), and an `AtomicU64` is valid for any bits.
        unsafe { AtomicU64::from_ptr(self.map.add(index * 8).cast()) }
    }

    /// Takes the log's dirty bits for every region of `mem` and merges them into the regions'
    /// bitmaps, so that `mem`'s harvests report the pages the back-end wrote with the VMM's
    /// own; returns the number of pages taken.
    ///
    /// Each word is taken atomically (`swap(0)`; a word shared by two regions, or by a region
    /// and a hole, with an atomic AND of the region's bits only), so a mark racing with the
    /// harvest is either taken now or stays for the next one. Bits of pages outside guest
    /// memory are never taken. All or nothing: every region is checked first (its tracking on,
    /// its bitmap in 4 KiB pages, its end covered by the log), and an error takes nothing.
    ///
    /// ```
    /// use guestmem::bitmap::AtomicBitmap;
    /// use guestmem::vhost_user::DirtyLog;
    /// use guestmem::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let mut log = DirtyLog::for_memory(&mem).unwrap();
    /// // ... the back-end logs writes; here, by hand: pages 3 and 70.
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    /// # backend.log().mark(GuestAddress(3 << 12), 1);
    /// # backend.log().mark(GuestAddress(70 << 12), 1);
    /// assert_eq!(log.harvest_into(&mem).unwrap(), 2);
    /// assert_eq!(mem.dirty_page_count().unwrap(), 2);
    /// assert_eq!(log.dirty_page_count(), 0);
    /// // A memory the log does not cover is refused, before anything is taken.
    /// let big = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 40), 4096)]).unwrap();
    /// assert!(log.harvest_into(&big).is_err());
    /// ```
    pub fn harvest_into<M>(&mut self, mem: &M) -> Result<usize, LogError>
    where
        M: GuestMemory,
        <M::R as GuestMemoryRegion>::B: DirtyHarvest,
    {
        self.check(mem, false)?;
        Ok(self.take_into(mem))
    }

    /// Checks every region of `mem` before anything is taken: tracked, 4 KiB pages, and
    /// covered by the log (or, with `clip`, not checked for coverage: a retired log gives what
    /// it has).
    fn check<M>(&self, mem: &M, clip: bool) -> Result<(), LogError>
    where
        M: GuestMemory,
        <M::R as GuestMemoryRegion>::B: DirtyHarvest,
    {
        for region in mem.iter() {
            let start = region.start_addr();
            let bitmap = region.bitmap();
            let page_size = bitmap.page_size().map_err(|e| match e {
                BitmapError::NotTracking => LogError::NotTracking { region: start },
                _ => LogError::PageSize { region: start, page_size: 0 },
            })?;
            let pages = region.len().div_ceil(LOG_PAGE_SIZE);
            let words = bitmap.num_words().unwrap_or(usize::MAX) as u64;
            if page_size as u64 != LOG_PAGE_SIZE || words != pages.div_ceil(64) {
                return Err(LogError::PageSize { region: start, page_size });
            }
            let end = start.0.saturating_add(region.len());
            if !clip && end > self.covers() {
                return Err(LogError::RegionOutsideLog { region: start, end, covers: self.covers() });
            }
        }
        Ok(())
    }

    /// The harvest proper, on a memory `check` passed (regions past the log are clipped).
    fn take_into<M>(&mut self, mem: &M) -> usize
    where
        M: GuestMemory,
        <M::R as GuestMemoryRegion>::B: DirtyHarvest,
    {
        let mut taken = 0;
        for region in mem.iter() {
            let first = region.start_addr().0 / LOG_PAGE_SIZE;
            let covered = (self.words as u64 * 64).saturating_sub(first);
            let pages = region.len().div_ceil(LOG_PAGE_SIZE).min(covered);
            if pages == 0 {
                continue;
            }
            let region_words = pages.div_ceil(64) as usize;
            let n = self.take_region(first, pages, region_words);
            if n == 0 {
                continue;
            }
            let merged = region.bitmap().merge_words(&self.scratch[..region_words]);
            if merged.is_err() {
                // Unreachable after `check`; should it happen, the bits go back to the log.
                self.put_back(first, region_words);
                continue;
            }
            taken += n;
        }
        taken
    }

    /// Takes the bits of guest pages `first..first + pages` into `scratch[..region_words]`,
    /// region-relative (bit `i` of word `j` = page `first + 64 * j + i`); returns the count.
    fn take_region(&mut self, first: u64, pages: u64, region_words: usize) -> usize {
        let shift = (first % 64) as u32;
        let w0 = (first / 64) as usize;
        let last = first + pages - 1;
        let w_last = (last / 64) as usize;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch[..region_words + 1].fill(0);
        let mut taken = 0;
        for (j, w) in (w0..=w_last).enumerate() {
            let lo = if w == w0 { shift } else { 0 };
            let hi = if w == w_last { (last % 64) as u32 } else { 63 };
            let mask = (u64::MAX << lo) & (u64::MAX >> (63 - hi));
            // `w <= w_last < words`: the caller clipped the region to the log.
            let word = self.word(w);
            // A plain load skips clean words without writing their cache line.
            if word.load(Ordering::SeqCst) & mask == 0 {
                continue;
            }
            let bits = if mask == u64::MAX {
                word.swap(0, Ordering::SeqCst)
            } else {
                word.fetch_and(!mask, Ordering::SeqCst) & mask
            };
            taken += bits.count_ones() as usize;
            if shift == 0 {
                scratch[j] |= bits;
            } else {
                // Bits at or above `shift` belong to region word `j`, those below to `j - 1`.
                scratch[j] |= bits >> shift;
                if j > 0 {
                    scratch[j - 1] |= bits << (64 - shift);
                }
            }
        }
        self.scratch = scratch;
        taken
    }

    /// ORs region-relative `scratch[..region_words]` back into the log at guest page `first`.
    fn put_back(&self, first: u64, region_words: usize) {
        let shift = (first % 64) as u32;
        let w0 = (first / 64) as usize;
        for j in 0..region_words {
            let bits = self.scratch[j];
            if bits == 0 {
                continue;
            }
            if shift == 0 {
                self.word(w0 + j).fetch_or(bits, Ordering::SeqCst);
            } else {
                self.word(w0 + j).fetch_or(bits << shift, Ordering::SeqCst);
                if w0 + j + 1 < self.words {
                    self.word(w0 + j + 1).fetch_or(bits >> (64 - shift), Ordering::SeqCst);
                }
            }
        }
    }

    /// Replaces this log by `next` between migration rounds without losing a bit:
    /// `hand_over(&next)` must send `next` to the back-end (`VHOST_USER_SET_LOG_BASE`) and wait
    /// for its reply; then the old log is harvested one last time into `mem` and dropped, and
    /// `next` is the log. Returns the pages that last harvest took.
    ///
    /// A back-end built on [`BackendMemory`](crate::vhost_user::BackendMemory) replies only
    /// when every mark that could still go to the old log has gone there
    /// ([`SharedLog`](crate::vhost_user::SharedLog) says why), so the last harvest has every
    /// bit the old log will ever get. `mem` is checked against `next` before anything is handed over; if the
    /// hand-over fails ([`LogError::Handover`]) the old log stays, untouched.
    ///
    /// ```
    /// use guestmem::bitmap::AtomicBitmap;
    /// use guestmem::vhost_user::{BackendMemory, DirtyLog};
    /// use guestmem::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let backend = BackendMemory::new().unwrap(); // in the other process
    /// let mut log = DirtyLog::for_memory(&mem).unwrap();
    /// backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    /// backend.log().mark(GuestAddress(0x4000), 1);
    /// let next = DirtyLog::new(1 << 30).unwrap();
    /// let last = log
    ///     .swap(next, &mem, |next| {
    ///         // Send SET_LOG_BASE and wait for the reply; here, directly:
    ///         backend.set_log_base(next.fd().try_clone_to_owned()?, &next.desc()).map_err(std::io::Error::other)
    ///     })
    ///     .unwrap();
    /// assert_eq!((last, log.covers()), (1, 1 << 30));
    /// assert_eq!(mem.dirty_page_count().unwrap(), 1);
    /// ```
    pub fn swap<M>(
        &mut self,
        next: DirtyLog,
        mem: &M,
        hand_over: impl FnOnce(&DirtyLog) -> io::Result<()>,
    ) -> Result<usize, LogError>
    where
        M: GuestMemory,
        <M::R as GuestMemoryRegion>::B: DirtyHarvest,
    {
        next.check(mem, false)?;
        hand_over(&next).map_err(LogError::Handover)?;
        let mut old = std::mem::replace(self, next);
        // `check` passed for `next`; for the old log only the coverage differs, and it clips.
        Ok(old.take_into(mem))
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows it past `self`.
        let _ = unsafe { sys::munmap(self.map, self.map_len) };
    }
}
