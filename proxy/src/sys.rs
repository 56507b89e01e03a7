//! The few raw syscalls the proxy needs that no crate wraps: clocks shared by
//! all PID namespaces, signals by PID, and the PID namespace identity;
//! pipes and splice(2) for tcp mode.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

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

/// Raises the open-file limit and returns the soft limit now in force: the
/// soft limit to the hard one, and both to `want` when that is more (as
/// HAProxy sizes them for its `maxconn`; raising the hard limit needs
/// CAP_SYS_RESOURCE and stays within `fs.nr_open`). What cannot be raised
/// stays as it was.
pub fn raise_nofile_limit(want: Option<u64>) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit writes an rlimit into the valid pointer given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let set = |cur: u64, max: u64| {
        let raised = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // Safety: setrlimit reads the valid rlimit given.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 }
    };
    if let Some(want) = want.filter(|&w| w > lim.rlim_max)
        && set(want, want)
    {
        return Ok(want);
    }
    if lim.rlim_cur < lim.rlim_max && set(lim.rlim_max, lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
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

/// CLOCK_MONOTONIC in microseconds (what systemd's MONOTONIC_USEC wants).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Safety: clock_gettime writes a timespec into the valid pointer given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The uid and primary gid of a user name.
pub fn lookup_user(name: &str) -> io::Result<(u32, u32)> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // Safety: passwd is plain C data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // Safety: all pointers are valid for the sizes given; getpwnam_r writes
    // only into pwd and buf.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user named {name:?}"),
        ));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// The gid of a group name.
pub fn lookup_group(name: &str) -> io::Result<u32> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // Safety: group is plain C data; all-zero is a valid (empty) value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // Safety: as in lookup_user.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name:?}"),
        ));
    }
    Ok(grp.gr_gid)
}

/// Becomes `uid`/`gid`, keeping only `keep` among the capabilities.
///
/// Must run while the process has a single thread: capabilities are per
/// thread, and threads started later inherit the caller's.
pub fn drop_privileges(uid: u32, gid: u32, keep: &[caps::Capability]) -> io::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let other = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    let keep: CapsHashSet = keep.iter().copied().collect();
    // Out of the bounding set first: that needs CAP_SETPCAP, which goes
    // with the uid change.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(other)?;
        }
    }
    // Safety: prctl/setgroups/setgid/setuid with plain integer arguments and
    // a one-element array that outlives the call.
    unsafe {
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
            || libc::setgroups(1, &gid) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(other)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(other)?;
    caps::set(None, CapSet::Effective, &keep).map_err(other)?;
    Ok(())
}

/// Gives the pages of freed heap memory back to the kernel. Start-up
/// (configuration, certificates, the eBPF object) leaves 70 to 85 KB
/// freed but resident, which glibc keeps until the top of the heap is free.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends a state to the service manager when run under systemd
/// (`NOTIFY_SOCKET`); a no-op otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!("sd_notify {state:?}: {e}");
    }
}

/// Makes `target`'s descriptor refer to `source`'s socket (`dup2`): the
/// owner of `target` keeps its descriptor number and now holds the new
/// socket; the old one is closed unless something else still refers to it.
pub fn replace_fd(source: &impl AsRawFd, target: &impl AsRawFd) -> io::Result<()> {
    // Safety: both descriptors are open and owned by live objects for the
    // duration of the call; dup2 only changes what `target`'s number refers
    // to, which its owner keeps owning.
    if unsafe { libc::dup2(source.as_raw_fd(), target.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe, both ends non-blocking and close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // Safety: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: both descriptors were just made and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One non-blocking splice(2) of up to `len` bytes from `from` to `to`
/// (one of them a pipe): how many moved, 0 at the end of `from`.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // Safety: both descriptors are borrowed, so open for the call; no
    // offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
