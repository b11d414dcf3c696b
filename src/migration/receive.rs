//! The receiving side: every frame validated, pages written into destination memory.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::multi::Rendezvous;
use super::page_hash::{self, PAGE};
use super::postcopy::{PostcopyStart, Received, StaleRun, MAX_POSTCOPY_RUNS};
use super::residency::{self, AbsentPages, Pagemap};
use super::send::{check_regions, memory_digest};
use super::tables::{RegionTable, Tables};
use super::{
    frame_name, MigrationError, Result, StreamId, CHECKSUMS_MEMORY, CHECKSUM_ENTRY_LEN, FRAME_CHECKSUMS,
    FRAME_DEVICE_STATE, FRAME_DISCARD, FRAME_DONE, FRAME_END_OF_ROUND, FRAME_HEADER_LEN, FRAME_PAGES,
    FRAME_POSTCOPY, MAGIC, MAX_DEVICE_STATE, MAX_FRAME_DATA, MAX_RUNS, MAX_STREAMS, RUN_DATA, RUN_LEN,
    RUN_ZERO, STREAM_HEADER_LEN, VERSION,
};
use crate::address::GuestAddress;
use crate::bitmap::BitmapSlice;
use crate::bytes::{le_u32, le_u64};
use crate::checksum::Checksum;
use crate::memory::{GuestMemory, GuestMemoryError};
use crate::region::GuestMemoryRegion;
use crate::sys;
use crate::sys::socket::{self, MsgFlags};

/// Data bytes hashed between two tries to receive without blocking.
const HASH_BATCH: usize = 128 << 10;

/// The bounce buffer of the plain-`Read` path.
const BOUNCE_LEN: usize = 64 << 10;

/// What a complete stream (or set of streams) brought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Rounds closed by an end-of-round frame (on every stream).
    pub rounds: u64,
    /// Pages received, in [`STREAM_PAGE_SIZE`](super::STREAM_PAGE_SIZE) units: data pages
    /// and zero pages.
    pub pages: u64,
    /// Of those, the pages that came as zero runs.
    pub zero_pages: u64,
    /// Guest bytes the pages cover (`pages` × 4096).
    pub bytes: u64,
    /// Regions whose digests matched the source's.
    pub regions_verified: usize,
    /// Whether the source sent memory digests ([`Sender::verify_memory`](super::Sender::verify_memory)),
    /// so that every region's contents were compared too.
    pub memory_verified: bool,
    /// The length of the device state the stream carried
    /// ([`Receiver::take_device_state`] hands it out), if it carried one.
    pub device_state_len: Option<u64>,
}

impl ReceiveSummary {
    /// The sum of the counts of several streams of one migration (`rounds` and the
    /// verification are the same on every stream; they come from `self`).
    pub(super) fn add(&mut self, other: &ReceiveSummary) {
        self.pages += other.pages;
        self.zero_pages += other.zero_pages;
        self.bytes += other.bytes;
        self.regions_verified = self.regions_verified.max(other.regions_verified);
        self.memory_verified |= other.memory_verified;
        self.device_state_len = self.device_state_len.or(other.device_state_len);
    }
}

/// The destination as the receiving threads share it: the hash table of every region, and
/// which regions' absent pages read as zero.
#[derive(Debug)]
pub(super) struct Destination {
    tables: Vec<Arc<RegionTable>>,
    trusted: Vec<bool>,
    /// Which regions are private anonymous memory (whose pages a discard frame may drop).
    private: Vec<bool>,
    /// Each region's host address: post-copy must serve the very memory received into.
    hosts: Vec<usize>,
    pagemap: Option<Pagemap>,
}

impl Destination {
    pub(super) fn new<M: GuestMemory + ?Sized>(mem: &M) -> Result<Self> {
        check_regions(mem)?;
        let pagemap = Pagemap::open();
        let private: Vec<bool> =
            mem.iter().map(|r| residency::private_anonymous(r.host_ptr(), r.len() as usize)).collect();
        let trusted = private.iter().map(|&p| p && pagemap.is_some()).collect();
        let hosts = mem.iter().map(|r| r.host_ptr() as usize).collect();
        Ok(Destination { tables: Tables::default().for_memory(mem), trusted, private, hosts, pagemap })
    }

    /// Whether `mem` has the regions (places and lengths) this destination was made for.
    pub(super) fn same_layout<M: GuestMemory + ?Sized>(&self, mem: &M) -> bool {
        mem.num_regions() == self.tables.len()
            && mem.iter().zip(&self.tables).zip(&self.hosts).all(|((r, t), &host)| {
                r.start_addr().0 == t.first_page() * PAGE as u64
                    && r.start_addr().0 + r.len() == t.end()
                    && r.host_ptr() as usize == host
            })
    }

    /// A bitmap of one bit per page of the memory, all clear (for the pages discard frames
    /// dropped).
    fn page_bits(&self) -> Vec<u64> {
        let pages: u64 =
            self.tables.iter().map(|t| (t.end() - t.first_page() * PAGE as u64).div_ceil(PAGE as u64)).sum();
        vec![0; pages.div_ceil(64) as usize]
    }

    /// The bit of guest page `page` (in memory) in [`page_bits`](Self::page_bits).
    fn page_bit(&self, page: u64) -> u64 {
        let r = self.region_of(page);
        let before: u64 = self.tables[..r]
            .iter()
            .map(|t| (t.end() - t.first_page() * PAGE as u64).div_ceil(PAGE as u64))
            .sum();
        before + page - self.tables[r].first_page()
    }

    /// The hash table of region `i`.
    pub(super) fn table(&self, i: usize) -> &RegionTable {
        &self.tables[i]
    }

    /// The index of the region holding guest page `page` (known to be in memory).
    fn region_of(&self, page: u64) -> usize {
        self.tables.partition_point(|t| t.first_page() <= page) - 1
    }
}

/// Reads a migration stream into destination memory (see the [module docs](super) for the
/// format and what is checked).
///
/// Made with [`new_vectored`](Self::new_vectored) on a file descriptor, page data goes from
/// the kernel straight into guest memory with `readv(2)`; made with [`new`](Self::new) on any
/// other `Read`, it is copied through a 64 KiB buffer. Nothing is allocated from a length the
/// peer sent.
///
/// ```
/// use guestmem::migration::{MigrationError, Receiver, Sender};
/// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
/// src.write_obj(42u32, GuestAddress(0x2000)).unwrap();
/// let mut sender = Sender::new(Vec::new()).unwrap();
/// sender.send_all(&src).unwrap();
/// sender.end_round().unwrap();
/// let stream = sender.finish(&src).unwrap();
///
/// let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
/// let summary = Receiver::new(&stream[..]).receive(&dst).unwrap();
/// assert_eq!((summary.rounds, summary.pages, summary.zero_pages, summary.regions_verified), (1, 4, 3, 1));
/// assert_eq!(dst.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 42);
///
/// // A stream cut short is an error, not a hang or a panic.
/// let cut = Receiver::new(&stream[..100]).receive(&dst).unwrap_err();
/// assert!(matches!(cut, MigrationError::Truncated { .. }));
/// ```
#[derive(Debug)]
pub struct Receiver<R> {
    stream: R,
    /// How to reach the stream's fd, when it has one: the direct `readv(2)` path.
    fd: Option<fn(&R) -> BorrowedFd<'_>>,
    /// Bytes consumed so far: the position errors report.
    offset: u64,
    bounce: Vec<u8>,
    /// Where the bytes of a partial last page past its region are read to (vectored path).
    scratch: Box<[u8]>,
    /// The runs of the pages frame being read, as they arrived.
    raw_runs: Box<[u8]>,
    /// The next frame's header, read with the previous frame's data (vectored path).
    ahead: Option<Ahead>,
    /// Runs whose pages are in memory but not yet in the hash tables (see
    /// [`read_frame`](Self::read_frame)), oldest first.
    pending: VecDeque<Run>,
    /// Whether the stream is a socket, so that a receive can be tried without blocking;
    /// `None` until found out.
    socket: Option<bool>,
    /// The device state of the last verified receive, until taken.
    device_state: Option<Vec<u8>>,
    /// The stale runs of a post-copy start frame, once it arrived.
    postcopy: Option<Vec<StaleRun>>,
    /// The runs of the discard frames so far (dropped, to come in post-copy), and a bit per
    /// page of memory for them: no page may be discarded twice, nor listed again at the switch.
    discarded: Vec<StaleRun>,
    discarded_bits: Vec<u64>,
    /// Discard frames applied.
    discards: u64,
    /// Where acknowledgements go ([`set_return_path`](Self::set_return_path)).
    return_path: Option<ReturnPath>,
}

/// The receiver's return path: any writer.
struct ReturnPath(Box<dyn io::Write + Send>);

impl std::fmt::Debug for ReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReturnPath")
    }
}

/// A frame header read ahead: where it starts, and how much of it arrived.
#[derive(Clone, Copy, Debug)]
struct Ahead {
    offset: u64,
    bytes: [u8; FRAME_HEADER_LEN],
    got: usize,
}

/// One validated run of a pages frame.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) addr: GuestAddress,
    pub(super) pages: u64,
    /// Its bytes inside its region: `pages` × 4096, or fewer when it ends with the region's
    /// partial last page (on the stream the page is whole; the rest is ignored).
    valid: u64,
    pub(super) zero: bool,
    pub(super) region: usize,
}

impl<R: Read + AsFd> Receiver<R> {
    /// A receiver on a file descriptor: page data is read from the fd straight into guest
    /// memory. `stream` must not buffer (a `TcpStream`, `UnixStream`, `File`, `ChildStdout`,
    /// ...): headers are read through `Read`, page data from the fd.
    pub fn new_vectored(stream: R) -> Self {
        Self::with_path(stream, Some(<R as AsFd>::as_fd))
    }
}

impl<R: Read> Receiver<R> {
    /// A receiver on any `Read`; page data goes through a bounce buffer.
    pub fn new(stream: R) -> Self {
        Self::with_path(stream, None)
    }

    pub(super) fn with_path(stream: R, fd: Option<fn(&R) -> BorrowedFd<'_>>) -> Self {
        Receiver {
            stream,
            fd,
            offset: 0,
            bounce: Vec::new(),
            scratch: vec![0; PAGE].into_boxed_slice(),
            raw_runs: vec![0; MAX_RUNS * RUN_LEN].into_boxed_slice(),
            ahead: None,
            pending: VecDeque::new(),
            socket: None,
            device_state: None,
            postcopy: None,
            discarded: Vec::new(),
            discarded_bits: Vec::new(),
            discards: 0,
            return_path: None,
        }
    }

    /// The stream.
    pub fn into_inner(self) -> R {
        self.stream
    }

    /// The device state the source sent ([`Sender::send_device_state`](super::Sender::send_device_state))
    /// on the last receive, if it sent one and the receive succeeded: the whole stream,
    /// memory and device state, was verified. `None` after a failed receive, and once taken.
    pub fn take_device_state(&mut self) -> Option<Vec<u8>> {
        self.device_state.take()
    }

    /// Acknowledges on `return_path` (the other direction of the connection, say) every end
    /// of round and every discard frame once applied, so that the source can wait for the
    /// destination to catch up before it pauses the guest
    /// ([`Precopy::wait_for_destination`](super::Precopy::wait_for_destination)). An
    /// acknowledgement is 8 bytes, little-endian: `round << 12 | 1` after end of round `round`,
    /// `n << 12 | 2` after the `n`th discard frame (see [`postcopy`](super::postcopy)). A
    /// return path that fails to take one is an error of the receive.
    pub fn set_return_path(&mut self, return_path: impl io::Write + Send + 'static) {
        self.return_path = Some(ReturnPath(Box::new(return_path)));
    }

    fn acknowledge(&mut self, value: u64) -> Result<()> {
        match self.return_path.as_mut() {
            Some(ReturnPath(w)) => w
                .write_all(&value.to_le_bytes())
                .and_then(|()| w.flush())
                .map_err(|source| MigrationError::Io { op: "acknowledging on the return path", source }),
            None => Ok(()),
        }
    }

    /// Bytes of the stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the whole stream (header, frames, checksums, done) into `mem` and verifies every
    /// region's digests. Stops at the done frame (later bytes are left unread).
    pub fn receive<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<ReceiveSummary> {
        match self.receive_or_postcopy(mem)? {
            Received::Complete(summary) => Ok(summary),
            Received::Postcopy(_) => Err(MigrationError::Postcopy(
                "the source switched to post-copy (receive the stream with receive_or_postcopy)",
            )),
        }
    }

    /// [`receive`](Self::receive), for a source that may switch to post-copy
    /// ([`Precopy::postcopy`](super::Precopy::postcopy)): returns
    /// [`Received::Complete`] at the end of a whole stream, or [`Received::Postcopy`] once the
    /// post-copy start and the device state arrived (see [`postcopy`](super::postcopy)).
    pub fn receive_or_postcopy<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<Received> {
        let dest = Destination::new(mem)?;
        let id = self.read_stream_header()?;
        if id.count != 1 || id.index != 0 {
            return Err(MigrationError::Streams {
                index: id.index,
                what: "a stream of a multi-stream migration (receive it with a MultiReceiver)",
            });
        }
        let summary = self.receive_frames(mem, &dest, 0, None)?;
        Ok(match self.postcopy.take() {
            None => Received::Complete(summary),
            Some(stale) => {
                let state = self.device_state.take().unwrap_or_default();
                let discarded = std::mem::take(&mut self.discarded);
                self.discarded_bits = Vec::new();
                Received::Postcopy(PostcopyStart { dest, stale, discarded, state, summary })
            }
        })
    }

    /// Reads and checks the stream header.
    pub(super) fn read_stream_header(&mut self) -> Result<StreamId> {
        // Magic and version first: a stream of another version is refused by its version,
        // whatever length its header has.
        let mut header = [0u8; STREAM_HEADER_LEN];
        self.read_full(&mut header[..16], "the stream header")?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[..8]);
        if magic != MAGIC {
            return Err(MigrationError::BadMagic(magic));
        }
        let version = le_u32(&header, 8);
        if version != VERSION {
            return Err(MigrationError::UnsupportedVersion(version));
        }
        if le_u32(&header, 12) != 0 {
            return Err(MigrationError::InvalidFrame { what: "stream header flags", offset: 0 });
        }
        self.read_full(&mut header[16..], "the stream header")?;
        let id =
            StreamId { session: le_u64(&header, 16), index: le_u32(&header, 24), count: le_u32(&header, 28) };
        if id.count == 0 || id.count > MAX_STREAMS {
            return Err(MigrationError::Streams { index: id.index, what: "stream count outside 1 to 64" });
        }
        if id.index >= id.count {
            return Err(MigrationError::Streams {
                index: id.index,
                what: "stream index not below the stream count",
            });
        }
        Ok(id)
    }

    /// The frames of stream `index` of a migration (of `rendezvous`'s, when it has several
    /// streams), after its header.
    pub(super) fn receive_frames<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        index: u32,
        rendezvous: Option<&Rendezvous>,
    ) -> Result<ReceiveSummary> {
        // Runs of an earlier, failed receive name another memory's tables.
        self.pending.clear();
        self.device_state = None;
        self.postcopy = None;
        self.discarded.clear();
        self.discarded_bits = Vec::new();
        self.discards = 0;
        let mut summary = ReceiveSummary::default();
        // The device state, once its frame arrived: handed out only when the stream is done.
        let mut state: Option<Vec<u8>> = None;
        let (mut round_data, mut round_zero) = (0u64, 0u64);
        let mut verified = false;
        // Stream 0 ends with checksums then done; the others with done.
        let (expected, expected_after) = if index == 0 {
            ("pages, end-of-round or checksums", "done")
        } else {
            ("pages, end-of-round or done", "done")
        };
        let mut runs = Vec::with_capacity(MAX_RUNS);
        // Pagemap lookups for zero runs, kept from frame to frame so that resident memory is
        // looked up less and less often.
        let mut absent = dest.pagemap.as_ref().map(AbsentPages::new);
        loop {
            if let Some(rv) = rendezvous {
                rv.check_failed(index)?;
            }
            let (at, h) = self.frame_header()?;
            let (kind, flags, a, b, c) =
                (le_u32(&h, 0), le_u32(&h, 4), le_u64(&h, 8), le_u64(&h, 16), le_u64(&h, 24));
            if !matches!(
                kind,
                FRAME_PAGES
                    | FRAME_END_OF_ROUND
                    | FRAME_CHECKSUMS
                    | FRAME_DONE
                    | FRAME_DEVICE_STATE
                    | FRAME_POSTCOPY
                    | FRAME_DISCARD
            ) {
                return Err(MigrationError::UnknownFrame { kind, offset: at });
            }
            if flags != 0 {
                return Err(MigrationError::InvalidFrame { what: "frame flags", offset: at });
            }
            // After the device state, only the checksums; the state itself between rounds; after
            // a post-copy start, only the device state; after a discard frame, only discard
            // frames and the post-copy start (the dropped pages must come by post-copy).
            let postcopy = self.postcopy.is_some();
            let discarding = !self.discarded.is_empty();
            let between_rounds = round_data == 0 && round_zero == 0;
            let switchable = !verified && index == 0 && rendezvous.is_none() && state.is_none() && !postcopy;
            let allowed = match kind {
                FRAME_DONE => !postcopy && !discarding && (verified || index != 0 && state.is_none()),
                FRAME_CHECKSUMS => !postcopy && !discarding && !verified && index == 0,
                FRAME_DEVICE_STATE => {
                    !verified && index == 0 && state.is_none() && between_rounds && (postcopy || !discarding)
                }
                FRAME_POSTCOPY | FRAME_DISCARD => switchable && between_rounds,
                _ => !verified && state.is_none() && !postcopy && !discarding,
            };
            if !allowed {
                return Err(MigrationError::UnexpectedFrame {
                    offset: at,
                    found: frame_name(kind),
                    expected: if verified {
                        expected_after
                    } else if postcopy {
                        "device state"
                    } else if discarding {
                        "discard or post-copy start"
                    } else if state.is_some() {
                        "checksums"
                    } else {
                        expected
                    },
                });
            }
            match kind {
                FRAME_PAGES => {
                    let (data, zero) =
                        self.receive_pages(mem, dest, &mut runs, absent.as_mut(), at, a, b, c)?;
                    round_data += data;
                    round_zero += zero;
                    summary.pages += data + zero;
                    summary.zero_pages += zero;
                    summary.bytes += (data + zero) * PAGE as u64;
                }
                FRAME_END_OF_ROUND => {
                    check_round_end((a, b, c), summary.rounds, round_data, round_zero)?;
                    if let Some(rv) = rendezvous {
                        // This stream's pages of the round are all in the tables before the
                        // next round's may arrive on any stream.
                        self.drain(mem, dest)?;
                        rv.end_round(index, summary.rounds)?;
                        // The other streams' data of the round may have made pages present
                        // that this stream's last lookup found absent.
                        if let Some(a) = absent.as_mut() {
                            a.forget();
                        }
                    }
                    summary.rounds += 1;
                    (round_data, round_zero) = (0, 0);
                    self.acknowledge(a << 12 | 1)?;
                }
                FRAME_DEVICE_STATE => {
                    state = Some(self.read_device_state(at, a, b, c)?);
                    summary.device_state_len = Some(a);
                    if postcopy {
                        // The rest comes to the post-copy handler.
                        self.drain(mem, dest)?;
                        self.device_state = state;
                        return Ok(summary);
                    }
                }
                FRAME_POSTCOPY => {
                    let runs = self.read_stale_runs(mem, at, a, b, c, discarding)?;
                    if discarding {
                        self.claim_discarded(dest, &runs, at, false)?;
                    }
                    self.postcopy = Some(runs);
                }
                FRAME_DISCARD => {
                    let runs = self.read_stale_runs(mem, at, a, b, c, false)?;
                    if self.discarded_bits.is_empty() {
                        self.discarded_bits = dest.page_bits();
                    }
                    self.claim_discarded(dest, &runs, at, true)?;
                    if (self.discarded.len() + runs.len()) as u64 > MAX_POSTCOPY_RUNS {
                        return Err(MigrationError::FrameTooLarge {
                            offset: at,
                            what: "post-copy runs (all discard frames)",
                            len: (self.discarded.len() + runs.len()) as u64,
                            max: MAX_POSTCOPY_RUNS,
                        });
                    }
                    // Every page in memory is hashed before any is dropped.
                    self.drain(mem, dest)?;
                    self.discard(mem, dest, &runs, at)?;
                    if let Some(a) = absent.as_mut() {
                        a.forget();
                    }
                    self.discarded.extend_from_slice(&runs);
                    self.discards += 1;
                    self.acknowledge(self.discards << 12 | 2)?;
                }
                FRAME_CHECKSUMS => {
                    if c != 0 {
                        return Err(MigrationError::InvalidFrame {
                            what: "checksums frame argument",
                            offset: at,
                        });
                    }
                    if b & !CHECKSUMS_MEMORY != 0 {
                        return Err(MigrationError::InvalidFrame {
                            what: "checksums frame flags",
                            offset: at,
                        });
                    }
                    if a != mem.num_regions() as u64 {
                        return Err(MigrationError::RegionCount {
                            source_regions: a,
                            destination_regions: mem.num_regions(),
                        });
                    }
                    if let Some(rv) = rendezvous {
                        // Every other stream must have applied its last page first.
                        rv.wait_all_done(summary.rounds)?;
                    }
                    self.drain(mem, dest)?;
                    summary.regions_verified = self.verify(mem, dest, b == CHECKSUMS_MEMORY)?;
                    summary.memory_verified = b == CHECKSUMS_MEMORY;
                    verified = true;
                }
                _ => {
                    if a != 0 || b != 0 || c != 0 {
                        return Err(MigrationError::InvalidFrame {
                            what: "done frame arguments",
                            offset: at,
                        });
                    }
                    self.drain(mem, dest)?;
                    if let Some(rv) = rendezvous {
                        rv.done(index, summary.rounds);
                    }
                    self.device_state = state;
                    return Ok(summary);
                }
            }
        }
    }

    /// A device state frame's blob, after its header: length `len` (1 to
    /// [`MAX_DEVICE_STATE`]), checksum `sum`. The buffer grows as bytes arrive, so a length
    /// announced and not sent costs no memory.
    fn read_device_state(&mut self, at: u64, len: u64, sum: u64, reserved: u64) -> Result<Vec<u8>> {
        if reserved != 0 {
            return Err(MigrationError::InvalidFrame { what: "device state frame argument", offset: at });
        }
        if len == 0 {
            return Err(MigrationError::InvalidFrame { what: "empty device state", offset: at });
        }
        if len > MAX_DEVICE_STATE {
            return Err(MigrationError::FrameTooLarge {
                offset: at,
                what: "device state bytes",
                len,
                max: MAX_DEVICE_STATE,
            });
        }
        const PIECE: usize = 1 << 20;
        let len = len as usize;
        let mut blob = Vec::with_capacity(len.min(PIECE));
        while blob.len() < len {
            let start = blob.len();
            blob.resize(start + (len - start).min(PIECE), 0);
            let got = self.read_full(&mut blob[start..], "a device state frame");
            if let Err(MigrationError::Truncated { got, .. }) = got {
                return Err(MigrationError::Truncated {
                    offset: at,
                    what: "a device state frame",
                    expected: (FRAME_HEADER_LEN + len) as u64,
                    got: (FRAME_HEADER_LEN + start) as u64 + got,
                });
            }
            got?;
        }
        let actual = Checksum::of(&blob);
        if actual != sum {
            return Err(MigrationError::DeviceStateMismatch { offset: at, expected: sum, actual });
        }
        Ok(blob)
    }

    /// The next frame header: read ahead with the last frame's data, or read now. Returns
    /// where it starts.
    pub(super) fn frame_header(&mut self) -> Result<(u64, [u8; FRAME_HEADER_LEN])> {
        match self.ahead.take() {
            Some(ahead) if ahead.got == FRAME_HEADER_LEN => Ok((ahead.offset, ahead.bytes)),
            Some(ahead) => Err(MigrationError::Truncated {
                offset: ahead.offset,
                what: "a frame header",
                expected: FRAME_HEADER_LEN as u64,
                got: ahead.got as u64,
            }),
            None => {
                let at = self.offset;
                let mut h = [0u8; FRAME_HEADER_LEN];
                self.read_full(&mut h, "a frame header")?;
                Ok((at, h))
            }
        }
    }

    /// A pages frame, after its header: checks the header and every run before any byte of
    /// memory changes, then reads the data into memory and applies the zero runs. Returns the
    /// data and zero pages it held.
    #[allow(clippy::too_many_arguments)]
    fn receive_pages<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        runs: &mut Vec<Run>,
        mut absent: Option<&mut AbsentPages<'_>>,
        at: u64,
        count: u64,
        data_len: u64,
        reserved: u64,
    ) -> Result<(u64, u64)> {
        let (data_pages, zero_pages) = self.read_runs(mem, dest, runs, at, count, data_len, reserved)?;

        // The data, straight into the data runs' pages.
        let data_at = self.offset;
        let got = self.read_data(mem, dest, runs, data_len as usize)?;
        // Mark what arrived (all of it, unless the stream ended inside it); its pages are
        // hashed once the socket has nothing to read (or before the next round or the end).
        let mut left = got;
        for run in runs.iter().filter(|r| !r.zero) {
            if left == 0 {
                break;
            }
            let len = run.pages as usize * PAGE;
            let here = left.min(len);
            slice(mem, run.addr, run.valid as usize)?.bitmap().mark_dirty(0, here.min(run.valid as usize));
            if here == len {
                self.pending.push_back(*run);
            }
            left -= here;
        }
        if got < data_len as usize {
            return Err(MigrationError::Truncated {
                offset: data_at,
                what: "page data",
                expected: data_len,
                got: got as u64,
            });
        }
        // This frame's data may have made pages present that the last lookup found absent.
        if data_pages > 0 {
            if let Some(a) = absent.as_deref_mut() {
                a.forget();
            }
        }
        for run in runs.iter().filter(|r| r.zero) {
            let absent = absent.as_deref_mut().filter(|_| dest.trusted[run.region]);
            apply_zero_run(mem, run, absent)?;
            // Its table entries too go in order with the data runs' (the same page may wait to
            // be hashed from an earlier frame).
            self.pending.push_back(*run);
        }
        // Hashed while in cache: at most 1 MiB of data waits; and none on a plain `Read`
        // (nothing to overlap with).
        while self.fd.is_none() && !self.pending.is_empty()
            || self.pending.iter().filter(|r| !r.zero).map(|r| r.pages as usize * PAGE).sum::<usize>()
                > 1 << 20
        {
            self.hash_pending(mem, dest)?;
        }
        Ok((data_pages, zero_pages))
    }

    /// The runs of a pages frame whose header (`count` runs, `data_len` bytes, `reserved`) is
    /// checked here, read and parsed into `runs`. Returns the data and zero pages.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_runs<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        runs: &mut Vec<Run>,
        at: u64,
        count: u64,
        data_len: u64,
        reserved: u64,
    ) -> Result<(u64, u64)> {
        if reserved != 0 {
            return Err(MigrationError::InvalidFrame { what: "pages frame argument", offset: at });
        }
        if count == 0 {
            return Err(MigrationError::InvalidFrame { what: "empty pages frame", offset: at });
        }
        if count > MAX_RUNS as u64 {
            return Err(MigrationError::FrameTooLarge {
                offset: at,
                what: "runs",
                len: count,
                max: MAX_RUNS as u64,
            });
        }
        if data_len > MAX_FRAME_DATA {
            return Err(MigrationError::FrameTooLarge {
                offset: at,
                what: "data bytes",
                len: data_len,
                max: MAX_FRAME_DATA,
            });
        }
        let n = count as usize;
        let mut raw = std::mem::take(&mut self.raw_runs);
        let read = self.read_full(&mut raw[..n * RUN_LEN], "the runs of a pages frame");
        let parsed = read.and_then(|()| parse_runs(mem, dest, &raw[..n * RUN_LEN], runs, at, data_len));
        self.raw_runs = raw;
        parsed
    }

    /// A post-copy start frame's runs, after its header: `count` runs (1 to
    /// [`MAX_POSTCOPY_RUNS`]) of `pages` pages in all, each a data run of whole pages in one
    /// writable region, ascending and not overlapping. Read in pieces, so that a count
    /// announced and not sent costs no memory.
    fn read_stale_runs<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        at: u64,
        count: u64,
        pages: u64,
        reserved: u64,
        may_be_empty: bool,
    ) -> Result<Vec<StaleRun>> {
        let invalid = |what| MigrationError::InvalidFrame { what, offset: at };
        if reserved != 0 {
            return Err(invalid("post-copy frame argument"));
        }
        if count == 0 && !may_be_empty {
            return Err(invalid("post-copy frame without stale pages"));
        }
        if count > MAX_POSTCOPY_RUNS {
            return Err(MigrationError::FrameTooLarge {
                offset: at,
                what: "post-copy runs",
                len: count,
                max: MAX_POSTCOPY_RUNS,
            });
        }
        let mut stale: Vec<StaleRun> = Vec::with_capacity((count as usize).min(MAX_RUNS));
        let (mut end, mut total) = (0u64, 0u64);
        let mut raw = std::mem::take(&mut self.raw_runs);
        let mut result = Ok(());
        while (stale.len() as u64) < count {
            let n = ((count - stale.len() as u64) as usize).min(MAX_RUNS);
            if let Err(e) = self.read_full(&mut raw[..n * RUN_LEN], "the runs of a post-copy start frame") {
                result = Err(e);
                break;
            }
            for r in raw[..n * RUN_LEN].chunks_exact(RUN_LEN) {
                let (addr, len_pages, kind) = (le_u64(r, 0), u64::from(le_u32(r, 8)), le_u32(r, 12));
                let check = || -> Result<u64> {
                    if kind != RUN_DATA {
                        return Err(invalid("post-copy run kind"));
                    }
                    if len_pages == 0 {
                        return Err(invalid("empty run"));
                    }
                    if !addr.is_multiple_of(PAGE as u64) {
                        return Err(invalid("run not page aligned"));
                    }
                    if addr < end {
                        return Err(invalid("runs out of order or overlapping"));
                    }
                    let len = len_pages * PAGE as u64;
                    let memory_error =
                        |source| MigrationError::Memory { addr: GuestAddress(addr), len, source };
                    let run_end = addr.checked_add(len).ok_or_else(|| {
                        memory_error(GuestMemoryError::Overflow {
                            addr: GuestAddress(addr),
                            len: len as usize,
                        })
                    })?;
                    let s = mem.get_slice(GuestAddress(addr), len as usize).map_err(memory_error)?;
                    if !s.is_writable() {
                        return Err(memory_error(GuestMemoryError::ReadOnly {
                            addr: GuestAddress(addr),
                            len: len as usize,
                        }));
                    }
                    Ok(run_end)
                };
                match check() {
                    Ok(run_end) => {
                        end = run_end;
                        total += len_pages;
                        stale.push((addr, len_pages));
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if result.is_err() {
                break;
            }
        }
        self.raw_runs = raw;
        result?;
        if total != pages {
            return Err(invalid("post-copy page count disagrees with the runs"));
        }
        Ok(stale)
    }

    /// Checks that no page of `runs` was discarded before (each stale page is named once, so
    /// that what the switch costs is bounded by the memory's size), and with `mark` records
    /// them as discarded.
    fn claim_discarded(&mut self, dest: &Destination, runs: &[StaleRun], at: u64, mark: bool) -> Result<()> {
        let bits = &mut self.discarded_bits;
        for &(addr, pages) in runs {
            let first = dest.page_bit(addr / PAGE as u64);
            if (first..first + pages).any(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0) {
                return Err(MigrationError::InvalidFrame { what: "a stale page named twice", offset: at });
            }
        }
        if mark {
            for &(addr, pages) in runs {
                let first = dest.page_bit(addr / PAGE as u64);
                for b in first..first + pages {
                    bits[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
        }
        Ok(())
    }

    /// Drops the destination's copy of the pages of `runs` (a discard frame's): they read as
    /// zero, and come again by post-copy. Only private anonymous memory can lose pages this
    /// way (its missing pages can be served by a userfaultfd later).
    fn discard<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        runs: &[StaleRun],
        at: u64,
    ) -> Result<()> {
        let mut ranges = Vec::with_capacity(runs.len());
        for &(addr, pages) in runs {
            let len = pages * PAGE as u64;
            if !dest.private[dest.region_of(addr / PAGE as u64)] {
                return Err(MigrationError::Postcopy(
                    "a discard frame for memory that is not private anonymous",
                ));
            }
            let s = slice(mem, GuestAddress(addr), len as usize)?;
            ranges.push((s.as_ptr(), len as usize));
        }
        // SAFETY: each range is a writable slice of private anonymous guest memory (checked),
        // which the receiver is filling; guest memory is accessed only through volatile
        // accesses and raw copies, never references, so its pages turning to zeros is the same
        // as a concurrent write. `mem` keeps the slices mapped for the call.
        unsafe { sys::mman::madvise_ranges(&ranges, sys::Advice::DontNeed) }.map_err(|source| {
            MigrationError::Io { op: "dropping discarded pages (MADV_DONTNEED)", source }
        })?;
        let _ = at;
        Ok(())
    }

    /// Reads `len` bytes of page data into the data runs (and, on an fd, the next frame's
    /// header after them). Returns the data bytes that arrived (fewer only at end of stream).
    fn read_data<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        runs: &[Run],
        len: usize,
    ) -> Result<usize> {
        match self.fd {
            Some(fd) => {
                let mut iov = Vec::with_capacity(runs.len() + 1);
                for run in runs.iter().filter(|r| !r.zero) {
                    iov.push(slice(mem, run.addr, run.valid as usize)?.as_iovec());
                    // A partial last page's bytes past the region go to the scratch page.
                    let pad = run.pages as usize * PAGE - run.valid as usize;
                    if pad > 0 {
                        iov.push(libc::iovec { iov_base: self.scratch.as_mut_ptr().cast(), iov_len: pad });
                    }
                }
                let mut ahead =
                    Ahead { offset: self.offset + len as u64, bytes: [0; FRAME_HEADER_LEN], got: 0 };
                iov.push(libc::iovec {
                    iov_base: ahead.bytes.as_mut_ptr().cast(),
                    iov_len: FRAME_HEADER_LEN,
                });
                // SAFETY: the data iovecs describe writable slices of guest memory (every run
                // was checked writable) that `mem`, borrowed for the call, keeps mapped; the
                // last one describes `ahead.bytes`, not touched until the call returns.
                let got = unsafe { self.read_frame(fd, &mut iov, mem, dest) }?;
                let data = got.min(len);
                self.offset += got as u64;
                if got >= len {
                    ahead.got = got - len;
                    self.ahead = Some(ahead);
                }
                Ok(data)
            }
            None => {
                if self.bounce.is_empty() {
                    self.bounce = vec![0; BOUNCE_LEN];
                }
                let mut total = 0;
                for run in runs.iter().filter(|r| !r.zero) {
                    let s = slice(mem, run.addr, run.valid as usize)?;
                    let mut done = 0;
                    while done < s.len() {
                        let k = (s.len() - done).min(BOUNCE_LEN);
                        let n = read_some(&mut self.stream, &mut self.bounce[..k], "reading page data")?;
                        if n == 0 {
                            return Ok(total);
                        }
                        let part = s.subslice(done, n).map_err(|e| MigrationError::Memory {
                            addr: run.addr,
                            len: s.len() as u64,
                            source: GuestMemoryError::from_volatile(run.addr, e),
                        })?;
                        // (`copy_from` marks the bytes; the caller marks every run that arrived
                        // once more, which costs little and keeps both paths alike.)
                        let _ = part.copy_from(&self.bounce[..n]);
                        done += n;
                        total += n;
                        self.offset += n as u64;
                    }
                    // The bytes of a partial last page past the region: read and dropped.
                    let mut pad = run.pages as usize * PAGE - s.len();
                    while pad > 0 {
                        let n = read_some(&mut self.stream, &mut self.bounce[..pad], "reading page data")?;
                        if n == 0 {
                            return Ok(total);
                        }
                        pad -= n;
                        total += n;
                        self.offset += n as u64;
                    }
                }
                Ok(total)
            }
        }
    }

    /// Puts the oldest pending run's pages in their table: the hash of each data page as it
    /// is now, or the zero page's hash for a zero run. Returns whether there was one.
    fn hash_pending<M: GuestMemory + ?Sized>(&mut self, mem: &M, dest: &Destination) -> Result<bool> {
        let Some(run) = self.pending.pop_front() else { return Ok(false) };
        let table = &dest.tables[run.region];
        let first = run.addr.0 / PAGE as u64 - table.first_page();
        if run.zero {
            table.set_range(first, run.pages, page_hash::zero_page_hash());
            return Ok(true);
        }
        let s = slice(mem, run.addr, run.valid as usize)?;
        super::send::hash_pages(&s, |p, hash| table.set(first + p as u64, hash));
        Ok(true)
    }

    /// Puts pending runs in the tables, oldest first, until 128 KiB of data pages were hashed
    /// (a try to receive costs a system call: it is worth doing some work between two).
    fn hash_some<M: GuestMemory + ?Sized>(&mut self, mem: &M, dest: &Destination) -> Result<()> {
        let mut bytes = 0;
        while bytes < HASH_BATCH {
            match self.pending.front() {
                Some(run) => bytes += if run.zero { PAGE } else { run.pages as usize * PAGE },
                None => break,
            }
            self.hash_pending(mem, dest)?;
        }
        Ok(())
    }

    /// Puts every pending run in the tables.
    fn drain<M: GuestMemory + ?Sized>(&mut self, mem: &M, dest: &Destination) -> Result<()> {
        while self.hash_pending(mem, dest)? {}
        Ok(())
    }

    /// Reads into `iov` until every byte of it is filled or the stream ends; returns the bytes
    /// read. On a socket, while runs wait to be hashed, a receive is first tried without
    /// blocking (`MSG_DONTWAIT`): when nothing has arrived, a pending run is hashed instead of
    /// waiting, so the hashing costs no time while the peer fills the socket. Runs are hashed
    /// in the order they came, so a page's entry ends with its latest contents; hashing runs
    /// between calls, never while the kernel writes into memory.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes for the duration of the call.
    unsafe fn read_frame<M: GuestMemory + ?Sized>(
        &mut self,
        fd: fn(&R) -> BorrowedFd<'_>,
        iov: &mut [libc::iovec],
        mem: &M,
        dest: &Destination,
    ) -> Result<usize> {
        let mut start = 0;
        let mut total = 0;
        while start < iov.len() {
            if iov[start].iov_len == 0 {
                start += 1;
                continue;
            }
            let rest = &iov[start..iov.len().min(start + sys::fd::IOV_MAX)];
            let fd = fd(&self.stream);
            let got = if self.socket != Some(false) && !self.pending.is_empty() {
                // SAFETY: the caller guarantees every iovec is writable; `rest` holds suffixes
                // of them, advanced within their bounds below.
                match unsafe { socket::recv_vectored(fd, rest, MsgFlags::DONTWAIT) } {
                    Ok(n) => {
                        self.socket = Some(true);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.socket = Some(true);
                        self.hash_some(mem, dest)?;
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                        self.socket = Some(false);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_error_read(e)),
                }
            } else {
                // SAFETY: as above.
                sys::retry_eintr(|| unsafe { sys::fd::readv(fd, rest) }).map_err(io_error_read)?
            };
            if got == 0 {
                break;
            }
            total += got;
            let mut n = got;
            while start < iov.len() && n >= iov[start].iov_len {
                n -= iov[start].iov_len;
                start += 1;
            }
            if n > 0 {
                if start == iov.len() {
                    return Err(io_error_read(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "readv read more than asked",
                    )));
                }
                let v = &mut iov[start];
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
            }
        }
        Ok(total)
    }

    /// The entries of a checksums frame, each compared with the destination region at the
    /// same place. Returns the number of regions verified.
    pub(super) fn verify<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        dest: &Destination,
        memory: bool,
    ) -> Result<usize> {
        // This side's memory digests first, while the source computes its own.
        let mut digests = Vec::new();
        if memory {
            for (i, region) in mem.iter().enumerate() {
                digests.push(memory_digest(region, dest.pagemap.as_ref().filter(|_| dest.trusted[i]))?);
            }
        }
        let mut verified = 0;
        for (i, region) in mem.iter().enumerate() {
            let mut entry = [0u8; CHECKSUM_ENTRY_LEN];
            self.read_full(&mut entry, "a checksum entry")?;
            let (addr, len) = (GuestAddress(le_u64(&entry, 0)), le_u64(&entry, 8));
            if addr != region.start_addr() || len != region.len() {
                return Err(MigrationError::RegionMismatch { addr, len });
            }
            let (expected, actual) = (le_u64(&entry, 16), dest.tables[i].digest());
            if actual != expected {
                return Err(MigrationError::ChecksumMismatch {
                    addr,
                    len,
                    what: "pages received",
                    expected,
                    actual,
                });
            }
            let expected = le_u64(&entry, 24);
            match digests.get(i) {
                Some(&actual) if actual != expected => {
                    return Err(MigrationError::ChecksumMismatch {
                        addr,
                        len,
                        what: "memory contents",
                        expected,
                        actual,
                    })
                }
                None if expected != 0 => {
                    return Err(MigrationError::InvalidFrame {
                        what: "memory digest without the checksums frame's flag",
                        offset: self.offset - CHECKSUM_ENTRY_LEN as u64,
                    })
                }
                _ => {}
            }
            verified += 1;
        }
        Ok(verified)
    }

    /// Fills `buf` from the stream, or fails with [`MigrationError::Truncated`] naming `what`.
    pub(super) fn read_full(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match read_some(&mut self.stream, &mut buf[got..], "reading the stream")? {
                0 => {
                    return Err(MigrationError::Truncated {
                        offset: self.offset,
                        what,
                        expected: buf.len() as u64,
                        got: got as u64,
                    })
                }
                n => got += n,
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }
}

/// Checks an end-of-round frame's arguments (round, data pages, zero pages) against the round
/// the receiver is in and what it received in it.
pub(super) fn check_round_end(
    (round, pages, zero_pages): (u64, u64, u64),
    expected_round: u64,
    data: u64,
    zero: u64,
) -> Result<()> {
    if round != expected_round || pages != data || zero_pages != zero {
        return Err(MigrationError::RoundMismatch {
            round,
            pages,
            zero_pages,
            expected_round,
            received_pages: data,
            received_zero_pages: zero,
        });
    }
    Ok(())
}

/// Checks the runs of a pages frame (`raw`) and parses them into `runs`: kinds, sizes,
/// alignment, order, each inside one writable region, data bytes that match. Returns the data
/// and zero pages.
fn parse_runs<M: GuestMemory + ?Sized>(
    mem: &M,
    dest: &Destination,
    raw: &[u8],
    runs: &mut Vec<Run>,
    at: u64,
    data_len: u64,
) -> Result<(u64, u64)> {
    runs.clear();
    let (mut data, mut zero, mut end) = (0u64, 0u64, 0u64);
    for r in raw.chunks_exact(RUN_LEN) {
        let (addr, pages, kind) = (le_u64(r, 0), u64::from(le_u32(r, 8)), le_u32(r, 12));
        let invalid = |what| MigrationError::InvalidFrame { what, offset: at };
        if kind != RUN_DATA && kind != RUN_ZERO {
            return Err(invalid("run kind"));
        }
        if pages == 0 {
            return Err(invalid("empty run"));
        }
        if !addr.is_multiple_of(PAGE as u64) {
            return Err(invalid("run not page aligned"));
        }
        if addr < end {
            return Err(invalid("runs out of order or overlapping"));
        }
        let len = pages * PAGE as u64;
        let memory_error = |source| MigrationError::Memory { addr: GuestAddress(addr), len, source };
        end = addr.checked_add(len).ok_or_else(|| {
            memory_error(GuestMemoryError::Overflow { addr: GuestAddress(addr), len: len as usize })
        })?;
        // In one region, whose last page may be partial: only its bytes in the region count.
        let Some((region, _)) = mem.to_region_addr(GuestAddress(addr)) else {
            return Err(memory_error(GuestMemoryError::InvalidGuestAddress(GuestAddress(addr))));
        };
        let region_end = region.start_addr().0.saturating_add(region.len());
        if end > region_end.next_multiple_of(PAGE as u64) {
            return Err(memory_error(GuestMemoryError::NotContiguous {
                addr: GuestAddress(addr),
                len: len as usize,
            }));
        }
        let valid = len.min(region_end - addr);
        let s = mem.get_slice(GuestAddress(addr), valid as usize).map_err(memory_error)?;
        if !s.is_writable() {
            return Err(memory_error(GuestMemoryError::ReadOnly {
                addr: GuestAddress(addr),
                len: len as usize,
            }));
        }
        let zero_run = kind == RUN_ZERO;
        if zero_run {
            zero += pages;
        } else {
            data += pages;
        }
        runs.push(Run {
            addr: GuestAddress(addr),
            pages,
            valid,
            zero: zero_run,
            region: dest.region_of(addr / PAGE as u64),
        });
    }
    if data * PAGE as u64 != data_len {
        return Err(MigrationError::InvalidFrame { what: "data length disagrees with the runs", offset: at });
    }
    Ok((data, zero))
}

/// The run's slice of guest memory (checked to lie in one region when it was parsed).
fn slice<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Result<crate::memory::GuestSlice<'_, M>> {
    mem.get_slice(addr, len).map_err(|source| MigrationError::Memory { addr, len: len as u64, source })
}

/// Makes a zero run's pages zero: an absent page of trusted memory (`absent` is given for
/// those) is left alone, as it reads as zero; any other page is read, and written only if it is
/// not zero already. The whole run is marked dirty.
fn apply_zero_run<M: GuestMemory + ?Sized>(
    mem: &M,
    run: &Run,
    mut absent: Option<&mut AbsentPages<'_>>,
) -> Result<()> {
    // Only the bytes in the region: a partial last page is checked and zeroed in part.
    let len = run.valid as usize;
    let s = slice(mem, run.addr, len)?;
    let memory_error = |e| MigrationError::Memory {
        addr: run.addr,
        len: len as u64,
        source: GuestMemoryError::from_volatile(run.addr, e),
    };
    // Pages that are not zero yet are zeroed in stretches, one fill per stretch.
    let mut stretch: Option<usize> = None;
    for off in (0..len.next_multiple_of(PAGE) + PAGE).step_by(PAGE) {
        let needs_zeroing = off < len && {
            let page = s.as_ptr().wrapping_add(off);
            let left = (len - off).div_ceil(PAGE);
            !absent.as_mut().is_some_and(|a| a.is_absent(page as usize, left))
                && if len - off >= PAGE {
                    // SAFETY: the page lies in the run's slice, which `mem` keeps mapped while
                    // borrowed.
                    !unsafe { page_hash::is_zero_page(page) }
                } else {
                    s.subslice(off, len - off).map(|t| super::send::padded(&t) != [0; PAGE]).unwrap_or(true)
                }
        };
        match (needs_zeroing, stretch) {
            (true, None) => stretch = Some(off),
            (false, Some(from)) => {
                let to = off.min(len);
                s.subslice(from, to - from).and_then(|p| p.fill(0)).map_err(memory_error)?;
                stretch = None;
            }
            _ => {}
        }
    }
    s.bitmap().mark_dirty(0, len);
    Ok(())
}

fn io_error_read(source: io::Error) -> MigrationError {
    MigrationError::Io { op: "reading page data", source }
}

/// One `read` of the stream, retrying `EINTR`; an error is an I/O error while `op`.
fn read_some<R: Read>(stream: &mut R, buf: &mut [u8], op: &'static str) -> Result<usize> {
    loop {
        match stream.read(buf) {
            // `Read` returns at most the buffer's length; a broken reader that claims more is
            // capped rather than trusted.
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(MigrationError::Io { op, source }),
        }
    }
}
