//! The whole offload chain of one generation: a TLS client talks to the tls
//! stage (tcp mode), which forwards the decrypted bytes over a UNIX socket,
//! with a PROXY v2 header first, to the app stage (accept_proxy), which
//! forwards to the backend. The backend must see the real client (in
//! X-Forwarded-For, or in the PROXY header the app stage sends on with the
//! TLS details as TLVs) and every body byte for byte.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use ppp::v2;
use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    bodies::{binary_body, first_difference},
    certs::{TestCert, describe_cert, make_cert},
    config::{ConfigToml, Table, unix_app},
    http::{echo_request, fetch, header_str, http_connect, http_handshake, request},
    http_backend::HttpBackend,
    process::{run_bounded, run_bounded_ok},
    report,
    tls::{peer_leaf, tls_client_config, tls_client_config_versions, tls_connect},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TLS_ADDR: &str = "127.0.0.1:8443";
const COMP_ADDR: &str = "127.0.0.1:8080";
/// Upload and download sizes, 0 to 1 MiB.
const SIZES: [usize; 6] = [0, 1, 1000, 65_537, 300_001, 1 << 20];
const REQ_TIMEOUT: Duration = Duration::from_secs(10);

/// Two certificates: a.test (the default, first) and b.test.
fn certs(sb: &Sandbox) -> (TestCert, TestCert) {
    (
        make_cert(&sb.dir, "a.test", &["a.test", "www.a.test"]),
        make_cert(&sb.dir, "b.test", &["b.test"]),
    )
}

/// tls (tcp, :8443) -> app1.sock; comp (http, :8080) -> app0.sock; app
/// (`app_mode`, accept_proxy) on both sockets -> 127.0.0.1:9000.
fn chain_config(sb: &Sandbox, a: &TestCert, b: &TestCert, app_mode: &str) -> String {
    // The app stage sends a PROXY header on only when its backend decodes it.
    let servers_proxy = app_mode == "tcp";
    let tls = Table::tls_http1(&[&a.bundle, &b.bundle]).str("handshake_timeout", "10s");
    ConfigToml::stages(sb, "10s")
        .table(Table::http("comp", COMP_ADDR, "app0"))
        .table(Table::tcp("tls", TLS_ADDR, "app1").with(tls))
        .tables(unix_app(sb, app_mode))
        .table(Table::backend("servers", &[BACKEND_ADDR]).key("send_proxy_v2", servers_proxy))
        .render()
}

/// TLS (SNI a.test, ALPN http/1.1) -> tls stage -> UNIX + PROXY v2 -> app
/// (http) -> HTTP backend: X-Forwarded-For is the real client, bodies are
/// byte-exact both ways on one keep-alive connection and on new ones; plain
/// HTTP through comp -> app0 likewise; curl and openssl s_client agree.
#[test]
fn tls_to_unix_app_to_http_backend() {
    let (sb, rt) = Sandbox::with_runtime("st-chain");
    let backend = HttpBackend::start(&rt);
    let (a, b) = certs(&sb);
    let cfg = sb.write_file("chain.toml", &chain_config(&sb, &a, &b, "http"));
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    let tls = tls_client_config(&["http/1.1"], true);
    let (requests, seen_xff) = rt.block_on(async {
        let mut requests = 0u64;
        let mut seen_xff = Vec::new();
        // One keep-alive TLS connection for every size, both directions.
        let stream = tls_connect(TLS_ADDR, "a.test", tls.clone())
            .await
            .expect("TLS handshake with the tls stage (SNI a.test)");
        assert!(
            peer_leaf(&stream) == a.der,
            "SNI a.test: expected the a.test certificate, got: {}",
            describe_cert(&peer_leaf(&stream))
        );
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "ALPN: expected http/1.1 to be negotiated"
        );
        let mut sender = http_handshake(stream).await.expect("HTTP over TLS");
        for (i, &size) in SIZES.iter().enumerate() {
            let body = binary_body(size, 100 + i as u64);
            let (parts, got) = fetch(&mut sender, echo_request("a.test", body.clone()))
                .await
                .unwrap_or_else(|e| panic!("keep-alive TLS POST of {size} bytes: {e}"));
            assert_eq!(parts.status, 200, "POST /echo of {size} bytes: status");
            assert!(
                got == body,
                "POST /echo of {size} bytes over TLS: echoed body differs: {}",
                first_difference(&got, &body)
            );
            seen_xff.push(header_str(&parts, "x-seen-xff"));
            let uri = format!("/r?len={size}&body=bin&seed={i}&ct=application/octet-stream");
            let (parts, got) = fetch(&mut sender, request("GET", &uri, "a.test", &[]))
                .await
                .unwrap_or_else(|e| panic!("keep-alive TLS GET of {size} bytes: {e}"));
            let want = binary_body(size, i as u64);
            assert_eq!(parts.status, 200, "GET {uri}: status");
            assert!(
                got == want,
                "GET {uri} over TLS: body differs: {}",
                first_difference(&got, &want)
            );
            seen_xff.push(header_str(&parts, "x-seen-xff"));
            requests += 2;
        }
        // A client's own X-Forwarded-For is kept, the real client appended.
        let (parts, _) = fetch(
            &mut sender,
            request(
                "GET",
                "/r?len=10",
                "a.test",
                &[("x-forwarded-for", "198.51.100.9")],
            ),
        )
        .await
        .expect("GET with a client X-Forwarded-For");
        requests += 1;
        assert_eq!(
            header_str(&parts, "x-seen-xff").as_deref(),
            Some("198.51.100.9, 127.0.0.1"),
            "the backend must see the client's X-Forwarded-For with the real client appended"
        );

        // New TLS connections, one request each.
        for (i, &size) in SIZES.iter().enumerate() {
            let stream = tls_connect(TLS_ADDR, "a.test", tls.clone())
                .await
                .expect("a new TLS connection");
            let mut sender = http_handshake(stream).await.expect("HTTP over TLS");
            let body = binary_body(size, 200 + i as u64);
            let (parts, got) = tokio::time::timeout(
                REQ_TIMEOUT,
                fetch(&mut sender, echo_request("a.test", body.clone())),
            )
            .await
            .expect("request timed out")
            .unwrap_or_else(|e| panic!("new TLS connection, POST of {size} bytes: {e}"));
            assert!(
                got == body,
                "POST /echo of {size} bytes on a new TLS connection: {}",
                first_difference(&got, &body)
            );
            seen_xff.push(header_str(&parts, "x-seen-xff"));
            requests += 1;
        }
        (requests, seen_xff)
    });
    for xff in &seen_xff {
        assert_eq!(
            xff.as_deref(),
            Some("127.0.0.1"),
            "through tls -> app the backend must see X-Forwarded-For = the real client 127.0.0.1"
        );
    }

    // Plain HTTP through comp (http) -> app0.sock -> app (http): both stages
    // are HTTP stages, so each appends the client it knows.
    let comp_xff = rt.block_on(async {
        let mut sender = http_connect(COMP_ADDR).await.expect("connecting to comp");
        let body = binary_body(1 << 20, 7);
        let (parts, got) = fetch(&mut sender, echo_request("comp.test", body.clone()))
            .await
            .expect("POST through comp");
        assert!(
            got == body,
            "POST /echo of 1 MiB through comp -> app: {}",
            first_difference(&got, &body)
        );
        header_str(&parts, "x-seen-xff")
    });
    report(
        &sb,
        &format!("stages_chain: X-Forwarded-For through comp -> app: {comp_xff:?}"),
    );
    let comp_xff = comp_xff.expect("the backend saw an X-Forwarded-For");
    assert!(
        comp_xff.split(", ").all(|ip| ip == "127.0.0.1"),
        "through comp -> app every X-Forwarded-For entry must be the real client 127.0.0.1, got {comp_xff:?}"
    );

    // curl through the TLS entry point, byte-exact.
    let out_file = sb.dir.join("curl.out");
    let size = 777_777;
    let url =
        format!("https://a.test:8443/r?len={size}&body=bin&seed=9&ct=application/octet-stream");
    let out = run_bounded_ok(
        Command::new("curl")
            .args([
                "-sS",
                "-k",
                "--http1.1",
                "--resolve",
                "a.test:8443:127.0.0.1",
            ])
            .arg("-o")
            .arg(&out_file)
            .args(["-w", "%{http_code} %{size_download}"])
            .arg(&url),
        Duration::from_secs(20),
    );
    let got = std::fs::read(&out_file).expect("curl wrote its output");
    let want = binary_body(size, 9);
    assert!(
        got == want,
        "curl {url}: body differs: {} (curl: {})",
        first_difference(&got, &want),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {size}"),
        "curl: expected status 200 and {size} bytes"
    );

    // openssl s_client: SNI picks the certificate.
    for (sni, cert, other) in [("b.test", &b, &a), ("a.test", &a, &b)] {
        let out = run_bounded(
            Command::new("openssl").args([
                "s_client",
                "-connect",
                TLS_ADDR,
                "-servername",
                sni,
                "-alpn",
                "http/1.1",
            ]),
            Duration::from_secs(20),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let shown = pem_block(&text).unwrap_or_else(|| {
            panic!(
                "openssl s_client -servername {sni} printed no certificate: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(
            shown.trim(),
            cert.cert_pem.trim(),
            "openssl s_client -servername {sni}: expected the {} certificate",
            cert.cn
        );
        let subject_line = text
            .lines()
            .find(|l| l.starts_with("subject="))
            .unwrap_or_default();
        assert!(
            subject_line.contains(&format!("CN={}", cert.cn))
                || subject_line.contains(&format!("CN = {}", cert.cn)),
            "openssl s_client -servername {sni}: subject line {subject_line:?} should name CN={}",
            cert.cn
        );
        assert!(
            !subject_line.contains(&other.cn),
            "openssl s_client -servername {sni}: subject line {subject_line:?} names {}",
            other.cn
        );
        assert!(
            text.contains("ALPN protocol: http/1.1"),
            "openssl s_client: expected ALPN http/1.1 to be negotiated: {text}"
        );
    }

    report(
        &sb,
        &format!(
            "stages_chain: {requests} requests over TLS, backend saw {} requests on {} connections; X-Forwarded-For counts {:?}",
            backend.requests(),
            backend
                .stats
                .connections
                .load(std::sync::atomic::Ordering::Relaxed),
            backend.stats.xff_counts()
        ),
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
    let status = sb.status();
    assert!(
        status.is_serving(proxy.generation()),
        "the generation should still be serving: {status:#?}"
    );
}

/// The first PEM certificate block in `text`.
fn pem_block(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = text[start..].find(end_marker)? + start + end_marker.len();
    Some(text[start..end].to_string())
}

/// What the PROXY-decoding backend saw on one connection.
#[derive(Debug, Clone)]
struct SeenHeader {
    command: v2::Command,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    tlvs: Vec<(u8, Vec<u8>)>,
}

/// A raw TCP backend on [`BACKEND_ADDR`]: reads one PROXY v2 header (ppp
/// parses it), records it, then echoes the rest of the connection.
fn start_proxy_decoding_backend(rt: &tokio::runtime::Runtime) -> Arc<Mutex<Vec<SeenHeader>>> {
    let listener = rt
        .block_on(TcpListener::bind(BACKEND_ADDR))
        .expect("binding the PROXY-decoding backend");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQ_TIMEOUT, decode_and_echo(stream, seen)).await;
            });
        }
    });
    seen
}

async fn decode_and_echo(
    mut stream: TcpStream,
    seen: Arc<Mutex<Vec<SeenHeader>>>,
) -> std::io::Result<()> {
    let mut head = vec![0u8; 16];
    stream.read_exact(&mut head).await?;
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    head.resize(16 + len, 0);
    stream.read_exact(&mut head[16..]).await?;
    let header =
        v2::Header::try_from(&head[..]).map_err(|e| std::io::Error::other(format!("ppp: {e}")))?;
    let (source, destination) = match header.addresses {
        v2::Addresses::IPv4(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        v2::Addresses::IPv6(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        _ => (None, None),
    };
    let tlvs = header
        .tlvs()
        .map(|t| t.map(|t| (t.kind, t.value.into_owned())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| std::io::Error::other(format!("ppp TLVs: {e}")))?;
    seen.lock().unwrap().push(SeenHeader {
        command: header.command,
        source,
        destination,
        tlvs,
    });
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// The value of TLV `kind` (the first one), if present.
fn tlv(tlvs: &[(u8, Vec<u8>)], kind: u8) -> Option<&[u8]> {
    tlvs.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.as_slice())
}

/// The app stage in tcp mode passes the PROXY header on: a backend that
/// decodes it (ppp) sees the TLS client's own address and port, the address
/// it connected to, and the TLS details as TLVs (AUTHORITY = SNI, ALPN, SSL
/// with VERSION and CIPHER); the payload arrives byte-exact.
#[test]
fn tcp_app_passes_client_and_tls_tlvs_to_backend() {
    let (sb, rt) = Sandbox::with_runtime("st-chain-pp");
    let seen = start_proxy_decoding_backend(&rt);
    let (a, b) = certs(&sb);
    let cfg = sb.write_file("chain-tcp.toml", &chain_config(&sb, &a, &b, "tcp"));
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    struct Case {
        what: &'static str,
        sni: Option<&'static str>,
        alpn: &'static [&'static str],
        tls12: bool,
    }
    let cases = [
        Case {
            what: "TLS 1.3, SNI a.test, ALPN http/1.1",
            sni: Some("a.test"),
            alpn: &["http/1.1"],
            tls12: false,
        },
        Case {
            what: "TLS 1.3, SNI b.test, no ALPN",
            sni: Some("b.test"),
            alpn: &[],
            tls12: false,
        },
        Case {
            what: "TLS 1.2, no SNI, ALPN http/1.1",
            sni: None,
            alpn: &["http/1.1"],
            tls12: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let config = if case.tls12 {
            tls_client_config_versions(case.alpn, case.sni.is_some(), &[&rustls::version::TLS12])
        } else {
            tls_client_config(case.alpn, case.sni.is_some())
        };
        let payload = binary_body(200_000 + i, 300 + i as u64);
        let (client_addr, cipher, version) = rt.block_on(async {
            let mut stream = tls_connect(TLS_ADDR, case.sni.unwrap_or("a.test"), config)
                .await
                .unwrap_or_else(|e| panic!("{}: TLS handshake: {e}", case.what));
            let client_addr = stream.get_ref().0.local_addr().expect("client address");
            let conn = stream.get_ref().1;
            let cipher = conn
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .expect("a negotiated cipher suite")
                .to_string();
            let version = conn.protocol_version().expect("a negotiated version");
            stream
                .write_all(&payload)
                .await
                .expect("sending the payload");
            let mut got = vec![0u8; payload.len()];
            tokio::time::timeout(REQ_TIMEOUT, stream.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{}: echo timed out", case.what))
                .unwrap_or_else(|e| panic!("{}: reading the echo: {e}", case.what));
            assert!(
                got == payload,
                "{}: echoed payload differs: {}",
                case.what,
                first_difference(&got, &payload)
            );
            (client_addr, cipher, version)
        });
        let header = seen
            .lock()
            .unwrap()
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("{}: the backend decoded no PROXY header", case.what));
        report(
            &sb,
            &format!(
                "stages_chain: {}: client {client_addr}, backend saw {:?} {:?} -> {:?}, TLVs {:?}",
                case.what,
                header.command,
                header.source,
                header.destination,
                header
                    .tlvs
                    .iter()
                    .map(|(k, v)| format!("{k:#04x}={}", String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>()
            ),
        );
        assert_eq!(header.command, v2::Command::Proxy, "{}: command", case.what);
        assert_eq!(
            header.source,
            Some(client_addr),
            "{}: the PROXY source must be the TLS client's own address and port",
            case.what
        );
        assert_eq!(
            header.destination,
            Some(TLS_ADDR.parse().unwrap()),
            "{}: the PROXY destination must be the address the client connected to",
            case.what
        );
        assert_eq!(
            tlv(&header.tlvs, 0x02),
            case.sni.map(str::as_bytes),
            "{}: AUTHORITY TLV (0x02) must be the SNI, absent without SNI",
            case.what
        );
        assert_eq!(
            tlv(&header.tlvs, 0x01),
            case.alpn.first().map(|p| p.as_bytes()),
            "{}: ALPN TLV (0x01) must be the negotiated protocol, absent without ALPN",
            case.what
        );
        let ssl =
            tlv(&header.tlvs, 0x20).unwrap_or_else(|| panic!("{}: no SSL TLV (0x20)", case.what));
        assert!(ssl.len() >= 5, "{}: SSL TLV too short: {ssl:?}", case.what);
        assert_eq!(
            ssl[0] & 0x01,
            0x01,
            "{}: SSL TLV client flags must have PP2_CLIENT_SSL",
            case.what
        );
        assert_eq!(
            &ssl[1..5],
            &[0, 0, 0, 0],
            "{}: SSL TLV verify must be 0",
            case.what
        );
        let subs = v2::TypeLengthValues::from(&ssl[5..])
            .map(|t| t.map(|t| (t.kind, t.value.into_owned())))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{}: SSL sub-TLVs do not parse: {e}", case.what));
        let want_version = if case.tls12 { "TLSv1.2" } else { "TLSv1.3" };
        let negotiated = match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "other",
        };
        assert_eq!(
            negotiated, want_version,
            "{}: the client negotiated another version than expected",
            case.what
        );
        assert_eq!(
            tlv(&subs, 0x21),
            Some(want_version.as_bytes()),
            "{}: SSL VERSION sub-TLV (0x21)",
            case.what
        );
        assert_eq!(
            tlv(&subs, 0x23),
            Some(cipher.as_bytes()),
            "{}: SSL CIPHER sub-TLV (0x23) must be the negotiated suite",
            case.what
        );
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        cases.len(),
        "one PROXY header per connection"
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
}
