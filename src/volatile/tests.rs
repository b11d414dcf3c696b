//! Unit tests of `VolatileSlice` and the typed refs: every error variant, bounds at the edges,
//! exact dirty marking for each write path, and read-only refusal.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::*;
use crate::bitmap::testing::ByteBitmap;
use crate::bytes::Bytes;

fn tracked(mem: &mut [u8], writable: bool) -> (VolatileSlice<'_, ByteBitmap>, ByteBitmap) {
    let bm = ByteBitmap::new(mem.len());
    // SAFETY: `mem` is borrowed mutably for as long as the slice lives.
    let s = unsafe { VolatileSlice::with_bitmap(mem.as_mut_ptr(), mem.len(), bm.clone(), writable) };
    (s, bm)
}

/// 8-byte aligned backing memory.
fn aligned(words: usize) -> Vec<u64> {
    vec![0u64; words]
}

#[test]
fn send_sync_and_copy() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<VolatileSlice<'static, ()>>();
    send_sync::<VolatileRef<'static, u32, ()>>();
    send_sync::<AtomicRef<'static, AtomicU32, ()>>();
    fn copy<T: Copy>() {}
    copy::<VolatileSlice<'static, ()>>();
}

#[test]
fn every_error_variant_and_its_message() {
    let mut mem = [0u8; 16];
    let (s, _) = tracked(&mut mem, true);
    let e = s.subslice(10, 7).unwrap_err();
    assert!(matches!(e, VolatileError::OutOfBounds { offset: 10, len: 7, size: 16 }));
    assert_eq!(e.to_string(), "access of 7 bytes at offset 0xa runs past the end of 16 bytes");
    let e = s.subslice(usize::MAX, 2).unwrap_err();
    assert!(matches!(e, VolatileError::Overflow { offset: usize::MAX, len: 2 }));
    assert!(e.to_string().contains("overflows"));
    let e = s.get_array_ref::<u64>(0, usize::MAX / 4).unwrap_err();
    assert!(matches!(e, VolatileError::TooBig { count, elem_size: 8 } if count == usize::MAX / 4));
    assert!(e.to_string().contains("elements of 8 bytes"));
    let mut words = aligned(2);
    let (a, _) = tracked(zerocopy::IntoBytes::as_mut_bytes(&mut words[..]), true);
    let e = a.get_atomic_ref::<AtomicU32>(2).unwrap_err();
    assert!(matches!(e, VolatileError::Misaligned { align: 4, .. }));
    assert!(e.to_string().contains("not aligned to 4 bytes"));
    let (ro, _) = tracked(&mut mem, false);
    let e = ro.write_obj(1u16, 4).unwrap_err();
    assert!(matches!(e, VolatileError::ReadOnly { offset: 4, len: 2 }));
    assert_eq!(e.to_string(), "write of 2 bytes at offset 0x4 to read-only memory");
    let mut src: &[u8] = &[1];
    let mut mem2 = [0u8; 4];
    let (s2, _) = tracked(&mut mem2, true);
    let e = src.read_exact_volatile(&s2).unwrap_err();
    assert!(matches!(e, VolatileError::PartialBuffer { expected: 4, completed: 1 }));
    assert_eq!(e.to_string(), "transfer stopped after 1 of 4 bytes");
    let e = VolatileError::from(std::io::Error::from_raw_os_error(libc::EBADF));
    assert!(matches!(e, VolatileError::Io(_)));
    assert!(e.to_string().starts_with("I/O error"));
}

#[test]
fn bounds_at_the_edges() {
    let mut mem = [0u8; 16];
    let (s, _) = tracked(&mut mem, true);
    assert_eq!(s.subslice(16, 0).unwrap().len(), 0);
    assert_eq!(s.subslice(0, 16).unwrap().len(), 16);
    assert!(s.subslice(17, 0).is_err());
    assert_eq!(s.offset(16).unwrap().len(), 0);
    assert!(matches!(s.offset(17), Err(VolatileError::OutOfBounds { offset: 17, len: 0, size: 16 })));
    let (a, b) = s.split_at(5).unwrap();
    assert_eq!((a.len(), b.len()), (5, 11));
    assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 5);
    assert!(s.split_at(17).is_err());
    assert!(s.write_obj(0u64, 8).is_ok());
    assert!(s.write_obj(0u64, 9).is_err());
    assert!(s.read_obj::<u64>(9).is_err());
    assert!(s.read_obj::<()>(16).is_ok());
    assert!(s.read_obj::<u8>(16).is_err());
    assert_eq!(s.compute_end_offset(4, 12).unwrap(), 16);
    assert!(s.compute_end_offset(4, 13).is_err());
    assert!(s.get_ref::<u32>(13).is_err());
    assert!(s.get_array_ref::<u32>(4, 3).is_ok());
    assert!(s.get_array_ref::<u32>(4, 4).is_err());
    assert_eq!(s.get_array_ref::<()>(16, usize::MAX).unwrap().len(), usize::MAX);
    assert!(!s.is_empty() && s.subslice(3, 0).unwrap().is_empty());
    let iov = s.as_iovec();
    assert_eq!((iov.iov_base as usize, iov.iov_len), (s.as_ptr() as usize, 16));
    assert!(s.mark_dirty(10, 7).is_err());
}

#[test]
fn read_write_as_much_as_fits() {
    let mut mem = [0u8; 8];
    let (s, bm) = tracked(&mut mem, true);
    assert_eq!(s.write(&[1, 2, 3, 4], 6).unwrap(), 2);
    assert_eq!(bm.ranges(), vec![(6, 2)]);
    // Nothing fits at the end: an error, so a loop that writes until one ends.
    assert!(matches!(s.write(&[1], 8), Err(VolatileError::OutOfBounds { offset: 8, len: 1, size: 8 })));
    assert!(s.write(&[1], 9).is_err());
    let mut out = [0u8; 4];
    assert_eq!(s.read(&mut out, 5).unwrap(), 3);
    assert_eq!(out, [0, 1, 2, 0]);
    assert!(matches!(s.read(&mut out, 8), Err(VolatileError::OutOfBounds { offset: 8, len: 4, size: 8 })));
    assert!(s.read(&mut out, 9).is_err());
    assert!(s.write_slice(&[1, 2, 3], 6).is_err());
    assert!(s.read_slice(&mut out, 5).is_err());
    let mut at = 0;
    while let Ok(n) = s.write(&[7; 3], at) {
        at += n;
    }
    assert_eq!(at, 8);
}

#[test]
fn zero_length_accesses_up_to_the_end() {
    let mut mem = [0u8; 8];
    let (s, bm) = tracked(&mut mem, true);
    // SAFETY: `mem` outlives `ro`, which never writes (read-only).
    let ro = unsafe { VolatileSlice::with_bitmap(s.as_ptr(), 8, (), false) };
    for at in [0, 3, 8] {
        assert_eq!(s.write(&[], at).unwrap(), 0);
        assert_eq!(s.read(&mut [], at).unwrap(), 0);
        s.write_slice(&[], at).unwrap();
        s.read_slice(&mut [], at).unwrap();
        s.write_obj((), at).unwrap();
        s.read_obj::<()>(at).unwrap();
        assert_eq!(s.read_volatile_from(at, &mut &[1u8][..], 0).unwrap(), 0);
        s.read_exact_volatile_from(at, &mut &[1u8][..], 0).unwrap();
        assert_eq!(s.write_volatile_to(at, &mut Vec::new(), 0).unwrap(), 0);
        s.write_all_volatile_to(at, &mut Vec::new(), 0).unwrap();
        // Writing nothing to read-only memory writes nothing: no error.
        assert_eq!(ro.write(&[], at).unwrap(), 0);
        ro.write_slice(&[], at).unwrap();
    }
    assert_eq!(bm.ranges(), vec![]);
    // Past the end there is no empty range either.
    assert!(s.write(&[], 9).is_err());
    assert!(s.read(&mut [], 9).is_err());
    assert!(s.write_slice(&[], 9).is_err());
    assert!(s.read_obj::<()>(9).is_err());
    assert!(s.read_volatile_from(9, &mut &[1u8][..], 0).is_err());
    assert!(s.write_volatile_to(9, &mut Vec::new(), 0).is_err());
    // The as-much-as-fits I/O forms, like write/read, fail when nothing fits.
    assert!(s.read_volatile_from(8, &mut &[1u8][..], 1).is_err());
    assert!(s.write_volatile_to(8, &mut Vec::new(), 1).is_err());
    assert_eq!(s.read_volatile_from(0, &mut &[][..], 4).unwrap(), 0, "Ok(0): the source is at its end");
}

#[test]
fn each_write_path_marks_exactly_what_it_wrote() {
    let mut words = aligned(8);
    let mem = zerocopy::IntoBytes::as_mut_bytes(&mut words[..]);
    let (s, bm) = tracked(mem, true);
    let check = |expect: &[(usize, usize)]| {
        assert_eq!(bm.ranges(), expect);
        bm.clear();
    };
    s.write(&[1, 2, 3], 5).unwrap();
    check(&[(5, 3)]);
    s.write_slice(&[1; 9], 20).unwrap();
    check(&[(20, 9)]);
    s.write_obj(7u32, 40).unwrap();
    check(&[(40, 4)]);
    s.store(7u16, 42, Ordering::SeqCst).unwrap();
    check(&[(42, 2)]);
    s.get_ref::<u64>(48).unwrap().store(1).unwrap();
    check(&[(48, 8)]);
    let arr = s.get_array_ref::<u16>(8, 4).unwrap();
    arr.store(2, 9).unwrap();
    check(&[(12, 2)]);
    arr.copy_from(&[1, 2]).unwrap();
    check(&[(8, 4)]);
    s.subslice(30, 10).unwrap().copy_from(&[1u8; 4]).unwrap();
    check(&[(30, 4)]);
    s.subslice(0, 4).unwrap().copy_to_volatile_slice(&s.subslice(60, 4).unwrap()).unwrap();
    check(&[(60, 4)]);
    s.subslice(1, 2).unwrap().copy_from_volatile_slice(&s.subslice(10, 8).unwrap()).unwrap();
    check(&[(1, 2)]);
    s.subslice(33, 3).unwrap().fill(0xee).unwrap();
    check(&[(33, 3)]);
    let a = s.get_atomic_ref::<AtomicU32>(56).unwrap();
    a.store(1, Ordering::SeqCst).unwrap();
    check(&[(56, 4)]);
    a.swap(2, Ordering::SeqCst).unwrap();
    a.fetch_add(1, Ordering::SeqCst).unwrap();
    check(&[(56, 4)]);
    assert_eq!(a.compare_exchange(99, 5, Ordering::SeqCst, Ordering::SeqCst).unwrap(), Err(3));
    check(&[]);
    assert_eq!(a.compare_exchange(3, 5, Ordering::SeqCst, Ordering::SeqCst).unwrap(), Ok(3));
    check(&[(56, 4)]);
    a.fetch_sub(1, Ordering::SeqCst).unwrap();
    a.fetch_and(0xff, Ordering::SeqCst).unwrap();
    a.fetch_or(0x100, Ordering::SeqCst).unwrap();
    a.fetch_xor(1, Ordering::SeqCst).unwrap();
    check(&[(56, 4)]);
    assert_eq!(a.load(Ordering::SeqCst), 0x105);
    s.subslice(16, 8).unwrap().mark_dirty(2, 3).unwrap();
    check(&[(18, 3)]);
    // Reads mark nothing.
    let mut buf = [0u8; 64];
    s.read_slice(&mut buf, 0).unwrap();
    s.read(&mut buf, 3).unwrap();
    let _: u64 = s.read_obj(8).unwrap();
    let _: u32 = s.load(56, Ordering::SeqCst).unwrap();
    s.copy_to(&mut buf);
    s.write_all_volatile_to(0, &mut Vec::new(), 64).unwrap();
    check(&[]);
}

#[test]
fn read_only_refuses_every_write_path_and_leaves_memory_alone() {
    let mut words = aligned(4);
    words[0] = 0x1111;
    let mem = zerocopy::IntoBytes::as_mut_bytes(&mut words[..]);
    let (s, bm) = tracked(mem, false);
    assert!(!s.is_writable());
    let ro = |r: Result<()>| assert!(matches!(r, Err(VolatileError::ReadOnly { .. })), "{r:?}");
    ro(s.write(&[1], 0).map(drop));
    ro(s.write_slice(&[1], 0));
    ro(s.write_obj(1u8, 0));
    ro(s.store(1u32, 0, Ordering::SeqCst));
    ro(s.get_ref::<u8>(0).unwrap().store(1));
    ro(s.get_array_ref::<u8>(0, 4).unwrap().store(0, 1));
    ro(s.copy_from(&[1u8]).map(drop));
    ro(s.fill(1));
    let mut other = [9u8; 8];
    let (w, _) = tracked(&mut other, true);
    ro(w.copy_to_volatile_slice(&s).map(drop));
    ro(s.copy_from_volatile_slice(&w).map(drop));
    let a = s.get_atomic_ref::<AtomicU64>(0).unwrap();
    ro(a.store(1, Ordering::SeqCst));
    ro(a.swap(1, Ordering::SeqCst).map(drop));
    ro(a.compare_exchange(0x1111, 1, Ordering::SeqCst, Ordering::SeqCst).map(drop));
    ro(a.fetch_add(1, Ordering::SeqCst).map(drop));
    ro(a.fetch_sub(1, Ordering::SeqCst).map(drop));
    ro(a.fetch_and(1, Ordering::SeqCst).map(drop));
    ro(a.fetch_or(1, Ordering::SeqCst).map(drop));
    ro(a.fetch_xor(1, Ordering::SeqCst).map(drop));
    ro(s.read_volatile_from(0, &mut &[1u8][..], 1).map(drop));
    ro(s.read_exact_volatile_from(0, &mut &[1u8][..], 1));
    // Reads still work and nothing was marked or changed.
    assert_eq!(a.load(Ordering::SeqCst), 0x1111);
    assert_eq!(s.read_obj::<u64>(0).unwrap(), 0x1111);
    assert!(bm.ranges().is_empty());
    // SAFETY: only loads through the atomic.
    assert_eq!(unsafe { a.as_atomic() }.load(Ordering::Relaxed), 0x1111);
    // Sub-slices and refs inherit read-only.
    assert!(!s.subslice(1, 2).unwrap().is_writable());
    assert!(!s.offset(1).unwrap().is_writable());
    assert!(!s.split_at(1).unwrap().1.is_writable());
}

#[test]
fn typed_copies() {
    let mut words = aligned(4);
    let mem = zerocopy::IntoBytes::as_mut_bytes(&mut words[..]);
    let (s, _) = tracked(mem, true);
    assert_eq!(s.copy_from(&[1u16, 2, 3]).unwrap(), 3);
    let mut out = [0u16; 20];
    assert_eq!(s.copy_to(&mut out), 16);
    assert_eq!(&out[..4], &[1, 2, 3, 0]);
    let mut small = [0u64; 2];
    assert_eq!(s.copy_to(&mut small), 2);
    assert_eq!(small[0], 0x0000_0003_0002_0001);
    assert_eq!(s.subslice(0, 7).unwrap().copy_to(&mut small), 0);
    assert_eq!(s.copy_from(&[7u64; 10]).unwrap(), 4);
    // Zero-sized elements copy nothing and never divide by zero.
    assert_eq!(s.copy_to(&mut [(); 4]), 0);
    assert_eq!(s.copy_from(&[(); 4]).unwrap(), 0);
    // Typed views over the same bytes.
    let arr = s.get_array_ref::<u32>(0, 8).unwrap();
    assert_eq!((arr.len(), arr.element_size(), arr.is_empty()), (8, 4, false));
    assert_eq!(arr.load(0).unwrap(), 7);
    assert!(arr.load(8).is_err());
    assert!(matches!(arr.ref_at(8), Err(VolatileError::OutOfBounds { offset: 32, len: 4, size: 32 })));
    assert_eq!(arr.as_ptr() as usize, s.as_ptr() as usize);
    assert_eq!(arr.to_slice().len(), 32);
    let r = s.get_ref::<[u8; 3]>(1).unwrap();
    assert_eq!(r.load(), [0, 0, 0]);
    r.store([1, 2, 3]).unwrap();
    assert_eq!(s.read_obj::<[u8; 4]>(0).unwrap(), [7, 1, 2, 3]);
    assert_eq!(r.to_slice().len(), 3);
    assert_eq!(r.as_ptr() as usize, s.as_ptr() as usize + 1);
}

#[test]
fn atomics_of_every_width() {
    let mut words = aligned(2);
    let mem = zerocopy::IntoBytes::as_mut_bytes(&mut words[..]);
    let (s, _) = tracked(mem, true);
    s.get_atomic_ref::<AtomicU8>(3).unwrap().store(1, Ordering::SeqCst).unwrap();
    s.get_atomic_ref::<AtomicU16>(6).unwrap().store(2, Ordering::SeqCst).unwrap();
    s.get_atomic_ref::<AtomicUsize>(8).unwrap().store(3, Ordering::SeqCst).unwrap();
    assert_eq!(s.load::<u8>(3, Ordering::SeqCst).unwrap(), 1);
    assert_eq!(s.load::<u16>(6, Ordering::SeqCst).unwrap(), 2);
    assert_eq!(s.load::<usize>(8, Ordering::SeqCst).unwrap(), 3);
    assert_eq!(s.load::<i64>(8, Ordering::SeqCst).unwrap(), 3);
    assert!(matches!(s.load::<u16>(7, Ordering::SeqCst), Err(VolatileError::Misaligned { align: 2, .. })));
    assert!(matches!(s.store(1u64, 4, Ordering::SeqCst), Err(VolatileError::Misaligned { align: 8, .. })));
    assert!(matches!(s.load::<u64>(12, Ordering::SeqCst), Err(VolatileError::OutOfBounds { .. })));
}

#[test]
fn bytes_io_forms_clip_and_check() {
    let mut mem = [0u8; 8];
    let (s, bm) = tracked(&mut mem, true);
    assert_eq!(s.read_volatile_from(6, &mut &[1u8, 2, 3][..], 3).unwrap(), 2);
    assert_eq!(bm.ranges(), vec![(6, 2)]);
    assert!(s.read_volatile_from(9, &mut &[1u8][..], 1).is_err());
    assert!(s.read_exact_volatile_from(6, &mut &[1u8, 2, 3][..], 3).is_err());
    s.read_exact_volatile_from(0, &mut &[5u8, 6][..], 2).unwrap();
    let mut out = Vec::new();
    assert_eq!(s.write_volatile_to(5, &mut out, 10).unwrap(), 3);
    assert!(s.write_all_volatile_to(5, &mut out, 10).is_err());
    s.write_all_volatile_to(0, &mut out, 2).unwrap();
    assert_eq!(out, vec![0, 1, 2, 5, 6]);
}

#[test]
fn debug_formats() {
    let mut mem = [0u8; 4];
    let s = VolatileSlice::from(&mut mem[..]);
    let d = format!("{s:?}");
    assert!(d.contains("len: 4") && d.contains("writable: true"), "{d}");
    let r = s.get_ref::<u16>(0).unwrap();
    assert!(format!("{r:?}").contains("VolatileRef"));
}
