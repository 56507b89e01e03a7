//! One check of one server: a connect (`type = "tcp"`), or a connect and
//! an HTTP/1.1 request whose response status must be one the check
//! expects (`type = "http"`, HAProxy's `option httpchk`). The whole check,
//! connect included, has one deadline.

use std::time::Duration;

use http_body_util::Empty;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use proxy_common::CheckResult;
use tokio::time::{Instant, timeout_at};

use crate::{
    config::{Addr, Backend, CheckConfig, CheckKind, StatusSet},
    stage::socket as net,
};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: CheckResult,
    /// The response status of an HTTP check, 0 otherwise.
    pub http_status: u16,
    pub duration: Duration,
    /// What went wrong (the OS error, the status text), for the log.
    pub info: String,
}

/// How a backend's servers are checked: resolved from `[backend.check]`.
#[derive(Debug, Clone)]
pub struct Probe {
    http: Option<HttpCheck>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone)]
struct HttpCheck {
    method: Method,
    path: String,
    host: Option<String>,
    expect: StatusSet,
}

impl Probe {
    pub fn new(check: &CheckConfig, backend: &Backend) -> Self {
        let http = (check.kind == CheckKind::Http).then(|| HttpCheck {
            // Validated as a token, which is what Method accepts.
            method: Method::from_bytes(check.method().as_bytes()).unwrap_or(Method::GET),
            path: check.path().to_string(),
            host: check.host.clone(),
            expect: check.expect_status(),
        });
        Self {
            http,
            interval: check.interval,
            timeout: check.timeout(backend.connect_timeout),
            rise: check.rise,
            fall: check.fall,
        }
    }

    /// Checks `server` once, within [`Probe::timeout`].
    pub async fn run(&self, server: &Addr) -> Outcome {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let done = |result, http_status, info: String| Outcome {
            result,
            http_status,
            duration: start.elapsed(),
            info,
        };
        let stream = match timeout_at(deadline, net::connect(server)).await {
            Err(_) => {
                let info = format!("no connection within {:?}", self.timeout);
                return done(CheckResult::L4Timeout, 0, info);
            }
            Ok(Err(e)) => return done(CheckResult::L4Con, 0, os_error(&e)),
            Ok(Ok(stream)) => stream,
        };
        let Some(http) = &self.http else {
            return done(CheckResult::L4Ok, 0, String::new());
        };
        match timeout_at(deadline, http.request(stream, server)).await {
            Err(_) => {
                let info = format!("no response within {:?}", self.timeout);
                done(CheckResult::L7Timeout, 0, info)
            }
            Ok(Err(info)) => done(CheckResult::L7Response, 0, info),
            Ok(Ok(status)) => {
                let code = status.as_u16();
                let info = status.canonical_reason().unwrap_or("").to_string();
                if http.expect.contains(code) {
                    done(CheckResult::L7Ok, code, info)
                } else {
                    done(CheckResult::L7Status, code, info)
                }
            }
        }
    }
}

impl HttpCheck {
    /// Sends the check request on `stream` and returns the response
    /// status; the body is not read (the connection closes on drop).
    async fn request(
        &self,
        stream: net::Stream,
        server: &Addr,
    ) -> Result<hyper::StatusCode, String> {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let host = match (&self.host, server) {
            (Some(h), _) => h.clone(),
            (None, Addr::Tcp(sa)) => sa.to_string(),
            (None, Addr::Unix(_)) => "localhost".to_string(),
        };
        let request = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(header::HOST, host)
            .header(header::USER_AGENT, "proxy-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| e.to_string());
        let status = match request {
            Ok(request) => send
                .send_request(request)
                .await
                .map(|r| r.status())
                .map_err(|e| error_chain(&e)),
            Err(e) => Err(e),
        };
        driver.abort();
        status
    }
}

/// "Connection refused" rather than "Connection refused (os error 111)",
/// as HAProxy words it.
fn os_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::config::Config;

    fn probe(check: &str) -> Probe {
        let text = format!(
            "[global]\nname = \"unit\"\n[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:1\"]\n\
             backend = \"app\"\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n\
             [backend.check]\n{check}\n"
        );
        let cfg = Config::parse(&text, "unit.toml", &|_| None).expect("valid");
        let b = &cfg.backends[0];
        Probe::new(b.check.as_ref().unwrap(), b)
    }

    /// A server answering every connection with `response`, then closing.
    async fn server(response: &'static str) -> Addr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        Addr::Tcp(addr)
    }

    #[tokio::test]
    async fn tcp_and_http_outcomes() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            Addr::Tcp(l.local_addr().unwrap())
        };
        let tcp = probe("type = \"tcp\"\ntimeout = \"1s\"");
        let o = tcp.run(&closed).await;
        assert_eq!(o.result, CheckResult::L4Con, "{o:?}");
        assert_eq!(o.info, "Connection refused");

        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(tcp.run(&ok).await.result, CheckResult::L4Ok);

        let http = probe("type = \"http\"\npath = \"/health\"\ntimeout = \"1s\"");
        let o = http.run(&ok).await;
        assert_eq!((o.result, o.http_status), (CheckResult::L7Ok, 204), "{o:?}");

        let bad = server("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
        let o = http.run(&bad).await;
        assert_eq!(
            (o.result, o.http_status),
            (CheckResult::L7Status, 500),
            "{o:?}"
        );
        assert_eq!(o.info, "Internal Server Error");
        let only_500 = probe("type = \"http\"\nexpect_status = [500]\ntimeout = \"1s\"");
        assert_eq!(only_500.run(&bad).await.result, CheckResult::L7Ok);

        let garbage = server("SSH-2.0-OpenSSH\r\n").await;
        assert_eq!(http.run(&garbage).await.result, CheckResult::L7Response);

        // Accepts and never answers: the deadline covers the response.
        let silent = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = l.accept().await {
                    held.push(s);
                }
            });
            Addr::Tcp(addr)
        };
        let quick = probe("type = \"http\"\ntimeout = \"200ms\"");
        let o = quick.run(&silent).await;
        assert_eq!(o.result, CheckResult::L7Timeout, "{o:?}");
        assert!(o.duration < Duration::from_secs(1), "{o:?}");
    }
}
