//! tcp mode between plain sockets: splice(2) through a pipe, so that the
//! bytes go from one socket to the other inside the kernel and are never
//! copied to user space (HAProxy's `option splice-auto`).
//!
//! Measured against the buffered copy (`copy_bidirectional`, `global.splice
//! = false`) on the same build, interleaved, one thread, proxy and an nginx
//! origin on one core, wrk -c16 keep-alive through a tcp listener on the
//! other: proxy CPU per 64 KiB response 20-30 µs against 55-64, per 1 MiB
//! 718-832 µs against 988-1135 (4 pairs each).
//!
//! Each direction has its own pipe. A direction fills its empty pipe from
//! its source with one splice, then drains the pipe into its destination,
//! and again; at the source's end it shuts the destination's write side (a
//! half-close passes through, as with `copy_bidirectional`). The pipe is
//! filled only when empty, so an `EAGAIN` of the filling splice is always
//! the socket's, and `try_io` may clear the socket's (edge-triggered)
//! readiness on it: with bytes still in the pipe it could be the pipe's,
//! with the socket still readable.
//!
//! Pipes are bounded as HAProxy's `maxpipes` (a quarter of the tcp
//! listeners' `maxconn`, see `global.splice`): a connection that finds
//! none left, or whose pipes cannot be made, goes through a buffer as
//! before. The open-file budget of `maxconn` counts them.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use tokio::io::Interest;

use super::{forward::Activity, socket::Stream};
use crate::{
    stats::counters::Metered,
    sys::{pipe, splice},
};

/// What one call asks for: more than any pipe holds, so that a call moves
/// what the pipe has room for (its size is the kernel's choice: 64 KiB, or
/// less for an unprivileged user over `fs.pipe-user-pages-soft`).
const ASK: usize = 1 << 20;

/// How many connections may hold pipes at once (set by the generation from
/// its `maxconn`), and how many do.
static MAX_SPLICING: AtomicUsize = AtomicUsize::new(0);
static SPLICING: AtomicUsize = AtomicUsize::new(0);

/// At most `n` connections of this process hold pipes at once.
pub fn set_max_splicing(n: usize) {
    MAX_SPLICING.store(n, Relaxed);
}

/// The two pipes of one spliced connection (one per direction), counted
/// against [`set_max_splicing`] while they live.
pub(crate) struct Pipes {
    up: (OwnedFd, OwnedFd),
    down: (OwnedFd, OwnedFd),
}

impl Pipes {
    /// None when the connections with pipes are at their bound or the
    /// pipes cannot be made (the open-file limit, say): then the caller
    /// copies through a buffer.
    pub(crate) fn take() -> Option<Self> {
        if SPLICING.fetch_add(1, Relaxed) >= MAX_SPLICING.load(Relaxed) {
            SPLICING.fetch_sub(1, Relaxed);
            return None;
        }
        match pipe().and_then(|up| Ok((up, pipe()?))) {
            Ok((up, down)) => Some(Self { up, down }),
            Err(e) => {
                SPLICING.fetch_sub(1, Relaxed);
                tracing::debug!(error = %e, "no pipe for splice: copying through a buffer");
                None
            }
        }
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        SPLICING.fetch_sub(1, Relaxed);
    }
}

/// Forwards between `client` and `server` until both directions ended;
/// gives the bytes from the client and from the server.
pub(crate) async fn bidirectional(
    client: &Metered<Stream>,
    server: &Metered<Stream>,
    pipes: &Pipes,
    activity: &Activity,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        one_way(client, server, &pipes.up, activity),
        one_way(server, client, &pipes.down, activity)
    )
}

/// Moves bytes from `from` to `to` through `pipe` (read end, write end)
/// until `from` ends.
async fn one_way(
    from: &Metered<Stream>,
    to: &Metered<Stream>,
    (pipe_out, pipe_in): &(OwnedFd, OwnedFd),
    activity: &Activity,
) -> io::Result<u64> {
    let (src, dst) = (from.get_ref(), to.get_ref());
    let mut total = 0u64;
    loop {
        // Fill the pipe, which is empty here: an `EAGAIN` is the socket's.
        let mut held = loop {
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), pipe_in.as_fd(), ASK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.ready(Interest::READABLE).await?;
                }
                Err(e) => return Err(e),
            }
        };
        if held == 0 {
            dst.shutdown_write()?;
            return Ok(total);
        }
        total += held as u64;
        from.count_read(held as u64);
        activity.touch();
        // With peers that keep up, no call would ever block: the other
        // connections of this thread get their turn (one unit of tokio's
        // budget a pipeful; the drain below is bounded by it).
        tokio::task::coop::consume_budget().await;
        // Drain it.
        while held > 0 {
            let moved = dst.try_io(Interest::WRITABLE, || {
                splice(pipe_out.as_fd(), dst.as_fd(), held)
            });
            match moved {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    held -= n;
                    to.count_written(n as u64);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.ready(Interest::WRITABLE).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream, UnixStream},
    };

    use super::*;
    use crate::stats::counters::{ListenerCounter, ListenerMetrics, ServerCounter, ServerMetrics};

    async fn tcp_pair() -> (Stream, Stream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dialed, listener.accept());
        (
            Stream::Tcp(dialed.unwrap()),
            Stream::Tcp(accepted.unwrap().0),
        )
    }

    fn unix_pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), Stream::Unix(b))
    }

    /// Bytes that differ from one position to the next (xorshift).
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `out` (the first `slow` KiB a KiB a millisecond, so that the
    /// other side's buffers fill and drain), shuts its write side, and
    /// reads to the end, likewise slowly at first.
    async fn peer(stream: Stream, out: Vec<u8>, slow: usize) -> Vec<u8> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writing = async move {
            for (i, chunk) in out.chunks(1024).enumerate() {
                if i < slow {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                wr.write_all(chunk).await.unwrap();
            }
            wr.shutdown().await.unwrap();
        };
        let reading = async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            let mut reads = 0;
            loop {
                if reads < slow {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                reads += 1;
                match rd.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::join!(writing, reading).1
    }

    /// The proxy's two sockets, counting into figures of their own.
    fn metered(
        client_side: Stream,
        server_side: Stream,
    ) -> (
        Arc<ListenerMetrics>,
        Arc<ServerMetrics>,
        Metered<Stream>,
        Metered<Stream>,
    ) {
        let (lm, sm) = (
            Arc::<ListenerMetrics>::default(),
            Arc::<ServerMetrics>::default(),
        );
        let (c, s) = (
            Metered::client(client_side, &lm),
            Metered::server(server_side, &sm),
        );
        (lm, sm, c, s)
    }

    async fn forward_both_ways(client: (Stream, Stream), server: (Stream, Stream)) {
        let (client_peer, client_side) = client;
        let (server_side, server_peer) = server;
        let (lm, sm, client_side, server_side) = metered(client_side, server_side);
        let (up, down) = (bytes(3 << 20, 1), bytes(5 << 20, 2));
        let activity = Activity::default();
        set_max_splicing(usize::MAX);
        let pipes = Pipes::take().expect("pipes");
        let client_peer = tokio::spawn(peer(client_peer, up.clone(), 100));
        let server_peer = tokio::spawn(peer(server_peer, down.clone(), 200));
        let moved = tokio::time::timeout(
            Duration::from_secs(20),
            bidirectional(&client_side, &server_side, &pipes, &activity),
        )
        .await
        .expect("both directions end")
        .expect("no error");
        assert_eq!(moved, (up.len() as u64, down.len() as u64));
        assert!(
            server_peer.await.unwrap() == up,
            "the server got other bytes"
        );
        assert!(
            client_peer.await.unwrap() == down,
            "the client got other bytes"
        );
        assert_eq!(lm[ListenerCounter::BytesIn].load(Relaxed), up.len() as u64);
        assert_eq!(
            lm[ListenerCounter::BytesOut].load(Relaxed),
            down.len() as u64
        );
        assert_eq!(sm[ServerCounter::BytesOut].load(Relaxed), up.len() as u64);
        assert_eq!(sm[ServerCounter::BytesIn].load(Relaxed), down.len() as u64);
    }

    #[tokio::test]
    async fn tcp_both_ways_whole_with_half_closes() {
        forward_both_ways(tcp_pair().await, tcp_pair().await).await;
    }

    #[tokio::test]
    async fn unix_and_tcp_both_ways_whole_with_half_closes() {
        forward_both_ways(unix_pair(), tcp_pair().await).await;
        forward_both_ways(tcp_pair().await, unix_pair()).await;
    }

    #[tokio::test]
    async fn a_reset_is_an_error() {
        let (client_peer, client_side) = tcp_pair().await;
        let (server_side, server_peer) = tcp_pair().await;
        let (_, _, client_side, server_side) = metered(client_side, server_side);
        // The server resets (SO_LINGER 0) once it has read a first byte.
        let server_peer = tokio::spawn(async move {
            let Stream::Tcp(mut s) = server_peer else {
                unreachable!()
            };
            let mut byte = [0u8];
            s.read_exact(&mut byte).await.unwrap();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let Stream::Tcp(mut c) = client_peer else {
            unreachable!()
        };
        c.write_all(b"x").await.unwrap();
        let activity = Activity::default();
        set_max_splicing(usize::MAX);
        let pipes = Pipes::take().expect("pipes");
        let moved = tokio::time::timeout(
            Duration::from_secs(10),
            bidirectional(&client_side, &server_side, &pipes, &activity),
        )
        .await
        .expect("ends");
        server_peer.await.unwrap();
        let err = moved.expect_err("a reset server is an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        drop(c);
    }
}
