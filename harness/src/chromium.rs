//! Headless chromium (Debian's), the browser the stats page is checked
//! in: run in its own process group, killed as a group on a timeout.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::{
    process::{drain, exited_unreaped, tail},
    signals::{Signal, signal_group},
};

/// Debian's chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The chromium binary, or a panic saying how to install it.
pub fn require_chromium() -> PathBuf {
    let path = PathBuf::from(CHROMIUM);
    assert!(
        path.is_file(),
        "{CHROMIUM} not found: install chromium (apt-get install chromium)"
    );
    path
}

/// How a chromium run ended.
pub struct BrowserRun {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
    pub took: Duration,
}

/// Runs headless chromium with `args` (after the common headless flags)
/// in its own process group, from the calling thread (so in its network
/// namespace), with a private profile under `dir`. On a timeout the whole
/// group (chromium and its helper processes) is killed by its id, still
/// held by the unreaped leader, and Err says what it printed.
pub fn run_chromium(dir: &Path, args: &[String], timeout: Duration) -> Result<BrowserRun, String> {
    let bin = require_chromium();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let profile = dir.join(format!("chromium-profile-{n}"));
    fs::create_dir_all(&profile).expect("creating the chromium profile folder");
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .env("HOME", &profile)
    .env("XDG_CONFIG_HOME", profile.join("config"))
    .env("XDG_CACHE_HOME", profile.join("cache"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let pid = child.id();
    let (out_t, err_t) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let timed_out = loop {
        if exited_unreaped(pid) {
            break false;
        }
        if started.elapsed() >= timeout {
            break true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Helpers still running (normally none) go with the group.
    // The leader is not reaped yet, so its PID (the group id) is ours.
    let _ = signal_group(pid, Signal::Kill);
    let status = child.wait().expect("reaping chromium");
    let took = started.elapsed();
    let (stdout, stderr) = (
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    );
    let run = BrowserRun {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        status,
        took,
    };
    if timed_out {
        return Err(format!(
            "chromium did not finish within {timeout:?} (killed process group {pid}); stderr tail:\n{}",
            tail(&run.stderr, 20)
        ));
    }
    Ok(run)
}
