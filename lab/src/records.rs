//! What one run of the lab writes and the report reads back: the raw
//! per-connection records, the events (handovers and the scenario's
//! actions), per-generation samples and the kernel figures, one folder per
//! (mode, scenario):
//!
//! ```text
//! <out>/<mode>/<scenario>/conns.csv        start_us,connect_us,total_us,kind,class
//! <out>/<mode>/<scenario>/events.csv       t_us,event,detail
//! <out>/<mode>/<scenario>/generations.csv  t_us,generation,accepted
//! <out>/<mode>/<scenario>/run.json         RunInfo (settings, kernel figures, notes)
//! ```
//!
//! Times are microseconds since the run's start. `connect_us` is empty
//! when the connection was never established. Everything is plain CSV so
//! that a spreadsheet or pandas reads it too.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, BufRead, BufWriter, Write},
    path::Path,
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// How a connection ended, from the client's side.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Every byte of every response arrived and matched.
    Ok,
    /// connect() was refused (RST to the SYN).
    Refused,
    /// Reset (or closed) before the request was written.
    ResetBeforeRequest,
    /// Reset after the request was written, before the whole response.
    ResetAfterRequest,
    /// The connection's deadline passed (connect or exchange).
    Timeout,
    /// Closed cleanly before the whole response, or bytes that differ.
    Truncated,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Ok,
        Class::Refused,
        Class::ResetBeforeRequest,
        Class::ResetAfterRequest,
        Class::Timeout,
        Class::Truncated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Refused => "refused",
            Class::ResetBeforeRequest => "reset_before_request",
            Class::ResetAfterRequest => "reset_after_request",
            Class::Timeout => "timeout",
            Class::Truncated => "truncated",
        }
    }
}

/// What kind of client a connection was (the load's mix).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One request with `Connection: close`.
    Short,
    /// Several requests on one connection, with think time between.
    Keepalive,
    /// One request whose response trickles for seconds.
    Stream,
    /// One request with `Connection: close` over TLS.
    Tls,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Short, Kind::Keepalive, Kind::Stream, Kind::Tls];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Short => "short",
            Kind::Keepalive => "keepalive",
            Kind::Stream => "stream",
            Kind::Tls => "tls",
        }
    }
}

macro_rules! from_name {
    ($t:ty) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t>::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = <$t>::ALL.iter().map(|v| v.name()).collect();
                        format!("{s:?}: expected one of {}", names.join(", "))
                    })
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
from_name!(Class);
from_name!(Kind);

/// One connection of the load.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// When the client started it (the schedule's time, open loop).
    pub start_us: u64,
    /// How long connect() took; None when it never connected.
    pub connect_us: Option<u64>,
    /// From start to the end (success or failure).
    pub total_us: u64,
    pub kind: Kind,
    pub class: Class,
}

/// Something that happened during a run, for the plots' marks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub t_us: u64,
    /// `handover` (a new generation was started), `ready` (it serves),
    /// `old_exit`, `sigstop`, `sigcont`, `kill`, `canary`, `promote`,
    /// `abort`, ...
    pub event: String,
    /// Free text without commas (a generation number, a PID).
    pub detail: String,
}

/// New connections a generation had accepted by `t_us` (sampled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenSample {
    pub t_us: u64,
    pub generation: u64,
    pub accepted: u64,
}

/// Kernel counters of the namespace (`/proc/net/netstat`, `/proc/net/snmp`)
/// and of the steering program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFigures {
    /// `TcpExt: ListenOverflows`, `ListenDrops`, `TCPMigrateReqSuccess`,
    /// `TCPMigrateReqFailure`, `TCPSynRetrans`, `Tcp: OutRsts`: after minus
    /// before the run.
    pub counters: BTreeMap<String, u64>,
    /// The program's per-slot counters at the end (eBPF modes):
    /// `selected`, `migrated`, `fallback_new`, `fallback_migrate`.
    pub program: Option<serde_json::Value>,
}

/// The settings and figures of one run (`run.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub mode: String,
    pub scenario: String,
    /// New connections per second asked of the load.
    pub rate: f64,
    /// The mix, e.g. `short=90,stream=10`.
    pub mix: String,
    pub handovers: u32,
    pub interval_ms: u64,
    pub duration_ms: u64,
    pub kernel: KernelFigures,
    /// What the scenario observed and wants in the report (rollbacks,
    /// generations draining at once, migration counters of a path, ...).
    pub notes: BTreeMap<String, String>,
    /// Set when the scenario does not apply to the mode (e.g. a canary
    /// with HAProxy): the reason; the run has no records then.
    pub skipped: Option<String>,
}

fn csv_writer(path: &Path, header: &str) -> io::Result<BufWriter<fs::File>> {
    let mut w = BufWriter::new(fs::File::create(path)?);
    writeln!(w, "{header}")?;
    Ok(w)
}

/// `e` with the file it is about.
fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn bad(path: &Path, line: usize, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}:{line}: {what}", path.display()),
    )
}

/// The data lines of a CSV file (header checked), split on commas.
fn csv_lines(path: &Path, header: &str) -> io::Result<Vec<(usize, Vec<String>)>> {
    let file = io::BufReader::new(fs::File::open(path).map_err(|e| named(path, e))?);
    let mut out = Vec::new();
    for (i, line) in file.lines().enumerate() {
        let line = line?;
        if i == 0 {
            if line != header {
                return Err(bad(path, 1, format!("expected the header {header:?}")));
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        out.push((i + 1, line.split(',').map(str::to_string).collect()));
    }
    Ok(out)
}

fn field<T: FromStr>(path: &Path, line: usize, v: &str, name: &str) -> io::Result<T>
where
    T::Err: fmt::Display,
{
    v.parse()
        .map_err(|e| bad(path, line, format!("{name} {v:?}: {e}")))
}

pub const CONNS_HEADER: &str = "start_us,connect_us,total_us,kind,class";
pub const EVENTS_HEADER: &str = "t_us,event,detail";
pub const GENERATIONS_HEADER: &str = "t_us,generation,accepted";

pub fn write_conns(path: &Path, records: &[ConnRecord]) -> io::Result<()> {
    let mut w = csv_writer(path, CONNS_HEADER)?;
    for r in records {
        let connect = r.connect_us.map(|c| c.to_string()).unwrap_or_default();
        writeln!(
            w,
            "{},{connect},{},{},{}",
            r.start_us, r.total_us, r.kind, r.class
        )?;
    }
    w.flush()
}

pub fn read_conns(path: &Path) -> io::Result<Vec<ConnRecord>> {
    csv_lines(path, CONNS_HEADER)?
        .into_iter()
        .map(|(n, f)| {
            if f.len() != 5 {
                return Err(bad(path, n, "expected 5 fields"));
            }
            Ok(ConnRecord {
                start_us: field(path, n, &f[0], "start_us")?,
                connect_us: if f[1].is_empty() {
                    None
                } else {
                    Some(field(path, n, &f[1], "connect_us")?)
                },
                total_us: field(path, n, &f[2], "total_us")?,
                kind: field(path, n, &f[3], "kind")?,
                class: field(path, n, &f[4], "class")?,
            })
        })
        .collect()
}

pub fn write_events(path: &Path, events: &[Event]) -> io::Result<()> {
    let mut w = csv_writer(path, EVENTS_HEADER)?;
    for e in events {
        let detail = e.detail.replace([',', '\n', '\r'], ";");
        writeln!(w, "{},{},{detail}", e.t_us, e.event)?;
    }
    w.flush()
}

pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    csv_lines(path, EVENTS_HEADER)?
        .into_iter()
        .map(|(n, f)| {
            if f.len() != 3 {
                return Err(bad(path, n, "expected 3 fields"));
            }
            Ok(Event {
                t_us: field(path, n, &f[0], "t_us")?,
                event: f[1].clone(),
                detail: f[2].clone(),
            })
        })
        .collect()
}

pub fn write_generations(path: &Path, samples: &[GenSample]) -> io::Result<()> {
    let mut w = csv_writer(path, GENERATIONS_HEADER)?;
    for s in samples {
        writeln!(w, "{},{},{}", s.t_us, s.generation, s.accepted)?;
    }
    w.flush()
}

pub fn read_generations(path: &Path) -> io::Result<Vec<GenSample>> {
    csv_lines(path, GENERATIONS_HEADER)?
        .into_iter()
        .map(|(n, f)| {
            if f.len() != 3 {
                return Err(bad(path, n, "expected 3 fields"));
            }
            Ok(GenSample {
                t_us: field(path, n, &f[0], "t_us")?,
                generation: field(path, n, &f[1], "generation")?,
                accepted: field(path, n, &f[2], "accepted")?,
            })
        })
        .collect()
}

pub fn write_run(path: &Path, info: &RunInfo) -> io::Result<()> {
    fs::write(
        path,
        serde_json::to_vec_pretty(info).map_err(io::Error::other)?,
    )
}

pub fn read_run(path: &Path) -> io::Result<RunInfo> {
    serde_json::from_slice(&fs::read(path).map_err(|e| named(path, e))?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = std::env::temp_dir().join(format!("lab-records-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let conns = vec![
            ConnRecord {
                start_us: 5,
                connect_us: Some(40),
                total_us: 300,
                kind: Kind::Short,
                class: Class::Ok,
            },
            ConnRecord {
                start_us: 9,
                connect_us: None,
                total_us: 1_000_000,
                kind: Kind::Tls,
                class: Class::Timeout,
            },
        ];
        write_conns(&dir.join("c.csv"), &conns).unwrap();
        assert_eq!(read_conns(&dir.join("c.csv")).unwrap(), conns);
        let events = vec![Event {
            t_us: 7,
            event: "handover".into(),
            detail: "generation 2".into(),
        }];
        write_events(&dir.join("e.csv"), &events).unwrap();
        assert_eq!(read_events(&dir.join("e.csv")).unwrap(), events);
        fs::write(
            dir.join("bad.csv"),
            format!("{CONNS_HEADER}\n1,2,3,short,nope\n"),
        )
        .unwrap();
        let e = read_conns(&dir.join("bad.csv")).unwrap_err().to_string();
        assert!(
            e.contains("bad.csv:2") && e.contains("expected one of"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
