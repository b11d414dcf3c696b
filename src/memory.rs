//! Guest memory as a whole: the [`GuestMemory`] trait, [`Bytes<GuestAddress>`] for every
//! guest memory, and [`GuestMemoryMmap`], a set of [`GuestRegionMmap`]s behind a flat
//! translation table.
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

use crate::address::{Address, GuestAddress, MemoryRegionAddress};
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
    writable: bool,
}

/// Guest memory made of [`GuestRegionMmap`]s.
///
/// Regions are kept sorted, with a flat translation table beside them: a dense array of
/// region starts for the binary search and, at the same index, each region's length, host
/// address and writability, so a lookup never chases an `Arc`. Cheap to clone (the regions are
/// shared); [`insert_region`](Self::insert_region) and [`remove_region`](Self::remove_region)
/// return a new memory and leave `self` as it was, for
/// [`GuestMemoryAtomic`](crate::GuestMemoryAtomic).
#[derive(Debug)]
pub struct GuestMemoryMmap<B = ()> {
    regions: Vec<Arc<GuestRegionMmap<B>>>,
    starts: Box<[u64]>,
    table: Box<[Entry]>,
}

// SAFETY: the table's host pointers point into the regions' mappings, which the `Arc`s in
// `regions` keep alive and which are themselves `Send`/`Sync` when `B` is.
unsafe impl<B: Send + Sync> Send for GuestMemoryMmap<B> {}
// SAFETY: as above; the table is never mutated after construction.
unsafe impl<B: Send + Sync> Sync for GuestMemoryMmap<B> {}

impl<B> Clone for GuestMemoryMmap<B> {
    fn clone(&self) -> Self {
        GuestMemoryMmap {
            regions: self.regions.clone(),
            starts: self.starts.clone(),
            table: self.table.clone(),
        }
    }
}

impl<B: Bitmap> Default for GuestMemoryMmap<B> {
    fn default() -> Self {
        GuestMemoryMmap { regions: Vec::new(), starts: Box::new([]), table: Box::new([]) }
    }
}

impl<B: Bitmap> GuestMemoryMmap<B> {
    /// Guest memory with no regions (every access fails until regions are inserted).
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest memory from regions in any order; overlapping regions are refused, naming both.
    pub fn from_regions(regions: Vec<GuestRegionMmap<B>>) -> Result<Self> {
        Self::from_arc_regions(regions.into_iter().map(Arc::new).collect())
    }

    /// Guest memory from shared regions in any order; overlapping regions are refused.
    pub fn from_arc_regions(mut regions: Vec<Arc<GuestRegionMmap<B>>>) -> Result<Self> {
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
        check_file_aliases(&regions)?;
        let starts = regions.iter().map(|r| r.start_addr().0).collect();
        let table = regions
            .iter()
            .map(|r| Entry { last: r.len() - 1, host: r.host_ptr(), writable: r.protection().is_writable() })
            .collect();
        Ok(GuestMemoryMmap { regions, starts, table })
    }

    /// The regions, in ascending guest address order.
    pub fn regions(&self) -> &[Arc<GuestRegionMmap<B>>] {
        &self.regions
    }

    /// A new memory with `region` added; `self` is unchanged.
    pub fn insert_region(&self, region: Arc<GuestRegionMmap<B>>) -> Result<Self> {
        let mut regions = self.regions.clone();
        regions.push(region);
        Self::from_arc_regions(regions)
    }

    /// A new memory without the region that starts at `base`, and that region; `self` is
    /// unchanged. The region stays mapped until the last `Arc` to it (and every memory that
    /// holds it) is dropped.
    pub fn remove_region(&self, base: GuestAddress) -> Result<(Self, Arc<GuestRegionMmap<B>>)> {
        let idx = self.starts.binary_search(&base.0).map_err(|_| GuestMemoryError::NoRegionAt(base))?;
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

/// Refuses two regions that map overlapping bytes of the same file: their bitmaps would track
/// the same memory separately, so a harvest of one would miss writes made through the other.
fn check_file_aliases<B: Bitmap>(regions: &[Arc<GuestRegionMmap<B>>]) -> Result<()> {
    let mut files: Vec<(u64, u64, u64, u64, GuestAddress)> = regions
        .iter()
        .filter_map(|r| {
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
    /// Guest memory of private anonymous regions at the given `(start, size)` ranges.
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

impl<B: Bitmap> GuestMemory for GuestMemoryMmap<B> {
    type R = GuestRegionMmap<B>;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRegionMmap<B>> {
        self.regions.iter().map(|r| &**r)
    }

    #[inline]
    fn to_region_addr(&self, addr: GuestAddress) -> Option<(&GuestRegionMmap<B>, MemoryRegionAddress)> {
        let (idx, offset) = self.lookup(addr.0)?;
        // SAFETY: `lookup` returns an index into the table, which has one row per region.
        let region = unsafe { self.regions.get_unchecked(idx) };
        Some((region, MemoryRegionAddress(offset)))
    }

    fn last_addr(&self) -> GuestAddress {
        self.regions.last().map(|r| r.last_addr()).unwrap_or_default()
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
    /// from it, touching the region only for its bitmap.
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
        // SAFETY: as above, for the region list, which the table mirrors.
        let region = unsafe { self.regions.get_unchecked(idx) };
        // SAFETY: `[offset, offset + count)` lies in the region (checked against `last`), whose
        // mapping lives as long as `&self` holds its `Arc`; it is writable exactly when
        // `entry.writable` says so, which the slice is told; no reference to it is ever made.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                entry.host.add(offset as usize),
                count,
                region.bitmap().slice_at(offset as usize),
                entry.writable,
            )
        })
    }
}
