//! The clients of a migration case: a few connections from their own
//! loopback address (so that the ACK hold touches nothing else), each
//! sending one `GET /s/<id>` with `Connection: close` and checking the
//! backend's answer; optionally with TCP Fast Open (the request rides in
//! the SYN); optionally writing only when the case says so (a request whose
//! handshake is held must not complete it with its data). And the holder:
//! one keep-alive connection that occupies the old generation's only
//! accept slot, so that the clients queue behind it.

use std::{
    io::{self, ErrorKind},
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    runtime::Runtime,
    sync::watch,
    task::JoinHandle,
};

use crate::{
    backend,
    load::Failure,
    records::{Class, ConnRecord, Kind},
};

/// The clients' source address: the hold matches it, the holder and the
/// proxy's own backend connections (127.0.0.1) do not.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// How the clients connect and when they write.
#[derive(Copy, Clone, Debug)]
pub struct Plan {
    /// TCP_FASTOPEN_CONNECT: connect() returns at once, the first write
    /// sends SYN + request.
    pub fastopen: bool,
    /// Write the request only once [`Clients::go`] was called.
    pub write_on_go: bool,
    /// Bound of connect(), and of the exchange from the moment it may write.
    pub timeout: Duration,
}

/// Clients in flight.
pub struct Clients {
    connected: Arc<AtomicUsize>,
    /// Clients that have their outcome.
    done: Arc<AtomicUsize>,
    go: watch::Sender<bool>,
    tasks: Vec<JoinHandle<ConnRecord>>,
}

impl Clients {
    /// Starts `n` clients (ids 1..=n) on `rt`; times are from `t0`.
    pub fn start(rt: &Runtime, n: u64, plan: Plan, t0: Instant) -> Clients {
        let connected = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (go, on_go) = watch::channel(!plan.write_on_go);
        let tasks = (1..=n)
            .map(|id| {
                let (connected, done, on_go) = (connected.clone(), done.clone(), on_go.clone());
                rt.spawn(async move {
                    let record = one(id, plan, t0, connected, on_go).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    record
                })
            })
            .collect();
        Clients {
            connected,
            done,
            go,
            tasks,
        }
    }

    /// Clients whose connect() returned.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Clients that have their outcome (a response, or a failure).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Lets the clients write their requests.
    pub fn go(&self) {
        self.go.send_replace(true);
    }

    /// Waits for every client (each is bounded by its plan) and returns
    /// their records, by start time.
    pub fn finish(self, rt: &Runtime) -> Vec<ConnRecord> {
        // A client still waiting for its go gets it now: nobody else will.
        self.go();
        let mut records: Vec<ConnRecord> = self
            .tasks
            .into_iter()
            .filter_map(|t| rt.block_on(t).ok())
            .collect();
        records.sort_by_key(|r| r.start_us);
        records
    }
}

async fn one(
    id: u64,
    plan: Plan,
    t0: Instant,
    connected: Arc<AtomicUsize>,
    mut go: watch::Receiver<bool>,
) -> ConnRecord {
    let started = Instant::now();
    let mut connect_us = None;
    let result = async {
        let mut stream = tokio::time::timeout(plan.timeout, connect(plan.fastopen))
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(Failure::Connect)?;
        connect_us = Some(started.elapsed().as_micros() as u64);
        connected.fetch_add(1, Ordering::Relaxed);
        // A dropped sender means the case is over: write anyway.
        let _ = go.wait_for(|go| *go).await;
        tokio::time::timeout(plan.timeout, exchange(&mut stream, id))
            .await
            .map_err(|_| Failure::Timeout)?
    }
    .await;
    ConnRecord {
        start_us: started.duration_since(t0).as_micros() as u64,
        connect_us,
        total_us: started.elapsed().as_micros() as u64,
        kind: Kind::Short,
        class: match result {
            Ok(()) => Class::Ok,
            Err(f) => f.class(),
        },
    }
}

/// A socket from [`CLIENT_IP`] connected to the proxy.
async fn connect(fastopen: bool) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((CLIENT_IP, 0)))?;
    if fastopen {
        fastopen_connect(&socket)?;
    }
    let proxy: SocketAddr = proxy_harness::config::PROXY_ADDR
        .parse()
        .map_err(io::Error::other)?;
    socket.connect(proxy).await
}

/// TCP_FASTOPEN_CONNECT on `socket`: connect() defers the SYN to the first
/// write, which carries the data (the selftest's clients do the same).
fn fastopen_connect(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // Safety: a valid fd for the call's duration; the option value is a
    // c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn request(id: u64, close: bool) -> String {
    format!(
        "GET /s/{id} HTTP/1.1\r\nHost: lab\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// One request with `Connection: close`, its response checked.
async fn exchange(stream: &mut TcpStream, id: u64) -> Result<(), Failure> {
    stream
        .write_all(request(id, true).as_bytes())
        .await
        .map_err(Failure::BeforeRequest)?;
    read_response(stream, id).await
}

/// Reads one response (head, then `Content-Length` bytes) and compares it
/// with what the backend answers to `id`.
async fn read_response(stream: &mut TcpStream, id: u64) -> Result<(), Failure> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 2048];
    loop {
        match check(&buf, id) {
            Check::Complete => return Ok(()),
            Check::Wrong => return Err(Failure::Truncated),
            Check::More => {}
        }
        match stream.read(&mut tmp).await {
            Ok(0) => return Err(Failure::Truncated),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => return Err(Failure::AfterRequest(e)),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Check {
    Complete,
    More,
    Wrong,
}

/// Whether `buf` holds the whole, right response to request `id`.
fn check(buf: &[u8], id: u64) -> Check {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Check::More;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let (true, Some(len)) = (head.starts_with("http/1.1 200"), len) else {
        return Check::Wrong;
    };
    let body = &buf[end + 4..];
    if body.len() < len {
        return Check::More;
    }
    if body[..len] == backend::body("s", id)[..] {
        Check::Complete
    } else {
        Check::Wrong
    }
}

/// The holder: one keep-alive exchange from 127.0.0.1, then idle. While it
/// is open it holds the accept slot of the generation that took it.
pub async fn hold_slot(timeout: Duration) -> io::Result<TcpStream> {
    let work = async {
        let mut stream = TcpStream::connect(proxy_harness::config::PROXY_ADDR).await?;
        stream.write_all(request(0, false).as_bytes()).await?;
        read_response(&mut stream, 0)
            .await
            .map_err(|_| io::Error::other("the holder's exchange failed"))?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| io::Error::new(ErrorKind::TimedOut, "the holder timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_checked_whole() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nok 7\n";
        assert_eq!(check(ok, 7), Check::Complete);
        assert_eq!(check(&ok[..ok.len() - 1], 7), Check::More);
        assert_eq!(check(&ok[..20], 7), Check::More);
        assert_eq!(check(ok, 8), Check::Wrong);
        assert_eq!(
            check(b"HTTP/1.1 502 Bad\r\nContent-Length: 0\r\n\r\n", 7),
            Check::Wrong
        );
        assert_eq!(check(b"HTTP/1.1 200 OK\r\n\r\n", 7), Check::Wrong);
    }

    #[test]
    fn failures_map_to_the_load_classes() {
        let e = |k: ErrorKind| io::Error::new(k, "x");
        assert_eq!(
            Failure::Connect(e(ErrorKind::ConnectionRefused)).class(),
            Class::Refused
        );
        assert_eq!(
            Failure::Connect(e(ErrorKind::ConnectionReset)).class(),
            Class::ResetBeforeRequest
        );
        assert_eq!(
            Failure::BeforeRequest(e(ErrorKind::BrokenPipe)).class(),
            Class::ResetBeforeRequest
        );
        assert_eq!(
            Failure::AfterRequest(e(ErrorKind::ConnectionReset)).class(),
            Class::ResetAfterRequest
        );
        assert_eq!(
            Failure::AfterRequest(e(ErrorKind::UnexpectedEof)).class(),
            Class::Truncated
        );
        assert_eq!(Failure::Truncated.class(), Class::Truncated);
        assert_eq!(Failure::Timeout.class(), Class::Timeout);
    }

    #[test]
    fn requests_close_unless_they_hold() {
        assert!(request(3, true).contains("Connection: close"));
        assert!(!request(0, false).contains("Connection"));
        assert!(request(3, true).starts_with("GET /s/3 HTTP/1.1\r\n"));
    }
}
