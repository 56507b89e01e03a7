//! The PROXY header reader (v1 and v2, as `accept_proxy = true` takes
//! them), fed in fuzzer-chosen pieces.
//!
//! Input: see `split_sizes` (piece sizes, then the bytes the peer sends).
//! Checks, besides no panic:
//! - the outcome does not depend on how the bytes were split: the same
//!   result kind (and the same header) as reading them in one piece;
//! - a listener that takes one version (`"v1"`, `"v2"`) reads the same
//!   header from that version's bytes, and refuses the other version's;
//! - a header that was read consumed exactly its own bytes, never payload
//!   (a v1 line up to its `\n`, a v2 header up to its length);
//! - a header that was read encodes back (`encode_header`) to one that reads
//!   as the same header (CRC32C TLVs left out: a new header needs a new sum).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy::stage::proxy_proto::{
    ProxyError, ProxyHeader, Versions, encode_header, read_header, tlv,
};
use proxy_fuzz::{ChunkedReader, runtime, split_sizes};

/// What the stage allows (`MAX_PROXY_HEADER` in stage/mod.rs).
const MAX_LEN: usize = 4096;
/// Never reached: the readers below always make progress; the paused clock
/// would fire it at once if one did not.
const DEADLINE: Duration = Duration::from_secs(10);

type Outcome = Result<ProxyHeader, ProxyError>;

/// Reads as `accept_proxy = true` does.
async fn read(reader: ChunkedReader) -> (Outcome, ChunkedReader) {
    read_as(Versions::Any, reader).await
}

async fn read_as(versions: Versions, mut reader: ChunkedReader) -> (Outcome, ChunkedReader) {
    let result = read_header(&mut reader, versions, DEADLINE, MAX_LEN).await;
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
        Err(ProxyError::Unexpected { .. }) => "Unexpected".into(),
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

        let v1 = input[0] == b'P';
        let len = if v1 {
            input
                .iter()
                .position(|&b| b == b'\n')
                .expect("a v1 line ends in \\n")
                + 1
        } else {
            16 + usize::from(u16::from_be_bytes([input[14], input[15]]))
        };
        assert_eq!(reader.consumed(), len, "consumed other than the header");

        // The one-version listeners: the same header from their version,
        // a refusal of the other's.
        let (same, other) = if v1 {
            (Versions::V1, Versions::V2)
        } else {
            (Versions::V2, Versions::V1)
        };
        let (only, _) = read_as(same, ChunkedReader::new(input, sizes)).await;
        assert_eq!(
            kind(&only),
            kind(&Ok(header.clone())),
            "{same:?} read otherwise"
        );
        let (refused, _) = read_as(other, ChunkedReader::new(input, sizes)).await;
        assert_eq!(
            kind(&refused),
            "Unexpected",
            "{other:?} took the other version"
        );

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
