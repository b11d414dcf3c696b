//! Shared by the models (`tests/models/*.rs`, run by the fuzz targets in `fuzz/` and by the
//! proptests in `tests/models.rs`): a byte reader for the input, and a per-thread arena of host
//! memory that regions are adopted from (`build_raw`), so an iteration costs no `mmap`.

#![allow(dead_code)]

use guestmem::mmap::{MmapRegion, MmapRegionBuilder};
use guestmem::sys::{self, MapFlags, Protection};
use guestmem::AtomicBitmap;

pub const PAGE: u64 = 4096;

/// Reads numbers from the fuzz input; past its end, zeros.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u16() as usize).min(max);
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Host memory for up to `ARENA_PAGES` pages of regions, mapped once per process.
pub const ARENA_PAGES: u64 = 64;

pub struct Arena {
    base: *mut u8,
    next: u64,
}

fn arena_base() -> *mut u8 {
    thread_local! {
        // One arena per thread: tests run models on several threads at once.
        static BASE: usize = {
            // SAFETY: a new anonymous mapping, kept for the life of the thread's process.
            let p = unsafe {
                sys::mmap(
                    std::ptr::null_mut(),
                    (ARENA_PAGES * PAGE) as usize,
                    Protection::READ_WRITE,
                    MapFlags::PRIVATE | MapFlags::ANONYMOUS,
                    None,
                    0,
                )
            }
            .expect("model arena");
            p as usize
        };
    }
    BASE.with(|b| *b as *mut u8)
}

impl Arena {
    /// A zeroed arena (the previous iteration's regions must be gone).
    pub fn new() -> Self {
        let base = arena_base();
        // SAFETY: the arena is ours; no region of a previous iteration is alive.
        unsafe { std::ptr::write_bytes(base, 0, (ARENA_PAGES * PAGE) as usize) };
        Arena { base, next: 0 }
    }

    /// A region of `pages` pages adopted from the arena, or `None` when it is full.
    pub fn region(&mut self, pages: u64, writable: bool) -> Option<MmapRegion<AtomicBitmap>> {
        if pages == 0 || self.next + pages > ARENA_PAGES {
            return None;
        }
        // SAFETY: the pages are inside the arena, which lives for the process, and are given to
        // this region alone for this iteration; the arena mapping is read-write, so any
        // protection asked for is no more than it has.
        let ptr = unsafe { self.base.add((self.next * PAGE) as usize) };
        self.next += pages;
        let prot = if writable { Protection::READ_WRITE } else { Protection::READ };
        // SAFETY: as above.
        unsafe {
            MmapRegionBuilder::<AtomicBitmap>::build_raw(
                ptr,
                (pages * PAGE) as usize,
                prot,
                MapFlags::PRIVATE,
            )
        }
        .ok()
    }
}
