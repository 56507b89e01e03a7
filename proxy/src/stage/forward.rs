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

    /// Forwards `client` to a server until both directions are closed.
    pub async fn forward<IO>(
        &self,
        mut client: IO,
        preamble: &[u8],
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
        let (from_client, from_server) =
            match tokio::io::copy_bidirectional(&mut client, &mut server).await {
                Ok(n) => n,
                // A TLS peer that closes without close_notify: the stream
                // ended, nothing was lost that the peer did not give up.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => (0, 0),
                Err(e) => return Err(ForwardError::Copy(e)),
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
