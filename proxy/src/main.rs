//! The `proxy` command line: run a generation, check a config, show status.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use proxy::{
    config::Config,
    generation::{self, Options, TestHook},
    stats::status,
    steering::{
        self, SteeringError,
        canary::{self, weight_from_percent},
    },
};

/// The C `pow`, defined here so that the static linker resolves the one
/// call site in the binary (tokio's multi-thread scheduler, the moving
/// average of its task poll times, once per batch of polls) without libm:
/// with nothing else from it, `libm.so.6` is then not loaded at all, and its
/// 0.4–0.5 MB of mapped pages leave the RSS of every generation. The `libm`
/// crate is the Rust port of musl's libm (the compiler's builtins use it).
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// The version, and whether this build reads the tests' fault hook.
const VERSION: &str = if cfg!(feature = "test-hooks") {
    concat!(env!("CARGO_PKG_VERSION"), " (test-hooks)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(
    name = "proxy",
    version = VERSION,
    about = "A layer-4 proxy whose upgrades lose nothing",
    long_about = "A layer-4 proxy whose upgrades lose nothing.\n\n\
Generations of one instance share their ports through SO_REUSEPORT; an eBPF \
sk_reuseport program sends every new connection to the active generation. \
Starting a new generation with the same config name takes over: it flips the \
active slot, the old generation closes its listeners (its queue migrates in \
the kernel), drains and exits.\n\n\
Signals (HAProxy habits): SIGTTOU stop accepting, SIGTTIN accept again and \
take traffic back, SIGUSR1 soft-stop (stop accepting, drain, exit), \
SIGTERM/SIGINT hard stop.\n\n\
Canary: `proxy run -c FILE --canary 10` starts a generation that takes 10% \
of new connections (chosen by flow hash, one client connection stays on one \
generation) beside the active one; `proxy canary --weight P` changes the \
share, `proxy promote` makes it active (the old generation drains as in a \
handover), `proxy abort` sends everything back (the canary drains). The \
active generation aborts a canary whose error rate is too high \
([global.canary])."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a generation in the foreground; takes over from a running one.
    Run {
        /// Config file (TOML).
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Write the PID here once active (overrides global.pidfile).
        #[arg(short = 'p', long = "pidfile")]
        pidfile: Option<PathBuf>,
        /// Old PIDs to soft-stop (SIGUSR1) once this generation is active.
        #[arg(long = "sf", num_args = 1.., value_name = "PID")]
        soft_stop: Vec<u32>,
        /// Old PIDs to hard-stop (SIGTERM) once this generation is active.
        #[arg(long = "st", num_args = 1.., value_name = "PID")]
        hard_stop: Vec<u32>,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
        /// Start as a canary: take this share of new connections (percent,
        /// 0-100, e.g. 10 or 2.5) beside the active generation instead of
        /// taking over.
        #[arg(long, value_name = "PERCENT", conflicts_with_all = ["soft_stop", "hard_stop"])]
        canary: Option<f64>,
    },
    /// Change the share of new connections of the running canary.
    Canary {
        #[command(flatten)]
        instance: Instance,
        /// The new share in percent (0-100; 0 keeps the canary running
        /// with no new connections).
        #[arg(long, value_name = "PERCENT")]
        weight: f64,
    },
    /// Make the running canary the active generation; the old one
    /// soft-stops (drain, hard_stop_after) as in a handover.
    Promote {
        #[command(flatten)]
        instance: Instance,
    },
    /// Send every new connection back to the active generation; the canary
    /// soft-stops.
    Abort {
        #[command(flatten)]
        instance: Instance,
    },
    /// Validate a config: exit 0, or 1 with the reason.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Show the generations of an instance and the steering counters.
    Status {
        #[command(flatten)]
        instance: Instance,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which instance a command is about: from a config, or by name.
#[derive(clap::Args)]
struct Instance {
    /// Take the instance name and bpffs from this config.
    #[arg(short = 'c', long = "config", conflicts_with = "name")]
    config: Option<PathBuf>,
    /// Instance name (global.name).
    #[arg(long, required_unless_present = "config")]
    name: Option<String>,
    /// bpffs mount the instance pins under.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

impl Instance {
    /// (name, bpffs).
    fn resolve(self) -> Result<(String, PathBuf)> {
        Ok(match self.config {
            Some(path) => {
                let cfg = Config::load(&path)?;
                (cfg.global.name, cfg.global.bpffs)
            }
            None => (self.name.expect("clap requires --name"), self.bpffs),
        })
    }

    /// The instance's pinned maps, locked for one change.
    fn maps(self) -> Result<(String, steering::Maps)> {
        let (name, bpffs) = self.resolve()?;
        let maps = steering::Maps::open(&steering::pin_dir(&bpffs, &name))
            .with_context(|| format!("instance {name}"))?;
        Ok((name, maps))
    }
}

/// HAProxy spells them `-sf` and `-st`: accept the single-dash form too.
fn args() -> Vec<String> {
    std::env::args()
        .map(|a| match a.as_str() {
            "-sf" => "--sf".to_string(),
            "-st" => "--st".to_string(),
            _ => a,
        })
        .collect()
}

// The system allocator (glibc). mimalloc 0.1.52 (its v3) was measured in
// its place, interleaved with the same build on glibc, one thread, the
// bench's small keep-alive and `Connection: close` loads: as is, CPU per
// request within the noise (medians 20.3 vs 21.6 and 36.5 vs 38.6 us,
// better in 5 and 3 of 9 pairs) for 16.5 MB idle RSS against 6.5 (it backs
// its arena with transparent huge pages); with its `no_thp` feature,
// 21.1 vs 19.8 and 39.3 vs 38.2 us (5 pairs) for 7.1-7.4 MB idle and
// 8.6-8.9 MB peak against 6.2-6.5 and 7.6-8.0. Not kept: it won neither.
fn main() -> ExitCode {
    let cli = Cli::parse_from(args());
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            // Load what the stages load at startup (certificates), so that
            // check catches everything run would.
            for l in &cfg.listeners {
                proxy::stage::StageSettings::try_from((&cfg, l))?;
            }
            println!(
                "{}: ok (instance {}, {} listeners, {} backends)",
                config.display(),
                cfg.global.name,
                cfg.listeners.len(),
                cfg.backends.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Canary { instance, weight } => {
            let weight_bp = weight_from_percent(weight).map_err(SteeringError::Weight)?;
            let (name, mut maps) = instance.maps()?;
            let was = maps.lock()?.set_canary_weight(weight_bp)?;
            println!(
                "instance {name}: canary generation {} (slot {}) now takes {}% of new connections \
                 (was {}%)",
                was.record.generation,
                was.canary.slot,
                canary::percent(weight_bp),
                canary::percent(was.canary.weight_bp)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Promote { instance } => {
            let (name, mut maps) = instance.maps()?;
            let previous = maps.active_slot()?;
            let promoted = maps.lock()?.promote_canary(None)?;
            println!(
                "instance {name}: canary generation {} (slot {}) promoted: it takes every new \
                 connection; the generation in slot {} soft-stops",
                promoted.record.generation,
                promoted.canary.slot,
                previous.map_or_else(|| "-".to_string(), |s| s.0.to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Abort { instance } => {
            let (name, mut maps) = instance.maps()?;
            let aborted = maps.lock()?.abort_canary(None)?;
            println!(
                "instance {name}: canary generation {} (slot {}) aborted: every new connection \
                 goes to the active generation; the canary soft-stops",
                aborted.record.generation, aborted.canary.slot
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { instance, json } => {
            let (name, bpffs) = instance.resolve()?;
            let st = status::read(&bpffs, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status::render(&st));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            config,
            pidfile,
            soft_stop,
            hard_stop,
            log_json,
            canary,
        } => {
            let canary = canary
                .map(weight_from_percent)
                .transpose()
                .map_err(SteeringError::Weight)
                .context("--canary")?;
            // Validate completely before touching anything: a bad config
            // exits here and the running generation never notices.
            let cfg = Config::load(&config)?;
            init_logs(log_json);
            let opts = Options {
                config: cfg,
                pidfile,
                soft_stop,
                hard_stop,
                canary,
                hook: TestHook::from_env(),
            };
            opts.validate()?;
            // Single-threaded still: capabilities are per thread.
            proxy::privilege::drop_if_configured(&opts.config, opts.pidfile.as_deref())?;
            let rt = runtime(opts.config.global.nbthread).context("starting the tokio runtime")?;
            rt.block_on(async {
                // First thing: a signal during startup must not kill us.
                let commands = generation::signal_commands()?;
                generation::run(opts, commands).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The runtime of the listeners without `cpus`: `nbthread = 1` runs them
/// with everything else on this thread (tokio's current-thread scheduler:
/// no hand-over between threads, no work stealing; measured 6-10% less
/// CPU per small request than one worker thread beside the main one).
fn runtime(nbthread: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match nbthread {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Without `PROXY_LOG`: `info`, but only errors from rustls, whose
/// warnings are about what one client sent (an IP address as SNI, which
/// every client connecting by address sends) and came once per connection;
/// our own lines say when a handshake fails.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
