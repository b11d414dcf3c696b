//! Conversions between guestmem's and vm-memory's addresses, endian values, file offsets and errors.
//!
//! Addresses and file offsets convert losslessly both ways. Errors convert from guestmem to
//! vm-memory by meaning (a hole is `InvalidGuestAddress`, a range past a region's end is
//! `InvalidBackendAddress`, a wrap past 2^64 is `GuestAddressOverflow`, a write to read-only
//! memory is an `IOError` of kind `PermissionDenied` that carries guestmem's error); vm-memory's
//! errors come into guestmem code as [`compat::Error`](super::Error) (`?` works).
//!
//! ```
//! use guestmem::compat::Error;
//! let a: vm_memory::GuestAddress = guestmem::GuestAddress(0x1000).into();
//! assert_eq!(guestmem::GuestAddress::from(a), guestmem::GuestAddress(0x1000));
//!
//! let e = guestmem::GuestMemoryError::InvalidGuestAddress(guestmem::GuestAddress(0x30000));
//! let vm: vm_memory::GuestMemoryError = e.into();
//! assert!(matches!(vm, vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(0x30000))));
//! assert!(matches!(Error::from(vm), Error::VmMemory(_)));
//! ```

use std::io;

use vm_memory::{GuestMemoryError as VmMemoryError, VolatileMemoryError as VmVolatileError};

use crate::mmap::FileOffset;
use crate::{GuestAddress, GuestMemoryError, MemoryRegionAddress, VolatileError};

impl From<GuestAddress> for vm_memory::GuestAddress {
    #[inline(always)]
    fn from(a: GuestAddress) -> Self {
        vm_memory::GuestAddress(a.0)
    }
}

impl From<vm_memory::GuestAddress> for GuestAddress {
    #[inline(always)]
    fn from(a: vm_memory::GuestAddress) -> Self {
        GuestAddress(a.0)
    }
}

impl From<MemoryRegionAddress> for vm_memory::MemoryRegionAddress {
    #[inline(always)]
    fn from(a: MemoryRegionAddress) -> Self {
        vm_memory::MemoryRegionAddress(a.0)
    }
}

impl From<vm_memory::MemoryRegionAddress> for MemoryRegionAddress {
    #[inline(always)]
    fn from(a: vm_memory::MemoryRegionAddress) -> Self {
        MemoryRegionAddress(a.0)
    }
}

macro_rules! endian_conversions {
    ($($t:ident),*) => {$(
        /// The same value (both types have the native layout).
        impl From<crate::$t> for vm_memory::$t {
            #[inline(always)]
            fn from(v: crate::$t) -> Self {
                v.get().into()
            }
        }

        /// The same value.
        impl From<vm_memory::$t> for crate::$t {
            #[inline(always)]
            fn from(v: vm_memory::$t) -> Self {
                v.to_native().into()
            }
        }
    )*};
}

endian_conversions!(Le16, Le32, Le64, LeSize, Be16, Be32, Be64, BeSize);

/// The same file and offset (the file handle is shared, not duplicated).
impl From<vm_memory::FileOffset> for FileOffset {
    fn from(f: vm_memory::FileOffset) -> Self {
        FileOffset::from_arc(f.arc().clone(), f.start())
    }
}

// No conversion the other way: a vm-memory `FileOffset` hands out its `&File`, through which
// safe code could shrink a file guestmem maps (guestmem's `FileOffset` never does).

/// vm-memory's error for a guestmem volatile error. vm-memory names one address where
/// guestmem names offset, length and size: `OutOfBounds` becomes the end of the access.
impl From<VolatileError> for VmVolatileError {
    fn from(e: VolatileError) -> Self {
        match e {
            VolatileError::OutOfBounds { offset, len, .. } => {
                VmVolatileError::OutOfBounds { addr: offset.saturating_add(len) }
            }
            VolatileError::Overflow { offset, len } => {
                VmVolatileError::Overflow { base: offset, offset: len }
            }
            VolatileError::TooBig { count, elem_size } => {
                VmVolatileError::TooBig { nelements: count, size: elem_size }
            }
            VolatileError::Misaligned { addr, align } => {
                VmVolatileError::Misaligned { addr, alignment: align }
            }
            VolatileError::PartialBuffer { expected, completed } => {
                VmVolatileError::PartialBuffer { expected, completed }
            }
            VolatileError::Io(e) => VmVolatileError::IOError(e),
            // vm-memory has no read-only memory: say it as the OS would.
            e @ VolatileError::ReadOnly { .. } => {
                VmVolatileError::IOError(io::Error::new(io::ErrorKind::PermissionDenied, e))
            }
        }
    }
}

/// vm-memory's error for a guestmem memory error, by meaning (see the module doc).
impl From<GuestMemoryError> for VmMemoryError {
    fn from(e: GuestMemoryError) -> Self {
        match e {
            GuestMemoryError::InvalidGuestAddress(a) => VmMemoryError::InvalidGuestAddress(a.into()),
            GuestMemoryError::InvalidRange { addr, .. } => VmMemoryError::InvalidGuestAddress(addr.into()),
            GuestMemoryError::Overflow { .. } => VmMemoryError::GuestAddressOverflow,
            GuestMemoryError::NotContiguous { .. } => VmMemoryError::InvalidBackendAddress,
            GuestMemoryError::PartialBuffer { expected, completed, .. } => {
                VmMemoryError::PartialBuffer { expected, completed }
            }
            GuestMemoryError::Access { source, .. } => VmVolatileError::from(source).into(),
            e @ GuestMemoryError::ReadOnly { .. } => {
                VmMemoryError::IOError(io::Error::new(io::ErrorKind::PermissionDenied, e))
            }
            // Region management (overlaps, mapping failures) has no vm-memory memory error.
            e => VmMemoryError::IOError(io::Error::other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_file_offsets_round_trip() {
        let a = vm_memory::GuestAddress(u64::MAX);
        assert_eq!(vm_memory::GuestAddress::from(GuestAddress::from(a)), a);
        let r = MemoryRegionAddress(7);
        assert_eq!(MemoryRegionAddress::from(vm_memory::MemoryRegionAddress::from(r)), r);
        let file = std::sync::Arc::new(vmm_sys_util::tempfile::TempFile::new().unwrap().into_file());
        let vm = vm_memory::FileOffset::from_arc(file.clone(), 0x2000);
        let back = FileOffset::from(vm);
        assert_eq!(back.start(), 0x2000);
        use std::os::fd::AsRawFd;
        assert_eq!(back.as_raw_fd(), file.as_raw_fd(), "the same open file, not a duplicate");
    }

    #[test]
    fn endian_types_convert_by_value() {
        let v: vm_memory::Be32 = crate::Be32::new(0x0102_0304).into();
        assert_eq!(v.to_native(), 0x0102_0304);
        assert_eq!(crate::Be32::from(v).get(), 0x0102_0304);
        let l: crate::LeSize = vm_memory::LeSize::from(7usize).into();
        assert_eq!(l.get(), 7);
        assert_eq!(std::mem::align_of::<crate::Le64>(), std::mem::align_of::<vm_memory::Le64>());
    }

    #[test]
    fn volatile_errors_by_meaning() {
        let cases: Vec<(VolatileError, &str)> = vec![
            (VolatileError::OutOfBounds { offset: 8, len: 8, size: 10 }, "OutOfBounds { addr: 16 }"),
            (VolatileError::Overflow { offset: usize::MAX, len: 2 }, "Overflow"),
            (VolatileError::TooBig { count: usize::MAX, elem_size: 8 }, "TooBig"),
            (VolatileError::Misaligned { addr: 3, align: 4 }, "Misaligned { addr: 3, alignment: 4 }"),
            (VolatileError::PartialBuffer { expected: 4, completed: 1 }, "PartialBuffer"),
            (VolatileError::Io(io::Error::other("x")), "IOError"),
            (VolatileError::ReadOnly { offset: 0, len: 1 }, "PermissionDenied"),
        ];
        for (e, want) in cases {
            let vm = VmVolatileError::from(e);
            assert!(format!("{vm:?}").contains(want), "{vm:?} should contain {want}");
        }
    }

    #[test]
    fn memory_errors_by_meaning() {
        let a = GuestAddress(0x40000);
        let cases: Vec<(GuestMemoryError, &str)> = vec![
            (GuestMemoryError::InvalidGuestAddress(a), "InvalidGuestAddress(GuestAddress(262144))"),
            (GuestMemoryError::InvalidRange { addr: a, len: 8 }, "InvalidGuestAddress(GuestAddress(262144))"),
            (GuestMemoryError::Overflow { addr: a, len: 8 }, "GuestAddressOverflow"),
            (GuestMemoryError::NotContiguous { addr: a, len: 8 }, "InvalidBackendAddress"),
            (GuestMemoryError::PartialBuffer { addr: a, expected: 8, completed: 2 }, "PartialBuffer"),
            (
                GuestMemoryError::Access { addr: a, source: VolatileError::Misaligned { addr: 2, align: 4 } },
                "InvalidBackendAddress",
            ),
            (
                GuestMemoryError::Access { addr: a, source: VolatileError::Io(io::Error::other("disk")) },
                "IOError",
            ),
            (GuestMemoryError::ReadOnly { addr: a, len: 4 }, "PermissionDenied"),
            (GuestMemoryError::NoRegionAt(a), "IOError"),
        ];
        for (e, want) in cases {
            let vm = VmMemoryError::from(e);
            assert!(format!("{vm:?}").contains(want), "{vm:?} should contain {want}");
        }
    }
}
