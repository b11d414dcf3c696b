//! Scoped changes to process memory: [`ProtectGuard`] (`mprotect`) and [`LockGuard`]
//! (`mlock`).

use std::mem::ManuallyDrop;
use std::ops::Range;
use std::path::Path;

use super::maps::{areas_over, MapArea, MAPS_PATH};
use super::{is_page_aligned, page_ceil, page_floor, page_size, HostError};
use crate::sys::{self, Mlock2Flags, Protection};

/// Changes the protection of a page-aligned range and, when dropped, gives each part of the
/// range back the protection it had before.
///
/// The range may span several mappings with different protections (a read/write region next
/// to a read-only one, a guard page): the guard reads them from `/proc/self/maps` first and
/// restores each one. Restoring is done by [`restore`](ProtectGuard::restore), which reports
/// errors, or by dropping the guard, which cannot report them and ignores them. It fails only
/// if the range was unmapped or remapped behind the guard's back, which the safety contract of
/// [`new`](ProtectGuard::new) excludes.
///
/// ```
/// use guestmem::host::{self, ProtectGuard};
/// use guestmem::sys::{self, MapFlags, Protection};
///
/// let len = 2 * host::page_size();
/// // SAFETY: a new anonymous mapping, no MAP_FIXED.
/// let ram = unsafe {
///     sys::mmap(std::ptr::null_mut(), len, Protection::READ_WRITE, MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0)
/// }
/// .unwrap();
/// {
///     // SAFETY: we own the mapping and nothing writes to it while the guard lives.
///     let guard = unsafe { ProtectGuard::new(ram, len, Protection::READ) }.unwrap();
///     assert_eq!(guard.range(), ram as usize..ram as usize + len);
///     assert_eq!(host::query(ram).unwrap().protection, Protection::READ);
/// }
/// assert_eq!(host::query(ram).unwrap().protection, Protection::READ_WRITE);
/// // SAFETY: our mapping, unused from here on.
/// unsafe { sys::munmap(ram, len) }.unwrap();
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard restores the old protection at once"]
pub struct ProtectGuard {
    range: Range<usize>,
    protection: Protection,
    /// The parts of `range` and the protection each had before, neighbours with the same
    /// protection merged. Emptied once restored.
    saved: Vec<(Range<usize>, Protection)>,
}

impl ProtectGuard {
    /// Gives `[addr, addr + len)` the protection `prot` until the guard is dropped. `len` is
    /// rounded up to a whole number of pages, as `mprotect(2)` does.
    ///
    /// Errors, checked in this order: [`HostError::Unaligned`] if `addr` is not page aligned,
    /// [`HostError::ZeroLength`], [`HostError::Overflow`] if the rounded range does not fit in
    /// the address space, [`HostError::Unmapped`] naming the first unmapped address of the
    /// range (nothing is changed then), [`HostError::Os`] if `mprotect` fails (for example
    /// `EACCES` when asking for write access to a read-only shared file mapping). When
    /// `mprotect` fails after changing part of the range, that part is restored before the
    /// error is returned.
    ///
    /// # Safety
    ///
    /// Until the guard is dropped or [`restore`](ProtectGuard::restore)d:
    ///
    /// - every access any thread makes to the range must be allowed by `prot`, or be done by
    ///   code that expects and handles the fault (removing access makes other code crash:
    ///   Rust references, slices and guest-memory views into the range included);
    /// - the range must stay mapped by the same mappings: nobody may unmap, remap or
    ///   `mprotect` any part of it. The guard puts back the protections it saw when it was
    ///   created, so doing otherwise would hand that access to whatever is mapped there then.
    pub unsafe fn new(addr: *mut u8, len: usize, prot: Protection) -> Result<ProtectGuard, HostError> {
        let start = addr as usize;
        if !is_page_aligned(start) {
            return Err(HostError::Unaligned { addr: start, align: page_size() });
        }
        if len == 0 {
            return Err(HostError::ZeroLength { addr: start });
        }
        let overflow = HostError::Overflow { addr: start, len };
        let Some(len) = page_ceil(len) else { return Err(overflow) };
        let Some(end) = start.checked_add(len) else { return Err(overflow) };
        let areas = areas_over(Path::new(MAPS_PATH), start, len)?;
        let mut guard =
            ProtectGuard { range: start..end, protection: prot, saved: saved_parts(&areas, start..end) };
        // SAFETY: `[addr, addr + len)` is what the caller's contract covers (`len` only grew to
        // the end of the last page, which mprotect would change anyway); the caller
        // guarantees every user of the range tolerates `prot` while the guard lives.
        if let Err(source) = unsafe { sys::mprotect(addr, len, prot) } {
            // mprotect stops at the first area it cannot change, after changing the ones
            // before it: put those back.
            let _ = guard.restore_saved();
            return Err(HostError::Os { op: "mprotect", addr: start, len, source });
        }
        Ok(guard)
    }

    /// The page-aligned range whose protection the guard changed.
    ///
    /// ```
    /// # use guestmem::{host::{self, ProtectGuard}, sys::{self, MapFlags, Protection}};
    /// # let ps = host::page_size();
    /// # // SAFETY: a new anonymous mapping, no MAP_FIXED.
    /// # let ram = unsafe { sys::mmap(std::ptr::null_mut(), 2 * ps, Protection::READ_WRITE,
    /// #     MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0) }.unwrap();
    /// // SAFETY: we own the mapping; nothing reads or writes it while the guard lives.
    /// let guard = unsafe { ProtectGuard::new(ram, ps + 1, Protection::NONE) }.unwrap();
    /// assert_eq!(guard.range().len(), 2 * ps);
    /// # drop(guard);
    /// # // SAFETY: our mapping, unused from here on.
    /// # unsafe { sys::munmap(ram, 2 * ps) }.unwrap();
    /// ```
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The protection the guard gave the range.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Restores the protection the range had before and reports the first `mprotect` that
    /// failed ([`HostError::Os`]); the other parts are restored all the same. Dropping the
    /// guard does the same and ignores errors.
    ///
    /// ```
    /// # use guestmem::{host::{self, ProtectGuard}, sys::{self, MapFlags, Protection}};
    /// # let ps = host::page_size();
    /// # // SAFETY: a new anonymous mapping, no MAP_FIXED.
    /// # let ram = unsafe { sys::mmap(std::ptr::null_mut(), ps, Protection::READ_WRITE,
    /// #     MapFlags::PRIVATE | MapFlags::ANONYMOUS, None, 0) }.unwrap();
    /// // SAFETY: we own the mapping; nothing writes it while the guard lives.
    /// let guard = unsafe { ProtectGuard::new(ram, ps, Protection::READ) }.unwrap();
    /// guard.restore().unwrap();
    /// assert_eq!(host::query(ram).unwrap().protection, Protection::READ_WRITE);
    /// # // SAFETY: our mapping, unused from here on.
    /// # unsafe { sys::munmap(ram, ps) }.unwrap();
    /// ```
    pub fn restore(mut self) -> Result<(), HostError> {
        // Drop then finds nothing left to restore.
        self.restore_saved()
    }

    fn restore_saved(&mut self) -> Result<(), HostError> {
        let mut first_error = None;
        for (part, prot) in std::mem::take(&mut self.saved) {
            if prot == self.protection {
                continue;
            }
            // SAFETY: `part` lies in the range given to `new`, whose contract guarantees that
            // the same mappings are still there and that nobody else changed their protection:
            // this gives every user of the part back the access it had before the guard.
            let res = unsafe { sys::mprotect(part.start as *mut u8, part.len(), prot) };
            if let Err(source) = res {
                first_error.get_or_insert(HostError::Os {
                    op: "mprotect",
                    addr: part.start,
                    len: part.len(),
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for ProtectGuard {
    fn drop(&mut self) {
        // Drop cannot report an error; `restore` can.
        let _ = self.restore_saved();
    }
}

/// Each area clipped to `range`, with neighbours of the same protection merged (they are
/// separate areas for other reasons, such as a different file, which mprotect does not mind).
fn saved_parts(areas: &[MapArea], range: Range<usize>) -> Vec<(Range<usize>, Protection)> {
    let mut parts: Vec<(Range<usize>, Protection)> = Vec::with_capacity(areas.len());
    for area in areas {
        let part = area.range.start.max(range.start)..area.range.end.min(range.end);
        match parts.last_mut() {
            Some((last, prot)) if *prot == area.protection && last.end == part.start => last.end = part.end,
            _ => parts.push((part, area.protection)),
        }
    }
    parts
}

/// Locks a range in RAM (`mlock(2)`) and unlocks it (`munlock(2)`) when dropped.
///
/// [`new`](LockGuard::new) faults the whole range in and locks it;
/// [`on_fault`](LockGuard::on_fault) (`mlock2(MLOCK_ONFAULT)`) locks pages only as they are
/// touched, which is what a VMM wants for guest RAM it does not want to allocate up front.
/// Either way the kernel works on whole pages: the locked range is `addr` rounded down and
/// `addr + len` rounded up to pages ([`range`](LockGuard::range)).
///
/// Locks do not nest: the kernel keeps one "locked" bit per page, not a count. Dropping the
/// guard unlocks its range even if another guard, an earlier `mlock` or `mlockall` had locked
/// parts of it too. Give each range one owner.
///
/// Locking needs `CAP_IPC_LOCK` or room under `RLIMIT_MEMLOCK`; without them the constructors
/// fail with [`HostError::Os`]. See [`smaps`](super::smaps) for how to check the effect
/// (`lo` in `VmFlags`, `Locked`).
///
/// ```
/// use guestmem::host::{self, LockGuard};
///
/// let ram = vec![0u8; 2 * host::page_size()];
/// let lock = LockGuard::new(ram.as_ptr(), ram.len()).unwrap();
/// assert!(host::smaps(ram.as_ptr()).unwrap().has_flag("lo"));
/// lock.unlock().unwrap();
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard unlocks the range at once"]
pub struct LockGuard {
    range: Range<usize>,
}

impl LockGuard {
    /// Locks `[addr, addr + len)` in RAM with `mlock(2)`, faulting it in first.
    ///
    /// `addr` need not be aligned. Errors: [`HostError::ZeroLength`], [`HostError::Overflow`]
    /// if the range rounded out to pages does not fit in the address space,
    /// [`HostError::Unmapped`] naming the first address of the range that no mapping holds
    /// (nothing is locked then), [`HostError::Os`] if `mlock` fails: `EAGAIN` or `ENOMEM`
    /// for a lack of privilege or memory, `ENOMEM` when a page cannot be faulted in (a file
    /// mapping past the end of its file). Whatever `mlock` locked before failing is unlocked
    /// again.
    ///
    /// ```
    /// let ram = vec![0u8; 3 * 4096];
    /// let lock = guestmem::host::LockGuard::new(ram.as_ptr(), ram.len()).unwrap();
    /// assert!(guestmem::host::smaps(ram.as_ptr()).unwrap().locked_kb >= 12);
    /// ```
    pub fn new(addr: *const u8, len: usize) -> Result<LockGuard, HostError> {
        LockGuard::lock(addr as usize, len, false)
    }

    /// Like [`new`](LockGuard::new), but with `mlock2(MLOCK_ONFAULT)`: pages are locked as
    /// they are faulted in, nothing is allocated up front (`lo` and `lf` in `VmFlags`). The
    /// failing call is reported as `"mlock2"`.
    ///
    /// ```
    /// use guestmem::host::{self, LockGuard};
    ///
    /// let ram = vec![0u8; 4096];
    /// let lock = LockGuard::on_fault(ram.as_ptr(), ram.len()).unwrap();
    /// let info = host::smaps(ram.as_ptr()).unwrap();
    /// assert!(info.has_flag("lo") && info.has_flag("lf"));
    /// ```
    pub fn on_fault(addr: *const u8, len: usize) -> Result<LockGuard, HostError> {
        LockGuard::lock(addr as usize, len, true)
    }

    fn lock(addr: usize, len: usize, on_fault: bool) -> Result<LockGuard, HostError> {
        if len == 0 {
            return Err(HostError::ZeroLength { addr });
        }
        let Some(end) = addr.checked_add(len).and_then(page_ceil) else {
            return Err(HostError::Overflow { addr, len });
        };
        // Areas are whole pages, so the unrounded range is mapped exactly when the rounded one
        // is, and a hole is named by the first address of it that the caller asked for.
        areas_over(Path::new(MAPS_PATH), addr, len)?;
        let start = page_floor(addr);
        let guard = LockGuard { range: start..end };
        let (ptr, len) = (start as *const u8, end - start);
        let (op, res) = if on_fault {
            ("mlock2", sys::mlock2(ptr, len, Mlock2Flags::ONFAULT))
        } else {
            ("mlock", sys::mlock(ptr, len))
        };
        if let Err(source) = res {
            // mlock stops at the first page it cannot lock or fault in, after locking the
            // areas before it: dropping the guard unlocks them.
            drop(guard);
            return Err(HostError::Os { op, addr: start, len, source });
        }
        Ok(guard)
    }

    /// The page-aligned range the guard locked.
    ///
    /// ```
    /// use guestmem::host::{page_floor, LockGuard};
    ///
    /// let ram = vec![0u8; 100];
    /// let lock = LockGuard::new(ram.as_ptr(), ram.len()).unwrap();
    /// assert_eq!(lock.range().start, page_floor(ram.as_ptr() as usize));
    /// assert!(lock.range().end >= ram.as_ptr() as usize + ram.len());
    /// ```
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Unlocks the range now and reports a failing `munlock` ([`HostError::Os`], `ENOMEM` if
    /// part of the range was unmapped meanwhile). Dropping the guard does the same and ignores
    /// errors.
    ///
    /// ```
    /// let ram = vec![0u8; 4096];
    /// let lock = guestmem::host::LockGuard::new(ram.as_ptr(), ram.len()).unwrap();
    /// lock.unlock().unwrap();
    /// assert!(!guestmem::host::smaps(ram.as_ptr()).unwrap().has_flag("lo"));
    /// ```
    pub fn unlock(self) -> Result<(), HostError> {
        ManuallyDrop::new(self).munlock()
    }

    fn munlock(&self) -> Result<(), HostError> {
        let Range { start, end } = self.range;
        sys::munlock(start as *const u8, end - start).map_err(|source| HostError::Os {
            op: "munlock",
            addr: start,
            len: end - start,
            source,
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Drop cannot report an error; `unlock` can.
        let _ = self.munlock();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::host::test_util::Isolated;
    use crate::host::{query, smaps};
    use crate::sys::{MapFlags, MemfdFlags};

    fn prot_at(addr: *const u8) -> (Range<usize>, Protection) {
        let area = query(addr).unwrap();
        (area.range, area.protection)
    }

    #[test]
    fn protect_guard_rounds_and_restores() {
        let m = Isolated::new(4);
        let ps = page_size();
        let (p1, p3) = (m.page(1) as usize, m.page(3) as usize);
        // SAFETY: the test owns the mapping and does not touch it while the guard lives.
        let guard = unsafe { ProtectGuard::new(m.page(1), 2 * ps - 100, Protection::READ) }.unwrap();
        assert_eq!(guard.range(), p1..p3);
        assert_eq!(guard.protection(), Protection::READ);
        assert_eq!(prot_at(m.page(1)), (p1..p3, Protection::READ));
        assert_eq!(prot_at(m.ptr), (m.ptr as usize..p1, Protection::READ_WRITE));
        assert_eq!(prot_at(m.page(3)), (p3..m.hole_after(), Protection::READ_WRITE));
        drop(guard);
        assert_eq!(prot_at(m.page(2)), (m.range(), Protection::READ_WRITE));
    }

    #[test]
    fn protect_guard_restores_each_area() {
        let m = Isolated::new(4);
        let ps = page_size();
        let p2 = m.page(2) as usize;
        // SAFETY: the test owns the mapping and holds no reference into it.
        unsafe { sys::mprotect(m.page(2), 2 * ps, Protection::READ) }.unwrap();
        // SAFETY: as above; nothing touches the mapping while the guard lives.
        let guard = unsafe { ProtectGuard::new(m.ptr, m.len, Protection::NONE) }.unwrap();
        assert_eq!(prot_at(m.page(3)), (m.range(), Protection::NONE));
        drop(guard);
        assert_eq!(prot_at(m.ptr), (m.ptr as usize..p2, Protection::READ_WRITE));
        assert_eq!(prot_at(m.page(2)), (p2..m.hole_after(), Protection::READ));

        // Again over the middle of both areas, to a protection one of them already has.
        // SAFETY: as above.
        let guard = unsafe { ProtectGuard::new(m.page(1), 2 * ps, Protection::READ) }.unwrap();
        assert_eq!(prot_at(m.page(1)), (m.page(1) as usize..m.hole_after(), Protection::READ));
        guard.restore().unwrap();
        assert_eq!(prot_at(m.ptr), (m.ptr as usize..p2, Protection::READ_WRITE));
        assert_eq!(prot_at(m.page(2)), (p2..m.hole_after(), Protection::READ));
    }

    #[test]
    fn protect_guard_restore_reports_errors_and_goes_on() {
        let m = Isolated::new(4);
        let ps = page_size();
        // SAFETY: the test owns the mapping and holds no reference into it.
        unsafe { sys::mprotect(m.page(2), 2 * ps, Protection::READ) }.unwrap();
        // SAFETY: as above.
        let guard = unsafe { ProtectGuard::new(m.ptr, m.len, Protection::NONE) }.unwrap();
        // Breaks the contract on purpose, on a range nothing else can map into.
        // SAFETY: the test's own mapping; nothing uses it.
        unsafe { sys::munmap(m.ptr, ps) }.unwrap();
        match guard.restore() {
            Err(HostError::Os { op, addr, len, source }) => {
                assert_eq!((op, addr, len), ("mprotect", m.ptr as usize, 2 * ps));
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(prot_at(m.page(2)), (m.page(2) as usize..m.hole_after(), Protection::READ));
        // mprotect changed nothing: the part it failed on has the mapped page still at NONE.
        assert_eq!(prot_at(m.page(1)).1, Protection::NONE);
    }

    #[test]
    fn saved_parts_clip_and_merge() {
        let area = |range: Range<usize>, protection| MapArea {
            range,
            protection,
            shared: false,
            offset: 0,
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: None,
        };
        let rw = Protection::READ_WRITE;
        let areas = [area(0..0x3000, rw), area(0x3000..0x5000, rw), area(0x5000..0x9000, Protection::READ)];
        assert_eq!(
            saved_parts(&areas, 0x1000..0x6000),
            [(0x1000..0x5000, rw), (0x5000..0x6000, Protection::READ)]
        );
    }

    #[test]
    fn protect_guard_errors() {
        let m = Isolated::new(2);
        let ps = page_size();
        let protect = |addr: *mut u8, len: usize| {
            // SAFETY: every call below fails before changing anything; were one to succeed, it
            // would change only the test's own mapping, which nothing else uses.
            unsafe { ProtectGuard::new(addr, len, Protection::READ) }
        };
        match protect(m.ptr.wrapping_add(1), ps) {
            Err(HostError::Unaligned { addr, align }) => assert_eq!((addr, align), (m.ptr as usize + 1, ps)),
            other => panic!("{other:?}"),
        }
        match protect(m.ptr, 0) {
            Err(HostError::ZeroLength { addr }) => assert_eq!(addr, m.ptr as usize),
            other => panic!("{other:?}"),
        }
        let top = page_floor(usize::MAX) as *mut u8;
        match protect(top, ps + 1) {
            Err(HostError::Overflow { addr, len }) => assert_eq!((addr, len), (top as usize, ps + 1)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(protect(m.ptr, usize::MAX), Err(HostError::Overflow { .. })));
        match protect(m.page(1), 2 * ps) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_after()),
            other => panic!("{other:?}"),
        }
        // Nothing changed on the way.
        assert_eq!(prot_at(m.ptr), (m.range(), Protection::READ_WRITE));
    }

    #[test]
    fn protect_guard_undoes_a_partial_mprotect() {
        let m = Isolated::new(4);
        let ps = page_size();
        let fd = sys::memfd_create(c"guestmem-protect", MemfdFlags::CLOEXEC).unwrap();
        sys::fd::ftruncate(fd.as_fd(), ps as u64).unwrap();
        // A read-only descriptor: a shared mapping of it can never become writable.
        let read_only =
            std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))).unwrap();
        // SAFETY: MAP_FIXED replaces page 2 of the test's own mapping, which nothing uses.
        unsafe {
            sys::mmap(
                m.page(2),
                ps,
                Protection::READ,
                MapFlags::SHARED | MapFlags::FIXED,
                Some(read_only.as_fd()),
                0,
            )
        }
        .unwrap();
        let rwx = Protection::READ_WRITE | Protection::EXEC;
        // SAFETY: the test's own mapping; nothing touches it.
        match unsafe { ProtectGuard::new(m.ptr, 3 * ps, rwx) } {
            Err(HostError::Os { op, addr, len, source }) => {
                assert_eq!((op, addr, len), ("mprotect", m.ptr as usize, 3 * ps));
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied, "{source}");
            }
            other => panic!("{other:?}"),
        }
        // The anonymous pages mprotect changed before failing are read/write again.
        assert_eq!(prot_at(m.ptr), (m.ptr as usize..m.page(2) as usize, Protection::READ_WRITE));
        let file = query(m.page(2)).unwrap();
        assert!(file.shared && file.protection == Protection::READ && file.is_deleted(), "{file:?}");
    }

    #[test]
    fn lock_guard_locks_and_unlocks() {
        let m = Isolated::new(4);
        let ps = page_size();
        let p3 = m.page(3) as usize;
        let lock = LockGuard::new(m.ptr.wrapping_add(10), 2 * ps).unwrap();
        assert_eq!(lock.range(), m.ptr as usize..p3);
        let info = smaps(m.ptr).unwrap();
        assert_eq!(info.area.range, m.ptr as usize..p3);
        assert!(info.has_flag("lo") && !info.has_flag("lf"), "{:?}", info.vm_flags);
        assert_eq!(info.locked_kb * 1024, 3 * ps as u64, "mlock faults every page in");
        assert!(!smaps(m.page(3)).unwrap().has_flag("lo"));
        drop(lock);
        let info = smaps(m.ptr).unwrap();
        assert_eq!(info.area.range, m.range());
        assert!(!info.has_flag("lo") && info.locked_kb == 0, "{info:?}");
    }

    #[test]
    fn lock_guard_on_fault() {
        let m = Isolated::new(4);
        let lock = LockGuard::on_fault(m.ptr, m.len).unwrap();
        let info = smaps(m.ptr).unwrap();
        assert!(info.has_flag("lo") && info.has_flag("lf"), "{:?}", info.vm_flags);
        assert_eq!((info.rss_kb, info.locked_kb), (0, 0));
        // SAFETY: the test owns the mapping; nothing else uses it.
        unsafe { m.page(1).write_volatile(1) };
        assert_eq!(smaps(m.ptr).unwrap().locked_kb * 1024, page_size() as u64);
        lock.unlock().unwrap();
        let info = smaps(m.ptr).unwrap();
        assert!(!info.has_flag("lo") && !info.has_flag("lf") && info.locked_kb == 0, "{info:?}");
    }

    #[test]
    fn lock_guard_errors() {
        let m = Isolated::new(2);
        let ps = page_size();
        assert!(
            matches!(LockGuard::new(m.ptr, 0), Err(HostError::ZeroLength { addr }) if addr == m.ptr as usize)
        );
        match LockGuard::on_fault((usize::MAX - 1) as *const u8, 1) {
            Err(HostError::Overflow { addr, len }) => assert_eq!((addr, len), (usize::MAX - 1, 1)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(LockGuard::new(m.ptr, usize::MAX), Err(HostError::Overflow { .. })));
        match LockGuard::new(m.page(1).wrapping_add(5), ps) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_after()),
            other => panic!("{other:?}"),
        }
        match LockGuard::on_fault(m.hole_before() as *const u8, 2 * ps) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_before()),
            other => panic!("{other:?}"),
        }
        assert!(!smaps(m.ptr).unwrap().has_flag("lo"), "nothing was locked");
    }

    #[test]
    fn lock_guard_reports_a_failing_mlock() {
        let m = Isolated::new(2);
        let ps = page_size();
        // An empty memfd mapped over page 1: faulting it in is a SIGBUS, which mlock reports.
        let fd = sys::memfd_create(c"guestmem-lock", MemfdFlags::CLOEXEC).unwrap();
        // SAFETY: MAP_FIXED replaces page 1 of the test's own mapping, which nothing uses.
        unsafe {
            sys::mmap(
                m.page(1),
                ps,
                Protection::READ_WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                Some(fd.as_fd()),
                0,
            )
        }
        .unwrap();
        match LockGuard::new(m.ptr, 2 * ps) {
            Err(HostError::Os { op, addr, len, source }) => {
                assert_eq!((op, addr, len), ("mlock", m.ptr as usize, 2 * ps));
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM), "{source}");
            }
            other => panic!("{other:?}"),
        }
        // The anonymous page mlock locked before failing is unlocked again.
        assert!(!smaps(m.ptr).unwrap().has_flag("lo"));
        assert!(!smaps(m.page(1)).unwrap().has_flag("lo"));
        // munlock of a range that is no longer mapped.
        let lock = LockGuard::new(m.ptr, ps).unwrap();
        // SAFETY: the test's own mapping; the guard only holds its address.
        unsafe { sys::munmap(m.ptr, ps) }.unwrap();
        match lock.unlock() {
            Err(HostError::Os { op: "munlock", addr, source, .. }) => {
                assert_eq!(addr, m.ptr as usize);
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            other => panic!("{other:?}"),
        }
    }
}
