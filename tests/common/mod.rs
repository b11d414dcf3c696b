//! Test support shared by the integration tests: resources a test may need (huge pages, a
//! hugetlbfs mount, /dev/kvm), skipped with a printed reason when missing, or failed when
//! `GUESTMEM_REQUIRE` names them (CI sets `GUESTMEM_REQUIRE=kvm,hugetlb,blockdev,kernel`).

#![allow(dead_code)]

#[allow(unused_imports)]
pub use guestmem_kvm_guest as kvm_guest;

use std::path::PathBuf;

/// A code loader for the test guests of `kvm_guest` that writes through the library (a host
/// write, so its pages are host-dirty).
pub fn loader<M: guestmem::Bytes<guestmem::GuestAddress, E: std::fmt::Display>>(
    mem: &M,
) -> impl FnMut(u64, &[u8]) -> Result<(), kvm_guest::GuestError> + '_ {
    move |gpa, code| {
        mem.write_slice(code, guestmem::GuestAddress(gpa))
            .map_err(|e| kvm_guest::GuestError::Load { gpa, reason: e.to_string() })
    }
}

/// Whether `resource` is listed in `GUESTMEM_REQUIRE`.
fn required(resource: &str) -> bool {
    std::env::var("GUESTMEM_REQUIRE").is_ok_and(|v| v.split(',').any(|r| r.trim() == resource))
}

/// Returns `Some(value)` when the resource is there; otherwise prints why the test skips and
/// returns `None`, or panics if `GUESTMEM_REQUIRE` asks for the resource.
pub fn need<T>(resource: &str, test: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) if required(resource) => {
            panic!("{test}: {resource} is required (GUESTMEM_REQUIRE) but {why}")
        }
        Err(why) => {
            // Straight to fd 2: the test harness captures `eprintln!`, and a skip must show.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping {test}: {why} (set GUESTMEM_REQUIRE={resource} to fail instead)"
            );
            None
        }
    }
}

/// Free 2 MiB huge pages in the pool.
pub fn free_huge_pages_2m() -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<usize> {
        meminfo.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    if field("Hugepagesize:") != Some(2048) {
        return 0;
    }
    field("HugePages_Free:").unwrap_or(0)
}

/// At least `pages` free 2 MiB huge pages, or why not.
pub fn huge_pages(pages: usize) -> Result<(), String> {
    let free = free_huge_pages_2m();
    if free >= pages {
        Ok(())
    } else {
        Err(format!("{free} free 2 MiB huge pages, {pages} needed (sysctl vm.nr_hugepages)"))
    }
}

/// A writable 2 MiB hugetlbfs mount: `GUESTMEM_HUGETLBFS`, else the first in /proc/mounts.
pub fn hugetlbfs_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("GUESTMEM_HUGETLBFS") {
        return Ok(PathBuf::from(dir));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fs, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (fs == "hugetlbfs" && !opts.contains("pagesize=1G") && !opts.split(',').any(|o| o == "ro"))
                .then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| "no hugetlbfs is mounted (or set GUESTMEM_HUGETLBFS)".to_string())
}

/// A new file in a hugetlbfs mount, sized `len`, removed when dropped.
pub struct HugetlbfsFile {
    pub path: PathBuf,
    pub file: std::fs::File,
}

impl HugetlbfsFile {
    pub fn new(dir: &std::path::Path, len: u64) -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("guestmem-test-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        file.set_len(len)?;
        Ok(HugetlbfsFile { path, file })
    }
}

impl Drop for HugetlbfsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every byte of every region of `mem`, region by region.
pub fn contents<M: guestmem::GuestMemory>(mem: &M) -> Vec<Vec<u8>> {
    use guestmem::{Bytes, GuestMemoryRegion};
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).unwrap();
            v
        })
        .collect()
}

/// The end of an error-variant enumeration test: the errors `produced` by real calls name
/// exactly the variants in `all` (through the test's exhaustive `name` match), each has a
/// message, and, with `one_each`, there is exactly one producing call per variant.
pub fn assert_every_variant<E: std::fmt::Debug + std::fmt::Display>(
    produced: &[E],
    name: impl Fn(&E) -> &'static str,
    all: &[&'static str],
    one_each: bool,
) {
    let names: std::collections::BTreeSet<&str> = produced.iter().map(name).collect();
    let all_set: std::collections::BTreeSet<&str> = all.iter().copied().collect();
    assert_eq!(names, all_set);
    if one_each {
        assert_eq!(produced.len(), all.len(), "one producing call per variant: {produced:?}");
    }
    for e in produced {
        assert!(!e.to_string().is_empty());
    }
}

/// The environment variable that tells a re-executed test binary which test it runs as a child.
const CHILD_ENV: &str = "GUESTMEM_CHILD_TEST";

/// Runs `body` in a child process, so that a signal (SIGSEGV, SIGBUS, an abort from a failed
/// allocation) is a reported failure of this test instead of the end of the test run: the test
/// binary runs again with only `test` (the test's name as `cargo test` prints it) and
/// `GUESTMEM_CHILD_TEST=test`, and there calls `body`. The parent fails, with the child's
/// output, if the child does not exit normally after passing.
pub fn in_child(test: &str, body: impl FnOnce()) {
    use std::os::unix::process::ExitStatusExt;
    let Some(out) = child(test, body) else { return };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(signal) = out.status.signal() {
        panic!("{test}: the child was killed by signal {signal}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    assert!(
        out.status.success(),
        "{test}: the child failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("1 passed"), "{test}: the child did not run the test\nstdout:\n{stdout}");
}

/// In the child for `test`, runs `body` and returns `None`; in the parent, runs this test binary
/// again for `test` alone and returns what it printed and how it ended.
fn child(test: &str, body: impl FnOnce()) -> Option<std::process::Output> {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        body();
        return None;
    }
    Some(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, test)
            .output()
            .unwrap(),
    )
}

/// Runs `body` in a child process like [`in_child`], and requires that the child is killed by
/// `signal` (a fault that nothing may recover, such as a SIGBUS outside guestmem's memory).
pub fn in_child_killed_by(test: &str, signal: i32, body: impl FnOnce()) {
    use std::os::unix::process::ExitStatusExt;
    let Some(out) = child(test, body) else { return };
    assert_eq!(
        out.status.signal(),
        Some(signal),
        "{test}: the child was not killed by signal {signal} ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs each of `names` (a table of hostile calls) in a child process of its own: this test
/// binary again, running only the test `runner` with the case's index in `env`; the runner
/// exits 0 when the case returned what it must. Fails listing every case that gave a wrong
/// result or was killed by a signal.
pub fn run_cases_in_children(names: &[&str], runner: &str, env: &str) {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().unwrap();
    let mut failures = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let out = std::process::Command::new(&exe)
            .args(["--exact", runner, "--nocapture", "--test-threads=1"])
            .env(env, i.to_string())
            .output()
            .unwrap();
        match (out.status.code(), out.status.signal()) {
            (Some(0), _) => {}
            (Some(code), _) => failures.push(format!("{name}: wrong result (exit {code})")),
            (None, Some(sig)) => failures.push(format!("{name}: killed by signal {sig}")),
            (None, None) => failures.push(format!("{name}: ended abnormally")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile calls failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

/// This process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A small xorshift generator: deterministic pseudo-random numbers without a crate. The seed
/// must not be zero.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (not zero).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The driver's side of a split virtqueue: where its rings are, and making chains available.
pub mod virtq {
    use std::sync::atomic::Ordering;

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemory};

    /// A queue's descriptor table and avail ring addresses, and its size.
    #[derive(Clone, Copy)]
    pub struct Rings {
        pub desc: u64,
        pub avail: u64,
        pub size: u16,
    }

    impl Rings {
        /// Puts a chain of `(addr, len, device-writable)` buffers at descriptor `first` and
        /// makes it available as the `nth` avail entry (index published with Release).
        pub fn offer<M: GuestMemory>(&self, mem: &M, first: u16, nth: u16, bufs: &[(u64, u32, bool)]) {
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = first + i as u16;
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let at = GuestAddress(self.desc + 16 * u64::from(idx));
                mem.write_obj(Descriptor::new(addr, len, flags, idx + 1), at).unwrap();
            }
            mem.write_obj(first, GuestAddress(self.avail + 4 + 2 * u64::from(nth % self.size))).unwrap();
            mem.store(nth.wrapping_add(1), GuestAddress(self.avail + 2), Ordering::Release).unwrap();
        }
    }
}
