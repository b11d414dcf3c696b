//! Post-copy: the destination resumes the guest before the last pages arrived, and asks the
//! source for each page it touches.
//!
//! # The protocol
//!
//! The source ([`Precopy::postcopy`](super::Precopy::postcopy)), paused after its pre-copy
//! rounds (or none), does not send a final round. It harvests what is still dirty, the *stale*
//! pages (the destination has an older copy of them, or none), and sends, after an end of
//! round:
//!
//! 1. a post-copy start frame (type 6): `a` runs, `b` pages in all, `c` 0, then the runs (16
//!    bytes each, as in a pages frame, of kind data): ascending, not overlapping, each in one
//!    region;
//! 2. the device state frame (type 5) with the vCPUs' state: the destination resumes the guest
//!    from it;
//! 3. the stale pages, in pages frames (each page once; data or zero runs), the ones the
//!    destination asked for first, the others in address order between requests;
//! 4. an end of round, the checksums (stream digests only: the guest runs at the destination,
//!    so there is no single moment to compare memory contents at), done.
//!
//! The destination ([`Receiver::receive_or_postcopy`](super::Receiver::receive_or_postcopy))
//! reads the stream up to the device state, then [`PostcopyStart::start`]: drops its copy of
//! every stale page (`MADV_DONTNEED`), registers its memory with a userfaultfd and returns,
//! and the guest may run. A handler thread answers faults: a stale page not yet arrived is
//! asked for on the *return path*, and the thread waits until the page arrives; any other
//! missing page is a page the pre-copy left absent because it is zero, and gets a zero page at
//! once. A second thread reads the rest of the stream and places each page with `UFFDIO_COPY`
//! (which wakes the threads waiting on it) after hashing the bytes it places. The receiver
//! checks that every page of the stream is a stale page not yet placed, and that the checksums
//! come only once every stale page is there; then the digests are compared as in any
//! migration.
//!
//! ## Keeping the pause short
//!
//! Two things would otherwise fall into the pause: the destination still working through the
//! last round's data (a socket's buffers hold megabytes), and dropping its copies of the stale
//! pages (about a microsecond per run of pages). So, while the guest still runs at the source:
//!
//! - [`Precopy::wait_for_destination`](super::Precopy::wait_for_destination) waits until the
//!   destination acknowledged every round (the receiver acknowledges on the return path given
//!   to [`Receiver::set_return_path`](super::Receiver::set_return_path));
//! - [`Precopy::discard_round`](super::Precopy::discard_round) harvests the pages dirtied so
//!   far and sends them in a *discard frame* (type 7, laid out as the post-copy start frame):
//!   the destination drops them at once, and they belong to the stale set. A round or two, each
//!   followed by a wait, leave the pause only the last few milliseconds' pages. After a discard
//!   frame the stream may only go on with discard frames and the post-copy start (whose run
//!   list may then be empty): no data round, no checksums.
//!
//! The return path carries 8-byte little-endian messages, told apart by their low 12 bits: 0,
//! a page request (the value is the page's guest address); 1, end of round `value >> 12`
//! applied; 2, discard frame number `value >> 12` (from 1) applied. On TCP, set `TCP_NODELAY`
//! at both ends: these messages and the frames of the switch are small, and Nagle's algorithm
//! with delayed acknowledgements holds each back for tens of milliseconds (measured: 40 ms per
//! discard round without it). The source reads the return path to its end before it closes
//! (a TCP socket closed with unread bytes resets the connection).
//!
//! The example `live_migration --postcopy` does all of this with a KVM guest; on the project's
//! 2-core machine the guest ran on the destination 2.3–5.2 ms after the source paused (1 GiB,
//! round 0 then three discard rounds).
//!
//! # When it fails
//!
//! Post-copy cannot roll back: once the destination guest ran, the guest's state is split
//! between the source's memory (the pages not yet sent) and the destination's vCPUs and memory
//! (what it did since). If the stream breaks, the source is gone, or a check fails,
//! [`PostcopyDestination::wait`] returns the error and every stale page that did not arrive
//! is *poisoned* (`UFFDIO_POISON`, which post-copy requires: Linux 6.6): a guest access to one is an exit
//! the VMM sees (an MMIO exit at that address on the project's machine), a host access raises
//! `SIGBUS`; none reads as a silent zero. The VMM must then stop the destination guest for
//! good and report the migration lost; it may resume the source only if it knows the
//! destination guest never ran (a failure before it resumed the vCPUs). On the source,
//! [`Precopy::postcopy`](super::Precopy::postcopy) returns the error; the source's memory is
//! still whole.
//!
//! The destination's memory must be private anonymous memory with whole pages (what
//! [`GuestMemoryMmap::from_ranges`] makes); dirty tracking does not see the pages placed by
//! the handler (they hold the source's contents, as after a receive), only later writes.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::page_hash::{self, PAGE};
use super::receive::{Destination, ReceiveSummary, Receiver};
use super::{MigrationError, Result, FRAME_CHECKSUMS, FRAME_DONE, FRAME_END_OF_ROUND, FRAME_PAGES};
use crate::bitmap::Bitmap;
use crate::bytes::{le_u32, le_u64};
use crate::memory::{GuestMemory, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;
use crate::sys::uffd::{self, Features, Ioctls, OpenVia, RegisterMode, Uffd, UffdEvent};

/// The most runs a post-copy start frame may list (4 Mi runs: every other page of 32 GiB).
pub const MAX_POSTCOPY_RUNS: u64 = 1 << 22;

/// Bytes of a page request on the return path.
pub const REQUEST_LEN: usize = 8;

/// Bytes of page data read and placed at once.
const PLACE_BATCH: usize = 256 << 10;

/// One stale run: guest address and pages.
pub(super) type StaleRun = (u64, u64);

/// What a stream brought when it ended (`Complete`) or switched to post-copy (`Postcopy`).
#[derive(Debug)]
pub enum Received {
    /// The whole migration: memory verified, nothing left (see
    /// [`Receiver::take_device_state`](super::Receiver::take_device_state)).
    Complete(ReceiveSummary),
    /// The source switched to post-copy: the stale pages are still to come.
    Postcopy(PostcopyStart),
}

/// The destination at the switch to post-copy: the pre-copy's pages are in memory, the device
/// state has arrived, the stale pages are still at the source.
///
/// Nothing may touch the memory until [`start`](Self::start) returns: the pages of the
/// discard frames read as zeros and those of the switch as their old copies until then, and a
/// discarded page touched now is there when its data arrives, which fails the post-copy
/// (`UFFDIO_COPY` finds it: `EEXIST`).
#[derive(Debug)]
pub struct PostcopyStart {
    pub(super) dest: Destination,
    /// The runs of the post-copy start frame: still in memory, dropped by `start`.
    pub(super) stale: Vec<StaleRun>,
    /// The runs of the discard frames before it: dropped already.
    pub(super) discarded: Vec<StaleRun>,
    pub(super) state: Vec<u8>,
    pub(super) summary: ReceiveSummary,
}

/// How the post-copy phase went, from [`PostcopyDestination::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopySummary {
    /// The pre-copy rounds and the post-copy pages together, verified.
    pub receive: ReceiveSummary,
    /// Stale pages (4 KiB) the source had to send after the switch.
    pub stale_pages: u64,
    /// Of those, the pages the destination asked for (a fault waited on them).
    pub requested_pages: u64,
    /// Missing pages that were zero (left absent by the pre-copy) and got a zero page on fault.
    pub zero_faults: u64,
    /// From [`PostcopyStart::start`] to the last stale page placed.
    pub duration: Duration,
}

impl PostcopyStart {
    /// The device state the source sent with the switch (the guest resumes from it).
    pub fn device_state(&self) -> &[u8] {
        &self.state
    }

    /// The stale pages (4 KiB) still to come: those of the discard frames and of the
    /// post-copy start, counted once.
    pub fn stale_pages(&self) -> u64 {
        union_pages(&self.stale, &self.discarded)
    }

    /// Drops the destination's copy of every stale page, registers `mem` (the memory the
    /// stream was received into) with a userfaultfd and returns at once: the guest may run.
    /// Two threads serve it until every stale page arrived: one answers faults (a request on
    /// `requests`, the return path to the source, for a stale page; a zero page for any other
    /// missing one), one reads the rest of the stream from `receiver` and places its pages.
    ///
    /// Fails before touching memory if `mem` is not the memory the stream was received into
    /// (another layout, or the same layout at other host addresses), not private anonymous
    /// memory of whole pages, or the kernel lacks userfaultfd or its `UFFDIO_POISON` (Linux 6.6)
    /// ([`MigrationError::Postcopy`], [`MigrationError::Io`]).
    pub fn start<R, W, B>(
        self,
        receiver: Receiver<R>,
        mem: &GuestMemoryMmap<B>,
        requests: W,
    ) -> Result<PostcopyDestination>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
        B: Bitmap + Send + Sync + 'static,
    {
        let regions = Regions::of(mem)?;
        if !self.dest.same_layout(mem) {
            return Err(MigrationError::Postcopy("the memory is not the one the stream was received into"));
        }
        let uffd =
            Arc::new(Uffd::open(OpenVia::Any, Features::empty()).map_err(io_err("opening a userfaultfd"))?);
        let state = Arc::new(State::new(&regions, &self.stale, &self.discarded));
        let started = Instant::now();
        // The threads start first (a thread takes a while to be scheduled on a busy host); the
        // stream thread waits for the stale pages to be dropped before it places any.
        let (stop_tx, stop_rx) = UnixStream::pair().map_err(io_err("making the handler's stop socket"))?;
        let faults = {
            let (uffd, state, regions) = (uffd.clone(), state.clone(), regions.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || serve_faults(&uffd, &state, &regions, requests, &stop_rx))
                .map_err(io_err("starting the post-copy fault thread"))?
        };
        let stop_faults = |faults: JoinHandle<()>| {
            let _ = (&stop_tx).write_all(&[1]);
            let _ = faults.join();
        };
        let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
        let stream = {
            let (uffd, state, regions, mem) = (uffd.clone(), state.clone(), regions.clone(), mem.clone());
            let stop = match stop_tx.try_clone() {
                Ok(stop) => stop,
                Err(e) => {
                    stop_faults(faults);
                    return Err(MigrationError::Io { op: "making the handler's stop socket", source: e });
                }
            };
            let (dest, summary) = (self.dest, self.summary);
            let spawned = std::thread::Builder::new().name("postcopy-stream".into()).spawn(move || {
                if go_rx.recv() != Ok(true) {
                    return Err(MigrationError::Postcopy("post-copy did not start"));
                }
                let mut receiver = receiver;
                let result = receive_stale(&mut receiver, &mem, &dest, summary, &uffd, &state, &regions);
                if result.is_err() {
                    poison_missing(&uffd, &state, &regions);
                    return result.map(|s| (s, started.elapsed()));
                }
                let took = started.elapsed();
                // Every page is there: the memory is ordinary memory again, and the fault
                // thread ends (closing the return path) at once.
                state.finished.store(true, Ordering::Release);
                for r in regions.0.iter() {
                    let _ = uffd.unregister(r.host as *mut u8, r.len as usize);
                }
                let _ = (&stop).write_all(&[1]);
                drop(receiver);
                result.map(|s| (s, took))
            });
            match spawned {
                Ok(t) => t,
                Err(e) => {
                    stop_faults(faults);
                    return Err(MigrationError::Io { op: "starting the post-copy stream thread", source: e });
                }
            }
        };
        let fail =
            |faults: JoinHandle<()>, stream: JoinHandle<_>, registered: &[RegionInfo], e: MigrationError| {
                // Nothing ran yet: unregistering leaves the memory as it was (less the stale pages
                // dropped so far).
                for r in registered {
                    let _ = uffd.unregister(r.host as *mut u8, r.len as usize);
                }
                let _ = go_tx.send(false);
                let _ = stream.join();
                stop_faults(faults);
                Err(e)
            };
        // Register first, then drop the stale copies: a page dropped is missing at once.
        for (i, r) in regions.0.iter().enumerate() {
            // SAFETY: the range is a region of `mem`, which the caller gave us to fill: its
            // stale pages are exactly the pages this module places, and every other missing
            // page gets a zero page, as it would without the registration. The handler keeps
            // `mem` (a clone of its regions) mapped until the fd is closed.
            match unsafe { uffd.register(r.host as *mut u8, r.len as usize, RegisterMode::MISSING) } {
                Ok(ioctls)
                    if ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE | Ioctls::POISON) => {}
                Ok(_) => {
                    // Without POISON a page that never arrives could only wait forever or turn
                    // into zeros once the userfaultfd is closed.
                    let e = MigrationError::Postcopy(
                        "the kernel's userfaultfd lacks UFFDIO_COPY, ZEROPAGE or POISON (Linux 6.6) for this memory",
                    );
                    return fail(faults, stream, &regions.0[..=i], e);
                }
                Err(e) => {
                    let e = MigrationError::Io { op: "registering memory with the userfaultfd", source: e };
                    return fail(faults, stream, &regions.0[..i], e);
                }
            }
        }
        // Private anonymous memory (checked): dropping a page makes it missing. One call per
        // 1024 runs where the kernel batches them.
        let ranges: Vec<(*mut u8, usize)> = self
            .stale
            .iter()
            .map(|&(addr, pages)| {
                let (_, host) = regions.by_guest(addr).expect("stale runs were checked against the memory");
                (host as *mut u8, (pages * PAGE as u64) as usize)
            })
            .collect();
        // SAFETY: every range lies in a region of `mem` (the runs were checked against it),
        // which is ours to fill; guest memory is only ever accessed through volatile accesses
        // and raw copies, never references, so its pages going missing (to be placed by the
        // handler) is the same as a concurrent write.
        if let Err(e) = unsafe { crate::sys::mman::madvise_ranges(&ranges, crate::sys::Advice::DontNeed) } {
            let e = MigrationError::Io { op: "dropping the stale pages (MADV_DONTNEED)", source: e };
            return fail(faults, stream, &regions.0, e);
        }
        let _ = go_tx.send(true);
        Ok(PostcopyDestination {
            stream: Some(stream),
            faults: Some(faults),
            stop: stop_tx,
            uffd,
            state,
            regions,
            stale_pages: union_pages(&self.stale, &self.discarded),
        })
    }
}

/// The destination's post-copy phase, running (see [`PostcopyStart::start`]).
#[derive(Debug)]
pub struct PostcopyDestination {
    stream: Option<JoinHandle<Result<(ReceiveSummary, Duration)>>>,
    faults: Option<JoinHandle<()>>,
    stop: UnixStream,
    uffd: Arc<Uffd>,
    state: Arc<State>,
    regions: Regions,
    stale_pages: u64,
}

impl PostcopyDestination {
    /// Stale pages still to arrive.
    pub fn missing_pages(&self) -> u64 {
        self.state.missing.load(Ordering::Acquire)
    }

    /// Waits until the stream ended: every stale page placed and the digests compared. Then
    /// the memory is unregistered and is ordinary memory again. On an error the pages that did
    /// not arrive are poisoned (see the [module docs](self)): the destination guest must be
    /// stopped. A source that goes silent without closing the connection makes this wait as
    /// long as the transport does: to give up, shut the connection down (e.g.
    /// `TcpStream::shutdown` on a clone), which fails the receive, or drop this handle, which
    /// poisons what did not arrive and returns at once.
    pub fn wait(mut self) -> Result<PostcopySummary> {
        let joined = self.stream.take().expect("waited once").join();
        let (receive, duration) = match joined {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(MigrationError::Postcopy("the post-copy stream thread panicked")),
        };
        self.finish();
        if let Some(e) = self.state.fault_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        Ok(PostcopySummary {
            receive,
            stale_pages: self.stale_pages,
            requested_pages: self.state.requested_count.load(Ordering::Relaxed),
            zero_faults: self.state.zero_faults.load(Ordering::Relaxed),
            duration,
        })
    }

    /// Stops the fault thread and unregisters the memory (every page is there).
    fn finish(&mut self) {
        let _ = (&self.stop).write_all(&[1]);
        if let Some(t) = self.faults.take() {
            let _ = t.join();
        }
        for r in self.regions.0.iter() {
            let _ = self.uffd.unregister(r.host as *mut u8, r.len as usize);
        }
    }
}

impl Drop for PostcopyDestination {
    fn drop(&mut self) {
        // A destination dropped before its stream ended (a source that went silent, say):
        // what did not arrive is poisoned, so that closing the userfaultfd cannot turn it into
        // zeros. The stream thread is not waited for: it holds the memory and the userfaultfd
        // until its stream ends or fails (a page it places now finds a poisoned one: EEXIST).
        let running = self.stream.as_ref().is_some_and(|t| !t.is_finished());
        if running || self.state.missing.load(Ordering::Acquire) > 0 {
            poison_missing(&self.uffd, &self.state, &self.regions);
        }
        let _ = (&self.stop).write_all(&[1]);
        if let Some(t) = self.faults.take() {
            let _ = t.join();
        }
        if let Some(t) = self.stream.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// The destination's regions: guest start, host address, length (whole pages).
#[derive(Clone, Debug)]
struct Regions(Arc<[RegionInfo]>);

#[derive(Clone, Copy, Debug)]
struct RegionInfo {
    guest: u64,
    host: usize,
    len: u64,
    /// The index of its first page in the state's bitmaps.
    first_bit: u64,
}

impl Regions {
    fn of<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Result<Self> {
        let mut regions = Vec::new();
        let mut bits = 0;
        for r in mem.iter() {
            if !r.len().is_multiple_of(PAGE as u64) {
                return Err(MigrationError::Postcopy("post-copy needs regions of whole pages"));
            }
            if !super::residency::private_anonymous(r.host_ptr(), r.len() as usize) {
                return Err(MigrationError::Postcopy("post-copy needs private anonymous destination memory"));
            }
            if !r.protection().is_writable() {
                return Err(MigrationError::Postcopy("post-copy needs writable destination memory"));
            }
            regions.push(RegionInfo {
                guest: r.start_addr().0,
                host: r.host_ptr() as usize,
                len: r.len(),
                first_bit: bits,
            });
            bits += r.len() / PAGE as u64;
        }
        Ok(Regions(regions.into()))
    }

    fn pages(&self) -> u64 {
        self.0.iter().map(|r| r.len / PAGE as u64).sum()
    }

    /// The bit of guest page `gpa` (in memory), and its host address.
    fn by_guest(&self, gpa: u64) -> Option<(u64, usize)> {
        let i = self.0.partition_point(|r| r.guest <= gpa).checked_sub(1)?;
        let r = &self.0[i];
        let off = gpa - r.guest;
        (off < r.len).then(|| (r.first_bit + off / PAGE as u64, r.host + off as usize))
    }

    /// The bit, guest address and page-aligned host address of host address `host`.
    fn by_host(&self, host: u64) -> Option<(u64, u64, usize)> {
        let host = host as usize;
        let r = self.0.iter().find(|r| (r.host..r.host + r.len as usize).contains(&host))?;
        let off = ((host - r.host) & !(PAGE - 1)) as u64;
        Some((r.first_bit + off / PAGE as u64, r.guest + off, r.host + off as usize))
    }
}

/// What both threads share: which pages are stale, placed, asked for.
#[derive(Debug)]
struct State {
    stale: Box<[AtomicU64]>,
    placed: Box<[AtomicU64]>,
    requested: Box<[AtomicU64]>,
    missing: AtomicU64,
    requested_count: AtomicU64,
    zero_faults: AtomicU64,
    fault_error: Mutex<Option<MigrationError>>,
    /// Set once every page arrived, before the memory is unregistered: a fault thread's failure
    /// to place a page after that is the unregistration's doing, not an error.
    finished: std::sync::atomic::AtomicBool,
}

fn bitset(bits: u64) -> Box<[AtomicU64]> {
    (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn test(set: &[AtomicU64], bit: u64) -> bool {
    set[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
}

/// Sets `bit`; returns whether it was set before.
fn test_and_set(set: &[AtomicU64], bit: u64) -> bool {
    set[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::AcqRel) & (1 << (bit % 64)) != 0
}

impl State {
    fn new(regions: &Regions, stale: &[StaleRun], discarded: &[StaleRun]) -> Self {
        let bits = regions.pages();
        let s = State {
            stale: bitset(bits),
            placed: bitset(bits),
            requested: bitset(bits),
            missing: AtomicU64::new(0),
            requested_count: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            fault_error: Mutex::new(None),
            finished: std::sync::atomic::AtomicBool::new(false),
        };
        let mut missing = 0;
        for &(addr, pages) in stale.iter().chain(discarded) {
            for p in 0..pages {
                let (bit, _) = regions.by_guest(addr + p * PAGE as u64).expect("stale runs were checked");
                if !test_and_set(&s.stale, bit) {
                    missing += 1;
                }
            }
        }
        s.missing.store(missing, Ordering::Release);
        s
    }
}

/// The pages of two lists of runs, counted once (each list ascending within itself or not).
fn union_pages(a: &[StaleRun], b: &[StaleRun]) -> u64 {
    let mut all: Vec<StaleRun> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let (mut total, mut end) = (0u64, 0u64);
    for (addr, pages) in all {
        let run_end = addr + pages * PAGE as u64;
        let from = addr.max(end);
        if run_end > from {
            total += (run_end - from) / PAGE as u64;
        }
        end = end.max(run_end);
    }
    total
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> MigrationError {
    move |source| MigrationError::Io { op, source }
}

/// The fault thread: until `stop` is readable.
fn serve_faults<W: Write>(uffd: &Uffd, state: &State, regions: &Regions, mut requests: W, stop: &UnixStream) {
    let mut events = Vec::with_capacity(64);
    let mut asking = true;
    let fail = |e: MigrationError| {
        if state.finished.load(Ordering::Acquire) {
            return;
        }
        let mut slot = state.fault_error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(e);
    };
    loop {
        let ready = match uffd::poll_readable(&[uffd.as_fd(), stop.as_fd()], -1) {
            Ok(r) => r,
            Err(e) => return fail(MigrationError::Io { op: "polling the userfaultfd", source: e }),
        };
        if ready[1] {
            return;
        }
        if !ready[0] {
            continue;
        }
        if let Err(e) = uffd.read_events(&mut events) {
            return fail(MigrationError::Io { op: "reading the userfaultfd", source: e });
        }
        for &event in &events {
            let UffdEvent::PageFault { address, .. } = event else { continue };
            let Some((bit, gpa, host)) = regions.by_host(address) else { continue };
            if !test(&state.stale, bit) {
                // Absent because it is zero (the pre-copy left it so): a zero page, unless a
                // racing fault placed one already.
                match uffd.zeropage(host as *mut u8, PAGE, true) {
                    Ok(_) => {
                        state.zero_faults.fetch_add(1, Ordering::Relaxed);
                    }
                    Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        let _ = uffd.wake(host as *mut u8, PAGE);
                    }
                    Err((_, e)) => {
                        // The faulting thread must not wait forever, nor re-fault in a loop.
                        poison_page(uffd, host);
                        fail(MigrationError::Io { op: "placing a zero page (UFFDIO_ZEROPAGE)", source: e });
                    }
                }
            } else if test(&state.placed, bit) {
                // Placed since the fault was queued (placing woke it; waking again is harmless).
                let _ = uffd.wake(host as *mut u8, PAGE);
            } else if !test_and_set(&state.requested, bit) {
                state.requested_count.fetch_add(1, Ordering::Relaxed);
                if asking && requests.write_all(&gpa.to_le_bytes()).and_then(|()| requests.flush()).is_err() {
                    // The page still comes in the background; a source that is gone is the
                    // stream thread's error to report. No more requests.
                    asking = false;
                }
            }
        }
    }
}

/// Poisons every stale page that was not placed (`start` made sure the memory takes
/// `UFFDIO_POISON`); a page counts as placed once poisoned (or found there: `EEXIST`).
fn poison_missing(uffd: &Uffd, state: &State, regions: &Regions) {
    for r in regions.0.iter() {
        for p in 0..r.len / PAGE as u64 {
            let bit = r.first_bit + p;
            if test(&state.stale, bit) && !test(&state.placed, bit) {
                let host = r.host + (p * PAGE as u64) as usize;
                if poison_page(uffd, host) {
                    test_and_set(&state.placed, bit);
                }
            }
        }
    }
}

/// Poisons the missing page at `host`; whether it is now there (poisoned, or placed already).
fn poison_page(uffd: &Uffd, host: usize) -> bool {
    // SAFETY: the page is one of ours whose contents never arrived; poisoned, a thread touching
    // it gets an error instead of bytes the guest never had.
    match unsafe { uffd.poison(host as *mut u8, PAGE, true) } {
        Ok(_) => true,
        Err((_, e)) => e.raw_os_error() == Some(libc::EEXIST),
    }
}

/// The stream thread: the rest of the stream after the device state.
fn receive_stale<R: Read, B: Bitmap>(
    rx: &mut Receiver<R>,
    mem: &GuestMemoryMmap<B>,
    dest: &Destination,
    mut summary: ReceiveSummary,
    uffd: &Uffd,
    state: &State,
    regions: &Regions,
) -> Result<ReceiveSummary> {
    let mut bounce = vec![0u8; PLACE_BATCH];
    let mut runs = Vec::with_capacity(super::MAX_RUNS);
    let (mut round_data, mut round_zero) = (0u64, 0u64);
    let mut verified = false;
    loop {
        let (at, h) = rx.frame_header()?;
        let (kind, flags, a, b, c) =
            (le_u32(&h, 0), le_u32(&h, 4), le_u64(&h, 8), le_u64(&h, 16), le_u64(&h, 24));
        if flags != 0 {
            return Err(MigrationError::InvalidFrame { what: "frame flags", offset: at });
        }
        let allowed = match kind {
            FRAME_DONE => verified,
            FRAME_PAGES | FRAME_END_OF_ROUND | FRAME_CHECKSUMS => !verified,
            _ => false,
        };
        if !allowed {
            return Err(if matches!(kind, 1..=6) {
                MigrationError::UnexpectedFrame {
                    offset: at,
                    found: super::frame_name(kind),
                    expected: if verified { "done" } else { "post-copy pages, end-of-round or checksums" },
                }
            } else {
                MigrationError::UnknownFrame { kind, offset: at }
            });
        }
        match kind {
            FRAME_PAGES => {
                rx.read_runs(mem, dest, &mut runs, at, a, b, c)?;
                // Every page must be a stale page not placed yet: checked before any is placed.
                for run in &runs {
                    for p in 0..run.pages {
                        let (bit, _) =
                            regions.by_guest(run.addr.0 + p * PAGE as u64).expect("runs are in memory");
                        if !test(&state.stale, bit) || test(&state.placed, bit) {
                            return Err(MigrationError::InvalidFrame {
                                what: "post-copy page that is not outstanding",
                                offset: at,
                            });
                        }
                    }
                }
                for run in &runs {
                    let table = dest.table(run.region);
                    let first = run.addr.0 / PAGE as u64 - table.first_page();
                    let (bit, host) = regions.by_guest(run.addr.0).expect("runs are in memory");
                    let len = (run.pages * PAGE as u64) as usize;
                    if run.zero {
                        place(
                            || uffd.zeropage(host as *mut u8, len, true),
                            "placing zero pages (UFFDIO_ZEROPAGE)",
                        )?;
                        table.set_range(first, run.pages, page_hash::zero_page_hash());
                        round_zero += run.pages;
                    } else {
                        let mut done = 0;
                        while done < len {
                            let n = (len - done).min(PLACE_BATCH);
                            rx.read_full(&mut bounce[..n], "post-copy page data")?;
                            let piece_first = first + (done / PAGE) as u64;
                            for (i, page) in bounce[..n].chunks_exact(PAGE).enumerate() {
                                // SAFETY: `page` is 4096 bytes of the bounce buffer.
                                table.set(piece_first + i as u64, unsafe {
                                    page_hash::hash_page(page.as_ptr())
                                });
                            }
                            let dst = (host + done) as *mut u8;
                            place(|| uffd.copy(dst, &bounce[..n], true), "placing pages (UFFDIO_COPY)")?;
                            done += n;
                        }
                        round_data += run.pages;
                    }
                    for p in 0..run.pages {
                        test_and_set(&state.placed, bit + p);
                    }
                    state.missing.fetch_sub(run.pages, Ordering::AcqRel);
                    summary.pages += run.pages;
                    summary.bytes += run.pages * PAGE as u64;
                    if run.zero {
                        summary.zero_pages += run.pages;
                    }
                }
            }
            FRAME_END_OF_ROUND => {
                super::receive::check_round_end((a, b, c), summary.rounds, round_data, round_zero)?;
                summary.rounds += 1;
                (round_data, round_zero) = (0, 0);
            }
            FRAME_CHECKSUMS => {
                if c != 0 || b != 0 {
                    return Err(MigrationError::InvalidFrame {
                        what: "checksums frame of a post-copy (memory digests, or an argument)",
                        offset: at,
                    });
                }
                if round_data != 0 || round_zero != 0 {
                    return Err(MigrationError::InvalidFrame {
                        what: "checksums inside a round",
                        offset: at,
                    });
                }
                if state.missing.load(Ordering::Acquire) != 0 {
                    return Err(MigrationError::InvalidFrame {
                        what: "checksums before every stale page arrived",
                        offset: at,
                    });
                }
                if a != mem.num_regions() as u64 {
                    return Err(MigrationError::RegionCount {
                        source_regions: a,
                        destination_regions: mem.num_regions(),
                    });
                }
                summary.regions_verified = rx.verify(mem, dest, false)?;
                verified = true;
            }
            _ => {
                if a != 0 || b != 0 || c != 0 {
                    return Err(MigrationError::InvalidFrame { what: "done frame arguments", offset: at });
                }
                return Ok(summary);
            }
        }
    }
}

/// Runs a placing ioctl; any failure (`EEXIST` included: no one else places stale pages) is an
/// error.
fn place(f: impl FnOnce() -> std::result::Result<usize, (usize, io::Error)>, op: &'static str) -> Result<()> {
    f().map(drop).map_err(|(_, source)| MigrationError::Io { op, source })
}
