//! The data path of a TLS listener in http mode, on in-memory streams:
//! PROXY v2 header, TLS handshake, HTTP/1.1 through `http::serve` with gzip,
//! to an upstream that checks the PROXY header the proxy sends it and echoes
//! the request body. The same steps as `Stage::pipeline`, which needs a real
//! socket.
//!
//! Input: the first byte picks what the client does, the rest is what it
//! sends:
//! - 0: the bytes straight onto the connection (PROXY reader, then whatever
//!   of TLS they reach);
//! - 1: a valid PROXY header, then the bytes raw (rustls's ClientHello
//!   parsing);
//! - 2: a valid PROXY header, a real TLS handshake, then the bytes inside
//!   TLS (hyper's request parsing, the header rules, gzip);
//! - 3: as 2 on a draining stage.
//!
//! Checks, besides no panic and no hang: the upstream gets a PROXY header
//! with the client's address and the TLS details, and X-Forwarded-For ends
//! with the client's address.
#![no_main]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use proxy::stage::{
    http::{self, Compression, HttpSettings},
    proxy_proto::{self, Versions, encode_header, read_header, tls_tlvs},
    tls::{CertSource, TlsAcceptor, TlsSettings},
};
use proxy_fuzz::runtime;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;

const CLIENT: &str = "192.0.2.7:40000";
const LISTENER: &str = "198.51.100.1:443";
const SNI: &str = "proxy.test";
/// Virtual time (the clock is paused): only reached when nothing can move.
const HANG: Duration = Duration::from_secs(600);

/// The server's acceptor and a client that trusts it, made once per process
/// from one rcgen certificate.
struct Fixture {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    settings: Arc<HttpSettings>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cert = rcgen::generate_simple_self_signed(vec![SNI.into()]).expect("rcgen");
        let dir = std::env::temp_dir().join(format!("proxy-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bundle: PathBuf = dir.join("server.pem");
        let pem = format!("{}{}", cert.cert.pem(), cert.key_pair.serialize_pem());
        std::fs::write(&bundle, pem).expect("write the certificate");
        let acceptor = TlsAcceptor::new(&TlsSettings {
            certs: vec![CertSource::Bundle(bundle)],
            alpn: vec!["http/1.1".into()],
            handshake_timeout: Duration::from_secs(5),
            session_tickets: false,
            session_cache: 256,
        })
        .expect("acceptor");
        let _ = std::fs::remove_dir_all(&dir);

        let mut roots = RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];

        let settings = Arc::new(HttpSettings {
            compression: Some(Compression {
                level: 1,
                min_size: 0,
                types: vec!["text/plain".into()],
            }),
            header_read_timeout: Duration::from_secs(5),
            max_header_size: 16 * 1024,
            server_timeout: Duration::from_secs(5),
            client_timeout: Duration::from_secs(5),
            http2: Default::default(),
            tunnel: Default::default(),
            listener: Arc::from("-"),
            generation: 0,
            http1: Default::default(),
            parked: Default::default(),
        });
        Fixture {
            acceptor,
            connector: TlsConnector::from(Arc::new(client)),
            settings,
        }
    })
}

type Tasks = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// The proxy's side: what `Stage::pipeline` does for a TLS listener with
/// `accept_proxy` in http mode whose backend wants PROXY v2.
async fn proxy_side(mut io: DuplexStream, draining: bool, tasks: Tasks) {
    let f = fixture();
    let Ok((header, _)) = read_header(&mut io, Versions::Any, Duration::from_secs(5), 4096).await
    else {
        return;
    };
    let Ok((tls, info)) = f.acceptor.accept(io).await else {
        return;
    };
    let tlvs = tls_tlvs(
        info.sni.as_deref(),
        info.alpn.as_deref(),
        info.version,
        &info.cipher,
    );
    let preamble = encode_header(header.source, header.destination, &tlvs).expect("preamble");
    let client = header.source;
    let upstream = move || {
        let preamble = preamble.clone();
        let tasks = tasks.clone();
        async move {
            let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
            ours.write_all(&preamble).await?;
            let task = tokio::spawn(origin(theirs, client));
            tasks.lock().unwrap().push(task);
            Ok(ours)
        }
    };
    let (_drain, draining) = watch::channel(draining);
    let _ = http::serve(
        tls,
        upstream,
        f.settings.clone(),
        http::Downstream::http1(client),
        draining,
    )
    .await;
}

/// The upstream: checks the PROXY header, then serves HTTP/1.1 echoing the
/// request body as text/plain (which the proxy compresses).
async fn origin(mut io: DuplexStream, client: Option<SocketAddr>) {
    let (header, _) = read_header(&mut io, Versions::V2, Duration::from_secs(5), 4096)
        .await
        .expect("the proxy sends a valid PROXY header upstream");
    assert_eq!(header.source, client);
    assert_eq!(header.tlvs[0], (proxy_proto::tlv::AUTHORITY, SNI.into()));
    let service = service_fn(move |req: Request<Incoming>| async move {
        if let Some(client) = client {
            let xff = req
                .headers()
                .get("x-forwarded-for")
                .expect("X-Forwarded-For is set")
                .as_bytes();
            let ip = client.ip().to_string();
            assert!(xff.ends_with(ip.as_bytes()), "X-Forwarded-For {xff:?}");
        }
        let body: BoxBody<Bytes, hyper::Error> = if req.uri().path() == "/big" {
            Full::new(Bytes::from(vec![b'a'; 20_000]))
                .map_err(|never| match never {})
                .boxed()
        } else {
            req.into_body().boxed()
        };
        let resp = Response::builder()
            .header("content-type", "text/plain")
            .body(body)
            .unwrap();
        Ok::<_, hyper::Error>(resp)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// The client's side: what it sends depends on `mode`, see the module docs.
async fn client_side(mut io: DuplexStream, mode: u8, bytes: &[u8]) {
    if mode != 0 {
        let header = encode_header(
            Some(CLIENT.parse().unwrap()),
            Some(LISTENER.parse().unwrap()),
            &[],
        )
        .unwrap();
        if io.write_all(&header).await.is_err() {
            return;
        }
    }
    if mode < 2 {
        let _ = io.write_all(bytes).await;
        let _ = io.shutdown().await;
        let _ = io.read_to_end(&mut Vec::new()).await;
        return;
    }
    let name = ServerName::try_from(SNI).unwrap();
    let Ok(mut tls) = fixture().connector.connect(name, io).await else {
        return;
    };
    let _ = tls.write_all(bytes).await;
    let _ = tls.shutdown().await;
    let _ = tls.read_to_end(&mut Vec::new()).await;
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mode = mode % 4;
    let tasks: Tasks = Arc::default();
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let both = async {
            tokio::join!(
                client_side(client, mode, bytes),
                proxy_side(server, mode == 3, tasks.clone()),
            )
        };
        tokio::time::timeout(HANG, both)
            .await
            .expect("the connection ends without waiting for ever");
        let spawned = std::mem::take(&mut *tasks.lock().unwrap());
        for task in spawned {
            match tokio::time::timeout(HANG, task).await {
                Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(_) => {}
                Err(_) => panic!("the upstream connection outlived the client's"),
            }
        }
    });
});
