//! Which pages are known to be zero without reading them: pages of private anonymous memory
//! that are neither present nor swapped out (never touched, or discarded) read as zero, and
//! `/proc/self/pagemap` says which those are.
//!
//! Reading such a page would fault the shared zero page in (and writing it would allocate a
//! page), which costs microseconds a page: a mostly untouched guest would pay that for every
//! page at both ends. The rule holds only for *private anonymous* mappings: a file or memfd
//! page that is not mapped may still hold data in the page cache, and a private file mapping
//! reads the file. Nor for a range registered with userfaultfd in missing mode, whose absent
//! pages are whatever its handler supplies. So a region is trusted only if `/proc/self/maps`
//! shows it as private memory with no file and (on the sending side) `/proc/self/smaps` does
//! not flag it `um`. Everything else is read. Without `/proc` (or with another base page size), every page is.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::page_hash::PAGE;
use crate::host;

/// `/proc/self/pagemap` bit: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap` bit: the page is swapped out (or another non-present entry that
/// stands for data: a migration entry, a poisoned page).
const PM_SWAP: u64 = 1 << 62;

/// Pagemap entries one read returns at most (2 MiB of memory).
pub(crate) const WINDOW: usize = 512;

/// `/proc/self/pagemap`, opened once.
#[derive(Debug)]
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    /// The process's pagemap, or `None` where it cannot be used (no `/proc`, a base page size
    /// other than the stream's).
    pub(crate) fn open() -> Option<Self> {
        if crate::sys::page_size() != PAGE {
            return None;
        }
        File::open("/proc/self/pagemap").ok().map(|file| Pagemap { file })
    }

    /// Which of the `known.len()` (at most [`WINDOW`]) pages from host address `addr` (page
    /// aligned) are neither present nor swapped. `false` for all of them if the read fails.
    pub(crate) fn absent(&self, addr: usize, known: &mut [bool]) {
        let n = known.len().min(WINDOW);
        let mut buf = [0u8; WINDOW * 8];
        let ok = self.file.read_exact_at(&mut buf[..n * 8], (addr / PAGE) as u64 * 8).is_ok();
        for (i, k) in known[..n].iter_mut().enumerate() {
            let mut e = [0u8; 8];
            e.copy_from_slice(&buf[i * 8..i * 8 + 8]);
            *k = ok && u64::from_ne_bytes(e) & (PM_PRESENT | PM_SWAP) == 0;
        }
    }
}

/// Answers "is this page absent?" page after page, reading pagemap a window (up to 2 MiB, no
/// more than the caller says it will ask about) at a time. While windows show no absent page
/// (resident memory), it looks up less and less often: after a window with nothing absent, the
/// next pages outside it are taken as present without a lookup, 16 of them, then 32, 64, ...
/// up to 512 (2 MiB of pages read that might have been skipped, where resident memory gives
/// way to untouched memory), so resident memory, contiguous or scattered, costs little; a
/// window with an absent page makes it look up every page again, and so does
/// [`reset`](Self::reset) (a caller moving to another region). (Taking a page as present is
/// always safe: it is then read.)
#[derive(Debug)]
pub(crate) struct AbsentPages<'a> {
    pagemap: &'a Pagemap,
    /// The window read last: its first host address, its entries and how many there are.
    base: usize,
    absent: [bool; WINDOW],
    len: usize,
    /// Pages outside the window to take as present before the next lookup.
    skip: usize,
    /// What `skip` is set to after the next window with nothing absent.
    backoff: usize,
}

impl<'a> AbsentPages<'a> {
    pub(crate) fn new(pagemap: &'a Pagemap) -> Self {
        AbsentPages { pagemap, base: usize::MAX, absent: [false; WINDOW], len: 0, skip: 0, backoff: 16 }
    }

    /// Forgets the window read last (the caller wrote into memory: pages it found absent may
    /// be there now). How often to look up is kept.
    pub(crate) fn forget(&mut self) {
        self.base = usize::MAX;
    }

    /// Looks up every page again from now on (the caller moves to memory that may be unlike
    /// what it saw so far).
    pub(crate) fn reset(&mut self) {
        (self.skip, self.backoff) = (0, 16);
    }

    /// Whether the page at host address `addr` (page aligned, in memory the caller trusts,
    /// see [`private_anonymous`]) is neither present nor swapped. `ahead` is how many pages
    /// from `addr` on the caller will ask about in a row (it sizes a window read now: scattered
    /// pages are looked up in small windows).
    #[inline]
    pub(crate) fn is_absent(&mut self, addr: usize, ahead: usize) -> bool {
        let i = addr.wrapping_sub(self.base) / PAGE;
        if i < self.len {
            return self.absent[i];
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        let n = ahead.clamp(16, WINDOW);
        self.base = addr;
        self.len = n;
        self.pagemap.absent(addr, &mut self.absent[..n]);
        if self.absent[..n].contains(&true) {
            self.backoff = 16;
        } else {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(WINDOW);
        }
        self.absent[0]
    }
}

/// Whether every page of `[host, host + len)` that is neither present nor swapped reads as
/// zero as far as `/proc/self/maps` tells: the range is private anonymous memory. (Whether it
/// is registered with userfaultfd is [`not_userfaultfd`]'s question.)
pub(crate) fn private_anonymous(host: *const u8, len: usize) -> bool {
    let Ok(areas) = host::query_range(host, len) else { return false };
    areas.iter().all(|a| {
        !a.shared
            && a.inode == 0
            && a.dev_major == 0
            && a.dev_minor == 0
            && a.path.as_ref().is_none_or(|p| p.as_os_str().as_encoded_bytes().starts_with(b"[anon:"))
    })
}

/// Whether no part of `[host, host + len)` is registered with userfaultfd in missing mode
/// (whose absent pages are whatever its handler supplies). `/proc/self/smaps` tells, for the
/// price of a walk of the page tables of every mapping up to the range: a sender asks only
/// once it found an absent page in the range (in memory that is all there, never). The
/// receiving side need not ask: leaving an absent page absent where the stream says it is
/// zero is right even then (a post-copy handler would fetch the page's current contents on
/// first touch).
pub(crate) fn not_userfaultfd(host: *const u8, len: usize) -> bool {
    let Ok(areas) = host::query_range(host, len) else { return false };
    areas.iter().all(|a| host::smaps(a.range.start as *const u8).is_ok_and(|s| !s.has_flag("um")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::{Backing, MemfdOptions, MmapRegionBuilder};

    #[test]
    fn only_private_anonymous_memory_is_trusted() {
        let anon = MmapRegionBuilder::<()>::new(16 * PAGE).build().unwrap();
        assert!(private_anonymous(anon.as_ptr(), anon.size()));
        assert!(not_userfaultfd(anon.as_ptr(), anon.size()));
        let shared = MmapRegionBuilder::<()>::new(16 * PAGE)
            .backing(Backing::Anonymous { shared: true })
            .build()
            .unwrap();
        assert!(!private_anonymous(shared.as_ptr(), shared.size()));
        let memfd = MmapRegionBuilder::<()>::new(16 * PAGE)
            .backing(Backing::Memfd(MemfdOptions::new("t")))
            .build()
            .unwrap();
        assert!(!private_anonymous(memfd.as_ptr(), memfd.size()));
        // Not mapped at all.
        assert!(!private_anonymous(std::ptr::null(), PAGE));
        assert!(!not_userfaultfd(std::ptr::null(), PAGE));
    }

    #[test]
    fn pagemap_tells_untouched_pages() {
        let Some(pm) = Pagemap::open() else { return };
        let r = MmapRegionBuilder::<()>::new(8 * PAGE).build().unwrap();
        // SAFETY: page 3 of our own writable mapping.
        unsafe { r.as_ptr().add(3 * PAGE).write_volatile(1) };
        let mut known = [false; 8];
        pm.absent(r.as_ptr() as usize, &mut known);
        assert_eq!(known, [true, true, true, false, true, true, true, true]);
        let mut pages = AbsentPages::new(&pm);
        let absent: Vec<bool> =
            (0..8).map(|p| pages.is_absent(r.as_ptr() as usize + p * PAGE, 8 - p)).collect();
        assert_eq!(absent, known);
    }

    #[test]
    fn resident_memory_is_looked_up_less_and_less() {
        let Some(pm) = Pagemap::open() else { return };
        let windows = 200;
        let r = MmapRegionBuilder::<()>::new(windows * WINDOW * PAGE).build().unwrap();
        // Resident everywhere but in window 150.
        for p in (0..windows * WINDOW).filter(|p| p / WINDOW != 150) {
            // SAFETY: page `p` of our own writable mapping.
            unsafe { r.as_ptr().add(p * PAGE).write_volatile(1) };
        }
        let mut pages = AbsentPages::new(&pm);
        let mut reads = 0;
        let mut absent = 0;
        for p in 0..windows * WINDOW {
            let before = pages.base;
            absent += usize::from(pages.is_absent(r.as_ptr() as usize + p * PAGE, windows * WINDOW - p));
            reads += usize::from(pages.base != before);
        }
        // Window 150 may be skipped (the lookups back off): no page is ever taken as absent
        // that is not, and some window of it is found only if it was looked up; at most every
        // other window was read.
        assert!(absent <= WINDOW, "{absent}");
        assert!(reads <= windows / 2 + 8, "{reads} windows read");
        // Scattered pages: after a few lookups that find nothing absent, most are not looked up.
        let mut pages = AbsentPages::new(&pm);
        let mut reads = 0;
        for k in 0..4000 {
            let p = (k * 7919) % (windows * WINDOW);
            if p / WINDOW == 150 {
                continue;
            }
            let before = (pages.base, pages.len);
            assert!(!pages.is_absent(r.as_ptr() as usize + p * PAGE, 1));
            reads += usize::from((pages.base, pages.len) != before);
        }
        assert!(reads < 40, "{reads} lookups for 4000 scattered resident pages");
    }
}
