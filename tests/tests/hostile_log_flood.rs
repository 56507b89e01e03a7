//! A flood of broken clients must not become a flood of log I/O: 100
//! connections that send plain text to a TLS listener within a second write
//! at most 20 failure lines a second (each failure is still counted), and
//! the suppressed ones are summed up in one line once the next second has a
//! failure of its own.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use proxy_harness::{
    BACKEND_ADDR, Proxy, Sandbox,
    certs::make_cert,
    config::{ConfigToml, Table},
    report,
};

const TLS_ADDR: &str = "127.0.0.1:8443";
const FLOOD: usize = 100;
/// The proxy's limit of failure lines per listener and second.
const PER_SECOND: usize = 20;

/// Sends plain HTTP to the TLS port and waits for the close.
fn garbage() {
    let mut s = TcpStream::connect(TLS_ADDR).expect("connect to the TLS port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn a_flood_of_bad_handshakes_writes_a_bounded_number_of_lines() {
    let sb = Sandbox::new("log-flood");
    let cert = make_cert(&sb.dir, "a.test", &["a.test"]);
    let config = ConfigToml::stages(&sb, "5s")
        .table(Table::listener("tls", &[TLS_ADDR], "echo").with(Table::tls(&[&cert.bundle])))
        .table(Table::backend("echo", &[BACKEND_ADDR]))
        .render();
    let cfg = sb.write_file("flood.toml", &config);
    let mut proxy = Proxy::start(&sb, &cfg, &[]);
    proxy.wait_active(&sb, Duration::from_secs(10));

    let started = Instant::now();
    for _ in 0..FLOOD {
        garbage();
    }
    let flood_took = started.elapsed();
    // One more failure in a later second brings the summary line.
    std::thread::sleep(Duration::from_millis(1100));
    garbage();
    std::thread::sleep(Duration::from_millis(300));

    let log = proxy.log();
    let failed = log
        .lines()
        .filter(|l| l.contains("connection failed: downstream: TLS"))
        .count();
    let seconds = flood_took.as_secs() as usize + 2;
    report(
        &sb,
        &format!(
            "{FLOOD} bad handshakes in {flood_took:?}: {failed} failure lines ({PER_SECOND} a second allowed)"
        ),
    );
    assert!(
        failed >= PER_SECOND.min(FLOOD),
        "too few lines: {failed}\n{log}"
    );
    assert!(
        failed <= PER_SECOND * seconds,
        "{failed} failure lines for {FLOOD} failures over {seconds} s\n{log}"
    );
    if failed < FLOOD + 1 {
        assert!(
            log.lines()
                .any(|l| l.contains("failed connections were not logged")),
            "the suppressed lines are summed up\n{log}"
        );
    }
    let lines = log.lines().count();
    assert!(
        lines < 2 * (PER_SECOND * seconds) + 40,
        "{lines} log lines in all for {FLOOD} bad handshakes\n{log}"
    );
}
