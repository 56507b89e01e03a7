//! A reference model of the proxy's gzip negotiation, written from RFC 9110
//! section 12.5.3 rather than from the proxy's code. The property tests
//! (`tests/properties.rs`) and the `accept_encoding` fuzz target
//! (`fuzz/fuzz_targets/accept_encoding.rs`) both hold the proxy to it.
//!
//! ```text
//! Accept-Encoding = #( codings [ weight ] )
//! weight          = OWS ";" OWS "q=" qvalue
//! qvalue          = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
//! ```
//!
//! The choices the RFC leaves open, as the proxy makes them: a value with
//! bytes outside visible ASCII, space and tab is skipped whole; a malformed
//! `q` voids its element; of several `q` the last counts; of several
//! elements for gzip the highest weight counts; spaces around `=` are
//! allowed.

/// Whether gzip may be sent to a client whose Accept-Encoding field lines
/// are `values`: an explicit `gzip` or `x-gzip` decides by its weight, else
/// `*` does; no usable element means identity only.
pub fn accepts_gzip(values: &[&[u8]]) -> bool {
    let mut gzip: Option<u16> = None;
    let mut star: Option<u16> = None;
    for element in elements(values) {
        let Some((coding, weight)) = weigh(element) else {
            continue;
        };
        let slot = if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut gzip
        } else if coding == "*" {
            &mut star
        } else {
            continue;
        };
        *slot = Some(slot.map_or(weight, |w| w.max(weight)));
    }
    match gzip {
        Some(w) => w > 0,
        None => star.is_some_and(|w| w > 0),
    }
}

/// The non-empty list elements of every readable field line.
pub fn elements<'a>(values: &'a [&'a [u8]]) -> impl Iterator<Item = &'a str> {
    values
        .iter()
        .filter(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(ows)
        .filter(|e| !e.is_empty())
}

/// The coding of an element and its weight in thousandths, or `None` when
/// a `q` parameter is malformed.
fn weigh(element: &str) -> Option<(&str, u16)> {
    let mut parts = element.split(';');
    let coding = ows(parts.next().unwrap_or_default());
    let mut weight = 1000;
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if ows(name).eq_ignore_ascii_case("q") {
            weight = qvalue(ows(value))?;
        }
    }
    Some((coding, weight))
}

/// RFC 9110 `qvalue` in thousandths.
pub fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = match v.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (v, ""),
    };
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Trims optional whitespace (space and tab).
fn ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}
