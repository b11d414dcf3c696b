//! Plain-old-data values in guest memory: [`ByteValued`], endian types, the atomic value types,
//! and the [`Bytes`] trait of everything that reads and writes them at an address.
//!
//! A type is [`ByteValued`] when zerocopy proves it is: derive `FromBytes`, `IntoBytes` and
//! `Immutable` (and make it `Copy`) instead of writing an `unsafe impl`.
//!
//! ```
//! use guestmem::ByteValued;
//! use zerocopy::{FromBytes, Immutable, IntoBytes};
//!
//! #[derive(Clone, Copy, Debug, Default, PartialEq, FromBytes, IntoBytes, Immutable)]
//! #[repr(C)]
//! struct Descriptor {
//!     addr: u64,
//!     len: u32,
//!     flags: u16,
//!     next: u16,
//! }
//!
//! fn takes_byte_valued<T: ByteValued>(_: T) {}
//! takes_byte_valued(Descriptor::default());
//! ```

use std::sync::atomic::{
    AtomicI16, AtomicI32, AtomicI64, AtomicI8, AtomicIsize, AtomicU16, AtomicU32, AtomicU64, AtomicU8,
    AtomicUsize, Ordering,
};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::volatile::{ReadVolatile, WriteVolatile};

/// A type that any byte pattern is a valid value of, and whose every byte is initialized: it can
/// be copied in and out of guest memory as bytes.
///
/// Implemented for every `Copy` type that is zerocopy's `FromBytes + IntoBytes + Immutable`.
pub trait ByteValued: FromBytes + IntoBytes + Immutable + Copy {}

impl<T: FromBytes + IntoBytes + Immutable + Copy> ByteValued for T {}

/// A little-endian `u16` in guest memory (zerocopy's byteorder type).
pub type Le16 = zerocopy::little_endian::U16;
/// A little-endian `u32` in guest memory.
pub type Le32 = zerocopy::little_endian::U32;
/// A little-endian `u64` in guest memory.
pub type Le64 = zerocopy::little_endian::U64;
/// A big-endian `u16` in guest memory.
pub type Be16 = zerocopy::big_endian::U16;
/// A big-endian `u32` in guest memory.
pub type Be32 = zerocopy::big_endian::U32;
/// A big-endian `u64` in guest memory.
pub type Be64 = zerocopy::big_endian::U64;

/// The little-endian `u32` at byte `at` of a fixed-size header `b` (file and stream formats).
/// The caller guarantees `at + 4 <= b.len()`.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// The little-endian `u64` at byte `at` of a fixed-size header `b`; `at + 8 <= b.len()`.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Writes `v` little-endian at byte `at` of a fixed-size header `b`; `at + 4 <= b.len()`.
pub(crate) fn put_le_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at byte `at` of a fixed-size header `b`; `at + 8 <= b.len()`.
pub(crate) fn put_le_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// An atomic integer type of `std::sync::atomic` that can live in guest memory.
///
/// Guest memory is accessed through [`AtomicRef`](crate::AtomicRef), which marks writes dirty.
pub trait AtomicInteger: Sync + Send + std::fmt::Debug + 'static {
    /// The plain integer type.
    type V: AtomicAccess<A = Self>;

    /// `load`.
    fn load(&self, order: Ordering) -> Self::V;
    /// `store`.
    fn store(&self, val: Self::V, order: Ordering);
    /// `swap`.
    fn swap(&self, val: Self::V, order: Ordering) -> Self::V;
    /// `compare_exchange`.
    fn compare_exchange(
        &self,
        current: Self::V,
        new: Self::V,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Self::V, Self::V>;
    /// `fetch_add` (wrapping).
    fn fetch_add(&self, val: Self::V, order: Ordering) -> Self::V;
    /// `fetch_sub` (wrapping).
    fn fetch_sub(&self, val: Self::V, order: Ordering) -> Self::V;
    /// `fetch_and`.
    fn fetch_and(&self, val: Self::V, order: Ordering) -> Self::V;
    /// `fetch_or`.
    fn fetch_or(&self, val: Self::V, order: Ordering) -> Self::V;
    /// `fetch_xor`.
    fn fetch_xor(&self, val: Self::V, order: Ordering) -> Self::V;
}

/// A plain integer with an atomic counterpart: what [`Bytes::load`] and [`Bytes::store`] move.
pub trait AtomicAccess: ByteValued + Default + Eq + std::fmt::Debug + Send + Sync + 'static {
    /// The atomic type of the same size.
    type A: AtomicInteger<V = Self>;
}

macro_rules! atomic_integer {
    ($($atomic:ty => $plain:ty),* $(,)?) => {$(
        impl AtomicInteger for $atomic {
            type V = $plain;
            #[inline(always)]
            fn load(&self, order: Ordering) -> $plain { <$atomic>::load(self, order) }
            #[inline(always)]
            fn store(&self, val: $plain, order: Ordering) { <$atomic>::store(self, val, order) }
            #[inline(always)]
            fn swap(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::swap(self, val, order) }
            #[inline(always)]
            fn compare_exchange(&self, current: $plain, new: $plain, success: Ordering, failure: Ordering)
                -> Result<$plain, $plain> {
                <$atomic>::compare_exchange(self, current, new, success, failure)
            }
            #[inline(always)]
            fn fetch_add(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::fetch_add(self, val, order) }
            #[inline(always)]
            fn fetch_sub(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::fetch_sub(self, val, order) }
            #[inline(always)]
            fn fetch_and(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::fetch_and(self, val, order) }
            #[inline(always)]
            fn fetch_or(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::fetch_or(self, val, order) }
            #[inline(always)]
            fn fetch_xor(&self, val: $plain, order: Ordering) -> $plain { <$atomic>::fetch_xor(self, val, order) }
        }

        impl AtomicAccess for $plain {
            type A = $atomic;
        }
    )*};
}

atomic_integer! {
    AtomicU8 => u8, AtomicI8 => i8, AtomicU16 => u16, AtomicI16 => i16,
    AtomicU32 => u32, AtomicI32 => i32, AtomicU64 => u64, AtomicI64 => i64,
    AtomicUsize => usize, AtomicIsize => isize,
}

/// Reading and writing bytes and values at addresses of type `A`.
///
/// Implemented by [`VolatileSlice`](crate::VolatileSlice) (`A = usize`, an offset) and, in the
/// guest memory layer, by guest memory (`A = GuestAddress`).
///
/// `read`/`write` transfer as much as fits and return the count; the `_slice`/`_obj` forms
/// transfer everything or fail. `read_obj`/`write_obj`/`load`/`store` of an aligned 1, 2, 4
/// or 8-byte value are a single memory access that a concurrent writer cannot tear.
pub trait Bytes<A> {
    /// The error type.
    type E;

    /// Writes as much of `buf` as fits at `addr`; returns the count written.
    fn write(&self, buf: &[u8], addr: A) -> Result<usize, Self::E>;

    /// Reads as much as is there at `addr` into `buf`; returns the count read.
    fn read(&self, buf: &mut [u8], addr: A) -> Result<usize, Self::E>;

    /// Writes all of `buf` at `addr`, or fails.
    fn write_slice(&self, buf: &[u8], addr: A) -> Result<(), Self::E>;

    /// Fills all of `buf` from `addr`, or fails.
    fn read_slice(&self, buf: &mut [u8], addr: A) -> Result<(), Self::E>;

    /// Writes the value `val` at `addr`.
    fn write_obj<T: ByteValued>(&self, val: T, addr: A) -> Result<(), Self::E>;

    /// Reads a value at `addr`.
    fn read_obj<T: ByteValued>(&self, addr: A) -> Result<T, Self::E>;

    /// Reads up to `count` bytes from `src` into memory at `addr`; returns the count read.
    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: A,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E>;

    /// Reads exactly `count` bytes from `src` into memory at `addr`, or fails.
    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: A,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E>;

    /// Writes up to `count` bytes of memory at `addr` to `dst`; returns the count written.
    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: A,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E>;

    /// Writes exactly `count` bytes of memory at `addr` to `dst`, or fails.
    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: A,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E>;

    /// Atomically stores `val` at `addr` (which must be aligned to the size of `T`).
    fn store<T: AtomicAccess>(&self, val: T, addr: A, order: Ordering) -> Result<(), Self::E>;

    /// Atomically loads a value at `addr` (which must be aligned to the size of `T`).
    fn load<T: AtomicAccess>(&self, addr: A, order: Ordering) -> Result<T, Self::E>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_integer_ops() {
        let a = AtomicU32::new(5);
        assert_eq!(AtomicInteger::load(&a, Ordering::Relaxed), 5);
        AtomicInteger::store(&a, 6, Ordering::Relaxed);
        assert_eq!(AtomicInteger::swap(&a, 7, Ordering::Relaxed), 6);
        assert_eq!(AtomicInteger::compare_exchange(&a, 7, 8, Ordering::SeqCst, Ordering::SeqCst), Ok(7));
        assert_eq!(AtomicInteger::compare_exchange(&a, 7, 9, Ordering::SeqCst, Ordering::SeqCst), Err(8));
        assert_eq!(AtomicInteger::fetch_add(&a, 2, Ordering::Relaxed), 8);
        assert_eq!(AtomicInteger::fetch_sub(&a, 1, Ordering::Relaxed), 10);
        assert_eq!(AtomicInteger::fetch_and(&a, 0b1100, Ordering::Relaxed), 9);
        assert_eq!(AtomicInteger::fetch_or(&a, 1, Ordering::Relaxed), 8);
        assert_eq!(AtomicInteger::fetch_xor(&a, 0xff, Ordering::Relaxed), 9);
        assert_eq!(a.into_inner(), 0xf6);
    }

    #[test]
    fn endian_types_are_byte_valued() {
        fn check<T: ByteValued>() {}
        check::<Le16>();
        check::<Le32>();
        check::<Le64>();
        check::<Be16>();
        check::<Be32>();
        check::<Be64>();
        check::<[u8; 3]>();
        let v = Be32::new(0x0102_0304);
        assert_eq!(v.as_bytes(), &[1, 2, 3, 4]);
        assert_eq!(Le16::new(0x0102).as_bytes(), &[2, 1]);
    }
}
