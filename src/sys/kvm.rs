//! KVM ioctls guestmem issues (feature `kvm`): memslots, the dirty log (with manual clear) and
//! the dirty ring, with the few `repr(C)` structs of `linux/kvm.h` they need defined here. See
//! the kernel's `Documentation/virt/kvm/api.rst`.
//!
//! An ioctl number means what the driver behind the descriptor says it means, so these calls
//! never take an arbitrary fd: they take a [`KvmVmFd`] or a [`KvmVcpuFd`], a descriptor of our
//! own (a duplicate of the caller's) that was checked to be a KVM VM or vCPU. The calls that
//! make the kernel read or write process memory at addresses the caller chooses are `unsafe fn`
//! with their contract; the rest are safe for every argument.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::raw::c_uint;

use super::fd::{dup_raw, fd_link, same_file};
use super::mman::{madvise, mmap, munmap, Advice, MapFlags, Protection};
use super::{cvt, page_size};

/// A descriptor of a KVM VM (`anon_inode:kvm-vm`), owned: a duplicate of the caller's, so it
/// stays valid (and the VM alive) for as long as this value lives, whatever the caller does with
/// its own.
#[derive(Debug)]
pub struct KvmVmFd(OwnedFd);

/// A descriptor of a KVM vCPU (`anon_inode:kvm-vcpu:N`), owned like [`KvmVmFd`].
#[derive(Debug)]
pub struct KvmVcpuFd(OwnedFd);

/// Duplicates `fd` and checks that the duplicate refers to an anonymous KVM file whose name
/// `accept`s. The check is on our own duplicate, so the number cannot change under it.
fn duplicate_kvm(fd: &impl AsRawFd, what: &str, accept: impl Fn(&str) -> bool) -> io::Result<OwnedFd> {
    let dup = dup_raw(fd.as_raw_fd())?;
    let link = fd_link(dup.as_fd())?;
    let name = link.to_string_lossy();
    // A real path always starts with '/': only the kernel names a descriptor `anon_inode:...`.
    match name.strip_prefix("anon_inode:") {
        Some(kind) if accept(kind) => Ok(dup),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {} is {name:?}, not a KVM {what}", fd.as_raw_fd()),
        )),
    }
}

impl KvmVmFd {
    /// Our own descriptor of the VM behind `fd` (kvm-ioctls' `VmFd`, a `File`, an `OwnedFd`,
    /// ...), or `InvalidInput` if `fd` is not a KVM VM (or `EBADF` if it is not open).
    ///
    /// ```
    /// let f = std::fs::File::open("/dev/null").unwrap();
    /// assert!(guestmem::sys::kvm::KvmVmFd::duplicate(&f).is_err());
    /// ```
    pub fn duplicate(fd: &impl AsRawFd) -> io::Result<Self> {
        duplicate_kvm(fd, "VM", |kind| kind == "kvm-vm").map(KvmVmFd)
    }

    /// Whether both are descriptors of the same VM (`kcmp(2)`: the same open file).
    pub fn same_vm(&self, other: &KvmVmFd) -> io::Result<bool> {
        same_file(self.0.as_fd(), other.0.as_fd())
    }
}

impl AsFd for KvmVmFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for KvmVmFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl KvmVcpuFd {
    /// Our own descriptor of the vCPU behind `fd`, or `InvalidInput` if `fd` is not a KVM vCPU.
    pub fn duplicate(fd: &impl AsRawFd) -> io::Result<Self> {
        duplicate_kvm(fd, "vCPU", |kind| kind.starts_with("kvm-vcpu:")).map(KvmVcpuFd)
    }

    /// Whether both are descriptors of the same vCPU.
    pub fn same_vcpu(&self, other: &KvmVcpuFd) -> io::Result<bool> {
        same_file(self.0.as_fd(), other.0.as_fd())
    }
}

impl AsFd for KvmVcpuFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for KvmVcpuFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

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

/// `struct kvm_userspace_memory_region2` (`KVM_CAP_USER_MEMORY2`): a slot that may also name a
/// guest_memfd (with [`KVM_MEM_GUEST_MEMFD`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserspaceMemoryRegion2 {
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
    /// Offset of the slot's memory in the guest_memfd.
    pub guest_memfd_offset: u64,
    /// The guest_memfd (with [`KVM_MEM_GUEST_MEMFD`]).
    pub guest_memfd: u32,
    /// Reserved.
    pub pad1: u32,
    /// Reserved.
    pub pad2: [u64; 14],
}

#[repr(C)]
struct CreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

/// `KVM_MEM_GUEST_MEMFD`: the slot's private memory (or, for a guest_memfd made with
/// [`GUEST_MEMFD_FLAG_MMAP`], all of it) comes from a guest_memfd.
pub const KVM_MEM_GUEST_MEMFD: u32 = 4;
/// `KVM_CAP_USER_MEMORY2`.
pub const KVM_CAP_USER_MEMORY2: u32 = 231;
/// `KVM_CAP_MEMORY_ATTRIBUTES`: the attributes `KVM_SET_MEMORY_ATTRIBUTES` can set (0: none).
pub const KVM_CAP_MEMORY_ATTRIBUTES: u32 = 233;
/// `KVM_CAP_GUEST_MEMFD`.
pub const KVM_CAP_GUEST_MEMFD: u32 = 234;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the `KVM_CREATE_GUEST_MEMFD` flags the VM accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the guest_memfd can be mapped by the host (and the slots that use
/// it take all their memory from it).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: its memory starts shared with the host (without it, a host
/// access to a mapping of it raises SIGBUS until the memory is converted).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;

mod nr {
    #![allow(missing_docs)]
    use super::*;
    vmm_sys_util::ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, UserspaceMemoryRegion);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, DirtyLog);
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, ClearDirtyLog);
    vmm_sys_util::ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, EnableCap);
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION2, KVMIO, 0x49, UserspaceMemoryRegion2);
    vmm_sys_util::ioctl_iowr_nr!(KVM_CREATE_GUEST_MEMFD, KVMIO, 0xd4, CreateGuestMemfd);
}

/// `KVM_CHECK_EXTENSION` on a VM: 0 if `cap` is absent, else its value.
pub fn check_extension(vm: &KvmVmFd, cap: u32) -> io::Result<i32> {
    // SAFETY: the fd is a KVM VM (checked when `vm` was made); KVM_CHECK_EXTENSION takes its
    // argument by value and touches no process memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_val(vm, nr::KVM_CHECK_EXTENSION(), cap.into()) })
}

/// `KVM_ENABLE_CAP` on a VM with up to four arguments.
///
/// # Safety
/// Some capabilities make the kernel read or write process memory at an address given in
/// `args` (or change how the VM treats memory it already maps): the caller must know what `cap`
/// does with `args` and uphold its contract. [`enable_manual_dirty_log_protect`] and
/// [`enable_dirty_log_ring`] are the safe forms of the capabilities guestmem uses.
pub unsafe fn enable_cap(vm: &KvmVmFd, cap: u32, args: [u64; 4]) -> io::Result<()> {
    let arg = EnableCap { cap, flags: 0, args, pad: [0; 64] };
    // SAFETY: the fd is a KVM VM; the kernel reads one `struct kvm_enable_cap` from `arg`,
    // which lives for the call; the caller upholds what `cap` does with `args`.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, nr::KVM_ENABLE_CAP(), &arg) }).map(drop)
}

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` with `flags` (a combination of
/// [`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`] and [`KVM_DIRTY_LOG_INITIALLY_SET`]; other bits are
/// `EINVAL` here).
pub fn enable_manual_dirty_log_protect(vm: &KvmVmFd, flags: u64) -> io::Result<()> {
    if flags & !(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: this capability takes its flags by value and makes the kernel touch no process
    // memory; it only changes whether KVM_GET_DIRTY_LOG clears the log.
    unsafe { enable_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [flags, 0, 0, 0]) }
}

/// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL])` with a ring of `bytes` per vCPU. KVM
/// refuses it (`EINVAL`) once a vCPU exists, once it is on, and for a size below its minimum.
pub fn enable_dirty_log_ring(vm: &KvmVmFd, acq_rel: bool, bytes: u32) -> io::Result<()> {
    let cap = if acq_rel { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING };
    // SAFETY: this capability takes the ring size by value; the rings it creates are kernel
    // memory that user space only sees by mapping a vCPU fd.
    unsafe { enable_cap(vm, cap, [u64::from(bytes), 0, 0, 0]) }
}

/// Whether the VM's dirty log is unavailable because the dirty ring is on: `KVM_GET_DIRTY_LOG`
/// of a slot number no VM has answers `ENXIO` then (and `EINVAL` otherwise), touching no
/// memory either way.
pub fn dirty_ring_is_on(vm: &KvmVmFd) -> io::Result<bool> {
    let mut log = DirtyLog { slot: u32::MAX, padding: 0, bitmap: std::ptr::null_mut() };
    // SAFETY: the fd is a KVM VM; slot u32::MAX (address space 0xffff) is refused before KVM
    // looks at the bitmap pointer, so nothing is written.
    match cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_GET_DIRTY_LOG(), &mut log) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Ok(false),
    }
}

/// `KVM_SET_USER_MEMORY_REGION`: creates, changes or (with `memory_size == 0`) deletes a slot.
///
/// # Safety
/// While the slot exists, the guest reads and writes `[userspace_addr, +memory_size)`: that
/// range must stay mapped (or be replaced by nothing else) until the slot is deleted, and be
/// memory the caller lets the guest change (writable unless `KVM_MEM_READONLY`).
pub unsafe fn set_user_memory_region(vm: &KvmVmFd, region: &UserspaceMemoryRegion) -> io::Result<()> {
    // SAFETY: the fd is a KVM VM; the kernel reads the struct; the caller upholds the contract
    // on the memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, nr::KVM_SET_USER_MEMORY_REGION(), region) })
        .map(drop)
}

/// `KVM_GET_DIRTY_LOG`: copies slot `slot`'s dirty bitmap (one bit per 4 KiB page, bit `i` of
/// word `j` = page `64 j + i`) to `bitmap`. Without manual protect it also clears the log
/// and write-protects the pages again.
///
/// # Safety
/// The kernel writes one bit per page of the slot as KVM holds it *now*, whatever the
/// buffer's length: `bitmap` must be valid for writes of that many bits (KVM rounds up to whole
/// 64-bit words), or end where the next byte is not mapped writable (the copy then fails with
/// `EFAULT` instead of writing past it).
pub unsafe fn get_dirty_log(vm: &KvmVmFd, slot: u32, bitmap: *mut u64) -> io::Result<()> {
    let mut log = DirtyLog { slot, padding: 0, bitmap };
    // SAFETY: the fd is a KVM VM; the caller guarantees `bitmap` covers the slot; `log` lives
    // for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_GET_DIRTY_LOG(), &mut log) }).map(drop)
}

/// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears, and write-protects again, the pages of slot
/// `slot` whose bits are set in `bitmap`, from page `first_page` on for `num_pages` pages.
/// `first_page` must be a multiple of 64, and `num_pages` too unless the range ends at the
/// slot's end (else `EINVAL`). Fails with `EINVAL` if `bitmap` is shorter than `num_pages` bits.
pub fn clear_dirty_log(
    vm: &KvmVmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < u64::from(num_pages) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut clear = ClearDirtyLog { slot, num_pages, first_page, bitmap: bitmap.as_ptr().cast_mut() };
    // SAFETY: the fd is a KVM VM; the kernel reads `num_pages` bits from `bitmap` (checked to be
    // long enough) and never writes it; `clear` lives for the call.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_CLEAR_DIRTY_LOG(), &mut clear) })
        .map(drop)
}

/// `KVM_RESET_DIRTY_RINGS` on a VM: lets KVM reuse the ring entries user space marked
/// collected; returns how many it reset.
pub fn reset_dirty_rings(vm: &KvmVmFd) -> io::Result<u32> {
    // SAFETY: the fd is a KVM VM; KVM_RESET_DIRTY_RINGS takes no argument and touches no
    // process memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl(vm, nr::KVM_RESET_DIRTY_RINGS()) }).map(|n| n as u32)
}

/// `KVM_SET_USER_MEMORY_REGION2`: like [`set_user_memory_region`], for a slot that may also
/// take its memory from a guest_memfd (`KVM_MEM_GUEST_MEMFD`, `guest_memfd`,
/// `guest_memfd_offset`).
///
/// # Safety
/// As [`set_user_memory_region`] for `[userspace_addr, +memory_size)`; the guest_memfd must be
/// one created on this VM, covering `[guest_memfd_offset, +memory_size)`.
pub unsafe fn set_user_memory_region2(vm: &KvmVmFd, region: &UserspaceMemoryRegion2) -> io::Result<()> {
    // SAFETY: the fd is a KVM VM; the kernel reads the struct; the caller upholds the contract
    // on the memory.
    cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, nr::KVM_SET_USER_MEMORY_REGION2(), region) })
        .map(drop)
}

/// `KVM_CREATE_GUEST_MEMFD`: a new guest_memfd of `size` bytes (a page multiple) for this VM,
/// with `flags` ([`GUEST_MEMFD_FLAG_MMAP`], [`GUEST_MEMFD_FLAG_INIT_SHARED`]; which ones the VM
/// takes, [`KVM_CAP_GUEST_MEMFD_FLAGS`] says). Its size is fixed: it cannot be truncated.
pub fn create_guest_memfd(vm: &KvmVmFd, size: u64, flags: u64) -> io::Result<OwnedFd> {
    let mut arg = CreateGuestMemfd { size, flags, reserved: [0; 6] };
    // SAFETY: the fd is a KVM VM; the kernel reads the struct (and writes nothing back) and
    // returns a new descriptor or -1.
    let fd =
        cvt(unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, nr::KVM_CREATE_GUEST_MEMFD(), &mut arg) })?;
    // SAFETY: the descriptor is new and owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Whether `fd` is a guest_memfd (`anon_inode:[kvm-gmem]`).
pub fn is_guest_memfd(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fd_link(fd)?.to_string_lossy() == "anon_inode:[kvm-gmem]")
}

/// A vCPU's dirty ring, mapped from its descriptor (`MAP_SHARED` at page
/// [`KVM_DIRTY_LOG_PAGE_OFFSET`]); unmapped when dropped.
#[derive(Debug)]
pub struct DirtyRing {
    entries: *mut DirtyGfn,
    bytes: usize,
}

// SAFETY: the mapping belongs to this value; its entries are shared with KVM by design and are
// accessed with atomics on their flags, as KVM's protocol requires.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the `bytes` of `vcpu`'s dirty ring and faults every page in
    /// (`MADV_POPULATE_WRITE`), so that a ring smaller than `bytes` (a vCPU of a VM whose ring
    /// is smaller, or off) is an error now (`EFAULT`) rather than a SIGBUS when an entry is
    /// read. `bytes` must be a page multiple (`EINVAL`).
    pub fn map(vcpu: &KvmVcpuFd, bytes: usize) -> io::Result<Self> {
        if bytes == 0 || !bytes.is_multiple_of(page_size()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET * page_size() as u64;
        // SAFETY: a new shared mapping of the vCPU's ring pages; no MAP_FIXED.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                bytes,
                Protection::READ_WRITE,
                MapFlags::SHARED,
                Some(vcpu.as_fd()),
                offset,
            )
        }?;
        // SAFETY: non-destructive advice on the mapping we just made.
        if let Err(e) = unsafe { madvise(ptr, bytes, Advice::PopulateWrite) } {
            // SAFETY: our new mapping, used by nobody.
            let _ = unsafe { munmap(ptr, bytes) };
            return Err(e);
        }
        Ok(DirtyRing { entries: ptr.cast(), bytes })
    }

    /// The first entry. The mapping holds [`len`](Self::len) entries, all faulted in.
    pub fn entries(&self) -> *mut DirtyGfn {
        self.entries
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.bytes / std::mem::size_of::<DirtyGfn>()
    }

    /// Whether the ring has no entry (never: a ring is at least a page).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; nothing refers to it past this value.
        let _ = unsafe { munmap(self.entries.cast(), self.bytes) };
    }
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
        assert_eq!(std::mem::size_of::<UserspaceMemoryRegion2>(), 160);
        assert_eq!(std::mem::size_of::<CreateGuestMemfd>(), 64);
        assert_eq!(nr::KVM_SET_USER_MEMORY_REGION2(), 0x40a0_ae49);
        assert_eq!(nr::KVM_CREATE_GUEST_MEMFD(), 0xc040_aed4);
        // The ioctl numbers as linux/kvm.h computes them.
        assert_eq!(nr::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(nr::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(nr::KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(nr::KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(nr::KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(nr::KVM_CHECK_EXTENSION(), 0xae03);
    }

    #[test]
    fn refuses_every_descriptor_that_is_not_kvm() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = KvmVmFd::duplicate(&f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("/dev/null"), "{e}");
        assert_eq!(KvmVcpuFd::duplicate(&f).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(KvmVmFd::duplicate(&a).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let memfd = crate::sys::memfd_create(c"kvm-vm", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        assert_eq!(KvmVmFd::duplicate(&memfd).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        /// An `AsRawFd` that names any number it likes.
        struct Number(i32);
        impl AsRawFd for Number {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.0
            }
        }
        assert_eq!(KvmVmFd::duplicate(&Number(-1)).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(KvmVmFd::duplicate(&Number(1 << 30)).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert!(KvmVmFd::duplicate(&Number(f.as_raw_fd())).is_err());
    }

    #[test]
    fn manual_protect_takes_only_known_flags() {
        // Without /dev/kvm there is no VM to try it on; the flag check comes first anyway.
        let Ok(kvm) = std::fs::File::open("/dev/kvm") else { return };
        // KVM_CREATE_VM: a new VM fd.
        // SAFETY: KVM_CREATE_VM takes a machine type by value and returns a new fd.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
        if vm < 0 {
            return;
        }
        // SAFETY: the fd is new and ours.
        let vm = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(vm) };
        let vm = KvmVmFd::duplicate(&vm).unwrap();
        assert_eq!(enable_manual_dirty_log_protect(&vm, 4).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert!(!dirty_ring_is_on(&vm).unwrap());
        assert!(check_extension(&vm, KVM_CAP_DIRTY_LOG_RING).is_ok());
        assert!(reset_dirty_rings(&vm).is_ok() || reset_dirty_rings(&vm).is_err());
        assert_eq!(clear_dirty_log(&vm, 0, 0, 65, &[0]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }
}
