//! `proxy-bench --stages`: how much the proxy's data-path stages cost.
//!
//! One run, isolated in its own network namespace with its own bpffs, starts
//! an in-process HTTP backend and a layer-4 responder, starts the proxy in
//! the topology the product ships (gzip and TLS stages in front of an
//! application frontend on UNIX sockets with PROXY v2, plus a plain layer-4
//! listener and a one-hop HTTP listener), then measures each path and prints
//! it next to the same measurement against the backend reached directly.
//! Figures are printed, never asserted; only wrong bytes or a proxy that does
//! not start or dies make it fail.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail, ensure};
use proxy_harness::{
    Proxy, Sandbox,
    certs::{TestCert, make_cert},
    config::toml_str,
    process::tail,
    signals::Signal,
    tls::trusting,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use crate::{
    backend::{self, Bodies},
    client::{self, Dialer, Encoding, HttpTarget},
    stats::{self, Row},
};

/// The proxy's listeners: fixed ports are safe inside the private namespace.
const L4_PORT: u16 = 7000;
const COMP_PORT: u16 = 7080;
const HOP_PORT: u16 = 7081;
const TLS_PORT: u16 = 7443;
/// Each measurement is preceded by this much unmeasured load, so that
/// connection setup, pools and caches are warm when timing starts.
const WARMUP: Duration = Duration::from_millis(500);

/// What the stage comparison needs from the command line.
pub struct Args {
    /// The proxy binary.
    pub proxy: PathBuf,
    /// How long each measurement runs, in seconds.
    pub seconds: u64,
    /// Concurrent clients per measurement.
    pub connections: u64,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.proxy.is_file(),
        "{} is not a file (build it with `cargo xtask build`)",
        args.proxy.display()
    );
    // Still single-threaded here: the sandbox enters its namespace before
    // the runtime creates its threads, so that they all live in it.
    let sb = Sandbox::with_proxy("bench", args.proxy.clone());
    let result = (|| {
        let cert = make_cert(&sb.dir, "localhost", &["localhost"]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let result = (|| {
            let bodies = Bodies::new();
            let (http_addr, echo_addr) = rt.block_on(start_servers(&bodies))?;
            let config = sb.write_file(
                "proxy.toml",
                &proxy_config(&sb, http_addr, echo_addr, &cert),
            );
            let mut proxy = Proxy::start(&sb, &config, &[]);
            proxy.wait_active(&sb, Duration::from_secs(15));
            let servers = Servers {
                bodies,
                http: http_addr,
                echo: echo_addr,
            };
            rt.block_on(async {
                tokio::select! {
                    r = bench(args, &mut proxy, &servers, &cert) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
                }
            })?;
            // A graceful stop, checked: it is also how an instrumented
            // build (`cargo xtask pgo`) gets to write its profile.
            proxy.signal(Signal::Term);
            let status = proxy
                .wait_exit(Duration::from_secs(30))
                .ok_or_else(|| anyhow!("the proxy did not exit within 30 s of SIGTERM"))?;
            ensure!(status.success(), "the proxy exited with {status}");
            Ok(())
        })();
        rt.shutdown_timeout(Duration::from_secs(2));
        result
    })();
    // Kill the proxy, unmount, remove the folder: whatever happened above.
    drop(sb);
    result
}

/// The in-process servers: the HTTP backend and the layer-4 responder.
struct Servers {
    bodies: Bodies,
    http: SocketAddr,
    echo: SocketAddr,
}

/// Binds and starts the HTTP backend and the layer-4 responder on
/// ephemeral ports; returns their addresses.
async fn start_servers(bodies: &Bodies) -> Result<(SocketAddr, SocketAddr)> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let addrs = (http.local_addr()?, echo.local_addr()?);
    tokio::spawn(backend::serve_http(http, bodies.clone()));
    tokio::spawn(backend::serve_echo(echo));
    Ok(addrs)
}

/// An error (with the end of its log) if the proxy has exited.
fn check_alive(proxy: &mut Proxy) -> Result<()> {
    if let Some(status) = proxy.try_exit() {
        bail!(
            "the proxy exited ({status})\n--- proxy log ---\n{}",
            tail(&proxy.log(), 30)
        );
    }
    Ok(())
}

/// Everything that runs on the runtime once the proxy serves: the
/// measurements.
async fn bench(args: &Args, proxy: &mut Proxy, servers: &Servers, cert: &TestCert) -> Result<()> {
    let seconds = Duration::from_secs(args.seconds);
    let conns = usize::try_from(args.connections)?;
    let bodies = &servers.bodies;
    let (http_addr, echo_addr) = (servers.http, servers.echo);

    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let tls = TlsConnector::from(trusting(&cert.der, &["http/1.1"], true));
    let tls_full = TlsConnector::from(trusting(&cert.der, &["http/1.1"], false));
    let target = |dialer: Dialer, path, accept_gzip, expect| {
        let original = match path {
            "/text" => bodies.text.clone(),
            _ => bodies.small.clone(),
        };
        Arc::new(HttpTarget {
            dialer,
            path,
            accept_gzip,
            expect,
            original,
        })
    };
    let direct = Dialer::Tcp(http_addr);
    let hop = Dialer::Tcp(local(HOP_PORT));
    let comp = Dialer::Tcp(local(COMP_PORT));
    let tls_dialer = |connector| Dialer::Tls {
        addr: local(TLS_PORT),
        connector,
    };
    use Encoding::{Gzip, Identity};
    // (label, target): the first of each group is the direct peer.
    let text_targets = [
        (
            "direct    GET /text",
            target(direct.clone(), "/text", false, Identity),
        ),
        ("http1hop  GET /text", target(hop, "/text", false, Identity)),
        (
            "comp      GET /text gzip",
            target(comp.clone(), "/text", true, Gzip),
        ),
        (
            "comp      GET /text identity",
            target(comp.clone(), "/text", false, Identity),
        ),
        (
            "tls       GET /text",
            target(tls_dialer(tls), "/text", false, Identity),
        ),
    ];
    // Accept-Encoding is sent as browsers do; the body is below min_size,
    // so the stage must pass it through.
    let small_targets = [
        (
            "direct    GET /small",
            target(direct, "/small", false, Identity),
        ),
        (
            "comp      GET /small (gzip accepted)",
            target(comp, "/small", true, Identity),
        ),
    ];
    let handshake_target = target(tls_dialer(tls_full), "/small", false, Identity);

    println!(
        "proxy-bench: {} s per measurement, {} concurrent clients, /text body {} bytes, \
         /small body {} bytes",
        args.seconds,
        conns,
        bodies.text.len(),
        bodies.small.len()
    );

    // Correctness first: every path must deliver the backend's bytes.
    for (label, t) in text_targets.iter().chain(&small_targets) {
        let reply = client::fetch_once(t)
            .await
            .with_context(|| format!("probing {}", label.trim()))?;
        client::check(t, &reply, true).with_context(|| format!("probing {}", label.trim()))?;
    }
    let gzip_target = &text_targets[2].1;
    let gz = client::fetch_once(gzip_target).await?;
    client::check(gzip_target, &gz, true)?;
    let plain = client::gunzip(&gz.body)?;
    if plain != bodies.text {
        bail!("the gzip body via comp does not decompress to the original /text body");
    }
    let compression_ratio = gz.body.len() as f64 / bodies.text.len() as f64;
    println!(
        "compression via comp (level 1): {} -> {} body bytes on the wire, ratio {:.3}; \
         decompressed body matches the original",
        bodies.text.len(),
        gz.body.len(),
        compression_ratio
    );

    let mut rows = Vec::new();
    for group in [&text_targets[..], &small_targets[..]] {
        let mut peer = None;
        for (label, t) in group {
            eprintln!("measuring {} ...", label.trim());
            client::keepalive(t.clone(), conns, WARMUP)
                .await
                .with_context(|| format!("warming up {}", label.trim()))?;
            let mut s = client::keepalive(t.clone(), conns, seconds)
                .await
                .with_context(|| format!("measuring {}", label.trim()))?;
            check_alive(proxy)?;
            // The direct peer is the first of its group: its ratio is 1.
            let peer = *peer.get_or_insert(s.rate());
            rows.push(Row::from_sample(label, "req/s", &mut s, Some(peer)));
        }
    }

    let mut peer = None;
    for (label, addr) in [
        ("direct    new TCP conns (echo)", echo_addr),
        ("l4        new TCP conns", local(L4_PORT)),
    ] {
        eprintln!("measuring {} ...", label.trim());
        client::l4_connections(addr, conns, WARMUP)
            .await
            .with_context(|| format!("warming up {}", label.trim()))?;
        let mut s = client::l4_connections(addr, conns, seconds)
            .await
            .with_context(|| format!("measuring {}", label.trim()))?;
        check_alive(proxy)?;
        let peer = *peer.get_or_insert(s.rate());
        rows.push(Row::from_sample(label, "conn/s", &mut s, Some(peer)));
    }

    let label = "tls       new TLS conns (full handshake + GET /small)";
    eprintln!("measuring {} ...", label.trim());
    let mut s = client::tls_connections(handshake_target, conns, seconds)
        .await
        .with_context(|| format!("measuring {}", label.trim()))?;
    check_alive(proxy)?;
    rows.push(Row::from_sample(label, "conn/s", &mut s, None));

    println!();
    print!("{}", stats::render(&rows));
    // A proxy that answered everything may still have complained: say so,
    // since a warning per connection would also explain a low figure.
    let log = proxy.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if !complaints.is_empty() {
        println!(
            "\nthe proxy logged {} warning/error lines; the first ones:\n{}",
            complaints.len(),
            complaints[..complaints.len().min(5)].join("\n")
        );
    }
    println!(
        "\nratio: figure / the direct figure of the same group (the direct backend for \
         HTTP, the direct responder for new TCP conns; '-': no direct peer).\n\
         p50/p99: latency per request (keep-alive) or per connection, seen by the client.\n\
         compression ratio (gzip body / identity body) for /text: {compression_ratio:.3}\n\
         new-connection runs stop after {} connections.",
        client::MAX_NEW_CONNECTIONS_PER_RUN
    );
    Ok(())
}

/// The proxy config: the topology the product ships, with the run's paths
/// and backend ports.
fn proxy_config(sb: &Sandbox, http: SocketAddr, echo: SocketAddr, cert: &TestCert) -> String {
    let path = |p: &std::path::Path| toml_str(&p.display().to_string());
    let unix = |file: &str| toml_str(&format!("unix:{}", sb.dir.join(file).display()));
    format!(
        r#"[global]
name = {name}
bpffs = {bpffs}
steering = "ebpf"
hard_stop_after = "5s"

# plain layer 4
[[listener]]
name = "l4"
bind = ["127.0.0.1:{L4_PORT}"]
backend = "echo"

# gzip stage -> unix + PROXY v2 -> app
[[listener]]
name = "comp"
bind = ["127.0.0.1:{COMP_PORT}"]
mode = "http"
cpus = [1]
backend = "app0"
[listener.compression]
level = 1
min_size = 256

# TLS stage -> unix + PROXY v2 -> app
[[listener]]
name = "tls"
bind = ["127.0.0.1:{TLS_PORT}"]
mode = "tcp"
cpus = [1]
backend = "app1"
[listener.tls]
certs = [{bundle}]
alpn = ["http/1.1"]

# the application frontend on UNIX sockets
[[listener]]
name = "app"
bind = [{app0}, {app1}]
mode = "http"
accept_proxy = true
cpus = [0]
backend = "web"

# the same frontend reachable directly over TCP (one hop, no gzip)
[[listener]]
name = "http1hop"
bind = ["127.0.0.1:{HOP_PORT}"]
mode = "http"
backend = "web"

[[backend]]
name = "echo"
servers = ["{echo}"]

[[backend]]
name = "app0"
servers = [{app0}]
send_proxy_v2 = true

[[backend]]
name = "app1"
servers = [{app1}]
send_proxy_v2 = true

[[backend]]
name = "web"
servers = ["{http}"]
"#,
        name = toml_str(&sb.name),
        bpffs = path(&sb.bpffs),
        bundle = path(&cert.bundle),
        app0 = unix("app0.sock"),
        app1 = unix("app1.sock"),
    )
}
