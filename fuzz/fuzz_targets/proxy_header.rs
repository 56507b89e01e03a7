//! The PROXY v2 reader, fed in fuzzer-chosen pieces.
//!
//! Input: see `split_sizes` (piece sizes, then the bytes the peer sends).
//! Checks, besides no panic:
//! - the outcome does not depend on how the bytes were split: the same
//!   result kind (and the same header) as reading them in one piece;
//! - a header that was read consumed exactly its own bytes, never payload;
//! - a header that was read encodes back (`encode_header`) to one that reads
//!   as the same header (CRC32C TLVs left out: a new header needs a new sum).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy::stage::proxy_proto::{ProxyError, ProxyHeader, encode_header, read_header, tlv};
use proxy_fuzz::{ChunkedReader, runtime, split_sizes};

/// What the stage allows (`MAX_PROXY_HEADER` in stage/mod.rs).
const MAX_LEN: usize = 4096;
/// Never reached: the readers below always make progress; the paused clock
/// would fire it at once if one did not.
const DEADLINE: Duration = Duration::from_secs(10);

type Outcome = Result<ProxyHeader, ProxyError>;

async fn read(mut reader: ChunkedReader) -> (Outcome, ChunkedReader) {
    let result = read_header(&mut reader, DEADLINE, MAX_LEN).await;
    (
        result.map(|(header, extra)| {
            assert!(extra.is_empty(), "read_header kept bytes past the header");
            header
        }),
        reader,
    )
}

/// The outcome, with messages and byte counts left aside where they depend
/// on what the reader has seen so far.
fn kind(outcome: &Outcome) -> String {
    match outcome {
        Ok(header) => format!("Ok({header:?})"),
        Err(ProxyError::Malformed(_)) => "Malformed".into(),
        Err(e @ ProxyError::TooLarge { .. }) => format!("{e:?}"),
        Err(e @ ProxyError::Truncated { .. }) => format!("{e:?}"),
        Err(e) => panic!("an in-memory reader cannot give {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (sizes, input) = split_sizes(data);
    runtime().block_on(async {
        let (chunked, reader) = read(ChunkedReader::new(input, sizes)).await;
        let (whole, _) = read(ChunkedReader::new(input, &[])).await;
        assert_eq!(
            kind(&chunked),
            kind(&whole),
            "the split into pieces {sizes:?} changed the outcome"
        );
        let Ok(header) = chunked else { return };

        let len = 16 + usize::from(u16::from_be_bytes([input[14], input[15]]));
        assert_eq!(reader.consumed(), len, "consumed other than the header");

        // Without CRC32C TLVs: their checksum covers the addresses, which a
        // header without IP addresses does not write back.
        let header = ProxyHeader {
            tlvs: header
                .tlvs
                .into_iter()
                .filter(|(kind, _)| *kind != tlv::CRC32C)
                .collect(),
            ..header
        };
        let again = encode_header(header.source, header.destination, &header.tlvs)
            .expect("a header that was read can be written");
        let (reread, _) = read(ChunkedReader::new(&again, sizes)).await;
        assert_eq!(
            kind(&reread),
            kind(&Ok(header)),
            "encode_header did not round-trip"
        );
    });
});
