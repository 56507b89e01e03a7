//! One `proxy run` process (one generation): starting it with its log in
//! the sandbox, waiting for it to serve, signalling it, reading its exit
//! and the counters its log ends with; and `proxy <command>` runs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    process::exited_unreaped,
    sandbox::Sandbox,
    signals::{self, Signal},
};

/// The proxy binary: `$PROXY_BIN`, else `<workspace>/target/release/proxy`.
pub fn proxy_bin() -> PathBuf {
    let path = match std::env::var_os("PROXY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("harness/ lives inside the workspace")
            .join("target/release/proxy"),
    };
    assert!(
        path.is_file(),
        "proxy binary not found at {} (set PROXY_BIN, or build it with `cargo xtask build`)",
        path.display()
    );
    path
}

/// Which generation a process became (from its log).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GenId {
    pub generation: u64,
    pub slot: u32,
}

/// One `proxy run` process (one generation).
pub struct Proxy {
    /// Shared with the sandbox's guard, which kills it if the test does not.
    child: Arc<Mutex<Child>>,
    /// PID of the process we spawned (the wrapper, when wrapped).
    pub pid: u32,
    pub log_path: PathBuf,
    /// Filled by [`Proxy::wait_active`].
    pub id: Option<GenId>,
    /// Names the process in panic messages.
    label: String,
    /// Once reaped, the exit status (the child cannot be waited for twice).
    exit: Option<ExitStatus>,
}

impl Proxy {
    /// Starts `proxy run -c config` with `extra_env`, stderr to a log file.
    pub fn start(sb: &Sandbox, config: &Path, extra_env: &[(&str, &str)]) -> Proxy {
        Self::spawn(sb, &[], config, &[], extra_env)
    }

    /// Like [`Proxy::start`], with the proxy run by `wrapper` (e.g.
    /// `["unshare", "--pid", "--fork", "--kill-child"]`).
    pub fn start_wrapped(
        sb: &Sandbox,
        wrapper: &[&str],
        config: &Path,
        extra_env: &[(&str, &str)],
    ) -> Proxy {
        Self::spawn(sb, wrapper, config, &[], extra_env)
    }

    /// Like [`Proxy::start`], with `args` after `run -c config` (e.g.
    /// `--log-json`).
    pub fn start_args(
        sb: &Sandbox,
        config: &Path,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Proxy {
        Self::spawn(sb, &[], config, args, extra_env)
    }

    fn spawn(
        sb: &Sandbox,
        wrapper: &[&str],
        config: &Path,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Proxy {
        if extra_env.iter().any(|(k, _)| *k == "PROXY_TEST_HOOK") {
            let version = Command::new(&sb.bin)
                .arg("--version")
                .output()
                .expect("running proxy --version");
            assert!(
                String::from_utf8_lossy(&version.stdout).contains("test-hooks"),
                "{} was built without the test-hooks feature, so PROXY_TEST_HOOK does \
                 nothing: run the tests with `cargo xtask test`, or build with \
                 `cargo build --release -p proxy --features test-hooks`",
                sb.bin.display()
            );
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = sb.dir.join(format!("proxy-{n}.log"));
        let log = fs::File::create(&log_path).expect("creating the proxy log");
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(&sb.bin);
                cmd
            }
            None => Command::new(&sb.bin),
        };
        cmd.arg("run")
            .arg("-c")
            .arg(config)
            .args(args)
            .env("NO_COLOR", "1")
            // The product's default filter, whatever the caller's is.
            .env_remove("PROXY_LOG")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id();
        Proxy {
            child: sb.adopt(child),
            pid,
            log_path,
            id: None,
            label: format!("proxy #{n} (pid {pid})"),
            exit: None,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Which generation this process claimed, once it logged it.
    pub fn gen_id_from_log(&self) -> Option<GenId> {
        parse_gen_id(&self.log(), ": active")
    }

    /// Waits until this process is the active, serving generation: its log
    /// says `: active` and status shows its generation active with a fresh
    /// heartbeat. Matching by generation number rather than PID works when
    /// the proxy runs in another PID namespace.
    pub fn wait_active(&mut self, sb: &Sandbox, timeout: Duration) -> GenId {
        let deadline = Instant::now() + timeout;
        let id = loop {
            if let Some(id) = self.gen_id_from_log() {
                break id;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "{} exited with {status} before becoming active; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log `: active` within {timeout:?}; log:\n{}",
                self.label,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let left = deadline.saturating_duration_since(Instant::now());
        sb.wait_status(
            &format!("{} (generation {}) to be active", self.label, id.generation),
            left.max(Duration::from_secs(1)),
            |st| st.is_serving(id.generation),
        );
        self.id = Some(id);
        id
    }

    /// Starts `proxy run -c config --canary percent` and waits until it is
    /// the live canary of the instance (its log says so and status shows it).
    pub fn start_canary(sb: &Sandbox, config: &Path, percent: &str, timeout: Duration) -> Proxy {
        Self::start_canary_wrapped(sb, &[], config, percent, timeout)
    }

    /// Like [`Proxy::start_canary`], run by `wrapper` (see
    /// [`Proxy::start_wrapped`]).
    pub fn start_canary_wrapped(
        sb: &Sandbox,
        wrapper: &[&str],
        config: &Path,
        percent: &str,
        timeout: Duration,
    ) -> Proxy {
        let mut p = Self::spawn(sb, wrapper, config, &["--canary", percent], &[]);
        let deadline = Instant::now() + timeout;
        let id = loop {
            if let Some(id) = parse_gen_id(&p.log(), ": canary: takes") {
                break id;
            }
            if let Some(status) = p.try_exit() {
                panic!(
                    "{} exited with {status} before becoming a canary; log:\n{}",
                    p.label,
                    p.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log `: canary: takes` within {timeout:?}; log:\n{}",
                p.label,
                p.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        sb.wait_status(
            &format!(
                "{} (generation {}) to be the canary",
                p.label, id.generation
            ),
            Duration::from_secs(5),
            |st| {
                st.canary
                    .as_ref()
                    .is_some_and(|c| c.generation == id.generation && c.alive)
                    && st
                        .generation(id.generation)
                        .is_some_and(|g| g.state == "canary")
            },
        );
        p.id = Some(id);
        p
    }

    /// The generation number (after [`Proxy::wait_active`]).
    pub fn generation(&self) -> u64 {
        self.id.expect("wait_active() first").generation
    }

    /// The slot (after [`Proxy::wait_active`]).
    pub fn slot(&self) -> u32 {
        self.id.expect("wait_active() first").slot
    }

    /// Sends `sig` to the process we spawned, unless it has exited.
    pub fn signal(&self, sig: Signal) {
        // Holding the lock keeps try_exit() from reaping it meanwhile, so
        // an unexited child's PID is still ours.
        let _child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if !exited_unreaped(self.pid) {
            signals::signal(self.pid, sig)
                .unwrap_or_else(|e| panic!("signalling {} with {sig:?}: {e}", self.label));
        }
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
            self.exit = child.try_wait().expect("waiting for the proxy");
        }
        self.exit
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Like [`Proxy::wait_exit`], panicking with the log on a timeout.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "{} did not exit within {timeout:?}; log:\n{}",
                self.label,
                self.log()
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::Kill);
        self.expect_exit(Duration::from_secs(5))
    }

    /// The `... generation stopped ...` line, if logged.
    pub fn final_line(&self) -> Option<String> {
        self.log()
            .lines()
            .find(|l| l.contains("generation stopped"))
            .map(str::to_string)
    }

    /// `accepted=N` of the final line; panics with the log when missing.
    pub fn final_accepted(&self) -> u64 {
        self.final_field("accepted")
    }

    /// `name=N` of the final line; panics with the log when missing.
    pub fn final_field(&self, name: &str) -> u64 {
        let line = self.final_line().unwrap_or_else(|| {
            panic!(
                "{} logged no `generation stopped` line; log:\n{}",
                self.label,
                self.log()
            )
        });
        field(&line, name).unwrap_or_else(|| panic!("no {name}=N in final line: {line}"))
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// `generation N (slot S)` from the first log line containing `marker`.
pub fn parse_gen_id(log: &str, marker: &str) -> Option<GenId> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let rest = &line[line.find("generation ")? + "generation ".len()..];
    let (generation, rest) = rest.split_once(" (slot ")?;
    let (slot, _) = rest.split_once(')')?;
    Some(GenId {
        generation: generation.trim().parse().ok()?,
        slot: slot.trim().parse().ok()?,
    })
}

/// The number of `name=N` in a log line.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
}

/// What a finished `proxy` command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Sandbox {
    /// Runs `proxy <args>` to completion (check, or a run expected to fail).
    pub fn run_proxy_cmd(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the proxy binary");
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait().expect("waiting for proxy").is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`proxy {}` did not exit within {timeout:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("reading proxy output");
        CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
