//! File-descriptor calls: `fstat(2)`, `fstatfs(2)`, `fallocate(2)`, `memfd_create(2)`, seals
//! through `fcntl(2)`, `lseek(2)` for data/holes, and the raw I/O calls `read(2)`, `write(2)`,
//! `pread(2)`, `pwrite(2)`, `readv(2)`, `writev(2)`, `preadv(2)`, `pwritev(2)` on memory given
//! as pointers (guest memory, which must never become a Rust reference).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::mman::flag_type;
use super::{cvt, cvt_long};

/// `HUGETLBFS_MAGIC` from `linux/magic.h`: the `f_type` of a hugetlbfs mount.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What kind of file an inode is (`S_IFMT` of `st_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file (also a memfd).
    Regular,
    /// A directory.
    Directory,
    /// A block device: its size is not in `st_size`.
    BlockDevice,
    /// A character device (`/dev/mem`, a DAX device, ...): its size is not in `st_size`.
    CharDevice,
    /// A pipe.
    Fifo,
    /// A socket.
    Socket,
    /// A symbolic link.
    Symlink,
}

/// The parts of `struct stat` guestmem uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    /// Device of the filesystem holding the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// File kind.
    pub kind: FileKind,
    /// Size in bytes (meaningful for regular files only).
    pub size: u64,
    /// Allocated space in 512-byte units (`st_blocks`): how sparse a file is.
    pub blocks_512: u64,
    /// Preferred I/O block size.
    pub block_size: u64,
    /// The device number a block or character device stands for (`st_rdev`; 0 otherwise).
    pub rdev: u64,
}

impl FileStat {
    /// Whether `st_size` tells how far the file can be mapped (regular files and memfds).
    /// Devices and the rest do not report a usable size.
    pub fn has_reliable_size(&self) -> bool {
        self.kind == FileKind::Regular
    }

    /// Whether both describe the same inode on the same device.
    pub fn same_inode(&self, other: &FileStat) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// The major and minor numbers of the device a block or character device stands for
    /// (glibc's encoding of `st_rdev`).
    pub fn rdev_major_minor(&self) -> (u32, u32) {
        let d = self.rdev;
        let major = ((d >> 8) & 0xfff) | ((d >> 32) & !0xfff);
        let minor = (d & 0xff) | ((d >> 12) & !0xff);
        (major as u32, minor as u32)
    }
}

/// `fstat(2)`.
///
/// ```
/// let f = std::fs::File::open("/proc/self/exe").unwrap();
/// let st = guestmem::sys::fstat(std::os::fd::AsFd::as_fd(&f)).unwrap();
/// assert_eq!(st.kind, guestmem::sys::fd::FileKind::Regular);
/// ```
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `struct stat` into the buffer we provide.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialized the whole struct.
    let st = unsafe { st.assume_init() };
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::Regular,
        libc::S_IFDIR => FileKind::Directory,
        libc::S_IFBLK => FileKind::BlockDevice,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        _ => FileKind::Symlink,
    };
    Ok(FileStat {
        dev: st.st_dev,
        ino: st.st_ino,
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks_512: u64::try_from(st.st_blocks).unwrap_or(0),
        block_size: u64::try_from(st.st_blksize).unwrap_or(0),
        rdev: st.st_rdev,
    })
}

/// How far a file can be mapped: `st_size` for a regular file (or memfd); for a block device
/// its size (`ioctl(BLKGETSIZE64)`); for a character device the `size` its driver publishes in
/// sysfs (`/sys/dev/char/MAJOR:MINOR/size`, as device DAX does). `Ok(None)` when the file's
/// kind has no size a mapping can be checked against (a character device without one, a pipe,
/// a socket, a directory).
///
/// ```
/// use std::os::fd::AsFd;
/// let f = std::fs::File::open("/proc/self/exe").unwrap();
/// assert!(guestmem::sys::fd::mappable_size(f.as_fd()).unwrap().unwrap() > 0);
/// let null = std::fs::File::open("/dev/null").unwrap();
/// assert_eq!(guestmem::sys::fd::mappable_size(null.as_fd()).unwrap(), None);
/// ```
pub fn mappable_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let st = fstat(fd)?;
    match st.kind {
        FileKind::Regular => Ok(Some(st.size)),
        FileKind::BlockDevice => {
            // _IOR(0x12, 114, size_t)
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
            let mut size: u64 = 0;
            // SAFETY: the fd is a block device (checked above; the borrow keeps it open, so it
            // cannot become another file in between), for which BLKGETSIZE64 writes one u64
            // through the pointer, which is ours and live.
            cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) })?;
            Ok(Some(size))
        }
        FileKind::CharDevice => {
            let (major, minor) = st.rdev_major_minor();
            match std::fs::read_to_string(format!("/sys/dev/char/{major}:{minor}/size")) {
                Ok(text) => text
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }
        _ => Ok(None),
    }
}

/// The parts of `struct statfs` guestmem uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStat {
    /// Filesystem magic (`f_type`), e.g. [`HUGETLBFS_MAGIC`].
    pub fs_type: i64,
    /// Block size (`f_bsize`): on hugetlbfs, the huge page size of the mount.
    pub block_size: u64,
}

impl FsStat {
    /// Whether the filesystem is hugetlbfs.
    pub fn is_hugetlbfs(&self) -> bool {
        self.fs_type == HUGETLBFS_MAGIC
    }
}

/// `fstatfs(2)`: the filesystem behind `fd` (hugetlbfs detection, its page size).
pub fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<FsStat> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one `struct statfs` into the buffer we provide.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so it initialized the whole struct.
    let st = unsafe { st.assume_init() };
    Ok(FsStat {
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
        fs_type: st.f_type as i64,
        block_size: u64::try_from(st.f_bsize).unwrap_or(0),
    })
}

flag_type! {
    /// Modes of `fallocate(2)`.
    FallocateMode: i32 {
        /// `FALLOC_FL_KEEP_SIZE`: do not change the file size.
        KEEP_SIZE = libc::FALLOC_FL_KEEP_SIZE;
        /// `FALLOC_FL_PUNCH_HOLE`: free the range (needs `KEEP_SIZE`); it reads back as zeros.
        PUNCH_HOLE = libc::FALLOC_FL_PUNCH_HOLE;
        /// `FALLOC_FL_ZERO_RANGE`.
        ZERO_RANGE = libc::FALLOC_FL_ZERO_RANGE;
    }
}

/// `fallocate(2)`: allocates, or with `PUNCH_HOLE | KEEP_SIZE` frees, `[offset, offset + len)`.
///
/// Punching a hole changes what every mapping of the file reads, like `write(2)` would; it
/// cannot make a mapping invalid, because the file keeps its size.
pub fn fallocate(fd: BorrowedFd<'_>, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate has no effect on process memory beyond what file writes have.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode.bits(), off, len) }).map(drop)
}

flag_type! {
    /// Flags of `memfd_create(2)`.
    MemfdFlags: u32 {
        /// `MFD_CLOEXEC`.
        CLOEXEC = libc::MFD_CLOEXEC;
        /// `MFD_ALLOW_SEALING`: seals can be added later.
        ALLOW_SEALING = libc::MFD_ALLOW_SEALING;
        /// `MFD_HUGETLB`: backed by the hugetlb pool.
        HUGETLB = libc::MFD_HUGETLB;
        /// `MFD_HUGE_2MB`: with `HUGETLB`, 2 MiB pages.
        HUGE_2MB = libc::MFD_HUGE_2MB;
        /// `MFD_HUGE_1GB`: with `HUGETLB`, 1 GiB pages.
        HUGE_1GB = libc::MFD_HUGE_1GB;
    }
}

/// `memfd_create(2)`: a new anonymous file of size 0.
///
/// ```
/// use guestmem::sys::{memfd_create, MemfdFlags};
/// let fd = memfd_create(c"guest-ram", MemfdFlags::CLOEXEC).unwrap();
/// ```
pub fn memfd_create(name: &CStr, flags: MemfdFlags) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags.bits()) })?;
    // SAFETY: the fd is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

flag_type! {
    /// File seals (`F_SEAL_*` of `fcntl(2)`).
    Seals: i32 {
        /// `F_SEAL_SEAL`: no more seals can be added.
        SEAL = libc::F_SEAL_SEAL;
        /// `F_SEAL_SHRINK`: the file cannot shrink (so no mapping of it can SIGBUS).
        SHRINK = libc::F_SEAL_SHRINK;
        /// `F_SEAL_GROW`: the file cannot grow.
        GROW = libc::F_SEAL_GROW;
        /// `F_SEAL_WRITE`: the contents cannot change.
        WRITE = libc::F_SEAL_WRITE;
        /// `F_SEAL_FUTURE_WRITE`: no new writable mappings or writes.
        FUTURE_WRITE = libc::F_SEAL_FUTURE_WRITE;
    }
}

/// `fcntl(F_ADD_SEALS)`: adds seals to a memfd created with `ALLOW_SEALING`.
pub fn add_seals(fd: BorrowedFd<'_>, seals: Seals) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and touches no process memory.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals.bits()) }).map(drop)
}

/// `fcntl(F_GET_SEALS)`: the seals of a memfd.
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<Seals> {
    // SAFETY: F_GET_SEALS touches no process memory.
    let bits = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    Ok(Seals::from_bits(bits).unwrap_or(Seals(bits)))
}

/// `ftruncate(2)`: sets the size of a file.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate touches no process memory (a shrink may make others' mappings SIGBUS,
    // which is why guestmem seals the memfds it shares).
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// Where [`lseek_data`] looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekData {
    /// `SEEK_DATA`: the next offset at or after the given one that holds data.
    Data,
    /// `SEEK_HOLE`: the next offset at or after the given one that is in a hole (or EOF).
    Hole,
}

/// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`. `Ok(None)` when there is no more data (`ENXIO`).
pub fn lseek_data(fd: BorrowedFd<'_>, offset: u64, whence: SeekData) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let whence = match whence {
        SeekData::Data => libc::SEEK_DATA,
        SeekData::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: lseek touches no process memory.
    match cvt_long(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) }) {
        Ok(pos) => Ok(Some(pos as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

fn offset_arg(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `read(2)` into `len` bytes at `buf`. Returns the count read (0 at end of file).
///
/// # Safety
/// `[buf, buf + len)` must be valid for writes for the duration of the call. The kernel
/// reports an unmapped or read-only destination as `EFAULT`; it never raises a signal.
pub unsafe fn read(fd: BorrowedFd<'_>, buf: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the destination is writable memory it may change.
    cvt_long(unsafe { libc::read(fd.as_raw_fd(), buf.cast(), len) }).map(|n| n as usize)
}

/// `write(2)` from `len` bytes at `buf`. Returns the count written.
///
/// # Safety
/// `[buf, buf + len)` must be valid for reads for the duration of the call.
pub unsafe fn write(fd: BorrowedFd<'_>, buf: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the source is readable.
    cvt_long(unsafe { libc::write(fd.as_raw_fd(), buf.cast(), len) }).map(|n| n as usize)
}

/// `pread(2)`: [`read()`] at a file offset, without moving the file position.
///
/// # Safety
/// As for [`read()`].
pub unsafe fn pread(fd: BorrowedFd<'_>, buf: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let off = offset_arg(offset)?;
    // SAFETY: the caller guarantees the destination is writable memory it may change.
    cvt_long(unsafe { libc::pread(fd.as_raw_fd(), buf.cast(), len, off) }).map(|n| n as usize)
}

/// `pwrite(2)`: [`write()`] at a file offset, without moving the file position.
///
/// # Safety
/// As for [`write()`].
pub unsafe fn pwrite(fd: BorrowedFd<'_>, buf: *const u8, len: usize, offset: u64) -> io::Result<usize> {
    let off = offset_arg(offset)?;
    // SAFETY: the caller guarantees the source is readable.
    cvt_long(unsafe { libc::pwrite(fd.as_raw_fd(), buf.cast(), len, off) }).map(|n| n as usize)
}

fn iov_count(iov: &[libc::iovec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `readv(2)`: scatter a read over the buffers of `iov`.
///
/// # Safety
/// Every `iovec` must describe memory valid for writes for the duration of the call.
pub unsafe fn readv(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> io::Result<usize> {
    let n = iov_count(iov)?;
    // SAFETY: the caller guarantees every buffer is writable; `iov` outlives the call.
    cvt_long(unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), n) }).map(|n| n as usize)
}

/// `writev(2)`: gather a write from the buffers of `iov`.
///
/// # Safety
/// Every `iovec` must describe memory valid for reads for the duration of the call.
pub unsafe fn writev(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> io::Result<usize> {
    let n = iov_count(iov)?;
    // SAFETY: the caller guarantees every buffer is readable; `iov` outlives the call.
    cvt_long(unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n) }).map(|n| n as usize)
}

/// `preadv(2)`: [`readv`] at a file offset.
///
/// # Safety
/// As for [`readv`].
pub unsafe fn preadv(fd: BorrowedFd<'_>, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let n = iov_count(iov)?;
    let off = offset_arg(offset)?;
    // SAFETY: the caller guarantees every buffer is writable; `iov` outlives the call.
    cvt_long(unsafe { libc::preadv(fd.as_raw_fd(), iov.as_ptr(), n, off) }).map(|n| n as usize)
}

/// `pwritev(2)`: [`writev`] at a file offset.
///
/// # Safety
/// As for [`writev`].
pub unsafe fn pwritev(fd: BorrowedFd<'_>, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let n = iov_count(iov)?;
    let off = offset_arg(offset)?;
    // SAFETY: the caller guarantees every buffer is readable; `iov` outlives the call.
    cvt_long(unsafe { libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), n, off) }).map(|n| n as usize)
}

/// `fcntl(F_DUPFD_CLOEXEC)` of a raw descriptor number: a new descriptor, owned by the caller,
/// for the same open file. Harmless for any number (one that is not open is `EBADF`); what the
/// new descriptor refers to is for the caller to check (see [`fd_link`]).
pub fn dup_raw(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC touches no process memory; on any number it either fails or
    // returns a new descriptor.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: the descriptor is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `readlink(2)` of `/proc/self/fd/N`: what the descriptor refers to, as the kernel names it (a
/// path, or `anon_inode:NAME` for anonymous files such as KVM's, `socket:[...]`, `pipe:[...]`).
///
/// ```
/// use std::os::fd::AsFd;
/// let f = std::fs::File::open("/proc/self/exe").unwrap();
/// assert!(guestmem::sys::fd::fd_link(f.as_fd()).unwrap().to_string_lossy().starts_with('/'));
/// ```
pub fn fd_link(fd: BorrowedFd<'_>) -> io::Result<std::ffi::OsString> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|p| p.into_os_string())
}

/// `kcmp(2)` with `KCMP_FILE` on two descriptors of this process: whether they refer to the same
/// open file (a `dup`, or the same file passed twice), not merely the same inode. Fails with
/// `ENOSYS` on kernels built without `CONFIG_KCMP`.
///
/// ```
/// use std::os::fd::AsFd;
/// let f = std::fs::File::open("/proc/self/exe").unwrap();
/// let g = f.try_clone().unwrap();
/// let h = std::fs::File::open("/proc/self/exe").unwrap();
/// assert!(guestmem::sys::fd::same_file(f.as_fd(), g.as_fd()).unwrap());
/// assert!(!guestmem::sys::fd::same_file(f.as_fd(), h.as_fd()).unwrap());
/// ```
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: getpid has no memory effects.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp with KCMP_FILE compares two descriptors by number and touches no memory.
    let r = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    })?;
    Ok(r == 0)
}

/// The maximum number of `iovec`s one vectored call takes (`IOV_MAX`, 1024 on Linux).
pub const IOV_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn memfd_seals_fstat_truncate() {
        let fd = memfd_create(c"t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(fd.as_fd(), 8192).unwrap();
        let st = fstat(fd.as_fd()).unwrap();
        assert_eq!((st.kind, st.size), (FileKind::Regular, 8192));
        assert!(st.has_reliable_size() && st.same_inode(&st));
        add_seals(fd.as_fd(), Seals::SHRINK | Seals::GROW).unwrap();
        let seals = get_seals(fd.as_fd()).unwrap();
        assert!(seals.contains(Seals::SHRINK | Seals::GROW) && !seals.contains(Seals::WRITE));
        assert_eq!(ftruncate(fd.as_fd(), 4096).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(ftruncate(fd.as_fd(), u64::MAX).unwrap_err().raw_os_error(), Some(libc::EFBIG));
        assert!(!fstatfs(fd.as_fd()).unwrap().is_hugetlbfs());
    }

    #[test]
    fn memfd_without_sealing_refuses_seals() {
        let fd = memfd_create(c"t", MemfdFlags::CLOEXEC).unwrap();
        assert_eq!(add_seals(fd.as_fd(), Seals::SHRINK).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn device_kind_is_not_sized() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let st = fstat(f.as_fd()).unwrap();
        assert_eq!(st.kind, FileKind::CharDevice);
        assert!(!st.has_reliable_size());
    }

    #[test]
    fn punch_hole_and_seek_data() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(&vec![0xAAu8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        fallocate(f.as_fd(), FallocateMode::PUNCH_HOLE | FallocateMode::KEEP_SIZE, 0, 512 << 10).unwrap();
        // Filesystems without hole support return the whole file as data; both answers are sane.
        let data = lseek_data(f.as_fd(), 0, SeekData::Data).unwrap().unwrap();
        assert!(data == 0 || data == 512 << 10, "{data}");
        assert_eq!(lseek_data(f.as_fd(), 2 << 20, SeekData::Data).unwrap(), None);
        let hole = lseek_data(f.as_fd(), 512 << 10, SeekData::Hole).unwrap().unwrap();
        assert_eq!(hole, 1 << 20);
        let mut buf = [0u8; 2];
        // SAFETY: `buf` is ours and writable.
        unsafe {
            assert_eq!(pread(f.as_fd(), buf.as_mut_ptr(), 2, 0).unwrap(), 2);
        }
        assert!(buf == [0, 0] || buf == [0xAA, 0xAA]);
        assert_eq!(f.stream_position().unwrap(), 1 << 20);
        let e = fallocate(f.as_fd(), FallocateMode::PUNCH_HOLE, 0, u64::MAX);
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EFBIG));
    }

    #[test]
    fn vectored_and_positional_io_on_a_pipe_and_file() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let iov = [
            libc::iovec { iov_base: a.as_ptr() as *mut _, iov_len: 3 },
            libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: 2 },
        ];
        // SAFETY: both buffers are readable for the call.
        unsafe {
            assert_eq!(pwritev(f.as_fd(), &iov, 10).unwrap(), 5);
            assert_eq!(writev(f.as_fd(), &iov).unwrap(), 5);
            assert_eq!(pwrite(f.as_fd(), b.as_ptr(), 2, 20).unwrap(), 2);
        }
        f.flush().unwrap();
        let mut x = [0u8; 2];
        let mut y = [0u8; 3];
        let iov = [
            libc::iovec { iov_base: x.as_mut_ptr().cast(), iov_len: 2 },
            libc::iovec { iov_base: y.as_mut_ptr().cast(), iov_len: 3 },
        ];
        // SAFETY: both buffers are writable for the call.
        unsafe {
            assert_eq!(preadv(f.as_fd(), &iov, 10).unwrap(), 5);
        }
        assert_eq!((x, y), ([1, 2], [3, 4, 5]));
        f.rewind().unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(readv(f.as_fd(), &iov).unwrap(), 5);
            assert_eq!(read(f.as_fd(), x.as_mut_ptr(), 2).unwrap(), 2);
            assert_eq!(write(f.as_fd(), x.as_ptr(), 2).unwrap(), 2);
            assert_eq!(
                pread(f.as_fd(), x.as_mut_ptr(), 2, u64::MAX).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
            assert_eq!(
                pwrite(f.as_fd(), x.as_ptr(), 2, u64::MAX).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
            let bad = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOV_MAX + 1];
            assert_eq!(readv(f.as_fd(), &bad).unwrap_err().raw_os_error(), Some(libc::EINVAL));
            assert_eq!(preadv(f.as_fd(), &iov, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EINVAL));
            assert_eq!(pwritev(f.as_fd(), &iov, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EINVAL));
            // A read-only destination is EFAULT from the kernel, not a signal.
            let ro = crate::sys::mmap(
                std::ptr::null_mut(),
                4096,
                crate::sys::Protection::READ,
                crate::sys::MapFlags::PRIVATE | crate::sys::MapFlags::ANONYMOUS,
                None,
                0,
            )
            .unwrap();
            assert_eq!(pread(f.as_fd(), ro, 2, 0).unwrap_err().raw_os_error(), Some(libc::EFAULT));
            crate::sys::munmap(ro, 4096).unwrap();
        }
        // The plain read at position 5 landed in the hole between the two writes.
        assert_eq!((x, y), ([0, 0], [3, 4, 5]));
    }
}
