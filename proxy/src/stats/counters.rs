//! Counters of one generation: per listener and per backend server, the
//! figures an operator reads on the stats page.
//!
//! Counting is relaxed atomics on the connection tasks. The control loop
//! publishes a snapshot into the pinned metrics map every second under the
//! generation's slot; the stats page sums all generations (and the totals of
//! retired ones), so totals stay monotonic across a handover.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Config;

/// Figures of one listener.
#[derive(Default, Debug)]
pub struct ListenerMetrics {
    pub current: AtomicU64,
    pub total: AtomicU64,
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Connections that ended in an error (any side).
    pub errors: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Malformed, slow or missing PROXY headers.
    pub proxy_header_errors: AtomicU64,
    pub http_requests: AtomicU64,
    /// Response body bytes before and after compression (http mode).
    pub body_in: AtomicU64,
    pub body_out: AtomicU64,
}

/// Figures of one backend server.
#[derive(Debug)]
pub struct ServerMetrics {
    pub current: AtomicU64,
    pub total: AtomicU64,
    /// Bytes sent to the server.
    pub bytes_out: AtomicU64,
    /// Bytes received from the server.
    pub bytes_in: AtomicU64,
    /// Failed connection attempts.
    pub errors: AtomicU64,
    /// 1 when the last connection attempt succeeded.
    pub up: AtomicU64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            // Up until proven otherwise: nothing was tried yet.
            up: AtomicU64::new(1),
        }
    }
}

/// All counters of this generation.
pub struct Registry {
    pub listeners: Vec<(String, Arc<ListenerMetrics>)>,
    /// (backend, server, figures)
    pub servers: Vec<(String, String, Arc<ServerMetrics>)>,
}

impl Registry {
    pub fn new(cfg: &Config) -> Self {
        Self {
            listeners: cfg
                .listeners
                .iter()
                .map(|l| (l.name.clone(), Arc::default()))
                .collect(),
            servers: cfg
                .backends
                .iter()
                .flat_map(|b| {
                    b.servers
                        .iter()
                        .map(|s| (b.name.clone(), s.to_string(), Arc::default()))
                })
                .collect(),
        }
    }

    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    pub fn server(&self, backend: &str, server: &str) -> Arc<ServerMetrics> {
        self.servers
            .iter()
            .find(|(b, s, _)| b == backend && s == server)
            .map(|(_, _, m)| m.clone())
            .unwrap_or_default()
    }

    /// Every figure as (metric id, value); ids are what the pinned map and
    /// the stats page use.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (name, m) in &self.listeners {
            for (counter, value) in [
                ("current", &m.current),
                ("total", &m.total),
                ("bytes_in", &m.bytes_in),
                ("bytes_out", &m.bytes_out),
                ("errors", &m.errors),
                ("tls_handshakes", &m.tls_handshakes),
                ("tls_failures", &m.tls_failures),
                ("proxy_header_errors", &m.proxy_header_errors),
                ("http_requests", &m.http_requests),
                ("body_in", &m.body_in),
                ("body_out", &m.body_out),
            ] {
                out.push((format!("listener/{name}/{counter}"), value.load(Relaxed)));
            }
        }
        for (backend, server, m) in &self.servers {
            for (counter, value) in [
                ("current", &m.current),
                ("total", &m.total),
                ("bytes_in", &m.bytes_in),
                ("bytes_out", &m.bytes_out),
                ("errors", &m.errors),
                ("up", &m.up),
            ] {
                out.push((
                    format!("server/{backend}/{server}/{counter}"),
                    value.load(Relaxed),
                ));
            }
        }
        out
    }
}

/// A stream that counts the bytes it reads and writes.
pub struct Metered<S> {
    inner: S,
    sink: Sink,
}

/// Where a metered stream counts.
enum Sink {
    /// A client connection of a listener.
    Client(Arc<ListenerMetrics>),
    /// A connection to a backend server (open until drop).
    Server(Arc<ServerMetrics>),
}

impl<S> Metered<S> {
    /// Counts into a listener's figures (client side).
    pub fn client(inner: S, m: &Arc<ListenerMetrics>) -> Self {
        Self {
            inner,
            sink: Sink::Client(m.clone()),
        }
    }

    /// Counts into a server's figures, and its open connections until drop.
    pub fn server(inner: S, m: &Arc<ServerMetrics>) -> Self {
        m.current.fetch_add(1, Relaxed);
        m.total.fetch_add(1, Relaxed);
        Self {
            inner,
            sink: Sink::Server(m.clone()),
        }
    }

    fn count_read(&self, n: u64) {
        match &self.sink {
            Sink::Client(m) => m.bytes_in.fetch_add(n, Relaxed),
            Sink::Server(m) => m.bytes_in.fetch_add(n, Relaxed),
        };
    }

    fn count_written(&self, n: u64) {
        match &self.sink {
            Sink::Client(m) => m.bytes_out.fetch_add(n, Relaxed),
            Sink::Server(m) => m.bytes_out.fetch_add(n, Relaxed),
        };
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        if let Sink::Server(m) = &self.sink {
            m.current.fetch_sub(1, Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.count_read(n as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.count_written(*n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
