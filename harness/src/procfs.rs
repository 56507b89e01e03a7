//! What `/proc` says about processes and sockets: children, run state,
//! status fields, CPU time, accept queues.

use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The first child of `pid` (e.g. the program an `unshare --fork` runs),
/// waiting up to `timeout` for it to appear.
pub fn first_child(pid: u32, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(child) = children(pid).first() {
            return *child;
        }
        assert!(Instant::now() < deadline, "process {pid} has no child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of /proc/PID/stat of `pid` (R, S, T, Z...).
pub fn proc_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The fields of /proc/PID/stat after the command name, starting with the
/// state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(") ")?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The share of one CPU that `pid` used (user + system) over `window`.
pub fn cpu_usage(pid: u32, window: Duration) -> f64 {
    let ticks = || -> u64 {
        let f = stat_fields(pid).unwrap_or_default();
        // Index 0 is field 3 (state): utime is field 14, stime field 15.
        let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        at(11) + at(12)
    };
    // Safety: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), ticks());
    (c1.saturating_sub(c0)) as f64 / hz / (t1 - t0).as_secs_f64()
}

/// `/proc/<pid>/status` as key -> value (values trimmed).
pub fn proc_status(pid: u32) -> BTreeMap<String, String> {
    status_at(&format!("/proc/{pid}/status"))
}

/// The status of every thread of `pid` (tid -> key -> value).
pub fn proc_thread_statuses(pid: u32) -> BTreeMap<u32, BTreeMap<String, String>> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .map(|tid| (tid, status_at(&format!("/proc/{pid}/task/{tid}/status"))))
                .filter(|(_, st)| !st.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn status_at(path: &str) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The capability mask with the bits `caps` set.
pub fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

/// Accept-queue lengths of the TCP listeners on `port` in this thread's
/// network namespace (from /proc/thread-self/net/tcp: for a listening
/// socket, `rx_queue` is the number of established connections waiting for
/// `accept()`). /proc/self/net would show the main thread's namespace.
pub fn accept_queues(port: u16) -> Vec<u32> {
    let table = fs::read_to_string("/proc/thread-self/net/tcp").expect("reading /proc/net/tcp");
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (cols.get(1)?, cols.get(3)?, cols.get(4)?);
            if *state != "0A" || !local.ends_with(&want) {
                return None;
            }
            u32::from_str_radix(queues.split_once(':')?.1, 16).ok()
        })
        .collect()
}

/// How many file descriptors `pid` holds (entries of /proc/PID/fd), or
/// None once it is gone.
pub fn fd_count(pid: u32) -> Option<usize> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.flatten().count())
}

/// The resident set size of `pid` in KiB (VmRSS of /proc/PID/status), or
/// None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status(pid)
        .get("VmRSS")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
