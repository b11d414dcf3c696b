//! Pre-copy rounds: round 0 sends all of memory, later rounds what was dirtied meanwhile,
//! until what is left can be sent within the downtime budget.

use std::io::Write;
use std::time::{Duration, Instant};

use super::{MigrationError, MultiSender, Result, RoundEnd, Sender};
use crate::bitmap::{Bitmap, DirtyHarvest};
use crate::dirty::DirtyRate;
use crate::memory::{GuestMemory, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;

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
