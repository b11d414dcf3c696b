//! The `host` module end to end, through the public API only: page geometry, maps and smaps
//! queries, and the protection and lock guards on real mappings.

use std::ops::Range;

use guestmem::host::{self, HostError, LockGuard, ProtectGuard};
use guestmem::sys::{self, Advice, MapFlags, Protection};

/// Read/write anonymous pages with an unmapped page on each side that no other test thread
/// maps into: placed with `MAP_FIXED_NOREPLACE` at 32 TiB and up, far below where the kernel
/// puts mappings that do not ask for a place.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(pages: usize) -> Mapping {
        static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let ps = host::page_size();
        let len = pages * ps;
        loop {
            let slot = NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(slot < 4096, "no free slot for an isolated test mapping");
            let hint = (0x2000_0000_0000 + slot * (1 << 30) + ps) as *mut u8;
            let flags = MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED_NOREPLACE;
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
            match unsafe { sys::mmap(hint, len, Protection::READ_WRITE, flags, None, 0) } {
                Ok(ptr) if ptr == hint => return Mapping { ptr, len },
                // SAFETY: a mapping just made (where the flag is only a hint), used by nobody.
                Ok(ptr) => unsafe { sys::munmap(ptr, len) }.unwrap(),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mmap: {e}"),
            }
        }
    }

    fn page(&self, n: usize) -> *mut u8 {
        self.ptr.wrapping_add(n * host::page_size())
    }

    fn range(&self) -> Range<usize> {
        self.ptr as usize..self.ptr as usize + self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping belongs to this value; no pointer into it outlives it.
        unsafe { sys::munmap(self.ptr, self.len) }.unwrap();
    }
}

fn protection_at(addr: *const u8) -> (Range<usize>, Protection) {
    let area = host::query(addr).unwrap();
    (area.range, area.protection)
}

#[test]
fn page_geometry() {
    let ps = host::page_size();
    assert_eq!(ps, sys::page_size());
    assert_eq!(host::page_floor(3 * ps + 1), 3 * ps);
    assert_eq!(host::page_ceil(3 * ps + 1), Some(4 * ps));
    assert_eq!(host::page_ceil(usize::MAX), None);
    assert!(host::is_page_aligned(host::page_floor(12345)));
    let sizes = host::huge_page_sizes().unwrap();
    assert!(sizes.windows(2).all(|w| w[0] < w[1]));
    assert!(sizes.iter().all(|&s| s > ps && s % ps == 0), "{sizes:?}");
    if sizes.is_empty() {
        println!("skipped huge page size checks: this kernel lists no hugetlb sizes");
    } else {
        let listed = std::fs::read_dir("/sys/kernel/mm/hugepages").unwrap().count();
        assert_eq!(sizes.len(), listed);
    }
}

#[test]
fn maps_of_this_process() {
    let m = Mapping::new(3);
    let area = host::query(m.page(1)).unwrap();
    assert_eq!(area.range, m.range());
    assert_eq!(
        (area.protection, area.shared, area.offset, area.inode, area.path),
        (Protection::READ_WRITE, false, 0, 0, None)
    );

    // The test binary itself is a file mapping.
    let code = host::query(page_geometry as *const u8).unwrap();
    assert!(code.protection.contains(Protection::EXEC) && code.inode != 0, "{code:?}");
    let exe = std::env::current_exe().unwrap();
    assert_eq!(code.path.as_deref(), Some(exe.as_path()));

    // Across a hole and past the end.
    let before = (m.ptr as usize - host::page_size()) as *const u8;
    assert!(matches!(host::query(before), Err(HostError::Unmapped { addr }) if addr == before as usize));
    match host::query_range(m.page(2), 2 * host::page_size()) {
        Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.range().end),
        other => panic!("{other:?}"),
    }
    assert!(matches!(host::query_range(m.ptr, 0), Err(HostError::ZeroLength { .. })));
    assert!(matches!(host::query_range(m.ptr, usize::MAX), Err(HostError::Overflow { .. })));

    // The parsers agree with the kernel's own text.
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    let parsed = host::parse_maps(&text).unwrap();
    assert!(parsed.iter().any(|a| a.range == m.range()));
}

#[test]
fn smaps_shows_locks_and_advice() {
    let m = Mapping::new(4);
    let ps = host::page_size() as u64;
    let info = host::smaps(m.ptr).unwrap();
    assert_eq!((info.size_kb * 1024, info.rss_kb, info.locked_kb), (4 * ps, 0, 0));
    assert!(!info.has_flag("lo") && !info.has_flag("dd"));

    // SAFETY: the test owns the mapping; DONTDUMP does not change its contents.
    unsafe { sys::madvise(m.ptr, m.len, Advice::DontDump) }.unwrap();
    let lock = LockGuard::new(m.ptr, m.len).unwrap();
    assert_eq!(lock.range(), m.range());
    let info = host::smaps(m.page(3)).unwrap();
    assert!(info.has_flag("lo") && info.has_flag("dd"), "{:?}", info.vm_flags);
    assert_eq!((info.locked_kb * 1024, info.rss_kb * 1024), (4 * ps, 4 * ps));
    drop(lock);
    let info = host::smaps(m.page(3)).unwrap();
    assert!(!info.has_flag("lo") && info.has_flag("dd"));
    assert_eq!(info.locked_kb, 0);

    let lock = LockGuard::on_fault(m.page(1), 1).unwrap();
    assert_eq!(lock.range(), m.page(1) as usize..m.page(2) as usize);
    let info = host::smaps(m.page(1)).unwrap();
    assert!(info.has_flag("lf") && info.locked_kb * 1024 == ps, "{info:?}");
    lock.unlock().unwrap();
    assert!(!host::smaps(m.page(1)).unwrap().has_flag("lf"));
}

#[test]
fn protect_guard_across_areas() {
    let m = Mapping::new(6);
    let ps = host::page_size();
    let (p2, p4) = (m.page(2) as usize, m.page(4) as usize);
    // Three areas: read/write, read-only, no access.
    // SAFETY: the test owns the mapping and holds no reference into it.
    unsafe {
        sys::mprotect(m.page(2), 2 * ps, Protection::READ).unwrap();
        sys::mprotect(m.page(4), 2 * ps, Protection::NONE).unwrap();
    }
    {
        // SAFETY: as above; the test writes only through `volatile` pointers below, to pages
        // the guard made writable.
        let guard = unsafe { ProtectGuard::new(m.page(1), 4 * ps, Protection::READ_WRITE) }.unwrap();
        assert_eq!(guard.range(), m.page(1) as usize..m.page(5) as usize);
        assert_eq!(protection_at(m.ptr), (m.ptr as usize..m.page(5) as usize, Protection::READ_WRITE));
        // SAFETY: page 4 is read/write while the guard lives.
        unsafe { m.page(4).write_volatile(9) };
        assert_eq!(protection_at(m.page(5)).1, Protection::NONE);
    }
    assert_eq!(protection_at(m.ptr), (m.ptr as usize..p2, Protection::READ_WRITE));
    assert_eq!(protection_at(m.page(3)), (p2..p4, Protection::READ));
    // The page written while the guard lived has its own anon_vma now, and the kernel may
    // not merge it back with the untouched page after it: check each page.
    assert_eq!(protection_at(m.page(4)).0.start, p4);
    assert_eq!(protection_at(m.page(4)).1, Protection::NONE);
    assert_eq!(protection_at(m.page(5)).1, Protection::NONE);
    assert_eq!(protection_at(m.page(5)).0.end, m.range().end);

    // SAFETY: fails before touching anything.
    let err = unsafe { ProtectGuard::new(m.page(1).wrapping_add(8), ps, Protection::READ) }.unwrap_err();
    assert!(matches!(err, HostError::Unaligned { align, .. } if align == ps), "{err}");
    assert!(err.to_string().contains("not aligned"));
}

/// Whether `GUESTMEM_REQUIRE` (a comma-separated list) asks that tests needing `resource` fail
/// rather than skip when the machine lacks it.
fn required(resource: &str) -> bool {
    std::env::var("GUESTMEM_REQUIRE").is_ok_and(|list| list.split(',').any(|r| r.trim() == resource))
}

#[test]
fn smaps_of_hugetlb_memory() {
    const HUGE: usize = 2 << 20;
    if !host::huge_page_sizes().unwrap().contains(&HUGE) {
        assert!(!required("hugetlb"), "this kernel has no 2 MiB hugetlb pages");
        println!("skipped: this kernel has no 2 MiB hugetlb pages");
        return;
    }
    let flags = MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::HUGETLB | MapFlags::HUGE_2MB;
    // SAFETY: a new mapping, no MAP_FIXED.
    let ptr = match unsafe { sys::mmap(std::ptr::null_mut(), HUGE, Protection::READ_WRITE, flags, None, 0) } {
        Ok(ptr) => ptr,
        Err(e) => {
            assert!(!required("hugetlb"), "no 2 MiB hugetlb page to map: {e}");
            println!("skipped: no 2 MiB hugetlb page to map ({e}); reserve some with vm.nr_hugepages");
            return;
        }
    };
    // SAFETY: our mapping; the write faults in one huge page.
    unsafe { ptr.write_volatile(1) };
    let info = host::smaps(ptr).unwrap();
    assert_eq!(info.area.range, ptr as usize..ptr as usize + HUGE);
    assert!(info.has_flag("ht"), "{:?}", info.vm_flags);
    assert_eq!((info.kernel_page_size_kb, info.mmu_page_size_kb), (2048, 2048));
    assert_eq!((info.private_hugetlb_kb, info.shared_hugetlb_kb), (2048, 0));
    // hugetlb pages are not counted in Rss.
    assert_eq!(info.rss_kb, 0);
    // SAFETY: our mapping, unused from here on.
    unsafe { sys::munmap(ptr, HUGE) }.unwrap();
}

#[test]
fn smaps_of_transparent_huge_pages() {
    const HUGE: usize = 2 << 20;
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        println!("skipped: transparent huge pages are off ({})", thp.trim());
        return;
    }
    // Twice the size, to find a 2 MiB-aligned 2 MiB inside.
    let flags = MapFlags::PRIVATE | MapFlags::ANONYMOUS;
    // SAFETY: a new mapping, no MAP_FIXED.
    let ptr =
        unsafe { sys::mmap(std::ptr::null_mut(), 2 * HUGE, Protection::READ_WRITE, flags, None, 0) }.unwrap();
    let aligned = ptr.wrapping_add(ptr.align_offset(HUGE));
    // SAFETY: our mapping; the advice does not change its contents.
    unsafe { sys::madvise(aligned, HUGE, Advice::HugePage) }.unwrap();
    // SAFETY: our mapping; the write faults in the first page (a huge one if the kernel can).
    unsafe { aligned.write_volatile(1) };
    let info = host::smaps(aligned).unwrap();
    assert!(info.has_flag("hg"), "{:?}", info.vm_flags);
    match info.anon_huge_pages_kb {
        2048 => assert_eq!(info.rss_kb, 2048),
        0 => println!("the fault fell back to small pages (no free 2 MiB block): AnonHugePages not checked"),
        other => panic!("AnonHugePages {other} kB for one fault"),
    }
    // SAFETY: our mapping, unused from here on.
    unsafe { sys::munmap(ptr, 2 * HUGE) }.unwrap();
}
