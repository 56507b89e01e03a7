//! `cpus = [...]` on a listener: its stage runs on a runtime of its own whose
//! threads (named `stage-<listener>`, cut to 15 characters by the kernel)
//! are pinned to exactly those CPUs, while the rest of the process is not.

use std::{collections::BTreeMap, fs, time::Duration};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    bodies::text_body,
    config::{ConfigToml, Table},
    http::{fetch, header_str, http_connect, request},
    http_backend::HttpBackend,
    report,
};

const COMP_ADDR: &str = "127.0.0.1:8080";
const TCP_ADDR: &str = "127.0.0.1:8081";
const PLAIN_ADDR: &str = "127.0.0.1:8082";

/// One thread of a process.
#[derive(Debug, Clone)]
struct Thread {
    tid: u32,
    comm: String,
    allowed: String,
    /// The CPU it last ran on (field 39 of its stat).
    last_cpu: Option<u32>,
    /// Nanoseconds it spent on a CPU (first field of its schedstat).
    run_ns: u64,
}

fn threads(pid: u32) -> Vec<Thread> {
    let mut out = Vec::new();
    let dir = fs::read_dir(format!("/proc/{pid}/task")).expect("reading /proc/<pid>/task");
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let base = format!("/proc/{pid}/task/{tid}");
        let Ok(comm) = fs::read_to_string(format!("{base}/comm")) else {
            continue; // the thread ended meanwhile
        };
        let Ok(status) = fs::read_to_string(format!("{base}/status")) else {
            continue;
        };
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        let last_cpu = fs::read_to_string(format!("{base}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(") ")?.1.to_string();
                // Fields after the comm start at field 3 (state).
                rest.split_whitespace().nth(39 - 3)?.parse().ok()
            });
        let run_ns = fs::read_to_string(format!("{base}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.push(Thread {
            tid,
            comm: comm.trim().to_string(),
            allowed,
            last_cpu,
            run_ns,
        });
    }
    out
}

fn own_allowed_list() -> String {
    fs::read_to_string("/proc/self/status")
        .expect("reading /proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .expect("Cpus_allowed_list in /proc/self/status")
}

#[test]
fn pinned_stage_threads() {
    let sb = Sandbox::new("st-cpus");
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        ncpus >= 2,
        "this test pins stages to CPUs 0 and 1: it needs 2 CPUs, the machine has {ncpus}"
    );
    let rt = sb.runtime();
    let _backend = HttpBackend::start(&rt);
    let config = ConfigToml::stages(&sb, "10s")
        .table(
            Table::http("comp", COMP_ADDR, "servers")
                .key("cpus", "[1]")
                .with(Table::gzip(256, &["text/html"])),
        )
        .table(Table::tcp("tls-offload-front", TCP_ADDR, "servers").key("cpus", "[0]"))
        .table(Table::tcp("plain", PLAIN_ADDR, "servers"))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("cpus.toml", &config);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    // Traffic through each stage, so that its threads have run.
    rt.block_on(async {
        for addr in [COMP_ADDR, TCP_ADDR, PLAIN_ADDR] {
            let mut sender = http_connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
            for i in 0..20u64 {
                let (parts, body) = fetch(
                    &mut sender,
                    request("GET", &format!("/r?len=5000&seed={i}"), "cpus.test", &[]),
                )
                .await
                .unwrap_or_else(|e| panic!("GET through {addr}: {e}"));
                assert_eq!(parts.status, 200, "GET through {addr}");
                assert!(
                    body == text_body(5000, i),
                    "GET through {addr}: body differs"
                );
                assert!(header_str(&parts, "x-backend-conn").is_some());
            }
        }
    });

    let all = threads(proxy.pid);
    let by_name: BTreeMap<&str, Vec<&Thread>> = all.iter().fold(BTreeMap::new(), |mut m, t| {
        m.entry(t.comm.as_str()).or_default().push(t);
        m
    });
    for (name, ts) in &by_name {
        report(
            &sb,
            &format!(
                "stages_cpu_pinning: {name:<16} x{}: allowed {:?}, last ran on {:?}, on-CPU µs {:?}",
                ts.len(),
                ts.iter().map(|t| t.allowed.as_str()).collect::<Vec<_>>(),
                ts.iter().map(|t| t.last_cpu).collect::<Vec<_>>(),
                ts.iter().map(|t| t.run_ns / 1000).collect::<Vec<_>>()
            ),
        );
    }

    // `stage-tls-offload-front` is 23 characters: the kernel keeps 15.
    for (comm, cpu) in [("stage-comp", "1"), ("stage-tls-offlo", "0")] {
        let pinned = by_name.get(comm).cloned().unwrap_or_default();
        assert!(
            !pinned.is_empty(),
            "expected threads named {comm:?} in /proc/{}/task/*/comm, found names {:?}",
            proxy.pid,
            by_name.keys().collect::<Vec<_>>()
        );
        for t in &pinned {
            assert_eq!(
                t.allowed, cpu,
                "thread {} ({comm}) must be pinned to CPU {cpu}, its Cpus_allowed_list is {:?}",
                t.tid, t.allowed
            );
            assert!(
                t.run_ns > 0,
                "thread {} ({comm}) never ran, yet its stage served requests",
                t.tid
            );
            if let Some(last) = t.last_cpu {
                assert_eq!(
                    last.to_string(),
                    cpu,
                    "thread {} ({comm}) last ran on CPU {last}, outside its pinning",
                    t.tid
                );
            }
        }
    }
    // The listener without cpus has no runtime (and no threads) of its own.
    assert!(
        !by_name.contains_key("stage-plain"),
        "the listener without cpus must share the default runtime, found stage-plain threads"
    );
    // Pinning must not leak to the rest of the process.
    let unpinned = own_allowed_list();
    let main = all
        .iter()
        .find(|t| t.tid == proxy.pid)
        .expect("the main thread is in the task list");
    assert_eq!(
        main.allowed, unpinned,
        "the main thread must keep the inherited CPU set {unpinned:?}, has {:?}",
        main.allowed
    );
    let others: Vec<&Thread> = all
        .iter()
        .filter(|t| !t.comm.starts_with("stage-"))
        .filter(|t| t.allowed != unpinned)
        .collect();
    assert!(
        others.is_empty(),
        "threads outside the pinned stages must keep {unpinned:?}: {others:#?}"
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
}
