//! HTTP/2 towards the client: hyper's server with our limits, the two-phase
//! GOAWAY when the generation drains, an idle timeout, and a frame guard
//! that closes connections which flood us with cheap frames.
//!
//! hyper (through the h2 crate) already bounds what a client can make us
//! hold: concurrent streams, flow-control windows, the header list size and
//! streams reset before we accepted them. What it does not bound is the
//! rate of frames that cost us work but no window: RST_STREAM right after
//! HEADERS (the 2023 "rapid reset": each stream starts a request upstream),
//! PING, SETTINGS, PRIORITY and empty DATA frames, and endless CONTINUATION
//! frames of one header block (2024). [`FrameGuard`] reads the frame
//! headers as the bytes pass (no copy, no payload parsing) and fails the
//! connection when a client goes over a limit.

use std::{
    io,
    pin::Pin,
    sync::{Arc, OnceLock, atomic::Ordering::Relaxed},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use std::error::Error as _;

use hyper::{Request, Response, body::Incoming, service::Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

use super::{
    HttpError,
    log::{ConnLog, LogHolder, Logged},
};
use crate::config::Http2Config;

/// The 24 bytes an HTTP/2 client sends before its first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;

mod frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const CONTINUATION: u8 = 0x9;
    /// SETTINGS and PING: this frame answers ours.
    pub const FLAG_ACK: u8 = 0x1;
    pub const FLAG_END_STREAM: u8 = 0x1;
    pub const FLAG_END_HEADERS: u8 = 0x4;
}

/// Which limit a client went over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Flood {
    #[error("{0} RST_STREAM frames within one second (max_resets_per_second)")]
    Resets(u32),
    #[error(
        "{0} PING/SETTINGS/PRIORITY/empty frames within one second (max_control_frames_per_second)"
    )]
    Control(u32),
    #[error("{0} CONTINUATION frames in one header block (max_continuation_frames)")]
    Continuation(u32),
    /// h2's own limits (streams reset before we could take them, too many
    /// stream errors caused): it answered ENHANCE_YOUR_CALM.
    #[error("the client went over the HTTP/2 stack's limits (ENHANCE_YOUR_CALM): {0}")]
    Calm(String),
}

/// Frames counted over the current one-second window.
struct Rate {
    limit: u32,
    count: u32,
    since: Instant,
}

impl Rate {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            count: 0,
            since: Instant::now(),
        }
    }

    /// Counts one frame; true when the limit is exceeded within a second.
    /// The clock is read only when the count reaches the limit.
    fn over(&mut self) -> bool {
        self.count += 1;
        if self.count <= self.limit {
            return false;
        }
        let now = Instant::now();
        if now.duration_since(self.since) < Duration::from_secs(1) {
            return true;
        }
        self.since = now;
        self.count = 1;
        false
    }
}

/// Where the scan of the client's bytes stands.
enum Scan {
    Preface(usize),
    Header {
        buf: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
    Payload(usize),
}

/// Reads the frame headers of what the client sends and fails the read
/// side when a flood limit is exceeded.
pub struct FrameGuard<IO> {
    inner: IO,
    scan: Scan,
    resets: Rate,
    control: Rate,
    continuation_limit: u32,
    /// CONTINUATION frames since the last HEADERS without END_HEADERS.
    continuations: u32,
    tripped: Option<Flood>,
    /// Where the flood that stopped the connection is told to `serve`.
    report: Arc<OnceLock<Flood>>,
    /// Where reads and writes are timed, for the stall limit.
    activity: Option<Arc<dyn LogHolder>>,
}

impl<IO> FrameGuard<IO> {
    pub fn new(inner: IO, limits: &Http2Config) -> Self {
        Self {
            inner,
            scan: Scan::Preface(PREFACE_LEN),
            resets: Rate::new(limits.max_resets_per_second),
            control: Rate::new(limits.max_control_frames_per_second),
            continuation_limit: limits.max_continuation_frames,
            continuations: 0,
            tripped: None,
            report: Arc::default(),
            activity: None,
        }
    }

    fn touch(&self) {
        if let Some(log) = &self.activity {
            log.conn_log().last_io_ms.store(ConnLog::now_ms(), Relaxed);
        }
    }

    /// Scans bytes the client sent; the first limit exceeded is kept.
    fn scan(&mut self, mut bytes: &[u8]) -> Result<(), Flood> {
        while !bytes.is_empty() {
            match &mut self.scan {
                Scan::Preface(left) | Scan::Payload(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.scan = Scan::Header {
                            buf: [0; FRAME_HEADER_LEN],
                            have: 0,
                        };
                    }
                }
                Scan::Header { buf, have } => {
                    let n = (FRAME_HEADER_LEN - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == FRAME_HEADER_LEN {
                        let header = *buf;
                        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                        self.scan = Scan::Payload(len as usize);
                        if len == 0 {
                            self.scan = Scan::Header {
                                buf: [0; FRAME_HEADER_LEN],
                                have: 0,
                            };
                        }
                        self.frame(header[3], header[4], len)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, len: u32) -> Result<(), Flood> {
        match kind {
            frame::RST_STREAM if self.resets.over() => Err(Flood::Resets(self.resets.count)),
            frame::PING | frame::SETTINGS if flags & frame::FLAG_ACK == 0 => self.control(),
            frame::PRIORITY => self.control(),
            frame::DATA if len == 0 && flags & frame::FLAG_END_STREAM == 0 => self.control(),
            frame::HEADERS => {
                self.continuations = 0;
                Ok(())
            }
            frame::CONTINUATION => {
                self.continuations += 1;
                if flags & frame::FLAG_END_HEADERS != 0 {
                    self.continuations = 0;
                } else if self.continuations > self.continuation_limit {
                    return Err(Flood::Continuation(self.continuations));
                }
                // An empty CONTINUATION frame is pure overhead.
                if len == 0 { self.control() } else { Ok(()) }
            }
            _ => Ok(()),
        }
    }

    fn control(&mut self) -> Result<(), Flood> {
        if self.control.over() {
            return Err(Flood::Control(self.control.count));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(flood) = &this.tripped {
            return Poll::Ready(Err(io::Error::other(flood.clone())));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.touch();
        }
        if let Poll::Ready(Ok(())) = polled
            && let Err(flood) = this.scan(&buf.filled()[before..])
        {
            // What was read is dropped: none of it is served.
            buf.set_filled(before);
            let _ = this.report.set(flood.clone());
            this.tripped = Some(flood.clone());
            return Poll::Ready(Err(io::Error::other(flood)));
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The timeouts of an HTTP/2 client connection.
pub struct Timeouts {
    /// A connection without a stream for this long is closed (gracefully).
    pub idle: Duration,
    /// A connection with streams on which no byte moved either way for this
    /// long (a client that stopped reading and keeps its windows shut) is
    /// cut (HAProxy `timeout client`).
    pub stall: Duration,
}

/// Serves one HTTP/2 client connection. When `draining` turns true the
/// client gets a GOAWAY naming the last stream id (2^31-1), then, after a
/// PING round trip, the final one with the last stream we took (RFC 9113
/// 6.8: h2's graceful shutdown does both); every stream up to it is served,
/// and the connection closes when they are done.
pub async fn serve<IO, S>(
    io: IO,
    service: S,
    limits: &Http2Config,
    max_header_size: usize,
    timeouts: Timeouts,
    log: Arc<dyn LogHolder>,
    mut draining: watch::Receiver<bool>,
) -> Result<(), HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<Logged>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut guard = FrameGuard::new(io, limits);
    guard.activity = Some(log.clone());
    let conn_log = log.conn_log();
    let flood = guard.report.clone();
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_stream_window_size(limits.initial_window_size)
        .initial_connection_window_size(limits.connection_window_size)
        .max_frame_size(limits.max_frame_size)
        .max_header_list_size(max_header_size as u32)
        .serve_connection(TokioIo::new(guard), service);
    tokio::pin!(conn);
    let every = (timeouts.idle.min(timeouts.stall) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_ms = timeouts.idle.as_millis() as u64;
    let stall_ms = timeouts.stall.as_millis() as u64;
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            // Also when the generation is gone (the sender dropped).
            _ = draining.wait_for(|d| *d), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick() => {
                let now = ConnLog::now_ms();
                let idle = conn_log.active.load(Relaxed) == 0;
                let since_io = now.saturating_sub(conn_log.last_io_ms.load(Relaxed));
                if idle && !closing
                    && now.saturating_sub(conn_log.idle_since_ms.load(Relaxed)) >= idle_ms
                {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                } else if (!idle || closing) && since_io >= stall_ms {
                    return Err(HttpError::ClientStalled(timeouts.stall));
                }
            }
        }
    };
    if let Some(flood) = flood.get() {
        return Err(HttpError::Flood(flood.clone()));
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) if calmed(&e) => Err(HttpError::Flood(Flood::Calm(e.to_string()))),
        // The client hung up after our GOAWAY: the close it was asked for.
        Err(e) if closing && !e.is_user() && e.source().is_some_and(is_io) => Ok(()),
        Err(e) => Err(super::classify_server_error(e)),
    }
}

/// Whether h2 closed the connection with ENHANCE_YOUR_CALM (RFC 9113 7).
fn calmed(e: &hyper::Error) -> bool {
    e.source()
        .and_then(|s| s.downcast_ref::<::h2::Error>())
        .and_then(::h2::Error::reason)
        == Some(::h2::Reason::ENHANCE_YOUR_CALM)
}

fn is_io(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<io::Error>() || e.source().is_some_and(is_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Http2Config {
        Http2Config {
            max_resets_per_second: 5,
            max_control_frames_per_second: 10,
            max_continuation_frames: 3,
            ..Http2Config::default()
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    /// Feeds `bytes` to a guard in pieces of `step` bytes.
    fn feed(bytes: &[u8], step: usize) -> Result<(), Flood> {
        let mut guard = FrameGuard::new((), &limits());
        for chunk in bytes.chunks(step) {
            guard.scan(chunk)?;
        }
        Ok(())
    }

    #[test]
    fn ordinary_traffic_passes_in_any_split() {
        let mut bytes = preface();
        bytes.extend(frame(frame::SETTINGS, 0, 0, &[0; 6]));
        bytes.extend(frame(frame::SETTINGS, frame::FLAG_ACK, 0, &[]));
        for stream in (1..200).step_by(2) {
            bytes.extend(frame(
                frame::HEADERS,
                frame::FLAG_END_HEADERS,
                stream,
                &[0x82; 20],
            ));
            bytes.extend(frame(
                frame::DATA,
                frame::FLAG_END_STREAM,
                stream,
                &[7; 100],
            ));
        }
        bytes.extend(frame(frame::HEADERS, 0, 201, &[0x82; 5]));
        bytes.extend(frame(frame::CONTINUATION, 0, 201, &[0x82; 5]));
        bytes.extend(frame(
            frame::CONTINUATION,
            frame::FLAG_END_HEADERS,
            201,
            &[0x82; 5],
        ));
        for step in [1, 7, 9, 64, 100_000] {
            assert_eq!(feed(&bytes, step), Ok(()), "step {step}");
        }
    }

    #[test]
    fn rapid_reset_trips() {
        let mut bytes = preface();
        for stream in (1..40).step_by(2) {
            bytes.extend(frame(
                frame::HEADERS,
                frame::FLAG_END_HEADERS,
                stream,
                &[0x82],
            ));
            bytes.extend(frame(frame::RST_STREAM, 0, stream, &[0, 0, 0, 8]));
        }
        assert_eq!(feed(&bytes, 13), Err(Flood::Resets(6)));
    }

    #[test]
    fn ping_settings_priority_and_empty_data_floods_trip() {
        for (kind, flags, payload) in [
            (frame::PING, 0, vec![0; 8]),
            (frame::SETTINGS, 0, vec![]),
            (frame::PRIORITY, 0, vec![0; 5]),
            (frame::DATA, 0, vec![]),
        ] {
            let mut bytes = preface();
            for _ in 0..20 {
                bytes.extend(frame(kind, flags, 1, &payload));
            }
            assert_eq!(
                feed(&bytes, 5),
                Err(Flood::Control(11)),
                "frame type {kind}"
            );
        }
        // Acks answer our own frames: not counted.
        let mut bytes = preface();
        for _ in 0..20 {
            bytes.extend(frame(frame::PING, frame::FLAG_ACK, 0, &[0; 8]));
        }
        assert_eq!(feed(&bytes, 5), Ok(()));
    }

    #[test]
    fn continuation_flood_trips() {
        let mut bytes = preface();
        bytes.extend(frame(frame::HEADERS, 0, 1, &[0x82]));
        for _ in 0..10 {
            bytes.extend(frame(frame::CONTINUATION, 0, 1, &[0x82; 3]));
        }
        assert_eq!(feed(&bytes, 4), Err(Flood::Continuation(4)));
    }

    #[test]
    fn the_rate_window_restarts_after_a_second() {
        let mut rate = Rate::new(2);
        assert!(!rate.over());
        assert!(!rate.over());
        rate.since -= Duration::from_millis(1100);
        assert!(!rate.over(), "a new window");
        assert!(!rate.over());
        assert!(rate.over());
    }
}
