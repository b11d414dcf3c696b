//! Descriptor passing over Unix sockets: `sendmsg(2)` and `recvmsg(2)` with one `SCM_RIGHTS`
//! control message (`unix(7)`, `cmsg(3)`), the way a vhost-user front-end hands memory and log
//! descriptors to its back-end.
//!
//! Both calls are safe for any descriptor: on something that is not a socket the kernel answers
//! `ENOTSOCK`. Descriptors that arrive become [`OwnedFd`]s (opened close-on-exec) before anything
//! else can fail, so an error never leaks one: a peer that sends more descriptors than the
//! receiver asked for, whose control message was cut (`MSG_CTRUNC`), whose datagram did not fit
//! (`MSG_TRUNC`), or that sends a control message other than `SCM_RIGHTS`, gets an error back
//! and every descriptor it sent is closed.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt_long, retry_eintr};

/// The most descriptors one message may carry (`SCM_MAX_FD` of the kernel).
pub const MAX_FDS: usize = 253;

/// Bytes of the largest control message: `CMSG_SPACE(MAX_FDS * sizeof(int))`.
// SAFETY: CMSG_SPACE is arithmetic on its argument (it reads no memory).
const CONTROL_BYTES: usize = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;

/// A control-message buffer aligned for `cmsghdr` (its fields are `usize` and `c_int`).
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// What [`recv_with_fds`] received: the bytes read into the caller's buffer and the
/// descriptors that came with them, in the order they were sent.
#[derive(Debug)]
pub struct Received {
    /// Bytes written to the start of the buffer (0: the peer closed the connection).
    pub len: usize,
    /// The descriptors, owned by the caller (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// `sendmsg(2)` of `data` on a Unix socket with `fds` in one `SCM_RIGHTS` control message
/// (`MSG_NOSIGNAL`: a closed peer is `EPIPE`, not a signal). Returns the bytes sent, which on a
/// stream socket may be fewer than `data.len()`; the descriptors go with the first byte.
///
/// More than [`MAX_FDS`] descriptors, or descriptors without data (a stream socket would drop
/// them), are `EINVAL`.
///
/// ```
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use guestmem::sys::socket::{recv_with_fds, send_with_fds};
///
/// let (a, b) = UnixStream::pair().unwrap();
/// let memfd = guestmem::sys::memfd_create(c"ram", guestmem::sys::MemfdFlags::CLOEXEC).unwrap();
/// assert_eq!(send_with_fds(a.as_fd(), b"hello", &[memfd.as_fd()]).unwrap(), 5);
/// let mut buf = [0u8; 16];
/// let got = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
/// assert_eq!((&buf[..got.len], got.fds.len()), (&b"hello"[..], 1));
/// let same = guestmem::sys::fstat(got.fds[0].as_fd()).unwrap();
/// assert!(same.same_inode(&guestmem::sys::fstat(memfd.as_fd()).unwrap()));
/// ```
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS || (data.is_empty() && !fds.is_empty()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    let fd_bytes = fds.len() * size_of::<RawFd>();
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is a valid empty one (null name, control and iov).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: arithmetic only; `fd_bytes` <= MAX_FDS * 4, so the space fits the buffer.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        // SAFETY: `msg` points at our buffer of `msg_controllen` (>= one cmsghdr) bytes, which
        // is aligned for cmsghdr, so the first header is inside it.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `cmsg` is the first header of our buffer (non-null, as the buffer holds one),
        // and its data area has room for `fd_bytes` bytes (CMSG_SPACE above): the header
        // fields and the descriptor numbers are written inside the buffer, unaligned for the
        // data as cmsg(3) allows.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    retry_eintr(|| {
        // SAFETY: `msg` describes our live iovec (readable `data`) and control buffer; sendmsg
        // only reads them.
        cvt_long(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) }).map(|n| n as usize)
    })
}

/// `recvmsg(2)` into `buf` on a Unix socket, accepting up to `max_fds` descriptors
/// (`MSG_CMSG_CLOEXEC`). The descriptors that arrive are owned by the returned [`Received`].
///
/// Errors (every received descriptor is closed first): more than [`MAX_FDS`] asked for is
/// `EINVAL`; a control message the kernel had to cut because more descriptors came than
/// `max_fds` allows (`MSG_CTRUNC`), a datagram longer than `buf` (`MSG_TRUNC`) and a control
/// message other than `SCM_RIGHTS` are [`io::ErrorKind::InvalidData`].
///
/// ```
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use guestmem::sys::socket::{recv_with_fds, send_with_fds};
///
/// let (a, b) = UnixStream::pair().unwrap();
/// let f = std::fs::File::open("/dev/null").unwrap();
/// send_with_fds(a.as_fd(), b"x", &[f.as_fd(), f.as_fd()]).unwrap();
/// // Room for one descriptor, two sent: refused, and both received copies are closed.
/// let e = recv_with_fds(b.as_fd(), &mut [0u8; 4], 1).unwrap_err();
/// assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
/// ```
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    if max_fds > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        msg.msg_control = control.0.as_mut_ptr().cast();
        // Exactly `max_fds` descriptors fit (CMSG_SPACE would round up to room for one more).
        // SAFETY: arithmetic only; the length is at most CONTROL_BYTES.
        msg.msg_controllen = unsafe { libc::CMSG_LEN((max_fds * size_of::<RawFd>()) as u32) } as usize;
    }
    let len = retry_eintr(|| {
        // SAFETY: `msg` describes our writable `buf` and control buffer with their lengths;
        // recvmsg writes only inside them and updates the lengths in `msg`.
        cvt_long(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })
            .map(|n| n as usize)
    })?;
    let mut fds = Vec::new();
    let mut foreign = false;
    if max_fds > 0 && msg.msg_controllen > 0 {
        // SAFETY: the kernel set msg_controllen to the bytes of control messages it wrote into
        // our buffer; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside that length (they return null at
        // its end), and each header they return lies inside the buffer.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is a header the kernel wrote inside our buffer.
            let (level, kind, cmsg_len) =
                unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: arithmetic only.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = cmsg_len.saturating_sub(header) / size_of::<RawFd>();
                // SAFETY: the data of this message is `count` descriptor numbers inside the
                // buffer (its length says so); they are read unaligned as cmsg(3) requires.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: as above, `i < count`.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: SCM_RIGHTS installed a new descriptor with this number in our
                    // table for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            } else {
                foreign = true;
            }
            // SAFETY: `cmsg` is a header inside the control data described by `msg`.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    // Every descriptor is owned now: an error below closes them.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        return Err(invalid("control message truncated: the peer sent more descriptors than were expected"));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(invalid("message truncated: the datagram was longer than the buffer"));
    }
    if foreign {
        return Err(invalid("a control message other than SCM_RIGHTS arrived"));
    }
    Ok(Received { len, fds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    /// How many of this process's descriptors refer to a memfd named `name` (other tests run
    /// in parallel threads, so counting every descriptor would race with them).
    fn open_memfds(name: &str) -> usize {
        let target = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|link| link.to_str() == Some(&target))
            .count()
    }

    #[test]
    fn descriptors_round_trip_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..5).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let memfd = crate::sys::memfd_create(c"t", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        let mut sent: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        sent.insert(2, memfd.as_fd());
        assert_eq!(send_with_fds(a.as_fd(), b"abc", &sent).unwrap(), 3);
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
        assert_eq!((got.len, got.fds.len()), (3, 6));
        let memfd_stat = crate::sys::fstat(memfd.as_fd()).unwrap();
        assert!(crate::sys::fstat(got.fds[2].as_fd()).unwrap().same_inode(&memfd_stat));
        // Close-on-exec, as MSG_CMSG_CLOEXEC asks.
        // SAFETY: F_GETFD touches no memory.
        let flags = unsafe { libc::fcntl(got.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // Plain data, no descriptors.
        send_with_fds(a.as_fd(), b"zz", &[]).unwrap();
        let got = recv_with_fds(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!((got.len, got.fds.len()), (2, 0));
        // A closed peer: 0 bytes.
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, 1).unwrap().len, 0);
    }

    #[test]
    fn truncated_control_closes_what_arrived() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = crate::sys::memfd_create(c"socket-ctrunc", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        assert_eq!(open_memfds("socket-ctrunc"), 1);
        send_with_fds(a.as_fd(), b"x", &[f.as_fd(); 3]).unwrap();
        let e = recv_with_fds(b.as_fd(), &mut [0u8; 4], 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(open_memfds("socket-ctrunc"), 1);
        // None expected at all.
        send_with_fds(a.as_fd(), b"y", &[f.as_fd()]).unwrap();
        assert!(recv_with_fds(b.as_fd(), &mut [0u8; 4], 0).is_err());
        assert_eq!(open_memfds("socket-ctrunc"), 1);
    }

    #[test]
    fn truncated_datagram_is_an_error() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let f = crate::sys::memfd_create(c"socket-trunc", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        send_with_fds(a.as_fd(), &[7u8; 64], &[f.as_fd()]).unwrap();
        let e = recv_with_fds(b.as_fd(), &mut [0u8; 16], 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(open_memfds("socket-trunc"), 1);
    }

    #[test]
    fn bad_arguments_and_non_sockets() {
        let (a, _b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let einval = |r: io::Result<usize>| r.unwrap_err().raw_os_error() == Some(libc::EINVAL);
        assert!(einval(send_with_fds(a.as_fd(), b"", &[f.as_fd()])));
        assert!(einval(send_with_fds(a.as_fd(), b"x", &vec![f.as_fd(); MAX_FDS + 1])));
        assert_eq!(
            recv_with_fds(a.as_fd(), &mut [0u8; 1], MAX_FDS + 1).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(send_with_fds(f.as_fd(), b"x", &[]).unwrap_err().raw_os_error(), Some(libc::ENOTSOCK));
        assert_eq!(
            recv_with_fds(f.as_fd(), &mut [0u8; 1], 1).unwrap_err().raw_os_error(),
            Some(libc::ENOTSOCK)
        );
        // The maximum is accepted.
        assert_eq!(send_with_fds(a.as_fd(), b"x", &vec![f.as_fd(); MAX_FDS]).unwrap(), 1);
    }
}
