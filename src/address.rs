//! Addresses: [`GuestAddress`] (guest-physical), [`MemoryRegionAddress`] (an offset inside one
//! region) and the [`Address`] trait with checked arithmetic.
//!
//! Arithmetic that could wrap comes in checked (`Option`), overflowing and `unchecked_*`
//! (wrapping) forms; alignment takes any `u64` and returns [`AddressError::NotPowerOfTwo`] for
//! one that is not a power of two, instead of panicking. Addresses combine with masks by `&` and
//! `|`. Nothing here panics on any input.
//!
//! The `unchecked_*` forms carry vm-memory's names but not its debug-build panic: they wrap in
//! every build, so no input makes them panic (a deliberate difference; an address from a guest
//! must never bring the VMM down). Use the checked forms wherever overflow means something.
//!
//! ```
//! use guestmem::{Address, GuestAddress};
//! let a = GuestAddress(0x1234);
//! assert_eq!(a.align_down(0x1000).unwrap(), GuestAddress(0x1000));
//! assert_eq!(a.align_up(0x1000).unwrap(), Some(GuestAddress(0x2000)));
//! assert!(a.align_up(3).is_err());
//! assert_eq!(GuestAddress(u64::MAX).checked_add(1), None);
//! ```

use std::fmt;
use std::ops::{BitAnd, BitOr};

/// A size or length in the guest's address space.
pub type GuestUsize = u64;

/// Errors of address arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// An alignment that is not a power of two (0 included).
    #[error("alignment {0:#x} is not a power of two")]
    NotPowerOfTwo(u64),
}

/// Arithmetic on a 64-bit address type.
///
/// Implemented by [`GuestAddress`] and [`MemoryRegionAddress`]; a type is an `Address` when it
/// wraps a `u64` and adding a length to it is meaningful.
pub trait Address: Copy + Ord + fmt::Debug + Send + Sync + 'static {
    /// The address with the raw value `value`.
    fn new(value: u64) -> Self;

    /// The raw value.
    fn raw_value(&self) -> u64;

    /// `self + offset`, or `None` if it wraps past `u64::MAX`.
    #[inline]
    fn checked_add(&self, offset: u64) -> Option<Self> {
        self.raw_value().checked_add(offset).map(Self::new)
    }

    /// `self + offset` wrapping, and whether it wrapped.
    #[inline]
    fn overflowing_add(&self, offset: u64) -> (Self, bool) {
        let (v, o) = self.raw_value().overflowing_add(offset);
        (Self::new(v), o)
    }

    /// `self - offset`, or `None` if it goes below 0.
    #[inline]
    fn checked_sub(&self, offset: u64) -> Option<Self> {
        self.raw_value().checked_sub(offset).map(Self::new)
    }

    /// `self - offset` wrapping, and whether it wrapped.
    #[inline]
    fn overflowing_sub(&self, offset: u64) -> (Self, bool) {
        let (v, o) = self.raw_value().overflowing_sub(offset);
        (Self::new(v), o)
    }

    /// `self - base` as a length, or `None` if `base > self`.
    #[inline]
    fn checked_offset_from(&self, base: Self) -> Option<u64> {
        self.raw_value().checked_sub(base.raw_value())
    }

    /// `self + offset`, wrapping past `u64::MAX` in every build.
    ///
    /// vm-memory's `unchecked_add` panics on overflow in debug builds and wraps in release
    /// builds; guestmem's always wraps, so it never panics (see the [module doc](self)).
    ///
    /// ```
    /// use guestmem::{Address, GuestAddress};
    /// assert_eq!(GuestAddress(0x1000).unchecked_add(0x10), GuestAddress(0x1010));
    /// assert_eq!(GuestAddress(u64::MAX).unchecked_add(2), GuestAddress(1));
    /// ```
    #[inline]
    fn unchecked_add(&self, offset: u64) -> Self {
        Self::new(self.raw_value().wrapping_add(offset))
    }

    /// `self - offset`, wrapping below 0 in every build (vm-memory panics in debug builds).
    ///
    /// ```
    /// use guestmem::{Address, GuestAddress};
    /// assert_eq!(GuestAddress(0x1010).unchecked_sub(0x10), GuestAddress(0x1000));
    /// assert_eq!(GuestAddress(0).unchecked_sub(1), GuestAddress(u64::MAX));
    /// ```
    #[inline]
    fn unchecked_sub(&self, offset: u64) -> Self {
        Self::new(self.raw_value().wrapping_sub(offset))
    }

    /// `self - base` as a length, wrapping when `base > self`, in every build (vm-memory panics
    /// in debug builds).
    ///
    /// ```
    /// use guestmem::{Address, GuestAddress};
    /// assert_eq!(GuestAddress(0x150).unchecked_offset_from(GuestAddress(0x100)), 0x50);
    /// assert_eq!(GuestAddress(0).unchecked_offset_from(GuestAddress(1)), u64::MAX);
    /// ```
    #[inline]
    fn unchecked_offset_from(&self, base: Self) -> u64 {
        self.raw_value().wrapping_sub(base.raw_value())
    }

    /// `self` rounded down to a multiple of `align`.
    #[inline]
    fn align_down(&self, align: u64) -> Result<Self, AddressError> {
        let mask = align_mask(align)?;
        Ok(Self::new(self.raw_value() & !mask))
    }

    /// `self` rounded up to a multiple of `align`: `Ok(None)` if that wraps past `u64::MAX`.
    #[inline]
    fn align_up(&self, align: u64) -> Result<Option<Self>, AddressError> {
        let mask = align_mask(align)?;
        Ok(self.raw_value().checked_add(mask).map(|v| Self::new(v & !mask)))
    }

    /// Whether `self` is a multiple of `align`.
    #[inline]
    fn is_aligned(&self, align: u64) -> Result<bool, AddressError> {
        Ok(self.raw_value() & align_mask(align)? == 0)
    }

    /// `self & mask`.
    #[inline]
    fn mask(&self, mask: u64) -> u64 {
        self.raw_value() & mask
    }
}

#[inline]
fn align_mask(align: u64) -> Result<u64, AddressError> {
    if align.is_power_of_two() {
        Ok(align - 1)
    } else {
        Err(AddressError::NotPowerOfTwo(align))
    }
}

macro_rules! address_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl Address for $name {
            #[inline]
            fn new(value: u64) -> Self {
                $name(value)
            }

            #[inline]
            fn raw_value(&self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        /// The address with only the bits of `mask` kept.
        impl BitAnd<u64> for $name {
            type Output = $name;

            #[inline]
            fn bitand(self, mask: u64) -> $name {
                $name(self.0 & mask)
            }
        }

        /// The address with the bits of `bits` set.
        impl BitOr<u64> for $name {
            type Output = $name;

            #[inline]
            fn bitor(self, bits: u64) -> $name {
                $name(self.0 | bits)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }

        impl From<$name> for u64 {
            fn from(a: $name) -> u64 {
                a.0
            }
        }
    };
}

address_type! {
    /// A guest-physical address.
    ///
    /// ```
    /// use guestmem::GuestAddress;
    /// assert_eq!(format!("{}", GuestAddress(0x1000)), "0x1000");
    /// assert_eq!(GuestAddress(0x1234) & !0xfff, GuestAddress(0x1000));
    /// assert_eq!(GuestAddress(0x1000) | 0x34, GuestAddress(0x1034));
    /// ```
    GuestAddress
}

address_type! {
    /// An offset inside one memory region, counted from the region's start.
    ///
    /// ```
    /// use guestmem::{Address, MemoryRegionAddress};
    /// assert_eq!(MemoryRegionAddress(8).checked_add(8), Some(MemoryRegionAddress(16)));
    /// ```
    MemoryRegionAddress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_and_overflowing() {
        let a = GuestAddress(10);
        assert_eq!(a.checked_add(5), Some(GuestAddress(15)));
        assert_eq!(GuestAddress(u64::MAX).checked_add(1), None);
        assert_eq!(GuestAddress(u64::MAX).overflowing_add(2), (GuestAddress(1), true));
        assert_eq!(a.overflowing_add(1), (GuestAddress(11), false));
        assert_eq!(a.checked_sub(11), None);
        assert_eq!(a.checked_sub(10), Some(GuestAddress(0)));
        assert_eq!(a.overflowing_sub(11), (GuestAddress(u64::MAX), true));
        assert_eq!(a.checked_offset_from(GuestAddress(4)), Some(6));
        assert_eq!(a.checked_offset_from(GuestAddress(11)), None);
        assert_eq!(a.mask(0x3), 2);
        assert_eq!(u64::from(a), 10);
        assert_eq!(GuestAddress::from(3), GuestAddress(3));
        assert_eq!(format!("{:?}", MemoryRegionAddress(16)), "MemoryRegionAddress(0x10)");
    }

    #[test]
    fn unchecked_arithmetic_wraps_and_masks() {
        let a = MemoryRegionAddress(10);
        assert_eq!(a.unchecked_add(5), MemoryRegionAddress(15));
        assert_eq!(a.unchecked_sub(11), MemoryRegionAddress(u64::MAX));
        assert_eq!(MemoryRegionAddress(u64::MAX).unchecked_add(1), MemoryRegionAddress(0));
        assert_eq!(a.unchecked_offset_from(MemoryRegionAddress(4)), 6);
        assert_eq!(a.unchecked_offset_from(MemoryRegionAddress(11)), u64::MAX);
        // The same as the overflowing forms, without the flag.
        for (x, y) in [(0u64, 1u64), (u64::MAX, 1), (5, 3), (1 << 63, 1 << 63)] {
            assert_eq!(GuestAddress(x).unchecked_add(y), GuestAddress(x).overflowing_add(y).0);
            assert_eq!(GuestAddress(x).unchecked_sub(y), GuestAddress(x).overflowing_sub(y).0);
        }
        assert_eq!(a & 0b1000, MemoryRegionAddress(8));
        assert_eq!(a | 0b0101, MemoryRegionAddress(15));
        assert_eq!(GuestAddress(u64::MAX) & 0xff00, GuestAddress(0xff00));
    }

    #[test]
    fn alignment() {
        let a = GuestAddress(0x1001);
        assert_eq!(a.align_down(0x1000), Ok(GuestAddress(0x1000)));
        assert_eq!(a.align_up(0x1000), Ok(Some(GuestAddress(0x2000))));
        assert_eq!(GuestAddress(0x2000).align_up(0x1000), Ok(Some(GuestAddress(0x2000))));
        assert_eq!(GuestAddress(u64::MAX).align_up(0x1000), Ok(None));
        assert_eq!(a.is_aligned(1), Ok(true));
        assert_eq!(a.is_aligned(2), Ok(false));
        for bad in [0, 3, 0x1001, u64::MAX] {
            assert_eq!(a.align_down(bad), Err(AddressError::NotPowerOfTwo(bad)));
            assert_eq!(a.align_up(bad), Err(AddressError::NotPowerOfTwo(bad)));
            assert_eq!(a.is_aligned(bad), Err(AddressError::NotPowerOfTwo(bad)));
        }
        assert_eq!(AddressError::NotPowerOfTwo(3).to_string(), "alignment 0x3 is not a power of two");
        assert_eq!(GuestAddress(u64::MAX).align_down(1 << 63), Ok(GuestAddress(1 << 63)));
    }
}
