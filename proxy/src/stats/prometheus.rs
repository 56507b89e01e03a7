//! The Prometheus text exposition (format 0.0.4), generated from the
//! counter tables.

use std::fmt::Write;

use super::{
    Row, View,
    counters::{Kind, ServerCounter, Show, Table},
};
use crate::health::CheckView;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    }
}

/// Writes families under one `instance` label.
struct Exposition {
    out: String,
    instance: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>) {
        let out = &mut self.out;
        let inst = &self.instance;
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{instance=\"{inst}\"{sep}{labels}}} {value}");
        }
    }

    /// One family per shown counter of the table, one sample per row.
    fn rows<T: Table>(&mut self, rows: &[Row<T>]) {
        let labels = |r: &Row<T>| {
            r.labels
                .iter()
                .map(|(_, k, v)| format!("{k}=\"{}\"", label(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        for (i, def) in T::DEFS.iter().enumerate() {
            if def.show == Show::Hidden {
                continue;
            }
            let samples = rows
                .iter()
                .map(|r| {
                    let v = r.values[i];
                    let v = if def.show == Show::Flag {
                        u64::from(v > 0)
                    } else {
                        v
                    };
                    (labels(r), v as f64)
                })
                .collect();
            self.family(def.prometheus, kind(def.kind), def.help, samples);
        }
        let derived = rows.first().map(|r| r.derived.len()).unwrap_or(0);
        for i in 0..derived {
            let def = rows[0].derived[i].0;
            let samples = rows
                .iter()
                .map(|r| (labels(r), r.derived[i].1.unwrap_or(0.0)))
                .collect();
            self.family(def.prometheus, kind(def.kind), def.help, samples);
        }
    }
}

impl Exposition {
    /// The health-check families of the checked servers (HAProxy's
    /// `check_status`, `check_duration`, `lastchg`).
    fn checks(&mut self, servers: &[Row<ServerCounter>]) {
        let checked: Vec<(String, &CheckView)> = servers
            .iter()
            .filter_map(|r| {
                let labels = r
                    .labels
                    .iter()
                    .map(|(_, k, v)| format!("{k}=\"{}\"", label(v)))
                    .collect::<Vec<_>>()
                    .join(",");
                r.check.as_ref().map(|c| (labels, c))
            })
            .collect();
        if checked.is_empty() {
            return;
        }
        let each = |f: &dyn Fn(&CheckView) -> f64| -> Vec<(String, f64)> {
            checked.iter().map(|(l, c)| (l.clone(), f(c))).collect()
        };
        self.family(
            "proxy_server_check_up",
            "gauge",
            "1 when the server's health checks say UP, 0 when DOWN.",
            each(&|c| f64::from(u8::from(c.is_up()))),
        );
        self.family(
            "proxy_server_check_result",
            "gauge",
            "The last check's result (HAProxy's name as a label), 1 per checked server.",
            checked
                .iter()
                .map(|(l, c)| {
                    (
                        format!("{l},result=\"{}\"", c.result.unwrap_or("none")),
                        1.0,
                    )
                })
                .collect(),
        );
        self.family(
            "proxy_server_check_duration_seconds",
            "gauge",
            "How long the last check took.",
            each(&|c| c.duration_ms / 1000.0),
        );
        self.family(
            "proxy_server_check_http_status",
            "gauge",
            "The status of the last HTTP check (0 for tcp checks).",
            each(&|c| f64::from(c.http_status.unwrap_or(0))),
        );
        self.family(
            "proxy_server_check_consecutive_failures",
            "gauge",
            "Checks failed in a row.",
            each(&|c| f64::from(c.failures)),
        );
        self.family(
            "proxy_server_check_last_change_timestamp_seconds",
            "gauge",
            "When the server's check state last changed (Unix time).",
            each(&|c| c.since_unix_ms as f64 / 1000.0),
        );
    }
}

/// Prometheus text exposition format 0.0.4.
pub fn prometheus(v: &View) -> String {
    let mut e = Exposition {
        out: String::new(),
        instance: label(&v.instance),
    };
    e.family(
        "proxy_steering_ebpf",
        "gauge",
        "1 when eBPF steering is in use, 0 for plain SO_REUSEPORT.",
        vec![(String::new(), if v.ebpf.is_some() { 1.0 } else { 0.0 })],
    );
    e.family(
        "proxy_generation_info",
        "gauge",
        "Generations of the instance (1 per generation; state and slot as labels).",
        v.generations
            .iter()
            .map(|g| {
                (
                    format!(
                        "slot=\"{}\",generation=\"{}\",state=\"{}\",active=\"{}\"",
                        g.slot,
                        g.generation,
                        label(&g.state),
                        g.active
                    ),
                    1.0,
                )
            })
            .collect(),
    );
    e.family(
        "proxy_generation_accepted_connections_total",
        "counter",
        "Connections accepted by each generation.",
        v.generations
            .iter()
            .map(|g| {
                (
                    format!("generation=\"{}\"", g.generation),
                    g.accepted as f64,
                )
            })
            .collect(),
    );
    e.rows(&v.listeners);
    e.rows(&v.servers);
    e.checks(&v.servers);
    if let Some(c) = &v.ebpf {
        // Slot counters restart when a new generation claims the slot: label
        // them with the generation, so that each series only ever grows.
        let owner = |slot: usize| {
            v.generations
                .iter()
                .find(|g| g.slot as usize == slot)
                .map(|g| g.generation)
        };
        let per_slot = |values: &[u64]| -> Vec<(String, f64)> {
            values
                .iter()
                .enumerate()
                .filter_map(|(slot, n)| {
                    owner(slot).map(|generation| {
                        (
                            format!("slot=\"{slot}\",generation=\"{generation}\""),
                            *n as f64,
                        )
                    })
                })
                .collect()
        };
        e.family(
            "proxy_ebpf_steered_total",
            "counter",
            "New connections the eBPF program steered to each generation.",
            per_slot(&c.selected),
        );
        e.family(
            "proxy_ebpf_migrated_total",
            "counter",
            "Queued requests of closing listeners migrated into each generation.",
            per_slot(&c.migrated),
        );
        e.family(
            "proxy_ebpf_fallback_total",
            "counter",
            "Connections the program left to the kernel's hash (active slot empty).",
            vec![
                ("kind=\"new\"".into(), c.fallback_new as f64),
                ("kind=\"migrate\"".into(), c.fallback_migrate as f64),
            ],
        );
    }
    if let Some(c) = &v.canary {
        let canary = format!("slot=\"{}\",generation=\"{}\"", c.slot, c.generation);
        let one = |value: f64| vec![(canary.clone(), value)];
        e.family(
            "proxy_canary_weight_ratio",
            "gauge",
            "Share of new connections set for the canary generation (0-1).",
            one(c.weight_percent / 100.0),
        );
        e.family(
            "proxy_canary_measured_ratio",
            "gauge",
            "Share of new connections the program sent to the canary since it started (0-1).",
            one(c.measured_percent.unwrap_or(0.0) / 100.0),
        );
        e.family(
            "proxy_canary_split_connections_total",
            "counter",
            "New connections split since the canary started, by where they went.",
            vec![
                (format!("{canary},to=\"canary\""), c.split_canary as f64),
                (format!("{canary},to=\"active\""), c.split_active as f64),
            ],
        );
        e.family(
            "proxy_canary_error_ratio",
            "gauge",
            "Errors per connection (ended in an error, or a 5xx response) since each started.",
            vec![
                (format!("{canary},role=\"canary\""), c.error_rate),
                (format!("{canary},role=\"active\""), c.active_error_rate),
            ],
        );
    }
    e.out
}
