//! Post-copy migration (`migration::postcopy`) over real sockets into userfaultfd-registered
//! memory: threads touching the destination while the stale pages are still at the source see
//! the source's bytes, the memory ends equal to the source, a KVM guest resumed on it runs,
//! and hostile streams and a source that disappears are errors.

mod common;

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::Rng;
use guestmem::bitmap::AtomicBitmap;
use guestmem::checksum::Checksum;
use guestmem::migration::{
    MigrationError, Precopy, PrecopyConfig, Received, Receiver, Sender, MAGIC, VERSION,
};
use guestmem::sys::uffd::{self as sys_uffd, OpenVia};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;
const MIB: usize = 1 << 20;

fn uffd_ok(test: &str) -> bool {
    common::need(
        "uffd",
        test,
        sys_uffd::available_features(OpenVia::Any).map(drop).map_err(|e| e.to_string()),
    )
    .is_some()
}

fn layout() -> [(GuestAddress, usize); 2] {
    [(GuestAddress(0), 8 * MIB), (GuestAddress(8 * MIB as u64), 8 * MIB)]
}

fn mem() -> Mem {
    Mem::from_ranges(&layout()).unwrap()
}

/// Every page a pattern of `seed`, one page in three left zero.
fn fill(mem: &Mem, seed: u64) {
    let mut rng = Rng(seed | 1);
    for r in mem.iter() {
        for p in (0..r.len()).step_by(PAGE as usize) {
            if p / PAGE % 3 == 1 {
                continue;
            }
            let data: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
            mem.write_slice(&data, GuestAddress(r.start_addr().0 + p)).unwrap();
        }
    }
}

fn assert_same(src: &Mem, dst: &Mem) {
    let (a, b) = (common::contents(src), common::contents(dst));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if let Some(at) = x.iter().zip(y).position(|(p, q)| p != q) {
            panic!("region {i} differs first at offset {at:#x}");
        }
    }
}

/// Dirties `n` random pages of `mem` (some of them to zero) after the pre-copy.
fn dirty(mem: &Mem, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    let total = mem.iter().map(|r| r.len()).sum::<u64>() / PAGE;
    for i in 0..n {
        let gpa = rng.below(total) * PAGE;
        let value = if i % 5 == 0 { 0 } else { rng.next() };
        mem.write_obj(value, GuestAddress(gpa + rng.below(PAGE / 8) * 8)).unwrap();
    }
}

#[test]
fn postcopy_with_threads_touching_stale_pages_ends_equal_to_the_source() {
    if !uffd_ok("postcopy_with_threads_touching_stale_pages_ends_equal_to_the_source") {
        return;
    }
    let src = mem();
    fill(&src, 3);
    let dst = mem();
    let (a, b) = UnixStream::pair().unwrap();
    let state = b"vcpu registers".to_vec();
    let stale_done = AtomicBool::new(false);
    let touched = AtomicU64::new(0);
    std::thread::scope(|s| {
        let destination = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b.try_clone().unwrap());
            let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else {
                panic!("the source did not switch to post-copy")
            };
            assert_eq!(start.device_state(), b"vcpu registers");
            let stale = start.stale_pages();
            assert!(stale > 100, "{stale} stale pages");
            let running = start.start(receiver, &dst, b).unwrap();
            // Four threads read random pages while the stale pages arrive: every value is the
            // source's (which is paused), never a zero that was not there.
            std::thread::scope(|t| {
                for k in 0..4u64 {
                    let (src, dst, touched) = (&src, &dst, &touched);
                    t.spawn(move || {
                        let mut rng = Rng(k + 17);
                        let total = dst.iter().map(|r| r.len()).sum::<u64>() / PAGE;
                        for _ in 0..2000 {
                            let at = GuestAddress(rng.below(total) * PAGE + rng.below(PAGE / 8) * 8);
                            assert_eq!(
                                dst.read_obj::<u64>(at).unwrap(),
                                src.read_obj::<u64>(at).unwrap(),
                                "{at}"
                            );
                            touched.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            let summary = running.wait().unwrap();
            stale_done.store(true, Ordering::Relaxed);
            assert_eq!(summary.stale_pages, stale);
            assert!(summary.requested_pages > 0, "no fault asked for a page");
            summary
        });
        let sender = Sender::new_vectored(a.try_clone().unwrap()).unwrap();
        let mut precopy = Precopy::new(sender, &src, PrecopyConfig::default(), || Ok::<(), io::Error>(()));
        precopy.run().unwrap();
        dirty(&src, 3000, 5);
        // ... the source pauses here ...
        let (report, _) = precopy.postcopy(&state, a).unwrap();
        let summary = destination.join().unwrap();
        assert_eq!(report.stale_pages, summary.stale_pages);
        assert!(report.requested_pages > 0 && report.requested_pages <= summary.requested_pages);
        assert_eq!(summary.receive.regions_verified, 2);
    });
    assert!(stale_done.load(Ordering::Relaxed));
    assert_eq!(touched.load(Ordering::Relaxed), 8000);
    assert_same(&src, &dst);
    // The memory is ordinary memory again: writes need no handler.
    dst.write_obj(7u64, GuestAddress(0x1000)).unwrap();
}

#[test]
fn a_source_with_nothing_dirty_completes_without_postcopy() {
    let src = mem();
    fill(&src, 9);
    let dst = mem();
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b);
            let received = receiver.receive_or_postcopy(&dst).unwrap();
            (matches!(received, Received::Complete(_)), receiver.take_device_state())
        });
        let mut precopy = Precopy::new(
            Sender::new_vectored(a.try_clone().unwrap()).unwrap(),
            &src,
            PrecopyConfig::default(),
            || Ok::<(), io::Error>(()),
        );
        precopy.run().unwrap();
        let (report, _) = precopy.postcopy(b"regs", a).unwrap();
        assert_eq!(report.stale_pages, 0);
        let (complete, state) = r.join().unwrap();
        assert!(complete);
        assert_eq!(state.as_deref(), Some(&b"regs"[..]));
    });
    assert_same(&src, &dst);
}

/// A post-copy stream up to its device state, from a real sender: the bytes, and the stale
/// pages' addresses.
fn switched_stream(src: &Mem) -> Vec<u8> {
    let (a, mut b) = UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        b.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let sender = Sender::new_vectored(a.try_clone().unwrap()).unwrap();
    let mut precopy = Precopy::new(sender, src, PrecopyConfig::default(), || Ok::<(), io::Error>(()));
    precopy.run().unwrap();
    dirty(src, 50, 1);
    // The requests side is a socket that never says anything.
    let (quiet, _keep) = UnixStream::pair().unwrap();
    precopy.postcopy(b"regs", quiet).unwrap();
    drop(a);
    reader.join().unwrap()
}

fn frame(kind: u32, a: u64, b: u64, c: u64) -> Vec<u8> {
    let mut f = kind.to_le_bytes().to_vec();
    f.extend_from_slice(&0u32.to_le_bytes());
    for x in [a, b, c] {
        f.extend_from_slice(&x.to_le_bytes());
    }
    f
}

fn run(addr: u64, pages: u32, kind: u32) -> Vec<u8> {
    let mut r = addr.to_le_bytes().to_vec();
    r.extend_from_slice(&pages.to_le_bytes());
    r.extend_from_slice(&kind.to_le_bytes());
    r
}

fn header() -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&0x5e55_u64.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h
}

fn device_state(blob: &[u8]) -> Vec<u8> {
    let mut f = frame(5, blob.len() as u64, Checksum::of(blob), 0);
    f.extend_from_slice(blob);
    f
}

fn receive_err(bytes: &[u8]) -> MigrationError {
    let dst = mem();
    match Receiver::new(bytes).receive_or_postcopy(&dst) {
        Err(e) => e,
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn hostile_postcopy_start_frames() {
    let start = |runs: &[Vec<u8>], pages: u64| {
        let mut s = header();
        s.extend_from_slice(&frame(6, runs.len() as u64, pages, 0));
        for r in runs {
            s.extend_from_slice(r);
        }
        s.extend_from_slice(&device_state(b"regs"));
        s
    };
    // The honest one.
    let dst = mem();
    let bytes = start(&[run(0x1000, 2, 0), run(0x90_0000, 1, 0)], 3);
    let Received::Postcopy(p) = Receiver::new(&bytes[..]).receive_or_postcopy(&dst).unwrap() else {
        panic!("not post-copy")
    };
    assert_eq!((p.stale_pages(), p.device_state()), (3, &b"regs"[..]));
    // `receive` says what to use instead.
    let e = Receiver::new(&bytes[..]).receive(&mem()).unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(w) if w.contains("receive_or_postcopy")), "{e}");
    let invalid = |bytes: Vec<u8>, what: &str| {
        let e = receive_err(&bytes);
        assert!(e.to_string().contains(what), "{e} (wanted {what})");
    };
    invalid(start(&[run(0x1000, 1, 1)], 1), "post-copy run kind");
    invalid(start(&[run(0x1000, 0, 0)], 0), "empty run");
    invalid(start(&[run(0x1001, 1, 0)], 1), "not page aligned");
    invalid(start(&[run(0x3000, 2, 0), run(0x4000, 1, 0)], 3), "out of order or overlapping");
    invalid(start(&[run(0x1000, 2, 0)], 3), "page count disagrees");
    invalid(start(&[run(0x100_0000, 1, 0)], 1), "cannot be migrated");
    // A run across the two regions.
    invalid(start(&[run(0x7f_f000, 2, 0)], 2), "cannot be migrated");
    invalid(start(&[], 0), "without stale pages");
    let mut huge = header();
    huge.extend_from_slice(&frame(6, u64::MAX, 1, 0));
    invalid(huge, "post-copy runs");
    // Announced runs that never come: an error, not a large allocation.
    let mut cut = header();
    cut.extend_from_slice(&frame(6, 1 << 22, 1, 0));
    cut.extend_from_slice(&run(0, 1, 0));
    invalid(cut, "stream ended");
    // After the start, only the device state.
    let mut next = header();
    next.extend_from_slice(&frame(6, 1, 1, 0));
    next.extend_from_slice(&run(0, 1, 0));
    next.extend_from_slice(&frame(2, 0, 0, 0));
    let e = receive_err(&next);
    assert!(matches!(e, MigrationError::UnexpectedFrame { expected: "device state", .. }), "{e}");
    // Not inside a round, and not after the device state.
    let mut inside = header();
    inside.extend_from_slice(&frame(1, 1, 0, 0));
    inside.extend_from_slice(&run(0, 1, 1));
    inside.extend_from_slice(&frame(6, 1, 1, 0));
    let e = receive_err(&inside);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "post-copy start", .. }), "{e}");
    let mut late = header();
    late.extend_from_slice(&device_state(b"regs"));
    late.extend_from_slice(&frame(6, 1, 1, 0));
    let e = receive_err(&late);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "post-copy start", .. }), "{e}");
}

#[test]
fn hostile_postcopy_pages_and_a_source_that_disappears() {
    if !uffd_ok("hostile_postcopy_pages_and_a_source_that_disappears") {
        return;
    }
    let src = mem();
    fill(&src, 21);
    let whole = switched_stream(&src);
    // Where the post-copy pages start: after the device state frame, found by its header.
    let state = device_state(b"regs");
    let at = whole.windows(state.len()).position(|w| w == &state[..]).unwrap() + state.len();
    let (prefix, rest) = whole.split_at(at);
    // Each case: the prefix, then `tail`; the destination is served from a socket.
    let case = |tail: Vec<u8>| -> MigrationError {
        let dst = mem();
        let mut receiver = Receiver::new(io::Cursor::new(prefix.to_vec()).chain(io::Cursor::new(tail)));
        // Pre-copy pages into `dst`, then the switch.
        let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else {
            panic!("not post-copy")
        };
        let (requests, _peer) = UnixStream::pair().unwrap();
        let running = start.start(receiver, &dst, requests).unwrap();
        running.wait().unwrap_err()
    };
    // The honest rest works.
    {
        let dst = mem();
        let mut receiver = Receiver::new(io::Cursor::new(whole.clone()));
        let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else { panic!() };
        let (requests, _peer) = UnixStream::pair().unwrap();
        let summary = start.start(receiver, &dst, requests).unwrap().wait().unwrap();
        assert!(summary.stale_pages > 0);
        assert_same(&src, &dst);
    }
    // The source disappears: the stream ends half-way.
    let e = case(rest[..rest.len() / 2].to_vec());
    assert!(matches!(e, MigrationError::Truncated { .. }), "{e}");
    // A page that is not stale (the last page of memory, not among the 50 dirtied).
    let mut not_stale = frame(1, 1, 0, 0);
    not_stale.extend_from_slice(&run(0xff_f000, 1, 1));
    let e = case(not_stale);
    assert!(
        matches!(e, MigrationError::InvalidFrame { what: "post-copy page that is not outstanding", .. }),
        "{e}"
    );
    // The checksums before the pages.
    let e = case(frame(3, 2, 0, 0));
    assert!(
        matches!(e, MigrationError::InvalidFrame { what: "checksums before every stale page arrived", .. }),
        "{e}"
    );
    // Memory digests asked for in a post-copy.
    let e = case(frame(3, 2, 1, 0));
    assert!(matches!(e, MigrationError::InvalidFrame { .. }), "{e}");
    // Another memory than the one received into is refused before anything is registered.
    let dst = mem();
    let mut receiver = Receiver::new(io::Cursor::new(whole.clone()));
    let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else { panic!() };
    let other = Mem::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap();
    let (requests, _peer) = UnixStream::pair().unwrap();
    let e = start.start(receiver, &other, requests).unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(w) if w.contains("not the one")), "{e}");
}
