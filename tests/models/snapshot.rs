//! Snapshot restore from arbitrary bytes: either an error, with target memory untouched, or
//! success with memory that holds what the file says (its region checksums). Most inputs start
//! from a valid snapshot of random memory and then flip bytes and truncate, so the fuzzer gets
//! past the header checksum and exercises the deeper checks; the rest are raw bytes.

use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use super::input::{Input, PAGE};
use guestmem::checksum::Checksum;
use guestmem::snapshot;
use guestmem::sys::{self, MemfdFlags};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

type Mem = GuestMemoryMmap<()>;

const LAYOUT: [(u64, usize); 2] = [(0, 4 * PAGE as usize), (0x10_0000, 2 * PAGE as usize)];

fn memory() -> Mem {
    Mem::from_ranges(&LAYOUT.map(|(a, n)| (GuestAddress(a), n))).unwrap()
}

fn contents(mem: &Mem) -> Vec<u8> {
    let mut all = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).unwrap();
        all.extend(buf);
    }
    all
}

fn memfd() -> std::fs::File {
    sys::memfd_create(c"fuzz-snapshot", MemfdFlags::CLOEXEC).unwrap().into()
}

/// Runs the model on one input; panics on any disagreement.
pub fn check(data: &[u8]) {
    let mut input = Input(data);
    let mut file = memfd();
    if input.u8() % 8 != 0 {
        // A valid snapshot of memory with some non-zero pages, then mutations.
        let source = memory();
        for _ in 0..input.u8() % 8 {
            let addr = LAYOUT[input.u8() as usize % 2].0 + u64::from(input.u16()) % (2 * PAGE);
            let _ = source.write_obj(input.u64(), GuestAddress(addr));
        }
        snapshot::dump(&source, &file).unwrap();
        let len = file.seek(SeekFrom::End(0)).unwrap();
        for _ in 0..input.u8() % 4 {
            let at = u64::from(input.u16()) % len.max(1);
            file.seek(SeekFrom::Start(at)).unwrap();
            file.write_all(&[input.u8()]).unwrap();
        }
        if input.u8().is_multiple_of(4) {
            sys::fd::ftruncate(file.as_fd(), u64::from(input.u16()) % (len + 1)).unwrap();
        }
    } else {
        file.write_all(input.0).unwrap();
    }

    // The target memory holds a pattern, so "untouched" is visible.
    let target = memory();
    for r in target.iter() {
        target.write_slice(&vec![0x5a; r.len() as usize], r.start_addr()).unwrap();
    }
    let before = contents(&target);
    match snapshot::restore_into(&target, &file) {
        Err(_) => assert_eq!(contents(&target), before, "a refused restore changed guest memory"),
        Ok(_) => {
            // What the file promised: each region's contents match its checksum.
            let info = snapshot::read_info(&file).unwrap();
            if info.kind == snapshot::SnapshotKind::Full {
                for region in &info.regions {
                    let r = target.find_region(region.guest_addr).unwrap();
                    let mut c = Checksum::new();
                    c.update_volatile(&r.as_volatile_slice());
                    assert_eq!(c.finish(), region.checksum);
                }
            }
        }
    }
    // Mapping the same bytes: an error or memory, never a crash.
    if let Ok(mapped) = snapshot::restore_mapped::<()>(&file) {
        let _ = contents(&mapped);
    }
    let _ = snapshot::verify(&file);
}
