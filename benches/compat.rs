//! The rust-vmm bridge beside vm-memory's own `GuestMemoryMmap`, in the same run.
//!
//! Each group runs one workload on: `vm-memory` (vm-memory 0.18's `GuestMemoryMmap`, the
//! baseline), `bridge` (guestmem memory through `compat::PermissionView`, what a VMM hands to
//! virtio devices), `drop-in` (`compat::GuestMemoryMmap`) and, where the workload exists in
//! guestmem's own API, `guestmem` (no bridge). 1 MiB of guest memory, no dirty tracking unless
//! the group says `tracked`. Run `cargo bench --features vm-memory --bench compat`, then
//! `scripts/bench-ratios compat --baseline vm-memory`.
//!
//! Workloads: a virtio-queue `pop_descriptor_chain` + `add_used` per one-descriptor chain
//! (batches of a full 256-entry ring, time per chain); `read_obj`/`write_obj`/`load`/`store`
//! of a `u16` (as virtqueue index accesses are) over 1024 addresses; a 4 KiB virtio-queue
//! `Reader`/`Writer` copy out of / into a one-descriptor chain.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use guestmem::bitmap::AtomicBitmap;
use guestmem::compat::{self, PermissionView};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const BUFS: u64 = 0x10_0000 - QSIZE as u64 * 0x1000; // one 4 KiB buffer per descriptor, up to 1 MiB
const ACCESSES: usize = 1024;

/// A ready queue whose every descriptor is a one-descriptor chain of a device-writable 4 KiB
/// buffer, and whose avail ring lists them all in order.
fn queue<M: GuestMemory>(mem: &M) -> Queue {
    for i in 0..QSIZE {
        let desc = Descriptor::new(BUFS + u64::from(i) * 0x1000, 0x1000, VRING_DESC_F_WRITE as u16, 0);
        mem.write_obj(desc, GuestAddress(DESC + 16 * u64::from(i))).unwrap();
        mem.write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i))).unwrap();
    }
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// The driver makes the whole ring available again; the device pops and completes each chain.
fn chains<M: GuestMemory>(mem: &M, q: &mut Queue) {
    let next = q.next_avail();
    mem.store(next.wrapping_add(QSIZE), GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    for _ in 0..QSIZE {
        let chain = q.pop_descriptor_chain(mem).unwrap();
        q.add_used(mem, chain.head_index(), 0).unwrap();
    }
}

/// `ACCESSES` 2-aligned addresses spread over the memory, in a scrambled order.
fn addresses() -> Vec<u64> {
    (0..ACCESSES as u64).map(|i| (i * 0x9e37_79b9 % (MEM as u64 / 2)) * 2).collect()
}

fn bench_chain<M: GuestMemory>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, mem: &M) {
    let mut q = queue(mem);
    g.bench_function(name, |b| b.iter(|| chains(black_box(mem), &mut q)));
}

fn bench_bytes<M: GuestMemory>(c: &mut Criterion, name: &str, mem: &M) {
    let addrs = addresses();
    let mut run = |group: &str, f: &dyn Fn(GuestAddress)| {
        let mut g = c.benchmark_group(format!("compat/{group}"));
        g.throughput(Throughput::Elements(ACCESSES as u64));
        g.bench_function(name, |b| b.iter(|| addrs.iter().for_each(|&a| f(GuestAddress(black_box(a))))));
        g.finish();
    };
    run("read_obj_u16", &|a| {
        black_box(mem.read_obj::<u16>(a).unwrap());
    });
    run("write_obj_u16", &|a| mem.write_obj(a.0 as u16, a).unwrap());
    run("load_u16", &|a| {
        black_box(mem.load::<u16>(a, Ordering::Acquire).unwrap());
    });
    run("store_u16", &|a| mem.store(a.0 as u16, a, Ordering::Release).unwrap());
}

fn bench_copies<M: GuestMemory>(c: &mut Criterion, name: &str, mem: &M) {
    let mut q = queue(mem);
    mem.store(1u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let mut buf = vec![0x5au8; 0x1000];
    let mut g = c.benchmark_group("compat/reader_4k");
    g.throughput(Throughput::Bytes(0x1000));
    g.bench_function(name, |b| {
        b.iter(|| chain.clone().reader(mem).unwrap().read_exact(black_box(&mut buf)).unwrap())
    });
    g.finish();
    let mut g = c.benchmark_group("compat/writer_4k");
    g.throughput(Throughput::Bytes(0x1000));
    g.bench_function(name, |b| {
        b.iter(|| chain.clone().writer(mem).unwrap().write_all(black_box(&buf)).unwrap())
    });
    g.finish();
}

/// guestmem's own API on the same workloads, where it has them: the cost of the bridge.
fn bench_native(c: &mut Criterion, mem: &guestmem::GuestMemoryMmap<()>) {
    use guestmem::{Bytes as _, GuestAddress};
    let addrs = addresses();
    let mut run = |group: &str, f: &dyn Fn(GuestAddress)| {
        let mut g = c.benchmark_group(format!("compat/{group}"));
        g.throughput(Throughput::Elements(ACCESSES as u64));
        g.bench_function("guestmem", |b| {
            b.iter(|| addrs.iter().for_each(|&a| f(GuestAddress(black_box(a)))))
        });
        g.finish();
    };
    run("read_obj_u16", &|a| {
        black_box(mem.read_obj::<u16>(a).unwrap());
    });
    run("write_obj_u16", &|a| mem.write_obj(a.0 as u16, a).unwrap());
    run("load_u16", &|a| {
        black_box(mem.load::<u16>(a, Ordering::Acquire).unwrap());
    });
    run("store_u16", &|a| mem.store(a.0 as u16, a, Ordering::Release).unwrap());
}

fn compat(c: &mut Criterion) {
    let vm = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let native = guestmem::GuestMemoryMmap::<()>::from_ranges(&[(guestmem::GuestAddress(0), MEM)]).unwrap();
    let bridge = PermissionView::new(&native);
    let drop_in = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();

    let mut g = c.benchmark_group("compat/chain");
    g.throughput(Throughput::Elements(u64::from(QSIZE)));
    bench_chain(&mut g, "vm-memory", &vm);
    bench_chain(&mut g, "bridge", bridge);
    bench_chain(&mut g, "drop-in", &drop_in);
    g.finish();

    // The same with dirty tracking on both sides (vm-memory's AtomicBitmap and guestmem's).
    let vm_tracked =
        vm_memory::GuestMemoryMmap::<vm_memory::bitmap::AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM)])
            .unwrap();
    let tracked =
        guestmem::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(guestmem::GuestAddress(0), MEM)]).unwrap();
    let mut g = c.benchmark_group("compat/chain_tracked");
    g.throughput(Throughput::Elements(u64::from(QSIZE)));
    bench_chain(&mut g, "vm-memory", &vm_tracked);
    bench_chain(&mut g, "bridge", PermissionView::new(&tracked));
    g.finish();

    bench_bytes(c, "vm-memory", &vm);
    bench_bytes(c, "bridge", bridge);
    bench_bytes(c, "drop-in", &drop_in);
    bench_native(c, &native);

    bench_copies(c, "vm-memory", &vm);
    bench_copies(c, "bridge", bridge);
    bench_copies(c, "drop-in", &drop_in);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = compat
}
criterion_main!(benches);
