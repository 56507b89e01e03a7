//! PROXY protocol v1 on accept_proxy listeners, with the sender most users
//! put in front of a proxy: nginx's stream module with `proxy_protocol on`,
//! which sends the v1 text line.
//!
//! - nginx -> our listener (`accept_proxy = true`): the backend sees the
//!   client nginx saw (bound to 127.0.0.2, so it differs from nginx's own
//!   127.0.0.1), with its port, in tcp mode (our PROXY v2 header to a
//!   backend that decodes it) and in http mode (X-Forwarded-For); a
//!   hand-written `UNKNOWN` line keeps the socket's address, a `TCP6` line
//!   carries its IPv6 client through.
//! - Refusals, counted in `proxy_header_errors` and never served: a v1 line
//!   to an `accept_proxy = "v2"` listener, a v2 header to a `"v1"` one, and
//!   a plain HTTP request without any header to an `accept_proxy = true`
//!   one. Valid headers on the same listeners are served.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ppp::v2;
use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    config::{ConfigToml, STATS_ADDR, Table},
    http::read_until_closed,
    http_backend::HttpBackend,
    http_get::http_get_ok,
    report,
    signals::{Signal, signal},
    status::StatsJson,
    wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Runtime,
};

/// Our listeners (inside the sandbox's own network namespace).
const TCP_ADDR: &str = "127.0.0.1:8080";
const HTTP_ADDR: &str = "127.0.0.1:8081";
const V1_ONLY_ADDR: &str = "127.0.0.1:8082";
/// The backend that decodes our PROXY v2 header (tcp mode).
const DECODER_ADDR: &str = "127.0.0.1:9001";
/// Where the clients connect from: not nginx's address.
const CLIENT_IP: &str = "127.0.0.2";
/// Connections through nginx per mode.
const ROUNDS: usize = 20;
/// Every exchange, every wait.
const BOUND: Duration = Duration::from_secs(10);
/// A refused header is refused at once, not at the header deadline (3 s).
const QUICK: Duration = Duration::from_secs(1);

/// A TCP server on `addr` that reads the PROXY v2 header our proxy sends
/// (`send_proxy_v2`), answers one line `<source> <destination>\n` (or
/// `local local`), then echoes the rest. Counts its connections.
fn start_decoder(rt: &Runtime, addr: &str) -> Arc<AtomicU64> {
    let listener = rt
        .block_on(TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("binding the decoding backend on {addr}: {e}"));
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let work = async {
                    let line = read_v2_addresses(&mut stream).await?;
                    stream.write_all(line.as_bytes()).await?;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        stream.write_all(&buf[..n]).await?;
                    }
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(BOUND, work).await;
            });
        }
    });
    accepted
}

/// Reads one v2 header (ppp) and renders its addresses as one line.
async fn read_v2_addresses(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut bytes = vec![0u8; 16];
    stream.read_exact(&mut bytes).await?;
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    bytes.resize(16 + len, 0);
    stream.read_exact(&mut bytes[16..]).await?;
    let header = v2::Header::try_from(&bytes[..]).map_err(std::io::Error::other)?;
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => format!(
            "{} {}\n",
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port))
        ),
        v2::Addresses::IPv6(a) => format!(
            "{} {}\n",
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port))
        ),
        _ => "local local\n".to_string(),
    })
}

/// A TCP echo on `addr` that counts its connections.
fn start_echo(rt: &Runtime, addr: &str) -> Arc<AtomicU64> {
    let listener = rt
        .block_on(TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("binding the echo backend on {addr}: {e}"));
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::time::timeout(BOUND, tokio::io::copy(&mut r, &mut w)).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    accepted
}

/// A TCP connection to `to` from [`CLIENT_IP`] (an ephemeral port).
async fn connect_from_client_ip(to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(format!("{CLIENT_IP}:0").parse().unwrap())
        .expect("binding the client to 127.0.0.2");
    tokio::time::timeout(BOUND, socket.connect(to))
        .await
        .unwrap_or_else(|_| panic!("connecting to {to} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
}

/// Sends `bytes`, half-closes, and reads to the end (bounded).
async fn send_and_read(mut s: TcpStream, bytes: &[u8]) -> Vec<u8> {
    s.write_all(bytes).await.expect("writing");
    s.shutdown().await.expect("half-closing");
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut got))
        .await
        .expect("reading the answer timed out")
        .expect("reading the answer");
    got
}

/// A `GET` that the HTTP backend answers with `x-seen-xff`.
const GET: &[u8] = b"GET /r?len=100 HTTP/1.1\r\nHost: v1.test\r\nConnection: close\r\n\r\n";

/// The status code and the `x-seen-xff` header of a raw HTTP/1.1 response.
fn status_and_xff(response: &[u8]) -> (Option<u16>, Option<String>) {
    let text = String::from_utf8_lossy(response);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse().ok());
    let xff = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("x-seen-xff"))
        .map(|(_, v)| v.trim().to_string());
    (status, xff)
}

fn stats_json() -> StatsJson {
    let (reply, _) = http_get_ok(STATS_ADDR, "/stats.json", Duration::from_secs(5));
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("/stats.json does not parse ({e}):\n{}", reply.body))
}

/// One nginx process (`master_process off`: the PID we started is the one
/// that serves, no worker to chase) with a config of its own.
struct Nginx {
    child: Arc<Mutex<Child>>,
    pid: u32,
    error_log: PathBuf,
}

impl Nginx {
    /// Starts nginx with one stream server per `(listen, upstream)`, each
    /// with `proxy_protocol on` (and `proxy_half_close on`: the clients
    /// half-close after their request and read the answer to its end);
    /// returns once the pid file says it is listening.
    fn start(sb: &Sandbox, servers: &[(SocketAddr, &str)]) -> Nginx {
        let dir = sb.dir.join("nginx");
        fs::create_dir_all(&dir).expect("creating the nginx folder");
        let pid_file = dir.join("nginx.pid");
        let error_log = dir.join("error.log");
        let mut conf = String::new();
        if let Some(module) = stream_module() {
            conf.push_str(&format!("load_module {};\n", module.display()));
        }
        conf.push_str(&format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {};\nerror_log {} info;\nevents {{ worker_connections 256; }}\nstream {{\n",
            pid_file.display(),
            error_log.display()
        ));
        for (listen, upstream) in servers {
            conf.push_str(&format!(
                "    server {{\n        listen {listen};\n        proxy_pass {upstream};\n        \
                 proxy_protocol on;\n        proxy_half_close on;\n        \
                 proxy_connect_timeout 5s;\n        proxy_timeout 10s;\n    }}\n"
            ));
        }
        conf.push_str("}\n");
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, &conf).expect("writing nginx.conf");
        let out = fs::File::create(dir.join("stdout+stderr.log")).expect("nginx output file");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("starting nginx (apt-get install nginx libnginx-mod-stream)");
        let pid = child.id();
        let child = sb.adopt(child);
        let nginx = Nginx {
            child,
            pid,
            error_log,
        };
        // nginx writes its pid file after binding its listeners.
        wait_until(
            BOUND,
            || {
                assert!(
                    nginx.child.lock().unwrap().try_wait().unwrap().is_none(),
                    "nginx exited at start; config:\n{conf}\n{}",
                    nginx.log()
                );
                fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid.to_string())
            },
            || format!("nginx did not write its pid file; log:\n{}", nginx.log()),
        );
        nginx
    }

    fn log(&self) -> String {
        let mut log = fs::read_to_string(&self.error_log).unwrap_or_default();
        let dir = self.error_log.parent().unwrap();
        log.push_str(&fs::read_to_string(dir.join("stdout+stderr.log")).unwrap_or_default());
        log
    }

    /// SIGTERM (nginx's fast shutdown) by PID, then reaped, within
    /// [`BOUND`]. (The sandbox kills it on a panic.)
    fn stop(self) {
        signal(self.pid, Signal::Term).expect("signalling nginx");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.lock().unwrap().try_wait().unwrap() {
                assert!(status.success(), "nginx exited with {status}");
                return;
            }
            assert!(start.elapsed() < BOUND, "nginx did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The stream module to load, when this nginx has it as a dynamic module
/// (Debian: `libnginx-mod-stream`); None when it is built in.
fn stream_module() -> Option<PathBuf> {
    let out = Command::new("nginx")
        .arg("-V")
        .output()
        .expect("running nginx -V (apt-get install nginx libnginx-mod-stream)");
    // nginx -V prints to stderr.
    let info = String::from_utf8_lossy(&out.stderr);
    let arg = |name: &str| {
        info.split_whitespace()
            .find_map(|a| a.strip_prefix(name).map(str::to_string))
    };
    if info.split_whitespace().any(|a| a == "--with-stream") {
        return None;
    }
    assert!(
        info.contains("--with-stream=dynamic"),
        "this nginx has no stream module: {info}"
    );
    let dir = arg("--modules-path=").unwrap_or_else(|| "/usr/lib/nginx/modules".to_string());
    let module = Path::new(&dir).join("ngx_stream_module.so");
    assert!(
        module.is_file(),
        "{} is missing: apt-get install libnginx-mod-stream",
        module.display()
    );
    Some(module)
}

/// A port nobody listens on in this namespace (bound and released: the
/// namespace is ours alone, so nothing takes it in between).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

#[test]
fn nginx_proxy_protocol_v1_client_reaches_the_backend() {
    let (sb, rt) = Sandbox::with_runtime("st-ppv1");
    let decoded = start_decoder(&rt, DECODER_ADDR);
    let app = HttpBackend::start(&rt);
    let config = ConfigToml::stages(&sb, "10s")
        .table(Table::tcp("v1_tcp", TCP_ADDR, "decoder").key("accept_proxy", true))
        .table(Table::http("v1_http", HTTP_ADDR, "app").key("accept_proxy", true))
        .table(Table::backend("decoder", &[DECODER_ADDR]).key("send_proxy_v2", true))
        .table(Table::backend("app", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file(
        "v1.toml",
        &format!("{config}\n[stats]\nbind = \"{STATS_ADDR}\"\n"),
    );
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, BOUND);

    let nginx_tcp = free_port();
    let nginx_http = free_port();
    let nginx = Nginx::start(&sb, &[(nginx_tcp, TCP_ADDR), (nginx_http, HTTP_ADDR)]);

    // tcp mode: our v2 header to the backend carries nginx's client.
    let mut failures = Vec::new();
    let mut tcp_ok = 0;
    rt.block_on(async {
        for i in 0..ROUNDS {
            let s = connect_from_client_ip(nginx_tcp).await;
            let client = s.local_addr().unwrap();
            let payload = format!("round {i} through nginx");
            let got = send_and_read(s, payload.as_bytes()).await;
            let want = format!("{client} {nginx_tcp}\n{payload}");
            if got == want.as_bytes() {
                tcp_ok += 1;
            } else {
                failures.push(format!(
                    "tcp round {i}: expected {want:?}, the backend answered {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
    });

    // http mode: X-Forwarded-For is nginx's client.
    let mut http_ok = 0;
    rt.block_on(async {
        for i in 0..ROUNDS {
            let s = connect_from_client_ip(nginx_http).await;
            let got = send_and_read(s, GET).await;
            match status_and_xff(&got) {
                (Some(200), Some(xff)) if xff == CLIENT_IP => http_ok += 1,
                other => failures.push(format!(
                    "http round {i}: expected 200 with x-seen-xff {CLIENT_IP}, got {other:?}: {:?}",
                    String::from_utf8_lossy(&got[..got.len().min(300)])
                )),
            }
        }
    });

    // Hand-written lines nginx does not send: UNKNOWN keeps the socket's
    // own addresses (like a v2 LOCAL header), TCP6 carries an IPv6 client.
    let tcp_addr: SocketAddr = TCP_ADDR.parse().unwrap();
    let (unknown, unknown_client, tcp6) = rt.block_on(async {
        let s = connect_from_client_ip(tcp_addr).await;
        let client = s.local_addr().unwrap();
        let unknown = send_and_read(s, b"PROXY UNKNOWN\r\nunknown payload").await;
        let s = connect_from_client_ip(tcp_addr).await;
        let tcp6 = send_and_read(
            s,
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\ntcp6 payload",
        )
        .await;
        (unknown, client, tcp6)
    });
    let want_unknown = format!("{unknown_client} {TCP_ADDR}\nunknown payload");
    if unknown != want_unknown.as_bytes() {
        failures.push(format!(
            "PROXY UNKNOWN: expected {want_unknown:?}, got {:?}",
            String::from_utf8_lossy(&unknown)
        ));
    }
    let want_tcp6 = "[2001:db8::7]:40000 [2001:db8::1]:443\ntcp6 payload";
    if tcp6 != want_tcp6.as_bytes() {
        failures.push(format!(
            "PROXY TCP6: expected {want_tcp6:?}, got {:?}",
            String::from_utf8_lossy(&tcp6)
        ));
    }

    // Counters are updated when a connection ends: wait for all of them.
    let mut json = stats_json();
    let counted = Instant::now();
    while (json.listener("v1_tcp").total < ROUNDS as u64 + 2
        || json.listener("v1_http").http_requests < ROUNDS as u64)
        && counted.elapsed() < BOUND
    {
        std::thread::sleep(Duration::from_millis(50));
        json = stats_json();
    }
    let (tcp, http) = (json.listener("v1_tcp"), json.listener("v1_http"));
    let nginx_log = nginx.log();
    nginx.stop();
    report(
        &sb,
        &format!(
            "stages_proxy_v1 nginx: tcp {tcp_ok}/{ROUNDS} and http {http_ok}/{ROUNDS} exchanges saw client {CLIENT_IP}; \
             decoder accepted {}; app requests {}; proxy_header_errors tcp {} http {}",
            decoded.load(Ordering::Relaxed),
            app.requests(),
            tcp.proxy_header_errors,
            http.proxy_header_errors
        ),
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nproxy log:\n{}\nnginx log:\n{nginx_log}",
        failures.len(),
        failures.join("\n"),
        proxy.log()
    );
    assert_eq!(
        (tcp.proxy_header_errors, http.proxy_header_errors),
        (0, 0),
        "no PROXY header may have been refused: {tcp:?} {http:?}"
    );
    assert_eq!(tcp.total, ROUNDS as u64 + 2, "{tcp:?}");
    assert_eq!(http.http_requests, ROUNDS as u64, "{http:?}");
    assert_eq!(decoded.load(Ordering::Relaxed), ROUNDS as u64 + 2);
    // The access log names the client from the header, not nginx.
    let log = proxy.log();
    let from_client = log
        .lines()
        // tcp mode: a line per connection (outcome ok); http mode: a line
        // per request (termination --).
        .filter(|l| {
            l.contains("outcome=\"ok\"") || l.contains("outcome=ok") || l.contains("termination=--")
        })
        .filter(|l| l.contains(&format!("client={CLIENT_IP}:")))
        .count();
    assert!(
        from_client >= 2 * ROUNDS,
        "expected at least {} access lines with client={CLIENT_IP}:..., found {from_client}; log:\n{log}",
        2 * ROUNDS
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
}

/// A v2 header for client `src` to `dst`.
fn v2_header(src: &str, dst: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .expect("ppp builds a v2 header")
}

/// Connects to `addr`, sends `bytes`, and reads until the proxy closes:
/// what came back and after how long (the stream stays open on our side,
/// so only the proxy can end it).
async fn refused(addr: &str, bytes: &[u8]) -> (bool, Duration, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let start = Instant::now();
    s.write_all(bytes).await.expect("writing");
    let (how, _, got) = read_until_closed(&mut s, BOUND).await;
    (how.is_closed(), start.elapsed(), got)
}

#[test]
fn wrong_version_and_missing_header_are_refused_and_counted() {
    let (sb, rt) = Sandbox::with_runtime("st-ppv1-refuse");
    let echoed = start_echo(&rt, DECODER_ADDR);
    let app = HttpBackend::start(&rt);
    let config = ConfigToml::stages(&sb, "10s")
        .table(Table::tcp("strict_v2", TCP_ADDR, "echo").str("accept_proxy", "v2"))
        .table(Table::http("any_http", HTTP_ADDR, "app").key("accept_proxy", true))
        .table(Table::tcp("only_v1", V1_ONLY_ADDR, "echo").str("accept_proxy", "v1"))
        .table(Table::backend("echo", &[DECODER_ADDR]))
        .table(Table::backend("app", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file(
        "refuse.toml",
        &format!("{config}\n[stats]\nbind = \"{STATS_ADDR}\"\n"),
    );
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, BOUND);

    let v1_line = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\r\n";
    let mut failures = Vec::new();
    rt.block_on(async {
        let mut check_refused = |what: &str, (closed, after, got): (bool, Duration, Vec<u8>)| {
            eprintln!(
                "  {what}: closed {closed} after {after:.2?}, {} bytes back",
                got.len()
            );
            if !closed || after > QUICK || !got.is_empty() {
                failures.push(format!(
                    "{what}: expected closed within {QUICK:?} with nothing back; closed {closed} \
                     after {after:?}, got {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
        };
        let mut v1_hello = v1_line.to_vec();
        v1_hello.extend_from_slice(b"hello");
        check_refused(
            "v1 line to accept_proxy = \"v2\"",
            refused(TCP_ADDR, &v1_hello).await,
        );
        let mut plain = GET.to_vec();
        plain.extend_from_slice(GET);
        check_refused(
            "plain HTTP request without a header to accept_proxy = true",
            refused(HTTP_ADDR, &plain).await,
        );
        let mut v2_hello = v2_header("192.0.2.8:6666", V1_ONLY_ADDR);
        v2_hello.extend_from_slice(b"hello");
        check_refused(
            "v2 header to accept_proxy = \"v1\"",
            refused(V1_ONLY_ADDR, &v2_hello).await,
        );
    });
    // Nothing of them reached a backend.
    let echo_before = echoed.load(Ordering::Relaxed);
    let app_before = app.requests();

    // The same listeners serve the headers they take.
    let (strict, only_v1, http) = rt.block_on(async {
        let mut v2_hello = v2_header("192.0.2.9:7777", TCP_ADDR);
        v2_hello.extend_from_slice(b"v2 hello");
        let strict = send_and_read(TcpStream::connect(TCP_ADDR).await.unwrap(), &v2_hello).await;
        let mut v1_hello = b"PROXY TCP4 192.0.2.10 127.0.0.1 5555 8082\r\n".to_vec();
        v1_hello.extend_from_slice(b"v1 hello");
        let only_v1 =
            send_and_read(TcpStream::connect(V1_ONLY_ADDR).await.unwrap(), &v1_hello).await;
        let mut v1_get = b"PROXY TCP4 192.0.2.11 127.0.0.1 5555 8081\r\n".to_vec();
        v1_get.extend_from_slice(GET);
        let http = send_and_read(TcpStream::connect(HTTP_ADDR).await.unwrap(), &v1_get).await;
        (strict, only_v1, http)
    });
    if strict != b"v2 hello" {
        failures.push(format!(
            "v2 to strict_v2: echo {:?}",
            String::from_utf8_lossy(&strict)
        ));
    }
    if only_v1 != b"v1 hello" {
        failures.push(format!(
            "v1 to only_v1: echo {:?}",
            String::from_utf8_lossy(&only_v1)
        ));
    }
    let http_seen = status_and_xff(&http);
    if http_seen != (Some(200), Some("192.0.2.11".to_string())) {
        failures.push(format!(
            "v1 + GET to any_http: expected 200 with x-seen-xff 192.0.2.11, got {http_seen:?}"
        ));
    }

    let counted = |json: &StatsJson| {
        ["strict_v2", "any_http", "only_v1"].map(|l| json.listener(l).proxy_header_errors)
    };
    let mut json = stats_json();
    let start = Instant::now();
    while counted(&json) != [1, 1, 1] && start.elapsed() < BOUND {
        std::thread::sleep(Duration::from_millis(50));
        json = stats_json();
    }
    let errors = counted(&json);
    let log = proxy.log();
    report(
        &sb,
        &format!(
            "stages_proxy_v1 refusals: proxy_header_errors strict_v2/any_http/only_v1 = {errors:?}; \
             backend connections before the valid ones: echo {echo_before}, http requests {app_before}"
        ),
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nproxy log:\n{log}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        errors,
        [1, 1, 1],
        "one refused header per listener in proxy_header_errors"
    );
    assert_eq!(
        (echo_before, app_before),
        (0, 0),
        "a refused connection reached a backend"
    );
    for (what, needle) in [
        (
            "v1 to v2-only",
            "expected a PROXY protocol v2 header, got a PROXY protocol v1 text header",
        ),
        (
            "no header",
            "expected a PROXY protocol v1 or v2 header, got text \"GET /r?len=1\"",
        ),
        (
            "v2 to v1-only",
            "expected a PROXY protocol v1 header, got a PROXY protocol v2 header",
        ),
    ] {
        assert!(
            log.contains(needle),
            "{what}: the log should say {needle:?}; log:\n{log}"
        );
    }
    wait_until(
        Duration::from_secs(2),
        || {
            sb.try_status()
                .is_ok_and(|st| st.is_serving(proxy.generation()))
        },
        || "the generation should still be serving".into(),
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
}
