//! The load generator: keep-alive HTTP/1.1 clients (hyper's connection-level
//! client, over plain TCP or rustls), new-connection loops for layer 4 and
//! for TLS handshakes, and the checks that every answer carries the right
//! bytes. Every target is driven by the same code, so the figures differ
//! only by what sits between the client and the backend.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, client::conn::http1::SendRequest, header};
use proxy_harness::{bodies::try_gunzip, http::http_handshake};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::TlsConnector;

use crate::{backend, stats::Sample};

/// Longest any single connect, handshake or request/response may take before
/// the run is declared failed: far above any healthy latency here.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Caps on work per run, so that every loop is bounded in count as well as
/// in time whatever `--seconds` says.
const MAX_REQUESTS_PER_RUN: u64 = 20_000_000;
/// New connections per run: also keeps the TIME_WAIT sockets and ephemeral
/// ports of the namespace well within the kernel's defaults.
pub const MAX_NEW_CONNECTIONS_PER_RUN: u64 = 25_000;
/// Reconnections one keep-alive worker may make (servers may close a
/// keep-alive connection at any time; a storm of them is a failure).
const MAX_OPENS_PER_WORKER: u64 = 1_000;

/// Anything a client can speak HTTP over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a client reaches a target.
#[derive(Clone)]
pub enum Dialer {
    Tcp(SocketAddr),
    /// TLS with SNI `localhost`.
    Tls {
        addr: SocketAddr,
        connector: TlsConnector,
    },
}

impl Dialer {
    /// A connected (and, for TLS, handshaken) stream.
    pub async fn connect(&self) -> Result<Box<dyn Io>> {
        let addr = match self {
            Dialer::Tcp(addr) | Dialer::Tls { addr, .. } => *addr,
        };
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        // Requests are single small writes: don't let Nagle delay them.
        tcp.set_nodelay(true)?;
        match self {
            Dialer::Tcp(_) => Ok(Box::new(tcp)),
            Dialer::Tls { connector, .. } => {
                let name = ServerName::try_from("localhost").expect("a valid DNS name");
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {addr}"))?;
                Ok(Box::new(tls))
            }
        }
    }
}

/// What the body of a response must be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Encoding {
    /// Sent as it is: no Content-Encoding, body equal to the original.
    Identity,
    /// `Content-Encoding: gzip`, decompressing to the original.
    Gzip,
}

/// One HTTP target: where, what to ask, what must come back.
pub struct HttpTarget {
    pub dialer: Dialer,
    pub path: &'static str,
    /// Send `Accept-Encoding: gzip`.
    pub accept_gzip: bool,
    pub expect: Encoding,
    /// The body the backend serves for `path`.
    pub original: Bytes,
}

/// A response as the checks need it.
pub struct Reply {
    pub status: StatusCode,
    pub content_encoding: Option<String>,
    /// The body as it came over the wire (after de-chunking, before any
    /// decompression).
    pub body: Bytes,
}

type Sender = SendRequest<Empty<Bytes>>;

/// Opens a keep-alive HTTP/1.1 connection; its driver runs in a task that
/// ends when the sender is dropped or the server closes.
async fn open(dialer: &Dialer) -> Result<Sender> {
    let io = dialer.connect().await?;
    http_handshake(io)
        .await
        .context("HTTP/1.1 client handshake")
}

fn request(target: &HttpTarget, close: bool) -> Request<Empty<Bytes>> {
    let mut req = Request::get(target.path).header(header::HOST, "localhost");
    if target.accept_gzip {
        req = req.header(header::ACCEPT_ENCODING, "gzip");
    }
    if close {
        req = req.header(header::CONNECTION, "close");
    }
    req.body(Empty::new()).expect("a valid static request")
}

async fn exchange(sender: &mut Sender, req: Request<Empty<Bytes>>) -> Result<Reply> {
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    let content_encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    Ok(Reply {
        status: parts.status,
        content_encoding,
        body,
    })
}

/// One request on a fresh connection (for probes before a run).
pub async fn fetch_once(target: &HttpTarget) -> Result<Reply> {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut sender = open(&target.dialer).await?;
        exchange(&mut sender, request(target, true)).await
    })
    .await
    .map_err(|_| anyhow!("no response within {IO_TIMEOUT:?}"))?
}

/// Checks a reply against the target's expectations. `deep` also
/// decompresses a gzip body (the costly part, sampled during load).
pub fn check(target: &HttpTarget, reply: &Reply, deep: bool) -> Result<()> {
    ensure!(
        reply.status == StatusCode::OK,
        "status {} for GET {}",
        reply.status,
        target.path
    );
    match target.expect {
        Encoding::Identity => {
            ensure!(
                reply.content_encoding.is_none(),
                "unexpected Content-Encoding {:?} for GET {}",
                reply.content_encoding,
                target.path
            );
            ensure!(
                reply.body == target.original,
                "wrong body for GET {}: {} bytes, expected the {} bytes the backend sent",
                target.path,
                reply.body.len(),
                target.original.len()
            );
        }
        Encoding::Gzip => {
            ensure!(
                reply.content_encoding.as_deref() == Some("gzip"),
                "expected Content-Encoding gzip for GET {}, got {:?}",
                target.path,
                reply.content_encoding
            );
            if deep {
                let plain = gunzip(&reply.body)
                    .with_context(|| format!("decompressing GET {}", target.path))?;
                ensure!(
                    plain == target.original,
                    "gzip body of GET {} decompresses to {} bytes that differ from the {} \
                     bytes the backend sent",
                    target.path,
                    plain.len(),
                    target.original.len()
                );
            }
        }
    }
    Ok(())
}

/// Decompresses a whole gzip stream (bounded: a body that inflates past
/// 16 MiB is wrong here anyway).
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    try_gunzip(data, 16 << 20).context("invalid gzip data")
}

/// `connections` keep-alive clients sending requests back to back for
/// `duration`. Fails on the first wrong answer or failed request.
pub async fn keepalive(
    target: Arc<HttpTarget>,
    connections: usize,
    duration: Duration,
) -> Result<Sample> {
    let start = Instant::now();
    let deadline = start + duration;
    let cap = (MAX_REQUESTS_PER_RUN / connections as u64).max(1);
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        workers.spawn(keepalive_worker(target.clone(), deadline, cap));
    }
    let mut total = Sample::default();
    // Dropping the JoinSet on an early return aborts the other workers.
    while let Some(done) = workers.join_next().await {
        total.merge(done.context("a client task panicked")??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn keepalive_worker(target: Arc<HttpTarget>, deadline: Instant, cap: u64) -> Result<Sample> {
    let mut sample = Sample::default();
    let mut sender: Option<Sender> = None;
    let mut opened = 0u64;
    while sample.count < cap && Instant::now() < deadline {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            opened += 1;
            if opened > MAX_OPENS_PER_WORKER {
                bail!(
                    "the server closed more than {MAX_OPENS_PER_WORKER} keep-alive connections of one client"
                );
            }
            let fresh = tokio::time::timeout(IO_TIMEOUT, open(&target.dialer))
                .await
                .map_err(|_| anyhow!("connecting took more than {IO_TIMEOUT:?}"))??;
            sender = Some(fresh);
        }
        let s = sender.as_mut().expect("opened above");
        // A connection the server closed between two requests is not an
        // error: open another.
        if s.ready().await.is_err() {
            sender = None;
            continue;
        }
        let t0 = Instant::now();
        let reply = tokio::time::timeout(IO_TIMEOUT, exchange(s, request(&target, false)))
            .await
            .map_err(|_| anyhow!("no response within {IO_TIMEOUT:?}"))??;
        let latency = t0.elapsed();
        // Every response is checked; gzip ones are also decompressed now and
        // then (first and every 64th), which keeps client CPU out of the way.
        check(&target, &reply, sample.count % 64 == 0)?;
        sample.record(latency, reply.body.len());
    }
    Ok(sample)
}

/// New TCP connections per second: each connects, sends `REQ\n`, reads the
/// responder's 64 bytes until it closes.
pub async fn l4_connections(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<Sample> {
    let expected = Bytes::copy_from_slice(&backend::echo_reply());
    per_connection_run(connections, duration, move || {
        let expected = expected.clone();
        async move {
            let mut tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true)?;
            tcp.write_all(b"REQ\n").await?;
            let mut got = Vec::with_capacity(128);
            // The responder closes after its reply; a longer answer is wrong.
            (&mut tcp).take(4096).read_to_end(&mut got).await?;
            ensure!(
                got == expected,
                "wrong layer-4 reply from {addr}: {} bytes {:?}",
                got.len(),
                String::from_utf8_lossy(&got)
            );
            Ok(got.len())
        }
    })
    .await
}

/// New TLS connections per second: each makes a full handshake (no
/// resumption), sends one request with `Connection: close` and checks it.
pub async fn tls_connections(
    target: Arc<HttpTarget>,
    connections: usize,
    duration: Duration,
) -> Result<Sample> {
    per_connection_run(connections, duration, move || {
        let target = target.clone();
        async move {
            let mut sender = open(&target.dialer).await?;
            let reply = exchange(&mut sender, request(&target, true)).await?;
            check(&target, &reply, true)?;
            Ok(reply.body.len())
        }
    })
    .await
}

/// Runs `once` from `connections` concurrent loops until `duration` is over
/// or [`MAX_NEW_CONNECTIONS_PER_RUN`] were started. `once` returns the body
/// bytes it received.
async fn per_connection_run<F, Fut>(
    connections: usize,
    duration: Duration,
    once: F,
) -> Result<Sample>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<usize>> + Send,
{
    let start = Instant::now();
    let deadline = start + duration;
    let started = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        let once = once.clone();
        let started = started.clone();
        workers.spawn(async move {
            let mut sample = Sample::default();
            while Instant::now() < deadline
                && started.fetch_add(1, Ordering::Relaxed) < MAX_NEW_CONNECTIONS_PER_RUN
            {
                let t0 = Instant::now();
                let bytes = tokio::time::timeout(IO_TIMEOUT, once())
                    .await
                    .map_err(|_| anyhow!("a connection took more than {IO_TIMEOUT:?}"))??;
                sample.record(t0.elapsed(), bytes);
            }
            anyhow::Ok(sample)
        });
    }
    let mut total = Sample::default();
    while let Some(done) = workers.join_next().await {
        total.merge(done.context("a client task panicked")??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{Compression, write::GzEncoder};

    use super::*;

    fn target(expect: Encoding) -> HttpTarget {
        HttpTarget {
            dialer: Dialer::Tcp(SocketAddr::from(([127, 0, 0, 1], 9))),
            path: "/text",
            accept_gzip: expect == Encoding::Gzip,
            expect,
            original: Bytes::from_static(b"<p>hello hello hello</p>"),
        }
    }

    fn reply(encoding: Option<&str>, body: Vec<u8>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_encoding: encoding.map(String::from),
            body: Bytes::from(body),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn wrong_bytes_are_caught() {
        let id = target(Encoding::Identity);
        assert!(check(&id, &reply(None, id.original.to_vec()), true).is_ok());
        assert!(check(&id, &reply(None, b"<p>hello</p>".to_vec()), true).is_err());
        assert!(check(&id, &reply(Some("gzip"), id.original.to_vec()), true).is_err());

        let gz = target(Encoding::Gzip);
        assert!(check(&gz, &reply(Some("gzip"), gzip(&gz.original)), true).is_ok());
        assert!(check(&gz, &reply(Some("gzip"), gzip(b"other")), true).is_err());
        assert!(check(&gz, &reply(None, gz.original.to_vec()), true).is_err());
        let mut corrupt = gzip(&gz.original);
        corrupt.truncate(corrupt.len() / 2);
        assert!(check(&gz, &reply(Some("gzip"), corrupt), true).is_err());
    }
}
