//! The open-loop load: new connections at a fixed rate whatever the server
//! does (a closed loop would slow down with it and hide the failures), in
//! a configurable mix of clients, each connection's outcome classified and
//! timed.

use std::{
    io::ErrorKind,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;

use crate::{
    backend,
    modes::TLS_ADDR,
    records::{Class, ConnRecord, Kind},
};

/// Requests of a keep-alive client, and its think time between them.
pub const KEEPALIVE_REQUESTS: u64 = 5;
pub const KEEPALIVE_THINK: Duration = Duration::from_millis(50);

/// What a stream connection gets beyond the deadline: its response takes
/// this long.
pub const STREAM_EXTRA: Duration =
    Duration::from_millis(backend::STREAM_GAP.as_millis() as u64 * backend::STREAM_CHUNKS);

/// The mix: weights per kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix(pub Vec<(Kind, u32)>);

impl std::str::FromStr for Mix {
    type Err = String;
    /// `short=90,stream=10`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, w) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected kind=weight, e.g. short=90"))?;
            let kind: Kind = k.trim().parse()?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|e| format!("{part:?}: weight: {e}"))?;
            out.push((kind, w));
        }
        if out.iter().map(|(_, w)| w).sum::<u32>() == 0 {
            return Err(format!("{s:?}: the weights add up to 0"));
        }
        Ok(Mix(out))
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, w)| format!("{k}={w}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl Mix {
    /// The kind of connection number `n`: spread evenly (a deterministic
    /// sequence, so that runs of one mix compare).
    pub fn kind(&self, n: u64) -> Kind {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        // A fixed permutation of 0..total: spreads each kind evenly.
        let mut slot = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % total;
        for (k, w) in &self.0 {
            if slot < u64::from(*w) {
                return *k;
            }
            slot -= u64::from(*w);
        }
        self.0[0].0
    }

    pub fn has(&self, kind: Kind) -> bool {
        self.0.iter().any(|(k, w)| *k == kind && *w > 0)
    }
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<ConnRecord>>,
    shed: Arc<AtomicU64>,
}

/// Connections in flight at most: one descriptor each in this process,
/// which must keep some for itself. A connection due while the cap is
/// reached is not started and counted as shed (the run's notes say how
/// many): the only departure from the open loop, when a contender stalls
/// for longer than the deadlines allow.
fn in_flight_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur as usize).saturating_sub(4096).max(256)
}

/// What the load needs besides the rate.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    pub conn_timeout: Duration,
}

impl Load {
    /// New connections at `rate` per second from `t0` on, for at most
    /// `max` (and `rate × max` connections).
    pub fn start(
        rt: &Runtime,
        rate: f64,
        max: Duration,
        mix: Mix,
        target: Target,
        t0: Instant,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shed = Arc::new(AtomicU64::new(0));
        let handle = rt.spawn(generate(
            rate,
            max,
            mix,
            target,
            t0,
            stop.clone(),
            shed.clone(),
        ));
        Load { stop, handle, shed }
    }

    /// Stops starting connections; waits for those in flight. Returns the
    /// records and how many connections were shed (see [`in_flight_cap`]).
    pub fn finish(self, rt: &Runtime) -> (Vec<ConnRecord>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut records = rt.block_on(self.handle).unwrap_or_default();
        records.sort_by_key(|r| r.start_us);
        (records, self.shed.load(Ordering::Relaxed))
    }
}

async fn generate(
    rate: f64,
    max: Duration,
    mix: Mix,
    target: Target,
    t0: Instant,
    stop: Arc<AtomicBool>,
    shed: Arc<AtomicU64>,
) -> Vec<ConnRecord> {
    let records = Arc::new(Mutex::new(Vec::new()));
    let cap = in_flight_cap();
    let start = Instant::now();
    let limit = (rate * max.as_secs_f64()).ceil() as u64;
    let mut n = 0u64;
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !stop.load(Ordering::Relaxed) && n < limit && start.elapsed() < max {
        tick.tick().await;
        // Every connection due by now: open loop, whatever happened to the
        // ones before.
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(limit);
        while n < due {
            let kind = mix.kind(n);
            n += 1;
            if tasks.len() >= cap {
                tasks.retain(|t: &JoinHandle<()>| !t.is_finished());
                if tasks.len() >= cap {
                    shed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let target = target.clone();
            let records = records.clone();
            tasks.push(tokio::spawn(async move {
                let record = one(kind, n, &target, t0).await;
                records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(record);
            }));
        }
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        let _ = t.await;
    }
    std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()))
}

/// How far an exchange got before it failed (the migration paths' clients
/// classify the same way).
pub enum Failure {
    Connect(std::io::Error),
    BeforeRequest(std::io::Error),
    AfterRequest(std::io::Error),
    Truncated,
    Timeout,
}

impl Failure {
    pub fn class(&self) -> Class {
        match self {
            Failure::Connect(e) if e.kind() == ErrorKind::ConnectionRefused => Class::Refused,
            Failure::Connect(e) | Failure::BeforeRequest(e) if e.kind() == ErrorKind::TimedOut => {
                Class::Timeout
            }
            Failure::Connect(_) | Failure::BeforeRequest(_) => Class::ResetBeforeRequest,
            Failure::AfterRequest(e) if e.kind() == ErrorKind::UnexpectedEof => Class::Truncated,
            Failure::AfterRequest(_) => Class::ResetAfterRequest,
            Failure::Truncated => Class::Truncated,
            Failure::Timeout => Class::Timeout,
        }
    }
}

async fn one(kind: Kind, id: u64, target: &Target, t0: Instant) -> ConnRecord {
    let started = Instant::now();
    let start_us = started.duration_since(t0).as_micros() as u64;
    let mut connect_us = None;
    let limit = target.conn_timeout
        + if kind == Kind::Stream {
            STREAM_EXTRA
        } else {
            Duration::ZERO
        };
    let work = exchange(kind, id, target, &mut connect_us, started);
    let class = match tokio::time::timeout(limit, work).await {
        Ok(Ok(())) => Class::Ok,
        Ok(Err(f)) => f.class(),
        Err(_) => Class::Timeout,
    };
    ConnRecord {
        start_us,
        connect_us,
        total_us: started.elapsed().as_micros() as u64,
        kind,
        class,
    }
}

async fn exchange(
    kind: Kind,
    id: u64,
    target: &Target,
    connect_us: &mut Option<u64>,
    started: Instant,
) -> Result<(), Failure> {
    let addr = if kind == Kind::Tls {
        TLS_ADDR
    } else {
        target.addr.as_str()
    };
    let tcp = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    *connect_us = Some(started.elapsed().as_micros() as u64);
    let _ = tcp.set_nodelay(true);
    match (kind, &target.tls) {
        (Kind::Tls, Some((connector, name))) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(Failure::BeforeRequest)?;
            requests(tls, kind, id).await
        }
        (Kind::Tls, None) => Err(Failure::BeforeRequest(std::io::Error::other(
            "TLS in the mix without a TLS listener",
        ))),
        _ => requests(tcp, kind, id).await,
    }
}

/// The requests of one connection, each response checked.
async fn requests<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    kind: Kind,
    id: u64,
) -> Result<(), Failure> {
    let (path_kind, count) = match kind {
        Kind::Stream => ("stream", 1),
        Kind::Keepalive => ("s", KEEPALIVE_REQUESTS),
        Kind::Short | Kind::Tls => ("s", 1),
    };
    let mut pending = Vec::new();
    for i in 0..count {
        let rid = id * 16 + i;
        let last = i + 1 == count;
        let req = format!(
            "GET /{path_kind}/{rid} HTTP/1.1\r\nHost: lab\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        );
        let written = s.write_all(req.as_bytes()).await;
        match written {
            Err(e) if i == 0 => return Err(Failure::BeforeRequest(e)),
            Err(e) => return Err(Failure::AfterRequest(e)),
            Ok(()) => {}
        }
        read_response(&mut s, &mut pending, &backend::body(path_kind, rid)).await?;
        if !last {
            tokio::time::sleep(KEEPALIVE_THINK).await;
        }
    }
    Ok(())
}

/// Reads one response (head, then `Content-Length` bytes) and compares the
/// body with `want`. `buf` keeps bytes read past it.
async fn read_response<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    want: &[u8],
) -> Result<(), Failure> {
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut tmp).await {
            Ok(0) => return Err(Failure::Truncated),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => return Err(Failure::AfterRequest(e)),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(Failure::Truncated);
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(Failure::Truncated)?;
    buf.drain(..head_end);
    while buf.len() < len {
        match s.read(&mut tmp).await {
            Ok(0) => return Err(Failure::Truncated),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => return Err(Failure::AfterRequest(e)),
        }
    }
    if buf[..len] != *want {
        return Err(Failure::Truncated);
    }
    buf.drain(..len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_spread_evenly() {
        let mix: Mix = "short=90,stream=10".parse().unwrap();
        assert_eq!(mix.to_string(), "short=90,stream=10");
        let streams = (0..10_000).filter(|&n| mix.kind(n) == Kind::Stream).count();
        assert!((900..=1100).contains(&streams), "{streams}");
        for bad in ["short", "short=x", "nope=1", "short=0"] {
            assert!(bad.parse::<Mix>().is_err(), "{bad}");
        }
    }
}
