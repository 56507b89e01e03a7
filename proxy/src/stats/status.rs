//! What `proxy status` shows: the generations of an instance and the
//! steering counters, read from the pinned maps (so it works from any PID
//! namespace that sees the bpffs).

use std::{fmt::Write, path::Path};

use proxy_common::{MAX_SLOTS, Phase};
use serde::Serialize;

use super::counters::{CONNECTIONS_AND_ERRORS, ListenerCounter, connections_and_errors};
use crate::{
    steering::{self, Maps, ProgramCounters, Slot, SteeringError, canary::percent},
    sys,
};

/// A generation as `proxy status` reports it.
#[derive(Debug, Serialize)]
pub struct GenStatus {
    pub slot: u32,
    pub generation: u64,
    pub pid: u32,
    /// Inode of the generation's PID namespace: with `pid`, identifies the
    /// process across containers.
    pub pidns: u64,
    pub state: String,
    /// Whether its heartbeat is recent (a dead generation keeps its record
    /// until the slot is reused).
    pub alive: bool,
    pub active: bool,
    pub age_ms: u64,
    pub accepted: u64,
    pub active_conns: u64,
    /// Steering counters of this slot (since this generation claimed it).
    pub steered: u64,
    pub migrated_in: u64,
    /// Upgraded connections (WebSocket...) it still holds, from its last
    /// published counters (at most a second old): what a draining
    /// generation waits for before `close_spread_time` closes them.
    pub tunnels: u64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub instance: String,
    pub pins: String,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub counters: ProgramCounters,
    /// The canary beside the active generation, if one is set.
    pub canary: Option<CanaryStatus>,
}

/// A canary as `proxy status` and the stats views report it.
#[derive(Debug, Serialize, Clone)]
pub struct CanaryStatus {
    pub slot: u32,
    pub generation: u64,
    pub alive: bool,
    /// The share set in the pinned state, percent.
    pub weight_percent: f64,
    /// The share the program measured since the canary started, percent
    /// (None before any new connection).
    pub measured_percent: Option<f64>,
    /// New connections the program sent to the canary and to the active
    /// slot since the canary started.
    pub split_canary: u64,
    pub split_active: u64,
    /// The canary's connections and errors (connections that ended in an
    /// error, and 5xx responses) since it started, and its error rate.
    pub connections: u64,
    pub errors: u64,
    pub error_rate: f64,
    /// The same figures of the active generation, since it started.
    pub active_connections: u64,
    pub active_errors: u64,
    pub active_error_rate: f64,
}

fn rate(errors: u64, connections: u64) -> f64 {
    if connections == 0 {
        0.0
    } else {
        errors as f64 / connections as f64
    }
}

fn canary_status(maps: &Maps, active: Option<Slot>) -> Result<Option<CanaryStatus>, SteeringError> {
    let Some(c) = maps.canary()? else {
        return Ok(None);
    };
    let record = maps.record(Slot(c.slot))?;
    let (split_canary, split_active) = maps.split()?;
    let figures = |slot: Slot| -> Result<(u64, u64), SteeringError> {
        Ok(connections_and_errors(
            &maps.listener_sums(slot, &CONNECTIONS_AND_ERRORS)?,
        ))
    };
    let (connections, errors) = figures(Slot(c.slot))?;
    let (active_connections, active_errors) = match active {
        Some(a) => figures(a)?,
        None => (0, 0),
    };
    let decided = split_canary + split_active;
    Ok(Some(CanaryStatus {
        slot: c.slot,
        generation: record.generation,
        alive: steering::is_alive(&record),
        weight_percent: percent(c.weight_bp),
        measured_percent: (decided > 0).then(|| split_canary as f64 * 100.0 / decided as f64),
        split_canary,
        split_active,
        connections,
        errors,
        error_rate: rate(errors, connections),
        active_connections,
        active_errors,
        active_error_rate: rate(active_errors, active_connections),
    }))
}

impl CanaryStatus {
    /// One line for operators.
    pub fn line(&self) -> String {
        format!(
            "canary: generation {} (slot {}){}  share {}% set, {} measured ({} of {} new \
             connections)  error rate {:.2}% ({} of {}) vs active {:.2}% ({} of {})",
            self.generation,
            self.slot,
            if self.alive { "" } else { " DEAD" },
            self.weight_percent,
            self.measured_percent
                .map_or_else(|| "-".to_string(), |m| format!("{m:.1}%")),
            self.split_canary,
            self.split_canary + self.split_active,
            self.error_rate * 100.0,
            self.errors,
            self.connections,
            self.active_error_rate * 100.0,
            self.active_errors,
            self.active_connections,
        )
    }
}

pub fn read(bpffs: &Path, name: &str) -> Result<Status, SteeringError> {
    let dir = steering::pin_dir(bpffs, name);
    from_maps(&Maps::open(&dir)?, name)
}

/// The status from maps already open (a generation that dropped its
/// privileges can no longer open the pins, but keeps its descriptors).
pub fn from_maps(maps: &Maps, name: &str) -> Result<Status, SteeringError> {
    let dir = maps.dir();
    let active = maps.active_slot()?;
    let counters = maps.counters()?;
    let now_ms = sys::unix_ms();
    let generations = maps
        .records()?
        .into_iter()
        .filter(|(_, r)| !r.is_free())
        .map(|(slot, r)| {
            let tunnels = maps.listener_sums(slot, &[ListenerCounter::TunnelsOpen as u32])?[0];
            let alive = steering::is_alive(&r);
            let state = match r.phase() {
                Some(p) if alive || p == Phase::Stopped => p.name().to_string(),
                Some(p) => format!("dead ({})", p.name()),
                None => format!("unknown ({})", r.state),
            };
            Ok(GenStatus {
                slot: slot.0,
                generation: r.generation,
                pid: r.pid,
                pidns: r.pidns,
                state,
                alive,
                active: active == Some(slot),
                age_ms: now_ms.saturating_sub(r.started_unix_ms),
                accepted: r.accepted,
                active_conns: r.active_conns,
                steered: counters.selected[slot.0 as usize],
                migrated_in: counters.migrated[slot.0 as usize],
                tunnels,
            })
        })
        .collect::<Result<_, SteeringError>>()?;
    Ok(Status {
        instance: name.to_string(),
        pins: dir.display().to_string(),
        active_slot: active.map(|s| s.0),
        generations,
        counters,
        canary: canary_status(maps, active)?,
    })
}

/// A table an operator reads.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance {}  (pins {})  active slot: {}",
        status.instance,
        status.pins,
        status
            .active_slot
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        out,
        "{:>4} {:>4} {:>8} {:<18} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}",
        "slot", "gen", "pid", "state", "age", "accepted", "open", "tunnels", "steered", "migrated"
    );
    for g in &status.generations {
        let _ = writeln!(
            out,
            "{:>4} {:>4} {:>8} {:<18} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}",
            g.slot,
            g.generation,
            g.pid,
            format!("{}{}", g.state, if g.active { " *" } else { "" }),
            humantime::format_duration(std::time::Duration::from_secs(g.age_ms / 1000)).to_string(),
            g.accepted,
            g.active_conns,
            g.tunnels,
            g.steered,
            g.migrated_in
        );
    }
    if status.generations.is_empty() {
        let _ = writeln!(out, "  (no generations)");
    }
    if let Some(canary) = &status.canary {
        let _ = writeln!(out, "{}", canary.line());
    }
    let c = &status.counters;
    let _ = writeln!(
        out,
        "eBPF: fell back to kernel hash: {} new, {} migrating  (* = active; {} slots)",
        c.fallback_new, c.fallback_migrate, MAX_SLOTS
    );
    out
}
