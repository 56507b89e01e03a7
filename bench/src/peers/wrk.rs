//! wrk as the HTTP load generator: one thread on the load CPU, a Lua `done`
//! hook that prints the summary and latency quantiles as one JSON line.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::contender::LOAD_CPU;

/// Marks the line the Lua hook prints.
const MARK: &str = "WRKJSON ";

/// The Lua hook: wrk calls `done` once, after the run.
pub const SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p99_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"#;

/// What one wrk run reports.
#[derive(Deserialize, Debug, Clone, Copy)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl WrkResult {
    pub fn errors(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }
}

/// One wrk run against `url`: `connections` clients for `seconds`, with the
/// extra request `headers`. Bounded: killed `seconds + 20` s after start.
pub fn run(
    script: &Path,
    url: &str,
    connections: usize,
    seconds: u64,
    headers: &[&str],
) -> Result<WrkResult> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &LOAD_CPU.to_string(), "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "5s", "-s"])
        .arg(script);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = proxy_harness::process::run_bounded(&mut cmd, Duration::from_secs(seconds + 20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .with_context(|| format!("wrk printed no summary for {url}: {stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing wrk's summary {line:?}"))
}
