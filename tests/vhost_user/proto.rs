//! The part of the vhost-user protocol the two-process tests speak, framed as the spec says: a
//! 12-byte header (request, flags, payload size; native endian), the payload, and descriptors
//! in the ancillary data of the header. Plus a few test-only requests (numbers outside the
//! protocol's) with which the front-end tells the back-end process what to do, and a child
//! process helper: the back-end is the test binary run again.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guestmem::sys::socket::{recv_with_at_most_fds, send_with_fds};

pub const SET_FEATURES: u32 = 2;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_ADDR: u32 = 9;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
/// `VHOST_F_LOG_ALL`: logging on.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_VRING_F_LOG` (bit 0 of a vring address message's flags).
pub const VRING_F_LOG: u32 = 1;

/// Test-only: process the ring's available buffers (the reply is how many).
pub const T_PROCESS_RING: u32 = 0x1000;
/// Test-only: start a thread that keeps writing guest memory.
pub const T_START_WRITER: u32 = 0x1001;
/// Test-only: stop and join it (the reply is how many writes it made).
pub const T_STOP_WRITER: u32 = 0x1002;
/// Test-only: how many descriptors the back-end process has open.
pub const T_OPEN_FDS: u32 = 0x1003;
/// Test-only: how many memfd mappings the back-end process has.
pub const T_MEMFD_MAPPINGS: u32 = 0x1004;
/// Test-only: how many regions the back-end memory has.
pub const T_REGIONS: u32 = 0x1005;

const VERSION: u32 = 1;
const REPLY: u32 = 1 << 2;
const NEED_REPLY: u32 = 1 << 3;
const HEADER: usize = 12;
/// The largest payload either side accepts (a table of 8 regions is 264 bytes).
pub const MAX_PAYLOAD: usize = 4096;
/// The most descriptors one message carries.
pub const MAX_FDS: usize = 8;

/// One message as received.
#[derive(Debug)]
pub struct Msg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One end of a vhost-user connection.
pub struct Conn {
    pub sock: UnixStream,
}

impl Conn {
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(HEADER + payload.len());
        msg.extend_from_slice(&request.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        msg.extend_from_slice(payload);
        let n = send_with_fds(self.sock.as_fd(), &msg, fds)?;
        (&self.sock).write_all(&msg[n..])
    }

    /// The next message, or `None` when the peer closed the connection. A payload larger than
    /// [`MAX_PAYLOAD`] or more than [`MAX_FDS`] descriptors are errors.
    pub fn recv(&self) -> io::Result<Option<Msg>> {
        let mut header = [0u8; HEADER];
        let (n, fds) = recv_with_at_most_fds(self.sock.as_fd(), &mut header, MAX_FDS)?;
        if n == 0 {
            return Ok(None);
        }
        (&self.sock).read_exact(&mut header[n..])?;
        let word = |i: usize| u32::from_ne_bytes(header[i..i + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("payload of {size} bytes")));
        }
        let mut payload = vec![0u8; size];
        (&self.sock).read_exact(&mut payload)?;
        Ok(Some(Msg { request, flags, payload, fds }))
    }

    /// Sends a request that needs a reply and returns the reply's payload.
    pub fn call(&self, request: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<Vec<u8>> {
        self.send(request, VERSION | NEED_REPLY, payload, fds)?;
        let reply = self.recv()?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if reply.request != request || reply.flags & REPLY == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("reply {reply:?} to {request}")));
        }
        Ok(reply.payload)
    }

    /// A request whose reply is a status (see [`status`]).
    pub fn call_status(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<Result<u64, String>> {
        Ok(parse_status(&self.call(request, payload, fds)?))
    }

    pub fn reply(&self, request: u32, payload: &[u8]) -> io::Result<()> {
        self.send(request, VERSION | REPLY, payload, &[])
    }
}

/// A status reply: `u64` 0 and a `u64` value on success; `u64` 1 and the error's `Debug` text
/// on failure (the protocol's reply is the `u64`; the rest is for the tests).
pub fn status<E: std::fmt::Debug>(r: Result<u64, E>) -> Vec<u8> {
    match r {
        Ok(v) => [0u64.to_ne_bytes(), v.to_ne_bytes()].concat(),
        Err(e) => [&1u64.to_ne_bytes()[..], format!("{e:?}").as_bytes()].concat(),
    }
}

pub fn parse_status(payload: &[u8]) -> Result<u64, String> {
    let word = |i: usize| payload.get(i..i + 8).map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
    match word(0) {
        Some(0) => Ok(word(8).unwrap_or(0)),
        _ => Err(String::from_utf8_lossy(payload.get(8..).unwrap_or_default()).into_owned()),
    }
}

pub fn u64_payload(v: u64) -> [u8; 8] {
    v.to_ne_bytes()
}

/// The environment a back-end child finds its socket and role in.
const SOCKET_ENV: &str = "GUESTMEM_VHOST_SOCKET";
const ROLE_ENV: &str = "GUESTMEM_VHOST_ROLE";
const TEST_ENV: &str = "GUESTMEM_VHOST_TEST";

/// In the back-end child of `test`: the socket to connect to and the role to play.
pub fn backend_child(test: &str) -> Option<(PathBuf, String)> {
    if std::env::var(TEST_ENV).as_deref() != Ok(test) {
        return None;
    }
    let path = PathBuf::from(std::env::var(SOCKET_ENV).ok()?);
    Some((path, std::env::var(ROLE_ENV).unwrap_or_default()))
}

/// The front-end's side of a back-end child process: the connection, and the child.
pub struct Backend {
    pub conn: Conn,
    child: Option<Child>,
    test: String,
}

impl Backend {
    /// Starts the back-end: the test binary again, running only `test` with the socket's path
    /// and `role` in its environment, and accepts its connection on a fresh Unix socket.
    pub fn spawn(test: &str, role: &str) -> Backend {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("guestmem-vhost-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(TEST_ENV, test)
            .env(SOCKET_ENV, &path)
            .env(ROLE_ENV, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let sock = loop {
            match listener.accept() {
                Ok((sock, _)) => break sock,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(status) = child.try_wait().unwrap() {
                        let out = child.wait_with_output().unwrap();
                        panic!(
                            "{test}: the back-end exited ({status}) before connecting\n{}\n{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    assert!(Instant::now() < deadline, "{test}: the back-end did not connect");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let _ = std::fs::remove_file(&path);
        sock.set_nonblocking(false).unwrap();
        Backend { conn: Conn { sock }, child: Some(child), test: test.to_string() }
    }

    /// Closes the connection and requires the back-end to exit after passing.
    pub fn finish(mut self) {
        let _ = self.conn.sock.shutdown(std::net::Shutdown::Both);
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{}: the back-end failed ({})\n{stdout}\n{}",
            self.test,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The exit of a back-end that is expected to close the connection itself (or crash
    /// trying): whether it passed, and its output.
    pub fn wait(mut self) -> (bool, String) {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let text =
            format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success() && text.contains("1 passed"), text)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects the back-end child to the front-end's socket.
pub fn connect(path: &std::path::Path) -> Conn {
    Conn { sock: UnixStream::connect(path).unwrap() }
}
