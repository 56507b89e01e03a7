//! accept_proxy: every broken PROXY header (garbage, a broken v1 line,
//! truncated, slow, oversized length, bad version) closes that one
//! connection within a bound, nothing of it reaches the backend, and a valid
//! header right after it is served. A listener without accept_proxy forwards a PROXY header as
//! payload bytes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant},
};

use ppp::v2;
use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    bodies::{Rng, first_difference},
    config::{ConfigToml, Table},
    http::{Closed, read_until_closed},
    report, wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

/// accept_proxy, deadline 3 s: broken headers must be refused long before.
const PP_ADDR: &str = "127.0.0.1:8080";
/// accept_proxy, deadline 500 ms: for the slow senders.
const PP_SLOW_ADDR: &str = "127.0.0.1:8081";
/// No accept_proxy.
const PLAIN_ADDR: &str = "127.0.0.1:8082";
const SLOW_DEADLINE: Duration = Duration::from_millis(500);
/// A broken header is refused as soon as it is seen, not at a deadline.
const QUICK: Duration = Duration::from_secs(1);

/// The v2 signature.
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the echo backend saw: every connection's bytes, once it ended.
#[derive(Default)]
struct EchoSeen {
    accepted: AtomicU64,
    conns: Mutex<Vec<Vec<u8>>>,
}

/// A TCP echo on [`BACKEND_ADDR`] that records what each connection sent.
fn start_echo(rt: &Runtime) -> Arc<EchoSeen> {
    let listener = rt
        .block_on(TcpListener::bind(BACKEND_ADDR))
        .expect("binding the echo backend");
    let seen = Arc::new(EchoSeen::default());
    let seen2 = seen.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            seen2.accepted.fetch_add(1, Ordering::Relaxed);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let work = async {
                    loop {
                        let n = stream.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        all.extend_from_slice(&buf[..n]);
                        stream.write_all(&buf[..n]).await?;
                    }
                    std::io::Result::Ok(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
                seen.conns.lock().unwrap().push(all);
                let _ = stream.shutdown().await;
            });
        }
    });
    seen
}

/// A valid v2 PROXY header for client `src`.
fn valid_header(src: &str, dst: &str) -> Vec<u8> {
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

/// Sends `prefix` + `payload`, half-closes, reads until the end: the echo.
async fn roundtrip(addr: &str, prefix: &[u8], payload: &[u8]) -> Result<Vec<u8>, String> {
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(prefix)
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.write_all(payload)
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .map_err(|e| format!("read: {e} after {} bytes", got.len()))?;
        Ok(got)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// One broken sender: what it sends, and how.
struct Bad {
    what: &'static str,
    addr: &'static str,
    /// Written at once after connecting.
    bytes: Vec<u8>,
    /// Half-close after writing (a sender that gives up).
    close_after: bool,
    /// Then one more byte every this often (a trickling sender), while open.
    trickle: Option<Duration>,
    /// The connection must be closed no earlier than this...
    min: Duration,
    /// ...and no later than this.
    max: Duration,
}

fn bad_cases() -> Vec<Bad> {
    let valid = valid_header("192.0.2.1:1111", PP_ADDR);
    let mut random = Rng::new(42).bytes(256);
    random[0] = b'G'; // never a prefix of the signature
    let mut oversized = SIG.to_vec();
    oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    oversized.extend_from_slice(&[0u8; 64]);
    let mut just_over = SIG.to_vec();
    just_over.extend_from_slice(&[0x21, 0x11, 0x10, 0x01]); // 4097 > 4096
    let mut bad_version = SIG.to_vec();
    bad_version.extend_from_slice(&[0x11, 0x11, 0x00, 0x0c]);
    bad_version.extend_from_slice(&[0u8; 12]);
    let fixed_only = valid[..16].to_vec();
    let quick = |what, bytes, close_after| Bad {
        what,
        addr: PP_ADDR,
        bytes,
        close_after,
        trickle: None,
        min: Duration::ZERO,
        max: QUICK,
    };
    let slow = |what, bytes, trickle| Bad {
        what,
        addr: PP_SLOW_ADDR,
        bytes,
        close_after: false,
        trickle,
        min: SLOW_DEADLINE - Duration::from_millis(100),
        max: SLOW_DEADLINE + Duration::from_millis(1000),
    };
    vec![
        quick("random bytes", random, false),
        quick(
            "PROXY v1 line without its destination port",
            b"PROXY TCP4 192.0.2.1 127.0.0.1 5555\r\nhello".to_vec(),
            false,
        ),
        quick(
            "HTTP request instead of a header",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        quick(
            "TLS ClientHello instead of a header",
            vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01],
            false,
        ),
        quick(
            "truncated in the signature, then closed",
            valid[..10].to_vec(),
            true,
        ),
        quick(
            "truncated in the addresses, then closed",
            valid[..20].to_vec(),
            true,
        ),
        quick("oversized length 65535", oversized, false),
        quick("length 4097, one over the limit", just_over, false),
        quick("version 1 in a v2 header", bad_version, false),
        slow("slow: 5 bytes then nothing", valid[..5].to_vec(), None),
        slow("slow: the fixed 16 bytes then nothing", fixed_only, None),
        slow(
            "trickle: one byte every 100 ms",
            valid[..1].to_vec(),
            Some(Duration::from_millis(100)),
        ),
    ]
}

/// Runs one broken sender: Ok(how and when the proxy closed it).
async fn run_bad(bad: &Bad, valid_rest: &[u8]) -> (Closed, Duration) {
    let mut s = TcpStream::connect(bad.addr).await.expect("connect");
    let start = Instant::now();
    s.write_all(&bad.bytes).await.expect("writing the bytes");
    if bad.close_after {
        s.shutdown().await.expect("half-close");
    }
    if let Some(every) = bad.trickle {
        // Keep trickling the rest of a valid header; stop when the proxy
        // closes (a write or the read below fails) or at the bound.
        let (mut r, mut w) = s.into_split();
        let rest = valid_rest.to_vec();
        let trickler = tokio::spawn(async move {
            for b in rest {
                tokio::time::sleep(every).await;
                if w.write_all(&[b]).await.is_err() {
                    break;
                }
            }
            w
        });
        let (how, _, _) = read_until_closed(&mut r, bad.max + Duration::from_secs(1)).await;
        let elapsed = start.elapsed();
        trickler.abort();
        return (how, elapsed);
    }
    let (how, _, _) = read_until_closed(&mut s, bad.max + Duration::from_secs(1)).await;
    (how, start.elapsed())
}

#[test]
fn broken_proxy_headers_close_one_connection_only() {
    let (sb, rt) = Sandbox::with_runtime("st-pp");
    let echo = start_echo(&rt);
    let accepting_proxy = |name, addr, timeout| {
        Table::tcp(name, addr, "echo")
            .key("accept_proxy", true)
            .str("accept_proxy_timeout", timeout)
    };
    let config = ConfigToml::stages(&sb, "10s")
        .table(accepting_proxy("pp", PP_ADDR, "3s"))
        .table(accepting_proxy("pp_slow", PP_SLOW_ADDR, "500ms"))
        .table(Table::tcp("plain", PLAIN_ADDR, "echo"))
        .table(Table::backend("echo", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("pp.toml", &config);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    let cases = bad_cases();
    let valid_for_trickle = valid_header("192.0.2.1:1111", PP_SLOW_ADDR);
    let mut valid_done = 0u64;
    let mut failures = Vec::new();
    rt.block_on(async {
        // A valid header first: the stage works at all.
        for addr in [PP_ADDR, PP_SLOW_ADDR] {
            let payload = Rng::new(1).bytes(10_000);
            let got = roundtrip(addr, &valid_header("192.0.2.50:5000", addr), &payload)
                .await
                .unwrap_or_else(|e| panic!("{addr}: valid header + payload before any test: {e}"));
            assert!(
                got == payload,
                "{addr}: valid header + payload: echo differs: {}",
                first_difference(&got, &payload)
            );
            valid_done += 1;
        }
        for (i, bad) in cases.iter().enumerate() {
            let (how, elapsed) = run_bad(bad, &valid_for_trickle[1..]).await;
            let ok = how.is_closed() && elapsed >= bad.min && elapsed <= bad.max;
            eprintln!(
                "  {:<45} on {}: {how:?} after {elapsed:>10.2?} (expected closed within {:?}..{:?}) {}",
                bad.what,
                bad.addr,
                bad.min,
                bad.max,
                if ok { "ok" } else { "FAILED" }
            );
            if !ok {
                failures.push(format!(
                    "{}: expected the connection closed within {:?}..{:?}, got {how:?} after {elapsed:?}",
                    bad.what, bad.min, bad.max
                ));
            }
            // Right after it, a valid header + payload on the same listener.
            let payload = Rng::new(100 + i as u64).bytes(1000 + i * 997);
            let src = format!("192.0.2.{}:{}", 10 + i, 40_000 + i);
            match roundtrip(bad.addr, &valid_header(&src, bad.addr), &payload).await {
                Ok(got) if got == payload => valid_done += 1,
                Ok(got) => failures.push(format!(
                    "after {}: valid header + payload: echo differs: {}",
                    bad.what,
                    first_difference(&got, &payload)
                )),
                Err(e) => failures.push(format!(
                    "after {}: valid header + payload failed: {e}",
                    bad.what
                )),
            }
        }
    });

    // Nothing of the broken connections reached the backend; every valid
    // one arrived without its header.
    let accepted_after_bad = echo.accepted.load(Ordering::Relaxed);
    {
        let conns = echo.conns.lock().unwrap();
        for (i, data) in conns.iter().enumerate() {
            assert!(
                !data.starts_with(&SIG[..4]) && !data.starts_with(b"PROXY"),
                "backend connection {i} received PROXY header bytes through an accept_proxy listener: {:?}",
                &data[..data.len().min(32)]
            );
        }
    }

    // Without accept_proxy the header is payload: the backend sees it.
    let header = valid_header("192.0.2.99:9999", PLAIN_ADDR);
    let payload = Rng::new(7).bytes(5000);
    let mut sent = header.clone();
    sent.extend_from_slice(&payload);
    let (echoed, plain_again) = rt.block_on(async {
        let echoed = roundtrip(PLAIN_ADDR, &header, &payload).await;
        let plain_again = roundtrip(PLAIN_ADDR, b"", b"plain payload after it").await;
        (echoed, plain_again)
    });
    let echoed = echoed.expect("PROXY header to a listener without accept_proxy");
    assert!(
        echoed == sent,
        "without accept_proxy the PROXY header must be forwarded as bytes and echoed back: {}",
        first_difference(&echoed, &sent)
    );
    let backend_saw = echo
        .conns
        .lock()
        .unwrap()
        .iter()
        .any(|c| c.as_slice() == sent.as_slice());
    assert!(
        backend_saw,
        "the backend must have received the PROXY header bytes followed by the payload"
    );
    assert_eq!(
        plain_again.expect("plain payload after the forwarded header"),
        b"plain payload after it",
        "the plain listener must keep serving"
    );

    // The proxy logged one refused header per broken connection.
    let refused = || {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains("connection failed") && l.contains("PROXY header"))
            .count()
    };
    let bounded = Instant::now();
    while refused() < cases.len() && bounded.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    report(
        &sb,
        &format!(
            "stages_proxy_header: {} broken senders, {} refusals logged, {valid_done} valid exchanges ok, backend accepted {accepted_after_bad} connections before the plain listener test",
            cases.len(),
            refused()
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
        accepted_after_bad, valid_done,
        "only the valid connections may reach the backend"
    );
    assert_eq!(
        refused(),
        cases.len(),
        "expected one `connection failed ... PROXY header` log line per broken sender; log:\n{}",
        proxy.log()
    );
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
