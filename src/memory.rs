//! Guest memory as a whole: the [`GuestMemory`] trait, [`Bytes<GuestAddress>`] for every
//! guest memory, and [`GuestRegionCollection`], a set of regions behind a flat translation
//! table: [`GuestMemoryMmap`] for guestmem's [`GuestRegionMmap`]s, or a VMM's own region type
//! around them ([`AsGuestRegionMmap`]).
//!
//! A guest address enters here, is translated to (region, offset) by a branch-free binary
//! search over a dense array of region starts, and becomes a [`VolatileSlice`] of that region.
//! Accesses that cross region boundaries are split across regions; an access that runs into a
//! hole, past the end, or into a read-only region is refused before any byte is written.
//!
//! ```
//! use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)]).unwrap();
//! // An 8-byte value straddling the two regions.
//! mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0xfffc)).unwrap();
//! assert_eq!(mem.read_obj::<u64>(GuestAddress(0xfffc)).unwrap(), 0x1122_3344_5566_7788);
//! assert!(mem.read_obj::<u8>(GuestAddress(0x20000)).is_err());
//! assert_eq!(mem.num_regions(), 2);
//! ```

use std::mem::size_of;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::address::{Address, GuestAddress, GuestUsize, MemoryRegionAddress};
use crate::bitmap::{Bitmap, NewBitmap};
use crate::bytes::{AtomicAccess, ByteValued, Bytes};
use crate::mmap::{Backing, FileOffset, MmapRegionBuilder};
pub use crate::region::GuestMemoryError;
use crate::region::{GuestMemoryRegion, GuestRegionMmap, BS};
use crate::volatile::{ReadVolatile, VolatileError, VolatileSlice, WriteVolatile};

/// A result of guest memory access.
pub type Result<T> = std::result::Result<T, GuestMemoryError>;

/// The slice type a guest memory `M` hands out.
pub type GuestSlice<'a, M> = VolatileSlice<'a, BS<'a, <<M as GuestMemory>::R as GuestMemoryRegion>::B>>;

/// Guest-physical memory made of non-overlapping regions.
///
/// Implementors give [`num_regions`](Self::num_regions), [`iter`](Self::iter) and
/// [`to_region_addr`](Self::to_region_addr); everything else, including
/// [`Bytes<GuestAddress>`], follows. Implementations with a faster translation override
/// [`get_slice`](Self::get_slice), which every small access goes through.
pub trait GuestMemory {
    /// The region type.
    type R: GuestMemoryRegion;

    /// How many regions there are.
    fn num_regions(&self) -> usize;

    /// The regions, in ascending guest address order.
    fn iter(&self) -> impl Iterator<Item = &Self::R>;

    /// The region holding `addr` and the offset of `addr` in it.
    fn to_region_addr(&self, addr: GuestAddress) -> Option<(&Self::R, MemoryRegionAddress)>;

    /// The region holding `addr`.
    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        self.to_region_addr(addr).map(|(r, _)| r)
    }

    /// Whether `addr` is backed by memory.
    ///
    /// ```
    /// use guestmem::{GuestAddress, GuestMemory, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
    /// assert!(mem.address_in_range(GuestAddress(0x1fff)) && !mem.address_in_range(GuestAddress(0x2000)));
    /// assert_eq!(mem.check_address(GuestAddress(0x1000)), Some(GuestAddress(0x1000)));
    /// assert_eq!(mem.checked_offset(GuestAddress(0x1000), 0xfff), Some(GuestAddress(0x1fff)));
    /// assert_eq!(mem.checked_offset(GuestAddress(0x1000), 0x1000), None);
    /// assert_eq!(mem.checked_offset(GuestAddress(u64::MAX), 1), None);
    /// ```
    fn address_in_range(&self, addr: GuestAddress) -> bool {
        self.to_region_addr(addr).is_some()
    }

    /// `addr` if it is backed by memory.
    fn check_address(&self, addr: GuestAddress) -> Option<GuestAddress> {
        self.address_in_range(addr).then_some(addr)
    }

    /// `base + offset` if that is backed by memory (`None` if it is not, or wraps past
    /// 2^64); `base` itself need not be.
    fn checked_offset(&self, base: GuestAddress, offset: usize) -> Option<GuestAddress> {
        base.checked_add(offset as u64).and_then(|a| self.check_address(a))
    }

    /// Calls `f(done, len, offset, region)` for each piece of `[addr, addr + count)` that lies
    /// in one region, in order (`done`: bytes handled before the piece; `len`: the piece's
    /// length; `offset`: where it starts in `region`), and returns the bytes handled:
    /// vm-memory's `try_access` (deprecated there for `get_slices`, here too the better tool).
    ///
    /// `f` returns how many bytes of the piece it handled: all of them goes on to the next
    /// piece, fewer goes on right after them, 0 stops; returning more than `len` is an error
    /// ([`GuestMemoryError::InvalidRegionOffset`], where vm-memory goes on as long as the total
    /// stays within `count`), as is any error `f` returns. The walk stops at a hole, returning
    /// what was handled; a hole at `addr` itself is [`GuestMemoryError::InvalidGuestAddress`].
    /// A range that would go past 2^64 stops there with [`GuestMemoryError::Overflow`]
    /// (vm-memory goes on at address 0). `count == 0` calls nothing and returns `Ok(0)`
    /// wherever `addr` is (an empty range, see [`Bytes`]' bounds).
    ///
    /// ```
    /// use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
    /// let mut pieces = Vec::new();
    /// let n = mem
    ///     .try_access(0x100, GuestAddress(0xf80), |done, len, offset, region| {
    ///         pieces.push((done, len, offset.0, region.start_addr().0));
    ///         Ok(len)
    ///     })
    ///     .unwrap();
    /// assert_eq!((n, pieces), (0x100, vec![(0, 0x80, 0xf80, 0), (0x80, 0x80, 0, 0x1000)]));
    /// assert_eq!(mem.try_access(0x100, GuestAddress(0x1f80), |_, len, _, _| Ok(len)).unwrap(), 0x80);
    /// ```
    fn try_access<F>(&self, count: usize, addr: GuestAddress, mut f: F) -> Result<usize>
    where
        F: FnMut(usize, usize, MemoryRegionAddress, &Self::R) -> Result<usize>,
    {
        let mut done = 0usize;
        let mut at = addr;
        while done < count {
            let Some((region, offset)) = self.to_region_addr(at) else {
                if done == 0 {
                    return Err(GuestMemoryError::InvalidGuestAddress(addr));
                }
                break;
            };
            let in_region = region.len().saturating_sub(offset.0);
            if in_region == 0 {
                break;
            }
            let len = (in_region.min((count - done) as u64)) as usize;
            let n = f(done, len, offset, region)?;
            if n > len {
                return Err(GuestMemoryError::InvalidRegionOffset {
                    base: region.start_addr(),
                    offset,
                    len: n,
                    size: region.len(),
                });
            }
            if n == 0 {
                break;
            }
            done += n;
            match at.checked_add(n as u64) {
                Some(next) => at = next,
                None if done < count => return Err(GuestMemoryError::Overflow { addr, len: count }),
                None => break,
            }
        }
        Ok(done)
    }

    /// The highest guest address backed by memory (`GuestAddress(0)` when there is none).
    fn last_addr(&self) -> GuestAddress {
        self.iter().map(GuestMemoryRegion::last_addr).max().unwrap_or_default()
    }

    /// Whether every byte of `[base, base + len)` is backed by memory. An empty range always
    /// is, wherever it starts (as in vm-memory; see [`Bytes`]' bounds).
    fn check_range(&self, base: GuestAddress, len: usize) -> bool {
        self.get_slices(base, len).all(|s| s.is_ok())
    }

    /// The `count` bytes at `addr` as one slice; they must lie in one region
    /// ([`GuestMemoryError::NotContiguous`] otherwise).
    #[inline]
    fn get_slice(&self, addr: GuestAddress, count: usize) -> Result<GuestSlice<'_, Self>> {
        let Some((region, offset)) = self.to_region_addr(addr) else {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        };
        // Saturating: an implementation may hand back an offset at or past its region's end
        // (or a region of length 0); that is an invalid address, never an underflow.
        let available = region.len().saturating_sub(offset.0);
        if available == 0 {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        }
        if count as u64 > available {
            return Err(GuestMemoryError::NotContiguous { addr, len: count });
        }
        region.get_slice(offset, count)
    }

    /// The `count` bytes at `addr` as consecutive slices, one per region crossed. Yields an
    /// error (then ends) where the range leaves guest memory.
    fn get_slices(&self, addr: GuestAddress, count: usize) -> GuestMemorySlices<'_, Self> {
        GuestMemorySlices {
            mem: self,
            addr,
            left: count,
            done: count == 0,
            wrapped: false,
            start: addr,
            total: count,
        }
    }

    /// The host address of `addr`. Writes through it are not tracked: mark them with
    /// [`Bitmap::mark_dirty`] on the region's bitmap.
    fn get_host_address(&self, addr: GuestAddress) -> Result<*mut u8> {
        let Some((region, offset)) = self.to_region_addr(addr) else {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        };
        region.get_host_address(offset)
    }

    /// Checks that the whole of `[addr, addr + len)` is backed by memory and, for a write,
    /// writable, before anything is touched. An empty range passes wherever it starts.
    fn check_access(&self, addr: GuestAddress, len: usize, write: bool) -> Result<()> {
        for s in self.get_slices(addr, len) {
            let s = s?;
            if write && !s.is_writable() {
                return Err(GuestMemoryError::ReadOnly { addr, len });
            }
        }
        Ok(())
    }
}

/// The slices of a guest range, one per region it crosses: see [`GuestMemory::get_slices`].
#[derive(Debug)]
pub struct GuestMemorySlices<'a, M: ?Sized> {
    mem: &'a M,
    addr: GuestAddress,
    left: usize,
    done: bool,
    wrapped: bool,
    start: GuestAddress,
    total: usize,
}

impl<'a, M: GuestMemory + ?Sized> Iterator for GuestMemorySlices<'a, M> {
    type Item = Result<GuestSlice<'a, M>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.wrapped {
            // The last region ended at the top of the address space with bytes left.
            self.done = true;
            return Some(Err(GuestMemoryError::Overflow { addr: self.start, len: self.total }));
        }
        let Some((region, offset)) = self.mem.to_region_addr(self.addr) else {
            self.done = true;
            return Some(Err(if self.addr == self.start {
                GuestMemoryError::InvalidGuestAddress(self.addr)
            } else {
                GuestMemoryError::InvalidRange { addr: self.start, len: self.total }
            }));
        };
        let in_region = region.len().saturating_sub(offset.0);
        if in_region == 0 {
            // An implementation whose translation lands on a region's end (or an empty one).
            self.done = true;
            return Some(Err(GuestMemoryError::InvalidRange { addr: self.start, len: self.total }));
        }
        let n = (self.left as u64).min(in_region) as usize;
        let slice = region.get_slice(offset, n);
        self.left -= n;
        if self.left == 0 || slice.is_err() {
            self.done = true;
        } else {
            match self.addr.checked_add(n as u64) {
                Some(next) => self.addr = next,
                None => self.wrapped = true,
            }
        }
        Some(slice)
    }
}

impl<M: GuestMemory + ?Sized> Bytes<GuestAddress> for M {
    type E = GuestMemoryError;

    /// Writes as much of `buf` as guest memory holds contiguously from `addr`, stopping at a
    /// hole or a read-only region; fails if nothing could be written (`addr` in no region,
    /// or read-only). An empty `buf` is `Ok(0)` at any address.
    fn write(&self, buf: &[u8], addr: GuestAddress) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        for s in self.get_slices(addr, buf.len()) {
            let s = match s {
                Ok(s) if s.is_writable() => s,
                Ok(_) if done == 0 => return Err(GuestMemoryError::ReadOnly { addr, len: buf.len() }),
                Err(e) if done == 0 => return Err(e),
                _ => break,
            };
            let n = s.write(&buf[done..], 0).map_err(|e| GuestMemoryError::from_volatile(addr, e))?;
            done += n;
        }
        Ok(done)
    }

    /// Reads as much as guest memory holds contiguously from `addr`; fails if nothing could
    /// be read (`addr` in no region). An empty `buf` is `Ok(0)` at any address.
    fn read(&self, buf: &mut [u8], addr: GuestAddress) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        for s in self.get_slices(addr, buf.len()) {
            let s = match s {
                Ok(s) => s,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            };
            done += s.read(&mut buf[done..], 0).map_err(|e| GuestMemoryError::from_volatile(addr, e))?;
        }
        Ok(done)
    }

    #[inline]
    fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<()> {
        if let Ok(s) = self.get_slice(addr, buf.len()) {
            return s.write_slice(buf, 0).map_err(|e| GuestMemoryError::from_volatile(addr, e));
        }
        write_across(self, buf, addr)
    }

    #[inline]
    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<()> {
        if let Ok(s) = self.get_slice(addr, buf.len()) {
            return s.read_slice(buf, 0).map_err(|e| GuestMemoryError::from_volatile(addr, e));
        }
        read_across(self, buf, addr)
    }

    #[inline(always)]
    fn write_obj<T: ByteValued>(&self, val: T, addr: GuestAddress) -> Result<()> {
        match self.get_slice(addr, size_of::<T>()) {
            Ok(s) => s.write_obj(val, 0).map_err(|e| GuestMemoryError::from_volatile(addr, e)),
            Err(_) => write_across(self, val.as_bytes(), addr),
        }
    }

    #[inline(always)]
    fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Result<T> {
        match self.get_slice(addr, size_of::<T>()) {
            Ok(s) => s.read_obj(0).map_err(|e| GuestMemoryError::from_volatile(addr, e)),
            Err(_) => {
                let mut val = T::new_zeroed();
                read_across(self, val.as_mut_bytes(), addr)?;
                Ok(val)
            }
        }
    }

    /// Reads up to `count` bytes from `src` into guest memory at `addr`, region after region,
    /// stopping at a short read or where guest memory ends.
    ///
    /// Stops before read-only memory too (and fails with [`GuestMemoryError::ReadOnly`] if
    /// `addr` itself is read-only), so no byte is taken from `src` that cannot be stored: on a
    /// socket, bytes read are gone.
    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize> {
        transfer_some(self, addr, count, true, |s| src.read_volatile(s))
    }

    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<()> {
        transfer_all(self, addr, count, true, |s| src.read_exact_volatile(s))
    }

    /// Writes up to `count` bytes of guest memory at `addr` to `dst`, region after region,
    /// stopping at a short write or where guest memory ends.
    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize> {
        transfer_some(self, addr, count, false, |s| dst.write_volatile(s))
    }

    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<()> {
        transfer_all(self, addr, count, false, |s| dst.write_all_volatile(s))
    }

    #[inline]
    fn store<T: AtomicAccess>(&self, val: T, addr: GuestAddress, order: Ordering) -> Result<()> {
        self.get_slice(addr, size_of::<T>())?
            .store(val, 0, order)
            .map_err(|e| GuestMemoryError::from_volatile(addr, e))
    }

    #[inline]
    fn load<T: AtomicAccess>(&self, addr: GuestAddress, order: Ordering) -> Result<T> {
        self.get_slice(addr, size_of::<T>())?
            .load(0, order)
            .map_err(|e| GuestMemoryError::from_volatile(addr, e))
    }
}

/// Moves up to `count` bytes between guest memory at `addr` and a file or stream, one region's
/// slice at a time with `step` (which returns the bytes it moved), stopping at a short move or
/// where guest memory ends, and, when `write` (the bytes go into guest memory), before
/// read-only memory. Fails only if nothing could be moved.
fn transfer_some<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    count: usize,
    write: bool,
    mut step: impl FnMut(&GuestSlice<'_, M>) -> std::result::Result<usize, VolatileError>,
) -> Result<usize> {
    let mut done = 0;
    for s in mem.get_slices(addr, count) {
        let s = match s {
            Ok(s) if write && !s.is_writable() => {
                if done == 0 {
                    return Err(GuestMemoryError::ReadOnly { addr, len: count });
                }
                break;
            }
            Ok(s) => s,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        let at = GuestAddress(addr.0.wrapping_add(done as u64));
        let n = step(&s).map_err(|e| GuestMemoryError::from_volatile(at, e))?;
        done += n;
        if n < s.len() {
            break;
        }
    }
    Ok(done)
}

/// Moves exactly `count` bytes between guest memory at `addr` and a file or stream, one
/// region's slice at a time with `step`; the whole range is checked (backed by memory, and
/// writable when `write`) before anything moves.
fn transfer_all<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    count: usize,
    write: bool,
    mut step: impl FnMut(&GuestSlice<'_, M>) -> std::result::Result<(), VolatileError>,
) -> Result<()> {
    mem.check_access(addr, count, write)?;
    let mut done = 0;
    for s in mem.get_slices(addr, count) {
        let s = s?;
        step(&s).map_err(|e| match e {
            VolatileError::PartialBuffer { completed, .. } => {
                GuestMemoryError::PartialBuffer { addr, expected: count, completed: done + completed }
            }
            e => GuestMemoryError::from_volatile(GuestAddress(addr.0.wrapping_add(done as u64)), e),
        })?;
        done += s.len();
    }
    Ok(())
}

/// The cold path of a write that spans regions: check the whole range, then copy.
#[cold]
#[inline(never)]
fn write_across<M: GuestMemory + ?Sized>(mem: &M, buf: &[u8], addr: GuestAddress) -> Result<()> {
    mem.check_access(addr, buf.len(), true)?;
    let mut done = 0;
    for s in mem.get_slices(addr, buf.len()) {
        let s = s?;
        let n = s.len();
        s.write_slice(&buf[done..done + n], 0).map_err(|e| GuestMemoryError::from_volatile(addr, e))?;
        done += n;
    }
    Ok(())
}

/// The cold path of a read that spans regions: check the whole range, then copy.
#[cold]
#[inline(never)]
fn read_across<M: GuestMemory + ?Sized>(mem: &M, buf: &mut [u8], addr: GuestAddress) -> Result<()> {
    mem.check_access(addr, buf.len(), false)?;
    let mut done = 0;
    for s in mem.get_slices(addr, buf.len()) {
        let s = s?;
        let n = s.len();
        s.read_slice(&mut buf[done..done + n], 0).map_err(|e| GuestMemoryError::from_volatile(addr, e))?;
        done += n;
    }
    Ok(())
}

/// One row of the translation table: what a lookup needs, without touching the region.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Offset of the region's last byte (its length - 1: a region may end at 2^64).
    last: u64,
    host: *mut u8,
    /// The region's bitmap (a `*const R::B`, type-erased so the table needs no bound on `R`).
    bitmap: *const u8,
    writable: bool,
}

/// A region type that a [`GuestRegionCollection`] can hold: a [`GuestRegionMmap`] with a VMM's
/// own data beside it (a memslot number, plug state, as Firecracker keeps), which puts the
/// VMM's region type into guestmem's flat translation table.
///
/// The collection translates and accesses memory through the [`GuestRegionMmap`] this returns
/// (its start, length, host address, protection and bitmap), so it never depends on the
/// wrapper for memory safety: implementing this trait is safe. The wrapper's own
/// [`GuestMemoryRegion`] answers must agree with that region's (start, length and the very
/// same bitmap; delegating to it does): the collection checks it when it is built
/// ([`GuestMemoryError::InconsistentRegion`]), so translation and harvests cannot part ways.
///
/// ```
/// use guestmem::memory::{AsGuestRegionMmap, GuestRegionCollection};
/// use guestmem::mmap::{FileOffset, MmapRegionBuilder};
/// use guestmem::region::BS;
/// use guestmem::sys::Protection;
/// use guestmem::{
///     Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion, GuestRegionMmap, GuestUsize,
///     MemoryRegionAddress, VolatileSlice,
/// };
///
/// /// A region with the memslot the VMM gave it.
/// #[derive(Debug)]
/// struct SlotRegion {
///     inner: GuestRegionMmap,
///     slot: u32,
/// }
///
/// impl GuestMemoryRegion for SlotRegion {
///     type B = ();
///     fn len(&self) -> GuestUsize { self.inner.len() }
///     fn start_addr(&self) -> GuestAddress { self.inner.start_addr() }
///     fn protection(&self) -> Protection { self.inner.protection() }
///     fn bitmap(&self) -> &() { self.inner.bitmap() }
///     fn file_offset(&self) -> Option<&FileOffset> { self.inner.file_offset() }
///     fn host_ptr(&self) -> *mut u8 { self.inner.host_ptr() }
///     fn get_slice(&self, at: MemoryRegionAddress, n: usize) -> Result<VolatileSlice<'_, BS<'_, ()>>, GuestMemoryError> {
///         self.inner.get_slice(at, n)
///     }
/// }
///
/// impl AsGuestRegionMmap for SlotRegion {
///     fn guest_region_mmap(&self) -> &GuestRegionMmap {
///         &self.inner
///     }
/// }
///
/// let region = |slot, base| SlotRegion {
///     inner: GuestRegionMmap::build(MmapRegionBuilder::new(0x10000), GuestAddress(base)).unwrap(),
///     slot,
/// };
/// let mem = GuestRegionCollection::from_regions(vec![region(0, 0), region(1, 0x10000)]).unwrap();
/// mem.write_obj(5u64, GuestAddress(0xfffc)).unwrap(); // the fast table, across both regions
/// assert_eq!(mem.find_region(GuestAddress(0x10010)).unwrap().slot, 1);
/// ```
pub trait AsGuestRegionMmap: GuestMemoryRegion {
    /// The guestmem region inside, whose memory and bitmap this region is.
    fn guest_region_mmap(&self) -> &GuestRegionMmap<Self::B>;
}

impl<B: Bitmap> AsGuestRegionMmap for GuestRegionMmap<B> {
    #[inline(always)]
    fn guest_region_mmap(&self) -> &GuestRegionMmap<B> {
        self
    }
}

/// Guest memory made of regions of type `R`: guestmem's [`GuestRegionMmap`]s
/// ([`GuestMemoryMmap`]), or a VMM's own region type around them ([`AsGuestRegionMmap`]), as
/// vm-memory's `GuestRegionCollection<R>`.
///
/// Regions are kept sorted, with a flat translation table beside them: a dense array of
/// region starts for the binary search and, at the same index, each region's length, host
/// address, bitmap and writability, so a lookup never chases an `Arc`. Cheap to clone (the
/// regions are shared); [`insert_region`](Self::insert_region) and
/// [`remove_region`](Self::remove_region) return a new memory and leave `self` as it was, for
/// [`GuestMemoryAtomic`](crate::GuestMemoryAtomic).
#[derive(Debug)]
pub struct GuestRegionCollection<R> {
    regions: Vec<Arc<R>>,
    starts: Box<[u64]>,
    table: Box<[Entry]>,
}

/// Guest memory made of [`GuestRegionMmap`]s: the collection of guestmem's own regions.
pub type GuestMemoryMmap<B = ()> = GuestRegionCollection<GuestRegionMmap<B>>;

// SAFETY: the table's host and bitmap pointers point into the regions' mappings and bitmaps,
// which the `Arc`s in `regions` keep alive; guest memory is shared by design and the bitmaps
// are reached only as `&R::B`, which may cross threads when `R::B` is `Send + Sync`.
unsafe impl<R: AsGuestRegionMmap + Send + Sync> Send for GuestRegionCollection<R> where R::B: Send + Sync {}
// SAFETY: as above; the table is never mutated after construction.
unsafe impl<R: AsGuestRegionMmap + Send + Sync> Sync for GuestRegionCollection<R> where R::B: Send + Sync {}

impl<R> Clone for GuestRegionCollection<R> {
    fn clone(&self) -> Self {
        GuestRegionCollection {
            regions: self.regions.clone(),
            starts: self.starts.clone(),
            table: self.table.clone(),
        }
    }
}

impl<R> Default for GuestRegionCollection<R> {
    fn default() -> Self {
        GuestRegionCollection { regions: Vec::new(), starts: Box::new([]), table: Box::new([]) }
    }
}

impl<R: AsGuestRegionMmap> GuestRegionCollection<R> {
    /// Guest memory with no regions (every access fails until regions are inserted).
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest memory from regions in any order; overlapping regions are refused, naming both.
    pub fn from_regions(regions: Vec<R>) -> Result<Self> {
        Self::from_arc_regions(regions.into_iter().map(Arc::new).collect())
    }

    /// Guest memory from shared regions in any order; overlapping regions, two regions over
    /// the same memory ([`GuestMemoryError::RegionAlias`]) and region types that disagree with
    /// their [`GuestRegionMmap`] ([`GuestMemoryError::InconsistentRegion`]) are refused.
    pub fn from_arc_regions(mut regions: Vec<Arc<R>>) -> Result<Self> {
        for r in &regions {
            check_consistent(&**r)?;
        }
        regions.sort_by_key(|r| r.start_addr());
        for pair in regions.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.start_addr() <= a.last_addr() {
                return Err(GuestMemoryError::RegionOverlap {
                    first_start: a.start_addr(),
                    first_len: a.len(),
                    second_start: b.start_addr(),
                    second_len: b.len(),
                });
            }
        }
        check_host_aliases(&regions)?;
        check_file_aliases(&regions)?;
        let starts = regions.iter().map(|r| r.start_addr().0).collect();
        let table = regions
            .iter()
            .map(|r| {
                let inner = r.guest_region_mmap();
                Entry {
                    last: inner.len() - 1,
                    host: inner.host_ptr(),
                    bitmap: (inner.bitmap() as *const R::B).cast(),
                    writable: inner.protection().is_writable(),
                }
            })
            .collect();
        Ok(GuestRegionCollection { regions, starts, table })
    }

    /// The regions, in ascending guest address order.
    pub fn regions(&self) -> &[Arc<R>] {
        &self.regions
    }

    /// A new memory with `region` added; `self` is unchanged.
    pub fn insert_region(&self, region: Arc<R>) -> Result<Self> {
        let mut regions = self.regions.clone();
        regions.push(region);
        Self::from_arc_regions(regions)
    }

    /// A new memory without the region of `size` bytes that starts at `base`, and that region;
    /// `self` is unchanged. As vm-memory's, the size must be the region's
    /// ([`GuestMemoryError::RegionSizeMismatch`] otherwise, and [`GuestMemoryError::NoRegionAt`]
    /// when no region starts at `base`): a caller that unplugs what it believes is a DIMM of
    /// some size removes nothing else. The region stays mapped until the last `Arc` to it
    /// (and every memory that holds it) is dropped.
    ///
    /// ```
    /// use guestmem::{GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x4000), 0x2000)]).unwrap();
    /// let e = mem.remove_region(GuestAddress(0x4000), 0x1000).unwrap_err();
    /// assert!(matches!(e, GuestMemoryError::RegionSizeMismatch { region_len: 0x2000, .. }));
    /// let (rest, gone) = mem.remove_region(GuestAddress(0x4000), 0x2000).unwrap();
    /// assert_eq!((rest.num_regions(), mem.num_regions()), (1, 2));
    /// assert!(matches!(rest.remove_region(GuestAddress(0x4000), 0x2000), Err(GuestMemoryError::NoRegionAt(_))));
    /// # drop(gone);
    /// ```
    pub fn remove_region(&self, base: GuestAddress, size: GuestUsize) -> Result<(Self, Arc<R>)> {
        let idx = self.starts.binary_search(&base.0).map_err(|_| GuestMemoryError::NoRegionAt(base))?;
        let region_len = self.regions[idx].len();
        if region_len != size {
            return Err(GuestMemoryError::RegionSizeMismatch { base, size, region_len });
        }
        let mut regions = self.regions.clone();
        let removed = regions.remove(idx);
        Ok((Self::from_arc_regions(regions)?, removed))
    }

    /// The index of the region holding `addr` and the offset in it: a branch-free binary
    /// search for the last start not above `addr`, then one bounds check.
    #[inline(always)]
    fn lookup(&self, addr: u64) -> Option<(usize, u64)> {
        let starts = &*self.starts;
        let mut size = starts.len();
        if size == 0 {
            return None;
        }
        let mut base = 0usize;
        while size > 1 {
            let half = size / 2;
            let mid = base + half;
            // SAFETY: `mid < base + size <= starts.len()`: the search window stays in bounds.
            let start = unsafe { *starts.get_unchecked(mid) };
            // A conditional move, not a branch: random guest addresses would make a branch
            // mispredict half the time (LLVM turns plain arithmetic back into one).
            base = std::hint::select_unpredictable(start <= addr, mid, base);
            size -= half;
        }
        // SAFETY: `base < starts.len()` (it only ever takes values of `mid`, or 0 with a
        // non-empty table), and `table` has the same length as `starts`.
        let (start, entry) = unsafe { (*starts.get_unchecked(base), self.table.get_unchecked(base)) };
        let offset = addr.wrapping_sub(start);
        if addr >= start && offset <= entry.last {
            Some((base, offset))
        } else {
            None
        }
    }
}

/// Refuses a region type whose answers differ from its [`GuestRegionMmap`]'s.
fn check_consistent<R: AsGuestRegionMmap>(r: &R) -> Result<()> {
    let inner = r.guest_region_mmap();
    // A bitmap of no size has no bits to part ways on (and its address means nothing).
    let same_bitmap = size_of::<R::B>() == 0 || std::ptr::eq(r.bitmap(), inner.bitmap());
    if r.start_addr() != inner.start_addr() || r.len() != inner.len() || !same_bitmap {
        return Err(GuestMemoryError::InconsistentRegion { base: r.start_addr() });
    }
    Ok(())
}

/// Refuses two regions over the same host memory (one mapping placed twice with
/// `GuestRegionMmap::with_arc`, overlapping views): a page written through one would be
/// harvested, dumped and migrated under one guest address only.
fn check_host_aliases<R: AsGuestRegionMmap>(regions: &[Arc<R>]) -> Result<()> {
    if regions.len() < 2 {
        return Ok(());
    }
    let mut hosts: Vec<(usize, usize, GuestAddress)> = regions
        .iter()
        .map(|r| {
            let inner = r.guest_region_mmap();
            (inner.host_ptr() as usize, inner.size(), inner.start_addr())
        })
        .collect();
    hosts.sort_unstable();
    for pair in hosts.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if (b.0 as u128) < a.0 as u128 + a.1 as u128 {
            return Err(GuestMemoryError::RegionAlias { first_start: a.2, second_start: b.2 });
        }
    }
    Ok(())
}

/// Refuses two regions that map overlapping bytes of the same file: their bitmaps would track
/// the same memory separately, so a harvest of one would miss writes made through the other.
fn check_file_aliases<R: AsGuestRegionMmap>(regions: &[Arc<R>]) -> Result<()> {
    let mut files: Vec<(u64, u64, u64, u64, GuestAddress)> = regions
        .iter()
        .filter_map(|r| {
            let r = r.guest_region_mmap();
            let (dev, ino) = r.mapping().file_id()?;
            let start = r.file_offset()?.start();
            Some((dev, ino, start, r.size() as u64, r.start_addr()))
        })
        .collect();
    if files.len() < 2 {
        return Ok(());
    }
    files.sort_unstable();
    for pair in files.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if (a.0, a.1) == (b.0, b.1) && u128::from(b.2) < u128::from(a.2) + u128::from(a.3) {
            return Err(GuestMemoryError::RegionAlias { first_start: a.4, second_start: b.4 });
        }
    }
    Ok(())
}

impl<B: NewBitmap> GuestMemoryMmap<B> {
    /// Guest memory of private anonymous regions at the given `(start, size)` ranges. A size
    /// that is not a page multiple makes a region of that length over whole pages
    /// ([`GuestRegionMmap::build`]).
    pub fn from_ranges(ranges: &[(GuestAddress, usize)]) -> Result<Self> {
        Self::from_ranges_with_files(ranges.iter().map(|&(start, size)| (start, size, None)))
    }

    /// Guest memory of regions at the given ranges, each backed by a shared mapping of its
    /// file when one is given, or private anonymous memory otherwise.
    pub fn from_ranges_with_files<I>(ranges: I) -> Result<Self>
    where
        I: IntoIterator<Item = (GuestAddress, usize, Option<FileOffset>)>,
    {
        let regions = ranges
            .into_iter()
            .map(|(base, size, file)| {
                let backing = match file {
                    Some(file) => Backing::File { file, shared: true },
                    None => Backing::Anonymous { shared: false },
                };
                GuestRegionMmap::build(MmapRegionBuilder::<B>::new(size).backing(backing), base)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_regions(regions)
    }
}

impl<R: AsGuestRegionMmap> GuestMemory for GuestRegionCollection<R> {
    type R = R;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn iter(&self) -> impl Iterator<Item = &R> {
        self.regions.iter().map(|r| &**r)
    }

    #[inline]
    fn to_region_addr(&self, addr: GuestAddress) -> Option<(&R, MemoryRegionAddress)> {
        let (idx, offset) = self.lookup(addr.0)?;
        // SAFETY: `lookup` returns an index into the table, which has one row per region.
        let region = unsafe { self.regions.get_unchecked(idx) };
        Some((region, MemoryRegionAddress(offset)))
    }

    fn last_addr(&self) -> GuestAddress {
        self.regions.last().map(|r| r.last_addr()).unwrap_or_default()
    }

    #[inline]
    fn address_in_range(&self, addr: GuestAddress) -> bool {
        self.lookup(addr.0).is_some()
    }

    /// Translation from the table alone.
    #[inline]
    fn get_host_address(&self, addr: GuestAddress) -> Result<*mut u8> {
        let Some((idx, offset)) = self.lookup(addr.0) else {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        };
        // SAFETY: `lookup` returns an index into the table.
        let entry = unsafe { self.table.get_unchecked(idx) };
        // `offset <= entry.last`: the address lies in the region's mapping.
        Ok(entry.host.wrapping_add(offset as usize))
    }

    /// The fast path of every small access: translate with the flat table and build the slice
    /// from it, without touching the region.
    #[inline(always)]
    fn get_slice(&self, addr: GuestAddress, count: usize) -> Result<GuestSlice<'_, Self>> {
        let Some((idx, offset)) = self.lookup(addr.0) else {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        };
        // SAFETY: `lookup` returns an index into the table.
        let entry = unsafe { self.table.get_unchecked(idx) };
        if (count as u64).saturating_sub(1) > entry.last - offset {
            return Err(GuestMemoryError::NotContiguous { addr, len: count });
        }
        // SAFETY: `entry.bitmap` is the `&R::B` of the region's `GuestRegionMmap`, taken when
        // the table was built from a region that `self.regions` still holds by `Arc`: the
        // reference it came from borrowed that region, which nothing can change or drop while
        // the `Arc` lives, so the bitmap is still there, for as long as `&self`.
        let bitmap = unsafe { &*entry.bitmap.cast::<R::B>() };
        // SAFETY: `[offset, offset + count)` lies in the region (checked against `last`), which
        // is the start of its mapping; the mapping lives as long as `&self` holds the region's
        // `Arc` (as the bitmap above); it is writable exactly when `entry.writable` says so,
        // which the slice is told; no reference to it is ever made.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                entry.host.add(offset as usize),
                count,
                bitmap.slice_at(offset as usize),
                entry.writable,
            )
        })
    }
}
