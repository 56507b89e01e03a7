//! Demo backends for `cargo xtask run`: tiny HTTP/1.1 servers that say which
//! backend answered, so that `curl` through the proxy shows something.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

use anyhow::Result;

/// Starts one server thread per address. The sockets use SO_REUSEPORT, so
/// a second `cargo xtask run` (a new proxy generation) serves the demo too
/// and keeps it up when the first one exits.
pub fn start(addrs: &[&str]) -> Result<()> {
    for addr in addrs {
        match bind(addr) {
            Ok(listener) => {
                let name = addr.to_string();
                eprintln!("xtask: demo backend listening on {name}");
                thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let name = name.clone();
                        thread::spawn(move || serve(stream, &name));
                    }
                });
            }
            Err(err) => eprintln!("xtask: demo backend {addr} not started: {err}"),
        }
    }
    Ok(())
}

fn bind(addr: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn serve(mut stream: TcpStream, name: &str) {
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    // Read the request head; the demo ignores bodies.
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.len() > 64 * 1024 {
            return;
        }
    }
    // Long enough (and repetitive enough) for the gzip stage to compress.
    let head = seen.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut body = format!(
        "hello from demo backend {name}\nrequest: {}\n",
        String::from_utf8_lossy(head).trim_end()
    );
    for i in 1..=40 {
        body.push_str(&format!(
            "line {i:02}: the proxy hands over between generations without losing a connection\n"
        ));
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}
