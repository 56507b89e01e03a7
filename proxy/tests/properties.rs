//! Property tests against the proxy library's public API:
//!
//! - PROXY v2: what `encode_header` writes, `read_header` reads back as the
//!   same header, however the bytes arrive, and stops at its end;
//! - PROXY v2: every strict prefix of a valid header is incomplete (truncated
//!   at end of stream, a timeout while the stream stays open), never invalid;
//! - PROXY v1: the same two for text lines (TCP4, TCP6, UNKNOWN): read back
//!   as their addresses however the bytes arrive, never a byte of the
//!   payload after the `\r\n` consumed, every strict prefix incomplete;
//! - gzip: a response body that `http::serve` compresses gunzips to what the
//!   upstream sent, however the upstream split it;
//! - Accept-Encoding: `accepts_gzip` agrees with the reference model in
//!   `model/accept_encoding.rs`, which the fuzz target uses too.
//!
//! No network and no root: everything runs on in-memory streams.

use std::{
    convert::Infallible,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::{
    HeaderMap, Request, Response,
    body::{Frame, Incoming},
    header::{ACCEPT_ENCODING, CONTENT_ENCODING, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proxy::stage::{
    http::{self, Compression, HttpSettings, headers::accepts_gzip},
    proxy_proto::{ProxyError, ProxyHeader, Versions, encode_header, read_header, tlv},
};
use tokio::{
    io::{AsyncRead, ReadBuf},
    runtime::Runtime,
    sync::watch,
};

#[path = "model/accept_encoding.rs"]
mod model;

/// Large enough for any header the strategies below make.
const MAX_LEN: usize = u16::MAX as usize;
const DEADLINE: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Hands out `data` in pieces whose sizes cycle through `sizes` (a 0 is one
/// `Pending` first), then end of file, or, when `stay_open`, nothing more
/// for ever (a peer that went quiet).
struct Pieces {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
    was_pending: bool,
    stay_open: bool,
}

impl Pieces {
    fn new(data: &[u8], sizes: &[usize]) -> Self {
        Self {
            data: data.to_vec(),
            pos: 0,
            sizes: sizes.to_vec(),
            next: 0,
            was_pending: false,
            stay_open: false,
        }
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let remaining = this.data.len() - this.pos;
        if remaining == 0 {
            // Staying open: never woken again, as a silent socket.
            return if this.stay_open {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            };
        }
        let size = match this.sizes.get(this.next % this.sizes.len().max(1)) {
            None => remaining,
            Some(&size) => {
                this.next += 1;
                size
            }
        };
        if size == 0 && !this.was_pending {
            this.was_pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.was_pending = false;
        let n = size.max(1).min(remaining).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

/// TLVs of any type but CRC32C, whose value must be the header's checksum.
fn tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    let kind = any::<u8>().prop_filter("not CRC32C", |k| *k != tlv::CRC32C);
    prop::collection::vec((kind, prop::collection::vec(any::<u8>(), 0..40)), 0..6)
}

/// Piece sizes for a reader: empty means all at once.
fn pieces() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..24, 0..6)
}

/// What `encode_header` promises to send for these arguments, as the reader
/// should report it.
fn expected(
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    tlvs: &[(u8, Vec<u8>)],
) -> ProxyHeader {
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (source, destination) = match source {
        None => (None, None),
        Some(src) => {
            let dst = destination.unwrap_or(match src {
                SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
                SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
            });
            if src.is_ipv4() == dst.is_ipv4() {
                (Some(src), Some(dst))
            } else {
                (Some(to_v6(src)), Some(to_v6(dst)))
            }
        }
    };
    ProxyHeader {
        source,
        destination,
        tlvs: tlvs.to_vec(),
    }
}

proptest! {
    #[test]
    fn proxy_v2_round_trips(
        source in prop::option::of(socket_addr()),
        destination in prop::option::of(socket_addr()),
        tlvs in tlvs(),
        sizes in pieces(),
        payload in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let header = encode_header(source, destination, &tlvs).expect("encodes");
        let mut input = header.clone();
        input.extend_from_slice(&payload);
        let mut reader = Pieces::new(&input, &sizes);
        let (read, extra) = runtime()
            .block_on(read_header(&mut reader, Versions::Any, DEADLINE, MAX_LEN))
            .expect("reads back");
        prop_assert_eq!(read, expected(source, destination, &tlvs));
        prop_assert!(extra.is_empty());
        prop_assert_eq!(&input[reader.pos..], &payload[..], "the payload stays in the stream");
    }

    #[test]
    fn proxy_v2_prefixes_are_incomplete_not_invalid(
        source in prop::option::of(socket_addr()),
        destination in prop::option::of(socket_addr()),
        tlvs in tlvs(),
        sizes in pieces(),
        open_cut in any::<prop::sample::Index>(),
    ) {
        let header = encode_header(source, destination, &tlvs).expect("encodes");
        let rt = runtime();
        for cut in 0..header.len() {
            let mut reader = Pieces::new(&header[..cut], &sizes);
            let err = rt
                .block_on(read_header(&mut reader, Versions::Any, DEADLINE, MAX_LEN))
                .expect_err("a strict prefix is not a header");
            // Nothing yet: the shortest header of either version (v1's).
            let want = match cut {
                0 => 15,
                1..16 => 16,
                _ => header.len(),
            };
            prop_assert!(
                matches!(err, ProxyError::Truncated { got, expected } if got == cut && expected == want),
                "prefix of {} of {} bytes: {:?}", cut, header.len(), err
            );
        }
        // The same prefix on a stream that stays open: still waiting when
        // the deadline comes, never refused.
        let cut = open_cut.index(header.len());
        let mut reader = Pieces::new(&header[..cut], &sizes);
        reader.stay_open = true;
        let err = rt
            .block_on(read_header(&mut reader, Versions::Any, Duration::from_millis(2), MAX_LEN))
            .expect_err("a strict prefix is not a header");
        prop_assert!(matches!(err, ProxyError::Timeout(_)), "open prefix of {}: {:?}", cut, err);
    }

    #[test]
    fn proxy_v1_round_trips(
        (line, want) in v1_line(),
        versions in prop_oneof![Just(Versions::Any), Just(Versions::V1)],
        sizes in pieces(),
        payload in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut input = line.clone().into_bytes();
        input.extend_from_slice(&payload);
        let mut reader = Pieces::new(&input, &sizes);
        let (read, extra) = runtime()
            .block_on(read_header(&mut reader, versions, DEADLINE, MAX_LEN))
            .map_err(|e| TestCaseError::fail(format!("{line:?}: {e}")))?;
        prop_assert_eq!(read, want, "{:?}", line);
        prop_assert!(extra.is_empty());
        prop_assert_eq!(&input[reader.pos..], &payload[..], "the payload stays in the stream");
    }

    #[test]
    fn proxy_v1_prefixes_are_incomplete_not_invalid(
        (line, _) in v1_line(),
        sizes in pieces(),
        open_cut in any::<prop::sample::Index>(),
    ) {
        let rt = runtime();
        for cut in 0..line.len() {
            let mut reader = Pieces::new(&line.as_bytes()[..cut], &sizes);
            let err = rt
                .block_on(read_header(&mut reader, Versions::Any, DEADLINE, MAX_LEN))
                .expect_err("a strict prefix is not a header");
            prop_assert!(
                matches!(err, ProxyError::Truncated { got, expected }
                    if got == cut && expected > cut.max(14) && expected <= line.len()),
                "prefix of {} of {:?}: {:?}", cut, line, err
            );
        }
        let cut = open_cut.index(line.len());
        let mut reader = Pieces::new(&line.as_bytes()[..cut], &sizes);
        reader.stay_open = true;
        let err = rt
            .block_on(read_header(&mut reader, Versions::Any, Duration::from_millis(2), MAX_LEN))
            .expect_err("a strict prefix is not a header");
        prop_assert!(matches!(err, ProxyError::Timeout(_)), "open prefix of {}: {:?}", cut, err);
    }
}

proptest! {
    #[test]
    fn proxy_v1_outcome_does_not_depend_on_the_split(
        (line, _) in v1_line(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), prop::sample::select(&b" \r\n.:0159afPX\x00\xff"[..])),
            1..4,
        ),
        cut in any::<prop::sample::Index>(),
        sizes in pieces(),
    ) {
        // A valid line with a few bytes overwritten, maybe cut short, and
        // a payload: whatever the verdict, it must be the same whether the
        // bytes come at once or in pieces (the reader checks each prefix).
        let mut input = line.into_bytes();
        for (at, byte) in edits {
            let at = at.index(input.len());
            input[at] = byte;
        }
        input.truncate(cut.index(input.len() + 1).max(1));
        input.extend_from_slice(b"payload");
        let rt = runtime();
        let verdict = |sizes: &[usize]| {
            let mut reader = Pieces::new(&input, sizes);
            let result = rt.block_on(read_header(&mut reader, Versions::Any, DEADLINE, MAX_LEN));
            match result {
                Ok((header, extra)) => format!("Ok({header:?}, {extra:?}, at {})", reader.pos),
                Err(ProxyError::Malformed(_)) => "Malformed".to_string(),
                Err(ProxyError::Unexpected { .. }) => "Unexpected".to_string(),
                Err(e) => format!("{e:?}"),
            }
        };
        prop_assert_eq!(verdict(&sizes), verdict(&[]), "{:?}", String::from_utf8_lossy(&input));
    }
}

/// A valid v1 line (TCP4, TCP6, or UNKNOWN with or without some text after
/// it, at most 107 bytes) and the header it says.
fn v1_line() -> impl Strategy<Value = (String, ProxyHeader)> {
    let ports = (any::<u16>(), any::<u16>());
    let tcp4 = (any::<[u8; 4]>(), any::<[u8; 4]>(), ports).prop_map(|(s, d, (sp, dp))| {
        let (s, d) = (Ipv4Addr::from(s), Ipv4Addr::from(d));
        (
            format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n"),
            (SocketAddr::from((s, sp)), SocketAddr::from((d, dp))),
        )
    });
    let tcp6 = (any::<[u8; 16]>(), any::<[u8; 16]>(), ports).prop_map(|(s, d, (sp, dp))| {
        let (s, d) = (Ipv6Addr::from(s), Ipv6Addr::from(d));
        (
            format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n"),
            (SocketAddr::from((s, sp)), SocketAddr::from((d, dp))),
        )
    });
    let with_addresses = prop_oneof![tcp4, tcp6].prop_map(|(line, (s, d))| {
        let header = ProxyHeader {
            source: Some(s),
            destination: Some(d),
            tlvs: Vec::new(),
        };
        (line, header)
    });
    let unknown = prop::option::of("[ -~]{0,91}").prop_map(|tail| {
        let line = match tail {
            None => "PROXY UNKNOWN\r\n".to_string(),
            Some(tail) => format!("PROXY UNKNOWN {tail}\r\n"),
        };
        let header = ProxyHeader {
            source: None,
            destination: None,
            tlvs: Vec::new(),
        };
        (line, header)
    });
    prop_oneof![with_addresses, unknown]
}

/// Bytes that compress a little and a lot: runs of one byte between random
/// ones.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (any::<u8>(), 0usize..3000).prop_map(|(b, n)| vec![b; n]),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

/// One GET with `Accept-Encoding: gzip` through `http::serve` to an
/// in-memory upstream that sends `data` as text/plain in pieces of `sizes`
/// (chunked), or in one piece with a Content-Length when `sizes` is empty.
/// Returns the response's Content-Encoding, its body, and what `serve`
/// counted.
async fn through_gzip(
    data: Vec<u8>,
    sizes: Vec<usize>,
    level: u32,
) -> (Option<HeaderValue>, Bytes, http::ConnStats) {
    let data = Bytes::from(data);
    let upstream = move || {
        let (data, sizes) = (data.clone(), sizes.clone());
        async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let (data, sizes) = (data.clone(), sizes.clone());
                    async move {
                        let mut frames = Vec::new();
                        let mut at = 0;
                        for &size in sizes.iter().cycle() {
                            if at == data.len() {
                                break;
                            }
                            let end = data.len().min(at + size);
                            frames.push(Ok::<_, Infallible>(Frame::data(data.slice(at..end))));
                            at = end;
                        }
                        if sizes.is_empty() {
                            frames.push(Ok(Frame::data(data)));
                        }
                        let mut resp =
                            Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                        resp.headers_mut()
                            .insert("content-type", HeaderValue::from_static("text/plain"));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(theirs), service)
                    .await;
            });
            Ok::<_, io::Error>(ours)
        }
    };
    let settings = Arc::new(HttpSettings {
        compression: Some(Compression {
            level,
            min_size: 0,
            types: vec!["text/plain".into()],
        }),
        header_read_timeout: DEADLINE,
        max_header_size: 16 * 1024,
        server_timeout: DEADLINE,
        client_timeout: DEADLINE,
        http2: Default::default(),
        tunnel: Default::default(),
        listener: Arc::from("-"),
        generation: 0,
        http1: Default::default(),
        parked: Default::default(),
    });
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (_drain, draining) = watch::channel(false);
    let serve = tokio::spawn(http::serve(
        server_io,
        upstream,
        settings,
        http::Downstream::http1(None),
        draining,
    ));

    let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .expect("client handshake");
    let conn = tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "proxy.test")
        .header(ACCEPT_ENCODING, "gzip")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = client.send_request(req).await.expect("a response");
    let encoding = resp.headers().get(CONTENT_ENCODING).cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the whole body")
        .to_bytes();
    drop(client);
    let _ = conn.await;
    let stats = serve.await.expect("serve task").expect("serve ends well");
    (encoding, body, stats)
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gzip_over_any_chunking_gunzips_to_the_input(
        data in body(),
        sizes in prop::collection::vec(1usize..5000, 0..6),
        level in 1u32..=9,
    ) {
        let (encoding, body, stats) =
            runtime().block_on(through_gzip(data.clone(), sizes, level));
        prop_assert_eq!(encoding, Some(HeaderValue::from_static("gzip")));
        prop_assert_eq!(gunzip(&body), data.clone());
        prop_assert_eq!(stats.compressed_responses, 1);
        prop_assert_eq!(stats.body_bytes_before, data.len() as u64);
        prop_assert_eq!(stats.body_bytes_after, body.len() as u64);
    }
}

/// Optional whitespace as a sender might put it.
fn ows() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", " ", "\t", "  "])
}

/// A `q` value: valid per RFC 9110, or malformed (the proxy refuses every
/// malformed one, as the model does).
fn qvalue() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("1.".to_string()),
        Just("0.".to_string()),
        "1\\.0{1,3}",
        "0\\.[0-9]{1,3}",
        prop::sample::select(vec![
            "2", "abc", "", "-1", "1.5", "0.5x", "1.001", "q", "0,5", ".5", "1e0", "+0.5",
            "0.0001", "1.0000", "-0"
        ])
        .prop_map(str::to_string),
    ]
}

/// One list element: a coding and parameters.
fn element() -> impl Strategy<Value = String> {
    let coding = prop::sample::select(vec![
        "gzip", "GZIP", "Gzip", "x-gzip", "X-GZIP", "*", "identity", "br", "deflate", "gzipx",
        "x-gzip2", "", "**",
    ]);
    let param = prop_oneof![
        (
            ows(),
            prop::sample::select(vec!["q", "Q"]),
            ows(),
            ows(),
            qvalue()
        )
            .prop_map(|(a, q, b, c, v)| format!("{a};{a}{q}{b}={c}{v}")),
        prop::sample::select(vec![";level=1", "; foo", ";charset=x", ";"]).prop_map(str::to_string),
    ];
    (ows(), coding, prop::collection::vec(param, 0..3), ows())
        .prop_map(|(a, c, params, b)| format!("{a}{c}{}{b}", params.concat()))
}

/// One field line: elements, or now and then anything printable.
fn field_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(element(), 0..4).prop_map(|e| e.join(",")),
        1 => "[ -~\t]{0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn accept_encoding_matches_the_model(lines in prop::collection::vec(field_line(), 0..4)) {
        let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        let mut headers = HeaderMap::new();
        for line in &lines {
            headers.append(ACCEPT_ENCODING, HeaderValue::from_bytes(line).unwrap());
        }
        prop_assert_eq!(
            accepts_gzip(&headers),
            model::accepts_gzip(&lines),
            "Accept-Encoding {:?}", lines
        );
    }
}
