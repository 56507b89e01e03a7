//! The report of a lab run: one summary row per (mode, scenario) from the
//! raw records (`summary.json`, `summary.md`), and two plots in each run's
//! folder (`connect.svg`, `generations.svg`).
//!
//! # Layout
//!
//! - this file: finding and reading the runs, their figures, the table;
//! - `plots`: the two plots of a run;
//! - `svg`: a small SVG writer (axes, ticks, lines, dots, text, legend).

mod plots;
mod svg;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::records::{self, Class, ConnRecord, Event, RunInfo};

/// A connect time from here up is the signature of a dropped SYN: the
/// client's first SYN retransmission comes after 1 s.
pub const SLOW_CONNECT_US: u64 = 1_000_000;

/// The figures of one run (one row of the table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub mode: String,
    pub scenario: String,
    /// Why the scenario does not apply to the mode; the figures are empty.
    pub skipped: Option<String>,
    /// Connections the load started.
    pub connections: u64,
    /// Connections whose every response arrived whole.
    pub ok: u64,
    /// Failed connections by class name, every class but `ok` (0 included),
    /// so that the columns of two runs line up.
    pub failed: BTreeMap<String, u64>,
    /// Nearest-rank percentiles and maximum of the connect time over the
    /// connections that connected; None when none did.
    pub connect_p50_us: Option<u64>,
    pub connect_p99_us: Option<u64>,
    pub connect_max_us: Option<u64>,
    /// Connections whose connect took at least `SLOW_CONNECT_US`.
    pub slow_connects: u64,
    /// Connections per second between the first and the last start: did
    /// the open-loop load keep its schedule.
    pub rate_achieved: f64,
    /// `handover` events recorded (what happened, not what was asked; the
    /// notes say `handovers_planned` when the two differ).
    pub handovers: u32,
    /// Kernel counters, after minus before the run.
    pub kernel: BTreeMap<String, u64>,
    /// The steering program's counters (eBPF modes).
    pub program: Option<serde_json::Value>,
    /// What the scenario observed (and the report, when it disagrees).
    pub notes: BTreeMap<String, String>,
}

impl RunSummary {
    /// Every failed connection, whatever its class.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Every run of an output folder, in the report's order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub runs: Vec<RunSummary>,
}

/// Modes in this order (ours first, then the baselines), others after in
/// alphabetical order.
pub const MODE_ORDER: [&str; 5] = [
    "ebpf",
    "reuseport",
    "reuseport+migrate",
    "haproxy-sf",
    "haproxy-x",
];

/// Scenarios in this order (the plain handover first, the migration paths
/// last), others after in alphabetical order.
pub const SCENARIO_ORDER: [&str; 10] = [
    "rolling",
    "hung-old",
    "dies-after-flip",
    "kill-draining",
    "many-generations",
    "canary",
    "migrate-established",
    "migrate-fastopen",
    "migrate-synack-timer",
    "migrate-final-ack",
];

fn rank(order: &[&str], name: &str) -> usize {
    order.iter().position(|o| *o == name).unwrap_or(order.len())
}

fn order_key(r: &RunSummary) -> (usize, String, usize, String) {
    (
        rank(&MODE_ORDER, &r.mode),
        r.mode.clone(),
        rank(&SCENARIO_ORDER, &r.scenario),
        r.scenario.clone(),
    )
}

/// Reads every run under `out`, writes `<out>/summary.json`,
/// `<out>/summary.md`, and for every run not skipped `<run>/connect.svg`
/// and `<run>/generations.svg`; returns the summary. Errors name the file
/// that was wrong.
pub fn build(out: &Path) -> anyhow::Result<Summary> {
    let mut runs = Vec::new();
    for (mode, scenario, dir) in run_dirs(out)? {
        runs.push(report_run(&dir, &mode, &scenario)?);
    }
    runs.sort_by_key(order_key);
    let summary = Summary { runs };

    let json = out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
    fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("summary.md");
    fs::write(&md, document(&summary)).with_context(|| format!("writing {}", md.display()))?;
    Ok(summary)
}

/// `<out>/<mode>/<scenario>/` folders holding a run (a `run.json` or a
/// `conns.csv`), sorted by name.
fn run_dirs(out: &Path) -> anyhow::Result<Vec<(String, String, PathBuf)>> {
    let mut runs = Vec::new();
    for mode in subdirs(out)? {
        for scenario in subdirs(&mode)? {
            if scenario.join("run.json").exists() || scenario.join("conns.csv").exists() {
                runs.push((file_name(&mode), file_name(&scenario), scenario));
            }
        }
    }
    Ok(runs)
}

fn subdirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let context = || format!("reading the folder {}", dir.display());
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(context)? {
        let entry = entry.with_context(context)?;
        if entry.file_type().with_context(context)?.is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads one of a run's files; the error names the file (the readers of
/// `records` name it and the line for bad contents, not for I/O errors).
fn read<T>(path: &Path, reader: fn(&Path) -> io::Result<T>) -> anyhow::Result<T> {
    reader(path).map_err(|e| {
        if e.to_string().contains(&path.display().to_string()) {
            anyhow::Error::new(e)
        } else {
            anyhow::Error::new(e).context(format!("reading {}", path.display()))
        }
    })
}

/// One run: its summary, and its plots written to its folder.
fn report_run(dir: &Path, mode_dir: &str, scenario_dir: &str) -> anyhow::Result<RunSummary> {
    let info = read(&dir.join("run.json"), records::read_run)?;
    let mut notes = info.notes.clone();
    // The folder is where the run was written; run.json says what ran.
    // A difference is a bug worth seeing, not a reason to lose the run.
    let mode = if info.mode.is_empty() {
        mode_dir.to_string()
    } else {
        info.mode.clone()
    };
    let scenario = if info.scenario.is_empty() {
        scenario_dir.to_string()
    } else {
        info.scenario.clone()
    };
    if (mode.as_str(), scenario.as_str()) != (mode_dir, scenario_dir) {
        notes.insert("folder".into(), format!("{mode_dir}/{scenario_dir}"));
    }
    if info.skipped.is_some() {
        return Ok(summarize(mode, scenario, &info, notes, &[], &[]));
    }

    let conns = read(&dir.join("conns.csv"), records::read_conns)?;
    let events = read(&dir.join("events.csv"), records::read_events)?;
    let generations_csv = dir.join("generations.csv");
    let generations = if generations_csv.exists() {
        read(&generations_csv, records::read_generations)?
    } else {
        Vec::new()
    };

    let view = plots::RunView {
        title: format!("{mode} / {scenario}"),
        conns: &conns,
        events: &events,
        generations: &generations,
        duration_us: info.duration_ms.saturating_mul(1000),
    };
    for (name, text) in [
        ("connect.svg", plots::connect_svg(&view)),
        ("generations.svg", plots::generations_svg(&view)),
    ] {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summarize(mode, scenario, &info, notes, &conns, &events))
}

/// The nearest-rank percentile `p` (0..=100) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn summarize(
    mode: String,
    scenario: String,
    info: &RunInfo,
    mut notes: BTreeMap<String, String>,
    conns: &[ConnRecord],
    events: &[Event],
) -> RunSummary {
    let mut failed: BTreeMap<String, u64> = Class::ALL
        .iter()
        .filter(|c| **c != Class::Ok)
        .map(|c| (c.name().to_string(), 0))
        .collect();
    let mut ok = 0;
    for c in conns {
        match c.class {
            Class::Ok => ok += 1,
            class => *failed.entry(class.name().to_string()).or_default() += 1,
        }
    }
    let mut connect: Vec<u64> = conns.iter().filter_map(|c| c.connect_us).collect();
    connect.sort_unstable();

    let first = conns.iter().map(|c| c.start_us).min();
    let last = conns.iter().map(|c| c.start_us).max();
    let rate_achieved = match (first, last) {
        (Some(a), Some(b)) if b > a => conns.len() as f64 / ((b - a) as f64 / 1e6),
        _ => 0.0,
    };

    let handovers = events.iter().filter(|e| e.event == "handover").count() as u32;
    if info.skipped.is_none() && handovers != info.handovers {
        notes.insert("handovers_planned".into(), info.handovers.to_string());
    }

    RunSummary {
        mode,
        scenario,
        skipped: info.skipped.clone(),
        connections: conns.len() as u64,
        ok,
        failed,
        connect_p50_us: percentile(&connect, 50.0),
        connect_p99_us: percentile(&connect, 99.0),
        connect_max_us: connect.last().copied(),
        slow_connects: connect.iter().filter(|&&c| c >= SLOW_CONNECT_US).count() as u64,
        rate_achieved,
        handovers,
        kernel: info.kernel.counters.clone(),
        program: info.kernel.program.clone(),
        notes,
    }
}

/// A kernel counter by its name, whether or not the key carries its table
/// (`ListenDrops`, `TcpExt:ListenDrops`, `TcpExt: ListenDrops`).
fn counter(kernel: &BTreeMap<String, u64>, name: &str) -> Option<u64> {
    kernel.get(name).copied().or_else(|| {
        kernel
            .iter()
            .find(|(k, _)| k.rsplit([':', '.', ' ']).next() == Some(name))
            .map(|(_, v)| *v)
    })
}

const NONE: &str = "–";

fn cell_counter(kernel: &BTreeMap<String, u64>, name: &str) -> String {
    counter(kernel, name).map_or(NONE.into(), |v| v.to_string())
}

fn ms(us: Option<u64>) -> String {
    us.map_or(NONE.into(), |us| format!("{:.2}", us as f64 / 1000.0))
}

/// At most `max` characters of `s`, on one line.
fn shorten(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// Text for a table cell: shortened, pipes escaped.
fn cell_text(s: &str, max: usize) -> String {
    shorten(s, max).replace('|', "\\|")
}

fn notes_cell(notes: &BTreeMap<String, String>) -> String {
    let joined: Vec<String> = notes
        .iter()
        .map(|(k, v)| format!("{k}={}", shorten(v, 40)))
        .collect();
    cell_text(&joined.join("; "), 200)
}

const COLUMNS: [(&str, bool); 18] = [
    // (header, right-aligned)
    ("mode", false),
    ("scenario", false),
    ("connections", true),
    ("ok", true),
    ("failed", true),
    ("refused", true),
    ("reset before", true),
    ("reset after", true),
    ("timeout", true),
    ("truncated", true),
    ("connect p50 / p99 / max (ms)", true),
    ("connects ≥ 1 s", true),
    ("ListenOverflows", true),
    ("ListenDrops", true),
    ("MigrateReq ok/fail", true),
    ("SynRetrans", true),
    ("OutRsts", true),
    ("notes", false),
];

fn row(r: &RunSummary) -> Vec<String> {
    let mut cells = vec![cell_text(&r.mode, 60), cell_text(&r.scenario, 60)];
    if let Some(reason) = &r.skipped {
        cells.extend((2..COLUMNS.len() - 1).map(|_| NONE.to_string()));
        let mut notes = format!("skipped: {}", cell_text(reason, 160));
        if !r.notes.is_empty() {
            notes.push_str("; ");
            notes.push_str(&notes_cell(&r.notes));
        }
        cells.push(notes);
        return cells;
    }
    let class = |c: Class| r.failed.get(c.name()).copied().unwrap_or(0).to_string();
    let k = &r.kernel;
    let migrate = match (
        counter(k, "TCPMigrateReqSuccess"),
        counter(k, "TCPMigrateReqFailure"),
    ) {
        (None, None) => NONE.to_string(),
        (ok, fail) => format!(
            "{}/{}",
            ok.map_or(NONE.into(), |v| v.to_string()),
            fail.map_or(NONE.into(), |v| v.to_string())
        ),
    };
    cells.extend([
        r.connections.to_string(),
        r.ok.to_string(),
        r.failed_total().to_string(),
        class(Class::Refused),
        class(Class::ResetBeforeRequest),
        class(Class::ResetAfterRequest),
        class(Class::Timeout),
        class(Class::Truncated),
        format!(
            "{} / {} / {}",
            ms(r.connect_p50_us),
            ms(r.connect_p99_us),
            ms(r.connect_max_us)
        ),
        r.slow_connects.to_string(),
        cell_counter(k, "ListenOverflows"),
        cell_counter(k, "ListenDrops"),
        migrate,
        cell_counter(k, "TCPSynRetrans"),
        cell_counter(k, "OutRsts"),
        notes_cell(&r.notes),
    ]);
    cells
}

/// The markdown table alone (also printed by main at the end).
pub fn markdown(summary: &Summary) -> String {
    let mut out = String::new();
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let headers: Vec<String> = COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    out.push_str(&line(&headers));
    let rule: Vec<String> = COLUMNS
        .iter()
        .map(|&(_, right)| if right { "---:" } else { "---" }.to_string())
        .collect();
    out.push_str(&line(&rule));
    for r in &summary.runs {
        out.push_str(&line(&row(r)));
    }
    out
}

const LEGEND: &str = "\
- **connections**: connections the load started (open loop: on schedule, whatever the proxy did).
- **ok**: every byte of every response arrived and matched. **failed**: all the others, by class:
  **refused** (RST to the SYN), **reset before** (reset or closed before the request was written),
  **reset after** (after the request, before the whole response), **timeout** (the connect or
  exchange deadline passed), **truncated** (clean close before the whole response, or wrong bytes).
- **connect p50 / p99 / max**: connect() time in ms over the connections that connected
  (nearest-rank percentiles).
- **connects ≥ 1 s**: connections whose connect took at least 1 s, the signature of a SYN that was
  dropped and retransmitted by the client.
- **ListenOverflows**, **ListenDrops**, **SynRetrans** (`TCPSynRetrans`), **MigrateReq ok/fail**
  (`TCPMigrateReqSuccess` / `TCPMigrateReqFailure`): `TcpExt` counters; **OutRsts**: `Tcp`
  counter; all of the run's network namespace, after minus before the run. – : not measured.
- **notes**: what the scenario recorded, shortened (in full in `summary.json`).
  `handovers_planned`: the handovers asked, when the `handover` events recorded differ.
- Plots per run: `<mode>/<scenario>/connect.svg` (connect time of every connection over the run,
  failed connections in red along the top, events as vertical lines) and `generations.svg` (new
  connections per second per generation).
";

/// `summary.md`: the table and its legend.
fn document(summary: &Summary) -> String {
    let mut out = String::from("# Handover lab: summary\n\n");
    out.push_str(&markdown(summary));
    let _ = write!(out, "\n{LEGEND}");
    out
}
