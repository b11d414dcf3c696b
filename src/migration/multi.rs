//! One migration over several streams: [`MultiSender`] spreads each round over them and sends
//! on one thread per stream; [`MultiReceiver`] reads each on its own thread, with a barrier
//! at every end of round so that a page's newer copy always lands after its older one.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::receive::Destination;
use super::send::{check_range, check_regions, harvest_and_send};
use super::tables::Tables;
use super::{
    new_session, MigrationError, ReceiveSummary, Receiver, Result, RoundEnd, Sender, StreamId, MAX_STREAMS,
};
use crate::address::GuestAddress;
use crate::bitmap::{Bitmap, DirtyHarvest};
use crate::memory::{GuestMemory, GuestMemoryMmap};
use crate::region::GuestMemoryRegion;

/// The longest piece of a round one stream takes at a time: pieces go to the streams in
/// turn, so that every stream gets its share of every part of memory.
const PIECE: u64 = 1 << 20;

/// Puts one migration on several streams (see the [module docs](super#several-streams)).
///
/// Every call that sends pages cuts them into pieces of up to 1 MiB, deals the pieces out to
/// the streams in turn, and sends each stream's share on a thread of its own (the calling
/// thread takes stream 0). [`end_round`](Self::end_round) closes the round on every stream;
/// [`finish`](Self::finish) sends the checksums on stream 0 and done on all. A
/// [`MultiReceiver`] with the same number of streams, in any order, reads them.
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use guestmem::migration::{MultiReceiver, MultiSender};
/// use guestmem::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
/// let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
/// src.write_obj(7u64, GuestAddress(0x7f_0000)).unwrap();
/// let (ends, other_ends): (Vec<_>, Vec<_>) = (0..4).map(|_| UnixStream::pair().unwrap()).unzip();
/// std::thread::scope(|s| {
///     let receiver = s.spawn(|| MultiReceiver::new_vectored(other_ends).receive(&dst));
///     let mut sender = MultiSender::new_vectored(ends).unwrap();
///     sender.send_all(&src).unwrap();
///     assert_eq!(sender.end_round().unwrap().pages, 2048);
///     sender.finish(&src).unwrap();
///     assert_eq!(receiver.join().unwrap().unwrap().regions_verified, 1);
/// });
/// assert_eq!(dst.read_obj::<u64>(GuestAddress(0x7f_0000)).unwrap(), 7);
/// ```
#[derive(Debug)]
pub struct MultiSender<W> {
    senders: Vec<Sender<W>>,
    /// The ranges of the last harvest, kept to put them back if the send fails.
    ranges: Vec<(GuestAddress, u64)>,
}

impl<W: Write + AsFd + Send> MultiSender<W> {
    /// Senders on file descriptors (see [`Sender::new_vectored`]), one per stream: writes
    /// every stream's header. 1 to [`MAX_STREAMS`] streams.
    pub fn new_vectored(streams: Vec<W>) -> Result<Self> {
        Self::build(streams, Some(<W as AsFd>::as_fd))
    }
}

impl<W: Write + Send> MultiSender<W> {
    /// Senders on any `Write` (see [`Sender::new`]), one per stream.
    pub fn new(streams: Vec<W>) -> Result<Self> {
        Self::build(streams, None)
    }

    fn build(streams: Vec<W>, fd: Option<fn(&W) -> std::os::fd::BorrowedFd<'_>>) -> Result<Self> {
        let count = u32::try_from(streams.len()).unwrap_or(u32::MAX);
        if count == 0 || count > MAX_STREAMS {
            return Err(MigrationError::Streams { index: count, what: "stream count outside 1 to 64" });
        }
        let session = new_session();
        let tables = Arc::new(Tables::default());
        let senders = streams
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                Sender::with_id(w, fd, StreamId { session, index: i as u32, count }, tables.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MultiSender { senders, ranges: Vec::new() })
    }

    /// Also verify every region's full contents at the end (see [`Sender::verify_memory`]).
    #[must_use]
    pub fn verify_memory(mut self, on: bool) -> Self {
        let first = self.senders.remove(0).verify_memory(on);
        self.senders.insert(0, first);
        self
    }

    /// The number of streams.
    pub fn streams(&self) -> usize {
        self.senders.len()
    }

    /// The round now being sent.
    pub fn round(&self) -> u64 {
        self.senders[0].round()
    }

    /// Bytes written to all streams so far.
    pub fn stream_bytes(&self) -> u64 {
        self.senders.iter().map(Sender::stream_bytes).sum()
    }

    /// The senders, one per stream, in stream order.
    pub fn senders(&self) -> &[Sender<W>] {
        &self.senders
    }

    /// Sends the guest ranges `ranges` over the streams, in parallel (see
    /// [`Sender::send_ranges`]: the whole list is checked first). Returns the guest bytes sent.
    ///
    /// Within a round a page should be sent once (the ranges of a harvest are): two copies of
    /// one page in one round may travel on two streams and land in either order, and the
    /// digests at the end then fail the migration unless both copies were the same.
    pub fn send_ranges<M: GuestMemory + Sync + ?Sized>(
        &mut self,
        mem: &M,
        ranges: &[(GuestAddress, u64)],
    ) -> Result<u64> {
        check_regions(mem)?;
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            check_range(mem, addr, len)?;
        }
        // Deal the ranges out to the streams in turn, in pieces that end on 1 MiB boundaries
        // (each sender rounds its pieces out to whole pages: two pieces never share a page).
        let count = self.senders.len();
        let mut shares: Vec<Vec<(GuestAddress, u64)>> = vec![Vec::new(); count];
        let mut next = 0;
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            let (mut at, end) = (addr.0, addr.0 + len);
            while at < end {
                let n = (end - at).min(PIECE - at % PIECE);
                shares[next].push((GuestAddress(at), n));
                next = (next + 1) % count;
                at += n;
            }
        }
        let results: Vec<Result<u64>> = std::thread::scope(|s| {
            let (first, rest) = self.senders.split_first_mut().expect("at least one stream");
            let handles: Vec<_> = rest
                .iter_mut()
                .zip(&shares[1..])
                .map(|(sender, share)| s.spawn(move || sender.send_ranges(mem, share)))
                .collect();
            let mut results = vec![first.send_ranges(mem, &shares[0])];
            results.extend(
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            results
        });
        results.into_iter().sum()
    }

    /// Sends every region of `mem` whole, over the streams. Returns the guest bytes sent.
    pub fn send_all<M: GuestMemory + Sync + ?Sized>(&mut self, mem: &M) -> Result<u64> {
        let ranges: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        self.send_ranges(mem, &ranges)
    }

    /// Harvests `mem`'s dirty pages and sends them over the streams; on failure the harvested
    /// ranges are put back (see [`Sender::send_dirty`]). Returns the dirty pages harvested.
    pub fn send_dirty<B: Bitmap + DirtyHarvest + Send + Sync>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<usize> {
        let mut ranges = std::mem::take(&mut self.ranges);
        let result = harvest_and_send(mem, &mut ranges, |ranges| self.send_ranges(mem, ranges));
        self.ranges = ranges;
        result
    }

    /// Closes the current round on every stream. Returns what the round held on all of them.
    pub fn end_round(&mut self) -> Result<RoundEnd> {
        let mut total = RoundEnd { round: self.round(), pages: 0, zero_pages: 0, bytes: 0 };
        for sender in &mut self.senders {
            let end = sender.end_round()?;
            total.pages += end.pages;
            total.zero_pages += end.zero_pages;
            total.bytes += end.bytes;
        }
        Ok(total)
    }

    /// Sends the device state on stream 0 (see [`Sender::send_device_state`]): after the final
    /// round's [`end_round`](Self::end_round), before [`finish`](Self::finish).
    pub fn send_device_state(&mut self, state: &[u8]) -> Result<()> {
        self.senders[0].send_device_state(state)
    }

    /// Ends every stream: done on each, after the checksums of `mem` on stream 0 (see
    /// [`Sender::finish`]). Returns the streams, in stream order.
    pub fn finish<M: GuestMemory + ?Sized>(self, mem: &M) -> Result<Vec<W>> {
        self.senders.into_iter().map(|s| s.finish(mem)).collect()
    }
}

/// Reads one migration from several streams, one thread per stream (see the [module
/// docs](super#several-streams)).
///
/// The streams may be given in any order: each header says which it is. They must be every
/// stream of one migration (same session, their count, each index once), or the receive
/// fails. When one stream fails, the others stop at their next frame or end of round. See
/// [`MultiSender`] for an example.
#[derive(Debug)]
pub struct MultiReceiver<R> {
    receivers: Vec<Receiver<R>>,
}

impl<R: Read + AsFd + Send> MultiReceiver<R> {
    /// Receivers on file descriptors (see [`Receiver::new_vectored`]), one per stream.
    pub fn new_vectored(streams: Vec<R>) -> Self {
        MultiReceiver {
            receivers: streams
                .into_iter()
                .map(|r| Receiver::with_path(r, Some(<R as AsFd>::as_fd)))
                .collect(),
        }
    }
}

impl<R: Read + Send> MultiReceiver<R> {
    /// Receivers on any `Read` (see [`Receiver::new`]), one per stream.
    pub fn new(streams: Vec<R>) -> Self {
        MultiReceiver { receivers: streams.into_iter().map(|r| Receiver::with_path(r, None)).collect() }
    }

    /// The device state stream 0 carried (see [`Receiver::take_device_state`]), if the last
    /// receive succeeded and it carried one.
    pub fn take_device_state(&mut self) -> Option<Vec<u8>> {
        self.receivers.iter_mut().find_map(Receiver::take_device_state)
    }

    /// The streams, in the order given.
    pub fn into_inner(self) -> Vec<R> {
        self.receivers.into_iter().map(Receiver::into_inner).collect()
    }

    /// Reads every stream into `mem` and verifies every region's digests (carried by stream
    /// 0). Returns the counts of all streams together.
    pub fn receive<M: GuestMemory + Sync + ?Sized>(&mut self, mem: &M) -> Result<ReceiveSummary> {
        let count = u32::try_from(self.receivers.len()).unwrap_or(u32::MAX);
        if count == 0 || count > MAX_STREAMS {
            return Err(MigrationError::Streams { index: count, what: "stream count outside 1 to 64" });
        }
        let dest = Destination::new(mem)?;
        let rv = Rendezvous::new(count);
        let results: Vec<Result<(u32, ReceiveSummary)>> = std::thread::scope(|s| {
            let (dest, rv) = (&dest, &rv);
            let one = move |r: &mut Receiver<R>| {
                let result = r.read_stream_header().and_then(|id| {
                    rv.join(id)?;
                    r.receive_frames(mem, dest, id.index, Some(rv)).map(|sum| (id.index, sum))
                });
                if result.is_err() {
                    rv.fail();
                }
                result
            };
            let (first, rest) = self.receivers.split_first_mut().expect("at least one stream");
            let handles: Vec<_> = rest.iter_mut().map(|r| s.spawn(move || one(r))).collect();
            let mut results = vec![one(first)];
            results.extend(
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            results
        });
        // The first error that is not the echo of another stream's failure.
        let (mut summaries, mut errors) = (Vec::new(), Vec::new());
        for r in results {
            match r {
                Ok(s) => summaries.push(s),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            let echo = |e: &MigrationError| matches!(e, MigrationError::Streams { what: ANOTHER_FAILED, .. });
            let primary = errors.iter().position(|e| !echo(e)).unwrap_or(0);
            return Err(errors.swap_remove(primary));
        }
        summaries.sort_by_key(|&(index, _)| index);
        let mut total = summaries[0].1;
        for (_, s) in &summaries[1..] {
            total.add(s);
        }
        Ok(total)
    }
}

/// What a stream's thread returns when it stopped because another stream failed.
const ANOTHER_FAILED: &str = "stopped: another stream of the migration failed";

/// What the receiving threads of one migration agree on: who is in it, how far each stream
/// got, and whether one failed.
#[derive(Debug)]
pub(super) struct Rendezvous {
    count: u32,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    session: Option<u64>,
    seen: Vec<bool>,
    /// Rounds each stream has closed.
    closed: Vec<u64>,
    /// The rounds a stream had when it ended (done, or stream 0's checksums).
    ended: Vec<Option<u64>>,
    failed: bool,
}

impl Rendezvous {
    fn new(count: u32) -> Self {
        let n = count as usize;
        Rendezvous {
            count,
            state: Mutex::new(State {
                session: None,
                seen: vec![false; n],
                closed: vec![0; n],
                ended: vec![None; n],
                failed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// A stream's header arrived: it must belong with the others.
    fn join(&self, id: StreamId) -> Result<()> {
        let mut s = self.lock();
        let error = |what| Err(MigrationError::Streams { index: id.index, what });
        if id.count != self.count {
            return error("stream count differs from the number of streams given");
        }
        if *s.session.get_or_insert(id.session) != id.session {
            return error("a stream of another migration (session differs)");
        }
        if std::mem::replace(&mut s.seen[id.index as usize], true) {
            return error("stream index given twice");
        }
        Ok(())
    }

    /// Every other stream failed, stop.
    fn check(&self, s: &State, index: u32) -> Result<()> {
        if s.failed {
            return Err(MigrationError::Streams { index, what: ANOTHER_FAILED });
        }
        Ok(())
    }

    /// Stream `index` closed round `round`: waits until every stream has.
    pub(super) fn end_round(&self, index: u32, round: u64) -> Result<()> {
        let mut s = self.lock();
        s.closed[index as usize] = round + 1;
        self.changed.notify_all();
        loop {
            self.check(&s, index)?;
            if s.ended.iter().any(|e| e.is_some_and(|rounds| rounds <= round)) {
                return Err(MigrationError::Streams {
                    index,
                    what: "another stream ended before this round",
                });
            }
            if s.closed.iter().all(|&c| c > round) {
                return Ok(());
            }
            s = self.wait(s);
        }
    }

    /// Stream `index` (not 0) ended after `rounds` rounds.
    pub(super) fn done(&self, index: u32, rounds: u64) {
        let mut s = self.lock();
        s.ended[index as usize] = Some(rounds);
        self.changed.notify_all();
    }

    /// Stream 0 reached the checksums after `rounds` rounds: waits until every other stream
    /// ended, after as many rounds.
    pub(super) fn wait_all_done(&self, rounds: u64) -> Result<()> {
        let mut s = self.lock();
        s.ended[0] = Some(rounds);
        self.changed.notify_all();
        loop {
            self.check(&s, 0)?;
            if s.ended.iter().all(Option::is_some) {
                if let Some(i) = s.ended.iter().position(|&e| e != Some(rounds)) {
                    return Err(MigrationError::Streams {
                        index: i as u32,
                        what: "streams closed different numbers of rounds",
                    });
                }
                return Ok(());
            }
            s = self.wait(s);
        }
    }

    /// A stream failed: every waiting stream stops.
    pub(super) fn fail(&self) {
        self.lock().failed = true;
        self.changed.notify_all();
    }

    /// Fails if a stream failed (stream `index` then stops too).
    pub(super) fn check_failed(&self, index: u32) -> Result<()> {
        self.check(&self.lock(), index)
    }
}
