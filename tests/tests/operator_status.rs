//! `proxy status`, as an operator reads it during a handover: the JSON and
//! the table show one generation, then the new one (active) next to the old
//! one (draining, held open by a client), then the old one as stopped (not
//! active, not alive) once it has drained and exited.

use std::time::Duration;

use proxy_harness::{
    Backend, GenStatus, Held, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal, Status, exchange,
    next_id, report,
};

#[test]
fn operator_status() {
    let (sb, rt) = Sandbox::with_runtime("op-status");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let cfg = sb.write_config("proxy.toml", &ProxyConfig::draining("20s"));

    // One generation.
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let g1 = gen1.wait_active(&sb, Duration::from_secs(10)).generation;
    for _ in 0..5 {
        rt.block_on(exchange(PROXY_ADDR, next_id(), 64, Duration::from_secs(5)))
            .expect("a connection through generation 1");
    }
    let st = sb.status();
    assert_eq!(st.instance, sb.name, "status names the instance");
    assert_eq!(
        st.generations.len(),
        1,
        "one generation running, status shows: {st:#?}"
    );
    let only = rec(&st, g1);
    assert!(
        only.active && only.alive && only.state == "active",
        "generation {g1} must be active and alive: {only:?}"
    );
    assert_eq!(st.active_slot, Some(only.slot), "active_slot is its slot");
    assert_eq!(only.pid, gen1.pid, "status shows its PID");
    // The accepted count is published every 50 ms.
    let st = sb.wait_status(
        "5 accepted connections in status",
        Duration::from_secs(3),
        |st| st.generation(g1).is_some_and(|g| g.accepted >= 5),
    );
    assert_eq!(rec(&st, g1).accepted, 5, "exactly the 5 connections made");
    let table = status_table(&sb);
    table_row(&table, g1, "active *");

    // A client keeps a connection open on generation 1, so that it stays
    // draining after the handover.
    let held = rt.block_on(Held::open(PROXY_ADDR, next_id()));
    sb.wait_status(
        "the held connection open in generation 1",
        Duration::from_secs(5),
        |st| st.generation(g1).is_some_and(|g| g.active_conns == 1),
    );

    // A second generation: it appears active, the first one drains.
    let mut gen2 = Proxy::start(&sb, &cfg, &[]);
    let g2 = gen2.wait_active(&sb, Duration::from_secs(10)).generation;
    assert!(g2 > g1, "generation numbers grow: {g1} then {g2}");
    let st = sb.wait_status(
        "generation 1 draining next to an active generation 2",
        Duration::from_secs(5),
        |st| st.generation(g1).is_some_and(|g| g.state == "draining"),
    );
    assert_eq!(st.generations.len(), 2, "two generations: {st:#?}");
    let (old, new) = (rec(&st, g1), rec(&st, g2));
    assert!(
        new.active && new.alive && new.state == "active",
        "the new generation is the active one: {new:?}"
    );
    assert!(
        !old.active && old.alive && old.state == "draining" && old.active_conns == 1,
        "the old generation drains its one connection: {old:?}"
    );
    assert_eq!(st.active_slot, Some(new.slot), "active_slot moved: {st:#?}");
    assert_ne!(old.slot, new.slot, "two slots");
    let table = status_table(&sb);
    table_row(&table, g1, "draining");
    table_row(&table, g2, "active *");
    report(&sb, &format!("status table during the handover:\n{table}"));

    // The same from `-c config`.
    let by_config = sb.run_proxy_cmd(
        &["status", "-c", cfg.to_str().expect("UTF-8 path"), "--json"],
        Duration::from_secs(10),
    );
    assert!(
        by_config.status.success(),
        "proxy status -c failed: {}",
        by_config.stderr
    );
    let st_c: Status = serde_json::from_str(&by_config.stdout).expect("status -c --json");
    assert_eq!(st_c.instance, sb.name);
    assert_eq!(
        st_c.generations
            .iter()
            .map(|g| g.generation)
            .collect::<Vec<_>>(),
        st.generations
            .iter()
            .map(|g| g.generation)
            .collect::<Vec<_>>(),
        "status -c and status --name show the same generations"
    );

    // The held connection completes through generation 1, which then exits.
    rt.block_on(held.finish(Duration::from_secs(5)))
        .expect("the held connection completes on the draining generation");
    let exit = gen1.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation {g1} exited with {exit}");
    let st = sb.wait_status("generation 1 stopped", Duration::from_secs(3), |st| {
        st.generation(g1).is_some_and(|g| g.state == "stopped")
    });
    let (old, new) = (rec(&st, g1), rec(&st, g2));
    assert!(
        !old.active && !old.alive && old.state == "stopped" && old.active_conns == 0,
        "the exited generation shows as stopped, not active, not alive: {old:?}"
    );
    assert_eq!(old.accepted, 6, "generation 1 accepted 5 + the held one");
    assert!(new.active && new.alive && new.state == "active", "{new:?}");
    let table = status_table(&sb);
    table_row(&table, g1, "stopped");
    table_row(&table, g2, "active *");
    report(
        &sb,
        &format!("status table after generation 1 exited:\n{table}"),
    );

    // The last generation leaves: nothing is active any more.
    gen2.signal(Signal::Usr1);
    let exit = gen2.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation {g2} exited with {exit}");
    let st = sb.status();
    assert_eq!(
        st.active_slot, None,
        "no active slot once all left: {st:#?}"
    );
    assert!(
        st.generations
            .iter()
            .all(|g| g.state == "stopped" && !g.active && !g.alive),
        "every generation stopped: {st:#?}"
    );
    let table = status_table(&sb);
    assert!(
        table.contains("active slot: none"),
        "the table says no slot is active:\n{table}"
    );
}

fn rec(st: &Status, generation: u64) -> &GenStatus {
    st.generation(generation)
        .unwrap_or_else(|| panic!("no record of generation {generation}: {st:#?}"))
}

/// `proxy status --name N --bpffs D` (the table).
fn status_table(sb: &Sandbox) -> String {
    let bpffs = sb.bpffs.to_str().expect("UTF-8 path").to_string();
    let args = ["status", "--name", &sb.name, "--bpffs", &bpffs];
    let out = sb.run_proxy_cmd(&args, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "proxy status failed ({}): {}",
        out.status,
        out.stderr
    );
    assert!(
        !out.stdout.trim_start().starts_with('{'),
        "without --json the output is a table:\n{}",
        out.stdout
    );
    out.stdout
}

/// The table row of `generation` (columns: slot gen pid state...); checks
/// that its state column reads `state` (`active *` for the active one).
fn table_row(table: &str, generation: u64, state: &str) {
    assert!(
        table.lines().any(|l| l
            .split_whitespace()
            .take(4)
            .eq(["slot", "gen", "pid", "state"])),
        "no header line `slot gen pid state ...`:\n{table}"
    );
    let row = table
        .lines()
        .find(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 4 && cols[0].parse::<u32>().is_ok() && cols[1] == generation.to_string()
        })
        .unwrap_or_else(|| panic!("no row for generation {generation}:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let shown = if cols.get(4) == Some(&"*") {
        format!("{} *", cols[3])
    } else {
        cols[3].to_string()
    };
    assert_eq!(
        shown, state,
        "generation {generation}: state column in row {row:?}:\n{table}"
    );
    if state.starts_with("active") {
        assert!(table.contains("active"), "the table says active:\n{table}");
    }
}
