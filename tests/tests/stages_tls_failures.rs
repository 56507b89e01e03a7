//! The tls stage with certificates chosen by SNI: an unknown or absent SNI
//! gets the default (first) certificate; a client that is not speaking TLS,
//! that never sends anything, or that stops in the middle of its ClientHello
//! is closed (the last two at handshake_timeout); after each, a good TLS
//! client is served. A client naming an IP address as SNI is served the
//! default certificate without a log line.

use std::{
    process::Command,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant},
};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    bodies::{Rng, first_difference},
    certs::{TestCert, describe_cert, make_cert},
    config::{ConfigToml, Table},
    http::{Closed, read_until_closed},
    process::run_bounded,
    report,
    tls::{peer_leaf, tls_client_config, tls_connect},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

const TLS_ADDR: &str = "127.0.0.1:8443";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP echo on [`BACKEND_ADDR`], counting its connections.
fn start_echo(rt: &Runtime) -> Arc<AtomicU64> {
    let listener = rt
        .block_on(TcpListener::bind(BACKEND_ADDR))
        .expect("binding the echo backend");
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            acc.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), tokio::io::copy(&mut r, &mut w))
                        .await;
                let _ = w.shutdown().await;
            });
        }
    });
    accepted
}

/// A TLS client with `sni` (None: no SNI extension) that checks it was
/// shown `want` and that its payload comes back byte-exact.
async fn good_client(sni: Option<&str>, want: &TestCert, seed: u64) -> Result<(), String> {
    let config = tls_client_config(&["http/1.1"], sni.is_some());
    let work = async {
        let mut s = tls_connect(TLS_ADDR, sni.unwrap_or("a.test"), config)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let leaf = peer_leaf(&s);
        if leaf != want.der {
            return Err(format!(
                "expected the {} certificate, was shown: {}",
                want.cn,
                describe_cert(&leaf).trim()
            ));
        }
        let payload = Rng::new(seed).bytes(50_000);
        s.write_all(&payload)
            .await
            .map_err(|e| format!("write: {e}"))?;
        // close_notify and FIN: a clean end the proxy passes on.
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .map_err(|e| format!("read: {e} after {} bytes", got.len()))?;
        if got != payload {
            return Err(format!(
                "echo differs: {}",
                first_difference(&got, &payload)
            ));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// The first flight of a real rustls client: its ClientHello record(s).
fn client_hello() -> Vec<u8> {
    let config = tls_client_config(&["http/1.1"], true);
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from("a.test").expect("a DNS name"))
            .expect("a client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec");
    }
    assert!(
        out.len() > 100 && out[0] == 0x16,
        "expected a TLS handshake record, got {} bytes",
        out.len()
    );
    out
}

struct Broken {
    what: &'static str,
    bytes: Vec<u8>,
    min: Duration,
    max: Duration,
}

#[test]
fn tls_sni_defaults_and_broken_handshakes() {
    let (sb, rt) = Sandbox::with_runtime("st-tls");
    let accepted = start_echo(&rt);
    let a = make_cert(&sb.dir, "a.test", &["a.test", "www.a.test"]);
    let b = make_cert(&sb.dir, "b.test", &["b.test"]);
    let tls = Table::tls_http1(&[&a.bundle, &b.bundle]).str("handshake_timeout", "1s");
    let config = ConfigToml::stages(&sb, "10s")
        .table(Table::tcp("tls", TLS_ADDR, "echo").with(tls))
        .table(Table::backend("echo", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("tls.toml", &config);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    // Certificate selection.
    let selection: [(&str, Option<&str>, &TestCert); 5] = [
        ("SNI a.test", Some("a.test"), &a),
        ("SNI b.test", Some("b.test"), &b),
        ("SNI www.a.test (second SAN of a)", Some("www.a.test"), &a),
        (
            "wrong SNI unknown.test -> default",
            Some("unknown.test"),
            &a,
        ),
        ("no SNI -> default", None, &a),
    ];
    let mut good = 0u64;
    rt.block_on(async {
        for (i, (what, sni, want)) in selection.iter().enumerate() {
            good_client(*sni, want, i as u64)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            good += 1;
        }
    });
    // A client connecting by address that names the address as SNI (as wrk
    // and OpenSSL's s_client do): served the default certificate, and no
    // log line about it (rustls warns once per such connection; the default
    // log filter keeps rustls at error).
    let by_address = run_bounded(
        Command::new("openssl").args([
            "s_client",
            "-connect",
            TLS_ADDR,
            "-servername",
            "127.0.0.1",
            "-brief",
        ]),
        Duration::from_secs(10),
    );
    let said = String::from_utf8_lossy(&by_address.stderr);
    assert!(
        by_address.status.success() && said.contains("CONNECTION ESTABLISHED"),
        "openssl s_client with an IP address as SNI: {}: {said}",
        by_address.status
    );
    good += 1;
    // What the default looks like to a client: subject and SAN of a.test.
    let shown = describe_cert(&a.der);
    assert!(
        shown.contains("a.test") && shown.contains("DNS:a.test") && !shown.contains("b.test"),
        "the default certificate should be a.test's: {shown}"
    );

    let hello = client_hello();
    let broken = [
        Broken {
            what: "non-TLS bytes (an HTTP request)",
            bytes: b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(),
            min: Duration::ZERO,
            // Refused on sight, well before the handshake timeout.
            max: Duration::from_millis(500),
        },
        Broken {
            what: "connects and sends nothing",
            bytes: Vec::new(),
            min: HANDSHAKE_TIMEOUT - Duration::from_millis(100),
            max: HANDSHAKE_TIMEOUT + Duration::from_millis(1500),
        },
        Broken {
            what: "half a ClientHello",
            bytes: hello[..hello.len() / 2].to_vec(),
            min: HANDSHAKE_TIMEOUT - Duration::from_millis(100),
            max: HANDSHAKE_TIMEOUT + Duration::from_millis(1500),
        },
        Broken {
            what: "a TLS record header only",
            bytes: hello[..5].to_vec(),
            min: HANDSHAKE_TIMEOUT - Duration::from_millis(100),
            max: HANDSHAKE_TIMEOUT + Duration::from_millis(1500),
        },
    ];
    let mut failures = Vec::new();
    rt.block_on(async {
        for (i, br) in broken.iter().enumerate() {
            let mut s = TcpStream::connect(TLS_ADDR).await.expect("connect");
            let start = Instant::now();
            if !br.bytes.is_empty() {
                s.write_all(&br.bytes).await.expect("write");
            }
            let (how, _, got) = read_until_closed(&mut s, br.max + Duration::from_secs(1)).await;
            let elapsed = start.elapsed();
            let ok = how.is_closed() && elapsed >= br.min && elapsed <= br.max;
            eprintln!(
                "  {:<35} {how:?} after {elapsed:>10.2?} ({} bytes back; expected closed within {:?}..{:?}) {}",
                br.what,
                got.len(),
                br.min,
                br.max,
                if ok { "ok" } else { "FAILED" }
            );
            if !ok {
                failures.push(format!(
                    "{}: expected the connection closed within {:?}..{:?}, got {how:?} after {elapsed:?}",
                    br.what, br.min, br.max
                ));
            }
            if how == Closed::StillOpen {
                drop(s);
            }
            match good_client(Some("b.test"), &b, 100 + i as u64).await {
                Ok(()) => good += 1,
                Err(e) => failures.push(format!("good client after {}: {e}", br.what)),
            }
        }
    });

    let tls_failures = || {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("connection failed: downstream: TLS"))
            .count()
    };
    let timeouts = || {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("connection failed") && l.contains("not finished within"))
            .count()
    };
    let bounded = Instant::now();
    while tls_failures() < broken.len() && bounded.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    report(
        &sb,
        &format!(
            "stages_tls_failures: {good} good TLS clients ok, {} broken clients, {} TLS failures logged ({} handshake timeouts), backend accepted {}",
            broken.len(),
            tls_failures(),
            timeouts(),
            accepted.load(Ordering::Relaxed)
        ),
    );
    assert!(
        failures.is_empty(),
        "{} problems:\n{}\nproxy log:\n{}",
        failures.len(),
        failures.join("\n"),
        proxy.log()
    );
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        good,
        "only the good TLS clients may reach the backend"
    );
    assert_eq!(
        tls_failures(),
        broken.len(),
        "expected one `connection failed: downstream: TLS` log line per broken client; log:\n{}",
        proxy.log()
    );
    assert_eq!(
        timeouts(),
        broken.len() - 1,
        "the silent and half-hello clients must be closed by the handshake timeout; log:\n{}",
        proxy.log()
    );
    let other_failures: Vec<String> = proxy
        .log()
        .lines()
        .filter(|l| l.contains("connection failed") && !l.contains("downstream: TLS"))
        .map(str::to_string)
        .collect();
    assert!(
        other_failures.is_empty(),
        "the good clients end cleanly (close_notify): no other connection may fail: {other_failures:#?}"
    );
    assert!(
        !proxy.log().contains(" rustls::"),
        "no warning line of rustls's by default (it names what one client sent); log:\n{}",
        proxy.log()
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
    assert!(
        sb.status().is_serving(proxy.generation()),
        "the generation should still be serving"
    );
}
