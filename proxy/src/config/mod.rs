//! Configuration file: loading, environment interpolation and validation.
//!
//! The proxy is configured by one TOML file with a `[global]` table, one or
//! more `[[listener]]` tables (addresses we accept connections on) and
//! `[[backend]]` tables (servers we forward them to):
//!
//! ```toml
//! [global]
//! name = "edge"
//! hard_stop_after = "30s"
//!
//! [[listener]]
//! name = "front"
//! bind = ["0.0.0.0:8080"]
//! backend = "app"
//!
//! [[backend]]
//! name = "app"
//! servers = ["127.0.0.1:9000", "${APP_SERVER:-127.0.0.1:9001}"]
//! ```
//!
//! Loading happens in three steps, each of which reports errors as
//! `<file>: <key path>: <what was wrong and what was expected>`:
//!
//! 1. The text is parsed as TOML into a generic value tree.
//! 2. `${VAR}` / `${VAR:-default}` references are expanded inside string
//!    values of that tree. Doing it after parsing (rather than substituting
//!    text) means a variable can never inject TOML syntax, and errors can name
//!    the key the reference appeared in.
//! 3. The tree is deserialized into [`Config`] (with `serde_path_to_error` so
//!    type, syntax and range errors of single values carry their key path) and
//!    then checked for the rules that span several values: unique names,
//!    existing backends, no address bound twice, non-empty lists.
//!
//! A [`Config`] returned by [`Config::load`] or [`Config::parse`] has passed
//! all checks, so the rest of the proxy can rely on them (for example
//! [`Config::listener_backend`] cannot fail).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::Deserializer;

mod de;
mod defaults;
mod error;
mod interpolate;
mod validate;

use self::{
    de::*,
    error::{key_path, syntax_error},
    interpolate::interpolate_tree,
};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub global: Global,
    /// `[[listener]]` tables; the TOML name is singular because each table
    /// describes one listener.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<Listener>,
    /// `[[backend]]` tables.
    #[serde(rename = "backend", default)]
    pub backends: Vec<Backend>,
    /// The instance-wide stats listener (`[stats]`), if any.
    #[serde(default)]
    pub stats: Option<StatsConfig>,
    /// `[defaults]`: values every listener and backend takes unless it sets
    /// its own (HAProxy's `defaults` section). Already applied to them.
    #[serde(default)]
    pub defaults: Defaults,
}

/// `[defaults]`: the timeouts and limits of every listener and backend that
/// does not set its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub client_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub http_request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub tunnel_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_max_header_size")]
    pub max_header_size: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub server_timeout: Option<Duration>,
}

/// A stats listener: HTML page, JSON and Prometheus views of the counters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsConfig {
    /// Loopback by default: the page shows internal addresses.
    #[serde(default = "default_stats_bind")]
    pub bind: SocketAddr,
    /// A line shown under the title (env interpolation applies).
    #[serde(default)]
    pub banner: String,
    /// At most this many open connections to the stats listener; more wait
    /// in the kernel queue (the traffic listeners keep their descriptors).
    #[serde(
        default = "default_stats_maxconn",
        deserialize_with = "de_stats_maxconn"
    )]
    pub maxconn: usize,
    /// How long a client may take to send its request head (and how long an
    /// idle keep-alive connection stays open).
    #[serde(
        default = "default_stats_request_timeout",
        deserialize_with = "de_duration"
    )]
    pub http_request_timeout: Duration,
}

/// Process-wide settings (`[global]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// Instance name. It ends up in pinned eBPF object paths under `bpffs`,
    /// which is why its character set is restricted.
    pub name: String,
    pub pidfile: Option<PathBuf>,
    /// How long an old generation may keep serving existing connections
    /// after an upgrade before they are cut.
    #[serde(default = "default_hard_stop_after", deserialize_with = "de_duration")]
    pub hard_stop_after: Duration,
    /// HAProxy's `close-spread-time`: a draining generation closes its
    /// upgraded connections (WebSocket tunnels) at instants drawn over this
    /// window before `hard_stop_after`, not all at the deadline; "0s" closes
    /// them all at once. Must be shorter than `hard_stop_after`. Default:
    /// 5s, at most half of `hard_stop_after` (see [`Global::close_spread`]).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub close_spread_time: Option<Duration>,
    /// At most this many client connections over all listeners of a
    /// generation (HAProxy's global `maxconn`); more wait in the kernel
    /// queues. The open-file limit is raised to what it needs (the hard
    /// limit too with CAP_SYS_RESOURCE); when it cannot be, the generation
    /// uses what the limit allows. Default: what the open-file limit allows
    /// (two descriptors a connection, some kept for listeners and logs, and
    /// the pipes of the tcp listeners that may splice: see `splice`).
    #[serde(default, deserialize_with = "de_maxconn")]
    pub maxconn: Option<usize>,
    /// Threads that run the listeners without `cpus` of their own
    /// (HAProxy's `nbthread`). `1`: one event loop on the main thread (a
    /// single-threaded scheduler, as HAProxy `nbthread 1` or nginx with one
    /// worker), the cheapest per request. Default: one worker thread per CPU
    /// (tokio's default; `TOKIO_WORKER_THREADS` sets it too).
    #[serde(default, deserialize_with = "de_nbthread")]
    pub nbthread: Option<usize>,
    /// tcp mode between plain sockets (no TLS on the listener) moves the
    /// bytes with splice(2) through a pipe per direction, never copying
    /// them to user space; `false`: through a buffer in the proxy
    /// (HAProxy's `nosplice`). Default: true. Pipes (four descriptors a
    /// connection) for at most a quarter of those listeners' `maxconn`, or
    /// of the global one when one of them has none (its default then
    /// counts three descriptors a connection instead of two); the other
    /// connections copy through a buffer.
    #[serde(default = "default_true")]
    pub splice: bool,
    /// Mount point of the BPF filesystem used to hand sockets over between
    /// generations.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default)]
    pub steering: SteeringMode,
    /// How long an old generation keeps accepting after it has seen that a
    /// new one is active. Covers the window in which the kernel may still
    /// queue connections on the old sockets.
    #[serde(default = "default_handover_grace", deserialize_with = "de_duration")]
    pub handover_grace: Duration,
    /// Run as this user once the pins exist: the process keeps only
    /// CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE.
    #[serde(default)]
    pub user: Option<String>,
    /// Group for `user` (default: the user's primary group).
    #[serde(default)]
    pub group: Option<String>,
    /// `[global.canary]`: how this generation, while active, judges a
    /// canary started beside it (`proxy run --canary`).
    #[serde(default)]
    pub canary: CanaryConfig,
}

/// `[global.canary]`: the active generation compares the canary's error
/// rate with its own over a sliding window and aborts a canary that does
/// worse; optionally it promotes one that stayed healthy.
///
/// An error is a client connection that ended in an error (upstream connect
/// or transfer failure, TLS or PROXY header failure, timeout) or an HTTP
/// response with a 5xx status (the server's or our own 502/504).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// Abort a canary whose error rate is too high (default true).
    #[serde(default = "default_true")]
    pub auto_abort: bool,
    /// The sliding window both error rates are measured over.
    #[serde(default = "default_canary_window", deserialize_with = "de_duration")]
    pub window: Duration,
    /// Canary connections within the window before it is judged at all.
    #[serde(
        default = "default_canary_min_connections",
        deserialize_with = "de_canary_min_connections"
    )]
    pub min_connections: u64,
    /// Abort when the canary's error rate exceeds the active generation's
    /// times this ...
    #[serde(default = "default_max_error_ratio")]
    pub max_error_ratio: f64,
    /// ... and this absolute rate (0.01 = 1%), so that one error against
    /// none is not an abort.
    #[serde(default = "default_min_error_rate")]
    pub min_error_rate: f64,
    /// Promote a canary that ran this long without being aborted (and was
    /// judged at least once); never when absent.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub promote_after: Option<Duration>,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            auto_abort: true,
            window: default_canary_window(),
            min_connections: default_canary_min_connections(),
            max_error_ratio: default_max_error_ratio(),
            min_error_rate: default_min_error_rate(),
            promote_after: None,
        }
    }
}

/// `accept_proxy`: which PROXY protocol header a listener requires before
/// the payload (`true`, `false`, `"v1"` or `"v2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceptProxy {
    /// `false`: no header; the first bytes are payload.
    #[default]
    Off,
    /// `true`: a v1 or v2 header, told apart by their signatures.
    Any,
    /// `"v1"`: only the v1 text line (nginx `proxy_protocol on`).
    V1,
    /// `"v2"`: only the binary v2 header (our own chained stages).
    V2,
}

/// How new connections are steered to the active generation's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// Use eBPF if it can be loaded, otherwise fall back to plain reuseport.
    #[default]
    Auto,
    /// Require eBPF steering; fail to start without it.
    Ebpf,
    /// Plain `SO_REUSEPORT` without a steering program.
    Reuseport,
}

impl fmt::Display for SteeringMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SteeringMode::Auto => "auto",
            SteeringMode::Ebpf => "ebpf",
            SteeringMode::Reuseport => "reuseport",
        })
    }
}

/// One `[[listener]]`: a set of addresses whose connections go to a backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: Vec<Addr>,
    /// Name of a `[[backend]]`.
    pub backend: String,
    /// At most this many open connections; further ones wait in the kernel
    /// accept queue.
    #[serde(default, deserialize_with = "de_maxconn")]
    pub maxconn: Option<usize>,
    /// Kernel accept queue length passed to `listen(2)`.
    #[serde(default = "default_backlog", deserialize_with = "de_backlog")]
    pub backlog: u32,
    /// `tcp`: a byte stream; `http`: HTTP/1.1 through hyper (where
    /// compression lives).
    #[serde(default)]
    pub mode: Mode,
    /// CPUs this listener's stage runs on (its own runtime, threads pinned);
    /// without it the stage shares the default runtime.
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// Require a PROXY header from the peer (a previous stage or a load
    /// balancer) and take the client address from it: `true` takes v1 or
    /// v2 (HAProxy's `accept-proxy`), `"v1"` or `"v2"` only that version.
    #[serde(default)]
    pub accept_proxy: AcceptProxy,
    /// One deadline for the whole PROXY header.
    #[serde(
        default = "default_accept_proxy_timeout",
        deserialize_with = "de_duration"
    )]
    pub accept_proxy_timeout: Duration,
    /// Permissions of UNIX socket files this listener binds (octal string).
    #[serde(default = "default_unix_mode", deserialize_with = "de_unix_mode")]
    pub unix_mode: u32,
    /// http mode: the longest request head (request line and headers) a
    /// client may send; a longer one is answered 431. HAProxy's buffer is
    /// 16 KiB, nginx's 4 x 8 KiB.
    #[serde(
        default = "default_max_header_size",
        deserialize_with = "de_max_header_size"
    )]
    pub max_header_size: usize,
    /// http mode (HAProxy `timeout http-request`): how long a client may
    /// take to send a whole request head; also how long an idle keep-alive
    /// connection waits for the next one (`timeout http-keep-alive`).
    #[serde(
        default = "default_http_request_timeout",
        deserialize_with = "de_duration"
    )]
    pub http_request_timeout: Duration,
    /// http mode (HAProxy `timeout client`): how long a response may wait
    /// for the client to read before the connection is closed.
    #[serde(default = "default_client_timeout", deserialize_with = "de_duration")]
    pub client_timeout: Duration,
    /// tcp mode (HAProxy `timeout tunnel`): a stream on which neither side
    /// sent a byte for this long is closed.
    #[serde(default = "default_tunnel_timeout", deserialize_with = "de_duration")]
    pub tunnel_timeout: Duration,
    /// TLS termination (`[listener.tls]`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// gzip compression of responses, http mode only (`[listener.compression]`).
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
    /// HTTP/2 limits, http mode (`[listener.http2]`); h2 itself is chosen by
    /// ALPN on TLS listeners (or the ALPN a previous stage passed on).
    #[serde(default)]
    pub http2: Http2Config,
    /// Access lines for this listener (per request in http mode, per
    /// connection in tcp mode); false is nginx's `access_log off`. Failed
    /// connections are still reported (rate-limited) as warnings.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// This stage's own stats listener (`[listener.stats]`), showing only it.
    #[serde(default)]
    pub stats: Option<StatsConfig>,
}

/// What a listener speaks after accept (and after TLS, if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Tcp,
    Http,
}

/// `[listener.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM files, each with its chain and key (HAProxy style); several for
    /// SNI, the first is the default.
    #[serde(default)]
    pub certs: Vec<PathBuf>,
    /// Certificates whose chain and key are in separate files
    /// (`[[listener.tls.pair]]`), after `certs` in SNI order.
    #[serde(default, rename = "pair")]
    pub pairs: Vec<CertPair>,
    /// ALPN protocols offered, in preference order.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// A client that has not finished its handshake by then is closed.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Resume sessions with stateless tickets (encrypted with a key of this
    /// generation, rotated every 6 hours); false is HAProxy's
    /// `no-tls-tickets`.
    #[serde(default)]
    pub session_tickets: bool,
    /// Sessions kept in memory for resumption (HAProxy's
    /// `tune.ssl.cachesize`); 0 turns the cache off. With tickets off too,
    /// every handshake is a full one.
    #[serde(
        default = "default_session_cache",
        deserialize_with = "de_session_cache"
    )]
    pub session_cache: usize,
}

/// `[[listener.tls.pair]]`: a certificate chain and its key in two files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[listener.compression]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Only "gzip".
    #[serde(default = "default_algo")]
    pub algo: String,
    #[serde(default = "default_level")]
    pub level: u32,
    /// Smaller responses (by Content-Length) are sent as they are.
    #[serde(default = "default_min_size")]
    pub min_size: u64,
    /// Media types that are compressed.
    #[serde(default = "default_types")]
    pub types: Vec<String>,
}

/// `[listener.http2]`: what one HTTP/2 client connection may use, and the
/// floods that close it. Defaults follow HAProxy's `tune.h2.*` where it has
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2Config {
    /// Streams a client may have open at once (`tune.h2.max-concurrent-streams`).
    #[serde(default = "default_h2_streams", deserialize_with = "de_h2_streams")]
    pub max_concurrent_streams: u32,
    /// Flow-control window of each stream, bytes (`tune.h2.initial-window-size`):
    /// what a client that does not read can make us buffer per stream.
    #[serde(default = "default_h2_window", deserialize_with = "de_h2_window")]
    pub initial_window_size: u32,
    /// Flow-control window of the whole connection, bytes.
    #[serde(default = "default_h2_conn_window", deserialize_with = "de_h2_window")]
    pub connection_window_size: u32,
    /// Largest frame payload we accept, bytes (16384..=16777215).
    #[serde(default = "default_h2_frame", deserialize_with = "de_h2_frame")]
    pub max_frame_size: u32,
    /// Streams a client may reset (RST_STREAM) in one second before the
    /// connection is closed: the 2023 "rapid reset" shape.
    #[serde(default = "default_h2_resets", deserialize_with = "de_h2_rate")]
    pub max_resets_per_second: u32,
    /// PING, SETTINGS and PRIORITY frames a client may send in one second
    /// before the connection is closed.
    #[serde(default = "default_h2_control", deserialize_with = "de_h2_rate")]
    pub max_control_frames_per_second: u32,
    /// CONTINUATION frames one header block may use (the 2024
    /// CONTINUATION flood shape); the block's size is bounded by
    /// `max_header_size` as well.
    #[serde(default = "default_h2_continuations", deserialize_with = "de_h2_rate")]
    pub max_continuation_frames: u32,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: default_h2_streams(),
            initial_window_size: default_h2_window(),
            connection_window_size: default_h2_conn_window(),
            max_frame_size: default_h2_frame(),
            max_resets_per_second: default_h2_resets(),
            max_control_frames_per_second: default_h2_control(),
            max_continuation_frames: default_h2_continuations(),
        }
    }
}

/// An address: where a listener binds, or where a server is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One `[[backend]]`: a pool of servers connections are forwarded to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub servers: Vec<Server>,
    /// `[backend.check]`: active health checks of the servers; without it
    /// every server counts as up (a refused connect still moves on to the
    /// next server).
    #[serde(default)]
    pub check: Option<CheckConfig>,
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// HAProxy `timeout server`: how long a server may take to start its
    /// response (answered 504), and the longest silence in the middle of a
    /// response body (the response is cut).
    #[serde(default = "default_server_timeout", deserialize_with = "de_duration")]
    pub server_timeout: Duration,
    /// Send a PROXY v2 header with the client address (and TLS details) on
    /// every connection to a server.
    #[serde(default)]
    pub send_proxy_v2: bool,
    /// http mode: idle connections kept per server and shared by the
    /// clients of a listener (HAProxy `pool-max-conn`, nginx upstream
    /// `keepalive`); 0 gives each client connection its own. A
    /// `send_proxy_v2` backend never shares (the header names one client).
    #[serde(
        default = "default_pool_max_conn",
        deserialize_with = "de_pool_max_conn"
    )]
    pub pool_max_conn: usize,
    /// http mode: an idle server connection unused this long is closed
    /// (HAProxy `pool-purge-delay`).
    #[serde(default = "default_pool_purge_delay", deserialize_with = "de_duration")]
    pub pool_purge_delay: Duration,
}

/// One server of a backend: `"IP:PORT"` or `"unix:/path"`, or the table
/// `{ addr = "IP:PORT", check = false }` to leave it out of the backend's
/// health checks (it then always counts as up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub addr: Addr,
    /// Whether `[backend.check]` checks this server (default true).
    pub check: bool,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// `[backend.check]`: how often and how each server of the backend is
/// checked (HAProxy `check inter rise fall` and `option httpchk`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// `tcp`: a connect; `http`: a request whose status must be expected.
    #[serde(rename = "type", default)]
    pub kind: CheckKind,
    /// http: the request method (default GET).
    #[serde(default)]
    pub method: Option<String>,
    /// http: the request path (default "/").
    #[serde(default)]
    pub path: Option<String>,
    /// http: the Host header (default: the server's address).
    #[serde(default)]
    pub host: Option<String>,
    /// http: the statuses that pass (default 200-399).
    #[serde(default, deserialize_with = "de_opt_status_set")]
    pub expect_status: Option<StatusSet>,
    /// Time between two checks of a server (HAProxy `inter`).
    #[serde(default = "default_check_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    /// The longest one check may take, connect included (default: the
    /// smaller of `interval` and the backend's `connect_timeout`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// Checks passed in a row that bring a DOWN server back UP.
    #[serde(default = "default_rise", deserialize_with = "de_rise_fall")]
    pub rise: u32,
    /// Checks failed in a row that take an UP server DOWN.
    #[serde(default = "default_fall", deserialize_with = "de_rise_fall")]
    pub fall: u32,
}

impl CheckConfig {
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("GET")
    }

    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    pub fn expect_status(&self) -> StatusSet {
        self.expect_status
            .clone()
            .unwrap_or_else(|| StatusSet(vec![200..=399]))
    }

    /// The check timeout of a backend whose connect timeout is `connect`.
    pub fn timeout(&self, connect: Duration) -> Duration {
        self.timeout.unwrap_or_else(|| self.interval.min(connect))
    }
}

/// What a check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
}

/// HTTP statuses a check accepts: `200`, `"200-399"`, or a list of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(pub Vec<std::ops::RangeInclusive<u16>>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|r| r.contains(&status))
    }
}

impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
///
/// Displayed as `<origin>: <key path>: <message>`; the key path is replaced
/// by `line L, column C` for TOML syntax errors and left out when the error
/// concerns the file as a whole (e.g. it cannot be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {}{message}", location_prefix(.key.as_deref(), *.line_col))]
pub struct ConfigError {
    origin: String,
    key: Option<String>,
    line_col: Option<(usize, usize)>,
    message: String,
}

impl ConfigError {
    fn at_key(origin: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            key: Some(key.into()),
            line_col: None,
            message: message.into(),
        }
    }

    fn whole_file(origin: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            key: None,
            line_col: None,
            message: message.into(),
        }
    }

    /// File name (or other origin label) the configuration came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Key path such as `listener[1].backend`, if the error concerns one key.
    pub fn key_path(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// 1-based line and column, for TOML syntax errors.
    pub fn line_col(&self) -> Option<(usize, usize)> {
        self.line_col
    }

    /// What was wrong, without origin and key path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

fn location_prefix(key: Option<&str>, line_col: Option<(usize, usize)>) -> String {
    match (key, line_col) {
        (Some(key), _) => format!("{key}: "),
        (None, Some((line, col))) => format!("line {line}, column {col}: "),
        (None, None) => String::new(),
    }
}

impl Config {
    /// Reads and parses the file at `path`, taking `${VAR}` values from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::whole_file(&origin, format!("cannot read file: {e}")))?;
        Config::parse(&text, &origin, &|name| std::env::var(name).ok())
    }

    /// Parses configuration `text`. `origin` labels errors (usually the file
    /// name); `env` resolves `${VAR}` references, returning `None` for unset
    /// variables. Taking `env` as a parameter keeps parsing deterministic and
    /// testable without touching the process environment.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
        let mut tree = toml::Value::Table(table);
        interpolate_tree(&mut tree, &mut String::new(), env)
            .map_err(|(key, message)| ConfigError::at_key(origin, key, message))?;
        Defaults::apply(&mut tree)
            .map_err(|(key, message)| ConfigError::at_key(origin, key, message))?;
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let message = e.inner().message().to_owned();
            match key_path(e.path()) {
                Some(key) => ConfigError::at_key(origin, key, message),
                None => ConfigError::whole_file(origin, message),
            }
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::at_key(origin, key, message))?;
        Ok(config)
    }

    /// A small valid config for other modules' unit tests: instance `unit`
    /// with `global` lines, listener `front` on `bind` (with `listener`
    /// lines) forwarding to backend `app` (server 127.0.0.1:9000).
    #[cfg(test)]
    pub(crate) fn for_tests(global: &str, bind: &str, listener: &str) -> Config {
        let text = format!(
            "[global]\nname = \"unit\"\n{global}\n[[listener]]\nname = \"front\"\nbind = [\"{bind}\"]\nbackend = \"app\"\n{listener}\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n"
        );
        Config::parse(&text, "unit.toml", &|_| None).expect("a valid test config")
    }

    /// The backend `l` forwards to.
    ///
    /// # Panics
    ///
    /// If `l.backend` names no backend, which validation rules out for every
    /// `Config` produced by [`Config::load`] or [`Config::parse`].
    pub fn listener_backend(&self, l: &Listener) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == l.backend)
            .unwrap_or_else(|| {
                panic!(
                    "listener {:?} refers to unknown backend {:?}; config was not validated",
                    l.name, l.backend
                )
            })
    }
}

fn default_pool_max_conn() -> usize {
    256
}

fn default_pool_purge_delay() -> Duration {
    Duration::from_secs(5)
}

fn default_true() -> bool {
    true
}

fn default_canary_window() -> Duration {
    Duration::from_secs(30)
}

fn default_canary_min_connections() -> u64 {
    100
}

fn default_max_error_ratio() -> f64 {
    2.0
}

fn default_min_error_rate() -> f64 {
    0.01
}

fn default_hard_stop_after() -> Duration {
    Duration::from_secs(30)
}

impl Global {
    /// The window over which a draining generation spreads the closes of
    /// its tunnels: `close_spread_time`, or 5s (at most half of
    /// `hard_stop_after`, so that a short deadline alone stays valid).
    pub fn close_spread(&self) -> Duration {
        self.close_spread_time
            .unwrap_or_else(|| Duration::from_secs(5).min(self.hard_stop_after / 2))
    }
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}

fn default_handover_grace() -> Duration {
    Duration::from_millis(200)
}

fn default_backlog() -> u32 {
    1024
}

fn default_check_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_stats_maxconn() -> usize {
    16
}

fn default_stats_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_server_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_header_size() -> usize {
    16 * 1024
}

fn default_h2_streams() -> u32 {
    100
}

/// HAProxy's default is 65535; a larger window keeps one fast stream from
/// waiting on WINDOW_UPDATEs, at the price of what a client that does not
/// read can park in our buffers (this × streams, bounded by the connection
/// window).
fn default_h2_window() -> u32 {
    256 * 1024
}

fn default_h2_conn_window() -> u32 {
    1024 * 1024
}

fn default_h2_frame() -> u32 {
    16_384
}

fn default_h2_resets() -> u32 {
    100
}

fn default_h2_control() -> u32 {
    1_000
}

fn default_h2_continuations() -> u32 {
    32
}

fn default_http_request_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_client_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_tunnel_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_stats_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8404))
}

fn default_accept_proxy_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_session_cache() -> usize {
    256
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_unix_mode() -> u32 {
    0o660
}

fn default_algo() -> String {
    "gzip".into()
}

fn default_level() -> u32 {
    1
}

fn default_min_size() -> u64 {
    256
}

fn default_types() -> Vec<String> {
    [
        "text/html",
        "text/plain",
        "text/css",
        "application/json",
        "application/javascript",
    ]
    .map(String::from)
    .to_vec()
}

fn de_unix_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    deserialize_parsed(d, "an octal permission string such as \"0660\"", |s| {
        u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!("invalid permissions {s:?}: expected an octal string such as \"0660\"")
            })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const EXAMPLE: &str = r#"
[global]
name = "edge"
pidfile = "/run/proxy-edge.pid"
hard_stop_after = "30s"
bpffs = "/sys/fs/bpf"

[[listener]]
name = "front"
bind = ["0.0.0.0:8080"]
backend = "app"

[[backend]]
name = "app"
servers = ["127.0.0.1:9000", "127.0.0.1:9001"]
connect_timeout = "2s"
"#;

    const MINIMAL: &str = r#"
[global]
name = "edge"

[[listener]]
name = "front"
bind = ["0.0.0.0:8080"]
backend = "app"

[[backend]]
name = "app"
servers = ["127.0.0.1:9000"]
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", &no_env)
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(text, "test.toml", &move |k| vars.get(k).cloned())
    }

    /// Parses `text`, expecting failure, and returns the rendered error.
    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error, got {c:#?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts the rendered error starts with origin and key path and
    /// contains `needle`.
    fn assert_err(text: &str, key: &str, needle: &str) {
        let e = err(text);
        assert!(
            e.starts_with(&format!("test.toml: {key}: ")),
            "error {e:?} does not name key {key:?}"
        );
        assert!(
            e.contains(needle),
            "error {e:?} does not contain {needle:?}"
        );
    }

    /// MINIMAL with `from` replaced by `to` (which must occur).
    fn minimal_with(from: &str, to: &str) -> String {
        assert!(MINIMAL.contains(from), "{from:?} not in MINIMAL");
        MINIMAL.replacen(from, to, 1)
    }

    /// A config with one servers entry supplied by the test.
    fn with_server(server: &str) -> String {
        minimal_with("\"127.0.0.1:9000\"", &format!("{server:?}"))
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.global.name, "edge");
        assert_eq!(
            c.global.pidfile.as_deref(),
            Some(Path::new("/run/proxy-edge.pid"))
        );
        assert_eq!(c.global.hard_stop_after, Duration::from_secs(30));
        assert_eq!(c.global.bpffs, Path::new("/sys/fs/bpf"));
        assert_eq!(c.listeners.len(), 1);
        let l = &c.listeners[0];
        assert_eq!(l.name, "front");
        assert_eq!(l.bind, vec![Addr::Tcp("0.0.0.0:8080".parse().unwrap())]);
        assert_eq!(l.backend, "app");
        assert_eq!(c.backends.len(), 1);
        let server = |a: &str| Server {
            addr: Addr::Tcp(a.parse().unwrap()),
            check: true,
        };
        assert_eq!(
            c.backends[0].servers,
            vec![server("127.0.0.1:9000"), server("127.0.0.1:9001")]
        );
        assert!(
            c.backends[0].check.is_none(),
            "no [backend.check]: no checks"
        );
        assert_eq!(c.backends[0].connect_timeout, Duration::from_secs(2));
        assert_eq!(c.listener_backend(l).name, "app");
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.global.pidfile, None);
        assert_eq!(c.global.hard_stop_after, Duration::from_secs(30));
        assert_eq!(c.global.bpffs, PathBuf::from("/sys/fs/bpf"));
        assert_eq!(c.global.steering, SteeringMode::Auto);
        assert_eq!(c.global.handover_grace, Duration::from_millis(200));
        assert_eq!(c.listeners[0].maxconn, None);
        assert_eq!(c.listeners[0].backlog, 1024);
        assert_eq!(c.backends[0].connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn all_options() {
        let text = r#"
[global]
name = "edge-1.prod_x"
steering = "reuseport"
handover_grace = "1s 500ms"
hard_stop_after = "2m"

[[listener]]
name = "a"
bind = ["[::1]:443", "unix:/run/a.sock"]
backend = "db"
maxconn = 10
backlog = 65535

[[listener]]
name = "b"
bind = ["127.0.0.1:443"]
backend = "app"

[[backend]]
name = "app"
servers = ["unix:/run/app.sock"]

[[backend]]
name = "db"
servers = ["[2001:db8::1]:5432"]
connect_timeout = "500ms"
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.global.steering, SteeringMode::Reuseport);
        assert_eq!(c.global.handover_grace, Duration::from_millis(1500));
        assert_eq!(c.global.hard_stop_after, Duration::from_secs(120));
        let a = &c.listeners[0];
        assert_eq!(a.bind[0].to_string(), "[::1]:443");
        assert_eq!(a.bind[1], Addr::Unix("/run/a.sock".into()));
        assert_eq!(a.bind[1].to_string(), "unix:/run/a.sock");
        assert_eq!(a.maxconn, Some(10));
        assert_eq!(a.backlog, 65535);
        assert_eq!(c.listener_backend(a).name, "db");
        assert_eq!(c.listener_backend(&c.listeners[1]).name, "app");
        assert_eq!(c.backends[0].servers[0].to_string(), "unix:/run/app.sock");
        assert_eq!(c.backends[1].servers[0].to_string(), "[2001:db8::1]:5432");
        assert_eq!(c.backends[1].connect_timeout, Duration::from_millis(500));
    }

    #[test]
    fn steering_values() {
        for (s, want) in [
            ("auto", SteeringMode::Auto),
            ("ebpf", SteeringMode::Ebpf),
            ("reuseport", SteeringMode::Reuseport),
        ] {
            let text = minimal_with(
                "name = \"edge\"",
                &format!("name = \"edge\"\nsteering = {s:?}"),
            );
            assert_eq!(parse(&text).unwrap().global.steering, want);
            assert_eq!(want.to_string(), s);
        }
        let text = minimal_with("name = \"edge\"", "name = \"edge\"\nsteering = \"bpf\"");
        assert_err(&text, "global.steering", "expected one of");
    }

    #[test]
    fn load_reads_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        assert_eq!(Config::load(&path).unwrap().global.name, "edge");

        std::fs::write(
            &path,
            MINIMAL.replace("backend = \"app\"", "backend = \"ap\""),
        )
        .unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("listener[0].backend"), "{e}");

        let missing = dir.path().join("missing.toml");
        let e = Config::load(&missing).unwrap_err();
        assert_eq!(e.key_path(), None);
        assert!(
            e.to_string().contains("missing.toml: cannot read file"),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_origin_and_position() {
        let e = parse("[global]\nname = \"edge\"\nbroken = \n").unwrap_err();
        assert_eq!(e.origin(), "test.toml");
        let (line, _col) = e.line_col().expect("position");
        assert_eq!(line, 3);
        let s = e.to_string();
        assert!(s.starts_with("test.toml: line 3, column "), "{s}");
        assert!(s.contains("invalid TOML"), "{s}");
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_err(
            &minimal_with("bind = ", "bnd = "),
            "listener[0].bnd",
            "unknown field",
        );
        assert_err(
            &minimal_with("name = \"edge\"", "name = \"edge\"\nhard_stop = \"1s\""),
            "global.hard_stop",
            "unknown field",
        );
        assert_err(
            &format!("{MINIMAL}\n[frontend]\nx = 1\n"),
            "frontend",
            "unknown field",
        );
    }

    #[test]
    fn missing_required_fields() {
        assert_err(
            &minimal_with("backend = \"app\"", ""),
            "listener[0]",
            "missing field `backend`",
        );
        let e = err("[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\n");
        assert!(e.contains("missing field `global`"), "{e}");
        assert_err(
            "[global]\nname = \"edge\"\n",
            "listener",
            "expected at least one [[listener]]",
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        assert_err(
            &minimal_with("name = \"edge\"", "name = \"edge\"\nhard_stop_after = 30"),
            "global.hard_stop_after",
            "expected a duration string",
        );
        assert_err(
            &minimal_with("bind = [\"0.0.0.0:8080\"]", "bind = \"0.0.0.0:8080\""),
            "listener[0].bind",
            "expected a sequence",
        );
        assert_err(
            &minimal_with("backend = \"app\"", "backend = \"app\"\nbacklog = \"10\""),
            "listener[0].backlog",
            "invalid type: string",
        );
    }

    #[test]
    fn invalid_duration() {
        let text = minimal_with(
            "name = \"edge\"",
            "name = \"edge\"\nhard_stop_after = \"30x\"",
        );
        let e = err(&text);
        assert_eq!(
            e,
            "test.toml: global.hard_stop_after: invalid duration \"30x\": expected a number \
             with a unit such as \"500ms\", \"30s\" or \"2m\""
        );
        assert_err(
            &minimal_with(
                "servers = [\"127.0.0.1:9000\"]",
                "servers = [\"127.0.0.1:9000\"]\nconnect_timeout = \"2\"",
            ),
            "backend[0].connect_timeout",
            "invalid duration \"2\"",
        );
    }

    #[test]
    fn zero_durations() {
        assert_err(
            &minimal_with(
                "name = \"edge\"",
                "name = \"edge\"\nhard_stop_after = \"0s\"",
            ),
            "global.hard_stop_after",
            "greater than zero",
        );
        assert_err(
            &minimal_with(
                "servers = [\"127.0.0.1:9000\"]",
                "servers = [\"127.0.0.1:9000\"]\nconnect_timeout = \"0ms\"",
            ),
            "backend[0].connect_timeout",
            "greater than zero",
        );
        // A zero grace period just means "stop accepting at once".
        let text = minimal_with(
            "name = \"edge\"",
            "name = \"edge\"\nhandover_grace = \"0s\"",
        );
        assert_eq!(parse(&text).unwrap().global.handover_grace, Duration::ZERO);
    }

    #[test]
    fn close_spread_time() {
        let with =
            |global: &str| minimal_with("name = \"edge\"", &format!("name = \"edge\"\n{global}"));
        // Default: 5s, at most half the deadline.
        let g = parse(&with("")).unwrap().global;
        assert_eq!(g.close_spread_time, None);
        assert_eq!(g.close_spread(), Duration::from_secs(5));
        let g = parse(&with("hard_stop_after = \"4s\"")).unwrap().global;
        assert_eq!(g.close_spread(), Duration::from_secs(2));
        let g = parse(&with(
            "hard_stop_after = \"4s\"\nclose_spread_time = \"0s\"",
        ))
        .unwrap()
        .global;
        assert_eq!(g.close_spread(), Duration::ZERO);
        let g = parse(&with("close_spread_time = \"10s\"")).unwrap().global;
        assert_eq!(g.close_spread(), Duration::from_secs(10));
        assert_err(
            &with("hard_stop_after = \"3s\"\nclose_spread_time = \"3s\""),
            "global.close_spread_time",
            "must be shorter than global.hard_stop_after (3s)",
        );
        assert_err(
            &with("close_spread_time = \"soon\""),
            "global.close_spread_time",
            "invalid duration",
        );
    }

    #[test]
    fn invalid_names() {
        for bad in ["", "my edge", "a/b", "..", ".", "é", &"x".repeat(65)] {
            let text = minimal_with("name = \"edge\"", &format!("name = {bad:?}"));
            assert_err(&text, "global.name", "expected 1 to 64 characters");
        }
        assert!(
            parse(&minimal_with(
                "name = \"edge\"",
                &format!("name = {:?}", "x".repeat(64))
            ))
            .is_ok()
        );
        assert_err(
            &minimal_with("name = \"front\"", "name = \"front end\""),
            "listener[0].name",
            "invalid name \"front end\"",
        );
        let text = MINIMAL
            .replace("name = \"app\"", "name = \"a pp\"")
            .replace("backend = \"app\"", "backend = \"a pp\"");
        assert_err(&text, "backend[0].name", "invalid name");
    }

    #[test]
    fn duplicate_names() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"front\"\nbind = [\"0.0.0.0:8081\"]\nbackend = \"app\"\n"
        );
        assert_err(
            &text,
            "listener[1].name",
            "duplicate listener name \"front\"",
        );
        let text = format!("{MINIMAL}\n[[backend]]\nname = \"app\"\nservers = [\"127.0.0.1:1\"]\n");
        assert_err(&text, "backend[1].name", "duplicate backend name \"app\"");
    }

    #[test]
    fn unknown_backend() {
        let text = format!(
            "{}\n[[backend]]\nname = \"db\"\nservers = [\"127.0.0.1:1\"]\n",
            MINIMAL.replace("backend = \"app\"", "backend = \"ap\"")
        );
        let e = err(&text);
        assert_eq!(
            e,
            "test.toml: listener[0].backend: unknown backend \"ap\" (defined backends: \"app\", \"db\")"
        );
        let no_backends = MINIMAL.split("[[backend]]").next().unwrap();
        assert_err(
            no_backends,
            "listener[0].backend",
            "no [[backend]] tables are defined",
        );
    }

    #[test]
    fn empty_lists() {
        assert_err(
            &minimal_with("bind = [\"0.0.0.0:8080\"]", "bind = []"),
            "listener[0].bind",
            "expected at least one address",
        );
        assert_err(
            &minimal_with("servers = [\"127.0.0.1:9000\"]", "servers = []"),
            "backend[0].servers",
            "expected at least one server",
        );
    }

    #[test]
    fn duplicate_bind_address() {
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"other\"\nbind = [\"127.0.0.1:1\", \"0.0.0.0:8080\"]\nbackend = \"app\"\n"
        );
        assert_err(
            &text,
            "listener[1].bind[1]",
            "address 0.0.0.0:8080 is already bound by listener \"front\" (listener[0].bind[0])",
        );
        assert_err(
            &minimal_with(
                "bind = [\"0.0.0.0:8080\"]",
                "bind = [\"unix:/a\", \"unix:/a\"]",
            ),
            "listener[0].bind[1]",
            "already bound",
        );
    }

    #[test]
    fn splice_is_on_unless_turned_off() {
        let set = |kv: &str| minimal_with("name = \"edge\"", &format!("name = \"edge\"\n{kv}"));
        assert!(parse(MINIMAL).unwrap().global.splice);
        assert!(!parse(&set("splice = false")).unwrap().global.splice);
        assert_err(
            &set("splice = \"no\""),
            "global.splice",
            "expected a boolean",
        );
    }

    #[test]
    fn nbthread_range() {
        let set = |kv: &str| minimal_with("name = \"edge\"", &format!("name = \"edge\"\n{kv}"));
        assert_eq!(parse(MINIMAL).unwrap().global.nbthread, None);
        assert_eq!(
            parse(&set("nbthread = 1")).unwrap().global.nbthread,
            Some(1)
        );
        assert_eq!(
            parse(&set("nbthread = 8")).unwrap().global.nbthread,
            Some(8)
        );
        assert_err(
            &set("nbthread = 0"),
            "global.nbthread",
            "expected 1..=1024 threads",
        );
        assert_err(
            &set("nbthread = 5000"),
            "global.nbthread",
            "expected 1..=1024 threads",
        );
    }

    #[test]
    fn maxconn_and_backlog_ranges() {
        let set = |kv: &str| minimal_with("backend = \"app\"", &format!("backend = \"app\"\n{kv}"));
        assert_err(&set("maxconn = 0"), "listener[0].maxconn", "at least 1");
        assert_err(&set("maxconn = -5"), "listener[0].maxconn", "at least 1");
        assert_eq!(
            parse(&set("maxconn = 1")).unwrap().listeners[0].maxconn,
            Some(1)
        );
        assert_err(
            &set("backlog = -1"),
            "listener[0].backlog",
            "expected 1..=65535",
        );
        assert_err(
            &set("backlog = 0"),
            "listener[0].backlog",
            "expected 1..=65535",
        );
        assert_err(
            &set("backlog = 65536"),
            "listener[0].backlog",
            "expected 1..=65535",
        );
        assert_eq!(parse(&set("backlog = 1")).unwrap().listeners[0].backlog, 1);
    }

    #[test]
    fn invalid_bind_addresses() {
        let bind = |a: &str| minimal_with("\"0.0.0.0:8080\"", &format!("{a:?}"));
        assert_eq!(
            err(&bind("0.0.0.0")),
            "test.toml: listener[0].bind[0]: invalid address \"0.0.0.0\": expected IP:PORT or \
             unix:/path"
        );
        for bad in [
            "localhost:80",
            "::1:80",
            "1.2.3.4:99999",
            "unix:",
            "unix:rel.sock",
            "",
        ] {
            assert_err(
                &bind(bad),
                "listener[0].bind[0]",
                "expected IP:PORT or unix:/path",
            );
        }
        assert_err(&bind("0.0.0.0:0"), "listener[0].bind[0]", "port 0");
        assert_err(&bind("[::]:0"), "listener[0].bind[0]", "port 0");
        let long = format!("unix:/{}", "x".repeat(107));
        assert_err(&bind(&long), "listener[0].bind[0]", "limit is 107");
    }

    #[test]
    fn invalid_server_addresses() {
        let text = minimal_with(
            "servers = [\"127.0.0.1:9000\"]",
            "servers = [\"127.0.0.1:9000\", \"127.0.0.1:9001\", \"app.internal:80\"]",
        );
        assert_err(
            &text,
            "backend[0].servers[2]",
            "invalid address \"app.internal:80\": expected IP:PORT or unix:/path",
        );
        // Port 0 is only refused for binds.
        assert!(parse(&with_server("127.0.0.1:0")).is_ok());
    }

    #[test]
    fn health_checks_parse_with_defaults() {
        let text = minimal_with(
            "servers = [\"127.0.0.1:9000\"]",
            "servers = [\"127.0.0.1:9000\", { addr = \"unix:/run/b.sock\", check = false }]\n\
             connect_timeout = \"500ms\"\n[backend.check]\ntype = \"tcp\"",
        );
        let c = parse(&text).unwrap();
        let b = &c.backends[0];
        assert!(b.servers[0].check && !b.servers[1].check);
        assert_eq!(b.servers[1].addr, Addr::Unix("/run/b.sock".into()));
        let check = b.check.as_ref().unwrap();
        assert_eq!(check.kind, CheckKind::Tcp);
        assert_eq!((check.rise, check.fall), (2, 3));
        assert_eq!(check.interval, Duration::from_secs(2));
        // Default timeout: the smaller of interval and connect_timeout.
        assert_eq!(check.timeout(b.connect_timeout), Duration::from_millis(500));

        let http = minimal_with(
            "servers = [\"127.0.0.1:9000\"]",
            "servers = [\"127.0.0.1:9000\"]\n[backend.check]\ntype = \"http\"\n\
             method = \"HEAD\"\npath = \"/health?full=1\"\nhost = \"app.example\"\n\
             expect_status = [200, \"300-302\"]\ninterval = \"250ms\"\ntimeout = \"100ms\"\n\
             rise = 1\nfall = 5",
        );
        let c = parse(&http).unwrap();
        let check = c.backends[0].check.clone().unwrap();
        assert_eq!(check.kind, CheckKind::Http);
        assert_eq!((check.method(), check.path()), ("HEAD", "/health?full=1"));
        assert_eq!(check.host.as_deref(), Some("app.example"));
        let expect = check.expect_status();
        assert!(expect.contains(200) && expect.contains(301) && !expect.contains(204));
        assert_eq!(expect.to_string(), "200, 300-302");
        assert_eq!(
            check.timeout(Duration::from_secs(2)),
            Duration::from_millis(100)
        );
        assert_eq!((check.rise, check.fall), (1, 5));

        let defaults = minimal_with(
            "servers = [\"127.0.0.1:9000\"]",
            "servers = [\"127.0.0.1:9000\"]\n[backend.check]\ntype = \"http\"",
        );
        let check = parse(&defaults).unwrap().backends[0].check.clone().unwrap();
        assert_eq!((check.method(), check.path()), ("GET", "/"));
        assert!(check.expect_status().contains(399) && !check.expect_status().contains(400));
    }

    #[test]
    fn health_check_errors_name_the_key() {
        let check = |lines: &str| {
            minimal_with(
                "servers = [\"127.0.0.1:9000\"]",
                &format!("servers = [\"127.0.0.1:9000\"]\n[backend.check]\n{lines}"),
            )
        };
        for (lines, key, needle) in [
            ("rise = 0", "backend[0].check.rise", "expected 1..=1000"),
            ("fall = -1", "backend[0].check.fall", "expected 1..=1000"),
            (
                "interval = \"0s\"",
                "backend[0].check.interval",
                "at least 10ms",
            ),
            (
                "interval = 2",
                "backend[0].check.interval",
                "duration string",
            ),
            (
                "timeout = \"0s\"",
                "backend[0].check.timeout",
                "greater than zero",
            ),
            ("type = \"udp\"", "backend[0].check.type", "unknown variant"),
            (
                "path = \"/x\"",
                "backend[0].check.path",
                "add type = \"http\"",
            ),
            (
                "type = \"http\"\npath = \"health\"",
                "backend[0].check.path",
                "absolute path",
            ),
            (
                "type = \"http\"\npath = \"/a b\"",
                "backend[0].check.path",
                "without spaces",
            ),
            (
                "type = \"http\"\nmethod = \"GE T\"",
                "backend[0].check.method",
                "a token",
            ),
            (
                "type = \"http\"\nhost = \"\"",
                "backend[0].check.host",
                "invalid host",
            ),
            (
                "type = \"http\"\nexpect_status = 600",
                "backend[0].check.expect_status",
                "100..=599",
            ),
            (
                "type = \"http\"\nexpect_status = \"399-200\"",
                "backend[0].check.expect_status",
                "399 is above 200",
            ),
            (
                "type = \"http\"\nexpect_status = []",
                "backend[0].check.expect_status",
                "empty list",
            ),
            (
                "inter = \"2s\"",
                "backend[0].check.inter",
                "unknown field `inter`",
            ),
        ] {
            assert_err(&check(lines), key, needle);
        }
        let server = |s: &str| {
            minimal_with(
                "servers = [\"127.0.0.1:9000\"]",
                &format!("servers = [{s}]"),
            )
        };
        assert_err(
            &server("{ addr = \"nowhere\" }"),
            "backend[0].servers[0].addr",
            "expected IP:PORT or unix:/path",
        );
        assert_err(
            &server("{ addr = \"127.0.0.1:1\", weight = 2 }"),
            "backend[0].servers[0].weight",
            "unknown field `weight`",
        );
        assert_err(
            &server("{ check = false }"),
            "backend[0].servers[0]",
            "missing field `addr`",
        );
        assert_err(&server("7"), "backend[0].servers[0]", "a server address");
    }

    #[test]
    fn other_global_paths() {
        assert_err(
            &minimal_with("name = \"edge\"", "name = \"edge\"\nbpffs = \"bpf\""),
            "global.bpffs",
            "absolute path",
        );
        assert_err(
            &minimal_with("name = \"edge\"", "name = \"edge\"\npidfile = \"\""),
            "global.pidfile",
            "empty path",
        );
    }

    #[test]
    fn canary_settings_have_defaults_and_ranges() {
        let c = parse(MINIMAL).unwrap().global.canary;
        assert!(c.auto_abort);
        assert_eq!(c.window, Duration::from_secs(30));
        assert_eq!((c.min_connections, c.max_error_ratio), (100, 2.0));
        assert_eq!((c.min_error_rate, c.promote_after), (0.01, None));
        let with = |table: &str| format!("{MINIMAL}\n[global.canary]\n{table}\n");
        let c = parse(&with(
            "window = \"10s\"\npromote_after = \"5m\"\nmax_error_ratio = 1.5",
        ))
        .unwrap()
        .global
        .canary;
        assert_eq!(c.promote_after, Some(Duration::from_secs(300)));
        assert_eq!(c.max_error_ratio, 1.5);
        for (table, key, needle) in [
            ("window = \"100ms\"", "global.canary.window", "at least 1s"),
            (
                "max_error_ratio = 0.5",
                "global.canary.max_error_ratio",
                "at least 1.0",
            ),
            (
                "min_error_rate = 2.0",
                "global.canary.min_error_rate",
                "0.0 to 1.0",
            ),
            (
                "min_connections = 0",
                "global.canary.min_connections",
                "out of range",
            ),
            (
                "window = \"1m\"\npromote_after = \"10s\"",
                "global.canary.promote_after",
                "at least global.canary.window",
            ),
            (
                "max_errors = 3",
                "global.canary.max_errors",
                "unknown field",
            ),
        ] {
            assert_err(&with(table), key, needle);
        }
    }

    #[test]
    fn interpolation_set() {
        let c = parse_env(
            &with_server("${HOST}:${PORT}"),
            &[("HOST", "10.0.0.1"), ("PORT", "80")],
        )
        .unwrap();
        assert_eq!(c.backends[0].servers[0].to_string(), "10.0.0.1:80");
        // Works in every string value, including inside longer strings.
        let text = minimal_with("name = \"edge\"", "name = \"edge-${ENV}\"");
        assert_eq!(
            parse_env(&text, &[("ENV", "prod")]).unwrap().global.name,
            "edge-prod"
        );
    }

    #[test]
    fn interpolation_unset_is_an_error() {
        let e = parse(&with_server("${BACKEND}")).unwrap_err();
        assert_eq!(e.key_path(), Some("backend[0].servers[0]"));
        assert_eq!(
            e.to_string(),
            "test.toml: backend[0].servers[0]: environment variable BACKEND is not set \
             (use ${BACKEND:-default} for a default)"
        );
    }

    #[test]
    fn interpolation_default() {
        let text = with_server("${BACKEND:-127.0.0.1:7000}");
        let c = parse(&text).unwrap();
        assert_eq!(c.backends[0].servers[0].to_string(), "127.0.0.1:7000");
        // A set, non-empty variable wins over the default.
        let c = parse_env(&text, &[("BACKEND", "127.0.0.1:7001")]).unwrap();
        assert_eq!(c.backends[0].servers[0].to_string(), "127.0.0.1:7001");
        // An empty default is allowed.
        let text = minimal_with("name = \"edge\"", "name = \"edge${SUFFIX:-}\"");
        assert_eq!(parse(&text).unwrap().global.name, "edge");
    }

    #[test]
    fn interpolation_empty_uses_default() {
        let text = with_server("${BACKEND:-127.0.0.1:7000}");
        let c = parse_env(&text, &[("BACKEND", "")]).unwrap();
        assert_eq!(c.backends[0].servers[0].to_string(), "127.0.0.1:7000");
        // Without a default, an empty variable is used as is (and here fails
        // address validation, at the right key).
        let e = parse_env(&with_server("${BACKEND}"), &[("BACKEND", "")]).unwrap_err();
        assert_eq!(e.key_path(), Some("backend[0].servers[0]"));
        assert!(e.message().contains("invalid address \"\""), "{e}");
    }

    #[test]
    fn interpolation_literals() {
        let text = minimal_with(
            "name = \"edge\"",
            "name = \"edge\"\npidfile = \"/run/$${X}/$HOME/a$$b$\"",
        );
        let c = parse_env(&text, &[("X", "no"), ("HOME", "no")]).unwrap();
        assert_eq!(
            c.global.pidfile.unwrap(),
            Path::new("/run/${X}/$HOME/a$$b$")
        );
    }

    #[test]
    fn interpolation_is_not_recursive_and_not_textual() {
        // A value that looks like a reference or like TOML is taken literally.
        let text = minimal_with("name = \"edge\"", "name = \"edge\"\npidfile = \"${P}\"");
        let c = parse_env(&text, &[("P", "/x/${Q}\"\nbad = [")]).unwrap();
        assert_eq!(c.global.pidfile.unwrap(), Path::new("/x/${Q}\"\nbad = ["));
        // References in comments are never looked at.
        let text = format!("# ${{UNSET}}\n{MINIMAL}");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn interpolation_unterminated() {
        let e = parse(&with_server("${BACKEND")).unwrap_err();
        assert_eq!(e.key_path(), Some("backend[0].servers[0]"));
        assert!(e.message().contains("unterminated \"${\""), "{e}");
    }

    #[test]
    fn interpolation_invalid_reference() {
        for bad in ["${}", "${1X}", "${A-B}", "${A:?x}"] {
            let e = parse(&with_server(bad)).unwrap_err();
            assert_eq!(e.key_path(), Some("backend[0].servers[0]"), "{bad}");
            assert!(e.message().contains("invalid variable reference"), "{e}");
        }
    }

    #[test]
    fn interpolation_error_paths_in_tables() {
        let text = minimal_with("name = \"edge\"", "name = \"${NAME}\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key_path(), Some("global.name"));
        let text = minimal_with("backend = \"app\"", "backend = \"${B}\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key_path(), Some("listener[0].backend"));
    }

    #[test]
    fn stage_keys() {
        let text = minimal_with(
            "backend = \"app\"\n",
            "backend = \"app\"\nmode = \"http\"\ncpus = [0]\naccept_proxy = true\n\
             unix_mode = \"0600\"\n[listener.compression]\nlevel = 6\n\
             [listener.tls]\ncerts = [\"certs/server.pem\"]\nalpn = [\"http/1.1\"]\n",
        )
        .replace(
            "servers = [\"127.0.0.1:9000\"]",
            "servers = [\"127.0.0.1:9000\"]\nsend_proxy_v2 = true",
        );
        let cfg = parse(&text).expect("stage keys parse");
        let l = &cfg.listeners[0];
        assert_eq!(l.mode, Mode::Http);
        assert_eq!(l.cpus, Some(vec![0]));
        assert_eq!(l.accept_proxy, AcceptProxy::Any);
        assert_eq!(l.unix_mode, 0o600);
        let c = l.compression.as_ref().expect("compression");
        assert_eq!((c.algo.as_str(), c.level, c.min_size), ("gzip", 6, 256));
        assert!(c.types.iter().any(|t| t == "text/html"));
        assert_eq!(l.tls.as_ref().unwrap().alpn, ["http/1.1"]);
        assert!(cfg.backends[0].send_proxy_v2);
        // Defaults.
        let cfg = parse(MINIMAL).unwrap();
        let l = &cfg.listeners[0];
        assert_eq!(
            (l.mode, l.accept_proxy, l.unix_mode),
            (Mode::Tcp, AcceptProxy::Off, 0o660)
        );
        assert!(!cfg.backends[0].send_proxy_v2);
    }

    #[test]
    fn accept_proxy_values() {
        let with = |value: &str| {
            minimal_with(
                "backend = \"app\"\n",
                &format!("backend = \"app\"\naccept_proxy = {value}\n"),
            )
        };
        for (value, want) in [
            ("true", AcceptProxy::Any),
            ("false", AcceptProxy::Off),
            ("\"v1\"", AcceptProxy::V1),
            ("\"v2\"", AcceptProxy::V2),
        ] {
            let cfg = parse(&with(value)).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(cfg.listeners[0].accept_proxy, want, "{value}");
        }
        let cfg = parse_env(&with("\"${PP:-v2}\""), &[]).unwrap();
        assert_eq!(cfg.listeners[0].accept_proxy, AcceptProxy::V2);
        let allowed = "true (a PROXY v1 or v2 header), false (none), \"v1\" or \"v2\"";
        for bad in [
            "\"v3\"",
            "\"true\"",
            "\"V2\"",
            "\"\"",
            "1",
            "[\"v1\", \"v2\"]",
        ] {
            assert_err(&with(bad), "listener[0].accept_proxy", allowed);
        }
        assert_err(
            &with("\"v3\""),
            "listener[0].accept_proxy",
            "invalid value \"v3\"",
        );
    }

    #[test]
    fn stage_key_errors() {
        let with = |extra: &str| {
            minimal_with(
                "backend = \"app\"\n",
                &format!("backend = \"app\"\n{extra}"),
            )
        };
        assert_err(
            &with("[listener.compression]\n"),
            "listener[0].compression",
            "mode = \"http\"",
        );
        assert_err(
            &with("mode = \"http\"\n[listener.compression]\nlevel = 12\n"),
            "listener[0].compression.level",
            "1..=9",
        );
        assert_err(
            &with("mode = \"http\"\n[listener.compression]\nalgo = \"br\"\n"),
            "listener[0].compression.algo",
            "gzip",
        );
        assert_err(
            &with("cpus = [4096]\n"),
            "listener[0].cpus[0]",
            "does not exist",
        );
        assert_err(&with("cpus = []\n"), "listener[0].cpus", "empty list");
        assert_err(
            &with("[listener.tls]\ncerts = [\"a.pem\"]\nsession_cache = -1\n"),
            "listener[0].tls.session_cache",
            "0..=1000000 sessions (0 turns the cache off)",
        );
        assert_err(&with("mode = \"udp\"\n"), "listener[0].mode", "");
        assert_err(
            &with("unix_mode = \"999\"\n"),
            "listener[0].unix_mode",
            "octal",
        );
        assert_err(
            &with("[listener.tls]\ncerts = []\n"),
            "listener[0].tls.certs",
            "no certificate",
        );
        assert_err(
            &with("[listener.tls]\ncerts = [\"a.pem\"]\nkey = \"x\"\n"),
            "listener[0].tls.key",
            "unknown field",
        );
    }

    #[test]
    fn tls_cert_pairs() {
        let text = minimal_with(
            "backend = \"app\"\n",
            "backend = \"app\"\n[listener.tls]\n[[listener.tls.pair]]\ncert = \"a.crt\"\nkey = \"a.key\"\n",
        );
        let cfg = parse(&text).expect("a pair alone is enough");
        let tls = cfg.listeners[0].tls.as_ref().unwrap();
        assert!(tls.certs.is_empty());
        assert_eq!(tls.pairs.len(), 1);
        assert_eq!(tls.pairs[0].key, PathBuf::from("a.key"));
        let missing_key = minimal_with(
            "backend = \"app\"\n",
            "backend = \"app\"\n[listener.tls]\n[[listener.tls.pair]]\ncert = \"a.crt\"\n",
        );
        assert_err(&missing_key, "listener[0].tls.pair[0]", "key");
    }

    #[test]
    fn stats_binds_must_not_collide() {
        let both = format!("{MINIMAL}\n[stats]\n",).replace(
            "backend = \"app\"\n",
            "backend = \"app\"\n[listener.stats]\nbanner = \"x\"\n",
        );
        assert_err(
            &both,
            "listener[0].stats.bind",
            "already used by stats.bind",
        );
        let on_listener = format!("{MINIMAL}\n[stats]\nbind = \"0.0.0.0:8080\"\n");
        assert_err(&on_listener, "stats.bind", "already a listener");
    }

    #[test]
    fn defaults_fill_what_listeners_and_backends_leave_out() {
        let text = format!(
            "{MINIMAL}\n[defaults]\nclient_timeout = \"5s\"\nserver_timeout = \"7s\"\nmax_header_size = 9000\n"
        );
        let c = parse(&text).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.client_timeout, Duration::from_secs(5));
        assert_eq!(l.max_header_size, 9000);
        assert_eq!(
            l.tunnel_timeout,
            Duration::from_secs(3600),
            "built-in default"
        );
        assert_eq!(c.backends[0].server_timeout, Duration::from_secs(7));

        // A listener's own value wins.
        let own = minimal_with(
            "backend = \"app\"",
            "backend = \"app\"\nclient_timeout = \"9s\"",
        );
        let c = parse(&format!("{own}\n[defaults]\nclient_timeout = \"5s\"\n")).unwrap();
        assert_eq!(c.listeners[0].client_timeout, Duration::from_secs(9));

        // A bad default is reported where it is written.
        assert_err(
            &format!("{MINIMAL}\n[defaults]\nserver_timeout = 30\n"),
            "defaults.server_timeout",
            "30s",
        );
        assert_err(
            &format!("{MINIMAL}\n[defaults]\ntimeout_client = \"5s\"\n"),
            "defaults.timeout_client",
            "expected one of",
        );
    }
}
