//! The stats listener's HTTP side: one set of figures, three views.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{StatsSource, html::html, prometheus::prometheus};
use crate::stage::socket::ListenSocket;

/// Serves the stats listener until the task is dropped.
pub async fn serve(listener: Arc<ListenSocket>, source: Arc<StatsSource>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(ok) => ok,
            Err(e) => {
                debug!("stats listener: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(respond(&source, &req)) }
            });
            let io = TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                debug!("stats connection: {e}");
            }
        });
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
