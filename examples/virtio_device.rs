//! A virtio-console-like device built on virtio-queue, running on guestmem memory through the
//! rust-vmm bridge (`guestmem::compat`), with guestmem's dirty harvest checked to be exactly the
//! pages the device wrote.
//!
//! - Guest RAM is a memfd. The device's mapping is a `guestmem::GuestMemoryMmap<AtomicBitmap>`,
//!   handed to virtio-queue as a `compat::PermissionView`. The "driver" (a thread playing the
//!   guest) maps the same memfd separately, so its writes are not in the device's bitmap, as a
//!   guest's writes through KVM are not.
//! - Two split virtqueues: `tx` (driver to device) and `rx` (device to driver). The device
//!   copies each tx chain into a host socket with virtio-queue's `Reader`, reads the host's
//!   answer back (the host upper-cases what it gets) and writes it into an rx chain with a
//!   `Writer`, then completes both chains with `add_used`.
//! - At the end, guestmem's harvest must be exactly: the two used rings' pages and the pages of
//!   the rx buffers the device wrote; the driver checks every answer byte for byte.
//!
//! Run: `cargo run --features vm-memory --example virtio_device`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use guestmem::bitmap::AtomicBitmap;
use guestmem::compat::PermissionView;
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::{GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const RAM: usize = 4 << 20;
const PAGE: u64 = 4096;
const QSIZE: u16 = 16;
const MESSAGES: usize = 64;
/// Each rx buffer spans two pages and starts mid-page, so a short answer dirties one page and a
/// long one two.
const RX_BUF_LEN: u32 = 0x1800;

/// Where one virtqueue lives in guest memory.
#[derive(Clone, Copy)]
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
    /// Buffer `i` is at `bufs + i * stride`.
    bufs: u64,
    stride: u64,
}

const RX: Rings = Rings { desc: 0x1000, avail: 0x2000, used: 0x3000, bufs: 0x20_0800, stride: 0x4000 };
const TX: Rings = Rings { desc: 0x4000, avail: 0x5000, used: 0x6000, bufs: 0x10_0000, stride: 0x2000 };

/// The device's side of a queue: virtio-queue's `Queue` over those rings.
fn device_queue<M: GuestMemory>(mem: &M, rings: Rings) -> Queue {
    let mut q = Queue::new(QSIZE).expect("queue size");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(rings.desc as u32), Some(0));
    q.set_avail_ring_address(Some(rings.avail as u32), Some(0));
    q.set_used_ring_address(Some(rings.used as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem), "rings outside guest memory");
    q
}

/// The guest's driver: offers rx buffers, sends messages on tx, checks each answer.
struct Driver<'a, M> {
    mem: &'a M,
    tx_avail: u16,
    rx_avail: u16,
    rx_used_seen: u16,
}

impl<'a, M: GuestMemory> Driver<'a, M> {
    /// Puts descriptor `i` of `rings` (one buffer, `len` bytes) in the avail ring.
    fn offer(&self, rings: Rings, i: u16, len: u32, device_writes: bool, avail_idx: u16) {
        let flags = if device_writes { VRING_DESC_F_WRITE as u16 } else { 0 };
        let addr = rings.bufs + u64::from(i) * rings.stride;
        let m = self.mem;
        m.write_obj(Descriptor::new(addr, len, flags, 0), GuestAddress(rings.desc + 16 * u64::from(i)))
            .unwrap();
        m.write_obj(i, GuestAddress(rings.avail + 4 + 2 * u64::from(avail_idx % QSIZE))).unwrap();
        // The ring entry must be visible before the index that publishes it.
        m.store(avail_idx.wrapping_add(1), GuestAddress(rings.avail + 2), Ordering::Release).unwrap();
    }

    fn send(&mut self, msg: &[u8]) {
        let i = self.tx_avail % QSIZE;
        self.mem.write_slice(msg, GuestAddress(TX.bufs + u64::from(i) * TX.stride)).unwrap();
        self.offer(TX, i, msg.len() as u32, false, self.tx_avail);
        self.tx_avail = self.tx_avail.wrapping_add(1);
    }

    /// The next used rx element (buffer id, length) and its bytes, once the device has
    /// published it.
    fn receive(&mut self) -> Option<((u16, u32), Vec<u8>)> {
        let used_idx: u16 = self.mem.load(GuestAddress(RX.used + 2), Ordering::Acquire).unwrap();
        if used_idx == self.rx_used_seen {
            return None;
        }
        let slot = u64::from(self.rx_used_seen % QSIZE);
        // A used element is `{ id: le32, len: le32 }`.
        let id: u32 = self.mem.read_obj(GuestAddress(RX.used + 4 + 8 * slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(RX.used + 8 + 8 * slot)).unwrap();
        let id = u16::try_from(id).expect("a descriptor index");
        self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(RX.bufs + u64::from(id) * RX.stride)).unwrap();
        // The buffer goes back to the device.
        self.offer(RX, id, RX_BUF_LEN, true, self.rx_avail);
        self.rx_avail = self.rx_avail.wrapping_add(1);
        Some(((id, len), data))
    }
}

/// The message the driver sends `n`-th: lengths from 1 byte to most of an rx buffer.
fn message(n: usize) -> Vec<u8> {
    let len = 1 + (n * 977) % (RX_BUF_LEN as usize - 1);
    (0..len).map(|i| b"virtio over guestmem "[(n + i) % 21]).collect()
}

/// The device: moves each tx chain to the host socket and the host's answer into an rx chain.
fn device<M: GuestMemory>(
    mem: &M,
    host: &mut UnixStream,
    kicks: mpsc::Receiver<()>,
    irq: mpsc::Sender<()>,
) -> usize {
    let mut tx = device_queue(mem, TX);
    let mut rx = device_queue(mem, RX);
    let mut moved = 0;
    while kicks.recv().is_ok() {
        while let Some(chain) = tx.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut reader = chain.reader(mem).expect("tx chain");
            let mut bytes = vec![0u8; reader.available_bytes()];
            reader.read_exact(&mut bytes).expect("tx read");
            host.write_all(&bytes).expect("host write");
            tx.add_used(mem, head, 0).expect("tx used");

            let mut answer = vec![0u8; bytes.len()];
            host.read_exact(&mut answer).expect("host read");
            let chain = rx.pop_descriptor_chain(mem).expect("the driver keeps rx buffers available");
            let head = chain.head_index();
            let mut writer = chain.writer(mem).expect("rx chain");
            writer.write_all(&answer).expect("rx write");
            rx.add_used(mem, head, answer.len() as u32).expect("rx used");
            moved += answer.len();
            irq.send(()).expect("driver gone");
        }
    }
    moved
}

fn main() {
    // Guest RAM: one memfd, mapped twice.
    let backing = Backing::Memfd(MemfdOptions::new("virtio-guest-ram"));
    let mapping = MmapRegionBuilder::<AtomicBitmap>::new(RAM).backing(backing).build().expect("map RAM");
    let region = GuestRegionMmap::new(mapping, guestmem::GuestAddress(0)).unwrap();
    let file = region.file_offset().cloned().expect("a memfd region has its file");
    let device_mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let driver_mem =
        GuestMemoryMmap::<()>::from_ranges_with_files([(guestmem::GuestAddress(0), RAM, Some(file))])
            .unwrap();

    let (mut host_end, mut device_end) = UnixStream::pair().expect("socketpair");
    let (kick, kicks) = mpsc::channel();
    let (irq, irqs) = mpsc::channel();

    let host = std::thread::spawn(move || {
        // The host end of the console: answers every byte upper-cased.
        let mut buf = [0u8; 4096];
        loop {
            match host_end.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => host_end.write_all(&buf[..n].to_ascii_uppercase()).expect("device end closed"),
            }
        }
    });

    let (written, moved) = std::thread::scope(|s| {
        let (device_mem, driver_mem, device_end) = (&device_mem, &driver_mem, &mut device_end);
        let dev = s.spawn(move || device(PermissionView::new(device_mem), device_end, kicks, irq));
        let driver = s.spawn(move || {
            let mut d =
                Driver { mem: PermissionView::new(driver_mem), tx_avail: 0, rx_avail: 0, rx_used_seen: 0 };
            for i in 0..QSIZE {
                d.offer(RX, i, RX_BUF_LEN, true, d.rx_avail);
                d.rx_avail += 1;
            }
            let mut written = BTreeSet::new();
            for n in 0..MESSAGES {
                let msg = message(n);
                d.send(&msg);
                kick.send(()).expect("device gone");
                irqs.recv_timeout(Duration::from_secs(10)).expect("the device did not answer");
                let ((id, len), data) = d.receive().expect("an interrupt with no used rx element");
                assert_eq!(data, msg.to_ascii_uppercase(), "answer {n}");
                let start = RX.bufs + u64::from(id) * RX.stride;
                written.extend((start / PAGE)..(start + u64::from(len)).div_ceil(PAGE));
            }
            drop(kick); // the device stops
            written
        });
        (driver.join().expect("driver panicked"), dev.join().expect("device panicked"))
    });
    drop(device_end);
    host.join().unwrap();

    // What the device wrote, by guestmem's harvest, against what it must have written.
    let mut dirty = BTreeSet::new();
    let pages = device_mem
        .take_dirty_ranges(|addr, len| dirty.extend((addr.0 / PAGE)..(addr.0 + len).div_ceil(PAGE)))
        .expect("tracked memory");
    let mut expected: BTreeSet<u64> = [RX.used / PAGE, TX.used / PAGE].into();
    expected.extend(&written);
    println!("{MESSAGES} messages echoed through virtio-queue on guestmem memory: {moved} bytes each way");
    println!(
        "dirty harvest: {pages} pages = 2 used-ring pages + {} rx buffer pages the device wrote",
        written.len()
    );
    assert_eq!(dirty, expected, "the harvest is not exactly the pages the device wrote");
    println!("VERIFIED: every answer matched, and the harvest is exactly the device's writes");
}
