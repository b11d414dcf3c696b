//! [`Checksum`]: a fast checksum of memory contents, for snapshot files and migration streams.
//!
//! A Fletcher-style pair of 64-bit sums over little-endian 64-bit words: `a += word; b += a`,
//! finished with the length. It runs at memory speed, is sensitive to the order of words, and
//! folds a run of zero bytes in O(1) ([`zeros`](Checksum::zeros)), so a sparse dump that skips
//! zero pages still computes the checksum of the full contents. It detects corruption (torn,
//! lost, reordered or flipped data); it is not a cryptographic hash.
//!
//! ```
//! use guestmem::checksum::Checksum;
//! let mut a = Checksum::new();
//! a.update(&[1, 2, 3, 4, 5, 6, 7, 8]);
//! a.zeros(4096);
//! let mut b = Checksum::new();
//! b.update(&[1, 2, 3, 4, 5, 6, 7, 8]);
//! b.update(&[0; 4096]);
//! assert_eq!(a.finish(), b.finish());
//! ```

use crate::bitmap::BitmapSlice;
use crate::volatile::VolatileSlice;

/// A running checksum. Feed bytes in order with [`update`](Self::update),
/// [`update_volatile`](Self::update_volatile) and [`zeros`](Self::zeros), in any split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checksum {
    a: u64,
    b: u64,
    len: u64,
    /// Bytes of a word not yet complete, little-endian, and how many.
    partial: u64,
    partial_len: u32,
}

impl Checksum {
    /// An empty checksum.
    pub fn new() -> Self {
        Self::default()
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        self.a = self.a.wrapping_add(w);
        self.b = self.b.wrapping_add(self.a);
    }

    #[inline]
    fn byte(&mut self, byte: u8) {
        self.partial |= u64::from(byte) << (8 * self.partial_len);
        self.partial_len += 1;
        if self.partial_len == 8 {
            let w = self.partial;
            self.word(w);
            self.partial = 0;
            self.partial_len = 0;
        }
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        let mut rest = bytes;
        while self.partial_len != 0 && !rest.is_empty() {
            self.byte(rest[0]);
            rest = &rest[1..];
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            let mut le = [0u8; 8];
            le.copy_from_slice(w);
            self.word(u64::from_le_bytes(le));
        }
        for &byte in words.remainder() {
            self.byte(byte);
        }
    }

    /// Adds `count` zero bytes in O(1) (after at most 7 single bytes to finish a word).
    pub fn zeros(&mut self, count: u64) {
        let mut count = count;
        while self.partial_len != 0 && count > 0 {
            self.len = self.len.wrapping_add(1);
            self.byte(0);
            count -= 1;
        }
        let words = count / 8;
        // `words` zero words: a stays, b gains a once per word.
        self.b = self.b.wrapping_add(self.a.wrapping_mul(words));
        self.len = self.len.wrapping_add(words * 8);
        for _ in 0..count % 8 {
            self.len = self.len.wrapping_add(1);
            self.byte(0);
        }
    }

    /// Adds the bytes of guest memory in `slice`, read with volatile word loads (no copy, no
    /// reference to guest memory). A concurrent writer makes the result meaningless, as it
    /// would for any copy of the bytes.
    pub fn update_volatile<S: BitmapSlice>(&mut self, slice: &VolatileSlice<'_, S>) {
        let len = slice.len();
        let base = slice.as_ptr();
        let mut done = 0;
        // Single bytes until a word is complete and the host address is 8-byte aligned.
        while done < len && (self.partial_len != 0 || !(base as usize + done).is_multiple_of(8)) {
            // SAFETY: `done < len`: the byte lies in the slice, valid for reads.
            let byte = unsafe { base.add(done).read_volatile() };
            self.len = self.len.wrapping_add(1);
            self.byte(byte);
            done += 1;
        }
        while done + 8 <= len {
            // SAFETY: 8 bytes at an 8-byte aligned address inside the slice.
            let w = unsafe { base.add(done).cast::<u64>().read_volatile() };
            self.word(u64::from_le(w));
            self.len = self.len.wrapping_add(8);
            done += 8;
        }
        while done < len {
            // SAFETY: `done < len`.
            let byte = unsafe { base.add(done).read_volatile() };
            self.len = self.len.wrapping_add(1);
            self.byte(byte);
            done += 1;
        }
    }

    /// The checksum of everything added (more can still be added afterwards).
    pub fn finish(&self) -> u64 {
        let mut c = *self;
        // Pad the last partial word with zeros, then mix in the length so that trailing zeros
        // change the result.
        if c.partial_len != 0 {
            let w = c.partial;
            c.word(w);
        }
        let mut h = c.a ^ c.b.rotate_left(29) ^ c.len.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut c = Self::new();
        c.update(bytes);
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn any_split_gives_the_same_checksum() {
        let data = bytes(1000, 7);
        let whole = Checksum::of(&data);
        for split in [0, 1, 7, 8, 9, 63, 500, 999, 1000] {
            let mut c = Checksum::new();
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.finish(), whole, "split at {split}");
        }
        let mut c = Checksum::new();
        for b in &data {
            c.update(std::slice::from_ref(b));
        }
        assert_eq!(c.finish(), whole);
    }

    #[test]
    fn zeros_fold_like_zero_bytes() {
        for (head, zeros, tail) in [(0, 0, 0), (3, 4096, 5), (8, 13, 0), (0, 9, 3), (17, 1, 1)] {
            let mut a = Checksum::new();
            a.update(&bytes(head, 1));
            a.zeros(zeros as u64);
            a.update(&bytes(tail, 2));
            let mut all = bytes(head, 1);
            all.extend(vec![0; zeros]);
            all.extend(bytes(tail, 2));
            assert_eq!(a.finish(), Checksum::of(&all), "{head} {zeros} {tail}");
        }
    }

    #[test]
    fn volatile_matches_bytes_at_every_alignment() {
        let mut data = bytes(300, 3);
        let expect: Vec<u64> = (0..16).map(|o| Checksum::of(&data[o..o + 200])).collect();
        let s = VolatileSlice::from(&mut data[..]);
        for (o, e) in expect.iter().enumerate() {
            for pre in [0usize, 3] {
                let mut c = Checksum::new();
                let head = s.subslice(o, pre).unwrap();
                let rest = s.subslice(o + pre, 200 - pre).unwrap();
                c.update_volatile(&head);
                c.update_volatile(&rest);
                assert_eq!(c.finish(), *e, "offset {o} pre {pre}");
            }
        }
    }

    #[test]
    fn detects_changes() {
        let data = bytes(4096, 9);
        let base = Checksum::of(&data);
        // A flipped bit anywhere, swapped words, a trailing zero: all change the result.
        for i in [0, 1, 8, 100, 4095] {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_ne!(Checksum::of(&d), base);
        }
        let mut d = data.clone();
        d.swap(0, 8);
        assert_ne!(Checksum::of(&d), base);
        let mut d = data.clone();
        d.push(0);
        assert_ne!(Checksum::of(&d), base);
        assert_ne!(Checksum::of(&[]), Checksum::of(&[0]));
        assert_ne!(Checksum::of(&[0; 8]), Checksum::of(&[0; 16]));
    }
}
