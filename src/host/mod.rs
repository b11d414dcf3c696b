//! Process-memory utilities a VMM needs around its guest RAM: page sizes, what
//! `/proc/self/maps` and `/proc/self/smaps` say about an address, and guards that change the
//! protection of a range or lock it in RAM for a scope.
//!
//! - [`page_size`], [`huge_page_sizes`], [`page_floor`], [`page_ceil`], [`is_page_aligned`]:
//!   the page geometry of the host.
//! - [`query`], [`query_range`]: the [`MapArea`]s (kernel VMAs) holding an address or a range,
//!   parsed from `/proc/self/maps` by the pure [`parse_maps_line`].
//! - [`smaps`]: the [`SmapsArea`] of one address (resident, locked, THP and hugetlb sizes,
//!   `VmFlags`), parsed by the pure [`parse_smaps`]. This is where tests check that an
//!   `madvise`, `mlock` or huge page request took effect.
//! - [`ProtectGuard`]: `mprotect`s a range and puts back, on drop, the protection each part of
//!   it had before.
//! - [`LockGuard`]: `mlock`s a range and `munlock`s it on drop.
//! - [`sigbus`]: the SIGBUS handler that turns a fault in file-backed guest memory whose file
//!   was truncated under it into zero pages and a region that reports it, instead of a crash.
//!
//! The `/proc` files describe the process at the moment they are read: another thread that maps,
//! unmaps or protects memory at the same time can make an answer stale as soon as it is
//! returned. Every query reads the file afresh and stops at the first record past the address
//! it looks for.
//!
//! ```
//! use guestmem::host::{self, LockGuard};
//! use guestmem::sys::Protection;
//!
//! let ram = vec![0u8; 3 * host::page_size()];
//! let area = host::query(ram.as_ptr()).unwrap();
//! assert!(area.range.contains(&(ram.as_ptr() as usize)));
//! assert!(area.protection.contains(Protection::READ_WRITE));
//!
//! let lock = LockGuard::new(ram.as_ptr(), ram.len()).unwrap();
//! let info = host::smaps(ram.as_ptr()).unwrap();
//! assert!(info.has_flag("lo") && info.locked_kb > 0);
//! drop(lock);
//! ```

mod guard;
pub(crate) mod maps;
mod page;
pub mod sigbus;
pub(crate) mod smaps;

pub use guard::{LockGuard, ProtectGuard};
pub use maps::{parse_maps, parse_maps_line, query, query_range, MapArea};
pub use page::{huge_page_sizes, is_page_aligned, page_ceil, page_floor, page_size};
pub use smaps::{parse_smaps, smaps, SmapsArea};

use std::io;
use std::path::PathBuf;

/// Errors of the [`host`](self) module. Addresses are host virtual addresses.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No mapping contains `addr` (for a range: `addr` is the first address of it that is not
    /// mapped).
    #[error("host address {addr:#x} is not mapped")]
    Unmapped {
        /// The first unmapped address.
        addr: usize,
    },
    /// A range of zero bytes was given where at least one byte is needed.
    #[error("empty range at host address {addr:#x}")]
    ZeroLength {
        /// Start of the empty range.
        addr: usize,
    },
    /// `addr + len` (or that end rounded up to a page) does not fit in the address space.
    #[error("range of {len:#x} bytes at host address {addr:#x} overflows the address space")]
    Overflow {
        /// Start of the range.
        addr: usize,
        /// Length of the range, as given.
        len: usize,
    },
    /// `addr` is not a multiple of `align` (the page size).
    #[error("host address {addr:#x} is not aligned to {align:#x} bytes")]
    Unaligned {
        /// The misaligned address.
        addr: usize,
        /// The alignment required.
        align: usize,
    },
    /// A line of `/proc/self/maps` or `/proc/self/smaps` (or text given to a parser) has not
    /// the form the kernel writes.
    #[error("malformed /proc maps line: {line:?}")]
    Parse {
        /// The offending line (non-UTF-8 bytes replaced by U+FFFD).
        line: String,
    },
    /// A `/proc/self/smaps` record lacks a field that [`SmapsArea`] reports.
    #[error("smaps record of the area at {addr:#x} has no {field} field")]
    MissingField {
        /// Name of the field, as the kernel spells it (`"Rss"`, `"VmFlags"`, ...).
        field: &'static str,
        /// Start of the area whose record lacks it.
        addr: usize,
    },
    /// Reading a `/proc` or `/sys` file failed.
    #[error("cannot read {path}: {source}", path = path.display())]
    Read {
        /// The file read.
        path: PathBuf,
        /// The error of the read.
        source: io::Error,
    },
    /// A system call on the range `[addr, addr + len)` failed.
    #[error("{op} of {len:#x} bytes at host address {addr:#x} failed: {source}")]
    Os {
        /// The call (`"mprotect"`, `"mlock"`, `"mlock2"`, `"munlock"`).
        op: &'static str,
        /// Start of the range given to the call.
        addr: usize,
        /// Length of the range given to the call.
        len: usize,
        /// The `errno` of the call.
        source: io::Error,
    },
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Mappings for tests that no other test thread can map next to or into.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::sys::{self, MapFlags, Protection};

    /// `pages` read/write anonymous pages with an unmapped page on each side.
    ///
    /// They are placed with `MAP_FIXED_NOREPLACE` far below the top-down `mmap` area (at
    /// 16 TiB and up), so the holes around them stay holes while other test threads map and
    /// unmap memory, and the kernel has no neighbour to merge them with.
    #[derive(Debug)]
    pub(crate) struct Isolated {
        pub(crate) ptr: *mut u8,
        pub(crate) len: usize,
    }

    static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

    impl Isolated {
        pub(crate) fn new(pages: usize) -> Isolated {
            let ps = sys::page_size();
            let len = pages * ps;
            loop {
                let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
                assert!(slot < 4096, "no free slot for an isolated test mapping");
                // One GiB a slot leaves plenty of unmapped room around each mapping.
                let hint = (0x1000_0000_0000 + slot * (1 << 30) + ps) as *mut u8;
                // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
                let res = unsafe {
                    sys::mmap(
                        hint,
                        len,
                        Protection::READ_WRITE,
                        MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED_NOREPLACE,
                        None,
                        0,
                    )
                };
                match res {
                    Ok(ptr) if ptr == hint => return Isolated { ptr, len },
                    Ok(ptr) => {
                        // Kernels before 4.17 treat the flag as a hint; give the mapping back.
                        // SAFETY: the mapping was just created and is used by nobody.
                        unsafe { sys::munmap(ptr, len) }.unwrap();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("mmap of an isolated test mapping: {e}"),
                }
            }
        }

        /// The address `pages` pages after the start.
        pub(crate) fn page(&self, pages: usize) -> *mut u8 {
            self.ptr.wrapping_add(pages * sys::page_size())
        }

        /// The first address of the unmapped page before the mapping.
        pub(crate) fn hole_before(&self) -> usize {
            self.ptr as usize - sys::page_size()
        }

        /// The first address of the unmapped page after the mapping.
        pub(crate) fn hole_after(&self) -> usize {
            self.ptr as usize + self.len
        }

        /// The mapping as an address range.
        pub(crate) fn range(&self) -> std::ops::Range<usize> {
            self.ptr as usize..self.ptr as usize + self.len
        }
    }

    impl Drop for Isolated {
        fn drop(&mut self) {
            // SAFETY: the mapping belongs to this value; tests hold no pointer past its drop.
            unsafe { sys::munmap(self.ptr, self.len) }.unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_address() {
        let e = HostError::Unmapped { addr: 0x1000 };
        assert_eq!(e.to_string(), "host address 0x1000 is not mapped");
        let e = HostError::Os {
            op: "mlock",
            addr: 0x2000,
            len: 0x1000,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert!(e.to_string().starts_with("mlock of 0x1000 bytes at host address 0x2000 failed"));
        let e = HostError::MissingField { field: "Rss", addr: 0x3000 };
        assert_eq!(e.to_string(), "smaps record of the area at 0x3000 has no Rss field");
    }

    /// Every variant of `HostError` from a real call (an exhaustive match names them).
    #[test]
    fn every_host_error_variant() {
        let name = |e: &HostError| match e {
            HostError::Unmapped { .. } => "Unmapped",
            HostError::ZeroLength { .. } => "ZeroLength",
            HostError::Overflow { .. } => "Overflow",
            HostError::Unaligned { .. } => "Unaligned",
            HostError::Parse { .. } => "Parse",
            HostError::MissingField { .. } => "MissingField",
            HostError::Read { .. } => "Read",
            HostError::Os { .. } => "Os",
        };
        let page = super::page_size();
        let region = crate::mmap::MmapRegionBuilder::<()>::new(page).build().unwrap();
        // A read-only shared memfd mapping refuses write access: mprotect fails with EACCES.
        let ro_shared = crate::mmap::MmapRegionBuilder::<()>::new(page)
            .backing(crate::mmap::Backing::File {
                file: crate::mmap::FileOffset::new(readonly_memfd(page), 0),
                shared: true,
            })
            .protection(crate::sys::Protection::READ)
            .build()
            .unwrap();
        let produced = [
            super::query(std::ptr::null()).unwrap_err(),
            super::query_range(region.as_ptr(), 0).unwrap_err(),
            super::query_range(region.as_ptr(), usize::MAX).unwrap_err(),
            // SAFETY: the call fails on the unaligned address before changing anything.
            unsafe {
                super::ProtectGuard::new(region.as_ptr().wrapping_add(1), page, crate::sys::Protection::READ)
            }
            .unwrap_err(),
            super::parse_maps_line("not a maps line").unwrap_err(),
            // The maps file has no smaps fields: every smaps record field is missing.
            super::smaps::smaps_at(std::path::Path::new(super::maps::MAPS_PATH), region.as_ptr() as usize)
                .unwrap_err(),
            super::maps::area_at(std::path::Path::new("/nonexistent/maps"), 0).unwrap_err(),
            // SAFETY: the mapping is ours; the call fails (EACCES) and changes nothing.
            unsafe { super::ProtectGuard::new(ro_shared.as_ptr(), page, crate::sys::Protection::READ_WRITE) }
                .unwrap_err(),
        ];
        let produced: std::collections::BTreeSet<_> = produced.iter().map(name).collect();
        let all = ["Unmapped", "ZeroLength", "Overflow", "Unaligned", "Parse", "MissingField", "Read", "Os"];
        assert_eq!(produced, all.into_iter().collect());
    }

    /// A memfd opened read-only through /proc, so a shared mapping of it cannot become writable.
    fn readonly_memfd(len: usize) -> std::fs::File {
        let fd = crate::sys::memfd_create(c"ro", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        crate::sys::fd::ftruncate(std::os::fd::AsFd::as_fd(&fd), len as u64).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        std::fs::File::open(path).unwrap()
    }
}
