//! The receiving side: every frame validated, pages written into destination memory.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use super::send::region_checksum;
use super::{
    frame_name, stream_pages, MigrationError, Result, CHECKSUM_ENTRY_LEN, FRAME_CHECKSUMS, FRAME_DONE,
    FRAME_END_OF_ROUND, FRAME_HEADER_LEN, FRAME_PAGES, MAGIC, MAX_FRAME_DATA, STREAM_HEADER_LEN, VERSION,
};
use crate::address::GuestAddress;
use crate::bitmap::BitmapSlice;
use crate::bytes::Bytes;
use crate::bytes::{le_u32, le_u64};
use crate::memory::{GuestMemory, GuestMemoryError};
use crate::region::GuestMemoryRegion;
use crate::volatile::{ReadVolatile, VolatileError, VolatileSlice};

/// The bounce buffer of the plain-`Read` path.
const BOUNCE_LEN: usize = 64 << 10;

/// What a complete stream brought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Rounds closed by an end-of-round frame.
    pub rounds: u64,
    /// Pages received, in [`STREAM_PAGE_SIZE`](super::STREAM_PAGE_SIZE) units.
    pub pages: u64,
    /// Guest bytes received.
    pub bytes: u64,
    /// Regions whose checksum matched the source's.
    pub regions_verified: usize,
}

/// Reads a migration stream into destination memory (see the [module docs](super) for the
/// format and what is checked).
///
/// Made with [`new_vectored`](Self::new_vectored) on a file descriptor, page data goes from
/// the kernel straight into guest memory with `read(2)`; made with [`new`](Self::new) on any
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
/// assert_eq!((summary.rounds, summary.pages, summary.regions_verified), (1, 4, 1));
/// assert_eq!(dst.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 42);
///
/// // A stream cut short is an error, not a hang or a panic.
/// let cut = Receiver::new(&stream[..100]).receive(&dst).unwrap_err();
/// assert!(matches!(cut, MigrationError::Truncated { .. }));
/// ```
#[derive(Debug)]
pub struct Receiver<R> {
    stream: R,
    /// How to reach the stream's fd, when it has one: the direct `read(2)` path.
    fd: Option<fn(&R) -> BorrowedFd<'_>>,
    /// Bytes consumed so far: the position errors report.
    offset: u64,
    bounce: Vec<u8>,
}

impl<R: Read + AsFd> Receiver<R> {
    /// A receiver on a file descriptor: page data is read from the fd straight into guest
    /// memory. `stream` must not buffer (a `TcpStream`, `UnixStream`, `File`, `ChildStdout`,
    /// ...): headers are read through `Read`, page data from the fd.
    pub fn new_vectored(stream: R) -> Self {
        Receiver { stream, fd: Some(<R as AsFd>::as_fd), offset: 0, bounce: Vec::new() }
    }
}

impl<R: Read> Receiver<R> {
    /// A receiver on any `Read`; page data goes through a bounce buffer.
    pub fn new(stream: R) -> Self {
        Receiver { stream, fd: None, offset: 0, bounce: Vec::new() }
    }

    /// The stream.
    pub fn into_inner(self) -> R {
        self.stream
    }

    /// Bytes of the stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the whole stream (header, frames, checksums, done) into `mem` and verifies every
    /// region's checksum. Stops at the done frame (later bytes are left unread).
    pub fn receive<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<ReceiveSummary> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        self.read_full(&mut header, "the stream header")?;
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

        let mut summary = ReceiveSummary::default();
        let mut round_pages = 0u64;
        let mut verified = false;
        loop {
            let at = self.offset;
            let mut h = [0u8; FRAME_HEADER_LEN];
            self.read_full(&mut h, "a frame header")?;
            let (kind, flags, a, b) = (le_u32(&h, 0), le_u32(&h, 4), le_u64(&h, 8), le_u64(&h, 16));
            if !matches!(kind, FRAME_PAGES | FRAME_END_OF_ROUND | FRAME_CHECKSUMS | FRAME_DONE) {
                return Err(MigrationError::UnknownFrame { kind, offset: at });
            }
            if flags != 0 {
                return Err(MigrationError::InvalidFrame { what: "frame flags", offset: at });
            }
            let expected = if verified { "done" } else { "pages, end-of-round or checksums" };
            match kind {
                FRAME_DONE if verified => {
                    if a != 0 || b != 0 {
                        return Err(MigrationError::InvalidFrame {
                            what: "done frame arguments",
                            offset: at,
                        });
                    }
                    return Ok(summary);
                }
                FRAME_PAGES | FRAME_END_OF_ROUND | FRAME_CHECKSUMS if !verified => {}
                _ => {
                    return Err(MigrationError::UnexpectedFrame {
                        offset: at,
                        found: frame_name(kind),
                        expected,
                    })
                }
            }
            match kind {
                FRAME_PAGES => {
                    self.receive_pages(mem, at, GuestAddress(a), b)?;
                    round_pages += stream_pages(b);
                    summary.pages += stream_pages(b);
                    summary.bytes += b;
                }
                FRAME_END_OF_ROUND => {
                    if a != summary.rounds || b != round_pages {
                        return Err(MigrationError::RoundMismatch {
                            round: a,
                            pages: b,
                            expected_round: summary.rounds,
                            received_pages: round_pages,
                        });
                    }
                    summary.rounds += 1;
                    round_pages = 0;
                }
                _ => {
                    if b != 0 {
                        return Err(MigrationError::InvalidFrame {
                            what: "checksums frame argument",
                            offset: at,
                        });
                    }
                    summary.regions_verified = self.verify(mem, a)?;
                    verified = true;
                }
            }
        }
    }

    /// A pages frame's data, after its header was checked, into `mem`.
    fn receive_pages<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        at: u64,
        addr: GuestAddress,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Err(MigrationError::InvalidFrame { what: "empty pages frame", offset: at });
        }
        if len > MAX_FRAME_DATA {
            return Err(MigrationError::FrameTooLarge { offset: at, len, max: MAX_FRAME_DATA });
        }
        let n = len as usize;
        mem.check_access(addr, n, true).map_err(|source| MigrationError::Memory { addr, len, source })?;
        let data_at = self.offset;
        let result = match self.fd {
            Some(fd) => {
                let mut src = fd(&self.stream);
                mem.read_exact_volatile_from(addr, &mut src, n)
            }
            None => {
                if self.bounce.is_empty() {
                    self.bounce = vec![0; BOUNCE_LEN];
                }
                let mut src = Bounce { stream: &mut self.stream, buf: &mut self.bounce };
                mem.read_exact_volatile_from(addr, &mut src, n)
            }
        };
        result.map_err(|e| match e {
            GuestMemoryError::PartialBuffer { completed, .. } => MigrationError::Truncated {
                offset: data_at,
                what: "page data",
                expected: len,
                got: completed as u64,
            },
            GuestMemoryError::Access { source: VolatileError::Io(source), .. } => {
                MigrationError::Io { op: "reading page data", source }
            }
            source => MigrationError::Memory { addr, len, source },
        })?;
        self.offset += len;
        Ok(())
    }

    /// The entries of a checksums frame, each compared with the destination region at the
    /// same place. Returns the number of regions verified.
    fn verify<M: GuestMemory + ?Sized>(&mut self, mem: &M, count: u64) -> Result<usize> {
        if count != mem.num_regions() as u64 {
            return Err(MigrationError::RegionCount {
                source_regions: count,
                destination_regions: mem.num_regions(),
            });
        }
        let mut verified = 0;
        for region in mem.iter() {
            let mut entry = [0u8; CHECKSUM_ENTRY_LEN];
            self.read_full(&mut entry, "a checksum entry")?;
            let (addr, len, expected) =
                (GuestAddress(le_u64(&entry, 0)), le_u64(&entry, 8), le_u64(&entry, 16));
            if addr != region.start_addr() || len != region.len() {
                return Err(MigrationError::RegionMismatch { addr, len });
            }
            let actual =
                region_checksum(region).map_err(|source| MigrationError::Memory { addr, len, source })?;
            if actual != expected {
                return Err(MigrationError::ChecksumMismatch { addr, len, expected, actual });
            }
            verified += 1;
        }
        Ok(verified)
    }

    /// Fills `buf` from the stream, or fails with [`MigrationError::Truncated`] naming `what`.
    fn read_full(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(MigrationError::Truncated {
                        offset: self.offset,
                        what,
                        expected: buf.len() as u64,
                        got: got as u64,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(MigrationError::Io { op: "reading the stream", source }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }
}

/// A plain `Read` as a [`ReadVolatile`], through a host buffer.
struct Bounce<'a, R> {
    stream: &'a mut R,
    buf: &'a mut [u8],
}

impl<R: Read> ReadVolatile for Bounce<'_, R> {
    fn read_volatile<S: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, S>,
    ) -> crate::volatile::Result<usize> {
        let n = buf.len().min(self.buf.len());
        let got = loop {
            match self.stream.read(&mut self.buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        // `got <= n`: `Read` returns at most the buffer's length (a broken reader that claims
        // more is capped rather than trusted).
        buf.copy_from(&self.buf[..got.min(n)])
    }
}
