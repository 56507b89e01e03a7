//! A new generation that fails during startup, after it bound its sockets but
//! before the flip, must leave the running generation whole, including the
//! UNIX socket paths its chained stages connect to: UNIX listeners are
//! renamed over their paths only just before the flip. And a new generation
//! that dies after the flip (it had taken the paths) is rolled back with the
//! paths: the old generation binds them again.

use std::{net::TcpListener, time::Duration};

use proxy_harness::{
    BACKEND_ADDR, Backend, Load, LoadSpec, PROXY_ADDR, Proxy, Sandbox, Signal,
    config::{ConfigToml, Table, unix},
    exchange, next_id, report, wait_until,
};

/// front (tcp) -> unix:app.sock -> app (tcp mode) -> backend
fn chain_config(sb: &Sandbox, sock: &std::path::Path) -> String {
    ConfigToml::stages(sb, "10s")
        .table(Table::listener("front", &[PROXY_ADDR], "app"))
        .table(Table::listener("app", &[&unix(sock)], "servers"))
        .table(Table::backend("app", &[&unix(sock)]))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render()
}

#[test]
fn failed_start_keeps_unix_paths() {
    let (sb, rt) = Sandbox::with_runtime("failstart");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let sock = sb.dir.join("app.sock");
    let base = chain_config(&sb, &sock);
    let good = sb.dir.join("good.toml");
    std::fs::write(&good, &base).expect("write config");
    // The same, plus a stats listener whose port something else holds
    // without SO_REUSEPORT: the new generation fails after binding its UNIX
    // listener, before the flip.
    let blocker = TcpListener::bind("127.0.0.1:8404").expect("bind the blocker");
    let failing = sb.dir.join("failing.toml");
    std::fs::write(
        &failing,
        format!("{base}\n[stats]\nbind = \"127.0.0.1:8404\"\n"),
    )
    .expect("write config");

    let t = Duration::from_secs(10);
    let mut gen1 = Proxy::start(&sb, &good, &[]);
    let id1 = gen1.wait_active(&sb, t);
    let ino_before = std::fs::metadata(&sock).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let load = Load::start(&rt, LoadSpec::new(1000.0, Duration::from_secs(20)));
    load.wait_ok(300, t);

    let mut gen2 = Proxy::start(&sb, &failing, &[]);
    let exit = gen2.expect_exit(t);
    assert!(!exit.success(), "the failing generation must exit non-zero");
    assert!(
        gen2.log()
            .contains("stats listener: binding 127.0.0.1:8404"),
        "gen 2 names what failed:\n{}",
        gen2.log()
    );
    let ino_after = std::fs::metadata(&sock).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert_eq!(
        ino_before.as_ref().ok(),
        ino_after.as_ref().ok(),
        "the UNIX path must still be gen 1's socket"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&sb.dir)
        .expect("read sandbox")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary socket files left: {leftovers:?}"
    );

    let ok = load.ok();
    load.wait_ok(ok + 500, t);
    let rep = load.finish(&rt);
    let st = sb.status();
    report(
        &sb,
        &format!(
            "failed_start_keeps_unix_paths: gen 2 exited {exit}; load {} conns ok={} failed={}; active={:?}",
            rep.started, rep.ok, rep.failed, st.active_slot
        ),
    );
    rep.assert_clean("load through the UNIX chain while a new generation failed");
    assert!(st.is_serving(id1.generation), "gen 1 still active: {st:?}");
    rt.block_on(exchange(PROXY_ADDR, next_id(), 100, Duration::from_secs(5)))
        .expect("gen 1 still serves through its UNIX stage");
    drop(blocker);
    gen1.signal(Signal::Usr1);
    assert!(gen1.expect_exit(t).success());
}

#[test]
fn rollback_takes_unix_paths_back() {
    let (sb, rt) = Sandbox::with_runtime("rollback-unix");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let sock = sb.dir.join("app.sock");
    let cfg = sb.dir.join("proxy.toml");
    std::fs::write(&cfg, chain_config(&sb, &sock)).expect("write config");
    let ino = || {
        std::fs::metadata(&sock)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };

    let t = Duration::from_secs(10);
    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let id1 = gen1.wait_active(&sb, t);
    let gen1_ino = ino();
    // Gen 2 takes the UNIX path, flips, and stops itself before it serves.
    let mut gen2 = Proxy::start(&sb, &cfg, &[("PROXY_TEST_HOOK", "stop-after-flip")]);
    wait_until(
        t,
        || gen1.log().contains("rolled back"),
        || format!("gen 1 to roll back; log:\n{}", gen1.log()),
    );
    gen2.kill();
    let back = ino();
    assert!(
        back.is_some() && back != gen1_ino,
        "gen 1 must have bound the path again (inode before {gen1_ino:?}, now {back:?})"
    );
    let st = sb.status();
    assert!(st.is_serving(id1.generation), "gen 1 active again: {st:?}");

    // The chain works again: front -> unix path -> gen 1's app stage.
    let load = Load::start(&rt, LoadSpec::new(500.0, Duration::from_secs(10)));
    load.wait_ok(1000, t);
    let rep = load.finish(&rt);
    report(
        &sb,
        &format!(
            "rollback_takes_unix_paths_back: path inode {gen1_ino:?} -> {back:?}; load {} conns ok={} failed={}",
            rep.started, rep.ok, rep.failed
        ),
    );
    rep.assert_clean("load through the UNIX chain after the rollback");
    gen1.signal(Signal::Usr1);
    assert!(gen1.expect_exit(t).success());
}
