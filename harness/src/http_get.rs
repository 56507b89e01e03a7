//! A blocking HTTP/1.1 GET from the calling thread (so from its network
//! namespace), for the stats listener: no runtime needed, every step
//! bounded by one deadline.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// A response read to its end.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on a new connection to `addr` (`Connection: close`),
/// bounded by `timeout` in all.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<HttpReply, String> {
    let deadline = Instant::now() + timeout;
    let sa: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: proxy-it\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| format!("GET {path}: write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "GET {path}: no complete response within {timeout:?}"
            ));
        }
        s.set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!("GET {path}: read: {e} (after {} bytes)", raw.len()));
            }
        }
    }
    parse_response(&raw).map_err(|e| format!("GET {path}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpReply, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len}"))?;
        if body.len() != len {
            return Err(format!(
                "body of {} bytes, Content-Length says {len}",
                body.len()
            ));
        }
    }
    Ok(HttpReply {
        status,
        headers,
        body: String::from_utf8(body).map_err(|e| format!("body not UTF-8: {e}"))?,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// [`http_get`] retried (every 20 ms) while it fails to connect or read,
/// until a 200 or `timeout`; panics with the last error. Returns the
/// reply and the errors of the attempts that failed first (a stats
/// socket closing during a handover may reset a connection still in its
/// queue).
pub fn http_get_ok(addr: &str, path: &str, timeout: Duration) -> (HttpReply, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut failed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match http_get(
            addr,
            path,
            left.clamp(Duration::from_millis(50), Duration::from_secs(5)),
        ) {
            Ok(r) if r.status == 200 => return (r, failed),
            Ok(r) => format!("status {}: {}", r.status, r.body),
            Err(e) => e,
        };
        failed.push(last.clone());
        assert!(
            Instant::now() < deadline,
            "GET http://{addr}{path}: no 200 within {timeout:?} ({} attempts); last: {last}",
            failed.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
