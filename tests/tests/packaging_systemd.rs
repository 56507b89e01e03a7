//! Checks of `packaging/systemd/` with the real tools, and of its units and
//! script with real generations: `systemd-analyze verify` and `security
//! --offline` on both template units; the settings the upgrade relies on;
//! the canary unit's hardening against the generation unit's; a real
//! systemd booted with `systemd-nspawn` running the units, `proxy-upgrade`
//! (an upgrade, a canary promoted, a canary aborted), a crash and a stop;
//! `shellcheck` of `proxy-upgrade` and runs of it through a stand-in
//! `systemctl`; generations under exactly the unit's capability bounding
//! set (`setpriv`), and traced with `strace` against its
//! `SystemCallFilter=` and `RestrictAddressFamilies=`.
//!
//! The tests that run generations need root, like the other integration
//! tests. A missing tool fails its test and names the package to install;
//! nothing is skipped. Debian: systemd systemd-container jq shellcheck
//! strace util-linux curl.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_harness::{
    Backend, PROXY_ADDR, Proxy, Sandbox, Signal, exchange, next_id,
    packaging::{
        Out, cap_name, duration, handover_config, handover_within_capabilities, is_executable,
        packaging, read, require_tool, run, run_ok, shellcheck, toml_string, workspace,
    },
    procfs::{children, first_child, proc_state},
    proxy::proxy_bin,
    sandbox::{require_root, unmount},
    signals::signal,
};
use serde_json::Value;

fn unit_path() -> PathBuf {
    packaging("systemd/proxy@.service")
}

fn canary_unit_path() -> PathBuf {
    packaging("systemd/proxy-canary@.service")
}

/// Both template units: (file name, path).
fn units() -> [(&'static str, PathBuf); 2] {
    [
        ("proxy@.service", unit_path()),
        ("proxy-canary@.service", canary_unit_path()),
    ]
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
        "[{section}] {key}= must be set exactly once: {values:?}"
    );
    values[0].clone()
}

/// A unit's text with its binaries (`/usr/local/bin/proxy`, and the
/// canary's `/usr/local/bin/proxy.canary`) at `bin`.
fn unit_text_with_binary(path: &Path, bin: &str) -> String {
    read(path)
        .replace("/usr/local/bin/proxy.canary", bin)
        .replace("/usr/local/bin/proxy", bin)
}

/// A copy of a unit whose binary is the built one, so that systemd-analyze
/// checks real executables.
fn unit_copy(name: &str, path: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("creating a temporary folder");
    let text = unit_text_with_binary(path, &proxy_bin().display().to_string());
    let copy = dir.path().join(name);
    fs::write(&copy, text).expect("writing the unit copy");
    (dir, copy)
}

fn systemd_analyze() -> PathBuf {
    require_tool("systemd-analyze", "apt-get install systemd")
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    for (name, path) in units() {
        let (dir, copy) = unit_copy(name, &path);
        let out = run(
            Command::new(&analyze)
                .args(["verify", "--man=no"])
                .arg(&copy),
            Duration::from_secs(60),
        );
        // verify exits 0 on mere warnings (an unknown key, a value it
        // cannot parse and ignores): any word about our unit is a failure.
        let prefix = name.trim_end_matches(".service");
        let ours: Vec<&str> = out
            .stderr
            .lines()
            .chain(out.stdout.lines())
            .filter(|l| l.contains(prefix) || l.contains(&*dir.path().to_string_lossy()))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {}:\n{}",
            path.display(),
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
            "systemd-analyze verify accepted a copy of {name} whose ExecStart does not exist:\n{}",
            out.text()
        );
    }
}

#[test]
fn systemd_units_hardening_exposure_stays_low() {
    let analyze = systemd_analyze();
    for (name, path) in units() {
        let (_dir, copy) = unit_copy(name, &path);
        // --threshold is on the 0..100 scale; the printout divides by ten.
        let out = run(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--no-pager", "--threshold=40"])
                .arg(&copy),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "systemd-analyze security rates {name} above 4.0 (hardening lost?):\n{}",
            out.text()
        );
    }
}

/// The canary unit is the generation unit with a canary's start: every
/// setting is the same (privileges, hardening, notifications, stop,
/// timeouts) but the few that make it a canary, and those are as the
/// README describes.
#[test]
fn systemd_canary_unit_is_the_generation_unit_with_a_canary_start() {
    let unit = unit_settings(&read(&unit_path()));
    let canary = unit_settings(&read(&canary_unit_path()));
    // What may differ: the description, the start, the restart policy, the
    // canary's own environment file, and [Install] (a canary never starts
    // at boot).
    let differs = |(section, key, _): &&(String, String, String)| {
        section == "Install"
            || matches!(
                (section.as_str(), key.as_str()),
                ("Unit", "Description")
                    | (
                        "Service",
                        "ExecStartPre" | "ExecStart" | "Restart" | "RestartSec" | "EnvironmentFile"
                    )
            )
    };
    let shared = |s: &[(String, String, String)]| -> BTreeSet<(String, String, String)> {
        s.iter().filter(|x| !differs(x)).cloned().collect()
    };
    let (unit_shared, canary_shared) = (shared(&unit), shared(&canary));
    assert!(
        unit_shared.len() > 30,
        "the comparison must cover the hardening: {unit_shared:?}"
    );
    assert_eq!(
        unit_shared.difference(&canary_shared).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "settings of proxy@.service that proxy-canary@.service lacks or sets otherwise"
    );
    assert_eq!(
        canary_shared.difference(&unit_shared).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "settings of proxy-canary@.service that proxy@.service does not have"
    );
    for key in [
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "ReadWritePaths",
    ] {
        assert_eq!(
            unit_value(&unit, "Service", key),
            unit_value(&canary, "Service", key)
        );
    }

    let svc = "Service";
    let exec = unit_value(&canary, svc, "ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        &words[..4],
        [
            "/usr/local/bin/proxy.canary",
            "run",
            "-c",
            "${PROXY_CONFIG}"
        ],
        "the canary runs its own binary (the installed one stays the active's) on the \
         instance's config: {exec}"
    );
    assert!(
        exec.ends_with(" --canary %i"),
        "the instance name is the share it starts with: {exec}"
    );
    assert!(
        !exec.contains("-sf") && !exec.contains("-st"),
        "the proxy refuses --canary with -sf/-st: {exec}"
    );
    let pidfile = words[words.iter().position(|w| *w == "-p").expect("-p") + 1];
    assert!(
        pidfile.starts_with("/run/proxy/") && !pidfile.contains("%i"),
        "a pidfile of its own in the shared runtime folder: {pidfile}"
    );
    assert_eq!(
        unit_value(&canary, svc, "ExecStartPre"),
        "/usr/local/bin/proxy.canary check -c ${PROXY_CONFIG}",
        "the canary's binary checks the canary's config"
    );
    assert_eq!(
        unit_value(&canary, svc, "Restart"),
        "no",
        "a failed canary must not take its share again"
    );
    assert!(
        !canary.iter().any(|(s, _, _)| s == "Install"),
        "a canary starts only beside a running active generation, never at boot"
    );
    // The canary's environment file comes after the shared one: it wins.
    let files = unit_values(&canary, svc, "EnvironmentFile");
    assert_eq!(
        files,
        [
            unit_values(&unit, svc, "EnvironmentFile"),
            vec!["-/etc/default/proxy-canary".to_string()]
        ]
        .concat()
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

/// A stand-in for `systemctl` that runs `proxy@COLOR.service` and
/// `proxy-canary@PERCENT.service` the way the units do (`proxy run -c
/// $PROXY_CONFIG -p DIR/COLOR.pid`; `proxy.canary run -c CONFIG -p
/// DIR/canary.pid --canary PERCENT` with CONFIG from the canary's
/// environment file if it names one; `KillSignal=SIGUSR1`; `Type=notify`:
/// start returns once the generation is active, or the canary) and answers
/// what `proxy-upgrade` asks. Every call goes to calls.log.
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
list-units)
    pattern=${!#}
    for f in "$dir"/*.mainpid; do
        [[ -e $f ]] || continue
        u=${f##*/}
        u=${u%.mainpid}
        # shellcheck disable=SC2053 # a glob, as systemctl matches it
        [[ $u == $pattern ]] || continue
        echo "$u loaded $(state "$u") running fake"
    done
    ;;
start)
    unit=$1
    [[ $(state "$unit") == inactive ]] || exit 0
    rm -f "$dir/$unit.stopping"
    instance=${unit#*@}
    instance=${instance%.service}
    case $unit in
    *-canary@*)
        config=$PROXY_CONFIG
        if [[ -r ${PROXY_CANARY_DEFAULTS:-} ]]; then
            c=$(sed -n 's/^PROXY_CONFIG=//p' "$PROXY_CANARY_DEFAULTS" | tail -n 1)
            config=${c:-$config}
        fi
        "$PROXY_BIN.canary" run -c "$config" -p "$dir/canary.pid" --canary "$instance" \
            </dev/null >>"$dir/$unit.log" 2>&1 &
        ready='.state == "canary"'
        ;;
    *)
        "$PROXY_BIN" run -c "$PROXY_CONFIG" -p "$dir/$instance.pid" </dev/null >>"$dir/$unit.log" 2>&1 &
        ready='.active'
        ;;
    esac
    pid=$!
    echo "$pid" >"$dir/$unit.mainpid"
    for _ in $(seq 200); do
        alive "$pid" || { echo "fake systemctl: $unit exited" >&2; exit 1; }
        if "$PROXY_BIN" status -c "$PROXY_CONFIG" --json 2>/dev/null |
            jq -e --argjson pid "$pid" "any(.generations[]; .pid == \$pid and .alive and $ready)" >/dev/null; then
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
        let state = proc_state(pid)?;
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

    /// Waits until `unit`'s process has exited.
    fn wait_gone(&self, unit: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.main_pid(unit).is_some() {
            assert!(
                Instant::now() < deadline,
                "{unit} did not drain and exit; log:\n{}",
                self.log(unit)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeUnits {
    fn drop(&mut self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(unit) = name.strip_suffix(".mainpid")
                && let Some(pid) = self.main_pid(unit)
            {
                let _ = signal(pid, Signal::Kill);
            }
        }
    }
}

/// `proxy-upgrade` against real generations in a sandbox, through the
/// stand-in `systemctl`, with our own copy of the binary (`--binary` and a
/// promotion replace it) and of the config.
struct FakeSystemd {
    units: FakeUnits,
    bin_dir: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    /// The canary's environment file (`/etc/default/proxy-canary`); absent
    /// unless the test writes it.
    canary_defaults: PathBuf,
    path: String,
}

impl FakeSystemd {
    fn new(sb: &Sandbox) -> Self {
        require_tool("jq", "apt-get install jq");
        let bin_dir = sb.dir.join("bin");
        fs::create_dir(&bin_dir).unwrap();
        let bin = bin_dir.join("proxy");
        fs::copy(proxy_bin(), &bin).expect("copying the proxy binary");
        let systemctl = bin_dir.join("systemctl");
        fs::write(&systemctl, FAKE_SYSTEMCTL).unwrap();
        fs::set_permissions(&systemctl, fs::Permissions::from_mode(0o755)).unwrap();
        let state = sb.dir.join("systemd");
        fs::create_dir(&state).unwrap();
        let config = sb.write_file("proxy.toml", &handover_config(sb, ""));
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        FakeSystemd {
            units: FakeUnits {
                dir: state,
                bin: bin.clone(),
            },
            bin_dir,
            bin,
            config,
            canary_defaults: sb.dir.join("default-proxy-canary"),
            path,
        }
    }

    fn state(&self) -> &Path {
        &self.units.dir
    }

    fn upgrade(&self, args: &[&str]) -> Out {
        run(
            Command::new("bash")
                .arg(packaging("systemd/proxy-upgrade"))
                .args(args)
                .args(["--timeout", "20"])
                .env("PATH", &self.path)
                .env("PROXY_BIN", &self.bin)
                .env("PROXY_CONFIG", &self.config)
                .env("PROXY_DEFAULTS", "/nonexistent")
                .env("PROXY_CANARY_DEFAULTS", &self.canary_defaults)
                .env("FAKE_SYSTEMD", self.state())
                .env("NO_COLOR", "1"),
            Duration::from_secs(90),
        )
    }

    /// `proxy-upgrade args` must succeed; its output.
    fn upgrade_ok(&self, args: &[&str], what: &str) -> Out {
        let out = self.upgrade(args);
        assert!(out.status.success(), "{what}:\n{}", out.text());
        out
    }

    /// The main PID of a unit that must be running.
    fn running(&self, unit: &str, out: &Out) -> u32 {
        self.units
            .main_pid(unit)
            .unwrap_or_else(|| panic!("{unit} is not running:\n{}", out.text()))
    }

    fn assert_called(&self, calls: &[&str]) {
        let log = self.units.calls();
        for call in calls {
            assert!(log.contains(call), "no `systemctl {call}`; calls:\n{log}");
        }
    }
}

fn serving_pid(sb: &Sandbox) -> Option<(u32, bool)> {
    sb.status().active_generation().map(|g| (g.pid, g.alive))
}

#[test]
fn systemd_upgrade_script_hands_over_between_real_generations() {
    let sb = Sandbox::new("pkg-upgrade");
    let fake = FakeSystemd::new(&sb);
    let units = &fake.units;
    let state = fake.state();
    let config = &fake.config;

    // 1. Nothing runs: it starts blue.
    let out = fake.upgrade_ok(&[], "first start");
    let blue = fake.running("proxy@blue.service", &out);
    assert_eq!(serving_pid(&sb), Some((blue, true)), "{}", out.text());
    fs::write(state.join("proxy@blue.service.enabled"), "").unwrap();

    // 2. Blue -> green, waiting for blue's drain.
    let out = fake.upgrade_ok(&["--wait-drained"], "blue -> green");
    let green = fake.running("proxy@green.service", &out);
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
    fake.assert_called(&[
        "start proxy@green.service",
        "stop --no-block proxy@blue.service",
        "enable --quiet proxy@green.service",
        "disable --quiet proxy@blue.service",
    ]);
    assert!(state.join("proxy@green.service.enabled").exists());
    assert!(!state.join("proxy@blue.service.enabled").exists());

    // 3. A broken config: nothing changes.
    let broken = sb.write_file(
        "broken.toml",
        &read(config).replace("hard_stop_after = \"5s\"", "hard_stop_after = \"soon\""),
    );
    let starts_before = units.calls().matches("start ").count();
    let out = fake.upgrade(&["--config", broken.to_str().unwrap()]);
    assert!(
        !out.status.success() && out.stderr.contains("nothing changed"),
        "a broken config must stop the upgrade:\n{}",
        out.text()
    );
    assert_eq!(units.calls().matches("start ").count(), starts_before);
    assert_eq!(serving_pid(&sb), Some((green, true)));

    // 4. Green -> blue with a "new" binary, which replaces ours atomically.
    let out = fake.upgrade_ok(
        &["--binary", proxy_bin().to_str().unwrap()],
        "green -> blue",
    );
    assert!(fake.bin_dir.join("proxy.previous").is_file());
    let blue = fake.running("proxy@blue.service", &out);
    assert_eq!(serving_pid(&sb), Some((blue, true)), "{}", out.text());
    units.wait_gone("proxy@green.service");
}

/// A "new version" of the proxy: the binary with bytes appended (the
/// loader ignores them), so that it runs the same and is another file.
fn new_version(sb: &Sandbox, name: &str) -> PathBuf {
    let path = sb.dir.join(name);
    let mut bytes = fs::read(proxy_bin()).expect("reading the proxy binary");
    bytes.extend_from_slice(format!("\n{name}\n").as_bytes());
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `proxy-upgrade canary|promote|abort` against real generations: a
/// canary of a new binary and a config of its own starts beside blue, its
/// share changes, a plain upgrade is refused meanwhile, the promotion
/// installs its binary and config and hands over to green; a second canary
/// is aborted.
#[test]
fn systemd_upgrade_script_runs_canaries_between_real_generations() {
    let sb = Sandbox::new("pkg-canary");
    let fake = FakeSystemd::new(&sb);
    let units = &fake.units;
    let state = fake.state();
    let canary_of = |sb: &Sandbox| {
        sb.status()
            .canary
            .map(|c| (c.generation, c.weight_percent, c.alive))
    };
    let generation_of = |sb: &Sandbox, pid: u32| {
        sb.status()
            .generations
            .iter()
            .filter(|g| g.pid == pid && g.alive)
            .map(|g| (g.generation, g.state.clone()))
            .max()
    };

    // Nothing runs: a canary is refused (by the proxy: no active generation).
    let out = fake.upgrade(&["canary", "10"]);
    assert!(
        !out.status.success() && out.stderr.contains("did not start"),
        "a canary without an active generation:\n{}",
        out.text()
    );
    assert!(
        units
            .log("proxy-canary@10.service")
            .contains("no active generation"),
        "log:\n{}",
        units.log("proxy-canary@10.service")
    );

    let out = fake.upgrade_ok(&[], "first start");
    let blue = fake.running("proxy@blue.service", &out);
    fs::write(state.join("proxy@blue.service.enabled"), "").unwrap();

    // 1. A canary of a new binary, with a config of its own (the canary's
    // environment file names it).
    let original = fs::read(&fake.bin).unwrap();
    let next = new_version(&sb, "proxy-next");
    let canary_config = sb.write_file(
        "proxy-next.toml",
        &read(&fake.config).replace("hard_stop_after = \"5s\"", "hard_stop_after = \"6s\""),
    );
    fs::write(
        &fake.canary_defaults,
        format!("PROXY_CONFIG={}\n", canary_config.display()),
    )
    .unwrap();
    let out = fake.upgrade_ok(
        &["canary", "10", "--binary", next.to_str().unwrap()],
        "canary 10",
    );
    let canary = fake.running("proxy-canary@10.service", &out);
    let (canary_gen, st) = generation_of(&sb, canary).expect("the canary's record");
    assert_eq!(st, "canary");
    assert_eq!(canary_of(&sb), Some((canary_gen, 10.0, true)));
    assert_eq!(serving_pid(&sb), Some((blue, true)), "blue keeps serving");
    assert_eq!(
        fs::read(fake.bin_dir.join("proxy.canary")).unwrap(),
        fs::read(&next).unwrap(),
        "the canary runs the new binary"
    );
    assert_eq!(
        fs::read(&fake.bin).unwrap(),
        original,
        "the installed binary stays the active generation's"
    );
    assert!(
        fs::read_link(format!("/proc/{canary}/exe"))
            .unwrap()
            .ends_with("proxy.canary"),
        "the canary unit runs proxy.canary"
    );

    // 2. A new share: one map write, same canary.
    fake.upgrade_ok(&["canary", "25"], "canary 25");
    assert_eq!(canary_of(&sb), Some((canary_gen, 25.0, true)));

    // 3. While it runs: no plain upgrade, no second canary.
    let starts_before = units.calls().matches("start ").count();
    let out = fake.upgrade(&[]);
    assert!(
        !out.status.success() && out.stderr.contains("a canary runs"),
        "a plain upgrade during a canary must be refused:\n{}",
        out.text()
    );
    let out = fake.upgrade(&["canary", "5", "--binary", next.to_str().unwrap()]);
    assert!(
        !out.status.success() && out.stderr.contains("a canary runs already"),
        "a second canary must be refused:\n{}",
        out.text()
    );
    assert_eq!(units.calls().matches("start ").count(), starts_before);
    assert_eq!(canary_of(&sb), Some((canary_gen, 25.0, true)));

    // 4. Promotion: the canary takes over from blue, its binary and config
    // become the installed ones, green takes over from it.
    let out = fake.upgrade_ok(&["promote", "--wait-drained"], "promote");
    let green = fake.running("proxy@green.service", &out);
    assert_eq!(serving_pid(&sb), Some((green, true)), "{}", out.text());
    assert_eq!(canary_of(&sb), None);
    for unit in ["proxy@blue.service", "proxy-canary@10.service"] {
        assert!(
            units.main_pid(unit).is_none(),
            "{unit} still runs after promote --wait-drained:\n{}",
            out.text()
        );
    }
    assert_eq!(fs::read(&fake.bin).unwrap(), fs::read(&next).unwrap());
    assert_eq!(
        fs::read(fake.bin_dir.join("proxy.previous")).unwrap(),
        original
    );
    assert_eq!(read(&fake.config), read(&canary_config));
    assert!(fake.config.with_extension("toml.previous").is_file());
    let canary_log = units.log("proxy-canary@10.service");
    assert!(
        canary_log.contains("promoted: the canary is now the active generation")
            && canary_log.contains("soft-stop (replaced)"),
        "the canary must have been promoted, then replaced by green; log:\n{canary_log}"
    );
    assert!(
        units
            .log("proxy@blue.service")
            .contains("soft-stop (replaced)"),
        "blue must have let go on the promotion; log:\n{}",
        units.log("proxy@blue.service")
    );
    fake.assert_called(&[
        "stop --no-block proxy@blue.service",
        "start proxy@green.service",
        "stop --no-block proxy-canary@10.service",
        "enable --quiet proxy@green.service",
        "disable --quiet proxy@blue.service",
    ]);

    // 5. A canary of the installed binary (a config change), aborted.
    let out = fake.upgrade_ok(&["canary", "2.5"], "canary 2.5");
    let canary = fake.running("proxy-canary@2.5.service", &out);
    let (canary_gen, _) = generation_of(&sb, canary).expect("the canary's record");
    assert_eq!(canary_of(&sb), Some((canary_gen, 2.5, true)));
    assert_eq!(
        fs::read(fake.bin_dir.join("proxy.canary")).unwrap(),
        fs::read(&fake.bin).unwrap()
    );
    let out = fake.upgrade_ok(&["abort", "--wait-drained"], "abort");
    assert!(units.main_pid("proxy-canary@2.5.service").is_none());
    assert_eq!(canary_of(&sb), None);
    assert_eq!(serving_pid(&sb), Some((green, true)), "{}", out.text());
    let log = units.log("proxy-canary@2.5.service");
    assert!(
        log.contains("canary aborted") && log.contains("generation stopped"),
        "log:\n{log}"
    );
    fake.assert_called(&["stop --no-block proxy-canary@2.5.service"]);

    // 6. Nothing left to abort or promote.
    let out = fake.upgrade_ok(&["abort"], "abort again");
    assert!(out.stderr.contains("nothing to abort"), "{}", out.text());
    let out = fake.upgrade(&["promote"]);
    assert!(
        !out.status.success() && out.stderr.contains("nothing to promote"),
        "{}",
        out.text()
    );
    assert_eq!(serving_pid(&sb), Some((green, true)));
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
        &handover_config(
            &sb,
            &format!(
                "user = \"nobody\"\npidfile = \"{run}/proxy.pid\"\n",
                run = sb.dir.join("run").display()
            ),
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
    // The proxy under strace; our sandbox's process.
    let pid2 = first_child(gen2.pid, Duration::from_secs(5));
    for sig in [Signal::Ttou, Signal::Ttin] {
        signal(pid2, sig).expect("signalling generation 2");
        std::thread::sleep(Duration::from_millis(300));
    }
    traffic(5);
    signal(pid2, Signal::Usr1).expect("signalling generation 2");
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
/// units and the upgrade script for real: Type=notify, the hardening with
/// eBPF, the handover, a canary promoted and one aborted, the bookkeeping,
/// KillSignal=SIGUSR1.
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
        // The child is ours, unreaped.
        let _ = signal(self.nspawn.id(), Signal::Term);
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        unmount(&self.bpffs);
    }
}

#[test]
fn systemd_unit_runs_an_upgrade_under_real_systemd() {
    require_root();
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
        unit_text_with_binary(&unit_path(), "/opt/proxy/proxy"),
    )
    .unwrap();
    // The canary's binary is /opt/proxy/proxy.canary, which proxy-upgrade
    // installs there.
    let canary_unit = dir.path().join("proxy-canary@.service");
    fs::write(
        &canary_unit,
        read(&canary_unit_path()).replace("/usr/local/bin/proxy", "/opt/proxy/proxy"),
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
        .arg(bind(
            "--bind-ro",
            &canary_unit,
            "/etc/systemd/system/proxy-canary@.service",
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
        // The container's init once it runs systemd: before its exec, the
        // child is still a copy of nspawn, and a command entered there
        // would not reach the container's systemd.
        if let Some(pid) = children(nspawn_pid).into_iter().find(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
        }) {
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

    // A canary beside green (Type=notify: ready once it took its share),
    // promoted: it takes over from green, and blue from it.
    let upgrade = |c: &Container, args: &[&str]| {
        let mut all = vec![
            "env",
            "PROXY_BIN=/opt/proxy/proxy",
            "bash",
            "/opt/proxy/proxy-upgrade",
        ];
        all.extend_from_slice(args);
        c.exec_ok(&all)
    };
    upgrade(&c, &["canary", "10"]);
    let canary: u64 = c.show("proxy-canary@10", "MainPID").parse().unwrap();
    let json = c.exec_ok(&[
        "/opt/proxy/proxy",
        "status",
        "-c",
        "/etc/proxy/proxy.toml",
        "--json",
    ]);
    let st: Value = serde_json::from_str(&json).expect("status JSON");
    let canary_gen = st["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["pid"] == canary && g["alive"] == true)
        .unwrap_or_else(|| panic!("no live generation of proxy-canary@10: {st:#}"));
    assert_eq!(canary_gen["state"], "canary", "{st:#}");
    assert_eq!(
        st["canary"]["generation"], canary_gen["generation"],
        "{st:#}"
    );
    assert_eq!(st["canary"]["weight_percent"], 10.0, "{st:#}");
    assert_eq!(serving_pid(&c), green);
    curl(&c, "8080");
    upgrade(&c, &["promote", "--wait-drained"]);
    let blue: u64 = c.show("proxy@blue", "MainPID").parse().unwrap();
    assert_eq!(serving_pid(&c), blue);
    curl(&c, "8080");
    for unit in ["proxy@green", "proxy-canary@10"] {
        assert_eq!(c.show(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(c.show(unit, "Result"), "success", "{unit}");
    }
    assert_eq!(c.show("proxy@green", "NRestarts"), "0");
    assert_eq!(c.show("proxy@blue", "UnitFileState"), "enabled");
    assert_eq!(c.show("proxy@green", "UnitFileState"), "disabled");
    let canary_log = c.exec_ok(&["journalctl", "--no-pager", "-u", "proxy-canary@10"]);
    assert!(
        canary_log.contains(&format!("proxy.canary[{canary}]"))
            && canary_log.contains("promoted: the canary is now the active generation")
            && canary_log.contains("soft-stop (replaced)"),
        "the canary must be promoted, then replaced by blue; journal:\n{canary_log}"
    );

    // A canary aborted: it drains and its unit ends cleanly; blue serves.
    upgrade(&c, &["canary", "5"]);
    assert_eq!(c.show("proxy-canary@5", "ActiveState"), "active");
    upgrade(&c, &["abort", "--wait-drained"]);
    assert_eq!(c.show("proxy-canary@5", "ActiveState"), "inactive");
    assert_eq!(c.show("proxy-canary@5", "Result"), "success");
    let canary_log = c.exec_ok(&["journalctl", "--no-pager", "-u", "proxy-canary@5"]);
    assert!(
        canary_log.contains("canary aborted"),
        "journal:\n{canary_log}"
    );
    assert_eq!(serving_pid(&c), blue);
    curl(&c, "8080");

    // A crash restarts (Restart=on-failure), and the restart takes over.
    c.exec_ok(&["kill", "-KILL", &blue.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let restarted = loop {
        let pid: u64 = c.show("proxy@blue", "MainPID").parse().unwrap();
        if pid != 0 && pid != blue && serving_pid(&c) == pid {
            break pid;
        }
        assert!(Instant::now() < deadline, "blue was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    };
    curl(&c, "8080");

    // `systemctl stop` soft-stops (KillSignal=SIGUSR1).
    c.exec_ok(&["systemctl", "stop", "proxy@blue"]);
    assert_eq!(c.show("proxy@blue", "Result"), "success");
    let blue_log = c.exec_ok(&["journalctl", "--no-pager", "-u", "proxy@blue"]);
    assert!(
        blue_log.contains(&format!("proxy[{restarted}]"))
            && blue_log.contains("soft-stop (SIGUSR1)")
            && !blue_log.contains("hard stop"),
        "systemctl stop must soft-stop; journal:\n{blue_log}"
    );
}

fn unit_capabilities() -> BTreeSet<String> {
    let settings = unit_settings(&read(&unit_path()));
    unit_value(&settings, "Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(cap_name)
        .collect()
}

#[test]
fn unit_capabilities_suffice_for_privilege_drop_and_handover() {
    handover_within_capabilities("pkg-caps-unit", "proxy@.service", &unit_capabilities());
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
