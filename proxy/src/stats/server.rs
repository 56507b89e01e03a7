//! The stats listener's HTTP side: one set of figures, three views.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{StatsSource, html::html, prometheus::prometheus};

/// Serves one connection of a stats listener (HTTP/1.1) until it closes or
/// sends no complete request head within `request_timeout`.
pub async fn serve_connection<IO>(io: IO, source: Arc<StatsSource>, request_timeout: Duration)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(respond(&source, &req)) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!("stats connection: {e}");
    }
}

fn respond<B>(source: &StatsSource, req: &Request<B>) -> Response<Full<Bytes>> {
    let (ctype, body) = match req.uri().path() {
        "/" | "/stats" => ("text/html; charset=utf-8", html(&source.view())),
        "/stats.json" | "/json" => (
            "application/json",
            serde_json::to_string_pretty(&source.view()).unwrap_or_default(),
        ),
        "/metrics" => (
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(&source.view()),
        ),
        _ => {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Full::new(Bytes::from_static(
                    b"not found: try /, /stats.json or /metrics\n",
                )))
                .expect("static response");
        }
    };
    Response::builder()
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}
