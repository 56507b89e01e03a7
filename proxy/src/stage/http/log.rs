//! One access line per HTTP request (target `access`), written when its
//! response has ended one way or another, with a termination code in the
//! spirit of HAProxy's: who ended it, and in which phase.
//!
//! | code | meaning |
//! |------|---------|
//! | `--` | normal end |
//! | `PR` | refused by the proxy (CONNECT, an upgrade it does not pass) |
//! | `SC` | no server could be connected to (502) |
//! | `SH` | the server failed before its response head (502) |
//! | `sH` | the server sent no response head within `server_timeout` (504) |
//! | `SD` | the server broke off the response body |
//! | `sD` | the server went silent in the body for `server_timeout` |
//! | `PD` | compressing the body failed |
//! | `CD` | the client went away before the body was sent |

use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::{Method, Version};

use super::{BodyError, HttpError, ProxyBody};

/// Longest path (with query) written to an access line, in bytes.
const MAX_PATH: usize = 512;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    Normal,
    ProxyRefused,
    ServerConnect,
    ServerHead,
    ServerHeadTimeout,
    ServerBody,
    ServerBodyTimeout,
    Compress,
    ClientAborted,
}

impl Termination {
    pub fn code(self) -> &'static str {
        match self {
            Self::Normal => "--",
            Self::ProxyRefused => "PR",
            Self::ServerConnect => "SC",
            Self::ServerHead => "SH",
            Self::ServerHeadTimeout => "sH",
            Self::ServerBody => "SD",
            Self::ServerBodyTimeout => "sD",
            Self::Compress => "PD",
            Self::ClientAborted => "CD",
        }
    }

    /// The termination of a request whose response head could not be had.
    pub fn of_head_error(e: &HttpError) -> Self {
        match e {
            HttpError::UpstreamConnect(_) => Self::ServerConnect,
            HttpError::ServerTimeout(_) => Self::ServerHeadTimeout,
            _ => Self::ServerHead,
        }
    }

    fn of_body_error(e: &BodyError) -> Self {
        match e {
            BodyError::Upstream(_) => Self::ServerBody,
            BodyError::UpstreamStalled(_) => Self::ServerBodyTimeout,
            BodyError::Compress(_) => Self::Compress,
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What the access lines of one downstream connection share. It lives in
/// the connection's shared state (one allocation for both); the listener
/// and generation its lines name come from the stage, through
/// [`LogHolder`].
pub struct ConnLog {
    /// Whether access lines are written (the listener's `access_log`, and
    /// the log filter lets them through).
    pub enabled: bool,
    /// The real client (from the socket or a PROXY header).
    pub client: Option<SocketAddr>,
    /// Requests whose response has not ended yet (HTTP/2: open streams), for
    /// the idle timeout.
    pub active: AtomicUsize,
    /// When `active` last dropped to 0, in ms ([`ConnLog::now_ms`]).
    pub idle_since_ms: AtomicU64,
    /// When a byte last went either way (HTTP/2 only), in ms.
    pub last_io_ms: AtomicU64,
    /// What its responses did, for the listener's counters.
    pub(super) counters: super::BodyCounters,
}

impl ConnLog {
    /// `access_log`: the listener's setting (the log filter has its say too).
    pub fn new(client: Option<SocketAddr>, access_log: bool) -> Self {
        let now = Self::now_ms();
        Self {
            enabled: access_log && tracing::enabled!(target: "access", tracing::Level::INFO),
            client,
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now),
            last_io_ms: AtomicU64::new(now),
            counters: Default::default(),
        }
    }

    /// Milliseconds since the process's first call: the clock of
    /// `idle_since_ms` and `last_io_ms` (one epoch for every connection,
    /// rather than 16 bytes of it in each).
    pub fn now_ms() -> u64 {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

/// What holds a connection's [`ConnLog`] for what outlives a borrow of it
/// (the access lines of its requests, its response bodies' counters,
/// HTTP/2's timers): the connection's shared state (`ConnState`).
pub trait LogHolder: Send + Sync + 'static {
    fn conn_log(&self) -> &ConnLog;
    /// The listener and generation its access lines name.
    fn listener(&self) -> (&str, u64);
}

/// One request's access line, filled in as it goes.
pub struct RequestLog {
    conn: Arc<dyn LogHolder>,
    start: Instant,
    version: Version,
    method: Method,
    path: String,
    pub status: u16,
    /// Time to the response head (from the server, or our own answer).
    pub head_after: Option<std::time::Duration>,
    pub server: Option<Arc<str>>,
    /// Request body bytes read from the client (shared with the body on its
    /// way upstream); `None` for a request without a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
    bytes_out: u64,
    pub termination: Termination,
}

impl RequestLog {
    pub fn start(
        conn: Arc<dyn LogHolder>,
        version: Version,
        method: &Method,
        target: &str,
    ) -> Self {
        let log = conn.conn_log();
        log.active.fetch_add(1, Relaxed);
        Self {
            start: Instant::now(),
            version,
            method: method.clone(),
            path: if log.enabled {
                escape_path(target)
            } else {
                String::new()
            },
            status: 0,
            head_after: None,
            server: None,
            bytes_in: None,
            bytes_out: 0,
            termination: Termination::Normal,
            conn,
        }
    }

    pub fn head_now(&mut self) {
        self.head_after = Some(self.start.elapsed());
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let c = self.conn.conn_log();
        if c.active.fetch_sub(1, Relaxed) == 1 {
            c.idle_since_ms.store(ConnLog::now_ms(), Relaxed);
        }
        if !c.enabled {
            return;
        }
        let (listener, generation) = self.conn.listener();
        let client = c.client.map_or_else(|| "-".to_string(), |a| a.to_string());
        let ttfb_ms = self.head_after.map_or(-1, |d| d.as_millis() as i64);
        tracing::info!(
            target: "access",
            client = %client,
            listener = %listener,
            generation,
            proto = ?self.version,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_in = self.bytes_in.as_ref().map_or(0, |n| n.load(Relaxed)),
            bytes_out = self.bytes_out,
            ttfb_ms,
            duration_ms = self.start.elapsed().as_millis() as u64,
            server = %self.server.as_deref().unwrap_or("-"),
            termination = %self.termination.code(),
        );
    }
}

/// `target` cut to [`MAX_PATH`] bytes, with bytes outside printable ASCII,
/// quotes and backslashes written as `\xHH`, so a line stays one line and
/// greppable whatever the client sent.
fn escape_path(target: &str) -> String {
    let mut out = String::with_capacity(target.len().min(MAX_PATH + 3));
    for b in target.bytes() {
        if out.len() >= MAX_PATH {
            out.push_str("...");
            break;
        }
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The response body handed to hyper: counts what goes to the client, and
/// writes the access line when it is dropped (ended, failed or abandoned).
pub struct Logged {
    inner: ProxyBody,
    log: RequestLog,
    ended: bool,
}

impl Logged {
    pub fn new(inner: ProxyBody, log: RequestLog) -> Self {
        Self {
            inner,
            log,
            ended: false,
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.log.termination = Termination::ClientAborted;
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended = true;
                this.log.termination = Termination::of_body_error(e);
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_and_bounded() {
        assert_eq!(escape_path("/a/b?c=d&e"), "/a/b?c=d&e");
        assert_eq!(escape_path("/q\"x\\y z"), "/q\\x22x\\x5cy\\x20z");
        assert_eq!(escape_path("/\u{e9}"), "/\\xc3\\xa9");
        let long = format!("/{}", "a".repeat(2000));
        let out = escape_path(&long);
        assert_eq!(out.len(), MAX_PATH + 3);
        assert!(out.ends_with("..."));
    }

    #[test]
    fn termination_codes_are_two_characters_and_distinct() {
        let all = [
            Termination::Normal,
            Termination::ProxyRefused,
            Termination::ServerConnect,
            Termination::ServerHead,
            Termination::ServerHeadTimeout,
            Termination::ServerBody,
            Termination::ServerBodyTimeout,
            Termination::Compress,
            Termination::ClientAborted,
        ];
        let codes: std::collections::BTreeSet<_> = all.iter().map(|t| t.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(codes.iter().all(|c| c.len() == 2));
    }
}
