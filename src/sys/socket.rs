//! File descriptors over Unix sockets: `sendmsg(2)` and `recvmsg(2)` with `SCM_RIGHTS`
//! (`unix(7)`, `cmsg(3)`); vectored `sendmsg`/`recvmsg` with flags (a try that does not
//! block, no `SIGPIPE`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt_long;
use super::mman::flag_type;

/// The most fds [`recv_with_fds`] takes in one message.
pub const MAX_FDS: usize = 16;

/// Bytes of a control buffer for `n` fds (`CMSG_SPACE(n * sizeof(int))`), u64-aligned.
const fn cmsg_space(n: usize) -> usize {
    let header = std::mem::size_of::<libc::cmsghdr>();
    let data = (n * std::mem::size_of::<libc::c_int>() + 7) & !7;
    header + data
}

/// `sendmsg(2)`: sends `data` and, as `SCM_RIGHTS`, the fds `fds` (at most [`MAX_FDS`]) over the
/// Unix socket `sock`, in one message. Returns the bytes of `data` sent (a stream socket may
/// take fewer; the fds go with the first byte).
///
/// ```
/// use std::os::fd::AsFd;
/// use guestmem::sys::socket::{recv_with_fds, send_with_fds};
/// let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
/// let f = std::fs::File::open("/dev/null").unwrap();
/// assert_eq!(send_with_fds(a.as_fd(), b"hi", &[f.as_fd()]).unwrap(), 2);
/// let mut buf = [0u8; 8];
/// let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
/// assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 1));
/// ```
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut control = [0u64; cmsg_space(MAX_FDS) / 8];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers) until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = fds.len() * std::mem::size_of::<libc::c_int>();
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        // SAFETY: the control buffer holds CMSG_SPACE(MAX_FDS ints) bytes, u64-aligned, and
        // msg_controllen says how much of it is used: CMSG_FIRSTHDR returns its start.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `cmsg` points at the start of our zeroed, aligned control buffer, with room
        // for the header and `fds.len()` ints (checked against MAX_FDS above).
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            let dst = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                dst.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (our readable `data`) and the control buffer, which live
    // for the call; sendmsg only reads them.
    let n = cvt_long(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })?;
    Ok(n as usize)
}

/// `recvmsg(2)`: receives up to `buf.len()` bytes and the fds sent with them (`SCM_RIGHTS`,
/// close-on-exec) from the Unix socket `sock`. Returns the bytes received and the fds. Fails
/// with `EMSGSIZE` (after closing every fd that came) when the sender sent more fds than
/// [`MAX_FDS`] or a datagram longer than `buf`.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_at_most_fds(sock, buf, MAX_FDS)
}

/// [`recv_with_fds`] for a protocol that caps the fds of a message below [`MAX_FDS`] (a
/// vhost-user message carries at most 8): a message with more than `max_fds` is `EMSGSIZE`,
/// every fd that came closed. `max_fds` above [`MAX_FDS`] is `EINVAL`; 0 accepts none.
/// Interrupted calls (`EINTR`) are retried.
///
/// ```
/// use std::os::fd::AsFd;
/// use guestmem::sys::socket::{recv_with_at_most_fds, send_with_fds};
/// let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
/// let f = std::fs::File::open("/dev/null").unwrap();
/// send_with_fds(a.as_fd(), b"x", &[f.as_fd(), f.as_fd()]).unwrap();
/// let e = recv_with_at_most_fds(b.as_fd(), &mut [0u8; 4], 1).unwrap_err();
/// assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
/// ```
pub fn recv_with_at_most_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    if max_fds > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut control = [0u64; cmsg_space(MAX_FDS) / 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        // Room for exactly `max_fds` (CMSG_SPACE would round up to room for one more): the
        // kernel cuts a longer list and says so with MSG_CTRUNC.
        // SAFETY: CMSG_LEN is a pure size computation; the result is at most the buffer's size.
        msg.msg_controllen =
            unsafe { libc::CMSG_LEN((max_fds * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
    }
    let n = super::retry_eintr(|| {
        // SAFETY: `msg` points at our writable `buf` and control buffer, which live for the
        // call; recvmsg writes at most their lengths.
        cvt_long(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })
    })? as usize;
    let mut fds = Vec::new();
    // SAFETY: after recvmsg, msg_control/msg_controllen describe the control messages the
    // kernel wrote into our buffer; CMSG_FIRSTHDR/CMSG_NXTHDR walk inside it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside our control buffer (CMSG_FIRSTHDR/NXTHDR checked).
        let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure size computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the kernel wrote `count` ints after the header, inside our buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: as above; each int is a new fd the kernel installed for us.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the fd is new and owned by nobody else.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: walks to the next header inside our control buffer, or null.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 || fds.len() > max_fds {
        drop(fds);
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((n, fds))
}

flag_type! {
    /// Flags of [`send_vectored`] and [`recv_vectored`].
    MsgFlags: i32 {
        /// `MSG_DONTWAIT`: fail with `EAGAIN` instead of blocking.
        DONTWAIT = libc::MSG_DONTWAIT;
        /// `MSG_NOSIGNAL`: a peer that is gone is `EPIPE`, not `SIGPIPE`.
        NOSIGNAL = libc::MSG_NOSIGNAL;
    }
}

/// `sendmsg(2)` of the buffers of `iov` (no control message) with `flags`. Returns the bytes
/// sent. A descriptor that is not a socket is `ENOTSOCK`.
///
/// # Safety
/// Every `iovec` must describe memory valid for reads for the duration of the call.
pub unsafe fn send_vectored(sock: BorrowedFd<'_>, iov: &[libc::iovec], flags: MsgFlags) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no buffers) until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut _;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` describes the caller's iovecs (readable by the contract) and no control
    // buffer; the kernel only reads through them.
    cvt_long(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags.bits()) }).map(|n| n as usize)
}

/// `recvmsg(2)` into the buffers of `iov` (no control message) with `flags`. Returns the
/// bytes received (0: the peer closed the connection). A descriptor that is not a socket is
/// `ENOTSOCK`.
///
/// # Safety
/// Every `iovec` must describe memory valid for writes for the duration of the call.
pub unsafe fn recv_vectored(sock: BorrowedFd<'_>, iov: &[libc::iovec], flags: MsgFlags) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut _;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` describes the caller's iovecs (writable by the contract) and no control
    // buffer; the kernel writes only through them.
    cvt_long(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags.bits()) }).map(|n| n as usize)
}

/// The address family of socket `fd` (`getsockopt(SO_DOMAIN)`: `AF_UNIX`, `AF_INET`, ...),
/// or `None` if it is not a socket (or the kernel does not say).
pub fn domain(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, an int of that size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (ret == 0 && len as usize == std::mem::size_of::<libc::c_int>()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    #[test]
    fn domain_names_the_family_and_nothing_for_other_fds() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(domain(a.as_fd()), Some(libc::AF_UNIX));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(domain(listener.as_fd()), Some(libc::AF_INET));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(domain(file.as_fd()), None);
    }

    #[test]
    fn fds_travel_and_limits_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| f.as_fd()).collect();
        assert_eq!(send_with_fds(a.as_fd(), b"x", &many).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(send_with_fds(a.as_fd(), b"", &[]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        send_with_fds(a.as_fd(), b"two", &[f.as_fd(), f.as_fd()]).unwrap();
        let mut buf = [0u8; 3];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (3, 2));
        // Plain bytes carry no fds.
        (&a).write_all(b"p").unwrap();
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        // A datagram longer than the buffer is an error, not a silent cut.
        let (c, d) = UnixDatagram::pair().unwrap();
        send_with_fds(c.as_fd(), b"longer than three", &[f.as_fd()]).unwrap();
        assert_eq!(recv_with_fds(d.as_fd(), &mut buf).unwrap_err().raw_os_error(), Some(libc::EMSGSIZE));
        // Not a socket.
        assert!(recv_with_fds(f.as_fd(), &mut buf).is_err());
    }

    #[test]
    fn vectored_and_non_blocking_calls() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, y) = ([1u8, 2, 3], [4u8, 5]);
        let iov = [
            libc::iovec { iov_base: x.as_ptr() as *mut _, iov_len: 3 },
            libc::iovec { iov_base: y.as_ptr() as *mut _, iov_len: 2 },
        ];
        // SAFETY: both buffers are readable for the call.
        assert_eq!(unsafe { send_vectored(a.as_fd(), &iov, MsgFlags::NOSIGNAL) }.unwrap(), 5);
        let (mut p, mut q) = ([0u8; 2], [0u8; 8]);
        let iov = [
            libc::iovec { iov_base: p.as_mut_ptr().cast(), iov_len: 2 },
            libc::iovec { iov_base: q.as_mut_ptr().cast(), iov_len: 8 },
        ];
        // SAFETY: both buffers are writable for the call.
        assert_eq!(unsafe { recv_vectored(b.as_fd(), &iov, MsgFlags::empty()) }.unwrap(), 5);
        assert_eq!((p, &q[..3]), ([1, 2], &[3, 4, 5][..]));
        // Nothing to read: EAGAIN, not a wait.
        // SAFETY: as above.
        let e = unsafe { recv_vectored(b.as_fd(), &iov, MsgFlags::DONTWAIT) }.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Not a socket; a peer that is gone.
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        // SAFETY: as above.
        let e = unsafe { recv_vectored(f.as_fd(), &iov, MsgFlags::DONTWAIT) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
        drop(b);
        // SAFETY: as above (read by the kernel this time).
        let e = unsafe { send_vectored(a.as_fd(), &iov, MsgFlags::NOSIGNAL) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }

    /// How many of this process's fds refer to the memfd `name` (tests run in parallel
    /// threads: counting every fd would race with them).
    fn open_memfds(name: &str) -> usize {
        let target = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|link| link.to_str() == Some(&target))
            .count()
    }

    #[test]
    fn a_cap_below_max_fds_closes_what_came() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = crate::sys::memfd_create(c"socket-cap", crate::sys::MemfdFlags::CLOEXEC).unwrap();
        send_with_fds(a.as_fd(), b"x", &[f.as_fd(); 3]).unwrap();
        let e = recv_with_at_most_fds(b.as_fd(), &mut [0u8; 4], 2).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        assert_eq!(open_memfds("socket-cap"), 1);
        send_with_fds(a.as_fd(), b"y", &[f.as_fd()]).unwrap();
        assert!(recv_with_at_most_fds(b.as_fd(), &mut [0u8; 4], 0).is_err());
        assert_eq!(open_memfds("socket-cap"), 1);
        // Exactly the cap, in order.
        let g = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(a.as_fd(), b"z", &[f.as_fd(), g.as_fd()]).unwrap();
        let (n, fds) = recv_with_at_most_fds(b.as_fd(), &mut [0u8; 4], 2).unwrap();
        assert_eq!((n, fds.len()), (1, 2));
        let memfd = crate::sys::fstat(f.as_fd()).unwrap();
        assert!(crate::sys::fstat(fds[0].as_fd()).unwrap().same_inode(&memfd));
        assert_eq!(
            recv_with_at_most_fds(b.as_fd(), &mut [0u8; 4], MAX_FDS + 1).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
}
