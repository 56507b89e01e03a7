//! External commands bounded in time, and waiting without reaping: a test
//! never hangs on a command, and never signals a PID it no longer owns.

use std::{
    process::{Child, Command, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Runs `cmd` to completion with stdin closed; kills it and panics when
/// it runs longer than `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    wait_bounded(child, timeout, &format!("{cmd:?}"))
}

/// Like [`run_bounded`], panicking unless the command succeeded.
pub fn run_bounded_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_bounded(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): stdout: {} stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits for `child` (stdout/stderr piped), at most `timeout`, draining
/// its pipes on threads so that a chatty command never blocks; kills it
/// and panics on a timeout.
pub fn wait_bounded(mut child: Child, timeout: Duration, what: &str) -> Output {
    let (out_t, err_t) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Reads a pipe to its end on a thread.
pub fn drain<R: std::io::Read + Send + 'static>(r: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// Whether child `pid` has exited, without reaping it: until it is reaped
/// its PID cannot be reused, so signalling it stays safe.
pub fn exited_unreaped(pid: u32) -> bool {
    // Safety: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // Safety: info is a valid out-pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // rc != 0: ECHILD, already reaped. Otherwise si_pid is zero while no
    // child changed state.
    // Safety: filled by waitid.
    rc != 0 || unsafe { info.si_pid() } != 0
}

/// Polls `cond` every 5 ms until it holds; panics with `what()` after
/// `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion (no time bound: quick system tools), panicking
/// with its stderr unless it succeeds.
pub(crate) fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
