//! Plain-old-data values as they live in guest memory: [`ByteValued`], the endian types, and
//! the atomic integer types (sealed) that [`AtomicRef`](crate::AtomicRef) and the `load`/`store`
//! calls of [`Bytes`](crate::Bytes) move.
//!
//! This is the bottom of the value layers: [`volatile`](crate::volatile) copies these values in
//! and out of memory, and [`bytes`](crate::bytes) (which re-exports everything here) defines the
//! address-based [`Bytes`](crate::Bytes) trait on top. Nothing here touches memory.

use std::sync::atomic::{
    AtomicI16, AtomicI32, AtomicI64, AtomicI8, AtomicIsize, AtomicU16, AtomicU32, AtomicU64, AtomicU8,
    AtomicUsize, Ordering,
};

use std::mem::{align_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The seal of [`AtomicInteger`] and [`AtomicAccess`]: a public trait in a private module, so
/// no type outside this crate can implement them.
mod sealed {
    pub trait Sealed {}
}

/// A type that any byte pattern is a valid value of, and whose every byte is initialized: it can
/// be copied in and out of guest memory as bytes.
///
/// Implemented for every `Copy` type that is zerocopy's `FromBytes + IntoBytes + Immutable`.
pub trait ByteValued: FromBytes + IntoBytes + Immutable + Copy {}

impl<T: FromBytes + IntoBytes + Immutable + Copy> ByteValued for T {}

macro_rules! endian_type {
    ($(#[$doc:meta])* $name:ident, $native:ty, $to:ident, $from:ident) => {
        $(#[$doc])*
        ///
        /// `#[repr(transparent)]` over the native integer: the same size and the same alignment,
        /// so a `#[repr(C)]` struct of these has the layout of the same struct of native
        /// integers (as vm-memory's endian types; zerocopy's byteorder types have alignment 1).
        /// [`new`](Self::new)/[`From`] convert from native, [`get`](Self::get)/
        /// [`to_native`](Self::to_native)/[`From`] back; `Debug` shows the native value;
        /// equality with a native integer compares values.
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
        #[repr(transparent)]
        pub struct $name($native);

        impl $name {
            /// The value `v` in this byte order.
            #[inline(always)]
            pub const fn new(v: $native) -> Self {
                $name(v.$to())
            }

            /// The value, in the host's byte order.
            #[inline(always)]
            pub const fn get(self) -> $native {
                <$native>::$from(self.0)
            }

            /// Stores `v`, in this byte order.
            #[inline(always)]
            pub fn set(&mut self, v: $native) {
                *self = Self::new(v);
            }

            /// The value, in the host's byte order (vm-memory's name for [`get`](Self::get)).
            #[inline(always)]
            pub const fn to_native(self) -> $native {
                self.get()
            }
        }

        impl From<$native> for $name {
            #[inline(always)]
            fn from(v: $native) -> Self {
                Self::new(v)
            }
        }

        impl From<$name> for $native {
            #[inline(always)]
            fn from(v: $name) -> $native {
                v.get()
            }
        }

        impl PartialEq<$native> for $name {
            #[inline]
            fn eq(&self, other: &$native) -> bool {
                self.get() == *other
            }
        }

        impl PartialEq<$name> for $native {
            #[inline]
            fn eq(&self, other: &$name) -> bool {
                *self == other.get()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.get()).finish()
            }
        }

        const _: () = assert!(
            size_of::<$name>() == size_of::<$native>() && align_of::<$name>() == align_of::<$native>()
        );
    };
}

endian_type!(
    /// A little-endian `u16` in guest memory.
    ///
    /// ```
    /// use guestmem::Le16;
    /// use zerocopy::IntoBytes;
    /// let v = Le16::new(0x0102);
    /// assert_eq!(v.as_bytes(), &[2, 1]);
    /// assert_eq!((v.get(), u16::from(v)), (0x0102, 0x0102));
    /// assert_eq!(v, 0x0102u16);
    /// assert_eq!(format!("{v:#x?}"), "Le16(\n    0x102,\n)");
    /// ```
    Le16, u16, to_le, from_le
);
endian_type!(
    /// A little-endian `u32` in guest memory.
    Le32, u32, to_le, from_le
);
endian_type!(
    /// A little-endian `u64` in guest memory.
    Le64, u64, to_le, from_le
);
endian_type!(
    /// A little-endian `usize` in guest memory.
    LeSize, usize, to_le, from_le
);
endian_type!(
    /// A big-endian `u16` in guest memory.
    Be16, u16, to_be, from_be
);
endian_type!(
    /// A big-endian `u32` in guest memory.
    ///
    /// ```
    /// use guestmem::Be32;
    /// use zerocopy::IntoBytes;
    /// let mut v = Be32::from(0x0102_0304);
    /// assert_eq!(v.as_bytes(), &[1, 2, 3, 4]);
    /// v.set(5);
    /// assert_eq!(v.to_native(), 5);
    /// ```
    Be32, u32, to_be, from_be
);
endian_type!(
    /// A big-endian `u64` in guest memory.
    Be64, u64, to_be, from_be
);
endian_type!(
    /// A big-endian `usize` in guest memory.
    BeSize, usize, to_be, from_be
);

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
///
/// Sealed: implemented for `AtomicU8`..`AtomicU64`, `AtomicI8`..`AtomicI64`, `AtomicUsize` and
/// `AtomicIsize` only. [`AtomicRef`](crate::AtomicRef) turns aligned guest memory into a
/// `&A` for the duration of each operation, which is sound only because `A` is one of std's
/// atomics: an `UnsafeCell` of a plain integer, valid for every bit pattern and made for memory
/// that others change concurrently. A type of any other shape (one holding a reference, say)
/// would turn guest-controlled bytes into a Rust value with invariants the guest can break, so
/// it cannot implement this trait:
///
/// ```compile_fail,E0277
/// use std::sync::atomic::{AtomicU64, Ordering};
/// #[derive(Debug)]
/// struct Evil(&'static AtomicU64);
/// impl guestmem::AtomicInteger for Evil {
///     type V = u64;
///     fn load(&self, o: Ordering) -> u64 { self.0.load(o) }
///     fn store(&self, v: u64, o: Ordering) { self.0.store(v, o) }
///     fn swap(&self, v: u64, o: Ordering) -> u64 { self.0.swap(v, o) }
///     fn compare_exchange(&self, c: u64, n: u64, s: Ordering, f: Ordering) -> Result<u64, u64> {
///         self.0.compare_exchange(c, n, s, f)
///     }
///     fn fetch_add(&self, v: u64, o: Ordering) -> u64 { self.0.fetch_add(v, o) }
///     fn fetch_sub(&self, v: u64, o: Ordering) -> u64 { self.0.fetch_sub(v, o) }
///     fn fetch_and(&self, v: u64, o: Ordering) -> u64 { self.0.fetch_and(v, o) }
///     fn fetch_or(&self, v: u64, o: Ordering) -> u64 { self.0.fetch_or(v, o) }
///     fn fetch_xor(&self, v: u64, o: Ordering) -> u64 { self.0.fetch_xor(v, o) }
/// }
/// ```
pub trait AtomicInteger: sealed::Sealed + Sync + Send + std::fmt::Debug + 'static {
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

/// A plain integer with an atomic counterpart: what [`Bytes::load`](crate::Bytes::load) and
/// [`Bytes::store`](crate::Bytes::store) move.
///
/// Sealed, like [`AtomicInteger`]: implemented for the integer types of std's atomics only.
///
/// ```compile_fail,E0277
/// #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)]
/// #[repr(transparent)]
/// struct Mine(u64);
/// impl guestmem::AtomicAccess for Mine {
///     type A = std::sync::atomic::AtomicU64;
/// }
/// ```
pub trait AtomicAccess:
    sealed::Sealed + ByteValued + Default + Eq + std::fmt::Debug + Send + Sync + 'static
{
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

        impl sealed::Sealed for $atomic {}
        impl sealed::Sealed for $plain {}
    )*};
}

atomic_integer! {
    AtomicU8 => u8, AtomicI8 => i8, AtomicU16 => u16, AtomicI16 => i16,
    AtomicU32 => u32, AtomicI32 => i32, AtomicU64 => u64, AtomicI64 => i64,
    AtomicUsize => usize, AtomicIsize => isize,
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
        check::<LeSize>();
        check::<Be16>();
        check::<Be32>();
        check::<Be64>();
        check::<BeSize>();
        check::<[u8; 3]>();
        let v = Be32::new(0x0102_0304);
        assert_eq!(v.as_bytes(), &[1, 2, 3, 4]);
        assert_eq!(Le16::new(0x0102).as_bytes(), &[2, 1]);
        assert_eq!(Le64::new(1).as_bytes(), &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Be64::new(1).as_bytes(), &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(LeSize::new(0x0102).as_bytes()[..2], [2, 1]);
        assert_eq!(BeSize::new(1).as_bytes()[size_of::<usize>() - 1], 1);
        assert_eq!(Le32::read_from_bytes(&[4, 3, 2, 1]).unwrap().get(), 0x0102_0304);
        assert_eq!(Be16::default().get(), 0);
        assert!(Be16::new(1) == 1u16 && 1u16 == Be16::new(1) && Be16::new(1) != Be16::new(256));
        assert_eq!(format!("{:?}", Le32::new(7)), "Le32(7)");
    }

    /// The layout of a `#[repr(C)]` struct of endian types is that of the native one (vm-memory's
    /// endian types are aligned like this; zerocopy's byteorder types, alignment 1, are not).
    #[test]
    fn endian_types_keep_native_layout() {
        #[derive(Clone, Copy)]
        #[repr(C)]
        struct Endian {
            a: Le16,
            b: Le64,
            c: Be32,
            d: Le16,
        }
        #[derive(Clone, Copy)]
        #[repr(C)]
        #[allow(dead_code)]
        struct Native {
            a: u16,
            b: u64,
            c: u32,
            d: u16,
        }
        assert_eq!((size_of::<Endian>(), align_of::<Endian>()), (size_of::<Native>(), align_of::<Native>()));
        assert_eq!(std::mem::offset_of!(Endian, b), std::mem::offset_of!(Native, b));
        assert_eq!(std::mem::offset_of!(Endian, c), std::mem::offset_of!(Native, c));
        let e = Endian { a: 1.into(), b: 2.into(), c: 3.into(), d: 4.into() };
        assert_eq!((e.a.get(), e.b.get(), e.c.get(), e.d.get()), (1, 2, 3, 4));
        for (t, n) in [
            (align_of::<Le16>(), align_of::<u16>()),
            (align_of::<Le32>(), align_of::<u32>()),
            (align_of::<Le64>(), align_of::<u64>()),
            (align_of::<LeSize>(), align_of::<usize>()),
            (align_of::<Be16>(), align_of::<u16>()),
            (align_of::<Be32>(), align_of::<u32>()),
            (align_of::<Be64>(), align_of::<u64>()),
            (align_of::<BeSize>(), align_of::<usize>()),
        ] {
            assert_eq!(t, n);
        }
    }
}
