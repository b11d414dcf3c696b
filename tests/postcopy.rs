//! Post-copy migration (`migration::postcopy`) over real sockets into userfaultfd-registered
//! memory: threads touching the destination while the stale pages are still at the source see
//! the source's bytes, the memory ends equal to the source, a KVM guest resumed on it runs,
//! and hostile streams and a source that disappears are errors.

mod common;

use std::io::{self, Read, Write};
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
    // The requests side is a socket whose peer is gone: no requests, all pages in order.
    let (quiet, peer) = UnixStream::pair().unwrap();
    drop(peer);
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
    // ... even with the same layout: another mapping would be served zeros and digests of
    // the memory received into.
    let dst = mem();
    let mut receiver = Receiver::new(io::Cursor::new(whole.clone()));
    let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else { panic!() };
    let twin = mem();
    let (requests, _peer) = UnixStream::pair().unwrap();
    let e = start.start(receiver, &twin, requests).unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(w) if w.contains("not the one")), "{e}");
    // A source that goes silent: dropping the handle returns at once (what did not arrive is
    // poisoned), and `wait` returns once the connection is shut down.
    for shut_down in [false, true] {
        let dst = mem();
        let (tx, rx) = UnixStream::pair().unwrap();
        // The switch, then silence (the writer keeps its end open).
        let bytes = prefix.to_vec();
        let writer = std::thread::spawn(move || {
            (&tx).write_all(&bytes).unwrap();
            tx
        });
        let mut receiver = Receiver::new(rx.try_clone().unwrap());
        let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else { panic!() };
        let (requests, _peer) = UnixStream::pair().unwrap();
        let running = start.start(receiver, &dst, requests).unwrap();
        let t = std::time::Instant::now();
        if shut_down {
            rx.shutdown(std::net::Shutdown::Both).unwrap();
            assert!(running.wait().is_err());
        } else {
            drop(running);
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "blocked {:?}", t.elapsed());
        drop(writer.join().unwrap());
    }
}

#[test]
fn discard_rounds_and_acknowledgements_move_work_out_of_the_pause() {
    if !uffd_ok("discard_rounds_and_acknowledgements_move_work_out_of_the_pause") {
        return;
    }
    let src = mem();
    fill(&src, 31);
    let dst = mem();
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let destination = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b.try_clone().unwrap());
            receiver.set_return_path(b.try_clone().unwrap());
            let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else {
                panic!("the source did not switch to post-copy")
            };
            let stale = start.stale_pages();
            let summary = start.start(receiver, &dst, b).unwrap().wait().unwrap();
            (stale, summary)
        });
        let mut back = a.try_clone().unwrap();
        let sender = Sender::new_vectored(a.try_clone().unwrap()).unwrap();
        let mut precopy = Precopy::new(sender, &src, PrecopyConfig::default(), || Ok::<(), io::Error>(()));
        precopy.run().unwrap();
        assert!(precopy.wait_for_destination(&mut back, std::time::Duration::from_secs(20)).unwrap());
        // Nothing dirty: a discard round sends nothing.
        assert_eq!(precopy.discard_round().unwrap(), 0);
        dirty(&src, 400, 7);
        let first = precopy.discard_round().unwrap();
        assert!(first > 300, "{first} pages discarded");
        assert!(precopy.wait_for_destination(&mut back, std::time::Duration::from_secs(20)).unwrap());
        // A page dirtied after its discard is stale twice: it travels once.
        dirty(&src, 400, 7);
        dirty(&src, 100, 8);
        let second = precopy.discard_round().unwrap();
        assert!(precopy.wait_for_destination(&mut back, std::time::Duration::from_secs(20)).unwrap());
        dirty(&src, 50, 9);
        // No data round and no plain end after a discard round.
        let e = precopy.run().unwrap_err();
        assert!(matches!(e, MigrationError::Postcopy(_)), "{e}");
        let (report, _) = precopy.postcopy(b"regs", back).unwrap();
        let (stale, summary) = destination.join().unwrap();
        assert_eq!(report.stale_pages, stale);
        assert_eq!(summary.stale_pages, stale);
        assert!(stale >= first && stale <= first + second + 50, "{stale} of {first} + {second} + 50");
    });
    assert_same(&src, &dst);
}

#[test]
fn hostile_discard_frames() {
    let runs = |list: &[(u64, u32)]| {
        let mut f = frame(7, list.len() as u64, list.iter().map(|r| u64::from(r.1)).sum(), 0);
        for &(addr, pages) in list {
            f.extend_from_slice(&run(addr, pages, 0));
        }
        f
    };
    let with = |frames: &[Vec<u8>]| {
        let mut s = header();
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    };
    // After a discard frame: no pages, no end of round, no checksums, no done; discard frames
    // and the post-copy start (which may then list nothing) are fine.
    for next in [frame(1, 1, 0, 0), frame(2, 0, 0, 0), frame(3, 2, 0, 0), frame(4, 0, 0, 0)] {
        let e = receive_err(&with(&[runs(&[(0x1000, 1)]), next]));
        assert!(
            matches!(e, MigrationError::UnexpectedFrame { expected: "discard or post-copy start", .. }),
            "{e}"
        );
    }
    let dst = mem();
    dst.write_obj(0xabcd_u64, GuestAddress(0x2000)).unwrap();
    let mut switch = with(&[runs(&[(0x1000, 2)]), runs(&[(0x8000, 1), (0x9000, 1)])]);
    let mut start = frame(6, 1, 1, 0);
    start.extend_from_slice(&run(0xb000, 1, 0));
    switch.extend_from_slice(&start);
    switch.extend_from_slice(&device_state(b"regs"));
    let Received::Postcopy(p) = Receiver::new(&switch[..]).receive_or_postcopy(&dst).unwrap() else {
        panic!("not post-copy")
    };
    // 0x1000, 0x2000, 0x8000, 0x9000 discarded, 0xb000 at the switch; the discard dropped the data.
    assert_eq!(p.stale_pages(), 5);
    assert_eq!(dst.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0);
    // A page named twice: by two discard frames, or by a discard frame and the switch (so the
    // switch's work is bounded by the memory's size, whatever the peer sends).
    let e = receive_err(&with(&[runs(&[(0x1000, 2)]), runs(&[(0x2000, 1)])]));
    assert!(matches!(e, MigrationError::InvalidFrame { what: "a stale page named twice", .. }), "{e}");
    let mut again = with(&[runs(&[(0x1000, 2)])]);
    let mut start = frame(6, 1, 1, 0);
    start.extend_from_slice(&run(0x1000, 1, 0));
    again.extend_from_slice(&start);
    let e = receive_err(&again);
    assert!(matches!(e, MigrationError::InvalidFrame { what: "a stale page named twice", .. }), "{e}");
    // An empty post-copy start without discard frames before it.
    let mut empty = with(&[frame(6, 0, 0, 0)]);
    empty.extend_from_slice(&device_state(b"regs"));
    let e = receive_err(&empty);
    assert!(e.to_string().contains("without stale pages"), "{e}");
    // A discard frame inside a round, or for memory that cannot lose pages (a memfd).
    let mut inside = header();
    inside.extend_from_slice(&frame(1, 1, 0, 0));
    inside.extend_from_slice(&run(0, 1, 1));
    inside.extend_from_slice(&runs(&[(0x1000, 1)]));
    let e = receive_err(&inside);
    assert!(matches!(e, MigrationError::UnexpectedFrame { found: "discard", .. }), "{e}");
    let shared = guestmem::GuestMemoryMmap::<()>::from_regions(vec![guestmem::GuestRegionMmap::build(
        guestmem::mmap::MmapRegionBuilder::<()>::new(MIB)
            .backing(guestmem::mmap::Backing::Memfd(guestmem::mmap::MemfdOptions::new("ram"))),
        GuestAddress(0),
    )
    .unwrap()])
    .unwrap();
    shared.write_obj(5u8, GuestAddress(0x1000)).unwrap();
    let e = Receiver::new(&with(&[runs(&[(0x1000, 1)])])[..]).receive_or_postcopy(&shared).unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(w) if w.contains("private anonymous")), "{e}");
    assert_eq!(shared.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 5, "memfd page dropped");
}

#[cfg(feature = "kvm")]
#[test]
fn a_kvm_guest_resumed_by_postcopy_goes_on_exactly() {
    use common::kvm_guest::{
        self, run_until_exits, LoopingWriter, TestVm, VcpuState, COUNT_OFFSET, SEQ_OFFSET,
    };
    use guestmem::kvm::KvmSlots;

    let test = "a_kvm_guest_resumed_by_postcopy_goes_on_exactly";
    if common::need("kvm", test, kvm_guest::kvm_available()).is_none() || !uffd_ok(test) {
        return;
    }
    const CODE_GPA: u64 = 0x1000;
    let src = mem();
    let dst = mem();
    let mut vm = TestVm::new().unwrap();
    let mut slots = KvmSlots::new(vm.vm_fd(), true).unwrap();
    slots.register(&src).unwrap();
    let cpu = vm.add_vcpu().unwrap();
    let writer = LoopingWriter { writes_per_exit: 32, ..LoopingWriter::new(0x40_0000, 1024) };
    kvm_guest::start_looping_writer(vm.vcpu(cpu).unwrap(), CODE_GPA, &writer, &mut common::loader(&src))
        .unwrap();
    // The destination VM, its memory registered up front (KVM faults through the userfaultfd).
    let mut dst_vm = TestVm::new().unwrap();
    let mut dst_slots = KvmSlots::new(dst_vm.vm_fd(), false).unwrap();
    dst_slots.register(&dst).unwrap();
    let dst_cpu = dst_vm.add_vcpu().unwrap();

    let (a, b) = UnixStream::pair().unwrap();
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    // Round 0 only, then post-copy.
    let config = PrecopyConfig { max_rounds: 0, ..PrecopyConfig::default() };
    let vcpu = vm.vcpu(cpu).unwrap();
    let (paused_writes, total) = std::thread::scope(|s| {
        let dst_vcpu = dst_vm.vcpu(dst_cpu).unwrap();
        let destination = s.spawn(|| {
            let mut receiver = Receiver::new_vectored(b.try_clone().unwrap());
            let Received::Postcopy(start) = receiver.receive_or_postcopy(&dst).unwrap() else {
                panic!("the source did not switch to post-copy")
            };
            let state = VcpuState::from_bytes(start.device_state()).unwrap();
            let running = start.start(receiver, &dst, b).unwrap();
            // The guest runs at once, on memory whose dirtied pages are still at the source.
            state.restore(dst_vcpu).unwrap();
            let counts = run_until_exits(dst_vcpu, writer.port, 20).unwrap();
            let summary = running.wait().unwrap();
            assert!(summary.stale_pages > 0);
            u64::from(*counts.last().unwrap())
        });
        let guest = s.spawn(|| {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                last = run_until_exits(vcpu, writer.port, 1).unwrap()[0];
                progress.store(u64::from(last), Ordering::Relaxed);
            }
            (last, vcpu)
        });
        while progress.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let sync = || slots.sync_dirty_log().map(drop);
        let mut precopy =
            Precopy::new(Sender::new_vectored(a.try_clone().unwrap()).unwrap(), &src, config, sync);
        precopy.run().unwrap();
        let seen = progress.load(Ordering::Relaxed);
        while progress.load(Ordering::Relaxed) < seen + 4 * u64::from(writer.writes_per_exit) {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        let (writes, vcpu) = guest.join().unwrap();
        let state = VcpuState::save(vcpu).unwrap().to_bytes();
        let (report, _) = precopy.postcopy(&state, a).unwrap();
        assert!(report.stale_pages > 0, "the guest's writes after round 0 are stale");
        (u64::from(writes), destination.join().unwrap())
    });
    assert_eq!(total, paused_writes + 20 * u64::from(writer.writes_per_exit), "the guest did not go on");
    // Exactly what an unmigrated guest makes of the memory in `total` writes: each written
    // page's stamp and count, every other byte as the source has it (frozen at the pause).
    let expected = writer.expected(total);
    let before = writer.expected(paused_writes);
    let read = |m: &Mem, at: u64| m.read_obj::<u32>(GuestAddress(at)).unwrap();
    for &(p, seq, n) in &expected {
        assert_eq!(read(&dst, p + SEQ_OFFSET), seq, "page {p:#x}");
        assert_eq!(read(&dst, p + COUNT_OFFSET), n, "page {p:#x}");
    }
    for &(p, seq, n) in &before {
        assert_eq!(
            (read(&src, p + SEQ_OFFSET), read(&src, p + COUNT_OFFSET)),
            (seq, n),
            "source page {p:#x}"
        );
    }
    let written: std::collections::BTreeSet<u64> = expected.iter().map(|e| e.0).collect();
    let (sc, dc) = (common::contents(&src), common::contents(&dst));
    for (r, region) in src.iter().enumerate() {
        for off in (0..region.len() as usize).step_by(PAGE as usize) {
            let p = region.start_addr().0 + off as u64;
            let from = if written.contains(&p) { 8 } else { 0 };
            assert!(
                sc[r][off + from..off + PAGE as usize] == dc[r][off + from..off + PAGE as usize],
                "page {p:#x}"
            );
        }
    }
    drop(dst_slots);
}

#[test]
fn discard_rounds_refuse_memory_with_a_partial_last_page_before_sending() {
    let src = Mem::from_ranges(&[(GuestAddress(0), 0x10_0004)]).unwrap();
    src.write_obj(1u8, GuestAddress(0x10_0000)).unwrap();
    let mut precopy = Precopy::new(Sender::new(Vec::new()).unwrap(), &src, PrecopyConfig::default(), || {
        Ok::<(), io::Error>(())
    });
    let e = precopy.discard_round().unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(w) if w.contains("whole pages")), "{e}");
    // Nothing was sent: the migration can still end the ordinary way.
    let (report, _) = precopy.complete().unwrap();
    assert!(report.rounds[0].pages > 0);
}
