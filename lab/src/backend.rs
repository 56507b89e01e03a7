//! The lab's origin: a minimal HTTP/1.1 server, cheap enough that the
//! proxy and the load are what the cores spend their time on. Every
//! response body is derived from the request's id, so that the client can
//! check it byte for byte; `/stream/<id>` trickles its body for seconds.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
    task::JoinHandle,
};

/// Chunks and the gap between them of a stream response.
pub const STREAM_CHUNKS: u64 = 20;
pub const STREAM_GAP: Duration = Duration::from_millis(100);
const CHUNK: usize = 16;

/// The body of the response to request `id` on `path_kind` (`s` or
/// `stream`).
pub fn body(path_kind: &str, id: u64) -> Vec<u8> {
    match path_kind {
        "stream" => (0..STREAM_CHUNKS).flat_map(|i| chunk(id, i)).collect(),
        _ => format!("ok {id}\n").into_bytes(),
    }
}

fn chunk(id: u64, i: u64) -> Vec<u8> {
    format!("{:015x}\n", id.wrapping_mul(31).wrapping_add(i))
        .into_bytes()
        .into_iter()
        .take(CHUNK)
        .collect()
}

/// Serves on `addr` until the runtime is dropped.
pub fn start(rt: &Runtime, addr: &str) -> std::io::Result<JoinHandle<()>> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    // A long queue: the origin's overflows must not be counted against the
    // contenders.
    let listener = {
        let _guard = rt.enter();
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)?
    };
    Ok(rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            tokio::spawn(serve(stream));
        }
    }))
}

async fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    loop {
        // One request head.
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > 16 * 1024 {
                return;
            }
            let mut tmp = [0u8; 2048];
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let mut parts = path.trim_start_matches('/').split('/');
        let kind = parts.next().unwrap_or("s").to_string();
        let id: u64 = parts
            .next()
            .and_then(|p| p.split('?').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let close = head.to_ascii_lowercase().contains("connection: close");
        let body = body(&kind, id);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if kind == "stream" {
            for piece in body.chunks(CHUNK) {
                tokio::time::sleep(STREAM_GAP).await;
                if s.write_all(piece).await.is_err() {
                    return;
                }
            }
        } else if s.write_all(&body).await.is_err() {
            return;
        }
        if close {
            let _ = s.shutdown().await;
            return;
        }
    }
}
