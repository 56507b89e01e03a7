//! Active health checks of the backend servers, with states that outlive a
//! generation.
//!
//! A backend with `[backend.check]` has each of its servers checked every
//! `interval` ([`probe`]); `fall` failures in a row take an UP server DOWN,
//! `rise` successes in a row bring it back ([`step`]). The round-robin of
//! [`crate::stage::forward::Pool`] skips DOWN servers.
//!
//! The states live in the instance's pinned map
//! ([`proxy_common::MAP_HEALTH`]), keyed by the server's object name
//! (`server/<backend>/<addr>`), so that they are shared by generations:
//!
//! - only the active generation checks; each check continues from the
//!   pinned record, whoever wrote it, so a handover neither resets the
//!   counts nor checks twice for long;
//! - every generation (draining ones included) reads the records every
//!   [`REFRESH`] into one atomic per server, which is all a connection
//!   looks at: no map syscall per connection;
//! - a new generation reads them before it takes any connection, so a
//!   server that was DOWN stays DOWN and gets nothing after an upgrade,
//!   and an old generation keeps following the states the new one writes
//!   (HAProxy's old workers route to a frozen server list).
//!
//! Without eBPF steering (`steering = "reuseport"`) the states live in this
//! process only, and every generation checks in every phase (nobody else
//! would check for a draining one). A server without a record starts UP (as in HAProxy): it
//! takes `fall` failed checks to go DOWN.

pub mod probe;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use proxy_common::{CheckResult, HEALTH_DOWN, HEALTH_UP, HealthRecord, ObjectName, Phase};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use self::probe::{Outcome, Probe};
use crate::{
    config::{Addr, Config},
    stats::counters::{ServerCounter, object_name},
    steering::HealthMap,
    sys,
};

/// How often every generation reads the pinned states.
pub const REFRESH: Duration = Duration::from_millis(100);

/// A change of a server's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// The rise/fall state machine: the record after one check whose outcome
/// is `outcome`, and the state change if there is one. `prev` is the last
/// record, whoever wrote it; None for a server never checked (it starts UP).
pub fn step(
    prev: Option<&HealthRecord>,
    outcome: &Outcome,
    rise: u32,
    fall: u32,
    now_ms: u64,
    generation: u64,
) -> (HealthRecord, Option<Transition>) {
    let mut r = prev.copied().unwrap_or(HealthRecord {
        since_unix_ms: now_ms,
        state: HEALTH_UP,
        ..Default::default()
    });
    if r.state != HEALTH_DOWN {
        r.state = HEALTH_UP;
    }
    r.checked_unix_ms = now_ms;
    r.generation = generation;
    r.duration_us = outcome.duration.as_micros().min(u32::MAX as u128) as u32;
    r.result = outcome.result.code();
    r.http_status = u32::from(outcome.http_status);
    let mut change = None;
    if outcome.result.passed() {
        r.successes = r.successes.saturating_add(1);
        r.failures = 0;
        if r.state == HEALTH_DOWN && r.successes >= rise {
            r.state = HEALTH_UP;
            r.since_unix_ms = now_ms;
            change = Some(Transition::Up);
        }
    } else {
        r.failures = r.failures.saturating_add(1);
        r.successes = 0;
        if r.state == HEALTH_UP && r.failures >= fall {
            r.state = HEALTH_DOWN;
            r.since_unix_ms = now_ms;
            change = Some(Transition::Down);
        }
    }
    (r, change)
}

/// One server as the round-robin and the views see it.
pub struct ServerHealth {
    pub backend: String,
    pub addr: Addr,
    /// Its key in the pinned map; None when the name is too long for it
    /// (its state then stays in this process).
    key: Option<ObjectName>,
    /// How it is checked; None: not checked, always UP.
    probe: Option<Probe>,
    /// What a connection looks at.
    up: AtomicBool,
    /// The last record, for the views (None before the first check).
    record: Mutex<Option<HealthRecord>>,
}

impl ServerHealth {
    fn new(backend: &str, addr: &Addr, probe: Option<Probe>) -> Self {
        let name = addr.to_string();
        Self {
            backend: backend.to_string(),
            addr: addr.clone(),
            key: object_name::<ServerCounter>(&[backend, &name]),
            probe,
            up: AtomicBool::new(true),
            record: Mutex::new(None),
        }
    }

    /// Whether the round-robin may pick it.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn is_checked(&self) -> bool {
        self.probe.is_some()
    }

    fn record(&self) -> Option<HealthRecord> {
        *self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `r` as the current state; returns the change, if any.
    fn set(&self, r: HealthRecord) -> Option<Transition> {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        let was = self.up.swap(r.is_up(), Relaxed);
        match (was, r.is_up()) {
            (true, false) => Some(Transition::Down),
            (false, true) => Some(Transition::Up),
            _ => None,
        }
    }

    /// Sets the state as if a check had found it (for other modules'
    /// tests).
    #[cfg(test)]
    pub(crate) fn set_for_tests(&self, r: HealthRecord) {
        self.set(r);
    }

    /// What the views show; None for a server that is not checked.
    pub fn view(&self) -> Option<CheckView> {
        self.probe.as_ref()?;
        Some(match self.record() {
            Some(r) => CheckView::from_record(&r),
            None => CheckView::unchecked_yet(),
        })
    }

    fn label(&self) -> String {
        format!("{}/{}", self.backend, self.addr)
    }
}

/// A server's check state as the stats views and `proxy status` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckView {
    /// "UP" or "DOWN".
    pub state: &'static str,
    /// HAProxy's name of the last result (`L4OK`, `L4CON`, `L7STS`...),
    /// None before the first check.
    pub result: Option<&'static str>,
    /// HAProxy's words for it ("Layer4 connection problem").
    pub reason: Option<&'static str>,
    /// The status of the last HTTP check.
    pub http_status: Option<u16>,
    /// How long the last check took.
    pub duration_ms: f64,
    /// Since when the server is in `state` (Unix ms; 0 before the first
    /// check).
    pub since_unix_ms: u64,
    /// When it was last checked (Unix ms; 0 never).
    pub checked_unix_ms: u64,
    /// Checks passed and failed in a row.
    pub successes: u32,
    pub failures: u32,
    /// The generation that ran the last check.
    pub checked_by: u64,
}

impl CheckView {
    pub fn from_record(r: &HealthRecord) -> Self {
        let result = CheckResult::from_code(r.result);
        Self {
            state: if r.is_up() { "UP" } else { "DOWN" },
            result: result.map(CheckResult::name),
            reason: result.map(CheckResult::reason),
            http_status: (r.http_status != 0).then_some(r.http_status as u16),
            duration_ms: f64::from(r.duration_us) / 1000.0,
            since_unix_ms: r.since_unix_ms,
            checked_unix_ms: r.checked_unix_ms,
            successes: r.successes,
            failures: r.failures,
            checked_by: r.generation,
        }
    }

    fn unchecked_yet() -> Self {
        Self {
            state: "UP",
            result: None,
            reason: None,
            http_status: None,
            duration_ms: 0.0,
            since_unix_ms: 0,
            checked_unix_ms: 0,
            successes: 0,
            failures: 0,
            checked_by: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == "UP"
    }

    /// The last result in a few words: `L7STS 500 in 1.2ms`, or `-`.
    pub fn last_check(&self) -> String {
        match self.result {
            None => "-".into(),
            Some(name) => {
                let status = self
                    .http_status
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default();
                format!("{name}{status} in {:.1}ms", self.duration_ms)
            }
        }
    }

    /// For how long the state holds, at `now_ms`: `12s`, or `-`.
    pub fn since(&self, now_ms: u64) -> String {
        if self.since_unix_ms == 0 {
            return "-".into();
        }
        let secs = now_ms.saturating_sub(self.since_unix_ms) / 1000;
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

/// The health of every server of this generation's config.
pub struct Health {
    servers: Vec<Arc<ServerHealth>>,
    /// The pinned states; None without eBPF steering.
    store: Option<Mutex<HealthMap>>,
    /// Our generation number, written in the records we write.
    generation: u64,
    /// A failed map write is logged once.
    store_failed: AtomicBool,
}

impl Health {
    /// The servers of `cfg`, with the states the pinned map already holds
    /// (a new generation starts knowing which servers are DOWN).
    pub fn new(cfg: &Config, store: Option<HealthMap>, generation: u64) -> Arc<Self> {
        let servers: Vec<Arc<ServerHealth>> = cfg
            .backends
            .iter()
            .flat_map(|b| {
                let probe = b.check.as_ref().map(|c| Probe::new(c, b));
                b.servers.iter().map(move |s| {
                    let probe = probe.clone().filter(|_| s.check);
                    Arc::new(ServerHealth::new(&b.name, &s.addr, probe))
                })
            })
            .collect();
        let health = Arc::new(Self {
            servers,
            store: store.map(Mutex::new),
            generation,
            store_failed: AtomicBool::new(false),
        });
        for s in health.checked() {
            if let Some(r) = health.read(s) {
                s.set(r);
                if !r.is_up() {
                    info!(
                        "server {} starts DOWN, as checked by generation {} ({} in a row failed)",
                        s.label(),
                        r.generation,
                        r.failures
                    );
                }
            }
        }
        health
    }

    /// No backend, no check (for tests).
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            servers: Vec::new(),
            store: None,
            generation: 0,
            store_failed: AtomicBool::new(false),
        })
    }

    /// The server `addr` of `backend` (an unchecked one if the config has
    /// no such server).
    pub fn server(&self, backend: &str, addr: &Addr) -> Arc<ServerHealth> {
        self.servers
            .iter()
            .find(|s| s.backend == backend && &s.addr == addr)
            .cloned()
            .unwrap_or_else(|| Arc::new(ServerHealth::new(backend, addr, None)))
    }

    fn checked(&self) -> impl Iterator<Item = &Arc<ServerHealth>> {
        self.servers.iter().filter(|s| s.is_checked())
    }

    /// The pinned record of `s`, if any.
    fn read(&self, s: &ServerHealth) -> Option<HealthRecord> {
        let (store, key) = (self.store.as_ref()?, s.key.as_ref()?);
        let store = store.lock().unwrap_or_else(|e| e.into_inner());
        match store.get(key) {
            Ok(r) => r,
            Err(e) => {
                debug!("server {}: {e}", s.label());
                None
            }
        }
    }

    fn write(&self, s: &ServerHealth, r: &HealthRecord) {
        let (Some(store), Some(key)) = (self.store.as_ref(), s.key.as_ref()) else {
            return;
        };
        let written = store.lock().unwrap_or_else(|e| e.into_inner()).set(key, r);
        if let Err(e) = written
            && !self.store_failed.swap(true, Relaxed)
        {
            warn!(
                "server {}: {e}: its state stays in this generation (the next one starts \
                 without it)",
                s.label()
            );
        }
    }

    /// Starts the checks (they run while the generation is active) and, with
    /// pinned states, the refresh that follows them in every phase. Both end
    /// when the generation stops.
    pub fn spawn(self: &Arc<Self>, phase: watch::Receiver<Phase>) {
        let checked: Vec<usize> = (0..self.servers.len())
            .filter(|&i| self.servers[i].is_checked())
            .collect();
        let n = checked.len() as u32;
        for (k, i) in checked.into_iter().enumerate() {
            tokio::spawn(self.clone().check_loop(i, k as u32, n, phase.clone()));
        }
        if self.store.is_some() && n > 0 {
            tokio::spawn(self.clone().refresh_loop(phase));
        }
    }

    /// Whether this generation runs the checks in `phase`: the active one
    /// with pinned states (the others follow them); every live one without
    /// (nobody else would check for it).
    fn checks_in(&self, phase: Phase) -> bool {
        match phase {
            Phase::Active => true,
            Phase::Stopped => false,
            _ => self.store.is_none(),
        }
    }

    /// Checks server `i` every interval while [`Health::checks_in`] the
    /// phase.
    /// The `k`th of `n` checked servers starts `k / n` of an interval late,
    /// so that checks do not all go out at once.
    async fn check_loop(
        self: Arc<Self>,
        i: usize,
        k: u32,
        n: u32,
        mut phase: watch::Receiver<Phase>,
    ) {
        let server = &self.servers[i];
        let Some(probe) = &server.probe else { return };
        let mut next = tokio::time::Instant::now() + probe.interval * k / n.max(1);
        loop {
            let current = *phase.borrow_and_update();
            if current == Phase::Stopped {
                return;
            }
            if !self.checks_in(current) {
                if phase.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                changed = phase.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            next = tokio::time::Instant::now() + probe.interval;
            let outcome = probe.run(&server.addr).await;
            if self.checks_in(*phase.borrow()) {
                self.apply(server, probe, &outcome);
            }
        }
    }

    /// Counts `outcome` into the state of `server`, from the pinned record
    /// (another generation may have checked last), and publishes it.
    fn apply(&self, server: &ServerHealth, probe: &Probe, outcome: &Outcome) {
        let prev = self.read(server).or_else(|| server.record());
        let (r, change) = step(
            prev.as_ref(),
            outcome,
            probe.rise,
            probe.fall,
            sys::unix_ms(),
            self.generation,
        );
        self.write(server, &r);
        server.set(r);
        if let Some(change) = change {
            self.log_transition(server, change, outcome);
        }
    }

    /// HAProxy's line: `server app/10.0.0.1:80 is DOWN, reason: Layer4
    /// connection problem, info: "Connection refused", check duration: 0ms.
    /// 1 active servers left.`
    fn log_transition(&self, server: &ServerHealth, change: Transition, o: &Outcome) {
        let active = self
            .servers
            .iter()
            .filter(|s| s.backend == server.backend && s.is_up())
            .count();
        let mut line = format!("server {} is ", server.label());
        line.push_str(match change {
            Transition::Up => "UP",
            Transition::Down => "DOWN",
        });
        line.push_str(&format!(", reason: {}", o.result.reason()));
        if o.http_status != 0 {
            line.push_str(&format!(", code: {}", o.http_status));
        }
        if !o.info.is_empty() {
            line.push_str(&format!(", info: {:?}", o.info));
        }
        line.push_str(&format!(
            ", check duration: {}ms. {active} active servers {}.",
            o.duration.as_millis(),
            match change {
                Transition::Up => "online",
                Transition::Down => "left",
            }
        ));
        match change {
            Transition::Up => info!(backend = %server.backend, server = %server.addr, "{line}"),
            Transition::Down => warn!(backend = %server.backend, server = %server.addr, "{line}"),
        }
        if change == Transition::Down && active == 0 {
            error!(
                backend = %server.backend,
                "backend {} has no server available! (connections now try every server in turn)",
                server.backend
            );
        }
    }

    /// Follows the pinned records every [`REFRESH`] until the generation
    /// stops: the checks of the active generation, whichever it is.
    async fn refresh_loop(self: Arc<Self>, phase: watch::Receiver<Phase>) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if *phase.borrow() == Phase::Stopped {
                return;
            }
            for s in self.checked() {
                let Some(r) = self.read(s) else { continue };
                // Our own checks log their transitions themselves.
                if let Some(change) = s.set(r)
                    && r.generation != self.generation
                {
                    info!(
                        backend = %s.backend, server = %s.addr,
                        "server {} is {}, as checked by generation {}",
                        s.label(),
                        if change == Transition::Up { "UP" } else { "DOWN" },
                        r.generation
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(result: CheckResult) -> Outcome {
        Outcome {
            result,
            http_status: 0,
            duration: Duration::from_millis(3),
            info: String::new(),
        }
    }

    /// Feeds `results` (true = passed) with rise 2, fall 3; returns the
    /// state after each check and the transitions.
    fn run(start: Option<HealthRecord>, results: &[bool]) -> (Vec<bool>, Vec<(usize, Transition)>) {
        let mut r = start;
        let mut states = Vec::new();
        let mut changes = Vec::new();
        for (i, ok) in results.iter().enumerate() {
            let o = outcome(if *ok {
                CheckResult::L4Ok
            } else {
                CheckResult::L4Con
            });
            let (next, change) = step(r.as_ref(), &o, 2, 3, 1000 + i as u64, 7);
            states.push(next.is_up());
            if let Some(c) = change {
                changes.push((i, c));
                assert_eq!(next.since_unix_ms, 1000 + i as u64, "since moves on change");
            }
            r = Some(next);
        }
        (states, changes)
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down_rise_successes_bring_it_back() {
        let (states, changes) = run(None, &[false, false, true, false, false, false, true, true]);
        // A success in between resets the failure count.
        assert_eq!(
            states,
            [true, true, true, true, true, false, false, true],
            "{changes:?}"
        );
        assert_eq!(changes, [(5, Transition::Down), (7, Transition::Up)]);
    }

    #[test]
    fn a_failure_in_between_resets_the_rise_count() {
        let down = HealthRecord {
            state: HEALTH_DOWN,
            failures: 3,
            since_unix_ms: 1,
            ..Default::default()
        };
        let (states, changes) = run(Some(down), &[true, false, true, true]);
        assert_eq!(states, [false, false, false, true]);
        assert_eq!(changes, [(3, Transition::Up)]);
    }

    #[test]
    fn the_record_says_what_and_who() {
        let mut o = outcome(CheckResult::L7Status);
        o.http_status = 500;
        let (r, change) = step(None, &o, 1, 1, 5000, 9);
        assert_eq!(change, Some(Transition::Down));
        assert_eq!(
            (
                r.state,
                r.result,
                r.http_status,
                r.generation,
                r.duration_us,
                r.failures
            ),
            (HEALTH_DOWN, CheckResult::L7Status.code(), 500, 9, 3000, 1)
        );
        let v = CheckView::from_record(&r);
        assert_eq!(v.state, "DOWN");
        assert_eq!(v.last_check(), "L7STS 500 in 3.0ms");
        assert_eq!(v.since(17_000), "12s");
        assert_eq!(v.reason, Some("Layer7 wrong status"));
    }

    /// Without pinned states a draining generation checks for itself: a
    /// refused server goes DOWN after `fall` checks, and the checks stop
    /// with the generation.
    #[tokio::test]
    async fn without_pinned_states_every_phase_checks() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let text = format!(
            "[global]\nname = \"unit\"\n[[listener]]\nname = \"front\"\n\
             bind = [\"127.0.0.1:1\"]\nbackend = \"app\"\n[[backend]]\nname = \"app\"\n\
             servers = [\"{closed}\"]\n[backend.check]\ninterval = \"20ms\"\nfall = 2\n"
        );
        let cfg = Config::parse(&text, "unit.toml", &|_| None).unwrap();
        let h = Health::new(&cfg, None, 1);
        let (phase, rx) = watch::channel(Phase::Draining);
        h.spawn(rx);
        let s = h.server("app", &Addr::Tcp(closed));
        let start = std::time::Instant::now();
        while s.is_up() {
            assert!(start.elapsed() < Duration::from_secs(5), "never DOWN");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let v = s.view().unwrap();
        assert_eq!(v.result, Some("L4CON"), "{v:?}");
        assert!(v.failures >= 2, "DOWN after fall = 2 failures: {v:?}");
        phase.send_replace(Phase::Stopped);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let checked = s.view().unwrap().checked_unix_ms;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.view().unwrap().checked_unix_ms, checked, "checks stop");
    }

    #[test]
    fn servers_are_checked_unless_they_opt_out() {
        let text = "[global]\nname = \"unit\"\n[[listener]]\nname = \"front\"\n\
                    bind = [\"127.0.0.1:1\"]\nbackend = \"app\"\n[[backend]]\nname = \"app\"\n\
                    servers = [\"127.0.0.1:9000\", { addr = \"127.0.0.1:9001\", check = false }]\n\
                    [backend.check]\ntype = \"tcp\"\n";
        let cfg = Config::parse(text, "unit.toml", &|_| None).unwrap();
        let h = Health::new(&cfg, None, 1);
        let a = h.server("app", &"127.0.0.1:9000".parse().unwrap());
        let b = h.server("app", &"127.0.0.1:9001".parse().unwrap());
        assert!(a.is_checked() && !b.is_checked());
        assert!(a.is_up() && b.is_up(), "no record yet: UP");
        assert_eq!(a.view().map(|v| v.result), Some(None));
        assert!(b.view().is_none());
        assert_eq!(
            a.set(HealthRecord {
                state: HEALTH_DOWN,
                ..Default::default()
            }),
            Some(Transition::Down)
        );
        assert!(!a.is_up());
    }
}
