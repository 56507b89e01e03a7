//! Active health checks: a server killed under load goes DOWN within
//! `fall x interval` and gets no connection attempt afterwards, then comes
//! back UP after `rise` successes (tcp check); a server that accepts TCP
//! but answers 500 to the check path goes DOWN and gets no request (http
//! check); and the states outlive a generation: a generation started while
//! a server is DOWN sends it nothing from its first connection, and the
//! draining old generation follows the states the new one writes.
//!
//! The servers are two small HTTP/1.1 servers in the test, each counting
//! the check requests (`/health`) and the traffic requests apart; the load
//! is plain `GET /page` requests, one connection each.

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use proxy_harness::{
    PROXY_ADDR, Proxy, Sandbox,
    config::{ConfigToml, Table, global_toml},
    http::{fetch, http_connect, request},
    http_get::http_get,
    prometheus, report,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinHandle,
};

const STATS_ADDR: &str = "127.0.0.1:8404";
const SERVER_A: &str = "127.0.0.1:9001";
const SERVER_B: &str = "127.0.0.1:9002";
/// Check interval and counts of every test.
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 3;
const RISE: u32 = 2;
/// Added to `fall x interval` (and `rise x interval`): a check in flight,
/// the stats poll, scheduling on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(700);

/// What one test server saw.
#[derive(Default)]
struct Seen {
    /// Requests for `/health`.
    checks: AtomicU64,
    /// Every other request.
    traffic: AtomicU64,
}

/// An HTTP/1.1 server that answers `/health` with `health` and every other
/// path with 200 and its own address, closing after each response; it can
/// be killed (the listener closes: connections are refused) and restarted
/// on the same address.
struct TestServer {
    addr: &'static str,
    seen: Arc<Seen>,
    health: Arc<AtomicU16>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(rt: &Runtime, addr: &'static str) -> TestServer {
        let mut s = TestServer {
            addr,
            seen: Arc::default(),
            health: Arc::new(AtomicU16::new(200)),
            accept: None,
        };
        s.restart(rt);
        s
    }

    fn restart(&mut self, rt: &Runtime) {
        assert!(self.accept.is_none(), "{} is running", self.addr);
        // A client socket may hold the port for a moment: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match rt.block_on(TcpListener::bind(self.addr)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("binding {}: {e}", self.addr),
            }
        };
        let (seen, health, addr) = (self.seen.clone(), self.health.clone(), self.addr);
        self.accept = Some(rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, health) = (seen.clone(), health.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        serve(stream, &seen, &health, addr),
                    )
                    .await;
                });
            }
        }));
    }

    /// Closes the listener: new connections are refused.
    fn kill(&mut self, rt: &Runtime) {
        let task = self.accept.take().expect("running");
        task.abort();
        let _ = rt.block_on(task);
    }

    fn set_health(&self, status: u16) {
        self.health.store(status, Relaxed);
    }

    fn traffic(&self) -> u64 {
        self.seen.traffic.load(Relaxed)
    }

    fn checks(&self) -> u64 {
        self.seen.checks.load(Relaxed)
    }
}

/// Answers the requests of one connection (one per connection from the
/// load; several on a keep-alive one), then closes.
async fn serve(mut s: TcpStream, seen: &Seen, health: &AtomicU16, addr: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split(' ').nth(1).unwrap_or("");
    let (status, body) = if path.starts_with("/health") {
        seen.checks.fetch_add(1, Relaxed);
        (health.load(Relaxed), "check".to_string())
    } else {
        seen.traffic.fetch_add(1, Relaxed);
        (200, format!("served by {addr}"))
    };
    let reply = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// One `GET /page` on a new connection: the response body, or why not.
async fn get_page(addr: &str) -> Result<String, String> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /page HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&got).into_owned();
        if !text.starts_with("HTTP/1.1 200") {
            return Err(format!("not a 200: {text:?}"));
        }
        Ok(text.rsplit("\r\n\r\n").next().unwrap_or("").to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Every request of a load: when it started, and whether it succeeded.
type Results = Arc<Mutex<Vec<(Instant, Result<(), String>)>>>;

/// Requests one after the other (two workers) until stopped or bounded.
struct Load {
    results: Results,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// At most `max` long, at most 20,000 requests.
    fn start(rt: &Runtime, max: Duration) -> Load {
        let results: Results = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let end = Instant::now() + max;
        let workers = (0..2)
            .map(|_| {
                let (results, stop) = (results.clone(), stop.clone());
                rt.spawn(async move {
                    for _ in 0..10_000 {
                        if stop.load(Relaxed) || Instant::now() > end {
                            break;
                        }
                        let at = Instant::now();
                        let r = get_page(PROXY_ADDR).await.map(|_| ());
                        results.lock().unwrap().push((at, r));
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                })
            })
            .collect();
        Load {
            results,
            stop,
            workers,
        }
    }

    /// (ok, failed) among the requests started at or after `from`.
    fn counts_since(&self, from: Instant) -> (usize, Vec<String>) {
        let r = self.results.lock().unwrap();
        let since: Vec<_> = r.iter().filter(|(at, _)| *at >= from).collect();
        let failed: Vec<String> = since
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect();
        (since.len() - failed.len(), failed)
    }

    fn finish(self, rt: &Runtime) -> (usize, Vec<String>) {
        self.stop.store(true, Relaxed);
        for w in self.workers {
            let _ = rt.block_on(w);
        }
        let r = self.results.lock().unwrap();
        let failed: Vec<String> = r
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect();
        (r.len() - failed.len(), failed)
    }
}

/// The config: listener `front` (`mode`) on [`PROXY_ADDR`] to backend `app`
/// = A and B with `check` lines in `[backend.check]`, and the stats.
fn config(sb: &Sandbox, mode: &str, check: &[(&str, String)]) -> std::path::PathBuf {
    let mut check_table = Table::new("[backend.check]");
    for (k, v) in check {
        check_table = check_table.key(k, v);
    }
    let text = ConfigToml::new(global_toml(sb, "30s"))
        .table(Table::listener("front", &[PROXY_ADDR], "app").str("mode", mode))
        .table(
            Table::backend("app", &[SERVER_A, SERVER_B])
                .str("connect_timeout", "500ms")
                .with(check_table),
        )
        .table(Table::new("[stats]").str("bind", STATS_ADDR))
        .render();
    sb.write_file("proxy.toml", &text)
}

fn interval_keys() -> Vec<(&'static str, String)> {
    vec![
        ("interval", format!("\"{}ms\"", INTERVAL.as_millis())),
        ("timeout", "\"150ms\"".into()),
        ("rise", RISE.to_string()),
        ("fall", FALL.to_string()),
    ]
}

/// The `servers` row of `server` in `/stats.json`.
fn stats_server(server: &str) -> Value {
    let reply = http_get(STATS_ADDR, "/stats.json", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET /stats.json: {e}"));
    let json: Value = serde_json::from_str(&reply.body).expect("stats.json is JSON");
    json["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|r| r["server"] == server).cloned())
        .unwrap_or_else(|| panic!("no server {server} in /stats.json: {json}"))
}

fn check_state(row: &Value) -> &str {
    row["check"]["state"].as_str().unwrap_or("?")
}

/// Polls `/stats.json` until `server`'s check state is `state`: the time
/// it took, the row, and what `before` (run just before each poll) returned
/// before the last poll that still saw another state: a value from while
/// the state was not yet `state`.
fn wait_state(
    server: &str,
    state: &str,
    within: Duration,
    mut before: impl FnMut() -> u64,
) -> (Duration, Value, Option<u64>) {
    let start = Instant::now();
    let mut last_other = None;
    loop {
        let value = before();
        let row = stats_server(server);
        if check_state(&row) == state {
            return (start.elapsed(), row, last_other);
        }
        last_other = Some(value);
        assert!(
            start.elapsed() < within,
            "server {server} not {state} within {within:?}: {row}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `proxy status --json` of the sandbox, as JSON (its `servers` part is
/// this feature's).
fn status_json(sb: &Sandbox) -> Value {
    let out = Command::new(&sb.bin)
        .args(["status", "--name", &sb.name, "--bpffs"])
        .arg(&sb.bpffs)
        .arg("--json")
        .output()
        .expect("running proxy status");
    assert!(out.status.success(), "proxy status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The check of `server` in `proxy status --json`.
fn status_check(sb: &Sandbox, server: &str) -> Value {
    let st = status_json(sb);
    st["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|r| r["server"] == server))
        .map(|r| r["check"].clone())
        .unwrap_or(Value::Null)
}

fn wait_status_state(sb: &Sandbox, server: &str, state: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let check = status_check(sb, server);
        if check["state"] == state {
            return check;
        }
        assert!(
            start.elapsed() < within,
            "proxy status: {server} not {state} within {within:?}: {}",
            status_json(sb)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_check_takes_a_killed_server_down_and_back_up() {
    let (sb, rt) = Sandbox::with_runtime("health-tcp");
    let a = TestServer::start(&rt, SERVER_A);
    let mut b = TestServer::start(&rt, SERVER_B);
    let mut keys = interval_keys();
    keys.push(("type", "\"tcp\"".into()));
    let cfg = config(&sb, "tcp", &keys);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));
    wait_state(SERVER_B, "UP", Duration::from_secs(5), || 0);

    let load = Load::start(&rt, Duration::from_secs(30));
    proxy_harness::wait_until(
        Duration::from_secs(10),
        || a.traffic() >= 20 && b.traffic() >= 20,
        || format!("traffic to both: A {} B {}", a.traffic(), b.traffic()),
    );

    // Killed: refused from now on. DOWN after `fall` failed checks.
    b.kill(&rt);
    let bound = INTERVAL * FALL + SLACK;
    let (to_down, row, _) = wait_state(SERVER_B, "DOWN", bound, || 0);
    let down_at = Instant::now();
    assert_eq!(row["check"]["result"], "L4CON", "{row}");
    assert_eq!(row["up"], false, "a DOWN server's status is DOWN: {row}");
    let errors_at_down = row["errors"].as_u64().unwrap();

    // From then on no connection attempt reaches it, and no client fails.
    std::thread::sleep(Duration::from_millis(1500));
    let row = stats_server(SERVER_B);
    let errors_after = row["errors"].as_u64().unwrap();
    let (ok_after, failed_after) = load.counts_since(down_at);
    assert!(ok_after >= 50, "the load went on: {ok_after} requests");
    assert!(
        failed_after.is_empty(),
        "failed after DOWN: {failed_after:?}"
    );
    assert_eq!(
        errors_after, errors_at_down,
        "connection attempts to the DOWN server after it went DOWN"
    );

    // Back: UP after `rise` passed checks; nothing reaches it while DOWN.
    let traffic_before = b.traffic();
    b.restart(&rt);
    let (to_up, _, while_down) = wait_state(SERVER_B, "UP", INTERVAL * RISE + SLACK, || {
        b.traffic() - traffic_before
    });
    let traffic_while_down = while_down.expect("B was DOWN for a poll at least");
    assert_eq!(traffic_while_down, 0, "requests reached B while DOWN");
    let up_traffic = b.traffic();
    proxy_harness::wait_until(
        Duration::from_secs(5),
        || b.traffic() >= up_traffic + 20,
        || format!("traffic back to B: {}", b.traffic() - up_traffic),
    );
    let (ok, failed) = load.finish(&rt);
    let log = proxy.log();
    assert!(
        log.contains(&format!(
            "server app/{SERVER_B} is DOWN, reason: Layer4 connection problem, info: \"Connection refused\""
        )) && log.contains("1 active servers left."),
        "the HAProxy-style DOWN line: {log}"
    );
    assert!(
        log.contains(&format!(
            "server app/{SERVER_B} is UP, reason: Layer4 check passed"
        )),
        "{log}"
    );
    report(
        &sb,
        &format!(
            "health_checks tcp: kill -> DOWN in {to_down:?} (bound {bound:?}, fall {FALL} x \
             {INTERVAL:?}); connect attempts to B in the 1.5 s after DOWN: {}; requests after DOWN \
             ok={ok_after} failed={}; restart -> UP in {to_up:?} (rise {RISE}), requests to B while \
             DOWN after the restart: {traffic_while_down}; load ok={ok} failed={} (before DOWN, a \
             refused connect moves on to A)",
            errors_after - errors_at_down,
            failed_after.len(),
            failed.len(),
        ),
    );
    drop(a);
}

#[test]
fn http_check_takes_a_server_answering_500_down() {
    let (sb, rt) = Sandbox::with_runtime("health-http");
    let a = TestServer::start(&rt, SERVER_A);
    let b = TestServer::start(&rt, SERVER_B);
    let mut keys = interval_keys();
    keys.extend([
        ("type", "\"http\"".to_string()),
        ("path", "\"/health\"".into()),
        ("expect_status", "\"200-299\"".into()),
    ]);
    let cfg = config(&sb, "http", &keys);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));
    wait_state(SERVER_B, "UP", Duration::from_secs(5), || 0);

    let load = Load::start(&rt, Duration::from_secs(30));
    proxy_harness::wait_until(
        Duration::from_secs(10),
        || a.traffic() >= 20 && b.traffic() >= 20,
        || format!("traffic to both: A {} B {}", a.traffic(), b.traffic()),
    );

    // B still accepts TCP, but its check path answers 500.
    b.set_health(500);
    let bound = INTERVAL * FALL + SLACK;
    let (to_down, row, _) = wait_state(SERVER_B, "DOWN", bound, || 0);
    assert_eq!(row["check"]["result"], "L7STS", "{row}");
    assert_eq!(row["check"]["http_status"], 500, "{row}");
    let down_at = Instant::now();
    let (b_at_down, a_at_down) = (b.traffic(), a.traffic());
    std::thread::sleep(Duration::from_millis(1500));
    let (ok_after, failed_after) = load.counts_since(down_at);
    assert!(
        failed_after.is_empty(),
        "failed after DOWN: {failed_after:?}"
    );
    let b_after_down = b.traffic() - b_at_down;
    let a_after_down = a.traffic() - a_at_down;
    assert!(a_after_down >= 50, "A takes it all: {a_after_down}");
    assert_eq!(
        b_after_down,
        0,
        "requests reached B after it went DOWN (its checks go on: {} seen)",
        b.checks()
    );

    // The views say why.
    let metrics = http_get(STATS_ADDR, "/metrics", Duration::from_secs(5)).unwrap();
    let labels = format!("backend=\"app\",server=\"{SERVER_B}\"");
    for line in [
        format!(
            "proxy_server_check_up{{instance=\"{}\",{labels}}} 0",
            sb.name
        ),
        format!("proxy_server_up{{instance=\"{}\",{labels}}} 0", sb.name),
        format!(
            "proxy_server_check_result{{instance=\"{}\",{labels},result=\"L7STS\"}} 1",
            sb.name
        ),
        format!(
            "proxy_server_check_http_status{{instance=\"{}\",{labels}}} 500",
            sb.name
        ),
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "missing {line:?} in /metrics:\n{}",
            metrics.body
        );
    }
    // Prometheus itself reads the new families: gauges with their labels.
    let families = &prometheus::parse_prometheus(std::slice::from_ref(&metrics.body))[0];
    for name in [
        "proxy_server_check_up",
        "proxy_server_check_result",
        "proxy_server_check_duration_seconds",
        "proxy_server_check_http_status",
        "proxy_server_check_consecutive_failures",
        "proxy_server_check_last_change_timestamp_seconds",
    ] {
        let f = families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("Prometheus does not read {name} in:\n{}", metrics.body));
        assert_eq!(f.kind, "gauge", "{f:?}");
        assert_eq!(f.samples.len(), 2, "one sample per checked server: {f:?}");
    }
    let page = http_get(STATS_ADDR, "/", Duration::from_secs(5))
        .unwrap()
        .body;
    assert!(
        page.contains("<th>last check</th>") && page.contains(">L7STS 500 in "),
        "{page}"
    );
    assert!(page.contains("title=\"Layer7 wrong status\""), "{page}");
    let st = status_check(&sb, SERVER_B);
    assert_eq!(
        (st["state"].as_str(), st["result"].as_str()),
        (Some("DOWN"), Some("L7STS")),
        "{st}"
    );

    // Healthy again: UP after `rise`, traffic returns.
    b.set_health(200);
    let (to_up, _, while_down) = wait_state(SERVER_B, "UP", INTERVAL * RISE + SLACK, || {
        b.traffic() - b_at_down
    });
    assert_eq!(
        while_down.expect("B was DOWN for a poll at least"),
        0,
        "requests reached B while DOWN"
    );
    let up_traffic = b.traffic();
    proxy_harness::wait_until(
        Duration::from_secs(5),
        || b.traffic() >= up_traffic + 20,
        || format!("traffic back to B: {}", b.traffic() - up_traffic),
    );
    let (ok, failed) = load.finish(&rt);
    assert!(
        failed.is_empty(),
        "no request fails: a server answering 500 to checks still serves: {failed:?}"
    );
    assert!(
        proxy.log().contains(&format!(
            "server app/{SERVER_B} is DOWN, reason: Layer7 wrong status, code: 500"
        )),
        "{}",
        proxy.log()
    );
    report(
        &sb,
        &format!(
            "health_checks http: /health 500 -> DOWN in {to_down:?} (bound {bound:?}); requests to B \
             in the 1.5 s after DOWN: {b_after_down} (A: {}), ok after DOWN {ok_after}; back to 200 \
             -> UP in {to_up:?}; load ok={ok} failed={}",
            a_after_down,
            failed.len()
        ),
    );
}

#[test]
fn generations_share_the_states() {
    let (sb, rt) = Sandbox::with_runtime("health-handover");
    let a = TestServer::start(&rt, SERVER_A);
    let b = TestServer::start(&rt, SERVER_B);
    let mut keys = interval_keys();
    keys.extend([
        ("type", "\"http\"".to_string()),
        ("path", "\"/health\"".into()),
    ]);
    let cfg = config(&sb, "http", &keys);
    let mut first = Proxy::start(&sb, &cfg, &[]);
    let first_id = first.wait_active(&sb, Duration::from_secs(10));
    b.set_health(503);
    let st = wait_status_state(&sb, SERVER_B, "DOWN", INTERVAL * FALL + SLACK);
    assert_eq!(st["checked_by"], first_id.generation, "{st}");

    // Keep-alive clients of the first generation: served by A alone.
    const HELD: usize = 20;
    let mut held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..HELD {
            let mut c = http_connect(PROXY_ADDR).await.expect("connects");
            let (parts, body) = fetch(&mut c, request("GET", "/page", "test", &[]))
                .await
                .expect("served");
            assert_eq!(parts.status, 200);
            assert_eq!(
                String::from_utf8_lossy(&body),
                format!("served by {SERVER_A}")
            );
            held.push(c);
        }
        held
    });

    // A new generation while B is DOWN: it knows from its first connection.
    let b_before = b.traffic();
    let mut second = Proxy::start(&sb, &cfg, &[]);
    let second_id = second.wait_active(&sb, Duration::from_secs(10));
    let results: Vec<Result<String, String>> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..200 {
            out.push(get_page(PROXY_ADDR).await);
        }
        out
    });
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        results
            .iter()
            .all(|r| r.as_deref() == Ok(&format!("served by {SERVER_A}"))),
        "every request of the new generation went to A"
    );
    assert_eq!(
        b.traffic(),
        b_before,
        "the new generation sent requests to the DOWN server"
    );
    assert!(
        second
            .log()
            .contains(&format!("server app/{SERVER_B} starts DOWN")),
        "{}",
        second.log()
    );

    // The first generation drains; the states change after the flip.
    sb.wait_status(
        "the first generation to drain",
        Duration::from_secs(10),
        |st| {
            st.generation(first_id.generation)
                .is_some_and(|g| g.state == "draining")
        },
    );
    a.set_health(500);
    b.set_health(200);
    let st_b = wait_status_state(&sb, SERVER_B, "UP", INTERVAL * RISE + SLACK);
    let st_a = wait_status_state(&sb, SERVER_A, "DOWN", INTERVAL * FALL + SLACK);
    assert_eq!(
        st_b["checked_by"], second_id.generation,
        "the new generation checks: {st_b}"
    );
    assert_eq!(st_a["checked_by"], second_id.generation, "{st_a}");
    // The draining generation reads the states every 100 ms.
    std::thread::sleep(Duration::from_millis(400));
    let a_before = a.traffic();
    let drained: Vec<Result<String, String>> = rt.block_on(async {
        let mut out = Vec::new();
        for c in held.iter_mut() {
            out.push(
                fetch(c, request("GET", "/page", "test", &[]))
                    .await
                    .map(|(_, body)| String::from_utf8_lossy(&body).into_owned()),
            );
        }
        out
    });
    let to_b = drained
        .iter()
        .filter(|r| r.as_deref() == Ok(&format!("served by {SERVER_B}")))
        .count();
    assert_eq!(
        to_b, HELD,
        "the draining generation follows the new states: {drained:?}"
    );
    assert_eq!(
        a.traffic(),
        a_before,
        "the draining generation sent requests to the DOWN server"
    );
    assert!(
        first.log().contains(&format!(
            "server app/{SERVER_A} is DOWN, as checked by generation {}",
            second_id.generation
        )),
        "{}",
        first.log()
    );
    drop(held);
    let exit = first.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "first generation: {exit}");
    report(
        &sb,
        &format!(
            "health_checks handover: generation {} started with B DOWN: 200 requests, 0 to B; \
             after the flip A DOWN / B UP (checked by generation {}): the draining generation {} sent \
             {to_b}/{HELD} keep-alive requests to B, 0 to A",
            second_id.generation, second_id.generation, first_id.generation
        ),
    );
    drop(second);
}
