//! Typed wrappers for every system call guestmem makes.
//!
//! This is the only module of the crate that calls `libc` or issues ioctls. Each wrapper names
//! the C call and its man page, converts `-1`/`errno` into [`std::io::Error`], takes typed
//! arguments ([`Protection`], [`MapFlags`], [`Advice`], [`Seals`], ...) instead of raw
//! integers, and states its safety contract. The layers above (`host`, `volatile`, `mmap`, ...)
//! call these functions and never `libc` directly.
//!
//! Most users want the higher layers; the wrappers are public because a VMM that manages some
//! of its own mappings (vCPU run areas, device BARs) needs the same calls with the same care.
//!
//! [`socket`] passes file descriptors over Unix sockets (`SCM_RIGHTS`).
//!
//! Calls that can change the contents or the layout of memory the caller may be using
//! (`mmap`, `munmap`, `mprotect`, `madvise`, raw `read`/`write` into a pointer) are `unsafe`;
//! calls whose only effect is on placement, residency or locking (`mlock`, `mincore`, `mbind`,
//! ...) are safe: the kernel validates the range and reports an error for a bad one.

pub mod cpu;
pub mod fd;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod mman;
pub mod numa;
pub mod signal;
pub mod socket;
pub mod uffd;

pub use fd::{fallocate, fstat, fstatfs, memfd_create, FallocateMode, FileStat, FsStat, MemfdFlags, Seals};
pub use mman::{
    madvise, mincore, mlock, mlock2, mmap, mprotect, msync, munlock, munmap, page_size, Advice, MapFlags,
    Mlock2Flags, MsyncFlags, Protection,
};
pub use numa::{get_mempolicy, mbind, MbindFlags, MemPolicy};

use std::io;

/// Turns a C return value of `-1` into the thread's `errno` as an [`io::Error`].
#[inline]
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for calls that return `ssize_t`/`off_t`/`long`.
#[inline]
pub(crate) fn cvt_long<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Calls `f` again for as long as it fails with `EINTR`.
#[inline]
pub(crate) fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_eintr_retries_only_interrupted() {
        let mut calls = 0;
        let r: io::Result<u32> = retry_eintr(|| {
            calls += 1;
            if calls < 3 {
                Err(io::Error::from_raw_os_error(libc::EINTR))
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls, 3);

        let mut calls = 0;
        let r: io::Result<u32> = retry_eintr(|| {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(calls, 1);
    }

    #[test]
    fn cvt_maps_minus_one_to_errno() {
        assert_eq!(cvt(3).unwrap(), 3);
        assert_eq!(cvt_long(5isize).unwrap(), 5);
        // SAFETY: close(-1) touches no memory and fails with EBADF.
        let ret = unsafe { libc::close(-1) };
        assert_eq!(cvt(ret).unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}
