//! HAProxy's pause/resume signals: SIGTTOU makes a generation stop
//! listening (standby), SIGTTIN makes it listen again and take the traffic
//! back through the steering program.

use std::time::Duration;

use proxy_harness::{
    Backend, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal, exchange, next_id,
    procfs::{accept_queues, cpu_usage},
    report,
};

#[test]
fn sigttou_sigttin() {
    let (sb, rt) = Sandbox::with_runtime("ttou");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::default());
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));
    let t = Duration::from_secs(5);
    rt.block_on(exchange(PROXY_ADDR, next_id(), 100, t))
        .expect("an exchange through the active generation");

    gen1.signal(Signal::Ttou);
    let st = sb.wait_status("gen 1 in standby", t, |st| {
        st.generation(id1.generation)
            .is_some_and(|g| g.state == "standby" && g.alive)
    });
    // It no longer listens: with no other generation, nothing accepts.
    assert!(
        accept_queues(8080).is_empty(),
        "no listener may remain on :8080 in standby: {:?}",
        accept_queues(8080)
    );
    let refused = rt.block_on(exchange(PROXY_ADDR, next_id(), 100, t));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("connect") && e.contains("refused")),
        "a connection to a standby-only instance must be refused, got {refused:?}"
    );

    gen1.signal(Signal::Ttin);
    let back = sb.wait_status("gen 1 active again", t, |st| st.is_serving(id1.generation));
    assert_eq!(accept_queues(8080).len(), 1, "gen 1 listens again");

    // An idle generation must be idle: a busy accept loop (accept() failing
    // with EAGAIN in a loop, e.g. on a readiness that never clears after
    // the listener was shut down and re-listened) would burn a core and
    // starve the connections spawned on its worker thread.
    let cpu = cpu_usage(gen1.pid, Duration::from_millis(500));
    let after = rt.block_on(exchange(PROXY_ADDR, next_id(), 100, t));
    report(
        &sb,
        &format!(
            "sigttou_sigttin: standby status {:?}, while in standby: {refused:?}; after SIGTTIN: active_slot={:?}, \
             idle CPU of gen 1 {:.0}% of a core, first exchange: {after:?}",
            st.generation(id1.generation).map(|g| g.state.clone()),
            back.active_slot,
            cpu * 100.0
        ),
    );
    assert!(
        cpu < 0.3,
        "gen 1 uses {:.0}% of a core while idle after SIGTTIN (expected < 30%): its accept loop spins",
        cpu * 100.0
    );
    after.unwrap_or_else(|e| panic!("the first exchange after SIGTTIN failed: {e}"));
    for _ in 0..20 {
        rt.block_on(exchange(PROXY_ADDR, next_id(), 100, t))
            .unwrap_or_else(|e| panic!("exchanges after SIGTTIN: {e}"));
    }
    gen1.signal(Signal::Usr1);
    assert!(gen1.expect_exit(t).success());
    assert_eq!(gen1.final_accepted(), 22, "1 exchange before, 21 after");
}
