//! A stage: what one listener does with each accepted connection, and the
//! runtime it does it on.
//!
//! The pipeline of a connection is `[PROXY v2 header] -> [TLS] -> tcp | http
//! -> backend [PROXY v2 header]`, each step configured per listener. A stage
//! with `cpus` runs on its own tokio runtime whose threads are pinned there,
//! the way HAProxy gives TLS or compression listeners their own cores.

use std::{sync::Arc, time::Instant};

use tokio::runtime::{Handle, Runtime};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Listener as ListenerConfig},
    forward::{ForwardError, Pool},
    net::{PeerAddr, Stream},
    sys,
};

/// Why a stage could not be built (bad certificates, no runtime).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
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
    #[error("upstream: {0}")]
    Upstream(#[from] ForwardError),
}

/// The runtime a stage runs on: its own (pinned) or the default one.
pub struct StageRuntime {
    own: Option<Runtime>,
    handle: Handle,
}

impl StageRuntime {
    /// A runtime pinned to `cpus`, or the current one.
    pub fn new(listener: &str, cpus: Option<&[usize]>) -> Result<Self, StageError> {
        let Some(cpus) = cpus else {
            return Ok(Self {
                own: None,
                handle: Handle::current(),
            });
        };
        let pinned = cpus.to_vec();
        let name = listener.to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus.len())
            .thread_name(format!("stage-{listener}"))
            .on_thread_start(move || {
                if let Err(e) = sys::pin_current_thread(&pinned) {
                    warn!("listener {name}: pinning a thread to CPUs {pinned:?}: {e}");
                }
            })
            .enable_all()
            .build()
            .map_err(|source| StageError::Runtime {
                listener: listener.to_string(),
                cpus: cpus.to_vec(),
                source,
            })?;
        info!(
            "listener {listener}: own runtime, {} threads pinned to CPUs {cpus:?}",
            cpus.len()
        );
        Ok(Self {
            handle: rt.handle().clone(),
            own: Some(rt),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for StageRuntime {
    /// Stops the stage's own runtime without blocking the caller (dropping a
    /// runtime inside another one would panic).
    fn drop(&mut self) {
        if let Some(rt) = self.own.take() {
            rt.shutdown_background();
        }
    }
}

/// What one listener does with its connections.
pub struct Stage {
    pub name: String,
    pool: Pool,
}

impl Stage {
    pub fn new(cfg: &Config, l: &ListenerConfig) -> Result<Arc<Self>, StageError> {
        Ok(Arc::new(Self {
            name: l.name.clone(),
            pool: Pool::new(cfg.listener_backend(l)),
        }))
    }

    /// Serves one accepted connection to its end.
    pub async fn serve(&self, stream: Stream, peer: PeerAddr) -> Result<(), ConnError> {
        let start = Instant::now();
        let (t, server) = self.pool.forward(stream).await?;
        debug!(
            %peer, listener = %self.name, %server, bytes_in = t.from_client,
            bytes_out = t.from_server, duration_ms = start.elapsed().as_millis() as u64,
            "connection closed"
        );
        Ok(())
    }
}
