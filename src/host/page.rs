//! Page geometry of the host: the base page size, the huge page sizes, rounding.

use std::io;
use std::path::Path;

/// Where the kernel lists one `hugepages-<N>kB` directory per huge page size it supports.
const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages";

/// The base page size of the host, in bytes (see [`crate::sys::page_size`]).
///
/// ```
/// let ps = guestmem::host::page_size();
/// assert!(ps.is_power_of_two() && ps >= 4096);
/// ```
pub fn page_size() -> usize {
    crate::sys::page_size()
}

/// The hugetlb page sizes the kernel supports, in bytes, smallest first.
///
/// Read from the `hugepages-<N>kB` directory names under `/sys/kernel/mm/hugepages`. A size
/// listed there is one the kernel can map; whether pages of it are free in the pool is a
/// separate question (`free_hugepages` in that directory). A kernel without hugetlb support
/// has no such directory: the result is then empty, not an error. A directory name that does
/// not have the expected form is an [`io::ErrorKind::InvalidData`] error.
///
/// ```
/// for size in guestmem::host::huge_page_sizes().unwrap() {
///     assert!(size.is_power_of_two() && size > guestmem::host::page_size());
/// }
/// ```
pub fn huge_page_sizes() -> io::Result<Vec<usize>> {
    huge_page_sizes_in(Path::new(HUGEPAGES_DIR))
}

fn huge_page_sizes_in(dir: &Path) -> io::Result<Vec<usize>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut sizes = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let size = name.to_str().and_then(parse_hugepages_dir_name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected entry {name:?} in {}", dir.display()),
            )
        })?;
        sizes.push(size);
    }
    sizes.sort_unstable();
    Ok(sizes)
}

/// The size in bytes named by a `hugepages-<N>kB` directory, `None` for any other name.
fn parse_hugepages_dir_name(name: &str) -> Option<usize> {
    let kb = name.strip_prefix("hugepages-")?.strip_suffix("kB")?;
    if kb.is_empty() || !kb.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    kb.parse::<usize>().ok()?.checked_mul(1024).filter(|&size| size != 0)
}

/// `addr` rounded down to a multiple of the page size.
///
/// ```
/// use guestmem::host::{page_floor, page_size};
/// let ps = page_size();
/// assert_eq!(page_floor(ps + 1), ps);
/// assert_eq!(page_floor(ps), ps);
/// assert_eq!(page_floor(ps - 1), 0);
/// ```
pub fn page_floor(addr: usize) -> usize {
    addr & !(page_size() - 1)
}

/// `addr` rounded up to a multiple of the page size, `None` if that does not fit in `usize`.
///
/// ```
/// use guestmem::host::{page_ceil, page_size};
/// let ps = page_size();
/// assert_eq!(page_ceil(1), Some(ps));
/// assert_eq!(page_ceil(ps), Some(ps));
/// assert_eq!(page_ceil(0), Some(0));
/// assert_eq!(page_ceil(usize::MAX), None);
/// ```
pub fn page_ceil(addr: usize) -> Option<usize> {
    addr.checked_add(page_size() - 1).map(page_floor)
}

/// Whether `addr` is a multiple of the page size.
///
/// ```
/// use guestmem::host::{is_page_aligned, page_size};
/// assert!(is_page_aligned(0) && is_page_aligned(3 * page_size()));
/// assert!(!is_page_aligned(page_size() + 8));
/// ```
pub fn is_page_aligned(addr: usize) -> bool {
    addr & (page_size() - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        let ps = page_size();
        assert_eq!(page_floor(0), 0);
        assert_eq!(page_floor(usize::MAX), usize::MAX - (ps - 1));
        assert_eq!(page_ceil(usize::MAX - (ps - 1)), Some(usize::MAX - (ps - 1)));
        assert_eq!(page_ceil(usize::MAX - (ps - 1) + 1), None);
        assert_eq!(page_ceil(2 * ps - 1), Some(2 * ps));
        assert!(!is_page_aligned(1) && !is_page_aligned(usize::MAX));
    }

    #[test]
    fn hugepages_dir_names() {
        assert_eq!(parse_hugepages_dir_name("hugepages-2048kB"), Some(2 << 20));
        assert_eq!(parse_hugepages_dir_name("hugepages-1048576kB"), Some(1 << 30));
        assert_eq!(parse_hugepages_dir_name("hugepages-64kB"), Some(64 << 10));
        for bad in ["hugepages-kB", "hugepages-0kB", "hugepages-+4kB", "hugepages-2048", "huge-2048kB", ""] {
            assert_eq!(parse_hugepages_dir_name(bad), None, "{bad}");
        }
        assert_eq!(parse_hugepages_dir_name(&format!("hugepages-{}kB", u64::MAX)), None);
    }

    #[test]
    fn huge_page_sizes_of_this_kernel() {
        let sizes = huge_page_sizes().unwrap();
        assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
        assert!(sizes.iter().all(|s| s.is_power_of_two() && *s > page_size()), "{sizes:?}");
        assert!(huge_page_sizes_in(Path::new("/nonexistent/hugepages")).unwrap().is_empty());
        // Any other directory holds names of another form.
        let e = huge_page_sizes_in(Path::new("/proc/self")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
