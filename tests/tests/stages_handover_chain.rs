//! The whole offload chain (comp: http + gzip, tls: TLS termination in tcp
//! mode, both handing over to the app stage over UNIX sockets with PROXY v2,
//! app: http to the backend) survives ten handovers under a bounded HTTP load
//! through both entry points, keep-alive and new connections mixed, without
//! one failed request. Every old generation must drain (not be cut at
//! hard_stop_after).
//!
//! Keep-alive clients here use a connection for at most one second. Two more
//! tests follow one keep-alive TLS connection across a handover: chained to
//! the old generation's app stage (passes), and chained, through the old
//! generation's tcp-mode tls stage, to the new generation's app stage, which
//! is told to close by the new app stage (the PROXY header names the older
//! generation).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox, Signal,
    bodies::{Rng, binary_body, first_difference, gunzip, text_body},
    certs::make_cert,
    config::{ConfigToml, GZIP_TYPES, Table, unix_app},
    http::{TestBody, echo_request, fetch, header_str, http_connect, http_handshake, request},
    http_backend::HttpBackend,
    report,
    tls::{tls_client_config, tls_connect, tls_handshake},
    wait_until,
};
use rustls::ClientConfig;

const COMP_ADDR: &str = "127.0.0.1:8080";
const TLS_ADDR: &str = "127.0.0.1:8443";
/// Handovers (generation N+1 started, active, generation N exited).
const HANDOVERS: usize = 10;
/// How long a keep-alive client uses one connection before closing it
/// itself: longer than handover_grace (200 ms), so that draining
/// generations must tell their keep-alive clients to go (`Connection:
/// close`), yet bounded (a tcp-mode stage cannot pass that on, see below).
const KEEPALIVE_FOR: Duration = Duration::from_secs(1);
/// Pause of each worker between two requests (bounds the load).
const PAUSE: Duration = Duration::from_millis(2);
const REQ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the whole handover sequence.
const SEQUENCE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Comp,
    Tls,
}

#[derive(Clone, Copy, Debug)]
struct WorkerKind {
    entry: Entry,
    keep_alive: bool,
}

/// Counters of the load, per kind: [comp ka, comp new, tls ka, tls new].
#[derive(Default)]
struct LoadStats {
    ok: [AtomicU64; 4],
    failed: AtomicU64,
    connections: AtomicU64,
    /// Keep-alive connections the server ended with `Connection: close`.
    closed_by_server: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl LoadStats {
    fn ok_total(&self) -> u64 {
        self.ok.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

fn kind_index(k: WorkerKind) -> usize {
    match (k.entry, k.keep_alive) {
        (Entry::Comp, true) => 0,
        (Entry::Comp, false) => 1,
        (Entry::Tls, true) => 2,
        (Entry::Tls, false) => 3,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<TestBody>;

async fn connect(entry: Entry, tls: &Arc<ClientConfig>) -> Result<Sender, String> {
    let work = async {
        match entry {
            Entry::Comp => http_connect(COMP_ADDR)
                .await
                .map_err(|e| format!("connect comp: {e}")),
            Entry::Tls => {
                let s = tls_connect(TLS_ADDR, "a.test", tls.clone())
                    .await
                    .map_err(|e| format!("TLS connect: {e}"))?;
                http_handshake(s)
                    .await
                    .map_err(|e| format!("HTTP over TLS: {e}"))
            }
        }
    };
    tokio::time::timeout(REQ_TIMEOUT, work)
        .await
        .map_err(|_| format!("{entry:?}: connect timed out"))?
}

/// One request of the worker's sequence, checked byte for byte. Returns
/// whether the server asked to close the connection.
async fn one_request(
    sender: &mut Sender,
    entry: Entry,
    rng: &mut Rng,
    n: u64,
) -> Result<bool, String> {
    let choice = rng.next_u64() % 10;
    let size = if rng.next_u64().is_multiple_of(50) {
        200_000 + (rng.next_u64() % 50_000) as usize
    } else {
        (rng.next_u64() % 20_000) as usize
    };
    let seed = rng.next_u64() % 1_000_000;
    let (req, want, gzip_ok) = match choice {
        0..=4 => (
            request(
                "GET",
                &format!("/r?len={size}&seed={seed}&ct=text/html"),
                "a.test",
                &[("accept-encoding", "gzip")],
            ),
            text_body(size, seed),
            true,
        ),
        5..=7 => (
            request(
                "GET",
                &format!("/r?len={size}&seed={seed}&body=bin&ct=application/octet-stream"),
                "a.test",
                &[],
            ),
            binary_body(size, seed),
            false,
        ),
        _ => {
            let body = binary_body(size, seed ^ 0xec40);
            (echo_request("a.test", body.clone()), body, false)
        }
    };
    let (parts, got) = tokio::time::timeout(REQ_TIMEOUT, fetch(sender, req))
        .await
        .map_err(|_| format!("request {n}: timed out after {REQ_TIMEOUT:?}"))??;
    if parts.status != 200 {
        return Err(format!("request {n}: status {}", parts.status));
    }
    let encoding = header_str(&parts, "content-encoding");
    let body = match encoding.as_deref() {
        Some("gzip") if gzip_ok && entry == Entry::Comp => gunzip(&got, "load response"),
        None => got,
        other => {
            return Err(format!(
                "request {n}: unexpected Content-Encoding {other:?}"
            ));
        }
    };
    if body != want {
        return Err(format!(
            "request {n} ({size} bytes, kind {choice}): body differs: {}",
            first_difference(&body, &want)
        ));
    }
    let xff = header_str(&parts, "x-seen-xff").unwrap_or_default();
    let xff_ok = match entry {
        Entry::Tls => xff == "127.0.0.1",
        Entry::Comp => !xff.is_empty() && xff.split(", ").all(|ip| ip == "127.0.0.1"),
    };
    if !xff_ok {
        return Err(format!("request {n}: backend saw X-Forwarded-For {xff:?}"));
    }
    Ok(header_str(&parts, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")))
}

async fn worker(
    id: u64,
    kind: WorkerKind,
    tls: Arc<ClientConfig>,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) {
    let mut rng = Rng::new(id * 7919 + 1);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut sender = match connect(kind.entry, &tls).await {
            Ok(s) => s,
            Err(e) => {
                stats.fail(format!("worker {id} {kind:?}: {e}"));
                tokio::time::sleep(PAUSE).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        let mut on_conn = 0u64;
        loop {
            let more = if kind.keep_alive {
                opened.elapsed() < KEEPALIVE_FOR
            } else {
                on_conn == 0
            };
            if !more || stop.load(Ordering::Relaxed) {
                break;
            }
            on_conn += 1;
            n += 1;
            match one_request(&mut sender, kind.entry, &mut rng, n).await {
                Ok(close) => {
                    stats.ok[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
                    if close {
                        stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                Err(e) => {
                    stats.fail(format!("worker {id} {kind:?}: {e}"));
                    break;
                }
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
}

/// Timings of one handover.
#[derive(Debug)]
struct Timing {
    generation: u64,
    spawn_to_active: Duration,
    spawn_to_old_exit: Duration,
    /// Requests that succeeded from spawn to the old generation's exit.
    requests_during: u64,
}

/// comp (http, gzip) -> app0.sock and tls (tcp) -> app1.sock, app (http,
/// accept_proxy) on both -> the HTTP backend; certificate for a.test.
fn chain_config(sb: &Sandbox, hard_stop_after: &str) -> std::path::PathBuf {
    let a = make_cert(&sb.dir, "a.test", &["a.test"]);
    let config = ConfigToml::stages(sb, hard_stop_after)
        .table(Table::http("comp", COMP_ADDR, "app0").with(Table::gzip(256, GZIP_TYPES)))
        .table(Table::tcp("tls", TLS_ADDR, "app1").with(Table::tls_http1(&[&a.bundle])))
        .tables(unix_app(sb, "http"))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render();
    sb.write_file("chain.toml", &config)
}

#[test]
fn chain_survives_handovers_under_load() {
    let (sb, rt) = Sandbox::with_runtime("st-hand");
    let backend = HttpBackend::start(&rt);
    let cfg = chain_config(&sb, "10s");

    let mut current = Proxy::start(&sb, &cfg, &[]);
    current.wait_active(&sb, Duration::from_secs(10));

    let tls = tls_client_config(&["http/1.1"], true);
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load_deadline = Instant::now() + SEQUENCE_LIMIT + Duration::from_secs(10);
    let kinds = [
        WorkerKind {
            entry: Entry::Comp,
            keep_alive: true,
        },
        WorkerKind {
            entry: Entry::Comp,
            keep_alive: true,
        },
        WorkerKind {
            entry: Entry::Comp,
            keep_alive: false,
        },
        WorkerKind {
            entry: Entry::Comp,
            keep_alive: false,
        },
        WorkerKind {
            entry: Entry::Tls,
            keep_alive: true,
        },
        WorkerKind {
            entry: Entry::Tls,
            keep_alive: true,
        },
        WorkerKind {
            entry: Entry::Tls,
            keep_alive: false,
        },
        WorkerKind {
            entry: Entry::Tls,
            keep_alive: false,
        },
    ];
    let workers: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            rt.spawn(worker(
                i as u64,
                kind,
                tls.clone(),
                stats.clone(),
                stop.clone(),
                load_deadline,
            ))
        })
        .collect();
    let load_start = Instant::now();
    // Traffic flows through the first generation before the first handover.
    wait_until(
        Duration::from_secs(10),
        || stats.ok_total() >= 200 || stats.failed.load(Ordering::Relaxed) > 0,
        || {
            format!(
                "200 requests before the first handover, ok={}",
                stats.ok_total()
            )
        },
    );

    let sequence_start = Instant::now();
    let mut timings = Vec::new();
    let mut old_finals = Vec::new();
    for _ in 0..HANDOVERS {
        assert!(
            sequence_start.elapsed() < SEQUENCE_LIMIT,
            "the handover sequence took longer than {SEQUENCE_LIMIT:?} after {} handovers",
            timings.len()
        );
        let ok_before = stats.ok_total();
        let spawned = Instant::now();
        let mut next = Proxy::start(&sb, &cfg, &[]);
        let id = next.wait_active(&sb, Duration::from_secs(10));
        let spawn_to_active = spawned.elapsed();
        let exit = current.expect_exit(Duration::from_secs(15));
        let spawn_to_old_exit = spawned.elapsed();
        assert!(
            exit.success(),
            "generation {} exited with {exit}; log:\n{}",
            current.generation(),
            current.log()
        );
        old_finals.push((
            current.generation(),
            current.final_line().unwrap_or_default(),
        ));
        timings.push(Timing {
            generation: id.generation,
            spawn_to_active,
            spawn_to_old_exit,
            requests_during: stats.ok_total() - ok_before,
        });
        current = next;
        // Some traffic through the new generation alone before the next one.
        let ok_now = stats.ok_total();
        wait_until(
            Duration::from_secs(10),
            || stats.ok_total() >= ok_now + 100 || stats.failed.load(Ordering::Relaxed) > 0,
            || format!("100 requests after handover {}", timings.len()),
        );
    }
    let sequence_time = sequence_start.elapsed();

    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in workers {
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("a load worker did not finish within 30 s")
                .expect("a load worker panicked");
        }
    });
    let load_time = load_start.elapsed();
    current.signal(Signal::Usr1);
    let exit = current.expect_exit(Duration::from_secs(15));
    old_finals.push((
        current.generation(),
        current.final_line().unwrap_or_default(),
    ));

    let ok: Vec<u64> = stats.ok.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let ok_total: u64 = ok.iter().sum();
    let failed = stats.failed.load(Ordering::Relaxed);
    report(
        &sb,
        &format!(
            "stages_handover_chain: {HANDOVERS} handovers in {sequence_time:.2?}; {ok_total} requests ok ({:.0}/s) in {load_time:.2?}, {failed} failed; \
             comp keep-alive {} / comp new {} / tls keep-alive {} / tls new {}; {} connections, {} closed by a draining generation; backend saw {} requests",
            ok_total as f64 / load_time.as_secs_f64(),
            ok[0],
            ok[1],
            ok[2],
            ok[3],
            stats.connections.load(Ordering::Relaxed),
            stats.closed_by_server.load(Ordering::Relaxed),
            backend.requests(),
        ),
    );
    for t in &timings {
        report(
            &sb,
            &format!(
                "  gen {:>2}: spawn->active {:>9.2?}  spawn->old exit {:>9.2?}  requests meanwhile {:>5}",
                t.generation, t.spawn_to_active, t.spawn_to_old_exit, t.requests_during
            ),
        );
    }
    for (generation, line) in &old_finals {
        report(&sb, &format!("  gen {generation:>2} final: {line}"));
    }

    assert!(
        failed == 0,
        "expected 0 failed requests over {HANDOVERS} handovers, got {failed} (ok {ok_total}); first failures: {:#?}",
        stats.failures.lock().unwrap()
    );
    assert!(exit.success(), "the last generation exited with {exit}");
    for (i, n) in ok.iter().enumerate() {
        assert!(
            *n >= 50,
            "every kind of client must have made progress; kind {i} (comp ka, comp new, tls ka, tls new) made {n} requests"
        );
    }
    for t in &timings {
        assert!(
            t.requests_during > 0,
            "no request succeeded during the handover to generation {}",
            t.generation
        );
    }
    // Keep-alive connections outlive handover_grace, so draining generations
    // must have sent them away (comp itself, or the app stage behind tls).
    let closed = stats.closed_by_server.load(Ordering::Relaxed);
    assert!(
        closed >= HANDOVERS as u64 / 2,
        "expected draining generations to close keep-alive connections (`Connection: close`) at least {} times over {HANDOVERS} handovers, saw {closed}",
        HANDOVERS / 2
    );
    assert_eq!(
        backend.requests(),
        ok_total,
        "the backend must have seen each successful request exactly once"
    );
    for (generation, line) in &old_finals {
        assert!(
            line.contains("all connections drained"),
            "generation {generation} must drain its connections, not be cut: {line:?}"
        );
        assert_eq!(
            proxy_harness::proxy::field(line, "cut"),
            Some(0),
            "generation {generation}: connections cut: {line}"
        );
    }
}

/// What happened to one keep-alive TLS connection across one handover.
#[derive(Debug)]
struct KeepAliveOutcome {
    requests_ok: u64,
    /// When the server answered `Connection: close`, after the new
    /// generation became active.
    closed_after: Option<Duration>,
    /// The first failed request, and when (after the new generation became
    /// active).
    error: Option<(Duration, String)>,
    /// When the old generation exited, after the new one became active.
    old_exit_after: Duration,
    old_final: String,
}

/// A TCP connection to the tls stage is accepted by generation 1; its TLS
/// handshake (and so the tls stage's upstream connect to app1.sock) happens
/// before generation 2 starts, or after generation 2 is active and has
/// renamed its app1.sock over the path. Then one request every 50 ms on that
/// keep-alive connection until the server says `Connection: close`, a
/// request fails, or 9 s pass.
fn keepalive_across_handover(test: &str, handshake_before: bool) -> KeepAliveOutcome {
    let sb = Sandbox::new(test);
    let rt = sb.runtime();
    let _backend = HttpBackend::start(&rt);
    let cfg = chain_config(&sb, "5s");
    let mut old = Proxy::start(&sb, &cfg, &[]);
    let old_id = old.wait_active(&sb, Duration::from_secs(10));
    let tls = tls_client_config(&["http/1.1"], true);

    let tcp = rt
        .block_on(tokio::net::TcpStream::connect(TLS_ADDR))
        .expect("connecting to the tls stage");
    // Generation 1 has accepted it (it is not queued: it cannot migrate).
    sb.wait_status(
        "generation 1 to hold the TCP connection",
        Duration::from_secs(5),
        |st| {
            st.generation(old_id.generation)
                .is_some_and(|g| g.active_conns >= 1)
        },
    );
    let mut tcp = Some(tcp);
    let mut sender = None;
    let mut n = 0u64;
    let connect = |tcp: tokio::net::TcpStream| {
        let tls = tls.clone();
        async move {
            let s = tls_handshake(tcp, "a.test", tls)
                .await
                .expect("TLS handshake on the held connection");
            http_handshake(s).await.expect("HTTP over TLS")
        }
    };
    if handshake_before {
        let mut s = rt.block_on(connect(tcp.take().expect("the held connection")));
        rt.block_on(one_keepalive_request(&mut s, n))
            .expect("a first request before the handover");
        n += 1;
        sender = Some(s);
    }
    let mut new = Proxy::start(&sb, &cfg, &[]);
    new.wait_active(&sb, Duration::from_secs(10));
    let active_at = Instant::now();
    let mut sender = match (sender, tcp.take()) {
        (Some(s), _) => s,
        (None, Some(tcp)) => rt.block_on(connect(tcp)),
        (None, None) => unreachable!("one of the two is set"),
    };
    let mut outcome = KeepAliveOutcome {
        requests_ok: 0,
        closed_after: None,
        error: None,
        old_exit_after: Duration::ZERO,
        old_final: String::new(),
    };
    rt.block_on(async {
        while active_at.elapsed() < Duration::from_secs(9) {
            match one_keepalive_request(&mut sender, n).await {
                Ok(close) => {
                    outcome.requests_ok += 1;
                    if close {
                        outcome.closed_after = Some(active_at.elapsed());
                        break;
                    }
                }
                Err(e) => {
                    outcome.error = Some((active_at.elapsed(), e));
                    break;
                }
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    old.expect_exit(Duration::from_secs(15));
    outcome.old_exit_after = active_at.elapsed();
    outcome.old_final = old.final_line().unwrap_or_default();
    report(&sb, &format!("{test}: {outcome:?}"));
    outcome
}

/// GET of 100 bytes, checked; Ok(whether the server said Connection: close).
async fn one_keepalive_request(sender: &mut Sender, n: u64) -> Result<bool, String> {
    let (parts, body) = tokio::time::timeout(
        REQ_TIMEOUT,
        fetch(
            sender,
            request("GET", &format!("/r?len=100&seed={n}"), "a.test", &[]),
        ),
    )
    .await
    .map_err(|_| format!("request {n}: timed out"))??;
    if parts.status != 200 || body != text_body(100, n) {
        return Err(format!(
            "request {n}: status {} body {}",
            parts.status,
            first_difference(&body, &text_body(100, n))
        ));
    }
    let xff = header_str(&parts, "x-seen-xff");
    if xff.as_deref() != Some("127.0.0.1") {
        return Err(format!("request {n}: X-Forwarded-For {xff:?}"));
    }
    Ok(header_str(&parts, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")))
}

fn assert_drained_promptly(what: &str, o: &KeepAliveOutcome) {
    assert!(
        o.error.is_none(),
        "{what}: the keep-alive client must never see a failed request, got {:?} ({} requests ok before); old generation: {}",
        o.error,
        o.requests_ok,
        o.old_final
    );
    let closed = o.closed_after.unwrap_or_else(|| {
        panic!(
            "{what}: the draining generation must answer `Connection: close` on this keep-alive connection; {} requests ok without it; old generation: {}",
            o.requests_ok, o.old_final
        )
    });
    assert!(
        closed < Duration::from_secs(2),
        "{what}: expected `Connection: close` within 2 s of the handover, after {closed:?}"
    );
    assert!(
        o.old_final.contains("all connections drained")
            && proxy_harness::proxy::field(&o.old_final, "cut") == Some(0),
        "{what}: the old generation must drain, not cut at hard_stop_after: {}",
        o.old_final
    );
    assert!(
        o.old_exit_after < Duration::from_secs(3),
        "{what}: the old generation must exit soon after its last connection closed, exited {:?} after the handover",
        o.old_exit_after
    );
}

/// A TLS keep-alive connection chained to generation 1's app stage: when
/// generation 1 drains, its app stage answers `Connection: close`, the
/// client goes, generation 1 exits.
#[test]
fn tls_keepalive_through_old_app_is_closed_when_draining() {
    let o = keepalive_across_handover("st-ka-old", true);
    assert_drained_promptly("TLS handshake before the handover", &o);
}

/// The same connection accepted by generation 1's tls stage (tcp mode), but
/// whose TLS handshake finishes after generation 2 renamed app1.sock: the
/// tls stage of generation 1 connects to generation 2's app stage. The
/// PROXY header carries generation 1's number, so generation 2's app stage
/// knows the chain is draining and answers with `Connection: close`; the
/// tcp-mode tls stage of generation 1 then sees the connection end.
#[test]
fn tls_keepalive_spliced_to_new_app_is_closed_when_draining() {
    let o = keepalive_across_handover("st-ka-new", false);
    assert_drained_promptly("TLS handshake after generation 2 renamed app1.sock", &o);
}
