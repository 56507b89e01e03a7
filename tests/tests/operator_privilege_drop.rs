//! `[global] user = "nobody"`: a generation listening on port 80 runs as
//! uid 65534 with exactly CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and
//! CAP_NET_BIND_SERVICE (every thread), serves, and hands over under load to
//! a second generation configured the same way: not one connection fails and
//! the first generation exits by itself.

use std::{os::unix::fs::MetadataExt as _, os::unix::fs::PermissionsExt as _, time::Duration};

use proxy_harness::{
    Backend, Load, LoadSpec, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, Signal,
    config::config_text,
    exchange, next_id,
    procfs::{cap_mask, proc_status, proc_thread_statuses},
    report,
    sandbox::read_sysctl_in_child,
};

/// The privileged port the listener uses (inside the test's namespace).
const PORT80: &str = "127.0.0.1:80";
const NOBODY: u32 = 65534;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[test]
fn operator_privilege_drop() {
    let sb = Sandbox::new("op-privdrop");
    // The pins live under the sandbox folder (0700 root): the dropped user
    // must be able to reach them, as it would under /sys/fs/bpf.
    std::fs::set_permissions(&sb.dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755 the sandbox folder");
    assert_eq!(
        read_sysctl_in_child("net/ipv4/ip_unprivileged_port_start"),
        "1024",
        "port 80 must need CAP_NET_BIND_SERVICE in the test's namespace"
    );
    let rt = sb.runtime();
    let backend = Backend::start(&rt, Duration::ZERO);
    let text = config_text(&sb, &ProxyConfig::draining("10s"), "user = \"nobody\"", "")
        .replace(PROXY_ADDR, PORT80);
    assert!(text.contains(PORT80) && !text.contains(PROXY_ADDR));
    let cfg = sb.write_file("proxy.toml", &text);

    let mut gen1 = Proxy::start(&sb, &cfg, &[]);
    let g1 = gen1.wait_active(&sb, Duration::from_secs(10));
    let want_caps = cap_mask(&[CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF]);
    assert_eq!(want_caps, 0x0000_00c0_0000_1400);
    check_dropped(&gen1, want_caps);
    assert!(
        gen1.log().contains("dropped privileges to user nobody"),
        "the log says so:\n{}",
        gen1.log()
    );
    // The instance's pins were handed to the user.
    let pins = sb.bpffs.join("proxy").join(&sb.name);
    let meta = std::fs::metadata(&pins).expect("the pin folder");
    assert_eq!(meta.uid(), NOBODY, "{} is owned by nobody", pins.display());

    // It serves on port 80.
    for _ in 0..20 {
        rt.block_on(exchange(PORT80, next_id(), 100, Duration::from_secs(5)))
            .expect("a connection through the unprivileged generation on port 80");
    }

    // A handover under load, to a generation that drops privileges too.
    let load = Load::start_to(&rt, LoadSpec::new(1000.0, Duration::from_secs(20)), PORT80);
    load.wait_ok(300, Duration::from_secs(10));
    let mut gen2 = Proxy::start(&sb, &cfg, &[]);
    let g2 = gen2.wait_active(&sb, Duration::from_secs(10));
    assert!(g2.generation > g1.generation);
    check_dropped(&gen2, want_caps);
    // Generation 1 (uid nobody) sees the flip and leaves by itself.
    let exit = gen1.expect_exit(Duration::from_secs(15));
    assert!(
        exit.success(),
        "generation 1 exited with {exit}; log:\n{}",
        gen1.log()
    );
    let st = sb.status();
    let old = st.generation(g1.generation).expect("generation 1 record");
    assert_eq!(old.state, "stopped", "{old:?}");
    // Traffic keeps flowing through generation 2.
    let ok_at_exit = load.ok();
    load.wait_ok(ok_at_exit + 300, Duration::from_secs(10));
    let lr = load.finish(&rt);
    let accepted1 = gen1.final_accepted();

    gen2.signal(Signal::Usr1);
    let exit = gen2.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "generation 2 exited with {exit}");
    let accepted2 = gen2.final_accepted();
    report(
        &sb,
        &format!(
            "operator_privilege_drop: load started={} ok={} failed={} ({:.0}/s); gen {} accepted {accepted1}, gen {} accepted {accepted2}; backend served {}",
            lr.started,
            lr.ok,
            lr.failed,
            lr.rate(),
            g1.generation,
            g2.generation,
            backend
                .stats
                .served
                .load(std::sync::atomic::Ordering::Relaxed)
        ),
    );
    lr.assert_clean("load on port 80 during a handover between unprivileged generations");
    assert_eq!(
        accepted1 + accepted2,
        lr.started + 20,
        "the two generations accepted every connection (load + 20 before)"
    );
    for p in [&gen1, &gen2] {
        assert!(
            !p.log().contains("ERROR") && !p.log().contains("Permission denied"),
            "{} logged an error:\n{}",
            p.label(),
            p.log()
        );
    }
}

/// Uid/Gid nobody, and exactly `caps` effective and permitted in every
/// thread; nothing inheritable, bounding set reduced to `caps`.
fn check_dropped(p: &Proxy, caps: u64) {
    let st = proc_status(p.pid);
    assert!(!st.is_empty(), "{} has no /proc status", p.label());
    let ids = |k: &str| -> Vec<u32> {
        st[k]
            .split_whitespace()
            .map(|v| v.parse().expect("a number"))
            .collect()
    };
    assert_eq!(ids("Uid"), [NOBODY; 4], "{}: Uid line: {st:?}", p.label());
    assert_eq!(ids("Gid"), [NOBODY; 4], "{}: Gid line: {st:?}", p.label());
    let threads = proc_thread_statuses(p.pid);
    assert!(threads.len() > 1, "{} runs several threads", p.label());
    for (tid, t) in &threads {
        let mask = |k: &str| {
            u64::from_str_radix(&t[k], 16)
                .unwrap_or_else(|e| panic!("{k} of thread {tid}: {e}: {t:?}"))
        };
        for key in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                mask(key),
                caps,
                "{} thread {tid}: {key} is {:#018x}, expected {caps:#018x} (BPF, PERFMON, NET_ADMIN, NET_BIND_SERVICE)",
                p.label(),
                mask(key)
            );
        }
        assert_eq!(mask("CapInh"), 0, "{} thread {tid}: CapInh", p.label());
        assert_eq!(
            t["Uid"].split_whitespace().next(),
            Some("65534"),
            "thread {tid} Uid"
        );
    }
}
