//! HTTP/2 on a TLS listener in http mode, driven by the clients operators
//! use: h2load (nghttp2) and curl `--http2`, both through ten handovers
//! without one lost request. A draining generation sends its GOAWAY, serves
//! every stream it took, and exits on its own (not at hard_stop_after); the
//! clients open their next connection to the new generation.
//!
//! Also: each request gets its own access line (protocol, method, path,
//! status, termination), and a rapid-reset client is closed without taking
//! the generation with it.

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox, Signal,
    certs::make_cert,
    config::{ConfigToml, Table},
    http_backend::HttpBackend,
    process::run_bounded,
    report, wait_until,
};

const H2_ADDR: &str = "127.0.0.1:8443";
const HANDOVERS: usize = 10;
/// Bound on the whole handover sequence.
const SEQUENCE_LIMIT: Duration = Duration::from_secs(90);
/// Bound on one client run.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

fn h2_config(sb: &Sandbox) -> std::path::PathBuf {
    let a = make_cert(&sb.dir, "a.test", &["a.test"]);
    let config = ConfigToml::stages(sb, "20s")
        .table(Table::http("h2", H2_ADDR, "servers").with(Table::tls(&[&a.bundle])))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render();
    sb.write_file("h2.toml", &config)
}

/// What the client loops saw.
#[derive(Default)]
struct Tally {
    h2load_runs: AtomicU64,
    h2load_ok: AtomicU64,
    curl_runs: AtomicU64,
    curl_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.h2load_ok.load(Ordering::Relaxed) + self.curl_ok.load(Ordering::Relaxed)
    }

    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// `requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed,
/// 0 errored, 0 timeout` → (total, succeeded).
fn h2load_counts(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.starts_with("requests:"))?;
    let num = |word: &str| -> Option<u64> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    Some((num(" total")?, num(" succeeded")?))
}

/// One h2load run: 4 connections, 8 streams each, 400 requests of 4 KiB.
fn h2load_once(tally: &Tally, run: u64) {
    let out = run_bounded(
        Command::new("h2load")
            .args(["-n", "400", "-c", "4", "-m", "8", "-t", "1"])
            .arg(format!(
                "https://{H2_ADDR}/r?len=4096&seed={run}&ct=text/plain"
            )),
        CLIENT_LIMIT,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    tally.h2load_runs.fetch_add(1, Ordering::Relaxed);
    match h2load_counts(&text) {
        Some((total, ok)) if total == 400 && ok == 400 && out.status.success() => {
            if !text.contains("Application protocol: h2") {
                tally.fail(format!("h2load run {run} did not negotiate h2:\n{text}"));
            }
            tally.h2load_ok.fetch_add(ok, Ordering::Relaxed);
        }
        _ => tally.fail(format!(
            "h2load run {run} ({}): {text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// One curl run: 8 URLs on one HTTP/2 connection (a new one when the
/// server sent GOAWAY), each checked for status, protocol and size.
fn curl_once(tally: &Tally, run: u64) {
    let sizes: Vec<usize> = (0..8)
        .map(|i| 100 + (run as usize * 7919 + i * 3001) % 60_000)
        .collect();
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--http2",
        "--resolve",
        "a.test:8443:127.0.0.1",
        "-w",
        "%{http_code} %{http_version} %{size_download}\\n",
    ]);
    for (i, size) in sizes.iter().enumerate() {
        cmd.args(["-o", "/dev/null"]).arg(format!(
            "https://a.test:8443/r?len={size}&seed={i}&body=bin&ct=application/octet-stream"
        ));
    }
    let out = run_bounded(&mut cmd, CLIENT_LIMIT);
    tally.curl_runs.fetch_add(1, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let want: Vec<String> = sizes.iter().map(|s| format!("200 2 {s}")).collect();
    if out.status.success() && lines == want {
        tally
            .curl_ok
            .fetch_add(sizes.len() as u64, Ordering::Relaxed);
    } else {
        tally.fail(format!(
            "curl run {run} ({}): got {lines:?}, want {want:?}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

#[test]
fn h2_clients_lose_nothing_across_ten_handovers() {
    let (sb, rt) = Sandbox::with_runtime("h2-hand");
    let backend = HttpBackend::start(&rt);
    let cfg = h2_config(&sb);
    let mut current = Proxy::start(&sb, &cfg, &[]);
    current.wait_active(&sb, Duration::from_secs(10));

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load_deadline = Instant::now() + SEQUENCE_LIMIT + Duration::from_secs(20);
    let loops: Vec<_> = [true, false]
        .into_iter()
        .map(|h2load| {
            let (tally, stop) = (tally.clone(), stop.clone());
            thread::spawn(move || {
                let mut run = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < load_deadline {
                    run += 1;
                    if h2load {
                        h2load_once(&tally, run);
                    } else {
                        curl_once(&tally, run);
                    }
                }
            })
        })
        .collect();

    wait_until(
        Duration::from_secs(20),
        || tally.ok() >= 400 || tally.failed() > 0,
        || format!("400 requests before the first handover, ok={}", tally.ok()),
    );
    let sequence_start = Instant::now();
    let mut drained = Vec::new();
    for n in 0..HANDOVERS {
        assert!(
            sequence_start.elapsed() < SEQUENCE_LIMIT,
            "the handover sequence took longer than {SEQUENCE_LIMIT:?} after {n} handovers"
        );
        let mut next = Proxy::start(&sb, &cfg, &[]);
        next.wait_active(&sb, Duration::from_secs(10));
        let spawned = Instant::now();
        let exit = current.expect_exit(Duration::from_secs(25));
        assert!(
            exit.success(),
            "generation {} exited with {exit}; log:\n{}",
            current.generation(),
            current.log()
        );
        let last = current.final_line().unwrap_or_default();
        assert!(
            !last.contains("hard_stop_after"),
            "generation {} was cut at hard_stop_after instead of draining: {last}",
            current.generation()
        );
        drained.push(spawned.elapsed());
        current = next;
        let ok_now = tally.ok();
        wait_until(
            Duration::from_secs(20),
            || tally.ok() >= ok_now + 200 || tally.failed() > 0,
            || format!("200 requests after handover {}", n + 1),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("a client loop panicked");
    }
    current.signal(Signal::Usr1);
    let exit = current.expect_exit(Duration::from_secs(25));
    assert!(exit.success(), "last generation exited with {exit}");

    // Access lines: one per request, HTTP/2, with a normal termination.
    let log = current.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("access:") && l.contains("proto=HTTP/2.0"))
        .collect();
    report(
        &sb,
        &format!(
            "http2: {HANDOVERS} handovers in {:.1?}; h2load {} runs, {} requests ok; curl {} runs, \
             {} requests ok; backend saw {}; old generations drained in {:?}; last generation \
             wrote {} HTTP/2 access lines",
            sequence_start.elapsed(),
            tally.h2load_runs.load(Ordering::Relaxed),
            tally.h2load_ok.load(Ordering::Relaxed),
            tally.curl_runs.load(Ordering::Relaxed),
            tally.curl_ok.load(Ordering::Relaxed),
            backend.requests(),
            drained,
            access.len(),
        ),
    );
    let failures = tally.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "requests lost:\n{}",
        failures.join("\n")
    );
    assert!(!access.is_empty(), "no HTTP/2 access line in:\n{log}");
    for line in access.iter().take(50) {
        for field in [
            "method=GET",
            "path=/r?len=",
            "status=200",
            "termination=--",
            "server=",
        ] {
            assert!(line.contains(field), "{field} missing from: {line}");
        }
    }
}

/// A rapid-reset client (HEADERS then RST_STREAM, over and over) is cut;
/// the generation and an ordinary client beside it are not affected.
#[test]
fn h2_rapid_reset_client_is_closed_and_others_are_served() {
    let (sb, rt) = Sandbox::with_runtime("h2-reset");
    let _backend = HttpBackend::start(&rt);
    let cfg = h2_config(&sb);
    let mut g = Proxy::start(&sb, &cfg, &[]);
    g.wait_active(&sb, Duration::from_secs(10));

    let closed_after = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = proxy_harness::tls::tls_client_config(&["h2"], true);
        let mut s = proxy_harness::tls::tls_connect(H2_ADDR, "a.test", tls)
            .await
            .expect("TLS connect");
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            out.extend([kind, flags]);
            out.extend(stream.to_be_bytes());
            out.extend(payload);
            out
        };
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(0x4, 0, 0, &[]));
        s.write_all(&hello).await.expect("preface");
        let started = Instant::now();
        let mut sent = 0u32;
        // GET https://a.test/ (static table, :authority literal).
        let mut block = vec![0x82, 0x87, 0x84, 0x41, 6];
        block.extend(b"a.test");
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let mut stream = 1u32;
            loop {
                let mut burst = Vec::new();
                for _ in 0..50 {
                    burst.extend(frame(0x1, 0x5, stream, &block));
                    burst.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
                    stream += 2;
                }
                if s.write_all(&burst).await.is_err() {
                    return;
                }
                sent += 50;
                // Drain what the server says, without waiting for it.
                let mut sink = [0u8; 16384];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut sink)).await
                {
                    return;
                }
            }
        })
        .await;
        assert!(
            outcome.is_ok(),
            "the flooding connection was never closed ({sent} resets sent)"
        );
        (started.elapsed(), sent)
    });
    // An ordinary client is served meanwhile and after.
    let out = run_bounded(
        Command::new("curl").args([
            "-sS",
            "-k",
            "--http2",
            "--resolve",
            "a.test:8443:127.0.0.1",
            "-w",
            "%{http_code} %{http_version}",
            "-o",
            "/dev/null",
            "https://a.test:8443/r?len=100&seed=1",
        ]),
        CLIENT_LIMIT,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");
    g.signal(Signal::Usr1);
    assert!(g.expect_exit(Duration::from_secs(10)).success());
    let log = g.log();
    report(
        &sb,
        &format!(
            "http2 rapid reset: closed after {:.0?} and {} resets",
            closed_after.0, closed_after.1
        ),
    );
    // Our guard or h2's pending-accept limit, whichever counts first.
    assert!(
        log.contains("HTTP/2 flood, connection closed"),
        "the flood is not named in the log:\n{log}"
    );
}

/// The offload layout of `examples/proxy.toml`: a tcp-mode TLS stage that
/// offers h2 hands the connection to the http stage over a UNIX socket with
/// PROXY v2; the ALPN TLV tells that stage to speak HTTP/2.
#[test]
fn h2_through_a_tcp_mode_tls_stage_reaches_the_http_stage() {
    let (sb, rt) = Sandbox::with_runtime("h2-chain");
    let backend = HttpBackend::start(&rt);
    let a = make_cert(&sb.dir, "a.test", &["a.test"]);
    let config = ConfigToml::stages(&sb, "10s")
        .table(
            Table::tcp("tls", H2_ADDR, "app1")
                .with(Table::tls(&[&a.bundle]).strs("alpn", &["h2", "http/1.1"])),
        )
        .tables(proxy_harness::config::unix_app(&sb, "http"))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("chain.toml", &config);
    let mut g = Proxy::start(&sb, &cfg, &[]);
    g.wait_active(&sb, Duration::from_secs(10));
    let tally = Tally::default();
    for run in 1..=5 {
        curl_once(&tally, run);
    }
    g.signal(Signal::Usr1);
    assert!(g.expect_exit(Duration::from_secs(15)).success());
    let failures = tally.failures.lock().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(tally.curl_ok.load(Ordering::Relaxed), 40);
    assert_eq!(backend.requests(), 40);
    // The app stage served them as HTTP/2 streams, each with its line.
    let log = g.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("listener=app") && l.contains("proto=HTTP/2.0"))
        .count();
    assert_eq!(lines, 40, "access lines of the app stage:\n{log}");
}
