//! A new generation that flips the active slot and then stalls (here:
//! stopped by the `stop-after-flip` fault-injection hook) must not take the
//! service down: the old generation sees its heartbeat go stale, flips the
//! slot back (rollback), and the connections that reached the stalled
//! generation's queue in between are migrated back when it is killed.

use std::time::{Duration, Instant};

use proxy_harness::{
    Backend, Load, LoadSpec, Proxy, ProxyConfig, Sandbox, procfs::proc_state, report, wait_until,
};

#[test]
fn rollback_when_new_generation_dies() {
    let (sb, rt) = Sandbox::with_runtime("rollback");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::draining("10s"));
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));

    let load = Load::start(&rt, LoadSpec::new(1000.0, Duration::from_secs(30)));
    load.wait_ok(300, Duration::from_secs(10));

    let started = Instant::now();
    let mut gen2 = Proxy::start(&sb, &cfg, &[("PROXY_TEST_HOOK", "stop-after-flip")]);
    wait_until(
        Duration::from_secs(10),
        || proc_state(gen2.pid) == Some('T'),
        || format!("gen 2 to stop itself after the flip; log:\n{}", gen2.log()),
    );
    let stopped_after = started.elapsed();
    let flipped = sb.status();
    let g2 = flipped
        .generations
        .iter()
        .find(|g| g.pid == gen2.pid)
        .cloned()
        .unwrap_or_else(|| panic!("no record for stopped gen 2: {flipped:#?}"));
    assert!(
        g2.generation > id1.generation,
        "gen 2 must have a newer generation number: {g2:?}"
    );

    // Gen 1 notices the stale heartbeat (1 s) and takes the slot back.
    wait_until(
        Duration::from_secs(5),
        || gen1.log().contains("rolled back"),
        || format!("gen 1 to log `rolled back`; log:\n{}", gen1.log()),
    );
    let rolled_back_after = started.elapsed();
    sb.wait_status("gen 1 active again", Duration::from_secs(5), |st| {
        st.is_serving(id1.generation)
    });

    // What reached the stalled generation between the flip and the
    // rollback (read before the kill, while its slot still has them).
    let before_kill = sb.status();
    let stranded = before_kill
        .generation(g2.generation)
        .map(|g| g.steered)
        .unwrap_or_default();
    let gen2_established = established_sockets_of(gen2.pid);

    // Killing it closes its listener: the kernel migrates its queue to the
    // active slot, gen 1 again.
    gen2.kill();
    let ok_at_kill = load.ok();
    let keep_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < keep_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = sb.status();
    let report_ = load.finish(&rt);

    let g1 = after.generation(id1.generation).expect("gen 1 record");
    report(
        &sb,
        &format!(
            "rollback_when_new_generation_dies: gen 2 stopped {stopped_after:.2?} after spawn, gen 1 rolled back {rolled_back_after:.2?} after spawn; \
             {stranded} connections steered to the stalled gen 2 (gen 2 held {} accepted sockets at kill), gen 1 migrated_in={}; \
             load {} conns at {:.0}/s ok={} failed={}",
            gen2_established.len(),
            g1.migrated_in,
            report_.started,
            report_.rate(),
            report_.ok,
            report_.failed
        ),
    );
    assert!(
        gen2_established.is_empty(),
        "the stalled gen 2 had accepted client connections before stopping itself \
         (between the flip and SIGSTOP); they are cut by the kill: {gen2_established:?}"
    );
    report_.assert_clean("load across a stalled new generation and a rollback");
    assert!(
        report_.ok > ok_at_kill + 500,
        "gen 1 kept serving after the kill: ok went from {ok_at_kill} to {}",
        report_.ok
    );
    assert!(
        after.is_serving(id1.generation),
        "gen 1 must be the active, serving generation: {after:#?}"
    );
    // Every connection queued on the stalled generation came back through
    // one migration (nothing else migrates into gen 1's slot).
    assert_eq!(
        g1.migrated_in, stranded,
        "gen 1 should have received every connection stranded in gen 2 by migration"
    );
    assert_eq!(after.counters.fallback_new, 0, "{:?}", after.counters);
    assert!(gen1.try_exit().is_none(), "gen 1 must still run");
}

/// Local ports of the established TCP sockets that process `pid` holds
/// (from its fds and this thread's namespace's /proc/net/tcp): client
/// connections it accepted, and its connections to the backend.
fn established_sockets_of(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.get(3) == Some(&"01") && inodes.iter().any(|i| Some(&i.as_str()) == cols.get(9)))
                .then(|| format!("{} -> {}", cols[1], cols[2]))
        })
        .collect()
}
