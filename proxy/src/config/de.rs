//! Deserializers of single values with the errors an operator can act on:
//! integers with their allowed range, durations, addresses and `accept_proxy`.

use std::{fmt, marker::PhantomData, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{
    Deserialize,
    de::{self, Deserializer, Visitor},
};

use super::{AcceptProxy, Addr, Server, StatusSet};

// ---------------------------------------------------------------------------
// Integer fields. They are range-checked while deserializing, reading the raw
// TOML integer, so that `backlog = -1` says which range is allowed instead of
// serde's "expected u32".
// ---------------------------------------------------------------------------

/// An integer in `range`; `unit` follows the range in the error.
fn in_range<'de, D: Deserializer<'de>>(
    d: D,
    range: std::ops::RangeInclusive<i64>,
    unit: &str,
) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if range.contains(&n) {
        return Ok(n as usize);
    }
    let expected = match range.end() {
        &i64::MAX => format!("at least {}", range.start()),
        end => format!("{}..={end}", range.start()),
    };
    Err(de::Error::custom(format!(
        "{n} is out of range: expected {expected}{unit}"
    )))
}

pub(super) fn de_maxconn<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    in_range(d, 1..=i64::MAX, ", or leave the key out for no limit").map(Some)
}

/// HAProxy's own ceiling for `nbthread` on most builds is 64; a tokio
/// runtime takes more, but a proxy gains nothing from threads beyond its
/// CPUs.
pub(super) fn de_nbthread<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    in_range(d, 1..=1024, " threads").map(Some)
}

/// 65535 is the largest value net.core.somaxconn accepts; the kernel
/// silently caps larger backlogs anyway.
pub(super) fn de_backlog<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1..=65535, "").map(|n| n as u32)
}

/// HAProxy allows up to 1000 for either; a larger count would only delay
/// the verdict further.
pub(super) fn de_rise_fall<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1..=1000, " checks in a row").map(|n| n as u32)
}

pub(super) fn de_canary_min_connections<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 1..=i64::MAX, " connections").map(|n| n as u64)
}

pub(super) fn de_session_cache<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 0..=1_000_000, " sessions (0 turns the cache off)")
}

pub(super) fn de_h2_streams<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1..=10_000, " streams").map(|n| n as u32)
}

/// RFC 9113 6.5.2: a window is at most 2^31-1.
pub(super) fn de_h2_window<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 65_535..=2_147_483_647, " bytes").map(|n| n as u32)
}

/// RFC 9113 6.5.2: SETTINGS_MAX_FRAME_SIZE is 2^14..=2^24-1.
pub(super) fn de_h2_frame<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 16_384..=16_777_215, " bytes").map(|n| n as u32)
}

pub(super) fn de_h2_rate<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1..=1_000_000, "").map(|n| n as u32)
}

pub(super) fn de_pool_max_conn<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(
        d,
        0..=100_000,
        " connections per server (0: one pool per client connection)",
    )
}

pub(super) fn de_stats_maxconn<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 1..=1024, "")
}

pub(super) fn de_opt_max_header_size<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<usize>, D::Error> {
    de_max_header_size(d).map(Some)
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// hyper cannot parse with a smaller buffer than 8 KiB; 1 MiB is more than
/// any sane request head.
pub(super) fn de_max_header_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 8192..=1 << 20, " (bytes)")
}

// ---------------------------------------------------------------------------
// String-valued fields: durations and addresses.
// ---------------------------------------------------------------------------

/// Deserializes a value that must be a TOML string with its own syntax.
/// The `expecting` text shows up in type errors, e.g. when someone writes
/// `hard_stop_after = 30` instead of `"30s"`.
struct ParsedStr<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
    _marker: PhantomData<T>,
}

impl<T> Visitor<'_> for ParsedStr<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

pub(super) fn deserialize_parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    d.deserialize_str(ParsedStr {
        expecting,
        parse,
        _marker: PhantomData,
    })
}

const DURATION_EXPECTED: &str = "a number with a unit such as \"500ms\", \"30s\" or \"2m\"";

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|_| format!("invalid duration {s:?}: expected {DURATION_EXPECTED}"))
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    deserialize_parsed(
        d,
        "a duration string such as \"500ms\", \"30s\" or \"2m\"",
        parse_duration,
    )
}

const ACCEPT_PROXY_EXPECTED: &str =
    "true (a PROXY v1 or v2 header), false (none), \"v1\" or \"v2\" (only that version)";

/// `accept_proxy`: a boolean, or the one version a listener takes.
impl<'de> Deserialize<'de> for AcceptProxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AcceptProxyVisitor;

        impl Visitor<'_> for AcceptProxyVisitor {
            type Value = AcceptProxy;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(ACCEPT_PROXY_EXPECTED)
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AcceptProxy, E> {
                Ok(if v {
                    AcceptProxy::Any
                } else {
                    AcceptProxy::Off
                })
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<AcceptProxy, E> {
                match v {
                    "v1" => Ok(AcceptProxy::V1),
                    "v2" => Ok(AcceptProxy::V2),
                    _ => Err(E::custom(format!(
                        "invalid value {v:?}: expected {ACCEPT_PROXY_EXPECTED}"
                    ))),
                }
            }
        }

        d.deserialize_any(AcceptProxyVisitor)
    }
}

const ADDR_EXPECTED: &str = "expected IP:PORT or unix:/path";

/// Parses the syntax shared by bind and server addresses. Host names are
/// deliberately not accepted: resolving them would make the meaning of the
/// file depend on DNS at load time.
pub(super) fn parse_tcp_or_unix(s: &str) -> Result<Result<SocketAddr, PathBuf>, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!(
                "invalid address {s:?}: {ADDR_EXPECTED} (unix socket paths must be absolute)"
            ));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if path.len() > 107 {
            return Err(format!(
                "invalid address {s:?}: unix socket path is {} bytes long, the limit is 107",
                path.len()
            ));
        }
        return Ok(Err(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>()
        .map(Ok)
        .map_err(|_| format!("invalid address {s:?}: {ADDR_EXPECTED}"))
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match parse_tcp_or_unix(s)? {
            Ok(sa) => Addr::Tcp(sa),
            Err(path) => Addr::Unix(path),
        })
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_parsed(d, "an address string: IP:PORT or unix:/path", str::parse)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(sa) => write!(f, "{sa}"),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for Server {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The table form.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            addr: Addr,
            #[serde(default = "yes")]
            check: bool,
        }
        fn yes() -> bool {
            true
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Server;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a server address (IP:PORT or unix:/path) or a table such as \
                     { addr = \"127.0.0.1:9000\", check = false }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Server, E> {
                Ok(Server {
                    addr: v.parse().map_err(E::custom)?,
                    check: true,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Server, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Server {
                    addr: t.addr,
                    check: t.check,
                })
            }
        }
        d.deserialize_any(V)
    }
}

const STATUS_EXPECTED: &str =
    "an HTTP status such as 200, a range such as \"200-399\", or a list of these";

fn status(n: i64) -> Result<u16, String> {
    if (100..=599).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("{n} is not an HTTP status: expected 100..=599"))
    }
}

/// `"200"` or `"200-399"`.
fn status_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<i64>()
            .map_err(|_| format!("invalid status {s:?}: expected {STATUS_EXPECTED}"))
            .and_then(status)
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (num(lo)?, num(hi)?),
        None => {
            let n = num(s)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("invalid status range {s:?}: {lo} is above {hi}"));
    }
    Ok(lo..=hi)
}

impl<'de> Deserialize<'de> for StatusSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StatusSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(STATUS_EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusSet, E> {
                let n = status(v).map_err(E::custom)?;
                Ok(StatusSet(vec![n..=n]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusSet, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusSet, E> {
                Ok(StatusSet(vec![status_range(v).map_err(E::custom)?]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<StatusSet, A::Error> {
                let mut ranges = Vec::new();
                while let Some(one) = seq.next_element::<StatusSet>()? {
                    ranges.extend(one.0);
                }
                if ranges.is_empty() {
                    return Err(de::Error::custom(format!(
                        "empty list: expected {STATUS_EXPECTED}"
                    )));
                }
                Ok(StatusSet(ranges))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn de_opt_status_set<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<StatusSet>, D::Error> {
    StatusSet::deserialize(d).map(Some)
}
