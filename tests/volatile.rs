//! `VolatileSlice` over a real anonymous mapping, checked against a `Vec<u8>` model with
//! proptest; aligned 2/4/8-byte accesses checked not to tear under a concurrent writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use guestmem::mmap::{MmapRegion, MmapRegionBuilder};
use guestmem::{Bytes, VolatileSlice};
use proptest::prelude::*;

/// A private anonymous mapping of `len` bytes, unmapped on drop.
fn mapping(len: usize) -> MmapRegion {
    MmapRegionBuilder::new(len).build().unwrap()
}

const LEN: usize = 4096 + 512;

#[derive(Debug, Clone)]
enum Op {
    Write { off: usize, data: Vec<u8> },
    WriteSlice { off: usize, data: Vec<u8> },
    Read { off: usize, len: usize },
    ReadSlice { off: usize, len: usize },
    WriteObj { off: usize, val: u64, width: u8 },
    ReadObj { off: usize, width: u8 },
    CopyWithin { src: usize, dst: usize, len: usize },
    Fill { off: usize, len: usize, val: u8 },
    Sub { off: usize, len: usize, inner: Box<Op> },
    CopyFromU16 { off: usize, vals: Vec<u16> },
    CopyToU32 { off: usize, count: usize },
}

fn offset() -> impl Strategy<Value = usize> {
    prop_oneof![0..LEN + 16, (LEN - 16)..(LEN + 16), Just(usize::MAX - 3)]
}

fn leaf() -> impl Strategy<Value = Op> {
    prop_oneof![
        (offset(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(off, data)| Op::Write { off, data }),
        (offset(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(off, data)| Op::WriteSlice { off, data }),
        (offset(), 0usize..300).prop_map(|(off, len)| Op::Read { off, len }),
        (offset(), 0usize..300).prop_map(|(off, len)| Op::ReadSlice { off, len }),
        (offset(), any::<u64>(), prop::sample::select(vec![1u8, 2, 4, 8, 16]))
            .prop_map(|(off, val, width)| Op::WriteObj { off, val, width }),
        (offset(), prop::sample::select(vec![1u8, 2, 4, 8, 16]))
            .prop_map(|(off, width)| Op::ReadObj { off, width }),
        (offset(), offset(), 0usize..600).prop_map(|(src, dst, len)| Op::CopyWithin { src, dst, len }),
        (offset(), 0usize..600, any::<u8>()).prop_map(|(off, len, val)| Op::Fill { off, len, val }),
        (offset(), prop::collection::vec(any::<u16>(), 0..100))
            .prop_map(|(off, vals)| Op::CopyFromU16 { off, vals }),
        (offset(), 0usize..100).prop_map(|(off, count)| Op::CopyToU32 { off, count }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    leaf().prop_recursive(2, 8, 1, |inner| {
        (offset(), 0usize..LEN + 8, inner).prop_map(|(off, len, inner)| Op::Sub {
            off,
            len,
            inner: Box::new(inner),
        })
    })
}

fn fits(off: usize, len: usize, size: usize) -> bool {
    off.checked_add(len).is_some_and(|end| end <= size)
}

/// Runs `op` on `s` and on `model` (the bytes `s` covers); panics on any disagreement.
fn apply(s: &VolatileSlice<'_>, model: &mut [u8], op: &Op) {
    let size = model.len();
    assert_eq!(s.len(), size);
    match op {
        Op::Write { off, data } => match s.write(data, *off) {
            Ok(n) => {
                assert!(*off <= size);
                assert_eq!(n, data.len().min(size - off));
                model[*off..off + n].copy_from_slice(&data[..n]);
            }
            // Nothing fits: past the end, or at the end with bytes to write.
            Err(_) => assert!(*off > size || (*off == size && !data.is_empty())),
        },
        Op::WriteSlice { off, data } => {
            let r = s.write_slice(data, *off);
            assert_eq!(r.is_ok(), fits(*off, data.len(), size));
            if r.is_ok() {
                model[*off..off + data.len()].copy_from_slice(data);
            }
        }
        Op::Read { off, len } => {
            let mut buf = vec![0u8; *len];
            match s.read(&mut buf, *off) {
                Ok(n) => {
                    assert_eq!(n, len.min(&(size - off)).to_owned());
                    assert_eq!(&buf[..n], &model[*off..off + n]);
                }
                Err(_) => assert!(*off > size || (*off == size && *len > 0)),
            }
        }
        Op::ReadSlice { off, len } => {
            let mut buf = vec![0u8; *len];
            let r = s.read_slice(&mut buf, *off);
            assert_eq!(r.is_ok(), fits(*off, *len, size));
            if r.is_ok() {
                assert_eq!(&buf[..], &model[*off..off + len]);
            }
        }
        Op::WriteObj { off, val, width } => {
            let w = *width as usize;
            let bytes = [val.to_le_bytes(), val.rotate_left(7).to_le_bytes()].concat();
            let r = match w {
                1 => s.write_obj(*val as u8, *off),
                2 => s.write_obj(*val as u16, *off),
                4 => s.write_obj(*val as u32, *off),
                8 => s.write_obj(*val, *off),
                _ => s.write_obj(u128::from_le_bytes(bytes[..16].try_into().unwrap()), *off),
            };
            assert_eq!(r.is_ok(), fits(*off, w, size));
            if r.is_ok() {
                model[*off..off + w].copy_from_slice(&bytes[..w]);
            }
        }
        Op::ReadObj { off, width } => {
            let w = *width as usize;
            let got: Option<Vec<u8>> = match w {
                1 => s.read_obj::<u8>(*off).ok().map(|v| v.to_le_bytes().to_vec()),
                2 => s.read_obj::<u16>(*off).ok().map(|v| v.to_le_bytes().to_vec()),
                4 => s.read_obj::<u32>(*off).ok().map(|v| v.to_le_bytes().to_vec()),
                8 => s.read_obj::<u64>(*off).ok().map(|v| v.to_le_bytes().to_vec()),
                _ => s.read_obj::<u128>(*off).ok().map(|v| v.to_le_bytes().to_vec()),
            };
            assert_eq!(got.is_some(), fits(*off, w, size));
            if let Some(got) = got {
                assert_eq!(&got[..], &model[*off..off + w]);
            }
        }
        Op::CopyWithin { src, dst, len } => {
            let (Ok(a), Ok(b)) = (s.offset(*src), s.offset(*dst)) else {
                assert!(*src > size || *dst > size);
                return;
            };
            let a = a.subslice(0, (*len).min(a.len())).unwrap();
            let n = a.copy_to_volatile_slice(&b).unwrap();
            assert_eq!(n, a.len().min(b.len()));
            model.copy_within(*src..src + n, *dst);
        }
        Op::Fill { off, len, val } => match s.subslice(*off, *len) {
            Ok(sub) => {
                sub.fill(*val).unwrap();
                model[*off..off + len].fill(*val);
            }
            Err(_) => assert!(!fits(*off, *len, size)),
        },
        Op::CopyFromU16 { off, vals } => match s.offset(*off) {
            Ok(sub) => {
                let n = sub.copy_from(vals).unwrap();
                assert_eq!(n, vals.len().min(sub.len() / 2));
                for (i, v) in vals[..n].iter().enumerate() {
                    model[off + 2 * i..off + 2 * i + 2].copy_from_slice(&v.to_ne_bytes());
                }
            }
            Err(_) => assert!(*off > size),
        },
        Op::CopyToU32 { off, count } => match s.offset(*off) {
            Ok(sub) => {
                let mut out = vec![0u32; *count];
                let n = sub.copy_to(&mut out);
                assert_eq!(n, count.min(&(sub.len() / 4)).to_owned());
                for (i, v) in out[..n].iter().enumerate() {
                    assert_eq!(&v.to_ne_bytes()[..], &model[off + 4 * i..off + 4 * i + 4]);
                }
            }
            Err(_) => assert!(*off > size),
        },
        Op::Sub { off, len, inner } => match s.subslice(*off, *len) {
            Ok(sub) => apply(&sub, &mut model[*off..off + len], inner),
            Err(_) => assert!(!fits(*off, *len, size)),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn volatile_slice_matches_a_vec_model(ops in prop::collection::vec(op(), 1..40)) {
        // A length that is not a page multiple: the slice covers part of a 2-page mapping.
        let m = mapping(2 * 4096);
        let s = m.as_volatile_slice().subslice(0, LEN).unwrap();
        let mut model = vec![0u8; LEN];
        for op in &ops {
            apply(&s, &mut model, op);
        }
        let mut all = vec![0u8; LEN];
        s.read_slice(&mut all, 0).unwrap();
        prop_assert_eq!(all, model);
    }
}

/// Patterns whose every byte differs between them, so any torn read shows as a value that is
/// neither.
const PATTERNS: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

#[test]
fn aligned_accesses_do_not_tear_under_a_concurrent_writer() {
    let m = Arc::new(mapping(4096));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let s = m.as_volatile_slice();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let p = PATTERNS[i & 1];
                s.write_obj(p, 64).unwrap();
                s.write_obj(p as u32, 128).unwrap();
                s.write_obj(p as u16, 192).unwrap();
                s.store(p, 256, Ordering::Relaxed).unwrap();
                s.get_ref::<u64>(320).unwrap().store(p).unwrap();
                i += 1;
            }
            i
        })
    };
    let s = m.as_volatile_slice();
    let r = s.get_ref::<u64>(320).unwrap();
    let (mut seen_a, mut seen_b) = (0u64, 0u64);
    for _ in 0..2_000_000 {
        let v = s.read_obj::<u64>(64).unwrap();
        assert!(v == 0 || PATTERNS.contains(&v), "torn u64: {v:#x}");
        let w = s.read_obj::<u32>(128).unwrap();
        assert!(w == 0 || PATTERNS.iter().any(|p| *p as u32 == w), "torn u32: {w:#x}");
        let h = s.read_obj::<u16>(192).unwrap();
        assert!(h == 0 || PATTERNS.iter().any(|p| *p as u16 == h), "torn u16: {h:#x}");
        let l = s.load::<u64>(256, Ordering::Relaxed).unwrap();
        assert!(l == 0 || PATTERNS.contains(&l), "torn atomic load: {l:#x}");
        let x = r.load();
        assert!(x == 0 || PATTERNS.contains(&x), "torn VolatileRef load: {x:#x}");
        seen_a += (v == PATTERNS[0]) as u64;
        seen_b += (v == PATTERNS[1]) as u64;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    // Both values were observed: the reader really raced the writer.
    assert!(seen_a > 0 && seen_b > 0, "reader never saw both patterns ({seen_a}, {seen_b})");
}
