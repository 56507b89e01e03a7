//! Generations in different PID namespaces (as with containers) hand over
//! through the pinned maps alone: the old one cannot see, let alone signal,
//! the new one's PID, yet it notices the takeover and exits by itself.
//! Both directions: host -> namespaced -> host.

use std::time::Duration;

use proxy_harness::{Backend, Load, LoadSpec, Proxy, ProxyConfig, Sandbox, Signal, report};

/// `unshare(1)` with a new PID namespace; `--kill-child` so that killing the
/// wrapper (the process the guard knows) kills the proxy too.
const NEW_PIDNS: &[&str] = &["unshare", "--pid", "--fork", "--kill-child"];

#[test]
fn separate_pid_namespaces() {
    let (sb, rt) = Sandbox::with_runtime("pidns");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::draining("10s"));

    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));
    let load = Load::start(&rt, LoadSpec::new(2000.0, Duration::from_secs(40)));
    load.wait_ok(500, Duration::from_secs(10));

    // Gen 2 in its own PID namespace: it is PID 1 there.
    let mut gen2 = Proxy::start_wrapped(&sb, NEW_PIDNS, &cfg, &[]);
    let id2 = gen2.wait_active(&sb, Duration::from_secs(10));
    let st = sb.status();
    let g2 = st.generation(id2.generation).expect("gen 2 record").clone();
    assert!(
        g2.pid != gen2.pid && g2.pid <= 2,
        "gen 2 must record its PID as seen in its own namespace (1), not a host PID: {g2:?}"
    );
    // Gen 1 learns of it from the maps only (no -sf, no signal) and exits.
    let exit1 = gen1.expect_exit(Duration::from_secs(15));
    assert!(
        exit1.success(),
        "gen 1 exited with {exit1}; log:\n{}",
        gen1.log()
    );
    assert!(
        gen1.log()
            .contains(&format!("replaced by generation {}", id2.generation)),
        "gen 1 must say it was replaced by generation {}; log:\n{}",
        id2.generation,
        gen1.log()
    );
    let ok_mid = load.ok();
    load.wait_ok(ok_mid + 500, Duration::from_secs(10));

    // And back: gen 3 on the host replaces the namespaced gen 2, whose
    // record carries a PID that means nothing here.
    let mut gen3 = Proxy::start(&sb, &cfg, &[]);
    let id3 = gen3.wait_active(&sb, Duration::from_secs(10));
    let exit2 = gen2.expect_exit(Duration::from_secs(15));
    assert!(
        exit2.success(),
        "gen 2 (and its unshare wrapper) exited with {exit2}; log:\n{}",
        gen2.log()
    );
    let ok_end = load.ok();
    load.wait_ok(ok_end + 500, Duration::from_secs(10));
    let rep = load.finish(&rt);

    let st = sb.status();
    report(
        &sb,
        &format!(
            "separate_pid_namespaces: gens {} (host) -> {} (pid {} in its own ns) -> {} (host); load {} conns at {:.0}/s ok={} failed={}; accepted {} / {} / (running)",
            id1.generation,
            id2.generation,
            g2.pid,
            id3.generation,
            rep.started,
            rep.rate(),
            rep.ok,
            rep.failed,
            gen1.final_accepted(),
            gen2.final_accepted(),
        ),
    );
    rep.assert_clean("load across handovers between PID namespaces");
    assert!(
        st.is_serving(id3.generation),
        "gen 3 must be active: {st:#?}"
    );
    assert_eq!(st.counters.fallback_new, 0, "{:?}", st.counters);
    assert!(gen1.final_accepted() > 0 && gen2.final_accepted() > 0);
    gen3.signal(Signal::Usr1);
    assert!(gen3.expect_exit(Duration::from_secs(10)).success());
    assert_eq!(
        gen1.final_accepted() + gen2.final_accepted() + gen3.final_accepted(),
        rep.started,
        "the three generations accepted every connection exactly once"
    );
}
