//! `/proc/self/maps`: which mapping holds an address, with which protection and backing.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::ops::{ControlFlow, Range};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::HostError;
use crate::sys::Protection;

pub(crate) const MAPS_PATH: &str = "/proc/self/maps";

/// Bytes asked of the kernel per `read(2)`: the kernel fills it with whole records, so a
/// large buffer means few calls for a process with many mappings.
const READ_BUFFER: usize = 64 * 1024;

/// The suffix the kernel appends to the path of a file that was unlinked while mapped.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// One memory area (a kernel VMA) of the process, as a line of `/proc/self/maps` describes
/// it.
///
/// The kernel splits a mapping where protection or flags differ and merges neighbouring
/// mappings that are compatible, so an area need not match one `mmap` call.
///
/// `path` is the text the kernel prints after the inode, kept as given:
///
/// - `None` for anonymous memory without a name;
/// - pseudo-paths such as `[heap]`, `[stack]`, `[vdso]`, `[vvar]` or `[anon:<name>]` (names
///   given with `prctl(PR_SET_VMA_ANON_NAME)`) stay as they are, brackets included;
/// - a file unlinked while mapped keeps the kernel's `" (deleted)"` suffix
///   ([`is_deleted`](MapArea::is_deleted)). It is not stripped because a file can really be
///   named that way, and then stripping would name another file. A memfd always shows as
///   `/memfd:<name> (deleted)`;
/// - a newline in a file name is printed by the kernel as `\012`, and kept so;
/// - leading spaces of a name cannot be told from the padding before it and are dropped;
///   every other byte, including spaces inside the name and non-UTF-8 bytes, is kept.
///
/// ```
/// use guestmem::host::parse_maps_line;
/// use guestmem::sys::Protection;
///
/// let area = parse_maps_line(
///     "7f00c0000000-7f00c0200000 rw-s 00001000 00:01 42                         /memfd:guest ram (deleted)",
/// )
/// .unwrap();
/// assert_eq!(area.range, 0x7f00c0000000..0x7f00c0200000);
/// assert_eq!(area.protection, Protection::READ_WRITE);
/// assert!(area.shared && area.is_deleted());
/// assert_eq!((area.offset, area.dev_major, area.dev_minor, area.inode), (0x1000, 0, 1, 42));
/// assert_eq!(area.path.unwrap().to_str(), Some("/memfd:guest ram (deleted)"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MapArea {
    /// The host addresses of the area, page aligned.
    pub range: Range<usize>,
    /// Read, write and execute permission (other `PROT_*` bits do not show in the file).
    pub protection: Protection,
    /// `true` for a shared mapping (`s`), `false` for a private, copy-on-write one (`p`).
    pub shared: bool,
    /// Offset in the file of the first byte of the area (0 for anonymous memory).
    pub offset: u64,
    /// Major number of the device holding the file (0 for anonymous memory).
    pub dev_major: u32,
    /// Minor number of the device holding the file.
    pub dev_minor: u32,
    /// Inode of the file (0 for anonymous memory).
    pub inode: u64,
    /// The file or pseudo-path, as the kernel prints it (see the type's documentation).
    pub path: Option<PathBuf>,
}

impl MapArea {
    /// Whether the path ends in the `" (deleted)"` the kernel appends to a file that was
    /// unlinked while mapped (every memfd). A file whose real name ends in that text looks the
    /// same.
    ///
    /// ```
    /// let area = guestmem::host::parse_maps_line("1000-2000 r--p 00000000 08:01 7 /tmp/a (deleted)").unwrap();
    /// assert!(area.is_deleted());
    /// ```
    pub fn is_deleted(&self) -> bool {
        self.path.as_ref().is_some_and(|p| p.as_os_str().as_bytes().ends_with(DELETED_SUFFIX))
    }
}

/// Parses one line of `/proc/<pid>/maps` (a trailing newline is allowed).
///
/// The form is `start-end perms offset major:minor inode [path]`, the numbers in hex but the
/// inode in decimal, fields separated by one space and the path preceded by padding spaces.
/// Anything else is [`HostError::Parse`]. See [`MapArea`] for how the path is kept.
///
/// ```
/// use guestmem::host::{parse_maps_line, HostError};
///
/// let heap = parse_maps_line("55c46ce03000-55c46ce24000 rw-p 00000000 00:00 0        [heap]").unwrap();
/// assert_eq!(heap.path.unwrap().to_str(), Some("[heap]"));
/// let anon = parse_maps_line("7f8154e61000-7f8154e64000 rw-p 00000000 00:00 0 \n").unwrap();
/// assert_eq!((anon.path, anon.inode), (None, 0));
/// assert!(matches!(parse_maps_line("7f8154e61000 rw-p"), Err(HostError::Parse { .. })));
/// ```
pub fn parse_maps_line(line: &str) -> Result<MapArea, HostError> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    parse_record_header(line.as_bytes())
}

/// Parses a whole `/proc/<pid>/maps` text, one [`MapArea`] a line (lines end at `\n` only).
///
/// ```
/// let text = "1000-3000 r-xp 00000000 08:01 12 /bin/vmm\n3000-4000 rw-p 00002000 08:01 12 /bin/vmm\n";
/// let areas = guestmem::host::parse_maps(text).unwrap();
/// assert_eq!(areas.len(), 2);
/// assert_eq!(areas[1].range, 0x3000..0x4000);
/// ```
pub fn parse_maps(text: &str) -> Result<Vec<MapArea>, HostError> {
    text.split_terminator('\n').map(|line| parse_record_header(line.as_bytes())).collect()
}

/// The area of this process that contains `addr`.
///
/// Fails with [`HostError::Unmapped`] if no mapping contains it, [`HostError::Read`] if
/// `/proc/self/maps` cannot be read. A `PROT_NONE` reservation is mapped: it is found, with
/// [`Protection::NONE`].
///
/// ```
/// let ram = vec![0u8; 4096];
/// let area = guestmem::host::query(ram.as_ptr()).unwrap();
/// assert!(area.range.contains(&(ram.as_ptr() as usize)));
/// assert!(area.protection.is_writable());
/// ```
pub fn query(addr: *const u8) -> Result<MapArea, HostError> {
    area_at(Path::new(MAPS_PATH), addr as usize)
}

/// The areas that together map `[addr, addr + len)`, in address order.
///
/// The areas are returned whole, as the kernel lists them, not clipped to the range: the
/// first may start before `addr` and the last may end after `addr + len`. Consecutive areas
/// are adjacent (each ends where the next starts).
///
/// Fails with [`HostError::ZeroLength`] if `len` is 0, [`HostError::Overflow`] if
/// `addr + len` overflows, [`HostError::Unmapped`] naming the first address of the range
/// that no mapping holds, [`HostError::Read`] if `/proc/self/maps` cannot be read.
///
/// ```
/// use guestmem::host::{query_range, HostError};
///
/// let ram = vec![0u8; 3 * 4096];
/// let areas = query_range(ram.as_ptr(), ram.len()).unwrap();
/// assert!(areas[0].range.start <= ram.as_ptr() as usize);
/// assert!(areas.last().unwrap().range.end >= ram.as_ptr() as usize + ram.len());
/// assert!(matches!(query_range(ram.as_ptr(), 0), Err(HostError::ZeroLength { .. })));
/// ```
pub fn query_range(addr: *const u8, len: usize) -> Result<Vec<MapArea>, HostError> {
    areas_over(Path::new(MAPS_PATH), addr as usize, len)
}

pub(crate) fn area_at(path: &Path, addr: usize) -> Result<MapArea, HostError> {
    let mut found = None;
    for_each_line(path, |line| {
        let area = parse_record_header(line)?;
        if area.range.end <= addr {
            return Ok(ControlFlow::Continue(()));
        }
        // Areas come in address order: this is the first one ending after `addr`.
        if area.range.start <= addr {
            found = Some(area);
        }
        Ok(ControlFlow::Break(()))
    })?;
    found.ok_or(HostError::Unmapped { addr })
}

pub(super) fn areas_over(path: &Path, addr: usize, len: usize) -> Result<Vec<MapArea>, HostError> {
    if len == 0 {
        return Err(HostError::ZeroLength { addr });
    }
    let end = addr.checked_add(len).ok_or(HostError::Overflow { addr, len })?;
    let mut areas = Vec::new();
    // The first address of the range not yet known to be mapped.
    let mut next = addr;
    for_each_line(path, |line| {
        let area = parse_record_header(line)?;
        if area.range.end <= next {
            return Ok(ControlFlow::Continue(()));
        }
        if area.range.start > next {
            // A hole at `next`.
            return Ok(ControlFlow::Break(()));
        }
        next = area.range.end;
        areas.push(area);
        Ok(if next >= end { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    })?;
    if next < end {
        return Err(HostError::Unmapped { addr: next });
    }
    Ok(areas)
}

/// Calls `f` on each line of the file at `path`, without its newline, until `f` breaks.
pub(super) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(&[u8]) -> Result<ControlFlow<()>, HostError>,
) -> Result<(), HostError> {
    let read_error = |source| HostError::Read { path: path.to_owned(), source };
    let file = File::open(path).map_err(read_error)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // read_until retries reads interrupted by a signal.
        if reader.read_until(b'\n', &mut line).map_err(read_error)? == 0 {
            return Ok(());
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if f(text)?.is_break() {
            return Ok(());
        }
    }
}

pub(super) fn parse_error(line: &[u8]) -> HostError {
    HostError::Parse { line: String::from_utf8_lossy(line).into_owned() }
}

/// Parses a maps line, which is also the first line of each record of smaps.
pub(super) fn parse_record_header(line: &[u8]) -> Result<MapArea, HostError> {
    parse_header_fields(line).ok_or_else(|| parse_error(line))
}

fn parse_header_fields(line: &[u8]) -> Option<MapArea> {
    let (range, rest) = split_at_space(line)?;
    let (perms, rest) = split_at_space(rest)?;
    let (offset, rest) = split_at_space(rest)?;
    let (dev, rest) = split_at_space(rest)?;
    // The inode ends the line of a nameless area that lost its trailing space.
    let (inode, rest) = split_at_space(rest).unwrap_or((rest, b""));

    let (start, end) = split_once(range, b'-')?;
    let start = usize::try_from(hex(start)?).ok()?;
    let end = usize::try_from(hex(end)?).ok()?;
    if start >= end {
        return None;
    }

    let &[r, w, x, s] = perms else { return None };
    let mut protection = Protection::NONE;
    for (byte, set, flag) in
        [(r, b'r', Protection::READ), (w, b'w', Protection::WRITE), (x, b'x', Protection::EXEC)]
    {
        match byte {
            b'-' => {}
            b if b == set => protection |= flag,
            _ => return None,
        }
    }
    let shared = match s {
        b's' => true,
        b'p' => false,
        _ => return None,
    };

    let (major, minor) = split_once(dev, b':')?;
    // The kernel pads with spaces only; a tab or any other byte starts the name.
    let name = &rest[rest.iter().position(|&b| b != b' ').unwrap_or(rest.len())..];
    Some(MapArea {
        range: start..end,
        protection,
        shared,
        offset: hex(offset)?,
        dev_major: u32::try_from(hex(major)?).ok()?,
        dev_minor: u32::try_from(hex(minor)?).ok()?,
        inode: decimal(inode)?,
        path: (!name.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(name))),
    })
}

fn split_at_space(s: &[u8]) -> Option<(&[u8], &[u8])> {
    split_once(s, b' ')
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

/// A hex number of digits only (`from_str_radix` alone would accept a sign).
fn hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// A decimal number of digits only.
pub(super) fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::Isolated;
    use crate::host::{page_size, ProtectGuard};

    #[test]
    fn parses_kernel_lines() {
        let a = parse_maps_line(
            "55c44a86e000-55c44a873000 r-xp 00002000 fe:00 247030                     /usr/bin/cat",
        )
        .unwrap();
        assert_eq!(
            a,
            MapArea {
                range: 0x55c4_4a86_e000..0x55c4_4a87_3000,
                protection: Protection::READ | Protection::EXEC,
                shared: false,
                offset: 0x2000,
                dev_major: 0xfe,
                dev_minor: 0,
                inode: 247030,
                path: Some(PathBuf::from("/usr/bin/cat")),
            }
        );
        let vsyscall = parse_maps_line(
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        )
        .unwrap();
        assert_eq!(vsyscall.range, 0xffff_ffff_ff60_0000..0xffff_ffff_ff60_1000);
        assert_eq!(vsyscall.protection, Protection::EXEC);
        assert_eq!(vsyscall.path, Some(PathBuf::from("[vsyscall]")));
        let none = parse_maps_line("7f0000000000-7f0000001000 ---p 00000000 00:00 0 ").unwrap();
        assert_eq!((none.protection, none.path), (Protection::NONE, None));
        // Without the trailing space the kernel writes, still a nameless area.
        assert_eq!(parse_maps_line("7f0000000000-7f0000001000 ---p 00000000 00:00 0").unwrap().path, None);
        let big = parse_maps_line("1000-2000 rw-s 1234567890ab 103:1f 18446744073709551615 /dev/x").unwrap();
        assert_eq!((big.offset, big.dev_major, big.dev_minor), (0x1234_5678_90ab, 0x103, 0x1f));
        assert_eq!(big.inode, u64::MAX);
        assert!(big.shared && !big.is_deleted());
    }

    #[test]
    fn keeps_paths_as_the_kernel_prints_them() {
        let path = |line: &str| parse_maps_line(line).unwrap().path.unwrap().into_os_string();
        assert_eq!(path("1000-2000 rw-p 00000000 00:00 0      [stack]"), "[stack]");
        assert_eq!(path("1000-2000 rw-p 00000000 00:00 0      [anon:guest ram]"), "[anon:guest ram]");
        assert_eq!(path("1000-2000 rw-s 00000000 fe:00 9   /tmp/a b  c"), "/tmp/a b  c");
        assert_eq!(path("1000-2000 rw-s 00000000 fe:00 9   /tmp/trailing "), "/tmp/trailing ");
        assert_eq!(path("1000-2000 rw-s 00000000 fe:00 9   /tmp/a\\012b"), "/tmp/a\\012b");
        let deleted =
            parse_maps_line("1000-2000 rw-s 00000000 fe:00 9   /tmp/a b (deleted) c (deleted)").unwrap();
        assert_eq!(deleted.path.as_deref(), Some(Path::new("/tmp/a b (deleted) c (deleted)")));
        assert!(deleted.is_deleted());
        let memfd = parse_maps_line("1000-2000 rw-s 00000000 00:01 6   /memfd:my mem fd (deleted)").unwrap();
        assert!(memfd.is_deleted());
        // Lines end at `\n` only: a `\r` is part of the name.
        let cr = parse_maps("1000-2000 r--p 00000000 fe:00 9 /tmp/cr\r\n").unwrap();
        assert_eq!(cr[0].path.as_deref(), Some(Path::new("/tmp/cr\r")));
        // Non-UTF-8 names come through byte for byte.
        let raw = parse_record_header(b"1000-2000 r--p 00000000 fe:00 9 /tmp/\xff\xfe").unwrap();
        assert_eq!(raw.path.unwrap().as_os_str().as_bytes(), b"/tmp/\xff\xfe");
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "",
            "garbage",
            "1000-2000",
            "1000-2000 rw-p",
            "1000-2000 rw-p 00000000 00:00",
            "1000 rw-p 00000000 00:00 0",
            "2000-1000 rw-p 00000000 00:00 0",
            "1000-1000 rw-p 00000000 00:00 0",
            "1000-2000 rw-q 00000000 00:00 0",
            "1000-2000 wr-p 00000000 00:00 0",
            "1000-2000 rw-pp 00000000 00:00 0",
            "1000-2000 rw- 00000000 00:00 0",
            "+1000-2000 rw-p 00000000 00:00 0",
            "1000-2000 rw-p 0000000g 00:00 0",
            "1000-2000 rw-p 00000000 0000 0",
            "1000-2000 rw-p 00000000 00:100000000 0",
            "1000-2000 rw-p 00000000 00:00 -1",
            "1000-2000 rw-p 00000000 00:00 1a",
            "1000-2000 rw-p 00000000 00:00 18446744073709551616",
            "1000-10000000000000000 rw-p 00000000 00:00 0",
            "1000-2000  rw-p 00000000 00:00 0",
        ] {
            match parse_maps_line(bad) {
                Err(HostError::Parse { line }) => assert_eq!(line, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        assert!(matches!(parse_maps("1000-2000 rw-p 00000000 00:00 0\n\n"), Err(HostError::Parse { .. })));
        let e = parse_record_header(b"\xff-2000 rw-p").unwrap_err();
        assert!(matches!(e, HostError::Parse { ref line } if line.starts_with('\u{fffd}')), "{e}");
    }

    /// Writes an area the way the kernel's `show_map_vma` does (padding the name to column 73).
    fn kernel_line(a: &MapArea) -> String {
        let perm = |p: Protection, c: char| if a.protection.contains(p) { c } else { '-' };
        let mut line = format!(
            "{:08x}-{:08x} {}{}{}{} {:08x} {:02x}:{:02x} {} ",
            a.range.start,
            a.range.end,
            perm(Protection::READ, 'r'),
            perm(Protection::WRITE, 'w'),
            perm(Protection::EXEC, 'x'),
            if a.shared { 's' } else { 'p' },
            a.offset,
            a.dev_major,
            a.dev_minor,
            a.inode
        );
        if let Some(path) = &a.path {
            while line.len() < 73 {
                line.push(' ');
            }
            line.push_str(path.to_str().unwrap());
        }
        line
    }

    proptest::proptest! {
        #[test]
        fn kernel_lines_round_trip(
            start in 0usize..usize::MAX - 1,
            len in 1usize..0x1_0000_0000,
            prot in 0i32..8,
            shared: bool,
            offset: u64,
            dev_major: u32,
            dev_minor: u32,
            inode: u64,
            path in proptest::option::of("(/|\\[)[ -~]{0,40}"),
        ) {
            let area = MapArea {
                range: start..start.saturating_add(len),
                protection: Protection::from_bits(prot).unwrap(),
                shared,
                offset,
                dev_major,
                dev_minor,
                inode,
                path: path.map(PathBuf::from),
            };
            let line = kernel_line(&area);
            proptest::prop_assert_eq!(parse_maps_line(&line).unwrap(), area);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\n]{0,200}", bytes: Vec<u8>) {
            let _ = parse_maps_line(&text);
            let _ = parse_maps(&text);
            let _ = crate::host::parse_smaps(&text);
            let _ = parse_record_header(&bytes);
        }
    }

    #[test]
    fn parses_this_process() {
        let text = std::fs::read_to_string(MAPS_PATH).unwrap();
        let areas = parse_maps(&text).unwrap();
        assert_eq!(areas.len(), text.lines().count());
        assert!(areas.windows(2).all(|w| w[0].range.end <= w[1].range.start));
        assert!(areas.iter().any(|a| a.path.as_deref() == Some(Path::new("[heap]")) || a.inode != 0));
    }

    #[test]
    fn query_finds_the_area_and_reports_holes() {
        let m = Isolated::new(4);
        let ps = page_size();
        for addr in [m.ptr, m.page(2), m.page(4).wrapping_sub(1)] {
            let area = query(addr).unwrap();
            assert_eq!(area.range, m.range());
            assert_eq!((area.protection, area.shared, area.path), (Protection::READ_WRITE, false, None));
        }
        assert!(
            matches!(query(m.hole_after() as *const u8), Err(HostError::Unmapped { addr }) if addr == m.hole_after())
        );
        let before = m.hole_before() as *const u8;
        assert!(matches!(query(before), Err(HostError::Unmapped { addr }) if addr == m.hole_before()));

        assert_eq!(query_range(m.page(1), 1).unwrap()[0].range, m.range());
        assert_eq!(query_range(m.ptr, m.len).unwrap().len(), 1);
        match query_range(m.page(3), 2 * ps) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_after()),
            other => panic!("{other:?}"),
        }
        match query_range(before, 2 * ps) {
            Err(HostError::Unmapped { addr }) => assert_eq!(addr, m.hole_before()),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(query_range(m.ptr, 0), Err(HostError::ZeroLength { addr }) if addr == m.ptr as usize)
        );
        match query_range(usize::MAX as *const u8, 2) {
            Err(HostError::Overflow { addr, len }) => assert_eq!((addr, len), (usize::MAX, 2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_range_returns_whole_adjacent_areas() {
        let m = Isolated::new(4);
        let ps = page_size();
        // SAFETY: the test owns the mapping and holds no reference into it.
        let _guard = unsafe { ProtectGuard::new(m.page(1), 2 * ps, Protection::READ) }.unwrap();
        let areas = query_range(m.ptr.wrapping_add(ps / 2), 3 * ps).unwrap();
        let ranges: Vec<_> = areas.iter().map(|a| (a.range.clone(), a.protection)).collect();
        let base = m.ptr as usize;
        assert_eq!(
            ranges,
            [
                (base..base + ps, Protection::READ_WRITE),
                (base + ps..base + 3 * ps, Protection::READ),
                (base + 3 * ps..base + 4 * ps, Protection::READ_WRITE),
            ]
        );
        // A range ending inside the second area stops there.
        assert_eq!(query_range(m.ptr, ps + 1).unwrap().len(), 2);
    }

    #[test]
    fn unreadable_maps_is_a_read_error() {
        let missing = Path::new("/nonexistent/maps");
        match area_at(missing, 0x1000) {
            Err(HostError::Read { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(areas_over(missing, 0x1000, 1), Err(HostError::Read { .. })));
    }
}
