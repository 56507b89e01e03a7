//! Profile-guided optimisation of the product build.
//!
//! [`use_flags`]: the release proxy is built with
//! `-Cprofile-use=pgo/proxy.profdata` when that profile is there and was
//! made with the LLVM major version of the rustc at hand (an indexed profile
//! of another LLVM may not load); otherwise, or with `PROXY_PGO=off`, without
//! it, and xtask says why. A profile older than the code still loads:
//! functions that changed since are built as without one.
//!
//! [`generate`] (`cargo xtask pgo`) makes a new profile: an instrumented
//! build in `target/pgo`, the bench's training run (`proxy-bench --train`:
//! the stage topology, then every row of the peer comparison and an HTTP/2
//! load, each proxy stopped gracefully so that it writes its counts), and
//! `llvm-profdata merge` from rustup's `llvm-tools` component.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{Run, cargo};

/// The committed profile, relative to the workspace.
pub const PROFILE: &str = "pgo/proxy.profdata";
/// The `LLVM version:` line of the rustc that made it.
const LLVM_VERSION: &str = "pgo/llvm-version";

/// What `rustc -vV` says of itself: the host triple and the LLVM version.
pub struct Rustc {
    pub host: String,
    pub llvm: String,
}

pub fn rustc() -> Result<Rustc> {
    let text = Command::new("rustc").arg("-vV").output_text("rustc -vV")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("`rustc -vV` printed no `{name}` line"))
    };
    Ok(Rustc {
        host: field("host:")?,
        llvm: field("LLVM version:")?,
    })
}

fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

/// The rustc flags (`CARGO_ENCODED_RUSTFLAGS`, after any the user set) for
/// the release proxy: with the profile when it can be used.
pub fn use_flags(ws: &Path, rustc: &Rustc) -> Result<String> {
    let mut flags = user_flags();
    let profile = ws.join(PROFILE);
    let skip = |why: String| eprintln!("xtask: building the proxy without PGO: {why}");
    if env::var("PROXY_PGO").is_ok_and(|v| v == "off") {
        skip("PROXY_PGO=off".into());
    } else if !profile.is_file() {
        skip(format!(
            "{} is missing (`cargo xtask pgo` makes it)",
            PROFILE
        ));
    } else {
        let made_with = fs::read_to_string(ws.join(LLVM_VERSION)).unwrap_or_default();
        let made_with = made_with.trim();
        if major(made_with) == major(&rustc.llvm) {
            flags.push(format!("-Cprofile-use={}", profile.display()));
            // Functions changed since the profile was made are built as
            // without one; LLVM would warn about each.
            flags.push("-Cllvm-args=-no-pgo-warn-mismatch".into());
        } else {
            skip(format!(
                "{PROFILE} was made with LLVM {made_with:?}, this rustc has LLVM {} \
                 (`cargo xtask pgo` makes a new one)",
                rustc.llvm
            ));
        }
    }
    Ok(flags.join("\x1f"))
}

/// The flags the user gave cargo, in `CARGO_ENCODED_RUSTFLAGS` or `RUSTFLAGS`.
fn user_flags() -> Vec<String> {
    if let Ok(encoded) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        return encoded
            .split('\x1f')
            .filter(|f| !f.is_empty())
            .map(String::from)
            .collect();
    }
    env::var("RUSTFLAGS")
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// `cargo xtask pgo`: a new `pgo/proxy.profdata` for `object` (the eBPF
/// object the proxy embeds).
pub fn generate(ws: &Path, object: &Path) -> Result<()> {
    let rustc = rustc()?;
    // For the toolchain the xtask runs with (RUSTUP_TOOLCHAIN), as `rustc`.
    Command::new("rustup")
        .args(["component", "add", "llvm-tools"])
        .current_dir(ws)
        .run("rustup component add llvm-tools")?;
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(ws)
        .output_text("rustc --print sysroot")?;
    let profdata = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(&rustc.host)
        .join("bin/llvm-profdata");
    if !profdata.is_file() {
        bail!("{} is missing after adding llvm-tools", profdata.display());
    }

    let dir = ws.join("target/pgo");
    let raw = dir.join("raw");
    if raw.exists() {
        fs::remove_dir_all(&raw).with_context(|| format!("removing {}", raw.display()))?;
    }
    fs::create_dir_all(&raw)?;
    cargo(ws)
        .args(["build", "--release", "--package", "proxy"])
        .args(["--target", &rustc.host, "--target-dir"])
        .arg(dir.join("build"))
        .env_remove("RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("-Cprofile-generate={}", raw.display()),
        )
        .env("PROXY_EBPF_OBJECT", object)
        .run("building the instrumented proxy")?;
    let instrumented = dir.join("build").join(&rustc.host).join("release/proxy");

    cargo(ws)
        .args(["run", "--release", "--package", "proxy-bench", "--"])
        .arg("--proxy")
        .arg(&instrumented)
        .arg("--train")
        .run("the training run (proxy-bench --train)")?;

    let mut counts: Vec<PathBuf> = fs::read_dir(&raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    counts.sort();
    if counts.is_empty() {
        bail!(
            "the training run left no profile in {} (did the proxy exit gracefully?)",
            raw.display()
        );
    }
    let out = ws.join(PROFILE);
    fs::create_dir_all(out.parent().expect("pgo/"))?;
    Command::new(&profdata)
        .arg("merge")
        .arg("-o")
        .arg(&out)
        .args(&counts)
        .run("llvm-profdata merge")?;
    fs::write(ws.join(LLVM_VERSION), format!("{}\n", rustc.llvm))?;
    eprintln!(
        "xtask: wrote {} ({} KiB, LLVM {}) from {} raw profile(s); commit it with {}",
        out.display(),
        fs::metadata(&out)?.len() / 1024,
        rustc.llvm,
        counts.len(),
        LLVM_VERSION
    );
    Ok(())
}
