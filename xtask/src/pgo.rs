//! Profile-guided optimisation of the product build.
//!
//! [`use_flags`]: the release proxy is built with
//! `-Cprofile-use=pgo/proxy.profdata` when that profile is there and was
//! made with the LLVM major version of the rustc at hand (an indexed profile
//! of another LLVM may not load); otherwise, or with `PROXY_PGO=off`, without
//! it, and xtask says why. A profile older than the code still loads:
//! functions that changed since are built as without one.
//!
//! A profile finds a function by its symbol name, and Rust's symbol names
//! carry a hash of the crate's cargo metadata: a dependency added or updated,
//! a version bump, changes them for nearly every function of the proxy (the
//! generic code of tokio and hyper is named in the proxy's crate). The
//! profile still loads but then covers little: adding one dependency took
//! `.text` from 6.4 to 7.1 MB. So `pgo/made-with` also records a hash of the
//! manifests and the lock file ([`inputs`]), and xtask warns when they
//! changed since the profile was made.
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
/// What made it: the rustc's `LLVM version:` line, and `inputs:` (the hash
/// of [`INPUTS`]).
const MADE_WITH: &str = "pgo/made-with";
/// The files whose changes rename the proxy's symbols.
const INPUTS: [&str; 4] = [
    "Cargo.lock",
    "Cargo.toml",
    "proxy/Cargo.toml",
    "proxy-common/Cargo.toml",
];

/// FNV-1a (64 bits) over [`INPUTS`], in hex: stable across Rust releases,
/// unlike std's hasher.
fn inputs(ws: &Path) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for name in INPUTS {
        let path = ws.join(name);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        for b in name.bytes().chain([0]).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// A `name: value` line of `pgo/made-with`.
fn made_with(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

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
        let text = fs::read_to_string(ws.join(MADE_WITH)).unwrap_or_default();
        let llvm = made_with(&text, "LLVM version:");
        if major(&llvm) == major(&rustc.llvm) {
            flags.push(format!("-Cprofile-use={}", profile.display()));
            // Functions changed since the profile was made are built as
            // without one; LLVM would warn about each.
            flags.push("-Cllvm-args=-no-pgo-warn-mismatch".into());
            if made_with(&text, "inputs:") != inputs(ws)? {
                eprintln!(
                    "xtask: warning: the manifests or Cargo.lock changed since {PROFILE} was \
                     made, which renames most of the proxy's functions: the profile now \
                     covers little of the build. Make a new one with `cargo xtask pgo` \
                     (root, about 10 minutes) and commit it."
                );
            }
        } else {
            skip(format!(
                "{PROFILE} was made with LLVM {llvm:?}, this rustc has LLVM {} \
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
    fs::write(
        ws.join(MADE_WITH),
        format!("LLVM version: {}\ninputs: {}\n", rustc.llvm, inputs(ws)?),
    )?;
    eprintln!(
        "xtask: wrote {} ({} KiB, LLVM {}) from {} raw profile(s); commit it with {MADE_WITH}",
        out.display(),
        fs::metadata(&out)?.len() / 1024,
        rustc.llvm,
        counts.len(),
    );
    Ok(())
}
