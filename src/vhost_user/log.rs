//! The back-end's side of the shared dirty log: [`SharedLog`], the log a front-end hands over
//! with `VHOST_USER_SET_LOG_BASE`, and [`LogBitmap`], the region bitmap that marks it.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, BitmapSlice, NewBitmap};
use crate::sys::fd::FileKind;
use crate::sys::{self, MapFlags, Protection, Seals};

use super::LogDesc;

/// The size of a page of the log: one bit stands for 4 KiB of guest-physical memory
/// (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;

/// The largest log a back-end maps: 8 GiB, one bit per 4 KiB page of the first 256 TiB of
/// guest-physical address space. It is also the address space the back-end reserves for logs.
pub const MAX_LOG_BYTES: u64 = 1 << 33;

/// Bits of the state word that hold the log's number of 64-bit words (0: no log).
const WORDS_BITS: u32 = 40;
const WORDS_MASK: u64 = (1 << WORDS_BITS) - 1;
const _: () = assert!(MAX_LOG_BYTES / 8 <= WORDS_MASK);

/// Errors of the shared dirty log, on the back-end's side (a log a front-end handed over) and
/// on the VMM's ([`DirtyLog`](crate::vhost_user::DirtyLog)).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A log message whose payload has the wrong length.
    #[error("log message payload of {len} bytes, {expected} expected")]
    Payload {
        /// Bytes received.
        len: usize,
        /// Bytes the message has.
        expected: usize,
    },
    /// The log's descriptor is not a regular file (or memfd): a socket, a pipe, a device.
    #[error("the log descriptor is a {kind:?}, not a regular file or memfd")]
    NotAFile {
        /// What it is.
        kind: FileKind,
    },
    /// The log's file is not sealed against shrinking: its holder could truncate it under the
    /// mapping, and the next mark would raise SIGBUS.
    #[error("the log file is not sealed against shrinking (seals {seals:?})")]
    Unsealed {
        /// The seals it has.
        seals: Seals,
    },
    /// The log's file is sealed against writes: it cannot be mapped writable.
    #[error("the log file is sealed against writing (seals {seals:?})")]
    WriteSealed {
        /// The seals it has.
        seals: Seals,
    },
    /// A log offset that is not a multiple of the page size.
    #[error("log offset {offset:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// The offset.
        offset: u64,
        /// The page size.
        page_size: u64,
    },
    /// A log smaller than one 64-bit word.
    #[error("a log of {size} bytes holds no 64-bit word")]
    TooSmall {
        /// Its size.
        size: u64,
    },
    /// A log larger than [`MAX_LOG_BYTES`].
    #[error("a log of {size:#x} bytes is larger than the maximum of {max:#x}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// A log that ends past the end of its file (or whose end overflows).
    #[error("log of {size:#x} bytes at offset {offset:#x} does not fit in its file of {file_size:#x} bytes")]
    FileTooShort {
        /// The file's size.
        file_size: u64,
        /// The log's offset in it.
        offset: u64,
        /// The log's size.
        size: u64,
    },
    /// A log that does not cover all of guest memory: writes past its end could not be logged.
    #[error("the log covers guest addresses below {covers:#x}, memory ends at {needed:#x}")]
    DoesNotCover {
        /// The first guest address past the log's last page.
        covers: u64,
        /// The first guest address past guest memory.
        needed: u64,
    },
    /// A region whose dirty tracking is off: the log's bits for it could not be merged.
    #[error("the region at {region} has no dirty tracking to merge the log into")]
    NotTracking {
        /// The region's guest address.
        region: GuestAddress,
    },
    /// A region whose bitmap does not have the log's 4 KiB pages.
    #[error("the bitmap of the region at {region} has pages of {page_size} bytes, the log has 4096")]
    PageSize {
        /// The region's guest address.
        region: GuestAddress,
        /// Its bitmap's page size.
        page_size: usize,
    },
    /// A region that extends past the log: the back-end could not log writes to all of it.
    #[error("the region at {region} ends at {end:#x}, past the log's end at {covers:#x}")]
    RegionOutsideLog {
        /// The region's guest address.
        region: GuestAddress,
        /// The first guest address past the region.
        end: u64,
        /// The first guest address past the log.
        covers: u64,
    },
    /// Handing a new log over to the back-end failed (it was not acknowledged): the old log
    /// stays in use.
    #[error("handing the new log over failed: {0}")]
    Handover(#[source] io::Error),
    /// A system call failed (`fstat`, `F_GET_SEALS`, `memfd_create`, `mmap`, ...).
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// The log in use, as the control side knows it.
struct Attached {
    /// Keeps the file open while it is mapped (a mapping would keep it alive anyway; this makes
    /// the restore after a failed switch possible).
    fd: OwnedFd,
    desc: LogDesc,
    /// Bytes of the window the log is mapped over (its size rounded up to pages).
    map_len: usize,
}

/// What the control side (attach, detach) changes, under a lock.
struct Control {
    current: Option<Attached>,
    /// The first `rw_len` bytes of the window are mapped readable and writable (a log, or
    /// anonymous memory where a log used to be); the rest is `PROT_NONE`.
    rw_len: usize,
    generation: u64,
}

/// The dirty log a vhost-user front-end shared with this back-end, as every region of a
/// [`BackendMemory`](crate::vhost_user::BackendMemory) marks it.
///
/// Created by the back-end memory; a device marks it through its writes to guest memory (the
/// regions' [`LogBitmap`]s), or explicitly with [`mark`](Self::mark) (a used ring logged at
/// the `log_guest_addr` the front-end gave).
///
/// # Layout
///
/// The log is the front-end's memory: bit `p % 64` of 64-bit word `p / 64` stands for the 4 KiB
/// page `p` of guest-physical address space (the spec's `log[p / 8] |= 1 << p % 8` on a
/// little-endian machine), from guest address 0 up. Every region of a back-end memory carries
/// a [`LogBitmap`] that knows the region's first
/// guest page, so a write through guestmem marks exactly the guest pages it wrote with one
/// atomic OR per 64-page word it touches, as an [`AtomicBitmap`](crate::AtomicBitmap) does.
///
/// # Swapping logs without losing a bit
///
/// The front-end may replace the log at any time (a larger one after memory hotplug, a fresh one
/// for the next migration), and it harvests and frees the old log once the back-end has
/// acknowledged the new one. Device threads mark concurrently, so the switch must guarantee:
/// once [`set_log_base`](crate::vhost_user::BackendMemory::set_log_base) has returned (and the
/// acknowledgement gone out), no mark lands only in the old log. The scheme:
///
/// - All logs live at one fixed place: a window of address space reserved once
///   ([`MAX_LOG_BYTES`], `PROT_NONE` until used). A new log is mapped over the start of the
///   window (`MAP_FIXED`), so a marker still using the old log's word count writes into the new
///   log at the right bit (the layout is the same), or, past the new log's end, into the old
///   log's pages, which stay mapped until the switch is done.
/// - The current log is one atomic word: a generation (bumped on every change) and the number
///   of words. A mark loads it, ORs its bits, and loads it again; if it changed, it ORs again
///   with the new value, until the value it used is still current after its OR.
/// - After publishing the new value, `attach` maps anonymous memory over what the old log held
///   beyond the new one: the old log's pages are released, and a late marker's stray OR there
///   is harmless (it sees the change and marks the new log).
///
/// Why no bit is lost: a mark that read the old value and still reads it after its OR made that
/// OR before the new value was published (all three operations are `SeqCst`; on x86 the OR is
/// the same `lock or` a `Release` one is, and the loads plain loads), hence before the
/// acknowledgement, hence before the front-end's final harvest of the old log (which takes
/// words with `SeqCst` swaps); any later mark reads the new value and marks the new log.
/// Nothing below the part of the window that was ever mapped is unmapped while the log lives,
/// so no marker can fault. `tests/vhost_user.rs` writes every page once, from another process,
/// while logs are swapped back to back, and finds every page in the union of the harvests.
///
/// The log must be a regular file (a memfd) sealed against shrinking (`F_SEAL_SHRINK`, as QEMU
/// and guestmem's own [`DirtyLog`](crate::vhost_user::DirtyLog) seal it): a front-end that could
/// truncate it would make the back-end's next mark a SIGBUS.
pub struct SharedLog {
    /// Generation (high bits) and number of words of the current log (low bits; 0 = none).
    state: AtomicU64,
    /// The reserved window: [`MAX_LOG_BYTES`] of address space, owned by this log.
    window: *mut u8,
    control: Mutex<Control>,
}

// SAFETY: the window is owned by the log and only ever accessed through atomics (marks) or by
// the control side under its mutex (mappings); the pointer is never handed out.
unsafe impl Send for SharedLog {}
// SAFETY: as above.
unsafe impl Sync for SharedLog {}

impl fmt::Debug for SharedLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedLog").field("covers", &self.covers()).finish_non_exhaustive()
    }
}

const WINDOW: usize = MAX_LOG_BYTES as usize;

impl SharedLog {
    /// A log with nothing attached (marks are dropped until a log is attached), and its window
    /// of address space reserved.
    pub(crate) fn new() -> Result<Arc<Self>, LogError> {
        // SAFETY: a new private PROT_NONE mapping where the kernel chooses: it replaces nothing.
        let window = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                WINDOW,
                Protection::NONE,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE,
                None,
                0,
            )
        }
        .map_err(|source| LogError::Os { op: "reserving the log window", source })?;
        Ok(Arc::new(SharedLog {
            state: AtomicU64::new(0),
            window,
            control: Mutex::new(Control { current: None, rw_len: 0, generation: 0 }),
        }))
    }

    /// The first guest address the log does not cover (0 when no log is attached).
    ///
    /// ```
    /// let backend = guestmem::vhost_user::BackendMemory::new().unwrap();
    /// assert_eq!(backend.log().covers(), 0);
    /// assert!(!backend.log().is_logging());
    /// ```
    pub fn covers(&self) -> u64 {
        (self.state.load(Ordering::SeqCst) & WORDS_MASK) * 64 * LOG_PAGE_SIZE
    }

    /// Whether a log is attached (the front-end turned logging on).
    pub fn is_logging(&self) -> bool {
        self.state.load(Ordering::SeqCst) & WORDS_MASK != 0
    }

    /// Marks the guest range `[addr, addr + len)` dirty in the log: for writes made other
    /// than through guestmem, or a used ring logged at the `log_guest_addr` of its vring
    /// address message. Pages past the log's end are not marked; with no log attached,
    /// nothing is.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// use guestmem::vhost_user::{BackendMemory, DirtyLog};
    /// use guestmem::GuestAddress;
    /// let backend = BackendMemory::new().unwrap();
    /// let mut log = DirtyLog::new(1 << 20).unwrap(); // the VMM's log, for the first 1 MiB
    /// let fd = log.fd().try_clone_to_owned().unwrap(); // as SCM_RIGHTS would deliver it
    /// backend.set_log_base(fd, &log.desc()).unwrap();
    /// backend.log().mark(GuestAddress(0x3000), 0x1001); // pages 3 and 4
    /// assert_eq!(log.dirty_page_count(), 2);
    /// ```
    pub fn mark(&self, addr: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let last = addr.0.saturating_add(len - 1);
        self.mark_pages(addr.0 / LOG_PAGE_SIZE, last / LOG_PAGE_SIZE);
    }

    /// Whether guest page `page` (of [`LOG_PAGE_SIZE`]) is dirty in the log now.
    pub fn is_page_dirty(&self, page: u64) -> bool {
        let words = self.state.load(Ordering::SeqCst) & WORDS_MASK;
        page / 64 < words && self.word(page / 64).load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// Sets the bits of guest pages `first..=last` in the current log, and again in the next
    /// one if the log changed meanwhile (see the module docs).
    #[inline]
    pub(crate) fn mark_pages(&self, first: u64, last: u64) {
        let mut state = self.state.load(Ordering::SeqCst);
        loop {
            let words = state & WORDS_MASK;
            if words == 0 {
                return;
            }
            self.or_pages(words, first, last);
            let now = self.state.load(Ordering::SeqCst);
            if now == state {
                return;
            }
            state = now;
        }
    }

    /// ORs the bits of pages `first..=last` into a log of `words` words (clipped to it).
    #[inline(always)]
    fn or_pages(&self, words: u64, first: u64, last: u64) {
        let first_word = first / 64;
        if first_word >= words {
            return;
        }
        let last_word = last / 64;
        let head = u64::MAX << (first % 64);
        let tail = u64::MAX >> (63 - last % 64);
        if first_word == last_word {
            self.word(first_word).fetch_or(head & tail, Ordering::SeqCst);
            return;
        }
        self.word(first_word).fetch_or(head, Ordering::SeqCst);
        let end = last_word.min(words);
        for w in first_word + 1..end {
            self.word(w).fetch_or(u64::MAX, Ordering::SeqCst);
        }
        if last_word < words {
            self.word(last_word).fetch_or(tail, Ordering::SeqCst);
        }
    }

    /// Word `index` of the window, which must be below the word count of a state that was
    /// published (so inside the part of the window that is mapped readable and writable).
    #[inline(always)]
    fn word(&self, index: u64) -> &AtomicU64 {
        debug_assert!(index < MAX_LOG_BYTES / 8);
        // SAFETY: `index` is below the word count of a published state, which never exceeds
        // `MAX_LOG_BYTES / 8`, so the address is inside the window and 8-byte aligned (the
        // window is page aligned). Every byte below the largest log ever attached stays mapped
        // readable and writable for the life of `self` (a log, or anonymous memory where one
        // was), and `&self` borrows that life. The memory is only ever accessed atomically here
        // and by the front-end; an `AtomicU64` is valid for any bit pattern.
        unsafe { AtomicU64::from_ptr(self.window.add(index as usize * 8).cast()) }
    }

    /// Attaches the log `fd` at `desc` in place of the current one (see the module docs for
    /// the switch), after checking the file: a regular file, sealed against shrinking and not
    /// against writing, long enough, the offset page aligned, at least one word, at most
    /// [`MAX_LOG_BYTES`], and covering guest addresses below `needed`. On error the current
    /// log stays attached and `fd` is closed.
    pub(crate) fn attach(&self, fd: OwnedFd, desc: &LogDesc, needed: u64) -> Result<(), LogError> {
        let page = sys::page_size() as u64;
        let os = |op| move |source| LogError::Os { op, source };
        let st = sys::fstat(fd.as_fd()).map_err(os("fstat of the log"))?;
        if st.kind != FileKind::Regular {
            return Err(LogError::NotAFile { kind: st.kind });
        }
        let seals = match sys::fd::get_seals(fd.as_fd()) {
            Ok(seals) => seals,
            // Files that cannot be sealed have none.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Seals::empty(),
            Err(source) => return Err(LogError::Os { op: "F_GET_SEALS of the log", source }),
        };
        if !seals.contains(Seals::SHRINK) {
            return Err(LogError::Unsealed { seals });
        }
        if seals.contains(Seals::WRITE) || seals.contains(Seals::FUTURE_WRITE) {
            return Err(LogError::WriteSealed { seals });
        }
        if !desc.offset.is_multiple_of(page) {
            return Err(LogError::Unaligned { offset: desc.offset, page_size: page });
        }
        if desc.size < 8 {
            return Err(LogError::TooSmall { size: desc.size });
        }
        if desc.size > MAX_LOG_BYTES {
            return Err(LogError::TooLarge { size: desc.size, max: MAX_LOG_BYTES });
        }
        if desc.offset.checked_add(desc.size).is_none_or(|end| end > st.size) {
            return Err(LogError::FileTooShort { file_size: st.size, offset: desc.offset, size: desc.size });
        }
        let words = desc.size / 8;
        let covers = words * 64 * LOG_PAGE_SIZE;
        if covers < needed {
            return Err(LogError::DoesNotCover { covers, needed });
        }
        // <= MAX_LOG_BYTES, a multiple of the page size: inside the window.
        let map_len = desc.size.next_multiple_of(page) as usize;

        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        // A trial mapping where the kernel chooses first: whatever makes the kernel refuse this
        // file (a read-only descriptor, a filesystem without mmap) is found before the window
        // changes.
        // SAFETY: a new shared mapping where the kernel chooses: it replaces nothing.
        let trial = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                map_len,
                Protection::READ_WRITE,
                MapFlags::SHARED,
                Some(fd.as_fd()),
                desc.offset,
            )
        }
        .map_err(os("mmap of the log"))?;
        // SAFETY: the trial mapping was made just above and nothing else knows of it.
        let _ = unsafe { sys::munmap(trial, map_len) };
        // SAFETY: MAP_FIXED over the start of our own window. What it replaces (the previous
        // log, anonymous memory, or PROT_NONE space) is only ever accessed atomically; a marker
        // still using the previous word count now sets its bits in the new log, at the same
        // places (the layout does not change).
        let mapped = unsafe {
            sys::mmap(
                self.window,
                map_len,
                Protection::READ_WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                Some(fd.as_fd()),
                desc.offset,
            )
        };
        if let Err(source) = mapped {
            // Kernels before 6.12 may unmap the range before failing: put back what was there.
            self.restore(&control, 0, map_len);
            return Err(LogError::Os { op: "mmap of the log", source });
        }
        control.generation += 1;
        let state = (control.generation << WORDS_BITS) | words;
        self.state.store(state, Ordering::SeqCst);
        // The previous log's pages past the new log's end: released, the range kept writable.
        if control.rw_len > map_len {
            let (from, len) = (map_len, control.rw_len - map_len);
            if self.fill_anonymous(from, len).is_err() {
                self.restore(&control, from, len);
            }
        }
        control.rw_len = control.rw_len.max(map_len);
        control.current = Some(Attached { fd, desc: *desc, map_len });
        Ok(())
    }

    /// Detaches the log (the front-end turned logging off): later marks do nothing, and the
    /// log's pages are released.
    pub(crate) fn detach(&self) {
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if control.current.is_none() {
            return;
        }
        control.generation += 1;
        self.state.store(control.generation << WORDS_BITS, Ordering::SeqCst);
        let rw_len = control.rw_len;
        if self.fill_anonymous(0, rw_len).is_err() {
            // The old log stays mapped (and its descriptor open): nothing faults.
            self.restore(&control, 0, rw_len);
            return;
        }
        control.current = None;
    }

    /// The log attached now, as the front-end described it.
    pub fn desc(&self) -> Option<LogDesc> {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).current.as_ref().map(|a| a.desc)
    }

    /// Maps anonymous, writable, zero memory over `[from, from + len)` of the window.
    fn fill_anonymous(&self, from: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: MAP_FIXED over part of our own window (from + len <= rw_len <= WINDOW), which
        // only atomics access: a marker racing with it writes into the old pages or the new
        // zero ones, and sees the new state afterwards.
        unsafe {
            sys::mmap(
                self.window.add(from),
                len,
                Protection::READ_WRITE,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED | MapFlags::NORESERVE,
                None,
                0,
            )
        }
        .map(drop)
    }

    /// After a failed `MAP_FIXED` over `[from, from + len)` of the window: maps back what the
    /// range held (the current log where it reaches, anonymous memory up to `rw_len`, then
    /// `PROT_NONE`), so the part markers may use is never left unmapped and the window never
    /// has a hole another mapping could take.
    fn restore(&self, control: &Control, from: usize, len: usize) {
        let end = (from + len).min(control.rw_len);
        if end < from + len {
            let at = end.max(from);
            // SAFETY: MAP_FIXED over part of our own window, past everything markers use.
            let _ = unsafe {
                sys::mmap(
                    self.window.add(at),
                    from + len - at,
                    Protection::NONE,
                    MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED | MapFlags::NORESERVE,
                    None,
                    0,
                )
            };
        }
        let mut at = from;
        if let Some(cur) = &control.current {
            let log_end = cur.map_len.min(end);
            if at < log_end {
                // SAFETY: as in `attach`: our own window, the log that was mapped there.
                let _ = unsafe {
                    sys::mmap(
                        self.window.add(at),
                        log_end - at,
                        Protection::READ_WRITE,
                        MapFlags::SHARED | MapFlags::FIXED,
                        Some(cur.fd.as_fd()),
                        cur.desc.offset + at as u64,
                    )
                };
                at = log_end;
            }
        }
        if at < end {
            let _ = self.fill_anonymous(at, end - at);
        }
    }
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        // SAFETY: the window is ours; every bitmap that could mark it holds an `Arc` to `self`,
        // so none is left.
        let _ = unsafe { sys::munmap(self.window, WINDOW) };
    }
}

/// The bitmap of a back-end's region: marks go to the front-end's [`SharedLog`], at the
/// region's guest pages.
///
/// A region of a [`BackendMemory`](crate::vhost_user::BackendMemory) is built with one and
/// bound to the memory's log at the region's guest address; a mark then costs what an
/// [`AtomicBitmap`](crate::AtomicBitmap) mark costs (one atomic OR per 64-page word, plus two
/// loads of the log's state). While no log is attached (logging off), marks do nothing, as the
/// protocol says. A `LogBitmap` made by [`NewBitmap::with_len`] outside a back-end memory is
/// bound to no log and marks nothing.
///
/// ```
/// use guestmem::bitmap::{Bitmap, NewBitmap};
/// use guestmem::vhost_user::LogBitmap;
/// let unbound = LogBitmap::with_len(8192);
/// unbound.mark_dirty(0, 8192);
/// assert!(!unbound.is_bound() && !unbound.dirty_at(0));
/// ```
pub struct LogBitmap {
    byte_len: usize,
    binding: OnceLock<Binding>,
}

struct Binding {
    log: Arc<SharedLog>,
    /// The guest page of the region's first byte.
    first_page: u64,
}

impl fmt::Debug for LogBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogBitmap")
            .field("len", &self.byte_len)
            .field("first_page", &self.binding.get().map(|b| b.first_page))
            .finish()
    }
}

impl LogBitmap {
    /// Binds the bitmap to `log` for a region at `base` (once; the region is not yet shared).
    pub(crate) fn bind(&self, log: Arc<SharedLog>, base: GuestAddress) {
        let _ = self.binding.set(Binding { log, first_page: base.0 / LOG_PAGE_SIZE });
    }

    /// Whether the bitmap marks a log (it belongs to a region of a back-end memory).
    pub fn is_bound(&self) -> bool {
        self.binding.get().is_some()
    }

    /// The bytes covered: the region's length.
    pub fn len(&self) -> usize {
        self.byte_len
    }

    /// Whether the bitmap covers no byte.
    pub fn is_empty(&self) -> bool {
        self.byte_len == 0
    }

    #[inline]
    fn mark_bytes(&self, offset: usize, len: usize) {
        if len == 0 || offset >= self.byte_len {
            return;
        }
        let Some(b) = self.binding.get() else { return };
        let last = offset.saturating_add(len - 1).min(self.byte_len - 1);
        b.log.mark_pages(
            b.first_page + (offset as u64 / LOG_PAGE_SIZE),
            b.first_page + (last as u64 / LOG_PAGE_SIZE),
        );
    }

    #[inline]
    fn byte_dirty(&self, offset: usize) -> bool {
        match self.binding.get() {
            Some(b) if offset < self.byte_len => {
                b.log.is_page_dirty(b.first_page + offset as u64 / LOG_PAGE_SIZE)
            }
            _ => false,
        }
    }
}

impl Bitmap for LogBitmap {
    type Slice<'a> = LogBitmapSlice<'a>;

    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark_bytes(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.byte_dirty(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> LogBitmapSlice<'_> {
        LogBitmapSlice { bitmap: self, base: offset }
    }
}

impl NewBitmap for LogBitmap {
    /// A bitmap bound to no log (a back-end memory binds the ones of its regions).
    fn with_len(len: usize) -> Self {
        LogBitmap { byte_len: len, binding: OnceLock::new() }
    }
}

/// A [`LogBitmap`] seen from byte `base` of its region: what the slices of a back-end's guest
/// memory carry.
#[derive(Clone, Copy, Debug)]
pub struct LogBitmapSlice<'a> {
    bitmap: &'a LogBitmap,
    base: usize,
}

impl BitmapSlice for LogBitmapSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.bitmap.mark_bytes(self.base.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bitmap.byte_dirty(self.base.saturating_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        LogBitmapSlice { bitmap: self.bitmap, base: self.base.saturating_add(offset) }
    }
}
