//! vhost-user, both sides: guest memory built from a front-end's memory table, translation of
//! the front-end's user addresses, and the shared dirty log.
//!
//! A vhost-user front-end (the VMM) shares guest RAM with a back-end (a device process) by
//! sending, over a Unix socket with `SCM_RIGHTS`, one descriptor per region and a table of
//! `{guest address, size, user address, mmap offset}` ([`MemoryRegionDesc`]); the back-end maps
//! the descriptors and serves the guest's rings, whose addresses arrive as the front-end's own
//! virtual ("user") addresses. During a live migration the front-end also shares a dirty log
//! ([`LogDesc`]: a descriptor, a size and an offset), in which the back-end sets one bit per
//! 4 KiB guest page it writes, with atomic ORs, for the front-end to harvest.
//!
//! # The back-end's side
//!
//! [`BackendMemory`] is what a back-end keeps: guest memory behind a
//! [`GuestMemoryAtomic`](crate::GuestMemoryAtomic) (so device threads hold snapshots while the
//! front-end replaces the table or hot-plugs regions), each snapshot a [`UserMemory`]: the
//! guest memory and the user-address table, swapped together. Every field of a table and every
//! received descriptor is hostile input, checked before anything is mapped (see
//! [`BackendMemory::set_mem_table`] for the rules): a refused table, region or log changes
//! nothing and closes the descriptors it came with. The regions' bitmaps ([`LogBitmap`]) mark
//! the front-end's log ([`SharedLog`]), so every write a device makes through guestmem is
//! logged where the front-end harvests it.
//!
//! # The VMM's side
//!
//! [`DirtyLog`] is a log the VMM creates (a memfd sealed against shrinking and growing), hands
//! over ([`fd`](DirtyLog::fd), [`desc`](DirtyLog::desc)), harvests word by word into the
//! bitmaps of its own guest memory ([`harvest_into`](DirtyLog::harvest_into): after it, the
//! VMM's dirty pages are the union of its own writes and the back-end's, as KVM's log merges
//! in), and replaces between migration rounds without losing a bit ([`swap`](DirtyLog::swap)).
//! [`MemoryRegionDesc::of_region`] describes a region of the VMM's memory for a table.
//!
//! ```
//! use std::os::fd::AsFd;
//! use guestmem::bitmap::AtomicBitmap;
//! use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
//! use guestmem::vhost_user::{BackendMemory, DirtyLog, MemoryRegionDesc};
//! use guestmem::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
//!
//! // The VMM: guest RAM in a memfd, and a log covering it.
//! let ram = MmapRegionBuilder::<AtomicBitmap>::new(1 << 20)
//!     .backing(Backing::Memfd(MemfdOptions::new("guest-ram")))
//!     .build()
//!     .unwrap();
//! let vmm = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(ram, GuestAddress(0)).unwrap()]).unwrap();
//! let (desc, fd) = MemoryRegionDesc::of_region(&vmm.regions()[0]).unwrap();
//! let mut log = DirtyLog::for_memory(&vmm).unwrap();
//!
//! // The back-end (another process in real life: the descriptors travel with SCM_RIGHTS).
//! let backend = BackendMemory::new().unwrap();
//! backend.set_mem_table(&[desc], vec![fd.try_clone_to_owned().unwrap()]).unwrap();
//! backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
//! let mem = backend.memory();
//! // A ring address arrives as the VMM's own virtual address.
//! let ring = mem.user_to_guest(desc.user_addr + 0x5000).unwrap();
//! mem.write_obj(7u64, ring).unwrap();
//!
//! // The VMM sees the write, and harvests it into its own bitmaps.
//! assert_eq!(vmm.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 7);
//! assert_eq!(log.harvest_into(&vmm).unwrap(), 1);
//! let mut dirty = Vec::new();
//! vmm.take_dirty_ranges(|addr, len| dirty.push((addr.0, len))).unwrap();
//! assert_eq!(dirty, [(0x5000, 0x1000)]);
//! ```

mod log;
mod table;
mod vmm;

pub use log::{LogBitmap, LogBitmapSlice, LogError, SharedLog, LOG_PAGE_SIZE, MAX_LOG_BYTES};
pub use table::{BackendMemory, TableError, UserMemory, DEFAULT_MAX_REGIONS, MAX_REGIONS};
pub use vmm::DirtyLog;

use std::os::fd::{AsFd, BorrowedFd};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::bitmap::Bitmap;
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::MapFlags;

/// One region of a vhost-user memory table, in the protocol's layout (four native-endian
/// `u64`s): where the region sits in guest-physical memory, its size, where the front-end has
/// it mapped, and where it starts in the descriptor sent with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable)]
pub struct MemoryRegionDesc {
    /// The guest-physical address of the region's first byte.
    pub guest_addr: u64,
    /// The size in bytes.
    pub size: u64,
    /// The front-end's virtual address of the region's first byte (ring addresses are given
    /// in these).
    pub user_addr: u64,
    /// The offset of the region's first byte in its descriptor's file.
    pub mmap_offset: u64,
}

/// Bytes of a `VHOST_USER_SET_MEM_TABLE` payload before the regions (count and padding).
const TABLE_HEADER: usize = 8;
/// Bytes of one region in a payload.
const REGION_BYTES: usize = std::mem::size_of::<MemoryRegionDesc>();

impl MemoryRegionDesc {
    /// The most regions one `VHOST_USER_SET_MEM_TABLE` message holds
    /// (`VHOST_MEMORY_BASELINE_NREGIONS`); more come with `VHOST_USER_ADD_MEM_REG`.
    pub const MAX_TABLE_REGIONS: usize = 8;

    /// The regions of a `VHOST_USER_SET_MEM_TABLE` payload (`u32` count, `u32` padding, then
    /// the regions). The count must be at most [`MAX_TABLE_REGIONS`](Self::MAX_TABLE_REGIONS)
    /// and the payload hold exactly that many regions (or the full eight-region struct); the
    /// count is checked before anything is allocated.
    ///
    /// ```
    /// use guestmem::vhost_user::MemoryRegionDesc;
    /// let r = MemoryRegionDesc { guest_addr: 0, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// let payload = MemoryRegionDesc::table_payload(&[r]).unwrap();
    /// assert_eq!(MemoryRegionDesc::parse_table(&payload).unwrap(), [r]);
    /// let mut forged = payload.clone();
    /// forged[..4].copy_from_slice(&1_000_000u32.to_ne_bytes());
    /// assert!(MemoryRegionDesc::parse_table(&forged).is_err());
    /// ```
    pub fn parse_table(payload: &[u8]) -> Result<Vec<Self>, TableError> {
        let Some(count) = payload.get(..4) else {
            return Err(TableError::Payload { len: payload.len(), expected: TABLE_HEADER });
        };
        let count = u32::from_ne_bytes([count[0], count[1], count[2], count[3]]) as usize;
        if count > Self::MAX_TABLE_REGIONS {
            return Err(TableError::TooManyRegions { count, max: Self::MAX_TABLE_REGIONS });
        }
        let expected = TABLE_HEADER + count * REGION_BYTES;
        let full = TABLE_HEADER + Self::MAX_TABLE_REGIONS * REGION_BYTES;
        if payload.len() != expected && payload.len() != full {
            return Err(TableError::Payload { len: payload.len(), expected });
        }
        Ok(payload[TABLE_HEADER..expected]
            .chunks_exact(REGION_BYTES)
            .filter_map(|bytes| Self::read_from_bytes(bytes).ok())
            .collect())
    }

    /// The `VHOST_USER_SET_MEM_TABLE` payload for `regions` (at most
    /// [`MAX_TABLE_REGIONS`](Self::MAX_TABLE_REGIONS)).
    pub fn table_payload(regions: &[Self]) -> Result<Vec<u8>, TableError> {
        if regions.len() > Self::MAX_TABLE_REGIONS {
            return Err(TableError::TooManyRegions { count: regions.len(), max: Self::MAX_TABLE_REGIONS });
        }
        let mut payload = Vec::with_capacity(TABLE_HEADER + regions.len() * REGION_BYTES);
        payload.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
        payload.extend_from_slice(&[0; 4]);
        for r in regions {
            payload.extend_from_slice(r.as_bytes());
        }
        Ok(payload)
    }

    /// The region of a `VHOST_USER_ADD_MEM_REG` or `VHOST_USER_REM_MEM_REG` payload (`u64`
    /// padding, then one region: exactly 40 bytes).
    ///
    /// ```
    /// use guestmem::vhost_user::MemoryRegionDesc;
    /// let r = MemoryRegionDesc { guest_addr: 0x1_0000_0000, size: 0x20_0000, user_addr: 0x7f12_0000_0000, mmap_offset: 0x1000 };
    /// assert_eq!(MemoryRegionDesc::parse_single(&r.single_payload()).unwrap(), r);
    /// assert!(MemoryRegionDesc::parse_single(&r.single_payload()[..39]).is_err());
    /// ```
    pub fn parse_single(payload: &[u8]) -> Result<Self, TableError> {
        let expected = 8 + REGION_BYTES;
        if payload.len() != expected {
            return Err(TableError::Payload { len: payload.len(), expected });
        }
        Self::read_from_bytes(&payload[8..]).map_err(|_| TableError::Payload { len: payload.len(), expected })
    }

    /// The `VHOST_USER_ADD_MEM_REG`/`VHOST_USER_REM_MEM_REG` payload for this region.
    pub fn single_payload(&self) -> [u8; 8 + REGION_BYTES] {
        let mut out = [0u8; 8 + REGION_BYTES];
        out[8..].copy_from_slice(self.as_bytes());
        out
    }

    /// The description of a region of the VMM's own memory for a front-end's table, and the
    /// descriptor to send with it: the region's file and offset, its guest address, and its
    /// host address as the user address. The region must be a shared mapping of a file or
    /// memfd ([`TableError::NotShared`] otherwise: a back-end could not see its memory).
    ///
    /// ```
    /// use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
    /// use guestmem::vhost_user::MemoryRegionDesc;
    /// use guestmem::{GuestAddress, GuestRegionMmap};
    /// let map = MmapRegionBuilder::<()>::new(1 << 20).backing(Backing::Memfd(MemfdOptions::new("ram"))).build().unwrap();
    /// let region = GuestRegionMmap::new(map, GuestAddress(1 << 30)).unwrap();
    /// let (desc, _fd) = MemoryRegionDesc::of_region(&region).unwrap();
    /// assert_eq!((desc.guest_addr, desc.size, desc.user_addr), (1 << 30, 1 << 20, region.as_ptr() as u64));
    /// let anon = GuestRegionMmap::new(MmapRegionBuilder::<()>::new(4096).build().unwrap(), GuestAddress(0)).unwrap();
    /// assert!(MemoryRegionDesc::of_region(&anon).is_err());
    /// ```
    pub fn of_region<B: Bitmap>(region: &GuestRegionMmap<B>) -> Result<(Self, BorrowedFd<'_>), TableError> {
        let not_shared = || TableError::NotShared { guest_addr: region.start_addr() };
        let file = region.file_offset().ok_or_else(not_shared)?;
        if !region.flags().contains(MapFlags::SHARED) {
            return Err(not_shared());
        }
        let desc = MemoryRegionDesc {
            guest_addr: region.start_addr().0,
            size: region.len(),
            user_addr: region.as_ptr() as u64,
            mmap_offset: file.start(),
        };
        Ok((desc, file.as_fd()))
    }
}

/// The log of a `VHOST_USER_SET_LOG_BASE` message (with `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): its
/// size in bytes and its offset in the descriptor sent with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable)]
pub struct LogDesc {
    /// Bytes of log: 8 bits per byte, each for a 4 KiB page from guest address 0 up.
    pub size: u64,
    /// Where the log starts in its file.
    pub offset: u64,
}

impl LogDesc {
    /// The log of a `VHOST_USER_SET_LOG_BASE` payload (exactly 16 bytes).
    ///
    /// ```
    /// use guestmem::vhost_user::LogDesc;
    /// let d = LogDesc { size: 4096, offset: 0 };
    /// assert_eq!(LogDesc::parse(&d.payload()).unwrap(), d);
    /// assert!(LogDesc::parse(&[0; 8]).is_err());
    /// ```
    pub fn parse(payload: &[u8]) -> Result<Self, LogError> {
        Self::read_from_bytes(payload).map_err(|_| LogError::Payload { len: payload.len(), expected: 16 })
    }

    /// The `VHOST_USER_SET_LOG_BASE` payload for this log.
    pub fn payload(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(self.as_bytes());
        out
    }
}
