//! HTTP/1.1 clients: hyper's connection-level client over any stream
//! (plain or TLS) with the request bodies the tests send, and reading a
//! connection until the peer closes it.

use std::{
    convert::Infallible,
    io,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request,
    body::{Body, Frame},
    client::conn::http1::SendRequest,
    header,
    http::response::Parts,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};

/// The body type of the tests' requests and of the HTTP backend's answers.
pub type TestBody = UnsyncBoxBody<Bytes, io::Error>;

/// A body of known length.
pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A body sent in 16 KiB frames with no length announced (HTTP/1.1
/// chunked transfer coding).
pub fn chunked(data: impl Into<Bytes>) -> TestBody {
    let data: Bytes = data.into();
    let frames = (0..data.len())
        .step_by(16 * 1024)
        .map(|at| data.slice(at..data.len().min(at + 16 * 1024)))
        .collect();
    ChunkedBody(frames).boxed_unsync()
}

/// Frames handed out one by one, no size hint.
struct ChunkedBody(std::collections::VecDeque<Bytes>);

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// HTTP/1.1 client handshake over any byte stream, for any request body
/// type; the connection task runs on the current runtime and ends when the
/// sender is dropped or the server closes.
pub async fn http_handshake<IO, B>(io: IO) -> io::Result<SendRequest<B>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A new plain HTTP connection to `addr`.
pub async fn http_connect(addr: &str) -> io::Result<SendRequest<TestBody>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    http_handshake(tcp).await
}

/// Sends `req` and reads the whole response.
pub async fn fetch(
    sender: &mut SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Result<(Parts, Vec<u8>), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body (status {}): {e}", parts.status))?
        .to_bytes()
        .to_vec();
    Ok((parts, body))
}

/// A GET (or other bodiless method) with `headers`; Host `host`.
pub fn request(method: &str, uri: &str, host: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(Bytes::new())).expect("a valid request")
}

/// A POST of `body` to `/echo`.
pub fn echo_request(host: &str, body: Vec<u8>) -> Request<TestBody> {
    Request::builder()
        .method("POST")
        .uri("/echo")
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(full(body))
        .expect("a valid request")
}

/// All values of a response header joined with `, ` (None if absent).
pub fn header_str(parts: &Parts, name: &str) -> Option<String> {
    let values: Vec<String> = parts
        .headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Reads from `stream` until EOF, an error or `bound`; says how it
/// ended and after how long (the bytes read are returned too).
pub async fn read_until_closed<S: AsyncRead + Unpin>(
    stream: &mut S,
    bound: Duration,
) -> (Closed, Duration, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (Closed::StillOpen, start.elapsed(), got),
            Ok(Ok(0)) => return (Closed::Eof, start.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (Closed::Error(e.kind()), start.elapsed(), got),
        }
    }
}

/// How a connection ended in [`read_until_closed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Eof,
    Error(io::ErrorKind),
    StillOpen,
}

impl Closed {
    /// EOF or a reset: the peer closed it.
    pub fn is_closed(self) -> bool {
        !matches!(self, Closed::StillOpen)
    }
}
