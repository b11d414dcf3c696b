//! The vm-memory face of guestmem's dirty bitmaps: [`BitmapFace`] and [`SliceFace`], and the
//! [`BridgeBitmap`] trait that maps each guestmem bitmap to its face.
//!
//! A vm-memory consumer marks what it writes through the bitmap slice of the vm-memory
//! `VolatileSlice` it got (virtio-queue's `Writer` calls `slice.bitmap().mark_dirty(..)` after
//! a raw copy). Through the bridge that slice is a [`SliceFace`] over the guestmem bitmap slice
//! of the region, so the mark lands in guestmem's own bitmap and shows up in guestmem's
//! harvests, diff snapshots and migrations; nothing is copied or kept on the side.
//!
//! ```
//! use guestmem::bitmap::{AtomicBitmap, Bitmap as _};
//! use guestmem::compat::{BitmapFace, BridgeBitmap};
//! use vm_memory::bitmap::Bitmap;
//!
//! let bitmap = AtomicBitmap::new(1 << 20, 4096).unwrap();
//! let face: &BitmapFace<AtomicBitmap> = bitmap.face();
//! face.slice_at(0x2000).mark_dirty(0x10, 8); // what a vm-memory consumer does
//! assert!(bitmap.is_page_dirty(2));
//! assert!(face.dirty_at(0x2010) && !face.dirty_at(0));
//! ```

use std::fmt::Debug;

use vm_memory::bitmap::{Bitmap as VmBitmap, BitmapSlice as VmBitmapSlice, WithBitmapSlice, BS as VmBS};

use crate::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};

/// A guestmem bitmap seen as a vm-memory [`Bitmap`](vm_memory::bitmap::Bitmap).
///
/// `#[repr(transparent)]` over the guestmem bitmap, so a region's bitmap is viewed in place
/// ([`BitmapFace::from_ref`]) and every call goes straight to it.
#[derive(Debug)]
#[repr(transparent)]
pub struct BitmapFace<B>(B);

impl<B> BitmapFace<B> {
    /// The face of `bitmap`, without a copy.
    ///
    /// ```
    /// use guestmem::bitmap::AtomicBitmap;
    /// use guestmem::compat::BitmapFace;
    /// let bitmap = AtomicBitmap::new(8192, 4096).unwrap();
    /// assert_eq!(BitmapFace::from_ref(&bitmap).inner().num_pages(), 2);
    /// ```
    #[inline]
    pub fn from_ref(bitmap: &B) -> &Self {
        // SAFETY: `BitmapFace<B>` is `#[repr(transparent)]` over `B`, so both have the same
        // layout and validity, and the returned reference borrows `bitmap` for its lifetime.
        unsafe { &*(bitmap as *const B).cast::<Self>() }
    }

    /// The guestmem bitmap behind the face.
    #[inline]
    pub fn inner(&self) -> &B {
        &self.0
    }
}

/// A guestmem bitmap slice seen as a vm-memory
/// [`BitmapSlice`](vm_memory::bitmap::BitmapSlice): what the vm-memory `VolatileSlice`s of a
/// tracked region carry.
///
/// ```
/// use guestmem::bitmap::{AtomicBitmap, Bitmap as _};
/// use guestmem::compat::SliceFace;
/// use vm_memory::bitmap::Bitmap;
///
/// let bitmap = AtomicBitmap::new(1 << 16, 4096).unwrap();
/// let slice = SliceFace::new(bitmap.slice_at(0x1000));
/// slice.slice_at(0x1000).mark_dirty(0, 1);
/// assert!(bitmap.is_page_dirty(2));
/// ```
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct SliceFace<S>(S);

impl<S> SliceFace<S> {
    /// The face of a guestmem bitmap slice.
    #[inline]
    pub fn new(slice: S) -> Self {
        SliceFace(slice)
    }

    /// The guestmem bitmap slice behind the face.
    #[inline]
    pub fn inner(&self) -> &S {
        &self.0
    }

    /// The guestmem bitmap slice, by value.
    #[inline]
    pub fn into_inner(self) -> S {
        self.0
    }
}

impl<S: BitmapSlice> WithBitmapSlice<'_> for SliceFace<S> {
    type S = Self;
}

impl<S: BitmapSlice> VmBitmapSlice for SliceFace<S> {}

impl<S: BitmapSlice> VmBitmap for SliceFace<S> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len);
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        SliceFace(self.0.slice_at(offset))
    }
}

impl<'a, B: Bitmap + 'static> WithBitmapSlice<'a> for BitmapFace<B> {
    type S = SliceFace<B::Slice<'a>>;
}

impl<B: Bitmap + 'static> VmBitmap for BitmapFace<B> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len);
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> SliceFace<B::Slice<'_>> {
        SliceFace(self.0.slice_at(offset))
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl Sealed for crate::bitmap::AtomicBitmap {}
    impl Sealed for Option<crate::bitmap::AtomicBitmap> {}
}

/// A guestmem bitmap the bridge can carry: `()`, [`AtomicBitmap`] and `Option<AtomicBitmap>`.
///
/// Each has a vm-memory face ([`Face`](Self::Face)): `()` is vm-memory's own `()` (so a
/// consumer's `Reader<'_>`/`Writer<'_>`, whose bitmap defaults to `()`, name the same type),
/// the others a [`BitmapFace`] over themselves. Sealed: the bridge's soundness does not depend
/// on it, but its fast path is written for these three.
pub trait BridgeBitmap: Bitmap + sealed::Sealed + 'static {
    /// The vm-memory bitmap a region of this bitmap presents.
    type Face: VmBitmap + Debug;

    /// This bitmap's face, without a copy.
    fn face(&self) -> &Self::Face;

    /// The face of one of this bitmap's slices.
    fn slice_face<'a>(slice: Self::Slice<'a>) -> VmBS<'a, Self::Face>;
}

impl BridgeBitmap for () {
    type Face = ();

    #[inline(always)]
    fn face(&self) -> &() {
        self
    }

    #[inline(always)]
    fn slice_face<'a>(_slice: ()) -> VmBS<'a, ()> {}
}

impl BridgeBitmap for AtomicBitmap {
    type Face = BitmapFace<AtomicBitmap>;

    #[inline(always)]
    fn face(&self) -> &Self::Face {
        BitmapFace::from_ref(self)
    }

    #[inline(always)]
    fn slice_face<'a>(slice: Self::Slice<'a>) -> VmBS<'a, Self::Face> {
        SliceFace(slice)
    }
}

impl BridgeBitmap for Option<AtomicBitmap> {
    type Face = BitmapFace<Option<AtomicBitmap>>;

    #[inline(always)]
    fn face(&self) -> &Self::Face {
        BitmapFace::from_ref(self)
    }

    #[inline(always)]
    fn slice_face<'a>(slice: Self::Slice<'a>) -> VmBS<'a, Self::Face> {
        SliceFace(slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::NewBitmap;

    /// vm-memory's own generic check for a `Bitmap` (a clean range, marked through a slice
    /// taken before the mark), written against the face.
    fn check_face<F: VmBitmap>(face: &F, tracks: bool) {
        let s = face.slice_at(0x400);
        assert!((0..0x800).all(|o| !face.dirty_at(o)));
        face.mark_dirty(0x400, 0x100);
        assert_eq!((0x400..0x500).all(|o| face.dirty_at(o)), tracks);
        assert_eq!((0..0x100).all(|o| s.dirty_at(o)), tracks);
        s.slice_at(0x1000).mark_dirty(0, 1);
        assert_eq!(face.dirty_at(0x1400), tracks);
    }

    #[test]
    fn faces_mark_the_guestmem_bitmap() {
        let atomic = AtomicBitmap::new(0x10000, 4096).unwrap();
        check_face(atomic.face(), true);
        assert_eq!(atomic.dirty_page_count(), 2);

        let some: Option<AtomicBitmap> = NewBitmap::with_len(0x10000);
        check_face(some.face(), true);
        let none: Option<AtomicBitmap> = None;
        check_face(none.face(), false);
        check_face(().face(), false);

        let slice = AtomicBitmap::slice_face(atomic.slice_at(0x3000));
        assert_eq!(slice.inner().base(), 0x3000);
        assert_eq!(slice.into_inner().base(), 0x3000);
        assert!(format!("{:?}", atomic.face()).contains("AtomicBitmap"));
        assert!(format!("{slice:?}").contains("SliceFace"));
    }
}
