//! What a peer run measured, as JSON (every run's figures) and as markdown
//! tables (medians, spreads, ratios to the best peer).

use std::fmt::Write as _;

use serde::Serialize;

use super::contender::Kind;

/// One measured run of one row against one contender.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct RunFigures {
    /// Requests (or full handshakes) completed.
    pub requests: u64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The contender's CPU time (all its processes and threads) per request.
    pub cpu_us_per_req: f64,
    /// Failed requests or connections the load tool counted.
    pub errors: u64,
    /// Bytes the load tool received per request (wrk: head and body;
    /// handshake rows: the body).
    pub bytes_per_req: f64,
}

/// One row (one load) for one contender over all runs.
#[derive(Serialize, Debug)]
pub struct Cell {
    pub contender: Kind,
    pub runs: Vec<RunFigures>,
    /// The median of the runs (the mean of the middle two for an even count).
    pub median: RunFigures,
    /// Lowest and highest CPU µs per request over the runs.
    pub cpu_spread: (f64, f64),
    /// Lowest and highest rate over the runs.
    pub rate_spread: (f64, f64),
    /// CPU per request divided by the best peer's (lower is better).
    pub cpu_vs_best_peer: Option<f64>,
    /// gzip row: the compressed body of the 64 KiB page, in bytes.
    pub body_bytes_out: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct RowResult {
    pub id: &'static str,
    pub label: &'static str,
    pub cells: Vec<Cell>,
}

/// Memory of one contender.
#[derive(Serialize, Debug)]
pub struct Memory {
    pub contender: Kind,
    /// Resident memory after start, before any load (KiB, all processes).
    pub idle_rss_kib: u64,
    /// VmHWM summed over its processes after the load rows (KiB), before
    /// the idle-connection measurement.
    pub peak_rss_kib: u64,
    pub idle_connections: Vec<IdleFigures>,
}

/// Memory held per idle keep-alive client connection at one count.
#[derive(Serialize, Debug)]
pub struct IdleFigures {
    pub requested: usize,
    /// Connections answered and held idle.
    pub held: usize,
    pub failed: u64,
    pub stopped_early: bool,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after - before) / held, in bytes.
    pub bytes_per_connection: Option<f64>,
}

/// Everything a run wrote.
#[derive(Serialize, Debug)]
pub struct Report {
    pub started_utc: String,
    pub seconds_per_measurement: u64,
    pub runs: usize,
    pub quick: bool,
    pub wrk_connections: usize,
    pub handshake_clients: usize,
    pub versions: Vec<(String, String)>,
    pub rows: Vec<RowResult>,
    pub memory: Vec<Memory>,
    pub notes: Vec<String>,
}

/// The median of `runs` field by field, and the spreads.
pub fn cell(contender: Kind, runs: Vec<RunFigures>) -> Cell {
    let med = |f: fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let spread = |f: fn(&RunFigures) -> f64| {
        runs.iter()
            .map(f)
            .fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let median = RunFigures {
        requests: med(|r| r.requests as f64) as u64,
        rate: med(|r| r.rate),
        p50_ms: med(|r| r.p50_ms),
        p99_ms: med(|r| r.p99_ms),
        cpu_us_per_req: med(|r| r.cpu_us_per_req),
        errors: runs.iter().map(|r| r.errors).sum(),
        bytes_per_req: med(|r| r.bytes_per_req),
    };
    Cell {
        contender,
        cpu_spread: spread(|r| r.cpu_us_per_req),
        rate_spread: spread(|r| r.rate),
        median,
        runs,
        cpu_vs_best_peer: None,
        body_bytes_out: None,
    }
}

/// One run's figures from its turns: requests, time, CPU and bytes summed;
/// p50 the median of the turns' p50, p99 the highest of their p99.
pub fn combine(turns: &[RunFigures]) -> RunFigures {
    let requests: u64 = turns.iter().map(|t| t.requests).sum();
    let n = requests.max(1) as f64;
    let weighted =
        |f: fn(&RunFigures) -> f64| turns.iter().map(|t| f(t) * t.requests as f64).sum::<f64>() / n;
    let seconds: f64 = turns
        .iter()
        .filter(|t| t.rate > 0.0)
        .map(|t| t.requests as f64 / t.rate)
        .sum();
    RunFigures {
        requests,
        rate: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        p50_ms: median(turns.iter().map(|t| t.p50_ms).collect()),
        p99_ms: turns.iter().map(|t| t.p99_ms).fold(f64::NAN, f64::max),
        cpu_us_per_req: weighted(|t| t.cpu_us_per_req),
        errors: turns.iter().map(|t| t.errors).sum(),
        bytes_per_req: weighted(|t| t.bytes_per_req),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Fills each cell's ratio to the lowest CPU per request among the peers.
pub fn set_ratios(row: &mut RowResult) {
    let best = row
        .cells
        .iter()
        .filter(|c| c.contender.is_peer() && c.median.cpu_us_per_req > 0.0)
        .map(|c| c.median.cpu_us_per_req)
        .fold(f64::INFINITY, f64::min);
    if best.is_finite() {
        for c in &mut row.cells {
            c.cpu_vs_best_peer = Some(c.median.cpu_us_per_req / best);
        }
    }
}

fn fmt_cpu(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn kb(bytes: f64) -> String {
    format!("{:.1} KB", bytes / 1000.0)
}

/// The markdown: the summary table, then the details.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Proxy CPU µs per request (all its processes and threads, from schedstat), median of \
         {} run(s) of {} s; contender and origin on CPU 0, load on CPU 1; lower is better; \
         **bold**: the lowest.\n",
        r.runs, r.seconds_per_measurement
    );
    let _ = writeln!(
        s,
        "| path | HAProxy | nginx | proxy | ours ÷ best peer | floor ÷ best peer |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for row in &r.rows {
        let best = row
            .cells
            .iter()
            .filter(|c| c.contender != Kind::Floor)
            .map(|c| c.median.cpu_us_per_req)
            .fold(f64::INFINITY, f64::min);
        let mut label = row.label.to_string();
        if row.cells.iter().any(|c| c.body_bytes_out.is_some()) {
            let outs: Vec<String> = Kind::ALL
                .iter()
                .map(|k| {
                    find(row, *k)
                        .and_then(|c| c.body_bytes_out)
                        .map_or("-".into(), |b| format!("{:.1} K", b as f64 / 1000.0))
                })
                .collect();
            label = format!("{label} (bytes out: {})", outs.join(" / "));
        }
        let _ = write!(s, "| {label} |");
        for k in Kind::ALL {
            let v = find(row, k).map(|c| c.median.cpu_us_per_req);
            let text = match v {
                Some(v) if v == best => format!(" **{}** |", fmt_cpu(v)),
                Some(v) => format!(" {} |", fmt_cpu(v)),
                None => " - |".into(),
            };
            s.push_str(&text);
        }
        let ratio = |k: Kind| {
            find(row, k)
                .and_then(|c| c.cpu_vs_best_peer)
                .map_or("-".into(), |v| format!("{v:.2}"))
        };
        let _ = writeln!(s, " {} | {} |", ratio(Kind::Proxy), ratio(Kind::Floor));
    }
    let mem = |k: Kind| r.memory.iter().find(|m| m.contender == k);
    let peak: Vec<Option<f64>> = Kind::ALL
        .iter()
        .map(|k| mem(*k).map(|m| m.peak_rss_kib as f64 * 1.024 / 1000.0))
        .collect();
    mem_row(&mut s, "peak RSS after the load rows (MB)", &peak, |v| {
        format!("{v:.1}")
    });
    let idle_rss: Vec<Option<f64>> = Kind::ALL
        .iter()
        .map(|k| mem(*k).map(|m| m.idle_rss_kib as f64 * 1.024 / 1000.0))
        .collect();
    mem_row(&mut s, "RSS at start, no load (MB)", &idle_rss, |v| {
        format!("{v:.1}")
    });
    let counts: Vec<usize> = r
        .memory
        .first()
        .map(|m| m.idle_connections.iter().map(|i| i.requested).collect())
        .unwrap_or_default();
    for n in counts {
        let per: Vec<Option<f64>> = Kind::ALL
            .iter()
            .map(|k| {
                mem(*k)
                    .and_then(|m| m.idle_connections.iter().find(|i| i.requested == n))
                    .and_then(|i| i.bytes_per_connection)
            })
            .collect();
        let held: Vec<String> = Kind::ALL
            .iter()
            .filter_map(|k| {
                let i = mem(*k)?
                    .idle_connections
                    .iter()
                    .find(|i| i.requested == n)?;
                (i.held < n).then(|| format!("{} held {}", k.label(), i.held))
            })
            .collect();
        let note = if held.is_empty() {
            String::new()
        } else {
            format!("; {}", held.join(", "))
        };
        mem_row(
            &mut s,
            &format!(
                "memory per idle keep-alive client connection ({n} connections, RSS delta{note})"
            ),
            &per,
            kb,
        );
    }

    let _ = writeln!(
        s,
        "\n| path | contender | req/s (min–max) | p50 ms | p99 ms | CPU µs/req (min–max) | ÷ best peer | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        for c in &row.cells {
            let m = &c.median;
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.3} | {:.3} | {} ({}–{}) | {} | {} |",
                row.label,
                c.contender.label(),
                m.rate,
                c.rate_spread.0,
                c.rate_spread.1,
                m.p50_ms,
                m.p99_ms,
                fmt_cpu(m.cpu_us_per_req),
                fmt_cpu(c.cpu_spread.0),
                fmt_cpu(c.cpu_spread.1),
                c.cpu_vs_best_peer.map_or("-".into(), |v| format!("{v:.2}")),
                m.errors,
            );
        }
    }
    if !r.versions.is_empty() {
        let _ = writeln!(s);
        for (tool, v) in &r.versions {
            let _ = writeln!(s, "- {tool}: {v}");
        }
    }
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

/// A memory row of the summary table (lower is better; ours ÷ best peer).
fn mem_row(s: &mut String, label: &str, v: &[Option<f64>], fmt: fn(f64) -> String) {
    let best = v.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    let _ = write!(s, "| {label} |");
    for x in v {
        let text = match x {
            Some(x) if *x == best => format!(" **{}** |", fmt(*x)),
            Some(x) => format!(" {} |", fmt(*x)),
            None => " - |".into(),
        };
        s.push_str(&text);
    }
    let best_peer = v[..2]
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let ratio = match v[2] {
        Some(ours) if best_peer.is_finite() && best_peer > 0.0 => {
            format!("{:.2}", ours / best_peer)
        }
        _ => "-".into(),
    };
    let _ = writeln!(s, " {ratio} | - |");
}

fn find(row: &RowResult, k: Kind) -> Option<&Cell> {
    row.cells.iter().find(|c| c.contender == k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(cpu: f64) -> RunFigures {
        RunFigures {
            requests: 10,
            rate: 1000.0 / cpu,
            p50_ms: 1.0,
            p99_ms: 2.0,
            cpu_us_per_req: cpu,
            errors: 0,
            bytes_per_req: 100.0,
        }
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        let c = cell(Kind::Proxy, vec![fig(10.0), fig(20.0)]);
        assert_eq!(c.median.cpu_us_per_req, 15.0);
        assert_eq!(c.cpu_spread, (10.0, 20.0));
    }

    #[test]
    fn turns_combine_by_request_weight() {
        let mut slow = fig(30.0);
        slow.requests = 30;
        slow.rate = 300.0;
        slow.p99_ms = 9.0;
        let mut fast = fig(10.0);
        fast.requests = 90;
        fast.rate = 900.0;
        fast.p50_ms = 3.0;
        let r = combine(&[slow, fast]);
        assert_eq!(r.requests, 120);
        // (30 * 30 + 90 * 10) / 120 CPU; 120 requests in 0.1 + 0.1 s.
        assert!(
            (r.cpu_us_per_req - 15.0).abs() < 1e-9,
            "{}",
            r.cpu_us_per_req
        );
        assert!((r.rate - 600.0).abs() < 1e-9, "{}", r.rate);
        assert_eq!(r.p50_ms, 2.0);
        assert_eq!(r.p99_ms, 9.0);
    }

    #[test]
    fn ratio_is_to_the_best_peer_only() {
        let mut row = RowResult {
            id: "x",
            label: "x",
            cells: vec![
                cell(Kind::Haproxy, vec![fig(12.0)]),
                cell(Kind::Nginx, vec![fig(10.0)]),
                cell(Kind::Proxy, vec![fig(5.0)]),
            ],
        };
        row.cells.push(cell(Kind::Floor, vec![fig(4.0)]));
        set_ratios(&mut row);
        // The floor is a reference, not a peer: it sets no best.
        let floor = row.cells[3].cpu_vs_best_peer.unwrap();
        assert!((floor - 0.4).abs() < 1e-9, "{floor}");
        let ours = row.cells[2].cpu_vs_best_peer.unwrap();
        assert!((ours - 0.5).abs() < 1e-9, "{ours}");
        assert!((row.cells[1].cpu_vs_best_peer.unwrap() - 1.0).abs() < 1e-9);
    }
}
