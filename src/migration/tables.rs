//! Page hash tables: the hash of every page's latest contents as one end of a migration saw
//! them (sent, or received), 4 bytes per 4 KiB page, and their digests per region.
//!
//! A table belongs to one side of one migration and is sized from that side's own memory,
//! never from a length the peer sent. Its storage comes in chunks allocated when a page of
//! the chunk is first recorded, so sending a few ranges of a large memory costs little. The
//! entries are atomics: the threads of a multi-stream migration record pages of disjoint
//! ranges into one table.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::page_hash::PAGE;
use crate::memory::GuestMemory;
use crate::region::GuestMemoryRegion;

/// Pages a chunk of a table covers (64 MiB of guest memory; the chunk itself is 64 KiB).
const CHUNK_PAGES: u64 = 1 << 14;

/// The table of one region.
#[derive(Debug)]
pub(crate) struct RegionTable {
    /// The region's first guest page number.
    first_page: u64,
    /// Its length in bytes (its last page may be partial).
    len: u64,
    /// Its pages (the partial one included).
    pages: u64,
    chunks: Box<[OnceLock<Box<[AtomicU32]>>]>,
}

impl RegionTable {
    fn new(first_page: u64, len: u64) -> Self {
        let pages = len.div_ceil(PAGE as u64);
        let chunks = (0..pages.div_ceil(CHUNK_PAGES)).map(|_| OnceLock::new()).collect();
        RegionTable { first_page, len, pages, chunks }
    }

    /// The region's first guest page number.
    pub(crate) fn first_page(&self) -> u64 {
        self.first_page
    }

    /// The region's end (the guest address past its last byte).
    pub(crate) fn end(&self) -> u64 {
        self.first_page * PAGE as u64 + self.len
    }

    fn chunk(&self, c: usize) -> &[AtomicU32] {
        let len = (self.pages - c as u64 * CHUNK_PAGES).min(CHUNK_PAGES) as usize;
        self.chunks[c].get_or_init(|| (0..len).map(|_| AtomicU32::new(0)).collect())
    }

    /// Records `hash` for page `index` of the region (`index < pages`).
    #[inline]
    pub(crate) fn set(&self, index: u64, hash: u32) {
        debug_assert!(index < self.pages);
        let chunk = self.chunk((index / CHUNK_PAGES) as usize);
        chunk[(index % CHUNK_PAGES) as usize].store(hash, Ordering::Relaxed);
    }

    /// Records `hash` for `count` pages from page `index` (`index + count <= pages`).
    pub(crate) fn set_range(&self, index: u64, count: u64, hash: u32) {
        debug_assert!(index + count <= self.pages);
        let (mut at, end) = (index, index + count);
        while at < end {
            let chunk = self.chunk((at / CHUNK_PAGES) as usize);
            let from = (at % CHUNK_PAGES) as usize;
            let n = ((end - at) as usize).min(chunk.len() - from);
            for e in &chunk[from..from + n] {
                e.store(hash, Ordering::Relaxed);
            }
            at += n as u64;
        }
    }

    /// The digest of the table (see the module docs of `migration`).
    pub(crate) fn digest(&self) -> u64 {
        let mut d = Digest::default();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk.get() else { continue };
            let base = self.first_page + c as u64 * CHUNK_PAGES;
            for (i, e) in chunk.iter().enumerate() {
                d.add(base + i as u64, e.load(Ordering::Relaxed));
            }
        }
        d.finish()
    }
}

/// The digest of a region's pages: the wrapping sum of a 64-bit mix of `(page, hash)` over
/// the pages whose hash is not 0. Order-free, so pages may be added in any order.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Digest(u64);

impl Digest {
    #[inline]
    pub(crate) fn add(&mut self, page: u64, hash: u32) {
        if hash != 0 {
            self.0 = self.0.wrapping_add(fmix64(page << 32 | u64::from(hash)));
        }
    }

    pub(crate) fn finish(self) -> u64 {
        self.0
    }
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The tables of one side of a migration, one per region seen, found by the region's first
/// page and length in bytes (a region replaced by another of another size gets a new table).
#[derive(Debug, Default)]
pub(crate) struct Tables {
    regions: Mutex<Vec<Arc<RegionTable>>>,
}

impl Tables {
    /// The tables of `mem`'s regions, in `mem.iter()` order, made for regions not seen before.
    /// Every region must start on a stream page (the caller checked).
    pub(crate) fn for_memory<M: GuestMemory + ?Sized>(&self, mem: &M) -> Vec<Arc<RegionTable>> {
        let mut known = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        mem.iter()
            .map(|r| {
                let (first, len) = (r.start_addr().0 / PAGE as u64, r.len());
                match known.binary_search_by_key(&(first, len), |t| (t.first_page, t.len)) {
                    Ok(i) => known[i].clone(),
                    Err(i) => {
                        let t = Arc::new(RegionTable::new(first, len));
                        known.insert(i, t.clone());
                        t
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_order_free_and_see_every_entry() {
        let t = RegionTable::new(10, (3 * CHUNK_PAGES + 5) * PAGE as u64);
        assert_eq!(t.digest(), 0, "an empty table");
        t.set(0, 7);
        t.set(3 * CHUNK_PAGES + 4, 9);
        let mut d = Digest::default();
        d.add(10 + 3 * CHUNK_PAGES + 4, 9);
        d.add(10, 7);
        assert_eq!(t.digest(), d.finish());
        // A range over chunk boundaries; 0 entries count as never recorded.
        t.set_range(CHUNK_PAGES - 2, CHUNK_PAGES + 4, 5);
        t.set(0, 0);
        let mut d = Digest::default();
        for p in CHUNK_PAGES - 2..2 * CHUNK_PAGES + 2 {
            d.add(10 + p, 5);
        }
        d.add(10 + 3 * CHUNK_PAGES + 4, 9);
        assert_eq!(t.digest(), d.finish());
        // The same hash at another page, or another hash at the same page, differs.
        let (a, b) = (RegionTable::new(0, 4 * PAGE as u64), RegionTable::new(0, 4 * PAGE as u64 - 3));
        assert_eq!((a.pages, b.pages, b.end()), (4, 4, 4 * PAGE as u64 - 3));
        a.set(1, 5);
        b.set(2, 5);
        assert_ne!(a.digest(), b.digest());
        b.set(2, 0);
        b.set(1, 6);
        assert_ne!(a.digest(), b.digest());
        b.set(1, 5);
        assert_eq!(a.digest(), b.digest());
    }
}
