//! NUMA placement: `mbind(2)` and `get_mempolicy(2)` (libc has no wrappers; these issue the
//! system calls directly).

use std::io;

use super::cvt_long;
use super::mman::flag_type;

/// A NUMA memory policy mode (`MPOL_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemPolicy {
    /// `MPOL_DEFAULT`: the thread's policy.
    Default,
    /// `MPOL_PREFERRED`: prefer the (first) node given, fall back to others.
    Preferred,
    /// `MPOL_BIND`: only the nodes given; allocation fails rather than spill.
    Bind,
    /// `MPOL_INTERLEAVE`: spread pages round-robin over the nodes.
    Interleave,
}

impl MemPolicy {
    /// The `MPOL_*` constant.
    pub const fn raw(self) -> libc::c_int {
        match self {
            MemPolicy::Default => 0,
            MemPolicy::Preferred => 1,
            MemPolicy::Bind => 2,
            MemPolicy::Interleave => 3,
        }
    }

    fn from_raw(raw: libc::c_int) -> Option<Self> {
        // MPOL_F_STATIC_NODES / MPOL_F_RELATIVE_NODES live in the high bits.
        match raw & 0xff {
            0 => Some(MemPolicy::Default),
            1 => Some(MemPolicy::Preferred),
            2 => Some(MemPolicy::Bind),
            3 => Some(MemPolicy::Interleave),
            _ => None,
        }
    }
}

flag_type! {
    /// Flags of `mbind(2)`.
    MbindFlags: u32 {
        /// `MPOL_MF_STRICT`: fail if pages already there do not follow the policy.
        STRICT = 1;
        /// `MPOL_MF_MOVE`: move pages already there to follow the policy.
        MOVE = 2;
    }
}

/// The largest node number a node mask here can name.
pub const MAX_NODES: usize = 1024;

/// `mbind(2)`: sets the NUMA policy of `[addr, addr + len)` (`addr` page aligned) to `mode`
/// over the nodes in `nodes` (each below [`MAX_NODES`]).
///
/// Placement only: the contents of the range do not change, and the kernel validates the range.
// `addr` is only handed to the kernel, which checks it; nothing here dereferences it.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn mbind(addr: *mut u8, len: usize, mode: MemPolicy, nodes: &[u32], flags: MbindFlags) -> io::Result<()> {
    let mut mask = [0u64; MAX_NODES / 64];
    for &n in nodes {
        let n = n as usize;
        if n >= MAX_NODES {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        mask[n / 64] |= 1 << (n % 64);
    }
    let (mask_ptr, maxnode) = if nodes.is_empty() {
        (std::ptr::null::<u64>(), 0)
    } else {
        // maxnode counts bits, and the kernel reads maxnode - 1 of them.
        (mask.as_ptr(), MAX_NODES as libc::c_ulong + 1)
    };
    // SAFETY: the node mask is a live array of MAX_NODES bits; mbind changes placement only
    // and checks the range itself.
    cvt_long(unsafe {
        libc::syscall(libc::SYS_mbind, addr, len, mode.raw() as libc::c_long, mask_ptr, maxnode, flags.bits())
    })
    .map(drop)
}

/// `get_mempolicy(2)` with `MPOL_F_ADDR`: the policy and node set that govern `addr`.
// `addr` is only handed to the kernel, which checks it; nothing here dereferences it.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn get_mempolicy(addr: *const u8) -> io::Result<(MemPolicy, Vec<u32>)> {
    const MPOL_F_ADDR: libc::c_ulong = 2;
    let mut mode: libc::c_int = 0;
    let mut mask = [0u64; MAX_NODES / 64];
    // SAFETY: `mode` and `mask` are live and sized as announced (MAX_NODES bits).
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            MAX_NODES as libc::c_ulong,
            addr,
            MPOL_F_ADDR,
        )
    })?;
    let policy = MemPolicy::from_raw(mode).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let nodes = (0..MAX_NODES as u32).filter(|&n| mask[n as usize / 64] & (1 << (n % 64)) != 0).collect();
    Ok((policy, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{mmap, munmap, MapFlags, Protection};

    #[test]
    fn bind_to_node_zero_and_read_back() {
        let len = 2 * crate::sys::page_size();
        // SAFETY: a new anonymous mapping.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                Protection::READ_WRITE,
                MapFlags::PRIVATE | MapFlags::ANONYMOUS,
                None,
                0,
            )
        }
        .unwrap();
        mbind(p, len, MemPolicy::Bind, &[0], MbindFlags::empty()).unwrap();
        let (policy, nodes) = get_mempolicy(p).unwrap();
        assert_eq!((policy, nodes), (MemPolicy::Bind, vec![0]));
        mbind(p, len, MemPolicy::Interleave, &[0], MbindFlags::MOVE).unwrap();
        assert_eq!(get_mempolicy(p).unwrap().0, MemPolicy::Interleave);
        mbind(p, len, MemPolicy::Default, &[], MbindFlags::empty()).unwrap();
        assert_eq!(get_mempolicy(p).unwrap().0, MemPolicy::Default);
        assert_eq!(
            mbind(p, len, MemPolicy::Bind, &[MAX_NODES as u32], MbindFlags::empty())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        // A node that does not exist is refused by the kernel.
        assert!(mbind(p, len, MemPolicy::Bind, &[1000], MbindFlags::empty()).is_err());
        // SAFETY: our mapping, no longer used.
        unsafe { munmap(p, len).unwrap() };
    }
}
