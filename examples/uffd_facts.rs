//! What this machine's kernel and KVM do with userfaultfd, measured: the features offered, whether
//! a KVM guest's reads and writes of registered memory reach a handler thread (and what KVM's
//! dirty log and dirty ring then say), whether a vCPU waiting on a fault can be interrupted,
//! and the costs (fault round trips for host and guest accesses, `UFFDIO_COPY` throughput).
//!
//! ```text
//! cargo run --release --all-features --example uffd_facts        # needs userfaultfd; KVM parts need /dev/kvm
//! ```
//!
//! Figures are medians of one run; the machine is shared, so compare ratios, not absolutes.

use guestmem_kvm_guest as kvm_guest;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::sys::uffd::{self, Features, OpenVia, RegisterMode, Uffd, UffdEvent};
use guestmem::sys::{self, MapFlags, Protection};
use kvm_guest::{MemorySlot, TestVm};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

fn anon(len: usize) -> *mut u8 {
    // SAFETY: a new private anonymous mapping, owned by the caller.
    unsafe {
        sys::mmap(
            std::ptr::null_mut(),
            len,
            Protection::READ_WRITE,
            MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::NORESERVE,
            None,
            0,
        )
    }
    .expect("mmap")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A handler thread that serves every page fault with a page of `fill` (or a zero page), and
/// records each fault's flags. Stops when `stop` is set.
struct Handler {
    stop: Arc<AtomicBool>,
    faults: Arc<Mutex<Vec<(u64, u64)>>>,
    /// When each fault was read, and when it was served.
    times: Arc<Mutex<Vec<(Instant, Instant)>>>,
    served: Arc<AtomicU64>,
    /// While set, faults are read and recorded but not served.
    hold: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handler {
    fn start(uffd: Arc<Uffd>, fill: u8) -> Handler {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicU64::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (s, h, f, n, tm) = (stop.clone(), hold.clone(), faults.clone(), served.clone(), times.clone());
        let thread = std::thread::spawn(move || {
            let page = vec![fill; PAGE];
            let mut events = Vec::with_capacity(64);
            let mut held = Vec::new();
            while !s.load(Ordering::Acquire) {
                if !h.load(Ordering::Acquire) {
                    for addr in held.drain(..) {
                        let _ = uffd.copy(addr as *mut u8, &page, true);
                    }
                }
                if uffd::poll_readable(&[uffd.as_fd()], 5).unwrap()[0] {
                    uffd.read_events(&mut events).unwrap();
                    for e in &events {
                        if let UffdEvent::PageFault { address, flags, .. } = *e {
                            let read_at = Instant::now();
                            f.lock().unwrap().push((address, flags));
                            let at = address & !(PAGE as u64 - 1);
                            if h.load(Ordering::Acquire) {
                                held.push(at);
                                continue;
                            }
                            match uffd.copy(at as *mut u8, &page, true) {
                                Ok(_) => {}
                                Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                                    uffd.wake(at as *mut u8, PAGE).unwrap()
                                }
                                Err((_, e)) => panic!("copy: {e}"),
                            }
                            tm.lock().unwrap().push((read_at, Instant::now()));
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Handler { stop, faults, times, served, hold, thread: Some(thread) }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn main() -> Result<(), BoxError> {
    println!("== kernel {}", std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim());
    println!(
        "vm.unprivileged_userfaultfd = {}",
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default().trim()
    );
    for via in [OpenVia::Device, OpenVia::Syscall] {
        match uffd::available_features(via) {
            Ok(f) => println!("features via {via:?}: {f:?}"),
            Err(e) => println!("features via {via:?}: cannot open: {e}"),
        }
    }
    let offered = uffd::available_features(OpenVia::Any)?;
    let all = Features::from_bits((1 << 17) - 1).unwrap_or_default();
    println!("features not offered: {:?}", all.difference(offered));

    exact_address()?;
    minor_shmem()?;
    hugetlb()?;
    host_fault_cost()?;
    copy_throughput()?;
    match kvm_guest::kvm_available() {
        Ok(()) => kvm_facts()?,
        Err(why) => println!("== KVM: skipped ({why})"),
    }
    Ok(())
}

/// Whether fault addresses are exact with `EXACT_ADDRESS`, page aligned without.
fn exact_address() -> Result<(), BoxError> {
    for (features, name) in [(Features::EXACT_ADDRESS, "EXACT_ADDRESS"), (Features::empty(), "default")] {
        let uffd = Arc::new(Uffd::open(OpenVia::Any, features)?);
        let p = anon(PAGE);
        // SAFETY: our new mapping, used only here.
        unsafe { uffd.register(p, PAGE, RegisterMode::MISSING) }?;
        let h = Handler::start(uffd.clone(), 1);
        // SAFETY: inside our mapping; the handler places the page.
        let v = unsafe { p.add(123).read_volatile() };
        let faults = h.faults.lock().unwrap().clone();
        println!("fault address with {name}: offset {:#x} in the page (read {v})", faults[0].0 - p as u64);
        drop(h);
        // SAFETY: unused from now on.
        unsafe { sys::munmap(p, PAGE) }?;
    }
    Ok(())
}

/// Minor faults on a memfd: the page cache has the page (written through another mapping); the
/// registered mapping faults minor and `UFFDIO_CONTINUE` maps it.
fn minor_shmem() -> Result<(), BoxError> {
    let uffd = Uffd::open(OpenVia::Any, Features::MINOR_SHMEM)?;
    let fd = sys::memfd_create(c"minor", sys::MemfdFlags::CLOEXEC)?;
    sys::fd::ftruncate(fd.as_fd(), PAGE as u64)?;
    let map = |fd| {
        // SAFETY: a new shared mapping of our memfd.
        unsafe {
            sys::mmap(std::ptr::null_mut(), PAGE, Protection::READ_WRITE, MapFlags::SHARED, Some(fd), 0)
        }
    };
    let (a, b) = (map(fd.as_fd())?, map(fd.as_fd())?);
    // SAFETY: our own mappings.
    unsafe { a.write_volatile(0x5a) };
    // SAFETY: our own mapping, used only here.
    let ioctls = unsafe { uffd.register(b, PAGE, RegisterMode::MINOR) }?;
    let uffd = Arc::new(uffd);
    let u = uffd.clone();
    let t = std::thread::spawn(move || {
        let mut ev = Vec::with_capacity(4);
        while !uffd::poll_readable(&[u.as_fd()], 1000).unwrap()[0] {}
        u.read_events(&mut ev).unwrap();
        let UffdEvent::PageFault { address, flags, .. } = ev[0] else { panic!("{ev:?}") };
        u.continue_range(address as *mut u8, PAGE, true).unwrap();
        flags
    });
    // SAFETY: our mapping; the minor fault is resolved by the thread.
    let v = unsafe { b.read_volatile() };
    let flags = t.join().unwrap();
    println!(
        "minor fault on shmem: ioctls {ioctls:?}, fault flags {flags:#x}, read {v:#x} after UFFDIO_CONTINUE"
    );
    // SAFETY: unused from now on.
    unsafe {
        sys::munmap(a, PAGE)?;
        sys::munmap(b, PAGE)?;
    }
    Ok(())
}

/// Missing and minor faults on hugetlb memory (needs free 2 MiB pages).
fn hugetlb() -> Result<(), BoxError> {
    let huge = 2 * MIB;
    let flags = sys::MemfdFlags::CLOEXEC | sys::MemfdFlags::HUGETLB | sys::MemfdFlags::HUGE_2MB;
    let fd = match sys::memfd_create(c"huge", flags) {
        Ok(fd) => fd,
        Err(e) => {
            println!("hugetlb: memfd_create failed ({e})");
            return Ok(());
        }
    };
    sys::fd::ftruncate(fd.as_fd(), huge as u64)?;
    // SAFETY: a new shared mapping of our memfd.
    let p = unsafe {
        sys::mmap(std::ptr::null_mut(), huge, Protection::READ_WRITE, MapFlags::SHARED, Some(fd.as_fd()), 0)
    };
    let Ok(p) = p else {
        println!("hugetlb: mmap failed (no free huge pages? sysctl vm.nr_hugepages)");
        return Ok(());
    };
    let uffd = Uffd::open(OpenVia::Any, Features::MISSING_HUGETLBFS)?;
    // SAFETY: our new mapping, used only here.
    let ioctls = unsafe { uffd.register(p, huge, RegisterMode::MISSING | RegisterMode::MINOR) }?;
    let zero = uffd.zeropage(p, huge, true);
    let small = uffd.copy(p, &vec![1u8; PAGE], true);
    let whole = uffd.copy(p, &vec![2u8; huge], true);
    // SAFETY: the page is placed.
    let v = unsafe { p.add(huge - 1).read_volatile() };
    println!(
        "hugetlb 2 MiB memfd: register ioctls {ioctls:?}; ZEROPAGE {:?}; COPY of 4 KiB {:?}; COPY of 2 MiB {:?} (read {v})",
        zero.map_err(|e| e.1.to_string()),
        small.map_err(|e| e.1.to_string()),
        whole.map_err(|e| e.1.to_string())
    );
    // SAFETY: unused from now on.
    unsafe { sys::munmap(p, huge) }?;
    Ok(())
}

/// A host thread touching missing pages: the round trip through a handler thread, against a
/// plain first-touch fault of anonymous memory.
fn host_fault_cost() -> Result<(), BoxError> {
    const N: usize = 4000;
    let uffd = Arc::new(Uffd::open(OpenVia::Any, Features::empty())?);
    let p = anon(N * PAGE);
    // SAFETY: our new mapping, used only here.
    unsafe { uffd.register(p, N * PAGE, RegisterMode::MISSING) }?;
    let h = Handler::start(uffd.clone(), 3);
    let mut lazy = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        // SAFETY: inside our mapping; the handler places the page.
        unsafe { p.add(i * PAGE).read_volatile() };
        lazy.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(h);
    let q = anon(N * PAGE);
    let mut plain = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        // SAFETY: inside our mapping.
        unsafe { q.add(i * PAGE).write_volatile(1) };
        plain.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "host access to a missing page, served by a handler thread (UFFDIO_COPY 4 KiB): median {:.1} us; plain first-touch fault: {:.2} us",
        median(&mut lazy),
        median(&mut plain)
    );
    // SAFETY: unused from now on.
    unsafe {
        sys::munmap(p, N * PAGE)?;
        sys::munmap(q, N * PAGE)?;
    }
    Ok(())
}

/// `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` throughput into registered missing memory, against
/// `memcpy` into fresh anonymous memory (which faults in zero pages as it goes).
fn copy_throughput() -> Result<(), BoxError> {
    let size = 256 * MIB;
    for chunk in [PAGE, 64 << 10, 2 * MIB] {
        let uffd = Uffd::open(OpenVia::Any, Features::empty())?;
        let p = anon(size);
        // SAFETY: our new mapping, used only here.
        unsafe { uffd.register(p, size, RegisterMode::MISSING) }?;
        let src = vec![7u8; chunk];
        let t = Instant::now();
        for off in (0..size).step_by(chunk) {
            // SAFETY: arithmetic inside our mapping.
            uffd.copy(unsafe { p.add(off) }, &src, false).map_err(|e| e.1)?;
        }
        let copy = size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
        // SAFETY: unused from now on.
        unsafe { sys::munmap(p, size) }?;
        let q = anon(size);
        let t = Instant::now();
        for off in (0..size).step_by(chunk) {
            // SAFETY: our own mapping and buffer, not overlapping.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), q.add(off), chunk) };
        }
        let memcpy = size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
        // SAFETY: unused from now on.
        unsafe { sys::munmap(q, size) }?;
        println!(
            "UFFDIO_COPY in {:>4} KiB chunks: {copy:.2} GiB/s; memcpy into fresh anonymous memory: {memcpy:.2} GiB/s",
            chunk >> 10
        );
    }
    let uffd = Uffd::open(OpenVia::Any, Features::empty())?;
    let p = anon(size);
    // SAFETY: our new mapping, used only here.
    unsafe { uffd.register(p, size, RegisterMode::MISSING) }?;
    let t = Instant::now();
    for off in (0..size).step_by(64 << 10) {
        // SAFETY: arithmetic inside our mapping.
        uffd.zeropage(unsafe { p.add(off) }, 64 << 10, false).map_err(|e| e.1)?;
    }
    println!(
        "UFFDIO_ZEROPAGE in 64 KiB chunks: {:.2} GiB/s",
        size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64
    );
    // SAFETY: unused from now on.
    unsafe { sys::munmap(p, size) }?;
    Ok(())
}

/// Real-mode code: per page one access (`mov byte fs:[addr32], 1` or `mov al, fs:[addr32]`), then
/// `hlt`.
fn access_program(gpas: &[u64], write: bool) -> Vec<u8> {
    let mut c = Vec::new();
    for &gpa in gpas {
        if write {
            c.extend_from_slice(&[0x64, 0x67, 0xc6, 0x05]);
            c.extend_from_slice(&(gpa as u32).to_le_bytes());
            c.push(1);
        } else {
            c.extend_from_slice(&[0x64, 0x67, 0xa0]);
            c.extend_from_slice(&(gpa as u32).to_le_bytes());
        }
    }
    c.push(0xf4);
    c
}

const CODE_GPA: u64 = 0x1000;
/// Where the registered memory sits in the guest.
const LAZY_GPA: u64 = 16 * MIB as u64;

fn run(vm: &mut TestVm, code: &[u8]) -> Result<Duration, BoxError> {
    vm.write_ram(CODE_GPA, code)?;
    let vcpu = vm.vcpu(0)?;
    kvm_guest::enter_real_mode(vcpu, CODE_GPA)?;
    let t = Instant::now();
    kvm_guest::run_to_hlt(vcpu)?;
    Ok(t.elapsed())
}

extern "C" fn on_signal(_: libc::c_int) {}

static SIGBUS_COUNT: AtomicU64 = AtomicU64::new(0);
static SIGBUS_CODE: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGBUS_COUNT.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    SIGBUS_CODE.store(unsafe { (*info).si_code } as u64, Ordering::Relaxed);
}

/// KVM guests on registered memory.
fn kvm_facts() -> Result<(), BoxError> {
    println!("== KVM guest accesses to userfaultfd-registered memory");
    let size = 64 * MIB;
    let uffd = Arc::new(Uffd::open(OpenVia::Any, Features::empty())?);
    let p = anon(size);
    // SAFETY: our new mapping, used only here (and by the guest).
    unsafe { uffd.register(p, size, RegisterMode::MISSING) }?;
    let mut vm = TestVm::new()?;
    vm.add_ram(0, 0, 2 * MIB, 0)?;
    let slot = MemorySlot {
        slot: 1,
        guest_phys_addr: LAZY_GPA,
        size: size as u64,
        userspace_addr: p as u64,
        flags: kvm_guest::LOG_DIRTY_PAGES,
    };
    // SAFETY: `p` stays mapped until the end of this function, after the VM is dropped.
    unsafe { vm.set_user_memory_region(slot) }?;
    vm.add_vcpu()?;
    let h = Handler::start(uffd.clone(), 9);
    let gpa = |page: usize| LAZY_GPA + (page * PAGE) as u64;

    // Writes and reads by the guest, each to missing pages.
    run(&mut vm, &access_program(&[gpa(0), gpa(1)], true))?;
    run(&mut vm, &access_program(&[gpa(2), gpa(3)], false))?;
    let faults = h.faults.lock().unwrap().clone();
    println!(
        "guest writes, then reads, of 4 missing pages: {} faults reached the handler, flags {:?}",
        faults.len(),
        faults.iter().map(|f| f.1).collect::<Vec<_>>()
    );
    // SAFETY: pages 0..4 are placed.
    let bytes: Vec<u8> = (0..4).map(|i| unsafe { p.add(i * PAGE + 1).read_volatile() }).collect();
    println!("host reads after the guest ran: byte 1 of pages 0..4 = {bytes:?} (9 = placed by the handler; page 0/1 byte 0 = the guest's 1)");
    let dirty = vm.dirty_pages(1)?;
    println!(
        "KVM dirty log of the slot: {:?} (pages placed by UFFDIO_COPY for reads are not in it)",
        dirty.iter().map(|g| (g - LAZY_GPA) / PAGE as u64).collect::<Vec<_>>()
    );
    // A host-side placement of a page the guest then only reads.
    let _ = uffd.copy(
        // SAFETY: arithmetic inside our mapping.
        unsafe { p.add(10 * PAGE) },
        &[4u8; PAGE],
        true,
    );
    run(&mut vm, &access_program(&[gpa(10)], false))?;
    println!(
        "a page placed by UFFDIO_COPY before the guest reads it: dirty log {:?}",
        vm.dirty_pages(1)?.len()
    );

    // Cost: a guest touching N missing pages in one run, against the same run on placed pages.
    const N: usize = 512;
    let mut per_write = Vec::new();
    let mut per_read = Vec::new();
    for round in 0..8 {
        for write in [true, false] {
            let base = 100 + round * 2 * N + if write { 0 } else { N };
            let pages: Vec<u64> = (0..N).map(|i| gpa(base + i)).collect();
            let code = access_program(&pages, write);
            let lazy = run(&mut vm, &code)?;
            let warm = run(&mut vm, &code)?;
            let us = (lazy.as_secs_f64() - warm.as_secs_f64()) * 1e6 / N as f64;
            if write {
                per_write.push(us)
            } else {
                per_read.push(us)
            }
        }
    }
    {
        let t = h.times.lock().unwrap();
        let n = t.len();
        let mut serve: Vec<f64> = t[n - N..].iter().map(|(a, b)| (*b - *a).as_secs_f64() * 1e6).collect();
        let mut gap: Vec<f64> =
            t[n - N..].windows(2).map(|w| (w[1].0 - w[0].1).as_secs_f64() * 1e6).collect();
        println!(
            "  of which: handler read-to-placed {:.1} us median; placed to the next fault read {:.1} us median",
            median(&mut serve),
            median(&mut gap)
        );
    }
    println!(
        "guest first access to a missing page, served by the handler: median {:.1} us per write, {:.1} us per read (run time minus the same run on placed pages)",
        median(&mut per_write),
        median(&mut per_read)
    );
    // The same through a plain anonymous slot (KVM's own fault of a zero page).
    let q = anon(size);
    let plain = MemorySlot {
        slot: 2,
        guest_phys_addr: 128 * MIB as u64,
        size: size as u64,
        userspace_addr: q as u64,
        flags: 0,
    };
    // SAFETY: `q` stays mapped until after the VM is dropped.
    unsafe { vm.set_user_memory_region(plain) }?;
    let mut per_plain = Vec::new();
    for round in 0..8 {
        let pages: Vec<u64> = (0..N).map(|i| 128 * MIB as u64 + ((round * N + i) * PAGE) as u64).collect();
        let code = access_program(&pages, true);
        let first = run(&mut vm, &code)?;
        let warm = run(&mut vm, &code)?;
        per_plain.push((first.as_secs_f64() - warm.as_secs_f64()) * 1e6 / N as f64);
    }
    println!("guest first write to plain anonymous memory: median {:.1} us", median(&mut per_plain));

    // A vCPU waiting on a fault nobody serves: can a signal get it out of KVM_RUN?
    // SAFETY: a no-op handler for SIGUSR1, installed before the vCPU thread is signalled.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    h.hold.store(true, Ordering::Release);
    let code = access_program(&[gpa(60000 / 4)], true);
    vm.write_ram(CODE_GPA, &code)?;
    kvm_guest::enter_real_mode(vm.vcpu(0)?, CODE_GPA)?;
    let before = h.faults.lock().unwrap().len();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<(), BoxError> {
        let vcpu = vm.vcpu(0)?;
        let t = s.spawn(move || {
            // SAFETY: pthread_self and gettid have no preconditions.
            tx.send(unsafe { (libc::pthread_self(), libc::gettid()) }).unwrap();
            let t = Instant::now();
            let r = vcpu.run().map(|e| format!("{e:?}")).map_err(|e| e.to_string());
            done_tx.send(()).unwrap();
            (r, t.elapsed())
        });
        let (thread, tid) = rx.recv()?;
        std::thread::sleep(Duration::from_millis(100));
        let queued = h.faults.lock().unwrap().len() - before;
        let state = |tid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
            let after = stat.rsplit(')').next().unwrap_or("").trim().chars().next().unwrap_or('?');
            let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default();
            format!("state {after}, wchan {wchan}")
        };
        println!("vCPU waiting on an unserved fault ({queued} fault queued): {}", state(tid));
        // SAFETY: the thread is alive (it is joined below) and handles SIGUSR1.
        unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        let returned = done_rx.recv_timeout(Duration::from_millis(500)).is_ok();
        println!(
            "  signalled (SIGUSR1, handler installed): KVM_RUN returned within 500 ms: {returned}; {}",
            state(tid)
        );
        h.hold.store(false, Ordering::Release);
        let (r, took) = t.join().unwrap();
        println!("  after the handler served the page: KVM_RUN returned {r:?} after {took:?}");
        Ok(())
    })?;
    println!("faults served in all: {}", h.served.load(Ordering::Relaxed));

    // A poisoned page (UFFDIO_POISON): what a guest access to it does.
    // SAFETY: a SIGBUS handler that records the signal's code and returns; it is installed
    // before any access to the poisoned page, which only the guest makes.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
    let poisoned = gpa(16000);
    // SAFETY: arithmetic inside our mapping; only the guest touches the poisoned page.
    let r = unsafe { uffd.poison(p.add(16000 * PAGE), PAGE, true) };
    let code = access_program(&[poisoned], true);
    vm.write_ram(CODE_GPA, &code)?;
    kvm_guest::enter_real_mode(vm.vcpu(0)?, CODE_GPA)?;
    let exit = vm.vcpu(0)?.run().map(|e| format!("{e:?}")).map_err(|e| e.to_string());
    println!(
        "guest write to a poisoned page (UFFDIO_POISON {:?}): KVM_RUN returned {exit:?}; SIGBUS on the vCPU thread: {} (si_code {})",
        r.map_err(|e| e.1.to_string()),
        SIGBUS_COUNT.load(Ordering::Relaxed),
        SIGBUS_CODE.load(Ordering::Relaxed)
    );
    drop(h);
    drop(vm);
    // SAFETY: the VM is gone; nothing uses the mappings.
    unsafe {
        sys::munmap(p, size)?;
        sys::munmap(q, size)?;
    }
    dirty_ring()?;
    Ok(())
}

/// The dirty ring with a slot on registered memory: do guest write faults served by the handler
/// appear in the ring?
fn dirty_ring() -> Result<(), BoxError> {
    use guestmem::sys::kvm as k;
    let size = 4 * MIB;
    let uffd = Arc::new(Uffd::open(OpenVia::Any, Features::empty())?);
    let p = anon(size);
    // SAFETY: our new mapping, used only here (and by the guest).
    unsafe { uffd.register(p, size, RegisterMode::MISSING) }?;
    let mut vm = TestVm::new()?;
    let kvm_vm = k::KvmVmFd::duplicate(vm.vm_fd())?;
    if k::check_extension(&kvm_vm, k::KVM_CAP_DIRTY_LOG_RING).unwrap_or(0) == 0 {
        println!("dirty ring: not offered");
        return Ok(());
    }
    k::enable_dirty_log_ring(&kvm_vm, false, 1 << 16)?;
    vm.add_ram(0, 0, 2 * MIB, 0)?;
    let slot = MemorySlot {
        slot: 1,
        guest_phys_addr: LAZY_GPA,
        size: size as u64,
        userspace_addr: p as u64,
        flags: kvm_guest::LOG_DIRTY_PAGES,
    };
    // SAFETY: `p` stays mapped until after the VM is dropped.
    unsafe { vm.set_user_memory_region(slot) }?;
    vm.add_vcpu()?;
    let h = Handler::start(uffd.clone(), 5);
    let gpa = |page: usize| LAZY_GPA + (page * PAGE) as u64;
    run(&mut vm, &access_program(&[gpa(0), gpa(1), gpa(2)], true))?;
    run(&mut vm, &access_program(&[gpa(3)], false))?;
    let ring_len = (1usize << 16) / 16;
    let map_len = 1 << 16;
    // SAFETY: the vCPU fd is open while `vm` lives, past this borrow's use.
    let vcpu_fd =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&vm.vcpus()[0])) };
    // SAFETY: a shared read-write mapping of the vCPU's dirty ring (offset KVM_DIRTY_LOG_PAGE_OFFSET).
    let ring = unsafe {
        sys::mmap(
            std::ptr::null_mut(),
            map_len,
            Protection::READ_WRITE,
            MapFlags::SHARED,
            Some(vcpu_fd),
            k::KVM_DIRTY_LOG_PAGE_OFFSET * PAGE as u64,
        )
    }?;
    let mut pages = Vec::new();
    for i in 0..ring_len {
        // SAFETY: entry `i` of the mapped ring; flags read with a volatile load.
        let e = unsafe { ring.cast::<k::DirtyGfn>().add(i).read_volatile() };
        if e.flags & k::KVM_DIRTY_GFN_F_DIRTY == 0 {
            break;
        }
        pages.push(e.offset);
    }
    println!(
        "dirty ring after guest writes to pages 0,1,2 and a read of 3 (all served by the handler): {pages:?}"
    );
    drop(h);
    drop(vm);
    // SAFETY: the VM is gone.
    unsafe {
        sys::munmap(ring, map_len)?;
        sys::munmap(p, size)?;
    }
    Ok(())
}
