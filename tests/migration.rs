//! Live migration: pre-copy rounds over real sockets and pipes while writer threads (or a real
//! KVM guest) dirty the source, then the final round with the source paused; the destination
//! must equal the source byte for byte. Zero pages as zero runs, several streams with the
//! newest copy of a page winning. And the receiver against hostile streams: every malformed
//! input is an error (never a panic or an unbounded allocation), and a frame whose header or
//! runs are invalid leaves destination memory untouched.

mod common;

use common::Rng;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use guestmem::bitmap::{AtomicBitmap, BitmapError};
use guestmem::checksum::Checksum;
use guestmem::migration::{
    MigrationError, MultiReceiver, MultiSender, Precopy, PrecopyConfig, ReceiveSummary, Receiver, Sender,
    StopReason, FRAME_HEADER_LEN, MAGIC, MAX_DEVICE_STATE, MAX_FRAME_DATA, MAX_RUNS, RUN_LEN,
    STREAM_HEADER_LEN, VERSION,
};
use guestmem::mmap::MmapRegionBuilder;
use guestmem::sys::Protection;
use guestmem::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;
const MIB: usize = 1 << 20;

/// Two regions with a hole between them.
fn layout() -> [(GuestAddress, usize); 2] {
    [(GuestAddress(0), 8 * MIB), (GuestAddress(16 * MIB as u64), 8 * MIB)]
}

fn tracked(ranges: &[(GuestAddress, usize)]) -> Mem {
    GuestMemoryMmap::from_ranges(ranges).unwrap()
}

fn assert_same<M: GuestMemory, N: GuestMemory>(src: &M, dst: &N) {
    let (a, b) = (common::contents(src), common::contents(dst));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if let Some(at) = x.iter().zip(y).position(|(p, q)| p != q) {
            panic!("region {i} differs first at offset {at:#x}");
        }
    }
}

/// A random guest address in `mem`, 8-byte aligned.
fn random_addr(rng: &mut Rng, mem: &Mem) -> GuestAddress {
    let regions: Vec<_> = mem.iter().collect();
    let r = regions[rng.below(regions.len() as u64) as usize];
    GuestAddress(r.start_addr().0 + rng.below(r.len() / 8) * 8)
}

/// Fills every region with a pattern, through the API.
fn fill(mem: &Mem, seed: u64) {
    let mut rng = Rng(seed | 1);
    for r in mem.iter() {
        let data: Vec<u8> = (0..r.len()).map(|_| rng.next() as u8).collect();
        mem.write_slice(&data, r.start_addr()).unwrap();
    }
}

/// A writer thread dirtying `mem` through the API until `stop`, counting its writes in
/// `writes` (by 64).
fn run_writers(mem: &Mem, stop: &AtomicBool, writes: &AtomicU64, seed: u64) {
    let mut rng = Rng(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let addr = random_addr(&mut rng, mem);
        if n.is_multiple_of(3) {
            mem.write_slice(&[n as u8; 100][..(n % 97) as usize], addr).ok(); // may cross a region end
        } else {
            mem.write_obj(n ^ seed, addr).unwrap();
        }
        n += 1;
        if n.is_multiple_of(64) {
            writes.fetch_add(64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Fills one page in 4 of every region with a pattern and writes zeros over the others (so
/// that they are resident), through the API.
fn fill_one_in_four(mem: &Mem, seed: u64) {
    let mut rng = Rng(seed | 1);
    for r in mem.iter() {
        for p in 0..r.len() / PAGE {
            let data: Vec<u8> = if p % 4 == 0 {
                (0..PAGE).map(|_| rng.next() as u8 | 1).collect()
            } else {
                vec![0; PAGE as usize]
            };
            mem.write_slice(&data, GuestAddress(r.start_addr().0 + p * PAGE)).unwrap();
        }
    }
}

#[test]
fn precopy_with_concurrent_writers_over_a_unix_socket() {
    let src = tracked(&layout());
    fill(&src, 7);
    let dst = tracked(&layout());
    let (a, b) = UnixStream::pair().unwrap();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    // No downtime budget: pre-copy runs until nothing is dirty or for `max_rounds`, so the
    // writers get several dirty rounds to race with.
    let config = PrecopyConfig { downtime: Duration::ZERO, max_rounds: 5, rate_window: 3 };
    let (report, summary) = std::thread::scope(|s| {
        let receiver = s.spawn(|| Receiver::new_vectored(b).receive(&dst));
        let (src_ref, stop_ref, writes_ref) = (&src, &stop, &writes);
        let writers: Vec<_> =
            (0..2).map(|i| s.spawn(move || run_writers(src_ref, stop_ref, writes_ref, 11 + i))).collect();
        while writes.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let sender = Sender::new_vectored(a).unwrap().verify_memory(true);
        let mut precopy = Precopy::new(sender, &src, config, || Ok::<_, io::Error>(()));
        let stop_reason = precopy.run().unwrap();
        assert!(precopy.rounds().len() >= 2, "round 0 and at least one dirty round: {stop_reason:?}");
        // Pause the source: stop and join the writers.
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let (report, _) = precopy.complete().unwrap();
        (report, receiver.join().unwrap().unwrap())
    });
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert_same(&src, &dst);
    // Round 0 sent all 16 MiB, every round came with its stats, and the receiver agrees.
    assert_eq!(report.rounds[0].bytes, 16 * MIB as u64);
    assert!(report.rounds[1..].iter().all(|r| r.dirty_pages_per_sec.is_some()));
    let all_rounds = report.rounds.len() as u64 + 1;
    assert_eq!(summary.rounds, all_rounds);
    let pages: u64 = report.rounds.iter().map(|r| r.pages).sum::<u64>() + report.final_round.pages;
    assert_eq!(summary.pages, pages);
    assert_eq!((summary.regions_verified, summary.memory_verified), (2, true));
    assert!(report.bandwidth > 0.0);
    assert!(report.stream_bytes > 16 * MIB as u64);
    match report.stop {
        StopReason::Converged { remaining_bytes, .. } => assert_eq!(remaining_bytes, 0),
        StopReason::MaxRounds { .. } => assert_eq!(report.rounds.len(), 6),
    }
    // The destination's own tracking saw every page arrive.
    assert_eq!(dst.dirty_page_count().unwrap(), 16 * MIB / PAGE as usize);
}

#[test]
fn plain_read_and_write_streams_carry_given_ranges() {
    // Adjacent regions, so one range crosses from the first into the second; and a range
    // longer than one frame.
    let ranges = [(GuestAddress(0), 6 * MIB), (GuestAddress(6 * MIB as u64), MIB)];
    let src = tracked(&ranges);
    fill(&src, 3);
    let dst = tracked(&ranges);
    let send = [
        (GuestAddress(0x1000), 0x10),
        (GuestAddress(6 * MIB as u64 - 0x800), 0x1000),
        (GuestAddress(0x10_0000), 5 << 20),
    ];
    let mut sender = Sender::new(Vec::new()).unwrap();
    let bytes = sender.send_ranges(&src, &send).unwrap();
    // Whole pages: 16 bytes are a page, 4 KiB across a page boundary are two.
    assert_eq!(bytes, PAGE + 2 * PAGE + (5 << 20));
    let end = sender.end_round().unwrap();
    assert_eq!((end.round, end.pages, end.zero_pages, end.bytes), (0, 1283, 0, bytes));
    // Round 1 sends the rest, so the checksums can agree.
    sender.send_all(&src).unwrap();
    assert_eq!(sender.end_round().unwrap().round, 1);
    assert_eq!(sender.round(), 2);
    let stream = sender.finish(&src).unwrap();
    let mut receiver = Receiver::new(&stream[..]);
    let summary = receiver.receive(&dst).unwrap();
    assert_eq!(receiver.offset(), stream.len() as u64);
    assert_eq!(
        summary,
        ReceiveSummary {
            rounds: 2,
            pages: 1283 + 7 * 256,
            zero_pages: 0,
            bytes: bytes + 7 * MIB as u64,
            regions_verified: 2,
            memory_verified: false,
            device_state_len: None,
        }
    );
    assert_same(&src, &dst);
}

#[test]
fn vectored_and_plain_paths_write_the_same_bytes() {
    // Three adjacent small regions, zero and data pages, hundreds of random ranges (many
    // crossing regions, overlapping, out of order): the `writev` path and the plain `Write`
    // path must put the very same bytes on the stream.
    let layout: Vec<_> = (0..3u64).map(|i| (GuestAddress(i * 0x10000), 0x10000)).collect();
    let src = tracked(&layout);
    fill_one_in_four(&src, 21);
    let mut rng = Rng(99);
    // (None in the last 32 KiB: some data pages are never sent.)
    let ranges: Vec<(GuestAddress, u64)> = (0..300)
        .map(|_| {
            let start = rng.next() % 0x28000;
            let len = (rng.next() % 0x5000).min(0x28000 - start);
            (GuestAddress(start), len)
        })
        .collect();
    fn send<W: io::Write>(sender: &mut Sender<W>, src: &Mem, ranges: &[(GuestAddress, u64)]) {
        for chunk in ranges.chunks(100) {
            sender.send_ranges(src, chunk).unwrap();
            sender.end_round().unwrap();
        }
    }
    let mut plain = Sender::new(Vec::new()).unwrap().verify_memory(true);
    send(&mut plain, &src, &ranges);
    let plain = plain.finish(&src).unwrap();
    let (a, mut b) = UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        b.read_to_end(&mut all).unwrap();
        all
    });
    let mut vectored = Sender::new_vectored(a).unwrap().verify_memory(true);
    send(&mut vectored, &src, &ranges);
    drop(vectored.finish(&src).unwrap());
    // The streams differ in their headers' session numbers only.
    let vectored = reader.join().unwrap();
    assert_eq!(vectored.len(), plain.len());
    assert!(
        vectored[..16] == plain[..16] && vectored[24..] == plain[24..],
        "the two paths wrote different streams"
    );
    // Only the ranges were sent: what arrived is what was sent (the stream digests agree), but
    // the memory differs from the source's, and the memory digest names the first region
    // that differs.
    let dst = tracked(&layout);
    let e = Receiver::new(&plain[..]).receive(&dst).unwrap_err();
    let expect = tracked(&layout);
    for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
        // The stream sends whole pages.
        let (start, end) = (addr.0 & !(PAGE - 1), (addr.0 + len).next_multiple_of(PAGE));
        let mut buf = vec![0u8; (end - start) as usize];
        src.read_slice(&mut buf, GuestAddress(start)).unwrap();
        expect.write_slice(&buf, GuestAddress(start)).unwrap();
    }
    let first_bad = (0..3).find(|&i| common::contents(&expect)[i] != common::contents(&src)[i]).unwrap();
    assert!(
        matches!(e, MigrationError::ChecksumMismatch { addr: GuestAddress(a), len: 0x10000, what: "memory contents", .. } if a == first_bad as u64 * 0x10000),
        "{e}"
    );
}

#[test]
fn pipes_and_tcp_carry_the_stream_vectored() {
    let src = tracked(&layout());
    fill(&src, 5);
    // A pipe (writev into a pipe, readv out of it).
    let dst = tracked(&layout());
    let (r, w) = io::pipe().unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| Receiver::new_vectored(r).receive(&dst));
        let mut sender = Sender::new_vectored(w).unwrap();
        sender.send_all(&src).unwrap();
        sender.end_round().unwrap();
        drop(sender.finish(&src).unwrap());
        receiver.join().unwrap().unwrap();
    });
    assert_same(&src, &dst);

    // Loopback TCP, with the dirty pages of the source only.
    let dst = tracked(&layout());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap();
    src.take_dirty_ranges(|_, _| {}).unwrap();
    src.write_obj(1u8, GuestAddress(0x5000)).unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| Receiver::new_vectored(listener.accept().unwrap().0).receive(&dst));
        let mut sender = Sender::new_vectored(std::net::TcpStream::connect(port).unwrap()).unwrap();
        assert_eq!(sender.send_dirty(&src).unwrap(), 1);
        sender.end_round().unwrap();
        let before = sender.stream_bytes();
        sender.send_all(&src).unwrap();
        // 16 MiB of data, in frames of one run each: framing is under 0.1%.
        let framing = sender.stream_bytes() - before - 16 * MIB as u64;
        assert!(
            framing.is_multiple_of((FRAME_HEADER_LEN + RUN_LEN) as u64) && framing < 16 * MIB as u64 / 1000,
            "{framing}"
        );
        sender.end_round().unwrap();
        let _tcp: std::net::TcpStream = sender.finish(&src).unwrap();
        assert_eq!(receiver.join().unwrap().unwrap().rounds, 2);
    });
    assert_same(&src, &dst);
}

#[test]
fn zero_pages_travel_as_zero_runs_and_leave_zero_memory_untouched() {
    // The source: one page in 4 of data, the others zero, resident (written) in region 0 and
    // never touched in region 1 but for its first page.
    let src = tracked(&layout());
    for p in 0..8 * MIB as u64 / PAGE {
        let data = if p % 4 == 0 { [p as u8 | 1; PAGE as usize] } else { [0; PAGE as usize] };
        src.write_slice(&data, GuestAddress(p * PAGE)).unwrap();
    }
    src.write_obj(0xabcd_u64, GuestAddress(16 * MIB as u64)).unwrap();
    let data_pages = 8 * MIB as u64 / PAGE / 4 + 1;

    // Into a destination of stale data (every page non-zero, as after an earlier round) and
    // into a fresh one (nothing resident).
    let stale = tracked(&layout());
    for r in stale.iter() {
        stale.write_slice(&vec![0xee; r.len() as usize], r.start_addr()).unwrap();
    }
    let fresh = tracked(&layout());
    for dst in [&stale, &fresh] {
        let mut sender = Sender::new(Vec::new()).unwrap().verify_memory(true);
        assert_eq!(sender.send_all(&src).unwrap(), 16 * MIB as u64);
        let end = sender.end_round().unwrap();
        assert_eq!(
            (end.pages, end.zero_pages),
            (16 * MIB as u64 / PAGE, 16 * MIB as u64 / PAGE - data_pages)
        );
        let stream = sender.finish(&src).unwrap();
        // Zero pages carry no data: the stream is the data pages and a little framing.
        let data = data_pages * PAGE;
        assert!(
            stream.len() as u64 > data && (stream.len() as u64) < data + data / 20,
            "{} bytes",
            stream.len()
        );
        let summary = Receiver::new(&stream[..]).receive(dst).unwrap();
        assert_eq!((summary.pages, summary.zero_pages), (end.pages, end.zero_pages));
        assert!(summary.memory_verified);
        if std::ptr::eq(dst, &fresh) {
            // The fresh destination's zero pages were never touched (not even read, by the
            // memory digest): only the data pages, and none of region 1 but its first, became
            // resident.
            let resident = |i: usize| {
                let r = &fresh.regions()[i];
                r.resident_pages(0, r.len() as usize).unwrap() as u64
            };
            assert_eq!((resident(0), resident(1)), (data_pages - 1, 1));
        }
        if std::ptr::eq(dst, &stale) {
            // (Before anything compares the source.) The source's untouched pages were not
            // read either, by the send or by its memory digest (reading them would have mapped
            // them): its region 1 still has one resident page.
            let r = &src.regions()[1];
            assert_eq!(r.resident_pages(0, r.len() as usize).unwrap(), 1);
        }
        assert_same(&src, dst);
        // The destination's tracking saw every page the stream set, zero ones too.
        assert_eq!(dst.dirty_page_count().unwrap(), 16 * MIB / PAGE as usize);
    }
}

#[test]
fn a_page_zeroed_after_its_round_is_zeroed_at_the_destination() {
    let src = tracked(&[(GuestAddress(0), MIB)]);
    src.write_slice(&[0x77; 2 * PAGE as usize], GuestAddress(0x4000)).unwrap();
    let mut sender = Sender::new(Vec::new()).unwrap().verify_memory(true);
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    // The guest zeroes one of the pages: round 1 sends it as a zero run.
    src.take_dirty_ranges(|_, _| {}).unwrap();
    src.write_slice(&[0; PAGE as usize], GuestAddress(0x5000)).unwrap();
    assert_eq!(sender.send_dirty(&src).unwrap(), 1);
    assert_eq!(sender.end_round().unwrap().zero_pages, 1);
    // The same page as data again, then zero again, in one round: the later copy wins.
    src.write_slice(&[0x99; PAGE as usize], GuestAddress(0x6000)).unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0x6000), PAGE)]).unwrap();
    src.write_slice(&[0x98; PAGE as usize], GuestAddress(0x6000)).unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0x6000), PAGE)]).unwrap();
    src.write_slice(&[0; PAGE as usize], GuestAddress(0x6000)).unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0x6000), PAGE)]).unwrap();
    sender.end_round().unwrap();
    let stream = sender.finish(&src).unwrap();
    // Through a plain reader, and through a socket (where the receiver hashes pages while the
    // socket is empty: a page's hashes must still land in the order its copies came).
    for vectored in [false, true] {
        let dst = tracked(&[(GuestAddress(0), MIB)]);
        if vectored {
            let (mut a, b) = UnixStream::pair().unwrap();
            let data = stream.clone();
            let w = std::thread::spawn(move || {
                // In small pieces, with pauses, so that the receiver finds the socket empty.
                for piece in data.chunks(6000) {
                    io::Write::write_all(&mut a, piece).unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            Receiver::new_vectored(b).receive(&dst).unwrap();
            w.join().unwrap();
        } else {
            Receiver::new(&stream[..]).receive(&dst).unwrap();
        }
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x4ff8)).unwrap(), 0x7777_7777_7777_7777);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x6000)).unwrap(), 0);
        assert_same(&src, &dst);
    }
}

#[test]
fn random_rounds_of_data_and_zero_pages_end_equal_to_the_source() {
    // Two regions; rounds where random pages become data or zero (some sent several times in a
    // round, some absent at both ends), through a plain reader, a socket fed in small pieces,
    // and three streams; into fresh destinations and destinations of stale data. Whatever the
    // order, the destination ends equal to the source, and both digests agree.
    random_rounds(&[(GuestAddress(0), 64 * PAGE as usize), (GuestAddress(0x100000), 32 * PAGE as usize)]);
}

#[test]
fn regions_whose_last_page_is_partial_migrate_through_every_path() {
    // The same rounds on regions whose last page is partial (100 and 3000 bytes of it in the
    // region): that page travels whole, as data or as a zero run, and only its bytes in the
    // region count at either end.
    random_rounds(&[
        (GuestAddress(0), 10 * PAGE as usize + 100),
        (GuestAddress(0x100000), 5 * PAGE as usize + 3000),
    ]);
}

fn random_rounds(layout: &[(GuestAddress, usize)]) {
    for seed in 1..=12u64 {
        let mut rng = Rng(seed * 0x9e37_79b9);
        let src = tracked(layout);
        let pages: Vec<(u64, usize)> = src
            .iter()
            .flat_map(|r| {
                let (start, len) = (r.start_addr().0, r.len());
                (0..len.div_ceil(PAGE)).map(move |p| (start + p * PAGE, (len - p * PAGE).min(PAGE) as usize))
            })
            .collect();
        let mut single = Sender::new(Vec::new()).unwrap().verify_memory(true);
        let mut multi =
            MultiSender::new(vec![Vec::new(), Vec::new(), Vec::new()]).unwrap().verify_memory(true);
        src.take_dirty_ranges(|_, _| {}).unwrap();
        single.send_all(&src).unwrap();
        multi.send_all(&src).unwrap();
        single.end_round().unwrap();
        multi.end_round().unwrap();
        for _ in 0..5 {
            for _ in 0..(rng.next() % 12) {
                let (at, len) = pages[(rng.next() % pages.len() as u64) as usize];
                let data: Vec<u8> = match rng.next() % 3 {
                    0 => vec![0; len],
                    _ => (0..len).map(|_| rng.next() as u8).collect(),
                };
                src.write_slice(&data, GuestAddress(at)).unwrap();
                // Sometimes sent at once (and so twice in the round, with the harvest below).
                if rng.next().is_multiple_of(3) {
                    single.send_ranges(&src, &[(GuestAddress(at), len as u64)]).unwrap();
                }
            }
            // The multi-stream sender gets each page once per round (see its docs).
            let mut dirty = Vec::new();
            src.take_dirty_ranges(|a, l| dirty.push((a, l))).unwrap();
            single.send_ranges(&src, &dirty).unwrap();
            multi.send_ranges(&src, &dirty).unwrap();
            single.end_round().unwrap();
            multi.end_round().unwrap();
        }
        let one = single.finish(&src).unwrap();
        let three = multi.finish(&src).unwrap();
        for (k, stale) in [(0, false), (1, true), (2, false), (3, true), (4, false), (4, true)] {
            let dst = tracked(layout);
            if stale {
                for r in dst.iter() {
                    let junk: Vec<u8> = (0..r.len()).map(|_| rng.next() as u8).collect();
                    dst.write_slice(&junk, r.start_addr()).unwrap();
                }
            }
            let summary = match k {
                0 => Receiver::new(&one[..]).receive(&dst),
                1 => {
                    let (mut a, b) = UnixStream::pair().unwrap();
                    let data = one.clone();
                    let w = std::thread::spawn(move || {
                        for piece in data.chunks(5000) {
                            io::Write::write_all(&mut a, piece).unwrap();
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    });
                    let r = Receiver::new_vectored(b).receive(&dst);
                    w.join().unwrap();
                    r
                }
                2 | 3 => MultiReceiver::new(three.iter().map(|s| &s[..]).collect()).receive(&dst),
                _ => {
                    let (ends, other_ends) = socket_pairs(3);
                    let writers: Vec<_> = ends
                        .into_iter()
                        .zip(three.clone())
                        .map(|(mut a, data)| {
                            std::thread::spawn(move || {
                                for piece in data.chunks(7000) {
                                    io::Write::write_all(&mut a, piece).unwrap();
                                    std::thread::sleep(Duration::from_micros(100));
                                }
                            })
                        })
                        .collect();
                    let r = MultiReceiver::new_vectored(other_ends).receive(&dst);
                    writers.into_iter().for_each(|w| w.join().unwrap());
                    r
                }
            };
            let summary = summary.unwrap_or_else(|e| panic!("seed {seed}, receiver {k}: {e}"));
            assert!(summary.memory_verified);
            assert_same(&src, &dst);
        }
    }
}

#[test]
fn version_1_streams_are_refused_with_a_clear_error() {
    // A version 1 stream: a 16-byte header, then 24-byte frames with every page as data.
    let mut v1 = MAGIC.to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&0u32.to_le_bytes());
    v1.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    v1.extend_from_slice(&0u64.to_le_bytes());
    v1.extend_from_slice(&4096u64.to_le_bytes());
    v1.extend_from_slice(&[0xaa; 4096]);
    let e = receive_err(&v1, true);
    assert!(matches!(e, MigrationError::UnsupportedVersion(1)), "{e}");
    assert_eq!(e.to_string(), "stream version 1 is not supported (this build reads version 2 only)");
    // Just the 16 bytes are enough to tell.
    assert!(matches!(receive_err(&v1[..16], true), MigrationError::UnsupportedVersion(1)));
}

#[test]
fn failed_send_puts_the_dirty_pages_back() {
    let src = tracked(&layout());
    src.write_slice(&[1; 3 * PAGE as usize], GuestAddress(0x10_0000)).unwrap();
    src.write_obj(1u8, GuestAddress(16 * MIB as u64)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let mut sender = Sender::new_vectored(a).unwrap();
    drop(b);
    let e = sender.send_dirty(&src).unwrap_err();
    assert!(
        matches!(e, MigrationError::Io { ref source, .. } if source.kind() == io::ErrorKind::BrokenPipe),
        "{e}"
    );
    assert_eq!(src.dirty_page_count().unwrap(), 4);

    // The same through the plain `Write` path, with a sink that fails.
    struct Full;
    impl io::Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(Sender::new(Full), Err(MigrationError::Io { .. })));
    let mut ok_once = Sender::new(Vec::new()).unwrap();
    ok_once.send_dirty(&src).unwrap();
    assert_eq!(src.dirty_page_count().unwrap(), 0);
    src.restore_dirty_ranges(&[(GuestAddress(0x10_0000), 3 * PAGE)]).unwrap();
    // A sender whose stream fails after the header.
    let mut budget = STREAM_HEADER_LEN;
    struct Limited<'a>(&'a mut usize);
    impl io::Write for Limited<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if *self.0 == 0 {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let n = b.len().min(*self.0);
            *self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut sender = Sender::new(Limited(&mut budget)).unwrap();
    assert!(matches!(sender.send_dirty(&src), Err(MigrationError::Io { .. })));
    assert_eq!(src.dirty_page_count().unwrap(), 3);
}

#[test]
fn sender_refuses_ranges_outside_memory_and_untracked_memory() {
    let src = tracked(&layout());
    let mut sender = Sender::new(Vec::new()).unwrap();
    // The second range runs into the hole: nothing is sent, not even the valid first range.
    let e = sender
        .send_ranges(&src, &[(GuestAddress(0), PAGE), (GuestAddress(8 * MIB as u64 - PAGE), 2 * PAGE)])
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::Memory { addr: GuestAddress(a), len: 8192, .. } if a == 8 * MIB as u64 - PAGE),
        "{e}"
    );
    assert!(matches!(
        sender.send_ranges(&src, &[(GuestAddress(0), u64::MAX)]),
        Err(MigrationError::Memory { .. })
    ));
    assert!(matches!(
        sender.send_ranges(&src, &[(GuestAddress(u64::MAX - 8), 4)]),
        Err(MigrationError::Memory { source: GuestMemoryError::Overflow { .. }, .. })
    ));
    assert_eq!(sender.get_ref().len(), STREAM_HEADER_LEN, "only the stream header");

    let untracked = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(MIB).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let untracked = GuestMemoryMmap::from_regions(vec![untracked]).unwrap();
    let e = sender.send_dirty(&untracked).unwrap_err();
    assert!(matches!(e, MigrationError::Harvest(BitmapError::NotTracking)), "{e}");
}

#[test]
fn a_harvest_that_fails_part_way_loses_no_dirty_page() {
    // Region 0 tracks writes, region 1 does not: the harvest must fail before it takes region
    // 0's pages, or they are gone (the send fails, so nobody sends them).
    let tracked =
        GuestRegionMmap::build(MmapRegionBuilder::<Option<AtomicBitmap>>::new(MIB), GuestAddress(0)).unwrap();
    let untracked = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(MIB).dirty_tracking(false),
        GuestAddress(MIB as u64),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![tracked, untracked]).unwrap();
    mem.write_slice(&[7; 3 * PAGE as usize], GuestAddress(0x4000)).unwrap();
    let region0 = || mem.regions()[0].bitmap().as_ref().unwrap().dirty_page_count();
    assert_eq!(region0(), 3);
    let mut sender = Sender::new(Vec::new()).unwrap();
    let e = sender.send_dirty(&mem).unwrap_err();
    assert!(matches!(e, MigrationError::Harvest(BitmapError::NotTracking)), "{e}");
    assert_eq!(region0(), 3, "the tracked region's dirty pages are still there");
    assert_eq!(sender.get_ref().len(), STREAM_HEADER_LEN, "nothing was sent");
    // The same through several streams.
    let mut multi = MultiSender::new(vec![Vec::new(), Vec::new()]).unwrap();
    assert!(matches!(multi.send_dirty(&mem), Err(MigrationError::Harvest(BitmapError::NotTracking))));
    assert_eq!(region0(), 3);
}

#[test]
fn empty_ranges_are_skipped_wherever_they_point() {
    let src = tracked(&layout());
    let mut sender = Sender::new(Vec::new()).unwrap();
    // In the hole, past the end, at the top of the address space: empty, so nothing to check.
    let empty = [(GuestAddress(9 * MIB as u64), 0), (GuestAddress(1 << 40), 0), (GuestAddress(u64::MAX), 0)];
    assert_eq!(sender.send_ranges(&src, &empty).unwrap(), 0);
    let mixed = [(GuestAddress(1 << 40), 0), (GuestAddress(0x1000), PAGE), (GuestAddress(9 * MIB as u64), 0)];
    assert_eq!(sender.send_ranges(&src, &mixed).unwrap(), PAGE);
    assert_eq!(sender.end_round().unwrap().pages, 1);
    let mut multi = MultiSender::new(vec![Vec::new(), Vec::new()]).unwrap();
    assert_eq!(multi.send_ranges(&src, &mixed).unwrap(), PAGE);
}

#[test]
fn a_failing_sync_hook_stops_the_migration() {
    let src = tracked(&layout());
    let mut calls = 0;
    let mut precopy = Precopy::new(Sender::new(io::sink()).unwrap(), &src, PrecopyConfig::default(), || {
        calls += 1;
        if calls > 1 {
            Err(io::Error::other("KVM_GET_DIRTY_LOG failed"))
        } else {
            Ok(())
        }
    });
    let e = precopy.run().unwrap_err();
    assert!(format!("{precopy:?}").starts_with("Precopy {"));
    assert!(matches!(e, MigrationError::Sync(_)), "{e}");
    assert!(e.to_string().contains("KVM_GET_DIRTY_LOG"), "{e}");
    assert_eq!(precopy.rounds().len(), 1);
}

#[test]
fn precopy_stops_after_max_rounds_when_it_cannot_converge() {
    let src = tracked(&[(GuestAddress(0), MIB)]);
    // A "guest" that dirties everything before every harvest: never converges.
    let config = PrecopyConfig { downtime: Duration::ZERO, max_rounds: 3, rate_window: 2 };
    let sync = || src.restore_dirty_ranges(&[(GuestAddress(0), MIB as u64)]);
    let precopy = Precopy::new(Sender::new(Vec::new()).unwrap(), &src, config, sync);
    let (report, stream) = precopy.complete().unwrap();
    assert_eq!(report.stop, StopReason::MaxRounds { remaining_bytes: MIB as u64 });
    assert_eq!(report.rounds.len(), 4);
    assert!(report.rounds.iter().all(|r| r.bytes == MIB as u64 && r.zero_pages == 256));
    assert_eq!(report.final_round.round, 4);
    assert!(report.rounds[0].bandwidth() > 0.0);
    assert_eq!(report.stream_bytes, stream.len() as u64);
    let dst = tracked(&[(GuestAddress(0), MIB)]);
    assert_eq!(Receiver::new(&stream[..]).receive(&dst).unwrap().rounds, 5);
}

// ---- Several streams ----

/// `n` connected Unix socket pairs: the sending ends and the receiving ends.
fn socket_pairs(n: usize) -> (Vec<UnixStream>, Vec<UnixStream>) {
    (0..n).map(|_| UnixStream::pair().unwrap()).unzip()
}

#[test]
fn precopy_over_four_streams_with_concurrent_writers() {
    let src = tracked(&layout());
    fill(&src, 17);
    let dst = tracked(&layout());
    let (ends, other_ends) = socket_pairs(4);
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let config = PrecopyConfig { downtime: Duration::ZERO, max_rounds: 6, rate_window: 3 };
    let (report, summary) = std::thread::scope(|s| {
        let receiver = s.spawn(|| MultiReceiver::new_vectored(other_ends).receive(&dst));
        let (src_ref, stop_ref, writes_ref) = (&src, &stop, &writes);
        let writers: Vec<_> =
            (0..2).map(|i| s.spawn(move || run_writers(src_ref, stop_ref, writes_ref, 31 + i))).collect();
        while writes.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let sender = MultiSender::new_vectored(ends).unwrap().verify_memory(true);
        assert_eq!(sender.streams(), 4);
        let mut precopy = Precopy::new(sender, &src, config, || Ok::<_, io::Error>(()));
        precopy.run().unwrap();
        assert!(precopy.rounds().len() >= 2);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let (report, streams) = precopy.complete().unwrap();
        assert_eq!(streams.len(), 4);
        (report, receiver.join().unwrap().unwrap())
    });
    assert_same(&src, &dst);
    let pages: u64 = report.rounds.iter().map(|r| r.pages).sum::<u64>() + report.final_round.pages;
    assert_eq!((summary.rounds, summary.pages), (report.rounds.len() as u64 + 1, pages));
    assert_eq!((summary.regions_verified, summary.memory_verified), (2, true));
    assert_eq!(dst.dirty_page_count().unwrap(), 16 * MIB / PAGE as usize);
}

/// A reader that holds its bytes back until `release` is set.
struct Held<'a> {
    data: &'a [u8],
    release: &'a AtomicBool,
}

impl Read for Held<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.release.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.data.read(buf)
    }
}

#[test]
fn a_page_resent_in_a_later_round_wins_whichever_stream_comes_first() {
    // 4 MiB in 1 MiB pieces over 2 streams: round 0 sends the page at 1.5 MiB on stream 1;
    // round 1 sends it again, changed, on stream 0.
    let page = GuestAddress(0x18_0000);
    let src = tracked(&[(GuestAddress(0), 4 * MIB)]);
    fill(&src, 41);
    let mut sender = MultiSender::new(vec![Vec::new(), Vec::new()]).unwrap();
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    let round0 = src.read_obj::<u64>(page).unwrap();
    src.write_obj(!round0, page).unwrap();
    assert_eq!(sender.send_ranges(&src, &[(page, 8)]).unwrap(), PAGE);
    sender.end_round().unwrap();
    let streams = sender.finish(&src).unwrap();
    let round1_on_0 = streams[0].len();
    assert!(round1_on_0 > 0);

    // Stream 0 (round 1's copy) is readable at once; stream 1 (round 0's copy) only after a
    // while: without the barrier, the round-0 copy would land last and win.
    let dst = tracked(&[(GuestAddress(0), 4 * MIB)]);
    let release = AtomicBool::new(false);
    let summary = std::thread::scope(|s| {
        let release = &release;
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            release.store(true, Ordering::Release);
        });
        let free = AtomicBool::new(true);
        // Given in the other order: each header says which stream it is.
        MultiReceiver::new(vec![
            Held { data: &streams[1], release },
            Held { data: &streams[0], release: &free },
        ])
        .receive(&dst)
        .unwrap()
    });
    assert_eq!(dst.read_obj::<u64>(page).unwrap(), !round0);
    assert_eq!(summary.rounds, 2);
    assert_same(&src, &dst);
}

#[test]
fn a_page_zeroed_on_one_stream_after_data_on_another_is_zeroed() {
    // Round 0: 4 MiB of zero pages in 1 MiB pieces over 3 streams; stream 1's receiver finds
    // [1 MiB, 2 MiB) absent at the destination. Round 1: a page there gets data, on stream 0.
    // Round 2: the page is zero again, sent on stream 1 (the second range of the call), whose
    // old lookup must not be trusted: the page became present since.
    let page = GuestAddress(0x10_0000);
    let src = tracked(&[(GuestAddress(0), 4 * MIB)]);
    let mut sender = MultiSender::new(vec![Vec::new(), Vec::new(), Vec::new()]).unwrap();
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    src.write_slice(&[0x77; PAGE as usize], page).unwrap();
    sender.send_ranges(&src, &[(page, PAGE)]).unwrap();
    sender.end_round().unwrap();
    src.write_slice(&[0; PAGE as usize], page).unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0x30_0000), PAGE), (page, PAGE)]).unwrap();
    sender.end_round().unwrap();
    let streams = sender.finish(&src).unwrap();
    let dst = tracked(&[(GuestAddress(0), 4 * MIB)]);
    MultiReceiver::new(streams.iter().map(|s| &s[..]).collect()).receive(&dst).unwrap();
    assert_eq!(dst.read_obj::<u64>(page).unwrap(), 0);
    assert_same(&src, &dst);
}

#[test]
fn hostile_stream_sets() {
    let src = small();
    fill(&src, 3);
    let streams = |n: usize| {
        let mut sender = MultiSender::new((0..n).map(|_| Vec::new()).collect()).unwrap();
        sender.send_all(&src).unwrap();
        sender.end_round().unwrap();
        sender.finish(&src).unwrap()
    };
    let receive = |set: Vec<Vec<u8>>| {
        let dst = small();
        let readers: Vec<&[u8]> = set.iter().map(|s| &s[..]).collect();
        MultiReceiver::new(readers).receive(&dst)
    };
    let (a, b) = (streams(2), streams(2));
    assert!(receive(a.clone()).is_ok());
    // Streams of two migrations.
    let e = receive(vec![a[0].clone(), b[1].clone()]).unwrap_err();
    assert!(matches!(e, MigrationError::Streams { what, .. } if what.contains("another migration")), "{e}");
    // The same stream twice.
    let e = receive(vec![a[0].clone(), a[0].clone()]).unwrap_err();
    assert!(matches!(e, MigrationError::Streams { index: 0, what } if what.contains("twice")), "{e}");
    // Two of three streams.
    let c = streams(3);
    let e = receive(c[..2].to_vec()).unwrap_err();
    assert!(matches!(e, MigrationError::Streams { what, .. } if what.contains("count differs")), "{e}");
    // A stream of a multi-stream migration given to a single receiver.
    let e = Receiver::new(&a[1][..]).receive(&small()).unwrap_err();
    assert!(matches!(e, MigrationError::Streams { index: 1, .. }), "{e}");
    // No stream, or too many.
    assert!(matches!(receive(vec![]), Err(MigrationError::Streams { .. })));
    assert!(matches!(MultiSender::new(Vec::<Vec<u8>>::new()), Err(MigrationError::Streams { .. })));
    assert!(matches!(MultiSender::new(vec![Vec::new(); 65]), Err(MigrationError::Streams { .. })));
    // Stream 1 ends (done) before closing round 0, stream 0 goes on.
    let mut short = a[1][..STREAM_HEADER_LEN].to_vec();
    short.extend_from_slice(&frame(4, 0, 0, 0, 0));
    let e = receive(vec![a[0].clone(), short]).unwrap_err();
    assert!(matches!(e, MigrationError::Streams { what, .. } if what.contains("ended before")), "{e}");
    // Stream 1 breaks off in the middle: stream 0 stops too, and the error is stream 1's.
    let cut = a[1][..a[1].len() - 40].to_vec();
    let e = receive(vec![a[0].clone(), cut]).unwrap_err();
    assert!(matches!(e, MigrationError::Truncated { .. }), "{e}");
    // Device state on stream 1 (it goes on stream 0 only).
    let mut state_on_1 = a[1][..a[1].len() - FRAME_HEADER_LEN].to_vec();
    state_on_1.extend_from_slice(&device_state(b"registers"));
    state_on_1.extend_from_slice(&frame(4, 0, 0, 0, 0));
    let e = receive(vec![a[0].clone(), state_on_1]).unwrap_err();
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "device state", .. }), "{e}");
    // A stream header with a count of 0 or over 64, or an index past the count.
    for (index, count) in [(0u32, 0u32), (0, 65), (2, 2)] {
        let mut h = a[0][..STREAM_HEADER_LEN].to_vec();
        h[24..28].copy_from_slice(&index.to_le_bytes());
        h[28..32].copy_from_slice(&count.to_le_bytes());
        let e = receive_err(&h, true);
        assert!(matches!(e, MigrationError::Streams { .. }), "{e}");
    }
}

#[cfg(feature = "kvm")]
#[test]
fn precopy_while_a_kvm_guest_writes() {
    use common::kvm_guest::{
        self, run_until_exits, LoopingWriter, TestVm, VcpuState, COUNT_OFFSET, SEQ_OFFSET,
    };
    use guestmem::kvm::KvmSlots;

    if common::need("kvm", "precopy_while_a_kvm_guest_writes", kvm_guest::kvm_available()).is_none() {
        return;
    }
    const CODE_GPA: u64 = 0x1000;
    let src = tracked(&layout());
    fill(&src, 9);
    let dst = tracked(&layout());
    let mut vm = TestVm::new().unwrap();
    let mut slots = KvmSlots::new(vm.vm_fd(), true).unwrap();
    slots.register(&src).unwrap();
    let cpu = vm.add_vcpu().unwrap();
    // 1024 pages spread over both regions' guest-reachable part: the first region's upper
    // half.
    let writer = LoopingWriter { writes_per_exit: 32, ..LoopingWriter::new(0x40_0000, 1024) };
    kvm_guest::start_looping_writer(vm.vcpu(cpu).unwrap(), CODE_GPA, &writer, &mut common::loader(&src))
        .unwrap();

    let (a, b) = UnixStream::pair().unwrap();
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let config = PrecopyConfig { downtime: Duration::from_millis(2), max_rounds: 6, rate_window: 3 };
    let vcpu = vm.vcpu(cpu).unwrap();
    // The destination VM, its memory registered up front.
    let mut dst_vm = TestVm::new().unwrap();
    let mut dst_slots = KvmSlots::new(dst_vm.vm_fd(), false).unwrap();
    dst_slots.register(&dst).unwrap();
    let dst_cpu = dst_vm.add_vcpu().unwrap();
    let (report, guest_writes, state) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b);
            receiver.receive(&dst).map(|_| receiver.take_device_state())
        });
        let (stop_ref, progress_ref) = (&stop, &progress);
        let guest = s.spawn(move || {
            let mut last = 0;
            while !stop_ref.load(Ordering::Relaxed) {
                last = run_until_exits(vcpu, writer.port, 1).unwrap()[0];
                progress_ref.store(u64::from(last), Ordering::Relaxed);
            }
            (last, vcpu)
        });
        // The guest is running before round 0 starts, and writes on after the pre-copy rounds,
        // so that the final round has guest writes to carry.
        let wait_for = |writes: u64| {
            while progress.load(Ordering::Relaxed) < writes {
                std::thread::yield_now();
            }
        };
        wait_for(1);
        let sync = || slots.sync_dirty_log().map(drop);
        let mut precopy = Precopy::new(Sender::new_vectored(a).unwrap(), &src, config, sync);
        precopy.run().unwrap();
        wait_for(progress.load(Ordering::Relaxed) + 2 * u64::from(writer.writes_per_exit));
        // Pause the vCPU at its next I/O exit.
        stop.store(true, Ordering::Relaxed);
        let (guest_writes, vcpu) = guest.join().unwrap();
        let state = VcpuState::save(vcpu).unwrap().to_bytes();
        let (report, _) = precopy.complete_with_device_state(&state).unwrap();
        let state = receiver.join().unwrap().unwrap().expect("the device state");
        (report, guest_writes, state)
    });
    assert!(guest_writes > 0);
    // The source is paused: the destination holds its memory, byte for byte.
    assert_same(&src, &dst);
    assert!(report.final_round.pages > 0, "the final round carries the guest's last writes");
    // The guest resumes in the destination VM from the registers that came with the stream,
    // and goes on with its sequence where it stopped.
    let vcpu = dst_vm.vcpu(dst_cpu).unwrap();
    VcpuState::from_bytes(&state).unwrap().restore(vcpu).unwrap();
    let counts = run_until_exits(vcpu, writer.port, 20).unwrap();
    let total = u64::from(*counts.last().unwrap());
    assert_eq!(
        total,
        u64::from(guest_writes) + 20 * u64::from(writer.writes_per_exit),
        "the guest did not go on"
    );
    // What an unmigrated guest makes of the memory in `total` writes: each page's count grew
    // (from the fill pattern, recomputed on a fresh memory) by how often the guest picked it,
    // its stamp is the number of its last write, and every other page is the source's.
    let fresh = tracked(&layout());
    fill(&fresh, 9);
    let expected = writer.expected(total);
    let read = |m: &Mem, at: u64| m.read_obj::<u32>(GuestAddress(at)).unwrap();
    for &(p, seq, n) in &expected {
        assert_eq!(read(&dst, p + SEQ_OFFSET), seq, "page {p:#x}");
        assert_eq!(
            read(&dst, p + COUNT_OFFSET).wrapping_sub(read(&fresh, p + COUNT_OFFSET)),
            n,
            "page {p:#x}"
        );
    }
    let written: std::collections::BTreeSet<u64> = expected.iter().map(|e| e.0).collect();
    let mut a = vec![0u8; PAGE as usize];
    let mut b = vec![0u8; PAGE as usize];
    for r in src.iter() {
        for p in (r.start_addr().0..r.start_addr().0 + r.len()).step_by(PAGE as usize) {
            src.read_slice(&mut a, GuestAddress(p)).unwrap();
            dst.read_slice(&mut b, GuestAddress(p)).unwrap();
            let from = if written.contains(&p) { 8 } else { 0 };
            assert!(a[from..] == b[from..], "page {p:#x} differs beyond what the guest wrote");
        }
    }
    drop(dst_slots);
}

// ---- Hostile streams ----

fn stream_header(magic: [u8; 8], version: u32, flags: u32) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0x5e55_u64.to_le_bytes()); // session
    h.extend_from_slice(&0u32.to_le_bytes()); // stream 0
    h.extend_from_slice(&1u32.to_le_bytes()); // of 1
    h
}

fn frame(kind: u32, flags: u32, a: u64, b: u64, c: u64) -> Vec<u8> {
    let mut f = kind.to_le_bytes().to_vec();
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&a.to_le_bytes());
    f.extend_from_slice(&b.to_le_bytes());
    f.extend_from_slice(&c.to_le_bytes());
    f
}

/// A run of a pages frame.
fn run(addr: u64, pages: u32, kind: u32) -> Vec<u8> {
    let mut r = addr.to_le_bytes().to_vec();
    r.extend_from_slice(&pages.to_le_bytes());
    r.extend_from_slice(&kind.to_le_bytes());
    r
}

/// A pages frame with `runs` and `data` bytes of data.
fn pages(runs: &[Vec<u8>], data: usize) -> Vec<u8> {
    let mut f = frame(1, 0, runs.len() as u64, data as u64, 0);
    for r in runs {
        f.extend_from_slice(r);
    }
    f.extend(std::iter::repeat_n(0xaa, data));
    f
}

/// A valid stream header followed by `frames`.
fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut s = stream_header(MAGIC, VERSION, 0);
    for f in frames {
        s.extend_from_slice(f);
    }
    s
}

fn small() -> Mem {
    tracked(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
}

/// Receives `bytes` into a fresh small memory through both paths (plain `Read` and a socket
/// fd); both must fail the same way and leave the memory as `untouched` says.
fn receive_err(bytes: &[u8], untouched: bool) -> MigrationError {
    let mut errors = Vec::new();
    for vectored in [false, true] {
        let dst = small();
        let e = if vectored {
            let (mut a, b) = UnixStream::pair().unwrap();
            let data = bytes.to_vec();
            let w = std::thread::spawn(move || io::Write::write_all(&mut a, &data));
            let e = Receiver::new_vectored(b).receive(&dst).unwrap_err();
            // The writer may fail once the receiver hangs up early.
            let _ = w.join().unwrap();
            e
        } else {
            Receiver::new(bytes).receive(&dst).unwrap_err()
        };
        if untouched {
            assert!(common::contents(&dst).iter().all(|r| r.iter().all(|&b| b == 0)), "{e}: memory touched");
            assert_eq!(dst.dirty_page_count().unwrap(), 0, "{e}: pages marked");
        }
        errors.push(e);
    }
    assert_eq!(errors[0].to_string(), errors[1].to_string());
    errors.pop().unwrap()
}

#[test]
fn hostile_stream_headers() {
    let e = receive_err(&[], true);
    assert!(
        matches!(e, MigrationError::Truncated { offset: 0, what: "the stream header", expected: 16, got: 0 }),
        "{e}"
    );
    let e = receive_err(&stream_header(MAGIC, VERSION, 0)[..10], true);
    assert!(matches!(e, MigrationError::Truncated { got: 10, .. }), "{e}");
    let e = receive_err(&stream_header(MAGIC, VERSION, 0)[..20], true);
    assert!(matches!(e, MigrationError::Truncated { offset: 16, got: 4, .. }), "{e}");
    let e = receive_err(&stream_header(*b"GMEMMIG\x01", VERSION, 0), true);
    assert!(matches!(e, MigrationError::BadMagic(m) if m == *b"GMEMMIG\x01"), "{e}");
    let e = receive_err(&stream_header(MAGIC, 3, 0), true);
    assert!(matches!(e, MigrationError::UnsupportedVersion(3)), "{e}");
    let e = receive_err(&stream_header(MAGIC, VERSION, 1), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "stream header flags", offset: 0 }), "{e}");
    // A valid header and nothing else.
    let e = receive_err(&stream(&[]), true);
    assert!(matches!(e, MigrationError::Truncated { offset: 32, what: "a frame header", got: 0, .. }), "{e}");
}

#[test]
fn hostile_frames_leave_memory_untouched() {
    let e = receive_err(&stream(&[frame(9, 0, 0, 0, 0)]), true);
    assert!(matches!(e, MigrationError::UnknownFrame { kind: 9, offset: 32 }), "{e}");
    let e = receive_err(&stream(&[frame(1, 0x8000_0000, 1, 0, 0)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "frame flags", .. }), "{e}");
    let e = receive_err(&stream(&[frame(1, 0, 0, 0, 0)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "empty pages frame", .. }), "{e}");
    let e = receive_err(&stream(&[frame(1, 0, 1, 0, 1)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "pages frame argument", .. }), "{e}");
    // Absurd counts and lengths are refused before anything is read or allocated.
    for len in [MAX_FRAME_DATA + 1, u64::MAX] {
        let e = receive_err(&stream(&[frame(1, 0, 1, len, 0)]), true);
        assert!(
            matches!(e, MigrationError::FrameTooLarge { offset: 32, what: "data bytes", len: l, max: MAX_FRAME_DATA } if l == len),
            "{e}"
        );
    }
    for count in [MAX_RUNS as u64 + 1, u64::MAX] {
        let e = receive_err(&stream(&[frame(1, 0, count, 0, 0)]), true);
        assert!(matches!(e, MigrationError::FrameTooLarge { what: "runs", .. }), "{e}");
    }
    // A frame header cut short, the runs cut short.
    let mut s = stream(&[frame(1, 0, 1, 0, 0)]);
    s.truncate(32 + 10);
    let e = receive_err(&s, true);
    assert!(
        matches!(e, MigrationError::Truncated { offset: 32, what: "a frame header", expected: 32, got: 10 }),
        "{e}"
    );
    let mut s = stream(&[pages(&[run(0, 1, 1), run(0x1000, 1, 1)], 0)]);
    s.truncate(32 + 32 + 20);
    let e = receive_err(&s, true);
    assert!(
        matches!(
            e,
            MigrationError::Truncated { what: "the runs of a pages frame", expected: 32, got: 20, .. }
        ),
        "{e}"
    );
    // Frames out of order: done before checksums.
    let e = receive_err(&stream(&[frame(4, 0, 0, 0, 0)]), true);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "done", .. }), "{e}");
}

#[test]
fn hostile_runs_leave_memory_untouched() {
    // Each frame below is refused whole, before any of its bytes reaches memory, even where an
    // earlier run of it is fine.
    let ok = run(0, 1, 0);
    let cases: Vec<(Vec<Vec<u8>>, usize, &str)> = vec![
        (vec![ok.clone(), run(0x2000, 1, 2)], PAGE as usize, "run kind"),
        (vec![ok.clone(), run(0x2000, 0, 1)], PAGE as usize, "empty run"),
        (vec![ok.clone(), run(0x2008, 1, 1)], PAGE as usize, "run not page aligned"),
        // Overlapping: data and zero run over the same page, and a run inside the previous.
        (vec![run(0, 2, 0), run(0x1000, 1, 1)], 2 * PAGE as usize, "runs out of order or overlapping"),
        (vec![run(0x4000, 1, 1), run(0x2000, 1, 1)], 0, "runs out of order or overlapping"),
        (vec![run(0x4000, 4, 1), run(0x5000, 1, 0)], PAGE as usize, "runs out of order or overlapping"),
        // Data bytes that are not the data runs' pages.
        (vec![ok.clone(), run(0x2000, 3, 1)], 2 * PAGE as usize, "data length disagrees with the runs"),
        (vec![run(0x2000, 3, 1)], PAGE as usize, "data length disagrees with the runs"),
    ];
    for (runs, data, what) in cases {
        let e = receive_err(&stream(&[pages(&runs, data)]), true);
        assert!(
            matches!(e, MigrationError::InvalidFrame { what: w, offset: 32 } if w == what),
            "{what}: {e}"
        );
    }
    // Runs outside memory: past the end, in the hole, straddling into the hole or across two
    // regions, huge, wrapping past 2^64; zero runs and data runs alike.
    for kind in [0u32, 1] {
        for (addr, count) in [
            (0x30000u64, 1u32),
            (0x10000, 1),
            (0xf000, 2),
            (0x1f000, 3),
            (0, u32::MAX),
            (0x20000, 1 << 20),
            (u64::MAX - 0xfff, 1),
            (u64::MAX - 0x1fff, 3),
        ] {
            let data = if kind == 0 { count.min(1024) as usize * PAGE as usize } else { 0 };
            let runs = [run(addr, count, kind)];
            let mut s = stream(&[pages(&runs, 0)]);
            // The frame announces the data its run needs (if it could), and has it.
            s[32 + 16..32 + 24]
                .copy_from_slice(&((count as u64) * PAGE * u64::from(kind == 0)).to_le_bytes());
            s.extend(std::iter::repeat_n(0xaa, data));
            let e = receive_err(&s, true);
            assert!(
                matches!(e, MigrationError::Memory { addr: GuestAddress(a), .. } if a == addr)
                    || matches!(e, MigrationError::FrameTooLarge { .. }),
                "{addr:#x} x {count} ({kind}): {e}"
            );
        }
    }
}

#[test]
fn a_partial_last_page_is_whole_on_the_stream_and_nothing_past_it() {
    // A region of one page and 100 bytes: its second page travels whole; the bytes past the
    // region are zeros from the sender and ignored by the receiver, whatever they are.
    let layout = [(GuestAddress(0), PAGE as usize + 100)];
    let src = tracked(&layout);
    src.write_slice(&[0x5a; PAGE as usize + 100], GuestAddress(0)).unwrap();
    let mut sender = Sender::new(Vec::new()).unwrap().verify_memory(true);
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    let mut sent = sender.finish(&src).unwrap();
    let data = STREAM_HEADER_LEN + FRAME_HEADER_LEN + RUN_LEN;
    assert_eq!(
        sent[data..data + 2 * PAGE as usize].iter().filter(|&&b| b == 0x5a).count(),
        PAGE as usize + 100
    );
    let pad = data + PAGE as usize + 100..data + 2 * PAGE as usize;
    assert!(sent[pad.clone()].iter().all(|&b| b == 0), "padding sent as zeros");
    sent[pad].fill(0xee);
    for vectored in [false, true] {
        let dst = tracked(&layout);
        let summary = if vectored {
            let (mut a, b) = UnixStream::pair().unwrap();
            let bytes = sent.clone();
            let w = std::thread::spawn(move || io::Write::write_all(&mut a, &bytes).unwrap());
            let r = Receiver::new_vectored(b).receive(&dst);
            w.join().unwrap();
            r
        } else {
            Receiver::new(&sent[..]).receive(&dst)
        }
        .unwrap();
        assert!(summary.memory_verified);
        assert_same(&src, &dst);
    }
    // A run may cover the partial page, never a page past it; a zero run over it zeroes only
    // the region's bytes.
    let dst = tracked(&layout);
    let e = Receiver::new(&stream(&[pages(&[run(0, 3, 1)], 0)])[..]).receive(&dst).unwrap_err();
    assert!(
        matches!(e, MigrationError::Memory { source: GuestMemoryError::NotContiguous { .. }, .. }),
        "{e}"
    );
    dst.write_slice(&[1; PAGE as usize + 100], GuestAddress(0)).unwrap();
    let e = Receiver::new(&stream(&[pages(&[run(PAGE, 1, 1)], 0)])[..]).receive(&dst).unwrap_err();
    assert!(matches!(e, MigrationError::Truncated { .. }), "{e}");
    let c = common::contents(&dst);
    assert!(c[0][..PAGE as usize].iter().all(|&b| b == 1) && c[0][PAGE as usize..].iter().all(|&b| b == 0));
}

#[test]
fn pages_for_read_only_memory_are_refused() {
    let rom = GuestRegionMmap::build(
        MmapRegionBuilder::<AtomicBitmap>::new(0x10000).protection(Protection::READ),
        GuestAddress(0x10000),
    )
    .unwrap();
    let ram =
        GuestRegionMmap::build(MmapRegionBuilder::<AtomicBitmap>::new(0x10000), GuestAddress(0)).unwrap();
    let dst = GuestMemoryMmap::from_regions(vec![ram, rom]).unwrap();
    // A data run on the writable page before the ROM, then zero and data runs on it.
    for second in [run(0x10000, 1, 1), run(0x10000, 1, 0)] {
        let data = if second[12] == 0 { 2 * PAGE as usize } else { PAGE as usize };
        let s = stream(&[pages(&[run(0xf000, 1, 0), second], data)]);
        let e = Receiver::new(&s[..]).receive(&dst).unwrap_err();
        assert!(matches!(e, MigrationError::Memory { source: GuestMemoryError::ReadOnly { .. }, .. }), "{e}");
        assert_eq!(
            dst.read_obj::<u64>(GuestAddress(0xf000)).unwrap(),
            0,
            "the writable part is untouched too"
        );
        assert_eq!(dst.dirty_page_count().unwrap(), 0);
    }
}

#[test]
fn hostile_page_data_and_rounds() {
    // Page data cut short: the bytes that arrived are in memory (and marked), the receive fails.
    let mut s = stream(&[pages(&[run(0x2000, 1, 0)], 0)]);
    s[32 + 16..32 + 24].copy_from_slice(&PAGE.to_le_bytes());
    s.extend_from_slice(&[0x5a; 100]);
    let e = receive_err(&s, false);
    assert!(
        matches!(e, MigrationError::Truncated { offset: 80, what: "page data", expected: 4096, got: 100 }),
        "{e}"
    );
    // Data complete, the next frame header missing.
    let s = stream(&[pages(&[run(0x2000, 1, 0)], PAGE as usize)]);
    let e = receive_err(&s, false);
    assert!(matches!(e, MigrationError::Truncated { what: "a frame header", got: 0, .. }), "{e}");
    // End of round with the wrong page counts, then with the wrong round number.
    let s = stream(&[pages(&[run(0, 1, 0), run(0x1000, 2, 1)], PAGE as usize)]);
    for (data, zero) in [(2, 2), (1, 1), (0, 0)] {
        let mut wrong = s.clone();
        wrong.extend_from_slice(&frame(2, 0, 0, data, zero));
        let e = receive_err(&wrong, false);
        assert!(
            matches!(
                e,
                MigrationError::RoundMismatch {
                    round: 0,
                    expected_round: 0,
                    received_pages: 1,
                    received_zero_pages: 2,
                    ..
                }
            ),
            "{e}"
        );
    }
    let e = receive_err(&stream(&[frame(2, 0, 0, 0, 0), frame(2, 0, 5, 0, 0)]), true);
    assert!(matches!(e, MigrationError::RoundMismatch { round: 5, expected_round: 1, .. }), "{e}");
}

/// The checksum entries of `mem`'s regions, as the sender would put them (with memory digests
/// if `memory`).
fn entries(mem: &Mem, memory: bool, tweak: impl Fn(usize, &mut [u64; 4])) -> Vec<Vec<u8>> {
    let mut sender = Sender::new(Vec::new()).unwrap().verify_memory(memory);
    sender.end_round().unwrap();
    let stream = sender.finish(mem).unwrap();
    // Header (32), end of round (32), checksums frame header (32), then the entries, then done.
    let body = &stream[32 + 32 + 32..stream.len() - 32];
    body.chunks(32)
        .enumerate()
        .map(|(i, c)| {
            let mut v = [0u64; 4];
            for (j, x) in v.iter_mut().enumerate() {
                *x = u64::from_le_bytes(c[j * 8..j * 8 + 8].try_into().unwrap());
            }
            tweak(i, &mut v);
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect()
}

/// A device state frame carrying `blob`, with its checksum.
fn device_state(blob: &[u8]) -> Vec<u8> {
    let mut f = frame(5, 0, blob.len() as u64, Checksum::of(blob), 0);
    f.extend_from_slice(blob);
    f
}

/// The honest end of a stream into `small()` memory that received nothing: checksums, done.
fn honest_end(dst: &Mem) -> Vec<Vec<u8>> {
    let mut frames = vec![frame(3, 0, 2, 0, 0)];
    frames.extend(entries(dst, false, |_, _| {}));
    frames.push(frame(4, 0, 0, 0, 0));
    frames
}

#[test]
fn device_state_travels_after_the_final_round_and_is_handed_out_once_verified() {
    let src = small();
    fill(&src, 11);
    let blob: Vec<u8> = {
        let mut rng = Rng(77);
        (0..3 * MIB + 5).map(|_| rng.next() as u8).collect()
    };
    // One stream on a socket, vectored; and the plain path into a Vec.
    let (a, b) = UnixStream::pair().unwrap();
    let dst = small();
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b);
            let summary = receiver.receive(&dst).unwrap();
            (summary, receiver.take_device_state(), receiver.take_device_state())
        });
        let mut sender = Sender::new_vectored(a).unwrap();
        sender.send_all(&src).unwrap();
        sender.end_round().unwrap();
        sender.send_device_state(&blob).unwrap();
        sender.finish(&src).unwrap();
        let (summary, state, again) = r.join().unwrap();
        assert_eq!(summary.device_state_len, Some(blob.len() as u64));
        assert!(state.as_deref() == Some(&blob[..]), "the state differs");
        assert_eq!(again, None, "handed out twice");
    });
    assert_same(&src, &dst);
    let mut sender = Sender::new(Vec::new()).unwrap();
    sender.send_device_state(b"no rounds at all").unwrap();
    let bytes = sender.finish(&src).unwrap();
    let mut receiver = Receiver::new(&bytes[..]);
    receiver.receive(&small()).unwrap();
    assert_eq!(receiver.take_device_state().as_deref(), Some(&b"no rounds at all"[..]));
    // A stream without device state hands out none.
    let plain = stream(&honest_end(&small()));
    let mut receiver = Receiver::new(&plain[..]);
    assert_eq!(receiver.receive(&small()).unwrap().device_state_len, None);
    assert_eq!(receiver.take_device_state(), None);

    // Pre-copy over three streams, the state sent by complete_with_device_state.
    let (tx, rx) = socket_pairs(3);
    let dst = small();
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            let mut receiver = MultiReceiver::new_vectored(rx);
            let summary = receiver.receive(&dst).unwrap();
            (summary, receiver.take_device_state())
        });
        let sender = MultiSender::new_vectored(tx).unwrap();
        let mut precopy = Precopy::new(sender, &src, PrecopyConfig::default(), || Ok::<(), io::Error>(()));
        precopy.run().unwrap();
        src.write_obj(0xabcd_u64, GuestAddress(0x2_8000)).unwrap();
        let (report, _) = precopy.complete_with_device_state(&blob[..1000]).unwrap();
        assert_eq!(report.final_round.pages, 1);
        let (summary, state) = r.join().unwrap();
        assert_eq!(summary.device_state_len, Some(1000));
        assert!(state.as_deref() == Some(&blob[..1000]), "the state differs");
    });
    assert_same(&src, &dst);
}

#[test]
fn the_sender_refuses_device_state_it_cannot_send_and_writes_nothing() {
    let src = small();
    fill(&src, 5);
    let mut sender = Sender::new(Vec::new()).unwrap();
    let refused = |sender: &mut Sender<Vec<u8>>, state: &[u8], what: &str| {
        let before = sender.get_ref().len();
        let e = sender.send_device_state(state).unwrap_err();
        assert!(matches!(&e, MigrationError::DeviceState(w) if w.contains(what)), "{e}");
        assert_eq!(sender.get_ref().len(), before, "{e}: bytes written");
    };
    refused(&mut sender, &[], "empty");
    refused(&mut sender, &vec![0; MAX_DEVICE_STATE as usize + 1], "larger");
    sender.send_all(&src).unwrap();
    refused(&mut sender, b"state", "inside a round");
    sender.end_round().unwrap();
    sender.send_device_state(b"state").unwrap();
    refused(&mut sender, b"state", "already");
    let bytes = sender.finish(&src).unwrap();
    let dst = small();
    let mut receiver = Receiver::new(&bytes[..]);
    receiver.receive(&dst).unwrap();
    assert_eq!(receiver.take_device_state().as_deref(), Some(&b"state"[..]));
    assert_same(&src, &dst);
    // Pre-copy refuses an empty state before its final round: nothing more is sent.
    let precopy = Precopy::new(Sender::new(Vec::new()).unwrap(), &src, PrecopyConfig::default(), || {
        Ok::<(), io::Error>(())
    });
    let e = precopy.complete_with_device_state(&[]).unwrap_err();
    assert!(matches!(e, MigrationError::DeviceState(_)), "{e}");
}

#[test]
fn hostile_device_state_frames() {
    let dst = small();
    let end = honest_end(&dst);
    let with = |frames: &[Vec<u8>]| {
        let mut all = frames.to_vec();
        all.extend(end.iter().cloned());
        stream(&all)
    };
    // The honest stream, for comparison.
    let honest = with(&[device_state(b"regs")]);
    let mut receiver = Receiver::new(&honest[..]);
    receiver.receive(&small()).unwrap();
    assert_eq!(receiver.take_device_state().as_deref(), Some(&b"regs"[..]));
    // A corrupt state: its checksum does not match. A receiver that got a state before hands
    // out none after the failed receive.
    let mut corrupt = device_state(b"regs");
    *corrupt.last_mut().unwrap() ^= 1;
    let e = receive_err(&with(&[corrupt.clone()]), true);
    assert!(matches!(e, MigrationError::DeviceStateMismatch { offset: 32, .. }), "{e}");
    let mut two = with(&[device_state(b"regs")]);
    two.extend_from_slice(&with(&[corrupt]));
    let mut receiver = Receiver::new(&two[..]);
    receiver.receive(&small()).unwrap();
    assert!(receiver.receive(&small()).is_err());
    assert_eq!(receiver.take_device_state(), None, "a state of an earlier receive");
    // Empty, too large, a reserved argument, flags.
    let e = receive_err(&with(&[frame(5, 0, 0, Checksum::of(&[]), 0)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "empty device state", .. }), "{e}");
    let e = receive_err(&with(&[frame(5, 0, MAX_DEVICE_STATE + 1, 0, 0)]), true);
    assert!(matches!(e, MigrationError::FrameTooLarge { what: "device state bytes", .. }), "{e}");
    let e = receive_err(&with(&[frame(5, 0, u64::MAX, 0, 0)]), true);
    assert!(matches!(e, MigrationError::FrameTooLarge { .. }), "{e}");
    let mut reserved = device_state(b"regs");
    reserved[24] = 1;
    let e = receive_err(&with(&[reserved]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "device state frame argument", .. }), "{e}");
    let mut flagged = device_state(b"regs");
    flagged[4] = 1;
    let e = receive_err(&with(&[flagged]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "frame flags", .. }), "{e}");
    // A length announced and not sent (the stream ends inside the state): no 64 MiB buffer.
    let mut cut = stream(&[frame(5, 0, MAX_DEVICE_STATE, 0, 0)]);
    cut.extend_from_slice(&[7; 100]);
    let e = receive_err(&cut, true);
    assert!(
        matches!(e, MigrationError::Truncated { offset: 32, what: "a device state frame", got: 132, .. }),
        "{e}"
    );
    // Out of order: twice; pages, an end of round or done after it; inside a round with
    // pages; after the checksums.
    let twice = [device_state(b"a"), device_state(b"b")];
    let e = receive_err(&with(&twice), true);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "device state", .. }), "{e}");
    for next in [pages(&[run(0, 1, 1)], 0), frame(2, 0, 0, 0, 0), frame(4, 0, 0, 0, 0)] {
        let e = receive_err(&with(&[device_state(b"a"), next]), true);
        assert!(matches!(e, MigrationError::UnexpectedFrame { expected: "checksums", .. }), "{e}");
    }
    let e = receive_err(&with(&[pages(&[run(0, 1, 1)], 0), device_state(b"a")]), false);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "device state", .. }), "{e}");
    let mut late = end[..end.len() - 1].to_vec();
    late.push(device_state(b"a"));
    let e = receive_err(&stream(&late), true);
    assert!(
        matches!(e, MigrationError::UnexpectedFrame { found: "device state", expected: "done", .. }),
        "{e}"
    );
    // A state after an empty round is fine.
    let after_round = with(&[frame(2, 0, 0, 0, 0), device_state(b"z")]);
    let mut receiver = Receiver::new(&after_round[..]);
    assert_eq!(receiver.receive(&small()).unwrap().rounds, 1);
    assert_eq!(receiver.take_device_state().as_deref(), Some(&b"z"[..]));
}

#[test]
fn hostile_checksums_and_end_of_stream() {
    let dst = small();
    let good = entries(&dst, true, |_, _| {});
    // The honest streams: no pages, digests of zeroed memory, done.
    for memory in [false, true] {
        let mut frames = vec![frame(3, 0, 2, u64::from(memory), 0)];
        frames.extend(entries(&dst, memory, |_, _| {}));
        frames.push(frame(4, 0, 0, 0, 0));
        let summary = Receiver::new(&stream(&frames)[..]).receive(&dst).unwrap();
        assert_eq!((summary.regions_verified, summary.memory_verified), (2, memory));
    }

    let e = receive_err(&stream(&[frame(3, 0, 3, 0, 0)]), true);
    assert!(matches!(e, MigrationError::RegionCount { source_regions: 3, destination_regions: 2 }), "{e}");
    let e = receive_err(&stream(&[frame(3, 0, u64::MAX, 0, 0)]), true);
    assert!(matches!(e, MigrationError::RegionCount { .. }), "{e}");
    let e = receive_err(&stream(&[frame(3, 0, 2, 0, 1)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "checksums frame argument", .. }), "{e}");
    let e = receive_err(&stream(&[frame(3, 0, 2, 2, 0)]), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "checksums frame flags", .. }), "{e}");
    let mut frames = vec![frame(3, 0, 2, 1, 0)];
    frames.extend(entries(&dst, true, |i, v| {
        if i == 1 {
            v[0] = 0x30000
        }
    }));
    let e = receive_err(&stream(&frames), true);
    assert!(matches!(e, MigrationError::RegionMismatch { addr: GuestAddress(0x30000), len: 0x10000 }), "{e}");
    // A stream digest, then a memory digest, that differ.
    for (word, what) in [(2, "pages received"), (3, "memory contents")] {
        let mut frames = vec![frame(3, 0, 2, 1, 0)];
        frames.extend(entries(&dst, true, |i, v| {
            if i == 1 {
                v[word] ^= 1
            }
        }));
        let e = receive_err(&stream(&frames), true);
        assert!(
            matches!(e, MigrationError::ChecksumMismatch { addr: GuestAddress(0x20000), len: 0x10000, what: w, .. } if w == what),
            "{e}"
        );
        assert!(
            e.to_string().contains("0x20000") && e.to_string().contains(what),
            "the error names the region: {e}"
        );
    }
    // A memory digest without the flag that announces it.
    let mut frames = vec![frame(3, 0, 2, 0, 0)];
    frames.extend(good.iter().cloned());
    let e = receive_err(&stream(&frames), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what, .. } if what.contains("memory digest")), "{e}");
    let mut s = stream(&[frame(3, 0, 2, 1, 0), good[0].clone()]);
    s.extend_from_slice(&good[1][..20]);
    let e = receive_err(&s, true);
    assert!(matches!(e, MigrationError::Truncated { what: "a checksum entry", got: 20, .. }), "{e}");

    // After the checksums only done, with zero arguments, may come.
    let mut after = vec![frame(3, 0, 2, 1, 0)];
    after.extend(good.iter().cloned());
    let mut more = after.clone();
    more.push(pages(&[run(0, 1, 1)], 0));
    let e = receive_err(&stream(&more), true);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "pages", expected: "done", .. }), "{e}");
    after.push(frame(4, 0, 1, 0, 0));
    let e = receive_err(&stream(&after), true);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "done frame arguments", .. }), "{e}");
}

/// A reader that fails once its bytes are used up.
struct Failing(Vec<u8>);

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0.drain(..n);
        Ok(n)
    }
}

#[test]
fn a_failing_read_is_an_io_error() {
    let dst = small();
    // In a header, and in page data.
    let e = Receiver::new(Failing(stream(&[]))).receive(&dst).unwrap_err();
    assert!(matches!(e, MigrationError::Io { op: "reading the stream", .. }), "{e}");
    let mut s = stream(&[pages(&[run(0, 1, 0)], 0)]);
    s[32 + 16..32 + 24].copy_from_slice(&PAGE.to_le_bytes());
    let e = Receiver::new(Failing(s)).receive(&dst).unwrap_err();
    assert!(
        matches!(e, MigrationError::Io { op: "reading page data", ref source, .. } if source.kind() == io::ErrorKind::ConnectionReset),
        "{e}"
    );
}

#[test]
fn mutated_streams_never_panic() {
    // A valid stream, then thousands of random corruptions of it: every receive ends in Ok or
    // an error, quickly, without a panic.
    let src = small();
    fill_one_in_four(&src, 1);
    let mut sender = Sender::new(Vec::new()).unwrap().verify_memory(true);
    sender.send_all(&src).unwrap();
    sender.end_round().unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0x1000), 0x3000), (GuestAddress(0x2f000), 0x1000)]).unwrap();
    sender.end_round().unwrap();
    sender.send_ranges(&src, &[(GuestAddress(0xff00), 0x100)]).unwrap();
    sender.end_round().unwrap();
    let good = sender.finish(&src).unwrap();
    let mut rng = Rng(0x1234_5678);
    let dst = small();
    Receiver::new(&good[..]).receive(&dst).unwrap();
    let mut errors = 0;
    for _ in 0..3000 {
        let mut s = good.clone();
        match rng.next() % 4 {
            0 => s.truncate((rng.next() % s.len() as u64) as usize),
            1 => {
                let i = (rng.next() % s.len() as u64) as usize;
                s[i] ^= 1 << (rng.next() % 8);
            }
            2 => {
                // Corrupt a header or run field: in the first 200 bytes or the tail, where
                // headers are.
                let i = if rng.next().is_multiple_of(2) {
                    rng.next() % 200
                } else {
                    s.len() as u64 - 1 - rng.next() % 200
                };
                s[i as usize] = rng.next() as u8;
            }
            _ => {
                let i = (rng.next() % s.len() as u64) as usize;
                let junk: Vec<u8> = (0..rng.next() % 64).map(|_| rng.next() as u8).collect();
                s.splice(i..i, junk);
            }
        }
        if Receiver::new(&s[..]).receive(&dst).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 2700, "{errors} of 3000 corrupted streams were refused");
}

#[test]
fn every_migration_error_variant_is_produced() {
    // An exhaustive match: a new variant does not compile until it is listed here.
    let name = |e: &MigrationError| match e {
        MigrationError::Io { .. } => "Io",
        MigrationError::Truncated { .. } => "Truncated",
        MigrationError::BadMagic(_) => "BadMagic",
        MigrationError::UnsupportedVersion(_) => "UnsupportedVersion",
        MigrationError::Streams { .. } => "Streams",
        MigrationError::UnknownFrame { .. } => "UnknownFrame",
        MigrationError::InvalidFrame { .. } => "InvalidFrame",
        MigrationError::FrameTooLarge { .. } => "FrameTooLarge",
        MigrationError::UnexpectedFrame { .. } => "UnexpectedFrame",
        MigrationError::Memory { .. } => "Memory",
        MigrationError::RoundMismatch { .. } => "RoundMismatch",
        MigrationError::RegionCount { .. } => "RegionCount",
        MigrationError::RegionMismatch { .. } => "RegionMismatch",
        MigrationError::ChecksumMismatch { .. } => "ChecksumMismatch",
        MigrationError::DeviceState(_) => "DeviceState",
        MigrationError::DeviceStateMismatch { .. } => "DeviceStateMismatch",
        MigrationError::Postcopy(_) => "Postcopy",
        MigrationError::Harvest(_) => "Harvest",
        MigrationError::Sync(_) => "Sync",
    };
    let mut produced = vec![
        Receiver::new(Failing(stream(&[]))).receive(&small()).unwrap_err(),
        // Hostile streams.
        receive_err(&[], true),
        receive_err(&stream_header(*b"GMEMMIG\x01", VERSION, 0), true),
        receive_err(&stream_header(MAGIC, 1, 0), true),
    ];
    let mut two = stream_header(MAGIC, VERSION, 0);
    two[28..32].copy_from_slice(&2u32.to_le_bytes());
    produced.push(receive_err(&two, true));
    produced.push(receive_err(&stream(&[frame(9, 0, 0, 0, 0)]), true));
    produced.push(receive_err(&stream(&[frame(1, 0x8000_0000, 1, 0, 0)]), true));
    produced.push(receive_err(&stream(&[frame(1, 0, 1, MAX_FRAME_DATA + 1, 0)]), true));
    produced.push(receive_err(&stream(&[frame(4, 0, 0, 0, 0)]), true));
    produced.push(receive_err(&stream(&[pages(&[run(0x30000, 1, 1)], 0)]), true));
    produced.push(receive_err(&stream(&[frame(2, 0, 0, 0, 0), frame(2, 0, 5, 0, 0)]), true));
    // Checksums that do not match the destination.
    let dst = small();
    produced.push(receive_err(&stream(&[frame(3, 0, 3, 0, 0)]), true));
    let mut moved = vec![frame(3, 0, 2, 0, 0)];
    moved.extend(entries(&dst, false, |i, v| {
        if i == 1 {
            v[0] = 0x30000
        }
    }));
    produced.push(receive_err(&stream(&moved), true));
    let mut differs = vec![frame(3, 0, 2, 0, 0)];
    differs.extend(entries(&dst, false, |i, v| {
        if i == 1 {
            v[2] ^= 1
        }
    }));
    produced.push(receive_err(&stream(&differs), true));
    // Device state refused by the sender, corrupt at the receiver.
    produced.push(Sender::new(Vec::new()).unwrap().send_device_state(&[]).unwrap_err());
    let mut corrupt = device_state(b"regs");
    corrupt[FRAME_HEADER_LEN] ^= 1;
    produced.push(receive_err(&stream(&[corrupt]), true));
    // A stream that switched to post-copy, given to `receive`.
    let mut switched = vec![frame(6, 0, 1, 1, 0), run(0, 1, 0)];
    switched.push(device_state(b"regs"));
    produced.push(Receiver::new(&stream(&switched)[..]).receive(&small()).unwrap_err());
    // A source region without dirty tracking.
    let untracked = GuestRegionMmap::build(
        MmapRegionBuilder::<Option<AtomicBitmap>>::new(MIB).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap();
    let untracked = GuestMemoryMmap::from_regions(vec![untracked]).unwrap();
    produced.push(Sender::new(Vec::new()).unwrap().send_dirty(&untracked).unwrap_err());
    // A sync hook that fails (no KVM needed: the hook is the caller's).
    let src = tracked(&[(GuestAddress(0), MIB)]);
    let mut precopy = Precopy::new(Sender::new(io::sink()).unwrap(), &src, PrecopyConfig::default(), || {
        Err::<(), _>(io::Error::other("KVM_GET_DIRTY_LOG failed"))
    });
    produced.push(precopy.run().unwrap_err());

    common::assert_every_variant(
        &produced,
        name,
        &[
            "Io",
            "Truncated",
            "BadMagic",
            "UnsupportedVersion",
            "Streams",
            "UnknownFrame",
            "InvalidFrame",
            "FrameTooLarge",
            "UnexpectedFrame",
            "Memory",
            "RoundMismatch",
            "RegionCount",
            "RegionMismatch",
            "ChecksumMismatch",
            "DeviceState",
            "DeviceStateMismatch",
            "Postcopy",
            "Harvest",
            "Sync",
        ],
        true,
    );
}
