//! The two plots of a run: connect time of every connection over the run
//! (`connect.svg`), and new connections per second per generation
//! (`generations.svg`), both with the run's events as vertical lines.

use std::collections::{BTreeMap, BTreeSet};

use super::svg::{self, Chart, Pen, Scale, Swatch};
use crate::records::{Class, ConnRecord, Event, GenSample};

/// More dots than this and the connect plot keeps every k-th one (plus
/// the slow and the failed ones): a browser still opens the file.
pub const MAX_POINTS: usize = 20_000;
/// Connect times from here up are always drawn: they are what the plot
/// is for (a SYN queued behind a stalled accept, a retransmitted SYN).
pub const SLOW_POINT_US: u64 = 100_000;

/// The events drawn as vertical lines: name, color, dashes. Others
/// (`ready`, `old_exit`, ...) would only crowd the handover marks.
const EVENT_STYLES: [(&str, &str, &str); 7] = [
    ("handover", "#444444", "6 4"),
    ("kill", "#b00020", "2 3"),
    ("sigstop", "#7b3fa0", "8 3 2 3"),
    ("sigcont", "#1f9e89", "8 3 2 3"),
    ("canary", "#d98c00", "4 4"),
    ("promote", "#2ca02c", "4 4"),
    ("abort", "#8c564b", "4 4"),
];

/// The class of an event's line, `ev-<event>`: how a reader finds them.
pub fn event_class(event: &str) -> String {
    format!("ev-{event}")
}

const OK_DOT: &str = "#1f77b4";
const FAILED_DOT: &str = "#c51b7d";
const FAILED_MARK: &str = "#d62728";
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// What the plots of one run are drawn from.
pub struct RunView<'a> {
    /// `<mode> / <scenario>`.
    pub title: String,
    pub conns: &'a [ConnRecord],
    pub events: &'a [Event],
    pub generations: &'a [GenSample],
    /// The run's planned length, so that the time axes of a run's plots
    /// agree even when the records stop early.
    pub duration_us: u64,
}

impl RunView<'_> {
    /// The time axis in seconds: from the start to the last thing recorded.
    fn time_scale(&self) -> Scale {
        let end = [
            self.duration_us,
            self.conns.iter().map(|c| c.start_us).max().unwrap_or(0),
            self.events.iter().map(|e| e.t_us).max().unwrap_or(0),
            self.generations.iter().map(|g| g.t_us).max().unwrap_or(0),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        Scale::Linear {
            lo: 0.0,
            hi: secs(end).max(1.0),
        }
    }
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// A number without trailing zeros (`0.5`, `2`, `0.01`).
fn short(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Which of the connected records to draw: all of them up to `max`;
/// beyond, every k-th (k = ⌈n / max⌉) plus every one at least
/// `SLOW_POINT_US` and every one that failed after connecting.
/// Deterministic, so that two reports of the same records agree.
pub fn downsample(connected: &[&ConnRecord], max: usize) -> Vec<usize> {
    if connected.len() <= max {
        return (0..connected.len()).collect();
    }
    let k = connected.len().div_ceil(max.max(1));
    (0..connected.len())
        .filter(|&i| {
            let c = connected[i];
            i % k == 0 || c.connect_us.unwrap_or(0) >= SLOW_POINT_US || c.class != Class::Ok
        })
        .collect()
}

/// The event lines and their legend entries (`handover (3)`).
fn event_marks(chart: &mut Chart, events: &[Event]) -> Vec<(Swatch<'static>, String)> {
    let mut legend = Vec::new();
    for (name, color, dash) in EVENT_STYLES {
        let class = event_class(name);
        let pen = Pen::new(color).width(1.4).dash(Some(dash));
        let mut count = 0;
        for e in events.iter().filter(|e| e.event == name) {
            let tip = if e.detail.is_empty() {
                format!("{name} at {} s", short(secs(e.t_us)))
            } else {
                format!("{name} at {} s: {}", short(secs(e.t_us)), e.detail)
            };
            chart.vline(secs(e.t_us), pen.class(&class), Some(&tip));
            count += 1;
        }
        if count > 0 {
            legend.push((Swatch::Line(pen), format!("{name} ({count})")));
        }
    }
    legend
}

/// Connect time (log) against start time, failed connections along the top.
pub fn connect_svg(run: &RunView) -> String {
    let connected: Vec<&ConnRecord> = run
        .conns
        .iter()
        .filter(|c| c.connect_us.is_some())
        .collect();
    let failed: Vec<&ConnRecord> = run.conns.iter().filter(|c| c.class != Class::Ok).collect();

    // Whole decades around the connect times (µs → ms), at least one.
    let (lo, hi) = connected
        .iter()
        .filter_map(|c| c.connect_us)
        .fold(None, |acc: Option<(u64, u64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
        .map(|(lo, hi)| {
            let lo = (lo.max(1) as f64 / 1e3).log10().floor();
            let hi = (hi.max(1) as f64 / 1e3).log10().ceil();
            (10f64.powf(lo), 10f64.powf(hi.max(lo + 1.0)))
        })
        .unwrap_or((0.01, 1000.0));
    let y = Scale::Log { lo, hi };

    let keep = downsample(&connected, MAX_POINTS);
    let subtitle = if keep.len() < connected.len() {
        format!(
            "{} connections, {} connected; {} dots drawn (one in {}, plus all ≥ {} ms and all that failed)",
            run.conns.len(),
            connected.len(),
            keep.len(),
            connected.len().div_ceil(MAX_POINTS),
            SLOW_POINT_US / 1000
        )
    } else {
        format!(
            "{} connections, {} connected, {} failed",
            run.conns.len(),
            connected.len(),
            failed.len()
        )
    };

    let mut chart = Chart::new(&run.title, &subtitle, run.time_scale(), y);
    chart.axes(
        "time since the run's start (s)",
        "connect time (ms, log scale)",
        short,
        |v| {
            // 0.01, 0.1, 1, 10: as many decimals as the decade needs.
            let decimals = (-v.log10().round()).max(0.0) as usize;
            format!("{v:.decimals$}")
        },
    );

    let ok_pen = Pen::new(OK_DOT).opacity(0.45);
    let failed_pen = Pen::new(FAILED_DOT).opacity(0.85);
    let (mut ok_dots, mut failed_dots) = (0usize, 0usize);
    for i in keep {
        let c = connected[i];
        let at = (
            chart.px(secs(c.start_us)),
            chart.py(c.connect_us.unwrap_or(0).max(1) as f64 / 1e3),
        );
        if c.class == Class::Ok {
            chart.svg.circle(at, 1.8, ok_pen);
            ok_dots += 1;
        } else {
            chart
                .svg
                .circle(at, 2.2, failed_pen.class("failed-connected"));
            failed_dots += 1;
        }
    }

    // One mark per pixel column is all the eye can tell apart.
    let mark_pen = Pen::new(FAILED_MARK).width(1.2);
    let columns: BTreeSet<i64> = failed
        .iter()
        .map(|c| (chart.px(secs(c.start_us)) * 2.0).round() as i64)
        .collect();
    let (top, mark_top) = (chart.top() - 2.0, chart.top() - 12.0);
    for col in columns {
        let x = col as f64 / 2.0;
        chart
            .svg
            .line((x, mark_top), (x, top), mark_pen.class("failed"), None);
    }

    let ok_total = connected.iter().filter(|c| c.class == Class::Ok).count();
    let ok_label = if ok_dots < ok_total {
        format!("ok ({ok_total}, {ok_dots} drawn)")
    } else {
        format!("ok ({ok_total})")
    };
    let mut legend = vec![(Swatch::Dot(ok_pen), ok_label)];
    if failed_dots > 0 {
        legend.push((
            Swatch::Dot(failed_pen),
            format!("connected, then failed ({failed_dots})"),
        ));
    }
    if !failed.is_empty() {
        legend.push((
            Swatch::Tick(mark_pen),
            format!("failed, at its start ({})", failed.len()),
        ));
    }
    legend.extend(event_marks(&mut chart, run.events));
    chart.finish(&legend)
}

/// The text of `generations.svg` when a mode has no per-generation figures.
pub const NO_GENERATIONS: &str = "no per-generation figures for this mode";

/// Each generation's new connections per second between consecutive
/// samples of its cumulative `accepted` counter, at the middle of the
/// interval (seconds, connections/s), by generation.
pub fn generation_rates(samples: &[GenSample]) -> Vec<(u64, Vec<(f64, f64)>)> {
    let mut by_gen: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for g in samples {
        by_gen
            .entry(g.generation)
            .or_default()
            .push((g.t_us, g.accepted));
    }
    by_gen
        .into_iter()
        .map(|(generation, mut samples)| {
            samples.sort_unstable();
            let points = samples
                .windows(2)
                .filter(|w| w[1].0 > w[0].0)
                .map(|w| {
                    let dt = secs(w[1].0 - w[0].0);
                    let mid = secs(w[0].0) + dt / 2.0;
                    // A counter that went back (a restarted process) is
                    // not a negative rate.
                    (mid, w[1].1.saturating_sub(w[0].1) as f64 / dt)
                })
                .collect();
            (generation, points)
        })
        .collect()
}

/// New connections per second of each generation, from the differences
/// of its cumulative `accepted` samples.
pub fn generations_svg(run: &RunView) -> String {
    if run.generations.is_empty() {
        return svg::message(&run.title, NO_GENERATIONS);
    }
    let rates = generation_rates(run.generations);
    let max_rate = rates
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, r)| r))
        .fold(0.0, f64::max);

    let subtitle = format!(
        "{} generations; rates between consecutive samples of the accepted counter",
        rates.len()
    );
    let y = Scale::Linear {
        lo: 0.0,
        // Headroom, so that a steady rate is not drawn on the frame.
        hi: svg::nice_max(max_rate.max(1.0) * 1.05),
    };
    let mut chart = Chart::new(&run.title, &subtitle, run.time_scale(), y);
    chart.axes(
        "time since the run's start (s)",
        "new connections / s",
        short,
        short,
    );

    let mut legend = Vec::new();
    for (i, (generation, points)) in rates.iter().enumerate() {
        let pen = Pen::new(PALETTE[i % PALETTE.len()]).width(1.8);
        let pixels: Vec<(f64, f64)> = points
            .iter()
            .map(|&(t, r)| (chart.px(t), chart.py(r)))
            .collect();
        match pixels.len() {
            0 => {}
            1 => chart.svg.circle(pixels[0], 2.5, pen.class("gen")),
            _ => chart.svg.polyline(&pixels, pen.class("gen")),
        }
        let label = if points.is_empty() {
            format!("gen {generation} (one sample)")
        } else {
            format!("gen {generation}")
        };
        legend.push((Swatch::Line(pen), label));
    }
    legend.extend(event_marks(&mut chart, run.events));
    chart.finish(&legend)
}
