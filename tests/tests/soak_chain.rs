//! Soak: [`HANDOVERS`] handovers (100 unless `SOAK_HANDOVERS` says
//! otherwise) of the whole chain under a bounded mixed load, with a backend
//! that hangs now and then. Out of the default run (`cargo xtask soak`, or
//! `cargo test -p proxy-integration-tests --test soak_chain -- --ignored`).
//!
//! The chain, per generation:
//!
//! - `web` (TLS, http, gzip) on :8443 -> `app0.sock` with PROXY v2 -> `app`
//!   (http, accept_proxy) -> the HTTP backend (`server_timeout` 1 s: a hung
//!   backend gets the client a 504);
//! - `stream` (TLS, tcp) on :8444 -> `tapp.sock` with PROXY v2 -> `tapp`
//!   (tcp, accept_proxy) -> an echo server.
//!
//! The load, bounded in count (a fixed set of workers, each pausing between
//! units) and in time (every unit has a deadline): short HTTPS GETs on
//! keep-alive connections, gzip or not; GETs of 1 MiB of compressible text
//! (gzip); slow readers, which read a 1 MiB binary body at ~700 KiB/s
//! through a 32 KiB receive buffer (so the proxy's writes block, for much
//! less than `client_timeout`); and TLS tcp streams of 0.5 to 2.5 s that
//! exchange echoed messages every 20 ms, so every stream alive at a flip
//! carries on through the old generation while the new one takes the new
//! ones. The backend hangs for 0.6 to 1.6 s every 1.5 to 3.5 s: requests
//! arriving then wait past `server_timeout` (504) or are answered late.
//!
//! Each handover starts the next generation, waits until it is active and
//! the old one has exited, and asserts that the old one exited by its
//! deadline: flip seen (≤ 50 ms) + `handover_grace` + `hard_stop_after`,
//! plus a margin. Every client unit is bounded well below
//! `hard_stop_after`, so every old generation must also drain (cut=0).
//!
//! Outcomes of a unit (a request, or a whole stream): answered (200 with the
//! exact body, or a 504 — answered, not lost), lost (a connection error,
//! reset or EOF without a complete response, before its deadline), timed
//! out (no answer by its deadline), bad (another status, or a wrong body).
//! The test wants 0 lost, 0 timed out and 0 bad. Units in flight while a
//! new generation became active are counted per kind ("across"): the
//! streams must be among them.
//!
//! FD count and RSS: every generation is a new process that lives a few
//! seconds, so "the running generation over time" is a sequence of
//! processes. The sound comparison is between two generations with the
//! same history at the same load: the generation that took over in the
//! warm-up handover (the first one to receive migrated connections), and
//! the last one, after 100 handovers. Each serves the mixed load alone for
//! [`SERVE_FOR`] after its predecessor exited; then the load is quiesced
//! (every worker closes its connections and parks, the backend recovers),
//! the generation's open connections fall to 0 and its FD count is stable,
//! and FDs (`/proc/PID/fd`) and RSS (`VmRSS`) are read. Both must agree
//! within 10%: what a generation holds must not grow with the number of
//! handovers before it (pinned maps, slots, UNIX socket paths, listeners
//! inherited or left behind). Under-load figures of every generation, read
//! just before its successor starts, are reported too (not asserted: they
//! follow the load of that instant).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::body::Body as _;
use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox, Signal,
    bodies::{Rng, binary_body, first_difference, text_body, try_gunzip},
    certs::make_cert,
    http::{TestBody, fetch, header_str, http_handshake, request},
    http_backend::HttpBackend,
    procfs::{fd_count, rss_kib},
    report,
    tls::{tls_client_config, tls_connect, tls_handshake},
    wait_until,
};
use rustls::ClientConfig;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket},
};

const WEB_ADDR: &str = "127.0.0.1:8443";
const STREAM_ADDR: &str = "127.0.0.1:8444";
const ECHO_ADDR: &str = "127.0.0.1:9001";

/// Handovers after the warm-up one (`SOAK_HANDOVERS` overrides).
const HANDOVERS: usize = 100;
const HARD_STOP_AFTER: Duration = Duration::from_secs(5);
const HANDOVER_GRACE: Duration = Duration::from_millis(200);
/// An old generation polls the pinned maps for the flip this often.
const FLIP_POLL: Duration = Duration::from_millis(50);
/// Slack on an old generation's deadline (process exit, our polling).
const EXIT_MARGIN: Duration = Duration::from_secs(1);
const SERVER_TIMEOUT: Duration = Duration::from_secs(1);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of one request (connect included) or of one stream exchange.
const DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of one slow read of 1 MiB.
const SLOW_DEADLINE: Duration = Duration::from_secs(15);
/// 1 MiB bodies.
const BIG: usize = 1 << 20;
/// Slow readers' pace, and their receive buffer.
const SLOW_RATE: f64 = 700.0 * 1024.0;
const SLOW_RCVBUF: u32 = 32 * 1024;
/// Streams live this long (uniform), exchanging a message every
/// [`STREAM_PAUSE`].
const STREAM_LIFE_MS: (u64, u64) = (500, 2500);
const STREAM_PAUSE: Duration = Duration::from_millis(20);
/// Hang windows of the backend: every 1.5 to 3.5 s, for 0.6 to 1.6 s.
const HANG_EVERY_MS: (u64, u64) = (1500, 3500);
const HANG_FOR_MS: (u64, u64) = (600, 1600);
/// After each handover, the new generation serves alone at least this long.
const SETTLE: Duration = Duration::from_millis(500);
/// The measured generations (first and last) serve this much longer.
const SERVE_FOR: Duration = Duration::from_secs(3);
/// FD count and RSS of the last generation vs the first, relative.
const TOLERANCE: f64 = 0.10;
/// Bound on the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(12 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Short HTTPS GETs, keep-alive.
    Short,
    /// GETs of 1 MiB gzip-compressible text.
    Big,
    /// 1 MiB binary bodies read slowly.
    Slow,
    /// TLS tcp streams exchanging echoed messages.
    Stream,
}

const KINDS: [Kind; 4] = [Kind::Short, Kind::Big, Kind::Slow, Kind::Stream];

/// Workers per kind.
fn workers_of(kind: Kind) -> usize {
    match kind {
        Kind::Short => 3,
        Kind::Big => 1,
        Kind::Slow => 2,
        Kind::Stream => 3,
    }
}

/// How one unit (a request, or a whole stream) ended.
enum Outcome {
    Ok,
    /// 504 from a stage whose server hung: answered.
    GatewayTimeout,
    /// Connection error, reset or EOF without a whole response, before the
    /// deadline.
    Lost(String),
    TimedOut(String),
    /// Another status, or a wrong body.
    Bad(String),
}

#[derive(Default)]
struct KindStats {
    ok: AtomicU64,
    gateway_timeout: AtomicU64,
    lost: AtomicU64,
    timed_out: AtomicU64,
    bad: AtomicU64,
    /// Response (or echoed) bytes received in answered units.
    bytes: AtomicU64,
    /// Connections opened.
    connections: AtomicU64,
    /// Units in flight while a new generation became active (begun under
    /// one serving generation, ended under another).
    across: AtomicU64,
}

impl KindStats {
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.gateway_timeout.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
            + self.timed_out.load(Ordering::Relaxed)
            + self.bad.load(Ordering::Relaxed)
    }
}

/// What the workers share with the test thread.
struct Soak {
    stats: [KindStats; 4],
    /// Echo exchanges of the streams.
    exchanges: AtomicU64,
    /// Keep-alive connections a draining generation ended with
    /// `Connection: close`.
    closed_by_server: AtomicU64,
    /// The first failures, with when and under which generation.
    failures: Mutex<Vec<String>>,
    started: Instant,
    /// The generation serving new connections (for failure messages).
    serving: AtomicU64,
    /// Set: workers close their connections and park.
    paused: AtomicBool,
    parked: AtomicUsize,
    stop: AtomicBool,
    /// Hang windows the backend went through.
    hangs: AtomicU64,
}

impl Soak {
    fn kind(&self, kind: Kind) -> &KindStats {
        &self.stats[KINDS.iter().position(|k| *k == kind).expect("a kind")]
    }

    /// Counts a unit begun while generation `began` was serving.
    fn record(&self, kind: Kind, worker: usize, began: u64, outcome: Outcome, bytes: usize) {
        let st = self.kind(kind);
        if self.serving.load(Ordering::Relaxed) != began {
            st.across.fetch_add(1, Ordering::Relaxed);
        }
        let (counter, what) = match outcome {
            Outcome::Ok => {
                st.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                (&st.ok, None)
            }
            Outcome::GatewayTimeout => (&st.gateway_timeout, None),
            Outcome::Lost(e) => (&st.lost, Some(format!("lost: {e}"))),
            Outcome::TimedOut(e) => (&st.timed_out, Some(format!("timed out: {e}"))),
            Outcome::Bad(e) => (&st.bad, Some(format!("bad: {e}"))),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(what) = what {
            let mut f = self.failures.lock().unwrap();
            if f.len() < 30 {
                f.push(format!(
                    "t={:.3?} serving gen {} {kind:?} worker {worker}: {what}",
                    self.started.elapsed(),
                    self.serving.load(Ordering::Relaxed)
                ));
            }
        }
    }

    fn answered(&self) -> u64 {
        self.stats.iter().map(KindStats::answered).sum()
    }

    fn failed(&self) -> u64 {
        self.stats.iter().map(KindStats::failed).sum()
    }

    /// Parks the calling worker while the load is paused; true if it did
    /// (the caller has closed its connection first).
    async fn park_while_paused(&self) -> bool {
        if !self.paused.load(Ordering::Relaxed) {
            return false;
        }
        self.parked.fetch_add(1, Ordering::Relaxed);
        while self.paused.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.parked.fetch_sub(1, Ordering::Relaxed);
        true
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

fn between(rng: &mut Rng, (lo, hi): (u64, u64)) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

/// The soak's chain; certificate for a.test.
fn soak_config(sb: &Sandbox) -> std::path::PathBuf {
    let a = make_cert(&sb.dir, "a.test", &["a.test"]);
    let app0 = sb.dir.join("app0.sock");
    let tapp = sb.dir.join("tapp.sock");
    let secs = |d: Duration| format!("{}ms", d.as_millis());
    let config = format!(
        r#"[global]
name = "{name}"
bpffs = "{bpffs}"
steering = "ebpf"
hard_stop_after = "{hard}"
handover_grace = "{grace}"

[[listener]]
name = "web"
bind = ["{WEB_ADDR}"]
mode = "http"
backend = "app0"
client_timeout = "{client}"
http_request_timeout = "5s"
max_header_size = 16384
[listener.tls]
certs = ["{cert}"]
alpn = ["http/1.1"]
handshake_timeout = "5s"
[listener.compression]
algo = "gzip"
level = 1
min_size = 256
types = ["text/html", "text/plain"]

[[listener]]
name = "app"
bind = ["unix:{app0}"]
mode = "http"
accept_proxy = true
backend = "servers"
client_timeout = "{client}"
http_request_timeout = "5s"

[[listener]]
name = "stream"
bind = ["{STREAM_ADDR}"]
mode = "tcp"
backend = "tapp"
tunnel_timeout = "5s"
[listener.tls]
certs = ["{cert}"]
handshake_timeout = "5s"

[[listener]]
name = "tapp"
bind = ["unix:{tapp}"]
mode = "tcp"
accept_proxy = true
backend = "echo"
tunnel_timeout = "5s"

[[backend]]
name = "app0"
servers = ["unix:{app0}"]
send_proxy_v2 = true
connect_timeout = "2s"
server_timeout = "5s"

[[backend]]
name = "servers"
servers = ["{BACKEND_ADDR}"]
connect_timeout = "2s"
server_timeout = "{server}"

[[backend]]
name = "tapp"
servers = ["unix:{tapp}"]
send_proxy_v2 = true
connect_timeout = "2s"

[[backend]]
name = "echo"
servers = ["{ECHO_ADDR}"]
connect_timeout = "2s"
"#,
        name = sb.name,
        bpffs = sb.bpffs.display(),
        hard = secs(HARD_STOP_AFTER),
        grace = secs(HANDOVER_GRACE),
        client = secs(CLIENT_TIMEOUT),
        server = secs(SERVER_TIMEOUT),
        cert = a.bundle.display(),
        app0 = app0.display(),
        tapp = tapp.display(),
    );
    sb.write_file("soak.toml", &config)
}

/// An echo server on [`ECHO_ADDR`] (ends with the runtime).
fn start_echo(rt: &tokio::runtime::Runtime) {
    let listener = rt
        .block_on(TcpListener::bind(ECHO_ADDR))
        .expect("binding the echo server");
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// Hangs the backend now and then, until the load stops; never while the
/// load is paused.
async fn hang_now_and_then(backend: Arc<HttpBackend>, soak: Arc<Soak>) {
    let mut rng = Rng::new(0x4a46);
    while soak.running() {
        tokio::time::sleep(Duration::from_millis(between(&mut rng, HANG_EVERY_MS))).await;
        if soak.paused.load(Ordering::Relaxed) || !soak.running() {
            continue;
        }
        backend.set_hung(true);
        soak.hangs.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + Duration::from_millis(between(&mut rng, HANG_FOR_MS));
        while Instant::now() < until && !soak.paused.load(Ordering::Relaxed) && soak.running() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        backend.set_hung(false);
    }
    backend.set_hung(false);
}

type Sender = hyper::client::conn::http1::SendRequest<TestBody>;

/// A new HTTPS connection to `web`; the slow readers' with a small receive
/// buffer.
async fn connect_web(tls: &Arc<ClientConfig>, small_rcvbuf: bool) -> Result<Sender, Outcome> {
    let work = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if small_rcvbuf {
            socket
                .set_recv_buffer_size(SLOW_RCVBUF)
                .map_err(|e| format!("SO_RCVBUF: {e}"))?;
        }
        let tcp = socket
            .connect(WEB_ADDR.parse().expect("an address"))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let tls = tls_handshake(tcp, "a.test", tls.clone())
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        http_handshake(tls)
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))
    };
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Outcome::Lost(e)),
        Err(_) => Err(Outcome::TimedOut(format!(
            "connecting to web: {DEADLINE:?}"
        ))),
    }
}

/// Checks an answered response: 200 with `want` (gunzipped when it came
/// gzip, which `gzip_expected` says it must), or 504. Also checks that the
/// backend saw the real client through both http stages.
fn check_response(
    parts: &hyper::http::response::Parts,
    got: Vec<u8>,
    want: &[u8],
    gzip_expected: bool,
    what: &str,
) -> (Outcome, usize) {
    match parts.status.as_u16() {
        504 => return (Outcome::GatewayTimeout, 0),
        200 => {}
        other => return (Outcome::Bad(format!("{what}: status {other}")), 0),
    }
    let encoding = header_str(parts, "content-encoding");
    let body = match (encoding.as_deref(), gzip_expected) {
        (Some("gzip"), true) => match try_gunzip(&got, 2 * BIG as u64) {
            Ok(b) => b,
            Err(e) => return (Outcome::Bad(format!("{what}: gzip stream: {e}")), 0),
        },
        (None, false) => got,
        (other, _) => {
            return (
                Outcome::Bad(format!(
                    "{what}: Content-Encoding {other:?}, gzip expected: {gzip_expected}"
                )),
                0,
            );
        }
    };
    if body != want {
        return (
            Outcome::Bad(format!(
                "{what}: body differs: {}",
                first_difference(&body, want)
            )),
            0,
        );
    }
    let xff = header_str(parts, "x-seen-xff").unwrap_or_default();
    if xff.is_empty() || !xff.split(", ").all(|ip| ip == "127.0.0.1") {
        return (
            Outcome::Bad(format!("{what}: backend saw X-Forwarded-For {xff:?}")),
            0,
        );
    }
    (Outcome::Ok, body.len())
}

fn says_close(parts: &hyper::http::response::Parts) -> bool {
    header_str(parts, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"))
}

/// One GET, read whole; for [`Kind::Short`] and [`Kind::Big`]. Returns the
/// outcome, the bytes and whether the connection is done.
async fn get_whole(
    sender: &mut Sender,
    kind: Kind,
    rng: &mut Rng,
    n: u64,
) -> (Outcome, usize, bool) {
    let seed = rng.next_u64() % 1_000_000;
    let (len, gzip) = match kind {
        Kind::Big => (BIG, true),
        _ => (
            (rng.next_u64() % 8192) as usize,
            rng.next_u64().is_multiple_of(2),
        ),
    };
    let headers: &[(&str, &str)] = if gzip {
        &[("accept-encoding", "gzip")]
    } else {
        &[]
    };
    let uri = format!("/r?len={len}&seed={seed}&ct=text/plain");
    let req = request("GET", &uri, "a.test", headers);
    let what = format!("request {n} GET {uri}");
    match tokio::time::timeout(DEADLINE, fetch(sender, req)).await {
        Err(_) => (
            Outcome::TimedOut(format!("{what}: no answer in {DEADLINE:?}")),
            0,
            true,
        ),
        Ok(Err(e)) => (Outcome::Lost(format!("{what}: {e}")), 0, true),
        Ok(Ok((parts, got))) => {
            let want = text_body(len, seed);
            let (outcome, bytes) = check_response(&parts, got, &want, gzip && len >= 256, &what);
            (outcome, bytes, says_close(&parts))
        }
    }
}

/// One GET of 1 MiB of binary read at [`SLOW_RATE`].
async fn get_slowly(sender: &mut Sender, rng: &mut Rng, n: u64) -> (Outcome, usize, bool) {
    let seed = rng.next_u64() % 1_000_000;
    let uri = format!("/r?len={BIG}&seed={seed}&body=bin&ct=application/octet-stream");
    let what = format!("slow request {n} GET {uri}");
    let req = request("GET", &uri, "a.test", &[("accept-encoding", "gzip")]);
    let work = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let (parts, mut body) = resp.into_parts();
        let mut got = Vec::with_capacity(BIG);
        let mut unpaced = 0usize;
        while !body.is_end_stream() {
            let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
            match frame.await {
                None => break,
                Some(Err(e)) => {
                    return Err(format!(
                        "reading the body (status {}, {} bytes in): {e}",
                        parts.status,
                        got.len()
                    ));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        got.extend_from_slice(&data);
                        unpaced += data.len();
                    }
                }
            }
            if unpaced >= 32 * 1024 {
                tokio::time::sleep(Duration::from_secs_f64(unpaced as f64 / SLOW_RATE)).await;
                unpaced = 0;
            }
        }
        Ok((parts, got))
    };
    match tokio::time::timeout(SLOW_DEADLINE, work).await {
        Err(_) => (
            Outcome::TimedOut(format!("{what}: not read in {SLOW_DEADLINE:?}")),
            0,
            true,
        ),
        Ok(Err(e)) => (Outcome::Lost(format!("{what}: {e}")), 0, true),
        Ok(Ok((parts, got))) => {
            let want = binary_body(BIG, seed);
            let (outcome, bytes) = check_response(&parts, got, &want, false, &what);
            (outcome, bytes, says_close(&parts))
        }
    }
}

/// An HTTP worker: keep-alive connections of up to 100 requests.
async fn http_worker(
    kind: Kind,
    worker: usize,
    tls: Arc<ClientConfig>,
    soak: Arc<Soak>,
    pause: Duration,
) {
    let mut rng = Rng::new(worker as u64 * 7919 + kind as u64 * 104_729 + 1);
    let mut n = 0u64;
    let mut conn: Option<(Sender, u32)> = None;
    while soak.running() {
        if soak.paused.load(Ordering::Relaxed) {
            conn = None;
            soak.park_while_paused().await;
            continue;
        }
        let began = soak.serving.load(Ordering::Relaxed);
        let (mut sender, used) = match conn.take() {
            Some(c) => c,
            None => match connect_web(&tls, kind == Kind::Slow).await {
                Ok(s) => {
                    soak.kind(kind).connections.fetch_add(1, Ordering::Relaxed);
                    (s, 0)
                }
                Err(outcome) => {
                    soak.record(kind, worker, began, outcome, 0);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        n += 1;
        let (outcome, bytes, close) = match kind {
            Kind::Slow => get_slowly(&mut sender, &mut rng, n).await,
            _ => get_whole(&mut sender, kind, &mut rng, n).await,
        };
        let failed = !matches!(outcome, Outcome::Ok | Outcome::GatewayTimeout);
        if close && !failed {
            soak.closed_by_server.fetch_add(1, Ordering::Relaxed);
        }
        soak.record(kind, worker, began, outcome, bytes);
        if !close && used + 1 < 100 {
            conn = Some((sender, used + 1));
        }
        tokio::time::sleep(pause).await;
    }
}

/// One TLS tcp stream: messages echoed every [`STREAM_PAUSE`] until its
/// lifetime is over, then a clean close.
async fn one_stream(
    tls: &Arc<ClientConfig>,
    rng: &mut Rng,
    soak: &Soak,
    n: u64,
) -> (Outcome, usize) {
    let life = Duration::from_millis(between(rng, STREAM_LIFE_MS));
    let connected = tokio::time::timeout(DEADLINE, tls_connect(STREAM_ADDR, "a.test", tls.clone()));
    let mut stream = match connected.await {
        Err(_) => return (Outcome::TimedOut(format!("stream {n}: connect")), 0),
        Ok(Err(e)) => return (Outcome::Lost(format!("stream {n}: connect: {e}")), 0),
        Ok(Ok(s)) => s,
    };
    soak.kind(Kind::Stream)
        .connections
        .fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut exchange = 0u64;
    while start.elapsed() < life {
        let len = 1 + (rng.next_u64() % 8192) as usize;
        let msg = rng.bytes(len);
        let mut got = vec![0u8; len];
        let work = async {
            stream.write_all(&msg).await?;
            stream.flush().await?;
            stream.read_exact(&mut got).await
        };
        let at = start.elapsed();
        match tokio::time::timeout(DEADLINE, work).await {
            Err(_) => {
                return (
                    Outcome::TimedOut(format!("stream {n} exchange {exchange} at {at:.2?}")),
                    0,
                );
            }
            Ok(Err(e)) => {
                return (
                    Outcome::Lost(format!(
                        "stream {n} ({life:?}) exchange {exchange} at {at:.2?}: {e}"
                    )),
                    0,
                );
            }
            Ok(Ok(_)) => {}
        }
        if got != msg {
            return (
                Outcome::Bad(format!(
                    "stream {n} exchange {exchange}: echo differs: {}",
                    first_difference(&got, &msg)
                )),
                0,
            );
        }
        bytes += len;
        exchange += 1;
        soak.exchanges.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(STREAM_PAUSE).await;
    }
    // A clean close: close_notify and our FIN, then the echo's end. How the
    // far side ends (EOF, or no close_notify) does not count.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 256];
        while matches!(stream.read(&mut buf).await, Ok(k) if k > 0) {}
    })
    .await;
    (Outcome::Ok, bytes)
}

async fn stream_worker(worker: usize, tls: Arc<ClientConfig>, soak: Arc<Soak>) {
    let mut rng = Rng::new(worker as u64 * 31 + 0x5743);
    let mut n = 0u64;
    while soak.running() {
        if soak.park_while_paused().await {
            continue;
        }
        n += 1;
        let began = soak.serving.load(Ordering::Relaxed);
        let (outcome, bytes) = one_stream(&tls, &mut rng, &soak, n).await;
        soak.record(Kind::Stream, worker, began, outcome, bytes);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// FD count and RSS of a quiesced generation.
#[derive(Clone, Copy, Debug)]
struct Footprint {
    generation: u64,
    fds: usize,
    rss_kib: u64,
}

/// Pauses the load, waits until `proxy` holds no connection and its FD count
/// is stable, reads its footprint, and resumes the load.
fn quiesced_footprint(sb: &Sandbox, soak: &Soak, proxy: &Proxy, workers: usize) -> Footprint {
    soak.paused.store(true, Ordering::Relaxed);
    wait_until(
        Duration::from_secs(20),
        || soak.parked.load(Ordering::Relaxed) == workers,
        || {
            format!(
                "all {workers} workers to park, {} parked",
                soak.parked.load(Ordering::Relaxed)
            )
        },
    );
    let g = proxy.generation();
    sb.wait_status(
        &format!("generation {g} to hold no connection"),
        Duration::from_secs(10),
        |st| st.generation(g).is_some_and(|r| r.active_conns == 0),
    );
    let mut last = (usize::MAX, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let fds = loop {
        let now = fd_count(proxy.pid).expect("the running generation's /proc/PID/fd");
        last = if now == last.0 {
            (now, last.1 + 1)
        } else {
            (now, 0)
        };
        if last.1 >= 5 || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rss_kib = rss_kib(proxy.pid).expect("the running generation's VmRSS");
    soak.paused.store(false, Ordering::Relaxed);
    Footprint {
        generation: g,
        fds,
        rss_kib,
    }
}

/// One handover's figures.
#[derive(Debug)]
struct Handover {
    generation: u64,
    spawn_to_active: Duration,
    active_to_old_exit: Duration,
    old_final: String,
    /// The old generation's FD count and RSS just before the handover, under
    /// load.
    old_fds: usize,
    old_rss_kib: u64,
}

/// Starts the next generation, waits until it is active and `current` has
/// exited (by its deadline, else it is recorded as overstaying and killed).
fn handover(
    sb: &Sandbox,
    cfg: &std::path::Path,
    current: &mut Proxy,
    soak: &Soak,
    overstays: &mut Vec<String>,
) -> (Proxy, Handover) {
    let old_fds = fd_count(current.pid).unwrap_or(0);
    let old_rss_kib = rss_kib(current.pid).unwrap_or(0);
    let spawned = Instant::now();
    let mut next = Proxy::start(sb, cfg, &[]);
    let id = next.wait_active(sb, Duration::from_secs(10));
    let active = Instant::now();
    soak.serving.store(id.generation, Ordering::Relaxed);
    let deadline = FLIP_POLL + HANDOVER_GRACE + HARD_STOP_AFTER + EXIT_MARGIN;
    let exit = match current.wait_exit(deadline) {
        Some(exit) => exit,
        None => {
            let log = current.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            overstays.push(format!(
                "generation {} still running {deadline:?} after generation {} became active; log tail:\n{}",
                current.generation(),
                id.generation,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            current.kill()
        }
    };
    let active_to_old_exit = active.elapsed();
    assert!(
        exit.success() || !overstays.is_empty(),
        "generation {} exited with {exit}; log tail: {}",
        current.generation(),
        current
            .log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let h = Handover {
        generation: id.generation,
        spawn_to_active: active - spawned,
        active_to_old_exit,
        old_final: current.final_line().unwrap_or_default(),
        old_fds,
        old_rss_kib,
    };
    (next, h)
}

/// Waits until the load made `n` more answers (or failed), at least `min`.
fn serve(soak: &Soak, min: Duration, n: u64) {
    let start = Instant::now();
    let from = soak.answered();
    let failed = soak.failed();
    wait_until(
        Duration::from_secs(20),
        || start.elapsed() >= min && (soak.answered() >= from + n || soak.failed() > failed),
        || format!("{n} answers, {} so far", soak.answered() - from),
    );
}

/// The `p` quantile of `sorted`, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> u128 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_millis()
}

fn relative(a: f64, b: f64) -> f64 {
    (b - a) / a
}

#[test]
#[ignore = "soak: cargo xtask soak"]
fn soak_chain_handovers_under_mixed_load() {
    let handovers: usize = std::env::var("SOAK_HANDOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HANDOVERS);
    let run_start = Instant::now();
    let (sb, rt) = Sandbox::with_runtime("soak");
    let backend = Arc::new(HttpBackend::start(&rt));
    start_echo(&rt);
    let cfg = soak_config(&sb);

    let mut current = Proxy::start(&sb, &cfg, &[]);
    let first = current.wait_active(&sb, Duration::from_secs(10));

    let soak = Arc::new(Soak {
        stats: Default::default(),
        exchanges: AtomicU64::new(0),
        closed_by_server: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        started: Instant::now(),
        serving: AtomicU64::new(first.generation),
        paused: AtomicBool::new(false),
        parked: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        hangs: AtomicU64::new(0),
    });
    let tls = tls_client_config(&["http/1.1"], true);
    let mut tasks = Vec::new();
    let mut workers = 0;
    for kind in KINDS {
        for i in 0..workers_of(kind) {
            let (tls, soak) = (tls.clone(), soak.clone());
            tasks.push(match kind {
                Kind::Short => rt.spawn(http_worker(kind, i, tls, soak, Duration::from_millis(5))),
                Kind::Big => rt.spawn(http_worker(kind, i, tls, soak, Duration::from_millis(50))),
                Kind::Slow => rt.spawn(http_worker(kind, i, tls, soak, Duration::from_millis(50))),
                Kind::Stream => rt.spawn(stream_worker(i, tls, soak)),
            });
            workers += 1;
        }
    }
    let hanger = rt.spawn(hang_now_and_then(backend.clone(), soak.clone()));

    // Warm-up: every kind answered on generation 1, then one handover; the
    // generation it started serves SERVE_FOR, quiesced, is the baseline.
    wait_until(
        Duration::from_secs(30),
        || KINDS.iter().all(|k| soak.kind(*k).answered() >= 5) || soak.failed() > 0,
        || "5 answers of every kind on generation 1".to_string(),
    );
    let mut overstays = Vec::new();
    let (next, warm) = handover(&sb, &cfg, &mut current, &soak, &mut overstays);
    current = next;
    serve(&soak, SETTLE + SERVE_FOR, 50);
    let baseline = quiesced_footprint(&sb, &soak, &current, workers);
    report(&sb, &format!("soak: warm-up handover: {warm:?}"));
    report(&sb, &format!("soak: baseline after warm-up: {baseline:?}"));

    let sequence_start = Instant::now();
    let mut done = Vec::new();
    for i in 0..handovers {
        assert!(
            run_start.elapsed() < RUN_LIMIT,
            "the soak ran past {RUN_LIMIT:?} after {i} handovers"
        );
        let (next, h) = handover(&sb, &cfg, &mut current, &soak, &mut overstays);
        current = next;
        done.push(h);
        let last = i + 1 == handovers;
        serve(&soak, if last { SETTLE + SERVE_FOR } else { SETTLE }, 20);
        if (i + 1) % 10 == 0 {
            eprintln!(
                "soak: {} handovers in {:.1?}, {} answered, {} failed",
                i + 1,
                sequence_start.elapsed(),
                soak.answered(),
                soak.failed()
            );
        }
    }
    let sequence_time = sequence_start.elapsed();
    let end = quiesced_footprint(&sb, &soak, &current, workers);

    soak.stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a load worker did not finish within 30 s")
                .expect("a load worker panicked");
        }
        tokio::time::timeout(Duration::from_secs(10), hanger)
            .await
            .expect("the hang task did not finish")
            .expect("the hang task panicked");
    });
    current.signal(Signal::Usr1);
    let last_exit = current.expect_exit(HARD_STOP_AFTER + Duration::from_secs(5));
    let run_time = run_start.elapsed();

    // Figures.
    for kind in KINDS {
        let st = soak.kind(kind);
        report(
            &sb,
            &format!(
                "soak: {kind:?}: {} ok, {} answered 504, {} lost, {} timed out, {} bad; {} in flight across a handover; {:.1} MiB received; {} connections",
                st.ok.load(Ordering::Relaxed),
                st.gateway_timeout.load(Ordering::Relaxed),
                st.lost.load(Ordering::Relaxed),
                st.timed_out.load(Ordering::Relaxed),
                st.bad.load(Ordering::Relaxed),
                st.across.load(Ordering::Relaxed),
                st.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
                st.connections.load(Ordering::Relaxed),
            ),
        );
    }
    let gw: u64 = soak
        .stats
        .iter()
        .map(|s| s.gateway_timeout.load(Ordering::Relaxed))
        .sum();
    let lost: u64 = soak
        .stats
        .iter()
        .map(|s| s.lost.load(Ordering::Relaxed))
        .sum();
    report(
        &sb,
        &format!(
            "soak: {handovers} handovers (+1 warm-up) in {sequence_time:.1?}, run {run_time:.1?}; {} units answered ({gw} of them 504), {lost} lost, {} failed in all; {} stream exchanges; {} keep-alive connections closed by a draining generation; backend: {} requests, {} held in {} hang windows",
            soak.answered(),
            soak.failed(),
            soak.exchanges.load(Ordering::Relaxed),
            soak.closed_by_server.load(Ordering::Relaxed),
            backend.requests(),
            backend.stats.held.load(Ordering::Relaxed),
            soak.hangs.load(Ordering::Relaxed),
        ),
    );
    let mut to_active: Vec<Duration> = done.iter().map(|h| h.spawn_to_active).collect();
    let mut to_exit: Vec<Duration> = done.iter().map(|h| h.active_to_old_exit).collect();
    to_active.sort();
    to_exit.sort();
    if !done.is_empty() {
        report(
            &sb,
            &format!(
                "soak: spawn->active median {} p95 {} max {} ms; active->old exit median {} p95 {} max {} ms (deadline {} ms)",
                percentile_ms(&to_active, 0.5),
                percentile_ms(&to_active, 0.95),
                percentile_ms(&to_active, 1.0),
                percentile_ms(&to_exit, 0.5),
                percentile_ms(&to_exit, 0.95),
                percentile_ms(&to_exit, 1.0),
                (FLIP_POLL + HANDOVER_GRACE + HARD_STOP_AFTER).as_millis(),
            ),
        );
        let fds: Vec<usize> = done.iter().map(|h| h.old_fds).collect();
        let rss: Vec<u64> = done.iter().map(|h| h.old_rss_kib).collect();
        report(
            &sb,
            &format!(
                "soak: under load, before each handover: FDs min {} max {}, RSS min {} max {} KiB; first 10 mean FDs {:.0} RSS {:.0} KiB, last 10 mean FDs {:.0} RSS {:.0} KiB",
                fds.iter().min().unwrap(),
                fds.iter().max().unwrap(),
                rss.iter().min().unwrap(),
                rss.iter().max().unwrap(),
                fds.iter().take(10).sum::<usize>() as f64 / fds.len().min(10) as f64,
                rss.iter().take(10).sum::<u64>() as f64 / rss.len().min(10) as f64,
                fds.iter().rev().take(10).sum::<usize>() as f64 / fds.len().min(10) as f64,
                rss.iter().rev().take(10).sum::<u64>() as f64 / rss.len().min(10) as f64,
            ),
        );
    }
    let fd_change = relative(baseline.fds as f64, end.fds as f64);
    let rss_change = relative(baseline.rss_kib as f64, end.rss_kib as f64);
    report(
        &sb,
        &format!(
            "soak: quiesced footprint: generation {} after warm-up {} FDs, {} KiB RSS; generation {} at the end {} FDs ({:+.1}%), {} KiB RSS ({:+.1}%)",
            baseline.generation,
            baseline.fds,
            baseline.rss_kib,
            end.generation,
            end.fds,
            fd_change * 100.0,
            end.rss_kib,
            rss_change * 100.0,
        ),
    );
    let slowest: Vec<String> = {
        let mut by_exit: Vec<&Handover> = done.iter().collect();
        by_exit.sort_by_key(|h| std::cmp::Reverse(h.active_to_old_exit));
        by_exit
            .iter()
            .take(3)
            .map(|h| {
                format!(
                    "gen {}: active->old exit {} ms; old: {}",
                    h.generation,
                    h.active_to_old_exit.as_millis(),
                    h.old_final
                )
            })
            .collect()
    };
    for line in &slowest {
        report(&sb, &format!("soak: slowest: {line}"));
    }

    // Verdicts.
    let failures = soak.failures.lock().unwrap().clone();
    assert!(
        overstays.is_empty(),
        "{} old generations overstayed their deadline; first: {}",
        overstays.len(),
        overstays[0]
    );
    assert!(
        soak.failed() == 0,
        "expected 0 lost, timed out or bad units, got {lost} lost and {} failed in all; first failures:\n{}",
        soak.failed(),
        failures.join("\n")
    );
    for h in done.iter().chain(std::iter::once(&warm)) {
        assert!(
            h.old_final.contains("all connections drained")
                && proxy_harness::proxy::field(&h.old_final, "cut") == Some(0),
            "the generation before {} must drain every (bounded) connection, not cut: {:?}",
            h.generation,
            h.old_final
        );
    }
    assert!(
        last_exit.success(),
        "the last generation exited with {last_exit}"
    );
    for kind in KINDS {
        assert!(
            soak.kind(kind).ok.load(Ordering::Relaxed) >= handovers as u64 / 2,
            "every kind must have made progress: {kind:?} made {}",
            soak.kind(kind).ok.load(Ordering::Relaxed)
        );
    }
    let streams_across = soak.kind(Kind::Stream).across.load(Ordering::Relaxed);
    assert!(
        streams_across >= handovers as u64 / 2,
        "tcp streams must carry on across handovers: {streams_across} of them were open while a new generation became active, over {handovers} handovers"
    );
    assert!(
        gw > 0 && backend.stats.held.load(Ordering::Relaxed) > 0,
        "the hanging backend must have been exercised: {gw} 504s, {} held requests",
        backend.stats.held.load(Ordering::Relaxed)
    );
    assert!(
        fd_change.abs() <= TOLERANCE,
        "FD count of the running generation: {} after warm-up (generation {}), {} at the end (generation {}): {:+.1}%, more than {:.0}%",
        baseline.fds,
        baseline.generation,
        end.fds,
        end.generation,
        fd_change * 100.0,
        TOLERANCE * 100.0
    );
    assert!(
        rss_change.abs() <= TOLERANCE,
        "RSS of the running generation: {} KiB after warm-up (generation {}), {} KiB at the end (generation {}): {:+.1}%, more than {:.0}%",
        baseline.rss_kib,
        baseline.generation,
        end.rss_kib,
        end.generation,
        rss_change * 100.0,
        TOLERANCE * 100.0
    );
}
