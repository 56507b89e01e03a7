//! `proxy-bench`: where the proxy stands against HAProxy and nginx
//! ([`peers`], the default), and what its data-path stages cost against the
//! backend reached directly ([`stages`], `--stages`).
//!
//! ```sh
//! cargo xtask bench                       # the peer comparison (about 5 minutes)
//! cargo xtask bench -- --quick            # one short run of every row (under 3 minutes)
//! cargo xtask bench -- --stages --seconds 3
//! cargo xtask pgo                         # the training run (--train) of a new PGO profile
//! ```
//!
//! Figures are printed and written, never asserted.

mod backend;
mod client;
mod floor;
mod peers;
mod stages;
mod stats;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "proxy-bench",
    about = "Measure the proxy against HAProxy and nginx (default), or its stages against the \
             backend reached directly (--stages)"
)]
struct Args {
    /// The proxy binary (`cargo xtask build` makes target/release/proxy).
    #[arg(long)]
    proxy: PathBuf,
    /// How long each measurement runs (default: 5, or 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=300))]
    seconds: Option<u64>,
    /// Runs of every row against every contender; the table shows the
    /// median and the spread (default: 2, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=20))]
    runs: Option<u64>,
    /// Short measurements, one run: the whole comparison in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Where the results folder (`<UTC time>/results.{json,md}`) is made
    /// (default: bench/out in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure the proxy's stages against the backend reached directly
    /// instead of the peers.
    #[arg(long)]
    stages: bool,
    /// The training run of profile-guided optimisation (`cargo xtask pgo`,
    /// with an instrumented proxy): the stage topology, then our proxy
    /// alone through every row of the peer comparison and an HTTP/2 load,
    /// each stopped gracefully so that it writes its profile. Nothing is
    /// reported.
    #[arg(long, conflicts_with_all = ["stages", "quick", "runs"])]
    train: bool,
    /// --stages: concurrent clients per measurement.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
}

fn main() -> ExitCode {
    // The floor forwarder the peer comparison starts beside the contenders
    // (`floor.rs`): `--floor-serve LISTEN ORIGIN`, not for hand use.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--floor-serve") {
        let addrs: Result<Vec<std::net::SocketAddr>, _> =
            argv[2..].iter().map(|a| a.parse()).collect();
        let result = match addrs.as_deref() {
            Ok([listen, origin]) => floor::serve(*listen, *origin),
            _ => Err(anyhow::anyhow!(
                "--floor-serve takes two addresses (LISTEN ORIGIN), got {:?}",
                &argv[2..]
            )),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("proxy-bench --floor-serve: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.stages || args.train {
        stages::run(&stages::Args {
            proxy: args.proxy.clone(),
            seconds: args.seconds.unwrap_or(if args.train { 1 } else { 5 }),
            connections: args.connections,
        })?;
        if args.stages {
            return Ok(());
        }
    }
    let quick = args.quick;
    peers::run(&peers::Args {
        proxy: args.proxy,
        seconds: args
            .seconds
            .unwrap_or(if quick || args.train { 2 } else { 5 }),
        runs: usize::try_from(args.runs.unwrap_or(if quick { 1 } else { 2 }))?,
        quick,
        out: args.out.unwrap_or_else(peers::default_out),
        train: args.train,
    })
}
