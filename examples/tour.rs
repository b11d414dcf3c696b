//! A short tour of guestmem: build guest memory from regions with different backings, access
//! it by guest address (values, slices, arrays, atomics, across region boundaries), see the
//! errors a VMM gets instead of crashes, stream memory through a file, and hot-plug a region.
//!
//! Run with `cargo run --example tour`.

use std::io::{Seek, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::sys::Protection;
use guestmem::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A virtio-style descriptor: any `FromBytes + IntoBytes + Immutable + Copy` type is
/// byte-valued and can be read and written as a whole.
#[derive(Clone, Copy, Debug, PartialEq, FromBytes, IntoBytes, Immutable)]
#[repr(C)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

const MIB: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Low RAM: private anonymous memory, 2 MiB aligned, with guard pages around it.
    let low = MmapRegionBuilder::<()>::new(2 * MIB).align(2 * MIB).guard_pages(1).build()?;
    // High RAM right after it: a sealed memfd whose fd a vhost-user backend could map.
    let high = MmapRegionBuilder::<()>::new(2 * MIB)
        .backing(Backing::Memfd(MemfdOptions::new("tour-ram").sealed(true)))
        .build()?;
    // A read-only "ROM" further up.
    let rom = MmapRegionBuilder::<()>::new(64 << 10).protection(Protection::READ).build()?;
    let mem = GuestMemoryMmap::from_regions(vec![
        GuestRegionMmap::new(low, GuestAddress(0))?,
        GuestRegionMmap::new(high, GuestAddress(2 * MIB as u64))?,
        GuestRegionMmap::new(rom, GuestAddress(0xfff0_0000))?,
    ])?;
    for r in mem.iter() {
        println!(
            "region [{:#011x}, {:#011x}] {:>5} KiB, {:?}, file: {}",
            r.start_addr().0,
            r.last_addr().0,
            r.len() >> 10,
            r.protection(),
            r.file_offset().is_some()
        );
    }

    let desc = Descriptor { addr: 0x10_0000, len: 512, flags: 1, next: 7 };
    mem.write_obj(desc, GuestAddress(0x1000))?;
    println!("descriptor at 0x1000 reads back as {:?}", mem.read_obj::<Descriptor>(GuestAddress(0x1000))?);

    // A value straddling the two RAM regions is split across them transparently.
    let edge = GuestAddress(2 * MIB as u64 - 4);
    mem.write_obj(0x1122_3344_dead_beef_u64, edge)?;
    println!("u64 across the low/high boundary at {edge}: {:#x}", mem.read_obj::<u64>(edge)?);

    mem.write_slice(b"hello, guest", GuestAddress(0x3000))?;
    let mut text = [0u8; 12];
    mem.read_slice(&mut text, GuestAddress(0x3000))?;
    println!("slice at 0x3000: {:?}", String::from_utf8_lossy(&text));

    let ring = mem.get_slice(GuestAddress(0x4000), 16)?.get_array_ref::<u16>(0, 8)?;
    ring.copy_from(&[1, 2, 3, 4])?;
    let idx = mem.get_slice(GuestAddress(0x5000), 4)?.get_atomic_ref::<AtomicU32>(0)?;
    idx.fetch_add(3, Ordering::Release)?;
    println!("u16 ring element 3 = {}, atomic index = {}", ring.load(3)?, idx.load(Ordering::Acquire));

    // What a VMM gets instead of a crash.
    for (what, result) in [
        ("write to the ROM", mem.write_obj(1u32, GuestAddress(0xfff0_0000))),
        ("read past the end of RAM", mem.read_obj::<u64>(GuestAddress(4 * MIB as u64 - 4)).map(drop)),
        ("write into the hole below the ROM", mem.write_slice(&[0; 16], GuestAddress(0x1000_0000))),
        ("misaligned atomic", mem.store(1u32, GuestAddress(0x5002), Ordering::SeqCst)),
    ] {
        match result {
            Err(e) => println!("{what}: {e}"),
            Ok(()) => unreachable!("{what} must fail"),
        }
    }

    // Stream guest memory to a file and back, straight from and into the mapping.
    let mut file = vmm_sys_util::tempfile::TempFile::new()?.into_file();
    mem.write_all_volatile_to(GuestAddress(0x3000), &mut file, 12)?;
    file.flush()?;
    file.rewind()?;
    mem.read_exact_volatile_from(GuestAddress(2 * MIB as u64 + 0x100), &mut file, 12)?;
    mem.read_slice(&mut text, GuestAddress(2 * MIB as u64 + 0x100))?;
    println!("through a file into the memfd region: {:?}", String::from_utf8_lossy(&text));

    // Hot-plug: readers keep their snapshot; new snapshots see the new region.
    let atomic = GuestMemoryAtomic::new(mem);
    let before = atomic.memory();
    atomic.update(|m| {
        let region = GuestRegionMmap::build(MmapRegionBuilder::new(MIB), GuestAddress(0x1_0000_0000))?;
        m.insert_region(Arc::new(region))
    })?;
    let after = atomic.memory();
    after.write_obj(0x5au8, GuestAddress(0x1_0000_0000))?;
    println!(
        "hot-plugged 1 MiB at 4 GiB: old snapshot has {} regions, new has {} (generation {})",
        before.num_regions(),
        after.num_regions(),
        atomic.generation()
    );
    Ok(())
}
