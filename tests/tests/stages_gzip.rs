//! gzip in the comp stage (http mode): one case per negotiation rule, each
//! response checked against what the backend sent, byte for byte (after
//! gunzip where the stage compressed).

use std::{process::Command, time::Duration};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    bodies::{binary_body, first_difference, gunzip, text_body},
    config::{ConfigToml, GZIP_TYPES, Table},
    http::{fetch, header_str, http_connect, request},
    http_backend::HttpBackend,
    process::run_bounded_ok,
    report,
};

const COMP_ADDR: &str = "127.0.0.1:8080";
const MIN_SIZE: usize = 256;

/// What the stage must do with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `Content-Encoding: gzip`, no Content-Length, gunzips to the body.
    Gzip,
    /// Passed as the backend sent it (no Content-Encoding added).
    Identity,
}

struct Case {
    what: &'static str,
    method: &'static str,
    /// `/r?...` of the backend (see `HttpBackend`).
    uri: String,
    accept_encoding: Option<&'static str>,
    expect: Expect,
    /// The body the backend sends (empty for HEAD, 204, 304).
    body: Vec<u8>,
    /// Exactly these Vary tokens (in order), or no Vary when empty.
    vary: &'static [&'static str],
    /// The ETag the client must get, if the backend sends one.
    etag: Option<&'static str>,
    /// The Content-Encoding the client must get on an identity response.
    encoding: Option<&'static str>,
}

fn case(what: &'static str, uri: &str, ae: Option<&'static str>, expect: Expect) -> Case {
    let q: std::collections::HashMap<&str, &str> = uri
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let len: usize = q.get("len").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let seed: u64 = q.get("seed").and_then(|v| v.parse().ok()).unwrap_or(0);
    let body = match q.get("body") {
        Some(&"bin") => binary_body(len, seed),
        _ => text_body(len, seed),
    };
    Case {
        what,
        method: "GET",
        uri: uri.to_string(),
        accept_encoding: ae,
        expect,
        body,
        // A compressible response varies by Accept-Encoding whether or not
        // this client accepted gzip.
        vary: &["Accept-Encoding"],
        etag: None,
        encoding: None,
    }
}

fn cases() -> Vec<Case> {
    use Expect::{Gzip, Identity};
    let g = Some("gzip");
    let mut v = vec![
        case(
            "text/html 100 kB, Accept-Encoding: gzip",
            "/r?len=100000&seed=1&ct=text/html",
            g,
            Gzip,
        ),
        case(
            "text/plain 1 MiB, gzip, deflate, br",
            "/r?len=1048576&seed=2&ct=text/plain",
            Some("gzip, deflate, br"),
            Gzip,
        ),
        case(
            "application/json with a charset parameter",
            "/r?len=5000&seed=3&ct=application/json;charset=utf-8",
            g,
            Gzip,
        ),
        case(
            "application/javascript",
            "/r?len=5000&seed=4&ct=application/javascript",
            g,
            Gzip,
        ),
        case(
            "404 with an HTML body is compressed too",
            "/r?len=5000&seed=5&status=404",
            g,
            Gzip,
        ),
        case(
            "gzip;q=0 refuses",
            "/r?len=5000&seed=6",
            Some("gzip;q=0"),
            Identity,
        ),
        case(
            "gzip;q=0 beats *",
            "/r?len=5000&seed=7",
            Some("gzip;q=0, *"),
            Identity,
        ),
        case("* accepts gzip", "/r?len=5000&seed=8", Some("*"), Gzip),
        case(
            "*;q=0 refuses",
            "/r?len=5000&seed=9",
            Some("*;q=0"),
            Identity,
        ),
        case("x-gzip counts", "/r?len=5000&seed=10", Some("x-gzip"), Gzip),
        case(
            "gzip;q=0.5 accepts",
            "/r?len=5000&seed=11",
            Some("br, gzip;q=0.5"),
            Gzip,
        ),
        case(
            "GZIP in capitals",
            "/r?len=5000&seed=12",
            Some("GZIP"),
            Gzip,
        ),
        case(
            "only other codings",
            "/r?len=5000&seed=13",
            Some("deflate, br"),
            Identity,
        ),
        case("no Accept-Encoding", "/r?len=5000&seed=14", None, Identity),
        case(
            "exactly min_size (256) is compressed",
            "/r?len=256&seed=15",
            g,
            Gzip,
        ),
        case(
            "unknown length (chunked) below min_size is compressed",
            "/r?len=100&seed=16&chunked=1",
            g,
            Gzip,
        ),
        case(
            "unknown length (chunked) 300 kB",
            "/r?len=300000&seed=17&chunked=1&ct=text/css",
            g,
            Gzip,
        ),
        case(
            "Cache-Control: max-age=60 does not prevent it",
            "/r?len=5000&seed=18&cc=max-age=60",
            g,
            Gzip,
        ),
    ];

    // Not compressible at all: no Vary added either.
    for (what, uri) in [
        (
            "already encoded (br)",
            "/r?len=5000&seed=20&body=bin&enc=br",
        ),
        (
            "type not in the list (image/png)",
            "/r?len=5000&seed=21&body=bin&ct=image/png",
        ),
        ("no Content-Type", "/r?len=5000&seed=22&ct=none"),
        ("below min_size (255)", "/r?len=255&seed=23"),
        (
            "Cache-Control: no-transform",
            "/r?len=5000&seed=24&cc=no-transform",
        ),
        (
            "Cache-Control: public, no-transform",
            "/r?len=5000&seed=25&cc=public,no-transform",
        ),
        ("206 Partial Content", "/r?len=5000&seed=26&status=206"),
    ] {
        let mut c = case(what, uri, g, Identity);
        c.vary = &[];
        if what.starts_with("already encoded") {
            c.encoding = Some("br");
        }
        v.push(c);
    }

    // HEAD: the headers the GET would get (gzip, Vary), and no body.
    let mut head = case("HEAD", "/r?len=5000&seed=30", g, Identity);
    head.method = "HEAD";
    head.body = Vec::new();
    head.encoding = Some("gzip");
    // No body to compress.
    let mut no_content = case("204 No Content", "/r?status=204", g, Identity);
    no_content.body = Vec::new();
    no_content.vary = &[];
    let mut not_modified = case(
        "304 Not Modified (strong ETag kept)",
        "/r?status=304&etag=strong:v304",
        g,
        Identity,
    );
    not_modified.body = Vec::new();
    not_modified.vary = &[];
    not_modified.etag = Some("\"v304\"");
    v.extend([head, no_content, not_modified]);

    // Vary: Accept-Encoding once, other tokens kept.
    let mut vary_same = case(
        "backend already varies by Accept-Encoding",
        "/r?len=5000&seed=40&vary=Accept-Encoding",
        g,
        Gzip,
    );
    vary_same.vary = &["Accept-Encoding"];
    let mut vary_lower = case(
        "backend varies by accept-encoding (lowercase)",
        "/r?len=5000&seed=41&vary=accept-encoding",
        g,
        Gzip,
    );
    vary_lower.vary = &["accept-encoding"];
    let mut vary_other = case(
        "backend varies by Origin",
        "/r?len=5000&seed=42&vary=Origin",
        g,
        Gzip,
    );
    vary_other.vary = &["Origin", "Accept-Encoding"];
    let mut vary_identity = case(
        "backend varies by Origin, identity for this client",
        "/r?len=5000&seed=43&vary=Origin",
        None,
        Identity,
    );
    vary_identity.vary = &["Origin", "Accept-Encoding"];
    v.extend([vary_same, vary_lower, vary_other, vary_identity]);

    // ETags.
    let mut strong = case(
        "strong ETag weakened when gzipped",
        "/r?len=5000&seed=50&etag=strong:abc",
        g,
        Gzip,
    );
    strong.etag = Some("W/\"abc\"");
    let mut weak = case(
        "weak ETag stays as it is",
        "/r?len=5000&seed=51&etag=weak:w1",
        g,
        Gzip,
    );
    weak.etag = Some("W/\"w1\"");
    let mut strong_identity = case(
        "strong ETag kept on identity",
        "/r?len=5000&seed=52&etag=strong:abc",
        None,
        Identity,
    );
    strong_identity.etag = Some("\"abc\"");
    v.extend([strong, weak, strong_identity]);
    v
}

#[test]
fn gzip_negotiation_rules() {
    let (sb, rt) = Sandbox::with_runtime("st-gzip");
    let backend = HttpBackend::start(&rt);
    let config = ConfigToml::stages(&sb, "10s")
        .table(Table::http("comp", COMP_ADDR, "servers").with(Table::gzip(MIN_SIZE, GZIP_TYPES)))
        .table(Table::backend("servers", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("gzip.toml", &config);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    let cases = cases();
    let mut ratios = Vec::new();
    let mut failures = Vec::new();
    rt.block_on(async {
        // All cases on one keep-alive connection.
        let mut sender = http_connect(COMP_ADDR).await.expect("connecting to comp");
        for c in &cases {
            let headers: Vec<(&str, &str)> = c
                .accept_encoding
                .map(|ae| ("accept-encoding", ae))
                .into_iter()
                .collect();
            let (parts, got) = tokio::time::timeout(
                Duration::from_secs(10),
                fetch(
                    &mut sender,
                    request(c.method, &c.uri, "comp.test", &headers),
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("{}: timed out", c.what))
            .unwrap_or_else(|e| panic!("{}: {e}", c.what));
            let mut problems = Vec::new();
            let ce = header_str(&parts, "content-encoding");
            let cl = header_str(&parts, "content-length");
            match c.expect {
                Expect::Gzip => {
                    if ce.as_deref() != Some("gzip") {
                        problems.push(format!("Content-Encoding {ce:?}, expected gzip"));
                    }
                    if cl.is_some() {
                        problems.push(format!(
                            "Content-Length {cl:?} on a gzipped response (expected none)"
                        ));
                    }
                    if ce.as_deref() == Some("gzip") {
                        let plain = gunzip(&got, c.what);
                        if plain != c.body {
                            problems.push(format!(
                                "gunzipped body differs: {}",
                                first_difference(&plain, &c.body)
                            ));
                        }
                        ratios.push((c.what, got.len(), c.body.len()));
                    }
                }
                Expect::Identity => {
                    if ce.as_deref() != c.encoding {
                        problems.push(format!(
                            "Content-Encoding {ce:?}, expected {:?}",
                            c.encoding
                        ));
                    }
                    if got != c.body {
                        problems.push(format!("body differs: {}", first_difference(&got, &c.body)));
                    }
                    let sent_length = c.method != "HEAD"
                        && !c.uri.contains("chunked=1")
                        && parts.status != 204
                        && parts.status != 304;
                    if sent_length && cl != Some(c.body.len().to_string()) {
                        problems.push(format!(
                            "Content-Length {cl:?}, expected the backend's {}",
                            c.body.len()
                        ));
                    }
                }
            }
            let vary: Vec<String> = parts
                .headers
                .get_all("vary")
                .iter()
                .flat_map(|v| {
                    String::from_utf8_lossy(v.as_bytes())
                        .split(',')
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty())
                        .collect::<Vec<_>>()
                })
                .collect();
            if vary != c.vary {
                problems.push(format!("Vary tokens {vary:?}, expected {:?}", c.vary));
            }
            if let Some(want) = c.etag {
                let etag = header_str(&parts, "etag");
                if etag.as_deref() != Some(want) {
                    problems.push(format!("ETag {etag:?}, expected {want}"));
                }
            }
            if c.expect == Expect::Gzip && parts.headers.contains_key("accept-ranges") {
                problems.push("Accept-Ranges kept on a gzipped response".into());
            }
            eprintln!(
                "  {:<55} {:>3} CE={:<6} len {:>7} -> {:>7} {}",
                c.what,
                parts.status.as_u16(),
                ce.unwrap_or_else(|| "-".into()),
                c.body.len(),
                got.len(),
                if problems.is_empty() { "ok" } else { "FAILED" }
            );
            if !problems.is_empty() {
                failures.push(format!("{}: {}", c.what, problems.join("; ")));
            }
        }
    });

    for (what, compressed, original) in &ratios {
        report(
            &sb,
            &format!(
                "stages_gzip: {what}: {original} -> {compressed} bytes, ratio {:.3}",
                *compressed as f64 / *original as f64
            ),
        );
    }

    // curl --compressed: byte-exact after curl's own gunzip.
    let body_file = sb.dir.join("curl-body");
    let head_file = sb.dir.join("curl-headers");
    let len = 500_000;
    let url = format!("http://{COMP_ADDR}/r?len={len}&seed=60&ct=text/plain");
    let out = run_bounded_ok(
        Command::new("curl")
            .args(["-sS", "--compressed", "-D"])
            .arg(&head_file)
            .arg("-o")
            .arg(&body_file)
            .args(["-w", "%{size_download}"])
            .arg(&url),
        Duration::from_secs(20),
    );
    let got = std::fs::read(&body_file).expect("curl wrote the body");
    let want = text_body(len, 60);
    let headers = std::fs::read_to_string(&head_file)
        .expect("curl wrote the headers")
        .to_ascii_lowercase();
    let on_wire: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    report(
        &sb,
        &format!(
            "stages_gzip: curl --compressed {len} bytes: {on_wire} bytes on the wire, ratio {:.3}",
            on_wire as f64 / len as f64
        ),
    );
    assert!(
        headers.contains("content-encoding: gzip"),
        "curl --compressed: expected Content-Encoding: gzip, headers:\n{headers}"
    );
    assert!(
        got == want,
        "curl --compressed: body differs: {}",
        first_difference(&got, &want)
    );
    assert!(
        on_wire > 0 && on_wire < len / 2,
        "curl --compressed: expected well under {len}/2 bytes on the wire, got {on_wire}"
    );
    // curl without --compressed sends no Accept-Encoding: identity.
    run_bounded_ok(
        Command::new("curl")
            .args(["-sS", "-D"])
            .arg(&head_file)
            .arg("-o")
            .arg(&body_file)
            .arg(&url),
        Duration::from_secs(20),
    );
    let got = std::fs::read(&body_file).expect("curl wrote the body");
    let headers = std::fs::read_to_string(&head_file).expect("curl wrote the headers");
    assert!(
        got == want && !headers.to_ascii_lowercase().contains("content-encoding"),
        "curl without --compressed: expected the identity body: {}; headers:\n{headers}",
        first_difference(&got, &want)
    );

    assert!(
        failures.is_empty(),
        "{} of {} gzip cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // A compressible body must shrink (text_body is repetitive text).
    for (what, compressed, original) in &ratios {
        if *original >= 5000 {
            assert!(
                (*compressed as f64) < *original as f64 * 0.5,
                "{what}: expected gzip to at least halve {original} bytes, got {compressed}"
            );
        }
    }
    assert_eq!(
        backend.requests(),
        cases.len() as u64 + 2,
        "the backend must have seen every request once"
    );
    assert!(
        proxy.try_exit().is_none(),
        "the proxy exited during the test"
    );
}
