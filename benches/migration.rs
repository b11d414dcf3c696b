//! The migration stream against the raw transport, in the same run on the same memory.
//!
//! 1 GiB of guest memory in one region (`GUESTMEM_BENCH_MIB` to change it), the source and the
//! destination on two threads of this process, over loopback TCP and over a Unix socket pair:
//!
//! - `raw`: `write(2)` of the source mapping in 1 MiB pieces on one end, `read(2)` straight
//!   into the destination mapping on the other, until every byte arrived;
//! - `guestmem`: `Sender::new_vectored` + `send_all` + `end_round` + `finish` on one end,
//!   `Receiver::new_vectored` + `receive` on the other (integrity checks included).
//!
//! Contents: "every page data" (no zero page), and "1 page in 4 data" (pages 0, 4, 8, ... hold
//! data, the others are zero). There every source page is resident (the zero pages were
//! written), so zero pages must be found by reading them; in "1 in 4, untouched" the zero
//! pages were never touched (dropped with `MADV_DONTNEED` before each repetition, for raw and
//! guestmem alike), as in a guest that has not used most of its RAM. Before each repetition
//! the destination is reset, the same way for raw and guestmem: "stale" is resident and
//! non-zero everywhere (as after an earlier round: every zero page must be written), "zeroed"
//! is resident and all zero (a VMM that preallocated its guest RAM: zero pages need only be
//! read), "fresh" is untouched (dropped with `MADV_DONTNEED`: a new VM's memory, where raw pays
//! a page fault for every page it reads into and a zero page need not be written). Each case runs
//! `GUESTMEM_BENCH_REPS` (5) alternating repetitions of raw and guestmem; the table gives
//! medians and the ratio guestmem / raw.
//!
//! Then, on the same memory (every page data): the stream spread over 1, 2 and 4 connections
//! of each transport (`MultiSender`/`MultiReceiver`, the source and destination each on one
//! thread per stream), and local migration (`migration::local`) of 1 GiB of memfd memory in 1
//! and in 16 regions, end to end (description sent, descriptors checked and mapped, memory
//! built, acknowledgement back), with the destination's contents compared after each run.
//!
//! ```text
//! cargo bench --bench migration                     # all of it
//! cargo bench --bench migration -- "Unix socket"    # the cases whose name has the text
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use guestmem::bitmap::AtomicBitmap;
use guestmem::migration::local::{self, ReceiveOptions};
use guestmem::migration::{MultiReceiver, MultiSender, Receiver, Sender};
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::{sys, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: usize = 4096;
const PIECE: usize = 1 << 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A cheap deterministic hash for page contents.
fn mix(x: u64) -> u64 {
    let mut h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 29)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contents {
    AllData,
    OneInFour,
    /// As `OneInFour`, the zero pages never touched.
    OneInFourUntouched,
}

impl Contents {
    fn name(self) -> &'static str {
        match self {
            Contents::AllData => "every page data",
            Contents::OneInFour => "1 page in 4 data",
            Contents::OneInFourUntouched => "1 in 4, untouched",
        }
    }

    fn is_data(self, page: usize) -> bool {
        self == Contents::AllData || page.is_multiple_of(4)
    }

    /// Makes the source's zero pages untouched again (raw's reads map the shared zero page).
    fn reset(self, host: *mut u8, size: usize) {
        if self == Contents::OneInFourUntouched {
            // Pages 1-3 of every 4: offsets inside our mapping of `size` bytes.
            let ranges: Vec<(*mut u8, usize)> =
                (0..size / PAGE / 4).map(|i| (host.wrapping_add((4 * i + 1) * PAGE), 3 * PAGE)).collect();
            drop_pages(&ranges);
        }
    }
}

/// Drops `ranges` of our private anonymous memory: they read as zero again, untouched.
fn drop_pages(ranges: &[(*mut u8, usize)]) {
    // SAFETY: the ranges are inside the bench's own mappings, and nothing holds a reference
    // into them (every access is through raw pointers or guestmem, not running now).
    unsafe { sys::mman::madvise_ranges(ranges, sys::mman::Advice::DontNeed) }.unwrap();
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP loopback",
            Transport::Unix => "Unix socket pair",
        }
    }
}

/// Fills every page of `host..host + size`: data pages with a pattern, zero pages with zeros
/// (written, so they are resident like a used guest's; untouched ones are skipped).
fn fill(host: *mut u8, size: usize, contents: Contents) {
    for page in 0..size / PAGE {
        if contents == Contents::OneInFourUntouched && !contents.is_data(page) {
            continue;
        }
        // SAFETY: the page lies in our writable mapping of `size` bytes.
        let p = unsafe { host.add(page * PAGE) }.cast::<u64>();
        for w in 0..PAGE / 8 {
            let v = if contents.is_data(page) { mix((page * PAGE / 8 + w) as u64) | 1 } else { 0 };
            // SAFETY: as above; 8-byte aligned.
            unsafe { p.add(w).write_volatile(v) };
        }
    }
}

/// Stale destination contents: resident, non-zero, different from the source.
fn stale(host: *mut u8, size: usize) {
    // SAFETY: our writable mapping of `size` bytes.
    unsafe { std::ptr::write_bytes(host, 0xa5, size) };
}

/// Zeroed destination contents: resident, all zero.
fn zeroed(host: *mut u8, size: usize) {
    // SAFETY: our writable mapping of `size` bytes.
    unsafe { std::ptr::write_bytes(host, 0, size) };
}

/// What the destination holds before a repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    Stale,
    Zeroed,
    Fresh,
}

impl Destination {
    fn name(self) -> &'static str {
        match self {
            Destination::Stale => "stale",
            Destination::Zeroed => "zeroed",
            Destination::Fresh => "fresh",
        }
    }

    fn reset(self, host: *mut u8, size: usize) {
        match self {
            Destination::Stale => stale(host, size),
            Destination::Zeroed => zeroed(host, size),
            Destination::Fresh => drop_pages(&[(host, size)]),
        }
    }
}

fn same(a: *const u8, b: *const u8, size: usize) -> bool {
    // SAFETY: both are our readable mappings of `size` bytes, not written meanwhile.
    unsafe { std::slice::from_raw_parts(a, size) == std::slice::from_raw_parts(b, size) }
}

/// A connected pair (sending end, receiving end).
fn connect(transport: Transport, listener: &TcpListener) -> (Box<dyn Conn>, Box<dyn Conn>) {
    match transport {
        Transport::Tcp => {
            let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let b = listener.accept().unwrap().0;
            a.set_nodelay(true).unwrap();
            (Box::new(a), Box::new(b))
        }
        Transport::Unix => {
            let (a, b) = UnixStream::pair().unwrap();
            (Box::new(a), Box::new(b))
        }
    }
}

trait Conn: Read + Write + AsFd + Send {}
impl Conn for TcpStream {}
impl Conn for UnixStream {}

/// `write(2)` of `size` bytes at `src` in 1 MiB pieces / `read(2)` into `dst`.
fn raw(transport: Transport, listener: &TcpListener, src: *const u8, dst: *mut u8, size: usize) -> Duration {
    let (tx, mut rx) = connect(transport, listener);
    let (src, dst) = (src as usize, dst as usize);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut done = 0;
            while done < size {
                let n = (size - done).min(PIECE);
                let mut off = 0;
                while off < n {
                    // SAFETY: inside the readable source mapping.
                    let ptr = unsafe { (src as *const u8).add(done + off) };
                    // SAFETY: `[ptr, ptr + n - off)` is readable.
                    off += unsafe { sys::fd::write(tx.as_fd(), ptr, n - off) }.unwrap();
                }
                done += n;
            }
        });
        let mut done = 0;
        while done < size {
            // SAFETY: inside the writable destination mapping.
            let n = unsafe { sys::fd::read(rx.as_fd(), (dst as *mut u8).add(done), size - done) }.unwrap();
            assert!(n > 0);
            done += n;
        }
        let mut end = [0u8; 1];
        assert_eq!(rx.read(&mut end).unwrap(), 0);
    });
    start.elapsed()
}

fn guestmem(transport: Transport, listener: &TcpListener, src: &Mem, dst: &Mem) -> Duration {
    let (tx, rx) = connect(transport, listener);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut sender = Sender::new_vectored(tx).unwrap();
            sender.send_all(src).unwrap();
            sender.end_round().unwrap();
            drop(sender.finish(src).unwrap());
        });
        Receiver::new_vectored(rx).receive(dst).unwrap();
    });
    start.elapsed()
}

/// `guestmem` over `n` connections.
fn guestmem_streams(
    n: usize,
    transport: Transport,
    listener: &TcpListener,
    src: &Mem,
    dst: &Mem,
) -> Duration {
    let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| connect(transport, listener)).unzip();
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut sender = MultiSender::new_vectored(tx).unwrap();
            sender.send_all(src).unwrap();
            sender.end_round().unwrap();
            drop(sender.finish(src).unwrap());
        });
        MultiReceiver::new_vectored(rx).receive(dst).unwrap();
    });
    start.elapsed()
}

/// `size` bytes of memfd memory in `regions` regions, filled with data.
fn memfd_memory(size: usize, regions: usize) -> Mem {
    let each = size / regions;
    let regions = (0..regions)
        .map(|i| {
            let b = MmapRegionBuilder::new(each).backing(Backing::Memfd(MemfdOptions::new("guest-ram")));
            GuestRegionMmap::build(b, GuestAddress((i * each) as u64)).unwrap()
        })
        .collect();
    let mem = Mem::from_regions(regions).unwrap();
    for r in mem.iter() {
        fill(mem.get_host_address(r.start_addr()).unwrap(), r.len() as usize, Contents::AllData);
    }
    mem
}

/// Local migration of `src`: send on one thread, receive on this one; returns the time from
/// the start of the send to the sender's return (acknowledged), the destination and the
/// bytes that went over the socket.
fn local_once(src: &Mem) -> (Duration, Mem, u64) {
    let (a, b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let (report, dst) = std::thread::scope(|s| {
        let receiver = s.spawn(|| local::receive::<AtomicBitmap>(&b, &ReceiveOptions::default()).unwrap());
        let report = local::send(&a, src).unwrap();
        (report, receiver.join().unwrap())
    });
    (start.elapsed(), dst, report.socket_bytes)
}

/// The median (the upper one of an even count); zero for none.
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks cases by name.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let size = env_usize("GUESTMEM_BENCH_MIB", 1024) << 20;
    let reps = env_usize("GUESTMEM_BENCH_REPS", 5).max(1);
    // For profiling: `GUESTMEM_BENCH_ONLY=guestmem` (or `raw`) runs one side only.
    let only = std::env::var("GUESTMEM_BENCH_ONLY").ok();
    let only = only.as_deref();
    // For profiling only the timed part: `perf record --control=fifo:CTL -D -1 ...` with
    // `GUESTMEM_BENCH_PERF_CTL=CTL`; the bench enables events around the repetitions.
    let mut perf_ctl = std::env::var("GUESTMEM_BENCH_PERF_CTL")
        .ok()
        .map(|path| std::fs::OpenOptions::new().write(true).open(path).unwrap());
    let mut perf = |cmd: &str| {
        if let Some(f) = perf_ctl.as_mut() {
            f.write_all(cmd.as_bytes()).unwrap();
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("migration stream, {} MiB in one region, median of {reps} alternating repetitions", size >> 20);
    println!(
        "{:18} {:18} {:>11} {:>10} {:>8} {:>12} {:>8} {:>7} {:>10}",
        "transport", "contents", "destination", "raw ms", "GB/s", "guestmem ms", "GB/s", "ratio", "min ratio"
    );
    let table = [
        (Contents::AllData, Destination::Stale),
        (Contents::OneInFour, Destination::Zeroed),
        (Contents::OneInFour, Destination::Stale),
        (Contents::OneInFour, Destination::Fresh),
        (Contents::OneInFourUntouched, Destination::Fresh),
    ];
    for contents in [Contents::AllData, Contents::OneInFour, Contents::OneInFourUntouched] {
        let src = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let dst = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let (s, d) =
            (src.get_host_address(GuestAddress(0)).unwrap(), dst.get_host_address(GuestAddress(0)).unwrap());
        fill(s, size, contents);
        for (transport, dest) in [Transport::Tcp, Transport::Unix]
            .into_iter()
            .flat_map(|t| table.iter().filter(|c| c.0 == contents).map(move |c| (t, c.1)))
        {
            let case = format!("{}/{}/{}", transport.name(), contents.name(), dest.name());
            if !filter.is_empty() && !filter.iter().any(|f| case.contains(f.as_str())) {
                continue;
            }
            let (mut raw_t, mut gm_t) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                if only != Some("guestmem") {
                    contents.reset(s, size);
                    dest.reset(d, size);
                    perf("enable\n");
                    raw_t.push(raw(transport, &listener, s, d, size));
                    perf("disable\n");
                    assert!(same(s, d, size), "raw copy differs");
                }
                if only != Some("raw") {
                    contents.reset(s, size);
                    dest.reset(d, size);
                    perf("enable\n");
                    gm_t.push(guestmem(transport, &listener, &src, &dst));
                    perf("disable\n");
                    assert!(same(s, d, size), "guestmem copy differs");
                }
            }
            let (r, g) = (median(&mut raw_t), median(&mut gm_t));
            // The ratio of the fastest runs too: on a shared machine, the least disturbed.
            let (rmin, gmin) =
                (raw_t.first().copied().unwrap_or_default(), gm_t.first().copied().unwrap_or_default());
            let gbs = |t: Duration| size as f64 / t.as_secs_f64() / 1e9;
            println!(
                "{:18} {:18} {:>11} {:>10.1} {:>8.2} {:>12.1} {:>8.2} {:>7.2} {:>10.2}",
                transport.name(),
                contents.name(),
                dest.name(),
                ms(r),
                gbs(r),
                ms(g),
                gbs(g),
                g.as_secs_f64() / r.as_secs_f64(),
                gmin.as_secs_f64() / rmin.as_secs_f64()
            );
        }
    }

    let wanted = |case: &str| filter.is_empty() || filter.iter().any(|f| case.contains(f.as_str()));

    // Several connections, every page data.
    let cases: Vec<(Transport, usize)> = [Transport::Tcp, Transport::Unix]
        .into_iter()
        .flat_map(|t| [1, 2, 4].map(|n| (t, n)))
        .filter(|(t, n)| wanted(&format!("{}/{n} streams", t.name())))
        .collect();
    if !cases.is_empty() {
        println!();
        println!(
            "several streams, every page data: {:18} {:>8} {:>12} {:>8}",
            "transport", "streams", "guestmem ms", "GB/s"
        );
        let src = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let dst = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let (s, d) =
            (src.get_host_address(GuestAddress(0)).unwrap(), dst.get_host_address(GuestAddress(0)).unwrap());
        fill(s, size, Contents::AllData);
        for (transport, n) in cases {
            let mut t = Vec::new();
            for _ in 0..reps {
                stale(d, size);
                perf("enable\n");
                t.push(guestmem_streams(n, transport, &listener, &src, &dst));
                perf("disable\n");
                assert!(same(s, d, size), "copy over {n} streams differs");
            }
            let m = median(&mut t);
            println!(
                "                                 {:18} {:>8} {:>12.1} {:>8.2}",
                transport.name(),
                n,
                ms(m),
                size as f64 / m.as_secs_f64() / 1e9
            );
        }
    }

    // Local migration by descriptors.
    let cases: Vec<usize> = [1, 16].into_iter().filter(|n| wanted(&format!("local/{n} regions"))).collect();
    if !cases.is_empty() {
        println!();
        println!("local migration of {} MiB of memfd memory (nothing copied):", size >> 20);
        println!("{:>8} {:>14} {:>12} {:>14}", "regions", "end to end ms", "ms per GiB", "socket bytes");
        for regions in cases {
            let src = memfd_memory(size, regions);
            let (mut t, mut bytes) = (Vec::new(), 0);
            for _ in 0..reps {
                perf("enable\n");
                let (d, dst, b) = local_once(&src);
                perf("disable\n");
                t.push(d);
                bytes = b;
                // The destination maps the very same memory.
                for (x, y) in src.iter().zip(dst.iter()) {
                    let (p, q) = (x.as_ptr(), y.as_ptr());
                    assert!(same(p, q, x.len() as usize), "local migration: contents differ");
                }
            }
            let m = median(&mut t);
            println!(
                "{:>8} {:>14.3} {:>12.3} {:>14}",
                regions,
                ms(m),
                ms(m) / (size as f64 / (1u64 << 30) as f64),
                bytes
            );
        }
    }
}
