//! HAProxy-style manual rollback: the old generation, kept warm in standby
//! (SIGTTOU while it was still in its handover grace), takes the traffic back
//! with SIGTTIN. The newer generation sees an older live generation holding
//! the active slot and stands by instead of fighting over the slot. Under a
//! bounded load, not one connection fails.

use std::time::Duration;

use proxy_harness::{
    Backend, Load, LoadSpec, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal, exchange, next_id,
    report,
};

#[test]
fn manual_rollback_with_sigttin() {
    let (sb, rt) = Sandbox::with_runtime("rollback-ttin");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config(
        "proxy.toml",
        &ProxyConfig {
            // Gen 1 keeps listening this long after gen 2 is active: the
            // window in which the operator parks it in standby.
            handover_grace: "5s",
            ..ProxyConfig::default()
        },
    );
    let t = Duration::from_secs(10);
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, t);
    let load = Load::start(&rt, LoadSpec::new(1000.0, Duration::from_secs(30)));
    load.wait_ok(300, t);

    let mut gen2 = Proxy::start(&sb, &cfg, &[]);
    let id2 = gen2.wait_active(&sb, t);
    // Park gen 1: it stops listening (its queue migrates to gen 2) but stays.
    gen1.signal(Signal::Ttou);
    sb.wait_status("gen 1 in standby, gen 2 serving", t, |st| {
        st.is_serving(id2.generation)
            && st
                .generation(id1.generation)
                .is_some_and(|g| g.state == "standby" && g.alive)
    });
    let ok = load.ok();
    load.wait_ok(ok + 500, t);
    // Past gen 1's grace: a standby generation is not soft-stopped by it.
    std::thread::sleep(Duration::from_secs(1));

    // Roll back.
    gen1.signal(Signal::Ttin);
    let st = sb.wait_status("gen 1 active again, gen 2 standing by", t, |st| {
        st.is_serving(id1.generation)
            && st
                .generation(id2.generation)
                .is_some_and(|g| g.state == "standby" && g.alive)
    });
    let ok = load.ok();
    load.wait_ok(ok + 1000, t);
    // And it stays that way: no flip-flopping between the two.
    std::thread::sleep(Duration::from_millis(500));
    let later = sb.status();
    assert!(
        later.is_serving(id1.generation),
        "gen 1 must keep the active slot after the rollback: {later:?}"
    );
    let rep = load.finish(&rt);
    report(
        &sb,
        &format!(
            "manual_rollback_with_sigttin: load {} conns at {:.0}/s ok={} failed={}; after SIGTTIN active_slot={:?}",
            rep.started,
            rep.rate(),
            rep.ok,
            rep.failed,
            st.active_slot
        ),
    );
    rep.assert_clean("load across a handover and a manual rollback");

    // The rolled-back-from generation leaves on request; gen 1 serves on.
    gen2.signal(Signal::Usr1);
    assert!(gen2.expect_exit(t).success(), "gen 2 exits cleanly");
    rt.block_on(exchange(PROXY_ADDR, next_id(), 100, Duration::from_secs(5)))
        .expect("gen 1 serves after gen 2 left");
    gen1.signal(Signal::Usr1);
    assert!(gen1.expect_exit(t).success(), "gen 1 exits cleanly");
}
