//! HTTP/1.1 upgrades in http mode.
//!
//! `websocket_tunnels_outlive_the_handover_then_close_1001`: twenty Python
//! `websockets` clients echo through generation 1; generation 2 takes over;
//! the open tunnels keep echoing in the draining generation 1 (which `proxy
//! status` shows holding them) while new WebSockets go to generation 2;
//! before `hard_stop_after` generation 1 closes each tunnel with a close
//! frame 1001 to both sides, at instants spread over `close_spread_time`,
//! then exits with nothing left to cut.
//!
//! `other_answers_stay_http_and_tunnels_close_on_idle_or_drain`: an
//! upgrade request answered 200 or 400 stays plain HTTP on a keep-alive
//! connection; a 101 tunnel of another protocol echoes bytes, is closed
//! at `tunnel_timeout` when idle, and gets FIN only (no WebSocket frame) at
//! the drain deadline.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, channel},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use proxy_harness::{
    BACKEND_ADDR, PROXY_ADDR, Proxy, Sandbox, Signal,
    config::{ConfigToml, STATS_ADDR, Table, global_toml},
    http_get::http_get_ok,
    report,
    status::StatsJson,
    wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// The clients and echo server (Python `websockets`).
const WS_PY: &str = include_str!("ws.py");

/// WebSockets open before the handover, and after it.
const BEFORE: usize = 20;
const AFTER: usize = 5;
const HARD_STOP_AFTER: f64 = 6.0;
const CLOSE_SPREAD: f64 = 2.0;
/// The latest a tunnel closes before the deadline (the proxy's
/// `CLOSE_MARGIN`).
const CLOSE_MARGIN: f64 = 0.5;
/// Scheduling and status-polling slack on the measured instants.
const SLACK: f64 = 0.4;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A Python helper process and the lines it prints.
struct Py {
    /// Its stderr, quoted when it does not answer.
    log: std::path::PathBuf,
    stdin: ChildStdin,
    lines: Receiver<String>,
    child: Arc<Mutex<Child>>,
}

impl Py {
    fn start(sb: &Sandbox, args: &[&str]) -> Py {
        let script = sb.write_file("ws.py", WS_PY);
        let log = sb.dir.join(format!("ws-{}.log", args[0]));
        let mut child = Command::new("python3")
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running python3 (the websockets package is needed: cargo xtask test installs it): {e}")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Py {
            log,
            stdin,
            lines,
            child: sb.adopt(child),
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing to the python helper");
        self.stdin.flush().unwrap();
    }

    /// The next line, which must start with `prefix`.
    fn expect(&self, prefix: &str, timeout: Duration) -> String {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("no line {prefix:?} from the python helper within {timeout:?} ({e}); its stderr:\n{stderr}")
        });
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// One client as ws.py reports it.
#[derive(Debug)]
struct ClientRec {
    group: String,
    id: u64,
    echoes: Vec<f64>,
    close_code: Option<u64>,
    close_t: Option<f64>,
    closed_by_us: bool,
    error: Option<String>,
}

fn parse_report(line: &str) -> Vec<ClientRec> {
    let json: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("report ")).expect("report is JSON");
    json.as_array()
        .expect("a list")
        .iter()
        .map(|c| ClientRec {
            group: c["group"].as_str().unwrap().to_string(),
            id: c["id"].as_u64().unwrap(),
            echoes: c["echoes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect(),
            close_code: c["close_code"].as_u64(),
            close_t: c["close_t"].as_f64(),
            closed_by_us: c["closed_by_us"].as_bool().unwrap(),
            error: c["error"].as_str().map(str::to_string),
        })
        .collect()
}

/// What the echo server logged: (path, close code it received, when).
fn server_closes(sb: &Sandbox) -> Vec<(String, Option<u64>, f64)> {
    std::fs::read_to_string(sb.dir.join("server-closes.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            (
                v["path"].as_str().unwrap().to_string(),
                v["code"].as_u64(),
                v["t"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn ws_config(sb: &Sandbox) -> std::path::PathBuf {
    let global = global_toml(sb, &format!("{HARD_STOP_AFTER}s")).replacen(
        "\n\n",
        &format!("\nclose_spread_time = \"{CLOSE_SPREAD}s\"\n\n"),
        1,
    );
    let text = ConfigToml::new(global)
        .table(Table::new("[stats]").str("bind", STATS_ADDR))
        .table(Table::http("front", PROXY_ADDR, "app"))
        .table(Table::backend("app", &[BACKEND_ADDR]))
        .render();
    sb.write_file("proxy.toml", &text)
}

#[test]
fn websocket_tunnels_outlive_the_handover_then_close_1001() {
    let sb = Sandbox::new("websocket");
    let cfg = ws_config(&sb);
    let server_log = sb.dir.join("server-closes.jsonl");
    let (host, port) = BACKEND_ADDR.split_once(':').unwrap();
    let server = Py::start(&sb, &["server", host, port, server_log.to_str().unwrap()]);
    server.expect("ready", Duration::from_secs(10));

    let mut g1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = g1.wait_active(&sb, Duration::from_secs(10));
    let mut clients = Py::start(&sb, &["client", &format!("ws://{PROXY_ADDR}")]);
    clients.send(&format!("open a {BEFORE}"));
    let opened = clients.expect("opened a", Duration::from_secs(20));
    assert_eq!(
        opened,
        format!("opened a {BEFORE} 0"),
        "every client connects"
    );
    std::thread::sleep(Duration::from_millis(500));

    // Handover: generation 2 flips the slot, generation 1 sees it and
    // drains after handover_grace.
    let mut g2 = Proxy::start(&sb, &cfg, &[]);
    let id2 = g2.wait_active(&sb, Duration::from_secs(10));
    // When generation 1 began to drain, to a status call: after the start
    // of the last call that saw it serving, before the end of the first
    // that saw it draining.
    let (drain_lo, drain_seen) = {
        let mut serving_at = unix_now();
        let polled_until = Instant::now() + Duration::from_secs(5);
        loop {
            let called = unix_now();
            let st = sb.status();
            if st
                .generation(id1.generation)
                .is_some_and(|g| g.state == "draining")
            {
                break (serving_at, unix_now());
            }
            assert!(
                Instant::now() < polled_until,
                "generation 1 never drained: {st:#?}"
            );
            serving_at = called;
        }
    };
    let deadline = drain_seen + HARD_STOP_AFTER;

    // The draining generation shows the tunnels it holds (its counters are
    // published every second).
    let st = sb.wait_status(
        "generation 1 to show its tunnels",
        Duration::from_secs(3),
        |st| {
            st.generation(id1.generation)
                .is_some_and(|g| g.tunnels == BEFORE as u64)
        },
    );
    report(
        &sb,
        &format!(
            "websocket: {:.2}s after the drain began, proxy status: gen {} {} with {} tunnels, gen {} {} with {}",
            unix_now() - drain_seen,
            id1.generation,
            st.generation(id1.generation).unwrap().state,
            st.generation(id1.generation).unwrap().tunnels,
            id2.generation,
            st.generation(id2.generation)
                .map_or("?".into(), |g| g.state.clone()),
            st.generation(id2.generation).map_or(0, |g| g.tunnels),
        ),
    );

    // New WebSockets go to generation 2.
    clients.send(&format!("open b {AFTER}"));
    let opened = clients.expect("opened b", Duration::from_secs(10));
    assert_eq!(opened, format!("opened b {AFTER} 0"));
    sb.wait_status(
        "generation 2 to hold the new tunnels",
        Duration::from_secs(3),
        |st| {
            st.generation(id2.generation)
                .is_some_and(|g| g.tunnels == AFTER as u64)
                && st
                    .generation(id1.generation)
                    .is_some_and(|g| g.tunnels == BEFORE as u64)
        },
    );
    // The stats listener (now served by generation 2) sums the tunnels of
    // both generations, in /stats.json and /metrics alike.
    let both = (BEFORE + AFTER) as u64;
    let polled_until = Instant::now() + Duration::from_secs(3);
    loop {
        let (r, _) = http_get_ok(STATS_ADDR, "/stats.json", Duration::from_secs(5));
        let json: StatsJson = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("/stats.json does not parse ({e}):\n{}", r.body));
        let front = json.listener("front");
        if front.tunnels == both && front.tunnels_total == both {
            break;
        }
        assert!(
            Instant::now() < polled_until,
            "/stats.json must show {both} tunnels on front: {front:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (metrics, _) = http_get_ok(STATS_ADDR, "/metrics", Duration::from_secs(5));
    let sample = |family: &str| {
        metrics
            .body
            .lines()
            .find(|l| l.starts_with(&format!("{family}{{")) && l.contains("listener=\"front\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        sample("proxy_listener_current_tunnels"),
        Some(both as f64),
        "/metrics:\n{}",
        metrics.body
    );
    assert_eq!(
        sample("proxy_listener_tunnels_total"),
        Some(both as f64),
        "/metrics:\n{}",
        metrics.body
    );
    assert!(
        unix_now() < deadline - CLOSE_SPREAD,
        "the checks above must run before the first close could happen"
    );

    // Generation 1 closes its tunnels and exits before its deadline.
    clients.send(&format!("wait a {}", HARD_STOP_AFTER + 5.0));
    let closed = clients.expect("closed a", Duration::from_secs(20));
    assert_eq!(closed, "closed a 0", "every old tunnel was closed");
    let exit = g1.expect_exit(Duration::from_secs(5));
    let g1_exit = unix_now();
    assert!(exit.success(), "generation 1 exited with {exit}");
    let final_line = g1.final_line().unwrap_or_default();

    // The new tunnels outlived it; they close normally now.
    std::thread::sleep(Duration::from_millis(300));
    clients.send("finish b");
    clients.expect("finished b", Duration::from_secs(10));
    clients.send("report");
    let recs = parse_report(&clients.expect("report", Duration::from_secs(10)));
    // The echo server logs a close once its TCP connection is gone, which
    // can be after its client saw the close handshake end.
    wait_until(
        Duration::from_secs(10),
        || server_closes(&sb).len() >= BEFORE + AFTER,
        || format!("the echo server logged: {:?}", server_closes(&sb)),
    );
    let closes = server_closes(&sb);

    let old: Vec<&ClientRec> = recs.iter().filter(|c| c.group == "a").collect();
    let new: Vec<&ClientRec> = recs.iter().filter(|c| c.group == "b").collect();
    let close_times: Vec<f64> = old.iter().filter_map(|c| c.close_t).collect();
    let first = close_times.iter().copied().fold(f64::INFINITY, f64::min);
    let last = close_times
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let last_echoes: Vec<f64> = old
        .iter()
        .map(|c| c.echoes.last().copied().unwrap_or(0.0) - drain_seen)
        .collect();
    let window = CLOSE_SPREAD - CLOSE_MARGIN;
    report(
        &sb,
        &format!(
            "websocket: {BEFORE} old tunnels closed {:.2}s..{:.2}s after the drain began (known to {:.3}s; deadline {HARD_STOP_AFTER}s, \
             spread window {:.2}s..{:.2}s): close spread {:.2}s of {window:.2}s; last echo per old client {:.2}s..{:.2}s \
             after the drain began; echoes per old client {}..{}; generation 1 exited {:.2}s after the drain began: {final_line}",
            first - drain_seen,
            last - drain_seen,
            drain_seen - drain_lo,
            HARD_STOP_AFTER - CLOSE_SPREAD,
            HARD_STOP_AFTER - CLOSE_MARGIN,
            last - first,
            last_echoes.iter().copied().fold(f64::INFINITY, f64::min),
            last_echoes
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max),
            old.iter().map(|c| c.echoes.len()).min().unwrap_or(0),
            old.iter().map(|c| c.echoes.len()).max().unwrap_or(0),
            g1_exit - drain_seen,
        ),
    );

    assert_eq!(old.len(), BEFORE);
    assert_eq!(new.len(), AFTER);
    for c in &old {
        assert_eq!(c.error, None, "old client {}: {c:?}", c.id);
        assert_eq!(
            c.close_code,
            Some(1001),
            "old client {} must see close code 1001: {c:?}",
            c.id
        );
        // Not before the window opens (the client reads the close after
        // the proxy sent it), not much after it shuts.
        let t = c.close_t.unwrap() - drain_seen;
        assert!(
            c.close_t.unwrap() >= drain_lo + HARD_STOP_AFTER - CLOSE_SPREAD - 0.01
                && t <= HARD_STOP_AFTER - CLOSE_MARGIN + SLACK,
            "old client {} closed {t:.2}s after the drain began (known to {:.3}s), outside the \
             spread window",
            c.id,
            drain_seen - drain_lo
        );
        // It kept echoing in the draining generation until close to its close.
        let last_echo = c.echoes.last().copied().unwrap_or(0.0);
        assert!(
            last_echo >= c.close_t.unwrap() - 0.5
                && last_echo - drain_lo >= HARD_STOP_AFTER - CLOSE_SPREAD - 0.5,
            "old client {}: last echo {:.2}s after the drain began, closed at {t:.2}s",
            c.id,
            last_echo - drain_seen
        );
    }
    assert!(
        last - first > 0.5 * window,
        "closes must be spread over the window: {:.2}s of {window:.2}s",
        last - first
    );
    for c in &new {
        assert_eq!(c.error, None, "new client {}: {c:?}", c.id);
        assert!(
            c.closed_by_us && c.close_code.is_none(),
            "new client {} must live until it closes itself: {c:?}",
            c.id
        );
        assert!(
            c.echoes.last().copied().unwrap_or(0.0) > g1_exit,
            "new client {} echoed after generation 1 exited",
            c.id
        );
    }
    // The server side saw the same: 1001 from the proxy for each old
    // tunnel, 1000 from the new clients.
    let server_old: Vec<_> = closes
        .iter()
        .filter(|(p, ..)| p.starts_with("/a/"))
        .collect();
    let server_new: Vec<_> = closes
        .iter()
        .filter(|(p, ..)| p.starts_with("/b/"))
        .collect();
    assert_eq!(server_old.len(), BEFORE, "server closes: {closes:?}");
    assert!(
        server_old.iter().all(|(_, code, _)| *code == Some(1001)),
        "the server must get close code 1001 on every old tunnel: {server_old:?}"
    );
    assert_eq!(server_new.len(), AFTER, "server closes: {closes:?}");
    assert!(
        server_new.iter().all(|(_, code, _)| *code == Some(1000)),
        "{server_new:?}"
    );
    assert!(
        g1_exit - drain_seen < HARD_STOP_AFTER + SLACK,
        "generation 1 exits by its deadline"
    );
    assert!(
        final_line.contains("all connections drained") && final_line.contains("cut=0"),
        "generation 1 had nothing left to cut: {final_line}"
    );

    g2.signal(Signal::Usr1);
    assert!(g2.expect_exit(Duration::from_secs(10)).success());
    drop(server);
}

/// A backend that answers by path: `/200` and `/400` plain HTTP
/// (keep-alive), `/101` switches to protocol `echo` and echoes bytes; it
/// records every request head and when each echo connection ended.
fn start_backend(rt: &tokio::runtime::Runtime) -> Arc<Mutex<Vec<String>>> {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let listener = rt
        .block_on(TcpListener::bind(BACKEND_ADDR))
        .expect("binding the backend");
    let seen = heads.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    buf.drain(..end + 4);
                    seen.lock().unwrap().push(head.clone());
                    let answer: &[u8] = if head.starts_with("get /101 ") {
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
                    } else if head.starts_with("get /400 ") {
                        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if head.starts_with("get /101 ") {
                        stream.write_all(&buf).await.ok();
                        loop {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if stream.write_all(&chunk[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        seen.lock().unwrap().push("echo: eof".into());
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    heads
}

/// Reads one response head and a `content-length` body (none for a 101).
fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading a response head");
        assert_eq!(
            n,
            1,
            "closed inside a response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn upgrade_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
}

/// Opens a `/101` tunnel and checks that bytes echo through it.
fn open_tunnel() -> TcpStream {
    let mut s = TcpStream::connect(PROXY_ADDR).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request("/101").as_bytes()).unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(
        head.contains("upgrade: echo") && head.contains("connection: upgrade"),
        "{head}"
    );
    s.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    s
}

#[test]
fn other_answers_stay_http_and_tunnels_close_on_idle_or_drain() {
    let (sb, rt) = Sandbox::with_runtime("upgrade");
    let heads = start_backend(&rt);
    let global = global_toml(&sb, "3s").replacen("\n\n", "\nclose_spread_time = \"0s\"\n\n", 1);
    let text = ConfigToml::new(global)
        .table(Table::http("front", PROXY_ADDR, "app").str("tunnel_timeout", "1s"))
        .table(Table::backend("app", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("proxy.toml", &text);
    let mut g1 = Proxy::start(&sb, &cfg, &[]);
    g1.wait_active(&sb, Duration::from_secs(10));

    // 200 and 400 answers to upgrade requests: plain HTTP, and the
    // keep-alive connection serves a plain request after them.
    let mut s = TcpStream::connect(PROXY_ADDR).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (path, status, body) in [("/200", "200", "ok"), ("/400", "400", "no")] {
        s.write_all(upgrade_request(path).as_bytes()).unwrap();
        let (head, got) = read_response(&mut s);
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        assert!(
            !head.contains("upgrade"),
            "no upgrade in a {status}: {head}"
        );
        assert_eq!(got, body);
    }
    s.write_all(b"GET /200 HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (head, got) = read_response(&mut s);
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert_eq!(got, "ok");
    drop(s);
    {
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 3, "{heads:?}");
        for head in &heads[..2] {
            assert!(
                head.contains("\r\nupgrade: echo") && head.contains("\r\nconnection: upgrade"),
                "the upgrade headers go to the server: {head}"
            );
        }
        assert!(!heads[2].contains("upgrade"), "{}", heads[2]);
    }

    // A 101 tunnel that falls silent is closed at tunnel_timeout.
    let mut idle = open_tunnel();
    let silent_from = Instant::now();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .expect("the proxy closes the idle tunnel");
    let idle_for = silent_from.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    wait_until(
        Duration::from_secs(3),
        || heads.lock().unwrap().iter().any(|h| h == "echo: eof"),
        || "the server side of the idle tunnel was closed too".into(),
    );

    // A 101 tunnel of another protocol at the drain deadline: FIN only,
    // no WebSocket frame, close_spread_time 0 = just before the deadline.
    let mut busy = open_tunnel();
    busy.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    g1.signal(Signal::Usr1);
    let stop_sent = Instant::now();
    let mut echoed = 0u64;
    let closed_after = loop {
        assert!(
            stop_sent.elapsed() < Duration::from_secs(6),
            "the tunnel outlived the drain deadline"
        );
        // Busy: a byte every 100 ms keeps tunnel_timeout away. (Each write
        // follows a read that saw no FIN, so none can reach a closed socket
        // and turn the close into a reset.)
        if busy.write_all(b"x").is_err() {
            break stop_sent.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 64];
        match busy.read(&mut buf) {
            Ok(0) => break stop_sent.elapsed(),
            Ok(n) => {
                assert!(
                    buf[..n].iter().all(|&b| b == b'x'),
                    "only echoes: {:?}",
                    &buf[..n]
                );
                echoed += n as u64;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("the drained tunnel must end with FIN, not {e}"),
        }
    };
    let exit = g1.expect_exit(Duration::from_secs(5));
    let final_line = g1.final_line().unwrap_or_default();
    report(
        &sb,
        &format!(
            "upgrade: idle tunnel closed after {idle_for:.2?} (tunnel_timeout 1s); busy tunnel echoed \
             {echoed} bytes after SIGUSR1 and got FIN {closed_after:.2?} after it (hard_stop_after 3s, \
             close_spread_time 0s); {final_line}"
        ),
    );
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(3),
        "idle tunnel closed after {idle_for:?}, tunnel_timeout is 1s"
    );
    assert!(
        echoed >= 5,
        "the tunnel kept working while draining: {echoed} bytes"
    );
    assert!(
        closed_after >= Duration::from_millis(2100) && closed_after < Duration::from_secs(3),
        "closed {closed_after:?} after the soft-stop; expected just before hard_stop_after (3s)"
    );
    assert!(exit.success(), "exited with {exit}");
    assert!(
        final_line.contains("all connections drained"),
        "nothing left to cut: {final_line}"
    );
}
