//! What the integration tests (`tests/`) and the benchmark (`bench/`) run
//! the proxy in, and drive it with.
//!
//! # Layout
//!
//! Every test builds a [`Sandbox`] first and drops it last:
//!
//! - [`sandbox`]: a network namespace of its own (so fixed ports never
//!   collide), a private bpffs mount (so one test's pinned maps are never
//!   seen by another), a temporary folder, and a guard that kills every
//!   process the test started, also when it panics;
//! - [`config`]: the addresses inside the namespace and the configs the
//!   tests write; [`proxy`]: one `proxy run` process (one generation) with
//!   its log; [`status`]: `proxy status --json` and `/stats.json`;
//! - [`signals`]: the one way to signal a process;
//!   [`process`] and [`procfs`]: bounded external commands, `/proc`;
//! - [`backend`] and [`load`]: an in-process layer-4 server whose every
//!   response is derived from its request, and the checked exchanges and
//!   load generator that talk to it; [`bodies`]: payloads and their checks;
//! - [`http_backend`], [`http`], [`http_get`]: an HTTP/1.1 backend, the
//!   hyper client, and a blocking GET for the stats listener;
//! - [`tls`] and [`certs`]: rustls clients and rcgen certificates;
//! - [`prometheus`], [`chromium`]: the external referees of the operator
//!   tests; [`packaging`]: what the packaging tests share.
//!
//! Set `PROXY_IT_KEEP=1` to keep each test's folder (configs, proxy logs,
//! `summary.txt` with the measured figures) after the test.
//!
//! Helpers are synchronous on purpose: the test thread drives the scenario
//! (starting generations, polling status) while the backends and the load
//! run on a tokio runtime's worker threads, so that slow polling never
//! stalls the traffic the test measures.

pub mod backend;
pub mod bodies;
pub mod certs;
pub mod chromium;
pub mod config;
pub mod http;
pub mod http_backend;
pub mod http_get;
pub mod load;
pub mod packaging;
pub mod process;
pub mod procfs;
pub mod prometheus;
pub mod proxy;
pub mod sandbox;
pub mod signals;
pub mod status;
pub mod tls;

pub use backend::Backend;
pub use config::{BACKEND_ADDR, PROXY_ADDR, ProxyConfig};
pub use load::{Held, Load, LoadSpec, exchange, next_id};
pub use process::wait_until;
pub use proxy::Proxy;
pub use sandbox::{Sandbox, report};
pub use signals::Signal;
pub use status::{CanaryStatus, GenStatus, Status};
