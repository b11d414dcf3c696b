//! Plain-old-data values in guest memory: [`ByteValued`], endian types, the atomic value types
//! (all defined one layer down, in `pod`, and re-exported here), and the [`Bytes`] trait of
//! everything that reads and writes them at an address.
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

use std::mem::size_of;
use std::sync::atomic::Ordering;

use crate::bitmap::BitmapSlice;
pub(crate) use crate::pod::{le_u32, le_u64, put_le_u32, put_le_u64};
pub use crate::pod::{
    AtomicAccess, AtomicInteger, Be16, Be32, Be64, BeSize, ByteValued, Le16, Le32, Le64, LeSize,
};
use crate::volatile::{copy, ReadVolatile, Result as VResult, VolatileError, VolatileSlice, WriteVolatile};

/// Reading and writing bytes and values at addresses of type `A`.
///
/// Implemented by [`VolatileSlice`] (`A = usize`, an offset) and, in the
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

/// Offset-based access to a slice: offsets are relative to its start, every access is bounds
/// checked, writes are refused on read-only slices and marked in the slice's bitmap.
impl<S: BitmapSlice> Bytes<usize> for VolatileSlice<'_, S> {
    type E = VolatileError;

    fn write(&self, buf: &[u8], addr: usize) -> VResult<usize> {
        let dst = self.clip(addr, buf.len())?;
        // SAFETY: `dst.len <= buf.len()` and it is a range of this slice.
        unsafe { dst.write_unchecked(buf, 0, dst.len())? };
        Ok(dst.len())
    }

    fn read(&self, buf: &mut [u8], addr: usize) -> VResult<usize> {
        let src = self.clip(addr, buf.len())?;
        // SAFETY: `src.len <= buf.len()` and it is a range of this slice.
        unsafe { src.read_unchecked(buf, 0, src.len()) };
        Ok(src.len())
    }

    #[inline]
    fn write_slice(&self, buf: &[u8], addr: usize) -> VResult<()> {
        crate::volatile::check_range(addr, buf.len(), self.len())?;
        // SAFETY: `addr + buf.len() <= len`, checked above.
        unsafe { self.write_unchecked(buf, addr, buf.len()) }
    }

    #[inline]
    fn read_slice(&self, buf: &mut [u8], addr: usize) -> VResult<()> {
        crate::volatile::check_range(addr, buf.len(), self.len())?;
        let len = buf.len();
        // SAFETY: `addr + buf.len() <= len`, checked above.
        unsafe { self.read_unchecked(buf, addr, len) };
        Ok(())
    }

    #[inline]
    fn write_obj<T: ByteValued>(&self, val: T, addr: usize) -> VResult<()> {
        let dst = self.host_addr(addr, size_of::<T>())?;
        self.check_writable(addr, size_of::<T>())?;
        // SAFETY: `size_of::<T>()` bytes at `dst` lie in this writable slice (checked).
        unsafe { copy::store_obj(val, dst) };
        self.bitmap().mark_dirty(addr, size_of::<T>());
        Ok(())
    }

    #[inline]
    fn read_obj<T: ByteValued>(&self, addr: usize) -> VResult<T> {
        let src = self.host_addr(addr, size_of::<T>())?;
        // SAFETY: `size_of::<T>()` bytes at `src` lie in this slice (checked).
        Ok(unsafe { copy::load_obj(src) })
    }

    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: usize,
        src: &mut F,
        count: usize,
    ) -> VResult<usize> {
        src.read_volatile(&self.clip(addr, count)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: usize,
        src: &mut F,
        count: usize,
    ) -> VResult<()> {
        src.read_exact_volatile(&self.subslice(addr, count)?)
    }

    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: usize,
        dst: &mut F,
        count: usize,
    ) -> VResult<usize> {
        dst.write_volatile(&self.clip(addr, count)?)
    }

    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: usize,
        dst: &mut F,
        count: usize,
    ) -> VResult<()> {
        dst.write_all_volatile(&self.subslice(addr, count)?)
    }

    #[inline]
    fn store<T: AtomicAccess>(&self, val: T, addr: usize, order: Ordering) -> VResult<()> {
        self.get_atomic_ref::<T::A>(addr)?.store(val, order)
    }

    #[inline]
    fn load<T: AtomicAccess>(&self, addr: usize, order: Ordering) -> VResult<T> {
        Ok(self.get_atomic_ref::<T::A>(addr)?.load(order))
    }
}
