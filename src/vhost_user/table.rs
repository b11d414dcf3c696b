//! The back-end's guest memory: [`BackendMemory`] (tables, hotplug, the log) and its snapshots,
//! [`UserMemory`] (guest memory with the front-end's user-address table).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::address::{GuestAddress, MemoryRegionAddress};
use crate::atomic::{GuestMemoryAtomic, GuestMemoryGuard};
use crate::memory::{GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestSlice};
use crate::mmap::{Backing, FileOffset, MmapError, MmapRegionBuilder};
use crate::region::{GuestMemoryRegion, GuestRegionMmap};
use crate::sys::{self, fd::FileKind};

use super::log::{LogBitmap, LogError, SharedLog};
use super::{LogDesc, MemoryRegionDesc};

/// The most regions a back-end memory accepts by default: 509, the memory slots QEMU offers a
/// vhost-user device with `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS`.
pub const DEFAULT_MAX_REGIONS: usize = 509;

/// The most regions any back-end memory may be configured for.
pub const MAX_REGIONS: usize = 4096;

/// Errors of vhost-user memory tables, hotplug and user-address translation. Each names the
/// region it is about by its position in the table (0 for a single hot-plugged region).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A message payload of the wrong length.
    #[error("memory table payload of {len} bytes, {expected} expected")]
    Payload {
        /// Bytes received.
        len: usize,
        /// Bytes the message needs.
        expected: usize,
    },
    /// More regions than the memory accepts (checked before anything is allocated).
    #[error("{count} regions, at most {max} accepted")]
    TooManyRegions {
        /// Regions there would be.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A table whose number of descriptors differs from its number of regions.
    #[error("{regions} regions came with {fds} descriptors")]
    FdCount {
        /// Regions in the table.
        regions: usize,
        /// Descriptors received.
        fds: usize,
    },
    /// A region of size 0.
    #[error("region {region} has size 0")]
    ZeroSize {
        /// Its position in the table.
        region: usize,
    },
    /// A field that is not a multiple of the page size.
    #[error("region {region}: {field} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// Its position in the table.
        region: usize,
        /// "guest address", "size", "user address" or "mmap offset".
        field: &'static str,
        /// The value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// A field plus the size that wraps past 2^64 (or, for the mmap offset, past a file
    /// offset's range), or a size larger than the address space.
    #[error("region {region}: {field} {value:#x} + size {size:#x} overflows")]
    Overflow {
        /// Its position in the table.
        region: usize,
        /// "guest address", "user address", "mmap offset" or "size".
        field: &'static str,
        /// The value.
        value: u64,
        /// The region's size.
        size: u64,
    },
    /// A descriptor that is not a regular file or memfd (a socket, a pipe, a device, a
    /// directory).
    #[error("region {region}: the descriptor is a {kind:?}, not a regular file or memfd")]
    NotAFile {
        /// Its position in the table.
        region: usize,
        /// What it is.
        kind: FileKind,
    },
    /// A region that runs past the end of its file.
    #[error("region {region}: {size:#x} bytes at offset {offset:#x} run past the end of its file of {file_size:#x} bytes")]
    FileTooShort {
        /// Its position in the table.
        region: usize,
        /// The file's size.
        file_size: u64,
        /// The region's offset in it.
        offset: u64,
        /// The region's size.
        size: u64,
    },
    /// Two regions that overlap in guest-physical memory.
    #[error("regions at guest addresses {first} and {second} overlap")]
    GuestOverlap {
        /// The lower region's guest address.
        first: GuestAddress,
        /// The other's.
        second: GuestAddress,
    },
    /// Two regions that overlap in the front-end's address space: a user address would name
    /// two places.
    #[error("regions at user addresses {first:#x} and {second:#x} overlap")]
    UserOverlap {
        /// The lower region's user address.
        first: u64,
        /// The other's.
        second: u64,
    },
    /// A region that extends past the dirty log in use: writes to it could not be logged.
    #[error("region {region} ends at {end:#x}, past the dirty log's end at {covers:#x}")]
    OutsideLog {
        /// Its position in the table.
        region: usize,
        /// The first guest address past the region.
        end: u64,
        /// The first guest address past the log.
        covers: u64,
    },
    /// Mapping a region failed (`fstat` or `mmap` refused, or a hugetlbfs file whose page size
    /// the offset or size is not a multiple of).
    #[error("region {region}: mapping failed: {source}")]
    Map {
        /// Its position in the table.
        region: usize,
        /// The error.
        source: MmapError,
    },
    /// Guest memory refused the regions (two regions mapping the same bytes of one file).
    #[error("guest memory: {0}")]
    Memory(#[source] GuestMemoryError),
    /// No region with this guest address, user address and size (a removal).
    #[error("no region of {size:#x} bytes at guest address {guest_addr:#x} and user address {user_addr:#x}")]
    NoSuchRegion {
        /// The guest address asked for.
        guest_addr: u64,
        /// The user address asked for.
        user_addr: u64,
        /// The size asked for.
        size: u64,
    },
    /// A user-address range that is not inside one region.
    #[error("user address range of {len:#x} bytes at {addr:#x} is not inside one region")]
    UserAddress {
        /// The user address.
        addr: u64,
        /// The length.
        len: u64,
    },
    /// A region of the VMM's memory that a back-end cannot map: not a shared mapping of a file.
    #[error("the region at {guest_addr} is not a shared mapping of a file or memfd")]
    NotShared {
        /// The region's guest address.
        guest_addr: GuestAddress,
    },
    /// The memory's dirty log could not be set up.
    #[error("dirty log: {0}")]
    Log(#[from] LogError),
}

/// One row of the user-address table: a region's user range and the region it maps to.
#[derive(Clone, Copy, Debug)]
struct UserRow {
    /// The region's size - 1.
    last: u64,
    /// Where the region starts in guest memory.
    guest: u64,
}

/// A snapshot of a back-end's memory: guest memory, and the table that translates the
/// front-end's user addresses into it, which change together.
///
/// Implements [`GuestMemory`] (and so [`Bytes<GuestAddress>`](crate::Bytes)) with guestmem's
/// flat translation table; the user-address table is a second one of the same shape.
#[derive(Debug, Clone)]
pub struct UserMemory {
    guest: GuestMemoryMmap<LogBitmap>,
    /// The user address of each region, in guest order.
    user_of: Box<[u64]>,
    /// User starts, sorted, for the binary search, and beside them the rows.
    user_starts: Box<[u64]>,
    user_rows: Box<[UserRow]>,
}

impl UserMemory {
    fn empty() -> Self {
        UserMemory {
            guest: GuestMemoryMmap::new(),
            user_of: Box::new([]),
            user_starts: Box::new([]),
            user_rows: Box::new([]),
        }
    }

    /// Memory of regions with their user addresses (in any order; checked not to overlap).
    fn build(mut regions: Vec<(Arc<GuestRegionMmap<LogBitmap>>, u64)>) -> Result<Self, TableError> {
        regions.sort_by_key(|(r, _)| r.start_addr());
        let user_of = regions.iter().map(|&(_, u)| u).collect();
        let mut rows: Vec<(u64, UserRow)> = regions
            .iter()
            .map(|(r, u)| (*u, UserRow { last: r.len() - 1, guest: r.start_addr().0 }))
            .collect();
        rows.sort_by_key(|&(u, _)| u);
        check_user_overlaps(rows.iter().map(|&(u, row)| (u, row.last)))?;
        let guest = GuestMemoryMmap::from_arc_regions(regions.into_iter().map(|(r, _)| r).collect())
            .map_err(TableError::Memory)?;
        Ok(UserMemory {
            guest,
            user_of,
            user_starts: rows.iter().map(|&(u, _)| u).collect(),
            user_rows: rows.iter().map(|&(_, row)| row).collect(),
        })
    }

    /// The guest memory.
    pub fn guest(&self) -> &GuestMemoryMmap<LogBitmap> {
        &self.guest
    }

    /// The guest address of the front-end's user address `addr`, if a region holds it.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// # guestmem::sys::fd::ftruncate(f.as_fd(), 0x10000).unwrap();
    /// # let desc = guestmem::vhost_user::MemoryRegionDesc { guest_addr: 0x10_0000, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_mem_table(&[desc], vec![f]).unwrap();
    /// use guestmem::GuestAddress;
    /// let mem = backend.memory();
    /// assert_eq!(mem.user_to_guest(desc.user_addr + 0x10), Some(GuestAddress(desc.guest_addr + 0x10)));
    /// assert_eq!(mem.user_to_guest(desc.user_addr + desc.size), None);
    /// ```
    #[inline]
    pub fn user_to_guest(&self, addr: u64) -> Option<GuestAddress> {
        let idx = self.user_starts.partition_point(|&s| s <= addr).checked_sub(1)?;
        let offset = addr - self.user_starts[idx];
        let row = self.user_rows[idx];
        (offset <= row.last).then_some(GuestAddress(row.guest + offset))
    }

    /// The guest address of the user range `[addr, addr + len)`, which must lie inside one
    /// region (a ring's descriptor table, available or used ring). `len` 0 checks `addr` only.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// # guestmem::sys::fd::ftruncate(f.as_fd(), 0x10000).unwrap();
    /// # let desc = guestmem::vhost_user::MemoryRegionDesc { guest_addr: 0x10_0000, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_mem_table(&[desc], vec![f]).unwrap();
    /// let mem = backend.memory();
    /// assert!(mem.user_range_to_guest(desc.user_addr + desc.size - 16, 16).is_ok());
    /// assert!(mem.user_range_to_guest(desc.user_addr + desc.size - 16, 17).is_err());
    /// assert!(mem.user_range_to_guest(u64::MAX, 2).is_err());
    /// ```
    pub fn user_range_to_guest(&self, addr: u64, len: u64) -> Result<GuestAddress, TableError> {
        let err = || TableError::UserAddress { addr, len };
        let idx = self.user_starts.partition_point(|&s| s <= addr).checked_sub(1).ok_or_else(err)?;
        let offset = addr - self.user_starts[idx];
        let row = self.user_rows[idx];
        if offset > row.last || len.saturating_sub(1) > row.last - offset {
            return Err(err());
        }
        Ok(GuestAddress(row.guest + offset))
    }

    /// The user range `[addr, addr + len)` as one slice of guest memory (it must lie inside one
    /// region). Writes through it are logged.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// # guestmem::sys::fd::ftruncate(f.as_fd(), 0x10000).unwrap();
    /// # let desc = guestmem::vhost_user::MemoryRegionDesc { guest_addr: 0x10_0000, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_mem_table(&[desc], vec![f]).unwrap();
    /// use guestmem::Bytes;
    /// let mem = backend.memory();
    /// let used = mem.user_slice(desc.user_addr + 0x2000, 64).unwrap();
    /// used.write_obj(3u16, 2).unwrap();
    /// ```
    pub fn user_slice(
        &self,
        addr: u64,
        len: usize,
    ) -> Result<GuestSlice<'_, GuestMemoryMmap<LogBitmap>>, TableError> {
        let guest = self.user_range_to_guest(addr, len as u64)?;
        self.guest.get_slice(guest, len).map_err(TableError::Memory)
    }

    /// The guest-address IOTLB mappings of a vhost-user IOTLB update (`VHOST_USER_IOTLB_MSG`
    /// of type 2, with `VIRTIO_F_IOMMU_PLATFORM`), whose target is a user address: the user
    /// range `[user_addr, user_addr + size)` split where it crosses regions, each piece mapped
    /// onto its region's guest addresses. Every byte must be in a region
    /// ([`TableError::UserAddress`] otherwise); apply the result with
    /// [`Iotlb::update_all`](crate::iommu::Iotlb::update_all), which takes all pieces or none.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// # guestmem::sys::fd::ftruncate(f.as_fd(), 0x10000).unwrap();
    /// # let desc = guestmem::vhost_user::MemoryRegionDesc { guest_addr: 0x10_0000, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_mem_table(&[desc], vec![f]).unwrap();
    /// use guestmem::iommu::{Access, Iotlb, Iova, Permissions};
    /// use guestmem::GuestAddress;
    /// let mem = backend.memory();
    /// let iotlb = Iotlb::new();
    /// let entries = mem.iotlb_entries(Iova(0x4000_0000), 0x2000, desc.user_addr + 0x1000, Permissions::READ).unwrap();
    /// iotlb.update_all(&entries).unwrap();
    /// let (gpa, _) = iotlb.snapshot().translate(Iova(0x4000_0010), 8, Access::Read).unwrap();
    /// assert_eq!(gpa, GuestAddress(desc.guest_addr + 0x1010));
    /// ```
    pub fn iotlb_entries(
        &self,
        iova: crate::iommu::Iova,
        size: u64,
        user_addr: u64,
        perm: crate::iommu::Permissions,
    ) -> Result<Vec<crate::iommu::IotlbEntry>, TableError> {
        let err = || TableError::UserAddress { addr: user_addr, len: size };
        if size == 0 || user_addr.checked_add(size - 1).is_none() || iova.0.checked_add(size - 1).is_none() {
            return Err(err());
        }
        let mut entries = Vec::new();
        let mut done = 0;
        while done < size {
            let at = user_addr + done;
            let idx = self.user_starts.partition_point(|&s| s <= at).checked_sub(1).ok_or_else(err)?;
            let offset = at - self.user_starts[idx];
            let row = self.user_rows[idx];
            if offset > row.last {
                return Err(err());
            }
            // At most one piece per region: the count is bounded by the table.
            let n = (row.last - offset + 1).min(size - done);
            entries.push(crate::iommu::IotlbEntry {
                iova: crate::iommu::Iova(iova.0 + done),
                size: n,
                guest_addr: GuestAddress(row.guest + offset),
                perm,
            });
            done += n;
        }
        Ok(entries)
    }

    /// The front-end's user address of guest address `addr`, if a region holds it.
    pub fn guest_to_user(&self, addr: GuestAddress) -> Option<u64> {
        let (region, offset) = self.guest.to_region_addr(addr)?;
        let idx = self.guest.regions().binary_search_by_key(&region.start_addr(), |r| r.start_addr()).ok()?;
        Some(self.user_of[idx] + offset.0)
    }

    /// The regions as the front-end described them, in guest address order.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// # guestmem::sys::fd::ftruncate(f.as_fd(), 0x10000).unwrap();
    /// # let desc = guestmem::vhost_user::MemoryRegionDesc { guest_addr: 0x10_0000, size: 0x10000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// # let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// # backend.set_mem_table(&[desc], vec![f]).unwrap();
    /// assert_eq!(backend.memory().table().collect::<Vec<_>>(), [desc]);
    /// ```
    pub fn table(&self) -> impl Iterator<Item = MemoryRegionDesc> + '_ {
        self.guest.regions().iter().zip(self.user_of.iter()).map(|(r, &user_addr)| MemoryRegionDesc {
            guest_addr: r.start_addr().0,
            size: r.len(),
            user_addr,
            mmap_offset: r.file_offset().map_or(0, FileOffset::start),
        })
    }
}

impl GuestMemory for UserMemory {
    type R = GuestRegionMmap<LogBitmap>;

    fn num_regions(&self) -> usize {
        self.guest.num_regions()
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRegionMmap<LogBitmap>> {
        self.guest.iter()
    }

    #[inline]
    fn to_region_addr(
        &self,
        addr: GuestAddress,
    ) -> Option<(&GuestRegionMmap<LogBitmap>, MemoryRegionAddress)> {
        self.guest.to_region_addr(addr)
    }

    fn last_addr(&self) -> GuestAddress {
        self.guest.last_addr()
    }

    #[inline]
    fn get_host_address(&self, addr: GuestAddress) -> Result<*mut u8, GuestMemoryError> {
        self.guest.get_host_address(addr)
    }

    #[inline(always)]
    fn get_slice(&self, addr: GuestAddress, count: usize) -> Result<GuestSlice<'_, Self>, GuestMemoryError> {
        self.guest.get_slice(addr, count)
    }
}

/// Refuses user ranges (sorted by start, as `(start, len - 1)`) that overlap.
fn check_user_overlaps(rows: impl Iterator<Item = (u64, u64)>) -> Result<(), TableError> {
    let mut prev: Option<(u64, u64)> = None;
    for (start, last) in rows {
        if let Some((p_start, p_last)) = prev {
            // `p_start + p_last` does not overflow: every range was checked to fit.
            if start <= p_start + p_last {
                return Err(TableError::UserOverlap { first: p_start, second: start });
            }
        }
        prev = Some((start, last));
    }
    Ok(())
}

/// A vhost-user back-end's guest memory: the memory tables and hot-plugged regions a front-end
/// sends, behind a [`GuestMemoryAtomic`], and the dirty log it shares.
///
/// Device threads take snapshots ([`memory`](Self::memory), or a
/// [`MemoryCache`](crate::MemoryCache) from [`atomic`](Self::atomic)) and keep them for a batch
/// of requests; the control thread applies the front-end's messages:
///
/// | message | call |
/// | --- | --- |
/// | `VHOST_USER_SET_MEM_TABLE` | [`set_mem_table`](Self::set_mem_table) |
/// | `VHOST_USER_ADD_MEM_REG` | [`add_region`](Self::add_region) |
/// | `VHOST_USER_REM_MEM_REG` | [`remove_region`](Self::remove_region) |
/// | `VHOST_USER_SET_LOG_BASE` | [`set_log_base`](Self::set_log_base) (reply once it returns) |
/// | `VHOST_USER_SET_FEATURES` without `VHOST_F_LOG_ALL` | [`clear_log_base`](Self::clear_log_base) |
///
/// Every change is all or nothing: a refused table, region or log leaves the memory and the
/// log as they were, maps nothing, and closes the descriptors it came with. A removed region
/// stays mapped until the last snapshot holding it is dropped (device threads should drop
/// theirs between requests).
///
/// Regions are mapped shared from their descriptors with guestmem's checks (the file is
/// `fstat`ed, the mapping never runs past its end). A front-end can still truncate a file that
/// is not sealed against shrinking (memfds usually are; a hugetlbfs or tmpfs file is not):
/// guestmem's SIGBUS recovery ([`host::sigbus`](crate::host::sigbus)) then maps zero pages
/// over what the file lost, so a device's access reads zeros instead of killing the process.
#[derive(Debug)]
pub struct BackendMemory {
    memory: GuestMemoryAtomic<UserMemory>,
    log: Arc<SharedLog>,
    max_regions: usize,
}

impl BackendMemory {
    /// An empty memory that accepts up to [`DEFAULT_MAX_REGIONS`] regions, with no log.
    ///
    /// ```
    /// use guestmem::GuestMemory;
    /// let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// assert_eq!(backend.memory().num_regions(), 0);
    /// ```
    pub fn new() -> Result<Self, TableError> {
        Self::with_max_regions(DEFAULT_MAX_REGIONS)
    }

    /// An empty memory that accepts up to `max_regions` regions (at most [`MAX_REGIONS`]; the
    /// answer to `VHOST_USER_GET_MAX_MEM_SLOTS`).
    ///
    /// ```
    /// use guestmem::vhost_user::{BackendMemory, MAX_REGIONS};
    /// assert_eq!(BackendMemory::with_max_regions(32).unwrap().max_regions(), 32);
    /// assert!(BackendMemory::with_max_regions(MAX_REGIONS + 1).is_err());
    /// ```
    pub fn with_max_regions(max_regions: usize) -> Result<Self, TableError> {
        if max_regions > MAX_REGIONS {
            return Err(TableError::TooManyRegions { count: max_regions, max: MAX_REGIONS });
        }
        Ok(BackendMemory {
            memory: GuestMemoryAtomic::new(UserMemory::empty()),
            log: SharedLog::new()?,
            max_regions,
        })
    }

    /// The most regions the memory accepts.
    pub fn max_regions(&self) -> usize {
        self.max_regions
    }

    /// A snapshot of the current memory.
    #[inline]
    pub fn memory(&self) -> GuestMemoryGuard<UserMemory> {
        self.memory.memory()
    }

    /// The memory as a [`GuestMemoryAtomic`]: for [`MemoryCache`](crate::MemoryCache)s and
    /// long-lived snapshots. Change it only through this type.
    pub fn atomic(&self) -> &GuestMemoryAtomic<UserMemory> {
        &self.memory
    }

    /// The shared dirty log (for explicit marks, and to ask whether logging is on).
    pub fn log(&self) -> &SharedLog {
        &self.log
    }

    /// Replaces the memory with the table `regions`, whose `i`th region is mapped from
    /// `fds[i]` (`VHOST_USER_SET_MEM_TABLE`).
    ///
    /// The table is hostile input. Refused, before anything is mapped:
    /// - more regions than [`max_regions`](Self::max_regions), or a number of descriptors
    ///   other than the number of regions;
    /// - a region of size 0; a guest address, size, user address or mmap offset that is not a
    ///   multiple of the page size; a guest or user range that wraps past 2^64, an mmap offset
    ///   whose end passes the largest file offset, a size larger than the address space;
    /// - two regions that overlap in guest-physical memory or in user addresses;
    /// - a region past the end of the dirty log, while one is attached;
    /// - a descriptor that is not a regular file or memfd (`fstat`: sockets, pipes, devices,
    ///   directories), or whose file ends before `mmap offset + size`.
    ///
    /// Then each region is mapped (a hugetlbfs file needs offsets and sizes in its huge pages),
    /// and guest memory refuses two regions that map the same bytes of one file. Any error
    /// unmaps what was mapped and closes every descriptor; the memory stays as it was.
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    /// use guestmem::vhost_user::{BackendMemory, MemoryRegionDesc, TableError};
    /// use guestmem::GuestMemory;
    ///
    /// let memfd = |len| -> OwnedFd {
    ///     let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    ///     guestmem::sys::fd::ftruncate(std::os::fd::AsFd::as_fd(&f), len).unwrap();
    ///     f
    /// };
    /// let backend = BackendMemory::new().unwrap();
    /// let r = |guest_addr, user_addr| MemoryRegionDesc { guest_addr, size: 0x10000, user_addr, mmap_offset: 0 };
    /// backend.set_mem_table(&[r(0, 0x7000_0000), r(0x10000, 0x8000_0000)], vec![memfd(0x10000), memfd(0x10000)]).unwrap();
    /// assert_eq!(backend.memory().num_regions(), 2);
    /// // Overlapping regions: refused, the old table stays.
    /// let e = backend.set_mem_table(&[r(0, 0x7000_0000), r(0x8000, 0x8000_0000)], vec![memfd(0x10000), memfd(0x10000)]);
    /// assert!(matches!(e, Err(TableError::GuestOverlap { .. })));
    /// // A file shorter than the region.
    /// let e = backend.set_mem_table(&[r(0, 0x7000_0000)], vec![memfd(0x1000)]);
    /// assert!(matches!(e, Err(TableError::FileTooShort { region: 0, .. })));
    /// assert_eq!(backend.memory().num_regions(), 2);
    /// ```
    pub fn set_mem_table(&self, regions: &[MemoryRegionDesc], fds: Vec<OwnedFd>) -> Result<(), TableError> {
        if regions.len() > self.max_regions {
            return Err(TableError::TooManyRegions { count: regions.len(), max: self.max_regions });
        }
        if fds.len() != regions.len() {
            return Err(TableError::FdCount { regions: regions.len(), fds: fds.len() });
        }
        let page = sys::page_size() as u64;
        for (i, desc) in regions.iter().enumerate() {
            check_fields(i, desc, page)?;
        }
        // Overlaps, on index lists sorted each way (bounded by max_regions).
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].guest_addr);
        for pair in order.windows(2) {
            let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
            if b.guest_addr <= a.guest_addr + (a.size - 1) {
                return Err(TableError::GuestOverlap {
                    first: GuestAddress(a.guest_addr),
                    second: GuestAddress(b.guest_addr),
                });
            }
        }
        order.sort_by_key(|&i| regions[i].user_addr);
        check_user_overlaps(order.iter().map(|&i| (regions[i].user_addr, regions[i].size - 1)))?;

        let guard = self.memory.lock();
        let covers = self.log.is_logging().then(|| self.log.covers());
        for (i, desc) in regions.iter().enumerate() {
            check_log(i, desc, covers)?;
        }
        for (i, (desc, fd)) in regions.iter().zip(&fds).enumerate() {
            check_file(i, desc, fd)?;
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (i, (desc, fd)) in regions.iter().zip(fds).enumerate() {
            mapped.push((self.map_region(i, desc, fd)?, desc.user_addr));
        }
        guard.replace(UserMemory::build(mapped)?);
        Ok(())
    }

    /// Adds one region, mapped from `fd` (`VHOST_USER_ADD_MEM_REG`), with the checks of
    /// [`set_mem_table`](Self::set_mem_table) against the regions already there. On error the
    /// memory is unchanged and `fd` closed.
    ///
    /// ```
    /// # use std::os::fd::OwnedFd;
    /// use guestmem::vhost_user::{BackendMemory, MemoryRegionDesc};
    /// use guestmem::GuestMemory;
    /// # let memfd = |len| -> OwnedFd {
    /// #     let f = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
    /// #     guestmem::sys::fd::ftruncate(std::os::fd::AsFd::as_fd(&f), len).unwrap();
    /// #     f
    /// # };
    /// let backend = BackendMemory::new().unwrap();
    /// let r = MemoryRegionDesc { guest_addr: 1 << 32, size: 0x20000, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    /// backend.add_region(&r, memfd(0x20000)).unwrap();
    /// assert!(backend.add_region(&r, memfd(0x20000)).is_err()); // the same place twice
    /// backend.remove_region(&r).unwrap();
    /// assert_eq!(backend.memory().num_regions(), 0);
    /// ```
    pub fn add_region(&self, region: &MemoryRegionDesc, fd: OwnedFd) -> Result<(), TableError> {
        let page = sys::page_size() as u64;
        check_fields(0, region, page)?;
        let guard = self.memory.lock();
        let current = guard.current();
        let count = current.num_regions() + 1;
        if count > self.max_regions {
            return Err(TableError::TooManyRegions { count, max: self.max_regions });
        }
        let last = region.guest_addr + (region.size - 1);
        for r in current.guest.iter() {
            if region.guest_addr <= r.last_addr().0 && r.start_addr().0 <= last {
                let (a, b) = if r.start_addr().0 < region.guest_addr {
                    (r.start_addr(), GuestAddress(region.guest_addr))
                } else {
                    (GuestAddress(region.guest_addr), r.start_addr())
                };
                return Err(TableError::GuestOverlap { first: a, second: b });
            }
        }
        let covers = self.log.is_logging().then(|| self.log.covers());
        check_log(0, region, covers)?;
        check_file(0, region, &fd)?;
        let new = self.map_region(0, region, fd)?;
        let mut regions: Vec<_> =
            current.guest.regions().iter().cloned().zip(current.user_of.iter().copied()).collect();
        regions.push((new, region.user_addr));
        guard.replace(UserMemory::build(regions)?);
        Ok(())
    }

    /// Removes the region with the guest address, user address and size of `region` (its mmap
    /// offset is ignored, as the protocol says; a descriptor that came with the message is for
    /// the caller to close). [`TableError::NoSuchRegion`] if there is none.
    pub fn remove_region(&self, region: &MemoryRegionDesc) -> Result<(), TableError> {
        let no_such = || TableError::NoSuchRegion {
            guest_addr: region.guest_addr,
            user_addr: region.user_addr,
            size: region.size,
        };
        let guard = self.memory.lock();
        let current = guard.current();
        let idx = current
            .guest
            .regions()
            .iter()
            .position(|r| r.start_addr().0 == region.guest_addr)
            .filter(|&i| {
                current.guest.regions()[i].len() == region.size && current.user_of[i] == region.user_addr
            })
            .ok_or_else(no_such)?;
        let regions = current
            .guest
            .regions()
            .iter()
            .cloned()
            .zip(current.user_of.iter().copied())
            .enumerate()
            .filter_map(|(i, r)| (i != idx).then_some(r))
            .collect();
        guard.replace(UserMemory::build(regions)?);
        Ok(())
    }

    /// Attaches the front-end's dirty log `fd` at `log` (`VHOST_USER_SET_LOG_BASE`), in place of
    /// the one in use, if any; reply to the front-end once this returns. From then on, every
    /// write through the memory is logged in it (see [`SharedLog`] for why a write racing with
    /// the switch is never lost).
    ///
    /// Refused (the log in use stays, `fd` is closed): a descriptor that is not a regular file
    /// or memfd; a file not sealed against shrinking, or sealed against writing; an offset
    /// that is not page aligned; fewer than 8 or more than [`MAX_LOG_BYTES`](super::MAX_LOG_BYTES)
    /// bytes; a log that runs past its file's end, or does not cover all of guest memory.
    ///
    /// ```
    /// use guestmem::vhost_user::{BackendMemory, DirtyLog, LogDesc, LogError};
    /// let backend = BackendMemory::new().unwrap();
    /// let log = DirtyLog::new(1 << 30).unwrap();
    /// backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    /// assert_eq!(backend.log().covers(), 1 << 30);
    /// // A log that claims more than its file holds.
    /// let forged = LogDesc { size: log.desc().size * 2, offset: 0 };
    /// let e = backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &forged).unwrap_err();
    /// assert!(matches!(e, LogError::FileTooShort { .. }));
    /// backend.clear_log_base();
    /// assert!(!backend.log().is_logging());
    /// ```
    pub fn set_log_base(&self, fd: OwnedFd, log: &LogDesc) -> Result<(), LogError> {
        // Under the writer lock: the memory cannot grow past the log while it is checked.
        let guard = self.memory.lock();
        let current = guard.current();
        let needed = if current.num_regions() == 0 { 0 } else { current.last_addr().0.saturating_add(1) };
        self.log.attach(fd, log, needed)
    }

    /// Detaches the dirty log (logging turned off): writes are no longer logged.
    pub fn clear_log_base(&self) {
        let _guard = self.memory.lock();
        self.log.detach();
    }

    /// Maps one checked region from `fd` and binds its bitmap to the log.
    fn map_region(
        &self,
        index: usize,
        desc: &MemoryRegionDesc,
        fd: OwnedFd,
    ) -> Result<Arc<GuestRegionMmap<LogBitmap>>, TableError> {
        let file = FileOffset::new(File::from(fd), desc.mmap_offset);
        // The size fits in usize: check_fields refused larger ones.
        let mapping = MmapRegionBuilder::<LogBitmap>::new(desc.size as usize)
            .backing(Backing::File { file, shared: true })
            .build()
            .map_err(|source| TableError::Map { region: index, source })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(desc.guest_addr)).map_err(TableError::Memory)?;
        region.bitmap().bind(self.log.clone(), region.start_addr());
        Ok(Arc::new(region))
    }
}

/// The checks of one region's fields (no system call).
fn check_fields(region: usize, d: &MemoryRegionDesc, page: u64) -> Result<(), TableError> {
    if d.size == 0 {
        return Err(TableError::ZeroSize { region });
    }
    for (field, value) in [
        ("guest address", d.guest_addr),
        ("size", d.size),
        ("user address", d.user_addr),
        ("mmap offset", d.mmap_offset),
    ] {
        if !value.is_multiple_of(page) {
            return Err(TableError::Unaligned { region, field, value, page_size: page });
        }
    }
    let overflow = |field, value| TableError::Overflow { region, field, value, size: d.size };
    if usize::try_from(d.size).is_err() || d.size > isize::MAX as u64 {
        return Err(overflow("size", d.size));
    }
    if d.guest_addr.checked_add(d.size - 1).is_none() {
        return Err(overflow("guest address", d.guest_addr));
    }
    if d.user_addr.checked_add(d.size - 1).is_none() {
        return Err(overflow("user address", d.user_addr));
    }
    if d.mmap_offset.checked_add(d.size).is_none_or(|end| end > i64::MAX as u64) {
        return Err(overflow("mmap offset", d.mmap_offset));
    }
    Ok(())
}

/// A region must end inside the log in use (`covers`: its end, if logging is on).
fn check_log(region: usize, d: &MemoryRegionDesc, covers: Option<u64>) -> Result<(), TableError> {
    let end = d.guest_addr.saturating_add(d.size);
    match covers {
        Some(covers) if end > covers => Err(TableError::OutsideLog { region, end, covers }),
        _ => Ok(()),
    }
}

/// The checks of one region's descriptor: a regular file long enough for the region.
fn check_file(region: usize, d: &MemoryRegionDesc, fd: &OwnedFd) -> Result<(), TableError> {
    let st = sys::fstat(fd.as_fd())
        .map_err(|source| TableError::Map { region, source: MmapError::Os { op: "fstat", source } })?;
    if st.kind != FileKind::Regular {
        return Err(TableError::NotAFile { region, kind: st.kind });
    }
    // check_fields made sure this does not overflow.
    if d.mmap_offset + d.size > st.size {
        return Err(TableError::FileTooShort {
            region,
            file_size: st.size,
            offset: d.mmap_offset,
            size: d.size,
        });
    }
    Ok(())
}
