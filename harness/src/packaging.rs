//! What the packaging tests share: where `packaging/` is, the external
//! tools they run (bounded, output kept in files), the checks several
//! targets make, and generations run under a target's capability set.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{
    config::{BACKEND_ADDR, PROXY_ADDR},
    proxy::{Proxy, proxy_bin},
    sandbox::Sandbox,
    signals::Signal,
};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("harness/ lives inside the workspace")
        .to_path_buf()
}

/// `packaging/<rel>`.
pub fn packaging(rel: &str) -> PathBuf {
    workspace().join("packaging").join(rel)
}

/// A text file, or a panic naming it.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` from PATH, or a panic that says what to install.
pub fn require_tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| panic!("`{name}` is not installed (not on PATH): {install}"))
}

/// What a finished command printed (see [`run`]).
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Exit status and both outputs, for messages.
    pub fn text(&self) -> String {
        format!(
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with stdout and stderr in files (so that a
/// process it leaves behind cannot hold a pipe open), killing it after
/// `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
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
pub fn run_ok(cmd: &mut Command, what: &str) -> Out {
    let out = run(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{what} failed:\n{}", out.text());
    out
}

/// "30s", "200ms", "2m" as a duration.
pub fn duration(text: &str) -> Duration {
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
pub fn toml_string(toml: &str, key: &str) -> Option<String> {
    toml.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// `proxy check -c config` must pass.
pub fn proxy_check(config: &Path) {
    run_ok(
        Command::new(proxy_bin())
            .arg("check")
            .arg("-c")
            .arg(config)
            .env("NO_COLOR", "1"),
        &format!("`proxy check -c {}`", config.display()),
    );
}

/// `shellcheck` of a script must pass.
pub fn shellcheck(path: &Path, shell: Option<&str>) {
    let tool = require_tool("shellcheck", "apt-get install shellcheck");
    let mut cmd = Command::new(tool);
    if let Some(shell) = shell {
        cmd.args(["--shell", shell]);
    }
    run_ok(cmd.arg(path), &format!("shellcheck of {}", path.display()));
}

/// `CAP_BPF`, `bpf` or `BPF` as `BPF`.
pub fn cap_name(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

/// Two generations with `user = "nobody"`, each started as root with a
/// bounding set of exactly `caps` (and no_new_privs, as the unit has): both
/// load the program, drop privileges, and hand over.
pub fn handover_within_capabilities(test: &str, what: &str, caps: &BTreeSet<String>) {
    let sb = Sandbox::new(test);
    require_tool("setpriv", "apt-get install util-linux");
    // The pins live under the sandbox folder: the user must reach them, as
    // under /sys/fs/bpf.
    fs::set_permissions(&sb.dir, fs::Permissions::from_mode(0o755)).unwrap();
    let config = sb.write_file("proxy.toml", &handover_config(&sb, "user = \"nobody\"\n"));
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
    gen2.signal(Signal::Usr1);
    let exit = gen2.expect_exit(Duration::from_secs(10));
    assert!(exit.success(), "{what}: generation 2 at SIGUSR1: {exit}");
}

/// The packaging tests' layer-4 config for `sb`: a 5 s drain, the default
/// grace, eBPF steering, and `global_extra` (whole TOML lines) in
/// `[global]`.
pub fn handover_config(sb: &Sandbox, global_extra: &str) -> String {
    format!(
        r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "5s"
handover_grace = "200ms"
steering = "ebpf"
{global_extra}
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
    )
}
