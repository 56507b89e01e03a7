//! The active generation's eye on a canary: every second it samples the
//! canary's published listener counters and its own, and over
//! `[global.canary].window` compares their error rates; it aborts a canary
//! that does worse by more than `max_error_ratio`, takes out of the split a
//! canary that died or stalled, and promotes a healthy one after
//! `promote_after`. Every decision is logged with its figures.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    config::CanaryConfig,
    stats::counters::{CONNECTIONS_AND_ERRORS, connections_and_errors},
    steering::{self, LiveCanary, Slot, Steering},
};

/// How often the counters are sampled (they are published once a second).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Connections and errors of one generation, as totals since its start.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub connections: u64,
    pub errors: u64,
}

impl Figures {
    fn since(self, earlier: Figures) -> Figures {
        Figures {
            connections: self.connections.saturating_sub(earlier.connections),
            errors: self.errors.saturating_sub(earlier.errors),
        }
    }

    pub fn rate(self) -> f64 {
        if self.connections == 0 {
            0.0
        } else {
            self.errors as f64 / self.connections as f64
        }
    }
}

/// What the judge decided about the canary over the window.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough canary connections in the window yet.
    Waiting,
    Healthy,
    Abort {
        canary: Figures,
        active: Figures,
    },
}

/// The judgement over one window: `canary` and `active` are the window's
/// deltas.
pub fn judge(cfg: &CanaryConfig, canary: Figures, active: Figures) -> Verdict {
    if canary.connections < cfg.min_connections {
        return Verdict::Waiting;
    }
    let worse =
        canary.rate() > cfg.min_error_rate && canary.rate() > active.rate() * cfg.max_error_ratio;
    if cfg.auto_abort && worse {
        Verdict::Abort { canary, active }
    } else {
        Verdict::Healthy
    }
}

/// One sample: (when, canary totals, active totals).
type Sample = (Instant, Figures, Figures);

/// The state of watching one canary.
pub struct Watch {
    slot: Slot,
    generation: u64,
    since: Instant,
    samples: VecDeque<Sample>,
    judged_healthy: bool,
}

impl Watch {
    fn new(c: &LiveCanary) -> Self {
        Self {
            slot: Slot(c.canary.slot),
            generation: c.record.generation,
            since: Instant::now(),
            samples: VecDeque::new(),
            judged_healthy: false,
        }
    }

    /// The canary's and our figures over the current window, and how long
    /// the samples span (shorter than the window while it fills).
    pub fn window(&self) -> Option<(Figures, Figures, Duration)> {
        let (t0, c0, a0) = self.samples.front()?;
        let (t1, c1, a1) = self.samples.back()?;
        Some((c1.since(*c0), a1.since(*a0), t1.duration_since(*t0)))
    }
}

/// A slot's totals as published in the pinned maps.
pub fn published(steering: &Steering, slot: Slot) -> steering::Result<Figures> {
    let sums = steering.listener_sums(slot, &CONNECTIONS_AND_ERRORS)?;
    let (connections, errors) = connections_and_errors(&sums);
    Ok(Figures {
        connections,
        errors,
    })
}

/// One tick of the active generation `own` (labelled `label`) watching the
/// instance's canary. `watch` keeps the state between ticks.
pub fn tick(
    steering: &mut Steering,
    own: Slot,
    label: &str,
    cfg: &CanaryConfig,
    watch: &mut Option<Watch>,
) {
    let canary = match steering.canary() {
        Ok(Some(c)) => c,
        Ok(None) => {
            *watch = None;
            return;
        }
        Err(e) => {
            warn!("{label}: reading the canary: {e}");
            return;
        }
    };
    let slot = Slot(canary.canary.slot);
    if slot == own {
        return;
    }
    if !steering::is_alive(&canary.record) {
        match steering.abort_canary(slot) {
            Ok(true) => warn!(
                canary = canary.record.generation,
                "{label}: canary generation {} (slot {}) is gone or stalled: taken out of the \
                 split, every new connection goes to the active generation",
                canary.record.generation,
                slot.0
            ),
            Ok(false) => {}
            Err(e) => warn!("{label}: taking a dead canary out of the split: {e}"),
        }
        *watch = None;
        return;
    }
    if watch
        .as_ref()
        .is_none_or(|w| w.slot != slot || w.generation != canary.record.generation)
    {
        *watch = Some(Watch::new(&canary));
    }
    let w = watch.as_mut().expect("set above");
    let now = Instant::now();
    if w.samples
        .back()
        .is_some_and(|(at, _, _)| now.duration_since(*at) < SAMPLE_EVERY)
    {
        return;
    }
    let (c, a) = match (published(steering, slot), published(steering, own)) {
        (Ok(c), Ok(a)) => (c, a),
        (Err(e), _) | (_, Err(e)) => {
            warn!("{label}: reading the canary's counters: {e}");
            return;
        }
    };
    w.samples.push_back((now, c, a));
    // Keep the newest sample at or before the window's start as the base.
    while w.samples.len() > 1 && now.duration_since(w.samples[1].0) >= cfg.window {
        w.samples.pop_front();
    }
    let Some((canary_window, active_window, span)) = w.window() else {
        return;
    };
    match judge(cfg, canary_window, active_window) {
        Verdict::Waiting => {}
        Verdict::Healthy => w.judged_healthy = true,
        Verdict::Abort {
            canary: cf,
            active: af,
        } => {
            match steering.abort_canary(slot) {
                Ok(true) => {
                    warn!(
                        canary = w.generation,
                        canary_error_rate = cf.rate(),
                        canary_errors = cf.errors,
                        canary_connections = cf.connections,
                        active_error_rate = af.rate(),
                        active_errors = af.errors,
                        active_connections = af.connections,
                        "{label}: canary generation {} ABORTED automatically: error rate {:.2}% \
                         ({} of {} connections in the last {:.1?}, window {:?}) against the \
                         active generation's {:.2}% ({} of {}); limits: max_error_ratio {}, \
                         min_error_rate {:.2}%",
                        w.generation,
                        cf.rate() * 100.0,
                        cf.errors,
                        cf.connections,
                        span,
                        cfg.window,
                        af.rate() * 100.0,
                        af.errors,
                        af.connections,
                        cfg.max_error_ratio,
                        cfg.min_error_rate * 100.0,
                    );
                    *watch = None;
                }
                Ok(false) => {}
                Err(e) => warn!("{label}: aborting the canary: {e}"),
            }
            return;
        }
    }
    if let Some(after) = cfg.promote_after
        && w.judged_healthy
        && w.since.elapsed() >= after
    {
        let (cf, af) = (canary_window, active_window);
        match steering.promote_canary(slot) {
            Ok(()) => {
                info!(
                    canary = w.generation,
                    canary_error_rate = cf.rate(),
                    canary_connections = cf.connections,
                    active_error_rate = af.rate(),
                    active_connections = af.connections,
                    "{label}: canary generation {} PROMOTED after {:?} (promote_after): error \
                     rate {:.2}% ({} of {} connections in the last {:.1?}) against ours {:.2}% \
                     ({} of {})",
                    w.generation,
                    after,
                    cf.rate() * 100.0,
                    cf.errors,
                    cf.connections,
                    span,
                    af.rate() * 100.0,
                    af.errors,
                    af.connections,
                );
                *watch = None;
            }
            Err(e) => warn!("{label}: promoting the canary: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(connections: u64, errors: u64) -> Figures {
        Figures {
            connections,
            errors,
        }
    }

    #[test]
    fn a_canary_is_judged_only_with_enough_connections_and_against_both_limits() {
        let cfg = CanaryConfig {
            min_connections: 100,
            max_error_ratio: 2.0,
            min_error_rate: 0.01,
            ..CanaryConfig::default()
        };
        // Too few connections: whatever the errors.
        assert_eq!(judge(&cfg, f(99, 99), f(1000, 0)), Verdict::Waiting);
        // All errors against none: abort.
        assert!(matches!(
            judge(&cfg, f(100, 100), f(1000, 0)),
            Verdict::Abort { .. }
        ));
        // Below the absolute floor: one error in 200 against none is fine.
        assert_eq!(judge(&cfg, f(200, 1), f(1000, 0)), Verdict::Healthy);
        // Twice the active's rate is the limit, not above it.
        assert_eq!(judge(&cfg, f(1000, 100), f(1000, 50)), Verdict::Healthy);
        assert!(matches!(
            judge(&cfg, f(1000, 101), f(1000, 50)),
            Verdict::Abort { .. }
        ));
        // auto_abort = false only watches.
        let watch_only = CanaryConfig {
            auto_abort: false,
            ..cfg
        };
        assert_eq!(
            judge(&watch_only, f(100, 100), f(1000, 0)),
            Verdict::Healthy
        );
    }

    #[test]
    fn rates_of_nothing_are_zero() {
        assert_eq!(f(0, 0).rate(), 0.0);
        assert_eq!(f(10, 5).since(f(4, 1)), f(6, 4));
        assert_eq!(f(4, 1).since(f(10, 5)), f(0, 0));
    }
}
