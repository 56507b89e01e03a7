//! # proxy: a proxy whose upgrades lose nothing
//!
//! # Layout
//!
//! The folders are the architecture:
//!
//! - [`config`]: the TOML config: loading, `${VAR}` interpolation,
//!   validation with key paths, and the settings each stage builds once.
//! - [`generation`]: one running copy as a value: bind, take over, serve,
//!   hand over. Its control loop turns commands (signals, pinned-map
//!   changes) into phase transitions; its accept loops feed the stages.
//! - [`steering`]: the pinned eBPF maps of an instance and the
//!   `sk_reuseport` program, attached once per reuseport group; or plain
//!   SO_REUSEPORT when eBPF is not available.
//! - [`health`]: active health checks of the backend servers; the states
//!   live in the pinned maps, so every generation routes by the same ones.
//! - [`stage`]: the data path of one listener: sockets, PROXY v2, TLS, tcp
//!   forwarding, HTTP/1.1 with gzip.
//! - [`stats`]: the figures: the counter table, the snapshot, and its views
//!   (HTML, JSON, Prometheus, `proxy status`).
//! - [`privilege`]: the optional drop to `global.user`.
//! - [`sys`]: the few raw syscalls (clocks, signals by PID, fds).
//!
//! Dependencies point one way, with no cycle: `generation` uses `stage`,
//! `stats` and `steering`; `stage` counts into `stats::counters`; `stats`
//! reads `steering`'s pinned maps; `health` reads and writes its own pinned map
//! through `steering`; `steering` needs only `config` and `sys`.
#![deny(unsafe_code)]

pub mod config;
pub mod generation;
pub mod health;
pub mod privilege;
pub mod stage;
pub mod stats;
pub mod steering;
#[allow(unsafe_code)]
pub mod sys;
