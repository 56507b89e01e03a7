//! The counter table: every figure of a listener or a server is declared
//! once here (name, counter or gauge, Prometheus family and help, HTML
//! column), and the atomics, the snapshot, the pinned-map keys, the JSON
//! rows, the Prometheus exposition and the HTML tables are all generated
//! from it. Adding a counter is one entry in the table of
//! [`ListenerCounter`] or [`ServerCounter`].
//!
//! Counting is relaxed atomics on the connection tasks. The control loop
//! publishes a snapshot into the pinned metrics map every second under the
//! generation's slot; the stats page sums all generations (and the totals of
//! retired ones), so totals stay monotonic across a handover.

use std::{
    io,
    ops::Index,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use proxy_common::{OBJECT_NAME_LEN, ObjectName, Published};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{config::Config, stage::socket::ReadReady};

/// A running total, or a level (summed over live generations only).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// How the views show a value.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Show {
    /// A number.
    Count,
    /// A number of bytes (the HTML page says KiB, MiB...).
    Bytes,
    /// Up (> 0) or down: a boolean in JSON, 1 or 0 for Prometheus, UP or
    /// DOWN on the page.
    Flag,
    /// Not shown: only used to derive another figure.
    Hidden,
}

/// One counter of the table.
#[derive(Debug)]
pub struct Def {
    /// Key in JSON.
    pub name: &'static str,
    pub kind: Kind,
    pub show: Show,
    /// Prometheus family (the help is `help`).
    pub prometheus: &'static str,
    pub help: &'static str,
    /// HTML column header.
    pub column: &'static str,
    /// Initial value (a server is up until a connection attempt fails).
    pub initial: u64,
}

/// A table of counters: an enum whose variants index [`Table::DEFS`].
pub trait Table: Copy + Into<usize> + 'static {
    const DEFS: &'static [Def];
    /// What the object is called in the pinned map's object names.
    const OBJECT: &'static str;
}

macro_rules! table {
    ($(#[$meta:meta])* $Enum:ident, $object:literal {
        $($Var:ident: $name:literal, $kind:ident, $show:ident, $initial:literal,
            $prom:literal, $help:literal, $column:literal;)*
    }) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum $Enum {
            $(#[doc = $help] $Var,)*
        }
        impl From<$Enum> for usize {
            fn from(c: $Enum) -> usize {
                c as usize
            }
        }
        impl Table for $Enum {
            const DEFS: &'static [Def] = &[$(Def {
                name: $name,
                kind: Kind::$kind,
                show: Show::$show,
                prometheus: $prom,
                help: $help,
                column: $column,
                initial: $initial,
            },)*];
            const OBJECT: &'static str = $object;
        }
    };
}

table! {
    /// Figures of one listener; the order is the order of the HTML columns.
    ListenerCounter, "listener" {
        Current: "current", Gauge, Count, 0, "proxy_listener_current_connections",
            "Open client connections.", "open";
        Total: "total", Counter, Count, 0, "proxy_listener_connections_total",
            "Client connections accepted.", "total";
        BytesIn: "bytes_in", Counter, Bytes, 0, "proxy_listener_received_bytes_total",
            "Bytes read from clients.", "bytes in";
        BytesOut: "bytes_out", Counter, Bytes, 0, "proxy_listener_sent_bytes_total",
            "Bytes written to clients.", "bytes out";
        Errors: "errors", Counter, Count, 0, "proxy_listener_errors_total",
            "Client connections that ended in an error.", "errors";
        TlsHandshakes: "tls_handshakes", Counter, Count, 0, "proxy_listener_tls_handshakes_total",
            "Completed TLS handshakes.", "TLS handshakes";
        TlsResumed: "tls_resumed", Counter, Count, 0, "proxy_listener_tls_resumed_total",
            "TLS handshakes that resumed an earlier session.", "TLS resumed";
        TlsFailures: "tls_failures", Counter, Count, 0,
            "proxy_listener_tls_handshake_failures_total", "Failed TLS handshakes.", "TLS failures";
        ProxyHeaderErrors: "proxy_header_errors", Counter, Count, 0,
            "proxy_listener_proxy_header_errors_total", "Bad or missing PROXY v2 headers.",
            "PROXY errors";
        HttpRequests: "http_requests", Counter, Count, 0, "proxy_listener_http_requests_total",
            "HTTP requests served.", "HTTP requests";
        Http5xx: "http_5xx", Counter, Count, 0, "proxy_listener_http_5xx_responses_total",
            "HTTP responses with a 5xx status, the server's or our own (502, 504).", "HTTP 5xx";
        BodyIn: "body_in", Counter, Hidden, 0, "",
            "Response body bytes before compression (http mode).", "";
        BodyOut: "body_out", Counter, Hidden, 0, "",
            "Response body bytes after compression (http mode).", "";
        // Appended after the others: the index is the key in the pinned map,
        // which generations of different builds share.
        TunnelsOpen: "tunnels", Gauge, Count, 0, "proxy_listener_current_tunnels",
            "Open upgraded HTTP connections (WebSocket and other 101 tunnels).", "tunnels";
        TunnelsTotal: "tunnels_total", Counter, Count, 0, "proxy_listener_tunnels_total",
            "HTTP connections upgraded into tunnels.", "tunnels total";
    }
}

/// The listener counters that, summed over a generation's listeners, give
/// its connections and its errors (see [`connections_and_errors`]): what a
/// canary is judged by.
pub const CONNECTIONS_AND_ERRORS: [u32; 3] = [
    ListenerCounter::Total as u32,
    ListenerCounter::Errors as u32,
    ListenerCounter::Http5xx as u32,
];

/// (connections, errors) from the sums of [`CONNECTIONS_AND_ERRORS`]: a
/// connection that ended in an error, and every 5xx response, is an error.
pub fn connections_and_errors(sums: &[u64]) -> (u64, u64) {
    (sums[0], sums[1] + sums[2])
}

/// The figure derived from [`ListenerCounter::BodyIn`] and
/// [`ListenerCounter::BodyOut`]: compressed / original response body bytes,
/// None when nothing went through the compressor.
pub const COMPRESSION_RATIO: Def = Def {
    name: "compression_ratio",
    kind: Kind::Gauge,
    show: Show::Count,
    prometheus: "proxy_listener_compression_ratio",
    help: "Compressed / original response body bytes (0 when nothing was compressed).",
    column: "gzip ratio",
    initial: 0,
};

pub fn compression_ratio(body_in: u64, body_out: u64) -> Option<f64> {
    (body_in > 0).then(|| body_out as f64 / body_in as f64)
}

table! {
    /// Figures of one backend server; the order is the order of the HTML
    /// columns.
    ServerCounter, "server" {
        Up: "up", Gauge, Flag, 1, "proxy_server_up",
            "1 when the server is up: its health checks say so, or, unchecked, its last \
            connection attempt succeeded.", "status";
        Current: "current", Gauge, Count, 0, "proxy_server_current_connections",
            "Open connections to the server.", "open";
        Total: "total", Counter, Count, 0, "proxy_server_connections_total",
            "Connections made to the server.", "total";
        BytesOut: "bytes_out", Counter, Bytes, 0, "proxy_server_sent_bytes_total",
            "Bytes sent to the server.", "bytes to";
        BytesIn: "bytes_in", Counter, Bytes, 0, "proxy_server_received_bytes_total",
            "Bytes received from the server.", "bytes from";
        Errors: "errors", Counter, Count, 0, "proxy_server_connect_errors_total",
            "Failed connection attempts.", "connect errors";
    }
}

/// The atomics of one object, indexed by its table's enum.
pub struct Figures<T: Table> {
    values: Box<[AtomicU64]>,
    _table: std::marker::PhantomData<T>,
}

impl<T: Table> Default for Figures<T> {
    fn default() -> Self {
        Self {
            values: T::DEFS.iter().map(|d| AtomicU64::new(d.initial)).collect(),
            _table: std::marker::PhantomData,
        }
    }
}

impl<T: Table> Index<T> for Figures<T> {
    type Output = AtomicU64;
    fn index(&self, c: T) -> &AtomicU64 {
        &self.values[c.into()]
    }
}

impl<T: Table> Figures<T> {
    /// (counter index, value) for every counter of the table.
    pub fn values(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u32, v.load(Relaxed)))
    }
}

impl<T: Table> std::fmt::Debug for Figures<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                T::DEFS
                    .iter()
                    .zip(self.values())
                    .map(|(d, (_, v))| (d.name, v)),
            )
            .finish()
    }
}

pub type ListenerMetrics = Figures<ListenerCounter>;
pub type ServerMetrics = Figures<ServerCounter>;

/// The name under which an object's counters are kept in the pinned map:
/// `listener/<name>` or `server/<backend>/<server>`. None when too long for
/// the map (its counters then stay in-process).
pub fn object_name<T: Table>(parts: &[&str]) -> Option<ObjectName> {
    let mut name = [0u8; OBJECT_NAME_LEN];
    let mut at = 0;
    for part in std::iter::once(T::OBJECT).chain(parts.iter().copied()) {
        let sep = usize::from(at > 0);
        let bytes = part.as_bytes();
        if at + sep + bytes.len() > OBJECT_NAME_LEN {
            return None;
        }
        if sep == 1 {
            name[at] = b'/';
        }
        name[at + sep..at + sep + bytes.len()].copy_from_slice(bytes);
        at += sep + bytes.len();
    }
    Some(ObjectName { name })
}

/// A listener or server with its pinned-map name and its atomics.
pub struct Counted<T: Table> {
    pub name: Option<ObjectName>,
    pub figures: Arc<Figures<T>>,
}

/// All counters of this generation.
pub struct Registry {
    pub listeners: Vec<(String, Counted<ListenerCounter>)>,
    /// (backend, server, figures)
    pub servers: Vec<(String, String, Counted<ServerCounter>)>,
}

impl Registry {
    pub fn new(cfg: &Config) -> Self {
        Self {
            listeners: cfg
                .listeners
                .iter()
                .map(|l| {
                    let counted = Counted {
                        name: object_name::<ListenerCounter>(&[&l.name]),
                        figures: Arc::default(),
                    };
                    (l.name.clone(), counted)
                })
                .collect(),
            servers: cfg
                .backends
                .iter()
                .flat_map(|b| {
                    b.servers.iter().map(|s| {
                        let server = s.to_string();
                        let counted = Counted {
                            name: object_name::<ServerCounter>(&[&b.name, &server]),
                            figures: Arc::default(),
                        };
                        (b.name.clone(), server, counted)
                    })
                })
                .collect(),
        }
    }

    /// No listeners, no servers (for tests and `proxy check`).
    pub fn empty() -> Self {
        Self {
            listeners: Vec::new(),
            servers: Vec::new(),
        }
    }

    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.figures.clone())
            .unwrap_or_default()
    }

    pub fn server(&self, backend: &str, server: &str) -> Arc<ServerMetrics> {
        self.servers
            .iter()
            .find(|(b, s, _)| b == backend && s == server)
            .map(|(_, _, c)| c.figures.clone())
            .unwrap_or_default()
    }

    /// Every figure of every object that has a pinned-map name.
    pub fn snapshot(&self) -> Vec<Published> {
        fn figures<T: Table>(c: &Counted<T>) -> impl Iterator<Item = Published> + '_ {
            c.name.into_iter().flat_map(|object| {
                c.figures.values().map(move |(counter, value)| {
                    let gauge = T::DEFS[counter as usize].kind == Kind::Gauge;
                    (object, counter, gauge, value)
                })
            })
        }
        self.listeners
            .iter()
            .flat_map(|(_, c)| figures(c))
            .chain(self.servers.iter().flat_map(|(_, _, c)| figures(c)))
            .collect()
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
        m[ServerCounter::Current].fetch_add(1, Relaxed);
        m[ServerCounter::Total].fetch_add(1, Relaxed);
        Self {
            inner,
            sink: Sink::Server(m.clone()),
        }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub(crate) fn count_read(&self, n: u64) {
        match &self.sink {
            Sink::Client(m) => m[ListenerCounter::BytesIn].fetch_add(n, Relaxed),
            Sink::Server(m) => m[ServerCounter::BytesIn].fetch_add(n, Relaxed),
        };
    }

    pub(crate) fn count_written(&self, n: u64) {
        match &self.sink {
            Sink::Client(m) => m[ListenerCounter::BytesOut].fetch_add(n, Relaxed),
            Sink::Server(m) => m[ServerCounter::BytesOut].fetch_add(n, Relaxed),
        };
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        if let Sink::Server(m) = &self.sink {
            m[ServerCounter::Current].fetch_sub(1, Relaxed);
        }
    }
}

impl<S: ReadReady> ReadReady for Metered<S> {
    const TELLS: bool = S::TELLS;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
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

    /// Passed through, so that a TLS stack's final writev (ServerHello and a
    /// fatal alert, say) goes out whole instead of its first buffer only.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.count_written(*n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
