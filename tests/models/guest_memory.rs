//! Guest memory against a model: a region layout (some invalid) and a sequence of operations
//! (reads, writes, objects, atomics, region insert and remove). Every result must equal the
//! model's (a `Vec<u8>` per region), or be the error the model predicts; and the dirty pages
//! harvested at the end must be exactly the pages the model saw written.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::input::{Arena, Input, PAGE};
use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

struct ModelRegion {
    start: u64,
    data: Vec<u8>,
    writable: bool,
}

#[derive(Default)]
struct Model {
    regions: Vec<ModelRegion>,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.checked_sub(r.start)?;
            (off < r.data.len() as u64).then_some((i, off as usize))
        })
    }

    /// Bytes from `addr` that are contiguous guest memory (and writable, if asked), up to `len`.
    fn reach(&self, addr: u64, len: usize, writable: bool) -> usize {
        let mut done = 0;
        while done < len {
            let Some(a) = addr.checked_add(done as u64) else { break };
            let Some((i, off)) = self.locate(a) else { break };
            if writable && !self.regions[i].writable {
                break;
            }
            done += (self.regions[i].data.len() - off).min(len - done);
        }
        done
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        for (k, b) in bytes.iter().enumerate() {
            let a = addr + k as u64;
            let (i, off) = self.locate(a).unwrap();
            self.regions[i].data[off] = *b;
            self.dirty.insert(a / PAGE);
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|k| {
                let (i, off) = self.locate(addr + k as u64).unwrap();
                self.regions[i].data[off]
            })
            .collect()
    }

    fn overlaps(&self, start: u64, len: u64) -> bool {
        let end = start as u128 + len as u128;
        self.regions
            .iter()
            .any(|r| (r.start as u128) < end && (start as u128) < r.start as u128 + r.data.len() as u128)
    }

    fn insert(&mut self, start: u64, pages: u64, writable: bool) {
        self.regions.push(ModelRegion { start, data: vec![0; (pages * PAGE) as usize], writable });
        self.regions.sort_by_key(|r| r.start);
    }
}

/// A guest page-aligned start: low pages, or pages just below the top of the address space.
fn start_of(input: &mut Input, pages: u64) -> u64 {
    let n = u64::from(input.u8() % 32);
    if input.u8().is_multiple_of(4) {
        (u64::MAX - pages * PAGE + 1).wrapping_sub(n * PAGE)
    } else {
        n * PAGE
    }
}

/// An address near a region edge of the model, or anywhere.
fn addr_of(input: &mut Input, model: &Model) -> u64 {
    let pick = input.u8();
    let delta = i64::from(input.u8() as i8);
    if model.regions.is_empty() || pick.is_multiple_of(8) {
        return input.u64();
    }
    let r = &model.regions[pick as usize % model.regions.len()];
    let edge = if pick.is_multiple_of(2) { r.start } else { r.start.wrapping_add(r.data.len() as u64) };
    edge.wrapping_add(delta as u64)
}

fn width(input: &mut Input) -> usize {
    [1, 2, 4, 8, 3, 16][input.u8() as usize % 6]
}

fn obj_write(mem: &Mem, addr: GuestAddress, bytes: &[u8]) -> bool {
    match bytes.len() {
        1 => mem.write_obj(bytes[0], addr).is_ok(),
        2 => mem.write_obj(u16::from_le_bytes([bytes[0], bytes[1]]), addr).is_ok(),
        3 => mem.write_obj::<[u8; 3]>([bytes[0], bytes[1], bytes[2]], addr).is_ok(),
        4 => mem.write_obj(u32::from_le_bytes(bytes.try_into().unwrap()), addr).is_ok(),
        8 => mem.write_obj(u64::from_le_bytes(bytes.try_into().unwrap()), addr).is_ok(),
        _ => mem.write_obj(u128::from_le_bytes(bytes.try_into().unwrap()), addr).is_ok(),
    }
}

fn obj_read(mem: &Mem, addr: GuestAddress, w: usize) -> Option<Vec<u8>> {
    Some(match w {
        1 => vec![mem.read_obj::<u8>(addr).ok()?],
        2 => mem.read_obj::<u16>(addr).ok()?.to_le_bytes().to_vec(),
        3 => mem.read_obj::<[u8; 3]>(addr).ok()?.to_vec(),
        4 => mem.read_obj::<u32>(addr).ok()?.to_le_bytes().to_vec(),
        8 => mem.read_obj::<u64>(addr).ok()?.to_le_bytes().to_vec(),
        _ => mem.read_obj::<u128>(addr).ok()?.to_le_bytes().to_vec(),
    })
}

/// Runs the model on one input; panics on any disagreement.
pub fn check(data: &[u8]) {
    let mut input = Input(data);
    let mut arena = Arena::new();
    let mut model = Model::default();
    let mut regions = Vec::new();
    // The layout: up to 4 regions; overlapping or wrapping ones must be refused.
    for _ in 0..input.u8() % 5 {
        let pages = u64::from(input.u8() % 4) + 1;
        let writable = input.u8() % 4 != 0;
        let start = start_of(&mut input, pages);
        let Some(mapping) = arena.region(pages, writable) else { break };
        let wraps = start.checked_add(pages * PAGE - 1).is_none();
        match GuestRegionMmap::new(mapping, GuestAddress(start)) {
            Ok(r) => {
                assert!(!wraps);
                regions.push((r, pages, writable));
            }
            Err(_) => assert!(wraps),
        }
    }
    let mut overlap = false;
    for (r, pages, writable) in &regions {
        let start = guestmem::GuestMemoryRegion::start_addr(r).0;
        overlap |= model.overlaps(start, pages * PAGE);
        model.insert(start, *pages, *writable);
    }
    let mem = match Mem::from_regions(regions.into_iter().map(|(r, _, _)| r).collect()) {
        Ok(m) => {
            assert!(!overlap);
            m
        }
        Err(_) => {
            assert!(overlap);
            return;
        }
    };
    let mut mem = mem;

    while !input.is_empty() {
        match input.u8() % 10 {
            0 => {
                let a = addr_of(&mut input, &model);
                let d = input.bytes(3 * PAGE as usize);
                // An empty write touches nothing: fine anywhere.
                let ok = d.is_empty() || model.reach(a, d.len(), true) == d.len();
                assert_eq!(
                    mem.write_slice(&d, GuestAddress(a)).is_ok(),
                    ok,
                    "write_slice {a:#x} +{}",
                    d.len()
                );
                if ok {
                    model.write(a, &d);
                }
            }
            1 => {
                let a = addr_of(&mut input, &model);
                let n = input.u16() as usize % (3 * PAGE as usize);
                let mut buf = vec![0; n];
                let ok = model.reach(a, n, false) == n;
                assert_eq!(mem.read_slice(&mut buf, GuestAddress(a)).is_ok(), ok, "read_slice {a:#x} +{n}");
                if ok {
                    assert_eq!(buf, model.read(a, n));
                }
            }
            2 => {
                let a = addr_of(&mut input, &model);
                let d = input.bytes(PAGE as usize);
                let n = model.reach(a, d.len(), true);
                match mem.write(&d, GuestAddress(a)) {
                    Ok(w) => {
                        assert_eq!(w, n);
                        model.write(a, &d[..n]);
                    }
                    // An error exactly when nothing fits a non-empty buffer.
                    Err(_) => assert!(n == 0 && !d.is_empty(), "write {a:#x} +{}", d.len()),
                }
            }
            3 => {
                let a = addr_of(&mut input, &model);
                let n = input.u16() as usize % PAGE as usize;
                let mut buf = vec![0; n];
                match mem.read(&mut buf, GuestAddress(a)) {
                    Ok(r) => {
                        assert_eq!(r, model.reach(a, n, false));
                        assert_eq!(&buf[..r], &model.read(a, r)[..]);
                    }
                    Err(_) => assert!(n > 0 && model.locate(a).is_none()),
                }
            }
            4 => {
                let a = addr_of(&mut input, &model);
                let w = width(&mut input);
                let bytes: Vec<u8> = (0..w).map(|_| input.u8()).collect();
                let ok = model.reach(a, w, true) == w;
                assert_eq!(obj_write(&mem, GuestAddress(a), &bytes), ok, "write_obj {a:#x} width {w}");
                if ok {
                    model.write(a, &bytes);
                }
            }
            5 => {
                let a = addr_of(&mut input, &model);
                let w = width(&mut input);
                let got = obj_read(&mem, GuestAddress(a), w);
                assert_eq!(got.is_some(), model.reach(a, w, false) == w, "read_obj {a:#x} width {w}");
                if let Some(got) = got {
                    assert_eq!(got, model.read(a, w));
                }
            }
            6 | 7 => {
                let store = input.u8() % 10 < 7;
                let a = addr_of(&mut input, &model);
                let w = [1usize, 2, 4, 8][input.u8() as usize % 4];
                let value = input.u64();
                // One region, aligned (host and guest alignment agree: both start on a page).
                let single = model.locate(a).is_some_and(|(i, off)| off + w <= model.regions[i].data.len());
                let aligned = a.is_multiple_of(w as u64);
                if store {
                    let writable = model.locate(a).is_some_and(|(i, _)| model.regions[i].writable);
                    let ok = single && aligned && writable;
                    let r = match w {
                        1 => mem.store(value as u8, GuestAddress(a), Ordering::SeqCst),
                        2 => mem.store(value as u16, GuestAddress(a), Ordering::SeqCst),
                        4 => mem.store(value as u32, GuestAddress(a), Ordering::SeqCst),
                        _ => mem.store(value, GuestAddress(a), Ordering::SeqCst),
                    };
                    assert_eq!(r.is_ok(), ok, "store {a:#x} width {w}");
                    if ok {
                        model.write(a, &value.to_le_bytes()[..w]);
                    }
                } else {
                    let r = match w {
                        1 => mem.load::<u8>(GuestAddress(a), Ordering::SeqCst).map(u64::from),
                        2 => mem.load::<u16>(GuestAddress(a), Ordering::SeqCst).map(u64::from),
                        4 => mem.load::<u32>(GuestAddress(a), Ordering::SeqCst).map(u64::from),
                        _ => mem.load::<u64>(GuestAddress(a), Ordering::SeqCst),
                    };
                    assert_eq!(r.is_ok(), single && aligned, "load {a:#x} width {w}");
                    if let Ok(v) = r {
                        assert_eq!(&v.to_le_bytes()[..w], &model.read(a, w)[..]);
                    }
                }
            }
            8 => {
                let pages = u64::from(input.u8() % 3) + 1;
                let writable = input.bool();
                let start = start_of(&mut input, pages);
                let Some(mapping) = arena.region(pages, writable) else { continue };
                let Ok(region) = GuestRegionMmap::new(mapping, GuestAddress(start)) else { continue };
                let overlap = model.overlaps(start, pages * PAGE);
                match mem.insert_region(Arc::new(region)) {
                    Ok(m) => {
                        assert!(!overlap);
                        mem = m;
                        model.insert(start, pages, writable);
                    }
                    Err(_) => assert!(overlap),
                }
            }
            _ => {
                let a = addr_of(&mut input, &model);
                let exists = model.regions.iter().position(|r| r.start == a);
                let size = exists.map_or(PAGE, |i| model.regions[i].data.len() as u64);
                match mem.remove_region(GuestAddress(a), size) {
                    Ok((m, _)) => {
                        let i = exists.expect("removed a region the model does not have");
                        mem = m;
                        let gone = model.regions.remove(i);
                        let first = gone.start / PAGE;
                        model.dirty.retain(|p| *p < first || *p >= first + gone.data.len() as u64 / PAGE);
                    }
                    Err(_) => assert!(exists.is_none()),
                }
            }
        }
    }
    // Every byte equals the model, and the dirty pages are exactly the model's.
    for r in &model.regions {
        let mut all = vec![0; r.data.len()];
        mem.read_slice(&mut all, GuestAddress(r.start)).unwrap();
        assert_eq!(all, r.data);
    }
    let mut dirty = BTreeSet::new();
    mem.take_dirty_ranges(|a, l| dirty.extend(a.0 / PAGE..(a.0 + (l - 1)) / PAGE + 1)).unwrap();
    assert_eq!(dirty, model.dirty);
    assert_eq!(mem.num_regions(), model.regions.len());
}
