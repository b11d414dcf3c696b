//! The rust-vmm bridge beside vm-memory's own `GuestMemoryMmap`, in the same run.
//!
//! Each group runs one workload on: `vm-memory` (vm-memory 0.18's `GuestMemoryMmap`, the
//! baseline), `bridge` (guestmem memory through `compat::PermissionView`, what a VMM hands to
//! virtio devices), `drop-in` (`compat::GuestMemoryMmap`) and, where the workload exists in
//! guestmem's own API, `guestmem` (no bridge). 2 MiB of guest memory (the rings and 1 MiB of u16
//! accesses in the first MiB, the 256 4 KiB buffers in the second), no dirty tracking unless
//! the group says `tracked`. Run `cargo bench --features vm-memory --bench compat`, then
//! `scripts/bench-ratios compat --baseline vm-memory`. After criterion, the same run prints a
//! paired table (`paired ...` lines): the implementations timed back to back in rounds, with
//! the median of per-round ratios, which a busy shared machine disturbs much less.
//!
//! Workloads: a virtio-queue `pop_descriptor_chain` + `add_used` per one-descriptor chain
//! (batches of a full 256-entry ring, time per chain); `read_obj`/`write_obj`/`load`/`store`
//! of a `u16` (as virtqueue index accesses are) over 1024 addresses; a 4 KiB virtio-queue
//! `Reader`/`Writer` copy out of / into a one-descriptor chain.

use std::cell::RefCell;
use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use guestmem::bitmap::AtomicBitmap;
use guestmem::compat::{self, PermissionView};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const MEM: usize = 2 << 20;
/// The u16 accesses stay in the first MiB.
const WORKING_SET: u64 = 1 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const BUFS: u64 = 0x10_0000; // one 4 KiB buffer per descriptor, in the second MiB
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
    (0..ACCESSES as u64).map(|i| (i * 0x9e37_79b9 % (WORKING_SET / 2)) * 2).collect()
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

/// `buf` is the same host buffer for every implementation (same cache sets, same 4 KiB aliasing).
fn bench_copies<M: GuestMemory>(c: &mut Criterion, name: &str, mem: &M, buf: &mut [u8]) {
    let mut q = queue(mem);
    // Descriptor 0 becomes device-readable (what a `Reader` consumes); descriptor 1 stays
    // device-writable (for the `Writer`).
    mem.write_obj(Descriptor::new(BUFS, 0x1000, 0, 0), GuestAddress(DESC)).unwrap();
    mem.store(2u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
    let readable = q.pop_descriptor_chain(mem).unwrap();
    let writable = q.pop_descriptor_chain(mem).unwrap();
    let mut g = c.benchmark_group("compat/reader_4k");
    g.throughput(Throughput::Bytes(0x1000));
    g.bench_function(name, |b| {
        b.iter(|| readable.clone().reader(mem).unwrap().read_exact(black_box(&mut *buf)).unwrap())
    });
    g.finish();
    let mut g = c.benchmark_group("compat/writer_4k");
    g.throughput(Throughput::Bytes(0x1000));
    g.bench_function(name, |b| {
        b.iter(|| writable.clone().writer(mem).unwrap().write_all(black_box(&*buf)).unwrap())
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

    let mut buf = vec![0x5au8; 0x1000];
    bench_copies(c, "vm-memory", &vm, &mut buf);
    bench_copies(c, "bridge", bridge, &mut buf);
    bench_copies(c, "drop-in", &drop_in, &mut buf);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = compat
}

/// One implementation of a workload for the paired table: runs the workload `n` times.
type Run<'a> = (&'static str, Box<dyn FnMut(u64) + 'a>);

/// Times `impls` in rounds, each round running every implementation once back to back (in a
/// rotating order), and prints per implementation the median time per operation and the median
/// of its per-round ratio to the first one. On a shared machine, load that comes and goes
/// moves all of a round's numbers together, so these ratios are steadier than ratios of
/// medians taken minutes apart.
fn paired(name: &str, ops_per_run: u64, mut impls: Vec<Run<'_>>) {
    const ROUNDS: usize = 101;
    let n = impls.len();
    // Calibrate: about 2 ms per measurement for the baseline.
    let mut iters = 1u64;
    loop {
        let start = std::time::Instant::now();
        (impls[0].1)(iters);
        if start.elapsed() > Duration::from_millis(2) || iters > 1 << 30 {
            break;
        }
        iters *= 2;
    }
    let mut times = vec![Vec::with_capacity(ROUNDS); n];
    for round in 0..ROUNDS {
        for k in 0..n {
            let i = (round + k) % n;
            let start = std::time::Instant::now();
            (impls[i].1)(iters);
            times[i].push(start.elapsed().as_secs_f64() * 1e9 / (iters * ops_per_run) as f64);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for i in 0..n {
        let ratios = times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect();
        println!(
            "paired {name:16} {:10} {:9.2} ns/op  ratio {:.3}",
            impls[i].0,
            median(times[i].clone()),
            median(ratios)
        );
    }
}

fn paired_table() {
    let vm = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let native = guestmem::GuestMemoryMmap::<()>::from_ranges(&[(guestmem::GuestAddress(0), MEM)]).unwrap();
    let bridge = PermissionView::new(&native);
    let drop_in = compat::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let vm_tracked =
        vm_memory::GuestMemoryMmap::<vm_memory::bitmap::AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM)])
            .unwrap();
    let tracked =
        guestmem::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(guestmem::GuestAddress(0), MEM)]).unwrap();

    fn chain_run<'a, M: GuestMemory>(name: &'static str, mem: &'a M) -> Run<'a> {
        let mut q = queue(mem);
        (name, Box::new(move |n| (0..n).for_each(|_| chains(black_box(mem), &mut q))))
    }
    paired(
        "chain",
        u64::from(QSIZE),
        vec![chain_run("vm-memory", &vm), chain_run("bridge", bridge), chain_run("drop-in", &drop_in)],
    );
    paired(
        "chain_tracked",
        u64::from(QSIZE),
        vec![chain_run("vm-memory", &vm_tracked), chain_run("bridge", PermissionView::new(&tracked))],
    );

    let addrs = addresses();
    let addrs = &addrs;
    // Each row also runs guestmem's own `Bytes` on the same memory: the cost of the bridge.
    macro_rules! bytes_row {
        ($name:expr, |$m:ident, $a:ident| $body:expr) => {{
            fn run<'a, M: GuestMemory>(name: &'static str, $m: &'a M, addrs: &'a [u64]) -> Run<'a> {
                (
                    name,
                    Box::new(move |n| {
                        (0..n).for_each(|_| {
                            addrs.iter().for_each(|&a| {
                                let $a = GuestAddress(black_box(a));
                                black_box($body);
                            })
                        })
                    }),
                )
            }
            fn run_native<'a>($m: &'a guestmem::GuestMemoryMmap<()>, addrs: &'a [u64]) -> Run<'a> {
                use guestmem::{Bytes as _, GuestAddress};
                (
                    "guestmem",
                    Box::new(move |n| {
                        (0..n).for_each(|_| {
                            addrs.iter().for_each(|&a| {
                                let $a = GuestAddress(black_box(a));
                                black_box($body);
                            })
                        })
                    }),
                )
            }
            paired(
                $name,
                ACCESSES as u64,
                vec![
                    run("vm-memory", &vm, addrs),
                    run("bridge", bridge, addrs),
                    run("drop-in", &drop_in, addrs),
                    run_native(&native, addrs),
                ],
            );
        }};
    }
    bytes_row!("read_obj_u16", |m, a| m.read_obj::<u16>(a).unwrap());
    bytes_row!("write_obj_u16", |m, a| m.write_obj(a.0 as u16, a).unwrap());
    bytes_row!("load_u16", |m, a| m.load::<u16>(a, Ordering::Acquire).unwrap());
    bytes_row!("store_u16", |m, a| m.store(a.0 as u16, a, Ordering::Release).unwrap());

    /// The host buffers are shared by every implementation, so that all copy between the
    /// same host addresses (cache set and 4 KiB aliasing effects are the same for all).
    fn copy_runs<'a, M: GuestMemory>(
        name: &'static str,
        mem: &'a M,
        host: &'a RefCell<Vec<u8>>,
    ) -> (Run<'a>, Run<'a>) {
        let mut q = queue(mem);
        mem.write_obj(Descriptor::new(BUFS, 0x1000, 0, 0), GuestAddress(DESC)).unwrap();
        mem.store(2u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
        let readable = q.pop_descriptor_chain(mem).unwrap();
        let writable = q.pop_descriptor_chain(mem).unwrap();
        let read = move |n| {
            let mut buf = host.borrow_mut();
            (0..n).for_each(|_| {
                readable.clone().reader(mem).unwrap().read_exact(black_box(&mut buf[..])).unwrap()
            })
        };
        let write = move |n| {
            let buf = host.borrow();
            (0..n).for_each(|_| writable.clone().writer(mem).unwrap().write_all(black_box(&buf[..])).unwrap())
        };
        ((name, Box::new(read)), (name, Box::new(write)))
    }
    let host = RefCell::new(vec![0x5au8; 0x1000]);
    let (vr, vw) = copy_runs("vm-memory", &vm, &host);
    let (br, bw) = copy_runs("bridge", bridge, &host);
    let (dr, dw) = copy_runs("drop-in", &drop_in, &host);
    paired("reader_4k", 1, vec![vr, br, dr]);
    paired("writer_4k", 1, vec![vw, bw, dw]);
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // The paired table only in a real bench run (`cargo bench`), not in `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") {
        paired_table();
    }
}
