//! Region collection arithmetic at the edges of the address space: placements that overlap,
//! touch, end exactly at 2^64 or wrap past it, and lookups, range checks, inserts and removes
//! against a model of `(start, length)` pairs computed in 128-bit arithmetic.

use std::sync::Arc;

use super::input::{Arena, Input, PAGE};
use guestmem::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// A start near 0, near 2^63 or near 2^64 (below it, so regions can end exactly there), on
/// page or byte boundaries (the byte ones are refused: regions start on pages).
fn start(input: &mut Input) -> u64 {
    let near = input.u8() % 3;
    let delta = u64::from(input.u16()) * if input.bool() { PAGE } else { 1 };
    match near {
        0 => delta,
        1 => (1u64 << 63).wrapping_sub(delta),
        _ => 0u64.wrapping_sub(delta), // 2^64 - delta
    }
}

fn lookup(model: &[(u64, u64)], addr: u64) -> Option<(u64, u64)> {
    model.iter().copied().find(|&(s, l)| addr >= s && (addr - s) < l).map(|(s, _)| (s, addr - s))
}

fn covered(model: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let end = addr as u128 + len as u128;
    let mut at = addr as u128;
    if len == 0 {
        return true; // an empty range is backed wherever it starts
    }
    while at < end {
        let Ok(a) = u64::try_from(at) else { return false };
        match model.iter().find(|&&(s, l)| a >= s && (a - s) < l) {
            Some(&(s, l)) => at = s as u128 + l as u128,
            None => return false,
        }
    }
    true
}

/// Runs the model on one input; panics on any disagreement.
pub fn check(data: &[u8]) {
    let mut input = Input(data);
    let mut arena = Arena::new();
    let mut model: Vec<(u64, u64)> = Vec::new();
    let mut mem = GuestMemoryMmap::<guestmem::AtomicBitmap>::new();
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let pages = u64::from(input.u8() % 2) + 1;
                let s = start(&mut input);
                let Some(mapping) = arena.region(pages, true) else { continue };
                let len = pages * PAGE;
                let wraps = s.checked_add(len - 1).is_none();
                let aligned = s.is_multiple_of(PAGE);
                let region = match GuestRegionMmap::new(mapping, GuestAddress(s)) {
                    Ok(r) => {
                        assert!(!wraps, "a region at {s:#x} of {len:#x} wraps");
                        assert!(aligned, "a region at {s:#x} is not page aligned");
                        assert_eq!(r.last_addr().0, s + (len - 1));
                        r
                    }
                    Err(_) => {
                        assert!(wraps || !aligned, "a region at {s:#x} of {len:#x} was refused");
                        continue;
                    }
                };
                let overlap = model.iter().any(|&(ms, ml)| {
                    (ms as u128) < s as u128 + len as u128 && (s as u128) < ms as u128 + ml as u128
                });
                match mem.insert_region(Arc::new(region)) {
                    Ok(m) => {
                        assert!(!overlap);
                        mem = m;
                        model.push((s, len));
                        model.sort();
                    }
                    Err(_) => assert!(overlap),
                }
            }
            1 => {
                let a = start(&mut input);
                let got = mem.to_region_addr(GuestAddress(a)).map(|(r, o)| (r.start_addr().0, o.0));
                assert_eq!(got, lookup(&model, a));
                assert_eq!(mem.get_host_address(GuestAddress(a)).is_ok(), got.is_some());
            }
            2 => {
                let a = start(&mut input);
                let len = u64::from(input.u16()) * if input.bool() { PAGE } else { 1 };
                assert_eq!(
                    mem.check_range(GuestAddress(a), len as usize),
                    covered(&model, a, len),
                    "{a:#x}+{len:#x}"
                );
                let slices: Result<Vec<_>, _> = mem.get_slices(GuestAddress(a), len as usize).collect();
                assert_eq!(slices.is_ok() && len > 0, len > 0 && covered(&model, a, len));
                if let Ok(s) = slices {
                    assert_eq!(s.iter().map(|s| s.len() as u64).sum::<u64>(), len);
                }
                // Address arithmetic never panics.
                let _ = GuestAddress(a).checked_add(len);
                let _ = GuestAddress(a).align_up(len);
            }
            _ => {
                let pick = input.u8() as usize;
                let a = if model.is_empty() || pick.is_multiple_of(4) {
                    start(&mut input)
                } else {
                    model[pick % model.len()].0
                };
                let exists = model.iter().position(|&(s, _)| s == a);
                // The region's size, or (sometimes) another one: only the exact size removes.
                let size = match exists {
                    Some(i) if input.u8() % 4 != 0 => model[i].1,
                    _ => (u64::from(input.u8() % 3) + 1) * PAGE,
                };
                match mem.remove_region(GuestAddress(a), size) {
                    Ok((m, r)) => {
                        let i = exists.expect("removed a region the model lacks");
                        assert_eq!((r.start_addr().0, r.len()), (a, size));
                        mem = m;
                        model.remove(i);
                    }
                    Err(guestmem::GuestMemoryError::NoRegionAt(_)) => assert!(exists.is_none()),
                    Err(guestmem::GuestMemoryError::RegionSizeMismatch { region_len, .. }) => {
                        let i = exists.expect("a size mismatch for a region the model lacks");
                        assert_eq!(region_len, model[i].1);
                        assert_ne!(size, region_len);
                    }
                    Err(e) => panic!("remove_region: {e}"),
                }
            }
        }
        assert_eq!(mem.num_regions(), model.len());
        let last = model.iter().map(|&(s, l)| s + (l - 1)).max().unwrap_or(0);
        assert_eq!(mem.last_addr().0, last);
    }
}
