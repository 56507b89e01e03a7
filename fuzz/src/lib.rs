//! What the fuzz targets share: a reader that hands out its bytes in
//! fuzzer-chosen pieces, and the runtime the async code under test runs on.
//!
//! The targets themselves are in `fuzz_targets/`; each one says what it
//! feeds the proxy and what it checks besides "no panic".

use std::{
    io,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    runtime::Runtime,
};

/// One current-thread runtime per fuzzing process, with the clock paused:
/// when every task waits, time jumps to the next timer, so a timeout in the
/// code under test fires at once instead of stalling the fuzzer, and only
/// when nothing else could run.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
    })
}

/// Splits `data` into (piece sizes, payload): the first byte says how many
/// of the bytes after it are piece sizes (0 to 7); the rest is the payload.
pub fn split_sizes(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    let k = usize::from(first & 7).min(rest.len());
    rest.split_at(k)
}

/// Reads `data` in pieces whose sizes cycle through `sizes`; a size of 0
/// returns `Pending` once (waking itself at once) before the next piece, as
/// a socket does between two segments. An empty `sizes` hands out everything
/// at once. After the data comes end of file.
pub struct ChunkedReader {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<u8>,
    next: usize,
    /// The last poll returned `Pending`: this one must make progress, so
    /// that a run of zero sizes cannot spin forever.
    was_pending: bool,
}

impl ChunkedReader {
    pub fn new(data: &[u8], sizes: &[u8]) -> Self {
        Self {
            data: data.to_vec(),
            pos: 0,
            sizes: sizes.to_vec(),
            next: 0,
            was_pending: false,
        }
    }

    /// How many bytes were handed out so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// What was not handed out.
    pub fn rest(&self) -> &[u8] {
        &self.data[self.pos..]
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let remaining = this.data.len() - this.pos;
        if remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let size = match this.sizes.get(this.next % this.sizes.len().max(1)) {
            None => remaining,
            Some(&size) => {
                this.next += 1;
                usize::from(size)
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
