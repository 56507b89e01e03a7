//! The page a person reads: generations, listeners, servers, the eBPF
//! counters and a chart of new connections per generation.

use std::fmt::Write;

use proxy_common::{HISTORY_INTERVAL_MS, MAX_SLOTS};

use super::{
    Row, View,
    counters::{Show, Table},
};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The page a person reads: refreshes itself every 2 s.
pub fn html(v: &View) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>proxy {inst} stats</title><style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} h1{{margin:0}} .banner{{color:#555;margin:.2em 0 1em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}} th,td{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#eef}} td.l{{text-align:left}} tr.active td{{background:#dfd}} .down{{background:#fdd}}
</style></head><body><h1 id="instance">proxy instance <b>{inst}</b></h1><div class="banner" id="banner">{banner}</div>
<p>steering: {steering}; active slot: {active}</p>"#,
        inst = esc(&v.instance),
        banner = esc(&v.banner),
        steering = esc(v.steering),
        active = v
            .active_slot
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    h.push_str("<h2>Generations</h2><table id=\"generations\"><tr><th>slot</th><th>generation</th><th>pid</th><th>state</th><th>age</th><th>accepted</th><th>open</th><th>tunnels</th><th>steered</th><th>migrated in</th></tr>");
    for g in &v.generations {
        let _ = write!(
            h,
            "<tr class=\"{cls}\" data-generation=\"{gen}\" data-state=\"{state}\"><td>{slot}</td><td>{gen}</td><td>{pid}</td><td class=\"l\">{state}{star}</td><td>{age}</td><td>{acc}</td><td>{open}</td><td>{tunnels}</td><td>{st}</td><td>{mig}</td></tr>",
            cls = if g.active { "active" } else { "" },
            slot = g.slot,
            gen = g.generation,
            pid = g.pid,
            state = esc(&g.state),
            star = if g.active && g.state != "active" {
                " (active slot)"
            } else {
                ""
            },
            age = humantime::format_duration(std::time::Duration::from_secs(g.age_ms / 1000)),
            acc = g.accepted,
            open = g.active_conns,
            tunnels = g.tunnels,
            st = g.steered,
            mig = g.migrated_in,
        );
    }
    h.push_str("</table>");
    if let Some(c) = &v.canary {
        let _ = write!(
            h,
            "<p id=\"canary\" data-generation=\"{}\" data-weight=\"{}\">{}</p>",
            c.generation,
            c.weight_percent,
            esc(&c.line())
        );
    }
    h.push_str("<h2>New connections per generation</h2>");
    h.push_str(&chart(v));
    h.push_str("<h2>Listeners</h2>");
    table(&mut h, "listeners", &["listener"], &v.listeners);
    h.push_str("<h2>Servers</h2>");
    table(&mut h, "servers", &["backend", "server"], &v.servers);
    h.push_str("</table>");
    if let Some(c) = &v.ebpf {
        h.push_str("<h2>eBPF steering</h2><table id=\"ebpf\"><tr><th>slot</th>");
        for s in 0..MAX_SLOTS {
            let _ = write!(h, "<th>{s}</th>");
        }
        h.push_str("</tr><tr><td class=\"l\">steered</td>");
        for n in &c.selected {
            let _ = write!(h, "<td>{n}</td>");
        }
        h.push_str("</tr><tr><td class=\"l\">migrated in</td>");
        for n in &c.migrated {
            let _ = write!(h, "<td>{n}</td>");
        }
        let _ = write!(
            h,
            "</tr></table><p>fell back to the kernel hash: {} new, {} migrating</p>",
            c.fallback_new, c.fallback_migrate
        );
    }
    h.push_str("<p><a href=\"/stats.json\">JSON</a> · <a href=\"/metrics\">Prometheus</a></p></body></html>");
    h
}

/// An inline SVG line chart: one line per generation.
fn chart(v: &View) -> String {
    const W: f64 = 720.0;
    const H: f64 = 180.0;
    const COLORS: [&str; 6] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let points: Vec<&(u64, u64)> = v.history.iter().flat_map(|s| &s.points).collect();
    if points.is_empty() {
        return "<p id=\"chart\">(no history yet: samples every 2 s while a generation is active)</p>".into();
    }
    let t0 = points.iter().map(|p| p.0).min().unwrap_or(0);
    let t1 = points.iter().map(|p| p.0).max().unwrap_or(0).max(t0 + 1);
    let ymax = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    let x = |t: u64| 40.0 + (t - t0) as f64 / (t1 - t0) as f64 * (W - 60.0);
    let y = |n: u64| H - 20.0 - n as f64 / ymax as f64 * (H - 40.0);
    let mut svg = format!(
        "<svg id=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\"><rect width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/><text x=\"4\" y=\"14\" font-size=\"11\">{ymax} per {}s</text><text x=\"4\" y=\"{}\" font-size=\"11\">0</text>",
        HISTORY_INTERVAL_MS / 1000,
        H - 20.0
    );
    for (i, s) in v.history.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(t, n)| format!("{:.1},{:.1}", x(t), y(n)))
            .collect();
        let canary = v
            .canary
            .as_ref()
            .is_some_and(|c| c.generation == s.generation);
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"><title>generation {}{role}</title></polyline><text x=\"{:.1}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">gen {}{role}</text>",
            pts.join(" "),
            s.generation,
            W - 90.0,
            14 + 12 * i,
            s.generation,
            dash = if canary {
                " stroke-dasharray=\"6 3\""
            } else {
                ""
            },
            role = if canary { " (canary)" } else { "" },
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A table with one column per label, per shown counter and per derived
/// figure, in the counter table's order.
fn table<T: Table>(h: &mut String, id: &str, label_headers: &[&str], rows: &[Row<T>]) {
    let _ = write!(h, "<table id=\"{id}\"><tr>");
    for l in label_headers {
        let _ = write!(h, "<th>{l}</th>");
    }
    let derived = rows.first().map(|r| r.derived.as_slice()).unwrap_or(&[]);
    let shown = T::DEFS.iter().filter(|d| d.show != Show::Hidden);
    for d in shown
        .map(|d| d.column)
        .chain(derived.iter().map(|(d, _)| d.column))
    {
        let _ = write!(h, "<th>{d}</th>");
    }
    let checks = rows.iter().any(|r| r.check.is_some());
    if checks {
        h.push_str("<th>last check</th><th>since</th>");
    }
    h.push_str("</tr>");
    let now_ms = crate::sys::unix_ms();
    for r in rows {
        h.push_str("<tr>");
        for (_, _, v) in &r.labels {
            let _ = write!(h, "<td class=\"l\">{}</td>", esc(v));
        }
        for (d, v) in r.shown() {
            let _ = match d.show {
                Show::Flag if v > 0 => write!(h, "<td class=\"\">UP</td>"),
                Show::Flag => write!(h, "<td class=\"down\">DOWN</td>"),
                Show::Bytes => write!(h, "<td>{}</td>", human_bytes(v)),
                Show::Count | Show::Hidden => write!(h, "<td>{v}</td>"),
            };
        }
        for (_, x) in &r.derived {
            let shown = x
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "-".into());
            let _ = write!(h, "<td>{shown}</td>");
        }
        if checks {
            match &r.check {
                // The reason on hover, HAProxy's words.
                Some(c) => {
                    let _ = write!(
                        h,
                        "<td class=\"l\" title=\"{}\">{}</td><td>{}</td>",
                        esc(c.reason.unwrap_or("not checked yet")),
                        esc(&c.last_check()),
                        esc(&c.since(now_ms))
                    );
                }
                None => h.push_str("<td class=\"l\">no check</td><td>-</td>"),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}
