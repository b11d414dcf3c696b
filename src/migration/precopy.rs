//! Pre-copy rounds: round 0 sends all of memory, later rounds what was dirtied meanwhile,
//! until what is left can be sent within the downtime budget.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::{MigrationError, MultiSender, Result, RoundEnd, Sender};
use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, DirtyHarvest};
use crate::dirty::DirtyRate;
use crate::memory::{GuestMemory, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;
use crate::sys::uffd::poll_readable;

mod sealed {
    pub trait Sealed {}
    impl<W> Sealed for super::Sender<W> {}
    impl<W> Sealed for super::MultiSender<W> {}
}

/// Where [`Precopy`] sends its rounds: one stream ([`Sender`]) or several ([`MultiSender`]).
/// Sealed: implemented by those two only; its methods are theirs.
pub trait PageSink: sealed::Sealed {
    /// What [`Precopy::complete`] hands back: the stream, or the streams.
    type Streams;

    /// [`Sender::send_all`].
    fn send_all_pages<M: GuestMemory + Sync + ?Sized>(&mut self, mem: &M) -> Result<u64>;

    /// [`Sender::send_dirty`].
    fn send_dirty_pages<B: Bitmap + DirtyHarvest + Send + Sync>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<usize>;

    /// [`Sender::end_round`].
    fn close_round(&mut self) -> Result<RoundEnd>;

    /// [`Sender::stream_bytes`].
    fn bytes_written(&self) -> u64;

    /// The number of streams.
    fn stream_count(&self) -> usize;

    /// [`Sender::send_device_state`].
    fn send_state(&mut self, state: &[u8]) -> Result<()>;

    /// [`Sender::finish`].
    fn finish_streams<M: GuestMemory + ?Sized>(self, mem: &M) -> Result<Self::Streams>;
}

impl<W: Write> PageSink for Sender<W> {
    type Streams = W;

    fn send_all_pages<M: GuestMemory + Sync + ?Sized>(&mut self, mem: &M) -> Result<u64> {
        self.send_all(mem)
    }

    fn send_dirty_pages<B: Bitmap + DirtyHarvest + Send + Sync>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<usize> {
        self.send_dirty(mem)
    }

    fn close_round(&mut self) -> Result<RoundEnd> {
        self.end_round()
    }

    fn bytes_written(&self) -> u64 {
        self.stream_bytes()
    }

    fn stream_count(&self) -> usize {
        1
    }

    fn send_state(&mut self, state: &[u8]) -> Result<()> {
        self.send_device_state(state)
    }

    fn finish_streams<M: GuestMemory + ?Sized>(self, mem: &M) -> Result<W> {
        self.finish(mem)
    }
}

impl<W: Write + Send> PageSink for MultiSender<W> {
    type Streams = Vec<W>;

    fn send_all_pages<M: GuestMemory + Sync + ?Sized>(&mut self, mem: &M) -> Result<u64> {
        self.send_all(mem)
    }

    fn send_dirty_pages<B: Bitmap + DirtyHarvest + Send + Sync>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<usize> {
        self.send_dirty(mem)
    }

    fn close_round(&mut self) -> Result<RoundEnd> {
        self.end_round()
    }

    fn bytes_written(&self) -> u64 {
        self.stream_bytes()
    }

    fn stream_count(&self) -> usize {
        self.streams()
    }

    fn send_state(&mut self, state: &[u8]) -> Result<()> {
        self.send_device_state(state)
    }

    fn finish_streams<M: GuestMemory + ?Sized>(self, mem: &M) -> Result<Vec<W>> {
        self.finish(mem)
    }
}

/// What a post-copy ([`Precopy::postcopy`]) did at the source.
#[derive(Clone, Debug, PartialEq)]
pub struct PostcopyReport {
    /// The pre-copy rounds before the switch.
    pub rounds: Vec<RoundStats>,
    /// Why pre-copy stopped.
    pub stop: StopReason,
    /// From the start of [`Precopy::postcopy`] (call it right after pausing the source) to the
    /// device state on the stream: the source's part of the downtime.
    pub switch: Duration,
    /// Stale pages (4 KiB) sent after the switch.
    pub stale_pages: u64,
    /// Of those, the pages the destination asked for and got ahead of the others.
    pub requested_pages: u64,
    /// Requests for pages that were sent already, or are not stale (ignored).
    pub ignored_requests: u64,
    /// From the switch to the done frame.
    pub postcopy: Duration,
    /// Bytes written to the stream in all.
    pub stream_bytes: u64,
}

/// Pages the post-copy sender sends at once between two looks at the requests: 1 MiB, a
/// millisecond or less on the wire, so a request waits little behind it, and few calls (each
/// looks up the memory's mappings).
const POSTCOPY_BATCH: u64 = 256;

/// When the pre-copy rounds stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrecopyConfig {
    /// The longest pause of the source the caller accepts: pre-copy stops once the dirty bytes
    /// left can be sent in this time at the measured bandwidth.
    pub downtime: Duration,
    /// The most dirty rounds after round 0, should the rule above never hold (a guest that
    /// dirties memory as fast as the link carries it).
    pub max_rounds: u64,
    /// Harvests the dirty rate is measured over ([`DirtyRate::new`]).
    pub rate_window: usize,
}

impl Default for PrecopyConfig {
    /// 300 ms of downtime, at most 30 dirty rounds, the rate over the last 3 harvests.
    fn default() -> Self {
        PrecopyConfig { downtime: Duration::from_millis(300), max_rounds: 30, rate_window: 3 }
    }
}

/// What one round sent, and how fast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundStats {
    /// The round number (0 = all of memory).
    pub round: u64,
    /// Pages sent (4 KiB units of the stream), data and zero pages.
    pub pages: u64,
    /// Of those, the pages sent as zero runs (no data on the stream).
    pub zero_pages: u64,
    /// Guest bytes the round covered (`pages` × 4096).
    pub bytes: u64,
    /// From the harvest to the end-of-round frame.
    pub duration: Duration,
    /// Pages dirtied per second, measured at this round's harvest over the last harvests
    /// (`None` for round 0 and until two harvests are known).
    pub dirty_pages_per_sec: Option<f64>,
}

impl RoundStats {
    /// Bytes per second this round reached (0 for an empty round).
    pub fn bandwidth(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        }
    }
}

/// Why the pre-copy rounds stopped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StopReason {
    /// The dirty bytes left fit in the downtime budget at the measured bandwidth.
    Converged {
        /// Dirty bytes left for the final round.
        remaining_bytes: u64,
        /// The time they should take.
        estimate: Duration,
    },
    /// [`PrecopyConfig::max_rounds`] dirty rounds were sent without converging.
    MaxRounds {
        /// Dirty bytes left for the final round.
        remaining_bytes: u64,
    },
}

/// The whole migration, as [`Precopy::complete`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationReport {
    /// Every pre-copy round, in order (the final round is [`final_round`](Self::final_round)).
    pub rounds: Vec<RoundStats>,
    /// Why pre-copy stopped.
    pub stop: StopReason,
    /// The round sent while the source was paused.
    pub final_round: RoundStats,
    /// From the start of [`Precopy::complete`] (call it right after pausing the source) to
    /// the final round's last byte on the stream: the source's downtime, without the
    /// verification that follows.
    pub downtime: Duration,
    /// Computing and sending the checksums, then done.
    pub verify: Duration,
    /// Bytes written to the stream in all (headers included).
    pub stream_bytes: u64,
    /// Bytes per second over all rounds.
    pub bandwidth: f64,
}

/// The pre-copy driver: rounds of a [`Sender`] (or a [`MultiSender`]) over a source memory
/// with dirty tracking.
///
/// `sync` is called before every harvest and every measurement of what is left: it merges
/// the guest's writes into the memory's bitmaps (e.g. `|| slots.sync_dirty_log()` for
/// `KvmSlots` of the `kvm` feature); a source without a guest passes
/// `|| Ok::<_, std::io::Error>(())`.
///
/// 1. [`run`](Self::run): round 0 (all of memory), then dirty rounds until the dirty bytes
///    left can be sent within [`PrecopyConfig::downtime`] at the measured bandwidth, or
///    after [`PrecopyConfig::max_rounds`].
/// 2. The caller pauses the source (stops its vCPUs and device writes).
/// 3. [`complete`](Self::complete): the final round, the checksums, done; the report with
///    every round's stats and the downtime.
///
/// See the [module docs](super) for an example.
pub struct Precopy<'m, S, B, F> {
    sender: S,
    mem: &'m GuestMemoryMmap<B>,
    config: PrecopyConfig,
    sync: F,
    rate: DirtyRate,
    rounds: Vec<RoundStats>,
    stop: Option<StopReason>,
    /// The runs of the discard rounds so far (see [`discard_round`](Self::discard_round)).
    discarded: Vec<(u64, u64)>,
    /// Discard frames sent, and the runs they carried.
    discards: u64,
    discarded_runs: u64,
    /// Bytes of the return path read but not yet a whole message.
    return_buf: Vec<u8>,
    /// The last round and the number of discard frames the destination acknowledged.
    acked_round: Option<u64>,
    acked_discards: u64,
    sent_bytes: u64,
    send_time: Duration,
}

/// Shows everything but the sync hook (closures have no `Debug`).
impl<S: std::fmt::Debug, B: Bitmap, F> std::fmt::Debug for Precopy<'_, S, B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precopy")
            .field("sender", &self.sender)
            .field("mem", &self.mem)
            .field("config", &self.config)
            .field("rate", &self.rate)
            .field("rounds", &self.rounds)
            .field("stop", &self.stop)
            .field("sent_bytes", &self.sent_bytes)
            .field("send_time", &self.send_time)
            .finish_non_exhaustive()
    }
}

impl<'m, S, B, F, E> Precopy<'m, S, B, F>
where
    S: PageSink,
    B: Bitmap + DirtyHarvest + Send + Sync,
    F: FnMut() -> std::result::Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A driver that sends `mem` on `sender` (a [`Sender`] or a [`MultiSender`]), calling
    /// `sync` before each harvest.
    pub fn new(sender: S, mem: &'m GuestMemoryMmap<B>, config: PrecopyConfig, sync: F) -> Self {
        Precopy {
            sender,
            mem,
            rate: DirtyRate::new(config.rate_window),
            config,
            sync,
            rounds: Vec::new(),
            stop: None,
            discarded: Vec::new(),
            discards: 0,
            discarded_runs: 0,
            return_buf: Vec::new(),
            acked_round: None,
            acked_discards: 0,
            sent_bytes: 0,
            send_time: Duration::ZERO,
        }
    }

    /// The rounds sent so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// Bytes per second over the rounds sent so far (`None` before any).
    pub fn bandwidth(&self) -> Option<f64> {
        let secs = self.send_time.as_secs_f64();
        (secs > 0.0).then(|| self.sent_bytes as f64 / secs)
    }

    /// Bytes dirty now (after a sync), in each region's page size.
    fn dirty_bytes(&self) -> Result<u64> {
        let mut bytes = 0u64;
        for region in self.mem.iter() {
            let bitmap = region.bitmap();
            bytes += bitmap.dirty_page_count()? as u64 * bitmap.page_size()? as u64;
        }
        Ok(bytes)
    }

    fn sync(&mut self) -> Result<()> {
        (self.sync)().map_err(|e| MigrationError::Sync(e.into()))
    }

    /// Sends one round: `all` memory (round 0) or the dirty pages; records its stats.
    fn round(&mut self, all: bool) -> Result<RoundStats> {
        if self.discards > 0 {
            return Err(MigrationError::Postcopy(
                "no data round after a discard round (post-copy must follow)",
            ));
        }
        self.sync()?;
        let start = Instant::now();
        if all {
            // Clear first, then read: a page written during the send is dirty again.
            self.mem.take_dirty_ranges(|_, _| {})?;
            self.rate.record_at(start, 0);
            self.sender.send_all_pages(self.mem)?;
        } else {
            let pages = self.sender.send_dirty_pages(self.mem)?;
            self.rate.record_at(start, pages);
        }
        let end = self.sender.close_round()?;
        let duration = start.elapsed();
        self.sent_bytes += end.bytes;
        self.send_time += duration;
        let stats = RoundStats {
            round: end.round,
            pages: end.pages,
            zero_pages: end.zero_pages,
            bytes: end.bytes,
            duration,
            dirty_pages_per_sec: if all { None } else { self.rate.pages_per_sec() },
        };
        Ok(stats)
    }

    /// Round 0, then dirty rounds until the convergence rule holds (see
    /// [`PrecopyConfig`]). The source keeps running meanwhile. Returns why it stopped.
    pub fn run(&mut self) -> Result<StopReason> {
        if self.discards > 0 {
            return Err(MigrationError::Postcopy(
                "no data round after a discard round (post-copy must follow)",
            ));
        }
        if self.rounds.is_empty() {
            let stats = self.round(true)?;
            self.rounds.push(stats);
        }
        loop {
            self.sync()?;
            let remaining_bytes = self.dirty_bytes()?;
            let bandwidth = self.bandwidth().unwrap_or(0.0);
            let budget = bandwidth * self.config.downtime.as_secs_f64();
            if remaining_bytes as f64 <= budget {
                let estimate = if bandwidth > 0.0 {
                    Duration::from_secs_f64(remaining_bytes as f64 / bandwidth)
                } else {
                    Duration::ZERO
                };
                let stop = StopReason::Converged { remaining_bytes, estimate };
                self.stop = Some(stop);
                return Ok(stop);
            }
            if self.rounds.len() as u64 > self.config.max_rounds {
                let stop = StopReason::MaxRounds { remaining_bytes };
                self.stop = Some(stop);
                return Ok(stop);
            }
            let stats = self.round(false)?;
            self.rounds.push(stats);
        }
    }

    /// With the source paused: the final round (everything still dirty, after a last sync),
    /// then the checksums and done. Runs the pre-copy rounds first if [`run`](Self::run) was
    /// not called (the downtime is then counted from their end). Returns the report and the
    /// stream.
    pub fn complete(self) -> Result<(MigrationReport, S::Streams)> {
        self.complete_inner(None)
    }

    /// [`complete`](Self::complete), with the device state (the vCPUs' registers, the device
    /// models: whatever the destination needs to resume the guest, saved after the pause)
    /// sent between the final round and the checksums ([`Sender::send_device_state`]). The
    /// destination's [`Receiver::take_device_state`](super::Receiver::take_device_state)
    /// hands it out once the stream is verified. The report's downtime includes sending it.
    pub fn complete_with_device_state(self, state: &[u8]) -> Result<(MigrationReport, S::Streams)> {
        // Refused before the final round, so that nothing is sent for a state that cannot go.
        if state.is_empty() || state.len() as u64 > super::MAX_DEVICE_STATE {
            return Err(MigrationError::DeviceState("device state must be 1 to MAX_DEVICE_STATE bytes"));
        }
        self.complete_inner(Some(state))
    }

    fn complete_inner(mut self, state: Option<&[u8]>) -> Result<(MigrationReport, S::Streams)> {
        if self.discards > 0 {
            return Err(MigrationError::Postcopy("after a discard round the migration ends by post-copy"));
        }
        let stop = match self.stop {
            Some(stop) => stop,
            None => self.run()?,
        };
        let paused = Instant::now();
        let final_round = self.round(false)?;
        if let Some(state) = state {
            self.sender.send_state(state)?;
        }
        let downtime = paused.elapsed();
        let verify_start = Instant::now();
        let stream_bytes_before = self.sender.bytes_written();
        let bandwidth = self.bandwidth().unwrap_or(0.0);
        let mem = self.mem;
        let sender = self.sender;
        let stream_end = {
            let mut bytes = stream_bytes_before;
            // Checksums frame: header + one entry per region; then done on every stream.
            bytes += (super::FRAME_HEADER_LEN + mem.num_regions() * super::CHECKSUM_ENTRY_LEN) as u64;
            bytes + (sender.stream_count() * super::FRAME_HEADER_LEN) as u64
        };
        let stream = sender.finish_streams(mem)?;
        let report = MigrationReport {
            rounds: self.rounds,
            stop,
            final_round,
            downtime,
            verify: verify_start.elapsed(),
            stream_bytes: stream_end,
            bandwidth,
        };
        Ok((report, stream))
    }
}

impl<'m, W, B, F, E> Precopy<'m, Sender<W>, B, F>
where
    W: Write,
    B: Bitmap + DirtyHarvest + Send + Sync,
    F: FnMut() -> std::result::Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// With the source paused: post-copy instead of a final round (see
    /// [`postcopy`](super::postcopy)). Harvests the pages still dirty (after a last sync), sends
    /// them as the stale set with `state` (the device state the destination resumes the guest
    /// from), then sends the stale pages: the ones the destination asks for on `requests` (the
    /// return path: 8-byte guest addresses) first, the others in address order, each once;
    /// then the checksums (stream digests) and done. Returns when every stale page is sent.
    ///
    /// With nothing dirty, there is nothing to fetch: the stream ends as
    /// [`complete_with_device_state`](Self::complete_with_device_state) ends it and the
    /// destination sees a complete migration. Refuses (before sending anything, the dirty pages
    /// kept) memory with a partial last page, and an empty or oversized `state`. Once the
    /// switch is on the stream, a failure cannot be undone: see the [module
    /// docs](super::postcopy#when-it-fails).
    pub fn postcopy<R: Read + AsFd>(mut self, state: &[u8], mut requests: R) -> Result<(PostcopyReport, W)> {
        if state.is_empty() || state.len() as u64 > super::MAX_DEVICE_STATE {
            return Err(MigrationError::DeviceState("device state must be 1 to MAX_DEVICE_STATE bytes"));
        }
        if self.mem.iter().any(|r| !r.len().is_multiple_of(super::STREAM_PAGE_SIZE)) {
            return Err(MigrationError::Postcopy("post-copy needs regions of whole pages"));
        }
        let stop = match self.stop {
            Some(stop) => stop,
            None => self.run()?,
        };
        let paused = Instant::now();
        self.sync()?;
        let mut ranges: Vec<(GuestAddress, u64)> = Vec::new();
        self.mem.take_dirty_ranges(|addr, len| ranges.push((addr, len)))?;
        // Pages discarded already are stale already: the switch names each stale page once.
        let last = subtract_runs(&stale_runs(self.mem, &ranges), &self.discarded);
        if last.is_empty() && self.discards == 0 {
            let rounds = self.rounds.clone();
            let (report, stream) = self.complete_inner(Some(state))?;
            let report = PostcopyReport {
                rounds,
                stop,
                switch: report.downtime,
                stale_pages: 0,
                requested_pages: 0,
                ignored_requests: 0,
                postcopy: Duration::ZERO,
                stream_bytes: report.stream_bytes,
            };
            return Ok((report, stream));
        }
        let switched = self
            .sender
            .send_postcopy_start(&last, self.discards > 0)
            .and_then(|()| self.sender.send_device_state(state));
        if let Err(e) = switched {
            // Nothing is lost at the source: the pages are dirty again for whatever comes next.
            let _ = self.mem.restore_dirty_ranges(&ranges);
            return Err(e);
        }
        // Every stale page: those of the discard rounds and of the last harvest.
        let runs = union_runs(self.mem, &self.discarded, &last);
        let switch = paused.elapsed();
        let started = Instant::now();
        // Page `i` of the stale set is page `i - starts[r]` of run `r`.
        let mut starts = Vec::with_capacity(runs.len());
        let mut total = 0u64;
        for &(_, pages) in &runs {
            starts.push(total);
            total += pages;
        }
        let mut sent = vec![0u64; total.div_ceil(64) as usize];
        let is_sent = |sent: &[u64], i: u64| sent[(i / 64) as usize] & (1 << (i % 64)) != 0;
        let (mut done, mut requested, mut ignored) = (0u64, 0u64, 0u64);
        let mut cursor = 0u64;
        let mut buf = [0u8; 64 * super::postcopy::REQUEST_LEN];
        let mut have = self.return_buf.len().min(buf.len());
        buf[..have].copy_from_slice(&self.return_buf[..have]);
        self.return_buf.clear();
        let mut listening = true;
        let mut wanted: Vec<(GuestAddress, u64)> = Vec::new();
        while done < total {
            // Requests first: whatever has arrived, without waiting.
            while listening
                && poll_readable(&[requests.as_fd()], 0).map_err(io_read("polling the return path"))?[0]
            {
                let n = match requests.read(&mut buf[have..]) {
                    Ok(0) => {
                        // The destination closed its side: the rest goes in the background.
                        listening = false;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(MigrationError::Io { op: "reading the return path", source: e }),
                };
                have += n;
                let whole = have / super::postcopy::REQUEST_LEN * super::postcopy::REQUEST_LEN;
                for req in buf[..whole].chunks_exact(super::postcopy::REQUEST_LEN) {
                    let value = u64::from_le_bytes(req.try_into().expect("8 bytes"));
                    if value & (super::STREAM_PAGE_SIZE - 1) != 0 {
                        // An acknowledgement (the destination's receiver), not a request.
                        continue;
                    }
                    let gpa = value;
                    let r = runs.partition_point(|&(a, _)| a <= gpa);
                    let index = r.checked_sub(1).and_then(|r| {
                        let (a, pages) = runs[r];
                        let p = (gpa - a) / super::STREAM_PAGE_SIZE;
                        (p < pages).then_some(starts[r] + p)
                    });
                    match index {
                        Some(i) if !is_sent(&sent, i) => {
                            wanted.push((GuestAddress(gpa), super::STREAM_PAGE_SIZE));
                            sent[(i / 64) as usize] |= 1 << (i % 64);
                            (done, requested) = (done + 1, requested + 1);
                        }
                        _ => ignored += 1,
                    }
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
            if !wanted.is_empty() {
                // Every request that arrived, in one call (each call looks up the memory's
                // mappings once).
                self.sender.send_ranges(self.mem, &wanted)?;
                wanted.clear();
            }
            // Then up to a batch of pages in address order, across runs, in one call.
            let mut batch: Vec<(GuestAddress, u64)> = Vec::new();
            let mut n = 0;
            while n < POSTCOPY_BATCH && cursor < total {
                if is_sent(&sent, cursor) {
                    cursor += 1;
                    continue;
                }
                let r = starts.partition_point(|&s| s <= cursor) - 1;
                let (addr, pages) = runs[r];
                let first = cursor - starts[r];
                let mut k = 0;
                while n + k < POSTCOPY_BATCH && first + k < pages && !is_sent(&sent, cursor + k) {
                    sent[((cursor + k) / 64) as usize] |= 1 << ((cursor + k) % 64);
                    k += 1;
                }
                batch.push((
                    GuestAddress(addr + first * super::STREAM_PAGE_SIZE),
                    k * super::STREAM_PAGE_SIZE,
                ));
                n += k;
                cursor += k;
            }
            if !batch.is_empty() {
                self.sender.send_ranges(self.mem, &batch)?;
                done += n;
            }
        }
        self.sender.end_round()?;
        let stream_bytes = self.sender.stream_bytes();
        let stream = self.sender.finish(self.mem)?;
        // Read the return path to its end (the destination closes it once every page arrived):
        // a TCP socket closed with unread requests would reset the connection, and the
        // destination could lose the end of the stream. A destination silent for 10 s is left.
        let mut sink = [0u8; 512];
        while listening
            && poll_readable(&[requests.as_fd()], 10_000).map_err(io_read("polling the return path"))?[0]
        {
            match requests.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => ignored += (n / super::postcopy::REQUEST_LEN) as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let report = PostcopyReport {
            rounds: self.rounds,
            stop,
            switch,
            stale_pages: total,
            requested_pages: requested,
            ignored_requests: ignored,
            postcopy: started.elapsed(),
            stream_bytes: stream_bytes
                + (super::FRAME_HEADER_LEN * 2 + self.mem.num_regions() * super::CHECKSUM_ENTRY_LEN) as u64,
        };
        Ok((report, stream))
    }
}

impl<'m, W, B, F, E> Precopy<'m, Sender<W>, B, F>
where
    W: Write,
    B: Bitmap + DirtyHarvest + Send + Sync,
    F: FnMut() -> std::result::Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A discard round, before post-copy and while the guest still runs: harvests the dirty
    /// pages (after a sync) and tells the destination to drop its copy of them now (a discard
    /// frame); they will come by post-copy. Each one moves work out of the pause: at
    /// [`postcopy`](Self::postcopy) the destination has only the pages dirtied since the last
    /// discard round left to drop. Runs the pre-copy rounds first if [`run`](Self::run) was not
    /// called. After the first discard round the migration can only end by post-copy (no
    /// data round, no [`complete`](Self::complete)). Returns the pages discarded (0: nothing
    /// dirty, nothing sent). The destination's memory must be private anonymous memory.
    pub fn discard_round(&mut self) -> Result<u64> {
        if self.mem.iter().any(|r| !r.len().is_multiple_of(super::STREAM_PAGE_SIZE)) {
            return Err(MigrationError::Postcopy("post-copy needs regions of whole pages"));
        }
        if self.stop.is_none() {
            self.run()?;
        }
        self.sync()?;
        let mut ranges: Vec<(GuestAddress, u64)> = Vec::new();
        self.mem.take_dirty_ranges(|addr, len| ranges.push((addr, len)))?;
        // A page discarded before is gone at the destination already.
        let runs = subtract_runs(&stale_runs(self.mem, &ranges), &self.discarded);
        if runs.is_empty() {
            return Ok(0);
        }
        // The destination takes at most MAX_POSTCOPY_RUNS runs over all discard frames.
        let merged = union_runs(self.mem, &self.discarded, &runs);
        let sent_runs = self.discarded_runs + runs.len() as u64;
        if sent_runs > super::postcopy::MAX_POSTCOPY_RUNS {
            let _ = self.mem.restore_dirty_ranges(&ranges);
            return Err(MigrationError::Postcopy(
                "the discard rounds would name more than MAX_POSTCOPY_RUNS runs",
            ));
        }
        if let Err(e) = self.sender.send_discard(&runs) {
            let _ = self.mem.restore_dirty_ranges(&ranges);
            return Err(e);
        }
        self.discarded_runs = sent_runs;
        self.discards += 1;
        self.discarded = merged;
        Ok(runs.iter().map(|r| r.1).sum())
    }

    /// Waits until the destination acknowledged every round and discard frame sent so far on
    /// `return_path` (see [`Receiver::set_return_path`](super::Receiver::set_return_path)), or
    /// `timeout` passed; returns whether it caught up. Call it before pausing the source, so
    /// that the destination's backlog does not count in the downtime. A request for a page
    /// (which only comes after the switch) is not expected here and is an error.
    pub fn wait_for_destination<R: Read + AsFd>(
        &mut self,
        return_path: &mut R,
        timeout: Duration,
    ) -> Result<bool> {
        let want_round = self.rounds.last().map(|r| r.round);
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while self.acked_round < want_round || self.acked_discards < self.discards {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            if !poll_readable(&[return_path.as_fd()], ms).map_err(io_read("polling the return path"))?[0] {
                continue;
            }
            let n = match return_path.read(&mut buf) {
                Ok(0) => {
                    return Err(MigrationError::Io {
                        op: "reading the return path",
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(MigrationError::Io { op: "reading the return path", source: e }),
            };
            self.return_buf.extend_from_slice(&buf[..n]);
            let whole = self.return_buf.len() / 8 * 8;
            for m in self.return_buf[..whole].chunks_exact(8) {
                let value = u64::from_le_bytes(m.try_into().expect("8 bytes"));
                match value & 0xfff {
                    1 => self.acked_round = self.acked_round.max(Some(value >> 12)),
                    2 => self.acked_discards = self.acked_discards.max(value >> 12),
                    _ => {
                        return Err(MigrationError::Postcopy(
                            "a message on the return path that is not an acknowledgement",
                        ))
                    }
                }
            }
            self.return_buf.drain(..whole);
        }
        Ok(true)
    }
}

/// The pages of `a` that are not in `b` (both ascending, not overlapping), as runs.
fn subtract_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let page = super::STREAM_PAGE_SIZE;
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for &(addr, pages) in a {
        let (mut at, end) = (addr, addr + pages * page);
        while j < b.len() && b[j].0 + b[j].1 * page <= at {
            j += 1;
        }
        let mut k = j;
        while at < end {
            match b.get(k) {
                Some(&(b_addr, b_pages)) if b_addr < end => {
                    if b_addr > at {
                        out.push((at, (b_addr - at) / page));
                    }
                    at = at.max(b_addr + b_pages * page);
                    k += 1;
                }
                _ => {
                    out.push((at, (end - at) / page));
                    at = end;
                }
            }
        }
    }
    out
}

/// The union of two lists of stream page runs, as ascending runs each in one region.
fn union_runs<B: Bitmap>(mem: &GuestMemoryMmap<B>, a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let ranges: Vec<(GuestAddress, u64)> = a
        .iter()
        .chain(b)
        .map(|&(addr, pages)| (GuestAddress(addr), pages * super::STREAM_PAGE_SIZE))
        .collect();
    stale_runs(mem, &ranges)
}

/// The dirty ranges of a harvest as stream page runs (guest address, pages), ascending, each in
/// one region.
fn stale_runs<B: Bitmap>(mem: &GuestMemoryMmap<B>, ranges: &[(GuestAddress, u64)]) -> Vec<(u64, u64)> {
    let page = super::STREAM_PAGE_SIZE;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut sorted: Vec<_> = ranges.iter().filter(|r| r.1 > 0).copied().collect();
    sorted.sort_unstable_by_key(|r| r.0);
    for (addr, len) in sorted {
        let mut first = addr.0 & !(page - 1);
        let end = (addr.0 + len).next_multiple_of(page);
        // Cut at region ends: a run lies in one region.
        while first < end {
            let Some(region) = mem.find_region(GuestAddress(first)) else { break };
            let piece_end = end.min(region.start_addr().0 + region.len());
            match runs.last_mut() {
                // Adjacent or overlapping, and in the same region: one run.
                Some(last) if first <= last.0 + last.1 * page && last.0 >= region.start_addr().0 => {
                    let last_end = (last.0 + last.1 * page).max(piece_end);
                    last.1 = (last_end - last.0) / page;
                }
                _ => runs.push((first, (piece_end - first) / page)),
            }
            first = piece_end;
        }
    }
    runs
}

fn io_read(op: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { op, source }
}

#[cfg(test)]
mod tests {
    use super::subtract_runs;

    const P: u64 = 4096;

    #[test]
    fn subtract_runs_keeps_exactly_the_pages_not_in_the_second_list() {
        // a: [1, 5) [8, 9) [10, 20); b: [0, 2) [3, 4) [8, 9) [12, 13) [19, 30).
        let a = [(P, 4), (8 * P, 1), (10 * P, 10)];
        let b = [(0, 2), (3 * P, 1), (8 * P, 1), (12 * P, 1), (19 * P, 11)];
        assert_eq!(subtract_runs(&a, &b), vec![(2 * P, 1), (4 * P, 1), (10 * P, 2), (13 * P, 6)]);
        assert_eq!(subtract_runs(&a, &[]), a.to_vec());
        assert_eq!(subtract_runs(&[], &b), vec![]);
        assert_eq!(subtract_runs(&a, &[(0, 100)]), vec![]);
    }
}
