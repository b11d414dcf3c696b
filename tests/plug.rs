//! virtio-mem plug state against the real kernel: unplugged blocks are in no region (API
//! accesses are errors), fenced `PROT_NONE` and freed once no region covers them (checked in
//! `/proc/self/maps`, `mincore` and the memfd's blocks), plugged ones come back as zeros and
//! dirty; readers holding old memory never fault; hostile requests are errors that change
//! nothing. (The KVM side, a memslot per block group, is in tests/kvm.rs.)

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use guestmem::plug::{PlugBacking, PlugConfig, PlugDevice, PlugError};
use guestmem::sys::Protection;
use guestmem::{
    snapshot, AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryError,
    GuestMemoryMmap, GuestMemoryRegion,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const MIB: u64 = 1 << 20;
const BASE: u64 = 1 << 32;
const BLOCK: u64 = 2 * MIB;

fn config(backing: PlugBacking) -> PlugConfig {
    PlugConfig {
        guest_base: GuestAddress(BASE),
        size: 64 * MIB,
        block_size: BLOCK,
        group_size: 16 * MIB,
        backing,
    }
}

fn ram() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap()
}

fn block(b: u64) -> GuestAddress {
    GuestAddress(BASE + b * BLOCK)
}

/// The device's regions, as (first block, blocks).
fn runs(mem: &Mem) -> Vec<(u64, u64)> {
    mem.iter()
        .filter(|r| r.start_addr().0 >= BASE)
        .map(|r| ((r.start_addr().0 - BASE) / BLOCK, r.len() / BLOCK))
        .collect()
}

fn harvest_blocks(mem: &Mem) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    mem.take_dirty_ranges(|a, l| {
        if a.0 >= BASE {
            set.extend((a.0 - BASE) / BLOCK..(a.0 + l - BASE).div_ceil(BLOCK));
        }
    })
    .unwrap();
    set
}

fn host_of(mem: &Mem, b: u64) -> *mut u8 {
    mem.get_host_address(block(b)).unwrap()
}

fn check_plug_cycle(backing: PlugBacking) {
    let dev = PlugDevice::<AtomicBitmap>::new(config(backing)).unwrap();
    assert_eq!((dev.blocks(), dev.plugged_blocks()), (32, 0));
    assert!((0..32).all(|b| dev.is_fenced(b) && !dev.is_plugged(b)));
    // Each plug returns the next memory; the one before it is dropped as a VMM would.
    let mem = dev.plug(&ram(), 0, 3).unwrap();
    let mem = {
        let next = dev.plug(&mem, 8, 2).unwrap();
        drop(mem);
        next
    };
    assert_eq!(runs(&mem), [(0, 3), (8, 2)]);
    // Plugged blocks are zero memory, marked dirty (their contents changed).
    assert_eq!(harvest_blocks(&mem), (0..3).chain(8..10).collect());
    for b in [0u64, 1, 2, 8, 9] {
        assert_eq!(mem.read_obj::<u64>(GuestAddress(block(b).0 + 8)).unwrap(), 0);
        mem.write_obj(b + 100, GuestAddress(block(b).0 + 8)).unwrap();
    }
    assert_eq!(harvest_blocks(&mem), [0, 1, 2, 8, 9].into());
    let b1 = host_of(&mem, 1);
    assert_eq!(guestmem::host::query(b1).unwrap().protection, Protection::READ_WRITE);

    // Unplug block 1: the new memory has no region over it, the old one still reads it.
    let before = dev.plugged_blocks();
    let next = dev.unplug(&mem, 1, 1).unwrap();
    assert_eq!((dev.plugged_blocks(), before), (4, 5));
    assert_eq!(runs(&next), [(0, 1), (2, 1), (8, 2)]);
    let e = next.read_obj::<u64>(GuestAddress(block(1).0 + 8)).unwrap_err();
    assert!(matches!(e, GuestMemoryError::InvalidGuestAddress(_)), "{e}");
    assert!(next.write_slice(&[1; 16], GuestAddress(block(1).0 - 8)).is_err());
    assert!(!dev.is_fenced(1), "fenced while an older memory still covers it");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(block(1).0 + 8)).unwrap(), 101);
    // The other blocks keep their data through the rebuild.
    for b in [0u64, 2, 8, 9] {
        assert_eq!(next.read_obj::<u64>(GuestAddress(block(b).0 + 8)).unwrap(), b + 100);
    }
    drop(mem);
    assert!(dev.is_fenced(1));
    let area = guestmem::host::query(b1).unwrap();
    assert_eq!(area.protection, Protection::NONE);
    assert!(area.range.start <= b1 as usize && area.range.end >= b1 as usize + BLOCK as usize);
    let mut resident = vec![0u8; (BLOCK / 4096) as usize];
    guestmem::sys::mincore(b1, BLOCK as usize, &mut resident).unwrap();
    assert!(resident.iter().all(|&r| r & 1 == 0), "the unplugged block still uses memory");
    if let Some(fo) = dev.memfd() {
        // A hole in the memfd where block 1 was.
        let data =
            guestmem::sys::fd::lseek_data(fo.as_fd(), BLOCK, guestmem::sys::fd::SeekData::Data).unwrap();
        assert_ne!(data, Some(BLOCK));
    }

    // Plug it again: zeros, dirty, read-write.
    let mem = dev.plug(&next, 1, 1).unwrap();
    drop(next);
    assert!(!dev.is_fenced(1));
    assert_eq!(runs(&mem), [(0, 3), (8, 2)]);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(block(1).0 + 8)).unwrap(), 0);
    assert_eq!(harvest_blocks(&mem), [1].into());

    // A snapshot holds what is plugged, nothing else.
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    snapshot::dump(&mem, &file).unwrap();
    let info = snapshot::read_info(&file).unwrap();
    assert_eq!(info.regions.len(), 1 + 2);
    assert_eq!(info.regions.iter().map(|r| r.len).sum::<u64>(), MIB + 5 * BLOCK);

    // Unplug everything: every block fenced once the memory goes.
    let half = dev.unplug(&mem, 0, 3).unwrap();
    let empty = dev.unplug(&half, 8, 2).unwrap();
    assert_eq!(runs(&empty), []);
    drop((mem, half));
    assert!((0..32).all(|b| dev.is_fenced(b)));
}

#[test]
fn plug_cycle_on_anonymous_memory() {
    check_plug_cycle(PlugBacking::Anonymous);
}

#[test]
fn plug_cycle_on_a_memfd() {
    check_plug_cycle(PlugBacking::Memfd { name: "virtio-mem".into() });
}

/// Hostile requests: blocks outside the device, double plugs and unplugs, configurations the
/// device cannot take, a device range over other memory. Each is an error and changes nothing.
#[test]
fn hostile_requests_are_errors() {
    let dev = PlugDevice::<AtomicBitmap>::new(config(PlugBacking::Anonymous)).unwrap();
    let mem = dev.plug(&ram(), 4, 4).unwrap();
    for (first, count) in [(32, 1), (31, 2), (0, 0), (u64::MAX, 2), (1, u64::MAX)] {
        assert!(matches!(dev.plug(&mem, first, count), Err(PlugError::OutOfRange { .. })), "{first} {count}");
        assert!(matches!(dev.unplug(&mem, first, count), Err(PlugError::OutOfRange { .. })));
    }
    assert!(matches!(dev.plug(&mem, 2, 3), Err(PlugError::AlreadyPlugged(4))));
    assert!(matches!(dev.unplug(&mem, 6, 3), Err(PlugError::NotPlugged(8))));
    assert_eq!(dev.plugged_blocks(), 4);
    assert!((0..4).chain(8..32).all(|b| dev.is_fenced(b)), "a refused plug took a fence down");
    assert_eq!(runs(&mem), [(4, 4)]);
    // Configurations.
    let bad = |f: &dyn Fn(&mut PlugConfig)| {
        let mut c = config(PlugBacking::Anonymous);
        f(&mut c);
        PlugDevice::<AtomicBitmap>::new(c).unwrap_err()
    };
    for e in [
        bad(&|c| c.block_size = 3 * MIB),
        bad(&|c| c.block_size = 4096),
        bad(&|c| c.group_size = 3 * MIB),
        bad(&|c| c.group_size = 0),
        bad(&|c| c.size = 24 * MIB),
        bad(&|c| c.size = 0),
        bad(&|c| c.guest_base = GuestAddress(BASE + 4)),
        bad(&|c| c.guest_base = GuestAddress(u64::MAX - MIB)),
    ] {
        assert!(matches!(e, PlugError::InvalidConfig { .. }), "{e}");
    }
    // A device placed over memory the VM already has: the plug is refused, nothing changes.
    let over = PlugDevice::<AtomicBitmap>::new(PlugConfig {
        guest_base: GuestAddress(0),
        ..config(PlugBacking::Anonymous)
    })
    .unwrap();
    assert!(matches!(
        over.plug(&ram(), 0, 1),
        Err(PlugError::Memory(GuestMemoryError::RegionOverlap { .. }))
    ));
    assert_eq!(over.plugged_blocks(), 0);
    assert!(over.is_fenced(0));
}

/// Readers keep going through an unplug on the memory they hold: the block they read stays
/// mapped until their snapshot goes, so no reader faults (in a child: a fault is a signal).
#[test]
fn readers_never_fault_across_unplugs() {
    common::in_child("readers_never_fault_across_unplugs", || {
        let dev = PlugDevice::<AtomicBitmap>::new(config(PlugBacking::Anonymous)).unwrap();
        let atomic = GuestMemoryAtomic::new(dev.plug(&ram(), 0, 32).unwrap());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (atomic, stop) = (&atomic, &stop);
                s.spawn(move || {
                    let mut x = t + 1;
                    while !stop.load(Ordering::Relaxed) {
                        let mem = atomic.memory();
                        for _ in 0..64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Plugged or not, never a fault: an error where it is unplugged.
                            let _ = mem.read_obj::<u64>(GuestAddress((BASE + (x % (64 * MIB))) & !7));
                        }
                    }
                });
            }
            let mut x = 12345u64;
            for _ in 0..1000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % 32;
                atomic
                    .update(|m| if dev.is_plugged(b) { dev.unplug(m, b, 1) } else { dev.plug(m, b, 1) })
                    .unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        drop(atomic);
        assert!((0..32).all(|b| dev.is_plugged(b) || dev.is_fenced(b)));
    });
}

/// Every variant of `PlugError` from a real call.
#[test]
fn every_plug_error_variant_is_produced() {
    let name = |e: &PlugError| match e {
        PlugError::InvalidConfig { .. } => "InvalidConfig",
        PlugError::OutOfRange { .. } => "OutOfRange",
        PlugError::AlreadyPlugged(_) => "AlreadyPlugged",
        PlugError::NotPlugged(_) => "NotPlugged",
        PlugError::Os { .. } => "Os",
        PlugError::Bitmap(_) => "Bitmap",
        PlugError::Memory(_) => "Memory",
    };
    let dev = PlugDevice::<AtomicBitmap>::new(config(PlugBacking::Anonymous)).unwrap();
    let mem = dev.plug(&ram(), 0, 1).unwrap();
    let over = PlugDevice::<AtomicBitmap>::new(PlugConfig {
        guest_base: GuestAddress(0),
        ..config(PlugBacking::Anonymous)
    })
    .unwrap();
    let mut produced = vec![
        PlugDevice::<AtomicBitmap>::new(PlugConfig { block_size: 5, ..config(PlugBacking::Anonymous) })
            .unwrap_err(),
        dev.plug(&mem, 40, 1).unwrap_err(),
        dev.plug(&mem, 0, 1).unwrap_err(),
        dev.unplug(&mem, 1, 1).unwrap_err(),
        over.plug(&ram(), 0, 1).unwrap_err(),
        // A device larger than any bitmap can be allocated for.
        PlugDevice::<AtomicBitmap>::new(PlugConfig {
            size: 1 << 62,
            group_size: 1 << 40,
            guest_base: GuestAddress(0),
            ..config(PlugBacking::Anonymous)
        })
        .unwrap_err(),
    ];
    // A memfd the kernel cannot size: larger than the address space allows a file.
    produced.push(
        PlugDevice::<()>::new(PlugConfig {
            size: 1 << 63,
            group_size: 1 << 40,
            guest_base: GuestAddress(0),
            ..config(PlugBacking::Memfd { name: "huge".into() })
        })
        .unwrap_err(),
    );
    common::assert_every_variant(
        &produced,
        name,
        &["InvalidConfig", "OutOfRange", "AlreadyPlugged", "NotPlugged", "Os", "Bitmap", "Memory"],
        true,
    );
    let _ = Arc::new(dev);
}
