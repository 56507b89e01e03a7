//! HTTP/1.1 upgrades (WebSocket and any other `Upgrade` protocol) in http
//! mode: the request goes upstream with its `Connection: upgrade` and
//! `Upgrade` headers, a `101 Switching Protocols` answer turns the
//! connection into a byte tunnel, anything else stays HTTP.
//!
//! A tunnel lives in the generation that opened it. When that generation
//! drains, each tunnel draws the instant it closes, uniformly over the
//! `close_spread_time` window that ends just before `hard_stop_after`
//! (HAProxy's `close-spread-time`), so that clients do not all reconnect at
//! the same moment. A WebSocket is closed the way the protocol wants it: a
//! close frame with status 1001 "going away" to both sides, then FIN. Other
//! upgrades just get FIN.
//!
//! The close frame must not land inside a frame that is still crossing the
//! proxy. We track WebSocket frame boundaries in the copy (2 to 14 header
//! bytes parsed, payloads skipped by length, no payload inspected or
//! unmasked), and when the close instant comes each direction reads only up
//! to the end of the frame in flight, then writes the close frame. A frame
//! that does not finish within [`FRAME_GRACE`] gets FIN without a close
//! frame (the peer sees an abnormal close, 1006, rather than a corrupt
//! stream). Tracking costs a few byte compares per frame and none per
//! payload byte; stopping the copy and checking afterwards would have left
//! the choice to chance.

use std::{
    future::Future,
    hash::{BuildHasher, Hasher},
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderValue},
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::{Instant, sleep_until, timeout},
};

use super::{
    ProxyBody,
    headers::{strip_hop_by_hop, tokens},
    text_response,
};
use crate::{
    stage::{
        DrainDeadline,
        forward::{Activity, Watched},
    },
    stats::counters::{ListenerCounter, ListenerMetrics},
};

/// How long a direction may take to finish the frame in flight once its
/// tunnel closes; after that it gets FIN without a close frame.
pub const FRAME_GRACE: Duration = Duration::from_millis(200);

/// How long a closed tunnel waits for each peer's answer (its close frame,
/// then its FIN). Reading it matters: a socket closed with unread bytes
/// sends RST, and the peer would lose our close frame.
pub const REPLY_GRACE: Duration = Duration::from_millis(250);

/// The latest a tunnel closes before the drain deadline: room for
/// [`FRAME_GRACE`] and [`REPLY_GRACE`], so that the generation can exit
/// before it cuts what is left.
pub const CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// WebSocket close status "going away" (RFC 6455 §7.4.1): the endpoint
/// leaves, as a server that shuts down.
pub const GOING_AWAY: u16 = 1001;
const GOING_AWAY_REASON: &[u8] = b"going away";

/// What the tunnels of a listener need: its idle limit, the drain deadline
/// of the generation, and its counters.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// The longest silence in both directions (the listener's
    /// `tunnel_timeout`, HAProxy `timeout tunnel`).
    pub idle_timeout: Duration,
    /// Set once the generation drains: when the remaining connections are
    /// cut, and the window before it over which tunnels close.
    pub drain_deadline: watch::Receiver<Option<DrainDeadline>>,
    /// The listener's figures: open and total tunnels.
    pub metrics: Arc<ListenerMetrics>,
}

impl Default for TunnelSettings {
    /// One hour idle, no drain ever (for tests and tools that serve HTTP
    /// outside a generation).
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(3600),
            drain_deadline: watch::channel(None).1,
            metrics: Arc::default(),
        }
    }
}

/// Which side of a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream client",
            Side::Upstream => "upstream server",
        })
    }
}

/// Why a tunnel ended badly.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}: taking over the upgraded connection: {1}")]
    Upgrade(Side, #[source] hyper::Error),
    #[error("{0}: in the upgraded tunnel: {1}")]
    Io(Side, #[source] io::Error),
    #[error("upgraded tunnel: no byte in either direction for {0:?} (tunnel_timeout): closed")]
    Idle(Duration),
}

/// How a tunnel ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their direction.
    Closed,
    /// Closed by the drain: `close_frames` WebSocket close frames written
    /// (0 to 2: none for other protocols, or a side that had already sent
    /// its own close or was mid-frame too long).
    Drained { close_frames: u8 },
}

/// A tunnel waiting for the connection to finish its HTTP part.
pub(super) type Tunnel = Pin<Box<dyn Future<Output = Result<TunnelEnd, TunnelError>> + Send>>;

/// Where a connection keeps its tunnel until `serve` runs it: hyper hands
/// the downstream connection over only once the 101 head is written.
pub(super) type TunnelSlot = std::sync::Mutex<Option<Tunnel>>;

/// An upgrade a client asked for: an HTTP/1.1 request (not CONNECT) with
/// `Connection: upgrade` and an `Upgrade` header.
pub(super) struct Requested {
    /// The `Upgrade` header as the client sent it, forwarded as it is.
    protocols: Vec<HeaderValue>,
    /// The client offered `websocket`: the drain closes it with close frames.
    websocket: bool,
    /// Hyper's handle on the downstream connection after a 101.
    downstream: OnUpgrade,
}

impl Requested {
    /// The upgrade `req` asks for, if any, with hyper's handle taken out of
    /// it (before the request is turned into the upstream one).
    pub(super) fn take(req: &mut Request<Incoming>) -> Option<Self> {
        if req.version() != Version::HTTP_11 || req.method() == Method::CONNECT {
            return None;
        }
        let headers = req.headers();
        if !tokens(headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
            return None;
        }
        let protocols: Vec<HeaderValue> =
            headers.get_all(header::UPGRADE).iter().cloned().collect();
        if protocols.is_empty() {
            return None;
        }
        let websocket = tokens(headers, &header::UPGRADE).any(|t| {
            t.split('/')
                .next()
                .is_some_and(|p| p.eq_ignore_ascii_case("websocket"))
        });
        Some(Self {
            protocols,
            websocket,
            downstream: hyper::upgrade::on(req),
        })
    }

    /// Puts the upgrade back on the upstream request, whose hop-by-hop
    /// headers were dropped.
    pub(super) fn forward(&self, headers: &mut HeaderMap) {
        restore(headers, &self.protocols);
    }
}

/// `Connection: upgrade` and `Upgrade: <protocols>` on a message whose
/// hop-by-hop headers were stripped.
fn restore(headers: &mut HeaderMap, protocols: &[HeaderValue]) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.remove(header::UPGRADE);
    for p in protocols {
        headers.append(header::UPGRADE, p.clone());
    }
}

/// The server answered 101 to a request that may have asked for an
/// upgrade: the 101 for the client, with the tunnel left in the slot, or a
/// 502 for a 101 nobody asked for.
pub(super) fn switch(
    requested: Option<Requested>,
    mut resp: Response<Incoming>,
    slot: &TunnelSlot,
    settings: &TunnelSettings,
) -> Response<ProxyBody> {
    debug_assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let Some(requested) = requested else {
        tracing::warn!("upstream server switched protocols unasked: answering 502");
        return text_response(
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway: the server switched protocols unasked\n",
        );
    };
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocols: Vec<HeaderValue> = match parts.headers.get_all(header::UPGRADE).iter().count() {
        0 => requested.protocols.clone(),
        _ => parts
            .headers
            .get_all(header::UPGRADE)
            .iter()
            .cloned()
            .collect(),
    };
    strip_hop_by_hop(&mut parts.headers);
    restore(&mut parts.headers, &protocols);
    parts.version = Version::HTTP_11;
    let settings = settings.clone();
    let websocket = requested.websocket;
    let tunnel: Tunnel = Box::pin(async move {
        let client = requested
            .downstream
            .await
            .map_err(|e| TunnelError::Upgrade(Side::Downstream, e))?;
        let server = upstream
            .await
            .map_err(|e| TunnelError::Upgrade(Side::Upstream, e))?;
        run(
            TokioIo::new(client),
            TokioIo::new(server),
            websocket,
            &settings,
        )
        .await
    });
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
    let body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::from_parts(parts, body)
}

/// Counts a tunnel open while it lives.
struct OpenTunnel(Arc<ListenerMetrics>);

impl OpenTunnel {
    fn new(m: &Arc<ListenerMetrics>) -> Self {
        m[ListenerCounter::TunnelsOpen].fetch_add(1, Relaxed);
        m[ListenerCounter::TunnelsTotal].fetch_add(1, Relaxed);
        Self(m.clone())
    }
}

impl Drop for OpenTunnel {
    // Also when the task is dropped at the deadline.
    fn drop(&mut self) {
        self.0[ListenerCounter::TunnelsOpen].fetch_sub(1, Relaxed);
    }
}

/// Copies bytes both ways between `client` and `server` until both sides
/// closed, neither sent a byte for the idle limit, or the drain closes it.
pub async fn run<C, S>(
    client: C,
    server: S,
    websocket: bool,
    settings: &TunnelSettings,
) -> Result<TunnelEnd, TunnelError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _open = OpenTunnel::new(&settings.metrics);
    let activity = Activity::default();
    let (mut client_rx, mut client_tx) = tokio::io::split(Watched::new(client, &activity));
    let (mut server_rx, mut server_tx) = tokio::io::split(Watched::new(server, &activity));
    let (stop_tx, stop) = watch::channel(false);
    let frames = websocket.then(Frames::default);
    let to_server = pump(
        &mut client_rx,
        &mut server_tx,
        (Side::Downstream, Side::Upstream),
        frames.clone(),
        websocket.then(|| close_frame(Some(random_u64() as u32))),
        stop.clone(),
    );
    let to_client = pump(
        &mut server_rx,
        &mut client_tx,
        (Side::Upstream, Side::Downstream),
        frames,
        websocket.then(|| close_frame(None)),
        stop,
    );
    let both = async { tokio::try_join!(to_server, to_client) };
    tokio::pin!(both);
    let close_at = close_instant(settings.drain_deadline.clone());
    tokio::select! {
        done = &mut both => done.map(|_| TunnelEnd::Closed),
        () = activity.idle_for(settings.idle_timeout) => {
            Err(TunnelError::Idle(settings.idle_timeout))
        }
        () = close_at => {
            let _ = stop_tx.send(true);
            // Each direction ends within FRAME_GRACE + REPLY_GRACE; this
            // bound is for writes a peer does not take, and keeps the end
            // before the deadline.
            match timeout(CLOSE_MARGIN, &mut both).await {
                Ok(Ok((a, b))) => Ok(TunnelEnd::Drained {
                    close_frames: u8::from(a == Pumped::Closed(true))
                        + u8::from(b == Pumped::Closed(true)),
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(TunnelEnd::Drained { close_frames: 0 }),
            }
        }
    }
}

/// Resolves at the instant this tunnel closes: drawn once the generation
/// drains, uniformly in `[deadline - spread, deadline - CLOSE_MARGIN]`, not
/// before now. Never resolves if the generation does not drain.
async fn close_instant(mut deadline: watch::Receiver<Option<DrainDeadline>>) {
    let drain = loop {
        if let Some(d) = *deadline.borrow_and_update() {
            break d;
        }
        if deadline.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let at = draw_close(drain, random_u64());
    sleep_until(at.max(Instant::now())).await;
}

/// The close instant for a random draw `r` (uniform over u64).
fn draw_close(drain: DrainDeadline, r: u64) -> Instant {
    let latest = drain.at.checked_sub(CLOSE_MARGIN).unwrap_or(drain.at);
    let earliest = drain.at.checked_sub(drain.spread).unwrap_or(drain.at);
    if earliest >= latest {
        return latest;
    }
    let window = latest - earliest;
    let fraction = (r >> 11) as f64 / (1u64 << 53) as f64;
    earliest + window.mul_f64(fraction)
}

/// 64 random bits from the standard library's randomly keyed SipHash: a
/// fresh key each call. Enough to spread closes and to mask a frame (the
/// masking key must be unpredictable to scripts on the client, RFC 6455
/// §5.3, not secret).
fn random_u64() -> u64 {
    std::hash::RandomState::new().build_hasher().finish()
}

/// A WebSocket close frame with status 1001 "going away": masked with `mask`
/// (client to server, RFC 6455 §5.3) or not (server to client).
fn close_frame(mask: Option<u32>) -> Vec<u8> {
    let mut payload = GOING_AWAY.to_be_bytes().to_vec();
    payload.extend_from_slice(GOING_AWAY_REASON);
    // FIN + opcode 8 (close); a control frame's payload fits in 7 bits.
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(mask) = mask {
        let key = mask.to_be_bytes();
        frame[1] |= 0x80;
        frame.extend_from_slice(&key);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// Where a WebSocket byte stream stands: inside a frame header (its bytes
/// so far) or inside a payload (bytes left). Only headers are parsed.
#[derive(Debug, Clone, Default)]
struct Frames {
    head: [u8; 14],
    have: usize,
    payload_left: u64,
    /// This direction already carried a close frame: the peer closes on its
    /// own, and a second close frame would break the protocol.
    close_seen: bool,
}

impl Frames {
    /// The header length once its first two bytes are known: 2, plus 2 or 8
    /// for an extended length, plus 4 for a mask key.
    fn head_len(&self) -> usize {
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// How many bytes may be read without crossing the end of the frame in
    /// flight (0 at a boundary).
    fn to_boundary(&self) -> u64 {
        match (self.payload_left, self.have) {
            (0, 0) => 0,
            (0, have) if have < 2 => (2 - have) as u64,
            (0, have) => (self.head_len() - have) as u64,
            (left, _) => left,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len() as u64);
                self.payload_left -= n;
                data = &data[n as usize..];
                continue;
            }
            self.head[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have >= 2 && self.have == self.head_len() {
                if self.head[0] & 0x0f == 0x8 {
                    self.close_seen = true;
                }
                self.payload_left = self.payload_len();
                self.have = 0;
            }
        }
    }
}

/// How one direction of a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pumped {
    /// Its source closed (FIN passed on).
    Eof,
    /// The drain closed it; with a close frame or not.
    Closed(bool),
}

/// One direction: `src` to `dst` until `src` ends (then FIN to `dst`, as
/// `copy_bidirectional` does) or `stop` turns true. Then: read up to the
/// end of the WebSocket frame in flight (`frames`), write `close` there,
/// FIN, and read what the source still sends (its close frame) until it
/// ends or [`REPLY_GRACE`] passed.
async fn pump<R, W>(
    src: &mut R,
    dst: &mut W,
    (from, to): (Side, Side),
    mut frames: Option<Frames>,
    close: Option<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) -> Result<Pumped, TunnelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    // Set when the drain closes us: how long the frame in flight may take.
    let mut frame_deadline: Option<Instant> = None;
    let mut frame_done = true;
    loop {
        let limit = match (frame_deadline, &frames) {
            (None, _) => buf.len(),
            (Some(_), None) => break,
            (Some(_), Some(f)) => match f.to_boundary() {
                0 => break,
                n => n.min(buf.len() as u64) as usize,
            },
        };
        let n = tokio::select! {
            read = src.read(&mut buf[..limit]) => read.map_err(|e| TunnelError::Io(from, e))?,
            _ = stop.changed(), if frame_deadline.is_none() => {
                frame_deadline = Some(Instant::now() + FRAME_GRACE);
                continue;
            }
            () = sleep_until(frame_deadline.unwrap_or_else(Instant::now)),
                if frame_deadline.is_some() =>
            {
                frame_done = false;
                break;
            }
        };
        if n == 0 {
            let _ = dst.shutdown().await;
            return Ok(Pumped::Eof);
        }
        if let Some(f) = &mut frames {
            f.feed(&buf[..n]);
        }
        dst.write_all(&buf[..n])
            .await
            .map_err(|e| TunnelError::Io(to, e))?;
    }
    let inject = frame_done
        && frames
            .as_ref()
            .is_some_and(|f| f.at_boundary() && !f.close_seen)
        && close.is_some();
    if inject && let Some(frame) = &close {
        dst.write_all(frame)
            .await
            .map_err(|e| TunnelError::Io(to, e))?;
    }
    let _ = dst.shutdown().await;
    let _ = timeout(REPLY_GRACE, async {
        while matches!(src.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(Pumped::Closed(inject))
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    /// A server-to-client frame (unmasked) with `len` payload bytes.
    fn frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match len {
            0..=125 => f.push(len as u8),
            126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn frames_are_tracked_across_any_split() {
        let mut stream = Vec::new();
        for (op, len) in [(1, 5), (2, 300), (2, 70_000), (9, 0), (1, 125), (1, 126)] {
            stream.extend(frame(op, len));
        }
        // A masked client frame too.
        stream.extend([0x81, 0x80 | 3, 1, 2, 3, 4, b'a', b'b', b'c']);
        for chunk in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut f = Frames::default();
            let mut boundaries = 0;
            for piece in stream.chunks(chunk) {
                // Reading no more than to_boundary never crosses a frame end.
                let mut piece = piece;
                while !piece.is_empty() {
                    let step = match f.to_boundary() {
                        0 => 1,
                        n => (n as usize).min(piece.len()),
                    };
                    f.feed(&piece[..step]);
                    piece = &piece[step..];
                    if f.at_boundary() {
                        boundaries += 1;
                    }
                }
            }
            assert!(f.at_boundary(), "chunk {chunk}");
            assert_eq!(boundaries, 7, "chunk {chunk}");
            assert!(!f.close_seen);
        }
        let mut f = Frames::default();
        f.feed(&frame(8, 2));
        assert!(f.close_seen && f.at_boundary());
    }

    #[test]
    fn close_frames_say_going_away() {
        let plain = close_frame(None);
        assert_eq!(plain[..4], [0x88, 12, 0x03, 0xe9]);
        assert_eq!(&plain[4..], b"going away");
        let masked = close_frame(Some(0xa1b2c3d4));
        assert_eq!(masked[..2], [0x88, 0x80 | 12]);
        let key = &masked[2..6];
        let unmasked: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, plain[2..]);
    }

    #[test]
    fn closes_are_drawn_over_the_window() {
        let at = Instant::now() + Duration::from_secs(10);
        let drain = DrainDeadline {
            at,
            spread: Duration::from_secs(4),
        };
        assert_eq!(draw_close(drain, 0), at - Duration::from_secs(4));
        let last = draw_close(drain, u64::MAX);
        assert!(last <= at - CLOSE_MARGIN && last > at - CLOSE_MARGIN - Duration::from_millis(1));
        let mid = draw_close(drain, u64::MAX / 2);
        let expected = at - Duration::from_secs(4) + (Duration::from_secs(4) - CLOSE_MARGIN) / 2;
        assert!(mid.max(expected) - mid.min(expected) < Duration::from_millis(1));
        // Zero spread: all at once, just before the deadline.
        let at_once = DrainDeadline {
            at,
            spread: Duration::ZERO,
        };
        assert_eq!(draw_close(at_once, 12345), at - CLOSE_MARGIN);
        let draws: Vec<Instant> = (0..50).map(|_| draw_close(drain, random_u64())).collect();
        let spread = *draws.iter().max().unwrap() - *draws.iter().min().unwrap();
        assert!(spread > Duration::from_secs(2), "{spread:?}");
    }

    /// Reads one frame (header and payload) from a byte stream.
    async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
        let mut f = Frames::default();
        let mut bytes = Vec::new();
        loop {
            let n = match f.to_boundary() {
                0 if bytes.is_empty() => 1,
                0 => break,
                n => n as usize,
            };
            let mut buf = vec![0u8; n];
            io.read_exact(&mut buf).await.unwrap();
            f.feed(&buf);
            bytes.extend(buf);
        }
        (bytes[0], bytes)
    }

    #[tokio::test]
    async fn drain_waits_for_the_frame_in_flight_then_closes_both_sides() {
        let (proxy_client, mut client) = duplex(64 * 1024);
        let (proxy_server, mut server) = duplex(64 * 1024);
        let (deadline_tx, deadline_rx) = watch::channel(None);
        let settings = TunnelSettings {
            drain_deadline: deadline_rx,
            ..TunnelSettings::default()
        };
        let tunnel =
            tokio::spawn(async move { run(proxy_client, proxy_server, true, &settings).await });
        // Half a frame from the server is in flight when the drain starts.
        let whole = frame(2, 1000);
        server.write_all(&whole[..500]).await.unwrap();
        let mut got = vec![0u8; 500];
        client.read_exact(&mut got).await.unwrap();
        deadline_tx.send_replace(Some(DrainDeadline {
            at: Instant::now() + CLOSE_MARGIN,
            spread: Duration::ZERO,
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The rest of it, and the start of the next, which must not pass.
        server.write_all(&whole[500..]).await.unwrap();
        server.write_all(&frame(1, 10)[..4]).await.unwrap();
        let mut rest = vec![0u8; whole.len() - 500];
        client.read_exact(&mut rest).await.unwrap();
        assert!(
            [got, rest].concat() == whole,
            "the frame in flight passes whole"
        );
        // Then the close frame, unmasked, and FIN.
        let (first, close) = read_frame(&mut client).await;
        assert_eq!(first, 0x88);
        assert_eq!(close, close_frame(None));
        // The client answers with its own close frame, which is read and
        // dropped, and closes.
        client.write_all(&close_frame(Some(7))).await.unwrap();
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty(), "nothing after the close frame: {tail:?}");
        // The server got a masked close frame 1001, then FIN.
        let (first, close) = read_frame(&mut server).await;
        assert_eq!(first, 0x88);
        assert_eq!(close[1], 0x80 | 12);
        let key = &close[2..6];
        let code = [close[6] ^ key[0], close[7] ^ key[1]];
        assert_eq!(u16::from_be_bytes(code), GOING_AWAY);
        drop(client);
        drop(server);
        let end = timeout(Duration::from_secs(5), tunnel)
            .await
            .expect("the tunnel ends")
            .unwrap()
            .unwrap();
        assert_eq!(end, TunnelEnd::Drained { close_frames: 2 });
    }

    #[tokio::test]
    async fn a_frame_that_never_ends_gets_fin_only() {
        let (proxy_client, mut client) = duplex(64 * 1024);
        let (proxy_server, mut server) = duplex(64 * 1024);
        let (deadline_tx, deadline_rx) = watch::channel(None);
        let settings = TunnelSettings {
            drain_deadline: deadline_rx,
            ..TunnelSettings::default()
        };
        let tunnel =
            tokio::spawn(async move { run(proxy_client, proxy_server, true, &settings).await });
        let whole = frame(2, 1000);
        server.write_all(&whole[..10]).await.unwrap();
        deadline_tx.send_replace(Some(DrainDeadline {
            at: Instant::now(),
            spread: Duration::ZERO,
        }));
        let mut out = Vec::new();
        timeout(Duration::from_secs(5), client.read_to_end(&mut out))
            .await
            .expect("FIN")
            .unwrap();
        assert_eq!(out, whole[..10], "no close frame inside a frame");
        drop(client);
        drop(server);
        let end = timeout(Duration::from_secs(5), tunnel)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // The server side was at a boundary: it got its close frame.
        assert_eq!(end, TunnelEnd::Drained { close_frames: 1 });
    }

    /// Reads up to the end of a response head (and `extra` bytes more).
    async fn read_head(io: &mut (impl AsyncRead + Unpin), extra: usize) -> String {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(io.read(&mut byte).await.unwrap(), 1, "closed mid-head");
            got.push(byte[0]);
        }
        let mut body = vec![0u8; extra];
        io.read_exact(&mut body).await.unwrap();
        got.extend(body);
        String::from_utf8_lossy(&got).to_lowercase()
    }

    #[tokio::test]
    async fn serve_tunnels_after_a_101_and_stays_http_otherwise() {
        use tokio::net::{TcpListener, TcpStream};
        // The origin: 200 "ok" on keep-alive, or 101 and an echo on /ws.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let head = String::from_utf8_lossy(&head).to_lowercase();
                        seen.lock().unwrap().push(head.clone());
                        if !head.starts_with("get /ws ") {
                            stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .unwrap();
                            continue;
                        }
                        stream
                            .write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                                  Upgrade: echo\r\nKeep-Alive: timeout=5\r\nX-Origin: yes\r\n\r\n",
                            )
                            .await
                            .unwrap();
                        let (mut rx, mut tx) = stream.split();
                        let _ = tokio::io::copy(&mut rx, &mut tx).await;
                        let _ = tx.shutdown().await;
                        return;
                    }
                });
            }
        });
        let settings = TunnelSettings::default();
        let metrics = settings.metrics.clone();
        let settings = Arc::new(super::super::HttpSettings {
            compression: None,
            header_read_timeout: Duration::from_secs(5),
            max_header_size: 16 * 1024,
            server_timeout: Duration::from_secs(5),
            client_timeout: Duration::from_secs(5),
            http2: Default::default(),
            tunnel: settings,
            listener: Arc::from("-"),
            generation: 0,
            http1: Default::default(),
            parked: Default::default(),
        });
        let (mut client, server_io) = duplex(64 * 1024);
        let (_drain, draining) = watch::channel(false);
        let upstream = move || TcpStream::connect(addr);
        let serving = tokio::spawn(super::super::serve(
            server_io,
            upstream,
            settings,
            super::super::Downstream::http1(None),
            draining,
        ));
        // Answered 200: plain HTTP, the connection goes on.
        client
            .write_all(b"GET /plain HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut client, 2).await;
        assert!(
            head.starts_with("http/1.1 200 ok\r\n") && head.ends_with("ok"),
            "{head}"
        );
        // Answered 101: the client gets it without the other hop-by-hop
        // headers, then the bytes tunnel.
        client
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_head(&mut client, 0).await;
        assert!(
            head.starts_with("http/1.1 101 switching protocols\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
        assert!(head.contains("\r\nx-origin: yes\r\n"), "{head}");
        assert!(!head.contains("keep-alive"), "{head}");
        client.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        assert_eq!(metrics[ListenerCounter::TunnelsOpen].load(Relaxed), 1);
        assert!(
            !serving.is_finished(),
            "the connection lasts as long as its tunnel"
        );
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let stats = timeout(Duration::from_secs(5), serving)
            .await
            .expect("serve ends with the tunnel")
            .unwrap()
            .unwrap();
        assert_eq!(stats.requests, 2);
        assert_eq!(metrics[ListenerCounter::TunnelsOpen].load(Relaxed), 0);
        assert_eq!(metrics[ListenerCounter::TunnelsTotal].load(Relaxed), 1);
        // Both requests went upstream with the upgrade headers, the first
        // without the other hop-by-hop token.
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 2, "{heads:?}");
        for head in heads.iter() {
            assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
            assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
        }
    }

    #[tokio::test]
    async fn idle_tunnel_ends_at_the_timeout_and_counts() {
        let (proxy_client, mut client) = duplex(1024);
        let (proxy_server, mut server) = duplex(1024);
        let settings = TunnelSettings {
            idle_timeout: Duration::from_millis(300),
            ..TunnelSettings::default()
        };
        let metrics = settings.metrics.clone();
        let tunnel =
            tokio::spawn(async move { run(proxy_client, proxy_server, false, &settings).await });
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics[ListenerCounter::TunnelsOpen].load(Relaxed), 1);
        let started = Instant::now();
        let err = timeout(Duration::from_secs(5), tunnel)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, TunnelError::Idle(_)), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(metrics[ListenerCounter::TunnelsOpen].load(Relaxed), 0);
        assert_eq!(metrics[ListenerCounter::TunnelsTotal].load(Relaxed), 1);
    }
}
