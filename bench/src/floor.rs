//! The floor: the least an HTTP/1.1 keep-alive forwarder on tokio does,
//! measured beside the contenders on the plain HTTP rows (`--floor-serve`).
//!
//! It reads a request head, rewrites it (hop-by-hop headers out,
//! `X-Forwarded-For` in), writes it to an idle connection to the origin
//! (or a new one), reads the response head, and passes head and body
//! (`Content-Length` only) back: the same syscalls and packets as a real
//! proxy, with no timers, logs, counters, limits or header validation
//! beyond framing. What a proxy costs above this line is its own; what is
//! below it is the kernel's and the runtime's, paid by every contender.
//! Not a proxy: anything it does not expect (a request body, a response
//! without a length) closes the connection.

use std::{cell::RefCell, io::IoSlice, net::SocketAddr};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Heads larger than this close the connection.
const MAX_HEAD: usize = 16 * 1024;

thread_local! {
    /// Idle connections to the origin, shared by all clients (the runtime
    /// has one thread).
    static IDLE: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

/// Serves `listen` until killed, forwarding to `origin`: one thread, like
/// the contenders' one worker.
pub fn serve(listen: SocketAddr, origin: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the floor's runtime")?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning
                    // on the contenders' CPU.
                    eprintln!("floor: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = connection(client, peer, origin).await;
            });
        }
    })
}

/// An origin connection, back to the idle list when dropped with its last
/// response read to the end.
struct Upstream {
    stream: Option<TcpStream>,
    clean: bool,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take().filter(|_| self.clean) {
            IDLE.with(|idle| idle.borrow_mut().push(s));
        }
    }
}

/// What a parsed head tells: where it ends, and the fields the floor uses.
struct Head {
    end: usize,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
    /// A `Content-Length` that is not a number: the connection closes.
    bad: bool,
}

/// Finds the end of a head in `buf` and reads its framing fields; `None`
/// while incomplete.
fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut head = Head {
        end,
        content_length: None,
        chunked: false,
        close: false,
        bad: false,
    };
    for line in buf[..end - 4].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            head.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            head.bad |= head.content_length.is_none();
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            head.close = value.eq_ignore_ascii_case(b"close");
        }
    }
    Some(head)
}

/// Copies the head in `buf[..end]` to `out` without its hop-by-hop
/// headers, then `extra` lines, then the blank line.
fn rewrite(buf: &[u8], end: usize, out: &mut Vec<u8>, extra: &[&[u8]]) {
    out.clear();
    let mut lines = buf[..end - 4].split(|&b| b == b'\n');
    if let Some(first) = lines.next() {
        out.extend_from_slice(first);
        out.push(b'\n');
    }
    for line in lines {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    for line in extra {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads from `s` into `buf[*filled..]` until a whole head is there.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize) -> Option<Head> {
    loop {
        if let Some(head) = parse_head(&buf[..*filled]) {
            return Some(head);
        }
        if *filled == buf.len() {
            if buf.len() >= MAX_HEAD {
                return None;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match s.read(&mut buf[*filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => *filled += n,
        }
    }
}

async fn connection(mut client: TcpStream, peer: SocketAddr, origin: SocketAddr) -> Option<()> {
    client.set_nodelay(true).ok()?;
    let forwarded = format!("X-Forwarded-For: {}", peer.ip());
    let (mut cbuf, mut cfilled) = (vec![0; 2048], 0);
    // Room for a 64 KiB body in few reads, as the contenders' buffers and
    // pipes give them.
    let (mut ubuf, mut out) = (vec![0; 64 * 1024], Vec::with_capacity(1024));
    let mut later = false;
    loop {
        let req = read_head(&mut client, &mut cbuf, &mut cfilled).await?;
        if req.bad || req.chunked || req.content_length.unwrap_or(0) > 0 {
            return None;
        }
        rewrite(&cbuf, req.end, &mut out, &[forwarded.as_bytes()]);
        cbuf.copy_within(req.end..cfilled, 0);
        cfilled -= req.end;
        // Like the proxy (and the event loops of HAProxy and nginx): the
        // other clients ready in this round are read before this request
        // is written to the origin.
        if later {
            tokio::task::yield_now().await;
        }
        later = true;
        let mut up = Upstream {
            stream: IDLE.with(|idle| idle.borrow_mut().pop()),
            clean: false,
        };
        if up.stream.is_none() {
            let s = TcpStream::connect(origin).await.ok()?;
            s.set_nodelay(true).ok()?;
            up.stream = Some(s);
        }
        let origin_conn = up.stream.as_mut()?;
        origin_conn.write_all(&out).await.ok()?;
        let mut ufilled = 0;
        let resp = read_head(origin_conn, &mut ubuf, &mut ufilled).await?;
        let len = resp.content_length.filter(|_| !resp.chunked && !resp.bad)?;
        let extra: &[&[u8]] = if req.close {
            &[b"Connection: close"]
        } else {
            &[]
        };
        rewrite(&ubuf, resp.end, &mut out, extra);
        // Head and what came of the body with it in one write, then the
        // rest of the body as it arrives.
        let first = (ufilled - resp.end).min(len);
        let mut pending = [
            IoSlice::new(&out),
            IoSlice::new(&ubuf[resp.end..resp.end + first]),
        ];
        let mut bufs = &mut pending[..];
        while !bufs.is_empty() {
            let n = client.write_vectored(bufs).await.ok()?;
            if n == 0 {
                return None;
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        let mut left = len - first;
        while left > 0 {
            let n = origin_conn.read(&mut ubuf).await.ok()?;
            if n == 0 {
                return None;
            }
            let n = n.min(left);
            client.write_all(&ubuf[..n]).await.ok()?;
            left -= n;
        }
        up.clean = !resp.close;
        drop(up);
        if req.close {
            return Some(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_framed_and_rewritten() {
        let raw =
            b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\nKeep-Alive: 5\r\n\r\nNEXT";
        let head = parse_head(raw).unwrap();
        assert_eq!(head.end, raw.len() - 4);
        assert!(head.close && !head.chunked && head.content_length.is_none());
        let mut out = Vec::new();
        rewrite(raw, head.end, &mut out, &[b"X-Forwarded-For: 127.0.0.1"]);
        assert_eq!(
            out,
            b"GET /small HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 98\r\n").is_none());
        let resp = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 98\r\n\r\n").unwrap();
        assert_eq!(resp.content_length, Some(98));
        assert!(!resp.bad);
        // A length that is not a number is a complete head, marked bad.
        let bad = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9x\r\n\r\n").unwrap();
        assert!(bad.bad);
    }
}
