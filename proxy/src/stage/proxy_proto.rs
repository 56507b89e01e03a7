//! PROXY protocol (HAProxy's header that carries the client's addresses
//! through a proxy): reading the header a load balancer in front of us
//! sends, and writing one for a backend behind us.
//!
//! Both versions are read, as HAProxy's `accept-proxy` reads them: the v1
//! text line (`PROXY TCP4 192.0.2.1 198.51.100.1 51234 443\r\n`, which
//! nginx's `proxy_protocol on` and HAProxy's `send-proxy` send) and the
//! binary v2 header (HAProxy's `send-proxy-v2`, and our own chained stages,
//! whose TLVs only v2 can carry). Their first byte tells them apart, and a
//! listener may take only one of them ([`Versions`]). Anything else is
//! refused, never taken as "no header": a listener configured for PROXY
//! must not guess what it is reading. Only v2 is written.
//!
//! Parsing is done by the `ppp` crate; this module decides how much to read
//! (never a byte of the payload after the header), how long to wait, and
//! what to make of the result.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ppp::{
    v1,
    v2::{self, Addresses, Command, ParseError, Protocol, Version},
};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::AcceptProxy;

/// Length of the fixed part of a v2 header: 12-byte signature, version and
/// command, family and transport, 2-byte length of what follows.
const FIXED_LEN: usize = 16;

/// Bytes that start every v2 header.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Bytes that start every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// The shortest v1 header, `PROXY UNKNOWN\r\n`. A v2 header is longer, so
/// this many bytes can be read before the version is known without taking
/// payload bytes of either.
const V1_MIN_LEN: usize = 15;

/// The longest v1 header, `\r\n` included (spec section 2.1).
const V1_MAX_LEN: usize = 107;

/// Largest value one TLV can carry: its length field is 16 bits.
const MAX_TLV_VALUE: usize = u16::MAX as usize;

/// TLV type codes from the PROXY protocol specification (section 2.2).
pub mod tlv {
    /// Application-Layer Protocol Negotiation result (e.g. `h2`).
    pub const ALPN: u8 = 0x01;
    /// Host name the client asked for (TLS SNI or HTTP Host).
    pub const AUTHORITY: u8 = 0x02;
    /// CRC32c checksum of the whole header.
    pub const CRC32C: u8 = 0x03;
    /// Padding, to be ignored.
    pub const NOOP: u8 = 0x04;
    /// Opaque connection identifier.
    pub const UNIQUE_ID: u8 = 0x05;
    /// TLS information: client flags, verify result, then sub-TLVs below.
    pub const SSL: u8 = 0x20;
    /// Sub-TLV of [`SSL`]: protocol version, e.g. `TLSv1.3`.
    pub const SSL_VERSION: u8 = 0x21;
    /// Sub-TLV of [`SSL`]: client certificate's common name.
    pub const SSL_CN: u8 = 0x22;
    /// Sub-TLV of [`SSL`]: cipher suite name.
    pub const SSL_CIPHER: u8 = 0x23;
    /// Sub-TLV of [`SSL`]: certificate signature algorithm.
    pub const SSL_SIG_ALG: u8 = 0x24;
    /// Sub-TLV of [`SSL`]: certificate key algorithm.
    pub const SSL_KEY_ALG: u8 = 0x25;
    /// Network namespace name.
    pub const NETNS: u8 = 0x30;
    /// Custom (0xE0..=0xEF is reserved for applications): the generation
    /// number of the stage that sent the header, 8 bytes big-endian. A stage
    /// of a newer generation that receives it knows the connection belongs
    /// to a draining chain.
    pub const PROXY_GENERATION: u8 = 0xE0;

    /// [`SSL`] client flag: the client connected over TLS.
    pub const CLIENT_SSL: u8 = 0x01;
    /// [`SSL`] client flag: the client sent a certificate on this connection.
    pub const CLIENT_CERT_CONN: u8 = 0x02;
    /// [`SSL`] client flag: the client sent a certificate in this session.
    pub const CLIENT_CERT_SESS: u8 = 0x04;
}

/// Which PROXY protocol versions a listener takes (`accept_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// v1 or v2, told apart by their first byte (`accept_proxy = true`,
    /// HAProxy's `accept-proxy`).
    Any,
    /// Only the v1 text line (`accept_proxy = "v1"`).
    V1,
    /// Only the binary v2 header (`accept_proxy = "v2"`).
    V2,
}

impl Versions {
    /// What a listener configured with `accept` takes; None: no header.
    pub fn of(accept: AcceptProxy) -> Option<Self> {
        match accept {
            AcceptProxy::Off => None,
            AcceptProxy::Any => Some(Self::Any),
            AcceptProxy::V1 => Some(Self::V1),
            AcceptProxy::V2 => Some(Self::V2),
        }
    }

    fn takes_v1(self) -> bool {
        self != Self::V2
    }

    fn takes_v2(self) -> bool {
        self != Self::V1
    }

    /// Who sends such headers, for the error an operator reads.
    fn senders(self) -> &'static str {
        match self {
            Self::Any => {
                "v1: nginx `proxy_protocol on`, HAProxy `send-proxy`; \
                 v2: HAProxy `send-proxy-v2`, our `send_proxy_v2`"
            }
            Self::V1 => "nginx `proxy_protocol on`, HAProxy `send-proxy`",
            Self::V2 => {
                "HAProxy `send-proxy-v2`, our `send_proxy_v2`; nginx sends v1, \
                 which `accept_proxy = true` takes"
            }
        }
    }
}

impl fmt::Display for Versions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Any => "v1 or v2",
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// What a PROXY header said about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client; `None` for a LOCAL header (a health check from the
    /// balancer itself), a v1 `UNKNOWN` line and for address families that
    /// carry no IP (UNSPEC, UNIX), in which case the socket's own peer
    /// address is the one to use.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
    /// Type-length-value extensions in the order they came, see [`tlv`]
    /// (v2 only: a v1 line has none).
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// Why no PROXY header could be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are not the signature of a version the listener
    /// takes: another protocol, or the other PROXY version.
    #[error(
        "expected a PROXY protocol {accepted} header, got {seen}; the peer must send \
         one before any data ({}), or accept_proxy must be turned off for this listener",
        .accepted.senders()
    )]
    Unexpected { seen: String, accepted: Versions },
    /// A header of the right version, but broken.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error(
        "PROXY header payload of {len} bytes is over the limit of {max} bytes; \
         raise the limit if the sender really adds that many TLVs"
    )]
    TooLarge { len: usize, max: usize },
    #[error(
        "no complete PROXY header within {0:?}; the peer is too slow or does not \
         speak PROXY protocol"
    )]
    Timeout(Duration),
    #[error(
        "connection closed after {got} bytes of a PROXY header of at least {expected} \
         bytes; the peer gave up or does not speak PROXY protocol"
    )]
    Truncated { got: usize, expected: usize },
    #[error("reading the PROXY header failed: {0}")]
    Io(#[source] io::Error),
}

/// Reads one PROXY header of `versions` from the start of `io`, within
/// `deadline` in total, refusing v2 headers whose address-and-TLV part is
/// over `max_len` bytes (a v1 line has at most 107 bytes anyway).
///
/// Exactly the header's bytes are consumed, never any payload after it, so the
/// returned `Vec` (bytes read past the header, to replay before the stream) is
/// always empty; it is there so that callers do not depend on that.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    versions: Versions,
    deadline: Duration,
    max_len: usize,
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    match tokio::time::timeout(deadline, read_header_inner(io, versions, max_len)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(deadline)),
    }
}

async fn read_header_inner<S: AsyncRead + Unpin>(
    io: &mut S,
    versions: Versions,
    max_len: usize,
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    // Until the first byte says which version this is, read no more than the
    // shortest header the listener takes; one read, so that a peer sending
    // something else (TLS, HTTP) is refused as soon as it is seen.
    let first = if versions.takes_v1() {
        V1_MIN_LEN
    } else {
        FIXED_LEN
    };
    let mut head = [0u8; FIXED_LEN];
    let got = io.read(&mut head[..first]).await.map_err(ProxyError::Io)?;
    if got == 0 {
        return Err(ProxyError::Truncated {
            got,
            expected: first,
        });
    }
    if head[0] == SIGNATURE[0] && versions.takes_v2() {
        read_v2(io, versions, head, got, max_len).await
    } else if head[0] == V1_PREFIX[0] && versions.takes_v1() {
        read_v1(io, versions, &head[..got]).await
    } else {
        Err(unexpected(&head[..got], versions))
    }
}

/// The rest of a v2 header whose first `got` bytes are in `fixed`.
async fn read_v2<S: AsyncRead + Unpin>(
    io: &mut S,
    versions: Versions,
    mut fixed: [u8; FIXED_LEN],
    mut got: usize,
    max_len: usize,
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    check_signature(&fixed[..got], versions)?;
    // Piecewise again: a peer whose bytes stop matching the signature is
    // refused then, not after 16 bytes it may never send.
    while got < FIXED_LEN {
        let n = io.read(&mut fixed[got..]).await.map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Truncated {
                got,
                expected: FIXED_LEN,
            });
        }
        got += n;
        check_signature(&fixed[..got], versions)?;
    }

    // Let ppp judge version, command, family and transport now, before waiting
    // for a payload that a header with a bad version byte would never justify.
    match v2::Header::try_from(&fixed[..]) {
        Ok(_) | Err(ParseError::Partial(..)) => {}
        Err(err) => return Err(malformed(&err)),
    }

    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > max_len {
        return Err(ProxyError::TooLarge { len, max: max_len });
    }

    let mut bytes = Vec::with_capacity(FIXED_LEN + len);
    bytes.extend_from_slice(&fixed);
    bytes.resize(FIXED_LEN + len, 0);
    let mut filled = FIXED_LEN;
    while filled < bytes.len() {
        let n = io
            .read(&mut bytes[filled..])
            .await
            .map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Truncated {
                got: filled,
                expected: FIXED_LEN + len,
            });
        }
        filled += n;
    }

    let header = v2::Header::try_from(&bytes[..]).map_err(|e| malformed(&e))?;
    Ok((to_proxy_header(&header)?, Vec::new()))
}

/// The rest of a v1 line that starts with `first`.
///
/// The line ends at its `\r\n`, which a read must not go past: each read
/// asks for no more than the shortest header that can still follow what was
/// seen ([`v1_min_len`]), so a few reads instead of one per byte, and the
/// payload stays in the stream.
async fn read_v1<S: AsyncRead + Unpin>(
    io: &mut S,
    versions: Versions,
    first: &[u8],
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    let mut line = [0u8; V1_MAX_LEN];
    line[..first.len()].copy_from_slice(first);
    let mut got = first.len();
    let end = loop {
        if let Some(lf) = line[..got].iter().position(|&b| b == b'\n') {
            // The same checks as every shorter prefix had, so that how the
            // bytes were split cannot change the outcome.
            v1_min_len(&line[..lf], versions)?;
            if line[lf - 1] != b'\r' {
                let seen = quote(&line[..=lf]);
                return Err(ProxyError::Malformed(format!(
                    "v1 {seen}: \\n without the \\r before it"
                )));
            }
            break lf + 1;
        }
        let min_len = v1_min_len(&line[..got], versions)?;
        let n = io
            .read(&mut line[got..min_len])
            .await
            .map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Truncated {
                got,
                expected: min_len,
            });
        }
        got += n;
    };
    let text = &line[..end];
    // Empty: no read went past the shortest header that could follow.
    let extra = line[end..got].to_vec();
    // The spec lets an UNKNOWN line carry anything up to its `\r\n`, but
    // ppp 2.3 refuses more than four words after UNKNOWN: recognised here.
    // Like a v2 LOCAL header, it keeps the socket's own addresses.
    if text
        .strip_prefix(b"PROXY UNKNOWN")
        .is_some_and(|rest| rest.starts_with(b" ") || rest.starts_with(b"\r"))
    {
        let header = ProxyHeader {
            source: None,
            destination: None,
            tlvs: Vec::new(),
        };
        return Ok((header, extra));
    }
    let header = v1::Header::try_from(text)
        .map_err(|e| ProxyError::Malformed(format!("v1 {}: {e}", quote(text))))?;
    let (source, destination) = match header.addresses {
        v1::Addresses::Tcp4(a) => (
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
        ),
        v1::Addresses::Tcp6(a) => (
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
        ),
        v1::Addresses::Unknown => (None, None),
    };
    let header = ProxyHeader {
        source,
        destination,
        tlvs: Vec::new(),
    };
    Ok((header, extra))
}

/// The length of the shortest v1 header that starts with `seen` (which has
/// no `\n` yet), or why no v1 header does, as soon as that shows: a sender
/// of something else is refused without waiting for its `\r\n`.
fn v1_min_len(seen: &[u8], versions: Versions) -> Result<usize, ProxyError> {
    let refuse = |why: &str| ProxyError::Malformed(format!("v1 {}: {why}", quote(seen)));
    let n = seen.len().min(V1_PREFIX.len());
    if seen[..n] != V1_PREFIX[..n] {
        return Err(unexpected(seen, versions));
    }
    if let Some(b) = seen
        .iter()
        .find(|&&b| !(b.is_ascii_graphic() || b == b' ' || b == b'\r'))
    {
        return Err(refuse(&format!("byte {b:#04x} where text was expected")));
    }
    let min_len = match seen.iter().position(|&b| b == b'\r') {
        // Only the `\n` can follow, and only after complete fields.
        Some(cr) if cr + 1 == seen.len() => {
            if v1_min_len(&seen[..cr], versions)? != cr + 2 {
                return Err(refuse("\\r\\n before the fields are complete"));
            }
            seen.len() + 1
        }
        Some(_) => return Err(refuse("\\r not followed by \\n")),
        None if seen.len() <= V1_PREFIX.len() => V1_MIN_LEN,
        None => v1_min_len_of_fields(seen, &seen[V1_PREFIX.len()..]).map_err(refuse)?,
    };
    if min_len > V1_MAX_LEN {
        return Err(refuse(
            "no \\r\\n within 107 bytes, the most a v1 header may have",
        ));
    }
    Ok(min_len)
}

/// [`v1_min_len`] once `seen` is past `PROXY ` (`fields` is the rest) and
/// has no `\r`: what the protocol and the address fields still need.
fn v1_min_len_of_fields(seen: &[u8], fields: &[u8]) -> Result<usize, &'static str> {
    const BAD_PROTOCOL: &str = "the protocol must be TCP4, TCP6 or UNKNOWN";
    let mut fields = fields.split(|&b| b == b' ');
    let protocol = fields.next().unwrap_or_default();
    // What came after the protocol: the last one may still be arriving.
    let fields: Vec<&[u8]> = fields.collect();
    if fields.is_empty() {
        // The protocol itself is arriving: the shortest of those it can be.
        return [
            (&b"UNKNOWN"[..], V1_MIN_LEN),
            (b"TCP6", "PROXY TCP6 :: :: 0 0\r\n".len()),
            (b"TCP4", "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".len()),
        ]
        .into_iter()
        .filter(|(name, _)| name.starts_with(protocol))
        .map(|(_, len)| len)
        .min()
        .ok_or(BAD_PROTOCOL);
    }
    // The shortest source address, destination address and ports.
    let shortest: [usize; 4] = match protocol {
        // Anything up to the `\r\n`.
        b"UNKNOWN" => return Ok(seen.len() + 2),
        b"TCP4" => [7, 7, 1, 1],
        b"TCP6" => [2, 2, 1, 1],
        _ => return Err(BAD_PROTOCOL),
    };
    if fields.len() > shortest.len() {
        return Err("more than 4 fields after the protocol");
    }
    let current = fields.len() - 1;
    if (0..current).any(|i| fields[i].len() < shortest[i]) {
        return Err("a field too short for an address or a port");
    }
    let mut rest = shortest[current].saturating_sub(fields[current].len());
    rest += shortest[current + 1..].iter().map(|s| 1 + s).sum::<usize>();
    Ok(seen.len() + rest + 2)
}

/// Refuses `seen` unless it is a prefix of the v2 signature.
fn check_signature(seen: &[u8], versions: Versions) -> Result<(), ProxyError> {
    let n = seen.len().min(SIGNATURE.len());
    if seen[..n] == SIGNATURE[..n] {
        return Ok(());
    }
    Err(unexpected(seen, versions))
}

/// The error for first bytes that are no header `versions` allows, saying
/// what they look like instead, since that is what an operator needs to fix
/// the peer.
fn unexpected(seen: &[u8], accepted: Versions) -> ProxyError {
    let seen = if seen.starts_with(b"PROXY") {
        format!("a PROXY protocol v1 text header ({})", describe(seen))
    } else if seen.starts_with(SIGNATURE) {
        "a PROXY protocol v2 header".to_string()
    } else if seen.first() == Some(&0x16) {
        format!("a TLS handshake ({})", describe(seen))
    } else {
        describe(seen)
    };
    ProxyError::Unexpected { seen, accepted }
}

/// Shows the first bytes of unexpected input as text when printable, else hex.
fn describe(seen: &[u8]) -> String {
    let head = &seen[..seen.len().min(12)];
    if head
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\r' || *b == b'\n')
    {
        format!("text {:?}", String::from_utf8_lossy(head))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// A v1 line (at most 107 bytes, checked to be text) as a quoted string.
fn quote(line: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(line))
}

fn malformed(err: &ParseError) -> ProxyError {
    ProxyError::Malformed(format!("v2: {err}"))
}

fn to_proxy_header(header: &v2::Header<'_>) -> Result<ProxyHeader, ProxyError> {
    // The spec says a receiver must ignore the addresses of a LOCAL header.
    // Our listeners are TCP: a UDP (DGRAM) header describes some other
    // connection, so like HAProxy we treat it as LOCAL and keep the
    // socket's own addresses.
    let (source, destination) = match (header.command, header.addresses) {
        (Command::Local, _) => (None, None),
        (Command::Proxy, _) if header.protocol == Protocol::Datagram => (None, None),
        (Command::Proxy, Addresses::IPv4(a)) => (
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V4(a.destination_address),
                a.destination_port,
            )),
        ),
        (Command::Proxy, Addresses::IPv6(a)) => (
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            Some(SocketAddr::new(
                IpAddr::V6(a.destination_address),
                a.destination_port,
            )),
        ),
        (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => (None, None),
    };
    // Not `header.tlvs()`: for AF_UNSPEC ppp counts the whole payload as
    // addresses, while the spec (and HAProxy, which sends TLVs on LOCAL
    // health checks) has an empty address block and TLVs right after it.
    let tlv_start = FIXED_LEN + header.address_family().byte_length().unwrap_or(0);
    let tlv_bytes = header.as_bytes().get(tlv_start..).unwrap_or_default();
    let tlvs = v2::TypeLengthValues::from(tlv_bytes)
        .map(|t| t.map(|t| (t.kind, t.value.into_owned())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(&e))?;
    verify_crc32c(header.as_bytes(), tlv_start)?;
    Ok(ProxyHeader {
        source,
        destination,
        tlvs,
    })
}

/// Checks the CRC32C TLV, when the sender put one: the checksum of the whole
/// header with the TLV's own value taken as zero (spec section 2.2.1).
fn verify_crc32c(bytes: &[u8], tlv_start: usize) -> Result<(), ProxyError> {
    let mut at = tlv_start;
    while at + 3 <= bytes.len() {
        let kind = bytes[at];
        let len = usize::from(u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]));
        let value = at + 3;
        if kind == tlv::CRC32C {
            let Some(sent) = bytes.get(value..value + 4).filter(|_| len == 4) else {
                return Err(ProxyError::Malformed(format!(
                    "CRC32C TLV of {len} bytes, expected 4"
                )));
            };
            let sent = u32::from_be_bytes(sent.try_into().expect("4 bytes"));
            let mut zeroed = bytes.to_vec();
            zeroed[value..value + 4].fill(0);
            let computed = crc32c(&zeroed);
            if computed != sent {
                return Err(ProxyError::Malformed(format!(
                    "CRC32C TLV says {sent:#010x}, the header's checksum is {computed:#010x}"
                )));
            }
        }
        at = value + len;
    }
    Ok(())
}

/// CRC-32C (Castagnoli), bit by bit: headers are a few hundred bytes.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Builds a v2 header: PROXY command over TCP when `source` is given, LOCAL
/// (no addresses, `destination` ignored) when it is not.
///
/// A missing `destination` is sent as the unspecified address of the source's
/// family, port 0. When the two families differ, the IPv4 one is written as an
/// IPv4-mapped IPv6 address, since a header has room for one family only.
pub fn encode_header(
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    tlvs: &[(u8, Vec<u8>)],
) -> Result<Vec<u8>, ProxyError> {
    let mut payload_len = 0;
    for (_, value) in tlvs {
        if value.len() > MAX_TLV_VALUE {
            return Err(ProxyError::TooLarge {
                len: value.len(),
                max: MAX_TLV_VALUE,
            });
        }
        payload_len += 3 + value.len();
    }

    let builder = match source {
        None => v2::Builder::new(
            Version::Two | Command::Local,
            v2::AddressFamily::Unspecified | Protocol::Unspecified,
        ),
        Some(src) => {
            let dst = destination.unwrap_or_else(|| unspecified_like(src));
            let addresses: Addresses = match (src, dst) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
                    (src, dst).into()
                }
                _ => (to_v6(src), to_v6(dst)).into(),
            };
            payload_len += addresses.len();
            v2::Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
        }
    };
    if payload_len > MAX_TLV_VALUE {
        return Err(ProxyError::TooLarge {
            len: payload_len,
            max: MAX_TLV_VALUE,
        });
    }

    let builder = builder
        .reserve_capacity(payload_len)
        .write_payloads(tlvs.iter().map(|(kind, value)| (*kind, value.as_slice())))
        .map_err(|e| ProxyError::Malformed(format!("cannot encode TLVs: {e}")))?;
    builder
        .build()
        .map_err(|e| ProxyError::Malformed(format!("cannot encode header: {e}")))
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// The TLVs that describe a terminated TLS connection to the backend, as
/// HAProxy sends them: AUTHORITY (the SNI), ALPN, and SSL with the client flag
/// `CLIENT_SSL`, verify result 0 and the VERSION and CIPHER sub-TLVs.
///
/// Absent SNI or ALPN means no TLV of that type. A value too long for a TLV
/// (over 65535 bytes, which no real SNI, ALPN or cipher name is) is left out
/// rather than failing the connection over metadata.
pub fn tls_tlvs(
    sni: Option<&str>,
    alpn: Option<&[u8]>,
    version: &str,
    cipher: &str,
) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::with_capacity(3);
    if let Some(sni) = sni.filter(|s| s.len() <= MAX_TLV_VALUE) {
        out.push((tlv::AUTHORITY, sni.as_bytes().to_vec()));
    }
    if let Some(alpn) = alpn.filter(|a| a.len() <= MAX_TLV_VALUE) {
        out.push((tlv::ALPN, alpn.to_vec()));
    }

    // struct pp2_tlv_ssl { u8 client; u32 verify; sub-TLVs... }. Verify is 0:
    // no client certificate is asked for, which is "verified" in the spec's
    // terms (HAProxy reports X509_V_OK = 0 as well).
    let mut ssl = vec![tlv::CLIENT_SSL];
    ssl.extend_from_slice(&0u32.to_be_bytes());
    push_sub_tlv(&mut ssl, tlv::SSL_VERSION, version.as_bytes());
    push_sub_tlv(&mut ssl, tlv::SSL_CIPHER, cipher.as_bytes());
    if ssl.len() <= MAX_TLV_VALUE {
        out.push((tlv::SSL, ssl));
    }
    out
}

fn push_sub_tlv(buf: &mut Vec<u8>, kind: u8, value: &[u8]) {
    if let Ok(len) = u16::try_from(value.len()) {
        buf.push(kind);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const DEADLINE: Duration = Duration::from_secs(5);
    const MAX: usize = 4096;

    async fn decode(bytes: &[u8]) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
        let mut input = bytes;
        read_header(&mut input, Versions::Any, DEADLINE, MAX).await
    }

    #[tokio::test]
    async fn round_trip_ipv4_with_tlvs() {
        let src: SocketAddr = "192.0.2.10:51234".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let tlvs = tls_tlvs(
            Some("a.test"),
            Some(b"h2"),
            "TLSv1.3",
            "TLS13_AES_128_GCM_SHA256",
        );
        let bytes = encode_header(Some(src), Some(dst), &tlvs).unwrap();
        assert_eq!(&bytes[..12], SIGNATURE);
        assert_eq!(bytes[12], 0x21, "version 2, PROXY command");
        assert_eq!(bytes[13], 0x11, "AF_INET, STREAM");

        let (header, extra) = decode(&bytes).await.unwrap();
        assert!(extra.is_empty());
        assert_eq!(header.source, Some(src));
        assert_eq!(header.destination, Some(dst));
        assert_eq!(header.tlvs, tlvs);
    }

    #[tokio::test]
    async fn round_trip_ipv6_with_tlvs() {
        let src: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:8443".parse().unwrap();
        let tlvs = vec![(tlv::UNIQUE_ID, b"conn-42".to_vec()), (0xE0, vec![1, 2, 3])];
        let bytes = encode_header(Some(src), Some(dst), &tlvs).unwrap();
        assert_eq!(bytes[13], 0x21, "AF_INET6, STREAM");

        let (header, _) = decode(&bytes).await.unwrap();
        assert_eq!(header.source, Some(src));
        assert_eq!(header.destination, Some(dst));
        assert_eq!(header.tlvs, tlvs);
    }

    #[tokio::test]
    async fn mixed_families_become_ipv6() {
        let src: SocketAddr = "192.0.2.10:1000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let bytes = encode_header(Some(src), Some(dst), &[]).unwrap();
        let (header, _) = decode(&bytes).await.unwrap();
        assert_eq!(
            header.source,
            Some("[::ffff:192.0.2.10]:1000".parse().unwrap())
        );
        assert_eq!(header.destination, Some(dst));
    }

    #[tokio::test]
    async fn local_command() {
        let tlvs = vec![(tlv::NOOP, vec![0; 4])];
        let bytes = encode_header(None, None, &tlvs).unwrap();
        assert_eq!(bytes[12], 0x20, "version 2, LOCAL command");
        assert_eq!(bytes[13], 0x00, "AF_UNSPEC");
        let (header, _) = decode(&bytes).await.unwrap();
        assert_eq!(header.source, None);
        assert_eq!(header.destination, None);
        assert_eq!(header.tlvs, tlvs);
    }

    #[test]
    fn crc32c_check_value() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// A header with a CRC32C TLV whose value is `crc` (None: the right one).
    fn with_crc(crc: Option<u32>) -> Vec<u8> {
        let src: SocketAddr = "192.0.2.1:1234".parse().unwrap();
        let dst: SocketAddr = "198.51.100.2:443".parse().unwrap();
        let mut bytes = encode_header(Some(src), Some(dst), &[(tlv::CRC32C, vec![0; 4])]).unwrap();
        let at = bytes.len() - 4;
        let value = crc.unwrap_or_else(|| crc32c(&bytes));
        bytes[at..].copy_from_slice(&value.to_be_bytes());
        bytes
    }

    #[tokio::test]
    async fn crc32c_tlv_is_verified() {
        let (header, _) = decode(&with_crc(None)).await.unwrap();
        assert_eq!(header.source, Some("192.0.2.1:1234".parse().unwrap()));
        let good = crc32c(&with_crc(Some(0)));
        let err = decode(&with_crc(Some(good ^ 1))).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::Malformed(ref m) if m.contains("CRC32C")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn udp_families_are_taken_as_local() {
        for family in [0x12u8, 0x22] {
            let src: SocketAddr = if family == 0x12 {
                "192.0.2.1:53".parse().unwrap()
            } else {
                "[2001:db8::1]:53".parse().unwrap()
            };
            let mut bytes = encode_header(Some(src), None, &[]).unwrap();
            assert_eq!(bytes[13] & 0xF0, family & 0xF0);
            bytes[13] = family;
            let (header, _) = decode(&bytes).await.unwrap();
            assert_eq!(header.source, None, "family {family:#x}");
            assert_eq!(header.destination, None, "family {family:#x}");
        }
    }

    #[tokio::test]
    async fn local_with_addresses_ignores_them() {
        // A LOCAL header may still carry addresses; the spec says to ignore them.
        let mut bytes = encode_header(
            Some("10.0.0.1:1".parse().unwrap()),
            Some("10.0.0.2:2".parse().unwrap()),
            &[],
        )
        .unwrap();
        bytes[12] = 0x20;
        let (header, _) = decode(&bytes).await.unwrap();
        assert_eq!(header.source, None);
    }

    #[tokio::test]
    async fn v1_refused_when_v2_required() {
        let mut input = &b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET / HTTP/1.1\r\n"[..];
        let err = read_header(&mut input, Versions::V2, DEADLINE, MAX)
            .await
            .unwrap_err();
        match &err {
            ProxyError::Unexpected { seen, accepted } => {
                assert!(seen.contains("v1 text header"), "{seen}");
                assert_eq!(*accepted, Versions::V2);
            }
            other => panic!("expected Unexpected, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("expected a PROXY protocol v2 header"), "{msg}");
        assert!(msg.contains("nginx sends v1"), "{msg}");
    }

    #[tokio::test]
    async fn v2_refused_when_v1_required() {
        let bytes = encode_header(Some("10.0.0.1:1".parse().unwrap()), None, &[]).unwrap();
        let mut input = &bytes[..];
        let err = read_header(&mut input, Versions::V1, DEADLINE, MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProxyError::Unexpected {
                    accepted: Versions::V1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("expected a PROXY protocol v1 header")
        );
    }

    #[tokio::test]
    async fn short_v1_refused_by_v2_without_waiting() {
        // Only 15 bytes and the stream stays open: refusing must not need 16.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        let err = read_header(&mut server, Versions::V2, DEADLINE, MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Unexpected { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn garbage_rejected() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0, 0, 0, 0, 0,
            ][..],
            &[0xff; 32][..],
        ] {
            let err = decode(input).await.unwrap_err();
            assert!(matches!(err, ProxyError::Unexpected { .. }), "{err:?}");
        }
        // Right signature, wrong version nibble.
        let mut bytes = encode_header(Some("10.0.0.1:1".parse().unwrap()), None, &[]).unwrap();
        bytes[12] = 0x11;
        let err = decode(&bytes).await.unwrap_err();
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
        // Length too short for the announced family.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        let err = decode(&bytes).await.unwrap_err();
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
        // A TLV that runs past the end of the header.
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, tlv::NOOP, 0x00, 0x09]);
        let err = decode(&bytes).await.unwrap_err();
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn truncated() {
        let bytes = encode_header(
            Some("10.0.0.1:1".parse().unwrap()),
            Some("10.0.0.2:2".parse().unwrap()),
            &[(tlv::NOOP, vec![0; 10])],
        )
        .unwrap();
        for cut in [0, 5, 12, 15, 16, 20, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).await.unwrap_err();
            match err {
                ProxyError::Truncated { got, expected } => {
                    assert_eq!(got, cut);
                    assert!(expected > cut);
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn slow_sender_times_out() {
        let bytes = encode_header(Some("10.0.0.1:1".parse().unwrap()), None, &[]).unwrap();
        let (mut client, mut server) = tokio::io::duplex(64);
        // Part of the header, then nothing: the stream stays open.
        client.write_all(&bytes[..20]).await.unwrap();
        let started = std::time::Instant::now();
        let deadline = Duration::from_millis(300);
        let err = read_header(&mut server, Versions::Any, deadline, MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProxyError::Timeout(d) if d == deadline),
            "{err:?}"
        );
        assert!(started.elapsed() >= deadline);
        // Generous upper bound: a loaded CI machine may be slow to wake us.
        assert!(started.elapsed() < deadline + Duration::from_secs(5));
        drop(client);
    }

    #[tokio::test]
    async fn one_deadline_for_the_whole_header() {
        // Bytes trickling in one at a time must not extend the deadline.
        let bytes = encode_header(Some("10.0.0.1:1".parse().unwrap()), None, &[]).unwrap();
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in bytes {
                if client.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let err = read_header(&mut server, Versions::Any, Duration::from_millis(400), MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Timeout(_)), "{err:?}");
        writer.abort();
    }

    #[tokio::test]
    async fn oversized_length() {
        let bytes = encode_header(
            Some("10.0.0.1:1".parse().unwrap()),
            None,
            &[(tlv::NOOP, vec![0; 600])],
        )
        .unwrap();
        let mut input = &bytes[..16];
        let err = read_header(&mut input, Versions::Any, DEADLINE, 512)
            .await
            .unwrap_err();
        match err {
            ProxyError::TooLarge { len, max } => {
                assert_eq!(len, 12 + 3 + 600);
                assert_eq!(max, 512);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn encode_refuses_oversized_tlv() {
        let err = encode_header(None, None, &[(tlv::NOOP, vec![0; 70_000])]).unwrap_err();
        assert!(matches!(err, ProxyError::TooLarge { .. }), "{err:?}");
        let many = vec![(tlv::NOOP, vec![0; 30_000]); 3];
        let err = encode_header(None, None, &many).unwrap_err();
        assert!(matches!(err, ProxyError::TooLarge { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn payload_stays_in_the_stream() {
        let src: SocketAddr = "192.0.2.10:51234".parse().unwrap();
        let mut input = encode_header(Some(src), None, &[(tlv::AUTHORITY, b"x".to_vec())]).unwrap();
        input.extend_from_slice(b"hello backend");
        let mut reader = &input[..];
        let (header, extra) = read_header(&mut reader, Versions::Any, DEADLINE, MAX)
            .await
            .unwrap();
        assert_eq!(header.source, Some(src));
        assert_eq!(header.destination, Some("0.0.0.0:0".parse().unwrap()));
        assert!(extra.is_empty());
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello backend");
    }

    /// Reads `input` from a slice (every read gets all it asks for) as a
    /// listener taking `versions`; returns the header and what is left.
    async fn decode_v1(input: &[u8]) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
        let mut reader = input;
        let (header, extra) = read_header(&mut reader, Versions::Any, DEADLINE, MAX).await?;
        assert!(extra.is_empty(), "read past the header: {extra:?}");
        Ok((header, reader.to_vec()))
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6() {
        for (line, src, dst) in [
            (
                "PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n",
                "192.0.2.1:51234",
                "198.51.100.2:443",
            ),
            (
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                "255.255.255.255:65535",
                "255.255.255.255:65535",
            ),
            (
                "PROXY TCP6 2001:db8::1 2001:db8::2 40000 8443\r\n",
                "[2001:db8::1]:40000",
                "[2001:db8::2]:8443",
            ),
            ("PROXY TCP6 :: ::1 0 1\r\n", "[::]:0", "[::1]:1"),
        ] {
            for versions in [Versions::Any, Versions::V1] {
                let mut input = line.as_bytes().to_vec();
                input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
                let mut reader = &input[..];
                let (header, extra) = read_header(&mut reader, versions, DEADLINE, MAX)
                    .await
                    .unwrap_or_else(|e| panic!("{line:?}: {e}"));
                assert!(extra.is_empty());
                assert_eq!(header.source, Some(src.parse().unwrap()), "{line:?}");
                assert_eq!(header.destination, Some(dst.parse().unwrap()), "{line:?}");
                assert!(header.tlvs.is_empty());
                assert_eq!(reader, b"GET / HTTP/1.1\r\n\r\n", "{line:?}: payload");
            }
        }
    }

    #[tokio::test]
    async fn v1_unknown_keeps_the_socket_addresses() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY UNKNOWN whatever the sender likes\r\n",
            b"PROXY UNKNOWN     \r\n",
        ] {
            let mut input = line.to_vec();
            input.extend_from_slice(b"hello");
            let (header, rest) = decode_v1(&input).await.unwrap();
            assert_eq!((header.source, header.destination), (None, None));
            assert_eq!(rest, b"hello", "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[tokio::test]
    async fn v1_payload_stays_however_the_bytes_arrive() {
        // One byte at a time, the payload right after the header.
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n";
        let (mut client, mut server) = tokio::io::duplex(4);
        tokio::spawn(async move {
            for b in line.iter().chain(b"payload") {
                client.write_all(&[*b]).await.unwrap();
            }
        });
        let (header, extra) = read_header(&mut server, Versions::Any, DEADLINE, MAX)
            .await
            .unwrap();
        assert!(extra.is_empty());
        assert_eq!(header.source, Some("192.0.2.1:51234".parse().unwrap()));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"payload");
    }

    #[test]
    fn v1_reads_never_pass_the_line_end() {
        // The bound each read uses is at most the rest of any valid line.
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN x\r\n",
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n",
            b"PROXY TCP6 :: :: 0 0\r\n",
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 65535 1\r\n",
        ] {
            for cut in 1..line.len() {
                let min = v1_min_len(&line[..cut], Versions::Any)
                    .unwrap_or_else(|e| panic!("{:?} cut at {cut}: {e}", line));
                assert!(
                    min > cut && min <= line.len(),
                    "{:?} cut at {cut}: bound {min}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }

    #[tokio::test]
    async fn v1_truncated() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n";
        for cut in [1, 5, 6, 10, 11, 20, line.len() - 2, line.len() - 1] {
            match decode_v1(&line[..cut]).await.unwrap_err() {
                ProxyError::Truncated { got, expected } => {
                    assert_eq!(got, cut);
                    assert!(
                        expected > cut && expected <= line.len(),
                        "cut {cut}: {expected}"
                    );
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn v1_too_long() {
        // 107 bytes is the most a v1 line may have, `\r\n` included.
        let longest = format!("PROXY UNKNOWN {}\r\n", "a".repeat(107 - 16));
        assert_eq!(longest.len(), 107);
        let (header, _) = decode_v1(longest.as_bytes()).await.unwrap();
        assert_eq!(header.source, None);

        // One more, on a stream that stays open: refused at byte 107.
        let (mut client, mut server) = tokio::io::duplex(256);
        let too_long = format!("PROXY UNKNOWN {}\r\n", "a".repeat(107 - 15));
        client.write_all(too_long.as_bytes()).await.unwrap();
        let err = read_header(&mut server, Versions::Any, DEADLINE, MAX)
            .await
            .unwrap_err();
        match err {
            ProxyError::Malformed(msg) => assert!(msg.contains("107"), "{msg}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn v1_garbage_refused_without_waiting() {
        for input in [
            &b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n"[..],
            b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
            b"PROXY TCP4 300.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1\x00",
            b"PROXY \x16\x03\x01",
            b"PROXY\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 1.2 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r",
        ] {
            // The stream stays open: a reader waiting for more would time out.
            let (mut client, mut server) = tokio::io::duplex(256);
            client.write_all(input).await.unwrap();
            let err = read_header(&mut server, Versions::Any, DEADLINE, MAX)
                .await
                .unwrap_err();
            let what = String::from_utf8_lossy(input);
            match &err {
                ProxyError::Malformed(msg) => assert!(msg.starts_with("v1 \"PROXY"), "{msg}"),
                ProxyError::Unexpected { seen, .. } => {
                    assert!(seen.contains("PROXY"), "{what:?}: {seen}")
                }
                other => panic!("{what:?}: expected Malformed, got {other:?}"),
            }
            drop(client);
        }
    }

    #[tokio::test]
    async fn neither_signature_names_what_came() {
        let err = decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("expected a PROXY protocol v1 or v2 header"),
            "{msg}"
        );
        assert!(msg.contains("text \"GET / HTTP/1\""), "{msg}");
        assert!(msg.contains("nginx `proxy_protocol on`"), "{msg}");
        let err = decode(&[0x16, 0x03, 0x01, 0x00, 0xa5]).await.unwrap_err();
        assert!(err.to_string().contains("a TLS handshake"), "{err}");
    }

    #[test]
    fn tls_tlvs_layout() {
        let tlvs = tls_tlvs(Some("a.test"), Some(b"http/1.1"), "TLSv1.2", "X");
        assert_eq!(tlvs[0], (tlv::AUTHORITY, b"a.test".to_vec()));
        assert_eq!(tlvs[1], (tlv::ALPN, b"http/1.1".to_vec()));
        let mut ssl = vec![tlv::CLIENT_SSL, 0, 0, 0, 0];
        ssl.extend_from_slice(&[tlv::SSL_VERSION, 0, 7]);
        ssl.extend_from_slice(b"TLSv1.2");
        ssl.extend_from_slice(&[tlv::SSL_CIPHER, 0, 1, b'X']);
        assert_eq!(tlvs[2], (tlv::SSL, ssl));
        assert_eq!(tlvs.len(), 3);

        let bare = tls_tlvs(None, None, "TLSv1.3", "Y");
        assert_eq!(bare.len(), 1);
        assert_eq!(bare[0].0, tlv::SSL);
    }
}
