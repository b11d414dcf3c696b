//! Dirty-page tracking: the [`Bitmap`] and [`BitmapSlice`] traits, [`AtomicBitmap`], and the
//! harvest API ([`DirtyHarvest`]).
//!
//! Every write that goes through guestmem (slices, refs, atomics, I/O into guest memory) marks
//! the bytes it wrote in the bitmap of the memory it wrote, after the copy. A [`Bitmap`] covers
//! one region; a [`BitmapSlice`] is a cheap handle on a bitmap shifted to where a
//! [`VolatileSlice`](crate::VolatileSlice) starts, so a slice marks at its own offsets.
//!
//! The bitmaps:
//!
//! - `()` tracks nothing and costs nothing: marks compile away. It has no harvest: memory that
//!   was never tracked cannot say "nothing is dirty".
//! - [`AtomicBitmap`] keeps one bit per page in 64-bit atomic words, in the layout of KVM's
//!   dirty log. A mark is one atomic OR per 64-page word it touches. A harvest takes and clears
//!   each word with one atomic swap, so a write is never lost between "read" and "clear"; it
//!   comes out as KVM-format words in a caller's buffer or as runs of dirty pages, without
//!   allocating. KVM's log merges in ([`AtomicBitmap::merge_words`]), and a consumer that
//!   failed puts its bits back ([`AtomicBitmap::restore`]).
//! - `Option<B>` switches tracking on and off per region: `None` marks nothing, and every
//!   harvest call on it fails with [`BitmapError::NotTracking`] rather than report a clean
//!   region.
//!
//! ```
//! use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};
//! use guestmem::{Bytes, VolatileSlice};
//!
//! let mut ram = vec![0u8; 64 << 10];
//! let bitmap = AtomicBitmap::new(ram.len(), 4096).unwrap();
//! // SAFETY: `ram` is borrowed for as long as `mem` lives and is not used otherwise.
//! let mem = unsafe { VolatileSlice::with_bitmap(ram.as_mut_ptr(), ram.len(), bitmap.slice_at(0), true) };
//! mem.write_obj(7u32, 0x3ffe).unwrap(); // straddles pages 3 and 4
//! mem.write_slice(&[1; 10], 0x9000).unwrap(); // page 9
//!
//! let mut runs = Vec::new();
//! let dirty = bitmap.take_dirty_runs(|first_page, num_pages| runs.push((first_page, num_pages)));
//! assert_eq!((dirty, runs), (3, vec![(3, 2), (9, 1)]));
//!
//! // `()` tracks nothing.
//! Bitmap::mark_dirty(&(), 0, 4096);
//! assert!(!BitmapSlice::dirty_at(&Bitmap::slice_at(&(), 100), 0));
//! ```

mod atomic;
#[cfg(test)]
mod tests;

pub use atomic::{AtomicBitmap, AtomicBitmapSlice};

use std::fmt::Debug;

/// A view of a [`Bitmap`] that starts at some offset of the bitmap's region.
///
/// Offsets given to a slice are relative to where the slice starts.
pub trait BitmapSlice: Clone + Debug {
    /// Marks the bytes `[offset, offset + len)` as dirty. `len == 0` marks nothing.
    fn mark_dirty(&self, offset: usize, len: usize);

    /// Whether the byte at `offset` lies in a dirty page.
    fn dirty_at(&self, offset: usize) -> bool;

    /// The same bitmap, shifted by `offset` more bytes.
    #[must_use]
    fn slice_at(&self, offset: usize) -> Self;
}

/// The dirty bitmap of one memory region, indexed by byte offset in the region.
pub trait Bitmap: Debug {
    /// The slice type handed to the [`VolatileSlice`](crate::VolatileSlice)s of the region.
    type Slice<'a>: BitmapSlice
    where
        Self: 'a;

    /// Marks the bytes `[offset, offset + len)` of the region as dirty.
    fn mark_dirty(&self, offset: usize, len: usize);

    /// Whether the byte at `offset` lies in a dirty page.
    fn dirty_at(&self, offset: usize) -> bool;

    /// A slice of the bitmap starting at byte `offset` of the region.
    fn slice_at(&self, offset: usize) -> Self::Slice<'_>;
}

/// A bitmap that can be created for a region of a given size.
pub trait NewBitmap: Bitmap + Sized {
    /// A clean bitmap covering `len` bytes. Aborts, like any `Vec`, if its memory cannot be
    /// allocated: code that sizes a bitmap from a length it does not control (a file, a peer)
    /// calls [`try_with_len`](Self::try_with_len) instead, as the region builder does.
    fn with_len(len: usize) -> Self;

    /// A clean bitmap covering `len` bytes, or [`BitmapError::OutOfMemory`] if its memory
    /// cannot be allocated. The default calls [`with_len`](Self::with_len), for bitmaps that
    /// allocate nothing.
    fn try_with_len(len: usize) -> Result<Self, BitmapError> {
        Ok(Self::with_len(len))
    }

    /// The bitmap of a region built with dirty tracking off
    /// ([`MmapRegionBuilder::dirty_tracking`](crate::mmap::MmapRegionBuilder::dirty_tracking)).
    /// Types that always track (or never do) ignore the request: only `Option<B>` can be off,
    /// as `None`, and then says so ([`BitmapError::NotTracking`]) instead of reporting clean.
    fn untracked(len: usize) -> Self {
        Self::with_len(len)
    }
}

impl BitmapSlice for () {
    #[inline(always)]
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    #[inline(always)]
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    #[inline(always)]
    fn slice_at(&self, _offset: usize) -> Self {}
}

impl Bitmap for () {
    type Slice<'a> = ();

    #[inline(always)]
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    #[inline(always)]
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    #[inline(always)]
    fn slice_at(&self, _offset: usize) -> Self::Slice<'_> {}
}

impl NewBitmap for () {
    fn with_len(_len: usize) -> Self {}
}

/// A bitmap that hands out windows of itself: bitmaps of a part of its region that share its
/// bits (see [`AtomicBitmap::window`]). Implemented by `()` (nothing to share), [`AtomicBitmap`]
/// and `Option<B>`.
pub trait WindowBitmap: Bitmap + Sized {
    /// A bitmap for the `len` bytes at byte `offset`, sharing this one's bits.
    fn window(&self, offset: usize, len: usize) -> Result<Self, BitmapError>;
}

impl WindowBitmap for () {
    fn window(&self, _offset: usize, _len: usize) -> Result<(), BitmapError> {
        Ok(())
    }
}

impl WindowBitmap for AtomicBitmap {
    fn window(&self, offset: usize, len: usize) -> Result<AtomicBitmap, BitmapError> {
        AtomicBitmap::window(self, offset, len)
    }
}

impl<B: WindowBitmap> WindowBitmap for Option<B> {
    fn window(&self, offset: usize, len: usize) -> Result<Self, BitmapError> {
        self.as_ref().map(|b| b.window(offset, len)).transpose()
    }
}

/// Errors of the dirty bitmaps and their harvest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// A page size that is zero or not a power of two.
    #[error("page size {page_size} is not a power of two")]
    InvalidPageSize {
        /// The page size asked for.
        page_size: usize,
    },
    /// The bitmap's words could not be allocated (the allocator refused `words_bytes`, or
    /// the size does not fit in an allocation at all).
    #[error("no memory for the dirty bitmap of {byte_len} bytes in pages of {page_size} bytes ({words_bytes} bytes of words)")]
    OutOfMemory {
        /// Bytes the bitmap had to cover.
        byte_len: usize,
        /// Its page size.
        page_size: usize,
        /// Bytes of words it needed (saturated at `usize::MAX`).
        words_bytes: usize,
    },
    /// A buffer for taken words shorter than the bitmap.
    #[error("buffer of {len} words is shorter than the bitmap's {num_words} words")]
    BufferTooShort {
        /// Words in the buffer.
        len: usize,
        /// Words in the bitmap.
        num_words: usize,
    },
    /// Words to merge or restore that are more than the bitmap holds.
    #[error("{len} words to merge are more than the bitmap's {num_words} words")]
    TooManyWords {
        /// Words given.
        len: usize,
        /// Words in the bitmap.
        num_words: usize,
    },
    /// A window that does not start on a word (64 pages) of its bitmap, does not end on one or
    /// at the bitmap's end, or runs past it.
    #[error(
        "a window of {len} bytes at {offset:#x} does not fall on whole words of a bitmap of {byte_len} bytes"
    )]
    InvalidWindow {
        /// Where the window was to start.
        offset: usize,
        /// Its length.
        len: usize,
        /// The length of the bitmap it was asked of.
        byte_len: usize,
    },
    /// [`AtomicBitmap::enlarge`] of a bitmap whose words other bitmaps share (its windows, or
    /// the bitmap it is a window of): moving the words would leave them marking the old ones.
    #[error("the bitmap shares its words with {sharers} other bitmaps (windows): it cannot be enlarged")]
    SharedWords {
        /// How many other bitmaps share the words.
        sharers: usize,
    },
    /// A harvest (or merge) on memory whose dirty tracking is off (`None`).
    #[error("dirty tracking is off for this memory: there is no dirty log to harvest or merge into")]
    NotTracking,
}

/// A bitmap whose dirty pages can be harvested: taken and cleared, merged with KVM's log, and
/// put back.
///
/// Implemented by [`AtomicBitmap`] (whose inherent methods of the same names are the
/// infallible versions of these) and by `Option<B>` for any harvestable `B`, so guest-memory
/// code can harvest every region the same way. Page numbers are relative to the region.
///
/// `None` (tracking off) fails every call with [`BitmapError::NotTracking`]. Reporting "no
/// dirty page" instead would be a trap: a migration or a diff snapshot that harvests a region
/// nobody tracked would skip pages that were written, and silently send stale memory; merging
/// KVM's log into it would drop guest writes that KVM then forgets. A caller that meets
/// `NotTracking` must treat the whole region as dirty (or turn tracking on). For the same
/// reason `()` does not implement this trait at all.
///
/// ```
/// use guestmem::bitmap::{AtomicBitmap, BitmapError, DirtyHarvest, NewBitmap};
///
/// /// Total dirty pages of all regions, taken and cleared; `None` when one is not tracked.
/// fn harvest_all<B: DirtyHarvest>(regions: &[B]) -> Result<usize, BitmapError> {
///     regions.iter().map(|r| r.take_dirty_runs(|_first, _count| {})).sum()
/// }
///
/// let tracked = [Some(AtomicBitmap::with_len(1 << 20)), Some(AtomicBitmap::with_len(8192))];
/// tracked[1].as_ref().unwrap().mark_pages(0, 2);
/// assert_eq!(harvest_all(&tracked), Ok(2));
/// let untracked: [Option<AtomicBitmap>; 1] = [None];
/// assert_eq!(harvest_all(&untracked), Err(BitmapError::NotTracking));
/// ```
pub trait DirtyHarvest {
    /// The page size in bytes: one bit per page.
    fn page_size(&self) -> Result<usize, BitmapError>;

    /// The number of pages covered.
    fn num_pages(&self) -> Result<usize, BitmapError>;

    /// The number of 64-page words: the length of a buffer for
    /// [`take_dirty_words`](Self::take_dirty_words).
    fn num_words(&self) -> Result<usize, BitmapError> {
        Ok(self.num_pages()?.div_ceil(u64::BITS as usize))
    }

    /// The number of dirty pages now, without clearing them.
    fn dirty_page_count(&self) -> Result<usize, BitmapError>;

    /// Takes and clears the dirty bits into `out` in KVM's format; returns the number of dirty
    /// pages taken. See [`AtomicBitmap::take_dirty_words`].
    fn take_dirty_words(&self, out: &mut [u64]) -> Result<usize, BitmapError>;

    /// Takes and clears the dirty bits, calling `f(first_page, num_pages)` for each maximal run
    /// of dirty pages; returns the number of dirty pages taken. See
    /// [`AtomicBitmap::take_dirty_runs`].
    fn take_dirty_runs(&self, f: impl FnMut(usize, usize)) -> Result<usize, BitmapError>;

    /// ORs a KVM-format bitmap in. See [`AtomicBitmap::merge_words`].
    fn merge_words(&self, words: &[u64]) -> Result<(), BitmapError>;

    /// Puts back bits taken by a consumer that could not use them. See
    /// [`AtomicBitmap::restore`].
    fn restore(&self, words: &[u64]) -> Result<(), BitmapError>;
}

impl<S: BitmapSlice> BitmapSlice for Option<S> {
    #[inline(always)]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(slice) = self {
            slice.mark_dirty(offset, len);
        }
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.as_ref().is_some_and(|slice| slice.dirty_at(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        self.as_ref().map(|slice| slice.slice_at(offset))
    }
}

/// Tracking that can be off: `None` marks nothing and reports nothing dirty.
///
/// ```
/// use guestmem::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
///
/// let on: Option<AtomicBitmap> = NewBitmap::with_len(8192);
/// on.mark_dirty(4096, 1);
/// assert!(on.dirty_at(4096));
/// let off: Option<AtomicBitmap> = None;
/// off.mark_dirty(4096, 1);
/// assert!(!off.dirty_at(4096));
/// ```
impl<B: Bitmap> Bitmap for Option<B> {
    type Slice<'a>
        = Option<B::Slice<'a>>
    where
        Self: 'a;

    #[inline(always)]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(bitmap) = self {
            bitmap.mark_dirty(offset, len);
        }
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.as_ref().is_some_and(|bitmap| bitmap.dirty_at(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self::Slice<'_> {
        self.as_ref().map(|bitmap| bitmap.slice_at(offset))
    }
}

impl<B: NewBitmap> NewBitmap for Option<B> {
    /// `Some` clean bitmap: a new region is tracked, unless built with
    /// [`dirty_tracking(false)`](crate::mmap::MmapRegionBuilder::dirty_tracking), which gives `None`.
    fn with_len(len: usize) -> Self {
        Some(B::with_len(len))
    }

    fn try_with_len(len: usize) -> Result<Self, BitmapError> {
        B::try_with_len(len).map(Some)
    }

    fn untracked(_len: usize) -> Self {
        None
    }
}

/// `None` fails every call with [`BitmapError::NotTracking`]; see [`DirtyHarvest`] for why.
impl<B: DirtyHarvest> DirtyHarvest for Option<B> {
    fn page_size(&self) -> Result<usize, BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.page_size()
    }

    fn num_pages(&self) -> Result<usize, BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.num_pages()
    }

    fn dirty_page_count(&self) -> Result<usize, BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.dirty_page_count()
    }

    fn take_dirty_words(&self, out: &mut [u64]) -> Result<usize, BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.take_dirty_words(out)
    }

    fn take_dirty_runs(&self, f: impl FnMut(usize, usize)) -> Result<usize, BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.take_dirty_runs(f)
    }

    fn merge_words(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.merge_words(words)
    }

    fn restore(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.as_ref().ok_or(BitmapError::NotTracking)?.restore(words)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A bitmap that records every mark exactly, to check which bytes each write path marks.

    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records marked byte ranges in a shared `Vec<bool>`, one flag per byte.
    #[derive(Clone, Debug)]
    pub(crate) struct ByteBitmap {
        bytes: Arc<Mutex<Vec<bool>>>,
        base: usize,
    }

    impl ByteBitmap {
        pub(crate) fn new(len: usize) -> Self {
            ByteBitmap { bytes: Arc::new(Mutex::new(vec![false; len])), base: 0 }
        }

        /// The marked byte ranges, coalesced, relative to the bitmap's region.
        pub(crate) fn ranges(&self) -> Vec<(usize, usize)> {
            let bytes = self.bytes.lock().unwrap();
            let mut out = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] {
                    let start = i;
                    while i < bytes.len() && bytes[i] {
                        i += 1;
                    }
                    out.push((start, i - start));
                } else {
                    i += 1;
                }
            }
            out
        }

        pub(crate) fn clear(&self) {
            self.bytes.lock().unwrap().iter_mut().for_each(|b| *b = false);
        }
    }

    impl BitmapSlice for ByteBitmap {
        fn mark_dirty(&self, offset: usize, len: usize) {
            let mut bytes = self.bytes.lock().unwrap();
            for b in &mut bytes[self.base + offset..self.base + offset + len] {
                *b = true;
            }
        }

        fn dirty_at(&self, offset: usize) -> bool {
            self.bytes.lock().unwrap()[self.base + offset]
        }

        fn slice_at(&self, offset: usize) -> Self {
            ByteBitmap { bytes: self.bytes.clone(), base: self.base + offset }
        }
    }
}
