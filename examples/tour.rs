//! A short tour of guestmem's foundation: map memory, then write and read values, slices,
//! typed arrays and atomics through a `VolatileSlice`, and stream it through a file.
//!
//! Run with `cargo run --example tour`.

use std::io::{Seek, Write};
use std::sync::atomic::{AtomicU32, Ordering};

use guestmem::sys::{mmap, munmap, MapFlags, Protection};
use guestmem::volatile::{ReadVolatile, WriteVolatile};
use guestmem::{Bytes, Le32, VolatileError, VolatileMemory, VolatileSlice};
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let len = 1 << 20;
    // SAFETY: a new private anonymous mapping; nothing else knows about it.
    let ptr = unsafe {
        mmap(
            std::ptr::null_mut(),
            len,
            Protection::READ_WRITE,
            MapFlags::PRIVATE | MapFlags::ANONYMOUS,
            None,
            0,
        )
    }?;
    println!("mapped {} KiB of anonymous memory at {ptr:p}", len >> 10);
    {
        // SAFETY: the mapping is valid for reads and writes until the munmap below, which
        // happens after every slice of it is gone, and it is never referenced as `&[u8]`.
        let mem = unsafe { VolatileSlice::new(ptr, len) };

        let desc = Descriptor { addr: 0x10_0000, len: 512, flags: 1, next: 7 };
        mem.write_obj(desc, 0x1000)?;
        let back: Descriptor = mem.read_obj(0x1000)?;
        println!("wrote and read back a descriptor at 0x1000: {back:?}");
        assert_eq!(back, desc);

        mem.write_obj(Le32::new(0xdead_beef), 0x2000)?;
        println!("little-endian u32 at 0x2000 reads as bytes {:02x?}", mem.read_obj::<[u8; 4]>(0x2000)?);

        mem.write_slice(b"hello, guest", 0x3000)?;
        let mut text = [0u8; 12];
        mem.read_slice(&mut text, 0x3000)?;
        println!("slice at 0x3000: {:?}", String::from_utf8_lossy(&text));

        let ring = mem.get_array_ref::<u16>(0x4000, 8)?;
        ring.copy_from(&[1, 2, 3, 4])?;
        println!("u16 array at 0x4000: element 3 = {}", ring.load(3)?);

        let idx = mem.get_atomic_ref::<AtomicU32>(0x5000)?;
        idx.fetch_add(3, Ordering::Release)?;
        println!("atomic u32 at 0x5000 after fetch_add(3): {}", idx.load(Ordering::Acquire));

        match mem.read_obj::<u64>(len - 4) {
            Err(e @ VolatileError::OutOfBounds { .. }) => println!("reading 8 bytes 4 before the end: {e}"),
            other => panic!("expected an out-of-bounds error, got {other:?}"),
        }

        let mut file = vmm_sys_util::tempfile::TempFile::new()?.into_file();
        file.write_all_volatile(&mem.subslice(0x3000, 12)?)?;
        file.flush()?;
        file.rewind()?;
        file.read_exact_volatile(&mem.subslice(0x6000, 12)?)?;
        mem.read_slice(&mut text, 0x6000)?;
        println!("streamed 12 bytes to a file and back to 0x6000: {:?}", String::from_utf8_lossy(&text));
    }
    // SAFETY: every slice of the mapping was dropped at the end of the block above.
    unsafe { munmap(ptr, len) }?;
    println!("unmapped; done");
    Ok(())
}
