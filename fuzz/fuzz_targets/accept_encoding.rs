//! Accept-Encoding negotiation (`accepts_gzip`) against the reference model
//! that the property tests use too.
//!
//! Input: Accept-Encoding field lines separated by `\n`; lines that are not
//! valid header values are left out, as hyper would refuse them. The model
//! and the proxy must agree on every input.
#![no_main]

use hyper::{
    HeaderMap,
    header::{ACCEPT_ENCODING, HeaderValue},
};
use libfuzzer_sys::fuzz_target;
use proxy::stage::http::headers::accepts_gzip;

#[path = "../../proxy/tests/model/accept_encoding.rs"]
mod model;

fuzz_target!(|data: &[u8]| {
    let lines: Vec<&[u8]> = data
        .split(|&b| b == b'\n')
        .filter(|l| HeaderValue::from_bytes(l).is_ok())
        .collect();
    let mut headers = HeaderMap::new();
    for line in &lines {
        headers.append(ACCEPT_ENCODING, HeaderValue::from_bytes(line).unwrap());
    }
    let got = accepts_gzip(&headers);
    assert_eq!(
        got,
        model::accepts_gzip(&lines),
        "Accept-Encoding {lines:?}"
    );
});
