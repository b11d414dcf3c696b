//! vhost-user, both sides, against the real kernel: memory tables and logs travel over a Unix
//! socket with SCM_RIGHTS to a back-end in another process (the test binary run again, see
//! `vhost_user/proto.rs`), which serves a ring, writes guest memory from a thread while the VMM
//! runs migration rounds and swaps logs, and meets hostile messages; and, in this process,
//! every rule for hostile tables and logs, with checks that a refusal leaves no mapping and no
//! descriptor behind.

mod common;
#[path = "vhost_user/device.rs"]
mod device;
#[path = "vhost_user/proto.rs"]
mod proto;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::bitmap::{AtomicBitmap, Bitmap, BitmapError, BitmapSlice, DirtyHarvest, NewBitmap};
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::sys::fd::FileKind;
use guestmem::sys::{MemfdFlags, Seals};
use guestmem::vhost_user::{
    BackendMemory, DirtyLog, LogDesc, LogError, MemoryRegionDesc, TableError, MAX_LOG_BYTES,
};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use device::*;
use proto::*;

type VmmMemory = GuestMemoryMmap<AtomicBitmap>;

const MIB: u64 = 1 << 20;

/// A region of the VMM's memory: a sealed memfd of `size` bytes at `base`.
fn memfd_region(name: &str, size: u64, base: u64) -> GuestRegionMmap<AtomicBitmap> {
    let map = MmapRegionBuilder::<AtomicBitmap>::new(size as usize)
        .backing(Backing::Memfd(MemfdOptions::new(name)))
        .build()
        .unwrap();
    GuestRegionMmap::new(map, GuestAddress(base)).unwrap()
}

/// The table of `mem` and the descriptors to send with it.
fn table(mem: &VmmMemory) -> (Vec<u8>, Vec<BorrowedFd<'_>>) {
    let (descs, fds): (Vec<_>, Vec<_>) = mem.iter().map(|r| MemoryRegionDesc::of_region(r).unwrap()).unzip();
    (MemoryRegionDesc::table_payload(&descs).unwrap(), fds)
}

/// A new memfd of `len` bytes (not sealed), named `name`.
fn memfd(name: &str, len: u64) -> OwnedFd {
    let name = std::ffi::CString::new(name).unwrap();
    let fd = guestmem::sys::memfd_create(&name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    guestmem::sys::fd::ftruncate(fd.as_fd(), len).unwrap();
    fd
}

/// How many descriptors of this process refer to the memfd `name`, and how many mappings of
/// it exist (tests in other threads do not use the name).
fn memfd_use(name: &str) -> (usize, usize) {
    let link = format!("/memfd:{name} (deleted)");
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_str() == Some(&link))
        .count();
    let maps =
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.ends_with(&link)).count();
    (fds, maps)
}

fn send_log(conn: &Conn, log: &DirtyLog) -> std::io::Result<()> {
    conn.call_status(SET_LOG_BASE, &log.desc().payload(), &[log.fd()])?
        .map(drop)
        .map_err(std::io::Error::other)
}

/// The ring of the first test: where its parts are in guest memory, and its buffers.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// (guest address, length) of the device-writable buffers: three pages; one crossing from
/// region 0 into region 1; a few bytes.
const BUFFERS: [(u64, u32); 3] = [(0x10000, 0x3000), (0x1f_f800, 0x1000), (0x28_0010, 0x10)];

#[test]
fn two_processes_ring_translation_log_and_hotplug() {
    const TEST: &str = "two_processes_ring_translation_log_and_hotplug";
    if let Some((path, role)) = backend_child(TEST) {
        return serve(connect(&path), &role);
    }
    let mut mem = VmmMemory::from_regions(vec![
        memfd_region("vmm-ram0", 2 * MIB, 0),
        memfd_region("vmm-ram1", MIB, 2 * MIB),
    ])
    .unwrap();
    let backend = Backend::spawn(TEST, "honest");
    let conn = &backend.conn;
    let (payload, fds) = table(&mem);
    assert_eq!(conn.call_status(SET_MEM_TABLE, &payload, &fds).unwrap(), Ok(0));
    let mut log = DirtyLog::for_memory(&mem).unwrap();
    send_log(conn, &log).unwrap();

    // The ring, written by the VMM (the driver's part).
    for (head, &(addr, len)) in BUFFERS.iter().enumerate() {
        let d = DESC + 16 * head as u64;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(DESC_F_WRITE, GuestAddress(d + 12)).unwrap();
        mem.write_obj(head as u16, GuestAddress(AVAIL + 4 + 2 * head as u64)).unwrap();
    }
    mem.store(BUFFERS.len() as u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    mem.take_dirty_ranges(|_, _| {}).unwrap(); // the VMM's own writes so far: not the device's

    // The ring's addresses go out as the VMM's own virtual addresses.
    let user = |mem: &VmmMemory, gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let mut vring = Vec::new();
    vring.extend_from_slice(&0u32.to_ne_bytes());
    vring.extend_from_slice(&VRING_F_LOG.to_ne_bytes());
    for v in [user(&mem, DESC), user(&mem, USED), user(&mem, AVAIL), USED] {
        vring.extend_from_slice(&v.to_ne_bytes());
    }
    assert_eq!(conn.call_status(SET_VRING_ADDR, &vring, &[]).unwrap(), Ok(0));
    // A ring address outside every region is refused by the back-end's translation.
    let mut bad = vring.clone();
    bad[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
    assert!(conn.call_status(SET_VRING_ADDR, &bad, &[]).unwrap().unwrap_err().contains("UserAddress"));
    assert_eq!(conn.call_status(SET_VRING_ADDR, &vring, &[]).unwrap(), Ok(0));

    assert_eq!(conn.call_status(T_PROCESS_RING, &[], &[]).unwrap(), Ok(3));

    // The device's writes, seen in the VMM's memory.
    for (head, &(addr, len)) in BUFFERS.iter().enumerate() {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert!(buf.iter().all(|&b| b == pattern(head as u16)), "buffer {head}");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * head as u64)).unwrap(), head as u32);
    }
    assert_eq!(mem.load::<u16>(GuestAddress(USED + 2), Ordering::Acquire).unwrap(), 3);

    // The harvest: exactly the pages the device wrote, merged with the VMM's own write.
    mem.write_obj(1u8, GuestAddress(0x5_0000)).unwrap();
    let device_pages = [0x3000, 0x10000, 0x11000, 0x12000, 0x1f_f000, 0x20_0000, 0x28_0000];
    assert_eq!(log.harvest_into(&mem).unwrap(), device_pages.len());
    assert_eq!(log.dirty_page_count(), 0);
    let mut dirty = Vec::new();
    mem.take_dirty_ranges(|addr, len| {
        for page in (addr.0..addr.0 + len).step_by(4096) {
            dirty.push(page);
        }
    })
    .unwrap();
    let mut expected = device_pages.to_vec();
    expected.push(0x5_0000);
    expected.sort();
    assert_eq!(dirty, expected);

    // Hotplug: a region past the log (whose one page covers 128 MiB) is refused until a log
    // covering it is swapped in.
    assert_eq!(log.covers(), 128 * MIB);
    let hot = memfd_region("vmm-hot", MIB, 256 * MIB);
    let (hot_desc, hot_fd) = MemoryRegionDesc::of_region(&hot).unwrap();
    let refused = conn.call_status(ADD_MEM_REG, &hot_desc.single_payload(), &[hot_fd]).unwrap();
    assert!(refused.unwrap_err().contains("OutsideLog"));
    assert_eq!(conn.call_status(T_REGIONS, &[], &[]).unwrap(), Ok(2));
    let bigger = DirtyLog::new(512 * MIB).unwrap();
    assert_eq!(log.swap(bigger, &mem, |next| send_log(conn, next)).unwrap(), 0);
    assert_eq!(conn.call_status(ADD_MEM_REG, &hot_desc.single_payload(), &[hot_fd]).unwrap(), Ok(0));
    mem = mem.insert_region(Arc::new(hot)).unwrap();
    assert_eq!(conn.call_status(T_REGIONS, &[], &[]).unwrap(), Ok(3));
    // A ring address in the new region translates.
    let mut hot_ring = vring.clone();
    for (at, gpa) in [(8, 256 * MIB), (16, 256 * MIB + 0x1000), (24, 256 * MIB + 0x2000)] {
        hot_ring[at..at + 8].copy_from_slice(&user(&mem, gpa).to_ne_bytes());
    }
    assert_eq!(conn.call_status(SET_VRING_ADDR, &hot_ring, &[]).unwrap(), Ok(0));

    // Removal, with a descriptor sent along (as incorrect front-ends do): the back-end closes
    // it and unmaps the region.
    let fds_before = conn.call_status(T_OPEN_FDS, &[], &[]).unwrap().unwrap();
    let maps_before = conn.call_status(T_MEMFD_MAPPINGS, &[], &[]).unwrap().unwrap();
    let (desc, fd) = MemoryRegionDesc::of_region(&mem.regions()[2]).unwrap();
    assert_eq!(conn.call_status(REM_MEM_REG, &desc.single_payload(), &[fd]).unwrap(), Ok(0));
    assert_eq!(conn.call_status(T_REGIONS, &[], &[]).unwrap(), Ok(2));
    assert_eq!(conn.call_status(T_OPEN_FDS, &[], &[]).unwrap().unwrap(), fds_before - 1);
    assert_eq!(conn.call_status(T_MEMFD_MAPPINGS, &[], &[]).unwrap().unwrap(), maps_before - 1);
    let again = conn.call_status(REM_MEM_REG, &desc.single_payload(), &[]).unwrap();
    assert!(again.unwrap_err().contains("NoSuchRegion"));

    // Logging off: the device's writes are no longer logged.
    assert_eq!(conn.call_status(SET_FEATURES, &u64_payload(0), &[]).unwrap(), Ok(0));
    mem.store(6u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    assert_eq!(conn.call_status(SET_VRING_ADDR, &vring, &[]).unwrap(), Ok(0));
    assert_eq!(conn.call_status(T_PROCESS_RING, &[], &[]).unwrap(), Ok(6));
    assert_eq!(log.dirty_page_count(), 0);
    backend.finish();
}

/// A migration in miniature, while the back-end's thread keeps writing: a full copy, then
/// rounds of (harvest the log into the VMM's bitmaps, copy what the union says is dirty),
/// with a new log swapped in every round (larger and smaller), a region hot-plugged on the
/// way, and the VMM writing too. After the writer stops and a last round, the copy must equal
/// the memory: a single lost mark of a page's last write would show.
#[test]
fn two_processes_migration_rounds_lose_no_write() {
    const TEST: &str = "two_processes_migration_rounds_lose_no_write";
    if let Some((path, role)) = backend_child(TEST) {
        return serve(connect(&path), &role);
    }
    let mut mem = VmmMemory::from_regions(vec![
        memfd_region("mig-ram0", 2 * MIB, 0),
        memfd_region("mig-ram1", MIB, 2 * MIB),
    ])
    .unwrap();
    let backend = Backend::spawn(TEST, "honest");
    let conn = &backend.conn;
    let (payload, fds) = table(&mem);
    assert_eq!(conn.call_status(SET_MEM_TABLE, &payload, &fds).unwrap(), Ok(0));
    let mut log = DirtyLog::for_memory(&mem).unwrap();
    send_log(conn, &log).unwrap();
    assert_eq!(conn.call_status(T_START_WRITER, &[], &[]).unwrap(), Ok(0));

    // The destination: one buffer per region, filled by a full copy, then by rounds.
    let mut dest: Vec<Vec<u8>> = common::contents(&mem);
    let copy = |mem: &VmmMemory, dest: &mut Vec<Vec<u8>>, addr: GuestAddress, len: u64| {
        let (i, region) = mem.iter().enumerate().find(|(_, r)| r.to_region_addr(addr).is_some()).unwrap();
        let off = (addr.0 - region.start_addr().0) as usize;
        mem.read_slice(&mut dest[i][off..off + len as usize], addr).unwrap();
    };
    let start = Instant::now();
    let (mut swaps, mut copied) = (0, 0u64);
    let mut round = 0u64;
    while round < 40 || start.elapsed() < Duration::from_millis(1500) {
        round += 1;
        log.harvest_into(&mem).unwrap();
        let mut ranges = Vec::new();
        mem.take_dirty_ranges(|addr, len| ranges.push((addr, len))).unwrap();
        for (addr, len) in ranges {
            // A run may cross from one region into the next: copy it region by region.
            let mut at = addr.0;
            while at < addr.0 + len {
                let region = mem.find_region(GuestAddress(at)).unwrap();
                let n = (region.last_addr().0 + 1 - at).min(addr.0 + len - at);
                copy(&mem, &mut dest, GuestAddress(at), n);
                at += n;
                copied += n;
            }
        }
        // The VMM's own writes: its bitmap, not the log, has them.
        mem.write_obj(round, GuestAddress((round * 4096 * 7) % (3 * MIB))).unwrap();
        if round == 10 {
            // Hotplug: first a log that covers the new region, then the region.
            let next = DirtyLog::new(12 * MIB).unwrap();
            log.swap(next, &mem, |n| send_log(conn, n)).unwrap();
            let hot = memfd_region("mig-hot", MIB, 8 * MIB);
            let (d, fd) = MemoryRegionDesc::of_region(&hot).unwrap();
            assert_eq!(conn.call_status(ADD_MEM_REG, &d.single_payload(), &[fd]).unwrap(), Ok(0));
            mem = mem.insert_region(Arc::new(hot)).unwrap();
            dest.push(vec![0; MIB as usize]);
        }
        // A new log every round, alternately one page (128 MiB of guest) and eight.
        let next =
            DirtyLog::new(if round.is_multiple_of(2) { mem.last_addr().0 + 1 } else { 1 << 30 }).unwrap();
        swaps += 1;
        log.swap(next, &mem, |n| send_log(conn, n)).unwrap();
    }
    let writes = conn.call_status(T_STOP_WRITER, &[], &[]).unwrap().unwrap();
    log.harvest_into(&mem).unwrap();
    let mut ranges = Vec::new();
    mem.take_dirty_ranges(|addr, len| ranges.push((addr, len))).unwrap();
    for (addr, len) in ranges {
        let mut at = addr.0;
        while at < addr.0 + len {
            let region = mem.find_region(GuestAddress(at)).unwrap();
            let n = (region.last_addr().0 + 1 - at).min(addr.0 + len - at);
            copy(&mem, &mut dest, GuestAddress(at), n);
            at += n;
        }
    }
    let source = common::contents(&mem);
    for (i, (s, d)) in source.iter().zip(&dest).enumerate() {
        if s != d {
            let page = s.chunks(4096).zip(d.chunks(4096)).position(|(a, b)| a != b).unwrap();
            panic!("region {i} differs from its copy at page {page} after {writes} writes and {swaps} swaps");
        }
    }
    assert!(writes > 10_000, "the writer made only {writes} writes");
    let _ = writeln_stderr(format!(
        "migration: {writes} back-end writes, {swaps} log swaps, {} MiB copied in rounds, {:?}",
        copied >> 20,
        start.elapsed()
    ));
    backend.finish();
}

fn writeln_stderr(s: String) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{s}")
}

/// The swap protocol across processes: the back-end's thread writes every page of guest
/// memory exactly once while the VMM swaps logs (one page and eight, alternately) and harvests
/// as fast as it can. The union of the harvests must hold every page: each is written once, so
/// a lost mark is a missing page.
#[test]
fn two_processes_log_swaps_lose_no_mark() {
    const TEST: &str = "two_processes_log_swaps_lose_no_mark";
    if let Some((path, role)) = backend_child(TEST) {
        return serve(connect(&path), &role);
    }
    let mem = VmmMemory::from_regions(vec![
        memfd_region("once-ram0", 16 * MIB, 0),
        memfd_region("once-ram1", 8 * MIB, 20 * MIB),
    ])
    .unwrap();
    let pages = (24 * MIB / 4096) as usize;
    let backend = Backend::spawn(TEST, "honest");
    let conn = &backend.conn;
    let (payload, fds) = table(&mem);
    assert_eq!(conn.call_status(SET_MEM_TABLE, &payload, &fds).unwrap(), Ok(0));
    let mut log = DirtyLog::for_memory(&mem).unwrap();
    send_log(conn, &log).unwrap();
    assert_eq!(conn.call_status(T_START_WRITER, &u64_payload(WRITE_EVERY_PAGE_ONCE), &[]).unwrap(), Ok(0));
    let mut swaps = 0u64;
    let start = Instant::now();
    while mem.read_obj::<u64>(GuestAddress(DONE_FLAG)).unwrap() != DONE {
        let covers = if swaps.is_multiple_of(2) { 28 * MIB } else { 1 << 30 };
        log.swap(DirtyLog::new(covers).unwrap(), &mem, |n| send_log(conn, n)).unwrap();
        log.harvest_into(&mem).unwrap();
        swaps += 1;
        assert!(start.elapsed() < Duration::from_secs(120), "the writer did not finish");
    }
    assert_eq!(conn.call_status(T_STOP_WRITER, &[], &[]).unwrap(), Ok(pages as u64 + 1));
    log.harvest_into(&mem).unwrap();
    let mut missing = Vec::new();
    let mut next = 0;
    mem.take_dirty_ranges(|addr, len| {
        let first = addr.0 / 4096;
        let first = if first >= 20 * MIB / 4096 { first - 1024 } else { first }; // the hole
        missing.extend(next..first);
        next = first + len / 4096;
    })
    .unwrap();
    missing.extend(next..pages as u64);
    assert!(
        missing.is_empty(),
        "{} marks lost over {swaps} swaps: {:?}...",
        missing.len(),
        &missing[..missing.len().min(16)]
    );
    assert!(swaps > 20, "only {swaps} swaps while the writer ran");
    let _ = writeln_stderr(format!(
        "two processes: {pages} pages written once each, {swaps} log swaps meanwhile"
    ));
    backend.finish();
}

/// A hostile front-end over the socket: every bad table or log is refused with its reason, the
/// back-end keeps serving, and keeps no descriptor or mapping of what it refused; a message
/// with more descriptors than any message carries ends the connection.
#[test]
fn two_processes_hostile_frontend() {
    const TEST: &str = "two_processes_hostile_frontend";
    if let Some((path, role)) = backend_child(TEST) {
        return serve(connect(&path), &role);
    }
    let backend = Backend::spawn(TEST, "honest");
    let conn = &backend.conn;
    let fds0 = conn.call_status(T_OPEN_FDS, &[], &[]).unwrap().unwrap();
    let maps0 = conn.call_status(T_MEMFD_MAPPINGS, &[], &[]).unwrap().unwrap();
    let region = |guest_addr, size, mmap_offset| MemoryRegionDesc {
        guest_addr,
        size,
        user_addr: 0x7000_0000,
        mmap_offset,
    };
    let one = |r: MemoryRegionDesc| MemoryRegionDesc::table_payload(&[r]).unwrap();
    let ram = memfd("hostile-ram", 0x10000);
    let (sock_a, _sock_b) = std::os::unix::net::UnixStream::pair().unwrap();
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    file.set_len(0x1000).unwrap();
    let refusal = |payload: &[u8], fds: &[BorrowedFd<'_>]| {
        conn.call_status(SET_MEM_TABLE, payload, fds).unwrap().unwrap_err()
    };

    // A socket in place of a memfd.
    assert!(refusal(&one(region(0, 0x10000, 0)), &[sock_a.as_fd()]).contains("kind: Socket"));
    // A regular file of the wrong size.
    assert!(refusal(&one(region(0, 0x10000, 0)), &[file.as_fd()]).contains("FileTooShort"));
    // A region past the end of its memfd; an mmap offset near 2^64; an unaligned guest address.
    assert!(refusal(&one(region(0, 0x10000, 0x1000)), &[ram.as_fd()]).contains("FileTooShort"));
    assert!(refusal(&one(region(0, 0x10000, u64::MAX - 0xfff)), &[ram.as_fd()]).contains("Overflow"));
    assert!(refusal(&one(region(0x800, 0x1000, 0)), &[ram.as_fd()]).contains("Unaligned"));
    // Overlapping regions; a table claiming 10^6 regions; fewer descriptors than regions.
    let overlap = MemoryRegionDesc::table_payload(&[
        region(0, 0x10000, 0),
        MemoryRegionDesc { user_addr: 0x9000_0000, ..region(0x8000, 0x8000, 0) },
    ])
    .unwrap();
    assert!(refusal(&overlap, &[ram.as_fd(), ram.as_fd()]).contains("GuestOverlap"));
    let mut million = one(region(0, 0x10000, 0));
    million[..4].copy_from_slice(&1_000_000u32.to_ne_bytes());
    assert!(refusal(&million, &[ram.as_fd()]).contains("TooManyRegions"));
    assert!(refusal(&overlap, &[ram.as_fd()]).contains("FdCount"));
    // Logs: not sealed; claiming more than its file; a socket.
    let unsealed = memfd("hostile-log", 4096);
    let log_refusal = |desc: LogDesc, fd: BorrowedFd<'_>| {
        conn.call_status(SET_LOG_BASE, &desc.payload(), &[fd]).unwrap().unwrap_err()
    };
    assert!(log_refusal(LogDesc { size: 4096, offset: 0 }, unsealed.as_fd()).contains("Unsealed"));
    guestmem::sys::fd::add_seals(unsealed.as_fd(), Seals::SHRINK).unwrap();
    assert!(log_refusal(LogDesc { size: 8192, offset: 0 }, unsealed.as_fd()).contains("FileTooShort"));
    assert!(log_refusal(LogDesc { size: 4096, offset: 0 }, sock_a.as_fd()).contains("NotAFile"));

    // Nothing of it stayed.
    assert_eq!(conn.call_status(T_REGIONS, &[], &[]).unwrap(), Ok(0));
    assert_eq!(conn.call_status(T_OPEN_FDS, &[], &[]).unwrap().unwrap(), fds0);
    assert_eq!(conn.call_status(T_MEMFD_MAPPINGS, &[], &[]).unwrap().unwrap(), maps0);
    // And a good table still works.
    assert_eq!(conn.call_status(SET_MEM_TABLE, &one(region(0, 0x10000, 0)), &[ram.as_fd()]).unwrap(), Ok(0));
    // Nine descriptors: the back-end's receive refuses them (and closes what arrived), and
    // hangs up.
    conn.send(SET_MEM_TABLE, 1, &one(region(0, 0x10000, 0)), &[ram.as_fd(); 9]).unwrap();
    let (passed, output) = backend.wait();
    assert!(passed, "{output}");
    assert!(output.contains("dropping the connection") && output.contains("os error 90"), "{output}");
}

/// A hostile back-end: it tries to shrink, grow and seal the VMM's log (the seals stop it),
/// sets every bit of it, and then hangs up instead of acknowledging a new log. The VMM's
/// harvest takes only the pages of guest memory, and its swap fails with the old log kept.
#[test]
fn two_processes_hostile_backend() {
    const TEST: &str = "two_processes_hostile_backend";
    if let Some((path, role)) = backend_child(TEST) {
        return serve(connect(&path), &role);
    }
    let mem = VmmMemory::from_regions(vec![
        memfd_region("evil-ram0", MIB, 0),
        memfd_region("evil-ram1", MIB, 4 * MIB),
    ])
    .unwrap();
    let backend = Backend::spawn(TEST, "hostile");
    let conn = &backend.conn;
    let (payload, fds) = table(&mem);
    assert_eq!(conn.call_status(SET_MEM_TABLE, &payload, &fds).unwrap(), Ok(0));
    let mut log = DirtyLog::new(8 * MIB).unwrap();
    let bits = conn.call_status(SET_LOG_BASE, &log.desc().payload(), &[log.fd()]).unwrap().unwrap();
    assert_eq!(bits, log.desc().size * 8);
    assert_eq!(log.dirty_page_count() as u64, bits);
    // Only the 512 pages of guest memory are taken; the bits of the hole and past the memory
    // stay where they are, harmless.
    assert_eq!(log.harvest_into(&mem).unwrap(), 512);
    assert_eq!(mem.dirty_page_count().unwrap(), 512);
    assert_eq!(log.dirty_page_count() as u64, bits - 512);
    assert_eq!(log.harvest_into(&mem).unwrap(), 0);
    // The swap is not acknowledged: an error, and the old log stays.
    let next = DirtyLog::new(8 * MIB).unwrap();
    let e = log.swap(next, &mem, |n| send_log(conn, n)).unwrap_err();
    assert!(matches!(e, LogError::Handover(_)), "{e}");
    assert_eq!(log.dirty_page_count() as u64, bits - 512);
    let (passed, output) = backend.wait();
    assert!(passed, "{output}");
}

/// The swap protocol under fire, in one process: writer threads mark every page of a region
/// exactly once (through guest memory, so through the regions' log bitmaps) while the VMM
/// swaps logs as fast as it can and harvests each retired one. Every page must come out of
/// some harvest: with each page written once, a lost mark is a missing page.
#[test]
fn log_swaps_under_concurrent_writes_lose_no_mark() {
    const PAGES: u64 = 8192;
    const WRITERS: u64 = 2;
    let vmm = VmmMemory::from_regions(vec![memfd_region("storm-ram", PAGES * 4096, 0)]).unwrap();
    let (desc, fd) = MemoryRegionDesc::of_region(&vmm.regions()[0]).unwrap();
    let backend = BackendMemory::new().unwrap();
    backend.set_mem_table(&[desc], vec![fd.try_clone_to_owned().unwrap()]).unwrap();
    let mut log = DirtyLog::for_memory(&vmm).unwrap();
    backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    let hand_over = |next: &DirtyLog| {
        backend.set_log_base(next.fd().try_clone_to_owned()?, &next.desc()).map_err(std::io::Error::other)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut passes, mut swaps) = (0u64, 0u64);
    while passes < 3 || Instant::now() < deadline {
        let done = AtomicU64::new(0);
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let (backend, done) = (&backend, &done);
                s.spawn(move || {
                    let mem = backend.memory();
                    for page in (w..PAGES).step_by(WRITERS as usize) {
                        mem.write_obj(page, GuestAddress(page * 4096 + 8 * (page % 512))).unwrap();
                        for _ in 0..200 {
                            std::hint::spin_loop();
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            while done.load(Ordering::Acquire) < WRITERS {
                // Alternately one page of log and eight: the window's tail is refilled with
                // anonymous memory and mapped again.
                let covers = if swaps.is_multiple_of(2) { PAGES * 4096 } else { 1 << 30 };
                log.swap(DirtyLog::new(covers).unwrap(), &vmm, hand_over).unwrap();
                swaps += 1;
                log.harvest_into(&vmm).unwrap();
            }
        });
        log.harvest_into(&vmm).unwrap();
        let mut missing = Vec::new();
        let mut expected_next = 0;
        vmm.take_dirty_ranges(|addr, len| {
            missing.extend(expected_next..addr.0 / 4096);
            expected_next = (addr.0 + len) / 4096;
        })
        .unwrap();
        missing.extend(expected_next..PAGES);
        assert!(
            missing.is_empty(),
            "pass {passes}: {} marks lost (pages {:?}...) over {swaps} swaps",
            missing.len(),
            &missing[..missing.len().min(16)]
        );
        passes += 1;
    }
    assert!(swaps > passes * 4, "only {swaps} swaps in {passes} passes");
    let _ = writeln_stderr(format!("storm: {passes} passes of {PAGES} pages, {swaps} log swaps"));
}

/// The log's bits are the pages that were written: random writes through a back-end's memory
/// (regions at page offsets that are not multiples of 64 pages, writes across words and
/// regions) mark exactly what the same writes mark in an `AtomicBitmap` of the same layout.
#[test]
fn log_marks_match_an_atomic_bitmap() {
    // Regions at pages 3, 70 and 200 (so they share log words), of 61, 100 and 9 pages.
    let layout = [(3u64, 61u64), (70, 100), (200, 9)];
    let vmm = VmmMemory::from_regions(
        layout
            .iter()
            .enumerate()
            .map(|(i, &(p, n))| memfd_region(&format!("marks{i}"), n * 4096, p * 4096))
            .collect(),
    )
    .unwrap();
    let descs: Vec<_> = vmm.iter().map(|r| MemoryRegionDesc::of_region(r).unwrap()).collect();
    let backend = BackendMemory::new().unwrap();
    backend
        .set_mem_table(
            &descs.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            descs.iter().map(|(_, fd)| fd.try_clone_to_owned().unwrap()).collect(),
        )
        .unwrap();
    let mut log = DirtyLog::for_memory(&vmm).unwrap();
    backend.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
    let model =
        VmmMemory::from_ranges(&layout.map(|(p, n)| (GuestAddress(p * 4096), (n * 4096) as usize))).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mem = backend.memory();
    for round in 0..200 {
        for _ in 0..1 + round % 7 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (p, n) = layout[(x % 3) as usize];
            let start = p * 4096 + (x >> 8) % (n * 4096);
            let len = 1 + (x >> 40) % (3 * 4096);
            let len = len.min((p + n) * 4096 - start) as usize;
            let buf = vec![round as u8; len];
            mem.write_slice(&buf, GuestAddress(start)).unwrap();
            model.write_slice(&buf, GuestAddress(start)).unwrap();
            // The slices' own view of the log agrees.
            assert!(mem.get_slice(GuestAddress(start), 1).unwrap().bitmap().dirty_at(0));
        }
        let mut from_log = Vec::new();
        let mut from_model = Vec::new();
        log.harvest_into(&vmm).unwrap();
        vmm.take_dirty_ranges(|a, l| from_log.push((a, l))).unwrap();
        model.take_dirty_ranges(|a, l| from_model.push((a, l))).unwrap();
        assert_eq!(from_log, from_model, "round {round}");
        if let Some(&(a, _)) = from_log.first() {
            assert!(!mem.get_slice(a, 1).unwrap().bitmap().dirty_at(0));
        }
    }
    // Explicit marks past the log are dropped, not a fault.
    backend.log().mark(GuestAddress(u64::MAX - 10), 100);
    backend.log().mark(GuestAddress(log.covers()), 4096);
    assert_eq!(log.dirty_page_count(), 0);
}

/// Every rule of `set_mem_table`, `add_region` and `set_log_base`, each breaking one: refused
/// with its error, nothing mapped, no descriptor kept, the memory as it was.
#[test]
fn hostile_tables_and_logs_are_refused_whole() {
    let name = "refusals";
    let backend = BackendMemory::new().unwrap();
    let page = 4096u64;
    let good =
        |guest_addr, user_addr| MemoryRegionDesc { guest_addr, size: 0x10000, user_addr, mmap_offset: 0 };
    let fd = || memfd(name, 0x10000);
    backend.set_mem_table(&[good(0, 0x7000_0000)], vec![fd()]).unwrap();
    let baseline = memfd_use(name);
    assert_eq!(baseline, (1, 1));
    let table = |r: &[MemoryRegionDesc], fds: Vec<OwnedFd>| backend.set_mem_table(r, fds).unwrap_err();
    let checks: Vec<(TableError, &str)> = vec![
        (table(&[good(0, 0), good(0x8000, 0x10_0000)], vec![fd(), fd()]), "GuestOverlap"),
        (table(&[good(0, 0), good(0x10_0000, 0x8000)], vec![fd(), fd()]), "UserOverlap"),
        (table(&[MemoryRegionDesc { mmap_offset: page, ..good(0, 0) }], vec![fd()]), "FileTooShort"),
        (table(&[MemoryRegionDesc { guest_addr: 0x800, ..good(0, 0) }], vec![fd()]), "Unaligned"),
        (table(&[MemoryRegionDesc { user_addr: 0x7000_0800, ..good(0, 0) }], vec![fd()]), "Unaligned"),
        (table(&[MemoryRegionDesc { size: 0x1800, ..good(0, 0) }], vec![fd()]), "Unaligned"),
        (table(&[MemoryRegionDesc { mmap_offset: u64::MAX - 0xfff, ..good(0, 0) }], vec![fd()]), "Overflow"),
        (table(&[MemoryRegionDesc { mmap_offset: 1 << 63, ..good(0, 0) }], vec![fd()]), "Overflow"),
        (table(&[good(u64::MAX - 0xfff, 0)], vec![fd()]), "Overflow"),
        (table(&[good(0, u64::MAX - 0xfff)], vec![fd()]), "Overflow"),
        (table(&[MemoryRegionDesc { size: 0, ..good(0, 0) }], vec![fd()]), "ZeroSize"),
        (table(&[good(0, 0), good(0x10_0000, 0x10_0000)], vec![fd()]), "FdCount"),
        // The same bytes of one file at two guest addresses.
        (
            table(&[good(0, 0), good(0x10_0000, 0x10_0000)], {
                let f = fd();
                let g = f.try_clone().unwrap();
                vec![f, g]
            }),
            "Memory",
        ),
        // A memfd sealed against writing cannot be mapped writable: the kernel refuses.
        (
            table(&[good(0, 0)], {
                let f = fd();
                guestmem::sys::fd::add_seals(f.as_fd(), Seals::WRITE).unwrap();
                vec![f]
            }),
            "Map",
        ),
    ];
    for (e, what) in &checks {
        assert!(format!("{e:?}").starts_with(what), "{what}: {e:?}");
        assert_eq!(memfd_use(name), baseline, "{what}: a descriptor or mapping was left behind");
        assert_eq!(backend.memory().table().collect::<Vec<_>>(), [good(0, 0x7000_0000)]);
    }
    // Descriptors that are not files.
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    let kinds = [
        (OwnedFd::from(sock), FileKind::Socket),
        (OwnedFd::from(pipe_r), FileKind::Fifo),
        (OwnedFd::from(std::fs::File::open("/dev/null").unwrap()), FileKind::CharDevice),
        (OwnedFd::from(std::fs::File::open("/tmp").unwrap()), FileKind::Directory),
    ];
    for (f, kind) in kinds {
        match backend.set_mem_table(&[good(0, 0)], vec![f]) {
            Err(TableError::NotAFile { region: 0, kind: k }) => assert_eq!(k, kind),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
    // A regular file of the wrong size.
    let small = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    small.set_len(0x8000).unwrap();
    assert!(matches!(
        backend.set_mem_table(&[good(0, 0)], vec![small.into()]),
        Err(TableError::FileTooShort { file_size: 0x8000, .. })
    ));
    // 10^6 regions: refused before anything is looked at (or allocated).
    let million = vec![good(0, 0); 1_000_000];
    assert!(matches!(
        backend.set_mem_table(&million, Vec::new()),
        Err(TableError::TooManyRegions { count: 1_000_000, .. })
    ));
    // Hot-plugged regions: overlapping the table, over the limit.
    assert!(matches!(
        backend.add_region(&good(0x8000, 0x9000_0000), fd()),
        Err(TableError::GuestOverlap { .. })
    ));
    assert!(matches!(
        backend.add_region(&good(0x10_0000, 0x7000_8000), fd()),
        Err(TableError::UserOverlap { .. })
    ));
    let small_backend = BackendMemory::with_max_regions(1).unwrap();
    small_backend.add_region(&good(0, 0), fd()).unwrap();
    assert!(matches!(
        small_backend.add_region(&good(1 << 20, 1 << 20), fd()),
        Err(TableError::TooManyRegions { .. })
    ));
    drop(small_backend);
    assert_eq!(memfd_use(name), baseline);

    // Logs.
    let log_name = "refused-log";
    let sealed = |len| {
        let f = memfd(log_name, len);
        guestmem::sys::fd::add_seals(f.as_fd(), Seals::SHRINK).unwrap();
        f
    };
    let log = |fd: OwnedFd, size, offset| backend.set_log_base(fd, &LogDesc { size, offset }).unwrap_err();
    let read_only = {
        let f = sealed(8192);
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        OwnedFd::from(std::fs::File::open(path).unwrap())
    };
    let log_checks: Vec<(LogError, &str)> = vec![
        (log(memfd(log_name, 8192), 8192, 0), "Unsealed"),
        (log(sealed(4096), 8192, 0), "FileTooShort"),
        (log(sealed(8192), 4096, 4096 + 8), "Unaligned"),
        (log(sealed(8192), 4, 0), "TooSmall"),
        (log(sealed(8192), MAX_LOG_BYTES + 8, 0), "TooLarge"),
        (log(sealed(8192), 8192, u64::MAX - 4095), "FileTooShort"),
        (log(read_only, 8192, 0), "Os"),
        (log(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()), 8, 0), "NotAFile"),
        (
            log(
                {
                    let f = sealed(8192);
                    guestmem::sys::fd::add_seals(f.as_fd(), Seals::WRITE).unwrap();
                    f
                },
                8192,
                0,
            ),
            "WriteSealed",
        ),
    ];
    for (e, what) in &log_checks {
        assert!(format!("{e:?}").starts_with(what), "{what}: {e:?}");
        assert_eq!(memfd_use(log_name), (0, 0), "{what}: the log's descriptor or mapping was kept");
        assert!(!backend.log().is_logging());
    }
    // A log smaller than the memory; then, with a log attached, a region past it.
    backend.add_region(&good(4 << 20, 0x9000_0000), fd()).unwrap();
    assert!(matches!(log(sealed(8), 8, 0), LogError::DoesNotCover { covers: 0x4_0000, .. }));
    backend.set_log_base(sealed(8), &LogDesc { size: 16, offset: 0 }).unwrap_err();
    // 24 words of 64 pages: 6 MiB.
    backend.set_log_base(sealed(4096), &LogDesc { size: 192, offset: 0 }).unwrap();
    assert_eq!(backend.log().covers(), 6 << 20);
    assert!(matches!(
        backend.add_region(&good(6 << 20, 0xa000_0000), fd()),
        Err(TableError::OutsideLog { covers: 0x60_0000, .. })
    ));
    assert!(matches!(
        backend.set_mem_table(&[good(6 << 20, 0)], vec![fd()]),
        Err(TableError::OutsideLog { region: 0, .. })
    ));
    // A refused log leaves the attached one in use.
    let _ = log(sealed(4096), 4096, 1);
    assert_eq!(backend.log().covers(), 6 << 20);
    assert_eq!(memfd_use(log_name), (1, 1));
    backend.clear_log_base();
    assert_eq!(memfd_use(log_name), (0, 0));
}

/// Hotplug through `GuestMemoryAtomic`: a device's snapshot keeps the memory it was taken of
/// (a removed region stays mapped until the snapshot goes), new snapshots see the change, and
/// user addresses translate both ways.
#[test]
fn hotplug_snapshots_and_user_translation() {
    let backend = BackendMemory::new().unwrap();
    let r = |guest_addr, user_addr, size| MemoryRegionDesc { guest_addr, size, user_addr, mmap_offset: 0 };
    backend
        .set_mem_table(
            &[r(0, 0x7f00_0000_0000, MIB), r(2 * MIB, 0x7e00_0000_0000, MIB)],
            vec![memfd("hot0", MIB), memfd("hot1", MIB)],
        )
        .unwrap();
    let mut cache = backend.atomic().cache();
    let old = backend.memory();
    backend.add_region(&r(1 << 32, 0x7d00_0000_0000, 2 * MIB), memfd("hot2", 2 * MIB)).unwrap();
    assert_eq!((old.num_regions(), backend.memory().num_regions(), cache.memory().num_regions()), (2, 3, 3));
    let mem = backend.memory();
    assert_eq!(mem.user_to_guest(0x7d00_0000_0010), Some(GuestAddress((1 << 32) + 0x10)));
    assert_eq!(mem.guest_to_user(GuestAddress(2 * MIB + 5)), Some(0x7e00_0000_0005));
    assert_eq!(mem.guest_to_user(GuestAddress(MIB)), None);
    assert_eq!(mem.user_to_guest(0x7f00_0000_0000 + MIB), None);
    assert!(matches!(
        mem.user_range_to_guest(0x7e00_0000_0000, MIB + 1),
        Err(TableError::UserAddress { .. })
    ));
    mem.user_slice(0x7d00_0000_0000 + 8, 8).unwrap().write_obj(0xfeedu64, 0).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress((1 << 32) + 8)).unwrap(), 0xfeed);
    // Removing: the description must match (guest address, user address, size).
    assert!(matches!(
        backend.remove_region(&r(1 << 32, 0x7d00_0000_1000, 2 * MIB)),
        Err(TableError::NoSuchRegion { .. })
    ));
    assert!(matches!(
        backend.remove_region(&r(1 << 32, 0x7d00_0000_0000, MIB)),
        Err(TableError::NoSuchRegion { .. })
    ));
    let held = backend.memory();
    backend.remove_region(&r(1 << 32, 0x7d00_0000_0000, 2 * MIB)).unwrap();
    assert_eq!(memfd_use("hot2"), (1, 1)); // still held by a snapshot
    assert_eq!(held.read_obj::<u64>(GuestAddress((1 << 32) + 8)).unwrap(), 0xfeed);
    drop((held, mem));
    assert_eq!(cache.memory().num_regions(), 2);
    assert_eq!(memfd_use("hot2"), (0, 0));
    assert_eq!(old.num_regions(), 2);
}

/// A vhost-user IOTLB update names user addresses: across two regions adjacent in the
/// front-end's address space but not in guest memory, it becomes two guest mappings, applied
/// together, and a device reads through them what the front-end wrote.
#[test]
fn iotlb_updates_in_user_addresses() {
    use guestmem::iommu::{Iotlb, Iova, Permissions};
    let backend = BackendMemory::new().unwrap();
    let r = |guest_addr, user_addr| MemoryRegionDesc { guest_addr, size: MIB, user_addr, mmap_offset: 0 };
    let (a, b) = (memfd("iotlb0", MIB), memfd("iotlb1", MIB));
    let vmm_a = a.try_clone().unwrap();
    backend.set_mem_table(&[r(0, 0x7000_0000), r(8 * MIB, 0x7000_0000 + MIB)], vec![a, b]).unwrap();
    let mem = backend.memory();
    mem.write_obj(0x1111u64, GuestAddress(MIB - 8)).unwrap();
    mem.write_obj(0x2222u64, GuestAddress(8 * MIB)).unwrap();
    let entries =
        mem.iotlb_entries(Iova(1 << 40), 0x2000, 0x7000_0000 + MIB - 0x1000, Permissions::READ).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[1].iova, entries[1].guest_addr), (Iova((1 << 40) + 0x1000), GuestAddress(8 * MIB)));
    let iotlb = Iotlb::new();
    iotlb.update_all(&entries).unwrap();
    let snapshot = iotlb.snapshot();
    let view = snapshot.view(&*mem);
    let mut two = [0u64; 2];
    view.read_slice(zerocopy::IntoBytes::as_mut_bytes(&mut two[..]), Iova((1 << 40) + 0xff8)).unwrap();
    assert_eq!(two, [0x1111, 0x2222]);
    // Past the second region, or wrapping: refused.
    assert!(matches!(
        mem.iotlb_entries(Iova(0), 0x2000, 0x7000_0000 + 2 * MIB - 0x1000, Permissions::READ),
        Err(TableError::UserAddress { .. })
    ));
    assert!(mem.iotlb_entries(Iova(0), 0x2000, u64::MAX - 0xfff, Permissions::READ).is_err());
    assert!(mem.iotlb_entries(Iova(0), 0, 0x7000_0000, Permissions::READ).is_err());
    drop(vmm_a);
}

/// A front-end truncates the unsealed file behind a region under the back-end's mapping:
/// guestmem's SIGBUS recovery maps zero pages there, so the device reads zeros instead of
/// dying, and the region says it lost its backing.
#[test]
fn truncated_unsealed_region_is_recovered() {
    common::in_child("truncated_unsealed_region_is_recovered", || {
        let backend = BackendMemory::new().unwrap();
        let f = memfd("truncated", 4 * 4096);
        let ours = f.try_clone().unwrap();
        let desc = MemoryRegionDesc { guest_addr: 0, size: 4 * 4096, user_addr: 0x7000_0000, mmap_offset: 0 };
        backend.set_mem_table(&[desc], vec![f]).unwrap();
        let mem = backend.memory();
        mem.write_obj(7u64, GuestAddress(3 * 4096)).unwrap();
        guestmem::sys::fd::ftruncate(ours.as_fd(), 4096).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(3 * 4096)).unwrap(), 0);
        mem.write_obj(9u64, GuestAddress(3 * 4096)).unwrap();
        assert!(mem.guest().regions()[0].backing_lost());
    });
}

/// A bitmap in 2 MiB pages (a user's type): the log's 4 KiB bits cannot merge into it.
#[derive(Debug)]
struct HugeBitmap(AtomicBitmap);

impl Bitmap for HugeBitmap {
    type Slice<'a> = <AtomicBitmap as Bitmap>::Slice<'a>;
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len)
    }
    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }
    fn slice_at(&self, offset: usize) -> Self::Slice<'_> {
        self.0.slice_at(offset)
    }
}

impl NewBitmap for HugeBitmap {
    fn with_len(len: usize) -> Self {
        HugeBitmap(AtomicBitmap::new(len, 2 << 20).unwrap())
    }
}

impl DirtyHarvest for HugeBitmap {
    fn page_size(&self) -> Result<usize, BitmapError> {
        Ok(self.0.page_size())
    }
    fn num_pages(&self) -> Result<usize, BitmapError> {
        Ok(self.0.num_pages())
    }
    fn dirty_page_count(&self) -> Result<usize, BitmapError> {
        Ok(self.0.dirty_page_count())
    }
    fn take_dirty_words(&self, out: &mut [u64]) -> Result<usize, BitmapError> {
        self.0.take_dirty_words(out)
    }
    fn take_dirty_runs(&self, f: impl FnMut(usize, usize)) -> Result<usize, BitmapError> {
        Ok(self.0.take_dirty_runs(f))
    }
    fn merge_words(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.0.merge_words(words)
    }
    fn restore(&self, words: &[u64]) -> Result<(), BitmapError> {
        self.0.restore(words)
    }
}

#[test]
fn table_error_every_variant() {
    // The last producing call needs a process without address space to spare.
    common::in_child("table_error_every_variant", || {
        let name = |e: &TableError| match e {
            TableError::Payload { .. } => "Payload",
            TableError::TooManyRegions { .. } => "TooManyRegions",
            TableError::FdCount { .. } => "FdCount",
            TableError::ZeroSize { .. } => "ZeroSize",
            TableError::Unaligned { .. } => "Unaligned",
            TableError::Overflow { .. } => "Overflow",
            TableError::NotAFile { .. } => "NotAFile",
            TableError::FileTooShort { .. } => "FileTooShort",
            TableError::GuestOverlap { .. } => "GuestOverlap",
            TableError::UserOverlap { .. } => "UserOverlap",
            TableError::OutsideLog { .. } => "OutsideLog",
            TableError::Map { .. } => "Map",
            TableError::Memory(_) => "Memory",
            TableError::NoSuchRegion { .. } => "NoSuchRegion",
            TableError::UserAddress { .. } => "UserAddress",
            TableError::NotShared { .. } => "NotShared",
            TableError::Log(_) => "Log",
        };
        let b = BackendMemory::new().unwrap();
        let good = MemoryRegionDesc { guest_addr: 0, size: 0x10000, user_addr: 0x7000_0000, mmap_offset: 0 };
        let fd = || memfd("variants", 0x10000);
        let anon = GuestRegionMmap::new(MmapRegionBuilder::<()>::new(4096).build().unwrap(), GuestAddress(0))
            .unwrap();
        let dup = fd();
        let mut produced = vec![
            MemoryRegionDesc::parse_single(&[0; 8]).unwrap_err(),
            BackendMemory::with_max_regions(usize::MAX).unwrap_err(),
            b.set_mem_table(&[good], vec![]).unwrap_err(),
            b.set_mem_table(&[MemoryRegionDesc { size: 0, ..good }], vec![fd()]).unwrap_err(),
            b.set_mem_table(&[MemoryRegionDesc { guest_addr: 1, ..good }], vec![fd()]).unwrap_err(),
            b.set_mem_table(&[MemoryRegionDesc { user_addr: !0xfff, ..good }], vec![fd()]).unwrap_err(),
            b.set_mem_table(&[good], vec![std::fs::File::open("/dev/null").unwrap().into()]).unwrap_err(),
            b.set_mem_table(&[good], vec![memfd("variants", 4096)]).unwrap_err(),
            b.set_mem_table(&[good, MemoryRegionDesc { user_addr: 0x8000_0000, ..good }], vec![fd(), fd()])
                .unwrap_err(),
            b.set_mem_table(&[good, MemoryRegionDesc { guest_addr: 1 << 20, ..good }], vec![fd(), fd()])
                .unwrap_err(),
            b.set_mem_table(&[good], {
                let f = fd();
                guestmem::sys::fd::add_seals(f.as_fd(), Seals::WRITE).unwrap();
                vec![f]
            })
            .unwrap_err(),
            b.set_mem_table(
                &[good, MemoryRegionDesc { guest_addr: 1 << 20, user_addr: 1 << 40, ..good }],
                vec![dup.try_clone().unwrap(), dup],
            )
            .unwrap_err(),
            b.remove_region(&good).unwrap_err(),
            MemoryRegionDesc::of_region(&anon).unwrap_err(),
        ];
        b.set_mem_table(&[good], vec![fd()]).unwrap();
        produced.push(b.memory().user_range_to_guest(0, 1).unwrap_err());
        let log = DirtyLog::new(1 << 20).unwrap();
        b.set_log_base(log.fd().try_clone_to_owned().unwrap(), &log.desc()).unwrap();
        // The log's one page covers 128 MiB.
        produced.push(
            b.add_region(&MemoryRegionDesc { guest_addr: 1 << 30, user_addr: 1 << 40, ..good }, fd())
                .unwrap_err(),
        );
        drop((b, log));
        // No address space left for a back-end's log window: the limit is what the process
        // uses now and 1 GiB.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap();
        let limit = libc::rlimit { rlim_cur: (vm_kib << 10) + (1 << 30), rlim_max: libc::RLIM_INFINITY };
        // SAFETY: setrlimit reads the struct we pass; it only lowers this child's limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
        produced.push(BackendMemory::new().unwrap_err());
        common::assert_every_variant(
            &produced,
            name,
            &[
                "Payload",
                "TooManyRegions",
                "FdCount",
                "ZeroSize",
                "Unaligned",
                "Overflow",
                "NotAFile",
                "FileTooShort",
                "GuestOverlap",
                "UserOverlap",
                "OutsideLog",
                "Map",
                "Memory",
                "NoSuchRegion",
                "UserAddress",
                "NotShared",
                "Log",
            ],
            true,
        );
    });
}

#[test]
fn log_error_every_variant() {
    let name = |e: &LogError| match e {
        LogError::Payload { .. } => "Payload",
        LogError::NotAFile { .. } => "NotAFile",
        LogError::Unsealed { .. } => "Unsealed",
        LogError::WriteSealed { .. } => "WriteSealed",
        LogError::Unaligned { .. } => "Unaligned",
        LogError::TooSmall { .. } => "TooSmall",
        LogError::TooLarge { .. } => "TooLarge",
        LogError::FileTooShort { .. } => "FileTooShort",
        LogError::DoesNotCover { .. } => "DoesNotCover",
        LogError::NotTracking { .. } => "NotTracking",
        LogError::PageSize { .. } => "PageSize",
        LogError::RegionOutsideLog { .. } => "RegionOutsideLog",
        LogError::Handover(_) => "Handover",
        LogError::Os { .. } => "Os",
    };
    let b = BackendMemory::new().unwrap();
    let sealed = |len, seals| {
        let f = memfd("log-variants", len);
        guestmem::sys::fd::add_seals(f.as_fd(), seals).unwrap();
        f
    };
    let d = |size, offset| LogDesc { size, offset };
    let read_only = {
        let f = sealed(4096, Seals::SHRINK);
        OwnedFd::from(
            std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).unwrap(),
        )
    };
    let untracked = GuestMemoryMmap::<Option<AtomicBitmap>>::from_regions(vec![GuestRegionMmap::build(
        MmapRegionBuilder::new(4096).dirty_tracking(false),
        GuestAddress(0),
    )
    .unwrap()])
    .unwrap();
    let huge = GuestMemoryMmap::<HugeBitmap>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let far = VmmMemory::from_ranges(&[(GuestAddress(1 << 40), 4096)]).unwrap();
    let small = VmmMemory::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
    let mut log = DirtyLog::new(1 << 20).unwrap();
    b.set_mem_table(
        &[MemoryRegionDesc { guest_addr: 0, size: 4 << 20, user_addr: 0, mmap_offset: 0 }],
        vec![memfd("log-variants-ram", 4 << 20)],
    )
    .unwrap();
    let produced = vec![
        LogDesc::parse(&[0; 15]).unwrap_err(),
        b.set_log_base(std::fs::File::open("/dev/null").unwrap().into(), &d(8, 0)).unwrap_err(),
        b.set_log_base(memfd("log-variants", 4096), &d(4096, 0)).unwrap_err(),
        b.set_log_base(sealed(4096, Seals::SHRINK | Seals::WRITE), &d(4096, 0)).unwrap_err(),
        b.set_log_base(sealed(8192, Seals::SHRINK), &d(8, 12)).unwrap_err(),
        b.set_log_base(sealed(4096, Seals::SHRINK), &d(7, 0)).unwrap_err(),
        b.set_log_base(sealed(4096, Seals::SHRINK), &d(u64::MAX, 0)).unwrap_err(),
        b.set_log_base(sealed(4096, Seals::SHRINK), &d(8192, 0)).unwrap_err(),
        b.set_log_base(sealed(4096, Seals::SHRINK), &d(8, 0)).unwrap_err(),
        log.harvest_into(&untracked).unwrap_err(),
        log.harvest_into(&huge).unwrap_err(),
        log.harvest_into(&far).unwrap_err(),
        log.swap(DirtyLog::new(4096).unwrap(), &small, |_| Err(std::io::Error::other("no reply")))
            .unwrap_err(),
        b.set_log_base(read_only, &d(4096, 0)).unwrap_err(),
    ];
    common::assert_every_variant(
        &produced,
        name,
        &[
            "Payload",
            "NotAFile",
            "Unsealed",
            "WriteSealed",
            "Unaligned",
            "TooSmall",
            "TooLarge",
            "FileTooShort",
            "DoesNotCover",
            "NotTracking",
            "PageSize",
            "RegionOutsideLog",
            "Handover",
            "Os",
        ],
        true,
    );
}
