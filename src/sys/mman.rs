//! Memory-mapping calls: `mmap(2)`, `munmap(2)`, `mprotect(2)`, `madvise(2)`, `msync(2)`,
//! `mlock(2)`/`munlock(2)`/`mlock2(2)`, `mincore(2)` and the page size from `sysconf(3)`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::cvt;

macro_rules! flag_type {
    (
        $(#[$meta:meta])*
        $name:ident: $repr:ty { $($(#[$fmeta:meta])* $flag:ident = $value:expr;)* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name($repr);

        impl $name {
            $($(#[$fmeta])* pub const $flag: Self = Self($value as $repr);)*

            /// No flag set.
            pub const fn empty() -> Self {
                Self(0)
            }

            /// The raw value handed to the kernel.
            pub const fn bits(self) -> $repr {
                self.0
            }

            /// The flags for a raw value, or `None` if it has a bit this type does not name.
            pub const fn from_bits(bits: $repr) -> Option<Self> {
                if bits & !(0 $(| ($value as $repr))*) == 0 {
                    Some(Self(bits))
                } else {
                    None
                }
            }

            /// Whether every flag of `other` is set in `self`.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether no flag is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// `self` with the flags of `other` added.
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// `self` with the flags of `other` removed.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
        }

        impl ::std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }

        impl ::std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                *self = self.union(rhs);
            }
        }

        impl ::std::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                Self(self.0 & rhs.0)
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                // Single-bit flags by name; composites (READ_WRITE) and multi-bit fields
                // (MAP_HUGE_*) are left to the hex remainder.
                let mut first = true;
                let mut rest = self.0;
                write!(f, "{}(", stringify!($name))?;
                $(
                    if ($value as $repr).count_ones() == 1 && self.contains(Self::$flag) {
                        if !first {
                            f.write_str(" | ")?;
                        }
                        f.write_str(stringify!($flag))?;
                        rest &= !($value as $repr);
                        first = false;
                    }
                )*
                if rest != 0 {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{:#x}", rest)?;
                } else if first {
                    f.write_str("empty")?;
                }
                f.write_str(")")
            }
        }
    };
}
pub(crate) use flag_type;

flag_type! {
    /// Memory protection of a mapping (`PROT_*` of `mmap(2)`).
    ///
    /// ```
    /// use guestmem::sys::Protection;
    /// let rw = Protection::READ | Protection::WRITE;
    /// assert_eq!(rw, Protection::READ_WRITE);
    /// assert!(rw.contains(Protection::WRITE));
    /// assert!(!Protection::READ.contains(Protection::WRITE));
    /// ```
    Protection: i32 {
        /// `PROT_NONE`: no access (guard pages).
        NONE = libc::PROT_NONE;
        /// `PROT_READ`.
        READ = libc::PROT_READ;
        /// `PROT_WRITE`.
        WRITE = libc::PROT_WRITE;
        /// `PROT_EXEC`.
        EXEC = libc::PROT_EXEC;
        /// `PROT_READ | PROT_WRITE`, the default of guest RAM.
        READ_WRITE = libc::PROT_READ | libc::PROT_WRITE;
    }
}

impl Protection {
    /// Whether the protection allows reads.
    pub const fn is_readable(self) -> bool {
        self.contains(Self::READ)
    }

    /// Whether the protection allows writes.
    pub const fn is_writable(self) -> bool {
        self.contains(Self::WRITE)
    }
}

flag_type! {
    /// Flags of `mmap(2)` (`MAP_*`).
    ///
    /// ```
    /// use guestmem::sys::MapFlags;
    /// let f = MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE;
    /// assert!(f.contains(MapFlags::ANONYMOUS));
    /// ```
    MapFlags: i32 {
        /// `MAP_SHARED`: writes reach the file and other mappings of it.
        SHARED = libc::MAP_SHARED;
        /// `MAP_PRIVATE`: copy-on-write.
        PRIVATE = libc::MAP_PRIVATE;
        /// `MAP_ANONYMOUS`: no file behind the mapping.
        ANONYMOUS = libc::MAP_ANONYMOUS;
        /// `MAP_FIXED`: place exactly at the address given, replacing what is there.
        FIXED = libc::MAP_FIXED;
        /// `MAP_FIXED_NOREPLACE`: place at the address given, fail with `EEXIST` if taken.
        FIXED_NOREPLACE = libc::MAP_FIXED_NOREPLACE;
        /// `MAP_NORESERVE`: do not reserve swap space.
        NORESERVE = libc::MAP_NORESERVE;
        /// `MAP_POPULATE`: prefault (silently best-effort; prefer `MADV_POPULATE_WRITE`).
        POPULATE = libc::MAP_POPULATE;
        /// `MAP_LOCKED` (silently best-effort; prefer `mlock`).
        LOCKED = libc::MAP_LOCKED;
        /// `MAP_HUGETLB`: back with huge pages from the hugetlb pool.
        HUGETLB = libc::MAP_HUGETLB;
        /// `MAP_HUGE_2MB`: with `HUGETLB`, 2 MiB pages.
        HUGE_2MB = libc::MAP_HUGE_2MB;
        /// `MAP_HUGE_1GB`: with `HUGETLB`, 1 GiB pages.
        HUGE_1GB = libc::MAP_HUGE_1GB;
        /// `MAP_SHARED_VALIDATE`: like `SHARED`, but unknown flags are an error.
        SHARED_VALIDATE = libc::MAP_SHARED_VALIDATE;
        /// `MAP_SYNC` (with `SHARED_VALIDATE`, DAX files only): the file's metadata is durable
        /// whenever a page is writable, so writing cache lines back makes data durable.
        SYNC = libc::MAP_SYNC;
    }
}

/// Advice for `madvise(2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Advice {
    /// `MADV_NORMAL`.
    Normal,
    /// `MADV_WILLNEED`: read ahead.
    WillNeed,
    /// `MADV_DONTNEED`: drop the pages. Private anonymous memory reads back as zeros; a private
    /// file mapping reads back the file's bytes; shared mappings keep their contents.
    DontNeed,
    /// `MADV_REMOVE`: free the backing store of a shared mapping (punches a hole).
    Remove,
    /// `MADV_FREE`: lazily free private anonymous pages.
    Free,
    /// `MADV_HUGEPAGE`: allow transparent huge pages.
    HugePage,
    /// `MADV_NOHUGEPAGE`: forbid transparent huge pages.
    NoHugePage,
    /// `MADV_DONTDUMP`: leave out of core dumps (`dd` in smaps).
    DontDump,
    /// `MADV_DODUMP`: undo `DontDump`.
    DoDump,
    /// `MADV_DONTFORK`: not inherited by a child of `fork(2)` (`dc` in smaps).
    DontFork,
    /// `MADV_DOFORK`: undo `DontFork`.
    DoFork,
    /// `MADV_MERGEABLE`: let KSM merge identical pages (`mg` in smaps).
    Mergeable,
    /// `MADV_UNMERGEABLE`: undo `Mergeable`.
    Unmergeable,
    /// `MADV_POPULATE_READ`: prefault readable, reporting errors.
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: prefault writable, reporting errors (unlike `MAP_POPULATE`).
    PopulateWrite,
}

impl Advice {
    /// The `MADV_*` constant.
    pub const fn raw(self) -> libc::c_int {
        match self {
            Advice::Normal => libc::MADV_NORMAL,
            Advice::WillNeed => libc::MADV_WILLNEED,
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Remove => libc::MADV_REMOVE,
            Advice::Free => libc::MADV_FREE,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::DontDump => libc::MADV_DONTDUMP,
            Advice::DoDump => libc::MADV_DODUMP,
            Advice::DontFork => libc::MADV_DONTFORK,
            Advice::DoFork => libc::MADV_DOFORK,
            Advice::Mergeable => libc::MADV_MERGEABLE,
            Advice::Unmergeable => libc::MADV_UNMERGEABLE,
            // Not in every libc release; the values are the kernel ABI (include/uapi/asm-generic/mman-common.h).
            Advice::PopulateRead => 22,
            Advice::PopulateWrite => 23,
        }
    }

    /// Whether the advice can change what the range reads back (drops or frees pages).
    pub const fn is_destructive(self) -> bool {
        matches!(self, Advice::DontNeed | Advice::Remove | Advice::Free)
    }
}

flag_type! {
    /// Flags of `msync(2)`.
    MsyncFlags: i32 {
        /// `MS_SYNC`: write back and wait.
        SYNC = libc::MS_SYNC;
        /// `MS_ASYNC`: schedule write-back.
        ASYNC = libc::MS_ASYNC;
        /// `MS_INVALIDATE`.
        INVALIDATE = libc::MS_INVALIDATE;
    }
}

flag_type! {
    /// Flags of `mlock2(2)`.
    Mlock2Flags: u32 {
        /// `MLOCK_ONFAULT`: lock pages as they are faulted in, not all at once.
        ONFAULT = libc::MLOCK_ONFAULT;
    }
}

/// `mmap(2)`: creates a mapping of `len` bytes.
///
/// `addr` is a hint, or the exact place with [`MapFlags::FIXED`]/[`MapFlags::FIXED_NOREPLACE`].
/// `fd` is `None` for anonymous memory (then `offset` must be 0).
///
/// # Safety
/// With [`MapFlags::FIXED`], `[addr, addr + len)` must be memory the caller owns and that
/// nothing else uses (the old mapping there is replaced without notice). Without it the call
/// creates a new mapping and cannot invalidate existing memory. The caller owns the result
/// and must `munmap` it.
pub unsafe fn mmap(
    addr: *mut u8,
    len: usize,
    prot: Protection,
    flags: MapFlags,
    fd: Option<BorrowedFd<'_>>,
    offset: u64,
) -> io::Result<*mut u8> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: the caller upholds the contract above for MAP_FIXED; otherwise mmap only creates
    // a new mapping. All arguments are plain values.
    let ret = unsafe { libc::mmap(addr.cast(), len, prot.bits(), flags.bits(), raw_fd, offset) };
    if ret == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret.cast())
    }
}

/// `munmap(2)`: removes the mappings in `[addr, addr + len)`.
///
/// # Safety
/// Nothing may use the range afterwards: every pointer, slice or reference into it dangles.
pub unsafe fn munmap(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is no longer used.
    cvt(unsafe { libc::munmap(addr.cast(), len) }).map(drop)
}

/// `mprotect(2)`: changes the protection of `[addr, addr + len)` (`addr` page aligned).
///
/// # Safety
/// Removing access from memory that Rust code reads or writes through references makes that
/// code fault; the caller must know every user of the range tolerates the new protection.
pub unsafe fn mprotect(addr: *mut u8, len: usize, prot: Protection) -> io::Result<()> {
    // SAFETY: the caller guarantees all users of the range tolerate the new protection.
    cvt(unsafe { libc::mprotect(addr.cast(), len, prot.bits()) }).map(drop)
}

/// `madvise(2)` of many ranges of this process at once: `process_madvise(2)` on a pidfd of
/// this process, 1024 ranges per call (the kernel then batches the TLB flushes of
/// `MADV_DONTNEED`). A kernel whose `process_madvise` refuses the advice for the calling
/// process (before Linux 6.13), or has no `process_madvise`, gets one `madvise` per range.
///
/// # Safety
/// As [`madvise`], for every range.
pub unsafe fn madvise_ranges(ranges: &[(*mut u8, usize)], advice: Advice) -> io::Result<()> {
    const BATCH: usize = 1024;
    // SAFETY: pidfd_open has no memory arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: the kernel just gave us this fd.
        unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }
    });
    let mut at = 0;
    if let Some(pidfd) = &pidfd {
        while at < ranges.len() {
            let batch = &ranges[at..(at + BATCH).min(ranges.len())];
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|&(addr, len)| libc::iovec { iov_base: addr.cast(), iov_len: len })
                .collect();
            let want: usize = batch.iter().map(|r| r.1).sum();
            // SAFETY: the iovecs describe the caller's ranges, under the caller's contract.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    advice.raw(),
                    0,
                )
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // Not this advice for ourselves, or no such call: one range at a time.
                    Some(libc::EINVAL | libc::ENOSYS | libc::EPERM) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            if ret as usize != want {
                // Part of the batch: finish it range by range.
                break;
            }
            at += batch.len();
        }
    }
    for &(addr, len) in &ranges[at..] {
        // SAFETY: the caller's contract, range by range (an advice given twice is harmless).
        unsafe { madvise(addr, len, advice) }?;
    }
    Ok(())
}

/// `madvise(2)`: gives `advice` for `[addr, addr + len)` (`addr` page aligned).
///
/// # Safety
/// With a destructive advice ([`Advice::is_destructive`]) the contents of the range change:
/// the caller must own the range and hold no reference into it. Other advice only changes
/// placement, dumping, forking or merging and is always sound on a mapped range.
pub unsafe fn madvise(addr: *mut u8, len: usize, advice: Advice) -> io::Result<()> {
    // SAFETY: the caller guarantees that a destructive advice hits only memory it owns.
    cvt(unsafe { libc::madvise(addr.cast(), len, advice.raw()) }).map(drop)
}

/// `msync(2)`: flushes a shared file mapping's changes to the file.
///
/// The kernel checks the range (`ENOMEM` if it is not mapped); no memory contents change.
pub fn msync(addr: *mut u8, len: usize, flags: MsyncFlags) -> io::Result<()> {
    // SAFETY: msync reads kernel page tables only; a bad range is reported as an error.
    cvt(unsafe { libc::msync(addr.cast(), len, flags.bits()) }).map(drop)
}

/// `mlock(2)`: locks `[addr, addr + len)` in RAM, faulting it in.
///
/// The kernel checks the range (`ENOMEM` if it is not mapped); no memory contents change.
pub fn mlock(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: mlock only pins pages; a bad range is reported as an error.
    cvt(unsafe { libc::mlock(addr.cast(), len) }).map(drop)
}

/// `mlock2(2)`: like [`mlock`], with [`Mlock2Flags::ONFAULT`] locking pages as they fault.
pub fn mlock2(addr: *const u8, len: usize, flags: Mlock2Flags) -> io::Result<()> {
    // SAFETY: mlock2 only pins pages; a bad range is reported as an error.
    cvt(unsafe { libc::mlock2(addr.cast(), len, flags.bits()) }).map(drop)
}

/// `munlock(2)`: unlocks `[addr, addr + len)`.
pub fn munlock(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: munlock only unpins pages; a bad range is reported as an error.
    cvt(unsafe { libc::munlock(addr.cast(), len) }).map(drop)
}

/// `mincore(2)`: for each page of `[addr, addr + len)` (`addr` page aligned), whether it is
/// resident in RAM, written into `vec` (one byte a page, bit 0 set when resident).
///
/// Fails with `EINVAL` if `vec` is shorter than the number of pages, `ENOMEM` if the range is
/// not mapped. Swapped-out pages read as not resident.
pub fn mincore(addr: *const u8, len: usize, vec: &mut [u8]) -> io::Result<()> {
    let pages = len.div_ceil(page_size());
    if vec.len() < pages {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `vec` has room for one byte per page of the range (checked above); mincore
    // writes nothing else and validates the range itself.
    cvt(unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) }).map(drop)
}

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// The base page size of the system, from `sysconf(_SC_PAGESIZE)` (cached after the first call).
///
/// ```
/// assert!(guestmem::sys::page_size().is_power_of_two());
/// ```
pub fn page_size() -> usize {
    let cached = PAGE_SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // POSIX requires _SC_PAGESIZE; 4096 is the only answer on x86-64 should it ever fail.
    let size = usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096);
    PAGE_SIZE.store(size, Ordering::Relaxed);
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(len: usize, prot: Protection) -> *mut u8 {
        // SAFETY: a new anonymous mapping, no MAP_FIXED.
        unsafe { mmap(std::ptr::null_mut(), len, prot, MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0) }
            .unwrap()
    }

    #[test]
    fn flags_debug_and_bits() {
        assert_eq!(format!("{:?}", Protection::READ_WRITE), "Protection(READ | WRITE)");
        assert_eq!(
            format!("{:?}", MapFlags::HUGETLB | MapFlags::HUGE_2MB),
            format!("MapFlags(HUGETLB | {:#x})", libc::MAP_HUGE_2MB)
        );
        assert_eq!(format!("{:?}", Protection::NONE), "Protection(empty)");
        assert_eq!(Protection::from_bits(libc::PROT_READ), Some(Protection::READ));
        assert_eq!(Protection::from_bits(0x4000_0000), None);
        assert_eq!(Protection::READ_WRITE.difference(Protection::WRITE), Protection::READ);
        assert!(Protection::READ_WRITE.is_writable() && !Protection::READ.is_writable());
        assert!(Protection::NONE.is_empty() && !Protection::NONE.is_readable());
        assert!(Advice::DontNeed.is_destructive() && !Advice::HugePage.is_destructive());
    }

    #[test]
    fn mmap_protect_advise_lock_mincore_munmap() {
        let ps = page_size();
        let len = 4 * ps;
        let p = anon(len, Protection::READ_WRITE);
        // SAFETY: p..p+len is our fresh mapping.
        unsafe { p.write_volatile(1) };
        let mut vec = vec![0u8; 4];
        mincore(p, len, &mut vec).unwrap();
        assert_eq!(vec[0] & 1, 1);
        assert_eq!(mincore(p, len, &mut vec[..3]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        mlock(p, ps).unwrap();
        munlock(p, ps).unwrap();
        mlock2(p, ps, Mlock2Flags::ONFAULT).unwrap();
        munlock(p, ps).unwrap();
        // SAFETY: we own the range; no reference into it exists.
        unsafe {
            madvise(p, len, Advice::DontNeed).unwrap();
            assert_eq!(p.read_volatile(), 0);
            madvise(p, len, Advice::PopulateWrite).unwrap();
            mprotect(p, len, Protection::READ).unwrap();
            assert_eq!(madvise(p.add(1), ps, Advice::Normal).unwrap_err().raw_os_error(), Some(libc::EINVAL));
            munmap(p, len).unwrap();
        }
        assert_eq!(mincore(p, len, &mut vec).unwrap_err().raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(mlock(p, len).unwrap_err().raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn msync_on_unmapped_is_enomem() {
        let ps = page_size();
        let p = anon(ps, Protection::READ_WRITE);
        msync(p, ps, MsyncFlags::SYNC).unwrap();
        // SAFETY: our mapping, unused afterwards.
        unsafe { munmap(p, ps).unwrap() };
        assert_eq!(msync(p, ps, MsyncFlags::SYNC).unwrap_err().raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn mmap_errors() {
        // SAFETY: a failing call creates nothing.
        let e = unsafe {
            mmap(std::ptr::null_mut(), 0, Protection::READ, MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0)
        };
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        // SAFETY: as above.
        let e = unsafe {
            mmap(
                std::ptr::null_mut(),
                4096,
                Protection::READ,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS,
                None,
                u64::MAX,
            )
        };
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EOVERFLOW));
    }
}
