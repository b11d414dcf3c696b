//! Moving bytes between [`VolatileSlice`]s and files, sockets and buffers.
//!
//! [`ReadVolatile`] reads *into* a slice (a write to guest memory: checked against read-only
//! memory, and marked dirty for exactly the bytes that arrived); [`WriteVolatile`] writes *from*
//! a slice. File descriptors (`File`, `TcpStream`, `UnixStream`, `OwnedFd`, `BorrowedFd`, and
//! their `&` forms) go straight from the kernel into guest memory with `read(2)`/`write(2)`,
//! retrying `EINTR`, with no bounce buffer. Vectored forms gather or scatter over several slices
//! with `readv(2)`/`writev(2)` and an `iovec` array on the stack; positional forms
//! ([`ReadVolatileAt`], [`WriteVolatileAt`]) use `pread(2)`/`pwrite(2)` at a file offset.
//!
//! ```
//! use std::io::{Seek, Write};
//! use guestmem::volatile::{ReadVolatile, ReadVolatileAt};
//! use guestmem::VolatileSlice;
//!
//! let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! file.write_all(b"hello guest").unwrap();
//! file.rewind().unwrap();
//! let mut mem = [0u8; 11];
//! let slice = VolatileSlice::from(&mut mem[..]);
//! file.read_exact_volatile(&slice).unwrap();
//! file.read_exact_volatile_at(&slice.subslice(0, 5).unwrap(), 6).unwrap();
//! assert_eq!(&mem, b"guest guest");
//! ```

use std::fs::File;
use std::io::Cursor;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::{copy, Result, VolatileError, VolatileSlice};
use crate::bitmap::BitmapSlice;
use crate::sys;

/// How many `iovec`s one vectored call builds on the stack; longer lists are transferred
/// partially, as `readv`/`writev` allow.
const IOVECS_PER_CALL: usize = 64;

/// A source of bytes that can read straight into a [`VolatileSlice`].
pub trait ReadVolatile {
    /// Reads up to `buf.len()` bytes into `buf`; returns the count (0 at end of input).
    /// Marks exactly the bytes read dirty; fails on read-only memory before reading.
    fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize>;

    /// Fills all of `buf`, or fails with [`VolatileError::PartialBuffer`] at end of input
    /// (the bytes that did arrive are in memory and marked).
    fn read_exact_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_volatile(&buf.offset(done)?)?;
            if n == 0 {
                return Err(VolatileError::PartialBuffer { expected: buf.len(), completed: done });
            }
            done += n;
        }
        Ok(())
    }

    /// Reads into several slices in order; returns the total count. The default reads into
    /// the first non-empty slice; file descriptors scatter with one `readv(2)`.
    fn read_vectored_volatile<S: BitmapSlice>(&mut self, bufs: &[VolatileSlice<'_, S>]) -> Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.read_volatile(b),
            None => Ok(0),
        }
    }
}

/// A sink of bytes that can take them straight from a [`VolatileSlice`].
pub trait WriteVolatile {
    /// Writes up to `buf.len()` bytes of `buf`; returns the count written.
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize>;

    /// Writes all of `buf`, or fails with [`VolatileError::PartialBuffer`] if the sink stops
    /// accepting bytes.
    fn write_all_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.write_volatile(&buf.offset(done)?)?;
            if n == 0 {
                return Err(VolatileError::PartialBuffer { expected: buf.len(), completed: done });
            }
            done += n;
        }
        Ok(())
    }

    /// Writes several slices in order; returns the total count. The default writes the first
    /// non-empty slice; file descriptors gather with one `writev(2)`.
    fn write_vectored_volatile<S: BitmapSlice>(&mut self, bufs: &[VolatileSlice<'_, S>]) -> Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write_volatile(b),
            None => Ok(0),
        }
    }
}

/// Positional reads into a [`VolatileSlice`] (`pread(2)`): the file position does not move.
pub trait ReadVolatileAt {
    /// Reads up to `buf.len()` bytes from file offset `offset`; returns the count (0 at EOF).
    fn read_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<usize>;

    /// Fills all of `buf` from file offset `offset`, or fails with
    /// [`VolatileError::PartialBuffer`] at end of file.
    fn read_exact_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_volatile_at(&buf.offset(done)?, offset.saturating_add(done as u64))?;
            if n == 0 {
                return Err(VolatileError::PartialBuffer { expected: buf.len(), completed: done });
            }
            done += n;
        }
        Ok(())
    }

    /// Scatters a read at file offset `offset` over several slices (`preadv(2)`).
    fn read_vectored_volatile_at<S: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, S>],
        offset: u64,
    ) -> Result<usize>;
}

/// Positional writes from a [`VolatileSlice`] (`pwrite(2)`): the file position does not move.
pub trait WriteVolatileAt {
    /// Writes up to `buf.len()` bytes at file offset `offset`; returns the count written.
    fn write_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<usize>;

    /// Writes all of `buf` at file offset `offset`, or fails with
    /// [`VolatileError::PartialBuffer`].
    fn write_all_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.write_volatile_at(&buf.offset(done)?, offset.saturating_add(done as u64))?;
            if n == 0 {
                return Err(VolatileError::PartialBuffer { expected: buf.len(), completed: done });
            }
            done += n;
        }
        Ok(())
    }

    /// Gathers a write at file offset `offset` from several slices (`pwritev(2)`).
    fn write_vectored_volatile_at<S: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, S>],
        offset: u64,
    ) -> Result<usize>;
}

/// Reads into `buf` with `call(ptr, len)` (a `read`-like system call), retrying `EINTR`, and
/// marks what arrived.
fn read_into<S: BitmapSlice>(
    buf: &VolatileSlice<'_, S>,
    mut call: impl FnMut(*mut u8, usize) -> std::io::Result<usize>,
) -> Result<usize> {
    buf.check_writable(0, buf.len())?;
    let n = sys::retry_eintr(|| call(buf.as_ptr(), buf.len()))?;
    buf.bitmap().mark_dirty(0, n.min(buf.len()));
    Ok(n)
}

/// Writes from `buf` with `call(ptr, len)` (a `write`-like system call), retrying `EINTR`.
fn write_from<S: BitmapSlice>(
    buf: &VolatileSlice<'_, S>,
    mut call: impl FnMut(*const u8, usize) -> std::io::Result<usize>,
) -> Result<usize> {
    Ok(sys::retry_eintr(|| call(buf.as_ptr(), buf.len()))?)
}

/// Fills a stack array with the `iovec`s of up to [`IOVECS_PER_CALL`] slices.
fn iovecs<S: BitmapSlice>(bufs: &[VolatileSlice<'_, S>]) -> ([libc::iovec; IOVECS_PER_CALL], usize) {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOVECS_PER_CALL];
    let n = bufs.len().min(IOVECS_PER_CALL);
    for (slot, b) in iov.iter_mut().zip(bufs) {
        *slot = b.as_iovec();
    }
    (iov, n)
}

/// A vectored read: refuses read-only slices up front, then marks the `n` bytes that arrived,
/// slice by slice in order.
fn read_into_vectored<S: BitmapSlice>(
    bufs: &[VolatileSlice<'_, S>],
    mut call: impl FnMut(&[libc::iovec]) -> std::io::Result<usize>,
) -> Result<usize> {
    let bufs = &bufs[..bufs.len().min(IOVECS_PER_CALL)];
    for b in bufs {
        b.check_writable(0, b.len())?;
    }
    let (iov, count) = iovecs(bufs);
    let n = sys::retry_eintr(|| call(&iov[..count]))?;
    let mut left = n;
    for b in bufs {
        if left == 0 {
            break;
        }
        let here = left.min(b.len());
        b.bitmap().mark_dirty(0, here);
        left -= here;
    }
    Ok(n)
}

fn write_from_vectored<S: BitmapSlice>(
    bufs: &[VolatileSlice<'_, S>],
    mut call: impl FnMut(&[libc::iovec]) -> std::io::Result<usize>,
) -> Result<usize> {
    let (iov, count) = iovecs(bufs);
    Ok(sys::retry_eintr(|| call(&iov[..count]))?)
}

/// `ReadVolatile`/`WriteVolatile` through the fd of a stream-like type.
macro_rules! fd_stream_io {
    ($($ty:ty),* $(,)?) => {$(
        impl ReadVolatile for $ty {
            fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: `ptr, len` describe `buf`, which `read_into` checked is writable and
                // which is valid for the call; the kernel reports any fault as EFAULT.
                read_into(buf, |ptr, len| unsafe { sys::fd::read(fd, ptr, len) })
            }

            fn read_vectored_volatile<S: BitmapSlice>(&mut self, bufs: &[VolatileSlice<'_, S>]) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: every iovec describes a writable slice (checked), valid for the call.
                read_into_vectored(bufs, |iov| unsafe { sys::fd::readv(fd, iov) })
            }
        }

        impl WriteVolatile for $ty {
            fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: `ptr, len` describe `buf`, readable for the duration of the call.
                write_from(buf, |ptr, len| unsafe { sys::fd::write(fd, ptr, len) })
            }

            fn write_vectored_volatile<S: BitmapSlice>(&mut self, bufs: &[VolatileSlice<'_, S>]) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: every iovec describes a readable slice, valid for the call.
                write_from_vectored(bufs, |iov| unsafe { sys::fd::writev(fd, iov) })
            }
        }
    )*};
}

fd_stream_io!(File, &File, TcpStream, &TcpStream, UnixStream, &UnixStream, OwnedFd, BorrowedFd<'_>);

/// `ReadVolatileAt`/`WriteVolatileAt` through the fd of a seekable type.
macro_rules! fd_positional_io {
    ($($ty:ty),* $(,)?) => {$(
        impl ReadVolatileAt for $ty {
            fn read_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: `ptr, len` describe `buf`, which `read_into` checked is writable.
                read_into(buf, |ptr, len| unsafe { sys::fd::pread(fd, ptr, len, offset) })
            }

            fn read_vectored_volatile_at<S: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, S>], offset: u64) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: every iovec describes a writable slice (checked), valid for the call.
                read_into_vectored(bufs, |iov| unsafe { sys::fd::preadv(fd, iov, offset) })
            }
        }

        impl WriteVolatileAt for $ty {
            fn write_volatile_at<S: BitmapSlice>(&self, buf: &VolatileSlice<'_, S>, offset: u64) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: `ptr, len` describe `buf`, readable for the duration of the call.
                write_from(buf, |ptr, len| unsafe { sys::fd::pwrite(fd, ptr, len, offset) })
            }

            fn write_vectored_volatile_at<S: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, S>], offset: u64) -> Result<usize> {
                let fd = self.as_fd();
                // SAFETY: every iovec describes a readable slice, valid for the call.
                write_from_vectored(bufs, |iov| unsafe { sys::fd::pwritev(fd, iov, offset) })
            }
        }
    )*};
}

fd_positional_io!(File, OwnedFd, BorrowedFd<'_>);

/// Copies the front of `src` into `buf`; returns the count. Marks what it wrote.
fn copy_from_host<S: BitmapSlice>(src: &[u8], buf: &VolatileSlice<'_, S>) -> Result<usize> {
    let n = src.len().min(buf.len());
    buf.check_writable(0, n)?;
    // SAFETY: `n` bytes fit in `src` and in the writable `buf` (checked); a host buffer and
    // guest memory do not overlap.
    unsafe { copy::copy_nonoverlapping(src.as_ptr(), buf.as_ptr(), n) };
    buf.bitmap().mark_dirty(0, n);
    Ok(n)
}

/// Copies the front of `buf` into `dst`; returns the count.
fn copy_to_host<S: BitmapSlice>(buf: &VolatileSlice<'_, S>, dst: &mut [u8]) -> usize {
    let n = dst.len().min(buf.len());
    // SAFETY: `n` bytes fit in `buf` and in `dst`, which we borrow mutably.
    unsafe { copy::copy_nonoverlapping(buf.as_ptr(), dst.as_mut_ptr(), n) };
    n
}

/// Reading from a byte slice consumes its front, like `std::io::Read for &[u8]`.
impl ReadVolatile for &[u8] {
    fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let n = copy_from_host(self, buf)?;
        *self = &self[n..];
        Ok(n)
    }
}

/// Writing into a mutable byte slice fills its front and shrinks it, like
/// `std::io::Write for &mut [u8]`.
impl WriteVolatile for &mut [u8] {
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let n = copy_to_host(buf, self);
        let rest = std::mem::take(self);
        *self = &mut rest[n..];
        Ok(n)
    }
}

/// Writing into a `Vec` appends, without zeroing the new bytes first.
impl WriteVolatile for Vec<u8> {
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let n = buf.len();
        self.reserve(n);
        let old = self.len();
        // SAFETY: `reserve` made room for `n` more bytes after `old`; the copy initializes all
        // of them before `set_len` exposes them; host and guest memory do not overlap.
        unsafe {
            copy::copy_nonoverlapping(buf.as_ptr(), self.as_mut_ptr().add(old), n);
            self.set_len(old + n);
        }
        Ok(n)
    }
}

/// Reading from a cursor reads from its position and advances it.
impl<T: AsRef<[u8]>> ReadVolatile for Cursor<T> {
    fn read_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let data = self.get_ref().as_ref();
        let start = usize::try_from(self.position()).unwrap_or(usize::MAX).min(data.len());
        let n = copy_from_host(&data[start..], buf)?;
        self.set_position((start + n) as u64);
        Ok(n)
    }
}

/// Writing into a cursor over a fixed slice overwrites from its position, up to the end.
impl WriteVolatile for Cursor<&mut [u8]> {
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let pos = usize::try_from(self.position()).unwrap_or(usize::MAX);
        let data = self.get_mut();
        let start = pos.min(data.len());
        let n = copy_to_host(buf, &mut data[start..]);
        self.set_position((start + n) as u64);
        Ok(n)
    }
}

/// Writing into a cursor over a `Vec` overwrites from its position and grows the vector as
/// needed, zero-filling any gap, like `std::io::Write for Cursor<Vec<u8>>`.
impl WriteVolatile for Cursor<Vec<u8>> {
    fn write_volatile<S: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, S>) -> Result<usize> {
        let pos = usize::try_from(self.position())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let end = pos
            .checked_add(buf.len())
            .ok_or_else(|| VolatileError::Overflow { offset: pos, len: buf.len() })?;
        let vec = self.get_mut();
        if vec.len() < end {
            vec.resize(end, 0);
        }
        let n = copy_to_host(buf, &mut vec[pos..end]);
        self.set_position(end as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::testing::ByteBitmap;
    use std::io::{Read, Seek, Write};

    fn tracked(mem: &mut [u8], writable: bool) -> (VolatileSlice<'_, ByteBitmap>, ByteBitmap) {
        let bm = ByteBitmap::new(mem.len());
        // SAFETY: `mem` is borrowed mutably for the slice's lifetime.
        let s = unsafe { VolatileSlice::with_bitmap(mem.as_mut_ptr(), mem.len(), bm.clone(), writable) };
        (s, bm)
    }

    #[test]
    fn file_read_marks_exactly_what_arrived() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(&[7u8; 10]).unwrap();
        f.rewind().unwrap();
        let mut mem = [0u8; 32];
        {
            let (s, bm) = tracked(&mut mem, true);
            assert_eq!(f.read_volatile(&s.subslice(4, 20).unwrap()).unwrap(), 10);
            assert_eq!(bm.ranges(), vec![(4, 10)]);
            let e = f.read_exact_volatile(&s).unwrap_err();
            assert!(matches!(e, VolatileError::PartialBuffer { expected: 32, completed: 0 }), "{e}");
        }
        assert_eq!(&mem[4..14], &[7; 10]);
    }

    #[test]
    fn read_only_slice_refuses_every_read_into_it() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(&[7u8; 10]).unwrap();
        let mut mem = [0u8; 8];
        let (s, bm) = tracked(&mut mem, false);
        assert!(matches!(f.read_volatile_at(&s, 0), Err(VolatileError::ReadOnly { offset: 0, len: 8 })));
        assert!(matches!(f.read_volatile(&s), Err(VolatileError::ReadOnly { .. })));
        assert!(matches!(
            f.read_vectored_volatile(std::slice::from_ref(&s)),
            Err(VolatileError::ReadOnly { .. })
        ));
        assert!(matches!(
            f.read_vectored_volatile_at(std::slice::from_ref(&s), 0),
            Err(VolatileError::ReadOnly { .. })
        ));
        assert!(matches!((&[1u8, 2][..]).read_volatile(&s), Err(VolatileError::ReadOnly { .. })));
        assert!(matches!(Cursor::new(vec![1u8]).read_volatile(&s), Err(VolatileError::ReadOnly { .. })));
        // Reading *from* read-only memory is fine.
        let mut out = Vec::new();
        out.write_all_volatile(&s).unwrap();
        assert_eq!(out, vec![0; 8]);
        assert!(bm.ranges().is_empty());
    }

    #[test]
    fn vectored_and_positional_round_trip() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let mut src: Vec<u8> = (0..100u8).collect();
        let (s, _) = tracked(&mut src, true);
        let parts = [s.subslice(0, 10).unwrap(), s.subslice(50, 0).unwrap(), s.subslice(90, 10).unwrap()];
        assert_eq!(f.write_vectored_volatile_at(&parts, 100).unwrap(), 20);
        assert_eq!((&f).write_vectored_volatile(&parts).unwrap(), 20);
        f.write_all_volatile_at(&s.subslice(20, 5).unwrap(), 200).unwrap();

        let mut dst = vec![0u8; 100];
        let (d, bm) = tracked(&mut dst, true);
        let parts = [d.subslice(5, 3).unwrap(), d.subslice(60, 17).unwrap()];
        assert_eq!(f.read_vectored_volatile_at(&parts, 100).unwrap(), 20);
        assert_eq!(bm.ranges(), vec![(5, 3), (60, 17)]);
        bm.clear();
        f.read_exact_volatile_at(&d.subslice(0, 5).unwrap(), 200).unwrap();
        assert_eq!(bm.ranges(), vec![(0, 5)]);
        let e = f.read_exact_volatile_at(&d, 200).unwrap_err();
        assert!(matches!(e, VolatileError::PartialBuffer { expected: 100, completed: 5 }));
        drop(d);
        assert_eq!(&dst[0..5], &[20, 21, 22, 23, 24]);
        assert_eq!(&dst[60..77], &[3, 4, 5, 6, 7, 8, 9, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99]);

        let mut g = f.try_clone().unwrap();
        g.rewind().unwrap();
        let mut all = Vec::new();
        g.read_to_end(&mut all).unwrap();
        assert_eq!(&all[..20], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99]);

        let mut mem = [0u8; 4];
        let (s, _) = tracked(&mut mem, true);
        let e = f.read_volatile_at(&s, u64::MAX).unwrap_err();
        assert!(matches!(e, VolatileError::Io(ref io) if io.raw_os_error() == Some(libc::EINVAL)), "{e}");
        assert_eq!(f.read_vectored_volatile_at::<ByteBitmap>(&[], 0).unwrap(), 0);
    }

    #[test]
    fn sockets_stream_through_guest_memory() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut src: Vec<u8> = (0..200u8).collect();
        let (s, _) = tracked(&mut src, true);
        a.write_all_volatile(&s).unwrap();
        let mut dst = vec![0u8; 200];
        let (d, bm) = tracked(&mut dst, true);
        b.read_exact_volatile(&d).unwrap();
        assert_eq!(bm.ranges(), vec![(0, 200)]);
        drop(a);
        assert_eq!(b.read_volatile(&d).unwrap(), 0);
        let e = b.read_exact_volatile(&d).unwrap_err();
        assert!(matches!(e, VolatileError::PartialBuffer { expected: 200, completed: 0 }));
        drop(d);
        assert_eq!(src, dst);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (s, _) = tracked(&mut src, true);
        c.write_all_volatile(&s).unwrap();
        let mut dst = vec![0u8; 200];
        let (d, _) = tracked(&mut dst, true);
        (&server).read_exact_volatile(&d).unwrap();
        let (x, y) = d.split_at(50).unwrap();
        (&c).write_vectored_volatile(&[x.clone(), y.clone()]).unwrap();
        server.read_exact_volatile(&d).unwrap();
        drop(d);
        assert_eq!(src, dst);
    }

    #[test]
    fn fd_types_work() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let mut owned: OwnedFd = f.into();
        let mut mem = *b"abcdef";
        let (s, _) = tracked(&mut mem, true);
        owned.write_all_volatile(&s).unwrap();
        owned.write_all_volatile_at(&s.subslice(0, 2).unwrap(), 10).unwrap();
        let mut borrowed = owned.as_fd();
        // The position is 6 and the file ends at 12: the hole, then "ab".
        assert_eq!(borrowed.read_volatile(&s).unwrap(), 6);
        let mut out = [0u8; 2];
        let (o, _) = tracked(&mut out, true);
        borrowed.read_exact_volatile_at(&o, 10).unwrap();
        borrowed.write_volatile_at(&o, 0).unwrap();
        owned.read_volatile_at(&o, 0).unwrap();
        drop(o);
        drop(s);
        assert_eq!(&out, b"ab");
        assert_eq!(&mem, b"\0\0\0\0ab");
    }

    #[test]
    fn host_buffers_as_sources_and_sinks() {
        let mut mem = [0u8; 8];
        let (s, bm) = tracked(&mut mem, true);
        let mut src: &[u8] = &[1, 2, 3];
        assert_eq!(src.read_volatile(&s).unwrap(), 3);
        assert!(src.is_empty());
        assert_eq!(bm.ranges(), vec![(0, 3)]);
        let mut src: &[u8] = &[9, 9];
        assert!(matches!(
            src.read_exact_volatile(&s),
            Err(VolatileError::PartialBuffer { expected: 8, completed: 2 })
        ));

        let mut sink = [0u8; 5];
        let mut w: &mut [u8] = &mut sink;
        assert_eq!(w.write_volatile(&s).unwrap(), 5);
        assert!(w.is_empty());
        assert!(matches!(
            w.write_all_volatile(&s),
            Err(VolatileError::PartialBuffer { expected: 8, completed: 0 })
        ));
        assert_eq!(sink, [9, 9, 3, 0, 0]);

        let mut c = Cursor::new(vec![5u8, 6, 7]);
        c.set_position(1);
        assert_eq!(c.read_volatile(&s).unwrap(), 2);
        assert_eq!(c.read_volatile(&s).unwrap(), 0);
        c.set_position(u64::MAX);
        assert_eq!(c.read_volatile(&s).unwrap(), 0);

        let mut backing = [0u8; 4];
        let mut c = Cursor::new(&mut backing[..]);
        c.set_position(2);
        assert_eq!(c.write_volatile(&s).unwrap(), 2);
        assert_eq!(c.write_volatile(&s).unwrap(), 0);
        assert_eq!(backing, [0, 0, 6, 7]);

        let mut c = Cursor::new(vec![1u8]);
        c.set_position(3);
        c.write_all_volatile(&s.subslice(0, 2).unwrap()).unwrap();
        assert_eq!(c.into_inner(), vec![1, 0, 0, 6, 7]);
        let mut c = Cursor::new(Vec::new());
        c.set_position(u64::MAX);
        assert!(c.write_volatile(&s).is_err());

        let mut v = Vec::new();
        assert_eq!(
            v.write_vectored_volatile(&[s.subslice(0, 0).unwrap(), s.subslice(1, 2).unwrap()]).unwrap(),
            2
        );
        assert_eq!(v, vec![7, 3]);
        let mut src: &[u8] = &[4, 4];
        assert_eq!(
            src.read_vectored_volatile(&[s.subslice(0, 0).unwrap(), s.subslice(6, 2).unwrap()]).unwrap(),
            2
        );
        assert_eq!(src.read_vectored_volatile::<ByteBitmap>(&[]).unwrap(), 0);
        assert_eq!(v.write_vectored_volatile::<ByteBitmap>(&[]).unwrap(), 0);
    }
}
