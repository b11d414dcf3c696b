//! The on-disk layout of a snapshot file: the header, the region table and the page bitmaps of
//! diff snapshots, their encoding and their validation. Everything is little-endian.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{io_err, SnapshotError};
use crate::address::GuestAddress;
use crate::bytes::{le_u32, le_u64, put_le_u32, put_le_u64};
use crate::checksum::Checksum;

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"GMEMSNAP";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header.
pub(crate) const HEADER_LEN: u64 = 64;
/// Bytes of one region table entry.
pub(crate) const REGION_ENTRY_LEN: u64 = 48;
/// Byte offset of the header checksum in the header.
pub(crate) const HEADER_CHECKSUM_OFFSET: usize = 40;
/// Flag bit: the file is a diff snapshot (each region has a page bitmap).
pub(crate) const FLAG_DIFF: u32 = 1;
/// The most regions a file may describe (far more than any VM has; bounds what a corrupt
/// count can make us allocate).
pub(crate) const MAX_REGIONS: u32 = 1 << 16;
/// The largest header area (header, table and bitmaps) we read: 1 GiB of bitmap covers 32 TiB
/// of guest memory in 4 KiB pages.
pub(crate) const MAX_HEADER_AREA: u64 = 1 << 30;
/// The smallest snapshot page size (the granule of holes and diff bitmaps): a smaller one would
/// let a small file describe an outsized bitmap.
pub(crate) const MIN_PAGE_SIZE: u64 = 4096;
/// The largest snapshot page size.
pub(crate) const MAX_PAGE_SIZE: u64 = 1 << 30;

/// Whether a snapshot holds whole memory or only some pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// Every page of every region (zero pages as holes).
    Full,
    /// Only the pages marked in each region's page bitmap; the rest are not in the file.
    Diff,
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        })
    }
}

/// One region as a snapshot file describes it.
///
/// ```
/// use guestmem::bitmap::AtomicBitmap;
/// use guestmem::{snapshot, Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
/// mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump_dirty(&mem, &file).unwrap();
/// let info = snapshot::read_info(&file).unwrap();
/// let region = &info.regions[0];
/// assert!(region.holds_page(2) && !region.holds_page(4));
/// assert_eq!(region.held_runs(info.page_size).collect::<Vec<_>>(), vec![(2, 2)]);
/// assert_eq!(region.held_pages(info.page_size), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRegion {
    /// Guest address of the region's first byte.
    pub guest_addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
    /// The page size of the memory the region was dumped from (the huge page size for hugetlb
    /// memory); the region's data starts at a multiple of it.
    pub page_size: u64,
    /// File offset of the region's first byte.
    pub data_offset: u64,
    /// [`Checksum`] of the region's data area as the file holds it, holes read as zeros: for a
    /// full snapshot the region's whole contents; for a diff, the contents with every page
    /// the diff does not hold read as zero.
    pub checksum: u64,
    /// For a diff: one bit per snapshot page (bit `i % 64` of word `i / 64` is page `i`),
    /// set for pages the file holds.
    pub(crate) pages: Option<Vec<u64>>,
}

impl SnapshotRegion {
    /// Whether the snapshot holds page `page` (in pages of the snapshot's page size) of this
    /// region: always for a full snapshot.
    pub fn holds_page(&self, page: u64) -> bool {
        match &self.pages {
            None => true,
            Some(words) => usize::try_from(page / 64)
                .ok()
                .and_then(|w| words.get(w))
                .is_some_and(|w| w & (1 << (page % 64)) != 0),
        }
    }

    /// The runs of pages the snapshot holds, as `(first_page, count)`, in order, in pages of
    /// `page_size` (the snapshot's; 0 is taken as 1). An iterator over the page bitmap: it
    /// allocates nothing, whatever the bitmap holds.
    pub fn held_runs(&self, page_size: u64) -> HeldRuns<'_> {
        let num_pages = self.len.div_ceil(page_size.max(1));
        match &self.pages {
            None => HeldRuns { words: &[], word: 0, bits: 0, whole: Some(num_pages) },
            Some(words) => {
                HeldRuns { words, word: 0, bits: words.first().copied().unwrap_or(0), whole: None }
            }
        }
    }

    /// How many pages the snapshot holds of this region.
    pub fn held_pages(&self, page_size: u64) -> u64 {
        match &self.pages {
            None => self.len.div_ceil(page_size),
            Some(words) => words.iter().map(|w| u64::from(w.count_ones())).sum(),
        }
    }
}

/// The runs of pages a snapshot region holds: see [`SnapshotRegion::held_runs`].
#[derive(Clone, Debug)]
pub struct HeldRuns<'a> {
    words: &'a [u64],
    /// Index of the word `bits` comes from.
    word: usize,
    /// The bits of `words[word]` not yet reported.
    bits: u64,
    /// For a full snapshot: every page, once.
    whole: Option<u64>,
}

impl Iterator for HeldRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if let Some(pages) = self.whole.take() {
            return (pages > 0).then_some((0, pages));
        }
        // The next set bit, from the current word on.
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        let first = self.word as u64 * 64 + u64::from(self.bits.trailing_zeros());
        let mut count = 0;
        // The run goes on while the bits are ones, across words.
        loop {
            let shift = self.bits.trailing_zeros();
            let ones = (self.bits >> shift).trailing_ones();
            count += u64::from(ones);
            let end = shift + ones;
            self.bits = if end >= 64 { 0 } else { self.bits & !(u64::MAX >> (64 - end)) };
            if end < 64 || self.bits != 0 {
                return Some((first, count));
            }
            // The run reached the word's end: it continues if the next word starts with a one.
            match self.words.get(self.word + 1) {
                Some(&next) if next & 1 == 1 => {
                    self.word += 1;
                    self.bits = next;
                }
                _ => return Some((first, count)),
            }
        }
    }
}

/// What a snapshot file's header says: its kind, page size, sizes and regions.
///
/// ```
/// use guestmem::snapshot::{SnapshotInfo, SnapshotKind};
/// use guestmem::{snapshot, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
/// snapshot::dump(&mem, &file).unwrap();
/// let info = SnapshotInfo::read(&file).unwrap();
/// assert_eq!(info.kind, SnapshotKind::Full);
/// assert_eq!(info.file_len, info.regions[0].data_offset + 0x10000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The granule of zero-page holes and of diff page bitmaps (the host base page size when
    /// it was written).
    pub page_size: u64,
    /// Bytes of header, region table and page bitmaps (what the header checksum covers).
    pub header_len: u64,
    /// The length the file has.
    pub file_len: u64,
    /// The regions, in ascending guest address order.
    pub regions: Vec<SnapshotRegion>,
}

/// The checksum of a header area, with its checksum field read as zero.
pub(crate) fn header_checksum(area: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(&area[..HEADER_CHECKSUM_OFFSET]);
    c.zeros(8);
    c.update(&area[HEADER_CHECKSUM_OFFSET + 8..]);
    c.finish()
}

/// Words of a page bitmap for a region of `len` bytes.
pub(crate) fn bitmap_words(len: u64, page_size: u64) -> u64 {
    len.div_ceil(page_size).div_ceil(64)
}

impl SnapshotInfo {
    /// The layout a dump of regions `(guest_addr, len, page_size)` gets: header length, file
    /// length and each region's data offset. Regions must be sorted. `None` if it overflows.
    pub(crate) fn plan(
        kind: SnapshotKind,
        page_size: u64,
        regions: &[(GuestAddress, u64, u64)],
    ) -> Option<SnapshotInfo> {
        let mut header_len = HEADER_LEN.checked_add(REGION_ENTRY_LEN.checked_mul(regions.len() as u64)?)?;
        if kind == SnapshotKind::Diff {
            for &(_, len, _) in regions {
                header_len = header_len.checked_add(bitmap_words(len, page_size) * 8)?;
            }
        }
        let mut end = header_len;
        let mut out = Vec::with_capacity(regions.len());
        for &(guest_addr, len, region_page) in regions {
            let align = region_page.max(page_size);
            let data_offset = end.checked_next_multiple_of(align)?;
            // Whole pages of data, even for a region whose last page is partial, so a mapped
            // restore can map its pages from the file (the tail of the page reads as zeros).
            end = data_offset.checked_add(len.checked_next_multiple_of(page_size)?)?;
            let pages = (kind == SnapshotKind::Diff)
                .then(|| vec![0u64; usize::try_from(bitmap_words(len, page_size)).unwrap_or(0)]);
            out.push(SnapshotRegion {
                guest_addr,
                len,
                page_size: region_page,
                data_offset,
                checksum: 0,
                pages,
            });
        }
        // Off_t is signed: the file must stay below 2^63.
        (end <= i64::MAX as u64).then_some(SnapshotInfo {
            kind,
            page_size,
            header_len,
            file_len: end,
            regions: out,
        })
    }

    /// The header area (header, table, bitmaps) with its checksum.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(self.header_len).unwrap_or(0)];
        b[..8].copy_from_slice(&MAGIC);
        put_le_u32(&mut b, 8, VERSION);
        put_le_u32(&mut b, 12, if self.kind == SnapshotKind::Diff { FLAG_DIFF } else { 0 });
        put_le_u32(&mut b, 16, self.regions.len() as u32);
        put_le_u32(&mut b, 20, self.page_size as u32);
        put_le_u64(&mut b, 24, self.header_len);
        put_le_u64(&mut b, 32, self.file_len);
        let mut bitmap_at = HEADER_LEN + REGION_ENTRY_LEN * self.regions.len() as u64;
        for (i, r) in self.regions.iter().enumerate() {
            let e = (HEADER_LEN + REGION_ENTRY_LEN * i as u64) as usize;
            put_le_u64(&mut b, e, r.guest_addr.0);
            put_le_u64(&mut b, e + 8, r.len);
            put_le_u64(&mut b, e + 16, r.page_size);
            put_le_u64(&mut b, e + 24, r.data_offset);
            put_le_u64(&mut b, e + 32, r.checksum);
            if let Some(words) = &r.pages {
                put_le_u64(&mut b, e + 40, bitmap_at);
                for (j, w) in words.iter().enumerate() {
                    put_le_u64(&mut b, bitmap_at as usize + 8 * j, *w);
                }
                bitmap_at += 8 * words.len() as u64;
            }
        }
        let sum = header_checksum(&b);
        put_le_u64(&mut b, HEADER_CHECKSUM_OFFSET, sum);
        b
    }

    /// Reads and validates the header area of `file`: length, magic, version, header checksum,
    /// then the consistency of the table (aligned, ordered, non-overlapping regions inside the
    /// file, bitmaps where the table says). Reads no region data.
    ///
    /// Nothing is read or allocated from a length the file claims before that length was
    /// checked: the fixed 64-byte header first (region count at most 65536, page size, header
    /// and file lengths against the file's real length), then the region table (its size
    /// follows from the count), whose layout must account for the header length exactly; the
    /// header checksum is computed over the bitmaps by streaming them through a fixed buffer,
    /// and only a header that passes gets its bitmaps allocated (fallibly) and read.
    pub fn read(file: &File) -> Result<SnapshotInfo, SnapshotError> {
        let mut layout = Self::read_layout(file)?;
        layout.load_bitmaps(file)?;
        Ok(layout)
    }

    /// [`read`](Self::read) without the diff page bitmaps (`pages` stays `None` until
    /// [`load_bitmaps`](Self::load_bitmaps)), so a caller can match the layout against its
    /// destination before anything sized by the bitmaps is allocated. The header checksum is
    /// verified here, over the whole header area.
    pub(crate) fn read_layout(file: &File) -> Result<SnapshotInfo, SnapshotError> {
        let actual_len = file.metadata().map_err(|e| io_err("fstat", 0, e))?.len();
        let truncated =
            |part: &'static str, needed: u64| SnapshotError::Truncated { part, needed, file_len: actual_len };
        let bad = |reason| SnapshotError::InvalidLayout { reason };
        if actual_len < HEADER_LEN {
            return Err(truncated("header", HEADER_LEN));
        }
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0).map_err(|e| io_err("read header", 0, e))?;
        if head[..8] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&head[..8]);
            return Err(SnapshotError::BadMagic { found });
        }
        let version = le_u32(&head, 8);
        if version != VERSION {
            return Err(SnapshotError::UnsupportedVersion { found: version, supported: VERSION });
        }
        // Everything the fixed header says, checked before anything else is read.
        let flags = le_u32(&head, 12);
        if flags & !FLAG_DIFF != 0 {
            return Err(bad("unknown flags"));
        }
        let kind = if flags & FLAG_DIFF != 0 { SnapshotKind::Diff } else { SnapshotKind::Full };
        let count = le_u32(&head, 16);
        let page_size = u64::from(le_u32(&head, 20));
        let header_len = le_u64(&head, 24);
        let file_len = le_u64(&head, 32);
        if count > MAX_REGIONS {
            return Err(bad("too many regions"));
        }
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(bad("page size is not a power of two between 4 KiB and 1 GiB"));
        }
        if !(HEADER_LEN..=MAX_HEADER_AREA).contains(&header_len) {
            return Err(bad("header length out of range"));
        }
        if file_len > i64::MAX as u64 || header_len > file_len {
            return Err(bad("file length out of range"));
        }
        let table_end = HEADER_LEN + REGION_ENTRY_LEN * u64::from(count);
        if table_end > header_len {
            return Err(bad("region table runs past the header length"));
        }
        if actual_len < table_end {
            return Err(truncated("region table", table_end));
        }
        // The table: at most 65536 entries of 48 bytes, sized by the count just checked.
        let mut table = vec![0u8; (table_end - HEADER_LEN) as usize];
        file.read_exact_at(&mut table, HEADER_LEN).map_err(|e| io_err("read region table", HEADER_LEN, e))?;
        let regions = Self::parse_table(kind, page_size, header_len, file_len, &table)?;
        // The layout must account for the header length exactly: the bitmaps of a diff and
        // nothing else follow the table.
        let mut bitmap_bytes = 0u64;
        if kind == SnapshotKind::Diff {
            for r in &regions {
                bitmap_bytes += bitmap_words(r.len, page_size) * 8;
            }
        }
        if table_end.checked_add(bitmap_bytes) != Some(header_len) {
            return Err(bad("header length does not match the table and bitmaps"));
        }
        if actual_len < header_len {
            return Err(truncated("region table", header_len));
        }
        // The header checksum, the bitmaps streamed through a fixed buffer.
        let mut c = Checksum::new();
        c.update(&head[..HEADER_CHECKSUM_OFFSET]);
        c.zeros(8);
        c.update(&head[HEADER_CHECKSUM_OFFSET + 8..]);
        c.update(&table);
        let mut chunk = [0u8; 64 << 10];
        let mut at = table_end;
        while at < header_len {
            let n = (header_len - at).min(chunk.len() as u64) as usize;
            file.read_exact_at(&mut chunk[..n], at).map_err(|e| io_err("read page bitmaps", at, e))?;
            c.update(&chunk[..n]);
            at += n as u64;
        }
        let stored = le_u64(&head, HEADER_CHECKSUM_OFFSET);
        let computed = c.finish();
        if stored != computed {
            return Err(SnapshotError::HeaderChecksum { stored, computed });
        }
        if actual_len < file_len {
            return Err(truncated("region data", file_len));
        }
        Ok(SnapshotInfo { kind, page_size, header_len, file_len, regions })
    }

    /// Reads the page bitmaps of a diff whose layout [`read_layout`](Self::read_layout)
    /// checked (a full snapshot has none): allocated fallibly, each checked to mark no page past
    /// its region's end.
    pub(crate) fn load_bitmaps(&mut self, file: &File) -> Result<(), SnapshotError> {
        if self.kind != SnapshotKind::Diff {
            return Ok(());
        }
        let mut at = HEADER_LEN + REGION_ENTRY_LEN * self.regions.len() as u64;
        for r in &mut self.regions {
            if r.pages.is_some() {
                return Ok(());
            }
            let words = bitmap_words(r.len, self.page_size) as usize;
            let mut bytes = Vec::new();
            bytes.try_reserve_exact(words * 8).map_err(|_| {
                io_err("allocate page bitmap", at, io::Error::from(io::ErrorKind::OutOfMemory))
            })?;
            bytes.resize(words * 8, 0u8);
            file.read_exact_at(&mut bytes, at).map_err(|e| io_err("read page bitmaps", at, e))?;
            let v: Vec<u64> = (0..words).map(|j| le_u64(&bytes, 8 * j)).collect();
            // Bits past the region's last page must be clear.
            let num_pages = r.len.div_ceil(self.page_size);
            if !num_pages.is_multiple_of(64) && v.last().is_some_and(|w| w >> (num_pages % 64) != 0) {
                return Err(SnapshotError::InvalidLayout {
                    reason: "page bitmap marks pages past the end of its region",
                });
            }
            r.pages = Some(v);
            at += words as u64 * 8;
        }
        Ok(())
    }

    /// Decodes and checks the region table (`count` entries of [`REGION_ENTRY_LEN`] bytes):
    /// regions in order, not overlapping, each with its data aligned, after the header area and
    /// before `file_len`, and (for a diff) its bitmap where the layout puts it.
    fn parse_table(
        kind: SnapshotKind,
        page_size: u64,
        header_len: u64,
        file_len: u64,
        table: &[u8],
    ) -> Result<Vec<SnapshotRegion>, SnapshotError> {
        let bad = |reason| Err(SnapshotError::InvalidLayout { reason });
        let count = table.len() / REGION_ENTRY_LEN as usize;
        let mut regions = Vec::with_capacity(count);
        let mut bitmap_at = HEADER_LEN + table.len() as u64;
        let mut data_end = header_len;
        let mut next_guest: Option<u64> = Some(0);
        for i in 0..count {
            let e = REGION_ENTRY_LEN as usize * i;
            let guest_addr = le_u64(table, e);
            let len = le_u64(table, e + 8);
            let region_page = le_u64(table, e + 16);
            let data_offset = le_u64(table, e + 24);
            let checksum = le_u64(table, e + 32);
            let bitmap_offset = le_u64(table, e + 40);
            if len == 0 || guest_addr.checked_add(len - 1).is_none() {
                return bad("empty region, or one that wraps the guest address space");
            }
            if next_guest.is_none_or(|n| guest_addr < n) {
                return bad("regions overlap or are out of order");
            }
            next_guest = guest_addr.checked_add(len);
            if !region_page.is_power_of_two() {
                return bad("region page size is not a power of two");
            }
            let align = region_page.max(page_size);
            if !data_offset.is_multiple_of(align) || data_offset < data_end {
                return bad("region data is misaligned or overlaps the header or another region");
            }
            data_end = match data_offset.checked_add(len) {
                Some(end) if end <= file_len => end,
                _ => return bad("region data runs past the file length"),
            };
            match kind {
                SnapshotKind::Full if bitmap_offset != 0 => return bad("a full snapshot with a page bitmap"),
                SnapshotKind::Full => {}
                SnapshotKind::Diff => {
                    if bitmap_offset != bitmap_at {
                        return bad("page bitmap out of place");
                    }
                    // Bounded: `len` fits in the file, so this is at most file_len / 32 Ki.
                    bitmap_at += bitmap_words(len, page_size) * 8;
                }
            }
            regions.push(SnapshotRegion {
                guest_addr: GuestAddress(guest_addr),
                len,
                page_size: region_page,
                data_offset,
                checksum,
                pages: None,
            });
        }
        Ok(regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(pages: Option<Vec<u64>>, len: u64) -> SnapshotRegion {
        SnapshotRegion {
            guest_addr: GuestAddress(0),
            len,
            page_size: 4096,
            data_offset: 0,
            checksum: 0,
            pages,
        }
    }

    #[test]
    fn held_runs_from_bitmaps() {
        let r = region(None, 10 * 4096 + 1);
        assert_eq!(r.held_runs(4096).collect::<Vec<_>>(), vec![(0, 11)]);
        assert_eq!(r.held_runs(0).count(), 1, "a page size of 0 divides nothing");
        assert_eq!(r.held_pages(4096), 11);
        assert!(r.holds_page(1000));
        let r = region(Some(vec![0b1011 | (1 << 63), 0b1, u64::MAX]), 192 * 4096);
        assert_eq!(r.held_runs(4096).collect::<Vec<_>>(), vec![(0, 2), (3, 1), (63, 2), (128, 64)]);
        assert_eq!(r.held_pages(4096), 2 + 1 + 2 + 64);
        assert!(r.holds_page(64) && !r.holds_page(65) && !r.holds_page(1 << 40));
        let r = region(Some(vec![u64::MAX, u64::MAX, 1, 0, 1 << 63]), 320 * 4096);
        assert_eq!(r.held_runs(4096).collect::<Vec<_>>(), vec![(0, 129), (319, 1)]);
        assert_eq!(region(Some(vec![0, 0]), 128 * 4096).held_runs(4096).count(), 0);
        assert_eq!(region(Some(vec![]), 0).held_runs(4096).count(), 0);
    }

    #[test]
    fn plan_aligns_and_encodes() {
        let info = SnapshotInfo::plan(
            SnapshotKind::Diff,
            4096,
            &[(GuestAddress(0), 0x10000, 4096), (GuestAddress(1 << 32), 2 << 20, 2 << 20)],
        )
        .unwrap();
        assert_eq!(info.header_len, 64 + 96 + 8 + 64);
        assert_eq!(info.regions[0].data_offset, 4096);
        assert_eq!(info.regions[1].data_offset, 2 << 20);
        assert_eq!(info.file_len, 4 << 20);
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(info.file_len).unwrap();
        f.write_all_at(&info.encode(), 0).unwrap();
        assert_eq!(SnapshotInfo::read(&f).unwrap(), info);
        assert!(
            SnapshotInfo::plan(SnapshotKind::Full, 4096, &[(GuestAddress(0), u64::MAX - 10, 4096)]).is_none()
        );
    }
}
