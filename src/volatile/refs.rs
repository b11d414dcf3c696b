//! Typed views of guest memory: [`VolatileRef`] (one value), [`VolatileArrayRef`] (an array)
//! and [`AtomicRef`] (an atomic integer). Each keeps the bitmap slice and write permission of
//! the slice it came from, so its writes are tracked and refused on read-only memory.

use std::marker::PhantomData;
use std::mem::size_of;
use std::sync::atomic::Ordering;

use super::{check_alignment, copy, Result, VolatileError, VolatileSlice};
use crate::bitmap::BitmapSlice;
use crate::pod::{AtomicInteger, ByteValued};

/// A reference to one `T` in memory that may change at any time.
///
/// ```
/// use guestmem::{VolatileMemory, VolatileSlice};
/// let mut buf = [0u8; 16];
/// let s = VolatileSlice::from(&mut buf[..]);
/// let r = s.get_ref::<u32>(4).unwrap();
/// r.store(0xAABBCCDD).unwrap();
/// assert_eq!(r.load(), 0xAABBCCDD);
/// ```
#[derive(Clone, Debug)]
pub struct VolatileRef<'a, T, S = ()> {
    slice: VolatileSlice<'a, S>,
    phantom: PhantomData<T>,
}

impl<'a, T: ByteValued, S: BitmapSlice> VolatileRef<'a, T, S> {
    /// A ref over a slice of exactly `size_of::<T>()` bytes (the caller checked the size).
    pub(crate) fn from_slice(slice: VolatileSlice<'a, S>) -> Self {
        debug_assert_eq!(slice.len(), size_of::<T>());
        VolatileRef { slice, phantom: PhantomData }
    }

    /// The host address of the value. Writes through it are not tracked.
    pub fn as_ptr(&self) -> *mut T {
        self.slice.as_ptr().cast()
    }

    /// Reads the value (one access when it is 1, 2, 4 or 8 bytes and aligned).
    #[inline]
    pub fn load(&self) -> T {
        // SAFETY: the slice holds exactly `size_of::<T>()` readable bytes.
        unsafe { copy::load_obj(self.slice.as_ptr()) }
    }

    /// Writes the value and marks it dirty; fails on read-only memory.
    #[inline]
    pub fn store(&self, val: T) -> Result<()> {
        self.slice.check_writable(0, size_of::<T>())?;
        // SAFETY: the slice holds exactly `size_of::<T>()` bytes and is writable (checked).
        unsafe { copy::store_obj(val, self.slice.as_ptr()) };
        self.slice.bitmap().mark_dirty(0, size_of::<T>());
        Ok(())
    }

    /// The bytes of the value as a slice.
    pub fn to_slice(&self) -> VolatileSlice<'a, S> {
        self.slice.clone()
    }
}

/// A reference to `len` consecutive `T`s in memory that may change at any time.
///
/// ```
/// use guestmem::{VolatileMemory, VolatileSlice};
/// let mut buf = [0u8; 16];
/// let s = VolatileSlice::from(&mut buf[..]);
/// let a = s.get_array_ref::<u16>(0, 8).unwrap();
/// a.copy_from(&[1, 2, 3]).unwrap();
/// assert_eq!(a.load(2).unwrap(), 3);
/// let mut out = [0u16; 8];
/// assert_eq!(a.copy_to(&mut out), 8);
/// assert_eq!(out[..4], [1, 2, 3, 0]);
/// ```
#[derive(Clone, Debug)]
pub struct VolatileArrayRef<'a, T, S = ()> {
    slice: VolatileSlice<'a, S>,
    len: usize,
    phantom: PhantomData<T>,
}

impl<'a, T: ByteValued, S: BitmapSlice> VolatileArrayRef<'a, T, S> {
    /// An array over a slice of exactly `len * size_of::<T>()` bytes (checked by the caller).
    pub(crate) fn from_slice(slice: VolatileSlice<'a, S>, len: usize) -> Self {
        debug_assert_eq!(slice.len(), len * size_of::<T>());
        VolatileArrayRef { slice, len, phantom: PhantomData }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size of one element.
    pub fn element_size(&self) -> usize {
        size_of::<T>()
    }

    /// The host address of the first element. Writes through it are not tracked.
    pub fn as_ptr(&self) -> *mut T {
        self.slice.as_ptr().cast()
    }

    /// A [`VolatileRef`] to element `index`.
    pub fn ref_at(&self, index: usize) -> Result<VolatileRef<'a, T, S>> {
        if index >= self.len {
            return Err(VolatileError::OutOfBounds {
                offset: index.saturating_mul(size_of::<T>()),
                len: size_of::<T>(),
                size: self.slice.len(),
            });
        }
        // SAFETY: index < len, so the element lies inside the slice.
        Ok(VolatileRef::from_slice(unsafe {
            self.slice.subslice_unchecked(index * size_of::<T>(), size_of::<T>())
        }))
    }

    /// Reads element `index` (one access when it is 1, 2, 4 or 8 bytes and aligned).
    pub fn load(&self, index: usize) -> Result<T> {
        Ok(self.ref_at(index)?.load())
    }

    /// Writes element `index` and marks it dirty.
    pub fn store(&self, index: usize, val: T) -> Result<()> {
        self.ref_at(index)?.store(val)
    }

    /// Copies as many elements as fit into `buf` in one bulk copy; returns the count.
    pub fn copy_to(&self, buf: &mut [T]) -> usize {
        self.slice.copy_to(buf)
    }

    /// Copies as many elements of `buf` as fit in one bulk copy; returns the count.
    pub fn copy_from(&self, buf: &[T]) -> Result<usize> {
        self.slice.copy_from(buf)
    }

    /// The bytes of the array as a slice.
    pub fn to_slice(&self) -> VolatileSlice<'a, S> {
        self.slice.clone()
    }
}

/// A reference to an atomic integer in memory shared with a guest or another process.
///
/// Every operation that writes marks the value dirty afterwards; writes to read-only memory fail
/// with [`VolatileError::ReadOnly`] before touching it.
///
/// Each operation makes a `&A` to the guest bytes for its own duration and calls std's atomic
/// operation on it. That is the one place guestmem makes a Rust reference to guest memory, and
/// it is sound: `A` is one of std's atomics ([`AtomicInteger`] is sealed), an `UnsafeCell` of an
/// integer that every bit pattern is a value of and that others may change concurrently; the
/// bytes are in bounds, aligned for `A` (checked when the ref is made) and mapped for `'a`. On
/// read-only memory only "sufficiently small" `Relaxed` loads are allowed by std's rules for
/// read-only memory (any other atomic access there is undefined behaviour, even a failing
/// compare-exchange): so no read-modify-write reaches read-only memory, and
/// [`load`](Self::load) there is a `Relaxed` load followed by a fence of the requested
/// ordering.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use guestmem::{VolatileMemory, VolatileSlice};
/// let mut buf = [0u64; 2];
/// let bytes = zerocopy::IntoBytes::as_mut_bytes(&mut buf[..]);
/// let s = VolatileSlice::from(bytes);
/// let a = s.get_atomic_ref::<AtomicU32>(4).unwrap();
/// assert_eq!(a.fetch_add(5, Ordering::SeqCst).unwrap(), 0);
/// assert_eq!(a.load(Ordering::SeqCst), 5);
/// assert!(s.get_atomic_ref::<AtomicU32>(2).is_err()); // misaligned
/// ```
#[derive(Clone, Debug)]
pub struct AtomicRef<'a, A, S = ()> {
    slice: VolatileSlice<'a, S>,
    phantom: PhantomData<A>,
}

impl<'a, A: AtomicInteger, S: BitmapSlice> AtomicRef<'a, A, S> {
    /// An atomic ref over a slice of exactly `size_of::<A>()` bytes; fails if misaligned.
    pub(crate) fn from_slice(slice: VolatileSlice<'a, S>) -> Result<Self> {
        debug_assert_eq!(slice.len(), size_of::<A>());
        check_alignment::<A>(slice.as_ptr())?;
        Ok(AtomicRef { slice, phantom: PhantomData })
    }

    #[inline(always)]
    fn atomic(&self) -> &A {
        // SAFETY: the slice holds `size_of::<A>()` bytes aligned for `A` (checked in
        // `from_slice`), valid for reads for 'a (the slice's contract). `A` is one of std's
        // atomic integers (`AtomicInteger` is sealed): an `UnsafeCell` of an integer, valid for
        // any bit pattern, whose shared references are how Rust names memory that others change
        // concurrently. Callers write through it only after `check_writable`, and on read-only
        // memory only `Relaxed` loads are issued through it (`load`).
        unsafe { &*self.slice.as_ptr().cast::<A>() }
    }

    #[inline(always)]
    fn write<R>(&self, op: impl FnOnce(&A) -> R) -> Result<R> {
        self.slice.check_writable(0, size_of::<A>())?;
        let r = op(self.atomic());
        self.slice.bitmap().mark_dirty(0, size_of::<A>());
        Ok(r)
    }

    /// The untracked atomic itself, e.g. to hand to code that wants a `&AtomicU32`.
    ///
    /// Writes through it are not marked dirty: mark by hand with [`VolatileSlice::mark_dirty`].
    ///
    /// # Safety
    /// If the memory is read-only ([`is_writable`](Self::is_writable) is false), the caller
    /// may only issue `Relaxed` loads through the reference: any other atomic operation on
    /// read-only memory is undefined behaviour (a write faults; a failing compare-exchange or an
    /// `Acquire` load may be a write to the CPU).
    pub unsafe fn as_atomic(&self) -> &A {
        self.atomic()
    }

    /// Whether the memory may be written (false for read-only regions).
    #[inline]
    pub fn is_writable(&self) -> bool {
        self.slice.is_writable()
    }

    /// `load`. Panics if `order` is `Release` or `AcqRel`, as std's `load` does.
    ///
    /// On read-only memory this is a `Relaxed` load followed by a fence of `order` (a
    /// `Relaxed` load is the only atomic access std allows on read-only memory; the fence gives
    /// the load `Acquire` semantics, and takes part in the `SeqCst` order for `SeqCst`).
    #[inline]
    pub fn load(&self, order: Ordering) -> A::V {
        if self.slice.is_writable() {
            return self.atomic().load(order);
        }
        let v = self.atomic().load(Ordering::Relaxed);
        match order {
            Ordering::Relaxed => {}
            Ordering::Release | Ordering::AcqRel => panic!("there is no such thing as a {order:?} load"),
            order => std::sync::atomic::fence(order),
        }
        v
    }

    /// `store`, then mark dirty.
    #[inline]
    pub fn store(&self, val: A::V, order: Ordering) -> Result<()> {
        self.write(|a| a.store(val, order))
    }

    /// `swap`, then mark dirty.
    pub fn swap(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.swap(val, order))
    }

    /// `compare_exchange`; marks dirty only if the exchange happened. The outer `Result` is the
    /// access (read-only memory), the inner one the exchange.
    pub fn compare_exchange(
        &self,
        current: A::V,
        new: A::V,
        success: Ordering,
        failure: Ordering,
    ) -> Result<std::result::Result<A::V, A::V>> {
        self.slice.check_writable(0, size_of::<A>())?;
        let r = self.atomic().compare_exchange(current, new, success, failure);
        if r.is_ok() {
            self.slice.bitmap().mark_dirty(0, size_of::<A>());
        }
        Ok(r)
    }

    /// `fetch_add` (wrapping), then mark dirty.
    pub fn fetch_add(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.fetch_add(val, order))
    }

    /// `fetch_sub` (wrapping), then mark dirty.
    pub fn fetch_sub(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.fetch_sub(val, order))
    }

    /// `fetch_and`, then mark dirty.
    pub fn fetch_and(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.fetch_and(val, order))
    }

    /// `fetch_or`, then mark dirty.
    pub fn fetch_or(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.fetch_or(val, order))
    }

    /// `fetch_xor`, then mark dirty.
    pub fn fetch_xor(&self, val: A::V, order: Ordering) -> Result<A::V> {
        self.write(|a| a.fetch_xor(val, order))
    }
}
