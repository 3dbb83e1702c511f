//! Runs Pingora for client traffic on a named std thread (Pingora builds its own
//! runtimes, so it must not run inside ours), stopped by our `Shutdown` rather than by
//! signals of its own.
//!
//! The listening sockets are bound by us and accepted by our own loop in front of
//! Pingora's HTTP application: a bad address fails start-up with one clear line instead
//! of Pingora's retry-then-panic, tests can bind port 0, and each connection can first
//! yield a PROXY protocol header (Pingora reads such headers only before TLS, never on
//! plain listeners) whose client address then stands as the connection's peer. At
//! TLS endpoints read the ClientHello record first (for its JA4 fingerprint), put it
//! back, and hand the connection to the rustls handshake. At shutdown the loop stops
//! accepting, in-flight requests get up to the drain timeout,
//! and only then are Pingora's runtimes dropped.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use esper_common::Shutdown;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::SocketDigest;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::Service;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::buffered::Buffered;
use crate::ja4;
use crate::live::LiveState;
use crate::proxy::{EsperProxy, InFlight};
use crate::proxyproto::{self, Header};
use crate::tls::CLIENT_HELLO_JA4;

/// How often the drain checks for remaining requests.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Time a load balancer gets to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read ahead of the handshake for a ClientHello's fingerprint: twice the
/// longest hello fingerprinted, room for the headers of the records it is cut into.
const MAX_HELLO_BYTES: usize = 2 * ja4::MAX_HELLO;
/// Pause after an accept error (out of file descriptors, say) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One listening socket and what each of its connections starts with.
pub struct Endpoint {
    pub listener: std::net::TcpListener,
    /// Expect a PROXY protocol header first.
    pub proxy_protocol: bool,
    /// Terminate TLS with this acceptor.
    pub tls: Option<Arc<Acceptor>>,
}

/// Accepts connections on our endpoints and hands them to Pingora's HTTP application.
struct Edge {
    app: Option<HttpProxy<EsperProxy>>,
    endpoints: Vec<Endpoint>,
    live: LiveState,
    stop: watch::Receiver<bool>,
}

#[async_trait]
impl Service for Edge {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(app) = self.app.take() else { return };
        let app = Arc::new(app);
        let mut loops = Vec::new();
        for ep in self.endpoints.drain(..) {
            let listener = match tokio::net::TcpListener::from_std(ep.listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the traffic listener");
                    continue;
                }
            };
            loops.push(tokio::spawn(accept_loop(
                listener,
                ep.proxy_protocol,
                ep.tls,
                self.live.clone(),
                app.clone(),
                self.stop.clone(),
            )));
        }
        for l in loops {
            let _ = l.await;
        }
        app.cleanup().await;
    }

    fn name(&self) -> &str {
        "esper-proxy"
    }

    fn threads(&self) -> Option<usize> {
        None
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    proxy_protocol: bool,
    tls: Option<Arc<Acceptor>>,
    live: LiveState,
    app: Arc<HttpProxy<EsperProxy>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let app = app.clone();
                let stop = stop.clone();
                let live = live.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    serve_connection(tcp, peer, proxy_protocol, tls, &live, app, stop).await
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Reads a PROXY header off `tcp`: the client it names (or `peer` for a LOCAL one) and
/// the bytes read past the header.
async fn read_proxy_header(
    tcp: &mut tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(SocketAddr, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let read = async {
        loop {
            let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the PROXY header".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            match proxyproto::parse(&buf).map_err(|e| e.to_string())? {
                Some((Header::Proxied { source }, used)) => return Ok((source, used)),
                Some((Header::Local, used)) => return Ok((peer, used)),
                None if buf.len() > 8192 => return Err("PROXY header too long".into()),
                None => {}
            }
        }
    };
    let (source, used) = tokio::time::timeout(PROXY_HEADER_TIMEOUT, read)
        .await
        .map_err(|_| "no PROXY header within 5s".to_string())??;
    Ok((source, buf.split_off(used)))
}

/// Reads until `buf` holds the whole ClientHello, over as many records as it spans, and
/// fingerprints it. `None` when it is no ClientHello (the handshake will then fail on
/// its own) or one too long to read for a fingerprint.
async fn read_client_hello(
    tcp: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    let mut chunk = [0u8; 4096];
    loop {
        match ja4::client_hello(buf) {
            ja4::Hello::Whole(message) => return Ok(ja4::fingerprint_hello(&message)),
            ja4::Hello::Not => return Ok(None),
            ja4::Hello::More => {}
        }
        // Records of a few bytes each take more room than the hello they carry.
        if buf.len() >= MAX_HELLO_BYTES {
            return Ok(None);
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_connection(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    proxy_protocol: bool,
    tls: Option<Arc<Acceptor>>,
    live: &LiveState,
    app: Arc<HttpProxy<EsperProxy>>,
    stop: watch::Receiver<bool>,
) {
    let mut client = peer;
    let mut early = Vec::new();
    if proxy_protocol {
        let trusted = live.load().trusted.clone();
        if !trusted.is_empty() && !trusted.contains(peer.ip()) {
            tracing::debug!(%peer, "PROXY header from an untrusted peer; closing");
            return;
        }
        match read_proxy_header(&mut tcp, peer).await {
            Ok((source, rest)) => {
                client = source;
                early = rest;
            }
            Err(reason) => {
                tracing::debug!(%peer, %reason, "refused connection");
                return;
            }
        }
    }
    let _ = tcp.set_nodelay(true);
    let mut ja4 = None;
    if tls.is_some() {
        let read = read_client_hello(&mut tcp, &mut early);
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, read).await {
            Ok(Ok(fp)) => ja4 = fp,
            _ => return,
        }
    }
    let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
    let _ = digest.peer_addr.set(Some(client.into()));
    let mut stream = L4Stream::from(tcp);
    stream.set_socket_digest(digest);
    stream.rewind(&early);
    let stream: pingora::protocols::Stream = match tls {
        None => Box::new(stream),
        Some(acceptor) => {
            let handshake = CLIENT_HELLO_JA4.scope(ja4, acceptor.tls_handshake(stream));
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    tracing::debug!(%client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let stream: pingora::protocols::Stream = Box::new(Buffered::new(stream));
    let mut next = app.process_new(stream, &stop).await;
    while let Some(stream) = next {
        next = app.process_new(stream, &stop).await;
    }
}

/// Tells Pingora to stop once our shutdown fired and in-flight requests have drained.
struct Drain {
    shutdown: Shutdown,
    stop: watch::Sender<bool>,
    in_flight: InFlight,
    timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Drain {
    async fn recv(&self) -> ShutdownSignal {
        self.shutdown.wait().await;
        // Stop accepting; idle keep-alive connections are closed by Pingora.
        let _ = self.stop.send(true);
        let deadline = Instant::now() + self.timeout;
        while self.in_flight.get() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = self.in_flight.get(),
                    timeout = ?self.timeout,
                    "requests still in flight after the drain timeout; closing them"
                );
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        // The drain is done: no grace period left to wait for.
        ShutdownSignal::FastShutdown
    }
}

/// Starts Pingora on `endpoints` with `threads` worker threads; the thread ends after
/// `shutdown` fires and the drain completes.
pub fn spawn(
    app: EsperProxy,
    endpoints: Vec<Endpoint>,
    live: LiveState,
    threads: usize,
    drain_timeout: Duration,
    in_flight: InFlight,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    for ep in &endpoints {
        // The accept loop is asynchronous; the socket must not block.
        ep.listener.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name("esper-proxy".into())
        .spawn(move || {
            let conf = ServerConf {
                threads,
                grace_period_seconds: Some(0),
                graceful_shutdown_timeout_seconds: Some(0),
                ..ServerConf::default()
            };
            let mut server = Server::new_with_opt_and_conf(None, conf);
            let conf = server.configuration.clone();
            let (stop_tx, stop_rx) = watch::channel(false);
            server.add_service(Edge {
                app: Some(pingora::proxy::http_proxy(&conf, app)),
                endpoints,
                live,
                stop: stop_rx,
            });
            server.run(RunArgs {
                shutdown_signal: Box::new(Drain {
                    shutdown,
                    stop: stop_tx,
                    in_flight,
                    timeout: drain_timeout,
                }),
            });
            tracing::info!("traffic listener stopped");
        })
}
