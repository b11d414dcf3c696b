//! Hotplug under load: reader threads access memory through `GuestMemoryAtomic` (snapshots
//! and per-thread caches) while a writer inserts and removes regions for a bounded time. No
//! crash, every read sees the data its region was built with, every reader's own writes read
//! back, and removed regions are unmapped once the last snapshot holding them is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use guestmem::mmap::MmapRegionBuilder;
use guestmem::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

type Mem = GuestMemoryMmap<()>;
/// A removed region (alive while anything holds it) and its host address.
type Removed = (Weak<GuestRegionMmap<()>>, usize);

const BASE_SIZE: usize = 1 << 20;
const HOT_SIZE: usize = 64 << 10;
const SLOTS: u64 = 8;

/// The value every u64 of a hot-plugged region holds: derived from its base and a serial so a
/// region that comes back at the same address holds different data.
fn pattern(base: u64, serial: u64) -> u64 {
    (base ^ serial.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn hot_region(slot: u64, serial: u64) -> GuestRegionMmap<()> {
    let base = (slot + 1) << 28;
    let mapping = MmapRegionBuilder::<()>::new(HOT_SIZE).build().unwrap();
    let s = mapping.as_volatile_slice();
    // The first word says which serial; the rest hold the pattern.
    s.write_obj(serial, 0).unwrap();
    for off in (8..HOT_SIZE).step_by(8) {
        s.write_obj(pattern(base, serial), off).unwrap();
    }
    GuestRegionMmap::new(mapping, GuestAddress(base)).unwrap()
}

fn check_hot(mem: &Mem, rng: &mut u64) -> bool {
    let n = mem.num_regions();
    if n < 2 {
        return false;
    }
    *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let region = &mem.regions()[1 + (*rng >> 33) as usize % (n - 1)];
    let base = region.start_addr().0;
    let serial: u64 = mem.read_obj(GuestAddress(base)).unwrap();
    let off = 8 + ((*rng >> 20) as usize % (HOT_SIZE / 8 - 1)) * 8;
    let v: u64 = mem.read_obj(GuestAddress(base + off as u64)).unwrap();
    assert_eq!(v, pattern(base, serial), "region {base:#x} serial {serial} offset {off:#x}");
    true
}

#[test]
fn readers_writer_and_hotplug_for_a_bounded_time() {
    let base = Mem::from_ranges(&[(GuestAddress(0), BASE_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(base);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let removed: Arc<Mutex<Vec<Removed>>> = Arc::default();

    let readers: Vec<_> = (0..3u64)
        .map(|id| {
            let (atomic, stop, reads) = (atomic.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut rng = id + 1;
                let mut cache = atomic.cache();
                let mut n = 0u64;
                let mut own = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Snapshot path: a batch of reads on one snapshot.
                    {
                        let mem = atomic.memory();
                        for _ in 0..16 {
                            n += check_hot(&mem, &mut rng) as u64;
                        }
                    }
                    // Cached path, with writes to the reader's own slot of the base region.
                    let mem = cache.memory();
                    own += 1;
                    let slot = GuestAddress(id * 4096);
                    mem.write_obj(own, slot).unwrap();
                    assert_eq!(mem.read_obj::<u64>(slot).unwrap(), own);
                    n += check_hot(mem, &mut rng) as u64;
                }
                reads.fetch_add(n, Ordering::Relaxed);
                own
            })
        })
        .collect();

    let writer = {
        let (atomic, stop, removed) = (atomic.clone(), stop.clone(), removed.clone());
        std::thread::spawn(move || {
            let mut serial = 0u64;
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                serial += 1;
                let slot = serial % SLOTS;
                let at = GuestAddress((slot + 1) << 28);
                atomic
                    .update(|m| -> Result<Mem, guestmem::GuestMemoryError> {
                        // Take out what sits in the slot, then plug a fresh region in.
                        let m = match m.remove_region(at, HOT_SIZE as u64) {
                            Ok((smaller, old)) => {
                                let host = old.host_ptr() as usize;
                                removed.lock().unwrap().push((Arc::downgrade(&old), host));
                                smaller
                            }
                            Err(_) => m.clone(),
                        };
                        m.insert_region(Arc::new(hot_region(slot, serial)))
                    })
                    .unwrap();
                swaps += 1;
            }
            swaps
        })
    };

    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let swaps = writer.join().unwrap();
    for r in readers {
        let own = r.join().unwrap();
        assert!(own > 0);
    }
    let total_reads = reads.load(Ordering::Relaxed);
    assert!(swaps > 50, "only {swaps} hotplug swaps");
    assert!(total_reads > 1000, "only {total_reads} checked reads");
    assert_eq!(atomic.generation(), swaps);

    // Every removed region was released and unmapped once no snapshot held it any more. The
    // final memory still holds the regions currently plugged in; drop it to release them too.
    let final_mem = atomic.snapshot();
    assert!(final_mem.num_regions() <= SLOTS as usize + 1);
    drop(final_mem);
    drop(atomic);
    let deadline = Instant::now() + Duration::from_secs(5);
    let removed = removed.lock().unwrap();
    assert!(removed.len() as u64 >= swaps - SLOTS);
    for (weak, _) in removed.iter() {
        while weak.upgrade().is_some() {
            assert!(Instant::now() < deadline, "a removed region is still alive");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Now every hot region is gone (removed ones above, the plugged-in ones with the memory):
    // the kernel maps no 64 KiB anonymous area at any address a removed region had.
    for (_, host) in removed.iter() {
        if let Ok(area) = guestmem::host::query(*host as *const u8) {
            let ours = area.range.start == *host && area.range.len() == HOT_SIZE && area.path.is_none();
            assert!(!ours, "region at {host:#x} still mapped: {area:?}");
        }
    }
    eprintln!("hotplug: {swaps} swaps, {total_reads} checked reads, {} regions released", removed.len());
}
