//! # proxy: a layer-4 proxy whose upgrades lose nothing
//!
//! # Layout
//!
//! - [`config`]: the TOML config, env interpolation, validation with key paths.
//! - [`net`]: listeners (SO_REUSEPORT, accept-first sweeping) and streams.
//! - [`forward`]: backend pools, round-robin, the byte copy.
//! - [`privilege`]: the optional drop to `global.user`.
//! - [`stage`]: what a listener does with a connection, on which runtime.
//! - [`tls`]: TLS termination (rustls), certificates chosen by SNI.
//! - [`proxy_proto`]: PROXY v2 headers, read strictly and written (ppp).
//! - [`http`]: HTTP/1.1 mode through hyper, gzip compression, X-Forwarded-For.
//! - [`metrics`]: per listener and per server counters, metered streams.
//! - [`steering`]: the pinned eBPF maps and the `sk_reuseport` program.
//! - [`generation`]: one running copy: lifecycle, handover, drain.
//! - [`stats`]: the stats listener: HTML, JSON and Prometheus views.
//! - [`status`]: what `proxy status` reads and prints.
//! - [`sys`]: the few raw syscalls (clocks, signals by PID).
#![deny(unsafe_code)]

pub mod config;
pub mod forward;
pub mod generation;
pub mod http;
pub mod metrics;
pub mod net;
pub mod privilege;
pub mod proxy_proto;
pub mod stage;
pub mod stats;
pub mod status;
pub mod steering;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
