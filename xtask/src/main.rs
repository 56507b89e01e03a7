//! `cargo xtask`: everything a fresh machine needs, in one place.
//!
//! - `setup`: rust-src for the nightly, bpf-linker built on the nightly's own
//!   LLVM (kept inside `target/xtask-tools`, nothing outside the clone), bpffs
//!   mounted. Idempotent, and quick when all is there.
//! - `build-ebpf`: the steering program, with the nightly and bpf-linker.
//! - `build`: the eBPF object and the proxy binary with the object embedded.
//! - `run`: builds, starts two demo backends and runs the proxy as root on
//!   `examples/proxy.toml`.
//! - `test`: the README's test command; `.ci/run` calls it. Installs the
//!   Debian and Python packages the tests drive when they are missing, and
//!   replays the fuzz targets over their committed corpus (`fuzz.rs`).
//! - `fuzz`: that replay alone.
//! - `pgo`: a new profile for the profile-guided optimisation every release
//!   proxy build uses (`pgo.rs`).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod certs;
mod demo;
mod deps;
mod fuzz;
mod pgo;

#[derive(Parser)]
#[command(about = "Build, run and test the proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build needs (rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Build the eBPF steering object (runs setup when needed).
    BuildEbpf,
    /// Build the eBPF object and the proxy (release) with the object embedded.
    Build,
    /// Build everything, start demo backends on 127.0.0.1:9000 and :9001, and run
    /// the proxy on examples/proxy.toml (or on the config given after `--`).
    Run {
        /// Arguments for `proxy run`, e.g. `-- -c my.toml`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Install what the tests drive (Debian and Python packages, cargo-fuzz)
    /// when missing, build everything, replay the fuzz targets over their
    /// committed corpus and run all tests (root: the tests load eBPF programs
    /// and make network namespaces).
    Test {
        /// Extra arguments for the test binaries, e.g. `-- handover --nocapture`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Measure the proxy against HAProxy and nginx (CPU per request,
    /// latency, memory; installs them when missing), or with `-- --stages`
    /// its stages against the backend reached directly (root).
    Bench {
        /// Arguments for proxy-bench, e.g. `-- --quick` or `-- --seconds 10`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// The handover lab (root): handover scenarios against our eBPF
    /// steering, plain SO_REUSEPORT (with and without tcp_migrate_req) and
    /// HAProxy -sf / -x reloads under an open-loop load; tables and plots.
    /// Installs HAProxy when missing. See `cargo xtask experiment -- --help`.
    Experiment {
        /// Arguments for proxy-lab, e.g. `-- --mode ebpf,haproxy-x --scenario rolling,hung-old`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// The soak (root, about 4 minutes): 100 handovers of the full chain
    /// (TLS + gzip + UNIX + PROXY v2) under a mixed load with a backend that
    /// hangs now and then; prints its figures. SOAK_HANDOVERS=N for fewer.
    Soak,
    /// Replay the fuzz targets over their committed corpus (fuzz/corpus/), as
    /// `test` does; installs cargo-fuzz when missing. No root needed.
    Fuzz,
    /// Write demo certificates (RSA 2048 and ECDSA P-256) into certs/.
    Certs,
    /// Make a new profile for profile-guided optimisation (root, about 10
    /// minutes): an instrumented build, the bench's training run
    /// (`proxy-bench --train`), `llvm-profdata merge` into pgo/proxy.profdata.
    /// Every release proxy build uses that file (PROXY_PGO=off: not).
    /// Installs rustup's llvm-tools and the bench's tools when missing.
    Pgo,
    /// `cargo fmt --check` and `cargo clippy -D warnings` for the host crates,
    /// the eBPF crate and the fuzz targets.
    Lint,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let ws = workspace_root();
    match cli.cmd {
        Cmd::Setup => setup(&ws),
        Cmd::BuildEbpf => build_ebpf(&ws).map(|_| ()),
        Cmd::Build => build_all(&ws, &[], "proxy").map(|_| ()),
        Cmd::Run { args } => {
            let proxy = build_all(&ws, &[], "proxy")?;
            require_root("run")?;
            certs::run(&ws.join("certs"))?;
            let args = if args.is_empty() {
                vec!["-c".into(), ws.join("examples/proxy.toml").into_os_string()]
            } else {
                args
            };
            demo::start(&["127.0.0.1:9000", "127.0.0.1:9001"])?;
            let status = Command::new(&proxy)
                .current_dir(&ws)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", proxy.display()))?;
            if !status.success() {
                bail!("proxy exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { args } => {
            require_root("test")?;
            deps::ensure_test_tools()?;
            let proxy = test_proxy(&ws)?;
            fuzz::replay(&ws)?;
            // One test at a time: the load tests measure rates on 2 cores.
            cargo(&ws)
                .args(["test", "--profile", "ci"])
                .env("PROXY_BIN", &proxy)
                .env("PROXY_EBPF_OBJECT", ebpf_object(&ws))
                .env("NO_COLOR", "1")
                .args(["--", "--test-threads=1"])
                .args(&args)
                .run("cargo test")
        }
        Cmd::Lint => lint(&ws),
        Cmd::Fuzz => fuzz::replay(&ws),
        Cmd::Soak => {
            require_root("soak")?;
            let proxy = test_proxy(&ws)?;
            cargo(&ws)
                .args(["test", "--profile", "ci", "-p", "proxy-integration-tests"])
                .args(["--test", "soak_chain", "--"])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env("PROXY_BIN", &proxy)
                .env("NO_COLOR", "1")
                .run("the soak")
        }
        Cmd::Certs => certs::run(&ws.join("certs")),
        Cmd::Pgo => {
            require_root("pgo")?;
            deps::ensure_bench_tools()?;
            let object = build_ebpf(&ws)?;
            pgo::generate(&ws, &object)
        }
        Cmd::Experiment { args } => {
            let proxy = build_all(&ws, &[], "proxy")?;
            require_root("experiment")?;
            deps::ensure_lab_tools()?;
            cargo(&ws)
                .args([
                    "run",
                    "--release",
                    "--package",
                    "proxy-lab",
                    "--",
                    "--proxy",
                ])
                .arg(&proxy)
                .args(&args)
                .run("proxy-lab")
        }
        Cmd::Bench { args } => {
            let proxy = build_all(&ws, &[], "proxy")?;
            require_root("bench")?;
            deps::ensure_bench_tools()?;
            cargo(&ws)
                .args([
                    "run",
                    "--release",
                    "--package",
                    "proxy-bench",
                    "--",
                    "--proxy",
                ])
                .arg(&proxy)
                .args(&args)
                .run("proxy-bench")
        }
    }
}

fn lint(ws: &Path) -> Result<()> {
    let object = build_ebpf(ws)?;
    cargo(ws)
        .args(["fmt", "--all", "--", "--check"])
        .run("cargo fmt --check")?;
    cargo(ws)
        .args(["clippy", "--all-targets", "--all-features"])
        .env("PROXY_EBPF_OBJECT", &object)
        .args(["--", "-D", "warnings"])
        .run("cargo clippy (host crates)")?;
    let components = rustup()
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output_text("rustup component list")?;
    if !components.lines().any(|l| l.starts_with("clippy")) {
        rustup()
            .args(["component", "add", "clippy", "--toolchain", "nightly"])
            .run("rustup component add clippy")?;
    }
    ebpf_cargo(ws)
        .args(["clippy", "--release"])
        .args(["-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .args(["--", "-D", "warnings"])
        .run("cargo clippy (eBPF crate)")?;
    fuzz::lint(ws)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn tools_dir(ws: &Path) -> PathBuf {
    ws.join("target/xtask-tools")
}

fn ebpf_object(ws: &Path) -> PathBuf {
    ws.join("target/bpfel-unknown-none/release/proxy")
}

fn require_root(what: &str) -> Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "`cargo xtask {what}` needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for bpffs and namespaces)"
        );
    }
    Ok(())
}

/// A `cargo` for the host toolchain, unaffected by the toolchain the xtask
/// itself was started with.
fn cargo(ws: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(ws);
    cmd
}

trait Run {
    fn run(&mut self, what: &str) -> Result<()>;
    fn output_text(&mut self, what: &str) -> Result<String>;
}

impl Run for Command {
    fn run(&mut self, what: &str) -> Result<()> {
        let status = self
            .status()
            .with_context(|| format!("{what}: could not start {:?}", self.get_program()))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    }

    fn output_text(&mut self, what: &str) -> Result<String> {
        let out = self
            .output()
            .with_context(|| format!("{what}: could not start {:?}", self.get_program()))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // The xtask runs under the stable cargo, whose RUSTUP_TOOLCHAIN would
    // otherwise win over `+nightly`.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn setup(ws: &Path) -> Result<()> {
    let toolchains = rustup()
        .args(["toolchain", "list"])
        .output_text("rustup toolchain list")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the eBPF program needs a nightly toolchain and none is installed; install one with \
             `rustup toolchain install nightly --profile minimal --component rust-src`"
        );
    }
    let components = rustup()
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output_text("rustup component list")?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        rustup()
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .run("rustup component add rust-src")?;
    }
    ensure_bpf_linker(ws)?;
    mount_bpffs();
    Ok(())
}

fn bpf_linker(ws: &Path) -> PathBuf {
    tools_dir(ws).join("bin/bpf-linker")
}

/// bpf-linker 0.13 built against the nightly's own libLLVM, so no system LLVM
/// is needed. Rebuilt only when missing or broken.
fn ensure_bpf_linker(ws: &Path) -> Result<()> {
    let linker = bpf_linker(ws);
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let version = rustup()
        .args(["run", "nightly", "rustc", "-vV"])
        .output_text("rustc +nightly -vV")?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .to_string();
    let sysroot = rustup()
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output_text("rustc +nightly --print sysroot")?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        .with_context(|| {
            format!(
                "the nightly toolchain has no libLLVM.so.{llvm_major}* in {}",
                libdir.display()
            )
        })?;
    let prefix = tools_dir(ws).join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker against the nightly's LLVM {llvm_major} (about a minute)"
    );
    cargo(ws)
        .args(["install", "bpf-linker", "--version", "^0.13", "--locked"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(tools_dir(ws))
        .env("LLVM_PREFIX", &prefix)
        .run("cargo install bpf-linker")
}

/// Mounts bpffs on /sys/fs/bpf when it is not; a failure is only a warning
/// (the config may name another bpffs).
fn mount_bpffs() {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return;
    }
    match Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
    {
        Ok(s) if s.success() => eprintln!("xtask: mounted bpffs on /sys/fs/bpf"),
        _ => eprintln!(
            "xtask: warning: could not mount bpffs on /sys/fs/bpf (not root?); \
             the proxy pins its maps there by default"
        ),
    }
}

fn build_ebpf(ws: &Path) -> Result<PathBuf> {
    setup(ws)?;
    ebpf_cargo(ws)
        .args(["build", "--release"])
        .args(["-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .run("building the eBPF program")?;
    let object = ebpf_object(ws);
    if !object.exists() {
        bail!("the eBPF build did not produce {}", object.display());
    }
    Ok(object)
}

/// `cargo` of the nightly, in the eBPF crate, with bpf-linker on PATH.
fn ebpf_cargo(ws: &Path) -> Command {
    let path = format!(
        "{}:{}",
        tools_dir(ws).join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = rustup();
    cmd.env_remove("RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", path)
        .current_dir(ws.join("proxy-ebpf"))
        .args(["run", "nightly", "cargo"]);
    cmd
}

/// The proxy the tests drive: built with the fault injection they use
/// (PROXY_TEST_HOOK) and linked to `target/release/proxy-test-hooks`, so that
/// `target/release/proxy` stays the product (a test build would carry little
/// of the PGO profile: the feature changes every symbol's hash).
fn test_proxy(ws: &Path) -> Result<PathBuf> {
    build_all(ws, &["test-hooks"], "proxy-test-hooks")
}

/// The eBPF object and the release proxy with it embedded, with the proxy's
/// cargo `features` (none for the product), and with the committed PGO
/// profile when it can be used (`pgo.rs`).
///
/// Built for an explicit `--target` (the host), so that the profile's flags
/// apply to the proxy and its dependencies but not to build scripts, and do
/// not fight other release builds (the bench, the lab) over the artifacts of
/// shared dependencies; then linked to `target/release/<name>`: `proxy` for
/// the product, where the README and the packaging look for it.
fn build_all(ws: &Path, features: &[&str], name: &str) -> Result<PathBuf> {
    let object = build_ebpf(ws)?;
    let rustc = pgo::rustc()?;
    cargo(ws)
        .args(["build", "--release", "--package", "proxy"])
        .args(["--target", &rustc.host])
        .args(["--features", &features.join(",")])
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", pgo::use_flags(ws, &rustc)?)
        .env("PROXY_EBPF_OBJECT", &object)
        .run("building the proxy")?;
    let built = ws.join("target").join(&rustc.host).join("release/proxy");
    let product = ws.join("target/release").join(name);
    fs::create_dir_all(ws.join("target/release"))?;
    // Unlink first: a running proxy keeps its (old) file; a hard link
    // where possible, as cargo itself does.
    match fs::remove_file(&product) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", product.display()));
        }
        _ => {}
    }
    if fs::hard_link(&built, &product).is_err() {
        fs::copy(&built, &product)
            .with_context(|| format!("copying {} to {}", built.display(), product.display()))?;
    }
    Ok(product)
}
