//! The runtime a stage runs on: its own, with threads pinned to the
//! listener's `cpus`, or the default one.

use tokio::runtime::{Handle, Runtime};
use tracing::{info, warn};

use super::StageError;
use crate::sys;

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
