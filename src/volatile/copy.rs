//! The copy engine: every byte that moves between guest memory and anywhere else goes through
//! one of these functions.
//!
//! - A value of 1, 2, 4 or 8 bytes at an address aligned to its size moves as one volatile
//!   access of that width: a concurrent writer sees it whole or not at all.
//! - Everything else moves with `memcpy`/`memmove` (through `ptr::copy*`), which is what the
//!   hardware is fastest at. Guest memory is never turned into a Rust reference.

use std::mem::{size_of, MaybeUninit};
use std::ptr;

use crate::pod::ByteValued;

/// Whether `addr` is a multiple of `align` (a power of two).
#[inline(always)]
pub(crate) fn is_aligned(addr: usize, align: usize) -> bool {
    addr & (align - 1) == 0
}

/// Reads a `T` from `src`.
///
/// # Safety
/// `[src, src + size_of::<T>())` must be valid for reads.
#[inline(always)]
pub(crate) unsafe fn load_obj<T: ByteValued>(src: *const u8) -> T {
    let size = size_of::<T>();
    let addr = src as usize;
    // SAFETY: each arm reads `size` bytes, as the caller allows; the width-specific arms
    // checked alignment for their type. Reinterpreting the integer as `T` with `transmute_copy`
    // is sound because the sizes match and `T: FromBytes` accepts any bytes.
    unsafe {
        match size {
            1 => std::mem::transmute_copy(&ptr::read_volatile(src)),
            2 if is_aligned(addr, 2) => std::mem::transmute_copy(&ptr::read_volatile(src.cast::<u16>())),
            4 if is_aligned(addr, 4) => std::mem::transmute_copy(&ptr::read_volatile(src.cast::<u32>())),
            8 if is_aligned(addr, 8) => std::mem::transmute_copy(&ptr::read_volatile(src.cast::<u64>())),
            _ => {
                let mut out = MaybeUninit::<T>::uninit();
                ptr::copy_nonoverlapping(src, out.as_mut_ptr().cast::<u8>(), size);
                out.assume_init()
            }
        }
    }
}

/// Writes `val` to `dst`.
///
/// # Safety
/// `[dst, dst + size_of::<T>())` must be valid for writes.
#[inline(always)]
pub(crate) unsafe fn store_obj<T: ByteValued>(val: T, dst: *mut u8) {
    let size = size_of::<T>();
    let addr = dst as usize;
    // SAFETY: each arm writes `size` bytes, as the caller allows; the width-specific arms
    // checked alignment for their type. Reading `val` as an integer of its own size is sound:
    // `T: IntoBytes` has no padding, so every byte is initialized.
    unsafe {
        match size {
            1 => ptr::write_volatile(dst, std::mem::transmute_copy::<T, u8>(&val)),
            2 if is_aligned(addr, 2) => {
                ptr::write_volatile(dst.cast::<u16>(), std::mem::transmute_copy(&val))
            }
            4 if is_aligned(addr, 4) => {
                ptr::write_volatile(dst.cast::<u32>(), std::mem::transmute_copy(&val))
            }
            8 if is_aligned(addr, 8) => {
                ptr::write_volatile(dst.cast::<u64>(), std::mem::transmute_copy(&val))
            }
            _ => ptr::copy_nonoverlapping((&val as *const T).cast::<u8>(), dst, size),
        }
    }
}

/// Copies `len` bytes between buffers that do not overlap.
///
/// Aligned 1, 2, 4 and 8-byte copies are one access of that width; the rest is `memcpy`.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes; they must not overlap.
#[inline(always)]
pub(crate) unsafe fn copy_nonoverlapping(src: *const u8, dst: *mut u8, len: usize) {
    let both = src as usize | dst as usize;
    // SAFETY: the caller guarantees both ranges; each arm touches exactly `len` bytes, and the
    // width-specific arms checked that both pointers are aligned for their type.
    unsafe {
        match len {
            1 => ptr::write_volatile(dst, ptr::read_volatile(src)),
            2 if is_aligned(both, 2) => {
                ptr::write_volatile(dst.cast::<u16>(), ptr::read_volatile(src.cast::<u16>()))
            }
            4 if is_aligned(both, 4) => {
                ptr::write_volatile(dst.cast::<u32>(), ptr::read_volatile(src.cast::<u32>()))
            }
            8 if is_aligned(both, 8) => {
                ptr::write_volatile(dst.cast::<u64>(), ptr::read_volatile(src.cast::<u64>()))
            }
            _ => ptr::copy_nonoverlapping(src, dst, len),
        }
    }
}

/// Copies `len` bytes between buffers that may overlap (guest memory to guest memory).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes.
#[inline(always)]
pub(crate) unsafe fn copy_overlapping(src: *const u8, dst: *mut u8, len: usize) {
    let both = src as usize | dst as usize;
    // SAFETY: as for `copy_nonoverlapping`; a single load before the store, or memmove,
    // handles overlap.
    unsafe {
        match len {
            1 | 2 | 4 | 8 if is_aligned(both, len) => copy_nonoverlapping(src, dst, len),
            _ => ptr::copy(src, dst, len),
        }
    }
}

/// Fills `len` bytes at `dst` with `value`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
#[inline(always)]
pub(crate) unsafe fn fill(dst: *mut u8, value: u8, len: usize) {
    // SAFETY: the caller guarantees the range.
    unsafe { ptr::write_bytes(dst, value, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obj_round_trip_every_width_and_alignment() {
        let mut buf = [0u8; 32];
        for off in 0..8 {
            let p = buf.as_mut_ptr().wrapping_add(off);
            // SAFETY: p..p+16 lies inside `buf` for off < 16.
            unsafe {
                store_obj(0xABu8, p);
                assert_eq!(load_obj::<u8>(p), 0xAB);
                store_obj(0xBEEFu16, p);
                assert_eq!(load_obj::<u16>(p), 0xBEEF);
                store_obj(0xDEAD_BEEFu32, p);
                assert_eq!(load_obj::<u32>(p), 0xDEAD_BEEF);
                store_obj(0x0123_4567_89AB_CDEFu64, p);
                assert_eq!(load_obj::<u64>(p), 0x0123_4567_89AB_CDEF);
                store_obj([1u8, 2, 3], p);
                assert_eq!(load_obj::<[u8; 3]>(p), [1, 2, 3]);
                store_obj(u128::MAX - 5, p);
                assert_eq!(load_obj::<u128>(p), u128::MAX - 5);
                store_obj((), p);
                load_obj::<()>(p);
            }
        }
    }

    #[test]
    fn copies_every_length_and_overlap() {
        for len in 0..40 {
            for off in 0..8 {
                let src: Vec<u8> = (0..64u8).collect();
                let mut dst = vec![0u8; 64];
                // SAFETY: both ranges lie inside their vectors and do not overlap.
                unsafe { copy_nonoverlapping(src.as_ptr().add(off), dst.as_mut_ptr().add(8 - off % 8), len) };
                assert_eq!(&dst[8 - off % 8..8 - off % 8 + len], &src[off..off + len]);

                let mut both: Vec<u8> = (0..64u8).collect();
                let p = both.as_mut_ptr();
                // SAFETY: both ranges lie inside `both`; overlap is allowed here.
                unsafe { copy_overlapping(p.add(off), p.add(off + 1), len) };
                let expect: Vec<u8> = (off as u8..(off + len) as u8).collect();
                assert_eq!(&both[off + 1..off + 1 + len], &expect[..]);
            }
        }
        let mut z = [1u8; 10];
        // SAFETY: within `z`.
        unsafe { fill(z.as_mut_ptr().add(2), 0, 5) };
        assert_eq!(z, [1, 1, 0, 0, 0, 0, 0, 1, 1, 1]);
    }
}
