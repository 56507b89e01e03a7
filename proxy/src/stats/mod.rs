//! The stats listener: one set of figures in three views — an HTML page for
//! people (`/`), JSON for scripts (`/stats.json`) and the Prometheus text
//! exposition (`/metrics`).
//!
//! Figures come from the pinned maps when eBPF steering is in use, so every
//! generation shows the same instance-wide totals (all generations, plus the
//! retired ones: monotonic across handovers), the generations themselves,
//! the eBPF counters and a history of new connections per generation. Without
//! the maps, the page shows this generation's own counters.

pub mod counters;
pub mod status;

use std::{collections::BTreeMap, convert::Infallible, fmt::Write, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use proxy_common::{HISTORY_INTERVAL_MS, HistorySample, MAX_SLOTS};
use serde::Serialize;
use tracing::debug;

use crate::{
    stats::counters::Registry,
    stage::socket::Listener,
    stats::status::{GenStatus},
    steering::{Counters, Maps, Slot},
};

/// What one stats listener shows.
pub struct StatsSource {
    pub instance: String,
    pub banner: String,
    /// Only this listener (and its backend's servers), for a stage's own
    /// stats listener; None for the instance-wide one.
    pub only_listener: Option<String>,
    /// The pinned maps, opened at startup (before any privilege drop), when
    /// steering is in use.
    pub maps: Option<std::sync::Mutex<Maps>>,
    /// Our slot: our own counters are published fresh before each view.
    pub own_slot: Option<Slot>,
    /// This generation's counters (used without maps).
    pub registry: Arc<Registry>,
    /// Backend of each listener, to filter servers.
    pub listener_backends: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct ListenerRow {
    pub name: String,
    pub current: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub proxy_header_errors: u64,
    pub http_requests: u64,
    /// Response body bytes after / before compression; None when nothing
    /// went through the compressor.
    pub compression_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ServerRow {
    pub backend: String,
    pub server: String,
    pub current: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub up: bool,
}

/// New connections of one generation per history interval.
#[derive(Debug, Serialize)]
pub struct Series {
    pub generation: u64,
    /// (unix ms, new connections in the interval ending then)
    pub points: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct View {
    pub instance: String,
    pub banner: String,
    pub steering: &'static str,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub listeners: Vec<ListenerRow>,
    pub servers: Vec<ServerRow>,
    pub ebpf: Option<Counters>,
    pub history_interval_ms: u64,
    pub history: Vec<Series>,
}

impl StatsSource {
    /// Gathers the figures now.
    pub fn view(&self) -> View {
        let from_maps = self.maps.as_ref().and_then(|maps| {
            let mut maps = maps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = self.own_slot {
                let snapshot = self.registry.snapshot();
                let _ =
                    maps.publish_metrics(slot, snapshot.iter().map(|(id, v)| (id.as_str(), *v)));
            }
            // Under the instance lock: a new generation claiming a slot
            // moves that slot's counters into the retired totals, and a
            // reader in between would count them twice or not at all.
            let maps = maps.lock().ok()?;
            let st = status::from_maps(&maps, &self.instance).ok()?;
            let live: Vec<Slot> = st
                .generations
                .iter()
                .filter(|g| g.alive)
                .map(|g| Slot(g.slot))
                .collect();
            let totals = maps.metric_totals(&live).ok()?;
            let history = maps.history().unwrap_or_default();
            Some((st, totals, history))
        });
        let (generations, active_slot, ebpf, totals, history, steering) = match from_maps {
            Some((st, totals, history)) => (
                st.generations,
                st.active_slot,
                Some(st.counters),
                totals,
                history,
                "ebpf",
            ),
            None => (
                Vec::new(),
                None,
                None,
                self.registry.snapshot().into_iter().collect(),
                Vec::new(),
                "reuseport (no eBPF: this generation's own counters)",
            ),
        };
        let (listeners, servers) = self.rows(&totals);
        View {
            instance: self.instance.clone(),
            banner: self.banner.clone(),
            steering,
            active_slot,
            generations,
            listeners,
            servers,
            ebpf,
            history_interval_ms: HISTORY_INTERVAL_MS,
            history: series(&history),
        }
    }

    fn rows(&self, totals: &BTreeMap<String, u64>) -> (Vec<ListenerRow>, Vec<ServerRow>) {
        let get = |id: String| totals.get(&id).copied().unwrap_or(0);
        let wanted = |name: &str| {
            self.only_listener
                .as_deref()
                .is_none_or(|only| only == name)
        };
        let listeners: Vec<ListenerRow> = self
            .listener_backends
            .iter()
            .filter(|(name, _)| wanted(name))
            .map(|(name, _)| {
                let c = |counter: &str| get(format!("listener/{name}/{counter}"));
                let (body_in, body_out) = (c("body_in"), c("body_out"));
                ListenerRow {
                    name: name.clone(),
                    current: c("current"),
                    total: c("total"),
                    bytes_in: c("bytes_in"),
                    bytes_out: c("bytes_out"),
                    errors: c("errors"),
                    tls_handshakes: c("tls_handshakes"),
                    tls_failures: c("tls_failures"),
                    proxy_header_errors: c("proxy_header_errors"),
                    http_requests: c("http_requests"),
                    compression_ratio: (body_in > 0).then(|| body_out as f64 / body_in as f64),
                }
            })
            .collect();
        let backends: Vec<&str> = self
            .listener_backends
            .iter()
            .filter(|(name, _)| wanted(name))
            .map(|(_, b)| b.as_str())
            .collect();
        let servers = self
            .registry
            .servers
            .iter()
            .filter(|(b, _, _)| backends.contains(&b.as_str()))
            .map(|(backend, server, _)| {
                let c = |counter: &str| get(format!("server/{backend}/{server}/{counter}"));
                ServerRow {
                    backend: backend.clone(),
                    server: server.clone(),
                    current: c("current"),
                    total: c("total"),
                    bytes_in: c("bytes_in"),
                    bytes_out: c("bytes_out"),
                    errors: c("errors"),
                    // Up when every live generation that tried it succeeded
                    // last (the gauge sums over live generations).
                    up: totals
                        .get(&format!("server/{backend}/{server}/up"))
                        .is_none_or(|&v| v > 0),
                }
            })
            .collect();
        (listeners, servers)
    }
}

/// New connections per interval and generation, from cumulative samples.
fn series(samples: &[HistorySample]) -> Vec<Series> {
    let mut by_gen: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for pair in samples.windows(2) {
        let (prev, cur) = (&pair[0], &pair[1]);
        for slot in 0..MAX_SLOTS as usize {
            let generation = cur.generation[slot];
            if generation == 0 {
                continue;
            }
            let before = if prev.generation[slot] == generation {
                prev.accepted[slot]
            } else {
                0
            };
            by_gen
                .entry(generation)
                .or_default()
                .push((cur.unix_ms, cur.accepted[slot].saturating_sub(before)));
        }
    }
    by_gen
        .into_iter()
        .map(|(generation, points)| Series { generation, points })
        .collect()
}

/// Serves the stats listener until the task is dropped.
pub async fn serve(listener: Arc<Listener>, source: Arc<StatsSource>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(ok) => ok,
            Err(e) => {
                debug!("stats listener: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(respond(&source, &req)) }
            });
            let io = TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                debug!("stats connection: {e}");
            }
        });
    }
}

fn respond<B>(source: &StatsSource, req: &Request<B>) -> Response<Full<Bytes>> {
    let (ctype, body) = match req.uri().path() {
        "/" | "/stats" => ("text/html; charset=utf-8", html(&source.view())),
        "/stats.json" | "/json" => (
            "application/json",
            serde_json::to_string_pretty(&source.view()).unwrap_or_default(),
        ),
        "/metrics" => (
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(&source.view()),
        ),
        _ => {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Full::new(Bytes::from_static(
                    b"not found: try /, /stats.json or /metrics\n",
                )))
                .expect("static response");
        }
    };
    Response::builder()
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format 0.0.4.
pub fn prometheus(v: &View) -> String {
    let mut out = String::new();
    let inst = label(&v.instance);
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{instance=\"{inst}\"{sep}{labels}}} {value}");
        }
    };
    family(
        "proxy_steering_ebpf",
        "gauge",
        "1 when eBPF steering is in use, 0 for plain SO_REUSEPORT.",
        vec![(String::new(), if v.ebpf.is_some() { 1.0 } else { 0.0 })],
    );
    family(
        "proxy_generation_info",
        "gauge",
        "Generations of the instance (1 per generation; state and slot as labels).",
        v.generations
            .iter()
            .map(|g| {
                (
                    format!(
                        "slot=\"{}\",generation=\"{}\",state=\"{}\",active=\"{}\"",
                        g.slot,
                        g.generation,
                        label(&g.state),
                        g.active
                    ),
                    1.0,
                )
            })
            .collect(),
    );
    family(
        "proxy_generation_accepted_connections_total",
        "counter",
        "Connections accepted by each generation.",
        v.generations
            .iter()
            .map(|g| {
                (
                    format!("generation=\"{}\"", g.generation),
                    g.accepted as f64,
                )
            })
            .collect(),
    );
    type LField = fn(&ListenerRow) -> f64;
    let lfields: [(&str, &str, &str, LField); 10] = [
        (
            "proxy_listener_current_connections",
            "gauge",
            "Open client connections.",
            |r| r.current as f64,
        ),
        (
            "proxy_listener_connections_total",
            "counter",
            "Client connections accepted.",
            |r| r.total as f64,
        ),
        (
            "proxy_listener_received_bytes_total",
            "counter",
            "Bytes read from clients.",
            |r| r.bytes_in as f64,
        ),
        (
            "proxy_listener_sent_bytes_total",
            "counter",
            "Bytes written to clients.",
            |r| r.bytes_out as f64,
        ),
        (
            "proxy_listener_errors_total",
            "counter",
            "Client connections that ended in an error.",
            |r| r.errors as f64,
        ),
        (
            "proxy_listener_tls_handshakes_total",
            "counter",
            "Completed TLS handshakes.",
            |r| r.tls_handshakes as f64,
        ),
        (
            "proxy_listener_tls_handshake_failures_total",
            "counter",
            "Failed TLS handshakes.",
            |r| r.tls_failures as f64,
        ),
        (
            "proxy_listener_proxy_header_errors_total",
            "counter",
            "Bad or missing PROXY v2 headers.",
            |r| r.proxy_header_errors as f64,
        ),
        (
            "proxy_listener_http_requests_total",
            "counter",
            "HTTP requests served.",
            |r| r.http_requests as f64,
        ),
        (
            "proxy_listener_compression_ratio",
            "gauge",
            "Compressed / original response body bytes (0 when nothing was compressed).",
            |r| r.compression_ratio.unwrap_or(0.0),
        ),
    ];
    for (name, kind, help, f) in lfields {
        family(
            name,
            kind,
            help,
            v.listeners
                .iter()
                .map(|r| (format!("listener=\"{}\"", label(&r.name)), f(r)))
                .collect(),
        );
    }
    type SField = fn(&ServerRow) -> u64;
    let sfields: [(&str, &str, &str, SField); 6] = [
        (
            "proxy_server_current_connections",
            "gauge",
            "Open connections to the server.",
            |r| r.current,
        ),
        (
            "proxy_server_connections_total",
            "counter",
            "Connections made to the server.",
            |r| r.total,
        ),
        (
            "proxy_server_received_bytes_total",
            "counter",
            "Bytes received from the server.",
            |r| r.bytes_in,
        ),
        (
            "proxy_server_sent_bytes_total",
            "counter",
            "Bytes sent to the server.",
            |r| r.bytes_out,
        ),
        (
            "proxy_server_connect_errors_total",
            "counter",
            "Failed connection attempts.",
            |r| r.errors,
        ),
        (
            "proxy_server_up",
            "gauge",
            "1 when the last connection attempt succeeded.",
            |r| r.up as u64,
        ),
    ];
    for (name, kind, help, f) in sfields {
        family(
            name,
            kind,
            help,
            v.servers
                .iter()
                .map(|r| {
                    (
                        format!(
                            "backend=\"{}\",server=\"{}\"",
                            label(&r.backend),
                            label(&r.server)
                        ),
                        f(r) as f64,
                    )
                })
                .collect(),
        );
    }
    if let Some(c) = &v.ebpf {
        // Slot counters restart when a new generation claims the slot: label
        // them with the generation, so that each series only ever grows.
        let owner = |slot: usize| {
            v.generations
                .iter()
                .find(|g| g.slot as usize == slot)
                .map(|g| g.generation)
        };
        let per_slot = |values: &[u64]| -> Vec<(String, f64)> {
            values
                .iter()
                .enumerate()
                .filter_map(|(slot, n)| {
                    owner(slot).map(|generation| {
                        (
                            format!("slot=\"{slot}\",generation=\"{generation}\""),
                            *n as f64,
                        )
                    })
                })
                .collect()
        };
        family(
            "proxy_ebpf_steered_total",
            "counter",
            "New connections the eBPF program steered to each generation.",
            per_slot(&c.selected),
        );
        family(
            "proxy_ebpf_migrated_total",
            "counter",
            "Queued requests of closing listeners migrated into each generation.",
            per_slot(&c.migrated),
        );
        family(
            "proxy_ebpf_fallback_total",
            "counter",
            "Connections the program left to the kernel's hash (active slot empty).",
            vec![
                ("kind=\"new\"".into(), c.fallback_new as f64),
                ("kind=\"migrate\"".into(), c.fallback_migrate as f64),
            ],
        );
    }
    out
}

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
    h.push_str("<h2>Generations</h2><table id=\"generations\"><tr><th>slot</th><th>generation</th><th>pid</th><th>state</th><th>age</th><th>accepted</th><th>open</th><th>steered</th><th>migrated in</th></tr>");
    for g in &v.generations {
        let _ = write!(
            h,
            "<tr class=\"{cls}\" data-generation=\"{gen}\" data-state=\"{state}\"><td>{slot}</td><td>{gen}</td><td>{pid}</td><td class=\"l\">{state}{star}</td><td>{age}</td><td>{acc}</td><td>{open}</td><td>{st}</td><td>{mig}</td></tr>",
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
            st = g.steered,
            mig = g.migrated_in,
        );
    }
    h.push_str("</table>");
    h.push_str("<h2>New connections per generation</h2>");
    h.push_str(&chart(v));
    h.push_str("<h2>Listeners</h2><table id=\"listeners\"><tr><th>listener</th><th>open</th><th>total</th><th>bytes in</th><th>bytes out</th><th>errors</th><th>TLS handshakes</th><th>TLS failures</th><th>PROXY errors</th><th>HTTP requests</th><th>gzip ratio</th></tr>");
    for r in &v.listeners {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            r.current,
            r.total,
            human_bytes(r.bytes_in),
            human_bytes(r.bytes_out),
            r.errors,
            r.tls_handshakes,
            r.tls_failures,
            r.proxy_header_errors,
            r.http_requests,
            r.compression_ratio
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
    h.push_str("</table><h2>Servers</h2><table id=\"servers\"><tr><th>backend</th><th>server</th><th>status</th><th>open</th><th>total</th><th>bytes to</th><th>bytes from</th><th>connect errors</th></tr>");
    for r in &v.servers {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.backend),
            esc(&r.server),
            if r.up { "" } else { "down" },
            if r.up { "UP" } else { "DOWN" },
            r.current,
            r.total,
            human_bytes(r.bytes_out),
            human_bytes(r.bytes_in),
            r.errors,
        );
    }
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
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"><title>generation {}</title></polyline><text x=\"{:.1}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">gen {}</text>",
            pts.join(" "),
            s.generation,
            W - 60.0,
            14 + 12 * i,
            s.generation
        );
    }
    svg.push_str("</svg>");
    svg
}
