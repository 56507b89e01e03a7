//! Upstream HTTP/1.1 connections of one downstream connection: opened on
//! demand, kept idle between requests and reused.
//!
//! An HTTP/1 client sends its requests one after the other, so it uses one
//! upstream connection at a time; an HTTP/2 client has several streams open,
//! and each takes an idle connection or opens one. A connection goes back to
//! the idle list when its response body has been read to the end; one whose
//! body was abandoned (the client went away) is closed instead, since the
//! rest of that body would still be on the wire.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use hyper::{Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use super::{BodyError, HttpError, RequestBody, Upstream};

/// Idle connections kept per downstream connection: an HTTP/2 client that
/// had many streams at once does not keep as many servers' sockets open.
const MAX_IDLE: usize = 8;

/// An open upstream connection: the request side, and the task driving it.
pub(super) struct UpstreamConn {
    sender: SendRequest<RequestBody>,
    task: AbortHandle,
    /// The server it goes to, for access lines.
    pub server: Arc<str>,
}

impl Drop for UpstreamConn {
    // The driving task must not outlive the downstream connection (the lead
    // cuts connections at the hard deadline by dropping the serve task).
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The idle upstream connections of one downstream connection.
#[derive(Default)]
pub(super) struct IdleConns {
    conns: Mutex<Vec<UpstreamConn>>,
}

impl IdleConns {
    fn take(&self) -> Option<UpstreamConn> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put(&self, conn: UpstreamConn) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < MAX_IDLE && !conn.sender.is_closed() {
            conns.push(conn);
        }
    }
}

/// What [`send`] got: the response, and what it went over.
pub(super) struct Sent {
    pub response: Response<Incoming>,
    pub conn: UpstreamConn,
    /// A new connection was opened for it.
    pub connected: bool,
}

/// Sends a request on an idle upstream connection, or on a new one when
/// there is none (or the idle ones turn out closed).
pub(super) async fn send<U: Upstream>(
    upstream: &U,
    idle: &IdleConns,
    mut req: Request<RequestBody>,
) -> Result<Sent, HttpError> {
    // A reused connection may turn out closed by the server just as we
    // send; hyper hands the request back when none of it was written, and
    // then the next idle one, or a fresh connection, gets it.
    loop {
        let (mut conn, connected) = match idle.take() {
            Some(mut conn) => {
                // Resolves at once for a connection whose previous response
                // was read to its end, or fails if the server closed it.
                if conn.sender.ready().await.is_err() {
                    continue;
                }
                (conn, false)
            }
            None => (connect(upstream).await?, true),
        };
        match conn.sender.try_send_request(req).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    conn,
                    connected,
                });
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !connected => {
                    tracing::debug!(error = %e.error(), "upstream connection unusable, reopening");
                    req = unsent;
                }
                _ => return Err(HttpError::Upstream(e.into_error())),
            },
        }
    }
}

async fn connect<U: Upstream>(upstream: &U) -> Result<UpstreamConn, HttpError> {
    let (io, server) = upstream
        .connect()
        .await
        .map_err(HttpError::UpstreamConnect)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(HttpError::UpstreamHandshake)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    })
    .abort_handle();
    Ok(UpstreamConn {
        sender,
        task,
        server,
    })
}

/// An upstream response body that fails when the server sends nothing for
/// `limit` while we wait for it (a slow downstream reader, which makes us
/// poll late, does not count against the server), and hands its connection
/// back to the idle list once read to the end.
pub(super) struct UpstreamBody {
    inner: Incoming,
    limit: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
    /// Until the body ends: the connection, and where it goes back to.
    conn: Option<(UpstreamConn, Arc<IdleConns>)>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, limit: Duration, conn: UpstreamConn, idle: Arc<IdleConns>) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            waiting: false,
            conn: Some((conn, idle)),
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
        if !this.waiting {
            this.waiting = true;
            let at = tokio::time::Instant::now() + this.limit;
            this.deadline.as_mut().reset(at);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                match &frame {
                    // Read to its end (a chunked body may not say so in
                    // is_end_stream).
                    None => this.release(),
                    Some(Ok(_)) => this.release_if_done(),
                    // A broken body breaks its connection: never reused.
                    Some(Err(_)) => this.conn = None,
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Upstream)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.conn = None;
                    Poll::Ready(Some(Err(BodyError::UpstreamStalled(this.limit))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
