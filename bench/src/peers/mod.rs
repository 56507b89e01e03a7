//! `proxy-bench` (the default): where the proxy stands against HAProxy and
//! nginx.
//!
//! # Layout
//!
//! One run, in its own network namespace: an origin nginx serves `/small`
//! (98 B) and `/big.html` (64 KiB of HTML); HAProxy, nginx and our proxy
//! ([`contender`]) each forward to it on four listeners (HTTP, HTTP with
//! gzip, TLS with an ECDSA P-256 certificate, TLS with RSA 2048), all with
//! one thread or worker, the contenders and the origin pinned on CPU 0 and
//! the load on CPU 1. Every row ([`ROWS`]) is run against each contender in
//! turns of one second (in alternating order, so that the machine's drift
//! weighs on all alike), `runs` times: keep-alive and new-connection HTTP loads with
//! [`wrk`], full TLS 1.3 handshakes with the in-process rustls client (wrk's
//! OpenSSL client saturates before the servers do). Then each contender's
//! peak memory, and what it holds per idle keep-alive client ([`idle`]).
//! [`report`] writes JSON and markdown. Figures are never asserted; wrong
//! bytes or a contender that dies make the run fail.

mod contender;
mod idle;
mod report;
mod wrk;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use proxy_harness::{Sandbox, process::run_bounded, signals::Signal};
use rustls::{ClientConfig, RootCertStore, client::Resumption, pki_types::CertificateDer};
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;

use self::{
    contender::{Files, Kind, LOAD_CPU, Listener, MAXCONN, Running},
    report::{Cell, IdleFigures, Memory, Report, RowResult, RunFigures},
};
use crate::{
    backend,
    client::{self, Dialer, Encoding, HttpTarget},
};

/// Concurrent wrk connections (as in the table: wrk -c64).
const WRK_CONNECTIONS: usize = 64;
/// Concurrent handshaking clients.
const HANDSHAKE_CLIENTS: usize = 32;
/// Idle keep-alive client counts.
const IDLE_COUNTS: [usize; 3] = [1_000, 4_000, 16_000];
/// The origin's bodies.
const SMALL_LEN: usize = 98;
const BIG_LEN: usize = 64 * 1024;
const HUGE_LEN: usize = 1024 * 1024;

/// What the peer comparison needs from the command line.
pub struct Args {
    pub proxy: PathBuf,
    pub seconds: u64,
    pub runs: usize,
    pub quick: bool,
    /// Where the results folder is made.
    pub out: PathBuf,
    /// Drive only our proxy, every row once, then stop it gracefully: the
    /// training run of profile-guided optimisation (`cargo xtask pgo`).
    pub train: bool,
}

/// What a row drives.
#[derive(Clone, Copy)]
enum Load {
    /// wrk against a listener, with extra request headers.
    Wrk {
        listener: Listener,
        path: &'static str,
        headers: &'static [&'static str],
    },
    /// Full TLS 1.3 handshakes (no resumption), one `GET /small` with
    /// `Connection: close` each.
    Handshake { listener: Listener },
}

struct RowSpec {
    id: &'static str,
    label: &'static str,
    load: Load,
}

const ROWS: [RowSpec; 9] = [
    RowSpec {
        id: "http_keepalive_98b",
        label: "HTTP keep-alive, 98 B (wrk -c64)",
        load: Load::Wrk {
            listener: Listener::Http,
            path: "/small",
            headers: &[],
        },
    },
    RowSpec {
        id: "http_close_98b",
        label: "HTTP, new connection per request (`Connection: close`)",
        load: Load::Wrk {
            listener: Listener::Http,
            path: "/small",
            headers: &["Connection: close"],
        },
    },
    RowSpec {
        id: "http_keepalive_64k",
        label: "HTTP keep-alive, 64 KiB",
        load: Load::Wrk {
            listener: Listener::Http,
            path: "/big.html",
            headers: &[],
        },
    },
    RowSpec {
        id: "tcp_64k",
        label: "tcp mode, 64 KiB (HTTP keep-alive through a layer-4 listener)",
        load: Load::Wrk {
            listener: Listener::Tcp,
            path: "/big.html",
            headers: &[],
        },
    },
    RowSpec {
        id: "tcp_1m",
        label: "tcp mode, 1 MiB",
        load: Load::Wrk {
            listener: Listener::Tcp,
            path: "/huge.bin",
            headers: &[],
        },
    },
    RowSpec {
        id: "gzip_64k",
        label: "gzip level 1, 64 KiB HTML",
        load: Load::Wrk {
            listener: Listener::Gzip,
            path: "/big.html",
            headers: &["Accept-Encoding: gzip"],
        },
    },
    RowSpec {
        id: "tls_keepalive",
        label: "TLS keep-alive request (ECDSA, 98 B)",
        load: Load::Wrk {
            listener: Listener::TlsEcdsa,
            path: "/small",
            headers: &[],
        },
    },
    RowSpec {
        id: "tls13_handshake_rsa2048",
        label: "TLS 1.3 full handshake, RSA 2048 (rustls client, no resumption)",
        load: Load::Handshake {
            listener: Listener::TlsRsa,
        },
    },
    RowSpec {
        id: "tls13_handshake_ecdsa_p256",
        label: "TLS 1.3 full handshake, ECDSA P-256",
        load: Load::Handshake {
            listener: Listener::TlsEcdsa,
        },
    },
];

/// Runs the comparison; writes `<out>/<time>/results.{json,md}` and prints
/// the markdown.
pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.proxy.is_file(),
        "{} is not a file (build it with `cargo xtask build`)",
        args.proxy.display()
    );
    for tool in ["haproxy", "nginx", "wrk", "taskset", "openssl"] {
        ensure!(
            which(tool),
            "{tool} is not installed (`cargo xtask bench` installs it)"
        );
    }
    // The load side is this process: pin it (and every thread it makes from
    // now on) to the load CPU before the runtime exists.
    let pinned = run_bounded(
        Command::new("taskset")
            .args(["-p", "-c", &LOAD_CPU.to_string()])
            .arg(std::process::id().to_string()),
        Duration::from_secs(5),
    );
    ensure!(
        pinned.status.success(),
        "taskset -p: {}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    contender::raise_open_files();
    let started_utc = utc_now();
    let sb = Sandbox::with_proxy("peers", args.proxy.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = if args.train {
        train(args, &sb, &rt).map(|()| None)
    } else {
        suite(args, &sb, &rt, started_utc).map(Some)
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    // The sandbox kills every process it adopted (by PID) and removes its
    // folder, whatever happened above.
    drop(sb);
    let Some(report) = result? else {
        return Ok(());
    };
    let dir = args.out.join(&report.started_utc);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = report::markdown(&report);
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    fs::write(dir.join("results.md"), &md)?;
    println!("\n{md}\nwritten to {}", dir.display());
    Ok(())
}

/// What every contender is driven with: the origin's files, the
/// certificates, the wrk script, the client side's bodies and TLS configs.
struct Prepared {
    www: PathBuf,
    ecdsa: PathBuf,
    rsa: PathBuf,
    script: PathBuf,
    bodies: Bodies,
}

impl Prepared {
    fn new(sb: &Sandbox) -> Result<Prepared> {
        let www = sb.dir.join("www");
        fs::create_dir_all(&www)?;
        let small = small_body();
        let big = big_body();
        fs::write(www.join("small"), &small)?;
        fs::write(www.join("big.html"), &big)?;
        fs::write(www.join("huge.bin"), huge_body())?;
        let script = sb.write_file("report.lua", wrk::SCRIPT);
        let (ecdsa, ecdsa_der) = contender::make_cert(
            &sb.dir,
            "ecdsa",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )?;
        let (rsa, rsa_der) = contender::make_cert(&sb.dir, "rsa", &["-newkey", "rsa:2048"])?;
        let bodies = Bodies {
            small: Bytes::from(small),
            big: Bytes::from(big),
            ecdsa: tls13_only(&ecdsa_der)?,
            rsa: tls13_only(&rsa_der)?,
        };
        Ok(Prepared {
            www,
            ecdsa,
            rsa,
            script,
            bodies,
        })
    }

    fn files<'a>(&'a self, sb: &'a Sandbox) -> Files<'a> {
        Files {
            dir: &sb.dir,
            www: &self.www,
            ecdsa: &self.ecdsa,
            rsa: &self.rsa,
        }
    }
}

/// The origin's files, the contenders, the rows, the memory figures.
fn suite(args: &Args, sb: &Sandbox, rt: &Runtime, started_utc: String) -> Result<Report> {
    let prepared = Prepared::new(sb)?;
    let files = prepared.files(sb);
    let (script, bodies) = (&prepared.script, &prepared.bodies);

    let mut origin = contender::start_origin(sb, &files)?;
    let mut contenders = Vec::new();
    // The floor last: the peers' and ours come first in every list.
    for kind in Kind::ALL.into_iter().chain([Kind::Floor]) {
        eprintln!("starting {} ...", kind.label());
        contenders.push(contender::start(sb, kind, &files)?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss: Vec<u64> = contenders.iter().map(|c| c.mem_kib("VmRSS")).collect();
    // Correctness first: every contender must deliver the origin's bytes.
    let mut gzip_out = Vec::new();
    for c in &contenders {
        let kind = c.kind.expect("a contender");
        if kind == Kind::Floor {
            rt.block_on(probe_floor(bodies))?;
        } else {
            gzip_out.push(rt.block_on(probe(kind, bodies))?);
        }
    }

    let mut runs: Vec<Vec<Vec<RunFigures>>> = vec![vec![Vec::new(); contenders.len()]; ROWS.len()];
    for run in 0..args.runs {
        for (r, row) in ROWS.iter().enumerate() {
            eprintln!(
                "run {}/{}: {} ({} s per contender, in 1 s turns) ...",
                run + 1,
                args.runs,
                row.label,
                args.seconds
            );
            // The first run warms each contender and row up (pools,
            // caches, the allocator's arenas) before measuring.
            if run == 0 {
                for c in contenders.iter_mut() {
                    let kind = c.kind.expect("a contender");
                    if !takes(kind, row.load) {
                        continue;
                    }
                    measure(rt, script, kind, c, row.load, bodies, 1)
                        .with_context(|| format!("warming up {} via {}", row.id, kind.label()))?;
                }
            }
            // The contenders take turns of one second, in alternating
            // order: the speed of this machine drifts by up to 2x within
            // minutes, and turns make every contender see the same drift.
            let mut turns: Vec<Vec<RunFigures>> = vec![Vec::new(); contenders.len()];
            for turn in 0..args.seconds {
                let mut order: Vec<usize> = (0..contenders.len()).collect();
                if turn % 2 == 1 {
                    order.reverse();
                }
                for ci in order {
                    let c = &mut contenders[ci];
                    let kind = c.kind.expect("a contender");
                    if !takes(kind, row.load) {
                        continue;
                    }
                    let f = measure(rt, script, kind, c, row.load, bodies, 1)
                        .with_context(|| format!("{} via {}", row.id, kind.label()))?;
                    c.check_alive()?;
                    origin.check_alive()?;
                    turns[ci].push(f);
                }
            }
            for (ci, t) in turns.iter().enumerate() {
                if !t.is_empty() {
                    runs[r][ci].push(report::combine(t));
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (r, row) in ROWS.iter().enumerate() {
        let mut cells: Vec<Cell> = contenders
            .iter()
            .zip(std::mem::take(&mut runs[r]))
            .filter(|(_, figs)| !figs.is_empty())
            .map(|(c, figs)| report::cell(c.kind.expect("a contender"), figs))
            .collect();
        if row.id == "gzip_64k" {
            for (cell, out) in cells.iter_mut().zip(&gzip_out) {
                cell.body_bytes_out = Some(*out);
            }
        }
        let mut result = RowResult {
            id: row.id,
            label: row.label,
            cells,
        };
        report::set_ratios(&mut result);
        rows.push(result);
    }

    let mut memory = Vec::new();
    for (i, c) in contenders.iter_mut().enumerate() {
        let kind = c.kind.expect("a contender");
        if kind == Kind::Floor {
            continue;
        }
        let peak = c.mem_kib("VmHWM");
        let idle_connections = idle_memory(rt, c, &IDLE_COUNTS)?;
        c.check_alive()?;
        memory.push(Memory {
            contender: kind,
            idle_rss_kib: idle_rss[i],
            peak_rss_kib: peak,
            idle_connections,
        });
    }

    Ok(Report {
        started_utc,
        seconds_per_measurement: args.seconds,
        runs: args.runs,
        quick: args.quick,
        wrk_connections: WRK_CONNECTIONS,
        handshake_clients: HANDSHAKE_CLIENTS,
        versions: versions(),
        rows,
        memory,
        notes: vec![
            "CPU per request: the contender's own processes and threads only (the origin \
             and the load are not counted), from /proc/<pid>/task/*/schedstat around the \
             measured load."
                .into(),
            "Each run of a row: the contenders take turns of 1 s (order reversed every \
             turn) until each had its seconds; a run's figure sums requests and CPU over \
             its turns (p50: the median of the turns', p99: the highest)."
                .into(),
            "Peers: HAProxy `nbthread 1`, `http-reuse safe`, `no-tls-tickets`, \
             `tune.ssl.cachesize 0`, compression `algo gzip` (libslz: no levels); nginx \
             `worker_processes 1`, upstream `keepalive 64`, `gzip_comp_level 1`, \
             `ssl_session_tickets off`, `ssl_session_cache off`, `access_log off`. Ours: \
             `nbthread = 1` (one event loop), `access_log = false` on every \
             listener (lifecycle lines only), TLS session settings as built in."
                .into(),
            "Floor (plain HTTP rows only): this bench's own forwarder (`--floor-serve`, \
             one tokio thread): request head in, hop-by-hop headers out, X-Forwarded-For \
             in, an idle origin connection out of a shared list, response head and \
             `Content-Length` body back; no timers, logs, counters or header checks. The \
             syscalls and packets of a proxy with nothing else: what every contender pays \
             the kernel and an event loop. Not a peer (it sets no best); its ratio is to \
             the best peer."
                .into(),
            "Handshake rows: the rustls client offers TLS 1.3 only, resumption disabled; \
             a new connection per handshake with one GET /small."
                .into(),
            format!(
                "Memory per idle connection: clients each make one request and stay open, \
                 added up to each count (all held until the last count); (RSS with them - \
                 RSS before the first) / connections held, summed over the contender's \
                 processes. The open-file limit the bench gives the contenders is {}: {}",
                contender::open_files(),
                match contender::maxconn() {
                    Some(n) => format!("each is configured for {n} connections."),
                    None => format!(
                        "too few for {MAXCONN} connections each, so each derives its maxconn \
                         from it (the limit could not be raised: that needs CAP_SYS_RESOURCE)."
                    ),
                }
            ),
        ],
    })
}

/// `--train`: our proxy alone, with the access line on and HTTP/2 offered
/// ([`contender::start_training`]), through every row once and an HTTP/2
/// load, a thousand idle clients, then a graceful stop: an instrumented
/// build writes its profile when it exits.
fn train(args: &Args, sb: &Sandbox, rt: &Runtime) -> Result<()> {
    let prepared = Prepared::new(sb)?;
    let files = prepared.files(sb);
    let (script, bodies) = (&prepared.script, &prepared.bodies);
    let mut origin = contender::start_origin(sb, &files)?;
    let mut c = contender::start_training(sb, &files)?;
    let kind = Kind::Proxy;
    rt.block_on(probe(kind, bodies))?;
    for row in &ROWS {
        let f = measure(rt, script, kind, &c, row.load, bodies, args.seconds)
            .with_context(|| format!("training on {}", row.id))?;
        eprintln!("trained: {} ({} requests)", row.label, f.requests);
        c.check_alive()?;
        origin.check_alive()?;
    }
    let url = format!("https://127.0.0.1:{}/small", kind.port(Listener::TlsEcdsa));
    let h2 = run_bounded(
        Command::new("h2load").args(["-n", "100000", "-c", "16", "-m", "8", &url]),
        Duration::from_secs(args.seconds * 5 + 30),
    );
    let report = String::from_utf8_lossy(&h2.stdout);
    ensure!(
        h2.status.success() && report.contains("h2"),
        "h2load against {url} ({}): {report}{}",
        h2.status,
        String::from_utf8_lossy(&h2.stderr)
    );
    eprintln!("trained: HTTP/2 over TLS (h2load, 100,000 requests)");
    idle_memory(rt, &c, &[1_000])?;
    c.check_alive()?;
    let proxy = c.proxy.as_mut().expect("our proxy has a handle");
    proxy.signal(Signal::Term);
    let Some(status) = proxy.wait_exit(Duration::from_secs(30)) else {
        bail!("the proxy did not exit within 30 s of SIGTERM");
    };
    ensure!(status.success(), "the proxy exited with {status}");
    Ok(())
}

/// The bodies and TLS client configs every check and load uses.
struct Bodies {
    small: Bytes,
    big: Bytes,
    ecdsa: TlsConnector,
    rsa: TlsConnector,
}

impl Bodies {
    fn connector(&self, l: Listener) -> TlsConnector {
        match l {
            Listener::TlsRsa => self.rsa.clone(),
            _ => self.ecdsa.clone(),
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn target(
    kind: Kind,
    l: Listener,
    path: &'static str,
    gzip: bool,
    bodies: &Bodies,
) -> Arc<HttpTarget> {
    let addr = local(kind.port(l));
    let dialer = match l {
        Listener::TlsEcdsa | Listener::TlsRsa => Dialer::Tls {
            addr,
            connector: bodies.connector(l),
        },
        _ => Dialer::Tcp(addr),
    };
    Arc::new(HttpTarget {
        dialer,
        path,
        accept_gzip: gzip,
        expect: if gzip {
            Encoding::Gzip
        } else {
            Encoding::Identity
        },
        original: if path == "/small" {
            bodies.small.clone()
        } else {
            bodies.big.clone()
        },
    })
}

/// Whether contender `kind` is measured on a row with `load`: the floor
/// forwards plain HTTP only.
fn takes(kind: Kind, load: Load) -> bool {
    kind != Kind::Floor
        || matches!(
            load,
            Load::Wrk {
                listener: Listener::Http,
                ..
            }
        )
}

/// Checks the floor's one listener.
async fn probe_floor(bodies: &Bodies) -> Result<()> {
    for path in ["/small", "/big.html"] {
        let t = target(Kind::Floor, Listener::Http, path, false, bodies);
        let reply = client::fetch_once(&t)
            .await
            .with_context(|| format!("probing the floor {path}"))?;
        client::check(&t, &reply, true).with_context(|| format!("probing the floor {path}"))?;
    }
    Ok(())
}

/// Checks every listener of a contender; returns the gzip body's length.
async fn probe(kind: Kind, bodies: &Bodies) -> Result<u64> {
    let checks = [
        target(kind, Listener::Http, "/small", false, bodies),
        target(kind, Listener::Http, "/big.html", false, bodies),
        target(kind, Listener::TlsEcdsa, "/small", false, bodies),
        target(kind, Listener::TlsRsa, "/small", false, bodies),
        target(kind, Listener::Tcp, "/big.html", false, bodies),
    ];
    for t in &checks {
        let reply = client::fetch_once(t)
            .await
            .with_context(|| format!("probing {} {}", kind.label(), t.path))?;
        client::check(t, &reply, true)
            .with_context(|| format!("probing {} {}", kind.label(), t.path))?;
    }
    let gz = target(kind, Listener::Gzip, "/big.html", true, bodies);
    let reply = client::fetch_once(&gz).await?;
    client::check(&gz, &reply, true).with_context(|| format!("probing {} gzip", kind.label()))?;
    Ok(reply.body.len() as u64)
}

/// One measurement of `load` against contender `c` for `seconds`.
fn measure(
    rt: &Runtime,
    script: &Path,
    kind: Kind,
    c: &Running,
    load: Load,
    bodies: &Bodies,
    seconds: u64,
) -> Result<RunFigures> {
    match load {
        Load::Wrk {
            listener,
            path,
            headers,
        } => {
            let scheme = match listener {
                Listener::TlsEcdsa | Listener::TlsRsa => "https",
                _ => "http",
            };
            let url = format!("{scheme}://127.0.0.1:{}{path}", kind.port(listener));
            let cpu0 = c.cpu_ns();
            let w = wrk::run(script, &url, WRK_CONNECTIONS, seconds, headers)?;
            let cpu = c.cpu_ns().saturating_sub(cpu0);
            if w.requests == 0 {
                bail!("wrk completed no request against {url}: {w:?}");
            }
            Ok(RunFigures {
                requests: w.requests,
                rate: w.requests as f64 / (w.duration_us.max(1) as f64 / 1e6),
                p50_ms: w.p50_us as f64 / 1000.0,
                p99_ms: w.p99_us as f64 / 1000.0,
                cpu_us_per_req: cpu as f64 / 1000.0 / w.requests as f64,
                errors: w.errors(),
                bytes_per_req: w.bytes as f64 / w.requests as f64,
            })
        }
        Load::Handshake { listener } => {
            let t = target(kind, listener, "/small", false, bodies);
            let cpu0 = c.cpu_ns();
            let mut s = rt.block_on(client::tls_connections(
                t,
                HANDSHAKE_CLIENTS,
                Duration::from_secs(seconds),
            ))?;
            let cpu = c.cpu_ns().saturating_sub(cpu0);
            ensure!(s.count > 0, "no handshake completed");
            Ok(RunFigures {
                requests: s.count,
                rate: s.rate(),
                p50_ms: s.quantile_ms(0.5).unwrap_or(f64::NAN),
                p99_ms: s.quantile_ms(0.99).unwrap_or(f64::NAN),
                cpu_us_per_req: cpu as f64 / 1000.0 / s.count as f64,
                errors: 0,
                bytes_per_req: s.body_bytes as f64 / s.count as f64,
            })
        }
    }
}

/// RSS per idle keep-alive client at each of `counts` (rising): clients
/// are added up to each count and all stay open until the last, so that
/// every figure is measured from the same RSS before the first client.
/// (Measured from a fresh start each time, a count would reuse what the
/// allocator kept of the previous count's clients, and look cheaper.)
fn idle_memory(rt: &Runtime, c: &Running, counts: &[usize]) -> Result<Vec<IdleFigures>> {
    let kind = c.kind.expect("a contender");
    let before = c.mem_kib("VmRSS");
    let mut streams = Vec::new();
    let (mut failed, mut stopped_early) = (0, false);
    let mut figures = Vec::new();
    for &n in counts {
        eprintln!("{n} idle keep-alive clients via {} ...", kind.label());
        let more = rt.block_on(idle::open(
            local(kind.port(Listener::Http)),
            "/small",
            n.saturating_sub(streams.len()),
            Duration::from_secs(60),
        ))?;
        streams.extend(more.streams);
        failed += more.failed;
        stopped_early |= more.stopped_early;
        // Let the contender finish whatever follows a response before reading.
        std::thread::sleep(Duration::from_millis(500));
        let after = c.mem_kib("VmRSS");
        let held = streams.len();
        figures.push(IdleFigures {
            requested: n,
            held,
            failed,
            stopped_early,
            rss_before_kib: before,
            rss_after_kib: after,
            bytes_per_connection: (held > 0)
                .then(|| (after as f64 - before as f64) * 1024.0 / held as f64),
        });
    }
    // Closing: drop the streams inside the runtime, then give the contender
    // a moment to release them.
    rt.block_on(async move { drop(streams) });
    std::thread::sleep(Duration::from_secs(1));
    Ok(figures)
}

/// A client config offering only TLS 1.3, trusting exactly `der`, never
/// resuming: every connection is a full handshake.
fn tls13_only(der: &[u8]) -> Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(der.to_vec()))?;
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| anyhow!("TLS 1.3 with ring: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// 98 bytes of text.
fn small_body() -> Vec<u8> {
    let mut b = b"ok: a small response of ninety-eight bytes, the size the peer comparison uses for its small rows"
        .to_vec();
    b.resize(SMALL_LEN - 1, b'.');
    b.push(b'\n');
    b
}

/// 1 MiB for the tcp mode's long transfers: bytes that do not repeat
/// within a page (the harness's xorshift), as a binary file would be.
fn huge_body() -> Vec<u8> {
    proxy_harness::bodies::Rng::new(1).bytes(HUGE_LEN)
}

/// 64 KiB of catalogue HTML (cut at a line end and padded with a comment
/// to the exact size).
fn big_body() -> Vec<u8> {
    let page = backend::catalogue_page(BIG_LEN);
    let mut b = page.into_bytes();
    b.truncate(BIG_LEN - 16);
    b.extend_from_slice(b"\n<!-- end -->");
    b.resize(BIG_LEN - 1, b' ');
    b.push(b'\n');
    b
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// The version lines of the tools, as they print them.
fn versions() -> Vec<(String, String)> {
    let first_line = |program: &str, args: &[&str]| {
        let out = run_bounded(Command::new(program).args(args), Duration::from_secs(5));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text.lines().next().unwrap_or("").trim().to_string()
    };
    vec![
        ("haproxy".into(), first_line("haproxy", &["-v"])),
        ("nginx".into(), first_line("nginx", &["-v"])),
        ("wrk".into(), first_line("wrk", &["-v"])),
    ]
}

/// The current time as `YYYYMMDDTHHMMSSZ` (the results folder's name).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The default results folder: `bench/out` in the workspace.
pub fn default_out() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_advertised_sizes() {
        assert_eq!(small_body().len(), SMALL_LEN);
        let big = big_body();
        assert_eq!(big.len(), BIG_LEN);
        assert!(big.starts_with(b"<!DOCTYPE html>"));
    }

    #[test]
    fn wrk_script_prints_one_json_line() {
        assert!(wrk::SCRIPT.contains("WRKJSON {"));
    }
}
