//! `proxy run --log-json`: every line a generation writes to stderr is one
//! JSON object, and each client connection gets exactly one access line
//! (target "access") naming its client address, listener, server, bytes and
//! outcome; the lifecycle (active, soft-stop, stopped) is logged at info.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use proxy_harness::{
    BACKEND_ADDR, Backend, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal,
    backend::{expected_response, request},
    bodies::Rng,
    load::read_and_check,
    report,
};
use serde_json::Value;
use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};

/// Connections made through the generation.
const N: usize = 40;

/// What the client side knows about one connection.
#[derive(Debug)]
struct Made {
    sent: usize,
    received: usize,
}

#[test]
fn operator_logs() {
    let (sb, rt) = Sandbox::with_runtime("op-logs");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::default());

    let mut gen1 = Proxy::start_args(&sb, &cfg, &["--log-json"], &[]);
    let g1 = gen1.wait_active(&sb, Duration::from_secs(10));

    // N connections, each known by its client address.
    let made: BTreeMap<SocketAddr, Made> = rt.block_on(async {
        let mut tasks = JoinSet::new();
        for i in 0..N {
            tasks.spawn(async move {
                let id = proxy_harness::next_id();
                let payload = Rng::new(id).bytes(10 + i * 37);
                let req = request(id, &payload);
                let mut s = TcpStream::connect(PROXY_ADDR).await.expect("connect");
                let local = s.local_addr().expect("local address");
                s.write_all(&req).await.expect("write");
                tokio::time::timeout(Duration::from_secs(5), read_and_check(&mut s, id, &payload))
                    .await
                    .expect("response in time")
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                (
                    local,
                    Made {
                        sent: req.len(),
                        received: expected_response(id, &payload).len(),
                    },
                )
            });
        }
        let mut made = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (addr, m) = r.expect("client task");
            assert!(
                made.insert(addr, m).is_none(),
                "client address reused: {addr}"
            );
        }
        made
    });
    assert_eq!(made.len(), N);

    // Soft-stop, so that everything is logged and flushed.
    gen1.signal(Signal::Usr1);
    let exit = gen1.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation exited with {exit}");
    let log = gen1.log();
    report(
        &sb,
        &format!(
            "operator_logs: {} stderr lines; first: {}",
            log.lines().count(),
            log.lines().next().unwrap_or_default()
        ),
    );

    // Every line is a JSON object with a timestamp, a level, a target and
    // fields.
    let mut events = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line {} is not JSON ({e}): {line:?}", i + 1));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(
                v.get(key).is_some(),
                "stderr line {} has no {key:?}: {line}",
                i + 1
            );
        }
        assert!(v["fields"].is_object(), "fields is an object: {line}");
        events.push(v);
    }
    assert!(!events.is_empty(), "the generation logged nothing");

    // One access line per connection, matched by client address.
    let access: Vec<&Value> = events.iter().filter(|v| v["target"] == "access").collect();
    assert_eq!(
        access.len(),
        N,
        "expected one access line per connection ({N}), got {}:\n{}",
        access.len(),
        access
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut seen = BTreeMap::new();
    for v in &access {
        let f = &v["fields"];
        assert_eq!(v["level"], "INFO", "access lines are at info: {v}");
        let client: SocketAddr = f["client"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("access line without a client address: {v}"));
        let m = made
            .get(&client)
            .unwrap_or_else(|| panic!("access line for a client we never were: {v}"));
        assert_eq!(f["listener"], "front", "listener name: {v}");
        assert_eq!(f["server"], BACKEND_ADDR, "server: {v}");
        assert_eq!(f["outcome"], "ok", "outcome: {v}");
        assert_eq!(
            f["bytes_in"].as_u64(),
            Some(m.sent as u64),
            "bytes_in is what the client sent: {v}"
        );
        assert_eq!(
            f["bytes_out"].as_u64(),
            Some(m.received as u64),
            "bytes_out is what the client received: {v}"
        );
        assert!(f["duration_ms"].is_u64(), "duration_ms: {v}");
        *seen.entry(client).or_insert(0u32) += 1;
    }
    assert_eq!(seen.len(), N, "every connection has its own access line");

    // Lifecycle at info, with the numbers in fields.
    let message = |v: &Value| {
        v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let lifecycle = |needle: &str| {
        events
            .iter()
            .find(|v| v["level"] == "INFO" && message(v).contains(needle))
            .unwrap_or_else(|| panic!("no info line containing {needle:?} in:\n{log}"))
    };
    let active = lifecycle(": active");
    assert!(
        message(active).contains(&format!("generation {}", g1.generation)),
        "{active}"
    );
    lifecycle("flipped the active slot");
    lifecycle("soft-stop (SIGUSR1)");
    let stopped = lifecycle("generation stopped");
    assert_eq!(
        stopped["fields"]["accepted"].as_u64(),
        Some(N as u64),
        "the final line counts {N} accepted connections: {stopped}"
    );
    assert_eq!(stopped["fields"]["failed"].as_u64(), Some(0), "{stopped}");
    assert!(
        !events.iter().any(|v| v["level"] == "ERROR"),
        "no error lines expected:\n{log}"
    );
}
