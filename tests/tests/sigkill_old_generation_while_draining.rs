//! An old generation that is killed while it drains (an impatient operator,
//! the OOM killer) only loses its own in-flight connections: it no longer
//! listens, so new connections, which all go to the new generation, never
//! notice.

use std::time::{Duration, Instant};

use proxy_harness::{
    Backend, Held, Load, LoadSpec, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, next_id, report,
    wait_until,
};

#[test]
fn sigkill_old_generation_while_draining() {
    let (sb, rt) = Sandbox::with_runtime("killdrain");
    let backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config(
        "proxy.toml",
        &ProxyConfig {
            // Long enough that gen 1 is still draining when we kill it.
            hard_stop_after: "30s",
            ..ProxyConfig::default()
        },
    );
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));

    // An in-flight connection on gen 1 (half a request): it keeps gen 1
    // draining after the handover.
    let held = rt.block_on(Held::open(PROXY_ADDR, next_id()));
    wait_until(
        Duration::from_secs(5),
        || {
            backend
                .stats
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        },
        || "gen 1 to forward the held connection".into(),
    );

    let load = Load::start(&rt, LoadSpec::new(2000.0, Duration::from_secs(30)));
    load.wait_ok(500, Duration::from_secs(10));

    let mut gen2 = Proxy::start(&sb, &cfg, &[]);
    let id2 = gen2.wait_active(&sb, Duration::from_secs(10));
    let draining = sb.wait_status("gen 1 draining", Duration::from_secs(5), |st| {
        st.generation(id1.generation)
            .is_some_and(|g| g.state == "draining" && g.active_conns >= 1)
    });
    let g1 = draining.generation(id1.generation).unwrap().clone();
    // Let the load run against gen 2 alone for a moment, then kill gen 1.
    let ok_before = load.ok();
    load.wait_ok(ok_before + 300, Duration::from_secs(10));
    let killed_at = Instant::now();
    gen1.kill();

    // The killed generation's heartbeat goes stale: status calls it dead.
    let dead = sb.wait_status("gen 1 reported dead", Duration::from_secs(5), |st| {
        st.generation(id1.generation).is_some_and(|g| !g.alive)
    });
    let ok_kill = load.ok();
    load.wait_ok(ok_kill + 1000, Duration::from_secs(10));
    let rep = load.finish(&rt);

    // The held connection belonged to gen 1: it is cut, not answered.
    let held_result = rt.block_on(held.finish(Duration::from_secs(5)));
    let st = sb.status();
    report(
        &sb,
        &format!(
            "sigkill_old_generation_while_draining: gen 1 killed while draining ({} open), status then: {:?}; \
             load {} conns at {:.0}/s ok={} failed={}; held connection after the kill: {:?}; load after kill ran {:.2?}",
            g1.active_conns,
            dead.generation(id1.generation).map(|g| g.state.clone()),
            rep.started,
            rep.rate(),
            rep.ok,
            rep.failed,
            held_result,
            killed_at.elapsed()
        ),
    );
    rep.assert_clean("new connections while the draining gen 1 was killed");
    assert!(
        held_result.is_err(),
        "the held connection of the killed gen 1 cannot have been answered"
    );
    assert!(
        st.is_serving(id2.generation),
        "gen 2 must be active: {st:#?}"
    );
    assert_eq!(st.counters.fallback_new, 0, "{:?}", st.counters);
    assert!(gen2.try_exit().is_none(), "gen 2 must still run");
}
