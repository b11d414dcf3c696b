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

/// A transfer that had to move `expected` bytes at `addr` and moved `completed`: what the
/// provided methods of [`Bytes`] report when a primitive moved less than all, converted into
/// the implementor's error type (`Bytes::E: From<PartialBuffer<A>>`).
///
/// ```
/// use guestmem::bytes::PartialBuffer;
/// use guestmem::VolatileError;
/// let e = VolatileError::from(PartialBuffer { addr: 8usize, expected: 4, completed: 1 });
/// assert!(matches!(e, VolatileError::PartialBuffer { expected: 4, completed: 1 }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialBuffer<A> {
    /// Where the transfer started.
    pub addr: A,
    /// Bytes it had to move.
    pub expected: usize,
    /// Bytes it moved.
    pub completed: usize,
}

/// A slice's offsets name no guest address: the slice form of a short transfer.
impl From<PartialBuffer<usize>> for VolatileError {
    fn from(p: PartialBuffer<usize>) -> Self {
        VolatileError::PartialBuffer { expected: p.expected, completed: p.completed }
    }
}

/// Reading and writing bytes and values at addresses of type `A`.
///
/// Implemented by [`VolatileSlice`] (`A = usize`, an offset), by guest memory regions
/// (`A = MemoryRegionAddress`) and by all guest memory (`A = GuestAddress`).
///
/// # What an implementor writes
///
/// The primitives are the calls that move *as much as fits* and the atomics: [`write`](Self::write),
/// [`read`](Self::read), [`read_volatile_from`](Self::read_volatile_from),
/// [`write_volatile_to`](Self::write_volatile_to), [`store`](Self::store), [`load`](Self::load),
/// and a `From<PartialBuffer<A>>` for the error type. Everything else is provided from them:
/// the `_slice` and `_obj` forms are one `write`/`read` that must move everything, the exact
/// I/O forms one `read_volatile_from`/`write_volatile_to` whose source or sink is retried until
/// it is done or at its end. A provided "all or nothing" call that fails may have moved a
/// prefix first (vm-memory's provided methods behave so too); guestmem's own implementations
/// override every provided method: theirs check the whole range before anything moves, and
/// their `_obj` forms of aligned 1, 2, 4 and 8-byte values are one access that a concurrent
/// writer cannot tear (for another implementor, that depends on its `write` and `read`).
///
/// # Bounds, the same for every call
///
/// - An access of `n > 0` bytes moves bytes only where memory is. The *as much as fits* calls
///   move what fits contiguously from `addr` and fail when nothing fits: at or past the end of
///   a slice or region, at a guest address in no region, or (writes) in read-only memory. So a
///   loop that writes until an error ends, and `Ok(0)` means the file or stream moved nothing
///   (its end), never that memory had no room. (vm-memory agrees for `write`/`read`; its
///   `read_volatile_from`/`write_volatile_to` at the end of a slice return `Ok(0)`.)
/// - An access of 0 bytes (an empty buffer, a count of 0, a zero-sized value) touches nothing
///   and succeeds wherever an empty range can be: in a slice or region at any offset up to and
///   including its length (past it is out of bounds, as `&s[n..n]` is), in guest memory at any
///   address, read-only memory included (vm-memory also accepts it past a slice's end). By
///   IOVA ([`iommu`](crate::iommu)), the IOVA must still be mapped for the access: there an
///   empty access at an unmapped IOVA is a miss, which tells the IOMMU model what to map.
/// - The `_slice`, `_obj` and exact I/O forms move everything or fail.
///
/// ```
/// use std::cell::RefCell;
/// use std::sync::atomic::Ordering;
/// use guestmem::volatile::{ReadVolatile, WriteVolatile};
/// use guestmem::{AtomicAccess, Bytes, VolatileError, VolatileSlice};
///
/// /// A device's register file: it writes the primitives, the rest is provided.
/// struct Registers(RefCell<Vec<u8>>);
///
/// impl Registers {
///     fn with<R>(&self, f: impl FnOnce(&VolatileSlice<'_, guestmem::volatile::HostBuffer>) -> R) -> R {
///         f(&VolatileSlice::from(&mut self.0.borrow_mut()[..]))
///     }
/// }
///
/// impl Bytes<usize> for Registers {
///     type E = VolatileError;
///     fn write(&self, buf: &[u8], at: usize) -> Result<usize, VolatileError> {
///         self.with(|s| s.write(buf, at))
///     }
///     fn read(&self, buf: &mut [u8], at: usize) -> Result<usize, VolatileError> {
///         self.with(|s| s.read(buf, at))
///     }
///     fn read_volatile_from<F: ReadVolatile + ?Sized>(&self, at: usize, src: &mut F, n: usize) -> Result<usize, VolatileError> {
///         self.with(|s| s.read_volatile_from(at, src, n))
///     }
///     fn write_volatile_to<F: WriteVolatile + ?Sized>(&self, at: usize, dst: &mut F, n: usize) -> Result<usize, VolatileError> {
///         self.with(|s| s.write_volatile_to(at, dst, n))
///     }
///     fn store<T: AtomicAccess>(&self, v: T, at: usize, o: Ordering) -> Result<(), VolatileError> {
///         self.with(|s| s.store(v, at, o))
///     }
///     fn load<T: AtomicAccess>(&self, at: usize, o: Ordering) -> Result<T, VolatileError> {
///         self.with(|s| s.load(at, o))
///     }
/// }
///
/// let regs = Registers(RefCell::new(vec![0; 16]));
/// regs.write_obj(0xfeed_u16, 4).unwrap(); // provided
/// assert_eq!(regs.read_obj::<u16>(4).unwrap(), 0xfeed);
/// assert!(matches!(regs.write_slice(&[1; 4], 14), Err(VolatileError::PartialBuffer { expected: 4, completed: 2 })));
/// ```
pub trait Bytes<A: Copy> {
    /// The error type.
    type E: From<PartialBuffer<A>>;

    /// Writes as much of `buf` as fits at `addr`; returns the count written (see the bounds
    /// above: an error when nothing fits, `Ok(0)` only for an empty `buf`).
    fn write(&self, buf: &[u8], addr: A) -> Result<usize, Self::E>;

    /// Reads as much as is there at `addr` into `buf`; returns the count read (an error when
    /// nothing is there, `Ok(0)` only for an empty `buf`).
    fn read(&self, buf: &mut [u8], addr: A) -> Result<usize, Self::E>;

    /// Reads up to `count` bytes from `src` into memory at `addr`, as much as fits; returns the
    /// count read (`Ok(0)` when `src` is at its end or `count` is 0).
    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: A,
        src: &mut F,
        count: usize,
    ) -> Result<usize, Self::E>;

    /// Writes up to `count` bytes of memory at `addr` to `dst`, as much as is there; returns
    /// the count written (`Ok(0)` when `dst` takes nothing or `count` is 0).
    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: A,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, Self::E>;

    /// Atomically stores `val` at `addr` (which must be aligned to the size of `T`).
    fn store<T: AtomicAccess>(&self, val: T, addr: A, order: Ordering) -> Result<(), Self::E>;

    /// Atomically loads a value at `addr` (which must be aligned to the size of `T`).
    fn load<T: AtomicAccess>(&self, addr: A, order: Ordering) -> Result<T, Self::E>;

    /// Writes all of `buf` at `addr`, or fails. Provided: one [`write`](Self::write), and
    /// [`PartialBuffer`] if it wrote less.
    fn write_slice(&self, buf: &[u8], addr: A) -> Result<(), Self::E> {
        let completed = self.write(buf, addr)?;
        if completed != buf.len() {
            return Err(PartialBuffer { addr, expected: buf.len(), completed }.into());
        }
        Ok(())
    }

    /// Fills all of `buf` from `addr`, or fails. Provided: one [`read`](Self::read), and
    /// [`PartialBuffer`] if it read less.
    fn read_slice(&self, buf: &mut [u8], addr: A) -> Result<(), Self::E> {
        let completed = self.read(buf, addr)?;
        if completed != buf.len() {
            return Err(PartialBuffer { addr, expected: buf.len(), completed }.into());
        }
        Ok(())
    }

    /// Writes the value `val` at `addr`. Provided: [`write_slice`](Self::write_slice) of its
    /// bytes.
    fn write_obj<T: ByteValued>(&self, val: T, addr: A) -> Result<(), Self::E> {
        self.write_slice(val.as_bytes(), addr)
    }

    /// Reads a value at `addr`. Provided: [`read_slice`](Self::read_slice) into its bytes.
    fn read_obj<T: ByteValued>(&self, addr: A) -> Result<T, Self::E> {
        let mut val = T::new_zeroed();
        self.read_slice(val.as_mut_bytes(), addr)?;
        Ok(val)
    }

    /// Reads exactly `count` bytes from `src` into memory at `addr`, or fails. Provided: one
    /// [`read_volatile_from`](Self::read_volatile_from) with `src` read again until each slice
    /// is full or `src` ends, and [`PartialBuffer`] if fewer than `count` arrived.
    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: A,
        src: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        let completed = self.read_volatile_from(addr, &mut Exact(src), count)?;
        if completed != count {
            return Err(PartialBuffer { addr, expected: count, completed }.into());
        }
        Ok(())
    }

    /// Writes exactly `count` bytes of memory at `addr` to `dst`, or fails. Provided: one
    /// [`write_volatile_to`](Self::write_volatile_to) with `dst` written again until each slice
    /// is out or `dst` takes no more, and [`PartialBuffer`] if fewer than `count` went.
    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: A,
        dst: &mut F,
        count: usize,
    ) -> Result<(), Self::E> {
        let completed = self.write_volatile_to(addr, &mut Exact(dst), count)?;
        if completed != count {
            return Err(PartialBuffer { addr, expected: count, completed }.into());
        }
        Ok(())
    }
}

/// A source or sink that is called again until each slice it is given is done or it moves
/// nothing: what the provided exact I/O forms of [`Bytes`] hand to the primitives.
struct Exact<'a, F: ?Sized>(&'a mut F);

impl<F: ReadVolatile + ?Sized> ReadVolatile for Exact<'_, F> {
    fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> VResult<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_volatile(&buf.offset(done)?)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}

impl<F: WriteVolatile + ?Sized> WriteVolatile for Exact<'_, F> {
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> VResult<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.write_volatile(&buf.offset(done)?)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// Memory that implements only the primitives, counting how often each is called.
    struct Primitives {
        bytes: RefCell<Vec<u8>>,
        calls: Cell<usize>,
    }

    impl Primitives {
        fn new(len: usize) -> Self {
            Primitives { bytes: RefCell::new(vec![0; len]), calls: Cell::new(0) }
        }

        fn with<R>(&self, f: impl FnOnce(&VolatileSlice<'_, crate::volatile::HostBuffer>) -> R) -> R {
            self.calls.set(self.calls.get() + 1);
            f(&VolatileSlice::from(&mut self.bytes.borrow_mut()[..]))
        }
    }

    impl Bytes<usize> for Primitives {
        type E = VolatileError;
        fn write(&self, buf: &[u8], at: usize) -> VResult<usize> {
            self.with(|s| s.write(buf, at))
        }
        fn read(&self, buf: &mut [u8], at: usize) -> VResult<usize> {
            self.with(|s| s.read(buf, at))
        }
        fn read_volatile_from<F: ReadVolatile + ?Sized>(
            &self,
            at: usize,
            src: &mut F,
            n: usize,
        ) -> VResult<usize> {
            self.with(|s| s.read_volatile_from(at, src, n))
        }
        fn write_volatile_to<F: WriteVolatile + ?Sized>(
            &self,
            at: usize,
            dst: &mut F,
            n: usize,
        ) -> VResult<usize> {
            self.with(|s| s.write_volatile_to(at, dst, n))
        }
        fn store<T: AtomicAccess>(&self, v: T, at: usize, o: Ordering) -> VResult<()> {
            self.with(|s| s.store(v, at, o))
        }
        fn load<T: AtomicAccess>(&self, at: usize, o: Ordering) -> VResult<T> {
            self.with(|s| s.load(at, o))
        }
    }

    /// A source that hands out one byte per call, then ends.
    struct Trickle<'a>(&'a [u8]);

    impl ReadVolatile for Trickle<'_> {
        fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> VResult<usize> {
            let n = self.0.len().min(buf.len()).min(1);
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            buf.copy_from(head)
        }
    }

    /// A sink that takes one byte per call, up to `room`.
    struct Narrow {
        got: Vec<u8>,
        room: usize,
    }

    impl WriteVolatile for Narrow {
        fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> VResult<usize> {
            let n = buf.len().min(1).min(self.room - self.got.len());
            let mut b = [0u8; 1];
            buf.subslice(0, n)?.copy_to(&mut b[..n]);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
    }

    #[test]
    fn provided_methods_from_the_primitives() {
        let m = Primitives::new(16);
        m.write_obj(0x0102_0304u32, 4).unwrap();
        assert_eq!(m.read_obj::<u32>(4).unwrap(), 0x0102_0304);
        m.write_slice(&[9; 4], 12).unwrap();
        let mut out = [0u8; 4];
        m.read_slice(&mut out, 12).unwrap();
        assert_eq!(out, [9; 4]);
        // Short: PartialBuffer, with what moved (a provided write_slice may write a prefix).
        let e = m.write_slice(&[5; 4], 14).unwrap_err();
        assert!(matches!(e, VolatileError::PartialBuffer { expected: 4, completed: 2 }), "{e}");
        assert_eq!(m.read_obj::<[u8; 2]>(14).unwrap(), [5, 5]);
        assert!(matches!(m.read_slice(&mut out, 14), Err(VolatileError::PartialBuffer { .. })));
        assert!(matches!(
            m.read_obj::<u64>(12),
            Err(VolatileError::PartialBuffer { expected: 8, completed: 4 })
        ));
        // Nothing fits: the primitive's error.
        assert!(matches!(m.write_obj(1u8, 16), Err(VolatileError::OutOfBounds { .. })));
        // The exact I/O forms: one primitive call, the source or sink retried under it.
        let calls = m.calls.get();
        m.read_exact_volatile_from(0, &mut Trickle(&[1, 2, 3]), 3).unwrap();
        assert_eq!(m.calls.get(), calls + 1);
        assert_eq!(m.read_obj::<[u8; 3]>(0).unwrap(), [1, 2, 3]);
        let e = m.read_exact_volatile_from(0, &mut Trickle(&[4]), 2).unwrap_err();
        assert!(matches!(e, VolatileError::PartialBuffer { expected: 2, completed: 1 }), "{e}");
        let mut sink = Narrow { got: Vec::new(), room: 8 };
        m.write_all_volatile_to(0, &mut sink, 3).unwrap();
        assert_eq!(sink.got, [4, 2, 3]);
        let mut sink = Narrow { got: Vec::new(), room: 2 };
        let e = m.write_all_volatile_to(0, &mut sink, 3).unwrap_err();
        assert!(matches!(e, VolatileError::PartialBuffer { expected: 3, completed: 2 }), "{e}");
        // Zero-length: fine at the end.
        m.write_slice(&[], 16).unwrap();
        m.read_exact_volatile_from(16, &mut Trickle(&[]), 0).unwrap();
        // Atomics are primitives.
        m.store(3u8, 1, Ordering::Release).unwrap();
        assert_eq!(m.load::<u8>(1, Ordering::Acquire).unwrap(), 3);
    }
}
