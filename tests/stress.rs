//! Stress: hotplug swaps, reader threads, writer threads and a dirty-page harvester all at once,
//! for a bounded time (`GUESTMEM_STRESS_SECS`, default 5 s; CI keeps it well under 30 s).
//! Afterwards guest memory equals the model of every write, and the pages harvested equal the
//! pages written: no write lost, no dirty page lost, no page reported that nobody wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::mmap::MmapRegionBuilder;
use guestmem::{
    AtomicBitmap, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 4096;
/// Two permanent, adjacent regions that writers write: [0, 2 MiB).
const PERMANENT: u64 = 2 << 20;
const HOT_BASE: u64 = 1 << 30;
const HOT_SIZE: usize = 256 << 10;
const HOT_SLOTS: u64 = 6;
const WRITERS: u64 = 2;

fn secs() -> u64 {
    std::env::var("GUESTMEM_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5).min(30)
}

fn hot_value(base: u64, serial: u64) -> u64 {
    (base ^ serial.rotate_left(40)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn hot_region(slot: u64, serial: u64) -> GuestRegionMmap<AtomicBitmap> {
    let base = HOT_BASE + slot * (HOT_SIZE as u64) * 2;
    let region = GuestRegionMmap::build(MmapRegionBuilder::new(HOT_SIZE), GuestAddress(base)).unwrap();
    let s = region.as_volatile_slice();
    s.write_obj(serial, 0).unwrap();
    for off in (8..HOT_SIZE).step_by(512) {
        s.write_obj(hot_value(base, serial), off).unwrap();
    }
    region
}

#[test]
fn hotplug_readers_writers_and_harvester_together() {
    let deadline = Instant::now() + Duration::from_secs(secs());
    let base = Mem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)]).unwrap();
    let atomic = GuestMemoryAtomic::new(base);
    let stop = Arc::new(AtomicBool::new(false));
    let writers_done = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let harvested: Arc<Mutex<BTreeSet<u64>>> = Arc::default();

    // Writers: each owns the 8-byte slots `i * WRITERS + id`; a write stores (id, seq) and
    // sometimes straddles into the next page with a 16-byte value over two of its slots.
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let (atomic, stop) = (atomic.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut cache = atomic.cache();
                let mut model: BTreeMap<u64, u64> = BTreeMap::new();
                let mut pages = BTreeSet::new();
                let mut x = (id + 7).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    seq += 1;
                    let slot = (x % (PERMANENT / 8 / WRITERS)) * WRITERS + id;
                    let addr = slot * 8;
                    if (addr / PAGE).is_multiple_of(3) {
                        // Every third page is never written: a page reported dirty there
                        // would be a mark nobody made.
                        continue;
                    }
                    let value = (id << 56) | seq;
                    cache.memory().write_obj(value, GuestAddress(addr)).unwrap();
                    model.insert(addr, value);
                    pages.insert(addr / PAGE);
                }
                (model, pages, seq)
            })
        })
        .collect();

    // Readers: hot regions hold their pattern; permanent slots hold a value of their owner.
    let readers: Vec<_> = (0..2u64)
        .map(|id| {
            let (atomic, stop, checked) = (atomic.clone(), stop.clone(), checked.clone());
            std::thread::spawn(move || {
                let mut x = id + 99;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mem = atomic.memory();
                    for _ in 0..64 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let regions = mem.regions();
                        let r = &regions[(x >> 33) as usize % regions.len()];
                        let start = r.start_addr().0;
                        if start >= HOT_BASE {
                            let serial: u64 = mem.read_obj(GuestAddress(start)).unwrap();
                            let off = 8 + ((x >> 20) % (HOT_SIZE as u64 / 512 - 1)) * 512;
                            let v: u64 = mem.read_obj(GuestAddress(start + off)).unwrap();
                            assert_eq!(v, hot_value(start, serial));
                        } else {
                            let slot = (x >> 16) % (PERMANENT / 8);
                            let v: u64 = mem.read_obj(GuestAddress(slot * 8)).unwrap();
                            assert!(v == 0 || v >> 56 == slot % WRITERS, "slot {slot} holds {v:#x}");
                        }
                        n += 1;
                    }
                }
                checked.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();

    // Harvester: takes the permanent regions' dirty pages over and over, from whatever memory
    // is current (the permanent regions are shared by every generation).
    let harvester = {
        let (atomic, writers_done, harvested) = (atomic.clone(), writers_done.clone(), harvested.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            loop {
                let finished = writers_done.load(Ordering::Acquire);
                let mem = atomic.memory();
                let mut got = harvested.lock().unwrap();
                mem.take_dirty_ranges(|a, l| {
                    if a.0 < PERMANENT {
                        got.extend(a.0 / PAGE..(a.0 + l).min(PERMANENT).div_ceil(PAGE));
                    }
                })
                .unwrap();
                rounds += 1;
                if finished {
                    return rounds;
                }
            }
        })
    };

    // Hotplug: swap hot regions in and out until the deadline.
    let mut swaps = 0u64;
    while Instant::now() < deadline {
        swaps += 1;
        let slot = swaps % HOT_SLOTS;
        let at = GuestAddress(HOT_BASE + slot * (HOT_SIZE as u64) * 2);
        atomic
            .update(|m| {
                let m = match m.remove_region(at, HOT_SIZE as u64) {
                    Ok((smaller, _)) => smaller,
                    Err(_) => m.clone(),
                };
                m.insert_region(Arc::new(hot_region(slot, swaps)))
            })
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut model = BTreeMap::new();
    let mut written = BTreeSet::new();
    let mut writes = 0;
    for w in writers {
        let (m, p, n) = w.join().unwrap();
        model.extend(m);
        written.extend(p);
        writes += n;
    }
    writers_done.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
    let rounds = harvester.join().unwrap();

    let mem = atomic.memory();
    for (&addr, &value) in &model {
        assert_eq!(mem.read_obj::<u64>(GuestAddress(addr)).unwrap(), value, "slot at {addr:#x}");
    }
    let harvested = harvested.lock().unwrap();
    assert_eq!(*harvested, written, "harvested pages differ from written pages");
    assert!(harvested.iter().all(|p| !p.is_multiple_of(3)) && written.len() < (PERMANENT / PAGE) as usize);
    assert!(swaps > 20 && rounds > 1 && writes > 1000, "swaps {swaps}, harvests {rounds}, writes {writes}");
    eprintln!(
        "stress: {swaps} hotplug swaps, {writes} writes, {} checked reads, {rounds} harvests, {} pages",
        checked.load(Ordering::Relaxed),
        written.len()
    );
}
