//! The client side of the layer-4 line protocol: one checked exchange, a
//! connection held half-sent, and a bounded load generator opening new
//! connections at a target rate and checking every response.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
    task::JoinSet,
};

use crate::{
    backend::{expected_response, request},
    bodies::{Rng, first_difference},
    config::PROXY_ADDR,
};

/// Ids of connections, unique within the test process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh request id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One complete exchange: connect to `addr`, send request `id`, read
/// until EOF, compare byte for byte. Err says what went wrong.
pub async fn exchange(
    addr: &str,
    id: u64,
    payload_len: usize,
    timeout: Duration,
) -> Result<(), String> {
    let payload = Rng::new(id).bytes(payload_len);
    let started = Instant::now();
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(&request(id, &payload))
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_and_check(&mut stream, id, &payload).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("conn {id}: {e} (after {:?})", started.elapsed())),
        Err(_) => Err(format!("conn {id}: timed out after {timeout:?}")),
    }
}

/// Reads the response to request `id` until EOF and compares it.
pub async fn read_and_check(stream: &mut TcpStream, id: u64, payload: &[u8]) -> Result<(), String> {
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e} (after {} bytes)", got.len()))?;
    let want = expected_response(id, payload);
    if got != want {
        return Err(format!("wrong response: {}", first_difference(&got, &want)));
    }
    Ok(())
}

/// A connection that sent only part of its request and waits: it keeps a
/// proxy connection (and so its generation) busy until [`Held::finish`].
pub struct Held {
    stream: TcpStream,
    id: u64,
    payload: Vec<u8>,
    /// How much of the request went out in [`Held::open`].
    sent: usize,
}

impl Held {
    /// Connects and sends the request line and half of the payload.
    pub async fn open(addr: &str, id: u64) -> Held {
        let payload = Rng::new(id).bytes(256);
        let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connecting the held connection: timed out")
            .expect("connecting the held connection");
        let req = request(id, &payload);
        let sent = req.len() - payload.len() / 2;
        stream
            .write_all(&req[..sent])
            .await
            .expect("sending the first half of the held request");
        Held {
            stream,
            id,
            payload,
            sent,
        }
    }

    /// Sends the rest and checks the response.
    pub async fn finish(mut self, timeout: Duration) -> Result<(), String> {
        let req = request(self.id, &self.payload);
        let work = async {
            self.stream
                .write_all(&req[self.sent..])
                .await
                .map_err(|e| format!("write: {e}"))?;
            read_and_check(&mut self.stream, self.id, &self.payload).await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("held conn {}: timed out after {timeout:?}", self.id))?
    }
}

/// What the load generator is asked to do.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// New connections per second.
    pub rate: f64,
    /// Never more connections than this.
    pub max_conns: u64,
    /// Never longer than this (the test usually stops it earlier).
    pub max_duration: Duration,
    /// Per-connection deadline (connect + exchange).
    pub conn_timeout: Duration,
}

impl LoadSpec {
    pub fn new(rate: f64, max_duration: Duration) -> LoadSpec {
        LoadSpec {
            rate,
            max_conns: (rate * max_duration.as_secs_f64()).ceil() as u64 + 1,
            max_duration,
            conn_timeout: Duration::from_secs(10),
        }
    }
}

/// Live counters of a load.
#[derive(Default, Debug)]
pub struct LoadStats {
    pub started: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The first failure reasons, for the assert message.
    pub failures: Mutex<Vec<String>>,
}

/// Final numbers of a load.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub started: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    /// From the first connection to the last one started.
    pub duration: Duration,
}

impl LoadReport {
    /// Connections started per second.
    pub fn rate(&self) -> f64 {
        self.started as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// Panics unless every connection succeeded byte for byte.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.failed == 0 && self.ok == self.started,
            "{what}: expected 0 failed connections and ok == started, got started={} ok={} failed={}; first failures: {:#?}",
            self.started,
            self.ok,
            self.failed,
            self.failures
        );
    }
}

/// A running load: new connections at `spec.rate`.
pub struct Load {
    pub stats: Arc<LoadStats>,
    /// Set by [`Load::finish`] or on drop: no new connections.
    stop: Arc<AtomicBool>,
    /// The generator task; returns the time it spent starting connections.
    handle: Option<tokio::task::JoinHandle<Duration>>,
}

impl Load {
    /// A load to [`PROXY_ADDR`].
    pub fn start(rt: &Runtime, spec: LoadSpec) -> Load {
        Load::start_to(rt, spec, PROXY_ADDR)
    }

    /// A load to `addr`.
    pub fn start_to(rt: &Runtime, spec: LoadSpec, addr: &str) -> Load {
        let stats = Arc::new(LoadStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        let handle = rt.spawn(generate(spec, st, sp, addr.to_string()));
        Load {
            stats,
            stop,
            handle: Some(handle),
        }
    }

    pub fn started(&self) -> u64 {
        self.stats.started.load(Ordering::Relaxed)
    }

    pub fn ok(&self) -> u64 {
        self.stats.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until at least `n` connections succeeded.
    pub fn wait_ok(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.ok() < n {
            assert!(
                Instant::now() < deadline,
                "load: expected {n} successful connections within {timeout:?}, got ok={} failed={} ({:?})",
                self.ok(),
                self.failed(),
                self.stats
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops starting connections, waits for those in flight (each bounded
    /// by its own timeout) and returns the totals.
    pub fn finish(mut self, rt: &Runtime) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("finish() once");
        let duration = rt
            .block_on(handle)
            .expect("the load generator task panicked");
        let s = &self.stats;
        LoadReport {
            started: s.started.load(Ordering::Relaxed),
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            failures: s.failures.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            duration,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The generator: bounded in count (`max_conns`) and time (`max_duration`).
async fn generate(
    spec: LoadSpec,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    addr: String,
) -> Duration {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut sent = 0u64;
    let mut last_start = start;
    while !stop.load(Ordering::Relaxed) && sent < spec.max_conns {
        let elapsed = start.elapsed();
        if elapsed >= spec.max_duration {
            break;
        }
        let due = ((elapsed.as_secs_f64() * spec.rate) as u64 + 1).min(spec.max_conns);
        while sent < due {
            sent += 1;
            stats.started.fetch_add(1, Ordering::Relaxed);
            last_start = Instant::now();
            let id = next_id();
            let len = 16 + (id % 8) as usize * 61; // 16..=443 bytes
            let st = stats.clone();
            let timeout = spec.conn_timeout;
            let addr = addr.clone();
            tasks.spawn(async move {
                match exchange(&addr, id, len, timeout).await {
                    Ok(()) => {
                        st.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        st.failed.fetch_add(1, Ordering::Relaxed);
                        let mut f = st.failures.lock().unwrap_or_else(|p| p.into_inner());
                        if f.len() < 10 {
                            f.push(e);
                        }
                    }
                }
            });
        }
        // Reap finished tasks so that memory stays bounded on long runs.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while tasks.join_next().await.is_some() {}
    last_start
        .duration_since(start)
        .max(Duration::from_millis(1))
}
