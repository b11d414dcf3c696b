//! The stream's page hash: a 32-bit digest of one 4 KiB page, and the zero-page test.
//!
//! Both run on a page right before the kernel copies it onto the stream (or right after it
//! copied it off), while it is in cache, so they must cost little next to that copy: the hash
//! is a Fletcher-style pair of sums on 16 interleaved 64-bit lanes (lane `l` adds the words at
//! `l, l + 16, l + 32, ...`: `a += word; b += a`), which SIMD units compute 4 lanes (AVX2) or 2
//! lanes (SSE2) at a time, finished by a keyed multiply per lane and a 64-bit avalanche. It
//! detects what a migration must not miss: a page that differs from the one sent (stale,
//! misplaced, torn, lost), and transport corruption. It is not a cryptographic hash.
//!
//! Every implementation (AVX2, SSE2, the portable one) gives the same value for the same
//! bytes, so both ends of a stream agree whatever their CPUs.
//!
//! The pages are guest memory: they are read with plain loads through raw pointers, never
//! through a reference, exactly like the copy engine reads them. A concurrent writer makes the
//! result describe no single moment of the page; the migration protocol handles that (a page
//! written while it was sent is dirty again and sent again).

/// Bytes in a page of the stream.
pub(crate) const PAGE: usize = 4096;

/// Interleaved 64-bit lanes: lane `l` sums the words `l, l + 16, l + 32, ...` of the page.
const LANES: usize = 16;

/// The sums of a lane.
const SUMS: usize = 4;

/// SplitMix64, for the keys.
const fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One key per sum: `KEYS[s * 16 + l]` for sum `s` (`a`, `b`, `ha`, `hb`) of lane `l`.
const KEYS: [u64; SUMS * LANES] = {
    let mut k = [0u64; SUMS * LANES];
    let mut i = 0;
    while i < k.len() {
        k[i] = splitmix(0x6775_6573_746d_656d ^ i as u64);
        i += 1;
    }
    k
};

/// A keyed, non-linear mix of one sum: `lo32(x) * hi32(x) + x` for `x = sum ^ key` (what
/// `_mm_mul_epu32` computes, 2 or 4 sums at a time).
#[inline(always)]
fn mix(sum: u64, key: u64) -> u64 {
    let x = sum ^ key;
    (x & 0xffff_ffff).wrapping_mul(x >> 32).wrapping_add(x)
}

/// The 32-bit digest from the sum of the mixes (MurmurHash3's 64-bit finalizer).
#[inline(always)]
fn finish(sum: u64) -> u32 {
    let mut h = sum;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h ^ (h >> 32)) as u32
}

/// The digest of a page's sums, `sums[s][l]` for sum `s` of lane `l`.
///
/// The page is 512 little-endian words `w[n]`; lane `l = n % 16` takes its 32 words in order
/// and keeps four sums: `a += w; b += a` (wrapping) and `ha += w >> 32; hb += ha` (the high
/// halves, which never wrap: below 2^42). `b` weighs each word by its position, so the sums
/// catch every change of one or two bits in a lane; where two top-bit changes cancel in
/// wrapping arithmetic (`2^63 * even = 0`), the exact high-half sums still see them. Each sum
/// is then mixed with its own key (changes in different lanes do not cancel), and the mixes
/// are added up and avalanched.
fn digest(sums: &[[u64; LANES]; SUMS]) -> u32 {
    let mut total = 0u64;
    for (s, lanes) in sums.iter().enumerate() {
        for (l, &sum) in lanes.iter().enumerate() {
            total = total.wrapping_add(mix(sum, KEYS[s * LANES + l]));
        }
    }
    finish(total)
}

/// The hash of a page of zeros: what a zero-range frame stands for.
pub(crate) fn zero_page_hash() -> u32 {
    digest(&[[0; LANES]; SUMS])
}

/// The hash of the 4096 bytes at `page`.
///
/// # Safety
/// `[page, page + 4096)` must be valid for reads for the duration of the call (it may be
/// written concurrently: the result then describes no single moment).
#[inline]
pub(crate) unsafe fn hash_page(page: *const u8) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX-512F and AVX2 (checked); the caller guarantees the page
            // is readable.
            return unsafe { x86::hash_avx512(page) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked); the caller guarantees the page is readable.
            return unsafe { x86::hash_avx2(page) };
        }
        // SAFETY: SSE2 is part of x86-64; the caller guarantees the page is readable.
        unsafe { x86::hash_sse2(page) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller guarantees the page is readable.
    unsafe {
        hash_portable(page)
    }
}

/// Whether the 4096 bytes at `page` are all zero (stops at the first non-zero 128 bytes).
///
/// # Safety
/// As for [`hash_page`].
#[inline]
pub(crate) unsafe fn is_zero_page(page: *const u8) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked); the caller guarantees the page is readable.
            return unsafe { x86::zero_avx2(page) };
        }
        // SAFETY: SSE2 is part of x86-64; the caller guarantees the page is readable.
        unsafe { x86::zero_sse2(page) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller guarantees the page is readable.
    unsafe {
        zero_portable(page)
    }
}

/// The reference implementation, one word at a time (and what non-x86 targets use).
///
/// # Safety
/// As for [`hash_page`].
#[cfg(any(test, not(target_arch = "x86_64")))]
pub(crate) unsafe fn hash_portable(page: *const u8) -> u32 {
    let mut sums = [[0u64; LANES]; SUMS];
    for n in 0..PAGE / 8 {
        // SAFETY: word `n` < 512 lies in the page, readable by the contract; `read_unaligned`
        // makes no assumption on the page's alignment.
        let w = u64::from_le(unsafe { page.add(n * 8).cast::<u64>().read_unaligned() });
        let l = n % LANES;
        sums[0][l] = sums[0][l].wrapping_add(w);
        sums[1][l] = sums[1][l].wrapping_add(sums[0][l]);
        sums[2][l] += w >> 32;
        sums[3][l] += sums[2][l];
    }
    digest(&sums)
}

/// The reference zero test.
///
/// # Safety
/// As for [`hash_page`].
#[cfg(any(test, not(target_arch = "x86_64")))]
pub(crate) unsafe fn zero_portable(page: *const u8) -> bool {
    (0..PAGE / 8).all(|i| {
        // SAFETY: word `i` < 512 lies in the page, readable by the contract.
        unsafe { page.add(i * 8).cast::<u64>().read_unaligned() == 0 }
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD forms. A 128-byte stripe of the page is 16 words, word `k` of the stripe in
    //! lane `k`: AVX2 holds lanes `4v..4v + 4` in vector `v` (4 per stripe), SSE2 lanes `2v,
    //! 2v + 1` (8 per stripe). The four sums of every lane would not fit in the 16 vector
    //! registers at once, so the page is read in passes, two vectors of each stripe a pass
    //! (AVX2: lanes `8p..8p + 8` in pass `p`; SSE2: lanes `4p..4p + 4`). After the first pass
    //! the page is in L1.

    use std::arch::x86_64::*;

    use super::{finish, KEYS, LANES, PAGE};

    /// `mix` of 4 sums: `lo32(x) * hi32(x) + x` for `x = v ^ key`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mix256(v: __m256i, key: __m256i) -> __m256i {
        let x = _mm256_xor_si256(v, key);
        _mm256_add_epi64(_mm256_mul_epu32(x, _mm256_srli_epi64::<32>(x)), x)
    }

    /// `mix` of 2 sums.
    #[target_feature(enable = "sse2")]
    #[inline]
    fn mix128(v: __m128i, key: __m128i) -> __m128i {
        let x = _mm_xor_si128(v, key);
        _mm_add_epi64(_mm_mul_epu32(x, _mm_srli_epi64::<32>(x)), x)
    }

    /// The AVX-512 form, in assembly (the AVX-512 intrinsics need a newer Rust than the
    /// crate's minimum). A 128-byte stripe is two 512-bit vectors, lanes 0-7 and 8-15, so the
    /// four sums of every lane fit in eight registers and the page is read in one pass.
    /// Registers: `zmm0`/`zmm1` the `a` sums, `zmm2`/`zmm3` `b`, `zmm4`/`zmm5` `ha`,
    /// `zmm6`/`zmm7` `hb` (sum `k` of the lanes in `KEYS[8k..8k + 8]`), `zmm8`-`zmm11` the
    /// words and their high halves, `zmm12` the sum of the mixes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX2; `[page, page + 4096)` must be readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn hash_avx512(page: *const u8) -> u32 {
        let mut out = [0u64; 8];
        // SAFETY: the CPU has AVX-512F (the caller checked). The block reads the 4096 bytes of
        // the page (readable by the contract) and the 64 keys (`KEYS`, 512 bytes), writes the
        // 64 bytes of `out`, and uses only the registers it declares (ymm0-ymm12, of which it
        // clears the upper halves with `vzeroupper` before it ends), plus the pointer and the
        // counter it is given. It touches no stack and leaves the flags changed (not declared
        // preserved).
        unsafe {
            std::arch::asm!(
                "vpxorq zmm0, zmm0, zmm0",
                "vpxorq zmm1, zmm1, zmm1",
                "vpxorq zmm2, zmm2, zmm2",
                "vpxorq zmm3, zmm3, zmm3",
                "vpxorq zmm4, zmm4, zmm4",
                "vpxorq zmm5, zmm5, zmm5",
                "vpxorq zmm6, zmm6, zmm6",
                "vpxorq zmm7, zmm7, zmm7",
                "2:",
                "vmovdqu64 zmm8, [{p}]",
                "vmovdqu64 zmm9, [{p} + 64]",
                "vpaddq zmm0, zmm0, zmm8",
                "vpaddq zmm1, zmm1, zmm9",
                "vpaddq zmm2, zmm2, zmm0",
                "vpaddq zmm3, zmm3, zmm1",
                "vpsrlq zmm10, zmm8, 32",
                "vpsrlq zmm11, zmm9, 32",
                "vpaddq zmm4, zmm4, zmm10",
                "vpaddq zmm5, zmm5, zmm11",
                "vpaddq zmm6, zmm6, zmm4",
                "vpaddq zmm7, zmm7, zmm5",
                "add {p}, 128",
                "dec {n:e}",
                "jnz 2b",
                // The keyed mix of every sum: x = sum ^ key; total += lo32(x) * hi32(x) + x.
                "vpxorq zmm12, zmm12, zmm12",
                "vpxorq zmm8, zmm0, [{k}]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm1, [{k} + 64]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm2, [{k} + 128]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm3, [{k} + 192]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm4, [{k} + 256]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm5, [{k} + 320]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm6, [{k} + 384]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vpxorq zmm8, zmm7, [{k} + 448]",
                "vpsrlq zmm9, zmm8, 32",
                "vpmuludq zmm9, zmm9, zmm8",
                "vpaddq zmm12, zmm12, zmm9",
                "vpaddq zmm12, zmm12, zmm8",
                "vmovdqu64 [{o}], zmm12",
                "vzeroupper",
                p = inout(reg) page => _,
                n = inout(reg) PAGE / 128 => _,
                k = in(reg) KEYS.as_ptr(),
                o = in(reg) out.as_mut_ptr(),
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm12") _,
                options(nostack),
            );
        }
        finish(out.iter().fold(0u64, |s, &x| s.wrapping_add(x)))
    }

    /// # Safety
    /// The CPU must have AVX2; `[page, page + 4096)` must be readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn hash_avx2(page: *const u8) -> u32 {
        let zero = _mm256_setzero_si256();
        let p = page.cast::<__m256i>();
        let mut total = zero;
        for pass in 0..2 {
            // Lanes `8 * pass + 4 * i .. + 4` in the `i` sums.
            let (mut a0, mut b0, mut ha0, mut hb0) = (zero, zero, zero, zero);
            let (mut a1, mut b1, mut ha1, mut hb1) = (zero, zero, zero, zero);
            for stripe in 0..PAGE / 128 {
                let q = p.wrapping_add(4 * stripe + 2 * pass);
                // SAFETY: vectors `4 * stripe + 2 * pass (+ 1)` < 128 lie in the page
                // (readable by the contract); `loadu` has no alignment requirement.
                let (w0, w1) = unsafe { (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1))) };
                a0 = _mm256_add_epi64(a0, w0);
                a1 = _mm256_add_epi64(a1, w1);
                b0 = _mm256_add_epi64(b0, a0);
                b1 = _mm256_add_epi64(b1, a1);
                ha0 = _mm256_add_epi64(ha0, _mm256_srli_epi64::<32>(w0));
                ha1 = _mm256_add_epi64(ha1, _mm256_srli_epi64::<32>(w1));
                hb0 = _mm256_add_epi64(hb0, ha0);
                hb1 = _mm256_add_epi64(hb1, ha1);
            }
            // (No closure here: a closure would not inherit the AVX2 target feature.)
            for (i, sums) in [[a0, b0, ha0, hb0], [a1, b1, ha1, hb1]].into_iter().enumerate() {
                for (sum, v) in sums.into_iter().enumerate() {
                    // SAFETY: `sum < 4`, `8 * pass + 4 * i + 4 <= 16`: the 4 keys lie in
                    // `KEYS`; `loadu` has no alignment requirement.
                    let key = unsafe {
                        _mm256_loadu_si256(KEYS.as_ptr().add(sum * LANES + 8 * pass + 4 * i).cast())
                    };
                    total = _mm256_add_epi64(total, mix256(v, key));
                }
            }
            // Finish this pass's sums before the next pass starts: kept alive across it, they
            // would not leave the next pass enough registers.
            total = std::hint::black_box(total);
        }
        let mut out = [0u64; 4];
        // SAFETY: `out` holds 32 writable bytes; `storeu` has no alignment requirement.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), total) };
        finish(out.iter().fold(0u64, |s, &x| s.wrapping_add(x)))
    }

    /// # Safety
    /// `[page, page + 4096)` must be readable.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn hash_sse2(page: *const u8) -> u32 {
        let zero = _mm_setzero_si128();
        let p = page.cast::<__m128i>();
        let mut total = zero;
        for pass in 0..4 {
            // Lanes `4 * pass + 2 * i .. + 2` in the `i` sums.
            let (mut a0, mut b0, mut ha0, mut hb0) = (zero, zero, zero, zero);
            let (mut a1, mut b1, mut ha1, mut hb1) = (zero, zero, zero, zero);
            for stripe in 0..PAGE / 128 {
                let q = p.wrapping_add(8 * stripe + 2 * pass);
                // SAFETY: vectors `8 * stripe + 2 * pass (+ 1)` < 256 lie in the page
                // (readable by the contract); `loadu` has no alignment requirement.
                let (w0, w1) = unsafe { (_mm_loadu_si128(q), _mm_loadu_si128(q.add(1))) };
                a0 = _mm_add_epi64(a0, w0);
                a1 = _mm_add_epi64(a1, w1);
                b0 = _mm_add_epi64(b0, a0);
                b1 = _mm_add_epi64(b1, a1);
                ha0 = _mm_add_epi64(ha0, _mm_srli_epi64::<32>(w0));
                ha1 = _mm_add_epi64(ha1, _mm_srli_epi64::<32>(w1));
                hb0 = _mm_add_epi64(hb0, ha0);
                hb1 = _mm_add_epi64(hb1, ha1);
            }
            for (i, sums) in [[a0, b0, ha0, hb0], [a1, b1, ha1, hb1]].into_iter().enumerate() {
                for (sum, v) in sums.into_iter().enumerate() {
                    // SAFETY: `sum < 4`, `4 * pass + 2 * i + 2 <= 16`: the 2 keys lie in `KEYS`.
                    let key =
                        unsafe { _mm_loadu_si128(KEYS.as_ptr().add(sum * LANES + 4 * pass + 2 * i).cast()) };
                    total = _mm_add_epi64(total, mix128(v, key));
                }
            }
        }
        let mut out = [0u64; 2];
        // SAFETY: `out` holds 16 writable bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), total) };
        finish(out[0].wrapping_add(out[1]))
    }

    /// # Safety
    /// The CPU must have AVX2; `[page, page + 4096)` must be readable.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn zero_avx2(page: *const u8) -> bool {
        let p = page.cast::<__m256i>();
        for stripe in 0..PAGE / 128 {
            let q = p.wrapping_add(4 * stripe);
            // SAFETY: vectors `4 * stripe .. 4 * stripe + 4` < 128 lie in the readable page.
            let v = unsafe {
                let (w0, w1) = (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)));
                let (w2, w3) = (_mm256_loadu_si256(q.add(2)), _mm256_loadu_si256(q.add(3)));
                _mm256_or_si256(_mm256_or_si256(w0, w1), _mm256_or_si256(w2, w3))
            };
            if _mm256_testz_si256(v, v) == 0 {
                return false;
            }
        }
        true
    }

    /// # Safety
    /// `[page, page + 4096)` must be readable.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn zero_sse2(page: *const u8) -> bool {
        let p = page.cast::<__m128i>();
        for stripe in 0..PAGE / 128 {
            // SAFETY: vector `8 * stripe` < 256 lies in the readable page.
            let mut v = unsafe { _mm_loadu_si128(p.add(8 * stripe)) };
            for k in 1..8 {
                // SAFETY: vector `8 * stripe + k` < 256 lies in the readable page.
                v = _mm_or_si128(v, unsafe { _mm_loadu_si128(p.add(8 * stripe + k)) });
            }
            if _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_setzero_si128())) != 0xffff {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page with a pattern seeded by `seed`.
    fn page(seed: u64) -> Vec<u8> {
        (0..PAGE as u64).map(|i| (splitmix(seed ^ (i / 8)) >> (8 * (i % 8))) as u8).collect()
    }

    /// Every implementation, on the bytes at `p` (readable 4096 bytes).
    fn all_hashes(p: &[u8]) -> Vec<u32> {
        assert!(p.len() >= PAGE);
        // SAFETY: `p` holds at least 4096 readable bytes.
        unsafe {
            let mut v = vec![hash_portable(p.as_ptr()), hash_page(p.as_ptr())];
            #[cfg(target_arch = "x86_64")]
            {
                v.push(x86::hash_sse2(p.as_ptr()));
                if std::arch::is_x86_feature_detected!("avx2") {
                    v.push(x86::hash_avx2(p.as_ptr()));
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                {
                    v.push(x86::hash_avx512(p.as_ptr()));
                }
            }
            v
        }
    }

    fn all_zero(p: &[u8]) -> Vec<bool> {
        // SAFETY: as above.
        unsafe {
            let mut v = vec![zero_portable(p.as_ptr()), is_zero_page(p.as_ptr())];
            #[cfg(target_arch = "x86_64")]
            {
                v.push(x86::zero_sse2(p.as_ptr()));
                if std::arch::is_x86_feature_detected!("avx2") {
                    v.push(x86::zero_avx2(p.as_ptr()));
                }
            }
            v
        }
    }

    #[test]
    fn every_implementation_agrees_at_every_alignment() {
        let mut buf = page(1);
        buf.extend(page(2));
        for offset in [0, 1, 3, 8, 31, 64, 100, 4095] {
            let h = all_hashes(&buf[offset..]);
            assert!(h.iter().all(|&x| x == h[0]), "offset {offset}: {h:x?}");
        }
        let zeros = vec![0u8; PAGE + 7];
        for offset in [0, 7] {
            let h = all_hashes(&zeros[offset..]);
            assert!(h.iter().all(|&x| x == zero_page_hash()), "{h:x?}");
        }
    }

    #[test]
    fn the_zero_test_stops_at_any_non_zero_byte() {
        let mut p = vec![0u8; PAGE];
        assert!(all_zero(&p).iter().all(|&z| z));
        for i in [0, 1, 127, 128, 2048, 4094, 4095] {
            p[i] = 0x80;
            assert!(all_zero(&p).iter().all(|&z| !z), "byte {i}");
            p[i] = 0;
        }
    }

    #[test]
    fn detects_flips_swaps_and_stale_pages() {
        let base = page(7);
        let h = all_hashes(&base)[0];
        let mut seen = std::collections::BTreeSet::new();
        // Every single-bit flip in the first and last words of each lane, and the top bits of
        // two words of one lane (the pair a plain Fletcher sum misses).
        for byte in (0..128).chain(PAGE - 128..PAGE) {
            for bit in 0..8 {
                let mut p = base.clone();
                p[byte] ^= 1 << bit;
                let x = all_hashes(&p)[0];
                assert_ne!(x, h, "flip of bit {bit} of byte {byte}");
                seen.insert(x);
            }
        }
        // Every pair of words of one lane, with the same bit flipped in both (the pairs whose
        // changes cancel in wrapping sums for the top bits), on a zero page and a full one.
        for start in [vec![0u8; PAGE], base.clone()] {
            let h = all_hashes(&start)[0];
            for bit in [0, 1, 31, 32, 59, 60, 61, 62, 63] {
                for i in 0..32 {
                    for j in i + 1..32 {
                        let mut p = start.clone();
                        for n in [i, j] {
                            let at = n * 128 + bit / 8;
                            p[at] ^= 1 << (bit % 8);
                        }
                        // SAFETY: `p` holds a page.
                        let x = unsafe { hash_page(p.as_ptr()) };
                        assert_ne!(x, h, "bit {bit} of words {i} and {j} of lane 0");
                    }
                }
            }
        }
        // Swapped words (in one lane, and across lanes), swapped halves, another page.
        for (i, j) in [(0, 128), (0, 8), (0, 2048)] {
            let mut p = base.clone();
            for k in 0..8 {
                p.swap(i + k, j + k);
            }
            assert_ne!(all_hashes(&p)[0], h, "words at {i} and {j} swapped");
        }
        let mut p = base.clone();
        p.rotate_left(PAGE / 2);
        assert_ne!(all_hashes(&p)[0], h);
        assert_ne!(all_hashes(&page(8))[0], h);
        assert_ne!(h, zero_page_hash());
        // 2048 different flips gave (nearly) as many different hashes.
        assert!(seen.len() > 2040, "{}", seen.len());
    }
}
