//! HTTP mode of a listener: a reverse proxy built on hyper on both sides,
//! HTTP/1.1 or HTTP/2 towards the client, HTTP/1.1 towards the servers.
//!
//! Upstream connections are opened on demand and kept idle between requests,
//! shared by the stage's client connections ([`upstream`]).
//! Requests and responses are streamed (never buffered whole), hop-by-hop
//! headers are dropped in both directions, `X-Forwarded-For` carries the
//! real client, responses are gzip-compressed on the fly when the client,
//! the response and the settings all allow it, and every request gets its
//! access line ([`log`]).

use std::{
    convert::Infallible,
    error::Error as StdError,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use async_compression::{Level, tokio::bufread::GzipEncoder};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt, future::Either};
use http_body::Frame;
use http_body_util::{BodyDataStream, BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tokio_util::io::{ReaderStream, StreamReader};

use self::{
    headers::{
        ForwardedFor, accepts_gzip, add_vary_accept_encoding, compressible, mark_gzipped,
        set_forwarded_for, strip_hop_by_hop,
    },
    log::{LogHolder, Logged, RequestLog, Termination},
    upstream::{Sent, UpstreamBody},
};
use super::socket::ReadReady;
use crate::config::{CompressionConfig, Http2Config};

mod h2;
pub mod headers;
pub mod log;
mod park;
pub mod upgrade;
mod upstream;

pub use h2::Flood;
pub use log::ConnLog;
pub use upstream::{Connected, IdlePool, Upstream};

/// gzip settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// gzip level, 1 (fastest) ..= 9 (smallest); out-of-range values are clamped.
    pub level: u32,
    /// Responses whose Content-Length is below this are sent as they are.
    pub min_size: u64,
    /// Media types (without parameters, matched case-insensitively) worth compressing.
    pub types: Vec<String>,
}

impl From<&CompressionConfig> for Compression {
    fn from(c: &CompressionConfig) -> Self {
        Self {
            level: c.level,
            min_size: c.min_size,
            types: c.types.clone(),
        }
    }
}

/// Settings of the HTTP mode of a listener, built once per stage and shared
/// by its connections.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `None` turns compression off.
    pub compression: Option<Compression>,
    /// How long the downstream client may take to send a request head
    /// (hyper also applies it while a keep-alive connection waits for the
    /// next one; an HTTP/2 connection without a stream is closed after it).
    pub header_read_timeout: Duration,
    /// The longest request head; longer ones are answered 431 (HTTP/2: the
    /// header list size we announce).
    pub max_header_size: usize,
    /// How long the server may take to start its response (504 after it),
    /// and the longest silence in a response body (cut after it).
    pub server_timeout: Duration,
    /// HTTP/2: how long streams may wait on a client that moves no byte.
    /// (HTTP/1 has the same limit on blocked writes around the connection.)
    pub client_timeout: Duration,
    /// Limits of HTTP/2 client connections.
    pub http2: Http2Config,
    /// Connections upgraded by a 101 (WebSocket...): idle limit, drain
    /// deadline, counters.
    pub tunnel: upgrade::TunnelSettings,
    /// The listener and generation the access lines name.
    pub listener: Arc<str>,
    pub generation: u64,
    /// hyper's HTTP/1 server settings, made from the above on first use.
    pub http1: Http1Builder,
    /// The waits of the stage's parked HTTP/1 connections.
    pub parked: park::ParkedWaits,
}

/// hyper's HTTP/1 server settings, made once per stage and shared by its
/// connections: one timer `Arc` per stage, not one per connection. A clone
/// starts empty, so that a copy with other settings never serves with the
/// old ones.
#[derive(Debug, Default)]
pub struct Http1Builder(OnceLock<hyper::server::conn::http1::Builder>);

impl Clone for Http1Builder {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl HttpSettings {
    fn http1(&self) -> &hyper::server::conn::http1::Builder {
        self.http1.0.get_or_init(|| {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .keep_alive(true)
                // A client that sends its request and shuts down its write
                // side still gets the answer.
                .half_close(true)
                .max_buf_size(self.max_header_size.max(8192))
                .timer(TokioTimer::new())
                .header_read_timeout(self.header_read_timeout);
            builder
        })
    }
}

/// What the client speaks, as ALPN (ours, or a previous stage's) said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// HTTP/2 when the negotiated ALPN protocol is `h2`.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(b"h2") => Self::Http2,
            _ => Self::Http1,
        }
    }
}

/// Who is on the other end of one downstream connection.
pub struct Downstream {
    /// Sent upstream in `X-Forwarded-For`; `None` leaves that header as the
    /// client sent it (a PROXY header carries the client instead).
    pub forwarded_for: Option<SocketAddr>,
    pub protocol: Protocol,
    /// What its access lines share (the real client, its counters).
    pub log: ConnLog,
    /// Where its idle upstream connections wait: the stage's, shared by its
    /// clients, or its own.
    pub idle: Arc<IdlePool>,
}

impl Downstream {
    /// An HTTP/1 client connection with its own idle server connections and
    /// no access lines (tests and tools).
    pub fn http1(forwarded_for: Option<SocketAddr>) -> Self {
        Self {
            forwarded_for,
            protocol: Protocol::Http1,
            log: ConnLog::new(forwarded_for, false),
            idle: Arc::new(IdlePool::new(1, 8, Duration::from_secs(5))),
        }
    }
}

/// What one downstream connection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnStats {
    /// Requests answered, including the 502s and other local answers.
    pub requests: u64,
    /// Responses with a 5xx status (the server's, or our 502/504).
    pub server_errors: u64,
    /// Upstream connections opened (1 when keep-alive held all the way).
    pub upstream_connects: u64,
    /// Responses sent gzip-compressed.
    pub compressed_responses: u64,
    /// Response body bytes as received from the upstream server.
    pub body_bytes_before: u64,
    /// Response body bytes as handed to the downstream client (after gzip where applied).
    pub body_bytes_after: u64,
}

impl ConnStats {
    /// `body_bytes_after / body_bytes_before` over all responses, `None` before any body byte.
    pub fn compression_ratio(&self) -> Option<f64> {
        (self.body_bytes_before > 0)
            .then(|| self.body_bytes_after as f64 / self.body_bytes_before as f64)
    }
}

/// Why an HTTP connection (or one of its requests) failed: which side failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("downstream client: no complete request head within {0:?}")]
    HeaderTimeout(Duration),
    #[error("downstream client: {0}")]
    Downstream(#[source] hyper::Error),
    #[error("downstream client: HTTP/2 flood, connection closed: {0}")]
    Flood(Flood),
    #[error("downstream client: no byte moved for {0:?} with streams open (client_timeout)")]
    ClientStalled(Duration),
    #[error("upstream server: cannot connect: {0}")]
    UpstreamConnect(#[source] io::Error),
    #[error("upstream server: HTTP handshake: {0}")]
    UpstreamHandshake(#[source] hyper::Error),
    #[error("upstream server: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream server: no response within {0:?} (server_timeout)")]
    ServerTimeout(Duration),
    /// The response head was already sent downstream, so the only way left
    /// to report it was to cut the downstream connection.
    #[error("upstream server: response body broke off after the head was sent: {0}")]
    UpstreamBody(String),
    #[error("compressing the response body for the downstream client: {0}")]
    Compress(String),
    /// After a 101: the tunnel failed or idled out (it names the side).
    #[error("{0}")]
    Tunnel(#[from] upgrade::TunnelError),
}

/// Error of the response bodies handed to hyper; it comes back (inside a
/// `hyper::Error`) when a body fails, and tells which side it was.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream server: reading the response body: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream server: no byte of the response body for {0:?} (server_timeout)")]
    UpstreamStalled(Duration),
    #[error("gzip: {0}")]
    Compress(#[source] io::Error),
}

type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

/// The client's request body on its way upstream, counted for the access
/// line when there is one.
pub struct RequestBody {
    /// `None`: no body (a request repeated on another connection).
    inner: Option<Incoming>,
    read: Option<Arc<AtomicU64>>,
}

impl RequestBody {
    fn empty() -> Self {
        Self {
            inner: None,
            read: None,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(read)) = (&polled, &this.read)
            && let Some(data) = frame.data_ref()
        {
            add(read, data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Serves one downstream connection until the client closes it, an error
/// cuts it, or a draining generation answered its last request (HTTP/1) or
/// finished the streams its GOAWAY let in (HTTP/2).
///
/// Not an `async fn`: one would keep its arguments for its whole life,
/// beside hyper's connection that took them, and every idle keep-alive
/// client would hold both. The connection is built first; the future holds
/// it and two `Arc`s.
pub fn serve<IO, U>(
    io: IO,
    upstream: U,
    settings: Arc<HttpSettings>,
    downstream: Downstream,
    draining: watch::Receiver<bool>,
) -> impl Future<Output = Result<ConnStats, HttpError>> + Send
where
    IO: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    U: Upstream,
{
    let shared = Arc::new(ConnState {
        upstream,
        settings: settings.clone(),
        forwarded_for: downstream.forwarded_for.map(ForwardedFor::new),
        draining: draining.clone(),
        idle: downstream.idle.clone(),
        log: downstream.log,
        protocol: downstream.protocol,
        tunnel: Default::default(),
    });
    // The request's future is boxed: hyper keeps a slot of the service
    // future's size for the whole connection, and ours is about 2.6 KiB,
    // which every idle keep-alive client would hold.
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            Box::pin(async move { Ok::<_, Infallible>(shared.handle(req).await) })
        })
    };
    match downstream.protocol {
        Protocol::Http2 => {
            let log: Arc<dyn LogHolder> = shared.clone();
            let served = Box::pin(async move {
                h2::serve(
                    io,
                    service,
                    &settings.http2,
                    settings.max_header_size,
                    h2::Timeouts {
                        idle: settings.header_read_timeout,
                        stall: settings.client_timeout,
                    },
                    log,
                    draining,
                )
                .await
            });
            Either::Left(served.map(move |done| done.map(|()| shared.log.counters.snapshot())))
        }
        // No graceful_shutdown() on draining: an idle keep-alive connection
        // stays open (closing it could race with a request the client is
        // sending); the next response carries `Connection: close`, which
        // makes hyper close the connection once that response is written.
        //
        // `then`, not an async block awaiting it: the connection's future
        // is not `Unpin`, and an async block would keep a second slot of
        // its size.
        Protocol::Http1 => {
            let header_read_timeout = settings.header_read_timeout;
            Either::Right(
                Http1::new(io, service, settings).then(move |result| async move {
                    // Upgrade hook: after a 101 the connection is a tunnel
                    // (upgrade.rs), done only when the tunnel is.
                    let tunnel = shared
                        .tunnel
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let (Ok(_), Some(tunnel)) = (&result, tunnel) {
                        let end = tunnel.await?;
                        tracing::debug!(?end, "upgraded tunnel ended");
                    }
                    let stats = shared.log.counters.snapshot();
                    match result {
                        Ok(Http1End::Closed) => Ok(stats),
                        // The wait for a request (hyper's header timer, or ours
                        // while parked) is also the keep-alive timeout: after at
                        // least one request that is the usual end of an idle
                        // connection, not a failure.
                        Ok(Http1End::IdleTimeout) if stats.requests > 0 => Ok(stats),
                        Ok(Http1End::IdleTimeout) => {
                            Err(HttpError::HeaderTimeout(header_read_timeout))
                        }
                        Err(e) if e.is_timeout() && stats.requests > 0 => Ok(stats),
                        Err(e) if e.is_timeout() => {
                            Err(HttpError::HeaderTimeout(header_read_timeout))
                        }
                        Err(e) => Err(classify_server_error(e)),
                    }
                }),
            )
        }
    }
}

/// How an HTTP/1 connection ended without error.
enum Http1End {
    /// Closed by either side, or handed to a 101's tunnel.
    Closed,
    /// No request came within `header_read_timeout` while it was parked.
    IdleTimeout,
}

type Http1Conn<IO, S> = hyper::server::conn::http1::UpgradeableConnection<TokioIo<IO>, S>;

pin_project_lite::pin_project! {
    /// Serves HTTP/1 on one connection to its end.
    ///
    /// On a stream that tells when it is readable, a connection that has
    /// waited [`PARK_AFTER`] for a request of which nothing has arrived is
    /// parked: hyper's connection (about 700 bytes, its header timer and
    /// ours) is taken apart, and the task holds only the stream, the service
    /// and its entry in the stage's parked waits until the client sends
    /// again, the way nginx keeps an idle keep-alive client. The wait is
    /// bounded by `header_read_timeout`, as hyper's timer bounds it
    /// otherwise; hyper's timer starts with the request's first bytes.
    ///
    /// A future written out rather than an `async fn`: the compiler's one
    /// kept the stream and hyper's parts twice (384 bytes against 200).
    struct Http1<IO, S>
    where
        S: hyper::service::HttpService<Incoming>,
    {
        settings: Arc<HttpSettings>,
        state: Http1State<IO, S>,
    }
}

pin_project_lite::pin_project! {
    /// What a connection holds while hyper serves it, boxed: a parked
    /// connection's task keeps no room for it.
    struct Serving<IO, S>
    where
        S: hyper::service::HttpService<Incoming>,
    {
        // `None` only while it is taken apart.
        conn: Option<Http1Conn<IO, S>>,
        // Waiting since the last request for PARK_AFTER to pass.
        lingering: bool,
        #[pin]
        linger: tokio::time::Sleep,
    }
}

/// How long an HTTP/1 connection waits for its next request with hyper's
/// state before it is parked (`Http1`). A client sending one request after
/// another keeps it: taking hyper's connection apart and making it again
/// would add hyper's set-up and a 700-byte allocation to each request. The
/// price: the clients that arrived within it hold hyper's state together
/// (1,000 arriving at once, 700 KB for 100 ms). With 10 ms, connections of
/// the bench's slower load rows parked between their requests, and the
/// peak RSS after those rows went from 11.0–11.6 MB to 12.3–15.5 (4 runs).
///
/// The unit tests wait longer, so that a loaded machine does not park a
/// connection between their quick requests.
const PARK_AFTER: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_millis(100)
};

/// A stream `Http1` serves.
trait Http1Io: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static> Http1Io for T {}

type BoxError = Box<dyn StdError + Send + Sync>;

/// A service hyper's HTTP/1 server can serve (hyper's own bounds).
trait Http1Service:
    hyper::service::HttpService<
        Incoming,
        Error: Into<BoxError>,
        ResBody: hyper::body::Body<Error: Into<BoxError>> + 'static,
    >
{
}

impl<S> Http1Service for S where
    S: hyper::service::HttpService<
            Incoming,
            Error: Into<BoxError>,
            ResBody: hyper::body::Body<Error: Into<BoxError>> + 'static,
        >
{
}

enum Http1State<IO, S: hyper::service::HttpService<Incoming>> {
    Serving(Pin<Box<Serving<IO, S>>>),
    Parked {
        io: IO,
        service: S,
        wait: park::ParkedWait,
    },
    Done,
}

impl<IO: Http1Io, S: Http1Service> Http1<IO, S> {
    fn new(io: IO, service: S, settings: Arc<HttpSettings>) -> Self {
        Self {
            state: Http1State::Serving(Self::connect(&settings, io, service)),
            settings,
        }
    }

    /// Hyper's connection on `io`, with the timer of its waits.
    fn connect(settings: &HttpSettings, io: IO, service: S) -> Pin<Box<Serving<IO, S>>> {
        // Upgrade hook: hyper hands the connection to a 101's tunnel.
        let mut conn = settings
            .http1()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if IO::TELLS {
            conn.park_when_idle();
        }
        Box::pin(Serving {
            conn: Some(conn),
            lingering: false,
            linger: tokio::time::sleep(settings.header_read_timeout),
        })
    }
}

impl<IO: Http1Io, S: Http1Service> Future for Http1<IO, S> {
    type Output = hyper::Result<Http1End>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        loop {
            match this.state {
                Http1State::Serving(serving) => {
                    let serving = serving.as_mut().project();
                    let conn = serving.conn.as_mut().expect("a serving connection");
                    match conn.poll_idle(cx) {
                        Poll::Pending => {
                            *serving.lingering = false;
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(true)) => {}
                        Poll::Ready(Ok(false)) => {
                            *this.state = Http1State::Done;
                            return Poll::Ready(Ok(Http1End::Closed));
                        }
                        Poll::Ready(Err(e)) => {
                            *this.state = Http1State::Done;
                            return Poll::Ready(Err(e));
                        }
                    }
                    // Idle: hyper waits for the next bytes; so does the
                    // timer, for PARK_AFTER. (A reset to a later deadline
                    // costs the timer wheel nothing until it fires.)
                    // Never past the wait's end, however short the timeout.
                    let linger = PARK_AFTER.min(this.settings.header_read_timeout);
                    let mut timer = serving.linger;
                    if !*serving.lingering {
                        *serving.lingering = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + linger);
                    }
                    std::task::ready!(timer.poll(cx));
                    let parts = serving
                        .conn
                        .take()
                        .expect("a serving connection")
                        .into_parts()
                        .expect("an idle connection was not upgraded");
                    let rest = this.settings.header_read_timeout - linger;
                    *this.state = Http1State::Parked {
                        io: parts.io.into_inner(),
                        service: parts.service,
                        wait: this.settings.parked.start(rest, cx),
                    };
                }
                Http1State::Parked { io, wait, .. } => {
                    // An error shows up on hyper's first read.
                    if io.poll_read_ready(cx).is_ready() {
                        let Http1State::Parked { io, service, .. } =
                            std::mem::replace(this.state, Http1State::Done)
                        else {
                            unreachable!("matched above")
                        };
                        *this.state =
                            Http1State::Serving(Self::connect(this.settings, io, service));
                        continue;
                    }
                    std::task::ready!(wait.poll_ended(cx));
                    // Closes the connection.
                    *this.state = Http1State::Done;
                    return Poll::Ready(Ok(Http1End::IdleTimeout));
                }
                Http1State::Done => panic!("HTTP/1 connection polled after its end"),
            }
        }
    }
}

/// Tells apart a response body that failed on our side of hyper (upstream or
/// gzip), a flood our HTTP/2 guard stopped, and a failure of the downstream
/// client itself.
fn classify_server_error(e: hyper::Error) -> HttpError {
    let mut next: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = next {
        if let Some(body) = err.downcast_ref::<BodyError>() {
            return match body {
                BodyError::Upstream(inner) => HttpError::UpstreamBody(error_chain(inner)),
                stalled @ BodyError::UpstreamStalled(_) => {
                    HttpError::UpstreamBody(stalled.to_string())
                }
                BodyError::Compress(inner) => HttpError::Compress(error_chain(inner)),
            };
        }
        // io::Error hides a custom error from source(): look inside.
        if let Some(flood) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Flood>())
        {
            return HttpError::Flood(flood.clone());
        }
        next = err.source();
    }
    HttpError::Downstream(e)
}

fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// A connection's counters, shared with its response bodies (they live in
/// its [`ConnLog`]).
#[derive(Clone)]
struct Counters(Arc<dyn LogHolder>);

impl std::ops::Deref for Counters {
    type Target = BodyCounters;
    fn deref(&self) -> &BodyCounters {
        &self.0.conn_log().counters
    }
}

#[derive(Default)]
struct BodyCounters {
    requests: AtomicU64,
    server_errors: AtomicU64,
    upstream_connects: AtomicU64,
    compressed_responses: AtomicU64,
    body_bytes_before: AtomicU64,
    body_bytes_after: AtomicU64,
}

impl BodyCounters {
    fn snapshot(&self) -> ConnStats {
        ConnStats {
            requests: self.requests.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            upstream_connects: self.upstream_connects.load(Ordering::Relaxed),
            compressed_responses: self.compressed_responses.load(Ordering::Relaxed),
            body_bytes_before: self.body_bytes_before.load(Ordering::Relaxed),
            body_bytes_after: self.body_bytes_after.load(Ordering::Relaxed),
        }
    }
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

struct ConnState<U> {
    upstream: U,
    settings: Arc<HttpSettings>,
    /// The real client (from the socket or a PROXY v2 header), sent upstream
    /// in `X-Forwarded-For`; `None` leaves that header as the client sent it.
    forwarded_for: Option<ForwardedFor>,
    draining: watch::Receiver<bool>,
    /// Upstream connections between two requests.
    idle: Arc<IdlePool>,
    /// Here rather than in an `Arc` of its own: one allocation per
    /// connection for both.
    log: ConnLog,
    protocol: Protocol,
    /// The tunnel after a 101, run by `serve` once hyper lets go.
    tunnel: upgrade::TunnelSlot,
}

impl<U: Upstream> LogHolder for ConnState<U> {
    fn conn_log(&self) -> &ConnLog {
        &self.log
    }

    fn listener(&self) -> (&str, u64) {
        (&self.settings.listener, self.settings.generation)
    }
}

impl<U: Upstream> ConnState<U> {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Logged> {
        let earlier = self.log.counters.requests.fetch_add(1, Ordering::Relaxed);
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut log = RequestLog::start(self.clone(), req.version(), req.method(), target);
        // Upgrade hook (upgrade.rs): an HTTP/1.1 upgrade request keeps its
        // Upgrade header upstream; a 101 answer makes the connection a tunnel.
        let upgrade = match self.protocol {
            Protocol::Http1 => upgrade::Requested::take(&mut req),
            Protocol::Http2 => None,
        };
        let is_head = req.method() == Method::HEAD;
        // Like nginx and HAProxy, no gzip for HTTP/1.0 clients: they would
        // get it delimited by the connection close.
        let client_gzip = req.version() >= Version::HTTP_11 && accepts_gzip(req.headers());
        let mut resp = if req.method() == Method::CONNECT {
            log.termination = Termination::ProxyRefused;
            text_response(
                StatusCode::NOT_IMPLEMENTED,
                "501 Not Implemented: CONNECT is not proxied\n",
            )
        } else {
            let limit = self.settings.server_timeout;
            let (mut req, read) = self.upstream_request(req);
            if let Some(upgrade) = &upgrade {
                upgrade.forward(req.headers_mut());
            }
            log.bytes_in = read;
            if earlier > 0 {
                // See `defer_upstream_write`.
                defer_upstream_write().await;
            }
            let sending = upstream::send(&self.upstream, &self.idle, req);
            let sent = tokio::time::timeout(limit, sending).await;
            match sent.unwrap_or(Err(HttpError::ServerTimeout(limit))) {
                Ok(sent) if sent.response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    log.server = Some(sent.conn.name.clone());
                    self.switch(upgrade, sent)
                }
                Ok(sent) => {
                    log.server = Some(sent.conn.name.clone());
                    // Dropping `upgrade` tells hyper that no upgrade comes.
                    drop(upgrade);
                    self.downstream_response(sent, is_head, client_gzip)
                }
                Err(e) => {
                    log.termination = Termination::of_head_error(&e);
                    if let HttpError::ServerTimeout(_) = e {
                        tracing::warn!(error = %e, "answering 504");
                        text_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "504 Gateway Timeout: the server did not answer in time\n",
                        )
                    } else {
                        tracing::warn!(error = %e, "answering 502");
                        text_response(
                            StatusCode::BAD_GATEWAY,
                            "502 Bad Gateway: upstream server failed\n",
                        )
                    }
                }
            }
        };
        log.head_now();
        log.status = resp.status().as_u16();
        if resp.status().is_server_error() {
            self.log
                .counters
                .server_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        // HTTP/2 drains with GOAWAY instead (and has no Connection header); a
        // 101 keeps its `Connection: upgrade` (the tunnel closes with the drain).
        if self.protocol == Protocol::Http1
            && *self.draining.borrow()
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, Logged::new(body, log))
    }

    /// Turns the downstream request into the one sent upstream, and gives
    /// the counter of its body bytes (none for a request without a body).
    fn upstream_request(
        &self,
        req: Request<Incoming>,
    ) -> (Request<RequestBody>, Option<Arc<AtomicU64>>) {
        let (mut parts, body) = req.into_parts();
        // Absolute-form (a client talking to us as to a forward proxy), and
        // HTTP/2's :authority, become origin-form with a Host header when
        // the client sent none.
        if let Some(authority) = parts.uri.authority()
            && !parts.headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
            let mut uri = hyper::http::uri::Parts::default();
            uri.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
            );
            parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        }
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(ip) = &self.forwarded_for {
            set_forwarded_for(&mut parts.headers, ip);
        }
        let read = (!http_body::Body::is_end_stream(&body)).then(|| Arc::new(AtomicU64::new(0)));
        let body = RequestBody {
            inner: Some(body),
            read: read.clone(),
        };
        (Request::from_parts(parts, body), read)
    }

    /// A 101: the client connection becomes a tunnel to the server's
    /// (upgrade.rs); that server connection is never reused.
    fn switch(&self, upgrade: Option<upgrade::Requested>, sent: Sent) -> Response<ProxyBody> {
        let Sent {
            response,
            mut conn,
            connected,
        } = sent;
        if connected {
            self.log
                .counters
                .upstream_connects
                .fetch_add(1, Ordering::Relaxed);
        }
        conn.detach();
        let answer = upgrade::switch(upgrade, response, &self.tunnel, &self.settings.tunnel);
        // The server connection's task hands its socket to the tunnel: it
        // must live until then.
        let mut slot = self.tunnel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tunnel) = slot.take() {
            *slot = Some(Box::pin(async move {
                let end = tunnel.await;
                drop(conn);
                end
            }));
        }
        answer
    }

    fn downstream_response(
        self: &Arc<Self>,
        sent: Sent,
        is_head: bool,
        client_gzip: bool,
    ) -> Response<ProxyBody> {
        let Sent {
            response,
            conn,
            connected,
        } = sent;
        if connected {
            self.log
                .counters
                .upstream_connects
                .fetch_add(1, Ordering::Relaxed);
        }
        let (mut parts, body) = response.into_parts();
        let body = UpstreamBody::new(body, self.settings.server_timeout, conn, self.idle.clone());
        parts.version = match self.protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::Http2 => Version::HTTP_2,
        };
        strip_hop_by_hop(&mut parts.headers);
        let counters = Counters(self.clone());
        let level = match &self.settings.compression {
            // HEAD gets the headers GET would (a cache keyed on HEAD must not
            // be misled), with the body it has: none.
            Some(c) if compressible(c, parts.status, &parts.headers) => {
                add_vary_accept_encoding(&mut parts.headers);
                client_gzip.then_some(c.level)
            }
            _ => None,
        };
        if level.is_some() {
            mark_gzipped(&mut parts.headers);
        }
        let body = match level {
            Some(level) if !is_head => {
                counters
                    .compressed_responses
                    .fetch_add(1, Ordering::Relaxed);
                gzip_body(body, level, counters)
            }
            _ => body
                .map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        add(&counters.body_bytes_before, data.len());
                        add(&counters.body_bytes_after, data.len());
                    }
                    frame
                })
                .boxed_unsync(),
        };
        Response::from_parts(parts, body)
    }
}

/// Lets the other connections that are ready in this round of the runtime
/// read their requests before this one writes its request upstream.
///
/// Without it, each request went from the client's socket to the server's in
/// one go (hyper wakes the upstream connection's task, and tokio runs a task
/// woken that way next), so a busy worker wrote one request upstream between
/// two of its reads. A server on the same host woke for nearly every request
/// (0.64 wake-ups per request on a keep-alive load like the bench's, against
/// 0.25-0.29 for HAProxy and nginx, whose event loops read what is ready
/// before they write), and every wake-up is two context switches. Deferred
/// until the runtime has polled its sockets once more, the writes of a round
/// go out together: 0.38-0.41 wake-ups per request, 6-12% less CPU per
/// request in interleaved runs. Only a connection's later requests wait: with
/// a new connection per request, deferring bought no batching and cost about
/// 4% more CPU per request (interleaved runs, 7 of 8 pairs worse).
///
/// Measured again once upstream connections were driven by the client task
/// (one thread, interleaved pairs): the proxy was preempted 0.41-0.50 times
/// per keep-alive request with the deferral and 0.67-0.70 without (4 pairs);
/// deferring the first request of a connection too took `Connection: close`
/// from 0.77-0.81 to 0.72-0.78 with CPU per request no better (3 of 5 pairs
/// worse), so that stays off. What is left: a deferred write still wakes the
/// server, and when the server is owed CPU the scheduler (EEVDF) runs it at
/// once, so a round's writes can each cost two switches (scheduler traces:
/// the origin then answers one request per wake-up). nginx and HAProxy see
/// the same, less often: 0.23-0.28 preemptions per request.
async fn defer_upstream_write() {
    tokio::task::yield_now().await;
}

/// Bodies of a known length up to this are gzipped in one go once they have
/// all arrived; longer ones, and those of unknown length, as a stream.
const GZIP_WHOLE_MAX: u64 = 128 * 1024;

/// gzip over the upstream body. A deflate encoder holds about 300 KiB while
/// it lives, so a small body of known length is collected and compressed in
/// one call (its encoder lives for that call only: concurrent responses do
/// not each hold one); any other body streams through its own encoder.
fn gzip_body(body: UpstreamBody, level: u32, counters: Counters) -> ProxyBody {
    match http_body::Body::size_hint(&body).exact() {
        Some(len) if len <= GZIP_WHOLE_MAX => gzip_whole(body, level, counters),
        _ => gzip_stream(body, level, counters),
    }
}

fn gzip_whole(body: UpstreamBody, level: u32, counters: Counters) -> ProxyBody {
    let compressed = async move {
        let input = body.collect().await?.to_bytes();
        add(&counters.body_bytes_before, input.len());
        let out = gzip_at_once(&input, level).map_err(BodyError::Compress)?;
        add(&counters.body_bytes_after, out.len());
        Ok(Frame::data(Bytes::from(out)))
    };
    StreamBody::new(futures_util::stream::once(compressed)).boxed_unsync()
}

thread_local! {
    /// The deflate encoder of this thread's one-go gzips, reset after each:
    /// made anew every time, its 300 KiB would be allocated, zeroed and
    /// given back to the system (a trim of the heap) for every response.
    static DEFLATE: std::cell::RefCell<Option<(u32, flate2::Compress)>> =
        const { std::cell::RefCell::new(None) };
}

/// `input` as a whole gzip member (RFC 1952): header, raw deflate, CRC-32
/// and length.
fn gzip_at_once(input: &[u8], level: u32) -> io::Result<Vec<u8>> {
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let level = level.clamp(1, 9);
    let mut out = Vec::with_capacity(input.len() / 4 + 64);
    out.extend_from_slice(&HEADER);
    DEFLATE.with_borrow_mut(|slot| {
        let deflate = match slot {
            Some((l, deflate)) if *l == level => deflate,
            _ => {
                let made = flate2::Compress::new(flate2::Compression::new(level), false);
                &mut slot.insert((level, made)).1
            }
        };
        let result = deflate_all(deflate, input, &mut out);
        deflate.reset();
        result
    })?;
    let mut crc = flate2::Crc::new();
    crc.update(input);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    Ok(out)
}

fn deflate_all(deflate: &mut flate2::Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let start = deflate.total_in();
    loop {
        let consumed = (deflate.total_in() - start) as usize;
        match deflate.compress_vec(&input[consumed..], out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return Ok(()),
            // The output is full: room for as much again.
            Ok(_) => out.reserve(out.capacity().max(1024)),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// gzip over the upstream body as a stream: one upstream chunk and the
/// encoder's window in memory at a time. The encoder flushes whenever the
/// upstream has nothing more yet, so slow streams are not held back.
fn gzip_stream(body: UpstreamBody, level: u32, counters: Counters) -> ProxyBody {
    let before = counters.clone();
    let input = BodyDataStream::new(body).map(move |chunk| match chunk {
        Ok(data) => {
            add(&before.body_bytes_before, data.len());
            Ok(data)
        }
        Err(e) => Err(io::Error::other(e)),
    });
    let level = Level::Precise(level.clamp(1, 9) as i32);
    let encoder = GzipEncoder::with_quality(StreamReader::new(input), level);
    let output = ReaderStream::with_capacity(encoder, 16 * 1024).map(move |chunk| match chunk {
        Ok(data) => {
            add(&counters.body_bytes_after, data.len());
            Ok(Frame::data(data))
        }
        // An upstream failure travels through the encoder as an io::Error;
        // unwrap it so the report names the upstream, not gzip.
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<BodyError>()) => {
            match e.into_inner().map(|inner| inner.downcast::<BodyError>()) {
                Some(Ok(inner)) => Err(*inner),
                _ => unreachable!("checked to be a BodyError"),
            }
        }
        Err(e) => Err(BodyError::Compress(e)),
    });
    StreamBody::new(output).boxed_unsync()
}

fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
    };

    use hyper::{HeaderMap, body::Body, http::response::Parts};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::{mpsc, oneshot},
        task::JoinHandle,
        time::timeout,
    };

    use super::*;

    /// The stage's settings and one connection's client address, as the
    /// tests vary them together.
    #[derive(Clone)]
    struct HttpSettings {
        compression: Option<Compression>,
        client_addr: Option<SocketAddr>,
        header_read_timeout: Duration,
        max_header_size: usize,
        server_timeout: Duration,
    }

    impl HttpSettings {
        fn split(self) -> (Arc<super::HttpSettings>, Option<SocketAddr>) {
            let settings = super::HttpSettings {
                compression: self.compression,
                header_read_timeout: self.header_read_timeout,
                max_header_size: self.max_header_size,
                server_timeout: self.server_timeout,
                client_timeout: LONG,
                http2: Http2Config::default(),
                tunnel: Default::default(),
                listener: Arc::from("-"),
                generation: 0,
                http1: Default::default(),
                parked: Default::default(),
            };
            (Arc::new(settings), self.client_addr)
        }
    }

    type TestBody = UnsyncBoxBody<Bytes, io::Error>;

    const LONG: Duration = Duration::from_secs(10);
    const CLIENT: &str = "203.0.113.7:40000";

    fn full(data: impl Into<Bytes>) -> TestBody {
        Full::new(data.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync()
    }

    /// A body of `data` in 64 KiB frames with no length announced.
    fn chunked(data: impl Into<Bytes>) -> TestBody {
        let data: Bytes = data.into();
        let frames: Vec<Result<Frame<Bytes>, io::Error>> = (0..data.len())
            .step_by(64 * 1024)
            .map(|at| Ok(Frame::data(data.slice(at..data.len().min(at + 64 * 1024)))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    /// Compressible text: one sentence over and over.
    fn text(len: usize) -> Vec<u8> {
        b"The quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    /// Text where every line differs, so a misplaced byte shows.
    fn numbered(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut line = 0u64;
        while out.len() < len {
            out.extend_from_slice(format!("line {line:09} of a long streamed body\n").as_bytes());
            line += 1;
        }
        out.truncate(len);
        out
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
        parts.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn settings() -> HttpSettings {
        HttpSettings {
            compression: Some(Compression {
                level: 6,
                min_size: 1024,
                types: vec![
                    "text/html".into(),
                    "Text/Plain".into(),
                    "application/json".into(),
                ],
            }),
            client_addr: Some(CLIENT.parse().unwrap()),
            header_read_timeout: Duration::from_secs(5),
            max_header_size: 16 * 1024,
            server_timeout: Duration::from_secs(5),
        }
    }

    /// An HTTP server on 127.0.0.1 standing for the upstream.
    struct Origin {
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for Origin {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start_origin<F, Fut>(handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            addr,
            accepts,
            task,
        }
    }

    /// The test upstream, steered by `x-*` request headers: `x-len`,
    /// `x-body: numbered`, `x-chunked`, `x-ct` (`none` for no Content-Type),
    /// `x-status`, `x-ce`, `x-cc`, `x-vary`, `x-etag`, `x-close`, `x-up-hop`.
    /// It reports what it received in `x-seen-headers`, `x-seen-xff`,
    /// `x-seen-uri` and `x-seen-host`;
    /// `/echo` sends the request body back.
    async fn origin_default(req: Request<Incoming>) -> Response<TestBody> {
        let h = req.headers().clone();
        let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
        let seen: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        let seen = seen.join(",");
        let xff: Vec<&str> = h
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        let xff = xff.join(" | ");
        let uri = req.uri().to_string();
        let mut resp = if req.uri().path() == "/echo" {
            Response::new(req.into_body().map_err(io::Error::other).boxed_unsync())
        } else {
            let status = get("x-status").map_or(200, |s| s.parse().unwrap());
            let len = get("x-len").map_or(10_000, |s| s.parse().unwrap());
            let data = match get("x-body").as_deref() {
                Some("numbered") => numbered(len),
                _ => text(len),
            };
            let body = if status == 204 || status == 304 {
                full(Bytes::new())
            } else if get("x-chunked").is_some() {
                chunked(data)
            } else {
                full(data)
            };
            let mut resp = Response::new(body);
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            match get("x-ct").as_deref() {
                Some("none") => {}
                Some(ct) => {
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, ct.parse().unwrap());
                }
                None => {
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                }
            }
            for (from, to) in [
                ("x-ce", header::CONTENT_ENCODING),
                ("x-cc", header::CACHE_CONTROL),
                ("x-vary", header::VARY),
                ("x-etag", header::ETAG),
            ] {
                if let Some(v) = get(from) {
                    resp.headers_mut().insert(to, v.parse().unwrap());
                }
            }
            resp
        };
        let headers = resp.headers_mut();
        headers.insert("x-seen-headers", seen.parse().unwrap());
        headers.insert("x-seen-xff", xff.parse().unwrap());
        headers.insert("x-seen-uri", uri.parse().unwrap());
        if let Some(host) = h.get(header::HOST) {
            headers.insert("x-seen-host", host.clone());
        }
        if get("x-close").is_some() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if get("x-up-hop").is_some() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("x-up-secret"));
            headers.insert("x-up-secret", HeaderValue::from_static("1"));
            headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
            headers.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        }
        resp
    }

    /// `serve` on one end of an in-memory pipe, a hyper client on the other.
    struct Proxy {
        client: hyper::client::conn::http1::SendRequest<TestBody>,
        serve: JoinHandle<Result<ConnStats, HttpError>>,
        drain: watch::Sender<bool>,
        client_task: JoinHandle<()>,
    }

    impl Proxy {
        async fn start(upstream_addr: SocketAddr, settings: HttpSettings) -> Proxy {
            let upstream = move || TcpStream::connect(upstream_addr);
            Self::start_with(upstream, settings).await
        }

        async fn start_with<U: Upstream>(upstream: U, settings: HttpSettings) -> Proxy {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let (drain, draining) = watch::channel(false);
            let (settings, client_addr) = settings.split();
            let serve = tokio::spawn(serve(
                server_io,
                upstream,
                settings,
                h1(client_addr),
                draining,
            ));
            let (client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
                .await
                .unwrap();
            let client_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Proxy {
                client,
                serve,
                drain,
                client_task,
            }
        }

        async fn send(&mut self, req: Request<TestBody>) -> Response<Incoming> {
            timeout(LONG, async {
                self.client.ready().await.unwrap();
                self.client.send_request(req).await.unwrap()
            })
            .await
            .expect("response in time")
        }

        async fn fetch(&mut self, req: Request<TestBody>) -> (Parts, Bytes) {
            let (parts, body) = self.send(req).await.into_parts();
            let body = timeout(LONG, body.collect())
                .await
                .expect("body in time")
                .unwrap()
                .to_bytes();
            (parts, body)
        }

        /// Closes the client side and returns what `serve` reported.
        async fn finish(self) -> Result<ConnStats, HttpError> {
            drop(self.client);
            let result = timeout(LONG, self.serve)
                .await
                .expect("serve ends")
                .unwrap();
            self.client_task.abort();
            result
        }
    }

    fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "example.test");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(full(Bytes::new())).unwrap()
    }

    fn get(headers: &[(&str, &str)]) -> Request<TestBody> {
        request(Method::GET, "/", headers)
    }

    /// One GET through a fresh origin and proxy with the default settings.
    async fn fetch_one(headers: &[(&str, &str)]) -> (Parts, Bytes) {
        fetch_one_with(settings(), Method::GET, headers).await
    }

    async fn fetch_one_with(
        settings: HttpSettings,
        method: Method,
        headers: &[(&str, &str)],
    ) -> (Parts, Bytes) {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings).await;
        let out = proxy.fetch(request(method, "/", headers)).await;
        proxy.finish().await.unwrap();
        out
    }

    async fn fetch_one_with_version(
        settings: HttpSettings,
        version: Version,
        headers: &[(&str, &str)],
    ) -> (Parts, Bytes) {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings).await;
        let mut req = request(Method::GET, "/", headers);
        *req.version_mut() = version;
        let out = proxy.fetch(req).await;
        proxy.finish().await.unwrap();
        out
    }

    fn assert_gzipped(parts: &Parts, body: &[u8], original: &[u8]) {
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(parts, "content-encoding"), Some("gzip"));
        assert_eq!(header(parts, "content-length"), None);
        assert_eq!(gunzip(body), original);
    }

    fn assert_identity(parts: &Parts, body: &[u8], original: &[u8]) {
        assert_eq!(header(parts, "content-encoding"), None);
        assert_eq!(body, original);
    }

    fn vary_values(parts: &Parts) -> Vec<&str> {
        parts
            .headers
            .get_all(header::VARY)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn accept_encoding_parsing() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&[""], false),
            (&["gzip"], true),
            (&["GZIP"], true),
            (&["deflate, gzip;q=0.5"], true),
            (&["gzip;q=0"], false),
            (&["gzip; q=0.000"], false),
            (&["gzip;q=0, *"], false),
            (&["*"], true),
            (&["*;q=0"], false),
            (&["br, *;q=0.1"], true),
            (&["x-gzip"], true),
            (&["x-gzip;q=0"], false),
            (&["identity"], false),
            (&["br", "gzip"], true),
            (&["gzip;q=2"], false),
            (&["gzip;q=abc, deflate"], false),
            (&["deflate;q=1, gzip;Q=0.3"], true),
        ];
        for (values, want) in cases {
            let mut headers = HeaderMap::new();
            for v in *values {
                headers.append(header::ACCEPT_ENCODING, v.parse().unwrap());
            }
            assert_eq!(accepts_gzip(&headers), *want, "{values:?}");
        }
    }

    #[tokio::test]
    async fn gzip_compresses_text_byte_exact_and_counts() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let (parts, body) = proxy
            .fetch(get(&[("accept-encoding", "gzip, deflate, br")]))
            .await;
        assert_gzipped(&parts, &body, &text(10_000));
        assert!(body.len() < 10_000 / 10, "compressed to {}", body.len());
        assert_eq!(vary_values(&parts), ["Accept-Encoding"]);
        let stats = proxy.finish().await.unwrap();
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.compressed_responses, 1);
        assert_eq!(stats.body_bytes_before, 10_000);
        assert_eq!(stats.body_bytes_after, body.len() as u64);
        assert!(stats.compression_ratio().unwrap() < 0.1);
    }

    #[tokio::test]
    async fn q_zero_refuses_gzip_but_still_varies() {
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip;q=0, deflate")]).await;
        assert_identity(&parts, &body, &text(10_000));
        assert_eq!(header(&parts, "content-length"), Some("10000"));
        assert_eq!(vary_values(&parts), ["Accept-Encoding"]);
    }

    #[tokio::test]
    async fn star_accepts_gzip() {
        let (parts, body) = fetch_one(&[("accept-encoding", "br;q=1, *;q=0.5")]).await;
        assert_gzipped(&parts, &body, &text(10_000));
        let (parts, body) = fetch_one(&[("accept-encoding", "*;q=0")]).await;
        assert_identity(&parts, &body, &text(10_000));
    }

    #[tokio::test]
    async fn x_gzip_counts_as_gzip() {
        let (parts, body) = fetch_one(&[("accept-encoding", "x-gzip")]).await;
        assert_gzipped(&parts, &body, &text(10_000));
    }

    #[tokio::test]
    async fn no_accept_encoding_means_identity_with_vary() {
        let (parts, body) = fetch_one(&[]).await;
        assert_identity(&parts, &body, &text(10_000));
        assert_eq!(vary_values(&parts), ["Accept-Encoding"]);
    }

    #[tokio::test]
    async fn already_encoded_passes_untouched() {
        let (parts, body) = fetch_one(&[
            ("accept-encoding", "gzip"),
            ("x-ce", "br"),
            ("x-vary", "Origin"),
        ])
        .await;
        assert_eq!(header(&parts, "content-encoding"), Some("br"));
        assert_eq!(&body[..], text(10_000));
        assert_eq!(vary_values(&parts), ["Origin"]);
        // `identity` is no encoding at all.
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-ce", "identity")]).await;
        assert_gzipped(&parts, &body, &text(10_000));
    }

    #[tokio::test]
    async fn type_not_listed_is_not_compressed() {
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-ct", "image/png")]).await;
        assert_identity(&parts, &body, &text(10_000));
        assert!(vary_values(&parts).is_empty());
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-ct", "none")]).await;
        assert_identity(&parts, &body, &text(10_000));
        // Parameters do not matter, case does not either.
        let (parts, body) = fetch_one(&[
            ("accept-encoding", "gzip"),
            ("x-ct", "TEXT/PLAIN ; charset=utf-8"),
        ])
        .await;
        assert_gzipped(&parts, &body, &text(10_000));
    }

    #[tokio::test]
    async fn below_min_size_is_not_compressed() {
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-len", "1023")]).await;
        assert_identity(&parts, &body, &text(1023));
        assert_eq!(header(&parts, "content-length"), Some("1023"));
        assert!(vary_values(&parts).is_empty());
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-len", "1024")]).await;
        assert_gzipped(&parts, &body, &text(1024));
    }

    #[tokio::test]
    async fn unknown_length_is_compressed() {
        let (parts, body) = fetch_one(&[
            ("accept-encoding", "gzip"),
            ("x-len", "100"),
            ("x-chunked", "1"),
        ])
        .await;
        assert_gzipped(&parts, &body, &text(100));
    }

    #[tokio::test]
    async fn head_carries_the_headers_of_get() {
        let ask = [("accept-encoding", "gzip")];
        let (head, body) = fetch_one_with(settings(), Method::HEAD, &ask).await;
        let (get, _) = fetch_one_with(settings(), Method::GET, &ask).await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(body.is_empty());
        for name in ["content-encoding", "vary", "content-length", "etag"] {
            assert_eq!(header(&head, name), header(&get, name), "{name}");
        }
        assert_eq!(header(&head, "content-encoding"), Some("gzip"));
        assert_eq!(header(&head, "vary"), Some("Accept-Encoding"));
    }

    #[tokio::test]
    async fn http_1_0_clients_get_identity() {
        let (parts, body) =
            fetch_one_with_version(settings(), Version::HTTP_10, &[("accept-encoding", "gzip")])
                .await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(&parts, "content-encoding"), None);
        assert_eq!(body.len(), 10000);
    }

    #[tokio::test]
    async fn no_content_and_not_modified_are_not_compressed() {
        for status in ["204", "304"] {
            let (parts, body) = fetch_one(&[
                ("accept-encoding", "gzip"),
                ("x-status", status),
                ("x-etag", "\"v1\""),
            ])
            .await;
            assert_eq!(parts.status.as_str(), status);
            assert_eq!(header(&parts, "content-encoding"), None);
            assert_eq!(header(&parts, "etag"), Some("\"v1\""));
            assert!(body.is_empty());
        }
    }

    #[tokio::test]
    async fn no_transform_is_respected() {
        let (parts, body) = fetch_one(&[
            ("accept-encoding", "gzip"),
            ("x-cc", "public, No-Transform, max-age=60"),
        ])
        .await;
        assert_identity(&parts, &body, &text(10_000));
    }

    #[tokio::test]
    async fn compression_off_leaves_everything() {
        let mut off = settings();
        off.compression = None;
        let (parts, body) = fetch_one_with(off, Method::GET, &[("accept-encoding", "gzip")]).await;
        assert_identity(&parts, &body, &text(10_000));
        assert!(vary_values(&parts).is_empty());
    }

    #[tokio::test]
    async fn vary_gets_accept_encoding_once() {
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-vary", "Origin")]).await;
        assert_gzipped(&parts, &body, &text(10_000));
        assert_eq!(vary_values(&parts), ["Origin, Accept-Encoding"]);
        let (parts, _) = fetch_one(&[
            ("accept-encoding", "gzip"),
            ("x-vary", "accept-encoding, Origin"),
        ])
        .await;
        assert_eq!(vary_values(&parts), ["accept-encoding, Origin"]);
        let (parts, _) = fetch_one(&[("accept-encoding", "gzip"), ("x-vary", "*")]).await;
        assert_eq!(vary_values(&parts), ["*"]);
        let (parts, _) = fetch_one(&[("x-vary", "Origin")]).await;
        assert_eq!(vary_values(&parts), ["Origin, Accept-Encoding"]);
    }

    #[tokio::test]
    async fn strong_etag_is_weakened() {
        let (parts, body) = fetch_one(&[("accept-encoding", "gzip"), ("x-etag", "\"abc\"")]).await;
        assert_gzipped(&parts, &body, &text(10_000));
        assert_eq!(header(&parts, "etag"), Some("W/\"abc\""));
        let (parts, _) = fetch_one(&[("accept-encoding", "gzip"), ("x-etag", "W/\"abc\"")]).await;
        assert_eq!(header(&parts, "etag"), Some("W/\"abc\""));
        // Not compressed: the validator still holds.
        let (parts, _) = fetch_one(&[("x-etag", "\"abc\"")]).await;
        assert_eq!(header(&parts, "etag"), Some("\"abc\""));
    }

    #[tokio::test]
    async fn keep_alive_reuses_one_upstream_connection() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        for len in [5000, 20_000, 300] {
            let len_text = len.to_string();
            let (parts, body) = proxy
                .fetch(get(&[("accept-encoding", "gzip"), ("x-len", &len_text)]))
                .await;
            if len >= 1024 {
                assert_gzipped(&parts, &body, &text(len));
            } else {
                assert_identity(&parts, &body, &text(len));
            }
        }
        assert_eq!(origin.accepts.load(SeqCst), 1);
        let stats = proxy.finish().await.unwrap();
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.upstream_connects, 1);
        assert_eq!(stats.compressed_responses, 2);
        assert_eq!(stats.body_bytes_before, 25_300);
    }

    #[tokio::test]
    async fn upstream_closing_gets_reopened() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        for _ in 0..3 {
            let (parts, body) = proxy.fetch(get(&[("x-close", "1")])).await;
            assert_eq!(parts.status, StatusCode::OK);
            // The upstream's `Connection: close` concerns the upstream hop only.
            assert_eq!(header(&parts, "connection"), None);
            assert_eq!(&body[..], text(10_000));
        }
        assert_eq!(origin.accepts.load(SeqCst), 3);
        let stats = proxy.finish().await.unwrap();
        assert_eq!(stats.upstream_connects, 3);
    }

    #[tokio::test]
    async fn forwarded_for_is_set_or_appended() {
        let (parts, _) = fetch_one(&[]).await;
        assert_eq!(header(&parts, "x-seen-xff"), Some("203.0.113.7"));
        let (parts, _) = fetch_one(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
        ])
        .await;
        assert_eq!(
            header(&parts, "x-seen-xff"),
            Some("198.51.100.1, 198.51.100.2, 203.0.113.7")
        );
        let mut v6 = settings();
        v6.client_addr = Some("[2001:db8::1]:443".parse().unwrap());
        let (parts, _) =
            fetch_one_with(v6, Method::GET, &[("x-forwarded-for", "198.51.100.1")]).await;
        assert_eq!(
            header(&parts, "x-seen-xff"),
            Some("198.51.100.1, 2001:db8::1")
        );
        let mut unknown = settings();
        unknown.client_addr = None;
        let (parts, _) = fetch_one_with(unknown, Method::GET, &[]).await;
        assert_eq!(header(&parts, "x-seen-xff"), Some(""));
    }

    #[tokio::test]
    async fn hop_by_hop_headers_are_dropped_both_ways() {
        let (parts, body) = fetch_one(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-kept", "1"),
            ("x-up-hop", "1"),
        ])
        .await;
        assert_eq!(&body[..], text(10_000));
        let seen: Vec<&str> = header(&parts, "x-seen-headers")
            .unwrap()
            .split(',')
            .collect();
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-connection",
            "te",
        ] {
            assert!(
                !seen.contains(&gone),
                "{gone} reached the upstream: {seen:?}"
            );
        }
        for kept in ["host", "x-kept", "x-forwarded-for"] {
            assert!(seen.contains(&kept), "{kept} missing upstream: {seen:?}");
        }
        for gone in [
            "connection",
            "x-up-secret",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "trailer",
        ] {
            assert_eq!(header(&parts, gone), None, "{gone} reached the client");
        }
    }

    #[tokio::test]
    async fn draining_closes_after_the_next_response_only() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let (parts, _) = proxy.fetch(get(&[])).await;
        assert_eq!(header(&parts, "connection"), None);

        // Draining while idle: the keep-alive connection stays open.
        proxy.drain.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!proxy.serve.is_finished());

        let (parts, body) = proxy.fetch(get(&[("accept-encoding", "gzip")])).await;
        assert_eq!(header(&parts, "connection"), Some("close"));
        assert_gzipped(&parts, &body, &text(10_000));
        // serve ends on its own, with the client still holding its side.
        let stats = timeout(LONG, &mut proxy.serve)
            .await
            .expect("connection closed after the draining response")
            .unwrap()
            .unwrap();
        assert_eq!(stats.requests, 2);
        timeout(LONG, &mut proxy.client_task)
            .await
            .expect("client saw the close")
            .unwrap();
    }

    #[tokio::test]
    async fn unreachable_upstream_gets_502() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let mut proxy = Proxy::start(addr, settings()).await;
        for _ in 0..2 {
            let (parts, body) = proxy.fetch(get(&[("accept-encoding", "gzip")])).await;
            assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
            assert!(std::str::from_utf8(&body).unwrap().starts_with("502"));
        }
        let stats = proxy.finish().await.unwrap();
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.upstream_connects, 0);
    }

    #[tokio::test]
    async fn upstream_failing_before_the_head_gets_502() {
        let upstream = || async {
            let (mut ours, theirs) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                // Read a little of the request, then hang up without a word.
                let mut buf = [0u8; 16];
                let _ = ours.read(&mut buf).await;
            });
            Ok(theirs)
        };
        let mut proxy = Proxy::start_with(upstream, settings()).await;
        let (parts, _) = proxy.fetch(get(&[])).await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
        proxy.finish().await.unwrap();
    }

    /// Reads up to the end of a request head; false if the peer closed
    /// before it.
    async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> bool {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// An upstream that sends `head` and a piece of the body, then hangs up.
    fn broken_upstream(head: &'static str) -> impl Upstream {
        move || async move {
            let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                assert!(read_head(&mut ours).await, "a request head");
                ours.write_all(head.as_bytes()).await.unwrap();
            });
            Ok(theirs)
        }
    }

    #[tokio::test]
    async fn upstream_breaking_off_mid_body_cuts_the_client() {
        for head in [
            "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 1000\r\n\r\n0123456789",
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        ] {
            let mut proxy = Proxy::start_with(broken_upstream(head), settings()).await;
            let resp = proxy.send(get(&[("accept-encoding", "gzip")])).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(
                timeout(LONG, resp.into_body().collect())
                    .await
                    .unwrap()
                    .is_err()
            );
            let err = proxy.finish().await.unwrap_err();
            assert!(matches!(err, HttpError::UpstreamBody(_)), "{err}");
            assert!(err.to_string().starts_with("upstream server"), "{err}");
        }
    }

    #[test]
    fn gzip_at_once_round_trips_at_every_size_and_level() {
        // Incompressible bytes make the output outgrow its first capacity.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // The thread's encoder is reused (and remade when the level
        // changes): each result must stand alone.
        for input in [Vec::new(), text(10_000), noise, numbered(128 * 1024)] {
            for level in [1, 9, 1, 6] {
                let out = super::gzip_at_once(&input, level).unwrap();
                assert!(gunzip(&out) == input, "len {} level {level}", input.len());
            }
        }
    }

    #[tokio::test]
    async fn known_lengths_on_both_sides_of_the_one_go_limit_are_gzipped() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let limit = super::GZIP_WHOLE_MAX as usize;
        for len in [limit, limit + 1] {
            let size = len.to_string();
            let (parts, body) = proxy
                .fetch(get(&[
                    ("accept-encoding", "gzip"),
                    ("x-len", &size),
                    ("x-body", "numbered"),
                    ("x-ct", "text/plain"),
                ]))
                .await;
            assert_gzipped(&parts, &body, &numbered(len));
        }
        let stats = proxy.finish().await.unwrap();
        assert_eq!(stats.compressed_responses, 2);
        assert_eq!(stats.body_bytes_before, 2 * limit as u64 + 1);
    }

    #[tokio::test]
    async fn large_bodies_stream_through_byte_exact() {
        const SIZE: usize = 8 * 1024 * 1024;
        let data = numbered(SIZE);
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let size = SIZE.to_string();
        let (parts, body) = proxy
            .fetch(get(&[
                ("accept-encoding", "gzip"),
                ("x-len", &size),
                ("x-body", "numbered"),
                ("x-ct", "text/plain"),
                ("x-chunked", "1"),
            ]))
            .await;
        assert_gzipped(&parts, &body, &data);
        let (parts, body) = proxy
            .fetch(get(&[
                ("accept-encoding", "gzip"),
                ("x-len", &size),
                ("x-body", "numbered"),
                ("x-ct", "application/octet-stream"),
            ]))
            .await;
        assert_identity(&parts, &body, &data);
        assert_eq!(header(&parts, "content-length"), Some(size.as_str()));
        // And upstream: a chunked request body echoed back.
        let req = Request::builder()
            .method(Method::POST)
            .uri("/echo")
            .header(header::HOST, "example.test")
            .body(chunked(data.clone()))
            .unwrap();
        let (parts, body) = proxy.fetch(req).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body[..] == data[..], "echoed body differs");
        assert_eq!(origin.accepts.load(SeqCst), 1);
        proxy.finish().await.unwrap();
    }

    #[tokio::test]
    async fn gzip_streams_before_the_upstream_body_ends() {
        // The upstream sends 1 MiB, then holds the rest until the client has
        // seen compressed bytes: a proxy that buffered the whole body would
        // never get there.
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release = Arc::new(std::sync::Mutex::new(Some(release_rx)));
        let first = numbered(2 * 1024 * 1024);
        let expected = first.clone();
        let origin = start_origin(move |_req: Request<Incoming>| {
            let release = release.lock().unwrap().take().unwrap();
            let data = Bytes::from(first.clone());
            async move {
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(4);
                tokio::spawn(async move {
                    let half = data.len() / 2;
                    tx.send(Ok(Frame::data(data.slice(..half)))).await.unwrap();
                    release.await.unwrap();
                    tx.send(Ok(Frame::data(data.slice(half..)))).await.unwrap();
                });
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|frame| (frame, rx))
                });
                let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                resp
            }
        })
        .await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let resp = proxy.send(get(&[("accept-encoding", "gzip")])).await;
        assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
        let mut body = resp.into_body();
        let mut compressed = Vec::new();
        let next = async |body: &mut Incoming| {
            timeout(LONG, body.frame())
                .await
                .expect("compressed bytes while the upstream holds back")
                .map(|frame| frame.unwrap().into_data().unwrap_or_default())
        };
        // Wait for at least half of the first MiB, decompressed.
        loop {
            compressed.extend_from_slice(&next(&mut body).await.unwrap());
            let mut partial = Vec::new();
            let _ = flate2::read::GzDecoder::new(&compressed[..]).read_to_end(&mut partial);
            if partial.len() >= 512 * 1024 {
                assert_eq!(partial[..], expected[..partial.len()]);
                break;
            }
        }
        release_tx.send(()).unwrap();
        while let Some(data) = next(&mut body).await {
            compressed.extend_from_slice(&data);
        }
        assert!(gunzip(&compressed) == expected, "body differs");
        proxy.finish().await.unwrap();
    }

    #[tokio::test]
    async fn slow_request_head_times_out() {
        let origin = start_origin(origin_default).await;
        let mut short = settings();
        short.header_read_timeout = Duration::from_millis(200);
        let (mut client, server) = tokio::io::duplex(4096);
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect(origin.addr);
        let (short, client_addr) = short.split();
        let serving = tokio::spawn(serve(server, upstream, short, h1(client_addr), draining));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let err = timeout(LONG, serving).await.unwrap().unwrap().unwrap_err();
        assert!(matches!(err, HttpError::HeaderTimeout(_)), "{err}");
        assert!(err.to_string().starts_with("downstream client"), "{err}");
    }

    /// A TCP stream that counts its waits for readability: each is a wait
    /// of a parked connection (`http1`).
    struct Parking {
        inner: TcpStream,
        waits: Arc<AtomicUsize>,
    }

    impl ReadReady for Parking {
        const TELLS: bool = true;

        fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.waits.fetch_add(1, SeqCst);
            self.inner.poll_read_ready(cx)
        }
    }

    impl AsyncRead for Parking {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Parking {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// `serve` on the accepted end of a loopback TCP connection; returns
    /// the client's end, the count of parked waits, and the task.
    async fn serve_tcp(
        origin: SocketAddr,
        settings: HttpSettings,
    ) -> (
        TcpStream,
        Arc<AtomicUsize>,
        JoinHandle<Result<ConnStats, HttpError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let waits = Arc::new(AtomicUsize::new(0));
        let io = Parking {
            inner: server,
            waits: waits.clone(),
        };
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect(origin);
        let (settings, client_addr) = settings.split();
        let serving = tokio::spawn(async move {
            let _drain = _drain;
            serve(io, upstream, settings, h1(client_addr), draining).await
        });
        (client, waits, serving)
    }

    /// Reads one response with a `content-length` (head and body).
    async fn read_response(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
            let n = timeout(LONG, client.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap();
            assert!(n > 0, "closed mid-response: {text}");
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// A GET of 10 bytes, answered 200 on the same connection.
    async fn get_small(client: &mut TcpStream) {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-len: 10\r\n\r\n")
            .await
            .unwrap();
        let response = read_response(client).await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    }

    /// What an idle keep-alive client's task holds of `serve` (the stream,
    /// the service and its entry in the stage's parked waits, 120 bytes):
    /// hyper's connection and the timers of its waits must stay out of it,
    /// boxed while it serves. (With a tokio `Sleep` of its own it was 248.)
    #[tokio::test]
    async fn a_parked_connection_holds_little() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // The stream of a plain listener, as the stage serves it.
        let io =
            crate::stage::stall::WriteStall::new(crate::stage::socket::Stream::Tcp(server), LONG);
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect("127.0.0.1:9");
        let (settings, client_addr) = settings().split();
        let serving = serve(io, upstream, settings, h1(client_addr), draining);
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 128, "serve's future is {size} bytes");
    }

    #[tokio::test]
    async fn idle_keep_alive_connection_is_parked_and_served_again() {
        let origin = start_origin(origin_default).await;
        let mut short = settings();
        short.header_read_timeout = Duration::from_secs(1);
        let (mut client, waits, serving) = serve_tcp(origin.addr, short).await;
        get_small(&mut client).await;
        // Parked once it has waited PARK_AFTER.
        tokio::time::sleep(PARK_AFTER * 3).await;
        let parked = waits.load(SeqCst);
        assert!(parked > 0, "the idle connection was not parked");
        // The next request wakes it, and hyper goes on where it stopped.
        get_small(&mut client).await;
        tokio::time::sleep(PARK_AFTER * 3).await;
        assert!(waits.load(SeqCst) > parked, "not parked after the second");
        // Part of a head: hyper's header timer runs from these bytes, and
        // closes the connection when the rest does not come.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let sent = std::time::Instant::now();
        let mut rest = Vec::new();
        timeout(LONG, client.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .unwrap();
        assert!(
            sent.elapsed() >= Duration::from_millis(900),
            "closed after {:?}",
            sent.elapsed()
        );
        let stats = timeout(LONG, serving).await.unwrap().unwrap().unwrap();
        assert_eq!(stats.requests, 2);
    }

    #[tokio::test]
    async fn busy_keep_alive_connection_is_not_parked() {
        let origin = start_origin(origin_default).await;
        let (mut client, waits, serving) = serve_tcp(origin.addr, settings()).await;
        for _ in 0..20 {
            get_small(&mut client).await;
        }
        assert_eq!(waits.load(SeqCst), 0, "parked between quick requests");
        drop(client);
        let stats = timeout(LONG, serving).await.unwrap().unwrap().unwrap();
        assert_eq!(stats.requests, 20);
    }

    #[tokio::test]
    async fn parked_connection_waits_at_most_the_header_read_timeout() {
        let origin = start_origin(origin_default).await;
        let mut short = settings();
        short.header_read_timeout = Duration::from_millis(300);
        // A client that sends nothing: the failure hyper's timer reported.
        let (mut silent, waits, serving) = serve_tcp(origin.addr, short.clone()).await;
        let err = timeout(LONG, serving).await.unwrap().unwrap().unwrap_err();
        assert!(matches!(err, HttpError::HeaderTimeout(_)), "{err}");
        assert!(waits.load(SeqCst) > 0, "not parked");
        let mut rest = Vec::new();
        timeout(LONG, silent.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap();
        // After a request: the usual end of a keep-alive connection.
        let (mut client, _, serving) = serve_tcp(origin.addr, short).await;
        get_small(&mut client).await;
        let idle = std::time::Instant::now();
        let stats = timeout(LONG, serving).await.unwrap().unwrap().unwrap();
        assert_eq!(stats.requests, 1);
        assert!(
            idle.elapsed() >= Duration::from_millis(250),
            "{:?}",
            idle.elapsed()
        );
        let mut rest = Vec::new();
        timeout(LONG, client.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap();
        assert!(rest.is_empty());
    }

    /// Serves `request` (raw bytes, then the write side shut down when
    /// `half_close`) and returns all the client reads until EOF.
    async fn raw_exchange(settings: HttpSettings, request: &[u8], half_close: bool) -> String {
        let origin = start_origin(origin_default).await;
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect(origin.addr);
        let (settings, client_addr) = settings.split();
        let serving = tokio::spawn(serve(server, upstream, settings, h1(client_addr), draining));
        client.write_all(request).await.unwrap();
        if half_close {
            client.shutdown().await.unwrap();
        }
        let mut out = Vec::new();
        timeout(LONG, client.read_to_end(&mut out))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        let _ = timeout(LONG, serving).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn half_closed_client_still_gets_its_answer() {
        let out = raw_exchange(
            settings(),
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            true,
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    }

    #[tokio::test]
    async fn request_head_over_the_limit_is_answered_431() {
        let big = "x".repeat(20 * 1024);
        let req = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
        let out = raw_exchange(settings(), req.as_bytes(), false).await;
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{}",
            &out[..out.len().min(200)]
        );
        // Just under the limit still passes.
        let fits = "x".repeat(15 * 1024);
        let req =
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {fits}\r\nConnection: close\r\n\r\n");
        let out = raw_exchange(settings(), req.as_bytes(), false).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &out[..200]);
    }

    #[tokio::test]
    async fn silent_server_is_answered_504_at_server_timeout() {
        let origin = start_origin(|_req: Request<Incoming>| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Response::new(full(Bytes::from_static(b"late")))
        })
        .await;
        let mut quick = settings();
        quick.server_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let mut proxy = Proxy::start(origin.addr, quick).await;
        let (parts, body) = proxy.fetch(request(Method::GET, "/", &[])).await;
        assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(String::from_utf8_lossy(&body).contains("504"), "{body:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn body_that_stalls_past_server_timeout_is_cut() {
        let origin = start_origin(|_req: Request<Incoming>| async {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(tx);
            });
            let stream = tokio_stream_from(rx);
            Response::new(StreamBody::new(stream).boxed_unsync())
        })
        .await;
        let mut quick = settings();
        quick.server_timeout = Duration::from_millis(300);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect(origin.addr);
        let (quick, client_addr) = quick.split();
        let serving = tokio::spawn(serve(server_io, upstream, quick, h1(client_addr), draining));
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = client
            .send_request(request(Method::GET, "/", &[]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let collected = timeout(LONG, resp.into_body().collect()).await.unwrap();
        assert!(collected.is_err(), "the cut body must not end cleanly");
        let err = timeout(LONG, serving).await.unwrap().unwrap().unwrap_err();
        assert!(err.to_string().contains("server_timeout"), "{err}");
        assert!(err.to_string().starts_with("upstream server"), "{err}");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn request_line_is_forwarded_in_origin_form() {
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let (parts, _) = proxy
            .fetch(request(Method::GET, "/a/b?c=d&e", &[("x-ct", "image/png")]))
            .await;
        assert_eq!(header(&parts, "x-seen-uri"), Some("/a/b?c=d&e"));
        assert_eq!(header(&parts, "x-seen-host"), Some("example.test"));
        // Absolute-form without a Host: the authority becomes the Host.
        let req = Request::builder()
            .uri("http://absolute.test:8080/x?y")
            .body(full(Bytes::new()))
            .unwrap();
        let (parts, _) = proxy.fetch(req).await;
        assert_eq!(header(&parts, "x-seen-uri"), Some("/x?y"));
        assert_eq!(header(&parts, "x-seen-host"), Some("absolute.test:8080"));
        // Methods and request bodies go through as they are.
        let req = Request::builder()
            .method(Method::PUT)
            .uri("/echo")
            .header(header::HOST, "example.test")
            .body(full("payload"))
            .unwrap();
        let (parts, body) = proxy.fetch(req).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(&body[..], b"payload");
        assert_eq!(proxy.finish().await.unwrap().upstream_connects, 1);
    }

    #[tokio::test]
    async fn idle_keep_alive_ends_quietly_at_the_header_timeout() {
        let origin = start_origin(origin_default).await;
        let mut short = settings();
        short.header_read_timeout = Duration::from_millis(200);
        let mut proxy = Proxy::start(origin.addr, short).await;
        proxy.fetch(get(&[])).await;
        let stats = timeout(LONG, &mut proxy.serve)
            .await
            .expect("idle connection closed")
            .unwrap()
            .unwrap();
        assert_eq!(stats.requests, 1);
    }

    #[tokio::test]
    async fn body_size_hint_is_kept_for_identity() {
        // The identity path must not turn a known length into chunked.
        let origin = start_origin(origin_default).await;
        let mut proxy = Proxy::start(origin.addr, settings()).await;
        let resp = proxy.send(get(&[("x-ct", "image/png")])).await;
        assert_eq!(resp.body().size_hint().exact(), Some(10_000));
        assert_eq!(
            resp.headers().get(header::TRANSFER_ENCODING),
            None,
            "identity response went chunked"
        );
    }

    fn downstream(client_addr: Option<SocketAddr>, protocol: Protocol) -> Downstream {
        Downstream {
            protocol,
            idle: Arc::new(IdlePool::new(1, 8, LONG)),
            ..Downstream::http1(client_addr)
        }
    }

    fn h1(client_addr: Option<SocketAddr>) -> Downstream {
        downstream(client_addr, Protocol::Http1)
    }

    /// `serve` in HTTP/2 on one end of an in-memory pipe, a hyper HTTP/2
    /// client on the other.
    struct H2Proxy {
        client: hyper::client::conn::http2::SendRequest<TestBody>,
        serve: JoinHandle<Result<ConnStats, HttpError>>,
        drain: watch::Sender<bool>,
        client_task: JoinHandle<()>,
    }

    impl H2Proxy {
        async fn start(upstream_addr: SocketAddr, settings: HttpSettings) -> H2Proxy {
            let upstream = move || TcpStream::connect(upstream_addr);
            let (client_io, server_io) = tokio::io::duplex(256 * 1024);
            let (drain, draining) = watch::channel(false);
            let (settings, client_addr) = settings.split();
            let serve = tokio::spawn(serve(
                server_io,
                upstream,
                settings,
                downstream(client_addr, Protocol::Http2),
                draining,
            ));
            let (client, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(client_io),
            )
            .await
            .unwrap();
            let client_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            H2Proxy {
                client,
                serve,
                drain,
                client_task,
            }
        }

        async fn fetch(&self, req: Request<TestBody>) -> (Parts, Bytes) {
            let mut client = self.client.clone();
            let resp = timeout(LONG, client.send_request(req))
                .await
                .expect("response in time")
                .expect("response");
            let (parts, body) = resp.into_parts();
            let body = timeout(LONG, body.collect())
                .await
                .expect("body in time")
                .unwrap()
                .to_bytes();
            (parts, body)
        }
    }

    fn h2_get(path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
        let mut req = request(Method::GET, path, headers);
        *req.uri_mut() = format!("https://example.test{path}").parse().unwrap();
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
        req
    }

    #[tokio::test]
    async fn h2_streams_are_served_concurrently_with_gzip_and_forwarded_for() {
        let origin = start_origin(origin_default).await;
        let proxy = H2Proxy::start(origin.addr, settings()).await;
        let mut fetches = tokio::task::JoinSet::new();
        for i in 0..20usize {
            let len = (500 + i * 997).to_string();
            let req = h2_get(
                "/some/path?q=1",
                &[("accept-encoding", "gzip"), ("x-len", &len)],
            );
            let mut client = proxy.client.clone();
            fetches.spawn(async move {
                let (parts, body) = client.send_request(req).await.unwrap().into_parts();
                (i, (parts, body.collect().await.unwrap().to_bytes()))
            });
        }
        while let Some(done) = fetches.join_next().await {
            let (i, (parts, body)) = done.unwrap();
            let len = 500 + i * 997;
            assert_eq!(parts.version, Version::HTTP_2);
            if len >= 1024 {
                assert_gzipped(&parts, &body, &text(len));
            } else {
                assert_identity(&parts, &body, &text(len));
            }
            assert_eq!(header(&parts, "x-seen-xff"), Some("203.0.113.7"));
            assert_eq!(header(&parts, "x-seen-uri"), Some("/some/path?q=1"));
            assert_eq!(header(&parts, "x-seen-host"), Some("example.test"));
        }
        drop(proxy.client);
        let stats = timeout(LONG, proxy.serve).await.unwrap().unwrap().unwrap();
        assert_eq!(stats.requests, 20);
        assert!(
            (1..=20).contains(&stats.upstream_connects),
            "{} upstream connections",
            stats.upstream_connects
        );
        // The upstream connections were kept for reuse, never more than the
        // streams open at once.
        assert_eq!(origin.accepts.load(SeqCst) as u64, stats.upstream_connects);
        proxy.client_task.abort();
    }

    #[tokio::test]
    async fn h2_sequential_streams_reuse_one_upstream_connection() {
        let origin = start_origin(origin_default).await;
        let proxy = H2Proxy::start(origin.addr, settings()).await;
        for _ in 0..5 {
            let (parts, body) = proxy.fetch(h2_get("/", &[])).await;
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(&body[..], text(10_000));
        }
        assert_eq!(origin.accepts.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn h2_drain_lets_open_streams_finish_then_closes() {
        let origin = start_origin(|req: Request<Incoming>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Response::new(full(Bytes::from_static(b"done")))
        })
        .await;
        let proxy = H2Proxy::start(origin.addr, settings()).await;
        let slow = {
            let mut client = proxy.client.clone();
            tokio::spawn(async move {
                let resp = client.send_request(h2_get("/slow", &[])).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.drain.send(true).unwrap();
        // The stream opened before the GOAWAY is served to its end.
        let body = timeout(LONG, slow).await.unwrap().unwrap();
        assert_eq!(&body[..], b"done");
        let stats = timeout(LONG, proxy.serve)
            .await
            .expect("the connection closes once its streams are done")
            .unwrap()
            .unwrap();
        assert_eq!(stats.requests, 1);
        // And the client learnt it may not open more.
        let mut client = proxy.client.clone();
        let refused = timeout(LONG, client.send_request(h2_get("/", &[])))
            .await
            .unwrap();
        assert!(refused.is_err(), "a stream after the GOAWAY was served");
    }

    #[tokio::test]
    async fn h2_idle_connection_is_closed_at_the_request_timeout() {
        let origin = start_origin(origin_default).await;
        let mut short = settings();
        short.header_read_timeout = Duration::from_millis(300);
        let proxy = H2Proxy::start(origin.addr, short).await;
        proxy.fetch(h2_get("/", &[])).await;
        let stats = timeout(LONG, proxy.serve)
            .await
            .expect("idle h2 connection closed")
            .unwrap()
            .unwrap();
        assert_eq!(stats.requests, 1);
    }

    /// Raw HTTP/2 from a client that does not play by the rules.
    mod raw {
        use super::*;

        pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            out.extend([kind, flags]);
            out.extend(stream.to_be_bytes());
            out.extend(payload);
            out
        }

        /// Preface and an empty SETTINGS frame.
        pub fn start() -> Vec<u8> {
            let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            out.extend(frame(0x4, 0, 0, &[]));
            out
        }

        /// HPACK for GET http / (all from the static table).
        pub const GET_ROOT: [u8; 3] = [0x82, 0x86, 0x84];

        /// Writes `bytes` to an HTTP/2 `serve` (reading and dropping what
        /// it answers) and returns how `serve` ended.
        pub async fn run(bytes: Vec<u8>, origin: SocketAddr) -> Result<ConnStats, HttpError> {
            let upstream = move || TcpStream::connect(origin);
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (_drain, draining) = watch::channel(false);
            let (settings, client_addr) = settings().split();
            let serving = tokio::spawn(serve(
                server,
                upstream,
                settings,
                downstream(client_addr, Protocol::Http2),
                draining,
            ));
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let reader = async {
                let mut sink = vec![0; 64 * 1024];
                while rd.read(&mut sink).await.unwrap_or(0) > 0 {}
            };
            let writer = async {
                let _ = wr.write_all(&bytes).await;
            };
            let ended = async {
                let (_, _, ended) = tokio::join!(reader, writer, serving);
                ended
            };
            timeout(LONG, ended).await.expect("serve ended").unwrap()
        }
    }

    /// Reads one frame: (type, flags, stream, payload).
    async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await.expect("a frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.expect("a frame payload");
        (head[3], head[4], stream, payload)
    }

    /// RFC 9113 6.8: a draining generation first sends GOAWAY with the
    /// largest stream id and a PING; once the PING comes back, the final
    /// GOAWAY names the last stream it took, which is still answered.
    #[tokio::test]
    async fn h2_drain_is_the_two_phase_goaway() {
        let origin = start_origin(|_req: Request<Incoming>| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(full(Bytes::from_static(b"late but whole")))
        })
        .await;
        let upstream = move || TcpStream::connect(origin.addr);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (drain, draining) = watch::channel(false);
        let (settings, client_addr) = settings().split();
        let serving = tokio::spawn(serve(
            server,
            upstream,
            settings,
            downstream(client_addr, Protocol::Http2),
            draining,
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut hello = raw::start();
        hello.extend(raw::frame(0x1, 0x5, 1, &raw::GET_ROOT));
        wr.write_all(&hello).await.unwrap();
        // Our SETTINGS, then the ack of the client's.
        let mut seen = Vec::new();
        while seen.iter().filter(|(t, _, _, _)| *t == 0x4).count() < 2 {
            seen.push(timeout(LONG, read_frame(&mut rd)).await.unwrap());
        }
        wr.write_all(&raw::frame(0x4, 0x1, 0, &[])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain.send(true).unwrap();
        // Phase one: GOAWAY (last id 2^31-1), and a PING.
        let mut first = Vec::new();
        let ping = loop {
            let (kind, flags, _, payload) = timeout(LONG, read_frame(&mut rd)).await.unwrap();
            if kind == 0x7 {
                first.push(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff);
            }
            if kind == 0x6 && flags & 0x1 == 0 {
                break payload;
            }
        };
        assert_eq!(
            first,
            [0x7fff_ffff],
            "phase one: GOAWAY with the largest id"
        );
        // Answer the PING: phase two follows.
        wr.write_all(&raw::frame(0x6, 0x1, 0, &ping)).await.unwrap();
        let mut goaways = Vec::new();
        let mut body = Vec::new();
        let mut ended = false;
        while !ended {
            match timeout(LONG, read_frame(&mut rd)).await {
                Ok((0x7, _, _, payload)) => {
                    goaways.push(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff)
                }
                Ok((0x0, flags, 1, payload)) => {
                    body.extend(payload);
                    ended = flags & 0x1 != 0;
                }
                Ok(_) => {}
                Err(_) => panic!("no end of stream 1"),
            }
        }
        assert_eq!(goaways, [1], "the final GOAWAY names stream 1");
        assert_eq!(body, b"late but whole");
        let stats = timeout(LONG, serving).await.unwrap().unwrap().unwrap();
        assert_eq!(stats.requests, 1);
    }

    #[tokio::test]
    async fn h2_rapid_reset_closes_the_connection() {
        let origin = start_origin(origin_default).await;
        let mut bytes = raw::start();
        for stream in (1..2000u32).step_by(2) {
            bytes.extend(raw::frame(0x1, 0x5, stream, &raw::GET_ROOT));
            bytes.extend(raw::frame(0x3, 0, stream, &8u32.to_be_bytes()));
        }
        let err = raw::run(bytes, origin.addr).await.unwrap_err();
        // Our guard, or h2's limit of streams reset before they were taken.
        assert!(
            matches!(err, HttpError::Flood(Flood::Resets(_) | Flood::Calm(_))),
            "expected a reset flood, got: {err}"
        );
        // Far fewer than the 1,000 streams reached the server.
        assert!(
            origin.accepts.load(SeqCst) <= 101,
            "{}",
            origin.accepts.load(SeqCst)
        );
    }

    #[tokio::test]
    async fn h2_continuation_flood_closes_the_connection() {
        let origin = start_origin(origin_default).await;
        let mut bytes = raw::start();
        bytes.extend(raw::frame(0x1, 0x0, 1, &raw::GET_ROOT));
        for _ in 0..10_000 {
            bytes.extend(raw::frame(0x9, 0x0, 1, &[0x40, 0x01, b'x', 0x01, b'y']));
        }
        let err = raw::run(bytes, origin.addr).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Flood(Flood::Continuation(_)))
                || matches!(err, HttpError::Downstream(_)),
            "expected the header block to be refused, got: {err}"
        );
        assert_eq!(origin.accepts.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn h2_ping_and_settings_floods_close_the_connection() {
        let origin = start_origin(origin_default).await;
        for (kind, payload) in [(0x6u8, vec![0u8; 8]), (0x4, vec![])] {
            let mut bytes = raw::start();
            for _ in 0..5_000 {
                bytes.extend(raw::frame(kind, 0, 0, &payload));
            }
            let err = raw::run(bytes, origin.addr).await.unwrap_err();
            assert!(
                matches!(err, HttpError::Flood(Flood::Control(_))),
                "frame type {kind}: expected a control flood, got: {err}"
            );
        }
    }

    #[tokio::test]
    async fn h2_client_that_does_not_read_is_cut_at_client_timeout() {
        let origin = start_origin(origin_default).await;
        let mut quick = settings();
        let (settings, client_addr) = {
            quick.compression = None;
            quick.split()
        };
        let mut settings = (*settings).clone();
        settings.client_timeout = Duration::from_millis(400);
        let upstream = move || TcpStream::connect(origin.addr);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (_drain, draining) = watch::channel(false);
        let serving = tokio::spawn(serve(
            server,
            upstream,
            Arc::new(settings),
            downstream(client_addr, Protocol::Http2),
            draining,
        ));
        // Ten streams for 1 MB each, and then never a WINDOW_UPDATE nor a read.
        let mut bytes = raw::start();
        for stream in (1..20u32).step_by(2) {
            let mut block = raw::GET_ROOT.to_vec();
            // x-len: 1000000 (literal without indexing, new name).
            block.extend([0x00, 5]);
            block.extend(b"x-len");
            block.extend([7]);
            block.extend(b"1000000");
            bytes.extend(raw::frame(0x1, 0x5, stream, &block));
        }
        client.write_all(&bytes).await.unwrap();
        let err = timeout(LONG, serving)
            .await
            .expect("cut")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, HttpError::ClientStalled(_)), "{err}");
    }

    /// One client connection with one GET, its idle upstream connections
    /// in `pool`.
    async fn one_client(origin: SocketAddr, pool: &Arc<IdlePool>) {
        let upstream = move || TcpStream::connect(origin);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (_drain, draining) = watch::channel(false);
        let (settings, client_addr) = settings().split();
        let mut down = h1(client_addr);
        down.idle = pool.clone();
        let serving = tokio::spawn(serve(server_io, upstream, settings, down, draining));
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = client.send_request(get(&[])).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], text(10_000));
        drop(client);
        timeout(LONG, serving).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn clients_share_the_stage_pool_of_idle_upstream_connections() {
        let origin = start_origin(origin_default).await;
        let shared = Arc::new(IdlePool::new(1, 4, LONG));
        for _ in 0..3 {
            one_client(origin.addr, &shared).await;
        }
        // Three client connections, one after the other: one server
        // connection, waiting idle in the pool now.
        assert_eq!(origin.accepts.load(SeqCst), 1);
        assert_eq!(shared.idle(), 1);
    }

    #[tokio::test]
    async fn idle_upstream_connections_are_purged_after_the_delay() {
        let origin = start_origin(origin_default).await;
        let pool = Arc::new(IdlePool::new(1, 4, Duration::from_millis(150)));
        one_client(origin.addr, &pool).await;
        one_client(origin.addr, &pool).await;
        assert_eq!(origin.accepts.load(SeqCst), 1, "reused within the delay");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.idle(), 0, "closed by the sweeper, with no request");
        one_client(origin.addr, &pool).await;
        assert_eq!(origin.accepts.load(SeqCst), 2, "a new one past it");
    }

    #[tokio::test]
    async fn an_idle_upstream_connection_the_server_closed_is_swept() {
        // Answers one request (keep-alive by default), then closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = listener.local_addr().unwrap();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    if !read_head(&mut s).await {
                        return;
                    }
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10000\r\n\r\n")
                        .await
                        .unwrap();
                    s.write_all(&text(10_000)).await.unwrap();
                    // Once the connection has gone idle at the proxy.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(s);
                    let _ = closed_tx.send(());
                });
            }
        });
        let pool = Arc::new(IdlePool::new(1, 4, LONG));
        one_client(origin, &pool).await;
        assert_eq!(pool.idle(), 1);
        timeout(LONG, closed.recv()).await.unwrap().unwrap();
        // The FIN reaches our socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.sweep(), None, "nothing left to look at");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn pool_max_conn_zero_keeps_nothing() {
        let origin = start_origin(origin_default).await;
        let pool = Arc::new(IdlePool::new(1, 0, LONG));
        one_client(origin.addr, &pool).await;
        one_client(origin.addr, &pool).await;
        assert_eq!(origin.accepts.load(SeqCst), 2);
        assert_eq!(pool.idle(), 0);
    }

    /// An origin that answers the first request of each connection and
    /// closes the connection when the second one arrives, without a word:
    /// a server that timed out an idle keep-alive connection just as we
    /// reused it.
    async fn start_closing_origin() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    if !read_head(&mut s).await {
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // The next request is read, then the connection closes.
                    let _ = s.read(&mut [0u8; 4096]).await;
                });
            }
        });
        (addr, accepts, task)
    }

    #[tokio::test]
    async fn a_get_on_a_reused_connection_the_server_closed_is_repeated() {
        let (addr, accepts, task) = start_closing_origin().await;
        let mut proxy = Proxy::start(addr, settings()).await;
        for _ in 0..3 {
            let (parts, body) = proxy.fetch(get(&[])).await;
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(&body[..], b"ok");
        }
        // Each GET after the first met a closed connection and went again
        // on a new one.
        assert_eq!(accepts.load(SeqCst), 3);
        task.abort();
    }

    #[tokio::test]
    async fn a_post_on_a_reused_connection_the_server_closed_is_not_repeated() {
        let (addr, accepts, task) = start_closing_origin().await;
        let mut proxy = Proxy::start(addr, settings()).await;
        let (parts, _) = proxy.fetch(get(&[])).await;
        assert_eq!(parts.status, StatusCode::OK);
        let post = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header(header::HOST, "example.test")
            .body(full(Bytes::from_static(b"once only")))
            .unwrap();
        let (parts, _) = proxy.fetch(post).await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
        assert_eq!(accepts.load(SeqCst), 1);
        task.abort();
    }
}
