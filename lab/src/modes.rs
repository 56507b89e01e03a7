//! The contenders: our proxy with eBPF steering, our proxy on plain
//! SO_REUSEPORT (with and without the kernel's request migration), and
//! HAProxy from Debian reloading the classic way (`-sf`) and with socket
//! transfer (`-x`). Each starts a first generation and hands over to the
//! next one its own way; the lab only sees "a generation" with a PID.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use proxy_harness::{
    Proxy, Sandbox,
    certs::TestCert,
    config::{BACKEND_ADDR, PROXY_ADDR},
    sandbox::write_sysctl,
};

/// The TLS listener of every contender (when the mix has TLS clients).
pub const TLS_ADDR: &str = "127.0.0.1:8443";

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Ebpf,
    Reuseport,
    ReuseportMigrate,
    HaproxySf,
    HaproxyX,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Ebpf,
        Mode::Reuseport,
        Mode::ReuseportMigrate,
        Mode::HaproxySf,
        Mode::HaproxyX,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Reuseport => "reuseport",
            Mode::ReuseportMigrate => "reuseport+migrate",
            Mode::HaproxySf => "haproxy-sf",
            Mode::HaproxyX => "haproxy-x",
        }
    }

    /// Our proxy (as opposed to HAProxy).
    pub fn is_ours(self) -> bool {
        matches!(self, Mode::Ebpf | Mode::Reuseport | Mode::ReuseportMigrate)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("{s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// One running generation of a contender.
pub struct Gen {
    pub pid: u32,
    /// Our generation number (our modes, once ready).
    pub generation: Option<u64>,
    pub proc: Proc,
}

pub enum Proc {
    Ours(Proxy),
    Haproxy {
        child: Arc<Mutex<std::process::Child>>,
        log: PathBuf,
    },
}

impl Gen {
    /// Whether the process has exited (reaps it).
    pub fn exited(&mut self) -> bool {
        match &mut self.proc {
            Proc::Ours(p) => p.try_exit().is_some(),
            Proc::Haproxy { child, .. } => child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()
                .ok()
                .flatten()
                .is_some(),
        }
    }

    pub fn log(&self) -> String {
        match &self.proc {
            Proc::Ours(p) => p.log(),
            Proc::Haproxy { log, .. } => fs::read_to_string(log).unwrap_or_default(),
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // Safety: kill(2) on a PID we started.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// Waits for the exit, at most `timeout`; true when it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.exited()
    }
}

/// What every contender is configured for.
#[derive(Clone, Debug)]
pub struct Setup {
    /// `tcp` (a byte stream) or `http` (HTTP/1.1 parsed).
    pub listener_mode: String,
    pub tls: bool,
    pub hard_stop_after: Duration,
    /// Our generations' grace between seeing the successor and closing.
    pub handover_grace: Duration,
}

/// A contender in one sandbox: its config files and how it starts and
/// hands over.
pub struct Contender<'a> {
    pub sb: &'a Sandbox,
    pub mode: Mode,
    config: PathBuf,
    haproxy_sock: PathBuf,
    seq: Mutex<u32>,
}

impl<'a> Contender<'a> {
    /// Writes the config of `mode` into the sandbox (and sets the sysctl of
    /// `reuseport+migrate`).
    pub fn new(sb: &'a Sandbox, mode: Mode, setup: Setup, cert: Option<&TestCert>) -> Result<Self> {
        if mode == Mode::ReuseportMigrate {
            write_sysctl("net/ipv4/tcp_migrate_req", "1");
        }
        let haproxy_sock = sb.dir.join("haproxy.sock");
        let config = if mode.is_ours() {
            let steering = if mode == Mode::Ebpf {
                "ebpf"
            } else {
                "reuseport"
            };
            let mut text = format!(
                "[global]\nname = \"{name}\"\nbpffs = \"{bpffs}\"\nsteering = \"{steering}\"\n\
                 hard_stop_after = \"{hard}ms\"\nhandover_grace = \"{grace}ms\"\n\n\
                 [[listener]]\nname = \"front\"\nbind = [\"{PROXY_ADDR}\"]\nbackend = \"app\"\n\
                 backlog = 4096\nmode = \"{lm}\"\n",
                name = sb.name,
                bpffs = sb.bpffs.display(),
                hard = setup.hard_stop_after.as_millis(),
                grace = setup.handover_grace.as_millis(),
                lm = setup.listener_mode,
            );
            if let Some(cert) = cert.filter(|_| setup.tls) {
                text.push_str(&format!(
                    "\n[[listener]]\nname = \"tls\"\nbind = [\"{TLS_ADDR}\"]\nbackend = \"app\"\n\
                     backlog = 4096\nmode = \"{lm}\"\n[listener.tls]\ncerts = [\"{}\"]\n",
                    cert.bundle.display(),
                    lm = setup.listener_mode,
                ));
            }
            text.push_str(&format!(
                "\n[[backend]]\nname = \"app\"\nservers = [\"{BACKEND_ADDR}\"]\nconnect_timeout = \"2s\"\n"
            ));
            sb.write_file("proxy.toml", &text)
        } else {
            let expose = if mode == Mode::HaproxyX {
                format!(
                    "    stats socket {} mode 600 level admin expose-fd listeners\n",
                    haproxy_sock.display()
                )
            } else {
                String::new()
            };
            let http = if setup.listener_mode == "http" {
                "    option idle-close-on-response\n"
            } else {
                ""
            };
            let tls_bind = match cert.filter(|_| setup.tls) {
                Some(c) => format!(
                    "    bind {TLS_ADDR} ssl crt {} backlog 4096\n",
                    c.bundle.display()
                ),
                None => String::new(),
            };
            let text = format!(
                "global\n    maxconn 9000\n    nbthread 1\n    hard-stop-after {hard}ms\n{expose}\n\
                 defaults\n    mode {lm}\n    timeout connect 2s\n    timeout client 30s\n    \
                 timeout server 30s\n{http}\n\
                 frontend fe\n    bind {PROXY_ADDR} backlog 4096\n{tls_bind}    default_backend be\n\n\
                 backend be\n    server s1 {BACKEND_ADDR}\n",
                hard = setup.hard_stop_after.as_millis(),
                lm = setup.listener_mode,
            );
            sb.write_file("haproxy.cfg", &text)
        };
        Ok(Self {
            sb,
            mode,
            config,
            haproxy_sock,
            seq: Mutex::new(0),
        })
    }

    /// The first generation, serving when this returns.
    pub fn start(&self) -> Result<Gen> {
        self.spawn(None, &[])
    }

    /// The next generation, taking over from `old` the contender's way;
    /// serving when this returns.
    pub fn hand_over(&self, old: &Gen) -> Result<Gen> {
        self.spawn(Some(old), &[])
    }

    /// Our proxy with extra `run` arguments (a canary).
    pub fn start_with(&self, args: &[&str]) -> Result<Gen> {
        self.spawn(None, args)
    }

    fn spawn(&self, old: Option<&Gen>, args: &[&str]) -> Result<Gen> {
        let deadline = Duration::from_secs(10);
        if self.mode.is_ours() {
            let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            // Without eBPF the old generation learns of the new one only by
            // its signal.
            if let Some(old) = old.filter(|_| self.mode != Mode::Ebpf) {
                all.push("-sf".into());
                all.push(old.pid.to_string());
            }
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut p = Proxy::start_args(self.sb, &self.config, &all, &[]);
            let canary = args.contains(&"--canary");
            let marker = if canary {
                ": canary: takes"
            } else {
                ": active"
            };
            let start = Instant::now();
            let generation = loop {
                let log = p.log();
                if let Some(id) = proxy_harness::proxy::parse_gen_id(&log, marker) {
                    break Some(id.generation);
                }
                // Without eBPF a generation has no number ("generation pid N").
                if self.mode != Mode::Ebpf && log.lines().any(|l| l.contains(marker)) {
                    break None;
                }
                if let Some(status) = p.try_exit() {
                    bail!(
                        "proxy exited with {status} before serving; log:\n{}",
                        p.log()
                    );
                }
                if start.elapsed() > deadline {
                    bail!("proxy did not serve within {deadline:?}; log:\n{}", p.log());
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let pid = p.pid;
            return Ok(Gen {
                pid,
                generation,
                proc: Proc::Ours(p),
            });
        }
        let mut n = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        let log = self.sb.dir.join(format!("haproxy-{n}.log"));
        let mut cmd = Command::new(haproxy_bin());
        cmd.arg("-f").arg(&self.config).arg("-db");
        if let Some(old) = old {
            if self.mode == Mode::HaproxyX {
                cmd.arg("-x").arg(&self.haproxy_sock);
            }
            cmd.arg("-sf").arg(old.pid.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).context("creating the HAProxy log")?);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        let child = self.sb.adopt(child);
        let mut child_gen = Gen {
            pid,
            generation: None,
            proc: Proc::Haproxy { child, log },
        };
        let port = PROXY_ADDR.rsplit(':').next().unwrap_or("8080").parse()?;
        let start = Instant::now();
        while !listens(pid, port) {
            if child_gen.exited() {
                bail!("haproxy exited before listening; log:\n{}", child_gen.log());
            }
            if start.elapsed() > deadline {
                bail!(
                    "haproxy did not listen within {deadline:?}; log:\n{}",
                    child_gen.log()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(child_gen)
    }
}

/// The HAProxy binary (Debian's).
pub fn haproxy_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join("haproxy");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("haproxy")
}

/// Whether `pid` holds a listening TCP socket on `port` in our namespace.
pub fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/thread-self/net/tcp") else {
        return false;
    };
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.get(3) == Some(&"0A") && cols.get(1).is_some_and(|l| l.ends_with(&want)))
                .then(|| cols.get(9).map(|s| s.to_string()))
                .flatten()
        })
        .collect();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]").as_str())
        })
    })
}
