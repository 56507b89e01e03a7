//! Connections that wait, unaccepted, in the old generation's accept queue
//! when it closes its listener are migrated by the kernel to the new
//! generation (the steering program picks the target) instead of being reset.

use std::{sync::atomic::Ordering, time::Duration};

use proxy_harness::{
    Backend, Held, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal, exchange, next_id,
    procfs::accept_queues, report, wait_until,
};
use tokio::task::JoinSet;

/// Connections queued behind the one that holds gen 1's only permit.
const QUEUED: u64 = 100;

#[test]
fn queued_connections_migrate() {
    let (sb, rt) = Sandbox::with_runtime("queued");
    let backend = Backend::start(&rt, Duration::ZERO);
    // maxconn = 1: one open connection takes the generation's only permit,
    // and its accept loop stops calling accept() until it is released.
    let cfg = sb.write_config(
        "proxy.toml",
        &ProxyConfig {
            maxconn: Some(1),
            hard_stop_after: "30s",
            ..ProxyConfig::default()
        },
    );
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    gen1.wait_active(&sb, Duration::from_secs(10));

    // The held connection: half a request, so the backend cannot answer
    // and gen 1 keeps the connection (and the permit) open.
    let held = rt.block_on(Held::open(PROXY_ADDR, next_id()));
    wait_until(
        Duration::from_secs(5),
        || backend.stats.accepted.load(Ordering::Relaxed) == 1,
        || "gen 1 to accept the held connection and connect to the backend".into(),
    );

    // 100 complete requests: the kernel finishes their handshakes and
    // queues them on gen 1's listener, which does not accept them.
    let mut queued = JoinSet::new();
    for _ in 0..QUEUED {
        let id = next_id();
        queued.spawn_on(
            exchange(PROXY_ADDR, id, 200, Duration::from_secs(20)),
            rt.handle(),
        );
    }
    wait_until(
        Duration::from_secs(5),
        || accept_queues(8080).iter().sum::<u32>() == QUEUED as u32,
        || {
            format!(
                "{QUEUED} connections in gen 1's accept queue, queues: {:?}",
                accept_queues(8080)
            )
        },
    );
    // Still queued a moment later: gen 1 really does not accept them.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        accept_queues(8080),
        vec![QUEUED as u32],
        "expected one listener with {QUEUED} queued connections"
    );
    assert_eq!(
        backend.stats.accepted.load(Ordering::Relaxed),
        1,
        "gen 1 must not have forwarded any queued connection yet"
    );

    // Handover: gen 1 closes its listener after the grace; the kernel runs
    // the steering program for every queued connection and moves it to gen
    // 2's listener.
    let mut gen2 = Proxy::start(&sb, &cfg, &[]);
    let id2 = gen2.wait_active(&sb, Duration::from_secs(10));
    let results = rt.block_on(async {
        let mut results = Vec::new();
        while let Some(r) = queued.join_next().await {
            results.push(r.expect("a client task panicked"));
        }
        results
    });
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();

    let st = sb.status();
    let g1 = st
        .generation(gen1.generation())
        .expect("gen 1 record")
        .clone();
    let g2 = st.generation(id2.generation).expect("gen 2 record").clone();
    report(
        &sb,
        &format!(
            "queued_connections_migrate: {} of {QUEUED} queued connections served, gen 2 slot {}: migrated_in={} steered={} accepted={}; gen 1 state={} accepted={}",
            results.len() - failures.len(),
            g2.slot,
            g2.migrated_in,
            g2.steered,
            g2.accepted,
            g1.state,
            g1.accepted
        ),
    );
    assert!(
        failures.is_empty(),
        "expected all {QUEUED} queued connections to be served after the handover, {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Every queued connection was fully established in gen 1's accept
    // queue (we saw the queue hold exactly QUEUED), gen 1 never accepted
    // them, and no client connected after the flip: so each one went to gen
    // 2 through exactly one migration, and none was steered there as new.
    assert_eq!(
        g2.migrated_in, QUEUED,
        "gen 2's slot should count one migration per queued connection"
    );
    assert_eq!(g2.steered, 0, "no new connection was opened after the flip");
    assert_eq!(
        st.counters.fallback_migrate, 0,
        "no migration may fall back to the kernel's choice: {:?}",
        st.counters
    );

    // Gen 1 drains: it is still alive because of the held connection,
    // which it serves to the end.
    assert!(
        gen1.try_exit().is_none(),
        "gen 1 exited while a connection was in flight; log:\n{}",
        gen1.log()
    );
    assert_eq!(g1.state, "draining", "gen 1 should be draining: {g1:?}");
    rt.block_on(held.finish(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("the held connection was not served by draining gen 1: {e}"));
    let exit = gen1.expect_exit(Duration::from_secs(5));
    assert!(exit.success(), "gen 1 exited with {exit}");
    assert_eq!(
        gen1.final_accepted(),
        1,
        "gen 1 accepted only the held connection; final line: {:?}",
        gen1.final_line()
    );
    assert_eq!(gen1.final_field("cut"), 0, "gen 1 cut connections");
    assert_eq!(
        gen1.final_field("failed"),
        0,
        "gen 1 had failed connections"
    );

    gen2.signal(Signal::Usr1);
    assert!(gen2.expect_exit(Duration::from_secs(5)).success());
    assert_eq!(
        gen2.final_accepted(),
        QUEUED,
        "gen 2 accepted exactly the migrated connections"
    );
}
