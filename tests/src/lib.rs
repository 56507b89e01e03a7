//! Harness for the integration tests of the proxy.
//!
//! Every test builds a [`Sandbox`] first: a network namespace of its own (so
//! fixed ports never collide with anything), a private bpffs mount (so the
//! pinned maps of one test are never seen by another), a temporary folder for
//! configs and logs, and a guard that kills every proxy process the test
//! started, also when the test panics. On top of it:
//!
//! - [`Backend`]: an in-process echo-like server whose every response is
//!   derived byte for byte from its request, so a client can tell a correct
//!   answer from a truncated or misrouted one;
//! - [`Load`]: a bounded load generator opening new connections at a target
//!   rate and checking every response;
//! - [`Proxy`]: one `proxy run` process (one generation), with its log
//!   captured in the sandbox, and helpers to wait for it to be active, read
//!   `proxy status --json`, signal it and read its final counters.
//!
//! Set `PROXY_IT_KEEP=1` to keep each test's folder (configs, proxy logs,
//! `summary.txt` with the measured figures) after the test.
//!
//! Helpers are synchronous on purpose: the test thread drives the scenario
//! (starting generations, polling status) while the backend and the load run
//! on a tokio runtime's worker threads, so that slow polling never stalls the
//! traffic the test measures.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinSet,
};

/// The address the proxy listens on inside each test's network namespace.
pub const PROXY_ADDR: &str = "127.0.0.1:8080";
/// The address of the in-process backend inside each test's namespace.
pub const BACKEND_ADDR: &str = "127.0.0.1:9000";

// ---------------------------------------------------------------------------
// Locating the binary, checking privileges
// ---------------------------------------------------------------------------

/// The proxy binary: `$PROXY_BIN`, else `<workspace>/target/release/proxy`.
pub fn proxy_bin() -> PathBuf {
    let path = match std::env::var_os("PROXY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives inside the workspace")
            .join("target/release/proxy"),
    };
    assert!(
        path.is_file(),
        "proxy binary not found at {} (set PROXY_BIN, or build it with `cargo xtask build`)",
        path.display()
    );
    path
}

/// Panics unless we are root: the tests load eBPF programs, mount bpffs and
/// create network namespaces. A skipped test would look like a passed one.
pub fn require_root() {
    // Safety: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests must run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): \
         run them with `sudo` or `cargo xtask test` as root"
    );
}

// ---------------------------------------------------------------------------
// Sandbox: network namespace, bpffs, temp folder, process guard
// ---------------------------------------------------------------------------

/// Tests of one test binary run one at a time even without
/// `--test-threads=1`: each drives several processes and thousands of
/// connections per second, and two at once on two cores would make timings
/// (and so the failure counts) depend on the neighbour.
static SERIAL: Mutex<()> = Mutex::new(());

/// Distinguishes the instances of several sandboxes of one process.
static SANDBOX_SEQ: AtomicU64 = AtomicU64::new(0);

/// One test's private world. Drop it last (declare it first).
pub struct Sandbox {
    /// The temporary folder (configs, logs, the bpffs mount point).
    pub dir: PathBuf,
    /// The private bpffs mount.
    pub bpffs: PathBuf,
    /// The proxy instance name (`global.name`), unique per sandbox.
    pub name: String,
    /// Every process the test started; killed and reaped on drop.
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
    mounted: bool,
    tempdir: Option<tempfile::TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl Sandbox {
    /// Moves the calling thread into a new network namespace and prepares a
    /// private bpffs. Build the tokio runtime *after* this, from the same
    /// thread, so that its threads are in the namespace too.
    pub fn new(test: &str) -> Sandbox {
        require_root();
        let _ = proxy_bin(); // fail early and clearly when it is missing
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        // Network namespaces are per thread: this thread, and every process
        // and thread it creates from now on, see only the new namespace.
        // Safety: unshare has no memory effects.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed: {}",
            io::Error::last_os_error()
        );
        run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
        // Thousands of short connections per second: widen the ephemeral
        // port range and reuse TIME_WAIT ports, so that the client never runs
        // out of ports during a long run. These sysctls are per namespace;
        // /proc/sys/net resolves to the namespace of the writing thread.
        write_sysctl("net/ipv4/ip_local_port_range", "1024 65000");
        write_sysctl("net/ipv4/tcp_tw_reuse", "1");

        let tempdir = tempfile::Builder::new()
            .prefix(&format!("proxy-it-{test}-"))
            .tempdir()
            .expect("creating a temporary folder");
        let dir = tempdir.path().to_path_buf();
        let bpffs = dir.join("bpf");
        fs::create_dir(&bpffs).expect("creating the bpffs mount point");
        mount_bpffs(&bpffs);

        let seq = SANDBOX_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{test}-{}-{seq}", std::process::id());
        Sandbox {
            dir,
            bpffs,
            name,
            children: Mutex::new(Vec::new()),
            mounted: true,
            tempdir: Some(tempdir),
            _serial: serial,
        }
    }

    /// A multi-thread tokio runtime whose threads live in this sandbox's
    /// network namespace (they are created now, from the test thread).
    pub fn runtime(&self) -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the tokio runtime")
    }

    /// Writes a config for this sandbox's instance and returns its path.
    pub fn write_config(&self, file: &str, cfg: &ProxyConfig) -> PathBuf {
        self.write_file(file, &cfg.render(self))
    }

    /// Writes any file (e.g. a broken config) into the sandbox folder.
    pub fn write_file(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.join(file);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// `proxy status --json` of this sandbox's instance.
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `proxy status --json`, or why it could not be read.
    pub fn try_status(&self) -> Result<Status, String> {
        let out = Command::new(proxy_bin())
            .arg("status")
            .arg("--name")
            .arg(&self.name)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--json")
            .env("NO_COLOR", "1")
            .output()
            .map_err(|e| format!("running proxy status: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "proxy status exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "proxy status printed JSON we cannot parse ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Polls status until `pred` holds; panics with `what` after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        let mut last = Err("never read".to_string());
        while Instant::now() < deadline {
            last = self.try_status();
            if let Ok(st) = &last
                && pred(st)
            {
                return last.unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
    }

    /// Runs `proxy <args>` to completion (check, or a run expected to fail).
    pub fn run_proxy_cmd(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut child = Command::new(proxy_bin())
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

    fn adopt(&self, child: Child) -> Arc<Mutex<Child>> {
        let child = Arc::new(Mutex::new(child));
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.clone());
        child
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Kill by PID only processes we started and have not reaped yet (an
        // unreaped child's PID cannot have been reused).
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for child in children {
            let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(None) = child.try_wait() {
                // A `unshare --fork` wrapper: its child dies with it
                // (--kill-child), but kill the grandchildren explicitly too.
                for pid in grandchildren(child.id()) {
                    // Safety: kill has no memory effects.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.mounted {
            let c = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes())
                .expect("path without NUL");
            // Safety: a valid C string; MNT_DETACH never blocks.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            self.mounted = false;
        }
        if let Some(dir) = self.tempdir.take()
            && std::env::var_os("PROXY_IT_KEEP").is_some()
        {
            eprintln!("PROXY_IT_KEEP: keeping {}", dir.keep().display());
        }
    }
}

/// The children of `pid` (its direct children, from /proc).
fn grandchildren(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets a per-namespace sysctl of this thread's network namespace, and
/// checks from a child process (which inherits the namespace) that it took.
fn write_sysctl(key: &str, value: &str) {
    let path = Path::new("/proc/sys").join(key);
    fs::write(&path, value).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let normalize = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    if normalize(&read_sysctl_in_child(key)) != normalize(value) {
        // The write went elsewhere (it should not: /proc/sys/net follows
        // the writing thread's namespace); let sysctl(8) do it from a child.
        let dotted = key.replace('/', ".");
        run_ok(
            Command::new("sysctl")
                .arg("-w")
                .arg(format!("{dotted}={value}")),
        );
        assert_eq!(
            normalize(&read_sysctl_in_child(key)),
            normalize(value),
            "could not set {dotted} in the test's network namespace"
        );
    }
}

/// Reads a sysctl from a subprocess, which sees the namespace of this thread.
pub fn read_sysctl_in_child(key: &str) -> String {
    let out = Command::new("cat")
        .arg(Path::new("/proc/sys").join(key))
        .output()
        .expect("running cat");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn mount_bpffs(target: &Path) {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target_c =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).expect("path without NUL");
    let (src, fstype) = (c("bpf"), c("bpf"));
    // Safety: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount -t bpf bpf {}: {}",
        target.display(),
        io::Error::last_os_error()
    );
}

/// What a finished `proxy` command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// The knobs the tests turn; rendered as TOML for the sandbox's instance.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub hard_stop_after: &'static str,
    pub handover_grace: &'static str,
    pub maxconn: Option<u32>,
    pub backlog: u32,
    pub connect_timeout: &'static str,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            hard_stop_after: "30s",
            handover_grace: "200ms",
            maxconn: None,
            // Above the default (1024): a generation that is stopped in a
            // test keeps its queue for a second; no SYN must be dropped.
            backlog: 4096,
            connect_timeout: "2s",
        }
    }
}

impl ProxyConfig {
    pub fn render(&self, sb: &Sandbox) -> String {
        let maxconn = self
            .maxconn
            .map(|n| format!("maxconn = {n}\n"))
            .unwrap_or_default();
        format!(
            r#"[global]
name = "{name}"
bpffs = "{bpffs}"
hard_stop_after = "{hard}"
handover_grace = "{grace}"
# eBPF steering or nothing: a silent fallback must fail the tests.
steering = "ebpf"

[[listener]]
name = "front"
bind = ["{proxy}"]
backend = "app"
backlog = {backlog}
{maxconn}
[[backend]]
name = "app"
servers = ["{backend}"]
connect_timeout = "{ct}"
"#,
            name = sb.name,
            bpffs = sb.bpffs.display(),
            hard = self.hard_stop_after,
            grace = self.handover_grace,
            proxy = PROXY_ADDR,
            backlog = self.backlog,
            backend = BACKEND_ADDR,
            ct = self.connect_timeout,
        )
    }
}

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

/// `proxy status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub instance: String,
    pub pins: String,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub counters: Counters,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GenStatus {
    pub slot: u32,
    pub generation: u64,
    pub pid: u32,
    pub state: String,
    pub alive: bool,
    pub active: bool,
    pub age_ms: u64,
    pub accepted: u64,
    pub active_conns: u64,
    pub steered: u64,
    pub migrated_in: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Counters {
    pub selected: Vec<u64>,
    pub migrated: Vec<u64>,
    pub fallback_new: u64,
    pub fallback_migrate: u64,
}

impl Status {
    /// The record of generation number `generation`, if its slot still has it.
    pub fn generation(&self, generation: u64) -> Option<&GenStatus> {
        self.generations.iter().find(|g| g.generation == generation)
    }

    /// The generation holding the active slot.
    pub fn active_generation(&self) -> Option<&GenStatus> {
        self.generations.iter().find(|g| g.active)
    }

    /// Whether `generation` is the active, serving one.
    pub fn is_serving(&self, generation: u64) -> bool {
        self.generation(generation)
            .is_some_and(|g| g.active && g.state == "active" && g.alive)
    }
}

// ---------------------------------------------------------------------------
// Proxy processes
// ---------------------------------------------------------------------------

/// Which generation a process became (from its log).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GenId {
    pub generation: u64,
    pub slot: u32,
}

/// One `proxy run` process (one generation).
pub struct Proxy {
    child: Arc<Mutex<Child>>,
    /// PID of the process we spawned (the `unshare` wrapper when wrapped).
    pub pid: u32,
    pub log_path: PathBuf,
    /// Filled by [`Proxy::wait_active`].
    pub id: Option<GenId>,
    label: String,
    exit: Option<ExitStatus>,
}

impl Proxy {
    /// Starts `proxy run -c config` with `extra_env`, stderr to a log file.
    pub fn start(sb: &Sandbox, config: &Path, extra_env: &[(&str, &str)]) -> Proxy {
        Self::start_wrapped(sb, &[], config, extra_env)
    }

    /// Like [`Proxy::start`], with the proxy run by `wrapper` (e.g.
    /// `["unshare", "--pid", "--fork", "--kill-child"]`).
    pub fn start_wrapped(
        sb: &Sandbox,
        wrapper: &[&str],
        config: &Path,
        extra_env: &[(&str, &str)],
    ) -> Proxy {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = sb.dir.join(format!("proxy-{n}.log"));
        let log = fs::File::create(&log_path).expect("creating the proxy log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(proxy_bin());
                cmd
            }
            None => Command::new(proxy_bin()),
        };
        cmd.arg("run")
            .arg("-c")
            .arg(config)
            .env("NO_COLOR", "1")
            .env("PROXY_LOG", "info")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let pid = child.id();
        let label = format!("proxy #{n} (pid {pid})");
        Proxy {
            child: sb.adopt(child),
            pid,
            log_path,
            id: None,
            label,
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

    /// The generation number (after [`Proxy::wait_active`]).
    pub fn generation(&self) -> u64 {
        self.id.expect("wait_active() first").generation
    }

    /// The slot (after [`Proxy::wait_active`]).
    pub fn slot(&self) -> u32 {
        self.id.expect("wait_active() first").slot
    }

    /// Sends `sig` to the process we spawned.
    pub fn signal(&self, sig: i32) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        // Only signal an unreaped child: its PID is still ours.
        if let Ok(None) = child_try_wait(&child) {
            // Safety: kill has no memory effects.
            let rc = unsafe { libc::kill(self.pid as libc::pid_t, sig) };
            assert_eq!(
                rc,
                0,
                "kill({}, {sig}): {}",
                self.pid,
                io::Error::last_os_error()
            );
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
        self.signal(libc::SIGKILL);
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

    /// The state letter of /proc/PID/stat of `pid` (R, S, T, Z...).
    pub fn proc_state(pid: u32) -> Option<char> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may contain spaces.
        stat.rsplit_once(") ")?.1.chars().next()
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

fn child_try_wait(child: &Child) -> io::Result<Option<()>> {
    // Child::try_wait needs &mut; peek with waitid(WNOWAIT) instead, so
    // that signal() never reaps behind try_exit()'s back.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // Safety: info is a valid out-pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        // ECHILD: already reaped.
        return Ok(Some(()));
    }
    // Safety: filled by waitid (zero when no child changed state).
    let pid = unsafe { info.si_pid() };
    Ok(if pid == 0 { None } else { Some(()) })
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

// ---------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------

/// The response to request `id` with payload `payload`: `RSP <id>\n`, then
/// the payload reversed and xored with a byte derived from the id, so that
/// a response to another request or a shifted one never matches.
pub fn expected_response(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("RSP {id}\n").into_bytes();
    let key = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1;
    out.extend(payload.iter().rev().map(|b| b ^ key));
    out
}

/// The request line and payload of request `id`.
pub fn request(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("REQ {id} {}\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Counters of the backend.
#[derive(Default, Debug)]
pub struct BackendStats {
    pub accepted: AtomicU64,
    pub served: AtomicU64,
    pub bad_requests: AtomicU64,
}

/// An in-process server answering `REQ <id> <len>\n<len bytes>` with
/// [`expected_response`], then closing.
pub struct Backend {
    pub stats: Arc<BackendStats>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Listens on [`BACKEND_ADDR`] in the runtime's namespace. `delay` is
    /// waited between reading a request and answering it.
    pub fn start(rt: &Runtime, delay: Duration) -> Backend {
        let listener = rt
            .block_on(TcpListener::bind(BACKEND_ADDR))
            .expect("binding the backend");
        let stats = Arc::new(BackendStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        rt.spawn(async move {
            while !sp.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let st = st.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(60), serve_one(stream, delay))
                        .await
                    {
                        Ok(Ok(())) => st.served.fetch_add(1, Ordering::Relaxed),
                        _ => st.bad_requests.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
        });
        Backend { stats, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn serve_one(mut stream: TcpStream, delay: Duration) -> io::Result<()> {
    let (id, payload) = read_request(&mut stream).await?;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    stream.write_all(&expected_response(id, &payload)).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn read_request(stream: &mut TcpStream) -> io::Result<(u64, Vec<u8>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(bad("EOF before the request line"));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(bad("request line too long"));
        }
    }
    let line = String::from_utf8(line).map_err(|_| bad("request line not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some("REQ"), Some(id), Some(len), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let id: u64 = id.parse().map_err(|_| bad("bad id"))?;
    let len: usize = len.parse().map_err(|_| bad("bad length"))?;
    if len > 1 << 20 {
        return Err(bad("request too long"));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok((id, payload))
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), enough for payloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// One complete exchange through the proxy: connect, send request `id`,
/// read until EOF, compare byte for byte. Err says what went wrong.
pub async fn exchange(
    addr: &str,
    id: u64,
    payload_len: usize,
    timeout: Duration,
) -> Result<(), String> {
    let payload = Rng::new(id).bytes(payload_len);
    let started = Instant::now();
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(&request(id, &payload))
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_and_check(&mut stream, id, &payload).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("conn {id}: {e} (after {:?})", started.elapsed())),
        Err(_) => Err(format!("conn {id}: timed out after {timeout:?}")),
    }
}

/// Reads the response to request `id` until EOF and compares it.
pub async fn read_and_check(stream: &mut TcpStream, id: u64, payload: &[u8]) -> Result<(), String> {
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e} (after {} bytes)", got.len()))?;
    let want = expected_response(id, payload);
    if got != want {
        let at = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        return Err(format!(
            "wrong response: {} bytes, expected {}, first difference at byte {at}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

/// A connection that sent only part of its request and waits: it keeps a
/// proxy connection (and so its generation) busy until [`Held::finish`].
pub struct Held {
    stream: TcpStream,
    id: u64,
    payload: Vec<u8>,
    sent: usize,
}

impl Held {
    /// Connects and sends the request line and half of the payload.
    pub async fn open(addr: &str, id: u64) -> Held {
        let payload = Rng::new(id).bytes(256);
        let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connecting the held connection: timed out")
            .expect("connecting the held connection");
        let req = request(id, &payload);
        let sent = req.len() - payload.len() / 2;
        stream
            .write_all(&req[..sent])
            .await
            .expect("sending the first half of the held request");
        Held {
            stream,
            id,
            payload,
            sent,
        }
    }

    /// Sends the rest and checks the response.
    pub async fn finish(mut self, timeout: Duration) -> Result<(), String> {
        let req = request(self.id, &self.payload);
        let work = async {
            self.stream
                .write_all(&req[self.sent..])
                .await
                .map_err(|e| format!("write: {e}"))?;
            read_and_check(&mut self.stream, self.id, &self.payload).await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("held conn {}: timed out after {timeout:?}", self.id))?
    }
}

/// Ids of connections, unique within the test process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh request id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// What the load generator is asked to do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// New connections per second.
    pub rate: f64,
    /// Never more connections than this.
    pub max_conns: u64,
    /// Never longer than this (the test usually stops it earlier).
    pub max_duration: Duration,
    /// Per-connection deadline (connect + exchange).
    pub conn_timeout: Duration,
}

impl LoadSpec {
    pub fn new(rate: f64, max_duration: Duration) -> LoadSpec {
        LoadSpec {
            rate,
            max_conns: (rate * max_duration.as_secs_f64()).ceil() as u64 + 1,
            max_duration,
            conn_timeout: Duration::from_secs(10),
        }
    }
}

/// Live counters of a load.
#[derive(Default, Debug)]
pub struct LoadStats {
    pub started: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The first failure reasons, for the assert message.
    pub failures: Mutex<Vec<String>>,
}

/// Final numbers of a load.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub started: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    /// From the first connection to the last one started.
    pub duration: Duration,
}

impl LoadReport {
    /// Connections started per second.
    pub fn rate(&self) -> f64 {
        self.started as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Panics unless every connection succeeded byte for byte.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.failed == 0 && self.ok == self.started,
            "{what}: expected 0 failed connections and ok == started, got started={} ok={} failed={}; first failures: {:#?}",
            self.started,
            self.ok,
            self.failed,
            self.failures
        );
    }
}

/// A running load: new connections to [`PROXY_ADDR`] at `spec.rate`.
pub struct Load {
    pub stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    handle: Option<tokio::task::JoinHandle<Duration>>,
}

impl Load {
    pub fn start(rt: &Runtime, spec: LoadSpec) -> Load {
        let stats = Arc::new(LoadStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        let handle = rt.spawn(generate(spec, st, sp, PROXY_ADDR.to_string()));
        Load {
            stats,
            stop,
            handle: Some(handle),
        }
    }

    pub fn started(&self) -> u64 {
        self.stats.started.load(Ordering::Relaxed)
    }

    pub fn ok(&self) -> u64 {
        self.stats.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until at least `n` connections succeeded.
    pub fn wait_ok(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.ok() < n {
            assert!(
                Instant::now() < deadline,
                "load: expected {n} successful connections within {timeout:?}, got ok={} failed={} ({:?})",
                self.ok(),
                self.failed(),
                self.stats
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops starting connections, waits for those in flight (each bounded
    /// by its own timeout) and returns the totals.
    pub fn finish(mut self, rt: &Runtime) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("finish() once");
        let duration = rt
            .block_on(handle)
            .expect("the load generator task panicked");
        let s = &self.stats;
        LoadReport {
            started: s.started.load(Ordering::Relaxed),
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            failures: s.failures.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            duration,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The generator: bounded in count (`max_conns`) and time (`max_duration`).
async fn generate(
    spec: LoadSpec,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    addr: String,
) -> Duration {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut sent = 0u64;
    let mut last_start = start;
    while !stop.load(Ordering::Relaxed) && sent < spec.max_conns {
        let elapsed = start.elapsed();
        if elapsed >= spec.max_duration {
            break;
        }
        let due = ((elapsed.as_secs_f64() * spec.rate) as u64 + 1).min(spec.max_conns);
        while sent < due {
            sent += 1;
            stats.started.fetch_add(1, Ordering::Relaxed);
            last_start = Instant::now();
            let id = next_id();
            let len = 16 + (id % 8) as usize * 61; // 16..=443 bytes
            let st = stats.clone();
            let timeout = spec.conn_timeout;
            let addr = addr.clone();
            tasks.spawn(async move {
                match exchange(&addr, id, len, timeout).await {
                    Ok(()) => {
                        st.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        st.failed.fetch_add(1, Ordering::Relaxed);
                        let mut f = st.failures.lock().unwrap_or_else(|p| p.into_inner());
                        if f.len() < 10 {
                            f.push(e);
                        }
                    }
                }
            });
        }
        // Reap finished tasks so that memory stays bounded on long runs.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while tasks.join_next().await.is_some() {}
    last_start
        .duration_since(start)
        .max(Duration::from_millis(1))
}

/// Appends a line to `<sandbox>/summary.txt` and prints it (visible with
/// `--nocapture`), so that the measured figures survive in the sandbox too.
pub fn report(sb: &Sandbox, line: &str) {
    eprintln!("{line}");
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sb.dir.join("summary.txt"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Accept-queue lengths of the TCP listeners on `port` in this thread's
/// network namespace (from /proc/thread-self/net/tcp: for a listening
/// socket, `rx_queue` is the number of established connections waiting for
/// `accept()`). /proc/self/net would show the main thread's namespace.
pub fn accept_queues(port: u16) -> Vec<u32> {
    let table = fs::read_to_string("/proc/thread-self/net/tcp").expect("reading /proc/net/tcp");
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (cols.get(1)?, cols.get(3)?, cols.get(4)?);
            if *state != "0A" || !local.ends_with(&want) {
                return None;
            }
            u32::from_str_radix(queues.split_once(':')?.1, 16).ok()
        })
        .collect()
}

/// Polls `cond` every 5 ms until it holds; panics with `what()` after
/// `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ===========================================================================
// Stages: TLS, HTTP, gzip, PROXY v2 (helpers of the tests/tests/stages_*.rs)
// ===========================================================================

/// Helpers of the data-path stage tests: certificates made with openssl, a
/// TLS client that accepts any certificate (and lets the test look at it),
/// an HTTP/1.1 backend whose responses are chosen by the request's query,
/// HTTP/1.1 client calls, and external commands bounded in time.
pub mod stages {
    use std::{
        collections::HashMap,
        convert::Infallible,
        fs,
        io::{self, Read as _},
        net::SocketAddr,
        path::{Path, PathBuf},
        process::{Command, Output, Stdio},
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
    use hyper::{
        Request, Response, StatusCode,
        body::{Frame, Incoming},
        client::conn::http1::SendRequest,
        header::{self, HeaderValue},
        http::response::Parts,
        service::service_fn,
    };
    use hyper_util::rt::TokioIo;
    use rustls::{
        ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    };
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite},
        net::{TcpListener, TcpStream},
        runtime::Runtime,
    };
    use tokio_rustls::{TlsConnector, client::TlsStream};

    use super::{BACKEND_ADDR, Rng, Sandbox};

    // -----------------------------------------------------------------------
    // External commands
    // -----------------------------------------------------------------------

    /// Runs `cmd` to completion with stdin closed; kills it and panics when
    /// it runs longer than `timeout`.
    pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        wait_bounded(child, timeout, &format!("{cmd:?}"))
    }

    /// Waits for `child` (stdout/stderr piped), at most `timeout`, draining
    /// its pipes on threads so that a chatty command never blocks; kills it
    /// and panics on a timeout.
    pub fn wait_bounded(mut child: std::process::Child, timeout: Duration, what: &str) -> Output {
        let (out_t, err_t) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for a command") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }

    /// Reads a pipe to its end on a thread.
    pub fn drain<R: std::io::Read + Send + 'static>(
        r: Option<R>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    }

    /// Like [`run_bounded`], panicking unless the command succeeded.
    pub fn run_bounded_ok(cmd: &mut Command, timeout: Duration) -> Output {
        let out = run_bounded(cmd, timeout);
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): stdout: {} stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    // -----------------------------------------------------------------------
    // Certificates
    // -----------------------------------------------------------------------

    /// A self-signed ECDSA P-256 certificate made with openssl.
    #[derive(Clone, Debug)]
    pub struct TestCert {
        /// Certificate then key, as `[listener.tls] certs` wants it.
        pub bundle: PathBuf,
        /// The certificate alone (PEM).
        pub cert_pem: String,
        /// The certificate (DER), to compare with what a client was shown.
        pub der: Vec<u8>,
        /// Its subject CN.
        pub cn: String,
    }

    /// Makes `<dir>/<cn>.pem` for the DNS names `sans`, subject `CN=<cn>`.
    pub fn make_cert(dir: &Path, cn: &str, sans: &[&str]) -> TestCert {
        let key = dir.join(format!("{cn}.key"));
        let crt = dir.join(format!("{cn}.crt"));
        let san = sans
            .iter()
            .map(|s| format!("DNS:{s}"))
            .collect::<Vec<_>>()
            .join(",");
        run_bounded_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                ])
                .arg(format!("/CN={cn}"))
                .arg("-addext")
                .arg(format!("subjectAltName={san}"))
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&crt),
            Duration::from_secs(20),
        );
        let cert_pem = fs::read_to_string(&crt).expect("reading the new certificate");
        let key_pem = fs::read_to_string(&key).expect("reading the new key");
        let bundle = dir.join(format!("{cn}.pem"));
        fs::write(&bundle, format!("{cert_pem}{key_pem}")).expect("writing the bundle");
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .expect("openssl wrote a PEM certificate")
            .to_vec();
        TestCert {
            bundle,
            cert_pem,
            der,
            cn: cn.to_string(),
        }
    }

    /// `openssl x509 -noout -subject -ext subjectAltName` of a DER certificate.
    pub fn describe_cert(der: &[u8]) -> String {
        let mut child = Command::new("openssl")
            .args([
                "x509",
                "-inform",
                "DER",
                "-noout",
                "-subject",
                "-ext",
                "subjectAltName",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running openssl x509");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(der).expect("writing the certificate");
        }
        let out = child.wait_with_output().expect("openssl x509 output");
        assert!(
            out.status.success(),
            "openssl x509 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    // -----------------------------------------------------------------------
    // TLS client
    // -----------------------------------------------------------------------

    /// Accepts any server certificate (the test compares it itself) but
    /// checks the handshake signatures, so the server really holds the key.
    #[derive(Debug)]
    struct AnyCert(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A client config offering `alpn`, sending SNI or not (TLS 1.3 and 1.2).
    pub fn tls_client_config(alpn: &[&str], send_sni: bool) -> Arc<ClientConfig> {
        tls_client_config_versions(alpn, send_sni, rustls::DEFAULT_VERSIONS)
    }

    /// Like [`tls_client_config`], offering only `versions`.
    pub fn tls_client_config_versions(
        alpn: &[&str],
        send_sni: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("ring supports these versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.enable_sni = send_sni;
        Arc::new(config)
    }

    /// Connects to `addr` and runs the TLS handshake for `server_name`.
    pub async fn tls_connect(
        addr: &str,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tls_handshake(tcp, server_name, config).await
    }

    /// Runs the client TLS handshake on an already connected `tcp`.
    pub async fn tls_handshake(
        tcp: TcpStream,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(config).connect(name, tcp).await
    }

    /// The leaf certificate (DER) the server showed on `stream`.
    pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .expect("a finished handshake has the server certificate")
    }

    // -----------------------------------------------------------------------
    // Bodies
    // -----------------------------------------------------------------------

    /// Compressible text where every line differs (a shifted or dropped
    /// byte shows): `line 000000042 of body 7 ...\n`, cut to `len`.
    pub fn text_body(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut line = 0u64;
        while out.len() < len {
            out.extend_from_slice(
                format!(
                    "line {line:09} of body {seed}: the quick brown fox jumps over the lazy dog\n"
                )
                .as_bytes(),
            );
            line += 1;
        }
        out.truncate(len);
        out
    }

    /// Incompressible bytes.
    pub fn binary_body(len: usize, seed: u64) -> Vec<u8> {
        Rng::new(seed ^ 0x5eed).bytes(len)
    }

    /// gunzip, panicking with `what` on a corrupt stream.
    pub fn gunzip(data: &[u8], what: &str) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("{what}: the gzip stream does not decode: {e}"));
        out
    }

    /// Where the first difference of two byte strings is, for messages.
    pub fn first_difference(got: &[u8], want: &[u8]) -> String {
        if got == want {
            return "identical".into();
        }
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        format!(
            "{} bytes, expected {}, first difference at byte {at}",
            got.len(),
            want.len()
        )
    }

    // -----------------------------------------------------------------------
    // HTTP backend
    // -----------------------------------------------------------------------

    /// What the HTTP backend saw.
    #[derive(Default, Debug)]
    pub struct HttpBackendStats {
        pub connections: AtomicU64,
        pub requests: AtomicU64,
        /// Requests by their `X-Forwarded-For` (`<none>` when absent).
        pub xff: Mutex<HashMap<String, u64>>,
    }

    impl HttpBackendStats {
        pub fn xff_counts(&self) -> HashMap<String, u64> {
            self.xff.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    /// An HTTP/1.1 server (hyper, keep-alive) on [`BACKEND_ADDR`]:
    ///
    /// - `POST /echo`: the request body back;
    /// - `GET|HEAD /r?len=N&seed=S&body=text|bin&ct=TYPE&status=CODE&enc=CODING
    ///   &cc=CACHE_CONTROL&etag=strong:X|weak:X&vary=V&chunked=1`: a body of
    ///   `len` bytes ([`text_body`] or [`binary_body`]) with those headers;
    ///   `chunked=1` sends it without Content-Length in 16 KiB frames.
    ///
    /// Every response carries `x-seen-xff` (the request's X-Forwarded-For, or
    /// `<none>`) and `x-backend-conn` (which backend connection served it).
    pub struct HttpBackend {
        pub stats: Arc<HttpBackendStats>,
        pub addr: SocketAddr,
        stop: Arc<AtomicBool>,
    }

    impl HttpBackend {
        pub fn start(rt: &Runtime) -> HttpBackend {
            let listener = rt
                .block_on(TcpListener::bind(BACKEND_ADDR))
                .expect("binding the HTTP backend");
            let addr = listener.local_addr().expect("backend address");
            let stats = Arc::new(HttpBackendStats::default());
            let stop = Arc::new(AtomicBool::new(false));
            let (st, sp) = (stats.clone(), stop.clone());
            rt.spawn(async move {
                while !sp.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn_no = st.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let st = st.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(answer(req, &st, conn_no).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            HttpBackend { stats, addr, stop }
        }

        pub fn requests(&self) -> u64 {
            self.stats.requests.load(Ordering::Relaxed)
        }
    }

    impl Drop for HttpBackend {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    pub type TestBody = UnsyncBoxBody<Bytes, io::Error>;

    /// A body of known length.
    pub fn full(data: impl Into<Bytes>) -> TestBody {
        Full::new(data.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync()
    }

    /// A body sent in 16 KiB frames with no length announced (HTTP/1.1
    /// chunked transfer coding).
    pub fn chunked(data: impl Into<Bytes>) -> TestBody {
        let data: Bytes = data.into();
        let frames = (0..data.len())
            .step_by(16 * 1024)
            .map(|at| data.slice(at..data.len().min(at + 16 * 1024)))
            .collect();
        ChunkedBody(frames).boxed_unsync()
    }

    /// Frames handed out one by one, no size hint.
    struct ChunkedBody(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for ChunkedBody {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// The parsed query of a request.
    pub fn query_map(uri: &hyper::Uri) -> HashMap<String, String> {
        uri.query()
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect()
    }

    async fn answer(
        req: Request<Incoming>,
        st: &HttpBackendStats,
        conn_no: u64,
    ) -> Response<TestBody> {
        st.requests.fetch_add(1, Ordering::Relaxed);
        let xff = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>();
        let xff = if xff.is_empty() {
            "<none>".to_string()
        } else {
            xff.join(" | ")
        };
        *st.xff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(xff.clone())
            .or_default() += 1;
        let mut resp = if req.uri().path() == "/echo" {
            match req.into_body().collect().await {
                Ok(body) => {
                    let mut r = Response::new(full(body.to_bytes()));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    r
                }
                Err(e) => {
                    let mut r = Response::new(full(format!("reading the body: {e}\n")));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            }
        } else {
            configured(&query_map(req.uri()))
        };
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-seen-xff", v);
        }
        h.insert("x-backend-conn", HeaderValue::from(conn_no));
        resp
    }

    /// The response `/r?...` asks for.
    fn configured(q: &HashMap<String, String>) -> Response<TestBody> {
        let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        let len = num("len", 1000) as usize;
        let seed = num("seed", 0);
        let status = StatusCode::from_u16(num("status", 200) as u16).unwrap_or(StatusCode::OK);
        let data = match q.get("body").map(String::as_str) {
            Some("bin") => binary_body(len, seed),
            _ => text_body(len, seed),
        };
        let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let chunked_mode = q.get("chunked").is_some_and(|v| v == "1");
        let body = if no_body {
            full(Bytes::new())
        } else if chunked_mode {
            chunked(data.clone())
        } else {
            full(data.clone())
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        let ct = q.get("ct").map(String::as_str).unwrap_or("text/html");
        if !ct.is_empty() && ct != "none" {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("a valid content type"),
            );
        }
        if !no_body && !chunked_mode {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
        }
        for (key, name) in [
            ("enc", header::CONTENT_ENCODING),
            ("cc", header::CACHE_CONTROL),
            ("vary", header::VARY),
        ] {
            if let Some(v) = q.get(key) {
                h.insert(
                    name,
                    HeaderValue::from_str(v).expect("a valid header value"),
                );
            }
        }
        if let Some(etag) = q.get("etag") {
            let value = match etag.split_once(':') {
                Some(("weak", tag)) => format!("W/\"{tag}\""),
                Some((_, tag)) => format!("\"{tag}\""),
                None => format!("\"{etag}\""),
            };
            h.insert(
                header::ETAG,
                HeaderValue::from_str(&value).expect("an ETag"),
            );
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        resp
    }

    // -----------------------------------------------------------------------
    // HTTP client
    // -----------------------------------------------------------------------

    /// HTTP/1.1 client handshake over any byte stream; the connection task
    /// runs on the current runtime.
    pub async fn http_handshake<IO>(io: IO) -> io::Result<SendRequest<TestBody>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A new plain HTTP connection to `addr`.
    pub async fn http_connect(addr: &str) -> io::Result<SendRequest<TestBody>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        http_handshake(tcp).await
    }

    /// Sends `req` and reads the whole response.
    pub async fn fetch(
        sender: &mut SendRequest<TestBody>,
        req: Request<TestBody>,
    ) -> Result<(Parts, Vec<u8>), String> {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the body (status {}): {e}", parts.status))?
            .to_bytes()
            .to_vec();
        Ok((parts, body))
    }

    /// A GET (or other bodiless method) with `headers`; Host `host`.
    pub fn request(
        method: &str,
        uri: &str,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Request<TestBody> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(full(Bytes::new())).expect("a valid request")
    }

    /// A POST of `body` to `/echo`.
    pub fn echo_request(host: &str, body: Vec<u8>) -> Request<TestBody> {
        Request::builder()
            .method("POST")
            .uri("/echo")
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(full(body))
            .expect("a valid request")
    }

    /// All values of a response header joined with `, ` (None if absent).
    pub fn header_str(parts: &Parts, name: &str) -> Option<String> {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The stage config's `[global]` table for this sandbox.
    pub fn global_toml(sb: &Sandbox, hard_stop_after: &str) -> String {
        format!(
            "[global]\nname = \"{}\"\nbpffs = \"{}\"\nsteering = \"ebpf\"\nhard_stop_after = \"{hard_stop_after}\"\n\n",
            sb.name,
            sb.bpffs.display()
        )
    }

    /// Reads from `stream` until EOF, an error or `bound`; says how it
    /// ended and after how long (the bytes read are returned too).
    pub async fn read_until_closed<S: AsyncRead + Unpin>(
        stream: &mut S,
        bound: Duration,
    ) -> (Closed, Duration, Vec<u8>) {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = bound.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Err(_) => return (Closed::StillOpen, start.elapsed(), got),
                Ok(Ok(0)) => return (Closed::Eof, start.elapsed(), got),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return (Closed::Error(e.kind()), start.elapsed(), got),
            }
        }
    }

    /// How a connection ended in [`read_until_closed`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Closed {
        Eof,
        Error(io::ErrorKind),
        StillOpen,
    }

    impl Closed {
        /// EOF or a reset: the peer closed it.
        pub fn is_closed(self) -> bool {
            !matches!(self, Closed::StillOpen)
        }
    }
}

// ===========================================================================
// Operator surface (helpers of the tests/tests/operator_*.rs)
// ===========================================================================

/// Helpers of the operator tests: plain HTTP GETs of the stats listener,
/// configs with extra keys, a proxy started with extra arguments, a load to
/// another address, `/proc` figures, and the external tools those tests use
/// as referees (Debian's chromium, Python's `prometheus_client`).
pub mod operator {
    use std::{
        collections::BTreeMap,
        fs,
        io::{self, Read as _, Write as _},
        net::{SocketAddr, TcpStream as StdTcpStream},
        os::unix::process::CommandExt as _,
        path::{Path, PathBuf},
        process::{Command, ExitStatus, Stdio},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };

    use serde::Deserialize;
    use tokio::runtime::Runtime;

    use super::{
        Counters, GenStatus, Load, LoadSpec, LoadStats, Proxy, ProxyConfig, Sandbox, proxy_bin,
    };

    /// The default `[stats] bind`.
    pub const STATS_ADDR: &str = "127.0.0.1:8404";

    // -----------------------------------------------------------------------
    // Plain HTTP/1.1 GET (blocking, from the calling thread's namespace)
    // -----------------------------------------------------------------------

    /// A response read to its end.
    #[derive(Debug, Clone)]
    pub struct HttpReply {
        pub status: u16,
        /// Header names in lower case.
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl HttpReply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// `GET path` on a new connection to `addr` (`Connection: close`),
    /// bounded by `timeout` in all.
    pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<HttpReply, String> {
        let deadline = Instant::now() + timeout;
        let sa: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
        let mut s = StdTcpStream::connect_timeout(&sa, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        s.set_write_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: proxy-it\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("GET {path}: write: {e}"))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if Instant::now() >= deadline {
                return Err(format!(
                    "GET {path}: no complete response within {timeout:?}"
                ));
            }
            s.set_read_timeout(Some(left()))
                .map_err(|e| e.to_string())?;
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!("GET {path}: read: {e} (after {} bytes)", raw.len()));
                }
            }
        }
        parse_response(&raw).map_err(|e| format!("GET {path}: {e}"))
    }

    fn parse_response(raw: &[u8]) -> Result<HttpReply, String> {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[end + 4..].to_vec();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            body = dechunk(&body)?;
        } else if let Some(len) = get("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad Content-Length {len}"))?;
            if body.len() != len {
                return Err(format!(
                    "body of {} bytes, Content-Length says {len}",
                    body.len()
                ));
            }
        }
        Ok(HttpReply {
            status,
            headers,
            body: String::from_utf8(body).map_err(|e| format!("body not UTF-8: {e}"))?,
        })
    }

    fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let eol = data
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunk size")?;
            let size_text = String::from_utf8_lossy(&data[..eol]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            data = &data[eol + 2..];
            if size == 0 {
                return Ok(out);
            }
            if data.len() < size + 2 {
                return Err("truncated chunk".into());
            }
            out.extend_from_slice(&data[..size]);
            data = &data[size + 2..];
        }
    }

    /// [`http_get`] retried (every 20 ms) while it fails to connect or read,
    /// until a 200 or `timeout`; panics with the last error. Returns the
    /// reply and the errors of the attempts that failed first (a stats
    /// socket closing during a handover may reset a connection still in its
    /// queue).
    pub fn http_get_ok(addr: &str, path: &str, timeout: Duration) -> (HttpReply, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut failed = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match http_get(
                addr,
                path,
                left.clamp(Duration::from_millis(50), Duration::from_secs(5)),
            ) {
                Ok(r) if r.status == 200 => return (r, failed),
                Ok(r) => format!("status {}: {}", r.status, r.body),
                Err(e) => e,
            };
            failed.push(last.clone());
            assert!(
                Instant::now() < deadline,
                "GET http://{addr}{path}: no 200 within {timeout:?} ({} attempts); last: {last}",
                failed.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // -----------------------------------------------------------------------
    // Configs, processes
    // -----------------------------------------------------------------------

    /// The standard config of [`ProxyConfig::render`] with `global_extra`
    /// (TOML lines) added to `[global]` and `tail` (more tables) appended.
    pub fn config_text(sb: &Sandbox, cfg: &ProxyConfig, global_extra: &str, tail: &str) -> String {
        let base = cfg.render(sb);
        let mut extra = global_extra.trim_end().to_string();
        if !extra.is_empty() {
            extra.push('\n');
        }
        let text = base.replacen("[global]\n", &format!("[global]\n{extra}"), 1);
        assert!(
            text.starts_with("[global]\n"),
            "the rendered config starts with [global]"
        );
        format!("{text}\n{tail}")
    }

    impl Proxy {
        /// Like [`Proxy::start`], with `args` after `run -c config` (e.g.
        /// `--log-json`).
        pub fn start_args(
            sb: &Sandbox,
            config: &Path,
            args: &[&str],
            extra_env: &[(&str, &str)],
        ) -> Proxy {
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let log_path = sb.dir.join(format!("proxy-args-{n}.log"));
            let log = fs::File::create(&log_path).expect("creating the proxy log");
            let mut cmd = Command::new(proxy_bin());
            cmd.arg("run")
                .arg("-c")
                .arg(config)
                .args(args)
                .env("NO_COLOR", "1")
                .env("PROXY_LOG", "info")
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
                label: format!("proxy args#{n} (pid {pid})"),
                exit: None,
            }
        }
    }

    impl Load {
        /// Like [`Load::start`], to `addr` instead of [`super::PROXY_ADDR`].
        pub fn start_to(rt: &Runtime, spec: LoadSpec, addr: &str) -> Load {
            let stats = Arc::new(LoadStats::default());
            let stop = Arc::new(AtomicBool::new(false));
            let (st, sp) = (stats.clone(), stop.clone());
            let handle = rt.spawn(super::generate(spec, st, sp, addr.to_string()));
            Load {
                stats,
                stop,
                handle: Some(handle),
            }
        }
    }

    /// `/proc/<pid>/status` as key -> value (values trimmed).
    pub fn proc_status(pid: u32) -> BTreeMap<String, String> {
        proc_status_at(&format!("/proc/{pid}/status"))
    }

    /// The status of every thread of `pid` (tid -> key -> value).
    pub fn proc_thread_statuses(pid: u32) -> BTreeMap<u32, BTreeMap<String, String>> {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .map(|tid| {
                        (
                            tid,
                            proc_status_at(&format!("/proc/{pid}/task/{tid}/status")),
                        )
                    })
                    .filter(|(_, st)| !st.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn proc_status_at(path: &str) -> BTreeMap<String, String> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The capability mask with the bits `caps` set.
    pub fn cap_mask(caps: &[u32]) -> u64 {
        caps.iter().fold(0, |m, c| m | (1u64 << c))
    }

    // -----------------------------------------------------------------------
    // /stats.json
    // -----------------------------------------------------------------------

    /// `/stats.json` of the stats listener.
    #[derive(Clone, Debug, Deserialize)]
    pub struct StatsJson {
        pub instance: String,
        pub banner: String,
        pub steering: String,
        pub active_slot: Option<u32>,
        pub generations: Vec<GenStatus>,
        pub listeners: Vec<ListenerStats>,
        pub servers: Vec<ServerStats>,
        pub ebpf: Option<Counters>,
        pub history_interval_ms: u64,
        pub history: Vec<HistorySeries>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct ListenerStats {
        pub name: String,
        pub current: u64,
        pub total: u64,
        pub bytes_in: u64,
        pub bytes_out: u64,
        pub errors: u64,
        pub tls_handshakes: u64,
        pub tls_failures: u64,
        pub proxy_header_errors: u64,
        pub http_requests: u64,
        pub compression_ratio: Option<f64>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct ServerStats {
        pub backend: String,
        pub server: String,
        pub current: u64,
        pub total: u64,
        pub bytes_in: u64,
        pub bytes_out: u64,
        pub errors: u64,
        pub up: bool,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct HistorySeries {
        pub generation: u64,
        pub points: Vec<(u64, u64)>,
    }

    impl StatsJson {
        pub fn listener(&self, name: &str) -> &ListenerStats {
            self.listeners
                .iter()
                .find(|l| l.name == name)
                .unwrap_or_else(|| panic!("no listener {name:?} in /stats.json: {self:#?}"))
        }
    }

    // -----------------------------------------------------------------------
    // Prometheus text format, parsed by Python's prometheus_client
    // -----------------------------------------------------------------------

    /// A metric family as `prometheus_client` parsed it (counter families
    /// are named without `_total`; their samples keep it).
    #[derive(Clone, Debug, Deserialize)]
    pub struct PromFamily {
        pub name: String,
        #[serde(rename = "type")]
        pub kind: String,
        pub help: String,
        pub samples: Vec<PromSample>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct PromSample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    const PROM_PARSER: &str = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print("prometheus_client is missing (%s): pip install prometheus-client" % e, file=sys.stderr)
    sys.exit(3)
out = []
for i, text in enumerate(json.load(sys.stdin)):
    try:
        fams = [
            {"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": s.labels, "value": float(s.value)} for s in f.samples]}
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:
        print("scrape %d does not parse: %r" % (i, e), file=sys.stderr)
        sys.exit(4)
    out.append(fams)
json.dump(out, sys.stdout, allow_nan=False)
"#;

    /// Parses each exposition in `texts` with `prometheus_client` (one
    /// `python3` run for all of them). Panics if python3 or the module is
    /// missing ("pip install prometheus-client"), or if a text does not parse.
    pub fn parse_prometheus(texts: &[String]) -> Vec<Vec<PromFamily>> {
        let mut child = match Command::new("python3")
            .arg("-c")
            .arg(PROM_PARSER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot run python3 ({e}): the metrics test parses /metrics with Python's \
                 prometheus_client: install python3, then pip install prometheus-client"
            ),
        };
        let input = serde_json::to_vec(texts).expect("texts as JSON");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = super::stages::wait_bounded(
            child,
            Duration::from_secs(60),
            "python3 prometheus_client parser",
        );
        let _ = writer.join();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(3) => panic!(
                "{} (or, with Debian's python3: apt-get install python3-prometheus-client)",
                stderr.trim()
            ),
            _ => panic!(
                "prometheus_client could not parse /metrics ({}): {}",
                out.status,
                stderr.trim()
            ),
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "the parser printed JSON we cannot read ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    // -----------------------------------------------------------------------
    // Headless chromium
    // -----------------------------------------------------------------------

    /// Debian's chromium.
    pub const CHROMIUM: &str = "/usr/bin/chromium";

    /// The chromium binary, or a panic saying how to install it.
    pub fn require_chromium() -> PathBuf {
        let path = PathBuf::from(CHROMIUM);
        assert!(
            path.is_file(),
            "{CHROMIUM} not found: install chromium (apt-get install chromium)"
        );
        path
    }

    /// How a chromium run ended.
    pub struct BrowserRun {
        pub stdout: String,
        pub stderr: String,
        pub status: ExitStatus,
        pub took: Duration,
    }

    /// Runs headless chromium with `args` (after the common headless flags)
    /// in its own process group, from the calling thread (so in its network
    /// namespace), with a private profile under `dir`. On a timeout the whole
    /// group (chromium and its helper processes) is killed by its id, still
    /// held by the unreaped leader, and Err says what it printed.
    pub fn run_chromium(
        dir: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<BrowserRun, String> {
        let bin = require_chromium();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let profile = dir.join(format!("chromium-profile-{n}"));
        fs::create_dir_all(&profile).expect("creating the chromium profile folder");
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .env("HOME", &profile)
        .env("XDG_CONFIG_HOME", profile.join("config"))
        .env("XDG_CACHE_HOME", profile.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let pid = child.id();
        let (out_t, err_t) = (
            super::stages::drain(child.stdout.take()),
            super::stages::drain(child.stderr.take()),
        );
        let kill_group = || {
            // The leader is not reaped yet, so its PID (the group id) is ours.
            // Safety: kill has no memory effects.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        };
        let timed_out = loop {
            if exited_unreaped(pid) {
                break false;
            }
            if started.elapsed() >= timeout {
                break true;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Helpers still running (normally none) go with the group.
        kill_group();
        let status = child.wait().expect("reaping chromium");
        let took = started.elapsed();
        let (stdout, stderr) = (
            out_t.join().unwrap_or_default(),
            err_t.join().unwrap_or_default(),
        );
        let run = BrowserRun {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            status,
            took,
        };
        if timed_out {
            return Err(format!(
                "chromium did not finish within {timeout:?} (killed process group {pid}); stderr tail:\n{}",
                tail(&run.stderr, 20)
            ));
        }
        Ok(run)
    }

    /// Whether child `pid` has exited, without reaping it.
    fn exited_unreaped(pid: u32) -> bool {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // Safety: info is a valid out-pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // Safety: filled by waitid (zero when no child changed state).
        rc != 0 || unsafe { info.si_pid() } != 0
    }

    /// The last `n` lines of `text`.
    pub fn tail(text: &str, n: usize) -> String {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}
