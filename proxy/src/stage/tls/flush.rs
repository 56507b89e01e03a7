//! Alerts that rustls queues while the stage only reads.

use tokio::io::{AsyncRead, AsyncWrite};

/// A server TLS stream that sends what rustls queued while reading (the
/// alert refusing a renegotiation, say) without waiting for the next write:
/// in tcp mode the next write may never come, and the client would wait
/// for its own timeout.
pub struct FlushingTls<S> {
    inner: tokio_rustls::server::TlsStream<S>,
}

impl<S> FlushingTls<S> {
    pub fn new(inner: tokio_rustls::server::TlsStream<S>) -> Self {
        Self { inner }
    }
}

/// Not parked when idle: a readable socket may hold part of a record only.
impl<S> crate::stage::socket::ReadReady for FlushingTls<S> {}

impl<S> crate::stage::socket::Splice for FlushingTls<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FlushingTls<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.inner.get_ref().1.wants_write() {
            // Best effort: a write error shows up on the next write anyway.
            let _ = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        }
        res
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FlushingTls<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // rustls turns several buffers into one record where it can: hyper
    // hands head and body over together instead of copying them into one.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
