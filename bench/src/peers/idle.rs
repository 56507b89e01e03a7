//! Idle keep-alive clients: open `n` connections, one request each (the
//! response read in full), then hold them open and silent, so that what
//! the contender keeps per idle client shows in its resident memory.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    task::JoinSet,
};

/// Connections opened at once.
const CONCURRENCY: usize = 128;
/// The longest one connection may take to connect and be answered.
const PER_CONNECTION: Duration = Duration::from_secs(3);
/// After this many failures no more connections are opened: the contender
/// is at a limit (open files, maxconn), and waiting out each timeout would
/// only make the run long.
const MAX_FAILURES: u64 = 32;

/// Connections that were answered and are now idle, and how many failed.
pub struct Held {
    pub streams: Vec<TcpStream>,
    pub failed: u64,
    /// Whether opening stopped early because of failures.
    pub stopped_early: bool,
}

/// Opens up to `n` connections to `addr`, each sending `GET path` and
/// reading the whole response; at most `deadline` in all.
pub async fn open(addr: SocketAddr, path: &str, n: usize, deadline: Duration) -> Result<Held> {
    let request = Arc::new(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes());
    let end = Instant::now() + deadline;
    let failed = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    let mut streams = Vec::with_capacity(n);
    let mut stopped_early = false;
    for _ in 0..n {
        if failed.load(Ordering::Relaxed) >= MAX_FAILURES || Instant::now() >= end {
            stopped_early = true;
            break;
        }
        let permit = permits.clone().acquire_owned().await?;
        let (request, failed) = (request.clone(), failed.clone());
        tasks.spawn(async move {
            let r = tokio::time::timeout(PER_CONNECTION, one(addr, &request)).await;
            drop(permit);
            match r {
                Ok(Ok(s)) => Some(s),
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
        // Collect finished ones as we go, so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            streams.extend(done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        streams.extend(done?);
    }
    Ok(Held {
        streams,
        failed: failed.load(Ordering::Relaxed),
        stopped_early,
    })
}

/// One connection: request, whole response (by Content-Length), then kept.
async fn one(addr: SocketAddr, request: &[u8]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the response ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            bail!("response too long");
        }
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(anyhow!(
                "status line {:?}",
                head.lines().next().unwrap_or("")
            ));
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no Content-Length"))?;
        if buf.len() >= head_end + 4 + len {
            return Ok(s);
        }
    }
}
