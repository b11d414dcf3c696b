//! [`IovaMemory`]: [`Bytes<Iova>`] over guest memory through one IOTLB table.

use std::mem::size_of;
use std::sync::atomic::Ordering;

use crate::address::GuestAddress;
use crate::bytes::{AtomicAccess, ByteValued, Bytes};
use crate::memory::{GuestMemory, GuestMemoryError, GuestSlice};
use crate::volatile::{ReadVolatile, WriteVolatile};

use super::{Access, IommuError, IotlbTable, Iova};

/// Guest memory `M` addressed by IOVA through one [`IotlbTable`]: [`Bytes<Iova>`] with
/// translation, permission checks and splitting at mapping ends.
///
/// Built with [`IotlbTable::view`]; costs nothing (two references). Every call translates
/// with the view's table, then uses `M`'s own access paths on the guest addresses (so writes
/// are marked in `M`'s dirty bitmaps). An access of up to 8 bytes inside one mapping (always
/// so when it is aligned) is one translation and `M`'s fast path; an access that crosses
/// mappings is checked whole (every piece mapped with the permission, every piece backed by
/// guest memory) before the first byte moves, except for [`write`](Bytes::write),
/// [`read`](Bytes::read) and the non-exact I/O calls, which move what they can and stop.
#[derive(Debug)]
pub struct IovaMemory<'a, M: ?Sized> {
    table: &'a IotlbTable,
    mem: &'a M,
}

impl<M: ?Sized> Clone for IovaMemory<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M: ?Sized> Copy for IovaMemory<'_, M> {}

/// The pieces of an IOVA range, one per mapping: `(iova, guest address, length)`, or the
/// error where translation stops (then nothing more).
struct Pieces<'t> {
    table: &'t IotlbTable,
    iova: u64,
    left: u64,
    access: Access,
    /// Bytes remain but the last piece ended at 2^64.
    wrapped: Option<(u64, u64)>,
}

impl Iterator for Pieces<'_> {
    type Item = Result<(Iova, GuestAddress, usize), IommuError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        if let Some((value, size)) = self.wrapped {
            self.left = 0;
            return Some(Err(IommuError::Overflow { what: "iova", value, size }));
        }
        match self.table.translate(Iova(self.iova), self.left, self.access) {
            Err(e) => {
                self.left = 0;
                Some(Err(e))
            }
            Ok((guest, n)) => {
                let at = self.iova;
                self.left -= n;
                match self.iova.checked_add(n) {
                    Some(next) => self.iova = next,
                    None => self.wrapped = Some((at, self.left)),
                }
                // `n <= left`, which came from a usize.
                Some(Ok((Iova(at), guest, n as usize)))
            }
        }
    }
}

impl<'a, M: ?Sized> IovaMemory<'a, M> {
    pub(super) fn new(table: &'a IotlbTable, mem: &'a M) -> Self {
        IovaMemory { table, mem }
    }

    /// The table the view translates with.
    pub fn table(&self) -> &'a IotlbTable {
        self.table
    }

    /// The guest memory behind the view.
    pub fn memory(&self) -> &'a M {
        self.mem
    }

    fn pieces(&self, iova: Iova, len: usize, access: Access) -> Pieces<'a> {
        Pieces { table: self.table, iova: iova.0, left: len as u64, access, wrapped: None }
    }
}

fn guest(iova: Iova) -> impl FnOnce(GuestMemoryError) -> IommuError {
    move |source| IommuError::Guest { iova, source }
}

impl<'a, M: GuestMemory + ?Sized> IovaMemory<'a, M> {
    /// Translates the first bytes of `[iova, iova + len)`: see [`IotlbTable::translate`].
    #[inline]
    pub fn translate(&self, iova: Iova, len: u64, access: Access) -> Result<(GuestAddress, u64), IommuError> {
        self.table.translate(iova, len, access)
    }

    /// The `len` bytes at `iova` as one slice of guest memory, for `access`: they must lie in
    /// one mapping ([`IommuError::NotContiguous`] otherwise) and one guest region. A slice for
    /// [`Access::Write`] is writable.
    ///
    /// ```
    /// use guestmem::iommu::{Access, Iotlb, Iova, Permissions};
    /// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    /// let iotlb = Iotlb::new();
    /// iotlb.update(Iova(0x1000), 0x1000, GuestAddress(0x4000), Permissions::WRITE).unwrap();
    /// let snapshot = iotlb.snapshot();
    /// let view = snapshot.view(&mem);
    /// let s = view.get_slice(Iova(0x1100), 0x100, Access::Write).unwrap();
    /// s.write_obj(9u32, 0).unwrap();
    /// assert_eq!(mem.read_obj::<u32>(GuestAddress(0x4100)).unwrap(), 9);
    /// assert!(view.get_slice(Iova(0x1f00), 0x200, Access::Write).is_err()); // past the mapping
    /// assert!(view.get_slice(Iova(0x1000), 4, Access::Read).is_err()); // write-only
    /// ```
    pub fn get_slice(&self, iova: Iova, len: usize, access: Access) -> Result<GuestSlice<'a, M>, IommuError> {
        let (addr, n) = self.table.translate(iova, len as u64, access)?;
        if n < len as u64 {
            return Err(IommuError::NotContiguous { iova, len: len as u64 });
        }
        let slice = self.mem.get_slice(addr, len).map_err(guest(iova))?;
        if access == Access::Write && !slice.is_writable() {
            return Err(IommuError::Guest { iova, source: GuestMemoryError::ReadOnly { addr, len } });
        }
        Ok(slice)
    }

    /// Checks that all of `[iova, iova + len)` is mapped for `access` and backed by guest
    /// memory (writable, for a write), before anything is touched.
    pub fn check(&self, iova: Iova, len: usize, access: Access) -> Result<(), IommuError> {
        let write = access == Access::Write;
        if len == 0 {
            let (addr, _) = self.table.translate(iova, 0, access)?;
            return self.mem.check_access(addr, 0, write).map_err(guest(iova));
        }
        for piece in self.pieces(iova, len, access) {
            let (at, addr, n) = piece?;
            self.mem.check_access(addr, n, write).map_err(guest(at))?;
        }
        Ok(())
    }

    /// The cold path of a write that spans mappings: check it whole, then copy piece by piece.
    #[cold]
    #[inline(never)]
    fn write_across(&self, buf: &[u8], iova: Iova) -> Result<(), IommuError> {
        self.check(iova, buf.len(), Access::Write)?;
        let mut done = 0;
        for piece in self.pieces(iova, buf.len(), Access::Write) {
            let (at, addr, n) = piece?;
            self.mem.write_slice(&buf[done..done + n], addr).map_err(guest(at))?;
            done += n;
        }
        Ok(())
    }

    /// The cold path of a read that spans mappings.
    #[cold]
    #[inline(never)]
    fn read_across(&self, buf: &mut [u8], iova: Iova) -> Result<(), IommuError> {
        self.check(iova, buf.len(), Access::Read)?;
        let mut done = 0;
        for piece in self.pieces(iova, buf.len(), Access::Read) {
            let (at, addr, n) = piece?;
            self.mem.read_slice(&mut buf[done..done + n], addr).map_err(guest(at))?;
            done += n;
        }
        Ok(())
    }

    /// Moves up to `count` bytes piece by piece with `step` (bytes moved, or an error), stopping
    /// at a short move or where translation or guest memory stops; fails only if nothing moved.
    fn transfer_some(
        &self,
        iova: Iova,
        count: usize,
        access: Access,
        mut step: impl FnMut(GuestAddress, usize) -> Result<usize, GuestMemoryError>,
    ) -> Result<usize, IommuError> {
        if count == 0 {
            self.check(iova, 0, access)?;
            return Ok(0);
        }
        let mut done = 0;
        for piece in self.pieces(iova, count, access) {
            let (at, addr, n) = match piece {
                Ok(p) => p,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            };
            let moved = match step(addr, n) {
                Ok(moved) => moved,
                Err(e) if done == 0 => return Err(guest(at)(e)),
                Err(_) => break,
            };
            done += moved;
            if moved < n {
                break;
            }
        }
        Ok(done)
    }

    /// Moves exactly `count` bytes piece by piece with `step`, after checking the whole range.
    fn transfer_all(
        &self,
        iova: Iova,
        count: usize,
        access: Access,
        mut step: impl FnMut(GuestAddress, usize) -> Result<(), GuestMemoryError>,
    ) -> Result<(), IommuError> {
        self.check(iova, count, access)?;
        let mut done = 0;
        for piece in self.pieces(iova, count, access) {
            let (at, addr, n) = piece?;
            step(addr, n).map_err(|e| match e {
                GuestMemoryError::PartialBuffer { completed, .. } => {
                    IommuError::PartialBuffer { iova, expected: count, completed: done + completed }
                }
                e => guest(at)(e),
            })?;
            done += n;
        }
        Ok(())
    }
}

impl<M: GuestMemory + ?Sized> Bytes<Iova> for IovaMemory<'_, M> {
    type E = IommuError;

    /// Writes as much of `buf` as is mapped writable and backed contiguously from `iova`;
    /// fails only if nothing could be written.
    fn write(&self, buf: &[u8], iova: Iova) -> Result<usize, IommuError> {
        let mut at = 0;
        self.transfer_some(iova, buf.len(), Access::Write, |addr, n| {
            let w = self.mem.write(&buf[at..at + n], addr)?;
            at += w;
            Ok(w)
        })
    }

    /// Reads as much as is mapped readable and backed contiguously from `iova`; fails only if
    /// nothing could be read.
    fn read(&self, buf: &mut [u8], iova: Iova) -> Result<usize, IommuError> {
        let mut at = 0;
        self.transfer_some(iova, buf.len(), Access::Read, |addr, n| {
            let r = self.mem.read(&mut buf[at..at + n], addr)?;
            at += r;
            Ok(r)
        })
    }

    #[inline]
    fn write_slice(&self, buf: &[u8], iova: Iova) -> Result<(), IommuError> {
        let (addr, n) = self.table.translate(iova, buf.len() as u64, Access::Write)?;
        if n == buf.len() as u64 {
            return self.mem.write_slice(buf, addr).map_err(guest(iova));
        }
        self.write_across(buf, iova)
    }

    #[inline]
    fn read_slice(&self, buf: &mut [u8], iova: Iova) -> Result<(), IommuError> {
        let (addr, n) = self.table.translate(iova, buf.len() as u64, Access::Read)?;
        if n == buf.len() as u64 {
            return self.mem.read_slice(buf, addr).map_err(guest(iova));
        }
        self.read_across(buf, iova)
    }

    #[inline(always)]
    fn write_obj<T: ByteValued>(&self, val: T, iova: Iova) -> Result<(), IommuError> {
        let (addr, n) = self.table.translate(iova, size_of::<T>() as u64, Access::Write)?;
        if n == size_of::<T>() as u64 {
            return self.mem.write_obj(val, addr).map_err(guest(iova));
        }
        self.write_across(val.as_bytes(), iova)
    }

    #[inline(always)]
    fn read_obj<T: ByteValued>(&self, iova: Iova) -> Result<T, IommuError> {
        let (addr, n) = self.table.translate(iova, size_of::<T>() as u64, Access::Read)?;
        if n == size_of::<T>() as u64 {
            return self.mem.read_obj(addr).map_err(guest(iova));
        }
        let mut val = T::new_zeroed();
        self.read_across(val.as_mut_bytes(), iova)?;
        Ok(val)
    }

    fn read_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        iova: Iova,
        src: &mut F,
        count: usize,
    ) -> Result<usize, IommuError> {
        self.transfer_some(iova, count, Access::Write, |addr, n| self.mem.read_volatile_from(addr, src, n))
    }

    fn read_exact_volatile_from<F: ReadVolatile + ?Sized>(
        &self,
        iova: Iova,
        src: &mut F,
        count: usize,
    ) -> Result<(), IommuError> {
        self.transfer_all(iova, count, Access::Write, |addr, n| {
            self.mem.read_exact_volatile_from(addr, src, n)
        })
    }

    fn write_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        iova: Iova,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, IommuError> {
        self.transfer_some(iova, count, Access::Read, |addr, n| self.mem.write_volatile_to(addr, dst, n))
    }

    fn write_all_volatile_to<F: WriteVolatile + ?Sized>(
        &self,
        iova: Iova,
        dst: &mut F,
        count: usize,
    ) -> Result<(), IommuError> {
        self.transfer_all(iova, count, Access::Read, |addr, n| self.mem.write_all_volatile_to(addr, dst, n))
    }

    /// An atomic store: the value must lie in one mapping (an aligned one always does).
    #[inline]
    fn store<T: AtomicAccess>(&self, val: T, iova: Iova, order: Ordering) -> Result<(), IommuError> {
        let (addr, n) = self.table.translate(iova, size_of::<T>() as u64, Access::Write)?;
        if n < size_of::<T>() as u64 {
            return Err(IommuError::NotContiguous { iova, len: size_of::<T>() as u64 });
        }
        self.mem.store(val, addr, order).map_err(guest(iova))
    }

    /// An atomic load: the value must lie in one mapping (an aligned one always does).
    #[inline]
    fn load<T: AtomicAccess>(&self, iova: Iova, order: Ordering) -> Result<T, IommuError> {
        let (addr, n) = self.table.translate(iova, size_of::<T>() as u64, Access::Read)?;
        if n < size_of::<T>() as u64 {
            return Err(IommuError::NotContiguous { iova, len: size_of::<T>() as u64 });
        }
        self.mem.load(addr, order).map_err(guest(iova))
    }
}
