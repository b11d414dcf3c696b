//! Live migration of guest memory: a framed page stream that any byte stream carries (TCP,
//! Unix sockets, pipes, files), a [`Sender`] that puts guest pages on it, a [`Receiver`] that
//! validates every frame and writes the pages into destination memory, and [`Precopy`], the
//! pre-copy round logic (round 0 = all of memory, then rounds of dirty pages until the rest
//! fits in a downtime budget).
//!
//! # The model
//!
//! - The source harvests its dirty pages (the union of the VMM's writes, which guestmem's
//!   bitmaps track, and the guest's, which a caller-supplied *sync hook* merges in from KVM,
//!   e.g. `KvmSlots::sync_dirty_log` of the `kvm` feature), and sends
//!   them. A harvest clears the bits *before* the pages are read, so a page written during the
//!   send is dirty again and goes in a later round: no write is lost. If a send fails, the
//!   harvested ranges are put back ([`GuestMemoryMmap::restore_dirty_ranges`](crate::GuestMemoryMmap::restore_dirty_ranges)).
//! - On an fd ([`Sender::new_vectored`]), frame headers and guest pages leave together in one
//!   `writev(2)` per batch, straight from guest memory (no bounce buffer). On any other
//!   `Write` ([`Sender::new`]), pages are copied through a small buffer.
//! - The destination reads into its memory through the API
//!   ([`Bytes::read_exact_volatile_from`](crate::Bytes::read_exact_volatile_from)): its own
//!   dirty tracking sees every page that arrives.
//! - When the source is paused, the final round goes out, then a checksum of every region's
//!   full contents ([`Checksum`](crate::checksum::Checksum)); the receiver compares them with its own memory and fails
//!   naming the region that differs.
//!
//! # The stream format (version 1, all integers little-endian)
//!
//! A stream is a 16-byte header — [`MAGIC`] (8 bytes), [`VERSION`] (`u32`), flags (`u32`,
//! 0) — then frames. Every frame starts with a 24-byte header: type (`u32`), flags (`u32`,
//! 0), and two `u64` arguments `a` and `b`:
//!
//! | type | frame | `a` | `b` | followed by |
//! |---|---|---|---|---|
//! | 1 | pages | guest address | length (1 to [`MAX_FRAME_DATA`]) | `b` bytes of guest memory |
//! | 2 | end of round | round number (0, 1, ...) | pages in the round | nothing |
//! | 3 | checksums | number of regions | 0 | per region: start, length, checksum (3 × `u64`) |
//! | 4 | done | 0 | 0 | nothing (end of stream) |
//!
//! "Pages in the round" counts each pages frame as `ceil(length / 4096)` ([`STREAM_PAGE_SIZE`]).
//! Pages and end-of-round frames come in any number, then exactly one checksums frame (one entry
//! per destination region, in address order), then done.
//!
//! The receiver trusts nothing: magic, version, flags, frame types and order, round numbers
//! and page counts, lengths (bounded, so nothing is allocated from a length the peer sent)
//! and addresses (inside writable destination memory) are all checked, and a frame whose
//! header is invalid touches no destination memory. (A stream that ends *inside* a pages
//! frame's data leaves the bytes that did arrive in memory, marked dirty; the receive fails.)
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
//! let sender = Sender::new_vectored(a).unwrap();
//! // No KVM here: the sync hook has nothing to merge.
//! let mut precopy = Precopy::new(sender, &src, PrecopyConfig::default(), || Ok::<(), std::io::Error>(()));
//! precopy.run().unwrap();
//! src.write_obj(0xbeef_u64, GuestAddress(0x8000)).unwrap(); // dirtied after the pre-copy rounds
//! // ... pause the source here ...
//! let (report, _stream) = precopy.complete().unwrap();
//! assert_eq!(report.final_round.pages, 1);
//!
//! let (summary, dst) = receiver.join().unwrap().unwrap();
//! assert_eq!(summary.regions_verified, 1);
//! assert_eq!(dst.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0xbeef);
//! ```

mod precopy;
mod receive;
mod send;

use std::io;

pub use precopy::{MigrationReport, Precopy, PrecopyConfig, RoundStats, StopReason};
pub use receive::{ReceiveSummary, Receiver};
pub use send::{RoundEnd, Sender};

use crate::address::GuestAddress;
use crate::bitmap::BitmapError;
use crate::bytes::{put_le_u32, put_le_u64};
use crate::memory::GuestMemoryError;

/// The first 8 bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"GMEMMIG\0";

/// The stream format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Bytes in the stream header (magic, version, flags).
pub const STREAM_HEADER_LEN: usize = 16;

/// Bytes in a frame header (type, flags, two arguments).
pub const FRAME_HEADER_LEN: usize = 24;

/// The most guest bytes one pages frame carries; the sender splits longer ranges, the
/// receiver refuses longer frames.
pub const MAX_FRAME_DATA: u64 = 4 << 20;

/// The page unit in which end-of-round frames count pages.
pub const STREAM_PAGE_SIZE: u64 = 4096;

/// Bytes of one entry of a checksums frame (start, length, checksum).
const CHECKSUM_ENTRY_LEN: usize = 24;

/// Frame types.
const FRAME_PAGES: u32 = 1;
const FRAME_END_OF_ROUND: u32 = 2;
const FRAME_CHECKSUMS: u32 = 3;
const FRAME_DONE: u32 = 4;

/// The name of a frame type, for errors.
fn frame_name(kind: u32) -> &'static str {
    match kind {
        FRAME_PAGES => "pages",
        FRAME_END_OF_ROUND => "end-of-round",
        FRAME_CHECKSUMS => "checksums",
        FRAME_DONE => "done",
        _ => "unknown",
    }
}

/// The stream header.
fn stream_header() -> [u8; STREAM_HEADER_LEN] {
    let mut h = [0u8; STREAM_HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    put_le_u32(&mut h, 8, VERSION);
    h
}

/// A frame header.
fn frame_header(kind: u32, a: u64, b: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    put_le_u32(&mut h, 0, kind);
    put_le_u64(&mut h, 8, a);
    put_le_u64(&mut h, 16, b);
    h
}

/// Pages of the stream's unit that `len` bytes count as.
fn stream_pages(len: u64) -> u64 {
    len.div_ceil(STREAM_PAGE_SIZE)
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
    /// A stream version this build does not read.
    #[error("stream version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    /// A frame type that does not exist.
    #[error("unknown frame type {kind} at byte {offset}")]
    UnknownFrame {
        /// The type found.
        kind: u32,
        /// Where the frame starts.
        offset: u64,
    },
    /// A frame or header field with a value the format forbids (non-zero flags, an empty pages
    /// frame, a non-zero reserved argument).
    #[error("invalid {what} at byte {offset}")]
    InvalidFrame {
        /// What is wrong.
        what: &'static str,
        /// Where the frame starts.
        offset: u64,
    },
    /// A pages frame longer than [`MAX_FRAME_DATA`].
    #[error("frame at byte {offset} announces {len:#x} bytes, more than {max:#x}")]
    FrameTooLarge {
        /// Where the frame starts.
        offset: u64,
        /// The length it announces.
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
    /// A guest range outside the memory (or, on the receiving side, not writable).
    #[error("guest range of {len:#x} bytes at {addr} cannot be migrated: {source}")]
    Memory {
        /// Start of the range.
        addr: GuestAddress,
        /// Its length.
        len: u64,
        /// Why.
        source: GuestMemoryError,
    },
    /// An end-of-round frame whose round number or page count disagrees with what arrived.
    #[error(
        "end of round {round} with {pages} pages, but round {expected_round} had {received_pages} pages"
    )]
    RoundMismatch {
        /// The round number in the frame.
        round: u64,
        /// The page count in the frame.
        pages: u64,
        /// The round the receiver was in.
        expected_round: u64,
        /// The pages it received in that round.
        received_pages: u64,
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
    /// A region whose contents differ after migration.
    #[error(
        "region [{addr}, +{len:#x}) differs after migration: source checksum {expected:#018x}, destination {actual:#018x}"
    )]
    ChecksumMismatch {
        /// The region's start.
        addr: GuestAddress,
        /// Its length.
        len: u64,
        /// The source's checksum.
        expected: u64,
        /// The destination's.
        actual: u64,
    },
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
