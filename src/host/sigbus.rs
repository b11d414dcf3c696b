//! Recovery from SIGBUS in file-backed guest memory.
//!
//! A mapping of a file faults with SIGBUS when it is touched past the file's end. guestmem never
//! maps past the end, and seals the memfds it makes against shrinking, but it cannot stop
//! another holder of an unsealed file (another process, code that kept a duplicate of the fd)
//! from truncating it under the mapping, nor a hugetlb pool from running dry. Without help, the
//! next access of such a page by the VMM kills the process.
//!
//! guestmem therefore installs, the first time it maps memory that can fault this way (a file,
//! a memfd, hugetlb memory), a process-wide SIGBUS handler. For a fault (`BUS_ADRERR`) inside
//! one of its regions, the handler maps zero-filled anonymous memory over the part of the region
//! the file no longer covers (or over the faulting page, for a fault below the file's end),
//! records that the region lost its backing, and returns: the access is made again and
//! succeeds, reading zeros or writing to memory no file holds any more. The region reports it
//! ([`MmapRegion::backing_lost`](crate::mmap::MmapRegion::backing_lost)), a dump of it fails,
//! and [`recovered_faults`] counts them. Every other SIGBUS (outside guestmem's regions, a
//! hardware memory error) goes to the disposition that was there before guestmem's, exactly
//! as if guestmem had installed nothing: a previous handler is called, the default action
//! kills the process.
//!
//! What this cannot help: a VMM that installs its own SIGBUS handler *after* guestmem without
//! chaining to the previous one (chain to it, as guestmem does); a thread that blocks SIGBUS
//! (the kernel then kills the process on a fault); guest accesses through KVM, which see an
//! error from `KVM_RUN` instead of a signal (guestmem's recovery also repairs those, once the
//! VMM touches the memory).
//!
//! A region built with [`MmapRegionBuilder::sigbus_recovery(false)`](crate::mmap::MmapRegionBuilder::sigbus_recovery)
//! takes no part: its faults go to the previous disposition.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::sys::signal::{self, SigAction, BUS_ADRERR};
use crate::sys::{self, MapFlags, Protection};

/// Regions per chunk of the table, and chunks at most: 65536 regions.
const CHUNK: usize = 256;
const CHUNKS: usize = 256;

/// Entry states.
const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

/// One region, as the handler needs it: written while `BUSY`, read by the handler once `LIVE`.
struct Entry {
    state: AtomicU8,
    start: AtomicUsize,
    end: AtomicUsize,
    /// The file's descriptor (kept open by the region while it is registered), or -1.
    fd: AtomicI32,
    file_start: AtomicU64,
    page_size: AtomicUsize,
    prot: AtomicI32,
    lost: AtomicBool,
}

impl Entry {
    const fn new() -> Self {
        Entry {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            fd: AtomicI32::new(-1),
            file_start: AtomicU64::new(0),
            page_size: AtomicUsize::new(0),
            prot: AtomicI32::new(0),
            lost: AtomicBool::new(false),
        }
    }
}

/// The table: chunks allocated on demand and never freed, so the handler can walk it without
/// locks while regions come and go.
static TABLE: [AtomicPtr<[Entry; CHUNK]>; CHUNKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS];
/// Where registration starts looking for a free entry.
static NEXT_FREE: AtomicUsize = AtomicUsize::new(0);
/// The disposition guestmem's handler replaced, to hand other signals to.
static PREVIOUS: OnceLock<SigAction> = OnceLock::new();
/// Whether the handler is installed (set once).
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
/// Faults recovered since the process started.
static RECOVERED: AtomicU64 = AtomicU64::new(0);

fn chunk(i: usize) -> Option<&'static [Entry; CHUNK]> {
    let p = TABLE.get(i)?.load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer comes from `Box::leak` and is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

fn entry(index: usize) -> Option<&'static Entry> {
    chunk(index / CHUNK).map(|c| &c[index % CHUNK])
}

/// Installs guestmem's SIGBUS handler (once; later calls report the first call's outcome).
/// guestmem calls it when it first maps memory that can fault; a VMM may call it earlier.
///
/// ```
/// guestmem::host::sigbus::install().unwrap();
/// assert!(guestmem::host::sigbus::is_installed());
/// ```
pub fn install() -> io::Result<()> {
    let r = INSTALLED.get_or_init(|| {
        let previous =
            signal::current_action(libc::SIGBUS).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        let _ = PREVIOUS.set(previous);
        // SAFETY: `on_sigbus` is async-signal-safe (atomics, fstat, mmap, sigaction) and hands
        // every fault it does not recover to the previous disposition.
        unsafe { signal::set_handler(libc::SIGBUS, on_sigbus) }
            .map(drop)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
    });
    r.map_err(io::Error::from_raw_os_error)
}

/// Whether guestmem's SIGBUS handler was installed.
pub fn is_installed() -> bool {
    matches!(INSTALLED.get(), Some(Ok(())))
}

/// How many SIGBUS faults in guestmem's regions were recovered since the process started.
pub fn recovered_faults() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

/// A region's entry in the table; leaving it (dropping this) happens before the region is
/// unmapped.
#[derive(Debug)]
pub(crate) struct Registration {
    index: usize,
}

impl Registration {
    /// Registers `[start, start + len)`, mapped with `prot` from `fd` at `file_start` (or
    /// anonymous hugetlb memory when `fd` is `None`) in pages of `page_size`. `fd` must stay
    /// open until the registration is dropped.
    pub(crate) fn new(
        start: *mut u8,
        len: usize,
        fd: Option<RawFd>,
        file_start: u64,
        page_size: usize,
        prot: Protection,
    ) -> io::Result<Registration> {
        let full = || {
            io::Error::new(io::ErrorKind::OutOfMemory, "the SIGBUS recovery table is full (65536 regions)")
        };
        let total = CHUNK * CHUNKS;
        let first = NEXT_FREE.load(Ordering::Relaxed) % total;
        for k in 0..total {
            let index = (first + k) % total;
            let c = index / CHUNK;
            if chunk(c).is_none() {
                let fresh: &'static mut [Entry; CHUNK] = Box::leak(Box::new([const { Entry::new() }; CHUNK]));
                // Another thread may add the chunk first: ours then stays unused (chunks are
                // never freed, so neither is this one; at most one chunk per race).
                let _ = TABLE[c].compare_exchange(
                    std::ptr::null_mut(),
                    fresh as *mut [Entry; CHUNK],
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            let e = entry(index).ok_or_else(full)?;
            if e.state.compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                e.start.store(start as usize, Ordering::Relaxed);
                e.end.store(start as usize + len, Ordering::Relaxed);
                e.fd.store(fd.unwrap_or(-1), Ordering::Relaxed);
                e.file_start.store(file_start, Ordering::Relaxed);
                e.page_size.store(page_size, Ordering::Relaxed);
                e.prot.store(prot.bits(), Ordering::Relaxed);
                e.lost.store(false, Ordering::Relaxed);
                // Release: the handler that sees LIVE sees the fields.
                e.state.store(LIVE, Ordering::Release);
                NEXT_FREE.store(index + 1, Ordering::Relaxed);
                return Ok(Registration { index });
            }
        }
        Err(full())
    }

    /// Whether a fault was recovered in the region: part of it no longer maps its file.
    pub(crate) fn lost(&self) -> bool {
        entry(self.index).is_some_and(|e| e.lost.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(e) = entry(self.index) {
            e.state.store(FREE, Ordering::Release);
            NEXT_FREE.store(self.index, Ordering::Relaxed);
        }
    }
}

/// The handler. Async-signal-safe: atomics, `fstat`, `mmap`, `sigaction`.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passed the siginfo of a SIGBUS, a fault signal.
    let (addr, code) = unsafe { signal::fault_info(info) };
    if code == BUS_ADRERR && recover(addr) {
        return;
    }
    match PREVIOUS.get() {
        // SAFETY: we are the SIGBUS handler, passing on the kernel's own arguments.
        Some(previous) => unsafe { signal::chain(previous, sig, info, context) },
        None => {
            // Cannot happen (PREVIOUS is set before the handler is installed); take the
            // default action rather than loop on the fault.
            if let Ok(dfl) = signal::current_action(libc::SIGBUS) {
                // SAFETY: as above.
                unsafe { signal::chain(&dfl, sig, info, context) };
            }
        }
    }
}

/// Maps zero pages where a registered region faulted at `addr`; whether it did.
fn recover(addr: usize) -> bool {
    for c in 0..CHUNKS {
        let Some(chunk) = chunk(c) else { break };
        for e in chunk.iter() {
            if e.state.load(Ordering::Acquire) != LIVE {
                continue;
            }
            let (start, end) = (e.start.load(Ordering::Relaxed), e.end.load(Ordering::Relaxed));
            if !(start..end).contains(&addr) {
                continue;
            }
            let page = e.page_size.load(Ordering::Relaxed).max(1);
            let fault_page = addr - (addr - start) % page;
            // Everything past the file's new end goes at once (one mapping, not one a page);
            // a fault below the end (a failed read of the backing store) only its page.
            let mut from = fault_page;
            let mut to = (fault_page + page).min(end);
            let fd = e.fd.load(Ordering::Relaxed);
            if fd >= 0 {
                // SAFETY: the region keeps its file open while its entry is live.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                if let Ok(st) = sys::fstat(fd) {
                    let covered = st.size.saturating_sub(e.file_start.load(Ordering::Relaxed));
                    let valid_end = start.saturating_add(
                        usize::try_from(covered)
                            .unwrap_or(usize::MAX)
                            .next_multiple_of(page)
                            .min(end - start),
                    );
                    if fault_page >= valid_end {
                        from = valid_end;
                        to = end;
                    }
                }
            }
            let prot = Protection::from_bits(e.prot.load(Ordering::Relaxed)).unwrap_or(Protection::READ);
            let flags = MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::FIXED | MapFlags::NORESERVE;
            // SAFETY: `[from, to)` lies inside a live region of ours, whose access faulted: the
            // pages there hold nothing any more (their file is gone), and zero-filled memory of
            // the same protection takes their place, as a concurrent write of zeros would.
            if unsafe { sys::mmap(from as *mut u8, to - from, prot, flags, None, 0) }.is_ok() {
                e.lost.store(true, Ordering::Release);
                RECOVERED.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            return false;
        }
    }
    false
}
