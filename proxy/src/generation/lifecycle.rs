//! The one place a generation's phase changes: [`Lifecycle::enter`] moves
//! the `watch` channel that the accept loops and stages follow, and the
//! record in the pinned maps that other generations and `proxy status`
//! read, together.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use proxy_common::Phase;
use tokio::sync::watch;

use crate::{stage::DrainDeadline, stats::counters::Registry, steering::Steering};

/// Connections of this generation, counted by the accept loops.
#[derive(Default, Debug)]
pub struct Conns {
    pub accepted: AtomicU64,
    /// Open now; the drain waits for 0.
    pub open: AtomicU64,
    pub failed: AtomicU64,
}

/// Whether listeners accept in `phase`: from the start (before the flip the
/// program sends nothing here) until standby or drain.
pub fn accepts(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Starting | Phase::Ready | Phase::Active | Phase::Canary
    )
}

/// Whether HTTP keep-alive connections close after their next response.
pub fn drains(phase: Phase) -> bool {
    matches!(phase, Phase::Draining | Phase::Stopped)
}

/// A generation's phase and everything derived from it.
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    /// Derived from the phase for the stages, which only ask "draining?".
    draining: watch::Sender<bool>,
    /// Set once when the drain starts, for the tunnels that close before it.
    drain_deadline: watch::Sender<Option<DrainDeadline>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            phase: watch::channel(Phase::Starting).0,
            draining: watch::channel(false).0,
            drain_deadline: watch::channel(None).0,
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The phase, for the accept loops.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Whether the generation drains, for the stages.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// The drain deadline, for the stages' tunnels.
    pub fn drain_deadline(&self) -> watch::Receiver<Option<DrainDeadline>> {
        self.drain_deadline.subscribe()
    }

    /// Tells the stages when the drain that starts now ends.
    pub fn set_drain_deadline(&self, deadline: DrainDeadline) {
        self.drain_deadline.send_replace(Some(deadline));
    }

    /// Enters `phase`: the watch channels change, and the pinned record
    /// says so with the connection counts and the counters.
    pub fn enter(&self, phase: Phase, steering: &mut Steering, conns: &Conns, registry: &Registry) {
        self.phase.send_replace(phase);
        self.draining.send_if_modified(|d| {
            let changed = *d != drains(phase);
            *d = drains(phase);
            changed
        });
        self.beat(steering, conns, registry);
    }

    /// The heartbeat: the pinned record (and, when due, the counters and a
    /// history sample) in the current phase.
    pub fn beat(&self, steering: &mut Steering, conns: &Conns, registry: &Registry) {
        steering.publish(
            self.phase(),
            conns.accepted.load(Relaxed),
            conns.open.load(Relaxed),
            || registry.snapshot(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_moves_phase_and_draining_together() {
        let life = Lifecycle::default();
        let mut steering = Steering::Reuseport;
        let registry = Registry::empty();
        let conns = Conns::default();
        let phase = life.subscribe();
        let draining = life.draining();
        for (p, accepting, drain) in [
            (Phase::Ready, true, false),
            (Phase::Active, true, false),
            (Phase::Standby, false, false),
            (Phase::Active, true, false),
            (Phase::Draining, false, true),
            (Phase::Stopped, false, true),
            (Phase::Canary, true, false),
        ] {
            life.enter(p, &mut steering, &conns, &registry);
            assert_eq!(*phase.borrow(), p);
            assert_eq!(accepts(p), accepting, "{p:?}");
            assert_eq!(*draining.borrow(), drain, "{p:?}");
        }
    }
}
