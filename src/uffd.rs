//! Handing fault handling to another process: a VMM sends its userfaultfd and the layout of
//! the memory registered on it over a Unix socket (`SCM_RIGHTS`), and a handler process
//! receives them and serves the faults (from a snapshot: [`serve_handover`]).
//!
//! # The protocol
//!
//! One message from the VMM (the sender) to the handler (the receiver), on a connected Unix
//! stream or datagram socket, with exactly one fd (the userfaultfd) attached to its first
//! byte. Little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `GMEMUFFD` |
//! | 8..12 | version (1) |
//! | 12..16 | region count (1 to [`MAX_HANDOVER_REGIONS`]) |
//! | 16..24 | the features the userfaultfd was given (`UFFD_FEATURE_*`) |
//! | 24..32 | the sender's base page size |
//! | 32..40 | message length (48 + 32 × count) |
//! | 40..48 | [`Checksum`] of the message, taken with this field zero |
//! | 48.. | per region: host address, length, guest address, page size (the huge page size for hugetlb memory) |
//!
//! The receiver refuses anything else before it serves a fault: a wrong magic, version,
//! length or checksum, no fd or more than one, an fd that is not a userfaultfd, regions that
//! are empty, misaligned, out of guest order, overlapping (in guest or host addresses) or that
//! wrap. The host addresses are the sender's: the receiver never dereferences them, it passes
//! them to the userfaultfd ioctls, which act on the sender's memory and check every range.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use guestmem::snapshot::{self, lazy};
//! use guestmem::uffd;
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
//! # if guestmem::sys::uffd::available_features(guestmem::sys::uffd::OpenVia::Any).is_err() { return; }
//! let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! src.write_obj(42u32, GuestAddress(0x3000)).unwrap();
//! let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! snapshot::dump(&src, &file).unwrap();
//! lazy::write_chunk_table(&file, lazy::DEFAULT_CHUNK_SIZE).unwrap();
//!
//! // The VMM: empty memory in the snapshot's layout, registered, handed over.
//! let (vmm, handler) = UnixStream::pair().unwrap();
//! let (mem, fd, layout) = lazy::prepare_handover::<(), _>(&file, |_, b| b).unwrap();
//! uffd::send_handover(&vmm, &fd, &layout).unwrap();
//! drop(fd); // the handler holds it now
//!
//! // The handler (normally another process).
//! let received = uffd::receive_handover(&handler).unwrap();
//! let server = uffd::serve_handover(received, &file, lazy::LazyOptions::new()).unwrap();
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 42);
//! assert!(server.wait_complete(None).unwrap());
//! ```

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::address::GuestAddress;
use crate::bytes::{le_u32, le_u64, put_le_u32, put_le_u64};
use crate::checksum::Checksum;
use crate::snapshot::lazy::{self, LazyOptions, LazyServer};
use crate::sys::socket;
use crate::sys::uffd::{Features, Uffd};

/// The magic of a handover message.
pub const HANDOVER_MAGIC: [u8; 8] = *b"GMEMUFFD";
/// The protocol version this crate speaks.
pub const HANDOVER_VERSION: u32 = 1;
/// The most regions one handover describes.
pub const MAX_HANDOVER_REGIONS: usize = 1024;
const HEADER_LEN: usize = 48;
const ENTRY_LEN: usize = 32;

/// One registered range, as the handover describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandoverRegion {
    /// The sender's host address of the first byte.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The guest address of the first byte.
    pub guest_addr: GuestAddress,
    /// The page size of the memory (the huge page size for hugetlb memory).
    pub page_size: u64,
}

/// What a handler received: the userfaultfd and the layout of the memory registered on it.
#[derive(Debug)]
pub struct Handover {
    /// The userfaultfd (checked to be one).
    pub uffd: Uffd,
    /// The regions, in guest address order.
    pub regions: Vec<HandoverRegion>,
    /// The sender's base page size.
    pub base_page_size: u64,
}

/// Errors of the handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Sending or receiving failed.
    #[error("handover {op} failed: {source}")]
    Io {
        /// The step.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The message came with no fd, or with more than one.
    #[error("a handover carries exactly one fd, this one carried {0}")]
    FdCount(usize),
    /// The fd is not a userfaultfd.
    #[error("the handed-over fd is not a userfaultfd: {0}")]
    NotUffd(io::Error),
    /// The message is not a valid handover (or describes an impossible layout).
    #[error("invalid handover message: {reason}")]
    Invalid {
        /// What is wrong.
        reason: &'static str,
    },
    /// The handover's regions are not the snapshot's.
    #[error("handover region {index} is [{handover_addr}, +{handover_len:#x}), the snapshot's is [{snapshot_addr}, +{snapshot_len:#x})")]
    LayoutMismatch {
        /// The region's index (or the count, when the counts differ).
        index: usize,
        /// Its guest address in the handover.
        handover_addr: GuestAddress,
        /// Its length in the handover.
        handover_len: u64,
        /// The snapshot region's guest address.
        snapshot_addr: GuestAddress,
        /// The snapshot region's length.
        snapshot_len: u64,
    },
}

fn message_checksum(m: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(&m[..40]);
    c.zeros(8);
    c.update(&m[48..]);
    c.finish()
}

/// Encodes a handover message (no fd).
pub fn encode_handover(features: Features, regions: &[HandoverRegion]) -> Vec<u8> {
    let len = HEADER_LEN + ENTRY_LEN * regions.len();
    let mut m = vec![0u8; len];
    m[..8].copy_from_slice(&HANDOVER_MAGIC);
    put_le_u32(&mut m, 8, HANDOVER_VERSION);
    put_le_u32(&mut m, 12, regions.len() as u32);
    put_le_u64(&mut m, 16, features.bits());
    put_le_u64(&mut m, 24, crate::sys::page_size() as u64);
    put_le_u64(&mut m, 32, len as u64);
    for (i, r) in regions.iter().enumerate() {
        let e = HEADER_LEN + ENTRY_LEN * i;
        put_le_u64(&mut m, e, r.host_addr);
        put_le_u64(&mut m, e + 8, r.len);
        put_le_u64(&mut m, e + 16, r.guest_addr.0);
        put_le_u64(&mut m, e + 24, r.page_size);
    }
    let sum = message_checksum(&m);
    put_le_u64(&mut m, 40, sum);
    m
}

/// Sends `uffd` and the layout `regions` over `sock` (see the module doc).
pub fn send_handover(
    sock: &UnixStream,
    uffd: &Uffd,
    regions: &[HandoverRegion],
) -> Result<(), HandoverError> {
    if regions.is_empty() || regions.len() > MAX_HANDOVER_REGIONS {
        return Err(HandoverError::Invalid { reason: "region count out of range" });
    }
    let m = encode_handover(uffd.features(), regions);
    let io = |source| HandoverError::Io { op: "send", source };
    let sent = socket::send_with_fds(sock.as_fd(), &m, &[uffd.as_fd()]).map_err(io)?;
    std::io::Write::write_all(&mut &*sock, &m[sent..]).map_err(io)
}

/// Decodes and checks a handover message.
pub fn decode_handover(m: &[u8]) -> Result<(Features, u64, Vec<HandoverRegion>), HandoverError> {
    let bad = |reason| Err(HandoverError::Invalid { reason });
    if m.len() < HEADER_LEN {
        return bad("shorter than its header");
    }
    if m[..8] != HANDOVER_MAGIC {
        return bad("bad magic");
    }
    if le_u32(m, 8) != HANDOVER_VERSION {
        return bad("unsupported version");
    }
    let count = le_u32(m, 12) as usize;
    if count == 0 || count > MAX_HANDOVER_REGIONS {
        return bad("region count out of range");
    }
    if le_u64(m, 32) != (HEADER_LEN + ENTRY_LEN * count) as u64 || m.len() != HEADER_LEN + ENTRY_LEN * count {
        return bad("length does not match the region count");
    }
    if message_checksum(m) != le_u64(m, 40) {
        return bad("checksum mismatch");
    }
    let base = le_u64(m, 24);
    if !base.is_power_of_two() || base < 4096 {
        return bad("base page size is not a power of two of at least 4 KiB");
    }
    let mut regions = Vec::with_capacity(count);
    for i in 0..count {
        let e = HEADER_LEN + ENTRY_LEN * i;
        let r = HandoverRegion {
            host_addr: le_u64(m, e),
            len: le_u64(m, e + 8),
            guest_addr: GuestAddress(le_u64(m, e + 16)),
            page_size: le_u64(m, e + 24),
        };
        if !r.page_size.is_power_of_two() || r.page_size < base || r.page_size > 1 << 30 {
            return bad("region page size out of range");
        }
        if r.len == 0 || !r.len.is_multiple_of(r.page_size) || !r.host_addr.is_multiple_of(r.page_size) {
            return bad("region empty or not aligned to its page size");
        }
        if r.host_addr.checked_add(r.len).is_none() || r.guest_addr.0.checked_add(r.len).is_none() {
            return bad("region wraps the address space");
        }
        if let Some(p) = regions.last() {
            let p: &HandoverRegion = p;
            if r.guest_addr.0 < p.guest_addr.0 + p.len {
                return bad("regions overlap or are out of guest order");
            }
        }
        regions.push(r);
    }
    let mut by_host: Vec<_> = regions.iter().map(|r| (r.host_addr, r.len)).collect();
    by_host.sort_unstable();
    if by_host.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return bad("regions overlap in host addresses");
    }
    Ok((Features::from_bits(le_u64(m, 16)).unwrap_or_default(), base, regions))
}

/// Receives a handover on `sock`: one message with exactly one fd, which must be a
/// userfaultfd, describing a valid layout (see the module doc). Everything is checked before
/// it is returned; the fds that came with a refused message are closed.
pub fn receive_handover(sock: &UnixStream) -> Result<Handover, HandoverError> {
    let io = |source| HandoverError::Io { op: "receive", source };
    let mut m = vec![0u8; HEADER_LEN + ENTRY_LEN * MAX_HANDOVER_REGIONS];
    let (mut got, mut fds) = socket::recv_with_fds(sock.as_fd(), &mut m).map_err(io)?;
    if got == 0 {
        return Err(io(io::Error::from(io::ErrorKind::UnexpectedEof)));
    }
    // A stream may deliver the message in pieces: the header says how long it is.
    while got < HEADER_LEN || got < (le_u64(&m, 32).min(m.len() as u64) as usize) {
        if got >= HEADER_LEN && le_u64(&m, 32) > m.len() as u64 {
            return Err(HandoverError::Invalid { reason: "length out of range" });
        }
        let n = (&*sock).read(&mut m[got..]).map_err(io)?;
        if n == 0 {
            return Err(HandoverError::Invalid { reason: "the peer closed the socket mid-message" });
        }
        got += n;
    }
    if fds.len() != 1 {
        return Err(HandoverError::FdCount(fds.len()));
    }
    let (_, base, regions) = decode_handover(&m[..got])?;
    let fd: OwnedFd = fds.remove(0);
    let uffd = Uffd::from_received_fd(fd).map_err(HandoverError::NotUffd)?;
    Ok(Handover { uffd, regions, base_page_size: base })
}

/// Serves the faults of a received handover from the full snapshot `file`, whose regions must
/// be the handover's (guest addresses and lengths): [`lazy::restore_lazy`]'s handler, placing
/// pages in the sender's memory. The handle's memory is the other process's, so it offers
/// progress, completion and stop, not the memory.
pub fn serve_handover(handover: Handover, file: &File, options: LazyOptions) -> lazy::Result<LazyServer> {
    lazy::serve_regions(handover, file, options)
}
