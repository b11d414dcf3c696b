//! Signal dispositions: `sigaction(2)`, for the handler that turns a SIGBUS in guest memory
//! into a recovered fault (see `host::sigbus`), and for handing the signals it does not own on
//! to whoever had them before.

use std::io;

use super::cvt;

/// A handler that takes the `siginfo_t` (installed with `SA_SIGINFO`).
pub type SigInfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// A signal's disposition, as `sigaction(2)` reported or set it.
#[derive(Clone, Copy)]
pub struct SigAction(libc::sigaction);

// SAFETY: a plain C struct of a handler address, flags and a signal mask; nothing in it is
// owned or thread-affine.
unsafe impl Send for SigAction {}
// SAFETY: as above; it is only read after it is stored.
unsafe impl Sync for SigAction {}

impl std::fmt::Debug for SigAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigAction")
            .field("handler", &(self.0.sa_sigaction as *const ()))
            .field("flags", &format_args!("{:#x}", self.0.sa_flags))
            .finish()
    }
}

impl SigAction {
    /// Whether the disposition is the default action (`SIG_DFL`).
    pub fn is_default(&self) -> bool {
        self.0.sa_sigaction == libc::SIG_DFL
    }

    /// Whether the signal is ignored (`SIG_IGN`).
    pub fn is_ignored(&self) -> bool {
        self.0.sa_sigaction == libc::SIG_IGN
    }
}

/// `sigaction(sig, NULL, &old)`: the current disposition of `sig`, changing nothing.
pub fn current_action(sig: libc::c_int) -> io::Result<SigAction> {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with a null new action, sigaction only writes the old one into our buffer.
    cvt(unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) })?;
    // SAFETY: sigaction succeeded, so it filled the struct (zeroed first besides).
    Ok(SigAction(unsafe { old.assume_init() }))
}

/// `sigaction(2)`: installs `handler` for `sig` with `SA_SIGINFO | SA_ONSTACK | SA_RESTART`
/// (so it runs on the thread's alternate stack when it has one, as Rust's stack-overflow
/// handler needs) and an empty mask; returns the previous disposition.
///
/// # Safety
/// `handler` runs at any point of any thread: it must be async-signal-safe (no locks, no
/// allocation, only atomics and system calls), and hand every signal it does not own to the
/// previous disposition (see [`chain`]).
pub unsafe fn set_handler(sig: libc::c_int, handler: SigInfoHandler) -> io::Result<SigAction> {
    let mut new = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: the struct was zeroed (an empty mask, no restorer); we fill the handler and
    // flags, then sigaction reads it and writes the old action into our buffer.
    unsafe {
        let a = new.as_mut_ptr();
        (*a).sa_sigaction = handler as usize;
        (*a).sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut (*a).sa_mask);
        cvt(libc::sigaction(sig, a, old.as_mut_ptr()))?;
        Ok(SigAction(old.assume_init()))
    }
}

/// `sigaction(sig, action)`: restores a disposition (async-signal-safe).
///
/// # Safety
/// As [`set_handler`] for the handler `action` names.
pub unsafe fn restore(sig: libc::c_int, action: &SigAction) -> io::Result<()> {
    // SAFETY: sigaction reads the struct; the caller vouches for its handler.
    cvt(unsafe { libc::sigaction(sig, &action.0, std::ptr::null_mut()) }).map(drop)
}

/// Hands a signal on to `previous`, from inside a handler, as if `previous` had been installed:
/// its handler is called with the same arguments, or, for the default action or `SIG_IGN`, the
/// default action is restored so the faulting instruction, executed again on return, takes it
/// (a fault cannot be ignored).
///
/// # Safety
/// Only from a signal handler for `sig`, with the `info` and `context` the kernel passed it.
pub unsafe fn chain(
    previous: &SigAction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let p = &previous.0;
    if p.sa_sigaction == libc::SIG_DFL || p.sa_sigaction == libc::SIG_IGN {
        let mut dfl = *p;
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: restoring the default action, which is async-signal-safe.
        let _ = unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        return;
    }
    if p.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous disposition was installed with SA_SIGINFO, so its handler has
        // this signature; we call it as the kernel would have.
        let handler: SigInfoHandler = unsafe { std::mem::transmute::<usize, SigInfoHandler>(p.sa_sigaction) };
        handler(sig, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the handler takes the signal number only.
        let handler: extern "C" fn(libc::c_int) =
            unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(p.sa_sigaction) };
        handler(sig);
    }
}

/// The faulting address and the `si_code` of a fault's `siginfo_t`.
///
/// # Safety
/// `info` must be the `siginfo_t` the kernel passed to a handler of a fault signal (SIGBUS,
/// SIGSEGV), whose union holds the address.
pub unsafe fn fault_info(info: *const libc::siginfo_t) -> (usize, libc::c_int) {
    // SAFETY: the caller guarantees a fault's siginfo, where `si_addr` is the live union member.
    unsafe { ((*info).si_addr() as usize, (*info).si_code) }
}

/// `si_code` of a SIGBUS for an access to a page beyond the end of its file (or that the
/// backing store could not supply): `BUS_ADRERR`.
pub const BUS_ADRERR: libc::c_int = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_read_back() {
        let a = current_action(libc::SIGUSR2).unwrap();
        assert!(a.is_default() || a.is_ignored() || !format!("{a:?}").is_empty());
        assert!(current_action(-1).is_err());
    }
}
