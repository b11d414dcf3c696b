//! Live migration of a running guest's memory over loopback TCP, the way a VMM does it.
//!
//! ```text
//! cargo run --release --example live_migration [MiB] [--no-kvm]     # 1024 MiB by default
//! cargo run --release --features kvm --example live_migration       # merge KVM's log with KvmSlots
//! ```
//!
//! 1. Source memory (two regions, `MiB` in all) with dirty tracking, and a real KVM guest
//!    whose vCPU keeps writing pseudo-random pages of a window of it (the test harness's
//!    `LoopingWriter`, a real-mode program). Without a usable /dev/kvm (or with `--no-kvm`), a
//!    host thread writing through the API plays the guest.
//! 2. A destination memory in another thread, fed by a `Receiver` over 127.0.0.1.
//! 3. Pre-copy: round 0 sends all of memory, then rounds of dirty pages (KVM's dirty log
//!    merged into guestmem's bitmaps before each harvest, so a round has the union of guest
//!    and host writes) until what is left fits in the downtime budget.
//! 4. The vCPU is paused at its next I/O exit, the final round goes out, the checksums are
//!    exchanged, and the destination is compared with the source byte for byte.
//!
//! Exits non-zero if the destination differs from the source.

use guestmem_kvm_guest as kvm_guest;

use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guestmem::migration::{
    MigrationReport, Precopy, PrecopyConfig, ReceiveSummary, Receiver, Sender, StopReason,
};
use guestmem::{AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use kvm_guest::{GuestError, LoopingWriter};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const MIB: u64 = 1 << 20;
/// Where the guest's code sits (outside the window it writes).
const CODE_GPA: u64 = 0x1000;
/// The window the guest writes: from 16 MiB, at most 256 MiB (the harness's limit).
const WINDOW_START: u64 = 16 * MIB;
const WINDOW_MAX_PAGES: u64 = 65536;
/// The pause the source may take.
const DOWNTIME: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

fn run() -> Result<bool, BoxError> {
    let mut mib: u64 = 1024;
    let mut use_kvm = true;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--no-kvm" => use_kvm = false,
            _ => mib = arg.parse().map_err(|e| format!("memory size in MiB {arg:?}: {e}"))?,
        }
    }
    if !(32..=1 << 20).contains(&mib) {
        return Err(format!("memory size must be 32 MiB to 1 TiB, not {mib} MiB").into());
    }
    let size = mib * MIB;
    // Two adjacent regions, as a VMM with RAM split around a device window would have.
    let half = (size / 2) & !(MIB - 1);
    let layout = [(GuestAddress(0), half as usize), (GuestAddress(half), (size - half) as usize)];
    let src = Mem::from_ranges(&layout)?;
    let dst = Mem::from_ranges(&layout)?;
    // Some contents: a stamp on every page (the rest stays zero).
    let t = Instant::now();
    for page in (0..size).step_by(4096) {
        src.write_obj(page ^ 0x5eed_0000_0000_0000, GuestAddress(page))?;
    }
    println!("source: {mib} MiB in {} regions, filled in {:.0} ms", src.num_regions(), ms(t.elapsed()));

    let window_pages = ((size - WINDOW_START) / 4096).min(WINDOW_MAX_PAGES) as u32;
    let writer = LoopingWriter { writes_per_exit: 64, ..LoopingWriter::new(WINDOW_START, window_pages) };
    println!(
        "guest window: {:#x}..{:#x} ({} MiB), {} writes per I/O exit",
        writer.range_start,
        writer.range_end(),
        u64::from(window_pages) * 4096 / MIB,
        writer.writes_per_exit
    );

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let config = PrecopyConfig { downtime: DOWNTIME, max_rounds: 20, rate_window: 3 };

    let kvm = if use_kvm { kvm_guest::kvm_available() } else { Err("--no-kvm".to_string()) };
    let (report, summary, guest_writes, paused_for) = match kvm {
        Ok(()) => {
            println!("guest: a real-mode KVM vCPU (LoopingWriter)");
            with_kvm_guest(&src, &dst, &writer, listener, addr, config)?
        }
        Err(why) => {
            println!("guest: no KVM here ({why}); a host thread writing through the API plays the guest");
            with_host_guest(&src, &dst, &writer, listener, addr, config)?
        }
    };
    print_report(&report, &summary, guest_writes, paused_for);
    println!("destination tracking saw {} dirty pages", dst.dirty_page_count()?);
    // The receiver counted what arrived; it must be what the sender says it sent.
    let sent_pages: u64 = report.rounds.iter().chain([&report.final_round]).map(|r| r.pages).sum();
    if summary.rounds != report.rounds.len() as u64 + 1 || summary.pages != sent_pages {
        println!(
            "VERIFICATION FAILED: sent {} rounds and {sent_pages} pages, received {} rounds and {} pages",
            report.rounds.len() + 1,
            summary.rounds,
            summary.pages
        );
        return Ok(false);
    }
    verify(&src, &dst)
}

/// The migration with a KVM vCPU as the guest.
fn with_kvm_guest(
    src: &Mem,
    dst: &Mem,
    writer: &LoopingWriter,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    config: PrecopyConfig,
) -> Result<(MigrationReport, ReceiveSummary, u64, Duration), BoxError> {
    let vm = kvm_guest::TestVm::new()?;
    let mut sync = dirty_log_sync(&vm, src)?;
    // Our own vCPU, so the VM stays shared (for the dirty log) while the vCPU runs elsewhere.
    let mut vcpu = vm.vm_fd().create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    // The code is loaded through the API: a host write, tracked like any other.
    kvm_guest::start_looping_writer(&mut vcpu, CODE_GPA, writer, &mut |gpa, code| {
        src.write_slice(code, GuestAddress(gpa)).map_err(|e| GuestError::Load { gpa, reason: e.to_string() })
    })?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let receiver = s.spawn(move || receive(dst, listener));
        let stop = &stop;
        let port = writer.port;
        let guest = s.spawn(move || -> Result<u64, GuestError> {
            let mut writes = 0;
            while !stop.load(Ordering::Relaxed) {
                writes = u64::from(kvm_guest::run_until_exits(&mut vcpu, port, 1)?[0]);
            }
            Ok(writes)
        });
        // The final check compares every region's contents too, read at both ends.
        let sender = Sender::new_vectored(TcpStream::connect(addr)?)?.verify_memory(true);
        let mut precopy = Precopy::new(sender, src, config, &mut sync);
        precopy.run()?;
        // Pause: the vCPU stops at its next I/O exit (at most `writes_per_exit` writes away).
        let pause = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let writes = guest.join().map_err(|_| "the vCPU thread panicked")??;
        let paused_for = pause.elapsed();
        let (report, stream) = precopy.complete()?;
        drop(stream);
        let summary = receiver.join().map_err(|_| "the receiver thread panicked")??;
        Ok((report, summary, writes, paused_for))
    })
}

/// Merges KVM's dirty log into the source's bitmaps: `KvmSlots` with the `kvm` feature.
#[cfg(feature = "kvm")]
fn dirty_log_sync<'a>(
    vm: &kvm_guest::TestVm,
    src: &Mem,
) -> Result<impl FnMut() -> Result<(), BoxError> + 'a, BoxError> {
    // KvmSlots keeps its own duplicate of the VM descriptor.
    let mut slots = guestmem::kvm::KvmSlots::new(vm.vm_fd(), true)?;
    slots.register(src)?;
    println!("dirty log: KvmSlots::sync_dirty_log (feature kvm)");
    Ok(move || slots.sync_dirty_log().map(drop).map_err(Into::into))
}

/// Merges KVM's dirty log into the source's bitmaps: without the `kvm` feature, the harness
/// registers the slots and reads the log, and each dirty page is marked through the API.
#[cfg(not(feature = "kvm"))]
fn dirty_log_sync<'a>(
    vm: &'a kvm_guest::TestVm,
    src: &'a Mem,
) -> Result<impl FnMut() -> Result<(), BoxError> + 'a, BoxError> {
    let mut slots = Vec::new();
    for (i, region) in src.iter().enumerate() {
        let slot = kvm_guest::MemorySlot {
            slot: i as u32,
            guest_phys_addr: region.start_addr().0,
            size: region.len(),
            userspace_addr: region.host_ptr() as u64,
            flags: kvm_guest::LOG_DIRTY_PAGES,
        };
        // SAFETY: the region belongs to `src`, which outlives the VM (the caller drops the VM
        // first); the guest writes it, which is what guest memory is for.
        unsafe { kvm_guest::set_user_memory_region(vm.vm_fd(), &slot)? };
        slots.push(slot);
    }
    println!("dirty log: KVM_GET_DIRTY_LOG through the harness, marked page by page (build with --features kvm for KvmSlots)");
    Ok(move || {
        for slot in &slots {
            for gpa in kvm_guest::dirty_pages(vm.vm_fd(), slot)? {
                src.mark_dirty(GuestAddress(gpa), 4096)?;
            }
        }
        Ok(())
    })
}

/// The migration with a host thread as the guest, writing about as fast as the KVM guest.
fn with_host_guest(
    src: &Mem,
    dst: &Mem,
    writer: &LoopingWriter,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    config: PrecopyConfig,
) -> Result<(MigrationReport, ReceiveSummary, u64, Duration), BoxError> {
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        let receiver = s.spawn(move || receive(dst, listener));
        let (stop, writes_ref) = (&stop, &writes);
        let guest = s.spawn(move || -> Result<(), guestmem::GuestMemoryError> {
            for (n, page) in (1u64..).zip(writer.pages()) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // What the guest's program does: stamp the write number, count the write.
                src.write_obj(n as u32, GuestAddress(page))?;
                let count: u32 = src.read_obj(GuestAddress(page + 4))?;
                src.write_obj(count.wrapping_add(1), GuestAddress(page + 4))?;
                writes_ref.store(n, Ordering::Relaxed);
                if n % u64::from(writer.writes_per_exit) == 0 {
                    // ~64 writes per 0.6 ms, like the emulated guest.
                    std::thread::sleep(Duration::from_micros(600));
                }
            }
            Ok(())
        });
        // The final check compares every region's contents too, read at both ends.
        let sender = Sender::new_vectored(TcpStream::connect(addr)?)?.verify_memory(true);
        let mut precopy = Precopy::new(sender, src, config, || Ok::<(), std::io::Error>(()));
        precopy.run()?;
        let pause = Instant::now();
        stop.store(true, Ordering::Relaxed);
        guest.join().map_err(|_| "the writer thread panicked")??;
        let paused_for = pause.elapsed();
        let (report, _stream) = precopy.complete()?;
        let summary = receiver.join().map_err(|_| "the receiver thread panicked")??;
        Ok((report, summary, writes.load(Ordering::Relaxed), paused_for))
    })
}

/// The destination: one connection, the whole stream (checksums verified inside).
fn receive(dst: &Mem, listener: TcpListener) -> Result<ReceiveSummary, BoxError> {
    let (stream, peer) = listener.accept()?;
    if !peer.ip().is_loopback() {
        return Err(format!("refusing a connection from {peer}").into());
    }
    Ok(Receiver::new_vectored(stream).receive(dst)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_report(report: &MigrationReport, summary: &ReceiveSummary, guest_writes: u64, paused_for: Duration) {
    println!();
    println!(
        "{:>6} {:>9} {:>11} {:>10} {:>11} {:>16}",
        "round", "pages", "MiB", "time ms", "MiB/s", "dirty pages/s"
    );
    let row = |label: String, r: &guestmem::migration::RoundStats| {
        let rate = r.dirty_pages_per_sec.map_or("-".to_string(), |p| format!("{p:.0}"));
        println!(
            "{label:>6} {:>9} {:>11.1} {:>10.1} {:>11.0} {rate:>16}",
            r.pages,
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
            ms(DOWNTIME)
        ),
        StopReason::MaxRounds { remaining_bytes } => println!(
            "pre-copy stopped after {} rounds without converging: {:.1} MiB left",
            report.rounds.len(),
            remaining_bytes as f64 / MIB as f64
        ),
    }
    println!(
        "downtime: {:.1} ms (pausing the guest {:.2} ms + final round {:.1} ms); checksums {:.1} ms",
        ms(paused_for + report.downtime),
        ms(paused_for),
        ms(report.downtime),
        ms(report.verify)
    );
    println!(
        "stream: {:.1} MiB; received {} rounds, {} pages; guest wrote {} times",
        report.stream_bytes as f64 / MIB as f64,
        summary.rounds,
        summary.pages,
        guest_writes
    );
    println!("checksums: {} regions match on the destination", summary.regions_verified);
}

/// Compares every byte of the two memories; prints the verdict.
fn verify(src: &Mem, dst: &Mem) -> Result<bool, BoxError> {
    let t = Instant::now();
    let mut a = vec![0u8; MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    let mut compared = 0u64;
    for region in src.iter() {
        let mut at = region.start_addr().0;
        let end = at + region.len();
        while at < end {
            let n = ((end - at) as usize).min(a.len());
            src.read_slice(&mut a[..n], GuestAddress(at))?;
            dst.read_slice(&mut b[..n], GuestAddress(at))?;
            if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
                println!(
                    "VERIFICATION FAILED: destination differs at {:#x} (source {:#04x}, destination {:#04x})",
                    at + i as u64,
                    a[i],
                    b[i]
                );
                return Ok(false);
            }
            at += n as u64;
            compared += n as u64;
        }
    }
    println!(
        "VERIFIED: destination equals source byte for byte ({} MiB compared in {:.0} ms)",
        compared / MIB,
        ms(t.elapsed())
    );
    Ok(true)
}
