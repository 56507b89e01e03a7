//! Header rules of the HTTP mode: hop-by-hop headers, X-Forwarded-For,
//! and when a response is worth gzip (RFC 9110 content negotiation).

use std::net::SocketAddr;

use hyper::{
    HeaderMap, StatusCode,
    header::{self, HeaderName, HeaderValue},
};

use super::Compression;

/// Comma-separated tokens of every value of a header (values that are not
/// visible ASCII are skipped).
pub(super) fn tokens<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The headers that concern one connection only (RFC 9110 7.6.1), with
/// the ones older peers still send.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Drops the headers that concern one connection only, including the ones
/// the Connection header names.
///
/// One pass over the names finds which are there: most messages carry
/// none, or only `Connection: keep-alive`, and a lookup per absent name
/// cost about 1.5% of a small request's CPU.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // Names the Connection header lists, other than the fixed ones.
        // Nearly always that is `close` alone, or nothing: removed by its
        // static name, it costs no allocation (a listed name made into a
        // `HeaderName` was two per `Connection: close` message).
        let mut close = false;
        let mut others = false;
        for t in tokens(headers, &header::CONNECTION) {
            if t.eq_ignore_ascii_case("close") {
                close = true;
            } else if !HOP_BY_HOP
                .iter()
                .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            {
                others = true;
            }
        }
        if close {
            headers.remove("close");
        }
        if others {
            let listed: Vec<HeaderName> = tokens(headers, &header::CONNECTION)
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .filter(|n| !HOP_BY_HOP.contains(n))
                .collect();
            for name in listed {
                headers.remove(name);
            }
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// The client's address as an X-Forwarded-For element, written once per
/// connection and kept inline: as a `HeaderValue` it would be a heap copy,
/// plus the shared buffer its first clone makes, held by every idle
/// keep-alive connection (64 bytes).
pub(super) struct ForwardedFor {
    len: u8,
    text: [u8; Self::MAX],
}

impl ForwardedFor {
    /// The longest text of an IP address (INET6_ADDRSTRLEN without the NUL:
    /// eight groups, the last two as a dotted quad).
    const MAX: usize = 45;

    pub fn new(addr: SocketAddr) -> Self {
        use std::io::Write as _;
        let mut text = [0; Self::MAX];
        let mut rest = &mut text[..];
        write!(rest, "{}", addr.ip().to_canonical()).expect("an IP address fits in 45 bytes");
        let len = (Self::MAX - rest.len()) as u8;
        Self { len, text }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

/// Appends the client (`ip`) to X-Forwarded-For, folding earlier lines into
/// one.
pub(super) fn set_forwarded_for(headers: &mut HeaderMap, ip: &ForwardedFor) {
    let name = HeaderName::from_static("x-forwarded-for");
    let mut value = Vec::new();
    for existing in headers.get_all(&name) {
        let existing = existing.as_bytes().trim_ascii();
        if !existing.is_empty() {
            value.extend_from_slice(existing);
            value.extend_from_slice(b", ");
        }
    }
    if value.is_empty() {
        // The usual case: no earlier proxy.
        if let Ok(value) = HeaderValue::from_bytes(ip.as_bytes()) {
            headers.insert(name, value);
        }
        return;
    }
    value.extend_from_slice(ip.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(name, value);
    }
}

/// Whether the client's Accept-Encoding lets us send gzip: an explicit
/// `gzip`/`x-gzip` decides by its q-value, else a `*` with q > 0 does; no
/// header means identity only.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip_q: Option<f32> = None;
    let mut star_q: Option<f32> = None;
    for item in tokens(headers, &header::ACCEPT_ENCODING) {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or_default().trim();
        // A malformed q-value voids its element, as RFC 9110 asks.
        let Some(q) = q_value(params) else { continue };
        let slot = if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut gzip_q
        } else if coding == "*" {
            &mut star_q
        } else {
            continue;
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match gzip_q {
        Some(q) => q > 0.0,
        None => star_q.is_some_and(|q| q > 0.0),
    }
}

pub(super) fn q_value<'a>(params: impl Iterator<Item = &'a str>) -> Option<f32> {
    let mut q = 1.0;
    for param in params {
        if let Some((name, value)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("q")
        {
            q = qvalue(value.trim())?;
        }
    }
    Some(q)
}

/// RFC 9110's `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`,
/// nothing more lenient (no `.5`, `1e0`, `+0.5`).
fn qvalue(v: &str) -> Option<f32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match int {
        "0" => format!("0.{frac}0").parse().ok(),
        "1" if frac.bytes().all(|b| b == b'0') => Some(1.0),
        _ => None,
    }
}

/// Whether the response may be gzipped, leaving the client's choice aside:
/// when this holds the response varies by Accept-Encoding.
pub(super) fn compressible(c: &Compression, status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        return false;
    }
    if status == StatusCode::NOT_MODIFIED {
        return false;
    }
    // Byte ranges count in the identity encoding: a gzipped part would be wrong.
    if status == StatusCode::PARTIAL_CONTENT || headers.contains_key(header::CONTENT_RANGE) {
        return false;
    }
    if tokens(headers, &header::CONTENT_ENCODING).any(|t| !t.eq_ignore_ascii_case("identity")) {
        return false;
    }
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    let Some(media_type) = media_type else {
        return false;
    };
    if !c
        .types
        .iter()
        .any(|t| t.trim().eq_ignore_ascii_case(media_type))
    {
        return false;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if length.is_some_and(|len| len < c.min_size) {
        return false;
    }
    !tokens(headers, &header::CACHE_CONTROL).any(|t| {
        let name = t.split('=').next().unwrap_or_default().trim();
        name.eq_ignore_ascii_case("no-transform")
    })
}

/// Adds `Accept-Encoding` to Vary unless it is already there or Vary is `*`.
pub(super) fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let mut listed = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            // Unreadable value: keep it as it is and add ours beside it.
            headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            return;
        };
        for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t == "*" || t.eq_ignore_ascii_case("accept-encoding") {
                return;
            }
            listed.push(t);
        }
    }
    listed.push("Accept-Encoding");
    if let Ok(value) = HeaderValue::from_str(&listed.join(", ")) {
        headers.insert(header::VARY, value);
    }
}

/// Headers of a response about to be gzipped.
pub(super) fn mark_gzipped(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    // The length is unknown until the end: hyper sends it chunked.
    headers.remove(header::CONTENT_LENGTH);
    // Ranges of the gzipped bytes are not what the upstream would serve.
    headers.remove(header::ACCEPT_RANGES);
    // The gzipped bytes differ from the upstream's: a strong validator no
    // longer holds for them.
    if let Some(etag) = headers.get(header::ETAG)
        && etag.as_bytes().starts_with(b"\"")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(weak) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, weak);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_names_go_with_or_without_connection() {
        let mut all = map(&[
            ("connection", "close, X-Secret, keep-alive"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("close", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut all);
        assert_eq!(names(&all), ["x-kept"]);

        // No Connection header: the fixed names still go.
        let mut fixed = map(&[("te", "trailers"), ("upgrade", "h2c"), ("host", "a")]);
        strip_hop_by_hop(&mut fixed);
        assert_eq!(names(&fixed), ["host"]);

        // Only `close` listed (the common case): a header of that name
        // goes, the others stay.
        let mut close = map(&[("connection", "Close"), ("close", "1"), ("x-kept", "1")]);
        strip_hop_by_hop(&mut close);
        assert_eq!(names(&close), ["x-kept"]);

        // Nothing to drop: untouched, every value kept.
        let mut plain = map(&[("host", "a"), ("x-kept", "1"), ("x-kept", "2")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(names(&plain), ["host", "x-kept"]);
        assert_eq!(plain.get_all("x-kept").iter().count(), 2);
    }

    #[test]
    fn forwarded_for_is_the_canonical_ip_appended_to_earlier_ones() {
        fn xff(headers: &HeaderMap) -> Vec<&str> {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        }
        let cases = [
            ("192.0.2.7:80", "192.0.2.7"),
            // A v4-mapped client is written as IPv4.
            ("[::ffff:192.0.2.7]:80", "192.0.2.7"),
            // The longest IPv6 text there is.
            (
                "[1111:2222:3333:4444:5555:6666:7777:8888]:80",
                "1111:2222:3333:4444:5555:6666:7777:8888",
            ),
            ("[::1]:80", "::1"),
        ];
        for (addr, text) in cases {
            let ip = ForwardedFor::new(addr.parse().unwrap());
            let mut fresh = HeaderMap::new();
            set_forwarded_for(&mut fresh, &ip);
            assert_eq!(xff(&fresh), [text], "{addr}");

            let mut earlier = map(&[
                ("x-forwarded-for", "203.0.113.1"),
                ("x-forwarded-for", " 198.51.100.2 "),
            ]);
            set_forwarded_for(&mut earlier, &ip);
            let folded = format!("203.0.113.1, 198.51.100.2, {text}");
            assert_eq!(xff(&earlier), [folded.as_str()], "{addr}");
        }
    }
}
