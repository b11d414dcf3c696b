//! guestmem owns a virtual machine's guest RAM on Linux: it maps it, translates guest-physical
//! addresses to host memory, gives safe volatile access to it and tracks which pages were
//! written.
//!
//! The layers, bottom to top:
//!
//! - [`sys`]: every system call the crate makes, typed and documented.
//! - [`host`]: process-memory utilities (page sizes, `/proc/self/maps`, protection and lock
//!   guards).
//! - [`volatile`]: [`VolatileSlice`] and typed refs over memory that may change under us, the
//!   copy engine, and I/O straight into and out of that memory.
//! - [`bitmap`]: dirty tracking ([`Bitmap`](bitmap::Bitmap); `()` tracks nothing).
//! - [`address`], [`bytes`]: guest addresses, byte-valued types and the [`Bytes`] trait.
//!
//! No safe call can make the process crash or touch memory outside a mapping: every access is
//! bounds checked, writes to read-only memory return an error, and guest memory is turned into
//! a Rust reference in one place only, the `&AtomicX` of an [`AtomicRef`] operation (see there
//! for why that is sound). The README's "Guarantees" say precisely what holds, and what the
//! kernel makes impossible to promise.
//!
//! ```
//! use guestmem::{Bytes, VolatileMemory, VolatileSlice};
//! let mut ram = vec![0u8; 4096];
//! let mem = VolatileSlice::from(&mut ram[..]);
//! mem.write_obj(0xfeed_u16, 0x10).unwrap();
//! assert_eq!(mem.read_obj::<u16>(0x10).unwrap(), 0xfeed);
//! assert!(mem.read_obj::<u64>(4092).is_err());
//! ```

#![deny(unsafe_op_in_unsafe_fn, missing_docs, missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod address;
pub mod atomic;
pub mod bitmap;
pub mod bytes;
pub mod checksum;
#[cfg(feature = "vm-memory")]
pub mod compat;
pub mod dirty;
pub mod host;
pub mod iommu;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod memory;
pub mod migration;
pub mod mmap;
pub mod plug;
mod pod;
pub mod region;
pub mod snapshot;
pub mod sys;
pub mod uffd;
pub mod vhost_user;
pub mod volatile;

pub use address::{Address, AddressError, GuestAddress, GuestUsize, MemoryRegionAddress};
pub use atomic::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryExclusiveGuard, GuestMemoryGuard, MemoryCache,
};
pub use bitmap::AtomicBitmap;
pub use bytes::{
    AtomicAccess, AtomicInteger, Be16, Be32, Be64, BeSize, ByteValued, Bytes, Le16, Le32, Le64, LeSize,
};
pub use dirty::DirtyRate;
pub use memory::{
    AsGuestRegionMmap, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemorySlices,
    GuestRegionCollection, GuestSlice,
};
pub use region::{GuestMemoryRegion, GuestRegionMmap};
pub use volatile::{
    AtomicRef, ReadVolatile, ReadVolatileAt, VolatileArrayRef, VolatileError, VolatileMemory, VolatileRef,
    VolatileSlice, WriteVolatile, WriteVolatileAt,
};

/// The README's Rust snippets, run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
