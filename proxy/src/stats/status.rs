//! What `proxy status` shows: the generations of an instance and the
//! steering counters, read from the pinned maps (so it works from any PID
//! namespace that sees the bpffs).

use std::{fmt::Write, path::Path};

use proxy_common::{MAX_SLOTS, Phase};
use serde::Serialize;

use super::counters::{CONNECTIONS_AND_ERRORS, ListenerCounter, connections_and_errors};
use crate::{
    health::CheckView,
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
    /// Checked servers of the instance, from the pinned health states.
    pub servers: Vec<ServerStatus>,
}

/// A checked server as `proxy status` shows it.
#[derive(Debug, Serialize)]
pub struct ServerStatus {
    pub backend: String,
    pub server: String,
    pub check: CheckView,
}

/// The checked servers in the pinned health states, by backend and server.
fn server_statuses(maps: &Maps) -> Result<Vec<ServerStatus>, SteeringError> {
    let mut servers: Vec<ServerStatus> = maps
        .health_records()?
        .into_iter()
        .filter_map(|(name, record)| {
            let len = name
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name.name.len());
            let name = std::str::from_utf8(&name.name[..len]).ok()?;
            let (backend, server) = name.strip_prefix("server/")?.split_once('/')?;
            Some(ServerStatus {
                backend: backend.to_string(),
                server: server.to_string(),
                check: CheckView::from_record(&record),
            })
        })
        .collect();
    servers.sort_by(|a, b| (&a.backend, &a.server).cmp(&(&b.backend, &b.server)));
    Ok(servers)
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
        servers: server_statuses(maps)?,
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
    if !status.servers.is_empty() {
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:>10} {:<24} {:>8}",
            "checked server", "state", "since", "last check", "checker"
        );
        let now_ms = sys::unix_ms();
        for s in &status.servers {
            let c = &s.check;
            let _ = writeln!(
                out,
                "{:<40} {:<5} {:>10} {:<24} {:>8}",
                format!("{}/{}", s.backend, s.server),
                c.state,
                c.since(now_ms),
                c.last_check(),
                format!("gen {}", c.checked_by),
            );
        }
    }
    let c = &status.counters;
    let _ = writeln!(
        out,
        "eBPF: fell back to kernel hash: {} new, {} migrating  (* = active; {} slots)",
        c.fallback_new, c.fallback_migrate, MAX_SLOTS
    );
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::{CheckResult, HEALTH_DOWN, HealthRecord};

    use super::*;

    #[test]
    fn render_lists_the_checked_servers() {
        let now = sys::unix_ms();
        let record = HealthRecord {
            since_unix_ms: now - 12_000,
            checked_unix_ms: now,
            generation: 4,
            duration_us: 1500,
            state: HEALTH_DOWN,
            failures: 3,
            result: CheckResult::L7Status.code(),
            http_status: 503,
            ..Default::default()
        };
        let status = Status {
            instance: "edge".into(),
            pins: "/sys/fs/bpf/proxy/edge".into(),
            active_slot: Some(0),
            generations: Vec::new(),
            counters: ProgramCounters::default(),
            canary: None,
            servers: vec![ServerStatus {
                backend: "app".into(),
                server: "10.0.0.7:80".into(),
                check: CheckView::from_record(&record),
            }],
        };
        let text = render(&status);
        let line = text
            .lines()
            .find(|l| l.starts_with("app/10.0.0.7:80"))
            .unwrap_or_else(|| panic!("no server line in\n{text}"));
        for part in ["DOWN", "12s", "L7STS 503 in 1.5ms", "gen 4"] {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["servers"][0]["check"]["result"], "L7STS");
        assert_eq!(json["servers"][0]["check"]["checked_by"], 4);
    }
}
