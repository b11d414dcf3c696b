//! Volatile access to memory that another party (a guest, a device, another process) may change
//! at any time.
//!
//! Rust references promise that memory does not change behind them, which guest memory breaks.
//! So guestmem never creates a `&`/`&mut` to guest memory: it hands out
//! [`VolatileSlice`]s (a pointer, a length, a dirty-bitmap slice and whether writes are
//! allowed), typed views ([`VolatileRef`], [`VolatileArrayRef`], [`AtomicRef`]), and copies
//! bytes in and out with volatile accesses or raw copies.
//!
//! Every access is bounds checked and returns [`VolatileError`] rather than panicking. A write
//! through a slice of read-only memory returns [`VolatileError::ReadOnly`] instead of faulting.
//! Every successful write marks the bytes it wrote in the slice's bitmap, after the copy.
//!
//! # The memory model
//!
//! Two kinds of memory sit behind a slice, with two contracts:
//!
//! - **Shared memory** (guest RAM: the mappings of [`mmap`](crate::mmap), or memory a caller
//!   vouches for with the unsafe [`VolatileSlice::new`]/[`VolatileSlice::with_bitmap`]) is memory
//!   that a guest, a device or another process changes at any time, outside the Rust abstract
//!   machine. Its slices are `Send + Sync` (as far as their bitmap is) and may be used from any
//!   number of threads at once; plain reads and writes of it race with the other parties by
//!   design, as on MMIO: they are volatile accesses or raw copies that never assume the bytes
//!   stay put, and aligned 1/2/4/8-byte accesses are single accesses that cannot tear.
//!   Ordering between threads is the caller's business, through [`AtomicRef`]s and
//!   `load`/`store`.
//! - **A Rust buffer** (`VolatileSlice::from(&mut [u8])`) is memory the Rust abstract machine
//!   owns, where two unsynchronized accesses of which one writes are a data race and undefined
//!   behaviour. Its slices carry the [`HostBuffer`] marker, which is neither `Send` nor `Sync`:
//!   the copies of such a slice all stay on the thread that borrowed the buffer, so they can
//!   never race.
//!
//! ```compile_fail,E0277
//! use guestmem::{Bytes, VolatileSlice};
//! let mut buf = [0u8; 8];
//! let slice = VolatileSlice::from(&mut buf[..]);
//! std::thread::scope(|s| {
//!     s.spawn(move || slice.write_obj(1u8, 0).unwrap()); // a second thread: refused
//!     slice.write_obj(2u8, 0).unwrap();
//! });
//! ```
//!
//! ```
//! use guestmem::{Bytes, VolatileMemory, VolatileSlice};
//!
//! let mut backing = vec![0u8; 64];
//! let slice = VolatileSlice::from(&mut backing[..]);
//! slice.write_obj(0x1234_5678u32, 8).unwrap();
//! assert_eq!(slice.read_obj::<u32>(8).unwrap(), 0x1234_5678);
//! let sub = slice.subslice(8, 4).unwrap();
//! assert_eq!(sub.read_obj::<u16>(2).unwrap(), 0x1234);
//! assert!(slice.write_obj(1u64, 60).is_err()); // runs past the end
//! ```

pub(crate) mod copy;
pub mod io;
mod refs;

pub use io::{ReadVolatile, ReadVolatileAt, WriteVolatile, WriteVolatileAt};
pub use refs::{AtomicRef, VolatileArrayRef, VolatileRef};

use crate::bitmap::BitmapSlice;
use crate::pod::{AtomicInteger, ByteValued};
use std::marker::PhantomData;
use std::mem::{align_of, size_of};

/// Errors of volatile access. Offsets are relative to the slice or memory accessed.
#[derive(Debug, thiserror::Error)]
pub enum VolatileError {
    /// The access does not fit: `offset + len` is past `size`.
    #[error("access of {len} bytes at offset {offset:#x} runs past the end of {size} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the memory accessed.
        size: usize,
    },
    /// `offset + len` does not fit in `usize`.
    #[error("access of {len} bytes at offset {offset:#x} overflows the address space")]
    Overflow {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// An array of `count` elements of `elem_size` bytes is larger than `usize`.
    #[error("{count} elements of {elem_size} bytes overflow the address space")]
    TooBig {
        /// Number of elements asked for.
        count: usize,
        /// Size of one element.
        elem_size: usize,
    },
    /// An atomic access at a host address not aligned to the access size.
    #[error("host address {addr:#x} is not aligned to {align} bytes for an atomic access")]
    Misaligned {
        /// The host address.
        addr: usize,
        /// The alignment the access needs.
        align: usize,
    },
    /// A write to read-only memory.
    #[error("write of {len} bytes at offset {offset:#x} to read-only memory")]
    ReadOnly {
        /// Offset of the write.
        offset: usize,
        /// Length of the write.
        len: usize,
    },
    /// A transfer that had to move `expected` bytes stopped after `completed` (end of file,
    /// a peer that closed, a writer that accepts no more).
    #[error("transfer stopped after {completed} of {expected} bytes")]
    PartialBuffer {
        /// Bytes the call had to move.
        expected: usize,
        /// Bytes it moved.
        completed: usize,
    },
    /// An I/O call failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A result of volatile access.
pub type Result<T> = std::result::Result<T, VolatileError>;

/// `offset + len`, checked against overflow and against `size`.
#[inline(always)]
pub(crate) fn check_range(offset: usize, len: usize, size: usize) -> Result<usize> {
    // `let else`, not `ok_or`: an eagerly built error is dropped through a call on every access.
    let Some(end) = offset.checked_add(len) else {
        return Err(VolatileError::Overflow { offset, len });
    };
    if end > size {
        return Err(VolatileError::OutOfBounds { offset, len, size });
    }
    Ok(end)
}

/// Memory that hands out [`VolatileSlice`]s of itself.
///
/// Implementors only give [`len`](Self::len) and [`get_slice`](Self::get_slice); the typed
/// views come from those.
pub trait VolatileMemory {
    /// The bitmap slice that slices of this memory carry.
    type Slice<'a>: BitmapSlice
    where
        Self: 'a;

    /// The size in bytes.
    fn len(&self) -> usize;

    /// Whether the size is 0.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `count` bytes at `offset`, or an error if they do not fit.
    fn get_slice(&self, offset: usize, count: usize) -> Result<VolatileSlice<'_, Self::Slice<'_>>>;

    /// A [`VolatileRef`] to the `T` at `offset` (any alignment).
    fn get_ref<T: ByteValued>(&self, offset: usize) -> Result<VolatileRef<'_, T, Self::Slice<'_>>> {
        Ok(VolatileRef::from_slice(self.get_slice(offset, size_of::<T>())?))
    }

    /// A [`VolatileArrayRef`] to `count` elements of type `T` at `offset`.
    fn get_array_ref<T: ByteValued>(
        &self,
        offset: usize,
        count: usize,
    ) -> Result<VolatileArrayRef<'_, T, Self::Slice<'_>>> {
        let elem_size = size_of::<T>();
        let Some(bytes) = count.checked_mul(elem_size) else {
            return Err(VolatileError::TooBig { count, elem_size });
        };
        Ok(VolatileArrayRef::from_slice(self.get_slice(offset, bytes)?, count))
    }

    /// An [`AtomicRef`] to the atomic integer at `offset`; its host address must be aligned to
    /// the size of `A` ([`VolatileError::Misaligned`] otherwise).
    fn get_atomic_ref<A: AtomicInteger>(&self, offset: usize) -> Result<AtomicRef<'_, A, Self::Slice<'_>>> {
        AtomicRef::from_slice(self.get_slice(offset, size_of::<A>())?)
    }

    /// `base + offset`, checked against overflow and against [`len`](Self::len).
    fn compute_end_offset(&self, base: usize, offset: usize) -> Result<usize> {
        check_range(base, offset, self.len())
    }
}

/// A window of memory that may change at any time: a pointer, a length, a bitmap slice to mark
/// writes in, and whether writes are allowed.
///
/// Cheap to copy and pass around; `Send`/`Sync` when its bitmap slice is (see the
/// [memory model](self#the-memory-model)). All accesses are bounds checked, volatile or raw
/// copies, and never create a `&`/`&mut` to the bytes (the one exception is an
/// [`AtomicRef`] operation, which makes a `&AtomicX` for its own duration: see there).
pub struct VolatileSlice<'a, S = ()> {
    addr: *mut u8,
    len: usize,
    bitmap: S,
    writable: bool,
    phantom: PhantomData<&'a u8>,
}

// SAFETY: a VolatileSlice is a pointer to memory that is shared by design (the constructors'
// contracts say so for every `S` that is Send/Sync; slices of Rust buffers carry `HostBuffer`,
// which is neither); every access is volatile or a raw copy, so sending or sharing the slice
// between threads is as safe as its bitmap.
unsafe impl<S: Send> Send for VolatileSlice<'_, S> {}
// SAFETY: as above.
unsafe impl<S: Sync> Sync for VolatileSlice<'_, S> {}

impl<S: Clone> Clone for VolatileSlice<'_, S> {
    fn clone(&self) -> Self {
        VolatileSlice {
            addr: self.addr,
            len: self.len,
            bitmap: self.bitmap.clone(),
            writable: self.writable,
            phantom: PhantomData,
        }
    }
}

impl<S: Copy> Copy for VolatileSlice<'_, S> {}

impl<S: std::fmt::Debug> std::fmt::Debug for VolatileSlice<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileSlice")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .field("bitmap", &self.bitmap)
            .finish()
    }
}

impl<'a> VolatileSlice<'a, ()> {
    /// A slice over `len` bytes at `addr`, writable, with no dirty tracking.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be valid for volatile reads and writes for all of `'a`, and no
    /// Rust reference to any of it may be used during `'a`. The slice is `Send + Sync` and
    /// `Copy`: the memory must be shared memory in the sense of the
    /// [memory model](self#the-memory-model) (a mapping shared with a guest or another
    /// process), not a Rust allocation that several threads would then race on; for a Rust
    /// buffer use `VolatileSlice::from(&mut [u8])`.
    pub unsafe fn new(addr: *mut u8, len: usize) -> Self {
        // SAFETY: the caller's contract is the one `with_bitmap` needs, with writes allowed.
        unsafe { Self::with_bitmap(addr, len, (), true) }
    }
}

/// The bitmap slice of a [`VolatileSlice`] borrowed from a Rust buffer
/// (`VolatileSlice::from(&mut [u8])`): it tracks nothing, and it is neither `Send` nor `Sync`,
/// so every copy of the slice stays on the thread that borrowed the buffer (see the
/// [memory model](self#the-memory-model)).
///
/// ```
/// use guestmem::volatile::HostBuffer;
/// use guestmem::{Bytes, VolatileSlice};
/// let mut buf = [0u8; 4];
/// let slice: VolatileSlice<'_, HostBuffer> = VolatileSlice::from(&mut buf[..]);
/// slice.write_obj(7u16, 2).unwrap();
/// assert_eq!(buf, [0, 0, 7, 0]);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct HostBuffer {
    /// A raw pointer is neither `Send` nor `Sync`; this makes `HostBuffer` neither.
    _not_shared: PhantomData<*const ()>,
}

impl BitmapSlice for HostBuffer {
    #[inline(always)]
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    #[inline(always)]
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    #[inline(always)]
    fn slice_at(&self, _offset: usize) -> Self {
        *self
    }
}

impl<'a> From<&'a mut [u8]> for VolatileSlice<'a, HostBuffer> {
    /// A writable, untracked slice over a buffer the slice borrows exclusively; the slice and
    /// its copies stay on this thread ([`HostBuffer`]).
    fn from(buf: &'a mut [u8]) -> Self {
        // SAFETY: `buf` is valid for reads and writes for 'a, and borrowing it mutably for 'a
        // keeps every other reference away from it while the slice lives. The `HostBuffer`
        // marker keeps the slice and its copies on this thread, so they cannot race.
        unsafe { Self::with_bitmap(buf.as_mut_ptr(), buf.len(), HostBuffer::default(), true) }
    }
}

impl<'a, S: BitmapSlice> VolatileSlice<'a, S> {
    /// A slice over `len` bytes at `addr` that marks writes in `bitmap` and, when `writable`
    /// is false, refuses them with [`VolatileError::ReadOnly`].
    ///
    /// # Safety
    /// `[addr, addr + len)` must be valid for volatile reads for all of `'a` (and for writes
    /// too when `writable`), and no Rust reference to any of it may be used during `'a`. If
    /// `S` is `Send` or `Sync`, the slice can be used from several threads at once: the memory
    /// must then be shared memory in the sense of the [memory model](self#the-memory-model).
    pub unsafe fn with_bitmap(addr: *mut u8, len: usize, bitmap: S, writable: bool) -> Self {
        VolatileSlice { addr, len, bitmap, writable, phantom: PhantomData }
    }

    /// The host address of the first byte.
    ///
    /// Writes through this pointer are not tracked: mark them with
    /// [`mark_dirty`](Self::mark_dirty).
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// The length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is 0.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    #[inline]
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The bitmap slice writes are marked in.
    #[inline]
    pub fn bitmap(&self) -> &S {
        &self.bitmap
    }

    /// Marks `[offset, offset + len)` dirty by hand, for writes made through
    /// [`as_ptr`](Self::as_ptr) or by a device. Fails if the range is out of bounds.
    pub fn mark_dirty(&self, offset: usize, len: usize) -> Result<()> {
        check_range(offset, len, self.len)?;
        self.bitmap.mark_dirty(offset, len);
        Ok(())
    }

    /// An `iovec` over the slice, for vectored system calls.
    ///
    /// Writes the kernel makes through it (a `readv`) are not tracked: use
    /// [`ReadVolatile::read_vectored_volatile`], or [`mark_dirty`](Self::mark_dirty).
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.addr.cast(), iov_len: self.len }
    }

    /// Fails with [`VolatileError::ReadOnly`] if writes to `[offset, offset + len)` are not
    /// allowed (a write of nothing always is).
    #[inline(always)]
    pub(crate) fn check_writable(&self, offset: usize, len: usize) -> Result<()> {
        if self.writable || len == 0 {
            Ok(())
        } else {
            Err(VolatileError::ReadOnly { offset, len })
        }
    }

    /// The `count` bytes at `offset`.
    #[inline]
    pub fn subslice(&self, offset: usize, count: usize) -> Result<Self> {
        check_range(offset, count, self.len)?;
        // SAFETY: `[offset, offset + count)` lies inside this slice (checked), so the
        // sub-range inherits this slice's validity for 'a and its write permission.
        Ok(unsafe { self.subslice_unchecked(offset, count) })
    }

    /// The sub-slice at `offset` with no check.
    ///
    /// # Safety
    /// `offset + count <= self.len()`.
    #[inline(always)]
    pub(crate) unsafe fn subslice_unchecked(&self, offset: usize, count: usize) -> Self {
        VolatileSlice {
            // SAFETY: `offset <= len`, so the result stays inside (or one past) the slice.
            addr: unsafe { self.addr.add(offset) },
            len: count,
            bitmap: self.bitmap.slice_at(offset),
            writable: self.writable,
            phantom: PhantomData,
        }
    }

    /// A [`VolatileRef`] to the `T` at `offset`, living as long as the memory (not just this
    /// slice handle), so `mem.get_slice(..)?.get_ref(0)?` works.
    pub fn get_ref<T: ByteValued>(&self, offset: usize) -> Result<VolatileRef<'a, T, S>> {
        Ok(VolatileRef::from_slice(self.subslice(offset, size_of::<T>())?))
    }

    /// A [`VolatileArrayRef`] to `count` `T`s at `offset`, living as long as the memory.
    pub fn get_array_ref<T: ByteValued>(
        &self,
        offset: usize,
        count: usize,
    ) -> Result<VolatileArrayRef<'a, T, S>> {
        let elem_size = size_of::<T>();
        let Some(bytes) = count.checked_mul(elem_size) else {
            return Err(VolatileError::TooBig { count, elem_size });
        };
        Ok(VolatileArrayRef::from_slice(self.subslice(offset, bytes)?, count))
    }

    /// An [`AtomicRef`] to the atomic at `offset` (aligned to its size), living as long as
    /// the memory.
    pub fn get_atomic_ref<A: AtomicInteger>(&self, offset: usize) -> Result<AtomicRef<'a, A, S>> {
        AtomicRef::from_slice(self.subslice(offset, size_of::<A>())?)
    }

    /// Everything from `count` bytes in to the end.
    pub fn offset(&self, count: usize) -> Result<Self> {
        if count > self.len {
            return Err(VolatileError::OutOfBounds { offset: count, len: 0, size: self.len });
        }
        self.subslice(count, self.len - count)
    }

    /// The slice split in two at `mid`.
    pub fn split_at(&self, mid: usize) -> Result<(Self, Self)> {
        let end = self.offset(mid)?;
        // SAFETY: `mid <= len`, checked by `offset`.
        let start = unsafe { self.subslice_unchecked(0, mid) };
        Ok((start, end))
    }

    /// Copies as many whole `T`s as fit in both into `buf`; returns the count of `T`s copied.
    ///
    /// One bulk copy, not a loop per element: individual elements are not guaranteed untorn
    /// against a concurrent writer (use [`VolatileArrayRef::load`] for that).
    pub fn copy_to<T: ByteValued>(&self, buf: &mut [T]) -> usize {
        let Some(count) = self.len.checked_div(size_of::<T>()) else { return 0 };
        let count = count.min(buf.len());
        // SAFETY: `count * size_of::<T>()` bytes fit in this slice (count <= len / size) and
        // in `buf` (count <= buf.len()); `buf` is host memory we borrow mutably, and `T:
        // FromBytes` accepts any bytes.
        unsafe { copy::copy_nonoverlapping(self.addr, buf.as_mut_ptr().cast(), count * size_of::<T>()) };
        count
    }

    /// Copies as many whole `T`s of `buf` as fit into the slice; returns the count copied.
    pub fn copy_from<T: ByteValued>(&self, buf: &[T]) -> Result<usize> {
        let Some(count) = self.len.checked_div(size_of::<T>()) else { return Ok(0) };
        let count = count.min(buf.len());
        let bytes = count * size_of::<T>();
        self.check_writable(0, bytes)?;
        // SAFETY: `bytes` fit in the slice and in `buf` (as in `copy_to`); the slice is
        // writable (checked); `T: IntoBytes` has every byte initialized.
        unsafe { copy::copy_nonoverlapping(buf.as_ptr().cast(), self.addr, bytes) };
        self.bitmap.mark_dirty(0, bytes);
        Ok(count)
    }

    /// Copies as many bytes as fit in both into `dst` (the two may overlap); returns the count.
    pub fn copy_to_volatile_slice<T: BitmapSlice>(&self, dst: &VolatileSlice<'_, T>) -> Result<usize> {
        let count = self.len.min(dst.len);
        dst.check_writable(0, count)?;
        // SAFETY: `count` bytes are valid for reads here and for writes in `dst` (a writable
        // slice, checked); `copy_overlapping` allows the two to overlap.
        unsafe { copy::copy_overlapping(self.addr, dst.addr, count) };
        dst.bitmap.mark_dirty(0, count);
        Ok(count)
    }

    /// Copies as many bytes of `src` as fit into this slice; returns the count.
    pub fn copy_from_volatile_slice<T: BitmapSlice>(&self, src: &VolatileSlice<'_, T>) -> Result<usize> {
        src.copy_to_volatile_slice(self)
    }

    /// Sets every byte to `value` (e.g. 0 to clear).
    pub fn fill(&self, value: u8) -> Result<()> {
        self.check_writable(0, self.len)?;
        // SAFETY: the whole slice is valid for writes (writable, checked).
        unsafe { copy::fill(self.addr, value, self.len) };
        self.bitmap.mark_dirty(0, self.len);
        Ok(())
    }

    /// Host address of `offset` after checking that `len` bytes fit there.
    #[inline(always)]
    pub(crate) fn host_addr(&self, offset: usize, len: usize) -> Result<*mut u8> {
        check_range(offset, len, self.len)?;
        // SAFETY: `offset <= len` (checked above), so the pointer stays inside the slice.
        Ok(unsafe { self.addr.add(offset) })
    }

    /// Reads into `buf` from `offset`, `count` bytes, already bounds checked.
    ///
    /// # Safety
    /// `offset + count <= self.len` and `count <= buf.len()`.
    #[inline(always)]
    pub(crate) unsafe fn read_unchecked(&self, buf: &mut [u8], offset: usize, count: usize) {
        // SAFETY: the caller guarantees both ranges; `buf` is a host buffer we borrow mutably.
        unsafe { copy::copy_nonoverlapping(self.addr.add(offset), buf.as_mut_ptr(), count) }
    }

    /// Writes `count` bytes of `buf` at `offset`, already bounds checked, and marks them.
    ///
    /// # Safety
    /// `offset + count <= self.len` and `count <= buf.len()`.
    #[inline(always)]
    pub(crate) unsafe fn write_unchecked(&self, buf: &[u8], offset: usize, count: usize) -> Result<()> {
        self.check_writable(offset, count)?;
        // SAFETY: the caller guarantees both ranges; the slice is writable (checked).
        unsafe { copy::copy_nonoverlapping(buf.as_ptr(), self.addr.add(offset), count) };
        self.bitmap.mark_dirty(offset, count);
        Ok(())
    }

    /// The part of the slice `[addr, addr + count)` clipped to the end, for the "as much as
    /// fits" calls. Nothing fitting is out of bounds: a `count > 0` at or past the end (so a
    /// loop that writes until an error ends), a `count == 0` past the end.
    pub(crate) fn clip(&self, addr: usize, count: usize) -> Result<Self> {
        if addr > self.len || (addr == self.len && count != 0) {
            return Err(VolatileError::OutOfBounds { offset: addr, len: count, size: self.len });
        }
        let count = count.min(self.len - addr);
        // SAFETY: `addr + count <= len` by construction.
        Ok(unsafe { self.subslice_unchecked(addr, count) })
    }
}

impl<S: BitmapSlice> VolatileMemory for VolatileSlice<'_, S> {
    type Slice<'b>
        = S
    where
        Self: 'b;

    fn len(&self) -> usize {
        self.len
    }

    fn get_slice(&self, offset: usize, count: usize) -> Result<VolatileSlice<'_, S>> {
        self.subslice(offset, count)
    }
}

/// Fails with [`VolatileError::Misaligned`] unless `addr` is aligned for `T`.
#[inline(always)]
pub(crate) fn check_alignment<T>(addr: *const u8) -> Result<()> {
    let align = align_of::<T>();
    if copy::is_aligned(addr as usize, align) {
        Ok(())
    } else {
        Err(VolatileError::Misaligned { addr: addr as usize, align })
    }
}

#[cfg(test)]
mod tests;
