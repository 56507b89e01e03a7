//! Signals to processes the caller started: one typed helper instead of
//! `libc::kill` and raw numbers scattered over the tests.

use std::io;

/// The signals the tests and the benchmark send.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Hard stop.
    Term,
    /// Soft stop (drain, then exit).
    Usr1,
    /// Stop accepting (let the previous generation take over).
    Ttou,
    /// Accept again.
    Ttin,
    /// Not catchable: a crash as far as the proxy is concerned.
    Kill,
    /// Not catchable: freezes it (a frozen parent neither reaps nor
    /// replaces a child that dies).
    Stop,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Ttou => libc::SIGTTOU,
            Signal::Ttin => libc::SIGTTIN,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
        }
    }
}

/// Sends `sig` to process `pid`.
///
/// The caller vouches that `pid` is still its own (a child not reaped yet,
/// or a process it started inside one), so the PID cannot have been reused.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    kill(pid_t(pid)?, sig)
}

/// Sends `sig` to every process of the process group `pgid` (whose leader
/// the caller started and has not reaped).
pub fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    kill(-pid_t(pgid)?, sig)
}

fn pid_t(pid: u32) -> io::Result<libc::pid_t> {
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a process id: {pid}"),
        )),
    }
}

fn kill(target: libc::pid_t, sig: Signal) -> io::Result<()> {
    // Safety: kill(2) has no memory effects.
    let rc = unsafe { libc::kill(target, sig.raw()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
