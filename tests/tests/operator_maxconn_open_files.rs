//! `global.maxconn` sizes the open-file limit, as HAProxy's does: a proxy
//! started with a soft limit too small for it raises the limit to what its
//! connections need and keeps the configured `maxconn`; past the hard limit
//! only with CAP_SYS_RESOURCE (and never past the sysctl `fs.nr_open`).
//! What cannot be raised leaves the generation running with the `maxconn`
//! the limit allows, and a warning that says what to do.

use std::{fs, time::Duration};

use proxy_harness::{
    Backend, PROXY_ADDR, Proxy, ProxyConfig, Sandbox, config::config_text, exchange, next_id,
    report,
};

/// The soft limit the proxy starts with.
const START_SOFT: u64 = 1024;
/// The standard listener is plain tcp, so its connections may splice: three
/// descriptors each, beside 66 kept for one listener, runtimes and logs.
fn needed(maxconn: u64) -> u64 {
    3 * maxconn + 66
}

/// `proxy run` under `prlimit --nofile=soft:hard` with `global.maxconn`;
/// returns the running generation once active.
fn start(sb: &Sandbox, maxconn: u64, soft: u64, hard: u64) -> Proxy {
    let cfg = sb.write_file(
        "proxy.toml",
        &config_text(
            sb,
            &ProxyConfig::default(),
            &format!("maxconn = {maxconn}"),
            "",
        ),
    );
    let nofile = format!("--nofile={soft}:{hard}");
    let mut proxy = Proxy::start_wrapped(sb, &["prlimit", &nofile, "--"], &cfg, &[]);
    proxy.wait_active(sb, Duration::from_secs(10));
    proxy
}

/// The soft and hard open-file limits of a process.
fn open_files(pid: &str) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("reading limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    (fields[0], fields[1])
}

/// Whether this process (and so the proxy it starts) has CAP_SYS_RESOURCE.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = fs::read_to_string("/proc/self/status").expect("reading status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("CapEff in hex"))
        .expect("a CapEff line");
    eff & (1 << CAP_SYS_RESOURCE) != 0
}

/// One request through the generation.
fn served(rt: &tokio::runtime::Runtime) {
    rt.block_on(exchange(PROXY_ADDR, next_id(), 200, Duration::from_secs(5)))
        .expect("a request through the proxy");
}

/// The warning of a `maxconn` the limit cannot hold, and the `maxconn` it
/// says is used instead.
fn capped(proxy: &Proxy, maxconn: u64, limit: u64) -> u64 {
    let log = proxy.log();
    let warning = log
        .lines()
        .find(|l| l.contains(&format!("global.maxconn {maxconn} needs")))
        .unwrap_or_else(|| panic!("a warning naming global.maxconn; log:\n{log}"));
    assert!(
        warning.contains("WARN")
            && warning.contains(&format!("raised only to {limit}"))
            && warning.contains("CAP_SYS_RESOURCE")
            && warning.contains("fs.nr_open"),
        "{warning}"
    );
    let used: u64 = warning
        .split("using maxconn ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the maxconn used, in: {warning}"));
    assert!(
        used > 0 && needed(used) <= limit,
        "maxconn used {used} under a limit of {limit}"
    );
    used
}

/// A soft limit below what maxconn needs is raised (to the hard limit), and
/// the generation keeps its maxconn.
#[test]
fn maxconn_raises_the_soft_open_file_limit() {
    let (sb, rt) = Sandbox::with_runtime("maxconn-soft");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let (_, hard) = open_files("self");
    let maxconn = ((hard - 66) / 3).min(5_000);
    assert!(
        needed(maxconn) > START_SOFT,
        "the hard limit {hard} is too low"
    );
    let mut proxy = start(&sb, maxconn, START_SOFT, hard);
    let (soft, now_hard) = open_files(&proxy.pid.to_string());
    assert!(
        soft >= needed(maxconn) && now_hard == hard,
        "maxconn {maxconn} with {START_SOFT}:{hard}: the limit is now {soft}:{now_hard}"
    );
    let log = proxy.log();
    assert!(
        log.contains(&format!("maxconn {maxconn} (open-file limit {soft})")),
        "the generation keeps maxconn {maxconn} and logs it; log:\n{log}"
    );
    served(&rt);
    report(
        &sb,
        &format!("maxconn {maxconn}: soft open-file limit {START_SOFT} raised to {soft}"),
    );
    proxy.kill();
}

/// Past the hard limit: raised with CAP_SYS_RESOURCE, else the generation
/// runs with what the limit allows.
#[test]
fn maxconn_past_the_hard_limit() {
    let (sb, rt) = Sandbox::with_runtime("maxconn-hard");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let maxconn = 5_000;
    let mut proxy = start(&sb, maxconn, START_SOFT, START_SOFT);
    let (soft, hard) = open_files(&proxy.pid.to_string());
    if has_sys_resource() {
        assert!(
            soft >= needed(maxconn) && hard >= soft,
            "maxconn {maxconn} with CAP_SYS_RESOURCE under {START_SOFT}:{START_SOFT}: the \
             limit is now {soft}:{hard}"
        );
        assert!(
            proxy
                .log()
                .contains(&format!("maxconn {maxconn} (open-file limit {soft})")),
            "{}",
            proxy.log()
        );
        report(
            &sb,
            &format!("maxconn {maxconn}: hard limit raised to {hard}"),
        );
    } else {
        assert_eq!(
            (soft, hard),
            (START_SOFT, START_SOFT),
            "without CAP_SYS_RESOURCE the limit stays as it was"
        );
        let used = capped(&proxy, maxconn, START_SOFT);
        report(
            &sb,
            &format!("maxconn {maxconn} without CAP_SYS_RESOURCE: maxconn {used} used"),
        );
    }
    served(&rt);
    proxy.kill();
}

/// No process can have more open files than `fs.nr_open`: a maxconn that
/// needs more runs with what the limit allows, whatever the capabilities.
#[test]
fn maxconn_past_nr_open_runs_with_what_the_limit_allows() {
    let (sb, rt) = Sandbox::with_runtime("maxconn-nr-open");
    let _backend = Backend::start(&rt, Duration::ZERO);
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("reading fs.nr_open")
        .trim()
        .parse()
        .expect("fs.nr_open is a number");
    let maxconn = nr_open / 3 + 1;
    let mut proxy = start(&sb, maxconn, START_SOFT, START_SOFT);
    let (soft, hard) = open_files(&proxy.pid.to_string());
    assert_eq!(
        (soft, hard),
        (START_SOFT, START_SOFT),
        "a limit that cannot be raised is left as it was"
    );
    capped(&proxy, maxconn, START_SOFT);
    served(&rt);
    proxy.kill();
}
