//! Accept loops and the drain: every listening socket of a generation has
//! one loop on its stage's runtime, which follows the generation's phase
//! (accepting in starting, ready and active) and hands each connection to
//! the stage as a task counted in [`Conns`].

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use proxy_common::Phase;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, info, warn};

use super::lifecycle::{Conns, accepts};
use crate::{
    stage::{
        Stage,
        socket::{ListenSocket, PeerAddr, Stream},
    },
    stats::{self, StatsSource},
};

/// What the accept loops share with the control loop.
pub struct Shared {
    pub conns: Conns,
    /// The generation's connection cap over all listeners (global
    /// `maxconn`), so that it stays under its open-file limit.
    pub slots: Arc<Semaphore>,
    /// Wakes the accept loops to try `accept()` without waiting for epoll
    /// (migrated connections may arrive without a wakeup on older kernels).
    pub sweep: Notify,
    /// When this generation flipped the active slot, to log how soon the
    /// first connection arrived after it (the handover gap operators ask
    /// about).
    pub flipped_at: OnceLock<Instant>,
    first_conn_logged: AtomicBool,
}

impl Shared {
    pub fn new(maxconn: usize) -> Self {
        Self {
            conns: Conns::default(),
            slots: Arc::new(Semaphore::new(maxconn)),
            sweep: Notify::new(),
            flipped_at: OnceLock::new(),
            first_conn_logged: AtomicBool::new(false),
        }
    }
}

/// Accepts on `listener` for `stage` while the phase allows it.
pub async fn accept_loop(
    listener: Arc<ListenSocket>,
    stage: Arc<Stage>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    maxconn: Option<Arc<Semaphore>>,
) {
    // A UNIX listener cannot hand its queue to a successor, and the stages
    // chained to it (ours, while they drain; nobody else once a successor
    // renamed its path) still need it: it accepts until the generation
    // exits.
    let always = !listener.is_tcp();
    loop {
        if !always && !accepts(*phase.borrow_and_update()) {
            if phase.changed().await.is_err() {
                return;
            }
            continue;
        }
        let permit = match &maxconn {
            Some(sem) => tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                _ = phase.changed(), if !always => continue,
            },
            None => None,
        };
        let slot = tokio::select! {
            p = shared.slots.clone().acquire_owned() => p.ok(),
            _ = phase.changed(), if !always => continue,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = phase.changed(), if !always => continue,
            _ = shared.sweep.notified() => continue,
        };
        match accepted {
            Ok((stream, peer)) => spawn_conn(stream, peer, &stage, &shared, [permit, slot]),
            // EINVAL: the socket stopped listening under a pending accept
            // (the phase that says so may be a moment behind).
            Err(e) if !accepts(*phase.borrow()) || e.raw_os_error() == Some(libc::EINVAL) => {
                debug!("listener {}: accept after stop: {e}", stage.name)
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(
                    "listener {} ({}): accept failed: {e}",
                    stage.name, listener.addr
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves a stats listener until the task is aborted: at most `maxconn`
/// connections at a time (more wait in the kernel queue), each with
/// `request_timeout` for a request head.
pub async fn stats_loop(
    listener: Arc<ListenSocket>,
    source: Arc<StatsSource>,
    maxconn: usize,
    request_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(maxconn));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    stats::serve_connection(stream, source, request_timeout).await;
                    drop(permit);
                });
            }
            Err(e) => {
                debug!("stats listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One open connection in [`Conns::open`], until dropped.
struct OpenConn(Arc<Shared>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.conns.open.fetch_sub(1, Relaxed);
    }
}

/// Runs one connection on the current (stage) runtime.
fn spawn_conn(
    stream: Stream,
    peer: PeerAddr,
    stage: &Arc<Stage>,
    shared: &Arc<Shared>,
    permits: [Option<OwnedSemaphorePermit>; 2],
) {
    shared.conns.accepted.fetch_add(1, Relaxed);
    shared.conns.open.fetch_add(1, Relaxed);
    if let Some(flipped) = shared.flipped_at.get()
        && !shared.first_conn_logged.load(Relaxed)
        && !shared.first_conn_logged.swap(true, Relaxed)
    {
        info!(
            after_flip_us = flipped.elapsed().as_micros() as u64,
            listener = %stage.name,
            "first connection after the flip"
        );
    }
    // Counts the connection as open until the task ends, even by a panic:
    // the drain waits for this count.
    let open = OpenConn(shared.clone());
    // A map rather than an async block, which would keep its own copy of
    // the stream and the peer beside the ones in `serve`'s future.
    tokio::spawn(stage.clone().serve(stream, peer).map(move |served| {
        // The stage logs the failure (rate-limited).
        if served.is_err() {
            open.0.conns.failed.fetch_add(1, Relaxed);
        }
        drop(open);
        drop(permits);
    }));
}
