//! Real KVM guests for tests and examples: a [`TestVm`] (a VM, its vCPUs and memory slots) and
//! tiny 16-bit real-mode programs that write chosen guest-physical pages, so that dirty
//! tracking can be checked against what a guest really did, with KVM's own dirty log as the
//! oracle.
//!
//! The model:
//!
//! - Every program runs in real mode with `cs.base` = the code's GPA (`rip` = 0, so the code
//!   may sit anywhere below 4 GiB and be up to 64 KiB long) and `fs` set through
//!   `KVM_SET_SREGS` to a flat segment (base 0, limit 4 GiB - 1: "unreal mode"). Stores use an
//!   `fs:` override and 32-bit addressing, so one program reaches **any GPA below 4 GiB**, no
//!   per-window runs needed. (KVM honours the segment limit it is given in real mode; measured
//!   on the paravirtual KVM of our machines, see `/work/shared/KVM-NOTES.md`.)
//! - [`write_program`] / [`run_writes`]: write a byte at each of a list of GPAs, then `hlt`.
//! - [`LoopingWriter`]: a guest that never halts; it picks pseudo-random pages in a range
//!   (a 32-bit LCG in `esi`), stamps each chosen page and does an `out` every
//!   `writes_per_exit` writes, where the host may stop (pause) or resume it with
//!   [`run_until_exits`]. [`LoopingWriter::pages`] predicts exactly which pages it writes.
//! - The code itself is loaded by the HOST (through [`TestVm::write_ram`] or a loader the
//!   test passes), so it never shows in KVM's dirty log (instruction fetches do not dirty
//!   either), but it does show in any host-side tracking of those writes. Put the code at a
//!   GPA the test excludes or accounts for (the examples use page 0x1000, outside every range
//!   they write). Apart from the code, the programs touch no memory but their targets: no
//!   stack, no data.
//!
//! This machine's KVM emulates real-mode instructions (under 1 µs each): a [`write_program`]
//! write costs ~0.8 µs, a [`LoopingWriter`] write (13 instructions) ~9 µs, a new VM with a
//! slot and a vCPU ~0.5 ms. Keep write counts in the thousands.
//!
//! ```ignore
//! let mut vm = TestVm::new()?;
//! vm.add_ram(0, 0, 4 << 20, LOG_DIRTY_PAGES)?;
//! let cpu = vm.add_vcpu()?;
//! vm.run_writes(cpu, 0x1000, &[(0x20_0000, 0xab)])?;
//! assert_eq!(vm.dirty_pages(0)?, [0x20_0000].into());
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// The guest page size the dirty log counts in.
pub const PAGE_SIZE: u64 = 4096;

/// Slot flag: log guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
pub const LOG_DIRTY_PAGES: u32 = KVM_MEM_LOG_DIRTY_PAGES;

/// The programs reach GPAs below this (32-bit addressing through a flat `fs`).
pub const GUEST_REACH: u64 = 1 << 32;

/// The real-mode code segment's limit: a program is at most this long.
pub const MAX_PROGRAM_LEN: usize = 0x1_0000;

/// Where [`LoopingWriter`] stamps each page it writes: the sequence number of the write
/// (1 for the first write of a run from the start), a little-endian `u32`.
pub const SEQ_OFFSET: u64 = 0;

/// Where [`LoopingWriter`] counts the writes to each page: a little-endian `u32`, incremented.
pub const COUNT_OFFSET: u64 = 4;

/// Errors of the harness: each names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// An ioctl on /dev/kvm, the VM or a vCPU failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The call.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Mapping guest RAM failed.
    #[error("mapping {size:#x} bytes of guest RAM failed: {source}")]
    Mmap {
        /// Bytes asked for.
        size: usize,
        /// The error.
        source: std::io::Error,
    },
    /// A host access to GPAs no RAM of the VM covers (or that cross two slots).
    #[error("no RAM of the VM covers {len:#x} bytes at GPA {gpa:#x}")]
    NoRam {
        /// The guest-physical address.
        gpa: u64,
        /// Bytes.
        len: usize,
    },
    /// A slot number that was never registered through the harness.
    #[error("slot {0} is not registered through the harness")]
    UnknownSlot(u32),
    /// A vCPU index that does not exist.
    #[error("no vCPU {0}")]
    NoVcpu(usize),
    /// A GPA the real-mode programs cannot reach (4 GiB and above).
    #[error("GPA {gpa:#x} is beyond the guest's reach ({GUEST_REACH:#x})")]
    OutOfReach {
        /// The guest-physical address.
        gpa: u64,
    },
    /// A program longer than the real-mode code segment.
    #[error("a program of {len:#x} bytes does not fit in a {MAX_PROGRAM_LEN:#x}-byte code segment")]
    ProgramTooLong {
        /// Its length.
        len: usize,
    },
    /// A guest write that would land in the program's own code.
    #[error("a write at GPA {gpa:#x} hits the code at {code_gpa:#x}..{code_end:#x}")]
    WriteHitsCode {
        /// The write's address.
        gpa: u64,
        /// The code's first byte.
        code_gpa: u64,
        /// One past the code's last byte.
        code_end: u64,
    },
    /// A [`LoopingWriter`] that cannot be built.
    #[error("looping writer: {0}")]
    InvalidWriter(&'static str),
    /// The vCPU stopped for a reason the program does not produce: the program went wrong,
    /// or wrote to a GPA no slot covers (an MMIO exit).
    #[error("unexpected vCPU exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, as `VcpuExit`'s `Debug` shows it.
        exit: String,
        /// The guest's `rip` when it stopped (relative to the code's GPA).
        rip: u64,
    },
    /// A code loader passed by the caller failed (for loaders to return).
    #[error("loading the code at GPA {gpa:#x} failed: {reason}")]
    Load {
        /// Where the code goes.
        gpa: u64,
        /// Why it failed.
        reason: String,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> GuestError {
    move |source| GuestError::Kvm { op, source }
}

/// Whether KVM is usable here: /dev/kvm opens and a VM can be created. The reason otherwise,
/// for `need("kvm", ...)` in the tests' common module.
pub fn kvm_available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    Ok(())
}

/// One KVM memory slot, as `KVM_SET_USER_MEMORY_REGION` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// The slot number.
    pub slot: u32,
    /// The first guest-physical address.
    pub guest_phys_addr: u64,
    /// Bytes (a multiple of the page size; 0 deletes the slot).
    pub size: u64,
    /// The host address of the first byte.
    pub userspace_addr: u64,
    /// `KVM_MEM_*` flags, e.g. [`LOG_DIRTY_PAGES`].
    pub flags: u32,
}

impl MemorySlot {
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.guest_phys_addr + self.size
    }

    /// Whether `[gpa, gpa + len)` lies inside the slot.
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa.checked_add(len).is_some_and(|end| end <= self.end())
    }
}

/// Registers (or, with size 0, deletes) a slot: `KVM_SET_USER_MEMORY_REGION`.
///
/// # Safety
/// `[userspace_addr, userspace_addr + size)` must be a mapping that stays valid (not unmapped
/// or replaced) until the slot is deleted or the VM is closed: the guest reads and writes it.
pub unsafe fn set_user_memory_region(vm: &VmFd, slot: &MemorySlot) -> Result<(), GuestError> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: slot.flags,
        guest_phys_addr: slot.guest_phys_addr,
        memory_size: slot.size,
        userspace_addr: slot.userspace_addr,
    };
    // SAFETY: the caller keeps the memory mapped for as long as the slot exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// KVM's dirty log of `slot` as the GPAs of its dirty pages: `KVM_GET_DIRTY_LOG`, which also
/// clears the log (and write-protects the pages again) when manual protect is off.
///
/// The bitmap is sized from `slot.size`, the slot's exact size: kvm-ioctls 0.25 sizes its
/// buffer from the size given, and a size below the slot's lets the kernel write past it.
pub fn dirty_pages(vm: &VmFd, slot: &MemorySlot) -> Result<BTreeSet<u64>, GuestError> {
    let bitmap = vm.get_dirty_log(slot.slot, slot.size as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
    let pages = slot.size / PAGE_SIZE;
    let mut dirty = BTreeSet::new();
    for (word_index, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = word_index as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if page < pages {
                dirty.insert(slot.guest_phys_addr + page * PAGE_SIZE);
            }
        }
    }
    Ok(dirty)
}

/// A VM with vCPUs created on demand and the memory slots registered through it, some of
/// them backed by RAM the VM owns ([`add_ram`](Self::add_ram)).
///
/// Registration is separate and optional: memory mapped elsewhere (by the library) is
/// registered with [`set_user_memory_region`](Self::set_user_memory_region), or straight on
/// [`vm_fd`](Self::vm_fd).
#[derive(Debug)]
pub struct TestVm {
    // Fields drop in order: the vCPUs and the VM close before the RAM they use is unmapped.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    slots: Vec<MemorySlot>,
    ram: Vec<(MemorySlot, Ram)>,
}

/// Private anonymous memory the harness maps itself, unmapped when dropped. Accessed only by
/// raw copies (the guest writes it too), never through references.
#[derive(Debug)]
pub struct Ram {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping belongs to this value; it is only read and written with raw copies.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    /// `len` bytes of zeroed private anonymous memory.
    pub fn new(len: usize) -> std::io::Result<Ram> {
        // SAFETY: a new anonymous mapping, no MAP_FIXED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ram { ptr: ptr.cast(), len })
    }

    /// The host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `bytes` to `offset` (the caller checked the range).
    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset.checked_add(bytes.len()).is_some_and(|end| end <= self.len));
        // SAFETY: the range lies in our mapping (asserted); a host buffer never overlaps it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) }
    }

    /// Copies `buf.len()` bytes from `offset` (the caller checked the range).
    fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|end| end <= self.len));
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; every slot that used it is gone with the VM (fields of
        // `TestVm` drop in order) or was deleted.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl TestVm {
    /// A new VM with no vCPU and no memory.
    pub fn new() -> Result<Self, GuestError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(TestVm { vcpus: Vec::new(), vm, kvm, slots: Vec::new(), ram: Vec::new() })
    }

    /// The /dev/kvm handle (capabilities).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM (it implements `AsRawFd`, for ioctls kvm-ioctls does not wrap).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Creates the next vCPU (ids 0, 1, ...) and returns its index.
    pub fn add_vcpu(&mut self) -> Result<usize, GuestError> {
        let id = self.vcpus.len();
        let vcpu = self.vm.create_vcpu(id as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        self.vcpus.push(vcpu);
        Ok(id)
    }

    /// The vCPUs, by index.
    pub fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    /// The vCPUs, mutably (to run several at once from scoped threads).
    pub fn vcpus_mut(&mut self) -> &mut [VcpuFd] {
        &mut self.vcpus
    }

    /// vCPU `index`.
    pub fn vcpu(&mut self, index: usize) -> Result<&mut VcpuFd, GuestError> {
        self.vcpus.get_mut(index).ok_or(GuestError::NoVcpu(index))
    }

    /// Registers (or with size 0 deletes) a slot, and remembers it for
    /// [`dirty_pages`](Self::dirty_pages).
    ///
    /// # Safety
    /// As [`set_user_memory_region`](fn@set_user_memory_region): the memory stays mapped
    /// until the slot is deleted or this VM is dropped.
    pub unsafe fn set_user_memory_region(&mut self, slot: MemorySlot) -> Result<(), GuestError> {
        // SAFETY: the caller's promise, passed on.
        unsafe { set_user_memory_region(&self.vm, &slot) }?;
        self.slots.retain(|s| s.slot != slot.slot);
        if slot.size != 0 {
            self.slots.push(slot);
        }
        Ok(())
    }

    /// Maps `size` bytes of private anonymous RAM, owned by the VM, and registers it as
    /// `slot` at `gpa` with `flags`.
    pub fn add_ram(
        &mut self,
        slot: u32,
        gpa: u64,
        size: usize,
        flags: u32,
    ) -> Result<MemorySlot, GuestError> {
        let region = Ram::new(size).map_err(|source| GuestError::Mmap { size, source })?;
        let memory_slot = MemorySlot {
            slot,
            guest_phys_addr: gpa,
            size: size as u64,
            userspace_addr: region.as_ptr() as u64,
            flags,
        };
        // SAFETY: the region is kept in `self.ram`, which drops after the VM and its vCPUs.
        // A later registration of the same slot number only replaces the slot, not the
        // region, which stays mapped until the VM is gone.
        unsafe { self.set_user_memory_region(memory_slot) }?;
        self.ram.push((memory_slot, region));
        Ok(memory_slot)
    }

    /// The slot registered as `slot`.
    pub fn slot(&self, slot: u32) -> Result<MemorySlot, GuestError> {
        self.slots.iter().find(|s| s.slot == slot).copied().ok_or(GuestError::UnknownSlot(slot))
    }

    /// Writes `bytes` at `gpa` from the host (not in KVM's dirty log), in RAM the VM owns.
    pub fn write_ram(&self, gpa: u64, bytes: &[u8]) -> Result<(), GuestError> {
        RamView(&self.ram).write(gpa, bytes)
    }

    /// Reads `buf.len()` bytes at `gpa` from the host, in RAM the VM owns.
    pub fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        RamView(&self.ram).read(gpa, buf)
    }

    /// The little-endian `u32` at `gpa`, in RAM the VM owns.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, GuestError> {
        let mut bytes = [0u8; 4];
        self.read_ram(gpa, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// KVM's dirty log of a slot registered through the harness, as GPAs (and cleared, see
    /// [`dirty_pages`](fn@dirty_pages)).
    pub fn dirty_pages(&self, slot: u32) -> Result<BTreeSet<u64>, GuestError> {
        dirty_pages(&self.vm, &self.slot(slot)?)
    }

    /// [`run_writes`] on vCPU `vcpu`, with the code loaded into RAM the VM owns.
    pub fn run_writes(
        &mut self,
        vcpu: usize,
        code_gpa: u64,
        writes: &[(u64, u8)],
    ) -> Result<Duration, GuestError> {
        let vcpu = self.vcpus.get_mut(vcpu).ok_or(GuestError::NoVcpu(vcpu))?;
        let ram = RamView(&self.ram);
        run_writes(vcpu, code_gpa, writes, &mut |gpa, code| ram.write(gpa, code))
    }

    /// [`start_looping_writer`] on vCPU `vcpu`, with the code loaded into RAM the VM owns.
    pub fn start_looping_writer(
        &mut self,
        vcpu: usize,
        code_gpa: u64,
        writer: &LoopingWriter,
    ) -> Result<(), GuestError> {
        let vcpu = self.vcpus.get_mut(vcpu).ok_or(GuestError::NoVcpu(vcpu))?;
        let ram = RamView(&self.ram);
        start_looping_writer(vcpu, code_gpa, writer, &mut |gpa, code| ram.write(gpa, code))
    }
}

/// The VM's RAM on its own, so it can be borrowed beside a vCPU.
struct RamView<'a>(&'a [(MemorySlot, Ram)]);

impl RamView<'_> {
    /// The region that holds `[gpa, gpa + len)` (the newest registration of a GPA wins), and
    /// the offset of `gpa` in it.
    fn at(&self, gpa: u64, len: usize) -> Result<(&Ram, usize), GuestError> {
        self.0
            .iter()
            .rev()
            .find(|(s, _)| s.covers(gpa, len as u64))
            .map(|(s, r)| (r, (gpa - s.guest_phys_addr) as usize))
            .ok_or(GuestError::NoRam { gpa, len })
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), GuestError> {
        let (region, offset) = self.at(gpa, bytes.len())?;
        region.write(offset, bytes);
        Ok(())
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let (region, offset) = self.at(gpa, buf.len())?;
        region.read(offset, buf);
        Ok(())
    }
}

/// A function that writes bytes at a GPA from the host: how the harness loads code into
/// memory it does not own (e.g. through the library's `GuestMemory`).
pub type CodeLoader<'a> = dyn FnMut(u64, &[u8]) -> Result<(), GuestError> + 'a;

/// Points `vcpu` at the code at `code_gpa` in real mode: `cs.base = code_gpa`, `rip = 0`,
/// `rflags = 2` (interrupts off), and `fs` flat (base 0, limit 4 GiB - 1, 4 KiB granular) for
/// the programs' `fs:` stores. Other registers keep their values.
pub fn enter_real_mode(vcpu: &VcpuFd, code_gpa: u64) -> Result<(), GuestError> {
    if code_gpa >= GUEST_REACH {
        return Err(GuestError::OutOfReach { gpa: code_gpa });
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.base = code_gpa;
    // The selector only matters to a guest that reloads cs; make it agree where it can.
    sregs.cs.selector =
        if code_gpa < 0x10_0000 && code_gpa.is_multiple_of(16) { (code_gpa >> 4) as u16 } else { 0 };
    sregs.fs.base = 0;
    sregs.fs.limit = 0xffff_ffff;
    sregs.fs.g = 1;
    sregs.fs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// The state of a vCPU that runs one of these programs, for moving it to another VM (a live
/// migration): its general registers and its segment and control registers. The programs use
/// nothing else (no FPU, no MSRs, no interrupts).
///
/// As bytes ([`to_bytes`](Self::to_bytes)) it is the raw `struct kvm_regs` then `struct
/// kvm_sregs` of this host's ABI: only for a VM on a host of the same kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VcpuState {
    /// `KVM_GET_REGS`.
    pub regs: kvm_bindings::kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_bindings::kvm_sregs,
}

impl VcpuState {
    /// The state of `vcpu` (paused: not in `KVM_RUN`).
    pub fn save(vcpu: &VcpuFd) -> Result<Self, GuestError> {
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        })
    }

    /// Gives `vcpu` this state; it resumes where the saved vCPU stopped.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), GuestError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// The size of [`to_bytes`](Self::to_bytes).
    pub const LEN: usize =
        std::mem::size_of::<kvm_bindings::kvm_regs>() + std::mem::size_of::<kvm_bindings::kvm_sregs>();

    /// The state as bytes (see the type's docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        // SAFETY: both are plain `repr(C)` structs of integers (kvm-bindings); their bytes are
        // initialized (they were copied out of the kernel or built field by field).
        unsafe {
            out.extend_from_slice(std::slice::from_raw_parts(
                (&self.regs as *const kvm_bindings::kvm_regs).cast::<u8>(),
                std::mem::size_of::<kvm_bindings::kvm_regs>(),
            ));
            out.extend_from_slice(std::slice::from_raw_parts(
                (&self.sregs as *const kvm_bindings::kvm_sregs).cast::<u8>(),
                std::mem::size_of::<kvm_bindings::kvm_sregs>(),
            ));
        }
        out
    }

    /// The state from [`to_bytes`](Self::to_bytes)'s bytes, or `None` if the length is not
    /// [`LEN`](Self::LEN).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let split = std::mem::size_of::<kvm_bindings::kvm_regs>();
        let mut regs = kvm_bindings::kvm_regs::default();
        let mut sregs = kvm_bindings::kvm_sregs::default();
        // SAFETY: every bit pattern is a valid value of these structs of integers; the lengths
        // match (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut regs as *mut kvm_bindings::kvm_regs).cast::<u8>(),
                split,
            );
            std::ptr::copy_nonoverlapping(
                bytes[split..].as_ptr(),
                (&mut sregs as *mut kvm_bindings::kvm_sregs).cast::<u8>(),
                bytes.len() - split,
            );
        }
        Some(VcpuState { regs, sregs })
    }
}

/// The error for an exit the program does not produce (the `Debug` text of the exit, and
/// where the guest stopped).
fn unexpected(vcpu: &VcpuFd, exit: String) -> GuestError {
    let rip = vcpu.get_regs().map_or(u64::MAX, |r| r.rip);
    GuestError::UnexpectedExit { exit, rip }
}

/// Runs `vcpu` until it executes `hlt`; any other exit is an error.
pub fn run_to_hlt(vcpu: &mut VcpuFd) -> Result<(), GuestError> {
    let exit = match vcpu.run() {
        Ok(VcpuExit::Hlt) => return Ok(()),
        Ok(exit) => format!("{exit:?}"),
        Err(source) => return Err(GuestError::Kvm { op: "KVM_RUN", source }),
    };
    Err(unexpected(vcpu, exit))
}

/// Real-mode code that writes byte `value` at each guest-physical address of `writes` (in
/// order), then executes `hlt`: per write `mov byte fs:[addr32], value` (9 bytes).
///
/// Needs the vCPU state of [`enter_real_mode`]; reaches any GPA below 4 GiB.
pub fn write_program(writes: &[(u64, u8)]) -> Result<Vec<u8>, GuestError> {
    let mut code = Vec::with_capacity(writes.len() * 9 + 1);
    for &(gpa, value) in writes {
        let addr = u32::try_from(gpa).map_err(|_| GuestError::OutOfReach { gpa })?;
        // fs: addr32 mov r/m8, imm8 with ModRM mod=00 rm=101: [disp32].
        code.extend_from_slice(&[0x64, 0x67, 0xc6, 0x05]);
        code.extend_from_slice(&addr.to_le_bytes());
        code.push(value);
    }
    code.push(HLT);
    if code.len() > MAX_PROGRAM_LEN {
        return Err(GuestError::ProgramTooLong { len: code.len() });
    }
    Ok(code)
}

const HLT: u8 = 0xf4;

/// Checks that `code` fits at `code_gpa` below 4 GiB, and returns its end.
fn code_end(code_gpa: u64, code: &[u8]) -> Result<u64, GuestError> {
    let end = code_gpa + code.len() as u64;
    if end > GUEST_REACH {
        return Err(GuestError::OutOfReach { gpa: end - 1 });
    }
    Ok(end)
}

/// Makes `vcpu` write `writes` and halt: loads [`write_program`] at `code_gpa` through `load`
/// (a host write, so not in KVM's dirty log), [enters](enter_real_mode) it and runs it to
/// `hlt`. Every other exit (an MMIO exit for a GPA no slot covers, ...) is an error. Returns
/// how long `KVM_RUN` took.
///
/// The only guest writes are `writes`: KVM's log shows exactly their pages (instruction
/// fetches of the code do not dirty). A write into the code itself is refused.
pub fn run_writes(
    vcpu: &mut VcpuFd,
    code_gpa: u64,
    writes: &[(u64, u8)],
    load: &mut CodeLoader<'_>,
) -> Result<Duration, GuestError> {
    let code = write_program(writes)?;
    let end = code_end(code_gpa, &code)?;
    if let Some(&(gpa, _)) = writes.iter().find(|&&(gpa, _)| (code_gpa..end).contains(&gpa)) {
        return Err(GuestError::WriteHitsCode { gpa, code_gpa, code_end: end });
    }
    load(code_gpa, &code)?;
    enter_real_mode(vcpu, code_gpa)?;
    let start = Instant::now();
    run_to_hlt(vcpu)?;
    Ok(start.elapsed())
}

/// A guest that keeps writing pseudo-random pages of `[range_start, range_start + pages ×
/// 4 KiB)` and does `out dx, eax` to `port` (with the write count in `eax`) after every
/// `writes_per_exit` writes. It never halts.
///
/// Write number `n` (1, 2, ...) advances a 32-bit LCG `s = s × 1103515245 + 12345` (starting
/// from `seed`) and picks page `((s >> 16) × pages) >> 16`; it stores `n` at [`SEQ_OFFSET`]
/// and increments the `u32` at [`COUNT_OFFSET`] of that page. So after `n` writes each page's
/// count says how often it was picked and its stamp when it was last picked, and
/// [`pages`](Self::pages) replays the choice on the host.
///
/// The state lives in registers only (`esi` LCG, `eax` write count, `ecx` writes left before
/// the next exit, `edi` pages, `dx` port, `ebx` scratch): `KVM_GET_REGS`/`KVM_SET_REGS` with
/// `KVM_GET_SREGS`/`KVM_SET_SREGS` carry it to another vCPU or VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopingWriter {
    /// The first GPA of the range (page aligned).
    pub range_start: u64,
    /// Pages in the range, 1 to 65536 (256 MiB); the range ends at or below 4 GiB.
    pub pages: u32,
    /// Writes between two I/O exits (at least 1).
    pub writes_per_exit: u32,
    /// The I/O port of the exits.
    pub port: u16,
    /// The LCG's start value.
    pub seed: u32,
}

/// The LCG of [`LoopingWriter`] (the classic C `rand` constants).
const LCG_MUL: u32 = 1_103_515_245;
const LCG_ADD: u32 = 12_345;

impl LoopingWriter {
    /// A writer over `pages` pages from `range_start`, 64 writes per exit on port 0x10.
    pub fn new(range_start: u64, pages: u32) -> Self {
        LoopingWriter { range_start, pages, writes_per_exit: 64, port: 0x10, seed: 0x1234_5678 }
    }

    /// One past the range's last GPA.
    pub fn range_end(&self) -> u64 {
        self.range_start + u64::from(self.pages) * PAGE_SIZE
    }

    /// Checks the parameters.
    fn check(&self) -> Result<(), GuestError> {
        if !self.range_start.is_multiple_of(PAGE_SIZE) {
            return Err(GuestError::InvalidWriter("range_start is not page aligned"));
        }
        if self.pages == 0 || self.pages > 0x1_0000 {
            return Err(GuestError::InvalidWriter("pages must be 1 to 65536"));
        }
        if self.range_end() > GUEST_REACH {
            return Err(GuestError::OutOfReach { gpa: self.range_end() - 1 });
        }
        if self.writes_per_exit == 0 {
            return Err(GuestError::InvalidWriter("writes_per_exit must be at least 1"));
        }
        Ok(())
    }

    /// The GPAs of the pages written, in order: item `i` is write number `i + 1`. Endless.
    pub fn pages(&self) -> impl Iterator<Item = u64> {
        let (start, pages) = (self.range_start, u64::from(self.pages));
        let mut state = self.seed;
        std::iter::repeat_with(move || {
            state = state.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            start + ((u64::from(state >> 16) * pages) >> 16) * PAGE_SIZE
        })
    }

    /// What the window holds after the first `writes` writes of a run from the start, for the
    /// pages written at all: `(gpa, sequence number of the page's last write, writes to it)`,
    /// in address order. Everything else in the window is untouched. This is the oracle a
    /// migrated guest's memory must match exactly, however its run was cut and resumed.
    pub fn expected(&self, writes: u64) -> Vec<(u64, u32, u32)> {
        let mut pages: std::collections::BTreeMap<u64, (u32, u32)> = std::collections::BTreeMap::new();
        for (i, gpa) in self.pages().take(writes as usize).enumerate() {
            let e = pages.entry(gpa).or_insert((0, 0));
            *e = ((i + 1) as u32, e.1.wrapping_add(1));
        }
        pages.into_iter().map(|(gpa, (seq, count))| (gpa, seq, count)).collect()
    }

    /// The program, for the vCPU state of [`enter_real_mode`].
    pub fn program(&self) -> Result<Vec<u8>, GuestError> {
        self.check()?;
        // `check` bounds both below 4 GiB.
        let start = self.range_start as u32;
        let mut c = Vec::with_capacity(128);
        let imm32 = |c: &mut Vec<u8>, v: u32| c.extend_from_slice(&v.to_le_bytes());
        c.extend_from_slice(&[0x66, 0xbe]); // mov esi, seed
        imm32(&mut c, self.seed);
        c.extend_from_slice(&[0x66, 0x31, 0xc0]); // xor eax, eax
        c.extend_from_slice(&[0x66, 0xb9]); // mov ecx, writes_per_exit
        imm32(&mut c, self.writes_per_exit);
        c.extend_from_slice(&[0x66, 0xbf]); // mov edi, pages
        imm32(&mut c, self.pages);
        c.push(0xba); // mov dx, port
        c.extend_from_slice(&self.port.to_le_bytes());
        let top = c.len();
        c.extend_from_slice(&[0x66, 0x69, 0xf6]); // imul esi, esi, LCG_MUL
        imm32(&mut c, LCG_MUL);
        c.extend_from_slice(&[0x66, 0x81, 0xc6]); // add esi, LCG_ADD
        imm32(&mut c, LCG_ADD);
        c.extend_from_slice(&[0x66, 0x89, 0xf3]); // mov ebx, esi
        c.extend_from_slice(&[0x66, 0xc1, 0xeb, 0x10]); // shr ebx, 16
        c.extend_from_slice(&[0x66, 0x0f, 0xaf, 0xdf]); // imul ebx, edi
                                                        // `>> 16` to the page index, then `<< 12` to its offset: `>> 4` and clear 12 bits.
        c.extend_from_slice(&[0x66, 0xc1, 0xeb, 0x04]); // shr ebx, 4
        c.extend_from_slice(&[0x66, 0x81, 0xe3]); // and ebx, 0xfffff000
        imm32(&mut c, 0xffff_f000);
        c.extend_from_slice(&[0x66, 0x81, 0xc3]); // add ebx, range_start
        imm32(&mut c, start);
        c.extend_from_slice(&[0x66, 0x40]); // inc eax
        c.extend_from_slice(&[0x64, 0x67, 0x66, 0x89, 0x03]); // mov fs:[ebx], eax
        c.extend_from_slice(&[0x64, 0x67, 0x66, 0xff, 0x43, COUNT_OFFSET as u8]); // inc dword fs:[ebx+4]
        c.extend_from_slice(&[0x66, 0x49]); // dec ecx
        let jnz_end = c.len() + 2;
        c.extend_from_slice(&[0x75, rel8(top, jnz_end)?]); // jnz top
        c.extend_from_slice(&[0x66, 0xef]); // out dx, eax
        c.extend_from_slice(&[0x66, 0xb9]); // mov ecx, writes_per_exit
        imm32(&mut c, self.writes_per_exit);
        let jmp_end = c.len() + 2;
        c.extend_from_slice(&[0xeb, rel8(top, jmp_end)?]); // jmp top
        Ok(c)
    }
}

/// The 8-bit displacement of a jump to `target` from the instruction ending at `next`.
fn rel8(target: usize, next: usize) -> Result<u8, GuestError> {
    let delta = target as i64 - next as i64;
    i8::try_from(delta).map(|d| d as u8).map_err(|_| GuestError::InvalidWriter("loop body too long"))
}

/// The real-mode code of `writer` (as [`LoopingWriter::program`]), for the vCPU state of
/// [`enter_real_mode`]; [`start_looping_writer`] loads and enters it.
pub fn looping_writer_program(writer: &LoopingWriter) -> Result<Vec<u8>, GuestError> {
    writer.program()
}

/// Loads `writer`'s program at `code_gpa` through `load` (a host write) and points `vcpu` at
/// it; [`run_until_exits`] then runs it. The code must not overlap the range it writes.
pub fn start_looping_writer(
    vcpu: &mut VcpuFd,
    code_gpa: u64,
    writer: &LoopingWriter,
    load: &mut CodeLoader<'_>,
) -> Result<(), GuestError> {
    let code = writer.program()?;
    let end = code_end(code_gpa, &code)?;
    if code_gpa < writer.range_end() && writer.range_start < end {
        return Err(GuestError::WriteHitsCode {
            gpa: writer.range_start.max(code_gpa),
            code_gpa,
            code_end: end,
        });
    }
    load(code_gpa, &code)?;
    enter_real_mode(vcpu, code_gpa)
}

/// Runs `vcpu` (a [`LoopingWriter`], started or paused) until it has made `exits` I/O exits
/// to `port`, and returns the value of each (the write count at that exit). The vCPU stays
/// paused after the last `out`; calling again resumes it. Any other exit is an error.
pub fn run_until_exits(vcpu: &mut VcpuFd, port: u16, exits: usize) -> Result<Vec<u32>, GuestError> {
    let mut counts = Vec::with_capacity(exits);
    while counts.len() < exits {
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(p, data)) if p == port && data.len() == 4 => {
                counts.push(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                continue;
            }
            Ok(exit) => format!("{exit:?}"),
            Err(source) => return Err(GuestError::Kvm { op: "KVM_RUN", source }),
        };
        return Err(unexpected(vcpu, exit));
    }
    Ok(counts)
}
