//! The layer-4 backend and its line protocol: `REQ <id> <len>\n` and a
//! payload in, `RSP <id>\n` and the payload transformed out, so that a
//! client can tell a correct answer from a truncated or misrouted one.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

use crate::config::BACKEND_ADDR;

/// The response to request `id` with payload `payload`: `RSP <id>\n`, then
/// the payload reversed and xored with a byte derived from the id, so that
/// a response to another request or a shifted one never matches.
pub fn expected_response(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("RSP {id}\n").into_bytes();
    let key = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1;
    out.extend(payload.iter().rev().map(|b| b ^ key));
    out
}

/// The request line and payload of request `id`.
pub fn request(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("REQ {id} {}\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Counters of the backend.
#[derive(Default, Debug)]
pub struct BackendStats {
    pub accepted: AtomicU64,
    pub served: AtomicU64,
    pub bad_requests: AtomicU64,
}

/// An in-process server answering `REQ <id> <len>\n<len bytes>` with
/// [`expected_response`], then closing.
pub struct Backend {
    pub stats: Arc<BackendStats>,
    /// Set on drop: the accept loop ends.
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Listens on [`BACKEND_ADDR`] in the runtime's namespace. `delay` is
    /// waited between reading a request and answering it.
    pub fn start(rt: &Runtime, delay: Duration) -> Backend {
        let listener = rt
            .block_on(TcpListener::bind(BACKEND_ADDR))
            .expect("binding the backend");
        let stats = Arc::new(BackendStats::default());
        let st = stats.clone();
        let stop = accept_until_dropped(rt, listener, move |stream| {
            st.accepted.fetch_add(1, Ordering::Relaxed);
            let st = st.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(60), serve_one(stream, delay)).await
                {
                    Ok(Ok(())) => st.served.fetch_add(1, Ordering::Relaxed),
                    _ => st.bad_requests.fetch_add(1, Ordering::Relaxed),
                };
            });
        });
        Backend { stats, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Accepts on `listener` (on `rt`) and hands every connection to `serve`,
/// until the returned flag is set (the servers set it on drop).
pub(crate) fn accept_until_dropped(
    rt: &Runtime,
    listener: TcpListener,
    mut serve: impl FnMut(TcpStream) + Send + 'static,
) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let sp = stop.clone();
    rt.spawn(async move {
        while !sp.load(Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            serve(stream);
        }
    });
    stop
}

async fn serve_one(mut stream: TcpStream, delay: Duration) -> io::Result<()> {
    let (id, payload) = read_request(&mut stream).await?;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    stream.write_all(&expected_response(id, &payload)).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn read_request(stream: &mut TcpStream) -> io::Result<(u64, Vec<u8>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(bad("EOF before the request line"));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(bad("request line too long"));
        }
    }
    let line = String::from_utf8(line).map_err(|_| bad("request line not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some("REQ"), Some(id), Some(len), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let id: u64 = id.parse().map_err(|_| bad("bad id"))?;
    let len: usize = len.parse().map_err(|_| bad("bad length"))?;
    if len > 1 << 20 {
        return Err(bad("request too long"));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok((id, payload))
}
