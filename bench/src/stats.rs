//! What a run measured (counts, bytes, latencies) and the table it is
//! printed as.

use std::time::Duration;

/// The outcome of one measured run over all its clients.
#[derive(Default)]
pub struct Sample {
    /// Requests (keep-alive runs) or connections (per-connection runs).
    pub count: u64,
    /// Body bytes received, as they came over the wire.
    pub body_bytes: u64,
    /// Wall time of the whole run, first start to last finish.
    pub elapsed: Duration,
    /// One latency per request or connection, in microseconds.
    latencies_us: Vec<u32>,
}

impl Sample {
    pub fn record(&mut self, latency: Duration, body_bytes: usize) {
        self.count += 1;
        self.body_bytes += body_bytes as u64;
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Sample) {
        self.count += other.count;
        self.body_bytes += other.body_bytes;
        self.latencies_us.extend(other.latencies_us);
    }

    /// Requests or connections per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the latencies, in milliseconds (nearest
    /// rank). Sorts in place the first time.
    pub fn quantile_ms(&mut self, q: f64) -> Option<f64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(f64::from(self.latencies_us[rank - 1]) / 1000.0)
    }
}

/// One line of the results table.
pub struct Row {
    pub target: String,
    pub figure: f64,
    pub unit: &'static str,
    /// Figure divided by the direct peer's figure; `None` without a peer.
    pub ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Row {
    /// A row from a sample, with its ratio to `peer` (a rate) if any.
    pub fn from_sample(target: &str, unit: &'static str, s: &mut Sample, peer: Option<f64>) -> Row {
        let figure = s.rate();
        Row {
            target: target.to_string(),
            figure,
            unit,
            ratio: peer.map(|p| figure / p.max(1e-9)),
            p50_ms: s.quantile_ms(0.50),
            p99_ms: s.quantile_ms(0.99),
        }
    }
}

/// The table, aligned for a terminal.
pub fn render(rows: &[Row]) -> String {
    let width = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let opt = |v: Option<f64>, prec: usize| match v {
        Some(v) => format!("{v:.prec$}"),
        None => "-".to_string(),
    };
    let mut out = format!(
        "{:<width$}  {:>12}  {:<8}  {:>6}  {:>8}  {:>8}\n",
        "target", "figure", "unit", "ratio", "p50 ms", "p99 ms"
    );
    out.push_str(&"-".repeat(width + 2 + 12 + 2 + 8 + 2 + 6 + 2 + 8 + 2 + 8));
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{:<width$}  {:>12.1}  {:<8}  {:>6}  {:>8}  {:>8}\n",
            r.target,
            r.figure,
            r.unit,
            opt(r.ratio, 2),
            opt(r.p50_ms, 3),
            opt(r.p99_ms, 3),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut s = Sample::default();
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us * 1000), 0);
        }
        assert_eq!(s.quantile_ms(0.5), Some(50.0));
        assert_eq!(s.quantile_ms(0.99), Some(99.0));
        assert_eq!(s.quantile_ms(1.0), Some(100.0));
        assert_eq!(Sample::default().quantile_ms(0.5), None);
    }
}
