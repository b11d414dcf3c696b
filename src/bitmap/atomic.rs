//! [`AtomicBitmap`]: one bit per page in 64-bit atomic words, KVM's dirty-log layout.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Bitmap, BitmapError, BitmapSlice, DirtyHarvest, NewBitmap};

/// Pages per word.
const WORD_BITS: usize = u64::BITS as usize;

/// The dirty bitmap of one region: one bit per page, set by every write to the page and taken
/// (read and cleared atomically) by a harvester.
///
/// Bit `i` of word `j` stands for page `64 * j + i` of the region, which is exactly the format of
/// `KVM_GET_DIRTY_LOG`, so a KVM log merges in word by word ([`merge_words`](Self::merge_words))
/// and a harvest comes out in the same format ([`take_dirty_words`](Self::take_dirty_words)).
///
/// The bitmap covers the region's bytes, [`byte_len`](Self::byte_len), rounded up to whole
/// pages ([`num_pages`](Self::num_pages)). There is no `len`: vm-memory's `AtomicBitmap::len`
/// counts pages, guestmem's used to count bytes, and a call that compiles with either meaning
/// would be a silent trap for code ported from one to the other. Marks past the end are
/// clipped, never a panic. An empty bitmap (`byte_len` 0) is allowed, for an
/// empty region: it covers no page, so it has nothing to drop.
///
/// Marking a byte range costs one atomic read-modify-write per 64-page word it touches (one for
/// any write of up to a page). Harvesting walks the words, skips clean ones with a plain load
/// and takes dirty ones with one `swap(0)`; it never allocates.
///
/// Ordering: a mark is a `Release` RMW made after the data was written, and a harvest takes a
/// word with an `Acquire` swap. So once a harvester has taken a page's bit, reading the page
/// sees every write that marked it; a write that races with the harvest marks the page again
/// and shows up in the next harvest.
///
/// ```
/// use guestmem::bitmap::{AtomicBitmap, Bitmap};
///
/// let bitmap = AtomicBitmap::new(1 << 20, 4096).unwrap(); // 1 MiB region: 256 pages
/// bitmap.mark_dirty(0x1ff0, 0x20); // the end of page 1 and the start of page 2
/// bitmap.mark_dirty(0x3000, 1); // page 3
/// let mut runs = Vec::new();
/// assert_eq!(bitmap.take_dirty_runs(|first, count| runs.push((first, count))), 3);
/// assert_eq!(runs, [(1, 3)]);
/// assert_eq!(bitmap.dirty_page_count(), 0); // taking clears
/// ```
pub struct AtomicBitmap {
    /// The first of this bitmap's words, which live in `storage` (shared with the bitmaps it
    /// is a window of, or that are windows of it).
    first: NonNull<AtomicU64>,
    num_words: usize,
    storage: Arc<Words>,
    /// Bytes covered: the region's length.
    byte_len: usize,
    /// `byte_len` rounded up to pages, in pages.
    num_pages: usize,
    /// log2 of the page size.
    page_shift: u32,
}

impl AtomicBitmap {
    /// The page size [`NewBitmap::with_len`] uses: 4 KiB, the granularity of KVM's dirty log.
    pub const DEFAULT_PAGE_SIZE: usize = 4096;

    /// A clean bitmap for a region of `byte_len` bytes, one bit per `page_size` bytes.
    ///
    /// `page_size` must be a power of two ([`BitmapError::InvalidPageSize`] otherwise). The
    /// words are allocated with a fallible reservation, so a bitmap too large for memory is
    /// [`BitmapError::OutOfMemory`], not an abort. `byte_len` 0 gives an empty bitmap.
    ///
    /// ```
    /// use guestmem::bitmap::{AtomicBitmap, BitmapError};
    ///
    /// let bitmap = AtomicBitmap::new(10_000, 4096).unwrap();
    /// assert_eq!((bitmap.byte_len(), bitmap.num_pages(), bitmap.num_words()), (10_000, 3, 1));
    /// assert!(matches!(AtomicBitmap::new(4096, 3000), Err(BitmapError::InvalidPageSize { .. })));
    /// ```
    pub fn new(byte_len: usize, page_size: usize) -> Result<Self, BitmapError> {
        let (num_pages, num_words, page_shift) = geometry(byte_len, page_size)?;
        let storage = Words::zeroed(num_words).ok_or(BitmapError::OutOfMemory {
            byte_len,
            page_size,
            words_bytes: num_words.saturating_mul(8),
        })?;
        Ok(AtomicBitmap {
            first: storage.ptr,
            num_words,
            storage: Arc::new(storage),
            byte_len,
            num_pages,
            page_shift,
        })
    }

    /// The page size in bytes: the granularity of marks.
    ///
    /// ```
    /// assert_eq!(guestmem::bitmap::AtomicBitmap::new(0, 2 << 20).unwrap().page_size(), 2 << 20);
    /// ```
    #[inline]
    pub fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    /// The bytes covered: the length of the region the bitmap was made for (vm-memory calls
    /// this `byte_size`; its `len` counts pages, which is [`num_pages`](Self::num_pages) here).
    ///
    /// ```
    /// assert_eq!(guestmem::bitmap::AtomicBitmap::new(5000, 4096).unwrap().byte_len(), 5000);
    /// ```
    #[inline]
    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// Whether the bitmap covers no byte (made for an empty region).
    ///
    /// ```
    /// assert!(guestmem::bitmap::AtomicBitmap::new(0, 4096).unwrap().is_empty());
    /// ```
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.byte_len == 0
    }

    /// The number of pages covered: [`byte_len`](Self::byte_len) rounded up to whole pages
    /// (vm-memory's `AtomicBitmap::len`).
    ///
    /// ```
    /// assert_eq!(guestmem::bitmap::AtomicBitmap::new(4097, 4096).unwrap().num_pages(), 2);
    /// ```
    #[inline]
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// The number of 64-page words: the length of a KVM-format buffer for this bitmap.
    ///
    /// ```
    /// assert_eq!(guestmem::bitmap::AtomicBitmap::new(65 * 4096, 4096).unwrap().num_words(), 2);
    /// ```
    #[inline]
    pub fn num_words(&self) -> usize {
        self.num_words
    }

    /// The words, in KVM's layout.
    #[inline(always)]
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `first..first + num_words` lies in `storage`'s allocation of zero-initialized
        // `AtomicU64`s (checked when the bitmap or window was made), which lives as long as
        // `self` holds its `Arc`.
        unsafe { std::slice::from_raw_parts(self.first.as_ptr(), self.num_words) }
    }

    /// A bitmap for the `len` bytes at byte `offset` of this one's region, sharing its words:
    /// marks made through either are the same bits, and a harvest through either takes them
    /// once. Regions rebuilt over the same memory (the spans of a plug-state device) keep one
    /// set of bits this way.
    ///
    /// The window must start on a word (a multiple of 64 pages) and end on one or at this
    /// bitmap's end, so that no word is shared with a neighbouring window
    /// ([`BitmapError::InvalidWindow`] otherwise).
    ///
    /// ```
    /// let whole = guestmem::bitmap::AtomicBitmap::new(256 * 4096, 4096).unwrap();
    /// let w = whole.window(64 * 4096, 128 * 4096).unwrap();
    /// w.mark_pages(0, 1);
    /// assert!(whole.is_page_dirty(64));
    /// assert_eq!(whole.take_dirty_runs(|_, _| {}), 1);
    /// assert_eq!(w.dirty_page_count(), 0);
    /// assert!(whole.window(4096, 4096).is_err());
    /// ```
    pub fn window(&self, offset: usize, len: usize) -> Result<AtomicBitmap, BitmapError> {
        let page = self.page_size();
        let word_bytes = page * WORD_BITS;
        let invalid = BitmapError::InvalidWindow { offset, len, byte_len: self.byte_len };
        let Some(end) = offset.checked_add(len) else { return Err(invalid) };
        if end > self.byte_len
            || !offset.is_multiple_of(word_bytes)
            || (!end.is_multiple_of(word_bytes) && end != self.byte_len)
        {
            return Err(invalid);
        }
        let first_word = offset / word_bytes;
        let num_pages = len.div_ceil(page);
        let num_words = num_pages.div_ceil(WORD_BITS);
        Ok(AtomicBitmap {
            // SAFETY: `first_word + num_words <= self.num_words` (the window ends inside this
            // bitmap), so the pointer stays in the shared allocation.
            first: unsafe { self.first.add(first_word) },
            num_words,
            storage: self.storage.clone(),
            byte_len: len,
            num_pages,
            page_shift: self.page_shift,
        })
    }

    /// Marks `count` pages from `first_page` dirty; pages past the end are clipped.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(8 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(6, 100);
    /// assert_eq!(bitmap.dirty_page_count(), 2);
    /// ```
    #[inline]
    pub fn mark_pages(&self, first_page: usize, count: usize) {
        if count == 0 || first_page >= self.num_pages {
            return;
        }
        let last = first_page.saturating_add(count - 1).min(self.num_pages - 1);
        self.set_pages(first_page, last);
    }

    /// Whether page `page` is dirty; `false` past the end. Does not clear.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(8 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(3, 1);
    /// assert!(bitmap.is_page_dirty(3));
    /// assert!(!bitmap.is_page_dirty(4) && !bitmap.is_page_dirty(usize::MAX));
    /// ```
    #[inline]
    pub fn is_page_dirty(&self, page: usize) -> bool {
        self.words()
            .get(page / WORD_BITS)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % WORD_BITS)) != 0)
    }

    /// The number of dirty pages now (a popcount; does not clear). Marks racing with the call
    /// may or may not be counted.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(1 << 20, 4096).unwrap();
    /// bitmap.mark_pages(10, 100);
    /// assert_eq!(bitmap.dirty_page_count(), 100);
    /// assert_eq!(bitmap.dirty_page_count(), 100);
    /// ```
    pub fn dirty_page_count(&self) -> usize {
        self.words().iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Clears every bit, discarding what was dirty.
    ///
    /// This is not a harvest: marks racing with it may survive or be lost. To consume dirty
    /// pages use [`take_dirty_words`](Self::take_dirty_words) or
    /// [`take_dirty_runs`](Self::take_dirty_runs), which never lose one.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(1 << 20, 4096).unwrap();
    /// bitmap.mark_pages(0, 256);
    /// bitmap.reset();
    /// assert_eq!(bitmap.dirty_page_count(), 0);
    /// ```
    pub fn reset(&self) {
        for w in self.words().iter() {
            // Skipping clean words keeps their cache lines shared with writers on other CPUs.
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Clears the bits of `count` pages from `first_page` (pages past the end are ignored),
    /// discarding what was dirty there; other pages keep their bits. Like [`reset`](Self::reset),
    /// not a harvest: a mark racing with it on those pages may survive or be lost.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(256 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(0, 256);
    /// bitmap.reset_pages(10, 100);
    /// assert_eq!(bitmap.dirty_page_count(), 156);
    /// assert!(bitmap.is_page_dirty(9) && !bitmap.is_page_dirty(10) && bitmap.is_page_dirty(110));
    /// ```
    pub fn reset_pages(&self, first_page: usize, count: usize) {
        if count == 0 || first_page >= self.num_pages {
            return;
        }
        let last = first_page.saturating_add(count - 1).min(self.num_pages - 1);
        self.clear_pages(first_page, last);
    }

    /// Clears the bits of the pages that `[offset, offset + len)` covers *wholly* (a byte
    /// range of the region; the part past the end is ignored), discarding what was dirty there.
    ///
    /// A page the range covers only in part keeps its bit: its other bytes may hold writes that
    /// nobody took, and clearing it would lose them. vm-memory's `reset_addr_range` clears every
    /// page the range touches; guestmem's never clears a bit for a byte outside the range (a
    /// deliberate difference: resetting less can only make a harvest report more). The
    /// bitmap's last page counts as covered when the range reaches the bitmap's end, even if
    /// the region ends inside it.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(10_000, 4096).unwrap(); // 3 pages
    /// bitmap.mark_pages(0, 3);
    /// bitmap.reset_addr_range(0x800, 0x1000); // half of page 0, half of page 1: neither
    /// assert_eq!(bitmap.dirty_page_count(), 3);
    /// bitmap.reset_addr_range(0x800, 0x2000); // page 1 whole
    /// assert!(bitmap.is_page_dirty(0) && !bitmap.is_page_dirty(1));
    /// bitmap.reset_addr_range(0x2000, usize::MAX); // page 2, to the end
    /// assert_eq!(bitmap.dirty_page_count(), 1);
    /// ```
    pub fn reset_addr_range(&self, offset: usize, len: usize) {
        let end = offset.saturating_add(len).min(self.byte_len);
        if offset >= end {
            return;
        }
        let page = self.page_size();
        let first = offset.div_ceil(page);
        // Pages wholly below `end`; the last page also when the range reaches the end.
        let end_page = if end == self.byte_len { self.num_pages } else { end / page };
        if first < end_page {
            self.clear_pages(first, end_page - 1);
        }
    }

    /// Clears the bits of pages `first..=last`, which the caller clipped to the bitmap.
    fn clear_pages(&self, first: usize, last: usize) {
        let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
        let head = u64::MAX << (first % WORD_BITS);
        let tail = u64::MAX >> (WORD_BITS - 1 - last % WORD_BITS);
        let words = self.words();
        let clear = |index: usize, bits: u64| {
            if let Some(w) = words.get(index) {
                if w.load(Ordering::Relaxed) & bits != 0 {
                    w.fetch_and(!bits, Ordering::Relaxed);
                }
            }
        };
        if first_word == last_word {
            clear(first_word, head & tail);
        } else {
            clear(first_word, head);
            for w in words.get(first_word + 1..last_word).unwrap_or_default() {
                if w.load(Ordering::Relaxed) != 0 {
                    w.store(0, Ordering::Relaxed);
                }
            }
            clear(last_word, tail);
        }
    }

    /// Grows the bitmap to cover `additional` more bytes of its region (a region that grew);
    /// the new pages are clean, the old bits stay.
    ///
    /// The words move to a new allocation, so no other bitmap may share them: a bitmap with
    /// live windows ([`window`](Self::window)), or a window whose bitmap (or sibling window)
    /// still lives, is refused with [`BitmapError::SharedWords`] and left as it was; a window
    /// whose bitmap and siblings are gone grows on its own. An allocation failure (or a size
    /// past `usize::MAX`) is [`BitmapError::OutOfMemory`], leaving the bitmap unchanged.
    ///
    /// ```
    /// use guestmem::bitmap::{AtomicBitmap, BitmapError};
    /// let mut bitmap = AtomicBitmap::new(64 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(63, 1);
    /// bitmap.enlarge(4096 + 1).unwrap();
    /// assert_eq!((bitmap.byte_len(), bitmap.num_pages(), bitmap.num_words()), (65 * 4096 + 1, 66, 2));
    /// assert!(bitmap.is_page_dirty(63) && !bitmap.is_page_dirty(64));
    /// let window = bitmap.window(0, 64 * 4096).unwrap();
    /// assert!(matches!(bitmap.enlarge(4096), Err(BitmapError::SharedWords { sharers: 1 })));
    /// drop(window);
    /// bitmap.enlarge(4096).unwrap();
    /// ```
    pub fn enlarge(&mut self, additional: usize) -> Result<(), BitmapError> {
        let page_size = self.page_size();
        let Some(byte_len) = self.byte_len.checked_add(additional) else {
            return Err(BitmapError::OutOfMemory {
                byte_len: usize::MAX,
                page_size,
                words_bytes: usize::MAX,
            });
        };
        let sharers = Arc::strong_count(&self.storage) + Arc::weak_count(&self.storage) - 1;
        if sharers != 0 {
            return Err(BitmapError::SharedWords { sharers });
        }
        let (num_pages, num_words, _) = geometry(byte_len, page_size)?;
        if num_words != self.num_words {
            let storage = Words::zeroed(num_words).ok_or(BitmapError::OutOfMemory {
                byte_len,
                page_size,
                words_bytes: num_words.saturating_mul(8),
            })?;
            // SAFETY: `storage` holds `num_words >= self.num_words` zeroed words of its own.
            let new = unsafe { std::slice::from_raw_parts(storage.ptr.as_ptr(), num_words) };
            for (to, from) in new.iter().zip(self.words()) {
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            self.first = storage.ptr;
            self.storage = Arc::new(storage);
            self.num_words = num_words;
        }
        self.byte_len = byte_len;
        self.num_pages = num_pages;
        Ok(())
    }

    /// A deep copy: a bitmap of the same geometry with its own words, holding the bits set
    /// now (vm-memory's `Clone` of its `AtomicBitmap`), or [`BitmapError::OutOfMemory`]. Marks
    /// made later through either are not seen by the other; a window's copy covers only the
    /// window and shares nothing. For a bitmap that shares the bits, use
    /// [`window`](Self::window).
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(8 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(2, 1);
    /// let copy = bitmap.try_clone().unwrap();
    /// copy.mark_pages(5, 1);
    /// assert_eq!((bitmap.dirty_page_count(), copy.dirty_page_count()), (1, 2));
    /// ```
    pub fn try_clone(&self) -> Result<AtomicBitmap, BitmapError> {
        let page_size = self.page_size();
        let storage = Words::zeroed(self.num_words).ok_or(BitmapError::OutOfMemory {
            byte_len: self.byte_len,
            page_size,
            words_bytes: self.num_words.saturating_mul(8),
        })?;
        // SAFETY: `storage` holds `num_words` zeroed words of its own.
        let new = unsafe { std::slice::from_raw_parts(storage.ptr.as_ptr(), self.num_words) };
        for (to, from) in new.iter().zip(self.words()) {
            // Acquire: the copy's bits are ordered after the writes that set them, as a harvest.
            to.store(from.load(Ordering::Acquire), Ordering::Relaxed);
        }
        Ok(AtomicBitmap {
            first: storage.ptr,
            num_words: self.num_words,
            storage: Arc::new(storage),
            byte_len: self.byte_len,
            num_pages: self.num_pages,
            page_shift: self.page_shift,
        })
    }

    /// Takes the dirty bits into `out` in KVM's format and clears them; returns the number of
    /// dirty pages taken.
    ///
    /// Word `j` of `out` gets the bits of pages `64 * j ..= 64 * j + 63`, clean words as 0;
    /// entries of `out` past [`num_words`](Self::num_words) are left alone. Each word is taken
    /// with one atomic swap, so no mark is lost: a mark racing with the take is either in `out`
    /// or still in the bitmap. Fails with [`BitmapError::BufferTooShort`] (taking nothing) if
    /// `out` has fewer than `num_words` entries.
    ///
    /// ```
    /// use guestmem::bitmap::{AtomicBitmap, Bitmap};
    ///
    /// let bitmap = AtomicBitmap::new(128 * 4096, 4096).unwrap();
    /// bitmap.mark_dirty(63 * 4096, 2 * 4096); // pages 63 and 64
    /// let mut words = [0u64; 2];
    /// assert_eq!(bitmap.take_dirty_words(&mut words).unwrap(), 2);
    /// assert_eq!(words, [1 << 63, 1]);
    /// assert_eq!(bitmap.take_dirty_words(&mut words).unwrap(), 0);
    /// assert!(bitmap.take_dirty_words(&mut [0u64; 1]).is_err());
    /// ```
    pub fn take_dirty_words(&self, out: &mut [u64]) -> Result<usize, BitmapError> {
        let num_words = self.num_words;
        let len = out.len();
        let out = out.get_mut(..num_words).ok_or(BitmapError::BufferTooShort { len, num_words })?;
        let mut taken = 0;
        // The plain load of `take_word`, done for a group at once (see `GROUP`).
        let mut groups = self.words().chunks_exact(GROUP);
        let mut slot_groups = out.chunks_exact_mut(GROUP);
        for (group, slots) in (&mut groups).zip(&mut slot_groups) {
            let mut dirty = dirty_mask(group);
            slots.fill(0);
            while dirty != 0 {
                let i = dirty.trailing_zeros() as usize;
                dirty &= dirty - 1;
                if let (Some(word), Some(slot)) = (group.get(i), slots.get_mut(i)) {
                    let bits = word.swap(0, Ordering::Acquire);
                    *slot = bits;
                    taken += bits.count_ones() as usize;
                }
            }
        }
        for (word, slot) in groups.remainder().iter().zip(slot_groups.into_remainder()) {
            let bits = take_word(word);
            *slot = bits;
            taken += bits.count_ones() as usize;
        }
        Ok(taken)
    }

    /// Takes the dirty bits and clears them, calling `f(first_page, num_pages)` once for each
    /// maximal run of consecutive dirty pages, in ascending order; returns the number of dirty
    /// pages taken.
    ///
    /// Runs that cross word boundaries come out as one run. As with
    /// [`take_dirty_words`](Self::take_dirty_words), each word is taken with one atomic swap and
    /// no mark is lost. `f` is called while the walk goes on: a run is reported once the page
    /// after it was found clean, so later words may not have been taken yet.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(1 << 20, 4096).unwrap();
    /// bitmap.mark_pages(60, 10); // crosses the first word boundary
    /// bitmap.mark_pages(200, 1);
    /// let mut runs = Vec::new();
    /// assert_eq!(bitmap.take_dirty_runs(|first, count| runs.push((first, count))), 11);
    /// assert_eq!(runs, [(60, 10), (200, 1)]);
    /// ```
    pub fn take_dirty_runs(&self, mut f: impl FnMut(usize, usize)) -> usize {
        let mut runs = Runs { first: 0, len: 0, taken: 0 };
        let mut groups = self.words().chunks_exact(GROUP);
        let mut group_base = 0; // the index of the group's first word
        for group in &mut groups {
            let mut dirty = dirty_mask(group);
            while dirty != 0 {
                let i = dirty.trailing_zeros() as usize;
                dirty &= dirty - 1;
                if let Some(word) = group.get(i) {
                    runs.add_word((group_base + i) * WORD_BITS, word.swap(0, Ordering::Acquire), &mut f);
                }
            }
            group_base += GROUP;
        }
        for (i, word) in groups.remainder().iter().enumerate() {
            runs.add_word((group_base + i) * WORD_BITS, take_word(word), &mut f);
        }
        if runs.len != 0 {
            f(runs.first, runs.len);
        }
        runs.taken
    }

    /// ORs a KVM-format bitmap into this one (bit `i` of `words[j]` = page `64 * j + i`), e.g.
    /// the log `KVM_GET_DIRTY_LOG` returned for the region's memslot, so a harvest gives the
    /// union of guest writes (KVM's log) and host writes (this bitmap).
    ///
    /// `words` may be shorter than the bitmap (it covers the first pages); a longer one is
    /// [`BitmapError::TooManyWords`] and merges nothing. Bits for pages past the last page are
    /// ignored. One atomic OR per non-zero word.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(100 * 4096, 4096).unwrap();
    /// bitmap.merge_words(&[0b1010, u64::MAX]).unwrap(); // pages 1, 3, and 64..100
    /// assert_eq!(bitmap.dirty_page_count(), 2 + 36);
    /// assert!(bitmap.merge_words(&[0; 3]).is_err());
    /// ```
    pub fn merge_words(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.or_words(words)
    }

    /// Puts back dirty bits that a consumer took but could not use (a snapshot write that
    /// failed, a migration send that was cut), in the format of
    /// [`take_dirty_words`](Self::take_dirty_words), so the next harvest reports those pages
    /// again.
    ///
    /// The bits are ORed in, so pages marked since the take stay dirty. The same rules as
    /// [`merge_words`](Self::merge_words): a shorter `words` covers the first pages, a longer
    /// one is [`BitmapError::TooManyWords`], bits past the last page are ignored.
    ///
    /// ```
    /// let bitmap = guestmem::bitmap::AtomicBitmap::new(64 * 4096, 4096).unwrap();
    /// bitmap.mark_pages(5, 3);
    /// let mut taken = [0u64; 1];
    /// bitmap.take_dirty_words(&mut taken).unwrap();
    /// // ... sending pages 5..8 failed: give them back.
    /// bitmap.restore(&taken).unwrap();
    /// assert_eq!(bitmap.dirty_page_count(), 3);
    /// ```
    pub fn restore(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.or_words(words)
    }

    /// ORs `words` in; see [`merge_words`](Self::merge_words).
    fn or_words(&self, words: &[u64]) -> Result<(), BitmapError> {
        let num_words = self.num_words;
        if words.len() > num_words {
            return Err(BitmapError::TooManyWords { len: words.len(), num_words });
        }
        for (index, (word, &bits)) in self.words().iter().zip(words).enumerate() {
            let bits = if index + 1 == num_words { bits & self.last_word_mask() } else { bits };
            if bits != 0 {
                word.fetch_or(bits, Ordering::Release);
            }
        }
        Ok(())
    }

    /// The bits of the last word that stand for pages of the bitmap.
    #[inline]
    fn last_word_mask(&self) -> u64 {
        match self.num_pages % WORD_BITS {
            0 => u64::MAX,
            used => (1 << used) - 1,
        }
    }

    /// Marks the bytes `[offset, offset + len)`, clipped to the bitmap.
    #[inline]
    fn mark_bytes(&self, offset: usize, len: usize) {
        if len == 0 || offset >= self.byte_len {
            return;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.byte_len - 1);
        self.set_pages(offset >> self.page_shift, last_byte >> self.page_shift);
    }

    /// Sets the bits of pages `first..=last`, which the caller clipped to the bitmap.
    #[inline]
    fn set_pages(&self, first: usize, last: usize) {
        let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
        let head = u64::MAX << (first % WORD_BITS);
        let tail = u64::MAX >> (WORD_BITS - 1 - last % WORD_BITS);
        if first_word == last_word {
            self.or_word(first_word, head & tail);
        } else {
            self.or_word(first_word, head);
            for word in self.words().get(first_word + 1..last_word).unwrap_or_default() {
                // An RMW, not a `store(u64::MAX)`: a store would end the release sequence of
                // earlier marks of this word, and a harvester that read our store would not be
                // ordered after those writers' data.
                word.fetch_or(u64::MAX, Ordering::Release);
            }
            self.or_word(last_word, tail);
        }
    }

    /// ORs `bits` into word `index` (in range: the caller clipped it).
    #[inline(always)]
    fn or_word(&self, index: usize, bits: u64) {
        if let Some(word) = self.words().get(index) {
            // Always the RMW, never "load, and skip the OR if the bits are already set": a
            // skipped OR releases nothing. A harvester could then swap the word (taking the
            // bit set by an earlier write) and read the page without being ordered after our
            // data write (on x86 our data store may still sit in the store buffer), while the
            // bit is now clear: our write would never be harvested.
            word.fetch_or(bits, Ordering::Release);
        }
    }

    /// The byte offset `offset` is dirty; `false` past the end.
    #[inline]
    fn byte_dirty(&self, offset: usize) -> bool {
        offset < self.byte_len && self.is_page_dirty(offset >> self.page_shift)
    }
}

/// The state of [`AtomicBitmap::take_dirty_runs`].
struct Runs {
    /// The run found so far, which may still grow into the next word (`len` 0: none yet).
    first: usize,
    len: usize,
    /// Dirty pages taken so far.
    taken: usize,
}

impl Runs {
    /// Adds the dirty pages `bits` of the word that starts at page `base`, calling `f` for each
    /// run that ends before them. Runs come from `trailing_zeros`/`trailing_ones` on the whole
    /// word, never bit by bit.
    #[inline(always)]
    fn add_word(&mut self, base: usize, mut bits: u64, f: &mut impl FnMut(usize, usize)) {
        // Bit 0 of `bits` stands for page `base + shift`.
        let mut shift = 0;
        while bits != 0 {
            let zeros = bits.trailing_zeros(); // < 64, as bits != 0
            bits >>= zeros;
            shift += zeros;
            let ones = bits.trailing_ones(); // 1..=64
            self.taken += ones as usize; // cheaper than a popcount of the word
            let first = base + shift as usize;
            if self.len != 0 && self.first + self.len == first {
                self.len += ones as usize;
            } else {
                if self.len != 0 {
                    f(self.first, self.len);
                }
                self.first = first;
                self.len = ones as usize;
            }
            bits = bits.checked_shr(ones).unwrap_or(0);
            shift += ones;
        }
    }
}

/// Words the harvest walks as one group: plain loads of all of them build a mask of the dirty
/// ones, then only those are swapped. Branching per word on "is it dirty" mispredicts about half
/// the time on a bitmap with 1% of its pages dirty at random; a branch per group and a loop over
/// the mask's bits took half the time of the word-by-word walk (`benches/bitmap.rs`).
const GROUP: usize = 16;
const _: () = assert!(GROUP <= u32::BITS as usize, "the mask of a group is a u32");

/// Bit `i` set for each non-zero word `group[i]`, by plain loads.
#[inline(always)]
fn dirty_mask(group: &[AtomicU64]) -> u32 {
    group
        .iter()
        .enumerate()
        .fold(0, |mask, (i, word)| mask | u32::from(word.load(Ordering::Relaxed) != 0) << i)
}

/// Takes one word: a plain load skips clean words without writing their cache line; a dirty
/// word is taken with one `Acquire` swap, which orders our later reads of its pages after the
/// writers' data. A word that a writer dirties just after our load keeps its bits for the next
/// harvest.
#[inline(always)]
fn take_word(word: &AtomicU64) -> u64 {
    if word.load(Ordering::Relaxed) == 0 {
        0
    } else {
        word.swap(0, Ordering::Acquire)
    }
}

/// The words of one or more bitmaps (a bitmap and its windows): `count` zeroed `AtomicU64`s,
/// allocated with `alloc_zeroed` (which, for large sizes, hands out fresh zero pages without
/// touching them), freed when the last bitmap using them goes.
struct Words {
    ptr: NonNull<AtomicU64>,
    count: usize,
}

// SAFETY: the allocation is owned by this value and only ever accessed as atomics.
unsafe impl Send for Words {}
// SAFETY: as above.
unsafe impl Sync for Words {}

impl Words {
    /// `count` zeroed words, or `None` if the allocator refuses.
    fn zeroed(count: usize) -> Option<Words> {
        if count == 0 {
            return Some(Words { ptr: NonNull::dangling(), count: 0 });
        }
        let layout = std::alloc::Layout::array::<AtomicU64>(count).ok()?;
        // SAFETY: the layout has a non-zero size (count > 0, and an AtomicU64 is 8 bytes).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
        // All bytes zero: `count` valid `AtomicU64`s of value 0.
        NonNull::new(ptr).map(|ptr| Words { ptr, count })
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        if self.count == 0 {
            return;
        }
        // The layout was valid when the words were allocated.
        if let Ok(layout) = std::alloc::Layout::array::<AtomicU64>(self.count) {
            // SAFETY: `ptr` was allocated by the global allocator with exactly this layout, and
            // no bitmap uses it any more (each holds an `Arc` to us).
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

/// (pages, words, page shift) for `byte_len` bytes in pages of `page_size` bytes.
fn geometry(byte_len: usize, page_size: usize) -> Result<(usize, usize, u32), BitmapError> {
    if !page_size.is_power_of_two() {
        return Err(BitmapError::InvalidPageSize { page_size });
    }
    let num_pages = byte_len.div_ceil(page_size);
    Ok((num_pages, num_pages.div_ceil(WORD_BITS), page_size.trailing_zeros()))
}

// SAFETY: the words are atomics in an allocation the `Arc<Words>` keeps alive; the pointer is
// only used to reach them.
unsafe impl Send for AtomicBitmap {}
// SAFETY: as above; every access to the words is atomic.
unsafe impl Sync for AtomicBitmap {}

/// A deep copy ([`AtomicBitmap::try_clone`]); like any `Vec`, it aborts if memory runs out.
impl Clone for AtomicBitmap {
    fn clone(&self) -> Self {
        match self.try_clone() {
            Ok(bitmap) => bitmap,
            Err(_) => std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<AtomicU64>(self.num_words)
                    .unwrap_or(std::alloc::Layout::new::<u64>()),
            ),
        }
    }
}

impl fmt::Debug for AtomicBitmap {
    /// The geometry, not the bits (a 16 GiB guest has 65536 words).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicBitmap")
            .field("len", &self.byte_len)
            .field("page_size", &self.page_size())
            .field("num_pages", &self.num_pages)
            .finish_non_exhaustive()
    }
}

impl Bitmap for AtomicBitmap {
    type Slice<'a> = AtomicBitmapSlice<'a>;

    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark_bytes(offset, len);
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.byte_dirty(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> AtomicBitmapSlice<'_> {
        AtomicBitmapSlice { bitmap: self, base: offset }
    }
}

impl NewBitmap for AtomicBitmap {
    /// A clean bitmap of [`DEFAULT_PAGE_SIZE`](AtomicBitmap::DEFAULT_PAGE_SIZE) pages for `len`
    /// bytes.
    ///
    /// Like any `Vec`, it aborts if memory runs out (at most `len / 32768` bytes); use
    /// [`try_with_len`](NewBitmap::try_with_len) or [`AtomicBitmap::new`] for an error instead.
    fn with_len(len: usize) -> Self {
        match Self::new(len, Self::DEFAULT_PAGE_SIZE) {
            Ok(bitmap) => bitmap,
            Err(_) => {
                let words = len.div_ceil(Self::DEFAULT_PAGE_SIZE).div_ceil(WORD_BITS);
                // `new` fails only on allocation with a valid page size: the size it asked for.
                std::alloc::handle_alloc_error(
                    std::alloc::Layout::array::<AtomicU64>(words).unwrap_or(std::alloc::Layout::new::<u64>()),
                )
            }
        }
    }

    fn try_with_len(len: usize) -> Result<Self, BitmapError> {
        Self::new(len, Self::DEFAULT_PAGE_SIZE)
    }
}

impl DirtyHarvest for AtomicBitmap {
    fn page_size(&self) -> Result<usize, BitmapError> {
        Ok(AtomicBitmap::page_size(self))
    }

    fn num_pages(&self) -> Result<usize, BitmapError> {
        Ok(AtomicBitmap::num_pages(self))
    }

    fn dirty_page_count(&self) -> Result<usize, BitmapError> {
        Ok(AtomicBitmap::dirty_page_count(self))
    }

    fn take_dirty_words(&self, out: &mut [u64]) -> Result<usize, BitmapError> {
        AtomicBitmap::take_dirty_words(self, out)
    }

    fn take_dirty_runs(&self, f: impl FnMut(usize, usize)) -> Result<usize, BitmapError> {
        Ok(AtomicBitmap::take_dirty_runs(self, f))
    }

    fn merge_words(&self, words: &[u64]) -> Result<(), BitmapError> {
        AtomicBitmap::merge_words(self, words)
    }

    fn restore(&self, words: &[u64]) -> Result<(), BitmapError> {
        AtomicBitmap::restore(self, words)
    }
}

/// An [`AtomicBitmap`] seen from byte `base` of its region: the [`BitmapSlice`] that the
/// [`VolatileSlice`](crate::VolatileSlice)s of a tracked region carry.
///
/// Offsets are relative to `base`; marks past the bitmap's end are clipped.
///
/// ```
/// use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};
///
/// let bitmap = AtomicBitmap::new(1 << 20, 4096).unwrap();
/// let slice = bitmap.slice_at(0x8000);
/// slice.mark_dirty(0x1000, 8);
/// assert!(bitmap.is_page_dirty(9));
/// assert!(slice.dirty_at(0x1000) && !slice.dirty_at(0));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct AtomicBitmapSlice<'a> {
    bitmap: &'a AtomicBitmap,
    base: usize,
}

impl<'a> AtomicBitmapSlice<'a> {
    /// The whole bitmap this slice looks into.
    ///
    /// ```
    /// use guestmem::bitmap::{AtomicBitmap, Bitmap};
    /// let bitmap = AtomicBitmap::new(1 << 20, 4096).unwrap();
    /// assert_eq!(bitmap.slice_at(4096).bitmap().num_pages(), 256);
    /// ```
    #[inline]
    pub fn bitmap(&self) -> &'a AtomicBitmap {
        self.bitmap
    }

    /// The byte offset in the region where this slice starts.
    ///
    /// ```
    /// use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapSlice};
    /// let bitmap = AtomicBitmap::new(1 << 20, 4096).unwrap();
    /// assert_eq!(bitmap.slice_at(4096).slice_at(100).base(), 4196);
    /// ```
    #[inline]
    pub fn base(&self) -> usize {
        self.base
    }
}

impl BitmapSlice for AtomicBitmapSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Saturating: an offset past `usize::MAX` is past the end, and gets clipped.
        self.bitmap.mark_bytes(self.base.saturating_add(offset), len);
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.bitmap.byte_dirty(self.base.saturating_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        AtomicBitmapSlice { bitmap: self.bitmap, base: self.base.saturating_add(offset) }
    }
}
