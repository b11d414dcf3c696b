//! The sending side: guest ranges as pages frames of data and zero runs, end-of-round
//! markers, checksums and done.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::page_hash::{self, PAGE};
use super::residency::{self, AbsentPages, Pagemap};
use super::tables::{Digest, RegionTable, Tables};
use super::{
    frame_header, io_error, stream_header, MigrationError, Result, StreamId, CHECKSUMS_MEMORY,
    CHECKSUM_ENTRY_LEN, FRAME_CHECKSUMS, FRAME_DEVICE_STATE, FRAME_DISCARD, FRAME_DONE, FRAME_END_OF_ROUND,
    FRAME_PAGES, FRAME_POSTCOPY, MAX_DEVICE_STATE, MAX_RUNS, RUN_DATA, RUN_LEN, RUN_ZERO,
};
use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, DirtyHarvest};
use crate::bytes::{put_le_u32, put_le_u64};
use crate::checksum::Checksum;
use crate::memory::{GuestMemory, GuestMemoryError, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;
use crate::sys;
use crate::sys::socket::{self, MsgFlags};

/// Data bytes the sender puts in one pages frame: the pages are hashed right after the kernel
/// copied them, so they should still be in cache (this core's L2); and each frame costs a
/// `writev` here and two or three calls at the receiver, so frames should not be small; but a
/// frame larger than a Unix socket's default send buffer (208 KiB) is written in pieces, each
/// waiting for the receiver (measured: 256 KiB frames cost Unix sockets 20-40 % with sparse data,
/// 64 KiB frames cost TCP 10-20 %).
const FRAME_DATA: usize = 128 << 10;

/// Data bytes per pages frame on a TCP socket, whose send buffer grows to megabytes: fewer,
/// larger frames cost less there (measured: 128 KiB frames cost TCP loopback 10-20 % over
/// `write(2)` of the mapping, see `benches/migration.rs`).
const FRAME_DATA_TCP: usize = 512 << 10;

/// Pages a pages frame may have read (data pages, and zero pages that had to be read to be
/// found zero): a frame of sparse data closes after this much scanning, so that the receiver
/// gets to work on it while the next one is scanned.
const FRAME_READ_PAGES: usize = 128;

/// Data bytes hashed between two tries to send without blocking.
const HASH_BATCH: usize = 128 << 10;

/// The bounce buffer of the plain-`Write` path.
const BOUNCE_LEN: usize = 64 << 10;

/// What an [`end_round`](Sender::end_round) closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round number (0 for the first).
    pub round: u64,
    /// Pages the round covered, in [`STREAM_PAGE_SIZE`](super::STREAM_PAGE_SIZE) units: data
    /// pages and zero pages.
    pub pages: u64,
    /// Of those, the pages sent as zero runs (no data on the stream).
    pub zero_pages: u64,
    /// Guest bytes the round covered (`pages` × 4096).
    pub bytes: u64,
}

/// Puts guest memory on a migration stream (see the [module docs](super) for the format).
///
/// Made with [`new_vectored`](Self::new_vectored) on a file descriptor (a socket, a pipe, a
/// file), a pages frame (header, runs and data) leaves in one `writev(2)`, read by the kernel
/// straight from guest memory. Made with [`new`](Self::new) on any other `Write`, pages are
/// copied through a 64 KiB buffer. Pages of zeros go as zero runs, with no data.
///
/// ```
/// use guestmem::migration::Sender;
/// use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_obj(7u8, GuestAddress(0x3000)).unwrap();
/// mem.write_obj(0u8, GuestAddress(0x5000)).unwrap(); // dirty, but still zero
/// let mut sender = Sender::new(Vec::new()).unwrap();
/// assert_eq!(sender.send_dirty(&mem).unwrap(), 2); // the two dirty pages
/// let end = sender.end_round().unwrap();
/// assert_eq!((end.round, end.pages, end.zero_pages, end.bytes), (0, 2, 1, 8192));
/// let stream = sender.finish(&mem).unwrap();
/// // Stream header, a pages frame (2 runs, 1 page of data), end of round, checksums (one
/// // region), done.
/// assert_eq!(stream.len(), 32 + (32 + 2 * 16 + 4096) + 32 + (32 + 32) + 32);
/// ```
#[derive(Debug)]
pub struct Sender<W> {
    stream: W,
    /// How to reach the stream's fd, when it has one: the `writev` path.
    fd: Option<fn(&W) -> BorrowedFd<'_>>,
    id: StreamId,
    round: u64,
    round_pages: u64,
    round_zero_pages: u64,
    stream_bytes: u64,
    verify_memory: bool,
    /// Whether the device state frame was sent (at most once, then only the checksums).
    device_state_sent: bool,
    bounce: Vec<u8>,
    /// The ranges of the last harvest, kept to put them back if the send fails.
    ranges: Vec<(GuestAddress, u64)>,
    /// The hash of every page's last sent contents.
    tables: Arc<Tables>,
    /// `/proc/self/pagemap`, once a send needed it (`None` inside: not available).
    pagemap: Option<Option<Arc<Pagemap>>>,
    /// Regions (host address, length) whose absent pages read as zero, or not, as the mapping
    /// looks in this call (found out again every call: a region may be replaced by another).
    trusted: Vec<(usize, usize, Trust)>,
    /// Regions (host address, length) known not to be registered with userfaultfd (`true`)
    /// or known to be: asked once per region and sender, as it costs a page-table walk.
    userfaultfd: Vec<(usize, usize, bool)>,
    batch: Batch,
    /// Data runs on the stream whose pages are not hashed yet (see [`flush`](Self::flush)).
    pending: VecDeque<Run>,
    /// Whether the stream is a socket, so that a send can be tried without blocking; `None`
    /// until found out.
    socket: Option<bool>,
    /// The region of the last piece scanned (host address and length).
    last_region: Option<(usize, usize)>,
}

impl<W: Write + AsFd> Sender<W> {
    /// A sender on a file descriptor: writes the stream header, then sends pages with
    /// `writev(2)` straight from guest memory. `stream` must not buffer (a `TcpStream`,
    /// `UnixStream`, `File`, `ChildStdin`, ...): bytes are written to the fd, not through
    /// `Write`.
    pub fn new_vectored(stream: W) -> Result<Self> {
        Self::with_id(stream, Some(<W as AsFd>::as_fd), StreamId::single(), Arc::default())
    }
}

impl<W: Write> Sender<W> {
    /// A sender on any `Write`: writes the stream header; pages go through a bounce buffer.
    pub fn new(stream: W) -> Result<Self> {
        Self::with_id(stream, None, StreamId::single(), Arc::default())
    }

    /// A sender for stream `id` of a migration whose sent pages are recorded in `tables`.
    pub(super) fn with_id(
        stream: W,
        fd: Option<fn(&W) -> BorrowedFd<'_>>,
        id: StreamId,
        tables: Arc<Tables>,
    ) -> Result<Self> {
        let mut s = Sender {
            stream,
            fd,
            id,
            round: 0,
            round_pages: 0,
            round_zero_pages: 0,
            stream_bytes: 0,
            verify_memory: false,
            device_state_sent: false,
            bounce: Vec::new(),
            ranges: Vec::new(),
            tables,
            pagemap: None,
            trusted: Vec::new(),
            userfaultfd: Vec::new(),
            batch: Batch::new(),
            pending: VecDeque::new(),
            socket: None,
            last_region: None,
        };
        if let Some(fd) = s.fd {
            if matches!(socket::domain(fd(&s.stream)), Some(libc::AF_INET | libc::AF_INET6)) {
                s.batch.frame_data = FRAME_DATA_TCP;
            }
        }
        s.write_all(&stream_header(id), "writing the stream header")?;
        Ok(s)
    }

    /// Also verify every region's full contents at the end: [`finish`](Self::finish) reads
    /// all of the (paused) source memory and sends a digest of it, which the receiver
    /// compares with a digest of its own memory. This catches what the stream cannot see (a
    /// write that dirty tracking missed), for the price of reading all of memory once more at
    /// both ends, in parallel. Off by default.
    #[must_use]
    pub fn verify_memory(mut self, on: bool) -> Self {
        self.verify_memory = on;
        self
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

    /// Sends the guest ranges `ranges` (`(start, length)`, rounded out to whole 4 KiB pages;
    /// empty ones are skipped, wherever they point): data pages as data, pages of zeros as
    /// zero runs. Every non-empty range is checked to lie in `mem` first, and every region of
    /// `mem` to start and end on a 4 KiB page: an invalid list sends nothing. Returns the guest
    /// bytes sent (whole pages).
    ///
    /// ```
    /// use guestmem::migration::Sender;
    /// use guestmem::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    /// let mut sender = Sender::new(Vec::new()).unwrap();
    /// assert_eq!(sender.send_ranges(&mem, &[(GuestAddress(0x1000), 0x2000)]).unwrap(), 0x2000);
    /// // 16 bytes from 0x1ff8 are on two pages.
    /// assert_eq!(sender.send_ranges(&mem, &[(GuestAddress(0x1ff8), 16)]).unwrap(), 0x2000);
    /// assert!(sender.send_ranges(&mem, &[(GuestAddress(0xf000), 0x2000)]).is_err());
    /// // An empty range is skipped, even at an address without memory.
    /// assert_eq!(sender.send_ranges(&mem, &[(GuestAddress(1 << 40), 0)]).unwrap(), 0);
    /// ```
    pub fn send_ranges<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        ranges: &[(GuestAddress, u64)],
    ) -> Result<u64> {
        check_regions(mem)?;
        // An empty range sends nothing, so its address needs no memory behind it.
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            check_range(mem, addr, len)?;
        }
        let tables = self.tables.for_memory(mem);
        self.trusted.clear();
        // One pagemap reader for the call: scattered pages of one window share its lookup.
        let pagemap = self.pagemap();
        let mut absent = pagemap.as_deref().map(AbsentPages::new);
        let before = self.round_pages;
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            // The range's bytes, region by region, each piece rounded out to whole pages (the
            // last page of a region whose length is not a page multiple is partial).
            let mut at = addr.0;
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.map_err(|source| MigrationError::Memory { addr, len, source })?;
                let end = at + slice.len() as u64;
                let r = tables.partition_point(|t| t.first_page() <= at / PAGE as u64) - 1;
                let region = mem.iter().nth(r).expect("one table per region");
                let key = (region.host_ptr() as usize, region.len() as usize);
                let first = at & !(PAGE as u64 - 1);
                let pages = (end.next_multiple_of(PAGE as u64) - first) / PAGE as u64;
                // The piece's first page starts in the region (regions start on a page): its
                // host address is in the region's mapping, which covers whole pages.
                let host = slice.as_ptr().cast_const().wrapping_sub((at - first) as usize);
                let piece = (GuestAddress(first), host, pages as usize);
                if let Err(e) = self.send_piece(mem, &tables, piece, r, key, absent.as_mut()) {
                    self.pending.clear();
                    return Err(e);
                }
                at = end;
            }
        }
        let flushed = self.flush(mem, &tables);
        // Every page sent in this call is hashed before it returns (the pending runs name this
        // call's tables and memory); after a failure they no longer matter.
        if flushed.is_ok() {
            while self.hash_pending(mem, &tables)? {}
        }
        self.pending.clear();
        flushed?;
        Ok((self.round_pages - before) * PAGE as u64)
    }

    /// Sends every region of `mem` whole (round 0 of a pre-copy). Returns the guest bytes sent.
    pub fn send_all<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u64> {
        let ranges: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        self.send_ranges(mem, &ranges)
    }

    /// Harvests `mem`'s dirty pages ([`GuestMemoryMmap::take_dirty_ranges`]: taken and
    /// cleared) and sends them. If sending fails, the harvested ranges are put back
    /// ([`GuestMemoryMmap::restore_dirty_ranges`]), so a later attempt still has them. Returns
    /// the number of dirty pages harvested (in the bitmaps' page size).
    ///
    /// A region without dirty tracking fails the call before anything is taken from any
    /// region; whatever a failing harvest did report is put back too.
    pub fn send_dirty<B: Bitmap + DirtyHarvest>(&mut self, mem: &GuestMemoryMmap<B>) -> Result<usize> {
        let mut ranges = std::mem::take(&mut self.ranges);
        let result = harvest_and_send(mem, &mut ranges, |ranges| self.send_ranges(mem, ranges));
        self.ranges = ranges;
        result
    }

    /// Closes the current round with an end-of-round frame (its number and page counts) and
    /// starts the next. Returns what the round held.
    pub fn end_round(&mut self) -> Result<RoundEnd> {
        let end = RoundEnd {
            round: self.round,
            pages: self.round_pages,
            zero_pages: self.round_zero_pages,
            bytes: self.round_pages * PAGE as u64,
        };
        let data_pages = end.pages - end.zero_pages;
        self.write_all(
            &frame_header(FRAME_END_OF_ROUND, end.round, data_pages, end.zero_pages),
            "writing an end-of-round frame",
        )?;
        self.round += 1;
        self.round_pages = 0;
        self.round_zero_pages = 0;
        Ok(end)
    }

    /// Sends the device state: an opaque blob (vCPU registers, device models, ...) that the
    /// destination needs to resume the guest, and gets from
    /// [`Receiver::take_device_state`](super::Receiver::take_device_state) once the whole
    /// stream is verified. Call it with the source paused, after the final round's
    /// [`end_round`](Self::end_round) and before [`finish`](Self::finish); at most once, on a
    /// single stream or on stream 0 of a [`MultiSender`](super::MultiSender). The blob is 1
    /// to [`MAX_DEVICE_STATE`] bytes and travels with a checksum of its own.
    ///
    /// Fails with [`MigrationError::DeviceState`] (nothing written) if the state is empty or
    /// too large, was already sent, the current round has pages (end it first), or this is
    /// not stream 0.
    pub fn send_device_state(&mut self, state: &[u8]) -> Result<()> {
        let refuse = |what| Err(MigrationError::DeviceState(what));
        if self.id.index != 0 {
            return refuse("device state goes on stream 0 only");
        }
        if self.device_state_sent {
            return refuse("device state was already sent");
        }
        if self.round_pages != 0 {
            return refuse("device state inside a round that has pages (end the round first)");
        }
        if state.is_empty() {
            return refuse("empty device state");
        }
        if state.len() as u64 > MAX_DEVICE_STATE {
            return refuse("device state larger than MAX_DEVICE_STATE");
        }
        let header = frame_header(FRAME_DEVICE_STATE, state.len() as u64, Checksum::of(state), 0);
        self.write_all(&header, "writing the device state frame")?;
        self.write_all(state, "writing the device state frame")?;
        self.device_state_sent = true;
        Ok(())
    }

    /// The post-copy start frame (see [`postcopy`](super::postcopy)): the stale runs
    /// (guest address, pages), ascending, each in one region. Called by
    /// [`Precopy::postcopy`](super::Precopy::postcopy) between rounds; memory digests are
    /// turned off, as the destination guest runs before the end.
    pub(super) fn send_postcopy_start(&mut self, runs: &[(u64, u64)], may_be_empty: bool) -> Result<()> {
        self.send_stale_runs(FRAME_POSTCOPY, runs, may_be_empty, "writing the post-copy start frame")?;
        self.verify_memory = false;
        Ok(())
    }

    /// A discard frame: the destination drops its copy of `runs` now (see
    /// [`Precopy::discard_round`](super::Precopy::discard_round)).
    pub(super) fn send_discard(&mut self, runs: &[(u64, u64)]) -> Result<()> {
        self.send_stale_runs(FRAME_DISCARD, runs, false, "writing a discard frame")
    }

    fn send_stale_runs(
        &mut self,
        kind: u32,
        runs: &[(u64, u64)],
        may_be_empty: bool,
        op: &'static str,
    ) -> Result<()> {
        if self.id.index != 0 || self.id.count != 1 || self.device_state_sent || self.round_pages != 0 {
            return Err(MigrationError::Postcopy("post-copy starts between rounds of a single stream"));
        }
        // A run has a 32-bit page count: longer ones are split.
        let mut raw = Vec::with_capacity(runs.len() * RUN_LEN);
        let (mut count, mut total) = (0u64, 0u64);
        for &(addr, pages) in runs {
            let mut at = 0;
            while at < pages {
                let n = (pages - at).min(u64::from(u32::MAX));
                let mut run = [0u8; RUN_LEN];
                put_le_u64(&mut run, 0, addr + at * PAGE as u64);
                put_le_u32(&mut run, 8, n as u32);
                put_le_u32(&mut run, 12, RUN_DATA);
                raw.extend_from_slice(&run);
                (at, count, total) = (at + n, count + 1, total + n);
            }
        }
        if count == 0 && !may_be_empty || count > super::postcopy::MAX_POSTCOPY_RUNS {
            return Err(MigrationError::Postcopy("post-copy needs 1 to MAX_POSTCOPY_RUNS stale runs"));
        }
        self.write_all(&frame_header(kind, count, total, 0), op)?;
        self.write_all(&raw, op)
    }

    /// Ends the stream: the digest of every region of `mem` (of the pages sent; with
    /// [`verify_memory`](Self::verify_memory) also of its contents, read now: the source must
    /// be paused, or they describe no single moment), then done. Flushes and returns the
    /// stream.
    pub fn finish<M: GuestMemory + ?Sized>(mut self, mem: &M) -> Result<W> {
        if self.id.index == 0 {
            self.send_checksums(mem)?;
        }
        self.write_all(&frame_header(FRAME_DONE, 0, 0, 0), "writing the done frame")?;
        self.stream.flush().map_err(io_error("flushing the stream"))?;
        Ok(self.stream)
    }

    /// The checksums frame: its header first, so that the receiver computes its memory
    /// digests while this side computes its own.
    fn send_checksums<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<()> {
        check_regions(mem)?;
        let count = mem.num_regions() as u64;
        let flags = if self.verify_memory { CHECKSUMS_MEMORY } else { 0 };
        self.write_all(&frame_header(FRAME_CHECKSUMS, count, flags, 0), "writing the checksums frame")?;
        let tables = self.tables.for_memory(mem);
        self.trusted.clear();
        let mut entries = Vec::new();
        for (region, table) in mem.iter().zip(&tables) {
            let memory = if self.verify_memory {
                let pagemap = self.pagemap();
                let key = (region.host_ptr() as usize, region.len() as usize);
                // The source is paused: whether it is trusted is asked now, whatever it costs.
                let trust = self.trust(key) != Trust::No && self.confirm(key);
                memory_digest(region, pagemap.as_deref().filter(|_| trust))?
            } else {
                0
            };
            let mut entry = [0u8; CHECKSUM_ENTRY_LEN];
            put_le_u64(&mut entry, 0, region.start_addr().0);
            put_le_u64(&mut entry, 8, region.len());
            put_le_u64(&mut entry, 16, table.digest());
            put_le_u64(&mut entry, 24, memory);
            entries.extend_from_slice(&entry);
        }
        self.write_all(&entries, "writing the checksums frame")
    }

    fn pagemap(&mut self) -> Option<Arc<Pagemap>> {
        self.pagemap.get_or_insert_with(|| Pagemap::open().map(Arc::new)).clone()
    }

    /// Whether the absent pages of the region `(host, len)` read as zero (see `residency`), as
    /// far as is known in this call.
    fn trust(&mut self, key: (usize, usize)) -> Trust {
        if let Some(&(_, _, t)) = self.trusted.iter().find(|&&(h, l, _)| (h, l) == key) {
            return t;
        }
        let t = if self.pagemap().is_none() || !residency::private_anonymous(key.0 as *const u8, key.1) {
            Trust::No
        } else {
            match self.userfaultfd.iter().find(|&&(h, l, _)| (h, l) == key) {
                Some(&(_, _, true)) => Trust::Yes,
                Some(&(_, _, false)) => Trust::No,
                None => Trust::Maps,
            }
        };
        self.trusted.push((key.0, key.1, t));
        t
    }

    /// Settles whether a region that maps as private anonymous memory is trusted: asks about
    /// userfaultfd (once per region and sender). Returns the answer.
    fn confirm(&mut self, key: (usize, usize)) -> bool {
        let Some(i) = self.trusted.iter().position(|e| (e.0, e.1) == key) else { return false };
        if self.trusted[i].2 == Trust::Maps {
            let clear = residency::not_userfaultfd(key.0 as *const u8, key.1);
            self.userfaultfd.push((key.0, key.1, clear));
            self.trusted[i].2 = if clear { Trust::Yes } else { Trust::No };
        }
        self.trusted[i].2 == Trust::Yes
    }

    fn write_all(&mut self, bytes: &[u8], op: &'static str) -> Result<()> {
        match self.fd {
            Some(fd) => {
                let mut iov = [libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() }];
                let mut start = skip_empty(&iov, 0);
                let mut result = Ok(());
                while start < iov.len() {
                    let rest = &iov[start..];
                    let fd = fd(&self.stream);
                    let n = if self.socket != Some(false) {
                        // SAFETY: the iovec describes `bytes`, borrowed for the call (advanced
                        // within it).
                        let sent = sys::retry_eintr(|| unsafe {
                            socket::send_vectored(fd, rest, MsgFlags::NOSIGNAL)
                        });
                        match sent {
                            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                                self.socket = Some(false);
                                continue;
                            }
                            other => {
                                // Anything but ENOTSOCK comes from a socket.
                                self.socket = Some(true);
                                other
                            }
                        }
                    } else {
                        // SAFETY: as above.
                        sys::retry_eintr(|| unsafe { sys::fd::writev(fd, rest) })
                    };
                    match n.and_then(|n| advance(&mut iov, start, n)) {
                        Ok(next) => start = next,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
            None => self.stream.write_all(bytes),
        }
        .map_err(io_error(op))?;
        self.stream_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Scans the piece `(at, host, pages)`: `pages` pages of region `r` (`key`: its host
    /// address and length) from guest address `at` (host address `host`), and adds each to the
    /// frame being built, as data or as zero. An absent page of trusted memory (see
    /// `residency`; `absent` looks them up, shared by the pieces of a call) is zero without being
    /// read; any other page is read up to its first non-zero bytes. Zero pages are recorded in the
    /// region's table now, data pages once they are on the stream (see [`flush`](Self::flush)).
    fn send_piece<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        tables: &[Arc<RegionTable>],
        (at, host, pages): (GuestAddress, *const u8, usize),
        r: usize,
        key: (usize, usize),
        mut absent: Option<&mut AbsentPages<'_>>,
    ) -> Result<()> {
        let zero_hash = page_hash::zero_page_hash();
        let table = &tables[r];
        let first = at.0 / PAGE as u64 - table.first_page();
        let mut trust = self.trust(key);
        if trust == Trust::No {
            absent = None;
        }
        if self.last_region != Some(key) {
            // Another region: what the lookups learnt of the last one says nothing of it.
            if let Some(a) = absent.as_deref_mut() {
                a.reset();
            }
            self.last_region = Some(key);
        }
        self.batch.new_run = true;
        for i in 0..pages {
            let page = host.wrapping_add(i * PAGE);
            let mut known_zero = absent.as_mut().is_some_and(|a| a.is_absent(page as usize, pages - i));
            if known_zero && trust == Trust::Maps {
                // The first absent page: now it is worth asking about userfaultfd.
                trust = if self.confirm(key) { Trust::Yes } else { Trust::No };
                if trust == Trust::No {
                    (known_zero, absent) = (false, None);
                }
            }
            let addr = GuestAddress(at.0 + (i * PAGE) as u64);
            let valid = valid_bytes(addr.0, table.end());
            let zero = known_zero
                || if valid < PAGE {
                    // A region's partial last page: its bytes in the region, then zeros.
                    let s = mem.get_slice(addr, valid).map_err(|source| MigrationError::Memory {
                        addr,
                        len: valid as u64,
                        source,
                    })?;
                    padded(&s).iter().all(|&b| b == 0)
                } else {
                    // SAFETY: the page lies in the slice of guest memory the caller got from
                    // `mem` (`pages` whole pages from `host`, all in the region), which `mem`
                    // keeps mapped while borrowed.
                    unsafe { page_hash::is_zero_page(page) }
                };
            if zero {
                table.set(first + i as u64, zero_hash);
            }
            if !self.batch.push(addr, zero, r, !known_zero) {
                self.flush(mem, tables)?;
                let pushed = self.batch.push(addr, zero, r, !known_zero);
                debug_assert!(pushed);
            }
            self.round_pages += 1;
            self.round_zero_pages += u64::from(zero);
        }
        Ok(())
    }

    /// Writes the frame being built, if it has runs, then records the hash of each of its data
    /// pages in `tables` (the tables of the memory, indexed as the runs say). The pages are
    /// hashed right after the kernel copied them, while they are in cache. A page written in
    /// between may hash differently from what went on the stream: it is dirty, so a later round
    /// sends it again, and the tables agree once the source is paused.
    fn flush<M: GuestMemory + ?Sized>(&mut self, mem: &M, tables: &[Arc<RegionTable>]) -> Result<()> {
        let n = self.batch.runs.len();
        if n == 0 {
            return Ok(());
        }
        let header = frame_header(FRAME_PAGES, n as u64, self.batch.data_bytes as u64, 0);
        let runs_len = n * RUN_LEN;
        self.batch.encode_runs();
        let data_len = self.batch.data_bytes;
        // A data run's bytes in its region (all of it, unless it ends with a partial page); the
        // zeros that pad it to whole pages on the stream follow it.
        let run_slice = |run: &Run| {
            let end = tables[run.table].end();
            let len = (run.pages as usize * PAGE).min(end.saturating_sub(run.addr.0) as usize);
            mem.get_slice(run.addr, len).map_err(|source| MigrationError::Memory {
                addr: run.addr,
                len: len as u64,
                source,
            })
        };
        match self.fd {
            Some(fd) => {
                let mut iov = Vec::with_capacity(n + 2);
                iov.push(libc::iovec { iov_base: header.as_ptr() as *mut _, iov_len: header.len() });
                iov.push(libc::iovec { iov_base: self.batch.encoded.as_ptr() as *mut _, iov_len: runs_len });
                for run in self.batch.runs.iter().filter(|r| !r.zero) {
                    let s = run_slice(run)?;
                    iov.push(s.as_iovec());
                    let pad = run.pages as usize * PAGE - s.len();
                    if pad > 0 {
                        iov.push(libc::iovec { iov_base: ZERO_PAGE.as_ptr() as *mut _, iov_len: pad });
                    }
                }
                // SAFETY: the first two iovecs describe `header` and the encoded runs, not
                // touched until the call returns; the others describe slices of guest memory
                // that `mem`, borrowed for the call, keeps mapped, and which the kernel only
                // reads.
                unsafe { self.write_frame(fd, &mut iov, mem, tables) }
                    .map_err(io_error("writing pages frames"))?;
            }
            None => {
                self.stream.write_all(&header).map_err(io_error("writing a pages frame"))?;
                self.stream
                    .write_all(&self.batch.encoded[..runs_len])
                    .map_err(io_error("writing a pages frame"))?;
                if self.bounce.is_empty() {
                    self.bounce = vec![0; BOUNCE_LEN];
                }
                for run in self.batch.runs.iter().filter(|r| !r.zero) {
                    let s = run_slice(run)?;
                    let mut done = 0;
                    while done < s.len() {
                        let k = (s.len() - done).min(BOUNCE_LEN);
                        let part = s.subslice(done, k).map_err(|e| MigrationError::Memory {
                            addr: run.addr,
                            len: s.len() as u64,
                            source: GuestMemoryError::from_volatile(run.addr, e),
                        })?;
                        part.copy_to(&mut self.bounce[..k]);
                        self.stream.write_all(&self.bounce[..k]).map_err(io_error("writing page data"))?;
                        done += k;
                    }
                    let pad = run.pages as usize * PAGE - s.len();
                    self.stream.write_all(&ZERO_PAGE[..pad]).map_err(io_error("writing page data"))?;
                }
            }
        }
        self.stream_bytes += (header.len() + runs_len + data_len) as u64;
        self.pending.extend(self.batch.runs.iter().filter(|r| !r.zero));
        // Hashed while in cache: at most two frames' worth wait.
        while self.pending.iter().map(|r| r.pages as usize * PAGE).sum::<usize>() > 2 * self.batch.frame_data
        {
            self.hash_pending(mem, tables)?;
        }
        self.batch.clear();
        Ok(())
    }
}

impl<W: Write> Sender<W> {
    /// Hashes the pages of the oldest pending data run into its table. Returns whether there
    /// was one.
    fn hash_pending<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        tables: &[Arc<RegionTable>],
    ) -> Result<bool> {
        let Some(run) = self.pending.pop_front() else { return Ok(false) };
        let table = &tables[run.table];
        let len = (run.pages as usize * PAGE).min(table.end().saturating_sub(run.addr.0) as usize);
        let s = mem.get_slice(run.addr, len).map_err(|source| MigrationError::Memory {
            addr: run.addr,
            len: len as u64,
            source,
        })?;
        let first = run.addr.0 / PAGE as u64 - table.first_page();
        hash_pages(&s, |p, hash| table.set(first + p as u64, hash));
        Ok(true)
    }

    /// Writes every byte of `iov` to the stream's fd. On a socket, while pages wait to be
    /// hashed, a send is first tried without blocking (`MSG_DONTWAIT`): when the socket is
    /// full, the sender hashes a pending run instead of waiting, so the hashing costs no time
    /// while the peer drains the socket. Otherwise (no run waiting, or not a socket) the call
    /// blocks; sockets are written with `MSG_NOSIGNAL` (a closed peer is `EPIPE`, never
    /// `SIGPIPE`).
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for the duration of the call.
    unsafe fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        fd: fn(&W) -> BorrowedFd<'_>,
        iov: &mut [libc::iovec],
        mem: &M,
        tables: &[Arc<RegionTable>],
    ) -> io::Result<()> {
        let mut start = skip_empty(iov, 0);
        while start < iov.len() {
            let rest = &iov[start..iov.len().min(start + sys::fd::IOV_MAX)];
            let fd = fd(&self.stream);
            let n = if self.socket != Some(false) {
                let flags = if self.pending.is_empty() {
                    MsgFlags::NOSIGNAL
                } else {
                    MsgFlags::NOSIGNAL | MsgFlags::DONTWAIT
                };
                // SAFETY: the caller guarantees every iovec is readable; `rest` holds suffixes
                // of them, advanced within their bounds.
                match unsafe { socket::send_vectored(fd, rest, flags) } {
                    Ok(n) => {
                        self.socket = Some(true);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && flags.contains(MsgFlags::DONTWAIT) => {
                        // A try costs a system call: hash 128 KiB between two.
                        let mut bytes = 0;
                        while bytes < HASH_BATCH {
                            let Some(run) = self.pending.front() else { break };
                            bytes += run.pages as usize * PAGE;
                            self.hash_pending(mem, tables).map_err(|e| io::Error::other(e.to_string()))?;
                        }
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                        self.socket = Some(false);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            } else {
                // SAFETY: as above.
                sys::retry_eintr(|| unsafe { sys::fd::writev(fd, rest) })?
            };
            start = advance(iov, start, n)?;
        }
        Ok(())
    }
}

/// The first iovec from `start` on that is not empty.
fn skip_empty(iov: &[libc::iovec], mut start: usize) -> usize {
    while start < iov.len() && iov[start].iov_len == 0 {
        start += 1;
    }
    start
}

/// After a call that took `n` bytes of `iov[start..]`: the written iovecs are skipped and the
/// first unfinished one is advanced; returns the new start. `WriteZero` for `n == 0`.
fn advance(iov: &mut [libc::iovec], mut start: usize, mut n: usize) -> io::Result<usize> {
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
    Ok(skip_empty(iov, start))
}

/// The digest of a region's contents now: every page's hash (see `page_hash`). With
/// `pagemap` (the region is trusted, see `residency`), absent pages count as zero pages
/// without being read.
pub(super) fn memory_digest<R: GuestMemoryRegion + ?Sized>(
    region: &R,
    pagemap: Option<&Pagemap>,
) -> Result<u64> {
    let (start, len) = (region.start_addr(), region.len());
    let n = usize::try_from(len).map_err(|_| MigrationError::Memory {
        addr: start,
        len,
        source: GuestMemoryError::Overflow { addr: start, len: usize::MAX },
    })?;
    let slice = region
        .get_slice(crate::address::MemoryRegionAddress(0), n)
        .map_err(|source| MigrationError::Memory { addr: start, len, source })?;
    let host = slice.as_ptr();
    let mut absent = pagemap.map(AbsentPages::new);
    let zero_hash = page_hash::zero_page_hash();
    let first_page = start.0 / PAGE as u64;
    let mut digest = Digest::default();
    let pages = n.div_ceil(PAGE);
    for i in 0..pages {
        let page = host.wrapping_add(i * PAGE);
        let hash = if absent.as_mut().is_some_and(|a| a.is_absent(page as usize, pages - i)) {
            zero_hash
        } else if (i + 1) * PAGE > n {
            // The partial last page: its bytes, then zeros.
            let s = slice.subslice(i * PAGE, n - i * PAGE).map_err(|e| MigrationError::Memory {
                addr: start,
                len,
                source: GuestMemoryError::from_volatile(start, e),
            })?;
            let page = padded(&s);
            // SAFETY: `page` is a 4096-byte local array.
            unsafe { page_hash::hash_page(page.as_ptr()) }
        } else {
            // SAFETY: the page lies in the region's slice, which `region` keeps mapped while
            // borrowed.
            unsafe { page_hash::hash_page(page) }
        };
        digest.add(first_page + i as u64, hash);
    }
    Ok(digest.finish())
}

/// Checks that `[addr, addr + len)` (`len > 0`) lies in `mem` and that the whole pages holding
/// it do not wrap past the top of the address space.
pub(super) fn check_range<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: u64) -> Result<()> {
    let overflow = || MigrationError::Memory {
        addr,
        len,
        source: GuestMemoryError::Overflow { addr, len: usize::try_from(len).unwrap_or(usize::MAX) },
    };
    addr.0.checked_add(len).and_then(|e| e.checked_next_multiple_of(PAGE as u64)).ok_or_else(overflow)?;
    let n = usize::try_from(len).map_err(|_| overflow())?;
    mem.check_access(addr, n, false).map_err(|source| MigrationError::Memory { addr, len, source })
}

/// Takes `mem`'s dirty pages into `ranges` (cleared first) and hands them to `send`; returns
/// the number of dirty pages harvested (in the bitmaps' page size). Every region must be able
/// to report its pages before any region gives them up, and whatever was taken is put back if
/// the harvest or `send` fails. Shared by [`Sender::send_dirty`] and
/// [`MultiSender::send_dirty`](super::MultiSender::send_dirty).
pub(super) fn harvest_and_send<B: Bitmap + DirtyHarvest>(
    mem: &GuestMemoryMmap<B>,
    ranges: &mut Vec<(GuestAddress, u64)>,
    send: impl FnOnce(&[(GuestAddress, u64)]) -> Result<u64>,
) -> Result<usize> {
    for region in mem.iter() {
        region.bitmap().page_size()?;
    }
    ranges.clear();
    let result = match mem.take_dirty_ranges(|addr, len| ranges.push((addr, len))) {
        Ok(pages) => send(ranges).map(|_| pages),
        Err(e) => Err(e.into()),
    };
    if result.is_err() {
        // The ranges came from this memory's harvest: putting them back cannot fail.
        let _ = mem.restore_dirty_ranges(ranges);
    }
    result
}

/// Every region of `mem` starts on a stream page, or the stream cannot carry it. (Its length
/// need not be a page multiple: its last page is then partial, and only its bytes inside the
/// region count.)
pub(crate) fn check_regions<M: GuestMemory + ?Sized>(mem: &M) -> Result<()> {
    for r in mem.iter() {
        if !r.start_addr().0.is_multiple_of(PAGE as u64) {
            return Err(MigrationError::Memory {
                addr: r.start_addr(),
                len: r.len(),
                source: GuestMemoryError::UnalignedRegion { base: r.start_addr(), align: PAGE as u64 },
            });
        }
    }
    Ok(())
}

/// The bytes of the page at `addr` (page aligned) that lie in its region, which ends at
/// `end`: 4096, or fewer for a region's partial last page.
fn valid_bytes(addr: u64, end: u64) -> usize {
    end.saturating_sub(addr).min(PAGE as u64) as usize
}

/// A partial page's bytes (`s`, fewer than 4096) followed by zeros: what its hash and zero test
/// see.
pub(super) fn padded<S: crate::bitmap::BitmapSlice>(s: &crate::volatile::VolatileSlice<'_, S>) -> [u8; PAGE] {
    let mut page = [0u8; PAGE];
    s.copy_to(&mut page[..s.len().min(PAGE)]);
    page
}

/// Zeros, for the bytes of a partial page past its region's end on the stream.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Calls `record(p, hash)` with the hash of every page `p` of the slice `s` (whole pages from
/// a page boundary, the last one possibly partial: its bytes, then zeros).
pub(super) fn hash_pages<S: crate::bitmap::BitmapSlice>(
    s: &crate::volatile::VolatileSlice<'_, S>,
    mut record: impl FnMut(usize, u32),
) {
    let whole = s.len() / PAGE;
    for p in 0..whole {
        // SAFETY: page `p` lies in the slice, valid for reads while it is borrowed.
        record(p, unsafe { page_hash::hash_page(s.as_ptr().add(p * PAGE)) });
    }
    if let Ok(tail) = s.subslice(whole * PAGE, s.len() - whole * PAGE) {
        if !tail.is_empty() {
            let page = padded(&tail);
            // SAFETY: `page` is a 4096-byte local array.
            record(whole, unsafe { page_hash::hash_page(page.as_ptr()) });
        }
    }
}

/// What a sender knows of a region's absent pages (see `residency`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    /// They may hold data: read every page.
    No,
    /// Private anonymous memory; not yet asked about userfaultfd.
    Maps,
    /// They read as zero.
    Yes,
}

/// One run of the frame being built.
#[derive(Clone, Copy, Debug)]
struct Run {
    addr: GuestAddress,
    pages: u32,
    zero: bool,
    /// The index of its region's table.
    table: usize,
}

/// The pages frame being built: its runs, then encoded for the stream.
#[derive(Debug)]
struct Batch {
    runs: Vec<Run>,
    data_bytes: usize,
    /// Pages of the frame that were read to be scanned (data pages, and zero pages not known
    /// absent).
    read_pages: usize,
    /// The next page starts a run of its own (a new piece of memory: runs never cross regions).
    new_run: bool,
    encoded: Box<[u8]>,
    /// Data bytes a frame closes at.
    frame_data: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            runs: Vec::with_capacity(MAX_RUNS),
            data_bytes: 0,
            read_pages: 0,
            new_run: true,
            encoded: vec![0; MAX_RUNS * RUN_LEN].into_boxed_slice(),
            frame_data: FRAME_DATA,
        }
    }

    /// Adds the page at `addr` (of the region whose table is `table`); `false` if the frame is
    /// full (flush, then push again).
    fn push(&mut self, addr: GuestAddress, zero: bool, table: usize, read: bool) -> bool {
        if !zero && self.data_bytes + PAGE > self.frame_data {
            return false;
        }
        if read && self.read_pages >= FRAME_READ_PAGES {
            return false;
        }
        let extend = !self.new_run
            && self.runs.last().is_some_and(|r| {
                r.zero == zero && r.pages < u32::MAX && r.addr.0 + u64::from(r.pages) * PAGE as u64 == addr.0
            });
        if extend {
            if let Some(r) = self.runs.last_mut() {
                r.pages += 1;
            }
        } else {
            // Runs of a frame go up in address order: a page below the last run's end starts
            // a new frame.
            let below =
                self.runs.last().is_some_and(|r| addr.0 < r.addr.0 + u64::from(r.pages) * PAGE as u64);
            if self.runs.len() == MAX_RUNS || below {
                return false;
            }
            self.runs.push(Run { addr, pages: 1, zero, table });
            self.new_run = false;
        }
        if !zero {
            self.data_bytes += PAGE;
        }
        self.read_pages += usize::from(read);
        true
    }

    #[cfg(test)]
    fn push_test(&mut self, addr: GuestAddress, zero: bool) -> bool {
        self.push(addr, zero, 0, false)
    }

    fn encode_runs(&mut self) {
        for (run, out) in self.runs.iter().zip(self.encoded.chunks_exact_mut(RUN_LEN)) {
            put_le_u64(out, 0, run.addr.0);
            put_le_u32(out, 8, run.pages);
            put_le_u32(out, 12, if run.zero { RUN_ZERO } else { RUN_DATA });
        }
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.data_bytes = 0;
        self.read_pages = 0;
        self.new_run = true;
    }
}

/// Calls `write` (a `writev`-like call) until every byte of `iov` is written: after a partial
/// write, the written iovecs are skipped and the first unfinished one is advanced.
#[cfg(test)]
fn gather_all(
    iov: &mut [libc::iovec],
    mut write: impl FnMut(&[libc::iovec]) -> io::Result<usize>,
) -> io::Result<()> {
    let mut start = skip_empty(iov, 0);
    while start < iov.len() {
        let n = write(&iov[start..])?;
        start = advance(iov, start, n)?;
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
    fn batches_merge_runs_and_split_frames() {
        let mut b = Batch::new();
        let page = |p: u64| GuestAddress(p * PAGE as u64);
        // Contiguous pages of one kind merge; a change of kind or a gap starts a run.
        for (p, zero) in [(0, false), (1, false), (2, true), (3, true), (5, true), (6, false)] {
            assert!(b.push_test(page(p), zero));
        }
        let runs: Vec<_> = b.runs.iter().map(|r| (r.addr.0 / PAGE as u64, r.pages, r.zero)).collect();
        assert_eq!(runs, [(0, 2, false), (2, 2, true), (5, 1, true), (6, 1, false)]);
        assert_eq!(b.data_bytes, 3 * PAGE);
        // A new piece never extends the last run; a page below the last run needs a new frame.
        b.new_run = true;
        assert!(b.push_test(page(7), false));
        assert_eq!(b.runs.len(), 5);
        assert!(!b.push_test(page(1), true));
        // The data limit, and the run limit.
        b.clear();
        for p in 0..(FRAME_DATA / PAGE) as u64 {
            assert!(b.push_test(page(p), false));
        }
        assert!(!b.push_test(page(1 << 20), false));
        assert!(b.push_test(page(1 << 20), true), "zero pages carry no data");
        b.clear();
        for p in 0..MAX_RUNS as u64 {
            assert!(b.push_test(page(2 * p), true));
        }
        assert!(!b.push_test(page(2 * MAX_RUNS as u64), true));
        assert!(b.push_test(page(2 * MAX_RUNS as u64 - 1), true), "extending the last run is fine");
        // The scanning limit: pages read close a frame; pages known zero without reading do not.
        b.clear();
        for p in 0..FRAME_READ_PAGES as u64 {
            assert!(b.push(page(p), true, 0, true));
        }
        assert!(!b.push(page(FRAME_READ_PAGES as u64), true, 0, true));
        assert!(b.push(page(FRAME_READ_PAGES as u64), true, 0, false));
    }
}
