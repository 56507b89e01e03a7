//! HAProxy's pause/resume signals: SIGTTOU makes a generation stop
//! listening (standby), SIGTTIN makes it listen again and take the traffic
//! back through the steering program.

use std::time::{Duration, Instant};

use proxy_integration_tests::{
    Backend, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, accept_queues, exchange, next_id, report,
};

#[test]
fn sigttou_sigttin() {
    let sb = Sandbox::new("ttou");
    let rt = sb.runtime();
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::default());
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));
    let t = Duration::from_secs(5);
    rt.block_on(exchange(PROXY_ADDR, next_id(), 100, t))
        .expect("an exchange through the active generation");

    gen1.signal(libc::SIGTTOU);
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

    gen1.signal(libc::SIGTTIN);
    let back = sb.wait_status("gen 1 active again", t, |st| st.is_serving(id1.generation));
    assert_eq!(accept_queues(8080).len(), 1, "gen 1 listens again");

    // An idle generation must be idle: a busy accept loop (accept() failing
    // with EAGAIN in a loop, e.g. on a readiness that never clears after
    // the listener was shut down and re-listened) would burn a core and
    // starve the connections spawned on its worker thread.
    let cpu = cpu_share(gen1.pid, Duration::from_millis(500));
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
    gen1.signal(libc::SIGUSR1);
    assert!(gen1.expect_exit(t).success());
    assert_eq!(gen1.final_accepted(), 22, "1 exchange before, 21 after");
}

/// The share of one core that process `pid` used over `window`.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    // utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks.
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after_comm = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after_comm.split_whitespace().collect();
        // after_comm starts at field 3 (state): utime is field 14 -> index 11.
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    // Safety: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), ticks());
    (c1.saturating_sub(c0)) as f64 / hz / (t1 - t0).as_secs_f64()
}
