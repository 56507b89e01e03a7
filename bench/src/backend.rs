//! The in-process servers the proxy forwards to: an HTTP/1.1 keep-alive
//! backend (`/text`, `/small`) and a one-shot TCP responder for layer 4.
//! The benchmark also reaches both directly, as the peer every proxied
//! figure is compared with.

use std::{convert::Infallible, fmt::Write, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the layer-4 responder answers: exactly this many bytes.
pub const ECHO_REPLY_LEN: usize = 64;

/// An upper bound on the connections a server accepts in one run; the
/// benchmark's own bounds keep it far below.
const MAX_ACCEPTS: u64 = 10_000_000;

/// The bodies the HTTP backend serves.
#[derive(Clone)]
pub struct Bodies {
    /// About 16 KiB of HTML: markup and text that repeat with variations,
    /// as a catalogue page does, so gzip sees realistic redundancy.
    pub text: Bytes,
    /// 64 bytes of text/plain, below the compression `min_size`.
    pub small: Bytes,
}

impl Bodies {
    pub fn new() -> Bodies {
        let small = Bytes::from_static(
            b"ok: a small response of exactly sixty-four bytes for the bench.\n",
        );
        debug_assert_eq!(small.len(), 64);
        Bodies {
            text: Bytes::from(catalogue_page(16 * 1024)),
            small,
        }
    }
}

/// A product catalogue page of at least `min_len` bytes (closed properly,
/// so a little over).
pub fn catalogue_page(min_len: usize) -> String {
    const ADJECTIVES: [&str; 8] = [
        "Lightweight",
        "Durable",
        "Compact",
        "Stainless",
        "Organic",
        "Wireless",
        "Handmade",
        "Foldable",
    ];
    const NOUNS: [&str; 7] = [
        "kettle",
        "backpack",
        "desk lamp",
        "chair",
        "headphones",
        "notebook",
        "bicycle bell",
    ];
    let mut s = String::with_capacity(min_len + 2048);
    s.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Catalogue - Home &amp; Outdoor</title>\n\
         <link rel=\"stylesheet\" href=\"/static/css/site.css\">\n</head>\n<body>\n\
         <header class=\"site-header\"><nav class=\"main-nav\"><ul>\n\
         <li><a href=\"/\">Home</a></li><li><a href=\"/catalogue\">Catalogue</a></li>\n\
         <li><a href=\"/offers\">Offers</a></li><li><a href=\"/contact\">Contact</a></li>\n\
         </ul></nav></header>\n<main class=\"content\">\n<h1>Home &amp; Outdoor</h1>\n\
         <p class=\"intro\">Everything for the house, the garden and the road. Free delivery \
         on orders over 50 EUR, returns within 30 days.</p>\n<ul class=\"products\">\n",
    );
    let mut i = 0usize;
    while s.len() < min_len {
        let adjective = ADJECTIVES[i % ADJECTIVES.len()];
        let noun = NOUNS[(i / 3) % NOUNS.len()];
        // Prices and stock vary the way real data does, so the text is not a
        // single repeated block.
        let cents = 499 + (i * 7919) % 25_000;
        let stock = (i * 37) % 120;
        let _ = write!(
            s,
            "<li class=\"product\" id=\"p{id}\">\n  <a href=\"/catalogue/item/{id}\">\
             <img src=\"/static/img/{id}.jpg\" alt=\"{adjective} {noun}\" width=\"160\" \
             height=\"120\" loading=\"lazy\"></a>\n  <h2 class=\"product-title\">{adjective} \
             {noun}</h2>\n  <p class=\"price\">{}.{:02} EUR</p>\n  <p class=\"stock\">{}</p>\n\
             \x20 <button class=\"add-to-cart\" data-id=\"{id}\">Add to cart</button>\n</li>\n",
            cents / 100,
            cents % 100,
            if stock == 0 {
                "Out of stock".to_string()
            } else {
                format!("{stock} in stock")
            },
            id = 10_000 + i,
        );
        i += 1;
    }
    s.push_str(
        "</ul>\n</main>\n<footer class=\"site-footer\"><p>&copy; Example Shop. \
         All prices include VAT.</p></footer>\n</body>\n</html>\n",
    );
    s
}

/// Serves HTTP/1.1 with keep-alive on `listener` until the runtime stops.
pub async fn serve_http(listener: TcpListener, bodies: Bodies) {
    for _ in 0..MAX_ACCEPTS {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, bodies.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    bodies: Bodies,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (content_type, body) = match req.uri().path() {
        "/text" => ("text/html; charset=utf-8", bodies.text),
        "/small" => ("text/plain; charset=utf-8", bodies.small),
        _ => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return Ok(resp);
        }
    };
    // Full sets Content-Length, which the compression stage's min_size reads.
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

/// The layer-4 responder: per connection, read a line (`REQ\n`), write
/// [`ECHO_REPLY_LEN`] bytes, close.
pub async fn serve_echo(listener: TcpListener) {
    for _ in 0..MAX_ACCEPTS {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), echo_once(stream)).await;
        });
    }
}

pub fn echo_reply() -> [u8; ECHO_REPLY_LEN] {
    let mut reply = [b'.'; ECHO_REPLY_LEN];
    reply[..4].copy_from_slice(b"ECHO");
    reply[ECHO_REPLY_LEN - 1] = b'\n';
    reply
}

async fn echo_once(mut stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 256];
    let mut seen = 0;
    // A request line is a few bytes; stop at the newline, EOF or a full buffer.
    while seen < buf.len() {
        let n = stream.read(&mut buf[seen..]).await?;
        if n == 0 {
            break;
        }
        seen += n;
        if buf[..seen].contains(&b'\n') {
            break;
        }
    }
    stream.write_all(&echo_reply()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_advertised_sizes() {
        let b = Bodies::new();
        assert_eq!(b.small.len(), 64);
        assert!(
            (16 * 1024..17 * 1024).contains(&b.text.len()),
            "{}",
            b.text.len()
        );
        assert!(b.text.ends_with(b"</html>\n"));
    }
}
