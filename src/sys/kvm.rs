//! KVM ioctls guestmem issues (feature `kvm`): memslots, the dirty log (with manual clear) and
//! the dirty ring, on any VM or vCPU fd (`AsRawFd`), with the few `repr(C)` structs of
//! `linux/kvm.h` they need defined here. See the kernel's `Documentation/virt/kvm/api.rst`.

use std::io;
use std::os::fd::AsRawFd;
use std::os::raw::c_uint;

use super::cvt;

const KVMIO: c_uint = 0xAE;

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserspaceMemoryRegion {
    /// Slot number (address space id in the high 16 bits).
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest-physical address of the slot.
    pub guest_phys_addr: u64,
    /// Size in bytes (0 deletes the slot).
    pub memory_size: u64,
    /// Host address of the memory.
    pub userspace_addr: u64,
}

/// `KVM_MEM_LOG_DIRTY_PAGES`: log guest writes to the slot.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
/// `KVM_MEM_READONLY`: guest writes to the slot exit to user space as MMIO.
pub const KVM_MEM_READONLY: u32 = 2;

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_CAP_DIRTY_LOG_RING`.
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_DIRTY_LOG_INITIALLY_SET`.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 2;
/// `KVM_DIRTY_LOG_PAGE_OFFSET`: the dirty ring's page offset in the vCPU fd's mmap space.
pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for user space to collect.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: user space collected the entry; KVM may reset it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// `struct kvm_dirty_gfn`: one entry of a vCPU's dirty ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyGfn {
    /// `KVM_DIRTY_GFN_F_*`, shared with KVM: access it atomically.
    pub flags: u32,
    /// Slot number (address space id in the high 16 bits).
    pub slot: u32,
    /// Page offset within the slot.
    pub offset: u64,
}

#[repr(C)]
struct DirtyLog {
    slot: u32,
    padding: u32,
    bitmap: *mut u64,
}

#[repr(C)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: *mut u64,
}

#[repr(C)]
struct EnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

mod nr {
    #![allow(missing_docs)]
    use super::*;
    vmm_sys_util::ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, UserspaceMemoryRegion);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, DirtyLog);
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, ClearDirtyLog);
    vmm_sys_util::ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, EnableCap);
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// `KVM_CHECK_EXTENSION` on a `/dev/kvm` or VM fd: 0 if `cap` is absent, else its value.
pub fn check_extension(fd: &impl AsRawFd, cap: u32) -> io::Result<i32> {
    // SAFETY: KVM_CHECK_EXTENSION takes its argument by value and touches no process memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_val(fd, nr::KVM_CHECK_EXTENSION(), cap.into()) })
}

/// `KVM_ENABLE_CAP` on a VM fd with up to four arguments.
pub fn enable_cap(vm: &impl AsRawFd, cap: u32, args: [u64; 4]) -> io::Result<()> {
    let arg = EnableCap { cap, flags: 0, args, pad: [0; 64] };
    // SAFETY: the kernel reads one `struct kvm_enable_cap` from `arg`, which lives for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, nr::KVM_ENABLE_CAP(), &arg) }).map(drop)
}

/// `KVM_SET_USER_MEMORY_REGION`: creates, changes or (with `memory_size == 0`) deletes a slot.
///
/// # Safety
/// While the slot exists, the guest reads and writes `[userspace_addr, +memory_size)`: that
/// range must stay mapped (or be replaced by nothing else) until the slot is deleted, and be
/// memory the caller lets the guest change (writable unless `KVM_MEM_READONLY`).
pub unsafe fn set_user_memory_region(vm: &impl AsRawFd, region: &UserspaceMemoryRegion) -> io::Result<()> {
    // SAFETY: the kernel reads the struct; the caller upholds the contract on the memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, nr::KVM_SET_USER_MEMORY_REGION(), region) })
        .map(drop)
}

/// `KVM_GET_DIRTY_LOG`: copies slot `slot`'s dirty bitmap (one bit per 4 KiB page, bit `i` of
/// word `j` = page `64 j + i`) into `bitmap`. Without manual protect it also clears the log
/// and write-protects the pages again.
///
/// # Safety
/// `bitmap` must hold at least one bit per page of the slot as KVM registered it: the kernel
/// writes that many bits whatever the buffer's length (a shorter buffer corrupts the heap).
pub unsafe fn get_dirty_log(vm: &impl AsRawFd, slot: u32, bitmap: &mut [u64]) -> io::Result<()> {
    let mut log = DirtyLog { slot, padding: 0, bitmap: bitmap.as_mut_ptr() };
    // SAFETY: the caller guarantees `bitmap` covers the slot; `log` lives for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_GET_DIRTY_LOG(), &mut log) }).map(drop)
}

/// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears, and write-protects again, the pages of slot
/// `slot` whose bits are set in `bitmap`, from page `first_page` on for `num_pages` pages.
/// `first_page` must be a multiple of 64, and `num_pages` too unless the range ends at the
/// slot's end (else `EINVAL`). Fails with `EINVAL` if `bitmap` is shorter than `num_pages` bits.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < u64::from(num_pages) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut clear = ClearDirtyLog { slot, num_pages, first_page, bitmap: bitmap.as_ptr().cast_mut() };
    // SAFETY: the kernel reads `num_pages` bits from `bitmap` (checked to be long enough) and
    // never writes it; `clear` lives for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_CLEAR_DIRTY_LOG(), &mut clear) })
        .map(drop)
}

/// `KVM_RESET_DIRTY_RINGS` on a VM fd: lets KVM reuse the ring entries user space marked
/// collected; returns how many it reset.
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no process memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl(vm, nr::KVM_RESET_DIRTY_RINGS()) }).map(|n| n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<UserspaceMemoryRegion>(), 32);
        assert_eq!(std::mem::size_of::<DirtyLog>(), 16);
        assert_eq!(std::mem::size_of::<ClearDirtyLog>(), 24);
        assert_eq!(std::mem::size_of::<EnableCap>(), 104);
        assert_eq!(std::mem::size_of::<DirtyGfn>(), 16);
        // The ioctl numbers as linux/kvm.h computes them.
        assert_eq!(nr::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(nr::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(nr::KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(nr::KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(nr::KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(nr::KVM_CHECK_EXTENSION(), 0xae03);
    }

    #[test]
    fn errors_on_a_non_kvm_fd() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(check_extension(&f, KVM_CAP_DIRTY_LOG_RING).is_err());
        assert!(enable_cap(&f, KVM_CAP_DIRTY_LOG_RING, [4096, 0, 0, 0]).is_err());
        assert!(reset_dirty_rings(&f).is_err());
        assert!(clear_dirty_log(&f, 0, 0, 64, &[0]).is_err());
        assert_eq!(clear_dirty_log(&f, 0, 0, 65, &[0]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        let mut buf = [0u64; 1];
        // SAFETY: the call fails on /dev/null before the kernel writes anything.
        assert!(unsafe { get_dirty_log(&f, 0, &mut buf) }.is_err());
        // SAFETY: as above.
        assert!(unsafe { set_user_memory_region(&f, &UserspaceMemoryRegion::default()) }.is_err());
    }
}
