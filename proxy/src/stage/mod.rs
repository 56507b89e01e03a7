//! A stage: what one listener does with each accepted connection, and the
//! runtime it does it on.
//!
//! The pipeline of a connection is `[PROXY v1/v2 header] -> [TLS] -> tcp | http
//! -> backend [PROXY v2 header]`, each step configured per listener. A stage
//! with `cpus` runs on its own tokio runtime whose threads are pinned there,
//! the way HAProxy gives TLS or compression listeners their own cores.

pub mod forward;
pub mod http;
pub mod proxy_proto;
mod runtime;
pub mod socket;
mod splice;
pub mod stall;
pub mod tls;

pub use runtime::StageRuntime;
pub use splice::set_max_splicing;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, future};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::{info, warn};

use self::{
    forward::{ForwardError, Pool, Transfer},
    http::{Compression, HttpError, HttpSettings, Upstream},
    proxy_proto::{ProxyError, Versions},
    socket::{PeerAddr, Stream},
    tls::{TlsAcceptor, TlsError},
};
use crate::{
    config::{Backend, Config, Listener as ListenerConfig, Mode},
    health::Health,
    stats::counters::{ListenerCounter, ListenerMetrics, Metered, Registry},
};

/// Why a stage could not be built (bad certificates, no runtime).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("listener {listener}: TLS: {source}")]
    Tls {
        listener: String,
        #[source]
        source: TlsError,
    },
    #[error("listener {listener}: starting its runtime on CPUs {cpus:?}: {source}")]
    Runtime {
        listener: String,
        cpus: Vec<usize>,
        #[source]
        source: std::io::Error,
    },
}

/// Why one connection ended badly, by side.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("downstream: PROXY header: {0}")]
    ProxyHeader(#[from] ProxyError),
    #[error("downstream: TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Upstream(#[from] ForwardError),
    #[error("http: {0}")]
    Http(#[from] HttpError),
}

/// When a draining generation cuts what is left (`hard_stop_after` after
/// the drain began), and the window before it over which its upgraded
/// tunnels close (`close_spread_time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainDeadline {
    pub at: tokio::time::Instant,
    pub spread: Duration,
}

/// What a stage gets from its generation.
pub struct StageContext<'a> {
    /// Becomes true when the generation drains.
    pub draining: watch::Receiver<bool>,
    /// Set when the generation drains: tunnels close before it.
    pub drain_deadline: watch::Receiver<Option<DrainDeadline>>,
    pub metrics: &'a Registry,
    /// Server states (health checks), which the round-robin follows.
    pub health: &'a Health,
    /// This generation's number (0 without steering): sent to the next
    /// stage in the PROXY header, compared with the previous stage's.
    pub generation: u64,
}

/// What a listener's stage is made of, loaded once from the config
/// (certificates read, HTTP settings built): `proxy check` and `proxy run`
/// load the same.
pub struct StageSettings {
    pub name: String,
    backend: Backend,
    /// HTTP mode: compression and timeouts; None in tcp mode.
    http: Option<Arc<HttpSettings>>,
    /// Versions and deadline of the PROXY header, when the listener
    /// requires one.
    accept_proxy: Option<(Versions, Duration)>,
    tls: Option<TlsAcceptor>,
    /// tcp mode and upgraded http connections: the longest silence in
    /// both directions.
    tunnel_timeout: Duration,
    /// tcp mode: splice(2) between plain sockets (`global.splice`).
    splice: bool,
    /// http mode: the longest a response waits for the client to read.
    client_timeout: Duration,
    /// Write access lines.
    access_log: bool,
}

impl TryFrom<(&Config, &ListenerConfig)> for StageSettings {
    type Error = StageError;

    fn try_from((cfg, l): (&Config, &ListenerConfig)) -> Result<Self, StageError> {
        let backend = cfg.listener_backend(l);
        let tls = match &l.tls {
            Some(t) => {
                let mut settings = tls::TlsSettings::from(t);
                // An HTTP listener offers HTTP/2 unless told what to offer.
                if l.mode == Mode::Http && settings.alpn.is_empty() {
                    settings.alpn = vec!["h2".into(), "http/1.1".into()];
                }
                Some(
                    TlsAcceptor::new(&settings).map_err(|source| StageError::Tls {
                        listener: l.name.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Self {
            name: l.name.clone(),
            backend: backend.clone(),
            http: (l.mode == Mode::Http).then(|| {
                Arc::new(HttpSettings {
                    compression: l.compression.as_ref().map(Compression::from),
                    header_read_timeout: l.http_request_timeout,
                    max_header_size: l.max_header_size,
                    server_timeout: backend.server_timeout,
                    client_timeout: l.client_timeout,
                    http2: l.http2.clone(),
                    // The drain deadline and counters come with the
                    // generation, in Stage::new.
                    tunnel: http::upgrade::TunnelSettings {
                        idle_timeout: l.tunnel_timeout,
                        ..Default::default()
                    },
                    // The generation comes in Stage::new.
                    listener: Arc::from(l.name.as_str()),
                    generation: 0,
                    http1: Default::default(),
                    parked: Default::default(),
                })
            }),
            accept_proxy: Versions::of(l.accept_proxy).map(|v| (v, l.accept_proxy_timeout)),
            tls,
            tunnel_timeout: l.tunnel_timeout,
            splice: cfg.global.splice,
            client_timeout: l.client_timeout,
            access_log: l.access_log,
        })
    }
}

/// What one listener does with its connections.
pub struct Stage {
    /// The listener's name (shared by the access lines of HTTP requests).
    pub name: Arc<str>,
    generation: u64,
    pool: Arc<Pool>,
    /// http mode: idle server connections shared by the clients (none for a
    /// backend that gets a PROXY header, or `pool_max_conn = 0`).
    shared_idle: Option<Arc<http::IdlePool>>,
    /// Idle connections a client connection keeps for itself otherwise.
    own_idle: (usize, Duration),
    metrics: Arc<ListenerMetrics>,
    http: Option<Arc<HttpSettings>>,
    /// Becomes true when the generation drains: HTTP keep-alive connections
    /// then answer their next request with `Connection: close`.
    draining: watch::Receiver<bool>,
    accept_proxy: Option<(Versions, Duration)>,
    tls: Option<TlsAcceptor>,
    tunnel_timeout: Duration,
    splice: bool,
    client_timeout: Duration,
    /// Whether the backend wants a PROXY v2 header.
    send_proxy: bool,
    /// Rate limit of the lines about failed connections.
    failure_log: LogLimit,
    access_log: bool,
}

/// At most [`LogLimit::PER_SECOND`] lines a second about failed connections
/// per listener; the others are counted, and the count is logged once the
/// second is over (with the next failure).
#[derive(Default)]
pub struct LogLimit {
    /// The second (since `start`) the counts are for.
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl LogLimit {
    pub const PER_SECOND: u64 = 20;

    /// Whether one more line may be written now.
    pub fn allow(&self, listener: &str) -> bool {
        let now = self.start.get_or_init(Instant::now).elapsed().as_secs();
        let second = self.second.load(Relaxed);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.used.store(0, Relaxed);
            let suppressed = self.suppressed.swap(0, Relaxed);
            if suppressed > 0 {
                warn!(
                    listener,
                    suppressed,
                    "listener {listener}: {suppressed} failed connections were not logged \
                     (at most {} lines a second; the stats count all of them)",
                    Self::PER_SECOND
                );
            }
        }
        if self.used.fetch_add(1, Relaxed) < Self::PER_SECOND {
            true
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            false
        }
    }
}

/// Removes our generation TLV from `tlvs` and returns its value.
fn take_generation(tlvs: &mut Vec<(u8, Vec<u8>)>) -> Option<u64> {
    let i = tlvs
        .iter()
        .position(|(t, _)| *t == proxy_proto::tlv::PROXY_GENERATION)?;
    let (_, value) = tlvs.remove(i);
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

/// What a finished connection did, for its access line.
struct Done {
    transfer: Transfer,
    /// The server (tcp mode) or backend (http mode) it went to.
    server: String,
    requests: u64,
}

/// New upstream connections for the HTTP mode: a server of the pool, with the
/// PROXY header first when the backend wants one.
struct PoolUpstream {
    pool: Arc<Pool>,
    preamble: Vec<u8>,
}

impl Upstream for PoolUpstream {
    type Io = Metered<Stream>;

    fn servers(&self) -> usize {
        self.pool.servers()
    }

    fn pick(&self) -> usize {
        self.pool.pick()
    }

    fn connect(
        &self,
        server: usize,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<http::Connected<Metered<Stream>>>> + Send + '_>>
    {
        Box::pin(async move {
            let (io, server) = self
                .pool
                .connect_from_with(server, &self.preamble)
                .await
                .map_err(std::io::Error::other)?;
            Ok(http::Connected {
                io,
                server,
                name: self.pool.server_name(server).clone(),
            })
        })
    }
}

/// Idle server connections one client connection keeps for itself (HTTP/2
/// streams may have used several at once).
const MAX_OWN_IDLE: usize = 8;

/// The largest PROXY v2 header we accept: addresses plus generous TLVs.
const MAX_PROXY_HEADER: usize = 4096;

/// What serves a connection's payload once it is set up (`Stage::finish`).
type Payload = Pin<Box<dyn Future<Output = Result<Done, ConnError>> + Send>>;

/// What we know about the client when the payload starts.
struct ClientInfo {
    /// The real client (from the socket, or from a PROXY header).
    source: Option<SocketAddr>,
    /// The address it connected to.
    destination: Option<SocketAddr>,
    /// TLVs for the next hop: TLS details, or those a previous stage sent.
    tlvs: Vec<(u8, Vec<u8>)>,
    /// The previous stage belongs to an older generation, which is draining:
    /// in http mode, close this connection after its next response so that
    /// the client reconnects through the new generation's chain.
    from_older_generation: bool,
}

impl Stage {
    /// The stage of one listener, from its settings (loaded before, so that
    /// a bad certificate stops the generation before the flip).
    pub fn new(settings: StageSettings, ctx: StageContext<'_>) -> Arc<Self> {
        let StageSettings {
            name,
            backend,
            http,
            accept_proxy,
            tls,
            tunnel_timeout,
            splice,
            client_timeout,
            access_log,
        } = settings;
        let metrics = ctx.metrics.listener(&name);
        // Upgraded tunnels (http/upgrade.rs) count in the listener's figures
        // and close before the generation's drain deadline.
        let http = http.map(|h| {
            let mut h = (*h).clone();
            h.tunnel.drain_deadline = ctx.drain_deadline.clone();
            h.tunnel.metrics = metrics.clone();
            h.generation = ctx.generation;
            Arc::new(h)
        });
        Arc::new(Self {
            pool: Arc::new(Pool::new(&backend, ctx.metrics, ctx.health)),
            shared_idle: (http.is_some() && !backend.send_proxy_v2 && backend.pool_max_conn > 0)
                .then(|| {
                    Arc::new(http::IdlePool::new(
                        backend.servers.len(),
                        backend.pool_max_conn,
                        backend.pool_purge_delay,
                    ))
                }),
            own_idle: (
                backend.pool_max_conn.clamp(1, MAX_OWN_IDLE),
                backend.pool_purge_delay,
            ),
            metrics,
            name: Arc::from(name),
            generation: ctx.generation,
            http,
            draining: ctx.draining,
            accept_proxy,
            tls,
            tunnel_timeout,
            splice,
            client_timeout,
            send_proxy: backend.send_proxy_v2,
            failure_log: LogLimit::default(),
            access_log,
        })
    }

    /// Serves one accepted connection to its end, counts it, and writes its
    /// access log line: PROXY header, TLS, then the payload.
    ///
    /// The set-up (PROXY header, TLS handshake, what the payload's path
    /// needs of them) is a boxed future of its own, freed once the payload
    /// starts: the connection's task keeps only the payload's future and
    /// what the end's log line needs (the future went from 264 to 88
    /// bytes, and it is in every connection's task for the connection's
    /// life). An `async fn` per step instead would keep its own copy of
    /// the stream and of its other arguments for the connection's life.
    pub fn serve(
        self: Arc<Self>,
        stream: Stream,
        peer: PeerAddr,
    ) -> impl Future<Output = Result<(), ConnError>> + Send + 'static {
        let start = Instant::now();
        let m = &self.metrics;
        m[ListenerCounter::Current].fetch_add(1, Relaxed);
        m[ListenerCounter::Total].fetch_add(1, Relaxed);
        let client = ClientInfo {
            source: peer.socket_addr(),
            // Only a PROXY header for the backend needs it (a getsockname).
            destination: if self.send_proxy {
                stream.local_addr()
            } else {
                None
            },
            tlvs: Vec::new(),
            from_older_generation: false,
        };
        // Made here, not in the block below: what a block captures stays
        // in its future for good.
        let set_up = Box::pin(
            self.clone()
                .set_up(Metered::client(stream, m), client, peer),
        );
        async move {
            let (payload, client) = set_up.await;
            let result = payload.await;
            self.log_end(&result, start, &client);
            result.map(|_| ())
        }
    }

    /// The PROXY header and the TLS handshake, then the payload's future
    /// (or its failure), and the client for the log line: the real one (a
    /// PROXY header's), else the socket's `peer`.
    async fn set_up(
        self: Arc<Self>,
        mut stream: Metered<Stream>,
        mut client: ClientInfo,
        peer: PeerAddr,
    ) -> (Payload, PeerAddr) {
        if let Some((versions, deadline)) = self.accept_proxy {
            let read =
                proxy_proto::read_header(&mut stream, versions, deadline, MAX_PROXY_HEADER).await;
            match read {
                Ok((header, _)) => {
                    // LOCAL (health checks of the previous hop) keeps
                    // the socket's own addresses.
                    if header.source.is_some() {
                        client.source = header.source;
                        client.destination = header.destination;
                    }
                    client.tlvs = header.tlvs;
                    if let Some(theirs) = take_generation(&mut client.tlvs) {
                        client.from_older_generation =
                            self.generation > 0 && theirs < self.generation;
                    }
                }
                Err(e) => return (Box::pin(future::ready(Err(e.into()))), peer),
            }
        }
        // Each path is boxed (`finish`): a connection's task holds only
        // the state of the path it takes (TLS state alone is several KiB).
        let payload = if let Some(acceptor) = &self.tls {
            // Boxed too: the handshake's state, several KiB, does not size
            // the set-up of every connection.
            match Box::pin(acceptor.accept(stream)).await {
                Ok((tls, info)) => {
                    self.tls_accepted(&info, &mut client);
                    self.finish(tls::FlushingTls::new(tls), &client)
                }
                Err(e) => Box::pin(future::ready(Err(e.into()))),
            }
        } else {
            self.finish(stream, &client)
        };
        (payload, client.source.map_or(peer, PeerAddr::Tcp))
    }

    /// Counts a connection's end, and writes its access line (tcp mode; an
    /// HTTP request has its own) or its failure.
    fn log_end(&self, result: &Result<Done, ConnError>, start: Instant, client: &PeerAddr) {
        let m = &self.metrics;
        m[ListenerCounter::Current].fetch_sub(1, Relaxed);
        let duration_ms = start.elapsed().as_millis() as u64;
        match result {
            // HTTP requests have their own access lines.
            Ok(_) if self.http.is_some() || !self.access_log => {}
            Ok(done) => info!(
                target: "access",
                client = %client, listener = %self.name, server = %done.server,
                bytes_in = done.transfer.from_client, bytes_out = done.transfer.from_server,
                requests = done.requests, duration_ms, outcome = "ok",
            ),
            Err(e) => {
                m[ListenerCounter::Errors].fetch_add(1, Relaxed);
                match e {
                    ConnError::ProxyHeader(_) => {
                        m[ListenerCounter::ProxyHeaderErrors].fetch_add(1, Relaxed)
                    }
                    ConnError::Tls(_) => m[ListenerCounter::TlsFailures].fetch_add(1, Relaxed),
                    _ => 0,
                };
                // A flood of broken clients must not become a flood of log
                // I/O: the counters above count every one.
                if self.failure_log.allow(&self.name) {
                    if self.access_log {
                        info!(
                            target: "access",
                            client = %client, listener = %self.name, duration_ms,
                            outcome = "error", error = %e,
                        );
                    }
                    warn!(client = %client, listener = %self.name, "connection failed: {e}");
                }
            }
        }
    }

    /// Counts a TLS handshake, and keeps what it agreed for the backend's
    /// PROXY header and the HTTP protocol.
    fn tls_accepted(&self, info: &tls::TlsInfo, client: &mut ClientInfo) {
        self.metrics[ListenerCounter::TlsHandshakes].fetch_add(1, Relaxed);
        if info.resumed {
            self.metrics[ListenerCounter::TlsResumed].fetch_add(1, Relaxed);
        }
        client.tlvs = proxy_proto::tls_tlvs(
            info.sni.as_deref(),
            info.alpn.as_deref(),
            info.version,
            &info.cipher,
        );
    }

    /// The payload part: bytes to the backend (tcp mode) or HTTP/1.1
    /// requests (http mode).
    ///
    /// Not an `async fn`, so that an HTTP connection's future is the one of
    /// `http::serve` and a closure, without a second copy of `io` and the
    /// rest of the set-up (an idle keep-alive client holds it). Each path
    /// is boxed with its own size.
    fn finish<IO>(self: &Arc<Self>, io: IO, client: &ClientInfo) -> Payload
    where
        IO: AsyncRead + AsyncWrite + socket::ReadReady + socket::Splice + Unpin + Send + 'static,
    {
        let preamble = match self.preamble(client) {
            Ok(preamble) => preamble,
            Err(e) => return Box::pin(future::ready(Err(e))),
        };
        let this = self.clone();
        let Some(settings) = &self.http else {
            return Box::pin(async move {
                let (transfer, server) = this
                    .pool
                    .forward(io, &preamble, this.tunnel_timeout, this.splice)
                    .await?;
                Ok(Done {
                    transfer,
                    server,
                    requests: 0,
                })
            });
        };
        // With PROXY v2 upstream, the next stage adds X-Forwarded-For from
        // it (adding it here too would list the client twice).
        let forwarded_for = if self.send_proxy { None } else { client.source };
        // ALPN from our TLS handshake, or from the previous stage's header.
        let alpn = client
            .tlvs
            .iter()
            .find(|(t, _)| *t == proxy_proto::tlv::ALPN)
            .map(|(_, v)| v.as_slice());
        let downstream = http::Downstream {
            forwarded_for,
            protocol: http::Protocol::from_alpn(alpn),
            log: http::ConnLog::new(client.source, self.access_log),
            idle: match &self.shared_idle {
                Some(shared) => shared.clone(),
                None => Arc::new(http::IdlePool::new(
                    self.pool.servers(),
                    self.own_idle.0,
                    self.own_idle.1,
                )),
            },
        };
        let upstream = PoolUpstream {
            pool: self.pool.clone(),
            preamble,
        };
        let draining = if client.from_older_generation {
            watch::channel(true).1
        } else {
            self.draining.clone()
        };
        let io = stall::WriteStall::new(io, self.client_timeout);
        let serving = http::serve(io, upstream, settings.clone(), downstream, draining);
        Box::pin(serving.map(move |stats| {
            let stats = stats?;
            let m = &this.metrics;
            m[ListenerCounter::HttpRequests].fetch_add(stats.requests, Relaxed);
            m[ListenerCounter::Http5xx].fetch_add(stats.server_errors, Relaxed);
            m[ListenerCounter::BodyIn].fetch_add(stats.body_bytes_before, Relaxed);
            m[ListenerCounter::BodyOut].fetch_add(stats.body_bytes_after, Relaxed);
            Ok(Done {
                transfer: Transfer {
                    from_client: 0,
                    from_server: stats.body_bytes_after,
                },
                server: this.pool.name.clone(),
                requests: stats.requests,
            })
        }))
    }

    /// The PROXY v2 header for the backend, or nothing.
    fn preamble(&self, client: &ClientInfo) -> Result<Vec<u8>, ConnError> {
        if !self.send_proxy {
            return Ok(Vec::new());
        }
        let mut tlvs = client.tlvs.clone();
        if self.generation > 0 {
            tlvs.push((
                proxy_proto::tlv::PROXY_GENERATION,
                self.generation.to_be_bytes().to_vec(),
            ));
        }
        Ok(proxy_proto::encode_header(
            client.source,
            client.destination,
            &tlvs,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every connection's task holds for the connection's life, the
    /// payload's future aside (its own box): the set-up is gone by then
    /// (88 bytes; 264 when the future captured the stream and the client's
    /// set-up details). With the spawn's closure (40 bytes) and tokio's
    /// task header and trailer (about 110), the task fits 256 bytes (tokio
    /// aligns a task to 128).
    #[tokio::test]
    async fn a_connection_task_keeps_little_of_its_set_up() {
        let cfg = Config::for_tests("", "127.0.0.1:1", "mode = \"http\"");
        let registry = Registry::new(&cfg);
        let health = Health::new(&cfg, None, 0);
        let stage = Stage::new(
            StageSettings::try_from((&cfg, &cfg.listeners[0])).unwrap(),
            StageContext {
                draining: watch::channel(false).1,
                drain_deadline: watch::channel(None).1,
                metrics: &registry,
                health: &health,
                generation: 0,
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let serving = stage.serve(Stream::Tcp(server), PeerAddr::Tcp(peer));
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 96, "a connection's future is {size} bytes");
    }

    #[test]
    fn failure_lines_are_limited_per_second() {
        let limit = LogLimit::default();
        let allowed = (0..100).filter(|_| limit.allow("unit")).count() as u64;
        // All 100 fall in one second, or straddle two at most.
        assert!(
            (LogLimit::PER_SECOND..=2 * LogLimit::PER_SECOND).contains(&allowed),
            "{allowed}"
        );
        assert!(limit.suppressed.load(Relaxed) > 0 || allowed > LogLimit::PER_SECOND);
    }
}
