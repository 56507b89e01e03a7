//! A broken config must be refused before it touches anything: `proxy
//! check` and `proxy run` exit non-zero naming the offending key, and the
//! running generation keeps serving without a single failed connection.

use std::time::Duration;

use proxy_harness::{Backend, Load, LoadSpec, Proxy, ProxyConfig, Sandbox, Signal, report};

#[test]
fn invalid_config_keeps_running_generation() {
    let (sb, rt) = Sandbox::with_runtime("badconf");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let good = ProxyConfig::default().render(&sb);
    let good_path = sb.write_file("good.toml", &good);
    let mut gen1 = Proxy::start(&sb, &good_path, &[]);
    let id1 = gen1.wait_active(&sb, Duration::from_secs(10));

    let load = Load::start(&rt, LoadSpec::new(300.0, Duration::from_secs(30)));
    load.wait_ok(100, Duration::from_secs(10));

    // The good config checks fine (so the failures below are the edits').
    let ok = sb.run_proxy_cmd(
        &["check", "-c", good_path.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert!(
        ok.status.success(),
        "the good config must pass check: {ok:?}"
    );

    let cases = [
        (
            "unknown-backend.toml",
            good.replace(r#"backend = "app""#, r#"backend = "nope""#),
            "listener[0].backend",
            "nope",
        ),
        (
            "unknown-key.toml",
            good.replace("bind = [", "bnd = ["),
            "listener[0].bnd",
            "unknown field",
        ),
        (
            // Port 0 would give every generation a different port.
            "port-zero.toml",
            good.replace("127.0.0.1:8080", "127.0.0.1:0"),
            "listener[0].bind",
            "127.0.0.1:0",
        ),
    ];
    for (file, text, key, word) in &cases {
        assert_ne!(text, &good, "{file}: the edit must change the config");
        let path = sb.write_file(file, text);
        let path = path.to_str().unwrap();

        let check = sb.run_proxy_cmd(&["check", "-c", path], Duration::from_secs(10));
        assert_eq!(
            check.status.code(),
            Some(1),
            "{file}: `proxy check` must exit 1: {check:?}"
        );
        assert!(
            check.stderr.contains(key) && check.stderr.contains(word),
            "{file}: `proxy check` must name {key:?} and {word:?} on stderr, got: {:?}",
            check.stderr
        );

        let run = sb.run_proxy_cmd(&["run", "-c", path], Duration::from_secs(10));
        assert!(
            !run.status.success(),
            "{file}: `proxy run` with a bad config must fail: {run:?}"
        );
        assert!(
            run.stderr.contains(key) && run.stderr.contains(word),
            "{file}: `proxy run` must name {key:?} and {word:?} on stderr, got: {:?}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("flipped"),
            "{file}: `proxy run` must fail before touching the steering state: {:?}",
            run.stderr
        );
        report(
            &sb,
            &format!(
                "invalid_config: {file}: check -> {}, run -> {}: {}",
                check.status,
                run.status,
                run.stderr.trim()
            ),
        );

        // Gen 1 is untouched: still the active generation, heartbeat fresh,
        // and only one generation number was ever handed out.
        let st = sb.status();
        assert!(
            st.is_serving(id1.generation),
            "{file}: gen 1 must still be active: {st:#?}"
        );
        assert_eq!(
            st.generations.len(),
            1,
            "{file}: a refused config must not claim a slot: {st:#?}"
        );
    }

    // Traffic kept flowing through gen 1 the whole time.
    let ok_before = load.ok();
    load.wait_ok(ok_before + 100, Duration::from_secs(10));
    let rep = load.finish(&rt);
    report(
        &sb,
        &format!(
            "invalid_config: load {} conns at {:.0}/s ok={} failed={}",
            rep.started,
            rep.rate(),
            rep.ok,
            rep.failed
        ),
    );
    rep.assert_clean("load while bad configs were refused");
    assert!(gen1.try_exit().is_none(), "gen 1 must still run");
    gen1.signal(Signal::Term);
    let exit = gen1.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "SIGTERM is a clean hard stop: {exit}");
    assert_eq!(
        gen1.final_accepted(),
        rep.started,
        "gen 1 served every connection of the test"
    );
}
