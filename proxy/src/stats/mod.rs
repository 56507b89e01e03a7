//! The stats listener: one set of figures in three views — an HTML page for
//! people (`/`), JSON for scripts (`/stats.json`) and the Prometheus text
//! exposition (`/metrics`).
//!
//! Figures come from the pinned maps when eBPF steering is in use, so every
//! generation shows the same instance-wide totals (all generations, plus the
//! retired ones: monotonic across handovers), the generations themselves,
//! the eBPF counters and a history of new connections per generation. Without
//! the maps, the page shows this generation's own counters.

pub mod counters;
pub mod status;

mod html;
mod prometheus;
mod server;

pub use server::serve_connection;

use std::{collections::BTreeMap, sync::Arc};

use proxy_common::{HISTORY_INTERVAL_MS, HistorySample, MAX_SLOTS};
use serde::{Serialize, ser::SerializeMap};

use crate::{
    health::{CheckView, Health},
    steering::{Maps, ProgramCounters, Slot, Totals},
};
use counters::{
    COMPRESSION_RATIO, Def, ListenerCounter, Registry, ServerCounter, Show, Table,
    compression_ratio, object_name,
};
use status::GenStatus;

/// What one stats listener shows.
pub struct StatsSource {
    pub instance: String,
    pub banner: String,
    /// Only this listener (and its backend's servers), for a stage's own
    /// stats listener; None for the instance-wide one.
    pub only_listener: Option<String>,
    /// The pinned maps, opened at startup (before any privilege drop), when
    /// steering is in use.
    pub maps: Option<std::sync::Mutex<Maps>>,
    /// Our slot: our own counters are published fresh before each view.
    pub own_slot: Option<Slot>,
    /// This generation's counters (used without maps).
    pub registry: Arc<Registry>,
    /// Server states (kept fresh from the pinned map by the generation).
    pub health: Arc<Health>,
    /// Backend of each listener, to filter servers.
    pub listener_backends: Vec<(String, String)>,
}

/// The figures of one listener or server: its labels, one value per entry
/// of its counter table, and the figures derived from them.
#[derive(Debug)]
pub struct Row<T: Table> {
    /// (JSON key, Prometheus label, value): the listener's name, or the
    /// server's backend and address.
    pub labels: Vec<(&'static str, &'static str, String)>,
    pub values: Vec<u64>,
    pub derived: Vec<(&'static Def, Option<f64>)>,
    /// A server's health checks, when its backend checks it.
    pub check: Option<CheckView>,
    _table: std::marker::PhantomData<T>,
}

impl<T: Table> Row<T> {
    /// The row of `object` from instance totals (a figure nobody published
    /// yet has its initial value).
    fn new(
        labels: Vec<(&'static str, &'static str, String)>,
        totals: &Totals,
        object: &[&str],
    ) -> Self {
        let name = object_name::<T>(object);
        let values = T::DEFS
            .iter()
            .enumerate()
            .map(|(i, d)| {
                name.and_then(|n| totals.get(&(n, i as u32)).copied())
                    .unwrap_or(d.initial)
            })
            .collect();
        Self {
            labels,
            values,
            derived: Vec::new(),
            check: None,
            _table: std::marker::PhantomData,
        }
    }

    pub fn get(&self, c: T) -> u64 {
        self.values[c.into()]
    }

    /// The counters a view shows, with their values.
    pub fn shown(&self) -> impl Iterator<Item = (&'static Def, u64)> + '_ {
        T::DEFS
            .iter()
            .zip(self.values.iter().copied())
            .filter(|(d, _)| d.show != Show::Hidden)
    }
}

impl<T: Table> Serialize for Row<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, _, v) in &self.labels {
            map.serialize_entry(k, v)?;
        }
        for (d, v) in self.shown() {
            match d.show {
                Show::Flag => map.serialize_entry(d.name, &(v > 0))?,
                _ => map.serialize_entry(d.name, &v)?,
            }
        }
        for (d, v) in &self.derived {
            map.serialize_entry(d.name, v)?;
        }
        if let Some(check) = &self.check {
            map.serialize_entry("check", check)?;
        }
        map.end()
    }
}

/// New connections of one generation per history interval.
#[derive(Debug, Serialize)]
pub struct Series {
    pub generation: u64,
    /// (unix ms, new connections in the interval ending then)
    pub points: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct View {
    pub instance: String,
    pub banner: String,
    pub steering: &'static str,
    pub active_slot: Option<u32>,
    pub generations: Vec<GenStatus>,
    pub listeners: Vec<Row<ListenerCounter>>,
    pub servers: Vec<Row<ServerCounter>>,
    pub ebpf: Option<ProgramCounters>,
    /// The canary beside the active generation, if any.
    pub canary: Option<status::CanaryStatus>,
    pub history_interval_ms: u64,
    pub history: Vec<Series>,
}

impl StatsSource {
    /// Gathers the figures now.
    pub fn view(&self) -> View {
        let from_maps = self.maps.as_ref().and_then(|maps| {
            let mut maps = maps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = self.own_slot {
                let _ = maps.publish_metrics(slot, self.registry.snapshot());
            }
            // Under the instance lock: a new generation claiming a slot
            // moves that slot's counters into the retired totals, and a
            // reader in between would count them twice or not at all.
            let maps = maps.lock().ok()?;
            let st = status::from_maps(&maps, &self.instance).ok()?;
            let live: Vec<Slot> = st
                .generations
                .iter()
                .filter(|g| g.alive)
                .map(|g| Slot(g.slot))
                .collect();
            let totals = maps.metric_totals(&live).ok()?;
            let history = maps.history().unwrap_or_default();
            Some((st, totals, history))
        });
        let (generations, active_slot, ebpf, canary, totals, history, steering) = match from_maps {
            Some((st, totals, history)) => (
                st.generations,
                st.active_slot,
                Some(st.counters),
                st.canary,
                totals,
                history,
                "ebpf",
            ),
            None => (
                Vec::new(),
                None,
                None,
                None,
                self.registry
                    .snapshot()
                    .into_iter()
                    .map(|(object, counter, _, value)| ((object, counter), value))
                    .collect(),
                Vec::new(),
                "reuseport (no eBPF: this generation's own counters)",
            ),
        };
        View {
            instance: self.instance.clone(),
            banner: self.banner.clone(),
            steering,
            active_slot,
            generations,
            listeners: self.listener_rows(&totals),
            servers: self.server_rows(&totals),
            ebpf,
            canary,
            history_interval_ms: HISTORY_INTERVAL_MS,
            history: series(&history),
        }
    }

    fn wanted(&self, listener: &str) -> bool {
        self.only_listener
            .as_deref()
            .is_none_or(|only| only == listener)
    }

    fn listener_rows(&self, totals: &Totals) -> Vec<Row<ListenerCounter>> {
        self.listener_backends
            .iter()
            .filter(|(name, _)| self.wanted(name))
            .map(|(name, _)| {
                let mut row = Row::new(vec![("name", "listener", name.clone())], totals, &[name]);
                let ratio = compression_ratio(
                    row.get(ListenerCounter::BodyIn),
                    row.get(ListenerCounter::BodyOut),
                );
                row.derived.push((&COMPRESSION_RATIO, ratio));
                row
            })
            .collect()
    }

    fn server_rows(&self, totals: &Totals) -> Vec<Row<ServerCounter>> {
        let backends: Vec<&str> = self
            .listener_backends
            .iter()
            .filter(|(name, _)| self.wanted(name))
            .map(|(_, b)| b.as_str())
            .collect();
        self.registry
            .servers
            .iter()
            .filter(|(b, _, _)| backends.contains(&b.as_str()))
            .map(|(backend, server, _)| {
                let labels = vec![
                    ("backend", "backend", backend.clone()),
                    ("server", "server", server.clone()),
                ];
                // `up` sums over live generations: up when every live
                // generation that tried it succeeded last. A checked
                // server is up when its checks say so.
                let mut row = Row::new(labels, totals, &[backend, server]);
                let addr = server.parse().ok();
                row.check = addr.and_then(|a| self.health.server(backend, &a).view());
                if let Some(check) = &row.check {
                    row.values[usize::from(ServerCounter::Up)] = u64::from(check.is_up());
                }
                row
            })
            .collect()
    }
}

/// New connections per interval and generation, from cumulative samples.
fn series(samples: &[HistorySample]) -> Vec<Series> {
    let mut by_gen: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for pair in samples.windows(2) {
        let (prev, cur) = (&pair[0], &pair[1]);
        for slot in 0..MAX_SLOTS as usize {
            let generation = cur.generation[slot];
            if generation == 0 {
                continue;
            }
            let before = if prev.generation[slot] == generation {
                prev.accepted[slot]
            } else {
                0
            };
            by_gen
                .entry(generation)
                .or_default()
                .push((cur.unix_ms, cur.accepted[slot].saturating_sub(before)));
        }
    }
    by_gen
        .into_iter()
        .map(|(generation, points)| Series { generation, points })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::config::Config;

    fn source() -> StatsSource {
        let cfg = Config::for_tests("", "127.0.0.1:8080", "");
        StatsSource {
            instance: "unit".into(),
            banner: String::new(),
            only_listener: None,
            maps: None,
            own_slot: None,
            registry: Arc::new(Registry::new(&cfg)),
            health: Health::none(),
            listener_backends: vec![("front".into(), "app".into())],
        }
    }

    #[test]
    fn one_table_feeds_json_prometheus_and_html() {
        let src = source();
        let front = src.registry.listener("front");
        front[ListenerCounter::Total].fetch_add(3, Relaxed);
        front[ListenerCounter::BodyIn].fetch_add(1000, Relaxed);
        front[ListenerCounter::BodyOut].fetch_add(250, Relaxed);
        let server = src.registry.server("app", "127.0.0.1:9000");
        server[ServerCounter::Errors].fetch_add(2, Relaxed);
        server[ServerCounter::Up].store(0, Relaxed);
        let view = src.view();

        let json = serde_json::to_value(&view).unwrap();
        let l = &json["listeners"][0];
        assert_eq!(l["name"], "front");
        assert_eq!(l["total"], 3);
        assert_eq!(l["compression_ratio"], 0.25);
        assert!(l.get("body_in").is_none(), "hidden counters stay out: {l}");
        let s = &json["servers"][0];
        assert_eq!(
            (s["backend"].as_str(), s["server"].as_str()),
            (Some("app"), Some("127.0.0.1:9000"))
        );
        assert_eq!(s["errors"], 2);
        assert_eq!(s["up"], false);

        let prom = prometheus::prometheus(&view);
        for line in [
            "# TYPE proxy_listener_connections_total counter",
            "proxy_listener_connections_total{instance=\"unit\",listener=\"front\"} 3",
            "proxy_listener_compression_ratio{instance=\"unit\",listener=\"front\"} 0.25",
            "# TYPE proxy_server_current_connections gauge",
            "proxy_server_up{instance=\"unit\",backend=\"app\",server=\"127.0.0.1:9000\"} 0",
            "proxy_server_connect_errors_total{instance=\"unit\",backend=\"app\",server=\"127.0.0.1:9000\"} 2",
        ] {
            assert!(
                prom.lines().any(|l| l == line),
                "missing {line:?} in\n{prom}"
            );
        }
        assert!(!prom.contains("body_in"), "{prom}");

        let page = html::html(&view);
        assert!(page.contains("<th>gzip ratio</th>"), "{page}");
        assert!(page.contains("<td>25.0%</td>"), "{page}");
        assert!(page.contains("<td class=\"down\">DOWN</td>"), "{page}");
    }

    #[test]
    fn every_shown_counter_has_a_prometheus_family_and_a_column() {
        fn check<T: Table>() {
            for d in T::DEFS.iter().filter(|d| d.show != Show::Hidden) {
                assert!(d.prometheus.starts_with("proxy_"), "{d:?}");
                assert!(!d.column.is_empty() && !d.help.is_empty(), "{d:?}");
                assert_eq!(
                    d.kind == counters::Kind::Counter,
                    d.prometheus.ends_with("_total"),
                    "{d:?}"
                );
            }
        }
        check::<ListenerCounter>();
        check::<ServerCounter>();
    }
}
