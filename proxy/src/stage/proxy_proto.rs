//! PROXY protocol version 2 (HAProxy's binary header): reading the header a
//! load balancer in front of us sends, and writing one for a backend behind us.
//!
//! Only the binary v2 format is accepted; the v1 text form is refused, because
//! a listener that is configured for PROXY must not guess what it is reading.
//! Parsing is done by the `ppp` crate; this module decides how much to read,
//! how long to wait, and what to make of the result.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ppp::v2::{self, Addresses, Command, ParseError, Protocol, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Length of the fixed part of a v2 header: 12-byte signature, version and
/// command, family and transport, 2-byte length of what follows.
const FIXED_LEN: usize = 16;

/// Bytes that start every v2 header.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

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

/// What a v2 header said about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client; `None` for a LOCAL header (a health check from the
    /// balancer itself) and for address families that carry no IP (UNSPEC,
    /// UNIX), in which case the socket's own peer address is the one to use.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
    /// Type-length-value extensions in the order they came, see [`tlv`].
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// Why no PROXY header could be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "malformed PROXY protocol v2 header: {0}; the peer must send a binary v2 header \
         (HAProxy `send-proxy-v2`, nginx `proxy_protocol on`) before any data, \
         or PROXY must be turned off for this listener"
    )]
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
        "connection closed after {got} of {expected} PROXY header bytes; the peer \
         gave up or does not speak PROXY protocol"
    )]
    Truncated { got: usize, expected: usize },
    #[error("reading the PROXY header failed: {0}")]
    Io(#[source] io::Error),
}

/// Reads one PROXY v2 header from the start of `io`, within `deadline` in
/// total, refusing headers whose address-and-TLV part is over `max_len` bytes.
///
/// Exactly the header's bytes are consumed, never any payload after it, so the
/// returned `Vec` (bytes read past the header, to replay before the stream) is
/// always empty; it is there so that callers do not depend on that.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: Duration,
    max_len: usize,
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    match tokio::time::timeout(deadline, read_header_inner(io, max_len)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(deadline)),
    }
}

async fn read_header_inner<S: AsyncRead + Unpin>(
    io: &mut S,
    max_len: usize,
) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
    let mut fixed = [0u8; FIXED_LEN];
    let mut got = 0;
    // Read the fixed part piecewise rather than with read_exact, so that a peer
    // sending something else (v1 text, TLS, HTTP) is refused as soon as its
    // first bytes are seen, instead of waiting for 16 bytes it may never send.
    while got < FIXED_LEN {
        let n = io.read(&mut fixed[got..]).await.map_err(ProxyError::Io)?;
        if n == 0 {
            check_signature(&fixed[..got])?;
            return Err(ProxyError::Truncated {
                got,
                expected: FIXED_LEN,
            });
        }
        got += n;
        check_signature(&fixed[..got])?;
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

/// Refuses `seen` unless it is a prefix of the v2 signature, and says what it
/// looks like instead, since that is what an operator needs to fix the peer.
fn check_signature(seen: &[u8]) -> Result<(), ProxyError> {
    let n = seen.len().min(SIGNATURE.len());
    if seen[..n] == SIGNATURE[..n] {
        return Ok(());
    }
    let what = if seen.starts_with(b"PROXY") {
        "a PROXY protocol v1 text header (\"PROXY ...\"); only v2 is accepted".to_string()
    } else if seen.first() == Some(&0x16) {
        "a TLS handshake instead of the v2 signature".to_string()
    } else {
        format!("{} instead of the v2 signature", describe(seen))
    };
    Err(ProxyError::Malformed(what))
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

fn malformed(err: &ParseError) -> ProxyError {
    ProxyError::Malformed(err.to_string())
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
        read_header(&mut input, DEADLINE, MAX).await
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
    async fn v1_text_rejected() {
        let err = decode(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap_err();
        match err {
            ProxyError::Malformed(msg) => assert!(msg.contains("v1"), "{msg}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn short_v1_rejected_without_waiting() {
        // Only 15 bytes and the stream stays open: refusing must not need 16.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        let err = read_header(&mut server, DEADLINE, MAX).await.unwrap_err();
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
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
            assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
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
        let err = read_header(&mut server, deadline, MAX).await.unwrap_err();
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
        let err = read_header(&mut server, Duration::from_millis(400), MAX)
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
        let err = read_header(&mut input, DEADLINE, 512).await.unwrap_err();
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
        let (header, extra) = read_header(&mut reader, DEADLINE, MAX).await.unwrap();
        assert_eq!(header.source, Some(src));
        assert_eq!(header.destination, Some("0.0.0.0:0".parse().unwrap()));
        assert!(extra.is_empty());
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello backend");
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
