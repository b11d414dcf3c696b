//! Live migration of a running KVM guest, the way a VMM does it: its memory over loopback
//! TCP, then its vCPU, into a second VM whose memory is the destination, where the guest
//! resumes and keeps running.
//!
//! ```text
//! cargo run --release --all-features --example live_migration [MiB] [--local | --postcopy] [--no-kvm]
//! ```
//!
//! 1. Source memory (two regions, `MiB` in all, 1024 by default) with dirty tracking, and a
//!    real KVM guest whose vCPU keeps writing pseudo-random pages of a window of it (the test
//!    harness's `LoopingWriter`, a real-mode program whose whole state is in its registers).
//!    Every I/O exit of the guest takes the host 0.6 ms to answer (a slow device), which
//!    bounds how fast it dirties memory.
//! 2. A second VM, made up front as a VMM's destination is: its memory a second
//!    `GuestMemoryMmap` registered through `KvmSlots`, fed by a `Receiver` over 127.0.0.1 in
//!    another thread.
//! 3. Pre-copy: round 0 sends all of memory, then rounds of dirty pages (KVM's dirty log merged
//!    into guestmem's bitmaps by `KvmSlots::sync_dirty_log` before each harvest) until what is
//!    left fits in the downtime budget.
//! 4. The vCPU is paused at its next I/O exit, its registers are saved, the final round and
//!    the registers (the stream's device state frame) go out, and the destination, once the
//!    stream is verified, loads the registers into its vCPU and runs it: the guest goes on
//!    from the write it had reached. The downtime printed is from the pause to that resume.
//! 5. After more writes on the destination, the host replays the guest's pseudo-random
//!    sequence from the start and proves that the destination memory is exactly what an
//!    unmigrated guest would have produced: every written page's stamp and count, every other
//!    page as it was. A page lost in any round, the final one included, fails the check.
//!
//! `--local` migrates on the same host without copying: the source memory is memfds, whose
//! descriptors go over a Unix socket (`migration::local`) to the destination, which maps the
//! same pages; only the vCPU's registers travel on a (page-less) migration stream after it.
//! `--postcopy` switches to post-copy after round 0: the guest resumes on the destination at
//! once, over memory registered with a userfaultfd, and the pages it dirtied during round 0
//! come after (`migration::postcopy`), the ones it touches first.
//! `--no-kvm` (or no usable /dev/kvm) has a host thread play the guest, the same writes through
//! the API, resumed on the destination from its write count.
//!
//! Exits non-zero if any check fails.

use guestmem_kvm_guest as kvm_guest;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guestmem::kvm::KvmSlots;
use guestmem::migration::local::{self, ReceiveOptions};
use guestmem::migration::{
    MigrationReport, Precopy, PrecopyConfig, ReceiveSummary, Received, Receiver, RoundStats, Sender,
    StopReason,
};
use guestmem::mmap::{Backing, MemfdOptions, MmapRegionBuilder};
use guestmem::{
    AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use kvm_guest::{LoopingWriter, VcpuState, COUNT_OFFSET, SEQ_OFFSET};
use kvm_ioctls::VcpuFd;

type Mem = GuestMemoryMmap<AtomicBitmap>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Where the guest's code sits (outside the window it writes).
const CODE_GPA: u64 = 0x1000;
/// The window the guest writes: from 16 MiB, at most 256 MiB (the harness's limit).
const WINDOW_START: u64 = 16 * MIB;
const WINDOW_MAX_PAGES: u64 = 65536;
/// The pause the pre-copy rounds aim at.
const DOWNTIME_BUDGET: Duration = Duration::from_millis(3);
/// The downtime this example is meant to stay within for 1 GiB.
const DOWNTIME_TARGET: Duration = Duration::from_millis(10);
/// How long the host takes to answer the guest's I/O exit.
const EXIT_SERVICE: Duration = Duration::from_micros(600);
/// I/O exits the guest makes on the destination before it is stopped and checked.
const RESUMED_EXITS: usize = 200;
/// How long the guest runs on the source in the local variant before it is moved.
const LOCAL_RUN: Duration = Duration::from_millis(300);
/// Discard rounds before the post-copy switch.
const DISCARD_ROUNDS: usize = 3;
/// The stamp on every page outside the window, at its start.
const STAMP: u64 = 0x5eed_0000_0000_0000;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("live_migration: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line asked for.
struct Options {
    mib: u64,
    local: bool,
    postcopy: bool,
    kvm: bool,
}

fn options() -> Result<Options, BoxError> {
    let mut o = Options { mib: 1024, local: false, postcopy: false, kvm: true };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--no-kvm" => o.kvm = false,
            "--local" => o.local = true,
            "--postcopy" => o.postcopy = true,
            _ => o.mib = arg.parse().map_err(|e| format!("memory size in MiB {arg:?}: {e}"))?,
        }
    }
    if o.local && o.postcopy {
        return Err("--local and --postcopy are two ways to migrate: pick one".into());
    }
    if !(32..=1 << 20).contains(&o.mib) {
        return Err(format!("memory size must be 32 MiB to 1 TiB, not {} MiB", o.mib).into());
    }
    Ok(o)
}

fn run() -> Result<bool, BoxError> {
    let o = options()?;
    let size = o.mib * MIB;
    // Two adjacent regions, as a VMM with RAM split around a device window would have.
    let half = (size / 2) & !(MIB - 1);
    let layout = [(GuestAddress(0), half), (GuestAddress(half), size - half)];
    let src = if o.local { memfd_memory(&layout)? } else { Mem::from_ranges(&as_ranges(&layout))? };
    let window_pages = ((size - WINDOW_START) / PAGE).min(WINDOW_MAX_PAGES) as u32;
    let writer = LoopingWriter { writes_per_exit: 64, ..LoopingWriter::new(WINDOW_START, window_pages) };
    let code = writer.program()?;
    // Contents: a stamp on every page outside the window (which starts zero), and the code.
    let t = Instant::now();
    for page in (0..size).step_by(PAGE as usize).filter(|&p| !in_window(&writer, p)) {
        src.write_obj(page ^ STAMP, GuestAddress(page))?;
    }
    src.write_slice(&code, GuestAddress(CODE_GPA))?;
    println!(
        "source: {} MiB in {} regions ({}), stamped in {:.0} ms",
        o.mib,
        src.num_regions(),
        if o.local { "memfds" } else { "anonymous memory" },
        ms(t.elapsed())
    );
    println!(
        "guest window: {:#x}..{:#x} ({} MiB), {} writes per I/O exit, {:.1} ms per exit",
        writer.range_start,
        writer.range_end(),
        u64::from(window_pages) * PAGE / MIB,
        writer.writes_per_exit,
        ms(EXIT_SERVICE)
    );
    let kvm = if o.kvm { kvm_guest::kvm_available() } else { Err("--no-kvm".to_string()) };
    let vms = match kvm {
        Ok(()) => {
            println!("guest: a real-mode KVM vCPU (LoopingWriter), moved to a second VM");
            // The network variant needs KVM's dirty log; the local one shares the pages.
            Some(make_vms(&src, !o.local)?)
        }
        Err(why) => {
            println!("guest: no KVM here ({why}); a host thread writing through the API plays the guest");
            None
        }
    };
    let outcome = if o.local {
        local_migration(&src, &writer, vms)?
    } else {
        let dst = Mem::from_ranges(&as_ranges(&layout))?;
        network_migration(&src, dst, &writer, vms, size, o.postcopy)?
    };
    let Some(outcome) = outcome else { return Ok(false) };
    let downtime = outcome.resumed_at.saturating_duration_since(outcome.paused_at);
    println!(
        "downtime: {:.2} ms from the pause to the guest running on the destination ({})",
        ms(downtime),
        if downtime <= DOWNTIME_TARGET { "within 10 ms" } else { "OVER the 10 ms target" }
    );
    println!(
        "guest: {} writes on the source, {} in all after {} exits on the destination",
        outcome.writes_at_pause, outcome.total_writes, RESUMED_EXITS
    );
    // The source stopped at the pause: its window is the first `writes_at_pause` writes.
    if !outcome.local && !check(&src, &writer, &code, outcome.writes_at_pause, "source")? {
        return Ok(false);
    }
    check(&outcome.dst, &writer, &code, outcome.total_writes, "destination")
}

/// The ranges of `layout` as `from_ranges` takes them.
fn as_ranges(layout: &[(GuestAddress, u64)]) -> Vec<(GuestAddress, usize)> {
    layout.iter().map(|&(a, len)| (a, len as usize)).collect()
}

/// Memory of shared memfds (sealed against shrinking), with dirty tracking.
fn memfd_memory(layout: &[(GuestAddress, u64)]) -> Result<Mem, BoxError> {
    let regions = layout
        .iter()
        .enumerate()
        .map(|(i, &(addr, len))| {
            let builder = MmapRegionBuilder::<AtomicBitmap>::new(len as usize)
                .backing(Backing::Memfd(MemfdOptions::new(&format!("guest-ram-{i}"))));
            GuestRegionMmap::build(builder, addr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Mem::from_regions(regions)?)
}

fn in_window(writer: &LoopingWriter, gpa: u64) -> bool {
    (writer.range_start..writer.range_end()).contains(&gpa)
}

/// One VM with one vCPU, its memory registered through `KvmSlots`.
struct KvmEnd {
    vcpu: VcpuFd,
    slots: Option<KvmSlots<AtomicBitmap>>,
    // Dropped last: the vCPU and the slots go before the VM.
    vm: kvm_guest::TestVm,
}

impl KvmEnd {
    fn new() -> Result<Self, BoxError> {
        let vm = kvm_guest::TestVm::new()?;
        let vcpu = vm.vm_fd().create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        Ok(KvmEnd { vcpu, slots: None, vm })
    }

    /// Registers `mem` as the VM's memory.
    fn register(&mut self, mem: &Mem, log_dirty: bool) -> Result<(), BoxError> {
        let mut slots = KvmSlots::new(self.vm.vm_fd(), log_dirty)?;
        slots.register(mem)?;
        self.slots = Some(slots);
        Ok(())
    }
}

/// The guest at both ends: a VM at the source (its vCPU at the start of the program, which is
/// in memory) and one at the destination (memory registered later), or, without KVM, `None`
/// (a host thread plays the guest).
fn make_vms(src: &Mem, log_dirty: bool) -> Result<(KvmEnd, KvmEnd), BoxError> {
    let mut a = KvmEnd::new()?;
    a.register(src, log_dirty)?;
    kvm_guest::enter_real_mode(&a.vcpu, CODE_GPA)?;
    Ok((a, KvmEnd::new()?))
}

/// The source's guest, running until `stop`: the vCPU (handed back paused) or the host
/// thread, and its write count.
type SourceGuest = Result<(Option<VcpuFd>, u64), BoxError>;

fn start_source_guest<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    vcpu: Option<VcpuFd>,
    src: &'s Mem,
    writer: &'s LoopingWriter,
    stop: &'s AtomicBool,
) -> std::thread::ScopedJoinHandle<'s, SourceGuest> {
    s.spawn(move || match vcpu {
        Some(mut vcpu) => {
            let mut writes = 0;
            while !stop.load(Ordering::Relaxed) {
                writes = u64::from(kvm_guest::run_until_exits(&mut vcpu, writer.port, 1)?[0]);
                std::thread::sleep(EXIT_SERVICE);
            }
            Ok((Some(vcpu), writes))
        }
        None => Ok((None, host_writes(src, writer, 0, u64::MAX, stop)?)),
    })
}

/// Pauses the source's guest; returns its state (the vCPU's registers, or the host thread's
/// write count) and its write count.
fn pause(
    guest: std::thread::ScopedJoinHandle<'_, SourceGuest>,
    stop: &AtomicBool,
) -> Result<(Vec<u8>, u64), BoxError> {
    stop.store(true, Ordering::Relaxed);
    let (vcpu, writes) = guest.join().map_err(|_| "the guest thread panicked")??;
    let state = match vcpu {
        Some(vcpu) => VcpuState::save(&vcpu)?.to_bytes(),
        None => writes.to_le_bytes().to_vec(),
    };
    Ok((state, writes))
}

/// What the host-thread guest does from write `from + 1` on, until `stop` or `until` writes
/// in all: the `LoopingWriter`'s writes through the API. Returns its write count.
fn host_writes(
    mem: &Mem,
    writer: &LoopingWriter,
    from: u64,
    until: u64,
    stop: &AtomicBool,
) -> Result<u64, BoxError> {
    let mut n = from;
    for page in writer.pages().skip(from as usize) {
        if n >= until || stop.load(Ordering::Relaxed) {
            break;
        }
        n += 1;
        mem.write_obj(n as u32, GuestAddress(page + SEQ_OFFSET))?;
        let count: u32 = mem.read_obj(GuestAddress(page + COUNT_OFFSET))?;
        mem.write_obj(count.wrapping_add(1), GuestAddress(page + COUNT_OFFSET))?;
        if n.is_multiple_of(u64::from(writer.writes_per_exit)) {
            std::thread::sleep(EXIT_SERVICE);
        }
    }
    Ok(n)
}

/// The destination's side once the stream is verified: the guest resumes from `state` (in
/// `vm`'s vCPU, or a host thread) and makes [`RESUMED_EXITS`] exits (or their writes).
/// Returns when it resumed and its write count at the end.
fn resume(
    vm: Option<&mut KvmEnd>,
    dst: &Mem,
    writer: &LoopingWriter,
    state: Option<Vec<u8>>,
) -> Result<(Instant, u64), BoxError> {
    let state = state.ok_or("the stream carried no device state")?;
    match vm {
        Some(end) => {
            let regs = VcpuState::from_bytes(&state)
                .ok_or_else(|| format!("device state of {} bytes is not a vCPU state", state.len()))?;
            regs.restore(&end.vcpu)?;
            let resumed_at = Instant::now();
            let mut last = 0;
            for _ in 0..RESUMED_EXITS {
                last = kvm_guest::run_until_exits(&mut end.vcpu, writer.port, 1)?[0];
                std::thread::sleep(EXIT_SERVICE);
            }
            Ok((resumed_at, u64::from(last)))
        }
        None => {
            let bytes: [u8; 8] =
                state.as_slice().try_into().map_err(|_| "device state is not a write count")?;
            let from = u64::from_le_bytes(bytes);
            let resumed_at = Instant::now();
            let more = RESUMED_EXITS as u64 * u64::from(writer.writes_per_exit);
            let total = host_writes(dst, writer, from, from + more, &AtomicBool::new(false))?;
            Ok((resumed_at, total))
        }
    }
}

/// What a migration left to check.
struct Outcome {
    dst: Mem,
    local: bool,
    paused_at: Instant,
    resumed_at: Instant,
    writes_at_pause: u64,
    total_writes: u64,
}

/// Pre-copy over loopback TCP, then the vCPU on the same stream.
fn network_migration(
    src: &Mem,
    dst: Mem,
    writer: &LoopingWriter,
    vms: Option<(KvmEnd, KvmEnd)>,
    size: u64,
    postcopy: bool,
) -> Result<Option<Outcome>, BoxError> {
    let (src_vm, mut dst_vm) = vms.unzip();
    if let Some(end) = dst_vm.as_mut() {
        // The destination VM's memory is registered before anything arrives.
        end.register(&dst, false)?;
    }
    let (vcpu, mut slots, src_vm) = match src_vm {
        Some(KvmEnd { vcpu, slots, vm }) => (Some(vcpu), slots, Some(vm)),
        None => (None, None, None),
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Post-copy after round 0: what the guest dirtied meanwhile is fetched after it resumed.
    let max_rounds = if postcopy { 0 } else { 20 };
    let config = PrecopyConfig { downtime: DOWNTIME_BUDGET, max_rounds, rate_window: 3 };
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    if postcopy {
        return postcopy_migration(
            src, dst, writer, listener, addr, config, vcpu, slots, src_vm, dst_vm, started,
        );
    }
    let (report, summary, paused_at, resumed_at, writes_at_pause, total_writes) =
        std::thread::scope(|s| -> Result<_, BoxError> {
            let dst = &dst;
            let destination = s.spawn(move || -> Result<_, BoxError> {
                let stream = accept_loopback(&listener)?;
                let acks = stream.try_clone()?;
                let mut receiver = Receiver::new_vectored(stream);
                // Acknowledgements, so that the source pauses only once this side caught up.
                receiver.set_return_path(acks);
                let summary = receiver.receive(dst)?;
                let (resumed_at, total) = resume(dst_vm.as_mut(), dst, writer, receiver.take_device_state())?;
                Ok((summary, resumed_at, total))
            });
            let guest = start_source_guest(s, vcpu, src, writer, &stop);
            let sync = || dirty_log_sync(slots.as_mut());
            let stream = connect(addr)?;
            let mut acks = stream.try_clone()?;
            let sender = Sender::new_vectored(stream)?;
            let mut precopy = Precopy::new(sender, src, config, sync);
            precopy.run()?;
            // The destination's backlog of the last round is not downtime: pause once it caught up.
            caught_up(precopy.wait_for_destination(&mut acks, Duration::from_secs(30))?);
            // Pause: the vCPU stops at its next I/O exit; its registers are the device state.
            let paused_at = Instant::now();
            let (state, writes_at_pause) = pause(guest, &stop)?;
            let (report, stream) = precopy.complete_with_device_state(&state)?;
            // Read the last acknowledgement and the end: a TCP socket closed with unread bytes
            // resets the connection, and the destination could lose the stream's end.
            std::io::copy(&mut acks, &mut std::io::sink())?;
            drop(stream);
            let (summary, resumed_at, total) =
                destination.join().map_err(|_| "the destination panicked")??;
            Ok((report, summary, paused_at, resumed_at, writes_at_pause, total))
        })?;
    drop((slots, src_vm));
    print_report(&report, &summary, size);
    // The last page is in place when the destination's receive returns, right before it resumes.
    println!(
        "whole migration: {:.0} ms (start to the last page at the destination)",
        ms(resumed_at - started)
    );
    // The receiver counted what arrived; it must be what the sender says it sent.
    let sent_pages: u64 = report.rounds.iter().chain([&report.final_round]).map(|r| r.pages).sum();
    if summary.rounds != report.rounds.len() as u64 + 1 || summary.pages != sent_pages {
        println!(
            "VERIFICATION FAILED: sent {} rounds and {sent_pages} pages, received {} rounds and {} pages",
            report.rounds.len() + 1,
            summary.rounds,
            summary.pages
        );
        return Ok(None);
    }
    Ok(Some(Outcome { dst, local: false, paused_at, resumed_at, writes_at_pause, total_writes }))
}

/// Pre-copy round 0 over loopback TCP, then post-copy: the guest resumes on the destination
/// at once and the pages it dirtied during round 0 come after, those it touches first.
#[allow(clippy::too_many_arguments)]
fn postcopy_migration(
    src: &Mem,
    dst: Mem,
    writer: &LoopingWriter,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    config: PrecopyConfig,
    vcpu: Option<VcpuFd>,
    mut slots: Option<KvmSlots<AtomicBitmap>>,
    src_vm: Option<kvm_guest::TestVm>,
    mut dst_vm: Option<KvmEnd>,
    started: Instant,
) -> Result<Option<Outcome>, BoxError> {
    let stop = AtomicBool::new(false);
    let (report, summary, paused_at, resumed_at, writes_at_pause, total_writes, last_page) =
        std::thread::scope(|s| -> Result<_, BoxError> {
            let dst = &dst;
            let destination = s.spawn(move || -> Result<_, BoxError> {
                let stream = accept_loopback(&listener)?;
                let requests = stream.try_clone()?;
                let mut receiver = Receiver::new_vectored(stream);
                // Acknowledgements, so that the source pauses only once this side caught up.
                receiver.set_return_path(requests.try_clone()?);
                let start = match receiver.receive_or_postcopy(dst)? {
                    Received::Postcopy(start) => start,
                    Received::Complete(_) => return Err("the source did not switch to post-copy".into()),
                };
                let state = start.device_state().to_vec();
                let stale = start.stale_pages();
                // The memory is served from here on; the guest runs at once.
                let serving = Instant::now();
                let running = start.start(receiver, dst, requests)?;
                let resumed = resume(dst_vm.as_mut(), dst, writer, Some(state));
                // A guest that failed on a page that never came: the post-copy's error says why.
                let summary = running.wait()?;
                let (resumed_at, total) = resumed?;
                Ok((summary, stale, resumed_at, total, serving + summary.duration))
            });
            let guest = start_source_guest(s, vcpu, src, writer, &stop);
            let sync = || dirty_log_sync(slots.as_mut());
            let stream = connect(addr)?;
            let mut requests = stream.try_clone()?;
            let mut precopy = Precopy::new(Sender::new_vectored(stream)?, src, config, sync);
            precopy.run()?;
            // While the guest runs: let the destination catch up with round 0, then have it
            // drop what the guest dirtied meanwhile (twice: the second finds little), so that
            // the pause has only the last few milliseconds' pages to deal with.
            caught_up(precopy.wait_for_destination(&mut requests, Duration::from_secs(30))?);
            let mut discarded = 0;
            for _ in 0..DISCARD_ROUNDS {
                discarded += precopy.discard_round()?;
                caught_up(precopy.wait_for_destination(&mut requests, Duration::from_secs(30))?);
            }
            println!("post-copy: {discarded} pages dropped at the destination before the pause ({DISCARD_ROUNDS} discard rounds)");
            let paused_at = Instant::now();
            let (state, writes_at_pause) = pause(guest, &stop)?;
            let (report, stream) = precopy.postcopy(&state, requests)?;
            drop(stream);
            let (summary, stale, resumed_at, total, last_page) =
                destination.join().map_err(|_| "the destination panicked")??;
            assert_eq!(stale, report.stale_pages);
            Ok((report, summary, paused_at, resumed_at, writes_at_pause, total, last_page))
        })?;
    let total_time = last_page - started;
    drop((slots, src_vm));
    println!();
    for r in &report.rounds {
        println!("round {}: {} pages ({} zero) in {:.1} ms", r.round, r.pages, r.zero_pages, ms(r.duration));
    }
    println!(
        "post-copy: {} stale pages ({:.1} MiB) after the switch, {} of them asked for by faults ({} requests ignored), {:.1} ms; {} missing pages were zero",
        report.stale_pages,
        (report.stale_pages * PAGE) as f64 / MIB as f64,
        report.requested_pages,
        report.ignored_requests,
        ms(report.postcopy),
        summary.zero_faults
    );
    println!(
        "source side of the switch {:.2} ms; whole migration {:.0} ms (start to the last page at the destination); stream {:.1} MiB; checksums of {} regions match",
        ms(report.switch),
        ms(total_time),
        report.stream_bytes as f64 / MIB as f64,
        summary.receive.regions_verified
    );
    Ok(Some(Outcome { dst, local: false, paused_at, resumed_at, writes_at_pause, total_writes }))
}

/// The destination's connection: from this host only, with `TCP_NODELAY` (the pause's frames
/// and the return path's messages are small: they must not wait for Nagle).
fn accept_loopback(listener: &TcpListener) -> Result<TcpStream, BoxError> {
    let (stream, peer) = listener.accept()?;
    if !peer.ip().is_loopback() {
        return Err(format!("refusing a connection from {peer}").into());
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The source's connection, with `TCP_NODELAY` (see [`accept_loopback`]).
fn connect(addr: std::net::SocketAddr) -> Result<TcpStream, BoxError> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// KVM's dirty log merged into the source's bitmaps before every harvest (nothing to merge for
/// a host-thread guest).
fn dirty_log_sync(slots: Option<&mut KvmSlots<AtomicBitmap>>) -> Result<(), BoxError> {
    match slots {
        Some(slots) => slots.sync_dirty_log().map(drop).map_err(Into::into),
        None => Ok(()),
    }
}

/// Says so when the destination did not acknowledge in time (the pause then includes its
/// backlog).
fn caught_up(ok: bool) {
    if !ok {
        println!("the destination did not catch up within 30 s; pausing anyway");
    }
}

/// The same host: the memfds over a Unix socket, then the vCPU on a page-less stream.
fn local_migration(
    src: &Mem,
    writer: &LoopingWriter,
    vms: Option<(KvmEnd, KvmEnd)>,
) -> Result<Option<Outcome>, BoxError> {
    let (a, b) = UnixStream::pair()?;
    let stop = AtomicBool::new(false);
    let (src_vm, mut dst_vm) = vms.unzip();
    let (vcpu, slots, src_vm) = match src_vm {
        Some(KvmEnd { vcpu, slots, vm }) => (Some(vcpu), slots, Some(vm)),
        None => (None, None, None),
    };
    std::thread::scope(|s| -> Result<_, BoxError> {
        let guest = start_source_guest(s, vcpu, src, writer, &stop);
        let destination = s.spawn(move || -> Result<_, BoxError> {
            let t = Instant::now();
            let dst = local::receive::<AtomicBitmap>(&b, &ReceiveOptions::default())?;
            let mapped = t.elapsed();
            if let Some(end) = dst_vm.as_mut() {
                end.register(&dst, false)?;
            }
            let mut receiver = Receiver::new_vectored(&b);
            let summary = receiver.receive(&dst)?;
            let (resumed_at, total) = resume(dst_vm.as_mut(), &dst, writer, receiver.take_device_state())?;
            drop(dst_vm);
            Ok((dst, mapped, summary, resumed_at, total))
        });
        // The memory goes while the guest runs: both sides see the same pages from now on.
        let t = Instant::now();
        let sent = local::send(&a, src)?;
        let handed_over = t.elapsed();
        std::thread::sleep(LOCAL_RUN);
        let paused_at = Instant::now();
        let (state, writes_at_pause) = pause(guest, &stop)?;
        // The source VM lets go of the memory before the destination's runs in it.
        drop((slots, src_vm));
        let mut sender = Sender::new_vectored(&a)?;
        sender.send_device_state(&state)?;
        sender.finish(src)?;
        let (dst, mapped, summary, resumed_at, total_writes) =
            destination.join().map_err(|_| "the destination panicked")??;
        println!();
        println!(
            "local: {} regions, {} MiB handed over in {:.2} ms ({:.2} ms per GiB; the destination mapped them in {:.2} ms)",
            sent.regions,
            sent.bytes / MIB,
            ms(handed_over),
            ms(handed_over) * (1u64 << 30) as f64 / sent.bytes as f64,
            ms(mapped)
        );
        println!(
            "local: {} pages of guest memory copied; the vCPU's {} bytes of state went on a page-less stream",
            summary.pages,
            state.len()
        );
        if summary.pages != 0 || summary.device_state_len != Some(state.len() as u64) {
            println!("VERIFICATION FAILED: a local migration copied pages, or lost the vCPU state");
            return Ok(None);
        }
        Ok(Some(Outcome { dst, local: true, paused_at, resumed_at, writes_at_pause, total_writes }))
    })
}

/// Proves that `mem` is what the guest makes of the initial memory in its first `writes`
/// writes: the window as the host's replay of them says, every other page stamped, the code
/// in place. Prints the verdict.
fn check(mem: &Mem, writer: &LoopingWriter, code: &[u8], writes: u64, name: &str) -> Result<bool, BoxError> {
    let t = Instant::now();
    let expected: std::collections::HashMap<u64, (u32, u32)> =
        writer.expected(writes).into_iter().map(|(gpa, seq, count)| (gpa, (seq, count))).collect();
    let mut page = vec![0u8; PAGE as usize];
    let mut want = vec![0u8; PAGE as usize];
    let mut pages = 0u64;
    for region in mem.iter() {
        let end = region.start_addr().0 + region.len();
        for gpa in (region.start_addr().0..end).step_by(PAGE as usize) {
            mem.read_slice(&mut page, GuestAddress(gpa))?;
            want.fill(0);
            if in_window(writer, gpa) {
                if let Some(&(seq, count)) = expected.get(&gpa) {
                    want[SEQ_OFFSET as usize..][..4].copy_from_slice(&seq.to_le_bytes());
                    want[COUNT_OFFSET as usize..][..4].copy_from_slice(&count.to_le_bytes());
                }
            } else {
                want[..8].copy_from_slice(&(gpa ^ STAMP).to_le_bytes());
                if (gpa..gpa + PAGE).contains(&CODE_GPA) {
                    let at = (CODE_GPA - gpa) as usize;
                    let n = code.len().min(want.len() - at);
                    want[at..at + n].copy_from_slice(&code[..n]);
                }
            }
            if let Some(i) = page.iter().zip(&want).position(|(x, y)| x != y) {
                println!(
                    "VERIFICATION FAILED: {name} page {gpa:#x} differs at byte {i} from what an unmigrated guest makes \
                     of it after {writes} writes ({:#04x}, expected {:#04x})",
                    page[i], want[i]
                );
                return Ok(false);
            }
            pages += 1;
        }
    }
    println!(
        "VERIFIED: {name} memory is exactly what {writes} writes of an unmigrated guest make ({} pages, {} of \
         them written, checked in {:.0} ms)",
        pages,
        expected.len(),
        ms(t.elapsed())
    );
    Ok(true)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_report(report: &MigrationReport, summary: &ReceiveSummary, size: u64) {
    println!();
    println!(
        "{:>6} {:>9} {:>9} {:>10} {:>10} {:>11} {:>16}",
        "round", "pages", "zero", "MiB", "time ms", "MiB/s", "dirty pages/s"
    );
    let row = |label: String, r: &RoundStats| {
        let rate = r.dirty_pages_per_sec.map_or("-".to_string(), |p| format!("{p:.0}"));
        println!(
            "{label:>6} {:>9} {:>9} {:>10.1} {:>10.1} {:>11.0} {rate:>16}",
            r.pages,
            r.zero_pages,
            r.bytes as f64 / MIB as f64,
            ms(r.duration),
            r.bandwidth() / MIB as f64
        );
    };
    for r in &report.rounds {
        row(r.round.to_string(), r);
    }
    row("final".to_string(), &report.final_round);
    println!();
    match report.stop {
        StopReason::Converged { remaining_bytes, estimate } => println!(
            "pre-copy converged after {} rounds: {:.1} MiB left, {:.1} ms at {:.0} MiB/s (budget {:.0} ms)",
            report.rounds.len(),
            remaining_bytes as f64 / MIB as f64,
            ms(estimate),
            report.bandwidth / MIB as f64,
            ms(DOWNTIME_BUDGET)
        ),
        StopReason::MaxRounds { remaining_bytes } => println!(
            "pre-copy stopped after {} rounds without converging: {:.1} MiB left",
            report.rounds.len(),
            remaining_bytes as f64 / MIB as f64
        ),
    }
    println!(
        "source side of the pause: final round and vCPU state {:.2} ms, checksums {:.2} ms",
        ms(report.downtime),
        ms(report.verify)
    );
    println!(
        "stream: {:.1} MiB for {} MiB of memory; received {} rounds, {} pages ({} as zero runs), {} bytes of vCPU state; \
         checksums of {} regions match",
        report.stream_bytes as f64 / MIB as f64,
        size / MIB,
        summary.rounds,
        summary.pages,
        summary.zero_pages,
        summary.device_state_len.unwrap_or(0),
        summary.regions_verified
    );
}
