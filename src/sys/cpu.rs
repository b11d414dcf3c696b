//! CPU cache control for persistent memory: which instruction writes a cache line back to
//! memory (`CLWB`, `CLFLUSHOPT`, `CLFLUSH`, as `CPUID` reports them) and the write-back of a
//! range, fenced with `SFENCE`. On x86-64 only; elsewhere there is none and callers fall back
//! to `msync(2)`.

/// An instruction that writes a cache line back to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheWriteback {
    /// `CLWB`: writes the line back and may keep it cached (the fastest).
    Clwb,
    /// `CLFLUSHOPT`: writes back and evicts, weakly ordered.
    Clflushopt,
    /// `CLFLUSH`: writes back and evicts, ordered (every x86-64 CPU has it).
    Clflush,
}

/// The best write-back instruction this CPU has, and its cache line size in bytes (`CPUID`);
/// `None` off x86-64.
///
/// ```
/// if let Some((_, line)) = guestmem::sys::cpu::cache_writeback() {
///     assert!(line.is_power_of_two());
/// }
/// ```
pub fn cache_writeback() -> Option<(CacheWriteback, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and only reads identification registers.
        let (leaf1, leaf7) = unsafe { (__cpuid(1), __cpuid_count(7, 0)) };
        // CPUID.1:EBX[15:8] is the CLFLUSH line size in 8-byte units.
        let line = (((leaf1.ebx >> 8) & 0xff) as usize * 8).max(64);
        let how = if leaf7.ebx & (1 << 24) != 0 {
            CacheWriteback::Clwb
        } else if leaf7.ebx & (1 << 23) != 0 {
            CacheWriteback::Clflushopt
        } else {
            CacheWriteback::Clflush
        };
        Some((how, line))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Writes every cache line of `[addr, addr + len)` back to memory with `how`, then `SFENCE`:
/// when this returns, the lines have left the CPU caches (on persistent memory mapped with
/// `MAP_SYNC`, they are durable).
///
/// # Safety
/// `how` must be an instruction this CPU has ([`cache_writeback`]), `line` its line size, and
/// the range mapped (readable) memory: the instructions fault on an unmapped address.
#[cfg(target_arch = "x86_64")]
pub unsafe fn write_back(addr: *const u8, len: usize, how: CacheWriteback, line: usize) {
    let start = addr as usize & !(line - 1);
    let end = addr as usize + len;
    let mut p = start;
    while p < end {
        // SAFETY: the caller guarantees the CPU has the instruction and `p` lies in (or on the
        // line of) mapped memory; the instructions change no memory contents.
        unsafe {
            match how {
                CacheWriteback::Clwb => {
                    std::arch::asm!("clwb [{}]", in(reg) p, options(nostack, preserves_flags))
                }
                CacheWriteback::Clflushopt => {
                    std::arch::asm!("clflushopt [{}]", in(reg) p, options(nostack, preserves_flags))
                }
                CacheWriteback::Clflush => {
                    std::arch::asm!("clflush [{}]", in(reg) p, options(nostack, preserves_flags))
                }
            }
        }
        p += line;
    }
    // SAFETY: SFENCE orders the write-backs before later stores; it has no operands.
    unsafe { std::arch::asm!("sfence", options(nostack, preserves_flags)) };
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn write_back_runs_on_ordinary_memory() {
        let (how, line) = cache_writeback().unwrap();
        let buf = vec![7u8; 4 * line + 3];
        for h in [how, CacheWriteback::Clflush] {
            // SAFETY: the CPU has `how` (CPUID) and CLFLUSH (every x86-64); `buf` is mapped.
            unsafe { write_back(buf.as_ptr().wrapping_add(1), buf.len() - 1, h, line) };
        }
        assert!(buf.iter().all(|&b| b == 7));
    }
}
