//! Listening sockets and the byte streams they produce.
//!
//! Listeners are built with socket2 so that SO_REUSEPORT is set before
//! `bind()` (the kernel's rule for joining a reuseport group), and driven
//! through `AsyncFd` so that `accept()` is always tried before waiting for
//! readiness: connections migrated into our queue by the kernel are swept up
//! even when no epoll event announced them.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use std::os::unix::fs::MetadataExt;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf, unix::AsyncFd},
    net::{TcpStream, UnixStream},
    runtime::Handle,
};

use crate::{config::Addr, stats::counters::Metered};

/// A listening socket of one generation.
pub struct ListenSocket {
    /// The socket itself: shutdown, listen, and the fd the steering maps
    /// register.
    socket: Socket,
    /// A duplicate of `socket` registered with the stage's reactor. Replaced
    /// on `resume()`: after `shutdown()` tokio keeps a sticky "read closed"
    /// readiness on the registration, which would make `accept()` spin.
    fd: RwLock<Arc<AsyncFd<Socket>>>,
    /// The reactor the listener belongs to (its stage's runtime).
    runtime: Handle,
    /// Where it listens, for logs and for the UNIX hand-off.
    pub addr: Addr,
    /// The kernel backlog, reused by `resume()`.
    backlog: i32,
    /// Permissions of a UNIX socket file, reused by `republish()`.
    unix_mode: u32,
    /// Inode of our UNIX socket file, to tell whether a successor renamed
    /// its own over the path.
    path_ino: std::sync::Mutex<Option<u64>>,
    /// A UNIX listener is bound on a temporary path until `publish()`
    /// renames it over the real one (just before the flip, so that a
    /// generation that fails during startup never takes the path away
    /// from the running one).
    pending: std::sync::Mutex<Option<PathBuf>>,
}

/// Who connected: a client address as the kernel saw it.
#[derive(Clone, Debug)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    Unix,
}

impl PeerAddr {
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Tcp(a) => Some(*a),
            PeerAddr::Unix => None,
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "{a}"),
            PeerAddr::Unix => write!(f, "unix"),
        }
    }
}

impl ListenSocket {
    /// The TCP address the socket is bound to (the port the kernel chose
    /// for port 0).
    pub fn bound_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()?.as_socket()
    }

    /// Binds `addr`. TCP listeners join the reuseport group of the address;
    /// UNIX listeners are bound on a temporary path and renamed over the
    /// final one, so that the path never disappears for clients while an
    /// older generation still owns it.
    pub fn bind(addr: &Addr, backlog: u32, unix_mode: u32) -> io::Result<Self> {
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let socket = match addr {
            Addr::Tcp(sa) => {
                let socket = Socket::new(Domain::for_address(*sa), Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.set_reuse_port(true)?;
                // Accepted sockets inherit both (Linux clones the listener):
                // no setsockopt per connection.
                socket.set_nodelay(true)?;
                // A vanished peer must not hold a connection (and a drain)
                // forever.
                socket.set_keepalive(true)?;
                if sa.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                socket.set_nonblocking(true)?;
                socket.bind(&(*sa).into())?;
                socket.listen(backlog)?;
                socket
            }
            Addr::Unix(path) => bind_unix_temp(path, backlog, unix_mode)?,
        };
        let pending = match addr {
            Addr::Unix(path) => Some(temp_path(path)),
            Addr::Tcp(_) => None,
        };
        let dup = socket.try_clone()?;
        Ok(Self {
            fd: RwLock::new(Arc::new(crate::sys::async_fd(dup)?)),
            socket,
            runtime: Handle::current(),
            addr: addr.clone(),
            backlog,
            unix_mode,
            path_ino: std::sync::Mutex::new(None),
            pending: std::sync::Mutex::new(pending),
        })
    }

    /// Puts a UNIX listener at its real path (rename over whatever is
    /// there: the old generation keeps serving what it already accepted).
    /// A no-op for TCP and for a listener already published.
    pub fn publish(&self) -> io::Result<()> {
        let Addr::Unix(path) = &self.addr else {
            return Ok(());
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tmp) = pending.take() {
            std::fs::rename(&tmp, path).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            *self.path_ino.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::fs::metadata(path)?.ino());
        }
        Ok(())
    }

    /// Accepts one connection: tries `accept()` first, waits for readiness
    /// only when the queue is empty.
    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        loop {
            match self.try_accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let fd = self.fd();
            let mut guard = fd.readable().await?;
            match guard.try_io(|fd| accept_raw(fd.get_ref())) {
                Ok(result) => return result.and_then(into_stream),
                Err(_would_block) => continue,
            }
        }
    }

    /// One non-blocking `accept()`.
    pub fn try_accept(&self) -> io::Result<(Stream, PeerAddr)> {
        accept_raw(&self.socket).and_then(into_stream)
    }

    /// Stops listening. For TCP this is `shutdown()`: the socket leaves the
    /// reuseport group and the sockarray, and the kernel migrates its accept
    /// queue to the socket the steering program selects. The fd stays open,
    /// so that `resume()` can rejoin the group.
    pub fn pause(&self) -> io::Result<()> {
        match self.addr {
            Addr::Tcp(_) => self.socket.shutdown(std::net::Shutdown::Read),
            // A UNIX listener cannot hand its queue over; it keeps it, and the
            // caller sweeps it before closing.
            Addr::Unix(_) => Ok(()),
        }
    }

    /// Listens again after `pause()`: the socket rejoins its reuseport group.
    pub fn resume(&self) -> io::Result<()> {
        self.socket.listen(self.backlog)?;
        let _entered = self.runtime.enter();
        let fresh = Arc::new(crate::sys::async_fd(self.socket.try_clone()?)?);
        *self.fd.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Takes a UNIX path back after a rollback: the successor that renamed
    /// its socket over it is gone, so the path leads nowhere. A fresh socket
    /// is bound, renamed over the path, and put in place of ours with
    /// `dup2`, so the accept loop picks it up without being restarted.
    pub fn republish(&self) -> io::Result<()> {
        let Addr::Unix(path) = &self.addr else {
            return Ok(());
        };
        let ours = *self.path_ino.lock().unwrap_or_else(|e| e.into_inner());
        if ours.is_some() && std::fs::metadata(path).ok().map(|m| m.ino()) == ours {
            return Ok(());
        }
        let fresh = bind_unix_temp(path, self.backlog, self.unix_mode)?;
        let tmp = temp_path(path);
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        crate::sys::replace_fd(&fresh, &self.socket)?;
        drop(fresh);
        let _entered = self.runtime.enter();
        let registered = Arc::new(crate::sys::async_fd(self.socket.try_clone()?)?);
        *self.fd.write().unwrap_or_else(|e| e.into_inner()) = registered;
        *self.path_ino.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::fs::metadata(path)?.ino());
        Ok(())
    }

    fn fd(&self) -> Arc<AsyncFd<Socket>> {
        self.fd.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Removes our UNIX socket path, unless a successor has replaced it.
    pub fn remove_path_if_ours(&self) {
        let ours = *self.path_ino.lock().unwrap_or_else(|e| e.into_inner());
        if let (Addr::Unix(path), Some(ours)) = (&self.addr, ours)
            && std::fs::metadata(path).is_ok_and(|m| m.ino() == ours)
        {
            let _ = std::fs::remove_file(path);
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.addr, Addr::Tcp(_))
    }
}

impl Drop for ListenSocket {
    fn drop(&mut self) {
        if let Some(tmp) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl AsFd for ListenSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// `accept4()` hands the socket over non-blocking already: one syscall per
/// connection, the options come from the listener.
fn accept_raw(socket: &Socket) -> io::Result<(Socket, SockAddr)> {
    socket.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
}

fn into_stream((socket, addr): (Socket, SockAddr)) -> io::Result<(Stream, PeerAddr)> {
    if let Some(sa) = addr.as_socket() {
        let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
        Ok((Stream::Tcp(stream), PeerAddr::Tcp(sa)))
    } else {
        let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(socket))?;
        Ok((Stream::Unix(stream), PeerAddr::Unix))
    }
}

fn bind_unix_temp(path: &Path, backlog: i32, mode: u32) -> io::Result<Socket> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::unix(&tmp)?)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    socket.listen(backlog)?;
    Ok(socket)
}

/// A temporary name next to `path`, unique per process start (PIDs repeat
/// across PID namespaces).
fn temp_path(path: &Path) -> PathBuf {
    static UNIQUE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let unique = UNIQUE.get_or_init(crate::sys::boottime_ns);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}-{unique:x}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Connects to a backend server.
pub async fn connect(server: &Addr) -> io::Result<Stream> {
    match server {
        Addr::Tcp(sa) => {
            let stream = TcpStream::connect(sa).await?;
            stream.set_nodelay(true)?;
            socket2::SockRef::from(&stream).set_keepalive(true)?;
            Ok(Stream::Tcp(stream))
        }
        Addr::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}

/// A TCP or UNIX byte stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Our side's address (the PROXY header's destination), TCP only.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// tokio's `try_io`: `f` does the I/O itself; its `WouldBlock` clears
    /// the readiness for `interest`.
    pub(crate) fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Stream::Tcp(s) => s.try_io(interest, f),
            Stream::Unix(s) => s.try_io(interest, f),
        }
    }

    /// Waits until the socket is ready for `interest`.
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.ready(interest).await.map(drop),
            Stream::Unix(s) => s.ready(interest).await.map(drop),
        }
    }

    /// shutdown(2) of our write side: the peer reads its end.
    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A stream whose readability can be awaited without reading from it.
///
/// An idle HTTP/1 keep-alive connection on such a stream waits for its next
/// request with none of hyper's state (`http::serve` parks it), the way
/// nginx keeps only the connection of an idle keep-alive client.
pub trait ReadReady {
    /// Whether [`poll_read_ready`](Self::poll_read_ready) tells. A TLS
    /// stream cannot: a readable socket may hold part of a record only.
    const TELLS: bool = false;

    /// Ready once a read would not find the stream empty (data, end, or an
    /// error). Only called when [`TELLS`](Self::TELLS).
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for Stream {
    const TELLS: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }
}

impl ReadReady for tokio::io::DuplexStream {}

/// A client stream tcp mode can forward with splice(2): a plain socket with
/// nothing read from it that is still held above it.
pub trait Splice {
    fn spliceable(&self) -> Option<&Metered<Stream>> {
        None
    }
}

impl Splice for Metered<Stream> {
    fn spliceable(&self) -> Option<&Metered<Stream>> {
        Some(self)
    }
}

impl Splice for tokio::io::DuplexStream {}

impl<S> Splice for tokio_rustls::server::TlsStream<S> {}

impl<S> ReadReady for tokio_rustls::server::TlsStream<S> {}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    // writev(2): hyper then sends a response head and its body in one
    // syscall instead of copying them into one buffer first.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}
