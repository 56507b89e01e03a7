//! The processes of a peer run: the origin (nginx), and the three
//! contenders (HAProxy, nginx, our proxy) configured for the same work
//! (hop-by-hop headers stripped, `X-Forwarded-For` added, idle upstream
//! connections reused), each pinned to CPU 0 with one thread or worker; and
//! what `/proc` says about them (CPU time, resident memory).

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use proxy_harness::{Proxy, Sandbox, config::toml_str, procfs};
use serde::Serialize;

/// The CPU the contenders and the origin run on; the load runs on
/// [`LOAD_CPU`].
pub const SERVER_CPU: usize = 0;
pub const LOAD_CPU: usize = 1;

/// The connections each contender is configured for (global `maxconn` of
/// HAProxy and ours; nginx's `worker_connections` is twice it, as it counts
/// upstream connections too): the largest idle count ([`super::IDLE_COUNTS`]) and the load rows'
/// clients, with room to spare.
pub const MAXCONN: usize = 20_000;

/// The open-file limit the bench raises for itself and the contenders it
/// starts (they inherit it): 16,000 idle clients on the load side, and
/// room for each contender's [`MAXCONN`].
const OPEN_FILES: u64 = 65_536;

/// Raises this process's open-file limit to [`OPEN_FILES`] (the hard one
/// too, which needs CAP_SYS_RESOURCE), or else the soft limit to the hard
/// one.
pub fn raise_open_files() {
    let now = rlimit_nofile();
    if now.rlim_cur >= OPEN_FILES {
        return;
    }
    let hard = now.rlim_max;
    for (cur, max) in [(OPEN_FILES, OPEN_FILES.max(hard)), (hard, hard)] {
        let raised = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // Safety: setrlimit reads the valid rlimit given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return;
        }
    }
}

fn rlimit_nofile() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // Safety: getrlimit writes an rlimit into the valid pointer given (and
    // leaves it alone if it fails).
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim
}

/// The soft open-file limit of this process, which the contenders inherit.
pub fn open_files() -> u64 {
    rlimit_nofile().rlim_cur
}

/// The `maxconn` each contender is given: [`MAXCONN`] when the open-file
/// limit has room for it (two descriptors a connection), else none: each
/// derives its own from the limit.
pub fn maxconn() -> Option<usize> {
    (open_files() >= 2 * MAXCONN as u64 + 1_000).then_some(MAXCONN)
}

/// The origin's port (fixed: the run has its own network namespace).
pub const ORIGIN_PORT: u16 = 8000;

/// The three contenders, in the order of the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Haproxy,
    Nginx,
    Proxy,
    /// The floor forwarder (`floor.rs`): a reference on the plain HTTP
    /// rows, neither a peer nor ours.
    Floor,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Haproxy, Kind::Nginx, Kind::Proxy];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Proxy => "proxy",
            Kind::Floor => "floor",
        }
    }

    /// Whether this is one of the peers we are compared with.
    pub fn is_peer(self) -> bool {
        matches!(self, Kind::Haproxy | Kind::Nginx)
    }

    /// The contender's first port; its listeners are at fixed offsets
    /// ([`Listener`]).
    fn base_port(self) -> u16 {
        match self {
            Kind::Haproxy => 8100,
            Kind::Nginx => 8200,
            Kind::Proxy => 8300,
            Kind::Floor => 8400,
        }
    }

    pub fn port(self, l: Listener) -> u16 {
        self.base_port() + l as u16
    }
}

/// The listeners every contender has, all forwarding to the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Plain HTTP/1.1.
    Http = 0,
    /// HTTP with gzip (level 1 where the contender has levels).
    Gzip = 1,
    /// TLS (ECDSA P-256 certificate), then HTTP.
    TlsEcdsa = 2,
    /// TLS (RSA 2048 certificate), then HTTP.
    TlsRsa = 3,
    /// Layer 4 (tcp mode, nginx's stream module): the bytes pass through
    /// unparsed.
    Tcp = 4,
}

/// The files the configs name: document root and certificates.
pub struct Files<'a> {
    pub dir: &'a Path,
    pub www: &'a Path,
    pub ecdsa: &'a Path,
    pub rsa: &'a Path,
}

/// A started process tree that the sandbox's guard kills on drop.
pub struct Running {
    pub kind: Option<Kind>,
    /// The process we started (for nginx, the master; its worker is a child).
    pub pid: u32,
    /// For our proxy: the handle with its log.
    pub proxy: Option<Proxy>,
    /// Where its errors go.
    pub log: std::path::PathBuf,
}

impl Running {
    /// The process and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        let mut all = vec![self.pid];
        let mut i = 0;
        // Bounded: a contender has a handful of processes.
        while i < all.len() && all.len() < 64 {
            all.extend(procfs::children(all[i]));
            i += 1;
        }
        all
    }

    /// Nanoseconds on CPU of all threads of all its processes
    /// (`/proc/<pid>/task/<tid>/schedstat`, first field).
    pub fn cpu_ns(&self) -> u64 {
        self.pids().into_iter().map(cpu_ns_of).sum()
    }

    /// Sum of a `/proc/<pid>/status` field in KiB (VmRSS, VmHWM) over its
    /// processes.
    pub fn mem_kib(&self, field: &str) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| {
                procfs::proc_status(pid)
                    .get(field)?
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// An error with the end of its log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let gone = match &mut self.proxy {
            Some(p) => p.try_exit().map(|s| s.to_string()),
            None => (!Path::new(&format!("/proc/{}", self.pid)).exists()
                || procfs::proc_state(self.pid) == Some('Z'))
            .then(|| "exited".to_string()),
        };
        if let Some(status) = gone {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            bail!(
                "{} (pid {}) {status}; its log ends with:\n{}",
                self.kind.map_or("the origin", Kind::label),
                self.pid,
                proxy_harness::process::tail(&log, 20)
            );
        }
        Ok(())
    }
}

fn cpu_ns_of(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let s = fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Starts `program args` pinned to [`SERVER_CPU`], stdout and stderr to
/// `<dir>/<name>.log`, adopted by the sandbox.
fn spawn_pinned(sb: &Sandbox, name: &str, program: &str, args: &[&str]) -> Result<Running> {
    let log = sb.dir.join(format!("{name}.log"));
    let out = fs::File::create(&log)?;
    let child = Command::new("taskset")
        .args(["-c", &SERVER_CPU.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {program} (is it installed?)"))?;
    let pid = child.id();
    sb.adopt(child);
    Ok(Running {
        kind: None,
        pid,
        proxy: None,
        log,
    })
}

/// Waits until `port` on loopback accepts a connection.
pub fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the origin: nginx, one worker, serving `files.www`.
pub fn start_origin(sb: &Sandbox, files: &Files) -> Result<Running> {
    let conf = nginx_main(files.dir, "origin")
        + &format!(
            "http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    types {{ text/html html; }}
    default_type text/plain;
{temp}
    server {{
        listen 127.0.0.1:{ORIGIN_PORT} backlog=4096;
        root {www};
    }}
}}
",
            temp = nginx_temp_paths(files.dir, "origin"),
            www = files.www.display(),
        );
    let path = sb.write_file("origin-nginx.conf", &conf);
    let r = spawn_pinned(
        sb,
        "origin-nginx",
        "nginx",
        &["-c", &path.display().to_string()],
    )?;
    wait_port(ORIGIN_PORT, Duration::from_secs(10))?;
    Ok(r)
}

/// Starts one contender and waits until all its listeners accept.
pub fn start(sb: &Sandbox, kind: Kind, files: &Files) -> Result<Running> {
    let mut r = match kind {
        Kind::Haproxy => {
            let path = sb.write_file("haproxy.cfg", &haproxy_config(files));
            spawn_pinned(
                sb,
                "haproxy",
                "haproxy",
                &["-db", "-f", &path.display().to_string()],
            )?
        }
        Kind::Nginx => {
            let path = sb.write_file("nginx.conf", &nginx_config(files));
            spawn_pinned(sb, "nginx", "nginx", &["-c", &path.display().to_string()])?
        }
        Kind::Proxy => start_proxy(sb, &proxy_config(sb, files, false)),
        Kind::Floor => return start_floor(sb),
    };
    r.kind = Some(kind);
    wait_listeners(kind, r)
}

/// The floor forwarder (this program, `--floor-serve`) on its `Http` port.
fn start_floor(sb: &Sandbox) -> Result<Running> {
    let exe = std::env::current_exe().context("finding this program")?;
    let listen = format!("127.0.0.1:{}", Kind::Floor.port(Listener::Http));
    let origin = format!("127.0.0.1:{ORIGIN_PORT}");
    let mut r = spawn_pinned(
        sb,
        "floor",
        &exe.display().to_string(),
        &["--floor-serve", &listen, &origin],
    )?;
    r.kind = Some(Kind::Floor);
    if let Err(e) = wait_port(Kind::Floor.port(Listener::Http), Duration::from_secs(10)) {
        r.check_alive()?;
        return Err(e);
    }
    Ok(r)
}

/// Our proxy for the training run of profile-guided optimisation: the
/// same listeners, with the access line on `http` and HTTP/2 offered on
/// `tls_ecdsa`, so that these paths are trained too.
pub fn start_training(sb: &Sandbox, files: &Files) -> Result<Running> {
    let mut r = start_proxy(sb, &proxy_config(sb, files, true));
    r.kind = Some(Kind::Proxy);
    wait_listeners(Kind::Proxy, r)
}

fn start_proxy(sb: &Sandbox, config: &str) -> Running {
    let path = sb.write_file("proxy.toml", config);
    // One thread for everything, as the peers: no listener has its own
    // runtime, and the config's `nbthread = 1` runs them all on the main
    // thread.
    let mut p = Proxy::start_wrapped(sb, &["taskset", "-c", &SERVER_CPU.to_string()], &path, &[]);
    p.wait_active(sb, Duration::from_secs(15));
    Running {
        kind: None,
        pid: p.pid,
        log: p.log_path.clone(),
        proxy: Some(p),
    }
}

/// Waits until all of `r`'s listeners accept.
fn wait_listeners(kind: Kind, mut r: Running) -> Result<Running> {
    for l in [
        Listener::Http,
        Listener::Gzip,
        Listener::TlsEcdsa,
        Listener::TlsRsa,
        Listener::Tcp,
    ] {
        if let Err(e) = wait_port(kind.port(l), Duration::from_secs(10)) {
            r.check_alive()?;
            return Err(e);
        }
    }
    Ok(r)
}

/// The main context of an nginx config: one worker, root (the sandbox
/// folder is private), foreground, [`maxconn`] clients (nginx counts a
/// client's upstream connection too: twice as many connections), else as
/// many connections as the open-file limit allows.
fn nginx_main(dir: &Path, name: &str) -> String {
    let (nofile, connections) = match maxconn() {
        Some(n) => (2 * n as u64 + 100, 2 * n as u64),
        None => (open_files(), open_files().saturating_sub(500)),
    };
    format!(
        "user root;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
events {{ worker_connections {connections}; }}
",
        dir = dir.display(),
    )
}

fn nginx_temp_paths(dir: &Path, name: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {}/{name}-tmp-{t};\n", dir.display()))
        .collect()
}

/// The `load_module` line of nginx's stream module when this nginx has it
/// as a dynamic module (Debian: libnginx-mod-stream), else nothing.
fn nginx_stream_module() -> String {
    let Ok(out) = Command::new("nginx").arg("-V").output() else {
        return String::new();
    };
    let info = String::from_utf8_lossy(&out.stderr).into_owned();
    if !info.contains("--with-stream=dynamic") {
        return String::new();
    }
    let dir = info
        .split_whitespace()
        .find_map(|a| a.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    format!("load_module {dir}/ngx_stream_module.so;\n")
}

/// nginx as a reverse proxy: upstream keep-alive pool, gzip level 1 on its
/// gzip listener, TLS without tickets or session cache; its stream module
/// for the tcp listener (it has no splice).
fn nginx_config(f: &Files) -> String {
    let server = |l: Listener, extra: &str| {
        format!(
            "    server {{
        listen 127.0.0.1:{port}{ssl} backlog=4096;
{extra}        location / {{ proxy_pass http://origin; }}
    }}
",
            port = Kind::Nginx.port(l),
            ssl = if matches!(l, Listener::TlsEcdsa | Listener::TlsRsa) {
                " ssl"
            } else {
                ""
            },
        )
    };
    let tls = |cert: &Path| {
        format!(
            "        ssl_certificate {c};
        ssl_certificate_key {c};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
",
            c = cert.display()
        )
    };
    nginx_stream_module()
        + &nginx_main(f.dir, "nginx")
        + &format!(
            "stream {{
    server {{
        listen 127.0.0.1:{tcp} backlog=4096;
        proxy_pass 127.0.0.1:{ORIGIN_PORT};
    }}
}}
",
            tcp = Kind::Nginx.port(Listener::Tcp),
        )
        + &format!(
            "http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
{temp}
    upstream origin {{
        server 127.0.0.1:{ORIGIN_PORT};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    # The client's address upstream, as our proxy sends it.
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
{http}{gzip}{ecdsa}{rsa}}}
",
            temp = nginx_temp_paths(f.dir, "nginx"),
            http = server(Listener::Http, ""),
            gzip = server(
                Listener::Gzip,
                "        gzip on;
        gzip_comp_level 1;
        gzip_types text/html;
        gzip_min_length 256;
        gzip_proxied any;
"
            ),
            ecdsa = server(Listener::TlsEcdsa, &tls(f.ecdsa)),
            rsa = server(Listener::TlsRsa, &tls(f.rsa)),
        )
}

/// HAProxy: one thread, `http-reuse safe` (its default) to the origin,
/// compression on the gzip frontend, TLS without tickets or session cache;
/// `mode tcp` with `option splice-auto` (its splice(2)) for the tcp
/// listener (it warns that `option forwardfor` does nothing there).
/// `maxconn` as ours ([`maxconn`], else derived from the open-file limit).
fn haproxy_config(f: &Files) -> String {
    let k = Kind::Haproxy;
    let maxconn = maxconn().map_or(String::new(), |n| format!("\n    maxconn {n}"));
    format!(
        "global
    nbthread 1{maxconn}
    tune.ssl.cachesize 0
    tune.comp.maxlevel 1
    ssl-default-bind-options no-tls-tickets ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    timeout http-request 30s
    option http-keep-alive
    http-reuse safe
    # The client's address upstream, as our proxy sends it.
    option forwardfor

frontend http
    bind 127.0.0.1:{http}
    default_backend origin

frontend gzip
    bind 127.0.0.1:{gzip}
    filter compression
    compression algo gzip
    compression type text/html
    default_backend origin

frontend tls_ecdsa
    bind 127.0.0.1:{ecdsa} ssl crt {ecdsa_pem} alpn http/1.1
    default_backend origin

frontend tls_rsa
    bind 127.0.0.1:{rsa} ssl crt {rsa_pem} alpn http/1.1
    default_backend origin

frontend tcp
    mode tcp
    option splice-auto
    bind 127.0.0.1:{tcp}
    default_backend origin_tcp

backend origin
    server origin 127.0.0.1:{ORIGIN_PORT}

backend origin_tcp
    mode tcp
    option splice-auto
    server origin 127.0.0.1:{ORIGIN_PORT}
",
        http = k.port(Listener::Http),
        gzip = k.port(Listener::Gzip),
        ecdsa = k.port(Listener::TlsEcdsa),
        rsa = k.port(Listener::TlsRsa),
        tcp = k.port(Listener::Tcp),
        ecdsa_pem = f.ecdsa.display(),
        rsa_pem = f.rsa.display(),
    )
}

/// Our proxy: the same four listeners on the default runtime, TLS without
/// tickets or session cache, no access lines (the peers log none either).
/// `training`: the access line on `http`, and `h2` offered first on
/// `tls_ecdsa` (the bench's clients offer only `http/1.1`).
fn proxy_config(sb: &Sandbox, f: &Files, training: bool) -> String {
    let k = Kind::Proxy;
    let path = |p: &Path| toml_str(&p.display().to_string());
    format!(
        r#"[global]
name = {name}
bpffs = {bpffs}
steering = "ebpf"
hard_stop_after = "5s"
nbthread = 1{maxconn}

[[listener]]
name = "http"
access_log = {access_log}
bind = ["127.0.0.1:{http}"]
mode = "http"
backend = "origin"

[[listener]]
name = "gzip"
access_log = false
bind = ["127.0.0.1:{gzip}"]
mode = "http"
backend = "origin"
[listener.compression]
level = 1
min_size = 256

[[listener]]
name = "tls_ecdsa"
access_log = false
bind = ["127.0.0.1:{ecdsa}"]
mode = "http"
backend = "origin"
[listener.tls]
certs = [{ecdsa_pem}]
alpn = [{ecdsa_alpn}"http/1.1"]
session_tickets = false
session_cache = 0

[[listener]]
name = "tls_rsa"
access_log = false
bind = ["127.0.0.1:{rsa}"]
mode = "http"
backend = "origin"
[listener.tls]
certs = [{rsa_pem}]
alpn = ["http/1.1"]
session_tickets = false
session_cache = 0

[[listener]]
name = "tcp"
access_log = false
bind = ["127.0.0.1:{tcp}"]
mode = "tcp"
backend = "origin"
# The tcp rows' clients, with room to spare; its pipes then come out of
# its own descriptors instead of a third of every connection's.
maxconn = 1000

[[backend]]
name = "origin"
servers = ["127.0.0.1:{ORIGIN_PORT}"]
"#,
        name = toml_str(&sb.name),
        bpffs = path(&sb.bpffs),
        access_log = training,
        ecdsa_alpn = if training { "\"h2\", " } else { "" },
        http = k.port(Listener::Http),
        gzip = k.port(Listener::Gzip),
        ecdsa = k.port(Listener::TlsEcdsa),
        rsa = k.port(Listener::TlsRsa),
        tcp = k.port(Listener::Tcp),
        ecdsa_pem = path(f.ecdsa),
        rsa_pem = path(f.rsa),
        maxconn = maxconn().map_or(String::new(), |n| format!("\nmaxconn = {n}")),
    )
}

/// Makes `<dir>/<name>.pem` (certificate then key, for all three) with
/// `openssl req`: `key` is an `-newkey` argument such as `rsa:2048`; the DER
/// of the certificate is returned for the client to trust.
pub fn make_cert(dir: &Path, name: &str, newkey: &[&str]) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let key = dir.join(format!("{name}.key"));
    let crt = dir.join(format!("{name}.crt"));
    let out = proxy_harness::process::run_bounded(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=localhost",
            ])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .args(newkey)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
        Duration::from_secs(30),
    );
    if !out.status.success() {
        bail!(
            "openssl req for {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let der = proxy_harness::process::run_bounded(
        Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&crt),
        Duration::from_secs(10),
    );
    if !der.status.success() || der.stdout.is_empty() {
        bail!("openssl x509 -outform DER for {name} failed");
    }
    let bundle = dir.join(format!("{name}.pem"));
    fs::write(
        &bundle,
        fs::read_to_string(&crt)? + &fs::read_to_string(&key)?,
    )?;
    Ok((bundle, der.stdout))
}
