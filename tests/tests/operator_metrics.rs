//! The stats listener's machine views across handovers: `/metrics` parsed by
//! a real Prometheus text-format parser (Python's `prometheus_client`) and
//! `/stats.json` parsed with serde. Scraped repeatedly before, during and
//! after three handovers under load: every counter (`*_total`) of every label
//! set never decreases from one scrape to the next, and at the end the
//! listener and server totals count every connection the load made, through
//! all four generations.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use proxy_harness::{
    BACKEND_ADDR, Backend, Load, LoadSpec, Proxy, ProxyConfig, Sandbox, Signal,
    config::{STATS_ADDR, config_text},
    http_get::http_get_ok,
    prometheus::{PromFamily, PromSample, parse_prometheus},
    report,
    status::StatsJson,
};

/// Handovers under load.
const HANDOVERS: usize = 3;
const RATE: f64 = 800.0;
/// Pause between scrapes outside the handovers. While a handover is under
/// way the test scrapes back to back (a few milliseconds each), so that the
/// moments the new generation claims its slot and the old one retires are
/// seen; it looks at the processes every [`CHECK_EVERY`].
const SLOW: Duration = Duration::from_millis(150);
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// A second listener (no traffic) with its own stats page showing only it.
const SIDE_ADDR: &str = "127.0.0.1:8081";
const SIDE_STATS_ADDR: &str = "127.0.0.1:8405";

/// `proxy_ebpf_steered_total` and `proxy_ebpf_migrated_total` count per
/// slot "since the slot's generation claimed it"; they carry the generation
/// as a label, so a reused slot starts a new series instead of resetting
/// one. Set this to true to tolerate (and report) a decrease of those two
/// families when the slot changed owner between two scrapes.
const TOLERATE_SLOT_REUSE_RESETS: bool = false;

/// Gauges and counters the exposition must declare (counter families as
/// prometheus_client names them: without `_total`), with their labels
/// besides `instance`.
const GAUGES: &[(&str, &[&str])] = &[
    ("proxy_steering_ebpf", &[]),
    (
        "proxy_generation_info",
        &["slot", "generation", "state", "active"],
    ),
    ("proxy_listener_current_connections", &["listener"]),
    ("proxy_listener_compression_ratio", &["listener"]),
    ("proxy_server_current_connections", &["backend", "server"]),
    ("proxy_server_up", &["backend", "server"]),
];
const COUNTERS: &[(&str, &[&str])] = &[
    ("proxy_generation_accepted_connections", &["generation"]),
    ("proxy_listener_connections", &["listener"]),
    ("proxy_listener_received_bytes", &["listener"]),
    ("proxy_listener_sent_bytes", &["listener"]),
    ("proxy_listener_errors", &["listener"]),
    ("proxy_listener_tls_handshakes", &["listener"]),
    ("proxy_listener_tls_handshake_failures", &["listener"]),
    ("proxy_listener_proxy_header_errors", &["listener"]),
    ("proxy_listener_http_requests", &["listener"]),
    ("proxy_server_connections", &["backend", "server"]),
    ("proxy_server_received_bytes", &["backend", "server"]),
    ("proxy_server_sent_bytes", &["backend", "server"]),
    ("proxy_server_connect_errors", &["backend", "server"]),
    ("proxy_ebpf_steered", &["slot", "generation"]),
    ("proxy_ebpf_migrated", &["slot", "generation"]),
    ("proxy_ebpf_fallback", &["kind"]),
];

/// One scrape of `/metrics`.
struct Scrape {
    at: Duration,
    phase: String,
    text: String,
}

struct Scraper<'a> {
    start: Instant,
    scrapes: Vec<Scrape>,
    /// Attempts that failed before a scrape succeeded (connection reset or
    /// refused while a stats socket closes), with when and why.
    failed_attempts: Vec<String>,
    sb: &'a Sandbox,
}

impl Scraper<'_> {
    fn scrape(&mut self, phase: &str) -> &str {
        let (r, failed) = http_get_ok(STATS_ADDR, "/metrics", Duration::from_secs(5));
        let at = self.start.elapsed();
        self.failed_attempts.extend(
            failed
                .into_iter()
                .map(|e| format!("{phase} at {at:.2?}: {e}")),
        );
        let ctype = r.header("content-type").unwrap_or_default();
        assert!(
            ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
            "/metrics content type: {ctype:?}"
        );
        self.scrapes.push(Scrape {
            at: self.start.elapsed(),
            phase: phase.to_string(),
            text: r.body,
        });
        &self.scrapes.last().expect("just pushed").text
    }
}

#[test]
fn operator_metrics() {
    let (sb, rt) = Sandbox::with_runtime("op-metrics");
    let backend = Backend::start(&rt, Duration::ZERO);
    let text = config_text(
        &sb,
        &ProxyConfig::draining("10s"),
        "",
        &format!(
            "[stats]\nbanner = \"metrics under handovers\"\n\n\
             [[listener]]\nname = \"side\"\nbind = [\"{SIDE_ADDR}\"]\nbackend = \"app\"\n\n\
             [listener.stats]\nbind = \"{SIDE_STATS_ADDR}\"\nbanner = \"side listener only\"\n"
        ),
    );
    let cfg = sb.write_file("proxy.toml", &text);

    let mut current = Proxy::start(&sb, &cfg, &[]);
    current.wait_active(&sb, Duration::from_secs(10));
    let mut generations = vec![current.generation()];
    let mut sc = Scraper {
        start: Instant::now(),
        scrapes: Vec::new(),
        failed_attempts: Vec::new(),
        sb: &sb,
    };
    // Before any traffic: the families are declared already.
    // Parsed at once too, so that a missing prometheus_client fails early.
    let idle = sc.scrape("idle").to_string();
    check_families(&sb, &parse_prometheus(&[idle])[0], "the idle scrape");

    let load = Load::start(&rt, LoadSpec::new(RATE, Duration::from_secs(40)));
    load.wait_ok(200, Duration::from_secs(10));
    for _ in 0..4 {
        sc.scrape("before");
        std::thread::sleep(SLOW);
    }

    // Handovers, scraping all along.
    let mut during = Vec::new();
    for h in 1..=HANDOVERS {
        let mut next = Proxy::start(&sb, &cfg, &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = sc.scrapes.len();
        let phase = format!("handover {h}");
        loop {
            let checked = Instant::now();
            while checked.elapsed() < CHECK_EVERY {
                sc.scrape(&phase);
            }
            let next_active = next.gen_id_from_log().is_some();
            let old_gone = current.try_exit().is_some();
            if next_active && old_gone {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "handover {h}: new generation active: {next_active}, old one exited: {old_gone}; new log:\n{}\nold log:\n{}",
                next.log(),
                current.log()
            );
        }
        let exit = current.expect_exit(Duration::from_secs(1));
        assert!(
            exit.success(),
            "generation {} exited with {exit}",
            current.generation()
        );
        next.wait_active(&sb, Duration::from_secs(10));
        generations.push(next.generation());
        during.push(sc.scrapes.len() - first);
        current = next;
        for _ in 0..3 {
            sc.scrape(&format!("after handover {h}"));
            std::thread::sleep(SLOW);
        }
    }
    let lr = load.finish(&rt);
    // Everything the load made is counted now: the exited generations
    // published at their stop, the live one publishes before answering.
    sc.scrape("after the load");
    let final_json_reply = http_get_ok(STATS_ADDR, "/stats.json", Duration::from_secs(5)).0;
    sc.scrape("final");
    let failed_attempts = std::mem::take(&mut sc.failed_attempts);
    let scrapes = std::mem::take(&mut sc.scrapes);
    let _ = sc.sb;

    report(
        &sb,
        &format!(
            "operator_metrics: load started={} ok={} failed={} ({:.0}/s); generations {generations:?}; {} scrapes ({} during the handovers: {during:?}), {} scrape attempts failed and were retried {failed_attempts:?}",
            lr.started,
            lr.ok,
            lr.failed,
            lr.rate(),
            scrapes.len(),
            during.iter().sum::<usize>(),
            failed_attempts.len(),
        ),
    );
    lr.assert_clean("load during the handovers");

    // Parse every scrape with prometheus_client.
    let texts: Vec<String> = scrapes.iter().map(|s| s.text.clone()).collect();
    let parsed = parse_prometheus(&texts);
    assert_eq!(parsed.len(), scrapes.len(), "one parse per scrape");
    for (i, fams) in parsed.iter().enumerate() {
        check_families(&sb, fams, &format!("scrape {i} ({})", scrapes[i].phase));
    }

    // Counters never go back, label set by label set.
    let mut decreases = Vec::new();
    let mut slot_resets = Vec::new();
    for i in 1..parsed.len() {
        let (before, after) = (counters(&parsed[i - 1]), counters(&parsed[i]));
        let (owners_before, owners_after) = (slot_owners(&parsed[i - 1]), slot_owners(&parsed[i]));
        for (key, &now) in &after {
            if let Some(&was) = before.get(key)
                && now < was
            {
                let line = format!(
                    "{key}: {was} -> {now} between scrape {} ({}, {:?}) and scrape {i} ({}, {:?}); slot owners {owners_before:?} -> {owners_after:?}",
                    i - 1,
                    scrapes[i - 1].phase,
                    scrapes[i - 1].at,
                    scrapes[i].phase,
                    scrapes[i].at,
                );
                // The new owner's record is written a little after the
                // counters were reset (a few scrapes later under load): a
                // reset is explained when the slot shows another owner in
                // this scrape or in one of the next ones.
                let slot_reused = (key.starts_with("proxy_ebpf_steered_total{")
                    || key.starts_with("proxy_ebpf_migrated_total{"))
                    && slot_label(key).is_some_and(|slot| {
                        parsed[i..parsed.len().min(i + 200)]
                            .iter()
                            .any(|f| slot_owners(f).get(&slot) != owners_before.get(&slot))
                    });
                if TOLERATE_SLOT_REUSE_RESETS && slot_reused {
                    slot_resets.push(line);
                } else {
                    decreases.push(line);
                }
            }
        }
    }
    for line in &slot_resets {
        report(
            &sb,
            &format!(
                "  KNOWN PROXY BUG (tolerated): per-slot eBPF counter reset on slot reuse: {line}"
            ),
        );
    }
    for line in &decreases {
        report(&sb, &format!("  COUNTER DECREASE: {line}"));
    }

    // Every generation took part in a scrape; during each handover the two
    // generations showed up live together at least once.
    let seen_gens: BTreeSet<u64> = parsed
        .iter()
        .flat_map(|f| gen_info(f).into_iter().map(|(g, _, _)| g))
        .collect();
    for g in &generations {
        assert!(
            seen_gens.contains(g),
            "generation {g} never showed in /metrics"
        );
    }
    for h in 1..=HANDOVERS {
        let phase = format!("handover {h}");
        let both = scrapes
            .iter()
            .zip(&parsed)
            .filter(|(s, _)| s.phase == phase)
            .any(|(_, f)| {
                gen_info(f)
                    .iter()
                    .filter(|(_, state, _)| state != "stopped")
                    .count()
                    >= 2
            });
        assert!(
            both,
            "no scrape during handover {h} showed two live generations"
        );
    }

    // The final figures count every connection of the load, through all
    // the generations.
    let last = counters(parsed.last().expect("scrapes"));
    let listener_label = format!("instance={},listener=front", sb.name);
    let server_label = format!("backend=app,instance={},server={BACKEND_ADDR}", sb.name);
    let get = |name: &str, labels: &str| -> f64 {
        *last
            .get(&format!("{name}{{{labels}}}"))
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in the last scrape: {last:#?}"))
    };
    let listener_total = get("proxy_listener_connections_total", &listener_label);
    assert!(
        listener_total >= lr.started as f64,
        "the listener total ({listener_total}) counts at least the {} connections of the load",
        lr.started
    );
    assert_eq!(
        listener_total, lr.started as f64,
        "nothing but the load connected to the listener, no connection counted twice"
    );
    let backend_accepted = backend
        .stats
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        get("proxy_server_connections_total", &server_label),
        backend_accepted as f64,
        "the server total is what the backend accepted"
    );
    assert_eq!(
        get("proxy_listener_errors_total", &listener_label),
        0.0,
        "no errors"
    );
    assert!(get("proxy_listener_received_bytes_total", &listener_label) > 0.0);
    assert!(get("proxy_listener_sent_bytes_total", &listener_label) > 0.0);
    // Client bytes in = server bytes out (a byte-for-byte relay), both ways.
    assert_eq!(
        get("proxy_listener_received_bytes_total", &listener_label),
        get("proxy_server_sent_bytes_total", &server_label),
        "bytes from clients = bytes to the server"
    );
    assert_eq!(
        get("proxy_listener_sent_bytes_total", &listener_label),
        get("proxy_server_received_bytes_total", &server_label),
        "bytes to clients = bytes from the server"
    );
    for kind in ["new", "migrate"] {
        assert_eq!(
            get(
                "proxy_ebpf_fallback_total",
                &format!("instance={},kind={kind}", sb.name)
            ),
            0.0,
            "no fallback to the kernel hash ({kind})"
        );
    }
    let final_gens = gen_info(parsed.last().expect("scrapes"));
    let newest = *generations.last().expect("generations");
    assert!(
        final_gens
            .iter()
            .any(|(g, state, active)| *g == newest && state == "active" && *active),
        "the last generation is the active one: {final_gens:?}"
    );
    assert_eq!(
        final_gens.iter().filter(|(_, _, active)| *active).count(),
        1,
        "exactly one active generation: {final_gens:?}"
    );

    // /stats.json, read between the last two scrapes.
    assert!(
        final_json_reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "/stats.json content type: {:?}",
        final_json_reply.header("content-type")
    );
    let json: StatsJson = serde_json::from_str(&final_json_reply.body).unwrap_or_else(|e| {
        panic!(
            "/stats.json does not parse ({e}):\n{}",
            final_json_reply.body
        )
    });
    assert_eq!(json.instance, sb.name);
    assert_eq!(json.banner, "metrics under handovers");
    assert_eq!(json.steering, "ebpf");
    let front = json.listener("front");
    assert_eq!(
        front.total, lr.started,
        "/stats.json listener total: {front:?}"
    );
    assert_eq!(front.current, 0, "no connection open: {front:?}");
    assert_eq!(front.errors, 0);
    assert_eq!(
        front.bytes_in as f64,
        get("proxy_listener_received_bytes_total", &listener_label),
        "JSON and Prometheus agree on bytes in"
    );
    let server = json
        .servers
        .iter()
        .find(|s| s.backend == "app" && s.server == BACKEND_ADDR)
        .unwrap_or_else(|| panic!("no server app/{BACKEND_ADDR}: {json:#?}"));
    assert!(server.up, "{server:?}");
    assert_eq!(server.total, backend_accepted, "{server:?}");
    let active: Vec<_> = json.generations.iter().filter(|g| g.active).collect();
    assert_eq!(active.len(), 1, "one active generation: {json:#?}");
    assert_eq!(active[0].generation, newest);
    assert_eq!(json.active_slot, Some(active[0].slot));
    let ebpf = json.ebpf.as_ref().expect("eBPF counters in /stats.json");
    assert_eq!(ebpf.selected.len(), 8);
    assert_eq!(ebpf.migrated.len(), 8);
    assert_eq!((ebpf.fallback_new, ebpf.fallback_migrate), (0, 0));
    assert_eq!(json.history_interval_ms, 2000);
    assert!(
        json.history.iter().any(|s| !s.points.is_empty()),
        "a history of new connections after several seconds of load: {:?}",
        json.history
    );
    let history_total: u64 = json
        .history
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .sum();
    assert!(
        history_total <= lr.started,
        "the history counts no more connections ({history_total}) than were made ({})",
        lr.started
    );

    // The side listener's own stats page shows only it (and its backend's
    // servers), for the same instance.
    let side = http_get_ok(SIDE_STATS_ADDR, "/stats.json", Duration::from_secs(5)).0;
    let side: StatsJson = serde_json::from_str(&side.body).unwrap_or_else(|e| {
        panic!(
            "{SIDE_STATS_ADDR}/stats.json does not parse ({e}):\n{}",
            side.body
        )
    });
    assert_eq!(side.instance, sb.name);
    assert_eq!(side.banner, "side listener only");
    let names: Vec<&str> = side.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["side"],
        "the per-listener page shows only its listener"
    );
    assert_eq!(
        side.listener("side").total,
        0,
        "no traffic went to the side listener"
    );
    assert_eq!(
        side.servers.len(),
        1,
        "the servers of its backend: {:?}",
        side.servers
    );
    let side_metrics = http_get_ok(SIDE_STATS_ADDR, "/metrics", Duration::from_secs(5)).0;
    let side_fams = &parse_prometheus(&[side_metrics.body])[0];
    let side_listeners: BTreeSet<&str> = side_fams
        .iter()
        .flat_map(|f| &f.samples)
        .filter_map(|s| s.labels.get("listener").map(String::as_str))
        .collect();
    assert_eq!(
        side_listeners,
        BTreeSet::from(["side"]),
        "{SIDE_STATS_ADDR}/metrics shows only the side listener"
    );

    // Last: counters never went back (reported above as they were found).
    assert!(
        decreases.is_empty(),
        "{} counter decreases across {} scrapes (the final totals were right):\n{}",
        decreases.len(),
        parsed.len(),
        decreases.join("\n")
    );

    // Stop the last generation.
    current.signal(Signal::Usr1);
    let exit = current.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "last generation exited with {exit}");
}

/// Checks declared families, types, labels and the instance label.
fn check_families(sb: &Sandbox, fams: &[PromFamily], what: &str) {
    let by_name: BTreeMap<&str, &PromFamily> = fams.iter().map(|f| (f.name.as_str(), f)).collect();
    for (kind, list) in [("gauge", GAUGES), ("counter", COUNTERS)] {
        for (name, labels) in list {
            let f = by_name.get(name).unwrap_or_else(|| {
                panic!("{what}: no family {name}; families: {:?}", by_name.keys())
            });
            assert_eq!(f.kind, kind, "{what}: {name} is a {kind}");
            assert!(!f.help.is_empty(), "{what}: {name} has a HELP text");
            let want: BTreeSet<&str> = labels.iter().copied().chain(["instance"]).collect();
            for s in &f.samples {
                let have: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
                assert_eq!(have, want, "{what}: labels of {s:?}");
                assert_eq!(
                    s.labels["instance"], sb.name,
                    "{what}: instance label of {s:?}"
                );
                assert!(s.value.is_finite() && s.value >= 0.0, "{what}: {s:?}");
                if kind == "counter" {
                    assert_eq!(s.name, format!("{name}_total"), "{what}: {s:?}");
                }
            }
        }
    }
    // Every `*_total` sample belongs to a counter family.
    for f in fams {
        for s in &f.samples {
            if s.name.ends_with("_total") {
                assert_eq!(f.kind, "counter", "{what}: {} is typed {}", s.name, f.kind);
            }
        }
    }
    let one = |name: &str| -> &PromSample {
        let f = by_name[name];
        assert_eq!(f.samples.len(), 1, "{what}: one sample of {name}");
        &f.samples[0]
    };
    assert_eq!(
        one("proxy_steering_ebpf").value,
        1.0,
        "{what}: eBPF steering"
    );
    let listeners: Vec<&str> = by_name["proxy_listener_connections"]
        .samples
        .iter()
        .map(|s| s.labels["listener"].as_str())
        .collect();
    assert_eq!(listeners, ["front", "side"], "{what}: listeners");
    let servers: Vec<(&str, &str)> = by_name["proxy_server_connections"]
        .samples
        .iter()
        .map(|s| (s.labels["backend"].as_str(), s.labels["server"].as_str()))
        .collect();
    assert_eq!(servers, [("app", BACKEND_ADDR)], "{what}: servers");
    // One series per generation holding a slot, labelled with both.
    let listed: BTreeSet<(String, String)> = by_name["proxy_generation_info"]
        .samples
        .iter()
        .map(|s| (s.labels["slot"].clone(), s.labels["generation"].clone()))
        .collect();
    for name in ["proxy_ebpf_steered", "proxy_ebpf_migrated"] {
        let series: BTreeSet<(String, String)> = by_name[name]
            .samples
            .iter()
            .map(|s| (s.labels["slot"].clone(), s.labels["generation"].clone()))
            .collect();
        assert_eq!(
            series, listed,
            "{what}: {name} has one series per (slot, generation)"
        );
    }
    let kinds: BTreeSet<&str> = by_name["proxy_ebpf_fallback"]
        .samples
        .iter()
        .map(|s| s.labels["kind"].as_str())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["new", "migrate"]), "{what}");
    // Every generation listed is also counted, and the other way round.
    let info: BTreeSet<u64> = gen_info(fams).iter().map(|g| g.0).collect();
    let counted: BTreeSet<u64> = by_name["proxy_generation_accepted_connections"]
        .samples
        .iter()
        .map(|s| s.labels["generation"].parse().expect("generation number"))
        .collect();
    assert_eq!(info, counted, "{what}: generations in info and accepted");
    assert!(!info.is_empty(), "{what}: at least one generation");
    assert!(
        gen_info(fams).iter().filter(|g| g.2).count() <= 1,
        "{what}: at most one active generation: {:?}",
        gen_info(fams)
    );
}

/// Every counter sample: `name{k=v,...}` (labels sorted) -> value.
fn counters(fams: &[PromFamily]) -> BTreeMap<String, f64> {
    fams.iter()
        .filter(|f| f.kind == "counter")
        .flat_map(|f| &f.samples)
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (format!("{}{{{}}}", s.name, labels.join(",")), s.value)
        })
        .collect()
}

/// (generation, state, active) of `proxy_generation_info`.
fn gen_info(fams: &[PromFamily]) -> Vec<(u64, String, bool)> {
    fams.iter()
        .filter(|f| f.name == "proxy_generation_info")
        .flat_map(|f| &f.samples)
        .map(|s| {
            (
                s.labels["generation"].parse().expect("generation number"),
                s.labels["state"].clone(),
                s.labels["active"] == "true",
            )
        })
        .collect()
}

/// The `slot` label of a `name{k=v,...}` key.
fn slot_label(key: &str) -> Option<String> {
    key.trim_end_matches('}')
        .split(['{', ','])
        .find_map(|kv| kv.strip_prefix("slot="))
        .map(str::to_string)
}

/// slot -> generation of `proxy_generation_info`.
fn slot_owners(fams: &[PromFamily]) -> BTreeMap<String, String> {
    fams.iter()
        .filter(|f| f.name == "proxy_generation_info")
        .flat_map(|f| &f.samples)
        .map(|s| (s.labels["slot"].clone(), s.labels["generation"].clone()))
        .collect()
}
