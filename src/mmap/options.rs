//! The typed options of [`MmapRegionBuilder`](super::MmapRegionBuilder): what backs a region
//! and how the kernel should treat it.

use std::ffi::CString;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use crate::sys::{MemPolicy, Seals};

/// A file and the offset in it where a mapping starts.
///
/// A region keeps its `FileOffset` for as long as it maps the file. It hands out the file's
/// descriptor as a [`BorrowedFd`] (for `SCM_RIGHTS`, `fstat`, a vhost-user memory table), not as
/// a `&File`: guestmem's API offers no call that could shrink a file under its own mapping.
/// Whoever else holds a descriptor of the file can still truncate it, unless it is a memfd
/// sealed against shrinking ([`MemfdOptions::sealed`], the default): see the crate's
/// guarantees on what happens then.
///
/// ```
/// use std::os::fd::AsFd;
/// use guestmem::mmap::FileOffset;
/// let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// let fo = FileOffset::new(f, 0x1000);
/// assert_eq!(fo.start(), 0x1000);
/// let st = guestmem::sys::fstat(fo.as_fd()).unwrap();
/// assert_eq!(st.size, 0);
/// assert_eq!(fo.with_start(0x2000).start(), 0x2000); // the same file, another offset
/// ```
///
/// ```compile_fail,E0624
/// let r = guestmem::mmap::MmapRegionBuilder::<()>::new(4096)
///     .backing(guestmem::mmap::Backing::Memfd(guestmem::mmap::MemfdOptions::new("ram")))
///     .build()
///     .unwrap();
/// r.file_offset().unwrap().file().set_len(0).unwrap(); // no `&File` to shrink it through
/// ```
#[derive(Clone, Debug)]
pub struct FileOffset {
    file: Arc<File>,
    start: u64,
}

impl FileOffset {
    /// `file` from byte `start` on.
    pub fn new(file: File, start: u64) -> Self {
        FileOffset { file: Arc::new(file), start }
    }

    /// A shared file from byte `start` on.
    pub fn from_arc(file: Arc<File>, start: u64) -> Self {
        FileOffset { file, start }
    }

    /// The same file from byte `start` on (sharing the open file, not duplicating it).
    #[must_use]
    pub fn with_start(&self, start: u64) -> Self {
        FileOffset { file: self.file.clone(), start }
    }

    /// The file, for the crate's own calls (never handed out: a `&File` can `set_len`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The offset in the file.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The file's seals (`F_GET_SEALS`; empty for a file that cannot be sealed).
    pub fn seals(&self) -> std::io::Result<Seals> {
        match crate::sys::fd::get_seals(self.file.as_fd()) {
            Ok(seals) => Ok(seals),
            // Files outside tmpfs/hugetlbfs (and memfds made without sealing) have none.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Seals::empty()),
            Err(e) => Err(e),
        }
    }
}

impl AsFd for FileOffset {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for FileOffset {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Options of a memfd backing (`memfd_create(2)`).
#[derive(Clone, Debug)]
pub struct MemfdOptions {
    pub(crate) name: CString,
    pub(crate) seal: bool,
}

impl MemfdOptions {
    /// A memfd named `name` (shown in `/proc/self/maps` as `/memfd:NAME`), sealed against
    /// shrinking and growing ([`sealed`](Self::sealed)). A name with a NUL byte has the NUL and
    /// what follows dropped.
    pub fn new(name: &str) -> Self {
        let name = name.split('\0').next().unwrap_or_default();
        MemfdOptions { name: CString::new(name).unwrap_or_default(), seal: true }
    }

    /// Whether to seal the memfd against shrinking and growing once it has its size
    /// (`F_SEAL_SHRINK | F_SEAL_GROW`; the default is `true`). Sealed, no holder of its
    /// descriptor (a vhost-user backend it is shared with, code that duplicated it) can ever
    /// truncate it under the mapping. `sealed(false)` is the explicit opt-out, for a VMM that
    /// must resize the file itself; such a memfd can be truncated by anyone holding it.
    ///
    /// ```
    /// use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
    /// use guestmem::sys::Seals;
    /// let r = MmapRegionBuilder::<()>::new(1 << 20).backing(Backing::Memfd(MemfdOptions::new("ram"))).build().unwrap();
    /// assert!(r.file_offset().unwrap().seals().unwrap().contains(Seals::SHRINK | Seals::GROW));
    /// ```
    #[must_use]
    pub fn sealed(mut self, seal: bool) -> Self {
        self.seal = seal;
        self
    }
}

/// What backs a region's memory.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Anonymous memory; `shared` makes it `MAP_SHARED` (shmem), inherited shared by children.
    Anonymous {
        /// `MAP_SHARED` instead of `MAP_PRIVATE`.
        shared: bool,
    },
    /// A file from an offset. `shared` mappings write through to the file; private ones are
    /// copy-on-write and never change it (a restored snapshot). A file on hugetlbfs is detected
    /// (`fstatfs`), and its page size is the filesystem's.
    File {
        /// The file and offset.
        file: FileOffset,
        /// `MAP_SHARED` instead of `MAP_PRIVATE`.
        shared: bool,
    },
    /// A new memfd of the region's size, mapped shared; its fd is available through
    /// [`MmapRegion::file_offset`](super::MmapRegion::file_offset) for another process.
    Memfd(MemfdOptions),
}

impl Default for Backing {
    fn default() -> Self {
        Backing::Anonymous { shared: false }
    }
}

/// Huge pages for a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HugePageSize {
    /// Transparent huge pages: `MADV_HUGEPAGE` on the range (align the start to 2 MiB to
    /// let the kernel use them).
    Transparent,
    /// 2 MiB pages from the hugetlb pool (`MAP_HUGETLB` / `MFD_HUGETLB`).
    Size2M,
    /// 1 GiB pages from the hugetlb pool.
    Size1G,
}

impl HugePageSize {
    /// The size of an explicit huge page in bytes; `None` for [`Transparent`](Self::Transparent).
    pub const fn bytes(self) -> Option<usize> {
        match self {
            HugePageSize::Transparent => None,
            HugePageSize::Size2M => Some(2 << 20),
            HugePageSize::Size1G => Some(1 << 30),
        }
    }
}

/// Prefaulting a region when it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Populate {
    /// Pages are faulted in when first touched.
    #[default]
    No,
    /// `MADV_POPULATE_WRITE` (`MADV_POPULATE_READ` for read-only or private file mappings,
    /// which must not copy every page), on one thread; errors are reported, unlike
    /// `MAP_POPULATE`.
    Now,
    /// The same, with the range split over this many threads.
    Parallel(NonZeroUsize),
}

/// Locking a region's memory in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Lock {
    /// Not locked.
    #[default]
    No,
    /// `mlock`: faulted in and locked now.
    Now,
    /// `mlock2(MLOCK_ONFAULT)`: each page is locked when first faulted in.
    OnFault,
}

/// A NUMA placement for a region (`mbind(2)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaPolicy {
    /// Bind, prefer or interleave.
    pub mode: MemPolicy,
    /// The node numbers.
    pub nodes: Vec<u32>,
}
