//! http mode writes one access line per request (`--log-json`: one JSON
//! object, target "access"): the real client, listener, generation,
//! protocol, method, escaped path, status, bytes both ways, time to the
//! response head, duration, server and a termination code an operator can
//! grep: `--` normal, `SC` no server to connect to, `sH` the server did not
//! answer in time, `CD` the client left before the body was sent. A
//! connection that fails also gets its own line (outcome "error").

use std::{collections::BTreeMap, time::Duration};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox, Signal,
    config::{ConfigToml, Table},
    http::{echo_request, fetch, http_connect, request},
    http_backend::HttpBackend,
    report,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WEB: &str = "127.0.0.1:8080";
const DEAD: &str = "127.0.0.1:8081";

#[test]
fn one_access_line_per_request_with_termination_codes() {
    let (sb, rt) = Sandbox::with_runtime("op-access");
    let backend = HttpBackend::start(&rt);
    // Nothing listens on port 1 of the sandbox's loopback.
    let config = ConfigToml::stages(&sb, "10s")
        .table(Table::http("web", WEB, "servers"))
        .table(Table::http("dead", DEAD, "nowhere"))
        .table(Table::backend("servers", &[BACKEND_ADDR]).str("server_timeout", "300ms"))
        .table(Table::backend("nowhere", &["127.0.0.1:1"]))
        .render();
    let cfg = sb.write_file("access.toml", &config);
    let mut g = Proxy::start_args(&sb, &cfg, &["--log-json"], &[]);
    let id = g.wait_active(&sb, Duration::from_secs(10));

    let local = rt.block_on(async {
        // Three requests on one keep-alive connection: three lines.
        let mut c = http_connect(WEB).await.expect("connect");
        let (parts, _) = fetch(&mut c, request("GET", "/r?len=1000&seed=1", "a.test", &[]))
            .await
            .unwrap();
        assert_eq!(parts.status, 200);
        let (parts, body) = fetch(&mut c, echo_request("a.test", vec![7u8; 5000]))
            .await
            .unwrap();
        assert_eq!((parts.status.as_u16(), body.len()), (200, 5000));
        // A path with a quote and a space (percent-encoded by nobody).
        let mut raw = TcpStream::connect(WEB).await.unwrap();
        raw.write_all(b"GET /odd\"path?x=%20y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink).await;
        // 502: no server.
        let mut d = http_connect(DEAD).await.expect("connect");
        let (parts, _) = fetch(&mut d, request("GET", "/down", "a.test", &[]))
            .await
            .unwrap();
        assert_eq!(parts.status, 502);
        // 504: the server holds the request past server_timeout.
        backend.set_hung(true);
        let (parts, _) = fetch(&mut c, request("GET", "/r?len=10&seed=2", "a.test", &[]))
            .await
            .unwrap();
        assert_eq!(parts.status, 504);
        backend.set_hung(false);
        // The client leaves after the head of a 20 MB body.
        let mut s = TcpStream::connect(WEB).await.unwrap();
        let local = s.local_addr().unwrap();
        s.write_all(b"GET /r?len=20000000&seed=3&body=bin HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 1024];
        let n = s.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        drop(s);
        tokio::time::sleep(Duration::from_millis(300)).await;
        local
    });

    g.signal(Signal::Usr1);
    assert!(g.expect_exit(Duration::from_secs(15)).success());
    let log = g.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &Value| v["target"] == "access" && v["fields"]["method"].is_string())
        .collect();
    // A connection that failed also gets its connection line (outcome
    // "error"): here the one whose client left.
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#""target":"access""#) && l.contains(r#""outcome":"error""#))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    report(
        &sb,
        &format!("operator_access_log: {} access lines", lines.len()),
    );
    let by_path: BTreeMap<String, &Value> = lines
        .iter()
        .map(|v| {
            (
                v["fields"]["path"].as_str().unwrap_or_default().to_string(),
                &v["fields"],
            )
        })
        .collect();
    assert_eq!(lines.len(), 6, "one line per request:\n{log}");
    for f in by_path.values() {
        assert_eq!(f["generation"].as_u64(), Some(id.generation), "{f}");
        assert_eq!(f["proto"], "HTTP/1.1", "{f}");
        assert!(
            f["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{f}"
        );
        assert!(f["duration_ms"].is_u64() && f["ttfb_ms"].is_i64(), "{f}");
    }
    let get = |path: &str| {
        *by_path
            .get(path)
            .unwrap_or_else(|| panic!("no line for {path}; lines: {by_path:?}"))
    };
    let ok = get("/r?len=1000&seed=1");
    assert_eq!(
        (
            &ok["listener"],
            &ok["method"],
            &ok["status"],
            &ok["termination"]
        ),
        (&"web".into(), &"GET".into(), &200.into(), &"--".into())
    );
    assert_eq!(ok["bytes_out"], 1000);
    assert_eq!(ok["server"], BACKEND_ADDR);
    let echo = get("/echo");
    assert_eq!(
        (&echo["method"], &echo["bytes_in"], &echo["bytes_out"]),
        (&"POST".into(), &5000.into(), &5000.into())
    );
    let odd = get("/odd\\x22path?x=%20y");
    assert_eq!(odd["termination"], "--");
    let down = get("/down");
    assert_eq!(
        (&down["status"], &down["termination"], &down["listener"]),
        (&502.into(), &"SC".into(), &"dead".into())
    );
    let slow = get("/r?len=10&seed=2");
    assert_eq!(
        (&slow["status"], &slow["termination"]),
        (&504.into(), &"sH".into())
    );
    let left = get("/r?len=20000000&seed=3&body=bin");
    assert_eq!(
        (&left["status"], &left["termination"]),
        (&200.into(), &"CD".into())
    );
    assert_eq!(left["client"], local.to_string());
    assert!(left["bytes_out"].as_u64().unwrap() < 20_000_000, "{left}");
}
