//! The lab's smoke test: a tiny experiment (a few seconds per run) of our
//! eBPF steering and of HAProxy's -x reload, so that the harness keeps
//! working: records written and consistent, the summary, the table and the
//! plots, and `--report` rebuilding them from the raw records. Root, like
//! the integration tests (`cargo xtask test` runs it; it installs HAProxy).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

fn proxy_bin() -> PathBuf {
    match std::env::var_os("PROXY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/proxy"),
    }
}

fn lab(args: &[&str]) -> (String, String) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-lab"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running proxy-lab");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "proxy-lab {} failed ({}) after {:?}:\n{stdout}\n{stderr}",
        args.join(" "),
        out.status,
        started.elapsed()
    );
    (stdout, stderr)
}

/// Data lines of a CSV file.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn a_tiny_experiment_writes_records_a_table_and_plots() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join("out");
    let proxy = proxy_bin();
    let (stdout, stderr) = lab(&[
        "--proxy",
        proxy.to_str().unwrap(),
        "--mode",
        "ebpf,haproxy-x",
        "--scenario",
        "rolling,canary",
        "--rate",
        "400",
        "--mix",
        "short=80,keepalive=10,tls=10",
        "--handovers",
        "3",
        "--interval",
        "300ms",
        "--settle",
        "400ms",
        "--hard-stop-after",
        "3s",
        "--out",
        out.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
            .expect("summary.json parses");
    let runs = summary["runs"].as_array().expect("runs");
    let find = |mode: &str, scenario: &str| {
        runs.iter()
            .find(|r| r["mode"] == mode && r["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no run {mode}/{scenario} in {summary:#}\n{stderr}"))
    };
    for (mode, scenario) in [
        ("ebpf", "rolling"),
        ("haproxy-x", "rolling"),
        ("ebpf", "canary"),
    ] {
        let run = find(mode, scenario);
        assert!(
            run["skipped"].is_null(),
            "{mode}/{scenario}: {run:#}\n{stderr}"
        );
        let folder = out.join(mode).join(scenario);
        let conns = lines(&folder.join("conns.csv"));
        assert_eq!(
            run["connections"].as_u64(),
            Some(conns.len() as u64),
            "{mode}/{scenario}: the summary counts the raw records"
        );
        assert!(
            conns.len() > 500,
            "{mode}/{scenario}: {} connections",
            conns.len()
        );
        for kind in ["short", "keepalive", "tls"] {
            assert!(
                conns.iter().any(|l| l.split(',').nth(3) == Some(kind)),
                "{mode}/{scenario}: no {kind} connection in the mix"
            );
        }
        let events = lines(&folder.join("events.csv"));
        for plot in ["connect.svg", "generations.svg"] {
            let svg = std::fs::read_to_string(folder.join(plot)).expect(plot);
            assert!(
                svg.starts_with("<svg") || svg.starts_with("<?xml"),
                "{plot}"
            );
            assert!(svg.trim_end().ends_with("</svg>"), "{plot}");
        }
        if scenario == "rolling" {
            let handovers = events.iter().filter(|e| e.contains(",handover,")).count();
            assert_eq!(handovers, 3, "{mode}: {events:?}");
        }
    }
    // Ours loses nothing in a rolling handover or a canary round.
    for scenario in ["rolling", "canary"] {
        let run = find("ebpf", scenario);
        assert_eq!(
            run["ok"], run["connections"],
            "ebpf/{scenario}: every connection ok: {run:#}"
        );
    }
    let canary_events = lines(&out.join("ebpf/canary/events.csv"));
    for e in ["canary", "promote", "abort"] {
        assert!(
            canary_events.iter().any(|l| l.split(',').nth(1) == Some(e)),
            "no {e} event: {canary_events:?}"
        );
    }
    // HAProxy has no canary: said, not run.
    assert!(find("haproxy-x", "canary")["skipped"].is_string());
    assert!(
        stdout.contains("| ebpf") && stdout.contains("rolling"),
        "{stdout}"
    );

    // --report rebuilds the table from the raw records alone.
    std::fs::remove_file(out.join("summary.md")).unwrap();
    std::fs::remove_file(out.join("ebpf/rolling/connect.svg")).unwrap();
    let (again, _) = lab(&["--report", out.to_str().unwrap()]);
    assert_eq!(again, stdout, "the rebuilt table is the same");
    assert!(out.join("summary.md").is_file() && out.join("ebpf/rolling/connect.svg").is_file());
    let _ = Duration::ZERO;
}

#[test]
fn the_kernel_migration_paths_prove_themselves_with_the_program_counter() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join("out");
    let proxy = proxy_bin();
    lab(&[
        "--proxy",
        proxy.to_str().unwrap(),
        "--mode",
        "ebpf,reuseport",
        "--scenario",
        "migrate-established,migrate-final-ack",
        "--out",
        out.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for run in summary["runs"].as_array().expect("runs") {
        let (mode, scenario) = (
            run["mode"].as_str().unwrap(),
            run["scenario"].as_str().unwrap(),
        );
        let clients = run["connections"].as_u64().unwrap();
        assert!(clients > 0, "{mode}/{scenario}: {run:#}");
        if mode == "ebpf" {
            assert_eq!(run["ok"].as_u64(), Some(clients), "{run:#}");
            assert_eq!(
                run["notes"]["migrated_in_new_slot"].as_str(),
                Some(clients.to_string().as_str()),
                "the program counted every migration: {run:#}"
            );
        } else {
            // Without the program nor tcp_migrate_req, the queue is reset.
            assert_eq!(run["ok"].as_u64(), Some(0), "{run:#}");
        }
    }
}
