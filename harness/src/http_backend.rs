//! The HTTP/1.1 backend of the stage tests (hyper, keep-alive): responses
//! chosen by the request's query, an echo, and what it saw of each request.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, runtime::Runtime};

use crate::{
    backend::accept_until_dropped,
    bodies::{binary_body, text_body},
    config::BACKEND_ADDR,
    http::{TestBody, chunked, full},
};

/// What the HTTP backend saw.
#[derive(Default, Debug)]
pub struct HttpBackendStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Requests by their `X-Forwarded-For` (`<none>` when absent).
    pub xff: Mutex<HashMap<String, u64>>,
    /// Requests that arrived while the backend was hung
    /// ([`HttpBackend::set_hung`]) and were held.
    pub held: AtomicU64,
}

impl HttpBackendStats {
    pub fn xff_counts(&self) -> HashMap<String, u64> {
        self.xff.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An HTTP/1.1 server (hyper, keep-alive) on [`BACKEND_ADDR`]:
///
/// - `POST /echo`: the request body back;
/// - `GET|HEAD /r?len=N&seed=S&body=text|bin&ct=TYPE&status=CODE&enc=CODING
///   &cc=CACHE_CONTROL&etag=strong:X|weak:X&vary=V&chunked=1`: a body of
///   `len` bytes ([`text_body`] or [`binary_body`]) with those headers;
///   `chunked=1` sends it without Content-Length in 16 KiB frames.
///
/// Every response carries `x-seen-xff` (the request's X-Forwarded-For, or
/// `<none>`) and `x-backend-conn` (which backend connection served it).
///
/// While [`HttpBackend::set_hung`] is on, every request that arrives is
/// held without a response head until it is turned off (at most
/// [`HANG_CAP`]): a server that hangs now and then.
pub struct HttpBackend {
    pub stats: Arc<HttpBackendStats>,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// On: requests are held (see [`HttpBackend::set_hung`]).
    hung: Arc<AtomicBool>,
}

/// The longest a request is held by a hung backend.
pub const HANG_CAP: Duration = Duration::from_secs(30);

impl HttpBackend {
    pub fn start(rt: &Runtime) -> HttpBackend {
        let listener = rt
            .block_on(TcpListener::bind(BACKEND_ADDR))
            .expect("binding the HTTP backend");
        let addr = listener.local_addr().expect("backend address");
        let stats = Arc::new(HttpBackendStats::default());
        let hung = Arc::new(AtomicBool::new(false));
        let st = stats.clone();
        let hg = hung.clone();
        let stop = accept_until_dropped(rt, listener, move |stream| {
            let _ = stream.set_nodelay(true);
            let conn_no = st.connections.fetch_add(1, Ordering::Relaxed) + 1;
            let st = st.clone();
            let hg = hg.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let st = st.clone();
                    let hg = hg.clone();
                    async move {
                        hold_while_hung(&hg, &st).await;
                        Ok::<_, Infallible>(answer(req, &st, conn_no).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        });
        HttpBackend {
            stats,
            addr,
            stop,
            hung,
        }
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Hangs (`true`: requests arriving from now on get no response head
    /// until it is turned off again) or recovers (`false`: the held ones
    /// are answered, late).
    pub fn set_hung(&self, hung: bool) {
        self.hung.store(hung, Ordering::Relaxed);
    }
}

/// Waits while the backend is hung, at most [`HANG_CAP`].
async fn hold_while_hung(hung: &AtomicBool, st: &HttpBackendStats) {
    if !hung.load(Ordering::Relaxed) {
        return;
    }
    st.held.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    while hung.load(Ordering::Relaxed) && start.elapsed() < HANG_CAP {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The parsed query of a request.
pub fn query_map(uri: &hyper::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

async fn answer(req: Request<Incoming>, st: &HttpBackendStats, conn_no: u64) -> Response<TestBody> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let xff = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>();
    let xff = if xff.is_empty() {
        "<none>".to_string()
    } else {
        xff.join(" | ")
    };
    *st.xff
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(xff.clone())
        .or_default() += 1;
    let mut resp = if req.uri().path() == "/echo" {
        match req.into_body().collect().await {
            Ok(body) => {
                let mut r = Response::new(full(body.to_bytes()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                r
            }
            Err(e) => {
                let mut r = Response::new(full(format!("reading the body: {e}\n")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        }
    } else {
        configured(&query_map(req.uri()))
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-seen-xff", v);
    }
    h.insert("x-backend-conn", HeaderValue::from(conn_no));
    resp
}

/// The response `/r?...` asks for.
fn configured(q: &HashMap<String, String>) -> Response<TestBody> {
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let len = num("len", 1000) as usize;
    let seed = num("seed", 0);
    let status = StatusCode::from_u16(num("status", 200) as u16).unwrap_or(StatusCode::OK);
    let data = match q.get("body").map(String::as_str) {
        Some("bin") => binary_body(len, seed),
        _ => text_body(len, seed),
    };
    let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let chunked_mode = q.get("chunked").is_some_and(|v| v == "1");
    let body = if no_body {
        full(Bytes::new())
    } else if chunked_mode {
        chunked(data.clone())
    } else {
        full(data.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let ct = q.get("ct").map(String::as_str).unwrap_or("text/html");
    if !ct.is_empty() && ct != "none" {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(ct).expect("a valid content type"),
        );
    }
    if !no_body && !chunked_mode {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
    for (key, name) in [
        ("enc", header::CONTENT_ENCODING),
        ("cc", header::CACHE_CONTROL),
        ("vary", header::VARY),
    ] {
        if let Some(v) = q.get(key) {
            h.insert(
                name,
                HeaderValue::from_str(v).expect("a valid header value"),
            );
        }
    }
    if let Some(etag) = q.get("etag") {
        let value = match etag.split_once(':') {
            Some(("weak", tag)) => format!("W/\"{tag}\""),
            Some((_, tag)) => format!("\"{tag}\""),
            None => format!("\"{etag}\""),
        };
        h.insert(
            header::ETAG,
            HeaderValue::from_str(&value).expect("an ETag"),
        );
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp
}
