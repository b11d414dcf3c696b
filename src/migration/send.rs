//! The sending side: guest ranges as pages frames, end-of-round markers, checksums and done.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

use super::{
    frame_header, io_error, stream_header, stream_pages, MigrationError, Result, CHECKSUM_ENTRY_LEN,
    FRAME_CHECKSUMS, FRAME_DONE, FRAME_END_OF_ROUND, FRAME_HEADER_LEN, FRAME_PAGES, MAX_FRAME_DATA,
};
use crate::address::{GuestAddress, MemoryRegionAddress};
use crate::bitmap::{Bitmap, DirtyHarvest};
use crate::checksum::Checksum;
use crate::memory::{GuestMemory, GuestMemoryError, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;
use crate::sys;

/// Pieces (frame headers and guest slices) one `writev(2)` gathers at most.
const BATCH_IOVECS: usize = 64;

/// The bounce buffer of the plain-`Write` path.
const BOUNCE_LEN: usize = 64 << 10;

/// What an [`end_round`](Sender::end_round) closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round number (0 for the first).
    pub round: u64,
    /// Pages sent in it, in [`STREAM_PAGE_SIZE`](super::STREAM_PAGE_SIZE) units.
    pub pages: u64,
    /// Guest bytes sent in it.
    pub bytes: u64,
}

/// Puts guest memory on a migration stream (see the [module docs](super) for the format).
///
/// Made with [`new_vectored`](Self::new_vectored) on a file descriptor (a socket, a pipe, a
/// file), frame headers and guest pages leave in one `writev(2)` per batch of up to 64 pieces,
/// read by the kernel straight from guest memory. Made with [`new`](Self::new) on any other
/// `Write`, pages are copied through a 64 KiB buffer.
///
/// ```
/// use guestmem::migration::Sender;
/// use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_obj(7u8, GuestAddress(0x3000)).unwrap();
/// let mut sender = Sender::new(Vec::new()).unwrap();
/// assert_eq!(sender.send_dirty(&mem).unwrap(), 1); // the one dirty page
/// let end = sender.end_round().unwrap();
/// assert_eq!((end.round, end.pages, end.bytes), (0, 1, 4096));
/// let stream = sender.finish(&mem).unwrap();
/// // Stream header, one pages frame, end of round, checksums (one region), done.
/// assert_eq!(stream.len(), 16 + (24 + 4096) + 24 + (24 + 24) + 24);
/// ```
#[derive(Debug)]
pub struct Sender<W> {
    stream: W,
    /// How to reach the stream's fd, when it has one: the `writev` path.
    fd: Option<fn(&W) -> BorrowedFd<'_>>,
    round: u64,
    round_pages: u64,
    round_bytes: u64,
    stream_bytes: u64,
    bounce: Vec<u8>,
    /// The ranges of the last harvest, kept to put them back if the send fails.
    ranges: Vec<(GuestAddress, u64)>,
}

impl<W: Write + AsFd> Sender<W> {
    /// A sender on a file descriptor: writes the stream header, then sends pages with
    /// `writev(2)` straight from guest memory. `stream` must not buffer (a `TcpStream`,
    /// `UnixStream`, `File`, `ChildStdin`, ...): bytes are written to the fd, not through
    /// `Write`.
    pub fn new_vectored(stream: W) -> Result<Self> {
        let mut s = Self::with_path(stream, Some(<W as AsFd>::as_fd));
        s.write_all(&stream_header(), "writing the stream header")?;
        Ok(s)
    }
}

impl<W: Write> Sender<W> {
    /// A sender on any `Write`: writes the stream header; pages go through a bounce buffer.
    pub fn new(stream: W) -> Result<Self> {
        let mut s = Self::with_path(stream, None);
        s.write_all(&stream_header(), "writing the stream header")?;
        Ok(s)
    }

    fn with_path(stream: W, fd: Option<fn(&W) -> BorrowedFd<'_>>) -> Self {
        Sender {
            stream,
            fd,
            round: 0,
            round_pages: 0,
            round_bytes: 0,
            stream_bytes: 0,
            bounce: Vec::new(),
            ranges: Vec::new(),
        }
    }

    /// The round now being sent (0 until the first [`end_round`](Self::end_round)).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Bytes written to the stream so far (headers included).
    pub fn stream_bytes(&self) -> u64 {
        self.stream_bytes
    }

    /// The stream.
    pub fn get_ref(&self) -> &W {
        &self.stream
    }

    /// The stream, taken back (a stream without checksums and done is incomplete: the receiver
    /// will fail).
    pub fn into_inner(self) -> W {
        self.stream
    }

    /// Sends the guest ranges `ranges` (`(start, length)`; empty ones are skipped, wherever
    /// they point) as pages frames of at most [`MAX_FRAME_DATA`] bytes. Every non-empty range
    /// is checked to lie in `mem` first: an invalid list sends nothing. Returns the guest
    /// bytes sent.
    ///
    /// ```
    /// use guestmem::migration::Sender;
    /// use guestmem::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    /// let mut sender = Sender::new(Vec::new()).unwrap();
    /// assert_eq!(sender.send_ranges(&mem, &[(GuestAddress(0x1000), 0x2000)]).unwrap(), 0x2000);
    /// assert!(sender.send_ranges(&mem, &[(GuestAddress(0xf000), 0x2000)]).is_err());
    /// // An empty range is skipped, even at an address without memory.
    /// assert_eq!(sender.send_ranges(&mem, &[(GuestAddress(1 << 40), 0)]).unwrap(), 0);
    /// ```
    pub fn send_ranges<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ranges: &[(GuestAddress, u64)],
    ) -> Result<u64> {
        // An empty range sends nothing, so its address needs no memory behind it.
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            let n = usize::try_from(len).map_err(|_| MigrationError::Memory {
                addr,
                len,
                source: GuestMemoryError::Overflow { addr, len: usize::MAX },
            })?;
            mem.check_access(addr, n, false).map_err(|source| MigrationError::Memory {
                addr,
                len,
                source,
            })?;
        }
        let before = self.round_bytes;
        match self.fd {
            Some(fd) => self.send_vectored(mem, fd, ranges)?,
            None => {
                for &(addr, len) in ranges {
                    self.send_copied(mem, addr, len)?;
                }
            }
        }
        Ok(self.round_bytes - before)
    }

    /// Sends every region of `mem` whole (round 0 of a pre-copy). Returns the guest bytes sent.
    pub fn send_all<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u64> {
        let mut sent = 0;
        for region in mem.iter() {
            sent += self.send_ranges(mem, &[(region.start_addr(), region.len())])?;
        }
        Ok(sent)
    }

    /// Harvests `mem`'s dirty pages ([`GuestMemoryMmap::take_dirty_ranges`]: taken and
    /// cleared) and sends them. If sending fails, the harvested ranges are put back
    /// ([`GuestMemoryMmap::restore_dirty_ranges`]), so a later attempt still has them. Returns
    /// the number of dirty pages harvested (in the bitmaps' page size).
    ///
    /// A region without dirty tracking fails the call before anything is taken from any
    /// region; whatever a failing harvest did report is put back too.
    pub fn send_dirty<B: Bitmap + DirtyHarvest>(&mut self, mem: &GuestMemoryMmap<B>) -> Result<usize> {
        // Every region must be able to report its pages before any region gives them up.
        for region in mem.iter() {
            region.bitmap().page_size()?;
        }
        let mut ranges = std::mem::take(&mut self.ranges);
        ranges.clear();
        let result = match mem.take_dirty_ranges(|addr, len| ranges.push((addr, len))) {
            Ok(pages) => self.send_ranges(mem, &ranges).map(|_| pages),
            Err(e) => Err(e.into()),
        };
        if result.is_err() {
            // The ranges came from this memory's harvest: putting them back cannot fail.
            let _ = mem.restore_dirty_ranges(&ranges);
        }
        self.ranges = ranges;
        result
    }

    /// Closes the current round with an end-of-round frame (its number and page count) and
    /// starts the next. Returns what the round held.
    pub fn end_round(&mut self) -> Result<RoundEnd> {
        let end = RoundEnd { round: self.round, pages: self.round_pages, bytes: self.round_bytes };
        self.write_all(
            &frame_header(FRAME_END_OF_ROUND, end.round, end.pages),
            "writing an end-of-round frame",
        )?;
        self.round += 1;
        self.round_pages = 0;
        self.round_bytes = 0;
        Ok(end)
    }

    /// Ends the stream: the checksum of every region of `mem` (read now: the source must be
    /// paused, or the checksums describe no single moment), then done. Flushes and returns
    /// the stream.
    pub fn finish<M: GuestMemory + ?Sized>(mut self, mem: &M) -> Result<W> {
        let count = mem.num_regions() as u64;
        self.write_all(&frame_header(FRAME_CHECKSUMS, count, 0), "writing the checksums frame")?;
        for region in mem.iter() {
            let sum = region_checksum(region).map_err(|source| MigrationError::Memory {
                addr: region.start_addr(),
                len: region.len(),
                source,
            })?;
            let mut entry = [0u8; CHECKSUM_ENTRY_LEN];
            entry[..8].copy_from_slice(&region.start_addr().0.to_le_bytes());
            entry[8..16].copy_from_slice(&region.len().to_le_bytes());
            entry[16..].copy_from_slice(&sum.to_le_bytes());
            self.write_all(&entry, "writing the checksums frame")?;
        }
        self.write_all(&frame_header(FRAME_DONE, 0, 0), "writing the done frame")?;
        self.stream.flush().map_err(io_error("flushing the stream"))?;
        Ok(self.stream)
    }

    fn write_all(&mut self, bytes: &[u8], op: &'static str) -> Result<()> {
        match self.fd {
            Some(fd) => {
                let mut iov = [libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() }];
                // SAFETY: the iovec describes `bytes`, borrowed for the call.
                unsafe { writev_all(fd(&self.stream), &mut iov) }
            }
            None => self.stream.write_all(bytes),
        }
        .map_err(io_error(op))?;
        self.stream_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Counts a pages frame of `len` bytes into the round.
    fn count_frame(&mut self, len: u64) {
        self.round_pages += stream_pages(len);
        self.round_bytes += len;
        self.stream_bytes += FRAME_HEADER_LEN as u64 + len;
    }

    /// The plain-`Write` path: each frame's header, then its bytes through the bounce buffer.
    fn send_copied<M: GuestMemory + ?Sized>(&mut self, mem: &M, addr: GuestAddress, len: u64) -> Result<()> {
        if self.bounce.is_empty() {
            self.bounce = vec![0; BOUNCE_LEN];
        }
        for (at, n) in frames(addr, len) {
            self.stream
                .write_all(&frame_header(FRAME_PAGES, at.0, n))
                .map_err(io_error("writing a pages frame"))?;
            for s in mem.get_slices(at, n as usize) {
                let s = s.map_err(|source| MigrationError::Memory { addr: at, len: n, source })?;
                let mut done = 0;
                while done < s.len() {
                    let k = (s.len() - done).min(BOUNCE_LEN);
                    let part = s.subslice(done, k).map_err(|e| MigrationError::Memory {
                        addr: at,
                        len: n,
                        source: GuestMemoryError::from_volatile(at, e),
                    })?;
                    part.copy_to(&mut self.bounce[..k]);
                    self.stream.write_all(&self.bounce[..k]).map_err(io_error("writing page data"))?;
                    done += k;
                }
            }
            self.count_frame(n);
        }
        Ok(())
    }

    /// The fd path: headers and guest slices gathered into batches of [`BATCH_IOVECS`]
    /// pieces, each batch one `writev(2)` (more if the kernel takes it in parts).
    fn send_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        fd: fn(&W) -> BorrowedFd<'_>,
        ranges: &[(GuestAddress, u64)],
    ) -> Result<()> {
        let mut batch = Batch::new();
        for &(addr, len) in ranges {
            for (at, n) in frames(addr, len) {
                if batch.is_full() {
                    batch.flush(fd(&self.stream))?;
                }
                batch.push_header(frame_header(FRAME_PAGES, at.0, n));
                for s in mem.get_slices(at, n as usize) {
                    let s = s.map_err(|source| MigrationError::Memory { addr: at, len: n, source })?;
                    if batch.is_full() {
                        batch.flush(fd(&self.stream))?;
                    }
                    batch.push_guest(s.as_iovec());
                }
                self.count_frame(n);
            }
        }
        batch.flush(fd(&self.stream))
    }
}

/// The frames of a range: `(start, length)` pieces of at most [`MAX_FRAME_DATA`] bytes.
fn frames(addr: GuestAddress, len: u64) -> impl Iterator<Item = (GuestAddress, u64)> {
    let count = len.div_ceil(MAX_FRAME_DATA);
    (0..count).map(move |i| {
        let off = i * MAX_FRAME_DATA;
        (GuestAddress(addr.0 + off), (len - off).min(MAX_FRAME_DATA))
    })
}

/// The checksum of a region's full contents.
pub(super) fn region_checksum<R: GuestMemoryRegion + ?Sized>(
    region: &R,
) -> std::result::Result<u64, GuestMemoryError> {
    let len = usize::try_from(region.len())
        .map_err(|_| GuestMemoryError::Overflow { addr: region.start_addr(), len: usize::MAX })?;
    let slice = region.get_slice(MemoryRegionAddress(0), len)?;
    let mut sum = Checksum::new();
    sum.update_volatile(&slice);
    Ok(sum.finish())
}

/// One piece of a batch: a frame header (index into the batch's headers) or guest bytes.
#[derive(Clone, Copy)]
enum Piece {
    Header(usize),
    Guest(libc::iovec),
}

/// Frame headers and guest slices waiting for one `writev(2)`.
struct Batch {
    headers: [[u8; FRAME_HEADER_LEN]; BATCH_IOVECS],
    pieces: [Piece; BATCH_IOVECS],
    count: usize,
    header_count: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            headers: [[0; FRAME_HEADER_LEN]; BATCH_IOVECS],
            pieces: [Piece::Header(0); BATCH_IOVECS],
            count: 0,
            header_count: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.count == BATCH_IOVECS
    }

    fn push_header(&mut self, header: [u8; FRAME_HEADER_LEN]) {
        self.headers[self.header_count] = header;
        self.pieces[self.count] = Piece::Header(self.header_count);
        self.header_count += 1;
        self.count += 1;
    }

    fn push_guest(&mut self, iov: libc::iovec) {
        if iov.iov_len > 0 {
            self.pieces[self.count] = Piece::Guest(iov);
            self.count += 1;
        }
    }

    /// Writes every piece with `writev(2)` and empties the batch. The guest pieces must still
    /// point into mapped guest memory: callers flush before their borrow of the memory ends.
    fn flush(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH_IOVECS];
        for (slot, piece) in iov.iter_mut().zip(&self.pieces[..self.count]) {
            *slot = match *piece {
                Piece::Header(i) => {
                    libc::iovec { iov_base: self.headers[i].as_ptr() as *mut _, iov_len: FRAME_HEADER_LEN }
                }
                Piece::Guest(g) => g,
            };
        }
        let n = self.count;
        self.count = 0;
        self.header_count = 0;
        // SAFETY: header iovecs describe `self.headers`, not written until the call returns;
        // guest iovecs describe slices of guest memory the caller still borrows (so mapped),
        // which `writev` only reads.
        unsafe { writev_all(fd, &mut iov[..n]) }.map_err(io_error("writing pages frames"))
    }
}

/// `writev(2)` until every byte of `iov` is written (advancing through partial writes).
///
/// # Safety
/// Every iovec must describe memory valid for reads for the duration of the call.
unsafe fn writev_all(fd: BorrowedFd<'_>, iov: &mut [libc::iovec]) -> io::Result<()> {
    // SAFETY: the caller guarantees every iovec is readable for this call; `gather_all` only
    // hands `writev` suffixes of them, advanced within their bounds.
    gather_all(iov, |rest| sys::retry_eintr(|| unsafe { sys::fd::writev(fd, rest) }))
}

/// Calls `write` (a `writev`-like call) until every byte of `iov` is written: after a partial
/// write, the written iovecs are skipped and the first unfinished one is advanced.
fn gather_all(
    iov: &mut [libc::iovec],
    mut write: impl FnMut(&[libc::iovec]) -> io::Result<usize>,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() && iov[start].iov_len == 0 {
        start += 1;
    }
    while start < iov.len() {
        let mut n = write(&iov[start..])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while start < iov.len() && n >= iov[start].iov_len {
            n -= iov[start].iov_len;
            start += 1;
        }
        if start == iov.len() && n > 0 {
            // A call that claims more than it was given.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "writev wrote more than asked"));
        }
        if n > 0 {
            // `n` is less than this iovec's length: skip its first `n` bytes.
            let v = &mut iov[start];
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(bytes: &[u8]) -> libc::iovec {
        libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() }
    }

    /// Gathers with a "kernel" that takes at most `max` bytes per call.
    fn gather(parts: &[&[u8]], max: usize) -> io::Result<(Vec<u8>, usize)> {
        let mut v: Vec<libc::iovec> = parts.iter().map(|p| iov(p)).collect();
        let (mut out, mut calls) = (Vec::new(), 0);
        gather_all(&mut v, |rest| {
            calls += 1;
            let mut left = max;
            for r in rest {
                let k = r.iov_len.min(left);
                // SAFETY: each iovec describes a live byte slice of `parts` (advanced within it).
                out.extend_from_slice(unsafe { std::slice::from_raw_parts(r.iov_base as *const u8, k) });
                left -= k;
            }
            Ok(max - left)
        })?;
        Ok((out, calls))
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let (a, b, c): (Vec<u8>, Vec<u8>, Vec<u8>) = ((0..10).collect(), vec![], (10..37).collect());
        let all: Vec<u8> = (0..37).collect();
        for max in [1, 3, 10, 11, 36, 37, 1000] {
            let (out, calls) = gather(&[&a, &b, &c], max).unwrap();
            assert_eq!(out, all, "max {max}");
            assert_eq!(calls, 37usize.div_ceil(max), "max {max}");
        }
        // Nothing to write: no call at all.
        assert_eq!(gather(&[&b, &b], 5).unwrap(), (vec![], 0));
        assert_eq!(gather(&[], 5).unwrap(), (vec![], 0));
    }

    #[test]
    fn a_write_of_zero_or_too_much_is_an_error() {
        let data = [1u8; 8];
        let mut v = [iov(&data)];
        let e = gather_all(&mut v, |_| Ok(0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        let e = gather_all(&mut v, |_| Ok(9)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = gather_all(&mut v, |_| Err(io::ErrorKind::BrokenPipe.into())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn frames_split_long_ranges() {
        let f: Vec<_> = frames(GuestAddress(0x1000), 2 * MAX_FRAME_DATA + 5).collect();
        assert_eq!(
            f,
            vec![
                (GuestAddress(0x1000), MAX_FRAME_DATA),
                (GuestAddress(0x1000 + MAX_FRAME_DATA), MAX_FRAME_DATA),
                (GuestAddress(0x1000 + 2 * MAX_FRAME_DATA), 5)
            ]
        );
        assert_eq!(frames(GuestAddress(0), 0).count(), 0);
        assert_eq!(frames(GuestAddress(0), MAX_FRAME_DATA).count(), 1);
    }
}
