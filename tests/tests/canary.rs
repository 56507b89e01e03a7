//! Canary generations under a bounded load of new connections, each checked
//! byte for byte: the share the eBPF program gives the canary (counted by
//! the program and by the generations), share changes, promote, abort,
//! automatic abort of a canary whose backend answers 502, a second canary
//! refused, and a canary that dies taken out of the split at once.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_harness::{
    Backend, CanaryStatus, Load, LoadSpec, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal, Status,
    config::config_text, http_backend::HttpBackend, report,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

/// New connections per second of the layer-4 loads.
const RATE: f64 = 2500.0;

fn canary_of(st: &Status) -> &CanaryStatus {
    st.canary
        .as_ref()
        .unwrap_or_else(|| panic!("status shows no canary: {st:#?}"))
}

/// The instance's generation that accepted connections, by number.
fn accepted(st: &Status, generation: u64) -> u64 {
    st.generation(generation)
        .unwrap_or_else(|| panic!("no record of generation {generation}: {st:#?}"))
        .accepted
}

/// `proxy <command> -c <cfg> [args]`, expected to succeed.
fn admin(sb: &Sandbox, command: &str, cfg: &Path, args: &[&str]) -> String {
    let mut all = vec![command, "-c", cfg.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    let out = sb.run_proxy_cmd(&all, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "`proxy {}` failed ({}): {}{}",
        all.join(" "),
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// An active generation and a canary taking `percent`, on the layer-4
/// config.
fn active_and_canary(sb: &Sandbox, percent: &str) -> (PathBuf, Proxy, Proxy) {
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::draining("10s"));
    let mut active = Proxy::start(sb, &cfg, &[]);
    active.wait_active(sb, Duration::from_secs(10));
    let canary = Proxy::start_canary(sb, &cfg, percent, Duration::from_secs(10));
    assert!(
        canary.generation() > active.generation(),
        "the canary is a newer generation"
    );
    (cfg, active, canary)
}

/// Status once the generations' published `accepted` add up to `total`
/// (bounded; the last reading otherwise, for the asserts to explain).
fn settled(sb: &Sandbox, generations: &[u64], total: u64) -> Status {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let st = sb.status();
        let sum: u64 = generations
            .iter()
            .filter_map(|g| st.generation(*g))
            .map(|g| g.accepted)
            .sum();
        if sum == total || Instant::now() >= deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls status until the program has split at least `n` more new
/// connections than in `from` (bounded).
fn wait_split(sb: &Sandbox, from: &CanaryStatus, n: u64, what: &str) -> Status {
    let base = from.split_canary + from.split_active;
    sb.wait_status(what, Duration::from_secs(20), |st| {
        st.canary
            .as_ref()
            .is_some_and(|c| c.split_canary + c.split_active >= base + n)
    })
}

/// The canary's share of the connections split between two readings.
fn share(before: &CanaryStatus, after: &CanaryStatus) -> (f64, u64, u64) {
    let canary = after.split_canary - before.split_canary;
    let total = canary + (after.split_active - before.split_active);
    (canary as f64 / total.max(1) as f64, canary, total)
}

#[test]
fn canary_takes_its_share_and_follows_changes_under_load() {
    let (sb, rt) = Sandbox::with_runtime("canary_share");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let (cfg, mut active, mut canary) = active_and_canary(&sb, "10");
    let (a, c) = (active.generation(), canary.generation());
    let st0 = sb.status();
    let c0 = canary_of(&st0).clone();
    assert_eq!(c0.weight_percent, 10.0, "{c0:?}");
    assert_eq!(c0.slot, canary.slot());
    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(40)));

    // 10%: at least 5,000 new connections.
    let st1 = wait_split(&sb, &c0, 5000, "5,000 connections split at 10%");
    let c1 = canary_of(&st1).clone();
    let (share10, n10c, n10) = share(&c0, &c1);
    let gen_share = {
        let canary_acc = accepted(&st1, c) - accepted(&st0, c);
        let active_acc = accepted(&st1, a) - accepted(&st0, a);
        canary_acc as f64 / (canary_acc + active_acc).max(1) as f64
    };

    // 50%.
    admin(&sb, "canary", &cfg, &["--weight", "50"]);
    let st2 = sb.status();
    let c2 = canary_of(&st2).clone();
    assert_eq!(c2.weight_percent, 50.0, "{c2:?}");
    let st3 = wait_split(&sb, &c2, 2500, "2,500 connections split at 50%");
    let c3 = canary_of(&st3).clone();
    let (share50, n50c, n50) = share(&c2, &c3);

    // 0%: the canary keeps running and gets nothing new.
    admin(&sb, "canary", &cfg, &["--weight", "0"]);
    let st4 = sb.status();
    let c4 = canary_of(&st4).clone();
    let st5 = wait_split(&sb, &c4, 2000, "2,000 connections split at 0%");
    let c5 = canary_of(&st5).clone();
    let (share0, n0c, n0) = share(&c4, &c5);

    let load_report = load.finish(&rt);
    // The records are published every 50 ms: wait for the last beat.
    let st = settled(&sb, &[a, c], accepted(&st0, a) + load_report.started);
    report(
        &sb,
        &format!(
            "canary share: 10% set -> {:.2}% by the program ({n10c} of {n10}), {:.2}% by the \
             generations; 50% -> {:.2}% ({n50c} of {n50}); 0% -> {:.2}% ({n0c} of {n0}); load \
             {} connections, ok={} failed={}",
            share10 * 100.0,
            gen_share * 100.0,
            share50 * 100.0,
            share0 * 100.0,
            load_report.started,
            load_report.ok,
            load_report.failed
        ),
    );
    load_report.assert_clean("load across canary share changes");
    assert!(n10 >= 5000, "{n10} connections at 10%");
    assert!(
        (0.08..=0.12).contains(&share10),
        "10% set, the program sent {:.2}% ({n10c} of {n10})",
        share10 * 100.0
    );
    assert!(
        (0.08..=0.12).contains(&gen_share),
        "10% set, the generations accepted {:.2}% at the canary",
        gen_share * 100.0
    );
    assert!(
        (0.45..=0.55).contains(&share50),
        "50% set, the program sent {:.2}% ({n50c} of {n50})",
        share50 * 100.0
    );
    assert_eq!(n0c, 0, "0% set, the canary still got {n0c} of {n0}");
    // Every new connection was decided by the split and accepted by the
    // generation it was sent to: nothing fell back, nothing was lost.
    let c_end = canary_of(&st);
    assert_eq!(
        c_end.split_canary + c_end.split_active,
        load_report.started,
        "the program split {} connections, the clients opened {}",
        c_end.split_canary + c_end.split_active,
        load_report.started
    );
    assert_eq!(
        accepted(&st, c),
        c_end.split_canary,
        "the canary accepted what the program sent it"
    );
    assert_eq!(
        accepted(&st, a) - accepted(&st0, a),
        c_end.split_active,
        "the active generation accepted what the program sent it"
    );
    assert_eq!(st.counters.fallback_new, 0, "{:?}", st.counters);

    // The stats views name it too (status line).
    let text = sb.run_proxy_cmd(
        &["status", "-c", cfg.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert!(
        text.stdout
            .contains(&format!("canary: generation {c} (slot {})", canary.slot())),
        "{}",
        text.stdout
    );
    canary.signal(Signal::Term);
    active.signal(Signal::Term);
    canary.expect_exit(Duration::from_secs(10));
    active.expect_exit(Duration::from_secs(10));
}

/// `proxy promote` or `proxy abort` under load: the generation that leaves
/// (the old active one, or the canary) drains and exits, the other serves
/// every new connection, and no connection fails.
fn decide_under_load(test: &str, decision: &str, percent: &str) {
    let (sb, rt) = Sandbox::with_runtime(test);
    let _backend = Backend::start(&rt, Duration::ZERO);
    let (cfg, active, canary) = active_and_canary(&sb, percent);
    let promote = decision == "promote";
    let (mut leaving, mut staying) = if promote {
        (active, canary)
    } else {
        (canary, active)
    };
    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(30)));
    load.wait_ok(2000, Duration::from_secs(10));

    let out = admin(&sb, decision, &cfg, &[]);
    let done = if promote { "promoted" } else { "aborted" };
    assert!(out.contains(done), "{out}");
    let st = sb.wait_status(
        "the staying generation to be the only one steered to",
        Duration::from_secs(5),
        |st| st.is_serving(staying.generation()) && st.canary.is_none(),
    );
    assert_eq!(st.active_slot, Some(staying.slot()));
    let exit = leaving.expect_exit(Duration::from_secs(15));
    assert!(
        exit.success(),
        "leaving generation: {exit}; log:\n{}",
        leaving.log()
    );
    let after = load.ok();
    load.wait_ok(after + 2000, Duration::from_secs(10));
    let load_report = load.finish(&rt);
    report(
        &sb,
        &format!(
            "canary {decision}: {} connections, ok={} failed={}; the leaving generation accepted {}",
            load_report.started,
            load_report.ok,
            load_report.failed,
            leaving.final_accepted()
        ),
    );
    load_report.assert_clean(&format!("load across a canary {decision}"));
    assert!(
        leaving.final_accepted() > 0,
        "both generations served first"
    );
    if promote {
        assert!(
            staying
                .log()
                .contains("promoted: the canary is now the active generation"),
            "{}",
            staying.log()
        );
    }
    let st = settled(
        &sb,
        &[staying.generation()],
        load_report.started - leaving.final_accepted(),
    );
    assert_eq!(
        leaving.final_accepted() + accepted(&st, staying.generation()),
        load_report.started,
        "every connection accepted by one of the two generations"
    );
    staying.signal(Signal::Usr1);
    assert!(staying.expect_exit(Duration::from_secs(10)).success());
}

#[test]
fn promote_under_load_drains_the_old_generation() {
    decide_under_load("canary_promote", "promote", "10");
}

#[test]
fn abort_under_load_drains_the_canary() {
    decide_under_load("canary_abort", "abort", "30");
}

#[test]
fn refusals_name_the_problem_and_change_nothing() {
    let (sb, rt) = Sandbox::with_runtime("canary_refused");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::draining("10s"));
    let cfg_s = cfg.to_str().unwrap();
    let refused = |args: &[&str], expect: &str| {
        let out = sb.run_proxy_cmd(args, Duration::from_secs(15));
        assert!(
            !out.status.success() && out.stderr.contains(expect),
            "`proxy {}` must fail with {expect:?}; got {}: {}{}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr
        );
    };

    // No active generation to share with.
    refused(
        &["run", "-c", cfg_s, "--canary", "10"],
        "no active generation",
    );
    let mut active = Proxy::start(&sb, &cfg, &[]);
    active.wait_active(&sb, Duration::from_secs(10));
    refused(&["promote", "-c", cfg_s], "no canary generation is running");
    refused(&["abort", "-c", cfg_s], "no canary generation is running");
    refused(
        &["canary", "-c", cfg_s, "--weight", "5"],
        "no canary generation is running",
    );
    refused(
        &["run", "-c", cfg_s, "--canary", "150"],
        "percentage from 0 to 100",
    );
    refused(
        &["run", "-c", cfg_s, "--canary", "10", "-sf", "1"],
        "cannot be used with",
    );

    let mut canary = Proxy::start_canary(&sb, &cfg, "10", Duration::from_secs(10));
    refused(
        &["run", "-c", cfg_s, "--canary", "5"],
        &format!(
            "generation {} (slot {}) is already the canary",
            canary.generation(),
            canary.slot()
        ),
    );
    refused(
        &["canary", "-c", cfg_s, "--weight", "101"],
        "percentage from 0 to 100",
    );
    // Nothing changed: the same canary at the same share, the same active
    // generation, and traffic flows.
    let st = sb.status();
    let c = canary_of(&st);
    assert_eq!(
        (c.generation, c.weight_percent),
        (canary.generation(), 10.0)
    );
    assert!(st.is_serving(active.generation()), "{st:#?}");
    let load = Load::start(&rt, LoadSpec::new(1000.0, Duration::from_secs(10)));
    load.wait_ok(500, Duration::from_secs(10));
    load.finish(&rt).assert_clean("load after the refusals");
    canary.signal(Signal::Term);
    active.signal(Signal::Term);
    canary.expect_exit(Duration::from_secs(10));
    active.expect_exit(Duration::from_secs(10));
}

#[test]
fn a_canary_that_dies_leaves_the_split_at_once() {
    let (sb, rt) = Sandbox::with_runtime("canary_dies");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let (_cfg, mut active, mut canary) = active_and_canary(&sb, "50");
    canary.kill();
    let killed = Instant::now();
    let st = sb.wait_status(
        "the dead canary to leave the split",
        Duration::from_secs(3),
        |st| st.canary.is_none(),
    );
    let took = killed.elapsed();
    assert!(
        active
            .log()
            .contains("is gone or stalled: taken out of the split"),
        "{}",
        active.log()
    );
    let before = st.counters.clone();
    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(10)));
    load.wait_ok(2000, Duration::from_secs(10));
    let load_report = load.finish(&rt);
    let st = sb.status();
    report(
        &sb,
        &format!(
            "dead canary out of the split after {took:.2?}; then {} connections, ok={} failed={}",
            load_report.started, load_report.ok, load_report.failed
        ),
    );
    load_report.assert_clean("load after the canary died");
    let slot = active.slot() as usize;
    assert_eq!(
        st.counters.selected[slot] - before.selected[slot],
        load_report.started,
        "every new connection went to the active slot: {:?}",
        st.counters
    );
    assert_eq!(st.counters.fallback_new, before.fallback_new);
    active.signal(Signal::Usr1);
    assert!(active.expect_exit(Duration::from_secs(10)).success());
}

/// `unshare(1)` with a new PID namespace (as in separate_pid_namespaces).
const NEW_PIDNS: &[&str] = &["unshare", "--pid", "--fork", "--kill-child"];

/// A canary in its own PID namespace (a container without `--pid=host`):
/// it cannot see the active generation's PID nor be seen, yet it takes its
/// share, is promoted by `proxy promote --name` through the pinned maps, and
/// the old generation drains and exits; the stats views show the canary.
#[test]
fn canary_across_pid_namespaces_and_in_the_stats_views() {
    let (sb, rt) = Sandbox::with_runtime("canary_pidns");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let stats = "[stats]\nbind = \"127.0.0.1:8404\"\n";
    let cfg = sb.write_file(
        "proxy.toml",
        &config_text(&sb, &ProxyConfig::draining("10s"), "", stats),
    );
    let mut active = Proxy::start(&sb, &cfg, &[]);
    active.wait_active(&sb, Duration::from_secs(10));
    let mut canary =
        Proxy::start_canary_wrapped(&sb, NEW_PIDNS, &cfg, "25", Duration::from_secs(10));
    let st = sb.status();
    let rec = st.generation(canary.generation()).expect("canary record");
    assert!(
        rec.pid <= 2 && rec.pid != canary.pid,
        "the canary records its PID in its own namespace: {rec:?}"
    );
    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(30)));
    load.wait_ok(1500, Duration::from_secs(10));

    // The views, served by whichever generation the program picks.
    let json = proxy_harness::http_get::http_get_ok(
        "127.0.0.1:8404",
        "/stats.json",
        Duration::from_secs(5),
    )
    .0;
    let v: serde_json::Value = serde_json::from_str(&json.body).expect("stats.json parses");
    assert_eq!(
        v["canary"]["generation"].as_u64(),
        Some(canary.generation()),
        "{v:#}"
    );
    assert_eq!(v["canary"]["weight_percent"].as_f64(), Some(25.0), "{v:#}");
    let metrics =
        proxy_harness::http_get::http_get_ok("127.0.0.1:8404", "/metrics", Duration::from_secs(5))
            .0;
    let metrics = metrics.body;
    let weight = format!(
        "proxy_canary_weight_ratio{{instance=\"{}\",slot=\"{}\",generation=\"{}\"}} 0.25",
        sb.name,
        canary.slot(),
        canary.generation()
    );
    assert!(metrics.contains(&weight), "no {weight:?} in:\n{metrics}");
    let page =
        proxy_harness::http_get::http_get_ok("127.0.0.1:8404", "/", Duration::from_secs(5)).0;
    let page = page.body;
    assert!(
        page.contains("id=\"canary\"") && page.contains("share 25% set"),
        "{page}"
    );

    let out = sb.run_proxy_cmd(
        &[
            "promote",
            "--name",
            &sb.name,
            "--bpffs",
            sb.bpffs.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let exit = active.expect_exit(Duration::from_secs(15));
    assert!(
        exit.success(),
        "old generation: {exit}; log:\n{}",
        active.log()
    );
    sb.wait_status(
        "the namespaced canary to serve",
        Duration::from_secs(5),
        |st| st.is_serving(canary.generation()),
    );
    let after = load.ok();
    load.wait_ok(after + 1500, Duration::from_secs(10));
    let load_report = load.finish(&rt);
    report(
        &sb,
        &format!(
            "canary in its own PID namespace, promoted by name: {} connections, ok={} failed={}",
            load_report.started, load_report.ok, load_report.failed
        ),
    );
    load_report.assert_clean("load across a namespaced canary's promotion");
    // unshare ignores SIGTERM and forwards nothing: SIGKILL it, and
    // --kill-child takes the proxy with it.
    canary.kill();
}

/// The canary's backend: answers every request with a 502.
const BAD_BACKEND_ADDR: &str = "127.0.0.1:9002";

fn start_bad_backend(rt: &Runtime) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let listener = rt
        .block_on(TcpListener::bind(BAD_BACKEND_ADDR))
        .expect("binding the 502 backend");
    rt.spawn(async move {
        while !st.load(Ordering::Relaxed) {
            let Ok(Ok((mut s, _))) =
                tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
            else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbad\n",
                    )
                    .await;
            });
        }
    });
    stop
}

/// What HTTP clients saw: statuses by time, and failures (refused, reset,
/// truncated, timed out).
#[derive(Default)]
struct HttpSeen {
    statuses: Vec<(Instant, u16)>,
    failures: Vec<String>,
}

/// One `GET /` with `Connection: close`: the status of a complete response.
async fn get_once() -> Result<u16, String> {
    let mut s = TcpStream::connect(PROXY_ADDR)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: canary\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e} after {} bytes", got.len()))?;
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("truncated head: {text:?}"))?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| format!("no content-length: {head:?}"))?;
    if body.len() != length {
        return Err(format!("body of {} bytes, announced {length}", body.len()));
    }
    Ok(status)
}

/// New HTTP connections at `rate` per second until `stop` (bounded by
/// `max`), each with a 5 s deadline.
async fn http_load(rate: f64, max: Duration, stop: Arc<AtomicBool>, seen: Arc<Mutex<HttpSeen>>) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < max {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        n += 1;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(5), get_once())
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            let mut seen = seen.lock().unwrap();
            match result {
                Ok(status) => seen.statuses.push((Instant::now(), status)),
                Err(e) => seen.failures.push(e),
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[test]
fn a_canary_whose_backend_answers_502_is_aborted_automatically() {
    let (sb, rt) = Sandbox::with_runtime("canary_auto_abort");
    let _good = HttpBackend::start(&rt);
    let _bad = start_bad_backend(&rt);
    let judge = "[global.canary]\nwindow = \"3s\"\nmin_connections = 50\nmax_error_ratio = 2.0\nmin_error_rate = 0.05\n";
    let http = |backend: &str| {
        config_text(&sb, &ProxyConfig::draining("10s"), "", judge)
            .replace(
                "backend = \"app\"\n",
                "backend = \"app\"\nmode = \"http\"\n",
            )
            .replace("127.0.0.1:9000", backend)
    };
    let stable = sb.write_file("stable.toml", &http("127.0.0.1:9000"));
    let broken = sb.write_file("broken.toml", &http(BAD_BACKEND_ADDR));
    let mut active = Proxy::start(&sb, &stable, &[]);
    active.wait_active(&sb, Duration::from_secs(10));

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(HttpSeen::default()));
    let load = rt.spawn(http_load(
        400.0,
        Duration::from_secs(30),
        stop.clone(),
        seen.clone(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    let mut canary = Proxy::start_canary(&sb, &broken, "20", Duration::from_secs(10));
    let started = Instant::now();
    let exit = canary.expect_exit(Duration::from_secs(15));
    let aborted_after = started.elapsed();
    assert!(exit.success(), "canary: {exit}; log:\n{}", canary.log());
    let aborted_at = Instant::now();
    // Traffic after the abort: all from the stable generation.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(load).expect("the load task");
    let seen = seen.lock().unwrap();
    let bad = seen.statuses.iter().filter(|(_, s)| *s == 502).count();
    let late_bad = seen
        .statuses
        .iter()
        .filter(|(at, s)| *s != 200 && *at > aborted_at + Duration::from_millis(500))
        .count();
    let line = active
        .log()
        .lines()
        .find(|l| l.contains("ABORTED automatically"))
        .map(str::to_string);
    report(
        &sb,
        &format!(
            "auto-abort after {aborted_after:.2?}: {} responses ({bad} of them 502), {} failures; \
             decision: {}",
            seen.statuses.len(),
            seen.failures.len(),
            line.as_deref().unwrap_or("(none)")
        ),
    );
    assert!(
        seen.failures.is_empty(),
        "no connection may be refused, reset or truncated: {:?}",
        &seen.failures[..seen.failures.len().min(10)]
    );
    assert!(bad > 0, "the canary answered some requests with its 502s");
    assert_eq!(late_bad, 0, "no 502 once the canary was aborted");
    // Within the window (3 s) plus sampling and the drain.
    assert!(
        aborted_after < Duration::from_secs(10),
        "aborted after {aborted_after:?}"
    );
    let line = line.unwrap_or_else(|| panic!("no abort decision logged:\n{}", active.log()));
    // Every canary response was a 502; a connection still open when the
    // judge sampled is counted but its 502 not yet, so the rate may show a
    // little under 100%.
    let canary_rate: f64 = line
        .split("error rate ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no canary error rate in: {line}"));
    assert!(
        canary_rate >= 90.0 && line.contains("against the active generation's 0.00%"),
        "the decision gives both error rates: {line}"
    );
    let st = sb.status();
    assert!(
        st.canary.is_none() && st.is_serving(active.generation()),
        "{st:#?}"
    );
    active.signal(Signal::Usr1);
    assert!(active.expect_exit(Duration::from_secs(10)).success());
}

/// `promote_after`: a canary judged healthy over a window and running that
/// long is promoted by the active generation itself, which then drains.
#[test]
fn a_healthy_canary_is_promoted_after_promote_after() {
    let (sb, rt) = Sandbox::with_runtime("canary_promote_after");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let judge = "[global.canary]\nwindow = \"1s\"\nmin_connections = 20\npromote_after = \"2s\"\n";
    let cfg = sb.write_file(
        "proxy.toml",
        &config_text(&sb, &ProxyConfig::draining("10s"), "", judge),
    );
    let mut active = Proxy::start(&sb, &cfg, &[]);
    active.wait_active(&sb, Duration::from_secs(10));
    let load = Load::start(&rt, LoadSpec::new(1000.0, Duration::from_secs(30)));
    load.wait_ok(500, Duration::from_secs(10));
    let started = Instant::now();
    let mut canary = Proxy::start_canary(&sb, &cfg, "50", Duration::from_secs(10));
    let exit = active.expect_exit(Duration::from_secs(20));
    let promoted_after = started.elapsed();
    assert!(
        exit.success(),
        "old generation: {exit}; log:\n{}",
        active.log()
    );
    let line = active
        .log()
        .lines()
        .find(|l| l.contains("PROMOTED after 2s (promote_after)"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no promotion logged:\n{}", active.log()));
    assert!(line.contains("error rate 0.00%"), "{line}");
    sb.wait_status(
        "the promoted canary to serve",
        Duration::from_secs(5),
        |st| st.is_serving(canary.generation()) && st.canary.is_none(),
    );
    let after = load.ok();
    load.wait_ok(after + 500, Duration::from_secs(10));
    let load_report = load.finish(&rt);
    report(
        &sb,
        &format!(
            "promote_after 2s: old generation gone {promoted_after:.2?} after the canary started; \
             {} connections, ok={} failed={}",
            load_report.started, load_report.ok, load_report.failed
        ),
    );
    load_report.assert_clean("load across an automatic promotion");
    assert!(
        promoted_after >= Duration::from_secs(2),
        "promoted after {promoted_after:?}, before promote_after"
    );
    canary.signal(Signal::Usr1);
    assert!(canary.expect_exit(Duration::from_secs(10)).success());
}

/// A plain handover while a canary runs: the new generation takes the active
/// slot, the old active one drains and exits, and the canary keeps its
/// share beside the new active generation (which now judges it).
#[test]
fn a_handover_while_a_canary_runs_keeps_the_canary() {
    let (sb, rt) = Sandbox::with_runtime("canary_handover");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let (cfg, mut active, mut canary) = active_and_canary(&sb, "20");
    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(30)));
    load.wait_ok(1000, Duration::from_secs(10));
    let mut next = Proxy::start(&sb, &cfg, &[]);
    let next_id = next.wait_active(&sb, Duration::from_secs(10));
    let exit = active.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "old active: {exit}; log:\n{}", active.log());
    let st = sb.status();
    let c = canary_of(&st);
    assert_eq!(
        (c.generation, c.weight_percent, c.alive),
        (canary.generation(), 20.0, true),
        "{st:#?}"
    );
    assert_eq!(st.active_slot, Some(next_id.slot));
    let before = c.clone();
    let after = wait_split(&sb, &before, 2000, "2,000 more connections split");
    let (s, n_canary, n) = share(&before, canary_of(&after));
    let load_report = load.finish(&rt);
    report(
        &sb,
        &format!(
            "handover beside a canary: canary kept {:.1}% ({n_canary} of {n}); {} connections, ok={} failed={}",
            s * 100.0,
            load_report.started,
            load_report.ok,
            load_report.failed
        ),
    );
    load_report.assert_clean("load across a handover beside a canary");
    assert!((0.15..=0.25).contains(&s), "the canary's share: {s}");
    canary.signal(Signal::Term);
    next.signal(Signal::Term);
    canary.expect_exit(Duration::from_secs(10));
    next.expect_exit(Duration::from_secs(10));
}
