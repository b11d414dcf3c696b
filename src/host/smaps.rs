//! `/proc/self/smaps`: residency, locking, huge pages and `VmFlags` of one area.

use std::ops::ControlFlow;
use std::path::Path;

use super::maps::{decimal, for_each_line, parse_error, parse_record_header, MapArea};
use super::HostError;

pub(super) const SMAPS_PATH: &str = "/proc/self/smaps";

/// What `/proc/self/smaps` reports about one area: its [`MapArea`], the sizes guestmem checks
/// (in KiB, as the kernel gives them) and its `VmFlags`.
///
/// The sizes are exact copies of the kernel's fields; a record that lacks one of them is an
/// error ([`HostError::MissingField`]), never a silent 0.
///
/// `vm_flags` holds the two-letter mnemonics of the `VmFlags` line in the kernel's order.
/// Those guestmem cares about:
///
/// | flag | meaning | set by |
/// |------|---------|--------|
/// | `rd` `wr` `ex` | readable, writable, executable | `mmap`/`mprotect` |
/// | `sh` | shared | `MAP_SHARED` |
/// | `lo` | locked | `mlock`, [`LockGuard`](crate::host::LockGuard) |
/// | `lf` | locked on fault | `mlock2(MLOCK_ONFAULT)` |
/// | `dc` | not copied on fork | `MADV_DONTFORK` |
/// | `dd` | not in core dumps | `MADV_DONTDUMP` |
/// | `hg` / `nh` | THP allowed / forbidden | `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE` |
/// | `mg` | mergeable by KSM | `MADV_MERGEABLE` |
/// | `nr` | no swap reserved | `MAP_NORESERVE` |
/// | `ht` | hugetlb | `MAP_HUGETLB`, hugetlbfs |
/// | `ac` | accounted (counts against overcommit) | private writable mappings |
///
/// ```
/// use guestmem::host::parse_smaps;
///
/// let text = "\
/// 7f0000000000-7f0000400000 rw-p 00000000 00:00 0
/// Size:               4096 kB
/// KernelPageSize:        4 kB
/// MMUPageSize:           4 kB
/// Rss:                2048 kB
/// Shared_Dirty:          0 kB
/// Private_Dirty:      2048 kB
/// AnonHugePages:      2048 kB
/// Shared_Hugetlb:        0 kB
/// Private_Hugetlb:       0 kB
/// Swap:                  0 kB
/// Locked:                0 kB
/// THPeligible:           1
/// VmFlags: rd wr mr mw me ac hg
/// ";
/// let area = &parse_smaps(text).unwrap()[0];
/// assert_eq!((area.rss_kb, area.anon_huge_pages_kb), (2048, 2048));
/// assert!(area.has_flag("hg") && !area.has_flag("h"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SmapsArea {
    /// The area, as its `/proc/self/maps` line describes it.
    pub area: MapArea,
    /// `Size`: the length of the area.
    pub size_kb: u64,
    /// `Rss`: how much of it is resident.
    pub rss_kb: u64,
    /// `AnonHugePages`: how much is backed by anonymous transparent huge pages.
    pub anon_huge_pages_kb: u64,
    /// `Locked`: how much is locked in RAM (the resident part of an `mlock`ed area).
    pub locked_kb: u64,
    /// `Private_Hugetlb`: hugetlb pages mapped by this process only.
    pub private_hugetlb_kb: u64,
    /// `Shared_Hugetlb`: hugetlb pages also mapped elsewhere.
    pub shared_hugetlb_kb: u64,
    /// `Swap`: how much is swapped out.
    pub swap_kb: u64,
    /// `Shared_Dirty`: resident pages written since they were last cleaned that others map
    /// too (for a shared file mapping: not yet written back, `msync` cleans them).
    pub shared_dirty_kb: u64,
    /// `Private_Dirty`: resident pages written since they were last cleaned that only this
    /// process maps.
    pub private_dirty_kb: u64,
    /// `KernelPageSize`: the page size the kernel backs the area with (hugetlb: the huge size).
    pub kernel_page_size_kb: u64,
    /// `MMUPageSize`: the page size the MMU uses for it.
    pub mmu_page_size_kb: u64,
    /// The `VmFlags` mnemonics, in the kernel's order (see the type's documentation).
    pub vm_flags: Vec<String>,
}

impl SmapsArea {
    /// Whether `VmFlags` lists `flag` (an exact, two-letter mnemonic such as `"lo"`).
    ///
    /// ```
    /// let v = vec![0u8; 4096];
    /// let info = guestmem::host::smaps(v.as_ptr()).unwrap();
    /// assert!(info.has_flag("rd") && info.has_flag("wr") && !info.has_flag("ex"));
    /// ```
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }
}

/// The `/proc/self/smaps` record of the area that contains `addr`.
///
/// Reading stops after that record, but the kernel walks the page tables of every area listed
/// before it, so the call costs in proportion to the resident memory below `addr`: it is a
/// check for tests and diagnostics, not for a hot path.
///
/// Fails with [`HostError::Unmapped`] if no mapping contains `addr`, [`HostError::Parse`] or
/// [`HostError::MissingField`] if the record is not what the kernel should write,
/// [`HostError::Read`] if the file cannot be read.
///
/// ```
/// let mut v = vec![0u8; 4096];
/// v[0] = 1;
/// let info = guestmem::host::smaps(v.as_ptr()).unwrap();
/// assert!(info.area.range.contains(&(v.as_ptr() as usize)));
/// assert!(info.rss_kb > 0 && info.kernel_page_size_kb > 0);
/// ```
pub fn smaps(addr: *const u8) -> Result<SmapsArea, HostError> {
    smaps_at(Path::new(SMAPS_PATH), addr as usize)
}

/// Parses a whole `/proc/<pid>/smaps` text, one [`SmapsArea`] a record.
///
/// A record is a maps line ([`parse_maps_line`](super::parse_maps_line)) followed by
/// `Key: value` lines. Fields guestmem does not report are skipped, whatever their form;
/// those it reports must read `<decimal> kB` ([`HostError::Parse`] otherwise, also for one
/// given twice) and must all be present ([`HostError::MissingField`]). A field line before
/// the first record is a [`HostError::Parse`].
///
/// ```
/// use guestmem::host::{parse_smaps, HostError};
///
/// let text = "1000-2000 rw-p 00000000 00:00 0\nRss: 4 kB\n";
/// assert!(matches!(parse_smaps(text), Err(HostError::MissingField { field: "Size", addr: 0x1000 })));
/// ```
pub fn parse_smaps(text: &str) -> Result<Vec<SmapsArea>, HostError> {
    let mut areas = Vec::new();
    let mut record: Option<Record> = None;
    for line in text.split_terminator('\n').map(str::as_bytes) {
        if is_field_line(line) {
            record.as_mut().ok_or_else(|| parse_error(line))?.field(line)?;
        } else {
            if let Some(done) = record.take() {
                areas.push(done.finish()?);
            }
            record = Some(Record::new(parse_record_header(line)?));
        }
    }
    if let Some(done) = record {
        areas.push(done.finish()?);
    }
    Ok(areas)
}

pub(crate) fn smaps_at(path: &Path, addr: usize) -> Result<SmapsArea, HostError> {
    let mut record: Option<Record> = None;
    for_each_line(path, |line| {
        if is_field_line(line) {
            // Fields of the areas before `addr` are skipped unparsed.
            if let Some(r) = record.as_mut() {
                r.field(line)?;
            }
            return Ok(ControlFlow::Continue(()));
        }
        if record.is_some() {
            // The next record begins: the one of `addr` is complete.
            return Ok(ControlFlow::Break(()));
        }
        let area = parse_record_header(line)?;
        if area.range.end <= addr {
            return Ok(ControlFlow::Continue(()));
        }
        // Areas come in address order: this is the first one ending after `addr`.
        if area.range.start > addr {
            return Ok(ControlFlow::Break(()));
        }
        record = Some(Record::new(area));
        Ok(ControlFlow::Continue(()))
    })?;
    record.ok_or(HostError::Unmapped { addr })?.finish()
}

/// Whether a line of smaps is a `Key: value` field rather than the maps line opening a
/// record: the first word of a field ends in `:`, that of a maps line is `start-end`.
fn is_field_line(line: &[u8]) -> bool {
    line.split(|&b| b == b' ').next().is_some_and(|word| word.len() > 1 && word.ends_with(b":"))
}

/// One smaps record being read.
struct Record {
    area: MapArea,
    size_kb: Option<u64>,
    rss_kb: Option<u64>,
    anon_huge_pages_kb: Option<u64>,
    locked_kb: Option<u64>,
    private_hugetlb_kb: Option<u64>,
    shared_hugetlb_kb: Option<u64>,
    swap_kb: Option<u64>,
    shared_dirty_kb: Option<u64>,
    private_dirty_kb: Option<u64>,
    kernel_page_size_kb: Option<u64>,
    mmu_page_size_kb: Option<u64>,
    vm_flags: Option<Vec<String>>,
}

impl Record {
    fn new(area: MapArea) -> Record {
        Record {
            area,
            size_kb: None,
            rss_kb: None,
            anon_huge_pages_kb: None,
            locked_kb: None,
            private_hugetlb_kb: None,
            shared_hugetlb_kb: None,
            swap_kb: None,
            shared_dirty_kb: None,
            private_dirty_kb: None,
            kernel_page_size_kb: None,
            mmu_page_size_kb: None,
            vm_flags: None,
        }
    }

    /// Takes in one `Key: value` line.
    fn field(&mut self, line: &[u8]) -> Result<(), HostError> {
        let Some(colon) = line.iter().position(|&b| b == b':') else { return Err(parse_error(line)) };
        let (key, value) = (&line[..colon], &line[colon + 1..]);
        let slot = match key {
            b"Size" => &mut self.size_kb,
            b"Rss" => &mut self.rss_kb,
            b"AnonHugePages" => &mut self.anon_huge_pages_kb,
            b"Locked" => &mut self.locked_kb,
            b"Private_Hugetlb" => &mut self.private_hugetlb_kb,
            b"Shared_Hugetlb" => &mut self.shared_hugetlb_kb,
            b"Swap" => &mut self.swap_kb,
            b"Shared_Dirty" => &mut self.shared_dirty_kb,
            b"Private_Dirty" => &mut self.private_dirty_kb,
            b"KernelPageSize" => &mut self.kernel_page_size_kb,
            b"MMUPageSize" => &mut self.mmu_page_size_kb,
            b"VmFlags" => {
                if self.vm_flags.is_some() {
                    return Err(parse_error(line));
                }
                let flags = std::str::from_utf8(value).map_err(|_| parse_error(line))?;
                self.vm_flags = Some(flags.split_ascii_whitespace().map(str::to_owned).collect());
                return Ok(());
            }
            _ => return Ok(()),
        };
        if slot.is_some() {
            return Err(parse_error(line));
        }
        *slot = Some(kilobytes(value).ok_or_else(|| parse_error(line))?);
        Ok(())
    }

    fn finish(self) -> Result<SmapsArea, HostError> {
        let addr = self.area.range.start;
        let need =
            |value: Option<u64>, field: &'static str| value.ok_or(HostError::MissingField { field, addr });
        Ok(SmapsArea {
            size_kb: need(self.size_kb, "Size")?,
            rss_kb: need(self.rss_kb, "Rss")?,
            anon_huge_pages_kb: need(self.anon_huge_pages_kb, "AnonHugePages")?,
            locked_kb: need(self.locked_kb, "Locked")?,
            private_hugetlb_kb: need(self.private_hugetlb_kb, "Private_Hugetlb")?,
            shared_hugetlb_kb: need(self.shared_hugetlb_kb, "Shared_Hugetlb")?,
            swap_kb: need(self.swap_kb, "Swap")?,
            shared_dirty_kb: need(self.shared_dirty_kb, "Shared_Dirty")?,
            private_dirty_kb: need(self.private_dirty_kb, "Private_Dirty")?,
            kernel_page_size_kb: need(self.kernel_page_size_kb, "KernelPageSize")?,
            mmu_page_size_kb: need(self.mmu_page_size_kb, "MMUPageSize")?,
            vm_flags: self.vm_flags.ok_or(HostError::MissingField { field: "VmFlags", addr })?,
            area: self.area,
        })
    }
}

/// The number of `<spaces><decimal> kB`.
fn kilobytes(value: &[u8]) -> Option<u64> {
    let number = value.trim_ascii().strip_suffix(b" kB")?;
    decimal(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::Isolated;
    use crate::host::{page_size, query};
    use crate::sys::{self, Advice, Protection};

    /// A record as this kernel (6.18, x86-64) prints it, pkeys line included.
    const RECORD: &str = "\
7f6b629c8000-7f6b629cc000 rw-s 00000000 00:01 6                          /memfd:guest ram (deleted)
Size:                 16 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                  12 kB
Pss:                  12 kB
Pss_Dirty:            12 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:        12 kB
Referenced:           12 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  4 kB
SwapPss:               4 kB
Locked:                8 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr sh mr mw me ms lo lf dc dd sd 
";

    const HUGETLB: &str = "\
7f4000000000-7f4000400000 rw-p 00000000 00:0f 1234                       /dev/hugepages/guest
Size:               4096 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
Rss:                   0 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
AnonHugePages:         0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:    2048 kB
Swap:                  0 kB
Locked:                0 kB
VmFlags: rd wr mr mw me de ht 
";

    #[test]
    fn parses_records() {
        let areas = parse_smaps(&format!("{RECORD}{HUGETLB}")).unwrap();
        assert_eq!(areas.len(), 2);
        let a = &areas[0];
        assert_eq!(a.area.range, 0x7f6b_629c_8000..0x7f6b_629c_c000);
        assert!(a.area.shared && a.area.is_deleted());
        assert_eq!(
            (a.size_kb, a.rss_kb, a.swap_kb, a.locked_kb, a.kernel_page_size_kb, a.mmu_page_size_kb),
            (16, 12, 4, 8, 4, 4)
        );
        assert_eq!(a.vm_flags, ["rd", "wr", "sh", "mr", "mw", "me", "ms", "lo", "lf", "dc", "dd", "sd"]);
        for flag in ["lo", "lf", "dc", "dd", "sh"] {
            assert!(a.has_flag(flag), "{flag}");
        }
        for flag in ["hg", "mg", "ht", "l", "lo ", ""] {
            assert!(!a.has_flag(flag), "{flag:?}");
        }
        let h = &areas[1];
        assert_eq!((h.kernel_page_size_kb, h.shared_hugetlb_kb, h.private_hugetlb_kb), (2048, 2048, 2048));
        assert!(h.has_flag("ht"));
        assert_eq!(parse_smaps("").unwrap(), []);
    }

    #[test]
    fn empty_vm_flags_and_unknown_fields() {
        let text = HUGETLB
            .replace("VmFlags: rd wr mr mw me de ht ", "VmFlags:")
            .replace("Locked:", "OddField:  7\nFuture: x y z\nLocked:");
        let area = &parse_smaps(&text).unwrap()[0];
        assert!(area.vm_flags.is_empty());
    }

    #[test]
    fn missing_fields() {
        for (field, line) in [
            ("Size", "Size:               4096 kB\n"),
            ("Rss", "Rss:                   0 kB\n"),
            ("AnonHugePages", "AnonHugePages:         0 kB\n"),
            ("Locked", "Locked:                0 kB\n"),
            ("Private_Hugetlb", "Private_Hugetlb:    2048 kB\n"),
            ("Shared_Hugetlb", "Shared_Hugetlb:     2048 kB\n"),
            ("Swap", "Swap:                  0 kB\n"),
            ("Shared_Dirty", "Shared_Dirty:          0 kB\n"),
            ("Private_Dirty", "Private_Dirty:         0 kB\n"),
            ("KernelPageSize", "KernelPageSize:     2048 kB\n"),
            ("MMUPageSize", "MMUPageSize:        2048 kB\n"),
            ("VmFlags", "VmFlags: rd wr mr mw me de ht \n"),
        ] {
            assert!(HUGETLB.contains(line), "{line}");
            match parse_smaps(&HUGETLB.replace(line, "")) {
                Err(HostError::MissingField { field: f, addr }) => {
                    assert_eq!((f, addr), (field, 0x7f40_0000_0000));
                }
                other => panic!("without {field}: {other:?}"),
            }
        }
        // The first record is complete, the second has no fields at all.
        let text = format!("{RECORD}1000-2000 rw-p 00000000 00:00 0\n");
        assert!(matches!(parse_smaps(&text), Err(HostError::MissingField { field: "Size", addr: 0x1000 })));
    }

    #[test]
    fn malformed_records() {
        for (from, to) in [
            ("Rss:                   0 kB", "Rss:                   0 KB"),
            ("Rss:                   0 kB", "Rss:                   0"),
            ("Rss:                   0 kB", "Rss:                  -1 kB"),
            ("Rss:                   0 kB", "Rss:                    kB"),
            ("Rss:                   0 kB", "Rss:  99999999999999999999 kB"),
            ("Rss:                   0 kB", "Rss: 0 kB\nRss: 0 kB"),
            ("VmFlags: rd", "VmFlags: rd\nVmFlags: rd"),
            ("7f4000000000-7f4000400000", "7f4000000000"),
        ] {
            let text = HUGETLB.replacen(from, to, 1);
            assert!(text != HUGETLB, "{from}");
            assert!(matches!(parse_smaps(&text), Err(HostError::Parse { .. })), "{to:?}");
        }
        // A blank line after a complete record.
        assert!(
            matches!(parse_smaps(&format!("{HUGETLB}\n")), Err(HostError::Parse { line }) if line.is_empty())
        );
        // A field before any record.
        assert!(matches!(parse_smaps("Rss: 4 kB\n"), Err(HostError::Parse { .. })));
        // A colon alone is not a field name; the line is not a maps line either.
        assert!(matches!(parse_smaps(": 4 kB\n"), Err(HostError::Parse { .. })));
        // Flags that are not UTF-8.
        let mut record = Record::new(parse_record_header(b"1000-2000 rw-p 00000000 00:00 0").unwrap());
        assert!(matches!(record.field(b"VmFlags: rd \xff"), Err(HostError::Parse { .. })));
        assert!(matches!(record.field(b"NoColon"), Err(HostError::Parse { .. })));
    }

    #[test]
    fn parses_this_process() {
        let text = std::fs::read_to_string(SMAPS_PATH).unwrap();
        let areas = parse_smaps(&text).unwrap();
        assert!(!areas.is_empty());
        for a in &areas {
            assert_eq!(a.size_kb * 1024, a.area.range.len() as u64, "{a:?}");
            assert!(a.vm_flags.iter().all(|f| f.len() == 2), "{a:?}");
        }
    }

    #[test]
    fn smaps_of_a_mapping_shows_advice() {
        let m = Isolated::new(4);
        // SAFETY: the test owns the mapping; nothing else uses it.
        unsafe { m.page(1).write_volatile(7) };
        let info = smaps(m.page(2)).unwrap();
        assert_eq!(info.area, query(m.ptr).unwrap());
        assert_eq!(info.size_kb * 1024, m.len as u64);
        assert_eq!(info.rss_kb * 1024, page_size() as u64);
        assert_eq!(info.kernel_page_size_kb * 1024, page_size() as u64);
        assert_eq!((info.locked_kb, info.swap_kb, info.anon_huge_pages_kb), (0, 0, 0));
        assert!(info.has_flag("rd") && info.has_flag("wr") && !info.has_flag("ex"));
        for flag in ["dd", "dc", "lo", "hg", "mg"] {
            assert!(!info.has_flag(flag), "{flag} before advice");
        }

        for (advice, flag) in [(Advice::DontDump, "dd"), (Advice::DontFork, "dc"), (Advice::HugePage, "hg")] {
            // SAFETY: the test owns the mapping; the advice is not destructive.
            unsafe { sys::madvise(m.ptr, m.len, advice) }.unwrap();
            assert!(smaps(m.ptr).unwrap().has_flag(flag), "{flag} after {advice:?}");
        }
        // SAFETY: as above. KSM may be compiled out (EINVAL): then there is no flag to see.
        if unsafe { sys::madvise(m.ptr, m.len, Advice::Mergeable) }.is_ok() {
            assert!(smaps(m.ptr).unwrap().has_flag("mg"));
        }
        // The flags split the area when given to part of it.
        // SAFETY: as above.
        unsafe { sys::mprotect(m.page(3), page_size(), Protection::READ) }.unwrap();
        assert_eq!(smaps(m.page(3)).unwrap().area.range, m.page(3) as usize..m.hole_after());
    }

    #[test]
    fn smaps_errors() {
        let m = Isolated::new(1);
        match smaps(m.hole_after() as *const u8) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_after()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(smaps(m.hole_before() as *const u8), Err(HostError::Unmapped { .. })));
        assert!(matches!(smaps_at(Path::new("/nonexistent/smaps"), 0), Err(HostError::Read { .. })));
        // maps has no fields: the record of an area found there lacks all of them.
        match smaps_at(Path::new(crate::host::maps::MAPS_PATH), m.ptr as usize) {
            Err(HostError::MissingField { field: "Size", addr }) => assert_eq!(addr, m.ptr as usize),
            other => panic!("{other:?}"),
        }
    }
}
