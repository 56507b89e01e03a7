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

use crate::{
    config::{Addr, Backend},
    stage::socket::{self as net, Stream},
    stats::counters::{Metered, Registry, ServerCounter, ServerMetrics},
};

/// The servers of one backend and where the round-robin stands.
pub struct Pool {
    pub name: String,
    /// Each server with its figures.
    servers: Vec<(Addr, Arc<ServerMetrics>)>,
    connect_timeout: Duration,
    next: AtomicUsize,
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
    pub fn new(backend: &Backend, metrics: &Registry) -> Self {
        Self {
            name: backend.name.clone(),
            servers: backend
                .servers
                .iter()
                .map(|s| (s.clone(), metrics.server(&backend.name, &s.to_string())))
                .collect(),
            connect_timeout: backend.connect_timeout,
            next: AtomicUsize::new(0),
        }
    }

    /// Connects to the next server in turn, trying each server once.
    pub async fn connect(&self) -> Result<(Metered<Stream>, &Addr), ForwardError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.servers.len() {
            let (server, metrics) = &self.servers[(start + i) % self.servers.len()];
            let err = match timeout(self.connect_timeout, net::connect(server)).await {
                Ok(Ok(stream)) => {
                    metrics[ServerCounter::Up].store(1, Ordering::Relaxed);
                    return Ok((Metered::server(stream, metrics), server));
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
            last = Some((server, err));
        }
        let (server, source) = last.expect("a validated backend has servers");
        Err(ForwardError::NoServer {
            backend: self.name.clone(),
            tried: self.servers.len(),
            server: server.to_string(),
            source,
        })
    }

    /// Connects to a server and writes `preamble` (a PROXY v2 header, or
    /// nothing) before anything else.
    pub async fn connect_with(
        &self,
        preamble: &[u8],
    ) -> Result<(Metered<Stream>, String), ForwardError> {
        let (mut server, addr) = self.connect().await?;
        let addr = addr.to_string();
        if !preamble.is_empty() {
            server
                .write_all(preamble)
                .await
                .map_err(|source| ForwardError::Preamble {
                    server: addr.clone(),
                    source,
                })?;
        }
        Ok((server, addr))
    }

    /// Forwards `client` to a server until both directions are closed, or
    /// neither side sent a byte for `idle_limit` (HAProxy `timeout tunnel`).
    pub async fn forward<IO>(
        &self,
        mut client: IO,
        preamble: &[u8],
        idle_limit: Duration,
    ) -> Result<(Transfer, String), ForwardError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
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
        let copied = {
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
    fn start(&self) -> tokio::time::Instant {
        *self.start.get_or_init(tokio::time::Instant::now)
    }

    fn touch(&self) {
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
    use tokio::io::{AsyncReadExt, duplex};

    use super::*;

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
