//! The handover lab (`cargo xtask experiment`): runs handover scenarios
//! against our eBPF steering and against the alternatives (our proxy on
//! plain SO_REUSEPORT, with and without the kernel's request migration;
//! HAProxy reloading with `-sf` and with `-x`) under the same open-loop
//! load, each run in a fresh network namespace with its own bpffs mount,
//! and reports what the clients and the kernel saw: raw records, a JSON
//! summary, a markdown table and SVG plots.

mod backend;
mod kernel;
mod load;
mod migrate;
mod modes;
mod records;
mod report;
mod scenario;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::{
    load::Mix,
    modes::Mode,
    scenario::{HungFate, Scenario, Settings},
};

fn scenario_help() -> String {
    let mut s = String::from("Scenarios:\n");
    for sc in Scenario::ALL {
        s.push_str(&format!("  {:<18} {}\n", sc.name(), sc.help()));
    }
    s.push_str(
        "\nModes: ebpf (ours, the default), reuseport (ours with steering = \"reuseport\"), \
         reuseport+migrate (the same with net.ipv4.tcp_migrate_req=1), haproxy-sf and haproxy-x \
         (HAProxy from Debian, classic -sf reload and -x socket transfer).\n\n\
         Output per run in <out>/<mode>/<scenario>/: conns.csv (one line per connection: \
         start, connect time, total time, kind, class), events.csv, generations.csv, run.json; \
         <out>/summary.json and summary.md; connect.svg and generations.svg per run. \
         --report DIR rebuilds the table and plots from the raw records.",
    );
    s
}

#[derive(Parser)]
#[command(
    name = "proxy-lab",
    about = "Kernel-level handover experiments under an open-loop load (root)",
    after_help = scenario_help()
)]
struct Cli {
    /// Contenders to compare, in the same run on the same load (repeat or
    /// comma-separate).
    #[arg(long = "mode", value_delimiter = ',', default_values = ["ebpf"])]
    modes: Vec<Mode>,
    /// Scenarios to run (repeat or comma-separate); see below.
    #[arg(long = "scenario", value_delimiter = ',', default_values = ["rolling"])]
    scenarios: Vec<Scenario>,
    /// New connections per second (open loop: started on schedule whatever
    /// the server does).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// The clients, as kind=weight: short (one request, Connection: close),
    /// keepalive (5 requests, 50 ms apart), stream (a 2 s response), tls
    /// (short over TLS).
    #[arg(long, default_value = "short=100")]
    mix: Mix,
    /// Handovers per run (iterations of the scenario).
    #[arg(long, default_value_t = 100)]
    handovers: u32,
    /// Time between handovers.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The proxies' listener: tcp (bytes) or http (HTTP/1.1 parsed).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "http"])]
    listener: String,
    /// Deadline of one connection (connect and exchange; streams get 2 s
    /// more).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    conn_timeout: Duration,
    /// Drain bound of old generations (hard_stop_after / hard-stop-after).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hard_stop_after: Duration,
    /// Our generations' handover_grace.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    handover_grace: Duration,
    /// hung-old: resume the stopped generation, or kill it.
    #[arg(long, value_enum, default_value = "resume")]
    hung_fate: HungFate,
    /// Load before the first and after the last handover.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Where the runs go (a new folder; default lab-out/<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only rebuild the table and plots of an earlier output folder.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    report: Option<PathBuf>,
    /// The proxy binary (`cargo xtask experiment` passes it).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// Stop starting runs after this long (each run is bounded anyway).
    #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
    max_time: Duration,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Thousands of connections in flight (and more when a contender stalls
/// and they wait for their deadline): raise the open-file limit as far as
/// root may.
fn raise_nofile() -> u64 {
    let want = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // Safety: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // Safety: getrlimit writes the struct we pass.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
        cur.rlim_cur = cur.rlim_max;
        // Safety: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &cur) };
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
    now.rlim_cur
}

fn run(cli: Cli) -> Result<()> {
    let nofile = raise_nofile();
    if let Some(dir) = &cli.report {
        let summary = report::build(dir)?;
        print!("{}", report::markdown(&summary));
        return Ok(());
    }
    if !(cli.rate > 0.0 && cli.rate <= 50_000.0) {
        bail!(
            "--rate {}: expected 0 < rate <= 50000 new connections/s",
            cli.rate
        );
    }
    // A contender that stalls keeps every connection of the deadline in
    // flight, one descriptor each in this process.
    let streams =
        cli.mix.has(records::Kind::Stream) || cli.scenarios.contains(&Scenario::ManyGenerations);
    let longest = cli.conn_timeout
        + if streams {
            load::STREAM_EXTRA
        } else {
            Duration::ZERO
        };
    let worst = cli.rate * longest.as_secs_f64();
    if worst > nofile.saturating_sub(2048) as f64 {
        bail!(
            "--rate {} with --conn-timeout {:?} may keep {worst:.0} connections in flight when a \
             contender stalls, more than this process's open-file limit ({nofile}) allows: \
             lower --conn-timeout or --rate",
            cli.rate,
            cli.conn_timeout
        );
    }
    let proxy_bin = cli
        .proxy
        .clone()
        .or_else(|| std::env::var_os("PROXY_BIN").map(PathBuf::from))
        .context("no proxy binary: pass --proxy or PROXY_BIN (cargo xtask experiment does)")?;
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from("lab-out").join(format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mix = cli.mix.clone();
    if cli.scenarios.contains(&Scenario::ManyGenerations) && !mix.has(records::Kind::Stream) {
        eprintln!(
            "proxy-lab: many-generations: adding stream=10 to the mix (streams keep old generations draining)"
        );
    }
    let settings = |scenario: Scenario| {
        if scenario == Scenario::ManyGenerations && !mix.has(records::Kind::Stream) {
            let mut m = mix.clone();
            m.0.push((records::Kind::Stream, 10));
            m
        } else {
            mix.clone()
        }
    };
    let started = Instant::now();
    for &scenario in &cli.scenarios {
        for &mode in &cli.modes {
            if started.elapsed() > cli.max_time {
                eprintln!("proxy-lab: --max-time reached: not starting {mode} / {scenario}");
                continue;
            }
            let s = Settings {
                proxy_bin: proxy_bin.clone(),
                rate: cli.rate,
                mix: settings(scenario),
                handovers: cli.handovers,
                interval: cli.interval,
                conn_timeout: cli.conn_timeout,
                listener_mode: cli.listener.clone(),
                hard_stop_after: cli.hard_stop_after,
                handover_grace: cli.handover_grace,
                hung_fate: cli.hung_fate,
                settle: cli.settle,
            };
            let dir = out.join(mode.name()).join(scenario.name());
            eprintln!("proxy-lab: {mode} / {scenario} ...");
            let t = Instant::now();
            match scenario::run(mode, scenario, &s, &dir) {
                Ok(info) => eprintln!(
                    "proxy-lab: {mode} / {scenario}: done in {:.1?}{}",
                    t.elapsed(),
                    info.skipped
                        .map(|r| format!(" (skipped: {r})"))
                        .unwrap_or_default()
                ),
                Err(e) => {
                    // The others still run; the report shows what is there.
                    eprintln!("proxy-lab: {mode} / {scenario}: FAILED: {e:#}");
                    let info = records::RunInfo {
                        mode: mode.name().into(),
                        scenario: scenario.name().into(),
                        skipped: Some(format!("the run failed: {e:#}")),
                        ..Default::default()
                    };
                    std::fs::create_dir_all(&dir)?;
                    records::write_run(&dir.join("run.json"), &info)?;
                }
            }
        }
    }
    let summary = report::build(&out)?;
    print!("{}", report::markdown(&summary));
    eprintln!("proxy-lab: results in {}", out.display());
    Ok(())
}
