//! The back-end process of the two-process tests: a vhost-user device on guestmem's
//! `BackendMemory`, serving one connection until the front-end closes it. It answers every
//! request that needs a reply with a status (see `proto::status`), so the front-end sees
//! exactly which error a hostile message met.
//!
//! Roles: "honest" plays by the rules; "hostile" attacks the VMM's log (truncates, grows,
//! seals, floods it with bits) and never acknowledges a second log.

#![allow(dead_code)]

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use guestmem::mmap::{Backing, FileOffset, MmapRegionBuilder};
use guestmem::sys::Seals;
use guestmem::vhost_user::{BackendMemory, LogDesc, MemoryRegionDesc, TableError};
use guestmem::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::proto::*;

/// Entries of the test's split virtqueue.
pub const QUEUE: u64 = 8;
/// `VRING_DESC_F_WRITE`: the device writes the buffer.
pub const DESC_F_WRITE: u16 = 2;

/// Bytes of the descriptor table, available ring and used ring of a queue of `QUEUE`.
pub const DESC_BYTES: u64 = 16 * QUEUE;
pub const AVAIL_BYTES: u64 = 4 + 2 * QUEUE;
pub const USED_BYTES: u64 = 4 + 8 * QUEUE;

/// The byte the device fills the buffer of descriptor `head` with.
pub fn pattern(head: u16) -> u8 {
    0x11u8.wrapping_mul(head as u8 + 1)
}

/// The ring's parts, translated from the front-end's user addresses when they arrived.
struct Ring {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Where the used ring is logged, when the front-end asked for it.
    log: Option<GuestAddress>,
    last_avail: u16,
}

fn word(payload: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(payload[at..at + 8].try_into().unwrap())
}

fn one_fd(msg: &mut Msg) -> Result<std::os::fd::OwnedFd, TableError> {
    if msg.fds.len() != 1 {
        return Err(TableError::FdCount { regions: 1, fds: msg.fds.len() });
    }
    Ok(msg.fds.pop().unwrap())
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn memfd_mappings() -> u64 {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("/memfd:")).count()
        as u64
}

/// Serves the connection until the front-end closes it (or sends what this side refuses to
/// read: then the connection is dropped, as a real back-end would).
pub fn serve(conn: Conn, role: &str) {
    let backend = BackendMemory::new().unwrap();
    let mut ring: Option<Ring> = None;
    let mut writer: Option<(Arc<AtomicBool>, JoinHandle<u64>)> = None;
    let mut logs_seen = 0;
    loop {
        let mut msg = match conn.recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(e) => {
                eprintln!("back-end: dropping the connection: {e}");
                break;
            }
        };
        let reply = match msg.request {
            SET_MEM_TABLE => status(
                MemoryRegionDesc::parse_table(&msg.payload)
                    .and_then(|regions| backend.set_mem_table(&regions, std::mem::take(&mut msg.fds)))
                    .map(|()| 0),
            ),
            ADD_MEM_REG => status(
                MemoryRegionDesc::parse_single(&msg.payload)
                    .and_then(|region| backend.add_region(&region, one_fd(&mut msg)?))
                    .map(|()| 0),
            ),
            // A descriptor sent along (as some front-ends do) is closed with `msg`.
            REM_MEM_REG => status(
                MemoryRegionDesc::parse_single(&msg.payload)
                    .and_then(|region| backend.remove_region(&region))
                    .map(|()| 0),
            ),
            SET_LOG_BASE => {
                logs_seen += 1;
                if role == "hostile" {
                    if logs_seen > 1 {
                        // Never acknowledge: the front-end must keep its old log.
                        eprintln!("back-end: hanging up instead of acknowledging log {logs_seen}");
                        break;
                    }
                    status(attack_log(&mut msg))
                } else {
                    let fd = match one_fd(&mut msg) {
                        Ok(fd) => fd,
                        Err(e) => {
                            conn.reply(msg.request, &status::<TableError>(Err(e))).unwrap();
                            continue;
                        }
                    };
                    // The reply goes out only once the log is attached: the front-end may then
                    // harvest and free the old one.
                    status(
                        LogDesc::parse(&msg.payload)
                            .and_then(|log| backend.set_log_base(fd, &log))
                            .map(|()| 0),
                    )
                }
            }
            SET_FEATURES => {
                if word(&msg.payload, 0) & VHOST_F_LOG_ALL == 0 {
                    backend.clear_log_base();
                }
                status::<()>(Ok(0))
            }
            SET_VRING_ADDR => {
                let flags = u32::from_ne_bytes(msg.payload[4..8].try_into().unwrap());
                let (desc, used, avail, log) = (
                    word(&msg.payload, 8),
                    word(&msg.payload, 16),
                    word(&msg.payload, 24),
                    word(&msg.payload, 32),
                );
                let mem = backend.memory();
                let r = (|| {
                    Ok::<_, TableError>(Ring {
                        desc: mem.user_range_to_guest(desc, DESC_BYTES)?,
                        avail: mem.user_range_to_guest(avail, AVAIL_BYTES)?,
                        used: mem.user_range_to_guest(used, USED_BYTES)?,
                        log: (flags & VRING_F_LOG != 0).then_some(GuestAddress(log)),
                        last_avail: 0,
                    })
                })();
                status(r.map(|r| {
                    ring = Some(r);
                    0
                }))
            }
            T_PROCESS_RING => status(process_ring(&backend, ring.as_mut().expect("no ring"))),
            T_START_WRITER => {
                let stop = Arc::new(AtomicBool::new(false));
                let once = msg.payload.len() == 8 && word(&msg.payload, 0) == WRITE_EVERY_PAGE_ONCE;
                let handle =
                    if once { spawn_sweeper(&backend) } else { spawn_writer(&backend, stop.clone()) };
                writer = Some((stop, handle));
                status::<()>(Ok(0))
            }
            T_STOP_WRITER => {
                let (stop, handle) = writer.take().expect("no writer");
                stop.store(true, Ordering::Relaxed);
                status::<()>(Ok(handle.join().unwrap()))
            }
            T_OPEN_FDS => status::<()>(Ok(open_fds())),
            T_MEMFD_MAPPINGS => status::<()>(Ok(memfd_mappings())),
            T_REGIONS => status::<()>(Ok(backend.memory().num_regions() as u64)),
            other => status::<String>(Err(format!("unknown request {other}"))),
        };
        conn.reply(msg.request, &reply).unwrap();
    }
    if let Some((stop, handle)) = writer {
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }
}

/// Serves the available buffers: fills each device-writable buffer with its pattern through
/// guest memory (logged), and publishes it in the used ring (logged as well).
fn process_ring(backend: &BackendMemory, ring: &mut Ring) -> Result<u64, String> {
    let mem = backend.memory();
    let e = |e: guestmem::GuestMemoryError| e.to_string();
    let avail_idx: u16 = mem.load(ring.avail.unchecked(2), Ordering::Acquire).map_err(e)?;
    let mut used_idx: u16 = mem.load(ring.used.unchecked(2), Ordering::Acquire).map_err(e)?;
    let mut served = 0;
    while ring.last_avail != avail_idx {
        let slot = u64::from(ring.last_avail) % QUEUE;
        let head: u16 = mem.read_obj(ring.avail.unchecked(4 + 2 * slot)).map_err(e)?;
        let d = ring.desc.unchecked(16 * (u64::from(head) % QUEUE));
        let addr: u64 = mem.read_obj(d).map_err(e)?;
        let len: u32 = mem.read_obj(d.unchecked(8)).map_err(e)?;
        let flags: u16 = mem.read_obj(d.unchecked(12)).map_err(e)?;
        if flags & DESC_F_WRITE != 0 {
            mem.write_slice(&vec![pattern(head); len as usize], GuestAddress(addr)).map_err(e)?;
        }
        let elem = ring.used.unchecked(4 + 8 * (u64::from(used_idx) % QUEUE));
        mem.write_obj(u32::from(head), elem).map_err(e)?;
        mem.write_obj(len, elem.unchecked(4)).map_err(e)?;
        used_idx = used_idx.wrapping_add(1);
        mem.store(used_idx, ring.used.unchecked(2), Ordering::Release).map_err(e)?;
        ring.last_avail = ring.last_avail.wrapping_add(1);
        served += 1;
    }
    // A used ring logged elsewhere than where it lives (the spec allows it): mark that too.
    if let Some(log) = ring.log.filter(|&l| l != ring.used) {
        backend.log().mark(log, USED_BYTES);
    }
    Ok(served)
}

/// A thread that keeps writing 8-byte values with a running count to pseudo-random places of
/// whatever memory is current (hot-plugged regions included), until `stop`; returns how many
/// writes it made.
fn spawn_writer(backend: &BackendMemory, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let atomic = backend.atomic().clone();
    std::thread::spawn(move || {
        let mut cache = atomic.cache();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mem = cache.memory();
            let n = mem.num_regions() as u64;
            if n == 0 {
                std::thread::yield_now();
                continue;
            }
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let region = mem.iter().nth((x % n) as usize).unwrap();
                let offset = (x >> 20) % (region.len() / 8) * 8;
                mem.write_obj(seq, region.start_addr().unchecked(offset)).unwrap();
                seq += 1;
            }
        }
        seq
    })
}

/// `T_START_WRITER`'s payload for a thread that writes every page once, then [`DONE`] at
/// [`DONE_FLAG`].
pub const WRITE_EVERY_PAGE_ONCE: u64 = 1;
/// Where the sweeper says it is done (the last 8 bytes of guest page 0), and what it writes.
pub const DONE_FLAG: u64 = 4096 - 8;
pub const DONE: u64 = 0xd09e_d09e_d09e_d09e;

/// A thread that writes every page of the memory once, in order, slowly (so that the
/// front-end's log swaps fall between its writes), then the done flag; returns its writes.
fn spawn_sweeper(backend: &BackendMemory) -> JoinHandle<u64> {
    let atomic = backend.atomic().clone();
    std::thread::spawn(move || {
        let mem = atomic.memory();
        let mut writes = 0;
        for region in mem.iter() {
            for page in (0..region.len()).step_by(4096) {
                let addr = region.start_addr().unchecked(page);
                mem.write_obj(addr.0 | 1, addr.unchecked(8 * (page / 4096 % 500))).unwrap();
                writes += 1;
                for _ in 0..300 {
                    std::hint::spin_loop();
                }
            }
        }
        mem.store(DONE, GuestAddress(DONE_FLAG), Ordering::Release).unwrap();
        writes + 1
    })
}

/// The hostile back-end's attack on the VMM's log: it tries to shrink, grow and write-seal the
/// file, then sets every bit of it. Returns the bits it set.
fn attack_log(msg: &mut Msg) -> Result<u64, String> {
    let fd = one_fd(msg).map_err(|e| e.to_string())?;
    let log = LogDesc::parse(&msg.payload).map_err(|e| e.to_string())?;
    let refused = |r: std::io::Result<()>| r.is_err();
    assert!(refused(guestmem::sys::fd::ftruncate(fd.as_fd(), 0)), "the log could be shrunk");
    assert!(refused(guestmem::sys::fd::ftruncate(fd.as_fd(), log.size * 2)), "the log could be grown");
    assert!(refused(guestmem::sys::fd::add_seals(fd.as_fd(), Seals::WRITE)), "the log could be sealed");
    let file = FileOffset::new(std::fs::File::from(fd), 0);
    let map = MmapRegionBuilder::<()>::new(log.size as usize)
        .backing(Backing::File { file, shared: true })
        .build()
        .map_err(|e| e.to_string())?;
    map.as_volatile_slice().fill(0xff).map_err(|e| e.to_string())?;
    Ok(log.size * 8)
}

/// `GuestAddress + offset` where the test knows it cannot wrap.
trait Unchecked {
    fn unchecked(self, offset: u64) -> GuestAddress;
}

impl Unchecked for GuestAddress {
    fn unchecked(self, offset: u64) -> GuestAddress {
        GuestAddress(self.0 + offset)
    }
}
