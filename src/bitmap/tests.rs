//! Unit tests of `AtomicBitmap`, its slices, `Option` bitmaps and the harvest API: every error
//! variant, marks at word boundaries and at the end, run coalescing, take/merge/restore.

use super::*;

const PAGE: usize = 4096;

fn bitmap(pages: usize) -> AtomicBitmap {
    AtomicBitmap::new(pages * PAGE, PAGE).unwrap()
}

/// The dirty pages, taken with `take_dirty_runs`, as (first, count) runs.
fn runs(b: &AtomicBitmap) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let taken = b.take_dirty_runs(|first, count| out.push((first, count)));
    assert_eq!(taken, out.iter().map(|r| r.1).sum::<usize>());
    out
}

/// The dirty pages, read bit by bit without clearing.
fn dirty_pages(b: &AtomicBitmap) -> Vec<usize> {
    (0..b.num_pages()).filter(|&p| b.is_page_dirty(p)).collect()
}

#[test]
fn send_sync_copy() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<AtomicBitmap>();
    send_sync::<AtomicBitmapSlice<'static>>();
    send_sync::<Option<AtomicBitmap>>();
    fn copy<T: Copy>() {}
    copy::<AtomicBitmapSlice<'static>>();
}

#[test]
// Miri reports the deliberate usize::MAX allocation as exhaustion instead of failing it.
#[cfg_attr(miri, ignore)]
fn every_error_variant_and_its_message() {
    for page_size in [0, 3, 3000, usize::MAX] {
        let e = AtomicBitmap::new(4096, page_size).unwrap_err();
        assert_eq!(e, BitmapError::InvalidPageSize { page_size });
        assert_eq!(e.to_string(), format!("page size {page_size} is not a power of two"));
    }
    // 2^64 pages of one byte need 2^61 bytes of words: more than any allocation may be.
    let e = AtomicBitmap::new(usize::MAX, 1).unwrap_err();
    assert!(matches!(e, BitmapError::OutOfMemory { byte_len: usize::MAX, page_size: 1, .. }));
    assert!(e.to_string().starts_with("no memory for the dirty bitmap"));
    assert!(matches!(e, BitmapError::OutOfMemory { words_bytes, .. } if words_bytes == usize::MAX / 8 + 1));
    // The fallible constructor the region builder uses: 512 TiB of words is an error, not an abort.
    assert!(matches!(AtomicBitmap::try_with_len(usize::MAX), Err(BitmapError::OutOfMemory { .. })));
    assert!(matches!(<Option<AtomicBitmap>>::try_with_len(usize::MAX), Err(BitmapError::OutOfMemory { .. })));

    let b = bitmap(65); // 2 words
    let e = b.take_dirty_words(&mut [0; 1]).unwrap_err();
    assert_eq!(e, BitmapError::BufferTooShort { len: 1, num_words: 2 });
    assert_eq!(e.to_string(), "buffer of 1 words is shorter than the bitmap's 2 words");
    let e = b.merge_words(&[0; 3]).unwrap_err();
    assert_eq!(e, BitmapError::TooManyWords { len: 3, num_words: 2 });
    assert_eq!(e.to_string(), "3 words to merge are more than the bitmap's 2 words");
    assert_eq!(b.restore(&[1; 3]).unwrap_err(), BitmapError::TooManyWords { len: 3, num_words: 2 });
    assert_eq!(b.dirty_page_count(), 0, "a failed merge or restore merges nothing");

    let none: Option<AtomicBitmap> = None;
    let e = DirtyHarvest::take_dirty_runs(&none, |_, _| {}).unwrap_err();
    assert_eq!(e, BitmapError::NotTracking);
    assert!(e.to_string().contains("dirty tracking is off"));
}

#[test]
fn geometry() {
    let b = AtomicBitmap::new(10_000, 4096).unwrap();
    assert_eq!((b.byte_len(), b.page_size(), b.num_pages(), b.num_words()), (10_000, 4096, 3, 1));
    assert!(!b.is_empty());
    let b = AtomicBitmap::new(64 * 4096, 4096).unwrap();
    assert_eq!((b.num_pages(), b.num_words()), (64, 1));
    let b = AtomicBitmap::new(64 * 4096 + 1, 4096).unwrap();
    assert_eq!((b.num_pages(), b.num_words()), (65, 2));
    let b = AtomicBitmap::new(usize::MAX, 1 << 63).unwrap();
    assert_eq!((b.num_pages(), b.num_words(), b.page_size()), (2, 1, 1 << 63));
    let b = AtomicBitmap::new(3, 1).unwrap();
    assert_eq!((b.num_pages(), b.num_words()), (3, 1));

    let b = AtomicBitmap::with_len(16 << 30);
    assert_eq!((b.page_size(), b.num_pages(), b.num_words()), (4096, 4 << 20, 64 << 10));
    let o: Option<AtomicBitmap> = NewBitmap::with_len(5000);
    assert_eq!(o.as_ref().map(AtomicBitmap::num_pages), Some(2));
    assert_eq!(DirtyHarvest::num_words(&o), Ok(1));
    assert_eq!(DirtyHarvest::page_size(&o), Ok(4096));

    let dbg = format!("{:?}", AtomicBitmap::new(8192, 4096).unwrap());
    assert!(dbg.contains("len: 8192") && dbg.contains("page_size: 4096") && dbg.contains("num_pages: 2"));
}

#[test]
fn empty_bitmap_covers_nothing() {
    let b = AtomicBitmap::new(0, 4096).unwrap();
    assert!(b.is_empty());
    assert_eq!((b.byte_len(), b.num_pages(), b.num_words()), (0, 0, 0));
    b.mark_dirty(0, 4096);
    b.mark_pages(0, 1);
    b.slice_at(0).mark_dirty(0, 1);
    assert!(!b.dirty_at(0) && !b.is_page_dirty(0));
    assert_eq!(b.take_dirty_words(&mut []), Ok(0));
    assert!(runs(&b).is_empty());
    b.merge_words(&[]).unwrap();
    assert_eq!(b.merge_words(&[1]), Err(BitmapError::TooManyWords { len: 1, num_words: 0 }));
    b.reset();
    assert_eq!(b.dirty_page_count(), 0);
}

#[test]
fn marks_at_word_boundaries() {
    let b = bitmap(256);
    b.mark_dirty(63 * PAGE + PAGE - 1, 1); // last byte of page 63
    assert_eq!(dirty_pages(&b), [63]);
    b.mark_dirty(64 * PAGE, 1); // first byte of page 64
    assert_eq!(dirty_pages(&b), [63, 64]);
    b.reset();
    b.mark_dirty(64 * PAGE - 2, 4); // straddles the word boundary
    let mut words = [0; 4];
    assert_eq!(b.take_dirty_words(&mut words), Ok(2));
    assert_eq!(words, [1 << 63, 1, 0, 0]);
    b.mark_dirty(64 * PAGE, 64 * PAGE); // exactly word 1
    assert_eq!(b.take_dirty_words(&mut words), Ok(64));
    assert_eq!(words, [0, u64::MAX, 0, 0]);
    b.mark_pages(255, 1); // the last page
    assert_eq!(b.take_dirty_words(&mut words), Ok(1));
    assert_eq!(words, [0, 0, 0, 1 << 63]);
}

#[test]
fn ranges_spanning_many_words() {
    let b = bitmap(1000);
    b.mark_dirty(10 * PAGE + 5, 300 * PAGE); // pages 10..=310
    assert_eq!(b.dirty_page_count(), 301);
    assert_eq!(dirty_pages(&b), (10..=310).collect::<Vec<_>>());
    let mut words = [0; 16];
    assert_eq!(b.take_dirty_words(&mut words), Ok(301));
    assert_eq!(words[..5], [u64::MAX << 10, u64::MAX, u64::MAX, u64::MAX, (1 << 55) - 1]);
    assert!(words[5..].iter().all(|&w| w == 0));
    b.mark_dirty(0, usize::MAX); // everything
    assert_eq!(b.dirty_page_count(), 1000);
    assert_eq!(runs(&b), [(0, 1000)]);
}

#[test]
fn zero_length_marks_mark_nothing() {
    let b = bitmap(128);
    b.mark_dirty(4096, 0);
    b.mark_dirty(0, 0);
    b.mark_pages(5, 0);
    b.slice_at(100).mark_dirty(0, 0);
    Bitmap::mark_dirty(&Some(bitmap(1)), 0, 0);
    assert_eq!(b.dirty_page_count(), 0);
}

#[test]
fn marks_past_the_end_are_clipped() {
    let b = AtomicBitmap::new(5000, PAGE).unwrap(); // 2 pages, the second one partial
    b.mark_dirty(5000, 100); // past the last byte, though inside the last page
    b.mark_dirty(usize::MAX, usize::MAX);
    b.mark_dirty(8192, 1);
    b.mark_pages(2, 10);
    b.mark_pages(usize::MAX, usize::MAX);
    b.slice_at(usize::MAX).mark_dirty(usize::MAX, 10);
    b.slice_at(5000).mark_dirty(0, 1);
    assert_eq!(b.dirty_page_count(), 0);
    assert!(!b.dirty_at(5000) && !b.dirty_at(usize::MAX) && !b.is_page_dirty(2));
    b.mark_dirty(4999, usize::MAX); // last byte
    assert_eq!(dirty_pages(&b), [1]);
    b.mark_pages(1, usize::MAX);
    b.mark_pages(0, usize::MAX);
    assert_eq!(dirty_pages(&b), [0, 1]);
    assert!(b.dirty_at(4999) && !b.dirty_at(5000));
    let mut words = [0xdead; 3];
    assert_eq!(b.take_dirty_words(&mut words), Ok(2));
    assert_eq!(words, [0b11, 0xdead, 0xdead], "entries past num_words are left alone");
}

#[test]
fn slices_mark_at_their_offsets() {
    let b = bitmap(256);
    let s = b.slice_at(10 * PAGE + 100);
    assert_eq!(s.base(), 10 * PAGE + 100);
    assert!(std::ptr::eq(s.bitmap(), &b));
    s.mark_dirty(0, 1);
    assert_eq!(dirty_pages(&b), [10]);
    assert!(s.dirty_at(0) && s.dirty_at(PAGE - 101) && !s.dirty_at(PAGE - 100));
    let s2 = s.slice_at(PAGE); // byte 11 * PAGE + 100
    s2.mark_dirty(PAGE - 100, 2 * PAGE + 1); // bytes 12 * PAGE ..= 14 * PAGE
    assert_eq!(dirty_pages(&b), [10, 12, 13, 14]);
    assert!(s2.dirty_at(PAGE - 100) && !s2.dirty_at(0));
    assert!(!s.slice_at(usize::MAX).dirty_at(usize::MAX));
    let debug = format!("{s2:?}");
    assert!(debug.contains("AtomicBitmapSlice") && debug.contains("base"));
}

#[test]
fn runs_coalesce_across_words() {
    let b = bitmap(512);
    b.mark_pages(60, 10); // 60..70 crosses word 0/1
    b.mark_pages(128, 128); // words 2 and 3 whole
    b.mark_pages(256, 1); // continues into word 4
    b.mark_pages(258, 1);
    b.mark_pages(383, 1); // ends exactly at a word end, next word clean
    b.mark_pages(448, 64); // the last word, whole
    assert_eq!(runs(&b), [(60, 10), (128, 129), (258, 1), (383, 1), (448, 64)]);
    assert!(runs(&b).is_empty(), "taking clears");

    b.mark_pages(0, 512);
    assert_eq!(runs(&b), [(0, 512)]);
    // Alternating bits: a run per page.
    b.merge_words(&[0x5555_5555_5555_5555; 8]).unwrap();
    let r = runs(&b);
    assert_eq!(r.len(), 256);
    assert!(r.iter().enumerate().all(|(i, &run)| run == (2 * i, 1)));
}

#[test]
fn runs_match_a_bit_by_bit_reference() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Up to and past whole groups of words, with and without a remainder.
    for pages in [1, 63, 64, 65, 200, 640, 16 * 64, 16 * 64 + 1, 40 * 64 + 5] {
        let b = bitmap(pages);
        for _ in 0..50 {
            let words: Vec<u64> = (0..b.num_words())
                .map(|_| match next() % 4 {
                    0 => 0,
                    1 => u64::MAX,
                    _ => next() & next(),
                })
                .collect();
            b.merge_words(&words).unwrap();
            let expected = dirty_pages(&b);
            let mut taken = vec![0; b.num_words()];
            assert_eq!(b.take_dirty_words(&mut taken), Ok(expected.len()));
            let kept: Vec<u64> = words
                .iter()
                .enumerate()
                .map(|(j, &w)| {
                    if j == b.num_words() - 1 && pages % 64 != 0 {
                        w & ((1 << (pages % 64)) - 1)
                    } else {
                        w
                    }
                })
                .collect();
            assert_eq!(taken, kept);
            assert_eq!(b.dirty_page_count(), 0);
            b.restore(&taken).unwrap();
            let mut reference: Vec<(usize, usize)> = Vec::new();
            for &p in &expected {
                match reference.last_mut() {
                    Some((first, count)) if *first + *count == p => *count += 1,
                    _ => reference.push((p, 1)),
                }
            }
            assert_eq!(runs(&b), reference, "pages={pages} words={words:x?}");
            assert_eq!(b.dirty_page_count(), 0);
        }
    }
}

#[test]
fn take_words_clears_and_restore_puts_back() {
    let b = bitmap(200);
    b.mark_pages(1, 1);
    b.mark_pages(100, 50);
    let mut taken = [0; 4];
    assert_eq!(b.take_dirty_words(&mut taken), Ok(51));
    assert_eq!(b.dirty_page_count(), 0);
    assert_eq!(b.take_dirty_words(&mut [0; 4]), Ok(0));
    b.mark_pages(2, 1); // a write after the take
    b.restore(&taken).unwrap();
    assert_eq!(dirty_pages(&b), [1, 2].into_iter().chain(100..150).collect::<Vec<_>>());
    let mut again = [0; 4];
    assert_eq!(b.take_dirty_words(&mut again), Ok(52));
    assert_eq!(again, [taken[0] | 0b100, taken[1], taken[2], taken[3]]);
}

#[test]
fn merge_ors_and_masks_past_the_last_page() {
    let b = bitmap(100); // word 1 holds pages 64..100: 36 bits
    b.mark_pages(0, 1);
    b.merge_words(&[0b110]).unwrap(); // shorter: the first word only
    assert_eq!(dirty_pages(&b), [0, 1, 2]);
    b.merge_words(&[0, u64::MAX]).unwrap();
    assert_eq!(b.dirty_page_count(), 3 + 36);
    let mut words = [0; 2];
    b.take_dirty_words(&mut words).unwrap();
    assert_eq!(words, [0b111, (1 << 36) - 1]);
    b.restore(&[0, u64::MAX]).unwrap();
    assert_eq!(b.dirty_page_count(), 36);
    assert!(!b.is_page_dirty(100));
    // Whole last word: nothing to mask.
    let b = bitmap(128);
    b.merge_words(&[0, u64::MAX]).unwrap();
    assert_eq!(b.dirty_page_count(), 64);
}

#[test]
fn is_page_dirty_dirty_at_and_reset() {
    let b = AtomicBitmap::new(1 << 20, 1 << 16).unwrap(); // 16 pages of 64 KiB
    b.mark_dirty(0x2_0000 + 5, 1);
    assert!(b.is_page_dirty(2) && b.dirty_at(0x2_0000) && b.dirty_at(0x2_ffff));
    assert!(!b.is_page_dirty(1) && !b.dirty_at(0x3_0000) && !b.is_page_dirty(usize::MAX));
    b.mark_pages(0, 16);
    assert_eq!(b.dirty_page_count(), 16);
    b.reset();
    assert_eq!(b.dirty_page_count(), 0);
    assert!(runs(&b).is_empty());
}

#[test]
fn option_bitmaps() {
    let on: Option<AtomicBitmap> = NewBitmap::with_len(16 * PAGE);
    let slice = on.slice_at(PAGE);
    slice.mark_dirty(PAGE, 1);
    assert!(on.dirty_at(2 * PAGE) && slice.dirty_at(PAGE) && slice.slice_at(PAGE).dirty_at(0));
    on.mark_dirty(0, 1);
    assert_eq!(DirtyHarvest::dirty_page_count(&on), Ok(2));
    let mut words = [0; 1];
    assert_eq!(DirtyHarvest::take_dirty_words(&on, &mut words), Ok(2));
    assert_eq!(words, [0b101]);
    DirtyHarvest::restore(&on, &words).unwrap();
    DirtyHarvest::merge_words(&on, &[0b10]).unwrap();
    let mut got = Vec::new();
    assert_eq!(DirtyHarvest::take_dirty_runs(&on, |f, n| got.push((f, n))), Ok(3));
    assert_eq!(got, [(0, 3)]);

    let off: Option<AtomicBitmap> = None;
    off.mark_dirty(0, usize::MAX);
    off.slice_at(0).mark_dirty(0, 1);
    assert!(!off.dirty_at(0) && !off.slice_at(0).dirty_at(0) && off.slice_at(5).is_none());
    let e = Err(BitmapError::NotTracking);
    assert_eq!(DirtyHarvest::page_size(&off), e);
    assert_eq!(DirtyHarvest::num_pages(&off), e);
    assert_eq!(DirtyHarvest::num_words(&off), e);
    assert_eq!(DirtyHarvest::dirty_page_count(&off), e);
    assert_eq!(DirtyHarvest::take_dirty_words(&off, &mut words), e);
    assert_eq!(DirtyHarvest::take_dirty_runs(&off, |_, _| panic!("no runs")), e);
    assert_eq!(DirtyHarvest::merge_words(&off, &[1]), Err(BitmapError::NotTracking));
    assert_eq!(DirtyHarvest::restore(&off, &[1]), Err(BitmapError::NotTracking));
}

#[test]
fn volatile_writes_mark_the_bitmap() {
    use crate::{Bytes, VolatileSlice};
    let mut ram = vec![0u8; 64 * PAGE];
    let b = AtomicBitmap::new(ram.len(), PAGE).unwrap();
    // SAFETY: `ram` is borrowed mutably for as long as `mem` lives.
    let mem = unsafe { VolatileSlice::with_bitmap(ram.as_mut_ptr(), ram.len(), b.slice_at(0), true) };
    mem.write_obj(1u64, 3 * PAGE - 4).unwrap();
    let sub = mem.subslice(10 * PAGE, 4 * PAGE).unwrap();
    sub.write_slice(&[1; 10], PAGE + 1).unwrap();
    sub.read_obj::<u64>(3 * PAGE).unwrap(); // reads mark nothing
    assert_eq!(runs(&b), [(2, 2), (11, 1)]);
}

#[test]
fn reset_pages_and_ranges() {
    for pages in [1usize, 63, 64, 65, 200] {
        let b = bitmap(pages);
        for (first, count) in [(0, 1), (3, 70), (63, 2), (pages - 1, 5), (pages, 1), (0, usize::MAX)] {
            b.mark_pages(0, pages);
            b.reset_pages(first, count);
            let want: Vec<usize> = (0..pages).filter(|&p| p < first || p - first >= count).collect();
            assert_eq!(dirty_pages(&b), want, "{pages} pages, reset {first}+{count}");
        }
        b.mark_pages(0, pages);
        b.reset_pages(1, 0);
        assert_eq!(b.dirty_page_count(), pages);
    }
    // Byte ranges clear only the pages they cover wholly.
    let b = AtomicBitmap::new(130 * PAGE + 100, PAGE).unwrap(); // 131 pages, the last partial
    let whole = |offset: usize, len: usize| -> Vec<usize> {
        let end = (offset + len).min(b.byte_len());
        (0..b.num_pages())
            .filter(|&p| !(p * PAGE >= offset && ((p + 1) * PAGE <= end || end == b.byte_len())))
            .collect()
    };
    for (offset, len) in [
        (0, PAGE),
        (1, PAGE),
        (PAGE - 1, 2 * PAGE + 1),
        (64 * PAGE, 64 * PAGE),
        (10 * PAGE, 120 * PAGE + 100),
        (130 * PAGE, 1),
        (130 * PAGE, 100),
        (0, usize::MAX),
        (usize::MAX, 5),
        (7, 0),
    ] {
        b.mark_pages(0, b.num_pages());
        b.reset_addr_range(offset, len);
        let want: Vec<usize> = if len == 0 || offset >= b.byte_len() {
            (0..b.num_pages()).collect()
        } else {
            whole(offset, len)
        };
        assert_eq!(dirty_pages(&b), want, "reset {offset:#x}+{len:#x}");
    }
}

#[test]
fn enlarge_keeps_bits_and_refuses_shared_words() {
    let mut b = bitmap(10);
    b.mark_pages(9, 1);
    b.enlarge(0).unwrap();
    assert_eq!((b.byte_len(), b.num_pages()), (10 * PAGE, 10));
    b.enlarge(PAGE / 2).unwrap(); // a partial page: 11 pages, one word still
    assert_eq!((b.num_pages(), b.num_words()), (11, 1));
    b.mark_pages(10, 5); // clipped to page 10
    b.enlarge(200 * PAGE).unwrap();
    assert_eq!((b.num_pages(), b.num_words()), (211, 4));
    assert_eq!(dirty_pages(&b), vec![9, 10]);
    b.mark_pages(210, 1);
    assert_eq!(runs(&b), vec![(9, 2), (210, 1)]);
    // Sharing words: refused, unchanged.
    let w = b.window(64 * PAGE, 64 * PAGE).unwrap();
    let e = b.enlarge(PAGE).unwrap_err();
    assert_eq!(e, BitmapError::SharedWords { sharers: 1 });
    assert_eq!(
        e.to_string(),
        "the bitmap shares its words with 1 other bitmaps (windows): it cannot be enlarged"
    );
    let mut w2 = b.window(128 * PAGE, 64 * PAGE).unwrap();
    assert_eq!(w2.enlarge(PAGE), Err(BitmapError::SharedWords { sharers: 2 }));
    assert_eq!(b.num_pages(), 211);
    drop((w, b));
    // A window on its own grows away from the words it no longer shares.
    w2.mark_pages(0, 1);
    w2.enlarge(PAGE).unwrap();
    assert_eq!((w2.num_pages(), dirty_pages(&w2)), (65, vec![0]));
    // A size past usize::MAX.
    let e = w2.enlarge(usize::MAX).unwrap_err();
    assert!(matches!(e, BitmapError::OutOfMemory { .. }));
    assert_eq!(w2.num_pages(), 65);
    let mut empty = AtomicBitmap::new(0, PAGE).unwrap();
    empty.enlarge(1).unwrap();
    empty.mark_dirty(0, 1);
    assert_eq!(empty.dirty_page_count(), 1);
}

#[test]
fn clone_is_a_deep_copy() {
    let b = bitmap(130);
    b.mark_pages(3, 70);
    let c = b.clone();
    assert_eq!((c.byte_len(), c.num_pages(), c.page_size()), (b.byte_len(), 130, PAGE));
    assert_eq!(dirty_pages(&c), dirty_pages(&b));
    c.mark_pages(120, 1);
    b.reset();
    assert_eq!(dirty_pages(&b), Vec::<usize>::new());
    assert_eq!(c.dirty_page_count(), 71);
    // A window's copy is the window's bits alone, sharing nothing.
    b.mark_pages(64, 2);
    let w = b.window(64 * PAGE, 64 * PAGE).unwrap();
    let mut wc = w.try_clone().unwrap();
    assert_eq!(dirty_pages(&wc), vec![0, 1]);
    assert_eq!(runs(&b), vec![(64, 2)]);
    assert_eq!(wc.dirty_page_count(), 2);
    wc.enlarge(PAGE).unwrap(); // its words are its own
}

/// Windows share the words of their bitmap (and of each other): marks, harvests, merges and
/// restores through any of them are the same bits, and no window reaches past its own words.
/// (Pointer arithmetic on a shared allocation: Miri runs this.)
#[test]
fn windows_share_words_and_stay_in_bounds() {
    let page = 4096;
    let whole = AtomicBitmap::new(512 * page, page).unwrap();
    let a = whole.window(0, 128 * page).unwrap();
    let b = whole.window(128 * page, 384 * page).unwrap();
    let bb = b.window(64 * page, 64 * page).unwrap();
    assert_eq!((a.num_words(), b.num_words(), bb.num_words()), (2, 6, 1));
    a.mark_pages(127, 10); // clipped at a's end: page 127 only
    b.mark_dirty(64 * page + 5, 1); // page 192 of the whole
    assert!(whole.is_page_dirty(127) && !whole.is_page_dirty(128));
    assert!(bb.is_page_dirty(0) && whole.is_page_dirty(192));
    let mut words = [0u64; 1];
    assert_eq!(bb.take_dirty_words(&mut words).unwrap(), 1);
    assert_eq!(words, [1]);
    assert!(!whole.is_page_dirty(192));
    bb.restore(&[1 << 3]).unwrap();
    assert!(b.is_page_dirty(67) && whole.is_page_dirty(195));
    assert_eq!(whole.take_dirty_runs(|_, _| {}), 2);
    assert_eq!(a.dirty_page_count() + b.dirty_page_count(), 0);
    // A window ending at the bitmap's end may end mid-word; one ending elsewhere may not.
    let tail = AtomicBitmap::new(100 * page, page).unwrap();
    assert!(tail.window(64 * page, 36 * page).is_ok());
    assert!(matches!(tail.window(0, 70 * page), Err(BitmapError::InvalidWindow { .. })));
    assert!(tail.window(64 * page, 37 * page).is_err());
    assert!(tail.window(usize::MAX, 2).is_err());
    // The words live as long as any window: the bitmap may go first.
    drop(whole);
    drop(a);
    bb.mark_pages(63, 1);
    assert_eq!(b.take_dirty_runs(|_, _| {}), 1);
    // An empty bitmap has an empty window.
    let empty = AtomicBitmap::new(0, page).unwrap();
    assert_eq!(empty.window(0, 0).unwrap().num_words(), 0);
}
