//! The fuzz targets in `fuzz/` (cargo-fuzz, built with the nightly), replayed
//! over their committed seed corpus by `cargo xtask test`, so that an input
//! that once crashed, or a seed that stops passing, fails CI.
//!
//! cargo-fuzz is installed into `target/xtask-tools` like bpf-linker, once.
//! The replay builds the targets unoptimized (cargo-fuzz's `--dev`: a cold
//! build takes about half the CPU time of its release build, which uses one
//! codegen unit, and a few dozen inputs run in well under a second either
//! way), with debug assertions and without a sanitizer, since the proxy has
//! no unsafe code to check. Long fuzzing runs want the release build:
//!
//! ```text
//! cargo +nightly fuzz run --sanitizer none --debug-assertions <target> -- -max_total_time=600
//! ```

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{Run, rustup, tools_dir};

/// How the replay builds the targets (`--dev` has debug assertions).
const BUILD_FLAGS: &[&str] = &["--dev", "--sanitizer", "none"];

/// Builds every fuzz target and runs each once over `fuzz/corpus/<target>/`
/// (`-runs=0`: the inputs as they are, no fuzzing).
pub fn replay(ws: &Path) -> Result<()> {
    ensure_cargo_fuzz(ws)?;
    let dir = ws.join("fuzz");
    fuzz_cargo(ws)
        .args(["fuzz", "build"])
        .args(BUILD_FLAGS)
        .run("building the fuzz targets")?;
    let list = fuzz_cargo(ws)
        .args(["fuzz", "list"])
        .output_text("cargo fuzz list")?;
    let targets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list names no target in {}", dir.display());
    }
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        let seeds = fs::read_dir(&corpus)
            .with_context(|| {
                format!(
                    "fuzz target {target} has no seed corpus at {}; commit a few inputs there",
                    corpus.display()
                )
            })?
            .count();
        eprintln!("xtask: replaying {seeds} inputs of fuzz/corpus/{target}");
        fuzz_cargo(ws)
            .args(["fuzz", "run"])
            .args(BUILD_FLAGS)
            .arg(target)
            .arg(&corpus)
            .args(["--", "-runs=0"])
            .run(&format!("fuzz target {target} over its corpus"))?;
    }
    Ok(())
}

/// fmt and clippy for `fuzz/`, which `--all` in the workspace leaves out
/// (it is not a member). Clippy with the nightly, as the targets build.
pub fn lint(ws: &Path) -> Result<()> {
    fuzz_cargo(ws)
        .args(["fmt", "--", "--check"])
        .run("cargo fmt --check (fuzz targets)")?;
    fuzz_cargo(ws)
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .run("cargo clippy (fuzz targets)")
}

fn cargo_fuzz(ws: &Path) -> PathBuf {
    tools_dir(ws).join("bin/cargo-fuzz")
}

/// cargo-fuzz in `target/xtask-tools`, installed when missing or broken.
fn ensure_cargo_fuzz(ws: &Path) -> Result<()> {
    if Command::new(cargo_fuzz(ws))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz into target/xtask-tools (about a minute)");
    crate::cargo(ws)
        .args(["install", "cargo-fuzz", "--locked", "--root"])
        .arg(tools_dir(ws))
        .run("cargo install cargo-fuzz")
}

/// `cargo` of the nightly in `fuzz/`, with cargo-fuzz on PATH.
fn fuzz_cargo(ws: &Path) -> Command {
    let path = format!(
        "{}:{}",
        tools_dir(ws).join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = rustup();
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Line numbers in a panic are all a failing replay needs; full
        // debug info only makes the cold build slower.
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .env("PATH", path)
        .current_dir(ws.join("fuzz"))
        .args(["run", "nightly", "cargo"]);
    cmd
}
