//! The few raw syscalls the proxy needs that no crate wraps: clocks shared by
//! all PID namespaces, signals by PID, and the PID namespace identity.

use std::{io, os::fd::AsRawFd};

use tokio::io::unix::AsyncFd;

/// CLOCK_BOOTTIME in nanoseconds: one clock for every PID namespace and
/// container on the host, so heartbeats compare without PIDs.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Safety: clock_gettime writes a timespec into the valid pointer given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Inode of this process's PID namespace (0 when it cannot be read).
pub fn pidns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        // 0 and negatives address process groups: never what a PID list means.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // Safety: kill has no memory effects; the PID was checked to be positive.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a process with this PID exists in our PID namespace.
pub fn pid_alive(pid: u32) -> bool {
    match kill(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// Stops this process (SIGSTOP), as the fault-injection hook of the tests does.
pub fn stop_self() {
    // Safety: raise has no memory effects.
    unsafe { libc::raise(libc::SIGSTOP) };
}

/// Registers an fd-owning object with the tokio reactor.
///
/// Only for types that own their descriptor for their whole life and always
/// return the same one (socket2::Socket, aya's ring buffer logger).
pub(crate) fn async_fd<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // Safety: per the contract above, the descriptor stays open and the same
    // until the AsyncFd is dropped, which is what tokio requires.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // Safety: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Safety: cpu was checked to be inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // Safety: the set is a valid cpu_set_t of the size given; 0 = this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
