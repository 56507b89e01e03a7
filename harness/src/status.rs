//! What the proxy reports about itself: `proxy status --json` (read through
//! the sandbox) and the stats listener's `/stats.json`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::sandbox::Sandbox;

/// `proxy status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub instance: String,
    pub pins: String,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub counters: Counters,
    /// The canary beside the active generation, if one is set.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
}

/// The `canary` object of `proxy status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct CanaryStatus {
    pub slot: u32,
    pub generation: u64,
    pub alive: bool,
    pub weight_percent: f64,
    pub measured_percent: Option<f64>,
    pub split_canary: u64,
    pub split_active: u64,
    pub connections: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub active_connections: u64,
    pub active_errors: u64,
    pub active_error_rate: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GenStatus {
    pub slot: u32,
    pub generation: u64,
    pub pid: u32,
    pub state: String,
    pub alive: bool,
    pub active: bool,
    pub age_ms: u64,
    pub accepted: u64,
    pub active_conns: u64,
    pub steered: u64,
    pub migrated_in: u64,
    /// Upgraded connections (WebSocket tunnels) it still holds.
    #[serde(default)]
    pub tunnels: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Counters {
    pub selected: Vec<u64>,
    pub migrated: Vec<u64>,
    pub fallback_new: u64,
    pub fallback_migrate: u64,
}

impl Status {
    /// The record of generation number `generation`, if its slot still has it.
    pub fn generation(&self, generation: u64) -> Option<&GenStatus> {
        self.generations.iter().find(|g| g.generation == generation)
    }

    /// The generation holding the active slot.
    pub fn active_generation(&self) -> Option<&GenStatus> {
        self.generations.iter().find(|g| g.active)
    }

    /// Whether `generation` is the active, serving one.
    pub fn is_serving(&self, generation: u64) -> bool {
        self.generation(generation)
            .is_some_and(|g| g.active && g.state == "active" && g.alive)
    }
}

impl Sandbox {
    /// `proxy status --json` of this sandbox's instance.
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `proxy status --json`, or why it could not be read.
    pub fn try_status(&self) -> Result<Status, String> {
        let out = Command::new(&self.bin)
            .arg("status")
            .arg("--name")
            .arg(&self.name)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--json")
            .env("NO_COLOR", "1")
            .output()
            .map_err(|e| format!("running proxy status: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "proxy status exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "proxy status printed JSON we cannot parse ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Polls status until `pred` holds; panics with `what` after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        let mut last = Err("never read".to_string());
        while Instant::now() < deadline {
            last = self.try_status();
            if let Ok(st) = &last
                && pred(st)
            {
                return last.unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
    }
}

/// `/stats.json` of the stats listener.
#[derive(Clone, Debug, Deserialize)]
pub struct StatsJson {
    pub instance: String,
    pub banner: String,
    pub steering: String,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub listeners: Vec<ListenerStats>,
    pub servers: Vec<ServerStats>,
    pub ebpf: Option<Counters>,
    pub history_interval_ms: u64,
    pub history: Vec<HistorySeries>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ListenerStats {
    pub name: String,
    pub current: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub proxy_header_errors: u64,
    pub http_requests: u64,
    pub compression_ratio: Option<f64>,
    /// Upgraded connections open now, and since the start.
    #[serde(default)]
    pub tunnels: u64,
    #[serde(default)]
    pub tunnels_total: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServerStats {
    pub backend: String,
    pub server: String,
    pub current: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub up: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistorySeries {
    pub generation: u64,
    pub points: Vec<(u64, u64)>,
}

impl StatsJson {
    pub fn listener(&self, name: &str) -> &ListenerStats {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no listener {name:?} in /stats.json: {self:#?}"))
    }
}
