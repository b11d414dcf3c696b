//! guestmem's IOTLB through vm-memory's IOMMU traits beside vm-memory's own `IommuMemory`, in
//! the same run (feature `vm-memory-iommu`).
//!
//! Each group runs one workload, by IOVA, through: `vm-memory` (vm-memory 0.18's
//! `IommuMemory` over its `GuestMemoryMmap`, with its own `Iotlb` behind an `RwLock`: the
//! baseline), `face` (the same `IommuMemory` over the bridge's memory and
//! `compat::IommuFace`), and `view` (`compat::IovaView`: guestmem's table and slices). 64 MiB
//! of guest memory behind N mappings of equal size, in reverse order.
//!
//! - `iova_vm_memory/read_obj_u64/N-mappings`: vm-memory's `Bytes::read_obj::<u64>` at random
//!   8-byte-aligned IOVAs (the first 4 KiB of a random mapping).
//! - `iova_vm_memory/write_slice_4k/N-mappings`: vm-memory's `Bytes::write_slice` of 4 KiB
//!   at a random page-aligned IOVA.
//!
//! Run `cargo bench --features vm-memory-iommu --bench compat_iommu`, then
//! `scripts/bench-ratios iova_vm_memory --baseline vm-memory`.

use std::hint::black_box;
use std::sync::RwLock;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use guestmem::compat::{self, IommuFace, IovaView};
use guestmem::iommu::{Iotlb, Iova, Permissions as Perm};
use vm_memory::iommu::{Error as VmIommuError, IotlbIterator};
use vm_memory::{Bytes, GuestAddress, IommuMemory, Permissions};

const SIZE: u64 = 64 << 20;
const PICKS: usize = 4096;
const IOVA_BASE: u64 = 1 << 40;

/// vm-memory's own IOTLB behind a lock, as a VMM would hold it.
#[derive(Debug, Default)]
struct VmIommu(RwLock<vm_memory::iommu::Iotlb>);

impl vm_memory::Iommu for VmIommu {
    type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, vm_memory::iommu::Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, VmIommuError> {
        vm_memory::iommu::Iotlb::lookup(self.0.read().unwrap(), iova, length, access).map_err(|_| {
            VmIommuError::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: "miss".into(),
            }
        })
    }
}

fn picks(n: u64, align: u64) -> Vec<u64> {
    let chunk = SIZE / n;
    let mut x = 0x5eed_u64 + n;
    (0..PICKS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            IOVA_BASE + (x >> 8) % n * chunk + (x >> 32) % (4096 / align) * align
        })
        .collect()
}

fn iova_vm_memory(c: &mut Criterion) {
    let ranges = [(GuestAddress(0), SIZE as usize)];
    let ours =
        guestmem::GuestMemoryMmap::<()>::from_ranges(&[(guestmem::GuestAddress(0), SIZE as usize)]).unwrap();
    let buf = vec![0x5au8; 4096];
    for n in [1u64, 64, 512] {
        let chunk = SIZE / n;
        let iotlb = Iotlb::with_max_entries(n as usize).unwrap();
        let vm_iommu = VmIommu::default();
        for k in 0..n {
            let (iova, gpa) = (IOVA_BASE + k * chunk, (n - 1 - k) * chunk);
            iotlb.update(Iova(iova), chunk, guestmem::GuestAddress(gpa), Perm::READ_WRITE).unwrap();
            vm_iommu
                .0
                .write()
                .unwrap()
                .set_mapping(GuestAddress(iova), GuestAddress(gpa), chunk as usize, Permissions::ReadWrite)
                .unwrap();
        }
        let vm = IommuMemory::new(
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap(),
            vm_iommu,
            true,
            (),
        );
        let face = IommuMemory::new(
            compat::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap(),
            IommuFace::new(&iotlb),
            true,
            (),
        );
        let table = iotlb.snapshot();
        let view = IovaView::new(&table, &ours);
        // Fault every page in once, through each.
        for p in (0..SIZE).step_by(4096) {
            let at = GuestAddress(IOVA_BASE + p);
            vm.write_obj(0u8, at).unwrap();
            face.write_obj(0u8, at).unwrap();
            view.write_obj(0u8, at).unwrap();
        }

        let words = picks(n, 8);
        let mut g = c.benchmark_group(format!("iova_vm_memory/read_obj_u64/{n}-mappings"));
        let mut i = 0;
        g.bench_function("vm-memory", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                black_box(vm.read_obj::<u64>(GuestAddress(black_box(words[i]))).unwrap())
            })
        });
        g.bench_function("face", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                black_box(face.read_obj::<u64>(GuestAddress(black_box(words[i]))).unwrap())
            })
        });
        g.bench_function("view", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                black_box(view.read_obj::<u64>(GuestAddress(black_box(words[i]))).unwrap())
            })
        });
        g.finish();

        let pages = picks(n, 4096);
        let mut g = c.benchmark_group(format!("iova_vm_memory/write_slice_4k/{n}-mappings"));
        g.throughput(Throughput::Bytes(4096));
        g.bench_function("vm-memory", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                vm.write_slice(&buf, GuestAddress(black_box(pages[i]))).unwrap()
            })
        });
        g.bench_function("face", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                face.write_slice(&buf, GuestAddress(black_box(pages[i]))).unwrap()
            })
        });
        g.bench_function("view", |b| {
            b.iter(|| {
                i = (i + 1) % PICKS;
                view.write_slice(&buf, GuestAddress(black_box(pages[i]))).unwrap()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = iova_vm_memory
}
criterion_main!(benches);
