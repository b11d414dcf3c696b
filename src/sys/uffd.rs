//! `userfaultfd(2)`: page faults of registered memory delivered to a thread of ours, which
//! resolves them by placing pages (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`).
//! See the kernel's `Documentation/admin-guide/mm/userfaultfd.rst` and `ioctl_userfaultfd(2)`.
//!
//! # The model
//!
//! A [`Uffd`] is a userfaultfd whose API handshake is done. Memory is handed to it with
//! [`Uffd::register`]: from then on a fault on a *missing* page of the range (never touched, or
//! discarded) does not allocate a zero page; the faulting thread sleeps and a
//! [`UffdEvent::PageFault`] is queued on the fd. Whoever reads the fd places the page (which
//! wakes the thread) or wakes the thread to let it retry ([`Uffd::wake`]).
//!
//! # Why these calls are safe or not
//!
//! [`Uffd::register`] is the `unsafe` step: it gives whoever holds the fd the right to decide
//! the contents of every missing page of the range, and makes faults there wait for it.
//! Its contract says the caller owns the range and that nothing relies on those pages reading
//! as zeros. Given that contract, the placing calls are safe for every argument: the kernel
//! fills only *missing* pages of ranges *registered on this fd* (`ENOENT` outside them,
//! `EEXIST` for a page that is there), so they can never overwrite memory anyone uses, and
//! their sources are `&[u8]`. A `Uffd` is only made by [`Uffd::open`] or, for an fd from
//! elsewhere (a handover), by the `unsafe` [`Uffd::from_fd`] or after checking that the fd is
//! a userfaultfd ([`Uffd::from_received_fd`]). [`Uffd::poison`] is `unsafe`: an access to a
//! poisoned page raises `SIGBUS`.
//!
//! # Measured on the project's machine (kernel 6.18, paravirtual KVM `kvm_pvm`, root)
//!
//! `cargo run --release --all-features --example uffd_facts` probes and measures these; its
//! output is in the README ("Lazy restore and post-copy").
//!
//! - Both ways to open work: `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) and the syscall.
//!   `vm.unprivileged_userfaultfd` is 0: without `CAP_SYS_PTRACE` only user-mode faults would
//!   be delivered, and KVM's accesses are kernel-mode ones.
//! - Features offered (all of [`Features`]): missing faults on anonymous, shmem and hugetlbfs
//!   memory, `EVENT_FORK`/`REMAP`/`REMOVE`/`UNMAP`, `SIGBUS`, `THREAD_ID`, minor faults on
//!   shmem and hugetlbfs (`UFFDIO_CONTINUE`), `EXACT_ADDRESS`, write-protect on shmem and
//!   hugetlbfs, `WP_UNPOPULATED`, `POISON`, `WP_ASYNC`, `MOVE`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::mman::flag_type;
use super::{cvt, cvt_long};

flag_type! {
    /// The features of the API handshake (`UFFD_FEATURE_*`).
    Features: u64 {
        /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported as such.
        PAGEFAULT_FLAG_WP = 1 << 0;
        /// `UFFD_FEATURE_EVENT_FORK`: a `fork(2)` gives a new userfaultfd for the child.
        EVENT_FORK = 1 << 1;
        /// `UFFD_FEATURE_EVENT_REMAP`: `mremap(2)` of registered memory is reported.
        EVENT_REMAP = 1 << 2;
        /// `UFFD_FEATURE_EVENT_REMOVE`: `MADV_DONTNEED`/`MADV_REMOVE` of registered memory is
        /// reported ([`UffdEvent::Remove`]); the `madvise` waits until the event is read.
        EVENT_REMOVE = 1 << 3;
        /// `UFFD_FEATURE_MISSING_HUGETLBFS`: missing faults on hugetlb memory.
        MISSING_HUGETLBFS = 1 << 4;
        /// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shmem (memfd, shared anonymous).
        MISSING_SHMEM = 1 << 5;
        /// `UFFD_FEATURE_EVENT_UNMAP`: `munmap(2)` of registered memory is reported.
        EVENT_UNMAP = 1 << 6;
        /// `UFFD_FEATURE_SIGBUS`: faults raise `SIGBUS` instead of being queued.
        SIGBUS = 1 << 7;
        /// `UFFD_FEATURE_THREAD_ID`: page faults carry the faulting thread's id.
        THREAD_ID = 1 << 8;
        /// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults (page in the page cache, not mapped)
        /// on hugetlbfs, resolved with `UFFDIO_CONTINUE`.
        MINOR_HUGETLBFS = 1 << 9;
        /// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem.
        MINOR_SHMEM = 1 << 10;
        /// `UFFD_FEATURE_EXACT_ADDRESS`: fault addresses are not rounded down to the page.
        EXACT_ADDRESS = 1 << 11;
        /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect mode on hugetlbfs and shmem.
        WP_HUGETLBFS_SHMEM = 1 << 12;
        /// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect applies to unpopulated pages too.
        WP_UNPOPULATED = 1 << 13;
        /// `UFFD_FEATURE_POISON`: `UFFDIO_POISON`.
        POISON = 1 << 14;
        /// `UFFD_FEATURE_WP_ASYNC`: write-protect faults resolved by the kernel.
        WP_ASYNC = 1 << 15;
        /// `UFFD_FEATURE_MOVE`: `UFFDIO_MOVE`.
        MOVE = 1 << 16;
    }
}

flag_type! {
    /// How a range is registered (`UFFDIO_REGISTER_MODE_*`).
    RegisterMode: u64 {
        /// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages that are not there.
        MISSING = 1 << 0;
        /// `UFFDIO_REGISTER_MODE_WP`: writes to write-protected pages.
        WP = 1 << 1;
        /// `UFFDIO_REGISTER_MODE_MINOR`: pages in the page cache but not mapped (shmem,
        /// hugetlbfs).
        MINOR = 1 << 2;
    }
}

flag_type! {
    /// The ioctls a registered range supports, as `UFFDIO_REGISTER` reports them (bit
    /// `_UFFDIO_*` of the ioctl's number).
    Ioctls: u64 {
        /// `UFFDIO_WAKE`.
        WAKE = 1 << 0x02;
        /// `UFFDIO_COPY`.
        COPY = 1 << 0x03;
        /// `UFFDIO_ZEROPAGE` (not on hugetlb memory).
        ZEROPAGE = 1 << 0x04;
        /// `UFFDIO_MOVE`.
        MOVE = 1 << 0x05;
        /// `UFFDIO_WRITEPROTECT`.
        WRITEPROTECT = 1 << 0x06;
        /// `UFFDIO_CONTINUE`.
        CONTINUE = 1 << 0x07;
        /// `UFFDIO_POISON`.
        POISON = 1 << 0x08;
    }
}

/// The userfaultfd API version of the handshake (`UFFD_API`).
pub const UFFD_API: u64 = 0xAA;

const UFFDIO: u32 = 0xAA;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// The layout shared by `uffdio_zeropage`, `uffdio_continue` and `uffdio_poison`: a range, a
/// mode, and the bytes done (or a negative errno).
#[repr(C)]
#[derive(Default)]
struct UffdioRangeOp {
    range: UffdioRange,
    mode: u64,
    done: i64,
}

mod nr {
    #![allow(missing_docs)]
    use super::*;
    vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioRangeOp);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioRangeOp);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_POISON, UFFDIO, 0x08, UffdioRangeOp);
}

/// How to create the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OpenVia {
    /// `/dev/userfaultfd` if it opens, else the syscall.
    #[default]
    Any,
    /// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` (Linux 6.1; access is by the device
    /// node's permissions).
    Device,
    /// The `userfaultfd(2)` syscall (needs `CAP_SYS_PTRACE` for kernel-mode faults, which KVM's
    /// are, unless `vm.unprivileged_userfaultfd` is 1).
    Syscall,
}

/// The flags every userfaultfd is opened with: close-on-exec, non-blocking reads. Kernel-mode
/// faults are kept (no `UFFD_USER_MODE_ONLY`): KVM and `read(2)` into registered memory
/// fault from the kernel.
const OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK;

/// `userfaultfd(2)` or `USERFAULTFD_IOC_NEW`: a new userfaultfd before its API handshake.
fn open_raw(via: OpenVia) -> io::Result<OwnedFd> {
    let device = || -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
        let fd = cvt(unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(&dev, nr::USERFAULTFD_IOC_NEW(), OPEN_FLAGS as libc::c_ulong)
        })?;
        // SAFETY: the fd is new and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let syscall = || -> io::Result<OwnedFd> {
        // SAFETY: userfaultfd takes its flags by value and returns a new fd or -1.
        let fd = cvt_long(unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) })?;
        // SAFETY: the fd is new and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    };
    match via {
        OpenVia::Device => device(),
        OpenVia::Syscall => syscall(),
        OpenVia::Any => device().or_else(|_| syscall()),
    }
}

/// `UFFDIO_API` on a new fd: the features the kernel granted and the ioctls of the fd.
fn api(fd: BorrowedFd<'_>, features: Features) -> io::Result<(Features, Ioctls)> {
    let mut arg = UffdioApi { api: UFFD_API, features: features.bits(), ioctls: 0 };
    // SAFETY: the kernel reads and writes one `struct uffdio_api`, which lives for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, nr::UFFDIO_API(), &mut arg) })?;
    Ok((Features(arg.features), Ioctls(arg.ioctls)))
}

/// The features this kernel offers (`UFFDIO_API` with no feature asked for, on a throwaway
/// userfaultfd opened `via`).
///
/// ```
/// use guestmem::sys::uffd::{self, Features, OpenVia};
/// # if uffd::available_features(OpenVia::Any).is_err() { return; } // no userfaultfd here
/// let offered = uffd::available_features(OpenVia::Any).unwrap();
/// assert!(offered.contains(Features::MISSING_SHMEM) || offered.is_empty());
/// ```
pub fn available_features(via: OpenVia) -> io::Result<Features> {
    let fd = open_raw(via)?;
    Ok(api(fd.as_fd(), Features::empty())?.0)
}

/// A `userfaultfd` after its API handshake, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
}

/// One message read from a userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted on a registered page (`UFFD_EVENT_PAGEFAULT`).
    PageFault {
        /// The address (page aligned unless `EXACT_ADDRESS` was granted).
        address: u64,
        /// `UFFD_PAGEFAULT_FLAG_*`: 1 write, 2 write-protect, 4 minor.
        flags: u64,
        /// The faulting thread's id when `THREAD_ID` was granted, else 0.
        thread_id: u32,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` of `[start, end)` (`UFFD_EVENT_REMOVE`): the pages are
    /// dropped once the event is read, and fault again (as missing) when touched.
    Remove {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// `munmap(2)` of `[start, end)` (`UFFD_EVENT_UNMAP`).
    Unmap {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// `mremap(2)` (`UFFD_EVENT_REMAP`).
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `fork(2)` (`UFFD_EVENT_FORK`): the child's userfaultfd, now owned by the reader.
    Fork {
        /// The raw fd number of the child's userfaultfd.
        fd: u32,
    },
    /// An event this crate does not decode.
    Other {
        /// The `UFFD_EVENT_*` code.
        event: u8,
    },
}

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const PAGEFAULT_FLAG_MINOR: u64 = 4;

/// Bytes of one `struct uffd_msg`.
pub const MSG_LEN: usize = 32;

fn u64_at(b: &[u8; MSG_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl UffdEvent {
    /// Decodes one `struct uffd_msg`.
    pub fn decode(msg: &[u8; MSG_LEN]) -> UffdEvent {
        // The union starts at byte 8.
        match msg[0] {
            0x12 => UffdEvent::PageFault {
                flags: u64_at(msg, 8),
                address: u64_at(msg, 16),
                thread_id: u64_at(msg, 24) as u32,
            },
            0x13 => UffdEvent::Fork { fd: u64_at(msg, 8) as u32 },
            0x14 => UffdEvent::Remap { from: u64_at(msg, 8), to: u64_at(msg, 16), len: u64_at(msg, 24) },
            0x15 => UffdEvent::Remove { start: u64_at(msg, 8), end: u64_at(msg, 16) },
            0x16 => UffdEvent::Unmap { start: u64_at(msg, 8), end: u64_at(msg, 16) },
            event => UffdEvent::Other { event },
        }
    }
}

/// The result of a placing ioctl that may stop part-way: the bytes placed before it stopped,
/// and why it stopped.
fn placed(ret: io::Result<libc::c_int>, done: i64, len: usize) -> Result<usize, (usize, io::Error)> {
    match ret {
        Ok(_) => Ok(len),
        Err(e) => Err((usize::try_from(done).unwrap_or(0), e)),
    }
}

impl Uffd {
    /// Opens a userfaultfd `via` the device or the syscall and does the API handshake asking for
    /// `features`. Fails with `EINVAL` if the kernel lacks one of them (compare with
    /// [`available_features`] to name it), `EPERM` without the privilege.
    ///
    /// ```
    /// use guestmem::sys::uffd::{Features, OpenVia, Uffd};
    /// # if guestmem::sys::uffd::available_features(OpenVia::Any).is_err() { return; }
    /// let uffd = Uffd::open(OpenVia::Any, Features::EVENT_REMOVE).unwrap();
    /// assert!(uffd.features().contains(Features::EVENT_REMOVE));
    /// ```
    pub fn open(via: OpenVia, features: Features) -> io::Result<Uffd> {
        let fd = open_raw(via)?;
        let (granted, _) = api(fd.as_fd(), features)?;
        Ok(Uffd { fd, features: granted })
    }

    /// Adopts a userfaultfd whose handshake is done (received from another process, say).
    ///
    /// # Safety
    /// `fd` must be a userfaultfd. Every range registered on it must be memory whose missing
    /// pages the holder of the fd may fill with any bytes (the contract of [`register`]),
    /// for example ranges of another process that handed the fd over for that purpose.
    ///
    /// [`register`]: Self::register
    pub unsafe fn from_fd(fd: OwnedFd, features: Features) -> Uffd {
        Uffd { fd, features }
    }

    /// Adopts a userfaultfd received from another process (over `SCM_RIGHTS`), after checking
    /// that it is one (`/proc/self/fd` names it `anon_inode:[userfaultfd]`); its features are
    /// read from `/proc/self/fdinfo`. The sender's registration handed the filling of the
    /// registered ranges to the fd's holder; ranges of this process can only be on it if this
    /// process registered them itself, under [`register`](Self::register)'s contract.
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    /// use guestmem::sys::uffd::Uffd;
    /// let not_uffd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    /// assert!(Uffd::from_received_fd(not_uffd).is_err());
    /// ```
    pub fn from_received_fd(fd: OwnedFd) -> io::Result<Uffd> {
        let n = fd.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{n}"))?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the fd is not a userfaultfd"));
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{n}"))?;
        // "API:\t<api>:<features>:<ioctls>", all hexadecimal.
        let features = info
            .lines()
            .find_map(|l| l.strip_prefix("API:"))
            .and_then(|v| v.trim().split(':').nth(1).map(str::to_owned))
            .and_then(|f| u64::from_str_radix(&f, 16).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no API line in the fd's fdinfo"))?;
        Ok(Uffd { fd, features: Features(features) })
    }

    /// The features granted in the handshake.
    pub fn features(&self) -> Features {
        self.features
    }

    fn range_ioctl(&self, request: libc::c_ulong, arg: &mut UffdioRangeOp) -> io::Result<libc::c_int> {
        // SAFETY: the kernel reads the range and mode and writes the count into `arg`, which
        // lives for the call. What the ioctl does to memory is each caller's to justify.
        cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, request, arg) })
    }

    /// `UFFDIO_REGISTER`: faults of `mode` on `[start, start + len)` (page aligned; whole
    /// huge pages on hugetlb memory) go to this fd from now on. Returns the ioctls the range
    /// supports (no `ZEROPAGE` on hugetlb memory). Fails with `EINVAL` for memory the mode
    /// does not support (a regular file's shared mapping for `MISSING`, ...) or a range that
    /// is not wholly mapped, `EBUSY` if another userfaultfd has part of it.
    ///
    /// # Safety
    /// The caller must own the range, and nothing may rely on its missing pages reading as
    /// zeros: from now on whoever holds this fd decides their contents, and a thread touching
    /// one waits until it is placed (or the fd is closed, when missing pages become zero-fill
    /// again). Keep the range mapped while it is registered, or unregister it first.
    pub unsafe fn register(&self, start: *mut u8, len: usize, mode: RegisterMode) -> io::Result<Ioctls> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start: start as u64, len: len as u64 },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: the kernel reads the range and writes the ioctls into `arg`; the caller
        // upholds the contract on the memory.
        cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, nr::UFFDIO_REGISTER(), &mut arg) })?;
        Ok(Ioctls(arg.ioctls))
    }

    /// `UFFDIO_UNREGISTER`: faults on `[start, start + len)` are handled by the kernel again
    /// (missing pages read as zeros). Changes no page that is there.
    pub fn unregister(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let arg = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: the kernel reads one `struct uffdio_range`; unregistering changes which code
        // resolves faults, not the contents of any page.
        cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, nr::UFFDIO_UNREGISTER(), &arg) }).map(drop)
    }

    /// `UFFDIO_COPY`: places a copy of `src` at `dst` (page aligned, `src.len()` a multiple of
    /// the page size: whole huge pages on hugetlb memory) in missing pages of a range
    /// registered on this fd, and wakes the threads waiting there unless `wake` is false.
    /// Returns the bytes placed; on failure, the bytes placed before it stopped and the error:
    /// `EEXIST` for a page that is already there, `ENOENT` outside registered memory (or
    /// memory that went away), `EAGAIN` when the mapping changed meanwhile (retry).
    ///
    /// ```
    /// use guestmem::sys::uffd::{Features, OpenVia, RegisterMode, Uffd};
    /// use guestmem::sys::{mmap, munmap, MapFlags, Protection};
    /// # if guestmem::sys::uffd::available_features(OpenVia::Any).is_err() { return; }
    /// let uffd = Uffd::open(OpenVia::Any, Features::empty()).unwrap();
    /// // SAFETY: a new anonymous mapping that only this example uses.
    /// let p = unsafe {
    ///     mmap(std::ptr::null_mut(), 4096, Protection::READ_WRITE, MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0)
    /// }
    /// .unwrap();
    /// // SAFETY: our own mapping; nothing relies on it reading zeros.
    /// unsafe { uffd.register(p, 4096, RegisterMode::MISSING) }.unwrap();
    /// assert_eq!(uffd.copy(p, &[7u8; 4096], true).unwrap(), 4096);
    /// assert_eq!(uffd.copy(p, &[8u8; 4096], true).unwrap_err().1.raw_os_error(), Some(libc::EEXIST));
    /// // SAFETY: the page is there now; read it and unmap.
    /// unsafe {
    ///     assert_eq!(p.add(100).read_volatile(), 7);
    ///     munmap(p, 4096).unwrap();
    /// }
    /// ```
    pub fn copy(&self, dst: *mut u8, src: &[u8], wake: bool) -> Result<usize, (usize, io::Error)> {
        let mut arg = UffdioCopy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wake { 0 } else { 1 },
            copy: 0,
        };
        // SAFETY: the kernel reads `src.len()` bytes of `src` (a live slice) and writes them only
        // into missing pages of ranges registered on this fd, which [`register`]'s contract
        // lets the fd's holder fill; it writes the count into `arg`, which lives for the call.
        let ret =
            cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, nr::UFFDIO_COPY(), &mut arg) });
        placed(ret, arg.copy, src.len())
    }

    /// `UFFDIO_ZEROPAGE`: places zero pages at `[dst, dst + len)` (missing pages of a range
    /// registered on this fd; not supported on hugetlb memory: `EINVAL`), waking waiters unless
    /// `wake` is false. Errors as for [`copy`](Self::copy).
    pub fn zeropage(&self, dst: *mut u8, len: usize, wake: bool) -> Result<usize, (usize, io::Error)> {
        let mut arg = UffdioRangeOp {
            range: UffdioRange { start: dst as u64, len: len as u64 },
            mode: if wake { 0 } else { 1 },
            done: 0,
        };
        // Fills only missing pages of registered ranges, with zeros (see `register`).
        let ret = self.range_ioctl(nr::UFFDIO_ZEROPAGE(), &mut arg);
        placed(ret, arg.done, len)
    }

    /// `UFFDIO_CONTINUE`: maps the pages the page cache already holds at `[dst, dst + len)` of a
    /// range registered with [`RegisterMode::MINOR`] (shmem, hugetlbfs), resolving minor faults.
    /// Errors as for [`copy`](Self::copy).
    pub fn continue_range(&self, dst: *mut u8, len: usize, wake: bool) -> Result<usize, (usize, io::Error)> {
        let mut arg = UffdioRangeOp {
            range: UffdioRange { start: dst as u64, len: len as u64 },
            mode: if wake { 0 } else { 1 },
            done: 0,
        };
        // Maps what the file already holds: no new contents.
        let ret = self.range_ioctl(nr::UFFDIO_CONTINUE(), &mut arg);
        placed(ret, arg.done, len)
    }

    /// `UFFDIO_POISON` (feature [`Features::POISON`]): marks the missing pages of `[dst, dst +
    /// len)` poisoned: an access raises `SIGBUS` (`BUS_MCEERR_AR`), a guest access a memory
    /// error exit.
    ///
    /// # Safety
    /// Nothing in this process may access the range without a `SIGBUS` handler that copes (if
    /// the range is memory of this process).
    pub unsafe fn poison(&self, dst: *mut u8, len: usize, wake: bool) -> Result<usize, (usize, io::Error)> {
        let mut arg = UffdioRangeOp {
            range: UffdioRange { start: dst as u64, len: len as u64 },
            mode: if wake { 0 } else { 1 },
            done: 0,
        };
        // The caller guarantees that nothing trips over the poisoned pages.
        let ret = self.range_ioctl(nr::UFFDIO_POISON(), &mut arg);
        placed(ret, arg.done, len)
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on faults in `[start, start + len)`, which
    /// retry their access (and fault again if the page is still missing).
    pub fn wake(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let arg = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: the kernel reads one `struct uffdio_range`; waking changes no memory.
        cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, nr::UFFDIO_WAKE(), &arg) }).map(drop)
    }

    /// Reads the queued messages into `out` (at most `out.capacity()` new ones; `out` is
    /// cleared first) without blocking: `Ok(0)` when none is queued.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> io::Result<usize> {
        const MAX: usize = 64;
        out.clear();
        let want = out.capacity().clamp(1, MAX);
        let mut buf = [0u8; MSG_LEN * MAX];
        // SAFETY: read(2) writes at most `want * MSG_LEN` bytes into our stack buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), want * MSG_LEN) };
        let n = match cvt_long(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        for m in buf[..n].chunks_exact(MSG_LEN) {
            let mut msg = [0u8; MSG_LEN];
            msg.copy_from_slice(m);
            out.push(UffdEvent::decode(&msg));
        }
        Ok(out.len())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}

/// `poll(2)` for readability on `fds`, for at most `timeout_ms` (-1: no limit); returns which
/// are readable (or hung up), in order. `EINTR` is returned as `Ok` with none readable.
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsFd;
/// let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
/// assert_eq!(guestmem::sys::uffd::poll_readable(&[b.as_fd()], 0).unwrap(), vec![false]);
/// a.write_all(b"x").unwrap();
/// assert_eq!(guestmem::sys::uffd::poll_readable(&[b.as_fd()], -1).unwrap(), vec![true]);
/// ```
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: poll writes only the `revents` of the `p.len()` entries of our vector.
    match cvt(unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) }) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(vec![false; p.len()]),
        Err(e) => return Err(e),
    }
    Ok(p.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{mmap, munmap, MapFlags, Protection};

    #[test]
    fn struct_layouts_and_numbers_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioRangeOp>(), 32);
        // As linux/userfaultfd.h computes them.
        assert_eq!(nr::UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(nr::UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(nr::UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(nr::UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(nr::UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(nr::UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(nr::UFFDIO_CONTINUE(), 0xc020_aa07);
        assert_eq!(nr::UFFDIO_POISON(), 0xc020_aa08);
        assert_eq!(nr::USERFAULTFD_IOC_NEW(), 0xaa00);
    }

    #[test]
    fn decodes_messages() {
        let mut m = [0u8; MSG_LEN];
        m[0] = 0x12;
        m[8..16].copy_from_slice(&1u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x7000u64.to_ne_bytes());
        m[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(UffdEvent::decode(&m), UffdEvent::PageFault { address: 0x7000, flags: 1, thread_id: 42 });
        m[0] = 0x15;
        assert_eq!(UffdEvent::decode(&m), UffdEvent::Remove { start: 1, end: 0x7000 });
        m[0] = 0x16;
        assert_eq!(UffdEvent::decode(&m), UffdEvent::Unmap { start: 1, end: 0x7000 });
        m[0] = 0x14;
        assert_eq!(UffdEvent::decode(&m), UffdEvent::Remap { from: 1, to: 0x7000, len: 42 });
        m[0] = 0x13;
        assert_eq!(UffdEvent::decode(&m), UffdEvent::Fork { fd: 1 });
        m[0] = 0x99;
        assert_eq!(UffdEvent::decode(&m), UffdEvent::Other { event: 0x99 });
    }

    fn anon(len: usize) -> *mut u8 {
        // SAFETY: a new private anonymous mapping.
        unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                Protection::READ_WRITE,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS,
                None,
                0,
            )
        }
        .unwrap()
    }

    #[test]
    fn every_ioctl_on_real_memory() {
        let Ok(offered) = available_features(OpenVia::Any) else { return };
        for via in [OpenVia::Device, OpenVia::Syscall] {
            let uffd = Uffd::open(via, Features::EVENT_REMOVE).unwrap();
            assert!(uffd.features().contains(Features::EVENT_REMOVE));
            let ps = crate::sys::page_size();
            let p = anon(4 * ps);
            // SAFETY: our own mapping, unused by anything else.
            let ioctls = unsafe { uffd.register(p, 4 * ps, RegisterMode::MISSING) }.unwrap();
            assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
            let mut ev = Vec::with_capacity(8);
            assert_eq!(uffd.read_events(&mut ev).unwrap(), 0);
            assert_eq!(poll_readable(&[uffd.as_fd()], 0).unwrap(), vec![false]);
            let page = vec![3u8; ps];
            assert_eq!(uffd.copy(p, &page, true).unwrap(), ps);
            // SAFETY: inside our mapping.
            let p1 = unsafe { p.add(ps) };
            assert_eq!(uffd.zeropage(p1, ps, true).unwrap(), ps);
            assert_eq!(uffd.zeropage(p1, ps, true).unwrap_err().1.raw_os_error(), Some(libc::EEXIST));
            // Misaligned, or outside registered memory.
            // SAFETY: arithmetic only; the kernel refuses the range.
            let odd = unsafe { p.add(1) };
            assert_eq!(uffd.copy(odd, &page, true).unwrap_err().1.raw_os_error(), Some(libc::EINVAL));
            let other = anon(ps);
            assert_eq!(uffd.copy(other, &page, true).unwrap_err().1.raw_os_error(), Some(libc::ENOENT));
            uffd.wake(p, 4 * ps).unwrap();
            // A minor-fault continue on anonymous memory is refused.
            assert!(uffd.continue_range(p, ps, true).is_err());
            if offered.contains(Features::POISON) {
                // SAFETY: nothing touches the poisoned page (page 3) before it is unmapped.
                let r = unsafe { uffd.poison(p.add(3 * ps), ps, true) };
                assert_eq!(r.unwrap(), ps);
            }
            // A discard is an event (read without blocking the madvise forever: it waits for
            // the read on another thread).
            let addr = p as usize;
            let t = std::thread::spawn(move || {
                // SAFETY: our mapping; nothing holds references into it.
                unsafe { crate::sys::madvise(addr as *mut u8, ps, crate::sys::Advice::DontNeed) }.unwrap()
            });
            while poll_readable(&[uffd.as_fd()], 1000).unwrap() != [true] {}
            uffd.read_events(&mut ev).unwrap();
            assert_eq!(ev, [UffdEvent::Remove { start: addr as u64, end: (addr + ps) as u64 }]);
            t.join().unwrap();
            uffd.unregister(p, 4 * ps).unwrap();
            // SAFETY: unregistered; page 2 is missing and now zero-fill; then unmapped.
            unsafe {
                assert_eq!(p.add(2 * ps).read_volatile(), 0);
                munmap(p, 4 * ps).unwrap();
                munmap(other, ps).unwrap();
            }
            let received = Uffd::from_received_fd(OwnedFd::from(uffd)).unwrap();
            assert!(received.features().contains(Features::EVENT_REMOVE));
        }
        // Not a userfaultfd.
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert_eq!(Uffd::from_received_fd(null).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
