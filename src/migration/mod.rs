//! Live migration of guest memory: a framed page stream that any byte stream carries (TCP,
//! Unix sockets, pipes, files), a [`Sender`] that puts guest pages on it, a [`Receiver`] that
//! validates every frame and writes the pages into destination memory, [`MultiSender`] and
//! [`MultiReceiver`] that spread one migration over several connections, [`Precopy`], the
//! pre-copy round logic (round 0 = all of memory, then rounds of dirty pages until the rest
//! fits in a downtime budget), [`postcopy`], where the destination resumes the guest first and
//! faults the last pages in from the source, and [`local`], migration to another process on
//! the same host by passing the memory's file descriptors instead of its contents.
//!
//! # The model
//!
//! - The source harvests its dirty pages (the union of the VMM's writes, which guestmem's
//!   bitmaps track, and the guest's, which a caller-supplied *sync hook* merges in from KVM,
//!   e.g. `KvmSlots::sync_dirty_log` of the `kvm` feature), and sends them. A harvest clears
//!   the bits *before* the pages are read, so a page written during the send is dirty again
//!   and goes in a later round: no write is lost. If a send fails, the harvested ranges are put
//!   back ([`GuestMemoryMmap::restore_dirty_ranges`](crate::GuestMemoryMmap::restore_dirty_ranges)).
//! - The stream moves 4 KiB pages ([`STREAM_PAGE_SIZE`]); ranges are rounded out to whole
//!   pages. A page of zeros never travels as data: the sender finds it (a page that was never
//!   touched, from `/proc/self/pagemap`, without reading it; any other by reading it) and sends
//!   a *zero run* instead, a 16-byte entry for any number of pages. The destination makes the
//!   run zero without touching what already is: a private anonymous page that is not there
//!   (never touched, or discarded) reads as zero and is left alone; a page that is there is
//!   read and written only if it is not zero already (it may hold an earlier round's data).
//! - On an fd ([`Sender::new_vectored`]), frame headers and guest pages leave together in one
//!   `writev(2)` per frame, straight from guest memory; the destination reads page data
//!   straight into its memory with `readv(2)`. On any other `Write`/`Read`, pages go through a
//!   small buffer. The destination's own dirty tracking sees every page the stream sets.
//! - Integrity: each end computes a 32-bit hash of every data page while the page is in cache
//!   (right after the kernel copied it onto the stream, or off it) and keeps the latest one per
//!   page, in a table of 4 bytes per 4 KiB of guest memory. At the end the source sends, per
//!   region, a digest of its table (every page's last sent contents), and the receiver compares
//!   it with the digest of its own (every page's last received contents): a corrupted, lost,
//!   misplaced or stale page (a round-`k` copy that won over round `k + 1`'s) fails the
//!   migration, naming the region. A page written *while* it was sent may differ from its
//!   hash; it is dirty, so a later round sends it again and both tables agree once the source
//!   is paused. With [`Sender::verify_memory`], the end also compares a digest of every
//!   region's full contents, read at both ends (the source paused): this also catches a write
//!   that dirty tracking missed, for the price of reading all of memory once more at both ends
//!   (in parallel).
//!
//! # Several streams
//!
//! A [`MultiSender`] puts one migration on N streams (N up to [`MAX_STREAMS`]), each a complete,
//! validated stream of its own (same session number in every header, its index, N): each round
//! is cut into pieces spread over the streams and sent by N threads, then every stream closes
//! the round with its own end-of-round frame. A [`MultiReceiver`] reads the N streams on N
//! threads, and a stream that reaches the end of round `k` waits until every stream has (a
//! barrier per round): a page sent in round `k + 1` on one stream is written only after its
//! round-`k` copy, whichever stream carried that, so the newer copy always wins. Stream 0 then
//! carries the checksums and done, the others done.
//!
//! # The stream format (version 2, all integers little-endian)
//!
//! A stream starts with a 32-byte header: [`MAGIC`] (8 bytes), [`VERSION`] (`u32`), flags
//! (`u32`, 0), a session number (`u64`, the same on every stream of one migration), the
//! stream's index (`u32`) and the number of streams (`u32`, 1 to [`MAX_STREAMS`]). Version 1
//! streams (16-byte header, every page as data) are refused with
//! [`MigrationError::UnsupportedVersion`]. Then frames; every frame starts with a 32-byte
//! header: type (`u32`), flags (`u32`, 0), and three `u64` arguments `a`, `b`, `c`:
//!
//! | type | frame | `a` | `b` | `c` | followed by |
//! |---|---|---|---|---|---|
//! | 1 | pages | runs (1 to [`MAX_RUNS`]) | data bytes (at most [`MAX_FRAME_DATA`]) | 0 | the runs (16 bytes each), then the data pages of the data runs, in order |
//! | 2 | end of round | round number (0, 1, ...) | data pages in the round | zero pages in the round | nothing |
//! | 3 | checksums | regions | 1 if memory digests are given, else 0 | 0 | per region: start, length, stream digest, memory digest (4 × `u64`) |
//! | 4 | done | 0 | 0 | 0 | nothing (end of stream) |
//! | 5 | device state | bytes (1 to [`MAX_DEVICE_STATE`]) | [`Checksum`](crate::checksum::Checksum) of the bytes | 0 | the bytes |
//! | 6 | post-copy start | runs (0 to [`postcopy::MAX_POSTCOPY_RUNS`]; 0 only after discard frames) | pages in all | 0 | the stale runs (16 bytes each, kind data): see [`postcopy`] |
//! | 7 | discard | runs (1 to [`postcopy::MAX_POSTCOPY_RUNS`]) | pages in all | 0 | runs of pages the destination drops now and gets by post-copy: see [`postcopy`] |
//!
//! A run is a guest address (`u64`, a multiple of 4096), a page count (`u32`, at least 1) and
//! a kind (`u32`: 0 = data, its pages follow in the frame's data; 1 = zero, nothing follows).
//! A run lies in one writable destination region; the runs of a frame are in ascending,
//! non-overlapping order, and the data bytes are exactly 4096 times the data runs' pages.
//! Regions start on a page; a region whose length is not a multiple of 4096 ends with a
//! partial page, which travels whole like any other: the sender pads its bytes past the
//! region with zeros, the receiver writes only the bytes inside the region (and ignores the
//! rest), and both hash and zero-test it as its bytes followed by zeros. A run may cover that
//! page, never a page past it.
//! Pages and end-of-round frames come in any number; then stream 0 may have one device
//! state frame, right after an end of round (or before any page): an opaque blob from the
//! source's VMM (vCPU registers, device models) that the destination needs to resume the
//! guest ([`Sender::send_device_state`], [`Precopy::complete_with_device_state`],
//! [`Receiver::take_device_state`], handed out only once the whole stream is verified); then
//! stream 0 has exactly one checksums frame (one entry per destination region, in address
//! order) and every stream ends with done.
//!
//! The page hash of a page's 512 little-endian words `w[n]`: lane `l = n % 16` takes its 32
//! words in order and keeps four sums, `a += w; b += a` (wrapping) and `ha += w >> 32;
//! hb += ha`; sum `k` (0 to 3, in that order) of lane `l` is mixed with the key
//! `K = splitmix64(0x6775_6573_746d_656d ^ (16k + l))` (SplitMix64's first output from that
//! seed) as `x = sum ^ K; lo32(x) * hi32(x) + x`; the 64 mixes are added up (wrapping), put
//! through MurmurHash3's 64-bit finalizer, and the hash is the xor of the result's halves. A zero run's pages count with the hash of 4096 zero bytes. A region's
//! digest is the wrapping sum, over its pages `p` (guest page numbers) whose hash `h` is not
//! 0, of MurmurHash3's 64-bit finalizer of `p << 32 | h`. The stream digest uses the hash each
//! end kept (0 for a page never sent); the memory digest hashes every page of the region as it
//! is now.
//!
//! The receiver trusts nothing: magic, version, flags, stream set, frame types and order,
//! round numbers and page counts, lengths (bounded, so nothing is allocated from a length the
//! peer sent) and every run (alignment, order, inside writable destination memory) are checked,
//! and a frame whose header or runs are invalid touches no destination memory. (A stream that
//! ends *inside* a pages frame's data leaves the bytes that did arrive in memory, marked
//! dirty; the receive fails.)
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use guestmem::migration::{Precopy, PrecopyConfig, Receiver, Sender};
//! use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let src = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! src.write_obj(0xfeed_u64, GuestAddress(0x1234)).unwrap();
//!
//! let (a, b) = UnixStream::pair().unwrap();
//! let receiver = std::thread::spawn(move || Receiver::new_vectored(b).receive(&dst).map(|s| (s, dst)));
//!
//! let sender = Sender::new_vectored(a).unwrap().verify_memory(true);
//! // No KVM here: the sync hook has nothing to merge.
//! let mut precopy = Precopy::new(sender, &src, PrecopyConfig::default(), || Ok::<(), std::io::Error>(()));
//! precopy.run().unwrap();
//! src.write_obj(0xbeef_u64, GuestAddress(0x8000)).unwrap(); // dirtied after the pre-copy rounds
//! // ... pause the source here ...
//! let (report, _stream) = precopy.complete().unwrap();
//! assert_eq!(report.final_round.pages, 1);
//! // Round 0 sent one page of data; the other 255 pages were zero runs.
//! assert_eq!((report.rounds[0].pages, report.rounds[0].zero_pages), (256, 255));
//!
//! let (summary, dst) = receiver.join().unwrap().unwrap();
//! assert_eq!((summary.regions_verified, summary.memory_verified), (1, true));
//! assert_eq!(dst.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0xbeef);
//! ```

pub mod local;
mod multi;
mod page_hash;
pub mod postcopy;
mod precopy;
mod receive;
mod residency;
mod send;
mod tables;

use std::io;

pub use multi::{MultiReceiver, MultiSender};
pub use postcopy::{PostcopyDestination, PostcopyStart, PostcopySummary, Received};
pub use precopy::{
    MigrationReport, PageSink, PostcopyReport, Precopy, PrecopyConfig, RoundStats, StopReason,
};
pub use receive::{ReceiveSummary, Receiver};
pub use send::{RoundEnd, Sender};

use crate::address::GuestAddress;
use crate::bitmap::BitmapError;
use crate::bytes::{put_le_u32, put_le_u64};
use crate::memory::GuestMemoryError;

/// The first 8 bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"GMEMMIG\0";

/// The stream format version this build writes and reads.
pub const VERSION: u32 = 2;

/// Bytes in the stream header (magic, version, flags, session, stream index, stream count).
pub const STREAM_HEADER_LEN: usize = 32;

/// Bytes in a frame header (type, flags, three arguments).
pub const FRAME_HEADER_LEN: usize = 32;

/// Bytes of a run in a pages frame (guest address, page count, kind).
pub const RUN_LEN: usize = 16;

/// The most runs one pages frame holds.
pub const MAX_RUNS: usize = 256;

/// The most data bytes one pages frame carries; the receiver refuses more.
pub const MAX_FRAME_DATA: u64 = 4 << 20;

/// The page unit of the stream: runs, page counts and hashes are in 4 KiB pages.
pub const STREAM_PAGE_SIZE: u64 = 4096;

/// The most streams one migration is spread over.
pub const MAX_STREAMS: u32 = 64;

/// Bytes of one entry of a checksums frame (start, length, stream digest, memory digest).
const CHECKSUM_ENTRY_LEN: usize = 32;

/// Frame types.
const FRAME_PAGES: u32 = 1;
const FRAME_END_OF_ROUND: u32 = 2;
const FRAME_CHECKSUMS: u32 = 3;
const FRAME_DONE: u32 = 4;
const FRAME_DEVICE_STATE: u32 = 5;
const FRAME_POSTCOPY: u32 = 6;
const FRAME_DISCARD: u32 = 7;

/// The largest device state ([`Sender::send_device_state`]) a stream carries; the receiver
/// refuses more.
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

/// Run kinds.
const RUN_DATA: u32 = 0;
const RUN_ZERO: u32 = 1;

/// The checksums frame's flag for memory digests.
const CHECKSUMS_MEMORY: u64 = 1;

/// The name of a frame type, for errors.
fn frame_name(kind: u32) -> &'static str {
    match kind {
        FRAME_PAGES => "pages",
        FRAME_END_OF_ROUND => "end-of-round",
        FRAME_CHECKSUMS => "checksums",
        FRAME_DONE => "done",
        FRAME_DEVICE_STATE => "device state",
        FRAME_POSTCOPY => "post-copy start",
        FRAME_DISCARD => "discard",
        _ => "unknown",
    }
}

/// Who a stream is in its migration: the header's session, index and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StreamId {
    session: u64,
    index: u32,
    count: u32,
}

impl StreamId {
    /// The only stream of a migration, with a new session number.
    fn single() -> Self {
        StreamId { session: new_session(), index: 0, count: 1 }
    }
}

/// A session number no other migration of this process (and, with high probability, of this
/// host) uses: from the standard library's per-process random hash keys, a counter and the
/// time.
fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish()
}

/// The stream header.
fn stream_header(id: StreamId) -> [u8; STREAM_HEADER_LEN] {
    let mut h = [0u8; STREAM_HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    put_le_u32(&mut h, 8, VERSION);
    put_le_u64(&mut h, 16, id.session);
    put_le_u32(&mut h, 24, id.index);
    put_le_u32(&mut h, 28, id.count);
    h
}

/// A frame header.
fn frame_header(kind: u32, a: u64, b: u64, c: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    put_le_u32(&mut h, 0, kind);
    put_le_u64(&mut h, 8, a);
    put_le_u64(&mut h, 16, b);
    put_le_u64(&mut h, 24, c);
    h
}

/// Errors of migration: the stream (I/O, format, validation of what the peer sent), the
/// memories at either end, and the source's dirty tracking. Stream positions are byte
/// offsets from the start of the stream.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Reading or writing the stream failed.
    #[error("migration stream I/O failed while {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The stream ended in the middle of something.
    #[error("stream ended at byte {offset} inside {what} ({got} of {expected} bytes)")]
    Truncated {
        /// Where the incomplete item starts.
        offset: u64,
        /// What was incomplete.
        what: &'static str,
        /// Bytes it has.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// The stream does not start with [`MAGIC`].
    #[error("not a guestmem migration stream (magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// A stream version this build does not read (version 1 streams, from builds before zero
    /// runs, among them).
    #[error("stream version {0} is not supported (this build reads version {VERSION} only)")]
    UnsupportedVersion(u32),
    /// Streams that do not make up one migration: another migration's session, a count that
    /// differs, an index twice or out of range, a stream that ends its rounds early, or a
    /// stream of a multi-stream migration given to a single [`Receiver`].
    #[error("stream {index}: {what}")]
    Streams {
        /// The index the stream's header gives (or its place in the list given).
        index: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// A frame type that does not exist (or is reserved for a later version).
    #[error("unknown frame type {kind} at byte {offset}")]
    UnknownFrame {
        /// The type found.
        kind: u32,
        /// Where the frame starts.
        offset: u64,
    },
    /// A frame or header field with a value the format forbids (non-zero flags, an empty
    /// frame, a misaligned, empty, unordered or overlapping run, a run of unknown kind, data
    /// bytes that disagree with the runs, a non-zero reserved argument).
    #[error("invalid {what} at byte {offset}")]
    InvalidFrame {
        /// What is wrong.
        what: &'static str,
        /// Where the frame starts.
        offset: u64,
    },
    /// A pages frame with more runs than [`MAX_RUNS`] or more data than [`MAX_FRAME_DATA`].
    #[error("frame at byte {offset} announces {len:#x} {what}, more than {max:#x}")]
    FrameTooLarge {
        /// Where the frame starts.
        offset: u64,
        /// "data bytes" or "runs".
        what: &'static str,
        /// The number it announces.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame that may not come at this point of the stream (pages after the checksums, done
    /// before them).
    #[error("{found} frame at byte {offset} where {expected} was expected")]
    UnexpectedFrame {
        /// Where the frame starts.
        offset: u64,
        /// The frame found.
        found: &'static str,
        /// What the stream should have had.
        expected: &'static str,
    },
    /// A guest range outside the memory (or, on the receiving side, not writable, or across
    /// regions), or a region that cannot be migrated in 4 KiB pages.
    #[error("guest range of {len:#x} bytes at {addr} cannot be migrated: {source}")]
    Memory {
        /// Start of the range.
        addr: GuestAddress,
        /// Its length.
        len: u64,
        /// Why.
        source: GuestMemoryError,
    },
    /// An end-of-round frame whose round number or page counts disagree with what arrived.
    #[error(
        "end of round {round} with {pages} data and {zero_pages} zero pages, but round {expected_round} had {received_pages} and {received_zero_pages}"
    )]
    RoundMismatch {
        /// The round number in the frame.
        round: u64,
        /// The data page count in the frame.
        pages: u64,
        /// The zero page count in the frame.
        zero_pages: u64,
        /// The round the receiver was in.
        expected_round: u64,
        /// The data pages it received in that round.
        received_pages: u64,
        /// The zero pages it received in that round.
        received_zero_pages: u64,
    },
    /// The checksums frame lists another number of regions than the destination has.
    #[error("the source has {source_regions} regions, the destination {destination_regions}")]
    RegionCount {
        /// Regions the source listed.
        source_regions: u64,
        /// Regions of the destination.
        destination_regions: usize,
    },
    /// A checksum entry for a region the destination does not have at that place.
    #[error("source region [{addr}, +{len:#x}) is not a region of the destination")]
    RegionMismatch {
        /// The region's start on the source.
        addr: GuestAddress,
        /// Its length on the source.
        len: u64,
    },
    /// A region whose pages differ after migration: what was received differs from what was
    /// sent (`what` is "pages received"), or the memory's contents differ ("memory contents").
    #[error(
        "region [{addr}, +{len:#x}) differs after migration ({what}): source digest {expected:#018x}, destination {actual:#018x}"
    )]
    ChecksumMismatch {
        /// The region's start.
        addr: GuestAddress,
        /// Its length.
        len: u64,
        /// Which digest differs.
        what: &'static str,
        /// The source's digest.
        expected: u64,
        /// The destination's.
        actual: u64,
    },
    /// [`Sender::send_device_state`] refused: the state is empty or too large, was already
    /// sent, comes inside a round with pages, or on a stream other than 0. Nothing was
    /// written.
    #[error("cannot send the device state: {0}")]
    DeviceState(&'static str),
    /// The device state that arrived does not match the checksum it came with.
    #[error("device state at byte {offset} is corrupt: checksum {expected:#018x}, received {actual:#018x}")]
    DeviceStateMismatch {
        /// Where its frame starts.
        offset: u64,
        /// The checksum the frame gives.
        expected: u64,
        /// The checksum of the bytes received.
        actual: u64,
    },
    /// Post-copy refused or failed: destination memory it cannot serve (not private
    /// anonymous, a partial page, another layout), a stream that switched to post-copy given to
    /// [`Receiver::receive`], a handler thread that died. See [`postcopy`] for what a failed
    /// post-copy leaves.
    #[error("post-copy: {0}")]
    Postcopy(&'static str),
    /// Harvesting the source's dirty pages failed (a region without dirty tracking).
    #[error("harvesting dirty pages failed: {0}")]
    Harvest(#[from] BitmapError),
    /// The caller's sync hook (merging KVM's dirty log) failed.
    #[error("the dirty-log sync hook failed: {0}")]
    Sync(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A result of migration.
pub type Result<T> = std::result::Result<T, MigrationError>;

fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
    move |source| MigrationError::Io { op, source }
}
