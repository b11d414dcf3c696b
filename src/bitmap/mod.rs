//! Dirty-page tracking: the [`Bitmap`] and [`BitmapSlice`] traits.
//!
//! Every write that goes through guestmem (slices, refs, atomics, I/O into guest memory) marks
//! the bytes it wrote in the bitmap of the memory it wrote, after the copy. A [`Bitmap`] covers
//! one region; a [`BitmapSlice`] is a cheap handle on a bitmap shifted to where a
//! [`VolatileSlice`](crate::VolatileSlice) starts, so a slice marks at its own offsets.
//!
//! `()` is the bitmap that tracks nothing and costs nothing: marks compile away.
//!
//! ```
//! use guestmem::bitmap::{Bitmap, BitmapSlice};
//! let b = ();
//! Bitmap::mark_dirty(&b, 0, 4096);
//! assert!(!Bitmap::dirty_at(&b, 0));
//! assert!(!BitmapSlice::dirty_at(&Bitmap::slice_at(&b, 100), 0));
//! ```

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
    /// A clean bitmap covering `len` bytes.
    fn with_len(len: usize) -> Self;
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
