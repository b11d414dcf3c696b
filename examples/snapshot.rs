//! Snapshots of a running guest: a host thread plays the guest and keeps writing guest memory
//! through the API; the VMM pauses it, takes a full snapshot, lets it run, takes diff
//! snapshots of what it dirtied, rebases the diffs onto the full snapshot, restores the result
//! by mapping it into new memory, and checks that it equals the guest's memory.
//!
//! Run with `cargo run --release --example snapshot`.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use guestmem::bitmap::AtomicBitmap;
use guestmem::snapshot::{self, DumpStats};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const MIB: usize = 1 << 20;
const PAGE: u64 = 4096;

fn tmp() -> File {
    vmm_sys_util::tempfile::TempFile::new().expect("temp file").into_file()
}

/// Apparent size and allocated bytes of a file.
fn sizes(f: &File) -> (u64, u64) {
    let st = guestmem::sys::fstat(f.as_fd()).expect("fstat");
    (st.size, st.blocks_512 * 512)
}

fn report(what: &str, f: &File, stats: Option<&DumpStats>, took: Duration) {
    let (len, alloc) = sizes(f);
    let detail = stats.map_or(String::new(), |s| {
        format!(", {} pages held, {} written, {} zero", s.pages_held, s.pages_written, s.zero_pages)
    });
    println!(
        "{what:<28} {:>8.1} MiB file, {:>7.2} MiB allocated{detail}, {:.2} ms",
        len as f64 / MIB as f64,
        alloc as f64 / MIB as f64,
        took.as_secs_f64() * 1e3
    );
}

/// Every region's bytes.
fn contents<M: GuestMemory>(mem: &M) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).expect("read guest memory");
            v
        })
        .collect()
}

/// The "guest": writes pages of a small working set (and sometimes zeroes one) until told to
/// stop, each write under the read side of `running` so the VMM can pause it.
fn guest(mem: Arc<GuestMemoryMmap<AtomicBitmap>>, running: Arc<RwLock<()>>, stop: Arc<AtomicBool>) -> u64 {
    let mut x = 0x1234_5678_u64;
    let mut writes = 0;
    let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    while !stop.load(Ordering::Relaxed) {
        let _running = running.read().expect("lock");
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (base, len) = regions[(x % regions.len() as u64) as usize];
            // A working set of the first 1024 pages of each region.
            let addr = GuestAddress(base + (x >> 8) % (len / PAGE).min(1024) * PAGE);
            if x.is_multiple_of(16) {
                mem.write_slice(&[0u8; PAGE as usize], addr).expect("guest write");
            } else {
                mem.write_obj(x, GuestAddress(addr.0 + (x >> 40) % (PAGE / 8) * 8)).expect("guest write");
            }
            writes += 1;
        }
        drop(_running);
        std::thread::yield_now();
    }
    writes
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Low RAM, and high RAM above a 4 GiB hole.
    let mem = Arc::new(GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), 64 * MIB),
        (GuestAddress(1 << 32), 32 * MIB),
    ])?);
    // Some boot-time contents: a "kernel image" of 8 MiB.
    let image: Vec<u8> = (0..8 * MIB).map(|i| (i as u8).wrapping_mul(7) | 1).collect();
    mem.write_slice(&image, GuestAddress(16 * MIB as u64))?;

    let running = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let guest_thread = {
        let (mem, running, stop) = (mem.clone(), running.clone(), stop.clone());
        std::thread::spawn(move || guest(mem, running, stop))
    };
    std::thread::sleep(Duration::from_millis(20));

    // Full snapshot, with the guest paused; the dirty log starts over from here.
    let full = tmp();
    let paused = running.write().expect("lock");
    let t = Instant::now();
    mem.take_dirty_ranges(|_, _| {})?;
    let stats = snapshot::dump(&mem, &full)?;
    report("full snapshot", &full, Some(&stats), t.elapsed());
    drop(paused);

    // Two diffs of what the guest dirtied in between.
    let mut diffs = Vec::new();
    for i in 1..=2 {
        std::thread::sleep(Duration::from_millis(30));
        let diff = tmp();
        let paused = running.write().expect("lock");
        let t = Instant::now();
        let stats = snapshot::dump_dirty(&mem, &diff)?;
        report(&format!("diff snapshot {i}"), &diff, Some(&stats), t.elapsed());
        drop(paused);
        diffs.push(diff);
    }
    stop.store(true, Ordering::Relaxed);
    let writes = guest_thread.join().map_err(|_| "guest thread panicked")?;
    // The guest ran a little after the last diff: one more diff so the chain ends where the
    // guest stopped.
    let last = tmp();
    let t = Instant::now();
    let stats = snapshot::dump_dirty(&mem, &last)?;
    report("final diff snapshot", &last, Some(&stats), t.elapsed());
    diffs.push(last);
    println!("guest made {writes} writes");

    // Rebase the chain onto the full snapshot.
    let mut base = full;
    for (i, diff) in diffs.iter().enumerate() {
        let next = tmp();
        let t = Instant::now();
        let stats = snapshot::rebase(&base, diff, &next)?;
        report(&format!("rebased onto diff {}", i + 1), &next, Some(&stats), t.elapsed());
        base = next;
    }

    // Restore by mapping (no copy), after checking the data once.
    let t = Instant::now();
    snapshot::verify(&base)?;
    let verified = t.elapsed();
    let t = Instant::now();
    let restored = snapshot::restore_mapped::<AtomicBitmap>(&base)?;
    let mapped = t.elapsed();
    println!(
        "verify {:.2} ms, restore by mapping {:.3} ms",
        verified.as_secs_f64() * 1e3,
        mapped.as_secs_f64() * 1e3
    );
    let equal = contents(&restored) == contents(&*mem);
    println!("restored memory equals the guest's: {equal}");
    if !equal {
        return Err("restored memory differs".into());
    }

    // The rebased snapshot again, copied into existing memory this time.
    let copy = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), 64 * MIB),
        (GuestAddress(1 << 32), 32 * MIB),
    ])?;
    let t = Instant::now();
    let rs = snapshot::restore_into(&copy, &base)?;
    println!(
        "restore by copy: {:.1} MiB read, {:.2} ms, {} pages now dirty in the destination",
        rs.bytes_read as f64 / MIB as f64,
        t.elapsed().as_secs_f64() * 1e3,
        copy.dirty_page_count()?
    );
    assert_eq!(contents(&copy), contents(&*mem));
    Ok(())
}
