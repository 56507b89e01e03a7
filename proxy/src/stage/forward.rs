//! Layer-4 forwarding: round-robin over a backend's servers, next server when
//! one refuses or times out, then a plain byte copy in both directions.

use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use std::sync::Arc;

use super::splice::Pipes;
use crate::{
    config::{Addr, Backend},
    health::{Health, ServerHealth},
    stage::socket::{self as net, Stream},
    stats::counters::{Metered, Registry, ServerCounter, ServerMetrics},
};

/// The servers of one backend and where the round-robin stands.
pub struct Pool {
    pub name: String,
    servers: Vec<PoolServer>,
    connect_timeout: Duration,
    next: AtomicUsize,
}

/// One server with its figures and its health.
struct PoolServer {
    addr: Addr,
    /// `addr` as text, made once (access lines, errors).
    name: Arc<str>,
    metrics: Arc<ServerMetrics>,
    /// Whether the checks (this generation's or the active one's) say UP.
    health: Arc<ServerHealth>,
}

/// Why a connection could not be forwarded: which side failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream: backend {backend}: all {tried} servers failed, last {server}: {source}")]
    NoServer {
        backend: String,
        tried: usize,
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream: server {server}: writing the PROXY header: {source}")]
    Preamble {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("copying between client and server: {0}")]
    Copy(#[source] io::Error),
    #[error("no byte in either direction for {0:?} (tunnel_timeout): closed")]
    TunnelIdle(Duration),
}

/// Bytes moved by one forwarded connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    pub from_client: u64,
    pub from_server: u64,
}

impl Pool {
    pub fn new(backend: &Backend, metrics: &Registry, health: &Health) -> Self {
        Self {
            name: backend.name.clone(),
            servers: backend
                .servers
                .iter()
                .map(|s| PoolServer {
                    addr: s.addr.clone(),
                    name: Arc::from(s.addr.to_string()),
                    metrics: metrics.server(&backend.name, &s.to_string()),
                    health: health.server(&backend.name, &s.addr),
                })
                .collect(),
            connect_timeout: backend.connect_timeout,
            next: AtomicUsize::new(0),
        }
    }

    /// How many servers the backend has.
    pub fn servers(&self) -> usize {
        self.servers.len()
    }

    /// The name (address) of server `i`.
    pub fn server_name(&self, i: usize) -> &Arc<str> {
        &self.servers[i].name
    }

    /// The next server in turn: round-robin over the UP servers, or over
    /// all of them when none is UP.
    pub fn pick(&self) -> usize {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let up = self.servers.iter().filter(|s| s.health.is_up()).count();
        if up == 0 {
            return turn % self.servers.len();
        }
        self.servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.health.is_up())
            .nth(turn % up)
            .map_or(0, |(i, _)| i)
    }

    /// Connects to the next UP server in turn (round-robin over the UP
    /// servers), trying each UP server once. When no server is UP, every
    /// server is tried in turn: a check can be wrong where a connection
    /// still works, and a refused connect costs little.
    pub async fn connect(&self) -> Result<(Metered<Stream>, &Addr), ForwardError> {
        let (stream, i) = self.connect_from(self.pick()).await?;
        Ok((stream, &self.servers[i].addr))
    }

    /// Connects to server `start`, or to the UP servers after it in turn,
    /// each tried once (all of them when none is UP); gives the index of
    /// the server reached.
    pub async fn connect_from(
        &self,
        start: usize,
    ) -> Result<(Metered<Stream>, usize), ForwardError> {
        let n = self.servers.len();
        let up = self.servers.iter().filter(|s| s.health.is_up()).count();
        let mut last = None;
        let mut tried = 0;
        // A state may change while we choose: a pass that found no UP
        // server left is followed by a pass over all of them.
        for only_up in [up > 0, false] {
            for k in 0..n {
                let i = (start + k) % n;
                let server = &self.servers[i];
                if only_up && !server.health.is_up() {
                    continue;
                }
                tried += 1;
                match self.try_server(server).await {
                    Ok(stream) => return Ok((stream, i)),
                    Err(e) => last = Some((&server.name, e)),
                }
            }
            if last.is_some() {
                break;
            }
        }
        let (server, source) = last.expect("a validated backend has servers");
        Err(ForwardError::NoServer {
            backend: self.name.clone(),
            tried,
            server: server.to_string(),
            source,
        })
    }

    /// One connect attempt, counted; a failure marks the server down in
    /// the passive `up` figure.
    async fn try_server(&self, s: &PoolServer) -> io::Result<Metered<Stream>> {
        let (server, metrics) = (&s.addr, &s.metrics);
        let err = match timeout(self.connect_timeout, net::connect(server)).await {
            Ok(Ok(stream)) => {
                metrics[ServerCounter::Up].store(1, Ordering::Relaxed);
                return Ok(Metered::server(stream, metrics));
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.connect_timeout),
            ),
        };
        metrics[ServerCounter::Errors].fetch_add(1, Ordering::Relaxed);
        if metrics[ServerCounter::Up].swap(0, Ordering::Relaxed) == 1 {
            tracing::warn!(backend = %self.name, %server, error = %err, "server DOWN");
        }
        tracing::debug!(backend = %self.name, %server, error = %err, "server refused, trying the next");
        Err(err)
    }

    /// Connects to a server and writes `preamble` (a PROXY v2 header, or
    /// nothing) before anything else.
    pub async fn connect_with(
        &self,
        preamble: &[u8],
    ) -> Result<(Metered<Stream>, String), ForwardError> {
        let (stream, i) = self.connect_from_with(self.pick(), preamble).await?;
        Ok((stream, self.servers[i].name.to_string()))
    }

    /// [`Pool::connect_from`], then `preamble` written first.
    pub async fn connect_from_with(
        &self,
        start: usize,
        preamble: &[u8],
    ) -> Result<(Metered<Stream>, usize), ForwardError> {
        let (mut server, i) = self.connect_from(start).await?;
        if !preamble.is_empty() {
            server
                .write_all(preamble)
                .await
                .map_err(|source| ForwardError::Preamble {
                    server: self.servers[i].name.to_string(),
                    source,
                })?;
        }
        Ok((server, i))
    }

    /// Forwards `client` to a server until both directions are closed, or
    /// neither side sent a byte for `idle_limit` (HAProxy `timeout tunnel`).
    /// With `splice`, a plain socket client goes through splice(2)
    /// ([`super::splice`]); any other through a buffer.
    pub async fn forward<IO>(
        &self,
        mut client: IO,
        preamble: &[u8],
        idle_limit: Duration,
        splice: bool,
    ) -> Result<(Transfer, String), ForwardError>
    where
        IO: AsyncRead + AsyncWrite + super::socket::Splice + Unpin,
    {
        let (mut server, addr) = match self.connect_with(preamble).await {
            Ok(ok) => ok,
            Err(e) => {
                // Close the client cleanly (FIN, not RST): nothing was sent.
                let _ = client.shutdown().await;
                return Err(e);
            }
        };
        let activity = Activity::default();
        let spliced = client
            .spliceable()
            .filter(|_| splice)
            .and_then(|plain| Some((plain, Pipes::take()?)));
        let copied = if let Some((plain, pipes)) = spliced {
            activity.start();
            tokio::select! {
                copied = super::splice::bidirectional(plain, &server, &pipes, &activity) => {
                    copied.map_err(ForwardError::Copy)
                }
                () = activity.idle_for(idle_limit) => Err(ForwardError::TunnelIdle(idle_limit)),
            }
        } else {
            let mut client_side = Watched::new(&mut client, &activity);
            let mut server_side = Watched::new(&mut server, &activity);
            let copy = tokio::io::copy_bidirectional(&mut client_side, &mut server_side);
            tokio::select! {
                copied = copy => copied.map_err(ForwardError::Copy),
                () = activity.idle_for(idle_limit) => Err(ForwardError::TunnelIdle(idle_limit)),
            }
        };
        let (from_client, from_server) = match copied {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the stream
            // ended, nothing was lost that the peer did not give up.
            Err(ForwardError::Copy(e)) if e.kind() == io::ErrorKind::UnexpectedEof => (0, 0),
            Err(e) => {
                // Whatever the client side still holds goes out before the
                // close: a TLS alert (a refused renegotiation, say) tells
                // the client why instead of leaving it to its own timeout.
                let _ = timeout(Duration::from_secs(1), client.shutdown()).await;
                return Err(e);
            }
        };
        Ok((
            Transfer {
                from_client,
                from_server,
            },
            addr,
        ))
    }
}

/// When a forwarded stream last moved a byte, either way (tcp mode, and
/// the upgraded tunnels of http mode).
#[derive(Default)]
pub(crate) struct Activity {
    /// Milliseconds after `start`.
    last_ms: std::sync::atomic::AtomicU64,
    start: std::sync::OnceLock<tokio::time::Instant>,
}

impl Activity {
    pub(crate) fn start(&self) -> tokio::time::Instant {
        *self.start.get_or_init(tokio::time::Instant::now)
    }

    pub(crate) fn touch(&self) {
        let ms = self.start().elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        let start = self.start();
        loop {
            let last = start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose reads and writes count as activity.
pub(crate) struct Watched<'a, S> {
    inner: S,
    activity: &'a Activity,
}

impl<'a, S> Watched<'a, S> {
    pub(crate) fn new(inner: S, activity: &'a Activity) -> Self {
        activity.start();
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{HEALTH_DOWN, HealthRecord};
    use tokio::io::{AsyncReadExt, duplex};

    use super::*;
    use crate::config::Config;

    /// A pool of three listening servers; returns it with their addresses
    /// and listeners (kept open, never accepted: connects succeed).
    async fn pool_of_three() -> (Pool, Arc<Health>, Vec<Addr>, Vec<tokio::net::TcpListener>) {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<Addr> = listeners
            .iter()
            .map(|l| Addr::Tcp(l.local_addr().unwrap()))
            .collect();
        let servers: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let text = format!(
            "[global]\nname = \"unit\"\n[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:1\"]\n\
             backend = \"app\"\n[[backend]]\nname = \"app\"\nservers = [{}]\n[backend.check]\n",
            servers.join(", ")
        );
        let cfg = Config::parse(&text, "unit.toml", &|_| None).unwrap();
        let health = Health::new(&cfg, None, 1);
        let pool = Pool::new(&cfg.backends[0], &Registry::new(&cfg), &health);
        (pool, health, addrs, listeners)
    }

    async fn picks(pool: &Pool, n: usize) -> Vec<Addr> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (_stream, addr) = pool.connect().await.expect("connects");
            out.push(addr.clone());
        }
        out
    }

    #[tokio::test]
    async fn round_robin_over_the_up_servers_only() {
        let (pool, health, addrs, _listeners) = pool_of_three().await;
        let count = |picked: &[Addr], a: &Addr| picked.iter().filter(|p| *p == a).count();
        let all = picks(&pool, 9).await;
        assert!(addrs.iter().all(|a| count(&all, a) == 3), "{all:?}");

        // The second server DOWN: the other two share evenly, it gets none.
        let down = HealthRecord {
            state: HEALTH_DOWN,
            ..Default::default()
        };
        health.server("app", &addrs[1]).set_for_tests(down);
        let two = picks(&pool, 10).await;
        assert_eq!(count(&two, &addrs[1]), 0, "{two:?}");
        assert_eq!((count(&two, &addrs[0]), count(&two, &addrs[2])), (5, 5));

        // All DOWN: every server is tried in turn rather than none.
        health.server("app", &addrs[0]).set_for_tests(down);
        health.server("app", &addrs[2]).set_for_tests(down);
        let none_up = picks(&pool, 6).await;
        assert!(addrs.iter().all(|a| count(&none_up, a) == 2), "{none_up:?}");
    }

    #[tokio::test]
    async fn activity_resets_the_idle_deadline() {
        let activity = Activity::default();
        let (a, mut b) = duplex(64);
        let mut watched = Watched::new(a, &activity);
        let limit = Duration::from_millis(400);
        let idle = activity.idle_for(limit);
        tokio::pin!(idle);
        let steps = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                watched.write_all(b"x").await.unwrap();
                let mut byte = [0u8];
                b.read_exact(&mut byte).await.unwrap();
            }
        };
        tokio::select! {
            () = &mut idle => panic!("idle while bytes moved every 250 ms"),
            () = steps => {}
        }
        let before = tokio::time::Instant::now();
        idle.await;
        let waited = before.elapsed();
        // Idle again from the last byte on: about `limit` (timers tick in ms).
        assert!(waited >= limit / 2 && waited < limit * 2, "{waited:?}");
    }
}
