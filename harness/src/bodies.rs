//! Payloads and their checks: deterministic bytes, compressible text where
//! a shifted byte shows, gunzip, and where two byte strings first differ.

use std::io::{self, Read as _};

/// A small deterministic PRNG (xorshift64*), enough for payloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Compressible text where every line differs (a shifted or dropped
/// byte shows): `line 000000042 of body 7 ...\n`, cut to `len`.
pub fn text_body(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("line {line:09} of body {seed}: the quick brown fox jumps over the lazy dog\n")
                .as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// Incompressible bytes.
pub fn binary_body(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed ^ 0x5eed).bytes(len)
}

/// Decompresses a whole gzip stream, reading at most `limit` bytes of
/// output (a body that inflates past it is wrong anyway).
pub fn try_gunzip(data: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(limit)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// gunzip, panicking with `what` on a corrupt stream.
pub fn gunzip(data: &[u8], what: &str) -> Vec<u8> {
    try_gunzip(data, u64::MAX)
        .unwrap_or_else(|e| panic!("{what}: the gzip stream does not decode: {e}"))
}

/// Where the first difference of two byte strings is, for messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    if got == want {
        return "identical".into();
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "{} bytes, expected {}, first difference at byte {at}",
        got.len(),
        want.len()
    )
}
