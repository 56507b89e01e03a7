//! Upstream HTTP/1.1 connections: opened on demand, kept idle between
//! requests and reused.
//!
//! The idle connections of a stage are shared by its client connections,
//! per server (nginx's upstream `keepalive`, HAProxy's `http-reuse`): a new
//! client connection, or an idle keep-alive client, holds no upstream
//! connection. A backend that receives a PROXY header gets one per client
//! instead (the header names one client), kept per client connection. The
//! server of each request is chosen first (round-robin over the UP
//! servers), then an idle connection to it is taken, or a new one opened.
//!
//! A connection goes back to the idle list when its response body has been
//! read to the end; one whose body was abandoned (the client went away) is
//! closed instead, since the rest of that body would still be on the wire.
//! A request that fails on a reused connection before any of its response
//! arrived is sent again on a new connection when that is safe: hyper gave
//! it back unsent, or it is idempotent and has no body (nginx's
//! `proxy_next_upstream error` on a kept-alive connection).
//!
//! A connection has no task of its own: the client task using it polls
//! hyper's side of it while it waits for the response and while it reads
//! the body, so the response reaches the client without waking another
//! task (one wake-up and hand-over fewer per request). Idle connections
//! are looked at by one sweeper task per pool while there are any: those
//! past `pool-purge-delay`, and those the server closed, are closed (a
//! closed one is also skipped when taken). Only a 101 gives a connection a
//! task of its own, where hyper finishes the upgrade.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use hyper::{Method, Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncRead, io::AsyncWrite, task::AbortHandle, time::Instant};

use super::{BodyError, HttpError, RequestBody};

/// A new upstream byte stream, and which server it reached.
pub struct Connected<Io> {
    pub io: Io,
    /// Index of the server among [`Upstream::servers`].
    pub server: usize,
    /// Its name, for access lines.
    pub name: Arc<str>,
}

/// The servers requests go to.
///
/// Closures `Fn() -> impl Future<Output = io::Result<Io>>` implement it as
/// one server named "upstream", so tests can pass one over a test server.
pub trait Upstream: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// How many servers there are (idle connections are kept per server).
    fn servers(&self) -> usize;
    /// The server the next request goes to.
    fn pick(&self) -> usize;
    /// Opens a connection to `server`, or to the next one that answers.
    #[allow(clippy::type_complexity)]
    fn connect(
        &self,
        server: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<Connected<Self::Io>>> + Send + '_>>;
}

impl<F, Fut, Io> Upstream for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    fn servers(&self) -> usize {
        1
    }
    fn pick(&self) -> usize {
        0
    }
    fn connect(
        &self,
        _server: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<Connected<Io>>> + Send + '_>> {
        let connecting = self();
        Box::pin(async move {
            Ok(Connected {
                io: connecting.await?,
                server: 0,
                name: Arc::from("upstream"),
            })
        })
    }
}

/// hyper's side of an upstream connection: it writes the requests and
/// reads the responses into their bodies when polled.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Who polls a connection's [`Driver`].
enum Driving {
    /// The task using the connection, on the way: while it waits for the
    /// response (`send`), and while it reads the body ([`UpstreamBody`]).
    /// The response and its bytes then reach the client's task without a
    /// wake-up of another task; an idle connection costs no task.
    Inline(Driver),
    /// A task of its own: after a 101, hyper needs the driver polled once
    /// more to hand the socket over to the tunnel.
    Task(AbortHandle),
    /// The driver returned: the connection is closed (or upgraded).
    Ended,
}

/// An open upstream connection: the request side, and its driver.
pub(super) struct UpstreamConn {
    sender: SendRequest<RequestBody>,
    driving: Driving,
    server: usize,
    /// The server's name, for access lines.
    pub name: Arc<str>,
}

impl UpstreamConn {
    /// Lets hyper do what is ready on the connection (write the request,
    /// read the response), and makes `cx` the task woken for more.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Driving::Inline(driver) = &mut self.driving
            && let Poll::Ready(end) = driver.as_mut().poll(cx)
        {
            if let Err(e) = end {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            self.driving = Driving::Ended;
        }
    }

    /// Neither end has closed it.
    fn is_open(&self) -> bool {
        !matches!(self.driving, Driving::Ended) && !self.sender.is_closed()
    }

    /// Waits until the connection takes a request; fails if it closed.
    async fn ready(&mut self) -> hyper::Result<()> {
        std::future::poll_fn(|cx| {
            self.drive(cx);
            self.sender.poll_ready(cx)
        })
        .await
    }

    /// Gives the driver a task of its own (after a 101: hyper finishes the
    /// upgrade there, then the tunnel has the socket).
    pub fn detach(&mut self) {
        if let Driving::Inline(driver) = std::mem::replace(&mut self.driving, Driving::Ended) {
            let task = tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            self.driving = Driving::Task(task.abort_handle());
        }
    }
}

impl Drop for UpstreamConn {
    // A driving task must not outlive its connection: a closed idle list
    // (its client, or its generation, gone) closes its connections.
    fn drop(&mut self) {
        if let Driving::Task(task) = &self.driving {
            task.abort();
        }
    }
}

/// Idle connections to one server, oldest first, with when each was left.
type IdleList = VecDeque<(UpstreamConn, Instant)>;

/// Idle upstream connections, per server: of a stage, or of one client
/// connection.
pub struct IdlePool {
    servers: Box<[Mutex<IdleList>]>,
    /// Idle connections kept per server (HAProxy `pool-max-conn`).
    max_per_server: usize,
    /// An idle connection unused this long is closed (HAProxy
    /// `pool-purge-delay`).
    purge_after: Duration,
    /// A [`sweeper`] task runs (while there are idle connections).
    sweeping: AtomicBool,
}

impl IdlePool {
    pub fn new(servers: usize, max_per_server: usize, purge_after: Duration) -> Self {
        Self {
            servers: (0..servers.max(1)).map(|_| Mutex::default()).collect(),
            max_per_server,
            purge_after,
            sweeping: AtomicBool::new(false),
        }
    }

    fn list(&self, server: usize) -> std::sync::MutexGuard<'_, IdleList> {
        let list = &self.servers[server % self.servers.len()];
        list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection to `server`; the ones unused
    /// for `purge_after` are closed on the way.
    fn take(&self, server: usize) -> Option<UpstreamConn> {
        let mut list = self.list(server);
        let (conn, since) = list.pop_back()?;
        let now = Instant::now();
        while list
            .front()
            .is_some_and(|(_, since)| !self.fresh(*since, now))
        {
            list.pop_front();
        }
        self.fresh(since, now).then_some(conn)
    }

    /// An idle connection left at `since` may still be used at `now`.
    fn fresh(&self, since: Instant, now: Instant) -> bool {
        now.duration_since(since) < self.purge_after
    }

    fn put(self: &Arc<Self>, conn: UpstreamConn) {
        if !conn.is_open() || self.max_per_server == 0 {
            return;
        }
        let mut list = self.list(conn.server);
        if list.len() >= self.max_per_server {
            // The oldest goes: the most recent ones are the likeliest to
            // still be open at the server.
            list.pop_front();
        }
        list.push_back((conn, Instant::now()));
        drop(list);
        // Loaded first: once per request, the sweeper almost always runs.
        if !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel) {
            let first = Instant::now() + self.purge_after.min(LOOK_AGAIN);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(sweeper(Arc::downgrade(self), first))),
                // No runtime (it is shutting down): nothing outlives it.
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }

    /// Closes the idle connections unused for `purge_after`, and those the
    /// server closed; says when to look again (`None`: none is left).
    pub(super) fn sweep(&self) -> Option<Instant> {
        let now = Instant::now();
        // Nobody waits on an idle connection: hyper reads what the socket
        // has (a close) and registers no one.
        let mut cx = Context::from_waker(Waker::noop());
        let mut next: Option<Instant> = None;
        for list in &self.servers {
            let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
            list.retain_mut(|(conn, since)| {
                conn.drive(&mut cx);
                conn.is_open() && self.fresh(*since, now)
            });
            if let Some((_, since)) = list.front() {
                let at = *since + self.purge_after;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next.map(|at| at.min(now + LOOK_AGAIN))
    }

    /// Idle connections now, over all servers.
    pub fn idle(&self) -> usize {
        (0..self.servers.len()).map(|s| self.list(s).len()).sum()
    }
}

/// The longest an idle connection the server closed stays open here.
const LOOK_AGAIN: Duration = Duration::from_secs(5);

/// Sweeps `pool` (see [`IdlePool::sweep`]) until it has no idle connection
/// left, or is gone; `put` starts it again.
async fn sweeper(pool: Weak<IdlePool>, mut at: Instant) {
    loop {
        tokio::time::sleep_until(at).await;
        let Some(pool) = pool.upgrade() else { return };
        if let Some(next) = pool.sweep() {
            at = next;
            continue;
        }
        pool.sweeping.store(false, Ordering::Release);
        // A connection put between the sweep and the store found this
        // sweeper still running: it is swept here, unless a new sweeper
        // took it.
        if pool.idle() == 0 || pool.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        at = Instant::now() + pool.purge_after.min(LOOK_AGAIN);
    }
}

/// What [`send`] got: the response, and what it went over.
pub(super) struct Sent {
    pub response: Response<Incoming>,
    pub conn: UpstreamConn,
    /// A new connection was opened for it.
    pub connected: bool,
}

/// Sends a request to the next server, on an idle connection to it or on a
/// new one.
pub(super) async fn send<U: Upstream>(
    upstream: &U,
    idle: &IdlePool,
    mut req: Request<RequestBody>,
) -> Result<Sent, HttpError> {
    let server = upstream.pick();
    let mut fresh_only = false;
    loop {
        let reused = if fresh_only { None } else { idle.take(server) };
        let (mut conn, connected) = match reused {
            Some(mut conn) => {
                // Resolves at once for a connection whose previous response
                // was read to its end, or fails if the server closed it.
                if conn.ready().await.is_err() {
                    continue;
                }
                (conn, false)
            }
            None => (connect(upstream, server).await?, true),
        };
        // A copy to send again should the reused connection fail after
        // taking the request: only a request that may be repeated.
        let replay = (!connected).then(|| replayable(&req)).flatten();
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        let answered = std::future::poll_fn(|cx| {
            conn.drive(cx);
            response.as_mut().poll(cx)
        })
        .await;
        match answered {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    conn,
                    connected,
                });
            }
            Err(mut e) => match (e.take_message(), replay) {
                // Not written at all: any request may go again.
                (Some(unsent), _) if !connected => {
                    tracing::debug!(error = %e.error(), "upstream connection unusable, reopening");
                    req = unsent;
                }
                (None, Some(copy)) => {
                    tracing::debug!(error = %e.error(), "reused upstream connection failed, repeating the request on a new one");
                    req = copy;
                    fresh_only = true;
                }
                _ => return Err(HttpError::Upstream(e.into_error())),
            },
        }
    }
}

/// A copy of `req` when it is idempotent (RFC 9110 9.2.2) and has no body.
fn replayable(req: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

async fn connect<U: Upstream>(upstream: &U, server: usize) -> Result<UpstreamConn, HttpError> {
    let Connected { io, server, name } = upstream
        .connect(server)
        .await
        .map_err(HttpError::UpstreamConnect)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(HttpError::UpstreamHandshake)?;
    Ok(UpstreamConn {
        sender,
        // A 101 hands the connection to the tunnel (upgrade.rs).
        driving: Driving::Inline(Box::pin(conn.with_upgrades())),
        server,
        name,
    })
}

/// How long after the server's failure the client side is told of it (see
/// [`UpstreamBody`]): one tick of tokio's timer.
const FAILURE_AFTER: Duration = Duration::from_millis(1);

/// An upstream response body that fails when the server sends nothing for
/// `limit` while we wait for it (a slow downstream reader, which makes us
/// poll late, does not count against the server), and hands its connection
/// back to the idle list once read to the end.
pub(super) struct UpstreamBody {
    inner: Incoming,
    limit: Duration,
    /// Made the first time the body has to wait: a small body usually
    /// arrives with its head, and then no timer is allocated or armed.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the deadline runs (from the first wait since data came).
    waiting: bool,
    /// Until the body ends: the connection, and where it goes back to.
    conn: Option<(UpstreamConn, Arc<IdlePool>)>,
    /// The server's failure, told on the next poll: first the bytes that
    /// came before it go out to the client.
    failed: Option<hyper::Error>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, limit: Duration, conn: UpstreamConn, idle: Arc<IdlePool>) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
            waiting: false,
            conn: Some((conn, idle)),
            failed: None,
        }
    }

    fn release_if_done(&mut self) {
        if http_body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some((conn, idle)) = self.conn.take() {
            idle.put(conn);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read to the end (hyper may stop polling once the announced
        // length arrived) or empty: reusable. Otherwise the connection
        // closes with this body.
        self.release_if_done();
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.failed.is_some() {
            let deadline = this.deadline.as_mut().expect("armed with the failure");
            std::task::ready!(deadline.as_mut().poll(cx));
            let e = this.failed.take().expect("checked above");
            return Poll::Ready(Some(Err(BodyError::Upstream(e))));
        }
        if let Some((conn, _)) = &mut this.conn {
            conn.drive(cx);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                match frame {
                    // Read to its end (a chunked body may not say so in
                    // is_end_stream).
                    None => this.release(),
                    Some(Ok(_)) => this.release_if_done(),
                    // A broken body breaks its connection: never reused.
                    // The connection is driven here, so the response's
                    // head, its bytes and the failure can all come in one
                    // poll of the client's task; told at once, hyper would
                    // drop what it has not written yet (the client would
                    // get no head at all). The failure is told after the
                    // next tick of the timer, once that has gone out.
                    Some(Err(e)) => {
                        this.conn = None;
                        this.failed = Some(e);
                        let at = tokio::time::Instant::now() + FAILURE_AFTER;
                        match &mut this.deadline {
                            Some(deadline) => deadline.as_mut().reset(at),
                            None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                        return self.poll_frame(cx);
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Upstream)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let at = tokio::time::Instant::now() + this.limit;
                    match &mut this.deadline {
                        Some(deadline) => deadline.as_mut().reset(at),
                        None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let deadline = this.deadline.as_mut().expect("set above");
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.conn = None;
                        Poll::Ready(Some(Err(BodyError::UpstreamStalled(this.limit))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
